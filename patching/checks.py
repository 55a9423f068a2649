"""Small predicates shared by every package: config validation, path-safe names, JSON documents.

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

from .errors import InputError


def need(ok: bool, key: str, what: str, value) -> None:
    """Raise ``InputError(key, f"{what}, got {value!r}")`` unless ``ok``."""
    if not ok:
        raise InputError(key, f"{what}, got {value!r}")


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
    import torch

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
