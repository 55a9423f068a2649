"""Checkpoint save and load: our writer vs ``torch.save``/``torch.load``, same state, same process.

The state: a ~100M-parameter model (a stack of ``Linear(2048, 2048)`` layers, fp32) and its
Adam optimizer stepped once (so ``exp_avg``/``exp_avg_sq`` exist): ~1.2 GB of tensors.

* ``ours``: :func:`launch.checkpoint.save_checkpoint` — full state gathered, safetensors + JSON,
  written into a staging directory, fsynced, renamed to ``step-<N>``, ``latest`` replaced;
  load with :func:`launch.checkpoint.load_checkpoint` into a fresh model and optimizer
  (safetensors read, ``set_model_state_dict`` / ``set_optimizer_state_dict``).
* ``torch``: ``torch.save({"model": ..., "optim": ...})`` to a new file, fsync (the same
  durability as ours), the previous file deleted (the same rotation as ours with
  ``keep_last=1``); load with ``torch.load(weights_only=True)`` + ``load_state_dict``.

Loads read a file that was just written, so both come from the page cache (warm). Each figure
is the median of ``--repeat`` runs, ours and torch interleaved. Prints seconds, GB/s, bytes, and the ratios ours / torch.

Run: ``.venv/bin/python benchmarks/bench_checkpoint.py [--params 100e6] [--repeat 5] [--no-record]``
(about a minute on 2 cores; needs ~5 GB of RAM and ~3 GB of disk under ``--dir``, default a
temporary directory).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import record, timeit  # noqa: E402
from launch import checkpoint as ck  # noqa: E402
from launch.signals import ControlGroup  # noqa: E402


def build(num_params: float, width: int = 2048, seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    layers = max(1, round(num_params / (width * width + width)))
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    model(torch.randn(2, width)).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def saveables(model, opt) -> ck.Saveables:
    return ck.Saveables(models={"net": model}, optimizers={"net": opt}, model_of_optimizer={"net": "net"})


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, default=100e6)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    model, opt = build(args.params)
    fresh_model, fresh_opt = build(args.params, seed=1)
    num_params = sum(p.numel() for p in model.parameters())
    work = Path(tempfile.mkdtemp(prefix="bench-ckpt-", dir=args.dir))
    control = ControlGroup()
    step = [0]
    try:
        root = work / "checkpoints"

        def ours_save():
            step[0] += 1
            ck.save_checkpoint(root, step[0], saveables(model, opt), rank=0, is_main=True, control=control, keep_last=1,
                               meta={"world_size": 1, "data": {}}, data_state={}, config_doc="{}\n")

        def ours_load():
            ck.load_checkpoint(ck.read_latest(root), saveables(fresh_model, fresh_opt), rank=0, world_size=1)

        pts = [work / "state-0.pt"]

        def torch_save():
            # a new file each time and the previous one deleted: the file-system work of ours
            # with keep_last=1
            pt = work / f"state-{len(pts)}.pt"
            torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, pt)
            fsync_file(pt)
            pts[-1].unlink(missing_ok=True)
            pts.append(pt)

        def torch_load():
            sd = torch.load(pts[-1], weights_only=True)
            fresh_model.load_state_dict(sd["model"])
            fresh_opt.load_state_dict(sd["optim"])

        # Interleaved (ours, torch, ours, torch, ...) so that drifts of a shared disk and page
        # cache hit both alike; medians of each.
        times: dict[str, list[float]] = {k: [] for k in ("ours_save_s", "torch_save_s", "ours_load_s", "torch_load_s")}
        for _ in range(args.repeat):
            for key, fn in (("ours_save_s", ours_save), ("torch_save_s", torch_save)):
                times[key].append(timeit(fn, repeat=1, warmup=0))
        for _ in range(args.repeat):
            for key, fn in (("ours_load_s", ours_load), ("torch_load_s", torch_load)):
                times[key].append(timeit(fn, repeat=1, warmup=0))
        ours_load()  # the last load is ours: check it
        figures = {"num_params": num_params, "repeat": args.repeat}
        figures.update({k: statistics.median(v) for k, v in times.items()})
        figures["all_times_s"] = times
        ok = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh_model.state_dict().values(), strict=True))
        ok = ok and all(torch.equal(opt.state[p]["exp_avg_sq"], fresh_opt.state[q]["exp_avg_sq"])
                        for p, q in zip(model.parameters(), fresh_model.parameters(), strict=True))
        figures["ours_bytes"] = dir_bytes(ck.read_latest(root))
        figures["torch_bytes"] = pts[-1].stat().st_size
        figures["roundtrip_exact"] = bool(ok)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    for key in ("save", "load"):
        figures[f"{key}_ratio_ours_over_torch"] = figures[f"ours_{key}_s"] / figures[f"torch_{key}_s"]
    figures["bytes_ratio_ours_over_torch"] = figures["ours_bytes"] / figures["torch_bytes"]
    gb = figures["ours_bytes"] / 1e9
    print(f"state: {num_params / 1e6:.1f}M parameters + Adam, {gb:.2f} GB; median of {args.repeat}")
    print(f"{'':8}{'save s':>9}{'GB/s':>7}{'load s':>9}{'GB/s':>7}{'bytes':>15}")
    for who in ("ours", "torch"):
        s, ld, b = figures[f"{who}_save_s"], figures[f"{who}_load_s"], figures[f"{who}_bytes"]
        print(f"{who:8}{s:9.2f}{b / 1e9 / s:7.2f}{ld:9.2f}{b / 1e9 / ld:7.2f}{b:15,d}")
    print(f"ours/torch: save {figures['save_ratio_ours_over_torch']:.2f}x, load {figures['load_ratio_ours_over_torch']:.2f}x, "
          f"bytes {figures['bytes_ratio_ours_over_torch']:.4f}x; exact round trip: {figures['roundtrip_exact']}")
    if not args.no_record:
        print(f"recorded: {record('checkpoint', figures)}")
    return 0 if figures["roundtrip_exact"] else 1


if __name__ == "__main__":
    sys.exit(main())
