"""FSDP2 (distributed.strategy: fsdp): 2 gloo ranks with the model sharded per decoder layer take
exactly the single-process optimiser step, sample with current weights, and write sharded
checkpoints that resume at another world size.

One torchrun launch (tests/train/fsdp_worker.py) does all the 2-rank work; the references are
computed here, in one process, from the plain full-batch losses.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from dist_worker import policy_knobs
from fsdp_worker import GRAD_CLIP, LORA, OPTIM
from safetensors.torch import load_file
from test_distributed import ALPHABET, _make_data, torchrun_2, torchrun_env

from psirl.core.aggregate import AGGREGATION_MODES, step_normaliser
from psirl.core.objective import policy_loss
from psirl.models.loading import load_policy
from psirl.models.logprobs import token_logprobs
from psirl.models.tiny import make_tiny_model
from psirl.rollout.batch import SamplingParams
from psirl.rollout.hf_engine import HFEngine
from psirl.track.metrics import metrics_differences, read_metrics
from psirl.train import run_config
from psirl.train.base import build_optimizer, clip_and_step
from psirl.train.config import config_from_dict, load_run_config

WORKER = Path(__file__).with_name("fsdp_worker.py")


def _sft_config(output_dir: Path) -> dict:
    return {"loop": "sft", "output_dir": str(output_dir), "seed": 0, "max_steps": 2,
            "device": "cpu",
            "model": {"tiny": {"hidden_size": 32, "num_layers": 2, "num_heads": 2,
                               "intermediate_size": 64}},
            "data": {"task": "addition", "task_kwargs": {"digits": 1}, "n_train": 32},
            "optim": {"lr": 1e-2, "eps": 1e-4, "batch_size": 6, "grad_accum": 2},
            "eval": {"every": 0},
            "checkpoint": {"every": 1},
            "distributed": {"strategy": "fsdp"}}


def _grpo_config(output_dir: Path, tiny_dir: Path) -> dict:
    return {"loop": "online", "output_dir": str(output_dir), "seed": 0, "max_steps": 2,
            "device": "cpu", "model": {"path": str(tiny_dir)},
            "data": {"task": "addition", "task_kwargs": {"digits": 1}, "n_train": 200},
            "algorithm": {"preset": "grpo",
                          "knobs": {"sampling": {"group_size": 4, "max_new_tokens": 3},
                                    "kl_control": {"ref_reset_every": 3}}},
            "reward": {"kind": "format", "pattern": "^1"},
            # 2 minibatches of 8 rows drawn over both ranks' rows, 4 passes each: a rank holding
            # fewer than 4 rows of a minibatch pads with weight-0 passes (FSDP needs equal passes).
            "optim": {"lr": 1e-2, "batch_size": 4, "grad_accum": 4},
            "eval": {"every": 2, "n": 4, "max_new_tokens": 3},
            "checkpoint": {"every": 1},
            "distributed": {"strategy": "fsdp"}}


def _dapo_config(output_dir: Path, tiny_dir: Path) -> dict:
    """DAPO (dynamic sampling): a reward that about a third of the tiny model's samples meet
    (first character 0-4 of ALPHABET), so some groups have no signal and are replaced by
    refills."""
    config = _grpo_config(output_dir, tiny_dir)
    config["algorithm"] = {"preset": "dapo",
                           "knobs": {"sampling": {"group_size": 4, "max_new_tokens": 3,
                                                  "max_resample_rounds": 2}}}
    config["reward"] = {"kind": "format", "pattern": "^[0-4]"}  # 5 of the 13 characters
    config["optim"] = {"lr": 1e-2, "batch_size": 6, "grad_accum": 2}
    config["max_steps"] = 3
    config["checkpoint"] = {"every": 0}
    return config


@pytest.fixture(scope="module")
def fsdp_ranks(tmp_path_factory):
    """Launch the 2-rank worker once; return (root, data, tiny_dir, rank 0's results)."""
    root = tmp_path_factory.mktemp("fsdp")
    tiny_dir = make_tiny_model(root / "tiny", hidden_size=32, num_layers=2, num_heads=2,
                               intermediate_size=64, alphabet=ALPHABET, seed=0)
    data = _make_data(tiny_dir)
    torch.save(data, root / "data.pt")
    (root / "sft.yaml").write_text(yaml.safe_dump(_sft_config(root / "sft")))
    (root / "grpo.yaml").write_text(yaml.safe_dump(_grpo_config(root / "grpo", tiny_dir)))
    (root / "dapo.yaml").write_text(yaml.safe_dump(_dapo_config(root / "dapo", tiny_dir)))
    proc = subprocess.run(torchrun_2(str(WORKER), str(root)), env=torchrun_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return root, data, tiny_dir, torch.load(root / "fsdp_rank0.pt", weights_only=False)


def _one_process_step(data: dict, tiny_dir: Path, mode: str, *, lora: bool = False):
    """(initial parameters, gradients, grad norm, parameters after one clipped AdamW step) of
    the plain full-batch update."""
    model, _ = load_policy(tiny_dir, device="cpu", dtype="float32")
    if lora:
        from psirl.models.lora import apply_lora

        torch.manual_seed(0)
        model = apply_lora(model, **LORA)
    model.train()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, OPTIM)
    knobs = policy_knobs(mode)
    normaliser = step_normaliser(data["mask"], mode, knobs.constant_normaliser)
    logp, entropy = token_logprobs(model, data["ids"], data["attn"], data["mask"].shape[1],
                                   with_entropy=True)
    loss, _ = policy_loss(logp, data["old_logp"], data["adv"], data["mask"], knobs, normaliser,
                          ref_logp=data["ref_logp"], entropy=entropy)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    grad_norm = clip_and_step(params, optimizer, None, GRAD_CLIP)
    assert grad_norm > GRAD_CLIP  # the clip is active
    return initial, grads, grad_norm, {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_same_parameters(got: dict, want: dict, atol: float = 1e-6) -> None:
    assert got.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("mode", [*AGGREGATION_MODES, "ac", "lora"])
def test_one_sharded_step_equals_the_single_process_step(fsdp_ranks, mode):
    """Each rank backpropagates its rows (3 and 9 completion tokens) with the global normaliser;
    FSDP's reduce-scatter sums the shards' gradients (not its default mean), the clip uses the
    global norm, and AdamW updates each shard: the full parameters equal one process's step."""
    _, data, tiny_dir, results = fsdp_ranks
    loss_mode = {"ac": "token_mean", "lora": "seq_mean_token_mean"}.get(mode, mode)
    initial, grads, grad_norm, want = _one_process_step(data, tiny_dir, loss_mode,
                                                        lora=mode == "lora")
    got = results[f"step/{mode}"]
    _assert_same_parameters(got["grads"], grads)  # summed, not FSDP's default mean
    assert got["grad_norm"] == pytest.approx(grad_norm, rel=1e-6)
    _assert_same_parameters(got["params"], want)
    changed = [n for n in want if not torch.equal(want[n], initial[n])]
    assert changed  # the step moved the weights (LoRA: only the adapters)
    if mode == "lora":
        assert all("lora_" in n for n in changed)


def test_bf16_mixed_precision_step_follows_the_float32_step(fsdp_ranks):
    """bf16 layers with float32 reduction approximate the float32 step: the update directions
    agree (cosine > 0.95) without being identical."""
    _, data, tiny_dir, results = fsdp_ranks
    initial, _, _, want = _one_process_step(data, tiny_dir, "token_mean")
    got = results["step/bf16"]["params"]
    d_want = torch.cat([(want[n] - initial[n]).flatten() for n in want])
    d_got = torch.cat([(got[n] - initial[n]).flatten() for n in want])
    cosine = float(torch.nn.functional.cosine_similarity(d_want, d_got, dim=0))
    assert 0.95 < cosine and not torch.equal(d_want, d_got), cosine


def test_sharded_critic_reference_and_sampling_match_one_process(fsdp_ranks):
    _, data, tiny_dir, results = fsdp_ranks
    from psirl.models.value import ValueModel

    policy, tokenizer = load_policy(tiny_dir, device="cpu", dtype="float32")
    mask, t = data["mask"], data["mask"].shape[1]
    # The critic's gradient: summed over ranks, each divided by the global token count.
    value = ValueModel.from_policy(policy)
    torch.nn.init.normal_(value.head.weight, std=0.1, generator=torch.Generator().manual_seed(1))
    values = value.values(data["ids"], data["attn"], t)
    ((values ** 2) * mask).sum().div(mask.sum()).backward()
    want = {n: p.grad for n, p in value.named_parameters()}
    _assert_same_parameters(results["value_grads"], want)
    # bf16 layers, float32 value head: close to the float32 values, not equal.
    with torch.no_grad():
        first = value.values(data["ids"][:2], data["attn"][:2], t)
    assert results["values_bf16"].dtype == torch.float32
    torch.testing.assert_close(results["values_bf16"], first, rtol=0.05, atol=0.05)
    assert not torch.equal(results["values_bf16"], first)
    # The sharded reference's log-probs (no gradients) equal the plain model's.
    with torch.no_grad():
        ref_logp = token_logprobs(policy, data["ids"], data["attn"], t)[0]
    torch.testing.assert_close(results["ref_logp"] * mask, ref_logp * mask, rtol=0, atol=1e-5)
    # full_tensors yields every parameter and buffer, gathered, under the plain model's names.
    plain = dict([*policy.named_parameters(), *policy.named_buffers()])
    assert results["full_tensors"].keys() == plain.keys()
    for name, tensor in plain.items():
        assert torch.equal(results["full_tensors"][name], tensor.detach()), name
    # Sampling through the sharded model = sampling through the plain one (same seed).
    engine = HFEngine(policy, tokenizer)
    for prompts, completions, logp in results["sampled_all"]:
        batch = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=4, n=2,
                                                        seed=7))
        assert batch.completions == completions
        torch.testing.assert_close(logp, batch.behaviour_logprobs, rtol=0, atol=1e-5)
    assert len(results["sampled_all"][1][1]) == 4  # rank 1 sampled 2 prompts x 2, rank 0 1 x 2


def test_sharded_sft_run_matches_one_process_and_resumes_at_one_and_two_ranks(fsdp_ranks):
    """SFT with 2 sharded ranks = one process; a 1-step checkpoint written by the 2 ranks
    (DCP shards, no rank holding the model) resumes with 2 ranks and with 1 process to the same
    metrics and weights as the uninterrupted run; final/ is a plain save_pretrained folder."""
    root, *_ = fsdp_ranks
    sharded = root / "sft"
    step1 = sharded / "checkpoints" / "step-00000001"
    assert (step1 / "dcp" / ".metadata").is_file()
    assert sorted(p.name for p in (step1 / "dcp").glob("*.distcp")) == ["__0_0.distcp",
                                                                      "__1_0.distcp"]
    assert json.loads((step1 / "state.json").read_text())["format"] == "dcp"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = _sft_config(root / "sft_1process")
        cfg["distributed"] = {"strategy": "ddp"}
        one = run_config(config_from_dict(cfg), quiet=True)
        resumed_1 = root / "sft_resumed_1rank"
        run_config(load_run_config(resumed_1, ["max_steps=2"]), resume=True, quiet=True)
    finally:
        torch.set_num_threads(before)
    want = load_file(str(one / "final" / "model.safetensors"))
    for run in (sharded, root / "sft_resumed", resumed_1):
        got = load_file(str(run / "final" / "model.safetensors"))
        _assert_same_parameters(got, want)
        for a, b in zip(read_metrics(run), read_metrics(one), strict=True):
            assert a["step"] == b["step"] and a["tokens"] == b["tokens"]
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    config = json.loads((sharded / "final" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]  # not FSDP's generated subclass
    model, _ = load_policy(sharded / "final", device="cpu", dtype="float32")
    assert type(model).__name__ == "Qwen2ForCausalLM"


def test_sharded_grpo_run_resumes_exactly(fsdp_ranks):
    """GRPO with a sharded policy and a sharded reference (k3 KL in the loss; the reference is
    reset to the policy after step 3, a sharded load_state_dict): 2 steps resumed to 3 equal 3
    uninterrupted steps (metrics and weights), which equal the same 2 ranks with strategy ddp
    up to float rounding. (A reset before the checkpoint would not survive a resume, in
    either strategy: the online loop rebuilds the reference from the initial policy.)"""
    root, _, _, results = fsdp_ranks
    assert results["policy_sharded"]
    records = read_metrics(root / "grpo")
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert all(r["loss/total"] == r["loss/total"] for r in records[1:])  # finite, logged
    # The global minibatches did split unevenly over the ranks, so padding passes ran.
    assert sum(r["perf/padding_passes"] for r in records[1:]) > 0
    assert metrics_differences(root / "grpo", root / "grpo_uninterrupted") == []
    assert results["digest_resumed"] == results["digest_uninterrupted"]
    assert [r.get("kl/ref_reset") for r in records] == [None, None, None, 1.0]
    # FSDP's reduce-scatter and the data-parallel all-reduce add in different orders; at lr 1e-2
    # the 1e-7 differences grow to ~1e-3 of the near-zero policy loss by step 3 (the one-step
    # tests above hold both to 1e-6).
    assert metrics_differences(root / "grpo_uninterrupted", root / "grpo_ddp", rel_tol=5e-3) == []
    assert (root / "grpo" / "final" / "model.safetensors").is_file()


def test_sharded_grpo_run_resumes_exactly_in_one_process(fsdp_ranks):
    """The 2-rank GRPO run's step-2 checkpoint (DCP shards) resumed by ONE process continues as
    the 2 ranks did: every prompt is sampled from streams keyed by its position in the step, not
    by the rank that samples it, so the samples, rewards, KL and reference reset of step 3 are
    the uninterrupted 2-rank run's (float summation order differs: 1e-5)."""
    root, *_ = fsdp_ranks
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_config(load_run_config(root / "grpo_resumed_1rank", ["max_steps=3"]), resume=True,
                   quiet=True)
    finally:
        torch.set_num_threads(before)
    one = read_metrics(root / "grpo_resumed_1rank")
    assert [r["step"] for r in one] == [0, 1, 2, 3]
    assert one[3]["kl/ref_reset"] == 1.0
    assert metrics_differences(root / "grpo_resumed_1rank", root / "grpo_uninterrupted",
                               rel_tol=1e-5) == []
    want = load_file(str(root / "grpo_uninterrupted" / "final" / "model.safetensors"))
    got = load_file(str(root / "grpo_resumed_1rank" / "final" / "model.safetensors"))
    _assert_same_parameters(got, want, atol=1e-5)


def _processes_mentioning(text: str) -> list[int]:
    """Pids of the live processes whose command line contains ``text`` (Linux /proc)."""
    out = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if text.encode() in cmdline.read_bytes():
                out.append(int(cmdline.parent.name))
    return out


def _wait_unlocked(lock: Path, timeout: float = 120.0) -> None:
    """Until no process holds the run folder's flock (the kernel drops it when the holder's
    files are closed at exit)."""
    import fcntl

    deadline = time.monotonic() + timeout
    with open(lock, "a+") as fh:
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
                return
            except BlockingIOError:
                assert time.monotonic() < deadline, f"{lock} still held: {lock.read_text()}"
                time.sleep(0.1)


def test_sharded_grpo_run_killed_midway_resumes_in_one_process(fsdp_ranks, tmp_path):
    """2 FSDP ranks (torchrun, the CLI) are SIGKILLed, with torchrun, once the step-1
    checkpoint is on disk; one process resumes the run from its newest intact checkpoint and
    finishes with the uninterrupted 2-rank run's metrics and weights."""
    root, _, tiny_dir, _ = fsdp_ranks
    run_dir = tmp_path / "killed"
    config = tmp_path / "grpo.yaml"
    config.write_text(yaml.safe_dump(_grpo_config(run_dir, tiny_dir) | {"max_steps": 3}))
    proc = subprocess.Popen(torchrun_2("-m", "psirl.cli", "train", str(config), "--quiet"),
                            env=torchrun_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "checkpoints" / "step-00000001").is_dir():
            assert proc.poll() is None and time.monotonic() < deadline, "no step-1 checkpoint"
            time.sleep(0.05)
    finally:
        # torchrun and both workers: every process started with this run's config file.
        for pid in _processes_mentioning(str(config)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=60)
    _wait_unlocked(run_dir / ".psirl.lock")
    assert not (run_dir / "final").exists()  # killed before the end
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_config(load_run_config(run_dir), resume=True, quiet=True)
    finally:
        torch.set_num_threads(before)
    assert [r["step"] for r in read_metrics(run_dir)] == [0, 1, 2, 3]
    # Two steps in one process after the kill: float rounding grows to ~1e-5 of the losses.
    assert metrics_differences(run_dir, root / "grpo_uninterrupted", rel_tol=1e-4) == []
    want = load_file(str(root / "grpo_uninterrupted" / "final" / "model.safetensors"))
    got = load_file(str(run_dir / "final" / "model.safetensors"))
    _assert_same_parameters(got, want, atol=1e-5)


def test_dynamic_sampling_decides_globally_so_one_process_repeats_two_ranks(fsdp_ranks):
    """DAPO's dynamic sampling under 2 FSDP ranks keeps the groups one process keeps (the first
    with signal in (round, position) order) and deals them to the ranks again: the same config
    in one process logs the 2-rank run's metrics and ends with its weights."""
    root, _, tiny_dir, _ = fsdp_ranks
    records = read_metrics(root / "dapo")
    assert sum(r.get("sampling/resample_rounds", 0) for r in records) > 0  # refills happened
    cfg = _dapo_config(root / "dapo_1process", tiny_dir)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_config(config_from_dict(cfg), quiet=True)
    finally:
        torch.set_num_threads(before)
    assert metrics_differences(root / "dapo_1process", root / "dapo", rel_tol=1e-4) == []
    want = load_file(str(root / "dapo" / "final" / "model.safetensors"))
    got = load_file(str(root / "dapo_1process" / "final" / "model.safetensors"))
    # 1e-4: the attention key biases get gradients of pure rounding noise (a softmax does not
    # see a shift of every key), which AdamW scales up to steps of ~lr; measured 2e-5 there,
    # < 1e-6 on every other tensor.
    _assert_same_parameters(got, want, atol=1e-4)


def test_fsdp_config_errors_name_the_key(tmp_path, monkeypatch):
    from psirl.train import fsdp
    from psirl.train.config import ConfigError

    with pytest.raises(ConfigError, match=r"distributed\.strategy"):
        config_from_dict(_sft_config(tmp_path), ["distributed.strategy=zero3"])
    with pytest.raises(ConfigError, match=r"distributed\.fsdp\.offload"):
        config_from_dict(_sft_config(tmp_path), ["distributed.fsdp.offload=true"])
    # 6 examples over 4 ranks leave a rank 1 row: 2 micro-batches cannot pair up across ranks.
    monkeypatch.setattr(fsdp, "world", lambda: (0, 4))
    config = config_from_dict(_sft_config(tmp_path))
    with pytest.raises(ValueError, match=r"optim\.grad_accum: 2 micro-batches .* only 1 "):
        fsdp.check_equal_passes(config, None)
    with pytest.raises(TypeError, match="Linear: no decoder `layers`"):
        fsdp.decoder_layers(torch.nn.Linear(2, 2))
