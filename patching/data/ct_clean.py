"""What a real CT has that a chest phantom has not: field-of-view padding and the patient table.

Scanners reconstruct a circular field of view (FOV) and fill the corners of the square image
with a padding value far below air — −2048, −3024, −3000, −32768 are common (DICOM
PixelPaddingValue) — and the patient lies on a table that shows as a curved bright slab behind
the back. Left in, the padding would be interpolated into the body edge by resampling and would
dominate every HU window's floor, and the table would add a bright band to every DRR that no
X-ray of a standing patient has. :func:`clean_ct` handles both, in two steps:

1. **Padding → air, before resampling.** HU below −1024 (the bottom of the 12-bit CT scale;
   air is −1000) are not tissue: they are set to the volume's own air value, the median of its
   voxels in [−1024, −900) (−1000 if it has none), so the FOV's edge leaves no step in the
   background. Padding that is already air-like (−1000 or −1024) needs nothing.
2. **Table → air, after resampling** (:func:`remove_table`). A body mask: voxels above −500 HU
   (fat, soft tissue, bone), opened in-plane with a 4 mm disc so that thin contacts (mattress,
   table top, ECG leads) break, labelled in 3D. The largest component is the body; another
   component is kept too (a raised arm cut off by the FOV) if it holds at least 1 % of the body's
   voxels and its centre lies in front of the body's posterior quarter. What remains outside the
   kept components (grown by 5 mm for their edges) and is denser than −900 HU — the table, its
   pads, blankets, cables — becomes air. Air and lung-like values outside the body are left as
   they are (they are the scanner's real background noise). Nothing is removed when no solid
   body is found (at least 100 cm³), so volumes that are not patients pass through unchanged.

The table is looked for behind the body (posterior, −y in RAS+): a supine patient. A prone
patient's table lies in front and is kept; a table pressed so hard against the back that a
4 mm opening does not separate them is kept as well.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from patching.data.spec import AIR_HU

BODY_HU = -500.0  # above: fat, soft tissue, bone (lungs are enclosed and filled per slice)
NOT_AIR_HU = -900.0  # outside the body, anything denser than this is an object, not air
OPEN_MM = 4.0
MARGIN_MM = 5.0
MIN_BODY_ML = 100.0


def air_value(hu: np.ndarray) -> float:
    """The volume's air HU: median of its voxels in [−1024, −900), −1000 if there are none."""
    sample = np.asarray(hu).reshape(-1)[:: max(1, hu.size // 2_000_000)]
    air = sample[(sample >= AIR_HU) & (sample < NOT_AIR_HU)]
    return float(np.median(air)) if air.size else -1000.0


def clip_padding(hu: np.ndarray) -> tuple[np.ndarray, int]:
    """Set voxels below −1024 HU (FOV padding) to the volume's air value; returns
    ``(hu as float32, number of voxels changed)``. Changes ``hu`` in place when it is float32."""
    hu = np.asarray(hu, dtype=np.float32)
    pad = hu < AIR_HU
    n = int(np.count_nonzero(pad))
    if n:
        hu[pad] = air_value(hu)
    return hu, n


def _disc(spacing_xy, radius_mm: float) -> np.ndarray:
    rx, ry = (max(1, int(np.floor(radius_mm / s))) for s in spacing_xy)
    gx, gy = np.ogrid[-rx:rx + 1, -ry:ry + 1]
    return ((gx * spacing_xy[0]) ** 2 + (gy * spacing_xy[1]) ** 2) <= radius_mm ** 2


def body_components(hu: np.ndarray, spacing_mm) -> np.ndarray | None:
    """Boolean mask of the patient (body and any raised arm), or None when no body is found."""
    sx, sy, sz = (float(s) for s in spacing_mm)
    solid = np.asarray(hu) > BODY_HU
    solid = ndimage.binary_opening(solid, structure=_disc((sx, sy), OPEN_MM)[:, :, None])
    labels, n = ndimage.label(solid)
    if n == 0:
        return None
    sizes = np.bincount(labels.reshape(-1), minlength=n + 1)
    sizes[0] = 0
    body = int(np.argmax(sizes))
    if sizes[body] * sx * sy * sz < MIN_BODY_ML * 1000.0:
        return None
    y_sum = np.zeros(n + 1)
    for j in range(hu.shape[1]):  # per-component mean y without a full-size index array
        y_sum += j * np.bincount(labels[:, j, :].reshape(-1), minlength=n + 1)
    y_of = y_sum / np.maximum(sizes, 1)
    body_y = np.nonzero((labels == body).any(axis=(0, 2)))[0]
    back = body_y.min() + 0.25 * (body_y.max() - body_y.min())
    keep = (sizes >= 0.01 * sizes[body]) & (y_of >= back)
    keep[body] = True
    keep[0] = False
    return keep[labels]


def remove_table(hu: np.ndarray, spacing_mm) -> tuple[np.ndarray, int]:
    """Set the objects outside the patient (table, pads, cables) to air; returns
    ``(hu, number of voxels changed)``, ``hu`` changed in place (float32 in, float32 out)."""
    hu = np.asarray(hu, dtype=np.float32)
    # Large volumes: find the body on every second voxel (8x less memory for the labels).
    step = 2 if hu.size > (1 << 25) else 1
    spacing = tuple(float(s) * step for s in spacing_mm)
    mask = body_components(hu[::step, ::step, ::step], spacing)
    if mask is None:
        return hu, 0
    # Lungs, airways and bowel gas are inside the body: fill each axial slice's holes, then
    # grow the mask by the margin (the skin's blurred edge, what the opening shaved off).
    for k in range(mask.shape[2]):
        mask[:, :, k] = ndimage.binary_fill_holes(mask[:, :, k])
    mask = ndimage.binary_dilation(mask, structure=_disc(spacing[:2], MARGIN_MM)[:, :, None])
    if step > 1:
        for axis in range(3):
            mask = np.repeat(mask, step, axis=axis)
        mask = mask[: hu.shape[0], : hu.shape[1], : hu.shape[2]]
    objects = ~mask & (hu > NOT_AIR_HU)
    n = int(np.count_nonzero(objects))
    if n:
        hu[objects] = air_value(hu)
    return hu, n
