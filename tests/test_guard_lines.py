"""A model run several times a step (a discriminator on real, then on fake images) saves from
the same forward line each time: the guard names the loop's line that called it too."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from torch import nn

import fxinplace

bce = nn.functional.binary_cross_entropy_with_logits


class Discriminator(nn.Module):
    def __init__(self):
        super().__init__()
        self.main = nn.Sequential(nn.Linear(6, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))

    def forward(self, x):
        return self.main(x)  # FORWARD


def step(gen, disc, opt_d, z, real):
    ones, zeros = torch.ones(5, 1), torch.zeros(5, 1)
    fake = gen(z)
    loss_d = bce(disc(real), ones) + bce(disc(fake.detach()), zeros)
    loss_g = bce(disc(fake), ones)  # LOOP
    loss_d.backward()
    opt_d.step()
    loss_g.backward()


def _line(fn, marker):
    lines, first = inspect.getsourcelines(fn)
    return first + next(i for i, line in enumerate(lines) if line.rstrip().endswith(f"# {marker}"))


def test_saved_by_names_the_forward_line_and_the_loop_line_that_called_the_model():
    torch.manual_seed(0)
    gen, disc = nn.Sequential(nn.Linear(4, 6)), Discriminator()
    z, real = torch.randn(5, 4), torch.randn(5, 6)
    twin_gen, twin_disc = copy.deepcopy(gen), copy.deepcopy(disc)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        step(twin_gen, twin_disc, torch.optim.SGD(twin_disc.parameters(), lr=0.1), z, real)  # PyTorch's verdict
    opt_d = torch.optim.SGD(disc.parameters(), lr=0.1)
    with pytest.raises(fxinplace.StaleSavedTensorError) as raised:
        with fxinplace.guard({"gen": gen, "disc": disc}, optimizers={"opt_d": opt_d}):
            step(gen, disc, opt_d, z, real)
    found = raised.value.stale
    assert found.name.startswith("disc.main.")
    assert (found.saved_at.file, found.saved_at.line) == (__file__, _line(Discriminator, "FORWARD"))
    assert (found.called_at.file, found.called_at.line) == (__file__, _line(step, "LOOP"))
    saved_by = next(line for line in str(raised.value).splitlines() if "saved by:" in line)
    assert saved_by.endswith("`return self.main(x)  # FORWARD`, called from "
                             f"{found.called_at} `loss_g = bce(disc(fake), ones)  # LOOP`")
