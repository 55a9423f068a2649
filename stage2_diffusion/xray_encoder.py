"""X-ray encoder: one or two views → spatial tokens ``(B, N, D)`` for the UNet's cross-attention.

A 2D CNN (GroupNorm/SiLU residual blocks, stride-2 downsampling) shared by the views maps each
``image_size²`` X-ray to a ``token_grid²`` grid of ``D``-dim tokens; learned 2D position and
view embeddings are added, and the views' token sets are concatenated (``N = V · token_grid²``).

Two learned substitutes make one model serve every use:

- **missing view**: where ``views_present[b, v]`` is False, view ``v``'s whole token set is
  replaced by a learned set (one per view), so a PA-only sample needs no fake lateral image;
- **null condition** (classifier-free guidance): where ``drop_mask[b]`` is True, all ``N``
  tokens are replaced by learned null tokens. The training task draws ``drop_mask`` with its
  own ``torch.Generator`` (probability ``diffusion.cfg_dropout``); the sampler uses
  :meth:`XrayEncoder.null_condition` for the unconditional half of its batch.

Replacement is a ``torch.where`` (no data-dependent branching, no host sync), so the learned
tokens get gradients exactly from the samples that use them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from patching.artifacts.pretrained import Pretrained
from patching.errors import InputError
from stage1_vqgan.blocks import GroupNorm32

from .config import XrayEncoderConfig


class ResBlock2d(nn.Module):
    """``x + conv(SiLU(GN(conv(SiLU(GN(x))))))`` with a 1×1 skip when channels change."""

    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = GroupNorm32(groups, c_in, eps=1e-6)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = GroupNorm32(groups, c_out, eps=1e-6)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class XrayEncoder(Pretrained):
    """X-rays ``(B, V, H, W)`` in ``[0, 1]`` → tokens ``(B, V · token_grid², token_dim)``.

    Args:
        cfg: :class:`~stage2_diffusion.config.XrayEncoderConfig`.
    """

    config_class = XrayEncoderConfig

    def __init__(self, cfg: XrayEncoderConfig):
        super().__init__()
        cfg = self.init_config(cfg)
        self.cfg = cfg
        g, d, ch = cfg.token_grid, cfg.token_dim, cfg.channels
        layers: list[nn.Module] = [nn.Conv2d(1, ch[0], 3, padding=1)]
        c_prev = ch[0]
        for i, c in enumerate(ch):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock2d(c_prev, c, cfg.norm_groups))
                c_prev = c
            if i < len(ch) - 1:
                layers.append(nn.Conv2d(c, c, 3, stride=2, padding=1))  # halve H and W
        layers += [GroupNorm32(cfg.norm_groups, c_prev, eps=1e-6), nn.SiLU(), nn.Conv2d(c_prev, d, 1)]
        self.cnn = nn.Sequential(*layers)
        self.pos_emb = nn.Parameter(torch.empty(g * g, d))                       # per grid cell
        self.view_emb = nn.Parameter(torch.empty(cfg.num_views, 1, d))          # per view
        self.missing_tokens = nn.Parameter(torch.empty(cfg.num_views, g * g, d))  # per view
        self.null_tokens = nn.Parameter(torch.empty(cfg.num_tokens, d))          # whole condition
        init_encoder_weights(self)

    @property
    def num_tokens(self) -> int:
        return self.cfg.num_tokens

    def forward(self, xrays: torch.Tensor, views_present: torch.Tensor | None = None,
                drop_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens for a batch.

        Args:
            xrays: ``(B, V, H, W)`` float in ``[0, 1]``, views in ``config.views`` order (any
                values where a view is missing; zeros are fine).
            views_present: ``(B, V)`` bool; ``None`` means every view is present.
            drop_mask: ``(B,)`` bool; True replaces that sample's tokens by the null condition.

        Returns:
            ``(B, N, D)`` with ``N = V · token_grid²``.
        """
        cfg = self.cfg
        if xrays.ndim != 4 or xrays.shape[1] != cfg.num_views or tuple(xrays.shape[2:]) != (cfg.image_size,) * 2:
            raise InputError("xrays", f"expected (B, {cfg.num_views}, {cfg.image_size}, {cfg.image_size}) "
                                      f"for views {cfg.views}, got {tuple(xrays.shape)}")
        b = xrays.shape[0]
        views_present = _mask(views_present, (b, cfg.num_views), "views_present", xrays.device)
        x = rearrange(xrays.to(self.pos_emb.dtype), "b v h w -> (b v) 1 h w") * 2.0 - 1.0
        feats = self.cnn(x)  # ((B·V), D, g, g)
        tokens = rearrange(feats, "(b v) d h w -> b v (h w) d", b=b) + self.pos_emb + self.view_emb
        tokens = torch.where(views_present[:, :, None, None], tokens, self.missing_tokens)  # (B, V, g², D)
        tokens = rearrange(tokens, "b v n d -> b (v n) d")
        if drop_mask is not None:
            drop_mask = _mask(drop_mask, (b,), "drop_mask", xrays.device)
            tokens = torch.where(drop_mask[:, None, None], self.null_tokens, tokens)
        return tokens

    def null_condition(self, batch: int) -> torch.Tensor:
        """The learned null condition ``(batch, N, D)`` (what ``drop_mask=True`` gives)."""
        return self.null_tokens.unsqueeze(0).expand(batch, -1, -1)


def _mask(mask, shape: tuple[int, ...], name: str, device) -> torch.Tensor:
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    mask = torch.as_tensor(mask, device=device)
    if mask.dtype != torch.bool or tuple(mask.shape) != shape:
        raise InputError(name, f"expected a bool tensor of shape {shape}, got {mask.dtype} {tuple(mask.shape)}")
    return mask


def init_encoder_weights(module: nn.Module) -> None:
    """The encoder's weight initialisation (the only place it is set).

    Convolutions and linear layers ``N(0, 1/fan_in)`` with zero bias (as the VQ-GAN); GroupNorm
    (1, 0); the second convolution of every residual block zero (blocks start as identities);
    embeddings and learned token sets ``N(0, 0.02²)`` (ViT's position embeddings).
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(m.weight, std=1.0 / math.sqrt(m.weight[0].numel()))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in module.modules():
        if isinstance(m, ResBlock2d):
            nn.init.zeros_(m.conv2.weight)
            nn.init.zeros_(m.conv2.bias)
    if isinstance(module, XrayEncoder):
        for p in (module.pos_emb, module.view_emb, module.missing_tokens, module.null_tokens):
            nn.init.normal_(p, std=0.02)
