"""X2CT-GAN (Ying et al., CVPR 2019): biplanar or single-view X-rays → CT, 3D PatchGAN, LSGAN."""

from .config import (
    GANOptimConfig,
    X2CTGANConfig,
    X2CTGANLossConfig,
    X2CTGANModelConfig,
    cpu_demo,
    paper,
)
from .losses import condition, discriminator_loss, generator_losses
from .model import PatchDiscriminator3D, X2CTGenerator, build, connection_c, patch_size

__all__ = [
    "GANOptimConfig", "PatchDiscriminator3D", "X2CTGANConfig", "X2CTGANLossConfig", "X2CTGANModelConfig",
    "X2CTGenerator", "build", "condition", "connection_c", "cpu_demo", "discriminator_loss",
    "generator_losses", "paper", "patch_size",
]
