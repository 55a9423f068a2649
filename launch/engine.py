"""The training engine: one loop, on Hugging Face Accelerate, for every task.

A stage package defines *what* is trained; this module defines *how* (devices, precision,
distribution, accumulation, clipping, EMA, checkpoints, logging). Stage packages never import
``launch``: a task is any object with these methods (duck-typed; docs/training.md has the
long version, a GAN example and the DDP rules)::

    name = "mytask"; ema_models = ("generator",)                          # optional attributes
    default_config(preset: str) -> dataclass      # defaults for every field; sections nested;
                                                  # no `train` field (the engine adds it)
    train_defaults(preset: str) -> dict           # optional: TrainConfig fields to change
    prepare(cfg, store, preset) -> None           # optional: read the store before build_models
    build_models(cfg) -> dict[str, nn.Module]
    build_optimizers(cfg, models) -> dict[str, Optimizer]   # one model per optimizer; a model
                                                  # without one is frozen (never DDP/FSDP-wrapped)
    build_schedulers(cfg, optimizers) -> dict[str, LRScheduler]   # optional, by optimizer name
    build_dataset(cfg, store, preset, split, rank, world_size, seed) -> IterableDataset
                                                  # preset: patching.data.spec.VolumeSpec; seed: base
    train_step(batch, models, step, ctx) -> dict[str, Tensor]   # one micro-batch; updates via
                                                  # ctx.backward(loss, optimizer_name), in order
    collate_fn(samples) -> batch                  # optional
    extra_state() -> dict; load_extra_state(dict) # optional: tensors + plain JSON data
    validate(models, step, ctx) -> dict[str, float | Tensor]   # optional; 0-d: scalars, 2-D/3-D
                                                  # in [0, 1]: images (TensorBoard)

``ctx`` (:class:`StepContext`): ``backward(loss, optimizer)`` back-propagates into that
optimizer's parameters only (gradients the loss sends into other optimizers' parameters are
discarded) and, on the last micro-batch of an accumulation window, clips, checks and steps it
(then its scheduler and EMA) before returning — so a discriminator update is visible to the
generator loss computed after it. ``frozen(*models)`` runs forwards that must not produce
weight gradients (a generator loss through the discriminator); ``ema_weights()``; ``generator``
(per-rank, on the device, checkpointed); ``device``, ``rank``, ``world_size``, ``micro_step``,
``grad_accum``, ``sync_gradients``, ``unwrap(name)``, ``autocast()``.

Data-position contract: the dataset yields single samples and has ``set_epoch(e)`` (position
back to 0) and ``load_state_dict({"epoch", "position", ...})`` (``state_dict()`` optional).
``position`` counts samples consumed globally in the epoch; after a resume at position P,
rank r of W takes stream positions ``P + r + k·W``, every rank the same count, batch-sized
blocks round-robin over DataLoader workers. The engine counts batches and saves
``P + n × batch_size × W``, so a resumed run on any process count continues the same sequence.

Host syncs: logging steps (the accumulated scalars are read once), and one finiteness flag per
optimizer update for the non-finite guard (``train.max_nonfinite=0`` removes it). The per-step
stop-signal check is a gloo all-reduce of a CPU flag, not a device sync.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from . import checkpoint as ck
from .config import config_to_dict
from .context import StepContext
from .ema import EMA  # noqa: F401  (part of the engine's API)
from .schedules import ema_decay_at, lr_factor
from .signals import ControlGroup, StopRequest, ignore_stop_signals, stop_signals_blocked


@dataclass
class EngineState:
    """The loop's counters; saved in ``meta.json``."""

    step: int = 0  # optimizer steps completed
    epoch: int = 0
    position: int = 0  # samples consumed globally in this epoch
    nonfinite_streak: int = 0  # consecutive steps with a skipped (non-finite) update
    nonfinite_total: int = 0


def resolve_mixed_precision(value: str) -> str:
    """``auto`` → bf16 autocast on CUDA, none on CPU (bf16 on CPU is allowed but slow)."""
    if value == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    return value


def _seed_all(seed: int) -> None:
    from accelerate.utils import set_seed

    set_seed(seed)


def _loader_seed(seed: int, rank: int, epoch: int) -> int:
    return zlib.crc32(f"loader/{seed}/{rank}/{epoch}".encode())


class Trainer:
    """Runs a task: ``Trainer(...).run()`` returns the exit status (0 done or stopped by a
    signal after saving, 1 stopped by the non-finite guard)."""

    def __init__(self, task: Any, cfg: Any, *, task_ref: str, preset: str, store: str, output_dir: str | Path,
                 resume: str | None = None, data_spec: Any = None):
        from accelerate import Accelerator

        self.task, self.cfg, self.task_ref, self.preset, self.store = task, cfg, task_ref, preset, store
        self.output_dir = Path(output_dir)
        tc = cfg.train
        cuda = torch.cuda.is_available()
        self.accelerator = Accelerator(
            cpu=not cuda,
            mixed_precision=resolve_mixed_precision(tc.mixed_precision),
            gradient_accumulation_steps=tc.grad_accum,
            step_scheduler_with_optimizer=False,
        )
        acc = self.accelerator
        self.device, self.rank, self.world_size = acc.device, acc.process_index, acc.num_processes
        self.is_main = acc.is_main_process
        self.deepspeed = acc.distributed_type.name == "DEEPSPEED"
        self.control = ControlGroup()
        self.stop = StopRequest()
        # Resolve --resume before any work, so a bad path fails fast on every rank.
        self.resume_from = ck.resolve_resume(self.output_dir, resume)

        prepare = getattr(task, "prepare", None)
        if prepare is not None:  # optional: what the models need from the store (S-XR2CT's template CT)
            prepare(cfg, store, data_spec)
        # Same initialisation on every rank (DDP would broadcast anyway; FSDP shards need it).
        _seed_all(tc.seed)
        models = dict(task.build_models(cfg))
        optimizers = dict(task.build_optimizers(cfg, models))
        self.model_of_opt = self._match_optimizers(models, optimizers)
        self._setup_models(models, optimizers)
        build_sched = getattr(task, "build_schedulers", None)
        # The task's own optimizer objects: Accelerate/FSDP2 keep them (params remapped in place)
        # and DeepSpeed drives them as its base optimizers, so their schedulers stay valid.
        self.schedulers = dict(build_sched(cfg, optimizers) if build_sched else {})
        if tc.warmup_steps or tc.lr_decay != "none":  # the engine's schedule for optimizers the task leaves alone
            factor = functools.partial(lr_factor, warmup_steps=tc.warmup_steps, total_steps=tc.max_steps, decay=tc.lr_decay)
            self.schedulers.update({n: torch.optim.lr_scheduler.LambdaLR(o, factor) for n, o in optimizers.items()
                                    if n not in self.schedulers})
        unknown = set(self.schedulers) - set(self.optimizers)
        if unknown:
            raise ValueError(f"schedulers {sorted(unknown)} name no optimizer")
        ema_names = tuple(getattr(task, "ema_models", ()) or ())
        for n in ema_names:
            if n not in self.models:
                raise ValueError(f"ema_models names unknown model {n!r}")
        self.ema = {n: EMA(self.unwrapped[n], tc.ema_decay) for n in ema_names} if tc.ema_decay > 0 else {}

        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(tc.seed * self.world_size + self.rank)
        self.state = EngineState()
        self.dataset = task.build_dataset(cfg, store, data_spec, tc.split, self.rank, self.world_size, tc.seed)
        self.ctx = StepContext(self)
        self._iter = None
        self._empty_epochs = 0
        self._last_saved = -1
        self._pending_bad: dict[str, torch.Tensor] = {}
        self._skipped = False
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0
        self._norm_sums: dict[str, torch.Tensor] = {}
        self._norm_counts: dict[str, int] = {}
        self._writer = None

    # --- set-up -------------------------------------------------------------------------------

    @staticmethod
    def _match_optimizers(models: dict[str, nn.Module], optimizers: dict) -> dict[str, str]:
        owner = {id(p): name for name, m in models.items() for p in m.parameters()}
        result = {}
        for opt_name, opt in optimizers.items():
            owners = {owner.get(id(p)) for g in opt.param_groups for p in g["params"]}
            if len(owners) != 1 or None in owners:
                raise ValueError(f"optimizer {opt_name!r} must cover parameters of exactly one model (got {owners})")
            result[opt_name] = owners.pop()
        taken = list(result.values())
        dup = {m for m in taken if taken.count(m) > 1}
        if dup:
            raise ValueError(f"models {sorted(dup)} have several optimizers; use parameter groups in one optimizer")
        return result

    def _setup_models(self, models: dict[str, nn.Module], optimizers: dict) -> None:
        acc = self.accelerator
        opt_of_model = {m: o for o, m in self.model_of_opt.items()}
        self.models: dict[str, nn.Module] = {}
        self.optimizers: dict[str, Any] = {}
        if self.deepspeed:
            ds = acc.state.deepspeed_plugin.deepspeed_config
            tc = self.cfg.train
            for key, value in (("train_micro_batch_size_per_gpu", tc.batch_size),
                               ("gradient_accumulation_steps", tc.grad_accum),
                               ("gradient_clipping", tc.clip_grad)):
                if ds.get(key, "auto") == "auto":
                    ds[key] = value
        for name, model in models.items():
            opt_name = opt_of_model.get(name)
            if opt_name is None:  # frozen: placed and autocast, never wrapped for gradient sync
                model.requires_grad_(False)
                self.models[name] = acc.prepare_model(model, evaluation_mode=True).to(self.device)
                continue
            # One prepare call per (model, optimizer): FSDP2 and DeepSpeed take one model per call.
            self.models[name], self.optimizers[opt_name] = acc.prepare(model, optimizers[opt_name])
        self.unwrapped = {n: acc.unwrap_model(m) for n, m in self.models.items()}
        self.inner_optimizers = {n: getattr(o, "optimizer", o) for n, o in self.optimizers.items()}
        self.opt_params = {
            n: [p for g in o.param_groups for p in g["params"]] for n, o in self.inner_optimizers.items()
        }
        self.trainable = [self.models[m] for m in self.model_of_opt.values()]

    # --- data ---------------------------------------------------------------------------------

    def _make_iter(self):
        tc = self.cfg.train
        task_init = getattr(self.dataset, "worker_init_fn", None)

        def worker_init(worker_id: int) -> None:
            ignore_stop_signals(worker_id)
            if task_init is not None:
                task_init(worker_id)

        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=tc.batch_size,
            num_workers=tc.num_workers,
            collate_fn=getattr(self.task, "collate_fn", None),
            pin_memory=self.device.type == "cuda",
            worker_init_fn=worker_init if tc.num_workers > 0 else None,
            # An explicit generator: making an iterator must not draw from the global RNG,
            # whose state is part of the checkpoint.
            generator=torch.Generator().manual_seed(_loader_seed(tc.seed, self.rank, self.state.epoch)),
            in_order=True,
        )
        with stop_signals_blocked():  # workers are forked here
            return iter(loader)

    def _next_batch(self):
        from accelerate.utils import send_to_device

        while True:
            if self._iter is None:
                self._iter = self._make_iter()
            try:
                batch = next(self._iter)
            except StopIteration:
                self._iter = None
                self._empty_epochs += 1
                if self._empty_epochs > 2:
                    raise RuntimeError("the dataset yields no batches (empty split or store?)") from None
                self.state.epoch += 1
                self.state.position = 0
                self.dataset.set_epoch(self.state.epoch)
                continue
            self._empty_epochs = 0
            self.state.position += self.cfg.train.batch_size * self.world_size
            return send_to_device(batch, self.device, non_blocking=True)

    def _data_state(self) -> dict:
        base = dict(self.dataset.state_dict()) if hasattr(self.dataset, "state_dict") else {}
        base.update(epoch=self.state.epoch, position=self.state.position)
        return base

    # --- one update ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _frozen(self, names):
        stack = contextlib.ExitStack()
        flipped = []
        for n in names:
            if n not in self.models:
                raise KeyError(f"frozen(): unknown model {n!r}")
            m = self.models[n]
            if isinstance(m, nn.parallel.DistributedDataParallel):
                stack.enter_context(m.no_sync())  # no reducer armed by this forward
            for p in self.unwrapped[n].parameters():
                # FSDP2 shards (DTensors) keep requires_grad: the gradient set-aside in
                # _backward still keeps their gradients out of this loss.
                if p.requires_grad and not hasattr(p, "device_mesh"):
                    p.requires_grad_(False)
                    flipped.append(p)
        try:
            with stack:
                yield
        finally:
            for p in flipped:
                p.requires_grad_(True)

    def _backward(self, loss: torch.Tensor, opt_name: str) -> None:
        if opt_name not in self.optimizers:
            raise KeyError(f"backward(): unknown optimizer {opt_name!r}; known: {sorted(self.optimizers)}")
        guard = self.cfg.train.max_nonfinite > 0
        bad = ~torch.isfinite(loss.detach()).all()
        self._pending_bad[opt_name] = self._pending_bad.get(opt_name, torch.zeros_like(bad)) | bad
        if self.deepspeed:
            self._backward_deepspeed(loss, opt_name, guard)
            return
        # Set aside the gradients of every other optimizer's parameters, so that this loss only
        # adds to `opt_name`'s (a generator loss flows through the discriminator). Pointer swaps.
        others = [p for n, ps in self.opt_params.items() if n != opt_name for p in ps]
        saved = [p.grad for p in others]
        for p in others:
            p.grad = None
        self.accelerator.backward(loss)  # divides by grad_accum
        for p, g in zip(others, saved, strict=True):
            p.grad = g
        if self.accelerator.sync_gradients:
            self._apply_update(opt_name, guard)

    def _apply_update(self, opt_name: str, guard: bool) -> None:
        tc = self.cfg.train
        opt = self.optimizers[opt_name]
        params = self.opt_params[opt_name]
        if tc.clip_grad > 0:
            norm = self.accelerator.clip_grad_norm_(params, tc.clip_grad)  # FSDP-aware
        else:  # the norm only: the guard checks it and it is logged
            grads = [p.grad for p in params if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads) if grads else None
        if norm is None:
            norm = torch.zeros((), device=self.device)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        norm = norm.detach().float()
        bad = self._pending_bad.pop(opt_name) | ~torch.isfinite(norm)
        skip = False
        if guard:
            flag = bad.to(torch.int32).reshape(1)
            if self.world_size > 1:  # loss flags are per rank; every rank must take the same decision
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            skip = bool(flag.item())  # host sync: one flag per optimizer update (the guard's cost)
        if skip:
            self._skipped = True
        else:
            opt.step()
            if opt_name in self.schedulers:
                self.schedulers[opt_name].step()
            model_name = self.model_of_opt[opt_name]
            if model_name in self.ema:
                self.ema[model_name].update(ema_decay_at(self.state.step, tc.ema_decay, tc.ema_warmup))
        opt.zero_grad(set_to_none=True)
        key = f"grad_norm/{opt_name}"
        self._norm_sums[key] = self._norm_sums.get(key, 0) + torch.nan_to_num(norm, nan=0.0, posinf=0.0)
        self._norm_counts[key] = self._norm_counts.get(key, 0) + 1

    def _backward_deepspeed(self, loss: torch.Tensor, opt_name: str, guard: bool) -> None:
        # DeepSpeed owns (partitioned) gradients, clipping and the optimizer step of each engine;
        # the set-aside above cannot reach them, so tasks must use ctx.frozen() for forwards
        # through other trained models. Untested here (needs CUDA); see docs/training.md.
        engine = self.models[self.model_of_opt[opt_name]]
        if guard:
            flag = (~torch.isfinite(loss.detach()).all()).to(torch.int32).reshape(1)
            if self.world_size > 1:
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item():  # host sync: skip this micro-batch for this engine
                self._skipped = True
                self._pending_bad.pop(opt_name, None)
                return
        boundary = engine.is_gradient_accumulation_boundary()
        engine.backward(loss)
        engine.step()
        if boundary:
            self._pending_bad.pop(opt_name, None)
            model_name = self.model_of_opt[opt_name]
            if opt_name in self.schedulers:
                self.schedulers[opt_name].step()
            if model_name in self.ema:
                self.ema[model_name].update(ema_decay_at(self.state.step, self.cfg.train.ema_decay, self.cfg.train.ema_warmup))

    # --- the loop ---------------------------------------------------------------------------------

    def run(self) -> int:
        tc = self.cfg.train
        self.stop.install()
        try:
            if self.resume_from is not None:
                self._load(self.resume_from)
            else:
                self.dataset.set_epoch(0)
                _seed_all(tc.seed * self.world_size + self.rank)
            if self.is_main:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                (self.output_dir / "config.json").write_text(self._config_doc())
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.output_dir / "tb"))
                where = f"resumed from {self.resume_from} at step {self.state.step}" if self.resume_from else "fresh start"
                print(f"[xray2ct] {self._task_name()}: {where}; {self.world_size} process(es), "
                      f"{self.accelerator.distributed_type.name}, precision {self.accelerator.mixed_precision}",
                      file=sys.stderr, flush=True)
            return self._loop()
        finally:
            self.stop.uninstall()
            if self._writer is not None:
                self._writer.close()
            self._iter = None

    def _loop(self) -> int:
        from tqdm.auto import tqdm

        tc = self.cfg.train
        for m in self.models.values():
            if any(p.requires_grad for p in m.parameters()):
                m.train()
        bar = tqdm(total=tc.max_steps, initial=self.state.step, disable=not self.is_main, dynamic_ncols=True,
                   desc=self._task_name())
        self._t_log, self._step_log = time.perf_counter(), self.state.step
        self._cpu0 = time.process_time()
        deadline = time.monotonic() + 60.0 * tc.max_minutes if tc.max_minutes else None
        try:
            while self.state.step < tc.max_steps:
                self._skipped = False
                for micro in range(tc.grad_accum):
                    batch = self._next_batch()
                    self.ctx.micro_step = micro
                    with self.accelerator.accumulate(*self.trainable):
                        out = self.task.train_step(batch, self.models, self.state.step, self.ctx)
                    for k, v in (out or {}).items():
                        v = v.detach().float() if isinstance(v, torch.Tensor) else torch.tensor(float(v), device=self.device)
                        self._sums[k] = self._sums.get(k, 0) + v
                    self._count += 1
                self.state.step += 1
                bar.update(1)
                if self._skipped:
                    self.state.nonfinite_streak += 1
                    self.state.nonfinite_total += 1
                else:
                    self.state.nonfinite_streak = 0
                step = self.state.step
                if step % tc.log_every == 0 or step == tc.max_steps:
                    bar.set_postfix(self._log(), refresh=False)
                if tc.max_nonfinite and self.state.nonfinite_streak >= tc.max_nonfinite:
                    return self._stop_nonfinite()
                if tc.val_every and step % tc.val_every == 0:
                    self._validate()
                if deadline is not None and not self.stop.requested and time.monotonic() >= deadline:
                    self.stop.budget_spent(tc.max_minutes)
                stop = self.stop.agreed(self.control)  # host-only collective, every step
                due = (tc.ckpt_every and step % tc.ckpt_every == 0) or step == tc.max_steps or stop
                if due:
                    self._save_checked()
                if stop:
                    if self.is_main:
                        last = ck.read_latest(ck.checkpoint_root(self.output_dir))
                        kept = (f"checkpoint {last.name} is complete; continue with --resume latest" if last is not None
                                else "no checkpoint was written")
                        print(f"[xray2ct] stopped by {self.stop.name} after step {step}; {kept}", file=sys.stderr, flush=True)
                    return 0
            if self._last_saved != self.state.step:
                self._save_checked()
            return 0
        finally:
            bar.close()

    def _stop_nonfinite(self) -> int:
        tc = self.cfg.train
        last = ck.read_latest(ck.checkpoint_root(self.output_dir))
        if self._count:
            self._log()  # a collective when distributed: every rank logs
        if self.is_main:
            kept = f"last good checkpoint: {last}" if last else "no checkpoint was written"
            print(f"error: training stopped at step {self.state.step}: {self.state.nonfinite_streak} consecutive "
                  f"non-finite updates (train.max_nonfinite={tc.max_nonfinite}); {kept}", file=sys.stderr, flush=True)
        return 1

    def _save_checked(self) -> None:
        if self.state.nonfinite_streak > 0:
            # Weights were not stepped, but buffers updated in forward (an EMA codebook) may hold
            # NaN: never let such a state replace the last good checkpoint.
            if self.is_main:
                print(f"[xray2ct] step {self.state.step}: no checkpoint written during a non-finite streak",
                      file=sys.stderr, flush=True)
            return
        self.save()

    # --- logging / validation ------------------------------------------------------------------

    def _log(self) -> dict:
        keys = sorted(self._sums) + sorted(self._norm_sums)
        updates = max(self.state.step - self._step_log, 1)
        values: list[float] = []
        if keys:
            vec = torch.stack([torch.as_tensor(self._sums[k], device=self.device).float() / max(self._count, 1) for k in sorted(self._sums)]
                              + [torch.as_tensor(self._norm_sums[k], device=self.device).float() / self._norm_counts[k] for k in sorted(self._norm_sums)])
            if self.world_size > 1:
                vec = self.accelerator.reduce(vec, reduction="mean")
            values = vec.tolist()  # host sync: the logging step is where the loop waits for the device
        now = time.perf_counter()
        record = {"step": self.state.step, "epoch": self.state.epoch}
        record.update(dict(zip(keys, values, strict=True)))
        for n, o in self.inner_optimizers.items():
            record[f"lr/{n}"] = float(o.param_groups[0]["lr"])
        record["nonfinite_total"] = self.state.nonfinite_total
        # CPU seconds of this process (all its threads) since this invocation's loop began: what a
        # step costs independent of how busy the machine is (wall time is not).
        record["cpu_s"] = round(time.process_time() - getattr(self, "_cpu0", time.process_time()), 3)
        record["samples_per_s"] = (updates * self.cfg.train.batch_size * self.cfg.train.grad_accum * self.world_size
                                   / max(now - self._t_log, 1e-9))
        self._sums, self._norm_sums, self._norm_counts, self._count = {}, {}, {}, 0
        self._t_log, self._step_log = now, self.state.step
        if self.is_main:
            for k, v in record.items():
                if k not in ("step",):
                    self._writer.add_scalar(k, v, self.state.step)
            with open(self.output_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        return {k: f"{v:.4g}" for k, v in record.items() if k in ("loss",) or k.endswith("loss")}

    def _validate(self) -> None:
        fn = getattr(self.task, "validate", None)
        if fn is None:
            return
        modes = {n: m.training for n, m in self.unwrapped.items()}
        for m in self.unwrapped.values():
            m.eval()
        try:
            with torch.no_grad():
                result = fn(self.unwrapped, self.state.step, self.ctx) or {}
        finally:
            for n, m in self.unwrapped.items():
                m.train(modes[n])
        if not self.is_main:
            return
        scalars = {}
        for k, v in result.items():
            if isinstance(v, torch.Tensor) and v.dim() >= 2:
                self._writer.add_image(f"val/{k}", v.detach().float().cpu(), self.state.step,
                                       dataformats="HW" if v.dim() == 2 else "CHW")
            else:
                scalars[f"val/{k}"] = float(v)
                self._writer.add_scalar(f"val/{k}", scalars[f"val/{k}"], self.state.step)
        if scalars:  # for scripts, beside metrics.jsonl (one line per validation)
            with open(self.output_dir / "val_metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": self.state.step, **scalars}) + "\n")

    # --- checkpoints -------------------------------------------------------------------------------

    def _task_name(self) -> str:
        return str(getattr(self.task, "name", self.task_ref))

    def _config_doc(self) -> str:
        return json.dumps({"task": self._task_name(), "task_ref": self.task_ref, "preset": self.preset,
                           "store": str(self.store), "config": config_to_dict(self.cfg)}, indent=2) + "\n"

    def _saveables(self) -> ck.Saveables:
        ds = self.deepspeed
        return ck.Saveables(
            models=self.unwrapped, optimizers=self.inner_optimizers, model_of_optimizer=self.model_of_opt,
            schedulers=self.schedulers, ema=self.ema, scaler=self.accelerator.scaler, task=self.task,
            generators={"task": self.generator},
            deepspeed_engines={o: self.models[m] for o, m in self.model_of_opt.items()} if ds else None,
            full_model_state=(lambda name: self.accelerator.get_state_dict(self.models[name])) if ds else None,
        )

    def save(self) -> Path | None:
        """Write a checkpoint of the current step (a collective: every rank calls it)."""
        if self._last_saved == self.state.step:
            return None
        meta = {
            **asdict(self.state), "world_size": self.world_size, "distributed_type": self.accelerator.distributed_type.name,
            "task": self._task_name(), "task_ref": self.task_ref, "preset": self.preset, "data": self._data_state(),
        }
        final = ck.save_checkpoint(
            ck.checkpoint_root(self.output_dir), self.state.step, self._saveables(), rank=self.rank,
            is_main=self.is_main, control=self.control, keep_last=self.cfg.train.keep_last, meta=meta,
            data_state=self._data_state(), config_doc=self._config_doc(),
        )
        self._last_saved = self.state.step
        return final

    def _load(self, ckpt: Path) -> None:
        meta, mine = ck.load_checkpoint(ckpt, self._saveables(), rank=self.rank, world_size=self.world_size)
        self.state = EngineState(**{k: int(meta[k]) for k in EngineState.__dataclass_fields__})
        self._last_saved = self.state.step
        data = dict(meta["data"])
        if mine is None:
            # More processes than wrote the checkpoint: fresh random streams for the new ranks.
            seed = (self.cfg.train.seed * self.world_size + self.rank) * 1_000_003 + self.state.step
            _seed_all(seed % (2**32))
            self.generator.manual_seed(seed)
        else:
            data = dict(mine["data"])
        data.update(epoch=self.state.epoch, position=self.state.position)
        self.dataset.load_state_dict(data)
        if meta["world_size"] != self.world_size and self.is_main:
            print(f"[xray2ct] checkpoint written by {meta['world_size']} process(es), resuming on {self.world_size}: "
                  "the sample sequence continues; per-rank random streams restart", file=sys.stderr, flush=True)
