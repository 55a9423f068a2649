"""Whole volumes for the GAN baselines: one sample = a case's CT resampled to the model's cube
plus its X-rays resized to the model's X-ray size.

X2CT-GAN and X-Recon reconstruct a whole cubic volume from whole X-rays, so they train on
whole volumes, not on tiles. A case's int16 HU volume (any shape, e.g. 64³ for ``cpu-demo`` or
512×512×604 for ``ctpa-512``) is mapped to [-1, 1] by the preset's HU window (clipped), then
resampled to ``volume_size³`` (32³ for ``cpu_demo()``, 128³ X2CT-GAN, 224³ X-Recon) with
``torch.nn.functional.interpolate(mode="trilinear", align_corners=False)``: each axis is scaled
on its own (a non-cubic volume becomes a cube of anisotropic voxels, as in the papers'
preprocessing), and the interpolation is not antialiased (a factor-2 reduction averages 2×2×2
neighbours; larger factors subsample). X-rays are resized with
:func:`patching.data.xray_io.resize_xray` (antialiased bilinear). Volumes stay in the project's
[-1, 1]; the tasks map them to the papers' [0, 1] (``gan_baselines.common.to_model_range``).

Data position (docs/training.md, "Data-position contract"): each epoch is a deterministic
permutation of the split's cases, drawn from ``np.random.SeedSequence([seed, epoch, salt])``;
stream position ``p`` goes to rank ``p mod W`` counting from the resume position (every rank the
same number of cases, :func:`patching.tiling.tiles.shard_positions` with ``even=True``), and a rank's
batch-sized blocks go round-robin to its DataLoader workers
(:func:`patching.tiling.tiles.worker_positions`). ``state_dict()`` / ``load_state_dict()`` carry
``{"epoch", "position"}`` (global samples consumed in the epoch); a resumed run continues with
the very next case, on any number of processes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import IterableDataset

from patching.data.spec import hu_to_unit
from patching.data.store import Case, Store
from patching.data.xray_io import resize_xray
from patching.errors import InputError
from patching.tiling.tiles import CaseStreamPosition

ORDER_SALT = 7  # separates the case permutation from other (seed, epoch) streams


def resample_cube(unit: Tensor, size: int) -> Tensor:
    """A ``X×Y×Z`` (or ``B×C×X×Y×Z``) volume → ``size³`` by trilinear interpolation
    (``align_corners=False``); each axis is scaled independently. Returns the input's rank."""
    squeeze = unit.dim() == 3
    vol = unit[None, None] if squeeze else unit
    if tuple(vol.shape[-3:]) != (size, size, size):
        vol = F.interpolate(vol.float(), size=(size, size, size), mode="trilinear", align_corners=False)
    return vol[0, 0] if squeeze else vol


def resample_to_shape(unit: Tensor, shape: Sequence[int]) -> Tensor:
    """``B×C×X×Y×Z`` → ``B×C×shape`` by trilinear interpolation (``align_corners=False``)."""
    if tuple(unit.shape[-3:]) == tuple(shape):
        return unit
    return F.interpolate(unit.float(), size=tuple(int(s) for s in shape), mode="trilinear", align_corners=False)


def case_volume(case: Case, size: int, hu_window: tuple[float, float]) -> Tensor:
    """A case's CT as ``1×size³`` float32 in [-1, 1] (HU window, then trilinear to the cube)."""
    hu = torch.from_numpy(np.asarray(case.ct[...]))  # int16 [x, y, z], read whole
    return resample_cube(hu_to_unit(hu, hu_window), size).unsqueeze(0)


def case_xrays(case: Case, views: Sequence[str], size: int) -> dict[str, Tensor]:
    """A case's X-rays as ``{view: 1×size×size}`` float32 in [0, 1]."""
    present = case.views()
    out = {}
    for view in views:
        if view not in present:
            raise InputError(case.path, f"case has no {view!r} X-ray (views: {', '.join(present) or 'none'}); "
                                        "render it with `xray2ct data drr --store S`")
        img = resize_xray(case.xray(view), (size, size))
        out[view] = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)).unsqueeze(0)
    return out


def load_sample(case: Case, *, volume_size: int, xray_size: int, views: Sequence[str],
                hu_window: tuple[float, float]) -> dict:
    """One sample: ``ct`` (1×N×N×N, [-1, 1]), one ``1×S×S`` tensor per view, ``case_id``."""
    return {"ct": case_volume(case, volume_size, hu_window), **case_xrays(case, views, xray_size),
            "case_id": case.case_id}


def mean_volume(store: Store | str, split: str | None, size: int, hu_window: tuple[float, float], *,
                progress: bool = True) -> Tensor:
    """The voxel-wise mean of a split's CTs as the models see them: ``size³`` float32 in [-1, 1]
    (each case windowed and resampled by :func:`case_volume`, summed in float64 in the store's
    order, one case in memory at a time). S-XR2CT's template CT starts from it."""
    from tqdm.auto import tqdm

    opened = store if isinstance(store, Store) else Store(store)
    ids = opened.case_ids(split)
    if not ids:
        raise InputError(opened.path, f"no complete cases in split {split!r} to average")
    total = torch.zeros((size, size, size), dtype=torch.float64)
    for cid in tqdm(ids, desc="mean volume", unit="case", disable=not progress):
        total += case_volume(opened.case(cid), size, hu_window)[0].double()
    return (total / len(ids)).float()


def epoch_order(num_cases: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """Case indices in stream order for one epoch (pure function of its arguments)."""
    if not shuffle:
        return np.arange(num_cases)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), ORDER_SALT]))
    return rng.permutation(num_cases)


def psnr(pred: Tensor, target: Tensor, data_range: float) -> Tensor:
    """Peak signal-to-noise ratio in dB with an explicit ``data_range`` (same units as the inputs).

    ``10·log10(data_range² / MSE)``; pass the HU window width to compare HU volumes
    (2624 HU for the presets' window [-1024, 1600]). Returns a 0-d float64 tensor.
    """
    mse = torch.mean((pred.double() - target.double()) ** 2)
    return 10.0 * torch.log10(torch.as_tensor(float(data_range) ** 2, dtype=torch.float64) / mse.clamp_min(1e-20))


class VolumeDataset(CaseStreamPosition, IterableDataset):
    """Whole cases of one split as single samples (see the module docstring).

    Args:
        store: a :class:`Store` or its path.
        split: "train", "val", "test" or None for all complete cases.
        volume_size: side of the model's cube (the CT is resampled to ``volume_size³``).
        xray_size: side of the model's square X-rays.
        views: X-ray views the model takes (each case must have them).
        hu_window: HU range mapped to [-1, 1].
        seed: base seed; the case order depends on ``(seed, epoch)`` only, never on the rank.
        rank, world_size: this process's place in the job.
        batch_size, num_workers: as given to the DataLoader (blocks round-robin over workers).
        shuffle: permute the cases each epoch (training); False keeps the store's order.
        even_shards: every rank the same number of cases (training: DDP ranks step together;
            the at most ``world_size - 1`` left over differ each epoch); False gives each case
            to exactly one rank (evaluation).

    Yields dicts: ``ct`` (1×N×N×N float32 in [-1, 1]), ``pa`` / ``lateral`` (1×S×S float32 in
    [0, 1], the views asked for), ``case_id`` (str), ``position`` (int, global stream position).
    """

    def __init__(self, store: Store | str, *, split: str | None, volume_size: int, xray_size: int,
                 views: Sequence[str], hu_window: tuple[float, float], seed: int = 0, rank: int = 0,
                 world_size: int = 1, batch_size: int = 1, num_workers: int = 0, shuffle: bool = True,
                 even_shards: bool = True):
        super().__init__()
        if not (0 <= rank < world_size) or batch_size < 1 or num_workers < 0:
            raise InputError("data", f"bad sharding: rank {rank}, world {world_size}, batch {batch_size}, "
                                     f"workers {num_workers}")
        if volume_size < 1 or xray_size < 1:
            raise InputError("data", f"volume_size and xray_size must be >= 1, got {volume_size}, {xray_size}")
        self.store_path = str(store.path if isinstance(store, Store) else store)
        opened = Store(self.store_path)
        self.case_ids = opened.case_ids(split)
        if not self.case_ids:
            raise InputError(self.store_path, f"no complete cases in split {split!r}")
        self.views = tuple(views)
        for cid in self.case_ids:  # fail now, not in a worker after an hour of training
            missing = [v for v in self.views if v not in opened.case(cid).views()]
            if missing:
                raise InputError(opened.case(cid).path, f"case has no {', '.join(missing)} X-ray; the model needs "
                                 f"{', '.join(self.views)} (render them with `xray2ct data drr --store S`)")
        self.volume_size, self.xray_size = int(volume_size), int(xray_size)
        self.hu_window = (float(hu_window[0]), float(hu_window[1]))
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.shuffle, self.even = bool(shuffle), bool(even_shards)
        self.epoch, self.position = 0, 0
        self._store: Store | None = None  # opened lazily in each process (fork-safe)

    # ---- reading -----------------------------------------------------------------------------
    def sample(self, case_index: int) -> dict:
        if self._store is None:
            self._store = Store(self.store_path)
        case = self._store.case(self.case_ids[case_index])
        return load_sample(case, volume_size=self.volume_size, xray_size=self.xray_size, views=self.views,
                           hu_window=self.hu_window)

    def __iter__(self) -> Iterator[dict]:
        order = epoch_order(len(self.case_ids), self.seed, self.epoch, self.shuffle)
        for p in self.my_positions():
            yield {**self.sample(int(order[p])), "position": p}
