"""LoRA through PEFT: only adapters train, log-probs flow through them, merged save is plain."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from psirl.models import apply_lora, load_policy, save_policy, token_logprobs

pytest.importorskip("peft")


def test_only_lora_parameters_are_trainable(tiny_dir):
    model, _ = load_policy(tiny_dir)
    wrapped = apply_lora(model, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    # 2 layers x (q, v) x (A, B)
    assert len(trainable) == 8
    a = next(p for n, p in wrapped.named_parameters() if "q_proj.lora_A" in n)
    assert a.shape == (4, 64)


def test_default_targets_all_linear_layers_but_the_head(tiny_dir):
    model, _ = load_policy(tiny_dir)
    wrapped = apply_lora(model, r=2)
    names = {
        n.split(".lora_")[0].rsplit(".", 1)[-1]
        for n, p in wrapped.named_parameters()
        if p.requires_grad
    }
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_logprob_gradients_reach_only_adapters(tiny_dir):
    model, _ = load_policy(tiny_dir)
    ids = torch.tensor([[5, 6, 76, 7, 8, 9, 10]])
    mask = torch.ones_like(ids)
    base, _ = token_logprobs(model, ids, mask, 3)
    wrapped = apply_lora(model, r=4, alpha=8)
    logp, _ = token_logprobs(wrapped, ids, mask, 3)
    torch.testing.assert_close(logp, base, atol=0, rtol=0)  # B = 0 at init: same function
    logp.sum().backward()
    with_grad = {n for n, p in wrapped.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)
    assert any(p.grad.abs().sum() > 0 for n, p in wrapped.named_parameters() if "lora_B" in n)


def test_merged_save_loads_with_plain_transformers(tmp_path, tiny_dir):
    model, tok = load_policy(tiny_dir)
    wrapped = apply_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    ids = torch.tensor([[5, 6, 76, 7, 8]])
    expected = wrapped(input_ids=ids).logits
    out = save_policy(wrapped, tok, tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in n for n, _ in reloaded.named_parameters())
    torch.testing.assert_close(reloaded(ids).logits, expected, atol=1e-5, rtol=1e-5)
    # the trainer's model is still an unmerged adapter model
    assert any("lora_B" in n for n, _ in wrapped.named_parameters())
    torch.testing.assert_close(wrapped(input_ids=ids).logits, expected, atol=0, rtol=0)


def test_bad_lora_arguments(tiny_dir):
    model, _ = load_policy(tiny_dir)
    with pytest.raises(ValueError, match="r=0"):
        apply_lora(model, r=0)
