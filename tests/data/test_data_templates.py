"""render_prompt / render_sft_example with a tiny chat template whose output is known exactly."""

from __future__ import annotations

import pytest

from psirl.data import DataError, render_prompt, render_sft_example


def test_plain_prompt_passes_through(char_tokenizer, plain_tokenizer):
    assert render_prompt(char_tokenizer, "12+34=") == "12+34="
    assert render_prompt(plain_tokenizer, "12+34=", chat=False) == "12+34="


def test_conversational_prompt_uses_chat_template_with_generation_prompt(char_tokenizer):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert (
        render_prompt(char_tokenizer, messages) == "<|system|>be brief\n<|user|>hi\n<|assistant|>"
    )
    assert render_prompt(char_tokenizer, "hi", chat=True) == "<|user|>hi\n<|assistant|>"


def test_messages_without_template_or_with_chat_false_are_errors(char_tokenizer, plain_tokenizer):
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(DataError, match="field 'chat_template'"):
        render_prompt(plain_tokenizer, messages)
    with pytest.raises(DataError, match="field 'prompt': a conversational prompt"):
        render_prompt(char_tokenizer, messages, chat=False)


def test_sft_example_plain_and_conversational(char_tokenizer):
    assert render_sft_example(char_tokenizer, {"prompt": "1+1=", "completion": "2"}) == (
        "1+1=",
        "2",
    )
    record = {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    }
    assert render_sft_example(char_tokenizer, record) == ("<|user|>hi\n<|assistant|>", "yo\n")
    mixed = {"prompt": [{"role": "user", "content": "hi"}], "completion": "yo"}
    assert render_sft_example(char_tokenizer, mixed) == ("<|user|>hi\n<|assistant|>", "yo\n")
    wrapped = render_sft_example(char_tokenizer, {"prompt": "hi", "completion": "yo"}, chat=True)
    assert wrapped == ("<|user|>hi\n<|assistant|>", "yo\n")


def test_sft_example_with_template_that_rewrites_history_is_an_error(make_tokenizer):
    # A template that only shows the last message cannot be split into prompt + completion.
    tokenizer = make_tokenizer("{{ messages[-1]['content'] }}")
    record = {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    }
    with pytest.raises(DataError, match="does not start with the rendered prompt"):
        render_sft_example(tokenizer, record)
