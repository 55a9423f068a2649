"""Tri-planar PNG previews of volumes (and their X-rays), in radiological display convention.

Volumes are RAS+ ``[x, y, z]`` (nibabel's convention: x increases towards the patient's Right,
y towards Anterior, z towards Superior). Radiologists view axial and coronal slices with the
patient's right on the image left, sagittal slices with anterior on the left, and superior (in
axial: anterior) at the top. For all three planes that is ``slice[::-1, ::-1].T`` of the 2D
slice taken from the ``[x, y, z]`` array (see :func:`display_slices`).

Drawn with Pillow only (no matplotlib): the pictures are small, and Pillow is already needed
for X-ray input.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from patching.errors import InputError

DEFAULT_WINDOW = (-1000.0, 600.0)  # a chest "overview" window: lungs, soft tissue and contrast


def _to_uint8(img: np.ndarray, lo: float, hi: float) -> np.ndarray:
    x = (np.asarray(img, dtype=np.float32) - lo) / max(hi - lo, 1e-6)
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def display_slices(volume: np.ndarray, index: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """Axial, coronal and sagittal 2D slices of an ``[x, y, z]`` volume in display orientation.

    ``index`` is the ``(x, y, z)`` voxel the three planes pass through (default: the centre).
    """
    vol = np.asarray(volume)
    if vol.ndim != 3:
        raise InputError("volume", f"a tri-planar preview needs a 3D volume, got shape {vol.shape}")
    cx, cy, cz = (s // 2 for s in vol.shape) if index is None else (int(i) for i in index)
    # slice[::-1, ::-1].T: rows run superior/anterior → inferior/posterior, columns patient's
    # right → left (axial, coronal) or anterior → posterior (sagittal).
    return {
        "axial": vol[:, :, cz][::-1, ::-1].T,  # [x, y] → rows anterior→posterior
        "coronal": vol[:, cy, :][::-1, ::-1].T,  # [x, z] → rows superior→inferior
        "sagittal": vol[cx, :, :][::-1, ::-1].T,  # [y, z] → rows superior→inferior
    }


def _physical_resize(img: np.ndarray, row_mm: float, col_mm: float, height: int) -> Image.Image:
    """Resize a uint8 slice to ``height`` pixels tall with square physical pixels."""
    h, w = img.shape
    width = max(1, round(height * (w * col_mm) / (h * row_mm)))
    return Image.fromarray(img).resize((width, height), Image.Resampling.BILINEAR)


def triplanar_image(
    hu: np.ndarray,
    spacing_mm: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    xrays: Mapping[str, np.ndarray] | None = None,
    window: tuple[float, float] = DEFAULT_WINDOW,
    height: int = 256,
    title: str | None = None,
) -> Image.Image:
    """One row: axial, coronal, sagittal slices through the centre, then any X-ray views."""
    sx, sy, sz = (float(s) for s in spacing_mm)
    sl = display_slices(hu)
    tiles = [
        ("axial", _physical_resize(_to_uint8(sl["axial"], *window), sy, sx, height)),
        ("coronal", _physical_resize(_to_uint8(sl["coronal"], *window), sz, sx, height)),
        ("sagittal", _physical_resize(_to_uint8(sl["sagittal"], *window), sz, sy, height)),
    ]
    for name, img in (xrays or {}).items():
        arr = np.asarray(img, dtype=np.float32)
        tiles.append((f"X-ray {name}", _physical_resize(_to_uint8(arr, 0.0, 1.0), 1.0, 1.0, height)))
    return labelled_row(tiles, height, title)


def labelled_row(tiles: Sequence[tuple[str, Image.Image]], height: int, title: str | None = None) -> Image.Image:
    """Images of one ``height`` side by side, each under its label, with an optional title line."""
    pad, top = 6, 18 if title else 0
    label_h = 14
    width = sum(t.width for _, t in tiles) + pad * (len(tiles) + 1)
    canvas = Image.new("L", (width, height + label_h + top + 2 * pad), 0)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, 3), title, fill=255)
    x = pad
    for name, t in tiles:
        canvas.paste(t, (x, top + pad + label_h))
        draw.text((x, top + pad), name, fill=200)
        x += t.width + pad
    return canvas


def save_triplanar_png(path: str | os.PathLike, hu: np.ndarray, spacing_mm=(1.0, 1.0, 1.0), **kwargs) -> Path:
    """Write :func:`triplanar_image` to ``path`` (written aside, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    triplanar_image(hu, spacing_mm, **kwargs).save(tmp)
    os.replace(tmp, path)
    return path


def save_grid_png(path: str | os.PathLike, rows: Sequence[Image.Image]) -> Path:
    """Stack several preview rows vertically into one PNG."""
    path = Path(path)
    width = max(r.width for r in rows)
    canvas = Image.new("L", (width, sum(r.height for r in rows)), 0)
    y = 0
    for r in rows:
        canvas.paste(r, (0, y))
        y += r.height
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    canvas.save(tmp)
    os.replace(tmp, path)
    return path
