"""Bradley–Terry reward-model training (loop "reward_model").

The model is ``AutoModelForSequenceClassification`` with ``num_labels = 1`` built from the policy
folder (``model.path`` or the tiny model): the causal LM's decoder plus a new linear ``score``
head read at the last non-pad token. It is the format ``psirl.rewards.RewardModelReward`` loads,
so ``final/`` of this run is directly usable as ``reward: {kind: reward_model, path: RUN/final}``.
Texts are scored exactly as RewardModelReward scores them: ``prompt + completion`` (chat template
applied to conversational records), right-padded, no special tokens added beyond the tokenizer's.

    L = -(1/m) sum_i log sigma( r_phi(x_i, y_w,i) - r_phi(x_i, y_l,i) )

(../shared/reference/004_0ae34f1505be1cc8.txt, "Bradley--Terry model", L_RM; core/preference.py
``bradley_terry_loss``). Pairs come from ``data.train_path`` (kind "preference") or a built-in
task (reference answer vs a wrong answer); held-out pair accuracy is the eval metric.
"""

from __future__ import annotations

from pathlib import Path

import torch

from psirl.core.preference import bradley_terry_loss, preference_metrics
from psirl.train.base import (
    LoopSpec,
    build_optimizer,
    build_scheduler,
    clip_and_step,
    resolve_device,
    run_loop,
    split_microbatches,
)

SUMMARY_KEYS = ("loss", "rewards/accuracy", "eval/rewards/accuracy")


def train(config, *, resume: bool = False, quiet: bool = False) -> Path:
    """Train a Bradley–Terry reward model to `config.max_steps`; returns the run folder
    (final/ holds the reward model, loadable by RewardModelReward)."""
    return run_loop(config, build_reward_model, resume=resume, quiet=quiet,
                    summary_keys=SUMMARY_KEYS)


def load_reward_backbone(path: str | Path, device: str | torch.device, dtype: str):
    """(AutoModelForSequenceClassification with num_labels=1, tokenizer) from a causal-LM folder.

    The decoder weights are the folder's; the ``score`` head is new (transformers' init). The
    tokenizer pads on the right (like RewardModelReward); a missing pad token becomes EOS, and
    the model's config learns the pad id (it locates the last real token with it).
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from psirl.models.loading import check_safetensors_folder, resolve_dtype

    folder = check_safetensors_folder(path)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"{folder}: tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    # The load report lists lm_head as unused and score as new: expected here, so not shown.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            folder, num_labels=1, dtype=resolve_dtype(dtype), use_safetensors=True,
            local_files_only=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.config.pad_token_id = tokenizer.pad_token_id
    tokenizer.padding_side = "right"
    return model.to(device), tokenizer


def score_texts(model, tokenizer, texts: list[str]) -> torch.Tensor:
    """Scalar scores r_phi [n] float32 of raw texts (differentiable when gradients are enabled)."""
    device = next(model.parameters()).device
    batch = tokenizer(texts, padding=True, return_tensors="pt").to(device)
    return model(**batch).logits[:, 0].float()


def pair_texts(pairs: list[dict[str, str]]) -> tuple[list[str], list[str]]:
    """(prompt + chosen, prompt + rejected) texts of rendered pairs."""
    return ([p["prompt"] + p["chosen"] for p in pairs],
            [p["prompt"] + p["rejected"] for p in pairs])


@torch.no_grad()
def reward_model_eval(model, tokenizer, pairs: list[dict[str, str]], batch_size: int = 32):
    """eval/loss and eval/rewards/* (accuracy: fraction of pairs ranked right, ties 1/2)."""
    was_training = model.training
    model.eval()
    chosen_texts, rejected_texts = pair_texts(pairs)
    sc, sr = [], []
    for start in range(0, len(pairs), batch_size):
        sl = slice(start, start + batch_size)
        sc.append(score_texts(model, tokenizer, chosen_texts[sl]))
        sr.append(score_texts(model, tokenizer, rejected_texts[sl]))
    model.train(was_training)
    sc, sr = torch.cat(sc), torch.cat(sr)
    out = {"eval/loss": float(bradley_terry_loss(sc, sr).mean())}
    out.update({f"eval/{k}": v for k, v in preference_metrics(sc, sr).items()})
    return out


def build_reward_model(config, run_dir: Path) -> LoopSpec:
    """The LoopSpec of reward-model training. The trained module is registered as "policy" so
    that run_loop writes it (and its tokenizer) to final/."""
    from psirl.train.preference_data import eval_pairs, train_pairs
    from psirl.train.setup import build_task, policy_path
    from psirl.train.sft import epoch_batch_indices

    model, tokenizer = load_reward_backbone(policy_path(config, run_dir),
                                            resolve_device(config.device), config.dtype)
    model.train()
    task = build_task(config)
    pairs = train_pairs(config, tokenizer, task)
    held_out = eval_pairs(config, tokenizer, task)
    chosen_texts, rejected_texts = pair_texts(pairs)
    optim = config.optim
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, optim)
    scheduler = build_scheduler(optimizer, optim, config.max_steps)

    def step(step_index: int, generator: torch.Generator) -> dict[str, float]:
        idx = epoch_batch_indices(len(pairs), optim.batch_size, step_index, config.seed)
        total, sc_all, sr_all = 0.0, [], []
        for mb in split_microbatches(len(idx), optim.grad_accum):
            sel = idx[mb]
            sc = score_texts(model, tokenizer, [chosen_texts[i] for i in sel])
            sr = score_texts(model, tokenizer, [rejected_texts[i] for i in sel])
            loss = bradley_terry_loss(sc, sr).sum() / len(idx)
            loss.backward()
            total += float(loss.detach())
            sc_all.append(sc.detach())
            sr_all.append(sr.detach())
        grad_norm = clip_and_step(params, optimizer, scheduler, optim.grad_clip)
        metrics = {"loss": total, "grad_norm": grad_norm}
        metrics.update(preference_metrics(torch.cat(sc_all), torch.cat(sr_all)))
        return metrics

    def evaluate(step_index: int) -> dict[str, float]:
        return reward_model_eval(model, tokenizer, held_out) if held_out else {}

    return LoopSpec(models={"policy": model}, tokenizer=tokenizer,
                    optimizers={"policy": optimizer}, schedulers={"policy": scheduler},
                    step=step, evaluate=evaluate)
