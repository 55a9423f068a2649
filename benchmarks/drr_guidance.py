"""Projection guidance at sampling, measured: PSNR, SSIM and DRR PSNR with and without it.

The same trained diffusion run, the same seeds, the test split of its store; only
``sampler.drr_guidance_iters`` / ``drr_guidance_lr`` change (settings ``ITERS:LR``; ``0:0`` is
plain sampling, the in-process baseline). Scores are those of ``xray2ct evaluate``
(:mod:`patching.metrics.scores`: PSNR over the preset's HU window, SSIM 3D, DRR PSNR against the
stored X-ray with its stored geometry), for one sample and for the mean of ``--num-samples``::

    python benchmarks/drr_guidance.py --run demo_out/runs/diffusion --store demo_out/phantoms.zarr \\
        --settings 0:0 1:0.1 1:0.2 3:0.05

Writes ``benchmarks/results/drr-guidance-cpu.json`` (``--no-record``: print only).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import record  # noqa: E402


def setting(text: str) -> tuple[int, float]:
    iters, _, lr = text.partition(":")
    return int(iters), float(lr or 0.0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="diffusion run, checkpoint or export")
    p.add_argument("--store", required=True, help="its store (the test split is scored)")
    p.add_argument("--settings", nargs="+", type=setting, default=[(0, 0.0), (1, 0.2)], metavar="ITERS:LR")
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--split", default="test")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--name", default="drr-guidance",
                   help="record as benchmarks/results/NAME-cpu.json (keep an earlier sweep beside a new one)")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)

    import torch

    from patching.data.store import Store
    from patching.metrics.scores import projection_consistency, psnr, ssim3d
    from patching.projection.drr import DRRGeometry
    from stage2_diffusion.pipeline import DiffusionReconstructor

    if args.threads:
        torch.set_num_threads(args.threads)
    st = Store(args.store)
    ids = st.case_ids(args.split)
    rec = DiffusionReconstructor(args.run)
    lo, hi = rec.hu_window
    rng = hi - lo
    rows = []
    for iters, lr in args.settings:
        rec.drr_guidance_iters = iters
        if iters:
            rec.cfg.sampler.drr_guidance_lr = lr
        scores: dict[str, list[float]] = {}
        t0 = time.process_time()
        for k, cid in enumerate(ids):
            case = st.case(cid)
            truth = np.clip(np.asarray(case.ct[...], dtype=np.float32), lo, hi)
            views = [v for v in ("pa", "lateral") if v in case.views()]
            xrays = {v: np.asarray(case.xray(v), dtype=np.float32) for v in views}
            vols = rec.reconstruct(xrays, seed=k, num_samples=args.num_samples).astype(np.float32)
            for name, vol in (("sample", vols[0]), (f"mean{args.num_samples}", vols.mean(0))):
                vol = np.clip(vol, lo, hi)
                scores.setdefault(f"{name}_psnr", []).append(psnr(vol, truth, rng))
                scores.setdefault(f"{name}_ssim", []).append(ssim3d(vol, truth, rng))
                for v in views:
                    geo = DRRGeometry(**case.xray_attrs(v)["geometry"])
                    scores.setdefault(f"{name}_drr_psnr_{v}", []).append(
                        projection_consistency(vol, xrays[v], case.spacing_mm, v, geo)["psnr"])
        row = {"iters": iters, "lr": lr, "cases": len(ids), "num_samples": args.num_samples,
               "cpu_s_per_sample": round((time.process_time() - t0) / (len(ids) * args.num_samples), 2),
               **{k: round(float(np.mean(v)), 3) for k, v in scores.items()}}
        rows.append(row)
        print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    base = rows[0]
    for row in rows:
        row["gain_vs_first"] = {k: round(row[k] - base[k], 3) for k in row if k.endswith(("psnr", "ssim"))
                                or "_drr_psnr_" in k}
    if not args.no_record:
        print(record(args.name, {"run": args.run, "store": args.store, "split": args.split, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
