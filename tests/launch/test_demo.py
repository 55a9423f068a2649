"""`xray2ct demo` end to end at the smallest size: 10 phantoms, 2 training steps per model, then
sampling and evaluation of the held-out case. Checks every stage's outputs and the printed table."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from launch.cli import main
from patching.store import Store


@pytest.mark.slow
def test_demo_runs_every_stage(tmp_path, capsys):
    out = tmp_path / "d"
    rc = main(["demo", "--out", str(out), "--num", "10", "--max-steps", "2", "--vqgan-minutes", "2",
               "--diffusion-minutes", "2"])
    printed = capsys.readouterr().out
    assert rc == 0, printed[-3000:]
    store = Store(out / "phantoms.zarr")
    assert len(store.case_ids()) == 10 and store.case_ids("test") == ["phantom-s0-0009"]
    assert all(store.case(c).has_latent for c in store.case_ids())
    meta = json.loads((out / "demo.json").read_text())
    assert {n: r["steps"] for n, r in meta["runs"].items()} == {"vqgan": 2, "x2ct-gan": 2, "diffusion": 2}
    assert meta["sampled_case"] == "phantom-s0-0009" and meta["seconds"]["total"] > 0
    for method in ("diffusion", "x2ct-gan"):
        vol = nib.load(out / "samples" / method / "volume.nii.gz")
        assert vol.shape == (64, 64, 64) and np.allclose(vol.header.get_zooms(), 5.625)
        assert (out / "samples" / method / "preview.png").stat().st_size > 1000
    assert (out / "xrays" / "phantom-s0-0009-pa.png").exists()
    # the table: printed, and written by `evaluate` with one row per method and the mean baseline
    summary = (out / "evaluation" / "summary.md").read_text()
    for row in ("| diffusion |", "| x2ct-gan |", "| mean-train-volume |"):
        assert row in summary and row in printed
    assert list((out / "evaluation" / "figures").glob("*.png"))
    assert "done in" in printed and str(out / "evaluation" / "summary.md") in printed


def test_demo_bad_arguments_exit_2(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--num", "3"]) == 2
    assert "--num" in capsys.readouterr().err and not (tmp_path / "d").exists()
    assert main(["demo", "--out", str(tmp_path / "d"), "--diffusion-minutes", "0"]) == 2
    (tmp_path / "f").write_text("x")
    assert main(["demo", "--out", str(tmp_path / "f")]) == 2
