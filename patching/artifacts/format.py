"""The model artifact format, in one module of the lowest layer that needs it (see docs/architecture.md).

Layouts (``launch`` writes them through the names defined here; every stage reads them here,
without importing ``launch``; nothing is ever unpickled)::

    D/checkpoints/step-<N>/      a checkpoint (launch/checkpoint.py): meta.json, config.json (the
                                 resolved run config), models/<m>.safetensors, ema/<m>.safetensors,
                                 extra.{json,safetensors}, optimizer/RNG state
    D/checkpoints/latest         names the newest step-<N>
    EXPORT/config.json           an export (launch/export.py): format, task, preset, step, the run
                                 config, data spec; which folder or file holds each model's weights
    EXPORT/<network>/            one diffusers-style folder per network: config.json +
                                 diffusion_pytorch_model.safetensors (``Class.from_pretrained``)
    EXPORT/extra.{json,...}      the pipeline's settings (latent scale factor, VQ-GAN reference, ...)

Every weights path a user gives resolves the same way (:func:`resolve_weights`): a run
directory ``D``, ``D/checkpoints``, the ``latest`` pointer, a ``step-N`` directory or an export.
The EMA weights are used when the run kept them (:func:`model_state`). Saved configs are decoded
one way, strictly and typed (:func:`config_from_dict`, :func:`read_config`).
"""

from __future__ import annotations

import enum
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Union

from patching.checks import check_keys, child_path, is_safe_name, read_json_doc, safe_name
from patching.errors import InputError


def config_to_dict(cfg: Any) -> dict:
    """A dataclass tree as JSON-ready data (tuples → lists, paths → strings)."""
    if not is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"expected a dataclass instance, got {type(cfg).__name__}")
    return {f.name: _plain(getattr(cfg, f.name)) for f in fields(cfg)}


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return config_to_dict(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, enum.Enum):
        return value.value
    return value


def config_from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build ``cls`` from plain data, strictly: unknown keys are an :class:`InputError`."""
    if not isinstance(data, dict):
        raise InputError(where or "config", f"expected a mapping, got {type(data).__name__}")
    hints = _hints(cls)
    known = {f.name: f for f in fields(cls) if f.init}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise InputError(_join(where, unknown[0]), f"unknown key; known keys: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, _join(where, name))
    try:
        return cls(**kwargs)
    except InputError:
        raise
    except (TypeError, ValueError) as err:
        raise InputError(where or cls.__name__, str(err)) from None


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _hints(cls: type) -> dict:
    try:
        return typing.get_type_hints(cls)
    except Exception as err:  # a forward reference the module cannot resolve
        raise TypeError(f"cannot resolve the field types of {cls.__name__}: {err}") from None


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check/convert JSON-ish ``value`` against the annotation ``tp`` (used on reload)."""
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and is_dataclass(tp):
        return config_from_dict(tp, value, key)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except InputError as err:
                errors.append(err)
        raise errors[0] if errors else InputError(key, f"bad value {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise InputError(key, f"must be one of {', '.join(map(repr, typing.get_args(tp)))}, got {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise InputError(key, f"expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise InputError(key, f"expected {len(args)} values, got {len(value)}")
            items = [_coerce(a, v, key) for a, v in zip(args, value, strict=True)]
        else:
            item_tp = args[0] if args else Any
            items = [_coerce(item_tp, v, key) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise InputError(key, f"expected a mapping, got {value!r}")
        kt, vt = (typing.get_args(tp) + (Any, Any))[:2]
        return {k: _coerce(vt, v, key) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise InputError(key, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise InputError(key, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise InputError(key, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise InputError(key, f"expected a string, got {value!r}")
    if isinstance(tp, type) and issubclass(tp, os.PathLike):
        return Path(value)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise InputError(key, f"must be one of {', '.join(str(m.value) for m in tp)}, got {value!r}") from None
    return value


# --- checkpoints and exports ----------------------------------------------------------------------

CHECKPOINT_FORMAT = "xray2ct-checkpoint"  # meta.json of a checkpoint (written by launch/checkpoint.py)
CHECKPOINT_VERSION = 1
EXPORT_FORMAT = "xray2ct-weights"  # config.json of an export (written by launch/export.py)
EXPORT_VERSION = 2  # 2: diffusers-style network folders (1: flat <model>.safetensors, still read)
LATEST = "latest"  # checkpoints/latest: a one-line file naming the newest step-<N>
STEP_RE = re.compile(r"^step-(\d+)$")
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"  # diffusers' file name in a network folder


def step_name(step: int) -> str:
    """The directory name of the checkpoint of ``step``."""
    return f"step-{int(step)}"


def read_json(path: Path, keys: Mapping[str, Any] | None = None) -> dict:
    """A JSON object from a file, or a one-line InputError naming it (:func:`patching.checks.read_json_doc`)."""
    return read_json_doc(path, keys)


# What every reader of a checkpoint's meta.json relies on; launch.checkpoint asks for more.
CHECKPOINT_KEYS: dict[str, Any] = {"format": str, "version": int, "step": int}
RUN_KEYS: dict[str, Any] = {"task": str, "preset": str, "models": list}
# An export's config.json (launch/export.py).
EXPORT_KEYS: dict[str, Any] = {"format": str, "version": int, "task": str, "preset": str, "step": int,
                               "models": dict, "config": dict}


def read_checkpoint_meta(ckpt: str | os.PathLike, keys: Mapping[str, Any] | None = None) -> dict:
    """A checkpoint's ``meta.json``, validated: an object with the format marker, a version this
    code reads, a ``step`` that agrees with the directory's name (``step-<N>``), path-safe model
    names, and ``keys`` (``{key: type}``, see :func:`patching.checks.read_json_doc`)."""
    ckpt = Path(ckpt)
    path = ckpt / "meta.json"
    meta = read_json_doc(path, what="checkpoint meta.json")
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise InputError(path, f"not an xray2ct checkpoint (format {meta.get('format')!r:.80})")
    check_keys(meta, {**CHECKPOINT_KEYS, **(keys or {})}, path, what="checkpoint meta.json")
    if meta["version"] > CHECKPOINT_VERSION:
        raise InputError(path, f"checkpoint format version {meta['version']} is newer than this code ({CHECKPOINT_VERSION})")
    m = STEP_RE.match(ckpt.name)
    if m and int(m.group(1)) != meta["step"]:
        raise InputError(path, f"says step {meta['step']} but lies in {ckpt.name}")
    if meta["step"] < 0:
        raise InputError(path, f"negative step {meta['step']}")
    if "models" in meta:
        check_keys(meta, {"models": list}, path, what="checkpoint meta.json")
        for name in meta["models"]:
            safe_name(name, path, "model name")
    return meta


def read_export_config(where: str | os.PathLike) -> dict:
    """An export's ``config.json``, validated (format marker, keys, every ``file`` entry one
    path-safe name inside the export directory)."""
    path = Path(where) / "config.json"
    doc = read_json_doc(path, what="weights export config.json")
    if doc.get("format") != EXPORT_FORMAT:
        raise InputError(path, "not an xray2ct export (no format marker); give a checkpoint or export directory")
    check_keys(doc, EXPORT_KEYS, path, what="weights export config.json")
    for name, entry in doc["models"].items():
        nets = entry.get("networks") if isinstance(entry, dict) else None
        if not is_safe_name(name) or not isinstance(entry, dict) or ("file" not in entry and not isinstance(nets, dict)):
            raise InputError(path, f"models entry {name!r} must name a 'file' or its 'networks' folders")
        for key in ("file", "raw_file"):
            if key in entry:
                child_path(where, entry[key], path, f"models.{name}.{key}")
        for prefix, folder in (nets or {}).items():
            if prefix and not is_safe_name(prefix):
                raise InputError(path, f"models.{name}.networks: bad key {prefix!r}")
            child_path(where, folder, path, f"models.{name}.networks.{prefix or name}")
    return doc


def load_tensors(path: Path) -> dict:
    """All tensors of a safetensors file on the CPU (never a pickle)."""
    from safetensors import safe_open  # here: reading a config needs neither torch nor safetensors

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "missing weights file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # a truncated or foreign file
        raise InputError(path, f"not a readable safetensors file ({type(err).__name__}: {err})") from None


def pointed_checkpoint(root: str | os.PathLike) -> Path | None:
    """The checkpoint a ``checkpoints/`` root holds for resuming or sampling, validated.

    ``latest`` names it when present, else the highest ``step-<N>`` directory; ``None`` when the
    root holds neither. Whatever is named must be usable: ``latest`` naming something that is
    not ``step-<N>``, a missing directory, or a checkpoint whose ``meta.json`` is missing or
    malformed (:func:`read_checkpoint_meta`) is an :class:`InputError` — never a silent fall-back
    to another checkpoint or to a fresh start.
    """
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        try:
            name = pointer.read_text(errors="replace").strip()
        except OSError as err:
            raise InputError(pointer, f"unreadable ({err.strerror or err})") from None
        if not STEP_RE.match(name):
            raise InputError(pointer, f"names {name[:80]!r}, not a step-<N> checkpoint; fix or remove it")
        if not (root / name).is_dir():
            raise InputError(pointer, f"names {name}, which does not exist; fix or remove {pointer}")
        read_checkpoint_meta(root / name)
        return root / name
    steps = sorted((int(m.group(1)), p) for p in (root.iterdir() if root.is_dir() else ())
                   if p.is_dir() and (m := STEP_RE.match(p.name)))
    if not steps:
        return None
    read_checkpoint_meta(steps[-1][1])
    return steps[-1][1]


def resolve_weights(path: str | os.PathLike) -> tuple[str, Path]:
    """``("export", dir)`` or ``("checkpoint", dir)`` for a path a user gives as ``--checkpoint``:
    a checkpoint, the ``latest`` pointer, ``D/checkpoints``, a run directory ``D`` or an export."""
    p = Path(path)
    if p.is_file() and p.name == LATEST:  # the pointer file itself
        return "checkpoint", pointed_checkpoint(p.parent)
    if not p.exists():
        raise InputError(p, "no such file or directory")
    if not p.is_dir():
        raise InputError(p, "is a file; give a checkpoint directory, a run directory or an export directory")
    if (p / "meta.json").is_file():
        read_checkpoint_meta(p)
        return "checkpoint", p
    if (p / "config.json").is_file() and read_json(p / "config.json").get("format") == EXPORT_FORMAT:
        read_export_config(p)
        return "export", p
    for root in (p, p / "checkpoints"):
        if root.is_dir() and (found := pointed_checkpoint(root)) is not None:
            return "checkpoint", found
    raise InputError(p, "not a checkpoint (no meta.json), an export (no config.json) or a directory holding checkpoints")


def describe(path: str | os.PathLike) -> dict:
    """The run description of a checkpoint (``meta.json``) or export (``config.json``)."""
    kind, where = resolve_weights(path)
    return read_export_config(where) if kind == "export" else read_checkpoint_meta(where, RUN_KEYS)


def read_run(kind: str, where: Path) -> tuple[dict, dict]:
    """``(description, run config)`` of a resolved checkpoint or export (:func:`resolve_weights`):
    the validated ``meta.json`` (or export ``config.json``) and the resolved config's dict."""
    if kind == "export":
        doc = read_export_config(where)
        return doc, doc["config"]
    meta = read_checkpoint_meta(where, RUN_KEYS)
    return meta, read_json_doc(where / "config.json", {"config": dict}, what="run config.json")["config"]


def model_state(kind: str, where: Path, name: str, export_doc: dict | None = None, *,
                raw: bool = False) -> tuple[dict, str]:
    """``(state_dict, "ema" | "raw")`` of model ``name`` from a resolved checkpoint or export
    (:func:`resolve_weights`): the EMA weights when the run kept them, else the raw ones
    (``raw=True``: always the raw ones). An export's network folders are joined back into the
    model's state dict (keys prefixed by the folder's entry)."""
    if kind == "export":
        doc = export_doc if export_doc is not None else read_export_config(where)
        entry = doc["models"].get(name)
        if entry is None:
            raise InputError(where / "config.json", f"lists no {name} weights")
        weights, doc_path = str(entry.get("weights", "raw")), where / "config.json"
        if raw and "raw_file" in entry:
            return load_tensors(child_path(where, entry["raw_file"], doc_path, f"models.{name}.raw_file")), "raw"
        if "networks" in entry:
            state = {}
            for prefix, folder in entry["networks"].items():
                part = load_tensors(child_path(where, folder, doc_path, f"models.{name}.networks.{prefix or name}")
                                    / WEIGHTS_NAME)
                state.update({f"{prefix}.{k}" if prefix else k: v for k, v in part.items()})
            return state, "raw" if raw else weights
        return load_tensors(child_path(where, entry["file"], doc_path, f"models.{name}.file")), "raw" if raw else weights
    if not raw and (where / "ema" / f"{name}.safetensors").is_file():
        return load_tensors(where / "ema" / f"{name}.safetensors"), "ema"
    return load_tensors(where / "models" / f"{name}.safetensors"), "raw"


def read_config(cls: type, data: dict, where: str | os.PathLike) -> Any:
    """A saved config (a section of a run config, a network's ``cfg``) as ``cls``, strictly
    (:func:`config_from_dict`); a mismatch is one InputError naming ``where``."""
    try:
        return config_from_dict(cls, data if data is not None else {})
    except InputError as err:
        raise InputError(where, f"saved config does not fit {cls.__name__}: {err}") from None


def task_config(cls: type, run_cfg: dict, where: str | os.PathLike) -> Any:
    """The task's part of a saved run config (everything but the engine's ``train`` section) as ``cls``."""
    return read_config(cls, {k: v for k, v in run_cfg.items() if k != "train"}, where)


def plain_state(x: Any) -> Any:
    """A state skeleton as written by ``launch.state_io`` (tuples as ``{"__tuple__": [...]}``,
    dicts with non-string keys as ``{"__dict__": [[k, v], ...]}``) as plain lists and dicts."""
    if isinstance(x, dict):
        if set(x) == {"__tuple__"}:
            return [plain_state(v) for v in x["__tuple__"]]
        if set(x) == {"__dict__"}:
            return {k: plain_state(v) for k, v in x["__dict__"]}
        return {k: plain_state(v) for k, v in x.items()}
    if isinstance(x, list):
        return [plain_state(v) for v in x]
    return x


def read_extra(kind: str, where: Path, meta: dict) -> dict:
    """The task's extra state (latent scale factor, VQ-GAN reference, HU window, ...) as plain
    JSON data, ``{}`` when the run kept none."""
    path = where / "extra.json"
    if (kind == "export" and not meta.get("extra")) or not path.is_file():
        return {}
    return plain_state(read_json_doc(path, what="extra state").get("state") or {})
