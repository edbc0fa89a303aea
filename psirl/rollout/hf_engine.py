"""Batched sampling with transformers models and our own KV-cached decoding loop.

Why not ``model.generate``: the online loop needs the behaviour log-probability of every sampled
token (the denominator of the PPO / GRPO importance ratio, 002_51bc6b7a5ef2c181.txt), group
bookkeeping and stop strings, and ``generate`` would need ``output_scores`` ([B, V] per step kept
for the whole completion) plus a second pass to get them right. This loop:

* prefills each distinct prompt ONCE (left-padded, position ids from the attention mask, only the
  last position's logits computed), then repeats its KV cache ``n`` times for the group;
* decodes one token per step for every unfinished row with a ``DynamicCache`` - one forward of
  [rows, 1] tokens per step, no forward after the last token;
* drops finished rows from the batch and the cache once a quarter of the rows are done, and stops
  as soon as every row has finished;
* runs under ``torch.inference_mode`` with the model in eval mode (restored afterwards).

On CUDA (``decode="auto"``) the decode steps instead run on a transformers ``StaticCache`` of fixed
shape [rows, prompt bucket + max_new_tokens], with the step's forward compiled by
``torch.compile(mode="reduce-overhead")`` (CUDA graphs: one launch per token instead of one per
kernel). Rows are not compacted (fixed shapes), the attention mask is constant (finished rows'
outputs are ignored, as in the dynamic loop) and ``done.all()`` is read every
``static_check_every`` tokens instead of every token, so the loop queues work without host
syncs. Same seed, same samples: each row draws its uniform of step t from its own stream
(psirl/rollout/seeding.py) either way, so
``decode="static"`` gives the tokens of ``decode="dynamic", compact_finished=False`` (tested on
the CPU). Stop strings need a host-side decode every token, so they use the dynamic loop.

Behaviour log-probs are ``log softmax(z / temperature)[token]`` - the temperature-scaled
distribution BEFORE top-p / top-k truncation (for greedy decoding, temperature 0, the plain T=1
softmax). With top_p = 1 and top_k = 0 this is exactly the sampling distribution, and it equals
``psirl.models.token_logprobs(model, ..., temperature=temperature)`` on the returned batch, so a
single on-policy update needs no extra forward pass. With truncation the sampler's true
probability differs by the renormalisation over the kept set; psirl, like TRL / verl / OpenRLHF,
uses the untruncated temperature-scaled policy as pi_old.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..models.backbone import prefill_prompts, unwrap_peft
from ..models.sharded import gathered
from .batch import RolloutBatch, SamplingParams
from .seeding import RowStreams, call_seeds, row_seeds


class HFEngine:
    """Generation engine over a transformers ``*ForCausalLM`` (optionally PEFT-wrapped).

    model: the trainer's model object itself (not a copy), so weights are always current.
    tokenizer: its tokenizer (needs a pad or EOS token).
    device: where prompts are placed; defaults to the model's device.
    compact_finished: drop finished rows from the KV cache during decoding (faster when lengths
        differ; results are identical up to floating-point summation order).
    decode: "dynamic" (DynamicCache, the CPU default), "static" (StaticCache, eager),
        "compiled" (StaticCache + torch.compile with CUDA graphs), or "auto": "compiled" on CUDA,
        "dynamic" elsewhere. A compiled step that fails to build falls back to "static" once,
        with a warning (`self.decode_used` says which path the last call took).
    static_check_every: with a static cache, read ``done.all()`` (a host sync) every this many
        tokens; extra steps after every row has ended only decode padding.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        device: str | torch.device | None = None,
        *,
        compact_finished: bool = True,
        decode: str = "auto",
        static_check_every: int = 8,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.device = (
            torch.device(device) if device is not None else next(model.parameters()).device
        )
        self.compact_finished = compact_finished
        if decode not in DECODE_MODES:
            raise ValueError(f"decode: expected one of {DECODE_MODES}, got {decode!r}")
        if static_check_every < 1:
            raise ValueError(f"static_check_every: must be >= 1, got {static_check_every}")
        self.decode = decode
        self.static_check_every = static_check_every
        self.decode_used: str | None = None
        # StaticCaches by (model, rows, length, dtype, device), most recently used last: reused
        # so CUDA graphs replay on fixed addresses (training and evaluation shapes both kept).
        self._static: dict = {}
        self._compiled_step = None
        self.version = 0
        self.pad_token_id, self.eos_token_ids, self._adds_bos = special_tokens(model, tokenizer)

    def sync(self, model: nn.Module) -> None:
        """Record a new policy version. The HF engine samples from the trainer's own model object,
        so new weights are already in place and nothing is copied; if a different object is passed
        the engine switches to it (still no copy). ``self.version`` counts the syncs."""
        if model is not self.model:
            self.model = model
        self.version += 1

    def encode_prompts(self, prompts: list[str]) -> list[list[int]]:
        """Token ids of each prompt. No special tokens are added except the tokenizer's BOS, when
        the tokenizer normally prepends one and the text does not already start with it (so a
        chat-templated prompt that contains BOS does not get two)."""
        encoded = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        bos = self.tokenizer.bos_token_id
        out = []
        for i, ids in enumerate(encoded):
            if self._adds_bos and bos is not None and (not ids or ids[0] != bos):
                ids = [bos, *ids]
            if not ids:
                raise ValueError(
                    f"prompts[{i}]: empty after tokenisation; at least one token is needed"
                )
            out.append(list(ids))
        return out

    def generate(self, prompts: list[str], params: SamplingParams) -> RolloutBatch:
        """Sample ``params.n`` completions for each prompt; see ``RolloutBatch`` for the fields.

        Row ``i * n + j`` is sample j of prompt i (group_ids = prompt_index = i). A row ends at
        its first EOS token (kept, masked in) or when the decoded completion contains a stop
        string (tokens kept, text cut before it), else after ``max_new_tokens`` (truncated=True).
        """
        if not prompts:
            raise ValueError("prompts: empty list")
        model = unwrap_peft(self.model)
        was_training = model.training
        # Switch modes only when some module is in training mode (a mode switch walks every
        # module; the online loop already puts the model in eval mode before sampling).
        switch = any(m.training for m in model.modules())
        if switch:
            model.eval()
        try:
            # FSDP (models/sharded.py): every unit gathered once for the whole decode (ranks end
            # at different tokens, so per-layer gathers could not stay in step); a no-op else.
            with gathered(self.model), torch.inference_mode():
                decoded = self._decode(model, list(prompts), params)
        finally:
            if switch:
                model.train(was_training)
        # Built outside inference mode: the batch's tensors feed autograd in the trainer.
        return self._assemble(list(prompts), *decoded, params)

    def generate_ids(self, prompt_ids: list[list[int]], params: SamplingParams, *,
                     row_seeds: Sequence[int] | None = None,
                     stream_offsets: Sequence[int] | None = None) -> RolloutBatch:
        """``generate`` from token ids instead of text: each prompt is taken as the exact ids
        given (nothing added, nothing re-tokenised), so a multi-turn episode continues from the
        very tokens it sampled (psirl/rollout/episode.py). ``RolloutBatch.prompts`` holds the
        decoded ids (special tokens kept), for display only.

        row_seeds / stream_offsets (one per row, ``params.n`` = 1): row r draws its token t from
        draw ``stream_offsets[r] + t`` of the stream seeded ``row_seeds[r]``, so an episode's
        turns continue one stream (psirl/rollout/seeding.py)."""
        if not prompt_ids:
            raise ValueError("prompt_ids: empty list")
        for i, ids in enumerate(prompt_ids):
            if not ids:
                raise ValueError(f"prompt_ids[{i}]: empty; at least one token is needed")
        streams = None
        if row_seeds is not None:
            if params.n != 1 or len(row_seeds) != len(prompt_ids):
                raise ValueError(f"row_seeds: one per prompt with n = 1; got {len(row_seeds)} "
                                 f"for {len(prompt_ids)} prompts, n = {params.n}")
            offsets = list(stream_offsets) if stream_offsets is not None else [0] * len(row_seeds)
            if len(offsets) != len(row_seeds) or min(offsets) < 0:
                raise ValueError("stream_offsets: one non-negative offset per row")
            streams = (tuple(row_seeds), tuple(offsets))
        texts = self.tokenizer.batch_decode([list(ids) for ids in prompt_ids])
        model = unwrap_peft(self.model)
        was_training = model.training
        switch = any(m.training for m in model.modules())
        if switch:
            model.eval()
        try:
            with gathered(self.model), torch.inference_mode():
                decoded = self._decode(model, texts, params, [list(ids) for ids in prompt_ids],
                                       streams)
        finally:
            if switch:
                model.train(was_training)
        return self._assemble(texts, *decoded, params)

    def _decode_mode(self, params: SamplingParams) -> str:
        mode = self.decode
        if mode == "auto":
            mode = "compiled" if self.device.type == "cuda" else "dynamic"
        if mode != "dynamic" and (params.stop or not _static_cache_supported(self.model)):
            mode = "dynamic"  # stop strings are checked on the host every token
        return mode

    def _decode(self, model: nn.Module, prompts: list[str], params: SamplingParams,
                prompt_ids: list[list[int]] | None = None, streams=None) -> tuple:
        """The sampling loop (from ``prompt_ids`` when given, else the encoded ``prompts``;
        ``streams``: (row seeds, draw offsets) per row, else derived from ``params``).
        Returns (prompt ids [N, P], prompt mask [N, P], n, completion ids [B, T], behaviour
        log-probs [B, T], lengths [B], stopped [B]) as inference tensors."""
        mode = self._decode_mode(params)
        if mode == "compiled":
            try:
                out = self._decode_prompts(model, prompts, params, mode, prompt_ids, streams)
                self.decode_used = mode
                return out
            except Exception as exc:  # noqa: BLE001 - any compile / CUDA-graph failure
                import warnings

                warnings.warn(f"HFEngine: compiled decoding failed ({type(exc).__name__}: {exc}); "
                              "using the static-cache loop without compilation", stacklevel=3)
                self.decode = "static"
                self._compiled_step = None
                mode = "static"
        self.decode_used = mode
        return self._decode_prompts(model, prompts, params, mode, prompt_ids, streams)

    def _decode_prompts(self, model: nn.Module, prompts: list[str], params: SamplingParams,
                        mode: str, prompt_ids: list[list[int]] | None = None,
                        streams=None) -> tuple:
        device = self.device
        n = params.n
        if prompt_ids is None:
            prompt_ids = self.encode_prompts(prompts)
        n_prompts = len(prompt_ids)
        prompt_len = max(len(ids) for ids in prompt_ids)
        extra_cols = 0
        if mode != "dynamic":
            # Prompt columns rounded up, so the static shapes (and the compiled graph) repeat
            # across steps whose longest prompt differs by a few tokens; the extra all-padding
            # columns are dropped from the returned batch.
            extra_cols = -(-prompt_len // PROMPT_BUCKET) * PROMPT_BUCKET - prompt_len
            prompt_len += extra_cols
        ids_p = torch.full((n_prompts, prompt_len), self.pad_token_id, dtype=torch.long)
        mask_p = torch.zeros((n_prompts, prompt_len), dtype=torch.long)
        for i, ids in enumerate(prompt_ids):
            ids_p[i, prompt_len - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            mask_p[i, prompt_len - len(ids) :] = 1
        ids_p, mask_p = ids_p.to(device), mask_p.to(device)

        # One random stream per row, keyed by its prompt's seed and its sample index (or given).
        seeds, offsets = streams or (row_seeds(call_seeds(params, n_prompts), n), None)
        uniforms = RowStreams(seeds, offsets, device=device)

        # Prefill each distinct prompt once, then give every sample of the group its own copy.
        out = prefill_prompts(model, ids_p, mask_p, logits_to_keep=1)
        logits = out.logits[:, -1, :]
        cache = out.past_key_values
        if mode != "dynamic":
            tokens, logp, lengths, stopped = self._decode_static(
                model, mask_p, n, logits, cache, params, uniforms,
                compiled=mode == "compiled")
            return ids_p[:, extra_cols:], mask_p[:, extra_cols:], n, tokens, logp, lengths, stopped
        if n > 1:
            cache.batch_repeat_interleave(n)
            logits = logits.repeat_interleave(n, dim=0)
        batch = n_prompts * n
        attn = mask_p.repeat_interleave(n, dim=0)  # [rows, cols so far], rows = current batch rows
        next_pos = attn.sum(-1)  # position of the next token of each current row

        max_new = params.max_new_tokens
        tokens_out = torch.full(
            (batch, max_new), self.pad_token_id, dtype=torch.long, device=device
        )
        logp_out = torch.zeros((batch, max_new), dtype=torch.float32, device=device)
        lengths = torch.full((batch,), max_new, dtype=torch.long, device=device)
        stopped = torch.zeros(batch, dtype=torch.bool, device=device)  # ended by EOS / stop string
        rows = torch.arange(batch, device=device)  # original row of each current batch row
        done = torch.zeros(batch, dtype=torch.bool, device=device)  # per current row
        eos = torch.tensor(self.eos_token_ids, dtype=torch.long, device=device)

        steps = 0
        for t in range(max_new):
            token, logp = _sample(logits, params, uniforms(t)[rows])
            token = token.masked_fill(done, self.pad_token_id)
            logp = logp.masked_fill(done, 0.0)
            tokens_out[rows, t] = token
            logp_out[rows, t] = logp
            steps = t + 1

            ended = ~done & torch.isin(token, eos)
            if params.stop:
                ended |= self._hit_stop(tokens_out, rows, ~done & ~ended, t, params.stop)
            if ended.any():
                lengths[rows[ended]] = t + 1
                stopped[rows[ended]] = True
                done = done | ended
            if bool(done.all()) or t == max_new - 1:
                break

            if self.compact_finished and int(done.sum()) * 4 >= len(rows):
                keep = (~done).nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                rows, token, attn = rows[keep], token[keep], attn[keep]
                next_pos, done = next_pos[keep], done[keep]

            live = (~done).long()
            attn = torch.cat([attn, live.unsqueeze(-1)], dim=1)
            out = model(
                input_ids=token.unsqueeze(-1),
                attention_mask=attn,
                position_ids=next_pos.unsqueeze(-1),
                past_key_values=cache,
                use_cache=True,
            )
            logits = out.logits[:, -1, :]
            cache = out.past_key_values
            next_pos = next_pos + live

        return ids_p, mask_p, n, tokens_out[:, :steps], logp_out[:, :steps], lengths, stopped

    def _decode_static(self, model, mask_p, n, logits, prefill_cache, params, uniforms, *,
                       compiled: bool):
        """Decode on a StaticCache [rows, P + max_new] filled from the prefill; returns
        (completion ids [B, T], behaviour log-probs [B, T], lengths [B], stopped [B])."""
        device = self.device
        max_new = params.max_new_tokens
        n_prompts, prompt_len = mask_p.shape
        batch = n_prompts * n
        cache = self._static_cache(model, prefill_cache, n, batch, prompt_len + max_new)
        if n > 1:
            logits = logits.repeat_interleave(n, dim=0)
        # Constant mask: prompt padding, then every generated column. A finished row keeps
        # decoding padding, attending to it; its outputs are dropped, as in the dynamic loop.
        mask_rows = mask_p.repeat_interleave(n, dim=0)
        attn = torch.cat([mask_rows, mask_rows.new_ones(batch, max_new)], dim=1)
        next_pos = mask_rows.sum(-1)

        tokens_out = torch.full((batch, max_new), self.pad_token_id, dtype=torch.long, device=device)
        logp_out = torch.zeros((batch, max_new), dtype=torch.float32, device=device)
        lengths = torch.full((batch,), max_new, dtype=torch.long, device=device)
        stopped = torch.zeros(batch, dtype=torch.bool, device=device)
        eos = torch.tensor(self.eos_token_ids, dtype=torch.long, device=device)
        step = self._step_fn(compiled)
        for t in range(max_new):
            token, logp = _sample(logits, params, uniforms(t))
            token = token.masked_fill(stopped, self.pad_token_id)
            tokens_out[:, t] = token
            logp_out[:, t] = logp.masked_fill(stopped, 0.0)
            ended = ~stopped & torch.isin(token, eos)
            lengths = torch.where(ended, t + 1, lengths)
            stopped = stopped | ended
            if t == max_new - 1:
                break
            if (t + 1) % self.static_check_every == 0 and bool(stopped.all()):
                break
            logits = step(model, token.unsqueeze(-1), next_pos.unsqueeze(-1), attn, cache)
            next_pos = next_pos + (~stopped).long()
        steps = int(lengths.max())  # the dynamic loop's length: the last row's end, or max_new
        return tokens_out[:, :steps], logp_out[:, :steps], lengths, stopped

    def _static_cache(self, model, prefill_cache, n: int, batch: int, length: int):
        """A StaticCache of [batch, heads, length, head_dim] per layer holding the prefill
        (repeated n times per prompt) and positioned after it. The cache object and its tensors
        are reused for the same (model, batch, length, dtype, device), the last
        STATIC_CACHES_KEPT shapes kept: CUDA graphs replay on fixed addresses."""
        from transformers import StaticCache

        prompt_len = prefill_cache.layers[0].keys.shape[2]
        first = prefill_cache.layers[0].keys
        key = (id(model), batch, length, first.dtype, first.device)
        cache = self._static.pop(key, None)
        if cache is None:
            cache = StaticCache(config=model.config, max_cache_len=length)
            while len(self._static) >= STATIC_CACHES_KEPT:  # drop the least recently used
                self._static.pop(next(iter(self._static)))
        self._static[key] = cache  # most recently used last
        for src, dst in zip(prefill_cache.layers, cache.layers, strict=True):
            keys = src.keys.repeat_interleave(n, dim=0) if n > 1 else src.keys
            values = src.values.repeat_interleave(n, dim=0) if n > 1 else src.values
            if not dst.is_initialized:
                dst.lazy_initialization(keys, values)
            dst.keys[:, :, :prompt_len].copy_(keys)
            dst.values[:, :, :prompt_len].copy_(values)
            dst.cumulative_length.fill_(prompt_len)
        return cache

    def _step_fn(self, compiled: bool):
        if not compiled:
            return _decode_step
        if self._compiled_step is None:
            compiled_fn = torch.compile(_decode_step, mode="reduce-overhead", dynamic=False)

            def step(*args):
                # A new CUDA-graph iteration: the previous step's logits were consumed (sampled).
                torch.compiler.cudagraph_mark_step_begin()
                return compiled_fn(*args).clone()

            self._compiled_step = step
        return self._compiled_step

    def _hit_stop(
        self,
        tokens_out: torch.Tensor,
        rows: torch.Tensor,
        check: torch.Tensor,
        t: int,
        stop: tuple[str, ...],
    ) -> torch.Tensor:
        """[rows] bool: which checked rows' decoded completion now contains a stop string.

        A stop string is caught on the token that completes it, so only the tail can hold a new
        occurrence: the last ``2 * (longest stop in bytes) + 8`` tokens are decoded (as the final
        text is: special tokens skipped). When that tail decodes to fewer than
        ``longest stop + 4`` characters (special tokens, partial UTF-8 bytes) the whole
        completion so far is decoded instead, so a stop string is never missed for lack of context.
        """
        hit = torch.zeros_like(check)
        idx = check.nonzero().squeeze(-1)
        if idx.numel() == 0:
            return hit
        longest_bytes = max(len(s.encode("utf-8")) for s in stop)
        longest_chars = max(len(s) for s in stop)
        start = max(0, t + 1 - (2 * longest_bytes + 8))
        checked_rows = rows[idx]
        tails = tokens_out[checked_rows, start : t + 1].tolist()
        texts = self.tokenizer.batch_decode(tails, skip_special_tokens=True)
        flags = []
        for row, text in zip(checked_rows.tolist(), texts, strict=True):
            if start > 0 and len(text) < longest_chars + 4:
                prefix = tokens_out[row, : t + 1].tolist()
                text = self.tokenizer.decode(prefix, skip_special_tokens=True)
            flags.append(any(s in text for s in stop))
        hit[idx] = torch.tensor(flags, dtype=torch.bool, device=hit.device)
        return hit

    def _assemble(
        self,
        prompts: list[str],
        ids_p: torch.Tensor,
        mask_p: torch.Tensor,
        n: int,
        completion_ids: torch.Tensor,
        logp: torch.Tensor,
        lengths: torch.Tensor,
        stopped: torch.Tensor,
        params: SamplingParams,
    ) -> RolloutBatch:
        steps = completion_ids.shape[1]
        positions = torch.arange(steps, device=lengths.device)
        completion_mask = positions.unsqueeze(0) < lengths.unsqueeze(1)
        completion_ids = completion_ids.masked_fill(~completion_mask, self.pad_token_id)
        group_ids = torch.arange(len(prompts), device=lengths.device).repeat_interleave(n)
        texts = self.tokenizer.batch_decode(
            [
                ids[:length]
                for ids, length in zip(completion_ids.tolist(), lengths.tolist(), strict=True)
            ],
            skip_special_tokens=True,
        )
        return RolloutBatch(
            input_ids=torch.cat([ids_p.repeat_interleave(n, dim=0), completion_ids], dim=1),
            attention_mask=torch.cat(
                [mask_p.repeat_interleave(n, dim=0), completion_mask.long()], dim=1
            ),
            completion_ids=completion_ids,
            completion_mask=completion_mask.float(),
            behaviour_logprobs=logp * completion_mask,
            group_ids=group_ids,
            prompt_index=group_ids.clone(),
            truncated=~stopped,
            prompt_len=ids_p.shape[1],
            prompts=[p for p in prompts for _ in range(n)],
            completions=[_cut_at_stop(text, params.stop) for text in texts],
            pad_token_id=self.pad_token_id,
        )


DECODE_MODES = ("auto", "dynamic", "static", "compiled")
PROMPT_BUCKET = 16  # static-cache prompt columns are a multiple of this
STATIC_CACHES_KEPT = 4


def _decode_step(model, token, position_ids, attention_mask, cache):
    """One decode forward on a StaticCache: next-token logits [rows, V] of `token` [rows, 1]."""
    out = model(input_ids=token, attention_mask=attention_mask, position_ids=position_ids,
                **{_CACHE_KWARG: cache}, use_cache=True)
    return out.logits[:, -1, :]


def _static_cache_supported(model: nn.Module) -> bool:
    """Whether the static-cache loop serves `model`: transformers >= 5, whose StaticCache layer
    tracks its own write position (``cumulative_length``, set by `_static_cache` after the
    prefill is copied in), and every layer a full-attention ``StaticLayer`` (sliding-window
    layers keep a rolling buffer the copy does not fill)."""
    try:
        from transformers import StaticCache
        from transformers.cache_utils import StaticLayer
    except ImportError:
        return False
    if "cumulative_length" not in getattr(StaticLayer, "__annotations__", {}):
        return False
    try:
        layers = StaticCache(config=unwrap_peft(model).config, max_cache_len=1).layers
    except Exception:  # noqa: BLE001 - an architecture transformers has no static cache for
        return False
    return bool(layers) and all(type(layer) is StaticLayer for layer in layers)


def _cache_kwarg() -> str:
    """The decoder's cache argument: ``cache`` in transformers >= 5.2x, ``past_key_values``
    before (still accepted, with a deprecation warning that would break a compiled graph)."""
    import inspect

    try:
        from transformers import Qwen2Model

        return "cache" if "cache" in inspect.signature(Qwen2Model.forward).parameters else "past_key_values"
    except ImportError:
        return "past_key_values"


_CACHE_KWARG = _cache_kwarg()


def _sample(
    logits: torch.Tensor, params: SamplingParams, uniforms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens [rows] and their behaviour log-probs [rows] float32 from logits [rows, V]
    and one uniform in [0, 1) per row (unused when greedy).

    Greedy (temperature 0): argmax, log-prob under softmax(z). Otherwise scores = z / temperature,
    log-prob = log_softmax(scores)[token], and the token is drawn from softmax(scores) restricted
    to the top-k tokens (ties kept), then to the smallest prefix of the sorted distribution whose
    mass reaches top_p (renormalised).
    """
    logits = logits.float()
    if params.temperature == 0:
        token = logits.argmax(-1)
        return token, F.log_softmax(logits, -1).gather(-1, token.unsqueeze(-1)).squeeze(-1)
    scores = logits / params.temperature if params.temperature != 1.0 else logits
    logp_all = F.log_softmax(scores, -1)
    sample_scores = logp_all
    vocab = scores.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(sample_scores, params.top_k, dim=-1).values[:, -1:]
        sample_scores = sample_scores.masked_fill(sample_scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = sample_scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(-1)
        mass_before = probs.cumsum(-1) - probs
        drop = mass_before >= params.top_p
        drop[:, 0] = False
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        sample_scores = torch.full_like(sample_scores, float("-inf")).scatter(
            -1, order, sorted_scores
        )
    token = _inverse_cdf_sample(sample_scores.softmax(-1), uniforms)
    return token, logp_all.gather(-1, token.unsqueeze(-1)).squeeze(-1)


def _inverse_cdf_sample(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row [rows] long from probs [rows, V] (rows sum to ~1, zeros allowed) and
    uniforms [rows] in [0, 1).

    token = min{v : cdf_v > u}, u ~ U[0, cdf_{V-1}). Why not ``torch.multinomial``: on CPU it costs
    17.8 ms at [32, 32768] and 187 ms at [64, 151936] against 0.36 ms and 16 ms here
    (benchmarks/RESULTS.md). ``right=True`` skips zero-probability tokens: their cdf equals their
    left neighbour's, so no u can land on them, and top-k / top-p truncation stays exact. Scaling u
    by the last cdf entry absorbs the float32 rounding of the cumulative sum; keeping the scaled u
    strictly below that entry (``nextafter``) means the search always ends on a token of non-zero
    mass, even when the draw rounds up to the total.
    """
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    u = uniforms.to(device=cdf.device, dtype=cdf.dtype).unsqueeze(-1)
    u = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)


def _cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


def _eos_ids(model: nn.Module, tokenizer) -> list[int]:
    """EOS ids from the tokenizer and the model's generation config (int or list)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_config = getattr(unwrap_peft(model), "generation_config", None)
    gen_eos = getattr(gen_config, "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos is not None:
        ids.update(int(i) for i in gen_eos)
    if not ids:
        raise ValueError(
            "tokenizer / generation_config: no eos_token_id; generation could not stop"
        )
    return sorted(ids)


def _tokenizer_adds_bos(tokenizer) -> bool:
    """Whether ``tokenizer(text)`` (default special tokens) starts with its BOS token."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def engine_from_config(config, model: nn.Module, tokenizer) -> HFEngine:
    """`rollout.engine: hf`: sample with the trainer's own module (no weight copies)."""
    return HFEngine(model, tokenizer)


def special_tokens(model: nn.Module, tokenizer) -> tuple[int, list[int], bool]:
    """(pad id, EOS ids, whether the tokenizer prepends BOS): what every engine needs to lay out
    prompts and end completions the same way (pad falls back to EOS)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer: needs a pad_token_id or an eos_token_id for padding")
    return int(pad), _eos_ids(model, tokenizer), _tokenizer_adds_bos(tokenizer)
