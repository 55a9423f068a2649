"""VQ-GAN model, blocks, discriminator, losses and config: shapes, invariants, updates, overfit."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from patching.data.spec import hu_to_unit
from patching.errors import InputError
from patching.phantoms.chest import synth_chest
from stage1_vqgan.blocks import (
    AttentionBlock3d,
    Downsample3d,
    ResBlock3d,
    Upsample3d,
    timestep_embedding,
)
from stage1_vqgan.config import (
    CodecConfig,
    DiscConfig,
    LossConfig,
    Stage1Config,
    VQGANConfig,
    cpu_demo,
    ctpa_512,
    preset,
)
from stage1_vqgan.discriminator import PatchDiscriminator3d, num_logits
from stage1_vqgan.losses import (
    SliceFeatureNet,
    adaptive_weight,
    build_perceptual,
    discriminator_loss,
    generator_loss,
    hinge_d_loss,
    hinge_g_loss,
    load_slice_feature_net,
)
from stage1_vqgan.model import VQGAN, load_vqgan_weights


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny 3D convolutions are dominated by thread synchronisation: on a shared 2-core machine
    one thread runs these models several times faster than two."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny(**kw) -> VQGANConfig:
    base = dict(base_channels=8, channel_mults=(1, 2, 4), num_res_blocks=1, latent_dim=4, codebook_size=32,
                norm_groups=4)
    base.update(kw)
    return VQGANConfig(**base)


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# -- config -------------------------------------------------------------------------------------


def test_presets_and_downsampling():
    for name in ("cpu-demo", "ctpa-512"):
        cfg = preset(name)
        assert cfg.model.downsample == 4
        assert all(t % 4 == 0 for t in cfg.codec.tile)
        assert tuple(t // 4 for t in cfg.codec.tile) == cfg.codec.tile_latent
    assert ctpa_512().codec.tile == (256, 256, 128)
    assert _tiny(channel_mults=(1, 2, 2, 4)).downsample == 8
    with pytest.raises(InputError, match="--preset"):
        preset("nope")


@pytest.mark.parametrize("bad, key", [
    (dict(norm_groups=3), "model.norm_groups"),
    (dict(channel_mults=()), "model.channel_mults"),
    (dict(ema_decay=1.0), "model.ema_decay"),
    (dict(codebook_size=0), "model.codebook_size"),
    (dict(padding_mode="reflect"), "model.padding_mode"),
    (dict(restart_threshold=-1.0), "model.restart_threshold"),
])
def test_model_config_rejects_bad_values(bad, key):
    with pytest.raises(InputError, match=key.replace(".", r"\.")):
        _tiny(**bad)


def test_other_configs_reject_bad_values():
    with pytest.raises(InputError, match=r"disc\.norm"):
        DiscConfig(norm="batch")  # no BatchNorm, by design
    with pytest.raises(InputError, match=r"loss\.perceptual_weights"):
        LossConfig(perceptual_weight=1.0)  # a weight without a local file
    with pytest.raises(InputError, match=r"codec\.overlap"):
        CodecConfig(overlap=1.0)
    with pytest.raises(InputError, match=r"codec\.tile"):
        Stage1Config(codec=CodecConfig(tile=(30, 32, 32)))  # not a multiple of 4
    with pytest.raises(InputError, match=r"codec\.tile"):
        Stage1Config(disc=DiscConfig(num_layers=4), codec=CodecConfig(tile=(32, 32, 32)))  # below 64


# -- shapes -------------------------------------------------------------------------------------

SHAPES = [  # (config overrides, input shape, latent shape)
    (dict(), (1, 1, 16, 16, 16), (1, 4, 4, 4, 4)),
    (dict(channel_mults=(1, 2), latent_dim=3), (2, 1, 16, 8, 24), (2, 3, 8, 4, 12)),
    (dict(in_channels=2, channel_mults=(1, 2, 2, 4), attn_mid=True, attn_heads=2, base_channels=4),
     (1, 2, 16, 16, 32), (1, 4, 2, 2, 4)),
    (dict(num_res_blocks=2, padding_mode="replicate", attn_mid=True), (1, 1, 8, 12, 16), (1, 4, 2, 3, 4)),
]


@pytest.mark.parametrize("overrides, x_shape, z_shape", SHAPES)
def test_shape_table(overrides, x_shape, z_shape):
    model = VQGAN(_tiny(**overrides))
    x = torch.randn(x_shape, generator=torch.Generator().manual_seed(0))
    z_q, idx, stats = model.encode(x)
    assert tuple(z_q.shape) == z_shape and tuple(idx.shape) == (z_shape[0], *z_shape[2:])
    out = model(x)
    assert out.recon.shape == x.shape and torch.isfinite(out.recon).all()
    assert torch.equal(model.decode_indices(idx), model.decode(model.quantizer.lookup(idx)))
    assert {"commitment_loss", "perplexity", "usage", "ema_usage", "restarted"} <= set(stats)
    print(f"\n{overrides}: {x_shape} -> {z_shape}, {_params(model):,} parameters")


def test_preset_parameter_counts():
    counts = {name: _params(VQGAN(fn().model)) for name, fn in (("cpu-demo", cpu_demo), ("ctpa-512", ctpa_512))}
    disc = {name: _params(PatchDiscriminator3d(fn().disc)) for name, fn in (("cpu-demo", cpu_demo),
                                                                           ("ctpa-512", ctpa_512))}
    print(f"\nVQ-GAN parameters: {counts}; discriminator: {disc}")
    assert 1e6 < counts["cpu-demo"] < 5e6 and 2e7 < counts["ctpa-512"] < 8e7


def test_blocks():
    x = torch.randn(2, 8, 6, 4, 8)
    assert Downsample3d(8)(x).shape == (2, 8, 3, 2, 4)
    assert Upsample3d(8)(x).shape == (2, 8, 12, 8, 16)
    assert AttentionBlock3d(8, 4, num_heads=2)(x).shape == x.shape
    block = ResBlock3d(8, 16, 4, time_dim=12)
    t_emb = timestep_embedding(torch.tensor([3.0, 500.0]), 12)
    assert t_emb.shape == (2, 12) and block(x, t_emb).shape == (2, 16, 6, 4, 8)
    with pytest.raises(ValueError, match="t_emb"):
        block(x)


def test_no_batchnorm_anywhere(tmp_path):
    path = tmp_path / "feat.safetensors"
    save_file(SliceFeatureNet().state_dict(), str(path))
    modules = [VQGAN(ctpa_512().model), VQGAN(_tiny(attn_mid=True)), PatchDiscriminator3d(ctpa_512().disc),
               PatchDiscriminator3d(DiscConfig(norm="none")), load_slice_feature_net(path)]
    for root in modules:
        for name, m in root.named_modules():
            assert not isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)), name


def test_gradient_checkpointing_gives_same_outputs_and_grads():
    cfg = _tiny(attn_mid=True)
    plain = VQGAN(cfg).train()
    ckpt = VQGAN(dataclasses.replace(cfg, gradient_checkpointing=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    results = []
    for model in (plain, ckpt):
        out = model(x, torch.Generator().manual_seed(1))
        (out.recon.square().mean() + out.stats["commitment_loss"]).backward()
        results.append((out.recon.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (r0, g0), (r1, g1) = results
    assert torch.allclose(r0, r1, atol=1e-6)
    assert g0.keys() == g1.keys() and all(torch.allclose(g0[k], g1[k], atol=1e-6) for k in g0)
    assert torch.equal(plain.quantizer.embed, ckpt.quantizer.embed)  # EMA applied exactly once each


def test_bf16_autocast_forward():
    model = VQGAN(_tiny()).train()
    x = torch.randn(2, 1, 8, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert torch.isfinite(out.recon.float()).all()
    assert out.stats["perplexity"].dtype == torch.float32 and model.quantizer.embed.dtype == torch.float32


def test_bad_model_inputs():
    model = VQGAN(_tiny())
    with pytest.raises(InputError, match="multiples of 4"):
        model(torch.randn(1, 1, 16, 16, 18))
    with pytest.raises(InputError, match=r"\(B, 1, X, Y, Z\)"):
        model(torch.randn(1, 2, 16, 16, 16))
    with pytest.raises(InputError, match="VQGAN latent"):
        model.decode(torch.randn(1, 5, 4, 4, 4))


def test_load_vqgan_weights_gives_one_line_errors():
    model = VQGAN(_tiny())
    wrapped = {f"module.{k}": v for k, v in VQGAN(_tiny()).state_dict().items()}  # DDP keys are fine
    load_vqgan_weights(model, wrapped, "ddp.safetensors")
    assert torch.equal(model.quantizer.embed, wrapped["module.quantizer.embed"])
    other = VQGAN(_tiny(codebook_size=64, base_channels=16)).state_dict()
    with pytest.raises(InputError) as err:
        load_vqgan_weights(model, other, "other.safetensors")
    msg = str(err.value)
    assert msg.startswith("other.safetensors: does not match this VQ-GAN config") and "\n" not in msg
    assert "tensors of another shape (e.g. 'encoder.conv_in.weight': (16, 1, 3, 3, 3) in the file" in msg
    partial = dict(VQGAN(_tiny()).state_dict())
    partial.pop("decoder.conv_out.weight")
    partial["extra.weight"] = torch.zeros(1)
    with pytest.raises(InputError, match="1 missing keys .*decoder.conv_out.weight.*1 unexpected"):
        load_vqgan_weights(model, partial, "partial.safetensors")
    with pytest.raises(InputError, match="is not a VQ-GAN checkpoint"):
        load_vqgan_weights(model, {"net.0.weight": torch.zeros(1)}, "unet.safetensors")
    with pytest.raises(InputError, match="not a state dict"):
        load_vqgan_weights(model, [1, 2], "list.pt")


# -- discriminator and losses -------------------------------------------------------------------


@pytest.mark.parametrize("layers, side", [(2, 16), (2, 32), (3, 32)])
def test_discriminator_shapes(layers, side):
    disc = PatchDiscriminator3d(DiscConfig(channels=8, num_layers=layers))
    out = disc(torch.randn(2, 1, side, side, side))
    n = num_logits(side, layers)
    assert out.shape == (2, 1, n, n, n) and n >= 1
    with pytest.raises(ValueError, match="minimum"):
        disc(torch.randn(1, 1, 2 ** (layers + 2) - 4, 32, 32))


def test_hinge_losses_on_hand_made_logits():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert float(hinge_d_loss(real, fake)) == pytest.approx(0.5 * (0.25 + 0.5))
    assert float(hinge_g_loss(fake)) == pytest.approx(1.0)


def test_adaptive_weight_is_the_gradient_norm_ratio():
    w = nn.Parameter(torch.tensor([1.0, 2.0]))
    rec, gen = (3 * w).sum(), (w**2).sum()  # grads: (3, 3) and (2, 4)
    lam = adaptive_weight(rec, gen, w, max_weight=1e4, eps=0.0)
    assert float(lam) == pytest.approx(math.sqrt(18) / math.sqrt(20)) and not lam.requires_grad
    assert float(adaptive_weight((3 * w).sum(), (1e-9 * w).sum(), w, max_weight=7.0)) == 7.0


def test_one_discriminator_step_lowers_its_hinge_loss():
    torch.manual_seed(0)
    cfg = DiscConfig(channels=8, num_layers=2, start_step=0)
    disc = PatchDiscriminator3d(cfg)
    opt = torch.optim.Adam(disc.parameters(), 1e-3)
    g = torch.Generator().manual_seed(0)
    real = torch.randn(2, 1, 16, 16, 16, generator=g).clamp(-1, 1)
    fake = torch.nn.functional.avg_pool3d(real, 3, 1, 1)  # a blurred "reconstruction"
    before, _ = discriminator_loss(disc, real, fake, step=5, disc_cfg=cfg)
    opt.zero_grad()
    before.backward()
    opt.step()
    after, logs = discriminator_loss(disc, real, fake, step=5, disc_cfg=cfg)
    assert float(after.detach()) < float(before.detach())
    assert set(logs) == {"loss_d", "logits_real", "logits_fake"}
    off, _ = discriminator_loss(disc, real, fake, step=0, disc_cfg=dataclasses.replace(cfg, start_step=10))
    assert float(off.detach()) == 0.0  # delayed start


def test_adversarial_gradient_reaches_the_decoder_only_when_active():
    torch.manual_seed(0)
    model = VQGAN(_tiny()).train()
    dcfg = DiscConfig(channels=8, num_layers=2, start_step=100, weight=0.8)
    disc = PatchDiscriminator3d(dcfg)
    lcfg = LossConfig()
    x = torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    calls = []

    def frozen_disc(img):  # what the engine's ctx.frozen("disc") gives: no grads for D's weights
        calls.append(1)
        disc.requires_grad_(False)
        try:
            return disc(img)
        finally:
            disc.requires_grad_(True)

    def decoder_grads(step):
        model.zero_grad()
        m = copy.deepcopy(model)  # same codebook state for every call
        out = m(x, torch.Generator().manual_seed(2))
        loss, logs = generator_loss(x, out.recon, out.stats, frozen_disc, step=step, loss_cfg=lcfg, disc_cfg=dcfg,
                                    last_layer=m.last_layer)
        loss.backward()
        return {n: p.grad.clone() for n, p in m.decoder.named_parameters()}, logs

    g_off, logs_off = decoder_grads(step=99)
    assert not calls and float(logs_off["g_adv"]) == 0.0 and float(logs_off["disc_weight"]) == 0.0
    g_on, logs_on = decoder_grads(step=100)
    assert calls and float(logs_on["disc_weight"]) > 0.0
    assert any(not torch.allclose(g_off[k], g_on[k]) for k in g_off)
    assert all(p.grad is None for p in disc.parameters())  # D got nothing from the G step
    assert set(logs_on) == set(logs_off)


def test_perceptual_loss_from_a_local_safetensors_file(tmp_path):
    net = SliceFeatureNet(channels=(4, 8), convs_per_stage=(1, 2))
    path = tmp_path / "slice_features.safetensors"
    save_file(net.state_dict(), str(path))
    perc = build_perceptual(LossConfig(perceptual_weight=0.5, perceptual_weights=str(path), perceptual_slices=3))
    assert [len(s) // 2 for s in perc.net.stages] == [1, 2]
    assert not any(p.requires_grad for p in perc.parameters())
    x = torch.rand(1, 1, 16, 16, 16) * 2 - 1
    assert float(perc(x, x.clone())) == 0.0
    y = (x + 0.3 * torch.randn_like(x)).requires_grad_(True)
    loss = perc(x, y, torch.Generator().manual_seed(0))  # (target, reconstruction)
    loss.backward()
    assert float(loss.detach()) > 0 and y.grad.abs().sum() > 0
    assert build_perceptual(LossConfig()) is None  # off without a file


def test_perceptual_weights_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(InputError, match="missing.safetensors: .*not found"):
        load_slice_feature_net(missing)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00\x01not a safetensors file")
    with pytest.raises(InputError, match="corrupt.safetensors: cannot be read"):
        load_slice_feature_net(corrupt)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"conv.weight": torch.zeros(3, 3)}, str(foreign))
    with pytest.raises(InputError, match="foreign.safetensors: is not a SliceFeatureNet"):
        load_slice_feature_net(foreign)


# -- overfit ------------------------------------------------------------------------------------


def _psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    return 10 * math.log10(data_range**2 / float((a - b).square().mean()))


@pytest.mark.slow
def test_tiny_model_overfits_one_phantom_tile():
    """The quantizer stays in the loop; a ×4 model with a codebook larger than the 4³ latent.

    Batch = two copies of the one tile: on CPU, torch sends batch-1 convolutions this small to
    its slow native kernel (oneDNN only from batch 2), so this is ~2× faster per step.
    """
    hu = synth_chest((32, 32, 32), seed=0).hu.astype(np.float32)
    tile = torch.from_numpy(hu_to_unit(hu, (-1024.0, 1600.0)))[8:24, 8:24, 8:24]  # central 16³ tile
    x = tile[None, None].expand(2, 1, 16, 16, 16).contiguous()
    torch.manual_seed(0)
    cfg = VQGANConfig(base_channels=8, channel_mults=(1, 1, 2), num_res_blocks=1, latent_dim=16, codebook_size=256,
                      norm_groups=4, ema_decay=0.9, restart_threshold=0.01)
    model = VQGAN(cfg).train()
    opt = torch.optim.Adam(model.parameters(), 5e-4)
    g = torch.Generator().manual_seed(0)
    for _ in range(250):
        out = model(x, g)
        loss = (out.recon - x).abs().mean() + out.stats["commitment_loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        out = model(x[:1])
    psnr = _psnr(out.recon, x[:1])
    print(f"\noverfit PSNR {psnr:.2f} dB, codes used {int(out.stats['usage'] * 256)}/256, "
          f"{_params(model):,} parameters")
    assert psnr >= 30.0
