"""The diffusion task on the engine: the latent dataset's position contract, validation, CLI
training on an encoded phantom store, and bit-exact resume (N + resume + N == 2N) in one process
and in two-process DDP, with and without validation in between."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from launch.presets import data_spec
from launch.train import build_run_config
from patching.data.store import Store
from patching.data.synth_store import synthesize
from patching.errors import InputError
from stage2_diffusion.data import LatentDataset, collate
from stage2_diffusion.task import DiffusionTask
from tests.launch.toy_task import REPO, assert_same_checkpoint, child_env, launch_cmd, metrics

N = 2  # steps before the resume; runs go to 2N
VQ_TINY = ("model.base_channels=8", "model.channel_mults=1,1,2", "model.attn_mid=false", "model.latent_dim=4",
           "model.codebook_size=32", "disc.channels=8", "disc.num_layers=2", "disc.start_step=2",
           "codec.tile=16,16,16", "codec.tile_latent=4,4,4", "data.num_val_tiles=2")
# 32³ phantoms → 8³ × 4 latents; 32² X-rays → 2 × 8² tokens of 16; UNet 8·(1, 2); 4³ training crops.
TINY = ("encoder.image_size=32", "encoder.channels=8,8,8", "encoder.token_grid=8", "encoder.token_dim=16",
        "encoder.norm_groups=4", "unet.latent_channels=4", "unet.base_channels=8", "unet.channel_mults=1,2",
        "unet.cross_attn_levels=1", "unet.num_head_channels=8", "unet.context_dim=16", "unet.norm_groups=4",
        "latent_shape=8,8,8", "sampler.steps=3", "data.crop=4,4,4")
RUN = ("train.batch_size=2", "train.num_workers=1", "train.keep_last=10", f"train.ckpt_every={N}", "train.log_every=1")


def run_ok(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def encoded_store(tmp_path_factory) -> tuple[Path, Path]:
    """(store, vqgan run): 6 phantoms 32³, a 2-step tiny VQ-GAN (checkpoints at steps 1 and 2), latents
    of its step-2 weights. Built once per pytest session (shared with test_pipeline.py)."""
    from stage1_vqgan.encode import encode_store

    root = tmp_path_factory.getbasetemp() / "diffusion-shared"
    store, vq, done = root / "store", root / "vq", root / "encoded.ok"
    if not done.exists():
        root.mkdir(exist_ok=True)
        synthesize(Store(store, create=True), 6, (32, 32, 32), xray_size=32, workers=1, progress=False)
        run_ok([sys.executable, "-m", "launch.train", "vqgan", "--store", str(store), "--preset", "cpu-demo",
                "--output-dir", str(vq), "--max-steps", "2", "--set", *VQ_TINY, "train.batch_size=2",
                "train.num_workers=0", "train.val_every=0", "train.ckpt_every=1", "train.keep_last=5"])
        encode_store(store, vq, progress=False)
        done.write_text("ok")
    return store, vq


def train_cmd(store: Path, out: Path, steps: int, resume: str | None = None, *, nproc: int = 1,
              sets: tuple[str, ...] = ()) -> list[str]:
    args = ["-m", "launch.train", "diffusion", "--store", str(store), "--preset", "cpu-demo",
            "--output-dir", str(out), "--max-steps", str(steps)]
    if resume:
        args += ["--resume", resume]
    args += ["--set", *TINY, *RUN, *sets]
    return launch_cmd(args, nproc)


def tb_values(out: Path) -> tuple[dict[str, dict[int, float]], dict[str, list[int]]]:
    """``({scalar tag: {step: value}}, {image tag: [steps]})`` from a run's TensorBoard files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, dict[int, float]] = {}
    images: dict[str, list[int]] = {}
    for f in sorted((out / "tb").glob("events.*")):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0, "images": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
        for tag in acc.Tags()["images"]:
            images.setdefault(tag, []).extend(e.step for e in acc.Images(tag))
    return scalars, images


def trained_run(tmp_path_factory) -> Path:
    """A 2N-step diffusion run (checkpoints at N and 2N), once per session."""
    store, _ = encoded_store(tmp_path_factory)
    out = tmp_path_factory.getbasetemp() / "diffusion-shared" / "run"
    if not (out / "checkpoints" / f"step-{2 * N}" / "meta.json").exists():
        run_ok(train_cmd(store, out, 2 * N))
    return out


# --- config and dataset ----------------------------------------------------------------------------


def test_presets_resolve_and_bad_crop_is_an_input_error():
    task = DiffusionTask()
    demo = build_run_config(task, "cpu-demo", [])
    assert demo.latent_shape is None and demo.data.crop is None and demo.train.lr == 3e-4  # None: from the store
    assert build_run_config(task, "cpu-demo", ["latent_shape=8,8,10"]).latent_shape == (8, 8, 10)
    big = build_run_config(task, "ctpa-512", ["data.crop=64,64,64"])
    assert big.data.crop == (64, 64, 64) and big.unet.gradient_checkpointing
    with pytest.raises(InputError, match="data.crop"):
        build_run_config(task, "cpu-demo", ["data.crop=5,4,4"])  # not a multiple of the UNet's ×4


def test_store_without_latents_says_run_encode(tmp_path):
    store = Store(tmp_path / "s", create=True)
    with pytest.raises(InputError, match="xray2ct encode"):
        LatentDataset(store, split="train", image_size=32, views=("pa", "lateral"))


def test_dataset_follows_the_position_contract(tmp_path_factory):
    store, _ = encoded_store(tmp_path_factory)
    kw = dict(split=None, image_size=32, views=("pa", "lateral"), crop=(4, 4, 4), seed=3, batch_size=2)
    one = list(LatentDataset(store, **kw))
    assert [s["position"] for s in one] == list(range(6))
    s0 = one[0]
    assert s0["latent"].shape == (4, 4, 4, 4) and s0["xray"].shape == (2, 32, 32) and s0["views_present"].all()
    assert s0["latent_shape"].tolist() == [8, 8, 8] and all(0 <= v <= 4 for v in s0["start"].tolist())
    # Scaled by the store's factor: the crop equals the raw latent's crop × scale.
    st = Store(store)
    raw = st.case(s0["case_id"]).latent[...]
    x, y, z = s0["start"].tolist()
    ref = torch.from_numpy(raw[:, x:x + 4, y:y + 4, z:z + 4]) * st.attrs["latent_scale_factor"]
    assert torch.equal(s0["latent"], ref)
    # Two ranks take p ≡ r (mod 2), the same samples (crops included) as one process.
    for r in range(2):
        part = list(LatentDataset(store, **kw, rank=r, world_size=2))
        assert [s["position"] for s in part] == list(range(r, 6, 2))
        for s in part:
            assert s["case_id"] == one[s["position"]]["case_id"] and torch.equal(s["latent"], one[s["position"]]["latent"])
    # Resume at position 4 on 2 ranks: 4 → rank 0, 5 → rank 1; set_epoch goes back to 0 with a new order.
    ds = LatentDataset(store, **kw, rank=1, world_size=2)
    ds.load_state_dict({"epoch": 0, "position": 4, "num_cases": 6})
    assert [s["position"] for s in ds] == [5]
    ds.set_epoch(1)
    assert len(list(ds)) == 3
    batch = collate(one[:2])
    assert batch["latent"].shape == (2, 4, 4, 4, 4) and batch["views_present"].dtype == torch.bool


# --- validation ------------------------------------------------------------------------------------


class FakeCtx:
    """The engine's StepContext as validate uses it; records EMA use and owns a training generator."""

    def __init__(self):
        self.device = torch.device("cpu")
        self.generator = torch.Generator().manual_seed(7)
        self.ema_entered = 0

    @contextlib.contextmanager
    def ema_weights(self):
        self.ema_entered += 1
        yield

    def autocast(self):
        return contextlib.nullcontext()


def validated(store: Path, sets: tuple[str, ...] = ()) -> tuple[DiffusionTask, dict, FakeCtx, dict]:
    task = DiffusionTask()
    cfg = build_run_config(task, "cpu-demo", [*TINY, "train.batch_size=3", *sets])
    models = task.build_models(cfg)
    task.build_dataset(cfg, store, data_spec("cpu-demo"), "train", 0, 1, 0)
    with torch.no_grad():  # untrained weights predict 0: perturb them, as training would
        for p in models["diffusion"].parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    models["diffusion"].eval()
    ctx = FakeCtx()
    with torch.no_grad():
        out = task.validate(models, 0, ctx)
    return task, models, ctx, out


def test_validate_is_deterministic_and_leaves_the_rngs_alone(tmp_path_factory, tmp_path):
    store, _ = encoded_store(tmp_path_factory)
    losses = []
    for sets in ((), ("data.crop=none", "data.val_sample_steps=2")):  # a centred 4³ crop; whole 8³ latents
        task, models, ctx, out = validated(store, sets)
        assert set(out) == {"val_loss", "val_latent_psnr", "preview"} and ctx.ema_entered == 1
        assert out["val_loss"].ndim == 0 and out["val_latent_psnr"].ndim == 0
        assert torch.isfinite(out["val_loss"]) and float(out["val_loss"]) > 0 and torch.isfinite(out["val_latent_psnr"])
        pre = out["preview"]
        assert pre.ndim == 2 and pre.shape[0] >= 64 and 0 <= float(pre.min()) and float(pre.max()) <= 1
        # Again: the same numbers; the training generator and the global RNG were never drawn from.
        rng = torch.get_rng_state()
        calls = []
        hook = models["diffusion"].unet.register_forward_pre_hook(
            lambda m, args, kw, calls=calls: calls.append((tuple(args[0].shape), kw["coords"])), with_kwargs=True)
        with torch.no_grad():
            again = task.validate(models, 1, ctx)
        hook.remove()
        assert all(torch.equal(out[k], again[k]) for k in out)
        assert torch.equal(ctx.generator.get_state(), torch.Generator().manual_seed(7).get_state())
        assert torch.equal(torch.get_rng_state(), rng)
        # The loss sees the 8 timesteps in chunks of train.batch_size (3) with the centred crop's
        # coordinates; the sample denoises the whole latent (2 CFG halves per step; one at
        # guidance 1, the cpu-demo default, where the unconditional half is not needed).
        crop = sets == ()
        loss_calls = [((3, 4, 4, 4, 4), ((2, 2, 2), (8, 8, 8)))] * 2 + [((2, 4, 4, 4, 4), ((2, 2, 2), (8, 8, 8)))]
        if not crop:
            loss_calls = [((b, 4, 8, 8, 8), ((0, 0, 0), (8, 8, 8))) for b in (3, 3, 2)]
        assert calls[:3] == loss_calls
        halves = 1 if task.cfg.diffusion.guidance_scale == 1 else 2
        assert calls[3:] == [((halves, 4, 8, 8, 8), ((0, 0, 0), (8, 8, 8)))] * (3 if crop else 2)
        losses.append(float(out["val_loss"]))
    assert losses[0] != losses[1]  # the whole latents' loss is another number than the centred crops'


def test_validate_without_encoded_val_cases_returns_nothing(tmp_path_factory, tmp_path):
    store, _ = encoded_store(tmp_path_factory)
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    for cid in Store(copy).case_ids("val"):
        shutil.rmtree(copy / "cases" / cid / "latent")
    assert validated(copy)[3] == {}
    with pytest.raises(InputError, match="data.num_val_cases"):
        build_run_config(DiffusionTask(), "cpu-demo", ["data.num_val_cases=0"])
    with pytest.raises(InputError, match="data.val_split"):
        build_run_config(DiffusionTask(), "cpu-demo", ["data.val_split=dev"])


# --- training --------------------------------------------------------------------------------------


def test_cli_trains_and_resume_is_bit_identical(tmp_path_factory, tmp_path):
    straight = trained_run(tmp_path_factory)
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 2 * N + 1))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    ck = straight / "checkpoints" / f"step-{2 * N}"
    assert (ck / "ema" / "diffusion.safetensors").is_file()
    extra = json.loads((ck / "extra.json").read_text())["state"]
    store_attrs = Store(tmp_path_factory.getbasetemp() / "diffusion-shared" / "store").attrs
    assert extra["latent_scale_factor"] == store_attrs["latent_scale_factor"]
    assert extra["vqgan"]["weights_sha256"] == store_attrs["latent_vqgan"]["weights_sha256"]
    assert extra["vqgan"]["source"] == store_attrs["latent_vqgan"]["source"]
    assert extra["volume"] == {"shape": [32, 32, 32], "spacing_mm": [11.25] * 3, "hu_window": [-1024.0, 1600.0]}  # the data

    # The resumed run validates after every step, the straight one never: the same weights, EMA
    # and optimizer state prove that validation leaves training's RNG, weights and data alone.
    store, _ = encoded_store(tmp_path_factory)
    resumed = tmp_path / "resumed"
    run_ok(train_cmd(store, resumed, N, sets=("train.val_every=1",)))
    run_ok(train_cmd(store, resumed, 2 * N, resume="latest", sets=("train.val_every=1",)))
    assert_same_checkpoint(ck, resumed / "checkpoints" / f"step-{2 * N}")
    again = metrics(resumed)
    for r in records:
        assert again[r["step"]]["loss"] == r["loss"], r["step"]
    scalars, images = tb_values(resumed)
    steps = list(range(1, 2 * N + 1))
    for tag in ("val/val_loss", "val/val_latent_psnr"):
        assert sorted(scalars[tag]) == steps and all(torch.isfinite(torch.tensor(v)) for v in scalars[tag].values())
    assert sorted(images["val/preview"]) == steps
    assert len(set(scalars["val/val_loss"].values())) == 2 * N  # the EMA weights change every step
    # the same scalars, as JSON lines for scripts
    val = [json.loads(line) for line in (resumed / "val_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in val] == steps
    assert all(r["val/val_loss"] == pytest.approx(scalars["val/val_loss"][r["step"]]) for r in val)


@pytest.mark.distributed
def test_two_process_ddp_resume_is_bit_identical(tmp_path_factory, tmp_path):
    """2 ranks (gloo): 2N steps validating after each, vs N + resume + N without validation."""
    store, _ = encoded_store(tmp_path_factory)
    ref = tmp_path / "ddp"
    run_ok(train_cmd(store, ref, 2 * N, nproc=2, sets=("train.val_every=1",)))
    out = tmp_path / "ddp-resumed"
    shutil.copytree(ref / "checkpoints" / f"step-{N}", out / "checkpoints" / f"step-{N}")
    run_ok(train_cmd(store, out, 2 * N, "latest", nproc=2))
    assert_same_checkpoint(ref / "checkpoints" / f"step-{2 * N}", out / "checkpoints" / f"step-{2 * N}")
    a, b = metrics(ref), metrics(out)
    assert sorted(b) == list(range(N + 1, 2 * N + 1))
    assert all(a[s]["loss"] == b[s]["loss"] and a[s]["cfg_drop_frac"] == b[s]["cfg_drop_frac"] for s in b)
    meta = json.loads((out / "checkpoints" / f"step-{2 * N}" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["position"] > 0
    # train → sample: the 2-process run's checkpoint samples like any other, the same for both runs
    from stage2_diffusion.pipeline import DiffusionReconstructor

    case = Store(store).case(Store(store).case_ids("test")[0])
    xrays = {v: case.xray(v) for v in case.views()}
    vols = [DiffusionReconstructor(run, steps=2).reconstruct(xrays, seed=3) for run in (ref, out)]
    assert vols[0].shape == (1, 32, 32, 32) and vols[0].dtype == np.int16 and np.array_equal(*vols)
    scalars, _ = tb_values(ref)
    assert sorted(scalars["val/val_loss"]) == list(range(1, 2 * N + 1))
