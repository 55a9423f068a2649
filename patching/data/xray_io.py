"""Read X-ray images from users: PNG / JPEG (Pillow), DICOM DX / CR (pydicom) and ``.npy``.

Every reader returns the project's X-ray convention: a 2D float32 array in [0, 1], indexed
``[row, col]`` as the image is displayed, bone bright.

Normalisation, by source:

* 8-bit images (``L``, ``RGB``, palette, …): ``value / 255``. Colour becomes luminance with the
  ITU-R 601 weights (0.299 R + 0.587 G + 0.114 B), computed in float before any rounding.
* 16-bit images (``I;16*``; ``I`` holding values in [0, 65535], which is how Pillow opens some
  16-bit PNGs): ``value / 65535``. ``I`` outside that range and float ``F`` images follow the
  ``.npy`` rule.
* DICOM: Modality LUT or RescaleSlope/Intercept, then the VOI LUT or the first window
  (WindowCenter/Width) when present (``pydicom.pixels.apply_modality_lut`` / ``apply_voi_lut``);
  the result is scaled from the output range of that chain to [0, 1]: the BitsStored range
  passed through the rescale (``0 .. 2**BitsStored - 1`` for unsigned pixels), or
  ``0 .. 2**bits - 1`` of a VOI LUT's descriptor — the range pydicom's windowing maps onto.
  MONOCHROME1 (bone dark as stored) is inverted last, ``1 - value``, so bone is bright.
* ``.npy``: floats already within [0, 1] are kept as they are; anything else (other floats,
  integers, bools) is min–max scaled to [0, 1].

Images are not inverted or equalised otherwise: a PNG is taken as displayed.
Resizing (:func:`resize_xray`) is antialiased bilinear — Pillow's triangle filter with its
support widened by the reduction factor, numerically what ``torch.nn.functional.interpolate(...,
mode="bilinear", antialias=True)`` computes — which never overshoots, so [0, 1] is kept.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, ImageOps, UnidentifiedImageError
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from patching.errors import InputError

__all__ = ["read_xray", "resize_xray"]

_DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)


def _check_size(size) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in size)
        ok = h > 0 and w > 0 and (h, w) == tuple(size)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise InputError("size", f"needs two positive integers (height, width), got {size!r}")
    return h, w


def _minmax(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def _float_rule(a: np.ndarray) -> np.ndarray:
    """Floats already in [0, 1] kept; anything else min–max scaled."""
    if a.dtype.kind == "f" and a.min() >= 0.0 and a.max() <= 1.0:
        return a.astype(np.float64)
    return _minmax(a)


def _read_npy(path: Path) -> np.ndarray:
    try:
        a = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise InputError(path, f"unreadable .npy file ({type(e).__name__}: {e})") from None
    if not isinstance(a, np.ndarray) or a.dtype.kind not in "biuf":
        raise InputError(path, f"needs a numeric 2D array, got dtype {getattr(a, 'dtype', type(a))}")
    if a.ndim != 2:
        raise InputError(path, f"needs a 2D array [row, col], got shape {a.shape}")
    if a.size == 0:
        raise InputError(path, f"image is empty (shape {a.shape})")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise InputError(path, f"has {int(a.size - np.isfinite(a).sum())} NaN or Inf value(s)")
    return _float_rule(a)


def _read_pillow(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            frames = getattr(img, "n_frames", 1)
            if frames > 1:
                raise InputError(path, f"has {frames} frames; need a single 2D image")
            img.load()
            img = ImageOps.exif_transpose(img)  # as a viewer shows it (phone photos, scanners)
    except InputError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(path, f"unreadable or corrupt image ({type(e).__name__}: {e})") from None
    mode = img.mode
    if mode.startswith("I;16"):
        return np.asarray(img, dtype=np.float64) / 65535.0
    if mode == "I":
        a = np.asarray(img)
        return a / 65535.0 if a.min() >= 0 and a.max() <= 65535 else _minmax(a)
    if mode == "F":
        a = np.asarray(img)
        if not np.isfinite(a).all():
            raise InputError(path, "has NaN or Inf pixels")
        return _float_rule(a)
    if mode == "1":
        return np.asarray(img.convert("L"), dtype=np.float64) / 255.0
    if mode in ("L", "LA", "La"):
        return np.asarray(img.getchannel(0), dtype=np.float64) / 255.0
    rgb = np.asarray(img.convert("RGB"), dtype=np.float64)   # RGB(A), P, CMYK, YCbCr → 8-bit RGB
    return (rgb @ _LUMA) / 255.0


def _dicom_output_range(ds) -> tuple[float, float]:
    """Range of the modality + VOI chain's output (pydicom's windowing output range)."""
    voi_lut = ds.get("VOILUTSequence")
    if voi_lut:
        bits = int(voi_lut[0].LUTDescriptor[2])
        return 0.0, float(2**bits - 1)
    bits = int(ds.BitsStored)
    if ds.get("ModalityLUTSequence"):
        return 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    if int(ds.get("PixelRepresentation", 0)) == 0:
        lo, hi = 0.0, float(2**bits - 1)
    else:
        lo, hi = -float(2 ** (bits - 1)), float(2 ** (bits - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        lo, hi = sorted((lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)))
    return lo, hi


def _read_dicom(path: Path) -> np.ndarray:
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError) as e:
        raise InputError(path, f"unreadable DICOM file ({type(e).__name__}: {e})") from None
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise InputError(path, f"multi-frame DICOM ({frames} frames); need a single 2D radiograph")
    if "PixelData" not in ds:
        raise InputError(path, "DICOM file has no pixel data")
    try:
        stored = ds.pixel_array
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
        if stored.ndim == 3 and stored.shape[-1] == 3:       # RGB secondary capture → luminance
            value = (stored.astype(np.float64) @ _LUMA) / float(2 ** int(ds.BitsStored) - 1)
        elif stored.ndim == 2:
            modality = apply_modality_lut(stored, ds)
            has_voi = bool(ds.get("VOILUTSequence")) or ("WindowCenter" in ds and "WindowWidth" in ds)
            shown = apply_voi_lut(modality, ds) if has_voi else modality
            lo, hi = _dicom_output_range(ds)
            value = (np.asarray(shown, dtype=np.float64) - lo) / (hi - lo)
            if photometric == "MONOCHROME1":
                value = 1.0 - value
        else:
            raise InputError(path, f"pixel data of shape {stored.shape} is not a 2D image")
    except InputError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError, NotImplementedError, IndexError) as e:
        raise InputError(path, f"cannot decode DICOM pixel data ({type(e).__name__}: {e})") from None
    return np.clip(value, 0.0, 1.0)


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in _DICOM_SUFFIXES:
        return True
    with open(path, "rb") as fh:
        head = fh.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


def read_xray(path: str | os.PathLike, *, size: tuple[int, int] | None = None) -> np.ndarray:
    """Read an X-ray as float32 ``[row, col]`` in [0, 1], bone bright (see the module docstring
    for each format's normalisation), resized to ``size = (height, width)`` when given.

    Raises :class:`InputError` (one line naming the file) for a missing, empty, unreadable or
    corrupt file, an image that is not 2D (3D ``.npy``, multi-frame DICOM or GIF/TIFF), NaN
    values, and a blank (constant) image.
    """
    path = Path(path)
    if size is not None:
        size = _check_size(size)
    if not path.exists():
        raise InputError(path, "no such file")
    if path.is_dir():
        raise InputError(path, "is a directory, not an image")
    if path.stat().st_size == 0:
        raise InputError(path, "file is empty")
    if path.suffix.lower() == ".npy":
        img = _read_npy(path)
    elif _is_dicom(path):
        img = _read_dicom(path)
    else:
        img = _read_pillow(path)
    if img.ndim != 2:
        raise InputError(path, f"not a 2D image (shape {img.shape})")
    if not img.size or float(img.max()) - float(img.min()) < 1e-7:
        value = float(img.flat[0]) if img.size else float("nan")
        raise InputError(path, f"image is blank (every pixel is {value:.3g} after normalisation)")
    img = img.astype(np.float32)
    return resize_xray(img, size) if size is not None else img


def resize_xray(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a 2D float image to ``size = (height, width)`` with antialiased bilinear
    interpolation (Pillow ``F`` mode, BILINEAR; equal to torch's ``antialias=True``)."""
    h, w = _check_size(size)
    img = np.asarray(img, dtype=np.float32)
    if img.ndim != 2:
        raise InputError("image", f"needs a 2D [row, col] array, got shape {img.shape}")
    if img.shape == (h, w):
        return img.copy()
    out = np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)
    if img.min() >= 0.0 and img.max() <= 1.0:
        out = np.clip(out, 0.0, 1.0)  # float rounding only: the filter's weights are positive
    return out
