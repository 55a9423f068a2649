"""Training pairs for CNCL: whole axial slices streamed from the store, made low-dose on the fly.

Why whole 2D slices (not thin slabs or 3D tiles): the simulator's physics is per axial slice
(parallel-beam projection and FBP of an ``x × y`` plane), and a ray's noise depends on the
attenuation along its *whole* path through the body, so the low-dose version of a region needs
the entire slice, not a crop of it; and CNCL's predictors are 2D U-Nets. The networks then train
on a random ``patch × patch`` crop of each (low-dose, clean) pair.

Reading reuses :class:`patching.tiling.tiles.TileDataset` with a ``X_max × Y_max × 1`` tile (every case's
slice fits, smaller ones padded with air) on its ``grid`` mode, shuffled: every slice of the split
once per epoch, in a permutation drawn from ``(seed, epoch)``, sharded and resumable by the
engine's data-position contract (docs/training.md). The simulation and the crop draw from
``SeedSequence([seed, epoch, position, salt])``, so a sample depends only on its stream position —
not on the rank, the DataLoader worker, or whether the run was resumed.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from einops import rearrange
from torch.utils.data import IterableDataset

from patching.data.spec import hu_to_unit, unit_to_hu
from patching.data.store import Store
from patching.errors import InputError
from patching.projection.lowdose import LowDoseScanner, noise_hu
from patching.tiling.tiles import TileDataset

SIM_SALT = 11  # separates the simulation's stream from the tile order's


def sample_rng(seed: int, epoch: int, position: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), int(position), SIM_SALT]))


def lowdose_pair(hu: torch.Tensor, pixel_mm: float, dose: float, scanner: LowDoseScanner, patch: int,
                 rng: np.random.Generator, hu_window: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """A clean ``X×Y`` HU slice → ``(lowdose, clean)``, each ``1×patch×patch`` in [-1, 1] (the window,
    clipped: a scanner stores nothing below -1024 HU, and ``xray2ct denoise`` reads the same way).
    The crop is drawn after the counts, from the same generator."""
    with torch.no_grad():
        noisy = hu + noise_hu(hu[None], pixel_mm, dose, [rng], scanner)[0]
    x, y = hu.shape
    if x < patch or y < patch:
        raise InputError("data.patch", f"{patch} is larger than the slice ({x}×{y})")
    x0, y0 = int(rng.integers(0, x - patch + 1)), int(rng.integers(0, y - patch + 1))
    crop = (slice(x0, x0 + patch), slice(y0, y0 + patch))
    return hu_to_unit(noisy[crop], hu_window)[None], hu_to_unit(hu[crop], hu_window)[None]


class LowDoseSliceDataset(IterableDataset):
    """Yields ``{"lowdose", "image"}`` (``1×patch×patch`` float32 in [-1, 1]), ``case_id``, ``position``.

    Args:
        store: the store (path or :class:`Store`); split, seed, rank, world_size, batch_size and
            num_workers as for :class:`patching.tiling.tiles.TileDataset`.
        patch: side of the square crop; slices narrower than it are padded with air first.
        dose, scanner: the simulated scan (:mod:`patching.projection.lowdose`).
        hu_window: HU range mapped to [-1, 1].
    """

    def __init__(self, store: Store | str, *, split: str | None, patch: int, dose: float, scanner: LowDoseScanner,
                 hu_window: tuple[float, float], seed: int = 0, rank: int = 0, world_size: int = 1,
                 batch_size: int = 1, num_workers: int = 0):
        super().__init__()
        path = str(store.path if isinstance(store, Store) else store)
        opened = Store(path)
        ids = opened.case_ids(split)
        if not ids:
            raise InputError(path, f"no complete cases in split {split!r}")
        cases = [opened.case(c) for c in ids]
        self.pixel_mm = {c.case_id: 0.5 * (c.spacing_mm[0] + c.spacing_mm[1]) for c in cases}
        tile = (max(patch, *(c.shape[0] for c in cases)), max(patch, *(c.shape[1] for c in cases)), 1)
        self.tiles = TileDataset(path, split=split, tile=tile, hu_window=(-1024.0, 4000.0), overlap=0.0,
                                 mode="grid", shuffle=True, even_shards=True, seed=seed, rank=rank,
                                 world_size=world_size, batch_size=batch_size, num_workers=num_workers,
                                 views=("pa",))
        self.read_window = self.tiles.hu_window  # a wide window: the physics sees (almost) raw HU
        self.patch, self.dose, self.scanner = int(patch), float(dose), scanner
        self.hu_window = (float(hu_window[0]), float(hu_window[1]))
        self.seed = int(seed)

    # the engine's data-position contract, delegated to the tile stream
    def set_epoch(self, epoch: int) -> None:
        self.tiles.set_epoch(epoch)

    def state_dict(self) -> dict:
        return self.tiles.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.tiles.load_state_dict(state)

    def __len__(self) -> int:
        return len(self.tiles)

    def __iter__(self) -> Iterator[dict]:
        epoch = self.tiles.epoch
        for item in self.tiles:
            hu = unit_to_hu(rearrange(item["image"], "1 x y 1 -> x y"), self.read_window)
            rng = sample_rng(self.seed, epoch, item["position"])
            lowdose, clean = lowdose_pair(hu, self.pixel_mm[item["case_id"]], self.dose, self.scanner, self.patch,
                                          rng, self.hu_window)
            yield {"lowdose": lowdose, "image": clean, "case_id": item["case_id"], "position": item["position"]}
