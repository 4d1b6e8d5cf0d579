"""Model factories for ``python -m model_owner deploy --model tests.factories:<name> --weights ...``."""

from __future__ import annotations

import torch.nn as nn


def small_unet() -> nn.Module:
    """A two-level U-Net with BatchNorm after a transposed conv (as MONAI builds them)."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            self.down = nn.MaxPool2d(2)
            self.mid = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
            self.up = nn.Sequential(nn.ConvTranspose2d(16, 8, 2, stride=2), nn.BatchNorm2d(8), nn.ReLU())
            self.head = nn.Conv2d(16, 2, 1)

        def forward(self, x):  # type: ignore[no-untyped-def]
            import torch

            e = self.enc(x)
            return self.head(torch.cat([e, self.up(self.mid(self.down(e)))], 1))

    return Net()
