"""The training engine on one CPU process: config overrides, task registry, exact resume,
SIGKILL during a checkpoint write, SIGTERM, the non-finite guard, export."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launch import checkpoint as ck
from launch.config import (
    TrainConfig,
    apply_overrides,
    config_to_dict,
    make_run_config,
    run_config_class,
)
from launch.tasks import TASKS, load_task
from patching.errors import InputError
from tests.launch.toy_task import (
    REPO,
    ToyConfig,
    child_env,
    metrics,
    stream_order,
    trace,
    train_cmd,
)

N = 4  # the run is stopped at N and resumed to 2N
SETS = ("train.batch_size=2", "train.num_workers=2", "train.keep_last=10", "data.num_samples=10")


# --- config ------------------------------------------------------------------------------------


@dataclass
class Inner:
    channels: int = 8
    size: tuple[int, int, int] = (4, 4, 4)
    scale: float | None = None
    attention: bool = False


@dataclass
class Outer:
    model: Inner = field(default_factory=Inner)
    name: str = "x"
    levels: list[int] = field(default_factory=lambda: [1, 2])


def test_overrides_parse_by_field_type_and_copy_deeply():
    cfg = make_run_config(Outer(), TrainConfig())
    new = apply_overrides(cfg, ["model.channels=64", "model.size=8,8,4", "model.scale=none", "model.attention=yes",
                                "train.lr=2e-4", "levels=[3, 4, 5]", "name=abc"])
    assert new.model.channels == 64 and new.model.size == (8, 8, 4) and new.model.scale is None
    assert new.model.attention is True and new.train.lr == 2e-4 and new.levels == [3, 4, 5] and new.name == "abc"
    assert cfg.model.channels == 8 and cfg.train.lr == 1e-4  # the original is untouched...
    assert new.model is not cfg.model and new.train is not cfg.train  # ...and nothing is shared
    assert isinstance(new, Outer) and type(new) is run_config_class(Outer)
    assert apply_overrides(cfg, ["model.scale=0.5"]).model.scale == 0.5


@pytest.mark.parametrize("override, needle", [
    ("model.chanels=3", "unknown key 'model.chanels'"),
    ("nope=1", "unknown key 'nope'"),
    ("model.channels=abc", "model.channels='abc': expected int"),
    ("model.size=1,2", "expected 3 comma-separated values"),
    ("model.attention=maybe", "expected bool"),
    ("model=3", "is a section"),
    ("train.batch_size=0", "train.batch_size: must be >= 1"),
    ("train.mixed_precision=fp8", "train.mixed_precision"),
    ("novalue", "expected key=value"),
])
def test_bad_overrides_are_input_errors(override, needle):
    cfg = make_run_config(Outer(), TrainConfig())
    with pytest.raises(InputError) as err:
        apply_overrides(cfg, [override])
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_train_config_validates_and_run_config_rejects_a_train_field():
    with pytest.raises(InputError, match="train.grad_accum"):
        TrainConfig(grad_accum=0)
    with pytest.raises(InputError, match="train.ema_decay"):
        TrainConfig(ema_decay=1.0)

    @dataclass
    class Bad:
        train: int = 1

    with pytest.raises(TypeError, match="train"):
        run_config_class(Bad)
    data = config_to_dict(make_run_config(ToyConfig(), TrainConfig()))
    assert data["train"]["lr"] == 1e-4 and data["fault"]["nan_steps"] == []


def test_task_registry_errors(monkeypatch):
    assert set(TASKS) >= {"vqgan", "diffusion", "x2ct-gan", "x-recon"}
    with pytest.raises(InputError, match="unknown task 'nope'"):
        load_task("nope")
    monkeypatch.setitem(TASKS, "ghost", "no_such_package_xyz.task:GhostTask")
    with pytest.raises(InputError, match="cannot be imported"):
        load_task("ghost")
    with pytest.raises(InputError, match="no attribute"):
        load_task("tests.launch.toy_task:Missing")
    with pytest.raises(InputError, match="task protocol"):
        load_task("tests.launch.toy_task:ToyConfig")
    ref, task = load_task("tests.launch.toy_task:ToyTask")
    assert ref == "tests.launch.toy_task:ToyTask" and task.name == "toy"


def test_module_entry_bad_input_exits_2_with_one_line(tmp_path):
    proc = subprocess.run(train_cmd(tmp_path / "run", 2, sets=("model.width=-1x",)), cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: --set: model.width='-1x': expected int"]
    assert "Traceback" not in proc.stderr


# --- runs -----------------------------------------------------------------------------------------


def run_ok(cmd, env=None, timeout=180):
    proc = subprocess.run(cmd, cwd=REPO, env=env or child_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 2N-step run, checkpointing every N steps."""
    out = tmp_path_factory.mktemp("straight")
    run_ok(train_cmd(out, 2 * N, sets=(*SETS, f"train.ckpt_every={N}", "train.val_every=3")))
    return out


def tensors_of(ckpt: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {str(p.relative_to(ckpt)): load_file(p) for p in sorted(ckpt.rglob("*.safetensors"))
            if not p.name.startswith("rank-")}


def assert_same_state(a: Path, b: Path) -> None:
    ta, tb = tensors_of(a), tensors_of(b)
    assert ta.keys() == tb.keys() and {"models/gen.safetensors", "ema/gen.safetensors", "optim/gen.safetensors"} <= ta.keys()
    for f in ta:
        assert ta[f].keys() == tb[f].keys(), f
        for k in ta[f]:
            assert torch.equal(ta[f][k], tb[f][k]), f"{f}:{k} differs"
    assert ck.load_json(a / "optim" / "gen.json") == ck.load_json(b / "optim" / "gen.json")
    assert ck.load_json(a / "sched" / "gen.json") == ck.load_json(b / "sched" / "gen.json")


def test_resume_is_bit_identical(straight, tmp_path):
    out = tmp_path / "resumed"
    # The run "died" after step N: all that is left of it is its checkpoint.
    shutil.copytree(straight / "checkpoints" / f"step-{N}", out / "checkpoints" / f"step-{N}")
    run_ok(train_cmd(out, 2 * N, resume="latest", sets=(*SETS, f"train.ckpt_every={N}", "train.val_every=3")))
    assert_same_state(straight / "checkpoints" / f"step-{2 * N}", out / "checkpoints" / f"step-{2 * N}")
    a, b = metrics(straight), metrics(out)
    assert sorted(b) == list(range(N + 1, 2 * N + 1))
    for step in b:
        assert a[step]["loss"] == b[step]["loss"] and a[step]["d_loss"] == b[step]["d_loss"], step
    # the sample sequence continues where it stopped (2 samples a step, an epoch is 5 steps)
    assert [t["idx"] for t in trace(out)] == [t["idx"] for t in trace(straight)][N:]
    order = stream_order(0, 0, 10) + stream_order(0, 1, 10)
    assert sum((t["idx"] for t in trace(straight)), []) == order[: 4 * N]
    assert ck.load_state(out / "checkpoints" / f"step-{2 * N}" / "extra")["samples_seen"].item() == 4 * N


def test_checkpoint_holds_only_safetensors_and_json(straight):
    ckpt = ck.read_latest(straight / "checkpoints")
    assert ckpt.name == f"step-{2 * N}" and (straight / "checkpoints" / "latest").read_text().strip() == ckpt.name
    files = [p for p in ckpt.rglob("*") if p.is_file()]
    assert files and all(p.suffix in (".safetensors", ".json") for p in files), files
    meta = ck.read_meta(ckpt)
    assert (meta["step"], meta["epoch"], meta["position"]) == (2 * N, 1, 6)
    assert meta["models"] == ["disc", "gen"] and meta["optimizers"] == {"gen": "gen", "disc": "disc"}
    rank0 = ck.load_state(ckpt / "rank-0")
    assert rank0["data"]["position"] == 6 and set(rank0["rng"]) >= {"torch", "numpy", "python", "generators"}
    config = ck.load_json(ckpt / "config.json")
    assert config["task_ref"] == "tests.launch.toy_task:ToyTask" and config["config"]["train"]["batch_size"] == 2
    assert (straight / "tb").is_dir() and any((straight / "tb").iterdir())


def test_export_writes_loadable_safetensors(straight, tmp_path):
    from launch.export import load_weights
    from launch.export import main as export_main
    from tests.launch.toy_task import ToyTask

    assert export_main(["--checkpoint", str(straight), "--out", str(tmp_path / "w")]) == 0
    doc = ck.load_json(tmp_path / "w" / "config.json")
    assert doc["step"] == 2 * N and doc["models"]["gen"]["weights"] == "ema" and doc["models"]["disc"]["weights"] == "raw"
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == [
        "config.json", "disc.safetensors", "extra.json", "extra.safetensors", "gen.raw.safetensors", "gen.safetensors"]
    models = ToyTask().build_models(ToyConfig())
    for name, model in models.items():
        model.load_state_dict(load_file(tmp_path / "w" / f"{name}.safetensors"))  # strict
    ckpt = straight / "checkpoints" / f"step-{2 * N}"
    assert all(torch.equal(v, load_file(ckpt / "ema" / "gen.safetensors")[k]) for k, v in models["gen"].state_dict().items())
    w = load_weights(tmp_path / "w")
    assert w.task == "toy" and w.extra["note"] == "toy" and set(w.raw) == {"gen", "disc"}
    assert not all(torch.equal(w.weights["gen"][k], w.raw["gen"][k]) for k in w.raw["gen"])  # the EMA lags
    assert all(torch.equal(w.weights["disc"][k], w.raw["disc"][k]) for k in w.raw["disc"])  # no EMA: raw
    assert export_main(["--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2


def test_sigkill_during_checkpoint_write_keeps_previous(straight, tmp_path):
    out = tmp_path / "killed"
    sets = (*SETS, "train.ckpt_every=2", "train.val_every=3")
    env = child_env(XRAY2CT_CKPT_WRITE_DELAY_S="0.25")
    proc = subprocess.Popen(train_cmd(out, 2 * N, sets=sets), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    root = out / "checkpoints"

    def writing_second() -> bool:
        return root.is_dir() and bool(list(root.glob(".tmp-step-4-*/models/*")))

    try:
        deadline = time.monotonic() + 120
        while not writing_second():
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its second checkpoint"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the rank and its DataLoader workers
        proc.wait()
    assert ck.read_latest(root).name == "step-2" and not (root / "step-4").exists()
    assert sorted(p.name for p in (root / "step-2").iterdir()) == sorted(p.name for p in (straight / "checkpoints" / "step-4").iterdir())
    run_ok(train_cmd(out, 2 * N, resume="latest", sets=sets))
    assert not list(root.glob(".tmp-*")), "the stale staging directory is removed by the next save"
    assert_same_state(straight / "checkpoints" / f"step-{2 * N}", root / f"step-{2 * N}")


def test_sigterm_saves_and_exits_0(tmp_path):
    out = tmp_path / "term"
    sets = ("train.batch_size=2", "train.num_workers=2", "train.ckpt_every=1000", "data.num_samples=64")
    proc = subprocess.Popen(train_cmd(out, 100_000, sets=sets), cwd=REPO, env=child_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while len(metrics(out)) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() is not None else "slow"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)  # the whole group: DataLoader workers must survive it
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "stopped by SIGTERM" in err
    last = max(metrics(out))
    ckpt = ck.read_latest(out / "checkpoints")
    assert ckpt.name == f"step-{last}" and ck.read_meta(ckpt)["step"] == last


def test_time_budget_stops_with_a_checkpoint_and_resumes(tmp_path, in_process, capsys):
    """train.max_minutes: the run stops after the step that spends the budget, checkpointed, exit 0;
    `--resume latest` continues from there to max_steps."""
    out = tmp_path / "budget"
    # 1e-6 minutes is spent by the end of the first step
    assert train_in_process(out, 50, "train.ckpt_every=1000", "train.max_minutes=0.000001") == 0
    assert "stopped by its time budget (train.max_minutes=1e-06) after step 1" in capsys.readouterr().err
    assert ck.read_meta(ck.read_latest(out / "checkpoints"))["step"] == 1
    assert train_in_process(out, 3, "train.ckpt_every=1000", "--resume", "latest") == 0
    assert ck.read_meta(ck.read_latest(out / "checkpoints"))["step"] == 3


# --- the non-finite guard (in process) ---------------------------------------------------------------


@pytest.fixture
def in_process():
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def train_in_process(out: Path, steps: int, *sets: str) -> int:
    from launch.train import main

    return main(["tests.launch.toy_task:ToyTask", "--store", "unused", "--output-dir", str(out), "--max-steps", str(steps),
                 "--set", "train.batch_size=2", "data.num_samples=16", "train.keep_last=10", *sets])


def test_nonfinite_step_is_skipped_and_counted(tmp_path, in_process, capsys):
    out = tmp_path / "nan1"
    assert train_in_process(out, 4, "train.ckpt_every=1", "fault.nan_steps=2", "train.max_nonfinite=3") == 0
    m = metrics(out)
    assert [m[s]["nonfinite_total"] for s in range(1, 5)] == [0, 0, 1, 1]
    assert "step 3: no checkpoint written during a non-finite streak" in capsys.readouterr().err
    root = out / "checkpoints"
    assert [p.name for _, p in ck.list_checkpoints(root)] == ["step-1", "step-2", "step-4"]
    # 4 steps, the generator's update skipped once: Adam counted 3 steps, the scheduler too;
    # the discriminator's finite update was applied every step
    adam = load_file(root / "step-4" / "optim" / "gen.safetensors")
    steps = {k: v.item() for k, v in adam.items() if k.endswith("/step")}
    assert steps and set(steps.values()) == {3.0}
    assert ck.load_state(root / "step-4" / "sched" / "gen")["last_epoch"] == 3
    assert ck.read_meta(root / "step-4")["nonfinite_total"] == 1
    sgd_before, sgd_after = (load_file(root / f"step-{s}" / "optim" / "disc.safetensors") for s in (2, 4))
    assert not all(torch.equal(sgd_before[k], sgd_after[k]) for k in sgd_before)


def test_nonfinite_streak_stops_with_status_1_and_keeps_last_good(tmp_path, in_process, capsys):
    out = tmp_path / "nan3"
    rc = train_in_process(out, 20, "train.ckpt_every=2", "fault.nan_steps=4,5,6", "train.max_nonfinite=3")
    assert rc == 1
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and "3 consecutive non-finite updates" in line[0] and "step-4" in line[0]
    root = out / "checkpoints"
    assert [p.name for _, p in ck.list_checkpoints(root)] == ["step-2", "step-4"]
    assert ck.read_latest(root).name == "step-4" and max(metrics(out)) == 7


# --- GPU-only launch paths -------------------------------------------------------------------------

needs_cuda_ds = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: DeepSpeed via Accelerate does not run on CPU")
needs_cuda_fsdp = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: Accelerate's FSDP runs on GPUs only")


def _accelerate_cmd(config: str, out: Path, steps: int, resume: str | None = None) -> list[str]:
    cmd = train_cmd(out, steps, resume=resume, sets=(*SETS, f"train.ckpt_every={N}", "train.mixed_precision=no"))
    i = cmd.index("-m")
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch/accelerate" / config),
            "--num_processes", "1", *cmd[i:]]


@pytest.mark.gpu
@needs_cuda_fsdp
def test_fsdp_on_gpu_resumes_exactly(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run_ok(_accelerate_cmd("fsdp.yaml", a, 2 * N), timeout=600)
    shutil.copytree(a / "checkpoints" / f"step-{N}", b / "checkpoints" / f"step-{N}")
    run_ok(_accelerate_cmd("fsdp.yaml", b, 2 * N, resume="latest"), timeout=600)
    assert_same_state(a / "checkpoints" / f"step-{2 * N}", b / "checkpoints" / f"step-{2 * N}")


@pytest.mark.gpu
@needs_cuda_ds
def test_deepspeed_zero2_trains_a_gan_task(tmp_path):
    pytest.importorskip("transformers", reason="Accelerate's DeepSpeed plugin imports transformers")
    out = tmp_path / "ds"
    run_ok(_accelerate_cmd("deepspeed_zero2.yaml", out, 2 * N), timeout=600)
    assert ck.read_latest(out / "checkpoints").name == f"step-{2 * N}"
    run_ok(_accelerate_cmd("deepspeed_zero2.yaml", out, 2 * N + 2, resume="latest"), timeout=600)


# --- the engine's optional lr schedule and EMA warm-up (launch.schedules) ----------------------------


def test_lr_factor_warms_up_then_decays_to_the_floor():
    from launch.schedules import lr_factor

    assert [lr_factor(s, 4, 20, "none") for s in (0, 1, 3, 4, 19)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    cos = [lr_factor(s, 4, 20, "cosine") for s in range(4, 21)]
    assert cos[0] == 1.0 and cos[-1] == pytest.approx(0.1) and all(a > b for a, b in zip(cos, cos[1:]))
    assert cos[8] == pytest.approx(0.55)  # half way: the midpoint of 1 and the floor
    assert lr_factor(12, 4, 20, "linear") == pytest.approx(0.55) and lr_factor(99, 0, 20, "linear") == pytest.approx(0.1)


def test_ema_warmup_follows_diffusers_and_caps_at_decay():
    from launch.schedules import ema_decay_at

    assert ema_decay_at(0, 0.99, True) == pytest.approx(0.1)  # the first update keeps 90 % of the live weights
    assert ema_decay_at(10, 0.99, True) == pytest.approx(11 / 20)
    assert ema_decay_at(10_000, 0.99, True) == 0.99 and ema_decay_at(0, 0.99, False) == 0.99


def test_engine_schedules_unscheduled_optimizers_and_warms_the_ema(tmp_path, in_process):
    """train.warmup_steps / lr_decay reach the optimizer the task leaves unscheduled (the toy's
    SGD ``disc``), not the task's own (``gen``); train.ema_warmup changes the saved EMA."""
    from launch.schedules import lr_factor

    out = tmp_path / "sched"
    assert train_in_process(out, 6, "train.warmup_steps=2", "train.lr_decay=cosine", "train.ema_warmup=true") == 0
    m = metrics(out)
    for step in range(1, 7):  # logged after `step` scheduler steps
        assert m[step]["lr/disc"] == pytest.approx(1e-2 * lr_factor(step, 2, 6, "cosine"))
        assert m[step]["lr/gen"] == pytest.approx(1e-2 * min(1.0, (step + 1) / 3))
    plain = tmp_path / "plain"  # the same training, a fixed-decay EMA: identical live weights
    assert train_in_process(plain, 6, "train.warmup_steps=2", "train.lr_decay=cosine") == 0

    def ema_to_live(run: Path) -> float:
        ckpt = ck.read_latest(run / "checkpoints")
        ema, live = load_file(ckpt / "ema" / "gen.safetensors"), load_file(ckpt / "models" / "gen.safetensors")
        return sum(float((ema[k] - live[k]).norm()) for k in ema)

    ckpts = [ck.read_latest(r / "checkpoints") for r in (out, plain)]
    a, b = (load_file(c / "models" / "gen.safetensors") for c in ckpts)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # warmed up, the average has left the initialisation: it is closer to the live weights
    assert ema_to_live(out) < 0.5 * ema_to_live(plain)
