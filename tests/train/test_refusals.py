"""Combinations psirl refuses are one clear line naming the key, before anything is built."""

from __future__ import annotations

import pytest

from psirl.train import run_config
from psirl.train.config import ConfigError, config_from_dict

BASE = {"output_dir": "/tmp/psirl-refusals", "model": {"tiny": {}},
        "data": {"task": "addition"}}


def test_lora_with_the_reward_model_loop_names_model_lora():
    with pytest.raises(ConfigError, match=r"model.lora: the reward_model loop trains the full model"):
        config_from_dict({**BASE, "loop": "reward_model", "model": {"tiny": {}, "lora": {"r": 4}}})


@pytest.mark.parametrize("loop, extra", [("self_training", {}), ("reward_model", {}),
                                         ("preference", {"preference": {"online": True}})])
def test_torchrun_with_a_single_process_loop_is_one_line(loop, extra, monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = config_from_dict({**BASE, "output_dir": str(tmp_path), "loop": loop, **extra})
    with pytest.raises(ConfigError, match="runs as one process; launched with torchrun as 2") as err:
        run_config(cfg)
    assert "\n" not in str(err.value)
    assert not any(tmp_path.iterdir())  # nothing was built


def test_sft_packing_is_no_longer_a_silent_key():
    with pytest.raises(ConfigError, match="sft.packing: unknown key"):
        config_from_dict({**BASE, "loop": "sft", "sft": {"packing": True}})


def test_a_method_of_another_loop_points_to_that_loop():
    with pytest.raises(ConfigError, match="use loop: preference with preference.loss: kto"):
        config_from_dict({**BASE, "loop": "online", "algorithm": {"preset": "kto"}})
    with pytest.raises(ConfigError, match="use loop: self_training with self_training.method: raft"):
        config_from_dict({**BASE, "loop": "raft"})


def test_vllm_with_top_p_is_refused_at_load_time():
    with pytest.raises(ConfigError, match="cannot return pre-truncation log-probs"):
        config_from_dict({**BASE, "loop": "online", "rollout": {"engine": "vllm"},
                          "algorithm": {"preset": "grpo", "knobs": {"sampling": {"top_k": 5}}}})
