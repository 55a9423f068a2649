"""The geometry of one :func:`patching.tiling.stitch.sliding_window` run: shapes, grid, slab axis and the
input→output index map. Its own module so that :mod:`patching.tiling.stitch` (the loop and the
accumulator) and :mod:`patching.tiling.stitch_input` (tile reading) both import it without importing
each other."""

from __future__ import annotations

import itertools
import math
import numbers
from fractions import Fraction

from patching.errors import InputError
from patching.tiling.grid import as_overlap, as_tile, pad_widths, tile_starts


class _Geometry:
    """Shapes, grid and the input→output index map of one sliding-window run."""

    def __init__(self, volume, tile, overlap, scale, out_of_core: bool = False):
        shape = getattr(volume, "shape", None)
        if shape is None or not hasattr(volume, "__getitem__"):
            raise InputError("volume", f"needs an array with .shape and slicing, got {type(volume).__name__}")
        shape = tuple(int(s) for s in shape)
        num_spatial = 3 if isinstance(tile, numbers.Integral) else len(tuple(tile))
        if len(shape) not in (num_spatial, num_spatial + 1):
            raise InputError(
                "volume",
                f"needs {num_spatial} spatial axes with an optional leading channel axis, got shape {shape}",
            )
        tile = as_tile(tile, num_spatial)
        overlap = as_overlap(overlap, num_spatial)
        up, down = _parse_scale(scale)
        self.has_channels = len(shape) == num_spatial + 1
        self.channels = shape[0] if self.has_channels else 1
        self.shape = shape[-num_spatial:]
        self.tile = tile
        for name, sizes in (("tile", tile), ("volume", self.shape)):
            if any(s % down for s in sizes):
                raise InputError(name, f"sizes {sizes} must be multiples of 1/scale = {down}")
        # The grid lives on the coarse lattice (step `down`) so that every output index is whole.
        coarse = [s // down for s in self.shape]
        coarse_tile = [t // down for t in tile]
        self.pads = [(a * down, b * down) for a, b in pad_widths(coarse, coarse_tile)]
        self.starts = [
            [s * down for s in tile_starts(n + sum(p) // down, t, o)]
            for n, t, o, p in zip(coarse, coarse_tile, overlap, self.pads, strict=True)
        ]
        self.out_shape = tuple(s * up // down for s in self.shape)
        self.out_tile = tuple(t * up // down for t in tile)
        # Per axis and tile index: (out_start, out_stop, local_start, local_stop) of the part of
        # the output tile that lies inside the (unpadded) output.
        self.entries = []
        for starts, (lo, _), n_out, t_out in zip(self.starts, self.pads, self.out_shape, self.out_tile, strict=True):
            axis = []
            for s in starts:
                o0 = (s - lo) * up // down
                c0, c1 = max(o0, 0), min(o0 + t_out, n_out)
                axis.append((c0, c1, c0 - o0, c1 - o0))
            self.entries.append(axis)

        # Out of core, the slab axis is the one whose one-tile-deep slab of the output is the
        # smallest (for 512×512×604 with tiles 256×256×128: z, 128 planes of 512×512, instead of
        # 256 planes of 512×604). In memory the whole result is allocated anyway: the first axis,
        # whose planes are contiguous, makes finishing cheapest.
        def slab_size(d):
            return min(self.out_tile[d], self.out_shape[d]) * math.prod(self.out_shape) // self.out_shape[d]

        self.slab_axis = 0
        if out_of_core:
            self.slab_axis = min(range(num_spatial), key=lambda d: (slab_size(d), d))

    def tile_order(self) -> list[tuple[int, ...]]:
        """Tile indices (one per axis), the slab axis outermost, the others in C order."""
        ax, nd = self.slab_axis, len(self.starts)
        order = [ax] + [d for d in range(nd) if d != ax]
        tiles = []
        for combo in itertools.product(*(range(len(self.starts[d])) for d in order)):
            idx = [0] * nd
            for d, i in zip(order, combo, strict=True):
                idx[d] = i
            tiles.append(tuple(idx))
        return tiles

    def tile_slices(self, idx) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
        """Output slices and tile-local slices of tile ``idx`` (one index per axis)."""
        ent = [self.entries[d][i] for d, i in enumerate(idx)]
        return tuple(slice(e[0], e[1]) for e in ent), tuple(slice(e[2], e[3]) for e in ent)


def _parse_scale(scale) -> tuple[int, int]:
    """``scale`` as ``(up, down)``: an integer ``up`` or a reciprocal ``1/down``."""
    try:
        value = Fraction(scale).limit_denominator(1 << 20)
    except (TypeError, ValueError):
        raise InputError("scale", f"must be a positive integer or 1/integer, got {scale!r}") from None
    if value <= 0 or (value.numerator != 1 and value.denominator != 1) or abs(float(value) - float(scale)) > 1e-9:
        raise InputError("scale", f"must be a positive integer or 1/integer, got {scale!r}")
    return value.numerator, value.denominator
