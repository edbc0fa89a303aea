"""The psirl side of the DPO benchmark: `psirl.train.preference.train(config)` (loop: preference).

Run by benchmarks/run.py in its own interpreter (so peak RSS is psirl's own):

    python benchmarks/psirl_dpo.py --shape dpo-tiny --out psirl.json

Both libraries train DPO (sigmoid loss, beta 0.1, reference = the initial model, its log-probs
recomputed every step) on the same pairs file (`pairs_file`: addition prompts, the correct
answer as chosen and an off-by-one answer as rejected, every sequence <= 24 tokens), batch 32
pairs, AdamW at a constant LR, grad clip 1, fp32, one optimiser step per batch, no evaluation
or checkpoints. The model is the shape's tiny Qwen2 with random weights (speed does not depend
on them). Step time = the loop's own `time/step_s` (forward of policy and reference on chosen
and rejected, loss, backward, optimiser step).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402

DPO_SHAPES: dict[str, C.Shape] = {
    # The tiny Qwen2 of the GRPO benchmark (4 layers, hidden 256), character vocabulary.
    "dpo-tiny": C.Shape(name="dpo-tiny", sft_steps=0, steps=20, warmup=3),
    # The same body with a 32k vocabulary (a realistic lm_head and softmax width).
    "dpo-vocab32k": C.Shape(name="dpo-vocab32k", vocab_size=32768, sft_steps=0, steps=12,
                            warmup=2),
}
BATCH = 32
MAX_LENGTH = 24
BETA = 0.1
LR = 5e-6
N_PAIRS = 512


def pairs_file(seed: int = 0) -> Path:
    """The benchmark's preference pairs as JSONL {prompt, chosen, rejected} (built once)."""
    path = C.CACHE / f"dpo-pairs-s{seed}-n{N_PAIRS}.jsonl"
    if not path.exists():
        rng = random.Random(seed)
        rows = []
        for _ in range(N_PAIRS):
            a, b = rng.randrange(10, 100), rng.randrange(10, 100)
            wrong = a + b + rng.choice((-1, 1))
            rows.append({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(wrong)})
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(path)
    return path


def parse_args(doc: str, argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--shape", default="dpo-tiny", choices=sorted(DPO_SHAPES))
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    shape = DPO_SHAPES[args.shape]
    warmup = shape.warmup if args.warmup is None else args.warmup
    steps = shape.steps if args.steps is None else args.steps
    return args, shape, warmup, steps


def main(argv: list[str] | None = None) -> None:
    args, shape, warmup, steps = parse_args(__doc__, argv)
    C.set_threads()
    ckpt = C.prepare_checkpoint(shape)
    pairs = pairs_file()
    import torch  # noqa: F401

    import psirl.models.logprobs  # noqa: F401  (imported before the memory reset, like TRL's)
    from psirl.train.config import config_from_dict
    from psirl.train.preference import train

    run_dir = C.CACHE / f"psirl-dpo-{shape.name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    config = config_from_dict({
        "loop": "preference",
        "output_dir": str(run_dir),
        "seed": 0,
        "max_steps": warmup + steps,
        "device": "cpu",
        "dtype": "float32",
        "model": {"path": str(ckpt)},
        "data": {"train_path": str(pairs), "chat": False},
        "optim": {"lr": LR, "batch_size": BATCH, "grad_clip": 1.0, "schedule": "constant",
                  "warmup_steps": 0, "weight_decay": 0.0},
        "checkpoint": {"every": 0, "keep_last": 1},
        "eval": {"every": 0},
        "preference": {"loss": "dpo", "beta": BETA},
    }, source="benchmarks/psirl_dpo.py")
    rss_imports = C.rss_mb()
    C.reset_peak_rss()
    t0 = time.perf_counter()
    train(config, quiet=True)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    times = [r["time/step_s"] for r in rows if "time/step_s" in r]
    measured = times[warmup:]
    C.write_json(args.out, {
        "lib": "psirl", "shape": shape.name, "batch": BATCH, "max_length": MAX_LENGTH,
        "warmup": warmup, "step_times": times, "median_step_s": statistics.median(measured),
        "train_wall_s": wall, "rss_after_imports_mb": rss_imports,
        "peak_train_rss_mb": C.peak_rss_mb(),
    })


if __name__ == "__main__":
    main()
