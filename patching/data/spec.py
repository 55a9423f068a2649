"""What a volume looks like to a model: shape, spacing and HU window (a preset's data part).

The data part of every named preset is here (:data:`DATA_PRESETS`, :func:`data_spec`), in the
lowest layer, so a sampler can read a checkpoint's preset without importing ``launch``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from patching.checks import named_preset
from patching.errors import InputError

AIR_HU = -1024  # padding value for crop/pad and the floor of every HU window


@dataclass(frozen=True)
class VolumeSpec:
    """Target grid of a dataset.

    Args:
        shape: voxels along ``(x, y, z)`` in RAS+ order.
        spacing_mm: voxel size along ``(x, y, z)`` in millimetres.
        hu_window: ``(lo, hi)`` HU range mapped linearly to ``[-1, 1]`` for models.
    """

    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    hu_window: tuple[float, float] = (-1024.0, 1600.0)

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or any(int(s) < 1 for s in self.shape):
            raise InputError("spec.shape", f"needs three positive sizes, got {self.shape}")
        if len(self.spacing_mm) != 3 or any(not np.isfinite(s) or s <= 0 for s in self.spacing_mm):
            raise InputError("spec.spacing_mm", f"needs three positive spacings, got {self.spacing_mm}")
        lo, hi = self.hu_window
        if not hi > lo:
            raise InputError("spec.hu_window", f"needs lo < hi, got {self.hu_window}")
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "spacing_mm", tuple(float(s) for s in self.spacing_mm))
        object.__setattr__(self, "hu_window", (float(lo), float(hi)))

    @property
    def extent_mm(self) -> tuple[float, float, float]:
        return tuple(n * s for n, s in zip(self.shape, self.spacing_mm))  # type: ignore[return-value]

    def affine(self) -> np.ndarray:
        """RAS+ affine with the volume centred on the origin."""
        return centred_affine(self.shape, self.spacing_mm)


def centred_affine(shape, spacing_mm) -> np.ndarray:
    """4×4 RAS+ voxel-to-world affine: diagonal spacing, the volume centre at world (0, 0, 0)."""
    aff = np.eye(4)
    aff[:3, :3] = np.diag(spacing_mm)
    aff[:3, 3] = -0.5 * (np.asarray(shape, dtype=float) - 1) * np.asarray(spacing_mm, dtype=float)
    return aff


def hu_to_unit(hu, window: tuple[float, float]):
    """Map HU to [-1, 1] by the window (clipped). Works on numpy arrays and torch tensors."""
    lo, hi = window
    if isinstance(hu, torch.Tensor):
        x = hu.float()
        return ((x.clamp(lo, hi) - lo) / (hi - lo)) * 2.0 - 1.0
    x = np.asarray(hu, dtype=np.float32)
    return ((np.clip(x, lo, hi) - lo) / (hi - lo)) * 2.0 - 1.0


def unit_to_hu(u, window: tuple[float, float]):
    """Inverse of :func:`hu_to_unit` (float output; round and cast to int16 to store)."""
    lo, hi = window
    if isinstance(u, torch.Tensor):
        return (u.float().clamp(-1, 1) + 1.0) * 0.5 * (hi - lo) + lo
    x = np.asarray(u, dtype=np.float32)
    return (np.clip(x, -1, 1) + 1.0) * 0.5 * (hi - lo) + lo


# --- the data part of the named presets ---------------------------------------------------------


def cpu_demo_data() -> VolumeSpec:
    # 64³ phantoms covering a 360 mm chest field of view: small enough for a laptop CPU.
    return VolumeSpec(shape=(64, 64, 64), spacing_mm=(5.625, 5.625, 5.625), hu_window=(-1024.0, 1600.0))


def ctpa_512_data() -> VolumeSpec:
    # 512×512×604 CTPA grid (X-ray2CTPA's full resolution): 0.7 mm in-plane, 0.6 mm slices.
    return VolumeSpec(shape=(512, 512, 604), spacing_mm=(0.7, 0.7, 0.6), hu_window=(-1024.0, 1600.0))


def s_xr2ct_128_data() -> VolumeSpec:
    # S-XR2CT's / X2CT-GAN's LIDC protocol: CTs resampled to 1 mm and cropped to 320³; the models
    # work at 128³ (2.5 mm voxels) from 128² X-rays.
    return VolumeSpec(shape=(320, 320, 320), spacing_mm=(1.0, 1.0, 1.0), hu_window=(-1024.0, 1600.0))


DATA_PRESETS = {"cpu-demo": cpu_demo_data, "ctpa-512": ctpa_512_data, "s-xr2ct-128": s_xr2ct_128_data}


def data_spec(name: str) -> VolumeSpec:
    return named_preset(DATA_PRESETS, name)
