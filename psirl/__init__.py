"""psirl: post-training language models with reinforcement learning.

One online loop whose knobs make REINFORCE, REINFORCE++, RLOO, PPO, GRPO, Dr. GRPO, DAPO, GSPO and
CISPO; preference and self-training loops on the same model, data and reward layers. See
DESIGN.md for the map and `psirl.algorithms.PRESETS` for the presets.
"""

__version__ = "0.1.0"
