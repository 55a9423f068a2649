"""3D latent UNet conditioned on X-ray tokens.

LDM's UNet in 3D, built from the shared blocks of :mod:`stage1_vqgan.blocks`, channels
``c_i = base_channels · channel_mults[i]``, ``f = 2^(len(channel_mults) - 1)``:

```
x (B, C, X, Y, Z) ─pad to a multiple of f (replicate)─ ⊕ coordinates (B, 3, X', Y', Z') ─ conv3³
down  per level: num_res_blocks × [ResBlock3d(t) → SelfAttn? → CrossAttn?]  [→ Downsample3d]
mid   ResBlock3d(t) → SelfAttn? → CrossAttn? → ResBlock3d(t)
up    per level, coarse → fine: (num_res_blocks + 1) × [cat skip → ResBlock3d(t) → SelfAttn? → CrossAttn?]
      [→ Upsample3d]
out   GN → SiLU → conv3³ (zero-initialised) → crop to (X, Y, Z)
```

Self-attention sits at the lowest level (``self_attn_lowest``), cross-attention at
``cross_attn_levels``; ``t`` is a sinusoidal embedding through a 2-layer MLP, added in every
residual block.

**Coordinates.** With ``use_coords``, three input channels hold each voxel's position in the
*whole* latent, normalised to ``(-1, 1)`` at voxel centres: ``(2 i + 1) / n - 1`` for index
``i`` of ``n``. A crop starting at ``start`` of a latent of ``full_shape`` passes
``coords=(start, full_shape)`` and sees the same channels as the same voxels of the whole
latent, so training crops and sampling windows know where they lie (X-ray2CTPA's patches did
not). Padded voxels get extrapolated positions and are cropped away.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from patching.artifacts.pretrained import Pretrained
from patching.errors import InputError
from stage1_vqgan.blocks import (
    Downsample3d,
    GroupNorm32,
    ResBlock3d,
    Upsample3d,
    conv3d,
    maybe_checkpoint,
    timestep_embedding,
)
from stage1_vqgan.model import init_weights as init_stage1_weights

from .attention import CrossAttention3d, SelfAttention3d, check_backend
from .config import UNetConfig

Coords = tuple["Sequence[int] | torch.Tensor", "Sequence[int] | torch.Tensor"]


def coordinate_channels(start, full_shape, crop_shape: Sequence[int], batch: int,
                        device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalised whole-latent positions of a crop's voxels, ``(batch, 3, *crop_shape)``.

    Args:
        start: the crop's first voxel in the whole latent: 3 ints, or a tensor ``(3,)`` or
            ``(batch, 3)`` (one crop position per sample).
        full_shape: the whole latent's ``(x, y, z)``: 3 ints or a tensor ``(3,)`` / ``(batch, 3)``.
        crop_shape: the crop's ``(x, y, z)``.
    """
    start = torch.as_tensor(start, device=device).to(torch.float32)
    full = torch.as_tensor(full_shape, device=device).to(torch.float32)
    if start.shape not in ((3,), (batch, 3)) or full.shape not in ((3,), (batch, 3)):
        raise InputError("coords", f"start and full_shape need 3 values or (B={batch}, 3), got "
                                   f"{tuple(start.shape)} and {tuple(full.shape)}")
    start, full = start.expand(batch, 3), full.expand(batch, 3)
    axes = []
    for a, n in enumerate(crop_shape):
        idx = start[:, a : a + 1] + torch.arange(n, device=start.device, dtype=torch.float32)  # (B, n)
        axes.append((2.0 * idx + 1.0) / full[:, a : a + 1] - 1.0)
    nx, ny, nz = crop_shape
    cx = axes[0][:, :, None, None].expand(batch, nx, ny, nz)
    cy = axes[1][:, None, :, None].expand(batch, nx, ny, nz)
    cz = axes[2][:, None, None, :].expand(batch, nx, ny, nz)
    return torch.stack([cx, cy, cz], dim=1).to(dtype)  # (B, 3, X, Y, Z)


class _Layer(nn.Module):
    """ResBlock3d(t) → optional self-attention → optional cross-attention, each checkpointable."""

    def __init__(self, c_in: int, c_out: int, cfg: UNetConfig, self_attn: bool, cross_attn: bool):
        super().__init__()
        heads = c_out // cfg.num_head_channels
        self.res = ResBlock3d(c_in, c_out, cfg.norm_groups, time_dim=cfg.time_dim, dropout=cfg.dropout)
        self.self_attn = SelfAttention3d(c_out, cfg.norm_groups, heads, cfg.attention_backend) if self_attn else None
        self.cross_attn = (CrossAttention3d(c_out, cfg.context_dim, cfg.norm_groups, heads, cfg.attention_backend)
                           if cross_attn else None)
        self.checkpointing = cfg.gradient_checkpointing

    def forward(self, h: torch.Tensor, t_emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = maybe_checkpoint(self.res, h, t_emb, enabled=self.checkpointing)
        if self.self_attn is not None:
            h = maybe_checkpoint(self.self_attn, h, enabled=self.checkpointing)
        if self.cross_attn is not None:
            h = maybe_checkpoint(self.cross_attn, h, context, enabled=self.checkpointing)
        return h


class LatentUNet3d(Pretrained):
    """Noise (or velocity) prediction on latents ``(B, C, X, Y, Z)`` of any size.

    Args:
        cfg: :class:`~stage2_diffusion.config.UNetConfig`. ``attention_backend='xformers'``
            raises :class:`InputError` here unless xformers is installed and CUDA is available.
    """

    config_class = UNetConfig

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        cfg = self.init_config(cfg)
        check_backend(cfg.attention_backend)
        self.cfg = cfg
        ch, lowest = cfg.level_channels, len(cfg.channel_mults) - 1
        c_in = cfg.latent_channels + (3 if cfg.use_coords else 0)
        self.conv_in = conv3d(c_in, ch[0])
        self.time_mlp = nn.Sequential(nn.Linear(ch[0], cfg.time_dim), nn.SiLU(), nn.Linear(cfg.time_dim, cfg.time_dim))

        def layer(c_a: int, c_b: int, level: int) -> _Layer:
            return _Layer(c_a, c_b, cfg, cfg.self_attn_lowest and level == lowest, level in cfg.cross_attn_levels)

        self.down = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        skip_ch, c = [ch[0]], ch[0]
        for i, c_out in enumerate(ch):
            blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                blocks.append(layer(c, c_out, i))
                c = c_out
                skip_ch.append(c)
            self.down.append(blocks)
            if i < lowest:
                self.downsamplers.append(Downsample3d(c))
                skip_ch.append(c)
        self.mid = nn.ModuleList([layer(c, c, lowest), _Layer(c, c, cfg, False, False)])
        self.up = nn.ModuleList()
        self.upsamplers = nn.ModuleList()
        for i in reversed(range(len(ch))):
            blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(layer(c + skip_ch.pop(), ch[i], i))
                c = ch[i]
            self.up.append(blocks)
            if i > 0:
                self.upsamplers.append(Upsample3d(c))
        assert not skip_ch
        self.norm_out = GroupNorm32(cfg.norm_groups, c, eps=1e-6)
        self.conv_out = conv3d(c, cfg.latent_channels)
        self.checkpointing = cfg.gradient_checkpointing
        init_unet_weights(self)
        if cfg.mean_latent_shape is not None:  # centred latents (diffusion.center_latents): set_centre
            self.register_buffer("latent_mean", torch.zeros(cfg.latent_channels, *cfg.mean_latent_shape))
            self.register_buffer("latent_residual_scale", torch.ones(()))

    @property
    def latent_channels(self) -> int:
        return self.cfg.latent_channels

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Turn recomputation of residual and attention blocks on or off (outputs are unchanged);
        overrides ``config.gradient_checkpointing`` without editing the config."""
        self.checkpointing = bool(enabled)
        for m in self.modules():
            if isinstance(m, _Layer):
                m.checkpointing = bool(enabled)

    # --- centred latents (diffusion.center_latents) -------------------------------------------------
    @property
    def centred(self) -> bool:
        return self.cfg.mean_latent_shape is not None

    def set_centre(self, mean: torch.Tensor, scale: float) -> None:
        """Store the training latents' mean ``(C, *mean_latent_shape)`` and residual std."""
        if not self.centred:
            raise InputError("unet.mean_latent_shape", "is unset: this UNet works on uncentred latents")
        mean = torch.as_tensor(mean, dtype=torch.float32)
        if tuple(mean.shape) != tuple(self.latent_mean.shape):
            raise InputError("latent mean", f"has shape {tuple(mean.shape)}, the UNet expects {tuple(self.latent_mean.shape)}")
        if not (torch.isfinite(mean).all() and math.isfinite(scale) and scale > 0):
            raise InputError("latent mean", f"needs finite values and a positive residual scale, got {scale!r}")
        self.latent_mean.copy_(mean)
        self.latent_residual_scale.fill_(float(scale))

    def _mean_at(self, like: torch.Tensor, start) -> torch.Tensor:
        """The mean latent under ``like`` ``(B, C, x, y, z)``: whole, or cropped at ``start`` ``(B, 3)``."""
        mean = self.latent_mean.to(like.dtype)
        crop = tuple(like.shape[2:])
        if crop == tuple(mean.shape[1:]):
            return mean.expand(like.shape[0], *mean.shape)
        if start is None:
            raise InputError("latents", f"a crop {crop} of a centred latent needs its start")
        start = torch.as_tensor(start).reshape(-1, 3).expand(like.shape[0], 3).tolist()
        return torch.stack([mean[:, a:a + crop[0], b:b + crop[1], c:c + crop[2]] for a, b, c in start])

    def to_centred(self, latent: torch.Tensor, start=None) -> torch.Tensor:
        """Scaled latents ``(B, C, x, y, z)`` → what the UNet diffuses (unchanged when uncentred)."""
        if not self.centred:
            return latent
        return (latent - self._mean_at(latent, start)) / self.latent_residual_scale.to(latent.dtype)

    def from_centred(self, x: torch.Tensor, start=None) -> torch.Tensor:
        """The inverse of :meth:`to_centred`: sampled ``x`` → scaled latents."""
        if not self.centred:
            return x
        return x * self.latent_residual_scale.to(x.dtype) + self._mean_at(x, start)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.norm_out(h)))

    def forward(self, x: torch.Tensor, t: torch.Tensor | int | float, tokens: torch.Tensor,
                coords: Coords | None = None) -> torch.Tensor:
        """Predict the model output for noisy latents.

        Args:
            x: ``(B, C, X, Y, Z)`` noisy latents (a whole latent or a crop of one).
            t: timesteps ``(B,)`` or a scalar for the whole batch.
            tokens: X-ray tokens ``(B, N, D)`` from :class:`~stage2_diffusion.xray_encoder.XrayEncoder`.
            coords: ``(start, full_shape)`` of the crop in the whole latent (see
                :func:`coordinate_channels`); ``None`` means ``x`` is the whole latent. Ignored
                when the UNet was built with ``use_coords=False``.

        Returns:
            ``(B, C, X, Y, Z)``.
        """
        cfg = self.cfg
        if x.ndim != 5 or x.shape[1] != cfg.latent_channels:
            raise InputError("latents", f"expected (B, {cfg.latent_channels}, X, Y, Z), got {tuple(x.shape)}")
        b, shape = x.shape[0], tuple(x.shape[2:])
        if tokens.ndim != 3 or tokens.shape[0] != b or tokens.shape[2] != cfg.context_dim:
            raise InputError("tokens", f"expected (B={b}, N, {cfg.context_dim}), got {tuple(tokens.shape)}")
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(b) if t.ndim == 0 else t
        if t.shape != (b,):
            raise InputError("timesteps", f"expected a scalar or shape ({b},), got {tuple(t.shape)}")
        if coords is not None and not (isinstance(coords, (tuple, list)) and len(coords) == 2):
            raise InputError("coords", f"expected (start, full_shape), got {coords!r}")

        f = cfg.downsample
        pad = [(-n) % f for n in shape]
        if any(pad):  # F.pad lists the last axis first
            x = F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]), mode="replicate")
        if cfg.use_coords:
            start, full = coords if coords is not None else ((0, 0, 0), shape)
            x = torch.cat([x, coordinate_channels(start, full, x.shape[2:], b, x.device, x.dtype)], dim=1)

        t_emb = self.time_mlp(timestep_embedding(t, cfg.level_channels[0]).to(x.dtype))  # (B, time_dim)
        # the stem, the upsamplers and the head run at full latent resolution: recomputed too, so
        # a whole 128×128×151 latent trains in < 4 GB on a CPU (docs/full_resolution.md)
        ck = self.checkpointing
        h = maybe_checkpoint(self.conv_in, x, enabled=ck)
        skips = [h]
        for i, blocks in enumerate(self.down):
            for blk in blocks:
                h = blk(h, t_emb, tokens)
                skips.append(h)
            if i < len(self.downsamplers):
                h = self.downsamplers[i](h)
                skips.append(h)
        for blk in self.mid:
            h = blk(h, t_emb, tokens)
        for j, blocks in enumerate(self.up):
            for blk in blocks:
                h = blk(torch.cat([h, skips.pop()], dim=1), t_emb, tokens)
            if j < len(self.upsamplers):
                h = maybe_checkpoint(self.upsamplers[j], h, enabled=ck)
        out = maybe_checkpoint(self._head, h, enabled=ck)
        return out[:, :, : shape[0], : shape[1], : shape[2]]


def init_unet_weights(module: nn.Module) -> None:
    """The UNet's weight initialisation (the only place it is set).

    The VQ-GAN's rule (:func:`stage1_vqgan.model.init_weights`: ``N(0, 1/fan_in)``, zero bias,
    GroupNorm (1, 0), every residual block's second conv and every self-attention output zero),
    plus zero cross-attention outputs and a zero output convolution (LDM's ``zero_module``): the
    untrained UNet predicts 0 and each block starts as the identity.
    """
    init_stage1_weights(module)
    for m in module.modules():
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, CrossAttention3d):
            nn.init.zeros_(m.proj.weight)
            nn.init.zeros_(m.proj.bias)
    if isinstance(module, LatentUNet3d):
        nn.init.zeros_(module.conv_out.weight)
        nn.init.zeros_(module.conv_out.bias)
