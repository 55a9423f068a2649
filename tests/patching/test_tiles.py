"""Streaming tile dataset: sharding across ranks × workers, deterministic shuffles, exact resume."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from patching.data.spec import centred_affine, hu_to_unit
from patching.data.store import Store
from patching.errors import InputError
from patching.tiling.tiles import TileDataset, epoch_items, shard_positions, worker_positions

TILE = (8, 8, 8)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    s = Store(tmp_path_factory.mktemp("tiles") / "s.zarr", create=True)
    rng = np.random.default_rng(0)
    shapes = [(20, 16, 12), (16, 16, 16), (12, 20, 10), (5, 20, 9)]  # the last is smaller than a tile
    for i, shape in enumerate(shapes):
        hu = rng.integers(-1024, 1500, size=shape).astype(np.int16)
        views = {"pa": (rng.random((12, 12)).astype(np.float32), {})}
        s.write_case(f"c{i}", hu, (2.0, 2.0, 2.0), centred_affine(shape, (2, 2, 2)), split="train",
                     views=views, chunks=(4, 4, 4))
    return s


def _keys(batches) -> list[tuple]:
    out = []
    for b in batches:
        for cid, start in zip(b["case_id"], b["start"].tolist()):
            out.append((cid, tuple(start)))
    return out


def _positions(batches) -> list[int]:
    return [int(p) for b in batches for p in b["position"]]


def _loader(ds: TileDataset) -> DataLoader:
    return DataLoader(ds, batch_size=ds.batch_size, num_workers=ds.num_workers, in_order=True)


def _dataset(store, **kw) -> TileDataset:
    base = dict(split="train", tile=TILE, overlap=0.25, mode="jitter", seed=3)
    base.update(kw)
    return TileDataset(store, **base)


@pytest.mark.parametrize("mode", ["grid", "jitter"])
def test_two_ranks_two_workers_every_tile_exactly_once(store, mode):
    world, workers, bs = 2, 2, 3
    seen = []
    for rank in range(world):
        ds = _dataset(store, mode=mode, rank=rank, world_size=world, batch_size=bs,
                      num_workers=workers, even_shards=False)
        seen += _keys(_loader(ds))
    expected = [(f"c{it.case_index}", it.start) for it in _dataset(store, mode=mode).epoch_items()]
    assert Counter(seen) == Counter(expected)
    assert len(seen) == len(expected) > 20


def test_even_shards_give_equal_counts_and_no_repeats(store):
    world = 3
    per_rank = []
    for rank in range(world):
        ds = _dataset(store, rank=rank, world_size=world, batch_size=2, num_workers=2)
        per_rank.append(_positions(_loader(ds)))
    assert len({len(k) for k in per_rank}) == 1
    flat = [k for ks in per_rank for k in ks]
    assert len(set(flat)) == len(flat)  # jittered starts may coincide; stream positions may not
    assert len(flat) >= len(_dataset(store).epoch_items()) - (world - 1)


def test_shuffle_is_deterministic_by_seed_and_epoch(store):
    a, b = _dataset(store), _dataset(store)
    assert a.epoch_items() == b.epoch_items()
    b.set_epoch(1)
    assert a.epoch_items() != b.epoch_items()
    c = _dataset(store, seed=4)
    assert a.epoch_items() != c.epoch_items()
    grid = _dataset(store, mode="grid")
    assert grid.epoch_items() == sorted(grid.epoch_items(), key=lambda t: (t.case_index, t.start))


@pytest.mark.parametrize("world_before,world_after", [(2, 2), (2, 1), (1, 2)])
def test_mid_epoch_resume_continues_with_the_next_tiles(store, world_before, world_after):
    bs, workers, k = 2, 2, 3

    def run(world, state=None, limit=None):
        out = []
        for rank in range(world):
            ds = _dataset(store, rank=rank, world_size=world, batch_size=bs, num_workers=workers)
            if state is not None:
                ds.load_state_dict(state)
            out.append([b for i, b in zip(range(limit or 10**9), _loader(ds))])
        return out

    full = run(world_before)  # uninterrupted epoch, per rank
    # interrupted after k batches on every rank; the engine stores position = k × bs × world
    state = {"epoch": 0, "position": k * bs * world_before, "num_cases": 4}
    rest = run(world_after, state)
    if world_after == world_before:
        for r in range(world_before):
            assert _keys(rest[r]) == _keys(full[r][k:])
            assert torch.equal(torch.cat([b["image"] for b in rest[r]]),
                               torch.cat([b["image"] for b in full[r][k:]]))
    else:
        done = {p for r in range(world_before) for p in _positions(full[r][:k])}
        remaining = [p for r in range(world_after) for p in _positions(rest[r])]
        assert done == set(range(len(done)))  # the first k × bs × world positions
        assert len(set(remaining)) == len(remaining) and not done & set(remaining)  # no repeats
        num_items = len(_dataset(store).epoch_items())
        assert set(remaining) == set(range(len(done), len(done) + len(remaining)))
        assert len(remaining) > num_items - len(done) - world_after  # nothing lost but the remainder
        items = _dataset(store).epoch_items()
        for r in range(world_after):  # and the tiles are those of the uninterrupted order
            for b in rest[r]:
                for cid, start, p in zip(b["case_id"], b["start"].tolist(), b["position"].tolist()):
                    assert (cid, tuple(start)) == (f"c{items[p].case_index}", items[p].start)


def test_tile_content_window_and_padding(store):
    ds = _dataset(store, mode="grid", batch_size=1)
    case = store.case("c3")  # (5, 20, 9): smaller than the tile along x
    for sample in ds:
        if sample["case_id"] != "c3":
            continue
        x0, y0, z0 = sample["start"].tolist()
        assert x0 == 0 and sample["image"].shape == (1, *TILE)
        ref = np.full(TILE, -1024, np.int16)
        block = np.asarray(case.ct[:, y0:y0 + 8, z0:z0 + 8])
        ref[: block.shape[0], :, : block.shape[2]] = block
        np.testing.assert_allclose(sample["image"][0].numpy(), hu_to_unit(ref, (-1024.0, 1600.0)), atol=1e-6)
        assert sample["image"].min() >= -1 and sample["image"].max() <= 1
        assert sample["xray"].shape == (2, 12, 12)
        assert sample["views_present"].tolist() == [True, False]
        assert torch.all(sample["xray"][1] == 0)
        assert sample["volume_shape"].tolist() == [5, 20, 9]
        break
    else:
        pytest.fail("no tile of c3")


def test_reads_only_the_chunks_a_tile_needs(tmp_path):
    s = Store(tmp_path / "s.zarr", create=True)
    hu = np.arange(16 * 16 * 16, dtype=np.int16).reshape(16, 16, 16)
    s.write_case("a", hu, (1, 1, 1), np.eye(4), split="train", chunks=(8, 8, 8))
    chunk_dir = Path(s.case("a").path) / "ct" / "c"
    # corrupt every chunk but the first: a tile at the origin must still read fine
    for f in chunk_dir.rglob("*"):
        if f.is_file() and f.relative_to(chunk_dir).parts != ("0", "0", "0"):
            f.write_bytes(b"garbage")
    ds = TileDataset(s, split="train", tile=(8, 8, 8), mode="grid")
    np.testing.assert_array_equal(ds.read_tile(0, (0, 0, 0)), hu[:8, :8, :8])
    with pytest.raises(Exception, match="(?i)blosc|decompress|codec|error|invalid"):
        ds.read_tile(0, (8, 8, 8))


def test_pure_sharding_helpers_partition_the_stream():
    for n in range(0, 23):
        for world in (1, 2, 3):
            for pos in (0, min(n, 4)):
                parts = [list(shard_positions(n, pos, r, world, even=False)) for r in range(world)]
                assert sorted(p for ps in parts for p in ps) == list(range(pos, n))
                for r in range(world):
                    mine = shard_positions(n, pos, r, world, even=False)
                    blocks = [worker_positions(mine, 2, w, 3) for w in range(3)]
                    assert sorted(p for b in blocks for p in b) == list(mine)


def test_bad_arguments(store):
    with pytest.raises(InputError):
        _dataset(store, mode="spiral")
    with pytest.raises(InputError):
        _dataset(store, split="test")  # no test cases in this store
    with pytest.raises(InputError):
        _dataset(store, rank=2, world_size=2)
    ds = _dataset(store)
    with pytest.raises(InputError):
        ds.load_state_dict({"epoch": 0, "position": 0, "num_cases": 99})
    assert epoch_items([(4, 4, 4)], TILE, 0.25, mode="grid", seed=0, epoch=0, shuffle=False)[0].start == (0, 0, 0)


def test_float_tiles_equal_the_int16_path_and_clamp_outside_the_window(tmp_path):
    s = Store(tmp_path / "s.zarr", create=True)
    hu = np.random.default_rng(1).integers(-3000, 3000, size=(10, 9, 11)).astype(np.int16)
    s.write_case("a", hu, (1, 1, 1), np.eye(4), split="train", chunks=(4, 4, 4))
    ds = TileDataset(s, split="train", tile=(8, 8, 8), mode="grid", hu_window=(-1000.0, 1000.0))
    from patching.tiling.tiles import hu_tile_to_unit

    for start in [(0, 0, 0), (2, 1, 3)]:
        got = ds.read_tile_unit(0, start)
        want = hu_tile_to_unit(ds.read_tile(0, start), (-1000.0, 1000.0))
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        assert got.min() == -1 and got.max() == 1
