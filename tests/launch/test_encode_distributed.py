"""Distributed encode (`accelerate launch ... -m launch.encode`): two CPU processes write the same
latents and scale factor as `xray2ct encode` in one, a re-run skips every case, progress counts
the cases of all ranks, and a bad input stops both processes with one error line."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from patching.data.store import Store
from tests.launch.toy_task import REPO, child_env, launch_cmd
from tests.stage1_vqgan.test_encode import trained  # noqa: F401 - the fixture: 5 phantoms 32³ + a 2-step VQ-GAN


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)


@pytest.mark.distributed
def test_two_processes_write_what_one_writes(trained, tmp_path):  # noqa: F811
    one, two = (_copy(trained["store"], tmp_path / n) for n in ("one", "two"))
    a = _run(launch_cmd(["-m", "launch.cli", "encode", "--store", str(one), "--vqgan", str(trained["run"])]))
    assert a.returncode == 0, a.stderr[-3000:]
    assert "encoded 5, skipped 0" in a.stdout and "1 process(es)" in a.stdout
    b = _run(launch_cmd(["-m", "launch.encode", "--store", str(two), "--vqgan", str(trained["run"])], nproc=2))
    assert b.returncode == 0, b.stderr[-3000:]
    assert "encoded 5, skipped 0" in b.stdout and "2 process(es)" in b.stdout
    assert b.stdout.count("latent_scale_factor") == 1  # rank 0 alone reports (and computes) it
    assert "encode (2 processes)" in b.stderr and "5/5" in b.stderr  # one bar over both ranks' cases

    s1, s2 = Store(one), Store(two)
    assert s1.case_ids() == s2.case_ids()
    for cid in s1.case_ids():
        l1, l2 = s1.case(cid).latent, s2.case(cid).latent
        assert np.asarray(l1[...]).tobytes() == np.asarray(l2[...]).tobytes(), cid  # bit-identical
        assert dict(l1.attrs) == dict(l2.attrs)
    for key in ("latent_scale_factor", "latent_std", "latent_mean", "latent_scale_cases", "latent_vqgan"):
        assert s1.attrs[key] == s2.attrs[key], key
    assert s2.attrs["latent_scale_cases"] == len(s2.case_ids("train"))

    again = _run(launch_cmd(["-m", "launch.encode", "--store", str(two), "--vqgan", str(trained["run"])], nproc=2))
    assert again.returncode == 0 and "encoded 0, skipped 5" in again.stdout, again.stderr[-3000:]


@pytest.mark.distributed
def test_bad_weights_stop_every_process_with_one_error_line(trained, tmp_path):  # noqa: F811
    store = _copy(trained["store"], tmp_path / "s")
    bad = _run(launch_cmd(["-m", "launch.encode", "--store", str(store), "--vqgan", str(tmp_path / "nope")], nproc=2))
    assert bad.returncode != 0
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "nope" in errors[0], bad.stderr[-3000:]
    assert not any(Store(store).case(c).has_latent for c in Store(store).case_ids())


def _copy(src, dst):
    return shutil.copytree(src, dst)
