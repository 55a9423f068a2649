"""``ctx``: what a task's ``train_step`` and ``validate`` get from the engine besides the batch
and the models (the protocol is in :mod:`launch.engine`'s docstring)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn


class StepContext:
    """What ``train_step`` and ``validate`` get besides the batch and the models.

    ``trainer`` is the engine's ``Trainer`` (not imported: the engine imports this module).
    """

    def __init__(self, trainer: Any):
        self._t = trainer
        self.device = trainer.device
        self.rank = trainer.rank
        self.world_size = trainer.world_size
        self.generator = trainer.generator
        self.grad_accum = trainer.cfg.train.grad_accum
        self.micro_step = 0

    @property
    def sync_gradients(self) -> bool:
        """True on the last micro-batch of an accumulation window (optimizers step in backward)."""
        return self._t.accelerator.sync_gradients

    def backward(self, loss: torch.Tensor, optimizer: str) -> None:
        self._t._backward(loss, optimizer)

    @contextlib.contextmanager
    def frozen(self, *model_names: str):
        """Forward passes inside produce no gradients for these models' weights."""
        with self._t._frozen(model_names):
            yield

    @contextlib.contextmanager
    def ema_weights(self):
        """The EMA weights in the live models while the block runs (validation, samples)."""
        with contextlib.ExitStack() as stack:
            for ema in self._t.ema.values():
                stack.enter_context(ema.swapped_in())
            yield

    def unwrap(self, model_name: str) -> nn.Module:
        """The inner module (no DDP/DeepSpeed wrapper): for attributes and no-grad calls."""
        return self._t.unwrapped[model_name]

    def autocast(self):
        return self._t.accelerator.autocast()
