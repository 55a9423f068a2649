"""GPU acceptance in one command: training steps, full-resolution sampling, FSDP/DeepSpeed, xformers.

On one GPU (the target: one H100, at most 8 minutes), with the ``ctpa-512`` presets' real widths
and bf16 autocast, it measures:

- ``vqgan_step``: the VQ-GAN task's own ``train_step`` on 256×256×128 tiles: tiles/s, peak GPU
  memory, MFU (FLOPs of one step counted by ``torch.utils.flop_counter.FlopCounterMode`` —
  gradient-checkpointing recomputation included — against the device's dense bf16 peak, table
  ``BF16_DENSE_PEAK``);
- ``diffusion_step``: the diffusion task's ``train_step`` on a whole 8×128×151 latent with
  256² PA + lateral X-rays: samples/s, peak memory, MFU;
- ``sampling``: one 512×512×604 volume from an X-ray pair: X-ray encoding, 30 DPM-Solver++
  steps with classifier-free guidance (whole-latent denoising), tiled decode by the VQ-GAN;
  wall time of each and peak memory. Goals: ≤ 30 s and ≤ 24 GB;
- ``fsdp``, ``deepspeed``: three training steps and a resume to step 4 under
  ``launch/accelerate/fsdp.yaml`` and ``deepspeed_zero2.yaml`` with one process
  (``accelerate launch … -m launch.train``, the toy task of the distributed tests);
- ``xformers``: the diffusion step with ``unet.attention_backend=xformers`` when xformers is
  installed.

Weights are random (speed and memory do not depend on them). ``--smoke`` runs every part at tiny
widths on the CPU (float32); the FSDP and DeepSpeed parts then run over gloo as the CPU tests do
(FSDP2 ``fully_shard`` and DeepSpeed ZeRO-2 with ``DS_ACCELERATOR=cpu``, a save, a reload and a
further step), because the accelerate configs need CUDA; what cannot run on the CPU is listed in
the JSON with the reason. Any failing part makes the exit status 1 (after the other parts ran).

Writes ``benchmarks/results/gpu-acceptance-<device>.json`` (``--out`` to change; device, versions,
date, command, and per part its figures or its error).

Run: ``.venv/bin/python benchmarks/gpu_acceptance.py`` (GPU) or ``… --smoke`` (CPU, ~1 min).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks._common import environment  # noqa: E402

PARTS = ("vqgan_step", "diffusion_step", "sampling", "fsdp", "deepspeed", "xformers")
# Dense (no sparsity) bf16 tensor-core peak, FLOP/s, by device-name pattern (vendor data sheets).
BF16_DENSE_PEAK = (
    (r"H100.*PCIe", 756e12), (r"H100.*NVL", 835e12), (r"H100|GH200", 989e12), (r"H200", 989e12),
    (r"B200", 2250e12), (r"A100", 312e12), (r"L40S", 362e12), (r"A10G", 70e12), (r"RTX 4090", 165e12),
)
GOALS = {"sampling_s": 30.0, "sampling_peak_gb": 24.0, "run_s": 480.0}
# --smoke widths: every preset section shrunk, the structure (levels, attention, checkpointing) kept.
SMOKE_VQGAN = ["model.base_channels=8", "model.norm_groups=4", "model.codebook_size=64", "disc.channels=8",
               "disc.num_layers=2", "data.tile=16,16,16", "codec.tile_latent=4,4,4"]
SMOKE_DIFFUSION = ["encoder.image_size=32", "encoder.channels=8,8,8,8,8", "encoder.token_grid=2",
                   "encoder.token_dim=32", "encoder.norm_groups=4", "unet.base_channels=8", "unet.norm_groups=4",
                   "unet.num_head_channels=8", "unet.context_dim=32", "latent_shape=8,8,10"]


def bf16_peak(device_name: str) -> float | None:
    for pattern, peak in BF16_DENSE_PEAK:
        if re.search(pattern, device_name):
            return peak
    return None


class BenchContext:
    """The part of the engine's ``StepContext`` a task's ``train_step`` uses, for one process:
    backward → optimizer step (no accumulation), autocast in ``amp_dtype``."""

    def __init__(self, models, optimizers, device, amp_dtype, seed: int = 0):
        self.models, self.optimizers, self.device, self.amp_dtype = models, optimizers, device, amp_dtype
        self.rank, self.world_size, self.grad_accum, self.micro_step, self.sync_gradients = 0, 1, 1, 0, True
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def backward(self, loss, optimizer: str) -> None:
        loss.backward()
        self.optimizers[optimizer].step()
        self.optimizers[optimizer].zero_grad(set_to_none=True)

    @contextlib.contextmanager
    def frozen(self, *names):
        params = [p for n in names for p in self.models[n].parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in params:
                p.requires_grad_(True)

    @contextlib.contextmanager
    def ema_weights(self):
        yield

    def unwrap(self, name):
        return self.models[name]

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


class Run:
    def __init__(self, smoke: bool, steps: int):
        self.smoke, self.steps = smoke, steps
        self.device = torch.device("cpu" if smoke else "cuda")
        self.amp = None if smoke else torch.bfloat16
        self.cuda = self.device.type == "cuda"
        self.name = torch.cuda.get_device_name() if self.cuda else "cpu"
        self.peak = bf16_peak(self.name) if self.cuda else None

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def reset_memory(self):
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gb(self):
        return round(torch.cuda.max_memory_allocated() / 2**30, 2) if self.cuda else None

    def config(self, task, sets):
        from launch.train import build_run_config

        return build_run_config(task, "ctpa-512", list(sets) + (["train.mixed_precision=no"] if self.smoke else []))

    def timed_steps(self, task, cfg, batch) -> dict:
        """Build the task's models, time ``self.steps`` train steps after one warm-up, count one step's FLOPs."""
        from torch.utils.flop_counter import FlopCounterMode

        self.reset_memory()
        models = {k: m.to(self.device).train() for k, m in task.build_models(cfg).items()}
        opts = task.build_optimizers(cfg, models)
        ctx = BenchContext(models, opts, self.device, self.amp)
        batch = {k: v.to(self.device) for k, v in batch.items()}

        def step(n: int):
            # Accelerate runs a prepared model's forward under autocast with mixed precision: the same here.
            with ctx.autocast():
                task.train_step(batch, ctx.models, n, ctx)

        step(0)  # warm-up (allocator, cuDNN autotune)
        self.sync()
        with FlopCounterMode(display=False) as counter:
            step(1)
        flops = counter.get_total_flops()
        self.sync()
        t0 = time.perf_counter()
        for n in range(self.steps):
            step(2 + n)
        self.sync()
        step_s = (time.perf_counter() - t0) / self.steps
        out = {"step_s": round(step_s, 4), "flops_per_step": flops, "peak_gpu_gb": self.peak_gb(),
               "params_m": round(sum(p.numel() for m in models.values() for p in m.parameters()) / 1e6, 2)}
        out["mfu"] = round(flops / step_s / self.peak, 4) if self.peak else None
        if self.peak is None:
            out["mfu_note"] = "no dense bf16 peak known for this device" if self.cuda else "CPU run: no MFU"
        del models, opts
        return out


def part_vqgan_step(run: Run) -> dict:
    from stage1_vqgan.task import VQGANTask

    task = VQGANTask()
    cfg = run.config(task, SMOKE_VQGAN if run.smoke else [])
    task.spec = None
    b = cfg.train.batch_size
    x = torch.rand((b, 1, *cfg.train_tile), generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = run.timed_steps(task, cfg, {"image": x})
    return {"tile": list(cfg.train_tile), "batch_size": b, "tiles_per_s": round(b / out["step_s"], 3), **out}


def diffusion_batch(cfg) -> dict:
    g = torch.Generator().manual_seed(0)
    n, size = cfg.encoder.num_views, cfg.encoder.image_size
    shape = tuple(cfg.latent_shape)
    return {"latent": torch.randn((1, cfg.unet.latent_channels, *shape), generator=g),
            "start": torch.zeros((1, 3), dtype=torch.int64), "latent_shape": torch.tensor([shape]),
            "xray": torch.rand((1, n, size, size), generator=g), "views_present": torch.ones((1, n), dtype=torch.bool)}


def part_diffusion_step(run: Run, extra=()) -> dict:
    from stage2_diffusion.task import DiffusionTask

    task = DiffusionTask()
    cfg = run.config(task, (SMOKE_DIFFUSION if run.smoke else []) + list(extra))
    out = run.timed_steps(task, cfg, diffusion_batch(cfg))
    return {"latent": [cfg.unet.latent_channels, *cfg.latent_shape], "attention_backend": cfg.unet.attention_backend,
            "samples_per_s": round(1 / out["step_s"], 3), **out}


def part_sampling(run: Run) -> dict:
    from stage1_vqgan.codec import decode_latent
    from stage1_vqgan.model import VQGAN
    from stage1_vqgan.task import VQGANTask
    from stage2_diffusion.schedules import sample_scheduler
    from stage2_diffusion.task import DiffusionModel, DiffusionTask

    cfg = run.config(DiffusionTask(), SMOKE_DIFFUSION if run.smoke else [])
    vq_cfg = run.config(VQGANTask(), SMOKE_VQGAN if run.smoke else [])
    run.reset_memory()
    model = DiffusionModel(cfg).to(run.device).eval()
    vqgan = VQGAN(vq_cfg.model).to(run.device).eval()
    batch = diffusion_batch(cfg)
    xrays = batch["xray"].to(run.device)
    scheduler = sample_scheduler(cfg.diffusion, cfg.sampler.name)
    shape = (cfg.unet.latent_channels, *cfg.latent_shape)
    guidance = cfg.diffusion.guidance_scale
    autocast = torch.autocast("cuda", dtype=run.amp) if run.amp else contextlib.nullcontext()
    times = {}
    with torch.no_grad(), autocast:
        run.sync()
        t0 = time.perf_counter()
        cond = model.encoder(xrays, None)
        null = model.encoder.null_condition(1)
        run.sync()
        times["encode_xray_s"] = time.perf_counter() - t0
        # The sampler's own loop, with the conditioning just computed (the encoder is cheap and
        # runs again inside; its time is the figure above).
        from stage2_diffusion.sampler import sample_latents

        t0 = time.perf_counter()
        latent = sample_latents(model.unet, model.encoder, xrays, shape=shape, scheduler=scheduler,
                                steps=cfg.sampler.steps, guidance=guidance, generator=torch.Generator().manual_seed(0),
                                window=cfg.sampler.window, progress=False)
        run.sync()
        times["denoise_s"] = time.perf_counter() - t0 - times["encode_xray_s"]
        del cond, null
    t0 = time.perf_counter()
    volume = decode_latent(vqgan, latent[0].float(), vq_cfg.codec.tile_latent, vq_cfg.codec.overlap,
                           hu_window=(-1024.0, 1600.0), batch_size=vq_cfg.codec.batch_size, device=run.device,
                           amp_dtype=run.amp)
    run.sync()
    times["decode_s"] = time.perf_counter() - t0
    total = sum(times.values())
    out = {k: round(v, 3) for k, v in times.items()}
    out.update({"total_s": round(total, 3), "steps": cfg.sampler.steps, "sampler": cfg.sampler.name,
                "guidance": guidance, "window": cfg.sampler.window, "latent": list(shape),
                "output_shape": list(volume.shape[1:]), "peak_gpu_gb": run.peak_gb()})
    expect = [s * vq_cfg.model.downsample for s in cfg.latent_shape]
    if out["output_shape"] != expect or not torch.isfinite(volume).all():
        raise RuntimeError(f"decoded volume {out['output_shape']} (expected {expect}) or non-finite values")
    if run.cuda:
        out["goals"] = {"total_s <= 30": total <= GOALS["sampling_s"],
                        "peak_gpu_gb <= 24": out["peak_gpu_gb"] <= GOALS["sampling_peak_gb"]}
    return out


def _child_env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", **extra)
    if "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = "1"
    return env


def _run_child(cmd, env, timeout=300) -> None:
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {' '.join(map(str, cmd[:8]))} …\n{proc.stderr[-2500:]}")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accelerate_resume(config: str, extra_env=None) -> dict:
    """Three steps of the toy task under an accelerate config, one process; then resume to step 4."""
    with tempfile.TemporaryDirectory(prefix="gpu-acceptance-") as tmp:
        out = Path(tmp) / "run"
        env = _child_env(**(extra_env or {}))
        t0 = time.perf_counter()
        for steps, resume in ((3, []), (4, ["--resume", "latest"])):
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(REPO / "launch/accelerate" / config), "--num_processes", "1", "--main_process_port",
                   str(_free_port()), "-m", "launch.train", "tests.launch.toy_task:ToyTask", "--store", "unused",
                   "--preset", "cpu-demo", "--output-dir", str(out), "--max-steps", str(steps), *resume,
                   "--set", "train.ckpt_every=3"]
            _run_child(cmd, env)
        found = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
        if not {"step-3", "step-4"} <= set(found):
            raise RuntimeError(f"{config}: expected checkpoints step-3 and step-4, found {found}")
        return {"config": config, "checkpoints": found, "seconds": round(time.perf_counter() - t0, 1)}


def _gloo_roundtrip(mode: str, extra_env=None) -> dict:
    """The CPU tests' FSDP2 / DeepSpeed ZeRO-2 save-reload-step round trip: two processes over
    gloo, as ``tests/launch/test_checkpoint.py`` runs it (its checks assume two ranks)."""
    with tempfile.TemporaryDirectory(prefix="gpu-acceptance-") as tmp:
        work = Path(tmp)
        if mode == "fsdp-roundtrip":  # the run also loads a checkpoint written by one plain process
            from launch import checkpoint as ck
            from tests.launch.toy_task import ToyConfig, ToyTask

            torch.manual_seed(3)
            gen = ToyTask().build_models(ToyConfig())["gen"]
            opt = torch.optim.Adam(gen.parameters(), lr=1e-2)
            gen(torch.randn(2, 4)).sum().backward()
            opt.step()
            (work / "single").mkdir()
            ck.save_tensors(work / "single" / "model.safetensors", ck.gather_model_state(gen))
            ck.save_state(work / "single" / "optim", ck.gather_optimizer_state(gen, opt))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), "-m", "tests.launch.toy_task", mode, str(work)]
        t0 = time.perf_counter()
        _run_child(cmd, _child_env(**(extra_env or {})))
        result = json.loads((work / "result.json").read_text())
        flags = {k: v for k, v in result.items() if isinstance(v, bool)}
        if not flags or not all(flags.values()):
            raise RuntimeError(f"{mode}: checks failed: {result}")
        return {"mode": f"{mode} over gloo, 2 processes", "checks": flags, "seconds": round(time.perf_counter() - t0, 1)}


def part_fsdp(run: Run) -> dict:
    if run.smoke:
        return _gloo_roundtrip("fsdp-roundtrip")
    return _accelerate_resume("fsdp.yaml")


def part_deepspeed(run: Run) -> dict:
    import deepspeed  # noqa: F401 - a missing install fails the part

    if run.smoke:
        return _gloo_roundtrip("deepspeed-roundtrip", {"DS_ACCELERATOR": "cpu"})
    return _accelerate_resume("deepspeed_zero2.yaml")


def part_xformers(run: Run) -> dict:
    import xformers  # noqa: F401 - "when installed": the caller turns ImportError into a listed reason

    return part_diffusion_step(run, ["unet.attention_backend=xformers"])


NOT_ON_CPU = {
    "fsdp": "launch/accelerate/fsdp.yaml needs CUDA (bf16, use_cpu: false); --smoke runs the FSDP2 "
            "save/reload/step round trip over gloo instead",
    "deepspeed": "launch/accelerate/deepspeed_zero2.yaml needs CUDA; --smoke runs the ZeRO-2 "
                 "save/reload/step round trip over gloo (DS_ACCELERATOR=cpu) instead",
    "xformers": "xformers' memory_efficient_attention runs on CUDA only",
    "mfu": "MFU needs a GPU's bf16 peak",
    "bf16": "--smoke runs in float32 on the CPU",
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny widths on the CPU (what the test suite runs)")
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    ap.add_argument("--steps", type=int, default=None, help="timed steps per training part (default 5; smoke 1)")
    ap.add_argument("--out", type=Path, default=None, help="result JSON (default benchmarks/results/…)")
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_acceptance: no CUDA device; run with --smoke for the CPU check", file=sys.stderr)
        return 2
    run = Run(args.smoke, args.steps or (1 if args.smoke else 5))
    torch.manual_seed(0)
    results, failed, not_run = {}, [], {}
    t_all = time.perf_counter()
    for name in args.parts:
        fn = globals()[f"part_{name}"]
        t0 = time.perf_counter()
        try:
            if name == "xformers" and run.smoke:
                not_run[name] = NOT_ON_CPU[name]
                continue
            results[name] = {"ok": True, **fn(run)}
        except ImportError as err:
            if name == "xformers" and "xformers" in str(err):
                not_run[name] = f"xformers is not installed ({err})"
                continue
            failed.append(name)
            results[name] = {"ok": False, "error": f"{type(err).__name__}: {err}"}
        except Exception as err:  # noqa: BLE001 - every part is reported, then the run fails
            failed.append(name)
            results[name] = {"ok": False, "error": f"{type(err).__name__}: {err}",
                             "traceback": traceback.format_exc()[-3000:]}
        results.setdefault(name, {})["wall_s"] = round(time.perf_counter() - t0, 1)
        status = "ok" if name not in failed else "FAILED"
        print(f"{name:<15} {status:<6} {json.dumps({k: v for k, v in results[name].items() if k != 'traceback'})}",
              flush=True)
    if run.smoke:
        not_run.update({k: v for k, v in NOT_ON_CPU.items() if k in ("fsdp", "deepspeed", "mfu", "bf16")})
    for name, why in not_run.items():
        print(f"{name:<15} not run: {why}")
    env = environment()
    env["device"] = run.name
    try:
        import xformers

        env["xformers"] = xformers.__version__
    except ImportError:
        pass
    total = time.perf_counter() - t_all
    report = {"benchmark": "gpu-acceptance", "smoke": run.smoke, "environment": env,
              "total_s": round(total, 1), "parts": results, "not_run": not_run,
              "failed": failed, "bf16_dense_peak_flops": run.peak}
    if run.cuda:
        report["goals"] = {"whole run <= 480 s": total <= GOALS["run_s"]}
    slug = "cpu-smoke" if run.smoke else re.sub(r"[^A-Za-z0-9]+", "-", run.name).strip("-").lower()
    out = args.out or REPO / "benchmarks" / "results" / f"gpu-acceptance-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"recorded {out}; total {report['total_s']} s")
    if failed:
        print(f"gpu_acceptance: FAILED parts: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
