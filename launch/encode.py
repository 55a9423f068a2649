"""The latent cache with one or many processes: ``xray2ct encode`` and ``python -m launch.encode``.

    xray2ct encode --store S --vqgan PATH [--split SPLIT] [--device DEV]          # one process
    accelerate launch --config_file launch/accelerate/NAME.yaml -m launch.encode \\
        --store S --vqgan PATH [--split SPLIT]                                     # one per GPU

Both run :func:`encode`: every process loads the VQ-GAN, takes its shard of the store's cases
(:func:`stage1_vqgan.encode.shard`: every ``W``-th case) and writes their latents
(:func:`stage1_vqgan.encode.encode_cases`; a case that already holds a latent of these weights
is skipped, so a re-run finishes an interrupted one). After all shards are written (a barrier),
rank 0 alone computes the latent scale factor from the training split
(:func:`stage1_vqgan.encode.finish_scale_factor`) and prints the summary. A case's latent is a
function of that case and the weights only, so 1 and N processes write the same bytes and the
same factor (``tests/launch/test_encode_distributed.py``). Rank 0's progress bar counts the
cases done by every rank (it polls the store's latent references once a second).

A bad store, bad weights or a case that cannot be encoded stops every process with one
``error:`` line (exit 2): :func:`launch.collective.run_collectively`.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from patching.errors import InputError

from .collective import run_collectively

# torch, zarr and the models are imported where used: `xray2ct --help` builds this parser.


class _Progress:
    """Rank 0's bar over all cases of all ranks: its own cases as they finish, the others' by
    polling the store (a case counts once its latent has these weights' reference)."""

    def __init__(self, store, ids: list[str], ref: dict, world_size: int, enabled: bool):
        from tqdm.auto import tqdm

        from stage1_vqgan.encode import is_encoded

        self.is_encoded, self.store, self.ids, self.ref = is_encoded, store, ids, ref
        self.bar = tqdm(total=len(ids), desc=f"encode ({world_size} process{'es' if world_size > 1 else ''})",
                        unit="case", disable=not enabled)
        self.done: set[str] = set()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = None
        if enabled and world_size > 1:
            self.thread = threading.Thread(target=self._poll, daemon=True)
            self.thread.start()

    def mark(self, case_id: str) -> None:
        with self.lock:
            if case_id not in self.done:
                self.done.add(case_id)
                self.bar.update(1)

    def _poll(self) -> None:
        while not self.stop.wait(1.0):
            for cid in self.ids:
                if cid in self.done:
                    continue
                try:
                    if self.is_encoded(self.store.case(cid), self.ref):
                        self.mark(cid)
                except Exception:  # noqa: BLE001 - a latent being swapped in: next poll
                    pass

    def close(self, all_ids: list[str] | None = None) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
        for cid in all_ids or ():
            self.mark(cid)
        self.bar.close()


def encode(store_path: str | Path, vqgan_path: str | Path, *, split: str | None = None,
           device=None, progress: bool = True) -> dict | None:
    """Encode the store's cases over every process of this launch (module docstring).

    Returns the summary of :func:`stage1_vqgan.encode.encode_store` on rank 0 (``encoded`` /
    ``skipped`` over all ranks, ``latent_scale_factor``, ...), ``None`` on the other ranks.
    """
    import torch
    from accelerate import PartialState
    from accelerate.utils import gather_object

    from patching.data.store import Store
    from stage1_vqgan.encode import (
        case_ids_to_encode,
        encode_cases,
        finish_scale_factor,
        load_vqgan,
        shard,
    )

    state = PartialState(cpu=not torch.cuda.is_available() or (device is not None and str(device) == "cpu"))
    rank, world, main = state.process_index, state.num_processes, state.is_main_process
    dev = torch.device(device) if device is not None else state.device

    def load():
        store = Store(store_path)
        ids = case_ids_to_encode(store, split)
        return store, ids, load_vqgan(vqgan_path, dev)

    store, ids, vq = run_collectively(state, load)
    bar = _Progress(store, ids, vq.reference, world, enabled=progress and main)
    try:
        encoded, skipped = run_collectively(state, lambda: encode_cases(store, vq, shard(ids, rank, world),
                                                                        progress=False, on_case=bar.mark))
        state.wait_for_everyone()  # every shard written before the scale factor is computed
    finally:
        bar.close(ids if main else None)
    parts = gather_object([{"encoded": encoded, "skipped": skipped}]) if world > 1 else [{"encoded": encoded,
                                                                                          "skipped": skipped}]
    summary = None
    if main:
        summary = {"store": str(store.path), "encoded": sorted(c for p in parts for c in p["encoded"]),
                   "skipped": sorted(c for p in parts for c in p["skipped"]), "vqgan": vq.reference,
                   "world_size": world}
        summary.update(finish_scale_factor(store, vq.reference))
    state.wait_for_everyone()  # the other ranks end after the factor is written
    return summary


def build_parser(prog: str = "python -m launch.encode") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Cache every case's stage-1 latent in the store "
                                                       "(one process, or one per GPU under accelerate launch).")
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", required=True)
    p.add_argument("--vqgan", required=True, help="vqgan checkpoint, run or export directory")
    p.add_argument("--split", default=None, choices=["train", "val", "test"])
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: each process's device)")


def run(args) -> int:
    """The command's body (``xray2ct encode`` and ``python -m launch.encode``); InputError propagates."""
    summary = encode(args.store, args.vqgan, split=args.split, device=args.device)
    if summary is not None:
        print(json.dumps({k: v for k, v in summary.items() if k not in ("encoded", "skipped")}, indent=2))
        print(f"encoded {len(summary['encoded'])}, skipped {len(summary['skipped'])} (already encoded by these "
              f"weights), {summary['world_size']} process(es)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        return run(args)
    except InputError as err:
        from accelerate import PartialState

        if PartialState().is_main_process:  # every rank raised (run_collectively): one line, from rank 0
            print(f"error: {err}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
