"""X2CT-GAN and X-Recon after a short ``cpu-demo`` training vs the mean training volume, on
held-out phantoms.

1. A store of ``--num`` chest phantoms (64³, 5.625 mm, PA + lateral DRRs of 128²; the last 10 %
   are the test split, the 10 % before them val) under ``--work`` (re-used when present).
2. Each task is trained with the CLI's own entry point (``python -m launch.train TASK --store S
   --preset cpu-demo --output-dir WORK/TASK --max-steps N --resume latest``; models at their
   ``cpu_demo()`` size, 64² X-rays → 32³), both at once, one thread each — or taken from
   ``--checkpoint TASK=PATH`` (a checkpoint, run or export directory).
3. ``xray2ct evaluate`` (its Python API) scores every test case: EMA generator, stored X-rays
   resized to the model's size, model cube → HU → trilinear to the case's 64³ grid, against the
   ground truth, both clipped to the preset's HU window [-1024, 1600]; the baseline is the
   voxel-wise mean of the training volumes. PSNR = 10·log10(2624² / MSE) (the data range is the
   window width, not the per-volume maximum), MAE, SSIM, projection consistency, ... with
   bootstrap CIs; the table is ``WORK/evaluation/summary.md``.

Run (about 40 minutes on the project's 2 shared cores under load; ``--steps 200``: about 10)::

    .venv/bin/python benchmarks/eval_gan_baselines.py --work /tmp/ganeval --num 40 --steps 800

Measured (docs/gan_baselines.md, "Measured"): after 200 steps neither model beats the mean
volume; after 800 both do in PSNR (X2CT-GAN 25.3 dB, X-Recon 24.4 dB vs 24.0 dB).

``--no-record`` skips writing ``benchmarks/results/gan-baselines-cpu.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks._common import record  # noqa: E402
from launch.demo import train  # noqa: E402
from launch.evaluate import evaluate  # noqa: E402
from patching.store import Store  # noqa: E402
from patching.synth_store import synthesize  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASKS = ("x2ct-gan", "x-recon")
SHAPE = (64, 64, 64)


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
    runs = {}
    if to_train:  # concurrently, `threads` each, until --steps (the budget only caps a runaway run)
        t = time.perf_counter()
        runs = train({task: [] for task in to_train}, store_path, args.work, args.work, 24 * 60.0, args.threads,
                     args.steps)
        runs["wall_seconds"] = round(time.perf_counter() - t, 1)
    methods = {task: Path(given.get(task, args.work / task)) for task in args.tasks}
    report = evaluate(store_path, methods, args.work / "evaluation", split=args.split, device="cpu",
                      command=" ".join(sys.argv))
    print((args.work / "evaluation" / "summary.md").read_text())
    if not args.no_record:
        summary = {row["method"]: {m: v["mean"] for m, v in row["metrics"].items() if v.get("mean") is not None}
                   for row in report["summary"]}
        path = record("gan-baselines", {"split": args.split, "num_phantoms": args.num, "shape": SHAPE,
                                        "steps": args.steps, "training": runs, "cases": report["cases"],
                                        "summary": summary, "failures": report["failures"]})
        print(f"recorded {path}")
    return 2 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
