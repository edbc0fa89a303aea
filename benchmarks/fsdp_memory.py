"""Per-rank memory and step time of sharded (FSDP2) vs data-parallel (DDP) training on CPU.

    python benchmarks/fsdp_memory.py --out runs/bench/fsdp_memory.md        # the whole table
    torchrun --nproc_per_node 2 benchmarks/fsdp_memory.py --worker --strategy fsdp --shape large

The table launches one torchrun per (shape, strategy, ranks) with gloo on CPU. Each rank builds
the same random Qwen2-shaped model (character vocabulary), shards it (fsdp: train/fsdp.py) or
keeps it whole (ddp), and takes `--steps` SFT-style optimiser steps on its share of a fixed batch
(token_logprobs, backward with the global normaliser, gradient sum, clipped fused AdamW). Reported
per rank, after the last step:
  state MiB   parameters + gradients + AdamW moments this rank holds (local shards for fsdp),
              counted from the tensors' storage: what falls as 1/N;
  peak RSS    the process's peak resident memory (includes the ~0.4 GiB of the Python / torch
              runtime, activations, and the gathered layer during forward / backward; glibc is
              told to mmap blocks >= 128 KiB so freed tensors leave the RSS);
  step s      median wall time of the steps after the first (2 shared CPU cores: the ranks
              compete for them, so times grow with N for both strategies).
With --reference each rank also holds a frozen copy of the model (the KL reference: no gradients,
no optimiser state), sharded like the policy under fsdp, and every step runs its no-grad forward
over the rank's rows; "ref MiB" is its weights on this rank and "ref s" the forward's median time.

    python benchmarks/fsdp_memory.py --shapes large --ranks 1,2 --reference
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

SHAPES = {
    # name: (hidden, layers, heads, intermediate)
    "tiny": (64, 2, 4, 128),
    "large": (512, 8, 8, 1536),
}


def _local_bytes(tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def worker(args) -> None:
    import torch

    from psirl.models.loading import load_policy
    from psirl.models.logprobs import token_logprobs
    from psirl.models.tiny import make_tiny_model
    from psirl.train import distributed as D
    from psirl.train.base import build_optimizer, split_microbatches
    from psirl.train.fsdp import shard_model

    torch.set_num_threads(1)
    rank, world_size = D.init_distributed("cpu")
    hidden, layers, heads, inter = SHAPES[args.shape]
    model_dir = Path(args.model_dir)
    if rank == 0 and not (model_dir / "config.json").exists():
        make_tiny_model(model_dir, hidden_size=hidden, num_layers=layers, num_heads=heads,
                        intermediate_size=inter, seed=0)
    D.barrier()
    model, _ = load_policy(model_dir, device="cpu", dtype="float32")
    model.train()
    if args.strategy == "fsdp":
        shard_model(model, SimpleNamespace(cpu_offload=False, activation_checkpointing=False,
                                           mixed_precision=False, reshard_after_forward=True))
    reference = None
    if args.reference:
        reference, _ = load_policy(model_dir, device="cpu", dtype="float32")
        reference.eval().requires_grad_(False)
        if args.strategy == "fsdp":
            shard_model(reference, SimpleNamespace(cpu_offload=False, activation_checkpointing=False,
                                                   mixed_precision=False,
                                                   reshard_after_forward=True))
    params = [p for p in model.parameters() if p.requires_grad]
    optim = type("O", (), {"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0})
    optimizer = build_optimizer(params, optim)

    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    rows, prompt, completion = args.batch, 16, args.tokens
    ids = torch.randint(0, vocab, (rows, prompt + completion), generator=g)
    attn = torch.ones_like(ids)
    mine = list(D.shard_indices(rows, rank, world_size))
    n_tokens = rows * completion  # the global normaliser
    times, ref_times, state_mib = [], [], 0.0
    for _ in range(args.steps):
        t0 = time.perf_counter()
        if reference is not None:
            with torch.no_grad():
                token_logprobs(reference, ids[mine], attn[mine], completion)
            ref_times.append(time.perf_counter() - t0)
        for micro in split_microbatches(len(mine), 2):
            r = mine[micro]
            logp, _ = token_logprobs(model, ids[r], attn[r], completion)
            (-logp.sum() / n_tokens).backward()
        D.all_reduce_gradients(params)
        grads = sum(_local_bytes(p.grad) for p in params if p.grad is not None)
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        weights = sum(_local_bytes(p) for p in model.parameters())
        moments = sum(_local_bytes(v) for s in optimizer.state.values() for v in s.values()
                      if hasattr(v, "numel") and v.dim() > 0)
        state_mib = (weights + grads + moments) / 2**20
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
    row = {"rank": rank, "state_mib": state_mib, "peak_rss_mib": peak_rss,
           "step_s": statistics.median(times[1:]) if len(times) > 1 else times[0],
           "ref_mib": (sum(_local_bytes(p) for p in reference.parameters()) / 2**20
                       if reference is not None else 0.0),
           "ref_s": statistics.median(ref_times[1:]) if len(ref_times) > 1 else 0.0,
           "params": sum(p.numel() for p in model.parameters()) if args.strategy == "ddp" else
           sum(_local_bytes(p) // 4 for p in model.parameters()) * world_size}
    rows_all = D.gather_objects(row)
    if rank == 0:
        Path(args.result).write_text(json.dumps(rows_all))


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(shape: str, strategy: str, ranks: int, model_dir: Path, args) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "r.json"
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        # Blocks >= 128 KiB come from mmap and go back to the OS when freed, so the peak RSS
        # follows the live tensors instead of glibc's retained, fragmented heap.
        env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", MALLOC_MMAP_THRESHOLD_="131072")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               str(Path(__file__).resolve()), "--worker", "--shape", shape, "--strategy", strategy,
               "--model-dir", str(model_dir), "--result", str(result), "--steps", str(args.steps),
               "--batch", str(args.batch), "--tokens", str(args.tokens),
               *(["--reference"] if args.reference else [])]
        for attempt in range(2):  # one retry: a gloo rendezvous on a busy machine can fail
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
            if proc.returncode == 0:
                break
            if attempt == 1:
                raise RuntimeError(proc.stderr[-4000:])
        return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--shapes", default="tiny,large")
    parser.add_argument("--strategy", choices=("ddp", "fsdp"), default="fsdp")
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--reference", action="store_true",
                        help="also hold a frozen reference copy and time its forward")
    parser.add_argument("--result", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    ref_cols = (" ref MiB / rank | ref forward s |", " --- | --- |") if args.reference else ("", "")
    lines = ["| model | params | strategy | ranks | state MiB / rank | peak RSS MiB / rank (max) "
             "| step s |" + ref_cols[0], "| --- | --- | --- | --- | --- | --- | --- |" + ref_cols[1]]
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes.split(","):
            model_dir = Path(tmp) / shape
            for ranks in [int(n) for n in args.ranks.split(",")]:
                for strategy in ("ddp", "fsdp"):
                    rows = launch(shape, strategy, ranks, model_dir, args)
                    state = max(r["state_mib"] for r in rows)
                    rss = max(r["peak_rss_mib"] for r in rows)
                    step = max(r["step_s"] for r in rows)
                    h, n_layers, *_ = SHAPES[shape]
                    line = (f"| {shape} (hidden {h}, {n_layers} layers) | "
                            f"{rows[0]['params'] / 1e6:.2f} M | {strategy} | {ranks} | "
                            f"{state:.1f} | {rss:.0f} | {step:.3f} |")
                    if args.reference:
                        line += (f" {max(r['ref_mib'] for r in rows):.1f} |"
                                 f" {max(r['ref_s'] for r in rows):.3f} |")
                    print(line, flush=True)
                    lines.append(line)
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
