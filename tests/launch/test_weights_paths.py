"""Every command that takes weights accepts every way to name them: the run directory ``D``,
``D/checkpoints``, the ``latest`` pointer, a ``step-N`` directory and an export directory
(one test for all commands, through the CLI as a user types them)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from launch.cli import main
from patching.data.store import Store
from patching.data.synth_store import synthesize
from tests.gan_baselines.test_cncl import RUN as CNCL_RUN
from tests.gan_baselines.test_cncl import TINY as CNCL_TINY
from tests.gan_baselines.test_cncl import write_ct
from tests.gan_baselines.test_tasks import RUN as GAN_RUN
from tests.gan_baselines.test_tasks import TINY as GAN_TINY
from tests.stage1_vqgan.test_encode import TINY as VQ_TINY

FORMS = ("run", "checkpoints", "latest", "step", "export")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """A 5-case 32³ store, 2-step vqgan, x2ct-gan and cncl runs, their exports, one case's X-rays as files."""
    from accelerate.state import AcceleratorState, GradientState

    root = tmp_path_factory.mktemp("paths")
    store = root / "store.zarr"
    synthesize(Store(store, create=True), 5, (32, 32, 32), xray_size=32, workers=1, progress=False)
    common = ["--store", str(store), "--max-steps", "2", "--set"]
    try:
        assert main(["train", "vqgan", "--output-dir", str(root / "vqgan"), *common, *VQ_TINY]) == 0
        assert main(["train", "x2ct-gan", "--output-dir", str(root / "x2ct-gan"), *common, *GAN_TINY, *GAN_RUN]) == 0
        assert main(["train", "cncl", "--output-dir", str(root / "cncl"), *common, *CNCL_TINY, *CNCL_RUN]) == 0
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    for name in ("vqgan", "x2ct-gan", "cncl"):
        assert main(["export", "--checkpoint", str(root / name), "--out", str(root / f"{name}-export")]) == 0
    case = Store(store).case(Store(store).case_ids("test")[0])
    for view in ("pa", "lateral"):
        np.save(root / f"{view}.npy", case.xray(view))
    return {"root": root, "store": store}


def weights(runs: dict, name: str, form: str) -> Path:
    run = runs["root"] / name
    return {"run": run, "checkpoints": run / "checkpoints", "latest": run / "checkpoints" / "latest",
            "step": run / "checkpoints" / "step-2", "export": runs["root"] / f"{name}-export"}[form]


def _export(runs, form, out):
    assert main(["export", "--checkpoint", str(weights(runs, "x2ct-gan", form)), "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["step"] == 2


def _encode(runs, form, out):
    store = shutil.copytree(runs["store"], out / "store.zarr")
    assert main(["encode", "--store", str(store), "--vqgan", str(weights(runs, "vqgan", form)), "--device", "cpu"]) == 0
    assert all(Store(store).case(c).has_latent for c in Store(store).case_ids())


def _sample(runs, form, out):
    r = runs["root"]
    assert main(["sample", "--checkpoint", str(weights(runs, "x2ct-gan", form)), "--pa", str(r / "pa.npy"),
                 "--lateral", str(r / "lateral.npy"), "--out", str(out), "--device", "cpu"]) == 0
    assert nib.load(out / "volume.nii.gz").shape == (32, 32, 32)  # the training cases' grid (the checkpoint's)


def _evaluate(runs, form, out):
    assert main(["evaluate", "--store", str(runs["store"]), "--method", f"gan={weights(runs, 'x2ct-gan', form)}",
                 "--out", str(out), "--no-mean-baseline", "--figure-cases", "0", "--device", "cpu"]) == 0
    assert json.loads((out / "results.json").read_text())["rows"] == ["gan"]


def _denoise(runs, form, out):
    out.mkdir()
    write_ct(out / "ct.nii.gz")
    assert main(["denoise", "--checkpoint", str(weights(runs, "cncl", form)), "--input", str(out / "ct.nii.gz"),
                 "--out", str(out / "den.nii.gz")]) == 0
    assert nib.load(out / "den.nii.gz").shape == (37, 29, 5)


COMMANDS = {"export": _export, "encode": _encode, "sample": _sample, "evaluate": _evaluate, "denoise": _denoise}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("command", COMMANDS)
def test_every_weights_command_takes_every_path_form(runs, command, form, tmp_path):
    from accelerate.state import AcceleratorState, GradientState

    try:
        COMMANDS[command](runs, form, tmp_path / "out")
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def test_exported_networks_load_with_from_pretrained_in_a_plain_process_as_the_checkpoint(runs, tmp_path):
    """``VQGAN.from_pretrained(export / "vqgan")`` and ``X2CTGenerator.from_pretrained(export / "generator")``
    in a fresh interpreter (no CLI, no project loader) give the checkpoint's EMA outputs, bit for bit."""
    import os
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file, save_file

    from gan_baselines.sampling import load_generator
    from stage1_vqgan.encode import load_vqgan
    from tests.patching.test_pretrained import _PLAIN, ROOT

    g = torch.Generator().manual_seed(0)
    cases = {
        "vqgan": ("stage1_vqgan.model:VQGAN", load_vqgan(weights(runs, "vqgan", "latest"), "cpu").model,
                  {"x": torch.rand(1, 1, 16, 16, 16, generator=g) * 2 - 1}),
        "generator": ("gan_baselines.x2ct_gan.model:X2CTGenerator",
                      load_generator(weights(runs, "x2ct-gan", "latest")).generator,
                      {v: torch.rand(1, 1, 32, 32, generator=g) for v in ("pa", "lateral")}),
    }
    export = {"vqgan": weights(runs, "vqgan", "export"), "generator": weights(runs, "x2ct-gan", "export")}
    expected = {}
    for name, (_, model, inputs) in cases.items():
        shutil.copytree(export[name] / name, tmp_path / name)  # the network folder alone
        save_file(inputs, str(tmp_path / f"{name}.inputs.safetensors"))
        with torch.no_grad():
            out = model.eval()(**inputs)
        expected[name] = getattr(out, "recon", out)
    refs = json.dumps({name: ref for name, (ref, _, _) in cases.items()})
    subprocess.run([sys.executable, "-c", _PLAIN, refs, str(tmp_path), str(torch.get_num_threads())], check=True,
                   cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    for name, want in expected.items():
        assert want.abs().max() > 0 and torch.equal(load_file(str(tmp_path / f"{name}.out.safetensors"))["out"], want), name


def test_a_single_view_model_exports_and_samples_from_its_folder(runs, tmp_path):
    """S-XR2CT (PA only, a task derived from X2CT-GAN's) exports its own generator class."""
    from accelerate.state import AcceleratorState, GradientState

    from gan_baselines.s_xr2ct import SXR2CTGenerator
    from tests.gan_baselines.test_s_xr2ct import TINY_SX

    run, export = tmp_path / "sx", tmp_path / "sx-export"
    try:
        assert main(["train", "s-xr2ct", "--store", str(runs["store"]), "--output-dir", str(run), "--max-steps", "1",
                     "--set", *TINY_SX, *GAN_RUN, "loss.perceptual_weight=0"]) == 0
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    assert main(["export", "--checkpoint", str(run / "checkpoints" / "latest"), "--out", str(export)]) == 0
    assert isinstance(SXR2CTGenerator.from_pretrained(export / "generator"), SXR2CTGenerator)
    assert main(["sample", "--checkpoint", str(export), "--pa", str(runs["root"] / "pa.npy"), "--out",
                 str(tmp_path / "o"), "--device", "cpu"]) == 0
    assert (tmp_path / "o" / "volume.nii.gz").is_file()
