"""Named presets. Presets are code: functions returning typed config dataclasses.

The data part of each preset (a :class:`patching.data.spec.VolumeSpec`) lives in :mod:`patching.data.spec`,
so every layer reads it; this module adds the engine's training section. Model and task
sections are in each task's own registry.
"""

from __future__ import annotations

from patching.checks import named_preset
from patching.data.spec import DATA_PRESETS, cpu_demo_data, ctpa_512_data, data_spec  # noqa: F401  (re-exported)

from .config import TrainConfig

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
    return named_preset(TRAIN_PRESETS, name)
