"""One way to name a preset: every preset table (data, training, stage 1, stage 2, each GAN task)
answers an unknown name with the same one-line ``--preset`` error that lists the known names."""

from __future__ import annotations

import pytest

from launch.presets import train_spec
from patching.checks import named_preset
from patching.data.spec import data_spec
from patching.errors import InputError
from stage1_vqgan.config import preset as stage1_preset
from stage2_diffusion.config import preset as stage2_preset


def test_named_preset_builds_the_named_one_and_names_the_known_ones():
    calls = []
    table = {"b": lambda: calls.append("b") or 2, "a": lambda: 1}
    assert named_preset(table, "b") == 2 and calls == ["b"]  # only the named factory runs
    with pytest.raises(InputError, match=r"--preset: unknown preset 'c' for toy; known: a, b$"):
        named_preset(table, "c", "toy")


@pytest.mark.parametrize("lookup", [train_spec, data_spec, stage1_preset, stage2_preset])
def test_every_preset_table_rejects_an_unknown_name_alike(lookup):
    assert lookup("cpu-demo") is not None
    with pytest.raises(InputError, match=r"--preset: unknown preset 'ctpa-1024'; known: .*cpu-demo.*ctpa-512"):
        lookup("ctpa-1024")
