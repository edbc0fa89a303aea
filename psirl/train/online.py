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
import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from psirl.algorithms import OnlineKnobs
from psirl.core.advantages import ESTIMATORS
from psirl.core.filters import dynamic_sampling_keep, zero_signal_groups
from psirl.core.kl import AdaptiveKLController, FixedKLController, kl_estimate
from psirl.core.masking import masked_mean
from psirl.core.objective import policy_loss
from psirl.core.offpolicy import mismatch_metrics, truncated_is_weights
from psirl.core.score import Scores, score_rollouts
from psirl.core.value import clipped_value_loss, explained_variance, value_clip_fraction
from psirl.models.logprobs import token_logprobs
from psirl.rewards.base import reward_metrics
from psirl.rollout.batch import RolloutBatch, SamplingParams
from psirl.rollout.sampler import Sampler, ScoredRollouts
from psirl.rollout.seeding import mix_seed, prompt_seeds
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
    gather_objects,
    global_advantages,
    global_step_normaliser,
    reduce_metrics,
    row_offset,
    shard_indices,
    world,
)
from psirl.train.evaluation import evaluator_from_config
from psirl.train.fsdp import shard_models
from psirl.train.setup import build_policy, build_sampler, build_task, load_prompt_records

SUMMARY_KEYS = ("reward/mean", "kl/mean", "entropy/mean", "eval/accuracy", "eval/env_success",
                "eval/env_success_sampled", "perf/tokens_per_s", "sampling/skipped_step")


def train(config, *, resume: bool = False, quiet: bool = False, reward_fn=None) -> Path:
    """Run the online loop with `config.algorithm` (a preset plus knob overrides).
    reward_fn: your own ``fn(prompts, completions, records) -> list[float]`` (sync or async)."""
    build = build_online if reward_fn is None else functools.partial(build_online, reward_fn=reward_fn)
    return run_loop(config, build, resume=resume, quiet=quiet, summary_keys=SUMMARY_KEYS)


def knobs_from_config(config) -> OnlineKnobs:
    from psirl.train.config import resolve_algorithm

    return resolve_algorithm(config)


@dataclass
class OnlineRun:
    """What the online stages share, built once by ``build_online``.

    sampler: the rollout layer (engine + rendering + reward); records: the prompt records;
    ref_model: frozen reference (None when the KL is off); value_model: PPO's critic (None
    unless the estimator is GAE); params / value_params: what each optimiser updates;
    kl_ctl: the KL coefficient controller (fixed or adaptive); task: the built-in task (gold
    reward) or None.
    """

    config: Any
    knobs: OnlineKnobs
    model: torch.nn.Module
    tokenizer: Any
    sampler: Sampler
    records: list[dict]
    task: Any
    ref_model: torch.nn.Module | None
    value_model: torch.nn.Module | None
    params: list[torch.nn.Parameter]
    value_params: list[torch.nn.Parameter]
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, Any]
    kl_ctl: Any


@dataclass
class Collected:
    """The collect stage's output: scored rollouts (None when every group had equal rewards even
    after dynamic sampling's refills: nothing to learn) and the sampling metrics, whose reward
    statistics cover every sample drawn this step, kept or not."""

    rollouts: ScoredRollouts | None
    metrics: dict[str, float]


@dataclass
class Scored:
    """The score stage's output, every tensor [B, T] on the policy's device (values: None
    without a critic; ref_logp: None without a reference; beta: this step's KL coefficient;
    is_weights: min(pi_trainer / pi_engine, C) per token or sequence when loss.tis_cap is set)."""

    old_logp: torch.Tensor
    ref_logp: torch.Tensor | None
    old_values: torch.Tensor | None
    scores: Scores
    beta: float
    is_weights: torch.Tensor | None = None  # truncated IS weights (engine-trainer mismatch)


def build_online(config, run_dir: Path, *, reward_fn=None) -> LoopSpec:
    """Build the policy, reference, critic, optimisers and rollout layer, and wire the stages."""
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
                             config.data.train_path or f"task {config.data.task}",
                             chat=config.data.chat)
    sampler = build_sampler(config, model, tokenizer, task, reward_fn=reward_fn, records=records)

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
    updates_per_step = sampling.epochs * sampling.minibatches
    optimizers = {"policy": build_optimizer(params, config.optim)}
    schedulers = {"policy": build_scheduler(optimizers["policy"], config.optim,
                                            config.max_steps * updates_per_step)}
    models = {"policy": model}
    if ref_model is not None and knobs.kl_control.ref_reset_every > 0:
        # A reset reference is no longer the initial policy: checkpoint it for an exact resume.
        models["reference"] = ref_model

    if value_model is not None:
        value_params = [p for p in value_model.parameters() if p.requires_grad]
        models["value"] = value_model
        optimizers["value"] = build_optimizer(value_params, config.optim)
        schedulers["value"] = build_scheduler(optimizers["value"], config.optim,
                                              config.max_steps * updates_per_step)

    run = OnlineRun(config=config, knobs=knobs, model=model, tokenizer=tokenizer, sampler=sampler,
                    records=records, task=task, ref_model=ref_model, value_model=value_model,
                    params=params, value_params=value_params, optimizers=optimizers,
                    schedulers=schedulers, kl_ctl=kl_ctl)
    if config.env is not None:  # held-out success of whole episodes
        evaluate = _episode_evaluator(config, sampler, task, sampling.max_new_tokens)
    else:
        evaluate = evaluator_from_config(config, model, tokenizer, task, engine=sampler.engine,
                                         max_new_tokens=sampling.max_new_tokens)
    return LoopSpec(
        models=models, tokenizer=tokenizer, optimizers=optimizers, schedulers=schedulers,
        step=lambda step_index, generator: online_step(run, step_index, generator),
        evaluate=evaluate,
        get_state=lambda: {"kl_controller": kl_ctl.state_dict()},
        set_state=lambda s: kl_ctl.load_state_dict(s["kl_controller"]) if "kl_controller" in s else None,
        data_parallel=True,
    )


# ------------------------------------------------------------------------------------ stages


def sampling_params(knobs: OnlineKnobs, seeds: tuple[int, ...]) -> SamplingParams:
    """The engine's parameters for one round of the step (G completions per prompt, prompt i
    sampled from the streams of ``seeds[i]``)."""
    s = knobs.sampling
    return SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                          max_new_tokens=s.max_new_tokens, n=s.group_size, seeds=seeds)


def forward_logprobs(model, batch: RolloutBatch, knobs: OnlineKnobs, *, with_entropy: bool = False):
    """(log-probs [B, T], entropy [B, T] or None) of the batch's completion tokens under `model`:
    the same distribution as the engine's behaviour log-probs, softmax(z / T) (T = 0: greedy,
    scored under T = 1), so the ratio starts at exactly 1 up to float rounding."""
    return token_logprobs(model, batch.input_ids, batch.attention_mask, batch.completion_ids.shape[1],
                          temperature=knobs.sampling.temperature or 1.0, with_entropy=with_entropy,
                          entropy_grad=knobs.loss.entropy_coef > 0)


def collect(run: OnlineRun, step_index: int, generator: torch.Generator) -> Collected:
    """Sample `optim.batch_size` prompts x G and score them; with dynamic sampling, replace the
    zero-signal groups (equal rewards: no gradient) by fresh prompts, at most
    `max_resample_rounds` times.

    Data-parallel: each round's prompts are dealt to the ranks in contiguous shards (whole
    groups), and prompt k of round r is sampled from streams seeded by (the step's seed, r, k)
    alone (psirl/rollout/seeding.py), so every prompt gets the same completions at any world
    size. Dynamic sampling decides globally, as one process would: the first groups with signal,
    in (round, position) order, are kept, and the kept groups are dealt to the ranks again in
    that order, so the step's batch -- and a run resumed on another number of ranks -- does not
    depend on the world size.
    """
    config, sampling = run.config, run.knobs.sampling
    order = torch.randperm(len(run.records), generator=generator).tolist()
    rank, world_size = world()
    batch_size = config.optim.batch_size
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    prompts, seeds = order[:batch_size], prompt_seeds(seed, batch_size)
    offset = batch_size % len(order)
    pool = order[offset:] + order[:offset]  # refills: the prompts after the step's batch
    drawn: list[torch.Tensor] = []
    rounds_metrics: list[dict[str, float]] = []
    kept: list[tuple[int, int, ScoredRollouts]] = []  # (round, position, one group's rows)
    metrics: dict[str, float] = {"sampling/resample_rounds": 0.0}
    rounds, cursor, have = 0, 0, 0
    while True:
        shard = shard_indices(len(prompts), rank, world_size)
        # A rank without prompts this round samples a stand-in and drops it: under FSDP every
        # rank must take part in every generate (each one gathers the layers, a collective).
        mine = list(shard) or ([0] if world_size > 1 else [])
        got = run.sampler.sample([run.records[prompts[k]] for k in mine],
                                 sampling_params(run.knobs, tuple(seeds[k] for k in mine)))
        if not shard:
            got = None
        else:
            drawn.append(got.rewards)
            rounds_metrics.append(got.metrics)
        if not sampling.dynamic_sampling:
            metrics["sampling/zero_signal_frac"] = float(
                zero_signal_groups(got.rewards, got.batch.group_ids).float().mean())
            result = got
            break
        signal = (dynamic_sampling_keep(got.rewards, got.batch.group_ids)
                  [:: sampling.group_size].tolist() if got is not None else [])
        signal = [flag for part in gather_objects(signal) for flag in part]  # by position
        if rounds == 0:
            metrics["sampling/zero_signal_frac"] = 1.0 - sum(signal) / len(signal)
        keep = [k for k, flag in enumerate(signal) if flag][: batch_size - have]
        for k in keep:
            if k in shard:
                first = (k - shard.start) * sampling.group_size  # a group's rows are consecutive
                rows = list(range(first, first + sampling.group_size))
                kept.append((rounds, k, ScoredRollouts(got.batch.select(rows).to("cpu"),
                                                       got.rewards[rows],
                                                       [got.records[i] for i in rows])))
        have += len(keep)
        if have >= batch_size or rounds >= sampling.max_resample_rounds:
            break
        rounds += 1
        need = batch_size - have
        prompts = [pool[(cursor + k) % len(pool)] for k in range(need)]
        seeds = tuple(mix_seed(seed, rounds, k) for k in range(need))
        cursor += need
    if sampling.dynamic_sampling:
        if world_size > 1:  # deal the kept groups again, in (round, position) order
            every_kept = sorted((g for part in gather_objects(kept) for g in part),
                                key=lambda g: g[:2])
            share = shard_indices(len(every_kept), rank, world_size)
            kept = every_kept[share.start:share.stop]
        metrics["sampling/resample_rounds"] = float(rounds)
        metrics["sampling/kept_groups"] = float(len(kept))  # summed over ranks
        groups = [g for _, _, g in kept]
        result = (ScoredRollouts(RolloutBatch.cat([g.batch for g in groups]),
                                 torch.cat([g.rewards for g in groups]),
                                 [r for g in groups for r in g.records]) if groups else None)
    # Episode metrics (turns, tool calls, environment time), averaged over the step's rounds.
    for key in {k for m in rounds_metrics for k in m}:
        values = [m[key] for m in rounds_metrics if key in m]
        metrics[key] = sum(values) / len(values)
    every = torch.cat(drawn) if drawn else torch.zeros(0)
    if every.numel():
        metrics["reward/mean"] = float(every.mean())
        metrics["reward/std"] = float(every.std()) if every.numel() > 1 else 0.0
    metrics["sampling/samples"] = float(every.numel())
    return Collected(rollouts=result, metrics=metrics)


def score(run: OnlineRun, rollouts: ScoredRollouts) -> tuple[Scored, dict[str, float]]:
    """Reference log-probs, critic values, KL in the reward and advantages (core.score) of a
    batch already on the policy's device.

    Old log-probs: with the HF engine (the trainer's own module) the engine's behaviour
    log-probs are the trainer's. Another engine (vLLM) computes them with other kernels, so the
    trainer's own log-probs of the sampled tokens are the old log-probs (the ratio starts at 1),
    the mismatch is measured, and with loss.tis_cap the policy gradient is reweighted by the
    truncated ratio trainer / engine (core/offpolicy.py).
    """
    knobs, batch = run.knobs, rollouts.batch
    mask = batch.completion_mask
    metrics: dict[str, float] = {}
    is_weights = None
    with torch.no_grad():
        old_logp = batch.behaviour_logprobs
        if run.config.rollout.engine != "hf":
            engine_logp = old_logp
            old_logp = forward_logprobs(run.model, batch, knobs)[0]
            metrics.update(mismatch_metrics(old_logp, engine_logp, mask, knobs.loss.tis_cap,
                                            knobs.loss.tis_level))
            if knobs.loss.tis_cap is not None:
                is_weights = truncated_is_weights(old_logp, engine_logp, mask,
                                                  knobs.loss.tis_cap, knobs.loss.tis_level)
        ref_logp = forward_logprobs(run.ref_model, batch, knobs)[0] if run.ref_model is not None else None
        beta = run.kl_ctl.value
        if ref_logp is not None:
            # kl/mean: k1 summed over each sequence (an unbiased sequence-KL estimate), averaged.
            metrics["kl/mean"] = float(((old_logp - ref_logp) * mask).sum(dim=1).mean())
            kl_tokens = kl_estimate(old_logp, ref_logp, knobs.loss.kl_estimator,
                                    clamp=knobs.loss.kl_clamp)
            metrics[f"kl/{knobs.loss.kl_estimator}_token_mean"] = float(masked_mean(kl_tokens, mask))
        old_values = None
        if run.value_model is not None:
            old_values = run.value_model.values(batch.input_ids, batch.attention_mask, mask.shape[1])
        # batch_mean / batch_whiten take the global batch's statistics when data-parallel.
        scores = score_rollouts(
            rollouts.rewards.to(mask.device), mask, batch.group_ids, knobs.advantage, knobs.loss,
            behaviour_logp=old_logp, ref_logp=ref_logp, values=old_values, kl_coef=beta,
            advantage_fn=functools.partial(global_advantages, knobs.advantage.estimator),
            turn_rewards=batch.token_rewards, extra_inputs=_estimator_inputs(run, rollouts),
            reduce=all_reduce_sum)
    return Scored(old_logp, ref_logp, old_values, scores, beta, is_weights), metrics


def _estimator_inputs(run: OnlineRun, rollouts: ScoredRollouts) -> dict[str, torch.Tensor]:
    """Further inputs the advantage estimator declares (core.advantages.ESTIMATORS[...].inputs).

    baseline_rewards (ReMax): the reward of each prompt's greedy completion, decoded with the
    current policy before the update and scored by the run's reward, expanded to the rows [B].
    """
    spec = ESTIMATORS[run.knobs.advantage.estimator]
    out: dict[str, torch.Tensor] = {}
    if "baseline_rewards" in spec.inputs:
        group_ids = rollouts.batch.group_ids
        records = [rollouts.records[row] for row in rollouts.batch.group_first_rows()]
        greedy = run.sampler.sample(records, SamplingParams(
            temperature=0.0, max_new_tokens=run.knobs.sampling.max_new_tokens, n=1, seed=0))
        per_group = greedy.rewards.to(group_ids.device)
        out["baseline_rewards"] = per_group[group_ids].to(rollouts.batch.completion_mask.dtype)
    unknown = set(spec.inputs) - set(out) - {"values"}  # values: the critic, passed apart
    if unknown:
        raise ValueError(f"advantage.estimator {run.knobs.advantage.estimator!r} needs "
                         f"{sorted(unknown)}, which the online loop does not provide")
    return out


def update(run: OnlineRun, batch: RolloutBatch, scored: Scored,
           generator: torch.Generator) -> dict[str, float]:
    """epochs x minibatches optimiser steps on one rollout; each step's normaliser is computed
    once over its rows (every data-parallel rank's), then its micro-batches (grad_accum) are
    backpropagated separately.

    Minibatches are drawn over the GLOBAL batch (every rank's rows, in rank order): minibatch m
    of an epoch is the same set of sequences at any world size, each rank working on its part of
    it, so the optimiser steps -- and a run resumed on another number of ranks -- do not depend
    on how the batch is sharded. With several ranks every rank runs exactly grad_accum passes per
    step (a rank with fewer rows adds passes of weight 0: FSDP gathers parameters in each pass).

    Returns the update's metrics over all its steps: token means (clip fractions, ratio mean,
    entropy, KL) weighted by tokens, losses and grad_norm averaged over the steps, ratio max/min.
    """
    knobs, config = run.knobs, run.config
    sampling = knobs.sampling
    mask = batch.completion_mask
    advantages, returns = scored.scores.advantages, scored.scores.returns
    loss_knobs = knobs.loss if scored.ref_logp is not None else _without_kl(knobs.loss)
    n = mask.shape[0]
    offset, total = row_offset(n)
    pad_passes = world()[1] > 1
    micro_metrics: list[tuple[dict[str, float], float]] = []  # (metrics, tokens) per pass
    step_metrics: list[dict[str, float]] = []
    padding = 0
    for _epoch in range(sampling.epochs):
        perm = (torch.randperm(total, generator=generator).tolist() if sampling.minibatches > 1
                else list(range(total)))
        for mb in split_microbatches(total, sampling.minibatches):
            mb_rows = [g - offset for g in perm[mb] if offset <= g < offset + n]
            normaliser = global_step_normaliser(mask[mb_rows], loss_knobs.aggregation,
                                                loss_knobs.constant_normaliser)
            v_norm = global_step_normaliser(mask[mb_rows], "token_mean")
            micros = split_microbatches(len(mb_rows), config.optim.grad_accum)
            if pad_passes:
                padding += config.optim.grad_accum - len(micros)
                micros += [slice(0, 0)] * (config.optim.grad_accum - len(micros))
            step_sums: dict[str, float] = dict.fromkeys(_SUMMED_NAMES, 0.0)
            for micro in micros:
                rows = mb_rows[micro]
                weight = 1.0 if rows else 0.0  # 0: a padding pass (row 0, gradient exactly 0)
                rows = rows or [0]
                sub = batch.select(rows)
                logp, entropy = forward_logprobs(run.model, sub, knobs, with_entropy=True)
                loss, lm = policy_loss(
                    logp, scored.old_logp[rows], advantages[rows], mask[rows], loss_knobs, normaliser,
                    ref_logp=scored.ref_logp[rows] if scored.ref_logp is not None else None,
                    entropy=entropy, kl_coef=scored.beta,
                    is_weights=scored.is_weights[rows] if scored.is_weights is not None else None,
                )
                (loss * weight).backward()
                if run.value_model is not None:
                    values = run.value_model.values(sub.input_ids, sub.attention_mask, mask.shape[1])
                    vloss = knobs.value.vf_coef * clipped_value_loss(
                        values, scored.old_values[rows], returns[rows], mask[rows],
                        knobs.value.value_clip, v_norm)
                    (vloss * weight).backward()
                    lm["value_loss"] = float(vloss.detach())
                    lm["value_clip_frac"] = value_clip_fraction(
                        values, scored.old_values[rows], returns[rows], mask[rows],
                        knobs.value.value_clip)
                if weight:
                    micro_metrics.append((lm, float(mask[rows].sum())))
                    for key in _SUMMED_NAMES.keys() & lm.keys():
                        step_sums[key] += float(lm[key])
            all_reduce_gradients(run.params)  # data-parallel: summed = the full-batch gradient
            step_sums["grad_norm"] = clip_and_step(run.params, run.optimizers["policy"],
                                                   run.schedulers["policy"], config.optim.grad_clip)
            if run.value_model is not None:
                all_reduce_gradients(run.value_params)
                clip_and_step(run.value_params, run.optimizers["value"], run.schedulers["value"],
                              config.optim.grad_clip)
            step_metrics.append(step_sums)
    out = {_METRIC_NAMES.get(k, k): sum(m[k] for m in step_metrics) / len(step_metrics)
           for k in step_metrics[0] if k in _SUMMED_NAMES or k == "grad_norm"}
    if run.value_model is None:
        out.pop("loss/value", None)
    out.update(_token_weighted(micro_metrics))
    if pad_passes:
        out["perf/padding_passes"] = float(padding)  # summed over ranks: compute spent on nothing
    return out


def online_step(run: OnlineRun, step_index: int, generator: torch.Generator) -> dict[str, float]:
    """collect -> score -> update -> KL control and engine sync: one step of every preset."""
    t0 = time.perf_counter()
    run.model.eval()
    collected = collect(run, step_index, generator)
    metrics = dict(collected.metrics)
    t_gen = time.perf_counter()
    metrics["time/generate_s"] = t_gen - t0
    metrics.update(reward_metrics(run.sampler.reward_fn))
    if any_rank(collected.rollouts is None):  # data-parallel: all ranks skip if one has nothing
        metrics["sampling/skipped_step"] = 1.0
        return reduce_metrics(metrics, weight=1.0)
    device = run.model.device
    rollouts = collected.rollouts
    rollouts = ScoredRollouts(rollouts.batch.to(device), rollouts.rewards.to(device), rollouts.records)
    batch = rollouts.batch
    mask = batch.completion_mask
    lengths = mask.sum(dim=1)
    metrics.update({
        "reward/kept_mean": float(rollouts.rewards.mean()),
        "response/length_mean": float(lengths.mean()),
        "response/length_max": float(lengths.max()),
        "response/truncated_frac": float(batch.truncated.float().mean()),
    })
    if run.task is not None and run.config.env is None:  # episode text is not an answer
        # The task's verifier is the gold reward: next to a proxy reward (a reward model, a
        # judge, a format bonus) it shows over-optimisation (reference 003).
        metrics["task/accuracy"] = sum(run.task.reward(c, r) for c, r in
                                       zip(batch.completions, rollouts.records, strict=True)) / len(rollouts.records)
    scored, score_metrics = score(run, rollouts)
    metrics.update(score_metrics)
    t_score = time.perf_counter()
    metrics["time/score_s"] = t_score - t_gen

    run.model.train()
    metrics.update(update(run, batch, scored, generator))
    if run.value_model is not None:
        metrics["value/explained_variance"] = float(explained_variance(
            scored.old_values, scored.scores.returns, mask))
    t_learn = time.perf_counter()
    metrics["time/learn_s"] = t_learn - t_score
    metrics["perf/tokens_per_s"] = float(mask.sum()) / max(t_learn - t0, 1e-9)
    metrics = reduce_metrics(metrics, weight=float(mask.shape[0]), token_weight=float(mask.sum()),
                             token_means=TOKEN_MEAN_METRICS | {
                                 f"kl/{run.knobs.loss.kl_estimator}_token_mean"})  # global values

    knobs = run.knobs
    if run.ref_model is not None and knobs.kl_control.adaptive and "kl/mean" in metrics:
        run.kl_ctl.update(metrics["kl/mean"], int(all_reduce_sum(float(mask.shape[0]))))
    metrics["kl/coef"] = run.kl_ctl.value
    reset = knobs.kl_control.ref_reset_every
    if run.ref_model is not None and reset > 0 and (step_index + 1) % reset == 0:
        run.ref_model.load_state_dict(run.model.state_dict())
        metrics["kl/ref_reset"] = 1.0
    run.sampler.sync(run.model)
    return metrics


def _episode_evaluator(config, sampler: Sampler, task, max_new_tokens: int):
    """Held-out success of multi-turn episodes (psirl.envs.episode_evaluator): greedy and/or
    sampled as eval.greedy / eval.sampled say, with the sampler's engine (synced every step)."""
    from psirl.envs import episode_evaluator
    from psirl.train.setup import eval_records

    return episode_evaluator(config, lambda: sampler.engine, eval_records(config, task),
                             max_new_tokens)


def _check_data_parallel(config, sampling) -> None:
    """Every rank needs at least one prompt of the step's batch. (Minibatches are drawn over the
    global batch and every rank runs the same passes, so a rank may hold fewer rows than there
    are minibatches.)"""
    _, world_size = world()
    if world_size == 1:
        return
    if config.optim.batch_size < world_size:
        raise ValueError(f"optim.batch_size: {config.optim.batch_size} prompts cannot be shared "
                         f"by {world_size} data-parallel ranks (need batch_size >= world size)")


def _without_kl(loss_knobs):
    import dataclasses

    return dataclasses.replace(loss_knobs, kl_placement="none", kl_coef=0.0)


# Per-pass policy_loss metrics that add up over passes and ranks (each is the pass's share of the
# step's loss, already divided by the global normaliser).
_SUMMED_NAMES = dict.fromkeys(("loss", "pg_loss", "kl_loss", "entropy_loss", "value_loss"))
# policy_loss metric name -> name in metrics.jsonl
_METRIC_NAMES = {
    "loss": "loss/total", "pg_loss": "loss/policy", "kl_loss": "loss/kl",
    "entropy_loss": "loss/entropy", "value_loss": "loss/value",
    "clip_frac_low": "clip/frac_low", "clip_frac_high": "clip/frac_high",
    "clip_frac_dual": "clip/frac_dual", "ratio_mean": "ratio/mean", "ratio_min": "ratio/min",
    "ratio_max": "ratio/max", "kl_mean": "kl/loss_estimate_mean", "entropy_mean": "entropy/mean",
    "value_clip_frac": "value/clip_frac",
}
# The logged metrics that are masked means over completion tokens (reduced over ranks by tokens).
TOKEN_MEAN_METRICS = frozenset({
    "clip/frac_low", "clip/frac_high", "clip/frac_dual", "ratio/mean", "kl/loss_estimate_mean",
    "entropy/mean", "value/clip_frac"})


def _token_weighted(passes: list[tuple[dict[str, float], float]]) -> dict[str, float]:
    """The token means of policy_loss over an update's passes [(metrics, tokens)], weighted by
    each pass's tokens (the mean over every token the update saw), and the ratio's max / min."""
    out: dict[str, float] = {}
    if not passes:
        return out
    tokens = sum(t for _, t in passes)
    for key in passes[0][0]:
        name = _METRIC_NAMES.get(key, key)
        if name in TOKEN_MEAN_METRICS and tokens > 0:
            out[name] = sum(float(m[key]) * t for m, t in passes) / tokens
    out["ratio/max"] = max(float(m["ratio_max"]) for m, _ in passes)
    out["ratio/min"] = min(float(m["ratio_min"]) for m, _ in passes)
    return out
