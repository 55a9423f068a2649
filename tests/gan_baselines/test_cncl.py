"""CNCL: shapes, the fusion, the slice dataset's position contract, training, bit-identical resume,
a 2-process run (marked ``distributed``), and the ``denoise`` / ``data lowdose`` command lines with
their bad inputs. Tiny models (4-channel U-Nets of 2 levels, 16² crops) on 6 phantoms of 32³."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from gan_baselines.cncl import CNCLModelConfig, build
from gan_baselines.cncl.data import LowDoseSliceDataset, sample_rng
from gan_baselines.cncl.denoise import denoise_hu, load_denoiser
from launch.cli import main as cli
from launch.tasks import load_task
from launch.train import build_run_config
from patching.data.spec import hu_to_unit
from patching.data.store import Store
from patching.data.synth_store import synthesize
from patching.errors import InputError
from patching.projection.lowdose import LowDoseScanner
from tests.launch.toy_task import REPO, assert_same_checkpoint, child_env, free_port, metrics

WINDOW = (-1024.0, 1600.0)
TINY = ("model.base_channels=4", "model.num_levels=2", "model.d_channels=4", "data.patch=16")
RUN = ("train.log_every=1", "train.num_workers=0", "train.val_every=0", "train.keep_last=10", "train.batch_size=2")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """6 phantoms of 32³ (11.25 mm voxels): 4 train, 1 val, 1 test."""
    path = tmp_path_factory.mktemp("cncl") / "store.zarr"
    synthesize(Store(path, create=True), 6, (32, 32, 32), views=("pa",), xray_size=32, workers=1, progress=False)
    return path


@pytest.fixture
def in_process():
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def train(store: Path, out: Path, steps: int, *sets: str, resume: str | None = None) -> None:
    from launch.train import main

    args = ["cncl", "--store", str(store), "--preset", "cpu-demo", "--output-dir", str(out), "--max-steps", str(steps)]
    args += ["--resume", resume] if resume else []
    assert main([*args, "--set", *TINY, *RUN, *sets]) == 0


# --- networks ------------------------------------------------------------------------------------


def test_shapes_and_the_fusion():
    cfg = CNCLModelConfig(base_channels=4, num_levels=2, d_channels=4, num_d_layers=2)
    G, D = build(cfg)
    x = torch.randn(3, 1, 24, 16)
    content, noise, fused = G.branches(x)
    assert content.shape == noise.shape == fused.shape == (3, 1, 24, 16) and torch.equal(G(x), fused)
    # the two predictors share one architecture, not their weights
    assert [p.shape for p in G.content.parameters()] == [p.shape for p in G.noise.parameters()]
    assert not torch.equal(G.content.head.weight, G.noise.head.weight)
    with torch.no_grad():  # fusion = 1×1 conv over concat(content, x − noise)
        G.fusion.weight.copy_(torch.tensor([2.0, -3.0]).view(1, 2, 1, 1))
        G.fusion.bias.fill_(0.5)
        assert torch.allclose(G(x), 2.0 * content - 3.0 * (x - noise) + 0.5, atol=1e-5)
    assert D(x, fused).shape == (3, 1, 4, 2)  # 4×4 convs: s2, s2, s1, head s1: 24×16 → 12×8 → 6×4 → 5×3 → 4×2
    with pytest.raises(InputError, match="multiples of 4"):
        G(torch.randn(1, 1, 18, 16))


def test_presets():
    _, task = load_task("cncl")
    cfg = build_run_config(task, "cpu-demo", [])
    assert cfg.data.patch == 64 and cfg.data.dose == 0.25 and cfg.train.lr == 2e-4 and cfg.optim.betas == (0.5, 0.999)
    paper = build_run_config(task, "ctpa-512", [])
    assert paper.model.base_channels == 64 and paper.model.num_levels == 4 and paper.loss.l1_weight == 100
    with pytest.raises(InputError, match="data.patch"):
        build_run_config(task, "cpu-demo", ["data.patch=36"])
    with pytest.raises(InputError, match="data.dose"):
        build_run_config(task, "cpu-demo", ["data.dose=2"])


# --- data ----------------------------------------------------------------------------------------


def dataset(store: Path, **kw) -> LowDoseSliceDataset:
    args = dict(split="train", patch=16, dose=0.25, scanner=LowDoseScanner(), hu_window=WINDOW, seed=5)
    return LowDoseSliceDataset(store, **{**args, **kw})


def test_samples_are_seeded_slices_and_resume_at_the_next_one(store):
    ds = dataset(store)
    samples = list(ds)
    assert len(samples) == 4 * 32 and [s["position"] for s in samples] == list(range(128))
    s = samples[0]
    assert s["lowdose"].shape == s["image"].shape == (1, 16, 16)
    # the clean crop is a window-mapped crop of some axial slice of its case
    hu = hu_to_unit(torch.from_numpy(np.asarray(Store(store).case(s["case_id"]).ct[...], dtype=np.float32)), WINDOW)
    match = [(x, y, z) for z in range(32) for x in range(17) for y in range(17)
             if torch.allclose(hu[x:x + 16, y:y + 16, z], s["image"][0], atol=1e-6)]
    assert match
    assert 0.002 < float((s["lowdose"] - s["image"]).std()) < 0.2  # tens of HU of noise
    again = dataset(store)
    again.load_state_dict({**ds.state_dict(), "epoch": 0, "position": 100})
    resumed = list(again)
    assert [r["position"] for r in resumed] == list(range(100, 128))
    assert all(torch.equal(a["lowdose"], b["lowdose"]) and a["case_id"] == b["case_id"]
               for a, b in zip(resumed, samples[100:]))
    # two ranks split the stream; a sample depends on its position only
    r1 = list(dataset(store, rank=1, world_size=2))
    assert [r["position"] for r in r1] == list(range(1, 128, 2)) and torch.equal(r1[0]["lowdose"], samples[1]["lowdose"])
    assert sample_rng(5, 0, 3).random() != sample_rng(5, 1, 3).random()


# --- training ------------------------------------------------------------------------------------


def test_overfits_one_slice_pair(store):
    """GAN + L1 on one (low-dose, clean) pair: the generator learns to remove its noise."""
    from gan_baselines.cncl import CNCLConfig, CNCLDataConfig, discriminator_loss, generator_losses

    torch.manual_seed(0)
    cfg = CNCLConfig(model=CNCLModelConfig(base_channels=8, num_levels=2, d_channels=4, num_d_layers=2),
                     data=CNCLDataConfig(patch=32))
    G, D = build(cfg.model)
    s = next(iter(dataset(store, patch=32)))
    x, y = s["lowdose"][None], s["image"][None]
    opt_g, opt_d = (torch.optim.Adam(m.parameters(), lr=1e-3, betas=(0.5, 0.999)) for m in (G, D))
    start = float((x - y).abs().mean())
    for _ in range(100):
        fake = G(x)
        g = generator_losses(fake, y, x, D, cfg)
        opt_g.zero_grad()
        g["total"].backward()
        opt_g.step()
        opt_d.zero_grad()
        discriminator_loss(D, x, y, fake.detach()).backward()
        opt_d.step()
    with torch.no_grad():
        end = float((G(x) - y).abs().mean())
    print(f"L1 to the clean slice: input {start:.4f}, after 100 steps {end:.4f}")
    assert end < 0.5 * start


def test_engine_run_logs_losses_validation_and_checkpoints(store, tmp_path, in_process):
    out = tmp_path / "run"
    train(store, out, 6, "train.ckpt_every=6", "train.val_every=6")
    m = metrics(out)
    assert sorted(m) == list(range(1, 7)) and m[6]["nonfinite_total"] == 0
    assert {"g_l1", "g_adv", "d_loss", "grad_norm/generator", "grad_norm/discriminator"} <= m[6].keys()
    val = (out / "val_metrics.jsonl").read_text()
    assert "psnr_hu_window" in val and "psnr_lowdose_hu_window" in val
    assert (out / "checkpoints" / "step-6" / "ema" / "generator.safetensors").is_file()


def test_resume_is_bit_identical(store, tmp_path, in_process):
    sets = ("train.ckpt_every=3", "train.num_workers=1")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(store, straight, 6, *sets)
    shutil.copytree(straight / "checkpoints" / "step-3", resumed / "checkpoints" / "step-3")
    train(store, resumed, 6, *sets, resume="latest")
    assert_same_checkpoint(straight / "checkpoints" / "step-6", resumed / "checkpoints" / "step-6")
    ma, mb = metrics(straight), metrics(resumed)
    assert sorted(mb) == [4, 5, 6] and all(ma[s]["g_loss"] == mb[s]["g_loss"] for s in mb)


@pytest.mark.distributed
def test_two_process_accelerate_run(store, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch/accelerate/cpu_ddp.yaml"),
           "--num_processes", "2", "--main_process_port", str(free_port()), "-m", "launch.train", "cncl",
           "--store", str(store), "--preset", "cpu-demo", "--output-dir", str(out), "--max-steps", "3",
           "--set", *TINY, *RUN, "train.num_workers=1"]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = out / "checkpoints" / "step-3"
    meta = (ckpt / "meta.json").read_text()
    assert '"world_size": 2' in meta and (ckpt / "rank-1.safetensors").is_file()
    assert '"position": 12' in meta  # 3 steps × 2 ranks × batch 2 slices
    assert sorted(metrics(out)) == [1, 2, 3]


# --- command lines -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(store, tmp_path_factory) -> Path:
    from accelerate.state import AcceleratorState, GradientState

    out = tmp_path_factory.mktemp("cncl-ckpt") / "run"
    train(store, out, 2, "train.ckpt_every=2")
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return out


def write_ct(path: Path, shape=(37, 29, 5)) -> np.ndarray:
    """A non-tile-multiple CT in LPS orientation with an off-centre, anisotropic affine."""
    rng = np.random.default_rng(0)
    hu = np.full(shape, -1000, np.int16)
    hu[5:-5, 4:-4] = (40 + rng.normal(0, 5, (shape[0] - 10, shape[1] - 8, shape[2]))).astype(np.int16)
    affine = np.array([[-1.5, 0, 0, 30.0], [0, -1.5, 0, 12.0], [0, 0, 2.5, -40.0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(hu, affine), path)
    return affine


def test_denoise_cli_keeps_the_geometry_of_any_volume(checkpoint, tmp_path, capsys):
    src, out = tmp_path / "ct.nii.gz", tmp_path / "out" / "den.nii.gz"
    affine = write_ct(src)
    assert cli(["denoise", "--checkpoint", str(checkpoint), "--input", str(src), "--out", str(out)]) == 0
    img = nib.load(out)
    assert img.shape == (37, 29, 5) and np.allclose(img.affine, affine) and img.get_data_dtype() == np.int16
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    # the file is the sliding-window denoiser applied to the canonical volume, mapped back to LPS
    loaded = load_denoiser(checkpoint)
    from patching.data.ingest import load_nifti

    hu, _, _ = load_nifti(src)
    want = np.rint(denoise_hu(loaded, hu, WINDOW))[::-1, ::-1, :]
    assert np.array_equal(np.asarray(img.dataobj), want.astype(np.int16))
    # the same from an export, and `sample` points a CNCL checkpoint to `denoise`
    from launch.export import main as export

    assert export(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "export")]) == 0
    out3 = tmp_path / "den3.nii.gz"
    assert cli(["denoise", "--checkpoint", str(tmp_path / "export"), "--input", str(src), "--out", str(out3)]) == 0
    assert np.array_equal(np.asarray(nib.load(out3).dataobj), np.asarray(img.dataobj))
    capsys.readouterr()
    assert cli(["sample", "--checkpoint", str(checkpoint), "--pa", str(src), "--out", str(tmp_path / "s")]) == 2
    assert "xray2ct denoise" in capsys.readouterr().err
    # --dose simulates first: a different result
    out2 = tmp_path / "den2.nii"
    assert cli(["denoise", "--checkpoint", str(checkpoint), "--input", str(src), "--out", str(out2), "--dose", "0.25"]) == 0
    assert not np.array_equal(np.asarray(nib.load(out2).dataobj), np.asarray(img.dataobj))


def test_denoise_volumes_smaller_than_the_tile(checkpoint):
    loaded = load_denoiser(checkpoint)
    hu = np.random.default_rng(1).normal(40, 20, (9, 11, 2)).astype(np.float32)
    out = denoise_hu(loaded, hu, WINDOW)  # padded with air to the 16² tile, cropped back
    assert out.shape == hu.shape and out.dtype == np.float32 and np.isfinite(out).all()
    assert np.allclose(out[:, :, 1], denoise_hu(loaded, hu[:, :, 1:], WINDOW)[:, :, 0], atol=1e-3)  # slice by slice


def test_lowdose_cli(tmp_path, capsys):
    src = tmp_path / "ct.nii.gz"
    affine = write_ct(src)
    outs = {}
    for dose, seed in ((1.0, 0), (0.25, 0), (0.25, 0), (0.25, 1)):
        out = tmp_path / f"ld-{dose}-{seed}-{len(outs)}.nii.gz"
        assert cli(["data", "lowdose", "--input", str(src), "--out", str(out), "--dose", str(dose), "--seed", str(seed)]) == 0
        img = nib.load(out)
        assert img.shape == (37, 29, 5) and np.allclose(img.affine, affine)
        outs[len(outs)] = np.asarray(img.dataobj).astype(float) - np.asarray(nib.load(src).dataobj)
    assert np.array_equal(outs[1], outs[2]) and not np.array_equal(outs[1], outs[3])  # seeded
    assert outs[1].std() > 1.5 * outs[0].std()  # quarter dose is noisier (≈2× in a uniform region)
    more = tmp_path / "ld-photons.nii.gz"
    assert cli(["data", "lowdose", "--input", str(src), "--out", str(more), "--dose", "0.25", "--photons", "4e5"]) == 0
    diff = np.asarray(nib.load(more).dataobj).astype(float) - np.asarray(nib.load(src).dataobj)
    assert diff.std() < 0.8 * outs[1].std()  # 4× the photons at quarter dose: about the full-dose noise


def _bad(argv: list[str], capsys, match: str, out: Path) -> None:
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and match in err and "Traceback" not in err, err
    assert not out.exists() and not [p for p in out.parent.glob(".*tmp*")]


def test_bad_inputs_are_one_line_exit_2_and_write_nothing(checkpoint, store, tmp_path, capsys):
    src, out = tmp_path / "ct.nii.gz", tmp_path / "o.nii.gz"
    write_ct(src)
    corrupt = tmp_path / "bad.nii.gz"
    corrupt.write_bytes(b"\x1f\x8bnot a nifti")
    for argv, match in [
        (["data", "lowdose", "--input", str(tmp_path / "none.nii.gz"), "--out", str(out), "--dose", "0.25"], "none.nii.gz"),
        (["data", "lowdose", "--input", str(corrupt), "--out", str(out), "--dose", "0.25"], "bad.nii.gz"),
        (["data", "lowdose", "--input", str(src), "--out", str(out), "--dose", "0"], "--dose"),
        (["data", "lowdose", "--input", str(src), "--out", str(out), "--dose", "nan"], "--dose"),
        (["data", "lowdose", "--input", str(src), "--out", str(out), "--dose", "0.5", "--photons", "-3"], "--photons"),
        (["data", "lowdose", "--input", str(src), "--out", str(tmp_path / "o.png"), "--dose", "0.5"], ".nii"),
        (["denoise", "--checkpoint", str(checkpoint), "--input", str(corrupt), "--out", str(out)], "bad.nii.gz"),
        (["denoise", "--checkpoint", str(checkpoint), "--input", str(src), "--out", str(out), "--dose", "3"], "--dose"),
        (["denoise", "--checkpoint", str(tmp_path / "nowhere"), "--input", str(src), "--out", str(out)], "nowhere"),
        (["denoise", "--checkpoint", str(store), "--input", str(src), "--out", str(out)], "store.zarr"),
        (["denoise", "--checkpoint", str(checkpoint), "--input", str(src), "--out", str(tmp_path)], "directory"),
        (["denoise", "--checkpoint", str(checkpoint), "--input", str(src), "--out", str(out), "--device", "gpu"],
         "--device"),
    ]:
        _bad(argv, capsys, match, out)
    # a checkpoint of another task, and one whose config does not fit its weights
    other = tmp_path / "other"
    shutil.copytree(checkpoint, other)
    meta = next(other.glob("checkpoints/step-*/meta.json"))
    meta.write_text(meta.read_text().replace('"task": "cncl"', '"task": "vqgan"').replace("gan_baselines.cncl.task:CNCLTask", "x:y"))
    _bad(["denoise", "--checkpoint", str(other), "--input", str(src), "--out", str(out)], capsys, "not cncl", out)
    shutil.rmtree(other)
    shutil.copytree(checkpoint, other)
    cfg = next(other.glob("checkpoints/step-*/config.json"))
    cfg.write_text(cfg.read_text().replace('"base_channels": 4', '"base_channels": 6'))
    _bad(["denoise", "--checkpoint", str(other), "--input", str(src), "--out", str(out)], capsys, "do not match", out)
