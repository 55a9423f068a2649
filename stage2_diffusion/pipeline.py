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
"""

from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from patching.errors import InputError
from patching.preview import save_triplanar_png
from patching.spec import centred_affine
from patching.volume_io import write_nifti, write_zarr
from patching.weights import load_tensors as _load_tensors
from patching.weights import read_json as _read_json
from patching.weights import resolve_weights
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
        return Stage2Config(**kwargs, latent_shape=tuple(run_cfg.get("latent_shape") or (16, 16, 16)))
    except (TypeError, InputError) as err:
        raise InputError(where, f"saved config does not fit the diffusion model: {err}") from None


def load_diffusion(checkpoint: str | Path, device: str | torch.device = "cpu") -> LoadedDiffusion:
    """The stage-2 model (EMA weights when present), its config and extra state."""
    kind, where = resolve_weights(checkpoint)
    if kind == "export":
        doc = _read_json(where / "config.json")
        meta, run_cfg = doc, doc.get("config") or {}
        entry = (doc.get("models") or {}).get("diffusion")
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
    if kind == "export":
        if entry is None:
            raise InputError(where / "config.json", "lists no diffusion weights")
        state, weights = _load_tensors(where / entry["file"]), str(entry.get("weights", "raw"))
    elif (where / "ema" / "diffusion.safetensors").is_file():
        state, weights = _load_tensors(where / "ema" / "diffusion.safetensors"), "ema"
    else:
        state, weights = _load_tensors(where / "models" / "diffusion.safetensors"), "raw"
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


def _read_views(views: tuple[str, ...], pa, lateral, size: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    given = {"pa": pa, "lateral": lateral}
    if all(given.get(v) is None for v in views):
        raise InputError("--pa", "give at least one X-ray (--pa, and --lateral for biplanar input)")
    imgs, present, shown = [], [], {}
    for v in views:
        path = given.get(v)
        if path is None:
            imgs.append(np.zeros((size, size), np.float32))
            present.append(False)
            continue
        img = read_xray(Path(path))
        shown[v] = img
        imgs.append(resize_xray(img, (size, size)).astype(np.float32))
        present.append(True)
    return torch.from_numpy(np.stack(imgs))[None], torch.tensor([present]), shown


def sample_diffusion(checkpoint: str | Path, pa: str | Path | None, lateral: str | Path | None, out: str | Path, *,
                     steps: int | None = None, guidance: float | None = None, num_samples: int = 1, seed: int = 0,
                     device: str | torch.device | None = None, progress: bool = True,
                     vqgan: str | Path | None = None) -> dict[str, Path]:
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
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_diffusion(checkpoint, device)
    cfg, extra = loaded.cfg, loaded.extra
    ref = extra["vqgan"]
    vq_path = vqgan if vqgan is not None else ref.get("source")
    if vq_path is None:
        raise InputError(loaded.source, "records no VQ-GAN path; pass the VQ-GAN checkpoint explicitly")
    vq = load_vqgan(vq_path, device)
    if vq.reference["weights_sha256"] != ref.get("weights_sha256"):
        raise InputError(vq_path, f"VQ-GAN weights sha256 {vq.reference['weights_sha256']} differ from "
                                  f"{ref.get('weights_sha256')} that the diffusion model {loaded.source} was trained on")
    scale = float(extra["latent_scale_factor"])
    volume = extra.get("volume") or {}
    spacing = tuple(float(s) for s in volume.get("spacing_mm", (1.0, 1.0, 1.0)))
    hu_window = tuple(float(v) for v in ref.get("hu_window") or vq.hu_window)

    xrays, present, shown = _read_views(tuple(cfg.encoder.views), pa, lateral, cfg.encoder.image_size)
    steps = cfg.sampler.steps if steps is None else steps
    guidance = cfg.diffusion.guidance_scale if guidance is None else guidance
    scheduler = sample_scheduler(cfg.diffusion, cfg.sampler.name)
    shape = (cfg.unet.latent_channels, *cfg.latent_shape)
    generator = torch.Generator().manual_seed(int(seed))
    codec = vq.codec

    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    mean = m2 = None
    affine = None
    hu0 = None
    for k in range(num_samples):
        lat = sample_latents(loaded.model.unet, loaded.model.encoder, xrays, present, shape=shape, scheduler=scheduler,
                             steps=steps, guidance=guidance, generator=generator, window=cfg.sampler.window,
                             overlap=cfg.sampler.overlap, progress=progress)
        hu = decode_latent(vq.model, lat[0].cpu() / scale, codec.tile_latent, codec.overlap, hu_window=hu_window,
                           batch_size=codec.batch_size, device=device, progress=False)[0].numpy()
        hu = np.clip(np.rint(hu), -32768, 32767).astype(np.int16)
        if affine is None:
            affine = centred_affine(hu.shape, spacing)
        if k == 0:
            hu0 = hu
        else:
            files[f"sample_{k}"] = write_nifti(out / f"sample-{k:03d}.nii.gz", hu, affine)
        x = hu.astype(np.float64)
        if mean is None:
            mean, m2 = x.copy(), np.zeros_like(x)
        else:  # Welford: no K volumes held at once
            delta = x - mean
            mean += delta / (k + 1)
            m2 += delta * (x - mean)
    title = f"diffusion step {loaded.step} ({loaded.weights}), seed {seed}, {steps} steps, guidance {guidance}"
    attrs = {"task": TASK_NAME, "step": loaded.step, "weights": loaded.weights, "source": str(loaded.source),
             "spacing_mm": list(spacing), "affine": affine.tolist(), "units": "HU", "seed": int(seed),
             "steps": int(steps), "guidance": float(guidance), "num_samples": num_samples}
    files["nifti"] = write_nifti(out / "volume.nii.gz", hu0, affine)
    files["zarr"] = write_zarr(out / "volume.zarr", hu0, attrs)
    files["preview"] = save_triplanar_png(out / "preview.png", hu0, spacing, xrays=shown, title=title)
    if num_samples > 1:
        files["mean"] = write_nifti(out / "mean.nii.gz", np.rint(mean), affine)
        files["std"] = write_nifti(out / "std.nii.gz", np.rint(np.sqrt(m2 / num_samples)), affine)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB
    meta = {**attrs, "vqgan": ref, "latent_scale_factor": scale, "latent_shape": list(cfg.latent_shape),
            "volume_shape": list(hu0.shape), "seconds": round(time.perf_counter() - t0, 3),
            "peak_rss_mb": round(peak_mb, 1), "device": str(device)}
    meta_path = out / "sample.json"
    meta_path.write_text(json.dumps(meta, indent=1))
    files["metadata"] = meta_path
    if progress:
        print(f"[xray2ct] sampled {num_samples} volume(s) {tuple(hu0.shape)} in {meta['seconds']:.1f} s, "
              f"peak RSS {peak_mb:.0f} MB", file=sys.stderr)
    return files
