"""Sampling a GAN baseline from X-ray files: checkpoint / `latest` / run dir / export inputs,
EMA weights, NIfTI (shape, spacing, affine, int16), Zarr and PNG outputs, and bad input."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
import zarr
from PIL import Image
from safetensors.torch import load_file

from gan_baselines.sampling import (
    GAN_TASKS,
    checkpoint_preset,
    checkpoint_task,
    load_generator,
    reconstruct_hu,
    sample_gan,
)
from launch.export import main as export_main
from launch.presets import data_spec
from patching.artifacts.format import WEIGHTS_NAME
from patching.data.spec import VolumeSpec
from patching.data.store import Store
from patching.data.synth_store import synthesize
from patching.data.xray_io import resize_xray
from patching.errors import InputError

from .test_tasks import RUN, TINY


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """A 2-step tiny X2CT-GAN run (biplanar, EMA), its export, and one case's X-rays as files."""
    from accelerate.state import AcceleratorState, GradientState

    from launch.train import main

    root = tmp_path_factory.mktemp("sample")
    store = root / "store.zarr"
    synthesize(Store(store, create=True), 3, (32, 32, 32), xray_size=64, workers=1, progress=False)
    common = ["--store", str(store), "--preset", "cpu-demo", "--max-steps", "2", "--set", *TINY, *RUN]
    try:
        assert main(["x2ct-gan", "--output-dir", str(root / "gan"), *common]) == 0
        assert main(["x2ct-gan", "--output-dir", str(root / "single"), *common, "model.views=pa"]) == 0
        assert main(["tests.launch.toy_task:ToyTask", "--output-dir", str(root / "toy"), *common[:4],
                     "--max-steps", "1"]) == 0
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    assert export_main(["--checkpoint", str(root / "gan"), "--out", str(root / "export")]) == 0
    case = Store(store).case(Store(store).case_ids()[0])
    pa, lateral = root / "pa.png", root / "lateral.npy"
    Image.fromarray((case.xray("pa") * 255).round().astype(np.uint8)).save(pa)
    np.save(lateral, case.xray("lateral"))
    return {"root": root, "pa": pa, "lateral": lateral}


def test_writes_nifti_zarr_and_png_at_the_presets_grid(run, tmp_path):
    spec = data_spec("cpu-demo")
    files = sample_gan(run["root"] / "gan" / "checkpoints" / "step-2", run["pa"], run["lateral"], tmp_path / "o", spec)
    assert files == {"nifti": tmp_path / "o" / "volume.nii.gz", "zarr": tmp_path / "o" / "volume.zarr",
                     "preview": tmp_path / "o" / "preview.png", "metadata": tmp_path / "o" / "sample.json"}
    img = nib.load(files["nifti"])
    assert img.shape == spec.shape == (64, 64, 64) and img.get_data_dtype() == np.int16
    assert img.header.get_zooms() == pytest.approx(spec.spacing_mm) and np.allclose(img.affine, spec.affine())
    hu = np.asarray(img.dataobj)
    lo, hi = spec.hu_window
    assert lo <= hu.min() and hu.max() <= hi and hu.std() > 0
    arr = zarr.open_array(str(files["zarr"]), mode="r")
    assert arr.dtype == np.int16 and np.array_equal(arr[...], hu)
    assert arr.attrs["spacing_mm"] == list(spec.spacing_mm) and arr.attrs["weights"] == "ema"
    assert Image.open(files["preview"]).size[0] > 3 * 256  # three planes and two X-rays
    assert not [p for p in (tmp_path / "o").iterdir() if p.name.startswith(".")]  # nothing left aside
    # written again over the old files (atomic replace), same result
    again = sample_gan(run["root"] / "gan" / "checkpoints" / "step-2", run["pa"], run["lateral"], tmp_path / "o", spec)
    assert np.array_equal(np.asarray(nib.load(again["nifti"]).dataobj), hu)


def test_every_way_to_name_the_weights_gives_the_ema_generator(run, tmp_path):
    spec = VolumeSpec((40, 36, 30), (2.0, 3.0, 4.0))  # any grid: trilinear from the model's cube
    gan = run["root"] / "gan"
    paths = [gan / "checkpoints" / "latest", gan, gan / "checkpoints", run["root"] / "export"]
    volumes = []
    for i, p in enumerate(paths):
        files = sample_gan(p, run["pa"], run["lateral"], tmp_path / str(i), spec)
        img = nib.load(files["nifti"])
        assert img.shape == (40, 36, 30) and img.header.get_zooms() == pytest.approx((2.0, 3.0, 4.0))
        volumes.append(np.asarray(img.dataobj))
    assert all(np.array_equal(volumes[0], v) for v in volumes[1:])
    loaded = load_generator(gan)
    assert (loaded.task, loaded.step, loaded.weights, loaded.preset) == ("x2ct-gan", 2, "ema", "cpu-demo")
    assert checkpoint_preset(run["root"] / "export") == "cpu-demo"
    assert checkpoint_task(run["root"] / "export") == "x2ct-gan" and checkpoint_task(run["root"] / "toy") == "toy"
    assert "toy" not in GAN_TASKS
    ema = load_generator(run["root"] / "export").generator.state_dict()
    raw_state = load_file(gan / "checkpoints" / "step-2" / "models" / "generator.safetensors")
    assert any(not torch.equal(ema[k], raw_state[k]) for k in raw_state)  # the EMA lags the raw weights


def test_single_view_model_takes_the_pa_only(run, tmp_path):
    spec = data_spec("cpu-demo")
    files = sample_gan(run["root"] / "single", run["pa"], None, tmp_path / "s", spec)
    assert nib.load(files["nifti"]).shape == (64, 64, 64)
    with pytest.raises(InputError, match="--lateral: this x2ct-gan model is single-view"):
        sample_gan(run["root"] / "single", run["pa"], run["lateral"], tmp_path / "s", spec)


def test_reconstruct_matches_the_generator_on_its_cube(run):
    loaded = load_generator(run["root"] / "gan")
    n = loaded.cfg.model.volume_size
    spec = VolumeSpec((n, n, n), (1.0, 1.0, 1.0))
    xrays = {"pa": np.asarray(Image.open(run["pa"]), dtype=np.float32) / 255, "lateral": np.load(run["lateral"])}
    hu = reconstruct_hu(loaded, xrays, spec)
    with torch.no_grad():
        s = loaded.cfg.model.xray_size
        cube = loaded.generator(**{v: torch.from_numpy(resize_xray(x, (s, s)))[None, None] for v, x in xrays.items()})
    want = np.rint((cube[0, 0].clamp(0, 1).numpy()) * 2624.0 - 1024.0).astype(np.int16)  # [0, 1] → window
    assert np.abs(hu.astype(int) - want.astype(int)).max() <= 1


def test_bad_input_is_one_line_errors(run, tmp_path):
    spec = data_spec("cpu-demo")
    gan = run["root"] / "gan"
    with pytest.raises(InputError, match="--lateral: this x2ct-gan model is biplanar"):
        sample_gan(gan, run["pa"], None, tmp_path / "o", spec)
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    with pytest.raises(InputError, match="broken.png: unreadable or corrupt image"):
        sample_gan(gan, broken, run["lateral"], tmp_path / "o", spec)
    with pytest.raises(InputError, match="missing.png: no such file"):
        sample_gan(gan, tmp_path / "missing.png", run["lateral"], tmp_path / "o", spec)
    with pytest.raises(InputError, match="task 'toy', not of a GAN baseline"):
        sample_gan(run["root"] / "toy", run["pa"], run["lateral"], tmp_path / "o", spec)
    with pytest.raises(InputError, match="no such file or directory"):
        sample_gan(tmp_path / "nothing", run["pa"], run["lateral"], tmp_path / "o", spec)
    with pytest.raises(InputError, match="not a checkpoint"):
        sample_gan(tmp_path, run["pa"], run["lateral"], tmp_path / "o", spec)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="exists and is not a directory"):
        sample_gan(gan, run["pa"], run["lateral"], tmp_path / "file", spec)
    # weights that do not fit the saved config
    bad = tmp_path / "bad"
    shutil.copytree(run["root"] / "export", bad)
    shutil.copyfile(bad / "discriminator.safetensors", bad / "generator" / WEIGHTS_NAME)
    with pytest.raises(InputError, match="generator weights do not match"):
        sample_gan(bad, run["pa"], run["lateral"], tmp_path / "o", spec)
    assert not (tmp_path / "o").exists()  # nothing written by a failed call


def test_without_a_spec_the_volume_has_the_training_cases_grid(run, tmp_path):
    """Sampling reads the grid from the checkpoint (the store's 32³ phantoms at 360/32 mm), not a
    preset: `xray2ct sample` needs no geometry setting."""
    from gan_baselines.sampling import GanReconstructor
    from patching.artifacts.reconstruct import sample_files

    for path in (run["root"] / "gan", run["root"] / "export"):
        rec = GanReconstructor.from_path(path)
        assert rec.geometry == VolumeSpec((32, 32, 32), (11.25, 11.25, 11.25), (-1024.0, 1600.0))
    files = sample_files(rec, run["pa"], run["lateral"], tmp_path / "o")
    img = nib.load(files["nifti"])
    assert img.shape == (32, 32, 32) and img.header.get_zooms() == pytest.approx((11.25,) * 3)
