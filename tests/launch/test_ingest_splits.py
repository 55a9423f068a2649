"""`xray2ct data ingest --split / --splits FILE`: the split a user states once, shown by inspect."""

from __future__ import annotations

import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from launch.cli import main
from patching.data.splits import SplitAssignment, read_splits
from patching.data.store import Store
from patching.errors import InputError
from tests.launch.toy_task import REPO, child_env


def _nifti(path, value=-500):
    nib.save(nib.Nifti1Image(np.full((8, 8, 8), value, np.int16), np.diag([2.0, 2.0, 2.0, 1.0])), path)
    return path


def test_read_splits_formats(tmp_path):
    two = tmp_path / "list.csv"
    two.write_text("name,split\n# comment\nct-a.nii.gz, test\nct-b\tval  # trailing comment\n\nct-c TRAIN\n")
    assert read_splits(two) == {"ct-a.nii.gz": "test", "ct-b": "val", "ct-c": "train"}
    x2ct = tmp_path / "test.txt"  # X2CT-GAN's LIDC lists: one name per line, the split is the file's name
    x2ct.write_text("LIDC-IDRI-0001.20000101.3000566.1\nLIDC-IDRI-0004.20000101.3000534.1\n")
    assert read_splits(x2ct) == {"LIDC-IDRI-0001.20000101.3000566.1": "test", "LIDC-IDRI-0004.20000101.3000534.1": "test"}
    assign = SplitAssignment(read_splits(two), "val")
    assert assign.split_of(["zz", "ct-b"]) == "val" and assign.split_of(["nothing"]) == "val"
    assert assign.split_of(["ct-c"]) == "train" and assign.unmatched() == ["ct-a.nii.gz"]


@pytest.mark.parametrize("name,text,needle", [
    ("l.txt", "a test\nb tset\n", "line 2: unknown split 'tset'"),
    ("l.txt", "a test\na val\n", "line 2: 'a' is listed as 'test' and as 'val'"),
    ("names.txt", "a\n", "line 1: 'a' names no split"),
    ("l.txt", "a b test\n", "line 1: expected 'NAME SPLIT'"),
    ("l.txt", "# nothing\n", "lists no case"),
])
def test_bad_splits_files_name_the_line(tmp_path, name, text, needle):
    f = tmp_path / name
    f.write_text(text)
    with pytest.raises(InputError, match=needle.replace("(", r"\(")):
        read_splits(f)


def test_ingest_assigns_stated_splits_and_inspect_shows_them(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for n in ("ct-a", "ct-b", "ct-c", "ct-d"):
        _nifti(src / f"{n}.nii.gz")
    lst = tmp_path / "test.txt"
    lst.write_text("ct-b.nii.gz\nct-c\nLIDC-IDRI-9999\n")  # a file name, a case id, one not in this store
    store = tmp_path / "s.zarr"
    assert main(["data", "ingest", str(src), "--store", str(store), "--preset", "cpu-demo",
                 "--splits", str(lst), "--split", "train"]) == 0
    out, err = capsys.readouterr()
    assert "1 name(s) match no case: LIDC-IDRI-9999" in err and "ingested 4" in out
    s = Store(store)
    assert {c: s.case(c).split for c in s.case_ids()} == {"ct-a": "train", "ct-b": "test", "ct-c": "test", "ct-d": "train"}
    assert main(["data", "inspect", "--store", str(store)]) == 0
    table = capsys.readouterr().out
    assert "ct-b.nii.gz" in table and "4 case(s): train 2, val 0, test 2" in table
    # Stated again for a present case: it moves (nothing is re-read); unstated cases keep theirs.
    (tmp_path / "more.csv").write_text("ct-a val\n")
    assert main(["data", "ingest", str(src), "--store", str(store), "--preset", "cpu-demo",
                 "--splits", str(tmp_path / "more.csv")]) == 0
    assert "moved 1 present case(s)" in capsys.readouterr().out
    assert [s.case(c).split for c in s.case_ids()] == ["val", "test", "test", "train"]


def test_bad_splits_file_exits_2_and_writes_nothing(tmp_path):
    _nifti(tmp_path / "ct-a.nii.gz")
    (tmp_path / "l.txt").write_text("ct-a tset\n")
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "data", "ingest", str(tmp_path / "ct-a.nii.gz"),
                           "--store", str(tmp_path / "s.zarr"), "--splits", str(tmp_path / "l.txt")],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "l.txt: line 1: unknown split 'tset'" in lines[0], proc.stderr
    assert not (tmp_path / "s.zarr").exists()
