"""`xray2ct data ...` and `xray2ct demo` from the command line: outputs, exit codes, errors."""

from __future__ import annotations

import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from launch.cli import main
from patching.data.spec import centred_affine
from patching.data.store import Store


@pytest.fixture(scope="module")
def phantom_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "s.zarr"
    assert main(["data", "synth", "--store", str(path), "--num", "3", "--shape", "32", "32", "40",
                 "--seed", "5", "--emboli", "1.0", "--workers", "1", "--xray-size", "48"]) == 0
    return path


def test_synth_writes_complete_cases_with_views(phantom_store, capsys):
    s = Store(phantom_store)
    assert s.case_ids() == ["phantom-s5-0000", "phantom-s5-0001", "phantom-s5-0002"]
    assert [s.case(c).split for c in s.case_ids()] == ["train", "val", "test"]
    c = s.case("phantom-s5-0000")
    assert c.shape == (32, 32, 40) and c.views() == ["pa", "lateral"]
    assert c.xray("pa").shape == (48, 48) and 0 <= c.xray("pa").min() and c.xray("pa").max() <= 1
    assert c.labels["embolus"] is True and "embolus" in c.masks()
    # a re-run skips finished cases
    assert main(["data", "synth", "--store", str(phantom_store), "--num", "3", "--shape", "32", "32", "40",
                 "--seed", "5", "--workers", "1", "--xray-size", "48"]) == 0
    assert "0 phantom(s) written, 3 already present" in capsys.readouterr().out


def test_inspect_and_preview(phantom_store, tmp_path, capsys):
    assert main(["data", "inspect", "--store", str(phantom_store)]) == 0
    out = capsys.readouterr().out
    assert "phantom-s5-0001" in out and "32x32x40" in out and "pa,lateral" in out and "val" in out
    png = tmp_path / "p.png"
    assert main(["data", "preview", "--store", str(phantom_store), "--case", "phantom-s5-0000", "--out", str(png)]) == 0
    img = Image.open(png)
    assert img.width > 3 * img.height  # three planes and two X-rays side by side


def test_drr_of_one_nifti_file(tmp_path):
    hu = np.full((24, 24, 24), -1000, np.int16)
    hu[6:18, 6:18, 6:18] = 1000
    nii = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(hu, centred_affine(hu.shape, (2.0, 2.0, 2.0))), nii)
    out = tmp_path / "pa.png"
    assert main(["data", "drr", "--input", str(nii), "--view", "pa", "--out", str(out),
                 "--height", "40", "--width", "30", "--pixel-mm", "2.0"]) == 0
    img = np.asarray(Image.open(out))
    assert img.shape == (40, 30) and img[20, 15] > img[2, 2]  # the dense cube is bright
    npy = tmp_path / "lat.npy"
    assert main(["data", "drr", "--input", str(nii), "--view", "lateral", "--out", str(npy), "--parallel",
                 "--height", "24", "--width", "24", "--pixel-mm", "2.0"]) == 0
    assert np.load(npy).dtype == np.float32


def test_drr_for_a_store_renders_missing_views(phantom_store):
    s = Store(phantom_store)
    before = s.case("phantom-s5-0001").xray("lateral")
    assert main(["data", "drr", "--store", str(phantom_store), "--views", "lateral", "--force", "--xray-size", "48"]) == 0
    np.testing.assert_allclose(s.case("phantom-s5-0001").xray("lateral"), before, atol=1e-6)


@pytest.mark.parametrize("argv,needle", [
    (["data", "synth", "--store", "{tmp}/s.zarr", "--num", "0"], "--num"),
    (["data", "synth", "--store", "{tmp}/s.zarr", "--num", "2", "--emboli", "1.5"], "--emboli"),
    (["data", "synth", "--store", "{tmp}/s.zarr", "--num", "2", "--preset", "nope"], "--preset"),
    (["data", "inspect", "--store", "{tmp}/missing.zarr"], "not an xray2ct store"),
    (["data", "drr", "--input", "{tmp}/missing.nii.gz", "--out", "{tmp}/x.png"], "missing.nii.gz"),
    (["data", "drr", "--input", "{tmp}/bad.nii.gz", "--out", "{tmp}/x.png"], "bad.nii.gz"),
    (["data", "drr", "--input", "{tmp}/ok.nii.gz", "--out", "{tmp}/x.png", "--sdd", "100", "--sid", "200"], "sdd"),
    (["data", "ingest", "{tmp}/missing.nii.gz", "--store", "{tmp}/s.zarr"], "missing.nii.gz"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, argv, needle):
    (tmp_path / "bad.nii.gz").write_bytes(b"\x1f\x8b\x08\x00truncated")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), np.eye(4)), tmp_path / "ok.nii.gz")
    argv = [a.format(tmp=tmp_path) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "launch.cli", *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x.png").exists()


def test_ingest_reports_bad_cases_and_keeps_the_good(tmp_path, capsys):
    good = tmp_path / "good.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.int16) - 500, np.diag([2.0, 2.0, 2.0, 1.0])), good)
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(good.read_bytes()[:60])
    rc = main(["data", "ingest", str(good), str(bad), "--store", str(tmp_path / "s.zarr"), "--preset", "cpu-demo"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "bad.nii.gz" in err and "good.nii.gz" not in err
    assert Store(tmp_path / "s.zarr").case_ids() == ["good"]
