"""Blending weights and sliding-window stitching: references (MONAI, whole-volume f), out of core."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from patching.errors import InputError
from patching.tiling.blend import blend_weights, tile_weights
from patching.tiling.stitch import sliding_window, window_to_unit

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


# ----------------------------------------------------------------------------- dtypes, input_map, helper thread


def _hu(shape=SHAPE, channels=1, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1500, 3000, size=(channels, *shape)).astype(np.int16)


class _LazyVolume:
    """A lazily read array (neither numpy nor torch) that logs every read."""

    def __init__(self, data: np.ndarray):
        self.data, self.shape, self.dtype, self.reads = data, data.shape, data.dtype, []

    def __getitem__(self, key):
        self.reads.append(key)
        return self.data[key]


@pytest.mark.parametrize("kind", ["numpy", "torch", "zarr", "lazy"])
@pytest.mark.parametrize("mode", MODES)
def test_int16_volume_equals_float_volume(kind, mode, tmp_path):
    hu = _hu(channels=2)
    conv = _conv(2, 2)
    seen = []

    def fn(x):
        seen.append(x.dtype)
        return conv(x)

    ref = sliding_window(hu.astype(np.float32), conv, TILE, overlap=0.3, mode=mode, batch_size=2)
    vol = {
        "numpy": lambda: hu,
        "torch": lambda: torch.from_numpy(hu),
        "zarr": lambda: zarr.create_array(store=str(tmp_path / "hu.zarr"), data=hu, chunks=(1, 7, 12, 9)),
        "lazy": lambda: _LazyVolume(hu),
    }[kind]()
    res = sliding_window(vol, fn, TILE, overlap=0.3, mode=mode, batch_size=2)
    assert set(seen) == {torch.float32}  # fn gets the tiles cast to float32
    assert res.dtype in (np.float32, torch.float32)
    np.testing.assert_array_equal(np.asarray(res), ref)  # the cast is exact: same tiles, same sums
    out = _zarr(tmp_path, hu.shape, name=f"{kind}-{mode}.zarr")
    sliding_window(vol, conv, TILE, overlap=0.3, mode=mode, batch_size=3, out=out)
    np.testing.assert_allclose(out[...], ref, rtol=1e-5, atol=1e-3)  # values up to ~3000


def test_hu_window_input_map_equals_converting_the_whole_volume():
    from patching.data.spec import hu_to_unit

    hu = _hu((20, 23, 17))[0]  # (X, Y, Z) int16, values beyond the window on both sides
    window = (-1024.0, 1600.0)
    unit = hu_to_unit(torch.from_numpy(hu), window)
    res = sliding_window(hu, lambda x: x * 2, TILE, input_map=window_to_unit(window))
    np.testing.assert_allclose(res, 2 * unit.numpy(), rtol=0, atol=2e-6)
    torch.testing.assert_close(window_to_unit(window)(torch.from_numpy(hu).float()), unit, rtol=0, atol=1e-6)
    for bad in [(5, 5), (1, float("nan")), "ab", 3]:
        with pytest.raises(InputError, match="window"):
            window_to_unit(bad)
    with pytest.raises(InputError, match="input_map"):
        window_to_unit(window)(torch.from_numpy(hu))  # not cast to float


@pytest.mark.parametrize("batch_size", [1, 3])
def test_input_map_gets_a_copy_it_may_change_in_place(batch_size):
    vol = torch.from_numpy(_vol(channels=2))  # float32: without input_map, batches of one are views
    before = vol.clone()
    shapes = []

    def double_in_place(batch):
        shapes.append(tuple(batch.shape))
        assert batch.dtype == torch.float32
        assert batch.untyped_storage().data_ptr() != vol.untyped_storage().data_ptr()
        return batch.mul_(2)

    res = sliding_window(vol, lambda x: x + 1, TILE, input_map=double_in_place, batch_size=batch_size)
    torch.testing.assert_close(vol, before)  # the volume is untouched
    torch.testing.assert_close(res, 2 * vol + 1, rtol=1e-5, atol=1e-5)
    assert all(s[0] <= batch_size and s[1:] == (2, *TILE) for s in shapes)
    # a map that returns a new tensor (here: fewer channels) works as well
    first = sliding_window(vol, lambda x: x * 3, TILE, input_map=lambda b: b[:, :1].clone())
    torch.testing.assert_close(first, 3 * vol[:1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_fn_may_return_its_input_buffer(batch_size, tmp_path):
    # The next batch is prepared into the same buffer on the helper thread: when fn returns (a
    # view of) its input, that must wait until the output has been added.
    hu = _hu(channels=2)
    ref = hu.astype(np.float32)
    for fn in (lambda x: x, lambda x: x[:, :1]):
        res = sliding_window(hu, fn, TILE, overlap=0.3, batch_size=batch_size)
        np.testing.assert_allclose(res, ref[: res.shape[0]], rtol=1e-5, atol=1e-3)
    src = zarr.create_array(store=str(tmp_path / "hu.zarr"), data=hu, chunks=(1, 7, 12, 9))
    out = _zarr(tmp_path, hu.shape)
    sliding_window(src, lambda x: x, TILE, overlap=0.3, batch_size=batch_size, out=out)
    np.testing.assert_allclose(out[...], ref, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("where", ["memory", "zarr", "in-place"])
def test_prefetch_off_gives_identical_results(where, tmp_path):
    hu = _hu((26, 23, 17), channels=2)
    conv = _conv(2, 2)
    results = []
    for prefetch in (True, False):
        kw = dict(overlap=0.3, mode="gaussian", batch_size=2, input_map=window_to_unit(), prefetch=prefetch)
        if where == "memory":
            results.append(sliding_window(hu, conv, TILE, **kw))
        elif where == "zarr":
            src = zarr.create_array(store=str(tmp_path / f"in{prefetch}.zarr"), data=hu, chunks=(1, 5, 12, 9))
            out = _zarr(tmp_path, hu.shape, chunks=(2, 4, 23, 17), name=f"out{prefetch}.zarr")
            sliding_window(src, conv, TILE, out=out, **kw)
            results.append(out[...])
        else:
            src = zarr.create_array(store=str(tmp_path / f"io{prefetch}.zarr"), data=hu.astype(np.float32),
                                    chunks=(2, 4, 10, 17))
            sliding_window(src, conv, TILE, out=src, **kw)
            results.append(src[...])
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_allclose(results[0], sliding_window(hu, conv, TILE, **{**kw, "prefetch": True}),
                               rtol=1e-5, atol=1e-6)


def test_helper_thread_leaves_thread_counts_alone_and_stops_on_errors():
    vol = _vol()
    threads = torch.get_num_threads()
    sliding_window(vol, _conv(), TILE, input_map=lambda b: b)
    assert torch.get_num_threads() == threads
    got = []  # threads started later begin with the caller's count, not the helper's 1
    t = threading.Thread(target=lambda: got.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert got == [threads]

    calls = []

    def fails_on_third(x):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("model failed")
        return x

    with pytest.raises(RuntimeError, match="model failed"):
        sliding_window(vol, fails_on_third, TILE)

    def bad_map(batch):
        raise ValueError("bad map")

    with pytest.raises(ValueError, match="bad map"):
        sliding_window(vol, lambda x: x, TILE, input_map=bad_map)
    with pytest.raises(ValueError, match="bad map"):
        sliding_window(vol, lambda x: x, TILE, input_map=bad_map, prefetch=False)
    assert not [t for t in threading.enumerate() if t.name.startswith("sliding_window")]


class _ChunkedOut(_RecordingOut):
    def __init__(self, shape, log, chunks):
        super().__init__(shape, log)
        self.chunks = chunks


@pytest.mark.parametrize("chunk", [3, 5, 6, 8])
def test_out_of_core_writes_whole_chunks(chunk):
    # x-starts 0, 6, 12, 18, 24, 30, 32 (tile 8, overlap 0.25): planes are final at 6, 12, …,
    # which are not chunk boundaries; only whole chunks along the slab axis are written (the
    # last one may be short), each plane once, and the slab is at most a tile + chunk - 1 deep.
    log = []
    vol = _vol((40, 10, 10))
    out = _ChunkedOut((1, 40, 10, 10), log, chunks=(1, chunk, 10, 10))
    sliding_window(vol, lambda x: x, (8, 8, 8), overlap=0.25, out=out)
    writes = [(k[1].start, k[1].stop) for _, k in log]
    assert writes[0][0] == 0 and writes[-1][1] == 40
    assert all(p[1] == q[0] for p, q in zip(writes, writes[1:], strict=False))
    assert all(a % chunk == 0 and (b % chunk == 0 or b == 40) for a, b in writes)
    np.testing.assert_allclose(out.data, vol, rtol=1e-5, atol=1e-6)
    big = _ChunkedOut((1, 40, 10, 10), [], chunks=(1, 9, 10, 10))  # deeper than a tile: written as finished
    sliding_window(vol, lambda x: x, (8, 8, 8), overlap=0.25, out=big)
    assert [(k[1].start, k[1].stop) for _, k in big.log][:2] == [(0, 6), (6, 12)]
    np.testing.assert_allclose(big.data, vol, rtol=1e-5, atol=1e-6)


def test_zarr_shards_are_written_whole(tmp_path):
    vol = _vol((24, 23, 17), channels=2)
    ref = sliding_window(vol, _conv(2, 2), TILE)
    out = zarr.create_array(store=str(tmp_path / "sharded.zarr"), shape=vol.shape, chunks=(2, 2, 23, 17),
                            shards=(2, 4, 23, 17), dtype="float32", fill_value=0)
    sliding_window(vol, _conv(2, 2), TILE, out=out)
    np.testing.assert_allclose(out[...], ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("out_of_core", [False, True])
@pytest.mark.parametrize("shape", [(30, 10, 10), (5, 20, 3)])
def test_lazy_volumes_are_read_once_per_plane(out_of_core, shape):
    vol = _vol(shape)[0]
    lazy = _LazyVolume(vol)
    ref = sliding_window(vol, _conv(), (8, 8, 8), overlap=0.25)
    if out_of_core:
        out = np.zeros(shape, np.float32)
        sliding_window(lazy, _conv(), (8, 8, 8), overlap=0.25, out=out)
        res = out
    else:
        res = sliding_window(lazy, _conv(), (8, 8, 8), overlap=0.25)
    np.testing.assert_allclose(res, ref, rtol=1e-5, atol=1e-6)
    keys = [tuple(k) + (slice(None),) * (3 - len(k)) for k in lazy.reads]  # whole planes along one axis
    (axis,) = [d for d in range(3) if any(k[d] != slice(None) for k in keys)] or [0]
    assert all(k[d] == slice(None) for k in keys for d in range(3) if d != axis)
    ranges = [k[axis].indices(shape[axis])[:2] for k in keys]
    assert ranges[0][0] == 0 and ranges[-1][1] == shape[axis]
    assert all(p[1] == q[0] for p, q in zip(ranges, ranges[1:], strict=False))  # each plane read once


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
        (dict(input_map=3), "input_map"),
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
