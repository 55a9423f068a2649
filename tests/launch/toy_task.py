"""A tiny GAN-shaped task for the engine tests (a few hundred parameters, CPU, milliseconds).

It follows the task protocol of :mod:`launch.engine` without importing ``launch`` — as a stage
package must — and the data-position contract: :class:`ToyDataset` yields single samples,
shards a global stream across ranks (``P + r + k·W`` after a resume at position P) and lays
batch-sized blocks round-robin over DataLoader workers.

Randomness that makes RNG restore matter: dropout in the generator (global torch RNG) and input
noise from ``ctx.generator``. Test knobs live in ``cfg.fault``: ``nan_steps`` makes the
generator loss NaN at those step indices; ``trace_dir`` makes every rank append the sample
indices it trained on to ``trace_dir/rank-<r>.jsonl`` and write its pid to ``pid-<r>``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import IterableDataset, get_worker_info


@dataclass
class ToyModelConfig:
    width: int = 16
    dropout: float = 0.2

    def __post_init__(self) -> None:
        if self.width < 1:
            raise ValueError(f"model.width must be >= 1, got {self.width}")


@dataclass
class ToyDataConfig:
    num_samples: int = 10
    dim: int = 4


@dataclass
class ToyFaultConfig:
    nan_steps: tuple[int, ...] = ()
    trace_dir: str = ""


@dataclass
class ToyConfig:
    model: ToyModelConfig = field(default_factory=ToyModelConfig)
    data: ToyDataConfig = field(default_factory=ToyDataConfig)
    fault: ToyFaultConfig = field(default_factory=ToyFaultConfig)
    adversarial: float = 0.1
    noise: float = 0.05


def stream_order(seed: int, epoch: int, num_samples: int) -> list[int]:
    """Sample ids in stream order for an epoch (a deterministic shuffle)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_samples, generator=g).tolist()


def make_sample(seed: int, idx: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 7919 + idx)
    x = torch.randn(dim, generator=g)
    mix = torch.linspace(-1.0, 1.0, dim * dim).reshape(dim, dim)
    return x, torch.tanh(mix @ x)


class ToyDataset(IterableDataset):
    def __init__(self, num_samples: int, dim: int, seed: int, rank: int, world_size: int, batch_size: int):
        self.num_samples, self.dim, self.seed = num_samples, dim, seed
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.epoch, self.position = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = int(epoch), 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "num_samples": self.num_samples}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def rank_positions(self) -> list[int]:
        """Stream positions this rank takes in the rest of the epoch (equal count on every rank)."""
        per_rank = max(0, (self.num_samples - self.position) // self.world_size)
        return [self.position + self.rank + k * self.world_size for k in range(per_rank)]

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        order = stream_order(self.seed, self.epoch, self.num_samples)
        positions = self.rank_positions()
        blocks = [positions[i:i + self.batch_size] for i in range(0, len(positions), self.batch_size)]
        for block in blocks[worker::num_workers]:
            for pos in block:
                idx = order[pos]
                x, y = make_sample(self.seed, idx, self.dim)
                # per-(epoch, position) "augmentation": deterministic, independent of the worker
                g = torch.Generator().manual_seed(self.seed * 31 + self.epoch * 1_000_003 + pos)
                x = x + 0.01 * torch.randn(self.dim, generator=g)
                yield {"x": x, "y": y, "idx": idx, "epoch": self.epoch}


class ToyTask:
    name = "toy"
    ema_models = ("gen",)

    def __init__(self) -> None:
        self.samples_seen = torch.zeros((), dtype=torch.int64)
        self.trace_dir: Path | None = None
        self.rank = 0

    def default_config(self, preset: str) -> ToyConfig:
        return ToyConfig()

    def train_defaults(self, preset: str) -> dict:
        return {"lr": 1e-2, "log_every": 1, "num_workers": 0, "ema_decay": 0.9}

    def build_models(self, cfg: ToyConfig) -> dict[str, nn.Module]:
        d, w = cfg.data.dim, cfg.model.width
        gen = nn.Sequential(nn.Linear(d, w), nn.SiLU(), nn.Dropout(cfg.model.dropout), nn.Linear(w, d))
        disc = nn.Sequential(nn.Linear(d, w), nn.SiLU(), nn.Linear(w, 1))
        return {"gen": gen, "disc": disc}

    def build_optimizers(self, cfg, models):
        return {
            "gen": torch.optim.Adam(models["gen"].parameters(), lr=cfg.train.lr, betas=(0.5, 0.9)),
            "disc": torch.optim.SGD(models["disc"].parameters(), lr=cfg.train.lr, momentum=0.9),
        }

    def build_schedulers(self, cfg, optimizers):
        warmup = 3
        return {"gen": torch.optim.lr_scheduler.LambdaLR(optimizers["gen"], lambda s: min(1.0, (s + 1) / warmup))}

    def build_dataset(self, cfg, store, preset, split, rank, world_size, seed):
        self.rank = rank
        if cfg.fault.trace_dir:
            self.trace_dir = Path(cfg.fault.trace_dir)
            self.trace_dir.mkdir(parents=True, exist_ok=True)
            (self.trace_dir / f"pid-{rank}").write_text(str(os.getpid()))
        self.nan_steps = set(cfg.fault.nan_steps)
        self.adversarial, self.noise = cfg.adversarial, cfg.noise
        return ToyDataset(cfg.data.num_samples, cfg.data.dim, seed, rank, world_size, cfg.train.batch_size)

    def train_step(self, batch, models, step, ctx):
        gen, disc = models["gen"], models["disc"]
        x = batch["x"] + self.noise * torch.randn(batch["x"].shape, generator=ctx.generator, device=ctx.device)
        fake = gen(x)
        # discriminator update (hinge), on a detached fake
        d_loss = torch.relu(1 - disc(batch["y"])).mean() + torch.relu(1 + disc(fake.detach())).mean()
        ctx.backward(d_loss, "disc")
        # generator update, through the just-updated discriminator
        with ctx.frozen("disc"):
            adv = -disc(fake).mean()
        g_loss = torch.mean((fake - batch["y"]) ** 2) + self.adversarial * adv
        if step in self.nan_steps:
            g_loss = g_loss * math.nan
        ctx.backward(g_loss, "gen")
        self.samples_seen += batch["x"].shape[0]
        if self.trace_dir is not None:
            with open(self.trace_dir / f"rank-{self.rank}.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "micro": ctx.micro_step, "idx": batch["idx"].tolist(),
                                    "epoch": batch["epoch"].tolist()}) + "\n")
        return {"loss": g_loss.detach(), "d_loss": d_loss.detach()}

    def extra_state(self) -> dict:
        return {"samples_seen": self.samples_seen.clone(), "note": "toy"}

    def load_extra_state(self, state: dict) -> None:
        self.samples_seen = state["samples_seen"].clone()

    def validate(self, models, step, ctx):
        x = torch.linspace(-1, 1, 8 * 4).reshape(8, 4).to(ctx.device)
        with ctx.ema_weights():
            out = models["gen"](x)
        return {"val_mean": out.mean(), "val_image": (out - out.min()) / (out.max() - out.min() + 1e-6)}


# --- helpers for the tests that launch training runs of this task ------------------------------

REPO = Path(__file__).resolve().parents[2]
TASK_REF = "tests.launch.toy_task:ToyTask"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    env.pop("XRAY2CT_CKPT_WRITE_DELAY_S", None)
    env.update(extra)
    return env


def train_cmd(out: Path, steps: int, *, nproc: int = 1, launcher: str = "torchrun", resume: str | None = None,
              sets: tuple[str, ...] = ()) -> list[str]:
    """The command line of a toy training run (one process, torchrun or accelerate launch)."""

    args = ["-m", "launch.train", TASK_REF, "--store", "unused", "--preset", "cpu-demo", "--output-dir", str(out),
            "--max-steps", str(steps)]
    if resume:
        args += ["--resume", resume]
    args += ["--set", f"fault.trace_dir={out / 'trace'}", *sets]
    return launch_cmd(args, nproc, launcher)


def launch_cmd(args: list[str], nproc: int = 1, launcher: str = "accelerate") -> list[str]:
    """``python ARGS`` for one process, else under ``accelerate launch`` (the CPU DDP config) or torchrun."""
    import sys

    if nproc == 1:
        return [sys.executable, *args]
    port = str(free_port())
    if launcher == "accelerate":
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(REPO / "launch/accelerate/cpu_ddp.yaml"), "--num_processes", str(nproc),
                "--main_process_port", port, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", port, *args]


def metrics(out: Path) -> dict[int, dict]:
    """Logged records by step (the last record wins when a resumed run logged a step again)."""
    return {rec["step"]: rec for rec in _jsonl(Path(out) / "metrics.jsonl")}


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Every safetensors file of two checkpoints (models, EMA, optimizers; not the per-rank RNG
    files) holds bit-identical tensors."""
    from safetensors.torch import load_file

    files = sorted(p.relative_to(a) for p in a.rglob("*.safetensors") if not p.name.startswith("rank-"))
    assert files and files == sorted(p.relative_to(b) for p in b.rglob("*.safetensors") if not p.name.startswith("rank-"))
    for rel in files:
        ta, tb = load_file(a / rel), load_file(b / rel)
        assert ta.keys() == tb.keys(), rel
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{rel}: {k} differs"


def trace(out: Path, rank: int = 0) -> list[dict]:
    return _jsonl(Path(out) / "trace" / f"rank-{rank}.jsonl")


def _jsonl(path: Path) -> list[dict]:
    """Complete lines of a JSON-lines file that a running process may be appending to."""
    if not path.is_file():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]


# --- FSDP2 round trip (run under torchrun by tests/launch/test_checkpoint.py) ----------------------


def _fsdp_roundtrip(workdir: str) -> None:
    """Shard the toy generator with FSDP2 over gloo, save with launch.checkpoint, reload, compare.

    Also loads ``workdir/single`` (written by one process) into the sharded model (1 → 2).
    Rank 0 writes ``workdir/result.json``.
    """
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from launch import checkpoint as ck
    from launch.engine import EMA

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    work = Path(workdir)
    cfg = ToyConfig()

    def build(seed: int):
        torch.manual_seed(seed)
        model = ToyTask().build_models(cfg)["gen"]
        model[2].p = 0.0  # no dropout: the comparison steps must be deterministic
        fully_shard(model)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        return model, opt

    def train_step(model, opt, ema, salt: int):
        g = torch.Generator().manual_seed(100 * salt + rank)
        x = torch.randn(3, cfg.data.dim, generator=g)
        loss = (model(x) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        ema.update()

    model, opt = build(0)
    ema = EMA(model, 0.5)
    ema_at_start = ema.full_state()
    for salt in range(2):
        train_step(model, opt, ema, salt)
    out = work / "fsdp"
    sd, osd, esd = ck.gather_model_state(model), ck.gather_optimizer_state(model, opt), ema.full_state()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        ck.save_tensors(out / "model.safetensors", sd)
        ck.save_state(out / "optim", osd)
        ck.save_tensors(out / "ema.safetensors", esd)
    dist.barrier()

    model2, opt2 = build(1)
    ema2 = EMA(model2, 0.5)
    ck.load_model_state(model2, ck.load_tensors(out / "model.safetensors"))
    ck.load_optimizer_state(model2, opt2, ck.load_state(out / "optim"))
    ema2.load_full(ck.load_tensors(out / "ema.safetensors"))

    def same(a: dict, b: dict) -> bool:
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def same_optim(a: dict, b: dict) -> bool:
        return a["state"].keys() == b["state"].keys() and all(same(a["state"][k], b["state"][k]) for k in a["state"]) \
            and [{k: v for k, v in g.items()} for g in a["param_groups"]] == [{k: v for k, v in g.items()} for g in b["param_groups"]]

    result = {}
    reloaded = (ck.gather_model_state(model2), ck.gather_optimizer_state(model2, opt2), ema2.full_state())
    if rank == 0:
        result["model"] = same(sd, reloaded[0])
        result["optim"] = same_optim(osd, reloaded[1])
        result["ema"] = same(esd, reloaded[2])
        result["ema_moved"] = not same(ema_at_start, esd) and not same(esd, sd)  # updated in place, lagging
    # one more identical step on both: the states stay bit-identical
    train_step(model, opt, ema, 7)
    train_step(model2, opt2, ema2, 7)
    a = (ck.gather_model_state(model), ck.gather_optimizer_state(model, opt), ema.full_state())
    b = (ck.gather_model_state(model2), ck.gather_optimizer_state(model2, opt2), ema2.full_state())
    if rank == 0:
        result["after_step"] = same(a[0], b[0]) and same_optim(a[1], b[1]) and same(a[2], b[2])
        result["sharded"] = type(model[0].weight).__name__ == "DTensor"
    # 1 -> 2: a checkpoint written by one process loads into the sharded model
    single = work / "single"
    if (single / "model.safetensors").is_file():
        model3, opt3 = build(2)
        ck.load_model_state(model3, ck.load_tensors(single / "model.safetensors"))
        ck.load_optimizer_state(model3, opt3, ck.load_state(single / "optim"))
        got = (ck.gather_model_state(model3), ck.gather_optimizer_state(model3, opt3))
        if rank == 0:
            result["from_single"] = same(ck.load_tensors(single / "model.safetensors"), got[0]) and \
                same_optim(ck.load_state(single / "optim"), got[1])
    if rank == 0:
        (work / "result.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


# --- DeepSpeed ZeRO-2 optimizer partitions round trip (DS_ACCELERATOR=cpu, gloo) ---------------


def _deepspeed_roundtrip(workdir: str) -> None:
    """Train the toy generator under DeepSpeed ZeRO-2 on CPU, save each rank's optimizer
    partition with launch.checkpoint (no pickle), load into a fresh engine, take one more step
    on both: the weights must stay bit-identical. Rank 0 writes ``workdir/result.json``."""
    import importlib

    import deepspeed

    from launch import checkpoint as ck

    # DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce (a minute on 2 cores)
    # on first use; gloo does the work without it. (`deepspeed.comm.torch` as an attribute is
    # the torch package itself, hence import_module.)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed("gloo")
    rank = torch.distributed.get_rank()
    work = Path(workdir)

    def build(seed: int):
        torch.manual_seed(seed)
        gen = ToyTask().build_models(ToyConfig())["gen"]
        gen[2].p = 0.0
        opt = torch.optim.Adam(gen.parameters(), lr=1e-2)
        config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
                  "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
        engine, *_ = deepspeed.initialize(model=gen, optimizer=opt, config=config)
        return engine

    def step(engine, salt: int):
        x = torch.randn(2, 4, generator=torch.Generator().manual_seed(10 * salt + rank))
        loss = engine(x).pow(2).mean()
        engine.backward(loss)
        engine.step()

    first = build(0)
    for salt in range(3):
        step(first, salt)
    ck.save_deepspeed_optimizer(work / f"optim.rank-{rank}", first)
    if rank == 0:
        ck.save_tensors(work / "model.safetensors", first.module.state_dict())
    torch.distributed.barrier()
    second = build(1)
    second.module.load_state_dict(ck.load_tensors(work / "model.safetensors"))
    ck.load_deepspeed_optimizer(work / f"optim.rank-{rank}", second)
    step(first, 9)
    step(second, 9)
    a, b = first.module.state_dict(), second.module.state_dict()
    same = torch.tensor([int(all(torch.equal(a[k], b[k]) for k in a))])
    torch.distributed.all_reduce(same, op=torch.distributed.ReduceOp.MIN)
    files = sorted(p.name for p in work.iterdir())
    if rank == 0:
        (work / "result.json").write_text(json.dumps({"after_step": bool(same.item()), "files": files}))
    torch.distributed.barrier()


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "fsdp-roundtrip":
        _fsdp_roundtrip(sys.argv[2])
    elif len(sys.argv) == 3 and sys.argv[1] == "deepspeed-roundtrip":
        _deepspeed_roundtrip(sys.argv[2])
    else:
        raise SystemExit("usage: python -m tests.launch.toy_task {fsdp-roundtrip,deepspeed-roundtrip} WORKDIR")
