"""VQ-GAN losses as pure functions: reconstruction, hinge GAN, adaptive weight, 2.5D perceptual.

The training task calls two functions per step (see ``docs/stage1_vqgan.md``)::

    out = models["vqgan"](x, ctx.generator)
    d_loss, d_logs = discriminator_loss(models["disc"], x, out.recon, step=step, disc_cfg=cfg.disc)
    ctx.backward(d_loss, "disc")                  # only when disc_active(step, cfg.disc)
    g_loss, g_logs = generator_loss(x, out.recon, out.stats, frozen_disc, step=step,
                                    last_layer=ctx.unwrap("vqgan").last_layer, ...)
    ctx.backward(g_loss, "vqgan")

where ``frozen_disc(x)`` runs the discriminator without gradients for its weights (the
engine's ``ctx.frozen("disc")``). Every returned log value is a 0-d tensor (no host sync).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from patching.errors import InputError

from .config import DiscConfig, LossConfig

# -- GAN pieces ---------------------------------------------------------------------------------


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """``½ (E[relu(1 - D(x))] + E[relu(1 + D(x̂))])`` (Lim & Ye; taming's ``hinge_d_loss``)."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """``-E[D(x̂)]``."""
    return -logits_fake.float().mean()


def disc_active(step: int, cfg: DiscConfig) -> bool:
    """Whether the adversarial terms are on at ``step`` (delayed start; host-side, no sync)."""
    return step >= cfg.start_step and cfg.weight > 0


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4, eps: float = 1e-4) -> torch.Tensor:
    """VQGAN's balance ``|∇_w L_rec| / (|∇_w L_G| + eps)`` at the decoder's last weight ``w``,
    clamped to ``[0, max_weight]`` and detached (Esser et al. 2021, eq. 7).

    Uses ``torch.autograd.grad`` (no ``.grad`` is written, DDP hooks are not triggered). With
    FSDP the weight must be an original parameter (``use_orig_params=True``).
    """
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    w = g_rec.float().norm() / (g_adv.float().norm() + eps)
    return w.clamp(0.0, max_weight).detach()


# -- perceptual ---------------------------------------------------------------------------------


class SliceFeatureNet(nn.Module):
    """Small VGG-like 2D feature network for the perceptual loss (torchvision is not a dependency).

    Stage ``i`` is ``convs_per_stage[i]`` × (3×3 conv → ReLU) at ``channels[i]``, with 2×2 max
    pooling before every stage but the first; the features are the outputs of every stage. The
    layout matches VGG16's first blocks (``channels=(64, 128, 256)``, ``convs=(2, 2, 3)``), so a
    converted VGG (first convolution summed over RGB) loads as it is.
    """

    def __init__(self, channels: Sequence[int] = (16, 32, 64), convs_per_stage: Sequence[int] | int = 2,
                 in_channels: int = 1):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if isinstance(convs_per_stage, int):
            convs_per_stage = (convs_per_stage,) * len(channels)
        self.stages = nn.ModuleList()
        c = in_channels
        for c_out, n in zip(channels, convs_per_stage, strict=True):
            layers: list[nn.Module] = []
            for _ in range(int(n)):
                layers += [nn.Conv2d(c, c_out, 3, padding=1), nn.ReLU()]
                c = c_out
            self.stages.append(nn.Sequential(*layers))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for i, stage in enumerate(self.stages):
            if i:
                x = F.max_pool2d(x, 2)
            x = stage(x)
            feats.append(x)  # (B, c_i, H / 2**i, W / 2**i)
        return feats


_CONV_KEY = re.compile(r"^stages\.(\d+)\.(\d+)\.weight$")


def load_slice_feature_net(path: str | os.PathLike) -> SliceFeatureNet:
    """Build a :class:`SliceFeatureNet` from a local safetensors file; its layout is read from
    the tensor names and shapes. Never downloads. Raises :class:`InputError` naming ``path``
    when the file is missing, unreadable or not such a network."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(path, "perceptual weights file not found (loss.perceptual_weights must be a local "
                               "safetensors file)")
    try:
        sd = load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise InputError(path, f"cannot be read as safetensors: {err}") from None
    convs: dict[int, dict[int, torch.Tensor]] = {}
    for key, value in sd.items():
        m = _CONV_KEY.match(key)
        if m:
            convs.setdefault(int(m.group(1)), {})[int(m.group(2))] = value
    if not convs or sorted(convs) != list(range(len(convs))):
        raise InputError(path, "is not a SliceFeatureNet state dict (expected tensors 'stages.<i>.<j>.weight')")
    channels, counts = [], []
    for i in range(len(convs)):
        ws = [convs[i][j] for j in sorted(convs[i])]
        if any(w.ndim != 4 for w in ws):
            raise InputError(path, f"stage {i} has non-2D convolution weights")
        channels.append(int(ws[-1].shape[0]))
        counts.append(len(ws))
    in_channels = int(convs[0][min(convs[0])].shape[1])
    net = SliceFeatureNet(channels, counts, in_channels)
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise InputError(path, f"does not fit a SliceFeatureNet: {' '.join(first[:2])}") from None
    net.requires_grad_(False)
    return net.eval()


def _slice_indices(n: int, k: int, generator: torch.Generator | None, device) -> torch.Tensor:
    k = min(k, n)
    if generator is None:  # evenly spaced, deterministic
        return torch.linspace(0, n - 1, k, device=device).round().long()
    return torch.randperm(n, generator=generator, device=generator.device)[:k].to(device)


class PerceptualLoss25D(nn.Module):
    """2.5D perceptual loss: slices along each axis through a frozen 2D feature network.

    For each axis, ``slices_per_axis`` slices (random with a generator, evenly spaced without)
    of the target and the reconstruction go through :class:`SliceFeatureNet`; the loss is the
    mean over axes and stages of ``mean((f̂/|f̂| - f/|f|)²)`` (channel-normalised features, as
    LPIPS without its learned linear heads). The target's features carry no gradient.
    """

    def __init__(self, net: SliceFeatureNet, slices_per_axis: int = 4):
        super().__init__()
        self.net = net.requires_grad_(False).eval()
        self.slices_per_axis = int(slices_per_axis)

    def train(self, mode: bool = True) -> PerceptualLoss25D:
        super().train(mode)
        self.net.eval()  # always frozen
        return self

    @staticmethod
    def _norm(f: torch.Tensor) -> torch.Tensor:
        return f / (f.float().pow(2).sum(1, keepdim=True).sqrt() + 1e-10).to(f.dtype)

    def forward(self, x: torch.Tensor, x_rec: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        total, terms = x.new_zeros((), dtype=torch.float32), 0
        patterns = ("b c x y z -> (b c x) 1 y z", "b c x y z -> (b c y) 1 x z", "b c x y z -> (b c z) 1 x y")
        for axis, pattern in enumerate(patterns, start=2):
            idx = _slice_indices(x.shape[axis], self.slices_per_axis, generator, x.device)
            real = rearrange(x.index_select(axis, idx), pattern)  # (B·C·k, 1, H, W)
            fake = rearrange(x_rec.index_select(axis, idx), pattern)
            with torch.no_grad():
                f_real = self.net(real)
            for fr, ff in zip(f_real, self.net(fake), strict=True):
                total = total + (self._norm(ff) - self._norm(fr)).float().pow(2).mean()
                terms += 1
        return total / terms


def build_perceptual(cfg: LossConfig) -> PerceptualLoss25D | None:
    """The perceptual loss of ``cfg``, or ``None`` when it is off."""
    if not cfg.perceptual_on:
        return None
    return PerceptualLoss25D(load_slice_feature_net(cfg.perceptual_weights), cfg.perceptual_slices)


# -- the two updates ------------------------------------------------------------------------------


def reconstruction_loss(x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
    """Mean absolute error in float32."""
    return (x_rec.float() - x.float()).abs().mean()


def generator_loss(
    x: torch.Tensor,
    x_rec: torch.Tensor,
    quant_stats: dict[str, torch.Tensor],
    disc: Callable[[torch.Tensor], torch.Tensor] | None,
    *,
    step: int,
    loss_cfg: LossConfig,
    disc_cfg: DiscConfig,
    last_layer: torch.Tensor | None = None,
    perceptual: PerceptualLoss25D | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Autoencoder ("generator") loss of one step.

    ``L = w_l1·L1 + w_p·L_perc + w_cb·L_commit + λ·L_G`` with ``L_G = -E[D(x̂)]`` and
    ``λ = disc.weight · adaptive_weight(w_l1·L1 + w_p·L_perc, L_G)`` (or ``disc.weight`` without
    the adaptive rule), and ``λ = 0`` — the discriminator not even called — before
    ``disc.start_step``. ``disc`` should not accumulate gradients into the discriminator's
    weights (wrap it in the engine's ``ctx.frozen``).

    Returns ``(loss, logs)``; logs always hold the same keys (0-d tensors).
    """
    zero = x_rec.new_zeros((), dtype=torch.float32)
    rec = reconstruction_loss(x, x_rec)
    nll = loss_cfg.l1_weight * rec
    perc = zero
    if perceptual is not None and loss_cfg.perceptual_weight > 0:
        perc = perceptual(x, x_rec, generator)
        nll = nll + loss_cfg.perceptual_weight * perc
    commit = quant_stats["commitment_loss"]
    loss = nll + loss_cfg.codebook_weight * commit
    g_adv, lam = zero, zero
    if disc is not None and disc_active(step, disc_cfg):
        g_adv = hinge_g_loss(disc(x_rec))
        if disc_cfg.adaptive_weight and torch.is_grad_enabled():
            if last_layer is None:
                raise ValueError("generator_loss: the adaptive weight needs last_layer (the decoder's last weight)")
            lam = disc_cfg.weight * adaptive_weight(nll, g_adv, last_layer, disc_cfg.max_adaptive_weight)
        else:
            lam = zero + disc_cfg.weight
        loss = loss + lam * g_adv
    logs = {"loss_g": loss.detach(), "rec_l1": rec.detach(), "perceptual": perc.detach(),
            "commitment": commit.detach(), "g_adv": g_adv.detach(), "disc_weight": lam.detach()}
    return loss, logs


def discriminator_loss(
    disc: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    x_rec: torch.Tensor,
    *,
    step: int,
    disc_cfg: DiscConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Hinge loss of the discriminator, ``0`` × loss before ``disc.start_step``.

    Real and (detached) fake tiles go through ``disc`` as one concatenated batch — one forward
    per update, as DDP wants; correct because the discriminator has no cross-sample statistics.
    Returns ``(loss, logs)`` with ``loss_d``, ``logits_real``, ``logits_fake`` (0-d tensors).
    """
    b = x.shape[0]
    logits = disc(torch.cat([x, x_rec.detach().to(x.dtype)]))  # (2B, 1, x, y, z)
    real, fake = logits[:b], logits[b:]
    factor = 1.0 if disc_active(step, disc_cfg) else 0.0
    loss = factor * hinge_d_loss(real, fake)
    logs = {"loss_d": loss.detach(), "logits_real": real.float().mean().detach(),
            "logits_fake": fake.float().mean().detach()}
    return loss, logs
