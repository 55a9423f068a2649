"""The model artifact format, in the lowest layer that needs it (see docs/architecture.md).

The typed config round trip: a config dataclass tree ↔ plain JSON data, strict on the way
back (unknown keys, wrong types and failed ``__post_init__`` checks are :class:`InputError`).
``launch`` writes run configs with it and every stage reads saved configs with it, so a
config is decoded one way everywhere. Networks save and load through :mod:`patching.pretrained`.
"""

from __future__ import annotations

import enum
import os
import types
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Union

from .errors import InputError


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
