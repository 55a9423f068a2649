"""S-XR2CT (Hor, Yang, Kim 2025): one frontal X-ray → CT with a likelihood image, ConvNeXt
features, a template CT and Swin attention; X2CT-GAN's conditional 3D PatchGAN."""

from .config import SXR2CTConfig, SXR2CTLossConfig, SXR2CTModelConfig, cpu_demo, paper
from .losses import build_perceptual, condition, discriminator_loss, generator_losses
from .model import SXR2CTGenerator, build, likelihood_image

__all__ = [
    "SXR2CTConfig", "SXR2CTGenerator", "SXR2CTLossConfig", "SXR2CTModelConfig", "build", "build_perceptual",
    "condition", "cpu_demo", "discriminator_loss", "generator_losses", "likelihood_image", "paper",
]
