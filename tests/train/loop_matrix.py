"""One tiny config per training loop, for the device / dtype matrix (CPU bf16 and tests/gpu).

Each entry is a short run (2 steps) of a 1-layer model on the built-in addition task, so the same
matrix runs on the CPU in a few seconds and on CUDA in the GPU tests. `grad_clip` defaults to a
value every step's gradient norm exceeds, so every update goes through the clipped path.
"""

from __future__ import annotations

from psirl.train.config import config_from_dict

TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}
TASK = {"task": "addition", "task_kwargs": {"digits": 1}, "n_train": 32}
# An untrained model never answers right, so the task reward would be all 0 (no signal, no
# gradient): a format reward that about half of the random completions meet keeps groups varied
# (an untrained model's first character is near uniform over the 260-token character vocabulary,
# 128 of them ASCII; "an odd digit anywhere", used before, held for only ~6% of them).
VARIED_REWARD = {"kind": "format", "pattern": "^[\\x00-\\x7f]"}
FORCE_CLIP = 1e-4  # far below any gradient norm of these runs: the clip always engages

# name -> the loop's own sections (on top of the common ones in `loop_config`).
LOOPS: dict[str, dict] = {
    "sft": {"loop": "sft", "optim": {"batch_size": 4}},
    "online-grpo": {
        "loop": "online",
        "algorithm": {"preset": "grpo",
                      "knobs": {"sampling": {"group_size": 4, "max_new_tokens": 3}}},
        "reward": VARIED_REWARD,
        "optim": {"batch_size": 4},
    },
    "online-ppo": {  # the critic has its own optimiser and clip_and_step call
        "loop": "online",
        "algorithm": {"preset": "ppo",
                      "knobs": {"sampling": {"group_size": 2, "max_new_tokens": 3}}},
        "reward": VARIED_REWARD,
        "optim": {"batch_size": 4},
    },
    "online-gspo": {
        "loop": "online",
        "algorithm": {"preset": "gspo",
                      "knobs": {"sampling": {"group_size": 4, "max_new_tokens": 3}}},
        "reward": VARIED_REWARD,
        "optim": {"batch_size": 4},
    },
    "preference-dpo": {"loop": "preference", "preference": {"loss": "dpo"},
                       "optim": {"batch_size": 4}},
    "preference-online": {
        "loop": "preference",
        "preference": {"loss": "dpo", "online": True, "samples_per_prompt": 3,
                       "max_new_tokens": 3},
        "reward": VARIED_REWARD,
        "optim": {"batch_size": 3},
    },
    "reward_model": {"loop": "reward_model", "optim": {"batch_size": 4}},
    "self_training": {
        "loop": "self_training",
        "self_training": {"samples_per_prompt": 2, "max_new_tokens": 3},
        "reward": VARIED_REWARD,
        "optim": {"batch_size": 4},
    },
}


def loop_config(name: str, model_path: str, output_dir: str, *, device: str = "cpu",
                dtype: str = "float32", max_steps: int = 2, grad_clip: float | None = FORCE_CLIP,
                lr: float = 1e-3, **extra):
    """The TrainConfig of LOOPS[name] on `device` / `dtype`, checkpointing every step."""
    entry = LOOPS[name]
    raw = {
        "output_dir": output_dir, "seed": 0, "max_steps": max_steps, "device": device,
        "dtype": dtype, "model": {"path": model_path}, "data": dict(TASK),
        "eval": {"every": 0}, "checkpoint": {"every": 1},
    }
    for key, value in entry.items():
        raw[key] = dict(value) if isinstance(value, dict) else value
    raw["optim"] = {"lr": lr, "grad_clip": grad_clip, **raw.get("optim", {})}
    raw.update(extra)
    return config_from_dict(raw)
