"""`psirl demo`: the main job on the built-in task, end to end on a CPU.

1. build a small character-level Qwen2 model (4 layers, hidden 256, about 3.2M parameters) in the
   run folder;
2. SFT it on 2-digit addition just enough for partial accuracy;
3. run GRPO from the SFT checkpoint with the verifier reward (1 if the sum is right);
4. print held-out accuracy (sampled and greedy) before and after RL, and the reports' paths.

Both stages are ordinary `psirl train` runs (their resolved configs are in the run folders), so
`psirl train runs/demo/grpo/config.yaml` repeats the RL stage by hand.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

DEMO_STAGES = ("sft", "grpo", "grpo_shuffled")
TINY = {"arch": "qwen2", "hidden_size": 256, "num_layers": 4, "num_heads": 4, "intermediate_size": 768}


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
        "optim": {"lr": 1e-3, "batch_size": 64, "warmup_steps": 20, "schedule": "constant",
                  "weight_decay": 0.0, "grad_clip": 1.0},
        "eval": {"every": 0, "n": 200, "max_new_tokens": 4},
        "checkpoint": {"every": 0},
    })
    grpo = config_from_dict({
        "loop": "online",
        "output_dir": str(out / "grpo"),
        "seed": seed,
        "max_steps": 6 if quick else 300,
        "device": "cpu",
        "model": {"path": str(out / "sft" / "final")},
        "data": {"task": "addition", "task_kwargs": {"digits": 2}, "n_train": 20000},
        "optim": {"lr": 5e-5, "batch_size": 16, "grad_clip": 1.0},
        "algorithm": {"preset": "grpo", "knobs": {"sampling": {"group_size": 8, "max_new_tokens": 4}}},
        "eval": {"every": 3 if quick else 25, "n": 200, "greedy": True, "sampled": True,
                 "max_new_tokens": 4},
        "checkpoint": {"every": 100},
    })
    return sft, grpo


def _accuracies(run_dir: Path) -> dict:
    """Held-out accuracy at the start, mean of the last three sampled evals, last greedy."""
    from psirl.track.metrics import read_metrics

    evals = [m for m in read_metrics(run_dir) if "eval/accuracy" in m]
    last = evals[-3:]
    return {
        "sampled_before": evals[0]["eval/accuracy"],
        "greedy_before": evals[0].get("eval/accuracy_greedy", float("nan")),
        "sampled_after_last3_mean": sum(m["eval/accuracy"] for m in last) / len(last),
        "greedy_after": evals[-1].get("eval/accuracy_greedy", float("nan")),
    }


def run_demo(output_dir: Path, *, quick: bool = False, control: bool = True, seed: int = 0) -> dict:
    """Run SFT, GRPO, and (with `control`) GRPO on shuffled rewards; print and return accuracies.

    The demo owns ``output_dir/{sft,grpo,grpo_shuffled}``: a previous demo's folders there are
    replaced, so ``make demo`` can be run again (anything else in ``output_dir`` is left alone).
    """
    import shutil

    from psirl.train import run_config
    from psirl.train.config import config_from_dict, config_to_dict

    console = Console()
    for stage in DEMO_STAGES:
        if (Path(output_dir) / stage).exists():
            console.print(f"replacing the previous demo run in {Path(output_dir) / stage}")
            shutil.rmtree(Path(output_dir) / stage)
    sft_cfg, grpo_cfg = demo_configs(output_dir, quick=quick, seed=seed)
    stages = 3 if control else 2
    console.rule(f"[bold]1/{stages}  SFT on 2-digit addition")
    sft_dir = run_config(sft_cfg)
    console.rule(f"[bold]2/{stages}  GRPO with the verifier reward")
    grpo_dir = run_config(grpo_cfg)
    result = {"grpo": _accuracies(grpo_dir), "sft_report": str(sft_dir / "report.html"),
              "grpo_report": str(grpo_dir / "report.html")}
    if control:
        console.rule(f"[bold]3/{stages}  control: GRPO with the rewards shuffled across each batch")
        raw = config_to_dict(grpo_cfg)
        raw["output_dir"] = str(Path(output_dir) / "grpo_shuffled")
        raw["reward"]["shuffle"] = True
        result["shuffled"] = _accuracies(run_config(config_from_dict(raw)))

    lines = ["held-out accuracy, 200 prompts (after = mean of the last 3 sampled evals)"]
    for name, acc in ((k, result[k]) for k in ("grpo", "shuffled") if k in result):
        gain = 100 * (acc["sampled_after_last3_mean"] - acc["sampled_before"])
        lines.append(
            f"  {name:9s} sampled {100 * acc['sampled_before']:5.1f}% -> "
            f"{100 * acc['sampled_after_last3_mean']:5.1f}% ({gain:+.1f} points); "
            f"greedy {100 * acc['greedy_before']:5.1f}% -> {100 * acc['greedy_after']:5.1f}%"
        )
    lines.append(f"report: {result['grpo_report']}")
    console.print("\n".join(lines))
    return result
