"""Named presets. Presets are code: functions returning typed config dataclasses.

This module starts with the data part of each preset (a :class:`patching.spec.VolumeSpec`);
training, model and task sections are added by the packages that need them.
"""

from __future__ import annotations

from patching.errors import InputError
from patching.spec import VolumeSpec

from .config import TrainConfig


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
    try:
        return DATA_PRESETS[name]()
    except KeyError:
        raise InputError("--preset", f"unknown preset {name!r}; known: {', '.join(sorted(DATA_PRESETS))}") from None


# --- training section (launch.config.TrainConfig) ------------------------------------------------
# The engine's `train.*` defaults per preset; a task may change some (its `train_defaults`),
# and `--set train.key=value` changes any.


def cpu_demo_train() -> TrainConfig:
    # Minutes on a laptop CPU: small batches, frequent logs and checkpoints.
    return TrainConfig(max_steps=200, batch_size=1, num_workers=1, log_every=10, ckpt_every=100, keep_last=2)


def ctpa_512_train() -> TrainConfig:
    # H100s: one 256×256×128 tile per GPU per micro-batch, several accumulated per step.
    return TrainConfig(max_steps=100_000, batch_size=1, grad_accum=4, num_workers=4, log_every=50,
                       ckpt_every=2000, keep_last=3)


def s_xr2ct_128_train() -> TrainConfig:
    # GPUs: one 128³ volume per process per step (the papers' batch of 1), no accumulation.
    return TrainConfig(max_steps=100_000, batch_size=1, grad_accum=1, num_workers=4, log_every=50,
                       ckpt_every=2000, keep_last=3)


TRAIN_PRESETS = {"cpu-demo": cpu_demo_train, "ctpa-512": ctpa_512_train, "s-xr2ct-128": s_xr2ct_128_train}


def train_spec(name: str) -> TrainConfig:
    try:
        return TRAIN_PRESETS[name]()
    except KeyError:
        raise InputError("--preset", f"unknown preset {name!r}; known: {', '.join(sorted(TRAIN_PRESETS))}") from None
