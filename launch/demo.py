"""``xray2ct demo``: the whole system on synthetic chest phantoms, on a CPU, in about 12 minutes
on 2 idle cores.

    xray2ct demo --out demo_out

1. Synthesise ``--num`` chest CTPA phantoms (64³, 5.625 mm, ~30 % with emboli) with PA and
   lateral DRRs into a Zarr store (last 10 % test, 10 % before them val).
2. Train the ``cpu-demo`` VQ-GAN and the ``cpu-demo`` X2CT-GAN side by side, one process and one
   thread each, for a fixed number of optimizer steps (:data:`STEPS`).
3. Encode every case's latent with the VQ-GAN (``xray2ct encode``).
4. Train the ``cpu-demo`` latent diffusion model for its fixed number of steps on ``--threads``
   threads (default 2, whatever the machine).
5. Sample the first held-out case from its X-ray PNG files with both models (NIfTI, Zarr,
   tri-planar PNG each; ``xray2ct sample``).
6. Evaluate every method and the mean training volume on the test split (``xray2ct
   evaluate``; diffusion as one sample and as the mean of ``--num-samples`` samples, labelled):
   the table is printed and written with its figures.

Reproducibility: every training has a step budget and a fixed seed, and the VQ-GAN and X2CT-GAN
always run on exactly one thread, so the table does not depend on how fast or how busy the
machine is (``--minutes`` adds an optional wall-clock cap per stage; a run it stops early is no
longer reproducible, and ``demo.json`` records the steps reached). Thread counts are fixed per
stage, never taken from the machine or the caller's environment (tested: the same table from a
1-thread and a 3-thread caller): a different ``--threads`` changes the diffusion stage's
floating-point reduction order (its gradient norm differs in the 7th digit after 3 steps), so
its table agrees within noise, not bit for bit. Training processes run with
``OMP_WAIT_POLICY=PASSIVE`` so that OpenMP threads waiting at a barrier for a descheduled sibling
sleep instead of spinning on the core a competing program needs (``benchmarks/bench_threads.py``).

Trainings run as ``python -m launch.train`` subprocesses (their logs in ``DIR/logs``) with the
same flags a user would type; a second ``demo`` into the same directory re-uses finished
phantoms and resumes every training from its checkpoint (``--resume latest``): a finished run
is at its budget already and is not trained further.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from launch.cli_data import inspect_table, write_image
from launch.presets import data_spec
from patching.data.preview import save_grid_png, triplanar_image
from patching.data.store import Store
from patching.data.synth_store import cpu_count, synthesize
from patching.errors import InputError

REPO = Path(__file__).resolve().parents[1]
NUM_STAGES = 6


def _stage(k: int, text: str) -> None:
    print(f"\n[{k}/{NUM_STAGES}] {text}", flush=True)


def _last_step(run: Path) -> int:
    """The newest logged step of a run (``metrics.jsonl``), 0 before the first log."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return 0
    step = 0
    with path.open() as f:
        for line in f:
            try:
                step = int(json.loads(line).get("step", step))
            except (ValueError, AttributeError):
                continue  # a line being written
    return step


# Optimizer steps per model: ~10 min of training on 2 idle cores (VQ-GAN ‖ X2CT-GAN one core
# each, then diffusion), sized from per-step process CPU time (docs/results.md).
STEPS = {"vqgan": 600, "x2ct-gan": 350, "diffusion": 1600}


def train(tasks: dict[str, int], store: Path, runs: Path, logs: Path, threads: int,
          minutes: float | None = None) -> dict[str, dict]:
    """Train ``tasks`` (name → step budget) concurrently as ``launch.train`` subprocesses with
    ``threads`` threads each (``OMP_WAIT_POLICY=PASSIVE``), each to its step budget (and for at
    most ``minutes`` of wall time when given); a tqdm bar shows every run's steps. Raises
    ``RuntimeError`` with the tail of the log of a run that fails."""
    from tqdm.auto import tqdm

    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    procs, files = {}, []
    t0 = time.perf_counter()
    try:
        for name, steps in tasks.items():
            out = runs / name
            cmd = [sys.executable, "-m", "launch.train", name, "--store", str(store), "--preset", "cpu-demo",
                   "--output-dir", str(out), "--resume", "latest", "--max-steps", str(steps),
                   "--set", f"train.max_minutes={minutes or 0}", "train.val_every=0", "train.ckpt_every=0",
                   "train.log_every=10", "train.num_workers=0"]
            log = (logs / f"{name}.log").open("a")
            files.append(log)
            log.write(" ".join(cmd) + "\n\n")
            log.flush()
            procs[name] = (subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), out)
        total = sum(tasks.values())
        with tqdm(total=total, unit="step", desc="training", dynamic_ncols=True, file=sys.stdout,
                  bar_format="{desc}: {bar} {n:.0f}/{total:.0f} steps [{elapsed}]{postfix}") as bar:
            def show() -> None:
                bar.n = sum(_last_step(o) for _, o in procs.values())
                bar.set_postfix_str(", ".join(f"{n} {_last_step(o)}/{tasks[n]}" for n, (_, o) in procs.items()))

            while any(p.poll() is None for p, _ in procs.values()):
                time.sleep(1.0)
                show()
            show()
    except BaseException:
        for p, _ in procs.values():
            if p.poll() is None:
                p.terminate()  # the engine checkpoints and exits 0 on SIGTERM
        for p, _ in procs.values():
            p.wait()
        raise
    finally:
        for f in files:
            f.close()
    result = {}
    for name, (p, out) in procs.items():
        if p.returncode != 0:
            tail = (logs / f"{name}.log").read_text().strip().splitlines()[-5:]
            raise RuntimeError(f"training {name} failed (exit {p.returncode}); log {logs / f'{name}.log'}:\n  "
                               + "\n  ".join(tail))
        steps = _last_step(out)
        result[name] = {"steps": steps, "budget_steps": tasks[name], "cpu_seconds": _cpu_seconds(out),
                        "run": str(out), "threads": threads, "max_minutes": minutes or 0,
                        "reached_budget": steps >= tasks[name]}
    print("  " + ", ".join(f"{n}: {r['steps']} steps ({r['cpu_seconds']:.0f} CPU-s)" for n, r in result.items())
          + f" in {time.perf_counter() - t0:.0f} s", flush=True)
    short = [n for n, r in result.items() if not r["reached_budget"]]
    if short:
        print(f"  note: --minutes stopped {', '.join(short)} before the step budget: this table is not the "
              "reproducible one", flush=True)
    return result


def _cpu_seconds(run: Path) -> float:
    """Process CPU seconds the run's invocations logged (``cpu_s`` of each one's last log line)."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return 0.0
    total, last, prev_step = 0.0, 0.0, -1
    with path.open() as f:
        for line in f:
            try:
                rec = json.loads(line)
                cpu, step = float(rec.get("cpu_s", 0.0)), int(rec.get("step", 0))
            except (ValueError, AttributeError, TypeError):
                continue
            if cpu < last or step <= prev_step:  # a resumed invocation starts its clock again
                total += last
            last, prev_step = cpu, step
    return round(total + last, 1)


def _export_xrays(store: Store, case_id: str, out: Path) -> dict[str, Path]:
    """The case's stored X-rays as 8-bit PNG files (``write_image``): the demo samples from files,
    like a user."""
    case = store.case(case_id)
    paths = {}
    for view in case.views():
        path = out / f"{case_id}-{view}.png"
        write_image(str(path), case.xray(view))
        paths[view] = path
    return paths


def run_demo(args) -> int:
    t_start = time.perf_counter()
    out = Path(args.out).resolve()
    if out.exists() and not out.is_dir():
        raise InputError("--out", f"{out} exists and is not a directory")
    if not (math.isfinite(args.steps_scale) and args.steps_scale > 0):
        raise InputError("--steps-scale", f"must be a positive number, got {args.steps_scale}")
    for name in ("threads", "num_samples", "max_steps"):
        value = getattr(args, name)
        if value is not None and not value >= 1:
            raise InputError(f"--{name.replace('_', '-')}", f"must be a positive integer, got {value}")
    if args.minutes is not None and not (math.isfinite(args.minutes) and args.minutes > 0):
        raise InputError("--minutes", f"must be a positive number of minutes, got {args.minutes}")
    steps = {n: max(1, round(v * args.steps_scale)) for n, v in STEPS.items()}
    if args.max_steps is not None:
        steps = {n: min(v, args.max_steps) for n, v in steps.items()}
    if args.num < 10:
        raise InputError("--num", f"needs at least 10 phantoms (train, val and test splits), got {args.num}")
    out.mkdir(parents=True, exist_ok=True)
    logs, runs = out / "logs", out / "runs"
    logs.mkdir(exist_ok=True)
    runs.mkdir(exist_ok=True)
    timings: dict[str, float] = {}
    import torch

    torch.set_num_threads(args.threads)  # encoding, sampling and evaluation in this process
    spec = data_spec("cpu-demo")
    store_path = out / "phantoms.zarr"

    t = time.perf_counter()
    _stage(1, f"synthesising {args.num} chest CTPA phantoms {'×'.join(map(str, spec.shape))} "
              f"({spec.spacing_mm[0]:g} mm) with PA + lateral X-rays")
    store = Store(store_path, create=True)
    synthesize(store, args.num, spec.shape, seed=args.seed, emboli=0.3, workers=cpu_count())
    print(inspect_table(store).splitlines()[-1])
    rows = []
    for cid in store.case_ids()[:3]:
        c = store.case(cid)
        rows.append(triplanar_image(np.asarray(c.ct[...]), c.spacing_mm,
                                    xrays={v: c.xray(v) for v in c.views()}, title=cid, height=160))
    save_grid_png(out / "phantoms_preview.png", rows)
    timings["synthesise"] = time.perf_counter() - t

    t = time.perf_counter()
    _stage(2, f"training the cpu-demo VQ-GAN ({steps['vqgan']} steps) and X2CT-GAN ({steps['x2ct-gan']} steps) "
              f"side by side, one thread each (logs: {logs})")
    runs_info = train({"vqgan": steps["vqgan"], "x2ct-gan": steps["x2ct-gan"]}, store_path, runs, logs, 1, args.minutes)
    timings["train_vqgan_x2ctgan"] = time.perf_counter() - t

    t = time.perf_counter()
    _stage(3, "encoding every case's stage-1 latent")
    from stage1_vqgan.encode import encode_store

    enc = encode_store(store_path, runs / "vqgan", device="cpu", progress=True)
    print(f"  {len(enc['encoded'])} encoded, {len(enc['skipped'])} already current; "
          f"latent scale factor {enc['latent_scale_factor']:.4g}")
    timings["encode"] = time.perf_counter() - t

    t = time.perf_counter()
    _stage(4, f"training the cpu-demo latent diffusion model ({steps['diffusion']} steps) on {args.threads} thread(s)")
    runs_info.update(train({"diffusion": steps["diffusion"]}, store_path, runs, logs, args.threads, args.minutes))
    timings["train_diffusion"] = time.perf_counter() - t

    t = time.perf_counter()
    test_ids = store.case_ids("test")
    case_id = test_ids[0]
    _stage(5, f"reconstructing held-out case {case_id} from its X-ray PNG files")
    xrays = _export_xrays(store, case_id, _mkdir(out / "xrays"))
    from launch.tasks import RECONSTRUCTOR_HINTS, RECONSTRUCTORS
    from patching.artifacts.reconstruct import load_reconstructor, sample_files

    samples = {name: sample_files(load_reconstructor(runs / name, RECONSTRUCTORS, RECONSTRUCTOR_HINTS, device="cpu"), xrays.get("pa"), xrays.get("lateral"),
                                  out / "samples" / name, seed=args.seed, progress=False)
               for name in ("diffusion", "x2ct-gan")}
    for name, files in samples.items():
        print(f"  {name:10s} {files['nifti']}   {files['preview']}")
    timings["sample"] = time.perf_counter() - t

    t = time.perf_counter()
    _stage(6, f"evaluating on the {len(test_ids)} test cases (and the mean training volume)")
    from launch.evaluate import evaluate

    report = evaluate(store_path, {"diffusion": runs / "diffusion", "x2ct-gan": runs / "x2ct-gan"},
                      out / "evaluation", split="test", seed=args.seed, figure_cases=1, device="cpu",
                      num_samples=args.num_samples)
    timings["evaluate"] = time.perf_counter() - t
    total = time.perf_counter() - t_start

    summary = (out / "evaluation" / "summary.md").read_text()
    print("\n" + summary.strip())
    meta = {"seconds": {k: round(v, 1) for k, v in timings.items()} | {"total": round(total, 1)},
            "runs": runs_info, "num_phantoms": args.num, "test_cases": test_ids, "sampled_case": case_id,
            "cpus": cpu_count(), "threads": args.threads, "argv": sys.argv, "failures": report.get("failures", {})}
    (out / "demo.json").write_text(json.dumps(meta, indent=1))
    figures = sorted((out / "evaluation" / "figures").glob("*.png"))
    print(f"\ndone in {total / 60:.1f} min ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())})")
    print(f"  table     {out / 'evaluation' / 'summary.md'} (also .csv, results.json)")
    if figures:
        print(f"  figure    {figures[0]}")
    print(f"  samples   {out / 'samples'} (NIfTI, Zarr, PNG per method)")
    print(f"  runs      {runs} (checkpoints; logs in {logs})")
    return 2 if report.get("failures") else 0


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
