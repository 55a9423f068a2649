"""3D PatchGAN discriminator (pix2pix's NLayerDiscriminator in 3D, as taming / Medical Diffusion).

``Conv(4, s2) → LeakyReLU(0.2)``, then ``num_layers - 1`` × ``Conv(4, s2) → GN → LeakyReLU``, one
``Conv(4, s1) → GN → LeakyReLU`` and a ``Conv(4, s1)`` to one logit per patch. A side ``n``
gives ``n / 2**num_layers - 2`` logits. Normalisation is GroupNorm or none — no BatchNorm:
real and fake tiles are scored in one concatenated batch (one DDP forward per update), which
is only correct when no statistic is shared across samples.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .blocks import GroupNorm32
from .config import DiscConfig


def _groups(channels: int, max_groups: int = 32) -> int:
    """Largest divisor of ``channels`` that is at most ``max_groups``."""
    return max(g for g in range(1, min(channels, max_groups) + 1) if channels % g == 0)


class PatchDiscriminator3d(nn.Module):
    """Image ``(B, C, X, Y, Z)`` → patch logits ``(B, 1, x, y, z)``.

    Args:
        cfg: channels, layers and normalisation.
        in_channels: image channels.
    """

    def __init__(self, cfg: DiscConfig, in_channels: int = 1):
        super().__init__()
        self.cfg = cfg
        bias = cfg.norm == "none"  # a bias before GroupNorm's affine is redundant

        def norm(c: int) -> nn.Module:
            return GroupNorm32(_groups(c), c) if cfg.norm == "group" else nn.Identity()

        c = cfg.channels
        layers: list[nn.Module] = [nn.Conv3d(in_channels, c, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        for n in range(1, cfg.num_layers):
            c_next = cfg.channels * min(2**n, 8)
            layers += [nn.Conv3d(c, c_next, 4, stride=2, padding=1, bias=bias), norm(c_next), nn.LeakyReLU(0.2)]
            c = c_next
        c_next = cfg.channels * min(2**cfg.num_layers, 8)
        layers += [nn.Conv3d(c, c_next, 4, stride=1, padding=1, bias=bias), norm(c_next), nn.LeakyReLU(0.2)]
        layers += [nn.Conv3d(c_next, 1, 4, stride=1, padding=1)]
        self.net = nn.Sequential(*layers)
        init_disc_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        small = [s for s in x.shape[2:] if s < self.cfg.min_tile]
        if small:
            raise ValueError(f"discriminator input sides {tuple(x.shape[2:])} are below the minimum "
                             f"{self.cfg.min_tile} for num_layers={self.cfg.num_layers}")
        return self.net(x)


def init_disc_weights(module: nn.Module) -> None:
    """DCGAN / pix2pix initialisation: convolutions ``N(0, 0.02)``, norms ``N(1, 0.02)``, zero bias."""
    for m in module.modules():
        if isinstance(m, nn.Conv3d):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.GroupNorm):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def num_logits(side: int, num_layers: int) -> int:
    """Logits along an axis of ``side`` voxels (for shape tables)."""
    for _ in range(num_layers):
        side = math.floor((side + 2 - 4) / 2) + 1
    return side - 2
