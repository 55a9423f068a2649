"""The latent-diffusion task on the engine (``xray2ct train diffusion``).

One trained model, ``diffusion`` (:class:`DiffusionModel` = X-ray encoder + latent UNet, one
optimizer, one EMA): the engine wants each optimizer to cover exactly one model, and DDP wants
every differentiated forward to go through ``models[name](...)``. The stage-1 VQ-GAN is not
needed while training: the latents are cached in the store (``xray2ct encode``).

A step (docs/stage2_diffusion.md): ``t``, ``ε`` and the CFG drop mask are drawn on
``ctx.generator``; ``x_t = √ᾱ x0 + √(1−ᾱ) ε``; the model predicts ε or v (``diffusion.
prediction_type``) with the crop's coordinates in the whole latent; MSE in float32.

What the data says is read from it, not from the preset: the whole-latent shape
(``latent_shape``, None in the task's presets) is the one the training split's latents share
(:func:`store_latent_shape`; ``--set latent_shape=X,Y,Z`` fixes it, a ``data.crop`` allows mixed
shapes) and is written into the run config; the output volume's shape, spacing and HU window
are those of the store's cases and the VQ-GAN.

Extra state (saved in every checkpoint and export): the latent scale factor, the exact VQ-GAN
reference of the latents (path, sha256 of its weights, codec settings) and the volume geometry
(shape, spacing, HU window), so that :func:`stage2_diffusion.pipeline.sample_diffusion` needs
only the stage-2 checkpoint.

Validation (every ``train.val_every`` steps, EMA weights, the same items on every rank, no
collective): up to ``data.num_val_cases`` encoded cases of ``data.val_split``; ``val_loss`` =
the conditional training loss (no CFG drop) of each case's latent (whole, or the centred
``data.crop`` with its coordinates) at ``VAL_TIMESTEPS`` evenly spaced ``t``; ``val_latent_psnr``
= PSNR of a short sample (the config's sampler, ``min(sampler.steps, data.val_sample_steps)``
steps, the config's guidance and window) against the true latent, data range = the true
latent's peak-to-peak; ``preview`` = central slices of latent channel 0, true above sampled.
Noise comes from a CPU generator seeded ``VAL_SEED`` at every call: validation is deterministic
and never touches ``ctx.generator`` or the global RNG, so training is the same with or without it.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from patching.data.store import SPLITS, Store
from patching.errors import InputError

from .config import Stage2Config
from .config import preset as stage2_preset
from .data import LatentDataset, collate, encoded_cases, latent_source
from .sampler import sample_latents
from .schedules import add_noise, sample_scheduler, train_scheduler, training_target
from .unet import LatentUNet3d
from .xray_encoder import XrayEncoder

VAL_TIMESTEPS = 8  # validation loss at t = (2k + 1)·T / 16, k = 0..7
VAL_SEED = 1234  # the validation noise generator's seed (CPU, fresh at every call)


@dataclass
class DiffusionDataConfig:
    """``data.*``.

    Args:
        crop: latent crop ``(x, y, z)`` for training (random) and the validation loss (centred);
            None = whole latents.
        val_split: split that validation reads (skipped with a note when none of its cases is
            encoded).
        num_val_cases: validation cases, spread evenly over the split's encoded cases.
        val_sample_steps: at most this many sampler steps for the validation samples (the
            config's sampler, ``min(sampler.steps, val_sample_steps)``).
    """

    crop: tuple[int, int, int] | None = None
    val_split: str = "val"
    num_val_cases: int = 4
    val_sample_steps: int = 10

    def __post_init__(self) -> None:
        if self.crop is not None:
            self.crop = tuple(int(c) for c in self.crop)
            if len(self.crop) != 3 or any(c < 1 for c in self.crop):
                raise InputError("data.crop", f"needs three positive integers or none, got {self.crop}")
        if self.val_split not in SPLITS:
            raise InputError("data.val_split", f"must be one of {SPLITS}, got {self.val_split!r}")
        for key in ("num_val_cases", "val_sample_steps"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"data.{key}", f"must be a positive integer, got {v!r}")


@dataclass
class DiffusionTaskConfig(Stage2Config):
    data: DiffusionDataConfig = field(default_factory=DiffusionDataConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        f = self.unet.downsample
        if self.data.crop is not None and any(c % f for c in self.data.crop):
            raise InputError("data.crop", f"sizes {self.data.crop} must be multiples of the UNet's downsampling "
                                          f"factor {f}")


# The engine's `train.*` defaults per preset (the names of stage2_diffusion.config.PRESETS).
TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    # A run of ~1600 steps (the demo's budget): warm-up, then cosine decay to 10 % so the last
    # few hundred steps average instead of jitter; the EMA warms up so it does not drag the
    # random initialisation along (docs/results.md, "what was tried").
    "cpu-demo": {"lr": 3e-4, "batch_size": 2, "num_workers": 1, "ema_decay": 0.99, "clip_grad": 1.0,
                 "warmup_steps": 50, "lr_decay": "cosine", "ema_warmup": True},
    # LDM / MAISI diffusion UNets: AdamW ~1e-4, EMA 0.9999 (ours 0.999 for shorter runs).
    "ctpa-512": {"lr": 1e-4, "batch_size": 1, "ema_decay": 0.999, "clip_grad": 1.0},
}


def task_config(name: str) -> DiffusionTaskConfig:
    """The preset's sections with ``latent_shape=None``: training reads it from the store
    (``--set latent_shape=X,Y,Z`` fixes it instead)."""
    base = stage2_preset(name)
    return DiffusionTaskConfig(**{k: getattr(base, k) for k in base.__dataclass_fields__ if k != "latent_shape"},
                               latent_shape=None)


def latent_centre(store: Store, split: str | None) -> tuple[Tensor, float]:
    """``(mean, s)``: the voxel-wise mean of the split's scaled latents ``(C, x, y, z)`` and the
    std of what is left, ``sqrt(mean over voxels and cases of (z - mean)^2)``. One pass over the
    cases in float64; all latents must share one shape (the error names the odd case)."""
    scale, ref = latent_source(store)
    ids, shapes = encoded_cases(store, split, ref)
    if not ids:
        raise InputError(store.path, f"no encoded case in split {split!r} to centre the latents on")
    store_latent_shape(ids, shapes, mixed_ok=False, where=str(store.path))
    total = sq = None
    for cid in ids:
        z = np.asarray(store.case(cid).latent[...], dtype=np.float64) * scale
        total = z if total is None else total + z
        sq = z * z if sq is None else sq + z * z
    n = len(ids)
    mean = total / n
    resid = float(np.sqrt(max(float((sq / n - mean * mean).mean()), 0.0)))
    if not np.isfinite(resid) or resid <= 1e-8:
        raise InputError(store.path, f"the {n} training latent(s) do not vary (residual std {resid:.3g}); "
                                     "centred latents need more than one distinct case")
    return torch.from_numpy(mean.astype(np.float32)), resid


def store_latent_shape(case_ids: list[str], shapes: list[tuple[int, ...]], *, mixed_ok: bool,
                       where: str) -> tuple[int, int, int]:
    """The whole-latent ``(x, y, z)`` the training cases share.

    All cases must agree unless ``mixed_ok`` (training on crops): then the most common shape
    (ties: the first case's) is the one sampling will produce. Otherwise the error names the
    first case whose latent differs from the others.
    """
    spatial = [tuple(int(v) for v in s[1:]) for s in shapes]
    counts: dict[tuple[int, int, int], int] = {}
    for s in spatial:
        counts[s] = counts.get(s, 0) + 1
    common = max(counts, key=lambda s: (counts[s], -spatial.index(s)))
    if len(counts) > 1 and not mixed_ok:
        odd = next(i for i, s in enumerate(spatial) if s != common)
        raise InputError(where, f"case {case_ids[odd]!r} has a latent of {spatial[odd]}, the other "
                                f"{counts[common]} training case(s) {common}: whole-latent training needs one "
                                "shape (re-ingest that case, or set data.crop and latent_shape)")
    return common


class DiffusionModel(nn.Module):
    """X-ray encoder + latent UNet, trained together: ``forward(x_t, t, xrays, views_present,
    drop_mask, coords) -> prediction``."""

    def __init__(self, cfg: Stage2Config):
        super().__init__()
        self.encoder = XrayEncoder(cfg.encoder)
        self.unet = LatentUNet3d(cfg.unet)

    def forward(self, x_t: Tensor, t: Tensor, xrays: Tensor, views_present: Tensor | None = None,
                drop_mask: Tensor | None = None, coords=None) -> Tensor:
        return self.unet(x_t, t, self.encoder(xrays, views_present, drop_mask), coords=coords)


class DiffusionTask:
    """X-ray-conditioned 3D latent diffusion (``stage2_diffusion``), presets ``cpu-demo`` and ``ctpa-512``."""

    name = "diffusion"
    ema_models = ("diffusion",)
    # Exported as diffusers-style folders (launch/export.py): model name → {key prefix in its state
    # dict: (folder, the Pretrained class, the config section that builds it)}.
    networks = {"diffusion": {"encoder": ("xray_encoder", XrayEncoder, "encoder"), "unet": ("unet", LatentUNet3d, "unet")}}

    def __init__(self) -> None:
        self.cfg: Any = None
        self.scheduler = None
        self.scale_factor: float | None = None
        self.vqgan: dict | None = None
        self.spec = None
        self.volume: dict | None = None  # geometry of the sampled volumes (extra state)
        self.store = None
        self.rank = 0
        self._val: tuple[LatentDataset | None, list[int]] | None = None
        self.centre: tuple[Tensor, float] | None = None

    def default_config(self, preset: str) -> DiffusionTaskConfig:
        return task_config(preset)

    def train_defaults(self, preset: str) -> dict[str, Any]:
        return dict(TRAIN_DEFAULTS[preset])

    def prepare(self, cfg, store, preset) -> None:
        """With ``diffusion.center_latents``: the training split's mean scaled latent and residual
        std (:func:`latent_centre`), kept for :meth:`build_models`; ``unet.mean_latent_shape`` is
        set to their shape (recorded in the run config, so the UNet loads with its buffers)."""
        self.centre = None
        if not cfg.diffusion.center_latents:
            cfg.unet.mean_latent_shape = None
            return
        if store is None:
            raise InputError("diffusion.center_latents", "needs a store to read the training latents from")
        self.centre = latent_centre(store if isinstance(store, Store) else Store(store), cfg.train.split)
        shape = tuple(self.centre[0].shape[1:])
        if cfg.latent_shape is not None and tuple(cfg.latent_shape) != shape:
            raise InputError("latent_shape", f"is {tuple(cfg.latent_shape)}, the training latents are {shape}; "
                                             "centred latents (diffusion.center_latents) need the store's shape")
        cfg.unet.mean_latent_shape = shape

    def build_models(self, cfg) -> dict[str, nn.Module]:
        self.cfg = cfg
        self.scheduler = train_scheduler(cfg.diffusion)
        model = DiffusionModel(cfg)
        model.unet.set_gradient_checkpointing(cfg.unet.gradient_checkpointing)
        if self.centre is not None:
            model.unet.set_centre(*self.centre)
        return {"diffusion": model}

    def build_optimizers(self, cfg, models) -> dict[str, torch.optim.Optimizer]:
        return {"diffusion": torch.optim.AdamW(models["diffusion"].parameters(), lr=cfg.train.lr,
                                               betas=(0.9, 0.999), weight_decay=0.0)}

    def build_dataset(self, cfg, store, preset, split, rank, world_size, seed) -> LatentDataset:
        self.cfg, self.spec, self.store, self.rank = cfg, preset, store, rank
        self._val = None
        ds = LatentDataset(store, split=split, image_size=cfg.encoder.image_size, views=cfg.encoder.views,
                           crop=cfg.data.crop, seed=seed, rank=rank, world_size=world_size,
                           batch_size=cfg.train.batch_size, num_workers=cfg.train.num_workers)
        dim = ds.vqgan.get("latent_dim")
        if dim is not None and int(dim) != cfg.unet.latent_channels:
            raise InputError("unet.latent_channels", f"is {cfg.unet.latent_channels}, the store's latents have "
                                                     f"{dim} channels (VQ-GAN latent_dim)")
        if cfg.latent_shape is None:  # derived from the data; recorded in the run config it saves
            cfg.latent_shape = store_latent_shape(ds.case_ids, ds.shapes, mixed_ok=cfg.data.crop is not None,
                                                  where=ds.store_path)
        elif cfg.data.crop is None:
            bad = [(cid, s[1:]) for cid, s in zip(ds.case_ids, ds.shapes, strict=True) if tuple(s[1:]) != tuple(cfg.latent_shape)]
            if bad:
                raise InputError("latent_shape", f"is {tuple(cfg.latent_shape)}, but case {bad[0][0]!r} has a latent of "
                                                 f"{bad[0][1]}; leave latent_shape unset (read from the store) or set a data.crop")
        self.scale_factor, self.vqgan = ds.scale_factor, ds.vqgan
        self.volume = self._volume_geometry(store, ds, preset)
        return ds

    def _volume_geometry(self, store, ds: LatentDataset, spec) -> dict:
        """Shape, spacing and HU window of the volumes sampling will write: the store's cases whose
        latent has ``latent_shape`` (their most common spacing), the VQ-GAN's HU window."""
        opened = store if isinstance(store, Store) else Store(store)
        f = int(ds.vqgan.get("downsample") or 1)
        shape = [int(n) * f for n in self.cfg.latent_shape]
        grid = opened.common_grid([cid for cid, s in zip(ds.case_ids, ds.shapes, strict=True)
                                   if tuple(s[1:]) == tuple(self.cfg.latent_shape)])
        if grid is not None:
            spacing = list(grid[1])
        else:  # a latent_shape no case has (set by the user): the preset's spacing
            spacing = [float(v) for v in spec.spacing_mm] if spec is not None else [1.0, 1.0, 1.0]
        window = ds.vqgan.get("hu_window") or (spec.hu_window if spec is not None else (-1024.0, 1600.0))
        return {"shape": shape, "spacing_mm": spacing, "hu_window": [float(v) for v in window]}

    def collate_fn(self, samples: list[dict]) -> dict[str, Tensor]:
        return collate(samples)

    def train_step(self, batch, models, step, ctx) -> dict[str, Tensor]:
        cfg, sched = self.cfg, self.scheduler
        x0 = ctx.unwrap("diffusion").unet.to_centred(batch["latent"].float(), batch["start"])  # (B, C, x, y, z)
        b, dev = x0.shape[0], x0.device
        g = ctx.generator
        t = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=g, device=g.device).to(dev)
        noise = torch.randn(x0.shape, generator=g, device=g.device, dtype=torch.float32).to(dev)
        drop = (torch.rand(b, generator=g, device=g.device) < cfg.diffusion.cfg_dropout).to(dev)
        x_t = add_noise(sched, x0, noise, t)
        pred = models["diffusion"](x_t, t, batch["xray"], batch["views_present"], drop,
                                   coords=(batch["start"], batch["latent_shape"]))
        loss = F.mse_loss(pred.float(), training_target(sched, x0, noise, t).float())
        ctx.backward(loss, "diffusion")
        return {"loss": loss.detach(), "cfg_drop_frac": drop.float().mean()}

    def extra_state(self) -> dict:
        """Scale factor, VQ-GAN reference and data spec: everything sampling needs besides the weights."""
        if self.scale_factor is None:
            return {}
        state = {"latent_scale_factor": float(self.scale_factor),
                 "vqgan": json.loads(json.dumps(self.vqgan))}
        if self.volume is not None:
            state["volume"] = json.loads(json.dumps(self.volume))
        return state

    def load_extra_state(self, state: dict) -> None:
        """A resumed run must train on the same latent space it started on."""
        saved = state.get("vqgan")
        if saved is None or self.vqgan is None:
            return
        if saved.get("weights_sha256") != self.vqgan.get("weights_sha256"):
            raise InputError("--store", f"the checkpoint was trained on latents of VQ-GAN {saved.get('weights_sha256')}, "
                                        f"the store now holds latents of {self.vqgan.get('weights_sha256')}")
        scale = state.get("latent_scale_factor")
        if scale is not None and float(scale) != float(self.scale_factor):
            raise InputError("--store", f"the checkpoint's latent scale factor {scale} differs from the store's "
                                        f"{self.scale_factor}")

    # --- validation ------------------------------------------------------------------------------

    def _val_cases(self) -> tuple[LatentDataset, list[int]] | None:
        """The validation dataset (whole latents, no shuffle) and the picked case indices."""
        if self._val is None:
            d = self.cfg.data
            store = self.store if isinstance(self.store, Store) else Store(self.store)
            ids, _ = encoded_cases(store, d.val_split, self.vqgan)
            if not ids:
                if self.rank == 0:
                    print(f"[xray2ct] diffusion: no encoded {d.val_split!r} cases in {store.path}; validation skipped",
                          file=sys.stderr, flush=True)
                self._val = (None, [])
            else:
                ds = LatentDataset(store, split=d.val_split, image_size=self.cfg.encoder.image_size,
                                   views=self.cfg.encoder.views, crop=None, shuffle=False)
                n = min(d.num_val_cases, len(ds.case_ids))
                self._val = (ds, [int(i) for i in np.unique(np.linspace(0, len(ds.case_ids) - 1, n).round())])
        return self._val if self._val[1] else None

    def validate(self, models, step, ctx) -> dict[str, Tensor]:
        """Validation loss, latent PSNR of short samples and a latent preview (module docstring)."""
        val = self._val_cases() if self.store is not None and self.cfg is not None else None
        if val is None:
            return {}
        ds, picks = val
        cfg, sched, dev = self.cfg, self.scheduler, ctx.device
        model = models["diffusion"]
        num_t = sched.config.num_train_timesteps
        timesteps = torch.tensor([(2 * k + 1) * num_t // (2 * VAL_TIMESTEPS) for k in range(VAL_TIMESTEPS)])
        chunk = max(1, int(getattr(getattr(cfg, "train", None), "batch_size", 1)))
        sampler = sample_scheduler(cfg.diffusion, cfg.sampler.name)
        steps = min(cfg.sampler.steps, cfg.data.val_sample_steps)
        g = torch.Generator().manual_seed(VAL_SEED)  # never ctx.generator: training's stream stays as it was
        se, count, psnrs, preview = torch.zeros((), dtype=torch.float64), 0, [], None
        with ctx.ema_weights():
            for i in picks:
                item = ds.sample(i, 0)
                latent = item["latent"]  # (C, X, Y, Z), scaled, CPU
                full = tuple(latent.shape[1:])
                crop = full if cfg.data.crop is None else tuple(min(c, n) for c, n in zip(cfg.data.crop, full))
                start = tuple((n - c) // 2 for n, c in zip(full, crop))
                x0 = latent[(slice(None), *(slice(a, a + c) for a, c in zip(start, crop)))].to(dev)
                x0 = model.unet.to_centred(x0[None], torch.tensor(start))[0]
                xray, present = item["xray"][None].to(dev), item["views_present"][None].to(dev)
                noise = torch.randn((VAL_TIMESTEPS, *x0.shape), generator=g, dtype=torch.float32)
                for a in range(0, VAL_TIMESTEPS, chunk):
                    t = timesteps[a:a + chunk].to(dev)
                    b = t.shape[0]
                    x0b, nb = x0.expand(b, *x0.shape).contiguous(), noise[a:a + chunk].to(dev)
                    with ctx.autocast():
                        pred = model(add_noise(sched, x0b, nb, t), t, xray.expand(b, *xray.shape[1:]).contiguous(),
                                     present.expand(b, -1), None, coords=(start, full))
                    target = training_target(sched, x0b, nb, t).float()
                    se = se + F.mse_loss(pred.float(), target, reduction="sum").double().cpu()
                    count += target.numel()
                with ctx.autocast():
                    sample = sample_latents(model.unet, model.encoder, xray, present, shape=tuple(latent.shape),
                                            scheduler=sampler, steps=steps, guidance=cfg.diffusion.guidance_scale,
                                            generator=g, window=cfg.sampler.window, overlap=cfg.sampler.overlap,
                                            progress=False)
                sample = model.unet.from_centred(sample.float())[0].cpu()
                peak = float(latent.max() - latent.min())
                mse = float(((sample - latent).double() ** 2).mean())
                psnrs.append(10 * math.log10(max(peak, 1e-12) ** 2 / max(mse, 1e-20)))
                if preview is None:
                    preview = latent_preview(latent, sample)
        return {"val_loss": (se / max(count, 1)).float(),
                "val_latent_psnr": torch.tensor(sum(psnrs) / len(psnrs), dtype=torch.float32),
                "preview": preview}


def latent_preview(true: Tensor, sampled: Tensor, min_height: int = 64) -> Tensor:
    """Central x, y and z slices of channel 0, the true latent's row above the sample's, as an
    H×W image in [0, 1] (both scaled by the true channel's min..max; 1-pixel white separators;
    nearest-neighbour enlarged to at least ``min_height`` pixels)."""
    lo, hi = float(true[0].min()), float(true[0].max())

    def row(v: Tensor) -> Tensor:
        c = ((v[0].float() - lo) / max(hi - lo, 1e-12)).clamp(0, 1)
        x, y, z = c.shape
        planes = [c[x // 2], c[:, y // 2], c[:, :, z // 2]]  # (Y, Z), (X, Z), (X, Y)
        h = max(p.shape[0] for p in planes)
        parts = []
        for p in planes:
            parts += [F.pad(p, (0, 0, 0, h - p.shape[0])), torch.ones(h, 1)]
        return torch.cat(parts[:-1], dim=1)

    top, bottom = row(true.cpu()), row(sampled.cpu())
    img = torch.cat([top, torch.ones(1, top.shape[1]), bottom], dim=0)
    k = max(1, math.ceil(min_height / img.shape[0]))
    return img.repeat_interleave(k, 0).repeat_interleave(k, 1)
