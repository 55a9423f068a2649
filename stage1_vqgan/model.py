"""The 3D VQ-GAN autoencoder: encoder, EMA quantizer, decoder (architecture only).

Layout (taming-transformers' VQGAN in 3D; channels ``c_i = base_channels · channel_mults[i]``)::

    Encoder3d  x (B, C, X, Y, Z)
      conv_in → per level i: num_res_blocks × ResBlock3d(→ c_i) [+ Downsample3d unless last]
      → mid: ResBlock3d [+ AttentionBlock3d] ResBlock3d → GN → SiLU → conv → z_e (B, D, X/f, Y/f, Z/f)
    EMAVectorQuantizer  z_e → z_q (straight-through), indices (B, X/f, Y/f, Z/f)
    Decoder3d  z_q
      conv_in → mid → per level i (coarse → fine): (num_res_blocks + 1) × ResBlock3d(→ c_i)
      [+ Upsample3d unless finest] → GN → SiLU → conv → x̂ (B, C, X, Y, Z)

with ``f = 2 ** (len(channel_mults) - 1)``. GroupNorm + SiLU everywhere, no BatchNorm. The
quantizer is never inside a checkpointed region (a recomputed forward would apply its EMA
update twice); only residual and attention blocks are checkpointed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from patching.artifacts.pretrained import Pretrained
from patching.errors import InputError

from .blocks import (
    AttentionBlock3d,
    Downsample3d,
    GroupNorm32,
    ResBlock3d,
    Upsample3d,
    conv3d,
    maybe_checkpoint,
)
from .config import VQGANConfig
from .quantizer import EMAVectorQuantizer


class _Mid(nn.Module):
    """ResBlock3d, optional attention, ResBlock3d at the lowest resolution."""

    def __init__(self, c: int, cfg: VQGANConfig):
        super().__init__()
        pm, g = cfg.padding_mode, cfg.norm_groups
        self.block1 = ResBlock3d(c, c, g, padding_mode=pm)
        self.attn = AttentionBlock3d(c, g, cfg.attn_heads) if cfg.attn_mid else None
        self.block2 = ResBlock3d(c, c, g, padding_mode=pm)

    def forward(self, h: torch.Tensor, ckpt: bool) -> torch.Tensor:
        h = maybe_checkpoint(self.block1, h, enabled=ckpt)
        if self.attn is not None:
            h = maybe_checkpoint(self.attn, h, enabled=ckpt)
        return maybe_checkpoint(self.block2, h, enabled=ckpt)


class Encoder3d(nn.Module):
    """Image ``(B, in_channels, X, Y, Z)`` → continuous latent ``z_e`` ``(B, latent_dim, X/f, Y/f, Z/f)``."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.cfg = cfg
        pm, g, chans = cfg.padding_mode, cfg.norm_groups, cfg.level_channels
        self.conv_in = conv3d(cfg.in_channels, chans[0], 3, padding_mode=pm)
        self.levels = nn.ModuleList()
        c = chans[0]
        for i, c_out in enumerate(chans):
            level = nn.Module()
            level.blocks = nn.ModuleList(
                [ResBlock3d(c if j == 0 else c_out, c_out, g, padding_mode=pm) for j in range(cfg.num_res_blocks)])
            level.down = Downsample3d(c_out, pm) if i < len(chans) - 1 else nn.Identity()
            self.levels.append(level)
            c = c_out
        self.mid = _Mid(c, cfg)
        self.norm_out = GroupNorm32(g, c, eps=1e-6)
        self.conv_out = conv3d(c, cfg.latent_dim, 3, padding_mode=pm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ckpt = self.cfg.gradient_checkpointing
        h = self.conv_in(x)
        for level in self.levels:
            for block in level.blocks:
                h = maybe_checkpoint(block, h, enabled=ckpt)
            h = level.down(h)  # (B, c_i, n/2, ...) except after the last level
        h = self.mid(h, ckpt)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder3d(nn.Module):
    """Latent ``(B, latent_dim, x, y, z)`` → image ``(B, in_channels, f·x, f·y, f·z)``."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.cfg = cfg
        pm, g, chans = cfg.padding_mode, cfg.norm_groups, cfg.level_channels
        c = chans[-1]
        self.conv_in = conv3d(cfg.latent_dim, c, 3, padding_mode=pm)
        self.mid = _Mid(c, cfg)
        self.levels = nn.ModuleList()  # coarse → fine
        for i in reversed(range(len(chans))):
            level = nn.Module()
            level.blocks = nn.ModuleList(
                [ResBlock3d(c if j == 0 else chans[i], chans[i], g, padding_mode=pm)
                 for j in range(cfg.num_res_blocks + 1)])
            level.up = Upsample3d(chans[i], pm) if i > 0 else nn.Identity()
            self.levels.append(level)
            c = chans[i]
        self.norm_out = GroupNorm32(g, c, eps=1e-6)
        self.conv_out = conv3d(c, cfg.in_channels, 3, padding_mode=pm)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        ckpt = self.cfg.gradient_checkpointing
        h = self.mid(self.conv_in(z), ckpt)
        for level in self.levels:
            for block in level.blocks:
                h = maybe_checkpoint(block, h, enabled=ckpt)
            h = level.up(h)  # (B, c_i, 2n, ...) except at the finest level
        return self.conv_out(F.silu(self.norm_out(h)))


class VQGANOutput(NamedTuple):
    recon: torch.Tensor  # (B, C, X, Y, Z)
    indices: torch.Tensor  # (B, X/f, Y/f, Z/f) int64
    stats: dict[str, torch.Tensor]  # quantizer stats, 0-d tensors (see EMAVectorQuantizer.forward)


class VQGAN(Pretrained):
    """3D VQ-GAN autoencoder (the discriminator is separate: :mod:`stage1_vqgan.discriminator`).

    Args:
        cfg: model configuration.
        seed: seed of the quantizer's own generator, used when ``forward`` gets none (pass the
            training context's generator for exactly reproducible restarts).
    """

    config_class = VQGANConfig

    def __init__(self, cfg: VQGANConfig, seed: int = 0):
        super().__init__()
        cfg = self.cfg = self.init_config(cfg)
        self.encoder = Encoder3d(cfg)
        self.quantizer = EMAVectorQuantizer(cfg.codebook_size, cfg.latent_dim, beta=cfg.commitment_beta,
                                            decay=cfg.ema_decay, eps=cfg.ema_eps,
                                            restart_threshold=cfg.restart_threshold, seed=seed)
        self.decoder = Decoder3d(cfg)
        init_weights(self)

    @property
    def downsample(self) -> int:
        return self.cfg.downsample

    @property
    def last_layer(self) -> nn.Parameter:
        """The decoder's last weight: where the adaptive GAN weight compares gradient norms."""
        return self.decoder.conv_out.weight

    def _check_image(self, x: torch.Tensor) -> None:
        f, c = self.cfg.downsample, self.cfg.in_channels
        if x.ndim != 5 or x.shape[1] != c or any(s % f for s in x.shape[2:]):
            raise InputError("VQGAN input", f"needs (B, {c}, X, Y, Z) with X, Y, Z multiples of {f}, "
                                            f"got {tuple(x.shape)}")

    def encode_pre_quant(self, x: torch.Tensor) -> torch.Tensor:
        """``z_e``: the continuous encoder output ``(B, D, X/f, Y/f, Z/f)`` (before quantization)."""
        self._check_image(x)
        return self.encoder(x)

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """``(z_q, indices, stats)``; in training mode the codebook is updated (EMA, restarts)."""
        return self.quantizer(self.encode_pre_quant(x), generator)

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """Image ``(B, C, f·x, f·y, f·z)`` from latents ``(B, D, x, y, z)``."""
        if z_q.ndim != 5 or z_q.shape[1] != self.cfg.latent_dim:
            raise InputError("VQGAN latent", f"needs (B, {self.cfg.latent_dim}, x, y, z), got {tuple(z_q.shape)}")
        return self.decoder(z_q)

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Image from code indices ``(B, x, y, z)``."""
        return self.decode(self.quantizer.lookup(indices))

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> VQGANOutput:
        z_q, indices, stats = self.encode(x, generator)
        return VQGANOutput(self.decode(z_q), indices, stats)


def init_weights(module: nn.Module) -> None:
    """The VQ-GAN's weight initialisation (the only place it is set).

    Convolutions and linear layers: ``N(0, 1/fan_in)`` (variance-preserving), zero bias.
    GroupNorm: weight 1, bias 0. The second convolution of every residual block and the output
    projection of attention are zero, so each block starts as the identity (stable deep stacks;
    as diffusers' UNet). Codebook buffers are left alone (seeded from data on the first batch).
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv3d, nn.Linear)):
            fan_in = m.weight[0].numel()
            nn.init.normal_(m.weight, std=1.0 / math.sqrt(fan_in))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in module.modules():
        if isinstance(m, ResBlock3d):
            nn.init.zeros_(m.conv2.weight)
            nn.init.zeros_(m.conv2.bias)
        elif isinstance(m, AttentionBlock3d):
            nn.init.zeros_(m.proj.weight)
            nn.init.zeros_(m.proj.bias)


_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / torch.compile


def load_vqgan_weights(model: VQGAN, state_dict: Mapping, source: str) -> None:
    """Load ``state_dict`` into ``model`` or raise a one-line :class:`InputError` naming ``source``.

    Keys of DDP- or compile-wrapped models (``module.``, ``_orig_mod.``) are accepted. Any
    missing or unexpected key, or a tensor of another shape (a checkpoint of another model or
    config), is reported with counts and an example instead of torch's multi-line error.
    """
    if not isinstance(state_dict, Mapping):
        raise InputError(source, f"is not a state dict (got {type(state_dict).__name__})")
    sd = {}
    for key, value in state_dict.items():
        k = str(key)
        while k.startswith(_WRAPPER_PREFIXES):
            k = k.split(".", 1)[1]
        if not isinstance(value, torch.Tensor):
            raise InputError(source, f"entry {key!r} is a {type(value).__name__}, not a tensor")
        sd[k] = value
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [k for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or shapes):
        model.load_state_dict(sd, strict=True)
        return
    if len(missing) == len(expected):
        raise InputError(source, f"is not a VQ-GAN checkpoint: none of the model's {len(expected)} keys is present "
                                 f"(found e.g. {next(iter(sd), None)!r})")
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {missing[0]!r})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]!r})")
    if shapes:
        k = shapes[0]
        problems.append(f"{len(shapes)} tensors of another shape (e.g. {k!r}: {tuple(sd[k].shape)} in the file, "
                        f"{tuple(expected[k].shape)} in this model)")
    raise InputError(source, "does not match this VQ-GAN config (a checkpoint of another model or preset?): "
                             + "; ".join(problems))
