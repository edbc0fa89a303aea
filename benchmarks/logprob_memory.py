"""Peak memory of per-token log-probs: psirl `token_logprobs` vs a naive full-logits log_softmax
(and TRL's fused lm_head, what its GRPOTrainer uses).

One subprocess per (vocabulary, method), so allocator state never carries over. Inside it, for the
forward pass alone (no grad: what the reference model does) and for forward + backward (the
policy; the parameters' .grad buffers are allocated beforehand), the call is run once to warm
up, then the kernel's peak-RSS counter is reset and the call is run again: the reported number
is that peak minus the RSS just before the call, i.e. the memory the log-prob computation itself
needs.

    python benchmarks/logprob_memory.py --vocab 151936 --method naive --out x.json

The model is a one-layer Qwen2 (hidden 256) with the given vocabulary; the batch is one sequence of
8 prompt tokens + `--tokens` completion tokens (1k by default).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402

METHODS = ("naive", "trl-fused", "psirl", "psirl-chunk128")


def naive_logprobs(model, input_ids, attention_mask, n_completion: int):
    """What a first implementation writes: full [B, L, V] logits, float32 log_softmax, gather."""
    import torch

    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # [B, L, V]
    logp_all = torch.log_softmax(logits.float(), dim=-1)[:, -n_completion - 1 : -1]
    targets = input_ids[:, -n_completion:]
    return logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def measure(model, fn, grad: bool) -> dict:
    import torch

    if grad:  # the .grad buffers exist before the measured call: it needs only activations
        for p in model.parameters():
            p.grad = torch.zeros_like(p)

    def call():
        with torch.set_grad_enabled(grad):
            logp = fn()
            if grad:
                logp.sum().backward()
        return logp

    call()  # warm-up: first-call allocations (thread pools, masks) are not the method's
    gc.collect()
    base = C.rss_mb()
    ok = C.reset_peak_rss()
    t0 = time.perf_counter()
    call()
    seconds = time.perf_counter() - t0
    peak = C.peak_rss_mb()
    return {"peak_extra_mb": peak - base if ok else None, "seconds": seconds, "reset_ok": ok}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, required=True)
    ap.add_argument("--method", choices=METHODS, required=True)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    C.set_threads()
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from psirl.models.logprobs import token_logprobs

    cfg = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                      num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=4,
                      tie_word_embeddings=False, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).float()
    prompt = 8
    input_ids = torch.randint(0, args.vocab, (1, prompt + args.tokens))
    attention_mask = torch.ones_like(input_ids)
    if args.method == "naive":
        def fn():
            return naive_logprobs(model, input_ids, attention_mask, args.tokens)
    elif args.method == "trl-fused":
        # What GRPOTrainer does (trl 1.16, _get_per_token_logps_and_entropies): a fused, tiled
        # lm_head + log-softmax patched onto the model, scoring only the labelled positions.
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model)
        labels = input_ids.clone()
        labels[:, :-args.tokens] = -100

        def fn():
            out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                        fused_lm_head=True)
            return out.log_probs[:, -args.tokens:]
    else:
        chunk = 128 if args.method == "psirl-chunk128" else None
        kwargs = {} if chunk is None else {"chunk_tokens": chunk}

        def fn():
            return token_logprobs(model, input_ids, attention_mask, args.tokens, **kwargs)[0]

    result = {"vocab": args.vocab, "method": args.method, "tokens": args.tokens,
              "hidden": args.hidden,
              "logits_fp32_mb": args.tokens * args.vocab * 4 / 2**20,
              "forward": measure(model, fn, grad=False),
              "forward_backward": measure(model, fn, grad=True)}
    C.write_json(args.out, result)


if __name__ == "__main__":
    main()
