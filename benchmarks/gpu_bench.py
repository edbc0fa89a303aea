"""The GPU benchmark section: psirl vs TRL GRPO on one CUDA GPU, float32 and bfloat16.

    python benchmarks/gpu_bench.py --out-dir OUT            # the real run (needs CUDA)
    python benchmarks/gpu_bench.py --out-dir OUT --dry-run  # the same code on the CPU, tiny shape

Shape (the issue's): Qwen2-0.5B (hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864,
vocabulary 151,936, tied embeddings), random weights, 8 prompts x 8 completions, 128 new tokens
(a random model rarely emits EOS, so completions run the full 128 tokens in both libraries).
Each (library, dtype) runs in its own interpreter through the ordinary benchmark workers
(benchmarks/psirl_grpo.py, benchmarks/trl_grpo.py) with the dtype switched here:
psirl `dtype: bfloat16` (bf16 weights; train/precision.py), TRL `bf16=True` (autocast over
float32 weights, TRL's mixed precision). Per run: median s/step over the measured steps (warm-up
steps, which include torch.compile of psirl's decode step, left out), generation tokens/s (psirl:
the loop's own generation phase, i.e. completion tokens / median time/generate_s; TRL: its
worker's `generate` timing, best of 3), peak GPU memory (torch.cuda.max_memory_allocated), and
the step's model FLOPs (benchmarks/common.py model_flops_per_sequence, the same count for both)
as a fraction of the bf16 matmul peak measured at the start of the same run.

Writes OUT/gpu_bench.json and OUT/gpu_bench.md. Every worker has a timeout; the whole section
stops starting runs once --budget-s is spent (a run that did not fit is recorded as skipped).

Worker mode (used by the above): python benchmarks/gpu_bench.py worker --lib psirl --dtype
bfloat16 --shape qwen0.5b-gpu --ckpt DIR --steps 6 --warmup 2 --out FILE.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402

GPU_SHAPE = "qwen0.5b-gpu"
DRY_SHAPE = "gpu-dry"
# The dry run: the same code paths on the CPU with a model small enough for seconds per step.
C.SHAPES.setdefault(DRY_SHAPE, C.Shape(
    name=DRY_SHAPE, hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, vocab_size=512,
    tie_embeddings=True, n_prompts=2, group=2, max_new_tokens=8, sft_steps=0, steps=2, warmup=1,
    device="cpu"))
LIBS = ("psirl", "trl")
DTYPES = ("float32", "bfloat16")


def log(msg: str) -> None:
    print(f"[gpu_bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- measurements


def matmul_peak_tflops(dtype: str = "bfloat16", n: int = 8192, reps: int = 20) -> dict:
    """Measured dense matmul throughput: best of `reps` [n, n] x [n, n] products (CUDA events);
    on the CPU (dry run) a small float32 product on the benchmark's thread count."""
    import torch

    if not torch.cuda.is_available():
        return {"device": "cpu", "dtype": "float32", "tflops": C.matmul_gflops(256, 5) / 1e3}
    dt = getattr(torch, dtype)
    a = torch.randn(n, n, device="cuda", dtype=dt)
    b = torch.randn(n, n, device="cuda", dtype=dt)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return {"device": torch.cuda.get_device_name(0), "dtype": dtype, "n": n,
            "tflops": 2 * n**3 / best / 1e12}


def summarise(raw: dict, model_cfg, peak_tflops: float | None) -> dict:
    """The row of one (library, dtype) run."""
    if "error" in raw:
        return {"error": raw["error"], "log_tail": raw.get("log_tail", "")[-4000:]}
    w = raw["warmup"]
    times = raw["step_times"][w:]
    lens = [x for x in raw["completion_len_per_step"][w:] if x is not None]
    median = statistics.median(times)
    comp_len = statistics.mean(lens) if lens else float("nan")
    batch = raw["batch"]
    flops = batch * C.model_flops_per_sequence(model_cfg, raw["prompt_len"], comp_len)
    row = {
        "median_step_s": median,
        "min_step_s": min(times),
        "measured_steps": len(times),
        "step_times": raw["step_times"],
        "completion_len": comp_len,
        "model_tflop_per_step": flops / 1e12,
        "model_tflops_per_s": flops / median / 1e12,
        "peak_gpu_mem_gb": raw.get("peak_gpu_mem_gb"),
        "peak_gpu_reserved_gb": raw.get("peak_gpu_reserved_gb"),
        "generation_tokens_per_s": raw.get("generation_tokens_per_s"),
        "generation_source": raw.get("generation_source"),
        "decode_path": raw.get("decode_path"),
        "train_wall_s": raw.get("train_wall_s"),
    }
    if peak_tflops:
        row["fraction_of_bf16_matmul_peak"] = flops / median / 1e12 / peak_tflops
    if "phase_times" in raw:
        row["phase_median_s"] = {k.split("/")[-1]: statistics.median(v[w:])
                                 for k, v in raw["phase_times"].items() if v and None not in v[w:]}
    return row


# --------------------------------------------------------------------------- worker


def worker(argv: list[str]) -> None:
    """One library in one dtype: the ordinary worker's main() with the dtype switched, then the
    peak GPU memory and the generation rate added to its JSON."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", choices=LIBS, required=True)
    ap.add_argument("--dtype", choices=DTYPES, required=True)
    args, rest = ap.parse_known_args(argv)
    out = Path(rest[rest.index("--out") + 1])
    import torch

    decode_used: list[str] = []
    if args.lib == "psirl":
        import psirl_grpo as W

        from psirl.rollout import hf_engine

        base_config, base_decode = W.psirl_config, hf_engine.HFEngine._decode

        def psirl_config(*a, **k):
            return base_config(*a, **k).model_copy(update={"dtype": args.dtype})

        def decode(self, *a, **k):  # record which decode loop the engine took
            out_ = base_decode(self, *a, **k)
            decode_used.append(self.decode_used)
            return out_

        W.psirl_config = psirl_config
        hf_engine.HFEngine._decode = decode
        W.main(rest)
    else:
        import trl
        import trl_grpo as W

        base_cls = trl.GRPOConfig

        def grpo_config(**kwargs):
            # TRL's mixed precision: autocast to bf16 over float32 weights (its documented way).
            return base_cls(**{**kwargs, "bf16": args.dtype == "bfloat16"})

        trl.GRPOConfig = grpo_config  # trl_grpo.build_config imports it at call time
        W.main([*rest, "--gen-bench"])
    result = json.loads(out.read_text())
    if torch.cuda.is_available():
        result["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        result["peak_gpu_reserved_gb"] = torch.cuda.max_memory_reserved() / 2**30
    if args.lib == "psirl":
        # The loop's own generation phase: completion tokens of the step / its generate time.
        w = result["warmup"]
        gen = [t for t in result["phase_times"]["time/generate_s"][w:] if t]
        lens = [x for x in result["completion_len_per_step"][w:] if x is not None]
        if gen and lens:
            result["generation_tokens_per_s"] = (result["batch"] * statistics.mean(lens)
                                                 / statistics.median(gen))
            result["generation_source"] = "psirl online loop, time/generate_s (median)"
        result["decode_path"] = ",".join(sorted(set(decode_used))) or None
    else:
        gen = result.get("generation") or {}
        if gen:
            result["generation_tokens_per_s"] = gen["tokens_per_s"]
            result["generation_source"] = "transformers generate (TRL's), best of 3"
    result["dtype"] = args.dtype
    out.write_text(json.dumps(result, indent=2))


def run_worker(lib: str, dtype: str, shape: str, ckpt: Path, steps: int, warmup: int,
               timeout: float) -> dict:
    out = C.CACHE / f"gpu-{lib}-{dtype}-{os.getpid()}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "worker", "--lib", lib, "--dtype", dtype,
           "--shape", shape, "--ckpt", str(ckpt), "--steps", str(steps), "--warmup", str(warmup),
           "--out", str(out)]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(C.ROOT), os.environ.get("PYTHONPATH", "")]))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, timeout=timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired as exc:
        tail = ((exc.stdout or b"")[-2000:].decode(errors="replace") if isinstance(exc.stdout, bytes)
                else str(exc.stdout or "")[-2000:])
        return {"error": f"timed out after {timeout:.0f} s", "log_tail": tail}
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stdout[-3000:] + "\n" + proc.stderr[-6000:]).strip()
        return {"error": f"worker exited with {proc.returncode}", "log_tail": tail}
    result = json.loads(out.read_text())
    out.unlink()
    result["wall_s"] = time.perf_counter() - t0
    return result


# --------------------------------------------------------------------------- report


def _f(x, fmt: str) -> str:
    return "-" if x is None or x != x else format(x, fmt)


def render(res: dict) -> str:
    peak = res.get("matmul_peak", {})
    lines = [f"### GPU benchmark: {res.get('device', '?')}, {res.get('date', '')}", "",
             f"Shape `{res['shape']}`: {res.get('shape_text', '')}. Measured "
             f"{peak.get('dtype', '?')} matmul peak: **{_f(peak.get('tflops'), '.0f')} TFLOP/s** "
             f"({peak.get('n', '-')}^3, best of 20). Command: `{res.get('command', '')}`.", "",
             "| library | dtype | median s/step | min s/step | generation tokens/s | "
             "peak GPU mem GB | model TFLOP/step | model TFLOP/s | % of bf16 matmul peak | "
             "decode |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key, row in res["runs"].items():
        lib, dtype = key.split(":")
        if "median_step_s" not in row:
            lines.append(f"| {lib} | {dtype} | {row.get('error') or row.get('skipped')} |"
                         + " |" * 7)
            continue
        frac = row.get("fraction_of_bf16_matmul_peak")
        lines.append(
            f"| {lib} | {dtype} | {row['median_step_s']:.3f} | {row['min_step_s']:.3f} | "
            f"{_f(row.get('generation_tokens_per_s'), '.0f')} | "
            f"{_f(row.get('peak_gpu_mem_gb'), '.1f')} | {row['model_tflop_per_step']:.1f} | "
            f"{row['model_tflops_per_s']:.1f} | {_f(None if frac is None else 100 * frac, '.2f')} | "
            f"{row.get('decode_path') or '-'} |")
    for dtype in DTYPES:
        p, t = res["runs"].get(f"psirl:{dtype}", {}), res["runs"].get(f"trl:{dtype}", {})
        if "median_step_s" in p and "median_step_s" in t:
            gen = ("-" if not (p.get("generation_tokens_per_s") and t.get("generation_tokens_per_s"))
                   else f"{p['generation_tokens_per_s'] / t['generation_tokens_per_s']:.1f}x")
            mem = ("-" if not (p.get("peak_gpu_mem_gb") and t.get("peak_gpu_mem_gb"))
                   else f"{p['peak_gpu_mem_gb'] / t['peak_gpu_mem_gb']:.2f}")
            lines += ["", f"{dtype}: psirl step speed-up over TRL "
                      f"**{t['median_step_s'] / p['median_step_s']:.2f}x**, generation "
                      f"**{gen}**, peak GPU memory psirl / TRL **{mem}**."]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "worker":
        worker(argv[1:])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shape: check the plumbing")
    ap.add_argument("--libs", default=",".join(LIBS))
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--steps", type=int, default=None, help="measured steps (default 6; dry 2)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="warm-up steps, which hold psirl's torch.compile (default 1)")
    ap.add_argument("--budget-s", type=float, default=330.0,
                    help="start no run after this many seconds; each run's timeout fits in it")
    ap.add_argument("--run-timeout-s", type=float, default=150.0)
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_bench: CUDA is not available (use --dry-run to check the plumbing "
                         "on the CPU)")
    shape_name = DRY_SHAPE if args.dry_run else GPU_SHAPE
    shape = C.SHAPES[shape_name]
    steps = args.steps or (shape.steps if args.dry_run else 6)
    warmup = args.warmup if args.warmup is not None else 1
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    C.CACHE.mkdir(parents=True, exist_ok=True)

    res = {"command": " ".join(["python", "benchmarks/gpu_bench.py", *argv]),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (dry run)",
           "machine": C.machine_info(), "shape": shape_name,
           "shape_text": (f"hidden {shape.hidden}, {shape.layers} layers, vocabulary "
                          f"{shape.vocab_size}, {shape.n_prompts} prompts x {shape.group} "
                          f"completions, {shape.max_new_tokens} new tokens, random weights; "
                          f"{warmup} warm-up + {steps} measured steps"),
           "runs": {}}
    res["matmul_peak"] = matmul_peak_tflops("bfloat16")
    log(f"matmul peak: {res['matmul_peak']['tflops']:.1f} TFLOP/s ({res['matmul_peak']['dtype']})")
    ckpt = C.prepare_checkpoint(shape)
    from transformers import AutoConfig

    model_cfg = AutoConfig.from_pretrained(ckpt)
    libs = [x for x in args.libs.split(",") if x]
    dtypes = [x for x in args.dtypes.split(",") if x]
    for dtype in dtypes:
        for lib in libs:
            key = f"{lib}:{dtype}"
            left = args.budget_s - (time.perf_counter() - t_start)
            if left < 30:
                res["runs"][key] = {"skipped": f"time budget of {args.budget_s:.0f} s spent"}
                continue
            log(f"{key} ...")
            raw = run_worker(lib, dtype, shape_name, ckpt, steps, warmup,
                             min(args.run_timeout_s, left))
            res["runs"][key] = summarise(raw, model_cfg, res["matmul_peak"]["tflops"])
            row = res["runs"][key]
            log(f"{key}: " + (row.get("error") or f"{row['median_step_s']:.3f} s/step, "
                f"generation {_f(row.get('generation_tokens_per_s'), '.0f')} tokens/s"))
            (out_dir / "gpu_bench.json").write_text(json.dumps(res, indent=2))
    res["total_s"] = time.perf_counter() - t_start
    (out_dir / "gpu_bench.json").write_text(json.dumps(res, indent=2))
    text = render(res)
    (out_dir / "gpu_bench.md").write_text(text + "\n")
    print(text)
    failed = [k for k, r in res["runs"].items() if "error" in r]
    if failed:
        log(f"runs with errors: {failed} (log tails in gpu_bench.json)")


if __name__ == "__main__":
    main()
