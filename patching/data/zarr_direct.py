"""Reading the store's Zarr arrays chunk by chunk with numcodecs, bypassing Zarr's async pipeline.

Hand-written because of a measured cost: decoding the 512×512×604 int16 CT of a store (1216
blosc-zstd chunks of 64×64×32) through ``zarr`` 3.1 took 0.93–1.3 s of CPU whatever its
``codec_pipeline.batch_size``, ``async.concurrency`` or ``threading.max_workers``, against 0.28 s
for reading the same chunk files and ``numcodecs.blosc.decompress``-ing them — Zarr's per-chunk
asyncio machinery costs ~0.8 ms of CPU a chunk, three times the decoding. Tile reads
(:mod:`patching.tiling.tiles`) and the stitcher's input slab (:mod:`patching.tiling.stitch_input`) decode every
chunk of a volume per pass, so that overhead was a third of a pass.

Only the layout the store writes is read this way: a Zarr 3 array in a local directory, a
regular chunk grid, default chunk keys, codecs exactly ``bytes`` (little endian, or none for
one-byte types) + ``blosc``, no sharding, a native little-endian machine. Anything else returns
``None`` from :func:`chunk_reader` and callers use Zarr. A missing chunk file is the fill value,
as in Zarr; a chunk that does not decode to the chunk's size raises :class:`InputError` naming
the file.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from patching.errors import InputError


def chunk_reader(arr) -> Callable[[tuple[int, ...]], np.ndarray] | None:
    """``read(chunk_index) -> ndarray`` (a fresh, full chunk-shaped array; edge chunks are stored
    full size in Zarr 3) for arrays in the store's layout, else None."""
    try:
        import numcodecs.blosc as blosc
        from zarr.codecs import BloscCodec, BytesCodec
        from zarr.core.chunk_grids import RegularChunkGrid
        from zarr.core.chunk_key_encodings import DefaultChunkKeyEncoding
        from zarr.storage import LocalStore
    except ImportError:
        return None
    meta = getattr(arr, "metadata", None)
    if (sys.byteorder != "little" or meta is None or getattr(meta, "zarr_format", None) != 3
            or not isinstance(getattr(arr, "store", None), LocalStore)
            or not isinstance(meta.chunk_grid, RegularChunkGrid)
            or not isinstance(meta.chunk_key_encoding, DefaultChunkKeyEncoding)):
        return None
    codecs = tuple(meta.codecs)
    if (len(codecs) != 2 or not isinstance(codecs[0], BytesCodec) or not isinstance(codecs[1], BloscCodec)
            or (codecs[0].endian is not None and codecs[0].endian.value != "little")):
        return None
    dtype = np.dtype(arr.dtype)
    if dtype.byteorder == ">":
        return None
    root = Path(arr.store.root) / arr.path
    chunks = tuple(int(c) for c in meta.chunk_grid.chunk_shape)
    nbytes = int(np.prod(chunks)) * dtype.itemsize
    fill = meta.fill_value

    def read(index: tuple[int, ...]) -> np.ndarray:
        path = root / meta.encode_chunk_key(tuple(int(i) for i in index))
        out = np.empty(chunks, dtype=dtype)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            out.fill(fill)
            return out
        try:
            # blosc header: uncompressed size at bytes 4-8, compressed size at 12-16 (little endian)
            if len(data) < 16 or int.from_bytes(data[12:16], "little") != len(data):
                raise ValueError(f"{len(data)} bytes, not one whole blosc frame")
            if int.from_bytes(data[4:8], "little") != nbytes:
                raise ValueError(f"holds {int.from_bytes(data[4:8], 'little')} bytes, the chunk has {nbytes}")
            blosc.decompress(data, out)
        except (ValueError, RuntimeError) as err:
            raise InputError(str(path), f"corrupt chunk: {err}") from None
        return out

    read.chunks = chunks  # type: ignore[attr-defined]
    return read


def region_reader(arr) -> Callable[[tuple[slice, ...], np.ndarray], None] | None:
    """``read(key, dst)``: ``arr[key]`` (a tuple of step-1 slices inside the array) into ``dst``
    (any dtype: the copy casts), chunk by chunk; None where :func:`chunk_reader` is."""
    chunk = chunk_reader(arr)
    if chunk is None:
        return None
    chunks, shape = chunk.chunks, tuple(int(s) for s in arr.shape)

    def read(key: tuple[slice, ...], dst: np.ndarray) -> None:
        key = tuple(key) + (slice(None),) * (len(shape) - len(key))
        start = [0 if k.start is None else k.start for k in key]
        stop = [n if k.stop is None else k.stop for k, n in zip(key, shape)]
        ranges = [range(a // c, (b - 1) // c + 1) for a, b, c in zip(start, stop, chunks)]
        for idx in itertools.product(*ranges):
            lo = [i * c for i, c in zip(idx, chunks)]
            src = tuple(slice(max(a, c0) - c0, min(b, c0 + c) - c0) for a, b, c0, c in zip(start, stop, lo, chunks))
            out = tuple(slice(max(a, c0) - a, min(b, c0 + c) - a) for a, b, c0, c in zip(start, stop, lo, chunks))
            dst[out] = chunk(idx)[src]

    return read


def region_writer(arr) -> Callable[[tuple[slice, ...], np.ndarray], None] | None:
    """``write(key, data)``: ``arr[key] = data`` for an **uncompressed** Zarr 3 array in a local
    directory (the stitcher's float32 output), chunk file by chunk file, or None.

    Regions must start on chunk boundaries and end on one or at the array's end (the stitcher
    writes whole chunks, see ``docs/patching.md``); ``write`` falls back to Zarr for any other.
    Same saving as reading: Zarr 3.1 spent ~1 s of CPU writing 604 MiB in 1216 chunks, most of it
    per-chunk overhead. Every chunk is written (Zarr would skip chunks equal to the fill value;
    reads give the same values either way).
    """
    try:
        from zarr.codecs import BytesCodec
        from zarr.core.chunk_grids import RegularChunkGrid
        from zarr.core.chunk_key_encodings import DefaultChunkKeyEncoding
        from zarr.storage import LocalStore
    except ImportError:
        return None
    meta = getattr(arr, "metadata", None)
    if (sys.byteorder != "little" or meta is None or getattr(meta, "zarr_format", None) != 3
            or not isinstance(getattr(arr, "store", None), LocalStore) or arr.store.read_only
            or not isinstance(meta.chunk_grid, RegularChunkGrid)
            or not isinstance(meta.chunk_key_encoding, DefaultChunkKeyEncoding)):
        return None
    codecs = tuple(meta.codecs)
    if (len(codecs) != 1 or not isinstance(codecs[0], BytesCodec)
            or (codecs[0].endian is not None and codecs[0].endian.value != "little")):
        return None
    dtype = np.dtype(arr.dtype)
    root = Path(arr.store.root) / arr.path
    chunks, shape = tuple(int(c) for c in meta.chunk_grid.chunk_shape), tuple(int(s) for s in arr.shape)
    fill = meta.fill_value

    def write(key: tuple[slice, ...], data: np.ndarray) -> None:
        key = tuple(key) + (slice(None),) * (len(shape) - len(key))
        start = [0 if k.start is None else k.start for k in key]
        stop = [n if k.stop is None else k.stop for k, n in zip(key, shape)]
        aligned = all(a % c == 0 and (b % c == 0 or b == n) for a, b, c, n in zip(start, stop, chunks, shape))
        if not aligned or tuple(data.shape) != tuple(b - a for a, b in zip(start, stop)):
            arr[key] = data
            return
        buf = np.empty(chunks, dtype=dtype)
        ranges = [range(a // c, (b - 1) // c + 1) for a, b, c in zip(start, stop, chunks)]
        for idx in itertools.product(*ranges):
            lo = [i * c for i, c in zip(idx, chunks)]
            part = tuple(slice(c0 - a, min(c0 + c, b) - a) for a, b, c0, c in zip(start, stop, lo, chunks))
            inner = tuple(slice(0, p.stop - p.start) for p in part)
            if any(p.stop - p.start < c for p, c in zip(part, chunks)):  # an edge chunk: stored full size
                buf.fill(fill)
            buf[inner] = data[part]
            path = root / meta.encode_chunk_key(idx)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(buf.data)

    return write
