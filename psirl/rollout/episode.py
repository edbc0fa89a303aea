"""Multi-turn episodes: the model and an environment take turns, kept as the exact token ids.

An episode is

    prompt | model turn 1 | env turn 1 | model turn 2 | env turn 2 | ... | model turn K

Each model turn is sampled by ``Engine.generate_ids`` from the ids of everything before it (never
from re-tokenised text), so the ids the loss sees are the ids the engine sampled, with their
behaviour log-probs. Each environment turn is the environment's observation, tokenised ONCE (with
the chat template's turn markers when there is a template), or the ids it returned. The episode
ends when the environment says ``done``, after ``max_turns`` model turns, or when the
``max_episode_tokens`` budget (model + environment tokens after the prompt) is spent.

The result is one ``RolloutBatch`` whose completion part holds model AND environment tokens:

    completion_mask = 1 on model tokens, 0 on environment tokens and padding
    attention_mask  = 1 on model and environment tokens (the model reads the observations)

so the policy loss, the KL, every aggregation mode and its normaliser count model tokens only,
while ``token_logprobs`` runs the whole episode as one sequence. Plain single-turn generation is
the case ``max_turns = 1`` (or an environment that is done after the first turn).

Rewards: ``EnvStep.reward`` of turn k sits on turn k's last model token in
``EpisodeBatch.token_rewards`` [B, T]; ``EpisodeBatch.rewards`` [B] is their sum (the episode
return). Outcome estimators (GRPO, RLOO, ...) give every model token of an episode the same
advantage; reward-to-go and GAE see each turn's reward where it was earned (masked environment
tokens are skipped, core/advantages.py).

The interface is two methods (``reset``, ``step``); the shape follows AReaL's
``RolloutWorkflow`` and SkyRL's generator/environment split, written from scratch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

import torch

from .batch import RolloutBatch, SamplingParams
from .seeding import call_seeds, row_seeds

__all__ = [
    "EnvStep",
    "Environment",
    "EpisodeBatch",
    "ObservationEncoder",
    "run_episodes",
]


@dataclass
class EnvStep:
    """What the environment answers to one model turn.

    observation: text appended as the environment's turn (tokenised once by the runner), or the
        token ids to append as they are. Ignored when ``done``.
    reward: this turn's reward, placed on the turn's last model token (0 for none).
    done: the episode is over (no further model turn).
    metrics: numbers averaged over the episodes' steps into ``EpisodeBatch.metrics`` under
        ``env/<name>`` (e.g. ``tool_call``: 1 when the turn called a tool, ``tool_ok``).
    """

    observation: str | list[int] = ""
    reward: float = 0.0
    done: bool = False
    metrics: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Environment(Protocol):
    """One episode's environment (a fresh object per episode, so it may keep state).

    reset(record) -> str: the prompt text of the episode (e.g. ``record["prompt"]``), as the
        engine's ``generate`` would take it (chat-templated already if the data is).
    step(turn) -> EnvStep: react to the model's turn (its decoded text, special tokens skipped).
    Optional attribute ``stop``: tuple of strings that end a model turn (e.g. ``"</tool>"``),
    added to the sampling parameters' stop strings.
    """

    def reset(self, record: dict[str, Any]) -> str: ...

    def step(self, turn: str) -> EnvStep: ...


@dataclass
class EpisodeBatch:
    """B episodes, ready for the online step.

    batch: RolloutBatch; its completion holds model tokens (completion_mask 1) and environment
        tokens (completion_mask 0, attention_mask 1); ``truncated`` is True when a budget (turns
        or tokens) ended the episode before the environment said done; ``completions`` is the
        decoded episode (model and environment text).
    rewards: [B] float32, the episode return (sum of the turns' rewards).
    token_rewards: [B, T] float32, each turn's reward on that turn's last model token (the same
        tensor as ``batch.token_rewards``, so it follows the rows through select / cat).
    turns: [B] int64, model turns per episode.
    model_turn_spans: per row, the (start, end) completion columns of each model turn.
    metrics: episode/turns_mean, episode/env_tokens_mean, episode/model_tokens_mean,
        episode/done_frac, time/env_s (seconds inside env.reset / env.step) and env/<name>
        (the mean of each EnvStep.metrics entry over the steps that reported it).
    """

    batch: RolloutBatch
    rewards: torch.Tensor
    token_rewards: torch.Tensor
    turns: torch.Tensor
    model_turn_spans: list[list[tuple[int, int]]]
    metrics: dict[str, float]


class ObservationEncoder:
    """Observation text -> token ids, with the chat template's turn markers when there is one.

    With a template (``chat`` True, or None and the tokenizer has one) the text of an observation
    is ``close + open + observation + reopen``, read off the template itself:
    ``close`` is what the template writes after an assistant message (e.g. ``<|im_end|>\\n``)
    minus the part the model already sampled (its EOS), ``open`` starts a ``role`` message and
    ``reopen`` ends it and starts the next assistant turn (the generation prompt). The whole
    string is tokenised once, so the environment's tokens are exactly what a chat-templated
    conversation would hold there. Without a template the observation text is used as it is.
    """

    _USER, _ASSISTANT, _OBS = "PSIRLUSERTEXT", "PSIRLASSISTANTTEXT", "PSIRLOBSERVATIONTEXT"

    def __init__(self, tokenizer, role: str = "user", chat: bool | None = None):
        self.tokenizer = tokenizer
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if chat and not has_template:
            raise ValueError("env.chat: True, but the tokenizer has no chat template")
        self.chat = has_template if chat is None else bool(chat)
        self.close = self.open = self.reopen = ""
        if self.chat:
            base = [
                {"role": "user", "content": self._USER},
                {"role": "assistant", "content": self._ASSISTANT},
            ]
            try:
                prefix = tokenizer.apply_chat_template(base, tokenize=False)
                full = tokenizer.apply_chat_template(
                    [*base, {"role": role, "content": self._OBS}],
                    tokenize=False,
                    add_generation_prompt=True,
                )
            except Exception as exc:  # templates raise their own errors (roles, alternation)
                raise ValueError(
                    f"env.observation_role: the chat template cannot render a {role!r} message "
                    f"after an assistant message ({exc})"
                ) from exc
            if not full.startswith(prefix) or self._OBS not in full[len(prefix) :]:
                raise ValueError(
                    "chat template: adding a message changes the text before it; observation "
                    "turn markers cannot be read off it (set env.chat: false)"
                )
            self.close = prefix[prefix.rindex(self._ASSISTANT) + len(self._ASSISTANT) :]
            self.open, self.reopen = full[len(prefix) :].split(self._OBS)

    def text(self, observation: str, model_turn_raw: str) -> str:
        """The environment turn's text after a model turn whose raw decoded text (special
        tokens kept) is ``model_turn_raw``."""
        if not self.chat:
            return observation
        done = max(
            (k for k in range(len(self.close) + 1) if model_turn_raw.endswith(self.close[:k])),
            default=0,
        )
        return self.close[done:] + self.open + observation + self.reopen

    def encode(self, observation: str | Sequence[int], model_turn_raw: str) -> list[int]:
        """Token ids of the environment turn (ids given by the environment are kept as they are)."""
        if not isinstance(observation, str):
            return [int(i) for i in observation]
        text = self.text(observation, model_turn_raw)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


@dataclass
class _Episode:
    env: Environment
    context: list[int]  # prompt + completion so far (what the next model turn continues)
    prompt_len: int
    seed: int = 0  # the episode's random stream; a turn at completion column c draws c, c + 1, ...
    ids: list[int] = field(default_factory=list)  # completion ids: model and env tokens
    is_model: list[bool] = field(default_factory=list)
    logp: list[float] = field(default_factory=list)
    rewards: list[tuple[int, float]] = field(default_factory=list)  # (column, reward)
    spans: list[tuple[int, int]] = field(default_factory=list)
    done: bool = False
    finished: bool = False


def run_episodes(
    engine,
    make_env: Callable[[], Environment],
    records: Sequence[dict[str, Any]],
    params: SamplingParams,
    *,
    max_turns: int = 4,
    max_episode_tokens: int | None = None,
    observation_role: str = "user",
    chat: bool | None = None,
) -> EpisodeBatch:
    """Run ``params.n`` episodes per record and return them as one EpisodeBatch.

    engine: an Engine with ``generate_ids`` (HFEngine) and a ``tokenizer`` attribute;
    make_env: builds a fresh Environment per episode; records: the prompt records (row
    ``i * n + j`` is episode j of record i, group id and prompt index i);
    params: sampling parameters of every model turn (``n`` = episodes per record; each turn
    samples one continuation per episode; ``max_new_tokens`` caps a turn);
    max_turns: model turns at most (>= 1); max_episode_tokens: model + environment tokens after
    the prompt at most (None: max_turns * params.max_new_tokens plus the observations);
    observation_role / chat: how observation text is templated (ObservationEncoder).
    """
    if max_turns < 1:
        raise ValueError(f"env.max_turns={max_turns}: must be >= 1")
    if max_episode_tokens is not None and max_episode_tokens < 1:
        raise ValueError(f"env.max_episode_tokens={max_episode_tokens}: must be >= 1")
    if not records:
        raise ValueError("records: empty list")
    generate_ids = getattr(engine, "generate_ids", None)
    if generate_ids is None:
        raise TypeError(
            f"{type(engine).__name__} has no generate_ids(prompt_ids, params); multi-turn "
            f"episodes need it (rollout.engine: hf)"
        )
    tokenizer = engine.tokenizer
    encoder = ObservationEncoder(tokenizer, observation_role, chat)
    env_time = 0.0
    step_metrics: dict[str, list[float]] = {}

    # Episode j of record i samples all its turns from one stream, seeded as row j of record i
    # in plain generation (so one turn is plain generation): the same episode whatever other
    # episodes are still live or share the call.
    seeds = iter(row_seeds(call_seeds(params, len(records)), params.n))
    episodes: list[_Episode] = []
    prompts: list[str] = []
    for record in records:
        for _ in range(params.n):
            t0 = time.perf_counter()
            env = make_env()
            prompt = env.reset(record)
            env_time += time.perf_counter() - t0
            prompts.append(prompt)
            episodes.append(_Episode(env=env, context=[], prompt_len=0, seed=next(seeds)))
    prompt_ids = _encode_prompts(engine, tokenizer, prompts)
    for ep, ids in zip(episodes, prompt_ids, strict=True):
        ep.context, ep.prompt_len = list(ids), len(ids)

    stop = tuple(dict.fromkeys([*params.stop, *getattr(episodes[0].env, "stop", ())]))
    budget = max_episode_tokens

    for turn in range(max_turns):
        live = [ep for ep in episodes if not ep.finished]
        if not live:
            break
        room = [budget - len(ep.ids) if budget is not None else params.max_new_tokens
                for ep in live]
        turn_params = replace(
            params, n=1, stop=stop, seed=None, seeds=None,
            max_new_tokens=max(1, min(params.max_new_tokens, max(room))),
        )
        out = generate_ids([ep.context for ep in live], turn_params,
                           row_seeds=[ep.seed for ep in live],
                           stream_offsets=[len(ep.ids) for ep in live])
        lengths = out.completion_mask.sum(dim=1).long().tolist()
        sampled = out.completion_ids.tolist()
        logps = out.behaviour_logprobs.tolist()
        for row, ep in enumerate(live):
            n_tok = min(lengths[row], room[row])  # a shared turn cap may exceed this row's room
            ids = sampled[row][:n_tok]
            start = len(ep.ids)
            ep.ids += ids
            ep.is_model += [True] * n_tok
            ep.logp += logps[row][:n_tok]
            ep.context += ids
            ep.spans.append((start, start + n_tok))
            t0 = time.perf_counter()
            result = ep.env.step(tokenizer.decode(ids, skip_special_tokens=True))
            env_time += time.perf_counter() - t0
            if not isinstance(result, EnvStep):
                raise TypeError(
                    f"{type(ep.env).__name__}.step returned {type(result).__name__}, "
                    f"expected EnvStep"
                )
            for name, value in result.metrics.items():
                step_metrics.setdefault(name, []).append(float(value))
            if result.reward and n_tok:
                ep.rewards.append((start + n_tok - 1, float(result.reward)))
            elif result.reward:
                # An empty turn has no token of its own; its reward goes to the last model token.
                last = max((i for i, m in enumerate(ep.is_model) if m), default=None)
                if last is not None:
                    ep.rewards.append((last, float(result.reward)))
            if result.done:
                ep.done = ep.finished = True
                continue
            if turn == max_turns - 1:
                ep.finished = True
                continue
            obs = encoder.encode(result.observation, tokenizer.decode(ids))
            if budget is not None and len(ep.ids) + len(obs) >= budget:
                ep.finished = True  # no room for the observation and a model token after it
                continue
            ep.ids += obs
            ep.is_model += [False] * len(obs)
            ep.logp += [0.0] * len(obs)
            ep.context += obs

    batch = _assemble(episodes, prompts, tokenizer, engine, params.n)
    token_rewards = batch.token_rewards
    model_tokens = batch.completion_mask.sum(dim=1)
    env_tokens = batch.attention_mask[:, batch.prompt_len :].sum(dim=1) - model_tokens
    turns = torch.tensor([len(ep.spans) for ep in episodes], dtype=torch.long)
    metrics = {
        "episode/turns_mean": float(turns.float().mean()),
        "episode/model_tokens_mean": float(model_tokens.mean()),
        "episode/env_tokens_mean": float(env_tokens.float().mean()),
        "episode/done_frac": sum(ep.done for ep in episodes) / len(episodes),
        "time/env_s": env_time,
    }
    metrics.update({f"env/{k}": sum(v) / len(v) for k, v in step_metrics.items() if v})
    return EpisodeBatch(
        batch=batch,
        rewards=token_rewards.sum(dim=1),
        token_rewards=token_rewards,
        turns=turns,
        model_turn_spans=[list(ep.spans) for ep in episodes],
        metrics=metrics,
    )


def _encode_prompts(engine, tokenizer, prompts: list[str]) -> list[list[int]]:
    """Prompt ids the way the engine's ``generate`` would make them (BOS rule included)."""
    encode = getattr(engine, "encode_prompts", None)
    if encode is not None:
        return encode(prompts)
    return [list(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]


def _assemble(
    episodes: list[_Episode], prompts: list[str], tokenizer, engine, n: int
) -> RolloutBatch:
    pad = getattr(engine, "pad_token_id", None)
    if pad is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = len(episodes)
    prompt_len = max(ep.prompt_len for ep in episodes)
    steps = max(1, max(len(ep.ids) for ep in episodes))
    input_ids = torch.full((rows, prompt_len + steps), int(pad), dtype=torch.long)
    attention = torch.zeros((rows, prompt_len + steps), dtype=torch.long)
    completion_mask = torch.zeros((rows, steps), dtype=torch.float32)
    logp = torch.zeros((rows, steps), dtype=torch.float32)
    for r, ep in enumerate(episodes):
        p, t = ep.prompt_len, len(ep.ids)
        input_ids[r, prompt_len - p : prompt_len] = torch.tensor(ep.context[:p], dtype=torch.long)
        attention[r, prompt_len - p : prompt_len + t] = 1
        if t:
            input_ids[r, prompt_len : prompt_len + t] = torch.tensor(ep.ids, dtype=torch.long)
            completion_mask[r, :t] = torch.tensor(ep.is_model, dtype=torch.float32)
            logp[r, :t] = torch.tensor(ep.logp, dtype=torch.float32)
    group_ids = torch.arange(rows // n, dtype=torch.long).repeat_interleave(n)
    token_rewards = torch.zeros((rows, steps), dtype=torch.float32)
    for r, ep in enumerate(episodes):
        for col, reward in ep.rewards:
            token_rewards[r, col] += reward
    return RolloutBatch(
        input_ids=input_ids,
        attention_mask=attention,
        completion_ids=input_ids[:, prompt_len:].clone(),
        completion_mask=completion_mask,
        behaviour_logprobs=logp * completion_mask,
        group_ids=group_ids,
        prompt_index=group_ids.clone(),
        truncated=torch.tensor([not ep.done for ep in episodes], dtype=torch.bool),
        prompt_len=prompt_len,
        prompts=list(prompts),
        completions=tokenizer.batch_decode([ep.ids for ep in episodes], skip_special_tokens=True),
        pad_token_id=int(pad),
        token_rewards=token_rewards,
    )
