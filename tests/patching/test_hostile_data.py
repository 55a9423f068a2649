"""Hostile data inputs and store faults (issue #12, defects 3, 8, 9, 10, 11): voxel sizes,
implausible headers, stale staging, case ids from the command line, and a full disk."""

from __future__ import annotations

import errno
import hashlib
import os
import struct
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from launch.cli import main
from launch.cli_data import inspect_table
from patching.data.ingest import MAX_VOXELS, ingest, load_nifti
from patching.data.spec import VolumeSpec
from patching.data.store import Store, sanitize_case_id
from patching.errors import InputError, StorageError
from tests.patching.dicom_factory import write_ct_series

REPO = Path(__file__).resolve().parents[2]


def _nifti(path: Path, pixdim, codes=(0, 0), shape=(6, 6, 6)) -> Path:
    """A NIfTI with raw pixdim[1:4] (nibabel rewrites them on save, so they are patched after)."""
    img = nib.Nifti1Image(np.arange(np.prod(shape), dtype=np.int16).reshape(shape), np.diag([3.0, 1.0, 1.0, 1.0]))
    img.header.set_qform(img.affine, code=codes[0])
    img.header.set_sform(img.affine, code=codes[1])
    nib.save(img, path)
    data = bytearray(path.read_bytes())
    data[80:92] = struct.pack("<3f", *pixdim)
    path.write_bytes(bytes(data))
    return path


# --- defect 3: voxel sizes ----------------------------------------------------------------------


@pytest.mark.parametrize("codes", [(0, 0), (1, 0), (0, 1)], ids=["no-qform-sform", "qform", "sform"])
@pytest.mark.parametrize("pixdim", [(0.0, 1.0, 1.0), (3.0, 0.0, 1.0), (float("nan"), 1.0, 1.0), (3.0, 1.0, float("inf"))])
def test_zero_or_non_finite_voxel_size_is_an_error(tmp_path, pixdim, codes):
    path = _nifti(tmp_path / "ct.nii", pixdim, codes)
    with pytest.raises(InputError, match=r"ct.nii: voxel size \(pixdim\) .* must be non-zero and finite"):
        load_nifti(path)


def test_negative_voxel_size_is_taken_as_absolute(tmp_path):
    """Documented behaviour (docs/data.md): a negative pixdim is read as its absolute value,
    as nibabel does; the axis direction comes from the qform/sform."""
    path = _nifti(tmp_path / "neg.nii", (-3.0, 1.0, -1.0), codes=(0, 0))
    hu, spacing, affine = load_nifti(path)
    assert spacing == (3.0, 1.0, 1.0)
    ref_hu, ref_spacing, ref_affine = load_nifti(_nifti(tmp_path / "pos.nii", (3.0, 1.0, 1.0), codes=(0, 0)))
    assert np.array_equal(hu, ref_hu) and np.allclose(affine, ref_affine)


def test_header_claiming_30000_cubed_voxels_is_implausible_not_out_of_memory(tmp_path):
    path = tmp_path / "huge.nii"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), path)
    data = bytearray(path.read_bytes())
    data[42:48] = struct.pack("<3h", 30000, 30000, 30000)
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"huge.nii: implausible size: the header claims 30000x30000x30000"):
        load_nifti(path)
    assert 512 * 512 * 1024 < MAX_VOXELS  # a large real CT stays plausible


# --- defects 9 and 10: case ids --------------------------------------------------------------------------


def test_sanitised_ids_never_start_with_a_dash():
    assert sanitize_case_id("..-75ce5d42") == "75ce5d42"
    assert sanitize_case_id("--rm -rf") == "rm_-rf"
    for raw in ("-x", "-", "---", "_-.", ".-.."):
        cid = sanitize_case_id(raw)
        assert not cid.startswith(("-", ".", "_")) and cid


def test_patient_id_dotdot_gives_an_id_the_cli_can_take(tmp_path, capsys):
    s = write_ct_series(tmp_path / "export" / "s1", np.zeros((6, 16, 16), np.int16), patient_id="..")
    store = Store(tmp_path / "store", create=True)
    report = ingest([tmp_path / "export"], store, VolumeSpec((8, 8, 8), (1, 1, 2)), progress=False)
    digest = hashlib.sha256(s.series_uid.encode()).hexdigest()[:8]
    assert report.ingested == [digest] and not digest.startswith("-")
    assert main(["data", "preview", "--store", str(store.path), "--case", digest, "--out", str(tmp_path / "p.png")]) == 0


def test_case_ids_from_the_command_line_stay_in_the_store(tmp_path):
    store = Store(tmp_path / "a" / "store", create=True)
    other = tmp_path / "a" / "other" / "cases" / "x"  # a complete-looking case outside the store
    other.mkdir(parents=True)
    (other / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {"complete": true}}')
    for bad in ("../../other/cases/x", "../other", str(other), "-x", ".staging"):
        with pytest.raises(InputError, match="is not a safe file name"):
            store.case(bad)
        with pytest.raises(InputError, match="is not a safe file name"):
            store.has_case(bad)


# --- defect 8: stale staging ---------------------------------------------------------------------------------


_KILLED_WRITER = """
import os, sys
from patching.data.store import Store
s = Store(sys.argv[1])
with s._staging_dir("case-killed") as d:
    (d / "half").write_bytes(b"x" * 100)
    os._exit(9)   # killed in the middle of a write: nothing cleans up
"""


def _killed_writer(store: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(store)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert proc.returncode == 9, proc.stderr


def test_stale_staging_is_reported_separately_and_cleaned_by_the_next_writer(tmp_path):
    store = Store(tmp_path / "s", create=True)
    store.write_case("done", np.zeros((4, 4, 4), np.int16), (1, 1, 1), np.eye(4))
    _killed_writer(store.path)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        from patching.data.staging import owner_tag

        busy = store.path / ".staging" / f"case-busy-0123456789ab{owner_tag(live.pid)}"
        busy.mkdir()  # a concurrent writer at work
        entries = store.staging()
        assert len(entries) == 2 and sorted(stale for _, stale in entries) == [False, True]
        table = inspect_table(Store(store.path))
        assert "1 case(s): train" in table and "incomplete 0" in table  # staging is not counted as cases
        assert "staging: 2 entries in .staging/ (1 of running writers, 1 left by killed ones" in table
        assert "case-killed" not in table.split("staging:")[0]
        # the next writer removes the killed writer's leftover and leaves the live one alone
        Store(store.path, create=True).write_case("next", np.zeros((4, 4, 4), np.int16), (1, 1, 1), np.eye(4))
        assert [p for p, _ in Store(store.path).staging()] == [busy]
    finally:
        live.kill()
        live.wait()


# --- defect 11: a corrupt store, a full disk ---------------------------------------------------------------


def test_ingest_into_a_corrupt_store_creates_nothing(tmp_path):
    path = tmp_path / "s"
    path.mkdir()
    (path / "zarr.json").write_bytes(b"{not json")
    with pytest.raises(InputError, match="unreadable store metadata"):
        Store(path, create=True)
    assert sorted(p.name for p in path.iterdir()) == ["zarr.json"]


def _full_disk(monkeypatch, after: int = 1) -> None:
    import patching.data.store as store_mod

    real = store_mod.write_array
    calls = {"n": 0}

    def write_array(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > after:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    monkeypatch.setattr(store_mod, "write_array", write_array)


def test_disk_full_in_synth_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    store = tmp_path / "s"
    _full_disk(monkeypatch)
    assert main(["data", "synth", "--store", str(store), "--num", "2", "--shape", "16", "16", "16", "--workers", "1",
                 "--views", "pa"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(f"error: {store}: could not write case-phantom-s0-0000") \
        and "No space left on device [ENOSPC]" in lines[0]
    assert Store(store).case_ids() == [] and Store(store).staging() == []  # nothing half-written


def test_storage_error_survives_a_worker_process():
    import pickle

    err = StorageError("x", "could not write: No space left on device [ENOSPC]")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is StorageError and str(back) == str(err) and back.source == "x"


def test_resolve_device_refuses_devices_this_machine_lacks():
    import torch

    from patching.checks import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    missing = max(7, torch.cuda.device_count())  # an index this machine does not have
    with pytest.raises(InputError, match=rf"--device: 'cuda:{missing}': "):
        resolve_device(f"cuda:{missing}")
    with pytest.raises(InputError, match="--device: 'gpu' is not a device"):
        resolve_device("gpu")
    with pytest.raises(InputError, match="unsupported device type"):
        resolve_device("meta")
