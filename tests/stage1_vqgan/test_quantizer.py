"""EMA vector quantizer: EMA update, dead-code restart, resume safety, stats, DDP sync (gloo)."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from einops import rearrange

from stage1_vqgan.quantizer import EMAVectorQuantizer, nearest_code


def _as_volume(points: torch.Tensor) -> torch.Tensor:
    """(N, D) points as a (1, D, N, 1, 1) latent volume."""
    return rearrange(points, "n d -> 1 d n 1 1")


def _set_codebook(q: EMAVectorQuantizer, codes: torch.Tensor, sizes: torch.Tensor | None = None) -> None:
    sizes = torch.ones(len(codes)) if sizes is None else sizes
    q.embed.copy_(codes)
    q.cluster_size.copy_(sizes)
    q.embed_avg.copy_(codes * sizes[:, None])
    q.initialized.fill_(1)


def test_nearest_code_matches_brute_force_in_chunks(monkeypatch):
    import stage1_vqgan.quantizer as qmod

    g = torch.Generator().manual_seed(0)
    flat, embed = torch.randn(300, 5, generator=g), torch.randn(17, 5, generator=g)
    ref = torch.cdist(flat, embed).argmin(1)
    monkeypatch.setattr(qmod, "_DIST_CHUNK_ELEMS", 17 * 7)  # 7 rows per chunk: many chunks
    assert torch.equal(nearest_code(flat, embed), ref)


def test_ema_update_moves_codes_toward_data():
    q = EMAVectorQuantizer(2, 2, decay=0.9, restart_threshold=0.0)
    _set_codebook(q, torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
    target = torch.tensor([1.0, -1.0])
    data = target + 0.01 * torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    q.train()
    dists = []
    for _ in range(30):
        q(_as_volume(data))
        dists.append(float((q.embed[0] - data.mean(0)).norm()))
    assert dists[0] < math.sqrt(2) and all(b < a for a, b in zip(dists[:-1], dists[1:], strict=True))
    assert dists[-1] < 0.02
    # an unused code (no restart) stays put up to the Laplace smoothing of its shrinking count
    assert torch.allclose(q.embed[1], torch.tensor([10.0, 10.0]), rtol=1e-3)
    # eval mode: no update
    q.eval()
    before = q.embed.clone()
    q(_as_volume(data + 5))
    assert torch.equal(q.embed, before)


def test_first_batch_initialises_codebook_from_data():
    q = EMAVectorQuantizer(8, 3)
    data = torch.randn(50, 3, generator=torch.Generator().manual_seed(1)) + 4.0
    assert int(q.initialized) == 0
    q.train()
    q(_as_volume(data), torch.Generator().manual_seed(0))
    assert int(q.initialized) == 1
    # every code is a data vector (or the EMA of data vectors): all near the data, far from randn init
    assert float(torch.cdist(q.embed, data).min(1).values.max()) < 1.0
    assert float(q.embed.mean()) > 3.0


def test_dead_codes_restart_from_batch_vectors():
    q = EMAVectorQuantizer(8, 2, decay=0.99, restart_threshold=0.5)
    live = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    far = torch.full((4, 2), 100.0)
    _set_codebook(q, torch.cat([live, far]), torch.tensor([5.0] * 4 + [0.3] * 4))
    data = live.repeat(8, 1) + 0.01 * torch.randn(32, 2, generator=torch.Generator().manual_seed(2))
    q.train()
    _, _, stats = q(_as_volume(data), torch.Generator().manual_seed(3))
    # the four far codes were dead (EMA size 0.3·0.99 < 0.5): re-seeded with rows of this batch
    for code in q.embed[4:]:
        assert float((data - code).norm(dim=1).min()) == 0.0
    assert torch.equal(q.cluster_size[4:], torch.ones(4))  # restarted codes start with one vector
    assert float(stats["restarted"]) == 0.5
    assert float(stats["ema_usage"]) == 0.5  # alive before the restart
    # live codes were not restarted
    assert float((q.embed[:4] - live).abs().max()) < 0.05


def test_restart_is_reproducible_with_a_passed_generator():
    data = torch.randn(40, 4, generator=torch.Generator().manual_seed(4))
    books = []
    for _ in range(2):
        q = EMAVectorQuantizer(16, 4, restart_threshold=1.0).train()
        for s in range(3):
            q(_as_volume(data), torch.Generator().manual_seed(s))
        books.append(q.embed.clone())
    assert torch.equal(books[0], books[1])


def test_initialized_buffer_survives_state_dict_round_trip():
    g = torch.Generator().manual_seed(0)
    trained = EMAVectorQuantizer(16, 3, restart_threshold=0.0).train()
    for _ in range(5):
        trained(_as_volume(torch.randn(64, 3, generator=g)))
    sd = trained.state_dict()
    assert sd["initialized"].dtype == torch.uint8 and int(sd["initialized"]) == 1
    assert set(sd) == {"embed", "cluster_size", "embed_avg", "initialized"}

    new_data = _as_volume(torch.randn(64, 3, generator=g) * 50 + 100)  # far from the codebook
    reference = EMAVectorQuantizer(16, 3, restart_threshold=0.0).train()
    reference.load_state_dict(sd)
    reference(new_data, torch.Generator().manual_seed(9))

    # A fresh quantizer that already ran (and initialised itself) before the checkpoint was
    # loaded — the Medical Diffusion resume path — must keep the loaded codebook.
    resumed = EMAVectorQuantizer(16, 3, restart_threshold=0.0).train()
    resumed(_as_volume(torch.randn(64, 3, generator=g)))
    resumed.load_state_dict(sd)
    _, idx, _ = resumed(new_data, torch.Generator().manual_seed(9))
    assert torch.equal(resumed.embed, reference.embed)
    # only an EMA step happened, no re-seeding: every code the new batch did not pick is unchanged
    untouched = torch.ones(16, dtype=torch.bool)
    untouched[idx.flatten()] = False
    assert int(untouched.sum()) >= 8
    assert torch.allclose(resumed.embed[untouched], trained.embed[untouched], atol=1e-5)

    # without the loaded state the same batch would re-initialise the codebook onto the new data
    fresh = EMAVectorQuantizer(16, 3, restart_threshold=0.0).train()
    fresh(new_data, torch.Generator().manual_seed(9))
    assert float(fresh.embed.mean()) > 50


def test_usage_and_perplexity_on_a_hand_made_case():
    q = EMAVectorQuantizer(4, 1, restart_threshold=0.0).eval()
    _set_codebook(q, torch.tensor([[0.0], [1.0], [2.0], [3.0]]))
    _, idx, stats = q(_as_volume(torch.tensor([[0.1], [-0.2], [0.9], [1.2]])))
    assert idx.flatten().tolist() == [0, 0, 1, 1]
    assert float(stats["usage"]) == 0.5
    assert float(stats["perplexity"]) == pytest.approx(2.0, rel=1e-5)
    _, _, stats = q(_as_volume(torch.tensor([[0.0], [1.0], [2.0], [3.0]])))
    assert float(stats["usage"]) == 1.0 and float(stats["perplexity"]) == pytest.approx(4.0, rel=1e-5)
    _, _, stats = q(_as_volume(torch.tensor([[0.0]] * 3 + [[3.0]])))  # p = (3/4, 1/4)
    assert float(stats["perplexity"]) == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))
    assert all(v.ndim == 0 and isinstance(v, torch.Tensor) for v in stats.values())


def test_straight_through_and_commitment_loss():
    q = EMAVectorQuantizer(2, 1, beta=0.25, restart_threshold=0.0).eval()
    _set_codebook(q, torch.tensor([[0.0], [1.0]]))
    z = _as_volume(torch.tensor([[0.2], [0.7]])).requires_grad_(True)
    z_q, _, stats = q(z)
    assert z_q.flatten().tolist() == [0.0, 1.0]
    assert float(stats["commitment_loss"].detach()) == pytest.approx(0.25 * (0.04 + 0.09) / 2)
    (z_q.sum() + stats["commitment_loss"]).backward()
    # straight-through: d(sum z_q)/dz = 1; commitment: 0.25 · 2(z - z_q)/N
    expected = 1 + 0.25 * 2 * (torch.tensor([0.2, 0.7]) - torch.tensor([0.0, 1.0])) / 2
    assert torch.allclose(z.grad.flatten(), expected)


def test_bf16_input_uses_float32_distances():
    q = EMAVectorQuantizer(2, 1, restart_threshold=0.0).eval()
    # codes 1 and 1 + 2^-10 differ below bf16 resolution near 1; float32 tells them apart
    _set_codebook(q, torch.tensor([[1.0], [1.0 + 2**-10]]))
    z = _as_volume(torch.tensor([[1.0 + 2**-10]])).to(torch.bfloat16)  # rounds to 1.0 in bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_q, idx, stats = q(z)
    assert z_q.dtype == torch.bfloat16 and stats["perplexity"].dtype == torch.float32
    assert int(idx.flatten()[0]) == 0


# -- two ranks, gloo --------------------------------------------------------------------------


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # forked child: never enter the parent's OpenMP pool
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same initial (random) buffers on both ranks
        q = EMAVectorQuantizer(32, 4, decay=0.9, restart_threshold=1.0).train()
        g = torch.Generator().manual_seed(100 + rank)  # per-rank generators: different draws
        usages = []
        for step in range(4):
            # different data on each rank: shifted clusters and different sizes
            local = torch.randn(20 + 10 * rank, 4, generator=g) + 3.0 * rank + step
            _, _, stats = q(_as_volume(local), g)
            usages.append(stats["usage"])
        torch.save({"embed": q.embed, "cluster_size": q.cluster_size, "usage": torch.stack(usages)},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_gloo_ranks_end_with_identical_codebooks(tmp_path):
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert torch.equal(r0["embed"], r1["embed"])
    assert torch.equal(r0["cluster_size"], r1["cluster_size"])
    assert torch.equal(r0["usage"], r1["usage"])  # stats from all-reduced counts: global
    # and the codebook saw both ranks' data: codes near rank 0's and near rank 1's clusters
    means = r0["embed"].mean(1)
    assert float(means.min()) < 2.0 and float(means.max()) > 4.0
