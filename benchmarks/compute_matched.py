"""A compute-matched comparison: every method trained for the same process CPU-seconds on the
same phantoms, scored by ``xray2ct evaluate`` on the same test cases, at one or more budgets.

Diffusion's budget includes its VQ-GAN: ``--vqgan-share`` of the CPU-seconds go to stage 1
(default: the demo's split), the rest to the diffusion model; X2CT-GAN gets the whole budget.
Step counts come from each model's measured CPU-seconds per step (a short calibration run per
model, read from the engine's ``cpu_s`` log, or ``--cost NAME=SECONDS`` given), so each run
has a fixed step budget and its learning-rate schedule spans it. Every training runs on one
thread (``OMP_WAIT_POLICY=PASSIVE``) as the demo's; each row's actual CPU-seconds are read
back from its logs and printed beside the scores. Cells carry the evaluation's bootstrap 95 %
intervals; the diffusion rows are one sample and the mean of ``--num-samples``; X2CT-GAN's
32³ output is upsampled trilinearly to the 64³ grid before scoring (it smooths, which favours
PSNR).

    .venv/bin/python benchmarks/compute_matched.py --work /tmp/cm --budget 600 1200

Records ``benchmarks/results/compute-matched-cpu.json``; the machine's load is recorded, since
CPU-seconds per step rise when other processes share the cores' caches and hyper-threads.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import record, shown_path  # noqa: E402
from launch.demo import STEPS, _cpu_seconds  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASKS = ("vqgan", "x2ct-gan", "diffusion")


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(REPO))


def start_training(task: str, store: Path, out: Path, steps: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "launch.train", task, "--store", str(store), "--preset", "cpu-demo",
           "--output-dir", str(out), "--resume", "latest", "--max-steps", str(steps),
           "--set", "train.val_every=0", "train.ckpt_every=0", "train.log_every=10", "train.num_workers=0"]
    return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=log.open("a"), stderr=subprocess.STDOUT)


def wait(procs: dict[str, subprocess.Popen]) -> None:
    for name, p in procs.items():
        if p.wait() != 0:
            raise RuntimeError(f"training {name} failed (exit {p.returncode})")


def per_step_cost(run: Path) -> float:
    """CPU-seconds per step between the first and the last log line (start-up excluded)."""
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    a, b = recs[0], recs[-1]
    return (b["cpu_s"] - a["cpu_s"]) / max(1, b["step"] - a["step"])


def make_store(path: Path, num: int, seed: int) -> None:
    from patching.data.store import Store
    from patching.data.synth_store import synthesize

    synthesize(Store(path, create=True), num, (64, 64, 64), seed=seed, emboli=0.3, workers=1, progress=False)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--budget", type=float, nargs="+", required=True, help="CPU-seconds per method")
    p.add_argument("--num", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vqgan-share", type=float, default=None,
                   help="fraction of the diffusion budget spent on the VQ-GAN (default: the demo's split)")
    p.add_argument("--cost", action="append", default=[], metavar="NAME=SECONDS",
                   help="CPU-seconds per step of a task (skips its calibration run)")
    p.add_argument("--calibrate-steps", type=int, default=30)
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    t0 = time.perf_counter()

    # 1. Per-step CPU cost of each model (one thread), on a store of the same phantoms.
    cost = {k: float(v) for k, v in (c.split("=", 1) for c in args.cost)}
    calib_store = args.work / "calibration.zarr"
    if any(t not in cost for t in TASKS):
        make_store(calib_store, args.num, args.seed)
        # the diffusion calibration encodes with a calibration VQ-GAN, so that one runs whenever diffusion is calibrated
        todo = [t for t in ("vqgan", "x2ct-gan") if t not in cost or (t == "vqgan" and "diffusion" not in cost)]
        wait({t: start_training(t, calib_store, args.work / "calib" / t, args.calibrate_steps,
                                args.work / f"calib-{t}.log") for t in todo})
        cost.update({t: per_step_cost(args.work / "calib" / t) for t in todo if t not in cost})
        if "diffusion" not in cost:
            from stage1_vqgan.encode import encode_store

            encode_store(calib_store, args.work / "calib" / "vqgan", device="cpu", progress=False)
            wait({"diffusion": start_training("diffusion", calib_store, args.work / "calib" / "diffusion",
                                              args.calibrate_steps, args.work / "calib-diffusion.log")})
            cost["diffusion"] = per_step_cost(args.work / "calib" / "diffusion")
    share = args.vqgan_share
    if share is None:  # the demo's split of the diffusion chain between stage 1 and stage 2
        share = STEPS["vqgan"] * cost["vqgan"] / (STEPS["vqgan"] * cost["vqgan"] + STEPS["diffusion"] * cost["diffusion"])
    print(f"CPU-s per step: {', '.join(f'{k} {v:.3f}' for k, v in cost.items())}; VQ-GAN share {share:.2f}", flush=True)

    from launch.evaluate import evaluate
    from stage1_vqgan.encode import encode_store

    figures: dict = {"cost_cpu_s_per_step": {k: round(v, 4) for k, v in cost.items()}, "vqgan_share": round(share, 3),
                     "num": args.num, "seed": args.seed, "budgets": {}}
    for budget in args.budget:
        d = args.work / f"budget-{budget:g}"
        d.mkdir(exist_ok=True)
        store = d / "phantoms.zarr"
        steps = {"vqgan": max(1, round(share * budget / cost["vqgan"])),
                 "diffusion": max(1, round((1 - share) * budget / cost["diffusion"])),
                 "x2ct-gan": max(1, round(budget / cost["x2ct-gan"]))}
        print(f"budget {budget:g} CPU-s: steps {steps}", flush=True)
        finished, plan = d / "evaluation" / "results.json", d / "plan.json"
        wanted = {"steps": steps, "num": args.num, "seed": args.seed, "num_samples": args.num_samples}
        if finished.exists() and plan.exists() and json.loads(plan.read_text()) == wanted:
            # a budget an earlier run finished with the same steps, phantoms and samples is read back, not retrained
            print(f"budget {budget:g}: reusing {shown_path(finished)}", flush=True)
            report = json.loads(finished.read_text())
        else:
            plan.write_text(json.dumps(wanted))
            make_store(store, args.num, args.seed)
            wait({t: start_training(t, store, d / t, steps[t], d / f"{t}.log") for t in ("vqgan", "x2ct-gan")})
            encode_store(store, d / "vqgan", device="cpu", progress=False)
            wait({"diffusion": start_training("diffusion", store, d / "diffusion", steps["diffusion"],
                                              d / "diffusion.log")})
            report = evaluate(store, {"diffusion": d / "diffusion", "x2ct-gan": d / "x2ct-gan"}, d / "evaluation",
                              split="test", num_samples=args.num_samples, device="cpu", figure_cases=1,
                              command=" ".join(sys.argv), progress=False)
        spent = {t: _cpu_seconds(d / t) for t in TASKS}
        rows = {row["method"]: {m: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items()}
                                for m, s in row["metrics"].items()} for row in report["summary"]}
        figures["budgets"][f"{budget:g}"] = {
            "steps": steps, "cpu_seconds_spent": spent,
            "cpu_seconds_per_method": {"diffusion (VQ-GAN + diffusion)": round(spent["vqgan"] + spent["diffusion"], 1),
                                       "x2ct-gan": spent["x2ct-gan"], "mean-train-volume": 0.0},
            "evaluation": rows, "summary_md": shown_path(d / "evaluation" / "summary.md")}
        print((d / "evaluation" / "summary.md").read_text().split("\n\nCells:")[0], flush=True)
        print(f"CPU-seconds spent: {spent}", flush=True)
    figures["seconds"] = round(time.perf_counter() - t0, 1)
    figures["loadavg_before"] = [round(v, 2) for v in load_before]
    figures["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
    figures["note"] = ("CPU-seconds per step rise when other processes share the cores' caches; "
                       "compare the load averages recorded here")
    if not args.no_record:
        print("recorded", record("compute-matched", figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
