"""Supervised fine-tuning: the completion's token NLL, prompt tokens masked out of the loss.

Batches use the layout shared with RL (prompt left-padded, completion right-padded) so the same
`token_logprobs` serves every loop; each step's examples are sorted by length before they are cut
into micro-batches, which keeps padding low. Examples that repeat a prompt run it once
(models/prefix_sharing.py); distinct examples are not packed into shared rows.

With an ``env:`` section the examples are the environment's oracle episodes
(``env.demonstration(record)``, e.g. the calculator's tool call, its value and the copied
answer; ``sft.demonstration_share`` of the records, the rest plain answers): an SFT cold start on
tool use before RL, the observation tokens attended but out of the loss, as in the RL episodes.
Held-out evaluation is then whole episodes (eval/env_*).
"""

from __future__ import annotations

from pathlib import Path

import torch

from psirl.train.base import (
    LoopSpec,
    build_optimizer,
    build_scheduler,
    run_loop,
)
from psirl.train.distributed import shard_indices, world
from psirl.train.evaluation import task_evaluator
from psirl.train.fsdp import shard_models
from psirl.train.setup import (
    build_policy,
    build_task,
    encode_texts,
)
from psirl.train.sft_update import sft_update


def train(config, *, resume: bool = False, quiet: bool = False) -> Path:
    """Run SFT to `config.max_steps`; returns the run folder."""
    return run_loop(config, build_sft, resume=resume, quiet=quiet,
                    summary_keys=("loss", "eval/accuracy", "eval/accuracy_greedy",
                                  "eval/env_success", "eval/env_success_sampled"))


def load_sft_examples(config, task, tokenizer) -> tuple[list[dict], list[str]]:
    """({"prompt", "completion"} text records, where each came from) from the task or from
    `data.train_path`. Locations are "file:line" (JSONL) / "file: row n", or "task NAME: example i"
    for a built-in task, so a length error can name the offending example."""
    if config.data.train_path is not None:
        from psirl.data.errors import DataError
        from psirl.data.records import load_records
        from psirl.data.templates import render_sft_example

        records = load_records(config.data.train_path, kind="sft", split=config.data.split)
        examples = []
        for where, r in zip(records.locations, records, strict=True):
            try:
                prompt, completion = render_sft_example(tokenizer, r, chat=config.data.chat)
            except DataError as exc:
                raise DataError(f"{where}: {exc}") from None
            examples.append({"prompt": prompt, "completion": completion})
        return examples, list(records.locations)
    if task is None:
        raise ValueError("data: SFT needs data.task or data.train_path")
    examples = task.sft_examples(config.data.n_train, seed=config.seed)
    return examples, [f"task {config.data.task}: example {i + 1}" for i in range(len(examples))]


def encode_segments(tokenizer, segments: list[tuple[str, bool]]) -> tuple[list[int], list[float]]:
    """(ids, loss mask) of a demonstration's (text, written_by_model) segments, EOS appended
    (in the loss). Each segment is tokenised on its own, as run_episodes holds them (a model turn
    is what the model wrote; an observation is tokenised once); the model's segments have loss
    mask 1, the environment's 0."""
    ids: list[int] = []
    mask: list[float] = []
    for text, by_model in segments:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [1.0 if by_model else 0.0] * len(piece)
    return ids + [tokenizer.eos_token_id], mask + [1.0]


def check_sft_lengths(prompts: list[list[int]], completions: list[list[int]], locations: list[str],
                      *, max_prompt_tokens: int, max_seq_len: int) -> None:
    """Refuse an example whose prompt has more than `data.max_prompt_tokens` tokens or whose
    prompt + completion (EOS included) has more than `sft.max_seq_len`; DataError names where."""
    from psirl.data.errors import DataError

    for where, p, c in zip(locations, prompts, completions, strict=True):
        if len(p) > max_prompt_tokens:
            raise DataError(f"{where}: field 'prompt': {len(p)} tokens, more than "
                            f"data.max_prompt_tokens={max_prompt_tokens}")
        if len(p) + len(c) > max_seq_len:
            raise DataError(f"{where}: prompt + completion: {len(p) + len(c)} tokens (EOS "
                            f"included), more than sft.max_seq_len={max_seq_len}")


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
    loss_masks = None
    if config.env is not None:  # the environment's oracle episodes, observations out of the loss
        from psirl.envs import demonstration_examples
        from psirl.train.setup import load_prompt_records

        examples = demonstration_examples(config.env, load_prompt_records(config, task),
                                          share=config.sft.demonstration_share)
        locations = [f"env {config.env.name}: demonstration {i + 1}" for i in range(len(examples))]
    else:
        examples, locations = load_sft_examples(config, task, tokenizer)
    if not examples:
        from psirl.data.errors import DataError

        raise DataError(f"{config.data.train_path or 'data'}: the SFT dataset is empty")
    prompts = encode_texts(tokenizer, [e["prompt"] for e in examples])
    if config.env is not None:
        completions, loss_masks = map(list, zip(*(encode_segments(tokenizer, e["segments"])
                                                  for e in examples), strict=True))
    else:
        completions = encode_texts(tokenizer, [e["completion"] for e in examples], add_eos=True)
    check_sft_lengths(prompts, completions, locations,
                      max_prompt_tokens=config.data.max_prompt_tokens,
                      max_seq_len=config.sft.max_seq_len)
    shard_models(config, model)  # distributed.strategy fsdp: shard before the optimiser
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, config.optim)
    scheduler = build_scheduler(optimizer, config.optim, config.max_steps)
    pad_id = tokenizer.pad_token_id


    def step(step_index: int, generator: torch.Generator) -> dict[str, float]:
        idx = epoch_batch_indices(len(examples), config.optim.batch_size, step_index, config.seed)
        rank, world_size = world()  # data-parallel: this rank's contiguous slice of the batch
        idx = [idx[i] for i in shard_indices(len(idx), rank, world_size)]
        return sft_update(model, params, optimizer, scheduler, [prompts[i] for i in idx],
                          [completions[i] for i in idx], pad_id=pad_id,
                          grad_accum=config.optim.grad_accum, grad_clip=config.optim.grad_clip,
                          loss_masks=None if loss_masks is None else [loss_masks[i] for i in idx])

    if config.env is not None:
        evaluate = _episode_evaluator(config, model, tokenizer, task)
    else:
        evaluate = task_evaluator(config, model, tokenizer, task)

    return LoopSpec(models={"policy": model}, tokenizer=tokenizer,
                    optimizers={"policy": optimizer}, schedulers={"policy": scheduler},
                    step=step, evaluate=evaluate, data_parallel=True)


def _episode_evaluator(config, model, tokenizer, task):
    """Held-out success of whole episodes in the environment (psirl.envs.episode_evaluator),
    with an engine of the config's `rollout:` built on first use and synced to the model."""
    from psirl.envs import episode_evaluator
    from psirl.rollout import build_engine
    from psirl.train.setup import eval_records

    state = {}

    def engine_of():
        if "engine" not in state:
            state["engine"] = build_engine(config, model, tokenizer)
        state["engine"].sync(model)
        return state["engine"]

    evaluate = episode_evaluator(config, engine_of, eval_records(config, task),
                                 config.eval.max_new_tokens)
    if evaluate is None:
        return None

    def in_eval_mode(step_index: int) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            return evaluate(step_index)
        finally:
            model.train(was_training)

    return in_eval_mode
