"""CNCL on the shared training engine (``xray2ct train cncl``).

One step (pix2pix's order: one forward, G step, then D step on the same fake)::

    fake = G(lowdose)                                          # B×1×P×P, project units
    with ctx.frozen("discriminator"):
        g = generator_losses(fake, clean, lowdose, D_unwrapped, cfg)
    ctx.backward(g["total"], "generator")
    d = discriminator_loss(D, lowdose, clean, fake.detach())
    ctx.backward(d, "discriminator")

Data: :class:`gan_baselines.cncl.data.LowDoseSliceDataset` (whole axial slices of the store,
simulated at ``data.dose`` on the fly, random ``data.patch²`` crops). Learning rate: ``train.lr``
(the task's ``train_defaults`` set it to ``optim.lr``), both Adams with ``optim.betas``, constant
until ``optim.decay_start × train.max_steps`` then linear to 0 (constant by default).

Validation (every ``train.val_every`` steps): the EMA generator on up to 8 evenly spaced slices
of each of the first ``num_val_cases`` ``val`` cases, simulated once with a fixed seed; PSNR in
HU (data range = the preset's HU window width) of the low-dose input and of the denoised slice
against the clean one, and a preview (low-dose | denoised | clean).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from einops import rearrange
from torch import Tensor, nn

from patching.checks import named_preset
from patching.data.spec import VolumeSpec, unit_to_hu
from patching.data.store import Store
from patching.errors import InputError

from .. import cncl
from ..common import lr_factor
from ..data import psnr
from .data import LowDoseSliceDataset, lowdose_pair, sample_rng

VAL_SEED = 1234


class CNCLTask:
    """CNCL low-dose CT denoising. Presets: ``cpu-demo`` → :func:`cncl.cpu_demo`, ``ctpa-512`` →
    :func:`cncl.paper`."""

    name = "cncl"
    ema_models = ("generator",)
    # Exported as diffusers-style folders (launch/export.py; see stage1_vqgan.task.VQGANTask.networks).
    networks = {"generator": {"": ("generator", cncl.CNCLGenerator, "model")},
                "discriminator": {"": ("discriminator", cncl.PatchDiscriminator2D, "model")}}
    num_val_cases = 2
    val_slices = 8

    def __init__(self) -> None:
        self.cfg: Any = None
        self.store: str | None = None
        self.spec: VolumeSpec | None = None
        self._val: list[tuple[Tensor, Tensor]] | None = None

    def presets(self) -> dict:
        return {"cpu-demo": cncl.cpu_demo, "ctpa-512": cncl.paper}

    def default_config(self, preset: str):
        return named_preset(self.presets(), preset, self.name)

    def train_defaults(self, preset: str) -> dict[str, Any]:
        out: dict[str, Any] = {"lr": self.default_config(preset).optim.lr, "clip_grad": 0.0}
        if preset == "cpu-demo":  # a few hundred steps: a 0.999 EMA would still be near the init
            out.update(batch_size=4, ema_decay=0.99, val_every=100)
        else:
            out.update(batch_size=4, grad_accum=1, val_every=2000)
        return out

    def build_models(self, cfg) -> dict[str, nn.Module]:
        self.cfg = cfg
        generator, discriminator = cncl.build(cfg.model)
        return {"generator": generator, "discriminator": discriminator}

    def build_optimizers(self, cfg, models) -> dict[str, torch.optim.Optimizer]:
        if cfg.optim.lr != cncl.paper().optim.lr and cfg.optim.lr != cfg.train.lr:
            raise InputError("optim.lr", f"the engine's train.lr sets the learning rate (now {cfg.train.lr:g}); "
                                         f"use --set train.lr={cfg.optim.lr:g}")
        betas = tuple(cfg.optim.betas)
        return {name: torch.optim.Adam(models[name].parameters(), lr=cfg.train.lr, betas=betas)
                for name in ("generator", "discriminator")}

    def build_schedulers(self, cfg, optimizers) -> dict[str, torch.optim.lr_scheduler.LRScheduler]:
        num_steps, decay_start = cfg.train.max_steps, cfg.optim.decay_start
        return {name: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, num_steps, decay_start))
                for name, opt in optimizers.items()}

    def build_dataset(self, cfg, store, preset, split, rank, world_size, seed) -> LowDoseSliceDataset:
        self.cfg, self.store, self.spec = cfg, str(store), preset
        d = cfg.data
        return LowDoseSliceDataset(store, split=split, patch=d.patch, dose=d.dose, scanner=d.scanner(),
                                   hu_window=preset.hu_window, seed=seed, rank=rank, world_size=world_size,
                                   batch_size=cfg.train.batch_size, num_workers=cfg.train.num_workers)

    def train_step(self, batch, models, step, ctx) -> dict[str, Tensor]:
        lowdose, clean = batch["lowdose"], batch["image"]
        fake = models["generator"](lowdose)
        with ctx.frozen("discriminator"):
            g = cncl.generator_losses(fake, clean, lowdose, ctx.unwrap("discriminator"), self.cfg)
        ctx.backward(g["total"], "generator")
        d_loss = cncl.discriminator_loss(models["discriminator"], lowdose, clean, fake.detach())
        ctx.backward(d_loss, "discriminator")
        return {"g_loss": g["total"].detach(), "g_l1": g["l1"].detach(), "g_adv": g["adv"].detach(),
                "d_loss": d_loss.detach()}

    # --- validation ------------------------------------------------------------------------------

    def _val_pairs(self) -> list[tuple[Tensor, Tensor]]:
        """``(lowdose, clean)`` batches ``S×1×X×Y`` (whole slices, cropped to a multiple of the
        U-Net's stride), simulated once with a fixed seed."""
        if self._val is None:
            store, d, window = Store(self.store), self.cfg.data, self.spec.hu_window
            m = 2 ** self.cfg.model.num_levels
            self._val = []
            for cid in store.case_ids("val")[: self.num_val_cases]:
                case = store.case(cid)
                hu = torch.from_numpy(np.asarray(case.ct[...], dtype=np.float32))
                x, y, z = hu.shape
                px, py = x - x % m, y - y % m
                if px < m or py < m:
                    continue
                pairs = [lowdose_pair(hu[:, :, k], 0.5 * (case.spacing_mm[0] + case.spacing_mm[1]), d.dose,
                                      d.scanner(), min(px, py), sample_rng(VAL_SEED, 0, k), window)
                         for k in np.linspace(0, z - 1, min(z, self.val_slices)).round().astype(int)]
                self._val.append((torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])))
        return self._val

    def validate(self, models, step, ctx) -> dict[str, Tensor]:
        pairs = self._val_pairs() if self.store is not None else []
        if not pairs:
            return {}
        window = self.spec.hu_window
        width = window[1] - window[0]
        before, after, preview = [], [], None
        with ctx.ema_weights():
            for lowdose, clean in pairs:
                out = models["generator"](lowdose.to(ctx.device)).float().cpu()
                hu = [unit_to_hu(t, window) for t in (lowdose, out, clean)]
                before.append(psnr(hu[0], hu[2], width))
                after.append(psnr(hu[1], hu[2], width))
                if preview is None:  # first slice: low-dose | denoised | clean, soft-tissue window
                    row = torch.cat([rearrange(h[0, 0], "x y -> y x").flip(0) for h in hu], dim=1)
                    preview = ((row + 160.0) / 400.0).clamp(0, 1)
        return {"psnr_hu_window": torch.stack(after).mean().float(),
                "psnr_lowdose_hu_window": torch.stack(before).mean().float(), "preview": preview}
