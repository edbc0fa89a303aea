"""Every knob of every preset reaches the training step (issue: advantage.eps never did).

For each knob field of `psirl algorithms --json`, two short runs of the online stages differ only
in that knob; the step's loss / value loss / KL coefficient / gradient norm must change. The
table ALTERNATIVES must name every field, so a new knob without a check fails here.
"""

from __future__ import annotations

import json

import pytest
import torch

from psirl.algorithms import knobs_to_dict, resolve_preset
from psirl.models.tiny import make_tiny_model
from psirl.train.base import step_generator
from psirl.train.config import config_from_dict
from psirl.train.online import build_online

ALPHABET = "0123456789+=-"

# (section, field) -> (preset, extra knob overrides making the field active, the changed value)
_KL = {"loss.kl_placement": "loss", "loss.kl_estimator": "k3", "loss.kl_coef": 0.5}
ALTERNATIVES = {
    ("advantage", "estimator"): ("grpo", {}, "leave_one_out"),
    ("advantage", "gamma"): ("ppo", {}, 0.5),
    ("advantage", "lam"): ("ppo", {}, 0.5),
    # eps is added to the group std: 100 shrinks every advantage ~100-fold.
    ("advantage", "eps"): ("grpo", {}, 100.0),
    ("loss", "ratio"): ("grpo", {"sampling.epochs": 2}, "sequence"),
    ("loss", "clip"): ("grpo", {"sampling.epochs": 2, "loss.eps_low": 0.01, "loss.eps_high": 0.01},
                       "none"),
    ("loss", "eps_low"): ("grpo", {"sampling.epochs": 2, "loss.clip": "asymmetric",
                                   "loss.eps_high": 0.001}, 0.001),
    ("loss", "eps_high"): ("grpo", {"sampling.epochs": 2, "loss.clip": "asymmetric",
                                    "loss.eps_low": 0.001}, 0.001),
    ("loss", "dual_clip_c"): ("grpo", {"loss.clip": "dual", "sampling.epochs": 2,
                                       "loss.eps_low": 0.001, "loss.eps_high": 0.001}, 1.0001),
    ("loss", "aggregation"): ("grpo", {}, "seq_mean_token_sum"),
    ("loss", "constant_normaliser"): ("dr_grpo", {}, 7.0),
    ("loss", "kl_estimator"): ("grpo", _KL, "k1"),
    ("loss", "kl_placement"): ("grpo", _KL, "reward_token"),
    ("loss", "kl_coef"): ("grpo", _KL, 2.0),
    ("loss", "entropy_coef"): ("grpo", {}, 0.5),
    ("kl_control", "adaptive"): ("grpo", _KL, True),
    ("kl_control", "target"): ("grpo", {**_KL, "kl_control.adaptive": True}, 50.0),
    ("kl_control", "horizon"): ("grpo", {**_KL, "kl_control.adaptive": True}, 2),
    ("kl_control", "ref_reset_every"): ("grpo", _KL, 1),
    ("sampling", "group_size"): ("grpo", {}, 3),
    ("sampling", "temperature"): ("grpo", {}, 0.5),
    ("sampling", "top_p"): ("grpo", {}, 0.5),
    ("sampling", "top_k"): ("grpo", {}, 2),
    ("sampling", "max_new_tokens"): ("grpo", {}, 2),
    ("sampling", "dynamic_sampling"): ("grpo", {}, True),
    ("sampling", "max_resample_rounds"): ("grpo", {"sampling.dynamic_sampling": True}, 0),
    ("sampling", "epochs"): ("grpo", {}, 2),
    ("sampling", "minibatches"): ("grpo", {}, 1),
    ("advantage", "whiten"): ("grpo", {}, "batch"),
    ("loss", "kl_clamp"): ("grpo", _KL, 1e-7),
    ("loss", "sapo_tau_pos"): ("grpo", {"loss.clip": "sapo", "sampling.epochs": 2}, 0.1),
    ("loss", "sapo_tau_neg"): ("grpo", {"loss.clip": "sapo", "sampling.epochs": 2}, 0.1),
    ("loss", "cov_ratio"): ("grpo", {"loss.clip": "clip_cov", "loss.clip_cov_lb": -1e9,
                                     "loss.clip_cov_ub": 1e9}, 0.5),
    ("loss", "clip_cov_lb"): ("grpo", {"loss.clip": "clip_cov", "loss.cov_ratio": 0.5}, -1e9),
    ("loss", "clip_cov_ub"): ("grpo", {"loss.clip": "clip_cov", "loss.cov_ratio": 0.5,
                                       "loss.clip_cov_lb": -1e9}, -1e8),
    ("loss", "kl_cov_coef"): ("grpo", {"loss.clip": "kl_cov", "loss.cov_ratio": 0.5,
                                       "sampling.epochs": 2}, 10.0),
    ("value", "vf_coef"): ("ppo", {}, 2.0),
    ("value", "value_clip"): ("ppo", {}, 0.001),
}
# Knobs that act only with another engine than the trainer's own module (HF): there the ratio
# trainer / engine is 1, so the knob has nothing to act on. Tested with vLLM instead:
# tests/rollout/test_vllm_engine.py::test_the_online_loop_measures_the_engine_trainer_mismatch_and_applies_tis
ENGINE_MISMATCH_ONLY = {("loss", "tis_cap"), ("loss", "tis_level")}
WATCHED = ("loss/total", "loss/value", "kl/coef", "grad_norm", "reward/mean")


def _all_knob_fields() -> set[tuple[str, str]]:
    from typer.testing import CliRunner

    from psirl.cli import app  # the fields as `psirl algorithms --json` lists them

    rows = json.loads(CliRunner().invoke(app, ["algorithms", "--json"]).stdout)["presets"]
    return {(section, name) for row in rows for section, fields in row["knobs"].items()
            for name in fields}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("knobs") / "tiny", hidden_size=32, num_layers=1,
                           num_heads=2, intermediate_size=64, alphabet=ALPHABET, seed=0)


def _history(tiny_dir, tmp_path, preset: str, overrides: dict) -> list[dict[str, float]]:
    knobs = {"sampling.group_size": 4, "sampling.max_new_tokens": 3, **overrides}
    config = config_from_dict({
        "loop": "online", "output_dir": str(tmp_path), "seed": 0, "max_steps": 2,
        "device": "cpu", "model": {"path": str(tiny_dir)},
        "data": {"task": "addition", "task_kwargs": {"digits": 1}, "n_train": 50},
        "algorithm": {"preset": preset, "knobs": knobs},
        # A reward that varies within groups from the first step: the first completion char.
        "reward": {"kind": "format", "pattern": "^[0-4]"},
        "optim": {"lr": 5e-2, "batch_size": 3}, "checkpoint": {"every": 0},
    })
    spec = build_online(config, tmp_path)
    out = []
    for step in range(2):
        metrics = spec.step(step, step_generator(config.seed, step))
        out.append({k: metrics[k] for k in WATCHED if k in metrics})
    return out


def test_alternatives_cover_every_knob_of_the_presets():
    fields = _all_knob_fields() - ENGINE_MISMATCH_ONLY
    assert fields == set(ALTERNATIVES), (
        f"knobs without a check: {sorted(fields - set(ALTERNATIVES))}; "
        f"checks of no knob: {sorted(set(ALTERNATIVES) - fields)}")


@pytest.mark.parametrize("knob", sorted(ALTERNATIVES), ids=lambda k: ".".join(k))
def test_each_knob_changes_the_training_step(knob, tiny_dir, tmp_path):
    preset, extra, value = ALTERNATIVES[knob]
    key = ".".join(knob)
    base_value = knobs_to_dict(resolve_preset(preset, extra))[knob[0]][knob[1]]
    assert base_value != value, f"{key}: the alternative equals the base value {base_value!r}"
    torch.manual_seed(0)
    base = _history(tiny_dir, tmp_path / "base", preset, extra)
    torch.manual_seed(0)
    changed = _history(tiny_dir, tmp_path / "changed", preset, {**extra, key: value})
    assert base != changed, f"{key}: {base_value!r} -> {value!r} left every step's metrics equal"


def test_advantage_eps_scales_the_policy_loss(tiny_dir, tmp_path):
    """The regression of the eps bug, quantitatively: on step 0 (same samples, ratio 1), the
    GRPO loss is -mean(A); with eps far above every group std, A ~ (R - mean)/eps, so the
    policy gradient shrinks by orders of magnitude."""
    small = _history(tiny_dir, tmp_path / "a", "grpo", {"advantage.eps": 1e-6})
    large = _history(tiny_dir, tmp_path / "b", "grpo", {"advantage.eps": 1e3})
    assert small[0]["reward/mean"] == large[0]["reward/mean"]  # same samples at step 0
    assert large[0]["grad_norm"] < 1e-2 * small[0]["grad_norm"]
