"""Full-size data path: stitching (in memory, out of core) vs MONAI, and all tiles vs a nibabel load.

The issue's setting: a 512×512×604 **int16** HU phantom (``benchmarks._common.phantom_volume``),
HU window (-1024, 1600) → [-1, 1], a predictor that returns a copy of its (float) input, tiles
256×256×128, overlap 0.25, Gaussian blending with sigma 0.125, float32 output in memory.

* ``monai``: the whole int16 volume is converted to a float32 tensor and windowed — the
  cheapest way a user can do it, one float32 allocation and in-place ops
  (``torch.from_numpy(hu).float().clamp_(lo, hi).mul_(s).add_(b)``; ``patching.data.spec.hu_to_unit``
  would allocate four more full-size temporaries) — then ``sliding_window_inference`` on the
  1×1×X×Y×Z tensor, sw_batch_size 1. The conversion counts in its time and memory.
* ``ours``: :func:`patching.tiling.stitch.sliding_window` on the int16 numpy volume; each tile is cast
  to float32 into a reused buffer and windowed in place there (``input_map=window_to_unit(...)``).
* ``ours-ooc``: the same out of core, Zarr → Zarr: the int16 input stored as
  :mod:`patching.data.store` stores CT (chunks 64×64×32, blosc-zstd with bitshuffle), the float32 result
  written to an uncompressed Zarr array with chunks ``OUT_CHUNKS`` (see ``docs/patching.md``).

* ``nibabel`` vs ``tiles``: the same volume read whole from ``.nii.gz`` by nibabel, against one
  pass over all its 54 grid tiles (256×256×128, overlap 0.25) through
  :class:`patching.tiling.tiles.TileDataset` from a store (decoded, HU window applied).

Each variant runs in its own child process (``--variant NAME``) so that its peak RSS
(``VmHWM``) is its own; the parent runs the set ``--repeat`` times, variants interleaved in the
order given (``--variants``), and prints, per variant, the median wall time, CPU time (user +
system), peak RSS and RSS before the run (input loaded, libraries imported), and the median over
sets of its ratio to the baseline measured in the same set (MONAI for the stitchers, nibabel
for the tiles), and the largest absolute difference to MONAI's result. Goals: out of core
≤ 1× MONAI's time at ≤ 0.5× its peak RSS; in memory ≤ 0.5× its RSS; all tiles ≤ 1× the nibabel
load; max |diff| ≤ 1e-3. On a shared machine compare ratios, not seconds.

Run: ``.venv/bin/python benchmarks/bench_stitch.py [--repeat 3] [--no-record]`` (about a minute
per repeat on 2 cores once the phantom is cached).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import FULL_SHAPE, record  # noqa: E402

ROI = (256, 256, 128)
OVERLAP = 0.25
SIGMA = 0.125
WINDOW = (-1024.0, 1600.0)
VARIANTS = ("monai", "ours", "ours-ooc", "nibabel", "tiles")
STITCH_VARIANTS = VARIANTS[:3]
OUT_CHUNKS = (64, 64, 32)  # float32 result: the store's tile-aligned CT chunks, uncompressed (docs/patching.md)


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_rss_mb() -> float:
    """This process's peak RSS in MiB: VmHWM, which starts afresh at exec. (``ru_maxrss`` does
    not: Linux carries the parent's peak over fork and exec, so every child would report at
    least the parent's size.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def copy_predictor(x):
    return x.clone()


def run_variant(variant: str, work: Path) -> dict:
    """One measurement, in this (child) process."""
    import torch

    if variant == "ours-ooc":
        import zarr

        from patching.tiling.stitch import sliding_window, window_to_unit

        src = zarr.open_array(str(work / "vol.zarr"), mode="r")
        out = zarr.create_array(
            store=str(work / "ours-ooc.zarr"), shape=src.shape, chunks=OUT_CHUNKS, dtype="float32",
            compressors=None, fill_value=0, overwrite=True,
        )
        base = rss_mb()
        c0, t0 = cpu_s(), time.perf_counter()
        sliding_window(src, copy_predictor, ROI, OVERLAP, "gaussian", SIGMA, out=out,
                       input_map=window_to_unit(WINDOW))
        seconds, cpu = time.perf_counter() - t0, cpu_s() - c0
        return {"seconds": seconds, "cpu_s": cpu, "peak_rss_mb": peak_rss_mb(), "base_rss_mb": base}

    if variant in ("nibabel", "tiles"):
        return run_read_variant(variant, work)

    hu = np.load(work / "vol.npy")  # (X, Y, Z) int16 HU, as a user has it
    if variant == "monai":
        from monai.inferers import sliding_window_inference

        lo, hi = WINDOW
        scale = 2.0 / (hi - lo)
        base = rss_mb()
        c0, t0 = cpu_s(), time.perf_counter()
        inputs = torch.from_numpy(hu).float().clamp_(lo, hi).mul_(scale).add_(-1.0 - lo * scale)
        with torch.no_grad():
            res = sliding_window_inference(
                inputs[None, None], ROI, 1, copy_predictor, overlap=OVERLAP, mode="gaussian", sigma_scale=SIGMA
            )[0, 0]
    elif variant == "ours":
        from patching.tiling.stitch import sliding_window, window_to_unit

        base = rss_mb()
        c0, t0 = cpu_s(), time.perf_counter()
        res = sliding_window(hu, copy_predictor, ROI, OVERLAP, "gaussian", SIGMA, input_map=window_to_unit(WINDOW))
        res = torch.from_numpy(res)
    else:
        raise SystemExit(f"--variant: unknown {variant!r}; expected one of {VARIANTS}")
    seconds, cpu = time.perf_counter() - t0, cpu_s() - c0
    peak = peak_rss_mb()
    assert res.dtype == torch.float32 and tuple(res.shape) == hu.shape
    np.save(work / f"{variant}.npy", res.numpy())
    return {"seconds": seconds, "cpu_s": cpu, "peak_rss_mb": peak, "base_rss_mb": base}


def run_read_variant(variant: str, work: Path) -> dict:
    """The volume read whole from ``.nii.gz`` by nibabel, or all its grid tiles through the dataset."""
    if variant == "nibabel":
        import nibabel as nib

        base = rss_mb()
        c0, t0 = cpu_s(), time.perf_counter()
        hu = np.asarray(nib.load(work / "ct.nii.gz").dataobj)
        n = 1
    else:
        from patching.tiling.tiles import TileDataset

        ds = TileDataset(work / "store.zarr", split="train", tile=ROI, mode="grid")
        base = rss_mb()
        c0, t0 = cpu_s(), time.perf_counter()
        n = sum(1 for _ in ds)
    seconds, cpu = time.perf_counter() - t0, cpu_s() - c0
    if variant == "nibabel" and hu.dtype != np.int16:
        raise SystemExit(f"nibabel read {hu.dtype}, expected int16")
    return {"seconds": seconds, "cpu_s": cpu, "peak_rss_mb": peak_rss_mb(), "base_rss_mb": base, "items": n}


def max_abs_diff(a, b, step: int = 32) -> float:
    """max |a - b| slab by slab (a, b: arrays with numpy slicing along the first axis)."""
    return max(
        float(np.abs(np.asarray(a[i : i + step], np.float64) - np.asarray(b[i : i + step], np.float64)).max())
        for i in range(0, a.shape[0], step)
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", choices=VARIANTS, help="(internal) measure one variant in this process")
    ap.add_argument("--workdir", type=Path, help="(internal) where the parent put the inputs")
    ap.add_argument("--shape", type=int, nargs=3, default=FULL_SHAPE)
    ap.add_argument("--repeat", type=int, default=3, help="runs of the whole set (medians are reported)")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                    help="what to run, in this order within each repeat (interleaved A/B)")
    ap.add_argument("--no-record", action="store_true", help="do not write benchmarks/results/stitch-*.json")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(2)  # the reference machine's core count, for every variant alike
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.workdir)))
        return 0

    import zarr

    from benchmarks._common import phantom_volume
    from patching.data.volume_io import CT_CODEC, DEFAULT_CT_CHUNKS

    work = Path(tempfile.mkdtemp(prefix="bench-stitch-"))
    try:
        hu = phantom_volume(tuple(args.shape))
        assert hu.dtype == np.int16, hu.dtype
        np.save(work / "vol.npy", hu)
        zarr.create_array(store=str(work / "vol.zarr"), data=hu, chunks=DEFAULT_CT_CHUNKS, compressors=CT_CODEC,
                          fill_value=-1024)
        # The same volume for the read comparison: a .nii.gz (nibabel's default compression) and a store.
        import nibabel as nib

        from benchmarks._common import FULL_SPACING
        from patching.data.spec import centred_affine
        from patching.data.store import Store

        affine = centred_affine(hu.shape, FULL_SPACING)
        nib.save(nib.Nifti1Image(hu, affine), work / "ct.nii.gz")
        Store(work / "store.zarr", create=True).write_case("ct", hu, FULL_SPACING, affine, split="train")
        del hu
        runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        for rep in range(args.repeat):
            for variant in args.variants:
                cmd = [sys.executable, __file__, "--variant", variant, "--workdir", str(work)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(proc.stderr, file=sys.stderr)
                    return 1
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                runs[variant].append(r)
                print(f"  run {rep + 1}: {variant:<9} {r['seconds']:6.2f} s  CPU {r['cpu_s']:6.2f} s  "
                      f"peak {r['peak_rss_mb']:5.0f} MB", flush=True)
            if "monai" in args.variants:
                ref = np.load(work / "monai.npy", mmap_mode="r")
                if "ours" in args.variants:
                    runs["ours"][-1]["max_abs_diff"] = max_abs_diff(np.load(work / "ours.npy", mmap_mode="r"), ref)
                if "ours-ooc" in args.variants:
                    runs["ours-ooc"][-1]["max_abs_diff"] = max_abs_diff(zarr.open_array(str(work / "ours-ooc.zarr")),
                                                                        ref)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    results = {}
    for name, rs in runs.items():
        if not rs:
            continue
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "max_abs_diff"}
        if "max_abs_diff" in rs[0]:
            med["max_abs_diff"] = max(r["max_abs_diff"] for r in rs)
        med["runs"] = rs
        results[name] = med
    # Ratios to the baseline measured in the same set (A and B interleaved), then their median:
    # on a shared machine the load changes between sets more than within one.
    baselines = {"ours": "monai", "ours-ooc": "monai", "monai": "monai", "tiles": "nibabel", "nibabel": "nibabel"}
    for name, r in results.items():
        base = baselines[name]
        if base not in results:
            continue
        pairs = list(zip(runs[name], runs[base], strict=True))
        r["baseline"] = base
        for key, ratio in (("seconds", "time_ratio"), ("cpu_s", "cpu_ratio"), ("peak_rss_mb", "rss_ratio")):
            r[ratio] = statistics.median(a[key] / b[key] for a, b in pairs)
    print(f"volume {tuple(args.shape)} int16 chest phantom, window {WINDOW}, roi {ROI}, overlap {OVERLAP}, "
          f"gaussian sigma {SIGMA}, copy predictor, {torch.get_num_threads()} threads; "
          f"medians of {args.repeat} runs; ratios: median over sets of (variant / baseline in the same set)")
    print(f"{'variant':<9} {'baseline':<8} {'time s':>7} {'ratio':>6} {'CPU s':>6} {'ratio':>6} {'peak RSS MB':>12} "
          f"{'ratio':>6} {'RSS before':>11} {'max|diff|':>10}")
    for name, r in results.items():
        diff = f"{r['max_abs_diff']:.2e}" if "max_abs_diff" in r else "-"
        if "baseline" not in r:
            print(f"{name:<9} {'-':<8} {r['seconds']:7.2f}")
            continue
        print(f"{name:<9} {r['baseline']:<8} {r['seconds']:7.2f} {r['time_ratio']:6.2f} {r['cpu_s']:6.2f} "
              f"{r['cpu_ratio']:6.2f} {r['peak_rss_mb']:12.0f} {r['rss_ratio']:6.2f} {r['base_rss_mb']:11.0f} "
              f"{diff:>10}")
    checks = {}
    if "time_ratio" in results.get("ours-ooc", {}):
        ooc = results["ours-ooc"]
        checks["out of core (Zarr -> Zarr) time <= 1x MONAI in memory (wall, median ratio)"] = ooc["time_ratio"] <= 1.0
        checks["out of core peak RSS <= 0.5x MONAI in memory"] = ooc["rss_ratio"] <= 0.5
    if "time_ratio" in results.get("ours", {}):
        checks["in memory peak RSS <= 0.5x MONAI"] = results["ours"]["rss_ratio"] <= 0.5
    if "time_ratio" in results.get("tiles", {}):
        checks["all 54 tiles through the dataset <= 1x the nibabel .nii.gz load (wall, median ratio)"] = (
            results["tiles"]["time_ratio"] <= 1.0)
    if any("max_abs_diff" in r for r in results.values()):
        checks["max |diff| <= 1e-3"] = max(r.get("max_abs_diff", 0.0) for r in results.values()) <= 1e-3
    for name, ok in checks.items():
        print(f"  {'ok  ' if ok else 'MISS'} {name}")
    if not args.no_record:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        figures = {"volume": "int16 chest phantom", "shape": list(args.shape), "window": list(WINDOW),
                   "roi": list(ROI), "overlap": OVERLAP, "sigma_scale": SIGMA, "repeat": args.repeat,
                   "out_chunks": list(OUT_CHUNKS), "variants": list(args.variants), **results, "targets": checks,
                   "load_average_1min_at_end": load,
                   "note": "shared 2-core machine (8 concurrent sessions): compare ratios, not seconds"}
        print("recorded", record("stitch", figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
