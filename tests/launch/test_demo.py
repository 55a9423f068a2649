"""`xray2ct demo` end to end at the smallest size: 10 phantoms, 2 training steps per model, then
sampling and evaluation of the held-out case. Checks every stage's outputs and the printed table,
and that the table does not depend on the thread count (the demo's step budgets and seeds)."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from launch.cli import main
from patching.data.store import Store

TINY = ["--num", "10", "--max-steps", "2", "--num-samples", "2"]


def _demo_with_ambient_threads(out, threads: int) -> tuple[int, str]:
    """Run the tiny demo from a process whose own thread settings are ``threads`` (environment
    and torch), restoring them afterwards; returns the exit status and what it printed."""
    import contextlib
    import io
    import os

    import torch

    saved_env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    saved = torch.get_num_threads()
    os.environ.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    torch.set_num_threads(threads)
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            rc = main(["demo", "--out", str(out), *TINY])
    finally:
        torch.set_num_threads(saved)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return rc, buf.getvalue()


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    """One tiny demo, started from a one-thread process: its output directory and what it printed."""
    out = tmp_path_factory.mktemp("demo") / "d"
    rc, printed = _demo_with_ambient_threads(out, 1)
    assert rc == 0, printed[-3000:]
    return out, printed


def _scores(out):
    """Every per-case score of the evaluation, timings left out (they differ between runs)."""
    report = json.loads((out / "evaluation" / "results.json").read_text())
    return sorted((r["case_id"], r["method"], k, v) for r in report["per_case"] for k, v in r.items()
                  if k not in ("seconds", "case_id", "method") and not k.startswith("_"))


@pytest.mark.slow
def test_demo_runs_every_stage(tiny_demo):
    out, printed = tiny_demo
    store = Store(out / "phantoms.zarr")
    assert len(store.case_ids()) == 10 and store.case_ids("test") == ["phantom-s0-0009"]
    assert all(store.case(c).has_latent for c in store.case_ids())
    meta = json.loads((out / "demo.json").read_text())
    assert {n: r["steps"] for n, r in meta["runs"].items()} == {"vqgan": 2, "x2ct-gan": 2, "diffusion": 2}
    assert all(r["reached_budget"] and r["cpu_seconds"] > 0 for r in meta["runs"].values())
    assert meta["sampled_case"] == "phantom-s0-0009" and meta["seconds"]["total"] > 0
    for method in ("diffusion", "x2ct-gan"):
        vol = nib.load(out / "samples" / method / "volume.nii.gz")
        assert vol.shape == (64, 64, 64) and np.allclose(vol.header.get_zooms(), 5.625)
        assert (out / "samples" / method / "preview.png").stat().st_size > 1000
    assert (out / "xrays" / "phantom-s0-0009-pa.png").exists()
    # the table: printed, and written by `evaluate` with one row per method and the mean baseline
    summary = (out / "evaluation" / "summary.md").read_text()
    for row in ("| diffusion |", "| diffusion-mean2 |", "| x2ct-gan |", "| mean-train-volume |"):
        assert row in summary and row in printed
    assert list((out / "evaluation" / "figures").glob("*.png"))
    assert "done in" in printed and str(out / "evaluation" / "summary.md") in printed


@pytest.mark.slow
def test_demo_table_same_from_a_process_with_other_thread_settings(tiny_demo, tmp_path):
    """Step budgets, seeds and thread counts fixed per stage (never taken from the machine or the
    caller): a second run started from a 3-thread process — its own trainings, sampling and
    evaluation; the phantoms re-used — scores every case exactly as the first. (``--threads``
    itself changes the diffusion stage's floating-point reduction order, so it is fixed too.)"""
    first, _ = tiny_demo
    out = tmp_path / "d2"
    out.mkdir()
    # the phantoms only save time; latents are re-encoded unless this run's VQ-GAN is bit-identical
    shutil.copytree(first / "phantoms.zarr", out / "phantoms.zarr")
    rc, printed = _demo_with_ambient_threads(out, 3)
    assert rc == 0, printed[-3000:]
    assert _scores(out) == _scores(first)


def test_demo_bad_arguments_exit_2(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--num", "3"]) == 2
    assert "--num" in capsys.readouterr().err and not (tmp_path / "d").exists()
    assert main(["demo", "--out", str(tmp_path / "d"), "--minutes", "0"]) == 2
    assert main(["demo", "--out", str(tmp_path / "d"), "--threads", "0"]) == 2
    assert main(["demo", "--out", str(tmp_path / "d"), "--steps-scale", "nan"]) == 2
    (tmp_path / "f").write_text("x")
    assert main(["demo", "--out", str(tmp_path / "f")]) == 2
