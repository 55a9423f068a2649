"""``benchmarks/gpu_acceptance.py --smoke``: every part at tiny widths on the CPU, so the GPU
acceptance run is known to work before it meets a GPU (docs/training.md, "GPU acceptance")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.distributed
def test_gpu_acceptance_smoke_runs_every_part(tmp_path):
    pytest.importorskip("deepspeed")
    out = tmp_path / "acceptance.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "benchmarks/gpu_acceptance.py", "--smoke", "--out", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["smoke"] and report["failed"] == []
    parts = report["parts"]
    assert {"vqgan_step", "diffusion_step", "sampling", "fsdp", "deepspeed"} <= {k for k, v in parts.items() if v["ok"]}
    assert set(report["not_run"]) >= {"xformers", "fsdp", "deepspeed", "mfu"}  # each with its reason
    assert parts["vqgan_step"]["flops_per_step"] > 0 and parts["diffusion_step"]["flops_per_step"] > 0
    assert parts["sampling"]["steps"] == 30 and parts["sampling"]["sampler"] == "dpmsolver++"
    assert parts["sampling"]["output_shape"] == [32, 32, 40]  # latent 8×8×10, ×4: not a cube
    assert all(report["environment"][k] for k in ("date", "command", "torch", "device"))


def test_gpu_acceptance_reports_a_failing_part(tmp_path):
    # A part that raises is reported in the JSON and makes the exit status 1 (never skipped).
    sys.path.insert(0, str(REPO))
    from benchmarks import gpu_acceptance

    def broken(run):
        raise RuntimeError("boom")

    out = tmp_path / "r.json"
    orig = gpu_acceptance.part_fsdp
    gpu_acceptance.part_fsdp = broken
    try:
        status = gpu_acceptance.main(["--smoke", "--parts", "fsdp", "--out", str(out)])
    finally:
        gpu_acceptance.part_fsdp = orig
    report = json.loads(out.read_text())
    assert status == 1 and report["failed"] == ["fsdp"] and "boom" in report["parts"]["fsdp"]["error"]
