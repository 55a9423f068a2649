"""What ``xray2ct evaluate`` writes: summaries with bootstrap intervals, ``per_case.csv``,
``summary.csv``, ``summary.md``, ``results.json`` and ``figures/<case>.png``, all into a temporary
directory next to ``--out`` that is renamed into place at the end (a crash leaves no half-written
output; an earlier evaluation at ``--out`` is replaced only then)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from patching.metrics import scores as M

# key, Markdown label, which way is better, digits shown
METRICS: tuple[tuple[str, str, str, int], ...] = (
    ("psnr", "PSNR (dB)", "max", 2),
    ("psnr_x2ctgan", "PSNR X2CT-GAN conv. (dB)", "max", 2),
    ("ssim", "SSIM 3D", "max", 4),
    ("mae_hu", "MAE (HU)", "min", 1),
    ("dice_lungs", "Dice lungs", "max", 3),
    ("dice_vessels", "Dice vessels", "max", 3),
    ("proj_psnr_pa", "DRR PSNR PA (dB)", "max", 2),
    ("proj_ncc_pa", "DRR NCC PA", "max", 3),
    ("proj_psnr_lateral", "DRR PSNR lat. (dB)", "max", 2),
    ("proj_ncc_lateral", "DRR NCC lat.", "max", 3),
    ("embolus_contrast_hu", "Embolus contrast (HU)", "max", 1),
    ("embolus_cnr", "Embolus CNR", "max", 2),
    ("lpips25d", "LPIPS 2.5D", "min", 4),
    ("seconds", "s / recon.", "min", 3),
)
METRIC_KEYS = tuple(m[0] for m in METRICS)
CASE_COLUMNS = ("case_id", "method", "kind", "views", "samples", "resampled", "has_embolus")
BOOTSTRAP = {"num": 1000, "alpha": 0.05, "seed": 0}


# --- summaries -----------------------------------------------------------------------------------


def summarize(records: Sequence[Mapping], rows: Sequence[str]) -> list[dict]:
    """Per row (method): number of cases and, per metric, ``{"n", "mean", "lo", "hi"}`` — the mean
    and percentile-bootstrap 95 % interval over the cases that have a value (``None`` entries are
    left out: an embolus metric of a case without an embolus). Non-finite values (an ``inf`` PSNR
    of identical volumes) give mean ``inf`` and no interval, counted in ``"nonfinite"``."""
    out = []
    for row in rows:
        mine = [r for r in records if r["method"] == row]
        entry = {"method": row, "kind": mine[0]["kind"] if mine else "", "views": mine[0].get("views", "") if mine else "",
                 "n": len(mine), "metrics": {}}
        for key in METRIC_KEYS:
            values = [float(r[key]) for r in mine if r.get(key) is not None]
            if not values:
                continue
            bad = sum(not math.isfinite(v) for v in values)
            if bad:
                stat = {"n": len(values), "mean": float(np.mean(values)), "lo": None, "hi": None, "nonfinite": bad}
            else:
                mean, lo, hi = M.bootstrap_ci(values, **BOOTSTRAP)
                stat = {"n": len(values), "mean": mean, "lo": lo, "hi": hi, "nonfinite": 0}
            entry["metrics"][key] = stat
        out.append(entry)
    return out


def views_label(views) -> str:
    """How a row's input views are shown: ``PA + lateral``, ``PA only (single view)``, ``—``."""
    names = {"pa": "PA", "lateral": "lateral"}
    views = [v for v in str(views).split("+") if v] if isinstance(views, str) else list(views)
    if not views:
        return "—"
    if len(views) == 1:
        return f"{names.get(views[0], views[0])} only (single view)"
    return " + ".join(names.get(v, v) for v in views)


def _best(summary: Sequence[Mapping]) -> dict[str, float]:
    best = {}
    for key, _, better, _ in METRICS:
        means = [s["metrics"][key]["mean"] for s in summary if key in s["metrics"]
                 and not math.isnan(s["metrics"][key]["mean"])]
        if means:
            best[key] = max(means) if better == "max" else min(means)
    return best


def _truth_embolus(results: Mapping) -> str:
    ref = list(results.get("ground_truth_embolus", {}).values())
    if not ref:
        return ""
    c, r = np.mean([v["contrast_hu"] for v in ref]), np.mean([v["cnr"] for v in ref])
    return f" (the ground truth itself: {c:.1f} HU, CNR {r:.2f}; higher is more visible)"


def _cell(stat: Mapping | None, digits: int) -> str:
    if stat is None:
        return "—"
    if stat["lo"] is None:
        return f"{stat['mean']:.{digits}f} ({stat['nonfinite']} non-finite)"
    return f"{stat['mean']:.{digits}f} [{stat['lo']:.{digits}f}, {stat['hi']:.{digits}f}]"


# --- files ---------------------------------------------------------------------------------------


def _plain(x):
    """JSON-safe: non-finite floats as strings, numpy scalars as Python ones."""
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def _csv_value(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)  # floats: shortest repr that reads back to the same value


def per_case_csv(records: Sequence[Mapping]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([*CASE_COLUMNS, *METRIC_KEYS])
    for r in records:
        w.writerow([_csv_value(r.get(k)) for k in (*CASE_COLUMNS, *METRIC_KEYS)])
    return buf.getvalue()


def summary_csv(summary: Sequence[Mapping]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method", "kind", "views", "metric", "n", "mean", "ci_lo", "ci_hi"])
    for s in summary:
        for key in METRIC_KEYS:
            st = s["metrics"].get(key)
            if st is not None:
                w.writerow([s["method"], s["kind"], s.get("views", ""), key, st["n"], _csv_value(st["mean"]), _csv_value(st["lo"]),
                            _csv_value(st["hi"])])
    return buf.getvalue()


def summary_md(results: Mapping) -> str:
    """The Markdown report: the table (best mean per column in bold), conventions, methods, failures."""
    s, summary = results["settings"], results["summary"]
    shown = [m for m in METRICS if any(m[0] in row["metrics"] for row in summary)]
    best = _best(summary)
    lo, hi = s["hu_window"]
    n = len(results["cases"])
    lines = [f"# Evaluation — `{s['store']}`, split `{s['split']}`, {n} case{'' if n == 1 else 's'}", "",
             "```", results["command"], "```", ""]
    if summary:
        lines.append("| method | kind | input views | n | " + " | ".join(label for _, label, _, _ in shown) + " |")
        lines.append("|---|---|---|---:|" + "---:|" * len(shown))
        for row in summary:
            cells = []
            for key, _, _, digits in shown:
                stat = row["metrics"].get(key)
                text = _cell(stat, digits)
                if stat is not None and best.get(key) == stat["mean"] and len(summary) > 1:
                    text = f"**{text}**"
                cells.append(text)
            lines.append(f"| {row['method']} | {row['kind']} | {views_label(row.get('views', ''))} | {row['n']} | "
                         + " | ".join(cells) + " |")
    else:
        lines.append("**No method produced results.**")
    lines += ["", "Cells: mean over cases [percentile-bootstrap 95 % interval of the mean, 1000 resamples of "
              "cases, seed 0]; the best mean per column in bold (higher is better except MAE, LPIPS and seconds).",
              "", "## Conventions", "",
              f"- Ground truth and every output are clipped to the HU window [{lo:g}, {hi:g}] (preset "
              f"`{s['preset']}`) before all comparisons.",
              f"- **PSNR** = 10·log10(R² / MSE) with the data range R = the window width, {s['data_range_hu']:g} HU "
              "(not the per-volume maximum). **SSIM 3D**: Gaussian σ 1.5 on the same R. **MAE** in HU.",
              "- **PSNR X2CT-GAN conv.**: X2CT-GAN's evaluation code (values HU+1024 clipped to 0…2500, peak 4095, "
              "int32 truncation) — comparable with papers using that code, *not* with the PSNR column "
              "(see docs/metrics.md).",
              "- **Dice lungs / vessels**: threshold masks (−950…−500 HU lungs; 200…600 HU contrast in the "
              "target's thorax region, bone removed).",
              "- **DRR PSNR / NCC**: the output's DRR rendered with the geometry stored with the case's X-ray, "
              "against that X-ray ([0, 1], data range 1).",
              f"- **Embolus contrast / CNR**: shell (2 voxels, within the target's contrast lumen) minus clot, over "
              f"the {s['num_embolus_cases']} case(s) with an embolus mask{_truth_embolus(results)}.",
              "- **LPIPS 2.5D**: " + (f"uniform-weight LPIPS over slices, features from `{s['lpips_weights']}`."
                                      if s.get("lpips_weights") else "not computed (no `--lpips-weights`)."),
              "- **s / recon.**: wall seconds per reconstruction (for `NAME-meanK`: all K samples).",
              ]
    if s["num_samples"] > 1:
        lines.append(f"- Stochastic methods: `NAME` is sample 1 of {s['num_samples']} per case (seed from "
                     f"`--seed {s['seed']}` and the case id); `NAME-mean{s['num_samples']}` is the voxel-wise "
                     "mean of the samples.")
    lines += ["", "## Methods", "", "| method | kind | source | step | weights | output grid | resampled to the case grid |",
              "|---|---|---|---:|---|---|---|"]
    for name, info in results["methods"].items():
        grid = "×".join(str(g) for g in info.get("output_grid", [])) or "—"
        lines.append(f"| {name} | {info.get('kind', '')} | `{info.get('source', '')}` | {info.get('step', '—')} | "
                     f"{info.get('weights') or '—'} | {grid} | {info.get('resampled_cases', 0)} of "
                     f"{info.get('scored_cases', 0)} cases (trilinear) |")
    if results["failures"]:
        lines += ["", "## Failures", ""]
        for f in results["failures"]:
            where = f" (case {f['case']})" if f.get("case") else ""
            lines.append(f"- **{f['name']}** (`{f['path']}`), {f['stage']}{where}: {f['problem']}")
    if results["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in results["notes"]]
    lines += ["", f"Settings and every per-case value: `results.json`, `per_case.csv`; figures: "
              f"`figures/` ({len(results['figures'])} cases).", ""]
    return "\n".join(lines)


def write_outputs(out: str | os.PathLike, results: Mapping, figures: Mapping[str, Sequence]) -> Path:
    """Write every output into a temporary sibling of ``out`` and rename it into place.

    ``figures`` maps a case id to its preview rows (PIL images, top to bottom). An existing
    ``out`` (an earlier evaluation) is moved aside first and deleted after the rename.
    """
    from patching.data.preview import save_grid_png

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:10]
    tmp = out.parent / f".{out.name}.tmp-{tag}"
    tmp.mkdir()
    old = None
    try:
        (tmp / "per_case.csv").write_text(per_case_csv(results["per_case"]))
        (tmp / "summary.csv").write_text(summary_csv(results["summary"]))
        (tmp / "summary.md").write_text(summary_md(results))
        (tmp / "results.json").write_text(json.dumps(_plain(results), indent=1, allow_nan=False) + "\n")
        for cid, rows in figures.items():
            save_grid_png(tmp / "figures" / f"{cid}.png", rows)
        if out.exists():
            old = out.parent / f".{out.name}.old-{tag}"
            os.rename(out, old)
        try:
            os.rename(tmp, out)
        except OSError:
            if old is not None:
                os.rename(old, out)
                old = None
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out
