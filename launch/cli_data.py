"""``xray2ct data ...`` handlers: synth, ingest, drr, inspect, preview, lowdose."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from patching.checks import safe_name
from patching.data.store import Store
from patching.errors import InputError, StorageError


def _synth(args) -> int:
    from launch.presets import data_spec
    from patching.data.synth_store import cpu_count, synthesize

    spec = data_spec(args.preset)
    shape = tuple(args.shape) if args.shape else spec.shape
    store = Store(args.store, create=True)
    workers = args.workers or cpu_count()
    written = synthesize(store, args.num, shape, seed=args.seed, emboli=args.emboli, views=args.views,
                         xray_size=args.xray_size, workers=workers, spacing_mm=spec.spacing_mm)
    print(f"{len(written)} phantom(s) written, {args.num - len(written)} already present -> {store.path}")
    return 0


def _ingest(args) -> int:
    from launch.presets import data_spec
    from patching.data.ingest import ingest
    from patching.data.splits import SplitAssignment, read_splits

    spec = data_spec(args.preset)
    for src in args.sources:
        if not os.path.exists(src):
            raise InputError(src, "no such file or directory")
    splits = SplitAssignment(read_splits(args.splits) if args.splits else None, args.split)
    store = Store(args.store, create=True)
    report = ingest(args.sources, store, spec, workers=max(1, args.workers), splits=splits)
    for path, problem in report.failed:
        print(f"error: {path}: {problem}", file=sys.stderr)
    if report.unmatched:
        shown = ", ".join(report.unmatched[:5]) + (" ..." if len(report.unmatched) > 5 else "")
        print(f"warning: {args.splits}: {len(report.unmatched)} name(s) match no case: {shown}", file=sys.stderr)
    moved = f", moved {len(report.resplit)} present case(s) to the stated split" if report.resplit else ""
    print(f"ingested {len(report.ingested)}, skipped {len(report.skipped)} (already present){moved}, "
          f"failed {len(report.failed)} -> {store.path}")
    return 2 if report.failed else 0


def _load_volume(path: str):
    from patching.data.ingest import load_nifti

    if not os.path.isfile(path):
        raise InputError(path, "no such file")
    return load_nifti(path)


def _drr(args) -> int:
    from patching.data.synth_store import render_store_views

    if args.input:
        if not args.out:
            raise InputError("--out", "is required with --input")
        import torch

        from patching.projection.drr import DRRGeometry, render_drr

        hu, spacing, _ = _load_volume(args.input)
        kw = {k: v for k, v in dict(sdd_mm=args.sdd, sid_mm=args.sid, height=args.height, width=args.width,
                                     pixel_mm=args.pixel_mm).items() if v is not None}
        geometry = DRRGeometry(parallel=args.parallel, **kw)
        with torch.no_grad():
            img = render_drr(torch.from_numpy(np.asarray(hu, dtype=np.float32)), spacing, view=args.view,
                             geometry=geometry).cpu().numpy()
        write_image(args.out, img)
        print(f"{args.view} DRR {img.shape[0]}x{img.shape[1]} -> {args.out}")
        return 0
    if not args.store:
        raise InputError("xray2ct data drr", "give --store S, or --input CT.nii.gz --out IMG")
    n = render_store_views(Store(args.store), args.views, xray_size=args.xray_size, force=args.force)
    print(f"{n} view(s) rendered -> {args.store}")
    return 0


def write_image(out: str, img: np.ndarray) -> None:
    """Write a [0, 1] float image as 8-bit PNG or float32 .npy (aside, then renamed)."""
    from PIL import Image

    path = Path(out)
    if path.suffix.lower() not in (".png", ".npy"):
        raise InputError(out, "output must end in .png or .npy")
    if path.is_dir():
        raise InputError(out, "is a directory; give an image file name")
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() == ".npy":
            np.save(tmp, np.asarray(img, dtype=np.float32))
        else:
            Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)).save(tmp)
        os.replace(tmp, path)
    except OSError as err:  # a parent that is a file, a read-only or full disk
        if tmp.parent.is_dir():
            tmp.unlink(missing_ok=True)
        raise StorageError.from_os(out, "cannot write the image", err) from None


def inspect_table(store: Store) -> str:
    rows = [("case", "source", "shape", "spacing mm", "HU range", "views", "split", "labels", "status")]
    for cid in store.case_ids():
        c = store.case(cid)
        labels = ",".join(f"{k}={v}" for k, v in c.labels.items() if k in ("embolus",)) or "-"
        rows.append((cid, str(c.attrs.get("source") or "-"), "x".join(map(str, c.shape)), "x".join(f"{s:g}" for s in c.spacing_mm),
                     f"{c.attrs['hu_min']}..{c.attrs['hu_max']}", ",".join(c.views()) or "-", c.split,
                     labels, "complete" + (" +latent" if c.has_latent else "")))
    staging = store.staging()
    half = [p for p in store.incomplete() if p.parent == store.cases_dir]  # unfinished groups in cases/
    for p in half:
        rows.append((p.name, "?", "?", "?", "?", "?", "?", "?", "incomplete"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    counts = {s: len(store.case_ids(s)) for s in ("train", "val", "test")}
    lines.append(f"{len(rows) - 1} case(s): " + ", ".join(f"{k} {v}" for k, v in counts.items())
                 + f", incomplete {len(half)}")
    if staging:  # work in progress of writers, not cases
        stale = sum(1 for _, is_stale in staging if is_stale)
        lines.append(f"staging: {len(staging)} entr{'y' if len(staging) == 1 else 'ies'} in .staging/ "
                     f"({len(staging) - stale} of running writers, {stale} left by killed ones: "
                     "removed by the next `data synth`, `data ingest`, `data drr` or `encode` on this store)")
    return "\n".join(lines)


def _preview(args) -> int:
    from patching.data.preview import save_triplanar_png

    safe_name(args.case, "--case", "case id")  # checked like an id read from a file
    store = Store(args.store)
    c = store.case(args.case)
    out = save_triplanar_png(args.out, np.asarray(c.ct[...]), c.spacing_mm,
                             xrays={v: c.xray(v) for v in c.views()}, title=c.case_id)
    print(f"preview -> {out}")
    return 0


def _lowdose(args) -> int:
    from patching.data.ingest import load_nifti
    from patching.data.volume_io import check_nifti_out, write_nifti_like
    from patching.projection.lowdose import LowDoseScanner, check_dose, simulate_volume

    out = check_nifti_out(args.out)
    dose = check_dose(args.dose)
    try:
        scanner = LowDoseScanner(photons=args.photons)
    except InputError as err:
        raise InputError("--photons", err.problem) from None
    hu, spacing, _ = load_nifti(args.input)
    low = simulate_volume(hu, spacing, dose, seed=args.seed, scanner=scanner, progress=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_nifti_like(out, low, Path(args.input))
    print(f"dose {dose:g} (seed {args.seed}): noise std {float(np.std(low - hu)):.1f} HU over the volume -> {out}")
    return 0


def run(args) -> int:
    if args.data_cmd == "inspect":
        print(inspect_table(Store(args.store)))
        return 0
    return {"synth": _synth, "ingest": _ingest, "drr": _drr, "preview": _preview,
            "lowdose": _lowdose}[args.data_cmd](args)
