"""The config system: every error names the file and the key; overrides; resolved round trip."""

from __future__ import annotations

import sys
import types
import warnings

import pytest

from psirl.train.config import (
    ConfigError,
    FormatRewardConfig,
    TrainConfig,
    WeightedRewardConfig,
    config_from_dict,
    load_config,
    load_run_config,
    parse_overrides,
    resolve_algorithm,
    save_resolved_config,
)

BASE = """\
loop: online
output_dir: runs/test
model:
  tiny: {hidden_size: 32, num_heads: 4}
data:
  task: addition
optim:
  lr: 1e-4
  batch_size: 4
"""


def _write(tmp_path, text, name="config.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _error(path, overrides=()):
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    return str(info.value)


@pytest.fixture
def base(tmp_path):
    return _write(tmp_path, BASE)


def test_base_config_and_defaults(base):
    cfg = load_config(base, [])
    assert isinstance(cfg, TrainConfig)
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)  # YAML 1.1 would give '1e-4'
    assert cfg.model.tiny.hidden_size == 32 and cfg.model.path is None and cfg.model.lora is None
    assert (cfg.seed, cfg.max_steps, cfg.device, cfg.dtype) == (0, 100, "auto", "float32")
    assert cfg.optim.betas == (0.9, 0.999) and cfg.optim.grad_accum == 1
    assert cfg.reward.kind == "task" and cfg.algorithm.preset == "grpo"
    assert cfg.track.sinks == ["jsonl"]


def test_malformed_yaml_names_file_line_and_column(tmp_path):
    path = _write(tmp_path, BASE + "eval:\n  every: [1, 2\n  n: 3\n")
    msg = _error(path)
    assert msg.startswith(f"{path}:12:4: malformed YAML: expected ',' or ']', but got ':'"), msg
    assert "starting at line 11" in msg


def test_duplicate_key_is_an_error(tmp_path):
    path = _write(tmp_path, BASE + "  lr: 2e-4\n")
    assert _error(path) == (
        f"{path}:10:3: malformed YAML: found duplicate key 'lr' (first given on line 8) "
        "(while constructing a mapping starting at line 8)"
    )


def test_top_level_must_be_a_mapping(tmp_path):
    path = _write(tmp_path, "- a\n- b\n")
    assert _error(path) == f"{path}: the top level must be a mapping of keys, got list"


def test_unknown_top_level_key_names_it(tmp_path):
    path = _write(tmp_path, BASE + "seeed: 3\n")
    assert _error(path) == (
        f"{path}: seeed: unknown key (did you mean 'seed'?); allowed keys here: algorithm, checkpoint, "
        "data, device, distributed, dtype, eval, loop, max_steps, model, optim, output_dir, preference, "
        "reward, rollout, seed, self_training, sft, track"
    )


def test_unknown_nested_key_names_the_path(tmp_path):
    path = _write(tmp_path, BASE + "  lrr: 0.1\n")
    assert _error(path) == (
        f"{path}: optim.lrr: unknown key (did you mean 'lr'?); allowed keys here: batch_size, betas, "
        "eps, grad_accum, grad_clip, lr, schedule, warmup_steps, weight_decay"
    )
    path = _write(tmp_path, BASE.replace("hidden_size: 32", "hiden_size: 32"), "c2.yaml")
    assert f"{path}: model.tiny.hiden_size: unknown key (did you mean 'hidden_size'?)" in _error(
        path
    )


def test_unknown_key_inside_a_reward_kind(tmp_path):
    path = _write(tmp_path, BASE + "reward:\n  kind: format\n  patern: '^a'\n")
    assert _error(path).splitlines() == [
        f"{path}: reward.pattern: required key is missing",
        f"{path}: reward.patern: unknown key (did you mean 'pattern'?); "
        "allowed keys here: fallback, kind, pattern, shuffle, value",
    ]
    path = _write(tmp_path, BASE + "reward: {kind: judge_llm}\n", "c2.yaml")
    assert _error(path).startswith(f"{path}: reward: Input tag 'judge_llm' found using 'kind'")


def test_wrong_type_names_the_key(tmp_path):
    path = _write(tmp_path, BASE.replace("lr: 1e-4", "lr: fast"))
    assert _error(path) == (
        f"{path}: optim.lr: Input should be a valid number, unable to parse string as a number (got 'fast')"
    )
    path = _write(tmp_path, BASE + "max_steps: 2.5\n", "c2.yaml")
    assert _error(path).startswith(f"{path}: max_steps: Input should be a valid integer")


def test_range_checks_name_the_key(base):
    assert _error(base, ["optim.lr=0"]) == (
        f"{base} (override 'optim.lr=0'): optim.lr: Input should be greater than 0 (got 0)"
    )
    assert _error(base, ["optim.eps=-1e-8"]).endswith(
        "optim.eps: Input should be greater than or equal to 0 (got -1e-08)"
    )
    assert _error(base, ["optim.betas=[0.9, 1.0]"]).endswith(
        "optim.betas: betas[1] = 1.0 must be in [0, 1)"
    )
    assert "optim.grad_accum: Input should be greater than or equal to 1" in _error(
        base, ["optim.grad_accum=0"]
    )
    assert _error(base, ["max_steps=0"]).endswith(
        "max_steps: Input should be greater than 0 (got 0)"
    )
    assert "model.lora.dropout: Input should be less than 1" in _error(
        base, ["model.lora.dropout=1.0"]
    )
    assert "optim.grad_clip: Input should be a finite number" in _error(
        base, ["optim.grad_clip=.inf"]
    )
    assert "reward.pattern: not a valid regular expression" in _error(
        base, ["reward={kind: format, pattern: '('}"]
    )


def test_cross_field_rules(base):
    assert _error(base, ["model.path=/models/m"]).endswith(
        "model: set exactly one of model.path (a local model folder) or model.tiny "
        "(a tiny model built in the run folder); both are set"
    )
    assert "data: set exactly one of data.task" in _error(base, ["data.train_path=x.jsonl"])
    assert "model.tiny: hidden_size (30) must be a multiple of num_heads (4)" in _error(
        base, ["model.tiny.hidden_size=30"]
    )
    assert (
        "reward.kind: 'task' uses the built-in task's reward, but data.task is not set"
        in _error(base, ["data={train_path: p.jsonl}"])
    )
    assert "optim.grad_accum (8) must not exceed optim.batch_size (4)" in _error(
        base, ["optim.grad_accum=8"]
    )
    assert "eval.every > 0 needs eval.greedy or eval.sampled" in _error(
        base, ["eval.every=5", "eval.greedy=false"]
    )


def test_missing_required_keys(tmp_path):
    path = _write(tmp_path, "loop: sft\n")
    assert _error(path).splitlines() == [
        f"{path}: output_dir: required key is missing",
        f"{path}: model: required key is missing",
        f"{path}: data: required key is missing",
    ]
    with pytest.raises(FileNotFoundError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml", [])


def test_parse_overrides_dotted_keys_and_yaml_values():
    parsed = parse_overrides(
        [
            "optim.lr=1e-4",
            "max_steps=5",
            "track.sinks=[jsonl, tensorboard]",
            "model.lora=",
            "optim.betas.1=0.95",
            "data.chat=true",
            "output_dir=runs/a=b",
            "algorithm.preset=null",
            "data.task=3x",
        ]
    )
    assert [(p, v) for p, v, _ in parsed] == [
        (("optim", "lr"), 1e-4),
        (("max_steps",), 5),
        (("track", "sinks"), ["jsonl", "tensorboard"]),
        (("model", "lora"), None),
        (("optim", "betas", 1), 0.95),
        (("data", "chat"), True),
        (("output_dir",), "runs/a=b"),
        (("algorithm", "preset"), None),
        (("data", "task"), "3x"),
    ]
    assert isinstance(parsed[0][1], float) and isinstance(parsed[1][1], int)
    with pytest.raises(ConfigError, match=r"override 'max_steps': expected key=value"):
        parse_overrides(["max_steps"])
    with pytest.raises(ConfigError, match=r"empty part in key 'optim..lr'"):
        parse_overrides(["optim..lr=1"])


def test_overrides_apply_and_create_sections(base):
    cfg = load_config(
        base,
        [
            "optim.lr=3e-4",
            "max_steps=5",
            "model.lora.r=4",
            "algorithm.knobs.sampling.group_size=4",
            "algorithm.knobs.loss.kl_coef=1e-3",
            "reward={kind: weighted, components: [{weight: 0.5, reward: {kind: task}}, "
            "{weight: 1, reward: {kind: format, pattern: '^\\d+$'}}]}",
        ],
    )
    assert (cfg.optim.lr, cfg.max_steps, cfg.model.lora.r, cfg.model.lora.alpha) == (
        3e-4,
        5,
        4,
        16.0,
    )
    assert cfg.algorithm.knobs == {"sampling": {"group_size": 4}, "loss": {"kl_coef": 1e-3}}
    assert isinstance(cfg.reward, WeightedRewardConfig)
    assert [c.weight for c in cfg.reward.components] == [0.5, 1.0]
    assert isinstance(cfg.reward.components[1].reward, FormatRewardConfig)
    assert cfg.reward.components[1].reward.pattern == r"^\d+$"


def test_override_errors_name_the_override(base):
    assert _error(base, ["optim.lrr=1"]).startswith(
        f"{base} (override 'optim.lrr=1'): optim.lrr: unknown key (did you mean 'lr'?)"
    )
    assert _error(base, ["optim.lr=abc"]).startswith(
        f"{base} (override 'optim.lr=abc'): optim.lr: Input should be a valid number"
    )
    assert _error(base, ["loop.kind=x"]) == (
        "override 'loop.kind=x': loop holds the value 'online', not a section"
    )
    assert _error(base, ["optim.betas.0=0.8"]).startswith(
        "override 'optim.betas.0=0.8': optim.betas is not set in the file"
    )


def test_resolved_config_round_trip(base, tmp_path):
    cfg = load_config(
        base,
        [
            "model.lora.r=4",
            "reward={kind: format, pattern: 'a+'}",
            "algorithm.knobs.sampling.group_size=4",
            "optim.betas=[0.8, 0.99]",
        ],
    )
    run_dir = tmp_path / "run"
    path = save_resolved_config(cfg, run_dir)
    assert path == run_dir / "config.yaml"
    assert path.read_text().startswith("# resolved psirl config")
    again = load_run_config(run_dir)
    assert again == cfg.model_copy(update={"output_dir": str(run_dir)})
    assert again.optim.betas == (0.8, 0.99)
    longer = load_run_config(run_dir, ["max_steps=500"])
    assert longer.max_steps == 500 and longer.model == cfg.model
    with pytest.raises(FileNotFoundError, match="no config.yaml here"):
        load_run_config(tmp_path / "elsewhere")


def test_config_from_dict_and_no_file():
    cfg = load_config(
        None, ["loop=sft", "output_dir=o", "model.path=/m", "data.train_path=t.jsonl"]
    )
    assert (cfg.loop, cfg.model.path, cfg.data.train_path) == ("sft", "/m", "t.jsonl")
    with pytest.raises(
        ConfigError, match=r"^<dict>: seed: Input should be greater than or equal to 0"
    ):
        config_from_dict(
            {
                "loop": "sft",
                "output_dir": "o",
                "model": {"path": "m"},
                "data": {"task": "addition"},
                "seed": -1,
            },
            source="<dict>",
        )


@pytest.fixture
def fake_algorithms(monkeypatch):
    calls = []

    class KnobWarning(UserWarning):
        pass

    def resolve_preset(name, overrides=None):
        calls.append((name, overrides))
        if overrides and "bogus" in overrides:
            raise ValueError("unknown knob section 'bogus'")
        if overrides and overrides.get("loss", {}).get("kl_estimator") == "k3_in_reward":
            warnings.warn("k3 in the reward is biased", KnobWarning, stacklevel=2)
        return ("knobs", name)

    module = types.ModuleType("psirl.algorithms")
    module.PRESETS = {"grpo": {}, "dr_grpo": {}, "rloo": {}}
    module.resolve_preset = resolve_preset
    module.KnobWarning = KnobWarning
    monkeypatch.setitem(sys.modules, "psirl.algorithms", module)
    return calls


def test_preset_and_knobs_are_checked_at_load_time(base, fake_algorithms):
    assert _error(base, ["algorithm.preset=dr_grp"]) == (
        f"{base} (override 'algorithm.preset=dr_grp'): algorithm.preset: unknown preset 'dr_grp' "
        "(did you mean 'dr_grpo'?); known presets: grpo, dr_grpo, rloo"
    )
    assert _error(base, ["algorithm.knobs.bogus.x=1"]) == (
        f"{base} (override 'algorithm.knobs.bogus.x=1'): algorithm.knobs: unknown knob section 'bogus'"
    )
    assert _error(base, ["algorithm.preset=null"]).endswith(
        "algorithm.preset: the online loop needs a preset (e.g. grpo)"
    )
    fake_algorithms.clear()
    cfg = load_config(base, ["algorithm.preset=rloo", "algorithm.knobs.sampling.group_size=4"])
    assert resolve_algorithm(cfg) == ("knobs", "rloo")
    assert fake_algorithms == [("rloo", {"sampling": {"group_size": 4}})] * 2  # load + resolve
    with pytest.warns(sys.modules["psirl.algorithms"].KnobWarning, match="k3 in the reward"):
        load_config(base, ["algorithm.knobs.loss.kl_estimator=k3_in_reward"])


def test_real_presets_reject_a_misspelt_knob(base):
    pytest.importorskip("psirl.algorithms")
    msg = _error(base, ["algorithm.knobs.loss.eps_hgh=0.3"])
    assert msg.startswith(
        f"{base} (override 'algorithm.knobs.loss.eps_hgh=0.3'): algorithm.knobs: "
    )
    assert "eps_hgh" in msg


def test_preset_check_waits_when_algorithms_module_is_absent(base, monkeypatch):
    import psirl

    # Simulate the module not existing yet: the name is then checked by resolve_algorithm.
    monkeypatch.setitem(sys.modules, "psirl.algorithms", None)
    monkeypatch.delattr(psirl, "algorithms", raising=False)
    import importlib

    real = importlib.import_module

    def fake_import(name, *args):
        if name == "psirl.algorithms":
            raise ModuleNotFoundError("No module named 'psirl.algorithms'", name="psirl.algorithms")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", fake_import)
    assert load_config(base, ["algorithm.preset=not_a_preset"]).algorithm.preset == "not_a_preset"


def test_task_name_and_arguments_are_checked(base, monkeypatch):
    def get_task(name, digits=2):
        if not 1 <= digits <= 18:
            raise ValueError(f"digits: must be in [1, 18], got {digits}")
        return (name, digits)

    module = types.ModuleType("psirl.data.tasks")
    module.TASKS = {"addition": object, "countdown": object}
    module.get_task = get_task
    monkeypatch.setitem(sys.modules, "psirl.data.tasks", module)
    assert load_config(base, ["data.task_kwargs.digits=3"]).data.task_kwargs == {"digits": 3}
    assert _error(base, ["data.task=additon"]) == (
        f"{base} (override 'data.task=additon'): data.task: unknown task 'additon' "
        "(did you mean 'addition'?); known tasks: addition, countdown"
    )
    assert _error(base, ["data.task_kwargs.digits=30"]) == (
        f"{base} (override 'data.task_kwargs.digits=30'): data.task_kwargs: task 'addition' rejects "
        "these arguments: digits: must be in [1, 18], got 30"
    )
    assert "unexpected keyword argument 'digit'" in _error(base, ["data.task_kwargs.digit=3"])
