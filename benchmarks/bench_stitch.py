"""Sliding-window stitching: ours (in memory, out of core) vs MONAI's sliding_window_inference.

A 512×512×604 float32 volume (the chest phantom mapped to [-1, 1] when ``patching.phantom``
has ``synth_chest``, else smooth random data), a predictor that returns a copy of its input,
tiles 256×256×128, overlap 0.25, Gaussian blending with sigma 0.125:

* ``monai``: ``sliding_window_inference`` on a 1×1×X×Y×Z tensor, sw_batch_size 1;
* ``ours``: :func:`patching.stitch.sliding_window` in memory, same tensor (X×Y×Z);
* ``ours-inplace``: the same tensor with ``out=`` itself: the result overwrites the input,
  so only one output-tile-deep slab is allocated (valid because a plane is written only once
  no later tile reads it);
* ``ours-ooc``: the same out of core, tiles read from a Zarr array on disk and the result
  written to another (both uncompressed, so that codec time does not blur the stitcher's).

Each variant runs in its own child process (``--variant NAME``) so that its peak RSS
(``VmHWM``) is its own; the parent prints wall time, peak RSS, RSS before the run (input
loaded, libraries imported), ratios to MONAI and the largest absolute difference to MONAI.
Targets: time ≤ 0.5× MONAI, peak RSS ≤ 0.5× MONAI (in memory), out of core < 1.5 GB,
max |diff| ≤ 1e-3.

Run: ``.venv/bin/python benchmarks/bench_stitch.py [--no-record]`` (1–2 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import shutil
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
VARIANTS = ("monai", "ours", "ours-inplace", "ours-ooc")
ZARR_CHUNKS = (64, 64, 64)


def make_volume(shape, seed: int = 0) -> tuple[np.ndarray, str]:
    """float32 volume in [-1, 1]: the phantom if there is one, else smooth random data."""
    try:
        import patching.phantom as phantom

        if hasattr(phantom, "synth_chest"):
            from benchmarks._common import phantom_volume
            from patching.spec import hu_to_unit

            return hu_to_unit(phantom_volume(tuple(shape), seed=seed), (-1024.0, 1600.0)), "chest phantom"
    except ImportError:
        pass
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((1, 1, *(max(2, n // 32) for n in shape)), generator=g) * 2 - 1
    vol = F.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=True)[0, 0]
    return vol.numpy(), "smooth random"


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


def run_variant(variant: str, work: Path) -> dict:
    """One measurement, in this (child) process."""
    import torch

    if variant == "ours-ooc":
        import zarr

        from patching.stitch import sliding_window

        src = zarr.open_array(str(work / "vol.zarr"), mode="r")
        out = zarr.create_array(
            store=str(work / "ours-ooc.zarr"), shape=src.shape, chunks=ZARR_CHUNKS, dtype="float32",
            compressors=None, fill_value=0, overwrite=True,
        )
        base = rss_mb()
        c0, t0 = cpu_s(), time.perf_counter()
        sliding_window(src, lambda x: x.clone(), ROI, OVERLAP, "gaussian", SIGMA, out=out)
        seconds, cpu = time.perf_counter() - t0, cpu_s() - c0
        return {"seconds": seconds, "cpu_s": cpu, "peak_rss_mb": peak_rss_mb(), "base_rss_mb": base}

    vol = torch.from_numpy(np.load(work / "vol.npy"))  # (X, Y, Z) float32
    if variant == "monai":
        from monai.inferers import sliding_window_inference

        inputs = vol[None, None]  # (1, 1, X, Y, Z)
        base = rss_mb()
        c0, t0 = cpu_s(), time.perf_counter()
        with torch.no_grad():
            res = sliding_window_inference(
                inputs, ROI, 1, lambda x: x.clone(), overlap=OVERLAP, mode="gaussian", sigma_scale=SIGMA
            )[0, 0]
    elif variant == "ours":
        from patching.stitch import sliding_window

        base = rss_mb()
        c0, t0 = cpu_s(), time.perf_counter()
        res = sliding_window(vol, lambda x: x.clone(), ROI, OVERLAP, "gaussian", SIGMA)
    elif variant == "ours-inplace":
        from patching.stitch import sliding_window

        base = rss_mb()
        c0, t0 = cpu_s(), time.perf_counter()
        sliding_window(vol, lambda x: x.clone(), ROI, OVERLAP, "gaussian", SIGMA, out=vol)
        res = vol
    else:
        raise SystemExit(f"--variant: unknown {variant!r}; expected one of {VARIANTS}")
    seconds, cpu = time.perf_counter() - t0, cpu_s() - c0
    peak = peak_rss_mb()
    np.save(work / f"{variant}.npy", res.numpy())
    return {"seconds": seconds, "cpu_s": cpu, "peak_rss_mb": peak, "base_rss_mb": base}


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
    ap.add_argument("--no-record", action="store_true", help="do not write benchmarks/results/stitch-*.json")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(2)  # the reference machine's core count, for every variant alike
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.workdir)))
        return 0

    import zarr

    work = Path(tempfile.mkdtemp(prefix="bench-stitch-"))
    try:
        vol, kind = make_volume(args.shape)
        np.save(work / "vol.npy", vol)
        zarr.create_array(
            store=str(work / "vol.zarr"), data=vol, chunks=ZARR_CHUNKS, compressors=None, fill_value=0
        )
        del vol
        results = {}
        for variant in VARIANTS:
            cmd = [sys.executable, __file__, "--variant", variant, "--workdir", str(work)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                return 1
            results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
        ref = np.load(work / "monai.npy", mmap_mode="r")
        for name in ("ours", "ours-inplace"):
            results[name]["max_abs_diff"] = max_abs_diff(np.load(work / f"{name}.npy", mmap_mode="r"), ref)
        results["ours-ooc"]["max_abs_diff"] = max_abs_diff(zarr.open_array(str(work / "ours-ooc.zarr")), ref)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    m = results["monai"]
    print(f"volume {tuple(args.shape)} ({kind}), roi {ROI}, overlap {OVERLAP}, gaussian sigma {SIGMA}, "
          f"copy predictor, {torch.get_num_threads()} threads")
    print(f"{'variant':<12} {'time s':>7} {'/MONAI':>7} {'CPU s':>6} {'/MONAI':>7} {'peak RSS MB':>12} "
          f"{'/MONAI':>7} {'RSS before':>11} {'max|diff|':>10}")
    for name, r in results.items():
        r["time_ratio"] = r["seconds"] / m["seconds"]
        r["rss_ratio"] = r["peak_rss_mb"] / m["peak_rss_mb"]
        r["cpu_ratio"] = r["cpu_s"] / m["cpu_s"]
        diff = f"{r['max_abs_diff']:.2e}" if "max_abs_diff" in r else "-"
        print(f"{name:<12} {r['seconds']:7.2f} {r['time_ratio']:7.2f} {r['cpu_s']:6.2f} {r['cpu_ratio']:7.2f} "
              f"{r['peak_rss_mb']:12.0f} {r['rss_ratio']:7.2f} {r['base_rss_mb']:11.0f} {diff:>10}")
    o, ooc = results["ours"], results["ours-ooc"]
    checks = {
        "time <= 0.5x MONAI": o["time_ratio"] <= 0.5,
        "peak RSS <= 0.5x MONAI (in memory)": o["rss_ratio"] <= 0.5,
        "out-of-core peak RSS < 1.5 GB": ooc["peak_rss_mb"] < 1.5 * 1024,
        "max |diff| <= 1e-3": max(r.get("max_abs_diff", 0.0) for r in results.values()) <= 1e-3,
    }
    for name, ok in checks.items():
        print(f"  {'ok  ' if ok else 'MISS'} {name}")
    if not args.no_record:
        print("recorded", record("stitch", {"volume": kind, "shape": list(args.shape), **results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
