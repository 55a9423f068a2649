"""X-Recon on the shared training engine (``xray2ct train x-recon``).

The same step, data, schedule and validation as :class:`gan_baselines.x2ct_gan.task.X2CTGANTask`
(G step, then D step, as the released code does), with X-Recon's networks and losses
(Adam 5e-5, β (0.5, 0.99), linear decay over the second half), and the multi-angle projection
loss's random rigid pose drawn from ``ctx.generator`` — the engine's per-rank generator
(seed ``seed·W + rank``), saved in checkpoints, so a resumed run draws the same poses.
"""

from __future__ import annotations

import contextlib
import types

import torch
from torch import Tensor

from .. import x_recon
from ..x2ct_gan.task import X2CTGANTask


class XReconTask(X2CTGANTask):
    """X-Recon (Wang et al., arXiv 2407.15356), always biplanar. Presets: ``cpu-demo`` →
    :func:`x_recon.cpu_demo`, ``ctpa-512`` → :func:`x_recon.paper` (224² → 224³)."""

    name = "x-recon"
    module: types.ModuleType = x_recon
    networks = {"generator": {"": ("generator", x_recon.XReconGenerator, "model")}}

    def generator_losses(self, fake: Tensor, target: Tensor, xrays: dict[str, Tensor], ctx) -> dict[str, Tensor]:
        rng: torch.Generator = ctx.generator
        # random_pose draws with the generator on the default device; on a GPU the engine's
        # generator lives on the GPU, so the draw is made there (no host sync) and moved by
        # apply_pose. On the CPU this is the plain call.
        where = torch.device(rng.device) if rng.device.type != "cpu" else contextlib.nullcontext()
        with where:
            return self.module.generator_losses(fake, target, xrays, ctx.unwrap("discriminator"), self.cfg,
                                                generator=rng)
