"""X-Recon losses as pure functions: L2 reconstruction, multi-angle projection L1, LSGAN.

Generator (released configuration): ``10·MSE(G(x), y) + 0.1·mean_v L1(P_v T G(x), P_v T y)
+ 1·E[(D(G(x) | x) − 1)²]``, ``v`` over PA, lateral and axial, ``T`` a random rigid pose shared
by output and target (the paper's "multi-angle" projections: its ProST projector draws a new
pose every step, rotations N(0, 10°) and shifts N(0, 8) voxels). The paper says "adversarial
loss"; the released code uses LSGAN (``ganloss: 'lsgan'``), and so do we. Discriminator:
``½E[(D(y | x) − 1)²] + ½E[D(G(x) | x)²]``, conditional on the X-rays expanded along their beams.

Order of updates: as X2CT-GAN's code, G step then D step on the same forward pass::

    fake = G(**xrays)
    g = generator_losses(fake, target, xrays, D_unwrapped, cfg, generator=rng)
    d = discriminator_loss(D, target, fake.detach(), condition(xrays, cfg.model))
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..common import check_volume, projection_l1
from ..x2ct_gan.losses import (  # X-Recon's D loss is X2CT-GAN's
    condition,
    discriminator_loss,
    with_adversarial_total,
)
from .config import XReconConfig

__all__ = ["condition", "discriminator_loss", "generator_losses", "random_pose", "apply_pose"]


def random_pose(batch: int, degrees: float, shift: float, generator: torch.Generator | None = None) -> Tensor:
    """Random rigid poses ``B×3×4`` (rotation | translation) in normalised grid units.

    Rotations about the three axes ~ N(0, ``degrees``), translations ~ N(0, ``2·shift``) in
    the [-1, 1] grid (``shift`` is a fraction of the side). Drawn on the CPU from ``generator``.
    """
    angles = torch.randn(batch, 3, generator=generator, dtype=torch.float64) * math.radians(degrees)
    shifts = torch.randn(batch, 3, generator=generator, dtype=torch.float64) * (2.0 * shift)
    c, s = angles.cos(), angles.sin()
    one, zero = torch.ones(batch, dtype=torch.float64), torch.zeros(batch, dtype=torch.float64)

    def rot(i: int, axes: tuple[int, int]) -> Tensor:  # B×3×3 rotation in the plane of `axes`
        m = torch.stack([one, zero, zero, zero, one, zero, zero, zero, one], dim=1)
        m = rearrange(m, "b (i j) -> b i j", i=3).clone()
        a, b = axes
        m[:, a, a], m[:, a, b], m[:, b, a], m[:, b, b] = c[:, i], -s[:, i], s[:, i], c[:, i]
        return m

    rotation = rot(0, (1, 2)) @ rot(1, (0, 2)) @ rot(2, (0, 1))
    return torch.cat([rotation, rearrange(shifts, "b k -> b k 1")], dim=2).float()


def apply_pose(volume: Tensor, pose: Tensor, fill: float) -> Tensor:
    """Resample ``B×C×X×Y×Z`` under the poses ``B×3×4`` (trilinear); outside voxels get ``fill``."""
    grid = F.affine_grid(pose.to(volume.device, volume.dtype), list(volume.shape), align_corners=False)
    return F.grid_sample(volume - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill


def generator_losses(G_out: Tensor, target: Tensor, xrays: Mapping[str, Tensor], D: nn.Module,
                     cfg: XReconConfig, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """The generator's objective on one batch.

    Args:
        G_out: the generator's output ``B×1×N×N×N`` (in ``cfg.model.value_range``).
        target: the ground-truth CT, same shape and range.
        xrays: ``{"pa": B×1×S×S, "lateral": ...}``, the generator's inputs (D's condition).
        D: the discriminator (unwrapped from DDP); its parameters get no gradient from here.
        cfg: the full config.
        generator: source of the random projection pose. ``None`` (or zero jitter in
            ``cfg.loss``) projects along the canonical axes only; a training task passes a
            per-rank seeded ``torch.Generator`` to get the paper's multi-angle projections.

    Returns:
        ``{"recon", "proj", "adv", "total"}``: the unweighted terms and the weighted sum.
    """
    n = cfg.model.volume_size
    check_volume(G_out, n, "G_out")
    check_volume(target, n, "target")
    w = cfg.loss
    losses = {"recon": F.mse_loss(G_out, target)}
    if w.proj_views:
        fake, real = G_out, target
        if generator is not None and (w.jitter_deg > 0 or w.jitter_shift > 0):
            pose = random_pose(G_out.shape[0], w.jitter_deg, w.jitter_shift, generator)
            fill = cfg.model.value_range[0]  # air outside the field of view
            fake, real = apply_pose(G_out, pose, fill), apply_pose(target, pose, fill)
        losses["proj"] = projection_l1(fake, real, w.proj_views)
    else:
        losses["proj"] = G_out.new_zeros(())
    return with_adversarial_total(losses, G_out, xrays, D, cfg.model, w)
