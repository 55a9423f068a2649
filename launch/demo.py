"""``xray2ct demo``: the pipeline on synthetic chest phantoms, on a CPU.

Today it synthesises phantoms, renders their PA and lateral X-rays, writes a tri-planar PNG
preview and prints where everything is. Training, sampling and evaluation join as the stages
land (see the open issues).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from launch.cli_data import inspect_table
from launch.presets import data_spec
from patching.preview import save_grid_png, triplanar_image
from patching.store import Store
from patching.synth_store import cpu_count, synthesize


def run_demo(args) -> int:
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = data_spec("cpu-demo")
    store = Store(out / "phantoms.zarr", create=True)
    print(f"[1/2] synthesising {args.num} chest CTPA phantoms {spec.shape} with PA + lateral DRRs")
    synthesize(store, args.num, spec.shape, seed=args.seed, emboli=0.3, workers=cpu_count())
    print(inspect_table(store))

    print("[2/2] writing tri-planar previews")
    rows = []
    for cid in store.case_ids()[:4]:
        c = store.case(cid)
        rows.append(triplanar_image(np.asarray(c.ct[...]), c.spacing_mm,
                                    xrays={v: c.xray(v) for v in c.views()}, title=cid, height=192))
    preview = save_grid_png(out / "phantoms_preview.png", rows)
    print(f"\ndone in {time.perf_counter() - t0:.1f} s")
    print(f"  store    {store.path}   (inspect: xray2ct data inspect --store {store.path})")
    print(f"  preview  {preview}")
    return 0
