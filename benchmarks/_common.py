"""Helpers shared by the benchmark scripts: the test volume, timing, and result records."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

FULL_SHAPE = (512, 512, 604)
FULL_SPACING = (0.7, 0.7, 0.6)
CACHE = Path(os.environ.get("XRAY2CT_BENCH_CACHE", "/tmp/xray2ct-bench"))


def phantom_volume(shape=FULL_SHAPE, seed: int = 0) -> np.ndarray:
    """An int16 chest phantom of ``shape`` (cached on disk between runs: it takes seconds)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"phantom-{'x'.join(map(str, shape))}-s{seed}.npy"
    if path.exists():
        return np.load(path, mmap_mode=None)
    from patching.phantoms.chest import synth_chest

    hu = synth_chest(tuple(shape), seed=seed, fov_mm=tuple(n * s for n, s in zip(shape, FULL_SPACING))
                     if tuple(shape) == FULL_SHAPE else (360.0, 360.0, 360.0)).hu
    np.save(path, hu)
    return hu


def timeit(fn, *, repeat: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def peak_rss_mb() -> float:
    """Peak resident set size of this process (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def environment() -> dict:
    import torch

    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "command": " ".join([Path(sys.executable).name] + sys.argv),
    }
    for mod in ("zarr", "numcodecs", "nibabel", "monai", "accelerate", "deepspeed", "diffusers"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional packages
            pass
    return info


def shown_path(path: str | Path) -> str:
    """A path as results carry it: relative to the repository when it lies inside it (never a
    scratch prefix of this machine), unchanged when relative already or outside the repository."""
    path = Path(path)
    if not path.is_absolute():
        return str(path)
    try:
        return str(path.relative_to(Path(__file__).resolve().parents[1]))
    except ValueError:
        return str(path)


def record(name: str, figures: dict, *, out_dir: Path | None = None) -> Path:
    """Write ``benchmarks/results/<name>-<device>.json`` with figures and environment."""
    env = environment()
    out_dir = out_dir or Path(__file__).resolve().parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = "gpu" if env["device"] != "cpu" else "cpu"
    path = out_dir / f"{name}-{dev}.json"
    path.write_text(json.dumps({"benchmark": name, "environment": env, "figures": figures}, indent=2))
    return path
