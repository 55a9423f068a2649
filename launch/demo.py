"""``xray2ct demo``: the whole system on synthetic chest phantoms, on a CPU, in about 11 minutes
on 2 cores.

    xray2ct demo --out demo_out

1. Synthesise ``--num`` chest CTPA phantoms (64³, 5.625 mm, ~30 % with emboli) with PA and
   lateral DRRs into a Zarr store (last 10 % test, 10 % before them val).
2. Train the ``cpu-demo`` VQ-GAN and the ``cpu-demo`` X2CT-GAN side by side, one core each,
   for ``--vqgan-minutes`` (``train.max_minutes``: the run stops after the step that spends
   the budget, with a checkpoint).
3. Encode every case's latent with the VQ-GAN (``xray2ct encode``).
4. Train the ``cpu-demo`` latent diffusion model on both cores for ``--diffusion-minutes``.
5. Sample the first held-out case from its X-ray PNG files with both models (NIfTI, Zarr,
   tri-planar PNG each; ``xray2ct sample``).
6. Evaluate every method and the mean training volume on the test split
   (``xray2ct evaluate``): the table is printed and written with its figures.

Trainings run as ``python -m launch.train`` subprocesses (their logs in ``DIR/logs``) with the
same flags a user would type; a second ``demo`` into the same directory re-uses finished
phantoms and resumes every training from its checkpoint (``--resume latest``), training each
for its budget again. Budgets are wall time, so the steps reached depend on the machine; every
run records its steps in ``DIR/demo.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from launch.cli_data import inspect_table, write_image
from launch.presets import data_spec
from patching.errors import InputError
from patching.preview import save_grid_png, triplanar_image
from patching.store import Store
from patching.synth_store import cpu_count, synthesize

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


def train(tasks: dict[str, list[str]], store: Path, runs: Path, logs: Path, minutes: float, threads: int,
          max_steps: int | None) -> dict[str, dict]:
    """Train ``tasks`` (name → extra ``--set`` overrides) concurrently as ``launch.train``
    subprocesses with ``threads`` threads each, for ``minutes`` of wall time each; a tqdm bar
    shows the wall clock and every run's last logged step. Raises ``RuntimeError`` with the tail of
    the log of a run that fails."""
    from tqdm.auto import tqdm

    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    procs, files = {}, []
    t0 = time.perf_counter()
    try:
        for name, sets in tasks.items():
            out = runs / name
            cmd = [sys.executable, "-m", "launch.train", name, "--store", str(store), "--preset", "cpu-demo",
                   "--output-dir", str(out), "--resume", "latest", "--max-steps", str(max_steps or 1_000_000),
                   "--set", f"train.max_minutes={minutes}", "train.val_every=0", "train.ckpt_every=0",
                   "train.log_every=10", "train.num_workers=0", *sets]
            log = (logs / f"{name}.log").open("w")
            files.append(log)
            log.write(" ".join(cmd) + "\n\n")
            log.flush()
            procs[name] = (subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), out)
        total = max(1, round(minutes * 60))
        with tqdm(total=total, unit="s", desc="training", dynamic_ncols=True, file=sys.stdout,
                  bar_format="{desc}: {bar} {n:.0f}/{total:.0f} s{postfix}") as bar:
            while any(p.poll() is None for p, _ in procs.values()):
                time.sleep(1.0)
                bar.n = min(total, time.perf_counter() - t0)
                bar.set_postfix_str(", ".join(f"{n} step {_last_step(o)}" for n, (_, o) in procs.items()))
            bar.n = min(total, time.perf_counter() - t0)
            bar.set_postfix_str(", ".join(f"{n} step {_last_step(o)}" for n, (_, o) in procs.items()))
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
        result[name] = {"steps": _last_step(out), "run": str(out), "minutes": minutes, "threads": threads}
    print("  " + ", ".join(f"{n}: {r['steps']} steps" for n, r in result.items())
          + f" in {time.perf_counter() - t0:.0f} s", flush=True)
    return result


def _export_xrays(store: Store, case_id: str, out: Path) -> dict[str, Path]:
    """The case's stored X-rays as 16-bit PNG files: the demo samples from files, like a user."""
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
    for name in ("vqgan_minutes", "diffusion_minutes"):
        if not getattr(args, name) > 0:
            raise InputError(f"--{name.replace('_', '-')}", f"must be a positive number of minutes, got {getattr(args, name)}")
    if args.num < 10:
        raise InputError("--num", f"needs at least 10 phantoms (train, val and test splits), got {args.num}")
    out.mkdir(parents=True, exist_ok=True)
    logs, runs = out / "logs", out / "runs"
    logs.mkdir(exist_ok=True)
    runs.mkdir(exist_ok=True)
    timings: dict[str, float] = {}
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
    _stage(2, f"training the cpu-demo VQ-GAN and X2CT-GAN side by side, one core each, "
              f"{args.vqgan_minutes:g} min (logs: {logs})")
    runs_info = train({"vqgan": [], "x2ct-gan": []}, store_path, runs, logs, args.vqgan_minutes, 1, args.max_steps)
    timings["train_vqgan_x2ctgan"] = time.perf_counter() - t

    t = time.perf_counter()
    _stage(3, "encoding every case's stage-1 latent")
    from stage1_vqgan.encode import encode_store

    enc = encode_store(store_path, runs / "vqgan", device="cpu", progress=True)
    print(f"  {len(enc['encoded'])} encoded, {len(enc['skipped'])} already current; "
          f"latent scale factor {enc['latent_scale_factor']:.4g}")
    timings["encode"] = time.perf_counter() - t

    t = time.perf_counter()
    _stage(4, f"training the cpu-demo latent diffusion model on {min(2, cpu_count())} cores, "
              f"{args.diffusion_minutes:g} min")
    runs_info.update(train({"diffusion": []}, store_path, runs, logs, args.diffusion_minutes,
                           min(2, cpu_count()), args.max_steps))
    timings["train_diffusion"] = time.perf_counter() - t

    t = time.perf_counter()
    test_ids = store.case_ids("test")
    case_id = test_ids[0]
    _stage(5, f"reconstructing held-out case {case_id} from its X-ray PNG files")
    xrays = _export_xrays(store, case_id, _mkdir(out / "xrays"))
    from launch.tasks import load_reconstructor
    from patching.reconstruct import sample_files

    samples = {name: sample_files(load_reconstructor(runs / name, device="cpu"), xrays.get("pa"), xrays.get("lateral"),
                                  out / "samples" / name, seed=args.seed, progress=False)
               for name in ("diffusion", "x2ct-gan")}
    for name, files in samples.items():
        print(f"  {name:10s} {files['nifti']}   {files['preview']}")
    timings["sample"] = time.perf_counter() - t

    t = time.perf_counter()
    _stage(6, f"evaluating on the {len(test_ids)} test cases (and the mean training volume)")
    from launch.evaluate import evaluate

    report = evaluate(store_path, {"diffusion": runs / "diffusion", "x2ct-gan": runs / "x2ct-gan"},
                      out / "evaluation", split="test", seed=args.seed, figure_cases=1, device="cpu")
    timings["evaluate"] = time.perf_counter() - t
    total = time.perf_counter() - t_start

    summary = (out / "evaluation" / "summary.md").read_text()
    print("\n" + summary.strip())
    meta = {"seconds": {k: round(v, 1) for k, v in timings.items()} | {"total": round(total, 1)},
            "runs": runs_info, "num_phantoms": args.num, "test_cases": test_ids, "sampled_case": case_id,
            "cpus": cpu_count(), "argv": sys.argv, "failures": report.get("failures", {})}
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
