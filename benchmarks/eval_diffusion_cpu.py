"""The ``cpu-demo`` latent diffusion model on held-out phantoms: does it beat the mean training
volume, are its decoded samples seam-free, and how does windowed denoising compare with
whole-latent denoising once the model is trained? (issue: stage 2, section 5)

1. A store of ``--num`` phantoms (64³, 5.625 mm, PA + lateral 128² DRRs, 30 % with emboli; last
   10 % test) under ``--work``, encoded with the ``--vqgan`` checkpoint (``xray2ct encode``).
2. The diffusion model: ``--diffusion PATH``, or trained here with the CLI's own entry point
   (``python -m launch.train diffusion --preset cpu-demo --max-steps --diffusion-steps``).
3. ``xray2ct evaluate`` (its Python API) on the test split with ``--num-samples K``: the first
   sample (``diffusion``), the mean of K (``diffusion-meanK``), any ``--method NAME=PATH`` given,
   and the mean training volume. Paired per-case differences against the mean volume with
   bootstrap 95 % CIs for PSNR and the projection-consistency PSNR (PA, lateral).
4. Seams: each test case's first-sample latent decoded with the VQ-GAN's tiled codec and in one
   tile (no borders at all); the seam-band error ratio against the ground truth
   (:func:`patching.tiling.seams.seam_ratio`, bands 2 voxels either side of every interior border of
   the codec's grid, pooled over the test cases) of both. The one-tile decode is the in-process
   baseline: equal ratios mean the tiling adds no seams.
5. Windowed vs whole-latent denoising with the trained model: the same seed sampled with
   ``--window`` latent windows (Gaussian-blended at every step) and whole; relative L2 between
   the latents and PSNR of both decodes against the ground truth.

Run (the figures in docs/stage2_diffusion.md)::

    .venv/bin/python benchmarks/eval_diffusion_cpu.py --work /tmp/d6 --vqgan /tmp/vqbench/run \\
        --diffusion /tmp/d6/diff --method x2ct-gan=/tmp/ganeval40-800/x2ct-gan

``--no-record`` skips writing ``benchmarks/results/diffusion-cpu-demo-cpu.json``.
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
from launch.evaluate import evaluate  # noqa: E402
from launch.evaluate_methods import case_seed  # noqa: E402
from patching.data.store import Store  # noqa: E402
from patching.data.synth_store import synthesize  # noqa: E402
from patching.metrics.scores import bootstrap_ci, psnr  # noqa: E402
from patching.tiling.seams import seam_ratio, tile_border_planes  # noqa: E402
from stage1_vqgan.encode import encode_store  # noqa: E402
from stage2_diffusion.pipeline import DiffusionReconstructor  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WINDOW = (-1024.0, 1600.0)  # the cpu-demo preset's HU window
PAIRED = ("psnr", "proj_psnr_pa", "proj_psnr_lateral", "ssim", "mae_hu")


def train_diffusion(store: Path, out: Path, steps: int, threads: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "launch.train", "diffusion", "--store", str(store), "--preset", "cpu-demo",
           "--output-dir", str(out), "--max-steps", str(steps), "--resume", "latest",
           "--set", "train.ckpt_every=500", "train.keep_last=10", "train.num_workers=0", "train.log_every=50"]
    t = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, env=env, check=True)
    return time.perf_counter() - t


def paired(report: dict, method: str, baseline: str = "mean-train-volume") -> dict:
    """Per-case ``method − baseline`` differences: mean and bootstrap 95 % CI per metric."""
    rows = {(r["case_id"], r["method"]): r for r in report["per_case"]}
    out = {}
    for key in PAIRED:
        d = [rows[(c, method)][key] - rows[(c, baseline)][key] for c in report["cases"]
             if rows.get((c, method), {}).get(key) is not None and rows.get((c, baseline), {}).get(key) is not None]
        if d:
            m, lo, hi = bootstrap_ci(d)
            out[key] = {"mean": round(m, 4), "lo": round(lo, 4), "hi": round(hi, 4), "n": len(d),
                        "wins": int(sum(x > 0 for x in d) if key != "mae_hu" else sum(x < 0 for x in d))}
    return out


def seams_and_windows(rec: DiffusionReconstructor, store: Store, cases: list[str], seed: int,
                      window: tuple[int, int, int], overlap: float) -> dict:
    codec = rec.vq.codec
    f = rec.volume_shape[0] // rec.latent_shape[0]
    planes = [tile_border_planes(n, t * f, codec.overlap, f) for n, t in zip(rec.volume_shape, codec.tile_latent)]
    tiled, whole, rel, psnr_w, psnr_whole, diff_hu = [], [], [], [], [], []
    for cid in cases:
        case = store.case(cid)
        xr = {v: case.xray(v) for v in case.views()}
        truth = np.clip(np.asarray(case.ct[...], np.float32), *WINDOW)
        s = case_seed(seed, cid)  # the seed `evaluate` gave this case's first sample
        lat = rec.sample_latent(xr, seed=s, window=None)
        a = np.clip(rec.decode(lat).astype(np.float32), *WINDOW)
        b = np.clip(rec.decode(lat, tile_latent=rec.latent_shape).astype(np.float32), *WINDOW)
        tiled.append((a, truth))
        whole.append((b, truth))
        diff_hu.append(float(np.abs(a - b).mean()))
        lw = rec.sample_latent(xr, seed=s, window=window, overlap=overlap)
        rel.append(float((lw - lat).norm() / lat.norm()))
        psnr_whole.append(psnr(a, truth, WINDOW[1] - WINDOW[0]))
        psnr_w.append(psnr(np.clip(rec.decode(lw).astype(np.float32), *WINDOW), truth, WINDOW[1] - WINDOW[0]))
    r_tiled, r_whole = seam_ratio(tiled, planes), seam_ratio(whole, planes)
    return {
        "seams": {"codec_tile_latent": list(codec.tile_latent), "codec_overlap": codec.overlap,
                  "border_planes": planes, "band_voxels": 2, "ratio_tiled_decode": round(r_tiled, 4),
                  "ratio_one_tile_decode": round(r_whole, 4), "ratio_tiled_over_one_tile": round(r_tiled / r_whole, 4),
                  "mean_abs_tiled_minus_one_tile_hu": round(float(np.mean(diff_hu)), 3)},
        "windowed_vs_whole": {"window": list(window), "overlap": overlap,
                              "latent_relative_l2": [round(x, 4) for x in rel],
                              "latent_relative_l2_mean": round(float(np.mean(rel)), 4),
                              "psnr_whole_db": round(float(np.mean(psnr_whole)), 3),
                              "psnr_windowed_db": round(float(np.mean(psnr_w)), 3)},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/xray2ct-diffusion-bench"))
    p.add_argument("--num", type=int, default=64)
    p.add_argument("--seed", type=int, default=1, help="phantom seed (the VQ-GAN benchmark trains on seed 0)")
    p.add_argument("--vqgan", type=Path, required=True, help="trained cpu-demo VQ-GAN (benchmarks/train_vqgan_cpu_demo.py)")
    p.add_argument("--diffusion", type=Path, default=None, help="trained diffusion run/checkpoint (else trained here)")
    p.add_argument("--diffusion-steps", type=int, default=4000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--method", action="append", default=[], metavar="NAME=PATH", help="more methods to score")
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--window", type=int, nargs=3, default=(8, 8, 8))
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--skip-eval", action="store_true", help="only the seam and windowed-vs-whole analyses")
    p.add_argument("--name", default="diffusion-cpu-demo", help="results file name (benchmarks/results/NAME-cpu.json)")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    store_path = args.work / "store.zarr"
    t0 = time.perf_counter()
    store = Store(store_path, create=True)
    synthesize(store, args.num, (64, 64, 64), seed=args.seed, emboli=0.3, workers=1, progress=False)
    enc = encode_store(store_path, args.vqgan, device="cpu", progress=False)
    figures: dict = {"store": {"num": args.num, "seed": args.seed, "test_cases": store.case_ids("test"),
                               "latent_scale_factor": enc["latent_scale_factor"]}}
    run = args.diffusion
    if run is None:
        run = args.work / "diffusion"
        figures["train_seconds"] = round(train_diffusion(store_path, run, args.diffusion_steps, args.threads), 1)
    if not args.skip_eval:
        methods = {"diffusion": run} | dict(m.split("=", 1) for m in args.method)
        report = evaluate(store_path, methods, args.work / "evaluation", split="test", num_samples=args.num_samples,
                          device="cpu", figure_cases=2, command=" ".join(sys.argv))
        k = args.num_samples
        figures["evaluation"] = {row["method"]: {m: round(v["mean"], 4) for m, v in row["metrics"].items()
                                                 if v.get("mean") is not None}
                                 for row in report["summary"]}
        figures["paired_vs_mean_volume"] = {name: paired(report, name)
                                            for name in ["diffusion"] + ([f"diffusion-mean{k}"] if k > 1 else [])
                                            + [m.split("=", 1)[0] for m in args.method]}
    rec = DiffusionReconstructor(run, device="cpu")
    figures["model"] = {"step": rec.step, "weights": rec.weights, "sampler": rec.cfg.sampler.name, "steps": rec.steps,
                        "guidance": rec.guidance}
    figures |= seams_and_windows(rec, store, store.case_ids("test"), 0, tuple(args.window), args.overlap)
    figures["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(figures, indent=1))
    if not args.skip_eval:
        print((args.work / "evaluation" / "summary.md").read_text())
    if not args.no_record:
        print("recorded", record(args.name, figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
