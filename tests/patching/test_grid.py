"""Invariants of the tile grid (coverage, bounds, flush edge, stride) and agreement with MONAI."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from patching.errors import InputError
from patching.tiling.grid import pad_widths, tile_grid, tile_starts, tile_stride

sizes = st.integers(1, 300)
tiles = st.integers(1, 64)
overlaps = st.floats(0.0, 0.95, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(size=sizes, tile=tiles, overlap=overlaps)
def test_tile_starts_invariants(size, tile, overlap):
    starts = tile_starts(size, tile, overlap)
    stride = tile_stride(tile, overlap)
    assert stride == max(1, int(tile * (1 - overlap)))
    assert starts[0] == 0
    assert all(b > a for a, b in zip(starts, starts[1:], strict=False))  # strictly increasing: no duplicates
    if size <= tile:
        assert starts == [0]  # one (possibly overhanging) tile; the caller pads
        return
    assert starts[-1] == size - tile  # flush with the far edge
    assert all(0 <= s and s + tile <= size for s in starts)  # in bounds
    assert starts[:-1] == [i * stride for i in range(len(starts) - 1)]  # stride respected
    assert all(b - a <= stride for a, b in zip(starts, starts[1:], strict=False))
    assert len(starts) == 1 + math.ceil((size - tile) / stride)  # fewest tiles with gaps <= stride
    covered = np.zeros(size, bool)
    for s in starts:
        covered[s : s + tile] = True
    assert covered.all()


@settings(max_examples=100, deadline=None)
@given(
    shape=st.lists(st.integers(1, 16), min_size=1, max_size=4),
    data=st.data(),
)
def test_tile_grid_nd_covers_in_c_order(shape, data):
    lo = 1 if len(shape) < 3 else len(shape)  # keep the tile count small in 3-D and 4-D
    tile = data.draw(st.lists(st.integers(lo, 12), min_size=len(shape), max_size=len(shape)))
    overlap = data.draw(overlaps)
    grid = tile_grid(shape, tile, overlap)
    per_axis = [tile_starts(n, t, overlap) for n, t in zip(shape, tile, strict=True)]
    assert len(grid) == math.prod(len(s) for s in per_axis)
    corners = [tuple(sl.start for sl in g) for g in grid]
    assert corners == sorted(set(corners))  # C order, no duplicates
    covered = np.zeros(shape, bool)
    for g in grid:
        assert all(sl.stop - sl.start == t for sl, t in zip(g, tile, strict=True))  # always full tiles
        assert all(sl.stop <= max(n, t) for sl, n, t in zip(g, shape, tile, strict=True))
        covered[g] = True
    assert covered.all()


@settings(max_examples=100, deadline=None)
@given(shape=st.lists(st.integers(1, 40), min_size=3, max_size=3), data=st.data())
def test_grid_matches_monai_dense_patch_slices(shape, data):
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    tile = data.draw(st.lists(st.integers(1, 16), min_size=3, max_size=3))
    overlap = data.draw(overlaps)
    padded = [max(n, t) for n, t in zip(shape, tile, strict=True)]  # MONAI pads first, then lays its grid
    interval = _get_scan_interval(padded, tile, 3, (overlap,) * 3)
    expected = dense_patch_slices(padded, tile, interval)
    assert tile_grid(padded, tile, overlap) == [tuple(s) for s in expected]


@given(shape=st.lists(st.integers(1, 40), min_size=1, max_size=4), data=st.data())
def test_pad_widths_centre_short_axes(shape, data):
    tile = data.draw(st.lists(st.integers(1, 40), min_size=len(shape), max_size=len(shape)))
    for n, t, (lo, hi) in zip(shape, tile, pad_widths(shape, tile), strict=True):
        assert n + lo + hi == max(n, t)
        assert lo == (max(t - n, 0)) // 2 and 0 <= hi - lo <= 1


def test_small_example():
    assert tile_starts(20, 8, 0.25) == [0, 6, 12]
    assert tile_starts(512, 256, 0.25) == [0, 192, 256]
    assert tile_starts(604, 128, 0.25) == [0, 96, 192, 288, 384, 476]
    assert tile_starts(5, 8) == [0]
    assert tile_grid((2, 3), (2, 2), 0.5) == [(slice(0, 2), slice(0, 2)), (slice(0, 2), slice(1, 3))]
    assert tile_starts(10, np.int64(4), 0.0) == [0, 4, 6]


@pytest.mark.parametrize("overlap", [1.0, -0.1, float("nan"), 1.5])
def test_bad_overlap(overlap):
    with pytest.raises(InputError, match="overlap"):
        tile_starts(10, 4, overlap)
    with pytest.raises(InputError, match="overlap"):
        tile_grid((10, 10), 4, overlap)


@pytest.mark.parametrize("tile", [0, -3, 2.5, (4, 4, 4)])
def test_bad_tile(tile):
    with pytest.raises(InputError, match="tile"):
        tile_grid((10, 10), tile)


def test_bad_size_and_per_axis_overlap():
    with pytest.raises(InputError, match="shape"):
        tile_starts(0, 4)
    with pytest.raises(InputError, match="overlap"):
        tile_grid((10, 10), 4, (0.5, 0.5, 0.5))
    assert tile_grid((10, 6), 4, (0.5, 0.0)) == tile_grid((10, 6), (4, 4), [0.5, 0.0])
