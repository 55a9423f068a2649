"""S-XR2CT: shapes and frames, the likelihood image against a hand computation, the template CT
(initialised from the mean training volume, saved, restored), the perceptual term, overfitting
one case, training on the engine (exact resume, 2 processes), sampling from a PNG, the
evaluation beside single-view X2CT-GAN, and bad input (one line, exit 2, nothing written).
Tiny models (32² X-ray → 16³) on the 6-case store of 32³ phantoms of test_tasks."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from gan_baselines import s_xr2ct
from gan_baselines.common import num_params, to_model_range
from gan_baselines.data import load_sample, mean_volume
from gan_baselines.sampling import load_generator
from gan_baselines.x2ct_gan import patch_size
from launch.presets import data_spec
from patching.data.store import Store
from patching.errors import InputError
from stage1_vqgan.losses import SliceFeatureNet
from tests.launch.toy_task import REPO, child_env, free_port, metrics

from .test_tasks import RUN, TINY, WINDOW

# 32² X-ray → 16³: ConvNeXt stages at 8² and 4², 3D levels 16, 8, 4; Swin windows of 4 at 8³
TINY_SX = ("model.xray_size=32", "model.volume_size=16", "model.convnext_dims=8,16", "model.convnext_depths=1,1",
           "model.encoder_channels=4,8,8", "model.attention_head_dim=4", "model.d_channels=4")


def tiny_cfg(**loss) -> s_xr2ct.SXR2CTConfig:
    model = s_xr2ct.SXR2CTModelConfig(xray_size=32, volume_size=16, convnext_dims=(8, 16), convnext_depths=(1, 1),
                                      encoder_channels=(4, 8, 8), attention_head_dim=4, d_channels=4)
    return s_xr2ct.SXR2CTConfig(model=model, loss=s_xr2ct.SXR2CTLossConfig(**{"perceptual_weight": 0.0, **loss}))


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    """A tiny random 2D slice feature network for the perceptual loss."""
    path = tmp_path_factory.mktemp("features") / "features.safetensors"
    torch.manual_seed(0)
    save_file(SliceFeatureNet(channels=(4, 8), convs_per_stage=1).state_dict(), str(path))
    return path


def train(store: Path, out: Path, steps: int, *sets: str, resume: str | None = None, task: str = "s-xr2ct") -> int:
    from launch.train import main

    args = [task, "--store", str(store), "--preset", "cpu-demo", "--output-dir", str(out), "--max-steps", str(steps)]
    args += ["--resume", resume] if resume else []
    return main([*args, "--set", *(TINY_SX if task == "s-xr2ct" else TINY), *RUN, *sets])


# --- networks ------------------------------------------------------------------------------------


def test_shapes_frames_and_parameter_counts():
    cfg = s_xr2ct.cpu_demo()
    G, D = s_xr2ct.build(cfg.model)
    x = torch.rand(2, 1, 64, 64)
    fake = G(x)
    assert fake.shape == (2, 1, 32, 32, 32) and fake.min() >= 0  # ReLU output, [0, 1] model range
    cond = s_xr2ct.condition({"pa": x}, cfg.model)
    assert cond.shape == (2, 1, 32, 32, 32)
    assert D(fake, cond).shape == (2, 1, *(patch_size(32, 2),) * 3)
    lifted = G.mapping(x)
    assert [tuple(t.shape) for t in lifted] == [(2, c, s, s, s) for c, s in zip((8, 16, 32, 32), (32, 16, 8, 4))]
    for t in lifted:  # repeated along the PA beam (y): constant in y
        assert torch.equal(t, t[:, :, :, :1].expand_as(t))
    assert cfg.model.level_sides == (32, 16, 8, 4) and cfg.model.stage_sides == (16, 8, 4)
    with torch.device("meta"):
        gp, dp = s_xr2ct.build(s_xr2ct.paper().model)
    counts = {"paper": (num_params(gp), num_params(dp)), "cpu_demo": (num_params(G), num_params(D))}
    print(f"S-XR2CT parameters (generator, discriminator): {counts}")
    assert counts == {"paper": (57_181_345, 11_051_073), "cpu_demo": (514_901, 44_041)}
    # timm's convnext_tiny: 28,589,128 parameters; less its head (norm 1,536 + fc 769,000) and two of
    # the RGB stem's three input channels (2·96·4·4): the same stages for a 1-channel X-ray
    assert num_params(gp.mapping.convnext) == 28_589_128 - 770_536 - 2 * 96 * 16


def test_likelihood_image_by_hand():
    x = torch.tensor([[0.0, 0.0], [0.0, 1.0]])[None, None]
    # μ = 1/4, σ² = (3·(1/4)² + (3/4)²) / 4 = 3/16; L = ½·ln(2π·3/16) + (x − μ)² / (2·3/16)
    base = 0.5 * math.log(2 * math.pi * 3 / 16)
    want = torch.tensor([[base + (1 / 16) / (3 / 8)] * 2, [base + (1 / 16) / (3 / 8), base + (9 / 16) / (3 / 8)]])
    got = s_xr2ct.likelihood_image(x)
    assert got.shape == (1, 1, 2, 2) and torch.allclose(got[0, 0], want, atol=1e-6)
    assert got[0, 0, 1, 1] == pytest.approx(0.0819503 + 1.5, abs=1e-6)  # ½·ln(1.1780972) + 1.5
    # per image: a second image of the batch does not change the first one's statistics
    batch = s_xr2ct.likelihood_image(torch.cat([x, torch.rand(1, 1, 2, 2)]))
    assert torch.allclose(batch[0], got[0])
    flat = s_xr2ct.likelihood_image(torch.full((1, 1, 4, 4), 0.3), eps=1e-6)  # σ = 0: the floor
    assert torch.allclose(flat, torch.full_like(flat, 0.5 * math.log(2 * math.pi * 1e-6)))


def test_template_parameter_and_bad_inputs():
    G = s_xr2ct.SXR2CTGenerator(tiny_cfg().model)
    assert isinstance(G.template, torch.nn.Parameter) and G.template.shape == (1, 1, 16, 16, 16)
    assert "template" in G.state_dict()
    vol = torch.rand(16, 16, 16)
    G.set_template(vol)
    assert torch.equal(G.template[0, 0], vol)
    frozen = s_xr2ct.SXR2CTGenerator(tiny_cfg().model.__class__(**{**vars(tiny_cfg().model), "template_trainable": False}))
    assert not frozen.template.requires_grad and "template" in frozen.state_dict()
    with pytest.raises(InputError, match="template"):
        G.set_template(torch.rand(8, 8, 8))
    with pytest.raises(InputError, match="non-finite"):
        G.set_template(torch.full((16, 16, 16), float("nan")))
    with pytest.raises(InputError, match="lateral"):
        G(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32))
    with pytest.raises(InputError, match="pa"):
        G(torch.rand(1, 1, 16, 16))
    for bad, key in (({"views": ("pa", "lateral")}, "model.views"), ({"convnext_dims": (8, 16, 32)}, "model.convnext"),
                     ({"xray_size": 24}, "model.xray_size"), ({"encoder_channels": (4,)}, "model.encoder_channels")):
        with pytest.raises(InputError, match=key):
            s_xr2ct.SXR2CTModelConfig(**{**vars(tiny_cfg().model), **bad})
    with pytest.raises(InputError, match="loss.perceptual_weights"):
        s_xr2ct.build_perceptual(s_xr2ct.SXR2CTLossConfig())  # λ3 = 1 and no feature file


def test_generator_losses_add_the_perceptual_term(features):
    cfg = tiny_cfg(perceptual_weight=1.0, perceptual_weights=str(features), perceptual_slices=3)
    G, D = s_xr2ct.build(cfg.model)
    perc = s_xr2ct.build_perceptual(cfg.loss)
    x, target = torch.rand(1, 1, 32, 32), torch.rand(1, 1, 16, 16, 16)
    same = s_xr2ct.generator_losses(target.clone(), target, {"pa": x}, D, cfg, perceptual=perc)
    assert float(same["perc"]) == 0 and float(same["recon"]) == 0 and float(same["proj"]) == 0
    fake = G(x)
    g = s_xr2ct.generator_losses(fake, target, {"pa": x}, D, cfg, perceptual=perc, generator=torch.Generator().manual_seed(0))
    assert float(g["perc"].detach()) > 0
    w = cfg.loss
    want = w.recon_weight * g["recon"] + w.proj_weight * g["proj"] + w.adv_weight * g["adv"] + g["perc"]
    assert torch.allclose(g["total"], want)
    g["perc"].backward()
    assert G.head[0].weight.grad.abs().sum() > 0 and all(p.grad is None for p in D.parameters())


def test_overfits_one_case(store):
    """The generator alone (MSE + projection, Adam 3e-3) memorises one phantom: its error falls
    to under 5 % of the first step's and to half the template's (the mean training volume)."""
    torch.manual_seed(0)
    cfg = tiny_cfg(adv_weight=0.0)
    G, D = s_xr2ct.build(cfg.model)
    st = Store(store)
    G.set_template(to_model_range(mean_volume(st, "train", 16, WINDOW, progress=False), (0, 1)))
    s = load_sample(st.case(st.case_ids("train")[0]), volume_size=16, xray_size=32, views=("pa",), hu_window=WINDOW)
    x, target = s["pa"][None], to_model_range(s["ct"][None], (0, 1))
    template_mse = float(F.mse_loss(G.template, target))
    opt = torch.optim.Adam(G.parameters(), lr=3e-3)
    first = None
    for _ in range(160):
        g = s_xr2ct.generator_losses(G(x), target, {"pa": x}, D, cfg)
        first = float(g["recon"]) if first is None else first
        opt.zero_grad()
        g["total"].backward()
        opt.step()
    last = float(F.mse_loss(G(x), target))
    print(f"one case: MSE {first:.4f} -> {last:.5f} (template {template_mse:.4f})")
    assert last < 0.05 * first and last < 0.5 * template_mse


# --- training on the engine ----------------------------------------------------------------------


def test_presets_and_train_defaults():
    from launch.tasks import load_task
    from launch.train import build_run_config

    _, task = load_task("s-xr2ct")
    demo = build_run_config(task, "cpu-demo", [])
    assert (demo.model.xray_size, demo.model.volume_size) == (64, 32) and demo.train.lr == 2e-4
    assert demo.loss.perceptual_weight == 1.0 and demo.train.ema_decay == 0.99
    paper = build_run_config(task, "s-xr2ct-128", [])
    assert (paper.model.xray_size, paper.model.volume_size) == (128, 128) and paper.train.grad_accum == 1
    assert (paper.loss.adv_weight, paper.loss.recon_weight, paper.loss.proj_weight) == (0.1, 10.0, 10.0)
    spec = data_spec("s-xr2ct-128")
    assert spec.shape == (320, 320, 320) and spec.spacing_mm == (1.0, 1.0, 1.0)
    with pytest.raises(InputError, match="unknown preset"):
        task.default_config("ctpa-512")


def test_training_sets_and_saves_the_template(store, tmp_path, features, in_process):
    st = Store(store)
    mean = to_model_range(mean_volume(st, "train", 16, WINDOW, progress=False), (0.0, 1.0))
    fixed, learned = tmp_path / "fixed", tmp_path / "learned"
    assert train(store, fixed, 2, "model.template_trainable=false", f"loss.perceptual_weights={features}") == 0
    assert train(store, learned, 2, f"loss.perceptual_weights={features}") == 0
    ckpt = fixed / "checkpoints" / "step-2"
    for f in ("models/generator", "ema/generator"):
        assert torch.equal(load_file(ckpt / f"{f}.safetensors")["template"][0, 0], mean), f
    assert torch.equal(load_generator(fixed).generator.template[0, 0], mean)
    raw = load_file(learned / "checkpoints" / "step-2" / "models" / "generator.safetensors")["template"]
    ema = load_file(learned / "checkpoints" / "step-2" / "ema" / "generator.safetensors")["template"]
    assert not torch.equal(raw[0, 0], mean) and (raw[0, 0] - mean).abs().max() < 0.05  # trained, from the mean
    loaded = load_generator(learned)
    assert loaded.weights == "ema" and torch.equal(loaded.generator.template, ema)
    m = metrics(learned)
    assert {"g_recon", "g_proj", "g_adv", "g_perc", "d_loss"} <= m[2].keys() and m[2]["g_perc"] > 0


def test_resume_is_bit_identical(store, tmp_path, features, in_process):
    """Perceptual slices from ctx.generator, a DataLoader worker, an epoch boundary after the resume."""
    sets = ("train.ckpt_every=3", "train.num_workers=1", f"loss.perceptual_weights={features}")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train(store, straight, 6, *sets) == 0
    shutil.copytree(straight / "checkpoints" / "step-3", resumed / "checkpoints" / "step-3")
    assert train(store, resumed, 6, *sets, resume="latest") == 0
    a, b = straight / "checkpoints" / "step-6", resumed / "checkpoints" / "step-6"
    for f in ("models/generator", "models/discriminator", "ema/generator", "optim/generator", "optim/discriminator"):
        ta, tb = load_file(a / f"{f}.safetensors"), load_file(b / f"{f}.safetensors")
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), f
    ma, mb = metrics(straight), metrics(resumed)
    assert sorted(mb) == [4, 5, 6] and all(ma[s]["g_loss"] == mb[s]["g_loss"] and ma[s]["g_perc"] == mb[s]["g_perc"]
                                           for s in mb)
    assert ma[6]["epoch"] == 1


@pytest.mark.distributed
def test_two_process_accelerate_run(store, tmp_path, features):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch/accelerate/cpu_ddp.yaml"),
           "--num_processes", "2", "--main_process_port", str(free_port()), "-m", "launch.train", "s-xr2ct",
           "--store", str(store), "--preset", "cpu-demo", "--output-dir", str(out), "--max-steps", "3",
           "--set", *TINY_SX, *RUN, "train.num_workers=1", f"loss.perceptual_weights={features}"]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = out / "checkpoints" / "step-3"
    assert '"world_size": 2' in (ckpt / "meta.json").read_text() and (ckpt / "rank-1.safetensors").is_file()
    assert sorted(metrics(out)) == [1, 2, 3] and metrics(out)[3]["epoch"] == 1 and metrics(out)[3]["g_perc"] > 0
    assert "template" in load_file(ckpt / "models" / "generator.safetensors")


# --- sampling, evaluation, bad input ------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(store, features, tmp_path_factory) -> dict:
    """A 2-step S-XR2CT run, a 2-step single-view X2CT-GAN run and a test case's PA as a PNG."""
    from accelerate.state import AcceleratorState, GradientState

    root = tmp_path_factory.mktemp("sxr2ct")
    try:
        assert train(store, root / "sxr2ct", 2, f"loss.perceptual_weights={features}") == 0
        assert train(store, root / "x2ct-pa", 2, "model.views=pa", task="x2ct-gan") == 0
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    st = Store(store)
    pa = root / "pa.png"
    Image.fromarray((st.case(st.case_ids("test")[0]).xray("pa") * 255).round().astype(np.uint8)).save(pa)
    return {"root": root, "sxr2ct": root / "sxr2ct", "x2ct_pa": root / "x2ct-pa", "pa": pa}


def cli(argv, capsys) -> tuple[int, str]:
    from launch.cli import main

    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def test_sample_cli_from_a_png(store, runs, capsys):
    out = runs["root"] / "sampled"
    rc, err = cli(["sample", "--checkpoint", runs["sxr2ct"], "--pa", runs["pa"], "--out", out], capsys)
    assert rc == 0, err
    img = nib.load(out / "volume.nii.gz")
    spec = data_spec("cpu-demo")  # its HU window; the grid is the training cases' (the checkpoint's)
    opened = Store(store)
    shape, spacing_mm = opened.common_grid(opened.case_ids("train"))
    assert img.shape == tuple(shape) == (32, 32, 32) and img.get_data_dtype() == np.int16
    assert np.allclose(img.header.get_zooms(), spacing_mm)
    vol = np.asarray(img.dataobj)
    assert spec.hu_window[0] <= vol.min() and vol.max() <= spec.hu_window[1] and vol.std() > 0
    assert (out / "volume.zarr").is_dir() and (out / "preview.png").is_file()


@pytest.mark.parametrize("extra, match", [
    (["--lateral", "PA"], "single-view (pa); it takes no lateral"),
    (["--pa", "MISSING.png"], "MISSING.png"),
])
def test_sample_cli_bad_input(runs, capsys, extra, match):
    out = runs["root"] / "never"
    argv = ["sample", "--checkpoint", runs["sxr2ct"], "--out", out]
    argv += ["--pa", runs["pa"], "--lateral", runs["pa"]] if extra[0] == "--lateral" else extra
    rc, err = cli(argv, capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], err
    assert not out.exists()


def test_train_bad_input_is_one_line_and_writes_nothing(store, tmp_path, capsys, in_process):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not safetensors")
    cases = [([], "loss.perceptual_weights"), ([f"loss.perceptual_weights={corrupt}"], str(corrupt)),
             ([f"loss.perceptual_weights={tmp_path / 'none.safetensors'}"], "not found"),
             (["loss.perceptual_weight=0", "model.views=pa,lateral"], "model.views"),
             (["loss.perceptual_weight=0", "model.convnext_dims=8,16,32"], "model.convnext_depths")]
    for i, (sets, match) in enumerate(cases):
        out = tmp_path / f"run{i}"
        rc = train(store, out, 1, *sets)
        lines = capsys.readouterr().err.strip().splitlines()
        errors = [ln for ln in lines if ln.startswith("error:")]
        assert rc == 2 and len(errors) == 1 and match in errors[0], (sets, lines)
        assert not out.exists(), sets


def test_evaluate_scores_it_beside_single_view_x2ct_gan(runs, store):
    from launch.evaluate import evaluate

    out = runs["root"] / "evaluation"
    res = evaluate(store, {"s-xr2ct": runs["sxr2ct"], "x2ct-gan-pa": runs["x2ct_pa"]}, out, split="test",
                   device="cpu", figure_cases=0, progress=False)
    assert not res["failures"] and res["rows"] == ["s-xr2ct", "x2ct-gan-pa", "mean-train-volume"]
    by = {s["method"]: s for s in res["summary"]}
    assert by["s-xr2ct"]["kind"] == "s-xr2ct" and by["s-xr2ct"]["views"] == by["x2ct-gan-pa"]["views"] == "pa"
    md = (out / "summary.md").read_text()
    assert "| s-xr2ct | s-xr2ct | PA only (single view) | 1 |" in md
    assert "| x2ct-gan-pa | x2ct-gan | PA only (single view) | 1 |" in md
    assert "| mean-train-volume | baseline | — | 1 |" in md
    assert res["methods"]["s-xr2ct"]["views"] == ["pa"] and res["methods"]["s-xr2ct"]["output_grid"] == [16, 16, 16]
