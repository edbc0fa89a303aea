"""`psirl demo`: the main job on the built-in task, end to end on a CPU.

1. build a tiny character-level Qwen2 model (about 0.4M parameters) in the run folder;
2. SFT it on 2-digit addition just enough for partial accuracy;
3. run GRPO from the SFT checkpoint with the verifier reward (1 if the sum is right);
4. print held-out accuracy (sampled and greedy) before and after RL, and the reports' paths.

Both stages are ordinary `psirl train` runs (their resolved configs are in the run folders), so
`psirl train runs/demo/grpo/config.yaml` repeats the RL stage by hand.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

TINY = {"arch": "qwen2", "hidden_size": 128, "num_layers": 2, "num_heads": 4, "intermediate_size": 384}


def demo_configs(output_dir: Path, *, quick: bool = False, seed: int = 0):
    """The (sft, grpo) configs the demo runs; `quick` shrinks both to a smoke test."""
    from psirl.train.config import config_from_dict

    out = Path(output_dir)
    sft = config_from_dict({
        "loop": "sft",
        "output_dir": str(out / "sft"),
        "seed": seed,
        "max_steps": 30 if quick else 800,
        "device": "cpu",
        "model": {"tiny": TINY},
        "data": {"task": "addition", "task_kwargs": {"digits": 2}, "n_train": 20000},
        "optim": {"lr": 2e-3, "batch_size": 64, "warmup_steps": 20, "schedule": "constant",
                  "weight_decay": 0.0, "grad_clip": 1.0},
        "eval": {"every": 0, "n": 200, "max_new_tokens": 4},
        "checkpoint": {"every": 0},
    })
    grpo = config_from_dict({
        "loop": "online",
        "output_dir": str(out / "grpo"),
        "seed": seed,
        "max_steps": 6 if quick else 500,
        "device": "cpu",
        "model": {"path": str(out / "sft" / "final")},
        "data": {"task": "addition", "task_kwargs": {"digits": 2}, "n_train": 20000},
        "optim": {"lr": 3e-4, "batch_size": 32, "grad_clip": 1.0},
        "algorithm": {"preset": "grpo", "knobs": {"sampling": {"group_size": 8, "max_new_tokens": 4}}},
        "eval": {"every": 3 if quick else 25, "n": 200, "greedy": True, "sampled": True,
                 "max_new_tokens": 4},
        "checkpoint": {"every": 100},
    })
    return sft, grpo


def run_demo(output_dir: Path, *, quick: bool = False, seed: int = 0) -> dict:
    """Run SFT then GRPO; print and return the before/after accuracies."""
    from psirl.track.metrics import read_metrics
    from psirl.train import run_config

    console = Console()
    sft_cfg, grpo_cfg = demo_configs(output_dir, quick=quick, seed=seed)
    console.rule("[bold]1/2  SFT on 2-digit addition")
    sft_dir = run_config(sft_cfg)
    console.rule("[bold]2/2  GRPO with the verifier reward")
    grpo_dir = run_config(grpo_cfg)

    evals = [m for m in read_metrics(grpo_dir) if "eval/accuracy" in m]
    start, last = evals[0], evals[-3:]
    result = {
        "sampled_before": start["eval/accuracy"],
        "greedy_before": start.get("eval/accuracy_greedy"),
        "sampled_after_last3_mean": sum(m["eval/accuracy"] for m in last) / len(last),
        "greedy_after": evals[-1].get("eval/accuracy_greedy"),
        "sft_report": str(sft_dir / "report.html"),
        "grpo_report": str(grpo_dir / "report.html"),
    }
    gain = 100 * (result["sampled_after_last3_mean"] - result["sampled_before"])
    console.print(
        f"held-out accuracy (200 prompts)\n"
        f"  sampled: {100 * result['sampled_before']:.1f}% -> "
        f"{100 * result['sampled_after_last3_mean']:.1f}% (mean of the last 3 evals; {gain:+.1f} points)\n"
        f"  greedy:  {100 * (result['greedy_before'] or 0):.1f}% -> {100 * (result['greedy_after'] or 0):.1f}%\n"
        f"report: {result['grpo_report']}"
    )
    return result
