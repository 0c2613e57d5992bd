"""A multi-task model whose second head mutates a shared parameter in place.

The classic forum question: task 2 does `shared_param.mul_(2)` (here under `no_grad`, the
only way autograd lets you), task 1 has already used the parameter, and the backward of
task 1 dies with "one of the variables needed for gradient computation has been modified
by an inplace operation ... Good luck!". Run it:

    python examples/multitask.py
"""

import torch
from torch import nn


class Trunk(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(self.bn(self.fc(x)))


class SegHead(nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.fc = nn.Linear(16, 4)
        self.scale = scale

    def forward(self, h):
        return self.fc(h) * self.scale


class DepthHead(nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.fc = nn.Linear(16, 1)
        self.scale = scale

    def forward(self, h):
        out = self.fc(h) * self.scale
        with torch.no_grad():
            self.scale.mul_(2)  # "task 2 rescales the shared parameter"
        return out


class MultiTask(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = Trunk()
        self.shared_scale = nn.Parameter(torch.ones(1))
        self.seg = SegHead(self.shared_scale)
        self.depth = DepthHead(self.shared_scale)

    def forward(self, x):
        h = self.trunk(x) * 0.5
        h[:, 0] = 0  # safe: nothing saved `h` for backward yet
        return {"seg": self.seg(h), "depth": self.depth(h)}


if __name__ == "__main__":
    import fxinplace

    torch.manual_seed(0)
    model = MultiTask()
    x = torch.randn(4, 8)
    report = fxinplace.audit(model, x)
    print()
    print("error-level hazards:", len(report.hazards("error")))
