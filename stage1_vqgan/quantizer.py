"""EMA vector quantizer with dead-code restart, DDP-synchronised and resume-safe.

Codebook state lives in registered buffers — ``embed`` (K, D), ``cluster_size`` (K,),
``embed_avg`` (K, D) and ``initialized`` (uint8, 0-d) — so it is saved, loaded, broadcast by
DDP and exported with the weights. ``initialized`` is a buffer and not a Python attribute on
purpose: Medical Diffusion kept its "needs init" flag as a plain attribute, so every resumed
run re-initialised a trained codebook from the first batch. Here a loaded codebook carries
``initialized = 1`` and is never re-seeded.

One training step (``self.training``), all under ``no_grad`` except the returned tensors:

1. draw K restart candidates: random rows of this batch's encoder outputs (from a passed
   ``torch.Generator``), broadcast from rank 0 so every rank holds the same candidates;
2. data-dependent initialisation, branch-free: where ``initialized == 0`` the codebook *is*
   the candidates (``torch.where`` on the buffer, so checking the flag costs no host sync);
3. nearest code per vector (float32 distances, chunked so the N×K matrix never exists whole);
4. EMA of per-code counts and sums — all-reduced (SUM) across ranks first, so every rank
   applies the same update and the codebooks stay identical without a broadcast;
5. codes whose EMA cluster size fell below ``restart_threshold`` are re-seeded with the
   candidates (and get an EMA count of 1 and sum equal to the candidate, so they persist).

bf16: the input is cast to float32 and autocast is disabled inside, so distances, EMA sums
and the straight-through output are float32 (cast back to the input dtype at the end).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn

_DIST_CHUNK_ELEMS = 1 << 25  # distance-matrix elements per chunk (128 MiB of float32)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def nearest_code(flat: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
    """Index of the nearest row of ``embed`` (K, D) for every row of ``flat`` (N, D), float32.

    ``argmin_k ||f||² - 2 f·e_k + ||e_k||²`` without the constant ``||f||²``, in row chunks of
    at most ``_DIST_CHUNK_ELEMS`` distances (N=131k latents × K=8192 codes would be 4 GiB).
    """
    e2 = embed.pow(2).sum(1)  # (K,)
    rows = max(1, _DIST_CHUNK_ELEMS // embed.shape[0])
    out = [(e2[None] - 2.0 * f @ embed.t()).argmin(1) for f in flat.split(rows)]  # (n, K) each
    return torch.cat(out) if len(out) > 1 else out[0]


class EMAVectorQuantizer(nn.Module):
    """Vector quantizer with an EMA codebook (VQ-VAE-2 / Jukebox style).

    Args:
        codebook_size: K, number of codes.
        dim: D, code dimension (the encoder's output channels).
        beta: commitment weight, ``beta · ||z_e - sg(z_q)||²``.
        decay: EMA decay of cluster sizes and sums.
        eps: Laplace smoothing of cluster sizes.
        restart_threshold: dead-code threshold on the EMA cluster size, in vectors per global
            batch (0 disables restarts). A restarted code gets a cluster size of 1, so with a
            threshold above 1 an unused code is restarted at every step.
        seed: seed of the module's own generator, used when ``forward`` gets none.
    """

    def __init__(self, codebook_size: int, dim: int, beta: float = 0.25, decay: float = 0.99,
                 eps: float = 1e-5, restart_threshold: float = 1.0, seed: int = 0):
        super().__init__()
        self.codebook_size, self.dim = int(codebook_size), int(dim)
        self.beta, self.decay, self.eps = float(beta), float(decay), float(eps)
        self.restart_threshold = float(restart_threshold)
        self.seed = int(seed)
        self.register_buffer("embed", torch.randn(codebook_size, dim))  # replaced on the first batch
        self.register_buffer("cluster_size", torch.zeros(codebook_size))
        self.register_buffer("embed_avg", torch.zeros(codebook_size, dim))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.uint8))
        self._generators: dict[torch.device, torch.Generator] = {}

    # -- pieces ------------------------------------------------------------------------------
    def _generator(self, device: torch.device) -> torch.Generator:
        """The module's own generator on ``device`` (used only when none is passed)."""
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    @torch.no_grad()
    def _candidates(self, flat: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """K random rows of ``flat`` (with replacement), identical on every rank."""
        g = generator if generator is not None else self._generator(flat.device)
        idx = torch.randint(flat.shape[0], (self.codebook_size,), generator=g, device=g.device)
        cand = flat[idx.to(flat.device, non_blocking=True)].clone()  # (K, D)
        if _distributed():
            dist.broadcast(cand, src=0)  # restart sources must agree, or the codebooks diverge
        return cand

    @torch.no_grad()
    def _init_from(self, cand: torch.Tensor) -> None:
        """Seed the codebook from ``cand`` where ``initialized == 0`` (no host sync)."""
        done = self.initialized.bool()  # 0-d, broadcasts
        self.embed.copy_(torch.where(done, self.embed, cand))
        self.embed_avg.copy_(torch.where(done, self.embed_avg, cand))
        self.cluster_size.copy_(torch.where(done, self.cluster_size, torch.ones_like(self.cluster_size)))
        self.initialized.fill_(1)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor,
                    cand: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """EMA step and dead-code restart; returns (global counts, fraction alive before the
        restart, fraction restarted)."""
        sums = torch.zeros_like(self.embed).index_add_(0, indices, flat)  # (K, D)
        if _distributed():
            # Codebook statistics are all-reduced (SUM) across ranks: every rank sees the
            # global counts and sums and applies the same EMA update, so codebooks stay equal.
            both = torch.cat([counts[:, None], sums], dim=1)  # (K, 1 + D): one collective
            dist.all_reduce(both)
            counts, sums = both[:, 0], both[:, 1:]
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_avg.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n  # (K,)
        self.embed.copy_(self.embed_avg / smoothed[:, None])
        alive = self._alive()
        if self.restart_threshold <= 0:
            return counts, alive, torch.zeros((), device=flat.device)
        dead = self.cluster_size < self.restart_threshold  # (K,)
        self.embed.copy_(torch.where(dead[:, None], cand, self.embed))
        self.embed_avg.copy_(torch.where(dead[:, None], cand, self.embed_avg))
        self.cluster_size.copy_(torch.where(dead, torch.ones_like(self.cluster_size), self.cluster_size))
        return counts, alive, dead.float().mean()

    def _alive(self) -> torch.Tensor:
        """Fraction of codes whose EMA cluster size reaches the restart threshold (or 1e-3)."""
        return (self.cluster_size >= max(self.restart_threshold, 1e-3)).float().mean()

    # -- public ------------------------------------------------------------------------------
    @torch.no_grad()
    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest codes, no statistics, no update: ``(B, D, X, Y, Z) → (z_q float32, indices)``."""
        _, _, nx, ny, nz = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = rearrange(z.float(), "b d x y z -> (b x y z) d")
            indices = nearest_code(flat, self.embed)
        indices = rearrange(indices, "(b x y z) -> b x y z", x=nx, y=ny, z=nz)
        return self.lookup(indices), indices

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors of ``indices`` ``(B, X, Y, Z)`` as ``(B, D, X, Y, Z)`` float32."""
        return rearrange(F.embedding(indices.long(), self.embed), "b x y z d -> b d x y z")

    def forward(self, z: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Quantize ``z`` ``(B, D, X, Y, Z)``; in training mode also update the codebook.

        Returns:
            ``z_q`` (straight-through: forward value the codes, gradient that of ``z``; input
            dtype), ``indices`` ``(B, X, Y, Z)`` int64, and stats (0-d tensors, no host sync):
            ``commitment_loss`` (β-weighted, differentiable), ``perplexity`` and ``usage`` (of
            the batch — global under DDP in training), ``ema_usage`` (fraction of codes whose
            EMA cluster size reaches the restart threshold, before this step's restart) and
            ``restarted`` (fraction of codes re-seeded this step).
        """
        _, d, nx, ny, nz = z.shape
        if d != self.dim:
            raise ValueError(f"quantizer expects {self.dim} channels, got {d}")
        with torch.autocast(device_type=z.device.type, enabled=False):
            zf = z.float()  # float32 distances and statistics (bf16 has an 8-bit mantissa)
            flat = rearrange(zf, "b d x y z -> (b x y z) d")
            if self.training:
                cand = self._candidates(flat.detach(), generator)
                self._init_from(cand)
            with torch.no_grad():
                indices = nearest_code(flat.detach(), self.embed)  # (N,)
                z_q = rearrange(F.embedding(indices, self.embed), "(b x y z) d -> b d x y z", x=nx, y=ny, z=nz)
                counts = torch.zeros(self.codebook_size, device=z.device).index_add_(
                    0, indices, torch.ones_like(indices, dtype=torch.float32))  # (K,)
                restarted = torch.zeros((), device=z.device)
                if self.training:
                    counts, alive, restarted = self._ema_update(flat.detach(), indices, counts, cand)
                else:
                    alive = self._alive()
                probs = counts / counts.sum().clamp_min(1.0)
                stats = {
                    "perplexity": torch.exp(-(probs * torch.log(probs + 1e-10)).sum()),
                    "usage": (counts > 0).float().mean(),
                    "ema_usage": alive,
                    "restarted": restarted,
                }
            stats["commitment_loss"] = self.beta * F.mse_loss(zf, z_q)
            z_st = zf + (z_q - zf).detach()  # straight-through estimator
        indices = rearrange(indices, "(b x y z) -> b x y z", x=nx, y=ny, z=nz)
        return z_st.to(z.dtype), indices, stats

    def extra_repr(self) -> str:
        return (f"codebook_size={self.codebook_size}, dim={self.dim}, beta={self.beta}, decay={self.decay}, "
                f"restart_threshold={self.restart_threshold}")
