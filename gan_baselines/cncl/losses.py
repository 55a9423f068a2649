"""CNCL losses as pure functions: the seed's GAN + L1 (pix2pix's objective).

Generator: ``adv_weight · BCE(D(x, G(x)), 1) + l1_weight · mean|G(x) − y|`` with ``x`` the
low-dose slice and ``y`` the clean one. Discriminator: ``½ [BCE(D(x, y), 1) + BCE(D(x, G(x)), 0)]``
(pix2pix halves it to slow D down relative to G). Logits, so BCE is ``binary_cross_entropy_with_logits``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..common import frozen
from .config import CNCLConfig


def _bce(logits: Tensor, target: float) -> Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def generator_losses(fake: Tensor, target: Tensor, lowdose: Tensor, D: nn.Module, cfg: CNCLConfig) -> dict[str, Tensor]:
    """``{"l1", "adv", "total"}``; ``D`` (unwrapped) runs with its parameters frozen."""
    w = cfg.loss
    losses = {"l1": F.l1_loss(fake, target)}
    if w.adv_weight > 0:
        with frozen(D):
            losses["adv"] = _bce(D(lowdose, fake), 1.0)
    else:
        losses["adv"] = fake.new_zeros(())
    losses["total"] = w.l1_weight * losses["l1"] + w.adv_weight * losses["adv"]
    return losses


def discriminator_loss(D: nn.Module, lowdose: Tensor, real: Tensor, fake: Tensor) -> Tensor:
    return 0.5 * (_bce(D(lowdose, real), 1.0) + _bce(D(lowdose, fake.detach()), 0.0))
