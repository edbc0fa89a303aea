"""The tiny model factory: plain transformers loading, exact character tokenisation, seeding."""

import string

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from psirl.models.tiny import CHAT_TEMPLATE, make_char_tokenizer, make_tiny_model


@pytest.mark.parametrize("fixture", ["tiny_dir", "tiny_llama_dir"])
def test_autotokenizer_roundtrip_is_one_token_per_character(fixture, request):
    folder = request.getfixturevalue(fixture)
    tok = AutoTokenizer.from_pretrained(folder)
    # ids: 4 specials, then digits (4..13), lowercase (14..39), uppercase (40..65), punctuation
    plus = 4 + 10 + 52 + string.punctuation.index("+")
    equals = 4 + 10 + 52 + string.punctuation.index("=")
    assert tok("12+34=")["input_ids"] == [5, 6, plus, 7, 8, equals]
    text = "Find 7*(3-1)/2 = ?\nanswer: 42.  ok!"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "<s>", "</s>"]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.decode([14, 2, 0, 15], skip_special_tokens=True) == "ab"
    assert tok.padding_side == "left"


def test_in_memory_and_reloaded_tokenizers_agree_on_every_character(tiny_dir):
    reloaded = AutoTokenizer.from_pretrained(tiny_dir)
    fresh = make_char_tokenizer()
    text = string.printable + "é€"
    assert reloaded(text)["input_ids"] == fresh(text)["input_ids"]
    assert reloaded.decode(fresh(text)["input_ids"]) == text


def test_chat_template_renders_conversation(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    messages = [{"role": "system", "content": "Add."}, {"role": "user", "content": "1+2="}]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "system: Add.\nuser: 1+2=\nassistant: "
    assert tok.chat_template == CHAT_TEMPLATE


def test_restricted_alphabet_gives_small_vocab():
    tok = make_char_tokenizer("ab")
    assert len(tok) == 6
    assert tok("abba")["input_ids"] == [4, 5, 5, 4]


@pytest.mark.parametrize(
    "fixture,cls", [("tiny_dir", "Qwen2ForCausalLM"), ("tiny_llama_dir", "LlamaForCausalLM")]
)
def test_model_loads_with_plain_transformers(fixture, cls, request):
    folder = request.getfixturevalue(fixture)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert type(model).__name__ == cls
    assert model.config.vocab_size == 260 and model.config.hidden_size == 64
    assert model.config.num_hidden_layers == 2 and model.config.num_key_value_heads == 2
    assert (folder / "model.safetensors").is_file()
    logits = model(torch.tensor([[5, 6, 7]])).logits
    assert logits.shape == (1, 3, 260) and torch.isfinite(logits).all()


def test_seed_determines_weights(tmp_path):
    a = load_file(make_tiny_model(tmp_path / "a", seed=3, num_layers=1) / "model.safetensors")
    b = load_file(make_tiny_model(tmp_path / "b", seed=3, num_layers=1) / "model.safetensors")
    c = load_file(make_tiny_model(tmp_path / "c", seed=4, num_layers=1) / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])


def test_bad_arch_is_refused(tmp_path):
    with pytest.raises(ValueError, match="arch"):
        make_tiny_model(tmp_path, arch="gpt2")
