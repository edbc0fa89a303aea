"""Supervised fine-tuning: the completion's token NLL, prompt tokens masked out of the loss.

Batches use the layout shared with RL (prompt left-padded, completion right-padded) so the same
`token_logprobs` serves every loop; each step's examples are sorted by length before they are cut
into micro-batches, which keeps padding low without packing (packing across examples would need
attention masks the CPU SDPA path does not take for these models).
"""

from __future__ import annotations

from pathlib import Path

import torch

from psirl.core.sft import sft_token_loss
from psirl.train.base import (
    LoopSpec,
    build_optimizer,
    build_scheduler,
    clip_and_step,
    run_loop,
    split_microbatches,
)
from psirl.train.setup import (
    build_policy,
    build_task,
    encode_texts,
    eval_records,
    pad_prompt_completion,
)


def train(config, *, resume: bool = False, quiet: bool = False) -> Path:
    """Run SFT to `config.max_steps`; returns the run folder."""
    return run_loop(config, build_sft, resume=resume, quiet=quiet,
                    summary_keys=("loss", "eval/accuracy", "eval/accuracy_greedy"))


def load_sft_examples(config, task, tokenizer) -> list[dict]:
    """{"prompt", "completion"} records from the task or from `data.train_path`."""
    if config.data.train_path is not None:
        from psirl.data.records import load_records
        from psirl.data.templates import render_sft_example

        records = load_records(config.data.train_path, kind="sft", split=config.data.split)
        return [dict(zip(("prompt", "completion"), render_sft_example(r), strict=True))
                for r in records]
    if task is None:
        raise ValueError("data: SFT needs data.task or data.train_path")
    return task.sft_examples(config.data.n_train, seed=config.seed)


def epoch_batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of step `step`'s batch: consecutive slices of a per-epoch permutation.

    Depends only on (n, batch_size, step, seed), so a resumed run sees the same batches.
    """
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(pos, n)
        g = torch.Generator().manual_seed(seed * 7_919 + epoch)
        out.append(int(torch.randperm(n, generator=g)[offset]))
    return out


def build_sft(config, run_dir: Path) -> LoopSpec:
    model, tokenizer = build_policy(config, run_dir)
    task = build_task(config)
    examples = load_sft_examples(config, task, tokenizer)
    if not examples:
        raise ValueError("data: the SFT dataset is empty")
    prompts = encode_texts(tokenizer, [e["prompt"] for e in examples])
    completions = encode_texts(tokenizer, [e["completion"] for e in examples], add_eos=True)
    max_len = config.sft.max_seq_len
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        if len(p) + len(c) > max_len:
            raise ValueError(
                f"data: SFT example {i} has {len(p) + len(c)} tokens, over sft.max_seq_len={max_len}"
            )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, config.optim)
    scheduler = build_scheduler(optimizer, config.optim, config.max_steps)
    pad_id = tokenizer.pad_token_id
    eval_recs = eval_records(config, task)

    from psirl.models.logprobs import token_logprobs

    def step(step_index: int, generator: torch.Generator) -> dict[str, float]:
        idx = epoch_batch_indices(len(examples), config.optim.batch_size, step_index, config.seed)
        idx.sort(key=lambda i: len(prompts[i]) + len(completions[i]))
        n_tokens = sum(len(completions[i]) for i in idx)  # the step's normaliser, computed once
        total = 0.0
        for mb in split_microbatches(len(idx), config.optim.grad_accum):
            sel = idx[mb]
            ids, attn, cmask = pad_prompt_completion(
                [prompts[i] for i in sel], [completions[i] for i in sel], pad_id
            )
            ids, attn, cmask = ids.to(model.device), attn.to(model.device), cmask.to(model.device)
            logp, _ = token_logprobs(model, ids, attn, cmask.shape[1])
            loss = sft_token_loss(logp, cmask, n_tokens)
            loss.backward()
            total += float(loss)
        grad_norm = clip_and_step(params, optimizer, scheduler, config.optim.grad_clip)
        return {"loss": total, "grad_norm": grad_norm, "tokens": float(n_tokens)}

    def evaluate(step_index: int) -> dict[str, float]:
        if task is None or not eval_recs:
            return {}
        from psirl.train.evaluation import eval_metrics

        return eval_metrics(model, tokenizer, eval_recs, task.reward,
                            max_new_tokens=config.eval.max_new_tokens, seed=config.seed,
                            greedy=config.eval.greedy, sampled=config.eval.sampled)

    return LoopSpec(models={"policy": model}, tokenizer=tokenizer,
                    optimizers={"policy": optimizer}, schedulers={"policy": scheduler},
                    step=step, evaluate=evaluate)
