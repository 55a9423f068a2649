"""Sampling end to end from a stage-2 checkpoint: NIfTI (spacing), Zarr, PNG, mean/std for K = 2,
determinism per seed, and the VQ-GAN identity check."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import zarr

from patching.errors import InputError
from patching.store import Store
from stage2_diffusion.pipeline import sample_diffusion
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
    assert img.header.get_zooms() == pytest.approx((5.625, 5.625, 5.625))
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
