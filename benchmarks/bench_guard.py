"""Per-step cost of `fxinplace.guard` on multi-task models, for each of its modes, against no guard.

    python benchmarks/bench_guard.py            # a few minutes on 2 CPU cores
    python benchmarks/bench_guard.py --quick    # a smoke run

Three models: a shared MLP trunk with three heads returning a dict, at two trunk widths
(4x512, 4x128), and a small convolutional multi-task model (conv/batch-norm trunk, a per-pixel
segmentation head and a classification head). Two loops on each: ``sum`` adds the task losses
and runs one backward; ``per-task grad`` calls `torch.autograd.grad` once per task (as PCGrad /
GradNorm / MGDA do) and steps once. The guard is one object entered once per step, as a
decorated training step is. Configurations:

- ``no guard``;
- ``identity hooks``: `saved_tensors_hooks` whose pack and unpack return the tensor: PyTorch's
  own cost of the hooks the guard installs (no target);
- ``check="all"``: every step watched by the guard's hooks (target: at most 1.05 times no guard);
- ``check="fast"``: the first 3 steps watched; on the others the optimizer step hooks, and
  PyTorch's own version check named by the guard when it fails (target: at most 1.05);
- ``check="sampled"``: the first 3 steps watched, then one in 100; PyTorch's check named on the
  others, nothing installed (target: at most 1.01);
- ``check_values=True``: every step checked, and each saved tensor fingerprinted (no target:
  what the value check adds to ``check="all"``).

The configurations run interleaved, one step each per round, round after round, in a new
order each round, so that drift on a shared machine hits them alike; the table gives
the median step time over all rounds, by the wall clock and by the process's CPU time
(steadier on a shared machine: other processes do not count), and the median of each step's
ratio to the no-guard step of the same round. Targets are checked on the CPU-time ratio.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from tabulate import tabulate

from fxinplace import guard

TARGETS = {'check="all"': 1.05, 'check="fast"': 1.05, 'check="sampled"': 1.01}


class MultiTask(nn.Module):
    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(64, width), nn.ReLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.ReLU()]
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({
            "seg": nn.Sequential(nn.Linear(width, width // 2), nn.ReLU(), nn.Linear(width // 2, 10)),
            "depth": nn.Sequential(nn.Linear(width, width // 2), nn.ReLU(), nn.Linear(width // 2, 1)),
            "normal": nn.Sequential(nn.Linear(width, width // 2), nn.ReLU(), nn.Linear(width // 2, 3)),
        })

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(x)
        return {name: head(h) for name, head in self.heads.items()}


class ConvMultiTask(nn.Module):
    """A small dense-prediction model: a conv trunk, a per-pixel head and an image head."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, stride=2), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        )
        self.seg = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 5, 1))
        self.cls = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(x)
        return {"seg": self.seg(h), "cls": self.cls(h)}


def _mlp_batch(batch_size: int) -> dict[str, torch.Tensor]:
    return {
        "x": torch.randn(batch_size, 64),
        "seg": torch.randint(0, 10, (batch_size,)),
        "depth": torch.randn(batch_size, 1),
        "normal": torch.randn(batch_size, 3),
    }


def _mlp_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = model(batch["x"])
    return {
        "seg": F.cross_entropy(out["seg"], batch["seg"]),
        "depth": F.mse_loss(out["depth"], batch["depth"]),
        "normal": F.mse_loss(out["normal"], batch["normal"]),
    }


def _conv_batch(batch_size: int) -> dict[str, torch.Tensor]:
    return {
        "x": torch.randn(batch_size, 3, 32, 32),
        "seg": torch.randint(0, 5, (batch_size, 16, 16)),
        "cls": torch.randint(0, 10, (batch_size,)),
    }


def _conv_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = model(batch["x"])
    return {"seg": F.cross_entropy(out["seg"], batch["seg"]), "cls": F.cross_entropy(out["cls"], batch["cls"])}


Losses = Callable[[nn.Module, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def step_sum(model: nn.Module, opt: torch.optim.Optimizer, batch: dict[str, torch.Tensor], losses: Losses) -> None:
    opt.zero_grad()
    sum(losses(model, batch).values()).backward()
    opt.step()


def step_per_task(model: nn.Module, opt: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
                  losses: Losses) -> None:
    params = list(model.parameters())
    grads = [
        torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        for loss in losses(model, batch).values()
    ]
    for p, gs in zip(params, zip(*grads)):
        p.grad = sum(g for g in gs if g is not None)
    opt.step()


def identity_hooks() -> AbstractContextManager:
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)


def measure(name: str, model: nn.Module, batch: dict[str, torch.Tensor], losses: Losses,
            rounds: int) -> list[list[object]]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    full = guard(model, optimizers={"opt": opt})
    fast = guard(model, optimizers={"opt": opt}, check="fast", first=3)
    sampled = guard(model, optimizers={"opt": opt}, check="sampled", first=3, every=100)
    values = guard(model, optimizers={"opt": opt}, check_values=True)
    configs: dict[str, Callable[[], AbstractContextManager]] = {
        "no guard": nullcontext,
        "identity hooks": identity_hooks,
        'check="all"': lambda: full,
        'check="fast"': lambda: fast,
        'check="sampled"': lambda: sampled,
        "check_values=True": lambda: values,
    }
    loops = {"sum": step_sum, "per-task grad": step_per_task}
    rows = []
    for loop_name, step in loops.items():
        wall: dict[str, list[float]] = {c: [] for c in configs}
        cpu: dict[str, list[float]] = {c: [] for c in configs}
        for _ in range(2):  # warm-up, allocator included
            for make in configs.values():
                with make():
                    step(model, opt, batch, losses)
        order, shuffle = list(configs.items()), random.Random(0).shuffle
        for _ in range(rounds):
            # In a new order each round: what a step leaves behind (garbage for the collector,
            # the allocator's state) falls on whichever configuration runs next.
            shuffle(order)
            for config, make in order:
                start, start_cpu = time.perf_counter(), time.process_time()
                with make():
                    step(model, opt, batch, losses)
                wall[config].append(time.perf_counter() - start)
                cpu[config].append(time.process_time() - start_cpu)
        for config in configs:
            # Each ratio pairs a step with the no-guard step of the same round (seconds apart):
            # the median of those ratios, not a ratio of medians, so that load that comes and
            # goes over the run cancels out.
            w_ratio = statistics.median(a / b for a, b in zip(wall[config], wall["no guard"]))
            c_ratio = statistics.median(a / b for a, b in zip(cpu[config], cpu["no guard"]))
            target = ""
            if config in TARGETS:
                target = f"<= {TARGETS[config]:.2f}: " + ("met" if c_ratio <= TARGETS[config] else "MISSED")
            rows.append([name, loop_name, config, f"{statistics.median(wall[config]) * 1e3:.2f}", f"{w_ratio:.3f}",
                         f"{statistics.median(cpu[config]) * 1e3:.2f}", f"{c_ratio:.3f}", target])
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["4x512", "4x128", "conv"],
                        help="MLP trunks as LAYERSxWIDTH, and/or `conv`")
    parser.add_argument("--batch", type=int, default=128, help="batch of the MLP models (conv: 16)")
    parser.add_argument("--rounds", type=int, default=200, help="steps per configuration and loop")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: steadier on a shared machine; 0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="tiny settings, for a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.models = 4, ["4x128", "conv"]
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for spec in args.models:
        torch.manual_seed(0)
        if spec == "conv":
            rows += measure("conv", ConvMultiTask(), _conv_batch(16), _conv_losses, args.rounds)
        else:
            depth, width = (int(n) for n in spec.split("x"))
            rows += measure(spec, MultiTask(width, depth), _mlp_batch(args.batch), _mlp_losses, args.rounds)
    print(f"fxinplace.guard overhead per training step: torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), MLP batch {args.batch}, conv batch 16, Adam; "
          f"median of {args.rounds} steps per row; x: median ratio to the same round's no-guard step")
    print(tabulate(rows, headers=["model", "loop", "configuration", "wall ms", "x", "cpu ms", "x",
                                  "target"], tablefmt="simple"))


if __name__ == "__main__":
    main()
