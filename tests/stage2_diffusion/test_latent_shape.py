"""Stage 2 reads its latent grid and output geometry from the data (issue: a non-cubic store was
refused until `--set latent_shape=...`): `data synth --shape 32 32 40` → encode → `train diffusion`
with no shape setting → a sample of 32×32×40 at the store's spacing; mixed shapes name the odd case."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from launch.cli import main
from patching.data.store import Store
from patching.errors import InputError
from stage1_vqgan.encode import encode_store
from stage2_diffusion.pipeline import sample_diffusion
from stage2_diffusion.task import store_latent_shape
from tests.launch.toy_task import REPO, child_env
from tests.stage2_diffusion.test_task import TINY, encoded_store

WHOLE = tuple(s for s in TINY if not s.startswith(("latent_shape=", "data.crop=")))  # nothing about shapes


def test_store_latent_shape_agrees_or_names_the_odd_case():
    ids = ["a", "b", "c"]
    assert store_latent_shape(ids, [(4, 8, 8, 10)] * 3, mixed_ok=False, where="s") == (8, 8, 10)
    with pytest.raises(InputError, match=r"case 'b' has a latent of \(8, 8, 8\), the other 2 training case\(s\) \(8, 8, 10\)"):
        store_latent_shape(ids, [(4, 8, 8, 10), (4, 8, 8, 8), (4, 8, 8, 10)], mixed_ok=False, where="s")
    # With crops, mixed shapes train; sampling makes the most common one.
    assert store_latent_shape(ids, [(4, 8, 8, 8), (4, 8, 8, 10), (4, 8, 8, 10)], mixed_ok=True, where="s") == (8, 8, 10)


def _train(store, out, sets=()) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "launch.train", "diffusion", "--store", str(store), "--preset", "cpu-demo",
           "--output-dir", str(out), "--max-steps", "1", "--set", *WHOLE, "train.batch_size=1",
           "train.num_workers=0", "train.val_every=0", *sets]
    return subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)


def test_non_cubic_store_trains_and_samples_without_shape_settings(tmp_path_factory, tmp_path):
    _, vq = encoded_store(tmp_path_factory)  # a tiny VQ-GAN (×4) trained on 32³ phantoms
    store = tmp_path / "s.zarr"
    assert main(["data", "synth", "--store", str(store), "--num", "4", "--shape", "32", "32", "40",
                 "--workers", "1", "--xray-size", "32"]) == 0
    assert Store(store).case(Store(store).case_ids()[0]).spacing_mm == pytest.approx((5.625,) * 3)  # the preset's
    encode_store(store, vq, progress=False)
    proc = _train(store, tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = tmp_path / "run" / "checkpoints" / "step-1"
    assert json.loads((ckpt / "config.json").read_text())["config"]["latent_shape"] == [8, 8, 10]
    assert json.loads((ckpt / "extra.json").read_text())["state"]["volume"]["shape"] == [32, 32, 40]
    pa = tmp_path / "pa.npy"
    st = Store(store)
    np.save(pa, st.case(st.case_ids()[0]).xray("pa"))
    files = sample_diffusion(tmp_path / "run", pa, None, tmp_path / "out", steps=1, progress=False)
    img = nib.load(files["nifti"])
    assert img.shape == (32, 32, 40) and img.header.get_zooms() == pytest.approx((5.625,) * 3)
    assert sitk.ReadImage(str(files["nifti"])).GetSize() == (32, 32, 40)

    # One training case of another shape: one line naming it, exit 2 (a data.crop would train).
    assert main(["data", "synth", "--store", str(store), "--num", "1", "--shape", "32", "32", "32",
                 "--seed", "9", "--workers", "1", "--xray-size", "32"]) == 0
    Store(store).set_split("phantom-s9-0000", "train")
    encode_store(store, vq, progress=False)
    bad = _train(store, tmp_path / "bad")
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1, bad.stderr[-3000:]
    assert "case 'phantom-s9-0000' has a latent of (8, 8, 8)" in lines[0] and "Traceback" not in bad.stderr


def test_decode_writes_int16_slabs_equal_to_the_in_memory_decode(tmp_path_factory):
    """The sampler's decode never holds a float32 volume: the stitcher writes finished slabs into an
    int16 target (rounded, clipped); the result is the in-memory decode rounded."""
    import torch

    from stage1_vqgan.codec import decode_latent
    from stage2_diffusion.pipeline import DiffusionReconstructor
    from tests.stage2_diffusion.test_task import trained_run

    rec = DiffusionReconstructor(trained_run(tmp_path_factory), device="cpu")
    latent = torch.randn((4, 8, 8, 10), generator=torch.Generator().manual_seed(0))  # 2×2×3 tiles of 4³
    hu = rec.decode(latent)
    ref = decode_latent(rec.vq.model, latent, rec.vq.codec.tile_latent, rec.vq.codec.overlap,
                        hu_window=rec.hu_window)[0].numpy()
    assert hu.dtype == np.int16 and hu.shape == (32, 32, 40)
    assert np.abs(hu.astype(np.float64) - np.clip(np.rint(ref), -32768, 32767)).max() <= 1  # float order only
