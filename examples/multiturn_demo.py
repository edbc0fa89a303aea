"""Multi-turn RL with a calculator tool on a CPU: SFT cold start on tool use, then GRPO.

The task is the sum of three 3-digit numbers ("426+702+270=" -> "1398"), which a tiny
character-level model cannot do in its head. The calculator environment (psirl/envs/calculator.py)
runs the expression the model writes between "[" and "]" and answers "=VALUE\\n"; the next model
turn is the final answer (reward 1 when it is the sum, else 0; no bonus for calling the tool):

    prompt 426+702+270=   model [426+702+270]   env =1398\\n   model 1398</s>   -> reward 1

1. build a fresh tiny Qwen2 model (2 layers, hidden 128, about 0.4M parameters);
2. SFT it, deliberately briefly, on the environment's oracle episodes
   (CalculatorEnv.demonstration: the call, the value, the copied answer; the value's tokens are
   attended but out of the loss), so that it calls the tool but copies the value only sometimes;
3. GRPO from that checkpoint with the environment in the loop (`env:`), reward = success only;
4. print held-out success (greedy and sampled, 200 problems of the task's held-out split) after
   SFT (= before RL) and after RL, the tool-call rate, the tool-call success rate, turns per
   episode and time spent in the environment.

Both stages are ordinary `psirl train` runs (their resolved configs are in the run folders).

Usage: python examples/multiturn_demo.py [--out runs/multiturn_demo] [--seed 0] [--quick]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

MODEL = {"arch": "qwen2", "hidden_size": 128, "num_layers": 2, "num_heads": 4,
         "intermediate_size": 384}
TASK = {"task": "addition", "task_kwargs": {"digits": 3, "terms": 3}}
ENV = {"name": "calculator",
       "kwargs": {"open_tag": "[", "close_tag": "]", "result_template": "={value}\n",
                  "call_bonus": 0.0},
       "max_turns": 3, "max_episode_tokens": 32}
TURN_TOKENS = 16  # "[426+702+270]" is 13 tokens; a turn may not need more


def demo_configs(out: Path, *, seed: int = 0, sft_steps: int = 250, grpo_steps: int = 80,
                 demonstration_share: float = 0.5,
                 eval_n: int = 200, eval_every: int = 10, threads: int | None = 1) -> dict:
    """{"sft": config, "grpo": config}: the two `psirl train` runs of the demo, as data."""
    from psirl.train.config import config_from_dict

    common = {"seed": seed, "device": "cpu", "threads": threads, "env": ENV,
              "data": {**TASK, "n_train": 5000}, "checkpoint": {"every": 0}}
    sft = config_from_dict({
        **common, "loop": "sft", "output_dir": str(out / "sft"), "max_steps": sft_steps,
        "model": {"tiny": MODEL}, "sft": {"demonstration_share": demonstration_share},
        "optim": {"lr": 1e-3, "batch_size": 32, "warmup_steps": 10, "schedule": "constant",
                  "weight_decay": 0.0, "grad_clip": 1.0},
        "eval": {"every": 0, "n": eval_n, "greedy": True, "sampled": True,
                 "max_new_tokens": TURN_TOKENS},
    })
    grpo = config_from_dict({
        **common, "loop": "online", "output_dir": str(out / "grpo"), "max_steps": grpo_steps,
        "model": {"path": str(out / "sft" / "final")},
        "optim": {"lr": 3e-4, "batch_size": 16, "grad_clip": 1.0},
        "algorithm": {"preset": "grpo",
                      "knobs": {"sampling": {"group_size": 8, "max_new_tokens": TURN_TOKENS}}},
        "eval": {"every": eval_every, "n": eval_n, "greedy": True, "sampled": True,
                 "max_new_tokens": TURN_TOKENS},
    })
    return {"sft": sft, "grpo": grpo}


def episode_summary(run_dir: Path) -> dict:
    """Held-out success before RL (the first evaluation) and after (the last), greedy and
    sampled, and the training episodes' tool use over the run's last 5 steps."""
    from psirl.track.metrics import read_metrics

    records = read_metrics(run_dir)
    evals = [m for m in records if "eval/env_success" in m]
    steps = [m for m in records if "episode/turns_mean" in m][-5:]

    def mean(key: str) -> float:
        return sum(m[key] for m in steps) / len(steps)

    first, last = evals[0], evals[-1]

    def calls(m: dict, mode: str = "") -> float:  # tool calls per episode = per turn x turns
        return m[f"eval/env_tool_call{mode}"] * m[f"eval/env_turns{mode}"]

    return {
        "greedy_before": first["eval/env_success"], "greedy_after": last["eval/env_success"],
        "sampled_before": first["eval/env_success_sampled"],
        "sampled_after": last["eval/env_success_sampled"],
        "calls_greedy_before": calls(first), "calls_greedy_after": calls(last),
        "calls_sampled_before": calls(first, "_sampled"),
        "calls_sampled_after": calls(last, "_sampled"),
        "turns_before": first["eval/env_turns"], "turns_after": last["eval/env_turns"],
        "train_turns_per_episode": mean("episode/turns_mean"),
        "train_tool_ok": mean("env/tool_ok"),
        "train_env_s_per_step": mean("time/env_s"),
        "report": str(run_dir / "report.html"),
    }


def run_demo(out: Path, **kwargs) -> dict:
    """Run SFT then GRPO (replacing a previous demo's sft/ and grpo/ folders in `out`); print
    and return episode_summary of the GRPO run with the stages' wall times."""
    from psirl.train import run_config

    configs = demo_configs(out, **kwargs)
    for name in configs:
        shutil.rmtree(out / name, ignore_errors=True)
    wall = {}
    for name, config in configs.items():
        t0 = time.perf_counter()
        run_config(config, quiet=True)
        wall[f"wall_{name}_s"] = round(time.perf_counter() - t0, 1)
    result = {**episode_summary(out / "grpo"), **wall}
    print(
        "held-out success, {n} problems (sum of three 3-digit numbers), before -> after GRPO:\n"
        "  greedy  {greedy_before:6.1%} -> {greedy_after:6.1%}\n"
        "  sampled {sampled_before:6.1%} -> {sampled_after:6.1%}\n"
        "  tool calls per episode: greedy {calls_greedy_before:.2f} -> {calls_greedy_after:.2f}, "
        "sampled {calls_sampled_before:.2f} -> {calls_sampled_after:.2f}; turns per episode "
        "(greedy) {turns_before:.2f} -> {turns_after:.2f}\n"
        "  training, last 5 steps: {train_turns_per_episode:.2f} turns per episode, tool-call "
        "success {train_tool_ok:.1%}, {train_env_s_per_step:.3f} s per step in the environment\n"
        "  wall: SFT {wall_sft_s} s, GRPO {wall_grpo_s} s; report: {report}".format(
            n=configs["grpo"].eval.n, **result))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/multiturn_demo"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sft-steps", type=int, default=250)
    parser.add_argument("--grpo-steps", type=int, default=80)
    parser.add_argument("--json", action="store_true", help="also print the result as JSON")
    args = parser.parse_args()
    result = run_demo(args.out, seed=args.seed, sft_steps=args.sft_steps,
                      grpo_steps=args.grpo_steps)
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
