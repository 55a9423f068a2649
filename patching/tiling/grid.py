"""Where the tiles of a sliding window go: pure functions, N-D, no I/O.

Grid policy (per axis, the N-D grid is the C-order product of the axes):

- ``stride = max(1, int(tile * (1 - overlap)))`` — the floor, written exactly as MONAI's
  ``_get_scan_interval`` so that our grid and ``monai.inferers.sliding_window_inference``'s
  coincide tile for tile.
- Starts are ``0, stride, 2·stride, …`` while a tile starting there still ends before the far
  edge; the last tile is flush with the edge (``start = size - tile``). So every voxel is
  covered, no tile sticks out, starts strictly increase, no two tiles coincide, and the count
  ``1 + ceil((size - tile) / stride)`` is the fewest tiles that keep every gap ≤ ``stride``.
- An axis no longer than the tile gets one tile at 0. When it is *shorter*, that tile
  overhangs the volume: tiles always have full size (models see the shape they were trained
  on); :func:`pad_widths` says how to pad the volume up to the tile (centred, ``diff // 2``
  before, the rest after — MONAI's convention) and a sliding window crops its output back.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Sequence

from patching.errors import InputError


def as_tile(tile: int | Sequence[int], ndim: int, source: str = "tile") -> tuple[int, ...]:
    """``tile`` as ``ndim`` positive ints (an int means a cube)."""
    if isinstance(tile, numbers.Integral) and not isinstance(tile, bool):
        tile = (tile,) * ndim
    try:
        tile = tuple(tile)
        out = tuple(int(t) for t in tile)
    except (TypeError, ValueError):
        raise InputError(source, f"needs {ndim} positive integer sizes, got {tile!r}") from None
    if len(out) != ndim or any(t < 1 or t != s for t, s in zip(out, tile, strict=True)):
        raise InputError(source, f"needs {ndim} positive integer sizes, got {tuple(tile)}")
    return out


def as_overlap(overlap: float | Sequence[float], ndim: int) -> tuple[float, ...]:
    """``overlap`` as ``ndim`` floats in ``[0, 1)`` (a float applies to every axis)."""
    if isinstance(overlap, numbers.Real):
        overlap = (float(overlap),) * ndim
    out = tuple(float(o) for o in overlap)
    if len(out) != ndim:
        raise InputError("overlap", f"needs 1 or {ndim} values, got {len(out)}")
    for o in out:
        if not (0.0 <= o < 1.0):  # also rejects NaN
            raise InputError("overlap", f"must be in [0, 1), got {o}")
    return out


def tile_stride(tile: int, overlap: float) -> int:
    """Distance between consecutive tile starts: ``max(1, floor(tile * (1 - overlap)))``."""
    return max(1, int(tile * (1.0 - overlap)))


def tile_starts(size: int, tile: int, overlap: float = 0.25) -> list[int]:
    """Start of every tile along one axis of length ``size`` (see the module docstring)."""
    if int(size) != size or size < 1:
        raise InputError("shape", f"axis size must be a positive integer, got {size}")
    (tile,) = as_tile((tile,), 1)
    (overlap,) = as_overlap(overlap, 1)
    size = int(size)
    if size <= tile:
        return [0]
    stride = tile_stride(tile, overlap)
    num = 1 + math.ceil((size - tile) / stride)
    return [i * stride for i in range(num - 1)] + [size - tile]


def tile_grid(
    shape: Sequence[int], tile: int | Sequence[int], overlap: float | Sequence[float] = 0.25
) -> list[tuple[slice, ...]]:
    """Every tile of an N-D ``shape`` as a tuple of slices, in C order (last axis fastest).

    Each slice is ``start:start + tile``; on an axis shorter than the tile it overhangs
    (see :func:`pad_widths`).
    """
    shape = tuple(shape)
    tile = as_tile(tile, len(shape))
    overlap = as_overlap(overlap, len(shape))
    starts = [tile_starts(n, t, o) for n, t, o in zip(shape, tile, overlap, strict=True)]
    return [
        tuple(slice(s, s + t) for s, t in zip(corner, tile, strict=True)) for corner in itertools.product(*starts)
    ]


def pad_widths(shape: Sequence[int], tile: int | Sequence[int]) -> list[tuple[int, int]]:
    """``(before, after)`` padding per axis that makes ``shape`` at least ``tile`` (centred)."""
    tile = as_tile(tile, len(shape))
    widths = []
    for n, t in zip(shape, tile, strict=True):
        diff = max(t - int(n), 0)
        widths.append((diff // 2, diff - diff // 2))
    return widths
