"""Streaming (case, tile) dataset over a store, resumable to the exact next tile.

Each epoch has a deterministic global list of items ``(case, tile start)``:

* ``mode="grid"`` — every tile of the grid (:func:`patching.tiling.grid.tile_starts`) of every case,
  for inference and validation;
* ``mode="jitter"`` — the same grid, each start moved by a random offset of up to half a stride
  per axis (clipped to the volume), for training: every region is seen once per epoch, never at
  the same offset twice.

With ``shuffle`` the list is permuted by a generator seeded from ``(seed, epoch)``; jitter
offsets likewise come from ``(seed, epoch)``. Nothing here touches a global RNG.

Sharding. Item ``p`` of the (remaining) global stream goes to rank ``p mod world_size``; within a
rank, consecutive blocks of ``batch_size`` items go round-robin to the DataLoader workers, which
is the order in which a ``DataLoader(in_order=True)`` hands their batches back. So after ``n``
batches a rank has consumed exactly its first ``n × batch_size`` items, and the global position
``g = n × batch_size × world_size`` (the same on every rank) identifies where every rank and
worker is. :meth:`state_dict` / :meth:`load_state_dict` carry ``{"epoch", "position"}``; resuming
— even onto another world size — continues with the very next items, none lost or repeated.

``even_shards=True`` (training) gives every rank the same number of items, so DDP ranks step in
lock-step; the at most ``world_size - 1`` items left over are different ones each epoch because
the permutation changes. ``even_shards=False`` (inference) gives every item to exactly one rank.

Reading a tile touches only the Zarr chunks it overlaps (``ct[x0:x1, y0:y1, z0:z1]``). A tile
reaching past a volume smaller than the tile is padded with air (-1024 HU).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from patching.data.spec import AIR_HU
from patching.data.store import Store
from patching.data.zarr_direct import chunk_reader
from patching.errors import InputError
from patching.tiling import hugepages as hugepages
from patching.tiling.grid import tile_starts

VIEW_ORDER = ("pa", "lateral")


@dataclass(frozen=True)
class TileItem:
    case_index: int
    start: tuple[int, int, int]


def _rng(seed: int, epoch: int, salt: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), int(salt)]))


def epoch_items(shapes: Sequence[Sequence[int]], tile: Sequence[int], overlap: float, *, mode: str,
                seed: int, epoch: int, shuffle: bool) -> list[TileItem]:
    """The global, deterministic item list of one epoch (pure function of its arguments)."""
    items: list[TileItem] = []
    jit = _rng(seed, epoch, 1)
    for ci, shape in enumerate(shapes):
        axes = []
        for size, t in zip(shape, tile):
            starts = tile_starts(int(size), int(t), overlap)
            axes.append(starts)
        for sx in axes[0]:
            for sy in axes[1]:
                for sz in axes[2]:
                    start = [sx, sy, sz]
                    if mode == "jitter":
                        for a, (size, t) in enumerate(zip(shape, tile)):
                            hi = max(0, int(size) - int(t))
                            half = max(1, int(t * (1 - overlap)) // 2)
                            start[a] = int(np.clip(start[a] + jit.integers(-half, half + 1), 0, hi))
                    items.append(TileItem(ci, (start[0], start[1], start[2])))
    if shuffle:
        order = _rng(seed, epoch, 2).permutation(len(items))
        items = [items[i] for i in order]
    return items


def shard_positions(num_items: int, position: int, rank: int, world_size: int, *, even: bool) -> range:
    """Global stream positions of ``rank``, from ``position`` on (see the module docstring)."""
    remaining = max(0, num_items - position)
    count = remaining // world_size if even else (remaining - rank + world_size - 1) // world_size
    return range(position + rank, position + rank + count * world_size, world_size)


def worker_positions(rank_positions: range, batch_size: int, worker: int, num_workers: int) -> list[int]:
    """The positions a DataLoader worker yields: batch-sized blocks, round-robin over workers."""
    out: list[int] = []
    n = len(rank_positions)
    for block_start in range(worker * batch_size, n, num_workers * batch_size):
        out.extend(rank_positions[block_start:block_start + batch_size])
    return out


class DecodedChunkCache:
    """LRU of decoded Zarr chunks, bounded in bytes.

    Written by hand because Zarr 3 has no decoded-chunk cache: with overlap 0.25 a pass over
    the 256×256×128 grid of a 512×512×604 volume touches every voxel ~2.9 times, and decoding
    (blosc-zstd) dominates a tile read. Reading chunk by chunk through this cache decodes each
    chunk once per pass while it stays in the budget; random (jittered) reads gain less.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self._data: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._readers: dict = {}  # key -> patching.data.zarr_direct.chunk_reader of its array (or None)

    def read(self, key, arr, start: Sequence[int], stop: Sequence[int], out: np.ndarray | None = None) -> np.ndarray:
        """``arr[start:stop]`` (per axis, inside the array) assembled from cached chunks, into
        ``out[:stop-start]`` when given (any dtype: the copy casts, e.g. int16 → float32)."""
        region = tuple(slice(0, b - a) for a, b in zip(start, stop))
        if self.max_bytes <= 0:
            data = np.asarray(arr[tuple(slice(a, b) for a, b in zip(start, stop))])
            if out is None:
                return data
            out[region] = data
            return out
        chunks, shape = arr.chunks, arr.shape
        if out is None:
            out = np.empty([b - a for a, b in zip(start, stop)], dtype=arr.dtype)
        ranges = [range(a // c, (b - 1) // c + 1) for a, b, c in zip(start, stop, chunks)]
        missing = [idx for idx in itertools.product(*ranges) if (key, *idx) not in self._data]
        if key not in self._readers:
            self._readers[key] = chunk_reader(arr)  # None: read through Zarr
        reader = self._readers[key]
        if missing and reader is not None:  # the store's layout: each chunk decoded on its own, no copy
            for idx in missing:
                block = reader(idx)
                self._data[(key, *idx)] = block
                self.bytes += block.nbytes
        elif missing:
            # One Zarr call for the bounding box of the missing chunks: Zarr decodes the chunks of
            # one call concurrently, while a call per chunk costs ~2 ms of overhead each.
            lo_idx = [min(m[a] for m in missing) for a in range(len(chunks))]
            hi_idx = [max(m[a] for m in missing) for a in range(len(chunks))]
            lo = [i * c for i, c in zip(lo_idx, chunks)]
            hi = [min((i + 1) * c, n) for i, c, n in zip(hi_idx, chunks, shape)]
            box = np.asarray(arr[tuple(slice(a, b) for a, b in zip(lo, hi))])
            for idx in itertools.product(*[range(a, b + 1) for a, b in zip(lo_idx, hi_idx)]):
                ck = (key, *idx)
                if ck in self._data:
                    continue
                sl = tuple(slice(i * c - c0, min((i + 1) * c, n) - c0) for i, c, c0, n in zip(idx, chunks, lo, shape))
                block = box[sl].copy()  # own memory: the box is freed after this loop
                self._data[ck] = block
                self.bytes += block.nbytes
        for idx in itertools.product(*ranges):
            ck = (key, *idx)
            block = self._data[ck]
            self._data.move_to_end(ck)
            lo = [i * c for i, c in zip(idx, chunks)]
            src = tuple(slice(max(a, c0) - c0, min(b, c0 + n) - c0) for a, b, c0, n in zip(start, stop, lo, block.shape))
            dst = tuple(slice(max(a, c0) - a, min(b, c0 + n) - a) for a, b, c0, n in zip(start, stop, lo, block.shape))
            out[dst] = block[src]
        while self.bytes > self.max_bytes and len(self._data) > 1:  # evict least recently used
            self.bytes -= self._data.popitem(last=False)[1].nbytes
        return out


def hu_tile_to_unit(hu: np.ndarray, window: tuple[float, float]) -> torch.Tensor:
    """int16 HU → float32 in [-1, 1], in place on one new tensor (4 passes; numpy's version
    of the same map allocates a temporary per step and is ~10× slower on a 256×256×128 tile)."""
    lo, hi = window
    scale = 2.0 / (hi - lo)
    return torch.from_numpy(hu).float().clamp_(lo, hi).mul_(scale).add_(-1.0 - lo * scale)


class TileDataset(IterableDataset):
    """Tiles of the cases of one split, as dicts of tensors (see :meth:`__iter__`).

    Args:
        store: a :class:`Store` or its path.
        split: "train", "val", "test" or None for all complete cases.
        tile: tile shape ``(x, y, z)`` in voxels.
        hu_window: HU range mapped to [-1, 1].
        mode: "grid" or "jitter".
        rank, world_size: this process's place in the job (sharding across ranks).
        batch_size, num_workers: as given to the DataLoader (sharding across workers).
        views: X-ray views to return, stacked in this order; a missing view is zeros with
            ``views_present`` False.
        xray_size: resize X-rays to ``(H, W)``; None keeps the stored size.
        cache_mb: budget of the decoded-chunk cache per worker (0 turns it off).
    """

    def __init__(self, store: Store | str, *, split: str | None, tile: Sequence[int],
                 hu_window: tuple[float, float] = (-1024.0, 1600.0), overlap: float = 0.25,
                 mode: str = "grid", shuffle: bool | None = None, seed: int = 0, rank: int = 0,
                 world_size: int = 1, batch_size: int = 1, num_workers: int = 0,
                 even_shards: bool | None = None, views: Sequence[str] = VIEW_ORDER,
                 xray_size: Sequence[int] | None = None, cache_mb: int = 256):
        super().__init__()
        if mode not in ("grid", "jitter"):
            raise InputError("tiles.mode", f"unknown mode {mode!r}; expected 'grid' or 'jitter'")
        if len(tile) != 3 or min(tile) < 1:
            raise InputError("tiles.tile", f"needs three positive sizes, got {tuple(tile)}")
        if not (0 <= rank < world_size) or batch_size < 1 or num_workers < 0:
            raise InputError("tiles", f"bad sharding: rank {rank}, world {world_size}, batch {batch_size}, workers {num_workers}")
        self.store_path = str(store.path if isinstance(store, Store) else store)
        store = Store(self.store_path)
        self.case_ids = store.case_ids(split)
        if not self.case_ids:
            raise InputError(self.store_path, f"no complete cases in split {split!r}")
        self.shapes = [store.case(c).shape for c in self.case_ids]
        self.tile = tuple(int(t) for t in tile)
        self.hu_window = hu_window
        self.overlap = float(overlap)
        self.mode = mode
        self.shuffle = (mode == "jitter") if shuffle is None else bool(shuffle)
        self.even = (mode == "jitter") if even_shards is None else bool(even_shards)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.views = tuple(views)
        self.xray_size = None if xray_size is None else tuple(int(s) for s in xray_size)
        self.epoch, self.position = 0, 0
        self._cases: dict[int, object] = {}  # per-process cache of opened cases (lazy)
        self._arrays: dict[int, object] = {}
        self._xray_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.chunk_cache = DecodedChunkCache(cache_mb * 2**20)

    # ---- position ----------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = int(epoch), 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "mode": self.mode,
                "num_cases": len(self.case_ids)}

    def load_state_dict(self, state: dict) -> None:
        if int(state.get("num_cases", len(self.case_ids))) != len(self.case_ids):
            raise InputError("dataset state", f"was saved for {state['num_cases']} cases, the store now has {len(self.case_ids)}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def epoch_items(self) -> list[TileItem]:
        return epoch_items(self.shapes, self.tile, self.overlap, mode=self.mode, seed=self.seed,
                           epoch=self.epoch, shuffle=self.shuffle)

    def __len__(self) -> int:
        """Items this rank yields in the rest of the current epoch (all its workers together)."""
        n = len(epoch_items(self.shapes, self.tile, self.overlap, mode="grid", seed=0, epoch=0, shuffle=False))
        return len(shard_positions(n, self.position, self.rank, self.world_size, even=self.even))

    def my_positions(self) -> list[int]:
        items = self.epoch_items()
        mine = shard_positions(len(items), self.position, self.rank, self.world_size, even=self.even)
        info = get_worker_info()
        worker, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None and nw != max(1, self.num_workers):
            raise InputError("DataLoader", f"num_workers={nw} but the dataset was built for {self.num_workers}")
        return worker_positions(mine, self.batch_size, worker, nw)

    # ---- reading -----------------------------------------------------------------------------
    def _case(self, ci: int):
        if ci not in self._cases:
            self._cases[ci] = Store(self.store_path).case(self.case_ids[ci])
        return self._cases[ci]

    def read_tile(self, ci: int, start: Sequence[int]) -> np.ndarray:
        """int16 HU of one tile, air-padded where it reaches past the volume."""
        case = self._case(ci)
        if ci not in self._arrays:
            self._arrays[ci] = case.ct
        stop = [min(s + t, n) for s, t, n in zip(start, self.tile, case.shape)]
        hu = self.chunk_cache.read(ci, self._arrays[ci], start, stop)
        if hu.shape != self.tile:
            pad = [(0, t - h) for t, h in zip(self.tile, hu.shape)]
            hu = np.pad(hu, pad, constant_values=AIR_HU)
        return hu

    def read_tile_unit(self, ci: int, start: Sequence[int]) -> torch.Tensor:
        """One tile as float32 in [-1, 1]: chunks are cast straight into the float tile and
        scaled in place (one fused pass; the clamp is skipped when the case's stored HU range
        lies inside the window). Equal to ``hu_tile_to_unit(read_tile(...))``."""
        case = self._case(ci)
        if ci not in self._arrays:
            self._arrays[ci] = case.ct
        stop = [min(s + t, n) for s, t, n in zip(start, self.tile, case.shape)]
        lo, hi = self.hu_window
        out = hugepages.empty(self.tile)  # a fresh 32 MiB tile: 2 MiB pages fault in ~2× cheaper
        if tuple(b - a for a, b in zip(start, stop)) != self.tile:
            out.fill_(AIR_HU)
        self.chunk_cache.read(ci, self._arrays[ci], start, stop, out=out.numpy())
        scale = 2.0 / (hi - lo)
        # offset + scale · x in one pass (mul_ then add_ is two)
        torch.add(torch.tensor(-1.0 - lo * scale, dtype=torch.float32), out, alpha=scale, out=out)
        if not (lo <= case.attrs.get("hu_min", lo - 1) and case.attrs.get("hu_max", hi + 1) <= hi and AIR_HU >= lo):
            out.clamp_(-1.0, 1.0)
        return out

    def _xrays(self, ci: int) -> tuple[torch.Tensor, torch.Tensor]:
        if ci not in self._xray_cache:  # small; read once per case and worker
            self._xray_cache[ci] = self._read_xrays(ci)
        return self._xray_cache[ci]

    def _read_xrays(self, ci: int) -> tuple[torch.Tensor, torch.Tensor]:
        case = self._case(ci)
        present = case.views()
        imgs, mask = [], []
        shape = self.xray_size
        for v in self.views:
            if v in present:
                img = case.xray(v)
                if shape is not None and img.shape != shape:
                    from patching.data.xray_io import resize_xray

                    img = resize_xray(img, shape)
                imgs.append(torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)))
                shape = shape or img.shape
                mask.append(True)
            else:
                imgs.append(None)
                mask.append(False)
        if shape is None:
            shape = (1, 1)
        imgs = [torch.zeros(shape) if im is None else im for im in imgs]
        return torch.stack(imgs), torch.tensor(mask)

    def __iter__(self) -> Iterator[dict]:
        """Yields dicts: ``image`` (1, x, y, z) float in [-1, 1]; ``start`` (3,) and
        ``volume_shape`` (3,) int64 voxels; ``case_id`` str; ``xray`` (V, H, W) in [0, 1];
        ``views_present`` (V,) bool; ``position`` int (global stream position)."""
        items = self.epoch_items()
        for p in self.my_positions():
            it = items[p]
            xr, present = self._xrays(it.case_index)
            yield {
                "image": self.read_tile_unit(it.case_index, it.start).unsqueeze(0),
                "start": torch.tensor(it.start, dtype=torch.int64),
                "volume_shape": torch.tensor(self.shapes[it.case_index], dtype=torch.int64),
                "case_id": self.case_ids[it.case_index],
                "xray": xr,
                "views_present": present,
                "position": p,
            }


class CaseStreamPosition:
    """Position bookkeeping for datasets with one item per case (whole volumes or latents).

    The engine's data-position contract (see the module docstring), shared by the GAN baselines'
    and stage 2's datasets. Subclasses set ``case_ids``, ``epoch``, ``position``, ``rank``,
    ``world_size``, ``even``, ``batch_size`` and ``num_workers``.
    """

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = int(epoch), 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "num_cases": len(self.case_ids)}

    def load_state_dict(self, state: dict) -> None:
        saved = int(state.get("num_cases", len(self.case_ids)))
        if saved != len(self.case_ids):
            raise InputError("dataset state", f"was saved for {saved} cases, the split now has {len(self.case_ids)}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def rank_positions(self) -> range:
        """Global stream positions this rank takes in the rest of the epoch."""
        return shard_positions(len(self.case_ids), self.position, self.rank, self.world_size, even=self.even)

    def __len__(self) -> int:
        return len(self.rank_positions())

    def my_positions(self) -> list[int]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None and num_workers != max(1, self.num_workers):
            raise InputError("DataLoader", f"num_workers={num_workers} but the dataset was built for {self.num_workers}")
        return worker_positions(self.rank_positions(), self.batch_size, worker, num_workers)
