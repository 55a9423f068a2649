"""Volume file formats, the one place for each: NIfTI (int16 HU, RAS+ affine) and Zarr v3 arrays
(the store's chunks and Blosc codecs); every output written aside and renamed."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import zarr
from zarr.codecs import BloscCodec

from patching.errors import InputError

DEFAULT_CT_CHUNKS = (64, 64, 32)
CT_CODEC = BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")
FLOAT_CODEC = BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")


def _chunks_for(shape: tuple[int, ...], chunks: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(max(1, min(int(c), int(s))) for c, s in zip(chunks, shape))


def write_array(path: Path, data: np.ndarray, *, chunks: tuple[int, ...] | None = None,
                attrs: Mapping[str, Any] | None = None, fill_value: Any = 0) -> zarr.Array:
    """Write ``data`` as a new Zarr v3 array at ``path`` (which must not exist)."""
    data = np.ascontiguousarray(data)
    if chunks is None:
        chunks = data.shape
    codec = CT_CODEC if data.dtype.kind in "iub" else FLOAT_CODEC
    arr = zarr.create_array(
        store=str(path), shape=data.shape, dtype=data.dtype, chunks=_chunks_for(data.shape, chunks),
        compressors=codec, fill_value=fill_value, attributes=dict(attrs or {}), zarr_format=3,
    )
    arr[...] = data
    return arr


def write_nifti(path: Path, hu: np.ndarray, affine: np.ndarray) -> Path:
    """int16 NIfTI with the affine as sform and qform (scanner coordinates, mm); written aside."""
    path = Path(path)
    img = nib.Nifti1Image(np.asarray(hu, dtype=np.int16), affine)
    img.header.set_xyzt_units("mm")
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    suffix = ".nii.gz" if path.name.lower().endswith(".gz") else ".nii"  # nibabel compresses by the name
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp{suffix}")
    nib.save(img, tmp)
    os.replace(tmp, path)
    return path


def write_zarr(path: Path, hu: np.ndarray, attrs: dict) -> Path:
    """A Zarr v3 int16 array (the store's chunks and codec), written aside and swapped in."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    write_array(tmp, np.asarray(hu, dtype=np.int16), chunks=DEFAULT_CT_CHUNKS, attrs=attrs, fill_value=-1024)
    if path.exists():
        old = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.old")
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, path)
    return path


def check_nifti_out(out: str | os.PathLike) -> Path:
    """An output path that must end in .nii/.nii.gz and not be a directory (checked before any work)."""
    path = Path(out)
    if path.is_dir():
        raise InputError(out, "is a directory; give a .nii.gz file name")
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        raise InputError(out, "output must end in .nii or .nii.gz")
    if path.parent.exists() and not path.parent.is_dir():
        raise InputError(out, f"{path.parent} is not a directory")
    return path


def write_nifti_like(path: Path, hu_ras: np.ndarray, source: Path) -> Path:
    """Write a volume computed on ``source``'s canonical RAS+ grid (as ``patching.data.ingest.load_nifti``
    reads it) back in ``source``'s own voxel order and affine, so the output's geometry (shape,
    affine, spacing, orientation) equals the input's. int16 HU, rounded; written aside and renamed."""
    src = nib.load(Path(source))
    ornt = nib.orientations.io_orientation(src.affine)
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("R", "A", "S")), ornt)
    data = nib.orientations.apply_orientation(np.asarray(hu_ras), back)
    data = np.clip(np.rint(data), np.iinfo(np.int16).min, np.iinfo(np.int16).max)
    return write_nifti(path, data, np.asarray(src.affine, dtype=float))
