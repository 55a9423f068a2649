"""X-Recon (Wang et al., arXiv 2407.15356): two orthogonal X-rays → CT with multi-scale fusion
rendering, a CoordConv 3D PatchGAN and a multi-angle projection loss."""

from .config import XReconConfig, XReconLossConfig, XReconModelConfig, cpu_demo, paper
from .losses import apply_pose, condition, discriminator_loss, generator_losses, random_pose
from .model import CoordPatchDiscriminator3D, XReconGenerator, build, coordinate_channels

__all__ = [
    "CoordPatchDiscriminator3D", "XReconConfig", "XReconGenerator", "XReconLossConfig", "XReconModelConfig",
    "apply_pose", "build", "condition", "coordinate_channels", "cpu_demo", "discriminator_loss",
    "generator_losses", "paper", "random_pose",
]
