"""The X2CT-GAN and X-Recon training tasks on the engine: the whole-volume dataset's position
contract, configs and presets, a few steps lowering the generator loss, exact resume, validation,
and a 2-process DDP run (marked ``distributed``). Tiny models (32² X-rays → 16³) on a 6-case
store of 32³ phantoms; the single-process runs are in process (no interpreter start-up)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from gan_baselines.data import VolumeDataset, epoch_order, psnr
from launch.tasks import load_task
from launch.train import build_run_config
from patching.data.spec import VolumeSpec, hu_to_unit
from patching.data.store import Store
from patching.errors import InputError
from tests.launch.toy_task import REPO, child_env, free_port, metrics

WINDOW = (-1024.0, 1600.0)
# 32² X-rays → 16³ (encoder 32 → 4, decoder 4 → 16); X-Recon needs num_fusion_convs[0] = 0
TINY = ("model.xray_size=32", "model.volume_size=16", "model.stem_channels=8", "model.growth_rate=4",
        "model.bottleneck_factor=2", "model.num_dense_layers=1,1,1", "model.decoder_channels=4,8,8",
        "model.num_branch_convs=1,1,0", "model.num_fusion_convs=0,1,0", "model.d_channels=4")
RUN = ("train.log_every=1", "train.num_workers=0", "train.val_every=0", "train.keep_last=10")


def train(task: str, store: Path, out: Path, steps: int, *sets: str, resume: str | None = None) -> None:
    from launch.train import main

    args = [task, "--store", str(store), "--preset", "cpu-demo", "--output-dir", str(out), "--max-steps", str(steps)]
    args += ["--resume", resume] if resume else []
    assert main([*args, "--set", *TINY, *RUN, *sets]) == 0


def dataset(store: Path, **kw) -> VolumeDataset:
    args = dict(split=None, volume_size=16, xray_size=32, views=("pa", "lateral"), hu_window=WINDOW, seed=3)
    return VolumeDataset(store, **{**args, **kw})


# --- the dataset ---------------------------------------------------------------------------------


def test_sample_is_the_resampled_volume_and_resized_xrays(store):
    ds = dataset(store, shuffle=False)
    s = next(iter(ds))
    case = Store(store).case(ds.case_ids[0])
    want = F.interpolate(hu_to_unit(torch.from_numpy(np.asarray(case.ct[...])), WINDOW)[None, None], size=(16, 16, 16),
                         mode="trilinear", align_corners=False)[0]
    assert s["ct"].shape == (1, 16, 16, 16) and torch.equal(s["ct"], want)
    assert s["pa"].shape == s["lateral"].shape == (1, 32, 32) and 0 <= s["pa"].min() and s["pa"].max() <= 1
    assert s["case_id"] == ds.case_ids[0] and s["position"] == 0


def ids_of(ds: VolumeDataset, num_workers: int = 0) -> list[str]:
    loader = torch.utils.data.DataLoader(ds, batch_size=ds.batch_size, num_workers=num_workers, in_order=True)
    return [c for batch in loader for c in batch["case_id"]]


def test_position_contract_ranks_workers_resume(store):
    order = [dataset(store).case_ids[i] for i in epoch_order(6, 3, 0, True)]
    assert epoch_order(6, 3, 1, True).tolist() != epoch_order(6, 3, 0, True).tolist()  # reshuffled per epoch
    # 2 ranks, batches of 2, 2 workers: rank r takes positions r, r+2, r+4; blocks alternate workers
    for rank in (0, 1):
        ds = dataset(store, rank=rank, world_size=2, batch_size=2, num_workers=2)
        assert ids_of(ds, num_workers=2) == order[rank::2]
    # resumed at global position 3 on 2 ranks: (6 - 3) // 2 = 1 case each, positions 3 and 4
    for rank in (0, 1):
        ds = dataset(store, rank=rank, world_size=2)
        ds.load_state_dict({"epoch": 0, "position": 3})
        assert [s["position"] for s in ds] == [3 + rank] and len(ds) == 1
    ds = dataset(store)
    ds.load_state_dict({"epoch": 1, "position": 0})
    assert [s["case_id"] for s in ds] == [ds.case_ids[i] for i in epoch_order(6, 3, 1, True)]
    ds.set_epoch(2)
    assert ds.state_dict() == {"epoch": 2, "position": 0, "num_cases": 6}
    with pytest.raises(InputError, match="saved for 5 cases"):
        ds.load_state_dict({"epoch": 0, "position": 0, "num_cases": 5})


def test_dataset_rejects_cases_without_the_views(tmp_path):
    s = Store(tmp_path / "s.zarr", create=True)
    s.write_case("c1", np.zeros((8, 8, 8), np.int16), (1.0, 1.0, 1.0), np.eye(4), split="train",
                 views={"pa": (np.full((16, 16), 0.5, np.float32), {})})
    with pytest.raises(InputError, match="no lateral X-ray"):
        dataset(s.path)
    assert len(dataset(s.path, views=("pa",))) == 1
    with pytest.raises(InputError, match="no complete cases in split 'val'"):
        dataset(s.path, split="val")


def test_psnr_uses_the_given_data_range():
    a = torch.zeros(4, 4)
    assert float(psnr(a, a + 10.0, 100.0)) == pytest.approx(20.0)
    assert float(psnr(a, a + 10.0, 1000.0)) == pytest.approx(40.0)


# --- configs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, lr", [("x2ct-gan", 2e-4), ("x-recon", 5e-5)])
def test_presets_and_train_defaults(name, lr):
    _, task = load_task(name)
    cfg = build_run_config(task, "cpu-demo", [])
    assert cfg.model.volume_size == 32 and cfg.train.lr == lr and cfg.optim.betas == (0.5, 0.99)
    assert cfg.train.clip_grad == 0 and cfg.train.batch_size == 1
    paper = build_run_config(task, "ctpa-512", [])
    assert paper.model.volume_size == (128 if name == "x2ct-gan" else 224) and paper.train.grad_accum == 1
    with pytest.raises(InputError, match="unknown preset"):
        task.default_config("nope")
    with pytest.raises(InputError, match="optim.lr"):
        task.build_optimizers(build_run_config(task, "cpu-demo", ["optim.lr=1e-3"]), task.build_models(cfg))


def test_single_view_x2ct_gan_and_lr_schedule():
    _, task = load_task("x2ct-gan")
    cfg = build_run_config(task, "cpu-demo", ["model.views=pa", *TINY], max_steps=10)
    models = task.build_models(cfg)
    assert cfg.model.views == ("pa",) and models["generator"](torch.rand(1, 1, 32, 32)).shape == (1, 1, 16, 16, 16)
    sched = task.build_schedulers(cfg, task.build_optimizers(cfg, models))
    lrs = []
    for _ in range(10):
        lrs.append(sched["generator"].get_last_lr()[0])
        sched["generator"].optimizer.step()
        sched["generator"].step()
    assert lrs[:6] == [2e-4] * 6 and lrs[6:] == pytest.approx([1.6e-4, 1.2e-4, 0.8e-4, 0.4e-4])
    with pytest.raises(InputError, match="X-Recon takes both views"):
        build_run_config(load_task("x-recon")[1], "cpu-demo", ["model.views=pa"])


# --- training ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["x2ct-gan", "x-recon"])
def test_a_few_steps_lower_the_generator_loss(name, store, tmp_path, in_process):
    out = tmp_path / name
    train(name, store, out, 30, "train.val_every=30", "train.ckpt_every=0")
    m = metrics(out)
    first = np.mean([m[s]["g_loss"] for s in range(1, 6)])
    last = np.mean([m[s]["g_loss"] for s in range(26, 31)])
    print(f"{name}: generator loss {first:.3f} (steps 1-5) -> {last:.3f} (steps 26-30)")
    assert last < 0.8 * first, (first, last)
    assert all(np.isfinite(m[s]["d_loss"]) for s in m) and m[30]["nonfinite_total"] == 0
    assert {"g_recon", "g_proj", "g_adv", "grad_norm/generator", "grad_norm/discriminator"} <= m[30].keys()
    assert (out / "checkpoints" / "step-30" / "ema" / "generator.safetensors").is_file()
    assert list((out / "tb").iterdir())  # validation wrote its scalars and preview there


def test_validate_reports_psnr_and_a_preview(store, tmp_path, in_process):
    from launch.engine import StepContext, Trainer

    _, task = load_task("x2ct-gan")
    cfg = build_run_config(task, "cpu-demo", [*TINY, *RUN])
    spec = VolumeSpec((32, 32, 32), (11.25, 11.25, 11.25), WINDOW)
    trainer = Trainer(task, cfg, task_ref="x2ct-gan", preset="cpu-demo", store=str(store), output_dir=tmp_path, data_spec=spec)
    with torch.no_grad():
        result = task.validate(trainer.unwrapped, 0, StepContext(trainer))
    assert set(result) == {"psnr_hu_window", "preview"} and 0 < float(result["psnr_hu_window"]) < 60
    img = result["preview"]
    assert img.dim() == 2 and img.shape[0] > 100 and 0 <= float(img.min()) and float(img.max()) <= 1


def test_resume_is_bit_identical_x_recon(store, tmp_path, in_process):
    """X-Recon: random projection poses from ctx.generator, dropout in connection A, a worker
    process, an epoch boundary (4 train cases) after the resume point."""
    sets = ("train.ckpt_every=3", "train.num_workers=1", "model.fc_dropout=0.5")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train("x-recon", store, straight, 6, *sets)
    shutil.copytree(straight / "checkpoints" / "step-3", resumed / "checkpoints" / "step-3")
    train("x-recon", store, resumed, 6, *sets, resume="latest")
    a, b = straight / "checkpoints" / "step-6", resumed / "checkpoints" / "step-6"
    for f in ("models/generator", "models/discriminator", "ema/generator", "optim/generator", "optim/discriminator"):
        ta, tb = load_file(a / f"{f}.safetensors"), load_file(b / f"{f}.safetensors")
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), f
    ma, mb = metrics(straight), metrics(resumed)
    assert sorted(mb) == [4, 5, 6] and all(ma[s]["g_loss"] == mb[s]["g_loss"] for s in mb)
    assert ma[6]["epoch"] == 1  # crossed an epoch boundary after the resume point


@pytest.mark.distributed
def test_two_process_ddp_run_writes_a_checkpoint(store, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch/accelerate/cpu_ddp.yaml"),
           "--num_processes", "2", "--main_process_port", str(free_port()), "-m", "launch.train", "x2ct-gan",
           "--store", str(store), "--preset", "cpu-demo", "--output-dir", str(out), "--max-steps", "3",
           "--set", *TINY, *RUN, "train.batch_size=1", "train.num_workers=1"]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = out / "checkpoints" / "step-3"
    meta = (ckpt / "meta.json").read_text()
    assert '"world_size": 2' in meta and (ckpt / "rank-1.safetensors").is_file()
    assert (ckpt / "models" / "generator.safetensors").is_file() and sorted(metrics(out)) == [1, 2, 3]
    # 4 train cases over 2 ranks: 2 per epoch each; step 3 started epoch 1
    assert metrics(out)[3]["epoch"] == 1
