"""X2CT-GAN: shapes, view alignment of connection C, parameter counts, the adversarial update,
a few training steps, and bad input. Tiny CPU configs (≤ 32³ outputs)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from gan_baselines.common import (
    axial_projection,
    branch_to_volume,
    expand_to_branch,
    lr_factor,
    num_params,
    project,
    volume_to_branch,
    xray_to_volume,
)
from gan_baselines.x2ct_gan import (
    PatchDiscriminator3D,
    X2CTGANConfig,
    X2CTGANLossConfig,
    X2CTGANModelConfig,
    X2CTGenerator,
    build,
    condition,
    connection_c,
    discriminator_loss,
    generator_losses,
    paper,
    patch_size,
)
from patching.errors import InputError
from patching.projection.drr import parallel_projection

BOTH = ("pa", "lateral")


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine two spinning OpenMP threads made these
    tiny 3D convolutions ~15× slower. Restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(views=BOTH, xray_size=32, volume_size=16, **kw) -> X2CTGANModelConfig:
    """A few-thousand-parameter model: encoder 32 → 4 (3 levels), decoder levels 16, 8, 4."""
    num_levels = (volume_size // (xray_size // 8)).bit_length()  # levels down to the 4³ start
    base = dict(views=views, xray_size=xray_size, volume_size=volume_size, stem_channels=4, growth_rate=4,
                bottleneck_factor=2, num_dense_layers=(1, 1, 1), decoder_channels=(4, 4, 8, 8)[:num_levels],
                num_branch_convs=(1, 1, 0, 0)[:num_levels][:-1] + (0,), num_fusion_convs=(1, 1, 0, 0)[:num_levels][:-1] + (0,),
                fc_dropout=0.0, d_channels=4, num_d_layers=2)
    base.update(kw)
    return X2CTGANModelConfig(**base)


def xrays_for(cfg, batch=2, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {v: torch.rand(batch, 1, cfg.xray_size, cfg.xray_size, generator=g) for v in cfg.views}


def sphere_batch(xray_size: int, volume_size: int, batch: int = 2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Off-centre spheres of different radii in [0, 1] and their parallel projections as X-rays."""
    n = volume_size
    axis = torch.arange(n, dtype=torch.float32)
    x, y, z = torch.meshgrid(axis, axis, axis, indexing="ij")
    vols = []
    for i in range(batch):
        c = (0.4 + 0.15 * i) * n
        r = (0.22 + 0.06 * i) * n
        vols.append((((x - c) ** 2 + (y - 0.5 * n) ** 2 + (z - 0.55 * n) ** 2) < r * r).float())
    volume = torch.stack(vols)[:, None]  # B×1×X×Y×Z
    xrays = {}
    for view in BOTH:
        img = parallel_projection(volume, view, reduce="mean")
        img = F.interpolate(img, size=(xray_size, xray_size), mode="bilinear", align_corners=False)
        xrays[view] = img / img.amax(dim=(2, 3), keepdim=True)
    return volume, xrays


# --- shapes ----------------------------------------------------------------------------------

SHAPES = [  # views, xray_size, volume_size
    (BOTH, 32, 16),
    (("pa",), 32, 16),
    (("lateral",), 32, 16),
    (BOTH, 32, 32),
    (("pa",), 32, 32),
    (BOTH, 32, 8),
]


@pytest.mark.parametrize(("views", "xray_size", "volume_size"), SHAPES)
def test_generator_and_discriminator_shapes(views, xray_size, volume_size):
    cfg = tiny(views, xray_size, volume_size)
    G, D = build(cfg)
    xrays = xrays_for(cfg)
    with torch.no_grad():
        out = G(**xrays)
        logits = D(out, condition(xrays, cfg))
    n, p = volume_size, patch_size(volume_size, cfg.num_d_layers)
    assert out.shape == (2, 1, n, n, n)
    assert logits.shape == (2, 1, p, p, p)
    assert (out >= 0).all()  # ReLU output, the paper's [0, 1] targets


@pytest.mark.parametrize(("size", "layers", "expected"), [(16, 2, 7), (32, 2, 11), (32, 3, 7), (128, 3, 19)])
def test_patch_size_table(size, layers, expected):
    assert patch_size(size, layers) == expected
    if size <= 32:
        cfg = tiny(BOTH, 32, 16, num_d_layers=layers, conditional_d=False)
        with torch.no_grad():
            assert PatchDiscriminator3D(cfg)(torch.zeros(1, 1, size, size, size)).shape[-1] == expected


@pytest.mark.parametrize(("biplanar", "expected_g"), [(True, 61_715_633), (False, 29_384_481)])
def test_paper_parameter_counts(biplanar, expected_g):
    """The released code (kylekma/X2CT) builds 61,740,467 / 29,384,481 generator parameters;
    the biplanar figure less 24,834 for the two branches' level-0 convs and output heads, which
    only feed an auxiliary loss of weight 0 and are not built here. D: 11,055,169 / 11,051,073.
    The paper itself states no parameter counts."""
    cfg = paper(biplanar).model
    with torch.device("meta"):
        G, D = build(cfg)
    g, d = num_params(G), num_params(D)
    print(f"\nX2CT-GAN paper() {'biplanar' if biplanar else 'single-view'}: G {g:,} D {d:,}")
    assert g == expected_g
    assert d == (11_055_169 if biplanar else 11_051_073)


# --- view alignment --------------------------------------------------------------------------


def test_connection_c_aligns_views_with_a_marker():
    """A PA marker at (row, col) and a lateral marker at (row, col') meet at the right (x, y, z)."""
    n = 8
    x0, y0, z0 = 1, 5, 6  # RAS+: near the patient's left, anterior, superior
    pa = torch.zeros(1, 1, n, n)
    lat = torch.zeros(1, 1, n, n)
    # PA: row 0 superior → row = n-1-z; col 0 = patient's right (high x) → col = n-1-x
    pa[0, 0, n - 1 - z0, n - 1 - x0] = 1.0
    # lateral: row = n-1-z; col 0 = anterior (high y) → col = n-1-y
    lat[0, 0, n - 1 - z0, n - 1 - y0] = 1.0
    fused = connection_c({"pa": expand_to_branch(pa, n), "lateral": expand_to_branch(lat, n)})
    assert fused.shape == (1, 1, n, n, n)
    assert fused[0, 0, x0, y0, z0] == 1.0  # both lines pass here
    peak = torch.nonzero(fused[0, 0] == fused.max())
    assert peak.tolist() == [[x0, y0, z0]]
    assert fused.sum() == n  # two lines of n voxels, each averaged with zeros
    assert (fused[0, 0, x0, :, z0].sum(), fused[0, 0, :, y0, z0].sum()) == (n / 2 + 0.5, n / 2 + 0.5)


def test_connection_c_agrees_with_the_drr_module():
    """Project a one-voxel volume with patching.projection.drr, lift both images back: they meet at the voxel."""
    n = 8
    for x0, y0, z0 in [(1, 5, 6), (6, 0, 2), (3, 7, 0)]:
        vol = torch.zeros(1, 1, n, n, n)
        vol[0, 0, x0, y0, z0] = 1.0
        images = {v: parallel_projection(vol, v, reduce="sum") for v in BOTH}
        fused = connection_c({v: expand_to_branch(images[v], n) for v in BOTH})
        assert torch.nonzero(fused[0, 0] == 1.0).tolist() == [[x0, y0, z0]]


@pytest.mark.parametrize("view", BOTH)
def test_branch_frames_invert_the_parallel_projection(view):
    g = torch.Generator().manual_seed(1)
    img = torch.rand(2, 3, 6, 6, generator=g)
    vol = branch_to_volume(expand_to_branch(img, 6), view)
    torch.testing.assert_close(parallel_projection(vol, view, reduce="mean"), img)
    torch.testing.assert_close(project(vol, view), img)
    branch = torch.rand(2, 3, 6, 6, 6, generator=g)
    torch.testing.assert_close(volume_to_branch(branch_to_volume(branch, view), view), branch)
    # the discriminator's condition is the same back-projection, resized to the volume
    torch.testing.assert_close(xray_to_volume(img, view, (6, 6, 6)), vol)


def test_axial_projection_convention():
    vol = torch.zeros(1, 1, 4, 5, 6)
    vol[0, 0, 3, 4, :] = 1.0  # patient's right-most, anterior-most column along z
    img = axial_projection(vol)
    assert img.shape == (1, 1, 5, 4)  # rows along y, cols along x
    assert img[0, 0, 0, 0] == 1.0 and img.sum() == 1.0  # row 0 anterior, col 0 patient's right


# --- the adversarial update ------------------------------------------------------------------


def test_d_step_lowers_d_loss_on_fixed_fakes():
    torch.manual_seed(0)
    cfg = tiny()
    G, D = build(cfg)
    real, xrays = sphere_batch(cfg.xray_size, cfg.volume_size)
    with torch.no_grad():
        fake = G(**xrays)
    cond = condition(xrays, cfg)
    opt = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.99))
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = discriminator_loss(D, real, fake, cond)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(discriminator_loss(D, real, fake, cond).item())
    assert losses[-1] < losses[0]
    assert all(p.grad is None for p in G.parameters())  # fake was detached


@pytest.mark.parametrize("views", [BOTH, ("pa",)])
def test_g_step_adversarial_gradient_reaches_g_not_d(views):
    torch.manual_seed(0)
    model = tiny(views)
    cfg = X2CTGANConfig(model=model, loss=X2CTGANLossConfig(recon_weight=0.0, proj_weight=0.0, adv_weight=1.0))
    G, D = build(model)
    real, xrays = sphere_batch(model.xray_size, model.volume_size)
    xrays = {v: xrays[v] for v in views}
    losses = generator_losses(G(**xrays), real, xrays, D, cfg)
    assert set(losses) == {"recon", "proj", "adv", "total"}
    losses["total"].backward()
    grads = [p.grad for p in G.parameters()]
    assert all(g is not None for g in grads)
    for name in ("head.0.weight", f"branches.{views[0]}.encoder.stem.1.weight"):
        assert G.get_parameter(name).grad.abs().sum() > 0, name
    assert all(p.grad is None for p in D.parameters())  # D frozen for the G step ...
    assert all(p.requires_grad for p in D.parameters())  # ... and unfrozen afterwards


def test_a_few_training_steps_lower_the_generator_loss():
    torch.manual_seed(0)
    model = tiny()
    cfg = X2CTGANConfig(model=model)
    G, D = build(model)
    real, xrays = sphere_batch(model.xray_size, model.volume_size)
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-3, betas=cfg.optim.betas)
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas)
    cond = condition(xrays, model)
    totals = []
    for _ in range(12):  # the released order: G step, then D step, on one forward pass
        fake = G(**xrays)
        opt_g.zero_grad()
        losses = generator_losses(fake, real, xrays, D, cfg)
        losses["total"].backward()
        opt_g.step()
        opt_d.zero_grad()
        discriminator_loss(D, real, fake.detach(), cond).backward()
        opt_d.step()
        totals.append(losses["total"].item())
    assert sum(totals[-3:]) < 0.8 * sum(totals[:3]), totals


# --- configuration and bad input -------------------------------------------------------------


def test_bad_xrays_raise_input_error():
    cfg = tiny()
    G = X2CTGenerator(cfg)
    good = xrays_for(cfg)
    with pytest.raises(InputError, match="lateral"):
        G(pa=good["pa"])  # biplanar without the lateral view
    with pytest.raises(InputError, match="B×1×32×32"):
        G(pa=torch.rand(2, 1, 64, 64), lateral=good["lateral"])
    with pytest.raises(InputError, match="pa"):
        G(pa=torch.rand(2, 3, 32, 32), lateral=good["lateral"])
    with pytest.raises(InputError, match="batch sizes"):
        G(pa=good["pa"][:1], lateral=good["lateral"])
    with pytest.raises(InputError, match="float"):
        G(pa=(good["pa"] * 255).to(torch.uint8), lateral=good["lateral"])
    single = X2CTGenerator(tiny(("pa",)))
    with pytest.raises(InputError, match="pa"):
        single(lateral=good["lateral"])


def test_bad_loss_and_discriminator_input_raise_input_error():
    cfg = X2CTGANConfig(model=tiny())
    G, D = build(cfg.model)
    xrays = xrays_for(cfg.model)
    with torch.no_grad():
        fake = G(**xrays)
    with pytest.raises(InputError, match="target"):
        generator_losses(fake, torch.zeros(2, 1, 8, 8, 8), xrays, D, cfg)
    with pytest.raises(InputError, match="cond"):
        D(fake)  # conditional D without its condition


@pytest.mark.parametrize(("change", "key"), [
    ({"volume_size": 24}, "model.volume_size"),
    ({"volume_size": 64}, "model.volume_size"),  # larger than the X-rays
    ({"xray_size": 36}, "model.xray_size"),
    ({"views": ("lateral", "pa")}, "model.views"),
    ({"views": ("ap",)}, "model.views"),
    ({"decoder_channels": (4, 8)}, "model.decoder_channels"),
    ({"output_activation": "gelu"}, "model.output_activation"),
    ({"fc_dropout": 1.0}, "model.fc_dropout"),
])
def test_bad_model_config_raises_input_error(change, key):
    with pytest.raises(InputError, match=key.replace(".", r"\.")):
        dataclasses.replace(tiny(), **change)


def test_bad_loss_and_optim_config_raise_input_error():
    from gan_baselines.x2ct_gan import GANOptimConfig

    with pytest.raises(InputError, match=r"loss\.proj_views"):
        X2CTGANLossConfig(proj_views=("coronal",))
    with pytest.raises(InputError, match=r"loss\.adv_weight"):
        X2CTGANLossConfig(adv_weight=-1.0)
    with pytest.raises(InputError, match=r"optim\.betas"):
        GANOptimConfig(betas=(0.5, 1.0))


def test_paper_defaults_and_lr_schedule():
    cfg = paper()
    assert (cfg.loss.recon_weight, cfg.loss.proj_weight, cfg.loss.adv_weight) == (10.0, 10.0, 0.1)
    assert (cfg.optim.lr, cfg.optim.betas, cfg.optim.decay_start) == (2e-4, (0.5, 0.99), 0.5)
    assert cfg.model.value_range == (0.0, 1.0) and cfg.model.conditional_d
    assert [lr_factor(s, 100, 0.5) for s in (0, 49, 50, 75, 100, 120)] == [1.0, 1.0, 1.0, 0.5, 0.0, 0.0]
