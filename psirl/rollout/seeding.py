"""Per-row random streams: a row's samples depend on its own seed only.

Why: with one generator for a whole ``generate`` call, the uniform a row draws at step t depends on
how many rows came before it, so the same prompt gets different samples when the batch is split
differently -- across data-parallel ranks, after resuming at another world size, or when dynamic
sampling refills a batch. Here every row has a seed derived from (its prompt's seed, its sample
index j) and draw t of row r is a hash of (key_r, t): a counter-based generator (the idea of
Philox / Random123, with a smaller mixer), so no state is carried and any subset of rows, in any
order, on any device, draws exactly the same numbers.

    prompt seed s_i --mix_seed(s_i, j)--> row seed --splitmix64--> key (64 bits: k_lo, k_hi)
    u(r, t) = hash32(hash32(k_lo xor hash32(t)) xor k_hi) / 2**32, truncated to 24 bits

Draw t is the uniform of completion token t. A multi-turn episode keeps one stream for all its
turns and a turn starting at completion column c uses draws c, c + 1, ... (columns only grow, so no
draw is used twice), which makes its first turn exactly plain generation.

hash32 is Wellons' "lowbias32" integer finaliser. The tensor version works on int64 tensors with
values below 2**32 and never overflows (multiplications are split into 16-bit halves), so CPU and
CUDA give identical bits. Tests: tests/rollout/test_seeding.py (uniformity, independence across
steps and rows, subset invariance, the Python and tensor versions agree).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["RowStreams", "call_seeds", "mix_seed", "prompt_seeds", "row_seeds", "stream_keys",
           "stream_uniforms", "hash32"]

_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF


def splitmix64(x: int) -> int:
    """Steele et al.'s SplitMix64 finaliser of a 64-bit integer (Python ints, exact)."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def mix_seed(*parts: int) -> int:
    """A 62-bit seed from integers (e.g. a step's seed and a prompt's position): one splitmix64
    round per part, so (a, b) and (b, a) differ. Non-negative; fits every engine's seed type."""
    x = 0
    for part in parts:
        x = splitmix64(x ^ (int(part) & _M64))
    return x >> 2


def prompt_seeds(seed: int, count: int, start: int = 0) -> tuple[int, ...]:
    """Seeds of prompts ``start .. start + count - 1`` of a call seeded by ``seed``."""
    return tuple(mix_seed(seed, start + i) for i in range(count))


def call_seeds(params, count: int) -> tuple[int, ...]:
    """The per-prompt seeds of an engine call with ``count`` prompts: ``params.seeds`` (checked
    against the count), else ``prompt_seeds(params.seed, count)``, with a seed drawn from torch's
    global RNG when ``params.seed`` is None."""
    if params.seeds is not None:
        if len(params.seeds) != count:
            raise ValueError(f"SamplingParams.seeds: {len(params.seeds)} seeds for {count} prompts")
        return params.seeds
    seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
    return prompt_seeds(seed, count)


def row_seeds(seeds: Sequence[int], n: int) -> tuple[int, ...]:
    """The seed of every row of a call with per-prompt ``seeds`` and ``n`` samples per prompt:
    row i * n + j (sample j of prompt i) gets ``mix_seed(seeds[i], j)``."""
    return tuple(mix_seed(s, j) for s in seeds for j in range(n))


def stream_keys(seeds: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """[rows, 2] int64 keys (low, high 32 bits of splitmix64(row seed)) of the rows' streams."""
    keys = [splitmix64(int(s) & _M64) for s in seeds]
    return torch.tensor([[k & _M32, k >> 32] for k in keys], dtype=torch.int64, device=device)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32) without overflowing int64."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 of int64 values in [0, 2**32) (elementwise; same bits on every device)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def hash32_int(x: int) -> int:
    """hash32 of one Python int in [0, 2**32) (the reference the tests compare against)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def stream_uniforms(keys: torch.Tensor, steps: torch.Tensor | int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[rows] uniforms in [0, 1): draw number ``steps`` (an int, or [rows] int64) of each row's
    stream, keys [rows, 2] (``stream_keys``); 24 random bits each, exact in float32."""
    if isinstance(steps, int):
        steps = torch.full_like(keys[:, 0], steps)
    t = hash32(steps.to(keys.device) & _M32)
    h = hash32(hash32(keys[:, 0] ^ t) ^ keys[:, 1])
    return (h >> 8).to(dtype) * (1.0 / (1 << 24))


class RowStreams:
    """The uniforms of a decoding loop: ``self(t)`` is [rows] draw ``offsets + t`` of each row's
    stream (``stream_uniforms``), computed ``block`` steps at a time. Why blocks: the hash is
    ~50 small integer ops, whose per-op overhead dominates at decoding batch sizes (85 us per
    step on the CPU for 64 rows, one step at a time; ~2 us per step in blocks of 64).

    seeds: one row seed per row (``row_seeds``); offsets: [rows] first draw of each row (None: 0).
    """

    def __init__(self, seeds: Sequence[int], offsets: Sequence[int] | None = None, *,
                 device: torch.device | str = "cpu", block: int = 64):
        self.keys = stream_keys(seeds, device)
        rows = self.keys.shape[0]
        offsets = [0] * rows if offsets is None else list(offsets)
        self.offsets = torch.tensor(offsets, dtype=torch.int64, device=self.keys.device)
        self.block = block
        self._start, self._values = -1, None

    def __call__(self, t: int) -> torch.Tensor:
        start = t - t % self.block
        if start != self._start:
            steps = self.offsets[:, None] + torch.arange(start, start + self.block,
                                                         device=self.keys.device)
            keys = self.keys[:, None, :].expand(-1, self.block, -1).reshape(-1, 2)
            self._values = stream_uniforms(keys, steps.reshape(-1)).view(-1, self.block)
            self._start = start
        return self._values[:, t - start]
