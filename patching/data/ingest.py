"""Ingest CT from NIfTI files and DICOM series into a :class:`~patching.data.store.Store`.

Pipeline per case: read → canonical RAS+ (``nibabel.as_closest_canonical``) → field-of-view
padding below −1024 HU set to air → resample to the preset spacing and centre crop/pad to the
preset shape (one interpolation pass, :func:`resample_to_spec`) → patient table removed by a body
mask (:mod:`patching.data.ct_clean`) → int16 HU in the store, with the RAS+ affine of the final grid.

Sources are NIfTI files (``.nii``, ``.nii.gz``), DICOM files, and folders walked recursively for
both. DICOM files are recognised by the Part 10 preamble (``DICM`` at byte 128), whatever their
name, and grouped by SeriesInstanceUID across all sources: one case per series. Other files in
folders are ignored.

Case ids: the NIfTI file name without ``.nii``/``.nii.gz``; for DICOM ``<PatientID>-<first 8 hex
of sha256(SeriesInstanceUID)>``; both through :func:`~patching.data.store.sanitize_case_id`, so an id
is one safe path component. ``source`` is the NIfTI file base name, or "dicom-series-<N>-slices" (a folder name may be a patient name). Nothing else from
a DICOM header is stored.

Failure handling: each bad case yields one ``(path, problem)`` line in
:attr:`IngestReport.failed` and the other cases are still ingested. Re-runs skip cases already
complete in the store, checked before any pixel data is read. Two ingests into one store at once
are safe: the store publishes each case by an atomic rename (the loser counts it as skipped).
"""

from __future__ import annotations

import gzip
import hashlib
import multiprocessing
import os
import zlib
from collections.abc import Iterable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from patching.data.ct_clean import clip_padding, remove_table
from patching.data.dicom_series import (
    SliceHeader,
    is_dicom_file,
    load_dicom_series,
    read_header,
    series_folder,
)
from patching.data.spec import AIR_HU, VolumeSpec
from patching.data.splits import SplitAssignment
from patching.data.store import Store, sanitize_case_id
from patching.errors import InputError

__all__ = [
    "IngestReport", "ingest", "load_nifti", "load_dicom_series", "resample_to_spec",
    "resampled_affine", "discover",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass
class IngestReport:
    ingested: list[str] = field(default_factory=list)                # case ids written
    skipped: list[str] = field(default_factory=list)                 # already complete in the store
    failed: list[tuple[str, str]] = field(default_factory=list)      # (file or folder, one-line problem)
    resplit: list[str] = field(default_factory=list)                 # present cases moved to the stated split
    unmatched: list[str] = field(default_factory=list)               # names of --splits that matched no case


# ---- reading -----------------------------------------------------------------------------------

def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _nifti_stem(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


# What nibabel, gzip and zlib raise on truncated or corrupt files.
_NIFTI_ERRORS = (OSError, EOFError, ValueError, TypeError, zlib.error, gzip.BadGzipFile,
                 nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError)


# A CT of 16384 voxels a side or 2^31 voxels (8 GiB as float32) is no CT but a corrupt header:
# refuse it before allocating (a 30000³ header would otherwise end as "out of memory").
MAX_SIDE = 16384
MAX_VOXELS = 2**31


def _check_pixdim(path: Path, img) -> None:
    """Voxel sizes as the file stores them (nibabel silently sets a zero to 1 and a negative to
    its absolute value when it loads a header): zero or non-finite is an error; a negative size
    is taken as its absolute value, as nibabel and the NIfTI-1 standard's readers do (the sign of
    an axis lives in the qform/sform, not in pixdim)."""
    from nibabel.openers import ImageOpener

    try:
        holder = img.file_map.get("header") or img.file_map["image"]  # .hdr of a pair, else the .nii
        with ImageOpener(holder.filename) as f:
            raw = type(img.header).from_fileobj(f, check=False)
        pixdim = np.asarray(raw["pixdim"][1:4], dtype=np.float64)
    except (OSError, ValueError, KeyError, TypeError, nib.spatialimages.HeaderDataError):
        return  # a header nibabel read but cannot re-read raw (another format): its own checks apply
    if not np.all(np.isfinite(pixdim)) or np.any(pixdim == 0):
        raise InputError(path, f"voxel size (pixdim) {tuple(float(v) for v in pixdim)} must be non-zero and finite")


def load_nifti(path: str | os.PathLike) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray]:
    """Read a 3D NIfTI volume as canonical RAS+ float32 HU.

    scl_slope/scl_inter are applied (nibabel's scaling). A 4D file whose extra axes are all of
    size 1 is squeezed; a real 4D (several volumes), 2D or single-slice file is an error, as are
    NaN/Inf voxels, truncated or corrupt files, a zero or non-finite voxel size (pixdim; a
    negative one is taken as its absolute value) and a header claiming an implausible size.
    Returns ``(hu, spacing_mm, affine)``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file")
    try:
        img = nib.load(path)
        shape = tuple(int(s) for s in img.shape)
        if len(shape) < 3:
            raise InputError(path, f"is a {len(shape)}D image (shape {shape}); need a 3D volume")
        if any(s != 1 for s in shape[3:]):
            raise InputError(path, f"is a {len(shape)}D image with {int(np.prod(shape[3:]))} volumes (shape {shape}); need a single 3D volume")
        if min(shape[:3]) < 2:
            raise InputError(path, f"has a single slice (shape {shape}); need a 3D volume")
        if max(shape[:3]) > MAX_SIDE or int(np.prod(shape[:3], dtype=np.int64)) > MAX_VOXELS:
            raise InputError(path, f"implausible size: the header claims {'x'.join(map(str, shape[:3]))} voxels "
                                   f"(at most {MAX_SIDE} a side and {MAX_VOXELS:.2g} in all); a corrupt header?")
        _check_pixdim(path, img)
        if not np.all(np.isfinite(img.affine)) or abs(np.linalg.det(img.affine[:3, :3])) < 1e-12:
            raise InputError(path, "has a singular or non-finite affine")
        canonical = nib.as_closest_canonical(img)
        hu = canonical.get_fdata(dtype=np.float32).reshape(canonical.shape[:3])
    except InputError:
        raise
    except _NIFTI_ERRORS as e:
        raise InputError(path, f"unreadable NIfTI ({type(e).__name__}: {e})") from None
    bad = np.size(hu) - np.count_nonzero(np.isfinite(hu))
    if bad:
        raise InputError(path, f"has {bad} NaN or Inf voxel(s)")
    affine = np.asarray(canonical.affine, dtype=float)
    spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
    return hu, spacing, affine  # type: ignore[return-value]


# ---- resampling ----------------------------------------------------------------------------------

def _axis_maps(in_shape, spacing_mm, spec: VolumeSpec) -> tuple[np.ndarray, np.ndarray]:
    """Per axis, input index = ``scale * output index + offset``.

    The output grid is centred on the input grid; where the spacing is unchanged the offset is
    rounded to a whole voxel, so grid points coincide and values are copied, not interpolated
    (an integer centre crop/pad, off-centre by at most half a voxel).
    """
    n_in = np.asarray(in_shape, dtype=float)
    n_out = np.asarray(spec.shape, dtype=float)
    scale = np.asarray(spec.spacing_mm, dtype=float) / np.asarray(spacing_mm, dtype=float)
    offset = (n_in - 1) / 2 - scale * (n_out - 1) / 2
    same = np.abs(scale - 1) < 1e-6
    scale = np.where(same, 1.0, scale)
    offset = np.where(same, np.floor(offset + 0.5), offset)
    return scale, offset


def resample_to_spec(hu: np.ndarray, spacing_mm, spec: VolumeSpec) -> np.ndarray:
    """Resample ``hu`` ``[x, y, z]`` to ``spec.spacing_mm`` and centre crop/pad it to ``spec.shape``.

    Interpolation is trilinear (``order=1``) — HU is continuous; masks would take nearest
    neighbour. Along axes that shrink by a factor ``r > 1`` a Gaussian anti-aliasing prefilter of
    sigma ``(r - 1) / 2`` voxels runs first (as ``skimage.transform.resize``), so thin bright
    structures are averaged rather than aliased. Resampling and crop/pad are one pass: the output
    grid is centred on the input (see :func:`resampled_affine` for its affine); output voxels
    within half a voxel outside the input take the edge value, those further out are padded with
    ``AIR_HU`` (-1024). Returns float32 of ``spec.shape``.
    """
    hu = np.asarray(hu, dtype=np.float32)
    if hu.ndim != 3:
        raise InputError(None, f"volume must be 3D, got shape {hu.shape}")
    scale, offset = _axis_maps(hu.shape, spacing_mm, spec)
    sigma = np.maximum(0.0, (scale - 1) / 2)
    sigma[sigma < 0.125] = 0.0  # scipy would make these one-tap kernels (truncate=4): a no-op
    if np.any(sigma > 0):
        hu = ndimage.gaussian_filter(hu, sigma, mode="nearest")
    if np.all(scale == 1.0) and np.all(offset == np.floor(offset)):
        out = np.full(spec.shape, AIR_HU, dtype=np.float32)
        src, dst = [], []
        for n_in, n_out, off in zip(hu.shape, spec.shape, offset.astype(int), strict=True):
            lo, hi = max(0, -off), min(n_out, n_in - off)      # output range that hits the input
            dst.append(slice(lo, max(lo, hi)))
            src.append(slice(lo + off, max(lo, hi) + off))
        out[tuple(dst)] = hu[tuple(src)]
        return out
    out = ndimage.affine_transform(hu, scale, offset=offset, output_shape=spec.shape, order=1,
                                   mode="nearest", output=np.float32)
    for axis, (n_in, n_out, s, off) in enumerate(zip(hu.shape, spec.shape, scale, offset, strict=True)):
        coords = s * np.arange(n_out) + off
        outside = (coords < -0.5) | (coords > n_in - 0.5)
        if outside.any():
            index = [slice(None)] * 3
            index[axis] = outside
            out[tuple(index)] = AIR_HU
    return out


def resampled_affine(affine: np.ndarray, in_shape, spacing_mm, spec: VolumeSpec) -> np.ndarray:
    """RAS+ affine of :func:`resample_to_spec`'s output grid: spacing ``spec.spacing_mm``, the
    same world position for the same anatomy."""
    scale, offset = _axis_maps(in_shape, spacing_mm, spec)
    out_to_in = np.eye(4)
    out_to_in[:3, :3] = np.diag(scale)
    out_to_in[:3, 3] = offset
    return np.asarray(affine, dtype=float) @ out_to_in


# ---- finding cases --------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Job:
    """One case to ingest: a NIfTI file or the files of one DICOM series."""

    case_id: str
    kind: str                   # "nifti" | "dicom"
    files: tuple[Path, ...]
    where: Path                 # file or series folder, for messages
    source: str                 # base name stored with the case


def _walk(folder: Path) -> Iterable[Path]:
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            yield Path(root) / name


def _dicom_case_id(header: SliceHeader) -> str:
    digest = hashlib.sha256(header.series_uid.encode()).hexdigest()[:8]
    return sanitize_case_id(f"{header.patient_id or 'series'}-{digest}")


def _read_header_safe(path: Path) -> tuple[SliceHeader | None, str | None, str | None]:
    """``(header or None, problem or None, series uid of a bad file if known)``."""
    try:
        return read_header(path), None, None
    except InputError as e:
        return None, e.problem, getattr(e, "series_uid", None)


def discover(sources: Sequence[str | os.PathLike], *, executor: Executor | None = None,
             progress: bool = False) -> tuple[list[_Job], list[tuple[str, str]]]:
    """Find the cases in ``sources``: ``(jobs, failed)``. DICOM headers are read here (no pixels)."""
    failed: list[tuple[str, str]] = []
    nifti: list[Path] = []
    dicom: list[Path] = []
    seen: set[Path] = set()

    def add(p: Path, bucket: list[Path]) -> None:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            bucket.append(p)

    for src in sources:
        src = Path(src)
        if src.is_file():
            if _is_nifti(src):
                add(src, nifti)
            elif is_dicom_file(src):
                add(src, dicom)
            else:
                failed.append((str(src), "not a NIfTI (.nii, .nii.gz) or DICOM file"))
        elif src.is_dir():
            found = 0
            for p in _walk(src):
                if _is_nifti(p):
                    add(p, nifti)
                    found += 1
                elif is_dicom_file(p):
                    add(p, dicom)
                    found += 1
            if not found:
                failed.append((str(src), "no NIfTI or DICOM files found in this folder"))
        else:
            failed.append((str(src), "no such file or directory"))

    jobs = [_Job(sanitize_case_id(_nifti_stem(p)), "nifti", (p,), p, p.name) for p in nifti]

    reader = executor.map(_read_header_safe, dicom, chunksize=32) if executor else map(_read_header_safe, dicom)
    series: dict[str, list[SliceHeader]] = {}
    broken: set[str] = set()
    for path, (header, problem, bad_uid) in zip(dicom, tqdm(reader, total=len(dicom), desc="DICOM headers",
                                                            unit="file", disable=not progress or not dicom), strict=True):
        if problem is not None:
            failed.append((str(path), problem))
            broken.add(bad_uid or "")
        elif header is not None:
            series.setdefault(header.series_uid, []).append(header)
    for uid, headers in series.items():
        if uid in broken:
            continue  # a series with an unreadable file: that file's line above is its one line
        paths = tuple(sorted((h.path for h in headers), key=str))
        folder = series_folder(paths)
        jobs.append(_Job(_dicom_case_id(headers[0]), "dicom", paths, folder, f"dicom-series-{len(paths)}-slices"))  # never the folder name: PACS exports often name folders after the patient

    # Two sources must not claim one case id (e.g. a/ct.nii.gz and b/ct.nii.gz).
    unique: dict[str, _Job] = {}
    for job in jobs:
        if job.case_id in unique:
            failed.append((str(job.where), f"case id {job.case_id!r} is also produced by {unique[job.case_id].where}; rename one of them"))
        else:
            unique[job.case_id] = job
    return list(unique.values()), failed


# ---- ingest ---------------------------------------------------------------------------------------

def job_names(job: _Job) -> tuple[str, ...]:
    """The names a splits file may use for a case: its id, its source file name (and stem), the
    folder of its DICOM series (matched in memory only, never stored)."""
    if job.kind == "nifti":
        return (job.case_id, job.where.name, _nifti_stem(job.where))
    return (job.case_id, job.where.name)


def _ingest_job(job: _Job, store_path: str, spec: VolumeSpec, split: str | None = None) -> tuple[str, str, str]:
    """Read, resample and store one case: ``(status, case_id or path, problem)``.

    Runs in a worker process; it holds one case in memory at a time.
    """
    try:
        store = Store(store_path)
        if store.has_case(job.case_id):
            return "skipped", job.case_id, ""
        if job.kind == "nifti":
            hu, spacing, affine = load_nifti(job.files[0])
        else:
            hu, spacing, affine = load_dicom_series(job.files)
        hu, _ = clip_padding(hu)  # FOV padding (-2048, -3024, ...) -> air, before interpolation
        out = resample_to_spec(hu, spacing, spec)
        out_affine = resampled_affine(affine, hu.shape, spacing, spec)
        del hu
        out, _ = remove_table(out, spec.spacing_mm)  # the patient table -> air (patching.data.ct_clean)
        written = store.write_case(job.case_id, out, spec.spacing_mm, out_affine, source=job.source, split=split)
        return ("ingested" if written else "skipped"), job.case_id, ""
    except InputError as e:
        known = {str(job.where), *map(str, job.files)}   # name the file when the error does
        if e.source in known:
            return "failed", e.source, e.problem
        return "failed", str(job.where), str(e)
    except MemoryError:
        return "failed", str(job.where), "out of memory while reading or resampling this case"
    except Exception as e:  # noqa: BLE001 - a decoder or file-system error ends this case only
        return "failed", str(job.where), f"unexpected {type(e).__name__}: {e}"


def ingest(sources: Sequence[str | os.PathLike], store: Store, spec: VolumeSpec, *,
           workers: int = 1, progress: bool = True, splits: SplitAssignment | None = None) -> IngestReport:
    """Ingest NIfTI files and DICOM series from ``sources`` into ``store`` on ``spec``'s grid.

    ``splits`` (:class:`patching.data.splits.SplitAssignment`) gives each case its split by name;
    cases already present are moved to a split stated for them (:attr:`IngestReport.resplit`).
    Without it, the store's hash of the case id decides.

    ``workers > 1`` reads, resamples and writes cases in that many processes (forkserver: a
    clean interpreter, safe next to the threads of zarr and tqdm); ``workers=1`` runs in this
    process. Each worker holds one case at a time. Returns what was ingested, skipped (already
    complete) and failed (one line each); failures never stop the other cases.
    """
    if workers < 1:
        raise InputError("--workers", f"needs a positive number, got {workers}")
    report = IngestReport()
    executor = None
    if workers > 1:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["patching.data.ingest"])
        executor = ProcessPoolExecutor(workers, mp_context=ctx)
    try:
        jobs, failed = discover(sources, executor=executor, progress=progress)
        report.failed.extend(failed)
        todo, split_of = [], {}
        for job in jobs:  # skip finished cases before any pixel data is read
            split_of[job.case_id] = splits.split_of(job_names(job)) if splits is not None else None
            if not store.has_case(job.case_id):
                todo.append(job)
                continue
            report.skipped.append(job.case_id)
            if split_of[job.case_id] is not None and store.set_split(job.case_id, split_of[job.case_id]):
                report.resplit.append(job.case_id)
        if splits is not None:
            report.unmatched = splits.unmatched()
        bar = tqdm(total=len(todo), desc="ingest", unit="case", disable=not progress)

        def record(result: tuple[str, str, str]) -> None:
            status, name, problem = result
            if status == "failed":
                report.failed.append((name, problem))
            else:
                (report.ingested if status == "ingested" else report.skipped).append(name)
            bar.update(1)

        if executor is None:
            for job in todo:
                record(_ingest_job(job, str(store.path), spec, split_of[job.case_id]))
        else:
            futures = {executor.submit(_ingest_job, job, str(store.path), spec, split_of[job.case_id]): job
                       for job in todo}
            for fut in as_completed(futures):
                try:
                    record(fut.result())
                except BrokenProcessPool:
                    record(("failed", str(futures[fut].where), "worker process died (out of memory?)"))
        bar.close()
    finally:
        if executor is not None:
            executor.shutdown(cancel_futures=True)
    report.ingested.sort()
    report.skipped.sort()
    report.failed.sort()
    report.resplit.sort()
    return report
