"""Weight EMA for the engine: shadows shaped like the live parameters (FSDP shards stay shards),
one fused ``_foreach_lerp_`` per applied optimizer step, swapped into the model for validation."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from patching.errors import InputError


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class EMA:
    """Exponential moving average of a model's floating-point parameters.

    Kept as tensors shaped like the live parameters (FSDP shards stay shards), updated with
    one ``_foreach_lerp_`` after each applied optimizer step: no host sync. Buffers are not
    averaged (an EMA codebook is already an average); saved EMA state dicts carry the model's
    live buffers so they load as a whole model.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        named = [(n, p) for n, p in model.named_parameters() if p.dtype.is_floating_point]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        with torch.no_grad():
            self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, decay: float | None = None) -> None:
        """One EMA step with ``decay`` (default: the fixed ``self.decay``; the engine passes the
        warmed-up value of :func:`launch.schedules.ema_decay_at`)."""
        d = self.decay if decay is None else decay
        torch._foreach_lerp_([_local(s) for s in self.shadow], [_local(p) for p in self.params], 1.0 - d)

    def full_state(self) -> dict[str, torch.Tensor]:
        """Full CPU tensors by parameter name; a collective for sharded parameters (all ranks call)."""
        out = {}
        for n, s in zip(self.names, self.shadow, strict=True):
            full = s.full_tensor() if hasattr(s, "full_tensor") else s
            out[n] = full.detach().cpu()
        return out

    @torch.no_grad()
    def load_full(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise InputError(None, f"EMA state lacks {missing[:5]}")
        for n, s in zip(self.names, self.shadow, strict=True):
            full = state[n]
            if hasattr(s, "device_mesh"):  # DTensor: cut this rank's shard locally
                from torch.distributed.tensor import distribute_tensor

                full = distribute_tensor(full.to(s.device), s.device_mesh, s.placements, src_data_rank=None)
            _local(s).copy_(_local(full))

    @contextlib.contextmanager
    def swapped_in(self):
        """Temporarily put the EMA weights into the live parameters."""
        with torch.no_grad():
            saved = [_local(p).clone() for p in self.params]
            for p, s in zip(self.params, self.shadow, strict=True):
                _local(p).copy_(_local(s))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, v in zip(self.params, saved, strict=True):
                    _local(p).copy_(v)
