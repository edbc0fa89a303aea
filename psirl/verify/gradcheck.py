"""`psirl gradcheck`: every preset x KL placement, sampled gradient vs exact gradient.

On the default enumeration problem (``exact.make_problem``: 2 prompts, V = 3, H = 3, rewards
chosen so the variance ordering of 000 is large) every preset of ``psirl.algorithms.PRESETS``
is run through the real online-step pipeline (``sampled.per_batch_gradients``) with each KL
setting of ``KL_SETTINGS`` and compared with the exact gradient of J = E[R] - beta KL.

Harness choices (the same for every preset, so the table differs only by the knobs that define
a method): every batch is P = 2 prompts x G = 4 samples (B = 8; the presets' own group sizes
are overridden), beta = 0.5 for every KL setting (the presets' own beta of 0.01-0.05 would
hide the KL terms in the noise), no entropy bonus, the on-policy single-update gradient
(ratio = 1, so clipping is inactive), and PPO's critic is the exact value function of the
shaped reward (so GAE is unbiased for every lambda; see tests/verify for a wrong critic).

Expectations (the exit code is 0 only if all hold):
- "unbiased" -- estimators with a known scale c (none, batch mean, leave-one-out, group mean,
  GAE with the exact critic) with no KL or k1 in the reward (001: "K1 in Reward: unbiased";
  000: any state-only baseline keeps the gradient unbiased): Hotelling's test must NOT reject
  E[g] = c grad J.
- "biased" -- std-scaled advantages (GRPO, DAPO, GSPO, CISPO; 002: "GRPO std-norm: a small
  bias"), k3 in the reward (001: biased), k1 in the loss (001: zero in expectation, so grad J's
  KL part is missing), k2 and k3 in the loss (001: "K3 Loss: biased"; in expectation they are
  the gradients of the per-state reverse KL and of the per-state *forward* KL(pi_ref || pi)
  with the state visits held fixed, ``exact.exact_statewise_kl_gradient``): the test MUST
  reject.
- the 001 table, on the KL-only objective (R = 0, J = -beta KL): k1/reward "unbiased",
  k3/reward "biased", k1/loss "zero in expectation", k3/loss "biased".
- the variance per sample (``GradientStats.var_per_sample``, no KL) orders as 000 says:
  REINFORCE > REINFORCE++ > max(RLOO, GRPO), and PPO with an exact critic is the lowest.
All tests run at a Bonferroni-corrected level alpha = ALPHA_FAMILY / n_tests, so the chance
that any "unbiased" verdict fails by bad luck is <= ALPHA_FAMILY = 1%.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, replace
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from psirl import algorithms
from psirl.core.advantages import ESTIMATORS
from psirl.verify.exact import TabularProblem, exact_statewise_kl_gradient, make_problem
from psirl.verify.sampled import (
    SampledBatches,
    compare_to_exact,
    estimate,
    harness_knobs,
    sample_batches,
)
from psirl.verify.stats import bonferroni_alpha

__all__ = [
    "ALPHA_FAMILY",
    "KL_SETTINGS",
    "KL_VARIANT_CELLS",
    "ESTIMATOR_CASES",
    "LOSS_CASES",
    "loss_table",
    "estimator_table",
    "KLSetting",
    "expected_verdict",
    "kl_placement_table",
    "run_gradcheck",
    "format_table",
    "format_kl_table",
    "format_aggregation_table",
    "format_variance_order",
    "aggregation_table",
    "main",
]

ALPHA_FAMILY = 0.01
HARNESS_GROUP_SIZE = 4
DEFAULT_N_BATCHES = 4096


@dataclass(frozen=True)
class KLSetting:
    """One KL column of the table: label, placement (PolicyLossKnobs.kl_placement), estimator."""

    label: str
    placement: str
    estimator: str


KL_SETTINGS: tuple[KLSetting, ...] = (
    KLSetting("none", "none", "k1"),
    KLSetting("k1 reward/token", "reward_token", "k1"),
    KLSetting("k1 reward/seq", "reward_sequence", "k1"),
    KLSetting("k3 reward/token", "reward_token", "k3"),
    KLSetting("k1 loss", "loss", "k1"),
    KLSetting("k2 loss", "loss", "k2"),
    KLSetting("k3 loss", "loss", "k3"),
)


def expected_verdict(estimator: str, kl: KLSetting, whiten: str = "none") -> tuple[str, str]:
    """(expected verdict "unbiased" | "biased", the reason with its reference) for a row.

    The estimator's part is read from core.advantages.ESTIMATORS (its ``unbiased`` flag and
    ``bias`` note); whitening after the estimator divides by a random std: biased.
    """
    spec = ESTIMATORS[estimator]
    if not spec.unbiased:
        return "biased", spec.bias
    if whiten != "none":
        return "biased", f"{whiten} whitening divides by a random std (as std scaling, 002)"
    if kl.placement == "none":
        return "unbiased", "state-only baseline (000: zero-gradient property)"
    if kl.placement.startswith("reward"):
        if kl.estimator == "k1":
            return "unbiased", "k1 in reward (001: unbiased)"
        return "biased", f"{kl.estimator} in reward (001: k3 in reward is biased)"
    if kl.estimator == "k1":
        return "biased", "k1 in loss: KL gradient zero in expectation (001)"
    if kl.estimator == "k2":
        return "biased", "k2 in loss: per-state reverse KL, misses later states (001)"
    return "biased", "k3 in loss: per-state forward KL(ref||pi) (001: k3 loss biased)"


def _quiet_knobs(knobs: Any, kl: KLSetting, beta: float, group_size: int) -> Any:
    """harness_knobs without consuming algorithms' once-per-process user warnings.

    The harness builds the known-bad combinations (k3 in reward, k1 in loss) on purpose; the
    warn-once registry is restored so a user of the same process still gets the warning.
    """
    registry = getattr(algorithms, "_WARNED", None)
    saved = set(registry) if isinstance(registry, set) else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = harness_knobs(
            knobs,
            kl_placement=kl.placement,
            kl_estimator=kl.estimator,
            kl_coef=beta,
            group_size=group_size,
        )
    if saved is not None:
        registry.clear()
        registry.update(saved)
    return out


def _preset_kl_label(knobs: Any) -> str:
    loss = knobs.loss
    if loss.kl_placement == "none" or loss.kl_coef == 0:
        return "none"
    for s in KL_SETTINGS:
        if s.placement == loss.kl_placement and s.estimator == loss.kl_estimator:
            return s.label
    return f"{loss.kl_estimator} {loss.kl_placement}"


# The anchors' further KL estimators (core.kl.KL_ESTIMATORS), in the reward and in the loss, on
# the same KL-only objective. The value decides the reward placement (k1+ is k1 there: unbiased;
# k3+, low_var_kl, abs: biased); in the loss the straight-through "+" variants and TRL's
# ratio-corrected k3 have the expected gradient of the per-state reverse KL (consistent_with
# shows it), which misses the effect of a token on later states: biased for the sequence KL.
KL_VARIANT_CELLS: dict[tuple[str, str], str] = {
    ("k1+", "reward"): "unbiased",
    ("k1+", "loss"): "biased",
    ("k3+", "loss"): "biased",
    ("low_var_kl", "reward"): "biased",
    ("low_var_kl+", "loss"): "biased",
    ("abs", "reward"): "biased",
    ("abs", "loss"): "biased",
    ("k3_ratio", "loss"): "biased",
}


def kl_placement_table(
    problem: TabularProblem, batches: SampledBatches, alpha: float
) -> list[dict[str, Any]]:
    """The k1/k3 x reward/loss table of 001, measured on the KL-only objective.

    With R = 0 the objective is J = -beta KL(pi || pi_ref) and the REINFORCE estimator
    (estimator "none", so nothing else is in the gradient) is run with each KL setting. Two
    Hotelling tests per cell: E[g] = -beta grad KL (p_exact) and E[g] = 0 (p_zero). Verdict:
    p_exact >= alpha -> "unbiased"; else p_zero >= alpha -> "zero in expectation"; else
    "biased". For information, each cell is also tested against -beta times the per-state
    divergences of ``exact_statewise_kl_gradient`` ("per-state reverse KL", "per-state forward
    KL(ref||pi)": the expected gradients of k2 and k3 in the loss); ``consistent_with`` lists
    every target the cell is not rejected against. Returns one dict per cell (estimator,
    placement, verdict, expected, ok, consistent_with, cosine, relative_bias,
    mean_norm_over_exact_norm, p_exact, p_zero, var_per_sample).
    """
    kl_only = replace(problem, rewards=torch.zeros_like(problem.rewards))
    zero_batches = replace(batches, rewards=torch.zeros_like(batches.rewards))
    base = algorithms.resolve_preset("reinforce")
    beta = problem.kl_coef
    expected = {
        ("k1", "reward"): "unbiased",
        ("k3", "reward"): "biased",
        ("k1", "loss"): "zero in expectation",
        ("k3", "loss"): "biased",
        **KL_VARIANT_CELLS,
    }
    others = {
        "per-state reverse KL": -beta * exact_statewise_kl_gradient(problem, "reverse"),
        "per-state forward KL(ref||pi)": -beta * exact_statewise_kl_gradient(problem, "forward"),
    }
    rows = []
    for (est, where), want in expected.items():
        kl = KLSetting(f"{est} {where}", "reward_token" if where == "reward" else "loss", est)
        knobs = _quiet_knobs(base, kl, beta, batches.group_size)
        stats, grads = estimate(kl_only, zero_batches, knobs)

        def p_against(target: torch.Tensor, g: torch.Tensor = grads.total) -> float:
            return compare_to_exact(
                g, problem.reachable, batches.batch_size, advantaged=target, scale=1.0
            ).p_value

        p_zero = p_against(torch.zeros_like(stats.target))
        if stats.p_value >= alpha:
            verdict = "unbiased"
        elif p_zero >= alpha:
            verdict = "zero in expectation"
        else:
            verdict = "biased"
        consistent = [
            name
            for name, p in (
                ("grad KL", stats.p_value),
                ("zero", p_zero),
                *((n, p_against(t)) for n, t in others.items()),
            )
            if p >= alpha
        ]
        rows.append(
            {
                "estimator": est,
                "placement": where,
                "verdict": verdict,
                "expected": want,
                "ok": verdict == want,
                "consistent_with": consistent,
                "cosine": stats.cosine,
                "relative_bias": stats.relative_bias,
                "mean_norm_over_exact_norm": float(stats.mean.norm() / stats.exact.norm()),
                "p_exact": stats.p_value,
                "p_zero": p_zero,
                "var_per_sample": stats.var_per_sample,
            }
        )
    return rows


# Estimators that are knob values rather than presets: (estimator, expected, why). pass@k
# (grpo_passk) only moves the prefixes of each group's best sample, so most coordinates never
# vary in M batches; its exact expectation (grad E[max of G]) is checked by enumerating every
# G-tuple in tests/core/test_estimator_registry.py instead.
ESTIMATOR_CASES: tuple[tuple[str, str, str], ...] = (
    ("remax", "unbiased", "greedy baseline is state-only (ReMax): c = 1"),
    ("opo", "unbiased", "fixed length: b = group mean, c = 1 - 1/G (OPO)"),
    ("gpg", "unbiased", "no zero reward here: alpha = 1, GPG = Dr. GRPO, c = 1 - 1/G"),
)
# batch_whiten (batch mean / batch std) is biased in theory, but on this problem the bias is
# below what 1024-4096 batches resolve (p ~ 1e-4 .. 0.02), so it has no row.


def estimator_table(
    problem: TabularProblem, batches: SampledBatches, alpha: float
) -> list[dict[str, Any]]:
    """Advantage estimators that no preset uses (ESTIMATOR_CASES), each with no KL.

    RLOO's step (on-policy, token-mean) with advantage.estimator replaced; the known scale c
    comes from the registry (core.advantages.ESTIMATORS[...].scale; OPO and GPG have none in
    general, and get c = 1 - 1/G where this problem makes them Dr. GRPO: fixed length, no zero
    reward). Returns one dict per case.
    """
    g = batches.group_size
    rows = []
    for name, want, why in ESTIMATOR_CASES:
        preset = algorithms.resolve_preset("rloo", {"advantage.estimator": name})
        knobs = _quiet_knobs(preset, KL_SETTINGS[0], 0.0, g)
        scale: float | None | str = "known" if ESTIMATORS[name].unbiased else None
        if name in ("opo", "gpg"):
            scale = 1.0 - 1.0 / g
        stats, _ = estimate(problem, batches, knobs, scale=scale)
        verdict = "unbiased" if stats.agrees(alpha) else "biased"
        rows.append(
            {
                "estimator": name,
                "expected": want,
                "reason": why,
                "verdict": verdict,
                "ok": verdict == want,
                **stats.summary(),
            }
        )
    return rows


# Policy-loss rules that are knob values rather than presets: (clip rule, aggregation,
# expected, why), on RLOO advantages (unbiased, c = 1), no KL, the on-policy step (r = 1).
LOSS_CASES: tuple[tuple[str, str, str, str], ...] = (
    ("sapo", "token_mean", "unbiased", "f'(1) = 1: at r = 1 SAPO is the policy gradient"),
    ("gmpo", "seq_mean_token_mean", "unbiased",
     "at r = 1 the geometric mean gives (1/|y|) sum_t grad log pi: fixed length, c = 1"),
    ("kl_cov", "token_mean", "unbiased", "at r = 1 the |log r| penalty has zero gradient"),
)


def loss_table(
    problem: TabularProblem, batches: SampledBatches, alpha: float
) -> list[dict[str, Any]]:
    """The further policy-loss rules (LOSS_CASES) at the on-policy point, as the preset rows.

    Clip-Cov has no row: it cuts max(1, 2e-4 N) = 1 token of the B H = 24 per batch, a bias
    (by design) too small for this harness to resolve either way. Returns one dict per case.
    """
    rows = []
    for rule, aggregation, want, why in LOSS_CASES:
        preset = algorithms.resolve_preset(
            "rloo", {"loss.ratio": "token", "loss.clip": rule, "loss.aggregation": aggregation,
                     "loss.eps_low": 0.2, "loss.eps_high": 0.2}
        )
        knobs = _quiet_knobs(preset, KL_SETTINGS[0], 0.0, batches.group_size)
        stats, _ = estimate(problem, batches, knobs)
        verdict = "unbiased" if stats.agrees(alpha) else "biased"
        rows.append({"clip": rule, "aggregation": aggregation, "expected": want, "reason": why,
                     "verdict": verdict, "ok": verdict == want, **stats.summary()})
    return rows


AGGREGATION_CASES: tuple[tuple[str, bool, str, str], ...] = (
    # (aggregation, variable length?, presets using it, expected verdict)
    ("seq_mean_token_mean", False, "grpo, gspo", "unbiased"),
    ("token_mean", True, "rloo, ppo, dapo, cispo", "unbiased"),
    ("seq_mean_token_sum", True, "reinforce, reinforce_pp", "unbiased"),
    ("constant", True, "dr_grpo", "unbiased"),
    ("seq_mean_token_mean", True, "grpo, gspo", "biased"),
)


def aggregation_table(
    seed: int, n_batches: int, group_size: int, alpha: float
) -> list[dict[str, Any]]:
    """Loss aggregation (002's "Length" column), isolated from every other knob.

    RLOO advantages (unbiased, c = 1), on-policy, no KL, each aggregation mode, on the
    default problem (fixed length H) and on the same problem with an EOS token (token 0;
    lengths 1..H). After undoing the step normaliser (sampled module docstring) token_mean,
    seq_mean_token_sum and constant are the policy-gradient estimator exactly, whatever the
    lengths; seq_mean_token_mean weights each sequence by 1/|y_i| -- a constant H/|y| only at
    fixed length -- so with variable lengths its expectation is not parallel to grad J (the
    length bias of GRPO that DAPO and Dr. GRPO remove, 002). Its scale is then unknown and the
    direction-only test is used. Returns one dict per case.
    """
    fixed = make_problem()
    variable = make_problem(eos_token=0)
    batches = {
        False: sample_batches(fixed, n_batches, group_size, seed),
        True: sample_batches(variable, n_batches, group_size, seed),
    }
    rows = []
    for mode, var_len, users, want in AGGREGATION_CASES:
        problem = variable if var_len else fixed
        preset = algorithms.resolve_preset("rloo", {"loss.aggregation": mode})
        knobs = _quiet_knobs(preset, KL_SETTINGS[0], 0.0, group_size)
        stats, _ = estimate(problem, batches[var_len], knobs)
        verdict = "unbiased" if stats.agrees(alpha) else "biased"
        rows.append(
            {
                "aggregation": mode,
                "lengths": "1..H (EOS)" if var_len else "fixed H",
                "used_by": users,
                "expected": want,
                "verdict": verdict,
                "ok": verdict == want,
                **stats.summary(),
            }
        )
    return rows


def _variance_order(rows: list[dict[str, Any]]) -> dict[str, Any]:
    var = {r["preset"]: r["var_per_sample"] for r in rows if r["kl"] == "none"}
    needed = ("reinforce", "reinforce_pp", "rloo", "grpo", "ppo")
    if not all(k in var for k in needed):
        return {"variance": var, "ok": False, "checks": {"all presets present": False}}
    checks = {
        "reinforce > reinforce_pp": var["reinforce"] > var["reinforce_pp"],
        "reinforce_pp > rloo": var["reinforce_pp"] > var["rloo"],
        "reinforce_pp > grpo": var["reinforce_pp"] > var["grpo"],
        "ppo (exact critic) < min(rloo, grpo)": var["ppo"] < min(var["rloo"], var["grpo"]),
    }
    return {"variance": var, "checks": checks, "ok": all(checks.values())}


def run_gradcheck(
    seed: int = 0,
    n_batches: int | None = None,
    json_path: str | None = None,
    *,
    problem: TabularProblem | None = None,
    group_size: int = HARNESS_GROUP_SIZE,
    presets: tuple[str, ...] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Run every preset x KL setting and the 001 table; optionally write JSON.

    seed: seeds the sampled batches (the problem itself is fixed: make_problem(seed=0));
    n_batches: M independent batches per setting (default DEFAULT_N_BATCHES = 4096; the same
    M batches are reused by every row, common random numbers); json_path: where to write the
    result (None: do not write); problem / group_size / presets: override the defaults (the
    aggregation table always uses the default problem, with and without EOS).
    Returns a JSON-friendly dict: "config", "rows" (one per preset x KL setting: preset, kl,
    estimator, aggregation, preset_kl, expected, reason, verdict, ok, cosine, relative_bias,
    var_per_sample, snr_per_sample, scale, scale_known, p_value, t2, dof), "kl_table" (see
    kl_placement_table), "aggregation_table" (see aggregation_table), "variance_order",
    "alpha" (per-test level), "ok" (every expectation holds), "seconds".
    Runs with torch.set_num_threads(1) (restored afterwards).
    """
    threads = torch.get_num_threads()
    # The tensors are tiny (thousands of rows x 3 tokens): intra-op threads only add
    # synchronisation, which costs 10x on a loaded 2-core machine. Restored on exit.
    torch.set_num_threads(1)
    try:
        n_batches = DEFAULT_N_BATCHES if n_batches is None else n_batches
        return _run(seed, n_batches, json_path, problem, group_size, presets, progress)
    finally:
        torch.set_num_threads(threads)


def _run(
    seed: int,
    n_batches: int,
    json_path: str | None,
    problem: TabularProblem | None,
    group_size: int,
    presets: tuple[str, ...] | None,
    progress: bool,
) -> dict[str, Any]:
    start = time.perf_counter()
    problem = make_problem() if problem is None else problem
    names = tuple(algorithms.PRESETS) if presets is None else presets
    batches = sample_batches(problem, n_batches, group_size, seed)
    n_loss = sum(1 for k in KL_SETTINGS if k.placement == "loss")
    n_kl_cells = 4 + len(KL_VARIANT_CELLS)
    n_tests = (
        len(names) * (len(KL_SETTINGS) + n_loss)
        + n_kl_cells * 4
        + len(AGGREGATION_CASES)
        + len(ESTIMATOR_CASES)
        + len(LOSS_CASES)
    )
    alpha = bonferroni_alpha(ALPHA_FAMILY, n_tests)

    rows: list[dict[str, Any]] = []
    bar = None
    if progress:
        from rich.progress import Progress

        bar = Progress(transient=True)
        bar.start()
        task = bar.add_task("gradcheck", total=len(names) * len(KL_SETTINGS) + 1)
    try:
        for name in names:
            preset = algorithms.resolve_preset(name)
            for kl in KL_SETTINGS:
                knobs = _quiet_knobs(preset, kl, problem.kl_coef, group_size)
                stats, _ = estimate(problem, batches, knobs)
                want, reason = expected_verdict(
                    knobs.advantage.estimator, kl, knobs.advantage.whiten
                )
                verdict = "unbiased" if stats.agrees(alpha) else "biased"
                rows.append(
                    {
                        "preset": name,
                        "kl": kl.label,
                        "estimator": knobs.advantage.estimator,
                        "aggregation": knobs.loss.aggregation,
                        "preset_kl": _preset_kl_label(preset) == kl.label,
                        "expected": want,
                        "reason": reason,
                        "verdict": verdict,
                        "ok": verdict == want,
                        **stats.summary(),
                    }
                )
                if bar is not None:
                    bar.advance(task)
        kl_table = kl_placement_table(problem, batches, alpha)
        agg_table = aggregation_table(seed, n_batches, group_size, alpha)
        est_table = estimator_table(problem, batches, alpha)
        rule_table = loss_table(problem, batches, alpha)
        if bar is not None:
            bar.advance(task)
    finally:
        if bar is not None:
            bar.stop()

    order = _variance_order(rows) if presets is None else {"ok": True, "skipped": True}
    result: dict[str, Any] = {
        "config": {
            "seed": seed,
            "n_batches": n_batches,
            "group_size": group_size,
            "n_prompts": problem.policy.n_prompts,
            "batch_size": batches.batch_size,
            "vocab_size": problem.policy.vocab_size,
            "horizon": problem.policy.horizon,
            "kl_coef": problem.kl_coef,
        },
        "alpha": alpha,
        "alpha_family": ALPHA_FAMILY,
        "rows": rows,
        "kl_table": kl_table,
        "aggregation_table": agg_table,
        "estimator_table": est_table,
        "loss_table": rule_table,
        "variance_order": order,
    }
    result["ok"] = (
        all(r["ok"] for r in rows)
        and all(c["ok"] for c in kl_table)
        and all(a["ok"] for a in agg_table)
        and all(e["ok"] for e in est_table)
        and all(e["ok"] for e in rule_table)
        and bool(order["ok"])
    )
    result["seconds"] = time.perf_counter() - start
    if json_path is not None:
        with open(json_path, "w", encoding="utf-8") as fh:
            json.dump(_jsonable(result), fh, indent=2)
    return result


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def _fmt_p(p: float) -> str:
    return "<1e-99" if p < 1e-99 else f"{p:.1e}" if p < 0.01 else f"{p:.2f}"


def format_table(result: dict[str, Any]) -> Table:
    """The preset x KL table: cosine, relative bias, variance per sample, test, verdict.

    A '*' after the KL label marks the preset's own KL choice. Columns: c (scale: known
    baseline constant, or fitted '~' for std-scaled advantages), cos(mean, grad J),
    ||mean - target|| / ||target||, variance per sample (see GradientStats), Hotelling p
    (for KL in the loss, the smaller of the full-gradient and KL-part tests), measured
    verdict vs expected.
    """
    table = Table(
        title=f"Sampled vs exact gradient ({result['config']['n_batches']} batches of "
        f"{result['config']['batch_size']}; alpha = {result['alpha']:.1e})"
    )
    for col, just in (
        ("preset", "left"),
        ("KL", "left"),
        ("advantage", "left"),
        ("c", "right"),
        ("cos", "right"),
        ("rel. bias", "right"),
        ("var/sample", "right"),
        ("p", "right"),
        ("measured", "left"),
        ("expected", "left"),
    ):
        table.add_column(col, justify=just)
    last = None
    for r in result["rows"]:
        if last is not None and r["preset"] != last:
            table.add_section()
        last = r["preset"]
        mark = "" if r["ok"] else "[bold red]"
        table.add_row(
            r["preset"],
            r["kl"] + (" *" if r["preset_kl"] else ""),
            r["estimator"],
            f"{'' if r['scale_known'] else '~'}{r['scale']:.3f}",
            f"{r['cosine']:.3f}",
            f"{r['relative_bias']:.3f}",
            f"{r['var_per_sample']:.3g}",
            _fmt_p(r["p_min"]),
            f"{mark}{r['verdict']}",
            r["expected"],
        )
    return table


def format_kl_table(result: dict[str, Any]) -> Table:
    """The four cells of 001's table (k1/k3 x reward/loss), as measured on J = -beta KL."""
    table = Table(title="KL estimator x placement (ref 001), measured on J = -beta KL")
    for col in ("estimator", "in reward", "in loss"):
        table.add_column(col)
    cells = {(c["estimator"], c["placement"]): c for c in result["kl_table"]}
    for est in ("k1", "k3"):
        row = [est]
        for where in ("reward", "loss"):
            c = cells.get((est, where))
            if c is None:
                row.append("-")
                continue
            style = "" if c["ok"] else "[bold red]"
            matches = ", ".join(c["consistent_with"]) or "none of the targets"
            row.append(
                f"{style}{c['verdict']}{'[/]' if style else ''} "
                f"(|mean|/|grad| {c['mean_norm_over_exact_norm']:.2f}, "
                f"p vs grad KL {_fmt_p(c['p_exact'])}, p vs 0 {_fmt_p(c['p_zero'])}; "
                f"consistent with: {matches})"
            )
        table.add_row(*row)
    return table


def format_aggregation_table(result: dict[str, Any]) -> Table:
    """Aggregation modes with RLOO advantages, fixed vs variable length (002, "Length")."""
    table = Table(title="Loss aggregation (ref 002 length column), RLOO advantages, no KL")
    for col in ("aggregation", "lengths", "used by", "cos", "rel. bias", "p", "measured",
                "expected"):
        table.add_column(col)
    for a in result["aggregation_table"]:
        style = "" if a["ok"] else "[bold red]"
        table.add_row(
            a["aggregation"],
            a["lengths"],
            a["used_by"],
            f"{a['cosine']:.3f}",
            f"{a['relative_bias']:.3f}",
            _fmt_p(a["p_min"]),
            f"{style}{a['verdict']}",
            a["expected"],
        )
    return table


def format_variance_order(result: dict[str, Any]) -> str:
    """One line: variance per sample of the presets (no KL) and whether 000's ordering holds."""
    order = result["variance_order"]
    if order.get("skipped"):
        return "variance ordering: skipped (subset of presets)"
    var = order["variance"]
    names = sorted(var, key=var.get, reverse=True)
    line = " > ".join(f"{n} {var[n]:.3g}" for n in names)
    verdict = "holds" if order["ok"] else "FAILS: " + ", ".join(
        k for k, v in order["checks"].items() if not v
    )
    return f"variance per sample (no KL): {line}\n000 ordering REINFORCE > REINFORCE++ > RLOO/GRPO, PPO lowest: {verdict}"


def main(json_path: str | None = None, seed: int = 0) -> int:
    """Run the gradcheck, print the tables with rich, return 0 if every expectation holds."""
    console = Console()
    if not console.is_terminal:  # piped or captured: do not squeeze the table into 80 columns
        console = Console(width=132)
    result = run_gradcheck(seed=seed, json_path=json_path, progress=console.is_terminal)
    console.print(format_table(result))
    console.print(format_kl_table(result))
    console.print(format_aggregation_table(result))
    console.print(format_variance_order(result))
    failed = [f"{r['preset']} / {r['kl']}" for r in result["rows"] if not r["ok"]]
    failed += [f"001 {c['estimator']} in {c['placement']}" for c in result["kl_table"] if not c["ok"]]
    failed += [
        f"aggregation {a['aggregation']} ({a['lengths']})"
        for a in result["aggregation_table"]
        if not a["ok"]
    ]
    if not result["variance_order"]["ok"]:
        failed.append("variance ordering")
    from psirl.verify.multiturn import format_multiturn_table, multiturn_check

    multiturn = multiturn_check(seed=seed, n_batches=DEFAULT_N_BATCHES)  # episodes with env turns
    console.print(format_multiturn_table(multiturn))
    failed += [] if multiturn["ok"] else ["multi-turn episodes"]
    from psirl.verify.offpolicy import format_tis_table, tis_rows

    tis = tis_rows(seed=seed)  # truncated IS against an engine-trainer mismatch (exact bias)
    console.print(format_tis_table(tis))
    failed += [f"TIS {k}" for k, ok in tis["checks"].items() if not ok]
    result["tis"] = tis
    status = "all expectations hold" if not failed else "FAILED: " + "; ".join(failed)
    console.print(f"{status} ({result['seconds']:.1f} s)")
    if json_path is not None:
        console.print(f"wrote {json_path}")
    return 0 if not failed else 1
