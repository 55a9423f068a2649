"""S-XR2CT configuration (Hor, Yang, Kim, KICS winter conference 2025): typed sections, presets.

The paper gives: one frontal X-ray ``X ∈ R^{1×128×128}`` → CT ``Y ∈ R^{1×128×128×128}``; a 2D
mapping network (likelihood image from the X-ray's mean and std, multi-scale ConvNeXt features,
the downsampled likelihood image concatenated with them); a 3D encoder with a template CT held
as a module parameter, concatenated at each layer; a 3D decoder with Swin UNETR self-attention
after its first layer; X2CT-GAN's conditional discriminator; losses λ1 = 0.1 adversarial,
λ2 = 10 reconstruction and projection, λ3 = 1 perceptual. Everything else (widths, depths,
window size, optimiser, schedule, perceptual network) is left open; our choices are below and
in docs/gan_baselines.md ("S-XR2CT").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..common import is_power_of_two
from ..x2ct_gan.config import OUTPUT_ACTIVATIONS, GANOptimConfig, X2CTGANLossConfig, require


@dataclass
class SXR2CTModelConfig:
    """Generator and discriminator shapes (``model.*``).

    Args:
        views: always ``("pa",)``: S-XR2CT takes one frontal X-ray.
        xray_size: input X-rays are ``B×1×xray_size×xray_size``.
        volume_size: the output is ``B×1×volume_size³``; ``≤ xray_size``.
        likelihood_eps: floor of the X-ray's variance in the likelihood image (a constant image
            has σ = 0).
        stem_stride: the ConvNeXt stem's patchify kernel and stride (4 in ConvNeXt).
        convnext_dims, convnext_depths: width and number of ConvNeXt blocks per 2D stage; stage
            ``i`` has side ``xray_size / stem_stride / 2**i``. Each stage's side must be the side
            of a 3D encoder level (its features are lifted there).
        encoder_channels: 3D widths from the finest level (``volume_size``) to the deepest
            (``volume_size / 2**(len - 1)``); the decoder mirrors them.
        template_trainable: the template CT is an ``nn.Parameter``; ``False`` freezes it
            (``requires_grad=False``, still saved with the weights).
        attention_window: side of the Swin attention windows (clipped to the level's side).
        attention_head_dim: channels per attention head.
        attention_depth: Swin blocks after the first decoder level (alternating regular and
            shifted windows, as in Swin UNETR's stages).
        output_activation, value_range: as X2CT-GAN (``relu``, ``(0, 1)``).
        d_channels, num_d_layers, conditional_d: X2CT-GAN's 3D PatchGAN (conditional on the PA
            X-ray expanded along its beam).
        init_std: std of the N(0, std) initialisation of convolutions and linear layers.
    """

    views: tuple[str, ...] = ("pa",)
    xray_size: int = 128
    volume_size: int = 128
    likelihood_eps: float = 1e-6
    stem_stride: int = 4
    convnext_dims: tuple[int, ...] = (96, 192, 384, 768)  # ConvNeXt-T
    convnext_depths: tuple[int, ...] = (3, 3, 9, 3)
    encoder_channels: tuple[int, ...] = (16, 32, 64, 128, 256, 256)  # sides 128 … 4
    template_trainable: bool = True
    attention_window: int = 4
    attention_head_dim: int = 32
    attention_depth: int = 2
    output_activation: str = "relu"
    value_range: tuple[float, float] = (0.0, 1.0)
    d_channels: int = 64
    num_d_layers: int = 3
    conditional_d: bool = True
    init_std: float = 0.02

    def __post_init__(self) -> None:
        s = "model"
        self.views = tuple(self.views)
        self.convnext_dims = tuple(self.convnext_dims)
        self.convnext_depths = tuple(self.convnext_depths)
        self.encoder_channels = tuple(self.encoder_channels)
        self.value_range = tuple(self.value_range)
        require(self.views == ("pa",), s, "views", self.views, "S-XR2CT takes one frontal X-ray: ('pa',)")
        require(is_power_of_two(self.volume_size) and self.volume_size >= 2, s, "volume_size", self.volume_size,
                "must be a power of two >= 2")
        require(self.xray_size >= self.volume_size and self.xray_size % self.volume_size == 0
                and is_power_of_two(self.xray_size // self.volume_size), s, "xray_size", self.xray_size,
                f"must be volume_size ({self.volume_size}) times a power of two")
        require(math.isfinite(self.likelihood_eps) and self.likelihood_eps > 0, s, "likelihood_eps",
                self.likelihood_eps, "must be a finite number > 0")
        levels = len(self.encoder_channels)
        require(levels >= 2 and all(c >= 1 for c in self.encoder_channels), s, "encoder_channels",
                self.encoder_channels, "needs >= 2 levels, each >= 1 channel")
        require(self.volume_size % 2 ** (levels - 1) == 0, s, "encoder_channels", self.encoder_channels,
                f"{levels} levels halve volume_size {self.volume_size} below one voxel")
        require(len(self.convnext_dims) == len(self.convnext_depths) >= 1, s, "convnext_depths",
                self.convnext_depths, "needs one entry per convnext_dims entry")
        require(all(c >= 1 for c in self.convnext_dims + self.convnext_depths), s, "convnext_dims",
                (self.convnext_dims, self.convnext_depths), "widths and depths must be >= 1")
        stages = len(self.convnext_dims)
        require(self.stem_stride >= 1 and self.xray_size % (self.stem_stride * 2 ** (stages - 1)) == 0, s,
                "stem_stride", self.stem_stride,
                f"xray_size {self.xray_size} must be divisible by stem_stride·2**{stages - 1}")
        sides = self.level_sides
        for i, side in enumerate(self.stage_sides):
            require(side in sides, s, "convnext_dims", self.convnext_dims,
                    f"ConvNeXt stage {i} has side {side}, which is no 3D level's side {sides}")
        require(self.attention_window >= 1 and self.attention_head_dim >= 1 and self.attention_depth >= 0, s,
                "attention_window", (self.attention_window, self.attention_head_dim, self.attention_depth),
                "window and head_dim must be >= 1, depth >= 0")
        require(self.output_activation in OUTPUT_ACTIVATIONS, s, "output_activation", self.output_activation,
                f"must be one of {', '.join(OUTPUT_ACTIVATIONS)}")
        require(len(self.value_range) == 2 and self.value_range[0] < self.value_range[1], s, "value_range",
                self.value_range, "must be (low, high) with low < high")
        require(self.d_channels >= 1 and self.num_d_layers >= 1, s, "d_channels", (self.d_channels, self.num_d_layers),
                "d_channels and num_d_layers must be >= 1")
        require(self.init_std > 0, s, "init_std", self.init_std, "must be > 0")

    @property
    def biplanar(self) -> bool:
        return False

    @property
    def level_sides(self) -> tuple[int, ...]:
        """Sides of the 3D encoder levels, finest first."""
        return tuple(self.volume_size // 2**k for k in range(len(self.encoder_channels)))

    @property
    def stage_sides(self) -> tuple[int, ...]:
        """Sides of the ConvNeXt stages' feature maps, finest first."""
        first = self.xray_size // self.stem_stride
        return tuple(first // 2**i for i in range(len(self.convnext_dims)))


@dataclass
class SXR2CTLossConfig(X2CTGANLossConfig):
    """Generator loss weights (``loss.*``): the paper's λ1 = 0.1 (adversarial), λ2 = 10
    (reconstruction and projection), λ3 = 1 (perceptual).

    Args:
        recon_weight, proj_weight, adv_weight, proj_views: as X2CT-GAN (MSE, projection L1 over
            PA, lateral and axial, LSGAN).
        perceptual_weight: λ3, weight of the 2.5D perceptual loss
            (``stage1_vqgan.losses.PerceptualLoss25D``); > 0 needs ``perceptual_weights``.
        perceptual_weights: a local safetensors file of the 2D slice feature network
            (``stage1_vqgan.losses.SliceFeatureNet`` layout, e.g. VGG16's first blocks converted).
            Nothing is downloaded.
        perceptual_slices: slices per axis fed to the feature network each step (random, from
            the engine's per-rank generator).
    """

    recon_weight: float = 10.0
    proj_weight: float = 10.0
    adv_weight: float = 0.1
    perceptual_weight: float = 1.0
    perceptual_weights: str | None = None
    perceptual_slices: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        require(math.isfinite(self.perceptual_weight) and self.perceptual_weight >= 0, "loss", "perceptual_weight",
                self.perceptual_weight, "must be a finite number >= 0")
        require(isinstance(self.perceptual_slices, int) and self.perceptual_slices >= 1, "loss", "perceptual_slices",
                self.perceptual_slices, "must be a positive integer")
        if self.perceptual_weights == "":
            self.perceptual_weights = None

    def require_perceptual_file(self) -> None:
        """Training needs the feature network when λ3 > 0 (checked when the task builds, not here:
        the presets keep the paper's λ3 = 1 and the file comes with ``--set``)."""
        require(self.perceptual_weight == 0 or self.perceptual_weights is not None, "loss", "perceptual_weights",
                self.perceptual_weights,
                f"perceptual_weight is {self.perceptual_weight:g} (the paper's λ3) but no local feature-network file "
                "is given: set loss.perceptual_weights=PATH (a safetensors SliceFeatureNet, see docs/gan_baselines.md) "
                "or loss.perceptual_weight=0")


@dataclass
class SXR2CTConfig:
    """Everything S-XR2CT needs: ``model``, ``loss`` and ``optim`` sections."""

    model: SXR2CTModelConfig = field(default_factory=SXR2CTModelConfig)
    loss: SXR2CTLossConfig = field(default_factory=SXR2CTLossConfig)
    optim: GANOptimConfig = field(default_factory=GANOptimConfig)  # X2CT-GAN's: Adam 2e-4, β (0.5, 0.99)


def paper() -> SXR2CTConfig:
    """The paper's setting: 128² X-ray → 128³; ConvNeXt-T 2D stages; λ = (0.1, 10, 1)."""
    return SXR2CTConfig()


def cpu_demo() -> SXR2CTConfig:
    """A tiny model for CPU demos and tests: 64² X-ray → 32³ (the size of X2CT-GAN's ``cpu_demo``)."""
    model = SXR2CTModelConfig(
        xray_size=64, volume_size=32, convnext_dims=(16, 32, 64), convnext_depths=(1, 1, 1),  # sides 16, 8, 4
        encoder_channels=(8, 16, 32, 32),  # sides 32, 16, 8, 4
        attention_head_dim=16, d_channels=8, num_d_layers=2)
    return SXR2CTConfig(model=model)
