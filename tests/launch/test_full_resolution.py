"""benchmarks/full_resolution_cpu.py's code path at a reduced size: the ctpa-512 presets (tiny
widths, 32³ tiles) on 64×64×76 phantoms — 3×3×3 tiles per volume, a 16×16×19 latent (not a
cube), whole-latent and windowed sampling from PNG files, the NIfTI checked in nibabel and
SimpleITK, peak RSS per stage, encode/decode time per tile on two sizes."""

from __future__ import annotations

import json

from benchmarks.full_resolution_cpu import (
    VQGAN_WIDTHS,
    reduced_plan,
    run_pipeline,
    summarise,
    tile_scaling,
)
from tests.launch.toy_task import child_env


def test_full_resolution_pipeline_at_reduced_size(tmp_path):
    plan = reduced_plan({k: v for k, v in child_env().items() if k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")})
    result = run_pipeline(tmp_path, plan)
    stages = result["stages"]
    assert list(stages) == ["synth", "train-vqgan", "encode", "train-diffusion", "sample-whole", "sample-windowed"]
    assert all(s["seconds"] > 0 and 50 < s["peak_rss_mb"] <= s["peak_tree_rss_mb"] + 64 for s in stages.values())
    out = result["output"]
    assert out["ok"] and out["windowed"], out["checks"]
    assert out["shape"] == [64, 64, 76] and out["spacing_mm"] == [0.7, 0.7, 0.6]  # the preset's spacing
    meta = result["sample_meta"]
    assert meta["sample-whole"]["latent_shape"] == [16, 16, 19] and meta["sample-whole"]["window"] is None
    assert meta["sample-windowed"]["window"] == [8, 8, 8]
    rows = tile_scaling(tmp_path / "store.zarr", tmp_path / "runs" / "vqgan", plan.scaling_z)
    assert [r["encode_tiles"] for r in rows] == [27, 18] and [r["decode_tiles"] for r in rows] == [27, 18]
    doc = summarise(result, plan, rows)
    json.dumps(doc)  # JSON-ready
    assert doc["output"]["shape"] == [64, 64, 76] and doc["overrides"]["vqgan"][:3] == list(VQGAN_WIDTHS)
    assert set(doc["stages"]["encode"]) >= {"seconds", "peak_rss_mb"} and "cpu_seconds" in doc["note"]
    assert len(doc["load_average_at_end"]) == 3 and plan.extra_env["MALLOC_MMAP_THRESHOLD_"] == str(4 << 20)
