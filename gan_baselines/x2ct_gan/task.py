"""X2CT-GAN on the shared training engine (``xray2ct train x2ct-gan``).

The task protocol is in docs/training.md; this module never imports ``launch``. One step, in
the released code's order (``optimize_parameters``: one forward, G step, then D step)::

    fake = G(pa, lateral)                                   # B×1×N³ in [0, 1]
    with ctx.frozen("discriminator"):                       # no weight gradients, no DDP sync
        g = generator_losses(fake, target, xrays, D_unwrapped, cfg)
    ctx.backward(g["total"], "generator")                   # G steps here
    d = discriminator_loss(D, target, fake.detach(), cond)  # on the pre-step fake, as in the code
    ctx.backward(d, "discriminator")                        # D steps here

Distributed care: the adversarial term runs the *unwrapped* D (a DDP-wrapped D would arm a
gradient sync that never completes); D's own update goes through ``models["discriminator"]``
so DDP averages its gradients. No BatchNorm anywhere (InstanceNorm).

Learning rate: ``train.lr`` is the one that counts (the task's ``train_defaults`` set it to the
paper's ``optim.lr``); both Adams use ``optim.betas``, and a ``LambdaLR`` keeps the rate constant
for the first ``optim.decay_start × train.max_steps`` steps, then decays it linearly to 0
(:func:`gan_baselines.common.lr_factor`, the papers' ``niter`` / ``niter_decay``).

Validation (every ``train.val_every`` steps): the EMA generator on the first
``num_val_cases`` cases of the ``val`` split; PSNR in HU at the model's cube, data range = the
preset's HU window width (2624 HU for [-1024, 1600]) as ``psnr_hu_window``, and a tri-planar
preview (prediction over ground truth, with the input X-rays).
"""

from __future__ import annotations

import types
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from patching.checks import named_preset
from patching.data.preview import triplanar_image
from patching.data.spec import VolumeSpec, unit_to_hu
from patching.data.store import Store
from patching.errors import InputError

from .. import x2ct_gan
from ..common import from_model_range, lr_factor, to_model_range
from ..data import VolumeDataset, load_sample, psnr

# The engine's `train.*` defaults per preset beyond the paper's rate and batch (X2CTGANTask.presets' names).
TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    # a few hundred steps: a 0.999 EMA would still be near the init; warmed up as every cpu-demo model
    "cpu-demo": {"ema_decay": 0.99, "val_every": 100, "ema_warmup": True},
    "ctpa-512": {"grad_accum": 1, "val_every": 2000},  # the papers train with batch 1 and no accumulation
}


class X2CTGANTask:
    """X2CT-GAN (Ying et al., CVPR 2019): biplanar by default; ``--set model.views=pa`` for the
    single-view model. Presets: ``cpu-demo`` → :func:`x2ct_gan.cpu_demo`, ``ctpa-512`` →
    :func:`x2ct_gan.paper`."""

    name = "x2ct-gan"
    ema_models = ("generator",)
    train_presets: dict[str, dict[str, Any]] = TRAIN_DEFAULTS  # keyed like presets()
    # Exported as diffusers-style folders (launch/export.py): model name → {key prefix in its state
    # dict: (folder, the Pretrained class, the config section that builds it)}.
    networks = {"generator": {"": ("generator", x2ct_gan.X2CTGenerator, "model")}}
    module: types.ModuleType = x2ct_gan  # config presets, build, losses, condition
    num_val_cases = 4

    def __init__(self) -> None:
        self.cfg: Any = None
        self.store: str | None = None
        self.spec: VolumeSpec | None = None
        self._val: list[dict] | None = None

    # --- configuration ---------------------------------------------------------------------------

    def presets(self) -> dict:
        return {"cpu-demo": self.module.cpu_demo, "ctpa-512": self.module.paper}

    def default_config(self, preset: str):
        return named_preset(self.presets(), preset, self.name)

    def train_defaults(self, preset: str) -> dict[str, Any]:
        """The paper's optimiser rate and batch, no clipping; a short EMA for CPU demos."""
        return {"lr": self.default_config(preset).optim.lr, "batch_size": 1, "clip_grad": 0.0,
                **self.train_presets[preset]}

    # --- models, optimisers, schedules -----------------------------------------------------------

    def build_models(self, cfg) -> dict[str, nn.Module]:
        self.cfg = cfg
        generator, discriminator = self.module.build(cfg.model)
        return {"generator": generator, "discriminator": discriminator}

    def build_optimizers(self, cfg, models) -> dict[str, torch.optim.Optimizer]:
        paper_lr = next(iter(self.presets().values()))().optim.lr
        if cfg.optim.lr != paper_lr and cfg.optim.lr != cfg.train.lr:
            raise InputError("optim.lr", f"the engine's train.lr sets the learning rate (now {cfg.train.lr:g}); "
                                         f"use --set train.lr={cfg.optim.lr:g}")
        betas = tuple(cfg.optim.betas)
        return {"generator": torch.optim.Adam(models["generator"].parameters(), lr=cfg.train.lr, betas=betas),
                "discriminator": torch.optim.Adam(models["discriminator"].parameters(), lr=cfg.train.lr, betas=betas)}

    def build_schedulers(self, cfg, optimizers) -> dict[str, torch.optim.lr_scheduler.LRScheduler]:
        num_steps, decay_start = cfg.train.max_steps, cfg.optim.decay_start
        return {name: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, num_steps, decay_start))
                for name, opt in optimizers.items()}

    # --- data ----------------------------------------------------------------------------------

    def build_dataset(self, cfg, store, preset, split, rank, world_size, seed) -> VolumeDataset:
        self.cfg, self.store, self.spec = cfg, str(store), preset
        opened = store if isinstance(store, Store) else Store(store)
        grid = opened.common_grid(opened.case_ids(split))
        # The grid sampling writes (extra state): the training cases', not a preset's.
        self.volume = None if grid is None else {"shape": list(grid[0]), "spacing_mm": list(grid[1]),
                                                 "hu_window": [float(v) for v in preset.hu_window]}
        m = cfg.model
        return VolumeDataset(store, split=split, volume_size=m.volume_size, xray_size=m.xray_size, views=m.views,
                             hu_window=preset.hu_window, seed=seed, rank=rank, world_size=world_size,
                             batch_size=cfg.train.batch_size, num_workers=cfg.train.num_workers)

    def extra_state(self) -> dict:
        """The training cases' grid (shape, spacing, HU window): what ``xray2ct sample`` writes."""
        return {"volume": dict(self.volume)} if getattr(self, "volume", None) else {}

    def load_extra_state(self, state: dict) -> None:
        """Nothing to restore: the grid is read from the store at every start."""

    # --- one step --------------------------------------------------------------------------------

    def generator_losses(self, fake: Tensor, target: Tensor, xrays: dict[str, Tensor], ctx) -> dict[str, Tensor]:
        """The paper's generator objective; D is the unwrapped module (see the module docstring)."""
        return self.module.generator_losses(fake, target, xrays, ctx.unwrap("discriminator"), self.cfg)

    def train_step(self, batch, models, step, ctx) -> dict[str, Tensor]:
        cfg = self.cfg
        value_range = cfg.model.value_range
        xrays = {v: batch[v] for v in cfg.model.views}
        target = to_model_range(batch["ct"], value_range)  # project [-1, 1] → the paper's [0, 1]
        fake = models["generator"](**xrays)
        with ctx.frozen("discriminator"):
            g = self.generator_losses(fake, target, xrays, ctx)
        ctx.backward(g["total"], "generator")
        cond = self.module.condition(xrays, cfg.model)
        d_loss = self.module.discriminator_loss(models["discriminator"], target, fake.detach(), cond)
        ctx.backward(d_loss, "discriminator")
        terms = {f"g_{k}": v.detach() for k, v in g.items() if k != "total"}  # g_recon, g_proj, g_adv, ...
        return {"g_loss": g["total"].detach(), **terms, "d_loss": d_loss.detach()}

    # --- validation ------------------------------------------------------------------------------

    def _val_samples(self) -> list[dict]:
        if self._val is None:
            store = Store(self.store)
            m = self.cfg.model
            ids = store.case_ids("val")[: self.num_val_cases]
            self._val = [load_sample(store.case(c), volume_size=m.volume_size, xray_size=m.xray_size, views=m.views,
                                     hu_window=self.spec.hu_window) for c in ids]
        return self._val

    def validate(self, models, step, ctx) -> dict[str, Tensor]:
        """PSNR (HU, data range = the HU window width) of the EMA generator on a few val cases,
        and a tri-planar preview of the first one. Nothing when the store has no val split."""
        samples = self._val_samples() if self.store is not None else []
        if not samples:
            return {}
        m, window = self.cfg.model, self.spec.hu_window
        values, preview = [], None
        with ctx.ema_weights():
            for i, s in enumerate(samples):
                fake = models["generator"](**{v: s[v][None].to(ctx.device) for v in m.views})
                pred_hu = unit_to_hu(from_model_range(fake.float(), m.value_range), window)[0, 0].cpu()
                true_hu = unit_to_hu(s["ct"][0], window)
                values.append(psnr(pred_hu, true_hu, window[1] - window[0]))
                if i == 0:
                    preview = self._preview(pred_hu.numpy(), true_hu.numpy(), s)
        return {"psnr_hu_window": torch.stack(values).mean().float(), "preview": preview}

    def _preview(self, pred_hu: np.ndarray, true_hu: np.ndarray, sample: dict) -> Tensor:
        """Prediction above ground truth, as an H×W image in [0, 1]."""
        n = pred_hu.shape[0]
        spacing = tuple(e / n for e in self.spec.extent_mm)  # the cube's (anisotropic) voxels
        xrays = {v: sample[v][0].numpy() for v in self.cfg.model.views}
        rows = [np.asarray(triplanar_image(vol, spacing, xrays=xrays, height=128, title=title), dtype=np.float32)
                for vol, title in ((pred_hu, f"{self.name} (EMA)  {sample['case_id']}"), (true_hu, "ground truth"))]
        return torch.from_numpy(np.concatenate(rows, axis=0) / 255.0)
