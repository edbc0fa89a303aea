"""Where preference pairs and labelled samples come from, rendered to text, and their token ids.

A pair is ``{"prompt", "chosen", "rejected"}`` of TEXT: the prompt as the policy sees it (chat
template applied to conversational records) and each completion as the text that follows it
(``psirl.data.templates.render_sft_example``), so ``prompt + chosen`` is exactly the sequence the
policy, the reference and a reward model read. Pairs come from ``data.train_path`` /
``data.eval_path`` (record kind "preference") or, for a built-in task, from
``task_preference_pairs``: the reference answer is chosen, a wrong answer is rejected.
A labelled sample (KTO) is ``{"prompt", "completion", "label": bool}``.
"""

from __future__ import annotations

from typing import Any

from psirl.train.setup import encode_texts


def task_preference_pairs(task, n: int, seed: int, split: str = "train") -> list[dict[str, Any]]:
    """``n`` pairs from a built-in task: chosen = the reference answer, rejected = a wrong one.

    The rejected answer of problem i is the reference answer of the next problem j = i+1, i+2, ...
    (cyclically) that the task's verifier scores 0 on problem i, so it is well-formed but wrong.
    Problems with no such answer among the others are dropped (so fewer than n pairs is possible
    when n is tiny). Deterministic in (task, n, seed, split). Records keep ``answer``.
    """
    records = task.make(n, seed=seed, split=split)
    pairs = []
    for i, record in enumerate(records):
        for k in range(1, len(records)):
            other = records[(i + k) % len(records)]["answer"]
            if task.reward(other, record) == 0.0:
                pairs.append({"prompt": record["prompt"], "chosen": record["answer"],
                              "rejected": other, "answer": record["answer"]})
                break
    return pairs


def render_pairs(tokenizer, records: list[dict], chat: bool | None) -> list[dict[str, str]]:
    """Preference records -> text pairs {"prompt", "chosen", "rejected"} (see module docstring)."""
    from psirl.data.templates import render_sft_example

    out = []
    for r in records:
        prompt, chosen = render_sft_example(
            tokenizer, {"prompt": r["prompt"], "completion": r["chosen"]}, chat=chat)
        prompt_r, rejected = render_sft_example(
            tokenizer, {"prompt": r["prompt"], "completion": r["rejected"]}, chat=chat)
        if prompt_r != prompt:  # pragma: no cover - both render the same prompt messages
            raise ValueError(f"record {r!r}: chosen and rejected render different prompts")
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


def train_pairs(config, tokenizer, task) -> list[dict[str, str]]:
    """Training pairs: ``data.train_path`` (kind "preference") or ``data.n_train`` task pairs."""
    if config.data.train_path is not None:
        from psirl.data.records import load_records

        records = load_records(config.data.train_path, kind="preference", split=config.data.split)
    elif task is not None:
        records = task_preference_pairs(task, config.data.n_train, seed=config.seed)
    else:
        raise ValueError("data: preference training needs data.task or data.train_path")
    pairs = render_pairs(tokenizer, records, config.data.chat)
    if not pairs:
        raise ValueError("data: no preference pairs")
    return pairs


def eval_pairs(config, tokenizer, task) -> list[dict[str, str]]:
    """Held-out pairs: ``data.eval_path`` (kind "preference"), else ``eval.n`` pairs of the task's
    held-out split, else none."""
    if config.data.eval_path is not None:
        from psirl.data.records import load_records

        records = load_records(config.data.eval_path, kind="preference", limit=config.eval.n)
    elif task is not None:
        records = task_preference_pairs(task, config.eval.n, seed=config.seed, split="test")
    else:
        return []
    return render_pairs(tokenizer, records, config.data.chat)


def labelled_samples(config, tokenizer, task) -> list[dict[str, Any]]:
    """KTO samples {"prompt", "completion", "label"}: from a labelled file when
    ``preference.labelled``, else two per training pair (chosen True, rejected False)."""
    if not config.preference.labelled:
        return [
            {"prompt": p["prompt"], "completion": p[key], "label": key == "chosen"}
            for p in train_pairs(config, tokenizer, task)
            for key in ("chosen", "rejected")
        ]
    from psirl.data.records import load_records
    from psirl.data.templates import render_sft_example

    if config.data.train_path is None:
        raise ValueError("preference.labelled: needs data.train_path with labelled records")
    records = load_records(config.data.train_path, kind="labelled", split=config.data.split)
    out = []
    for r in records:
        prompt, completion = render_sft_example(tokenizer, r, chat=config.data.chat)
        out.append({"prompt": prompt, "completion": completion, "label": bool(r["label"])})
    return out


def encode_pairs(tokenizer, pairs: list[dict[str, str]]) -> dict[str, list[list[int]]]:
    """Token ids of pairs: {"prompt", "chosen", "rejected"} -> lists of id lists.

    Completions get the EOS token appended, as in SFT, so the policy also learns where the
    preferred answer ends.
    """
    return {
        "prompt": encode_texts(tokenizer, [p["prompt"] for p in pairs]),
        "chosen": encode_texts(tokenizer, [p["chosen"] for p in pairs], add_eos=True),
        "rejected": encode_texts(tokenizer, [p["rejected"] for p in pairs], add_eos=True),
    }
