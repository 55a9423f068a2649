"""Sampling end to end from a stage-2 checkpoint: NIfTI (spacing), Zarr, PNG, mean/std for K = 2,
determinism per seed, the VQ-GAN identity check, and the in-memory DiffusionReconstructor (the
same volumes as the files, input checks)."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
import zarr

from patching.data.store import Store
from patching.errors import InputError
from stage2_diffusion.pipeline import DiffusionReconstructor, sample_diffusion
from tests.stage2_diffusion.test_task import N, encoded_store, trained_run


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    run = trained_run(tmp_path_factory)
    store, vq = encoded_store(tmp_path_factory)
    st = Store(store)
    case = st.case(st.case_ids()[0])
    xdir = tmp_path_factory.mktemp("xrays")
    np.save(xdir / "pa.npy", case.xray("pa"))
    np.save(xdir / "lat.npy", case.xray("lateral"))
    return run, vq, xdir / "pa.npy", xdir / "lat.npy"


def test_sample_writes_volumes_and_is_deterministic(setup, tmp_path):
    run, _, pa, lat = setup
    a = sample_diffusion(run, pa, lat, tmp_path / "a", steps=2, num_samples=2, seed=5, progress=False)
    assert {"nifti", "zarr", "preview", "sample_1", "mean", "std", "metadata"} <= set(a)
    img = nib.load(a["nifti"])
    assert img.shape == (32, 32, 32) and img.get_data_dtype() == np.int16
    spacing = (11.25, 11.25, 11.25)  # the store's 32³ phantoms (360 mm / 32), not the cpu-demo preset's 5.625
    assert img.header.get_zooms() == pytest.approx(spacing)
    assert sitk.ReadImage(str(a["nifti"])).GetSpacing() == pytest.approx(spacing)  # the same in ITK
    hu0 = np.asarray(img.dataobj)
    hu1 = np.asarray(nib.load(a["sample_1"]).dataobj)
    assert not np.array_equal(hu0, hu1)  # two noise draws
    mean = np.asarray(nib.load(a["mean"]).dataobj).astype(np.float64)
    std = np.asarray(nib.load(a["std"]).dataobj).astype(np.float64)
    assert np.abs(mean - (hu0.astype(float) + hu1) / 2).max() <= 0.5 + 1e-9
    assert np.abs(std - np.abs(hu0.astype(float) - hu1) / 2).max() <= 0.5 + 1e-9
    assert np.array_equal(zarr.open_array(str(a["zarr"]), mode="r")[...], hu0)
    assert a["preview"].stat().st_size > 0
    meta = json.loads(a["metadata"].read_text())
    assert meta["peak_rss_mb"] > 0 and meta["step"] == 2 * N and meta["seed"] == 5

    # Same seed → identical files' contents; another seed → another volume. PA only works (lateral missing).
    b = sample_diffusion(run, pa, lat, tmp_path / "b", steps=2, num_samples=1, seed=5, progress=False)
    assert np.array_equal(np.asarray(nib.load(b["nifti"]).dataobj), hu0)
    c = sample_diffusion(run / "checkpoints" / f"step-{2 * N}", pa, None, tmp_path / "c", steps=2, seed=6,
                         guidance=1.0, progress=False)
    assert not np.array_equal(np.asarray(nib.load(c["nifti"]).dataobj), hu0)


def test_mismatched_vqgan_is_an_input_error(setup, tmp_path):
    run, vq, pa, lat = setup
    other = vq / "checkpoints" / "step-1"  # the same run one step earlier: other weights
    with pytest.raises(InputError, match="sha256") as err:
        sample_diffusion(run, pa, lat, tmp_path / "o", steps=1, vqgan=other, progress=False)
    assert str(other) in str(err.value)
    # A checkpoint whose recorded sha was tampered with names both hashes.
    ck = tmp_path / "ck"
    shutil.copytree(run / "checkpoints" / f"step-{2 * N}", ck)
    doc = json.loads((ck / "extra.json").read_text())
    doc["state"]["vqgan"]["weights_sha256"] = "0" * 64
    (ck / "extra.json").write_text(json.dumps(doc))
    with pytest.raises(InputError, match="0" * 64):
        sample_diffusion(ck, pa, lat, tmp_path / "t", steps=1, progress=False)
    with pytest.raises(InputError, match="--pa"):
        sample_diffusion(run, None, None, tmp_path / "n", progress=False)


def test_reconstructor_matches_sample_diffusion_bit_for_bit(setup, tmp_path):
    run, _, pa, lat = setup
    files = sample_diffusion(run, pa, lat, tmp_path / "a", steps=2, num_samples=2, seed=5, progress=False)
    rec = DiffusionReconstructor(run, steps=2)
    assert rec.views == ("pa", "lateral") and rec.volume_shape == (32, 32, 32)
    assert rec.spacing_mm == (11.25, 11.25, 11.25) and rec.hu_window == (-1024.0, 1600.0)
    assert rec.step == 2 * N and rec.weights == "ema" and rec.source == run / "checkpoints" / f"step-{2 * N}"
    xrays = {"pa": np.load(pa), "lateral": np.load(lat)}
    hu = rec.reconstruct(xrays, seed=5, num_samples=2)
    assert hu.shape == (2, 32, 32, 32) and hu.dtype == np.int16
    assert np.array_equal(hu[0], np.asarray(nib.load(files["nifti"]).dataobj))
    assert np.array_equal(hu[1], np.asarray(nib.load(files["sample_1"]).dataobj))
    assert np.array_equal(rec.reconstruct(xrays, seed=5)[0], hu[0])  # the loaded models are reusable
    # PA only, float64 of another size (resized), the lateral given as None: one volume.
    small = np.asarray(xrays["pa"][::2, 1:], dtype=np.float64)
    one = rec.reconstruct({"pa": small, "lateral": None}, seed=1)
    assert one.shape == (1, 32, 32, 32) and np.array_equal(one, rec.reconstruct({"pa": small}, seed=1))
    # the analysis API: the first sample's latent, decoded, is reconstruct's first volume
    latent = rec.sample_latent(xrays, seed=5)
    assert latent.shape == (4, 8, 8, 8) and np.array_equal(rec.decode(latent), hu[0])
    whole = rec.decode(latent, tile_latent=(8, 8, 8))  # one tile: no blending at all
    assert whole.shape == hu[0].shape and not np.array_equal(whole, hu[0])  # a 2-step VQ-GAN: far apart
    windowed = rec.sample_latent(xrays, seed=5, window=(4, 4, 4), overlap=0.5)
    assert windowed.shape == latent.shape and not torch.equal(windowed, latent)


@pytest.fixture(scope="module")
def rec(setup) -> DiffusionReconstructor:
    return DiffusionReconstructor(setup[0], steps=1)


@pytest.mark.parametrize("xrays, needle", [
    ({"ap": np.zeros((8, 8))}, "unknown view 'ap'"),
    ({}, "no view given"),
    ({"pa": None}, "no view given"),
    ({"pa": np.zeros((2, 8, 8))}, "2-D"),
    ({"pa": np.full((8, 8), np.nan)}, "NaN"),
    ({"pa": np.full((8, 8), 1.5)}, r"\[0, 1\]"),
    ({"pa": np.full((8, 8), "a")}, "numeric"),
    ([np.zeros((8, 8))], "dict"),
])
def test_reconstructor_input_errors(rec, xrays, needle):
    with pytest.raises(InputError, match=needle):
        rec.reconstruct(xrays)


def test_reconstructor_option_errors(setup, rec):
    with pytest.raises(InputError, match="num_samples"):
        rec.reconstruct({"pa": np.zeros((8, 8))}, num_samples=0)
    with pytest.raises(InputError, match="seed"):
        rec.reconstruct({"pa": np.zeros((8, 8))}, seed=1.5)
    with pytest.raises(InputError, match="steps"):
        DiffusionReconstructor(setup[0], steps=0)
    with pytest.raises(InputError, match="guidance"):
        DiffusionReconstructor(setup[0], guidance=float("nan"))


def test_sample_cli_shows_progress(setup, tmp_path, capsys):
    """`xray2ct sample` turns the reconstructor's bars on: a full-size sample runs for minutes."""
    from launch.cli import main

    run, _, pa, lat = setup
    assert main(["sample", "--checkpoint", str(run), "--pa", str(pa), "--lateral", str(lat), "--out",
                 str(tmp_path / "o"), "--steps", "2", "--drr-guidance", "0", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "denoising" in err and "2/2" in err  # tqdm's bar over the two sampler steps
