"""Reconstruct a CT from X-ray files with a trained X2CT-GAN or X-Recon generator.

    rec = GanReconstructor.from_path("runs/x2ct/checkpoints/latest")
    hu = rec.reconstruct({"pa": pa, "lateral": lateral})   # (1, X, Y, Z) int16 HU, the training cases' grid

Weights come from any weights path (a run directory, ``checkpoints/``, ``latest``, ``step-N`` or
an ``xray2ct export``), read through :mod:`patching.artifacts.format` (safetensors and JSON only; the
generator's EMA weights when the run kept them; stage packages never import ``launch``).

Pipeline (:class:`GanReconstructor`, the method's :class:`patching.artifacts.reconstruct.Reconstructor`):
X-rays resized to the model's X-ray size → generator → the model's [0, 1] back to the project's
[-1, 1] → HU by the training window → trilinear (``align_corners=False``) from the model's cube
to the full shape of the training cases (recorded in the checkpoint's extra state by the task;
older checkpoints: the preset's; or the shape asked for) → int16 HU; files are written by
:func:`patching.artifacts.reconstruct.sample_files`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from patching.artifacts.format import (
    describe,
    model_state,
    read_extra,
    read_run,
    resolve_weights,
    task_config,
)
from patching.artifacts.reconstruct import Reconstructor, sample_files
from patching.checks import resolve_device
from patching.data.spec import VolumeSpec, data_spec
from patching.data.xray_io import resize_xray
from patching.errors import InputError

from . import s_xr2ct, x2ct_gan, x_recon
from .common import from_model_range

# task name → (config class, generator class)
GAN_TASKS: dict[str, tuple[type, type]] = {
    "x2ct-gan": (x2ct_gan.X2CTGANConfig, x2ct_gan.X2CTGenerator),
    "x-recon": (x_recon.XReconConfig, x_recon.XReconGenerator),
    "s-xr2ct": (s_xr2ct.SXR2CTConfig, s_xr2ct.SXR2CTGenerator),
}
_TASK_REFS = {"gan_baselines.x2ct_gan.task:X2CTGANTask": "x2ct-gan", "gan_baselines.x_recon.task:XReconTask": "x-recon",
              "gan_baselines.s_xr2ct.task:SXR2CTTask": "s-xr2ct"}


@dataclass
class LoadedGenerator:
    """A generator ready to run (``eval()``), with what it was trained as."""

    task: str
    preset: str
    step: int
    cfg: Any  # X2CTGANConfig | XReconConfig
    generator: nn.Module
    weights: str  # "ema" or "raw"
    source: Path
    volume: dict | None = None  # the training cases' grid (extra state): shape, spacing_mm, hu_window


# --- finding and reading weights: patching.artifacts.format (shared by every sampler) -----------------


def checkpoint_preset(path: str | os.PathLike) -> str:
    """The preset name a checkpoint or export was trained with (for ``data_spec``)."""
    return str(describe(path).get("preset", "cpu-demo"))


def checkpoint_task(path: str | os.PathLike) -> str:
    """The task a checkpoint or export belongs to (``x2ct-gan``, ``x-recon``, ``vqgan``, ...):
    a sampling CLI sends those in :data:`GAN_TASKS` to :func:`sample_gan`."""
    meta = describe(path)
    return _TASK_REFS.get(str(meta.get("task_ref")), str(meta.get("task")))


def load_generator(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedGenerator:
    """Load an X2CT-GAN or X-Recon generator (EMA weights when present) from a checkpoint or export."""
    kind, where = resolve_weights(path)
    meta, run_cfg = read_run(kind, where)
    task = _TASK_REFS.get(str(meta.get("task_ref")), str(meta.get("task")))
    if task not in GAN_TASKS:
        raise InputError(where, f"is a checkpoint of task {meta.get('task')!r}, not of a GAN baseline "
                                f"({', '.join(GAN_TASKS)})")
    cfg = task_config(GAN_TASKS[task][0], run_cfg, where)
    state, weights = model_state(kind, where, "generator", meta if kind == "export" else None)
    generator = GAN_TASKS[task][1](cfg.model)
    try:
        generator.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise InputError(where, f"generator weights do not match the saved {task} config ({first})") from None
    generator.to(resolve_device(device)).eval()
    volume = read_extra(kind, where, meta).get("volume")
    return LoadedGenerator(task, str(meta.get("preset", "")), int(meta.get("step", 0)), cfg, generator, weights, where,
                           volume if isinstance(volume, dict) else None)


def trained_geometry(loaded: LoadedGenerator) -> VolumeSpec:
    """The grid the generator's training cases had (its extra state); checkpoints without one
    (written before it was recorded) get their preset's grid."""
    v = loaded.volume
    if v:
        try:
            return VolumeSpec(tuple(v["shape"]), tuple(v["spacing_mm"]), tuple(v["hu_window"]))
        except (KeyError, TypeError, ValueError, InputError) as err:
            raise InputError(loaded.source, f"extra state 'volume' is not a grid ({err})") from None
    return data_spec(loaded.preset or "cpu-demo")


# --- reconstruction -------------------------------------------------------------------------------


@torch.no_grad()
def reconstruct_hu(loaded: LoadedGenerator, xrays: dict[str, np.ndarray], spec: VolumeSpec) -> np.ndarray:
    """int16 HU ``[x, y, z]`` of ``spec.shape`` from X-rays (``[row, col]`` in [0, 1], any size).

    The generator's cube is mapped to HU by ``spec.hu_window`` (clipped) and resampled to the
    full shape by trilinear interpolation (``align_corners=False``), in HU.
    """
    m = loaded.cfg.model
    device = next(loaded.generator.parameters()).device
    inputs = {}
    for view in m.views:
        img = resize_xray(xrays[view], (m.xray_size, m.xray_size))
        inputs[view] = torch.from_numpy(img)[None, None].to(device)  # 1×1×S×S
    cube = loaded.generator(**inputs).float()  # 1×1×N×N×N in the model's range
    lo, hi = spec.hu_window
    cube_hu = (from_model_range(cube, m.value_range).clamp_(-1.0, 1.0) + 1.0) * (0.5 * (hi - lo)) + lo
    full = torch.nn.functional.interpolate(cube_hu, size=spec.shape, mode="trilinear", align_corners=False)
    return full[0, 0].round_().to(torch.int16).cpu().numpy()  # in place: one float copy at full size


class GanReconstructor(Reconstructor):
    """X2CT-GAN / X-Recon behind the reconstructor interface: deterministic, every view of the
    model required, volumes on the grid of the cases it was trained on (``geometry``, from the
    checkpoint's extra state; ``spec`` overrides it)."""

    stochastic = False

    def __init__(self, loaded: LoadedGenerator, spec: VolumeSpec | None = None):
        self.loaded, self.task = loaded, loaded.task
        self.views = self.required_views = tuple(loaded.cfg.model.views)
        self.geometry = spec if spec is not None else trained_geometry(loaded)
        n = int(loaded.cfg.model.volume_size)
        self.grid = (n, n, n)
        self.step, self.weights, self.source = loaded.step, loaded.weights, loaded.source

    @classmethod
    def from_path(cls, path, *, device=None, steps=None, guidance=None, drr_guidance=None,
                  spec: VolumeSpec | None = None):
        return cls(load_generator(path, device or "cpu"), spec)

    def _volumes(self, xrays, seed, num_samples, shape):
        spec = VolumeSpec(shape, self.geometry.spacing_mm, self.geometry.hu_window)
        hu = reconstruct_hu(self.loaded, xrays, spec)
        for _ in range(num_samples):
            yield hu

    def info(self) -> dict:
        return {**super().info(), "preset": self.loaded.preset}


def sample_gan(checkpoint: Path, pa: Path | None, lateral: Path | None, out: Path, preset: VolumeSpec, *,
               device: str | torch.device = "cpu") -> dict[str, Path]:
    """Reconstruct one CT from X-ray files with a GAN baseline and write it into ``out``
    (:func:`patching.artifacts.reconstruct.sample_files` on the grid of ``preset``)."""
    return sample_files(GanReconstructor.from_path(checkpoint, device=device, spec=preset), pa, lateral, out,
                        progress=False)
