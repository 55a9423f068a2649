"""The ``xray2ct`` command line (see docs/architecture.md, "The command-line contract").

Exit status: 0 success, 2 bad input or usage (one line on stderr, no traceback), 1 anything else.
Sub-commands import their heavy modules lazily so ``xray2ct --help`` is instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from patching.errors import InputError


def _add_data(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="make, ingest, render and inspect datasets")
    dsub = data.add_subparsers(dest="data_cmd", required=True, metavar="{synth,ingest,drr,inspect,preview,lowdose}")

    p = dsub.add_parser("synth", help="synthesise chest CTPA phantoms with their X-rays into a store")
    p.add_argument("--store", required=True)
    p.add_argument("--num", type=int, required=True, help="number of cases")
    p.add_argument("--shape", type=int, nargs=3, metavar=("X", "Y", "Z"), default=None,
                   help="voxels (default: the preset's shape); the voxel size is the preset's spacing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--emboli", type=float, default=0.0, metavar="P", help="probability a case has emboli")
    p.add_argument("--preset", default="cpu-demo")
    p.add_argument("--views", nargs="+", default=["pa", "lateral"], help="X-ray views to render (none: --views)")
    p.add_argument("--xray-size", type=int, default=None, help="detector pixels per side")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")

    p = dsub.add_parser("ingest", help="ingest NIfTI files and DICOM series into a store")
    p.add_argument("sources", nargs="+", metavar="SRC")
    p.add_argument("--store", required=True)
    p.add_argument("--preset", default="ctpa-512")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--split", choices=["train", "val", "test"], default=None,
                   help="split of the cases --splits does not list (default: a stable hash of the case id)")
    p.add_argument("--splits", metavar="FILE", default=None,
                   help="case id or source file name -> split: 'NAME SPLIT' lines, or one NAME per line in a "
                        "file named train/val/test.txt (X2CT-GAN's LIDC lists)")

    p = dsub.add_parser("drr", help="render X-rays (DRRs) for a store, or for one CT file")
    p.add_argument("--store")
    p.add_argument("--views", nargs="+", default=["pa", "lateral"])
    p.add_argument("--force", action="store_true", help="re-render views that exist")
    p.add_argument("--input", help="a CT volume (.nii / .nii.gz) to render one view of")
    p.add_argument("--view", default="pa", choices=["pa", "ap", "lateral"])
    p.add_argument("--out", help="output image: .png (8-bit) or .npy (float32)")
    p.add_argument("--sdd", type=float, default=None, help="source-to-detector distance, mm")
    p.add_argument("--sid", type=float, default=None, help="source-to-isocentre distance, mm")
    p.add_argument("--height", type=int, default=None, help="detector rows")
    p.add_argument("--width", type=int, default=None, help="detector columns")
    p.add_argument("--pixel-mm", type=float, default=None, help="detector pixel size, mm")
    p.add_argument("--parallel", action="store_true", help="parallel beam instead of cone beam")
    p.add_argument("--xray-size", type=int, default=None, help="detector pixels per side (store mode)")

    p = dsub.add_parser("inspect", help="print a table of the cases in a store")
    p.add_argument("--store", required=True)

    p = dsub.add_parser("preview", help="write a tri-planar PNG of a case (with its X-rays)")
    p.add_argument("--store", required=True)
    p.add_argument("--case", required=True)
    p.add_argument("--out", required=True)

    p = dsub.add_parser("lowdose", help="simulate a low-dose scan of a CT (projection, Poisson + electronic noise, FBP)")
    p.add_argument("--input", required=True, help="CT volume (.nii / .nii.gz, HU)")
    p.add_argument("--out", required=True, help="output .nii.gz (the input's geometry)")
    p.add_argument("--dose", type=float, required=True, help="dose fraction in (0, 1]; 1 = the simulator's full dose, "
                                                             "0.25 = quarter dose (AAPM challenge)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--photons", type=float, default=1e5, help="incident photons per ray and view at full dose "
                                                                "(default 1e5)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xray2ct", description="Chest X-ray → 3D CT / CTPA")
    sub = parser.add_subparsers(dest="cmd", required=True,
                                metavar="{data,train,export,encode,sample,evaluate,demo,denoise}")
    _add_data(sub)
    # train/export/evaluate parse their own flags (the same parsers serve `accelerate launch -m launch.train`
    # and `-m launch.evaluate`).
    sub.add_parser("train", help="train a task (see `xray2ct train --help`)", add_help=False)
    sub.add_parser("export", help="export checkpoint weights as safetensors + config.json", add_help=False)
    sub.add_parser("evaluate", help="score reconstruction methods on a store's split (see `xray2ct evaluate --help`)",
                   add_help=False)
    p = sub.add_parser("encode", help="cache every case's stage-1 latent in the store")
    from .encode import (
        add_arguments as add_encode_arguments,  # also `python -m launch.encode` (several processes)
    )

    add_encode_arguments(p)
    p = sub.add_parser("sample", help="reconstruct a CT volume from X-ray files")
    p.add_argument("--checkpoint", required=True, help="checkpoint, run or export directory")
    p.add_argument("--pa", help="PA X-ray: PNG, JPEG, DICOM or .npy")
    p.add_argument("--lateral", help="lateral X-ray (biplanar models)")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=None, help="sampler steps (diffusion)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (diffusion)")
    p.add_argument("--drr-guidance", type=int, default=None, metavar="N",
                   help="projection-consistency iterations per sampler step (diffusion; 0 = off; default: its config)")
    p.add_argument("--num-samples", type=int, default=1, help="samples; >1 also writes mean and std volumes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--windowed", action="store_true",
                   help="denoise in the config's sampler.fallback_window windows (diffusion; when the whole latent does not fit)")
    p = sub.add_parser("denoise", help="denoise a (low-dose) CT with a trained CNCL model")
    p.add_argument("--checkpoint", required=True, help="cncl checkpoint, run or export directory")
    p.add_argument("--input", required=True, help="CT volume (.nii / .nii.gz, HU)")
    p.add_argument("--out", required=True, help="output .nii.gz (the input's geometry)")
    p.add_argument("--dose", type=float, default=None,
                   help="first simulate this dose fraction of the input (for a full-dose CT), then denoise")
    p.add_argument("--seed", type=int, default=0, help="seed of the --dose simulation")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p = sub.add_parser("demo", help="the whole pipeline on phantoms, on a CPU")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--num", type=int, default=48, help="phantoms to synthesise (default 48: 40 train, 4 val, 4 test)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2,
                   help="threads of the diffusion training and of encoding/sampling/evaluation (default 2; the "
                        "VQ-GAN and X2CT-GAN always train on one thread each, side by side). Another value "
                        "changes the table within noise, not bit for bit")
    p.add_argument("--num-samples", type=int, default=4,
                   help="diffusion samples per test case: the table shows sample 1 and their mean (default 4)")
    p.add_argument("--steps-scale", type=float, default=1.0,
                   help="multiply every model's step budget (default 1: the published table)")
    p.add_argument("--minutes", type=float, default=None,
                   help="also stop each training stage after this many wall minutes (the table then depends "
                        "on the machine's speed)")
    p.add_argument("--max-steps", type=int, default=None, help="cap every step budget at this (quick runs)")
    return parser


def _encode(args) -> int:
    from .encode import run

    return run(args)


def _sample(args) -> int:
    from launch.tasks import RECONSTRUCTOR_HINTS, RECONSTRUCTORS
    from patching.artifacts.reconstruct import load_reconstructor, sample_files

    rec = load_reconstructor(args.checkpoint, RECONSTRUCTORS, RECONSTRUCTOR_HINTS, device=args.device, steps=args.steps, guidance=args.guidance,
                             drr_guidance=args.drr_guidance)
    if args.windowed:
        if not callable(getattr(rec, "use_fallback_window", None)):
            raise InputError("--windowed", f"{rec.task} has no windowed sampling (diffusion only)")
        rec.use_fallback_window()
    rec.progress = True  # a full-size sample runs for minutes: show its steps and tiles
    files = sample_files(rec, args.pa, args.lateral, args.out, seed=args.seed, num_samples=args.num_samples)
    for kind, path in files.items():
        print(f"  {kind:8s} {path}")
    return 0


def _denoise(args) -> int:
    from gan_baselines.cncl.denoise import denoise_file
    from gan_baselines.sampling import checkpoint_preset
    from patching.data.spec import data_spec

    window = data_spec(checkpoint_preset(args.checkpoint)).hu_window
    out = denoise_file(args.checkpoint, args.input, args.out, window, dose=args.dose, seed=args.seed,
                       device=args.device)
    print(f"denoised -> {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # train/export/evaluate forward everything after their name to their own parsers.
    if argv and argv[0] in ("train", "export", "evaluate"):
        try:
            if argv[0] == "train":
                from launch.train import main as train_main

                return int(train_main(argv[1:]) or 0)
            if argv[0] == "evaluate":
                from launch.evaluate import main as evaluate_main

                return int(evaluate_main(argv[1:]) or 0)
            from launch.export import main as export_main

            return int(export_main(argv[1:]) or 0)
        except InputError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "device", None) is not None:
            from patching.checks import resolve_device

            resolve_device(args.device)
        if args.cmd == "data":
            from launch import cli_data

            return int(cli_data.run(args) or 0)
        if args.cmd == "encode":
            return _encode(args)
        if args.cmd == "sample":
            return _sample(args)
        if args.cmd == "denoise":
            return _denoise(args)
        if args.cmd == "demo":
            from launch.demo import run_demo

            return int(run_demo(args) or 0)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    raise AssertionError(f"unhandled command {args.cmd}")


if __name__ == "__main__":
    sys.exit(main())
