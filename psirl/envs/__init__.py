"""Built-in environments for multi-turn episodes (psirl/rollout/episode.py), one per module.

``build_env_factory(name, kwargs)`` turns ``env.name`` of the config into a factory of fresh
environments: a built-in name from ``ENVIRONMENTS`` or a user class given as ``module:Class``
(imported on use, like custom rewards).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

ENVIRONMENTS: dict[str, str] = {
    "calculator": "psirl.envs.calculator:CalculatorEnv",
    "python_tool": "psirl.envs.python_tool:PythonToolEnv",
}


def resolve_env_class(name: str) -> type:
    """The class named by a built-in name or ``module:Class``; ValueError naming ``env.name``."""
    target = ENVIRONMENTS.get(name, name)
    if ":" not in target:
        raise ValueError(f"env.name: {name!r} is neither a built-in environment "
                         f"({', '.join(ENVIRONMENTS)}) nor 'module:Class'")
    module_name, attr = target.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"env.name: cannot import module {module_name!r} ({exc})") from exc
    cls = getattr(module, attr, None)
    if cls is None:
        raise ValueError(f"env.name: module {module_name!r} has no attribute {attr!r}")
    if not (callable(getattr(cls, "reset", None)) and callable(getattr(cls, "step", None))):
        raise ValueError(f"env.name: {name!r} has no reset(record) and step(turn) methods")
    return cls


def build_env_factory(name: str, kwargs: dict[str, Any] | None = None) -> Callable[[], Any]:
    """A function making a fresh environment per episode: ``Class(**kwargs)``. The class is
    built once here so that a bad keyword fails at load time, naming ``env.kwargs``."""
    cls = resolve_env_class(name)
    kwargs = dict(kwargs or {})
    try:
        cls(**kwargs)
    except TypeError as exc:
        raise ValueError(f"env.kwargs: {name!r} does not accept {sorted(kwargs)} ({exc})") from exc
    return lambda: cls(**kwargs)


def demonstration_examples(env_config, records, share: float = 1.0) -> list[dict[str, Any]]:
    """SFT examples ``{"prompt", "segments"}`` for ``records``: ``segments`` is a list of
    (text, written_by_model) pairs; the SFT loop trains on the model's segments only.

    The first ``round(share * len(records))`` records get the environment's oracle episode,
    ``env.demonstration(record)`` (e.g. CalculatorEnv: the tool call, the observation, the
    answer); the rest get the plain answer ``[(record["answer"], True)]`` (no tool call).
    ValueError naming ``env.name`` when a demonstration is needed and the environment has no
    ``demonstration`` method; naming the record when a plain answer has no ``answer`` field.
    """
    make_env = build_env_factory(env_config.name, env_config.kwargs)
    n_demos = round(share * len(records))
    if n_demos and not callable(getattr(make_env(), "demonstration", None)):
        raise ValueError(f"env.name: {env_config.name!r} has no demonstration(record) method, "
                         f"so the SFT loop cannot make examples from it (remove env: from the "
                         f"SFT config, or give data.train_path)")
    examples = []
    for i, record in enumerate(records):
        env = make_env()
        prompt = env.reset(record)
        if i < n_demos:
            segments = list(env.demonstration(record))
        elif "answer" in record:
            segments = [(str(record["answer"]).strip(), True)]
        else:
            raise ValueError(f"record {i + 1}: field 'answer': missing (a plain-answer example, "
                             f"sft.demonstration_share < 1, needs it)")
        examples.append({"prompt": prompt, "segments": segments})
    return examples


def run_env_episodes(env_config, engine, records, params):
    """``run_episodes`` with the settings of a config's ``env`` section (EnvConfig): the call
    the online loop makes instead of ``engine.generate`` when ``config.env`` is set."""
    from psirl.rollout.episode import run_episodes

    return run_episodes(
        engine,
        build_env_factory(env_config.name, env_config.kwargs),
        records,
        params,
        max_turns=env_config.max_turns,
        max_episode_tokens=env_config.max_episode_tokens,
        observation_role=env_config.observation_role,
        chat=env_config.chat,
    )


def evaluate_env(env_config, engine, records, max_new_tokens: int, *, seed: int = 0,
                 greedy: bool = True) -> dict[str, float]:
    """Held-out success of the policy on ``records`` as episodes (greedy by default).

    Returns eval/env_success (share of episodes that the environment ended with a positive
    reward on the final turn: for the built-in environments, a correct answer; per-turn bonuses
    do not count), eval/env_return (mean return), eval/env_turns, and eval/env_<metric> for the
    environment's step metrics (e.g. eval/env_tool_call: share of turns that called a tool).
    """
    import torch

    from psirl.rollout.batch import SamplingParams

    params = SamplingParams(temperature=0.0 if greedy else 1.0, max_new_tokens=max_new_tokens,
                            n=1, seed=seed)
    episodes = run_env_episodes(env_config, engine, list(records), params)
    batch = episodes.batch
    done = ~batch.truncated
    steps = torch.arange(batch.completion_len)
    last = torch.where(batch.completion_mask > 0, steps, -1).max(dim=1).values.clamp(min=0)
    final_reward = episodes.token_rewards.gather(1, last.unsqueeze(1)).squeeze(1)
    out = {
        "eval/env_success": float(((final_reward > 0) & done).float().mean()),
        "eval/env_return": float(episodes.rewards.mean()),
        "eval/env_turns": float(episodes.turns.float().mean()),
    }
    out.update({f"eval/env_{k[4:]}": v for k, v in episodes.metrics.items()
                if k.startswith("env/")})
    return out


def episode_evaluator(config, engine_of, records, max_new_tokens: int):
    """The evaluate(step_index) of a run with an ``env:`` section: held-out success of whole
    episodes on ``records`` (evaluate_env), greedy (eval/env_*) when ``eval.greedy`` and
    sampled at temperature 1 (eval/env_*_sampled, seeded by config.seed) when ``eval.sampled``.

    engine_of(): the engine to run, synced with the policy (a function, so a loop without an
    engine of its own, SFT, builds one only when it evaluates). None when there are no records.
    """
    if not records:
        return None

    def evaluate(step_index: int) -> dict[str, float]:
        engine = engine_of()
        out: dict[str, float] = {}
        if config.eval.greedy:
            out.update(evaluate_env(config.env, engine, records, max_new_tokens,
                                    seed=config.seed, greedy=True))
        if config.eval.sampled:
            sampled = evaluate_env(config.env, engine, records, max_new_tokens,
                                   seed=config.seed, greedy=False)
            out.update({f"{k}_sampled": v for k, v in sampled.items()})
        return out

    return evaluate
