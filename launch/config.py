"""Typed training configuration and ``--set key=value`` overrides.

The engine owns :class:`TrainConfig` (the ``train.`` section). A task owns its own config
dataclass (sections such as ``model.``, ``loss.``, ``data.``); the engine derives a *run config*
class from it that adds the ``train`` section (:func:`run_config_class`), so task code reads
``cfg.model.channels`` and ``cfg.train.lr`` from one object and one ``--set`` syntax reaches both.

Overrides rebuild the whole tree from plain data (:func:`config_to_dict` →
edit → :func:`config_from_dict`), so every nested dataclass is a fresh object and every
``__post_init__`` runs again — ``dataclasses.replace`` would copy only the top level and skip
the nested checks.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Union

from patching.artifacts.format import _hints, _plain, config_from_dict, config_to_dict  # noqa: F401  (re-exported)
from patching.errors import InputError

from .schedules import LR_DECAYS

MIXED_PRECISION = ("auto", "no", "bf16")


@dataclass
class TrainConfig:
    """How a task is trained: the engine's section of every run config (``train.*``).

    Args:
        lr: base learning rate; tasks read it when they build their optimizers.
        max_steps: optimizer steps to run in total (a resumed run stops at the same number).
        batch_size: samples per micro-batch on each process.
        grad_accum: micro-batches accumulated per optimizer step.
        clip_grad: gradient-norm clip per optimizer; 0 disables clipping (the norm is still
            computed, it is what the non-finite guard checks).
        ema_decay: decay of the weight EMA of the task's ``ema_models``; 0 disables EMA.
        log_every: steps between logged scalars. Logging steps are the only host syncs of the
            loop, apart from the non-finite guard (see ``max_nonfinite``).
        ckpt_every: steps between checkpoints; 0 writes one only at the end (and on SIGTERM).
        keep_last: number of published checkpoints kept (older ones are deleted).
        seed: base seed. Models are initialised from it on every rank; rank ``r`` of ``W``
            then trains with ``seed * W + r``; the data order depends on ``seed`` only.
        max_nonfinite: consecutive non-finite steps that stop the run (exit status 1). Each
            optimizer update costs one device→host read of a finiteness flag; 0 disables the
            guard and that read (non-finite updates are then applied like any other).
        num_workers: DataLoader worker processes per rank.
        val_every: steps between calls of the task's ``validate``; 0 never.
        mixed_precision: ``auto`` (bf16 on CUDA, none on CPU), ``no`` or ``bf16``.
        split: dataset split trained on.
        max_minutes: wall-clock budget of this invocation in minutes; 0 = none. When it is
            spent the run stops after the current step with a checkpoint, exactly as on
            SIGTERM (``--resume latest`` continues it). The steps reached then depend on the
            machine's speed and load; ``max_steps`` alone gives the same run everywhere.
        warmup_steps: linear learning-rate warm-up over this many steps (0: none).
        lr_decay: ``none``, ``cosine`` or ``linear`` decay from the base rate after warm-up to
            10 % of it at ``max_steps`` (:func:`launch.schedules.lr_factor`). Applied by the
            engine to every optimizer the task gives no scheduler of its own.
        ema_warmup: EMA decay ``min(ema_decay, (1 + step) / (10 + step))`` instead of a fixed
            ``ema_decay`` (:func:`launch.schedules.ema_decay_at`).
    """

    lr: float = 1e-4
    max_steps: int = 1000
    batch_size: int = 1
    grad_accum: int = 1
    clip_grad: float = 1.0
    ema_decay: float = 0.999
    log_every: int = 10
    ckpt_every: int = 500
    keep_last: int = 3
    seed: int = 0
    max_nonfinite: int = 5
    num_workers: int = 2
    val_every: int = 0
    mixed_precision: str = "auto"
    split: str = "train"
    max_minutes: float = 0.0
    warmup_steps: int = 0
    lr_decay: str = "none"
    ema_warmup: bool = False

    def __post_init__(self) -> None:
        def need(ok: bool, key: str, what: str) -> None:
            if not ok:
                raise InputError(f"train.{key}", f"{what}, got {getattr(self, key)!r}")

        need(math.isfinite(self.lr) and self.lr > 0, "lr", "must be a positive number")
        need(self.max_steps >= 0, "max_steps", "must be >= 0")
        need(self.batch_size >= 1, "batch_size", "must be >= 1")
        need(self.grad_accum >= 1, "grad_accum", "must be >= 1")
        need(self.clip_grad >= 0 and not math.isnan(self.clip_grad), "clip_grad", "must be >= 0 (0 disables)")
        need(0.0 <= self.ema_decay < 1.0, "ema_decay", "must be in [0, 1) (0 disables)")
        need(self.log_every >= 1, "log_every", "must be >= 1")
        need(self.ckpt_every >= 0, "ckpt_every", "must be >= 0 (0: only at the end)")
        need(self.keep_last >= 1, "keep_last", "must be >= 1")
        need(self.seed >= 0, "seed", "must be >= 0")
        need(self.max_nonfinite >= 0, "max_nonfinite", "must be >= 0 (0 disables the guard)")
        need(self.num_workers >= 0, "num_workers", "must be >= 0")
        need(self.val_every >= 0, "val_every", "must be >= 0")
        need(self.mixed_precision in MIXED_PRECISION, "mixed_precision", f"must be one of {', '.join(MIXED_PRECISION)}")
        need(bool(self.split), "split", "must not be empty")
        need(math.isfinite(self.max_minutes) and self.max_minutes >= 0, "max_minutes", "must be >= 0 (0: no budget)")
        need(isinstance(self.warmup_steps, int) and self.warmup_steps >= 0, "warmup_steps", "must be an integer >= 0")
        need(self.lr_decay in LR_DECAYS, "lr_decay", f"must be one of {', '.join(LR_DECAYS)}")


# --- the run config: a task config plus the engine's `train` section --------------------------

_RUN_CLASSES: dict[type, type] = {}


def run_config_class(task_config_cls: type) -> type:
    """The dataclass a run uses: ``task_config_cls`` plus a ``train: TrainConfig`` field.

    It subclasses the task's class, so ``isinstance(cfg, TaskConfig)`` holds, the task's
    ``__post_init__`` runs, and task code reads ``cfg.train.*`` beside its own sections.
    Datasets should copy the values they need rather than keep ``cfg``: the class is made at
    run time and cannot be pickled into a *spawned* DataLoader worker (fork, Linux's default,
    is fine).
    """
    if not (isinstance(task_config_cls, type) and is_dataclass(task_config_cls)):
        raise TypeError(f"a task config must be a dataclass type, got {task_config_cls!r}")
    if task_config_cls in _RUN_CLASSES:
        return _RUN_CLASSES[task_config_cls]
    names = {f.name for f in fields(task_config_cls)}
    if "train" in names:
        raise TypeError(f"{task_config_cls.__name__} has a 'train' field; that section belongs to the engine")
    missing = [f.name for f in fields(task_config_cls) if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise TypeError(f"{task_config_cls.__name__} fields need defaults: {', '.join(missing)}")
    frozen = task_config_cls.__dataclass_params__.frozen  # type: ignore[attr-defined]
    cls = dataclasses.make_dataclass(
        f"{task_config_cls.__name__}Run",
        [("train", TrainConfig, field(default_factory=TrainConfig))],
        bases=(task_config_cls,),
        frozen=frozen,
        namespace={"__doc__": f"{task_config_cls.__name__} plus the engine's train section."},
    )
    cls.__module__ = __name__
    _RUN_CLASSES[task_config_cls] = cls
    return cls


def make_run_config(task_cfg: Any, train: TrainConfig) -> Any:
    """Combine a task config instance and a :class:`TrainConfig` into a run config."""
    cls = run_config_class(type(task_cfg))
    data = config_to_dict(task_cfg)
    data["train"] = config_to_dict(train)
    return config_from_dict(cls, data)


def task_part(run_cfg: Any) -> dict:
    """The task's sections of a run config as plain data (everything but ``train``)."""
    data = config_to_dict(run_cfg)
    data.pop("train", None)
    return data


# --- --set key=value ---------------------------------------------------------------------------


def apply_overrides(cfg: Any, overrides: list[str] | tuple[str, ...], source: str = "--set") -> Any:
    """A copy of ``cfg`` with ``key.path=value`` strings applied; ``cfg`` itself is untouched.

    Values are parsed by the field's annotation: ``int``, ``float`` (``1e-4``, ``inf``), ``bool``
    (``true/false/1/0/yes/no/on/off``), ``str``, ``X | None`` (``none``/``null``), ``Literal``,
    tuples and lists (``64,64,32`` or JSON ``[64, 64, 32]``). Unknown keys and unparsable
    values raise :class:`InputError` naming the key; each nested ``__post_init__`` checks the
    result.
    """
    data = config_to_dict(cfg)
    cls = type(cfg)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise InputError(source, f"expected key=value, got {item!r}")
        node, node_cls = data, cls
        parts = key.split(".")
        for i, part in enumerate(parts):
            hints = _hints(node_cls)
            names = [f.name for f in fields(node_cls)]
            if part not in names:
                where = ".".join(parts[:i]) or "the top level"
                raise InputError(source, f"unknown key {key!r}: no {part!r} in {where}; known: {', '.join(names)}")
            tp = hints[part]
            last = i == len(parts) - 1
            if isinstance(tp, type) and is_dataclass(tp):
                if last:
                    raise InputError(source, f"{key!r} is a section; set one of its fields, e.g. {key}.{fields(tp)[0].name}=...")
                node, node_cls = node[part], tp
                continue
            if not last:
                raise InputError(source, f"unknown key {key!r}: {'.'.join(parts[: i + 1])} is not a section")
            node[part] = _plain(parse_value(tp, text.strip(), key))
    try:
        return config_from_dict(cls, data)
    except InputError as err:
        raise InputError(source, str(err)) from None


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def parse_value(tp: Any, text: str, key: str) -> Any:
    """Parse the command-line ``text`` for a field annotated ``tp``."""
    origin = typing.get_origin(tp)
    bad = InputError("--set", f"{key}={text!r}: expected {_type_name(tp)}")
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if type(None) in typing.get_args(tp) and text.lower() in ("none", "null"):
            return None
        for arg in args:
            try:
                return parse_value(arg, text, key)
            except InputError:
                continue
        raise bad
    if origin is Literal:
        for choice in typing.get_args(tp):
            if str(choice) == text:
                return choice
        raise InputError("--set", f"{key}={text!r}: must be one of {', '.join(map(str, typing.get_args(tp)))}")
    if origin in (tuple, list):
        if text.startswith("["):
            try:
                items = json.loads(text)
            except json.JSONDecodeError:
                raise bad from None
            if not isinstance(items, list):
                raise bad
            texts = [json.dumps(x) if not isinstance(x, str) else x for x in items]
        else:
            stripped = text.strip("()")
            texts = [t.strip() for t in stripped.split(",")] if stripped.strip() else []
        args = typing.get_args(tp)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(texts) != len(args):
                raise InputError("--set", f"{key}={text!r}: expected {len(args)} comma-separated values")
            values = [parse_value(a, t, key) for a, t in zip(args, texts, strict=True)]
        else:
            item_tp = args[0] if args else str
            values = [parse_value(item_tp, t, key) for t in texts]
        return tuple(values) if origin is tuple else values
    if tp is bool:
        low = text.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise bad
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise bad from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise bad from None
    if tp is str or tp is Any:
        return text
    if isinstance(tp, type) and issubclass(tp, os.PathLike):
        return Path(text)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for member in tp:
            if str(member.value) == text or member.name == text:
                return member
        raise InputError("--set", f"{key}={text!r}: must be one of {', '.join(str(m.value) for m in tp)}")
    raise InputError("--set", f"{key}: fields of type {_type_name(tp)} cannot be set from the command line")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def config_json(cfg: Any) -> str:
    """The resolved config as indented JSON (what is written beside every checkpoint)."""
    return json.dumps(config_to_dict(cfg), indent=2, sort_keys=False)
