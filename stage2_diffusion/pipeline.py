"""Sample CT volumes from X-ray files with a trained stage-2 model (``xray2ct sample`` for diffusion).

    files = sample_diffusion("runs/diff", "pa.png", "lat.png", "out/", num_samples=4, seed=0)
    # {"nifti": out/volume.nii.gz, "zarr": out/volume.zarr, "preview": out/preview.png,
    #  "sample_1": out/sample-001.nii.gz, ..., "mean": out/mean.nii.gz, "std": out/std.nii.gz,
    #  "metadata": out/sample.json}

Only the stage-2 checkpoint (or its export) is needed: its extra state holds the latent scale
factor, the VQ-GAN reference (path + sha256 of the weights the training latents came from) and
the data spec (spacing, HU window). Weights are read with safetensors and JSON only (the
layouts of ``launch/checkpoint.py`` / ``launch/export.py``; ``launch`` is not imported), the
EMA weights when the run kept them. The VQ-GAN is loaded with
:func:`stage1_vqgan.encode.load_vqgan` and its weights' sha256 must equal the reference's.

Pipeline: X-rays (:func:`patching.data.xray_io.read_xray`, resized to the encoder's size; a missing
view gets the encoder's learned tokens) → :func:`stage2_diffusion.sampler.sample_latents`
(whole latent, or the config's window) → ÷ scale factor → :func:`stage1_vqgan.codec.decode_latent`
(tiled, HU) → int16 → :func:`patching.artifacts.reconstruct.sample_files` (NIfTI with the spec's spacing
and a centred RAS+ affine, Zarr, tri-planar PNG). K samples are drawn one after the other from one CPU generator seeded with ``seed`` (the same
seed gives the same files); for K > 1 each further sample, the voxel-wise mean and std (HU) are
written too.

In memory (an evaluation loop): :class:`DiffusionReconstructor` (the method's
:class:`patching.artifacts.reconstruct.Reconstructor`) loads both models once and maps
``{view: array in [0, 1]}`` to int16 HU volumes ``(K, X, Y, Z)``; ``sample_diffusion`` reads the
files, draws through it and writes the results, so both give the same volume for a seed.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from patching.artifacts.format import (
    model_state,
    read_extra,
    read_run,
    resolve_weights,
    task_config,
)
from patching.artifacts.reconstruct import (
    Reconstructor,
    check_xrays,
    positive_int,
    sample_files,
    to_shape,
)
from patching.checks import resolve_device
from patching.data.spec import VolumeSpec
from patching.data.xray_io import resize_xray
from patching.errors import InputError
from stage1_vqgan.codec import decode_latent
from stage1_vqgan.encode import load_vqgan

from .config import Stage2Config
from .guidance import ProjectionGuidance, vqgan_decoder
from .sampler import sample_latents
from .schedules import sample_scheduler
from .task import DiffusionModel, DiffusionTaskConfig

TASK_NAME = "diffusion"
TASK_REF = "stage2_diffusion.task:DiffusionTask"


@dataclass
class LoadedDiffusion:
    cfg: Stage2Config
    model: DiffusionModel
    extra: dict
    step: int
    weights: str  # "ema" or "raw"
    source: Path


def load_diffusion(checkpoint: str | Path, device: str | torch.device = "cpu") -> LoadedDiffusion:
    """The stage-2 model (EMA weights when present), its config and extra state."""
    kind, where = resolve_weights(checkpoint)
    meta, run_cfg = read_run(kind, where)
    if meta.get("task") != TASK_NAME and meta.get("task_ref") != TASK_REF:
        raise InputError(where, f"is a checkpoint of task {meta.get('task')!r}, not of the diffusion model")
    cfg = task_config(DiffusionTaskConfig, run_cfg, where)
    if cfg.latent_shape is None:
        raise InputError(where, "records no latent_shape in its config (not written by `xray2ct train diffusion`?)")
    state, weights = model_state(kind, where, "diffusion", meta if kind == "export" else None)
    extra = read_extra(kind, where, meta)
    if extra.get("latent_scale_factor") is None or not isinstance(extra.get("vqgan"), dict):
        raise InputError(where, "holds no latent scale factor / VQ-GAN reference (extra state); "
                                "was it trained with `xray2ct train diffusion` on an encoded store?")
    model = DiffusionModel(cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise InputError(where, f"diffusion weights do not match the saved config ({str(err).splitlines()[0]})") from None
    model.to(device).eval()
    return LoadedDiffusion(cfg, model, extra, int(meta.get("step", 0)), weights, where)


class DiffusionReconstructor(Reconstructor):
    """Loads a stage-2 checkpoint/run dir/export once (:func:`load_diffusion`) and its VQ-GAN
    (sha256-checked against the reference the latents were made with), then turns X-ray arrays
    into CT volumes in memory.

        rec = DiffusionReconstructor("runs/diff", steps=10)
        hu = rec.reconstruct({"pa": pa, "lateral": lat}, seed=0, num_samples=4)   # (4, X, Y, Z) int16

    Attributes: those of :class:`patching.artifacts.reconstruct.Reconstructor` (``geometry``: the
    ``volume_shape`` = ``latent_shape`` × the VQ-GAN's downsampling, the recorded spacing and
    HU window), ``views`` (the encoder's view order), ``spacing_mm``, ``hu_window``,
    ``volume_shape``; also ``cfg``, ``latent_shape``, ``latent_scale_factor``,
    ``vqgan_reference``, ``steps``, ``guidance``, ``device``.

    Args:
        checkpoint: a diffusion checkpoint directory, the ``latest`` file, ``D/checkpoints``, a
            run directory or an ``xray2ct export`` directory.
        device: where the models run (default: CUDA when available, else CPU).
        vqgan: the VQ-GAN's checkpoint/export when it moved (default: the recorded path); its
            weights must have the recorded sha256.
        steps, guidance: sampler steps and CFG scale (default: the checkpoint's config).
        drr_guidance: projection-consistency iterations per step (:mod:`stage2_diffusion.guidance`;
            default: the config's ``sampler.drr_guidance_iters``; 0 = off).
        progress: tqdm bar over the denoising steps.

    Raises:
        InputError: bad checkpoint, VQ-GAN sha256 mismatch, bad ``steps``/``guidance``.
    """

    def __init__(self, checkpoint: str | Path, *, device: str | torch.device | None = None,
                 vqgan: str | Path | None = None, steps: int | None = None, guidance: float | None = None,
                 drr_guidance: int | None = None, progress: bool = False):
        self.device = resolve_device(device)
        loaded = load_diffusion(checkpoint, self.device)
        cfg, extra = loaded.cfg, loaded.extra
        ref = extra["vqgan"]
        vq_path = vqgan if vqgan is not None else ref.get("source")
        if vq_path is None:
            raise InputError(loaded.source, "records no VQ-GAN path; pass the VQ-GAN checkpoint explicitly")
        vq = load_vqgan(vq_path, self.device)
        if vq.reference["weights_sha256"] != ref.get("weights_sha256"):
            raise InputError(vq_path, f"VQ-GAN weights sha256 {vq.reference['weights_sha256']} differ from "
                                      f"{ref.get('weights_sha256')} that the diffusion model {loaded.source} was trained on")
        self.steps = positive_int(cfg.sampler.steps if steps is None else steps, "steps")
        self.guidance = cfg.diffusion.guidance_scale if guidance is None else guidance
        g = self.guidance
        if isinstance(g, bool) or not isinstance(g, numbers.Real) or not (math.isfinite(g) and g >= 0):
            raise InputError("guidance", f"must be a finite number >= 0, got {g!r}")
        self.guidance = float(g)
        self.cfg, self.model, self.vq, self.progress = cfg, loaded.model, vq, bool(progress)
        self.step, self.weights, self.source = loaded.step, loaded.weights, loaded.source
        self.vqgan_reference = ref
        self.latent_scale_factor = float(extra["latent_scale_factor"])
        self.latent_shape = tuple(int(s) for s in cfg.latent_shape)
        volume = extra.get("volume") or {}
        self.spacing_mm = tuple(float(s) for s in volume.get("spacing_mm", (1.0, 1.0, 1.0)))
        self.hu_window = tuple(float(v) for v in ref.get("hu_window") or vq.hu_window)
        self.views = tuple(cfg.encoder.views)
        f = int(vq.model.cfg.downsample)
        self.volume_shape = self.grid = tuple(f * s for s in self.latent_shape)
        self.geometry = VolumeSpec(self.volume_shape, self.spacing_mm, self.hu_window)
        self.scheduler = sample_scheduler(cfg.diffusion, cfg.sampler.name)
        self.window = cfg.sampler.window
        iters = cfg.sampler.drr_guidance_iters if drr_guidance is None else drr_guidance
        if isinstance(iters, bool) or not isinstance(iters, numbers.Integral) or iters < 0:
            raise InputError("--drr-guidance", f"must be an integer >= 0, got {iters!r}")
        self.drr_guidance_iters = int(iters)

    def use_fallback_window(self) -> None:
        """Denoise in the config's ``sampler.fallback_window`` windows from now on (``xray2ct
        sample --windowed``: the memory fallback when the whole latent does not fit)."""
        if self.cfg.sampler.fallback_window is None:
            raise InputError(self.source, "its config has no sampler.fallback_window for --windowed")
        self.window = tuple(self.cfg.sampler.fallback_window)

    task = TASK_NAME
    stochastic = True

    @classmethod
    def from_path(cls, path, *, device=None, steps=None, guidance=None, drr_guidance=None) -> DiffusionReconstructor:
        return cls(path, device=device, steps=steps, guidance=guidance, drr_guidance=drr_guidance)

    def info(self) -> dict:
        return {**super().info(), "steps": int(self.steps), "guidance": float(self.guidance),
                "vqgan": self.vqgan_reference, "latent_scale_factor": self.latent_scale_factor,
                "latent_shape": list(self.latent_shape), "device": str(self.device),
                "window": None if self.window is None else list(self.window),
                "drr_guidance_iters": self.drr_guidance_iters}

    def _inputs(self, xrays: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(1, V, S, S)`` checked X-rays resized to the encoder's size and ``(1, V)`` views present."""
        size = self.cfg.encoder.image_size
        imgs = [resize_xray(xrays[v], (size, size)).astype(np.float32) if v in xrays else np.zeros((size, size), np.float32)
                for v in self.views]
        return torch.from_numpy(np.stack(imgs))[None], torch.tensor([[v in xrays for v in self.views]])

    def _volumes(self, xrays, seed, num_samples, shape) -> Iterator[np.ndarray]:
        x, present = self._inputs(xrays)
        try:
            generator = torch.Generator().manual_seed(seed)
        except RuntimeError as err:
            raise InputError("seed", f"{seed} is not a valid seed ({err})") from None
        correct = self._projection_guidance(xrays)
        for _ in range(num_samples):
            vol = self.decode(self._latent(x, present, generator, self.window, correct=correct))
            yield vol if vol.shape == shape else to_shape(vol, shape)

    def _projection_guidance(self, xrays: dict[str, np.ndarray]) -> ProjectionGuidance | None:
        """Projection consistency with these X-rays (``sampler.drr_guidance_iters`` > 0), else None."""
        if not self.drr_guidance_iters:
            return None
        decode = vqgan_decoder(self.vq.model, self.model.unet, self.latent_scale_factor, self.hu_window)
        targets = {v: torch.from_numpy(np.asarray(img, dtype=np.float32)).to(self.device) for v, img in xrays.items()}
        return ProjectionGuidance(decode, targets, self.spacing_mm, iters=self.drr_guidance_iters,
                                  lr=self.cfg.sampler.drr_guidance_lr)

    def _latent(self, x: torch.Tensor, present: torch.Tensor, generator: torch.Generator,
                window, overlap: float | None = None, correct=None) -> torch.Tensor:
        cfg = self.cfg
        shape = (cfg.unet.latent_channels, *self.latent_shape)
        lat = sample_latents(self.model.unet, self.model.encoder, x, present, shape=shape, scheduler=self.scheduler,
                             steps=self.steps, guidance=self.guidance, generator=generator, window=window,
                             overlap=cfg.sampler.overlap if overlap is None else overlap, progress=self.progress,
                             correct=correct)
        return self.model.unet.from_centred(lat)[0].cpu() / self.latent_scale_factor

    def sample_latent(self, xrays: dict[str, np.ndarray], *, seed: int = 0, window="config",
                      overlap: float | None = None) -> torch.Tensor:
        """One sampled latent in the VQ-GAN's units ``(C, *latent_shape)`` (÷ scale factor), for
        analyses: ``window`` None denoises the whole latent, a size denoises blended windows,
        ``"config"`` uses the checkpoint's sampler setting. Seeded like :meth:`reconstruct`'s first sample."""
        xrays = check_xrays(xrays, self.views)
        x, present = self._inputs(xrays)
        return self._latent(x, present, torch.Generator().manual_seed(int(seed)),
                            self.cfg.sampler.window if window == "config" else window, overlap,
                            correct=self._projection_guidance(xrays))

    def decode(self, latent: torch.Tensor, tile_latent=None) -> np.ndarray:
        """int16 HU of a latent in the VQ-GAN's units, with the VQ-GAN's tiled codec
        (``tile_latent`` overrides its latent tile, e.g. the whole latent for a seam-free reference)."""
        codec, f = self.vq.codec, int(self.vq.model.cfg.downsample)
        sink = _Int16Volume(tuple(f * int(s) for s in latent.shape[1:]))
        decode_latent(self.vq.model, latent, tuple(tile_latent or codec.tile_latent), codec.overlap, out=sink,
                      hu_window=self.hu_window, batch_size=codec.batch_size, device=self.device, progress=self.progress)
        return sink.data


class _Int16Volume:
    """Out-of-core target of the tiled decode: the stitcher writes finished slabs of float HU,
    stored here rounded and clipped to int16 — the float32 volume (633 MB at 512×512×604) never
    exists whole, only the stitcher's slabs (docs/full_resolution.md, "Memory model")."""

    def __init__(self, shape: tuple[int, int, int]):
        self.shape = shape
        self.data = np.empty(shape, np.int16)

    def __setitem__(self, key, value) -> None:
        v = np.rint(np.asarray(value, dtype=np.float32))
        np.clip(v, -32768, 32767, out=v)
        self.data[key] = v


def sample_diffusion(checkpoint: str | Path, pa: str | Path | None, lateral: str | Path | None, out: str | Path, *,
                     steps: int | None = None, guidance: float | None = None, num_samples: int = 1, seed: int = 0,
                     device: str | torch.device | None = None, progress: bool = True,
                     vqgan: str | Path | None = None, windowed: bool = False) -> dict[str, Path]:
    """:func:`patching.artifacts.reconstruct.sample_files` with a :class:`DiffusionReconstructor` (``vqgan``:
    the VQ-GAN's weights when they moved; they must have the recorded sha256; ``windowed``: the
    config's ``sampler.fallback_window``)."""
    rec = DiffusionReconstructor(checkpoint, device=device, vqgan=vqgan, steps=steps, guidance=guidance,
                                 progress=progress)
    if windowed:
        rec.use_fallback_window()
    return sample_files(rec, pa, lateral, out, seed=seed, num_samples=num_samples, progress=progress)
