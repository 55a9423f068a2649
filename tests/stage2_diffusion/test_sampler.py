"""Schedules (against diffusers' formulas) and the sampler: determinism, CFG, coherent tiling."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from patching.errors import InputError
from stage2_diffusion.config import DiffusionConfig
from stage2_diffusion.sampler import guided_prediction, sample_latents, windowed_prediction
from stage2_diffusion.schedules import (
    add_noise,
    sample_scheduler,
    sample_timesteps,
    train_scheduler,
    training_target,
    velocity,
)
from stage2_diffusion.unet import coordinate_channels

from .test_networks import one_thread, tiny_models  # noqa: F401  (fixture re-used)

SHAPE = (4, 8, 8, 8)


def _xrays(b: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 2, 32, 32, generator=torch.Generator().manual_seed(seed))


def _sample(unet, enc, *, seed=0, name="ddim", kind="epsilon", steps=3, guidance=2.0, shape=SHAPE, xrays=None, **kw):
    return sample_latents(unet, enc, _xrays() if xrays is None else xrays, shape=shape,
                          scheduler=sample_scheduler(DiffusionConfig(prediction_type=kind), name), steps=steps,
                          guidance=guidance,
                          generator=torch.Generator().manual_seed(seed), progress=False, **kw)


# --------------------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_schedules_share_betas_and_match_the_formulas(kind):
    cfg = DiffusionConfig(prediction_type=kind)
    train = train_scheduler(cfg)
    for name in ("ddim", "dpmsolver++"):
        s = sample_scheduler(cfg, name)
        assert torch.equal(s.betas, train.betas) and torch.equal(s.alphas_cumprod, train.alphas_cumprod)
        assert s.config.prediction_type == kind
    assert sample_scheduler(cfg, "dpmsolver++").config.algorithm_type == "dpmsolver++"
    # scaled_linear: betas = linspace(√β0, √β1)²
    ref = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, 1000, dtype=torch.float32) ** 2
    torch.testing.assert_close(train.betas, ref)

    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 5, 5, 5, generator=g), torch.randn(3, 4, 5, 5, 5, generator=g)
    t = sample_timesteps(train, 3, torch.Generator().manual_seed(1))
    assert t.dtype == torch.int64 and torch.equal(t, sample_timesteps(train, 3, torch.Generator().manual_seed(1)))
    ab = train.alphas_cumprod[t].view(3, 1, 1, 1, 1)
    xt = add_noise(train, x0, eps, t)
    torch.testing.assert_close(xt, ab.sqrt() * x0 + (1 - ab).sqrt() * eps)
    v = velocity(train, x0, eps, t)
    torch.testing.assert_close(v, ab.sqrt() * eps - (1 - ab).sqrt() * x0)
    # v and x_t determine x0 and ε (the relations v-prediction samplers rely on)
    torch.testing.assert_close(ab.sqrt() * xt - (1 - ab).sqrt() * v, x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close((1 - ab).sqrt() * xt + ab.sqrt() * v, eps, rtol=1e-5, atol=1e-5)
    target = training_target(train, x0, eps, t)
    assert torch.equal(target, eps if kind == "epsilon" else v)


def test_sample_scheduler_rejects_unknown_names_and_starts_at_pure_noise():
    with pytest.raises(InputError, match="sampler.name"):
        sample_scheduler(DiffusionConfig(), "euler")
    for name in ("ddim", "dpmsolver++"):
        s = sample_scheduler(DiffusionConfig(), name)
        s.set_timesteps(10)
        assert int(s.timesteps[0]) == 999  # trailing spacing


# ----------------------------------------------------------------------------------------- sampler


@pytest.mark.parametrize("name", ["ddim", "dpmsolver++"])
@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_sampler_is_deterministic_for_a_seed(name, kind):
    enc, unet = tiny_models()
    a = _sample(unet, enc, name=name, kind=kind, seed=3)
    assert a.shape == (1, *SHAPE) and torch.isfinite(a).all()
    assert torch.equal(a, _sample(unet, enc, name=name, kind=kind, seed=3))
    assert not torch.allclose(a, _sample(unet, enc, name=name, kind=kind, seed=4))


def test_sampler_serves_one_or_two_views_per_sample():
    enc, unet = tiny_models()
    present = torch.tensor([[True, True], [True, False]])
    out = _sample(unet, enc, xrays=_xrays(2), views_present=present, steps=2)
    assert out.shape == (2, *SHAPE)
    both = _sample(unet, enc, xrays=_xrays(2), steps=2)
    assert torch.equal(out[0], both[0]) and not torch.allclose(out[1], both[1])


def test_guidance_one_is_the_conditional_prediction_and_cfg_formula():
    enc, unet = tiny_models()
    xr = _xrays(2)
    cond, null = enc(xr), enc.null_condition(2)
    x, t = torch.randn(2, *SHAPE), torch.tensor(500)
    with torch.no_grad():
        c, u = unet(x, t, cond), unet(x, t, null)
        assert torch.equal(guided_prediction(unet, x, t, cond, null, 1.0), c)
        torch.testing.assert_close(guided_prediction(unet, x, t, cond, null, 3.0), u + 3.0 * (c - u),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(guided_prediction(unet, x, t, cond, null, 0.0), u, rtol=1e-5, atol=1e-6)


class PointwiseModel(nn.Module):
    """A 'UNet' that is pointwise in space: 1×1×1 convolutions of (latent, whole-latent coordinates),
    modulated by time and the mean token. Windowed and whole denoising must agree exactly."""

    latent_channels = 4

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv3d(4 + 3, 4, 1)
        self.tok = nn.Linear(16, 4)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x, t, context, coords=None):
        start, full = coords if coords is not None else ((0, 0, 0), x.shape[2:])
        c = coordinate_channels(start, full, x.shape[2:], x.shape[0], x.device)
        h = self.conv(torch.cat([x, c], dim=1)) * torch.cos(torch.as_tensor(t).float() / 700)
        # ε ≈ x_t plus a bounded term: keeps the DDIM x0 estimates (÷ √ᾱ) of moderate size
        return x + 0.1 * torch.tanh(h + self.tok(context.mean(1))[:, :, None, None, None])


@pytest.mark.parametrize("shape, window", [((4, 8, 8, 8), (4, 4, 4)), ((4, 9, 7, 6), (4, 4, 4)),
                                           ((4, 8, 8, 8), (8, 4, 6))])
def test_windowed_equals_whole_for_a_pointwise_model(shape, window):
    enc, _ = tiny_models()
    model = PointwiseModel()
    cond = enc(_xrays())
    x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))

    def predict(crop, coords):
        return guided_prediction(model, crop, torch.tensor(999), cond, enc.null_condition(1), 2.0, coords=coords)

    with torch.no_grad():  # one blended prediction: float32 rounding of Σ w·p / Σ w only
        torch.testing.assert_close(windowed_prediction(predict, x, window, 0.25), predict(x, None), rtol=0, atol=1e-6)
    whole = _sample(model, enc, shape=shape, steps=4)
    tiled = _sample(model, enc, shape=shape, steps=4, window=window, overlap=0.25)
    assert whole.abs().max() > 0.5
    torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-5)  # measured ≤ 2.3e-6 (latents ~1.5)


def test_window_covering_the_latent_is_identical_to_whole():
    enc, unet = tiny_models()
    whole = _sample(unet, enc)
    assert torch.equal(_sample(unet, enc, window=(8, 8, 8)), whole)
    assert torch.equal(_sample(unet, enc, window=(16, 12, 8)), whole)  # clipped per axis


def test_windowed_vs_whole_for_the_tiny_unet():
    """The real UNet is not pointwise (3³ receptive field, GroupNorm statistics and self-attention
    over the window), so windows differ from the whole; this measures by how much (docs)."""
    enc, unet = tiny_models()
    cond, null = enc(_xrays()), enc.null_condition(1)
    x = torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(0))

    def predict(crop, coords):
        return guided_prediction(unet, crop, torch.tensor(500), cond, null, 2.0, coords=coords)

    with torch.no_grad():
        whole = windowed_prediction(predict, x, None)
        tiled = windowed_prediction(predict, x, (4, 4, 4), 0.5)
    rel_step = float((tiled - whole).norm() / whole.norm())
    whole_s, tiled_s = _sample(unet, enc, steps=4), _sample(unet, enc, steps=4, window=(4, 4, 4), overlap=0.5)
    rel_sample = float((tiled_s - whole_s).norm() / whole_s.norm())
    print(f"tiny UNet, 8³ latent, 4³ windows, overlap 0.5: relative L2 difference "
          f"one prediction {rel_step:.3f}, 4-step DDIM sample {rel_sample:.3f}")
    assert 0 < rel_step < 1 and 0 < rel_sample < 1


def test_sampler_bad_inputs():
    enc, unet = tiny_models()
    with pytest.raises(InputError, match="shape"):
        _sample(unet, enc, shape=(3, 8, 8, 8))            # wrong latent channels
    with pytest.raises(InputError, match="shape"):
        _sample(unet, enc, shape=(4, 8, 8))
    with pytest.raises(InputError, match="xrays"):
        _sample(unet, enc, xrays=torch.rand(1, 2, 64, 64))  # X-ray size mismatch
    with pytest.raises(InputError, match="steps"):
        _sample(unet, enc, steps=0)
    with pytest.raises(InputError, match="guidance"):
        _sample(unet, enc, guidance=float("nan"))
    with pytest.raises(InputError, match="window"):
        _sample(unet, enc, window=(4, 4))
    with pytest.raises(InputError, match="overlap"):
        _sample(unet, enc, window=(4, 4, 4), overlap=1.0)
    with pytest.raises(InputError, match="generator"):
        sample_latents(unet, enc, _xrays(), shape=SHAPE, scheduler=sample_scheduler(DiffusionConfig(), "ddim"),
                       steps=2, guidance=1.0, generator=None, progress=False)
