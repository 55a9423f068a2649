"""Blending weights and sliding-window stitching: references (MONAI, whole-volume f), out of core."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from patching.blend import blend_weights, tile_weights
from patching.errors import InputError
from patching.stitch import sliding_window

SHAPE = (20, 23, 17)
TILE = (8, 8, 8)
MODES = ["gaussian", "constant"]


def _vol(shape=SHAPE, channels=1, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((channels, *shape)).astype(np.float32)


def _zarr(tmp_path, shape, chunks=None, name="out.zarr"):
    return zarr.create_array(
        store=str(tmp_path / name), shape=shape, chunks=chunks or (1, 10, 5, 9), dtype="float32", fill_value=0
    )


def _conv(in_ch=1, out_ch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_ch, in_ch, 3, 3, 3, generator=g) / 9
    return lambda x: F.conv3d(x, weight, padding=1)


# ----------------------------------------------------------------------------- weights


@pytest.mark.parametrize("tile", [(8, 8, 8), (7, 9, 16), (64, 32, 5), (1, 2, 3)])
@pytest.mark.parametrize("sigma_scale", [0.125, 0.3, (0.1, 0.2, 0.5)])
@pytest.mark.parametrize("mode", MODES)
def test_tile_weights_match_monai(tile, sigma_scale, mode):
    from monai.data.utils import compute_importance_map

    ours = tile_weights(tile, mode, sigma_scale)
    ref = compute_importance_map(tile, mode=mode, sigma_scale=sigma_scale, device="cpu")
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


def test_weights_separability_flag():
    assert blend_weights((8, 8, 8), "constant").separable
    clamped = blend_weights((8, 8, 8), "gaussian")
    assert not clamped.separable and clamped.floor == pytest.approx(1e-3)  # MONAI's clamp bites
    pure = blend_weights((8, 6, 4), "gaussian", min_weight=0.0)
    assert pure.separable
    outer = torch.einsum("i,j,k->ijk", *pure.factors).float()
    torch.testing.assert_close(pure.dense(), outer)
    with pytest.raises(InputError, match="mode"):
        blend_weights((8, 8, 8), "triangle")
    with pytest.raises(InputError, match="sigma_scale"):
        blend_weights((8, 8, 8), "gaussian", sigma_scale=0)


# ----------------------------------------------------------------------------- stitching


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("where", ["memory", "zarr"])
def test_identity_reproduces_volume(mode, where, tmp_path):
    vol = _vol(channels=2)
    if where == "memory":
        res = sliding_window(vol, lambda x: x, TILE, mode=mode)
    else:
        out = _zarr(tmp_path, vol.shape)
        assert sliding_window(vol, lambda x: x, TILE, mode=mode, out=out) is None
        res = out[...]
    assert isinstance(res, np.ndarray) and res.dtype == np.float32
    np.testing.assert_allclose(res, vol, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_plus_one_over_arange_is_exact(mode):
    # MONAI's classic check: a constant offset must come through blending unchanged.
    vol = torch.arange(np.prod(SHAPE), dtype=torch.float32).reshape(1, *SHAPE)
    res = sliding_window(vol, lambda x: x + 1, TILE, overlap=0.5, mode=mode)
    assert isinstance(res, torch.Tensor)
    torch.testing.assert_close(res, vol + 1, rtol=1e-6, atol=0)


@pytest.mark.parametrize("mode", MODES)
def test_pointwise_fn_equals_whole_volume(mode):
    vol = torch.from_numpy(_vol(channels=2))
    fn = lambda x: torch.sin(x) * 2  # noqa: E731
    res = sliding_window(vol, fn, (8, 5, 6), overlap=0.4, mode=mode, batch_size=3)
    torch.testing.assert_close(res, fn(vol), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("where", ["memory", "zarr"])
def test_scale_up_and_down_equal_whole_volume(where, tmp_path):
    vol = torch.from_numpy(_vol((20, 24, 16)))
    cases = [
        (2, lambda x: F.interpolate(x, scale_factor=2, mode="nearest"), (8, 8, 8)),
        (0.5, lambda x: F.avg_pool3d(x, 2), (8, 8, 8)),
        (0.25, lambda x: F.avg_pool3d(x, 4), (12, 8, 8)),
    ]
    for scale, fn, tile in cases:
        ref = fn(vol[None])[0]
        if where == "memory":
            res = sliding_window(vol, fn, tile, scale=scale)
        else:
            out = _zarr(tmp_path, tuple(ref.shape), name=f"s{scale}.zarr")
            sliding_window(vol, fn, tile, scale=scale, out=out)
            res = torch.from_numpy(out[...])
        assert res.shape == ref.shape, scale
        torch.testing.assert_close(res, ref, rtol=1e-5, atol=1e-6)


def test_channel_change_and_rank():
    vol3d = _vol()[0]  # (X, Y, Z): one channel, no channel axis
    three = sliding_window(vol3d, lambda x: torch.cat([x, 2 * x, x * x], dim=1), TILE)
    assert three.shape == (3, *SHAPE)
    np.testing.assert_allclose(three, np.stack([vol3d, 2 * vol3d, vol3d**2]), rtol=1e-5, atol=1e-5)
    one = sliding_window(vol3d, lambda x: x * 3, TILE)
    assert one.shape == SHAPE  # same rank as the input
    np.testing.assert_allclose(one, vol3d * 3, rtol=1e-5, atol=1e-5)
    two_to_one = sliding_window(_vol(channels=2), lambda x: x.sum(1, keepdim=True), TILE, out_channels=1)
    assert two_to_one.shape == (1, *SHAPE)


@pytest.mark.parametrize("mode", MODES)
def test_out_of_core_equals_in_memory(mode, tmp_path):
    vol = _vol(channels=2)
    fn = _conv(2, 3)
    mem = sliding_window(vol, fn, TILE, overlap=0.3, mode=mode, batch_size=2)
    src = zarr.create_array(store=str(tmp_path / "in.zarr"), data=vol, chunks=(1, 7, 12, 9))
    out = _zarr(tmp_path, (3, *SHAPE))
    sliding_window(src, fn, TILE, overlap=0.3, mode=mode, batch_size=5, out=out)
    np.testing.assert_allclose(out[...], mem, rtol=1e-5, atol=1e-6)
    # also into a plain numpy array without a channel axis
    plain = np.zeros(SHAPE, np.float32)
    sliding_window(vol[0], _conv(), TILE, overlap=0.3, mode=mode, out=plain)
    np.testing.assert_allclose(plain, sliding_window(vol[0], _conv(), TILE, overlap=0.3, mode=mode), rtol=1e-5, atol=1e-6)


def test_tiles_of_float32_tensors_are_views_and_the_volume_is_untouched():
    vol = torch.from_numpy(_vol(channels=2))
    before = vol.clone()
    storages = []

    def fn(x):
        storages.append(x.untyped_storage().data_ptr())
        return x * 2

    res = sliding_window(vol, fn, TILE, batch_size=1)
    assert set(storages) == {vol.untyped_storage().data_ptr()}  # no copy per tile, as MONAI
    torch.testing.assert_close(vol, before)
    torch.testing.assert_close(res, sliding_window(vol, fn, TILE, batch_size=2))  # copied batches


@pytest.mark.parametrize("batch_size", [1, 4])
def test_in_place_into_the_input(batch_size, tmp_path):
    # Planes are written only after every tile that reads them has been read, so out=volume works.
    vol = _vol((30, 11, 9), channels=2)
    fn = _conv(2, 2)
    ref = sliding_window(vol, fn, (8, 6, 8), overlap=0.3, batch_size=batch_size)
    tensor = torch.from_numpy(vol.copy())
    assert sliding_window(tensor, fn, (8, 6, 8), overlap=0.3, out=tensor, batch_size=batch_size) is None
    np.testing.assert_allclose(tensor.numpy(), ref, rtol=1e-5, atol=1e-6)
    src = zarr.create_array(store=str(tmp_path / "io.zarr"), data=vol, chunks=(2, 8, 6, 9))
    sliding_window(src, fn, (8, 6, 8), overlap=0.3, out=src, batch_size=batch_size)
    np.testing.assert_allclose(src[...], ref, rtol=1e-5, atol=1e-6)


class _RecordingOut:
    """An ``out`` that logs writes, to check the slab order and that flushing is incremental."""

    def __init__(self, shape, log):
        self.shape, self.data, self.log = shape, np.zeros(shape, np.float32), log

    def __setitem__(self, key, value):
        self.log.append(("write", key))
        self.data[key] = value


def test_out_of_core_flushes_each_plane_once_as_soon_as_final():
    log = []
    vol = _vol((30, 10, 10))

    def fn(x):
        log.append(("fn",))
        return x

    out = _RecordingOut((1, 30, 10, 10), log)
    sliding_window(vol, fn, (8, 8, 8), overlap=0.25, out=out)  # first-axis starts 0, 6, 12, 18, 22
    writes = [(e[1][1].start, e[1][1].stop) for e in log if e[0] == "write"]  # slab axis: x
    assert writes[0][0] == 0 and writes[-1][1] == 30
    assert all(p[1] == q[0] for p, q in zip(writes, writes[1:], strict=False))  # contiguous, each plane once
    first_write = next(n for n, e in enumerate(log) if e[0] == "write")
    last_fn = max(n for n, e in enumerate(log) if e[0] == "fn")
    assert writes[0] == (0, 6) and first_write < last_fn  # flushed before the last tile ran
    np.testing.assert_allclose(out.data, vol, rtol=1e-5, atol=1e-6)


def test_out_of_core_slab_runs_along_the_axis_with_the_smallest_slab(tmp_path):
    # 24×24×40 with tiles 12×12×8: a slab along z is 8×24×24 voxels, along x 12×24×40.
    vol = _vol((24, 24, 40))
    log = []
    out = _RecordingOut((1, 24, 24, 40), log)
    sliding_window(vol, _conv(), (12, 12, 8), out=out)
    keys = [key for _, key in log]
    assert all(k[:3] == (slice(None),) * 3 and k[3].stop - k[3].start <= 8 for k in keys)
    assert keys[0][3] == slice(0, 6) and keys[-1][3].stop == 40  # z-starts 0, 6, …, 32
    np.testing.assert_allclose(out.data, sliding_window(vol, _conv(), (12, 12, 8)), rtol=1e-5, atol=1e-6)


def test_volume_smaller_than_tile():
    vol = _vol((5, 20, 3), channels=2)
    seen = []

    def fn(x):
        seen.append(tuple(x.shape[2:]))
        return torch.cos(x)

    res = sliding_window(torch.from_numpy(vol), fn, TILE, overlap=0.25)
    assert set(seen) == {TILE}  # fn always sees full tiles
    torch.testing.assert_close(res, torch.cos(torch.from_numpy(vol)), rtol=1e-5, atol=1e-6)
    up = sliding_window(vol, lambda x: F.interpolate(x, scale_factor=2), TILE, scale=2)
    assert up.shape == (2, 10, 40, 6)


def test_padding_value_matches_monai_constant_padding():
    from monai.inferers import sliding_window_inference

    vol = torch.from_numpy(_vol((6, 20, 5)))
    fn = _conv()
    ref = sliding_window_inference(vol[None], TILE, 1, fn, overlap=0.25, mode="gaussian", cval=0.0)[0]
    res = sliding_window(vol, fn, TILE, pad_value=0.0)
    torch.testing.assert_close(res, ref, rtol=0, atol=1e-5)
    edge = sliding_window(vol, fn, TILE)  # default: edge replication, differs near the pads
    assert not torch.allclose(edge, ref, atol=1e-3)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("overlap", [0.25, 0.6])
def test_matches_monai_sliding_window_inference(mode, overlap):
    from monai.inferers import sliding_window_inference

    vol = torch.from_numpy(_vol((20, 23, 17), channels=2, seed=3))
    fn = _conv(2, 2, seed=1)
    ref = sliding_window_inference(vol[None], TILE, 4, fn, overlap=overlap, mode=mode, sigma_scale=0.125)[0]
    res = sliding_window(vol, fn, TILE, overlap=overlap, mode=mode, sigma_scale=0.125, batch_size=4)
    torch.testing.assert_close(res, ref, rtol=0, atol=1e-5)


def test_two_dimensional_and_progress():
    img = _vol((13, 21))[0]
    res = sliding_window(img, lambda x: x * 2, (6, 6), progress=True)
    np.testing.assert_allclose(res, img * 2, rtol=1e-5, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    shape=st.lists(st.integers(1, 8), min_size=3, max_size=3),
    tile=st.lists(st.integers(1, 5), min_size=3, max_size=3),
    overlap=st.floats(0, 0.9),
    mode=st.sampled_from(MODES),
    scale=st.sampled_from([1, 2, 0.5]),
)
def test_pointwise_property(shape, tile, overlap, mode, scale):
    """Any geometry (short axes, overhang, scales): tiled pointwise f equals f, both accumulators."""
    k = 2 if scale == 0.5 else 1  # downscaling needs sizes and tiles on the coarse lattice
    shape, tile = [2 * n for n in shape], [t * k for t in tile]
    vol = torch.from_numpy(_vol(tuple(shape), seed=len(shape)))
    if scale == 1:
        fn = lambda x: x * x - 1  # noqa: E731
    elif scale == 2:
        fn = lambda x: F.interpolate(x * x - 1, scale_factor=2)  # noqa: E731
    else:
        fn = lambda x: F.avg_pool3d(x, 2) ** 2  # noqa: E731 - aligned blocks, so tiled == whole
    ref = fn(vol[None])[0]
    res = sliding_window(vol, fn, tile, overlap=overlap, mode=mode, scale=scale, batch_size=2)
    torch.testing.assert_close(res, ref, rtol=1e-5, atol=1e-5)
    out = np.zeros(tuple(ref.shape), np.float32)
    sliding_window(vol.numpy(), fn, tile, overlap=overlap, mode=mode, scale=scale, out=out)
    np.testing.assert_allclose(out, ref.numpy(), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- bad input


def test_invalid_arguments(tmp_path):
    vol = _vol()
    ident = lambda x: x  # noqa: E731
    bad = [
        (dict(overlap=1.0), "overlap"),
        (dict(overlap=-0.5), "overlap"),
        (dict(tile=(8, 8)), "volume"),  # 2 spatial axes but a 4-D volume with 3
        (dict(tile=(8, 0, 8)), "tile"),
        (dict(tile=(7, 8, 8), scale=0.5), "tile"),  # tile not a multiple of 1/scale
        (dict(tile=(8, 8, 8), scale=0.25), "volume"),  # 20×23×17 not multiples of 4
        (dict(scale=1.5), "scale"),
        (dict(scale=0), "scale"),
        (dict(mode="median"), "mode"),
        (dict(batch_size=0), "batch_size"),
        (dict(out=_zarr(tmp_path, (1, 20, 23, 16))), "out"),
        (dict(out=_zarr(tmp_path, (2, 20, 23, 17), name="c.zarr"), out_channels=1), "out"),
        (dict(out=_zarr(tmp_path, (1, 40, 46, 34), name="s.zarr")), "out"),  # scale 1, not 2
    ]
    for kwargs, source in bad:
        args = {"tile": TILE, **kwargs}
        with pytest.raises(InputError) as err:
            sliding_window(vol, ident, **args)
        assert err.value.source == source, (kwargs, str(err.value))
    for volume in (vol[0, 0], vol[None], "not an array"):
        with pytest.raises(InputError, match="volume"):
            sliding_window(volume, ident, TILE)
    with pytest.raises(InputError, match="fn"):
        sliding_window(vol, lambda x: x[:, :, :4], TILE)  # wrong output tile
    with pytest.raises(InputError, match="fn"):
        sliding_window(vol, lambda x: x, TILE, scale=2)
    with pytest.raises(InputError, match="fn"):  # channels disagree with `out`
        sliding_window(vol, lambda x: x.repeat(1, 2, 1, 1, 1), TILE, out=np.zeros((1, *SHAPE), np.float32))


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fn_on_cuda_accumulates_on_cpu():
    vol = _vol(channels=2)
    fn = _conv(2, 2)
    weight_fn = lambda x: fn(x.cpu()).to(x.device) if x.is_cuda else fn(x)  # noqa: E731
    seen = []

    def on_device(x):
        seen.append(x.device.type)
        return weight_fn(x)

    res = sliding_window(vol, on_device, TILE, device="cuda", batch_size=3)
    assert set(seen) == {"cuda"}
    np.testing.assert_allclose(res, sliding_window(vol, fn, TILE), rtol=1e-5, atol=1e-6)
