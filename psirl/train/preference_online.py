"""Online DPO's data: sample completions from the current policy, rank them with the reward, and
keep best-vs-worst pairs as token ids.

    prompts --engine.generate(n=K)--> K completions per prompt --reward--> R [B]
            --core.preference.best_worst_pairs--> (chosen, rejected) per prompt, ties skipped

The pairs reuse the sampled token ids (prompt as the engine encoded it, completion up to and
including EOS), so nothing is decoded and re-tokenised. References:
../shared/reference/000_7914f6881bc4a22c.txt ("Online DPO runs DPO on a stream of fresh
preferences (sampled and labeled during training)"), ../shared/reference/001_dd55e9af3bef0bfc.txt
("Iterative and Online DPO": generate with the current model, label with the reward model, DPO).
"""

from __future__ import annotations

from psirl.core.preference import best_worst_pairs
from psirl.rollout.batch import RolloutBatch, SamplingParams


def row_token_ids(batch: RolloutBatch, row: int) -> tuple[list[int], list[int]]:
    """(prompt ids without padding, completion ids up to and including EOS) of one batch row."""
    p = batch.prompt_len
    prompt_mask = batch.attention_mask[row, :p].bool()
    prompt = batch.input_ids[row, :p][prompt_mask].tolist()
    completion = batch.completion_ids[row][batch.completion_mask[row].bool()].tolist()
    return prompt, completion


def sample_online_pairs(
    sampler,
    records: list[dict],
    *,
    samples_per_prompt: int,
    temperature: float,
    max_new_tokens: int,
    seed: int,
) -> tuple[dict[str, list[list[int]]], dict[str, float]]:
    """Sample, score and pair. Returns (pairs, metrics).

    sampler: the run's rollout layer (psirl.rollout.Sampler: renders records[i]["prompt"],
    generates, scores with the run's reward). pairs: {"prompt", "chosen", "rejected"} -> lists
    of token-id lists (one entry per prompt whose samples are not all tied). Completions that are
    empty after masking (cannot happen with EOS kept) are skipped. metrics: reward/mean,
    reward/std, online/pairs, online/tied_prompts.
    """
    params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens,
                            n=samples_per_prompt, seed=seed)
    rollouts = sampler.sample(records, params)
    batch, rewards = rollouts.batch, rollouts.rewards
    chosen_rows, rejected_rows = best_worst_pairs(rewards, batch.group_ids)
    pairs: dict[str, list[list[int]]] = {"prompt": [], "chosen": [], "rejected": []}
    for c, r in zip(chosen_rows.tolist(), rejected_rows.tolist(), strict=True):
        prompt, chosen = row_token_ids(batch, c)
        _, rejected = row_token_ids(batch, r)
        if chosen and rejected:
            pairs["prompt"].append(prompt)
            pairs["chosen"].append(chosen)
            pairs["rejected"].append(rejected)
    metrics = {
        "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
        "online/pairs": float(len(pairs["prompt"])),
        "online/tied_prompts": float(len(records) - chosen_rows.numel()),
    }
    return pairs, metrics
