"""The VQ-GAN task on the engine: presets, validation, CLI training, exact resume (one process
and two-process DDP) with the codebook intact."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from launch.presets import data_spec
from launch.train import build_run_config
from patching.data.store import Store
from patching.data.synth_store import synthesize
from patching.errors import InputError
from stage1_vqgan.task import VQGANTask
from tests.launch.toy_task import REPO, assert_same_checkpoint, child_env, launch_cmd, metrics

N = 3  # steps before the resume; the runs go to 2N
# A tiny model: 8/8/16 channels, ×4, 32 codes of dim 4, 16³ tiles, disc active from step 2
# (before and after the resume point), validation at step N (only in the straight run).
TINY = ("model.base_channels=8", "model.channel_mults=1,1,2", "model.attn_mid=false", "model.latent_dim=4",
        "model.codebook_size=32", "disc.channels=8", "disc.num_layers=2", "disc.start_step=2",
        "codec.tile=16,16,16", "codec.tile_latent=4,4,4", "data.num_val_tiles=2")
RUN = ("train.batch_size=2", "train.num_workers=1", "train.keep_last=10", f"train.ckpt_every={N}",
       f"train.val_every={N}", "train.log_every=1")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vqstore") / "store"
    synthesize(Store(path, create=True), 6, (32, 32, 32), xray_size=32, workers=1, progress=False)
    return path


def train_cmd(store: Path, out: Path, steps: int, *, nproc: int = 1, resume: str | None = None,
              sets: tuple[str, ...] = ()) -> list[str]:
    args = ["-m", "launch.train", "vqgan", "--store", str(store), "--preset", "cpu-demo", "--output-dir", str(out),
            "--max-steps", str(steps)]
    if resume:
        args += ["--resume", resume]
    args += ["--set", *TINY, *RUN, *sets]
    return launch_cmd(args, nproc)


def run_ok(cmd: list[str], timeout: int = 300) -> None:
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]


# --- presets and metrics --------------------------------------------------------------------------


def test_presets_resolve_to_run_configs():
    task = VQGANTask()
    demo = build_run_config(task, "cpu-demo", [])
    assert demo.train_tile == (32, 32, 32) and demo.model.downsample == 4 and demo.train.lr == 5e-4
    assert demo.train.batch_size == 2 and demo.disc.start_step == 1500
    big = build_run_config(task, "ctpa-512", [])
    assert big.train_tile == (256, 256, 128) and big.model.base_channels == 64 and big.model.gradient_checkpointing
    assert big.codec.tile_latent == (64, 64, 32) and big.train.grad_accum == 4 and big.disc.start_step == 50_000
    assert data_spec("ctpa-512").shape == (512, 512, 604)
    small = build_run_config(task, "cpu-demo", ["data.tile=16,16,24", "model.attn_mid=false"])
    assert small.train_tile == (16, 16, 24) and small.codec.tile == (32, 32, 32)


@pytest.mark.parametrize("override, needle", [
    ("data.tile=18,16,16", "data.tile"),            # not a multiple of ×4
    ("data.tile=8,8,8", "discriminator"),             # below the 2-layer PatchGAN's 16
    ("data.val_split=dev", "data.val_split"),
    ("data.overlap=1.0", "data.overlap"),
])
def test_bad_task_config_is_an_input_error(override, needle):
    with pytest.raises(InputError, match=needle):
        build_run_config(VQGANTask(), "cpu-demo", [override])


def test_validate_reports_metrics_and_a_preview(store):
    task = VQGANTask()
    cfg = build_run_config(task, "cpu-demo", list(TINY))
    models = task.build_models(cfg)
    task.build_dataset(cfg, store, data_spec("cpu-demo"), "train", 0, 1, 0)
    for m in models.values():
        m.eval()
    ctx = type("Ctx", (), {"device": torch.device("cpu"), "ema_weights": contextlib.nullcontext,
                           "autocast": contextlib.nullcontext})()
    with torch.no_grad():
        out = task.validate(models, 0, ctx)
    assert set(out) == {"psnr", "psnr_hu_window", "mae_hu", "ssim", "codebook_usage", "codebook_perplexity", "preview"}
    assert all(out[k].ndim == 0 and torch.isfinite(out[k]) for k in out if k != "preview")
    assert out["preview"].ndim == 2 and 0 <= float(out["preview"].min()) and float(out["preview"].max()) <= 1
    assert not bool(models["vqgan"].quantizer.initialized)  # eval mode: the codebook was not touched
    assert task.extra_state() == {"hu_window": [-1024.0, 1600.0], "spacing_mm": [5.625] * 3}
    with pytest.raises(InputError, match="HU window"):
        task.load_extra_state({"hu_window": [-1000.0, 1000.0]})


# --- training through the CLI, resume ----------------------------------------------------------


@pytest.fixture(scope="module")
def straight(store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vq") / "straight"
    run_ok(train_cmd(store, out, 2 * N))
    return out


def test_cli_trains_logs_and_checkpoints(straight):
    recs = metrics(straight)
    assert sorted(recs) == list(range(1, 2 * N + 1))
    for key in ("loss_g", "rec_l1", "commitment", "loss_d", "g_adv", "disc_weight", "codebook_perplexity",
                "codebook_usage", "grad_norm/vqgan"):
        assert all(np.isfinite(recs[s][key]) for s in recs), key
    assert recs[1]["loss_d"] == 0 and recs[1]["disc_weight"] == 0  # the discriminator starts at step 2
    assert recs[2 * N]["loss_d"] > 0 and recs[2 * N]["disc_weight"] > 0 and "grad_norm/disc" in recs[2 * N]
    ckpt = straight / "checkpoints" / f"step-{2 * N}"
    assert {p.name for p in (ckpt / "models").iterdir()} == {"vqgan.safetensors", "disc.safetensors"}
    assert (ckpt / "ema" / "vqgan.safetensors").is_file() and not (ckpt / "ema" / "disc.safetensors").exists()
    assert json.loads((ckpt / "extra.json").read_text())["state"]["hu_window"] == [-1024.0, 1600.0]
    assert list((straight / "tb").glob("events.*"))
    cfg = json.loads((straight / "config.json").read_text())["config"]
    assert cfg["codec"]["tile"] == [16, 16, 16] and cfg["data"]["tile"] is None


def test_resume_is_bit_identical_and_keeps_the_codebook(store, straight, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoints" / f"step-{N}", out / "checkpoints" / f"step-{N}")
    at_n = load_file(out / "checkpoints" / f"step-{N}" / "models" / "vqgan.safetensors")
    assert int(at_n["quantizer.initialized"]) == 1
    run_ok(train_cmd(store, out, 2 * N, resume="latest"))
    assert_same_checkpoint(straight / "checkpoints" / f"step-{2 * N}", out / "checkpoints" / f"step-{2 * N}")
    a, b = metrics(straight), metrics(out)
    assert sorted(b) == list(range(N + 1, 2 * N + 1))
    assert all(a[s]["loss_g"] == b[s]["loss_g"] and a[s]["loss_d"] == b[s]["loss_d"] for s in b)
    # The codebook continued: a re-initialised one (seeded from the first resumed batch) could
    # not reproduce the uninterrupted run's buffers bit for bit, which assert_same_checkpoint checked.
    after = load_file(out / "checkpoints" / f"step-{2 * N}" / "models" / "vqgan.safetensors")
    assert not torch.equal(after["quantizer.embed"], at_n["quantizer.embed"])  # and it did train on

@pytest.mark.distributed
def test_two_process_ddp_resume_is_bit_identical(store, tmp_path):
    ref = tmp_path / "ddp"
    run_ok(train_cmd(store, ref, 2 * N, nproc=2))
    out = tmp_path / "ddp-resumed"
    shutil.copytree(ref / "checkpoints" / f"step-{N}", out / "checkpoints" / f"step-{N}")
    run_ok(train_cmd(store, out, 2 * N, nproc=2, resume="latest"))
    assert_same_checkpoint(ref / "checkpoints" / f"step-{2 * N}", out / "checkpoints" / f"step-{2 * N}")
    a, b = metrics(ref), metrics(out)
    assert all(a[s]["loss_g"] == b[s]["loss_g"] and a[s]["loss_d"] == b[s]["loss_d"] for s in b)
    meta = json.loads((out / "checkpoints" / f"step-{2 * N}" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["position"] > 0
