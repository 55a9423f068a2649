"""``xray2ct export --checkpoint PATH --out DIR``: the weights to sample with, diffusers-style.

``PATH`` is any weights path (:func:`patching.artifacts.format.resolve_weights`: a run directory, its
``checkpoints/``, the ``latest`` pointer, a ``step-N`` directory or another export). Writes
into ``DIR``::

    <network>/config.json      one folder per network the task declares (``task.networks``):
    <network>/diffusion_pytorch_model.safetensors
                               its class's ``save_pretrained`` output, so
                               ``VQGAN.from_pretrained(DIR / "vqgan")`` loads it in a plain
                               Python session; the EMA weights when the run kept them
    <model>.safetensors        any other model (a discriminator): the same weights, flat
    <model>.raw.safetensors    the raw weights of models that have an EMA
    extra.{safetensors,json}   the pipeline's settings (latent scale factor, VQ-GAN reference,
                               output geometry, HU window), when the task keeps any
    config.json                format, task name and import path, preset and its data spec,
                               step, the resolved run config, and where each model's weights are

:func:`load_weights` reads an export *or* a checkpoint through :mod:`patching.artifacts.format`, as
every sampler does. Nothing here unpickles anything.
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

from patching.artifacts.format import (
    EXPORT_FORMAT,
    EXPORT_VERSION,
    model_state,
    read_config,
    read_run,
    resolve_weights,
)
from patching.data.spec import DATA_PRESETS
from patching.data.staging import clean_stale, owner_tag
from patching.errors import InputError, StorageError

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


def _networks(meta: dict) -> dict:
    """The task's ``networks`` (model name → {key prefix: (folder, class, config section)}); ``{}``
    for a task that declares none or cannot be imported here (its models export flat)."""
    from .tasks import load_task

    try:
        _, task = load_task(str(meta.get("task_ref") or meta["task"]))
    except InputError:
        return {}
    return dict(getattr(task, "networks", None) or {})


def _save_networks(stage: Path, parts: dict, state: dict, run_cfg: dict, source: Path) -> dict[str, str]:
    """Each network of one model as ``stage/<folder>`` (``save_pretrained``); ``{prefix: folder}``."""
    folders = {}
    for prefix, (folder, cls, section) in parts.items():
        lead = f"{prefix}." if prefix else ""
        net = cls(read_config(cls.config_class, run_cfg.get(section), source))
        try:
            net.load_state_dict({k[len(lead):]: v for k, v in state.items() if k.startswith(lead)})
        except RuntimeError as err:
            raise InputError(source, f"{folder} weights do not match the saved config ({str(err).splitlines()[0]})") from None
        net.save_pretrained(stage / folder)
        folders[prefix] = folder
    return folders


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """Export the weights at ``checkpoint`` (any weights path) into ``out``.

    Every input is read and validated before anything is written (model names from
    ``meta.json`` are path-safe, see :func:`patching.checks.safe_name`); the files are written
    into a staging directory beside ``out`` and moved in at the end, so a failed export leaves
    nothing behind.
    """
    kind, where = resolve_weights(checkpoint)
    meta, run_cfg = read_run(kind, where)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError("--out", f"{out} exists and is not a directory")
    names = list(meta["models"])
    sources = {n: (model_state(kind, where, n, meta if kind == "export" else None),
                   model_state(kind, where, n, meta if kind == "export" else None, raw=True)[0]) for n in names}
    networks = _networks(meta)
    has_extra = (where / "extra.json").is_file() and (kind != "export" or bool(meta.get("extra")))
    spec = DATA_PRESETS[meta["preset"]]() if meta["preset"] in DATA_PRESETS else None
    doc = {
        "format": EXPORT_FORMAT, "version": EXPORT_VERSION,
        "task": meta["task"], "task_ref": meta.get("task_ref"), "preset": meta["preset"],
        "data": None if spec is None else {"shape": list(spec.shape), "spacing_mm": list(spec.spacing_mm),
                                           "hu_window": list(spec.hu_window)},
        "step": meta["step"], "source": str(where.resolve()), "models": {}, "extra": has_extra, "config": run_cfg,
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
        for name, ((state, weights), raw) in sources.items():
            md = {"model": name, "step": str(meta["step"]), "task": meta["task"]}
            if name in networks:
                files[name] = {"networks": _save_networks(stage, networks[name], state, run_cfg, where), "weights": weights}
            else:
                ck.save_tensors(stage / f"{name}.safetensors", state, metadata={**md, "weights": weights})
                files[name] = {"file": f"{name}.safetensors", "weights": weights}
            if weights == "ema":
                ck.save_tensors(stage / f"{name}.raw.safetensors", raw, metadata={**md, "weights": "raw"})
                files[name]["raw_file"] = f"{name}.raw.safetensors"
        if has_extra:
            for suffix in (".json", ".safetensors"):
                if (where / f"extra{suffix}").is_file():
                    shutil.copyfile(where / f"extra{suffix}", stage / f"extra{suffix}")
        (stage / "config.json").write_text(json.dumps(doc, indent=2) + "\n")
        if not out.exists():
            os.rename(stage, out)
        else:  # an existing directory: move the files in, config.json (what makes it an export) last
            for f in sorted(stage.iterdir(), key=lambda f: f.name == "config.json"):
                if f.is_dir() and (out / f.name).is_dir():
                    shutil.rmtree(out / f.name)
                os.replace(f, out / f.name)
    except OSError as err:
        raise StorageError.from_os(out, "could not write the export", err) from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out


def load_weights(path: str | Path) -> Weights:
    """Weights from any weights path (an export, a checkpoint, ``latest``, a run directory)."""
    kind, where = resolve_weights(path)
    meta, run_cfg = read_run(kind, where)
    doc = meta if kind == "export" else None
    weights = {n: model_state(kind, where, n, doc)[0] for n in meta["models"]}
    raw = {n: model_state(kind, where, n, doc, raw=True)[0] for n in meta["models"]}
    has_extra = (where / "extra.json").is_file() and (kind != "export" or bool(meta.get("extra")))
    extra = ck.load_state(where / "extra") if has_extra else None
    return Weights(meta["task"], meta.get("task_ref") or "", meta["preset"], int(meta["step"]), run_cfg, weights, raw, extra)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xray2ct export", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a run directory D, D/checkpoints, its latest pointer, a step-N checkpoint or an export")
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
