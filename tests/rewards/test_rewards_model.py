"""RewardModelReward with a tiny random Qwen2 sequence classifier saved in a temp folder."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from psirl.rewards import RewardModelReward  # noqa: E402

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def char_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for code in [10, *range(32, 127)]:
        vocab.setdefault(chr(code), len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_rm")
    tokenizer = char_tokenizer()
    config = transformers.Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = transformers.Qwen2ForSequenceClassification(config)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)  # make scores clearly differ between texts
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def unpadded_score(folder, text: str) -> float:
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state  # [1, L, H]
        return float(model.score(hidden[0, -1]))  # score head at the last token


def test_batched_scores_equal_single_unpadded_scores(reward_model_dir):
    reward = RewardModelReward(reward_model_dir, batch_size=3)
    prompts = ["1+1=", "12+34=", "7 3 2>17:", "a", "b"]
    completions = ["2", "46", "7*2+3", "long completion text", ""]
    scores = reward(prompts, completions, [{}] * 5)
    expected = [
        unpadded_score(reward_model_dir, p + c) for p, c in zip(prompts, completions, strict=True)
    ]
    assert scores == pytest.approx(expected, abs=1e-5)
    assert len(set(round(s, 4) for s in scores)) == 5


def test_conversational_prompt_is_scored_through_the_chat_template(reward_model_dir):
    reward = RewardModelReward(reward_model_dir)
    record = {"prompt": [{"role": "user", "content": "hi"}]}
    assert reward.text("ignored", "yo", record) == "<|user|>hi\n<|assistant|>yo\n"
    score = reward(["ignored"], ["yo"], [record])[0]
    assert score == pytest.approx(
        unpadded_score(reward_model_dir, "<|user|>hi\n<|assistant|>yo\n"), abs=1e-5
    )


def test_missing_folder_and_pickle_only_folder_are_refused(tmp_path, reward_model_dir):
    with pytest.raises(FileNotFoundError, match="reward model folder not found"):
        RewardModelReward(tmp_path / "absent")
    pickle_only = tmp_path / "pickle_only"
    pickle_only.mkdir()
    (pickle_only / "config.json").write_text((reward_model_dir / "config.json").read_text())
    (pickle_only / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="safetensors only"):
        RewardModelReward(pickle_only)


def test_device_and_dtype_are_settings(reward_model_dir):
    """'auto' is the CPU without CUDA; bfloat16 weights give float32 scores close to float32's."""
    auto = RewardModelReward(reward_model_dir)
    expected_type = "cuda" if torch.cuda.is_available() else "cpu"
    assert auto.device.type == expected_type
    assert next(auto.model.parameters()).device.type == expected_type
    cpu32 = RewardModelReward(reward_model_dir, device="cpu")
    cpu16 = RewardModelReward(reward_model_dir, device=torch.device("cpu"), dtype="bfloat16")
    assert next(cpu16.model.parameters()).dtype == torch.bfloat16 and cpu16.dtype == torch.bfloat16
    texts = ["1+1=2", "12+34=46", "a"]
    s32, s16 = cpu32.score_texts(texts), cpu16.score_texts(texts)
    assert all(isinstance(s, float) for s in s16)
    # bf16 keeps 8 mantissa bits (relative step 2^-8 = 0.4%); a few roundings in the layer: 2%
    assert s16 == pytest.approx(s32, rel=2e-2)


def test_bad_device_or_dtype_is_named(reward_model_dir):
    with pytest.raises(ValueError, match="dtype"):
        RewardModelReward(reward_model_dir, device="cpu", dtype="float8")
    with pytest.raises(ValueError, match="device"):
        RewardModelReward(reward_model_dir, device="gpu0")
