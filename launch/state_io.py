"""Checkpoint file primitives: nested state ⇄ (tensors, JSON skeleton), streamed safetensors and
JSON files, and a test hook that slows every write (``XRAY2CT_CKPT_WRITE_DELAY_S``). Used by
:mod:`launch.checkpoint`, which re-exports these names and does the atomic publishing; no
pickle anywhere."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from patching.checks import read_json_doc
from patching.errors import InputError

WRITE_DELAY_ENV = "XRAY2CT_CKPT_WRITE_DELAY_S"


# --- nested state <-> (tensors, JSON skeleton) ----------------------------------------------

_MARKERS = ("__tensor__", "__tuple__", "__dict__")


def flatten_state(obj: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state into ``{path: tensor}`` and a JSON-ready skeleton.

    Supported: tensors, ``None``, bools, ints, floats (``nan``/``inf`` included), strings, and
    lists/tuples/dicts of them (dict keys may be strings, ints or bools). Anything else raises
    ``TypeError`` naming its path, so a state that cannot be stored without pickle is caught at
    save time, not at resume time.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            tensors[path] = x
            return {"__tensor__": path}
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, (np.integer, np.floating, np.bool_)):
            return x.item()
        if isinstance(x, torch.Size):
            x = tuple(x)
        if isinstance(x, tuple):
            return {"__tuple__": [walk(v, f"{path}/{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(x)]
        if isinstance(x, dict):
            plain_keys = all(isinstance(k, str) for k in x) and not any(k in _MARKERS for k in x)
            if plain_keys:
                return {k: walk(v, f"{path}/{k}") for k, v in x.items()}
            items = []
            for k, v in x.items():
                if not isinstance(k, (str, int, bool)):
                    raise TypeError(f"{path or '/'}: dict key {k!r} of type {type(k).__name__} cannot be stored")
                items.append([k, walk(v, f"{path}/{k}")])
            return {"__dict__": items}
        raise TypeError(
            f"{path or '/'}: a {type(x).__name__} cannot be stored without pickle "
            "(only tensors, numbers, strings, None, lists, tuples and dicts)"
        )

    return tensors, walk(obj, "")


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    if isinstance(skeleton, dict):
        if len(skeleton) == 1:
            (key, value), = skeleton.items()
            if key == "__tensor__":
                return tensors[value]
            if key == "__tuple__":
                return tuple(unflatten_state(v, tensors) for v in value)
            if key == "__dict__":
                return {k: unflatten_state(v, tensors) for k, v in value}
        return {k: unflatten_state(v, tensors) for k, v in skeleton.items()}
    return skeleton


# --- files --------------------------------------------------------------------------------------


def _after_write(path: Path) -> None:
    delay = float(os.environ.get(WRITE_DELAY_ENV, "0") or 0)
    if delay > 0:
        time.sleep(delay)


_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` as one standard safetensors file (readable by ``safetensors.safe_open``).

    Streamed: the header, then each tensor's bytes written straight from its memory — no
    serialised copy of the whole state (``safetensors.torch.save_file`` builds one, which made
    it 2-5x slower than this on a 1.2 GB state; see benchmarks/bench_checkpoint.py). Tensors
    sharing storage (tied weights) are simply written twice.
    """
    path = Path(path)
    arrays = []
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _ST_DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} cannot be stored in safetensors")
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        if nbytes:
            arrays.append(t.reshape(-1).view(torch.uint8).numpy())  # a view: no copy
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for a in arrays:
            f.write(memoryview(a))
    _after_write(path)
    return path


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "missing checkpoint file")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # a truncated or foreign file
        raise InputError(path, f"not a readable safetensors file ({type(err).__name__}: {err})") from None


def save_json(path: str | os.PathLike, data: Any) -> Path:
    path = Path(path)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    _after_write(path)
    return path


def load_json(path: str | os.PathLike, keys: dict[str, Any] | None = None) -> dict:
    """A JSON object, validated (:func:`patching.checks.read_json_doc`): one line naming the file
    when it is missing, not JSON, not an object or lacks one of ``keys``."""
    return read_json_doc(path, keys, what="checkpoint JSON file")


def save_state(stem: str | os.PathLike, obj: Any) -> list[Path]:
    """Write a nested state as ``<stem>.json`` plus ``<stem>.safetensors`` when it has tensors."""
    stem = Path(stem)
    tensors, skeleton = flatten_state(obj)
    written = []
    if tensors:
        written.append(save_tensors(stem.with_name(stem.name + ".safetensors"), tensors))
    written.append(save_json(stem.with_name(stem.name + ".json"), {"has_tensors": bool(tensors), "state": skeleton}))
    return written


def load_state(stem: str | os.PathLike) -> Any:
    stem = Path(stem)
    path = stem.with_name(stem.name + ".json")
    doc = load_json(path, {"has_tensors": bool, "state": None})
    tensors = load_tensors(stem.with_name(stem.name + ".safetensors")) if doc["has_tensors"] else {}
    try:
        return unflatten_state(doc["state"], tensors)
    except (KeyError, TypeError, ValueError) as err:  # a crafted skeleton: a missing tensor, a bad marker
        raise InputError(path, f"malformed state ({type(err).__name__}: {err})") from None
