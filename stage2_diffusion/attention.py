"""Attention for the latent UNet: self-attention over voxels, cross-attention to X-ray tokens.

One kernel switch, :func:`attend`: ``sdpa`` is ``F.scaled_dot_product_attention`` (flash or
memory-efficient kernels on CUDA, math on CPU); ``xformers`` is
``xformers.ops.memory_efficient_attention``, imported lazily and CUDA only (it has no CPU
kernels). Both compute ``softmax(q kᵀ / √d) v`` without dropout or masks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from patching.errors import InputError
from stage1_vqgan.blocks import AttentionBlock3d, GroupNorm32


def check_backend(backend: str) -> None:
    """Raise :class:`InputError` unless ``backend`` can run here (xformers: installed and CUDA)."""
    if backend == "sdpa":
        return
    if backend != "xformers":
        raise InputError("unet.attention_backend", f"must be 'sdpa' or 'xformers', got {backend!r}")
    try:
        import xformers.ops  # noqa: F401
    except ImportError:
        raise InputError("unet.attention_backend",
                         "'xformers' chosen but xformers is not installed (pip install xformers, or use 'sdpa')") from None
    if not torch.cuda.is_available():
        raise InputError("unet.attention_backend", "'xformers' needs a CUDA device (it has no CPU kernels); use 'sdpa'")


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """``softmax(q kᵀ/√d) v`` for ``q (B, H, Nq, d)``, ``k, v (B, H, Nk, d)`` → ``(B, H, Nq, d)``."""
    if backend == "sdpa":
        # Contiguous (B, H, N, d): the views the blocks hand over are strided (d runs across the
        # voxels), and with strided inputs SDPA falls back to the math kernel, which materialises
        # the N×N weights: 2.2 GB instead of 7 MB for self-attention over 16×16×19 voxels on a CPU
        # (measured; docs/full_resolution.md). The fused kernels want the last dimension dense.
        return F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous())
    if backend != "xformers":
        raise InputError("unet.attention_backend", f"must be 'sdpa' or 'xformers', got {backend!r}")
    if not q.is_cuda:
        raise InputError("unet.attention_backend", f"'xformers' needs CUDA tensors, got {q.device}; use 'sdpa'")
    import xformers.ops as xops

    # xformers wants (B, N, H, d)
    q, k, v = (rearrange(a, "b h n d -> b n h d").contiguous() for a in (q, k, v))
    return rearrange(xops.memory_efficient_attention(q, k, v), "b n h d -> b h n d")


class SelfAttention3d(AttentionBlock3d):
    """:class:`stage1_vqgan.blocks.AttentionBlock3d` (same parameters and zero-init output) with a
    selectable kernel: ``x + proj(attn(GN(x)))`` over all voxels."""

    def __init__(self, channels: int, groups: int, num_heads: int = 1, backend: str = "sdpa"):
        super().__init__(channels, groups, num_heads)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, nx, ny, nz = x.shape
        qkv = self.qkv(self.norm(x))
        q, k, v = rearrange(qkv, "b (three h d) x y z -> three b h (x y z) d", three=3, h=self.num_heads)
        out = attend(q, k, v, self.backend)  # (B, heads, X·Y·Z, d)
        out = rearrange(out, "b h (x y z) d -> b (h d) x y z", x=nx, y=ny, z=nz)
        return x + self.proj(out)


class CrossAttention3d(nn.Module):
    """Voxels attend to context tokens: ``x + proj(attn(q = GN(x), k, v = LN(context)))``.

    Args:
        channels: voxel channels.
        context_dim: token width ``D``.
        groups: GroupNorm groups for the voxels.
        num_heads: heads (must divide ``channels``).
        backend: ``sdpa`` or ``xformers``.
    """

    def __init__(self, channels: int, context_dim: int, groups: int, num_heads: int = 1, backend: str = "sdpa"):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels {channels} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.backend = backend
        self.norm = GroupNorm32(groups, channels, eps=1e-6)
        self.norm_context = nn.LayerNorm(context_dim)
        self.to_q = nn.Conv3d(channels, channels, 1)
        self.to_kv = nn.Linear(context_dim, 2 * channels)
        self.proj = nn.Conv3d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        _, _, nx, ny, nz = x.shape
        q = rearrange(self.to_q(self.norm(x)), "b (h d) x y z -> b h (x y z) d", h=self.num_heads)
        # context in x's dtype: under autocast the tokens may arrive as float32
        k, v = rearrange(self.to_kv(self.norm_context(context)), "b n (two h d) -> two b h n d", two=2,
                         h=self.num_heads).to(q.dtype)
        out = attend(q, k, v, self.backend)  # (B, heads, X·Y·Z, d)
        out = rearrange(out, "b h (x y z) d -> b (h d) x y z", x=nx, y=ny, z=nz)
        return x + self.proj(out)
