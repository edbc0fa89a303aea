"""Wall time of a short GRPO run with `threads: 1` vs `threads: N` (the CPUs this process may
use), alternating rounds, on whatever load the machine has right now (uptime is printed).

    python benchmarks/threads_under_load.py --rounds 3 --steps 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def one_run(threads: int, steps: int, root: Path, tag: str) -> float:
    from psirl.train import run_config
    from psirl.train.config import config_from_dict

    cfg = config_from_dict({
        "loop": "online", "output_dir": str(root / tag), "seed": 0, "max_steps": steps,
        "device": "cpu", "threads": threads,
        "model": {"tiny": {"hidden_size": 256, "num_layers": 4, "num_heads": 4,
                           "intermediate_size": 768}},
        "data": {"task": "addition", "n_train": 500},
        "algorithm": {"preset": "grpo", "knobs": {"sampling": {"group_size": 8, "max_new_tokens": 4}}},
        "optim": {"lr": 5e-5, "batch_size": 16}, "checkpoint": {"every": 0},
    })
    t0 = time.perf_counter()
    run_config(cfg, quiet=True)
    return time.perf_counter() - t0


def main() -> None:
    from psirl.train.base import usable_cpus

    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    many = usable_cpus()
    times: dict[int, list[float]] = {1: [], many: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for threads in (1, many):  # alternate, so both see the same load drift
                times[threads].append(one_run(threads, args.steps, Path(tmp), f"t{threads}-r{r}"))
    print(f"load average {os.getloadavg()}, usable CPUs {many}")
    for threads, ts in times.items():
        print(f"threads={threads}: median {statistics.median(ts):.2f} s "
              f"({', '.join(f'{t:.2f}' for t in ts)})")


if __name__ == "__main__":
    main()
