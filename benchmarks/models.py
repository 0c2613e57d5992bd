"""Multi-task models of any size for the benchmarks: a residual trunk and several heads.

Each trunk block has the in-place ops real multi-task models have and Inductor compiles:
a scalar `mul_` on an intermediate nothing saved, batch norm's running-statistics update
(a write the schema hides) with `num_batches_tracked += 1`, and `ReLU(inplace=True)`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["MultiTask", "make_model", "make_batch", "make_train_step"]


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.norm = nn.BatchNorm1d(width)
        self.act = nn.ReLU(inplace=True)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        y = self.fc(h)
        y.mul_(0.5)  # safe: linear saves its input and weight, not its output
        return h + self.act(self.norm(y))


class Head(nn.Module):
    def __init__(self, width: int, depth: int, out: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(Block(width) for _ in range(depth)))
        self.out = nn.Linear(width, out)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(self.blocks(h))


class MultiTask(nn.Module):
    """`depth` trunk blocks shared by `heads` task heads of `head_depth` blocks each."""

    def __init__(self, depth: int, width: int = 32, heads: int = 3, head_depth: int = 2) -> None:
        super().__init__()
        self.stem = nn.Linear(width, width)
        self.trunk = nn.Sequential(*(Block(width) for _ in range(depth)))
        self.heads = nn.ModuleDict({f"task{i}": Head(width, head_depth, 4) for i in range(heads)})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(self.stem(x))
        return {name: head(h) for name, head in self.heads.items()}


def make_model(depth: int, width: int = 32, device: str | torch.device = "cpu", seed: int = 0) -> MultiTask:
    torch.manual_seed(seed)
    return MultiTask(depth, width).to(device).train()


def make_batch(width: int = 32, batch: int = 64, device: str | torch.device = "cpu", seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, width, generator=generator).to(device)


def make_train_step(forward: Callable, model: nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """One training step: forward through `forward` (compiled or not), backward, SGD step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        out = forward(x)
        loss = sum(o.square().mean() for o in out.values())
        loss.backward()
        optimizer.step()
        return loss

    return step
