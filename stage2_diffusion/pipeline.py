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

Pipeline: X-rays (:func:`patching.xray_io.read_xray`, resized to the encoder's size; a missing
view gets the encoder's learned tokens) → :func:`stage2_diffusion.sampler.sample_latents`
(whole latent, or the config's window) → ÷ scale factor → :func:`stage1_vqgan.codec.decode_latent`
(tiled, HU) → int16 → NIfTI (the spec's spacing, centred RAS+ affine), Zarr, tri-planar PNG.
K samples are drawn one after the other from one CPU generator seeded with ``seed`` (the same
seed gives the same files); for K > 1 each further sample, the voxel-wise mean and std (HU) are
written too.

In memory (an evaluation loop): :class:`DiffusionReconstructor` loads both models once and maps
``{view: array in [0, 1]}`` to int16 HU volumes ``(K, X, Y, Z)``; ``sample_diffusion`` reads the
files, draws through it and writes the results, so both give the same volume for a seed.
"""

from __future__ import annotations

import json
import math
import numbers
import resource
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from patching.errors import InputError
from patching.preview import save_triplanar_png
from patching.spec import centred_affine
from patching.volume_io import write_nifti, write_zarr
from patching.weights import model_state, resolve_weights
from patching.weights import read_json as _read_json
from patching.xray_io import read_xray, resize_xray
from stage1_vqgan.codec import decode_latent
from stage1_vqgan.encode import load_vqgan

from .config import DiffusionConfig, SamplerConfig, Stage2Config, UNetConfig, XrayEncoderConfig
from .sampler import sample_latents
from .schedules import sample_scheduler
from .task import DiffusionModel

CHECKPOINT_FORMAT = "xray2ct-checkpoint"
TASK_NAME = "diffusion"
TASK_REF = "stage2_diffusion.task:DiffusionTask"
_SECTIONS = {"encoder": XrayEncoderConfig, "unet": UNetConfig, "diffusion": DiffusionConfig, "sampler": SamplerConfig}


@dataclass
class LoadedDiffusion:
    cfg: Stage2Config
    model: DiffusionModel
    extra: dict
    step: int
    weights: str  # "ema" or "raw"
    source: Path


def _plain(x: Any) -> Any:
    """The engine's JSON skeleton (tuples as ``{"__tuple__": [...]}``) → plain lists/dicts."""
    if isinstance(x, dict):
        if set(x) == {"__tuple__"}:
            return [_plain(v) for v in x["__tuple__"]]
        if set(x) == {"__dict__"}:
            return {k: _plain(v) for k, v in x["__dict__"]}
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_plain(v) for v in x]
    return x


def _build_config(run_cfg: dict, where: Path) -> Stage2Config:
    kwargs = {}
    try:
        for name, cls in _SECTIONS.items():
            known = {f.name for f in fields(cls)}
            kwargs[name] = cls(**{k: v for k, v in (run_cfg.get(name) or {}).items() if k in known})
        if not run_cfg.get("latent_shape"):
            raise InputError(where, "records no latent_shape in its config (not written by `xray2ct train diffusion`?)")
        return Stage2Config(**kwargs, latent_shape=tuple(run_cfg["latent_shape"]))
    except (TypeError, InputError) as err:
        raise InputError(where, f"saved config does not fit the diffusion model: {err}") from None


def load_diffusion(checkpoint: str | Path, device: str | torch.device = "cpu") -> LoadedDiffusion:
    """The stage-2 model (EMA weights when present), its config and extra state."""
    kind, where = resolve_weights(checkpoint)
    if kind == "export":
        doc = _read_json(where / "config.json")
        meta, run_cfg = doc, doc.get("config") or {}
        extra_path = where / "extra.json" if doc.get("extra") else None
    else:
        meta = _read_json(where / "meta.json")
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise InputError(where / "meta.json", f"not an xray2ct checkpoint (format {meta.get('format')!r})")
        run_cfg = _read_json(where / "config.json").get("config") or {}
        extra_path = where / "extra.json"
    if meta.get("task") != TASK_NAME and meta.get("task_ref") != TASK_REF:
        raise InputError(where, f"is a checkpoint of task {meta.get('task')!r}, not of the diffusion model")
    cfg = _build_config(run_cfg, where)
    state, weights = model_state(kind, where, "diffusion", doc if kind == "export" else None)
    extra = _plain(_read_json(extra_path).get("state") or {}) if extra_path is not None and extra_path.is_file() else {}
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


def _positive_int(value, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise InputError(source, f"must be a positive integer, got {value!r}")
    return int(value)


class DiffusionReconstructor:
    """Loads a stage-2 checkpoint/run dir/export once (:func:`load_diffusion`) and its VQ-GAN
    (sha256-checked against the reference the latents were made with), then turns X-ray arrays
    into CT volumes in memory.

        rec = DiffusionReconstructor("runs/diff", steps=10)
        hu = rec.reconstruct({"pa": pa, "lateral": lat}, seed=0, num_samples=4)   # (4, X, Y, Z) int16

    Attributes: ``views`` (the encoder's view order), ``spacing_mm``, ``hu_window``,
    ``volume_shape`` (``latent_shape`` × the VQ-GAN's downsampling), ``step``, ``weights``
    ("ema"/"raw"), ``source``; also ``cfg``, ``latent_shape``, ``latent_scale_factor``,
    ``vqgan_reference``, ``steps``, ``guidance``, ``device``.

    Args:
        checkpoint: a diffusion checkpoint directory, the ``latest`` file, ``D/checkpoints``, a
            run directory or an ``xray2ct export`` directory.
        device: where the models run (default: CUDA when available, else CPU).
        vqgan: the VQ-GAN's checkpoint/export when it moved (default: the recorded path); its
            weights must have the recorded sha256.
        steps, guidance: sampler steps and CFG scale (default: the checkpoint's config).
        progress: tqdm bar over the denoising steps.
        windowed: denoise in the config's ``sampler.fallback_window`` windows instead of its
            ``sampler.window`` (the memory fallback when the whole latent does not fit).

    Raises:
        InputError: bad checkpoint, VQ-GAN sha256 mismatch, bad ``steps``/``guidance``, ``windowed``
            with no fallback window in the config.
    """

    def __init__(self, checkpoint: str | Path, *, device: str | torch.device | None = None,
                 vqgan: str | Path | None = None, steps: int | None = None, guidance: float | None = None,
                 progress: bool = False, windowed: bool = False):
        self.device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
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
        self.steps = _positive_int(cfg.sampler.steps if steps is None else steps, "steps")
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
        self.volume_shape = tuple(f * s for s in self.latent_shape)
        self.scheduler = sample_scheduler(cfg.diffusion, cfg.sampler.name)
        if windowed and cfg.sampler.fallback_window is None:
            raise InputError(loaded.source, "its config has no sampler.fallback_window for --windowed")
        self.window = cfg.sampler.fallback_window if windowed else cfg.sampler.window

    def _inputs(self, xrays) -> tuple[torch.Tensor, torch.Tensor]:
        """``(1, V, S, S)`` X-rays resized to the encoder's size and ``(1, V)`` views present."""
        if not isinstance(xrays, Mapping):
            raise InputError("xrays", f"needs a dict {{view: 2-D array in [0, 1]}}, got {type(xrays).__name__}")
        unknown = [k for k in xrays if k not in self.views]
        if unknown:
            raise InputError("xrays", f"unknown view {unknown[0]!r}; this model takes {', '.join(self.views)}")
        given = {k: v for k, v in xrays.items() if v is not None}
        if not given:
            raise InputError("xrays", f"no view given; pass at least one of {', '.join(self.views)}")
        size = self.cfg.encoder.image_size
        imgs, present = [], []
        for view in self.views:
            if view not in given:
                imgs.append(np.zeros((size, size), np.float32))
                present.append(False)
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
                                      "(patching.xray_io.read_xray normalises image files)")
            imgs.append(resize_xray(a.astype(np.float32), (size, size)).astype(np.float32))
            present.append(True)
        return torch.from_numpy(np.stack(imgs))[None], torch.tensor([present])

    def iter_samples(self, xrays: dict[str, np.ndarray], *, seed: int = 0,
                     num_samples: int = 1) -> Iterator[np.ndarray]:
        """The volumes of :meth:`reconstruct` one at a time (inputs are checked at the call)."""
        x, present = self._inputs(xrays)
        num_samples = _positive_int(num_samples, "num_samples")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise InputError("seed", f"must be an integer, got {seed!r}")
        try:
            generator = torch.Generator().manual_seed(int(seed))
        except RuntimeError as err:
            raise InputError("seed", f"{seed} is not a valid seed ({err})") from None
        return self._samples(x, present, generator, num_samples)

    def _samples(self, x: torch.Tensor, present: torch.Tensor, generator: torch.Generator,
                 num_samples: int) -> Iterator[np.ndarray]:
        for _ in range(num_samples):
            yield self.decode(self._latent(x, present, generator, self.window))

    def _latent(self, x: torch.Tensor, present: torch.Tensor, generator: torch.Generator,
                window, overlap: float | None = None) -> torch.Tensor:
        cfg = self.cfg
        shape = (cfg.unet.latent_channels, *self.latent_shape)
        lat = sample_latents(self.model.unet, self.model.encoder, x, present, shape=shape, scheduler=self.scheduler,
                             steps=self.steps, guidance=self.guidance, generator=generator, window=window,
                             overlap=cfg.sampler.overlap if overlap is None else overlap, progress=self.progress)
        return lat[0].cpu() / self.latent_scale_factor

    def sample_latent(self, xrays: dict[str, np.ndarray], *, seed: int = 0, window="config",
                      overlap: float | None = None) -> torch.Tensor:
        """One sampled latent in the VQ-GAN's units ``(C, *latent_shape)`` (÷ scale factor), for
        analyses: ``window`` None denoises the whole latent, a size denoises blended windows,
        ``"config"`` uses the checkpoint's sampler setting. Seeded like :meth:`reconstruct`'s first sample."""
        x, present = self._inputs(xrays)
        return self._latent(x, present, torch.Generator().manual_seed(int(seed)),
                            self.cfg.sampler.window if window == "config" else window, overlap)

    def decode(self, latent: torch.Tensor, tile_latent=None) -> np.ndarray:
        """int16 HU of a latent in the VQ-GAN's units, with the VQ-GAN's tiled codec
        (``tile_latent`` overrides its latent tile, e.g. the whole latent for a seam-free reference)."""
        codec = self.vq.codec
        hu = decode_latent(self.vq.model, latent, tuple(tile_latent or codec.tile_latent), codec.overlap,
                           hu_window=self.hu_window, batch_size=codec.batch_size, device=self.device,
                           progress=self.progress)[0].numpy()
        np.rint(hu, out=hu)  # in place: one float32 volume (633 MB at 512×512×604), then its int16 copy
        np.clip(hu, -32768, 32767, out=hu)
        return hu.astype(np.int16)

    def reconstruct(self, xrays: dict[str, np.ndarray], *, seed: int = 0, num_samples: int = 1) -> np.ndarray:
        """CT volumes for one set of X-rays.

        Args:
            xrays: ``{"pa": 2-D float array in [0, 1] of any size, optionally "lateral": ...}``
                (resized to the encoder's size; a missing view — absent or None — uses the
                encoder's learned missing-view tokens).
            seed: seed of the CPU generator that draws the samples one after the other, as
                :func:`sample_diffusion` does (``reconstruct(x, seed=s)[0]`` is its volume for seed s).
            num_samples: K ≥ 1.

        Returns:
            int16 HU, ``(num_samples, *volume_shape)``.

        Raises:
            InputError: unknown view names, no view given, arrays that are not 2-D or hold NaN
                or values outside [0, 1], bad ``seed``/``num_samples``.
        """
        return np.stack(list(self.iter_samples(xrays, seed=seed, num_samples=num_samples)))


def sample_diffusion(checkpoint: str | Path, pa: str | Path | None, lateral: str | Path | None, out: str | Path, *,
                     steps: int | None = None, guidance: float | None = None, num_samples: int = 1, seed: int = 0,
                     device: str | torch.device | None = None, progress: bool = True,
                     vqgan: str | Path | None = None, windowed: bool = False) -> dict[str, Path]:
    """Sample ``num_samples`` CT volumes for one pair of X-rays and write them into ``out``.

    Args:
        checkpoint: a diffusion checkpoint directory, the ``latest`` file, ``D/checkpoints``, a
            run directory or an ``xray2ct export`` directory.
        pa, lateral: X-ray files (PNG, JPEG, DICOM, ``.npy``); at least one.
        out: output directory (created).
        steps, guidance: sampler steps and CFG scale (default: the checkpoint's config).
        num_samples: K ≥ 1; K > 1 also writes ``sample-00k.nii.gz``, ``mean.nii.gz``, ``std.nii.gz``.
        seed: seed of the CPU generator that draws every sample's initial noise.
        device: where the models run (default: CUDA when available, else CPU).
        progress: tqdm bars.
        vqgan: the VQ-GAN's checkpoint/export when it moved (default: the path recorded in the
            checkpoint); its weights must have the recorded sha256.
        windowed: denoise in the config's ``sampler.fallback_window`` windows.

    Returns:
        ``{"nifti", "zarr", "preview"}`` of sample 0, ``"sample_k"`` (k ≥ 1), ``"mean"``, ``"std"``
        (K > 1), and ``"metadata"`` (``sample.json``: settings, VQ-GAN reference, timings,
        ``peak_rss_mb``).

    Raises:
        InputError: bad checkpoint, missing X-rays, a VQ-GAN whose sha256 differs from the one
            the model was trained on, bad ``steps``/``guidance``/``num_samples``.
    """
    t0 = time.perf_counter()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError("--out", f"{out} exists and is not a directory")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise InputError("--num-samples", f"must be a positive integer, got {num_samples!r}")
    files_in = {"pa": pa, "lateral": lateral}
    if all(v is None for v in files_in.values()):
        raise InputError("--pa", "give at least one X-ray (--pa, and --lateral for biplanar input)")
    shown = {v: read_xray(Path(f)) for v, f in files_in.items() if f is not None}
    rec = DiffusionReconstructor(checkpoint, device=device, vqgan=vqgan, steps=steps, guidance=guidance,
                                 progress=progress, windowed=windowed)
    for v in shown:
        if v not in rec.views:
            raise InputError(f"--{v}", f"this model takes only the views {', '.join(rec.views)}")

    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    mean = m2 = None
    affine = centred_affine(rec.volume_shape, rec.spacing_mm)
    hu0 = None
    for k, hu in enumerate(rec.iter_samples(shown, seed=seed, num_samples=num_samples)):
        if k == 0:
            hu0 = hu
        else:
            files[f"sample_{k}"] = write_nifti(out / f"sample-{k:03d}.nii.gz", hu, affine)
        if num_samples == 1:
            continue
        # Welford in float32 (no K volumes held at once; HU·K sums are exact enough for ±0.5 HU):
        # a float64 copy of a 512×512×604 volume alone would be 1.27 GB.
        if mean is None:
            mean, m2 = hu.astype(np.float32), np.zeros(hu.shape, np.float32)
        else:
            delta = hu - mean
            mean += delta / (k + 1)
            delta *= hu - mean
            m2 += delta
            del delta
    steps, guidance = rec.steps, rec.guidance
    title = f"diffusion step {rec.step} ({rec.weights}), seed {seed}, {steps} steps, guidance {guidance}"
    attrs = {"task": TASK_NAME, "step": rec.step, "weights": rec.weights, "source": str(rec.source),
             "spacing_mm": list(rec.spacing_mm), "affine": affine.tolist(), "units": "HU", "seed": int(seed),
             "steps": int(steps), "guidance": float(guidance), "num_samples": num_samples,
             "window": None if rec.window is None else list(rec.window)}
    files["nifti"] = write_nifti(out / "volume.nii.gz", hu0, affine)
    files["zarr"] = write_zarr(out / "volume.zarr", hu0, attrs)
    files["preview"] = save_triplanar_png(out / "preview.png", hu0, rec.spacing_mm, xrays=shown, title=title)
    if num_samples > 1:
        files["mean"] = write_nifti(out / "mean.nii.gz", np.rint(mean), affine)
        files["std"] = write_nifti(out / "std.nii.gz", np.rint(np.sqrt(m2 / num_samples)), affine)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB
    meta = {**attrs, "vqgan": rec.vqgan_reference, "latent_scale_factor": rec.latent_scale_factor,
            "latent_shape": list(rec.latent_shape), "volume_shape": list(hu0.shape),
            "seconds": round(time.perf_counter() - t0, 3), "peak_rss_mb": round(peak_mb, 1), "device": str(rec.device)}
    meta_path = out / "sample.json"
    meta_path.write_text(json.dumps(meta, indent=1))
    files["metadata"] = meta_path
    if progress:
        print(f"[xray2ct] sampled {num_samples} volume(s) {tuple(hu0.shape)} in {meta['seconds']:.1f} s, "
              f"peak RSS {peak_mb:.0f} MB", file=sys.stderr)
    return files
