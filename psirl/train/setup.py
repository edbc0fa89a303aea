"""Building what a loop needs from its config: the policy, the data, the reward. Shared by all loops."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from psirl.train.base import resolve_device

INIT_MODEL_DIR = "init_model"


def build_policy(config, run_dir: Path):
    """(model, tokenizer) on the config's device/dtype, with LoRA applied if configured.

    `model.tiny` builds a fresh tiny model inside the run folder (so the run is self-contained and
    a resume finds the same initial weights); `model.path` loads a local folder (safetensors only).
    """
    from psirl.models.loading import load_policy

    path = policy_path(config, run_dir)
    model, tokenizer = load_policy(path, device=str(resolve_device(config.device)), dtype=config.dtype)
    if config.model.lora is not None:
        from psirl.models.lora import apply_lora

        lora = config.model.lora
        model = apply_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                           target_modules=lora.target_modules)
    model.train()
    return model, tokenizer


def policy_path(config, run_dir: Path) -> Path:
    """Folder of the initial policy; builds the tiny model on first use.

    The tiny model is written to a temporary folder and renamed into place, so a run killed while
    writing it never leaves a half-written init_model/ that a resume would load.
    """
    if config.model.path is not None:
        return Path(config.model.path)
    from psirl.models.tiny import make_tiny_model

    out = Path(run_dir) / INIT_MODEL_DIR
    if not (out / "config.json").exists():
        tiny = config.model.tiny
        tmp = Path(run_dir) / f".tmp-{INIT_MODEL_DIR}"
        shutil.rmtree(tmp, ignore_errors=True)
        make_tiny_model(
            tmp,
            arch=tiny.arch,
            hidden_size=tiny.hidden_size,
            num_layers=tiny.num_layers,
            num_heads=tiny.num_heads,
            intermediate_size=tiny.intermediate_size,
            alphabet=tiny.alphabet,
            seed=config.seed,
        )
        shutil.rmtree(out, ignore_errors=True)  # a partial folder from an older, killed run
        os.replace(tmp, out)
    return out


def build_task(config):
    """The built-in task named by `data.task`, or None when the data comes from files."""
    if config.data.task is None:
        return None
    from psirl.data.tasks import get_task

    return get_task(config.data.task, **config.data.task_kwargs)


def eval_records(config, task) -> list[dict]:
    """Held-out prompts: from `data.eval_path`, else from the task's held-out seed range.

    A JSONL eval file in GSM8K (question / answer) or MATH (problem / solution) format, with no
    `prompt` field, is read by psirl.data.gsm8k (final answers extracted from the solutions).
    """
    if config.data.eval_path is not None:
        from psirl.data.gsm8k import is_math_format, read_math_jsonl
        from psirl.data.records import load_records

        if is_math_format(config.data.eval_path):
            return read_math_jsonl(config.data.eval_path, limit=config.eval.n)
        return load_records(config.data.eval_path, kind="prompt", limit=config.eval.n)
    if task is None:
        return []
    # Held-out prompts come from a seed range disjoint from training (see tasks.make).
    return task.make(config.eval.n, seed=10_000 + config.seed)


def encode_texts(tokenizer, texts: list[str], add_eos: bool = False) -> list[list[int]]:
    """Token ids of each text, without special tokens (optionally with EOS appended)."""
    out = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"]
        if add_eos:
            ids = ids + [tokenizer.eos_token_id]
        out.append(ids)
    return out


def pad_prompt_completion(
    prompts: list[list[int]], completions: list[list[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layout shared with `RolloutBatch`: prompts LEFT-padded to P, completions RIGHT-padded to T.

    Returns input_ids [B, P+T] long, attention_mask [B, P+T] long, completion_mask [B, T] float32.
    Keeping one layout means `token_logprobs(..., n_completion=T)` serves SFT, RL and preferences.
    """
    b = len(prompts)
    p = max(len(x) for x in prompts)
    t = max(len(x) for x in completions)
    input_ids = torch.full((b, p + t), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((b, p + t), dtype=torch.long)
    completion_mask = torch.zeros((b, t), dtype=torch.float32)
    for i, (pr, co) in enumerate(zip(prompts, completions, strict=True)):
        input_ids[i, p - len(pr) : p] = torch.tensor(pr, dtype=torch.long)
        attention_mask[i, p - len(pr) : p] = 1
        input_ids[i, p : p + len(co)] = torch.tensor(co, dtype=torch.long)
        attention_mask[i, p : p + len(co)] = 1
        completion_mask[i, : len(co)] = 1.0
    return input_ids, attention_mask, completion_mask


def load_prompt_records(config, task) -> list[dict]:
    """Prompt records of the online, preference and self-training loops: a file or the task."""
    if config.data.train_path is not None:
        from psirl.data.records import check_enough_records, load_records

        records = load_records(config.data.train_path, kind="prompt", split=config.data.split)
        check_enough_records(records, config.optim.batch_size, "optim.batch_size", "prompts")
        return records
    if task is None:
        raise ValueError("data: this loop needs prompts: set data.task or data.train_path")
    return task.make(config.data.n_train, seed=config.seed)


def build_sampler(config, model, tokenizer, task=None, *, reward_fn=None, score: bool = True,
                  records: list[dict] | None = None):
    """The run's rollout layer: the configured engine (`rollout.engine`) over `model`, prompts
    rendered by the `data.chat` rule, and the configured reward (or the Python `reward_fn`);
    with an `env:` section, samples are multi-turn episodes whose environment gives the rewards.
    score=False builds no reward (a loop that only generates). records: the prompt records the
    reward will score, checked once now (psirl.train.rewards.validate_reward)."""
    from psirl.rollout.build import build_engine
    from psirl.rollout.sampler import Sampler

    fn = None
    if score:
        from psirl.train.rewards import build_reward

        fn = build_reward(config, task, tokenizer, reward_fn=reward_fn)
        if records is not None:
            from psirl.train.rewards import validate_reward

            validate_reward(fn, records)
    episodes = None
    if getattr(config, "env", None) is not None:
        import functools

        from psirl.envs import run_env_episodes

        episodes = functools.partial(run_env_episodes, config.env)
    return Sampler(build_engine(config, model, tokenizer), tokenizer, fn, chat=config.data.chat,
                   episodes=episodes)
