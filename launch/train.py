"""``xray2ct train TASK`` and ``python -m launch.train TASK`` (under ``accelerate launch``).

    accelerate launch --config_file launch/accelerate/NAME.yaml -m launch.train TASK \\
        --store S --preset P --output-dir D [--max-steps N] [--resume latest|PATH] [--set k=v ...]

Builds the run config (preset's ``train`` section ← the task's ``train_defaults`` ← ``--set``),
then hands the task to :class:`launch.engine.Trainer`. Exit status: 0 done (or stopped by
SIGTERM/SIGINT after a checkpoint), 1 stopped by the non-finite guard or any other failure,
2 bad input or a checkpoint write the file system refused (one ``error:`` line on stderr).
Under ``torchrun`` the agent itself exits 1 after a SIGTERM even when every worker saved and
exited 0, ``accelerate launch`` 143: see docs/reliability.md, "Preemption".
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from patching.errors import InputError

from .config import TrainConfig, apply_overrides, config_from_dict, config_to_dict, make_run_config
from .tasks import TASKS, load_task


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="xray2ct train",
        description="Train a task on the shared engine (one process here; several under accelerate launch).",
    )
    p.add_argument("task", metavar="TASK", help=f"{', '.join(TASKS)}, or module:attr")
    p.add_argument("--store", required=True, help="dataset store (Zarr)")
    p.add_argument("--preset", default="cpu-demo", help="named preset: cpu-demo, ctpa-512 (default: cpu-demo)")
    p.add_argument("--output-dir", required=True, help="run directory: checkpoints/, tb/, metrics.jsonl, config.json")
    p.add_argument("--max-steps", type=int, default=None, help="same as --set train.max_steps=N")
    p.add_argument("--resume", default=None, metavar="latest|PATH",
                   help="continue from the newest checkpoint of --output-dir (fresh start if none) or from PATH")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. --set model.channels=64 train.lr=1e-4")
    return p


def build_run_config(task: Any, preset: str, overrides: Sequence[str], max_steps: int | None = None) -> Any:
    """The resolved run config: task sections + ``train`` section, overrides applied."""
    from .presets import train_spec

    train = train_spec(preset)
    defaults = getattr(task, "train_defaults", None)
    if defaults is not None:
        data = config_to_dict(train)
        for k, v in dict(defaults(preset)).items():
            if k not in data:
                raise ValueError(f"train_defaults of the task names unknown train key {k!r}")
            data[k] = list(v) if isinstance(v, tuple) else v
        train = config_from_dict(TrainConfig, data, "train")
    cfg = make_run_config(task.default_config(preset), train)
    overrides = list(overrides)
    if max_steps is not None:
        overrides.append(f"train.max_steps={max_steps}")
    return apply_overrides(cfg, overrides)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse printed the usage error (status 2) or --help (0)
        return int(exc.code or 0)
    try:
        from .engine import Trainer
        from .presets import data_spec

        spec = data_spec(args.preset)
        ref, task = load_task(args.task)
        cfg = build_run_config(task, args.preset, args.overrides, args.max_steps)
        trainer = Trainer(task, cfg, task_ref=ref, preset=args.preset, store=args.store,
                          output_dir=args.output_dir, resume=args.resume, data_spec=spec)
        return trainer.run()
    except InputError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
