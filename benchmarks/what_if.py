"""What-if: psirl's GRPO step with the fixes recommended in RESULTS.md patched in at run time.

NOT part of `make bench` and not a psirl code path: it monkeypatches psirl functions in this one
process, then runs benchmarks/psirl_grpo.py unchanged, so the lead can see what each proposed
change is worth before making it in psirl/. Each patch is a self-contained candidate fix:

  sample   psirl/rollout/hf_engine.py:_sample - draw the token by inverse CDF (cumsum +
           searchsorted(right=True)) instead of torch.multinomial (slow on CPU for wide vocabs).
  prefix   psirl/models/backbone.py:completion_hidden_states - run each distinct prompt once and
           continue the G completions of its group from its KV cache (ref and policy passes).

    python benchmarks/what_if.py sample,prefix -- --shape vocab32k \\
        --ckpt runs/bench/ckpt-vocab32k --out /tmp/whatif.json
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

PATCHES = ("sample", "prefix")


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
