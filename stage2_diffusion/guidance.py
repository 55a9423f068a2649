"""Projection consistency at sampling: the denoised estimate is nudged until its DRRs match the X-rays.

At each sampler step the model's output gives an estimate ``x̂0`` of the clean latent. With
``sampler.drr_guidance_iters = n > 0``, ``x̂0`` takes ``n`` Adam steps (learning rate
``sampler.drr_guidance_lr``) on

    L(x̂0) = Σ_views mean( (DRR_view(HU(decode(x̂0))) − xray_view)² )

through the VQ-GAN decoder and the differentiable projector (:mod:`patching.projection.drr`),
and the step continues from the corrected estimate: the model output handed to the scheduler is
the one that predicts it (``ε̂ = (x_t − α x̂0)/σ``; ``v̂ = α ε̂ − σ x̂0``). This is the
decomposed-diffusion-sampler idea (Chung et al., ICLR 2024: data consistency on ``x̂0``, no
back-propagation through the denoiser) with a non-linear forward model; no network is
retrained and every other setting is unchanged.

It assumes the X-rays are radiographs of the projector's own kind (DRRs, as in every
benchmark of this field, the phantoms and X2CT-GAN's LIDC DRRs) with the detector convention of
``xray2ct data synth`` (430 mm square detector over the image's pixels, source 1650 mm from the
isocentre). For real radiographs it is a prior of unknown fit; leave it off (the default) there.
Cost per iteration: one decode of the whole latent and one DRR per view, forward and backward;
at the ``cpu-demo`` size (16³ latent, 64³ volume, 128² X-rays) that is tens of milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from patching.data.spec import unit_to_hu
from patching.errors import InputError
from patching.projection.drr import chest_geometry, render_drr


class ProjectionGuidance:
    """``x̂0 → x̂0'`` with DRRs closer to the X-rays (module docstring).

    Args:
        decode: ``x̂0 (B, C, x, y, z)`` in the diffusion's space → HU ``(B, 1, X, Y, Z)``,
            differentiable.
        xrays: ``{view: (H, W) tensor in [0, 1]}``, the views to match (the others are free).
        spacing_mm: voxel size of the decoded volume.
        iters, lr: Adam steps per sampler step and their learning rate.
    """

    def __init__(self, decode: Callable[[torch.Tensor], torch.Tensor], xrays: Mapping[str, torch.Tensor],
                 spacing_mm, *, iters: int, lr: float):
        if not xrays:
            raise InputError("sampler.drr_guidance_iters", "needs at least one X-ray to match")
        self.decode, self.spacing = decode, tuple(float(s) for s in spacing_mm)
        self.targets = {v: torch.as_tensor(img, dtype=torch.float32) for v, img in xrays.items()}
        self.geometry = {v: chest_geometry(*img.shape[-2:]) for v, img in self.targets.items()}
        self.iters, self.lr = int(iters), float(lr)

    def loss(self, x0: torch.Tensor) -> torch.Tensor:
        hu = self.decode(x0)
        total = hu.new_zeros(())
        for view, target in self.targets.items():
            drr = render_drr(hu, self.spacing, view, self.geometry[view])  # (B, H, W)
            total = total + F.mse_loss(drr, target.to(drr.device).expand_as(drr))
        return total

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([x], lr=self.lr)
        with torch.enable_grad():
            for _ in range(self.iters):
                opt.zero_grad(set_to_none=True)
                self.loss(x).backward()
                opt.step()
        return x.detach()


def vqgan_decoder(vq_model, unet, scale_factor: float, hu_window) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x̂0`` (diffusion space) → HU: un-centre (:meth:`LatentUNet3d.from_centred`), ÷ the latent
    scale factor, the VQ-GAN's decoder on the whole latent (no tiles, no quantisation), HU window."""
    def decode(x0: torch.Tensor) -> torch.Tensor:
        latent = unet.from_centred(x0) / scale_factor
        return unit_to_hu(vq_model.decode(latent.to(next(vq_model.parameters()).dtype)), hu_window)

    return decode


def corrected_output(scheduler, t, x_t: torch.Tensor, output: torch.Tensor,
                     correct: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The model output (the scheduler's ``prediction_type``) that predicts ``correct(x̂0)``."""
    a_bar = scheduler.alphas_cumprod.to(x_t.device)[int(t)].to(torch.float32)
    alpha, sigma = a_bar.sqrt(), (1.0 - a_bar).sqrt()
    kind = scheduler.config.prediction_type
    if kind == "v_prediction":
        x0 = alpha * x_t - sigma * output
    elif kind == "epsilon":
        x0 = (x_t - sigma * output) / alpha
    else:
        raise InputError("diffusion.prediction_type", f"projection guidance supports epsilon and v_prediction, not {kind!r}")
    x0 = correct(x0)
    eps = (x_t - alpha * x0) / sigma.clamp_min(1e-8)
    return alpha * eps - sigma * x0 if kind == "v_prediction" else eps
