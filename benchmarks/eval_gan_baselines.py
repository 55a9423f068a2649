"""The GAN baselines after a short ``cpu-demo`` training vs the mean training volume, on
held-out phantoms: X2CT-GAN and X-Recon (biplanar), and the single-view pair of S-XR2CT's paper
table — S-XR2CT and X2CT-GAN's single-view (PA) variant — trained for the same number of steps.

1. A store of ``--num`` chest phantoms (64³, 5.625 mm, PA + lateral DRRs of 128²; the last 10 %
   are the test split, the 10 % before them val) under ``--work`` (re-used when present).
2. Each method is trained with the CLI's own entry point (``python -m launch.train TASK --store S
   --preset cpu-demo --output-dir WORK/METHOD/TASK --max-steps N --resume latest``; models at their
   ``cpu_demo()`` size, 64² X-rays → 32³), all at once, one thread each — or taken from
   ``--checkpoint METHOD=PATH`` (a checkpoint, run or export directory). Methods: ``x2ct-gan``,
   ``x-recon``, ``s-xr2ct`` and ``x2ct-gan-pa`` (``x2ct-gan`` with ``--set model.views=pa``).
   S-XR2CT's perceptual loss (λ3 = 1) needs a 2D feature network; no pretrained one can be
   fetched here, so the script writes a *randomly initialised* ``SliceFeatureNet`` (channels
   16/32/64, seed 0) to ``WORK/perceptual-features.safetensors`` and trains with it.
3. ``xray2ct evaluate`` (its Python API) scores every test case: EMA generator, stored X-rays
   resized to the model's size, model cube → HU → trilinear to the case's 64³ grid, against the
   ground truth, both clipped to the preset's HU window [-1024, 1600]; the baseline is the
   voxel-wise mean of the training volumes. PSNR = 10·log10(2624² / MSE) (the data range is the
   window width, not the per-volume maximum), MAE, SSIM, projection consistency, LPIPS 2.5D
   (features of another random ``SliceFeatureNet``, seed 1, so no method is scored by the network
   it was trained against), ... with bootstrap CIs; the table is ``WORK/evaluation/summary.md``.

Run (about 40 minutes per pair of methods on the project's 2 shared cores under load)::

    .venv/bin/python benchmarks/eval_gan_baselines.py --work /tmp/ganeval --num 40 --steps 800
    .venv/bin/python benchmarks/eval_gan_baselines.py --work /tmp/sxr2ct --num 40 --steps 600 \
        --methods s-xr2ct x2ct-gan-pa --record-name gan-single-view

Measured (docs/gan_baselines.md, "Measured"): after 200 steps neither biplanar model beats the
mean volume; after 800 both do in PSNR (X2CT-GAN 25.3 dB, X-Recon 24.4 dB vs 24.0 dB).

``--no-record`` skips writing ``benchmarks/results/<record-name>-cpu.json``.
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
from patching.data.store import Store  # noqa: E402
from patching.data.synth_store import synthesize  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# method → (task, --set overrides); the perceptual feature file is added for s-xr2ct
METHODS = {"x2ct-gan": ("x2ct-gan", []), "x-recon": ("x-recon", []), "s-xr2ct": ("s-xr2ct", []),
           "x2ct-gan-pa": ("x2ct-gan", ["model.views=pa"])}
SHAPE = (64, 64, 64)


def random_feature_net(path: Path, seed: int) -> Path:
    """A randomly initialised 2D slice feature network (16/32/64 channels, 2 convs per stage)
    written as safetensors: the stand-in for a pretrained one, which cannot be fetched here."""
    from safetensors.torch import save_file

    from stage1_vqgan.losses import SliceFeatureNet

    if not path.is_file():
        torch.manual_seed(seed)
        save_file(SliceFeatureNet().state_dict(), str(path))
    return path


def train_all(methods: list[str], store: Path, work: Path, steps: int, threads: int, perceptual: Path) -> dict:
    """Train every method concurrently (one ``launch.demo.train`` per method, in threads, each in
    ``work/METHOD/``: two methods may share a task); returns ``launch.demo.train``'s records."""
    from concurrent.futures import ThreadPoolExecutor

    def one(method: str) -> dict:
        task, sets = METHODS[method]
        sets = sets + ([f"loss.perceptual_weights={perceptual}"] if task == "s-xr2ct" else [])
        where = work / method
        where.mkdir(parents=True, exist_ok=True)
        return train({task: sets}, store, where, where, 24 * 60.0, threads, steps)[task]

    with ThreadPoolExecutor(len(methods)) as pool:
        return dict(zip(methods, pool.map(one, methods), strict=True))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/xray2ct-gan-eval"))
    p.add_argument("--num", type=int, default=40, help="phantoms in the store (last 10 %% are the test split)")
    p.add_argument("--steps", type=int, default=800, help="training steps per task (cpu-demo: batch 1)")
    p.add_argument("--methods", nargs="+", default=["x2ct-gan", "x-recon"], choices=list(METHODS))
    p.add_argument("--checkpoint", nargs="+", default=[], metavar="METHOD=PATH",
                   help="evaluate these instead of training")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training process")
    p.add_argument("--split", default="test")
    p.add_argument("--record-name", default="gan-baselines")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(2)

    store_path = args.work / "phantoms.zarr"
    store = Store(store_path, create=True)
    synthesize(store, args.num, SHAPE, seed=0, workers=2, progress=False)  # skips finished cases
    given = dict(item.split("=", 1) for item in args.checkpoint)
    to_train = [m for m in args.methods if m not in given]
    perceptual = random_feature_net(args.work / "perceptual-features.safetensors", seed=0)
    lpips = random_feature_net(args.work / "lpips-features.safetensors", seed=1)
    runs = {}
    if to_train:  # concurrently, `threads` each, until --steps (the budget only caps a runaway run)
        t = time.perf_counter()
        runs = train_all(to_train, store_path, args.work, args.steps, args.threads, perceptual)
        runs["wall_seconds"] = round(time.perf_counter() - t, 1)
    methods = {m: Path(given.get(m, args.work / m / METHODS[m][0])) for m in args.methods}
    report = evaluate(store_path, methods, args.work / "evaluation", split=args.split, device="cpu",
                      lpips_weights=lpips, command=" ".join(sys.argv))
    for m in given:  # trained earlier: record what the evaluation read from the checkpoint
        info = report["methods"].get(m, {})
        runs[m] = {"steps": info.get("step"), "run": str(methods[m]), "trained": "before this run (--checkpoint)"}
    print((args.work / "evaluation" / "summary.md").read_text())
    if not args.no_record:
        summary = {row["method"]: {m: v["mean"] for m, v in row["metrics"].items() if v.get("mean") is not None}
                   for row in report["summary"]}
        path = record(args.record_name, {
            "split": args.split, "methods": {m: METHODS[m] for m in args.methods}, "num_phantoms": args.num,
            "shape": SHAPE, "steps": args.steps, "perceptual_features": "random SliceFeatureNet(), seed 0",
            "lpips_features": "random SliceFeatureNet(), seed 1", "training": runs, "cases": report["cases"],
            "summary": summary, "failures": report["failures"],
            "note": "2 CPU cores shared with other jobs: wall times are inflated"})
        print(f"recorded {path}")
    return 2 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
