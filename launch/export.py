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
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from patching.errors import InputError

from . import checkpoint as ck

EXPORT_FORMAT = "xray2ct-weights"


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
    """Export a checkpoint (or the newest one under an output dir) into ``out``."""
    ckpt = ck.resolve_checkpoint(checkpoint, source="--checkpoint")
    meta = ck.read_meta(ckpt)
    run = ck.load_json(ckpt / "config.json")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError("--out", f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict] = {}
    for name in meta["models"]:
        raw_path = ckpt / "models" / f"{name}.safetensors"
        ema_path = ckpt / "ema" / f"{name}.safetensors"
        raw = ck.load_tensors(raw_path)
        md = {"model": name, "step": str(meta["step"]), "task": meta["task"]}
        if ema_path.is_file():
            ck.save_tensors(out / f"{name}.safetensors", ck.load_tensors(ema_path), metadata={**md, "weights": "ema"})
            ck.save_tensors(out / f"{name}.raw.safetensors", raw, metadata={**md, "weights": "raw"})
            files[name] = {"file": f"{name}.safetensors", "weights": "ema", "raw_file": f"{name}.raw.safetensors"}
        else:
            ck.save_tensors(out / f"{name}.safetensors", raw, metadata={**md, "weights": "raw"})
            files[name] = {"file": f"{name}.safetensors", "weights": "raw"}
    has_extra = (ckpt / "extra.json").is_file()
    if has_extra:
        for suffix in (".json", ".safetensors"):
            if (ckpt / f"extra{suffix}").is_file():
                shutil.copyfile(ckpt / f"extra{suffix}", out / f"extra{suffix}")
    doc = {
        "format": EXPORT_FORMAT, "version": 1,
        "task": meta["task"], "task_ref": meta.get("task_ref", run.get("task_ref")), "preset": meta["preset"],
        "step": meta["step"], "source": str(ckpt.resolve()), "models": files, "extra": has_extra,
        "config": run["config"],
    }
    (out / "config.json").write_text(json.dumps(doc, indent=2) + "\n")
    return out


def load_weights(path: str | Path) -> Weights:
    """Weights from an exported directory or a checkpoint (directory, checkpoints root or run dir)."""
    p = Path(path)
    cfg_path = p / "config.json"
    if cfg_path.is_file() and not ck.is_checkpoint(p):
        doc = ck.load_json(cfg_path)
        if doc.get("format") != EXPORT_FORMAT:
            raise InputError(cfg_path, "not an xray2ct export (no format marker); give a checkpoint or export directory")
        weights = {n: ck.load_tensors(p / f["file"]) for n, f in doc["models"].items()}
        raw = {n: ck.load_tensors(p / f["raw_file"]) if "raw_file" in f else weights[n] for n, f in doc["models"].items()}
        extra = ck.load_state(p / "extra") if doc.get("extra") else None
        return Weights(doc["task"], doc.get("task_ref") or "", doc["preset"], int(doc["step"]), doc["config"], weights, raw, extra)
    ckpt = ck.resolve_checkpoint(p, source="--checkpoint")
    meta = ck.read_meta(ckpt)
    run = ck.load_json(ckpt / "config.json")
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
