"""Denoisers with planted invariances (the planted-invariance benchmark, ``run.py``).

:class:`RegionBlind` is f(x) = g(x ⊙ (1 − M) + c M): the bundled CNN-10 g applied to the
input with a disc M at the centre of every input replaced by a constant c (0 in network
units, about −540 HU in the paper's normalisation): f provably ignores everything inside M,
so every image that differs from x only inside M is an invariance of f. It is not shift
invariant (M follows the input's centre), so it is declared for full-image use; the
invariance engine applies it to patches, where M sits at the patch centre.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from InvarianceExplorerLib.denoisers import CNN10


def centre_disc(height: int, width: int, radius_px: float) -> torch.Tensor:
    """``(height, width)`` float mask: 1 inside the disc of ``radius_px`` around the centre
    (the pixel ``(height // 2, width // 2)``), 0 outside."""
    rows = torch.arange(height, dtype=torch.float32)[:, None] - height // 2
    cols = torch.arange(width, dtype=torch.float32)[None, :] - width // 2
    return ((rows ** 2 + cols ** 2) <= radius_px ** 2).float()


class RegionBlind(nn.Module):
    """CNN-10 that sees a constant inside the centre disc of radius ``radius_px`` pixels."""

    def __init__(self, radius_px: float = 10.0, fill: float = 0.0):
        super().__init__()
        self.g = CNN10()
        self.radius_px, self.fill = float(radius_px), float(fill)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = centre_disc(x.shape[-2], x.shape[-1], self.radius_px).to(x)
        return self.g(x * (1.0 - mask) + self.fill * mask)
