"""Small predicates shared by the packages: config validation, path-safe names, JSON documents,
devices, and the input checks of the metrics.

    need(is_pos_int(cfg.channels), "model.channels", "must be a positive integer", cfg.channels)
    # InputError("model.channels: must be a positive integer, got 0")
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from patching.errors import InputError

SLAB_VOXELS = 1 << 22  # voxels per slab of float64 work (32 MB per array)


def need(ok: bool, key: str, what: str, value) -> None:
    """Raise ``InputError(key, f"{what}, got {value!r}")`` unless ``ok``."""
    if not ok:
        raise InputError(key, f"{what}, got {value!r}")


def named_preset(table: Mapping[str, Any], name: str, owner: str | None = None):
    """``table[name]()``: the preset called ``name`` built by its factory, or an ``InputError`` on
    ``--preset`` listing the known names (``owner``: whose presets, for the message)."""
    if name not in table:
        whose = f" for {owner}" if owner else ""
        raise InputError("--preset", f"unknown preset {name!r}{whose}; known: {', '.join(sorted(table))}")
    return table[name]()


def is_pos_int(value) -> bool:
    """A positive ``int`` (``bool`` excluded)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def is_finite(value) -> bool:
    """A finite ``int`` or ``float`` (``bool`` excluded)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_pos_ints(value, n: int | None = None) -> bool:
    """A tuple of positive ints, of length ``n`` when given."""
    return isinstance(value, tuple) and (n is None or len(value) == n) and all(is_pos_int(v) for v in value)


# --- names that become paths --------------------------------------------------------------------

# One path component: starts with a letter or digit (so never ".", "..", a hidden name, a staging
# name or something argparse reads as a flag), then letters, digits, ".", "_" and "-" only.
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")


def is_safe_name(value) -> bool:
    """A string that is one harmless path component (see :func:`safe_name`)."""
    return isinstance(value, str) and _SAFE_NAME.fullmatch(value) is not None


def safe_name(value, source: str | os.PathLike | None, what: str = "name") -> str:
    """``value`` when it can be used as one path component, else a one-line :class:`InputError`.

    Every name read from a file (model names in ``meta.json``, the ``file`` entries of an
    export's ``config.json``, case ids) or taken from the command line (``--case``) passes
    through here before it becomes a path: no ``/``, ``\\``, ``..``, leading ``.`` or ``-``,
    NUL or other control characters, at most 255 characters.
    """
    if not is_safe_name(value):
        raise InputError(source, f"{what} {value!r} is not a safe file name (letters, digits, '.', '_' and '-', "
                                 "starting with a letter or digit)")
    return value


def child_path(root: str | os.PathLike, name, source: str | os.PathLike | None, what: str = "name") -> Path:
    """``root / name`` for a ``name`` checked by :func:`safe_name` (never outside ``root``)."""
    return Path(root) / safe_name(name, source, what)


# --- JSON documents -----------------------------------------------------------------------------

_JSON_TYPES = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
               bool: "true or false"}


def _type_ok(value, kind) -> bool:
    if kind is None:
        return True
    if isinstance(kind, tuple):
        return any(_type_ok(value, k) for k in kind)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return is_finite(value)
    return isinstance(value, kind)


def _type_name(kind) -> str:
    if isinstance(kind, tuple):
        return " or ".join(_type_name(k) for k in kind)
    return _JSON_TYPES.get(kind, getattr(kind, "__name__", str(kind)))


def read_json_doc(path: str | os.PathLike, keys: Mapping[str, Any] | None = None, what: str = "JSON document") -> dict:
    """The JSON object in ``path``, its ``keys`` checked: ``{key: type | (types) | None}``.

    The one reader for JSON documents that come from disk (checkpoint ``meta.json``, an export's
    ``config.json``, state skeletons): a missing or unreadable file, bytes that are not JSON,
    a top level that is not an object, or a required key missing or of the wrong type is a
    one-line :class:`InputError` naming the file, never a traceback. ``int`` excludes ``bool``;
    ``float`` accepts any finite number.
    """
    path = Path(path)
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise InputError(path, "missing file") from None
    except OSError as err:
        raise InputError(path, f"unreadable ({err.strerror or err})") from None
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise InputError(path, f"not valid JSON ({type(err).__name__}: {err})") from None
    if not isinstance(doc, dict):
        raise InputError(path, f"not a {what}: the top level is {_JSON_TYPES.get(type(doc), type(doc).__name__)}, "
                               "expected an object")
    return check_keys(doc, keys, path, what)


def check_keys(doc: dict, keys: Mapping[str, Any] | None, source: str | os.PathLike | None,
               what: str = "JSON document") -> dict:
    """``doc`` when it has every key of ``keys`` with a value of its type (see :func:`read_json_doc`)."""
    for key, kind in (keys or {}).items():
        if key not in doc:
            raise InputError(source, f"not a {what}: no {key!r} key")
        if not _type_ok(doc[key], kind):
            raise InputError(source, f"not a {what}: {key!r} must be {_type_name(kind)}, got {doc[key]!r:.80}")
    return doc


# --- devices ------------------------------------------------------------------------------------


def resolve_device(value, option: str = "--device"):
    """A ``torch.device`` from a user's ``--device`` (``None``: CUDA when available, else CPU).

    Not a device name, CUDA on a machine without it, or a CUDA index this machine lacks
    (``cuda:7`` with two GPUs) is a one-line :class:`InputError` naming ``option``, not a
    traceback from the first tensor moved there.
    """
    if value is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError, ValueError) as err:
        raise InputError(option, f"{value!r} is not a device ({' '.join(str(err).split())})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(option, f"{value!r}: CUDA is not available here")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise InputError(option, f"{value!r}: no such device (this machine has {count} CUDA device(s))")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise InputError(option, f"{value!r}: MPS is not available here")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise InputError(option, f"{value!r}: unsupported device type {dev.type!r} (cpu, cuda, cuda:N)")
    return dev


# --- input checks of the metrics (patching.metrics.scores, patching.metrics.lpips) --------------------------------------------------------------------------------


def metric_array(x, name: str, ndim: int = 3) -> np.ndarray:
    """A numpy view of ``x`` with ``ndim`` axes (leading singleton axes dropped); finite."""
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        x = x.cpu().numpy()
    try:
        x = np.asarray(x)
    except (TypeError, ValueError) as err:
        raise InputError(name, f"cannot read as an array: {err}") from None
    while x.ndim > ndim and x.shape[0] == 1:
        x = x[0]
    if x.ndim != ndim:
        want = "an X×Y×Z volume" if ndim == 3 else f"a {ndim}-D array"
        raise InputError(name, f"needs {want}, got shape {x.shape}")
    if x.dtype != bool and not np.issubdtype(x.dtype, np.integer) and not np.issubdtype(x.dtype, np.floating):
        raise InputError(name, f"needs numbers, got dtype {x.dtype}")
    if min(x.shape, default=1) == 0:
        raise InputError(name, f"is empty, shape {x.shape}")
    if np.issubdtype(x.dtype, np.floating):
        for sl in slabs(x.shape):
            if not np.isfinite(x[sl]).all():
                raise InputError(name, "contains NaN or infinite values")
    return x


def metric_pair(pred, target, names=("pred", "target")) -> tuple[np.ndarray, np.ndarray]:
    a, b = metric_array(pred, names[0]), metric_array(target, names[1])
    if a.shape != b.shape:
        raise InputError(names[0], f"shape {a.shape} does not match {names[1]} shape {b.shape}")
    return a, b


def positive_number(value, name: str) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise InputError(name, f"needs a positive number, got {value!r}") from None
    if not math.isfinite(f) or f <= 0:
        raise InputError(name, f"needs a positive finite number, got {value!r}")
    return f


def metric_window(window) -> tuple[float, float] | None:
    if window is None:
        return None
    try:
        lo, hi = (float(w) for w in window)
    except (TypeError, ValueError):
        raise InputError("window", f"needs (lo, hi) in HU, got {window!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise InputError("window", f"needs finite lo < hi, got {window!r}")
    return lo, hi


def slabs(shape, halo: int = 0):
    """Slices along axis 0 covering ``shape`` in slabs of about ``SLAB_VOXELS`` (halo included)."""
    budget = SLAB_VOXELS
    plane = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    step = max(1, budget // max(1, plane) - 2 * halo)
    for a in range(0, shape[0], step):
        yield slice(a, min(shape[0], a + step))
