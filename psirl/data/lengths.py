"""Refuse prompts that do not fit the model's prompt budget, naming the record and its length."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from psirl.data.errors import DataError
from psirl.data.templates import render_prompt


def prompt_token_count(tokenizer: Any, prompt: Any, *, chat: bool | None = None) -> int:
    """Number of tokens of ``render_prompt(tokenizer, prompt)`` (no extra special tokens added)."""
    text = render_prompt(tokenizer, prompt, chat=chat)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def check_prompt_lengths(
    records: Sequence[dict[str, Any]],
    tokenizer: Any,
    max_prompt_tokens: int,
    source: str,
    *,
    chat: bool | None = None,
) -> list[int]:
    """Check every record's rendered prompt has at most ``max_prompt_tokens`` tokens.

    Args:
        records: records with a ``prompt`` field (any kind except messages-only sft records,
            whose prompt is ``messages[:-1]``). If ``records`` is the RecordList returned by
            load_records, errors name the file line / row; otherwise ``source`` and the 1-based
            record number.
        tokenizer: a transformers tokenizer (chat template used for conversational prompts).
        max_prompt_tokens: the limit, inclusive.
        source: the data's name for messages (usually its path).

    Returns:
        The prompt lengths in tokens, one int per record.

    Raises:
        DataError ``"<file>:<line>: field 'prompt': 812 tokens, more than max_prompt_tokens=512"``
        for the first over-long prompt.
    """
    if max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens: must be >= 1, got {max_prompt_tokens}")
    locations = getattr(records, "locations", None)
    lengths = []
    for index, record in enumerate(records):
        if "prompt" in record:
            prompt = record["prompt"]
        elif "messages" in record:
            prompt = record["messages"][:-1]
        else:
            raise DataError(f"{source}: record {index + 1}: field 'prompt': missing")
        length = prompt_token_count(tokenizer, prompt, chat=chat)
        if length > max_prompt_tokens:
            where = (
                locations[index]
                if locations is not None and len(locations) == len(records)
                else f"{source}: record {index + 1}"
            )
            raise DataError(
                f"{where}: field 'prompt': {length} tokens, more than "
                f"max_prompt_tokens={max_prompt_tokens}"
            )
        lengths.append(length)
    return lengths
