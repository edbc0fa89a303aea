"""The run configuration: pydantic models loaded from YAML plus `key=value` overrides.

A typo in a key or a value out of range is an error that names the file and the key path
(``config.yaml: optim.lr: Input should be greater than 0``), never a silent default
(DESIGN.md, "Conventions"). Every section has defaults except the four a run cannot guess:
``loop``, ``output_dir``, ``model`` (a local folder or a tiny model spec) and ``data`` (a built-in
task or a prompt file).

The online loop's knobs are not repeated here: ``algorithm.preset`` names a preset of
``psirl.algorithms.PRESETS`` and ``algorithm.knobs`` is a nested dict of overrides that
``psirl.algorithms.resolve_preset(preset, knobs)`` turns into validated dataclasses
(see ``resolve_algorithm``). Sampling settings (group size, temperature, ...) live in those knobs,
e.g. ``algorithm.knobs.sampling.group_size=8``.

Public: TrainConfig (and its section models), ConfigError, load_config, config_from_dict,
parse_overrides, apply_overrides, save_resolved_config, load_run_config, resolve_algorithm.
"""

from __future__ import annotations

import difflib
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

CONFIG_FILE = "config.yaml"

LoopName = Literal["sft", "online", "reward_model", "preference", "self_training"]
SinkName = Literal["jsonl", "tensorboard", "wandb", "mlflow"]


class ConfigError(ValueError):
    """A config that cannot be loaded. `errors` holds one line per problem, each naming the
    source (file, or file plus the override that caused it) and the dotted key path."""

    def __init__(self, errors: Sequence[str]):
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


class _Section(BaseModel):
    """Base of every section: unknown keys are errors; NaN / inf are rejected."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _optional_module(name: str) -> types.ModuleType | None:
    """Import a sibling psirl module lazily; None when it does not exist (yet)."""
    import importlib

    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == name:
            return None
        raise


# --------------------------------------------------------------------------- model


class TinyModelConfig(_Section):
    """A tiny randomly initialised model (character tokenizer) built inside the run folder."""

    arch: str = "qwen2"
    hidden_size: int = Field(64, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(4, gt=0)
    intermediate_size: int = Field(128, gt=0)
    alphabet: str | None = None  # characters the tokenizer keeps (None: all bytes)

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> TinyModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads})"
            )
        return self


class LoraConfig(_Section):
    """LoRA adapters through PEFT: rank r, scaling alpha / r, dropout, modules to adapt."""

    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"


class ModelConfig(_Section):
    """Exactly one of `path` (a local model folder, safetensors) or `tiny` (built in the run)."""

    path: str | None = None
    tiny: TinyModelConfig | None = None
    lora: LoraConfig | None = None

    @model_validator(mode="after")
    def _exactly_one_source(self) -> ModelConfig:
        if (self.path is None) == (self.tiny is None):
            raise ValueError(
                "set exactly one of model.path (a local model folder) or model.tiny "
                "(a tiny model built in the run folder)"
                + ("" if self.path is None else "; both are set")
            )
        return self


# --------------------------------------------------------------------------- data


class DataConfig(_Section):
    """Where prompts / examples come from: a built-in task, or local files.

    task + task_kwargs: a built-in synthetic task (`psirl.data.tasks`), e.g. "addition".
    train_path / eval_path: JSONL, Parquet or a `datasets` folder; split selects a split there.
    n_train: examples generated from the task (held-out prompts: eval.n).
    max_prompt_tokens: longer prompts are an error / truncated by the loop.
    chat: render prompts with the tokenizer's chat template (None = when it has one).
    """

    task: str | None = None
    task_kwargs: dict[str, Any] = Field(default_factory=dict)
    train_path: str | None = None
    eval_path: str | None = None
    split: str | None = None
    n_train: int = Field(1000, gt=0)
    max_prompt_tokens: int = Field(256, gt=0)
    chat: bool | None = None

    @field_validator("task")
    @classmethod
    def _known_task(cls, name: str | None) -> str | None:
        tasks = _optional_module("psirl.data.tasks")
        if name is not None and tasks is not None and name not in tasks.TASKS:
            close = difflib.get_close_matches(name, list(tasks.TASKS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"unknown task {name!r}{hint}; known tasks: {', '.join(sorted(tasks.TASKS))}"
            )
        return name

    @field_validator("task_kwargs")
    @classmethod
    def _task_accepts_kwargs(cls, kwargs: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """Build the task once so that a bad task argument fails at load time, naming the key."""
        name = info.data.get("task")
        tasks = _optional_module("psirl.data.tasks")
        if name is None or tasks is None or name not in tasks.TASKS:
            return kwargs
        try:
            tasks.get_task(name, **kwargs)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"task {name!r} rejects these arguments: {exc}") from None
        return kwargs

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if (self.task is None) == (self.train_path is None):
            raise ValueError(
                "set exactly one of data.task (a built-in task) or data.train_path (a local file)"
                + ("" if self.task is None else "; both are set")
            )
        return self


# --------------------------------------------------------------------------- optimisation


class OptimConfig(_Section):
    """AdamW and its LR schedule.

    batch_size: examples per optimiser step (prompts for online / self-training, pairs for
    preference and reward-model training, sequences for SFT). grad_accum: how many micro-batches
    that step is split into; it changes memory only, not the step's gradient, because the loss
    normaliser is computed once per step (core/aggregate.py).
    lr(step) = lr * warm-up ramp (step+1)/warmup_steps, then constant / linear / cosine to 0.
    """

    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    grad_clip: float | None = Field(1.0, gt=0)
    grad_accum: int = Field(1, ge=1)
    batch_size: int = Field(8, ge=1)
    # A step whose loss or gradient norm is NaN/inf skips its update; this many in a row stop
    # the run (train/base.py run_loop).
    max_nonfinite_steps: int = Field(3, ge=1)

    @field_validator("eps")
    @classmethod
    def _eps_keeps_update_finite(cls, v: float) -> float:
        # AdamW divides by sqrt(v) + eps; a parameter whose gradient has been 0 so far has
        # m = v = 0, so eps = 0 (or one float32 rounds to 0) makes its update 0/0 = NaN.
        if not v >= _MIN_ADAM_EPS:
            raise ValueError(
                f"{v} makes the AdamW update 0/0 = NaN for any parameter whose gradient is 0 "
                f"(m = v = 0); it must be at least {_MIN_ADAM_EPS} (usual: 1e-8)"
            )
        return v

    @field_validator("lr")
    @classmethod
    def _lr_not_absurd(cls, v: float) -> float:
        # Adam moves every weight by about lr per step whatever the gradient's scale, so lr > 1
        # destroys any model in a step or two (and overflows bfloat16 weights to inf).
        if v > _MAX_ADAM_LR:
            raise ValueError(
                f"{v} is above {_MAX_ADAM_LR}: AdamW moves every weight by about lr per step, "
                "so the weights blow up (usual: 1e-6 to 1e-3)"
            )
        return v

    @field_validator("betas")
    @classmethod
    def _betas_in_unit_interval(cls, v: tuple[float, float]) -> tuple[float, float]:
        for i, b in enumerate(v):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"betas[{i}] = {b} must be in [0, 1)")
        return v

    @model_validator(mode="after")
    def _decay_keeps_sign(self) -> OptimConfig:
        # AdamW multiplies each weight by (1 - lr * weight_decay) per step: at >= 1 the weights
        # are zeroed or flip sign every step.
        if self.lr * self.weight_decay >= 1:
            raise ValueError(
                f"optim.weight_decay: lr * weight_decay = {self.lr * self.weight_decay:g} must be "
                "below 1 (AdamW scales every weight by 1 - lr * weight_decay each step)"
            )
        return self

    @model_validator(mode="after")
    def _accum_fits_batch(self) -> OptimConfig:
        if self.grad_accum > self.batch_size:
            raise ValueError(
                f"optim.grad_accum ({self.grad_accum}) must not exceed optim.batch_size "
                f"({self.batch_size}): each micro-batch needs at least one example"
            )
        return self


# The smallest normal float32: below it AdamW's eps rounds toward 0 in the float32 update.
_MIN_ADAM_EPS = 1.1754943508222875e-38
_MAX_ADAM_LR = 1.0


class CheckpointConfig(_Section):
    """Save every `every` steps (0 = only at the end) and keep the last `keep_last`."""

    every: int = Field(50, ge=0)
    keep_last: int = Field(2, ge=1)


class EvalConfig(_Section):
    """Held-out evaluation every `every` steps (0 = never) on `n` prompts (data.eval_path, else
    the built-in task's held-out split), greedy and/or sampled (n_samples per prompt)."""

    every: int = Field(0, ge=0)
    n: int = Field(64, gt=0)
    greedy: bool = True
    sampled: bool = False
    n_samples: int = Field(1, ge=1)  # sampled completions per prompt: pass@k for k <= n_samples
    max_new_tokens: int = Field(32, gt=0)

    @model_validator(mode="after")
    def _some_mode(self) -> EvalConfig:
        if self.every > 0 and not (self.greedy or self.sampled):
            raise ValueError("eval.every > 0 needs eval.greedy or eval.sampled to be true")
        return self


class TrackConfig(_Section):
    """Metrics sinks: metrics.jsonl is always written; tensorboard / wandb / mlflow are optional
    (`pip install psirl[track]`). `project` names the W&B project / MLflow experiment."""

    sinks: list[SinkName] = Field(default_factory=lambda: ["jsonl"])
    project: str = "psirl"


# --------------------------------------------------------------------------- algorithm / reward


class AlgorithmConfig(_Section):
    """The online loop's knobs: a preset name plus nested overrides.

    Resolved by `psirl.algorithms.resolve_preset(preset, knobs)`; see `resolve_algorithm`.
    Example: {preset: dapo, knobs: {sampling: {group_size: 8}, loss: {eps_high: 0.28}}}.
    """

    preset: str | None = "grpo"
    knobs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str | None) -> str | None:
        presets = _available_presets()
        if v is not None and presets is not None and v not in presets:
            if _method_home(v):
                raise ValueError(_method_home(v))
            close = difflib.get_close_matches(v, presets, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown preset {v!r}{hint}; known presets: {', '.join(presets)}")
        return v


# Methods that are not presets of the online loop: where each one lives (a user who writes
# `algorithm.preset: dpo` or `loop: dpo` is told, instead of "did you mean 'dapo'").
METHOD_HOMES = {
    **{m: f"loop: preference with preference.loss: {m}" for m in ("dpo", "ipo", "kto", "simpo", "orpo")},
    "online_dpo": "loop: preference with preference.online: true",
    "iterative_dpo": "loop: preference with preference.online: true and preference.ref_refresh_every: N",
    **{m: f"loop: self_training with self_training.method: {m}" for m in ("star", "rest", "raft")},
    "reward_model": "loop: reward_model (Bradley-Terry)",
    "bradley_terry": "loop: reward_model (Bradley-Terry)",
    "rm": "loop: reward_model (Bradley-Terry)",
    "sft": "loop: sft",
}


def _method_home(name: str) -> str | None:
    home = METHOD_HOMES.get(name.lower().replace("-", "_"))
    return None if home is None else f"{name!r} is not an online preset: use {home}"


def _available_presets() -> list[str] | None:
    """Names in psirl.algorithms.PRESETS, or None while that module does not exist yet (the name
    is then checked by resolve_algorithm when the loop starts)."""
    algorithms = _optional_module("psirl.algorithms")
    return None if algorithms is None else list(algorithms.PRESETS)


class _RewardBase(_Section):
    """`kind` selects the reward; `fallback` is the reward of a sample whose reward function
    raised (SafeReward)."""

    kind: str
    fallback: float = 0.0
    # Negative control: permute the rewards across each batch (ShuffledReward); a run trained on
    # it must not improve, which shows the real run's gain comes from the reward.
    shuffle: bool = False


class TaskRewardConfig(_RewardBase):
    """The built-in task's own reward (needs data.task)."""

    kind: Literal["task"] = "task"


class VerifierRewardConfig(_RewardBase):
    """AnswerVerifier: compare the completion's final answer with record[answer_key]."""

    kind: Literal["verifier"] = "verifier"
    mode: Literal["numeric", "exact"] = "numeric"
    answer_key: str = "answer"
    tolerance: float = Field(1e-6, ge=0)


class FormatRewardConfig(_RewardBase):
    """FormatReward: `value` when the completion matches the regex `pattern`, else 0."""

    kind: Literal["format"] = "format"
    pattern: str
    value: float = 1.0

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        return v


class CodeRewardConfig(_RewardBase):
    """CodeTestsReward: fraction of record[tests_key] that pass in a sandboxed subprocess."""

    kind: Literal["code"] = "code"
    tests_key: str = "tests"
    timeout_s: float = Field(5.0, gt=0)
    memory_mb: int = Field(512, gt=0)
    # Without a working bubblewrap the code reward refuses to run; true runs the program with
    # rlimits only (it can read files, use the network, signal the trainer), warned and logged
    # as reward/<name>/weak_sandbox = 1.
    allow_weak_sandbox: bool = False


class RewardModelRewardConfig(_RewardBase):
    """RewardModelReward: a learned scalar reward model from a local folder."""

    kind: Literal["reward_model"] = "reward_model"
    path: str
    batch_size: int = Field(16, gt=0)


class JudgeRewardConfig(_RewardBase):
    """LLMJudgeReward over an OpenAI-compatible endpoint; the key is read from `api_key_env`."""

    kind: Literal["judge"] = "judge"
    base_url: str
    model: str
    api_key_env: str | None = "OPENAI_API_KEY"
    prompt_template: str | None = None
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(3, ge=0)


class PythonRewardConfig(_RewardBase):
    """Your own reward function, imported from `function` = "module:name" (the module is looked
    up on sys.path, then in the working directory): ``fn(prompts, completions, records) ->
    list[float]``, plain or ``async def``, batched. A function with a ``tokenizer`` parameter
    receives the policy's tokenizer. A call that runs longer than `timeout_s` (or raises) gives
    its samples the fallback and is counted, it does not stop the run."""

    kind: Literal["python"] = "python"
    function: str | None = None  # None: the function is given from Python (train(reward_fn=...))
    timeout_s: float = Field(60.0, gt=0)

    @field_validator("function")
    @classmethod
    def _module_colon_name(cls, v: str | None) -> str | None:
        if v is None:
            return v
        module, _, name = v.partition(":")
        if not module or not name or not name.isidentifier():
            raise ValueError(f"{v!r}: expected 'module:function', e.g. 'my_rewards:score'")
        return v


class LengthRewardConfig(_RewardBase):
    """DAPO's overlong soft punishment in tokens of the policy's tokenizer: 0 up to
    max_tokens - cache_tokens, then a linear ramp to -penalty at max_tokens (psirl.rewards.length).
    Combine it with the task reward through `kind: weighted`."""

    kind: Literal["length"] = "length"
    max_tokens: int = Field(gt=0)
    cache_tokens: int = Field(gt=0)
    penalty: float = Field(1.0, ge=0)

    @model_validator(mode="after")
    def _window_fits(self) -> LengthRewardConfig:
        if self.cache_tokens > self.max_tokens:
            raise ValueError(f"cache_tokens ({self.cache_tokens}) must not exceed max_tokens "
                             f"({self.max_tokens})")
        return self


class WeightedComponent(_Section):
    """One term w * r(x, y) of a weighted reward."""

    weight: float
    reward: RewardConfig


class WeightedRewardConfig(_RewardBase):
    """WeightedReward: sum_i weight_i * reward_i."""

    kind: Literal["weighted"] = "weighted"
    components: list[WeightedComponent] = Field(min_length=1)


RewardConfig = Annotated[
    TaskRewardConfig
    | VerifierRewardConfig
    | FormatRewardConfig
    | CodeRewardConfig
    | RewardModelRewardConfig
    | JudgeRewardConfig
    | PythonRewardConfig
    | LengthRewardConfig
    | WeightedRewardConfig,
    Field(discriminator="kind"),
]
WeightedComponent.model_rebuild()


# --------------------------------------------------------------------------- rollout


class VLLMConfig(_Section):
    """Settings of the vLLM engine (`rollout.engine: vllm`, extra `psirl[vllm]`).

    in_process: run the engine in the trainer's process (weight sync is a direct load, no copy
    through shared memory; vLLM then owns torch's CPU thread setting for the whole process).
    false (vLLM's own engine process) is refused by the engine for now: across processes the
    weights would travel as nested lists.
    kv_cache_memory_bytes: KV-cache budget in bytes (CPU builds, or an exact budget on GPU);
    None leaves it to `gpu_memory_utilization` (GPU only).
    gpu_memory_utilization: fraction of GPU memory vLLM may take (weights + KV cache).
    max_model_len: longest prompt + completion the engine accepts.
    enable_sleep_mode: free the engine's GPU memory during the update stage (GPU only).
    dtype: the engine's weights; "auto" follows the run's `dtype`.
    """

    in_process: bool = True
    kv_cache_memory_bytes: int | None = Field(1 << 29, gt=0)
    gpu_memory_utilization: float = Field(0.4, gt=0, le=1)
    max_model_len: int = Field(1024, gt=0)
    enable_sleep_mode: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


class RolloutConfig(_Section):
    """Which engine samples completions for every loop that samples (online, online DPO,
    self-training, evaluation): `hf` (transformers, the trainer's own module) or `vllm`."""

    engine: Literal["hf", "vllm"] = "hf"
    vllm: VLLMConfig = Field(default_factory=VLLMConfig)


class EnvConfig(_Section):
    """Multi-turn episodes (psirl/rollout/episode.py): the model and an environment take turns.

    name: a built-in environment (`calculator`, `python_tool`; psirl/envs) or a user class as
    `module:Class` with `reset(record) -> prompt` and `step(turn) -> EnvStep`; kwargs: passed
    to the class. max_turns: model turns per episode at most; max_episode_tokens: model +
    environment tokens after the prompt at most (None: no cap beyond the turns').
    observation_role: the chat role of the environment's turns; chat: wrap them in the chat
    template's turn markers (set it with chat-templated prompts, data.chat: true; None = when
    the tokenizer has a template); false (default): the observation text as it is.
    """

    name: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    max_turns: int = Field(4, ge=1)
    max_episode_tokens: int | None = Field(None, ge=1)
    observation_role: str = "user"
    chat: bool | None = False

    @model_validator(mode="after")
    def _buildable(self) -> EnvConfig:
        """Build the environment once so a bad name or keyword fails at load time."""
        envs = _optional_module("psirl.envs")
        if envs is not None:
            envs.build_env_factory(self.name, self.kwargs)
        return self


# --------------------------------------------------------------------------- distributed


class FSDPConfig(_Section):
    """Options of `distributed.strategy: fsdp` (train/fsdp.py).

    cpu_offload: parameter, gradient and optimiser shards in host memory (CPUOffloadPolicy);
    reference_cpu_offload: the reference model's shards only (it has no optimiser).
    activation_checkpointing: recompute each decoder layer in backward.
    mixed_precision: layers run in bfloat16 from float32 master shards, gradients reduced in
    float32 (MixedPrecisionPolicy).
    reshard_after_forward: free a layer's gathered weights after its forward (gathered again in
    backward); false keeps them until backward (more memory, one gather fewer).
    """

    cpu_offload: bool = False
    reference_cpu_offload: bool = False
    activation_checkpointing: bool = False
    mixed_precision: bool = False
    reshard_after_forward: bool = True


class DistributedConfig(_Section):
    """How several ranks (torchrun) train: `ddp` (each rank holds the whole model, gradients
    summed over ranks) or `fsdp` (parameters, gradients and optimiser state sharded over ranks,
    FSDP2; checkpoints with torch.distributed.checkpoint, resumable at any world size)."""

    strategy: Literal["ddp", "fsdp"] = "ddp"
    fsdp: FSDPConfig = Field(default_factory=FSDPConfig)


# --------------------------------------------------------------------------- other loops


class SFTConfig(_Section):
    """SFT: examples longer than `max_seq_len` tokens (prompt + completion) are an error.
    (Each example is padded; repeated prompts run once through prefix sharing.)

    demonstration_share: with an `env:` section, the share of the prompt records whose example
    is the environment's oracle episode (env.demonstration, e.g. a calculator call, its value,
    the answer); the others are the plain answer (record["answer"], no tool), as in cold-start
    data where tool use is inconsistent. 1.0 (default): every example uses the tool.
    """

    max_seq_len: int = Field(512, gt=0)
    demonstration_share: float = Field(1.0, ge=0.0, le=1.0)


class PreferenceConfig(_Section):
    """The preference loop (offline and online DPO family; losses in core/preference.py).

    loss: dpo | ipo | kto (unpaired desirable/undesirable samples) | simpo | orpo (no reference).
    beta: strength of the implicit KL to the reference (SimPO: reward scale); label_smoothing:
    conservative DPO; gamma: SimPO's target margin; orpo_lambda: weight of ORPO's odds-ratio term;
    kto_desirable_weight / kto_undesirable_weight: KTO's lambda_D / lambda_U.
    labelled: data.train_path holds labelled records {prompt, completion, label} (KTO only);
    otherwise it holds pairs {prompt, chosen, rejected} (KTO then uses chosen as desirable and
    rejected as undesirable; optim.batch_size counts samples for KTO, pairs otherwise).
    online: sample pairs from the policy and rank them with the reward each step (online DPO):
    `samples_per_prompt` completions per prompt at `temperature`, at most `max_new_tokens`
    tokens, best vs worst by reward, ties skipped. ref_refresh_every: copy the policy into the
    reference every N steps (iterative DPO; 0 = never).
    """

    loss: Literal["dpo", "ipo", "kto", "simpo", "orpo"] = "dpo"
    beta: float = Field(0.1, gt=0)
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    gamma: float = Field(0.5, ge=0)
    orpo_lambda: float = Field(0.1, ge=0)
    kto_desirable_weight: float = Field(1.0, gt=0)
    kto_undesirable_weight: float = Field(1.0, gt=0)
    labelled: bool = False
    online: bool = False
    samples_per_prompt: int = Field(2, ge=2)
    temperature: float = Field(1.0, gt=0)
    max_new_tokens: int = Field(32, gt=0)
    ref_refresh_every: int = Field(0, ge=0)
    # IPO on per-token average log-probs, as TRL computes it (default: the IPO paper's sequence
    # log-probs).
    length_normalize: bool = False
    # loss: dpo with another of TRL's DPO loss types (core.preference.DPO_LOSS_TYPES: robust,
    # hinge, exo_pair, nca_pair, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down,
    # discopop), or f-DPO's divergence (reverse_kl = DPO, forward_kl, js_divergence,
    # alpha_divergence with f_alpha). bco_pair's delta is 0 here (TRL keeps a running mean).
    dpo_loss_type: str = "sigmoid"
    f_divergence: Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"] = "reverse_kl"
    f_alpha: float = Field(1.0, gt=0)

    @field_validator("dpo_loss_type")
    @classmethod
    def _known_dpo_loss(cls, v: str) -> str:
        from psirl.core.preference import DPO_LOSS_TYPES

        if v not in DPO_LOSS_TYPES:
            raise ValueError(f"unknown DPO loss type {v!r}; known: {', '.join(DPO_LOSS_TYPES)}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> PreferenceConfig:
        if self.online and self.loss == "kto":
            raise ValueError(
                "preference.online: online preference training forms best-vs-worst pairs; "
                "use loss dpo, ipo, simpo or orpo (not kto)"
            )
        if self.labelled and self.loss != "kto":
            raise ValueError(
                "preference.labelled: labelled (unpaired) records need preference.loss: kto"
            )
        if self.ref_refresh_every and self.loss in ("simpo", "orpo"):
            raise ValueError(
                f"preference.ref_refresh_every: {self.loss} uses no reference model"
            )
        return self


class SelfTrainingConfig(_Section):
    """STaR / ReST / RAFT: sample, keep the good completions, fine-tune on them (SFT loss).

    Each round samples `samples_per_prompt` completions (at `temperature`, at most
    `max_new_tokens` tokens) for optim.batch_size prompts, then takes `sft_steps_per_round` SFT
    steps on the kept ones (ReST: that many per threshold). Kept:
      star: reward >= reward_threshold; with `rationalize`, prompts with no kept sample are
            re-sampled with the answer as a hint (`hint_template`, placeholders {prompt} and
            {answer}) and the kept rationales are trained on WITHOUT the hint;
      rest: improve step i keeps reward >= rest_thresholds[i] (non-decreasing thresholds);
      raft: the top_k (default 1) highest-reward completions of each prompt.
    top_k (star / rest): also keep at most top_k per prompt (None = all that pass).
    """

    method: Literal["star", "rest", "raft"] = "raft"
    samples_per_prompt: int = Field(4, ge=1)
    reward_threshold: float = 0.5
    top_k: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, gt=0)
    max_new_tokens: int = Field(32, gt=0)
    sft_steps_per_round: int = Field(1, ge=1)
    rest_thresholds: list[float] = Field(default_factory=lambda: [0.25, 0.5, 0.75], min_length=1)
    rationalize: bool = True
    hint_template: str = "Hint: the answer is {answer}.\n{prompt}"

    @field_validator("rest_thresholds")
    @classmethod
    def _non_decreasing(cls, v: list[float]) -> list[float]:
        for i in range(1, len(v)):
            if v[i] < v[i - 1]:
                raise ValueError(f"thresholds must not decrease: [{i - 1}]={v[i - 1]} > [{i}]={v[i]}")
        return v

    @field_validator("hint_template")
    @classmethod
    def _has_placeholders(cls, v: str) -> str:
        try:
            v.format(prompt="", answer="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"only the placeholders {{prompt}} and {{answer}} are allowed: {exc}") from None
        if "{prompt}" not in v or "{answer}" not in v:
            raise ValueError("must contain both {prompt} and {answer}")
        return v


# --------------------------------------------------------------------------- the whole run


class TrainConfig(_Section):
    """One run. `psirl train config.yaml key=value ...` builds it; the run folder keeps it."""

    loop: LoopName

    @field_validator("loop", mode="before")
    @classmethod
    def _loop_or_method(cls, v: Any) -> Any:
        if isinstance(v, str) and v not in typing.get_args(LoopName) and _method_home(v):
            raise ValueError(f"{_method_home(v)} (loops: {', '.join(typing.get_args(LoopName))})")
        return v
    output_dir: str
    seed: int = Field(0, ge=0)
    max_steps: int = Field(100, gt=0)
    device: Literal["cpu", "cuda", "auto"] = "auto"
    dtype: Literal["float32", "bfloat16"] = "float32"
    # torch CPU threads; None: the CPUs this process may use (affinity, cgroup quota). On a
    # shared, busy machine 1 can be much faster than the default (README, "Threads").
    threads: int | None = Field(None, ge=1)
    model: ModelConfig
    data: DataConfig
    optim: OptimConfig = Field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    track: TrackConfig = Field(default_factory=TrackConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    reward: RewardConfig = Field(default_factory=TaskRewardConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    env: EnvConfig | None = None


    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)
    self_training: SelfTrainingConfig = Field(default_factory=SelfTrainingConfig)

    @model_validator(mode="after")
    def _cross_section(self) -> TrainConfig:
        uses_reward = self.loop in ("online", "self_training") or (
            self.loop == "preference" and self.preference.online
        )
        if uses_reward and _needs_task(self.reward) and self.data.task is None:
            raise ValueError(
                "reward.kind: 'task' uses the built-in task's reward, but data.task is not set; "
                "set data.task or choose another reward.kind"
            )
        if self.loop == "reward_model" and self.model.lora is not None:
            raise ValueError("model.lora: the reward_model loop trains the full model (a new "
                             "scalar head on every layer's output); remove model.lora")
        if self.sft.demonstration_share != 1.0 and (self.loop != "sft" or self.env is None):
            raise ValueError("sft.demonstration_share: only the SFT loop with an env: section "
                             "makes demonstrations (set loop: sft and env:, or remove it)")
        if self.loop == "online" and self.algorithm.preset is None:
            raise ValueError("algorithm.preset: the online loop needs a preset (e.g. grpo)")
        if self.algorithm.preset is not None:
            knobs = _check_knobs(self.algorithm.preset, self.algorithm.knobs)
            if self.loop == "online" and knobs is not None:
                _check_minibatches(knobs, self.optim.batch_size)
            if (self.loop == "online" and knobs is not None and self.rollout.engine == "vllm"
                    and (knobs.sampling.top_p < 1.0 or knobs.sampling.top_k > 0)):
                # vLLM returns log-probs of the truncated, renormalised distribution; the loss
                # needs them before truncation (psirl's convention), so the two would disagree.
                raise ValueError("algorithm.knobs.sampling.top_p / top_k: rollout.engine: vllm "
                                 "cannot return pre-truncation log-probs; use top_p: 1, top_k: 0 "
                                 "or rollout.engine: hf")
        self._check_data_sizes()
        return self

    def _check_data_sizes(self) -> None:
        """Settings that would otherwise be silently shrunk or ignored by the loops."""
        # KTO's batch counts samples, and each task pair gives two.
        examples = self.data.n_train * (2 if self.preference.loss == "kto" else 1)
        if self.data.task is not None and examples < self.optim.batch_size:
            raise ValueError(
                f"data.n_train: {self.data.n_train} examples of the task, fewer than "
                f"optim.batch_size={self.optim.batch_size}; each step needs that many distinct "
                "examples"
            )
        if self.eval.every > 0 and self.data.task is None and self.data.eval_path is None:
            raise ValueError(
                f"eval.every: {self.eval.every}, but there is no eval set (neither data.eval_path "
                "nor data.task is set); give one, or set eval.every=0"
            )


def _check_minibatches(knobs: Any, batch_size: int) -> None:
    """split_microbatches would clamp more minibatches than rollout rows to one row each,
    changing the number of updates per step without a word: refuse it here."""
    sampling = getattr(knobs, "sampling", None)
    minibatches = getattr(sampling, "minibatches", 1)
    rows = getattr(sampling, "group_size", 1) * batch_size
    if minibatches > rows:
        raise ValueError(
            f"algorithm.knobs.sampling.minibatches: {minibatches} minibatches, but a step's "
            f"rollout has only {rows} rows (optim.batch_size={batch_size} x group_size="
            f"{getattr(sampling, 'group_size', 1)}); use at most {rows}"
        )


def _check_knobs(preset: str, knobs: dict[str, Any]) -> Any:
    """Resolve the knobs once at load time so a bad knob fails before any model is built.

    Warnings about known-bad combinations (warned once per process by psirl.algorithms) are
    caught here and re-emitted, so they are shown once, at load time.
    """
    import warnings

    algorithms = _optional_module("psirl.algorithms")
    if algorithms is None:
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            resolved = algorithms.resolve_preset(preset, knobs)
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"algorithm.knobs: {exc}") from None
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return resolved


def _needs_task(reward: Any) -> bool:
    if reward.kind == "task":
        return True
    if reward.kind == "weighted":
        return any(_needs_task(c.reward) for c in reward.components)
    return False


# --------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-4` as a float (YAML 1.1 wants `1.0e-4`) and rejects duplicate
    keys (PyYAML silently keeps the last one, which hides typos)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # unhashable key: let PyYAML report it
                    continue
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"found duplicate key {key!r} (first given on line {first})",
                        key_node.start_mark,
                    )
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_error(source: str, exc: yaml.YAMLError) -> ConfigError:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
    context = getattr(exc, "context", None)
    cmark = getattr(exc, "context_mark", None)
    extra = (
        f" ({context} starting at line {cmark.line + 1})" if context and cmark is not None else ""
    )
    return ConfigError([f"{where}: malformed YAML: {problem}{extra}"])


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping in a YAML file (empty file -> {}). Errors: ConfigError naming file:line:col."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as exc:
        raise _yaml_error(str(path), exc) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            [f"{path}: the top level must be a mapping of keys, got {type(data).__name__}"]
        )
    return data


def parse_value(text: str) -> Any:
    """An override value parsed as a YAML scalar / flow value: '1e-4' -> 0.0001, 'true' -> True,
    '[1, 2]' -> [1, 2], '{kind: task}' -> {'kind': 'task'}, '' or 'null' -> None, 'abc' -> 'abc'."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506
    except yaml.YAMLError:
        return text  # not valid YAML on its own (e.g. "a: b: c"): keep the raw string


# --------------------------------------------------------------------------- overrides


def parse_overrides(overrides: Iterable[str]) -> list[tuple[tuple[str | int, ...], Any, str]]:
    """Parse ``key=value`` strings into (key path, value, original text).

    Keys are dotted (`optim.lr`, `algorithm.knobs.sampling.group_size`); a purely numeric part
    indexes a list (`optim.betas.0=0.8`). Values are YAML (see `parse_value`).
    """
    parsed = []
    for text in overrides:
        key, sep, value = text.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError([f"override {text!r}: expected key=value, e.g. optim.lr=1e-4"])
        parts: list[str | int] = []
        for part in key.split("."):
            if not part:
                raise ConfigError([f"override {text!r}: empty part in key {key!r}"])
            parts.append(int(part) if part.isdigit() else part)
        parsed.append((tuple(parts), parse_value(value), text))
    return parsed


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, str]:
    """Apply overrides to the raw dict in place (missing sections are created).

    Returns {dotted key: override text} so that validation errors can name the override.
    An unknown key is not rejected here: validation reports it with its full path.
    """
    applied: dict[str, str] = {}
    for path, value, text in parse_overrides(overrides):
        node: Any = data
        for depth, part in enumerate(path[:-1]):
            here = _dotted(path[: depth + 1])
            if isinstance(node, list):
                if not isinstance(part, int) or not -len(node) <= part < len(node):
                    raise ConfigError([f"override {text!r}: {here}: no such list index"])
                node = node[part]
                continue
            if not isinstance(node, dict):
                raise ConfigError([f"override {text!r}: {_dotted(path[:depth])} is not a section"])
            if node.get(part) is None:
                if isinstance(path[depth + 1], int):
                    raise ConfigError(
                        [
                            f"override {text!r}: {here} is not set in the file, so it has no element "
                            f"{path[depth + 1]}; set the whole list, e.g. {here}=[...]"
                        ]
                    )
                node[part] = {}
            elif not isinstance(node[part], dict | list):
                raise ConfigError(
                    [f"override {text!r}: {here} holds the value {node[part]!r}, not a section"]
                )
            node = node[part]
        last = path[-1]
        if isinstance(node, list):
            if isinstance(last, int) and -len(node) <= last < len(node):
                node[last] = value
            else:
                raise ConfigError([f"override {text!r}: {_dotted(path)}: no such list index"])
        else:
            node[last] = value
        applied[_dotted(path)] = text
    return applied


def _dotted(path: Sequence[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# --------------------------------------------------------------------------- validation errors


def _error_path(loc: Sequence[str | int], raw: Any) -> list[str | int]:
    """Keep only the parts of a pydantic `loc` that are keys of the input (drops union tags)."""
    out: list[str | int] = []
    node = raw
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(node, dict) and part in node:
            out.append(part)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            out.append(part)
            node = node[part]
        elif last and isinstance(node, dict):
            out.append(part)  # a missing key
        elif not isinstance(node, dict):
            node = None  # below a scalar (e.g. the member tags of `list[str] | str`)
        # else: a discriminated-union tag such as 'format' in reward.format.pattern: skip it
    return out


def _model_at(path: Sequence[str | int], raw: Any) -> type[BaseModel] | None:
    """The section model that holds the key at `path` (for 'did you mean' hints)."""
    model: Any = TrainConfig
    node = raw
    for part in path:
        if isinstance(part, int):
            node = node[part] if isinstance(node, list) else None
            continue
        if model is None or part not in model.model_fields:
            return None
        node = node.get(part) if isinstance(node, dict) else None
        model = _unwrap_model(model.model_fields[part].annotation, node)
    return model


def _unwrap_model(annotation: Any, node: Any) -> type[BaseModel] | None:
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _unwrap_model(typing.get_args(annotation)[0], node)
    if origin in (typing.Union, types.UnionType):
        models = [m for a in typing.get_args(annotation) if (m := _unwrap_model(a, node))]
        if len(models) > 1 and isinstance(node, dict):
            for m in models:
                kind = m.model_fields.get("kind")
                if kind is not None and node.get("kind") in typing.get_args(kind.annotation):
                    return m
            return None
        return models[0] if len(models) == 1 else None
    if origin is list:
        return _unwrap_model(typing.get_args(annotation)[0], node)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _format_errors(
    exc: ValidationError, raw: dict, source: str, applied: Mapping[str, str]
) -> ConfigError:
    lines: list[str] = []
    for err in exc.errors():
        path = _error_path(err["loc"], raw)
        key = _dotted(path)
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if err["type"] == "union_tag_not_found":
            key = _dotted([*path, "kind"])
            msg = "required key is missing (it selects the section's fields)"
        elif err["type"] == "extra_forbidden":
            model = _model_at(path[:-1], raw)
            allowed = sorted(model.model_fields) if model is not None else []
            close = difflib.get_close_matches(str(path[-1]), allowed, n=1)
            msg = "unknown key" + (f" (did you mean {close[0]!r}?)" if close else "")
            if allowed:
                msg += f"; allowed keys here: {', '.join(allowed)}"
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif (
            "input" in err
            and err["type"] not in ("model_type", "dict_type", "value_error")
            and not isinstance(err["input"], dict | list)
        ):
            msg += f" (got {err['input']!r})"
        if not key and (named := re.match(r"([A-Za-z_][\w.]*): (.*)", msg, re.S)):
            key, msg = named.groups()  # a cross-section rule that names its key itself
        origin = next((t for k, t in applied.items() if _related(key, k)), None)
        where = f"{source} (override {origin!r})" if origin else source
        line = f"{where}: {key}: {msg}" if key else f"{where}: {msg}"
        if line not in lines:
            lines.append(line)
    return ConfigError(lines)


def _related(a: str, b: str) -> bool:
    """True when dotted key `a` equals `b` or one lies inside the other."""
    if not a or not b:
        return False
    return a == b or any(x.startswith(y + s) for x, y in ((a, b), (b, a)) for s in ".[")


# --------------------------------------------------------------------------- public API


def config_from_dict(
    data: Mapping[str, Any], overrides: Iterable[str] = (), *, source: str = "<config>"
) -> TrainConfig:
    """Validate a raw mapping (after applying overrides). Errors: ConfigError naming each key."""
    import copy

    raw = copy.deepcopy(dict(data))
    applied = apply_overrides(raw, overrides)
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        raise _format_errors(exc, raw, source, applied) from None


def load_config(path: str | os.PathLike | None, overrides: Iterable[str] = ()) -> TrainConfig:
    """Read YAML at `path` (None = start from an empty mapping), apply `key=value` overrides,
    validate.

    Errors (ConfigError): malformed YAML -> "file:line:col: malformed YAML: ..."; unknown key,
    wrong type, out of range -> "file: dotted.key: message", plus "(override 'k=v')" when an
    override caused it. A missing file raises FileNotFoundError.
    """
    if path is None:
        return config_from_dict({}, overrides, source="<overrides>")
    raw = read_yaml(path)
    return config_from_dict(raw, overrides, source=str(path))


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """Plain JSON/YAML-safe dict of every field, defaults included (tuples become lists)."""
    return config.model_dump(mode="json")


def save_resolved_config(config: TrainConfig, run_dir: str | os.PathLike) -> Path:
    """Write run_dir/config.yaml: every field, defaults included, so the run is reproducible from
    the folder alone. Atomic (temp file + rename). Returns the path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / CONFIG_FILE
    text = "# resolved psirl config (all defaults filled in); resume with psirl train --resume\n"
    text += yaml.safe_dump(config_to_dict(config), sort_keys=False, default_flow_style=False)
    if config.loop == "online" and config.algorithm.preset is not None:
        # What the preset plus overrides resolve to, every knob (read-only: the run is defined
        # by `algorithm:` above, so a preset whose defaults change is still visible here).
        from psirl.algorithms import knobs_to_dict

        knobs = yaml.safe_dump({"resolved_knobs": knobs_to_dict(resolve_algorithm(config))},
                               sort_keys=False, default_flow_style=False)
        text += ("# algorithm.preset + algorithm.knobs resolve to (for reading; not read back):\n"
                 + "".join(f"# {line}\n" for line in knobs.splitlines()))
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, out)
    return out


def load_run_config(run_dir: str | os.PathLike, overrides: Iterable[str] = ()) -> TrainConfig:
    """The config saved in a run folder (for --resume), with optional overrides (e.g. a larger
    max_steps). `output_dir` is set to `run_dir`, so a moved run folder still resumes in place."""
    run_dir = Path(run_dir)
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {CONFIG_FILE} here; is this a psirl run folder?")
    raw = read_yaml(path)
    raw["output_dir"] = str(run_dir)
    return config_from_dict(raw, overrides, source=str(path))


def resolve_algorithm(config: TrainConfig):
    """The online loop's knobs: `psirl.algorithms.resolve_preset(preset, knobs)` -> OnlineKnobs.

    A bad preset or knob raises ConfigError naming `algorithm.preset` / `algorithm.knobs`
    (load_config already checked both when psirl.algorithms was importable).
    """
    import importlib

    algorithms = importlib.import_module("psirl.algorithms")
    preset = config.algorithm.preset
    if preset is None:
        raise ConfigError(["algorithm.preset: not set; the online loop needs a preset (e.g. grpo)"])
    if preset not in algorithms.PRESETS:
        raise ConfigError(
            [
                f"algorithm.preset: unknown preset {preset!r}; known presets: {', '.join(algorithms.PRESETS)}"
            ]
        )
    try:
        return algorithms.resolve_preset(preset, config.algorithm.knobs)
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError([f"algorithm.knobs: {exc}"]) from None
