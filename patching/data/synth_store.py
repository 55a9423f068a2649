"""Fill a store with chest phantoms and their rendered X-rays (``xray2ct data synth``), and
render views for the cases of any store (``xray2ct data drr --store``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict

import numpy as np
from tqdm.auto import tqdm

from patching.data.spec import centred_affine
from patching.data.store import Store, split_by_index
from patching.errors import InputError

VIEWS = ("pa", "lateral")


def default_xray_size(shape: Sequence[int]) -> int:
    """Detector pixels per side: 128 for small (demo) volumes, 256 for full-size ones."""
    return 128 if max(shape) <= 160 else 256


def case_seed(seed: int, index: int) -> int:
    """Independent, reproducible per-case seed (SeedSequence mixing, not ``seed + index``)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def render_views(hu: np.ndarray, spacing_mm, views: Sequence[str], size: int) -> dict:
    """Cone-beam DRRs of ``hu`` for each view, with the geometry as plain attributes."""
    import torch

    from patching.projection.drr import chest_geometry, render_drr

    geometry = chest_geometry(size, size)
    out = {}
    with torch.no_grad():
        vol = torch.from_numpy(np.asarray(hu, dtype=np.float32))
        for view in views:
            img = render_drr(vol, spacing_mm, view=view, geometry=geometry)
            attrs = {"view": view, "renderer": "xray2ct.drr", "geometry": asdict(geometry)}
            out[view] = (img.detach().cpu().numpy().astype(np.float32), attrs)
    return out


def _synth_one(store_path: str, case_id: str, shape, seed: int, emboli: bool, split: str,
               views: Sequence[str], size: int, fov_mm=None) -> tuple[str, bool]:
    import torch

    from patching.phantoms.chest import synth_chest

    torch.set_num_threads(1)  # parallelism is across cases
    store = Store(store_path)
    if store.has_case(case_id):
        return case_id, False
    ph = synth_chest(tuple(shape), seed=seed, emboli=emboli, **({} if fov_mm is None else {"fov_mm": fov_mm}))
    masks = {"embolus": ph.embolus_mask} if ph.embolus_mask is not None else None
    rendered = render_views(ph.hu, ph.spacing_mm, views, size) if views else None
    written = store.write_case(
        case_id, ph.hu, ph.spacing_mm, centred_affine(ph.hu.shape, ph.spacing_mm), split=split,
        source="phantom", labels=ph.labels, masks=masks, views=rendered,
    )
    return case_id, written


def synthesize(store: Store, num: int, shape: Sequence[int] = (64, 64, 64), *, seed: int = 0,
               emboli: float = 0.0, views: Sequence[str] = VIEWS, xray_size: int | None = None,
               workers: int = 1, progress: bool = True, spacing_mm: Sequence[float] | None = None) -> list[str]:
    """Write ``num`` phantoms (ids ``phantom-s<seed>-<i>``) with X-rays into ``store``.

    ``spacing_mm`` fixes the voxel size (field of view = shape × spacing, e.g. a preset's grid:
    512×512×604 at 0.7×0.7×0.6 mm); by default the phantom's 360 mm cube is divided by ``shape``.

    Splits are by index (last 10 % test, 10 % val). Cases already complete are skipped, so a
    re-run finishes an interrupted one. Returns the ids written now.
    """
    if num < 1:
        raise InputError("--num", f"needs at least 1 case, got {num}")
    if not 0.0 <= emboli <= 1.0:
        raise InputError("--emboli", f"is a probability in [0, 1], got {emboli}")
    if len(shape) != 3 or min(shape) < 8:
        raise InputError("--shape", f"needs three sizes of at least 8, got {tuple(shape)}")
    for v in views:
        if v not in VIEWS:
            raise InputError("--views", f"unknown view {v!r}; expected {' or '.join(VIEWS)}")
    size = xray_size or default_xray_size(shape)
    jobs = []
    for i in range(num):
        cs = case_seed(seed, i)
        has_emboli = bool(np.random.default_rng(cs).random() < emboli)
        fov = None if spacing_mm is None else tuple(float(n) * float(s) for n, s in zip(shape, spacing_mm, strict=True))
        jobs.append((str(store.path), f"phantom-s{seed}-{i:04d}", tuple(shape), cs, has_emboli,
                     split_by_index(i, num), tuple(views), size, fov))
    written = []
    # `with`: the bar ends its line even when a write fails, so the error message starts a line.
    with tqdm(total=num, desc="phantoms", unit="case", disable=not progress) as bar:
        if workers <= 1:
            for job in jobs:
                cid, ok = _synth_one(*job)
                written += [cid] if ok else []
                bar.update()
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for fut in as_completed([pool.submit(_synth_one, *job) for job in jobs]):
                    cid, ok = fut.result()
                    written += [cid] if ok else []
                    bar.update()
    return sorted(written)


def render_store_views(store: Store, views: Sequence[str] = VIEWS, *, xray_size: int | None = None,
                       force: bool = False, progress: bool = True) -> int:
    """Render missing (or, with ``force``, all) views for every case. Returns views written."""
    n = 0
    ids = store.case_ids()
    for cid in tqdm(ids, desc="DRR", unit="case", disable=not progress):
        case = store.case(cid)
        todo = [v for v in views if force or v not in case.views()]
        if not todo:
            continue
        hu = np.asarray(case.ct[...])
        for view, (img, attrs) in render_views(hu, case.spacing_mm, todo, xray_size or default_xray_size(hu.shape)).items():
            store.write_view(cid, view, img, attrs)
            n += 1
    return n


def cpu_count() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
