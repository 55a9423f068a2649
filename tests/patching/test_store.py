"""The Zarr v3 case store: layout, atomic publication, sanitised ids, splits, concurrency."""

from __future__ import annotations

import json
import multiprocessing as mp

import numpy as np
import pytest
import zarr

from launch.cli_data import inspect_table
from patching.data.spec import centred_affine
from patching.data.store import Store, sanitize_case_id, split_by_index, split_for
from patching.errors import InputError


def _hu(shape=(12, 10, 8), seed=0):
    return np.random.default_rng(seed).integers(-1024, 2000, size=shape).astype(np.int16)


def test_write_and_lazy_read_round_trip(tmp_path):
    s = Store(tmp_path / "s.zarr", create=True)
    hu = _hu()
    aff = centred_affine(hu.shape, (1.5, 1.5, 2.0))
    mask = (hu > 1000).astype(np.uint8)
    views = {"pa": (np.full((6, 7), 0.25, np.float32), {"view": "pa"})}
    assert s.write_case("a", hu, (1.5, 1.5, 2.0), aff, split="val", labels={"embolus": True},
                        masks={"embolus": mask}, views=views)
    c = s.case("a")
    assert isinstance(c.ct, zarr.Array) and c.ct.dtype == np.int16
    np.testing.assert_array_equal(c.ct[2:5, 1:3, 4:8], hu[2:5, 1:3, 4:8])
    np.testing.assert_array_equal(c.mask("embolus")[...], mask)
    assert c.spacing_mm == (1.5, 1.5, 2.0) and c.split == "val" and c.labels == {"embolus": True}
    np.testing.assert_allclose(c.affine, aff)
    assert c.views() == ["pa"] and c.xray("pa").shape == (6, 7)
    assert c.attrs["hu_min"] == hu.min() and c.attrs["hu_max"] == hu.max()
    # plain Zarr v3: any client opens it
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert g["cases/a/ct"].shape == hu.shape and g.metadata.zarr_format == 3
    with pytest.raises(InputError, match="no 'lateral' X-ray"):
        c.xray("lateral")


def test_rewrite_is_skipped_and_views_latents_replace_atomically(tmp_path):
    s = Store(tmp_path / "s.zarr", create=True)
    s.write_case("a", _hu(), (1, 1, 1), np.eye(4))
    assert not s.write_case("a", _hu(seed=1), (1, 1, 1), np.eye(4))
    np.testing.assert_array_equal(s.case("a").ct[...], _hu())
    s.write_view("a", "lateral", np.zeros((4, 4)))
    s.write_view("a", "lateral", np.ones((4, 4)), {"v": 2})
    assert s.case("a").xray("lateral").mean() == 1.0 and s.case("a").xray_attrs("lateral") == {"v": 2}
    s.write_latent("a", np.ones((4, 3, 3, 2), np.float32), {"scale": 0.5})
    assert s.case("a").has_latent and s.case("a").latent.shape == (4, 3, 3, 2)
    assert s.incomplete() == []


def test_incomplete_cases_are_invisible(tmp_path):
    s = Store(tmp_path / "s.zarr", create=True)
    s.write_case("done", _hu(), (1, 1, 1), np.eye(4))
    # a writer that died before publishing leaves only staging; a foreign half-written group
    # without the completion flag is not a case either
    (s.path / ".staging" / "case-x-123").mkdir()
    half = s.cases_dir / "half"
    half.mkdir()
    (half / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}))
    assert s.case_ids() == ["done"]
    assert {p.name for p in s.incomplete()} == {"case-x-123", "half"}
    with pytest.raises(InputError):
        s.case("half")
    table = inspect_table(s)
    assert "done" in table and "incomplete" in table and "half" in table


@pytest.mark.parametrize("raw,expected", [("../../x", "x"), ("..", None), ("a b/c", "a_b_c"),
                                          (".hidden", "hidden"), ("LIDC-0001", "LIDC-0001"), ("", None)])
def test_sanitize_case_id_stays_inside_the_store(tmp_path, raw, expected):
    cid = sanitize_case_id(raw)
    if expected is not None:
        assert cid == expected
    assert "/" not in cid and not cid.startswith(".") and cid not in ("", ".", "..")
    s = Store(tmp_path / "s.zarr", create=True)
    s.write_case(cid, _hu((4, 4, 4)), (1, 1, 1), np.eye(4))
    assert (s.cases_dir / cid).resolve().parent == s.cases_dir.resolve()
    with pytest.raises(InputError):
        s.write_case("../evil", _hu((4, 4, 4)), (1, 1, 1), np.eye(4))


def test_splits_are_deterministic():
    ids = [f"case-{i}" for i in range(400)]
    splits = [split_for(c) for c in ids]
    assert splits == [split_for(c) for c in ids]
    frac = {k: splits.count(k) / len(ids) for k in ("train", "val", "test")}
    assert 0.7 < frac["train"] < 0.9 and frac["val"] > 0.05 and frac["test"] > 0.05
    by_index = [split_by_index(i, 10) for i in range(10)]
    assert by_index == ["train"] * 8 + ["val", "test"]


def test_bad_inputs(tmp_path):
    with pytest.raises(InputError, match="not an xray2ct store"):
        Store(tmp_path / "missing")
    s = Store(tmp_path / "s.zarr", create=True)
    with pytest.raises(InputError, match="3D"):
        s.write_case("a", np.zeros((4, 4)), (1, 1, 1), np.eye(4))
    with pytest.raises(InputError, match="NaN"):
        s.write_case("a", np.full((4, 4, 4), np.nan), (1, 1, 1), np.eye(4))
    with pytest.raises(InputError, match="unknown split"):
        s.case_ids("holdout")
    assert s.case_ids() == [] and s.incomplete() == []  # nothing half-written


def _racer(path, seed, q):
    s = Store(path, create=True)
    q.put(s.write_case("same", _hu(seed=seed), (1, 1, 1), np.eye(4)))


def test_two_writers_of_one_case_do_not_corrupt_it(tmp_path):
    path = str(tmp_path / "s.zarr")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(path, seed, q)) for seed in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    results = sorted(q.get(timeout=5) for _ in procs)
    s = Store(path)
    assert s.case_ids() == ["same"] and s.incomplete() == []
    data = s.case("same").ct[...]
    assert results == [False, True]  # exactly one publication wins
    assert any(np.array_equal(data, _hu(seed=k)) for k in (1, 2))
