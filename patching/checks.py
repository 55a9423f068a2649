"""Small predicates for config validation, shared by the packages' config dataclasses.

    need(is_pos_int(cfg.channels), "model.channels", "must be a positive integer", cfg.channels)
    # InputError("model.channels: must be a positive integer, got 0")
"""

from __future__ import annotations

import math

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
