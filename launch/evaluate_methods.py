"""The methods ``xray2ct evaluate`` scores, behind one small adapter each.

Every method is a :class:`Method`: ``name``, ``kind``, ``stochastic``, ``info`` (what it was
loaded from, for the report) and ``reconstruct(case, *, seed, num_samples) -> (K, X, Y, Z)`` HU
at the case's shape. A method whose own output grid differs from the case's is resampled by
trilinear interpolation (``align_corners=False``) and ``info["resampled"]`` / the per-case
``resampled`` flag say so.

- :class:`ReconstructorMethod` — any X-ray → CT method (diffusion, X2CT-GAN, X-Recon, ...)
  through its :class:`patching.artifacts.reconstruct.Reconstructor`, loaded by
  :func:`patching.artifacts.reconstruct.load_reconstructor` from the checkpoint's task. The case's stored X-rays
  of the views the model takes; a stochastic method draws ``K`` samples per case from a seed
  derived from ``--seed`` and the case id (:func:`case_seed`), so a case gets the same samples
  whichever process reconstructs it.
- :class:`MeanVolumeMethod` — the ``mean-train-volume`` baseline (:func:`mean_train_volume`).
"""

from __future__ import annotations

import abc
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from patching.artifacts.reconstruct import to_shape
from patching.data.store import Case, Store
from patching.errors import InputError

MEAN_BASELINE = "mean-train-volume"


def case_seed(seed: int, case_id: str) -> int:
    """The sampling seed of one case: depends on ``seed`` and the case id only (not on the order
    or the process that reconstructs it)."""
    return int(np.random.SeedSequence([int(seed), zlib.crc32(case_id.encode())]).generate_state(1)[0])


class Method(abc.ABC):
    """One row of the evaluation (see the module docstring)."""

    name: str
    kind: str
    stochastic: bool = False
    source: str = ""
    info: dict
    views: tuple[str, ...] = ()  # the X-ray views the method reconstructs from (none: a baseline)

    @abc.abstractmethod
    def reconstruct(self, case: Case, *, seed: int = 0, num_samples: int = 1) -> np.ndarray:
        """``(K, X, Y, Z)`` HU at ``case.shape`` (K = 1 for deterministic methods)."""

    def samples(self, case: Case, *, seed: int = 0, num_samples: int = 1) -> Iterator[np.ndarray]:
        """The volumes of :meth:`reconstruct` one at a time (so K samples need not be held at once)."""
        yield from self.reconstruct(case, seed=seed, num_samples=num_samples)

    grid: tuple[int, int, int]  # the method's output grid

    def resampled(self, case: Case) -> bool:
        """Whether this method's output for ``case`` was interpolated to the case's grid."""
        return tuple(case.shape) != tuple(self.grid)


class ReconstructorMethod(Method):
    def __init__(self, name: str, path: str | Path, device: str | torch.device, *, steps: int | None = None,
                 guidance: float | None = None, drr_guidance: int | None = None):
        from launch.tasks import RECONSTRUCTOR_HINTS, RECONSTRUCTORS
        from patching.artifacts.reconstruct import load_reconstructor

        self.name, self.source = name, str(path)
        self.rec = load_reconstructor(path, RECONSTRUCTORS, RECONSTRUCTOR_HINTS, device=device, steps=steps, guidance=guidance,
                                      drr_guidance=drr_guidance)
        self.kind, self.stochastic, self.grid = self.rec.task, self.rec.stochastic, tuple(self.rec.grid)
        self.views = tuple(self.rec.views)
        self.info = {**self.rec.info(), "kind": self.kind, "source": self.source, "resolved": str(self.rec.source)}
        self.info.pop("task", None)

    def reconstruct(self, case: Case, *, seed: int = 0, num_samples: int = 1) -> np.ndarray:
        return np.stack(list(self.samples(case, seed=seed, num_samples=num_samples)))

    def samples(self, case: Case, *, seed: int = 0, num_samples: int = 1) -> Iterator[np.ndarray]:
        stored = case.views()
        present = [v for v in self.rec.views if v in self.rec.required_views or v in stored]
        if not present:
            raise InputError(case.path, f"has none of the X-ray views the model takes ({', '.join(self.rec.views)})")
        seed = case_seed(seed, case.case_id) if self.stochastic else 0
        yield from self.rec.iter_samples({v: case.xray(v) for v in present}, seed=seed,
                                         num_samples=num_samples if self.stochastic else 1, shape=case.shape)


class MeanVolumeMethod(Method):
    """The voxel-wise mean of the training CTs (clipped to the HU window), whatever the X-rays."""

    kind = "baseline"
    stochastic = False

    def __init__(self, mean: np.ndarray, info: dict):
        self.name, self.source, self.mean, self.grid = MEAN_BASELINE, "train split", mean, tuple(mean.shape)
        self.info = {"kind": self.kind, "source": self.source, "output_grid": list(mean.shape), "stochastic": False,
                     **info}

    def reconstruct(self, case: Case, *, seed: int = 0, num_samples: int = 1) -> np.ndarray:
        return to_shape(self.mean, case.shape)[None]



def load_method(name: str, path: str | Path, *, device: str | torch.device = "cpu", steps: int | None = None,
                guidance: float | None = None, drr_guidance: int | None = None) -> Method:
    """The adapter for the checkpoint, run, ``latest`` file or export at ``path``.

    Raises :class:`InputError` (or whatever the loader raises) when it cannot be loaded.
    """
    return ReconstructorMethod(name, path, device, steps=steps, guidance=guidance, drr_guidance=drr_guidance)


def train_sum(store: Store, window: tuple[float, float], *, rank: int = 0, world_size: int = 1,
              progress: bool = True) -> tuple[np.ndarray, dict]:
    """This process's part of the ``mean-train-volume`` baseline: ``(int32 sum, info)`` of the train
    CTs ``train_ids[rank::world_size]`` clipped to ``window``.

    Streaming: one CT in memory at a time, summed into an int32 accumulator (clipped HU are
    integers, so the sum is exact and the same in any order: the all-reduced sums of several
    processes equal the single-process sum bit for bit). CTs of another shape than the most
    common one are resampled to it (trilinear, rounded to integer HU), counted in
    ``info["resampled"]``. Divide the (all-reduced) sum by ``info["num_train"]``: :func:`mean_from_sum`.
    """
    ids = store.case_ids("train")
    if not ids:
        raise InputError(store.path, "has no train cases; the mean-train-volume baseline needs them "
                                     "(or pass --no-mean-baseline)")
    shapes = Counter(store.case(cid).shape for cid in ids)
    shape = max(shapes, key=lambda s: (shapes[s], s))
    lo, hi = window
    total = np.zeros(shape, dtype=np.int32)
    for cid in tqdm(ids[rank::world_size], desc=MEAN_BASELINE, unit="case", disable=not progress):
        ct = np.asarray(store.case(cid).ct[...])
        if ct.shape != shape:
            ct = np.rint(to_shape(ct, shape))
        total += np.clip(ct, lo, hi).astype(np.int32)
    info = {"num_train": len(ids), "shape": list(shape), "window": [float(lo), float(hi)],
            "resampled_train_cases": sum(n for s, n in shapes.items() if s != shape)}
    return total, info


def mean_from_sum(total: np.ndarray, info: dict) -> np.ndarray:
    """The mean volume (float32) from the summed train CTs of :func:`train_sum`."""
    return (np.asarray(total).astype(np.float64) / info["num_train"]).astype(np.float32)
