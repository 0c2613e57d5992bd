"""A GAN step that updates the discriminator between the generator's loss and its backward.

Plain `python examples/gan_step.py` dies in `loss_g.backward()` with PyTorch's in-place error,
naming neither the parameter nor the step; `python -m fxinplace run examples/gan_step.py` names
both (docs/cli.md).
"""

import torch
import torch.nn as nn

torch.manual_seed(0)
gen = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6))
disc = nn.Sequential(nn.Linear(6, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
opt_g, opt_d = torch.optim.Adam(gen.parameters()), torch.optim.Adam(disc.parameters())
bce = nn.BCEWithLogitsLoss()
real, z = torch.randn(8, 6), torch.randn(8, 4)
fake = gen(z)
loss_d = bce(disc(real), torch.ones(8, 1)) + bce(disc(fake.detach()), torch.zeros(8, 1))
loss_g = bce(disc(fake), torch.ones(8, 1))  # saves disc's weights
loss_d.backward()
opt_d.step()  # STEP: changes them
loss_g.backward()
opt_g.step()
