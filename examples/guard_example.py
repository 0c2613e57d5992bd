"""fxinplace.guard on two classic loops: a GAN and per-task gradients of a multi-task model.

    python examples/guard_example.py

1. A GAN step that updates the discriminator between building the generator's loss and its
   backward: PyTorch's own error names nothing; the guard's names the parameter, the step
   and the lines, and says how to fix it.
2. A survey (``on_stale="warn"``) of a multi-task loop that steps after each task's
   `torch.autograd.grad` and updates an EMA head in the middle: every stale tensor, one
   table. Surveys let the backward go on with the changed values: do not train like that.
3. The same loops in the right order: the guard stays silent.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxinplace import StaleSavedTensorError, StaleSavedTensorWarning, guard

bce = nn.BCEWithLogitsLoss()


def gan_step(gen, disc, opt_g, opt_d, z, real, g, fixed=False):
    ones, zeros = torch.ones(len(z), 1), torch.zeros(len(z), 1)
    fake = gen(z)
    loss_d = bce(disc(real), ones) + bce(disc(fake.detach()), zeros)
    if not fixed:
        loss_g = bce(disc(fake), ones)  # built before the discriminator's step...
    opt_d.zero_grad()
    g.losses({"disc": loss_d})["disc"].backward()
    opt_d.step()
    if fixed:
        loss_g = bce(disc(fake), ones)  # ...instead of after it
    opt_g.zero_grad()
    g.losses({"gen": loss_g})["gen"].backward()
    opt_g.step()


class MultiTask(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.Tanh())
        self.heads = nn.ModuleDict({"seg": nn.Linear(16, 4), "depth": nn.Linear(16, 1)})

    def forward(self, x):
        h = self.trunk(x)
        return {task: head(h) for task, head in self.heads.items()}


def multitask_step(model, ema_depth, opt, batch, g, fixed=False):
    out = model(batch["x"])
    losses = g.losses({  # name the tasks (the output keys would name "seg" and "depth")
        "seg": F.cross_entropy(out["seg"], batch["seg"]),
        "depth": F.mse_loss(out["depth"], batch["depth"]),
        "distill": F.mse_loss(ema_depth(model.trunk(batch["x"])), batch["depth"]),
    })
    params = list(model.parameters())
    grads = []
    for task, loss in losses.items():
        grads.append(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True))
        if not fixed:
            apply(params, grads[-1:])
            opt.step()  # stepping per task: the next task's graph saw the old weights
        if task == "depth" and not fixed:
            ema_update(ema_depth, model.heads["depth"])  # the EMA head is in "distill"'s graph
    if fixed:
        apply(params, grads)
        opt.step()
        ema_update(ema_depth, model.heads["depth"])


def apply(params, grads):
    for p, gs in zip(params, zip(*grads)):
        gs = [g for g in gs if g is not None]
        p.grad = sum(gs) if gs else None


def ema_update(ema, online, decay=0.99):
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), online.parameters()):
            pe.mul_(decay).add_(p, alpha=1 - decay)


def main():
    torch.manual_seed(0)
    gen = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6))
    disc = nn.Sequential(nn.Linear(6, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
    opt_g = torch.optim.Adam(gen.parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-3)
    z, real = torch.randn(8, 4), torch.randn(8, 6)

    print("1. GAN: the discriminator steps between the generator's loss and its backward\n")
    g = guard({"gen": gen, "disc": disc}, optimizers={"opt_g": opt_g, "opt_d": opt_d})
    try:
        with g:
            gan_step(gen, disc, opt_g, opt_d, z, real, g)
    except StaleSavedTensorError as e:
        print(e)

    print("\n2. Multi-task: a step after each task's autograd.grad, an EMA update in between\n")
    model = MultiTask()
    ema_depth = copy.deepcopy(model.heads["depth"]).requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = {"x": torch.randn(16, 8), "seg": torch.randint(0, 4, (16,)),
             "depth": torch.randn(16, 1)}
    survey = guard({"model": model, "ema": ema_depth}, optimizers={"opt": opt}, on_stale="warn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StaleSavedTensorWarning)
        with survey:
            multitask_step(model, ema_depth, opt, batch, survey)
    print(survey.table())

    print("\n3. The same loops in the right order\n")
    fixed = guard({"gen": gen, "disc": disc, "model": model, "ema": ema_depth},
                  optimizers={"opt_g": opt_g, "opt_d": opt_d, "opt": opt})
    with fixed:
        gan_step(gen, disc, opt_g, opt_d, z, real, fixed, fixed=True)
        multitask_step(model, ema_depth, opt, batch, fixed, fixed=True)
    print(fixed.table())


if __name__ == "__main__":
    main()
