"""What-if: psirl's GRPO step with the fixes recommended in RESULTS.md patched in at run time.

NOT part of `make bench` and not a psirl code path: it monkeypatches psirl functions in this one
process, then runs benchmarks/psirl_grpo.py unchanged, so the lead can see what each proposed
change is worth before making it in psirl/. Each patch is a self-contained candidate fix:

  sample   psirl/rollout/hf_engine.py:_sample - draw the token by inverse CDF (cumsum +
           searchsorted(right=True)) instead of torch.multinomial (slow on CPU for wide vocabs).
  adam     psirl/train/base.py:build_optimizer - AdamW(fused=True).
  clip     psirl/train/base.py:clip_and_step - one grad-norm computation (clip_grad_norm_
           returns the pre-clip total norm) instead of a per-tensor norm list plus clip_grad_norm_.
  prefix   psirl/models/backbone.py:completion_hidden_states - run each distinct prompt once and
           continue the G completions of its group from its KV cache (ref and policy passes).
  entropy  psirl/models/logprobs.py:token_logprobs - compute the entropy metric outside autograd
           (it is only a metric when entropy_coef == 0) instead of inside the checkpointed chunk.

    python benchmarks/what_if.py sample,adam,clip,entropy -- --shape vocab32k \\
        --ckpt runs/bench/ckpt-vocab32k --out /tmp/whatif.json
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

PATCHES = ("sample", "adam", "clip", "prefix", "entropy")


def patch_sample() -> None:
    import psirl.rollout.hf_engine as hfe

    original = hfe._sample

    def _sample(logits, params, generator):
        if params.temperature == 0:
            return original(logits, params, generator)
        logits = logits.float()
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
            drop = (probs.cumsum(-1) - probs) >= params.top_p
            drop[:, 0] = False
            sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
            sample_scores = torch.full_like(sample_scores, float("-inf")).scatter(-1, order, sorted_scores)
        # Inverse CDF: token = first index whose cumulative mass exceeds u ~ U[0, total).
        # right=True never picks a zero-probability token (its cdf equals its left neighbour's).
        cdf = sample_scores.softmax(-1).cumsum(-1)
        u = torch.rand((cdf.shape[0], 1), generator=generator, device=cdf.device) * cdf[:, -1:]
        token = torch.searchsorted(cdf, u, right=True).clamp_(max=vocab - 1).squeeze(-1)
        return token, logp_all.gather(-1, token.unsqueeze(-1)).squeeze(-1)

    hfe._sample = _sample


def patch_adam() -> None:
    import psirl.train.online as online

    def build_optimizer(params, optim):
        trainable = [p for p in params if p.requires_grad]
        return torch.optim.AdamW(trainable, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                                 weight_decay=optim.weight_decay, fused=True)

    online.build_optimizer = build_optimizer


def patch_clip() -> None:
    import psirl.train.online as online

    def clip_and_step(parameters, optimizer, scheduler=None, grad_clip=None):
        with_grad = [p for p in parameters if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(with_grad, grad_clip if grad_clip else float("inf"))
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return float(norm)

    online.clip_and_step = clip_and_step


def patch_prefix() -> None:
    from transformers import DynamicCache

    import psirl.models.logprobs as lp
    from psirl.models.backbone import position_ids_from_mask

    original = lp.completion_hidden_states

    def completion_hidden_states(decoder, input_ids, attention_mask, n_completion):
        length = input_ids.shape[1]
        p = length - n_completion
        key = torch.cat([input_ids[:, :p], attention_mask[:, :p].to(input_ids.dtype)], 1)
        uniq, inverse = torch.unique(key, dim=0, return_inverse=True)
        if uniq.shape[0] == input_ids.shape[0]:
            return original(decoder, input_ids, attention_mask, n_completion)
        ids_p, mask_p = uniq[:, :p], uniq[:, p:]
        cache = DynamicCache(config=decoder.config)
        out = decoder(input_ids=ids_p, attention_mask=mask_p,
                      position_ids=position_ids_from_mask(mask_p), past_key_values=cache,
                      use_cache=True)
        first = out.last_hidden_state[:, -1:, :][inverse]  # predicts completion token 0
        if n_completion == 1:
            return first
        cache = out.past_key_values
        cache.batch_select_indices(inverse)
        pos = position_ids_from_mask(attention_mask)[:, p : length - 1]
        rest = decoder(input_ids=input_ids[:, p : length - 1],
                       attention_mask=attention_mask[:, : length - 1], position_ids=pos,
                       past_key_values=cache, use_cache=True)
        return torch.cat([first, rest.last_hidden_state], dim=1)

    lp.completion_hidden_states = completion_hidden_states


def patch_entropy() -> None:
    from torch.utils.checkpoint import checkpoint

    import psirl.models.logprobs as lp

    def token_logprobs(model, input_ids, attention_mask, n_completion, *, temperature=1.0,
                       with_entropy=False, chunk_tokens=1024):
        # psirl's token_logprobs with one change: the entropy is computed from a detached
        # log-softmax (a metric; no [n, V] autograd graph, no backward through it).
        decoder, head = lp.split_backbone_and_head(model)
        config = getattr(model, "config", None)
        hidden = lp.completion_hidden_states(decoder, input_ids, attention_mask, n_completion)
        batch, steps, width = hidden.shape
        flat_hidden = hidden.reshape(batch * steps, width)
        flat_targets = input_ids[:, -n_completion:].reshape(batch * steps)

        def chunk_fn(h, targets):
            logits = lp.apply_logit_transform(head(h), config).float()
            if temperature != 1.0:
                logits = logits / temperature
            logp_all = F.log_softmax(logits, dim=-1)
            logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            if with_entropy:
                with torch.no_grad():
                    entropy = -(logp_all.exp() * logp_all).sum(-1)
            else:
                entropy = logp.new_zeros(())
            return logp, entropy

        use_checkpoint = torch.is_grad_enabled() and (
            flat_hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
        logps, entropies = [], []
        for start in range(0, batch * steps, chunk_tokens):
            h = flat_hidden[start : start + chunk_tokens]
            t = flat_targets[start : start + chunk_tokens]
            if use_checkpoint:
                logp, entropy = checkpoint(chunk_fn, h, t, use_reentrant=False)
            else:
                logp, entropy = chunk_fn(h, t)
            logps.append(logp)
            entropies.append(entropy)
        logp = torch.cat(logps).view(batch, steps)
        entropy = torch.cat(entropies).view(batch, steps) if with_entropy else None
        return logp, entropy

    lp.token_logprobs = token_logprobs


def main(argv: list[str]) -> None:
    if "--" not in argv:
        raise SystemExit(__doc__)
    split = argv.index("--")
    names = [n for n in ",".join(argv[:split]).split(",") if n and n != "none"]
    unknown = set(names) - set(PATCHES)
    if unknown:
        raise SystemExit(f"unknown patches {sorted(unknown)}; known: {PATCHES}")
    for name in names:
        globals()[f"patch_{name}"]()
    import psirl_grpo

    psirl_grpo.main(argv[split + 1 :])


if __name__ == "__main__":
    main(sys.argv[1:])
