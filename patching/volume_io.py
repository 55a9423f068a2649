"""Write output volumes: NIfTI (int16 HU, RAS+ affine) and Zarr, each written aside and renamed."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np

from .store import DEFAULT_CT_CHUNKS, write_array


def write_nifti(path: Path, hu: np.ndarray, affine: np.ndarray) -> Path:
    """int16 NIfTI with the affine as sform and qform (scanner coordinates, mm); written aside."""
    path = Path(path)
    img = nib.Nifti1Image(np.asarray(hu, dtype=np.int16), affine)
    img.header.set_xyzt_units("mm")
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp.nii.gz")
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
