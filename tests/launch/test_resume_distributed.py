"""Two-process DDP on CPU (gloo): exact resume, resume onto another process count, and a
SIGTERM that reaches one rank only. The reference run uses `accelerate launch` with
launch/accelerate/cpu_ddp.yaml; the others use torchrun: both must give the same numbers."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import pytest

from launch import checkpoint as ck
from tests.launch.test_engine import assert_same_state, run_ok
from tests.launch.toy_task import REPO, child_env, metrics, stream_order, trace, train_cmd

pytestmark = pytest.mark.distributed

N = 4
# 10 samples, 2 ranks, batches of 2, 2 micro-batches a step: epochs end inside steps and on
# partial batches, and the no_sync path of gradient accumulation runs. No clipping here (the
# one-process tests clip): the guard then reads the bare gradient norm.
SETS = ("train.batch_size=2", "train.grad_accum=2", "train.num_workers=1", "train.keep_last=10",
        "data.num_samples=10", f"train.ckpt_every={N}", "train.clip_grad=0")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    run_ok(train_cmd(out, 2 * N, nproc=2, launcher="accelerate", sets=SETS), timeout=300)
    return out


def test_ddp_resume_is_bit_identical(ddp_run, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(ddp_run / "checkpoints" / f"step-{N}", out / "checkpoints" / f"step-{N}")
    run_ok(train_cmd(out, 2 * N, nproc=2, resume="latest", sets=SETS), timeout=300)
    assert_same_state(ddp_run / "checkpoints" / f"step-{2 * N}", out / "checkpoints" / f"step-{2 * N}")
    a, b = metrics(ddp_run), metrics(out)
    assert sorted(b) == list(range(N + 1, 2 * N + 1))
    assert all(a[s]["loss"] == b[s]["loss"] and a[s]["d_loss"] == b[s]["d_loss"] for s in b)
    for r in (0, 1):
        assert trace(out, r) == trace(ddp_run, r)[2 * N:]  # 2 micro-batch lines a step
    ckpt = out / "checkpoints" / f"step-{2 * N}"
    assert {p.name for p in ckpt.glob("rank-*")} == {"rank-0.json", "rank-0.safetensors", "rank-1.json", "rank-1.safetensors"}


def _global_stream(epochs: int, num_samples: int = 10) -> list[tuple[int, int]]:
    return [(e, i) for e in range(epochs) for i in stream_order(0, e, num_samples)]


def test_resume_two_processes_onto_one(ddp_run, tmp_path):
    out = tmp_path / "2to1"
    shutil.copytree(ddp_run / "checkpoints" / f"step-{N}", out / "checkpoints" / f"step-{N}")
    meta = ck.read_meta(out / "checkpoints" / f"step-{N}")
    run_ok(train_cmd(out, N + 2, resume="latest", sets=SETS), timeout=300)
    assert sorted(metrics(out)) == [N + 1, N + 2]
    lines = trace(out, 0)
    assert [t["step"] for t in lines] == [N, N, N + 1, N + 1]
    # the single process continues the global stream at the saved (epoch, position): no repeat
    stream = _global_stream(4)
    start = stream.index((meta["epoch"], stream_order(0, meta["epoch"], 10)[meta["position"]]))
    got = [(e, i) for t in lines for e, i in zip(t["epoch"], t["idx"], strict=True)]
    assert got == stream[start:start + len(got)]
    seen_before = {(e, i) for t in trace(ddp_run, 0)[: 2 * N] + trace(ddp_run, 1)[: 2 * N] for e, i in zip(t["epoch"], t["idx"], strict=True)}
    assert not seen_before & set(got)


def test_resume_one_process_onto_two(tmp_path):
    single = tmp_path / "single"
    run_ok(train_cmd(single, N, sets=SETS), timeout=300)
    meta = ck.read_meta(single / "checkpoints" / f"step-{N}")
    assert (meta["epoch"], meta["position"]) == (1, 6)  # 16 samples = an epoch of 10 + 6
    out = tmp_path / "1to2"
    shutil.copytree(single / "checkpoints" / f"step-{N}", out / "checkpoints" / f"step-{N}")
    run_ok(train_cmd(out, N + 1, nproc=2, resume="latest", sets=SETS), timeout=300)
    assert sorted(metrics(out)) == [N + 1]
    # epoch 1 has 4 samples left: positions 6, 8 are rank 0's first batch and 7, 9 rank 1's;
    # the second micro-batch starts epoch 2
    o1, o2 = stream_order(0, 1, 10), stream_order(0, 2, 10)
    assert [t["idx"] for t in trace(out, 0)] == [[o1[6], o1[8]], [o2[0], o2[2]]]
    assert [t["idx"] for t in trace(out, 1)] == [[o1[7], o1[9]], [o2[1], o2[3]]]
    meta = ck.read_meta(out / "checkpoints" / f"step-{N + 1}")
    assert (meta["epoch"], meta["position"], meta["world_size"]) == (2, 4, 2)


def test_sigterm_to_one_rank_stops_both_after_a_checkpoint(tmp_path):
    out = tmp_path / "term"
    sets = ("train.batch_size=2", "train.num_workers=1", "train.ckpt_every=1000", "data.num_samples=64")
    proc = subprocess.Popen(train_cmd(out, 100_000, nproc=2, sets=sets), cwd=REPO, env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while len(metrics(out)) < 3 or not (out / "trace" / "pid-1").is_file():
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended early or is too slow"
            time.sleep(0.05)
        os.kill(int((out / "trace" / "pid-1").read_text()), signal.SIGTERM)  # rank 1 only
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-3000:]
    ckpt = ck.read_latest(out / "checkpoints")
    step = ck.read_meta(ckpt)["step"]
    assert ckpt.name == f"step-{step}" and step == max(metrics(out))
    assert trace(out, 0)[-1]["step"] == trace(out, 1)[-1]["step"] == step - 1  # both ranks stopped together
    assert (ckpt / "rank-1.safetensors").is_file() and (ckpt / "rank-0.safetensors").is_file()
