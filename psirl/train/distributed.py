"""Data-parallel training over torch.distributed: one process per device, launched by torchrun.

    torchrun --nproc_per_node N -m psirl.cli train cfg.yaml

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `init_distributed`
joins the group they describe (gloo on CPU, nccl on CUDA, one GPU per LOCAL_RANK). Without them
the world has one process and every helper here returns its input unchanged without
communicating, so a single-process run takes exactly the path it took before.

What is global and what is per rank
    data order      global: every rank draws the step's order from the same
                    `step_generator(seed, step)`; rank r takes the contiguous slice
                    `shard_indices(n, r, W)` of the step's prompts (SFT: examples). The union of
                    the shards is the single-process batch, and a prompt's G samples (its GRPO /
                    RLOO group) are drawn on one rank, so group baselines stay local and exact.
    sampling noise  per prompt: prompt k of the step is sampled from streams seeded by (step
                    seed, k) (psirl/rollout/seeding.py), so its samples are the same on any rank
                    and at any world size; a run resumes exactly on another number of ranks.
    normaliser      global: each rank counts its tokens / sequences (core.aggregate
                    ``normaliser_count``) and the counts are all-reduced
                    (`global_step_normaliser`).
    gradients       summed over ranks (`all_reduce_gradients`) before clipping, so the clipped
                    norm is the global gradient's.
    advantages      group estimators and GAE per rank (they only read a sequence's own group);
                    batch_mean / batch_whiten from the statistics of the whole global batch
                    (`global_advantages`).
    parameters      identical on every rank: broadcast from rank 0 at the start, then the same
                    summed gradient and the same deterministic AdamW step everywhere.
    metrics         reduced to global values (`reduce_metrics`); only rank 0 writes metrics,
                    checkpoints, final/ and the report.

Why a sum of gradients and not DDP's average
    Each rank r backpropagates L_r = sum_{(b,t) on r} m_{b,t} l_{b,t} / N with N the GLOBAL
    step normaliser (core/aggregate.py: "N_tok, N_seq are counts over the whole optimiser step
    (all micro-batches, all data-parallel ranks)"). Then

        sum_r grad L_r = grad( sum_{all b,t} m l / N ) = the full-batch gradient, exactly,

    whatever the shard sizes, in every aggregation mode: each term of the numerator lives on
    exactly one rank and the denominator is shared, just as for micro-batches. DDP instead
    averages, (1/W) sum_r grad L_r', which is the full-batch gradient only when each rank
    normalises by its LOCAL count and every rank holds the same count (N_r = N / W). Response
    lengths differ between ranks in RL and SFT alike, so the DDP mean over-weights the tokens of
    ranks with short responses (the bug class of TRL #5619); and using DDP with a global
    normaliser needs the loss multiplied by W, a hidden coupling between the loss and the
    launcher. The sum keeps one equation for micro-batches and ranks alike. (What is given up is
    DDP's overlap of communication with the backward pass: gradients are reduced after it, in
    flat buckets.)

Reference: DESIGN.md ("aggregate.py - the normaliser ... is an explicit argument computed once per
optimiser step, so splitting a batch into micro-batches or data-parallel ranks gives exactly the
full-batch gradient"); ../shared/reference/002_51bc6b7a5ef2c181.txt (length normalisation).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import math
import os
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from psirl.core.advantages import (
    ADVANTAGE_ESTIMATORS,
    ESTIMATORS,
    estimator_names,
    reward_to_go,
    sequence_returns,
)
from psirl.core.aggregate import normaliser_count, normaliser_from_count

__all__ = [
    "BATCH_ESTIMATORS",
    "all_gather_rows",
    "all_reduce_gradients",
    "all_reduce_sum",
    "any_rank",
    "barrier",
    "broadcast_parameters",
    "gather_floats",
    "gather_objects",
    "global_advantages",
    "global_step_normaliser",
    "init_distributed",
    "is_main",
    "reduce_metrics",
    "shard_indices",
    "world",
]

# Advantage estimators whose baseline is a statistic of the whole batch (scope "batch" in the
# registry of core/advantages.py, the one place an estimator's properties live).
BATCH_ESTIMATORS = estimator_names(scope="batch")

# The device collectives run on: cpu for gloo, this rank's GPU for nccl (set by init_distributed).
_COMM = {"device": torch.device("cpu")}


# --------------------------------------------------------------------------- the process group


def init_distributed(device: str = "auto") -> tuple[int, int]:
    """Join the process group torchrun describes in the environment; return (rank, world_size).

    WORLD_SIZE unset or 1: nothing happens, (0, 1). Already initialised (a second run in the
    same process, or a caller that set the group up itself): the existing group is kept.
    device: the config's "cpu" | "cuda" | "auto"; training on CUDA ("cuda", or "auto" with a
    GPU) uses nccl and makes cuda:LOCAL_RANK this process's GPU (torch.cuda.set_device), so
    device "cuda" means that GPU; training on CPU uses gloo.
    """
    if dist.is_available() and dist.is_initialized():
        return world()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world_size} but this torch build has no torch.distributed")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world_size} but {missing} not set: launch with torchrun")
    if device not in ("cpu", "cuda", "auto"):
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'auto', got {device!r}")
    on_gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    backend = "nccl" if on_gpu else "gloo"
    if backend == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        _COMM["device"] = torch.device("cuda", local_rank)
    else:
        _COMM["device"] = torch.device("cpu")
    dist.init_process_group(backend=backend, init_method="env://")
    atexit.register(_destroy)
    return world()


def _destroy() -> None:
    """At exit: every rank reaches this point before any tears its process group down (a rank
    destroying gloo's pairs while a peer still uses them can abort the peer at exit)."""
    if dist.is_available() and dist.is_initialized():
        # Bounded: a rank leaving on an error must not wait for peers stuck in a collective.
        with contextlib.suppress(Exception):
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=30))
        dist.destroy_process_group()


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when not running under torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True on rank 0 (the rank that writes files), and in a single-process run."""
    return world()[0] == 0


def barrier() -> None:
    """Wait until every rank gets here (no-op with one process)."""
    if world()[1] > 1:
        dist.barrier()


# --------------------------------------------------------------------------- collectives


def all_reduce_sum(value: Tensor | float) -> Tensor | float:
    """Sum of `value` over ranks, returned on every rank (a float stays a float, summed in
    float64; a tensor comes back on its own device and dtype). One process: `value` itself."""
    if world()[1] == 1:
        return value
    if isinstance(value, Tensor):
        buf = value.detach().to(_COMM["device"], copy=True)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        return buf.to(value.device)
    buf = torch.tensor(float(value), dtype=torch.float64, device=_COMM["device"])
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return float(buf.item())


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one (so all ranks take one branch)."""
    return bool(flag) if world()[1] == 1 else all_reduce_sum(float(bool(flag))) > 0


def gather_floats(values: Sequence[float]) -> list[list[float]]:
    """Every rank's `values` (same length on every rank), indexed by rank, on every rank."""
    _, world_size = world()
    if world_size == 1:
        return [list(map(float, values))]
    local = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_COMM["device"])
    out = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(out, local)
    return [t.tolist() for t in out]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable `obj`, indexed by rank, on every rank (metrics dicts, RNG states)."""
    _, world_size = world()
    if world_size == 1:
        return [obj]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def all_gather_rows(rows: Tensor) -> list[Tensor]:
    """Every rank's 1-D tensor (lengths may differ), indexed by rank, on `rows`'s device."""
    _, world_size = world()
    if world_size == 1:
        return [rows]
    lengths = [int(n[0]) for n in gather_floats([rows.shape[0]])]
    longest = max(lengths)
    padded = torch.zeros(longest, dtype=rows.dtype, device=_COMM["device"])
    padded[: rows.shape[0]] = rows.detach().to(_COMM["device"])
    out = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(out, padded)
    return [t[:n].to(rows.device) for t, n in zip(out, lengths, strict=True)]


def all_reduce_gradients(params: Iterable[torch.nn.Parameter], bucket_numel: int = 1 << 24) -> None:
    """Replace each parameter's .grad by its SUM over ranks (in place; no-op with one process).

    Every rank divided its loss by the global normaliser (`global_step_normaliser`), so the sum
    is exactly the full-batch gradient (see the module docstring for why a sum and not DDP's
    mean). A parameter with a gradient on some ranks only (e.g. a rank with no rows) gets zeros
    on the others; one with no gradient on any rank keeps .grad = None, so AdamW skips it as in a
    single-process run. Gradients travel in flat buckets of at most `bucket_numel` elements of
    one dtype. `params`: the same list, in the same order, on every rank.
    """
    _, world_size = world()
    if world_size == 1:
        return
    # FSDP-sharded parameters (DTensors, train/fsdp.py) had their gradients reduce-scattered
    # (summed) in backward already.
    params = [p for p in params if not _is_dtensor(p)]
    has_grad = torch.tensor([float(p.grad is not None) for p in params], device=_COMM["device"])
    dist.all_reduce(has_grad, op=dist.ReduceOp.SUM)
    live = []
    for p, flag in zip(params, has_grad.tolist(), strict=True):
        if flag == 0:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        live.append(p)
    bucket: list[torch.nn.Parameter] = []
    size = 0
    for p in live:
        if bucket and (p.grad.dtype != bucket[0].grad.dtype or size + p.numel() > bucket_numel):
            _reduce_bucket(bucket)
            bucket, size = [], 0
        bucket.append(p)
        size += p.numel()
    if bucket:
        _reduce_bucket(bucket)


def _is_dtensor(tensor: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _reduce_bucket(bucket: list[torch.nn.Parameter]) -> None:
    flat = torch.cat([p.grad.reshape(-1) for p in bucket]).to(_COMM["device"])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p in bucket:
        n = p.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


@torch.no_grad()
def broadcast_parameters(modules: Iterable[torch.nn.Module]) -> None:
    """Copy rank 0's parameters and buffers into every rank's modules (no-op with one process).

    Called once after the modules are built, so randomly initialised parts (a value head, LoRA
    adapters) start identical even if a rank's initialisation differed.
    """
    if world()[1] == 1:
        return
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            if _is_dtensor(tensor):  # an FSDP shard: broadcast before sharding (train/fsdp.py)
                continue
            buf = tensor.data.to(_COMM["device"])
            dist.broadcast(buf, src=0)
            if buf is not tensor.data:
                tensor.data.copy_(buf)


# --------------------------------------------------------------------------- sharding


def shard_indices(n: int, rank: int, world_size: int) -> range:
    """This rank's contiguous slice of range(n): [floor(r n / W), floor((r + 1) n / W)).

    The slices of ranks 0..W-1 partition range(n) in order, with sizes differing by at most one
    (a rank gets an empty slice when n < W). Sharding the step's PROMPTS keeps each prompt's
    group of G samples on one rank.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    return range(rank * n // world_size, (rank + 1) * n // world_size)


# --------------------------------------------------------------------------- global statistics


def row_offset(n: int) -> tuple[int, int]:
    """(rows on the lower ranks, rows on all ranks) for this rank's ``n`` rows: where this rank's
    rows sit in the global batch (ranks in order, as ``shard_indices`` deals them)."""
    if world()[1] == 1:
        return 0, n
    counts = [int(c) for c in gather_objects(int(n))]
    rank = world()[0]
    return sum(counts[:rank]), sum(counts)


def global_step_normaliser(mask: Tensor | Sequence[Tensor], mode: str,
                           constant: float | None = None) -> float:
    """The step normaliser of the GLOBAL step from this rank's masks.

    N = normaliser_from_count( sum_r normaliser_count(mask_r, mode), mode, constant )

    i.e. all ranks' token counts (token_mean) or non-empty sequence counts (the seq-mean modes;
    constant: N_seq * C) added up, then clamped to >= 1. Equal to core's
    ``step_normaliser(mask, mode, constant)`` with one process. mask: [B, T] 0/1 (or a list of
    micro-batch masks), this rank's rows of the optimiser step. Returns a float, the same on
    every rank.
    """
    count = all_reduce_sum(normaliser_count(mask, mode))
    return normaliser_from_count(count, mode, constant)


def global_advantages(estimator: str, token_rewards: Tensor, mask: Tensor, group_ids: Tensor,
                      values: Tensor | None = None, *, gamma: float = 1.0,
                      lam: float = 1.0, eps: float = 1e-6, **extra) -> tuple[Tensor, Tensor]:
    """``ADVANTAGE_ESTIMATORS[estimator]`` on this rank's rows, with batch statistics taken over
    the global batch. Shapes as core/advantages.py: [B_r, T] in, ([B_r, T], [B_r, T]) out.

    Group estimators, GAE and "none" read only a sequence's own group, which lives on one rank:
    they run on the local rows unchanged. batch_mean / batch_whiten subtract mean_j G_{j,0} (and
    divide by std_j G_{j,0}) over ALL sequences j of the step: every rank's total returns G_{j,0}
    are gathered, the other ranks' sequences enter the core estimator as one-token rows carrying
    their total return (placed before and after the local rows in rank order, so the batch is the
    single-process concatenation), and the local rows of the result are returned. The advantages
    therefore equal those of the single-process batch, by the same core code.
    """
    fn = ADVANTAGE_ESTIMATORS[estimator]
    rank, world_size = world()
    if world_size == 1 or estimator not in BATCH_ESTIMATORS:
        if ESTIMATORS[estimator].batch_statistic:  # e.g. GPG's alpha: counted over every rank
            extra = {**extra, "reduce": all_reduce_sum}
        return fn(token_rewards, mask, group_ids, values, gamma=gamma, lam=lam, eps=eps, **extra)
    m = mask.to(token_rewards.dtype)
    totals = all_gather_rows(sequence_returns(reward_to_go(token_rewards, m, gamma), m))

    def one_token_rows(parts: list[Tensor]) -> tuple[Tensor, Tensor]:
        returns = torch.cat(parts) if parts else token_rewards.new_zeros(0)
        rows = token_rewards.new_zeros(returns.shape[0], token_rewards.shape[1])
        rows[:, 0] = returns
        row_mask = torch.zeros_like(rows, dtype=mask.dtype)
        row_mask[:, 0] = 1
        return rows, row_mask

    before, before_mask = one_token_rows(totals[:rank])
    after, after_mask = one_token_rows(totals[rank + 1:])
    rewards_all = torch.cat([before, token_rewards, after])
    mask_all = torch.cat([before_mask, mask, after_mask])
    ids_all = torch.zeros(rewards_all.shape[0], dtype=group_ids.dtype, device=group_ids.device)
    adv, ret = fn(rewards_all, mask_all, ids_all, None, gamma=gamma, lam=lam, eps=eps)
    lo, hi = before.shape[0], before.shape[0] + token_rewards.shape[0]
    return adv[lo:hi], ret[lo:hi]


def reduce_metrics(metrics: Mapping[str, float], weight: float, *, token_weight: float = 0.0,
                   token_means: Collection[str] = ()) -> dict[str, float]:
    """Every rank's step metrics combined into global values, returned on every rank.

    weight: this rank's number of sequences in the step (its share of per-sequence means).
    token_weight / token_means: this rank's number of completion tokens, and the metrics that are
    masked means over this rank's tokens: those are weighted by tokens, which makes them the
    exact global token means (the value one process holding every row would log).
    Rules, by metric name, applied to the ranks that report the metric:
      equal on every rank (grad_norm, lr/..., kl/coef): that value
      sum:  "loss/..." (each rank's loss is already divided by the global normaliser, so the
            step's loss is the sum), "perf/..." (throughput of all ranks), counts ending in
            "failures", "timeouts", "kept_groups", and "sampling/samples"
      max:  names containing "max", "time/..." (the slowest rank sets the pace),
            "sampling/resample_rounds", "sampling/skipped_step"
      min:  names containing "min"
      "X/std" next to "X/mean": the pooled sample std of the union,
            sqrt( (sum_r (n_r - 1) s_r^2 + n_r (m_r - m)^2) / (N - 1) )
      else: mean weighted by `token_weight` for the `token_means` keys (clip fractions,
            entropy, ratio mean, token-mean KL), reward/mean and reward/std by the samples
            drawn ("sampling/samples"), else by `weight` (per-sequence means such as
            response/length_mean, task/accuracy, kl/mean); exact in each case. A value equal
            on every rank (grad_norm, lr, kl/coef) is kept as is.
    One process: `metrics` unchanged (as a dict).
    """
    if world()[1] == 1:
        return dict(metrics)
    per_rank = gather_objects((dict(metrics), float(weight), float(token_weight)))
    out: dict[str, float] = {}
    for key in metrics:
        ranks = [(m, _weight_of(key, m, w, tw, token_means)) for m, w, tw in per_rank if key in m]
        out[key] = _combine(key, ranks)
    return out


_SUM_SUFFIXES = ("failures", "timeouts", "kept_groups", "sampling/samples")
_MAX_KEYS = ("sampling/resample_rounds", "sampling/skipped_step")
# Per-sample means over every completion drawn (dynamic sampling's rejected rounds included):
# weighted by the rank's number of samples drawn, not of sequences kept.
_PER_SAMPLE_DRAWN = ("reward/mean", "reward/std")


def _weight_of(key: str, m: Mapping[str, float], weight: float, token_weight: float,
               token_means: Collection[str]) -> float:
    if key in token_means:
        return token_weight
    if key in _PER_SAMPLE_DRAWN and "sampling/samples" in m:
        return float(m["sampling/samples"])
    return weight


def _combine(key: str, ranks: list[tuple[Mapping[str, float], float]]) -> float:
    """One global value from the ranks' (metrics, weight) pairs that report ``key``."""
    values = [float(m[key]) for m, _ in ranks]
    weights = [w for _, w in ranks]
    # Sums first: two ranks' equal counts or losses still add up.
    if key.startswith(("loss/", "perf/")) or key.endswith(_SUM_SUFFIXES):
        return sum(values)
    if "max" in key or key.startswith("time/") or key in _MAX_KEYS:
        return max(values)
    if "min" in key:
        return min(values)
    total = sum(weights)
    mean_key = key[: -len("/std")] + "/mean" if key.endswith("/std") else None
    if mean_key is not None and all(mean_key in m for m, _ in ranks) and total > 1:
        # Before the equality rule: equal per-rank stds do not make the union's std.
        means = [float(m[mean_key]) for m, _ in ranks]
        mean = sum(n * mu for n, mu in zip(weights, means, strict=True)) / total
        ss = sum((n - 1) * s * s + n * (mu - mean) ** 2
                 for n, mu, s in zip(weights, means, values, strict=True))
        return math.sqrt(max(ss, 0.0) / (total - 1))
    if all(v == values[0] for v in values):
        return values[0]  # equal on every rank (grad_norm, lr, kl/coef): no rounding
    if total <= 0:
        return sum(values) / len(values)
    return sum(v * w for v, w in zip(values, weights, strict=True)) / total
