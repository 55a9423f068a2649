"""Blending weights for overlapping tiles, compatible with MONAI's ``compute_importance_map``.

MONAI 1.6 (``monai/data/utils.py``) builds the Gaussian map as the outer product of 1-D
factors ``exp(-x² / (2σ²))`` with ``x = -(n-1)/2 … (n-1)/2`` (centred between the two middle
voxels for even ``n``) and ``σ = sigma_scale · n``; it does **not** rescale the map to a maximum
of 1 (for even sizes the peak is slightly below 1). It then clamps the whole map from below
at ``max(map.min(), 1e-3)``. With the usual ``sigma_scale = 0.125`` the tile edges fall to
``exp(-8) ≈ 3e-4`` per axis, so the clamp is active and the dense map is *not* separable
even though its factors are. :class:`BlendWeights` keeps both views: the 1-D factors and the
floor, and says when the floor is a no-op (constant mode, or ``min_weight`` below the
smallest product) so that a stitcher may use the separable shortcut.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from patching.errors import InputError

MONAI_MIN_WEIGHT = 1e-3  # MONAI's floor for "non-positive" weights
MODES = ("gaussian", "constant")


@dataclass(frozen=True)
class BlendWeights:
    """Weights of one tile: ``max(factors[0] ⊗ factors[1] ⊗ …, floor)``.

    ``factors`` are 1-D float64 tensors, one per axis, of the tile's length on that axis.
    """

    factors: tuple[torch.Tensor, ...]
    floor: float

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(f) for f in self.factors)

    @property
    def separable(self) -> bool:
        """True when the floor never bites, i.e. the dense map is the plain outer product."""
        return self.floor <= math.prod(float(f.min()) for f in self.factors)

    def dense(self, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        """The full weight map, shape ``self.shape``.

        All but the last axis are multiplied in float64; the last (largest) product is made
        in ``dtype`` so that no full-size float64 temporary exists.
        """
        w = self.factors[0]
        for f in self.factors[1:-1]:
            w = w.unsqueeze(-1) * f  # (..., n_i) x (n_{i+1},) -> (..., n_i, n_{i+1})
        if len(self.factors) > 1:
            last = self.factors[-1].to(dtype=dtype, device=device)
            w = w.to(dtype=dtype, device=device).unsqueeze(-1) * last
        return w.clamp_(min=self.floor).to(dtype=dtype, device=device)


def _sigma_scales(sigma_scale: float | Sequence[float], ndim: int) -> tuple[float, ...]:
    if isinstance(sigma_scale, numbers.Real):
        sigma_scale = (float(sigma_scale),) * ndim
    out = tuple(float(s) for s in sigma_scale)
    if len(out) != ndim or not all(math.isfinite(s) and s > 0 for s in out):
        raise InputError("sigma_scale", f"needs 1 or {ndim} positive values, got {sigma_scale}")
    return out


def gaussian_factors(
    tile: Sequence[int], sigma_scale: float | Sequence[float] = 0.125
) -> tuple[torch.Tensor, ...]:
    """Unnormalised, centred 1-D Gaussians ``exp(-x²/(2σ²))``, ``σ = sigma_scale · n``, float64."""
    factors = []
    for n, s in zip(tile, _sigma_scales(sigma_scale, len(tile)), strict=True):
        x = torch.arange(n, dtype=torch.float64) - (n - 1) / 2.0
        factors.append(torch.exp(-(x**2) / (2.0 * (s * n) ** 2)))
    return tuple(factors)


def blend_weights(
    tile: Sequence[int],
    mode: str = "gaussian",
    sigma_scale: float | Sequence[float] = 0.125,
    min_weight: float = MONAI_MIN_WEIGHT,
) -> BlendWeights:
    """Weights for ``mode`` (``"gaussian"`` or ``"constant"``) as factors and a floor.

    The floor is ``max(smallest product, min_weight)``, as MONAI's clamp. Pass
    ``min_weight=0`` for a pure (separable) Gaussian.
    """
    tile = tuple(int(t) for t in tile)
    if not tile or any(t < 1 for t in tile):
        raise InputError("tile", f"needs positive sizes, got {tile}")
    if mode not in MODES:
        raise InputError("mode", f"must be one of {MODES}, got {mode!r}")
    if not (math.isfinite(min_weight) and min_weight >= 0):
        raise InputError("min_weight", f"must be a finite number >= 0, got {min_weight}")
    if mode == "constant":
        factors = tuple(torch.ones(n, dtype=torch.float64) for n in tile)
    else:
        factors = gaussian_factors(tile, sigma_scale)
    smallest = math.prod(float(f.min()) for f in factors)
    return BlendWeights(factors, max(smallest, float(min_weight)))


def tile_weights(
    tile: Sequence[int],
    mode: str = "gaussian",
    sigma_scale: float | Sequence[float] = 0.125,
    min_weight: float = MONAI_MIN_WEIGHT,
    *,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> torch.Tensor:
    """Dense weight map of shape ``tile``; equals ``monai.data.utils.compute_importance_map``
    (same ``mode`` and ``sigma_scale``) to float32 rounding with the default ``min_weight``."""
    return blend_weights(tile, mode, sigma_scale, min_weight).dense(dtype=dtype, device=device)
