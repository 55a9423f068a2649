"""Cached stage-1 latents with their X-rays for the diffusion task.

One sample = one case: its latent ``cases/<id>/latent`` (written by ``xray2ct encode``), scaled
by the store's ``latent_scale_factor`` (unit variance), whole or a random crop, plus the case's
X-rays resized to the encoder's image size. Only latents made by the store's ``latent_vqgan``
(the weights the scale factor was computed for) are used; a store that was never encoded is an
input error ("run `xray2ct encode` first").

Data position (docs/training.md, "Data-position contract"), as
:class:`gan_baselines.data.VolumeDataset`: each epoch is a permutation of the split's cases
drawn from ``(seed, epoch)``; :func:`patching.tiling.tiles.shard_positions` gives rank ``r`` the
stream positions ``P + r + k·W`` (``even=True``: every rank the same number) and
:func:`patching.tiling.tiles.worker_positions` hands batch-sized blocks round-robin to the DataLoader
workers. A crop's start is drawn from ``(seed, epoch, position)``, never from worker RNG, so a
resumed run sees the very same crops.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset

from patching.data.store import Store
from patching.data.xray_io import resize_xray
from patching.errors import InputError
from patching.tiling.tiles import CaseStreamPosition
from stage1_vqgan.encode import same_identity

ORDER_SALT = 11  # case permutation stream
CROP_SALT = 12  # crop start stream


def latent_source(store: Store) -> tuple[float, dict]:
    """``(latent_scale_factor, latent_vqgan reference)`` of an encoded store, else InputError."""
    attrs = store.attrs if hasattr(store, "attrs") else {}
    scale, ref = attrs.get("latent_scale_factor"), attrs.get("latent_vqgan")
    if scale is None or not isinstance(ref, dict):
        raise InputError(store.path, "has no cached latents (no latent_scale_factor / latent_vqgan); "
                                     "run `xray2ct encode --store S --vqgan V` first")
    scale = float(scale)
    if not np.isfinite(scale) or scale <= 0:
        raise InputError(store.path, f"latent_scale_factor {scale!r} is not a positive finite number; "
                                     "re-run `xray2ct encode`")
    return scale, ref


def encoded_cases(store: Store, split: str | None, ref: dict) -> tuple[list[str], list[tuple[int, ...]]]:
    """``(case ids, latent shapes)`` of the split's cases whose latent was made by ``ref`` (the
    store's ``latent_vqgan``); latents of other weights are stale and left out."""
    ids, shapes = [], []
    for cid in store.case_ids(split):
        case = store.case(cid)
        if case.has_latent and same_identity(dict(case.latent.attrs).get("vqgan"), ref):
            ids.append(cid)
            shapes.append(tuple(int(s) for s in case.latent.shape))
    return ids, shapes


def epoch_order(num_cases: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(num_cases)
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), ORDER_SALT])).permutation(num_cases)


def crop_start(shape: Sequence[int], crop: Sequence[int], seed: int, epoch: int, position: int) -> tuple[int, int, int]:
    """Uniform crop start (per axis in ``[0, n - c]``), a pure function of ``(seed, epoch, position)``."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), int(position), CROP_SALT]))
    return tuple(int(rng.integers(0, int(n) - int(c) + 1)) for n, c in zip(shape, crop, strict=True))


class LatentDataset(CaseStreamPosition, IterableDataset):
    """Scaled latents + X-rays of one split (see the module docstring).

    Args:
        store: a :class:`Store` or its path (encoded with ``xray2ct encode``).
        split: "train", "val", "test" or None (all complete cases).
        image_size: side of the encoder's square X-rays.
        views: the encoder's view order (``("pa", "lateral")``); a case missing a view gets a zero
            image and ``views_present`` False (the encoder substitutes its learned tokens).
        crop: latent crop ``(x, y, z)`` or None for the whole latent.
        seed, rank, world_size, batch_size, num_workers, shuffle, even_shards: as
            :class:`gan_baselines.data.VolumeDataset`.

    Yields dicts: ``latent`` (C, x, y, z) float32 (scaled), ``start`` (3,) int64 (crop start, 0s
    for the whole latent), ``latent_shape`` (3,) int64 (the whole latent), ``xray`` (V, S, S)
    float32 in [0, 1], ``views_present`` (V,) bool, ``case_id`` str, ``position`` int.
    """

    def __init__(self, store: Store | str, *, split: str | None, image_size: int, views: Sequence[str],
                 crop: Sequence[int] | None = None, seed: int = 0, rank: int = 0, world_size: int = 1,
                 batch_size: int = 1, num_workers: int = 0, shuffle: bool = True, even_shards: bool = True):
        super().__init__()
        if not (0 <= rank < world_size) or batch_size < 1 or num_workers < 0:
            raise InputError("data", f"bad sharding: rank {rank}, world {world_size}, batch {batch_size}, "
                                     f"workers {num_workers}")
        opened = store if isinstance(store, Store) else Store(store)
        self.store_path = str(opened.path)
        self.scale_factor, self.vqgan = latent_source(opened)
        ids, shapes = encoded_cases(opened, split, self.vqgan)
        if not ids:
            raise InputError(self.store_path, f"no case{'' if split is None else f' of split {split!r}'} has a latent "
                                              "of the store's latent_vqgan; run `xray2ct encode` first")
        self.case_ids, self.shapes = ids, shapes
        self.crop = None if crop is None else tuple(int(c) for c in crop)
        if self.crop is not None:
            small = [(cid, s) for cid, s in zip(ids, shapes, strict=True) if any(c > n for c, n in zip(self.crop, s[1:], strict=True))]
            if small:
                raise InputError("data.crop", f"{self.crop} is larger than the latent {small[0][1][1:]} of case "
                                              f"{small[0][0]!r}")
        elif len({s for s in shapes}) > 1 and batch_size > 1:
            raise InputError("data.crop", f"latents differ in shape ({sorted(set(shapes))[:2]} ...): set a crop size "
                                          "or train.batch_size=1")
        self.image_size, self.views = int(image_size), tuple(views)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.shuffle, self.even = bool(shuffle), bool(even_shards)
        self.epoch, self.position = 0, 0
        self._store: Store | None = None

    # ---- reading -----------------------------------------------------------------------------
    def xrays(self, case) -> tuple[torch.Tensor, torch.Tensor]:
        present = case.views()
        size = (self.image_size, self.image_size)
        imgs, mask = [], []
        for v in self.views:
            if v in present:
                img = resize_xray(np.asarray(case.xray(v), dtype=np.float32), size)
                imgs.append(torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)))
                mask.append(True)
            else:
                imgs.append(torch.zeros(size))
                mask.append(False)
        return torch.stack(imgs), torch.tensor(mask)

    def sample(self, case_index: int, position: int) -> dict:
        if self._store is None:
            self._store = Store(self.store_path)
        case = self._store.case(self.case_ids[case_index])
        full = self.shapes[case_index][1:]
        if self.crop is None:
            start = (0, 0, 0)
            lat = np.asarray(case.latent[...], dtype=np.float32)
        else:
            start = crop_start(full, self.crop, self.seed, self.epoch, position)
            sl = tuple(slice(s, s + c) for s, c in zip(start, self.crop, strict=True))
            lat = np.asarray(case.latent[(slice(None), *sl)], dtype=np.float32)
        xr, present = self.xrays(case)
        return {
            "latent": torch.from_numpy(lat) * self.scale_factor,
            "start": torch.tensor(start, dtype=torch.int64),
            "latent_shape": torch.tensor(full, dtype=torch.int64),
            "xray": xr,
            "views_present": present,
            "case_id": case.case_id,
        }

    def __iter__(self) -> Iterator[dict]:
        order = epoch_order(len(self.case_ids), self.seed, self.epoch, self.shuffle)
        for p in self.my_positions():
            yield {**self.sample(int(order[p]), p), "position": p}


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Tensors only (case ids and positions stay on the host)."""
    return {k: torch.stack([s[k] for s in samples]) for k in ("latent", "start", "latent_shape", "xray", "views_present")}
