"""Tile reads from the Zarr store vs loading the whole volume from .nii.gz with nibabel.

On a 512×512×604 int16 chest phantom, tiles 256×256×128 at overlap 0.25:

* first-tile latency (open the store and the case, read one tile) vs the .nii.gz load;
  target: at least 20× faster;
* one pass over all grid tiles through the dataset (decoded, HU window applied) vs the
  .nii.gz load; target: no slower;
* DataLoader throughput, 2 workers vs 0 workers (tiles/s).

Run: ``.venv/bin/python benchmarks/bench_tiles.py`` (about a minute after the phantom is cached).
The full pass against the nibabel load, interleaved with the baseline and in its own process, is
also measured by ``benchmarks/bench_stitch.py`` (the figure the docs quote).
Each float tile is 32 MiB, above glibc's largest automatic mmap threshold, so every tile is a
fresh mmap and pays its page faults; with ``MALLOC_MMAP_THRESHOLD_=2000000000
MALLOC_TRIM_THRESHOLD_=4000000000`` in the environment freed tiles are reused (the figures are
recorded with the environment they ran in).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import FULL_SPACING, phantom_volume, record  # noqa: E402

TILE = (256, 256, 128)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(512, 512, 604))
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()

    import nibabel as nib
    import torch
    from torch.utils.data import DataLoader

    from patching.data.spec import centred_affine
    from patching.data.store import Store
    from patching.tiling.tiles import TileDataset

    torch.set_num_threads(2)
    hu = phantom_volume(tuple(args.shape))
    tmp = Path(tempfile.mkdtemp(prefix="bench-tiles-"))
    try:
        aff = centred_affine(hu.shape, FULL_SPACING)
        nii = tmp / "ct.nii.gz"
        nib.save(nib.Nifti1Image(hu, aff), nii)
        store = Store(tmp / "s.zarr", create=True)
        store.write_case("ct", hu, FULL_SPACING, aff, split="train")
        del hu

        def load_nii():
            return np.asarray(nib.load(nii).dataobj)

        load_nii()  # warm the page cache for both files alike
        t_nii = min(_time(load_nii) for _ in range(2))

        def first_tile():
            ds = TileDataset(tmp / "s.zarr", split="train", tile=TILE, mode="grid")
            return ds.read_tile(0, (128, 128, 200))

        first_tile()
        t_first = min(_time(first_tile) for _ in range(3))

        def full_pass(num_workers=0):
            ds = TileDataset(tmp / "s.zarr", split="train", tile=TILE, mode="grid", num_workers=num_workers)
            n = 0
            for batch in DataLoader(ds, batch_size=1, num_workers=num_workers, in_order=True):
                n += batch["image"].shape[0]
            return n

        def dataset_pass():
            ds = TileDataset(tmp / "s.zarr", split="train", tile=TILE, mode="grid")
            return sum(1 for _ in ds)

        num_tiles = dataset_pass()  # warm-up (imports, page cache)
        t_pass = min(_time(dataset_pass) for _ in range(2))
        t0 = time.perf_counter()
        assert full_pass(0) == num_tiles
        t_pass0 = time.perf_counter() - t0
        t0 = time.perf_counter()
        assert full_pass(2) == num_tiles
        t_pass2 = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    figures = {
        "volume": list(args.shape), "tile": list(TILE), "overlap": 0.25, "num_tiles": num_tiles,
        "nifti_gz_load_s": round(t_nii, 3),
        "first_tile_s": round(t_first, 4), "first_tile_speedup_vs_nifti": round(t_nii / t_first, 1),
        "full_pass_s": round(t_pass, 3), "full_pass_ratio_to_nifti": round(t_pass / t_nii, 3),
        "loader_tiles_per_s_0_workers": round(num_tiles / t_pass0, 2),
        "loader_tiles_per_s_2_workers": round(num_tiles / t_pass2, 2),
        "loader_2_workers_speedup": round(t_pass0 / t_pass2, 2),
        "malloc_env": {k: os.environ[k] for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_") if k in os.environ},
    }
    print(f"volume {tuple(args.shape)} int16, tiles {TILE}, overlap 0.25 -> {num_tiles} tiles")
    print(f"nibabel .nii.gz load          {t_nii:7.3f} s   (baseline)")
    print(f"first tile from Zarr          {t_first:7.4f} s   {t_nii / t_first:6.1f}x faster   (target >= 20x)")
    print(f"all tiles through the dataset {t_pass:7.3f} s   {t_pass / t_nii:6.2f}x the load (target <= 1.0x)")
    print(f"DataLoader, 0 workers         {num_tiles / t_pass0:7.2f} tiles/s")
    print(f"DataLoader, 2 workers         {num_tiles / t_pass2:7.2f} tiles/s   {t_pass0 / t_pass2:.2f}x")
    if not args.no_record:
        print("recorded:", record("tiles", figures))
    return 0


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    sys.exit(main())
