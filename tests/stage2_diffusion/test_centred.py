"""Centred latents (``diffusion.center_latents``): the mean and residual scale read from the store,
the transform and its inverse on whole latents and crops, training with it, the buffers saved
with the UNet (checkpoint and diffusers-style export), and sampling adding the mean back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from launch.cli import main
from patching.data.store import Store
from patching.errors import InputError
from stage2_diffusion.config import UNetConfig
from stage2_diffusion.pipeline import DiffusionReconstructor
from stage2_diffusion.task import latent_centre
from stage2_diffusion.unet import LatentUNet3d
from tests.stage2_diffusion.test_task import encoded_store, run_ok, train_cmd

CENTRED = ("diffusion.center_latents=true", "data.crop=4,4,4")


def test_latent_centre_is_the_train_split_mean_and_residual_std(tmp_path_factory):
    store_path, _ = encoded_store(tmp_path_factory)
    store = Store(store_path)
    scale = float(store.attrs["latent_scale_factor"])
    ids = store.case_ids("train")
    z = np.stack([np.asarray(store.case(c).latent[...], dtype=np.float64) * scale for c in ids])
    mean, s = latent_centre(store, "train")
    assert mean.shape == z.shape[1:] and mean.dtype == torch.float32
    np.testing.assert_allclose(mean.numpy(), z.mean(0), rtol=1e-5, atol=1e-6)
    assert s == pytest.approx(float(np.sqrt(((z - z.mean(0)) ** 2).mean())), rel=1e-6)
    assert 0 < s < float(z.std())  # the shared anatomy is taken out


def test_to_and_from_centred_invert_on_whole_latents_and_crops():
    unet = LatentUNet3d(UNetConfig(latent_channels=2, base_channels=8, channel_mults=(1, 2), cross_attn_levels=(1,),
                                   num_head_channels=8, context_dim=8, norm_groups=4, mean_latent_shape=(6, 5, 4)))
    mean = torch.randn(2, 6, 5, 4, generator=torch.Generator().manual_seed(0))
    unet.set_centre(mean, 0.5)
    whole = torch.randn(3, 2, 6, 5, 4)
    assert torch.allclose(unet.to_centred(whole), (whole - mean) / 0.5)
    assert torch.allclose(unet.from_centred(unet.to_centred(whole)), whole, atol=1e-6)
    crop, start = torch.randn(2, 2, 2, 2, 2), torch.tensor([[0, 1, 2], [4, 3, 0]])
    expect = torch.stack([(crop[0] - mean[:, 0:2, 1:3, 2:4]) / 0.5, (crop[1] - mean[:, 4:6, 3:5, 0:2]) / 0.5])
    assert torch.allclose(unet.to_centred(crop, start), expect)
    assert torch.allclose(unet.from_centred(unet.to_centred(crop, start), start), crop, atol=1e-6)
    with pytest.raises(InputError, match="needs its start"):
        unet.to_centred(crop)
    with pytest.raises(InputError, match="expects"):
        unet.set_centre(torch.zeros(2, 4, 4, 4), 1.0)
    plain = LatentUNet3d(UNetConfig(latent_channels=2, base_channels=8, channel_mults=(1, 2), cross_attn_levels=(1,),
                                    num_head_channels=8, context_dim=8, norm_groups=4))
    assert plain.to_centred(whole) is whole and "latent_mean" not in plain.state_dict()


def test_centred_training_saves_the_mean_and_sampling_adds_it_back(tmp_path_factory, tmp_path):
    store, _ = encoded_store(tmp_path_factory)
    run = tmp_path / "run"
    run_ok(train_cmd(store, run, 2, sets=CENTRED))
    mean, s = latent_centre(Store(store), "train")

    rec = DiffusionReconstructor(run)
    unet = rec.model.unet
    assert unet.cfg.mean_latent_shape == (8, 8, 8)
    assert torch.equal(unet.latent_mean, mean) and float(unet.latent_residual_scale) == pytest.approx(s)

    # The export's UNet folder loads with the class's own from_pretrained, buffers included.
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "export")]) == 0
    loaded = LatentUNet3d.from_pretrained(str(tmp_path / "export" / "unet"))
    assert torch.equal(loaded.latent_mean, mean) and float(loaded.latent_residual_scale) == pytest.approx(s)

    # A vanishing residual scale leaves only the mean: every sample is the mean latent (VQ-GAN units).
    st = Store(store)
    case = st.case(st.case_ids("test")[0])
    xrays = {v: np.asarray(case.xray(v), dtype=np.float32) for v in ("pa", "lateral")}
    unet.set_centre(mean, 1e-7)
    lat = rec.sample_latent(xrays, seed=3)
    np.testing.assert_allclose(lat.numpy(), (mean / rec.latent_scale_factor).numpy(), rtol=1e-4, atol=1e-4)


def test_centred_latents_need_one_latent_shape(tmp_path):
    st = Store(tmp_path / "s", create=True)
    for i, n in enumerate((8, 8, 12)):
        st.write_case(f"c{i}", np.zeros((8, 8, n), np.int16), (1.0, 1.0, 1.0), np.eye(4), split="train")
        st.write_latent(f"c{i}", np.random.default_rng(i).normal(size=(2, 2, 2, n // 4)).astype(np.float32),
                        {"vqgan": {"weights_sha256": "x"}})
    st.update_store_attrs(latent_scale_factor=1.0, latent_vqgan={"weights_sha256": "x"})
    with pytest.raises(InputError, match="c2"):
        latent_centre(Store(tmp_path / "s"), "train")
