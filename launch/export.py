"""``xray2ct export --checkpoint PATH --out DIR``: weights for sampling, as safetensors + JSON.

Writes into ``DIR``::

    <model>.safetensors        the weights to sample with: the EMA weights when the run kept an
                               EMA of that model, the raw weights otherwise
    <model>.raw.safetensors    the raw weights, only for models that have an EMA
    extra.{safetensors,json}   the task's extras (e.g. the latent scale factor), when any
    config.json                task name and import path, preset, step, the resolved config,
                               and which file holds which weights

:func:`load_weights` reads an exported directory *or* a checkpoint directory (the sampling
CLI accepts both). Nothing here unpickles anything.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from patching.errors import InputError, StorageError
from patching.staging import clean_stale, owner_tag
from patching.weights import EXPORT_FORMAT, RUN_KEYS, read_export_config

from . import checkpoint as ck


@dataclass
class Weights:
    """Weights of a run: ``weights[name]`` (EMA when present), ``raw[name]``, and metadata."""

    task: str
    task_ref: str
    preset: str
    step: int
    config: dict
    weights: dict[str, dict]
    raw: dict[str, dict]
    extra: Any


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """Export a checkpoint (or the newest one under an output dir) into ``out``.

    Every input is read and validated before anything is written (model names from
    ``meta.json`` are path-safe, see :func:`patching.checks.safe_name`); the files are written
    into a staging directory beside ``out`` and moved in at the end, so a failed export leaves
    nothing behind.
    """
    ckpt = ck.resolve_checkpoint(checkpoint, source="--checkpoint")
    meta = ck.read_meta(ckpt, RUN_KEYS)
    run = ck.load_json(ckpt / "config.json", {"config": dict})
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError("--out", f"{out} exists and is not a directory")
    sources = {}
    for name in meta["models"]:
        raw_path = ckpt / "models" / f"{name}.safetensors"
        ema_path = ckpt / "ema" / f"{name}.safetensors"
        sources[name] = (ck.load_tensors(raw_path), ck.load_tensors(ema_path) if ema_path.is_file() else None)
    has_extra = (ckpt / "extra.json").is_file()
    doc = {
        "format": EXPORT_FORMAT, "version": 1,
        "task": meta["task"], "task_ref": meta.get("task_ref", run.get("task_ref")), "preset": meta["preset"],
        "step": meta["step"], "source": str(ckpt.resolve()), "models": {}, "extra": has_extra,
        "config": run["config"],
    }
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StorageError.from_os("--out", f"cannot create {out.parent}", err) from None
    prefix = f".{out.name}.export-"
    clean_stale(out.parent, lambda n: n.startswith(prefix))  # left by a killed export of the same --out
    stage = out.parent / f"{prefix}{secrets.token_hex(6)}{owner_tag()}"
    try:
        stage.mkdir()
        files = doc["models"]
        for name, (raw, ema) in sources.items():
            md = {"model": name, "step": str(meta["step"]), "task": meta["task"]}
            if ema is not None:
                ck.save_tensors(stage / f"{name}.safetensors", ema, metadata={**md, "weights": "ema"})
                ck.save_tensors(stage / f"{name}.raw.safetensors", raw, metadata={**md, "weights": "raw"})
                files[name] = {"file": f"{name}.safetensors", "weights": "ema", "raw_file": f"{name}.raw.safetensors"}
            else:
                ck.save_tensors(stage / f"{name}.safetensors", raw, metadata={**md, "weights": "raw"})
                files[name] = {"file": f"{name}.safetensors", "weights": "raw"}
        if has_extra:
            for suffix in (".json", ".safetensors"):
                if (ckpt / f"extra{suffix}").is_file():
                    shutil.copyfile(ckpt / f"extra{suffix}", stage / f"extra{suffix}")
        (stage / "config.json").write_text(json.dumps(doc, indent=2) + "\n")
        if not out.exists():
            os.rename(stage, out)
        else:  # an existing directory: move the files in, config.json (what makes it an export) last
            for f in sorted(stage.iterdir(), key=lambda f: f.name == "config.json"):
                os.replace(f, out / f.name)
    except OSError as err:
        raise StorageError.from_os(out, "could not write the export", err) from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out


def load_weights(path: str | Path) -> Weights:
    """Weights from an exported directory or a checkpoint (directory, checkpoints root or run dir)."""
    p = Path(path)
    cfg_path = p / "config.json"
    if cfg_path.is_file() and not ck.is_checkpoint(p):
        doc = read_export_config(p)  # every `file` entry is one safe name inside p
        weights = {n: ck.load_tensors(p / f["file"]) for n, f in doc["models"].items()}
        raw = {n: ck.load_tensors(p / f["raw_file"]) if "raw_file" in f else weights[n] for n, f in doc["models"].items()}
        extra = ck.load_state(p / "extra") if doc.get("extra") else None
        return Weights(doc["task"], doc.get("task_ref") or "", doc["preset"], int(doc["step"]), doc["config"], weights, raw, extra)
    ckpt = ck.resolve_checkpoint(p, source="--checkpoint")
    meta = ck.read_meta(ckpt, RUN_KEYS)
    run = ck.load_json(ckpt / "config.json", {"config": dict})
    raw = {n: ck.load_tensors(ckpt / "models" / f"{n}.safetensors") for n in meta["models"]}
    weights = {n: ck.load_tensors(ckpt / "ema" / f"{n}.safetensors") if (ckpt / "ema" / f"{n}.safetensors").is_file() else raw[n]
               for n in meta["models"]}
    extra = ck.load_state(ckpt / "extra") if (ckpt / "extra.json").is_file() else None
    return Weights(meta["task"], meta.get("task_ref", ""), meta["preset"], int(meta["step"]), run["config"], weights, raw, extra)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xray2ct export", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a checkpoint directory, D/checkpoints, or a run directory D (its latest checkpoint)")
    p.add_argument("--out", required=True, metavar="DIR")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        out = export_checkpoint(args.checkpoint, args.out)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
