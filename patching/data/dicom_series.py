"""DICOM CT series: find files, read headers, group by series, validate geometry, load as RAS+ HU.

Ingest reads every DICOM file's header once (:func:`read_header`, pixel data is skipped), groups
the headers by SeriesInstanceUID, and only for a series it is going to store does it validate the
geometry (:func:`series_geometry`) and decode the pixels (:func:`load_dicom_series`).

What is rejected, each with a one-line :class:`InputError` naming the file or the series folder:
truncated or corrupt files, multi-frame (enhanced) objects, colour images, slices of different
size / orientation / pixel spacing, duplicate positions, missing slices, non-uniform slice
spacing and gantry tilt (slice positions that do not advance along the slice normal). A non-zero
GantryDetectorTilt on its own is not rejected: when the positions advance along the normal of
the stored orientation, the scanner has already resampled the series onto an orthogonal, if
oblique, grid that the affine represents exactly.

Ignored without a message (they are not volumes, and a study export is full of them): DICOMDIR
files, objects without pixel data (structured reports, presentation states, key objects) and
localizer images (ImageType contains LOCALIZER).

Privacy: headers are reduced to the geometry and the two identifiers ingest needs (PatientID and
SeriesInstanceUID, used only to derive a sanitised case id); names and dates are never copied.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut
from pydicom.uid import UID

from patching.errors import InputError

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
_PIXEL_DATA = 0x7FE00010
# Tolerances for header geometry: DICOM decimal strings carry a few significant digits, so
# vectors and spacings that agree to these are the same.
_DIRECTION_TOL = 1e-4
_SPACING_TOL_MM = 1e-3
_DUPLICATE_TOL_MM = 1e-2
_MISSING_FACTOR = 1.5          # a gap above 1.5× the median spacing is a missing slice
_UNIFORM_REL_TOL = 0.1         # other steps must be within 10 % of the median
_TILT_TOL_DEG = 0.05
_TILT_TOL_MM = 0.01


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True when the file has the DICOM Part 10 preamble (``DICM`` at byte 128)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


@dataclass(frozen=True)
class SliceHeader:
    """The part of one image's header that ingest needs (no names, no dates)."""

    path: Path
    series_uid: str
    patient_id: str
    modality: str
    rows: int | None
    cols: int | None
    position: tuple[float, float, float] | None        # ImagePositionPatient, LPS mm
    orientation: tuple[float, ...] | None              # ImageOrientationPatient (6 values)
    pixel_spacing: tuple[float, float] | None          # (between rows, between columns) mm
    num_frames: int
    samples_per_pixel: int
    gantry_tilt_deg: float


def _floats(ds, keyword: str, count: int, path: Path) -> tuple[float, ...] | None:
    if keyword not in ds or ds[keyword].value in (None, ""):
        return None
    try:
        value = ds[keyword].value
        values = [float(v) for v in (value if ds[keyword].VM > 1 else [value])]
    except (TypeError, ValueError) as e:
        raise InputError(path, f"invalid {keyword} ({e})") from None
    if len(values) != count or not np.all(np.isfinite(values)):
        raise InputError(path, f"invalid {keyword}: expected {count} finite numbers, got {values}")
    return tuple(values)


def _int(ds, keyword: str, default: int | None, path: Path) -> int | None:
    value = ds.get(keyword)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InputError(path, f"invalid {keyword} {value!r}") from None


def _bad_file(path: Path, problem: str, ds=None) -> InputError:
    """An InputError for one file, carrying its SeriesInstanceUID (or None) as ``series_uid`` so
    that ingest can drop the whole series instead of reporting it again as a missing slice."""
    err = InputError(path, problem)
    err.series_uid = str(ds.get("SeriesInstanceUID") or "") or None if ds is not None else None
    return err


def read_header(path: str | os.PathLike) -> SliceHeader | None:
    """Read one DICOM file's header without its pixel data.

    Returns None for objects that are not slices of a volume (DICOMDIR, no pixel data,
    localizers). Raises :class:`InputError` for unreadable, truncated or corrupt files; when the
    file's SeriesInstanceUID could be read, the error carries it as ``err.series_uid``.
    """
    path = Path(path)
    try:
        # defer_size: large values (the pixel data) are not read, only their offset and length,
        # which is how a truncated file is caught here, before anything is decoded.
        ds = pydicom.dcmread(path, defer_size=1024)
        size = path.stat().st_size
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError,
            OverflowError, NotImplementedError) as e:
        raise InputError(path, f"unreadable DICOM file ({type(e).__name__}: {e})") from None
    meta = getattr(ds, "file_meta", None) or {}
    sop_class = str(ds.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID") or "")
    if sop_class == DICOMDIR_SOP_CLASS:
        return None
    if not sop_class or not meta.get("TransferSyntaxUID"):
        raise _bad_file(path, "corrupt or truncated DICOM header (no SOP Class UID or Transfer Syntax UID)", ds)
    pixels = ds.get_item(_PIXEL_DATA, keep_deferred=True)
    if pixels is None:
        if "Image Storage" in UID(sop_class).name or "Rows" in ds:
            raise _bad_file(path, "truncated or corrupt DICOM image: no pixel data", ds)
        return None  # a structured report, presentation state, key object, ...
    length = getattr(pixels, "length", None)
    tell = getattr(pixels, "value_tell", None)
    if length is not None and tell is not None and length != 0xFFFFFFFF and tell + length > size:
        raise _bad_file(path, f"truncated DICOM file: pixel data needs bytes {tell}..{tell + length} but the file has {size}", ds)
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if "LOCALIZER" in image_type:
        return None
    series_uid = str(ds.get("SeriesInstanceUID") or "")
    if not series_uid:
        raise InputError(path, "DICOM image has no SeriesInstanceUID")
    spacing = _floats(ds, "PixelSpacing", 2, path)
    tilt = _floats(ds, "GantryDetectorTilt", 1, path)
    return SliceHeader(
        path=path,
        series_uid=series_uid,
        patient_id=str(ds.get("PatientID") or ""),
        modality=str(ds.get("Modality") or "?"),
        rows=_int(ds, "Rows", None, path),
        cols=_int(ds, "Columns", None, path),
        position=_floats(ds, "ImagePositionPatient", 3, path),  # type: ignore[arg-type]
        orientation=_floats(ds, "ImageOrientationPatient", 6, path),
        pixel_spacing=spacing,  # type: ignore[arg-type]
        num_frames=_int(ds, "NumberOfFrames", 1, path) or 1,
        samples_per_pixel=_int(ds, "SamplesPerPixel", 1, path) or 1,
        gantry_tilt_deg=tilt[0] if tilt else 0.0,
    )


def series_folder(paths: Sequence[Path]) -> Path:
    """The deepest folder holding every file of a series (names the series in messages)."""
    return Path(os.path.commonpath([str(Path(p).parent) for p in paths]))


@dataclass(frozen=True)
class SeriesGeometry:
    """A validated series: slices sorted along the normal and the grid they sample."""

    slices: tuple[SliceHeader, ...]
    row_dir: np.ndarray          # LPS unit vector along a row (increasing column index)
    col_dir: np.ndarray          # LPS unit vector down a column (increasing row index)
    normal: np.ndarray           # row_dir × col_dir
    pixel_spacing: tuple[float, float]
    slice_spacing: float
    rows: int
    cols: int

    def affine_lps(self) -> np.ndarray:
        """Voxel ``[col, row, slice]`` → LPS mm."""
        aff = np.eye(4)
        aff[:3, 0] = self.row_dir * self.pixel_spacing[1]
        aff[:3, 1] = self.col_dir * self.pixel_spacing[0]
        aff[:3, 2] = self.normal * self.slice_spacing
        aff[:3, 3] = self.slices[0].position
        return aff


def _odd_one(headers, key, tol: float = 0.0):
    """(most common value, first header whose value is not within ``tol`` of it, or None)."""
    values = [key(h) for h in headers]
    ref = Counter(values).most_common(1)[0][0]
    for h, v in zip(headers, values, strict=True):
        if not np.allclose(v, ref, rtol=0.0, atol=tol):
            return ref, h
    return ref, None


def series_geometry(headers: Sequence[SliceHeader]) -> SeriesGeometry:
    """Validate one series' headers and return its sorted slices and grid.

    Raises :class:`InputError` (naming the series folder, and the files concerned) for
    everything listed in the module docstring.
    """
    headers = sorted(headers, key=lambda h: h.path.name)
    where = series_folder([h.path for h in headers])
    if len(headers) < 2:
        h = headers[0]
        raise InputError(h.path, f"series has a single {h.modality} image; a volume needs at least 2 slices")
    for h in headers:
        if h.num_frames > 1:
            raise InputError(h.path, f"multi-frame DICOM ({h.num_frames} frames) is not supported; export the series as single-frame slices")
        if h.samples_per_pixel != 1:
            raise InputError(h.path, f"colour DICOM image (SamplesPerPixel={h.samples_per_pixel}) is not a CT slice")
        for name, value in (("Rows/Columns", h.rows and h.cols), ("ImagePositionPatient", h.position),
                            ("ImageOrientationPatient", h.orientation), ("PixelSpacing", h.pixel_spacing)):
            if not value:
                raise InputError(h.path, f"slice has no {name}")

    ref, bad = _odd_one(headers, lambda h: (h.rows, h.cols))
    if bad is not None:
        raise InputError(where, f"slices of different size: {bad.path.name} is {bad.rows}×{bad.cols}, the others {ref[0]}×{ref[1]}")
    ref, bad = _odd_one(headers, lambda h: h.orientation, _DIRECTION_TOL)
    if bad is not None:
        raise InputError(where, f"slices of different orientation: {bad.path.name} has ImageOrientationPatient {list(bad.orientation)}, the others {list(ref)}")
    ref, bad = _odd_one(headers, lambda h: h.pixel_spacing, _SPACING_TOL_MM)
    if bad is not None:
        raise InputError(where, f"slices of different pixel spacing: {bad.path.name} has {list(bad.pixel_spacing)} mm, the others {list(ref)} mm")
    pixel_spacing = ref
    if min(pixel_spacing) <= 0:
        raise InputError(where, f"non-positive PixelSpacing {list(pixel_spacing)}")

    iop = np.asarray(headers[0].orientation, dtype=float)
    row_dir, col_dir = iop[:3], iop[3:]
    if abs(np.linalg.norm(row_dir) - 1) > 1e-3 or abs(np.linalg.norm(col_dir) - 1) > 1e-3 or abs(row_dir @ col_dir) > 1e-3:
        raise InputError(where, f"ImageOrientationPatient {list(iop)} is not two orthogonal unit vectors")
    row_dir, col_dir = row_dir / np.linalg.norm(row_dir), col_dir / np.linalg.norm(col_dir)
    normal = np.cross(row_dir, col_dir)

    positions = np.asarray([h.position for h in headers], dtype=float)
    along = positions @ normal                                   # [k] mm along the slice normal
    order = np.argsort(along, kind="stable")
    headers = [headers[i] for i in order]
    positions, along = positions[order], along[order]
    steps = np.diff(along)
    dup = np.flatnonzero(steps < _DUPLICATE_TOL_MM)
    if dup.size:
        i = dup[0]
        raise InputError(where, f"duplicate slice at z={along[i]:.2f} mm ({headers[i].path.name} and {headers[i + 1].path.name})")
    median = float(np.median(steps))
    gaps = np.flatnonzero(steps > _MISSING_FACTOR * median)
    if gaps.size:
        i = gaps[0]
        more = f"; {gaps.size - 1} more gap(s)" if gaps.size > 1 else ""
        raise InputError(where, f"missing slice(s) between z={along[i]:.2f} and z={along[i + 1]:.2f} mm "
                                f"({headers[i].path.name}, {headers[i + 1].path.name}; slice spacing {median:.3g} mm{more})")
    if np.any(np.abs(steps - median) > _UNIFORM_REL_TOL * median):
        raise InputError(where, f"non-uniform slice spacing: steps from {steps.min():.3g} to {steps.max():.3g} mm")

    # Gantry tilt: positions drift within the image plane as they advance along the normal.
    offsets = positions - positions[0]
    in_plane = np.linalg.norm(offsets - np.outer(offsets @ normal, normal), axis=1)   # [k] mm
    tilt_deg = float(np.degrees(np.max(np.arctan2(in_plane[1:], along[1:] - along[0]))))
    if tilt_deg > _TILT_TOL_DEG and in_plane.max() > _TILT_TOL_MM:
        tags = [h.gantry_tilt_deg for h in headers if h.gantry_tilt_deg]
        angle = abs(tags[0]) if tags else tilt_deg
        raise InputError(where, f"gantry tilt of {angle:.1f}° is not supported (slice positions shift "
                                f"{in_plane.max():.2f} mm within the image plane); resample the series to an orthogonal grid first")

    slice_spacing = float((along[-1] - along[0]) / (len(headers) - 1))
    return SeriesGeometry(tuple(headers), row_dir, col_dir, normal, pixel_spacing, slice_spacing,
                          int(headers[0].rows), int(headers[0].cols))


def _read_slice_hu(header: SliceHeader) -> np.ndarray:
    """One slice's ``[row, col]`` HU (RescaleSlope/Intercept or Modality LUT of this slice)."""
    try:
        ds = pydicom.dcmread(header.path)
        stored = ds.pixel_array
        hu = apply_modality_lut(stored, ds)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError, AttributeError,
            RuntimeError, NotImplementedError) as e:
        raise InputError(header.path, f"cannot decode pixel data ({type(e).__name__}: {e})") from None
    if hu.shape != (header.rows, header.cols):
        raise InputError(header.path, f"pixel data has shape {hu.shape}, header says {header.rows}×{header.cols}")
    return np.asarray(hu, dtype=np.float32)


def load_dicom_series(files: Sequence[str | os.PathLike]) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray]:
    """Read, validate and decode one DICOM series.

    Returns ``(hu, spacing_mm, affine)``: float32 HU ``[x, y, z]`` in canonical RAS+ orientation
    (as ``nibabel.as_closest_canonical`` gives), the voxel spacing in mm and the RAS+ affine.
    Headers are validated before any pixel data is decoded.
    """
    if not files:
        raise InputError(None, "empty DICOM series")
    headers = []
    for f in files:
        h = read_header(f)
        if h is None:
            raise InputError(f, "not a DICOM image slice (no pixel data, DICOMDIR or localizer)")
        headers.append(h)
    uids = sorted({h.series_uid for h in headers})
    if len(uids) > 1:
        raise InputError(series_folder([h.path for h in headers]), f"files belong to {len(uids)} different series; pass one series")
    geom = series_geometry(headers)

    # Voxel [i, j, k] = column i, row j of slice k: the pixel array [row, col] transposed.
    vol = np.empty((geom.cols, geom.rows, len(geom.slices)), dtype=np.float32)
    for k, h in enumerate(geom.slices):
        vol[:, :, k] = _read_slice_hu(h).T
    lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    img = nib.Nifti1Image(vol, lps_to_ras @ geom.affine_lps())
    canonical = nib.as_closest_canonical(img)
    affine = canonical.affine
    hu = np.asarray(canonical.dataobj, dtype=np.float32)
    spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
    return hu, spacing, affine  # type: ignore[return-value]
