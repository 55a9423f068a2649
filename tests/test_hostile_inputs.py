"""The hostile-input table (issue #12): corrupt files, crafted checkpoints and bad flags fed to
every command family — ingest, sample, train/resume, export, encode, data drr/preview. Each
must end with exit status 2, exactly one ``error:`` line on stderr naming the file (or option)
at fault, no traceback, and nothing new on disk.

Runs the CLI in this process (``launch.cli.main``): an exception escaping it would fail the test
with its traceback, so "no traceback" is checked twice.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from launch.cli import main
from patching.data.store import Store
from patching.data.synth_store import synthesize
from tests.gan_baselines.test_tasks import RUN, TINY

TOY = "tests.launch.toy_task:ToyTask"


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """Read-only material: a phantom store, a toy run (step-1, step-2), a tiny X2CT-GAN run."""
    root = tmp_path_factory.mktemp("hostile")
    store = root / "store.zarr"
    synthesize(Store(store, create=True), 2, (32, 32, 32), xray_size=64, workers=1, progress=False)
    try:
        assert main(["train", TOY, "--store", "unused", "--output-dir", str(root / "toy"), "--max-steps", "2",
                     "--set", "train.batch_size=2", "data.num_samples=8", "train.ckpt_every=1", "train.keep_last=5"]) == 0
        assert main(["train", "x2ct-gan", "--store", str(store), "--output-dir", str(root / "gan"), "--max-steps", "1",
                     "--set", *TINY, *RUN]) == 0
    finally:
        _reset_accelerate()
    return root


def tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1) for p in root.rglob("*")}


def nifti(path: Path, *, pixdim=None, dims=None, shape=(16, 16, 16), codes=(0, 0)) -> Path:
    """A small NIfTI whose header fields are then overwritten raw (nibabel would fix them on save)."""
    img = nib.Nifti1Image(np.full(shape, -500, np.int16), np.diag([2.0, 2.0, 2.0, 1.0]))
    img.header.set_qform(img.affine, code=codes[0])
    img.header.set_sform(img.affine, code=codes[1])
    raw = path.with_suffix("") if path.name.endswith(".gz") else path
    nib.save(img, raw)
    data = bytearray(raw.read_bytes())
    if pixdim is not None:
        data[80:92] = struct.pack("<3f", *pixdim)  # pixdim[1:4]
    if dims is not None:
        data[42:48] = struct.pack("<3h", *dims)  # dim[1:4]
    if path.name.endswith(".gz"):
        raw.unlink()
        path.write_bytes(gzip.compress(bytes(data)))
    else:
        raw.write_bytes(data)
    return path


class Case:
    """One hostile input: ``setup(work, base) -> (argv, needle)``; the error line must contain
    ``needle`` (the file or option at fault, and the problem)."""

    def __init__(self, name: str, setup: Callable[[Path, Path], tuple[list[str], str]]):
        self.name, self.setup = name, setup

    def __repr__(self) -> str:
        return self.name


def copy_toy(work: Path, base: Path) -> Path:
    return Path(shutil.copytree(base / "toy", work / "run"))


def edit_meta(run: Path, step: int, fn) -> Path:
    path = run / "checkpoints" / f"step-{step}" / "meta.json"
    meta = json.loads(path.read_text())
    path.write_text(json.dumps(fn(meta)))
    return path


def check(capsys, argv: list[str], needle: str, watch: list[Path]) -> None:
    before = {str(w): tree(w) for w in watch}
    try:
        code = main(argv)
    finally:
        _reset_accelerate()
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, (code, err[-2000:])
    assert len(errors) == 1 and needle in errors[0], errors
    assert {str(w): tree(w) for w in watch} == before, "something was written"


def run_table(case: Case, tmp_path: Path, base: Path, capsys) -> None:
    work = tmp_path / "work"
    work.mkdir()
    argv, needle = case.setup(work, base)
    check(capsys, argv, needle, [work, base])


# --- ingest ----------------------------------------------------------------------------------------


def _store_copy(work: Path, base: Path) -> Path:
    return Path(shutil.copytree(base / "store.zarr", work / "store.zarr"))


def ingest_zero_pixdim(work, base):
    f = nifti(work / "zero.nii.gz", pixdim=(0.0, 2.0, 2.0))
    return ["data", "ingest", str(f), "--store", str(_store_copy(work, base))], f"{f}: voxel size (pixdim) (0.0, 2.0, 2.0)"


def ingest_nan_pixdim(work, base):
    f = nifti(work / "nan.nii", pixdim=(float("nan"), 2.0, 2.0), codes=(1, 0))
    return ["data", "ingest", str(f), "--store", str(_store_copy(work, base))], f"{f}: voxel size (pixdim) (nan"


def ingest_huge_header(work, base):
    f = nifti(work / "huge.nii", dims=(30000, 30000, 30000))
    return ["data", "ingest", str(f), "--store", str(_store_copy(work, base))], f"{f}: implausible size"


def ingest_corrupt_store(work, base):
    f = nifti(work / "ok.nii.gz")
    store = work / "broken.zarr"
    store.mkdir()
    (store / "zarr.json").write_bytes(b"\x00\xffnot json")
    return ["data", "ingest", str(f), "--store", str(store)], f"{store / 'zarr.json'}: unreadable store metadata"


def ingest_store_meta_list(work, base):
    f = nifti(work / "ok.nii.gz")
    store = work / "list.zarr"
    store.mkdir()
    (store / "zarr.json").write_text("[]")
    return ["data", "ingest", str(f), "--store", str(store)], f"{store / 'zarr.json'}: unreadable store metadata"


INGEST = [Case("zero-pixdim", ingest_zero_pixdim), Case("nan-pixdim", ingest_nan_pixdim),
          Case("30000-cubed-header", ingest_huge_header), Case("corrupt-zarr-json", ingest_corrupt_store),
          Case("zarr-json-is-a-list", ingest_store_meta_list)]


@pytest.mark.parametrize("case", INGEST, ids=repr)
def test_ingest(case, tmp_path, base, capsys):
    run_table(case, tmp_path, base, capsys)


# --- sample -------------------------------------------------------------------------------------------


def _pa(work: Path, base: Path) -> Path:
    pa = work / "pa.npy"
    np.save(pa, Store(base / "store.zarr").case("phantom-s0-0000").xray("pa"))
    return pa


def sample_empty_xray(work, base):
    pa = work / "empty.npy"
    np.save(pa, np.zeros((0, 5), np.float32))
    return ["sample", "--checkpoint", str(base / "gan"), "--pa", str(pa), "--lateral", str(pa),
            "--out", str(work / "out")], f"{pa}: image is empty (shape (0, 5))"


def sample_malformed_meta(work, base):
    run = Path(shutil.copytree(base / "gan", work / "gan"))
    meta = run / "checkpoints" / "step-1" / "meta.json"
    meta.write_bytes(b"\x93NUMPY garbage")
    return ["sample", "--checkpoint", str(run), "--pa", str(_pa(work, base)), "--out", str(work / "out")], \
        f"{meta}: not valid JSON"


def sample_export_file_outside(work, base):
    exp = work / "export"
    assert main(["export", "--checkpoint", str(base / "gan"), "--out", str(exp)]) == 0
    shutil.move(exp / "generator", work / "generator")
    doc = json.loads((exp / "config.json").read_text())
    doc["models"]["generator"]["networks"][""] = "../generator"
    (exp / "config.json").write_text(json.dumps(doc))
    return ["sample", "--checkpoint", str(exp), "--pa", str(_pa(work, base)), "--out", str(work / "out")], \
        f"{exp / 'config.json'}: models.generator.networks.generator '../generator' is not a safe file name"


def sample_no_such_cuda(work, base):
    return ["sample", "--checkpoint", str(base / "gan"), "--pa", str(_pa(work, base)), "--out", str(work / "out"),
            "--device", "cuda:7"], "--device: 'cuda:7'"


def sample_bad_device(work, base):
    return ["sample", "--checkpoint", str(base / "gan"), "--pa", str(_pa(work, base)), "--out", str(work / "out"),
            "--device", "gpu-please"], "--device: 'gpu-please' is not a device"


SAMPLE = [Case("empty-xray", sample_empty_xray), Case("malformed-meta", sample_malformed_meta),
          Case("export-file-outside", sample_export_file_outside), Case("cuda-7", sample_no_such_cuda),
          Case("bad-device", sample_bad_device)]


@pytest.mark.parametrize("case", SAMPLE, ids=repr)
def test_sample(case, tmp_path, base, capsys):
    run_table(case, tmp_path, base, capsys)


# --- train / resume -----------------------------------------------------------------------------------------


def _train(run: Path, *extra: str) -> list[str]:
    return ["train", TOY, "--store", "unused", "--output-dir", str(run), "--max-steps", "4", *extra,
            "--set", "train.batch_size=2", "data.num_samples=8", "train.ckpt_every=1"]


def train_os_system(work, base):
    return ["train", "os:system", "--store", "unused", "--output-dir", str(work / "r")], \
        "TASK: task 'os:system' is not a task class"


def train_output_dir_is_a_file(work, base):
    f = work / "afile"
    f.write_text("x")
    return _train(f), f"--output-dir: {f} exists and is not a directory"


def resume_latest_without_meta(work, base):
    run = copy_toy(work, base)
    (run / "checkpoints" / "step-2" / "meta.json").unlink()
    return _train(run, "--resume", "latest"), f"{run / 'checkpoints' / 'step-2' / 'meta.json'}: missing file"


def resume_step_disagrees(work, base):
    run = copy_toy(work, base)
    meta = edit_meta(run, 2, lambda m: {**m, "step": 999})
    return _train(run, "--resume", "latest"), f"{meta}: says step 999 but lies in step-2"


def resume_meta_is_a_list(work, base):
    run = copy_toy(work, base)
    meta = run / "checkpoints" / "step-2" / "meta.json"
    meta.write_text("[]")
    return _train(run, "--resume", "latest"), f"{meta}: not a checkpoint meta.json: the top level is a list"


def resume_meta_missing_keys(work, base):
    run = copy_toy(work, base)
    meta = edit_meta(run, 2, lambda m: {k: v for k, v in m.items() if k not in ("data", "world_size")})
    return _train(run, "--resume", "latest"), f"{meta}: not a checkpoint meta.json: no "


def resume_latest_escapes(work, base):
    run = copy_toy(work, base)
    (run / "checkpoints" / "latest").write_text("../../../etc\n")
    return _train(run, "--resume", "latest"), f"{run / 'checkpoints' / 'latest'}: names '../../../etc'"


def resume_crafted_state(work, base):
    run = copy_toy(work, base)
    sched = run / "checkpoints" / "step-2" / "sched" / "gen.json"
    doc = json.loads(sched.read_text())
    doc["state"] = {"__dict__": 5}
    sched.write_text(json.dumps(doc))
    return _train(run, "--resume", "latest"), f"{sched}: malformed state"


TRAIN = [Case("os-system", train_os_system), Case("output-dir-is-a-file", train_output_dir_is_a_file),
         Case("latest-without-meta", resume_latest_without_meta), Case("meta-step-999", resume_step_disagrees),
         Case("meta-is-a-list", resume_meta_is_a_list), Case("meta-missing-keys", resume_meta_missing_keys),
         Case("latest-escapes", resume_latest_escapes), Case("crafted-state-skeleton", resume_crafted_state)]


@pytest.mark.parametrize("case", TRAIN, ids=repr)
def test_train_resume(case, tmp_path, base, capsys):
    run_table(case, tmp_path, base, capsys)


# --- export ------------------------------------------------------------------------------------------------


def export_model_name_escapes(work, base):
    run = copy_toy(work, base)
    meta = edit_meta(run, 2, lambda m: {**m, "models": ["../rank-0", "gen"]})
    (work / "exp").mkdir()
    return ["export", "--checkpoint", str(run), "--out", str(work / "exp" / "out")], \
        f"{meta}: model name '../rank-0' is not a safe file name"


def export_random_meta(work, base):
    run = copy_toy(work, base)
    meta = run / "checkpoints" / "step-2" / "meta.json"
    meta.write_bytes(os.urandom(64) + b"\xff")
    return ["export", "--checkpoint", str(run), "--out", str(work / "out")], f"{meta}: not valid JSON"


def export_meta_without_task(work, base):
    run = copy_toy(work, base)
    meta = edit_meta(run, 2, lambda m: {k: v for k, v in m.items() if k != "task"})
    return ["export", "--checkpoint", str(run), "--out", str(work / "out")], f"{meta}: not a checkpoint meta.json: no 'task' key"


def export_truncated_weights(work, base):
    run = copy_toy(work, base)
    w = run / "checkpoints" / "step-2" / "ema" / "gen.safetensors"
    w.write_bytes(w.read_bytes()[:50])
    return ["export", "--checkpoint", str(run), "--out", str(work / "out")], f"{w}: not a readable safetensors file"


def export_out_is_a_file(work, base):
    (work / "afile").write_text("x")
    return ["export", "--checkpoint", str(base / "toy"), "--out", str(work / "afile")], "--out: "


EXPORT = [Case("model-name-escapes", export_model_name_escapes), Case("random-meta", export_random_meta),
          Case("meta-without-task", export_meta_without_task), Case("truncated-weights", export_truncated_weights),
          Case("out-is-a-file", export_out_is_a_file)]


@pytest.mark.parametrize("case", EXPORT, ids=repr)
def test_export(case, tmp_path, base, capsys):
    run_table(case, tmp_path, base, capsys)


# --- encode ----------------------------------------------------------------------------------------------------


def encode_malformed_meta(work, base):
    run = copy_toy(work, base)
    meta = edit_meta(run, 2, lambda m: {**m, "version": "one"})
    return ["encode", "--store", str(_store_copy(work, base)), "--vqgan", str(run)], f"{meta}: not a checkpoint meta.json: 'version'"


def encode_export_file_outside(work, base):
    exp = work / "export"
    exp.mkdir()
    (exp / "config.json").write_text(json.dumps({
        "format": "xray2ct-weights", "version": 1, "task": "vqgan", "preset": "cpu-demo", "step": 1, "config": {},
        "models": {"vqgan": {"file": "../../elsewhere/secret.safetensors", "weights": "raw"}}}))
    return ["encode", "--store", str(_store_copy(work, base)), "--vqgan", str(exp)], \
        f"{exp / 'config.json'}: models.vqgan.file '../../elsewhere/secret.safetensors' is not a safe file name"


def encode_no_such_cuda(work, base):
    return ["encode", "--store", str(_store_copy(work, base)), "--vqgan", str(base / "toy"), "--device", "cuda:7"], \
        "--device: 'cuda:7'"


ENCODE = [Case("malformed-meta", encode_malformed_meta), Case("export-file-outside", encode_export_file_outside),
          Case("cuda-7", encode_no_such_cuda)]


@pytest.mark.parametrize("case", ENCODE, ids=repr)
def test_encode(case, tmp_path, base, capsys):
    run_table(case, tmp_path, base, capsys)


# --- data drr / preview ----------------------------------------------------------------------------------------


def drr_out_under_a_file(work, base):
    f = nifti(work / "ct.nii.gz")
    (work / "afile").write_text("x")
    return ["data", "drr", "--input", str(f), "--out", str(work / "afile" / "x.png")], \
        f"{work / 'afile' / 'x.png'}: cannot write the image: "


def drr_zero_pixdim(work, base):
    f = nifti(work / "zero.nii", pixdim=(2.0, 0.0, 2.0), codes=(1, 1))
    return ["data", "drr", "--input", str(f), "--out", str(work / "x.png")], f"{f}: voxel size (pixdim)"


def preview_case_escapes(work, base):
    other = work / "other" / "cases" / "x"
    other.mkdir(parents=True)
    return ["data", "preview", "--store", str(base / "store.zarr"), "--case", "../../other/cases/x",
            "--out", str(work / "p.png")], "--case: case id '../../other/cases/x' is not a safe file name"


def preview_case_absolute(work, base):
    return ["data", "preview", "--store", str(base / "store.zarr"), "--case", str(base / "store.zarr" / "cases" / "phantom-s0-0000"),
            "--out", str(work / "p.png")], "is not a safe file name"


DATA = [Case("drr-out-under-a-file", drr_out_under_a_file), Case("drr-zero-pixdim", drr_zero_pixdim),
        Case("preview-case-escapes", preview_case_escapes), Case("preview-case-absolute", preview_case_absolute)]


@pytest.mark.parametrize("case", DATA, ids=repr)
def test_data_drr_preview(case, tmp_path, base, capsys):
    run_table(case, tmp_path, base, capsys)
