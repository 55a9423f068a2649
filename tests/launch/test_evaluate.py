"""``xray2ct evaluate``: metric values equal direct calls of patching.metrics.scores, the mean baseline is
numpy's mean of the clipped train CTs, CSV/Markdown/JSON agree, figures have one row per method
plus the ground truth, failing methods are reported and the others still written, bad flags
write nothing, outputs are atomic, and two processes give the one-process results (marked
``distributed``). Diffusion through DiffusionReconstructor on the shared stage-2 fixture.

A store of 12 phantoms 32³ (6 train, 3 val, 3 test; seed-1 cases carry emboli), a 2-step tiny
X2CT-GAN (32² X-rays → 16³, resampled to 32³)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from gan_baselines.sampling import load_generator, reconstruct_hu
from launch.cli import main as cli_main
from launch.evaluate import evaluate
from launch.evaluate_methods import case_seed, mean_from_sum, train_sum
from launch.evaluate_report import METRIC_KEYS
from patching.data.preview import triplanar_image
from patching.data.spec import VolumeSpec
from patching.data.store import Store
from patching.data.synth_store import synthesize
from patching.errors import InputError
from patching.metrics import scores as M
from patching.projection.drr import DRRGeometry
from tests.gan_baselines.test_tasks import RUN, TINY
from tests.launch.toy_task import REPO, child_env, free_port

WINDOW = (-1024.0, 1600.0)
R = WINDOW[1] - WINDOW[0]


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """Store, a tiny X2CT-GAN run, a corrupt copy of its checkpoint and tiny LPIPS weights."""
    from launch.train import main as train_main

    root = tmp_path_factory.mktemp("evaluate")
    store = root / "store.zarr"
    st = Store(store, create=True)
    for seed, emboli in ((0, 0.0), (1, 1.0), (2, 0.0)):  # 4 cases each: 2 train, 1 val, 1 test
        synthesize(st, 4, (32, 32, 32), seed=seed, emboli=emboli, xray_size=32, workers=1, progress=False)
    try:
        assert train_main(["x2ct-gan", "--store", str(store), "--preset", "cpu-demo", "--output-dir", str(root / "gan"),
                           "--max-steps", "2", "--set", *TINY, *RUN]) == 0
    finally:
        reset_accelerate()
    corrupt = root / "corrupt"
    shutil.copytree(root / "gan" / "checkpoints" / "step-2", corrupt)
    (corrupt / "ema" / "generator.safetensors").write_bytes(b"\x00garbage" * 10)
    g = torch.Generator().manual_seed(0)
    lpips = root / "features.safetensors"
    save_file({"stages.0.0.weight": torch.randn(4, 1, 3, 3, generator=g), "stages.0.0.bias": torch.zeros(4),
               "stages.1.0.weight": torch.randn(8, 4, 3, 3, generator=g)}, str(lpips))
    return {"root": root, "store": store, "gan": root / "gan", "corrupt": corrupt, "lpips": lpips}


def method_args(s: dict) -> list[str]:
    return ["--method", f"x2ct={s['gan']}", "--method", f"bad={s['root'] / 'missing'}",
            "--method", f"corrupt={s['corrupt']}", "--lpips-weights", str(s["lpips"]), "--figure-cases", "3"]


@pytest.fixture(scope="module")
def evaluated(setup) -> dict:
    """One CLI run (in process, one torch thread like the 2-process run's children)."""
    out, err = setup["root"] / "eval", io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stderr(err):
            rc = cli_main(["evaluate", "--store", str(setup["store"]), "--out", str(out), *method_args(setup)])
    finally:
        torch.set_num_threads(threads)
        reset_accelerate()
    return {"out": out, "rc": rc, "stderr": err.getvalue(),
            "results": json.loads((out / "results.json").read_text())}


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def num(text: str):
    return None if text == "" else float(text)


def clipped(case) -> np.ndarray:
    return np.clip(np.asarray(case.ct[...], dtype=np.float32), *WINDOW)


# --- scoring -----------------------------------------------------------------------------------


def test_metric_values_equal_direct_metric_calls(setup, evaluated):
    st = Store(setup["store"])
    rows = {(r["case_id"], r["method"]): r for r in read_csv(evaluated["out"] / "per_case.csv")}
    loaded = load_generator(setup["gan"])
    net = M.load_feature_net(setup["lpips"])
    train = [clipped(st.case(c)) for c in st.case_ids("train")]
    mean = np.mean(np.stack(train).astype(np.float64), axis=0).astype(np.float32)
    test_ids = st.case_ids("test")
    assert len(test_ids) == 3 and {c for c, _ in rows} == set(test_ids)
    embolus_cases = 0
    for cid in test_ids:
        case = st.case(cid)
        gt = np.asarray(case.ct[...])
        pred = reconstruct_hu(loaded, {v: case.xray(v) for v in ("pa", "lateral")},
                              VolumeSpec(case.shape, case.spacing_mm, WINDOW))
        for name, vol in (("x2ct", pred), ("mean-train-volume", mean)):
            row = rows[(cid, name)]
            p, t = np.clip(vol.astype(np.float32), *WINDOW), clipped(case)
            want = {"psnr": M.psnr(vol, gt, R, window=WINDOW), "psnr_x2ctgan": M.psnr_x2ctgan(vol, gt),
                    "ssim": M.ssim3d(vol, gt, R, window=WINDOW), "mae_hu": M.mae_hu(vol, gt, window=WINDOW),
                    "dice_lungs": M.dice_lungs(p, t), "dice_vessels": M.dice_vessels(p, t),
                    "lpips25d": M.lpips25d(p, t, net)}
            for view in ("pa", "lateral"):
                geometry = DRRGeometry(**case.xray_attrs(view)["geometry"])
                pc = M.projection_consistency(p, case.xray(view), case.spacing_mm, view, geometry)
                want[f"proj_psnr_{view}"], want[f"proj_ncc_{view}"] = pc["psnr"], pc["ncc"]
            emb = None
            if "embolus" in case.masks():
                mask = np.asarray(case.mask("embolus")[...])
                emb = M.embolus_contrast(p, mask, vessel=M.vessel_mask(t))
            want["embolus_contrast_hu"] = None if emb is None else emb["contrast_hu"]
            want["embolus_cnr"] = None if emb is None else emb["cnr"]
            for key, value in want.items():
                got = num(row[key])
                assert (got is None) == (value is None), (cid, name, key)
                if value is not None:
                    assert got == pytest.approx(value, rel=1e-9, abs=1e-12), (cid, name, key)
            assert row["resampled"] == ("true" if name == "x2ct" else "false")  # 16³ cube → 32³
            assert float(row["seconds"]) >= 0
        embolus_cases += emb is not None
    assert embolus_cases == 1 == evaluated["results"]["settings"]["num_embolus_cases"]


def test_mean_baseline_is_numpys_mean_of_the_clipped_train_cts(setup):
    st = Store(setup["store"])
    want = np.mean(np.stack([clipped(st.case(c)) for c in st.case_ids("train")]).astype(np.float64), axis=0)
    total, info = train_sum(st, WINDOW, progress=False)
    assert info["num_train"] == 6 and info["shape"] == [32, 32, 32]
    assert np.array_equal(mean_from_sum(total, info), want.astype(np.float32))
    parts = [train_sum(st, WINDOW, rank=r, world_size=2, progress=False)[0] for r in range(2)]
    assert np.array_equal(parts[0] + parts[1], total)  # what the 2-process all-reduce adds up


# --- outputs -------------------------------------------------------------------------------------


def test_csv_markdown_and_json_agree(evaluated):
    out, res = evaluated["out"], evaluated["results"]
    assert res["rows"] == ["x2ct", "mean-train-volume"] and res["settings"]["data_range_hu"] == R
    per_case = read_csv(out / "per_case.csv")
    assert len(per_case) == len(res["per_case"]) == 6
    for row, rec in zip(per_case, res["per_case"]):
        assert (row["case_id"], row["method"]) == (rec["case_id"], rec["method"])
        for key in METRIC_KEYS:
            assert num(row[key]) == rec[key]
    md = (out / "summary.md").read_text()
    assert res["command"] in md and "clipped to the HU window [-1024, 1600]" in md and "2624 HU" in md
    summary = read_csv(out / "summary.csv")
    for s in res["summary"]:
        assert s["n"] == 3
        line = next(ln for ln in md.splitlines() if ln.startswith(f"| {s['method']} |"))
        for key, stat in s["metrics"].items():
            values = [r[key] for r in res["per_case"] if r["method"] == s["method"] and r[key] is not None]
            mean, lo, hi = M.bootstrap_ci(values)
            assert (stat["mean"], stat["lo"], stat["hi"], stat["n"]) == (mean, lo, hi, len(values))
            csv_row = next(r for r in summary if r["method"] == s["method"] and r["metric"] == key)
            assert (float(csv_row["mean"]), float(csv_row["ci_lo"]), float(csv_row["ci_hi"])) == (mean, lo, hi)
        assert f"{s['metrics']['psnr']['mean']:.2f} [{s['metrics']['psnr']['lo']:.2f}" in line
    # bold: the higher mean PSNR, the lower MAE
    by = {s["method"]: s["metrics"] for s in res["summary"]}
    best = max(by, key=lambda m: by[m]["psnr"]["mean"])
    assert f"**{by[best]['psnr']['mean']:.2f} [" in md
    best_mae = min(by, key=lambda m: by[m]["mae_hu"]["mean"])
    assert f"**{by[best_mae]['mae_hu']['mean']:.1f} [" in md
    assert res["versions"]["torch"] == torch.__version__
    assert res["methods"]["x2ct"]["step"] == 2 and res["methods"]["x2ct"]["resampled_cases"] == 3
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]  # no temp dirs left


def test_figures_have_a_row_per_method_plus_ground_truth(setup, evaluated):
    st = Store(setup["store"])
    figs = sorted((evaluated["out"] / "figures").iterdir())
    assert [p.stem for p in figs] == st.case_ids("test")  # --figure-cases 3
    case = st.case(figs[0].stem)
    one = triplanar_image(np.zeros(case.shape), case.spacing_mm, xrays={"PA DRR": np.zeros((32, 32))},
                          title="x", height=160)
    for p in figs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
        img = Image.open(p)
        assert img.size == (one.width, 3 * one.height)  # ground truth, x2ct, mean-train-volume
        rows = np.asarray(img).reshape(3, one.height, -1)
        assert all(r.std() > 10 for r in rows)  # every row shows something


def test_failing_methods_are_named_and_the_others_written(setup, evaluated):
    assert evaluated["rc"] == 2
    lines = evaluated["stderr"].splitlines()
    bad = [ln for ln in lines if ln.startswith("xray2ct evaluate: method bad (")]
    corrupt = [ln for ln in lines if ln.startswith("xray2ct evaluate: method corrupt (")]
    assert len(bad) == 1 and "no such file or directory" in bad[0] and str(setup["root"] / "missing") in bad[0]
    assert len(corrupt) == 1 and "not a readable safetensors file" in corrupt[0]
    fails = {f["name"]: f for f in evaluated["results"]["failures"]}
    assert set(fails) == {"bad", "corrupt"} and fails["corrupt"]["stage"] == "load"
    md = (evaluated["out"] / "summary.md").read_text()
    assert "## Failures" in md and "**bad**" in md and "**corrupt**" in md
    assert {r["method"] for r in read_csv(evaluated["out"] / "per_case.csv")} == {"x2ct", "mean-train-volume"}


def copy_case(src, dst: Store, split: str, views=("pa", "lateral"), geometry: bool = True) -> None:
    vs = {v: (src.xray(v), src.xray_attrs(v) if geometry else {}) for v in views}
    dst.write_case(src.case_id, np.asarray(src.ct[...]), src.spacing_mm, src.affine, split=split, views=vs)


def test_figure_cases_chosen_by_id(setup, tmp_path, capsys):
    test = Store(setup["store"]).case_ids("test")
    try:
        evaluate(setup["store"], {}, tmp_path / "out", figure_case_ids=[test[-1]], progress=False)
        assert [p.stem for p in (tmp_path / "out" / "figures").iterdir()] == [test[-1]]
        with pytest.raises(InputError, match="--figure-case: 'nope' is not among"):
            evaluate(setup["store"], {}, tmp_path / "out2", figure_case_ids=["nope"], progress=False)
        assert not (tmp_path / "out2").exists()
    finally:
        reset_accelerate()
    assert cli_main(["evaluate", "--store", str(setup["store"]), "--out", str(tmp_path / "out3"), "--figure-case", "nope"]) == 2
    assert "--figure-case" in capsys.readouterr().err and not (tmp_path / "out3").exists()


def test_reconstruction_failure_and_missing_geometry_are_reported(setup, tmp_path, capsys):
    """A case without its lateral X-ray fails the biplanar GAN (the baseline is still scored); a
    store without geometry attributes skips projection consistency and says why."""
    src = Store(setup["store"])
    st = Store(tmp_path / "odd.zarr", create=True)
    for cid in src.case_ids("train")[:2]:
        copy_case(src.case(cid), st, "train")
    test = src.case_ids("test")
    copy_case(src.case(test[0]), st, "test", geometry=False)
    copy_case(src.case(test[1]), st, "test", views=("pa",))
    copy_case(src.case(test[2]), st, "test")
    try:
        res = evaluate(st.path, {"x2ct": setup["gan"]}, tmp_path / "out", max_cases=2, figure_cases=1, progress=False)
    finally:
        reset_accelerate()
    err = capsys.readouterr().err
    assert f"xray2ct evaluate: method x2ct ({setup['gan']}): case {test[1]}: " in err and "no 'lateral' X-ray" in err
    assert res["failures"][0]["stage"] == "reconstruct" and res["failures"][0]["case"] == test[1]
    assert res["cases"] == test[:2] and res["rows"] == ["mean-train-volume"]
    recs = res["per_case"]
    assert recs[0]["proj_psnr_pa"] is None and recs[1]["proj_psnr_pa"] is not None
    assert recs[1]["proj_psnr_lateral"] is None  # that view is not stored
    md = (tmp_path / "out" / "summary.md").read_text()
    assert f"case {test[0]}, pa X-ray (renderer 'unknown'): has no DRR geometry" in md
    assert "projection consistency skipped" in md


def test_outputs_are_atomic(setup, tmp_path, monkeypatch):
    import patching.data.preview

    out = tmp_path / "out"
    try:
        evaluate(setup["store"], {}, out, max_cases=1, figure_cases=1, progress=False)
        first = (out / "results.json").read_text()
        monkeypatch.setattr(patching.data.preview, "save_grid_png", lambda *a, **k: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            evaluate(setup["store"], {}, out, max_cases=2, figure_cases=1, progress=False)
        assert (out / "results.json").read_text() == first  # the earlier evaluation is untouched
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary directory left
        with pytest.raises(ZeroDivisionError):
            evaluate(setup["store"], {}, tmp_path / "new", max_cases=1, progress=False)
        assert not (tmp_path / "new").exists()
        monkeypatch.undo()
        res = evaluate(setup["store"], {}, out, max_cases=2, figure_cases=0, progress=False)  # replaces it
        assert json.loads((out / "results.json").read_text())["cases"] == res["cases"] and len(res["cases"]) == 2
        assert not (out / "figures").exists()
        (tmp_path / "mine").mkdir()
        (tmp_path / "mine" / "notes.txt").write_text("keep")
        with pytest.raises(InputError, match="not an evaluation output"):
            evaluate(setup["store"], {}, tmp_path / "mine", progress=False)
    finally:
        reset_accelerate()


@pytest.mark.parametrize("args, message", [
    (["--method", "a=x", "--method", "a=y"], "--method: NAME 'a' is given twice"),
    (["--method", "nopath"], "--method: expected NAME=PATH, got 'nopath'"),
    (["--method", "a b=x"], "may only hold letters"),
    (["--method", "mean-train-volume=x"], "reserved"),
    (["--split", "val", "--store", "EMPTY"], "--split: split 'val' of"),
    (["--split", "nope"], "unknown split 'nope'"),
    (["--store", "MISSING"], "is not an xray2ct store"),
    (["--num-samples", "0"], "--num-samples: needs a positive integer"),
    (["--lpips-weights", "MISSING"], "LPIPS feature weights not found"),
    (["--no-mean-baseline"], "nothing to evaluate"),
    (["--guidance", "-1"], "--guidance: needs a finite number >= 0"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "nonsense"], "--device: "),
])
def test_bad_flags_exit_2_and_write_nothing(setup, tmp_path, capsys, args, message):
    empty = Store(tmp_path / "empty.zarr", create=True)  # no cases at all
    args = [str(empty.path) if a == "EMPTY" else str(tmp_path / "nope.zarr") if a == "MISSING" else a for a in args]
    base = ["--store", str(setup["store"])] if "--store" not in args else []
    try:
        rc = cli_main(["evaluate", *base, "--out", str(tmp_path / "out"), *args])
    finally:
        reset_accelerate()
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "out").exists()


# --- several processes -----------------------------------------------------------------------------


def run_module(setup: dict, out: Path, nproc: int) -> subprocess.CompletedProcess:
    """``python -m launch.evaluate`` (nproc 1) or ``accelerate launch ... -m launch.evaluate``."""
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch/accelerate/cpu_ddp.yaml"),
        "--num_processes", str(nproc), "--main_process_port", str(free_port())]
    cmd = [*launcher, "-m", "launch.evaluate", "--store", str(setup["store"]), "--out", str(out), *method_args(setup)]
    return subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.distributed
def test_two_processes_give_the_one_process_results(setup):
    """Compared with a one-process run in the same environment (one BLAS thread each): PSNR's
    float64 dot product depends on OpenBLAS's thread count in the last bit, so the in-process run
    of this module (whose OpenBLAS may use 2 threads) is not the reference."""
    results = {}
    for nproc in (1, 2):
        out = setup["root"] / f"module-{nproc}"
        proc = run_module(setup, out, nproc)
        # failing methods: exit 2, the others written; load failures are printed once (rank 0)
        assert proc.returncode != 0 and (out / "results.json").is_file(), proc.stderr[-3000:]
        assert proc.stderr.count("xray2ct evaluate: method bad (") == 1, proc.stderr[-3000:]
        results[nproc] = json.loads((out / "results.json").read_text())
    one, two = results[1], results[2]
    assert one["command"].endswith(f"-m launch.evaluate --store {setup['store']} --out {setup['root'] / 'module-1'} "
                                   + " ".join(method_args(setup)))
    assert two["settings"]["world_size"] == 2 and one["settings"]["world_size"] == 1

    def strip(recs):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in recs]

    def strip_summary(summary):
        return [{**s, "metrics": {k: v for k, v in s["metrics"].items() if k != "seconds"}} for s in summary]

    assert len(one["per_case"]) == 6 and strip(two["per_case"]) == strip(one["per_case"])
    assert strip_summary(two["summary"]) == strip_summary(one["summary"])
    assert [f["name"] for f in two["failures"]] == [f["name"] for f in one["failures"]] == ["bad", "corrupt"]
    figs = sorted((setup["root"] / "module-1" / "figures").iterdir())
    assert len(figs) == 3  # 3 cases over 2 ranks: the third case's figure came from rank 1
    for p in figs:
        b = setup["root"] / "module-2" / "figures" / p.name
        assert np.array_equal(np.asarray(Image.open(p)), np.asarray(Image.open(b)))


# --- diffusion -------------------------------------------------------------------------------------


def test_diffusion_samples_and_their_mean(tmp_path_factory, tmp_path):
    from stage2_diffusion.pipeline import DiffusionReconstructor
    from tests.stage2_diffusion.test_task import encoded_store, trained_run

    run = trained_run(tmp_path_factory)
    store, _ = encoded_store(tmp_path_factory)
    try:
        res = evaluate(store, {"diff": run}, tmp_path / "out", num_samples=2, steps=2, seed=3, progress=False,
                       figure_cases=1, drr_guidance=0)  # the run's config says 1 (cpu-demo): 0 must reach the sampler
    finally:
        reset_accelerate()
    assert res["failures"] == [] and res["rows"] == ["diff", "diff-mean2", "mean-train-volume"]
    assert res["methods"]["diff"]["stochastic"] and res["methods"]["diff"]["steps"] == 2
    st = Store(store)
    cid = res["cases"][0]
    case = st.case(cid)
    assert res["settings"]["drr_guidance"] == 0 and "--drr-guidance 0" in res["command"]
    rec = DiffusionReconstructor(run, steps=2, drr_guidance=0)
    vols = rec.reconstruct({v: case.xray(v) for v in case.views()}, seed=case_seed(3, cid), num_samples=2)
    gt = np.asarray(case.ct[...])
    got = {r["method"]: r for r in res["per_case"]}
    assert got["diff"]["psnr"] == pytest.approx(M.psnr(vols[0], gt, R, window=WINDOW), rel=1e-9)
    mean = vols.astype(np.float64).mean(axis=0).astype(np.float32)
    assert got["diff-mean2"]["psnr"] == pytest.approx(M.psnr(mean, gt, R, window=WINDOW), rel=1e-9)
    assert got["diff-mean2"]["samples"] == 2 and got["diff-mean2"]["seconds"] >= got["diff"]["seconds"]
    assert Image.open(tmp_path / "out" / "figures" / f"{cid}.png").height > 4 * 160  # 4 rows
    assert not any(math.isnan(v) for r in res["per_case"] for k, v in r.items()
                   if k in METRIC_KEYS and isinstance(v, float))
