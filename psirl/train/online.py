"""The online policy-gradient loop: every preset (REINFORCE ... CISPO) is knob values of this one step.

    prompts -> engine.generate(n=G) -> rewards -> [dynamic sampling] -> [ref log-probs, KL]
            -> advantages (core, one signature; GAE uses the critic) -> for epoch, minibatch:
               token_logprobs -> core.objective.policy_loss (+ clipped value loss) -> step
            -> engine.sync

Nothing here knows which algorithm it runs: `OnlineKnobs` (psirl.algorithms) says which advantage
estimator, ratio level, clip rule, aggregation and KL placement to use, and core/ implements each.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from psirl.algorithms import OnlineKnobs
from psirl.core.filters import zero_signal_groups
from psirl.core.kl import AdaptiveKLController, FixedKLController, kl_estimate, kl_in_reward
from psirl.core.masking import masked_mean, place_on_last_token
from psirl.core.objective import policy_loss
from psirl.core.value import clipped_value_loss, explained_variance
from psirl.rollout.batch import RolloutBatch, SamplingParams
from psirl.train.base import (
    LoopSpec,
    build_optimizer,
    build_scheduler,
    clip_and_step,
    run_loop,
    split_microbatches,
)
from psirl.train.distributed import (
    all_reduce_gradients,
    all_reduce_sum,
    any_rank,
    global_advantages,
    global_step_normaliser,
    rank_seed,
    reduce_metrics,
    shard_indices,
    world,
)
from psirl.train.evaluation import task_evaluator
from psirl.train.fsdp import shard_models
from psirl.train.rewards import build_reward
from psirl.train.setup import build_policy, build_task, load_prompt_records

SUMMARY_KEYS = ("reward/mean", "kl/mean", "entropy/mean", "eval/accuracy", "perf/tokens_per_s")


def train(config, *, resume: bool = False, quiet: bool = False) -> Path:
    """Run the online loop with `config.algorithm` (a preset plus knob overrides)."""
    return run_loop(config, build_online, resume=resume, quiet=quiet, summary_keys=SUMMARY_KEYS)


def knobs_from_config(config) -> OnlineKnobs:
    from psirl.train.config import resolve_algorithm

    return resolve_algorithm(config)


def build_online(config, run_dir: Path) -> LoopSpec:
    knobs = knobs_from_config(config)
    sampling = knobs.sampling
    _check_data_parallel(config, sampling)
    model, tokenizer = build_policy(config, run_dir)
    device = model.device
    task = build_task(config)
    records = load_prompt_records(config, task)
    if config.data.max_prompt_tokens:
        from psirl.data.records import check_prompt_lengths

        check_prompt_lengths(records, tokenizer, config.data.max_prompt_tokens,
                             config.data.train_path or f"task {config.data.task}")
    reward_fn = build_reward(config, task)

    from psirl.rollout.hf_engine import HFEngine

    engine = HFEngine(model, tokenizer)
    uses_kl = knobs.loss.kl_placement != "none" and (knobs.loss.kl_coef > 0 or knobs.kl_control.adaptive)
    # The reference is a frozen copy of the initial policy: only built when the KL needs it.
    ref_model = None
    if uses_kl:
        ref_model = copy.deepcopy(model).eval()
        for p in ref_model.parameters():
            p.requires_grad_(False)
    kl_ctl = (AdaptiveKLController(knobs.loss.kl_coef, knobs.kl_control.target, knobs.kl_control.horizon)
              if knobs.kl_control.adaptive else FixedKLController(knobs.loss.kl_coef))

    value_model, value_params = None, []
    if knobs.advantage.estimator == "gae":
        from psirl.models.value import ValueModel

        value_model = ValueModel.from_policy(model).to(device)
    # distributed.strategy fsdp: shard every model (after the copies, before the optimisers).
    shard_models(config, model, ref_model, value_model)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, config.optim)
    updates_per_step = sampling.epochs * sampling.minibatches
    scheduler = build_scheduler(optimizer, config.optim, config.max_steps * updates_per_step)
    models = {"policy": model}
    optimizers = {"policy": optimizer}
    schedulers = {"policy": scheduler}

    if value_model is not None:
        value_params = [p for p in value_model.parameters() if p.requires_grad]
        models["value"] = value_model
        optimizers["value"] = build_optimizer(value_params, config.optim)
        schedulers["value"] = build_scheduler(optimizers["value"], config.optim,
                                              config.max_steps * updates_per_step)

    from psirl.models.logprobs import token_logprobs

    def forward_logprobs(m, batch: RolloutBatch, with_entropy=False):
        # Same distribution as the engine's behaviour log-probs: softmax(z / T) (T = 0: greedy,
        # scored under T = 1), so ratios start at exactly 1 up to float rounding.
        return token_logprobs(m, batch.input_ids, batch.attention_mask, batch.completion_ids.shape[1],
                              temperature=sampling.temperature or 1.0, with_entropy=with_entropy,
                              entropy_grad=knobs.loss.entropy_coef > 0)

    def sample(prompts_idx: list[int], seed: int) -> tuple[RolloutBatch, torch.Tensor, list[dict]]:
        recs = [records[i] for i in prompts_idx]
        params_ = SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p,
                                 top_k=sampling.top_k, max_new_tokens=sampling.max_new_tokens,
                                 n=sampling.group_size, seed=seed)
        batch = engine.generate([r["prompt"] for r in recs], params_)
        per_sample = [recs[int(g)] for g in batch.group_ids]
        rewards = torch.tensor(reward_fn(batch.prompts, batch.completions, per_sample), dtype=torch.float32)
        return batch, rewards, per_sample

    def collect(step_index: int, generator: torch.Generator):
        """Sample `batch_size` prompts × G; with dynamic sampling, replace zero-signal groups."""
        order = torch.randperm(len(records), generator=generator).tolist()
        # Data-parallel: this rank samples its contiguous shard of the step's prompts (whole
        # groups), with its own seed; one process: all of them, with the step's seed.
        rank, world_size = world()
        shard = shard_indices(config.optim.batch_size, rank, world_size)
        n_prompts = len(shard)
        seed = rank_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)), rank)
        batch, rewards, recs = sample(order[shard.start:shard.stop], seed)
        stats = {"sampling/zero_signal_frac": float(zero_signal_groups(rewards, batch.group_ids).float().mean()),
                 "sampling/resample_rounds": 0.0}
        if not sampling.dynamic_sampling:
            return batch, rewards, recs, stats
        kept, kept_rewards, kept_recs = [], [], []
        # Refills come from the prompts after the step's batch (wrapping round), dealt by rank.
        offset = config.optim.batch_size % len(order)
        pool = (order[offset:] + order[:offset])[rank::world_size]
        cursor, rounds, have = 0, 0, 0
        while True:
            zero = zero_signal_groups(rewards, batch.group_ids)
            keep_groups = (~zero).nonzero().flatten().tolist()[: n_prompts - have]
            rows = [i for i, g in enumerate(batch.group_ids.tolist()) if g in set(keep_groups)]
            if rows:
                kept.append(batch.select(rows))
                kept_rewards.append(rewards[rows])
                kept_recs.extend(recs[i] for i in rows)
                have += len(keep_groups)
            if have >= n_prompts or rounds >= sampling.max_resample_rounds:
                break
            rounds += 1
            need = n_prompts - have
            nxt = [pool[(cursor + k) % len(pool)] for k in range(need)]
            cursor += need
            batch, rewards, recs = sample(nxt, seed + rounds)
        stats["sampling/resample_rounds"] = float(rounds)
        stats["sampling/kept_groups"] = float(have)
        if not kept:  # every group had equal rewards even after the cap: nothing to learn this step
            return None, None, None, stats
        return RolloutBatch.cat(kept), torch.cat(kept_rewards), kept_recs, stats

    def learn(batch, old_logp, ref_logp, advantages, returns, old_values, beta, generator):
        """epochs x minibatches optimiser steps on one rollout; each step's normaliser is computed
        once over its rows, then its micro-batches (grad_accum) are backpropagated separately."""
        mask = batch.completion_mask
        loss_knobs = knobs.loss if ref_logp is not None else _without_kl(knobs.loss)
        per_step: list[dict[str, float]] = []
        n = mask.shape[0]
        for _epoch in range(sampling.epochs):
            perm = torch.randperm(n, generator=generator).tolist() if sampling.minibatches > 1 else list(range(n))
            for mb in split_microbatches(n, sampling.minibatches):
                mb_rows = perm[mb]
                # Counted over every data-parallel rank's rows of this optimiser step.
                normaliser = global_step_normaliser(mask[mb_rows], loss_knobs.aggregation,
                                                    loss_knobs.constant_normaliser)
                v_norm = global_step_normaliser(mask[mb_rows], "token_mean")
                micro_metrics: list[dict[str, float]] = []
                for micro in split_microbatches(len(mb_rows), config.optim.grad_accum):
                    rows = mb_rows[micro]
                    sub = batch.select(rows)
                    logp, entropy = forward_logprobs(model, sub, with_entropy=True)
                    loss, lm = policy_loss(
                        logp, old_logp[rows], advantages[rows], mask[rows], loss_knobs, normaliser,
                        ref_logp=ref_logp[rows] if ref_logp is not None else None,
                        entropy=entropy, kl_coef=beta,
                    )
                    loss.backward()
                    if value_model is not None:
                        values = value_model.values(sub.input_ids, sub.attention_mask, mask.shape[1])
                        vloss = knobs.value.vf_coef * clipped_value_loss(
                            values, old_values[rows], returns[rows], mask[rows],
                            knobs.value.value_clip, v_norm)
                        vloss.backward()
                        lm["value_loss"] = float(vloss.detach())
                    micro_metrics.append(lm)
                step_metrics = _combine_micro_metrics(micro_metrics)
                all_reduce_gradients(params)  # data-parallel: summed = the full-batch gradient
                step_metrics["grad_norm"] = clip_and_step(params, optimizer, scheduler, config.optim.grad_clip)
                if value_model is not None:
                    all_reduce_gradients(value_params)
                    clip_and_step(value_params, optimizers["value"], schedulers["value"],
                                  config.optim.grad_clip)
                per_step.append(step_metrics)
        return {k: sum(m[k] for m in per_step) / len(per_step) for k in per_step[0]}

    def step(step_index: int, generator: torch.Generator) -> dict[str, float]:
        t0 = time.perf_counter()
        model.eval()
        batch, rewards, recs, metrics = collect(step_index, generator)
        t_gen = time.perf_counter()
        metrics["time/generate_s"] = t_gen - t0
        if any_rank(batch is None):  # data-parallel: all ranks skip if one has nothing to learn
            metrics["sampling/skipped_step"] = 1.0
            return reduce_metrics(metrics, weight=1.0)
        batch = batch.to(device)
        rewards = rewards.to(device)
        mask = batch.completion_mask
        lengths = mask.sum(dim=1)
        metrics.update({
            "reward/mean": float(rewards.mean()),
            "reward/std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
            "response/length_mean": float(lengths.mean()),
            "response/length_max": float(lengths.max()),
            "response/truncated_frac": float(batch.truncated.float().mean()),
        })
        metrics.update(getattr(reward_fn, "metrics", lambda: {})())
        if task is not None:
            # The task's verifier is the gold reward: next to a proxy reward (a reward model, a
            # judge, a format bonus) it shows over-optimisation (reference 003).
            metrics["task/accuracy"] = sum(task.reward(c, r) for c, r in zip(batch.completions, recs, strict=True)) / len(recs)

        with torch.no_grad():
            # One update on fresh samples: the engine's behaviour log-probs are the old log-probs.
            old_logp = batch.behaviour_logprobs
            ref_logp = forward_logprobs(ref_model, batch)[0] if ref_model is not None else None
            token_rewards = place_on_last_token(rewards, mask)
            beta = kl_ctl.value
            if ref_logp is not None:
                # kl/mean: k1 summed over each sequence (an unbiased sequence-KL estimate), averaged.
                metrics["kl/mean"] = float(((old_logp - ref_logp) * mask).sum(dim=1).mean())
                kl_tokens = kl_estimate(old_logp, ref_logp, knobs.loss.kl_estimator)
                metrics[f"kl/{knobs.loss.kl_estimator}_token_mean"] = float(masked_mean(kl_tokens, mask))
                if knobs.loss.kl_placement.startswith("reward"):
                    token_rewards = kl_in_reward(token_rewards, old_logp, ref_logp, mask, coef=beta,
                                                 estimator=knobs.loss.kl_estimator,
                                                 placement=knobs.loss.kl_placement)
            old_values = None
            if value_model is not None:
                old_values = value_model.values(batch.input_ids, batch.attention_mask, mask.shape[1])
            # batch_mean / batch_whiten take the global batch's statistics when data-parallel.
            advantages, returns = global_advantages(
                knobs.advantage.estimator, token_rewards, mask, batch.group_ids, old_values,
                gamma=knobs.advantage.gamma, lam=knobs.advantage.lam,
            )
        t_score = time.perf_counter()
        metrics["time/score_s"] = t_score - t_gen

        model.train()
        metrics.update(learn(batch, old_logp, ref_logp, advantages, returns, old_values, beta, generator))
        if value_model is not None:
            metrics["value/explained_variance"] = float(explained_variance(old_values, returns, mask))
        t_learn = time.perf_counter()
        metrics["time/learn_s"] = t_learn - t_score
        n_tokens = float(mask.sum())
        metrics["perf/tokens_per_s"] = n_tokens / max(t_learn - t0, 1e-9)
        metrics = reduce_metrics(metrics, weight=float(mask.shape[0]))  # global values

        if uses_kl and knobs.kl_control.adaptive and "kl/mean" in metrics:
            kl_ctl.update(metrics["kl/mean"], int(all_reduce_sum(float(mask.shape[0]))))
        metrics["kl/coef"] = kl_ctl.value
        reset = knobs.kl_control.ref_reset_every
        if ref_model is not None and reset > 0 and (step_index + 1) % reset == 0:
            ref_model.load_state_dict(model.state_dict())
            metrics["kl/ref_reset"] = 1.0
        engine.sync(model)
        return metrics

    evaluate = task_evaluator(config, model, tokenizer, task, max_new_tokens=sampling.max_new_tokens)

    return LoopSpec(
        models=models, tokenizer=tokenizer, optimizers=optimizers, schedulers=schedulers,
        step=step, evaluate=evaluate,
        get_state=lambda: {"kl_controller": kl_ctl.state_dict()},
        set_state=lambda s: kl_ctl.load_state_dict(s["kl_controller"]) if "kl_controller" in s else None,
        data_parallel=True,
    )


def _check_data_parallel(config, sampling) -> None:
    """Every rank must take the same number of optimiser steps per rollout: each needs at least
    one prompt, and at least `sampling.minibatches` rows (with dynamic sampling a rank may keep
    a single group of G rows)."""
    _, world_size = world()
    if world_size == 1:
        return
    if config.optim.batch_size < world_size:
        raise ValueError(f"optim.batch_size: {config.optim.batch_size} prompts cannot be shared "
                         f"by {world_size} data-parallel ranks (need batch_size >= world size)")
    prompts = 1 if sampling.dynamic_sampling else config.optim.batch_size // world_size
    if sampling.minibatches > sampling.group_size * prompts:
        raise ValueError(f"algorithm.knobs.sampling.minibatches: {sampling.minibatches} minibatches "
                         f"need at least as many rows on every data-parallel rank, which may hold "
                         f"only {sampling.group_size * prompts}")


def _without_kl(loss_knobs):
    import dataclasses

    return dataclasses.replace(loss_knobs, kl_placement="none", kl_coef=0.0)


# Summed over micro-batches (each already divided by the step's normaliser); the rest are
# per-micro-batch means, averaged.
_SUMMED = ("loss", "pg_loss", "kl_loss", "entropy_loss", "value_loss")
# policy_loss metric name -> name in metrics.jsonl
_METRIC_NAMES = {
    "loss": "loss/total", "pg_loss": "loss/policy", "kl_loss": "loss/kl",
    "entropy_loss": "loss/entropy", "value_loss": "loss/value",
    "clip_frac_low": "clip/frac_low", "clip_frac_high": "clip/frac_high",
    "clip_frac_dual": "clip/frac_dual", "ratio_mean": "ratio/mean", "ratio_min": "ratio/min",
    "ratio_max": "ratio/max", "kl_mean": "kl/loss_estimate_mean", "entropy_mean": "entropy/mean",
}


def _combine_micro_metrics(micro: list[dict[str, float]]) -> dict[str, float]:
    out = {}
    for key in micro[0]:
        values = [m[key] for m in micro]
        total = sum(values)
        out[_METRIC_NAMES.get(key, key)] = total if key in _SUMMED else total / len(values)
    out["ratio/max"] = max(m["ratio_max"] for m in micro)
    out["ratio/min"] = min(m["ratio_min"] for m in micro)
    return out
