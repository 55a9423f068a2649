"""Small predicates shared by the packages: config validation, and the input checks of the metrics.

    need(is_pos_int(cfg.channels), "model.channels", "must be a positive integer", cfg.channels)
    # InputError("model.channels: must be a positive integer, got 0")
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .errors import InputError

SLAB_VOXELS = 1 << 22  # voxels per slab of float64 work (32 MB per array)


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


# --- input checks of the metrics (patching.metrics, patching.lpips) --------------------------------------------------------------------------------


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
