"""Turn records into model text: chat templates for conversational data, plain strings as they are.

The policy sees ``render_prompt(prompt)`` and produces the completion; SFT and preference losses
train on ``(prompt_text, completion_text)`` pairs from ``render_sft_example``. The prompt/response
split mirrors the response mask of ../shared/reference/003_e8bd019fa090e190.txt (loss and reward
apply to completion tokens only).
"""

from __future__ import annotations

from typing import Any

from psirl.data.errors import DataError

Messages = list[dict[str, Any]]


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _as_messages(prompt: str | Messages, role: str = "user") -> Messages:
    if isinstance(prompt, str):
        return [{"role": role, "content": prompt}]
    return [dict(message) for message in prompt]


def _apply_template(tokenizer: Any, messages: Messages, *, add_generation_prompt: bool) -> str:
    if not _has_chat_template(tokenizer):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(
            f"tokenizer {name!r}: field 'chat_template': conversational data needs a chat "
            f"template but this tokenizer has none; set tokenizer.chat_template or use plain "
            f"string prompts"
        )
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    if not isinstance(text, str):  # some versions return a list for batched input
        raise DataError(f"apply_chat_template returned {type(text).__name__}, expected str")
    return text


def render_prompt(tokenizer: Any, prompt: str | Messages, *, chat: bool | None = None) -> str:
    """Text that the policy is conditioned on.

    - ``prompt`` a list of ``{"role", "content"}`` messages: the tokenizer's chat template with
      ``add_generation_prompt=True`` (so the text ends where the assistant turn starts).
      ``chat=False`` with messages is an error (there is no faithful plain rendering).
    - ``prompt`` a string: returned unchanged when ``chat`` is None or False; with
      ``chat=True`` it is wrapped as one user message and templated.

    Raises DataError when templating is needed and the tokenizer has no chat template.
    """
    if isinstance(prompt, str):
        if chat:
            return _apply_template(tokenizer, _as_messages(prompt), add_generation_prompt=True)
        return prompt
    if chat is False:
        raise DataError(
            "field 'prompt': a conversational prompt (list of messages) needs chat=True or None"
        )
    return _apply_template(tokenizer, _as_messages(prompt), add_generation_prompt=True)


def _split_conversation(record: dict[str, Any]) -> tuple[Messages, Messages]:
    """(prompt messages, full conversation including the final assistant turn)."""
    if "messages" in record:
        messages = _as_messages(record["messages"])
        return messages[:-1], messages
    prompt = _as_messages(record["prompt"])
    completion = record["completion"]
    if isinstance(completion, str):
        completion_messages = [{"role": "assistant", "content": completion}]
    else:
        completion_messages = _as_messages(completion)
    return prompt, prompt + completion_messages


def render_sft_example(
    tokenizer: Any, record: dict[str, Any], *, chat: bool | None = None
) -> tuple[str, str]:
    """``(prompt_text, completion_text)`` of one sft record; the loss covers completion_text only.

    - plain ``{"prompt": str, "completion": str}`` with ``chat`` None/False: returned as they are.
    - conversational (``messages``, or message-list prompt/completion, or ``chat=True``):
      prompt_text = template(prompt messages, add_generation_prompt=True) and completion_text =
      template(full conversation)[len(prompt_text):], so the completion includes the template's
      end-of-turn marker and the model learns to stop.

    Raises DataError if the full conversation's text does not start with the prompt's text
    (a template that rewrites earlier turns cannot be split into prompt and completion).
    """
    plain = (
        "messages" not in record
        and isinstance(record.get("prompt"), str)
        and isinstance(record.get("completion"), str)
    )
    if plain and not chat:
        return record["prompt"], record["completion"]
    prompt_messages, conversation = _split_conversation(record)
    if not prompt_messages:
        raise DataError("field 'messages': no prompt messages before the final assistant turn")
    prompt_text = _apply_template(tokenizer, prompt_messages, add_generation_prompt=True)
    full_text = _apply_template(tokenizer, conversation, add_generation_prompt=False)
    if not full_text.startswith(prompt_text):
        raise DataError(
            "field 'messages': the chat template renders the conversation so that it does not "
            "start with the rendered prompt; cannot split it into prompt and completion"
        )
    return prompt_text, full_text[len(prompt_text) :]
