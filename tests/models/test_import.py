"""`psirl import`: a tiny llama written as GGUF by the gguf package converts to a safetensors
folder that psirl loads, with the original model's logits, its BPE tokenizer and chat template."""

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from psirl.models.importing import ModelImportError, import_model  # noqa: E402
from psirl.models.loading import load_policy  # noqa: E402

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
MERGES = ["h e", "l l", "he ll", "Ġ t", "Ġt he"]
SPECIAL = ["<|im_start|>", "<|im_end|>"]
HEADS, KV_HEADS, HIDDEN, LAYERS, FFN = 4, 2, 32, 2, 48


def byte_tokens() -> list[str]:
    """GPT-2's byte-to-unicode alphabet: the 256 base tokens of a byte-level BPE."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (transformers reverses it)."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def tiny_llama(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def write_gguf(path, model, tokens):
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(64)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - len(SPECIAL)) + [3] * len(SPECIAL))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(tokens.index("<|im_start|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_chat_template(CHAT_TEMPLATE)
    state = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    writer.add_tensor("output.weight", state["lm_head.weight"])
    names = {
        "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
        "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    }
    for layer in range(LAYERS):
        for short, long in names.items():
            weights = state[f"model.layers.{layer}.{long}.weight"]
            if short == "attn_q":
                weights = permute(weights, HEADS)
            elif short == "attn_k":
                weights = permute(weights, KV_HEADS)
            writer.add_tensor(f"blk.{layer}.{short}.weight", np.ascontiguousarray(weights))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def gguf_source(tmp_path_factory):
    tokens = byte_tokens() + ["he", "ll", "hell", "Ġt", "Ġthe"] + SPECIAL
    model = tiny_llama(len(tokens))
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    write_gguf(path, model, tokens)
    return path, model


def test_gguf_import_keeps_logits_tokenizer_and_chat_template(gguf_source, tmp_path):
    path, original = gguf_source
    out = import_model(path, tmp_path / "imported")
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not any(out.glob("*.gguf"))
    record = json.loads((out / "psirl_import.json").read_text())
    assert record["format"] == "gguf" and len(record["sha256"]) == 64
    model, tokenizer = load_policy(out)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    ids = tokenizer("hello the", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["hell", "o", "Ġthe"]  # the BPE merges apply
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.eos_token == "<|im_end|>"
    batch = torch.tensor([ids + [1, 2, 3]])
    with torch.no_grad():
        expected = original(batch).logits
        got = model(batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_bfloat16_import_and_folder_reimport(gguf_source, tmp_path):
    path, _ = gguf_source
    first = import_model(path, tmp_path / "f32")
    second = import_model(first, tmp_path / "bf16", dtype="bfloat16")
    model, _ = load_policy(second, dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    config = json.loads((second / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"


def test_unsupported_architecture_and_bad_sources_are_clear_errors(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "rwkv.gguf"), "rwkv6")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelImportError, match=r"rwkv.gguf: GGUF architecture 'rwkv6' is not"):
        import_model(tmp_path / "rwkv.gguf", tmp_path / "out")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelImportError, match="unsupported file type '.bin'"):
        import_model(tmp_path / "weights.bin", tmp_path / "out")
    folder = tmp_path / "vision"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ModelImportError, match="'vit' is not a causal LM"):
        import_model(folder, tmp_path / "out")
    with pytest.raises(ModelImportError, match="no such file or folder"):
        import_model(tmp_path / "missing", tmp_path / "out")


def test_online_and_dpo_steps_on_the_imported_model(gguf_source, tmp_path):
    """One GRPO step and one DPO step on the converted model: BPE tokenizer, chat template."""
    from safetensors.torch import load_file

    from psirl.data.templates import render_prompt
    from psirl.track.metrics import read_metrics
    from psirl.train import run_config
    from psirl.train.config import config_from_dict

    path, _ = gguf_source
    model_dir = import_model(path, tmp_path / "model")
    _, tokenizer = load_policy(model_dir)
    prompts = [render_prompt(tokenizer, f"hello the {i}", chat=True) for i in range(4)]
    assert prompts[0] == "<|im_start|>user\nhello the 0<|im_end|>\n<|im_start|>assistant\n"
    prompt_file = tmp_path / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    pair_file = tmp_path / "pairs.jsonl"
    pair_file.write_text("".join(
        json.dumps({"prompt": f"hello {i}", "chosen": "hell", "rejected": "the"}) + "\n"
        for i in range(4)))
    before = load_file(str(model_dir / "model.safetensors"))
    common = {"seed": 0, "max_steps": 1, "device": "cpu", "model": {"path": str(model_dir)},
              "optim": {"lr": 1e-2, "batch_size": 2}, "checkpoint": {"every": 0}}
    online = config_from_dict({
        **common, "loop": "online", "output_dir": str(tmp_path / "grpo"),
        "data": {"train_path": str(prompt_file), "chat": False},
        "reward": {"kind": "format", "pattern": "l"},
        "algorithm": {"preset": "grpo",
                      "knobs": {"sampling": {"group_size": 4, "max_new_tokens": 3}}},
    })
    dpo = config_from_dict({
        **common, "loop": "preference", "output_dir": str(tmp_path / "dpo"),
        "data": {"train_path": str(pair_file), "chat": True},
        "preference": {"loss": "dpo", "beta": 0.5},
    })
    for config, name in ((online, "grpo"), (dpo, "dpo")):
        run_dir = run_config(config, quiet=True)
        metrics = read_metrics(run_dir)
        assert [r["step"] for r in metrics if "loss/total" in r or "loss" in r][-1] == 1, name
        after = load_file(str(next((run_dir / "final").glob("*.safetensors"))))
        changed = [k for k in before if not torch.equal(before[k], after[k])]
        assert changed, f"{name}: no weight changed"
        _, saved_tokenizer = load_policy(run_dir / "final")
        assert saved_tokenizer.chat_template == tokenizer.chat_template
