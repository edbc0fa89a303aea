"""A LoRA run's final/ is a merged, plain model folder (so the next stage can load it) with the
adapter alone under final/adapter/."""

from __future__ import annotations

import pytest
import torch

from psirl.models.loading import load_policy
from psirl.models.tiny import make_tiny_model
from psirl.train import run_config
from psirl.train.config import config_from_dict


def test_lora_sft_final_loads_as_a_plain_model_and_chains_into_grpo(tmp_path):
    pytest.importorskip("peft")
    tiny = make_tiny_model(tmp_path / "tiny", hidden_size=32, num_layers=1, num_heads=2,
                           intermediate_size=64, alphabet="0123456789+=", seed=0)
    sft = run_config(config_from_dict({
        "loop": "sft", "output_dir": str(tmp_path / "sft"), "max_steps": 2, "device": "cpu",
        "model": {"path": str(tiny), "lora": {"r": 4, "alpha": 8}},
        "data": {"task": "addition", "task_kwargs": {"digits": 1}, "n_train": 32},
        "optim": {"lr": 1e-2, "batch_size": 8}, "checkpoint": {"every": 0}}), quiet=True)
    final = sft / "final"
    assert (final / "adapter" / "adapter_config.json").exists()
    assert not (final / "adapter_config.json").exists()
    merged, _ = load_policy(final)  # a plain causal-LM folder
    base, _ = load_policy(tiny)
    changed = [n for (n, a), (_, b) in zip(merged.state_dict().items(), base.state_dict().items(),
                                           strict=True) if not torch.equal(a, b)]
    assert changed, "the merged weights equal the base: the adapter was not merged"
    run = run_config(config_from_dict({
        "loop": "online", "output_dir": str(tmp_path / "grpo"), "max_steps": 1, "device": "cpu",
        "model": {"path": str(final)},
        "data": {"task": "addition", "task_kwargs": {"digits": 1}, "n_train": 16},
        "algorithm": {"preset": "grpo", "knobs": {"sampling": {"group_size": 2, "max_new_tokens": 2}}},
        "optim": {"batch_size": 2}, "checkpoint": {"every": 0}}), quiet=True)
    assert (run / "final" / "config.json").exists()
