"""Typed configuration of the stage-1 VQ-GAN: model, discriminator, losses, tiled codec.

Every section is a dataclass checked in ``__post_init__`` (bad values raise
:class:`patching.errors.InputError` naming the key, e.g. ``model.codebook_size``). Presets are
functions returning a :class:`Stage1Config`; the training task composes these sections into its
run config. Sizes and their sources are listed in ``docs/stage1_vqgan.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from patching.checks import is_finite as _finite
from patching.checks import is_pos_int as _pos_int
from patching.checks import is_pos_ints, named_preset
from patching.checks import need as _need
from patching.errors import InputError

PADDING_MODES = ("zeros", "replicate")
DISC_NORMS = ("group", "none")


def _triple(value) -> bool:
    return is_pos_ints(value, 3)


@dataclass
class VQGANConfig:
    """The autoencoder and its quantizer (``model.*``).

    Args:
        in_channels: image channels (1 for CT).
        base_channels: channels of the first level; level ``i`` has ``base_channels *
            channel_mults[i]``.
        channel_mults: one multiplier per resolution level; each level after the first halves
            every axis, so the downsampling factor is ``2 ** (len(channel_mults) - 1)``.
        num_res_blocks: residual blocks per level (the decoder has one more per level, as
            taming-transformers' VQGAN).
        attn_mid: self-attention between the two residual blocks at the lowest resolution.
        attn_heads: heads of that attention.
        latent_dim: channels of the latent (the codebook vectors' dimension).
        codebook_size: number of codes.
        commitment_beta: weight of ``||z_e - sg(z_q)||²`` in the quantizer loss.
        ema_decay: decay of the codebook's EMA cluster sizes and sums.
        ema_eps: Laplace smoothing of the cluster sizes.
        restart_threshold: a code whose EMA cluster size (vectors per global batch) falls below
            this is dead and re-seeded from the current batch's encoder outputs (0 disables).
        gradient_checkpointing: recompute residual/attention blocks in the backward pass.
        norm_groups: GroupNorm groups; must divide every level's channel count.
        padding_mode: convolution padding, ``zeros`` (taming, MAISI; fused into cuDNN) or
            ``replicate`` (Medical Diffusion; an extra padded copy per convolution). Tile-border
            effects of either are removed by the codec's overlapping Gaussian blending.
    """

    in_channels: int = 1
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 1
    attn_mid: bool = False
    attn_heads: int = 1
    latent_dim: int = 8
    codebook_size: int = 1024
    commitment_beta: float = 0.25
    ema_decay: float = 0.99
    ema_eps: float = 1e-5
    restart_threshold: float = 1.0
    gradient_checkpointing: bool = False
    norm_groups: int = 8
    padding_mode: str = "zeros"

    def __post_init__(self) -> None:
        self.channel_mults = tuple(self.channel_mults)
        for key in ("in_channels", "base_channels", "num_res_blocks", "attn_heads", "latent_dim",
                    "codebook_size", "norm_groups"):
            _need(_pos_int(getattr(self, key)), f"model.{key}", "must be a positive integer", getattr(self, key))
        _need(len(self.channel_mults) >= 1 and all(_pos_int(m) for m in self.channel_mults),
              "model.channel_mults", "needs one or more positive integers", self.channel_mults)
        for ch in self.level_channels:
            _need(ch % self.norm_groups == 0, "model.norm_groups",
                  f"must divide every level's channel count {self.level_channels}", self.norm_groups)
            _need(ch % self.attn_heads == 0, "model.attn_heads",
                  f"must divide every level's channel count {self.level_channels}", self.attn_heads)
        _need(_finite(self.commitment_beta) and self.commitment_beta >= 0, "model.commitment_beta",
              "must be a finite number >= 0", self.commitment_beta)
        _need(_finite(self.ema_decay) and 0 < self.ema_decay < 1, "model.ema_decay", "must be in (0, 1)", self.ema_decay)
        _need(_finite(self.ema_eps) and self.ema_eps > 0, "model.ema_eps", "must be > 0", self.ema_eps)
        _need(_finite(self.restart_threshold) and self.restart_threshold >= 0, "model.restart_threshold",
              "must be a finite number >= 0", self.restart_threshold)
        _need(self.padding_mode in PADDING_MODES, "model.padding_mode", f"must be one of {PADDING_MODES}",
              self.padding_mode)

    @property
    def level_channels(self) -> tuple[int, ...]:
        return tuple(self.base_channels * m for m in self.channel_mults)

    @property
    def downsample(self) -> int:
        """Image voxels per latent voxel along each axis."""
        return 2 ** (len(self.channel_mults) - 1)


@dataclass
class DiscConfig:
    """3D PatchGAN discriminator and its schedule (``disc.*``).

    Args:
        channels: channels of the first layer (doubled per layer, capped at 8×).
        num_layers: stride-2 layers; a tile side must be at least ``2 ** (num_layers + 2)``.
        norm: ``group`` (GroupNorm, per sample, so real and fake can share one batch) or
            ``none``. There is no BatchNorm option on purpose (see docs).
        start_step: the adversarial terms are off (factor 0) before this step.
        weight: discriminator weight λ of the generator's adversarial term.
        adaptive_weight: scale λ by ``|∇L_rec| / |∇L_G|`` at the decoder's last layer (VQGAN).
        max_adaptive_weight: clamp of that ratio (taming-transformers uses 1e4).
    """

    channels: int = 64
    num_layers: int = 3
    norm: str = "group"
    start_step: int = 10_000
    weight: float = 0.8
    adaptive_weight: bool = True
    max_adaptive_weight: float = 1e4

    def __post_init__(self) -> None:
        _need(_pos_int(self.channels), "disc.channels", "must be a positive integer", self.channels)
        _need(_pos_int(self.num_layers), "disc.num_layers", "must be a positive integer", self.num_layers)
        _need(self.norm in DISC_NORMS, "disc.norm", f"must be one of {DISC_NORMS}", self.norm)
        _need(isinstance(self.start_step, int) and self.start_step >= 0, "disc.start_step",
              "must be an integer >= 0", self.start_step)
        _need(_finite(self.weight) and self.weight >= 0, "disc.weight", "must be a finite number >= 0", self.weight)
        _need(_finite(self.max_adaptive_weight) and self.max_adaptive_weight > 0, "disc.max_adaptive_weight",
              "must be a positive number", self.max_adaptive_weight)

    @property
    def min_tile(self) -> int:
        """Smallest tile side that still leaves at least one logit per axis."""
        return 2 ** (self.num_layers + 2)


@dataclass
class LossConfig:
    """Generator-side loss weights (``loss.*``).

    Args:
        l1_weight: weight of the L1 reconstruction loss.
        perceptual_weight: weight of the 2.5D perceptual loss; > 0 needs ``perceptual_weights``.
        perceptual_weights: local safetensors file of the 2D slice feature network
            (:class:`stage1_vqgan.losses.SliceFeatureNet`); never downloaded. ``None``: off.
        perceptual_slices: slices per axis fed to the feature network each step.
        codebook_weight: weight of the quantizer loss (commitment).
    """

    l1_weight: float = 1.0
    perceptual_weight: float = 0.0
    perceptual_weights: str | None = None
    perceptual_slices: int = 4
    codebook_weight: float = 1.0

    def __post_init__(self) -> None:
        for key in ("l1_weight", "perceptual_weight", "codebook_weight"):
            v = getattr(self, key)
            _need(_finite(v) and v >= 0, f"loss.{key}", "must be a finite number >= 0", v)
        _need(_pos_int(self.perceptual_slices), "loss.perceptual_slices", "must be a positive integer",
              self.perceptual_slices)
        if self.perceptual_weights == "":
            self.perceptual_weights = None
        if self.perceptual_weight > 0 and self.perceptual_weights is None:
            raise InputError("loss.perceptual_weights",
                             f"perceptual_weight is {self.perceptual_weight} but no local weights file is given "
                             "(set loss.perceptual_weights=PATH or loss.perceptual_weight=0)")

    @property
    def perceptual_on(self) -> bool:
        return self.perceptual_weight > 0 and self.perceptual_weights is not None


@dataclass
class CodecConfig:
    """Tiling of the codec (``codec.*``): image tiles for encoding, latent tiles for decoding.

    Args:
        tile: image tile ``(x, y, z)`` for encoding; multiples of the downsampling factor.
        tile_latent: latent tile for decoding (``tile / downsample`` decodes the training tile).
        overlap: fraction of a tile shared by neighbours, in ``[0, 1)``.
        batch_size: tiles per model call.
    """

    tile: tuple[int, int, int] = (256, 256, 128)
    tile_latent: tuple[int, int, int] = (64, 64, 32)
    overlap: float = 0.25
    batch_size: int = 1

    def __post_init__(self) -> None:
        self.tile, self.tile_latent = tuple(self.tile), tuple(self.tile_latent)
        _need(_triple(self.tile), "codec.tile", "needs three positive integers", self.tile)
        _need(_triple(self.tile_latent), "codec.tile_latent", "needs three positive integers", self.tile_latent)
        _need(_finite(self.overlap) and 0 <= self.overlap < 1, "codec.overlap", "must be in [0, 1)", self.overlap)
        _need(_pos_int(self.batch_size), "codec.batch_size", "must be a positive integer", self.batch_size)


@dataclass
class Stage1Config:
    """All stage-1 sections; the training task adds its data/optimiser parts around these."""

    model: VQGANConfig = field(default_factory=VQGANConfig)
    disc: DiscConfig = field(default_factory=DiscConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)

    def __post_init__(self) -> None:
        f = self.model.downsample
        if any(t % f for t in self.codec.tile):
            raise InputError("codec.tile", f"sizes {self.codec.tile} must be multiples of the downsampling factor {f}")
        if min(self.codec.tile) < self.disc.min_tile:
            raise InputError("codec.tile", f"sides {self.codec.tile} are smaller than the discriminator's "
                                           f"minimum {self.disc.min_tile} for disc.num_layers={self.disc.num_layers}")


def cpu_demo() -> Stage1Config:
    """Tiny: trains on a laptop CPU in minutes on 32³ tiles (latent 8³ × 8)."""
    return Stage1Config(
        model=VQGANConfig(base_channels=16, channel_mults=(1, 2, 4), num_res_blocks=1, attn_mid=True,
                          latent_dim=8, codebook_size=512, restart_threshold=0.1, norm_groups=8),
        disc=DiscConfig(channels=16, num_layers=2, start_step=1500, weight=0.8),  # after a 10-minute CPU run: L1 first, GAN later (measured: starting D at step 100 doubled the L1 error within a 10-minute run; docs/stage1_vqgan.md)
        loss=LossConfig(l1_weight=1.0),
        codec=CodecConfig(tile=(32, 32, 32), tile_latent=(8, 8, 8), overlap=0.25, batch_size=4),
    )


def ctpa_512() -> Stage1Config:
    """512×512×604 CTPA on H100s through 256×256×128 tiles (latent 64×64×32 × 8 per tile).

    Channels (64, 128, 256), two residual blocks per level, GroupNorm 32, ×4 per axis: MAISI's
    autoencoder. Discriminator 64 channels / 3 layers, delayed start 50k steps, L1 weight 4:
    Medical Diffusion's ``vq_gan_3d.yaml``. Latent dim 8 and 8192 codes: see
    ``docs/stage1_vqgan.md`` (a diffusable latent, 2× MAISI's 4 channels; a large codebook
    kept alive by dead-code restart).
    """
    return Stage1Config(
        model=VQGANConfig(base_channels=64, channel_mults=(1, 2, 4), num_res_blocks=2, attn_mid=False,
                          latent_dim=8, codebook_size=8192, restart_threshold=1.0, norm_groups=32,
                          gradient_checkpointing=True),
        disc=DiscConfig(channels=64, num_layers=3, start_step=50_000, weight=0.8),
        loss=LossConfig(l1_weight=4.0),
        codec=CodecConfig(tile=(256, 256, 128), tile_latent=(64, 64, 32), overlap=0.25, batch_size=1),
    )


PRESETS = {"cpu-demo": cpu_demo, "ctpa-512": ctpa_512}


def preset(name: str) -> Stage1Config:
    return named_preset(PRESETS, name)
