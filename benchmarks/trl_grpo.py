"""The TRL side of the GRPO benchmark: `trl.GRPOTrainer` on the shared checkpoint.

Run by benchmarks/run.py in its own interpreter (so peak RSS is TRL's own):

    python benchmarks/trl_grpo.py --shape tiny --ckpt runs/bench/ckpt-tiny --out trl.json
    python benchmarks/trl_grpo.py --shape tiny --ckpt ... --mode learn --target 0.3 --out ...

Settings mirror the issue and psirl's `grpo` preset: G completions per prompt, one optimiser step
per generation batch (num_iterations=1, gradient_accumulation_steps=1, so
per_device_train_batch_size = prompts x G), temperature 1, top-p 1, top-k off, beta (k3 KL in
the loss, reference = the initial model), clip eps 0.2, rewards scaled by the group std, AdamW at a
constant LR, grad-norm clip 1, fp32, no gradient checkpointing, no vLLM, nothing logged remotely.

Step time = on_step_begin -> on_step_end of a TrainerCallback: generation, rewards, reference
log-probs, loss, backward and optimiser step (logging between steps is outside it).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402


def build_config(shape: C.Shape, total_steps: int, output_dir: Path, seed: int):
    import torch
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=shape.n_prompts * shape.group,
        gradient_accumulation_steps=1,
        num_generations=shape.group,
        max_completion_length=shape.max_new_tokens,
        temperature=shape.temperature,
        top_p=1.0,
        top_k=0,
        beta=shape.beta,
        num_iterations=1,
        epsilon=0.2,
        scale_rewards="group",
        loss_type="grpo",  # per-sequence token mean, then mean over sequences (GRPO paper)
        learning_rate=shape.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        max_steps=total_steps,
        use_cpu=shape.device == "cpu" or not torch.cuda.is_available(),
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_vllm=False,
        report_to="none",
        push_to_hub=False,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=seed,
        log_completions=False,
        model_init_kwargs={"dtype": torch.float32},
    )


def main(argv: list[str] | None = None) -> None:
    args = C.parse_worker_args(__doc__, argv)

    C.set_threads()
    t_start = time.perf_counter()
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer  # noqa: F401  (imported before the memory reset)

    shape, warmup, steps, total = C.resolve_run(args)
    task = C.addition_task(shape.digits)
    seed = shape.seed if args.seed is None else args.seed
    records = C.train_records(shape, seed)
    ev_records = [json.loads(line) for line in C.eval_file(shape, args.eval_n).read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(args.ckpt)
    prompt_len = statistics.mean(
        len(tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]) for r in records)

    def accuracy_reward(prompts, completions, answer, **kwargs):
        return [C.task_reward(task, c, {"answer": a}) for c, a in zip(completions, answer, strict=True)]

    rss_imports = C.rss_mb()
    peak_imports = C.peak_rss_mb()  # peak so far (imports, tokenizer); the reset forgets it
    C.reset_peak_rss()
    t_setup = time.perf_counter()
    dataset = Dataset.from_list(records)
    config = build_config(shape, total, C.CACHE / f"trl-out-{shape.name}", seed)

    class Probe(TrainerCallback):
        """Per-step wall-clock, logged metrics and (learn mode) held-out accuracy."""

        def __init__(self):
            self.times: list[float] = []
            self.logs: list[dict] = []
            self.curve: list[dict] = []
            self.t0 = 0.0
            self.trainer = None

        def on_train_begin(self, args_, state, control, **kw):
            if args.mode == "learn":
                self._eval(0)

        def on_step_begin(self, args_, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args_, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)
            if args.mode == "learn" and state.global_step % args.eval_every == 0:
                acc = self._eval(state.global_step)
                if args.target is not None and acc >= args.target:
                    control.should_training_stop = True
            return control

        def on_log(self, args_, state, control, logs=None, **kw):
            if logs:
                self.logs.append(dict(logs))

        def _eval(self, step: int) -> float:
            acc = C.greedy_accuracy(self.trainer.model, tokenizer, task, ev_records,
                                    shape.max_new_tokens)
            self.curve.append({"step": step, "train_s": sum(self.times), "accuracy": acc})
            return acc

    probe = Probe()
    trainer = GRPOTrainer(model=str(args.ckpt), reward_funcs=accuracy_reward, args=config,
                          train_dataset=dataset, processing_class=tokenizer, callbacks=[probe])
    probe.trainer = trainer
    t_train = time.perf_counter()
    if args.profile:
        import cProfile
        import pstats

        with cProfile.Profile() as prof:
            trainer.train()
        prof.dump_stats(args.profile)
        pstats.Stats(prof).sort_stats("cumulative").print_stats(60)
    else:
        trainer.train()
    t_end = time.perf_counter()
    peak_train = C.peak_rss_mb()

    comp_lens = [lg["completions/mean_length"] for lg in probe.logs if "completions/mean_length" in lg]
    rewards = [lg["reward"] for lg in probe.logs if "reward" in lg]
    result = {
        "lib": "trl",
        "shape": shape.name,
        "mode": args.mode,
        "seed": seed,
        "device": str(trainer.model.device),
        "warmup": warmup,
        "step_times": probe.times,
        "completion_len_per_step": comp_lens,
        "reward_per_step": rewards,
        "prompt_len": prompt_len,
        "batch": shape.n_prompts * shape.group,
        "curve": probe.curve,
        "setup_s": t_train - t_setup,
        "train_wall_s": t_end - t_train,
        "import_s": t_setup - t_start,
        "rss_after_imports_mb": rss_imports,
        "peak_train_rss_mb": peak_train,
        "peak_rss_mb": max(peak_train, peak_imports),
    }
    if args.gen_bench:
        result["generation"] = generation_bench(trainer, tokenizer, records, shape)
    C.write_json(args.out, result)
    del torch


def generation_bench(trainer, tokenizer, records, shape: C.Shape, reps: int = 3) -> dict:
    """Sampling alone, through the generate call GRPOTrainer uses (transformers generate)."""
    import torch

    model = trainer.model
    model.eval()
    prompts = [r["prompt"] for r in records[: shape.n_prompts] for _ in range(shape.group)]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left",
                    add_special_tokens=False).to(model.device)
    times, tokens = [], []
    for _ in range(reps):
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**enc, generation_config=trainer.generation_config)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        comp = out[:, enc["input_ids"].shape[1]:]
        is_eos = comp == tokenizer.eos_token_id
        lengths = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, comp.shape[1])
        tokens.append(int(lengths.sum()))
    best = min(range(reps), key=lambda i: times[i])
    return {"seconds": times[best], "tokens": tokens[best], "tokens_per_s": tokens[best] / times[best]}


if __name__ == "__main__":
    main()
