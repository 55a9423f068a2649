"""X2CT-GAN configuration: typed sections checked at construction, presets as functions.

Defaults are the paper's (Ying et al., CVPR 2019) as released in kylekma/X2CT
(``3DGAN/experiment/multiview2500/d2_multiview2500.yml`` and
``lib/model/nets/generator/dense_generator_multiview.py``): 128² X-rays → 128³ CT in [0, 1],
DenseNet encoder blocks (6, 12, 24, 16, 6) with growth 32, decoder widths
(16, 16, 32, 64, 128, 256), InstanceNorm, 3D PatchGAN (64 filters, 3 layers, conditional on
the X-rays), LSGAN; losses MSE ×10, projection L1 ×10, adversarial ×0.1; Adam 2e-4,
β (0.5, 0.99), 50 epochs constant then 50 epochs of linear decay.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from patching.errors import InputError

from ..common import PROJECTION_VIEWS, XRAY_VIEWS, is_power_of_two

OUTPUT_ACTIVATIONS = ("relu", "leaky_relu", "sigmoid", "tanh", "identity")


def require(ok: bool, section: str, key: str, value, what: str) -> None:
    if not ok:
        raise InputError(f"{section}.{key}", f"{what}, got {value!r}")


@dataclass
class X2CTGANModelConfig:
    """Generator and discriminator shapes (``model.*``).

    Args:
        views: ``("pa", "lateral")`` for the biplanar model (two encoder–decoder branches
            fused by connection C), ``("pa",)`` or ``("lateral",)`` for a single-view model.
        xray_size: input X-rays are ``B×1×xray_size×xray_size``.
        volume_size: the output is ``B×1×volume_size³`` (cubic, as in the paper). Must be
            ``≤ xray_size`` and the decoder's start size times a power of two.
        stem_channels: width of the 7×7 stem of each 2D encoder.
        growth_rate: DenseNet growth rate (new channels per dense layer).
        bottleneck_factor: DenseNet bottleneck: the 1×1 conv of a dense layer has
            ``bottleneck_factor·growth_rate`` channels.
        num_dense_layers: dense layers per encoder level; its length ``L`` is the number of
            stride-2 downsamplings, so the decoder starts at ``xray_size / 2**L`` (connection A).
        decoder_channels: 3D widths from the finest (``volume_size``) to the coarsest (the
            connection-A start size) level; one entry per level.
        num_branch_convs: extra 3×3×3 convs per level in each view branch's decoder.
        num_fusion_convs: extra 3×3×3 convs per level in the fusion decoder (biplanar only).
        fc_dropout: dropout after connection A's fully connected layer (0.5 in the code).
        output_activation: last activation; ``relu`` in the paper (targets in [0, 1]).
        value_range: the range the model's volumes live in; ``(0, 1)`` in the paper.
        d_channels: filters of the first discriminator layer.
        num_d_layers: stride-2 layers of the 3D PatchGAN (3 in the paper).
        conditional_d: the discriminator also sees the X-rays, each expanded along its beam
            into the volume frame (the paper's conditional D).
        init_std: std of the N(0, std) weight initialisation.
    """

    views: tuple[str, ...] = ("pa", "lateral")
    xray_size: int = 128
    volume_size: int = 128
    stem_channels: int = 64
    growth_rate: int = 32
    bottleneck_factor: int = 4
    num_dense_layers: tuple[int, ...] = (6, 12, 24, 16, 6)
    decoder_channels: tuple[int, ...] = (16, 16, 32, 64, 128, 256)
    num_branch_convs: tuple[int, ...] = (1, 2, 2, 2, 2, 0)
    num_fusion_convs: tuple[int, ...] = (1, 1, 1, 1, 1, 0)
    fc_dropout: float = 0.5
    output_activation: str = "relu"
    value_range: tuple[float, float] = (0.0, 1.0)
    d_channels: int = 64
    num_d_layers: int = 3
    conditional_d: bool = True
    init_std: float = 0.02

    def __post_init__(self) -> None:
        self.views = tuple(self.views)
        self.num_dense_layers = tuple(self.num_dense_layers)
        self.decoder_channels = tuple(self.decoder_channels)
        self.num_branch_convs = tuple(self.num_branch_convs)
        self.num_fusion_convs = tuple(self.num_fusion_convs)
        self.value_range = tuple(self.value_range)
        check_generator_shape(self, "model")
        s = "model"
        require(self.stem_channels >= 1 and self.growth_rate >= 1 and self.bottleneck_factor >= 1,
              s, "growth_rate", (self.stem_channels, self.growth_rate, self.bottleneck_factor),
              "stem_channels, growth_rate and bottleneck_factor must be >= 1")
        require(0.0 <= self.fc_dropout < 1.0, s, "fc_dropout", self.fc_dropout, "must be in [0, 1)")
        require(self.output_activation in OUTPUT_ACTIVATIONS, s, "output_activation", self.output_activation,
              f"must be one of {', '.join(OUTPUT_ACTIVATIONS)}")
        require(len(self.value_range) == 2 and self.value_range[0] < self.value_range[1], s, "value_range",
              self.value_range, "must be (low, high) with low < high")
        require(self.d_channels >= 1, s, "d_channels", self.d_channels, "must be >= 1")
        require(self.num_d_layers >= 1, s, "num_d_layers", self.num_d_layers, "must be >= 1")
        require(self.init_std > 0, s, "init_std", self.init_std, "must be > 0")

    @property
    def biplanar(self) -> bool:
        return len(self.views) == 2

    @property
    def start_size(self) -> int:
        """Side of connection A's 3D grid: ``xray_size / 2**len(num_dense_layers)``."""
        return self.xray_size // 2 ** len(self.num_dense_layers)


def check_generator_shape(cfg, section: str) -> None:
    """Shape rules shared by X2CT-GAN and X-Recon (X-Recon's generator is X2CT-GAN's, extended)."""
    views = cfg.views
    require(len(views) in (1, 2) and len(set(views)) == len(views) and all(v in XRAY_VIEWS for v in views),
          section, "views", views, "must be ('pa', 'lateral'), ('pa',) or ('lateral',)")
    if len(views) == 2:
        require(views == XRAY_VIEWS, section, "views", views, "a biplanar model takes ('pa', 'lateral') in that order")
    num_down = len(cfg.num_dense_layers)
    require(num_down >= 1 and all(n >= 1 for n in cfg.num_dense_layers), section, "num_dense_layers",
          cfg.num_dense_layers, "needs at least one level, each with >= 1 dense layer")
    require(cfg.xray_size >= 1 and cfg.xray_size % 2 ** num_down == 0 and cfg.xray_size >= 2 ** num_down,
          section, "xray_size", cfg.xray_size, f"must be a positive multiple of 2**{num_down} (one per encoder level)")
    start = cfg.xray_size // 2 ** num_down
    ratio = cfg.volume_size / start
    require(cfg.volume_size > start and is_power_of_two(int(ratio)) and ratio == int(ratio), section,
          "volume_size", cfg.volume_size,
          f"must be the decoder start size {start} (xray_size / 2**{num_down}) times a power of two >= 2")
    require(cfg.volume_size <= cfg.xray_size, section, "volume_size", cfg.volume_size,
          f"must be <= xray_size ({cfg.xray_size}): every decoder level needs an encoder level of its size")
    num_levels = int(math.log2(ratio)) + 1
    for key in ("decoder_channels", "num_branch_convs", "num_fusion_convs"):
        value = getattr(cfg, key)
        require(len(value) == num_levels, section, key, value,
              f"needs {num_levels} entries (levels {cfg.volume_size} down to {start})")
    require(all(c >= 1 for c in cfg.decoder_channels), section, "decoder_channels", cfg.decoder_channels, "must be >= 1")
    require(all(n >= 0 for n in cfg.num_branch_convs + cfg.num_fusion_convs), section, "num_branch_convs",
          (cfg.num_branch_convs, cfg.num_fusion_convs), "conv counts must be >= 0")


@dataclass
class X2CTGANLossConfig:
    """Generator loss weights (``loss.*``): MSE ×10, projection L1 ×10, LSGAN ×0.1 in the paper.

    Args:
        recon_weight: weight of the voxel-wise MSE to the ground-truth CT.
        proj_weight: weight of the L1 between parallel projections of the output and of the
            ground-truth CT, averaged over ``proj_views`` (the paper's three orthogonal axes).
        adv_weight: weight of the LSGAN generator term.
        proj_views: projection views, from ``pa``, ``lateral``, ``axial``.
    """

    recon_weight: float = 10.0
    proj_weight: float = 10.0
    adv_weight: float = 0.1
    proj_views: tuple[str, ...] = ("pa", "lateral", "axial")

    def __post_init__(self) -> None:
        self.proj_views = tuple(self.proj_views)
        for key in ("recon_weight", "proj_weight", "adv_weight"):
            value = getattr(self, key)
            require(math.isfinite(value) and value >= 0, "loss", key, value, "must be a finite number >= 0")
        require(all(v in PROJECTION_VIEWS for v in self.proj_views) and len(set(self.proj_views)) == len(self.proj_views),
              "loss", "proj_views", self.proj_views, f"must be distinct views from {', '.join(PROJECTION_VIEWS)}")
        require(bool(self.proj_views) or self.proj_weight == 0, "loss", "proj_views", self.proj_views,
              "must not be empty while proj_weight > 0")


@dataclass
class GANOptimConfig:
    """The papers' optimiser (``optim.*``): Adam for G and D, linear decay in the second half.

    Args:
        lr: learning rate of both optimisers.
        betas: Adam betas.
        decay_start: fraction of the run after which the rate decays linearly to 0.
    """

    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.99)
    decay_start: float = 0.5

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        require(math.isfinite(self.lr) and self.lr > 0, "optim", "lr", self.lr, "must be a positive number")
        require(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas), "optim", "betas", self.betas,
              "must be two numbers in [0, 1)")
        require(0.0 <= self.decay_start <= 1.0, "optim", "decay_start", self.decay_start, "must be in [0, 1]")


@dataclass
class X2CTGANConfig:
    """Everything X2CT-GAN needs: ``model``, ``loss`` and ``optim`` sections."""

    model: X2CTGANModelConfig = field(default_factory=X2CTGANModelConfig)
    loss: X2CTGANLossConfig = field(default_factory=X2CTGANLossConfig)
    optim: GANOptimConfig = field(default_factory=GANOptimConfig)


def paper(biplanar: bool = True) -> X2CTGANConfig:
    """The paper's model: 128² X-rays → 128³, the released channel widths and loss weights."""
    views = ("pa", "lateral") if biplanar else ("pa",)
    return X2CTGANConfig(model=X2CTGANModelConfig(views=views))


def cpu_demo(biplanar: bool = True) -> X2CTGANConfig:
    """A tiny model for CPU demos and tests: 64² X-rays → 32³, a few channels; paper losses."""
    views = ("pa", "lateral") if biplanar else ("pa",)
    model = X2CTGANModelConfig(
        views=views, xray_size=64, volume_size=32, stem_channels=16, growth_rate=8,
        num_dense_layers=(2, 2, 2, 2),  # 64 → 4: connection A starts at 4³
        decoder_channels=(8, 8, 16, 32),  # levels 32, 16, 8, 4
        num_branch_convs=(1, 1, 1, 0), num_fusion_convs=(1, 1, 1, 0),
        d_channels=8, num_d_layers=2,
    )
    return X2CTGANConfig(model=model)
