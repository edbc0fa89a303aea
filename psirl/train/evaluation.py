"""Held-out evaluation with a gold metric: greedy pass@1 and sampled pass@k on any prompt file.

The gold metric is the task's verifier, or the run's verifier / code / format reward with its
shuffle switched off (a shuffled-reward control is judged by the real reward), never a learned
reward model or judge: those are the proxies the gold metric is there to check. Metrics:

- ``eval/accuracy_greedy``: mean reward of one greedy completion per prompt;
- ``eval/pass@1_greedy``: fraction of prompts whose greedy completion is fully correct
  (reward >= 1, e.g. every test passes); equal to the accuracy for a 0/1 verifier;
- ``eval/accuracy``: mean reward over sampled completions (temperature 1, seeded);
- ``eval/pass@k``: unbiased pass@k (psirl/core/passk.py) from ``n_samples`` per prompt, for
  k = 1, 2, 4, ... up to n_samples.

``evaluator_from_config`` is the ``evaluate(step) -> metrics`` every loop hands to run_loop.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from psirl.core.passk import mean_pass_at_k

CORRECT = 1.0 - 1e-9  # a sample is "correct" when its reward is (numerically) 1
GOLD_KINDS = ("task", "verifier", "code", "format")


def _batch_reward(reward) -> Callable[[list[str], list[str], list[dict]], list[float]]:
    """Accept a RewardFn (prompts, completions, records) or a task verifier (completion, record)."""
    import inspect

    try:
        arity = len(inspect.signature(reward).parameters)
    except (TypeError, ValueError):
        arity = 3
    if arity == 2:
        return lambda prompts, completions, records: [
            float(reward(c, r)) for c, r in zip(completions, records, strict=True)
        ]
    return reward


def ks_for(n_samples: int) -> list[int]:
    """k = 1, 2, 4, ... <= n_samples, plus n_samples itself."""
    ks, k = [], 1
    while k <= n_samples:
        ks.append(k)
        k *= 2
    if ks and ks[-1] != n_samples:
        ks.append(n_samples)
    return ks


@torch.no_grad()
def evaluate_records(
    engine,
    tokenizer,
    records: list[dict],
    reward,
    *,
    chat: bool | None = None,
    greedy: bool = True,
    n_samples: int = 0,
    temperature: float = 1.0,
    max_new_tokens: int = 64,
    seed: int = 0,
    batch_size: int = 64,
    details: list | None = None,
) -> dict[str, float]:
    """Gold metrics of ``engine``'s policy on ``records`` (see the module docstring).

    reward: RewardFn (prompts, completions, records) -> list[float], or (completion, record).
    chat: how prompts are rendered (psirl.data.templates.render_prompt).
    n_samples: sampled completions per prompt for eval/accuracy and eval/pass@k (0 = none).
    details: if a list, one dict per record (prompt index, greedy completion and reward, sampled
    correct count) is appended to it.
    """
    from psirl.data.templates import render_prompt
    from psirl.rollout.batch import SamplingParams

    if not records:
        return {}
    score = _batch_reward(reward)
    texts = [render_prompt(tokenizer, r["prompt"], chat=chat) for r in records]
    out: dict[str, float] = {}
    rows: list[dict[str, Any]] = [{"index": i} for i in range(len(records))]
    if greedy:
        rewards: list[float] = []
        for start in range(0, len(records), batch_size):
            chunk = slice(start, start + batch_size)
            params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, n=1,
                                    seed=seed + start)
            batch = engine.generate(texts[chunk], params)
            scores = score(texts[chunk], batch.completions, records[chunk])
            rewards.extend(float(s) for s in scores)
            for row, completion, value in zip(rows[chunk], batch.completions, scores, strict=True):
                row.update(greedy_completion=completion, greedy_reward=float(value))
        out["eval/accuracy_greedy"] = sum(rewards) / len(rewards)
        out["eval/pass@1_greedy"] = sum(r >= CORRECT for r in rewards) / len(rewards)
    if n_samples > 0:
        per_prompt = max(1, batch_size // n_samples)
        total, count, correct_counts = 0.0, 0, []
        for start in range(0, len(records), per_prompt):
            chunk = slice(start, start + per_prompt)
            params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens,
                                    n=n_samples, seed=seed + 7919 + start)
            batch = engine.generate(texts[chunk], params)
            repeated_prompts = [t for t in texts[chunk] for _ in range(n_samples)]
            repeated_records = [r for r in records[chunk] for _ in range(n_samples)]
            scores = [float(s) for s in score(repeated_prompts, batch.completions,
                                              repeated_records)]
            total += sum(scores)
            count += len(scores)
            for offset, row in enumerate(rows[chunk]):
                group = scores[offset * n_samples : (offset + 1) * n_samples]
                correct = sum(s >= CORRECT for s in group)
                correct_counts.append(correct)
                row["sampled_correct"] = correct
        out["eval/accuracy"] = total / count
        for k in ks_for(n_samples):
            out[f"eval/pass@{k}"] = mean_pass_at_k(correct_counts, n_samples, k)
    if details is not None:
        details.extend(rows)
    return out


def gold_reward(config, task):
    """The gold metric's RewardFn for a run, or None when the run has no gold metric.

    data.task set: the task's verifier. Else the run's reward when it is a verifier, code or
    format reward (or a weighted sum of only those), with ``shuffle`` off; a learned reward model
    or judge is a proxy, so then records with an ``answer`` field are scored by AnswerVerifier
    (evaluator_from_config checks the field) and otherwise there is none.
    """
    if task is not None:
        from psirl.rewards.verifiers import TaskReward

        return TaskReward(task)
    section = config.reward
    if _is_gold(section):
        from psirl.train.rewards import build_reward

        unshuffled = SimpleNamespace(reward=section.model_copy(update={"shuffle": False}))
        return build_reward(unshuffled, task)
    from psirl.rewards.verifiers import AnswerVerifier

    return AnswerVerifier()


def _is_gold(section) -> bool:
    """A verifier / code / format reward (or a weighted sum of only those) that can score without
    a built-in task (`kind: task` needs data.task: without it, it is no gold metric)."""
    if section.kind == "weighted":
        return all(_is_gold(c.reward) for c in section.components)
    return section.kind in GOLD_KINDS and section.kind != "task"


def evaluator_from_config(config, model, tokenizer, task, *, engine=None,
                          max_new_tokens: int | None = None):
    """The `evaluate(step) -> metrics` every loop hands to run_loop, or None.

    Records: `data.eval_path` (first `eval.n`) when given, else the built-in task's held-out
    prompts. Reward: gold_reward. Greedy metrics when `eval.greedy`; sampled ones when
    `eval.sampled`, with `eval.n_samples` completions per prompt (1 if the config has no such
    field). Prompts are rendered with `data.chat`. The engine is `build_engine(config, model,
    tokenizer)` unless the loop passes its own; it is synced to the model before every call.
    None when there is nothing to evaluate: no eval records, or eval-file records without an
    `answer` field under a proxy reward (reward model / judge).
    """
    from psirl.train.setup import eval_records

    records = eval_records(config, task)
    if not records:
        return None
    reward = gold_reward(config, task)
    if task is None and not _is_gold(config.reward):
        if any("answer" not in r for r in records):
            return None
    budget = config.eval.max_new_tokens if max_new_tokens is None else max_new_tokens
    n_samples = int(getattr(config.eval, "n_samples", 1)) if config.eval.sampled else 0
    state: dict[str, Any] = {"engine": engine}

    def evaluate(step_index: int) -> dict[str, float]:
        if state["engine"] is None:
            from psirl.rollout import build_engine

            state["engine"] = build_engine(config, model, tokenizer)
        state["engine"].sync(model)
        was_training = model.training
        model.eval()
        try:
            return evaluate_records(
                state["engine"], tokenizer, records, reward, chat=config.data.chat,
                greedy=config.eval.greedy, n_samples=n_samples, max_new_tokens=budget,
                seed=config.seed,
            )
        finally:
            model.train(was_training)

    return evaluate


def task_evaluator(config, model, tokenizer, task, *, max_new_tokens: int | None = None):
    """Former name of evaluator_from_config (kept for the loops that call it)."""
    return evaluator_from_config(config, model, tokenizer, task, max_new_tokens=max_new_tokens)


# ------------------------------------------------------------------- helpers kept for callers


def default_engine(model, tokenizer):
    """The engine of a default `rollout:` section (transformers), for evaluation outside a run."""
    from psirl.rollout import build_engine
    from psirl.train.config import RolloutConfig

    return build_engine(SimpleNamespace(rollout=RolloutConfig()), model, tokenizer)


@torch.no_grad()
def task_accuracy(model, tokenizer, records: list[dict], reward, *, greedy: bool,
                  max_new_tokens: int, seed: int = 0, batch_size: int = 256) -> float:
    """Mean of ``reward(completion, record)`` over one completion per record (greedy, or
    sampled at temperature 1 with ``seed``) with the transformers engine; prompts as given."""
    if not records:
        return float("nan")
    was_training = model.training
    model.eval()
    try:
        metrics = evaluate_records(
            default_engine(model, tokenizer), tokenizer, records, reward, chat=False, greedy=greedy,
            n_samples=0 if greedy else 1, max_new_tokens=max_new_tokens, seed=seed,
            batch_size=batch_size,
        )
    finally:
        model.train(was_training)
    return metrics["eval/accuracy_greedy" if greedy else "eval/accuracy"]


def eval_metrics(model, tokenizer, records, reward, *, max_new_tokens, seed, greedy=True,
                 sampled=True):
    """{'eval/accuracy': sampled, 'eval/accuracy_greedy': greedy} for the enabled modes."""
    out = {}
    if sampled:
        out["eval/accuracy"] = task_accuracy(model, tokenizer, records, reward, greedy=False,
                                             max_new_tokens=max_new_tokens, seed=seed)
    if greedy:
        out["eval/accuracy_greedy"] = task_accuracy(model, tokenizer, records, reward,
                                                    greedy=True, max_new_tokens=max_new_tokens,
                                                    seed=seed)
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


REWARD_CHOICES = ("verifier", "code", "task")


def evaluate_file(model_dir: str | Path, data_path: str | Path, *, reward: str = "verifier",
                  task: str | None = None, n: int | None = None, n_samples: int = 0,
                  greedy: bool = True, chat: bool | None = None, max_new_tokens: int = 256,
                  temperature: float = 1.0, seed: int = 0, device: str = "cpu",
                  details: list | None = None) -> dict[str, float]:
    """`psirl eval MODEL --data FILE`: gold metrics of a saved model on a prompt file.

    reward: "verifier" (AnswerVerifier on each record's `answer`), "code" (CodeTestsReward on
    its `tests`, after its `prefix`), or "task" (the built-in ``task``'s verifier).
    chat None: use the tokenizer's chat template when it has one.
    """
    from psirl.data.records import load_records
    from psirl.models.loading import load_policy
    if reward not in REWARD_CHOICES:
        raise ValueError(f"reward: expected one of {REWARD_CHOICES}, got {reward!r}")
    records = load_records(data_path, kind="prompt", limit=n)
    model, tokenizer = load_policy(model_dir, device=device)
    if reward == "verifier":
        from psirl.rewards.verifiers import AnswerVerifier

        reward_fn = AnswerVerifier()
    elif reward == "code":
        from psirl.rewards.code import CodeTestsReward

        reward_fn = CodeTestsReward()
    else:
        from psirl.data.tasks import get_task
        from psirl.rewards.verifiers import TaskReward

        if task is None:
            raise ValueError("reward 'task' needs --task NAME (a built-in task)")
        reward_fn = TaskReward(get_task(task))
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    engine = default_engine(model, tokenizer)
    metrics = evaluate_records(engine, tokenizer, records, reward_fn, chat=chat, greedy=greedy,
                               n_samples=n_samples, temperature=temperature,
                               max_new_tokens=max_new_tokens, seed=seed, details=details)
    metrics["eval/n"] = float(len(records))
    return metrics


def best_checkpoint_step(records: list[dict], saved_steps: list[int],
                         metric: str | None = None) -> tuple[int, str, float] | None:
    """(step, metric, value) of the saved checkpoint with the best gold metric, for
    `checkpoint.select_by` (final/ = that checkpoint rather than the last weights).

    records: metrics.jsonl records; saved_steps: steps that have a checkpoint (plus the final
    step). metric: the gold metric to maximise; None picks the first of
    diagnostics.GOLD_METRICS logged at some saved step. Only evaluations at a saved step count
    (the weights of any other step are gone); ties go to the earliest step. None when no saved
    step was evaluated.
    """
    from psirl.track.diagnostics import GOLD_METRICS, metric_series

    saved = set(saved_steps)
    for name in [metric] if metric is not None else list(GOLD_METRICS):
        steps, values = metric_series(records, name)
        candidates = [(v, -s) for s, v in zip(steps, values, strict=True) if s in saved]
        if candidates:
            value, negative_step = max(candidates)
            return -negative_step, name, value
    return None
