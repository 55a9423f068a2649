"""The engine's optional learning-rate schedule and EMA warm-up (``train.warmup_steps``,
``train.lr_decay``, ``train.ema_warmup``).

Both are functions of the optimizer step alone, so a resumed run continues exactly where it
stopped (the step is in every checkpoint) and the schedule never depends on wall time.
"""

from __future__ import annotations

import math

LR_DECAYS = ("none", "cosine", "linear")


def lr_factor(step: int, warmup_steps: int, total_steps: int, decay: str, floor: float = 0.1) -> float:
    """Multiplier of the base learning rate after ``step`` optimizer steps.

    Linear warm-up from ``1 / warmup_steps`` to 1 over the first ``warmup_steps`` steps, then
    ``decay`` from 1 down to ``floor`` at ``total_steps`` (``cosine``: half a cosine period, as in
    diffusers' ``get_cosine_schedule_with_warmup`` but ending at ``floor`` instead of 0;
    ``linear``: a straight line; ``none``: constant 1).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "none" or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if decay == "cosine" else 1.0 - progress
    return floor + (1.0 - floor) * shape


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """The EMA decay used for the update after ``step`` optimizer steps.

    With ``warmup``: ``min(decay, (1 + step) / (10 + step))`` — the warm-up of diffusers'
    ``EMAModel`` (and of the original LDM code), so early averages forget the random
    initialisation within tens of steps instead of holding ``decay ** step`` of it (a 0.99 EMA
    still holds 37 % of the initial weights after 100 steps).
    """
    return min(decay, (1.0 + step) / (10.0 + step)) if warmup else decay
