"""Denoise a CT with a trained CNCL generator: ``xray2ct denoise`` (and the benchmark).

    loaded = load_denoiser("runs/cncl")                    # checkpoint, run dir or export
    out_hu = denoise_hu(loaded, hu, hu_window=(-1024, 1600))  # float32 HU, same shape

Weights come through :mod:`patching.artifacts.format` (safetensors and JSON only; the EMA generator when
the run kept one), as for every sampler. The volume runs through the patch layer's sliding window
(:func:`patching.tiling.stitch.sliding_window`): ``patch × patch × 1`` tiles (axial slices cut into the
training crop size; CNCL is 2D), overlap ``overlap`` in-plane and none across slices, Gaussian
blending, HU mapped to [-1, 1] by the preset's window on the way in (``window_to_unit``) and back
on the way out. Axes shorter than the tile are padded with air and cropped back, so any volume
size works.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from torch import nn

from patching.artifacts.format import model_state, read_run, resolve_weights, task_config
from patching.checks import resolve_device
from patching.data.spec import AIR_HU, unit_to_hu
from patching.errors import InputError
from patching.tiling.stitch import sliding_window, window_to_unit

from .config import CNCLConfig
from .model import CNCLGenerator

TASK_REF = "gan_baselines.cncl.task:CNCLTask"


@dataclass
class LoadedDenoiser:
    preset: str
    step: int
    cfg: CNCLConfig
    generator: nn.Module
    weights: str  # "ema" or "raw"
    source: Path


def load_denoiser(path: str | os.PathLike, device: str | torch.device | None = "cpu") -> LoadedDenoiser:
    """The CNCL generator (EMA weights when present) of a checkpoint, run directory or export,
    read through :mod:`patching.artifacts.format` (safetensors and validated JSON only)."""
    kind, where = resolve_weights(path)
    meta, run_cfg = read_run(kind, where)
    if meta.get("task") != "cncl" and meta.get("task_ref") != TASK_REF:
        raise InputError(where, f"is a checkpoint of task {meta.get('task')!r}, not cncl")
    cfg = task_config(CNCLConfig, run_cfg, where)  # strict; the engine's train section is not the model's
    state, weights = model_state(kind, where, "generator", meta if kind == "export" else None)
    generator = CNCLGenerator(cfg.model)
    try:
        generator.load_state_dict(state)
    except RuntimeError as err:
        raise InputError(where, f"generator weights do not match the saved cncl config ({str(err).splitlines()[0]})") from None
    generator.to(resolve_device(device)).eval()  # a bad --device: one line, not a traceback
    return LoadedDenoiser(str(meta.get("preset", "")), int(meta.get("step", 0)), cfg, generator, weights, where)


@torch.no_grad()
def denoise_hu(loaded: LoadedDenoiser, hu: np.ndarray, hu_window: tuple[float, float], *, overlap: float = 0.25,
               batch_size: int = 8, progress: bool = False) -> np.ndarray:
    """Denoise an HU volume ``[x, y, z]`` (axial slices in the ``x × y`` planes): float32 HU, same shape."""
    hu = np.asarray(hu, dtype=np.float32)
    if hu.ndim != 3:
        raise InputError("volume", f"needs an X×Y×Z volume, got shape {hu.shape}")
    p = loaded.cfg.data.patch
    device = next(loaded.generator.parameters()).device

    def fn(batch: torch.Tensor) -> torch.Tensor:  # B×1×p×p×1 → B×1×p×p×1
        return rearrange(loaded.generator(rearrange(batch, "b c x y 1 -> b c x y")), "b c x y -> b c x y 1")

    unit = sliding_window(hu, fn, (p, p, 1), overlap=(overlap, overlap, 0.0), mode="gaussian", batch_size=batch_size,
                          pad_value=float(AIR_HU), input_map=window_to_unit(hu_window), device=device,
                          progress=progress)
    return np.asarray(unit_to_hu(unit, hu_window), dtype=np.float32)


def denoise_file(checkpoint: str | os.PathLike, source: str | os.PathLike, out: str | os.PathLike,
                 hu_window: tuple[float, float], *, dose: float | None = None, seed: int = 0,
                 device: str | torch.device | None = None, progress: bool = True) -> Path:
    """Read a NIfTI CT, optionally simulate ``dose`` first (:mod:`patching.projection.lowdose`, ``seed``, with
    the scanner the model was trained with: ``cfg.data``), denoise it and write it with the input's
    geometry (shape, affine, orientation)."""
    from patching.data.ingest import load_nifti
    from patching.data.volume_io import check_nifti_out, write_nifti_like
    from patching.projection.lowdose import check_dose, simulate_volume

    path = check_nifti_out(out)
    if dose is not None:
        dose = check_dose(dose)
    loaded = load_denoiser(checkpoint, device)
    hu, spacing, _ = load_nifti(source)
    if dose is not None:
        hu = simulate_volume(hu, spacing, dose, seed=seed, scanner=loaded.cfg.data.scanner(), progress=progress)
    result = denoise_hu(loaded, hu, hu_window, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_nifti_like(path, result, Path(source))
