"""Checkpoint format and publishing: the no-pickle codec, atomic publish and retention, RNG
state, optimizer state round trips, and FSDP2 sharded save/load (2 → 1 and 1 → 2)."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from launch import checkpoint as ck
from patching.errors import InputError
from tests.launch.toy_task import REPO, ToyConfig, ToyTask, child_env, free_port


def test_flatten_roundtrip_keeps_structure_and_types():
    state = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}, "w.1": {"m": torch.arange(4)}},
        "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0, 1], "name": None, "nesterov": False}],
        "odd": {"__tensor__": "not a marker", "inf": math.inf},
        "nan": math.nan,
        "size": torch.Size([2, 3]),
        "np": np.float32(1.5),
    }
    tensors, skeleton = ck.flatten_state(state)
    assert all(isinstance(t, torch.Tensor) for t in tensors.values()) and len(tensors) == 3
    back = ck.unflatten_state(json.loads(json.dumps(skeleton)), tensors)
    assert back["state"][0]["step"] is tensors["/state/0/step"]
    assert back["param_groups"][0]["betas"] == (0.9, 0.999) and isinstance(back["param_groups"][0]["betas"], tuple)
    assert set(back["state"]) == {0, "w.1"} and back["odd"] == {"__tensor__": "not a marker", "inf": math.inf}
    assert math.isnan(back["nan"]) and back["size"] == (2, 3) and back["np"] == 1.5


def test_flatten_refuses_what_would_need_pickle():
    with pytest.raises(TypeError, match="/a/b: a object cannot be stored without pickle"):
        ck.flatten_state({"a": {"b": object()}})
    with pytest.raises(TypeError, match="dict key"):
        ck.flatten_state({(1, 2): 3})


def test_state_files_and_a_truncated_file(tmp_path):
    obj = {"x": torch.randn(3), "n": 7, "s": "a"}
    written = ck.save_state(tmp_path / "thing", obj)
    assert sorted(p.name for p in written) == ["thing.json", "thing.safetensors"]
    back = ck.load_state(tmp_path / "thing")
    assert torch.equal(back["x"], obj["x"]) and back["n"] == 7 and back["s"] == "a"
    assert [p.name for p in ck.save_state(tmp_path / "plain", {"a": 1})] == ["plain.json"]
    data = (tmp_path / "thing.safetensors").read_bytes()
    (tmp_path / "thing.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="thing.safetensors: not a readable safetensors file"):
        ck.load_state(tmp_path / "thing")


def test_tied_weights_are_saved(tmp_path):
    w = torch.randn(4, 4)
    ck.save_tensors(tmp_path / "t.safetensors", {"a": w, "b": w, "c": w[1]})
    back = ck.load_tensors(tmp_path / "t.safetensors")
    assert torch.equal(back["a"], w) and torch.equal(back["b"], w) and torch.equal(back["c"], w[1])


def test_rng_state_roundtrip():
    g = torch.Generator().manual_seed(5)
    state = ck.capture_rng({"task": g})
    tensors, skeleton = ck.flatten_state(state)
    draw = lambda: (torch.rand(3), np.random.rand(2), random.random(), torch.rand(2, generator=g))  # noqa: E731
    first = draw()
    ck.restore_rng(ck.unflatten_state(json.loads(json.dumps(skeleton)), tensors), {"task": g})
    second = draw()
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    assert first[2] == second[2] and torch.equal(first[3], second[3])


def _toy_model_and_optimizers(seed: int):
    torch.manual_seed(seed)
    models = ToyTask().build_models(ToyConfig())
    opts = {"gen": torch.optim.AdamW(models["gen"].parameters(), lr=1e-2, betas=(0.5, 0.9)),
            "disc": torch.optim.SGD(models["disc"].parameters(), lr=1e-2, momentum=0.9, nesterov=True)}
    return models, opts


def _step(models, opts, salt):
    torch.manual_seed(salt)
    for m in models.values():
        m.eval()
    x = torch.randn(5, 4)
    loss = models["disc"](models["gen"](x)).pow(2).mean()
    loss.backward()
    for o in opts.values():
        o.step()
        o.zero_grad()


def test_optimizer_state_roundtrip_one_process(tmp_path):
    models, opts = _toy_model_and_optimizers(0)
    _step(models, opts, 1)
    for name in models:
        ck.save_tensors(tmp_path / f"{name}.safetensors", ck.gather_model_state(models[name]))
        ck.save_state(tmp_path / f"opt-{name}", ck.gather_optimizer_state(models[name], opts[name]))
    models2, opts2 = _toy_model_and_optimizers(1)
    for name in models:
        ck.load_model_state(models2[name], ck.load_tensors(tmp_path / f"{name}.safetensors"))
        ck.load_optimizer_state(models2[name], opts2[name], ck.load_state(tmp_path / f"opt-{name}"))
        assert opts2[name].state_dict()["param_groups"] == opts[name].state_dict()["param_groups"]
    _step(models, opts, 2)
    _step(models2, opts2, 2)
    for name in models:
        a, b = models[name].state_dict(), models2[name].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(InputError, match="does not match the model"):
        ck.load_model_state(models2["gen"], ck.load_tensors(tmp_path / "disc.safetensors"))


def _fake_checkpoint(root, step, token="ab"):
    staging = ck.staging_dir(root, step, token)
    staging.mkdir(parents=True)
    ck.save_json(staging / "meta.json", {"format": ck.FORMAT, "version": ck.VERSION, "step": step})
    return staging


def test_publish_is_atomic_keeps_last_k_and_cleans_staging(tmp_path):
    root = tmp_path / "checkpoints"
    stale = _fake_checkpoint(root, 99, "dead")  # left by a writer that was killed
    for step in (1, 2, 3, 4, 5):
        final = ck.publish(root, _fake_checkpoint(root, step), step, keep_last=2)
        assert final == root / f"step-{step}" and (root / "latest").read_text() == f"step-{step}\n"
    assert [p.name for _, p in ck.list_checkpoints(root)] == ["step-4", "step-5"]
    assert not stale.exists() and sorted(p.name for p in root.iterdir()) == ["latest", "step-4", "step-5"]
    # a writer killed between the rename and the pointer update: `latest` lags, still valid
    (root / "latest").write_text("step-4\n")
    assert ck.read_latest(root).name == "step-4"
    # a pointer to a removed checkpoint falls back to the newest complete one
    (root / "latest").write_text("step-3\n")
    assert ck.read_latest(root).name == "step-5"
    # publishing the same step again replaces it
    ck.publish(root, _fake_checkpoint(root, 5, "cd"), 5, keep_last=2)
    assert ck.read_latest(root).name == "step-5"


def test_resume_resolution(tmp_path):
    out = tmp_path / "run"
    assert ck.resolve_resume(out, None) is None and ck.resolve_resume(out, "latest") is None
    ck.publish(ck.checkpoint_root(out), _fake_checkpoint(ck.checkpoint_root(out), 3), 3, keep_last=1)
    with pytest.raises(InputError, match="already holds checkpoints"):
        ck.resolve_resume(out, None)
    assert ck.resolve_resume(out, "latest").name == "step-3"
    assert ck.resolve_resume(tmp_path / "elsewhere", str(out)).name == "step-3"
    with pytest.raises(InputError, match="no such file"):
        ck.resolve_resume(out, str(tmp_path / "missing"))
    with pytest.raises(InputError, match="not a checkpoint"):
        ck.resolve_resume(out, str(tmp_path))


@pytest.mark.distributed
def test_fsdp2_sharded_save_load_roundtrip(tmp_path):
    # 1 -> 2: a checkpoint written by one process, for the sharded model to load
    torch.manual_seed(3)
    gen = ToyTask().build_models(ToyConfig())["gen"]
    opt = torch.optim.Adam(gen.parameters(), lr=1e-2)
    gen(torch.randn(2, 4)).sum().backward()
    opt.step()
    (tmp_path / "single").mkdir()
    ck.save_tensors(tmp_path / "single" / "model.safetensors", ck.gather_model_state(gen))
    ck.save_state(tmp_path / "single" / "optim", ck.gather_optimizer_state(gen, opt))

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "tests.launch.toy_task", "fsdp-roundtrip", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result == {"model": True, "optim": True, "ema": True, "ema_moved": True, "after_step": True, "sharded": True,
                      "from_single": True}

    # 2 -> 1: the sharded run's checkpoint loads into a plain module and optimizer
    torch.manual_seed(9)
    plain = ToyTask().build_models(ToyConfig())["gen"]
    plain_opt = torch.optim.Adam(plain.parameters(), lr=1e-2)
    saved_model = ck.load_tensors(tmp_path / "fsdp" / "model.safetensors")
    saved_optim = ck.load_state(tmp_path / "fsdp" / "optim")
    ck.load_model_state(plain, saved_model)
    ck.load_optimizer_state(plain, plain_opt, saved_optim)
    assert all(torch.equal(v, saved_model[k]) for k, v in plain.state_dict().items())
    got = ck.gather_optimizer_state(plain, plain_opt)
    for fqn, st in saved_optim["state"].items():
        assert all(torch.equal(st[k], got["state"][fqn][k]) for k in st)
    assert got["param_groups"] == saved_optim["param_groups"]


@pytest.mark.distributed
def test_deepspeed_zero2_partitions_roundtrip_without_pickle(tmp_path):
    pytest.importorskip("deepspeed")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "tests.launch.toy_task", "deepspeed-roundtrip", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(DS_ACCELERATOR="cpu"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["after_step"] is True
    assert all(name.endswith((".json", ".safetensors")) for name in result["files"])
    assert {"optim.rank-0.safetensors", "optim.rank-1.safetensors"} <= set(result["files"])
    dropped = ck.load_json(tmp_path / "optim.rank-0.json")["state"]["dropped"]
    assert "loss_scaler" in dropped  # an object: taken from the live optimizer, never pickled
