"""The case store: one Zarr v3 group per dataset.

Layout (every node is plain Zarr v3, readable by any Zarr v3 client)::

    <store>/zarr.json                       group; attributes {"xray2ct_store": 1, ...}
    <store>/cases/<case_id>/zarr.json       group; attributes: spacing_mm, affine, shape, split,
                                            source, labels, hu_min, hu_max, complete: true
    <store>/cases/<case_id>/ct              int16 HU [x, y, z] RAS+, blosc-zstd, tile-friendly chunks
    <store>/cases/<case_id>/masks/<name>    uint8 masks (e.g. "embolus"), optional
    <store>/cases/<case_id>/xray/<view>     float32 [row, col] in [0, 1] ("pa", "lateral")
    <store>/cases/<case_id>/latent          float, written by stage 1 (`xray2ct encode`)
    <store>/.staging/                       work in progress; never read as data

Atomicity (local file systems only; rename within one file system is atomic on POSIX):
a case is written completely under ``.staging/`` and then renamed into ``cases/``, so a reader
never sees half a case, and of two ingests racing on the same case id exactly one rename wins
(renaming onto a non-empty directory fails) and the other discards its copy. Arrays added to a
finished case later (views, latents) are staged the same way. Attribute edits after completion
take an exclusive ``flock`` on ``<store>/.lock`` and replace ``zarr.json`` atomically.

Privacy: case ids are sanitised (:func:`sanitize_case_id`) and no patient name, birth date or
other identifying DICOM attribute is ever written; ``source`` holds a file name only.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from patching.checks import child_path, is_safe_name, read_json_doc
from patching.data.staging import clean_stale, is_stale, owner_tag
from patching.data.volume_io import DEFAULT_CT_CHUNKS, write_array
from patching.errors import InputError, StorageError

STORE_FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
# Tile-friendly chunking for int16 CT, chosen with benchmarks/bench_chunks.py (see docs/data.md):
# (64, 64, 32) aligns with the 256×256×128 tile grid at overlap 0.25 (strides 192, 192, 96), so a
# grid tile reads exactly the voxels it needs; 256 KiB per chunk before compression.
_CASE_ID_OK = re.compile(r"[^A-Za-z0-9._-]+")


def sanitize_case_id(raw: str, *, max_len: int = 96) -> str:
    """A safe, single-path-component case id from untrusted text (e.g. a DICOM PatientID).

    Anything but letters, digits, ``.``, ``_`` and ``-`` becomes ``_``; leading dots,
    underscores and dashes are removed (no ``..``, no hidden names, no ``-flag``); over-long ids are cut and suffixed with a hash so two
    long ids stay distinct. An id left empty becomes ``case-<hash>``.
    """
    text = str(raw)
    # No leading dots, underscores or dashes: never ".", "..", a hidden name, a staging name or
    # something a command line reads as a flag (patching.checks.safe_name accepts the result).
    safe = re.sub(r"^[._-]+", "", _CASE_ID_OK.sub("_", text)).rstrip("_")
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    if not safe or set(safe) <= {"."}:
        return f"case-{digest}"
    if len(safe) > max_len:
        safe = f"{safe[: max_len - 11]}-{digest}"
    return safe


def split_for(case_id: str, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> str:
    """Deterministic split from the case id alone (stable whatever else is in the store)."""
    u = int(hashlib.sha256(case_id.encode()).hexdigest()[:12], 16) / float(16**12)
    if u < fractions[0]:
        return "train"
    return "val" if u < fractions[0] + fractions[1] else "test"


def split_by_index(index: int, count: int, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> str:
    """Split for the ``index``-th of ``count`` generated cases: the last ones go to val and test,
    at least one each when there are three or more cases."""
    num_test = max(1, round(count * fractions[2])) if count >= 3 else 0
    num_val = max(1, round(count * fractions[1])) if count >= 3 else 0
    if index >= count - num_test:
        return "test"
    if index >= count - num_test - num_val:
        return "val"
    return "train"


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _group_meta(attrs: Mapping[str, Any] | None = None) -> dict:
    return {"zarr_format": 3, "node_type": "group", "attributes": dict(attrs or {})}


def _ensure_group(path: Path, attrs: Mapping[str, Any] | None = None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    meta = path / "zarr.json"
    if not meta.exists():
        _write_json_atomic(meta, _group_meta(attrs))


@dataclass
class Case:
    """A finished case, opened lazily: arrays are read only when sliced."""

    case_id: str
    path: Path
    attrs: dict

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in self.attrs["spacing_mm"])  # type: ignore[return-value]

    @property
    def affine(self) -> np.ndarray:
        return np.asarray(self.attrs["affine"], dtype=float)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.attrs["shape"])  # type: ignore[return-value]

    @property
    def split(self) -> str:
        return str(self.attrs.get("split", "train"))

    @property
    def labels(self) -> dict:
        return dict(self.attrs.get("labels", {}))

    @property
    def ct(self) -> zarr.Array:
        """The int16 HU array (lazy: slicing reads only the chunks it touches)."""
        return zarr.open_array(str(self.path / "ct"), mode="r")

    def views(self) -> list[str]:
        """Views present, PA first, then lateral, then any others by name."""
        d = self.path / "xray"
        names = [p.name for p in d.iterdir() if (p / "zarr.json").exists()] if d.is_dir() else []
        return sorted(names, key=lambda v: ({"pa": 0, "lateral": 1}.get(v, 2), v))

    def xray(self, view: str) -> np.ndarray:
        p = self.path / "xray" / view
        if not (p / "zarr.json").exists():
            raise InputError(self.path, f"case has no {view!r} X-ray (views present: {self.views() or 'none'})")
        return np.asarray(zarr.open_array(str(p), mode="r")[...], dtype=np.float32)

    def xray_attrs(self, view: str) -> dict:
        return dict(zarr.open_array(str(self.path / "xray" / view), mode="r").attrs)

    def masks(self) -> list[str]:
        d = self.path / "masks"
        return sorted(p.name for p in d.iterdir() if (p / "zarr.json").exists()) if d.is_dir() else []

    def mask(self, name: str) -> zarr.Array:
        return zarr.open_array(str(self.path / "masks" / name), mode="r")

    @property
    def has_latent(self) -> bool:
        return (self.path / "latent" / "zarr.json").exists()

    @property
    def latent(self) -> zarr.Array:
        if not self.has_latent:
            raise InputError(self.path, "case has no latent; run `xray2ct encode` first")
        return zarr.open_array(str(self.path / "latent"), mode="r")


class Store:
    """A dataset of cases in one Zarr v3 group (see the module docstring for the layout)."""

    def __init__(self, path: str | os.PathLike, *, create: bool = False):
        self.path = Path(path)
        meta = self.path / "zarr.json"
        self._swept = False
        if create and self.path.exists() and not self.path.is_dir():
            raise InputError(self.path, "exists and is not a directory")
        if meta.exists() or not create:
            if not meta.exists():
                raise InputError(self.path, "is not an xray2ct store (no zarr.json); create one with `xray2ct data synth` or `data ingest`")
            root = self._read_root(meta)  # an existing store is checked before anything is created in it
        if create:
            try:
                _ensure_group(self.path, {"xray2ct_store": STORE_FORMAT_VERSION})
                _ensure_group(self.path / "cases")
                (self.path / ".staging").mkdir(exist_ok=True)
            except OSError as err:
                raise StorageError.from_os(self.path, "cannot create the store", err) from None
            root = self._read_root(meta)
        self.attrs = dict(root.get("attributes", {}))

    def _read_root(self, meta: Path) -> dict:
        try:
            root = read_json_doc(meta, what="Zarr group metadata")
        except InputError as err:
            raise InputError(meta, f"unreadable store metadata ({err.problem})") from None
        if not isinstance(root.get("attributes"), dict) or root["attributes"].get("xray2ct_store") is None:
            raise InputError(self.path, "is a Zarr group but not an xray2ct store")
        return root

    # ---- reading -----------------------------------------------------------------------------
    @property
    def cases_dir(self) -> Path:
        return self.path / "cases"

    def _case_attrs(self, case_dir: Path) -> dict | None:
        try:
            attrs = read_json_doc(case_dir / "zarr.json").get("attributes", {})
        except InputError:
            return None
        return attrs if isinstance(attrs, dict) else None

    def case_ids(self, split: str | None = None) -> list[str]:
        """Ids of complete cases (sorted), optionally of one split."""
        if split is not None and split not in SPLITS:
            raise InputError("--split", f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        out = []
        if not self.cases_dir.is_dir():
            return out
        for d in sorted(self.cases_dir.iterdir()):
            if d.name.startswith(".") or not d.is_dir():
                continue
            attrs = self._case_attrs(d)
            if not attrs or not attrs.get("complete"):
                continue
            if split is None or attrs.get("split") == split:
                out.append(d.name)
        return out

    def staging(self) -> list[tuple[Path, bool]]:
        """Entries of ``.staging/`` as ``(path, stale)``: work in progress of a live writer, or
        (``stale``) the leftover of one that was killed (see :mod:`patching.data.staging`)."""
        return [(p, is_stale(p)) for p in sorted((self.path / ".staging").glob("*"))]

    def incomplete(self) -> list[Path]:
        """Staged or unfinished case directories (never returned by :meth:`case_ids`)."""
        out = [p for p in sorted((self.path / ".staging").glob("*")) if p.is_dir()]
        if self.cases_dir.is_dir():
            for d in sorted(self.cases_dir.iterdir()):
                if d.is_dir() and not d.name.startswith("."):
                    a = self._case_attrs(d)
                    if not a or not a.get("complete"):
                        out.append(d)
        return out

    def has_case(self, case_id: str) -> bool:
        a = self._case_attrs(self._case_dir(case_id))
        return bool(a and a.get("complete"))

    def _case_dir(self, case_id: str) -> Path:
        """``cases/<case_id>`` for an id that is one safe path component (ids from the command
        line and from files alike: never a path outside the store)."""
        return child_path(self.cases_dir, case_id, self.path, "case id")

    def case(self, case_id: str) -> Case:
        d = self._case_dir(case_id)
        attrs = self._case_attrs(d)
        if attrs is None or not attrs.get("complete"):
            raise InputError(self.path, f"no complete case {case_id!r} in the store")
        return Case(case_id, d, attrs)

    def __iter__(self) -> Iterator[Case]:
        for cid in self.case_ids():
            yield self.case(cid)

    def __len__(self) -> int:
        return len(self.case_ids())

    # ---- writing -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _staging_dir(self, prefix: str) -> Iterator[Path]:
        """A fresh staging directory named after its writer; removed on the way out. The first
        write of this Store removes the stale leftovers of killed writers (never a live one's).
        A file-system error (disk full, read-only) becomes a one-line :class:`StorageError`."""
        if not self._swept:
            self.clean_staging()
            self._swept = True
        d = self.path / ".staging" / f"{prefix}-{uuid.uuid4().hex[:12]}{owner_tag()}"
        try:
            d.mkdir(parents=True)
            yield d
        except OSError as err:
            raise StorageError.from_os(self.path, f"could not write {prefix}", err) from None
        finally:
            if d.exists():
                shutil.rmtree(d, ignore_errors=True)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive inter-process lock for metadata edits."""
        with open(self.path / ".lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def write_case(
        self,
        case_id: str,
        hu: np.ndarray,
        spacing_mm,
        affine: np.ndarray,
        *,
        split: str | None = None,
        source: str = "",
        labels: Mapping[str, Any] | None = None,
        masks: Mapping[str, np.ndarray] | None = None,
        views: Mapping[str, tuple[np.ndarray, Mapping[str, Any]]] | None = None,
        chunks: tuple[int, int, int] = DEFAULT_CT_CHUNKS,
    ) -> bool:
        """Write a whole case and publish it atomically.

        Returns False (and writes nothing) when a complete case with this id already exists or
        another process published it first. ``views`` maps a view name to ``(image, attrs)``.
        """
        if not is_safe_name(case_id) or case_id != sanitize_case_id(case_id):
            raise InputError(case_id, "case id is not sanitised (use sanitize_case_id)")
        if self.has_case(case_id):
            return False
        hu = np.asarray(hu)
        if hu.ndim != 3:
            raise InputError(source or case_id, f"CT must be 3D, got shape {hu.shape}")
        if not np.issubdtype(hu.dtype, np.integer):
            if not np.isfinite(hu).all():
                raise InputError(source or case_id, "CT has NaN or Inf voxels")
            hu = np.rint(hu)
        hu = np.clip(hu, -32768, 32767).astype(np.int16, copy=False)
        split = split or split_for(case_id)
        if split not in SPLITS:
            raise InputError(case_id, f"unknown split {split!r}")
        attrs = {
            "complete": True,
            "shape": list(hu.shape),
            "spacing_mm": [float(s) for s in spacing_mm],
            "affine": np.asarray(affine, dtype=float).tolist(),
            "split": split,
            "source": os.path.basename(str(source)),
            "labels": dict(labels or {}),
            "hu_min": int(hu.min()),
            "hu_max": int(hu.max()),
        }
        with self._staging_dir(f"case-{case_id}") as stage:
            _ensure_group(stage)  # attributes (with "complete") are written last, below
            write_array(stage / "ct", hu, chunks=chunks, fill_value=-1024)
            for name, m in (masks or {}).items():
                _ensure_group(stage / "masks")
                write_array(stage / "masks" / name, np.asarray(m, dtype=np.uint8), chunks=chunks)
            for view, (img, vattrs) in (views or {}).items():
                _ensure_group(stage / "xray")
                write_array(stage / "xray" / view, np.asarray(img, dtype=np.float32), attrs=vattrs)
            _write_json_atomic(stage / "zarr.json", _group_meta(attrs))
            try:
                os.rename(stage, self.cases_dir / case_id)
            except OSError:
                return False  # someone else published this case first (or a stale dir is there)
        return True

    def _publish_array(self, case: Case, rel: str, data: np.ndarray, attrs: Mapping[str, Any] | None,
                       chunks: tuple[int, ...] | None, fill_value: Any = 0) -> None:
        target = case.path / rel
        _ensure_group(target.parent)
        with self._staging_dir(f"arr-{case.case_id}") as stage:
            write_array(stage / "a", data, chunks=chunks, attrs=attrs, fill_value=fill_value)
            old = None
            if target.exists():
                old = stage / "old"
                os.rename(target, old)
            os.rename(stage / "a", target)

    def write_view(self, case_id: str, view: str, image: np.ndarray, attrs: Mapping[str, Any] | None = None) -> None:
        """Add or replace an X-ray view of a finished case (float32 [row, col] in [0, 1])."""
        img = np.asarray(image, dtype=np.float32)
        if img.ndim != 2:
            raise InputError(view, f"X-ray must be 2D, got shape {img.shape}")
        self._publish_array(self.case(case_id), f"xray/{view}", img, attrs, None)

    def write_latent(self, case_id: str, latent: np.ndarray, attrs: Mapping[str, Any] | None = None,
                     chunks: tuple[int, ...] | None = None) -> None:
        """Add or replace a case's stage-1 latent (C, x, y, z)."""
        self._publish_array(self.case(case_id), "latent", np.asarray(latent), attrs, chunks)

    def common_grid(self, case_ids: Sequence[str]) -> tuple[tuple[int, ...], tuple[float, ...]] | None:
        """``(shape, spacing_mm)`` most of ``case_ids`` share (ties: the first case's), or None for
        no case: the grid a model trained on them produces (read from the cases' attributes)."""
        counts: dict[tuple, int] = {}
        for cid in case_ids:
            c = self.case(cid)
            key = (tuple(int(v) for v in c.shape), tuple(float(v) for v in c.spacing_mm))
            counts[key] = counts.get(key, 0) + 1
        return max(counts, key=counts.get) if counts else None

    def set_split(self, case_id: str, split: str) -> bool:
        """Move a finished case to another split (its attributes rewritten atomically).
        Returns whether it changed."""
        if split not in SPLITS:
            raise InputError(case_id, f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        case = self.case(case_id)
        if case.split == split:
            return False
        with self.lock():
            meta = case.path / "zarr.json"
            doc = json.loads(meta.read_text())
            doc.setdefault("attributes", {})["split"] = split
            _write_json_atomic(meta, doc)
        return True

    def update_store_attrs(self, **updates: Any) -> None:
        with self.lock():
            meta = self.path / "zarr.json"
            root = json.loads(meta.read_text())
            root.setdefault("attributes", {}).update(updates)
            _write_json_atomic(meta, root)
            self.attrs = dict(root["attributes"])

    def clean_staging(self) -> int:
        """Remove the leftovers of killed writers from ``.staging/`` (safe while other writers
        run: a live writer's entry is kept, :func:`patching.data.staging.is_stale`). Every writer
        calls it before its first write; returns how many entries were removed."""
        return len(clean_stale(self.path / ".staging"))
