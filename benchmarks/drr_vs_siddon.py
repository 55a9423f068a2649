"""DRR projector vs an exact Siddon ray tracer at full size: NCC and mean ratio per view.

Volumes: a chest-CT-like 512×512×140 volume at 0.7×0.7×2.5 mm (the chest phantom with its
anatomy off the volume centre, a circular scanner field of view padded with −2048 HU) and the
isotropic phantom 256³ at 1.4 mm; the default chest geometry (256×256 detector, sdd 1800 mm,
sid 1650 mm), PA and lateral. The oracle is ``tests/patching/siddon.py`` (NumPy, minutes per
view); ``tests/patching/test_drr_siddon.py`` checks the same at a reduced size in the suite.

Run: ``.venv/bin/python benchmarks/drr_vs_siddon.py [--no-record]`` (~5 min on 2 cores).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks._common import record  # noqa: E402
from patching.phantoms.chest import synth_chest  # noqa: E402
from patching.projection.drr import DRRGeometry, hu_to_mu, line_integrals  # noqa: E402
from tests.patching.siddon import ncc, siddon_line_integrals  # noqa: E402
from tests.patching.test_drr_siddon import chest_ct_like  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    geometry = DRRGeometry()
    volumes = {
        "chest-ct-like 512x512x140 @0.7x0.7x2.5": (lambda: chest_ct_like((512, 512, 140), (0.7, 0.7, 2.5), seed=1),
                                                   (0.7, 0.7, 2.5)),
        "phantom 256^3 @1.4": (lambda: synth_chest((256, 256, 256), seed=0, fov_mm=(358.4,) * 3).hu, (1.4,) * 3),
    }
    figures = {"geometry": {"height": geometry.height, "width": geometry.width, "pixel_mm": geometry.pixel_mm,
                            "sdd_mm": geometry.sdd_mm, "sid_mm": geometry.sid_mm}, "results": {}}
    for name, (make, spacing) in volumes.items():
        mu = hu_to_mu(torch.from_numpy(np.ascontiguousarray(make(), dtype=np.float32))[None, None])
        for view in ("pa", "lateral"):
            t0 = time.perf_counter()
            oracle = siddon_line_integrals(mu[0, 0].numpy(), spacing, view, geometry, chunk_rays=256)
            t_oracle = time.perf_counter() - t0
            got = line_integrals(mu, spacing, view, geometry)[0].double().numpy()
            r = {"ncc": round(ncc(got, oracle), 6), "mean_ratio": round(float(got.mean() / oracle.mean()), 5),
                 "siddon_s": round(t_oracle, 1)}
            figures["results"][f"{name} {view}"] = r
            print(f"{name:<42} {view:<8} NCC {r['ncc']:.6f}  mean ratio {r['mean_ratio']:.5f}  "
                  f"(Siddon {t_oracle:.0f} s)", flush=True)
    if not args.no_record:
        print("recorded", record("drr-vs-siddon", figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
