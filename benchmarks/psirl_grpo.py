"""The psirl side of the GRPO benchmark: `psirl.train.online.train(config)`, the user's entry point.

Run by benchmarks/run.py in its own interpreter (so peak RSS is psirl's own):

    python benchmarks/psirl_grpo.py --shape tiny --ckpt runs/bench/ckpt-tiny --out psirl.json

The config is an ordinary psirl run config (what `psirl train config.yaml` reads): preset `grpo`
with the issue's knob values (G completions per prompt, temperature 1, max_new_tokens, beta as the
k3-in-loss coefficient, one update per batch: `sampling.minibatches=1`), the shared checkpoint as
`model.path`, the built-in addition task, AdamW at a constant LR with grad-norm clip 1, fp32.
Nothing in psirl knows it is being benchmarked.

Step time = the loop's own `time/step_s` in metrics.jsonl: `run_loop` times `spec.step`, i.e.
generation, rewards, reference log-probs, advantages, loss, backward and optimiser step (metrics
logging and evaluation are outside it, as TRL's logging is outside its on_step_begin/end).
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402


def psirl_config(shape: C.Shape, run_dir: Path, *, max_steps: int, eval_every: int = 0,
                 eval_n: int = 256, ckpt: Path | None = None, seed: int | None = None):
    """The psirl run config of a benchmark shape (a plain TrainConfig, validated by psirl).

    seed: the run's seed (prompt order, sampling); the checkpoint and the held-out prompts
    (`data.eval_path`, the task's test split) do not depend on it.
    """
    from psirl.train.config import config_from_dict

    return config_from_dict({
        "loop": "online",
        "output_dir": str(run_dir),
        "seed": shape.seed if seed is None else seed,
        "max_steps": max_steps,
        "device": shape.device,
        "dtype": "float32",
        "model": {"path": str(ckpt or C.checkpoint_dir(shape))},
        "data": {"task": "addition", "task_kwargs": {"digits": shape.digits},
                 "n_train": shape.n_train, "chat": False,
                 "eval_path": str(C.eval_file(shape, eval_n))},
        "optim": {"lr": shape.lr, "batch_size": shape.n_prompts, "grad_clip": 1.0,
                  "schedule": "constant", "warmup_steps": 0, "weight_decay": 0.0},
        "checkpoint": {"every": 0, "keep_last": 1},
        "eval": {"every": eval_every, "n": eval_n, "greedy": True, "sampled": False,
                 "max_new_tokens": shape.max_new_tokens},
        "algorithm": {
            "preset": "grpo",
            "knobs": {
                "sampling": {"group_size": shape.group, "temperature": shape.temperature,
                             "top_p": 1.0, "top_k": 0, "max_new_tokens": shape.max_new_tokens,
                             "minibatches": 1, "epochs": 1},
                "loss": {"kl_coef": shape.beta},
            },
        },
    }, source="benchmarks/psirl_grpo.py")


def read_metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def main(argv: list[str] | None = None) -> None:
    args = C.parse_worker_args(__doc__, argv)

    C.set_threads()
    t_start = time.perf_counter()
    import torch

    import psirl.models.logprobs  # noqa: F401  (imported before the memory reset, like TRL's)
    import psirl.rollout.hf_engine  # noqa: F401
    from psirl.train.online import train

    shape, warmup, steps, total = C.resolve_run(args)
    run_dir = C.CACHE / f"psirl-run-{shape.name}-{args.mode}"
    shutil.rmtree(run_dir, ignore_errors=True)
    config = psirl_config(shape, run_dir, max_steps=total, ckpt=Path(args.ckpt),
                          eval_every=args.eval_every if args.mode == "learn" else 0,
                          eval_n=args.eval_n, seed=args.seed)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.ckpt)
    records = C.train_records(shape, args.seed)
    prompt_len = statistics.mean(
        len(tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]) for r in records)

    rss_imports = C.rss_mb()
    peak_imports = C.peak_rss_mb()  # peak so far (imports, tokenizer); the reset forgets it
    C.reset_peak_rss()
    t_train = time.perf_counter()
    if args.profile:
        import cProfile
        import pstats

        with cProfile.Profile() as prof:
            train(config, quiet=True)
        prof.dump_stats(args.profile)
        pstats.Stats(prof).sort_stats("cumulative").print_stats(60)
    else:
        train(config, quiet=True)
    t_end = time.perf_counter()
    peak_train = C.peak_rss_mb()

    rows = read_metrics(run_dir)
    step_rows = [r for r in rows if "time/step_s" in r]
    times = [r["time/step_s"] for r in step_rows]
    cum_at, cum = {0: 0.0}, 0.0
    for r in step_rows:  # cumulative training seconds at each step (evaluation excluded)
        cum += r["time/step_s"]
        cum_at[r["step"]] = cum
    curve = [{"step": r["step"], "train_s": cum_at.get(r["step"], 0.0),
              "accuracy": r["eval/accuracy_greedy"]} for r in rows if "eval/accuracy_greedy" in r]
    if args.target is not None:
        reached = [c for c in curve if c["accuracy"] >= args.target]
        curve = curve[: curve.index(reached[0]) + 1] if reached else curve
    result = {
        "lib": "psirl",
        "shape": shape.name,
        "mode": args.mode,
        "seed": config.seed,
        "device": shape.device,
        "warmup": warmup,
        "step_times": times,
        "phase_times": {k: [r.get(k) for r in step_rows]
                        for k in ("time/generate_s", "time/score_s", "time/learn_s")},
        "completion_len_per_step": [r.get("response/length_mean") for r in step_rows],
        "reward_per_step": [r.get("reward/mean") for r in step_rows],
        "prompt_len": prompt_len,
        "batch": shape.n_prompts * shape.group,
        "group": shape.group,
        "curve": curve,
        "setup_s": None,
        "train_wall_s": t_end - t_train,
        "import_s": t_train - t_start,
        "rss_after_imports_mb": rss_imports,
        "peak_train_rss_mb": peak_train,
        "peak_rss_mb": max(peak_train, peak_imports),
    }
    if args.gen_bench:
        result["generation"] = generation_bench(Path(args.ckpt), records, shape)
    C.write_json(args.out, result)
    del torch


def generation_bench(ckpt: Path, records, shape: C.Shape, reps: int = 3) -> dict:
    """Sampling alone, through the engine the online loop uses (psirl HFEngine)."""
    import torch

    from psirl.models.loading import load_policy
    from psirl.rollout.batch import SamplingParams
    from psirl.rollout.hf_engine import HFEngine

    device = shape.device if torch.cuda.is_available() or shape.device == "cpu" else "cpu"
    model, tokenizer = load_policy(ckpt, device=device)
    model.eval()
    engine = HFEngine(model, tokenizer)
    prompts = [r["prompt"] for r in records[: shape.n_prompts]]
    params = SamplingParams(temperature=shape.temperature, top_p=1.0, top_k=0,
                            max_new_tokens=shape.max_new_tokens, n=shape.group, seed=0)
    times, tokens = [], []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        batch = engine.generate(prompts, params)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        tokens.append(int(batch.completion_mask.sum()))
    best = min(range(reps), key=lambda i: times[i])
    return {"seconds": times[best], "tokens": tokens[best], "tokens_per_s": tokens[best] / times[best]}


if __name__ == "__main__":
    main()
