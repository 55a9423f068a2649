"""CNCL (Geng et al., MICCAI 2021): content–noise complementary learning for low-dose CT denoising."""

from .config import CNCLConfig, CNCLDataConfig, CNCLLossConfig, CNCLModelConfig, cpu_demo, paper
from .losses import discriminator_loss, generator_losses
from .model import CNCLGenerator, PatchDiscriminator2D, UNet, build

__all__ = [
    "CNCLConfig", "CNCLDataConfig", "CNCLGenerator", "CNCLLossConfig", "CNCLModelConfig", "PatchDiscriminator2D",
    "UNet", "build", "cpu_demo", "discriminator_loss", "generator_losses", "paper",
]
