"""Typed configuration of stage 2: X-ray encoder, latent UNet, diffusion schedule, sampler.

Every section is a dataclass checked in ``__post_init__``; bad values raise
:class:`patching.errors.InputError` naming the key (e.g. ``unet.cross_attn_levels``). Presets
are functions returning a :class:`Stage2Config`; sizes and their sources are in
``docs/stage2_diffusion.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from patching.checks import is_finite as _finite
from patching.checks import is_pos_int as _pos_int
from patching.checks import is_pos_ints as _ints
from patching.checks import named_preset
from patching.checks import need as _need
from patching.errors import InputError

VIEWS = ("pa", "lateral")
ATTENTION_BACKENDS = ("sdpa", "xformers")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction")
SAMPLERS = ("ddim", "dpmsolver++")


@dataclass
class XrayEncoderConfig:
    """2D CNN turning each view into a grid of tokens (``encoder.*``).

    Args:
        image_size: side of the square X-ray the encoder takes (pixels); the pipeline resizes.
        channels: channels per resolution level; each level after the first halves the image,
            so ``image_size == token_grid * 2 ** (len(channels) - 1)``.
        num_res_blocks: residual blocks per level.
        token_grid: tokens per side of one view (``token_grid²`` tokens per view).
        token_dim: token width ``D`` (the UNet's cross-attention context size).
        views: view names in token order; the first is required in practice (PA), later ones
            may be missing per sample and are then replaced by learned tokens.
        norm_groups: GroupNorm groups; must divide every level's channels.
    """

    image_size: int = 128
    channels: tuple[int, ...] = (16, 32, 64, 64, 128)
    num_res_blocks: int = 1
    token_grid: int = 8
    token_dim: int = 64
    views: tuple[str, ...] = VIEWS
    norm_groups: int = 8

    def __post_init__(self) -> None:
        self.channels, self.views = tuple(self.channels), tuple(self.views)
        for key in ("image_size", "num_res_blocks", "token_grid", "token_dim", "norm_groups"):
            _need(_pos_int(getattr(self, key)), f"encoder.{key}", "must be a positive integer", getattr(self, key))
        _need(len(self.channels) >= 1 and _ints(self.channels), "encoder.channels",
              "needs one or more positive integers", self.channels)
        _need(self.image_size == self.token_grid * 2 ** (len(self.channels) - 1), "encoder.image_size",
              f"must equal token_grid * 2**(len(channels) - 1) = {self.token_grid * 2 ** (len(self.channels) - 1)}",
              self.image_size)
        _need(all(c % self.norm_groups == 0 for c in self.channels), "encoder.norm_groups",
              f"must divide every level's channels {self.channels}", self.norm_groups)
        _need(1 <= len(self.views) and len(set(self.views)) == len(self.views) and set(self.views) <= set(VIEWS),
              "encoder.views", f"needs distinct names from {VIEWS}", self.views)

    @property
    def num_views(self) -> int:
        return len(self.views)

    @property
    def tokens_per_view(self) -> int:
        return self.token_grid**2

    @property
    def num_tokens(self) -> int:
        return self.num_views * self.tokens_per_view


@dataclass
class UNetConfig:
    """3D latent UNet (``unet.*``).

    Args:
        latent_channels: channels of the stage-1 latent (its ``model.latent_dim``).
        base_channels: channels of the first level; level ``i`` has ``base_channels *
            channel_mults[i]``; each level after the first halves every axis.
        channel_mults: one multiplier per level.
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        cross_attn_levels: level indices (0 = full latent resolution) whose residual blocks are
            each followed by cross-attention to the X-ray tokens; the middle block has one too
            when the lowest level is listed.
        self_attn_lowest: self-attention over all voxels in the middle block and after each
            residual block of the lowest level (cost quadratic in that level's voxels).
        num_head_channels: channels per attention head (heads = level channels / this).
        context_dim: width of the X-ray tokens (the encoder's ``token_dim``).
        use_coords: three extra input channels holding each voxel's normalised position in the
            whole latent, so a crop or a sampling window knows where it lies.
        gradient_checkpointing: recompute residual and attention blocks in the backward pass.
        attention_backend: ``sdpa`` (``F.scaled_dot_product_attention``) or ``xformers``
            (``memory_efficient_attention``; CUDA with xformers installed only).
        norm_groups: GroupNorm groups; must divide every level's channels.
        dropout: dropout inside residual blocks.
        mean_latent_shape: set by training when ``diffusion.center_latents`` is on (the latent
            shape ``(x, y, z)``): the UNet then holds the training latents' mean and residual
            scale as buffers (saved with its weights) and works on centred latents.
    """

    latent_channels: int = 8
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 1
    cross_attn_levels: tuple[int, ...] = (1, 2)
    self_attn_lowest: bool = True
    num_head_channels: int = 32
    context_dim: int = 64
    use_coords: bool = True
    gradient_checkpointing: bool = False
    attention_backend: str = "sdpa"
    norm_groups: int = 8
    dropout: float = 0.0
    mean_latent_shape: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        self.channel_mults = tuple(self.channel_mults)
        if self.mean_latent_shape is not None:
            self.mean_latent_shape = tuple(self.mean_latent_shape)
            _need(len(self.mean_latent_shape) == 3 and _ints(self.mean_latent_shape), "unet.mean_latent_shape",
                  "needs three positive integers or none", self.mean_latent_shape)
        self.cross_attn_levels = tuple(sorted(set(self.cross_attn_levels)))
        for key in ("latent_channels", "base_channels", "num_res_blocks", "num_head_channels", "context_dim",
                    "norm_groups"):
            _need(_pos_int(getattr(self, key)), f"unet.{key}", "must be a positive integer", getattr(self, key))
        _need(len(self.channel_mults) >= 1 and _ints(self.channel_mults), "unet.channel_mults",
              "needs one or more positive integers", self.channel_mults)
        _need(all(isinstance(i, int) and 0 <= i < len(self.channel_mults) for i in self.cross_attn_levels),
              "unet.cross_attn_levels", f"needs level indices in [0, {len(self.channel_mults)})",
              self.cross_attn_levels)
        for ch in self.level_channels:
            _need(ch % self.norm_groups == 0, "unet.norm_groups",
                  f"must divide every level's channels {self.level_channels}", self.norm_groups)
        for i in self.attn_levels:
            ch = self.level_channels[i]
            _need(ch % self.num_head_channels == 0, "unet.num_head_channels",
                  f"must divide the channels {ch} of attention level {i}", self.num_head_channels)
        _need(self.attention_backend in ATTENTION_BACKENDS, "unet.attention_backend",
              f"must be one of {ATTENTION_BACKENDS}", self.attention_backend)
        _need(_finite(self.dropout) and 0 <= self.dropout < 1, "unet.dropout", "must be in [0, 1)", self.dropout)

    @property
    def level_channels(self) -> tuple[int, ...]:
        return tuple(self.base_channels * m for m in self.channel_mults)

    @property
    def attn_levels(self) -> tuple[int, ...]:
        lowest = (len(self.channel_mults) - 1,) if self.self_attn_lowest else ()
        return tuple(sorted(set(self.cross_attn_levels) | set(lowest)))

    @property
    def downsample(self) -> int:
        """Latent voxels per lowest-level voxel along each axis (inputs are padded to a multiple)."""
        return 2 ** (len(self.channel_mults) - 1)

    @property
    def time_dim(self) -> int:
        return 4 * self.base_channels


@dataclass
class DiffusionConfig:
    """Noise schedule and training objective (``diffusion.*``), shared by every scheduler.

    Args:
        num_train_timesteps: DDPM steps.
        beta_schedule: diffusers' ``linear``, ``scaled_linear`` or ``squaredcos_cap_v2``.
        beta_start, beta_end: end points of the (scaled) linear schedules.
        prediction_type: ``epsilon`` or ``v_prediction``.
        cfg_dropout: probability that the training task replaces a sample's condition by the
            learned null condition (classifier-free guidance).
        guidance_scale: default guidance ``g`` at sampling (``u + g·(c − u)``; 1 = conditional).
        center_latents: diffuse ``(z − mean) / s`` instead of the scaled latent ``z``: ``mean`` is
            the training split's voxel-wise mean latent and ``s`` the residual's std, both read
            from the store at the start of training and saved in the UNet. Most of a chest
            latent's variance is anatomy every case shares; centred, the untrained model already
            samples the mean and training spends itself on what the X-ray tells apart
            (docs/results.md). Whole latents of one shape only.
    """

    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    prediction_type: str = "epsilon"
    cfg_dropout: float = 0.1
    guidance_scale: float = 2.0
    center_latents: bool = False

    def __post_init__(self) -> None:
        _need(_pos_int(self.num_train_timesteps), "diffusion.num_train_timesteps", "must be a positive integer",
              self.num_train_timesteps)
        _need(self.beta_schedule in BETA_SCHEDULES, "diffusion.beta_schedule", f"must be one of {BETA_SCHEDULES}",
              self.beta_schedule)
        _need(_finite(self.beta_start) and _finite(self.beta_end) and 0 < self.beta_start < self.beta_end < 1,
              "diffusion.beta_end", f"needs 0 < beta_start ({self.beta_start}) < beta_end < 1", self.beta_end)
        _need(self.prediction_type in PREDICTION_TYPES, "diffusion.prediction_type",
              f"must be one of {PREDICTION_TYPES}", self.prediction_type)
        _need(_finite(self.cfg_dropout) and 0 <= self.cfg_dropout < 1, "diffusion.cfg_dropout",
              "must be in [0, 1)", self.cfg_dropout)
        _need(_finite(self.guidance_scale) and self.guidance_scale >= 0, "diffusion.guidance_scale",
              "must be a finite number >= 0", self.guidance_scale)


@dataclass
class SamplerConfig:
    """Sampling (``sampler.*``).

    Args:
        name: ``ddim`` or ``dpmsolver++`` (both deterministic).
        steps: denoising steps.
        window: latent window ``(x, y, z)`` for globally coherent tiled denoising, or ``None``
            to denoise the whole latent at once (a window covering the latent does the same).
        overlap: fraction of a window shared by neighbours, in ``[0, 1)``.
        fallback_window: the window ``xray2ct sample --windowed`` uses when the whole latent
            does not fit the device (``None``: no fallback configured).
        drr_guidance_iters: projection consistency at sampling (:mod:`stage2_diffusion.guidance`):
            Adam steps per sampler step that bring the estimate's DRRs towards the X-rays; 0 = off.
        drr_guidance_lr: their learning rate (in the diffusion's latent units).
    """

    name: str = "ddim"
    steps: int = 50
    window: tuple[int, int, int] | None = None
    overlap: float = 0.25
    fallback_window: tuple[int, int, int] | None = None
    drr_guidance_iters: int = 0
    drr_guidance_lr: float = 0.05

    def __post_init__(self) -> None:
        for key in ("window", "fallback_window"):
            if getattr(self, key) is not None:
                setattr(self, key, tuple(getattr(self, key)))
                _need(_ints(getattr(self, key), 3), f"sampler.{key}", "needs three positive integers or None",
                      getattr(self, key))
        _need(self.name in SAMPLERS, "sampler.name", f"must be one of {SAMPLERS}", self.name)
        _need(_pos_int(self.steps), "sampler.steps", "must be a positive integer", self.steps)
        _need(_finite(self.overlap) and 0 <= self.overlap < 1, "sampler.overlap", "must be in [0, 1)", self.overlap)
        _need(isinstance(self.drr_guidance_iters, int) and not isinstance(self.drr_guidance_iters, bool)
              and self.drr_guidance_iters >= 0, "sampler.drr_guidance_iters", "must be an integer >= 0",
              self.drr_guidance_iters)
        _need(_finite(self.drr_guidance_lr) and self.drr_guidance_lr > 0, "sampler.drr_guidance_lr",
              "must be a positive number", self.drr_guidance_lr)


@dataclass
class Stage2Config:
    """All stage-2 sections plus the latent grid they work on.

    Args:
        latent_shape: whole-volume latent ``(x, y, z)`` (image shape / stage-1 downsampling).
            The presets give the design's grid; the training task reads the real one from the
            store's latents (``None`` there = derived, see ``stage2_diffusion.task``) and
            records it in the checkpoint, which is where sampling reads it.
    """

    encoder: XrayEncoderConfig = field(default_factory=XrayEncoderConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    latent_shape: tuple[int, int, int] | None = (16, 16, 16)

    def __post_init__(self) -> None:
        if self.latent_shape is not None:
            self.latent_shape = tuple(self.latent_shape)
            _need(_ints(self.latent_shape, 3), "latent_shape", "needs three positive integers or none",
                  self.latent_shape)
        if self.unet.context_dim != self.encoder.token_dim:
            raise InputError("unet.context_dim", f"must equal encoder.token_dim {self.encoder.token_dim}, "
                                                 f"got {self.unet.context_dim}")
        f = self.unet.downsample
        for key in ("window", "fallback_window"):
            w = getattr(self.sampler, key)
            if w is not None and any(v % f for v in w):
                raise InputError(f"sampler.{key}", f"sizes {w} must be multiples of the UNet's downsampling factor {f}")


def cpu_demo() -> Stage2Config:
    """Tiny: 64³ phantoms → 16³ × 8 latents (stage-1 ×4), 128² X-rays; trains on a CPU in minutes."""
    return Stage2Config(
        encoder=XrayEncoderConfig(image_size=128, channels=(16, 16, 32, 32, 64), num_res_blocks=1, token_grid=8,
                                  token_dim=64, norm_groups=8),
        unet=UNetConfig(latent_channels=8, base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=1,
                        cross_attn_levels=(1, 2), self_attn_lowest=True, num_head_channels=32, context_dim=64,
                        norm_groups=8),
        # Guidance 1 (conditional only, one UNet pass per step) and DDIM 10: at demo scale 1–1.5
        # scored 0.5 dB above 2.0, and 10 steps within 0.15 dB of 25 or 50. Projection guidance,
        # one Adam step of 0.2 per sampler step: +2.2 dB PSNR and +7 dB DRR PSNR on the demo's
        # test phantoms, since its X-rays are DRRs (docs/results.md; off for real radiographs).
        diffusion=DiffusionConfig(prediction_type="v_prediction", guidance_scale=1.0),
        sampler=SamplerConfig(name="ddim", steps=10, window=None, fallback_window=(8, 8, 8), drr_guidance_iters=1,
                              drr_guidance_lr=0.2),
        latent_shape=(16, 16, 16),
    )


def ctpa_512() -> Stage2Config:
    """512×512×604 CTPA: latents 128×128×151 × 8 (stage-1 ``ctpa-512``), 256² X-rays, one H100.

    UNet channels 64·(1, 2, 4, 8), two residual blocks per level, 32-channel heads, attention
    at the two lowest levels: MAISI's diffusion UNet (~180 M parameters), with cross-attention
    to 2 × 16² X-ray tokens in place of MAISI's scalar conditions. Whole-latent sampling with
    DPM-Solver++ (30 steps): MAISI diffuses its whole 4×128³ latent at once on one GPU.
    """
    return Stage2Config(
        encoder=XrayEncoderConfig(image_size=256, channels=(32, 64, 128, 256, 512), num_res_blocks=2,
                                  token_grid=16, token_dim=512, norm_groups=32),
        unet=UNetConfig(latent_channels=8, base_channels=64, channel_mults=(1, 2, 4, 8), num_res_blocks=2,
                        cross_attn_levels=(2, 3), self_attn_lowest=True, num_head_channels=32, context_dim=512,
                        gradient_checkpointing=True, norm_groups=32),
        diffusion=DiffusionConfig(prediction_type="v_prediction"),
        sampler=SamplerConfig(name="dpmsolver++", steps=30, window=None, overlap=0.25, fallback_window=(64, 64, 64)),
        latent_shape=(128, 128, 151),
    )


PRESETS = {"cpu-demo": cpu_demo, "ctpa-512": ctpa_512}


def preset(name: str) -> Stage2Config:
    return named_preset(PRESETS, name)
