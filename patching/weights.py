"""Read trained weights without pickle and without importing ``launch``.

The layouts are those written by ``launch/checkpoint.py`` (``D/checkpoints/step-<N>/`` with
``meta.json``, ``models/``, ``ema/``, ``extra``; ``D/checkpoints/latest`` names the newest) and
``launch/export.py`` (``<model>.safetensors`` + ``config.json``). Stage packages never import
``launch`` (see docs/architecture.md), so the few readers every sampler needs live here, in the
lowest layer, once.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import InputError

CHECKPOINT_FORMAT = "xray2ct-checkpoint"  # launch/checkpoint.py
EXPORT_FORMAT = "xray2ct-weights"  # launch/export.py
_STEP_RE = re.compile(r"^step-(\d+)$")


def read_json(path: Path) -> dict:
    """A JSON file, or a one-line InputError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(path, "missing file") from None
    except (OSError, ValueError) as err:
        raise InputError(path, f"not valid JSON ({err})") from None


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


def newest_checkpoint(root: Path) -> Path | None:
    """What ``root/latest`` names, else the highest ``step-N`` with a ``meta.json``."""
    root = Path(root)
    pointer = root / "latest"
    if pointer.is_file():
        name = pointer.read_text().strip()
        if _STEP_RE.match(name) and (root / name / "meta.json").is_file():
            return root / name
    steps = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))
             and (p / "meta.json").is_file()]
    return max(steps)[1] if steps else None


def resolve_weights(path: str | os.PathLike) -> tuple[str, Path]:
    """``("export", dir)`` or ``("checkpoint", dir)`` for a path a user gives as ``--checkpoint``:
    a checkpoint, the ``latest`` pointer, ``D/checkpoints``, a run directory ``D`` or an export."""
    p = Path(path)
    if p.is_file() and p.name == "latest":  # the pointer file itself
        name = p.read_text().strip()
        if not _STEP_RE.match(name) or not (p.parent / name / "meta.json").is_file():
            raise InputError(p, f"names {name!r}, which is not a complete checkpoint")
        return "checkpoint", p.parent / name
    if not p.exists():
        raise InputError(p, "no such file or directory")
    if not p.is_dir():
        raise InputError(p, "is a file; give a checkpoint directory, a run directory or an export directory")
    if (p / "meta.json").is_file():
        return "checkpoint", p
    if (p / "config.json").is_file() and read_json(p / "config.json").get("format") == EXPORT_FORMAT:
        return "export", p
    for root in (p, p / "checkpoints"):
        if root.is_dir() and (found := newest_checkpoint(root)) is not None:
            return "checkpoint", found
    raise InputError(p, "not a checkpoint (no meta.json), an export (no config.json) or a directory holding checkpoints")


def describe(path: str | os.PathLike) -> dict:
    """The run description of a checkpoint (``meta.json``) or export (``config.json``)."""
    kind, where = resolve_weights(path)
    return read_json(where / ("config.json" if kind == "export" else "meta.json"))


def model_state(kind: str, where: Path, name: str, export_doc: dict | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """``(state_dict, "ema" | "raw")`` of model ``name`` from a resolved checkpoint or export
    (:func:`resolve_weights`): the EMA weights when the run kept them, else the raw ones."""
    if kind == "export":
        entry = ((export_doc if export_doc is not None else read_json(where / "config.json")).get("models") or {}).get(name)
        if entry is None:
            raise InputError(where / "config.json", f"lists no {name} weights")
        return load_tensors(where / entry["file"]), str(entry.get("weights", "raw"))
    if (where / "ema" / f"{name}.safetensors").is_file():
        return load_tensors(where / "ema" / f"{name}.safetensors"), "ema"
    return load_tensors(where / "models" / f"{name}.safetensors"), "raw"
