"""The calculator environment trains: a small version of examples/multiturn_demo.py (SFT cold
start on half tool-use demonstrations, then GRPO with the environment in the loop, reward =
success only) raises held-out success on the sum of three 3-digit numbers, and the GRPO run's
report.html shows the episode metrics.

Measured on the shared 2-core machine (load about 3), 1 thread, 25 s per run: held-out success
on 100 problems before -> after 20 GRPO steps, seeds 0 / 1 / 2 / 3 (per-row sampling streams,
rollout/seeding.py): sampled 19 -> 61, 24 -> 64, 17 -> 58, 17 -> 59 %; greedy 58 -> 79,
79 -> 79, 2 -> 74, 0 -> 74 %. (Before the per-row streams: sampled +43, +29, +39, +48 points.)
"""

import importlib.util
from pathlib import Path

from psirl.train import run_config

DEMO = Path(__file__).resolve().parents[2] / "examples" / "multiturn_demo.py"
# Measured sampled gains: +42, +40, +41, +42 points (seeds 0-3; +29 to +48 under the previous
# seeding); 0.20 is half the smallest now and under the smallest before: room for the draws
# to move.
MIN_SAMPLED_GAIN = 0.20
MIN_GREEDY_AFTER = 0.5  # measured 0.74-0.79
SEED = 0


def load_demo():
    spec = importlib.util.spec_from_file_location("multiturn_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_small(out: Path, seed: int = SEED) -> dict:
    """SFT (250 steps) -> GRPO (20 steps) with evaluations at the start and the end of GRPO."""
    demo = load_demo()
    configs = demo.demo_configs(out, seed=seed, sft_steps=250, grpo_steps=20, eval_n=100,
                                eval_every=20, threads=1)
    for config in configs.values():
        run_config(config, quiet=True)
    return demo.episode_summary(out / "grpo")


def test_grpo_raises_held_out_success_on_the_tool_task(tmp_path):
    result = run_small(tmp_path)
    gain = result["sampled_after"] - result["sampled_before"]
    assert gain >= MIN_SAMPLED_GAIN, result
    # Greedy success is not compared: before RL the greedy first token is a coin flip between
    # "[" (call) and a digit (guess), so it is 2% or 80% depending on the seed. After RL the
    # greedy policy calls the calculator in (nearly) every episode: 2 turns each.
    assert result["turns_after"] >= 1.9 and result["train_tool_ok"] > 0.8, result
    assert result["greedy_after"] >= MIN_GREEDY_AFTER, result

    report = Path(result["report"]).read_text(encoding="utf-8")
    assert "Episodes (multi-turn)" in report
    for name in ("eval/env_success", "eval/env_success_sampled", "episode/turns_mean",
                 "env/tool_call", "env/tool_ok", "time/env_s"):
        assert f"<td>{name}</td>" in report, name
