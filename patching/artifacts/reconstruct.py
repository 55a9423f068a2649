"""One reconstructor interface for every X-ray → CT method, and the one writer of its outputs.

A method (diffusion, X2CT-GAN, X-Recon, ...) is one :class:`Reconstructor` subclass in its
stage package; ``launch.tasks.RECONSTRUCTORS`` maps a checkpoint's task to it, so
``xray2ct sample``, ``evaluate`` and ``demo`` never switch on a task name::

    rec = DiffusionReconstructor.from_path("runs/diff", device="cpu")   # any weights path
    hu = rec.reconstruct({"pa": pa, "lateral": lat}, seed=0, num_samples=4)  # (4, X, Y, Z) int16
    files = sample_files(rec, "pa.png", "lat.png", "out/", seed=0, num_samples=4)

Inputs are checked here, once, where they enter (:func:`check_xrays`, :func:`read_view_files`);
the networks below trust them. See docs/architecture.md ("The reconstructor").
"""

from __future__ import annotations

import abc
import importlib
import json
import numbers
import resource
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from patching.artifacts.format import describe
from patching.data.preview import save_triplanar_png
from patching.data.spec import VolumeSpec
from patching.data.volume_io import write_nifti, write_zarr
from patching.data.xray_io import read_xray
from patching.errors import InputError


class Reconstructor(abc.ABC):
    """X-rays → int16 HU volumes on :attr:`geometry`.

    Attributes a subclass sets: ``task`` (its registered name), ``views`` (the views it takes,
    in order), ``required_views`` (those it cannot do without; the others may be missing),
    ``geometry`` (:class:`VolumeSpec` of the volumes it returns: shape, spacing, HU window),
    ``grid`` (the model's own output grid; other shapes are interpolated), ``step``,
    ``weights`` ("ema" or "raw"), ``source`` (the resolved checkpoint or export) and
    ``stochastic`` (False: one volume per X-ray set, whatever the seed). ``progress`` (set it
    after loading) turns on the bars of slow methods: denoising steps and tile decoding.
    """

    task: str
    stochastic: ClassVar[bool] = False
    views: tuple[str, ...]
    required_views: tuple[str, ...] = ()
    geometry: VolumeSpec
    grid: tuple[int, int, int]
    step: int
    weights: str
    source: Path
    progress: bool = False

    @classmethod
    @abc.abstractmethod
    def from_path(cls, path: str | Path, *, device: str | torch.device | None = None,
                  steps: int | None = None, guidance: float | None = None,
                  drr_guidance: int | None = None) -> Reconstructor:
        """Load from a run directory, ``checkpoints/``, ``latest``, ``step-N`` or an export
        (``steps``/``guidance``/``drr_guidance``: sampler settings, ignored by deterministic methods)."""

    @abc.abstractmethod
    def _volumes(self, xrays: dict[str, np.ndarray], seed: int, num_samples: int,
                 shape: tuple[int, int, int]) -> Iterator[np.ndarray]:
        """int16 HU ``shape`` volumes for checked X-rays (``{view: 2-D float32 in [0, 1]}``)."""

    def iter_samples(self, xrays: Mapping[str, Any], *, seed: int = 0, num_samples: int = 1,
                     shape=None) -> Iterator[np.ndarray]:
        """The volumes of :meth:`reconstruct` one at a time (inputs are checked at the call)."""
        checked = check_xrays(xrays, self.views, self.required_views)
        num_samples = positive_int(num_samples, "num_samples")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise InputError("seed", f"must be an integer, got {seed!r}")
        shape = self.geometry.shape if shape is None else tuple(int(s) for s in shape)
        return self._volumes(checked, int(seed), num_samples, shape)

    def reconstruct(self, xrays: Mapping[str, Any], *, seed: int = 0, num_samples: int = 1,
                    shape=None) -> np.ndarray:
        """int16 HU ``(num_samples, *shape)`` (default shape: ``geometry.shape``) for
        ``xrays = {view: 2-D array in [0, 1] of any size}``; views the model can do without may
        be absent or None. A deterministic method gives ``num_samples`` equal volumes."""
        return np.stack(list(self.iter_samples(xrays, seed=seed, num_samples=num_samples, shape=shape)))

    def info(self) -> dict:
        """What was loaded, for reports and metadata (JSON-ready)."""
        return {"task": self.task, "step": int(self.step), "weights": self.weights, "source": str(self.source),
                "views": list(self.views), "output_grid": list(self.grid),
                "spacing_mm": list(self.geometry.spacing_mm), "hu_window": list(self.geometry.hu_window),
                "stochastic": self.stochastic}

    def title(self) -> str:
        return f"{self.task} step {self.step} ({self.weights} weights)"


# --- the shared input predicates --------------------------------------------------------------


def positive_int(value, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise InputError(source, f"must be a positive integer, got {value!r}")
    return int(value)


def check_xrays(xrays, views: tuple[str, ...], required: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """``{view: float32 2-D array in [0, 1]}`` of the given views, or a one-line InputError."""
    if not isinstance(xrays, Mapping):
        raise InputError("xrays", f"needs a dict {{view: 2-D array in [0, 1]}}, got {type(xrays).__name__}")
    unknown = [k for k in xrays if k not in views]
    if unknown:
        raise InputError("xrays", f"unknown view {unknown[0]!r}; this model takes {', '.join(views)}")
    given = {k: v for k, v in xrays.items() if v is not None}
    if not given:
        raise InputError("xrays", f"no view given; pass at least one of {', '.join(views)}")
    missing = [v for v in required if v not in given]
    if missing:
        raise InputError("xrays", f"this model needs the {missing[0]} view")
    out = {}
    for view in views:
        if view not in given:
            continue
        src, a = f"xrays[{view!r}]", np.asarray(given[view])
        if a.dtype.kind not in "biuf":
            raise InputError(src, f"needs a numeric array, got dtype {a.dtype}")
        if a.ndim != 2 or a.size == 0:
            raise InputError(src, f"needs a non-empty 2-D [row, col] array, got shape {a.shape}")
        bad = int(a.size - np.isfinite(a).sum())
        if bad:
            raise InputError(src, f"has {bad} NaN or Inf value(s)")
        lo, hi = float(a.min()), float(a.max())
        if lo < 0.0 or hi > 1.0:
            raise InputError(src, f"values must lie in [0, 1], got {lo:.4g} .. {hi:.4g} "
                                  "(patching.data.xray_io.read_xray normalises image files)")
        out[view] = a.astype(np.float32, copy=False)
    return out


def read_view_files(rec: Reconstructor, files: Mapping[str, str | Path | None]) -> dict[str, np.ndarray]:
    """Read the X-ray files given as ``--pa`` / ``--lateral`` for ``rec``: at least one, every
    view it requires, none it does not take."""
    given = {v: f for v, f in files.items() if f is not None}
    if not given:
        raise InputError("--pa", "give at least one X-ray (--pa, and --lateral for biplanar models)")
    for view in rec.required_views:
        if view not in given:
            kind = "biplanar" if len(rec.views) == 2 else f"single-view ({view})"
            raise InputError(f"--{view}", f"this {rec.task} model is {kind}: give the {view} X-ray with --{view} IMG")
    for view in given:
        if view not in rec.views:
            raise InputError(f"--{view}", f"this {rec.task} model is single-view ({rec.views[0]}); "
                                          f"it takes no {view} X-ray")
    return {v: read_xray(Path(f)) for v, f in given.items()}


def to_shape(volume: np.ndarray, shape) -> np.ndarray:
    """``volume`` (``X×Y×Z``) at ``shape`` by trilinear interpolation (``align_corners=False``),
    float32; returned unchanged (as float32) when the shape already fits."""
    shape = tuple(int(s) for s in shape)
    vol = np.asarray(volume)
    if vol.shape == shape:
        return vol.astype(np.float32, copy=False)
    t = torch.from_numpy(np.ascontiguousarray(vol, dtype=np.float32))[None, None]
    return torch.nn.functional.interpolate(t, size=shape, mode="trilinear", align_corners=False)[0, 0].numpy()


def load_reconstructor(path: str | Path, registry: Mapping[str, str], hints: Mapping[str, str] | None = None,
                       **options: Any) -> Reconstructor:
    """The :class:`Reconstructor` of the checkpoint, run, ``latest``, ``step-N`` or export at
    ``path``, chosen by the task it records: ``registry`` maps a task name (or its ``module:attr``
    reference) to the ``module:Class`` that loads it (``launch.tasks.RECONSTRUCTORS``); ``hints``
    maps other tasks to what to do with their checkpoints instead (``launch.tasks.RECONSTRUCTOR_HINTS``);
    ``options`` go to its ``from_path`` (``device``, ``steps``, ``guidance``, ``drr_guidance``)."""
    meta = describe(path)
    task = next((str(t) for t in (meta.get("task"), meta.get("task_ref")) if t in registry), None)
    if task is None:
        names = ", ".join(k for k in registry if ":" not in k)
        hint = (hints or {}).get(str(meta.get("task")))
        raise InputError(path, f"is a {meta.get('task')!r} checkpoint, which does not reconstruct CTs from X-rays "
                               f"(give one of: {names})" + (f"; {hint}" if hint else ""))
    module_name, _, attr = registry[task].partition(":")
    return getattr(importlib.import_module(module_name), attr).from_path(path, **options)


# --- the one writer -----------------------------------------------------------------------------


def write_reconstruction(out: str | Path, volumes: Iterable[np.ndarray], affine: np.ndarray, *,
                         xrays: Mapping[str, np.ndarray] | None = None, attrs: dict | None = None,
                         title: str = "") -> tuple[dict[str, Path], dict]:
    """Write K ≥ 1 int16 HU volumes (an iterable: never more than one held) into ``out``.

    ``volume.nii.gz`` (RAS+ ``affine``, the reconstructor's geometry), ``volume.zarr`` (the store's
    chunks and codec, ``attrs`` + spacing, affine, units), ``preview.png`` (tri-planar with the
    X-rays) of the first volume; for K > 1 also ``sample-00k.nii.gz`` and the voxel-wise
    ``mean.nii.gz`` / ``std.nii.gz`` (Welford). Every file is written aside and renamed.
    Returns ``(files, summary)`` with ``summary = {**attrs, spacing, affine, volume_shape, num_samples}``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    affine = np.asarray(affine, dtype=float)
    spacing_mm = np.linalg.norm(affine[:3, :3], axis=0)  # the voxel size along each axis
    first = mean = m2 = None
    k = -1
    for k, hu in enumerate(volumes):
        if k == 0:
            first = hu
        else:
            files[f"sample_{k}"] = write_nifti(out / f"sample-{k:03d}.nii.gz", hu, affine)
        if k == 0:
            continue  # the mean and std start with the second volume (none at all for K = 1)
        if mean is None:  # Welford in float32, no K volumes held at once (a float64 copy of a
            mean, m2 = first.astype(np.float32), np.zeros(first.shape, np.float32)  # 512×512×604 volume is 1.27 GB)
        delta = hu - mean
        mean += delta / (k + 1)
        delta *= hu - mean
        m2 += delta
        del delta
    if first is None:
        raise InputError(out, "no volume to write")
    num = k + 1
    summary = {**(attrs or {}), "spacing_mm": [float(s) for s in spacing_mm], "affine": affine.tolist(),
               "units": "HU", "num_samples": num}
    files["nifti"] = write_nifti(out / "volume.nii.gz", first, affine)
    files["zarr"] = write_zarr(out / "volume.zarr", first, summary)
    files["preview"] = save_triplanar_png(out / "preview.png", first, spacing_mm, xrays=dict(xrays or {}), title=title)
    if num > 1:
        files["mean"] = write_nifti(out / "mean.nii.gz", np.rint(mean), affine)
        files["std"] = write_nifti(out / "std.nii.gz", np.rint(np.sqrt(m2 / num)), affine)
    return files, {**summary, "volume_shape": list(first.shape)}


def sample_files(rec: Reconstructor, pa: str | Path | None, lateral: str | Path | None, out: str | Path, *,
                 seed: int = 0, num_samples: int = 1, progress: bool = True) -> dict[str, Path]:
    """``xray2ct sample``: read the X-ray files, reconstruct ``num_samples`` volumes, write them
    (:func:`write_reconstruction`) and ``sample.json`` (settings, what was loaded, seconds,
    peak RSS). Returns the written files by kind (``"metadata"``: ``sample.json``)."""
    t0 = time.perf_counter()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError("--out", f"{out} exists and is not a directory")
    num_samples = positive_int(num_samples, "--num-samples")
    if not rec.stochastic and num_samples != 1:
        raise InputError("--num-samples", f"{rec.task} is deterministic: one sample per X-ray")
    shown = read_view_files(rec, {"pa": pa, "lateral": lateral})
    volumes = rec.iter_samples(shown, seed=seed, num_samples=num_samples)
    info = rec.info()
    attrs = {k: info.pop(k) for k in ("task", "step", "weights", "source")}
    if rec.stochastic:
        attrs.update(seed=int(seed), **{k: v for k, v in info.items() if k in ("steps", "guidance")})
        title = f"{rec.title()}, seed {seed}" + "".join(f", {info[k]} {k}" for k in ("steps", "guidance") if k in info)
    else:
        title = rec.title()
    files, summary = write_reconstruction(out, volumes, rec.geometry.affine(), xrays=shown, attrs=attrs, title=title)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB
    meta = {**summary, **info, "seconds": round(time.perf_counter() - t0, 3), "peak_rss_mb": round(peak_mb, 1)}
    meta_path = out / "sample.json"
    meta_path.write_text(json.dumps(meta, indent=1))
    files["metadata"] = meta_path
    if progress:
        print(f"[xray2ct] sampled {num_samples} volume(s) {tuple(summary['volume_shape'])} in {meta['seconds']:.1f} s, "
              f"peak RSS {peak_mb:.0f} MB", file=sys.stderr)
    return files
