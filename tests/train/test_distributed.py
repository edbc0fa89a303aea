"""Data parallelism: 2 gloo ranks give exactly the single-process full-batch gradient, and a
2-rank `psirl train` online run writes one set of metrics, keeps the ranks' weights identical and
resumes exactly.

One torchrun launch (tests/train/dist_worker.py) does all the 2-rank work; the references are
computed here, in one process, from the plain full-batch losses.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from dist_worker import CONSTANT, policy_knobs
from safetensors.torch import load_file

from psirl.core.advantages import ADVANTAGE_ESTIMATORS
from psirl.core.aggregate import AGGREGATION_MODES, step_normaliser
from psirl.core.objective import policy_loss
from psirl.models.loading import load_policy
from psirl.models.logprobs import token_logprobs
from psirl.models.tiny import make_tiny_model
from psirl.track.metrics import metrics_differences, read_metrics
from psirl.train import distributed as D
from psirl.train import run_config
from psirl.train.config import config_from_dict
from psirl.train.setup import pad_prompt_completion

WORKER = Path(__file__).with_name("dist_worker.py")
ALPHABET = "0123456789+=\n"
# Example i of the SFT batch: prompt of PROMPT_LENS[i] tokens, completion of COMPLETION_LENS[i].
# Rank 0 gets examples 0-2 (6 completion tokens), rank 1 examples 3-5 (15).
PROMPT_LENS, COMPLETION_LENS = [2, 4, 3, 5, 1, 3], [1, 2, 3, 7, 5, 3]
# Completion lengths of the policy batch: rank 0 rows 0-1 (3 tokens), rank 1 rows 2-4 (9 tokens,
# one empty row).
POLICY_LENS = [1, 2, 5, 0, 4]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_data(tiny_dir: Path) -> dict:
    g = torch.Generator().manual_seed(0)
    model, tokenizer = load_policy(tiny_dir, device="cpu", dtype="float32")
    vocab = [i for i in range(len(tokenizer)) if i != tokenizer.pad_token_id][:12]

    def tokens(n):
        return [vocab[int(k)] for k in torch.randint(0, len(vocab), (n,), generator=g)]

    data = {"sft_prompts": [tokens(n) for n in PROMPT_LENS],
            "sft_completions": [tokens(n) for n in COMPLETION_LENS]}
    b, p, t = len(POLICY_LENS), 3, max(POLICY_LENS)
    ids = torch.full((b, p + t), tokenizer.pad_token_id, dtype=torch.long)
    attn = torch.zeros((b, p + t), dtype=torch.long)
    mask = torch.zeros((b, t))
    for i, n in enumerate(POLICY_LENS):
        np_ = 1 + i % p  # prompt lengths 1, 2, 3, 1, 2 (left-padded to 3)
        ids[i, p - np_:p + n] = torch.tensor(tokens(np_ + n))
        attn[i, p - np_:p + n] = 1
        mask[i, :n] = 1
    with torch.no_grad():
        logp, _ = token_logprobs(model, ids, attn, t)
    data.update(ids=ids, attn=attn, mask=mask,
                old_logp=(logp + 0.3 * torch.randn(b, t, generator=g)) * mask,
                ref_logp=(logp + 0.5 * torch.randn(b, t, generator=g)) * mask,
                adv=torch.randn(b, t, generator=g) * mask,
                token_rewards=torch.randn(b, t, generator=g) * mask)
    return data


def _sft_config(output_dir: Path) -> dict:
    return {"loop": "sft", "output_dir": str(output_dir), "seed": 0, "max_steps": 2,
            "device": "cpu",
            "model": {"tiny": {"hidden_size": 32, "num_layers": 1, "num_heads": 2,
                               "intermediate_size": 64}},
            "data": {"task": "addition", "task_kwargs": {"digits": 1}, "n_train": 32},
            # eps >> the rounding noise of gradients whose exact value is 0 (the k_proj bias:
            # softmax ignores it), which AdamW would otherwise blow up to lr-sized steps.
            "optim": {"lr": 1e-2, "eps": 1e-4, "batch_size": 6, "grad_accum": 2},
            "checkpoint": {"every": 0}}


# Chosen / rejected completions for prompts "a+b=": the right sum vs a wrong one.
PAIRS = [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str((a + b + 3) % 10)}
         for a, b in [(1, 2), (3, 4), (2, 2), (5, 1), (0, 7), (4, 4), (6, 2), (1, 1)]]


def _preference_config(loss: str, output_dir: Path, tiny_dir: Path, pairs: Path) -> dict:
    return {"loop": "preference", "output_dir": str(output_dir), "seed": 0, "max_steps": 2,
            "device": "cpu", "model": {"path": str(tiny_dir)},
            "data": {"train_path": str(pairs)},
            # eps: see _sft_config. 6 pairs a step, 3 per rank, in 2 micro-batches each.
            "optim": {"lr": 1e-2, "eps": 1e-4, "batch_size": 6, "grad_accum": 2},
            "preference": {"loss": loss, "beta": 0.5},
            "checkpoint": {"every": 0}}


def torchrun_2(*args: str) -> list[str]:
    """``python -m torch.distributed.run`` with 2 local processes on a free port, then args."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node",
            "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *args]


def torchrun_env() -> dict[str, str]:
    """This process's environment without its own rank variables, 1 thread per rank, gloo on
    the loopback interface."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    return env


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Launch the 2-rank worker once; return (data, tiny_dir, run_dir, [rank0, rank1] results)."""
    root = tmp_path_factory.mktemp("dp")
    tiny_dir = make_tiny_model(root / "tiny", hidden_size=32, num_layers=1, num_heads=2,
                               intermediate_size=64, alphabet=ALPHABET, seed=0)
    data = _make_data(tiny_dir)
    torch.save(data, root / "data.pt")
    run_dir = root / "run"
    cfg = {
        "loop": "online", "output_dir": str(run_dir), "seed": 0, "max_steps": 2, "device": "cpu",
        "model": {"path": str(tiny_dir)},
        "data": {"task": "addition", "task_kwargs": {"digits": 1}, "n_train": 200},
        "algorithm": {"preset": "grpo",
                      "knobs": {"sampling": {"group_size": 4, "max_new_tokens": 3}}},
        "reward": {"kind": "format", "pattern": "^1"},
        "optim": {"lr": 1e-2, "batch_size": 4},
        "eval": {"every": 2, "n": 8, "max_new_tokens": 3},
        "checkpoint": {"every": 1},
    }
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    (root / "sft.yaml").write_text(yaml.safe_dump(_sft_config(root / "sft_2ranks")))
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    for loss in ("dpo", "kto"):
        (root / f"{loss}.yaml").write_text(yaml.safe_dump(
            _preference_config(loss, root / f"{loss}_2ranks", tiny_dir, pairs)))
    cmd = torchrun_2(str(WORKER), str(root / "data.pt"), str(tiny_dir), str(root / "cfg.yaml"),
                     str(root))
    proc = subprocess.run(cmd, env=torchrun_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return data, tiny_dir, run_dir, results


def _assert_grads_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=0, atol=1e-6, msg=name)


def test_sft_gradient_of_two_ranks_is_the_full_batch_gradient(two_ranks):
    data, tiny_dir, _, results = two_ranks
    model, tokenizer = load_policy(tiny_dir, device="cpu", dtype="float32")
    ids, attn, cmask = pad_prompt_completion(data["sft_prompts"], data["sft_completions"],
                                             tokenizer.pad_token_id)
    logp, _ = token_logprobs(model, ids, attn, cmask.shape[1])
    n_tokens = sum(COMPLETION_LENS)
    (-(logp * cmask).sum() / n_tokens).backward()
    want = {n: p.grad for n, p in model.named_parameters()}
    for rank in range(2):
        _assert_grads_equal(results[rank]["sft"], want)
        assert results[rank]["sft_metrics"]["tokens"] == n_tokens  # 21, not a rank's 6 or 15


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_policy_loss_gradient_of_two_ranks_is_the_full_batch_gradient(two_ranks, mode):
    data, tiny_dir, _, results = two_ranks
    model, _ = load_policy(tiny_dir, device="cpu", dtype="float32")
    model.train()
    knobs = policy_knobs(mode)
    normaliser = step_normaliser(data["mask"], mode, knobs.constant_normaliser)
    # 12 tokens; 4 non-empty sequences (constant: 4 * C).
    assert normaliser == {"token_mean": 12.0, "constant": 4 * CONSTANT}.get(mode, 4.0)
    logp, entropy = token_logprobs(model, data["ids"], data["attn"], data["mask"].shape[1],
                                   with_entropy=True)
    loss, _ = policy_loss(logp, data["old_logp"], data["adv"], data["mask"], knobs, normaliser,
                          ref_logp=data["ref_logp"], entropy=entropy)
    loss.backward()
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for rank in range(2):
        assert results[rank][f"normaliser/{mode}"] == normaliser
        _assert_grads_equal(results[rank][f"policy/{mode}"], want)


@pytest.mark.parametrize("estimator", D.BATCH_ESTIMATORS)
def test_batch_estimators_use_the_global_batch_statistics(two_ranks, estimator):
    data, _, _, results = two_ranks
    b = data["mask"].shape[0]
    want_adv, want_ret = ADVANTAGE_ESTIMATORS[estimator](
        data["token_rewards"], data["mask"], torch.arange(b), None, gamma=0.9)
    got_adv = torch.cat([results[r][f"adv/{estimator}"][0] for r in range(2)])
    got_ret = torch.cat([results[r][f"adv/{estimator}"][1] for r in range(2)])
    torch.testing.assert_close(got_adv, want_adv, rtol=0, atol=1e-6)
    torch.testing.assert_close(got_ret, want_ret, rtol=0, atol=1e-6)
    # Per-rank statistics would give a different answer: the check above has teeth.
    rank0 = ADVANTAGE_ESTIMATORS[estimator](data["token_rewards"][:2], data["mask"][:2],
                                            torch.arange(2), None, gamma=0.9)[0]
    assert not torch.allclose(rank0, want_adv[:2], atol=1e-3)


def test_gradient_reduction_keeps_none_and_metrics_are_global(two_ranks):
    *_, results = two_ranks
    for rank in range(2):
        a_grad, b_grad = results[rank]["partial_grad"]
        assert a_grad.tolist() == [1.0, 2.0, 3.0] and b_grad is None
        m = results[rank]["metrics"]
        # Rewards [0, 1] on rank 0 and [1, 1, 1] on rank 1: the union [0, 1, 1, 1, 1].
        assert m["reward/mean"] == pytest.approx(0.8, abs=1e-12)
        assert m["reward/std"] == pytest.approx(math.sqrt(0.2), abs=1e-12)
        assert (m["loss/total"], m["ratio/max"], m["ratio/min"], m["grad_norm"]) == (3.0, 1.5, 0.7, 3.0)
        assert (m["loss/kl"], m["sampling/samples"]) == (0.5, 5.0)
        assert m["entropy/mean"] == pytest.approx((10 * 1.0 + 30 * 2.0) / 40, abs=1e-12)
        # Equal stds on both ranks are pooled all the same: sqrt((1 + 2) * 0.25 / 4).
        assert m["x/std"] == pytest.approx(math.sqrt(0.75 / 4), abs=1e-12)
        assert results[rank]["gathered"] == [[0.0, 10.0], [1.0, 11.0]]


def test_two_rank_online_run_logs_once_and_keeps_ranks_identical(two_ranks):
    *_, run_dir, results = two_ranks
    # The run was resumed from step 2 to 3: rank 0 alone wrote one line per step (eval at 0, 2, 3).
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 4
    for record in records[1:]:
        for key in ("reward/mean", "reward/std", "loss/total", "grad_norm", "entropy/mean",
                    "task/accuracy", "ratio/max"):
            assert math.isfinite(record[key]), (key, record)
    assert [("eval/accuracy_greedy" in r) for r in records] == [True, False, True, True]
    assert (run_dir / "final" / "config.json").is_file() and (run_dir / "report.html").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000002",
                                                                         "step-00000003"]
    # Both ranks hold the same weights after every run...
    for key in ("digests_2", "digests_resumed", "digests_uninterrupted"):
        assert results[0][key] == results[1][key] and results[0][key][0] == results[0][key][1]
    assert results[0]["digests_2"] != results[0]["digests_resumed"]  # (step 3 changed them)
    # ...and resuming at step 2 continues exactly as the uninterrupted 3-step run.
    assert results[0]["digests_resumed"] == results[0]["digests_uninterrupted"]
    assert metrics_differences(run_dir, run_dir.with_name("run_uninterrupted")) == []


def test_two_rank_sft_run_matches_one_process(two_ranks, tmp_path):
    """Each rank trains on 3 of the step's 6 examples; the weights after 2 AdamW steps equal a
    single-process run's (up to float rounding of the gradient sum's order)."""
    *_, run_dir, _ = two_ranks
    dp_dir = run_dir.with_name("sft_2ranks")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one_dir = run_config(config_from_dict(_sft_config(tmp_path / "sft_1rank")), quiet=True)
    finally:
        torch.set_num_threads(before)
    dp, one = read_metrics(dp_dir), read_metrics(one_dir)
    assert [r["step"] for r in dp] == [1, 2]
    for a, b in zip(dp, one, strict=True):
        assert a["tokens"] == b["tokens"]  # the global token count of the step
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    got, want = load_file(str(dp_dir / "final" / "model.safetensors")), load_file(
        str(one_dir / "final" / "model.safetensors"))
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)
    assert any(not torch.equal(want[k], load_file(str(one_dir / "init_model" / "model.safetensors"))[k])
               for k in want)


@pytest.mark.parametrize("loss", ["dpo", "kto"])
def test_two_rank_preference_run_matches_one_process(two_ranks, tmp_path, loss):
    """Each rank takes 3 of the step's 6 pairs (KTO: its reference point z0 still comes from all
    6 mismatched pairs); metrics and the weights after 2 AdamW steps equal one process's."""
    _, tiny_dir, run_dir, _ = two_ranks
    dp_dir = run_dir.with_name(f"{loss}_2ranks")
    cfg = _preference_config(loss, tmp_path / "one", tiny_dir, run_dir.with_name("pairs.jsonl"))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one_dir = run_config(config_from_dict(cfg), quiet=True)
    finally:
        torch.set_num_threads(before)
    dp, one = read_metrics(dp_dir), read_metrics(one_dir)
    assert [r["step"] for r in dp] == [1, 2]
    for a, b in zip(dp, one, strict=True):
        keys = ("loss", "kto/z0", "rewards/desirable") if loss == "kto" else (
            "loss", "rewards/margin", "rewards/accuracy", "logps/chosen")
        for key in keys:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
        if loss == "dpo":
            assert a["pairs"] == b["pairs"] == 6.0
    got = load_file(str(dp_dir / "final" / "model.safetensors"))
    want = load_file(str(one_dir / "final" / "model.safetensors"))
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)
    initial = load_file(str(tiny_dir / "model.safetensors"))
    assert any(not torch.equal(want[k], initial[k]) for k in want)


def test_helpers_are_identities_with_one_process():
    mask = torch.tensor([[1.0, 1, 0], [0, 0, 0], [1, 0, 0]])
    assert D.world() == (0, 1) and D.is_main()
    assert D.init_distributed("cpu") == (0, 1)  # not launched: no process group
    assert D.all_reduce_sum(3.5) == 3.5
    assert D.global_step_normaliser(mask, "seq_mean_token_mean") == 2.0
    assert D.global_step_normaliser(mask, "constant", 4.0) == 8.0
    assert D.reduce_metrics({"a": 1.0}, weight=3.0) == {"a": 1.0}
    # Contiguous shards that partition the batch in order; sizes differ by at most one.
    assert [list(D.shard_indices(5, r, 2)) for r in range(2)] == [[0, 1], [2, 3, 4]]
    assert [list(D.shard_indices(2, r, 3)) for r in range(3)] == [[], [0], [1]]
    with pytest.raises(ValueError, match="rank 2"):
        D.shard_indices(4, 2, 2)
