"""Checkpoints: safetensors + JSON only, written aside and published atomically.

Layout of one checkpoint (``D/checkpoints/step-<N>/``)::

    meta.json                       step, epoch, data position, non-finite counters, world size,
                                    what the directory holds (written last)
    config.json                     the resolved run config
    models/<name>.safetensors       full state dict of each model (params + buffers)
    ema/<name>.safetensors          EMA params + the model's buffers (a loadable state dict)
    optim/<name>.{safetensors,json} optimizer state keyed by parameter name (not by index)
    sched/<name>.json               LR scheduler state
    scaler.{safetensors,json}       grad scaler state (only with fp16 mixed precision)
    extra.{safetensors,json}        the task's extras (codebook init state, latent scale, ...)
    rank-<r>.{safetensors,json}     per rank: RNG states (torch CPU/CUDA, numpy, random, the
                                    task generator) and the data position

Nothing here is ever unpickled. Tensors go to safetensors; everything else is JSON. A nested
state (an optimizer's ``state_dict``) is split by :func:`flatten_state` into ``path -> tensor``
plus a JSON skeleton that holds the structure and the plain values.

Distributed state is gathered to *full* tensors (``torch.distributed.checkpoint.state_dict``
with ``full_state_dict=True``) and written once by rank 0, while every rank writes its own
``rank-<r>`` file. Why full tensors and not per-rank shards: the models of this project are
≤ a few GB, a full-state checkpoint loads into any process count (2 → 1, 1 → 2, FSDP ↔ DDP ↔
one process) and straight into export/sampling, and it needs no pickled metadata
(``torch.distributed.checkpoint``'s ``.metadata`` file is a pickle). The price is rank 0's
host memory during a save (model + optimizer state once) — fine up to a few GB of parameters.

Publishing: files are written into ``checkpoints/.tmp-step-<N>-<token>/``, fsynced, the
directory renamed to ``step-<N>`` and ``checkpoints/latest`` (a one-line text file naming the
directory) replaced through a rename. A process killed at any point leaves the previous
checkpoint and ``latest`` intact; ``<token>`` names the writer (:mod:`patching.data.staging`), so
the next save removes stale ``.tmp-*`` directories and never a live writer's. A write the file
system refuses on any rank removes the staging directory on every rank's agreement and raises
one :class:`~patching.errors.StorageError` line (docs/reliability.md).
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from patching.artifacts.format import CHECKPOINT_FORMAT as FORMAT
from patching.artifacts.format import CHECKPOINT_VERSION as VERSION
from patching.artifacts.format import LATEST, pointed_checkpoint, read_checkpoint_meta, step_name
from patching.artifacts.format import STEP_RE as _STEP_RE
from patching.data.staging import clean_stale, host_id, owner_tag
from patching.errors import InputError, StorageError

# What load_checkpoint reads from meta.json (read_checkpoint_meta adds format, version, step).
RESUME_KEYS: dict[str, Any] = {
    "models": list, "optimizers": dict, "schedulers": list, "world_size": int, "data": dict,
    "epoch": int, "position": int, "nonfinite_streak": int, "nonfinite_total": int,
}
# Testing knob: seconds to sleep after each file a checkpoint writer closes, so a test can
# kill the process in the middle of a write. Never set in production.
from .state_io import (  # noqa: E402,F401  (the file primitives, re-exported)
    WRITE_DELAY_ENV,
    flatten_state,
    load_json,
    load_state,
    load_tensors,
    save_json,
    save_state,
    save_tensors,
    unflatten_state,
)

# --- RNG ------------------------------------------------------------------------------------------


def capture_rng(generators: dict[str, torch.Generator] | None = None) -> dict:
    """This process's RNG states: torch CPU, every CUDA device, numpy, ``random``, named generators."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": [int(k) for k in np_state[1]], "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss_next": py_state[2]},
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng(state: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:  # another machine shape: keep what applies to this process's device
            torch.cuda.set_rng_state(cuda[min(torch.cuda.current_device(), len(cuda) - 1)])
    for name, g in (generators or {}).items():
        if name in state.get("generators", {}):
            g.set_state(state["generators"][name])


# --- model and optimizer state (plain, DDP-inner or FSDP2-sharded modules) -----------------------


def _sd_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kw)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def gather_model_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU state dict of ``module``. A collective under FSDP: call it on every rank.

    Under ``torch.distributed``, ranks other than 0 get an empty dict (they write nothing).
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_sd_options(full_state_dict=True, cpu_offload=True))


def gather_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Full CPU optimizer state keyed by parameter name (FQN in ``module``); rank 0 only."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer, options=_sd_options(full_state_dict=True, cpu_offload=True))


def load_model_state(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str | os.PathLike | None = None) -> None:
    """Load a full state dict on every rank; FSDP shards are cut locally from the full tensors.

    A checkpoint of another architecture (keys or shapes differ) is an :class:`InputError`.
    """
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    try:
        set_model_state_dict(module, state, options=_sd_options(full_state_dict=True, strict=True))
    except (RuntimeError, KeyError) as err:
        detail = " ".join(str(err).split())
        raise InputError(source, f"checkpoint does not match the model: {detail[:300]}") from None


def load_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, state, options=_sd_options(full_state_dict=True))
    # The loader turns tuples (Adam's betas) into lists; give back the saved types so a resumed
    # optimizer's param_groups equal the original ones exactly.
    for group, saved in zip(optimizer.param_groups, state.get("param_groups", []), strict=False):
        for key, value in saved.items():
            if key != "params" and isinstance(value, tuple) and isinstance(group.get(key), list):
                group[key] = tuple(group[key])


# --- layout, atomic publish, retention -----------------------------------------------------------


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def is_checkpoint(path: Path) -> bool:
    return (path / "meta.json").is_file()


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Published checkpoints under ``root`` as ``(step, path)``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def read_latest(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint: what ``latest`` names, else the highest complete step."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        name = pointer.read_text().strip()
        if _STEP_RE.match(name) and is_checkpoint(root / name):
            return root / name
    complete = [p for _, p in list_checkpoints(root) if is_checkpoint(p)]
    return complete[-1] if complete else None


def holds_checkpoints(root: str | os.PathLike) -> bool:
    """Whether a ``checkpoints/`` root has a ``latest`` pointer or any ``step-<N>`` directory."""
    root = Path(root)
    return (root / LATEST).is_file() or bool(list_checkpoints(root))


def resolve_checkpoint(path: str | os.PathLike, source: str = "--resume") -> Path:
    """A checkpoint directory from a path naming it, its ``latest`` pointer, a ``checkpoints/``
    root or an output dir (``--resume``; an export holds no optimizer state to resume)."""
    p = Path(path)
    if (p / "meta.json").exists():
        read_meta(p)
        return p
    if p.name == LATEST and p.is_file():  # the pointer file itself
        return pointed_checkpoint(p.parent)
    for root in (p, checkpoint_root(p)):
        if root.is_dir() and holds_checkpoints(root):
            return pointed_checkpoint(root)
    if not p.exists():
        raise InputError(source, f"{p}: no such file or directory")
    raise InputError(source, f"{p}: not a checkpoint (no meta.json) and holds no checkpoints")


def resolve_resume(output_dir: str | os.PathLike, resume: str | None) -> Path | None:
    """What ``--resume`` means for a run writing into ``output_dir``.

    ``None``: a fresh run, refused when ``output_dir`` already holds checkpoints (a new run
    would rotate them away). ``latest``: the checkpoint ``latest`` names (else the newest
    ``step-<N>``), or a fresh start when the run has none at all (so a preemptible job can
    always pass ``--resume latest``); a named checkpoint that cannot be used is an error.
    Anything else: a checkpoint path (see :func:`resolve_checkpoint`).
    """
    root = checkpoint_root(output_dir)
    if Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise InputError("--output-dir", f"{output_dir} exists and is not a directory")
    if resume is None:
        if holds_checkpoints(root):
            existing = read_latest(root)
            what = f"latest {existing.name}" if existing is not None else "none of them complete"
            raise InputError(
                "--output-dir",
                f"{output_dir} already holds checkpoints ({what}); "
                "pass --resume latest to continue or choose another --output-dir",
            )
        return None
    if resume == "latest":
        return pointed_checkpoint(root) if root.is_dir() else None
    return resolve_checkpoint(resume)


def staging_dir(root: Path, step: int, token: str) -> Path:
    return root / f".tmp-step-{step}-{token}"


def staging_token(nonce: int, pid: int, host: int) -> str:
    """The suffix of a staging directory: unique, and naming its writer (rank 0's pid and host,
    :func:`patching.data.staging.owner_tag`) so a later writer can tell its own or a dead process's
    leftovers from a live writer's."""
    return f"{nonce:012x}{owner_tag(pid, host)}"


def clean_stale_staging(root: Path, current: Path | None = None) -> list[Path]:
    """Remove the ``.tmp-step-*`` / ``.trash-*`` directories under ``root`` that no live writer
    owns (:func:`patching.data.staging.is_stale`: this process's failed attempts, dead writers')."""
    return clean_stale(root, lambda n: n.startswith((".tmp-step-", ".trash-")), keep=current)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            _fsync(Path(dirpath) / name)
        _fsync(Path(dirpath))


def publish(root: Path, staging: Path, step: int, keep_last: int) -> Path:
    """Make ``staging`` the checkpoint ``step-<step>`` and point ``latest`` at it (rank 0 only).

    Order: fsync the files, rename the directory, fsync the parent, write ``latest`` through a
    temporary file and ``os.replace``, then delete what falls out of the last ``keep_last``.
    """
    final = root / step_name(step)
    _fsync_tree(staging)
    if final.exists():  # the same step saved again (e.g. a resumed run stopped at once)
        trash = root / f".trash-{final.name}-{staging.name.rsplit('-', 1)[-1]}"
        os.rename(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.rename(staging, final)
    _fsync(root)
    tmp = root / f".{LATEST}.{staging.name.rsplit('-', 1)[-1]}"
    try:
        tmp.write_text(final.name + "\n")
        _fsync(tmp)
        os.replace(tmp, root / LATEST)
    except OSError:
        tmp.unlink(missing_ok=True)  # `latest` still names the previous checkpoint
        raise
    _fsync(root)
    prune(root, keep_last, protect=(final,))
    return final


def prune(root: Path, keep_last: int, protect: Iterable[Path] = ()) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints and the stale ``.tmp-*`` directories
    (:func:`clean_stale_staging`: never a live writer's)."""
    protect = {p.resolve() for p in protect}
    removed = []
    published = list_checkpoints(root)
    for _, p in published[:-keep_last] if keep_last > 0 else published:
        if p.resolve() not in protect:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    removed.extend(clean_stale_staging(root))
    return removed


def read_meta(ckpt: Path, keys: dict[str, Any] | None = None) -> dict:
    """``meta.json`` of ``ckpt``, validated (:func:`patching.artifacts.format.read_checkpoint_meta`:
    an object, format marker, version, step agreeing with the directory, safe model names, and
    ``keys``); bad metadata is a one-line :class:`InputError`."""
    return read_checkpoint_meta(ckpt, keys)


# --- the training state: one registry of what a checkpoint holds --------------------------------


@dataclass
class Saveables:
    """Everything a training checkpoint holds, by role; :func:`save_checkpoint` and
    :func:`load_checkpoint` walk this registry and nothing else.

    ``models`` are the unwrapped modules (plain, DDP's inner module, or FSDP2-sharded);
    ``optimizers`` the torch optimizers by name, ``model_of_optimizer`` which model each one
    trains; ``ema`` maps a model name to an object with ``full_state()``/``load_full()``;
    ``task`` may have ``extra_state()``/``load_extra_state()``; ``generators`` are saved per
    rank with the global RNGs. Under DeepSpeed, ``deepspeed_engines`` (optimizer name → engine)
    and ``full_model_state`` (gathers ZeRO-3 weights) replace the torch paths.
    """

    models: dict[str, torch.nn.Module]
    optimizers: dict[str, Any]
    model_of_optimizer: dict[str, str]
    schedulers: dict[str, Any] = field(default_factory=dict)
    ema: dict[str, Any] = field(default_factory=dict)
    scaler: Any = None
    task: Any = None
    generators: dict[str, torch.Generator] = field(default_factory=dict)
    deepspeed_engines: dict[str, Any] | None = None
    full_model_state: Callable[[str], dict] | None = None


def save_checkpoint(root: Path, step: int, s: Saveables, *, rank: int, is_main: bool, control: Any, keep_last: int,
                    meta: dict, data_state: dict, config_doc: str) -> Path | None:
    """Write ``root/step-<step>`` — a collective: every rank calls it in the same order.

    ``control`` gives host-side ``broadcast``/``barrier`` (:class:`launch.signals.ControlGroup`).
    Gathers run on every rank (FSDP all-gathers); rank 0 writes the shared files, every rank
    its ``rank-<r>`` file; rank 0 writes ``meta.json`` last and publishes. Returns the
    published path on rank 0, ``None`` elsewhere.
    """
    # secrets, not random: the `random` module's state is part of the checkpoint.
    nonce = control.broadcast(secrets.randbits(48) if is_main else 0)
    pid, host = control.broadcast(os.getpid() if is_main else 0), control.broadcast(host_id() if is_main else 0)
    staging = staging_dir(root, step, staging_token(nonce, pid, host))
    attempt = _Attempt()
    try:
        if is_main:
            attempt(clean_stale_staging, root)  # this process's failed attempts, dead writers' leftovers
            for sub in ("models", "ema", "optim", "sched"):
                attempt(lambda sub=sub: (staging / sub).mkdir(parents=True, exist_ok=True))
        control.barrier()
        for name, module in s.models.items():
            trained = name in s.model_of_optimizer.values()
            sd = s.full_model_state(name) if (s.full_model_state and trained) else gather_model_state(module)
            md = {"model": name, "step": str(step)}
            if is_main:
                attempt(save_tensors, staging / "models" / f"{name}.safetensors", sd, metadata=md)
            if name in s.ema:
                ema_sd = s.ema[name].full_state()  # a collective for sharded parameters
                if is_main:
                    attempt(save_tensors, staging / "ema" / f"{name}.safetensors", {**sd, **ema_sd}, metadata=md)
        for opt_name, opt in s.optimizers.items():
            if s.deepspeed_engines is not None:
                attempt(save_deepspeed_optimizer, staging / "optim" / f"{opt_name}.rank-{rank}", s.deepspeed_engines[opt_name])
                continue
            osd = gather_optimizer_state(s.models[s.model_of_optimizer[opt_name]], opt)
            if is_main:
                attempt(save_state, staging / "optim" / opt_name, osd)
        if is_main:
            for name, sched in s.schedulers.items():
                attempt(save_state, staging / "sched" / name, sched.state_dict())
            if s.scaler is not None:
                attempt(save_state, staging / "scaler", s.scaler.state_dict())
            if hasattr(s.task, "extra_state"):
                attempt(save_state, staging / "extra", s.task.extra_state())
            attempt((staging / "config.json").write_text, config_doc)
        attempt(save_state, staging / f"rank-{rank}", {"rank": rank, "rng": capture_rng(s.generators), "data": data_state})
        # Every rank learns whether any rank's write failed (before meta.json makes the
        # checkpoint complete, and again after the publish), so all raise together and no rank
        # is left waiting in a collective.
        failed = control.max(1 if attempt.error is not None else 0)
        final = None
        if is_main and not failed:
            attempt(save_json, staging / "meta.json", {
                "format": FORMAT, "version": VERSION, **meta, "step": step,
                "models": sorted(s.models), "optimizers": dict(s.model_of_optimizer), "schedulers": sorted(s.schedulers),
                "ema": sorted(s.ema), "scaler": s.scaler is not None, "extra": hasattr(s.task, "extra_state"),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            })
            if attempt.error is None:
                attempt(lambda: publish(root, staging, step, keep_last))
                final = root / step_name(step) if attempt.error is None else None
        if failed or control.max(1 if attempt.error is not None else 0):
            if is_main and staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
            control.barrier()
            kept = read_latest(root)  # a shared file system: every rank reads the same
            after = f"{LATEST} is still {kept.name}" if kept is not None else "no earlier checkpoint"
            err = attempt.error or OSError(0, "a write failed on another rank")
            raise StorageError.from_os(staging.parent / step_name(step), "could not write the checkpoint", err, after)
        control.barrier()
        return final
    except BaseException:
        # Not a write error (an interrupt, a bug): remove what this attempt wrote, then re-raise.
        if is_main and staging.exists() and not isinstance(sys.exc_info()[1], StorageError):
            shutil.rmtree(staging, ignore_errors=True)
        raise


class _Attempt:
    """Runs the writes of one checkpoint, keeping the first ``OSError`` (disk full, read-only)
    and skipping the writes after it, so every rank still reaches every collective."""

    def __init__(self) -> None:
        self.error: OSError | None = None

    def __call__(self, fn: Callable, *args, **kwargs) -> None:
        if self.error is None:
            try:
                fn(*args, **kwargs)
            except OSError as err:
                self.error = err


def load_checkpoint(ckpt: Path, s: Saveables, *, rank: int, world_size: int) -> tuple[dict, dict | None]:
    """Load ``ckpt`` into the registry on every rank.

    Returns ``(meta, mine)``: ``mine`` is this rank's ``{"rng", "data"}`` (its RNG states are
    already restored) or ``None`` when the checkpoint was written by fewer processes.
    """
    meta = read_meta(ckpt, RESUME_KEYS)
    if meta["models"] != sorted(s.models) or set(meta["optimizers"]) != set(s.optimizers):
        raise InputError(ckpt / "meta.json", f"holds models {meta['models']} and optimizers {sorted(meta['optimizers'])}; "
                                             f"this task has {sorted(s.models)} and {sorted(s.optimizers)}")
    for name, module in s.models.items():
        path = ckpt / "models" / f"{name}.safetensors"
        sd = load_tensors(path)
        if s.deepspeed_engines is not None:
            module.load_state_dict(sd)
        else:
            load_model_state(module, sd, source=path)
        if name in s.ema:
            ema_path = ckpt / "ema" / f"{name}.safetensors"
            s.ema[name].load_full(load_tensors(ema_path) if ema_path.is_file() else sd)  # EMA new at resume: the weights
    for opt_name, opt in s.optimizers.items():
        if s.deepspeed_engines is not None:
            if meta["world_size"] != world_size:
                raise InputError(ckpt, f"DeepSpeed optimizer partitions were written by {meta['world_size']} processes; "
                                       f"resume on as many (not {world_size})")
            load_deepspeed_optimizer(ckpt / "optim" / f"{opt_name}.rank-{rank}", s.deepspeed_engines[opt_name])
            continue
        load_optimizer_state(s.models[s.model_of_optimizer[opt_name]], opt, load_state(ckpt / "optim" / opt_name))
    for name, sched in s.schedulers.items():
        sched.load_state_dict(load_state(ckpt / "sched" / name))
    if s.scaler is not None and (ckpt / "scaler.json").is_file():
        s.scaler.load_state_dict(load_state(ckpt / "scaler"))
    if hasattr(s.task, "load_extra_state") and (ckpt / "extra.json").is_file():
        s.task.load_extra_state(load_state(ckpt / "extra"))
    mine = None
    if (ckpt / f"rank-{rank}.json").is_file():
        mine = load_state(ckpt / f"rank-{rank}")
        restore_rng(mine["rng"], s.generators)
    return meta, mine


def save_deepspeed_optimizer(stem: Path, engine: Any) -> None:
    # Each ZeRO rank owns a partition of the optimizer state: every rank writes its own, as
    # safetensors + JSON. Top-level entries that are objects (DeepSpeed's loss scaler) are not
    # stored; loading takes them from the live optimizer. Not exercised on CPU (see docs).
    state = engine.optimizer.state_dict()
    kept, dropped = {}, []
    for key, value in state.items():
        try:
            flatten_state(value)
            kept[key] = value
        except TypeError:
            dropped.append(key)
    save_state(stem, {"state": kept, "dropped": dropped})


def load_deepspeed_optimizer(stem: Path, engine: Any) -> None:
    doc = load_state(stem)
    state = dict(doc["state"])
    live = engine.optimizer.state_dict()
    for key in doc["dropped"]:
        state[key] = live[key]
    # ZeRO takes one state per data-parallel rank and reads its own (same process count);
    # the fp32 master weights come from the saved partitions, not from the bf16 module.
    world = torch.distributed.get_world_size() if _distributed() else 1
    engine.optimizer.load_state_dict([state] * world, load_from_fp32_weights=True)
