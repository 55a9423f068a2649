"""Fixtures of the GAN baseline tests: a 6-phantom store and in-process training runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from patching.data.store import Store
from patching.data.synth_store import synthesize


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """6 phantoms of 32³ with 64² PA and lateral DRRs: 4 train, 1 val, 1 test."""
    path = tmp_path_factory.mktemp("gan") / "store.zarr"
    synthesize(Store(path, create=True), 6, (32, 32, 32), xray_size=64, workers=1, progress=False)
    return path


@pytest.fixture
def in_process():
    """Reset Accelerate's process state after an in-process training run."""
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
