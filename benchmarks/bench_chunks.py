"""Choose the CT array's Zarr chunk shape and codec by measurement.

For each chunk shape × codec: write time, bytes on disk, and the mean time to read a
256×256×128 tile at grid positions (overlap 0.25) and at random (jittered) positions of a
512×512×604 int16 phantom. Prints a table; the store's default (patching/data/store.py) is the row
marked "*".

Run: ``.venv/bin/python benchmarks/bench_chunks.py`` (a few minutes).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import phantom_volume, record  # noqa: E402

TILE = (256, 256, 128)


def main() -> int:
    import zarr
    from zarr.codecs import BloscCodec

    from patching.data.volume_io import CT_CODEC, DEFAULT_CT_CHUNKS
    from patching.tiling.grid import tile_grid

    hu = phantom_volume()
    grid = tile_grid(hu.shape, TILE, 0.25)
    rng = np.random.default_rng(0)
    rand = [tuple(int(rng.integers(0, n - t + 1)) for n, t in zip(hu.shape, TILE)) for _ in range(12)]
    codecs = {
        "zstd3-bitshuffle": BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"),
        "zstd1-bitshuffle": BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle"),
        "zstd3-byteshuffle": BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"),
        "lz4-bitshuffle": BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"),
    }
    shapes = [(64, 64, 32), (64, 64, 64), (128, 128, 64), (256, 256, 128)]
    tmp = Path(tempfile.mkdtemp(prefix="bench-chunks-"))
    rows = []
    try:
        for chunks in shapes:
            for name, codec in codecs.items():
                path = tmp / f"{name}-{'x'.join(map(str, chunks))}"
                t = time.perf_counter()
                arr = zarr.create_array(store=str(path), shape=hu.shape, dtype=hu.dtype, chunks=chunks,
                                        compressors=codec, fill_value=-1024)
                arr[...] = hu
                t_write = time.perf_counter() - t
                size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
                t = time.perf_counter()
                for sl in grid[:18]:
                    arr[sl]
                t_grid = (time.perf_counter() - t) / 18
                t = time.perf_counter()
                for s in rand:
                    arr[tuple(slice(a, a + b) for a, b in zip(s, TILE))]
                t_rand = (time.perf_counter() - t) / len(rand)
                default = chunks == DEFAULT_CT_CHUNKS and codec.to_dict() == CT_CODEC.to_dict()
                rows.append({"chunks": list(chunks), "codec": name, "write_s": round(t_write, 2),
                             "mib": round(size / 2**20, 1), "grid_tile_ms": round(t_grid * 1e3, 1),
                             "random_tile_ms": round(t_rand * 1e3, 1), "default": default})
                r = rows[-1]
                print(f"{'*' if default else ' '} {str(chunks):16s} {name:18s} write {r['write_s']:5.2f} s  "
                      f"{r['mib']:6.1f} MiB  grid tile {r['grid_tile_ms']:6.1f} ms  random tile {r['random_tile_ms']:6.1f} ms",
                      flush=True)
                shutil.rmtree(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"raw int16: {hu.nbytes / 2**20:.1f} MiB")
    if "--no-record" not in sys.argv:
        print("recorded:", record("chunks", {"rows": rows, "raw_mib": round(hu.nbytes / 2**20, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
