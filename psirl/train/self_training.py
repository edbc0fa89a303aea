"""Self-training (loop "self_training"): STaR, ReST and RAFT as one sample -> filter -> SFT loop.

    for each round t:
      grow:    sample K completions for each of optim.batch_size prompts; score them (reward)
               [STaR rationalisation: prompts with no kept sample are re-sampled with the answer
                as a hint; kept rationales are stored with the ORIGINAL prompt, without the hint]
      improve: for each SFT step of the round, keep the samples the method's filter accepts
               (core/filters.py) and take one SFT step on them (train/sft_update.py)

Filters (``select_samples``): STaR keeps reward >= reward_threshold; ReST's improve step i keeps
reward >= rest_thresholds[i] (non-decreasing, so later steps train on a better subset); RAFT
keeps the top_k (default 1) of each prompt. ``top_k`` also caps STaR / ReST per prompt.
A round lasts ``sft_steps_per_round`` steps (ReST: that times the number of thresholds); the
round's samples live in the loop state, so a resumed run continues the same round.

Reference: ../shared/reference/000_7914f6881bc4a22c.txt ("Self-Training", "The iterated SFT
loop", "STaR, ReST, RAFT").
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from psirl.core.filters import threshold_keep, top_k_per_group
from psirl.train.base import LoopSpec, build_optimizer, build_scheduler, run_loop

SUMMARY_KEYS = ("loss", "reward/mean", "self_training/kept", "eval/accuracy_greedy")


def train(config, *, resume: bool = False, quiet: bool = False, reward_fn=None) -> Path:
    """Run STaR / ReST / RAFT (`self_training.method`) to `config.max_steps`; returns the run
    folder. reward_fn: your own ``fn(prompts, completions, records) -> list[float]``."""
    build = build_self_training if reward_fn is None else functools.partial(build_self_training, reward_fn=reward_fn)
    return run_loop(config, build, resume=resume, quiet=quiet, summary_keys=SUMMARY_KEYS)


def select_samples(method: str, rewards: torch.Tensor, group_ids: torch.Tensor, *,
                   threshold: float, top_k: int | None) -> torch.Tensor:
    """Which samples a self-training filter keeps: bool [B].

    star / rest: keep_i = R_i >= threshold, and (top_k set) i among the top_k of its group;
    raft:        keep_i = i among the top_k (None -> 1) highest rewards of its group
                 (ties broken by lower index; core/filters.py top_k_per_group), R_i >= threshold,
                 and its group is not all zero: a prompt whose every sample scored 0 has no best
                 sample to imitate (RAFT ranks samples to learn from the good ones), so it is
                 dropped whatever the threshold. Prompts with no kept sample are "dropped".
    rewards: [B] float; group_ids: [B] long (one group per prompt).
    """
    if method == "raft":
        _, inverse = torch.unique(group_ids, return_inverse=True)
        largest = torch.zeros(int(inverse.max()) + 1 if inverse.numel() else 0,
                              dtype=rewards.dtype, device=rewards.device)
        largest = largest.scatter_reduce(0, inverse, rewards.abs(), reduce="amax",
                                         include_self=False)
        scored = largest[inverse] > 0
        return top_k_per_group(rewards, group_ids, top_k or 1) & threshold_keep(
            rewards, threshold) & scored
    if method not in ("star", "rest"):
        raise ValueError(f"self_training.method: unknown method {method!r}")
    keep = threshold_keep(rewards, threshold)
    if top_k is not None:
        keep &= top_k_per_group(rewards, group_ids, top_k)
    return keep


def round_length(st) -> int:
    """SFT steps per grow round: sft_steps_per_round (ReST: times the number of thresholds)."""
    return st.sft_steps_per_round * (len(st.rest_thresholds) if st.method == "rest" else 1)


def step_threshold(st, position: int) -> float:
    """The reward threshold of the step at `position` within its round (ReST's schedule)."""
    if st.method == "rest":
        return st.rest_thresholds[position // st.sft_steps_per_round]
    return st.reward_threshold


def _samples_of(rollouts, prompt_ids: list[list[int]], groups: list[int],
                rationalised: bool) -> list[dict]:
    """One JSON-able dict per sampled row: prompt/completion ids, reward, group, rationalised.
    prompt_ids[g] / groups[g]: the ids trained on and the round's prompt number of the batch's
    group g."""
    batch = rollouts.batch
    out = []
    for row in range(len(batch)):
        g = int(batch.group_ids[row])
        completion = batch.completion_ids[row][batch.completion_mask[row].bool()].tolist()
        out.append({"prompt_ids": prompt_ids[g], "completion_ids": completion,
                    "reward": float(rollouts.rewards[row]), "group": groups[g],
                    "rationalised": rationalised})
    return out


def _group_prompt_ids(batch) -> list[list[int]]:
    """The prompt ids the engine encoded for each group (its first row), without padding."""
    from psirl.train.preference_online import row_token_ids

    return [row_token_ids(batch, row)[0] for row in batch.group_first_rows()]


def grow(sampler, records: list[dict], st, seed: int):
    """Sample and score one round. Returns (samples, metrics).

    records: the round's prompt records; groups are numbered 0..len(records)-1. STaR with
    `rationalize`: the prompts none of whose samples reach reward_threshold are re-sampled from
    `hint_template` (needs record["answer"]); the rationales are scored against the original
    prompt and record, and stored with the original prompt's ids so SFT trains on them WITHOUT
    the hint.
    """
    from psirl.rollout.batch import SamplingParams
    from psirl.rollout.sampler import ScoredRollouts

    params = SamplingParams(temperature=st.temperature, max_new_tokens=st.max_new_tokens,
                            n=st.samples_per_prompt, seed=seed)
    rollouts = sampler.sample(records, params)
    prompt_ids = _group_prompt_ids(rollouts.batch)
    samples = _samples_of(rollouts, prompt_ids, list(range(len(records))), False)
    metrics = {"reward/mean": float(rollouts.rewards.mean())}
    if st.method == "star" and st.rationalize:
        solved = {s["group"] for s in samples if s["reward"] >= st.reward_threshold}
        failed = [g for g in range(len(records)) if g not in solved]
        metrics["star/rationalised_prompts"] = float(len(failed))
        if failed:
            for g in failed:
                if "answer" not in records[g]:
                    raise ValueError(f"self_training.rationalize: prompt record {g} has no "
                                     f"'answer' field to use as the hint")
            texts = sampler.render([records[g] for g in failed])
            hinted = [st.hint_template.format(prompt=t, answer=records[g]["answer"])
                      for t, g in zip(texts, failed, strict=True)]
            hint_batch, per_row = sampler.generate([records[g] for g in failed], params,
                                                   texts=hinted)
            # Scored against the original (un-hinted) prompt text and record.
            originals = [texts[int(g)] for g in hint_batch.group_ids]
            hint_rewards = sampler.score(originals, hint_batch.completions, per_row)
            samples += _samples_of(ScoredRollouts(hint_batch, hint_rewards, per_row),
                                   [prompt_ids[g] for g in failed], failed, True)
    return samples, metrics


def build_self_training(config, run_dir: Path, *, reward_fn=None) -> LoopSpec:
    """The LoopSpec of STaR / ReST / RAFT. reward_fn: defaults to `build_reward(config, task)`."""
    from psirl.train.evaluation import evaluator_from_config
    from psirl.train.setup import build_policy, build_sampler, build_task, load_prompt_records
    from psirl.train.sft import epoch_batch_indices
    from psirl.train.sft_update import sft_update

    st, optim = config.self_training, config.optim
    model, tokenizer = build_policy(config, run_dir)
    task = build_task(config)
    records = load_prompt_records(config, task)
    sampler = build_sampler(config, model, tokenizer, task, reward_fn=reward_fn, records=records)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, optim)
    scheduler = build_scheduler(optimizer, optim, config.max_steps)
    per_round = round_length(st)
    state: dict = {"round": -1, "samples": [], "grow_metrics": {}}

    def step(step_index: int, generator: torch.Generator) -> dict[str, float]:
        round_index, position = divmod(step_index, per_round)
        if state["round"] != round_index:
            rows = epoch_batch_indices(len(records), optim.batch_size, round_index, config.seed)
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
            samples, grow_metrics = grow(sampler, [records[i] for i in rows], st, seed)
            state.update(round=round_index, samples=samples, grow_metrics=grow_metrics)
        samples = state["samples"]
        threshold = step_threshold(st, position)
        keep = select_samples(
            st.method, torch.tensor([s["reward"] for s in samples], dtype=torch.float32),
            torch.tensor([s["group"] for s in samples], dtype=torch.long),
            threshold=threshold, top_k=st.top_k).tolist()
        kept = [s for s, k in zip(samples, keep, strict=True) if k]
        metrics = dict(state["grow_metrics"])
        metrics.update(sft_update(model, params, optimizer, scheduler,
                                  [s["prompt_ids"] for s in kept],
                                  [s["completion_ids"] for s in kept],
                                  pad_id=tokenizer.pad_token_id, grad_accum=optim.grad_accum,
                                  grad_clip=optim.grad_clip))
        groups = {s["group"] for s in samples}
        metrics.update({
            "self_training/samples": float(len(samples)),
            "self_training/kept": float(len(kept)),
            # prompts none of whose samples was kept (RAFT: every sample scored 0 or below
            # the threshold), so they contribute nothing this step
            "self_training/dropped_prompts": float(len(groups - {s["group"] for s in kept})),
            "self_training/threshold": float(threshold),
        })
        if st.method == "star":
            metrics["star/rationalised_kept"] = float(sum(s["rationalised"] for s in kept))
        sampler.sync(model)
        return metrics

    evaluate = evaluator_from_config(config, model, tokenizer, task, engine=sampler.engine)

    def get_state() -> dict:
        return dict(state)

    def set_state(saved: dict) -> None:
        state.update(saved)

    return LoopSpec(models={"policy": model}, tokenizer=tokenizer,
                    optimizers={"policy": optimizer}, schedulers={"policy": scheduler},
                    step=step, evaluate=evaluate, get_state=get_state, set_state=set_state)
