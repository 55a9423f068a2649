"""X2CT-GAN and X-Recon after a short ``cpu-demo`` training vs the mean training volume, on
held-out phantoms.

1. A store of ``--num`` chest phantoms (64³, 5.625 mm, PA + lateral DRRs of 128²; the last 10 %
   are the test split, the 10 % before them val) under ``--work`` (re-used when present).
2. Each task is trained with the CLI's own entry point (``python -m launch.train TASK --store S
   --preset cpu-demo --output-dir WORK/TASK --max-steps N --resume latest``; models at their
   ``cpu_demo()`` size, 64² X-rays → 32³), both at once, one thread each — or taken from
   ``--checkpoint TASK=PATH`` (a checkpoint, run or export directory).
3. Every test case is reconstructed the way ``sample_gan`` does it (EMA generator, stored X-rays
   resized to the model's size, model cube → HU → trilinear to the case's 64³ grid) and compared
   with the ground truth clipped to the preset's HU window [-1024, 1600] (what the models are
   trained to reproduce). Baseline: the voxel-wise mean of the training volumes (clipped the same
   way). PSNR = 10·log10(2624² / MSE): the data range is the HU window width, stated, not the
   per-volume maximum. MAE in HU beside it.

Run (about 40 minutes on the project's 2 shared cores under load; ``--steps 200``: about 10)::

    .venv/bin/python benchmarks/eval_gan_baselines.py --work /tmp/ganeval --num 40 --steps 800

Measured (docs/gan_baselines.md, "Measured"): after 200 steps neither model beats the mean
volume; after 800 both do in PSNR (X2CT-GAN 25.3 dB, X-Recon 24.4 dB vs 24.0 dB).

``--no-record`` skips writing ``benchmarks/results/gan-baselines-cpu.json``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks._common import record  # noqa: E402
from gan_baselines.data import psnr  # noqa: E402
from gan_baselines.sampling import load_generator, reconstruct_hu  # noqa: E402
from patching.spec import VolumeSpec  # noqa: E402
from patching.store import Store  # noqa: E402
from patching.synth_store import synthesize  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASKS = ("x2ct-gan", "x-recon")
WINDOW = (-1024.0, 1600.0)  # the cpu-demo preset's HU window
SHAPE = (64, 64, 64)


def train_all(tasks: list[str], store: Path, work: Path, steps: int, threads: int) -> dict[str, float]:
    """Train the tasks concurrently (subprocesses, ``threads`` each); returns wall seconds per task."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONPATH=str(REPO))
    procs = {}
    for task in tasks:
        out = work / task
        out.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "launch.train", task, "--store", str(store), "--preset", "cpu-demo",
               "--output-dir", str(out), "--max-steps", str(steps), "--resume", "latest"]
        print("$", " ".join(cmd[1:]), flush=True)
        log = open(out / "train.log", "w")  # noqa: SIM115 - closed below
        procs[task] = (subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log, time.perf_counter())
    times: dict[str, float] = {}
    while len(times) < len(procs):  # poll, so each task's own wall time is recorded
        for task, (proc, log, t0) in procs.items():
            if task in times or proc.poll() is None:
                continue
            times[task] = time.perf_counter() - t0
            log.close()
            if proc.returncode != 0:
                raise SystemExit(f"training {task} failed (exit {proc.returncode}); see {work / task / 'train.log'}")
        time.sleep(0.5)
    return times


def clipped_hu(case) -> np.ndarray:
    return np.clip(np.asarray(case.ct[...], dtype=np.float32), *WINDOW)


def evaluate(store: Store, methods: dict[str, Path], split: str) -> dict[str, dict]:
    train_ids, test_ids = store.case_ids("train"), store.case_ids(split)
    mean = np.zeros(SHAPE, dtype=np.float64)
    for cid in train_ids:
        mean += clipped_hu(store.case(cid))
    mean = (mean / len(train_ids)).astype(np.float32)
    width = WINDOW[1] - WINDOW[0]
    loaded = {name: load_generator(path) for name, path in methods.items()}
    rows: dict[str, dict] = {"mean training volume": {"psnr": [], "mae": []}}
    rows.update({name: {"psnr": [], "mae": [], "step": g.step, "weights": g.weights} for name, g in loaded.items()})
    for cid in test_ids:
        case = store.case(cid)
        truth = torch.from_numpy(clipped_hu(case))
        spec = VolumeSpec(case.shape, case.spacing_mm, WINDOW)
        preds = {"mean training volume": torch.from_numpy(mean)}
        for name, g in loaded.items():
            xrays = {v: case.xray(v) for v in g.cfg.model.views}
            preds[name] = torch.from_numpy(reconstruct_hu(g, xrays, spec).astype(np.float32))
        for name, pred in preds.items():
            rows[name]["psnr"].append(float(psnr(pred, truth, width)))
            rows[name]["mae"].append(float((pred - truth).abs().mean()))
    for row in rows.values():
        row["psnr_mean"], row["mae_mean"] = float(np.mean(row["psnr"])), float(np.mean(row["mae"]))
    return {"cases": test_ids, "num_train": len(train_ids), "rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/xray2ct-gan-eval"))
    p.add_argument("--num", type=int, default=40, help="phantoms in the store (last 10 %% are the test split)")
    p.add_argument("--steps", type=int, default=800, help="training steps per task (cpu-demo: batch 1)")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--checkpoint", nargs="+", default=[], metavar="TASK=PATH", help="evaluate these instead of training")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training process")
    p.add_argument("--split", default="test")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(2)

    store_path = args.work / "phantoms.zarr"
    store = Store(store_path, create=True)
    synthesize(store, args.num, SHAPE, seed=0, workers=2, progress=False)  # skips finished cases
    given = dict(item.split("=", 1) for item in args.checkpoint)
    to_train = [t for t in args.tasks if t not in given]
    times = train_all(to_train, store_path, args.work, args.steps, args.threads) if to_train else {}
    methods = {t: Path(given.get(t, args.work / t)) for t in args.tasks}
    result = evaluate(store, methods, args.split)

    print(f"\n{len(result['cases'])} {args.split} phantoms {SHAPE} (vs {result['num_train']} training volumes); "
          f"PSNR data range = HU window width {WINDOW[1] - WINDOW[0]:.0f} HU, ground truth clipped to {WINDOW}")
    print(f"{'method':<22} {'step':>5} {'train s':>8} {'PSNR dB':>8} {'MAE HU':>8}  per case PSNR")
    for name, row in result["rows"].items():
        step = str(row.get("step", "-"))
        t = f"{times[name]:.0f}" if name in times else "-"
        cases = " ".join(f"{v:.2f}" for v in row["psnr"])
        print(f"{name:<22} {step:>5} {t:>8} {row['psnr_mean']:>8.2f} {row['mae_mean']:>8.1f}  {cases}")
    if not args.no_record:
        path = record("gan-baselines", {"split": args.split, "num_phantoms": args.num, "shape": SHAPE,
                                        "steps": args.steps, "train_seconds": times, "hu_window": WINDOW, **result})
        print(f"recorded {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
