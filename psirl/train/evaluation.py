"""Held-out task accuracy, sampled and greedy: the number the demo and the loops report."""

from __future__ import annotations

from pathlib import Path

import torch


@torch.no_grad()
def task_accuracy(
    model,
    tokenizer,
    records: list[dict],
    reward,
    *,
    greedy: bool,
    max_new_tokens: int,
    seed: int = 0,
    batch_size: int = 256,
) -> float:
    """Mean of `reward(completion, record)` over one completion per record.

    reward: a callable (completion: str, record: dict) -> float, e.g. a task's verifier.
    greedy: temperature 0; else temperature 1, seeded, so the estimate is reproducible.
    """
    from psirl.rollout.batch import SamplingParams
    from psirl.rollout.hf_engine import HFEngine

    if not records:
        return float("nan")
    was_training = model.training
    model.eval()
    engine = HFEngine(model, tokenizer)
    total = 0.0
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        params = SamplingParams(
            temperature=0.0 if greedy else 1.0,
            max_new_tokens=max_new_tokens,
            n=1,
            seed=seed + start,
        )
        batch = engine.generate([r["prompt"] for r in chunk], params)
        total += sum(reward(c, r) for c, r in zip(batch.completions, chunk, strict=True))
    if was_training:
        model.train()
    return total / len(records)


def eval_metrics(model, tokenizer, records, reward, *, max_new_tokens, seed, greedy=True, sampled=True):
    """{'eval/accuracy': sampled, 'eval/accuracy_greedy': greedy} for the enabled modes."""
    out = {}
    if sampled:
        out["eval/accuracy"] = task_accuracy(model, tokenizer, records, reward, greedy=False,
                                             max_new_tokens=max_new_tokens, seed=seed)
    if greedy:
        out["eval/accuracy_greedy"] = task_accuracy(model, tokenizer, records, reward, greedy=True,
                                                    max_new_tokens=max_new_tokens, seed=seed)
    return out


def evaluate_task_accuracy(model_dir: Path, task_name: str, *, n: int, greedy: bool,
                           max_new_tokens: int, seed: int = 0) -> float:
    """Accuracy of a saved model folder on a built-in task's held-out prompts (`psirl eval`)."""
    from psirl.data.tasks import get_task
    from psirl.models.loading import load_policy

    model, tokenizer = load_policy(model_dir)
    task = get_task(task_name)
    records = task.make(n, seed=10_000 + seed)
    return task_accuracy(model, tokenizer, records, task.reward, greedy=greedy,
                         max_new_tokens=max_new_tokens, seed=seed)


def task_evaluator(config, model, tokenizer, task, *, max_new_tokens: int | None = None):
    """The `evaluate(step) -> metrics` every loop hands to run_loop: held-out task accuracy.

    Returns None when there is nothing to evaluate (no built-in task or no held-out prompts).
    max_new_tokens defaults to `eval.max_new_tokens`.
    """
    from psirl.train.setup import eval_records

    records = eval_records(config, task)
    if task is None or not records:
        return None
    budget = config.eval.max_new_tokens if max_new_tokens is None else max_new_tokens

    def evaluate(step_index: int) -> dict[str, float]:
        return eval_metrics(model, tokenizer, records, task.reward, max_new_tokens=budget,
                            seed=config.seed, greedy=config.eval.greedy, sampled=config.eval.sampled)

    return evaluate
