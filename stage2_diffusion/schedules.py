"""Noise schedules from diffusers, all built from one :class:`DiffusionConfig` so their betas match.

- training: :func:`train_scheduler` (``DDPMScheduler``), :func:`sample_timesteps`,
  :func:`add_noise`, :func:`velocity` and :func:`training_target` (ε or v by
  ``prediction_type``);
- sampling: :func:`sample_scheduler` (``DDIMScheduler`` with η = 0, or
  ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++")``), both deterministic.

Schedulers hold no parameters (nothing to checkpoint beyond the config); these are thin
functions around them, no subclasses. Sampling uses ``timestep_spacing="trailing"``, so the
first step is at ``t = T - 1`` where the initial latent is (almost) pure noise (Lin et al.
2024, "Common diffusion noise schedules and sample steps are flawed"); DDIM's default
"leading" spacing would start at ``t = 980`` of 1000 for 50 steps.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from patching.errors import InputError

from .config import SAMPLERS, DiffusionConfig


def _common(cfg: DiffusionConfig) -> dict:
    return dict(num_train_timesteps=cfg.num_train_timesteps, beta_start=cfg.beta_start, beta_end=cfg.beta_end,
                beta_schedule=cfg.beta_schedule, prediction_type=cfg.prediction_type)


def train_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    """DDPM forward process for training (no sample clipping: latents are not bounded)."""
    return DDPMScheduler(**_common(cfg), clip_sample=False)


def sample_scheduler(cfg: DiffusionConfig, name: str) -> DDIMScheduler | DPMSolverMultistepScheduler:
    """A deterministic sampler (``ddim`` or ``dpmsolver++``) with the training betas."""
    if name == "ddim":
        return DDIMScheduler(**_common(cfg), clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
    if name == "dpmsolver++":
        return DPMSolverMultistepScheduler(**_common(cfg), algorithm_type="dpmsolver++", solver_order=2,
                                           timestep_spacing="trailing")
    raise InputError("sampler.name", f"must be one of {SAMPLERS}, got {name!r}")


def sample_timesteps(scheduler: DDPMScheduler, batch: int, generator: torch.Generator,
                     device=None) -> torch.Tensor:
    """Uniform training timesteps ``(batch,)`` int64, drawn on the CPU ``generator``, then moved."""
    t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator)
    return t.to(device) if device is not None else t


def add_noise(scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = √ᾱ_t x0 + √(1 − ᾱ_t) ε`` (diffusers' ``add_noise``)."""
    return scheduler.add_noise(x0, noise, t)


def velocity(scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``v = √ᾱ_t ε − √(1 − ᾱ_t) x0`` (diffusers' ``get_velocity``)."""
    return scheduler.get_velocity(x0, noise, t)


def training_target(scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor,
                    t: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict: ``noise`` (epsilon) or :func:`velocity` (v_prediction)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return velocity(scheduler, x0, noise, t)
    raise InputError("diffusion.prediction_type", f"unsupported for training: {kind!r}")
