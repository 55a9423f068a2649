"""X-Recon configuration (Wang et al., arXiv 2407.15356): typed sections and presets.

The paper gives the architecture in words (twin encoder–decoders, multi-scale fusion rendering,
3D CoordConv discriminator, multi-angle projection loss, 224³ output); the numbers below come
from the authors' released configuration ``experiment/multiview/ptx_multiview.yml`` and model
code (wangyunpengbio/X-Recon, a fork of X2CT-GAN's code): 224² X-rays → 224³ CT in [0, 1],
DenseNet encoder blocks (4, 8, 16, 8, 4), growth 32, decoder widths (16, 16, 32, 64, 128, 256),
InstanceNorm, LeakyReLU output, conditional 3D PatchGAN with coordinate channels, LSGAN;
losses MSE ×10, projection L1 ×0.1 (PA, lateral, axial, under a random pose), adversarial ×1;
Adam 5e-5, β (0.5, 0.99), 100 epochs constant then 100 of linear decay, batch size 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..x2ct_gan.config import GANOptimConfig, X2CTGANLossConfig, X2CTGANModelConfig, require


@dataclass
class XReconModelConfig(X2CTGANModelConfig):
    """X-Recon's generator and discriminator (``model.*``); fields as in X2CT-GAN's config.

    X-Recon is always biplanar. Differences from X2CT-GAN: smaller dense blocks, LeakyReLU
    output, and the fusion decoder *renders* a CT at every level below the coarsest (1×1×1
    conv heads, upsampled and averaged, finest last) instead of one 7×7×7 head; level 0 has no
    fusion convs (``num_fusion_convs[0]`` must be 0 — the released code computes them and
    discards the result). The discriminator appends normalised ``x, y, z`` coordinate channels
    to its input (CoordConv in its first layer).
    """

    views: tuple[str, ...] = ("pa", "lateral")
    xray_size: int = 224
    volume_size: int = 224
    num_dense_layers: tuple[int, ...] = (4, 8, 16, 8, 4)
    num_fusion_convs: tuple[int, ...] = (0, 1, 1, 1, 1, 0)
    output_activation: str = "leaky_relu"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.biplanar, "model", "views", self.views, "X-Recon takes both views: ('pa', 'lateral')")
        require(self.num_fusion_convs[0] == 0, "model", "num_fusion_convs", self.num_fusion_convs,
              "entry 0 must be 0: X-Recon renders level 0 straight from the fused features")


@dataclass
class XReconLossConfig(X2CTGANLossConfig):
    """Generator loss weights and the projection jitter (``loss.*``).

    Args:
        recon_weight: voxel-wise MSE ("L2 reconstruction") weight.
        proj_weight: multi-angle projection L1 weight.
        adv_weight: LSGAN generator weight.
        proj_views: projections compared, from ``pa``, ``lateral``, ``axial``.
        jitter_deg: std of the random rotation (degrees, about each axis) applied to both the
            output and the target before projecting — the released code's ProST poses draw
            N(0, 10°) rotations per step. 0 projects along the canonical axes only.
        jitter_shift: std of the random translation, as a fraction of the volume side (the
            code's N(0, 8) voxels on a 224 grid ≈ 0.036).
    """

    recon_weight: float = 10.0
    proj_weight: float = 0.1
    adv_weight: float = 1.0
    proj_views: tuple[str, ...] = ("pa", "lateral", "axial")
    jitter_deg: float = 10.0
    jitter_shift: float = 8.0 / 224.0

    def __post_init__(self) -> None:
        super().__post_init__()
        require(math.isfinite(self.jitter_deg) and self.jitter_deg >= 0, "loss", "jitter_deg", self.jitter_deg,
              "must be a finite number >= 0")
        require(math.isfinite(self.jitter_shift) and 0 <= self.jitter_shift < 0.5, "loss", "jitter_shift",
              self.jitter_shift, "must be in [0, 0.5)")


@dataclass
class XReconConfig:
    """Everything X-Recon needs: ``model``, ``loss`` and ``optim`` sections."""

    model: XReconModelConfig = field(default_factory=XReconModelConfig)
    loss: XReconLossConfig = field(default_factory=XReconLossConfig)
    optim: GANOptimConfig = field(default_factory=lambda: GANOptimConfig(lr=5e-5))


def paper() -> XReconConfig:
    """The paper's model: 224² X-rays → 224³ (the largest size the paper and code state)."""
    return XReconConfig()


def cpu_demo() -> XReconConfig:
    """A tiny model for CPU demos and tests: 64² X-rays → 32³, a few channels; paper losses."""
    model = XReconModelConfig(
        xray_size=64, volume_size=32, stem_channels=16, growth_rate=8,
        num_dense_layers=(2, 2, 2, 2),  # 64 → 4: connection A starts at 4³
        decoder_channels=(8, 8, 16, 32),  # levels 32, 16, 8, 4
        num_branch_convs=(1, 1, 1, 0), num_fusion_convs=(0, 1, 1, 0),
        d_channels=8, num_d_layers=2,
    )
    return XReconConfig(model=model)
