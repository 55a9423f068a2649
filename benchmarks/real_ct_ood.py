"""Out of distribution: the demo's phantom-trained models on a real chest CT.

The CT is the contrast-enhanced chest CT that TotalSegmentator ships as a test file
(``tests/reference_files/aorta_report/example_ct.nii.gz`` in its PyPI source distribution,
version 2.18.0, Apache-2.0; 233×167×191 voxels of 1.5 mm, neck to upper abdomen, with the
patient table). It is not in this repository: ``pip download`` fetches the source archive from
PyPI (the only network this needs) and the file's SHA-256 is checked.

What a user would type, in order (each step is the real command line, run as a subprocess):

1. a copy of the demo's phantom store whose test cases become ``val`` (its train cases stay:
   they are the ``mean-train-volume`` baseline), then
   ``xray2ct data ingest CT --store real.zarr --preset cpu-demo --split test`` — resampled to the
   demo's 64³ grid of 5.625 mm, its field-of-view padding and table removed by ingest;
2. ``xray2ct data drr --store real.zarr`` renders its PA and lateral DRRs (the models' inputs);
3. ``xray2ct encode --store real.zarr --vqgan DEMO/runs/vqgan --split test`` and
   ``benchmarks/codec_psnr.py``: the VQ-GAN's codec PSNR on real anatomy;
4. ``xray2ct evaluate --store real.zarr --split test --method diffusion=... --method x2ct-gan=...``
   at the demo's settings, then diffusion alone (one sample) at each ``--guidance-sweep`` number
   of projection-guidance iterations per sampler step (``--drr-guidance N``).

    .venv/bin/python benchmarks/real_ct_ood.py --demo demo_out --out work/realct --guidance-sweep 0 3 6

Records ``benchmarks/results/real-ct-ood-cpu.json``; the evaluation's comparison figure is copied
to ``docs/images/real_ct_ood.png`` with ``--figure``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import record, shown_path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "totalsegmentator==2.18.0"
MEMBER = "totalsegmentator-2.18.0/tests/reference_files/aorta_report/example_ct.nii.gz"
SHA256 = "372d98723e3283a8d4a0ae2f0ef1e581c0ad17b673b30b2e8d3e215180cc2a12"


def fetch_ct(cache: Path) -> Path:
    """The CT file, extracted from the package's source archive (downloaded once into ``cache``)."""
    target = cache / "totalsegmentator_aorta_example_ct.nii.gz"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        archive = cache / "totalsegmentator-2.18.0.tar.gz"
        if not archive.exists():
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            "-d", str(cache), PACKAGE], check=True)
        with tarfile.open(archive) as tar:
            member = tar.getmember(MEMBER)
            if not member.isfile():
                raise SystemExit(f"error: {archive}: {MEMBER} is not a regular file")
            data = tar.extractfile(member).read()
        tmp = target.with_suffix(".part")
        tmp.write_bytes(data)
        tmp.replace(target)
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    if digest != SHA256:
        raise SystemExit(f"error: {target}: SHA-256 {digest} is not the expected {SHA256}")
    return target


def run(cmd: list[str], shown: str, log: Path) -> str:
    """Run one step, its command line and stderr appended to ``log``; returns its stdout. A failing
    step is one line naming it and the log, exit 2."""
    with log.open("a") as f:
        f.write(f"$ {shown}\n")
        f.flush()
        done = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=f, text=True,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
        f.write(done.stdout)
    if done.returncode != 0:
        print(f"error: `{' '.join(shown.split()[:3])}` failed (exit {done.returncode}); see {log}", file=sys.stderr)
        raise SystemExit(2)
    return done.stdout


def xray2ct(*args: str, log: Path) -> str:
    return run([sys.executable, "-m", "launch.cli", *args], "xray2ct " + " ".join(args), log)


def _rows(evaluation: Path) -> dict:
    """``{method: {metric: mean}}`` of an ``xray2ct evaluate`` output directory."""
    report = json.loads((evaluation / "results.json").read_text())
    return {row["method"]: {m: round(s["mean"], 4) for m, s in row["metrics"].items()
                            if isinstance(s, dict) and isinstance(s.get("mean"), float)}
            for row in report["summary"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", type=Path, required=True, help="an `xray2ct demo --out` directory")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--ct", type=Path, default=None, help="another chest CT instead of the fetched one")
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--guidance-sweep", type=int, nargs="*", default=[],
                   help="also score diffusion (one sample) at these --drr-guidance iteration counts")
    p.add_argument("--figure", action="store_true", help="copy the comparison figures to docs/images/")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "commands.log"
    ct = args.ct or fetch_ct(args.out / "cache")

    from patching.data.store import Store

    store_path = args.out / "real.zarr"
    if store_path.exists():
        shutil.rmtree(store_path)
    shutil.copytree(args.demo / "phantoms.zarr", store_path)
    store = Store(store_path)
    for cid in store.case_ids("test"):
        store.set_split(cid, "val")
    xray2ct("data", "ingest", str(ct), "--store", str(store_path), "--preset", "cpu-demo", "--split", "test", log=log)
    (real_id,) = store.case_ids("test")
    xray2ct("data", "drr", "--store", str(store_path), log=log)
    runs = args.demo / "runs"
    xray2ct("encode", "--store", str(store_path), "--vqgan", str(runs / "vqgan"), "--split", "test", log=log)
    codec_args = ["--store", str(store_path), "--vqgan", str(runs / "vqgan")]
    codec_json = json.loads(run([sys.executable, str(REPO / "benchmarks" / "codec_psnr.py"), *codec_args],
                                "python benchmarks/codec_psnr.py " + " ".join(codec_args), log).splitlines()[0])

    def evaluate(out: Path, *options: str) -> dict:
        """``xray2ct evaluate`` of diffusion (and ``options``) on the real case into a fresh ``out``."""
        if out.exists():
            shutil.rmtree(out)
        xray2ct("evaluate", "--store", str(store_path), "--split", "test", "--method", f"diffusion={runs / 'diffusion'}",
                *options, "--out", str(out), log=log)
        return _rows(out)

    evaluation = args.out / "evaluation"
    rows = evaluate(evaluation, "--method", f"x2ct-gan={runs / 'x2ct-gan'}", "--num-samples", str(args.num_samples))
    sweep = {str(iters): evaluate(args.out / f"diffusion-drr-guidance-{iters}", "--num-samples", "1", "--drr-guidance",
                                  str(iters), "--no-mean-baseline")["diffusion"]
             for iters in args.guidance_sweep}
    case = store.case(real_id)
    figures = {"ct": {"source": f"{PACKAGE} sdist: {MEMBER}" if args.ct is None else ct.name, "sha256": SHA256
                      if args.ct is None else None, "case_id": real_id, "grid": list(case.shape),
                      "spacing_mm": list(case.spacing_mm)},
               "demo": shown_path(args.demo), "codec": codec_json, "evaluation": rows,
               "diffusion_by_drr_guidance_iters": sweep, "summary_md": shown_path(evaluation / "summary.md")}
    print((evaluation / "summary.md").read_text().split("\n\nCells:")[0])
    print(f"codec PSNR on the real CT: {codec_json['codec_psnr_db'][0]:.2f} dB "
          f"(mean training volume {codec_json['mean_train_volume_psnr_db'][0]:.2f} dB)")
    for iters, row in sweep.items():
        print(f"diffusion, one sample, --drr-guidance {iters}: PSNR {row['psnr']:.2f} dB, SSIM {row['ssim']:.3f}, "
              f"DRR PSNR PA {row['proj_psnr_pa']:.2f} dB")
    if args.figure:  # the comparison at the demo's settings, and the strongest guidance of the sweep
        images = REPO / "docs" / "images"
        shutil.copy(evaluation / "figures" / f"{real_id}.png", images / "real_ct_ood.png")
        if sweep:
            top = max(args.guidance_sweep)
            shutil.copy(args.out / f"diffusion-drr-guidance-{top}" / "figures" / f"{real_id}.png",
                        images / f"real_ct_ood_drr_guidance_{top}.png")
    if not args.no_record:
        print("recorded", record("real-ct-ood", figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
