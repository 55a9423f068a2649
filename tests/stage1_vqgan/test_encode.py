"""The latent cache (``encode_store``): shapes, references, resumability, the scale factor and
its NaN guard, weights of another task, and bad inputs to the codec."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from launch.export import export_checkpoint
from launch.train import main as train_main
from patching.artifacts.format import WEIGHTS_NAME
from patching.data.spec import centred_affine
from patching.data.store import Store
from patching.data.synth_store import synthesize
from patching.errors import InputError
from stage1_vqgan.codec import decode_latent, encode_volume
from stage1_vqgan.encode import encode_store, load_vqgan, same_identity

TINY = ["model.base_channels=8", "model.channel_mults=1,1,2", "model.attn_mid=false", "model.latent_dim=4",
        "model.codebook_size=32", "disc.channels=8", "disc.num_layers=2", "codec.tile=16,16,16",
        "codec.tile_latent=4,4,4", "train.batch_size=2", "train.num_workers=0", "train.val_every=0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A store of 5 phantoms 32³ (3 train, 1 val, 1 test), a 2-step vqgan run and its export."""
    root = tmp_path_factory.mktemp("enc")
    store = root / "store"
    synthesize(Store(store, create=True), 5, (32, 32, 32), views=(), workers=1, progress=False)
    run = root / "run"
    assert train_main(["vqgan", "--store", str(store), "--output-dir", str(run), "--max-steps", "2", "--set", *TINY]) == 0
    export = export_checkpoint(run, root / "export")
    return {"root": root, "store": store, "run": run, "export": export}


@pytest.fixture
def store(trained, tmp_path) -> Path:
    """A fresh copy of the store for each test (encoding writes into it)."""
    return Path(shutil.copytree(trained["store"], tmp_path / "store"))


def test_encode_writes_latents_skips_on_rerun_and_stores_the_scale(trained, store):
    summary = encode_store(store, trained["run"], progress=False)
    s = Store(store)
    assert summary["encoded"] == s.case_ids() and summary["skipped"] == []
    ref = summary["vqgan"]
    assert ref["weights"] == "ema" and ref["step"] == 2 and len(ref["weights_sha256"]) == 64
    assert ref["tile"] == [16, 16, 16] and ref["hu_window"] == [-1024.0, 1600.0]
    latents = []
    for cid in s.case_ids():
        case = s.case(cid)
        lat = case.latent
        assert lat.shape == (4, 8, 8, 8) and lat.dtype == np.float32  # (C, X/4, Y/4, Z/4)
        assert same_identity(dict(lat.attrs)["vqgan"], ref)
        # made of codebook vectors only (blend, then quantize)
        codes = load_file(trained["run"] / "checkpoints" / "step-2" / "ema" / "vqgan.safetensors")["quantizer.embed"]
        flat = torch.from_numpy(np.asarray(lat[...])).reshape(4, -1).T
        assert (flat[:, None] - codes[None]).abs().amax(-1).min(1).values.max() == 0  # (N, K) exact
        if case.split == "train":
            latents.append(np.asarray(lat[...], dtype=np.float64))
    std = np.concatenate([x.ravel() for x in latents]).std()
    assert summary["num_scale_cases"] == 3
    assert summary["latent_scale_factor"] == pytest.approx(1 / std, rel=1e-9)
    attrs = Store(store).attrs
    assert np.isfinite(attrs["latent_scale_factor"]) and attrs["latent_scale_factor"] == summary["latent_scale_factor"]
    assert same_identity(attrs["latent_vqgan"], ref)

    # a re-run skips every case; the export of the same checkpoint has the same weights identity
    again = encode_store(store, trained["export"], progress=False)
    assert again["encoded"] == [] and again["skipped"] == s.case_ids()
    assert again["vqgan"]["weights_sha256"] == ref["weights_sha256"] and again["vqgan"]["source"] != ref["source"]


def test_stale_latents_are_reencoded_and_a_split_encodes_only_its_cases(trained, store):
    first = encode_store(store, trained["run"], split="val", progress=False)
    s = Store(store)
    assert first["encoded"] == s.case_ids("val") and first["latent_scale_factor"] is None  # no train latents yet
    cid = s.case_ids("train")[0]
    s.write_latent(cid, np.zeros((4, 8, 8, 8), np.float32), attrs={"vqgan": {"weights_sha256": "other"}})
    second = encode_store(store, trained["run"], split="train", progress=False)
    assert second["encoded"] == s.case_ids("train") and second["num_scale_cases"] == 3
    assert np.abs(np.asarray(Store(store).case(cid).latent[...])).max() > 0


def _broken_export(trained, tmp_path: Path, edit) -> Path:
    out = Path(shutil.copytree(trained["export"], tmp_path / "broken"))
    sd = load_file(out / "vqgan" / WEIGHTS_NAME)
    edit(sd)
    save_file(sd, str(out / "vqgan" / WEIGHTS_NAME))
    return out


def test_a_collapsed_codebook_cannot_store_a_scale_factor(trained, store, tmp_path):
    def collapse(sd):  # every code the same constant vector: every latent value equal, std 0
        sd["quantizer.embed"].fill_(0.25)

    with pytest.raises(InputError, match="scale factor would not be finite"):
        encode_store(store, _broken_export(trained, tmp_path, collapse), progress=False)
    assert "latent_scale_factor" not in Store(store).attrs


def test_nan_weights_are_refused_before_anything_is_stored(trained, store, tmp_path):
    def poison(sd):
        sd["encoder.conv_out.bias"][:] = float("nan")

    with pytest.raises(InputError, match="non-finite values in 1 tensors"):
        encode_store(store, _broken_export(trained, tmp_path, poison), progress=False)
    assert not any(Store(store).case(c).has_latent for c in Store(store).case_ids())


def test_weights_of_another_task_or_path_are_input_errors(trained, store, tmp_path):
    toy = tmp_path / "toy"
    assert train_main(["tests.launch.toy_task:ToyTask", "--store", "unused", "--output-dir", str(toy),
                       "--max-steps", "1", "--set", "train.num_workers=0"]) == 0
    with pytest.raises(InputError, match="checkpoint of another model") as err:
        encode_store(store, toy, progress=False)
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="checkpoint of another model"):
        encode_store(store, export_checkpoint(toy, tmp_path / "toy-export"), progress=False)
    with pytest.raises(InputError, match="no such file"):
        encode_store(store, tmp_path / "missing", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="not a checkpoint"):
        encode_store(store, tmp_path / "empty", progress=False)
    with pytest.raises(InputError, match="no complete cases"):
        encode_store(Store(tmp_path / "new", create=True).path, trained["run"], progress=False)


def test_small_volumes_are_padded_and_bad_shapes_are_named(trained, tmp_path):
    s = Store(tmp_path / "odd", create=True)
    hu = np.full((12, 8, 4), -1024, np.int16)  # smaller than the 16³ tile on every axis
    hu[4:8, 2:6, :] = 40
    s.write_case("small", hu, (5.0, 5.0, 5.0), centred_affine(hu.shape, (5.0,) * 3), split="train")
    summary = encode_store(s.path, trained["run"], progress=False)
    assert summary["encoded"] == ["small"] and s.case("small").latent.shape == (4, 3, 2, 1)
    s.write_case("bad", np.zeros((10, 8, 8), np.int16), (5.0,) * 3, np.eye(4), split="val")
    with pytest.raises(InputError, match=r"bad: cannot be encoded: .*multiples of the VQ-GAN's downsampling factor 4"):
        encode_store(s.path, trained["run"], progress=False)


def test_the_decoder_rejects_latents_of_the_wrong_shape(trained):
    vq = load_vqgan(trained["export"], "cpu")
    latent = encode_volume(vq.model, torch.zeros(1, 16, 16, 16), vq.codec.tile)
    assert tuple(decode_latent(vq.model, latent, vq.codec.tile_latent).shape) == (1, 16, 16, 16)
    for bad in (torch.zeros(8, 4, 4, 4), torch.zeros(4, 4, 4), torch.zeros(1, 4, 4, 4, 4)):
        with pytest.raises(InputError, match=r"needs shape \(4, x, y, z\)"):
            decode_latent(vq.model, bad, vq.codec.tile_latent)
    config = json.loads((trained["export"] / "config.json").read_text())
    assert config["task"] == "vqgan" and config["models"]["vqgan"]["weights"] == "ema"
