"""The preference loop on a tiny model: offline DPO family, online DPO, iterative reference refresh."""

from __future__ import annotations

import json
import math

import pytest
import torch

from psirl.core.preference import best_worst_pairs
from psirl.models.tiny import make_tiny_model
from psirl.train.base import step_generator
from psirl.train.config import config_from_dict
from psirl.train.preference import build_preference

TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}
PAIRS = [{"prompt": f"{a}+{a}=", "chosen": str(2 * a), "rejected": "xyz"} for a in range(6)]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("pref_tiny"), **TINY))


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def _config(tmp_path, tiny_path, preference, **extra):
    tmp_path.mkdir(parents=True, exist_ok=True)
    pairs = _jsonl(tmp_path / "pairs.jsonl", PAIRS)
    raw = {"loop": "preference", "output_dir": str(tmp_path / "run"), "device": "cpu",
           "max_steps": 8, "model": {"path": tiny_path},
           "data": {"train_path": pairs, "eval_path": pairs},
           "optim": {"lr": 1e-3, "batch_size": 4}, "preference": preference}
    raw.update(extra)
    return config_from_dict(raw)


def _run_steps(spec, n, seed=0, start=0):
    return [spec.step(k, step_generator(seed, k)) for k in range(start, start + n)]


def test_offline_dpo_raises_implicit_margin_and_accuracy(tmp_path, tiny_path):
    cfg = _config(tmp_path, tiny_path, {"loss": "dpo", "beta": 0.5})
    spec = build_preference(cfg, tmp_path / "run")
    before = spec.evaluate(0)
    # the policy starts equal to its reference: every implicit reward is exactly 0
    assert before["eval/rewards/margin"] == 0.0 and before["eval/rewards/accuracy"] == 0.5
    assert before["eval/loss"] == pytest.approx(math.log(2.0))
    metrics = _run_steps(spec, 8)
    after = spec.evaluate(8)
    assert after["eval/rewards/margin"] > 0.3
    assert after["eval/rewards/accuracy"] == 1.0
    assert after["eval/loss"] < math.log(2.0)
    assert metrics[0]["pairs"] == 4.0 and metrics[0]["loss"] == pytest.approx(math.log(2.0))
    assert {"logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected"} <= set(metrics[-1])


@pytest.mark.parametrize("loss", ["ipo", "kto", "simpo", "orpo"])
def test_other_losses_separate_the_pairs(tmp_path, tiny_path, loss):
    cfg = _config(tmp_path, tiny_path, {"loss": loss, "beta": 0.5})
    spec = build_preference(cfg, tmp_path / "run")
    before = spec.evaluate(0)
    metrics = _run_steps(spec, 6)
    after = spec.evaluate(6)
    assert all(math.isfinite(m["loss"]) for m in metrics)
    assert after["eval/rewards/margin"] > before["eval/rewards/margin"]
    assert after["eval/rewards/accuracy"] == 1.0
    if loss == "kto":
        assert all(m["kto/z0"] >= 0.0 for m in metrics)


def test_kto_on_labelled_records(tmp_path, tiny_path):
    rows = [{"prompt": f"{a}+1=", "completion": str(a + 1), "label": True} for a in range(3)]
    rows += [{"prompt": f"{a}+1=", "completion": "no", "label": False} for a in range(3)]
    cfg = config_from_dict({
        "loop": "preference", "output_dir": str(tmp_path / "run"), "device": "cpu",
        "max_steps": 2, "model": {"path": tiny_path},
        "data": {"train_path": _jsonl(tmp_path / "labelled.jsonl", rows)},
        "optim": {"lr": 1e-3, "batch_size": 6},
        "preference": {"loss": "kto", "labelled": True, "kto_undesirable_weight": 2.0}})
    spec = build_preference(cfg, tmp_path / "run")
    first, second = _run_steps(spec, 2)
    # step 0: policy == reference, so r = 0 and z0 = 0: L = lambda_D (1 - 1/2) or lambda_U (1 - 1/2)
    assert first["loss"] == pytest.approx((3 * 0.5 + 3 * 1.0) / 6)
    assert first["kto/z0"] == 0.0 and math.isfinite(second["loss"])
    assert second["rewards/desirable"] > second["rewards/undesirable"]


def test_online_dpo_two_steps_pairs_best_vs_worst_and_changes_weights(tmp_path, tiny_path):
    calls = []

    def reward_fn(prompts, completions, records):
        rewards = [float(sum(map(ord, c)) % 5) for c in completions]
        calls.append(rewards)
        return rewards

    cfg = config_from_dict({
        "loop": "preference", "output_dir": str(tmp_path / "run"), "device": "cpu",
        "max_steps": 2, "model": {"path": tiny_path}, "data": {"task": "addition"},
        "optim": {"lr": 1e-3, "batch_size": 3},
        "preference": {"loss": "dpo", "online": True, "samples_per_prompt": 3,
                       "max_new_tokens": 4}})
    spec = build_preference(cfg, tmp_path / "run", reward_fn=reward_fn)
    model = spec.models["policy"]
    start = [p.detach().clone() for p in model.parameters()]
    metrics = _run_steps(spec, 2)
    assert len(calls) == 2 and all(len(c) == 9 for c in calls)
    for rewards, m in zip(calls, metrics, strict=True):
        groups = torch.arange(3).repeat_interleave(3)
        chosen, _ = best_worst_pairs(torch.tensor(rewards), groups)
        assert m["online/pairs"] == m["pairs"] == chosen.numel()
        assert m["online/tied_prompts"] == 3 - chosen.numel()
        assert m["reward/mean"] == pytest.approx(sum(rewards) / 9)
        assert math.isfinite(m["loss"])
    assert sum(m["pairs"] for m in metrics) > 0
    changed = any(not torch.equal(a, p.detach()) for a, p in zip(start, model.parameters(), strict=True))
    assert changed


def test_iterative_dpo_refreshes_reference(tmp_path, tiny_path):
    cfg = _config(tmp_path, tiny_path, {"loss": "dpo", "ref_refresh_every": 1})
    spec = build_preference(cfg, tmp_path / "run")
    ref = spec.models["reference"]  # checkpointed, so a resumed run keeps the refreshed weights
    policy = spec.models["policy"]
    _run_steps(spec, 1)
    snapshot = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    assert any(not torch.equal(snapshot[k], v) for k, v in ref.state_dict().items())
    _run_steps(spec, 1, start=1)  # step 1 starts by copying the policy into the reference
    assert all(torch.equal(snapshot[k], v) for k, v in ref.state_dict().items())
    assert not any(p.requires_grad for p in ref.parameters())


def test_reference_free_losses_build_no_reference(tmp_path, tiny_path):
    spec = build_preference(_config(tmp_path, tiny_path, {"loss": "simpo"}), tmp_path / "run")
    assert set(spec.models) == {"policy"}


def test_run_config_dispatches_preference_loop(tmp_path, tiny_path):
    from psirl.train import run_config

    cfg = _config(tmp_path, tiny_path, {"loss": "dpo"}, max_steps=1)
    run_dir = run_config(cfg, quiet=True)
    assert (run_dir / "final" / "config.json").is_file()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 1 and math.isfinite(rows[-1]["loss"])


def test_micro_batches_give_the_full_batch_step(tmp_path, tiny_path):
    """The loss is divided by the step's pair count, so grad_accum changes memory, not the step."""
    results = []
    for accum in (1, 2):
        cfg = _config(tmp_path / f"a{accum}", tiny_path, {"loss": "dpo"},
                      optim={"lr": 1e-3, "batch_size": 4, "grad_accum": accum})
        spec = build_preference(cfg, tmp_path / f"a{accum}")
        metrics = _run_steps(spec, 2)
        results.append((metrics, [p.detach() for p in spec.models["policy"].parameters()]))
    (m1, p1), (m2, p2) = results
    for a, b in zip(m1, m2, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    for a, b in zip(p1, p2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss_type, f_div", [("hinge", "reverse_kl"), ("sigmoid", "js_divergence")])
def test_trl_dpo_loss_types_train_through_the_preference_loop(loss_type, f_div, tmp_path):
    """preference.dpo_loss_type / f_divergence reach the loss: on the first step (policy =
    reference, every margin 0) the loss takes the type's closed form and differs from DPO's."""
    import json

    from psirl.train import run_config

    losses = {}
    for name, lt, fd in (("dpo", "sigmoid", "reverse_kl"), ("alt", loss_type, f_div)):
        cfg = config_from_dict({
            "loop": "preference", "output_dir": str(tmp_path / name), "seed": 0,
            "device": "cpu", "model": {"tiny": {"hidden_size": 32, "num_layers": 1,
                                                "intermediate_size": 64}},
            "data": {"task": "addition", "task_kwargs": {"digits": 1}, "n_train": 64},
            "preference": {"loss": "dpo", "beta": 0.5, "dpo_loss_type": lt, "f_divergence": fd},
            "max_steps": 2,
            "optim": {"lr": 1e-3, "batch_size": 8}, "checkpoint": {"every": 0}})
        run = run_config(cfg, quiet=True)
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [r["loss"] for r in rows if "loss" in r]
    assert losses["dpo"][0] == pytest.approx(math.log(2), abs=1e-5)  # -log sigmoid(0)
    if loss_type == "hinge":  # at the start h = 0 (policy = reference): max(0, 1 - 0) = 1
        assert losses["alt"][0] == pytest.approx(1.0, abs=1e-5)
    assert losses["alt"][1] != pytest.approx(losses["dpo"][1], rel=1e-4)
