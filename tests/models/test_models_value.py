"""ValueModel: own backbone copy, values at the completion-predicting positions, safetensors I/O."""

import pytest
import torch
from transformers import AutoModel

from psirl.models import CheckpointError, ValueModel, load_policy
from psirl.models.backbone import position_ids_from_mask


def batch():
    ids = torch.tensor([[0, 0, 5, 6, 76, 7, 8, 2], [9, 10, 11, 12, 13, 14, 0, 0]])
    mask = (torch.arange(8) >= 2).long().unsqueeze(0).repeat(2, 1)
    mask[1] = torch.tensor([1, 1, 1, 1, 1, 1, 0, 0])
    return ids, mask  # P = 5, T = 3


def test_fresh_critic_predicts_zero(tiny_dir):
    critic = ValueModel.from_policy(tiny_dir)
    ids, mask = batch()
    values = critic.values(ids, mask, 3)
    assert values.shape == (2, 3) and values.dtype == torch.float32
    assert torch.equal(values, torch.zeros(2, 3))


def test_values_read_hidden_state_before_each_completion_token(tiny_dir):
    """With head weight = unit vector e_k and bias b, V(s_t) = h_{P-1+t}[k] + b exactly."""
    critic = ValueModel.from_policy(tiny_dir)
    with torch.no_grad():
        critic.head.weight.zero_()
        critic.head.weight[0, 7] = 1.0
        critic.head.bias.fill_(0.25)
    ids, mask = batch()
    backbone = AutoModel.from_pretrained(tiny_dir)
    hidden = backbone(
        input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)
    ).last_hidden_state
    expected = hidden[:, 4:7, 7] + 0.25
    torch.testing.assert_close(critic.values(ids, mask, 3), expected, atol=1e-6, rtol=0)


def test_backbone_is_a_copy_not_shared(tiny_dir):
    policy, _ = load_policy(tiny_dir)
    critic = ValueModel.from_policy(policy)
    policy_params = {p.data_ptr() for p in policy.parameters()}
    assert not policy_params & {p.data_ptr() for p in critic.parameters()}
    before = critic.backbone.embed_tokens.weight.clone()
    with torch.no_grad():
        policy.model.embed_tokens.weight.add_(1.0)
    assert torch.equal(critic.backbone.embed_tokens.weight, before)


def test_gradient_reaches_backbone_and_head(tiny_dir):
    critic = ValueModel.from_policy(tiny_dir)
    with torch.no_grad():
        critic.head.weight.fill_(0.1)
    ids, mask = batch()
    critic.values(ids, mask, 3).pow(2).sum().backward()
    assert critic.head.weight.grad.abs().sum() > 0
    assert critic.backbone.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0


def test_save_load_roundtrip(tmp_path, tiny_dir):
    critic = ValueModel.from_policy(tiny_dir)
    with torch.no_grad():
        critic.head.weight.normal_()
        critic.head.bias.fill_(-0.5)
    out = critic.save_pretrained(tmp_path / "critic")
    assert (out / "value_head.safetensors").is_file() and (out / "model.safetensors").is_file()
    loaded = ValueModel.from_pretrained(out)
    ids, mask = batch()
    assert torch.equal(loaded.values(ids, mask, 3), critic.values(ids, mask, 3))
    assert type(AutoModel.from_pretrained(out)).__name__ == "Qwen2Model"


def test_missing_head_file_is_named(tmp_path, tiny_dir):
    out = ValueModel.from_policy(tiny_dir).save_pretrained(tmp_path / "critic")
    (out / "value_head.safetensors").unlink()
    with pytest.raises(CheckpointError, match="value_head.safetensors"):
        ValueModel.from_pretrained(out)


def test_from_lora_policy_gives_full_trainable_backbone(tiny_dir):
    from psirl.models import apply_lora

    policy, _ = load_policy(tiny_dir)
    wrapped = apply_lora(policy, r=2)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    critic = ValueModel.from_policy(wrapped)
    assert not any("lora" in n for n, _ in critic.named_parameters())
    assert all(p.requires_grad for p in critic.parameters())
    ids, mask = batch()
    merged_hidden = wrapped.get_base_model().model(
        input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)
    )
    with torch.no_grad():
        critic.head.weight.zero_()
        critic.head.weight[0, 3] = 1.0
    # Merged W + BA vs W x + B(A x): equal up to float32 rounding of the (large, std 0.5) update,
    # seen up to 3e-5 depending on the thread count.
    torch.testing.assert_close(
        critic.values(ids, mask, 3), merged_hidden.last_hidden_state[:, 4:7, 3], atol=1e-4, rtol=0
    )
    assert any("lora_B" in n for n, _ in wrapped.named_parameters())  # policy untouched
