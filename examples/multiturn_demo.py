"""Multi-turn RL with a calculator tool on a CPU: SFT cold start on tool use, then GRPO.

The task is the sum of three 3-digit numbers ("426+702+270=" -> "1398"), which a tiny
character-level model cannot do in its head. The calculator environment (psirl/envs/calculator.py)
runs the expression the model writes between "[" and "]" and answers "=VALUE\\n"; the next model
turn is the final answer (reward 1 when it is the sum, else 0; no bonus for calling the tool):

    prompt 426+702+270=   model [426+702+270]   env =1398\\n   model 1398</s>   -> reward 1

1. build a fresh tiny Qwen2 model (2 layers, hidden 128, about 0.46M parameters);
2. SFT it, deliberately briefly (250 steps), on the environment's oracle episodes
   (CalculatorEnv.demonstration: the call, the value, the copied answer; the value's tokens are
   attended but out of the loss) mixed half and half with plain answers without the tool
   (sft.demonstration_share: 0.5), so that it calls the tool in about half of its episodes;
3. GRPO from that checkpoint with the environment in the loop (`env:`), reward = success only;
4. print held-out success (greedy and sampled, 200 problems of the task's held-out split) after
   SFT (= before RL) and after RL, the tool-call rate, the tool-call success rate, turns per
   episode and time spent in the environment.

Both stages are ordinary `psirl train` runs of examples/multiturn_calculator_sft.yaml and
examples/multiturn_calculator.yaml (their resolved configs are in the run folders).

Usage: python examples/multiturn_demo.py [--out runs/multiturn_demo] [--seed 0]
                                          [--sft-steps N] [--grpo-steps N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent
SFT_YAML = EXAMPLES / "multiturn_calculator_sft.yaml"  # the recipe: both stages' configs
GRPO_YAML = EXAMPLES / "multiturn_calculator.yaml"


def demo_configs(out: Path, *, seed: int = 0, sft_steps: int | None = None,
                 grpo_steps: int | None = None, eval_n: int | None = None,
                 eval_every: int | None = None, threads: int = 1) -> dict:
    """{"sft": config, "grpo": config}: the two YAML examples with the run folders under
    `out`, the GRPO run starting from the SFT run's final checkpoint, on the CPU; the other
    arguments override the YAML when given (None: as written there)."""
    from psirl.train.config import load_config

    common = [f"seed={seed}", "device=cpu", f"threads={threads}"]
    if eval_n is not None:
        common.append(f"eval.n={eval_n}")
    sft = [f"output_dir={out / 'sft'}", *common]
    grpo = [f"output_dir={out / 'grpo'}", f"model.path={out / 'sft' / 'final'}", "model.tiny=null",
            *common]
    if sft_steps is not None:
        sft.append(f"max_steps={sft_steps}")
    if grpo_steps is not None:
        grpo.append(f"max_steps={grpo_steps}")
    if eval_every is not None:
        grpo.append(f"eval.every={eval_every}")
    return {"sft": load_config(SFT_YAML, sft), "grpo": load_config(GRPO_YAML, grpo)}


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
    load = os.getloadavg()[0]  # the numbers' wall times depend on it (a shared machine)
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
        "  wall: SFT {wall_sft_s} s, GRPO {wall_grpo_s} s (load average {load:.1f} at the start); "
        "report: {report}".format(n=configs["grpo"].eval.n, load=load, **result))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/multiturn_demo"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sft-steps", type=int, help="default: the SFT YAML's max_steps (250)")
    parser.add_argument("--grpo-steps", type=int, help="default: the GRPO YAML's max_steps (80)")
    parser.add_argument("--json", action="store_true", help="also print the result as JSON")
    args = parser.parse_args()
    result = run_demo(args.out, seed=args.seed, sft_steps=args.sft_steps,
                      grpo_steps=args.grpo_steps)
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
