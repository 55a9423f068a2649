"""patching.data.zarr_direct: the store's chunks read without Zarr's pipeline, equal to Zarr's reads."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from patching.data.volume_io import CT_CODEC
from patching.data.zarr_direct import chunk_reader, region_reader
from patching.errors import InputError


@pytest.fixture
def stored(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(-1024, 3000, size=(37, 29, 45), dtype=np.int16)  # edge chunks on every axis
    arr = zarr.create_array(store=str(tmp_path / "a.zarr"), shape=data.shape, chunks=(16, 8, 10), dtype="int16",
                            compressors=CT_CODEC, fill_value=-1024)
    arr[...] = data
    arr[:16, :8, :10] = -1024  # an all-fill chunk: Zarr does not write its file
    data[:16, :8, :10] = -1024
    return zarr.open_array(str(tmp_path / "a.zarr"), mode="r"), data


def test_region_reads_equal_zarr_and_the_data(stored):
    arr, data = stored
    read = region_reader(arr)
    assert read is not None
    for key in [(slice(0, 37), slice(0, 29), slice(0, 45)), (slice(3, 30), slice(7, 9), slice(11, 44)),
                (slice(36, 37), slice(0, 29), slice(40, 45)), (slice(None), slice(5, 6))]:
        full = tuple(key) + (slice(None),) * (3 - len(key))
        expect = data[full]
        dst = np.empty(expect.shape, dtype=np.float32)  # the copy casts
        read(key, dst)
        np.testing.assert_array_equal(dst, expect.astype(np.float32))
        np.testing.assert_array_equal(dst, arr[full])


def test_missing_chunk_is_the_fill_value_and_a_corrupt_one_is_named(stored, tmp_path):
    arr, data = stored
    chunk = chunk_reader(arr)
    assert not (tmp_path / "a.zarr" / "c" / "0" / "0" / "0").exists()
    assert (chunk((0, 0, 0)) == -1024).all()
    np.testing.assert_array_equal(chunk((1, 1, 1)), data[16:32, 8:16, 10:20])
    bad = tmp_path / "a.zarr" / "c" / "1" / "1" / "1"
    bad.write_bytes(bad.read_bytes()[:20])
    with pytest.raises(InputError, match="corrupt chunk"):
        chunk((1, 1, 1))


def test_other_layouts_go_through_zarr(tmp_path):
    plain = zarr.create_array(store=str(tmp_path / "p.zarr"), shape=(8, 8), chunks=(4, 4), dtype="float32",
                              compressors=None)
    assert chunk_reader(plain) is None  # no blosc
    mem = zarr.create_array(store={}, shape=(8, 8), chunks=(4, 4), dtype="int16", compressors=CT_CODEC)
    assert chunk_reader(mem) is None  # not a local directory
    assert chunk_reader(np.zeros((4, 4))) is None


def test_region_writer_writes_what_zarr_reads_back(tmp_path):
    from patching.data.zarr_direct import region_writer

    out = zarr.create_array(store=str(tmp_path / "o.zarr"), shape=(2, 20, 9, 13), chunks=(2, 8, 9, 5),
                            dtype="float32", compressors=None, fill_value=0)
    write = region_writer(out)
    assert write is not None
    rng = np.random.default_rng(1)
    expect = np.zeros(out.shape, np.float32)
    for z0, z1 in ((0, 5), (5, 13)):  # whole chunks, then up to the array's end (an edge chunk)
        part = rng.standard_normal((2, 20, 9, z1 - z0)).astype(np.float32)
        write((slice(None), slice(None), slice(None), slice(z0, z1)), part)
        expect[..., z0:z1] = part
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "o.zarr"), mode="r")[...], expect)
    part = rng.standard_normal((2, 20, 9, 4)).astype(np.float32)
    write((slice(None), slice(None), slice(None), slice(3, 7)), part)  # unaligned: through Zarr
    expect[..., 3:7] = part
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "o.zarr"), mode="r")[...], expect)
    compressed = zarr.create_array(store=str(tmp_path / "c.zarr"), shape=(4,), chunks=(2,), dtype="int16",
                                   compressors=CT_CODEC)
    assert region_writer(compressed) is None


@pytest.mark.parametrize("chunks", [(8, 8, 4), (40, 8, 6), (13, 11, 7)])  # z-chunks finer, coarser, odd
def test_out_of_core_stitching_through_direct_reads_and_writes_equals_in_memory(tmp_path, chunks):
    import torch

    from patching.tiling.stitch import sliding_window, window_to_unit

    rng = np.random.default_rng(2)
    hu = rng.integers(-1024, 2000, size=(40, 36, 50), dtype=np.int16)
    src = zarr.create_array(store=str(tmp_path / "in.zarr"), data=hu, chunks=(16, 16, 8), compressors=CT_CODEC)
    assert region_reader(src) is not None
    out = zarr.create_array(store=str(tmp_path / "out.zarr"), shape=hu.shape, chunks=chunks, dtype="float32",
                            compressors=None, fill_value=0)
    from patching.data.zarr_direct import region_writer

    assert region_writer(out) is not None

    def fn(x):
        return torch.tanh(x * 1.5) + 0.1

    window = window_to_unit((-1024.0, 1600.0))
    ref = sliding_window(hu, fn, (16, 16, 20), 0.25, "gaussian", 0.125, input_map=window)
    sliding_window(zarr.open_array(str(tmp_path / "in.zarr"), mode="r"), fn, (16, 16, 20), 0.25, "gaussian", 0.125,
                   out=out, input_map=window)
    np.testing.assert_allclose(zarr.open_array(str(tmp_path / "out.zarr"), mode="r")[...], ref, rtol=0, atol=1e-6)
