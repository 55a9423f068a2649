"""Seam-band ratio: border planes of the tile grid, band masks, and the ratio's response to seams."""

from __future__ import annotations

import numpy as np
import pytest

from patching.errors import InputError
from patching.tiling.seams import band_masks, seam_ratio, tile_border_planes


def test_border_planes_follow_the_tile_grid():
    # 16 latent voxels, tiles of 8, 25 % overlap: starts 0, 6, 8 → borders 6, 8, 14 (×4 in the image)
    assert tile_border_planes(16, 8, 0.25) == [6, 8, 14]
    assert tile_border_planes(64, 32, 0.25, factor=4) == [24, 32, 56]
    assert tile_border_planes(64, 64, 0.25) == []  # one tile: no interior border
    with pytest.raises(InputError, match="multiples of factor"):
        tile_border_planes(63, 32, 0.25, factor=4)


def test_band_masks_partition_the_interior():
    band, rest = band_masks((10, 12, 14), [[5], [], [7]], width=2)
    assert not (band & rest).any()
    assert band[4, 6, 1] and band[1, 6, 6] and not band[1, 1, 1] and rest[1, 1, 1]
    assert not band[0].any() and not rest[0].any()  # the shell is in neither
    assert band[3:7, 1:-1, 1:-1].all() and not band[1:3, 1:-1, 1:4].any()


def test_ratio_is_one_without_seams_and_grows_with_them():
    rng = np.random.default_rng(0)
    target = rng.normal(size=(32, 32, 32))
    planes = [[16]] * 3
    noisy = target + rng.normal(scale=0.1, size=target.shape)
    assert seam_ratio([(noisy, target)], planes) == pytest.approx(1.0, abs=0.03)
    seamed = noisy.copy()
    seamed[14:18] += 0.3  # a step at the border plane of axis 0
    assert seam_ratio([(seamed, target)], planes) > 1.5
    pooled = seam_ratio([(noisy, target), (seamed, target)], planes)
    assert 1.1 < pooled < seam_ratio([(seamed, target)], planes)


def test_bad_inputs():
    a = np.zeros((8, 8, 8))
    with pytest.raises(InputError, match="at least one"):
        seam_ratio([], [[4]] * 3)
    with pytest.raises(InputError, match="does not match"):
        seam_ratio([(a, np.zeros((8, 8, 9)))], [[4]] * 3)
    with pytest.raises(InputError, match="NaN"):
        seam_ratio([(a + np.nan, a)], [[4]] * 3)
    with pytest.raises(InputError, match="no band/rest"):
        seam_ratio([(a, a)], [[], [], []])
