"""S-XR2CT losses as pure functions: X2CT-GAN's objective plus a 2.5D perceptual term.

Generator (paper): ``λ1·L_G + λ2·L_rec + λ2·L_pl + λ3·L_p`` with λ1 = 0.1, λ2 = 10, λ3 = 1:
``L_G`` X2CT-GAN's LSGAN term through the conditional D, ``L_rec`` the voxel-wise MSE, ``L_pl``
the L1 between the output's and the ground truth's parallel projections (PA, lateral, axial),
all as :func:`gan_baselines.x2ct_gan.generator_losses` ("we follow the loss functions used in
X2CT-GAN"); ``L_p`` the project's 2.5D perceptual loss
(``stage1_vqgan.losses.PerceptualLoss25D``: random slices along each axis through a frozen 2D
feature network read from a local safetensors file, channel-normalised feature distances, on
volumes mapped back to the project's [-1, 1]). Discriminator: X2CT-GAN's LSGAN loss
(``λ1·L_D``; Adam is invariant to the constant λ1, so :func:`discriminator_loss` is unscaled).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..common import from_model_range
from ..x2ct_gan import losses as x2ct_losses
from ..x2ct_gan.losses import condition, discriminator_loss
from .config import SXR2CTConfig, SXR2CTLossConfig

__all__ = ["build_perceptual", "condition", "discriminator_loss", "generator_losses"]


def build_perceptual(loss_cfg: SXR2CTLossConfig) -> nn.Module | None:
    """The frozen 2.5D perceptual loss of ``loss_cfg`` (``None`` when λ3 = 0); the feature network
    is read from ``loss_cfg.perceptual_weights`` (an :class:`InputError` names a bad file)."""
    loss_cfg.require_perceptual_file()
    if loss_cfg.perceptual_weight == 0:
        return None
    from stage1_vqgan.losses import (  # the project's one 2.5D loss
        PerceptualLoss25D,
        load_slice_feature_net,
    )

    return PerceptualLoss25D(load_slice_feature_net(loss_cfg.perceptual_weights), loss_cfg.perceptual_slices)


def generator_losses(G_out: Tensor, target: Tensor, xrays: Mapping[str, Tensor], D: nn.Module, cfg: SXR2CTConfig,
                     perceptual: nn.Module | None = None, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """The generator's objective on one batch.

    Args:
        G_out, target: ``B×1×N³`` in ``cfg.model.value_range``.
        xrays: ``{"pa": B×1×S×S}`` (the discriminator's condition).
        D: the discriminator, unwrapped from DDP (its parameters get no gradient from here).
        perceptual: :func:`build_perceptual`'s module; ``None`` leaves the term at 0.
        generator: draws the perceptual loss's slices (evenly spaced without one).

    Returns:
        ``{"recon", "proj", "adv", "perc", "total"}``: the unweighted terms and the weighted sum.
    """
    losses = x2ct_losses.generator_losses(G_out, target, xrays, D, cfg)
    w = cfg.loss.perceptual_weight
    if perceptual is not None and w > 0:
        vr = cfg.model.value_range
        losses["perc"] = perceptual(from_model_range(target, vr), from_model_range(G_out, vr), generator)
    else:
        losses["perc"] = G_out.new_zeros(())
    losses["total"] = losses["total"] + w * losses["perc"]
    return losses
