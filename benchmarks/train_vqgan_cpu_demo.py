"""The ``cpu-demo`` VQ-GAN trained on a CPU for at most ``--max-minutes`` (wall), then held-out
phantoms encoded and decoded whole through the tiled codec: PSNR on [-1, 1] (data range 2.0)
and in HU (data range = the HU window width, 2624 HU).

1. A store of ``--num`` chest phantoms (64³, 5.625 mm; the last 10 % test, the 10 % before
   them val) under ``--work`` (re-used when present; no X-rays: the VQ-GAN does not read them).
2. Training in this process on the shared engine (``launch.engine.Trainer``, the same object
   ``xray2ct train vqgan --preset cpu-demo`` runs; extra ``--set`` overrides pass through).
   A timer sends this process SIGTERM at the wall budget — the engine finishes the step, writes
   a checkpoint and returns. The task's validation (EMA weights, ``--val-tiles`` of the val
   split's grid tiles, every ``--val-every`` steps) logs the learning curve; with ``--stop-at``
   it also stops the run once its tile PSNR reaches that. The training wall time includes
   validations and checkpoints.
3. The EMA weights are read back from the checkpoint (:func:`stage1_vqgan.encode.load_vqgan`),
   and every val and test phantom goes through ``encode_volume`` → ``decode_latent`` (codec tiles
   32³ / 8³, overlap 0.25, Gaussian blending). PSNR from the pooled MSE per split, SSIM
   (:func:`patching.metrics.scores.ssim3d` on HU, data range 2624, as docs/metrics.md), MAE in HU; the
   ground truth is the phantom clipped to the HU window (what the model is trained to reproduce).

Run (about 11 minutes on the project's 2 shared cores; the recorded run)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_vqgan_cpu_demo.py --work /tmp/vqbench --max-minutes 10 \
        --val-every 200 --set disc.start_step=100000

``disc.start_step=100000`` keeps the adversarial phase out of the 10 minutes: with the preset's
start at step 100 the reconstruction L1 doubled once the discriminator came in (docs/stage1_vqgan.md).

``--no-record`` skips writing ``benchmarks/results/vqgan-cpu-demo-cpu.json``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks._common import record  # noqa: E402
from patching.data.spec import hu_to_unit, unit_to_hu  # noqa: E402
from patching.data.store import Store  # noqa: E402
from patching.data.synth_store import synthesize  # noqa: E402
from patching.metrics.scores import psnr, ssim3d  # noqa: E402
from stage1_vqgan.codec import decode_latent, encode_volume  # noqa: E402
from stage1_vqgan.encode import load_vqgan  # noqa: E402
from stage1_vqgan.task import VQGANTask  # noqa: E402

PRESET = "cpu-demo"


class TimedVQGANTask(VQGANTask):
    """The task, plus a log of validations and, optionally, a stop (SIGTERM to self) once the
    validation tile PSNR reaches ``stop_at``."""

    def __init__(self, stop_at: float | None, t0: float):
        super().__init__()
        self.stop_at, self.t0, self.history = stop_at, t0, []

    def validate(self, models, step, ctx):
        out = super().validate(models, step, ctx)
        if out:
            rec = {"step": step, "wall_s": round(time.perf_counter() - self.t0, 1),
                   **{k: round(float(v), 4) for k, v in out.items() if k != "preview"}}
            self.history.append(rec)
            print(f"[bench] val step {step} at {rec['wall_s']} s: psnr {rec['psnr']:.2f} dB, "
                  f"psnr_hu_window {rec['psnr_hu_window']:.2f} dB, ssim {rec['ssim']:.3f}", file=sys.stderr, flush=True)
            if self.stop_at is not None and rec["psnr"] >= self.stop_at:
                os.kill(os.getpid(), signal.SIGTERM)  # the engine stops after this step, checkpointed
        return out


def train(store: Path, run_dir: Path, args) -> dict:
    from launch.engine import Trainer
    from launch.presets import data_spec
    from launch.train import build_run_config

    t0 = time.perf_counter()
    task = TimedVQGANTask(args.stop_at, t0)
    sets = [f"train.val_every={args.val_every}", f"data.num_val_tiles={args.val_tiles}", "train.ckpt_every=0", *args.set]
    cfg = build_run_config(task, PRESET, sets, max_steps=args.max_steps)
    trainer = Trainer(task, cfg, task_ref="stage1_vqgan.task:VQGANTask", preset=PRESET, store=str(store),
                      output_dir=run_dir, data_spec=data_spec(PRESET))
    timer = threading.Timer(args.max_minutes * 60 - (time.perf_counter() - t0),
                            lambda: os.kill(os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        status = trainer.run()
    finally:
        timer.cancel()
    wall = time.perf_counter() - t0
    return {"status": status, "wall_s": round(wall, 1), "steps": trainer.state.step, "history": task.history,
            "config": {"lr": cfg.train.lr, "batch_size": cfg.train.batch_size, "ema_decay": cfg.train.ema_decay,
                       "tile": list(cfg.train_tile), "base_channels": cfg.model.base_channels,
                       "disc_start": cfg.disc.start_step, "overrides": sets}}


def evaluate(store: Store, run_dir: Path) -> dict:
    vq = load_vqgan(run_dir, "cpu")
    window, width = vq.hu_window, vq.hu_window[1] - vq.hu_window[0]
    out, t0 = {"weights": vq.reference["weights"], "step": vq.reference["step"]}, time.perf_counter()
    for split in ("val", "test"):
        se = se_hu = ae_hu = 0.0
        voxels, ssims, cases = 0, [], {}
        for cid in store.case_ids(split):
            ct = store.case(cid).ct
            latent = encode_volume(vq.model, ct, vq.codec.tile, vq.codec.overlap, hu_window=window)
            rec = decode_latent(vq.model, latent, vq.codec.tile_latent, vq.codec.overlap).clamp(-1, 1)  # (1, X, Y, Z)
            x = hu_to_unit(torch.from_numpy(np.asarray(ct[...])), window)[None]
            hu_x, hu_rec = unit_to_hu(x, window), unit_to_hu(rec, window)
            se += float(((rec.double() - x.double()) ** 2).sum())
            se_hu += float(((hu_rec.double() - hu_x.double()) ** 2).sum())
            ae_hu += float((hu_rec.double() - hu_x.double()).abs().sum())
            voxels += x.numel()
            ssims.append(ssim3d(hu_rec, hu_x, width, window=window))  # docs/metrics.md: on HU, range 2624
            cases[cid] = round(psnr(hu_rec, hu_x, width), 3)
        out[split] = {"psnr": round(float(10 * np.log10(4.0 / (se / voxels))), 3),
                      "psnr_hu_window": round(float(10 * np.log10(width**2 / (se_hu / voxels))), 3),
                      "mae_hu": round(ae_hu / voxels, 2), "ssim": round(float(np.mean(ssims)), 4),
                      "psnr_per_case": cases, "latent_shape": list(latent.shape)}
    out["eval_s"] = round(time.perf_counter() - t0, 1)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/xray2ct-vqgan-bench"))
    p.add_argument("--num", type=int, default=16, help="phantoms (64³)")
    p.add_argument("--max-minutes", type=float, default=10.0, help="wall budget of the training")
    p.add_argument("--max-steps", type=int, default=100_000)
    p.add_argument("--target", type=float, default=28.0, help="the figure to reach (whole volumes, dB, range 2)")
    p.add_argument("--stop-at", type=float, default=None,
                   help="stop once the validation *tile* PSNR reaches this (it runs ~2 dB below the whole-volume "
                        "figure: overlapping grid tiles count the volume centre, where the anatomy is, more often "
                        "than the air at the edges)")
    p.add_argument("--val-every", type=int, default=200)
    p.add_argument("--val-tiles", type=int, default=27, help="grid tiles per validation (0: all 54 of the val split)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is faster on a loaded 2-core VM)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, as xray2ct train")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()

    store_path = args.work / "store"
    t = time.perf_counter()
    store = Store(store_path, create=True)
    synthesize(store, args.num, (64, 64, 64), views=(), workers=2, progress=False)
    synth_s = time.perf_counter() - t
    print(f"[bench] {len(store)} phantoms in {store_path} ({synth_s:.0f} s); splits: "
          f"{ {s: len(store.case_ids(s)) for s in ('train', 'val', 'test')} }", flush=True)

    run_dir = args.work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    trained = train(store_path, run_dir, args)
    load_end = os.getloadavg()
    print(f"[bench] trained {trained['steps']} steps in {trained['wall_s']} s (exit {trained['status']}); "
          f"load average {load_start[0]:.2f} → {load_end[0]:.2f}", flush=True)
    result = evaluate(store, run_dir)
    for split in ("val", "test"):
        r = result[split]
        print(f"[bench] {split}: PSNR {r['psnr']:.2f} dB (range 2.0), {r['psnr_hu_window']:.2f} dB (HU, range "
              f"2624), SSIM {r['ssim']:.4f}, MAE {r['mae_hu']:.1f} HU; per case {r['psnr_per_case']}", flush=True)
    figures = {"train": trained, "eval": result, "synth_s": round(synth_s, 1), "threads": args.threads,
               "loadavg_start": [round(v, 2) for v in load_start], "loadavg_end": [round(v, 2) for v in load_end],
               "target_psnr": args.target, "reached": bool(min(result["val"]["psnr"], result["test"]["psnr"]) >= args.target)}
    if not args.no_record:
        print(f"[bench] recorded {record('vqgan-cpu-demo', figures)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
