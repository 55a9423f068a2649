"""CNCL low-dose CT denoising on held-out phantoms at quarter dose: the low-dose input, non-local
means (scikit-image) and CNCL trained at ``cpu-demo`` scale, with bootstrap 95 % intervals.
(issue #15, item 2)

1. A store of ``--num`` phantoms (64³, 5.625 mm; the last 10 % test, the 10 % before them val)
   under ``--work``.
2. CNCL trained with the CLI's own entry point (``python -m launch.train cncl --preset cpu-demo
   --max-steps N``, under ``nice``), or ``--run PATH`` to reuse a run.
3. Each test phantom made quarter dose by :func:`patching.projection.lowdose.simulate_volume` (seeded per case
   with ``evaluate``'s :func:`case_seed`), then denoised by
   - ``nlm``: ``skimage.restoration.denoise_nl_means`` slice by slice (axial, as the noise is made
     and as CNCL works), ``h = 0.8·σ̂`` with σ̂ from ``estimate_sigma`` of the slice, 5² patches,
     13² search window (scikit-image's documented starting point);
   - ``cncl``: :func:`gan_baselines.cncl.denoise.denoise_hu` (the sliding window of
     ``xray2ct denoise``).
4. PSNR (data range 2624 HU = the preset's window [-1024, 1600], both clipped to it), 3D SSIM (same
   range) and MAE in HU (:mod:`patching.metrics.scores`) of each against the clean phantom, per case; mean
   and percentile-bootstrap 95 % CI over cases (:func:`patching.metrics.scores.bootstrap_ci`), and paired
   differences against the low-dose input.
5. The simulator: noise std at full, half and quarter dose in a uniform water disk (against the
   noiseless reconstruction) and the process CPU time of its torch projector + FBP against
   scikit-image's ``radon`` + ``iradon`` on the same slices, in this process.

Run (the figures in docs/gan_baselines.md and docs/results.md)::

    nice -n 5 .venv/bin/python benchmarks/eval_cncl.py --work /tmp/cncl-bench --steps 600

``--no-record`` skips writing ``benchmarks/results/cncl-cpu-demo-cpu.json``.
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

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks._common import record  # noqa: E402
from gan_baselines.cncl.denoise import denoise_hu, load_denoiser  # noqa: E402
from launch.evaluate_methods import case_seed  # noqa: E402
from patching.data.store import Store  # noqa: E402
from patching.data.synth_store import synthesize  # noqa: E402
from patching.metrics.scores import bootstrap_ci, mae_hu, psnr, ssim3d  # noqa: E402
from patching.projection.lowdose import (
    QUARTER_DOSE,
    LowDoseScanner,
    default_angles,
    fbp,
    radon,
    reconstruct_hu,
    scan,
    simulate_volume,  # noqa: E402
)

REPO = Path(__file__).resolve().parents[1]
WINDOW = (-1024.0, 1600.0)  # the cpu-demo preset's HU window
RANGE = WINDOW[1] - WINDOW[0]
METRICS = ("psnr", "ssim", "mae_hu")


def train(store: Path, out: Path, steps: int, threads: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONPATH=str(REPO))
    cmd = ["nice", "-n", "5", sys.executable, "-m", "launch.train", "cncl", "--store", str(store), "--preset",
           "cpu-demo", "--output-dir", str(out), "--max-steps", str(steps), "--resume", "latest",
           "--set", "train.ckpt_every=200", "train.num_workers=1", "train.log_every=50"]
    t = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, env=env, check=True)
    return time.perf_counter() - t


def nlm(volume: np.ndarray) -> np.ndarray:
    from skimage.restoration import denoise_nl_means, estimate_sigma

    out = np.empty_like(volume)
    for z in range(volume.shape[2]):
        s = volume[:, :, z]
        sigma = float(estimate_sigma(s))
        out[:, :, z] = denoise_nl_means(s, h=0.8 * sigma, sigma=sigma, patch_size=5, patch_distance=6, fast_mode=True)
    return out


def scores(pred: np.ndarray, truth: np.ndarray) -> dict:
    return {"psnr": psnr(pred, truth, RANGE, window=WINDOW), "ssim": ssim3d(pred, truth, RANGE, window=WINDOW),
            "mae_hu": mae_hu(pred, truth, window=WINDOW)}


def summary(values: list[float]) -> dict:
    m, lo, hi = bootstrap_ci(values)
    return {"mean": round(m, 4), "lo": round(lo, 4), "hi": round(hi, 4), "n": len(values)}


def simulator_checks() -> dict:
    """Noise std vs dose in a 100 mm water disk (2 mm pixels, 64², 6 slices) and the projector's CPU time."""
    from skimage.transform import iradon
    from skimage.transform import radon as sk_radon

    n, slices = 64, 6
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    hu = torch.from_numpy(np.where(xx**2 + yy**2 < 25**2, 0.0, -1000.0).astype(np.float32))[None].repeat(slices, 1, 1)
    stds = {}
    for dose in (1.0, 0.5, 0.25):
        angles, line, noisy = scan(hu, 2.0, dose, [np.random.default_rng(s) for s in range(slices)])
        diff = reconstruct_hu(noisy, angles, n, 2.0) - reconstruct_hu(line, angles, n, 2.0)
        stds[str(dose)] = round(float(diff[:, 22:42, 22:42].std()), 3)
    timing = {}
    for size in (64, 128):
        imgs = np.random.default_rng(0).random((8, size, size)).astype(np.float32)
        th = default_angles(size)
        t = time.process_time()
        for im in imgs:
            iradon(sk_radon(im, th, circle=False), th, output_size=size, circle=False)
        t_sk = time.process_time() - t
        t = time.process_time()
        fbp(radon(torch.from_numpy(imgs), th), th, size)
        t_torch = time.process_time() - t
        timing[f"{size}x{size}x8_slices_{len(th)}_views"] = {"skimage_cpu_s": round(t_sk, 3), "torch_cpu_s": round(t_torch, 3),
                                                             "ratio": round(t_sk / t_torch, 2)}
    return {"noise_std_hu_water_disk": stds, "quarter_over_full": round(stds["0.25"] / stds["1.0"], 3),
            "half_over_full": round(stds["0.5"] / stds["1.0"], 3),
            "projector_cpu_time_torch_threads": torch.get_num_threads(), "projector_cpu_time": timing}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/cncl-bench"))
    p.add_argument("--num", type=int, default=80, help="phantoms (last 10 %% test)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--run", type=Path, default=None, help="a trained cncl run to reuse")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dose", type=float, default=QUARTER_DOSE)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="cncl-cpu-demo")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    store_path = args.work / "store.zarr"
    if not store_path.exists() or len(Store(store_path).case_ids()) < args.num:
        synthesize(Store(store_path, create=True), args.num, (64, 64, 64), views=("pa",), xray_size=64,
                   workers=1, progress=True)
    store = Store(store_path)
    run, train_s = args.run, None
    if run is None:
        run = args.work / "run"
        train_s = train(store_path, run, args.steps, args.threads)
    loaded = load_denoiser(run)
    methods = ("lowdose", "nlm", "cncl")
    per_case, seconds = [], {m: 0.0 for m in methods}
    for cid in store.case_ids("test"):
        case = store.case(cid)
        truth = np.asarray(case.ct[...], dtype=np.float32)
        t = time.perf_counter()
        low = simulate_volume(truth, case.spacing_mm, args.dose, seed=case_seed(args.seed, cid))
        seconds["lowdose"] += time.perf_counter() - t
        outs = {"lowdose": low}
        t = time.perf_counter()
        outs["nlm"] = nlm(low)
        seconds["nlm"] += time.perf_counter() - t
        t = time.perf_counter()
        outs["cncl"] = denoise_hu(loaded, low, WINDOW)
        seconds["cncl"] += time.perf_counter() - t
        row = {"case_id": cid, **{m: scores(outs[m], truth) for m in methods}}
        per_case.append(row)
        print(cid, json.dumps({m: {k: round(v, 3) for k, v in row[m].items()} for m in methods}))
    table = {m: {k: summary([r[m][k] for r in per_case]) for k in METRICS} for m in methods}
    paired = {m: {k: summary([r[m][k] - r["lowdose"][k] for r in per_case]) for k in METRICS} for m in ("nlm", "cncl")}
    metrics_log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    figures = {
        "command": "nice -n 5 .venv/bin/python benchmarks/eval_cncl.py " + " ".join(sys.argv[1:]),
        "store": {"num": args.num, "shape": [64, 64, 64], "spacing_mm": list(store.case(store.case_ids("test")[0]).spacing_mm),
                  "test_cases": store.case_ids("test")},
        "dose": args.dose, "scanner": {"photons_full_dose": LowDoseScanner().photons,
                                       "electronic_std": LowDoseScanner().electronic_std},
        "cncl": {"run_steps": max(r["step"] for r in metrics_log), "train_wall_s": train_s,
                 "weights": loaded.weights, "threads": args.threads},
        "conventions": {"psnr": "10 log10(2624^2 / MSE), both clipped to [-1024, 1600] HU, whole 64^3 volume",
                        "ssim": "3D Gaussian SSIM (sigma 1.5), L = 2624 HU, same clip", "mae_hu": "same clip",
                        "ci": "percentile bootstrap 95 % over test cases, 1000 resamples, seed 0"},
        "table": table, "paired_vs_lowdose": paired, "per_case": per_case,
        "wall_s_all_test_cases": {k: round(v, 2) for k, v in seconds.items()},
        "simulator": simulator_checks(),
        "note": "wall times on a 2-core machine shared with other jobs; CPU-time ratios are in one process",
    }
    print(markdown(figures))
    if not args.no_record:
        print("recorded", record(args.name, figures))
    return 0


def markdown(fig: dict) -> str:
    names = {"lowdose": "quarter-dose input", "nlm": "non-local means (scikit-image)", "cncl": "CNCL (cpu-demo)"}
    lines = ["| method | PSNR dB [95 % CI] | SSIM [95 % CI] | MAE HU [95 % CI] |", "|---|---:|---:|---:|"]
    for m, label in names.items():
        cells = []
        for k, d in (("psnr", 2), ("ssim", 4), ("mae_hu", 1)):
            s = fig["table"][m][k]
            cells.append(f"{s['mean']:.{d}f} [{s['lo']:.{d}f}, {s['hi']:.{d}f}]")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("| paired vs input | ΔPSNR dB [95 % CI] | ΔSSIM [95 % CI] | ΔMAE HU [95 % CI] |")
    lines.append("|---|---:|---:|---:|")
    for m in ("nlm", "cncl"):
        cells = []
        for k, d in (("psnr", 2), ("ssim", 4), ("mae_hu", 1)):
            s = fig["paired_vs_lowdose"][m][k]
            cells.append(f"{s['mean']:+.{d}f} [{s['lo']:+.{d}f}, {s['hi']:+.{d}f}]")
        lines.append(f"| {names[m]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
