"""X-Recon networks (Wang et al., arXiv 2407.15356): twin encoder–decoders with multi-scale
fusion rendering, and a coordinate-augmented 3D PatchGAN.

X-Recon's released code is a fork of X2CT-GAN's, and its generator keeps X2CT-GAN's blocks: a
PA and a lateral branch (2D DenseNet encoder, connection A into a 3D grid, connection-B skips,
the branch's own 3D decoder), fused at **every** decoder level by permuting both into the
volume frame ``[x, y, z]`` and averaging (the fused features go back into both branches and
into a fusion decoder). What X-Recon adds is the *multi-scale fusion rendering* (MFusionRend):
at each level below the coarsest, a 1×1×1 head turns ``concat(fused, fusion-decoder state)``
into a CT at that scale; the renders are merged coarse to fine as
``out ← (upsample×2(out) + render_k) / 2`` (the first one halved as well), so the finest level
weighs ½, the next ¼, and so on. Output ``B×1×X×Y×Z`` in RAS+, values in [0, 1] (LeakyReLU).

The discriminator is X2CT-GAN's conditional 3D PatchGAN with normalised ``x, y, z`` coordinate
channels appended to its input, i.e. a CoordConv first layer (Liu et al. 2018), so it can tell
where in the chest a patch is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import repeat
from torch import Tensor, nn

from patching.artifacts.pretrained import Pretrained

from ..common import check_xrays, init_weights, volume_to_branch
from ..x2ct_gan.model import (
    PatchDiscriminator3D,
    ViewBranch,
    connection_c,
    conv3d_block,
    output_activation,
    up3d_block,
)
from .config import XReconModelConfig


class XReconGenerator(Pretrained):
    """X-Recon's generator: ``forward(pa, lateral) → B×1×X×Y×Z`` (cubic, RAS+, [0, 1]).

    Both X-rays are required, ``B×1×xray_size×xray_size`` in [0, 1]; bad input raises
    :class:`~patching.errors.InputError`.
    """

    config_class = XReconModelConfig

    def __init__(self, cfg: XReconModelConfig):
        super().__init__()
        cfg = self.cfg = self.init_config(cfg)
        chans = cfg.decoder_channels
        self.top = len(chans) - 1
        self.branches = nn.ModuleDict({v: ViewBranch(cfg, with_final=False) for v in cfg.views})
        self.fusion = nn.ModuleDict()  # fusion decoder levels J..1 (level 0 only renders)
        self.render = nn.ModuleDict()  # MFusionRend heads, levels J-1..0
        for k in range(self.top, 0, -1):
            layers = [] if k == self.top else conv3d_block(2 * chans[k], chans[k])  # concat(fused, main)
            for _ in range(cfg.num_fusion_convs[k]):
                layers += conv3d_block(chans[k], chans[k])
            self.fusion[str(k)] = nn.Sequential(*layers, *up3d_block(chans[k], chans[k - 1]))
        for k in range(self.top - 1, -1, -1):
            self.render[str(k)] = nn.Sequential(nn.Conv3d(2 * chans[k], 1, 1), output_activation(cfg.output_activation))
        self.out_activation = output_activation(cfg.output_activation)
        init_weights(self, cfg.init_std)

    def forward(self, pa: Tensor | None = None, lateral: Tensor | None = None) -> Tensor:
        return self.forward_scales(pa, lateral)[0]

    def forward_scales(self, pa: Tensor | None = None, lateral: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        """The output and the per-level renders (coarse to fine, each ``B×1×s×s×s``)."""
        views = self.cfg.views
        xrays = check_xrays(pa, lateral, views, self.cfg.xray_size)
        encoded = {v: self.branches[v].encode(x) for v, x in zip(views, xrays, strict=True)}
        hs = {v: encoded[v][0] for v in views}
        main, out, renders = None, None, []
        for k in range(self.top, -1, -1):
            if k < self.top:
                hs = {v: self.branches[v].compress[str(k)](torch.cat([hs[v], encoded[v][1][k]], dim=1)) for v in views}
            fused = connection_c(hs)  # B×C×X×Y×Z
            hs = {v: volume_to_branch(fused, v) for v in views}
            joint = fused if main is None else torch.cat([fused, main], dim=1)  # B×2C×X×Y×Z below the top
            if k < self.top:  # multi-scale fusion rendering
                render = self.render[str(k)](joint)
                renders.append(render)
                out = render / 2 if out is None else (_up2(out) + render) / 2
            if k > 0:
                main = self.fusion[str(k)](joint)
                hs = {v: self.branches[v].stage[str(k)](hs[v]) for v in views}
        return self.out_activation(out), renders


def _up2(t: Tensor) -> Tensor:
    return F.interpolate(t, scale_factor=2, mode="trilinear", align_corners=False)


def coordinate_channels(volume: Tensor) -> Tensor:
    """Normalised voxel coordinates ``B×3×X×Y×Z``: channels x, y, z, each linear in [-1, 1]."""
    b, _, nx, ny, nz = volume.shape
    kw = {"device": volume.device, "dtype": volume.dtype}
    x = repeat(torch.linspace(-1, 1, nx, **kw), "x -> b 1 x y z", b=b, y=ny, z=nz)
    y = repeat(torch.linspace(-1, 1, ny, **kw), "y -> b 1 x y z", b=b, x=nx, z=nz)
    z = repeat(torch.linspace(-1, 1, nz, **kw), "z -> b 1 x y z", b=b, x=nx, y=ny)
    return torch.cat([x, y, z], dim=1)


class CoordPatchDiscriminator3D(PatchDiscriminator3D):
    """X-Recon's discriminator: the conditional 3D PatchGAN with x, y, z channels on its input."""

    def __init__(self, cfg: XReconModelConfig):
        super().__init__(cfg, coord_channels=3)

    def forward(self, volume: Tensor, cond: Tensor | None = None) -> Tensor:
        h = self.inputs(volume, cond)
        return self.model(torch.cat([h, coordinate_channels(h)], dim=1))  # B×(1+V+3)×X×Y×Z


def build(cfg: XReconModelConfig) -> tuple[XReconGenerator, CoordPatchDiscriminator3D]:
    """The generator and discriminator of ``cfg``, initialised as in the paper's code."""
    return XReconGenerator(cfg), CoordPatchDiscriminator3D(cfg)
