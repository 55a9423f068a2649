"""Write ``docs/results.md`` from ``xray2ct evaluate`` output directories (their ``summary.md``,
``results.json`` and figures), so the published tables are exactly what ``evaluate`` wrote.

    .venv/bin/python benchmarks/make_results_md.py \\
        --section "demo=demo_out/evaluation" --demo-json demo_out/demo.json \\
        --section "longer runs=/tmp/d6/evaluation" --made-by "make demo" --made-by "..."

``--append`` adds the sections after what ``--out`` already holds (figures numbered after its
last ``images/results-<n>.png``), e.g. the single-view table of ``benchmarks/eval_gan_baselines.py``::

    .venv/bin/python benchmarks/make_results_md.py --append \
        --section "S-XR2CT vs single-view X2CT-GAN=/tmp/sxr2ct/evaluation" --made-by "..."

Each ``--section TITLE=DIR`` becomes a section with the evaluation's own Markdown (its command
line included) and its first comparison figure, copied to ``docs/images/results-<n>.png``.
``--demo-json`` adds the demo's wall time per stage and training steps. CNCL's own table
(:func:`cncl_section`; low-dose CT denoising is not an X-ray → CT method, so it is not a row of
``evaluate``) comes from ``--cncl-json``, by default the recorded
``benchmarks/results/cncl-cpu-demo-cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _demo_table(meta: dict) -> str:
    secs = meta["seconds"]
    lines = ["| stage | seconds |", "|---|---:|"]
    lines += [f"| {k.replace('_', ' ')} | {v:.0f} |" for k, v in secs.items() if k != "total"]
    lines.append(f"| **total** | **{secs['total']:.0f}** ({secs['total'] / 60:.1f} min) |")
    def run(name: str, r: dict) -> str:
        if "budget_steps" in r:  # step-budgeted demo: steps of budget, process CPU-seconds
            return (f"{name} {r['steps']} of {r['budget_steps']} steps ({r['cpu_seconds']:.0f} CPU-s, "
                    f"{r['threads']} thread(s))")
        return f"{name} {r['steps']} steps ({r['minutes']:g} min, {r['threads']} thread(s))"  # time-boxed demo.json

    runs = ", ".join(run(name, r) for name, r in meta["runs"].items())
    return "\n".join(lines) + f"\n\nTraining reached: {runs}. Machine: {meta['cpus']} CPU cores.\n"


def cncl_section(fig: dict) -> str:
    """The CNCL section from ``benchmarks/eval_cncl.py``'s JSON: command, table, paired differences."""
    sys.path.insert(0, str(REPO))
    from benchmarks.eval_cncl import markdown

    sim, c = fig["figures"]["simulator"], fig["figures"]
    n = c["table"]["lowdose"]["psnr"]["n"]
    return "\n".join([
        "## CNCL: low-dose CT denoising (benchmarks/eval_cncl.py)\n",
        f"Made by:\n\n```bash\n{c['command']}\n```\n",
        f"{n} held-out phantoms (64³, 5.625 mm) made quarter dose (dose {c['dose']:g}) by the simulator "
        f"(`patching/projection/lowdose.py`: projection, Poisson counts with {c['scanner']['photons_full_dose']:g} photons per ray "
        "at full dose plus electronic noise, log, FBP); scored against the clean phantom over the whole volume, "
        "both clipped to [-1024, 1600] HU, PSNR and SSIM with data range 2624 HU; mean and 95 % percentile-bootstrap "
        f"interval over the cases. CNCL: the `cpu-demo` preset trained {c['cncl']['run_steps']} steps "
        f"({c['cncl']['weights']} weights). Non-local means: scikit-image, slice by slice, h = 0.8 σ̂.\n",
        markdown(c) + "\n",
        "Simulator check (100 mm water disk, 2 mm pixels, against the noiseless reconstruction): noise std "
        + " / ".join(f"{v:.2f}" for v in sim["noise_std_hu_water_disk"].values()) + " HU at dose "
        + " / ".join(sim["noise_std_hu_water_disk"]) + f"; quarter/full = {sim['quarter_over_full']} (√4 = 2). "
        "The metrics include the air around the body (≈30 % of each test volume at ≤ −1000 HU), where the window's floor "
        "clips part of the noise; they rank the methods, they are not clinical figures. Machine: 2 shared CPU cores.\n",
    ])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--section", action="append", required=True, metavar="TITLE=DIR")
    p.add_argument("--made-by", action="append", default=[], metavar="CMD",
                   help="the command that produced each section's directory, in --section order")
    p.add_argument("--demo-json", type=Path, default=None)
    p.add_argument("--cncl-json", type=Path, default=REPO / "benchmarks" / "results" / "cncl-cpu-demo-cpu.json",
                   help="benchmarks/eval_cncl.py's results JSON (default: the recorded one, added when it exists)")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "results.md")
    p.add_argument("--append", action="store_true", help="add the sections after the existing content of --out")
    args = p.parse_args()
    images = args.out.parent / "images"
    images.mkdir(parents=True, exist_ok=True)
    first = 1
    if args.append:
        import re

        existing = args.out.read_text().rstrip() + "\n"
        first += max((int(n) for n in re.findall(r"images/results-(\d+)\.png", existing)), default=0)
    parts = [existing] if args.append else ["# Results\n",
             "Generated by `benchmarks/make_results_md.py` from `xray2ct evaluate` outputs; every table "
             "below is the evaluation's own `summary.md`, with the command that produced it. Metrics and "
             "conventions: [evaluation.md](evaluation.md). Numbers are on synthetic chest phantoms "
             "(64³, 5.625 mm) after minutes of CPU training: they show that the pipeline works and how "
             "the methods rank at this scale, not clinical performance.\n"]
    for k, spec in enumerate(args.section, 1):
        n = first + k - 1  # the figure's number
        title, _, where = spec.partition("=")
        d = Path(where)
        summary = (d / "summary.md").read_text().strip()
        body = summary.split("\n", 1)[1] if summary.startswith("#") else summary  # drop its own title
        body = "\n".join("#" + line if line.startswith("## ") else line for line in body.splitlines())
        parts.append(f"## {title}\n")
        if k <= len(args.made_by):
            parts.append(f"Made by:\n\n```bash\n{args.made_by[k - 1]}\n```\n")
        if k == 1 and args.demo_json is not None:
            parts.append("`xray2ct demo` (the README's first command), wall time per stage:\n")
            parts.append(_demo_table(json.loads(args.demo_json.read_text())))
        parts.append(body.strip() + "\n")
        figs = sorted((d / "figures").glob("*.png"))
        if figs:
            dst = images / f"results-{n}.png"
            shutil.copyfile(figs[0], dst)
            parts.append(f"![{title}: {figs[0].stem}](images/{dst.name})\n\n"
                         f"*{figs[0].stem}: one row per method and the ground truth; axial, coronal, sagittal "
                         "slices and the PA DRR of each volume.*\n")
    cncl_there = args.append and "\n## CNCL:" in existing  # appending: the CNCL section is not added twice
    if args.cncl_json is not None and args.cncl_json.is_file() and not cncl_there:
        parts.append(cncl_section(json.loads(args.cncl_json.read_text())))
    args.out.write_text("\n".join(parts))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
