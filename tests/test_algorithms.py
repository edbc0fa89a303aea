"""Knob dataclasses, presets (values from the references), overrides, warnings, method matrix."""

import dataclasses
import warnings

import pytest

import psirl.algorithms as alg
from psirl.algorithms import (
    PRESETS,
    AdvantageKnobs,
    KLControlKnobs,
    KnobWarning,
    OnlineKnobs,
    PolicyLossKnobs,
    SamplingKnobs,
    ValueKnobs,
    knobs_from_dict,
    knobs_to_dict,
    method_matrix,
    resolve_preset,
)
from psirl.core.advantages import ADVANTAGE_ESTIMATORS
from psirl.core.aggregate import AGGREGATION_MODES
from psirl.core.clip import CLIP_RULES


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(alg, "_WARNED", set())


def test_defaults_match_the_contract_and_are_frozen():
    k = PolicyLossKnobs()
    assert (k.ratio, k.clip, k.eps_low, k.eps_high, k.dual_clip_c) == ("token", "symmetric", 0.2, 0.2, 3.0)
    assert (k.aggregation, k.constant_normaliser, k.kl_estimator, k.kl_placement) == (
        "token_mean", None, "k3", "none")
    assert (k.kl_coef, k.entropy_coef) == (0.0, 0.0)
    a = AdvantageKnobs()
    assert (a.estimator, a.gamma, a.lam) == ("group_mean_std", 1.0, 1.0)
    c = KLControlKnobs()
    assert (c.adaptive, c.target, c.horizon, c.ref_reset_every) == (False, 0.1, 10000, 0)
    s = SamplingKnobs()
    assert (s.group_size, s.temperature, s.top_p, s.top_k, s.max_new_tokens) == (8, 1.0, 1.0, 0, 64)
    assert (s.dynamic_sampling, s.max_resample_rounds, s.epochs, s.minibatches) == (False, 4, 1, 1)
    v = ValueKnobs()
    assert (v.vf_coef, v.value_clip) == (0.5, 0.2)
    o = OnlineKnobs()
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.loss.eps_low = 0.1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("cls", "field", "value"),
    [
        (PolicyLossKnobs, "ratio", "tokens"),
        (PolicyLossKnobs, "clip", "ppo"),
        (PolicyLossKnobs, "eps_low", -0.1),
        (PolicyLossKnobs, "eps_low", 1.5),
        (PolicyLossKnobs, "eps_high", float("nan")),
        (PolicyLossKnobs, "eps_high", "0.2"),
        (PolicyLossKnobs, "dual_clip_c", 1.0),
        (PolicyLossKnobs, "aggregation", "mean"),
        (PolicyLossKnobs, "constant_normaliser", 0.0),
        (PolicyLossKnobs, "kl_estimator", "k4"),
        (PolicyLossKnobs, "kl_placement", "reward"),
        (PolicyLossKnobs, "kl_coef", -1.0),
        (PolicyLossKnobs, "entropy_coef", -0.1),
        (AdvantageKnobs, "estimator", "grpo"),
        (AdvantageKnobs, "gamma", 1.1),
        (AdvantageKnobs, "lam", -0.5),
        (AdvantageKnobs, "eps", -1e-6),
        (KLControlKnobs, "adaptive", 1),
        (KLControlKnobs, "target", 0.0),
        (KLControlKnobs, "horizon", 0),
        (KLControlKnobs, "ref_reset_every", 2.5),
        (SamplingKnobs, "group_size", 0),
        (SamplingKnobs, "group_size", True),
        (SamplingKnobs, "temperature", 0.0),
        (SamplingKnobs, "top_p", 0.0),
        (SamplingKnobs, "top_k", -1),
        (SamplingKnobs, "max_new_tokens", 0),
        (SamplingKnobs, "dynamic_sampling", "yes"),
        (SamplingKnobs, "max_resample_rounds", -1),
        (SamplingKnobs, "epochs", 0),
        (SamplingKnobs, "minibatches", 0),
        (ValueKnobs, "vf_coef", -1.0),
        (ValueKnobs, "value_clip", 0.0),
    ],
)
def test_bad_values_raise_naming_the_field(cls, field, value):
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.{field}"):
        cls(**{field: value})


def test_numbers_are_coerced_and_optional_fields_accept_none():
    k = PolicyLossKnobs(eps_low=0, eps_high=0)
    assert isinstance(k.eps_low, float)
    assert SamplingKnobs(group_size=4.0).group_size == 4
    assert ValueKnobs(value_clip=None).value_clip is None


def test_cross_field_checks_name_the_field():
    with pytest.raises(ValueError, match="eps_high"):
        PolicyLossKnobs(clip="symmetric", eps_low=0.2, eps_high=0.28)
    with pytest.raises(ValueError, match="kl_coef"):
        PolicyLossKnobs(kl_placement="none", kl_coef=0.1)
    with pytest.raises(ValueError, match="sampling.group_size"):
        OnlineKnobs(advantage=AdvantageKnobs("leave_one_out"), sampling=SamplingKnobs(group_size=1))
    with pytest.raises(ValueError, match="sampling.group_size"):
        OnlineKnobs(advantage=AdvantageKnobs("none"),
                    sampling=SamplingKnobs(group_size=1, dynamic_sampling=True))
    with pytest.raises(ValueError, match="kl_control.adaptive"):
        OnlineKnobs(kl_control=KLControlKnobs(adaptive=True))
    with pytest.raises(ValueError, match="OnlineKnobs.loss"):
        OnlineKnobs(loss={"ratio": "token"})  # type: ignore[arg-type]


# ----------------------------------------------------------------- presets


def test_preset_names_and_metadata():
    assert list(PRESETS) == [
        "reinforce", "reinforce_pp", "reinforce_pp_baseline", "rloo", "ppo", "grpo", "dr_grpo",
        "dapo", "gspo", "cispo",
    ]
    for name, preset in PRESETS.items():
        assert set(preset) == {"paper", "vs_grpo", "knobs"}, name
        assert preset["paper"].strip(), name
        sentence = preset["vs_grpo"]
        assert sentence.endswith(".") and sentence.count(". ") == 0, name  # one sentence
        resolve_preset(name)  # every preset is valid


def _key(name):
    k = resolve_preset(name)
    return (k.advantage.estimator, k.loss.ratio, k.loss.clip, k.loss.eps_low, k.loss.eps_high,
            k.loss.aggregation, k.loss.kl_estimator if k.loss.kl_coef else None,
            k.loss.kl_placement, k.loss.kl_coef)


def test_preset_values_follow_the_references():
    assert _key("reinforce")[:3] == ("none", "on_policy", "none")
    assert _key("reinforce_pp") == ("batch_mean", "on_policy", "none", 0.2, 0.2,
                                    "seq_mean_token_sum", "k1", "reward_token", 0.01)
    assert _key("rloo")[:3] == ("leave_one_out", "on_policy", "none")
    assert _key("rloo")[5] == "token_mean"
    assert _key("ppo") == ("gae", "token", "symmetric", 0.2, 0.2, "token_mean", "k1",
                           "reward_token", 0.05)
    ppo = resolve_preset("ppo")
    assert (ppo.advantage.gamma, ppo.advantage.lam) == (1.0, 0.95)
    assert _key("grpo") == ("group_mean_std", "token", "symmetric", 0.2, 0.2,
                            "seq_mean_token_mean", "k3", "loss", 0.04)
    assert _key("dr_grpo")[:2] == ("group_mean", "token") and _key("dr_grpo")[5] == "constant"
    assert _key("dapo") == ("group_mean_std", "token", "asymmetric", 0.2, 0.28, "token_mean",
                            None, "none", 0.0)
    assert resolve_preset("dapo").sampling.dynamic_sampling is True
    assert _key("gspo")[1:5] == ("sequence", "asymmetric", 3e-4, 4e-4)
    assert _key("cispo")[2:6] == ("cispo", 1.0, 0.28, "token_mean")


def test_dr_grpo_constant_normaliser_is_max_new_tokens_and_follows_overrides():
    assert resolve_preset("dr_grpo").loss.constant_normaliser == 64.0
    k = resolve_preset("dr_grpo", {"sampling.max_new_tokens": 512})
    assert k.loss.constant_normaliser == 512.0
    k = resolve_preset("dr_grpo", {"loss.constant_normaliser": 100})
    assert k.loss.constant_normaliser == 100.0


def test_every_knob_choice_is_a_core_name():
    for name in PRESETS:
        k = resolve_preset(name)
        assert k.advantage.estimator in ADVANTAGE_ESTIMATORS
        assert k.loss.clip in CLIP_RULES
        assert k.loss.aggregation in AGGREGATION_MODES


# ----------------------------------------------------------------- overrides


def test_overrides_dotted_nested_and_mixed():
    a = resolve_preset("grpo", {"loss.kl_coef": 0.1, "sampling.group_size": 4})
    b = resolve_preset("grpo", {"loss": {"kl_coef": 0.1}, "sampling": {"group_size": 4}})
    c = resolve_preset("grpo", {"loss": {"kl_coef": 0.1}, "sampling.group_size": 4})
    assert a == b == c
    assert a.loss.kl_coef == 0.1 and a.sampling.group_size == 4
    assert resolve_preset("grpo").loss.kl_coef == 0.04  # PRESETS not mutated


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"loss.eps_hgh": 0.3}, "loss.eps_hgh"),
        ({"los.eps_high": 0.3}, "los.eps_high"),
        ({"loss": {"epsilon": 0.3}}, "loss.epsilon"),
        ({"losses": {"eps_high": 0.3}}, "losses"),
        ({"loss.eps.high": 0.3}, "loss.eps.high"),
        ({"eps_high": 0.3}, "eps_high"),
    ],
)
def test_unknown_override_key_is_an_error_naming_it(overrides, named):
    with pytest.raises(ValueError, match=rf"unknown knob '{named}'"):
        resolve_preset("grpo", overrides)


def test_unknown_key_suggests_the_closest_name():
    with pytest.raises(ValueError, match="did you mean 'loss.eps_high'"):
        resolve_preset("grpo", {"loss.eps_hgh": 0.3})


def test_bad_override_value_names_preset_and_field():
    with pytest.raises(ValueError, match=r"preset 'dapo'.*PolicyLossKnobs\.eps_high"):
        resolve_preset("dapo", {"loss.eps_high": -1})


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'grpo2'"):
        resolve_preset("grpo2")


def test_dict_round_trip():
    for name in PRESETS:
        k = resolve_preset(name)
        assert knobs_from_dict(knobs_to_dict(k)) == k
    assert knobs_from_dict(None) == OnlineKnobs()
    with pytest.raises(ValueError, match="unknown knob 'value.clip'"):
        knobs_from_dict({"value": {"clip": 0.1}})


# ----------------------------------------------------------------- warnings


def test_k3_in_reward_warns_once_citing_001():
    with pytest.warns(KnobWarning, match="001") as record:
        PolicyLossKnobs(kl_estimator="k3", kl_placement="reward_token", kl_coef=0.1)
        PolicyLossKnobs(kl_estimator="k3", kl_placement="reward_sequence", kl_coef=0.1)
    assert len(record) == 1 and "k3" in str(record[0].message)


def test_k1_in_loss_warns_once_citing_001():
    with pytest.warns(KnobWarning, match="001") as record:
        resolve_preset("grpo", {"loss.kl_estimator": "k1"})
        resolve_preset("grpo", {"loss.kl_estimator": "k1"})
    assert len(record) == 1 and "k1" in str(record[0].message)


def test_presets_and_good_combinations_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in PRESETS:
            resolve_preset(name)
        PolicyLossKnobs(kl_estimator="k2", kl_placement="loss", kl_coef=0.1)
        PolicyLossKnobs(kl_estimator="k3", kl_placement="reward_token", kl_coef=0.0)


# ----------------------------------------------------------------- method matrix


def test_method_matrix_rows():
    rows = {r["method"]: r for r in method_matrix()}
    assert list(rows) == list(PRESETS)
    for r in rows.values():
        assert set(r) == {"method", "baseline", "advantage_unit", "ratio_clip_unit",
                          "length_handling", "kl", "paper"}
    assert rows["reinforce"]["baseline"] == "none"
    assert rows["reinforce"]["ratio_clip_unit"] == "none (on-policy)"
    assert rows["rloo"]["baseline"].startswith("leave-one-out")
    assert rows["rloo"]["length_handling"].startswith("token-mean")
    assert rows["ppo"]["baseline"] == "learned value V_phi, then batch whitening"
    assert rows["ppo"]["advantage_unit"].startswith("token (GAE")
    assert rows["grpo"]["baseline"].startswith("group mean / std")
    assert rows["grpo"]["length_handling"].startswith("per-response then per-group")
    assert rows["grpo"]["kl"] == "k3 in loss, beta=0.04"
    assert "clip-higher" in rows["dapo"]["ratio_clip_unit"]
    assert "dynamic sampling" in rows["dapo"]["ratio_clip_unit"]
    assert rows["dapo"]["kl"] == "none"
    assert rows["gspo"]["ratio_clip_unit"].startswith("sequence")
    assert "IS weight" in rows["cispo"]["ratio_clip_unit"]
    assert rows["reinforce_pp"]["kl"] == "k1 in reward, per token, beta=0.01"


def test_knob_catalog_lists_every_registry_value():
    import json

    from psirl.algorithms import knob_catalog
    from psirl.core.clip import CLIP_RULES
    from psirl.core.kl import KL_ESTIMATORS

    cat = knob_catalog()
    json.dumps(cat)  # JSON-able for `psirl algorithms --json`
    assert set(cat["advantage_estimators"]) == set(ADVANTAGE_ESTIMATORS)
    assert cat["advantage_estimators"]["gpg"]["global_statistics"] is True
    assert cat["advantage_estimators"]["remax"]["inputs"] == ["baseline_rewards"]
    assert cat["kl_estimators"] == list(KL_ESTIMATORS) and "k3_ratio" in cat["kl_estimators"]
    assert cat["clip_rules"] == list(CLIP_RULES) and "sapo" in cat["clip_rules"]
    assert "discopop" in cat["preference_losses"]["dpo_loss_types"]
    # every value the catalog lists is accepted by the knobs
    for name in cat["advantage_estimators"]:
        AdvantageKnobs(estimator=name)
    for est in cat["kl_estimators"]:
        PolicyLossKnobs(kl_estimator=est)
    for rule in cat["clip_rules"]:
        PolicyLossKnobs(clip=rule, eps_low=0.2, eps_high=0.2)


def test_estimator_properties_reach_the_knob_checks():
    # group-scope estimators need two samples per prompt: derived from the registry
    from psirl.core.advantages import ESTIMATORS

    for name, spec in ESTIMATORS.items():
        knobs = {"advantage": {"estimator": name}, "sampling": {"group_size": 1}}
        if spec.scope == "group":
            with pytest.raises(ValueError, match="group_size"):
                knobs_from_dict(knobs)
        else:
            assert knobs_from_dict(knobs).advantage.estimator == name
    with pytest.raises(ValueError, match="whiten"):
        AdvantageKnobs(whiten="global")
    with pytest.raises(ValueError, match="kl_clamp"):
        PolicyLossKnobs(kl_clamp=0.0)
