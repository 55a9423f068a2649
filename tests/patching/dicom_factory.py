"""Small synthetic DICOM files for tests: CT series (CT Image Storage) and DX/CR radiographs.

Everything is written with pydicom, uncompressed (Explicit VR Little Endian), with the
identifying attributes a real export carries (PatientName, PatientBirthDate) so that tests can
check they never reach the store.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # rows run to the patient's left, columns to posterior
PATIENT_NAME = "Doe^Janetest"
BIRTH_DATE = "19450317"


def _base(sop_class: str, modality: str, *, patient_id: str, patient_name: str,
          birth_date: str, study_uid: str, series_uid: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.PatientBirthDate = birth_date
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SamplesPerPixel = 1
    return ds


@dataclass
class Series:
    folder: Path
    files: list[Path]            # in slice order (index k = position k along the normal)
    series_uid: str
    stored: np.ndarray           # [k, row, col] int16 stored values
    positions: np.ndarray        # [k, 3] ImagePositionPatient (LPS, mm)
    orientation: tuple[float, ...]
    pixel_spacing: tuple[float, float]
    intercept: float


def write_ct_series(
    folder: str | Path,
    stored: np.ndarray,
    *,
    orientation: Sequence[float] = AXIAL,
    pixel_spacing: tuple[float, float] = (0.8, 0.7),   # (between rows, between columns)
    slice_spacing: float = 2.0,
    origin: Sequence[float] = (-5.0, -6.0, 30.0),
    positions: np.ndarray | None = None,
    patient_id: str = "P001",
    patient_name: str = PATIENT_NAME,
    birth_date: str = BIRTH_DATE,
    series_uid: str | None = None,
    study_uid: str | None = None,
    slope: float = 1.0,
    intercept: float = -1024.0,
    gantry_tilt: float | None = None,
    seed: int = 0,
) -> Series:
    """Write ``stored[k]`` (int16 ``[row, col]``) as slice k of a CT series in ``folder``.

    Slice k lies at ``origin + k * slice_spacing * normal`` (or ``positions[k]``), with the
    normal the cross product of the orientation's row and column directions. Files get
    shuffled, extension-less names, so the order on disk says nothing about the slice order.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stored = np.asarray(stored, dtype=np.int16)
    num_slices, rows, cols = stored.shape
    row_dir, col_dir = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    normal = np.cross(row_dir, col_dir)
    if positions is None:
        positions = np.asarray(origin, float) + np.arange(num_slices)[:, None] * slice_spacing * normal
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    names = np.random.default_rng(seed).permutation(num_slices)
    files = []
    for k in range(num_slices):
        ds = _base(CTImageStorage, "CT", patient_id=patient_id, patient_name=patient_name,
                   birth_date=birth_date, study_uid=study_uid, series_uid=series_uid)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{v:.4f}" for v in positions[k]]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
        ds.PixelSpacing = [f"{v:g}" for v in pixel_spacing]
        ds.SliceThickness = f"{slice_spacing:g}"
        if gantry_tilt is not None:
            ds.GantryDetectorTilt = f"{gantry_tilt:g}"
        ds.Rows, ds.Columns = rows, cols
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleIntercept = f"{intercept:g}"
        ds.RescaleType = "HU"
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        path = folder / f"IM{names[k]:04d}"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return Series(folder, files, series_uid, stored, np.asarray(positions, float),
                  tuple(float(v) for v in orientation), tuple(pixel_spacing), float(intercept))


def write_xray_dicom(
    path: str | Path,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    modality: str = "DX",
    slope: float | None = None,
    intercept: float | None = None,
    window: tuple[float, float] | None = None,   # (centre, width)
    num_frames: int = 1,
    patient_name: str = PATIENT_NAME,
) -> Path:
    """A DX/CR radiograph: unsigned 16-bit storage, ``pixels`` is ``[row, col]`` (or
    ``[frame, row, col]`` when ``num_frames > 1``)."""
    path = Path(path)
    pixels = np.asarray(pixels, dtype=np.uint16)
    ds = _base(DigitalXRayImageStorageForPresentation, modality, patient_id="XR1",
               patient_name=patient_name, birth_date=BIRTH_DATE, study_uid=generate_uid(),
               series_uid=generate_uid())
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if num_frames > 1:
        ds.NumberOfFrames = num_frames
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 0
    if slope is not None:
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleIntercept = f"{intercept or 0:g}"
    if window is not None:
        ds.WindowCenter = f"{window[0]:g}"
        ds.WindowWidth = f"{window[1]:g}"
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path
