"""``xray2ct evaluate``: the one evaluation every reconstruction method is scored with.

    xray2ct evaluate --store S --split test --method x2ct=runs/x2ct --method diff=runs/diff --out eval/
    accelerate launch --config_file launch/accelerate/cpu_ddp.yaml -m launch.evaluate --store S ...

Every case of the split is reconstructed from its stored X-rays by every method (a checkpoint,
run directory, ``latest`` file or export of X2CT-GAN, X-Recon or the diffusion model; see
:mod:`launch.evaluate_methods`) and by the ``mean-train-volume`` baseline, and scored with
:mod:`patching.metrics.scores` against the ground truth, both clipped to the preset's HU window. Outputs
(:mod:`launch.evaluate_report`): ``per_case.csv``, ``summary.csv``, ``summary.md``,
``results.json`` and ``figures/<case>.png``, written aside and renamed into place.

Several processes (``accelerate launch`` / ``torchrun``): :class:`accelerate.PartialState` splits
the cases into contiguous blocks, each process reconstructs and scores its block (and renders the
figures of its own figure cases), the records are gathered with ``gather_object`` and rank 0
writes everything. Per-case sampling seeds depend on the case id only, so results equal the
single-process run.

A method that cannot be loaded or fails on a case is reported on one stderr line
(``xray2ct evaluate: method NAME (PATH): <problem>``), left out of the tables, recorded in
``results.json`` and ``summary.md``, and the exit status is 2 once the others are written. Bad
flags, a missing store or an empty split are one-line errors (exit 2) before anything is written.
"""

from __future__ import annotations

import argparse
import math
import platform
import re
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from patching.checks import resolve_device
from patching.data.store import Case, Store
from patching.errors import InputError
from patching.metrics import scores as M

from .collective import problem as _problem
from .collective import run_collectively as _collective
from .evaluate_methods import (
    MEAN_BASELINE,
    MeanVolumeMethod,
    Method,
    load_method,
    mean_from_sum,
    train_sum,
)
from .evaluate_report import METRIC_KEYS, summarize, write_outputs

NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
DRR_KWARGS = ("mu_water", "bone_threshold_hu", "bone_boost", "integral_scale")  # attenuation attrs, if stored
FORMAT = "xray2ct-evaluation"


# --- checks (before anything is loaded or written) --------------------------------------------


def parse_methods(specs: Sequence[str]) -> dict[str, str]:
    """``["NAME=PATH", ...]`` → ``{NAME: PATH}``; one-line InputError for a bad or repeated NAME."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = str(spec).partition("=")
        if not sep or not path:
            raise InputError("--method", f"expected NAME=PATH, got {spec!r}")
        if name in out:
            raise InputError("--method", f"NAME {name!r} is given twice; names must be unique")
        out[name] = path
    return out


def _check_names(methods: Mapping[str, object], num_samples: int) -> None:
    for name in methods:
        if not NAME_RE.fullmatch(str(name)):
            raise InputError("--method", f"NAME {name!r} may only hold letters, digits, '_', '.' and '-'")
        if name == MEAN_BASELINE:
            raise InputError("--method", f"NAME {name!r} is reserved for the baseline")
        if num_samples > 1 and f"{name}-mean{num_samples}" in methods:
            raise InputError("--method", f"NAME {name}-mean{num_samples} clashes with the mean row of {name!r}")


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise InputError("--out", f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "results.json").is_file():
        raise InputError("--out", f"{out} is a non-empty directory but not an evaluation output; "
                                  "refusing to replace it")


def _positive(value, flag: str, *, zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < (0 if zero else 1):
        raise InputError(flag, f"needs a {'non-negative' if zero else 'positive'} integer, got {value!r}")
    return int(value)


# --- one case ---------------------------------------------------------------------------------


def case_context(case: Case, window: tuple[float, float]) -> tuple[dict, list[str]]:
    """What every method's output of ``case`` is compared with; and reasons for metrics skipped."""
    from patching.projection.drr import DRRGeometry

    lo, hi = window
    truth = np.clip(np.asarray(case.ct[...], dtype=np.float32), lo, hi)
    views, skipped = {}, []
    for view in ("pa", "lateral"):
        if view not in case.views():
            continue
        attrs = case.xray_attrs(view)
        geometry = attrs.get("geometry")
        try:
            if not isinstance(geometry, Mapping):
                raise InputError(None, "has no DRR geometry in its attributes")
            geometry = DRRGeometry(**geometry)
        except (TypeError, InputError) as err:
            skipped.append(f"case {case.case_id}, {view} X-ray (renderer {attrs.get('renderer', 'unknown')!r}): "
                           f"{err}; projection consistency skipped")
            continue
        views[view] = (case.xray(view), geometry, {k: attrs[k] for k in DRR_KWARGS if k in attrs})
    mask = np.asarray(case.mask("embolus")[...]) != 0 if "embolus" in case.masks() else None
    mask = mask if mask is not None and mask.any() else None
    vessel = M.vessel_mask(truth) if mask is not None else None
    ctx = {"case": case, "truth": truth, "window": (float(lo), float(hi)), "views": views, "embolus": mask,
           "vessel": vessel, "truth_embolus": None if mask is None else M.embolus_contrast(truth, mask, vessel=vessel)}
    return ctx, skipped


def score(pred: np.ndarray, ctx: Mapping, lpips_net=None) -> dict:
    """Every metric of one output against ``ctx`` (see :func:`case_context`); ``None`` where a
    metric does not apply (no embolus, a view not stored, no LPIPS weights)."""
    lo, hi = ctx["window"]
    truth, case = ctx["truth"], ctx["case"]
    pred = np.asarray(pred)
    if pred.shape != truth.shape:
        raise InputError(f"case {case.case_id}", f"output shape {pred.shape} is not the case's {truth.shape}")
    if not np.isfinite(pred).all():
        raise InputError(f"case {case.case_id}", "output has NaN or infinite voxels")
    p = np.clip(pred.astype(np.float32, copy=False), lo, hi)
    r = hi - lo
    rec = {"psnr": M.psnr(p, truth, r), "psnr_x2ctgan": M.psnr_x2ctgan(p, truth), "ssim": M.ssim3d(p, truth, r),
           "mae_hu": M.mae_hu(p, truth), "dice_lungs": M.dice_lungs(p, truth), "dice_vessels": M.dice_vessels(p, truth)}
    for view in ("pa", "lateral"):
        if view in ctx["views"]:
            xray, geometry, kwargs = ctx["views"][view]
            pc = M.projection_consistency(p, xray, case.spacing_mm, view, geometry, **kwargs)
            rec[f"proj_psnr_{view}"], rec[f"proj_ncc_{view}"] = pc["psnr"], pc["ncc"]
        else:
            rec[f"proj_psnr_{view}"] = rec[f"proj_ncc_{view}"] = None
    emb = M.embolus_contrast(p, ctx["embolus"], vessel=ctx["vessel"]) if ctx["embolus"] is not None else None
    rec["embolus_contrast_hu"] = None if emb is None else emb["contrast_hu"]
    rec["embolus_cnr"] = None if emb is None else emb["cnr"]
    rec["lpips25d"] = None if lpips_net is None else M.lpips25d(p, truth, lpips_net, window=(lo, hi))
    return rec


def figure_row(volume: np.ndarray, ctx: Mapping, title: str):
    """One figure row: axial, coronal, sagittal through the centre and the PA DRR (store geometry)."""
    from patching.data.preview import triplanar_image
    from patching.projection.drr import render_drr

    case = ctx["case"]
    xrays = {}
    if "pa" in ctx["views"]:
        _, geometry, kwargs = ctx["views"]["pa"]
        with torch.no_grad():
            drr = render_drr(torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32)), case.spacing_mm,
                             "pa", geometry, **kwargs)
        xrays["PA DRR"] = drr.numpy()
    return triplanar_image(volume, case.spacing_mm, xrays=xrays, title=title, height=160)


def _run_method(m: Method, case: Case, ctx: Mapping, fig: list | None, *, seed: int, num_samples: int,
                window: tuple[float, float], lpips_net, records: list, fail) -> None:
    """Reconstruct ``case`` with ``m`` (K samples if stochastic), score it (and the K-sample mean),
    append the records and figure rows; a failure is handed to ``fail`` and not raised."""
    try:
        k = num_samples if m.stochastic else 1
        t0 = time.perf_counter()
        first, total, n = None, None, 0
        for vol in m.samples(case, seed=seed, num_samples=k):
            vol = np.asarray(vol)
            first = vol if first is None else first
            if k > 1:
                total = vol.astype(np.float64) if total is None else total + vol
            n += 1
        dt = time.perf_counter() - t0
        if n != k:
            raise InputError(f"case {case.case_id}", f"the method gave {n} volumes, expected {k}")
        outs = [(m.name, first, dt / k, 1)]
        if k > 1:
            outs.append((f"{m.name}-mean{k}", (total / k).astype(np.float32), dt, k))
        for row, vol, secs, n in outs:
            rec = {"case_id": case.case_id, "method": row, "kind": m.kind, "views": "+".join(m.views), "samples": n,
                   "resampled": m.resampled(case), "has_embolus": ctx["embolus"] is not None,
                   **score(vol, ctx, lpips_net), "seconds": secs, "_base": m.name}
            records.append(rec)
            if fig is not None:
                title = f"{row}  PSNR {rec['psnr']:.2f} dB  SSIM {rec['ssim']:.3f}"
                fig.append((m.name, figure_row(np.clip(vol, *window), ctx, title)))
    except Exception as err:  # noqa: BLE001 - one method's failure must not stop the others
        fail(m.name, "reconstruct", err, case.case_id)


# --- the evaluation ---------------------------------------------------------------------------


def evaluate(store: str | Path, methods: Mapping[str, str | Path], out: str | Path, *, split: str = "test",
             num_samples: int = 1, steps: int | None = None, guidance: float | None = None,
             drr_guidance: int | None = None, seed: int = 0,
             figure_cases: int = 2, max_cases: int | None = None, mean_baseline: bool = True,
             figure_case_ids: Sequence[str] | None = None,
             lpips_weights: str | Path | None = None, device: str | None = None, preset: str = "cpu-demo",
             progress: bool = True, command: str | None = None) -> dict:
    """Score ``methods`` (``{NAME: checkpoint/run/export path}``) on a split of ``store``; write ``out``.

    Returns the content of ``results.json`` (``per_case``, ``summary``, ``failures``, ``settings``,
    ...) on every process; only the main process writes. Raises :class:`InputError` for bad
    arguments, a missing store or an empty split before anything is written. A method that fails
    does not raise: it is printed, recorded in ``results["failures"]`` and left out of the tables.
    """
    from accelerate import PartialState
    from accelerate.utils import gather_object

    from .presets import data_spec

    t_start = time.perf_counter()
    methods = {str(k): str(v) for k, v in methods.items()}
    num_samples = _positive(num_samples, "--num-samples")
    figure_cases = _positive(figure_cases, "--figure-cases", zero=True)
    if max_cases is not None:
        max_cases = _positive(max_cases, "--max-cases")
    if steps is not None:
        steps = _positive(steps, "--steps")
    seed = _positive(seed, "--seed", zero=True)
    if guidance is not None and not (isinstance(guidance, (int, float)) and math.isfinite(guidance) and guidance >= 0):
        raise InputError("--guidance", f"needs a finite number >= 0, got {guidance!r}")
    if drr_guidance is not None:
        drr_guidance = _positive(drr_guidance, "--drr-guidance", zero=True)
    _check_names(methods, num_samples)
    out = Path(out)
    _check_out(out)
    st = Store(store)
    ids = st.case_ids(split)
    if not ids:
        raise InputError("--split", f"split {split!r} of {st.path} has no complete cases")
    ids = ids[:max_cases] if max_cases else ids
    if figure_case_ids:  # chosen by id (--figure-case), instead of the first N
        unknown = [c for c in figure_case_ids if c not in ids]
        if unknown:
            raise InputError("--figure-case", f"{unknown[0]!r} is not among the {len(ids)} scored cases of split "
                                              f"{split!r} (e.g. {ids[0]!r})")
        figure_ids = set(figure_case_ids)
    else:
        figure_ids = set(ids[:figure_cases])
    if mean_baseline and not st.case_ids("train"):
        raise InputError("--store", f"{st.path} has no train cases for the {MEAN_BASELINE} baseline "
                                    "(pass --no-mean-baseline)")
    if not methods and not mean_baseline:
        raise InputError("--method", "nothing to evaluate: give --method NAME=PATH (or drop --no-mean-baseline)")
    if device is not None:
        resolve_device(device)
    window = data_spec(preset).hu_window
    lpips_net = M.load_feature_net(lpips_weights) if lpips_weights is not None else None
    command = command or _command(store, methods, out, split=split, num_samples=num_samples, steps=steps,
                                  guidance=guidance, drr_guidance=drr_guidance, seed=seed, figure_cases=figure_cases,
                                  max_cases=max_cases, mean_baseline=mean_baseline, lpips_weights=lpips_weights,
                                  device=device, preset=preset)

    state = PartialState(cpu=not torch.cuda.is_available() or (device is not None and str(device) == "cpu"))
    main_proc = state.is_main_process
    dev = torch.device(device) if device is not None else state.device
    failures: list[dict] = []

    def fail(name: str, stage: str, err: BaseException, case: str | None = None) -> None:
        problem = _problem(err)
        failures.append({"name": name, "path": methods.get(name, ""), "stage": stage, "case": case,
                         "problem": problem, "rank": state.process_index})
        if stage == "load" and not main_proc:
            return  # every process loads: rank 0 alone says so
        where = f"case {case}: " if case else ""
        print(f"xray2ct evaluate: method {name} ({methods.get(name, '')}): {where}{problem}", file=sys.stderr, flush=True)

    live: list[Method] = []
    for name, path in methods.items():
        try:
            live.append(load_method(name, path, device=dev, steps=steps, guidance=guidance, drr_guidance=drr_guidance))
        except Exception as err:  # noqa: BLE001 - any failure to load is reported, the others go on
            fail(name, "load", err)
    if mean_baseline:
        total, info = _collective(state, lambda: train_sum(st, window, rank=state.process_index,
                                                             world_size=state.num_processes,
                                                             progress=progress and main_proc))
        if state.num_processes > 1:
            t = torch.from_numpy(total).to(state.device)  # the process group's device (gloo: CPU)
            torch.distributed.all_reduce(t)
            total = t.cpu().numpy()
        live.append(MeanVolumeMethod(mean_from_sum(total, info), info))

    records, skipped, figures, truth_emb = [], [], {}, {}

    def run_cases() -> None:
        with state.split_between_processes(ids) as mine, torch.no_grad():
            for cid in tqdm(mine, desc="evaluate", unit="case", disable=not (progress and main_proc)):
                case = st.case(cid)
                ctx, why = case_context(case, window)
                skipped.extend(why)
                if ctx["truth_embolus"] is not None:
                    truth_emb[cid] = {k: ctx["truth_embolus"][k] for k in ("contrast_hu", "cnr")}
                fig = [("", figure_row(ctx["truth"], ctx, f"ground truth  {cid}"))] if cid in figure_ids else None
                for m in live:
                    if not any(f["name"] == m.name for f in failures):
                        _run_method(m, case, ctx, fig, seed=seed, num_samples=num_samples, window=window,
                                    lpips_net=lpips_net, records=records, fail=fail)
                if fig is not None:
                    figures[cid] = fig

    _collective(state, run_cases)
    gathered = gather_object([{"records": records, "failures": failures, "skipped": skipped, "figures": figures,
                               "truth_embolus": truth_emb}])
    return _finish(gathered, ids=ids, methods=methods, live=live, out=out, main=main_proc, settings={
        "store": str(st.path), "split": split, "preset": preset, "hu_window": list(window),
        "data_range_hu": window[1] - window[0], "num_samples": num_samples, "steps": steps, "guidance": guidance,
        "drr_guidance": drr_guidance,
        "seed": seed, "figure_cases": figure_cases, "max_cases": max_cases, "mean_baseline": mean_baseline,
        "lpips_weights": None if lpips_weights is None else str(lpips_weights), "device": str(dev),
        "world_size": state.num_processes}, command=command, t_start=t_start)


def _finish(gathered: list[dict], *, ids, methods, live, out, main, settings, command, t_start) -> dict:
    """Merge the processes' parts, summarise, and (main process) write the outputs."""
    order = {cid: i for i, cid in enumerate(ids)}
    failures: dict[str, dict] = {}
    for part in gathered:
        for f in part["failures"]:
            key = (f["stage"] != "load", order.get(f["case"], -1))
            if f["name"] not in failures or key < failures[f["name"]]["_key"]:
                failures[f["name"]] = {**f, "_key": key}
    failed = set(failures)
    records = [r for part in gathered for r in part["records"] if r["_base"] not in failed]
    rows = [r for n in [*methods, MEAN_BASELINE] for r in dict.fromkeys(x["method"] for x in records
                                                                           if x["_base"] == n)]
    rank_of = {r: i for i, r in enumerate(rows)}
    records.sort(key=lambda r: (order[r["case_id"]], rank_of[r["method"]]))
    for r in records:
        del r["_base"]
        for k in METRIC_KEYS:
            r.setdefault(k, None)
    infos = {}
    for m in live:
        if m.name in failed:
            continue
        mine = [r for r in records if r["method"] == m.name]
        infos[m.name] = {**m.info, "scored_cases": len(mine), "resampled_cases": sum(r["resampled"] for r in mine)}
    skipped = list(dict.fromkeys(s for part in gathered for s in part["skipped"]))
    notes = list(skipped)
    if settings["num_samples"] > 1 and any(not m.stochastic for m in live if m.name in infos):
        notes.append(f"--num-samples {settings['num_samples']} applies to stochastic methods only; deterministic "
                     "ones were reconstructed once per case.")
    if any(i.get("resampled_cases") for i in infos.values()):
        notes.append("Outputs on another grid than the case's were resampled to it by trilinear interpolation "
                     "(align_corners=False) before scoring; see the Methods table.")
    truth_emb = {cid: v for part in gathered for cid, v in part["truth_embolus"].items()}
    truth_emb = {cid: truth_emb[cid] for cid in ids if cid in truth_emb}
    figures = {cid: [img for name, img in fig if name not in failed]
               for part in gathered for cid, fig in part["figures"].items()}
    figures = {cid: figures[cid] for cid in ids if cid in figures}
    fail_list = [{k: v for k, v in f.items() if k != "_key"} for f in failures.values()]
    results = {
        "format": FORMAT, "version": 1, "command": command,
        "settings": {**settings, "num_cases": len(ids), "num_embolus_cases": len(truth_emb),
                     "clipping": f"ground truth and outputs clipped to the HU window {settings['hu_window']} "
                                 f"before every metric; PSNR/SSIM data range {settings['data_range_hu']:g} HU"},
        "versions": _versions(), "cases": list(ids), "methods": infos, "rows": rows,
        "per_case": records, "summary": summarize(records, rows), "failures": fail_list, "notes": notes,
        "ground_truth_embolus": truth_emb,
        "figures": [f"figures/{cid}.png" for cid in figures],
        "seconds_total": round(time.perf_counter() - t_start, 3),
    }
    if main:
        write_outputs(out, results, figures)
    return results


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("xray2ct", "torch", "numpy", "scipy", "accelerate", "zarr"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _command(store, methods, out, **kw) -> str:
    """The command line equivalent to an :func:`evaluate` call."""
    args = ["xray2ct", "evaluate", "--store", str(store), "--split", kw["split"]]
    for name, path in methods.items():
        args += ["--method", f"{name}={path}"]
    args += ["--out", str(out)]
    for flag, key in (("--num-samples", "num_samples"), ("--steps", "steps"), ("--guidance", "guidance"),
                      ("--drr-guidance", "drr_guidance"), ("--seed", "seed"), ("--figure-cases", "figure_cases"), ("--max-cases", "max_cases"),
                      ("--lpips-weights", "lpips_weights"), ("--device", "device"), ("--preset", "preset")):
        if kw[key] is not None:
            args += [flag, str(kw[key])]
    if not kw["mean_baseline"]:
        args.append("--no-mean-baseline")
    return shlex.join(args)


# --- command line -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xray2ct evaluate", description="Score reconstruction methods on a store's "
                                "split (one process here; several under accelerate launch -m launch.evaluate).")
    p.add_argument("--store", required=True, help="dataset store (Zarr)")
    p.add_argument("--split", default="test", help="train, val or test (default: test)")
    p.add_argument("--method", action="append", default=[], metavar="NAME=PATH",
                   help="a method to score: NAME ([A-Za-z0-9_.-]+) = checkpoint, run, latest file or export (repeat)")
    p.add_argument("--out", required=True, help="output directory (written aside, renamed into place)")
    p.add_argument("--num-samples", type=int, default=1, metavar="K",
                   help="samples per case of stochastic methods; K > 1 also scores their mean as NAME-meanK")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (diffusion; default: its config)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (diffusion)")
    p.add_argument("--drr-guidance", type=int, default=None, metavar="N",
                   help="projection-consistency iterations per sampler step (diffusion; 0 = off; default: its config)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (mixed with each case id)")
    p.add_argument("--figure-cases", type=int, default=2, metavar="N", help="comparison figures of the first N cases")
    p.add_argument("--figure-case", action="append", default=[], metavar="ID",
                   help="a case to draw a comparison figure for (repeat; overrides --figure-cases)")
    p.add_argument("--max-cases", type=int, default=None, metavar="N", help="score only the first N cases")
    p.add_argument("--no-mean-baseline", action="store_true", help=f"leave out the {MEAN_BASELINE} row")
    p.add_argument("--lpips-weights", default=None, metavar="PATH",
                   help="safetensors feature network: adds the LPIPS 2.5D column")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: the process's device)")
    p.add_argument("--preset", default="cpu-demo", help="preset whose HU window sets clipping and data range")
    return p


def main(argv: Sequence[str] | None = None, *, prog: str = "xray2ct evaluate") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse printed the usage error (status 2) or --help (0)
        return int(exc.code or 0)
    try:
        results = evaluate(
            args.store, parse_methods(args.method), args.out, split=args.split, num_samples=args.num_samples,
            steps=args.steps, guidance=args.guidance, drr_guidance=args.drr_guidance, seed=args.seed, figure_cases=args.figure_cases,
            max_cases=args.max_cases, mean_baseline=not args.no_mean_baseline, lpips_weights=args.lpips_weights,
            figure_case_ids=args.figure_case or None,
            device=args.device, preset=args.preset, command=shlex.join([*prog.split(), *argv]))
    except InputError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(f"xray2ct evaluate: {len(results['cases'])} cases, {len(results['rows'])} rows, "
              f"{len(results['failures'])} failed method(s) -> {args.out}/summary.md", file=sys.stderr, flush=True)
    return 2 if results["failures"] else 0


if __name__ == "__main__":
    sys.exit(main(prog=f"{Path(sys.executable).name} -m launch.evaluate"))
