"""S-XR2CT networks (Hor, Yang, Kim 2025): a 2D mapping network, a 3D encoder–decoder with a
template CT, and X2CT-GAN's conditional 3D PatchGAN.

**2D mapping network.** From the PA X-ray ``X`` (``B×1×S×S`` in [0, 1]) the *likelihood image*
``L = log √(2πσ²) + (X − μ)² / (2σ²)`` — each pixel's negative log-likelihood under a Gaussian
with the image's own mean μ and (population) standard deviation σ — and multi-scale features
from a ConvNeXt (Liu et al. 2022) written here: patchify stem (k = s = ``stem_stride``) +
LayerNorm, stages of ConvNeXt blocks (7×7 depthwise conv → LayerNorm → 1×1 ×4 → GELU → 1×1 →
layer scale 1e-6 → residual), LayerNorm + 2×2/2 conv between stages. (timm's ConvNeXt needs
torchvision, which has no CPU build here; the blocks are a few lines.) For every 3D encoder level
of side ``s``, ``L`` is area-downsampled to ``s²`` and concatenated with the ConvNeXt stage of that
side (levels finer than the first stage get ``L`` alone), a 1×1 conv (+InstanceNorm, ReLU) sets
the width, and the map is lifted into 3D by repetition along the PA beam — X2CT-GAN's
connection B frame (:func:`gan_baselines.common.branch_to_volume`), so the lifted features are
in the volume frame ``[x, y, z]`` and project back onto the X-ray.

**3D encoder–decoder.** A U-Net in the volume frame. The template CT is an ``nn.Parameter``
``1×1×N³`` (the model's value range; the training task initialises it with the mean training
volume, :meth:`SXR2CTGenerator.set_template`, and it is saved with the weights); encoder level
``k`` concatenates [previous level, strided 3×3×3 conv | template avg-pooled to ``s_k³`` | lifted
2D features] and applies two 3×3×3 conv blocks; the decoder mirrors it (transposed conv ×2,
concatenate the skip, two conv blocks). After the first (coarsest) decoder level, Swin UNETR's
windowed self-attention stage (``monai.networks.nets.swin_unetr.BasicLayer``: regular and shifted
3D windows with relative position bias — the block the paper cites, from MONAI rather than
re-written). A 1×1×1 conv and ReLU give ``B×1×N³`` in [0, 1].

**Discriminator**: :class:`gan_baselines.x2ct_gan.model.PatchDiscriminator3D`, conditional on the
PA X-ray expanded along its beam (the paper: "a similar architecture from X2CT-GAN, conditioning
on expanded input x-ray").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from patching.artifacts.pretrained import Pretrained
from patching.errors import InputError

from ..common import branch_to_volume, check_volume, check_xrays, expand_to_branch, init_weights
from ..x2ct_gan.model import PatchDiscriminator3D, conv3d_block, output_activation, up3d_block
from .config import SXR2CTModelConfig


def likelihood_image(x: Tensor, eps: float = 1e-6) -> Tensor:
    """``L = log √(2πσ²) + (X − μ)² / (2σ²)`` per image: ``B×1×H×W`` → ``B×1×H×W``.

    μ and σ² are the image's own mean and population variance (over its pixels), σ² floored at
    ``eps`` (a constant image gives ``L = ½ log(2π·eps)`` everywhere).
    """
    mu = x.mean(dim=(-2, -1), keepdim=True)
    var = (x - mu).pow(2).mean(dim=(-2, -1), keepdim=True).clamp_min(eps)
    return 0.5 * torch.log(2 * math.pi * var) + (x - mu).pow(2) / (2 * var)


# --- 2D: ConvNeXt ------------------------------------------------------------------------------


class LayerNorm2d(nn.LayerNorm):
    """ConvNeXt's channels-first LayerNorm: normalises ``B×C×H×W`` over ``C`` at every pixel."""

    def forward(self, x: Tensor) -> Tensor:
        x = rearrange(x, "b c h w -> b h w c")
        return rearrange(super().forward(x), "b h w c -> b c h w")


class ConvNeXtBlock(nn.Module):
    """7×7 depthwise conv → LayerNorm → Linear(4C) → GELU → Linear(C) → ×γ (1e-6) → + input."""

    def __init__(self, dim: int, layer_scale: float = 1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x: Tensor) -> Tensor:
        h = rearrange(self.dwconv(x), "b c h w -> b h w c")
        h = self.mlp(self.norm(h)) * self.gamma
        return x + rearrange(h, "b h w c -> b c h w")


class ConvNeXt2D(nn.Module):
    """A ConvNeXt feature pyramid: ``B×1×S×S`` → one map per stage, ``B×dims[i]×(S/stem/2^i)²``."""

    def __init__(self, cfg: SXR2CTModelConfig):
        super().__init__()
        dims, depths = cfg.convnext_dims, cfg.convnext_depths
        self.down = nn.ModuleList([nn.Sequential(nn.Conv2d(1, dims[0], cfg.stem_stride, stride=cfg.stem_stride),
                                                 LayerNorm2d(dims[0], eps=1e-6))])
        for i in range(1, len(dims)):
            self.down.append(nn.Sequential(LayerNorm2d(dims[i - 1], eps=1e-6), nn.Conv2d(dims[i - 1], dims[i], 2, 2)))
        self.stages = nn.ModuleList([nn.Sequential(*[ConvNeXtBlock(d) for _ in range(n)])
                                     for d, n in zip(dims, depths, strict=True)])

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = []
        for down, stage in zip(self.down, self.stages, strict=True):
            x = stage(down(x))
            feats.append(x)
        return feats


class MappingNetwork2D(nn.Module):
    """X-ray → lifted features per 3D encoder level: ``{k: B×C_k×s_k×s_k×s_k}`` in the volume frame."""

    def __init__(self, cfg: SXR2CTModelConfig):
        super().__init__()
        self.eps = cfg.likelihood_eps
        self.convnext = ConvNeXt2D(cfg)
        self.sides = cfg.level_sides
        self.stage_of = {cfg.level_sides.index(s): i for i, s in enumerate(cfg.stage_sides)}  # level → stage
        self.lift = nn.ModuleList()
        for k, c in enumerate(cfg.encoder_channels):
            cin = 1 + (cfg.convnext_dims[self.stage_of[k]] if k in self.stage_of else 0)
            self.lift.append(nn.Sequential(nn.Conv2d(cin, c, 1), nn.InstanceNorm2d(c), nn.ReLU(inplace=True)))

    def forward(self, x: Tensor) -> list[Tensor]:
        lik = likelihood_image(x, self.eps)
        feats = self.convnext(x)
        out = []
        for k, side in enumerate(self.sides):
            maps = [F.adaptive_avg_pool2d(lik, side)]  # area downsampling (S is a multiple of side)
            if k in self.stage_of:
                maps.append(feats[self.stage_of[k]])
            h = self.lift[k](torch.cat(maps, dim=1))  # B×C×R×K (row = z, col = x, as read)
            out.append(branch_to_volume(expand_to_branch(h, side), "pa"))  # repeat along the beam → B×C×X×Y×Z
        return out


# --- 3D ----------------------------------------------------------------------------------------


class SwinAttention3D(nn.Module):
    """Swin UNETR's stage without downsampling: ``depth`` blocks of (shifted-)window multi-head
    self-attention with relative position bias and an MLP, on ``B×C×X×Y×Z`` (same shape out)."""

    def __init__(self, dim: int, depth: int, head_dim: int, window: int):
        super().__init__()
        from monai.networks.nets.swin_unetr import (
            BasicLayer,  # imported here: MONAI's import is slow
        )

        self.layer = BasicLayer(dim=dim, depth=depth, num_heads=max(1, dim // head_dim), window_size=(window,) * 3,
                                drop_path=[0.0] * depth, qkv_bias=True, downsample=None)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class SXR2CTGenerator(Pretrained):
    """S-XR2CT's generator: ``forward(pa) → B×1×N×N×N`` (RAS+, ``cfg.value_range``).

    ``pa`` is ``B×1×xray_size×xray_size`` in [0, 1]; bad input (another view, wrong shape)
    raises :class:`~patching.errors.InputError`. ``template`` is the template CT parameter
    (in the state dict: checkpoints, exports and ``save_pretrained`` carry it).
    """

    config_class = SXR2CTModelConfig

    def __init__(self, cfg: SXR2CTModelConfig):
        super().__init__()
        cfg = self.cfg = self.init_config(cfg)
        ch = cfg.encoder_channels
        n, top = cfg.volume_size, len(ch) - 1
        self.mapping = MappingNetwork2D(cfg)
        self.template = nn.Parameter(torch.zeros(1, 1, n, n, n), requires_grad=cfg.template_trainable)
        self.down = nn.ModuleList([nn.Identity()] + [
            nn.Sequential(nn.Conv3d(ch[k - 1], ch[k], 3, stride=2, padding=1), nn.InstanceNorm3d(ch[k]),
                          nn.ReLU(inplace=True)) for k in range(1, top + 1)])
        self.encoder = nn.ModuleList([
            nn.Sequential(*conv3d_block((0 if k == 0 else ch[k]) + 1 + ch[k], ch[k]), *conv3d_block(ch[k], ch[k]))
            for k in range(top + 1)])
        self.up = nn.ModuleList([nn.Sequential(*up3d_block(ch[k + 1], ch[k])) for k in range(top)])
        self.decoder = nn.ModuleList([nn.Sequential(*conv3d_block(2 * ch[k], ch[k]), *conv3d_block(ch[k], ch[k]))
                                      for k in range(top)])
        side = cfg.level_sides[top - 1]
        self.attention = SwinAttention3D(ch[top - 1], cfg.attention_depth, cfg.attention_head_dim,
                                         min(cfg.attention_window, side)) if cfg.attention_depth else nn.Identity()
        self.head = nn.Sequential(nn.Conv3d(ch[0], 1, 1), output_activation(cfg.output_activation))
        init_weights(self, cfg.init_std)

    @torch.no_grad()
    def set_template(self, volume: Tensor) -> None:
        """Set the template CT to ``volume`` (``N³``, ``1×N³`` or ``1×1×N³``, in the model's value range)."""
        n = self.cfg.volume_size
        vol = volume.reshape(1, 1, *volume.shape[-3:]) if volume.dim() >= 3 else volume
        check_volume(vol, n, "template")
        if not torch.isfinite(vol).all():
            raise InputError("template", "the template CT has non-finite values")
        self.template.copy_(vol.to(self.template.dtype))

    def forward(self, pa: Tensor | None = None, lateral: Tensor | None = None) -> Tensor:
        if lateral is not None:
            raise InputError("lateral", "S-XR2CT takes one frontal (PA) X-ray, no lateral view")
        (x,) = check_xrays(pa, None, self.cfg.views, self.cfg.xray_size)
        lifted = self.mapping(x)  # per level: B×C_k×s³
        b, skips, h = x.shape[0], [], None
        for k, (down, enc) in enumerate(zip(self.down, self.encoder, strict=True)):
            template = F.avg_pool3d(self.template, 2**k) if k else self.template  # 1×1×s³
            parts = [template.expand(b, -1, -1, -1, -1).to(lifted[k].dtype), lifted[k]]
            h = enc(torch.cat(parts if k == 0 else [down(h), *parts], dim=1))
            skips.append(h)
        for k in range(len(self.decoder) - 1, -1, -1):  # coarse → fine
            h = self.decoder[k](torch.cat([self.up[k](h), skips[k]], dim=1))
            if k == len(self.decoder) - 1:
                h = self.attention(h)  # Swin attention after the first decoder level
        return self.head(h)


def build(cfg: SXR2CTModelConfig) -> tuple[SXR2CTGenerator, PatchDiscriminator3D]:
    """The generator and X2CT-GAN's conditional 3D PatchGAN, initialised N(0, ``init_std``)."""
    return SXR2CTGenerator(cfg), PatchDiscriminator3D(cfg)
