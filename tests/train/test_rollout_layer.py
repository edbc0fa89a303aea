"""The rollout layer every sampling loop uses: the same rendered prompts in every loop, chat
templates applied, and your own reward functions (module:function and reward_fn=)."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from psirl.models.tiny import make_tiny_model
from psirl.rollout.hf_engine import HFEngine
from psirl.train import run_config
from psirl.train.config import config_from_dict

ALPHABET = "0123456789+=-<>|/:abcdefghijklmnopqrstuvwxyz \n"
PROMPTS = [[{"role": "user", "content": f"{a}+{b}="}] for a, b in [(1, 2), (3, 4), (2, 5), (4, 4)]]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("layer") / "tiny", hidden_size=32, num_layers=1,
                           num_heads=2, intermediate_size=64, alphabet=ALPHABET, seed=0)


@pytest.fixture()
def sent(monkeypatch):
    """Every prompt string any engine is asked to generate from, in call order."""
    seen: list[str] = []
    original = HFEngine.generate

    def recording(self, prompts, params):
        seen.extend(prompts)
        return original(self, prompts, params)

    monkeypatch.setattr(HFEngine, "generate", recording)
    return seen


def _config(tiny_dir, out, loop: str, data: dict, **extra) -> dict:
    cfg = {"loop": loop, "output_dir": str(out), "seed": 0, "max_steps": 1, "device": "cpu",
           "model": {"path": str(tiny_dir)}, "data": data,
           "reward": {"kind": "format", "pattern": "^1"},
           "optim": {"lr": 1e-3, "batch_size": 4}, "checkpoint": {"every": 0}}
    cfg.update(extra)
    return cfg


def test_a_conversational_jsonl_is_rendered_identically_by_every_sampling_loop(tiny_dir, tmp_path, sent):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    expected = {tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in PROMPTS}
    assert not expected & {p[0]["content"] for p in PROMPTS}  # templated, not the raw text

    loops = {
        "online": {"algorithm": {"preset": "grpo", "knobs": {"sampling": {"group_size": 2,
                                                                          "max_new_tokens": 2}}}},
        "preference": {"preference": {"online": True, "samples_per_prompt": 2, "max_new_tokens": 2}},
        "self_training": {"self_training": {"method": "raft", "samples_per_prompt": 2,
                                            "max_new_tokens": 2}},
    }
    per_loop = {}
    for loop, extra in loops.items():
        sent.clear()
        run_config(config_from_dict(_config(tiny_dir, tmp_path / loop, loop,
                                            {"train_path": str(data)}, **extra)), quiet=True)
        per_loop[loop] = set(sent)
    assert per_loop["online"] == expected
    assert per_loop["preference"] == expected
    assert per_loop["self_training"] == expected


def test_chat_true_templates_plain_string_prompts_in_the_online_loop(tiny_dir, tmp_path, sent):
    from transformers import AutoTokenizer

    from psirl.data.tasks import get_task

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    cfg = _config(tiny_dir, tmp_path / "run", "online",
                  {"task": "addition", "task_kwargs": {"digits": 1}, "n_train": 20, "chat": True},
                  algorithm={"preset": "grpo", "knobs": {"sampling": {"group_size": 2,
                                                                      "max_new_tokens": 2}}})
    run_config(config_from_dict(cfg), quiet=True)
    raw = [r["prompt"] for r in get_task("addition", digits=1).make(20, seed=0)]
    templated = {tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                         add_generation_prompt=True) for p in raw}
    assert sent and set(sent) <= templated
    assert not set(sent) & set(raw)


# --------------------------------------------------------------------------- custom rewards

REWARD_MODULE = textwrap.dedent('''
    CALLS = {"n": 0}

    def starts_with_one(prompts, completions, records):
        return [1.0 if c.startswith("1") else 0.0 for c in completions]

    def flaky(prompts, completions, records):
        CALLS["n"] += 1
        if any(c.startswith("9") for c in completions):
            raise RuntimeError("this reward cannot score a 9")
        return [1.0 if c.startswith("1") else 0.0 for c in completions]

    async def async_length(prompts, completions, records, tokenizer):
        return [float(len(tokenizer(c, add_special_tokens=False)["input_ids"])) for c in completions]

    def hangs(prompts, completions, records):
        import time
        time.sleep(60)
        return [0.0] * len(completions)
''')


@pytest.fixture()
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rewards"
    sys.modules.pop("my_rewards", None)


def _grpo(tiny_dir, out, reward: dict, steps: int) -> dict:
    return _config(tiny_dir, out, "online",
                   {"task": "addition", "task_kwargs": {"digits": 1}, "n_train": 64},
                   max_steps=steps, reward=reward,
                   algorithm={"preset": "grpo", "knobs": {"sampling": {"group_size": 8,
                                                                       "max_new_tokens": 2}}},
                   optim={"lr": 3e-2, "batch_size": 8})


def _rewards(run_dir) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["reward/mean"] for r in rows if "reward/mean" in r]


def test_a_reward_given_as_module_function_trains_grpo(tiny_dir, tmp_path, reward_module):
    run = run_config(config_from_dict(_grpo(
        tiny_dir, tmp_path / "run", {"kind": "python", "function": f"{reward_module}:starts_with_one"},
        steps=12)), quiet=True)
    rewards = _rewards(run)
    assert len(rewards) == 12
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.2, rewards


def test_a_reward_given_as_reward_fn_trains_grpo(tiny_dir, tmp_path):
    calls = []

    def ends_with_one(prompts, completions, records):
        calls.append(len(completions))
        return [1.0 if c.startswith("1") else 0.0 for c in completions]

    run = run_config(config_from_dict(_grpo(tiny_dir, tmp_path / "run", {"kind": "python"}, steps=12)),
                     quiet=True, reward_fn=ends_with_one)
    rewards = _rewards(run)
    assert calls and all(n == 64 for n in calls)  # batched: 8 prompts x 8 samples per call
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.2, rewards


def test_a_reward_that_raises_on_some_samples_is_counted_not_fatal(tiny_dir, tmp_path, reward_module):
    run = run_config(config_from_dict(_grpo(
        tiny_dir, tmp_path / "run", {"kind": "python", "function": f"{reward_module}:flaky",
                                     "fallback": -1.0}, steps=3)), quiet=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    failures = [r for r in rows if "reward/flaky/failures" in r]
    assert len(failures) == 3
    assert failures[-1]["reward/flaky/failures"] > 0  # 9s were sampled and fell back, counted


def test_an_async_reward_receives_the_tokenizer(tiny_dir, tmp_path, reward_module):
    from transformers import AutoTokenizer

    from psirl.train.rewards import build_reward

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    cfg = config_from_dict(_grpo(tiny_dir, tmp_path / "run",
                                 {"kind": "python", "function": f"{reward_module}:async_length"}, 1))
    fn = build_reward(cfg, None, tok)
    assert fn(["p", "p"], ["12", "1+1="], [{}, {}]) == [2.0, 4.0]


def test_a_hung_reward_fails_its_samples_after_the_timeout(tiny_dir, tmp_path, reward_module):
    import time

    from psirl.train.rewards import build_reward

    cfg = config_from_dict(_grpo(tiny_dir, tmp_path / "run", {
        "kind": "python", "function": f"{reward_module}:hangs", "timeout_s": 0.5, "fallback": -2.0}, 1))
    fn = build_reward(cfg, None)
    t0 = time.perf_counter()
    assert fn(["a", "b", "c"], ["1", "2", "3"], [{}, {}, {}]) == [-2.0, -2.0, -2.0]
    assert time.perf_counter() - t0 < 5  # once, not once per sample
    assert fn.metrics()["reward/hangs/failures"] == 3.0


def test_length_reward_counts_tokens_of_the_policy_tokenizer(tiny_dir, tmp_path):
    from transformers import AutoTokenizer

    from psirl.train.rewards import build_reward

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    cfg = config_from_dict(_grpo(tiny_dir, tmp_path / "run", {
        "kind": "length", "max_tokens": 4, "cache_tokens": 2, "penalty": 1.0}, 1))
    fn = build_reward(cfg, None, tok)
    # lengths 2 (<= 4 - 2: no penalty), 3 (ramp: (2 - 3)/2), 5 (over the budget: -1)
    assert fn(["p"] * 3, ["12", "123", "12345"], [{}] * 3) == [0.0, -0.5, -1.0]


def test_reward_fn_is_refused_by_a_loop_that_scores_nothing(tiny_dir, tmp_path):
    cfg = config_from_dict({"loop": "sft", "output_dir": str(tmp_path / "sft"), "device": "cpu",
                            "model": {"path": str(tiny_dir)},
                            "data": {"task": "addition", "task_kwargs": {"digits": 1}}})
    with pytest.raises(ValueError, match="reward_fn: loop 'sft' scores no samples"):
        run_config(cfg, reward_fn=lambda p, c, r: [0.0] * len(c))


def test_code_records_the_reward_cannot_grade_fail_before_training(tiny_dir, tmp_path):
    """HumanEval's `check` defined and never called would give reward 1 to any program: the run
    refuses it at start, naming the record, instead of training on fallback rewards."""
    data = tmp_path / "code.jsonl"
    data.write_text(json.dumps({"prompt": "def add(a, b):", "entry_point": "add",
                                "tests": ["def check(candidate):\n    assert candidate(1, 2) == 3\n"]})
                    + "\n")
    cfg = _config(tiny_dir, tmp_path / "run", "online", {"train_path": str(data)},
                  reward={"kind": "code", "allow_weak_sandbox": True},
                  algorithm={"preset": "grpo", "knobs": {"sampling": {"group_size": 2,
                                                                      "max_new_tokens": 2}}},
                  optim={"batch_size": 1})
    with pytest.raises(ValueError, match="check"):
        run_config(config_from_dict(cfg), quiet=True)
