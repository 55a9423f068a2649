"""Read trained weights without pickle and without importing ``launch``.

The layouts are those written by ``launch/checkpoint.py`` (``D/checkpoints/step-<N>/`` with
``meta.json``, ``models/``, ``ema/``, ``extra``; ``D/checkpoints/latest`` names the newest) and
``launch/export.py`` (``<model>.safetensors`` + ``config.json``). Stage packages never import
``launch`` (see docs/architecture.md), so the few readers every sampler needs live here, in the
lowest layer, once.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .checks import check_keys, child_path, is_safe_name, read_json_doc, safe_name
from .errors import InputError

CHECKPOINT_FORMAT = "xray2ct-checkpoint"  # launch/checkpoint.py
CHECKPOINT_VERSION = 1
EXPORT_FORMAT = "xray2ct-weights"  # launch/export.py
_STEP_RE = re.compile(r"^step-(\d+)$")


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
    m = _STEP_RE.match(ckpt.name)
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
        if not is_safe_name(name) or not isinstance(entry, dict) or "file" not in entry:
            raise InputError(path, f"models entry {name!r} must name a 'file'")
        for key in ("file", "raw_file"):
            if key in entry:
                child_path(where, entry[key], path, f"models.{name}.{key}")
    return doc


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file on the CPU (never a pickle)."""
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
    pointer = root / "latest"
    if pointer.is_file():
        try:
            name = pointer.read_text(errors="replace").strip()
        except OSError as err:
            raise InputError(pointer, f"unreadable ({err.strerror or err})") from None
        if not _STEP_RE.match(name):
            raise InputError(pointer, f"names {name[:80]!r}, not a step-<N> checkpoint; fix or remove it")
        if not (root / name).is_dir():
            raise InputError(pointer, f"names {name}, which does not exist; fix or remove {pointer}")
        read_checkpoint_meta(root / name)
        return root / name
    steps = sorted((int(m.group(1)), p) for p in (root.iterdir() if root.is_dir() else ())
                   if p.is_dir() and (m := _STEP_RE.match(p.name)))
    if not steps:
        return None
    read_checkpoint_meta(steps[-1][1])
    return steps[-1][1]


def resolve_weights(path: str | os.PathLike) -> tuple[str, Path]:
    """``("export", dir)`` or ``("checkpoint", dir)`` for a path a user gives as ``--checkpoint``:
    a checkpoint, the ``latest`` pointer, ``D/checkpoints``, a run directory ``D`` or an export."""
    p = Path(path)
    if p.is_file() and p.name == "latest":  # the pointer file itself
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


def model_state(kind: str, where: Path, name: str, export_doc: dict | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """``(state_dict, "ema" | "raw")`` of model ``name`` from a resolved checkpoint or export
    (:func:`resolve_weights`): the EMA weights when the run kept them, else the raw ones."""
    if kind == "export":
        doc = export_doc if export_doc is not None else read_export_config(where)
        entry = doc["models"].get(name)
        if entry is None:
            raise InputError(where / "config.json", f"lists no {name} weights")
        return load_tensors(child_path(where, entry["file"], where / "config.json", f"models.{name}.file")), \
            str(entry.get("weights", "raw"))
    if (where / "ema" / f"{name}.safetensors").is_file():
        return load_tensors(where / "ema" / f"{name}.safetensors"), "ema"
    return load_tensors(where / "models" / f"{name}.safetensors"), "raw"
