"""X2CT-GAN losses as pure functions: the generator's and the discriminator's objectives.

Generator (paper, released config): ``10·MSE(G(x), y) + 10·mean_v L1(P_v G(x), P_v y)
+ 0.1·E[(D(G(x) | x) − 1)²]`` — the projection term compares parallel projections of the
output and of the ground-truth CT along the three orthogonal axes (PA, lateral, axial), made by
the project's DRR module. Discriminator: LSGAN, ``½E[(D(y | x) − 1)²] + ½E[D(G(x) | x)²]``.

Order of updates: the released code runs the G step first and the D step second on the same
forward pass (``optimize_parameters``). Either order works with these functions; the training
task calls, per batch::

    fake = G(**xrays)
    cond = condition(xrays, cfg.model)                         # None for an unconditional D
    g = generator_losses(fake, target, xrays, D_unwrapped, cfg)  # dict; g["total"].backward()
    d = discriminator_loss(D, target, fake.detach(), cond)       # d.backward()

``generator_losses`` runs D with its parameters frozen (:func:`gan_baselines.common.frozen`):
the adversarial gradient reaches G through D's input but never D's parameters.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..common import check_volume, frozen, lsgan_d_loss, lsgan_g_loss, projection_l1, xray_to_volume
from .config import X2CTGANConfig, X2CTGANModelConfig


def condition(xrays: Mapping[str, Tensor], model_cfg: X2CTGANModelConfig) -> Tensor | None:
    """The discriminator's condition: each X-ray expanded along its beam, ``B×V×X×Y×Z``.

    ``None`` for an unconditional discriminator. The X-rays are area-resized to the volume's
    side when the model upsamples (e.g. 64² X-rays for a 32³ volume).
    """
    if not model_cfg.conditional_d:
        return None
    n = model_cfg.volume_size
    return torch.cat([xray_to_volume(xrays[v], v, (n, n, n)) for v in model_cfg.views], dim=1)


def generator_losses(G_out: Tensor, target: Tensor, xrays: Mapping[str, Tensor], D: nn.Module,
                     cfg: X2CTGANConfig) -> dict[str, Tensor]:
    """The generator's objective on one batch.

    Args:
        G_out: the generator's output ``B×1×N×N×N`` (in ``cfg.model.value_range``).
        target: the ground-truth CT, same shape and range.
        xrays: ``{"pa": B×1×S×S, "lateral": ...}`` — the generator's inputs (the condition).
        D: the discriminator (unwrapped from DDP); its parameters get no gradient from here.
        cfg: the full config (``model`` for shapes and the condition, ``loss`` for weights).

    Returns:
        ``{"recon", "proj", "adv", "total"}``: the unweighted terms and the weighted sum.
    """
    n = cfg.model.volume_size
    check_volume(G_out, n, "G_out")
    check_volume(target, n, "target")
    w = cfg.loss
    losses = {"recon": F.mse_loss(G_out, target)}
    losses["proj"] = projection_l1(G_out, target, w.proj_views) if w.proj_views else G_out.new_zeros(())
    return with_adversarial_total(losses, G_out, xrays, D, cfg.model, w)


def with_adversarial_total(losses: dict[str, Tensor], G_out: Tensor, xrays: Mapping[str, Tensor], D: nn.Module,
                           model_cfg, w) -> dict[str, Tensor]:
    """``losses`` (``recon``, ``proj``) plus the conditional LSGAN term ``adv`` (``D`` frozen; zero
    without an adversarial weight) and ``total``, the sum weighted by ``w`` (a loss config). Shared
    by X2CT-GAN and X-Recon, whose generator objectives differ only in their projection term."""
    if w.adv_weight > 0:
        with frozen(D):
            losses["adv"] = lsgan_g_loss(D(G_out, condition(xrays, model_cfg)))
    else:
        losses["adv"] = G_out.new_zeros(())
    losses["total"] = w.recon_weight * losses["recon"] + w.proj_weight * losses["proj"] + w.adv_weight * losses["adv"]
    return losses


def discriminator_loss(D: nn.Module, real: Tensor, fake: Tensor, cond: Tensor | None) -> Tensor:
    """LSGAN discriminator loss on a real and a (detached) generated volume, same condition.

    Unweighted; the released code multiplies it by the adversarial weight 0.1, which Adam's
    scale invariance makes (almost) irrelevant, so we keep the textbook ½ factors instead.
    """
    return lsgan_d_loss(D(real, cond), D(fake.detach(), cond))
