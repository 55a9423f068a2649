"""How a competing process slows the demo's training, per thread count and OpenMP wait policy.

The issue behind it: a demo whose two training threads shared 2 cores with one other program
lost ~5× throughput, not the ~2× a fair share would cost. The suspect is OpenMP's barrier:
with an *active* wait policy a thread that finishes its part of an operator spins until its
descheduled sibling finishes, so every parallel region runs at the speed of the slowest
thread and the spinning burns the core the other program needed.

For each setting a worker process (its own ``OMP_NUM_THREADS`` / ``OMP_WAIT_POLICY``, read at
OpenMP start-up) times ``--steps`` training steps of the ``cpu-demo`` diffusion model (batch 2,
AdamW), alone and then beside ``--competitors`` busy-loop processes at ``nice -n 5`` (what a
user's other program looks like), interleaved ``--rounds`` times. Printed and recorded: median
wall seconds per step alone and with competition, their ratio (the slowdown), and process CPU
seconds per step. A fair share on 2 cores with one competitor is a ratio of ~1 for one thread
(a core is free) and ~1.5 for two threads (3 runnable threads on 2 cores).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_threads.py

Wall times on a machine shared with other work are inflated; the ratio is measured with the
same background in both arms, interleaved, and the record says how loaded the machine was.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import record  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ["1:PASSIVE", "2:PASSIVE", "2:ACTIVE", "2:default"]  # threads:OMP_WAIT_POLICY (default: unset)


def worker(steps: int) -> None:
    """Time ``steps`` diffusion training steps (after 2 warm-up steps); print JSON."""
    import torch

    from stage2_diffusion.config import cpu_demo
    from stage2_diffusion.task import DiffusionModel

    torch.manual_seed(0)
    model = DiffusionModel(cpu_demo())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 16, 16, 16, generator=g)  # (B, C, x, y, z): the demo's latent batch
    xr = torch.rand(2, 2, 128, 128, generator=g)  # (B, views, H, W)
    t = torch.tensor([100, 700])

    def step() -> None:
        loss = model(x, t, xr, coords=((0, 0, 0), (16, 16, 16))).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    print(json.dumps({"wall_per_step": (time.perf_counter() - wall) / steps,
                      "cpu_per_step": (time.process_time() - cpu) / steps,
                      "threads": torch.get_num_threads()}))


def measure(threads: int, policy: str, steps: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONPATH=str(REPO))
    env.pop("OMP_WAIT_POLICY", None)
    if policy != "default":  # default: the OpenMP runtime's own (libgomp spins a while, then sleeps)
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run([sys.executable, __file__, "--worker", "--steps", str(steps)], env=env, cwd=REPO,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def busy_loops(n: int) -> list[subprocess.Popen]:
    code = "while True: pass"
    return [subprocess.Popen(["nice", "-n", "5", sys.executable, "-c", code]) for _ in range(n)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--competitors", type=int, default=1)
    p.add_argument("--settings", nargs="+", default=SETTINGS, metavar="THREADS:POLICY",
                   help=f"settings to measure (default: {' '.join(SETTINGS)})")
    p.add_argument("--name", default="threads", help="results file benchmarks/results/NAME-cpu.json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    if args.worker:
        worker(args.steps)
        return 0
    load_before = os.getloadavg()
    settings = [(int(x.split(":")[0]), x.split(":")[1]) for x in args.settings]
    runs: dict[str, dict[str, list]] = {f"{t}t-{pol}": {"alone": [], "competed": []} for t, pol in settings}
    for _ in range(args.rounds):
        for t, pol in settings:
            key = f"{t}t-{pol}"
            runs[key]["alone"].append(measure(t, pol, args.steps))
            procs = busy_loops(args.competitors)
            try:
                runs[key]["competed"].append(measure(t, pol, args.steps))
            finally:
                for proc in procs:
                    proc.kill()
                    proc.wait()
    figures: dict = {"steps": args.steps, "rounds": args.rounds, "competitors": args.competitors,
                     "loadavg_before": [round(v, 2) for v in load_before],
                     "loadavg_after": [round(v, 2) for v in os.getloadavg()],
                     "note": "machine shared with other work: absolute wall times are inflated; compare ratios"}
    print(f"{'setting':14s} {'alone s/step':>13s} {'competed s/step':>16s} {'slowdown':>9s} {'CPU s/step':>11s} "
          f"{'competed':>11s}")
    for key, r in runs.items():
        alone = statistics.median(x["wall_per_step"] for x in r["alone"])
        comp = statistics.median(x["wall_per_step"] for x in r["competed"])
        cpu = statistics.median(x["cpu_per_step"] for x in r["alone"])
        cpu_comp = statistics.median(x["cpu_per_step"] for x in r["competed"])
        figures[key] = {"wall_per_step_alone": round(alone, 4), "wall_per_step_competed": round(comp, 4),
                        "slowdown": round(comp / alone, 3), "cpu_per_step_alone": round(cpu, 4),
                        "cpu_per_step_competed": round(cpu_comp, 4), "raw": r}
        print(f"{key:14s} {alone:13.3f} {comp:16.3f} {comp / alone:8.2f}× {cpu:11.3f} {cpu_comp:11.3f}")
    if not args.no_record:
        print("recorded", record(args.name, figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
