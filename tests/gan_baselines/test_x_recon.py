"""X-Recon: shapes, multi-scale fusion rendering, CoordConv discriminator, multi-angle projection
loss, parameter counts, the adversarial update, a few training steps, and bad input."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from gan_baselines.common import num_params
from gan_baselines.x2ct_gan import patch_size
from gan_baselines.x_recon import (
    CoordPatchDiscriminator3D,
    XReconConfig,
    XReconGenerator,
    XReconLossConfig,
    XReconModelConfig,
    apply_pose,
    build,
    condition,
    coordinate_channels,
    discriminator_loss,
    generator_losses,
    paper,
    random_pose,
)
from patching.errors import InputError

from .test_x2ct_gan import one_thread, sphere_batch  # noqa: F401  (one_thread: autouse fixture)


def tiny(xray_size=32, volume_size=16, **kw) -> XReconModelConfig:
    """Encoder 32 → 4 (3 levels); decoder levels ``volume_size`` … 4."""
    num_levels = (volume_size // 4).bit_length()
    base = dict(xray_size=xray_size, volume_size=volume_size, stem_channels=4, growth_rate=4, bottleneck_factor=2,
                num_dense_layers=(1, 1, 1), decoder_channels=(4, 4, 8, 8)[:num_levels],
                num_branch_convs=(1,) * (num_levels - 1) + (0,), num_fusion_convs=(0,) + (1,) * (num_levels - 2) + (0,),
                fc_dropout=0.0, d_channels=4, num_d_layers=2)
    base.update(kw)
    return XReconModelConfig(**base)


def xrays_for(cfg, batch=2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {v: torch.rand(batch, 1, cfg.xray_size, cfg.xray_size, generator=g) for v in cfg.views}


@pytest.mark.parametrize(("xray_size", "volume_size"), [(32, 16), (32, 32), (32, 8)])
def test_generator_and_discriminator_shapes(xray_size, volume_size):
    cfg = tiny(xray_size, volume_size)
    G, D = build(cfg)
    xrays = xrays_for(cfg)
    with torch.no_grad():
        out, renders = G.forward_scales(**xrays)
        logits = D(out, condition(xrays, cfg))
    n, p = volume_size, patch_size(volume_size, cfg.num_d_layers)
    assert out.shape == (2, 1, n, n, n)
    assert [r.shape[-1] for r in renders] == [n // 2**k for k in range(len(renders) - 1, -1, -1)]
    assert logits.shape == (2, 1, p, p, p)


def test_multiscale_rendering_weights():
    """Renders merge coarse to fine as out ← (up(out) + r)/2, the first halved: with three levels
    of constant renders c the output is c·(1/2 + 1/4 + 1/8); the top level (4³, connection A's
    grid) has no render, so the tiny model's levels 8 and 16 give c·3/4."""

    class Const(nn.Module):
        def forward(self, t):
            return torch.ones_like(t[:, :1])

    cfg = tiny(32, 32)  # levels 32, 16, 8, 4: renders at 8, 16, 32
    G = XReconGenerator(cfg)
    for key in G.render:
        G.render[key] = Const()
    with torch.no_grad():
        out, renders = G.forward_scales(**xrays_for(cfg))
    assert [r.shape[-1] for r in renders] == [8, 16, 32]
    torch.testing.assert_close(out, torch.full_like(out, 7 / 8))


def test_coordinate_channels_and_coordconv_discriminator():
    vol = torch.zeros(2, 1, 3, 4, 5)
    coords = coordinate_channels(vol)
    assert coords.shape == (2, 3, 3, 4, 5)
    torch.testing.assert_close(coords[0, 0, :, 1, 2], torch.tensor([-1.0, 0.0, 1.0]))  # x runs along X only
    torch.testing.assert_close(coords[1, 1, 0, :, 0], torch.linspace(-1, 1, 4))
    torch.testing.assert_close(coords[0, 2, 2, 3, :], torch.linspace(-1, 1, 5))
    D = CoordPatchDiscriminator3D(tiny())
    assert D.model[0].in_channels == 1 + 2 + 3  # volume, two X-ray conditions, x/y/z


def test_paper_parameter_counts():
    """The released code (wangyunpengbio/X-Recon, ``..._transposed_skipconnect`` generator at 224)
    builds 98,799,735 generator parameters, 45,602 of which are dead (level-0 fusion convs whose
    output is discarded, the branches' level-0 convs and heads); we build the remaining
    98,754,133. Its CoordConv discriminator has 11,067,457. The paper states no counts."""
    cfg = paper().model
    assert (cfg.xray_size, cfg.volume_size) == (224, 224)
    with torch.device("meta"):
        G, D = build(cfg)
    g, d = num_params(G), num_params(D)
    print(f"\nX-Recon paper(): G {g:,} D {d:,}")
    assert (g, d) == (98_754_133, 11_067_457)


def test_random_pose_is_seeded_and_zero_pose_is_identity():
    a = random_pose(3, 10.0, 0.04, torch.Generator().manual_seed(5))
    b = random_pose(3, 10.0, 0.04, torch.Generator().manual_seed(5))
    assert a.shape == (3, 3, 4)
    torch.testing.assert_close(a, b)
    rot = a[:, :, :3]
    torch.testing.assert_close(rot @ rot.transpose(1, 2), torch.eye(3).expand(3, 3, 3), atol=1e-5, rtol=0)
    vol = torch.rand(3, 1, 6, 6, 6, generator=torch.Generator().manual_seed(1))
    identity = random_pose(3, 0.0, 0.0, torch.Generator().manual_seed(5))
    torch.testing.assert_close(apply_pose(vol, identity, fill=0.0), vol)


def test_multi_angle_projection_loss_is_zero_on_the_target_and_differentiable():
    cfg = XReconConfig(model=tiny(), loss=XReconLossConfig(adv_weight=0.0))
    real, xrays = sphere_batch(cfg.model.xray_size, cfg.model.volume_size)
    gen = torch.Generator().manual_seed(0)
    same = generator_losses(real, real, xrays, None, cfg, generator=gen)
    assert same["proj"].item() < 1e-6 and same["total"].item() < 1e-5
    fake = torch.full_like(real, 0.3, requires_grad=True)
    losses = generator_losses(fake, real, xrays, None, cfg, generator=gen)
    losses["proj"].backward()
    assert fake.grad.abs().sum() > 0
    canonical = generator_losses(fake, real, xrays, None, cfg)  # no generator: canonical axes
    jittered = generator_losses(fake, real, xrays, None, cfg, generator=torch.Generator().manual_seed(3))
    assert canonical["proj"].item() != pytest.approx(jittered["proj"].item(), rel=1e-6)


def test_adversarial_update_d_learns_g_gets_gradient_d_does_not():
    torch.manual_seed(0)
    model = tiny()
    cfg = XReconConfig(model=model, loss=XReconLossConfig(recon_weight=0.0, proj_weight=0.0, adv_weight=1.0))
    G, D = build(model)
    real, xrays = sphere_batch(model.xray_size, model.volume_size)
    cond = condition(xrays, model)
    # D step on fixed generated volumes lowers D's loss on that batch
    with torch.no_grad():
        fake = G(**xrays)
    opt = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.99))
    before = discriminator_loss(D, real, fake, cond)
    for _ in range(4):
        opt.zero_grad()
        discriminator_loss(D, real, fake, cond).backward()
        opt.step()
    with torch.no_grad():
        assert discriminator_loss(D, real, fake, cond) < before
    # G step: the adversarial gradient reaches G's parameters, none reaches D's
    D.zero_grad(set_to_none=True)
    losses = generator_losses(G(**xrays), real, xrays, D, cfg)
    losses["total"].backward()
    assert all(p.grad is not None for p in G.parameters())
    assert G.branches["pa"].encoder.stem[1].weight.grad.abs().sum() > 0
    assert G.render["0"][0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in D.parameters())
    assert all(p.requires_grad for p in D.parameters())


def test_a_few_training_steps_lower_the_generator_loss():
    torch.manual_seed(0)
    model = tiny()
    cfg = XReconConfig(model=model)
    G, D = build(model)
    real, xrays = sphere_batch(model.xray_size, model.volume_size)
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-3, betas=cfg.optim.betas)
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas)
    cond = condition(xrays, model)
    rng = torch.Generator().manual_seed(0)
    totals, recons = [], []
    for _ in range(12):  # G step then D step, as the released code
        fake = G(**xrays)
        opt_g.zero_grad()
        losses = generator_losses(fake, real, xrays, D, cfg, generator=rng)
        losses["total"].backward()
        opt_g.step()
        opt_d.zero_grad()
        discriminator_loss(D, real, fake.detach(), cond).backward()
        opt_d.step()
        totals.append(losses["total"].item())
        recons.append(losses["recon"].item())
    # the adversarial term (weight 1) dominates at the start and falls steadily with the rest
    assert sum(totals[-3:]) < 0.9 * sum(totals[:3]), totals
    assert recons[-1] < recons[0], recons


def test_bad_input_raises_input_error():
    cfg = tiny()
    G = XReconGenerator(cfg)
    xrays = xrays_for(cfg)
    with pytest.raises(InputError, match="lateral"):
        G(pa=xrays["pa"])
    with pytest.raises(InputError, match="B×1×32×32"):
        G(pa=xrays["pa"], lateral=torch.rand(2, 1, 16, 16))
    with pytest.raises(InputError, match=r"model\.views"):
        dataclasses.replace(cfg, views=("pa",))
    with pytest.raises(InputError, match=r"model\.num_fusion_convs"):
        dataclasses.replace(cfg, num_fusion_convs=(1, 1, 0))
    with pytest.raises(InputError, match=r"loss\.jitter_shift"):
        XReconLossConfig(jitter_shift=0.7)


def test_paper_defaults():
    cfg = paper()
    assert (cfg.loss.recon_weight, cfg.loss.proj_weight, cfg.loss.adv_weight) == (10.0, 0.1, 1.0)
    assert cfg.loss.proj_views == ("pa", "lateral", "axial")
    assert (cfg.optim.lr, cfg.optim.betas, cfg.optim.decay_start) == (5e-5, (0.5, 0.99), 0.5)
    assert cfg.model.output_activation == "leaky_relu" and cfg.model.conditional_d
