"""The latent cache: encode every case of a store with a trained VQ-GAN (``xray2ct encode``).

    summary = encode_store("data.zarr", "runs/vq")            # a run dir, checkpoint or export
    # cases/<id>/latent (D, X/f, Y/f, Z/f) float32 + store attrs latent_scale_factor, latent_vqgan

Weights are read from a training checkpoint (``D/checkpoints/step-N``, the ``latest`` pointer,
``D/checkpoints`` or the run directory ``D``: its newest checkpoint) or an ``xray2ct export``
directory, through :mod:`patching.artifacts.format` (safetensors and JSON only, nothing is unpickled;
stage packages never import ``launch``). The EMA weights are used when the run kept them (a
checkpoint's ``ema/vqgan.safetensors``; an export's ``vqgan/`` folder already holds them);
the HU window is the one the model was trained with (the task's extra state).

Every latent carries a reference to the weights that made it: ``weights_sha256`` (of the
tensors — names, dtypes, shapes, bytes — so a checkpoint and its export agree), step, source
path, and the codec settings (tile, overlap, HU window). A re-run skips cases whose latent has
the same identity (resumable after an interruption) and re-encodes stale ones.

Several processes (``accelerate launch ... -m launch.encode``, :mod:`launch.encode`) run the same
pieces: :func:`shard` gives each rank every ``W``-th case, :func:`encode_cases` encodes a list of
cases, and :func:`finish_scale_factor` runs once, on rank 0, after every shard is written.

The latent scale factor is ``1 / std`` of all training-split latents made by these weights
(Rombach et al.'s latent diffusion: unit-variance latents for the diffusion model), computed in
float64 and refused when it is not finite or the std is zero — a NaN scale factor would silently
poison every stage-2 run (MAISI users met exactly that).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from patching.artifacts.format import (
    model_state,
    read_config,
    read_extra,
    read_run,
    resolve_weights,
)
from patching.checks import resolve_device
from patching.data.store import Store
from patching.errors import InputError

from .codec import encode_volume
from .config import CodecConfig, VQGANConfig
from .model import VQGAN, load_vqgan_weights

TASK_NAME = "vqgan"
DEFAULT_HU_WINDOW = (-1024.0, 1600.0)  # both presets' window (patching.data.spec.VolumeSpec)
# The identity of a latent: these keys of the reference must match for a cached latent to be kept.
IDENTITY_KEYS = ("weights_sha256", "tile", "overlap", "hu_window")


# --- reading weights --------------------------------------------------------------------------------


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's content: names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class LoadedVQGAN:
    """A VQ-GAN ready to encode (``eval()``) with its codec settings and its reference."""

    model: VQGAN
    codec: CodecConfig
    hu_window: tuple[float, float]
    reference: dict  # JSON: task, preset, step, weights ("ema"/"raw"), source, file, weights_sha256, ...


def load_vqgan(path: str | Path, device: str | torch.device | None = None) -> LoadedVQGAN:
    """Load the VQ-GAN of a checkpoint or export (EMA weights when present).

    Raises :class:`InputError` for a path that is neither, for a checkpoint of another task
    ("checkpoint of another model"), and for weights that do not fit their saved config.
    """
    kind, where = resolve_weights(path)
    doc, run_cfg = read_run(kind, where)
    if doc["task"] != TASK_NAME:
        raise InputError(where, f"checkpoint of another model (task {doc['task']!r}); `xray2ct encode` needs a "
                                f"{TASK_NAME} checkpoint or export")
    model_cfg = read_config(VQGANConfig, run_cfg.get("model"), where)
    codec = read_config(CodecConfig, run_cfg.get("codec"), where)
    saved = read_extra(kind, where, doc).get("hu_window")
    hu_window = DEFAULT_HU_WINDOW if saved is None else (float(saved[0]), float(saved[1]))
    state, weights = model_state(kind, where, TASK_NAME, doc if kind == "export" else None)
    file = where  # what the weights were read from (named in errors and the reference)
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:  # NaN encoder outputs would be hidden by the quantizer (argmin picks code 0)
        raise InputError(file, f"has non-finite values in {len(bad)} tensors (e.g. {bad[0]!r}); "
                               "use an earlier checkpoint")
    model = VQGAN(model_cfg)
    load_vqgan_weights(model, state, str(file))
    if not bool(model.quantizer.initialized):
        raise InputError(file, "the codebook was never initialised (a checkpoint of step 0?)")
    device = resolve_device(device)  # a bad --device is one line, not a traceback at .to()
    model.to(device).eval()
    reference = {
        "task": TASK_NAME, "preset": doc.get("preset"), "step": int(doc.get("step", 0)), "weights": weights,
        "source": str(where.resolve()), "file": str(Path(file).resolve()), "weights_sha256": weights_sha256(state),
        "tile": list(codec.tile), "overlap": float(codec.overlap), "hu_window": list(hu_window),
        "downsample": model_cfg.downsample, "latent_dim": model_cfg.latent_dim,
    }
    return LoadedVQGAN(model, codec, hu_window, reference)


# --- the cache ----------------------------------------------------------------------------------------


def same_identity(a: dict | None, b: dict | None) -> bool:
    """Whether two references name the same weights and codec settings."""
    if not isinstance(a, dict) or not isinstance(b, dict):
        return False
    return all(json.dumps(a.get(k)) == json.dumps(b.get(k)) for k in IDENTITY_KEYS)


def _latent_reference(case) -> dict | None:
    if not case.has_latent:
        return None
    return dict(case.latent.attrs).get("vqgan")


def case_ids_to_encode(store: Store, split: str | None) -> list[str]:
    """The complete cases of the store (or of one split), sorted; InputError when there are none."""
    ids = store.case_ids(split)
    if not ids:
        raise InputError(store.path, f"no complete cases{'' if split is None else f' in split {split!r}'}")
    return ids


def shard(ids: list[str], rank: int, world_size: int) -> list[str]:
    """Rank ``rank``'s cases: every ``world_size``-th from position ``rank`` (sizes differ by at most one)."""
    return list(ids[rank::world_size])


def is_encoded(case, ref: dict) -> bool:
    """Whether the case already holds a latent of exactly these weights and codec settings."""
    return same_identity(_latent_reference(case), ref)


def encode_cases(store: Store, vq: LoadedVQGAN, ids: list[str], *, progress: bool = True,
                 on_case=None) -> tuple[list[str], list[str]]:
    """Encode ``ids`` into ``cases/<id>/latent``; ``(encoded, skipped)`` (skipped: already this
    latent). ``on_case(case_id)`` is called after each case, done or skipped."""
    ref, f = vq.reference, vq.model.cfg.downsample
    encoded, skipped = [], []
    for cid in tqdm(ids, desc="encode", unit="case", disable=not progress):
        case = store.case(cid)
        if is_encoded(case, ref):
            skipped.append(cid)
        else:
            try:
                latent = encode_volume(vq.model, case.ct, vq.codec.tile, vq.codec.overlap, hu_window=vq.hu_window,
                                       batch_size=vq.codec.batch_size)  # (D, X/f, Y/f, Z/f) float32
            except InputError as err:
                raise InputError(case.path, f"cannot be encoded: {err}") from None
            if not torch.isfinite(latent).all():
                raise InputError(vq.reference["file"], f"produced a non-finite latent for case {cid!r} (broken weights?)")
            store.write_latent(cid, latent.numpy(), attrs={"vqgan": ref, "downsample": f, "volume_shape": list(case.shape)},
                               chunks=(latent.shape[0], 64, 64, 64))
            encoded.append(cid)
        if on_case is not None:
            on_case(cid)
    return encoded, skipped


def finish_scale_factor(store: Store, ref: dict) -> dict:
    """The scale factor over the training split's latents of ``ref`` (once, after every case is
    written): stored in the store's attributes and returned with ``latent_std``/``mean``."""
    return _scale_factor(store, ref)


def encode_store(store_path: str | Path, vqgan_path: str | Path, *, split: str | None = None,
                 device: str | torch.device | None = None, progress: bool = True) -> dict:
    """Encode every complete case of a store (or of one split) into ``cases/<id>/latent``.

    Args:
        store_path: the store.
        vqgan_path: a vqgan checkpoint directory, run directory or export directory.
        split: ``train``, ``val``, ``test`` or ``None`` (all cases).
        device: where the VQ-GAN runs (default: CUDA when available, else CPU).
        progress: tqdm bar over cases.

    Returns:
        A JSON-ready summary: ``encoded`` and ``skipped`` case ids, ``latent_scale_factor``
        (``None`` when no training-split latent of these weights exists), ``latent_std``,
        ``latent_mean``, ``num_scale_cases`` and the ``vqgan`` reference.

    Raises:
        InputError: bad store or weights (see :func:`load_vqgan`), a case the codec cannot
            take (e.g. sizes not multiples of the downsampling factor), a non-finite latent,
            or a scale factor that would not be finite.
    """
    store = Store(store_path)
    ids = case_ids_to_encode(store, split)
    vq = load_vqgan(vqgan_path, device)
    encoded, skipped = encode_cases(store, vq, ids, progress=progress)
    summary = {"store": str(store.path), "encoded": encoded, "skipped": skipped, "vqgan": vq.reference}
    summary.update(finish_scale_factor(store, vq.reference))
    return summary


def _scale_factor(store: Store, ref: dict) -> dict:
    """``1 / std`` over the training-split latents of these weights, stored in the store attrs."""
    count, mean, m2, cases = 0, 0.0, 0.0, 0
    for cid in store.case_ids("train"):
        case = store.case(cid)
        if not same_identity(_latent_reference(case), ref):
            continue  # missing or made by other weights: not this latent space
        lat = np.asarray(case.latent[...], dtype=np.float64)
        # Chan et al.'s pairwise merge of (count, mean, M2): no E[x²] − E[x]² cancellation.
        n_b, mean_b = lat.size, float(lat.mean())
        m2_b = float(np.square(lat - mean_b).sum())
        delta, n = mean_b - mean, count + n_b
        mean += delta * n_b / n
        m2 += m2_b + delta * delta * count * n_b / n
        count, cases = n, cases + 1
    if not cases:
        return {"latent_scale_factor": None, "latent_std": None, "latent_mean": None, "num_scale_cases": 0}
    std = math.sqrt(m2 / count) if math.isfinite(m2) and m2 >= 0 else float("nan")
    if not math.isfinite(std) or std <= 1e-12 or not math.isfinite(1.0 / std):
        raise InputError(store.path, f"the training latents have std {std!r} over {cases} cases: the latent scale "
                                     "factor would not be finite (collapsed codebook or broken weights?)")
    scale = 1.0 / std
    store.update_store_attrs(latent_scale_factor=scale, latent_vqgan=ref, latent_std=std, latent_mean=mean,
                             latent_scale_cases=cases)
    return {"latent_scale_factor": scale, "latent_std": std, "latent_mean": mean, "num_scale_cases": cases}
