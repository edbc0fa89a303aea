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
