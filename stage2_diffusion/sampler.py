"""Sampling latents from X-rays: classifier-free guidance and globally coherent latent tiling.

At every step the model output is predicted for the **whole** latent, then **one** scheduler
step is taken on the whole latent:

- if no ``window`` is given, or the window covers the latent, the UNet sees the whole latent;
- otherwise the latent is cut into overlapping windows (:func:`patching.tiling.grid.tile_grid`); each
  window is denoised by the UNet *with its coordinates in the whole latent*, and the window
  predictions are blended with Gaussian weights (:func:`patching.tiling.blend.tile_weights`, MONAI's)
  into one whole-latent prediction. The next step's windows see the blended, shared latent,
  so neighbouring windows agree at every step — unlike sampling patches independently
  (X-ray2CTPA's re-implementation), which never forms one consistent volume.

Why not :func:`patching.sliding_window`: its ``fn`` receives only the tile batch, not the
tile's position, and the UNet needs each window's start for its coordinate channels; it also
returns to the CPU per tile. The accumulation here is ~10 lines on the latent's own device.
Memory: UNet activations scale with the window; besides them the sampler holds a few
whole-latent buffers (latent, numerator, one weight volume) — 80 MB each for 8×128×128×151.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from patching.errors import InputError
from patching.tiling.blend import tile_weights
from patching.tiling.grid import as_overlap, as_tile, tile_grid

from .guidance import corrected_output

Predict = Callable[[torch.Tensor, tuple], torch.Tensor]  # (latent crop, (start, full_shape)) -> output


def guided_prediction(unet, x: torch.Tensor, t, cond: torch.Tensor, null: torch.Tensor | None,
                      guidance: float, coords=None) -> torch.Tensor:
    """Classifier-free guided model output ``u + g · (c − u)``, float32.

    Conditional and unconditional halves run as one batch ``(2B, …)``. With ``guidance == 1``
    (or no ``null``) the result is the conditional output alone and the null half is skipped.
    """
    if null is None or guidance == 1.0:
        return unet(x, t, cond, coords=coords).float()
    out = unet(torch.cat([x, x]), t, torch.cat([cond, null]), coords=_twice(coords))
    c, u = out.float().chunk(2)
    return u + guidance * (c - u)


def _twice(coords):
    """Coordinates for the doubled CFG batch (per-sample tensors are repeated)."""
    if coords is None:
        return None
    return tuple(torch.cat([a, a]) if isinstance(a, torch.Tensor) and a.ndim == 2 else a for a in coords)


def windowed_prediction(predict: Predict, latents: torch.Tensor, window: Sequence[int] | None,
                        overlap: float = 0.25) -> torch.Tensor:
    """Whole-latent model output from overlapping windows, Gaussian-blended.

    Args:
        predict: ``predict(crop (B, C, *w), (start, full_shape)) -> (B, C', *w)``.
        latents: ``(B, C, X, Y, Z)``.
        window: window ``(x, y, z)`` (clipped to the latent per axis), or ``None`` for the whole.
        overlap: fraction of a window shared by neighbours.

    Returns:
        ``Σ_w g_w · predict(crop_w) / Σ_w g_w`` of shape ``(B, C', X, Y, Z)``, where ``g_w`` is the
        Gaussian weight map (σ = 0.125 · window, floor 1e-3) placed at window ``w``. Exactly
        ``predict(latents, (0, full))`` when one window covers the latent.
    """
    full = tuple(latents.shape[2:])
    win = full if window is None else tuple(min(w, n) for w, n in zip(as_tile(window, 3, "window"), full, strict=True))
    if win == full:
        return predict(latents, ((0, 0, 0), full))
    weights = tile_weights(win, dtype=torch.float32, device=latents.device)  # (wx, wy, wz)
    num, den = None, torch.zeros(full, dtype=torch.float32, device=latents.device)
    for sl in tile_grid(full, win, overlap):  # windows fit: no overhang since win <= full
        start = tuple(s.start for s in sl)
        pred = predict(latents[(..., *sl)], (start, full)).float()
        if num is None:
            num = latents.new_zeros((pred.shape[0], pred.shape[1], *full), dtype=torch.float32)
        num[(..., *sl)] += pred * weights
        den[sl] += weights
    return num / den


@torch.no_grad()
def sample_latents(unet, encoder, xrays: torch.Tensor, views_present: torch.Tensor | None = None, *,
                   shape: Sequence[int], scheduler, steps: int, guidance: float, generator: torch.Generator,
                   window: Sequence[int] | None = None, overlap: float = 0.25, progress: bool = True,
                   correct: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Sample latents ``(B, C, X, Y, Z)`` for a batch of X-rays.

    Args:
        unet: :class:`~stage2_diffusion.unet.LatentUNet3d` (or any module with ``latent_channels``
            and ``forward(x, t, tokens, coords=(start, full_shape))``), in eval mode.
        encoder: :class:`~stage2_diffusion.xray_encoder.XrayEncoder` (``forward`` and
            ``null_condition``), on the UNet's device.
        xrays: ``(B, V, H, W)`` in ``[0, 1]``, views in the encoder's order.
        views_present: ``(B, V)`` bool, ``None`` = all present (a missing lateral gets the
            encoder's learned tokens).
        shape: latent ``(C, X, Y, Z)``.
        scheduler: from :func:`stage2_diffusion.schedules.sample_scheduler`; its timesteps are
            reset here (``set_timesteps``), so one object serves many calls.
        steps: denoising steps.
        guidance: classifier-free guidance scale (1 = conditional only, one UNet batch of B).
        generator: **CPU** ``torch.Generator``; the initial noise is drawn on it and moved, so a
            seed gives the same latents on any device (up to kernel rounding).
        window, overlap: latent window for tiled denoising (see module docstring); ``None`` or
            a window covering the latent denoises the whole latent at once.
        progress: tqdm bar over steps.
        correct: ``x̂0 → x̂0'`` applied to each step's clean estimate before the scheduler step
            (:class:`stage2_diffusion.guidance.ProjectionGuidance`); ``None``: none.

    Returns:
        float32 latents in the diffusion's (scaled) latent space — divide by the stored scale
        factor before decoding with stage 1.
    """
    shape = _check_shape(shape, getattr(unet, "latent_channels", None))
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise InputError("steps", f"must be a positive integer, got {steps!r}")
    if isinstance(guidance, bool) or not isinstance(guidance, numbers.Real) or not (math.isfinite(guidance) and guidance >= 0):
        raise InputError("guidance", f"must be a finite number >= 0, got {guidance!r}")
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise InputError("generator", "must be a CPU torch.Generator (noise is drawn on the CPU, then moved)")
    if window is not None:
        window = as_tile(window, 3, "window")
    as_overlap(overlap, 3)
    device = next(unet.parameters()).device

    xrays = xrays.to(device)
    cond = encoder(xrays, None if views_present is None else views_present.to(device))  # (B, N, D)
    null = encoder.null_condition(cond.shape[0]) if guidance != 1.0 else None
    latents = torch.randn((cond.shape[0], *shape), generator=generator, dtype=torch.float32).to(device)

    scheduler.set_timesteps(int(steps), device=device)
    latents = latents * scheduler.init_noise_sigma
    for t in tqdm(scheduler.timesteps, desc="denoising", unit="step", disable=not progress):
        model_in = scheduler.scale_model_input(latents, t)

        def predict(crop, coords, t=t):
            return guided_prediction(unet, crop, t, cond, null, guidance, coords=coords)

        pred = windowed_prediction(predict, model_in, window, overlap)
        if correct is not None:
            pred = corrected_output(scheduler, t, latents, pred, correct)
        latents = scheduler.step(pred, t, latents, generator=generator).prev_sample
    return latents


def _check_shape(shape, latent_channels: int | None) -> tuple[int, ...]:
    try:
        out = tuple(int(s) for s in shape)
        ok = len(out) == 4 and all(s >= 1 and s == v for s, v in zip(out, shape, strict=True))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise InputError("shape", f"needs the latent's (C, X, Y, Z) as 4 positive integers, got {shape!r}")
    if latent_channels is not None and out[0] != latent_channels:
        raise InputError("shape", f"latent channels {out[0]} do not match the UNet's latent_channels {latent_channels}")
    return out
