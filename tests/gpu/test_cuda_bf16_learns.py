"""The demo task in bf16 on CUDA: SFT then GRPO still raise the held-out accuracy.

The demo's configs (psirl/demo.py), moved to cuda / bfloat16, with GRPO shortened to 120 steps.
On the CPU in float32 the demo's GRPO stage goes 67% -> 93% sampled accuracy in 300 steps; here
it must gain at least 5 points (mean of the last 3 sampled evals against the first eval), and SFT
must reach 30% greedy from an untrained model. Pure-bf16 AdamW would fail the GRPO part: at lr
5e-5 most updates are below half a bf16 ulp of the weights (train/precision.py).
"""

from __future__ import annotations

from psirl.demo import _accuracies, demo_configs
from psirl.track.metrics import read_metrics
from psirl.train import run_config


def test_bf16_demo_learns_on_cuda(tmp_path):
    sft, grpo = demo_configs(tmp_path)
    sft = sft.model_copy(update={"device": "cuda", "dtype": "bfloat16",
                                 "eval": sft.eval.model_copy(update={"every": 800})})
    run_config(sft, quiet=True)
    sft_evals = [m for m in read_metrics(tmp_path / "sft") if "eval/accuracy_greedy" in m]
    assert sft_evals[-1]["eval/accuracy_greedy"] >= 0.3, sft_evals[-1]
    grpo = grpo.model_copy(update={"device": "cuda", "dtype": "bfloat16", "max_steps": 120,
                                   "eval": grpo.eval.model_copy(update={"every": 20})})
    run_dir = run_config(grpo, quiet=True)
    acc = _accuracies(run_dir)
    assert acc["sampled_after_last3_mean"] >= acc["sampled_before"] + 0.05, acc
