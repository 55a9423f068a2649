"""Graceful stop on SIGTERM / SIGINT: finish the step, write a checkpoint, exit 0.

A signal only sets a flag. Once per step every rank contributes its flag to a MAX all-reduce
on a gloo group of CPU tensors, so all ranks stop after the same step even when the signal
reached only one of them (a scheduler preempting one node) — and the check never waits on the
GPU (a CUDA tensor read would be a device sync on every step).

DataLoader workers ignore both signals (:func:`ignore_stop_signals` is their init function):
a scheduler that signals the whole process group would otherwise kill them, and the main
process would die on the lost worker instead of finishing its step and saving.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# A Ctrl-C in a terminal reaches every process of the group, and torchrun's agent (and
# `accelerate launch`, which runs it) forwards the same SIGINT to its workers a few
# milliseconds later: a repeat within this many seconds is that copy, not a second Ctrl-C.
REPEAT_S = 1.0


class ControlGroup:
    """Host-side collectives on small CPU integers (stop flags, a shared token, barriers).

    Runs over gloo even when the training group is NCCL, so none of these waits on the GPU.
    With one process every method is local.
    """

    def __init__(self) -> None:
        self.world = 1
        self._group = None
        if dist.is_available() and dist.is_initialized():
            self.world = dist.get_world_size()
            if self.world > 1 and dist.get_backend() != "gloo":
                self._group = dist.new_group(backend="gloo")  # collective: every rank builds it

    def max(self, value: int) -> int:
        if self.world == 1:
            return int(value)
        t = torch.tensor([int(value)], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._group)
        return int(t.item())  # a CPU tensor: no device sync

    def broadcast(self, value: int) -> int:
        """Rank 0's ``value`` on every rank."""
        if self.world == 1:
            return int(value)
        t = torch.tensor([int(value)], dtype=torch.int64)
        dist.broadcast(t, src=0, group=self._group)
        return int(t.item())

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier(group=self._group)


class StopRequest:
    """Records SIGTERM/SIGINT (or a spent time budget); :meth:`agreed` says whether any rank got one."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._since = 0.0
        self.reason: str | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # handlers can only be set from the main thread (e.g. not in a notebook worker)
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self.signum == signal.SIGINT and signum == signal.SIGINT and now - self._since >= REPEAT_S:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        if self.signum is None:
            self.signum, self._since = signum, now

    def budget_spent(self, minutes: float) -> None:
        """Stop like on SIGTERM because ``train.max_minutes`` ran out."""
        self.reason = f"its time budget (train.max_minutes={minutes:g})"

    @property
    def requested(self) -> bool:
        return self.signum is not None or self.reason is not None

    def agreed(self, control: ControlGroup) -> bool:
        """True on every rank when any rank was signalled (a collective: all ranks call it)."""
        return bool(control.max(1 if self.requested else 0))

    @property
    def name(self) -> str:
        if self.signum is not None:
            return signal.Signals(self.signum).name
        return self.reason or "a stop on another rank"


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """DataLoader ``worker_init_fn``: let the main process handle SIGTERM/SIGINT.

    Workers are forked while :func:`stop_signals_blocked` holds the signals, so one that
    arrives during start-up stays pending; ignoring it discards it, then the mask is lifted.
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextlib.contextmanager
def stop_signals_blocked():
    """Hold SIGTERM/SIGINT while DataLoader workers are forked (they inherit the mask).

    Without it a signal sent to the whole process group in the moment between a worker's fork
    and its ``worker_init_fn`` kills the worker, and the main process dies of the lost worker.
    A signal held here is delivered to the main process's handler when the block ends.
    """
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
