"""Preemption under a launcher (issue #12): a scheduler signals the whole process group of a
``torchrun`` / ``accelerate launch`` job. The workers finish their step, write a checkpoint and
exit 0 with a line saying how to continue; the launcher's own exit status is its own (torchrun's
agent: 1 with a ``SignalException`` traceback; accelerate launch: 128 + the signal) — see
docs/reliability.md, "Preemption". The job is left resumable: ``--resume latest`` continues."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest

from launch import checkpoint as ck
from launch.signals import REPEAT_S, StopRequest
from tests.launch.toy_task import REPO, child_env, metrics, train_cmd

SETS = ("train.batch_size=2", "train.num_workers=1", "train.ckpt_every=1000", "data.num_samples=64")
# What each launcher's own process exits with after its workers stopped cleanly.
LAUNCHER_STATUS = {("torchrun", signal.SIGTERM): 1, ("torchrun", signal.SIGINT): 1,
                   ("accelerate", signal.SIGTERM): 128 + signal.SIGTERM}


def test_a_forwarded_sigint_is_not_a_second_ctrl_c(monkeypatch):
    """torchrun's agent forwards the terminal's SIGINT to workers that already got it: that copy
    must not turn a graceful stop into an interrupt without a checkpoint."""
    clock = {"t": 100.0}
    monkeypatch.setattr("launch.signals.time.monotonic", lambda: clock["t"])
    stop = StopRequest()
    stop._handle(signal.SIGINT, None)
    clock["t"] += 0.01
    stop._handle(signal.SIGINT, None)  # the launcher's copy, milliseconds later
    assert stop.requested and stop.name == "SIGINT"
    stop._handle(signal.SIGTERM, None)  # a SIGTERM after it changes nothing
    assert stop.name == "SIGINT"
    clock["t"] += REPEAT_S
    with pytest.raises(KeyboardInterrupt):  # a person pressing Ctrl-C again
        stop._handle(signal.SIGINT, None)


@pytest.mark.distributed
@pytest.mark.parametrize("launcher, sig", sorted(LAUNCHER_STATUS, key=str), ids=lambda v: getattr(v, "name", v))
def test_signal_to_the_launchers_process_group_leaves_a_resumable_run(tmp_path, launcher, sig):
    out = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(out, 100_000, nproc=2, launcher=launcher, sets=SETS), cwd=REPO, env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while len(metrics(out)) < 3 or not (out / "trace" / "pid-1").is_file():
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended early or is too slow"
            time.sleep(0.05)
        os.killpg(proc.pid, sig)  # what a scheduler (or a Ctrl-C in a terminal) does
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == LAUNCHER_STATUS[(launcher, sig)], err[-3000:]
    found = re.findall(rf"\[xray2ct\] stopped by {sig.name} after step (\d+); checkpoint step-(\d+) is complete; "
                       r"continue with --resume latest", err)
    assert len(found) == 1 and found[0][0] == found[0][1], err[-3000:]
    step = int(found[0][0])
    ckpt = ck.read_latest(out / "checkpoints")
    assert ckpt.name == f"step-{step}" and step == max(metrics(out))
    assert (ckpt / "rank-0.safetensors").is_file() and (ckpt / "rank-1.safetensors").is_file()
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no staging left
    if (launcher, sig) == ("torchrun", signal.SIGTERM):  # the next job continues where this one stopped
        again = subprocess.run(train_cmd(out, step + 2, nproc=2, launcher=launcher, resume="latest", sets=SETS), cwd=REPO,
                               env=child_env(), capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
        assert f"resumed from {ckpt} at step {step}" in again.stderr
        assert ck.read_latest(out / "checkpoints").name == f"step-{step + 2}"
