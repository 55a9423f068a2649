"""S-XR2CT on the shared training engine (``xray2ct train s-xr2ct``).

X2CT-GAN's step, data, schedule and validation (:class:`gan_baselines.x2ct_gan.task.X2CTGANTask`:
one forward, G step, then D step; Adam 2e-4, β (0.5, 0.99), linear decay over the second half —
the paper names no optimiser, so X2CT-GAN's, whose losses it follows), with S-XR2CT's networks
and its perceptual term:

- ``prepare`` (called by the engine before the models are built) averages the train split's CTs
  at the model's cube (:func:`gan_baselines.data.mean_volume`, mapped to the model's [0, 1]);
  ``build_models`` puts it into the generator's template parameter, so every rank starts from the
  same template and the checkpoints (and the EMA) carry it. A resumed run recomputes the mean
  and then loads the saved template over it.
- The 2.5D perceptual loss is a frozen module of the task, not an engine model (never saved or
  exported, like the VQ-GAN's); its slices are drawn from ``ctx.generator`` (per rank, saved in
  checkpoints), so a resumed run draws the same slices.
"""

from __future__ import annotations

import types
from typing import Any

from torch import Tensor, nn

from .. import s_xr2ct
from ..common import to_model_range
from ..data import mean_volume
from ..x2ct_gan.task import TRAIN_DEFAULTS, X2CTGANTask


class SXR2CTTask(X2CTGANTask):
    """S-XR2CT (Hor, Yang, Kim 2025), PA only. Presets: ``cpu-demo`` → :func:`s_xr2ct.cpu_demo`
    (64² → 32³), ``s-xr2ct-128`` → :func:`s_xr2ct.paper` (128² → 128³)."""

    name = "s-xr2ct"
    module: types.ModuleType = s_xr2ct
    networks = {"generator": {"": ("generator", s_xr2ct.SXR2CTGenerator, "model")}}  # exported as a folder
    train_presets = {"cpu-demo": TRAIN_DEFAULTS["cpu-demo"], "s-xr2ct-128": TRAIN_DEFAULTS["ctpa-512"]}

    def __init__(self) -> None:
        super().__init__()
        self.template: Tensor | None = None
        self.perceptual: nn.Module | None = None

    def presets(self) -> dict:
        return {"cpu-demo": self.module.cpu_demo, "s-xr2ct-128": self.module.paper}

    def prepare(self, cfg, store, preset) -> None:
        """The template CT: the mean of the train split's CTs at the model's cube, model range."""
        m = cfg.model
        mean = mean_volume(store, cfg.train.split, m.volume_size, preset.hu_window)
        self.template = to_model_range(mean, m.value_range)

    def build_models(self, cfg) -> dict[str, nn.Module]:
        self.perceptual = self.module.build_perceptual(cfg.loss)  # fails fast on a missing feature file
        models = super().build_models(cfg)
        if self.template is not None:
            models["generator"].set_template(self.template)
        return models

    def generator_losses(self, fake: Tensor, target: Tensor, xrays: dict[str, Tensor], ctx) -> dict[str, Any]:
        if self.perceptual is not None:
            self.perceptual.to(fake.device)
        return self.module.generator_losses(fake, target, xrays, ctx.unwrap("discriminator"), self.cfg,
                                            perceptual=self.perceptual, generator=ctx.generator)
