"""A compiled two-task model whose depth head rescales a parameter the seg head saved.

It only evaluates (no backward), so plain Python runs it without complaint; its training
would fail. `python -m fxinplace run --json report.json examples/multitask_eval.py` reports
the hazard and exits 1 (docs/cli.md).
"""

import torch
from torch import nn


class MultiTask(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(8, 16)
        self.scale = nn.Parameter(torch.ones(1))
        self.seg, self.depth = nn.Linear(16, 4), nn.Linear(16, 1)

    def forward(self, x):
        h = self.trunk(x)
        seg = self.seg(h) * self.scale
        with torch.no_grad():
            self.scale.mul_(2)  # MUTATES
        return {"seg": seg, "depth": self.depth(h) * self.scale}


torch.manual_seed(0)
model = MultiTask()
x = torch.randn(4, 8)
if __name__ == "__main__":
    out = torch.compile(model, backend="eager")(x)
    print({k: tuple(v.shape) for k, v in out.items()})
