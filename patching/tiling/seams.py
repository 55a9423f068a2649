"""Seam-band error ratio: does a tiled (stitched) volume show its tile borders?

    planes = tile_border_planes(64, tile=32, overlap=0.25, factor=4)   # image planes of a latent grid
    r = seam_ratio(recon, truth, [planes] * 3, width=2)               # ≈ 1: no seams; > 1: seams

Ratio = mean ``|pred − target|`` over voxels within ``width`` voxels of an interior tile-border
plane (on any axis), over the mean elsewhere; the volume's one-voxel outer shell is in neither
set. Several (pred, target) pairs can be pooled (sums over all pairs, then the ratio), which is
how stage 1 cancels the anatomy's own variation (windows of one phantom at shifted positions,
``tests/stage1_vqgan/test_codec.py``). For a generated sample the error is mostly generative and
unrelated to tiles; compare the ratio of the tiled decode with that of the same latent decoded
in one tile (no borders by construction) — equal ratios mean the tiling adds nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from patching.errors import InputError
from patching.tiling.grid import tile_starts


def tile_border_planes(size: int, tile: int, overlap: float, factor: int = 1) -> list[int]:
    """Interior border planes (index ``b``: between voxels ``b − 1`` and ``b``) of the sliding-window
    grid of ``patching.tiling.grid`` over one axis. ``factor``: the grid is laid on a lattice ``factor``
    times coarser (a latent grid; ``size`` and ``tile`` in image voxels, multiples of it)."""
    factor = int(factor)
    if factor < 1 or size % factor or tile % factor:
        raise InputError("factor", f"size {size} and tile {tile} must be multiples of factor {factor}")
    starts = [s * factor for s in tile_starts(size // factor, tile // factor, overlap)]
    return sorted({b for s in starts for b in (s, s + tile) if 0 < b < size})


def band_masks(shape: Sequence[int], planes: Sequence[Iterable[int]], width: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """``(band, rest)`` boolean masks of ``shape``: voxels within ``width`` of a border plane of
    any axis (``planes[k]`` for axis ``k``), and the others; the outer one-voxel shell is in neither."""
    if len(shape) != 3 or len(planes) != 3:
        raise InputError("planes", f"needs a 3-D shape and one plane list per axis, got {tuple(shape)}, {len(planes)}")
    if width < 1:
        raise InputError("width", f"must be >= 1, got {width}")
    axes_band, axes_shell = [], []
    for n, ps in zip(shape, planes):
        band = np.zeros(n, bool)
        for b in ps:
            band[max(0, b - width): b + width] = True
        shell = np.zeros(n, bool)
        shell[[0, n - 1]] = True
        axes_band.append(band)
        axes_shell.append(shell)
    ix = np.ix_(*[np.arange(n) for n in shape])
    band = axes_band[0][ix[0]] | axes_band[1][ix[1]] | axes_band[2][ix[2]]
    shell = axes_shell[0][ix[0]] | axes_shell[1][ix[1]] | axes_shell[2][ix[2]]
    return band & ~shell, ~band & ~shell


def seam_ratio(pairs: Iterable[tuple[np.ndarray, np.ndarray]], planes: Sequence[Iterable[int]],
               width: int = 2) -> float:
    """Pooled seam-band ratio over ``(pred, target)`` pairs of one shape (see the module docstring)."""
    band = rest = None
    sums = np.zeros(2)
    shape = None
    for pred, target in pairs:
        pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
        if pred.shape != target.shape or pred.ndim != 3:
            raise InputError("pred", f"shape {pred.shape} does not match target {target.shape} (3-D)")
        if shape is None:
            shape = pred.shape
            band, rest = band_masks(shape, planes, width)
            if not band.any() or not rest.any():
                raise InputError("planes", f"give no band/rest split of {shape} (borders {list(map(list, planes))})")
        elif pred.shape != shape:
            raise InputError("pred", f"pairs must share one shape: {pred.shape} vs {shape}")
        err = np.abs(pred - target)
        if not np.isfinite(err).all():
            raise InputError("pred", "holds NaN or infinite values")
        sums += (err[band].sum(), err[rest].sum())
    if shape is None:
        raise InputError("pairs", "needs at least one (pred, target) pair")
    den = sums[1] / rest.sum()
    return float("nan") if den == 0 else float(sums[0] / band.sum() / den)
