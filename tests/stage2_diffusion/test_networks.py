"""Stage-2 networks and config: X-ray encoder, latent UNet, attention backends, presets."""

from __future__ import annotations

import copy

import pytest
import torch

from patching.errors import InputError
from stage2_diffusion.attention import attend
from stage2_diffusion.config import (
    DiffusionConfig,
    SamplerConfig,
    Stage2Config,
    UNetConfig,
    XrayEncoderConfig,
    cpu_demo,
    ctpa_512,
    preset,
)
from stage2_diffusion.unet import LatentUNet3d, coordinate_channels
from stage2_diffusion.xray_encoder import XrayEncoder


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny 3D convolutions are dominated by thread synchronisation on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_encoder_config(**kw) -> XrayEncoderConfig:
    base = dict(image_size=32, channels=(8, 8, 8), num_res_blocks=1, token_grid=8, token_dim=16, norm_groups=4)
    return XrayEncoderConfig(**{**base, **kw})


def tiny_unet_config(**kw) -> UNetConfig:
    base = dict(latent_channels=4, base_channels=8, channel_mults=(1, 2), num_res_blocks=1, cross_attn_levels=(1,),
                self_attn_lowest=True, num_head_channels=8, context_dim=16, norm_groups=4)
    return UNetConfig(**{**base, **kw})


def perturb(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Add noise to every parameter: the zero-initialised outputs would make every test trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def tiny_models(seed: int = 0, **unet_kw):
    torch.manual_seed(seed)
    enc = perturb(XrayEncoder(tiny_encoder_config()), seed).eval()
    unet = perturb(LatentUNet3d(tiny_unet_config(**unet_kw)), seed + 1).eval()
    return enc, unet


# ----------------------------------------------------------------------------------------- encoder


@pytest.mark.parametrize("views, present, drop", [
    (("pa",), None, None),                                       # one-view model
    (("pa", "lateral"), None, None),                             # two views
    (("pa", "lateral"), [[True, True], [True, False]], None),    # missing lateral in sample 1
    (("pa", "lateral"), None, [False, True]),                    # null condition for sample 1
    (("pa", "lateral"), [[True, False], [True, False]], [True, False]),
])
def test_encoder_shapes(views, present, drop):
    enc = XrayEncoder(tiny_encoder_config(views=views))
    xr = torch.rand(2, len(views), 32, 32)
    present = None if present is None else torch.tensor(present)
    drop = None if drop is None else torch.tensor(drop)
    tok = enc(xr, present, drop)
    assert tok.shape == (2, len(views) * 64, 16)
    assert enc.num_tokens == len(views) * 64
    if present is not None:  # a missing view's tokens are its learned set, whatever the image holds
        for b in range(2):
            for v in range(len(views)):
                if not present[b, v] and not (drop is not None and drop[b]):
                    assert torch.equal(tok[b, v * 64 : (v + 1) * 64], enc.missing_tokens[v])
    if drop is not None:
        for b in range(2):
            if drop[b]:
                assert torch.equal(tok[b], enc.null_tokens)
    assert torch.equal(enc.null_condition(3)[2], enc.null_tokens)


def test_encoder_missing_view_ignores_its_image_and_views_differ():
    enc = perturb(XrayEncoder(tiny_encoder_config()))
    xr = torch.rand(1, 2, 32, 32)
    other = xr.clone()
    other[:, 1] = torch.rand(32, 32)
    present = torch.tensor([[True, False]])
    assert torch.equal(enc(xr, present), enc(other, present))
    assert not torch.allclose(enc(xr), enc(other))
    same = xr[:, :1].expand(1, 2, 32, 32)  # the same image as PA and lateral: view embeddings differ
    tok = enc(same)
    assert not torch.allclose(tok[:, :64], tok[:, 64:])


def test_learned_tokens_are_parameters_with_gradients():
    enc = XrayEncoder(tiny_encoder_config())
    names = {n for n, _ in enc.named_parameters()}
    assert {"missing_tokens", "null_tokens", "pos_emb", "view_emb"} <= names
    xr = torch.rand(3, 2, 32, 32)
    present = torch.tensor([[True, True], [True, False], [True, True]])
    drop = torch.tensor([False, False, True])
    (enc(xr, present, drop) ** 2).sum().backward()
    assert enc.missing_tokens.grad[1].abs().sum() > 0   # lateral missing in sample 1
    assert enc.missing_tokens.grad[0].abs().sum() == 0  # PA never missing
    assert enc.null_tokens.grad.abs().sum() > 0         # sample 2 dropped
    assert enc.pos_emb.grad.abs().sum() > 0


def test_encoder_bad_inputs():
    enc = XrayEncoder(tiny_encoder_config())
    with pytest.raises(InputError, match="xrays"):
        enc(torch.rand(1, 2, 64, 64))   # size mismatch
    with pytest.raises(InputError, match="xrays"):
        enc(torch.rand(1, 1, 32, 32))   # view count mismatch
    with pytest.raises(InputError, match="views_present"):
        enc(torch.rand(1, 2, 32, 32), torch.ones(1, 2))  # not bool
    with pytest.raises(InputError, match="drop_mask"):
        enc(torch.rand(1, 2, 32, 32), None, torch.ones(2, dtype=torch.bool))


# -------------------------------------------------------------------------------------------- UNet


@pytest.mark.parametrize("shape, coords, unet_kw", [
    ((8, 8, 8), None, {}),
    ((8, 6, 5), None, {}),                                    # not multiples of the UNet factor: padded
    ((4, 8, 4), ((4, 0, 4), (8, 8, 8)), {}),                  # crop with its place in the whole
    ((4, 4, 4), (torch.tensor([[0, 0, 0], [4, 4, 4]]), (8, 8, 8)), {}),  # per-sample crop positions
    ((8, 8, 8), None, {"use_coords": False}),
    ((8, 8, 8), None, {"cross_attn_levels": (0, 1), "self_attn_lowest": False}),
    ((4, 4, 4), None, {"channel_mults": (1, 2, 2), "num_res_blocks": 2}),
])
def test_unet_shapes(shape, coords, unet_kw):
    unet = LatentUNet3d(tiny_unet_config(**unet_kw))
    x = torch.randn(2, 4, *shape)
    tok = torch.randn(2, 40, 16)
    for t in (torch.tensor([3, 900]), 17):
        assert unet(x, t, tok, coords=coords).shape == x.shape


def test_unet_starts_at_zero_and_uses_condition_time_and_position():
    unet = LatentUNet3d(tiny_unet_config())
    x, tok = torch.randn(1, 4, 8, 8, 8), torch.randn(1, 12, 16)
    assert torch.equal(unet(x, 5, tok), torch.zeros_like(x))  # zero-initialised output conv
    perturb(unet)
    out = unet(x, 5, tok)
    assert not torch.allclose(out, unet(x, 500, tok))
    assert not torch.allclose(out, unet(x, 5, torch.randn(1, 12, 16)))
    assert not torch.allclose(out, unet(x, 5, tok, coords=((8, 8, 8), (32, 32, 32))))


def test_coordinate_channels_of_a_crop_are_the_whole_latents():
    full = coordinate_channels((0, 0, 0), (8, 7, 6), (8, 7, 6), 1)
    assert full.shape == (1, 3, 8, 7, 6)
    assert full.min() > -1 and full.max() < 1
    assert torch.allclose(full[:, 0, :, 0, 0], (2 * torch.arange(8.0) + 1) / 8 - 1)
    assert torch.allclose(full + full.flip(2, 3, 4), torch.zeros(1, 3, 8, 7, 6), atol=1e-6)  # centred
    crop = coordinate_channels((2, 3, 1), (8, 7, 6), (4, 4, 5), 1)
    assert torch.equal(crop, full[:, :, 2:6, 3:7, 1:6])
    per_sample = coordinate_channels(torch.tensor([[0, 0, 0], [2, 3, 1]]), (8, 7, 6), (4, 4, 5), 2)
    assert torch.equal(per_sample[1], crop[0]) and torch.equal(per_sample[0], full[0, :, :4, :4, :5])
    with pytest.raises(InputError, match="coords"):
        coordinate_channels((0, 0), (8, 8, 8), (4, 4, 4), 1)


def test_gradient_checkpointing_same_outputs_and_grads():
    ref = perturb(LatentUNet3d(tiny_unet_config()))
    ckpt = LatentUNet3d(tiny_unet_config(gradient_checkpointing=True))
    ckpt.load_state_dict(ref.state_dict())
    ckpt.set_gradient_checkpointing(False)
    ckpt.set_gradient_checkpointing(True)
    x, tok = torch.randn(2, 4, 8, 8, 8), torch.randn(2, 12, 16, requires_grad=True)
    outs, grads = [], []
    for model in (ref, ckpt):
        tok.grad = None
        out = model(x, torch.tensor([1, 700]), tok)
        (out**2).mean().backward()
        outs.append(out.detach())
        grads.append([p.grad.clone() for p in model.parameters()] + [tok.grad.clone()])
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-6)
    for a, b in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_unet_bad_inputs():
    unet = LatentUNet3d(tiny_unet_config())
    tok = torch.randn(1, 12, 16)
    with pytest.raises(InputError, match="latents"):
        unet(torch.randn(1, 3, 8, 8, 8), 1, tok)          # wrong latent channels
    with pytest.raises(InputError, match="tokens"):
        unet(torch.randn(1, 4, 8, 8, 8), 1, torch.randn(1, 12, 8))
    with pytest.raises(InputError, match="timesteps"):
        unet(torch.randn(1, 4, 8, 8, 8), torch.tensor([1, 2]), tok)
    with pytest.raises(InputError, match="coords"):
        unet(torch.randn(1, 4, 8, 8, 8), 1, tok, coords=(0, 0, 0))


def test_xformers_on_cpu_is_an_input_error():
    try:
        import xformers  # noqa: F401
        usable = torch.cuda.is_available()
    except ImportError:
        usable = False
    if not usable:  # no xformers or no CUDA: refused when the UNet is built
        with pytest.raises(InputError, match="attention_backend"):
            LatentUNet3d(tiny_unet_config(attention_backend="xformers"))
    q = torch.randn(1, 2, 5, 8)  # CPU tensors: refused when attention runs, wherever this runs
    with pytest.raises(InputError, match="attention_backend"):
        attend(q, q, q, "xformers")


@pytest.mark.gpu
def test_sdpa_and_xformers_agree_on_cuda():
    pytest.importorskip("xformers", reason="xformers is not installed")
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, 32, generator=g).to(dev) for n in (300, 77, 77))
    torch.testing.assert_close(attend(q, k, v, "xformers"), attend(q, k, v, "sdpa"), rtol=1e-4, atol=1e-4)
    ref = perturb(LatentUNet3d(tiny_unet_config())).to(dev)
    xf = LatentUNet3d(tiny_unet_config(attention_backend="xformers")).to(dev)
    xf.load_state_dict(ref.state_dict())
    x, tok = torch.randn(2, 4, 8, 8, 8, device=dev), torch.randn(2, 12, 16, device=dev)
    with torch.no_grad():
        torch.testing.assert_close(xf(x, 9, tok), ref(x, 9, tok), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------ config


def test_config_rejects_bad_values():
    with pytest.raises(InputError, match="encoder.image_size"):
        XrayEncoderConfig(image_size=100, channels=(8, 8), token_grid=8)
    with pytest.raises(InputError, match="encoder.views"):
        XrayEncoderConfig(views=("pa", "ap"))
    with pytest.raises(InputError, match="unet.cross_attn_levels"):
        tiny_unet_config(cross_attn_levels=(2,))
    with pytest.raises(InputError, match="unet.attention_backend"):
        tiny_unet_config(attention_backend="flash")
    with pytest.raises(InputError, match="unet.num_head_channels"):
        tiny_unet_config(num_head_channels=5)
    with pytest.raises(InputError, match="diffusion.prediction_type"):
        DiffusionConfig(prediction_type="sample")
    with pytest.raises(InputError, match="diffusion.beta_end"):
        DiffusionConfig(beta_start=0.02, beta_end=0.01)
    with pytest.raises(InputError, match="sampler.name"):
        SamplerConfig(name="euler")
    with pytest.raises(InputError, match="sampler.window"):
        SamplerConfig(window=(8, 8))
    with pytest.raises(InputError, match="unet.context_dim"):
        Stage2Config(encoder=tiny_encoder_config(), unet=tiny_unet_config(context_dim=32))
    with pytest.raises(InputError, match="sampler.window"):
        Stage2Config(encoder=tiny_encoder_config(), unet=tiny_unet_config(), sampler=SamplerConfig(window=(8, 8, 5)))
    with pytest.raises(InputError, match="--preset"):
        preset("huge")


def test_presets_and_parameter_counts():
    def count(m):
        return sum(p.numel() for p in m.parameters())

    demo = cpu_demo()
    assert preset("cpu-demo") == demo and demo.latent_shape == (16, 16, 16)
    assert demo.unet.latent_channels == 8 and demo.unet.context_dim == demo.encoder.token_dim
    assert count(LatentUNet3d(demo.unet)) == 3_053_256
    assert count(XrayEncoder(demo.encoder)) == 148_480
    big = ctpa_512()
    assert big.latent_shape == (128, 128, 151) and big.unet.latent_channels == 8
    with torch.device("meta"):  # no memory, no init cost
        assert count(LatentUNet3d(big.unet)) == 173_597_512
        assert count(XrayEncoder(big.encoder)) == 12_894_112
    # dataclasses.replace copies only the top level: presets must return fresh sections
    assert cpu_demo().unet is not demo.unet
    copy.deepcopy(big)


def test_attention_blocks_run_the_fused_kernel_not_the_math_one():
    """The blocks' q/k/v are strided views; handed over as they are, SDPA falls back to the math
    kernel that materialises the N×N weights (2.2 GB for 16×16×19 voxels). They must reach a fused one."""
    from torch.profiler import profile

    from stage2_diffusion.attention import CrossAttention3d, SelfAttention3d

    x = torch.randn(1, 16, 4, 4, 5, requires_grad=True)
    with profile() as prof:
        out = SelfAttention3d(16, 4, 2)(x) + CrossAttention3d(16, 8, 4, 2)(x, torch.randn(1, 6, 8))
        out.sum().backward()
    names = {e.name for e in prof.events()}
    assert "aten::_scaled_dot_product_attention_math" not in names
    assert any("flash_attention" in n or "efficient_attention" in n for n in names), sorted(n for n in names if "attention" in n)
