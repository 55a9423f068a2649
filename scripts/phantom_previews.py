"""Tri-planar previews and PA/lateral DRRs of chest phantoms, for ``docs/images/``.

One PNG per call: for each seed, a row with the axial, coronal and sagittal slices through the
volume centre and the PA and lateral DRRs (the renderer of ``xray2ct data synth``), then a row
of axial slices at five heights (shoulders, upper chest, carina, lung bases, upper abdomen) to
show how the cross-section changes along z. Window −1000…600 HU, radiological display
convention (:mod:`patching.data.preview`).

Run (from the repository root):
``.venv/bin/python scripts/phantom_previews.py --tag after``
(``--tag before`` was made with the generator of commit 0cc4ad1, before the chest anatomy.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from patching.data.preview import (  # noqa: E402
    _physical_resize,
    _to_uint8,
    labelled_row,
    save_grid_png,
    triplanar_image,
)
from patching.data.synth_store import render_views  # noqa: E402
from patching.phantoms.chest import synth_chest  # noqa: E402

LEVELS_MM = (150.0, 90.0, 20.0, -70.0, -140.0)  # world z of the axial row (volume centre = 0)


def axial_row(hu: np.ndarray, spacing, height: int, title: str) -> Image.Image:
    z = (np.arange(hu.shape[2]) - (hu.shape[2] - 1) / 2.0) * spacing[2]
    tiles = []
    for level in LEVELS_MM:
        k = int(np.argmin(np.abs(z - level)))
        sl = hu[:, :, k][::-1, ::-1].T  # radiological: patient's right on the image left
        tiles.append((f"z = {level:+.0f} mm",
                      _physical_resize(_to_uint8(sl, -1000.0, 600.0), spacing[1], spacing[0],
                                       height)))
    return labelled_row(tiles, height, title)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tag", required=True, help="file name part: docs/images/phantom-<tag>.png")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--size", type=int, default=256, help="voxels per side (360 mm field of view)")
    ap.add_argument("--out", type=Path, default=Path("docs/images"))
    args = ap.parse_args()
    rows = []
    for seed in args.seeds:
        ph = synth_chest((args.size,) * 3, seed=seed)
        views = render_views(ph.hu, ph.spacing_mm, ("pa", "lateral"), 256)
        xr = {v: img for v, (img, _) in views.items()}
        rows.append(triplanar_image(ph.hu, ph.spacing_mm, xrays=xr, height=256,
                                    title=f"{args.tag}: seed {seed}, {args.size}^3, 360 mm FOV"))
        rows.append(axial_row(ph.hu, ph.spacing_mm, 160, f"{args.tag}: seed {seed}, axial levels"))
    path = save_grid_png(args.out / f"phantom-{args.tag}.png", rows)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
