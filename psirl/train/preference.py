"""The preference loop: offline DPO / IPO / KTO / SimPO / ORPO, and online / iterative DPO.

Offline, each step takes `optim.batch_size` pairs (KTO: samples) from the dataset; online
(`preference.online`), each step samples `samples_per_prompt` completions for `optim.batch_size`
prompts and pairs best vs worst by reward (psirl/train/preference_online.py). Then:

    sequence log-probs of chosen and rejected under the policy (and the frozen reference, except
    SimPO / ORPO) --core/preference.py--> per-pair loss, summed over micro-batches and divided
    by the step's pair count --> one optimiser step

`preference.ref_refresh_every = N` copies the policy into the reference every N steps
(iterative DPO, ../shared/reference/001_dd55e9af3bef0bfc.txt "Iterative and Online DPO").
Metrics include the chosen / rejected log-probs and implicit rewards: a growing margin with a
falling `logps/chosen` is DPO's likelihood displacement (../shared/reference/003_e8bd019fa090e190.txt).
"""

from __future__ import annotations

import copy
import functools
import warnings
from pathlib import Path

import torch

from psirl.core.preference import (
    average_logps,
    dpo_family_loss,
    dpo_loss,
    implicit_rewards,
    ipo_loss,
    kto_loss,
    kto_reference_point,
    likelihood_displacement,
    log_odds,
    orpo_loss,
    preference_metrics,
    simpo_loss,
)
from psirl.train.base import (
    LoopSpec,
    build_optimizer,
    build_scheduler,
    clip_and_step,
    run_loop,
    split_microbatches,
)
from psirl.train.distributed import (
    all_gather_rows,
    all_reduce_gradients,
    all_reduce_sum,
    shard_indices,
    world,
)
from psirl.train.fsdp import shard_models
from psirl.train.setup import build_policy, build_task, pad_prompt_completion

SUMMARY_KEYS = ("loss", "rewards/margin", "rewards/accuracy", "eval/rewards/accuracy",
                "eval/accuracy_greedy")
REFERENCE_FREE = ("simpo", "orpo")


def train(config, *, resume: bool = False, quiet: bool = False, reward_fn=None) -> Path:
    """Run the preference loop to `config.max_steps`; returns the run folder.
    reward_fn: online DPO's reward, ``fn(prompts, completions, records) -> list[float]``."""
    build = build_preference if reward_fn is None else functools.partial(build_preference, reward_fn=reward_fn)
    return run_loop(config, build,
                    resume=resume, quiet=quiet, summary_keys=SUMMARY_KEYS)


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of `model` in eval mode with every parameter frozen (the reference policy)."""
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def sequence_logps(model, prompts: list[list[int]], completions: list[list[int]], pad_id: int):
    """(log pi(y|x) summed over completion tokens [n] float32, completion lengths |y| [n] float32).

    prompts / completions: token-id lists, padded to the shared layout (prompt left-padded,
    completion right-padded; psirl/train/setup.py pad_prompt_completion). Differentiable when
    called with gradients enabled.
    """
    from psirl.models.logprobs import token_logprobs

    device = next(model.parameters()).device
    ids, attn, cmask = pad_prompt_completion(prompts, completions, pad_id)
    ids, attn, cmask = ids.to(device), attn.to(device), cmask.to(device)
    logp, _ = token_logprobs(model, ids, attn, cmask.shape[1])
    return (logp * cmask).sum(-1), cmask.sum(-1)


def pair_logps(model, prompts, chosen, rejected, pad_id: int):
    """Chosen and rejected rows in one forward: (logp_w [m], logp_l [m], len_w [m], len_l [m])."""
    sums, lengths = sequence_logps(model, prompts + prompts, chosen + rejected, pad_id)
    m = len(prompts)
    return sums[:m], sums[m:], lengths[:m], lengths[m:]


# Losses with a label-smoothing form (cDPO for DPO, TRL's CPOTrainer for SimPO); the others
# reject a non-zero preference.label_smoothing instead of ignoring it.
LABEL_SMOOTHED = ("dpo", "simpo")


def pair_loss(pcfg, pol_w, pol_l, ref_w, ref_l, len_w, len_l):
    """Per-pair loss [m] of `pcfg.loss` and the (detached) rewards shown in the metrics.

    dpo / ipo: implicit rewards beta (log pi - log pi_ref); simpo: beta x average log-prob;
    orpo: log odds of the average log-prob. ref_w / ref_l are None for SimPO / ORPO.
    Returns (loss [m], chosen_reward [m], rejected_reward [m]).
    """
    name = pcfg.loss
    if pcfg.label_smoothing > 0 and name not in LABEL_SMOOTHED:
        raise ValueError(f"preference.label_smoothing: {pcfg.label_smoothing} is not defined for "
                         f"loss {name!r} (only {', '.join(LABEL_SMOOTHED)}); set it to 0")
    if name == "dpo" and (getattr(pcfg, "dpo_loss_type", "sigmoid") != "sigmoid"
                          or getattr(pcfg, "f_divergence", "reverse_kl") != "reverse_kl"):
        loss = dpo_family_loss(pcfg.dpo_loss_type, pol_w, pol_l, ref_w, ref_l, beta=pcfg.beta,
                               label_smoothing=pcfg.label_smoothing,
                               f_divergence=pcfg.f_divergence, alpha=pcfg.f_alpha)
    elif name == "dpo":
        loss = dpo_loss(pol_w, pol_l, ref_w, ref_l, beta=pcfg.beta,
                        label_smoothing=pcfg.label_smoothing)
    elif name == "ipo":
        # IPO's paper defines h on sequence log-probs (default); TRL averages per token.
        lengths = (len_w, len_l) if getattr(pcfg, "length_normalize", False) else (None, None)
        loss = ipo_loss(pol_w, pol_l, ref_w, ref_l, beta=pcfg.beta, chosen_lengths=lengths[0],
                        rejected_lengths=lengths[1])
    elif name == "simpo":
        loss = simpo_loss(pol_w, pol_l, len_w, len_l, beta=pcfg.beta, gamma=pcfg.gamma,
                          label_smoothing=pcfg.label_smoothing)
    elif name == "orpo":
        loss = orpo_loss(pol_w, pol_l, len_w, len_l, lam=pcfg.orpo_lambda)
    else:
        raise ValueError(f"preference.loss: {name!r} is not a pairwise loss")
    if name == "simpo":
        rw = implicit_rewards(average_logps(pol_w, len_w), beta=pcfg.beta)
        rl = implicit_rewards(average_logps(pol_l, len_l), beta=pcfg.beta)
    elif name == "orpo":
        rw = log_odds(average_logps(pol_w, len_w)).detach()
        rl = log_odds(average_logps(pol_l, len_l)).detach()
    else:
        rw = implicit_rewards(pol_w, ref_w, beta=pcfg.beta)
        rl = implicit_rewards(pol_l, ref_l, beta=pcfg.beta)
    return loss, rw, rl


def rank_share(idx: list[int]) -> list[int]:
    """This data-parallel rank's contiguous share of the step's indices (all of them with one
    process): gathering the ranks' results in rank order restores the step's order."""
    rank, world_size = world()
    return [idx[i] for i in shard_indices(len(idx), rank, world_size)]


def gathered(parts: list[torch.Tensor]) -> torch.Tensor:
    """The step's values [n] from this rank's parts: concatenated, then every rank's, in order."""
    local = torch.cat(parts) if parts else torch.zeros(0)
    return torch.cat(all_gather_rows(local.detach().float()))


def pair_update(model, ref_model, params, optimizer, scheduler, pairs, idx: list[int], *,
                pcfg, optim, pad_id: int) -> dict[str, float]:
    """One optimiser step on pairs[idx] (pairs: {"prompt","chosen","rejected"} id lists).

    Loss = sum_i L_i / m over the step's m pairs, accumulated over `optim.grad_accum`
    micro-batches. With m = 0 the optimiser and scheduler still step (no change).
    Data-parallel: each rank takes its contiguous share of idx, divides by the global m and the
    gradients are summed over ranks, so the update is the single-process one.
    Metrics: loss, grad_norm, pairs, rewards/* (before the update), logps/chosen, logps/rejected
    (mean sequence log-prob sums under the policy), all over the whole step.
    """
    mine = rank_share(idx)
    m = int(all_reduce_sum(float(len(mine))))
    total, rewards_w, rewards_l, logps_w, logps_l = 0.0, [], [], [], []
    for mb in split_microbatches(len(mine), optim.grad_accum) if mine else []:
        sel = mine[mb]
        prompts = [pairs["prompt"][i] for i in sel]
        chosen = [pairs["chosen"][i] for i in sel]
        rejected = [pairs["rejected"][i] for i in sel]
        pol_w, pol_l, len_w, len_l = pair_logps(model, prompts, chosen, rejected, pad_id)
        ref_w = ref_l = None
        if ref_model is not None:
            with torch.no_grad():
                ref_w, ref_l, _, _ = pair_logps(ref_model, prompts, chosen, rejected, pad_id)
        loss, rw, rl = pair_loss(pcfg, pol_w, pol_l, ref_w, ref_l, len_w, len_l)
        loss = loss.sum() / m
        loss.backward()
        total += float(loss.detach())
        rewards_w.append(rw)
        rewards_l.append(rl)
        logps_w.append(pol_w.detach())
        logps_l.append(pol_l.detach())
    all_reduce_gradients(params)
    grad_norm = clip_and_step(params, optimizer, scheduler, optim.grad_clip)
    metrics = {"loss": all_reduce_sum(total), "grad_norm": grad_norm, "pairs": float(m)}
    rewards_w, rewards_l = gathered(rewards_w), gathered(rewards_l)
    logps_w, logps_l = gathered(logps_w), gathered(logps_l)
    if m:
        metrics.update(preference_metrics(rewards_w, rewards_l))
        metrics["logps/chosen"] = float(logps_w.mean())
        metrics["logps/rejected"] = float(logps_l.mean())
    return metrics


def kto_update(model, ref_model, params, optimizer, scheduler, samples, idx: list[int], *,
               pcfg, optim, pad_id: int) -> dict[str, float]:
    """One KTO optimiser step on samples[idx] ({"prompt","completion"} id lists, "label" bools).

    The reference point z0 (detached) is estimated once per step from mismatched pairs: prompt
    idx[j] with the completion of idx[j+1] (cyclically), as in the KTO paper.
    Metrics: loss, grad_norm, kto/z0, rewards/desirable, rewards/undesirable (implicit rewards).
    """
    n = len(idx)
    shifted = idx[1:] + idx[:1]
    # Data-parallel: this rank's share of the step; z0 still comes from every mismatched pair.
    positions = rank_share(list(range(n)))
    mine, mine_shifted = [idx[i] for i in positions], [shifted[i] for i in positions]
    mism_p, mism_r = [], []
    with torch.no_grad():
        for mb in split_microbatches(len(mine), optim.grad_accum) if mine else []:
            prompts = [samples["prompt"][i] for i in mine[mb]]
            wrong = [samples["completion"][i] for i in mine_shifted[mb]]
            mism_p.append(sequence_logps(model, prompts, wrong, pad_id)[0])
            mism_r.append(sequence_logps(ref_model, prompts, wrong, pad_id)[0])
    z0 = kto_reference_point(gathered(mism_p), gathered(mism_r))
    total, rewards, labels = 0.0, [], []
    for mb in split_microbatches(len(mine), optim.grad_accum) if mine else []:
        sel = mine[mb]
        prompts = [samples["prompt"][i] for i in sel]
        completions = [samples["completion"][i] for i in sel]
        desirable = torch.tensor([samples["label"][i] for i in sel], device=z0.device)
        pol, _ = sequence_logps(model, prompts, completions, pad_id)
        with torch.no_grad():
            ref, _ = sequence_logps(ref_model, prompts, completions, pad_id)
        loss = kto_loss(pol, ref, desirable, z0, beta=pcfg.beta,
                        desirable_weight=pcfg.kto_desirable_weight,
                        undesirable_weight=pcfg.kto_undesirable_weight).sum() / n
        loss.backward()
        total += float(loss.detach())
        rewards.append(implicit_rewards(pol, ref, beta=pcfg.beta))
        labels.append(desirable.float())
    all_reduce_gradients(params)
    grad_norm = clip_and_step(params, optimizer, scheduler, optim.grad_clip)
    r, lab = gathered(rewards), gathered(labels) > 0.5
    metrics = {"loss": all_reduce_sum(total), "grad_norm": grad_norm, "kto/z0": float(z0)}
    if bool(lab.any()):
        metrics["rewards/desirable"] = float(r[lab].mean())
    if bool((~lab).any()):
        metrics["rewards/undesirable"] = float(r[~lab].mean())
    return metrics


@torch.no_grad()
def pair_eval(model, ref_model, pairs, *, pcfg, pad_id: int, batch_size: int = 32,
              first_eval: dict | None = None):
    """Held-out metrics on every pair: eval/loss and eval/rewards/* (accuracy: ties count 1/2).

    KTO is scored by its implicit reward with the DPO loss (the same r_hat = beta log pi/pi_ref).
    Likelihood displacement (reference 003: the margin grows while the chosen log-prob falls):
    eval/displacement/{chosen_logp_change, margin_change, displaced} compare the policy's
    held-out log-probs with the reference model's, or (reference-free losses) with the first
    evaluation's, which `first_eval` (a dict kept by the caller) stores.
    """
    n = len(pairs["prompt"])
    losses, rewards_w, rewards_l = [], [], []
    logps = {"pol_w": [], "pol_l": [], "ref_w": [], "ref_l": []}
    cfg = pcfg if pcfg.loss != "kto" else pcfg.model_copy(update={"loss": "dpo"})
    for start in range(0, n, batch_size):
        sl = slice(start, start + batch_size)
        args = (pairs["prompt"][sl], pairs["chosen"][sl], pairs["rejected"][sl], pad_id)
        pol_w, pol_l, len_w, len_l = pair_logps(model, *args)
        ref_w = ref_l = None
        if ref_model is not None:
            ref_w, ref_l, _, _ = pair_logps(ref_model, *args)
        loss, rw, rl = pair_loss(cfg, pol_w, pol_l, ref_w, ref_l, len_w, len_l)
        losses.append(loss)
        rewards_w.append(rw)
        rewards_l.append(rl)
        for key, value in (("pol_w", pol_w), ("pol_l", pol_l), ("ref_w", ref_w), ("ref_l", ref_l)):
            if value is not None:
                logps[key].append(value.detach())
    out = {"eval/loss": float(torch.cat(losses).mean())}
    out.update({f"eval/{k}": v for k, v in
                preference_metrics(torch.cat(rewards_w), torch.cat(rewards_l)).items()})
    now_w, now_l = torch.cat(logps["pol_w"]), torch.cat(logps["pol_l"])
    if logps["ref_w"]:
        before_w, before_l = torch.cat(logps["ref_w"]), torch.cat(logps["ref_l"])
    else:
        if first_eval is None:
            return out
        first_eval.setdefault("w", now_w)
        first_eval.setdefault("l", now_l)
        before_w, before_l = first_eval["w"], first_eval["l"]
    shift = likelihood_displacement(before_w, now_w, before_l, now_l)
    out.update({f"eval/displacement/{k}": v for k, v in shift.items()})
    if shift["displaced"]:
        warnings.warn(
            f"likelihood displacement ({pcfg.loss}): the held-out margin grew by "
            f"{shift['margin_change']:.3g} nats while the chosen responses' log-prob fell by "
            f"{-shift['chosen_logp_change']:.3g} (reference 003); watch eval/displacement/*",
            DisplacementWarning, stacklevel=2)
    return out


class DisplacementWarning(UserWarning):
    """The preference loss widens the margin by pushing the chosen responses down (ref 003)."""


def build_preference(config, run_dir: Path, *, reward_fn=None) -> LoopSpec:
    """The LoopSpec of the preference loop (see module docstring).

    reward_fn: the online loop's RewardFn; defaults to `build_reward(config, task)`
    (psirl/train/rewards.py). Ignored offline.
    """
    from psirl.train.preference_data import (
        encode_pairs,
        eval_pairs,
        labelled_samples,
        train_pairs,
    )
    from psirl.train.setup import encode_texts
    from psirl.train.sft import epoch_batch_indices

    pcfg, optim = config.preference, config.optim
    model, tokenizer = build_policy(config, run_dir)
    model.train()
    pad_id = tokenizer.pad_token_id
    task = build_task(config)
    if pcfg.label_smoothing > 0 and pcfg.loss not in LABEL_SMOOTHED:
        raise ValueError(f"preference.label_smoothing: {pcfg.label_smoothing} is not defined for "
                         f"loss {pcfg.loss!r} (only {', '.join(LABEL_SMOOTHED)}); set it to 0")
    ref_model = None if pcfg.loss in REFERENCE_FREE else frozen_copy(model)
    shard_models(config, model, ref_model)  # distributed.strategy fsdp: shard before the optimiser
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, optim)
    scheduler = build_scheduler(optimizer, optim, config.max_steps)
    models = {"policy": model}
    if pcfg.ref_refresh_every > 0:
        models["reference"] = ref_model  # refreshed weights must survive a resume

    held_out = [] if pcfg.labelled else eval_pairs(config, tokenizer, task)
    held_out_ids = encode_pairs(tokenizer, held_out) if held_out else None

    engine = None
    if pcfg.online:
        step_data, engine = _online_data(config, model, tokenizer, task, reward_fn)
    elif pcfg.loss == "kto":
        samples = labelled_samples(config, tokenizer, task)
        data = {"prompt": encode_texts(tokenizer, [s["prompt"] for s in samples]),
                "completion": encode_texts(tokenizer, [s["completion"] for s in samples],
                                           add_eos=True),
                "label": [s["label"] for s in samples]}

        def step_data(step_index, generator):
            idx = epoch_batch_indices(len(samples), optim.batch_size, step_index, config.seed)
            return data, idx, {}
    else:
        data = encode_pairs(tokenizer, train_pairs(config, tokenizer, task))

        def step_data(step_index, generator):
            n = len(data["prompt"])
            return data, epoch_batch_indices(n, optim.batch_size, step_index, config.seed), {}

    update = kto_update if pcfg.loss == "kto" else pair_update
    displacement_start: dict = {}  # first held-out log-probs, for reference-free losses

    def step(step_index: int, generator: torch.Generator) -> dict[str, float]:
        every = pcfg.ref_refresh_every
        if every and step_index > 0 and step_index % every == 0:
            ref_model.load_state_dict(model.state_dict())
        batch, idx, metrics = step_data(step_index, generator)
        metrics.update(update(model, ref_model, params, optimizer, scheduler, batch, idx,
                              pcfg=pcfg, optim=optim, pad_id=pad_id))
        if engine is not None:
            engine.sync(model)  # the next step samples from the updated policy
        return metrics

    from psirl.train.evaluation import evaluator_from_config

    # Task accuracy on the built-in task's held-out prompts or data.eval_path (any preference
    # data: a DPO run that raises pair accuracy while task accuracy falls shows it here).
    task_eval = evaluator_from_config(config, model, tokenizer, task,
                                      engine=getattr(engine, "engine", None))

    def evaluate(step_index: int) -> dict[str, float]:
        out = {}
        if held_out_ids is not None:
            out.update(pair_eval(model, ref_model, held_out_ids, pcfg=pcfg, pad_id=pad_id,
                                 first_eval=displacement_start))
        if task_eval is not None:
            out.update(task_eval(step_index))
        return out

    # Offline updates shard each step's pairs over data-parallel ranks; online DPO samples in
    # one process only.
    return LoopSpec(models=models, tokenizer=tokenizer, optimizers={"policy": optimizer},
                    schedulers={"policy": scheduler}, step=step, evaluate=evaluate,
                    data_parallel=not pcfg.online)


def _online_data(config, model, tokenizer, task, reward_fn):
    """(step_data, sampler) for online DPO; step_data(step, generator) -> (pairs, indices of all
    pairs, sampling metrics), drawing the prompts and the sampling seed from `generator`."""
    from psirl.train.preference_online import sample_online_pairs
    from psirl.train.setup import build_sampler, load_prompt_records

    records = load_prompt_records(config, task)
    sampler = build_sampler(config, model, tokenizer, task, reward_fn=reward_fn, records=records)
    pcfg = config.preference

    def step_data(step_index, generator):
        order = torch.randperm(len(records), generator=generator)[: config.optim.batch_size]
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        pairs, metrics = sample_online_pairs(
            sampler, [records[i] for i in order.tolist()],
            samples_per_prompt=pcfg.samples_per_prompt, temperature=pcfg.temperature,
            max_new_tokens=pcfg.max_new_tokens, seed=seed)
        return pairs, list(range(len(pairs["prompt"]))), metrics

    return step_data, sampler
