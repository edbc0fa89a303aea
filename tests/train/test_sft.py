"""The SFT loop end to end: it learns the addition task, its saved policy loads with plain
transformers, its LR schedule and micro-batching are exact, and gradient accumulation changes
memory only (the normaliser is computed once per step; DESIGN.md, core/aggregate.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from psirl.track.metrics import read_metrics
from psirl.train.base import (
    build_scheduler,
    list_checkpoints,
    lr_multiplier,
    split_microbatches,
    step_generator,
)
from psirl.train.config import config_from_dict
from psirl.train.sft import build_sft, epoch_batch_indices, train

TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64}


def sft_config(output_dir, **sections):
    """A small SFT config on 1-digit addition; `sections` replace whole top-level keys."""
    raw = {
        "loop": "sft",
        "output_dir": str(output_dir),
        "seed": 0,
        "max_steps": 4,
        "device": "cpu",
        "model": {"tiny": TINY},
        "data": {"task": "addition", "task_kwargs": {"digits": 1}, "n_train": 64},
        "optim": {"lr": 1e-3, "batch_size": 8},
        "checkpoint": {"every": 0},
    }
    raw.update(sections)
    return config_from_dict(raw)


@pytest.fixture
def one_thread():
    """Single-threaded torch: the runs are tiny, and two cores are shared with other work."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- learning


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """200 SFT steps on 1-digit addition (~10 s on 2 busy cores). Measured greedy held-out
    accuracy at step 200 for seeds 0..3: 0.98, 0.79, 0.82, 0.92 (untrained: 0.0)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = sft_config(
            tmp_path_factory.mktemp("sft") / "run",
            max_steps=200,
            model={"tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 4,
                            "intermediate_size": 128}},
            data={"task": "addition", "task_kwargs": {"digits": 1}, "n_train": 2000},
            optim={"lr": 5e-3, "batch_size": 32, "warmup_steps": 10, "schedule": "cosine"},
            checkpoint={"every": 0},
            eval={"every": 100, "n": 100, "max_new_tokens": 4},
        )
        run_dir = train(cfg, quiet=True)
    finally:
        torch.set_num_threads(before)
    return run_dir


def test_sft_raises_held_out_accuracy_far_above_chance(trained_run):
    records = read_metrics(trained_run)
    evals = {r["step"]: r["eval/accuracy_greedy"] for r in records if "eval/accuracy_greedy" in r}
    assert sorted(evals) == [0, 100, 200]
    # Chance: 19 possible sums 0..18, so guessing scores ~0.05; the untrained model scores ~0.
    assert evals[0] <= 0.05
    assert evals[200] >= 0.5, evals
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 200
    assert sum(losses[-20:]) / 20 < 0.5 * sum(losses[:20]) / 20
    # Held-out prompts never appear in training (tasks.py: crc32 split), so this is generalisation.
    assert (trained_run / "report.html").is_file()


def test_final_policy_loads_with_plain_transformers_and_gives_the_same_logits(trained_run):
    """final/ (save_pretrained) vs the last checkpoint (save_model of the in-memory module):
    two independent writers of the trained weights must agree bitwise."""
    from safetensors.torch import load_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = AutoModelForCausalLM.from_pretrained(trained_run / "final").eval()
    tokenizer = AutoTokenizer.from_pretrained(trained_run / "final")
    ids = tokenizer(["3+4=", "9+9="], add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert ids.shape == (2, 4)  # one token per character

    trained = AutoModelForCausalLM.from_pretrained(trained_run / "init_model").eval()
    init_logits = trained(ids).logits
    (last,) = list_checkpoints(trained_run)[-1:]
    assert last.name == "step-00000200"
    load_model(trained, str(last / "policy.safetensors"))
    with torch.no_grad():
        want = trained(ids).logits
        got = final(ids).logits
    assert torch.equal(got, want)
    assert not torch.allclose(init_logits, want)  # training did change the model
    # and it answers: greedy next tokens after "3+4=" and "9+9=" are the sums' first digits
    assert tokenizer.decode(got[:, -1].argmax(-1)) == "71"


# --------------------------------------------------------------------------- LR schedule


def test_lr_multiplier_exact_values():
    w = dict(warmup_steps=2, total_steps=10)
    # warm-up (step+1)/warmup, shared by every schedule
    for schedule in ("constant", "linear", "cosine"):
        assert lr_multiplier(0, schedule=schedule, **w) == 0.5
        assert lr_multiplier(1, schedule=schedule, **w) == 1.0
    assert [lr_multiplier(s, schedule="constant", **w) for s in (2, 5, 9, 10)] == [1.0] * 4
    # linear: 1 - (step - 2) / 8
    assert [lr_multiplier(s, schedule="linear", **w) for s in (2, 4, 6, 9, 10, 12)] == [
        1.0, 0.75, 0.5, 0.125, 0.0, 0.0]
    # cosine: (1 + cos(pi * (step - 2) / 8)) / 2
    cos = [lr_multiplier(s, schedule="cosine", **w) for s in (2, 4, 6, 8, 10)]
    assert cos == pytest.approx([1.0, 0.5 + math.sqrt(2) / 4, 0.5, 0.5 - math.sqrt(2) / 4, 0.0],
                                abs=1e-15)
    # no warm-up: step 0 is the full LR
    assert lr_multiplier(0, warmup_steps=0, total_steps=4, schedule="linear") == 1.0
    assert lr_multiplier(3, warmup_steps=0, total_steps=4, schedule="linear") == 0.25
    with pytest.raises(ValueError, match="optim.schedule"):
        lr_multiplier(3, warmup_steps=0, total_steps=4, schedule="step")


def test_scheduler_applies_the_multiplier_to_the_optimiser(tmp_path):
    cfg = sft_config(tmp_path, optim={"lr": 0.01, "warmup_steps": 2, "schedule": "linear"})
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=cfg.optim.lr)
    sched = build_scheduler(opt, cfg.optim, total_steps=6)
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.005, 0.01, 0.01, 0.0075, 0.005, 0.0025], rel=1e-12)


def test_split_microbatches():
    assert split_microbatches(10, 4) == [slice(0, 2), slice(2, 5), slice(5, 8), slice(8, 10)]
    assert split_microbatches(8, 4) == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    assert split_microbatches(3, 5) == [slice(0, 1), slice(1, 2), slice(2, 3)]  # never empty
    assert split_microbatches(7, 1) == [slice(0, 7)]
    assert split_microbatches(5, 0) == [slice(0, 5)]
    assert split_microbatches(0, 3) == []
    for n in range(1, 30):
        for k in range(1, 9):
            parts = split_microbatches(n, k)
            assert len(parts) == min(n, k)
            assert [i for s in parts for i in range(n)[s]] == list(range(n))
            sizes = [s.stop - s.start for s in parts]
            assert max(sizes) - min(sizes) <= 1


def test_epoch_batch_indices_cover_each_epoch_once():
    n, b = 10, 4
    seen = [i for step in range(5) for i in epoch_batch_indices(n, b, step, seed=1)]  # 2 epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert seen[:10] != seen[10:20]  # a fresh permutation per epoch
    assert epoch_batch_indices(n, b, 3, seed=1) == seen[12:16]  # a function of (n, b, step, seed)
    assert epoch_batch_indices(n, b, 3, seed=2) != seen[12:16]


# --------------------------------------------------------------------------- micro-batches


def _one_step_grads(cfg, run_dir):
    """(flat gradient, loss metrics, flat params after) of step 0 of a freshly built SFT loop."""
    spec = build_sft(cfg, run_dir)
    model, opt = spec.models["policy"], spec.optimizers["policy"]
    captured = {}

    def capture_grads(optimizer, args, kwargs):  # noqa: ARG001 - the hook's signature
        captured["grad"] = torch.cat([p.grad.flatten() for p in model.parameters()]).clone()

    opt.register_step_pre_hook(capture_grads)
    metrics = spec.step(0, step_generator(cfg.seed, 0))
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    return captured["grad"], metrics, after


def test_gradient_accumulation_gives_the_full_batch_update(tmp_path, one_thread):
    """grad_accum=4 splits the step into 4 micro-batches of different padded lengths (2-digit
    prompts are 4..6 tokens); the summed micro-batch gradients equal the full-batch gradient
    because every micro-batch divides by the step's token count, not its own."""
    base = dict(
        data={"task": "addition", "task_kwargs": {"digits": 2}, "n_train": 64},
        max_steps=3,
    )
    results = {}
    for accum in (1, 4):
        cfg = sft_config(tmp_path / f"accum{accum}", **base,
                         optim={"lr": 1e-4, "batch_size": 8, "grad_accum": accum,
                                "grad_clip": None})
        results[accum] = _one_step_grads(cfg, tmp_path / f"accum{accum}")
    (g1, m1, p1), (g4, m4, p4) = results[1], results[4]
    assert m1["tokens"] == m4["tokens"]
    assert m4["loss"] == pytest.approx(m1["loss"], rel=1e-6)
    assert m4["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-6)
    assert torch.allclose(g4, g1, rtol=1e-5, atol=1e-7)  # measured: max |diff| 3e-8, max |g| 0.3
    # Adam's first step moves every coordinate with a non-zero gradient by ~lr = 1e-4; the two
    # updates agree to float32 noise (measured 4e-8).
    assert (p4 - p1).abs().max() < 1e-6
    # and the normaliser really is per step: the loss is the batch's token-mean NLL, not a sum
    # of 4 micro-batch means (that would be ~4x larger on an untrained model, ~log V each)
    assert m1["loss"] == pytest.approx(math.log(260), rel=0.1)


# --------------------------------------------------------------------------- from files


def test_sft_from_a_jsonl_file_with_plain_and_chat_records(tmp_path, one_thread):
    """data.train_path: plain {prompt, completion} and {messages} records; the logged LR is the
    one each step used (warm-up 2, linear decay over 4 steps)."""
    path = tmp_path / "train.jsonl"
    rows = [
        {"prompt": "1+2=", "completion": "3"},
        {"prompt": "4+4=", "completion": "8"},
        {"messages": [{"role": "user", "content": "2+5="},
                      {"role": "assistant", "content": "7"}]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = sft_config(tmp_path / "run", data={"train_path": str(path)},
                     optim={"lr": 1e-3, "batch_size": 3, "warmup_steps": 2, "schedule": "linear"})
    run_dir = train(cfg, quiet=True)
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["lr/policy"] for r in records] == pytest.approx([5e-4, 1e-3, 1e-3, 5e-4], rel=1e-12)
    # tokens per step: "3</s>", "8</s>" and the chat completion "7\n</s>" (template ends turns
    # with a newline) = 2 + 2 + 3
    assert [r["tokens"] for r in records] == [7.0] * 4
    assert (run_dir / "final" / "model.safetensors").is_file()
