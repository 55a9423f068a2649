"""The latent-diffusion task on the engine (``xray2ct train diffusion``).

One trained model, ``diffusion`` (:class:`DiffusionModel` = X-ray encoder + latent UNet, one
optimizer, one EMA): the engine wants each optimizer to cover exactly one model, and DDP wants
every differentiated forward to go through ``models[name](...)``. The stage-1 VQ-GAN is not
needed while training: the latents are cached in the store (``xray2ct encode``).

A step (docs/stage2_diffusion.md): ``t``, ``ε`` and the CFG drop mask are drawn on
``ctx.generator``; ``x_t = √ᾱ x0 + √(1−ᾱ) ε``; the model predicts ε or v (``diffusion.
prediction_type``) with the crop's coordinates in the whole latent; MSE in float32.

Extra state (saved in every checkpoint and export): the latent scale factor, the exact VQ-GAN
reference of the latents (path, sha256 of its weights, codec settings) and the data spec
(shape, spacing, HU window), so that :func:`stage2_diffusion.pipeline.sample_diffusion` needs
only the stage-2 checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from patching.errors import InputError

from .config import Stage2Config
from .config import preset as stage2_preset
from .data import LatentDataset, collate
from .schedules import add_noise, train_scheduler, training_target
from .unet import LatentUNet3d
from .xray_encoder import XrayEncoder


@dataclass
class DiffusionDataConfig:
    """``data.*``: ``crop`` = latent crop ``(x, y, z)`` for training, None = whole latents."""

    crop: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        if self.crop is not None:
            self.crop = tuple(int(c) for c in self.crop)
            if len(self.crop) != 3 or any(c < 1 for c in self.crop):
                raise InputError("data.crop", f"needs three positive integers or none, got {self.crop}")


@dataclass
class DiffusionTaskConfig(Stage2Config):
    data: DiffusionDataConfig = field(default_factory=DiffusionDataConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        f = self.unet.downsample
        if self.data.crop is not None and any(c % f for c in self.data.crop):
            raise InputError("data.crop", f"sizes {self.data.crop} must be multiples of the UNet's downsampling "
                                          f"factor {f}")


def task_config(name: str) -> DiffusionTaskConfig:
    base = stage2_preset(name)
    return DiffusionTaskConfig(**{k: getattr(base, k) for k in base.__dataclass_fields__})


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

    def __init__(self) -> None:
        self.cfg: Any = None
        self.scheduler = None
        self.scale_factor: float | None = None
        self.vqgan: dict | None = None
        self.spec = None
        self.latent_shapes: list | None = None

    def default_config(self, preset: str) -> DiffusionTaskConfig:
        return task_config(preset)

    def train_defaults(self, preset: str) -> dict[str, Any]:
        if preset == "cpu-demo":
            return {"lr": 2e-4, "batch_size": 2, "num_workers": 1, "ema_decay": 0.99, "clip_grad": 1.0}
        # LDM / MAISI diffusion UNets: AdamW ~1e-4, EMA 0.9999 (ours 0.999 for shorter runs).
        return {"lr": 1e-4, "batch_size": 1, "ema_decay": 0.999, "clip_grad": 1.0}

    def build_models(self, cfg) -> dict[str, nn.Module]:
        self.cfg = cfg
        self.scheduler = train_scheduler(cfg.diffusion)
        model = DiffusionModel(cfg)
        model.unet.set_gradient_checkpointing(cfg.unet.gradient_checkpointing)
        return {"diffusion": model}

    def build_optimizers(self, cfg, models) -> dict[str, torch.optim.Optimizer]:
        return {"diffusion": torch.optim.AdamW(models["diffusion"].parameters(), lr=cfg.train.lr,
                                               betas=(0.9, 0.999), weight_decay=0.0)}

    def build_dataset(self, cfg, store, preset, split, rank, world_size, seed) -> LatentDataset:
        self.cfg, self.spec = cfg, preset
        ds = LatentDataset(store, split=split, image_size=cfg.encoder.image_size, views=cfg.encoder.views,
                           crop=cfg.data.crop, seed=seed, rank=rank, world_size=world_size,
                           batch_size=cfg.train.batch_size, num_workers=cfg.train.num_workers)
        dim = ds.vqgan.get("latent_dim")
        if dim is not None and int(dim) != cfg.unet.latent_channels:
            raise InputError("unet.latent_channels", f"is {cfg.unet.latent_channels}, the store's latents have "
                                                     f"{dim} channels (VQ-GAN latent_dim)")
        if cfg.data.crop is None:
            bad = [(cid, s[1:]) for cid, s in zip(ds.case_ids, ds.shapes, strict=True) if tuple(s[1:]) != tuple(cfg.latent_shape)]
            if bad:
                raise InputError("latent_shape", f"is {tuple(cfg.latent_shape)}, but case {bad[0][0]!r} has a latent of "
                                                 f"{bad[0][1]}; set latent_shape (or a data.crop)")
        self.scale_factor, self.vqgan = ds.scale_factor, ds.vqgan
        return ds

    def collate_fn(self, samples: list[dict]) -> dict[str, Tensor]:
        return collate(samples)

    def train_step(self, batch, models, step, ctx) -> dict[str, Tensor]:
        cfg, sched = self.cfg, self.scheduler
        x0 = batch["latent"].float()  # (B, C, x, y, z), scaled
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
        spec = self.spec
        state = {"latent_scale_factor": float(self.scale_factor),
                 "vqgan": json.loads(json.dumps(self.vqgan))}
        if spec is not None:
            state["volume"] = {"shape": [int(s) for s in spec.shape], "spacing_mm": [float(s) for s in spec.spacing_mm],
                               "hu_window": [float(v) for v in spec.hu_window]}
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
