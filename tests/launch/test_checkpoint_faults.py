"""Crafted checkpoints and write faults (issue #12, defects 1, 2, 4, 5, 6): names read from a file
never become paths outside their directory, malformed ``meta.json`` is one line and exit 2, an
unusable named checkpoint is an error (never a fresh start), and a checkpoint write that fails
part-way (disk full) leaves the previous checkpoint as ``latest`` and no staging directory."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from launch import checkpoint as ck
from launch import state_io
from patching.artifacts.format import model_state, read_checkpoint_meta, resolve_weights
from patching.checks import child_path, read_json_doc, safe_name
from patching.data.staging import host_id
from patching.errors import InputError, StorageError
from tests.launch.toy_task import REPO, child_env

TASK = "tests.launch.toy_task:ToyTask"


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def train(out: Path, steps: int, *extra: str) -> int:
    from launch.train import main

    try:
        return main([TASK, "--store", "unused", "--output-dir", str(out), "--max-steps", str(steps), *extra,
                     "--set", "train.batch_size=2", "data.num_samples=16", "train.keep_last=10", "train.ckpt_every=1"])
    finally:
        _reset_accelerate()


@pytest.fixture(scope="module")
def run2(tmp_path_factory) -> Path:
    """A toy run with checkpoints step-1 and step-2 (latest)."""
    out = tmp_path_factory.mktemp("run") / "run"
    assert train(out, 2) == 0
    return out


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> Path:
    """A store with one 16³ phantom case (for `encode`)."""
    from patching.data.store import Store
    from patching.data.synth_store import synthesize

    path = tmp_path_factory.mktemp("store") / "store"
    synthesize(Store(path, create=True), 1, (16, 16, 16), views=["pa"], progress=False)
    return path


def copy_run(run2: Path, dst: Path) -> Path:
    shutil.copytree(run2, dst)
    return dst


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def error_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("error:")]


# --- the helpers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../rank-0", "..", ".", "", "a/b", "a\\b", "-rf", ".hidden", "x\x00y", "é", 3, None,
                                  "a" * 256])
def test_safe_name_refuses_what_is_not_one_harmless_component(name, tmp_path):
    with pytest.raises(InputError, match="src: .*not a safe file name"):
        safe_name(name, "src", "model name")
    with pytest.raises(InputError):
        child_path(tmp_path, name, "src")


def test_safe_name_keeps_ordinary_names(tmp_path):
    for name in ("vqgan", "gen.raw.safetensors", "case-0001", "LIDC-IDRI-0001_a", "9"):
        assert safe_name(name, "src") == name and child_path(tmp_path, name, "src") == tmp_path / name


@pytest.mark.parametrize("content, needle", [
    (b"\x89\xff\x00garbage", "not valid JSON"),
    (b"[]", "the top level is a list, expected an object"),
    (b'"x"', "the top level is a string"),
    (b"[" * 100_000, "not valid JSON"),
    (b'{"step": "3"}', "'step' must be an integer"),
    (b'{"step": true}', "'step' must be an integer"),
    (b"{}", "no 'step' key"),
])
def test_read_json_doc_is_one_line_naming_the_file(tmp_path, content, needle):
    (tmp_path / "doc.json").write_bytes(content)
    with pytest.raises(InputError) as info:
        read_json_doc(tmp_path / "doc.json", {"step": int})
    msg = str(info.value)
    assert msg.startswith(str(tmp_path / "doc.json") + ": ") and needle in msg and "\n" not in msg


# --- defect 1: export writes outside --out ------------------------------------------------------------


def test_export_refuses_model_names_that_leave_out(run2, tmp_path, capsys):
    from launch.cli import main

    run = copy_run(run2, tmp_path / "copied")
    meta_path = run / "checkpoints" / "step-2" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["models"] = ["../rank-0", "gen"]
    meta_path.write_text(json.dumps(meta))
    before = tree(tmp_path)
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "exp" / "out")]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and str(meta_path) in lines[0] and "'../rank-0' is not a safe file name" in lines[0]
    assert tree(tmp_path) == before  # nothing written, inside --out or beside it


def test_failed_export_leaves_nothing(run2, tmp_path, capsys):
    from launch.cli import main

    run = copy_run(run2, tmp_path / "copied")
    (run / "checkpoints" / "step-2" / "models" / "gen.safetensors").write_bytes(b"\x00" * 9)  # truncated
    before = tree(tmp_path)
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "out")]) == 2
    assert "gen.safetensors: not a readable safetensors file" in error_lines(capsys.readouterr().err)[0]
    assert tree(tmp_path) == before


# --- defect 2: an export's `file` entries ----------------------------------------------------------------


def test_export_file_entries_cannot_leave_the_export(run2, tmp_path):
    from launch.export import export_checkpoint, load_weights

    out = export_checkpoint(run2, tmp_path / "w")
    secret = tmp_path / "elsewhere" / "secret.safetensors"
    secret.parent.mkdir()
    shutil.copyfile(out / "gen.safetensors", secret)
    doc = json.loads((out / "config.json").read_text())
    doc["models"]["gen"]["file"] = "../elsewhere/secret.safetensors"
    (out / "config.json").write_text(json.dumps(doc))
    with pytest.raises(InputError, match=r"config.json: models.gen.file '../elsewhere/secret.safetensors' is not a safe"):
        load_weights(out)
    with pytest.raises(InputError, match="is not a safe file name"):
        resolve_weights(out)  # what sample and encode read first
    with pytest.raises(InputError, match="is not a safe file name"):
        model_state("export", out, "gen", doc)


# --- defect 5: malformed meta.json ---------------------------------------------------------------------------


MALFORMED = {
    "random-bytes": b"\x8f\x00\xfe\x12garbage",
    "a-list": b"[]",
    "no-keys": json.dumps({"format": "xray2ct-checkpoint"}).encode(),
    "wrong-types": json.dumps({"format": "xray2ct-checkpoint", "version": 1, "step": 2, "models": "gen"}).encode(),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_meta_is_one_line_exit_2_everywhere(run2, tiny_store, tmp_path, kind, capsys):
    from launch.cli import main

    run = copy_run(run2, tmp_path / "copied")
    meta_path = run / "checkpoints" / "step-2" / "meta.json"
    meta_path.write_bytes(MALFORMED[kind])
    store = shutil.copytree(tiny_store, tmp_path / "store")
    xray = tmp_path / "pa.npy"
    np.save(xray, np.zeros((8, 8), np.float32))
    commands = {
        "export": ["export", "--checkpoint", str(run), "--out", str(tmp_path / "exp")],
        "encode": ["encode", "--store", str(store), "--vqgan", str(run)],
        "sample": ["sample", "--checkpoint", str(run), "--pa", str(xray), "--out", str(tmp_path / "vol.nii.gz")],
    }
    for name, argv in commands.items():
        before = tree(tmp_path)
        assert main(argv) == 2, name
        lines = error_lines(capsys.readouterr().err)
        assert len(lines) == 1 and str(meta_path) in lines[0], (name, lines)
        assert tree(tmp_path) == before, name
    before = tree(tmp_path)
    assert train(run, 3, "--resume", "latest") == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and str(meta_path) in lines[0], lines
    assert tree(tmp_path) == before


def test_crafted_state_skeleton_is_an_input_error(tmp_path):
    state_io.save_state(tmp_path / "s", {"x": torch.zeros(2)})
    doc = json.loads((tmp_path / "s.json").read_text())
    doc["state"] = {"x": {"__tensor__": "/nope"}}
    (tmp_path / "s.json").write_text(json.dumps(doc))
    with pytest.raises(InputError, match=r"s.json: malformed state \(KeyError"):
        state_io.load_state(tmp_path / "s")


# --- defect 6: an unusable named checkpoint is an error ---------------------------------------------------


def test_latest_naming_a_checkpoint_without_meta_is_an_error(run2, tmp_path, capsys):
    run = copy_run(run2, tmp_path / "copied")
    (run / "checkpoints" / "step-2" / "meta.json").unlink()
    before = tree(run)
    assert train(run, 4, "--resume", "latest") == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "step-2" in lines[0] and "meta.json: missing file" in lines[0]
    assert tree(run) == before and (run / "checkpoints" / "latest").read_text() == "step-2\n"
    (run / "checkpoints" / "latest").write_text("step-7\n")  # a removed checkpoint
    with pytest.raises(InputError, match="latest: names step-7, which does not exist"):
        ck.resolve_resume(run, "latest")
    (run / "checkpoints" / "latest").write_text("../../etc\n")
    with pytest.raises(InputError, match="not a step-<N> checkpoint"):
        ck.resolve_resume(run, "latest")
    # a fresh run (no --resume) refuses a directory with broken checkpoints too
    with pytest.raises(InputError, match="already holds checkpoints"):
        ck.resolve_resume(run, None)


def test_meta_step_must_agree_with_its_directory(run2, tmp_path, capsys):
    run = copy_run(run2, tmp_path / "copied")
    meta_path = run / "checkpoints" / "step-2" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["step"] = 999
    meta_path.write_text(json.dumps(meta))
    assert train(run, 4, "--resume", "latest") == 2
    lines = error_lines(capsys.readouterr().err)
    assert lines == [f"error: {meta_path}: says step 999 but lies in step-2"]
    with pytest.raises(InputError, match="says step 999"):
        read_checkpoint_meta(meta_path.parent)


# --- defect 4: a checkpoint write that fails part-way ------------------------------------------------------


def test_disk_full_during_a_checkpoint_keeps_latest_and_resumes(run2, tmp_path, monkeypatch, capsys):
    run = copy_run(run2, tmp_path / "copied")
    root = run / "checkpoints"
    real = ck.save_tensors
    calls = {"n": 0}

    def full_disk(path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second file of step-3: some files are already staged
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ck, "save_tensors", full_disk)
    assert train(run, 4, "--resume", "latest") == 2
    lines = error_lines(capsys.readouterr().err)
    assert lines == [f"error: {root / 'step-3'}: could not write the checkpoint: No space left on device [ENOSPC]; "
                     "latest is still step-2"]
    assert (root / "latest").read_text() == "step-2\n" and not (root / "step-3").exists()
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")], "no staging directory left"
    monkeypatch.setattr(ck, "save_tensors", real)
    assert train(run, 4, "--resume", "latest") == 0  # the disk has room again: resumes from step-2
    assert (root / "latest").read_text() == "step-4\n" and ck.read_meta(root / "step-4")["step"] == 4
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")]


def test_stale_staging_own_and_dead_removed_live_writers_kept(tmp_path):
    root = tmp_path / "checkpoints"
    host = host_id()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # a process that has exited
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dirs = {
            "own": ck.staging_dir(root, 3, ck.staging_token(1, os.getpid(), host)),
            "dead": ck.staging_dir(root, 3, ck.staging_token(2, dead_pid, host)),
            "legacy": ck.staging_dir(root, 3, "00000000dead"),
            "live": ck.staging_dir(root, 3, ck.staging_token(3, live.pid, host)),
            "other-host": ck.staging_dir(root, 3, ck.staging_token(4, dead_pid, host ^ 1)),
        }
        for d in dirs.values():
            d.mkdir(parents=True)
        removed = {p.name for p in ck.clean_stale_staging(root)}
        assert removed == {dirs[k].name for k in ("own", "dead", "legacy")}
        assert dirs["live"].is_dir() and dirs["other-host"].is_dir()
    finally:
        live.kill()
        live.wait()


def test_disk_full_error_type_is_an_input_error():
    err = StorageError.from_os("x", "could not write", OSError(errno.ENOSPC, "No space left on device"))
    assert isinstance(err, InputError) and str(err) == "x: could not write: No space left on device [ENOSPC]"


def test_module_entry_write_failure_is_one_line(tmp_path):
    """The same through `python -m launch.train`: a file where checkpoints/ should be makes every
    checkpoint write fail (a stand-in for a full disk that works as root too)."""
    out = tmp_path / "blocked"
    out.mkdir()
    (out / "checkpoints").write_text("not a directory\n")
    proc = subprocess.run([sys.executable, "-m", "launch.train", TASK, "--store", "unused", "--output-dir", str(out),
                           "--max-steps", "1", "--resume", "latest", "--set", "train.batch_size=2"],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert error_lines(proc.stderr) == [f"error: {out / 'checkpoints' / 'step-1'}: could not write the checkpoint: "
                                        "Not a directory [ENOTDIR]; no earlier checkpoint"]


# A sitecustomize put first on the children's PYTHONPATH: rank 1 of a torchrun job (LOCAL_RANK=1)
# gets a full disk while it writes its rank file of step 3. Test-only: no hook in the code.
_RANK1_FULL_DISK = """
import errno, os
if os.environ.get("LOCAL_RANK") == "1" and os.environ.get("XRAY2CT_TEST_FULL_DISK") == "1":
    from launch import checkpoint as ck
    _real = ck.save_state
    def save_state(stem, obj):
        if ".tmp-step-3-" in str(stem):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(stem))
        return _real(stem, obj)
    ck.save_state = save_state
"""


@pytest.mark.distributed
def test_disk_full_on_rank_1_stops_both_ranks_and_keeps_latest(tmp_path):
    from tests.launch.toy_task import train_cmd

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_RANK1_FULL_DISK)
    out = tmp_path / "run"
    sets = ("train.batch_size=2", "train.num_workers=0", "train.ckpt_every=1", "data.num_samples=16", "train.keep_last=10")
    env = child_env(XRAY2CT_TEST_FULL_DISK="1")
    env["PYTHONPATH"] = f"{hook}{os.pathsep}{env['PYTHONPATH']}"
    proc = subprocess.run(train_cmd(out, 4, nproc=2, sets=sets), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)  # a rank left waiting in a collective would hang here
    root = out / "checkpoints"
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert f'File "{REPO / "launch"}' not in proc.stderr  # no traceback through our code (torchrun prints its own)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    where = root / "step-3"
    expected = {  # rank 1's own, rank 0's; the agent may stop one rank before it prints
        f"error: {where}: could not write the checkpoint: No space left on device [ENOSPC]; latest is still step-2",
        f"error: {where}: could not write the checkpoint: a write failed on another rank; latest is still step-2",
    }
    assert errors and set(errors) <= expected and len(errors) == len(set(errors)), proc.stderr[-3000:]
    assert (root / "latest").read_text() == "step-2\n" and not (root / "step-3").exists()
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")]
    again = subprocess.run(train_cmd(out, 4, nproc=2, resume="latest", sets=sets), cwd=REPO, env=child_env(),
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (root / "latest").read_text() == "step-4\n"
