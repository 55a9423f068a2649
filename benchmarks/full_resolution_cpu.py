"""The real ``ctpa-512`` geometry end to end on a CPU: 512×512×604 volumes through every stage.

    nice -n 5 python benchmarks/full_resolution_cpu.py --out work/fullres    # hours on 2 shared cores
    nice -n 5 python benchmarks/full_resolution_cpu.py --out work/fullres --scaling-only   # the scaling part again

The ``ctpa-512`` presets run unchanged except channel widths and step counts (the ``--set``
lists below, printed and recorded; GroupNorm groups and head widths shrink with the channels,
and DataLoader workers are capped for a 2-core machine). Stages, each a subprocess of the
``xray2ct`` CLI whose wall time and peak RSS are recorded:

1. ``synth``: 3 chest phantoms 512×512×604 at 0.7×0.7×0.6 mm with PA + lateral DRRs;
2. ``train-vqgan``: a few VQ-GAN steps on streamed 256×256×128 tiles;
3. ``encode``: ``xray2ct encode``, every case through all 54 tiles;
4. ``train-diffusion``: a few diffusion steps on whole 8×128×151 latents;
5. ``sample-whole`` / ``sample-windowed``: ``xray2ct sample`` from PNG files, whole-latent
   denoising, then the config's ``sampler.fallback_window`` (``--windowed``);
6. the NIfTI read back by nibabel and SimpleITK: shape, spacing, affine = the preset's.

Then ``scaling``: encode and decode time per tile on two volume sizes (the full volume and a
z-crop with half the tiles), in this process, to show time linear in the number of tiles.

Peak RSS per stage, sampled every 0.2 s with psutil: ``peak_rss_mb`` is the largest single
process of the stage's tree, ``peak_tree_rss_mb`` the largest sum over the tree (DataLoader
workers included). Not ``ru_maxrss``: it keeps the high-water mark of the forked parent's image
from before ``exec``, so every stage launched from a large process (pytest) reported the parent.
Results: ``benchmarks/results/full-resolution-cpu.json``. ``tests/test_full_resolution.py``
runs the same functions at a reduced size (several tiles per axis, a non-cubic latent).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks._common import environment  # noqa: E402

PRESET = "ctpa-512"
GOAL_MB = 4096.0
# Channel widths only (plus the GroupNorm groups / head width / token width that must divide them).
VQGAN_WIDTHS = ("model.base_channels=2", "model.norm_groups=2", "disc.channels=4")
DIFFUSION_WIDTHS = ("encoder.channels=8,8,8,8,8", "encoder.token_dim=16", "encoder.norm_groups=4",
                    "unet.base_channels=8", "unet.num_head_channels=8", "unet.context_dim=16", "unet.norm_groups=4")
MACHINE = ("train.num_workers=1",)  # the preset's 4 loader processes on a 2-core machine: 1
# diffusion loads one whole latent per step: no loader process (a forked worker doubled the tree's RSS)
DIFFUSION_MACHINE = ("train.num_workers=0",)
# glibc's dynamic mmap threshold climbs to 32 MB after the first large free, so the many
# 10-30 MB activations of a whole-latent step land on the heap and fragment it (peak 4.6 GB instead
# of 4.0 GB for one diffusion step); a fixed 4 MB threshold returns them to the OS (docs/full_resolution.md)
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(4 << 20)}
VQGAN_STEPS = ("train.grad_accum=1",)  # a step count: one 256×256×128 tile per optimizer step (preset: 4)


@dataclass
class Plan:
    """What to run; the defaults are the real thing."""

    shape: tuple[int, int, int] = (512, 512, 604)
    cases: int = 3
    vqgan_steps: int = 2
    diffusion_steps: int = 2
    sample_steps: int = 2
    vqgan_sets: tuple[str, ...] = VQGAN_WIDTHS + VQGAN_STEPS + MACHINE
    diffusion_sets: tuple[str, ...] = DIFFUSION_WIDTHS + DIFFUSION_MACHINE
    scaling_z: tuple[int, ...] = (604, 316)  # 54 and 27 tiles of 256×256×128 at 25 % overlap
    xray_size: int | None = None
    extra_env: dict = field(default_factory=lambda: dict(ALLOCATOR_ENV))


def reduced_plan(extra_env: dict | None = None) -> Plan:
    """The test suite's size (``--reduced``): 64×64×76 at the preset's spacing with 32³ tiles —
    3×3×3 tiles per volume, a 16×16×19 latent (not a cube), 8³ fallback windows; one step each."""
    small = ("codec.tile=32,32,32", "codec.tile_latent=8,8,8", "train.grad_accum=1", "train.num_workers=0")
    return Plan(shape=(64, 64, 76), cases=3, vqgan_steps=1, diffusion_steps=1, sample_steps=1,
                vqgan_sets=VQGAN_WIDTHS + small,
                diffusion_sets=DIFFUSION_WIDTHS + ("sampler.fallback_window=8,8,8", "train.num_workers=0"),
                scaling_z=(76, 44), xray_size=64, extra_env={**ALLOCATOR_ENV, **(extra_env or {})})


# --- one stage = one subprocess, measured ---------------------------------------------------------


def _run_stage(name: str, cli_args: list[str], log_dir: Path, *, env: dict | None = None) -> dict:
    """Run ``python -m launch.cli CLI_ARGS`` and measure wall time and peak RSS (module docstring).
    Raises RuntimeError (with the log's tail) when the stage fails."""
    import psutil

    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"
    cmd = [sys.executable, "-m", "launch.cli", *cli_args]
    child_env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **(env or {})}
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        fh.write(" ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=child_env, stdout=fh, stderr=subprocess.STDOUT)
        ps, tree_peak, single_peak = psutil.Process(proc.pid), 0, 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            try:
                rss = [p.memory_info().rss for p in (ps, *ps.children(recursive=True)) if p.is_running()]
                tree_peak, single_peak = max(tree_peak, sum(rss)), max(single_peak, *rss, 0)
            except psutil.Error:
                pass
            time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise RuntimeError(f"stage {name} failed (exit {proc.returncode}), log {log}:\n{tail}")
    result = {"seconds": round(seconds, 1), "peak_rss_mb": round(single_peak / 2**20, 1),
              "peak_tree_rss_mb": round(tree_peak / 2**20, 1), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1)}
    print(f"[full-res] {name:16s} {result['seconds']:8.1f} s  peak RSS {result['peak_rss_mb']:7.0f} MB "
          f"(tree {result['peak_tree_rss_mb']:.0f} MB)", flush=True)
    return result


# --- the pipeline -----------------------------------------------------------------------------------


def write_xray_pngs(store_path: Path, out: Path) -> tuple[str, Path, Path]:
    """PA and lateral PNG files of the store's last case (the input of ``xray2ct sample``)."""
    from launch.cli_data import write_image
    from patching.data.store import Store

    store = Store(store_path)
    cid = store.case_ids()[-1]
    case = store.case(cid)
    pa, lat = out / "pa.png", out / "lateral.png"
    write_image(str(pa), case.xray("pa"))
    write_image(str(lat), case.xray("lateral"))
    return cid, pa, lat


def check_nifti(path: Path, shape, spacing) -> dict:
    """The NIfTI as nibabel and SimpleITK read it: shape, spacing, affine / origin must be the
    preset's centred RAS+ grid (ITK reports LPS: x and y of the origin negated)."""
    import nibabel as nib
    import SimpleITK as sitk

    from patching.data.spec import centred_affine

    img = nib.load(str(path))
    affine = centred_affine(shape, spacing)
    itk = sitk.ReadImage(str(path))
    ras_origin = affine[:3, 3]
    checks = {
        "nibabel_shape": list(img.shape) == list(shape),
        "nibabel_spacing": bool(np.allclose(img.header.get_zooms()[:3], spacing, atol=1e-5)),
        "nibabel_affine": bool(np.allclose(img.affine, affine, atol=1e-4)),
        "sitk_size": list(itk.GetSize()) == list(shape),
        "sitk_spacing": bool(np.allclose(itk.GetSpacing(), spacing, atol=1e-5)),
        "sitk_origin": bool(np.allclose(itk.GetOrigin(), (-ras_origin[0], -ras_origin[1], ras_origin[2]), atol=1e-3)),
        "sitk_direction": bool(np.allclose(itk.GetDirection(), (-1, 0, 0, 0, -1, 0, 0, 0, 1), atol=1e-6)),
        "dtype_int16": str(img.get_data_dtype()) == "int16",
    }
    return {"shape": list(img.shape), "spacing_mm": [round(float(z), 6) for z in img.header.get_zooms()[:3]],
            "affine": np.round(img.affine, 4).tolist(), "checks": checks, "ok": all(checks.values())}


def run_pipeline(out: Path, plan: Plan, on_stage=None, done: dict | None = None) -> dict:
    """Every stage of the module docstring; returns ``{"stages", "output", "sample_meta"}``.
    ``on_stage(stages)`` is called after each stage (the script records partial results);
    ``done`` holds the figures of stages an earlier run of the same plan finished into ``out``
    (``--continue``): those are kept, not run again."""
    from launch.presets import data_spec

    spec = data_spec(PRESET)
    out.mkdir(parents=True, exist_ok=True)
    store, logs = out / "store.zarr", out / "logs"
    env = dict(plan.extra_env)
    stages: dict[str, dict] = {}

    def run_stage(name, cli_args, log_dir, *, env):  # the module's run_stage, then report progress
        if name in (done or {}):
            print(f"[full-res] {name:16s} kept from the earlier run: {done[name]}", flush=True)
            stages[name] = dict(done[name], kept_from_earlier_run=True)
            return stages[name]
        result = _run_stage(name, cli_args, log_dir, env=env)
        stages[name] = result
        if on_stage is not None:
            on_stage(dict(stages))
        return result
    synth = ["data", "synth", "--store", str(store), "--num", str(plan.cases), "--preset", PRESET,
             "--shape", *map(str, plan.shape), "--workers", "1"]
    stages["synth"] = run_stage("synth", synth + (["--xray-size", str(plan.xray_size)] if plan.xray_size else []),
                                logs, env=env)
    vq, diff = out / "runs" / "vqgan", out / "runs" / "diffusion"
    stages["train-vqgan"] = run_stage("train-vqgan", [
        "train", "vqgan", "--store", str(store), "--preset", PRESET, "--output-dir", str(vq),
        "--max-steps", str(plan.vqgan_steps), "--set", *plan.vqgan_sets], logs, env=env)
    stages["encode"] = run_stage("encode", ["encode", "--store", str(store), "--vqgan", str(vq)], logs, env=env)
    stages["train-diffusion"] = run_stage("train-diffusion", [
        "train", "diffusion", "--store", str(store), "--preset", PRESET, "--output-dir", str(diff),
        "--max-steps", str(plan.diffusion_steps), "--set", *plan.diffusion_sets], logs, env=env)
    case_id, pa, lat = write_xray_pngs(store, out)
    meta = {}
    for name, extra in (("sample-whole", []), ("sample-windowed", ["--windowed"])):
        dest = out / name
        stages[name] = run_stage(name, ["sample", "--checkpoint", str(diff), "--pa", str(pa), "--lateral", str(lat),
                                        "--out", str(dest), "--steps", str(plan.sample_steps), *extra], logs, env=env)
        meta[name] = json.loads((dest / "sample.json").read_text())
    output = check_nifti(out / "sample-whole" / "volume.nii.gz", plan.shape, spec.spacing_mm)
    output["windowed"] = check_nifti(out / "sample-windowed" / "volume.nii.gz", plan.shape, spec.spacing_mm)["ok"]
    output["input_case"] = case_id
    return {"stages": stages, "output": output, "sample_meta": meta}


# --- encode / decode time against the number of tiles ---------------------------------------------


def tile_scaling(store_path: Path, vqgan_run: Path, z_sizes) -> list[dict]:
    """Encode then decode a case cropped to each z size (tiles: the codec's grid); seconds and CPU
    seconds per tile, in this process, one size after the other."""
    import torch

    from patching.data.store import Store
    from patching.tiling.grid import tile_grid
    from stage1_vqgan.codec import decode_latent, encode_volume
    from stage1_vqgan.encode import load_vqgan

    vq = load_vqgan(vqgan_run, "cpu")
    store = Store(store_path)
    case = store.case(store.case_ids()[0])
    rows = []
    for z in z_sizes:
        ct = np.asarray(case.ct[:, :, :z])  # int16, mapped per tile
        n_enc = len(tile_grid(ct.shape, vq.codec.tile, vq.codec.overlap))
        t, c = time.perf_counter(), time.process_time()
        with torch.no_grad():
            lat = encode_volume(vq.model, ct, vq.codec.tile, vq.codec.overlap, hu_window=vq.hu_window,
                                batch_size=vq.codec.batch_size)
        enc_s, enc_cpu = time.perf_counter() - t, time.process_time() - c
        n_dec = len(tile_grid(lat.shape[1:], vq.codec.tile_latent, vq.codec.overlap))
        t, c = time.perf_counter(), time.process_time()
        with torch.no_grad():
            decode_latent(vq.model, lat, vq.codec.tile_latent, vq.codec.overlap, hu_window=vq.hu_window,
                          batch_size=vq.codec.batch_size)
        dec_s, dec_cpu = time.perf_counter() - t, time.process_time() - c
        row = {"volume": list(ct.shape), "encode_tiles": n_enc, "encode_s": round(enc_s, 2), "encode_cpu_s": round(enc_cpu, 2),
               "encode_s_per_tile": round(enc_s / n_enc, 3), "decode_tiles": n_dec, "decode_s": round(dec_s, 2),
               "decode_cpu_s": round(dec_cpu, 2), "decode_s_per_tile": round(dec_s / n_dec, 3)}
        print(f"[full-res] scaling {row['volume']}: encode {n_enc} tiles {enc_s:.1f} s ({enc_cpu:.1f} CPU s), "
              f"decode {n_dec} tiles {dec_s:.1f} s ({dec_cpu:.1f} CPU s)", flush=True)
        rows.append(row)
        del ct, lat
    return rows


def summarise(result: dict, plan: Plan, scaling: list[dict] | None) -> dict:
    stages = result["stages"]
    worst = max(stages, key=lambda k: stages[k]["peak_tree_rss_mb"])
    doc = {
        "benchmark": "full-resolution-cpu",
        "preset": PRESET,
        "stages": stages,
        "output": {k: result["output"][k] for k in ("shape", "spacing_mm", "affine", "checks", "ok", "windowed",
                                                     "input_case")},
        "memory_goal_mb": GOAL_MB,
        "max_stage_rss": {"stage": worst, "peak_tree_rss_mb": stages[worst]["peak_tree_rss_mb"],
                          "within_goal": all(s["peak_tree_rss_mb"] <= GOAL_MB for s in stages.values())},
        "overrides": {"vqgan": list(plan.vqgan_sets), "diffusion": list(plan.diffusion_sets),
                      "steps": {"vqgan_train": plan.vqgan_steps, "diffusion_train": plan.diffusion_steps,
                                "sampler": plan.sample_steps}},
        "plan": {**asdict(plan), "extra_env": dict(plan.extra_env)},
        "sample_meta": {k: {m: v.get(m) for m in ("seconds", "peak_rss_mb", "latent_shape", "volume_shape", "window",
                                                   "steps")} for k, v in result["sample_meta"].items()},
        "environment": {**environment(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
        "note": ("wall times depend on what else the machine ran (see load_average_at_end); cpu_seconds, the "
                 "stage's own CPU time, is the steadier figure"),
    }
    if scaling:
        doc.update(scaling_summary(scaling))
    return doc


def scaling_summary(rows: list[dict]) -> dict:
    """Per-tile time of the smaller volume over the larger one's (1 = linear in the tile count), in
    wall and in CPU seconds."""
    def ratio(key: str, tiles: str) -> float:
        small, large = rows[-1], rows[0]
        return round((small[key] / small[tiles]) / (large[key] / large[tiles]), 3)

    return {"scaling": {"rows": rows,
                        "encode_per_tile_ratio_small_over_large": ratio("encode_s", "encode_tiles"),
                        "decode_per_tile_ratio_small_over_large": ratio("decode_s", "decode_tiles"),
                        "encode_cpu_per_tile_ratio": ratio("encode_cpu_s", "encode_tiles"),
                        "decode_cpu_per_tile_ratio": ratio("decode_cpu_s", "decode_tiles")}}


STAGE_ORDER = ("synth", "train-vqgan", "encode", "train-diffusion", "sample-whole", "sample-windowed")


def finished_stages(json_path: Path, plan: Plan) -> dict:
    """The leading stages a stopped run recorded in ``json_path`` (``--continue``), if its plan is this
    one; sampling stages are always run again (their metadata is needed)."""
    if not json_path.is_file():
        raise SystemExit(f"error: {json_path}: no earlier run to continue")
    doc = json.loads(json_path.read_text())
    if doc.get("plan") != json.loads(json.dumps(asdict(plan))):
        raise SystemExit(f"error: {json_path}: the earlier run had another plan; run without --continue")
    kept = {}
    for name in STAGE_ORDER[:4]:
        if name not in doc.get("stages", {}):
            break
        kept[name] = doc["stages"][name]
    return kept


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="work directory (store, runs, samples, logs)")
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "full-resolution-cpu.json")
    p.add_argument("--no-scaling", action="store_true", help="skip the encode/decode tiles scaling part")
    p.add_argument("--reduced", action="store_true", help="the test suite's reduced size (reduced_plan)")
    p.add_argument("--scaling-only", action="store_true",
                   help="only the scaling part, on the store and VQ-GAN of an earlier run in --out; added to --json")
    p.add_argument("--continue", dest="resume", action="store_true",
                   help="keep the stages a stopped run of the same plan recorded in --json (their outputs are in "
                        "--out) and run the rest")
    args = p.parse_args(argv)
    plan = reduced_plan() if args.reduced else Plan()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    if args.scaling_only:
        doc = json.loads(args.json.read_text())
        doc.update(scaling_summary(tile_scaling(args.out / "store.zarr", args.out / "runs" / "vqgan", plan.scaling_z)))
        doc["scaling"]["command"] = " ".join([Path(sys.executable).name] + sys.argv)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(json.dumps(doc["scaling"], indent=2))
        return 0
    print("[full-res] ctpa-512 presets, overrides (widths / steps / loader workers):", flush=True)
    print("  vqgan:     --set " + " ".join(plan.vqgan_sets) + f"  --max-steps {plan.vqgan_steps}", flush=True)
    print("  diffusion: --set " + " ".join(plan.diffusion_sets) + f"  --max-steps {plan.diffusion_steps}", flush=True)
    print(f"  sample:    --steps {plan.sample_steps}", flush=True)
    def partial(stages: dict) -> None:  # what finished so far, in case the run is stopped
        args.json.write_text(json.dumps({"benchmark": "full-resolution-cpu", "preset": PRESET, "partial": True,
                                         "stages": stages, "plan": {**asdict(plan)},
                                         "environment": environment()}, indent=2) + "\n")

    done = finished_stages(args.json, plan) if args.resume else {}
    if done:  # what the stopped run left of the stages to run again (a SIGTERM'd trainer checkpoints)
        import shutil

        if "train-diffusion" not in done:
            shutil.rmtree(args.out / "runs" / "diffusion", ignore_errors=True)
        for name in ("sample-whole", "sample-windowed"):
            shutil.rmtree(args.out / name, ignore_errors=True)
    result = run_pipeline(args.out, plan, on_stage=partial, done=done)
    doc = summarise(result, plan, None)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")  # the pipeline's figures are kept whatever comes next
    if not args.no_scaling:
        doc.update(scaling_summary(tile_scaling(args.out / "store.zarr", args.out / "runs" / "vqgan", plan.scaling_z)))
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({"stages": doc["stages"], "output": {k: doc["output"][k] for k in ("shape", "spacing_mm", "ok")},
                      "max_stage_rss": doc["max_stage_rss"], "scaling": doc.get("scaling")}, indent=2))
    print(f"[full-res] -> {args.json}")
    return 0 if doc["output"]["ok"] and doc["output"]["windowed"] else 1


if __name__ == "__main__":
    sys.exit(main())
