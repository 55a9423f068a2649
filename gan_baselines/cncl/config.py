"""CNCL configuration (content–noise complementary learning for low-dose CT denoising).

The seed (a re-implementation of Geng et al., "Content-Noise Complementary Learning for
Medical Image Denoising", MICCAI 2021, on the AAPM Low Dose CT Grand Challenge) gives the
recipe but no numbers beyond "Adam, GAN + L1, 120 epochs": two U-Net predictors of one
architecture (content = the clean image, noise = the noise) fused by concatenation + 1×1
convolution, a PatchGAN discriminator. Its training code follows the pix2pix recipe, so the
numbers left open are pix2pix's (Isola et al. 2017): L1 weight 100, adversarial weight 1
(binary cross-entropy on logits), Adam 2e-4 with β (0.5, 0.999), a 70×70 PatchGAN (64 filters,
3 stride-2 layers) conditioned on the low-dose input, 256² crops. The learning rate stays
constant (the seed states no decay): ``optim.decay_start = 1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from patching.projection.lowdose import QUARTER_DOSE, LowDoseScanner

from ..x2ct_gan.config import GANOptimConfig, require


@dataclass
class CNCLModelConfig:
    """The two U-Net predictors and the PatchGAN (``model.*``).

    Args:
        base_channels: width of each U-Net's first level; level ``k`` has
            ``base_channels · 2^min(k, 3)`` channels (pix2pix caps at 8×).
        num_levels: stride-2 downsamplings of each U-Net; inputs must be multiples of
            ``2**num_levels`` (tiles are).
        convs_per_level: 3×3 conv + norm + LeakyReLU(0.2) layers per level.
        norm: ``"instance"`` (InstanceNorm with affine weights; the seed's pix2pix U-Net has
            BatchNorm, see :mod:`gan_baselines.cncl.model`) or ``"none"``. With ``"none"`` and
            the N(0, 0.02) init the U-Nets barely learn (their activations shrink level by level).
        d_channels: filters of the discriminator's first layer.
        num_d_layers: stride-2 layers of the PatchGAN (3: a 70×70 receptive field).
        init_std: std of the N(0, std) weight initialisation.
    """

    base_channels: int = 64
    num_levels: int = 4
    convs_per_level: int = 2
    norm: str = "instance"
    d_channels: int = 64
    num_d_layers: int = 3
    init_std: float = 0.02

    def __post_init__(self) -> None:
        s = "model"
        for key in ("base_channels", "num_levels", "convs_per_level", "d_channels", "num_d_layers"):
            value = getattr(self, key)
            require(isinstance(value, int) and value >= 1, s, key, value, "must be an integer >= 1")
        require(self.norm in ("none", "instance"), s, "norm", self.norm, "must be 'none' or 'instance'")
        require(math.isfinite(self.init_std) and self.init_std > 0, s, "init_std", self.init_std, "must be > 0")

    def channels(self) -> tuple[int, ...]:
        """Widths of the U-Net levels, finest first."""
        return tuple(self.base_channels * 2 ** min(k, 3) for k in range(self.num_levels + 1))


@dataclass
class CNCLDataConfig:
    """Training samples (``data.*``): whole axial slices from the store, made low-dose on the fly.

    Args:
        patch: side of the square crop of each (low-dose, clean) slice pair the networks train on,
            and the in-plane tile of ``xray2ct denoise``; a multiple of ``2**model.num_levels``.
            Slices smaller than the patch are padded with air before simulation.
        dose: dose fraction of the simulated input (0.25 = the AAPM challenge's quarter dose).
        photons: full-dose incident photons per ray (:class:`patching.projection.lowdose.LowDoseScanner`).
        electronic_std: the detector's electronic noise, counts.
        num_angles: views over 180°; 0 → ``ceil(π/2 · slice size)``.
    """

    patch: int = 256
    dose: float = QUARTER_DOSE
    photons: float = 1e5
    electronic_std: float = math.sqrt(10.0)
    num_angles: int = 0

    def __post_init__(self) -> None:
        require(isinstance(self.patch, int) and self.patch >= 8, "data", "patch", self.patch, "must be an integer >= 8")
        require(math.isfinite(self.dose) and 0 < self.dose <= 1, "data", "dose", self.dose, "must be in (0, 1]")
        require(self.num_angles == 0 or self.num_angles >= 2, "data", "num_angles", self.num_angles, "must be 0 or >= 2")
        self.scanner()  # checks photons and electronic_std

    def scanner(self) -> LowDoseScanner:
        return LowDoseScanner(photons=float(self.photons), electronic_std=float(self.electronic_std),
                              num_angles=int(self.num_angles) or None)


@dataclass
class CNCLLossConfig:
    """Generator loss weights (``loss.*``): ``adv_weight · BCE(D(x, G(x)), 1) + l1_weight · |G(x) − y|``."""

    l1_weight: float = 100.0
    adv_weight: float = 1.0

    def __post_init__(self) -> None:
        for key in ("l1_weight", "adv_weight"):
            value = getattr(self, key)
            require(math.isfinite(value) and value >= 0, "loss", key, value, "must be a finite number >= 0")


@dataclass
class CNCLConfig:
    """Everything CNCL needs: ``model``, ``data``, ``loss`` and ``optim`` sections."""

    model: CNCLModelConfig = field(default_factory=CNCLModelConfig)
    data: CNCLDataConfig = field(default_factory=CNCLDataConfig)
    loss: CNCLLossConfig = field(default_factory=CNCLLossConfig)
    optim: GANOptimConfig = field(default_factory=lambda: GANOptimConfig(lr=2e-4, betas=(0.5, 0.999), decay_start=1.0))

    def __post_init__(self) -> None:
        n = 2 ** self.model.num_levels
        require(self.data.patch % n == 0, "data", "patch", self.data.patch,
                f"must be a multiple of 2**model.num_levels = {n}")


def paper() -> CNCLConfig:
    """The seed's model at pix2pix's numbers: 64-channel U-Nets of 4 levels, 256² crops."""
    return CNCLConfig()


def cpu_demo() -> CNCLConfig:
    """A tiny model for CPU demos and tests: 8-channel U-Nets of 3 levels on whole 64² slices."""
    return CNCLConfig(model=CNCLModelConfig(base_channels=8, num_levels=3, d_channels=8, num_d_layers=2),
                      data=CNCLDataConfig(patch=64))
