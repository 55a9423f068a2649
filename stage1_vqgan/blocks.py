"""Shared 3D network blocks (the VQ-GAN here; stage 2's latent UNet reuses them).

Tensors are channels-first ``(B, C, X, Y, Z)``. Normalisation is GroupNorm only — never
BatchNorm: per-sample statistics behave the same at batch 1 per GPU, under DDP (nothing to
synchronise) and when real and fake samples share a discriminator batch.

bf16: :class:`GroupNorm32` normalises in float32 and casts back, so autocast runs convolutions
in bf16 while the statistics (means of squares over up to millions of voxels) stay float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (bf16-safe), output in the input's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # autocast would run group_norm in float32 anyway, but explicit float() also covers
        # models cast to bf16 wholesale (no autocast), e.g. DeepSpeed's bf16 mode.
        return F.group_norm(x.float(), self.num_groups, self.weight.float() if self.weight is not None else None,
                            self.bias.float() if self.bias is not None else None, self.eps).to(x.dtype)


def conv3d(c_in: int, c_out: int, kernel: int = 3, stride: int = 1, padding_mode: str = "zeros") -> nn.Conv3d:
    """``kernel``-cube convolution with 'same' padding for stride 1 (``kernel // 2``)."""
    return nn.Conv3d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, padding_mode=padding_mode)


def maybe_checkpoint(fn, *args, enabled: bool):
    """``fn(*args)``, recomputed in the backward pass when ``enabled`` and gradients are on.

    Non-reentrant checkpointing (``use_reentrant=False``): works with inputs that do not
    require grad, with ``torch.autograd.grad`` (the adaptive GAN weight) and under DDP.
    """
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class ResBlock3d(nn.Module):
    """``x + conv(SiLU(GN(conv(SiLU(GN(x))) + t))))`` with a 1×1×1 skip when channels change.

    Args:
        c_in, c_out: channels.
        groups: GroupNorm groups (must divide both).
        time_dim: size of an optional conditioning vector ``t_emb`` ``(B, time_dim)``, projected
            and added per channel after the first convolution (diffusion time embedding).
        dropout: dropout before the second convolution.
        padding_mode: ``zeros`` or ``replicate``.
    """

    def __init__(self, c_in: int, c_out: int, groups: int, time_dim: int | None = None,
                 dropout: float = 0.0, padding_mode: str = "zeros"):
        super().__init__()
        self.norm1 = GroupNorm32(groups, c_in, eps=1e-6)
        self.conv1 = conv3d(c_in, c_out, 3, padding_mode=padding_mode)
        self.time_proj = nn.Linear(time_dim, c_out) if time_dim else None
        self.norm2 = GroupNorm32(groups, c_out, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv3d(c_out, c_out, 3, padding_mode=padding_mode)
        self.skip = nn.Conv3d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_proj is not None:
            if t_emb is None:
                raise ValueError("ResBlock3d was built with time_dim and needs t_emb")
            h = h + rearrange(self.time_proj(F.silu(t_emb)), "b c -> b c 1 1 1")
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Downsample3d(nn.Module):
    """Halve every axis: 3³ convolution with stride 2 (``n → ceil(n / 2)``; exact for even n)."""

    def __init__(self, channels: int, padding_mode: str = "zeros"):
        super().__init__()
        self.conv = conv3d(channels, channels, 3, stride=2, padding_mode=padding_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample3d(nn.Module):
    """Double every axis: nearest-neighbour ×2, then a 3³ convolution (no checkerboard)."""

    def __init__(self, channels: int, padding_mode: str = "zeros"):
        super().__init__()
        self.conv = conv3d(channels, channels, 3, padding_mode=padding_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class AttentionBlock3d(nn.Module):
    """Multi-head self-attention over all voxels, ``x + proj(attn(GN(x)))``.

    Uses ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels
    on CUDA). Cost grows with (X·Y·Z)²: use it only at the lowest resolution.
    """

    def __init__(self, channels: int, groups: int, num_heads: int = 1):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels {channels} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm = GroupNorm32(groups, channels, eps=1e-6)
        self.qkv = nn.Conv3d(channels, 3 * channels, 1)
        self.proj = nn.Conv3d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, nx, ny, nz = x.shape
        qkv = self.qkv(self.norm(x))
        q, k, v = rearrange(qkv, "b (three h d) x y z -> three b h (x y z) d", three=3, h=self.num_heads)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, X·Y·Z, d)
        out = rearrange(out, "b h (x y z) d -> b (h d) x y z", x=nx, y=ny, z=nz)
        return x + self.proj(out)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding ``(B,) → (B, dim)`` of (possibly fractional) timesteps, float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb
