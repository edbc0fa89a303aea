"""psirl vs TRL benchmarks (`make bench`). Each library runs in its own subprocess.

Sections (pick with --sections, comma-separated; default: all):

  grpo     GRPO step on the tiny Qwen2 (4 layers, hidden 256, char vocabulary), 8 prompts x 8
           completions, 16 new tokens: median s/step, steps/s, tokens/s, peak RSS, and the step's
           model FLOPs as a percentage of this machine's fp32 matmul throughput (measured here).
  learn    From the same SFT checkpoint: training seconds until held-out greedy accuracy >= target.
  logprob  Peak memory of psirl token_logprobs vs a naive log_softmax, vocab 32k..152k, 1k tokens.
  vocab    The GRPO step again with a 32k vocabulary and 128-token completions.
  gpu      Qwen2-0.5B shape (random weights) on CUDA, both libraries, float32 and bfloat16,
           + generation tokens/s, peak GPU memory and % of the measured bf16 matmul peak
           (benchmarks/gpu_bench.py; `bash benchmarks/gpu_check.sh OUT` also runs tests/gpu).
           Skipped (and recorded as skipped) when CUDA is absent.
  vllm     psirl's GRPO step with rollout.engine vllm vs hf (tiny and 32k shapes), both in
           .venv-vllm (`make .venv-vllm/.installed`), plus engine start, sync and generation
           alone. Skipped (and recorded as skipped) when .venv-vllm is absent.
  dpo      DPO step (psirl loop: preference vs trl.DPOTrainer): tiny Qwen2, the same pairs,
           batch 32 pairs, length <= 24; the char vocabulary and a 32k vocabulary; rounds
           alternate the libraries (--dpo-repeats), median s/step and peak RSS.

    .venv/bin/python benchmarks/run.py                       # everything, ~15-20 min on 2 cores
    .venv/bin/python benchmarks/run.py --sections grpo --steps 15
    .venv/bin/python benchmarks/run.py --update-results      # also rewrite benchmarks/RESULTS.md

Results: runs/bench/results.json and runs/bench/results.md (tables); --update-results replaces
the generated block of benchmarks/RESULTS.md (between the bench:begin / bench:end markers).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402

SECTIONS = ("grpo", "learn", "logprob", "vocab", "gpu", "vllm", "dpo")
DPO_LIBS = {"trl": "trl_dpo.py", "psirl": "psirl_dpo.py"}
DPO_SHAPES = ("dpo-tiny", "dpo-vocab32k")
LIBS = {"trl": "trl_grpo.py", "psirl": "psirl_grpo.py"}
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- sections


def _step_worker_args(shape: C.Shape, ckpt, steps: int | None) -> list[str]:
    """Command-line arguments of a step-timing worker run (either library)."""
    args = ["--shape", shape.name, "--ckpt", str(ckpt), "--gen-bench"]
    return args + ["--steps", str(steps)] if steps is not None else args


def grpo_section(shape: C.Shape, libs: list[str], steps: int | None, repeats: int = 1) -> dict:
    """Both libraries on one shape, `repeats` rounds alternating the libraries; per library the
    round with the median of the round medians is kept (all rounds' medians are listed), so
    neither a round slowed by other processes nor one lucky round decides. Returns {lib: summary}."""
    ckpt = C.prepare_checkpoint(shape)
    from transformers import AutoConfig

    model_cfg = AutoConfig.from_pretrained(ckpt)
    runs: dict[str, list[dict]] = {lib: [] for lib in libs}
    for round_ in range(repeats):
        for lib in libs:
            log(f"grpo[{shape.name}] {lib} (round {round_ + 1}/{repeats}) ...")
            raw = C.run_worker(LIBS[lib], _step_worker_args(shape, ckpt, steps))
            summary = summarise_grpo(raw, model_cfg)
            runs[lib].append(summary)
            log(f"grpo[{shape.name}] {lib}: " + (raw.get("error") or
                f"{summary['median_step_s']:.3f} s/step, peak RSS {summary['peak_rss_mb']:.0f} MB, "
                f"load {raw['loadavg_1min'][0]:.2f}->{raw['loadavg_1min'][1]:.2f}, "
                f"waited {raw['idle_wait']['waited_s']} s for idle CPUs"))
    out = {}
    for lib, rs in runs.items():
        ok = [r for r in rs if "median_step_s" in r]
        if not ok:
            out[lib] = rs[-1]
            continue
        # The median round, not the fastest: the minimum favours whichever library had one lucky
        # round, the median is robust to both lucky and contended rounds.
        typical = sorted(ok, key=lambda r: r["median_step_s"])[(len(ok) - 1) // 2]
        typical["round_medians_s"] = [r["median_step_s"] for r in ok]
        out[lib] = typical
    return out


def dpo_section(shape_name: str, libs: list[str], steps: int | None, repeats: int) -> dict:
    """DPO on one shape: `repeats` rounds alternating the libraries; per library the round with
    the median of the round medians is kept, every round's median listed. Returns {lib: summary}."""
    runs: dict[str, list[dict]] = {lib: [] for lib in libs}
    args = ["--shape", shape_name] + (["--steps", str(steps)] if steps is not None else [])
    for round_ in range(repeats):
        for lib in libs:
            log(f"dpo[{shape_name}] {lib} (round {round_ + 1}/{repeats}) ...")
            raw = C.run_worker(DPO_LIBS[lib], args)
            runs[lib].append(raw)
            log(f"dpo[{shape_name}] {lib}: " + (raw.get("error") or
                f"{raw['median_step_s']:.3f} s/step, peak RSS {raw['peak_train_rss_mb']:.0f} MB, "
                f"load {raw['loadavg_1min'][0]:.2f}->{raw['loadavg_1min'][1]:.2f}"))
    out = {}
    for lib, rs in runs.items():
        ok = [r for r in rs if "median_step_s" in r]
        if not ok:
            out[lib] = rs[-1]
            continue
        typical = sorted(ok, key=lambda r: r["median_step_s"])[(len(ok) - 1) // 2]
        typical["round_medians_s"] = [r["median_step_s"] for r in ok]
        out[lib] = typical
    return out


def dpo_table(res: dict, title: str) -> list[str]:
    lines = [f"#### {title}", "",
             "| library | median s/step | steps/s | load avg (before->after) | RSS MB after imports | "
             "peak RSS MB (training) | every round's median s/step |",
             "|---|---|---|---|---|---|---|"]
    for lib, s in res.items():
        if "median_step_s" not in s:
            lines.append(f"| {lib} | error: {s.get('error')} |")
            continue
        lines.append(
            f"| {lib} | {s['median_step_s']:.3f} | {1 / s['median_step_s']:.2f} | "
            f"{s['loadavg_1min'][0]:.2f}->{s['loadavg_1min'][1]:.2f} | "
            f"{s['rss_after_imports_mb']:.0f} | {s['peak_train_rss_mb']:.0f} | "
            + ", ".join(f"{x:.3f}" for x in s.get("round_medians_s", [])) + " |")
    if all("median_step_s" in res.get(k, {}) for k in ("trl", "psirl")):
        t, p = res["trl"], res["psirl"]
        lines += ["", f"psirl steps/s / TRL steps/s: **{t['median_step_s'] / p['median_step_s']:.2f}x** "
                  f"(target 1.5x); peak training RSS psirl / TRL: "
                  f"**{p['peak_train_rss_mb'] / t['peak_train_rss_mb']:.2f}**."]
    return lines + [""]


def summarise_grpo(raw: dict, model_cfg) -> dict:
    if "error" in raw:
        return raw
    w = raw["warmup"]
    times = raw["step_times"][w:]
    lens = [x for x in raw["completion_len_per_step"][w:] if x is not None]
    median = statistics.median(times)
    comp_len = statistics.mean(lens)
    batch = raw["batch"]
    flops = batch * C.model_flops_per_sequence(model_cfg, raw["prompt_len"], comp_len)
    summary = {
        "measured_steps": len(times),
        "median_step_s": median,
        "steps_per_s": 1.0 / median,
        "step_s_p10_p90": [_quantile(times, 0.1), _quantile(times, 0.9)],
        "completion_len": comp_len,
        "completion_tokens_per_s": batch * comp_len / median,
        "tokens_per_s": batch * (raw["prompt_len"] + comp_len) / median,
        "model_gflop_per_step": flops / 1e9,
        # psirl runs each prompt once per group: what it executes is less than the plain count.
        "executed_gflop_per_step": (C.shared_prompt_flops_per_step(
            model_cfg, raw["prompt_len"], comp_len, batch, raw["group"]) / 1e9
            if raw.get("lib") == "psirl" and raw.get("group") else flops / 1e9),
        "peak_rss_mb": raw["peak_rss_mb"],
        "peak_train_rss_mb": raw["peak_train_rss_mb"],
        "rss_after_imports_mb": raw["rss_after_imports_mb"],
        "train_wall_s": raw["train_wall_s"],
        "mean_reward": statistics.mean(x for x in raw["reward_per_step"] if x is not None),
        "min_step_s": min(times),
        "loadavg_1min": raw.get("loadavg_1min"),
        "idle_wait": raw.get("idle_wait"),
        "raw": raw,
    }
    if "generation" in raw:
        summary["generation_tokens_per_s"] = raw["generation"]["tokens_per_s"]
    if "phase_times" in raw:
        summary["phase_median_s"] = {k.split("/")[-1]: statistics.median(v[w:])
                                     for k, v in raw["phase_times"].items() if v and None not in v}
    return summary


def learn_section(shape: C.Shape, libs: list[str], target_arg: str, gain: float, max_steps: int,
                  eval_every: int, eval_n: int, lr: float | None, seeds: list[int]) -> dict:
    """Training seconds (evaluation excluded) until held-out greedy accuracy >= target.

    target 'auto' = the SFT checkpoint's accuracy on the same `eval_n` held-out prompts + `gain`.
    Each library runs once per seed (prompt order and sampling noise); libraries alternate.
    """
    ckpt = C.prepare_checkpoint(shape)
    start = sft_accuracy(ckpt, shape, eval_n)
    target = round(start + gain, 3) if target_arg == "auto" else float(target_arg)
    out = {"sft_accuracy": start, "target": target, "eval_n": eval_n, "max_steps": max_steps,
           "eval_every": eval_every, "lr": lr if lr is not None else shape.lr, "seeds": seeds}
    runs: dict[str, list[dict]] = {lib: [] for lib in libs}
    for seed in seeds:
        for lib in libs:
            log(f"learn {lib} seed {seed}: target {target}, at most {max_steps} steps ...")
            args = ["--shape", shape.name, "--ckpt", str(ckpt), "--mode", "learn",
                    "--target", str(target), "--max-steps", str(max_steps),
                    "--eval-every", str(eval_every), "--eval-n", str(eval_n), "--seed", str(seed)]
            if lr is not None:
                args += ["--lr", str(lr)]
            raw = C.run_worker(LIBS[lib], args)
            if "error" in raw:
                runs[lib].append(raw)
                log(f"learn {lib}: {raw['error']}")
                continue
            curve = raw["curve"]
            hit = next((c for c in curve if c["accuracy"] >= target), None)
            times = raw["step_times"]
            run = {
                "seed": seed,
                "start_accuracy": curve[0]["accuracy"] if curve else None,
                "reached": hit is not None,
                "steps_to_target": hit["step"] if hit else None,
                "train_s_to_target": hit["train_s"] if hit else None,
                "best_accuracy": max((c["accuracy"] for c in curve), default=None),
                "steps_run": len(times),
                "median_step_s": statistics.median(times) if times else None,
                "loadavg_1min": raw.get("loadavg_1min"),
                "curve": curve,
            }
            runs[lib].append(run)
            log(f"learn {lib} seed {seed}: start {run['start_accuracy']:.3f}, reached={hit is not None} "
                f"at step {run['steps_to_target']} after {_fmt(run['train_s_to_target'], 1)} s")
    for lib, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        inf = float("inf")
        out[lib] = {
            "runs": rs,
            "reached": sum(r["reached"] for r in ok),
            "median_steps_to_target": _median_or_none([r["steps_to_target"] or inf for r in ok]),
            "median_train_s_to_target": _median_or_none([r["train_s_to_target"] or inf for r in ok]),
            "median_step_s": _median_or_none([r["median_step_s"] for r in ok]),
        }
    return out


def _median_or_none(xs: list[float]) -> float | None:
    if not xs:
        return None
    m = statistics.median(xs)
    return None if m == float("inf") else m


def sft_accuracy(ckpt: Path, shape: C.Shape, n: int) -> float:
    """Held-out greedy accuracy of the SFT checkpoint (the same yardstick the TRL side uses)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(ckpt)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    return C.greedy_accuracy(model, tokenizer, C.addition_task(shape.digits),
                             C.eval_records(shape, n), shape.max_new_tokens)


def logprob_section(vocabs: list[int], tokens: int) -> list[dict]:
    from logprob_memory import METHODS

    rows = []
    for vocab in vocabs:
        for method in METHODS:
            log(f"logprob V={vocab} {method} ...")
            # Every allocation >= 128 KiB gets its own mmap, returned to the OS when freed (no
            # dynamic threshold), so RSS follows the live tensors and the peak is theirs.
            raw = C.run_worker("logprob_memory.py", ["--vocab", str(vocab), "--method", method,
                                                      "--tokens", str(tokens)],
                               extra_env={"MALLOC_MMAP_THRESHOLD_": "131072"})
            rows.append(raw)
    return rows


def gpu_section(libs: list[str], steps: int | None) -> dict:
    """benchmarks/gpu_bench.py (psirl vs TRL, float32 and bfloat16, Qwen2-0.5B shape) in its own
    process; its JSON is this section's result (`bash benchmarks/gpu_check.sh` adds the tests)."""
    import subprocess

    import torch

    if not torch.cuda.is_available():
        return {"skipped": "CUDA is not available on this machine"}
    out_dir = C.CACHE / "gpu"
    cmd = [sys.executable, str(C.HERE / "gpu_bench.py"), "--out-dir", str(out_dir),
           "--libs", ",".join(libs)] + (["--steps", str(steps)] if steps else [])
    log("gpu: " + " ".join(cmd[1:]))
    proc = subprocess.run(cmd, timeout=900)
    path = out_dir / "gpu_bench.json"
    if proc.returncode != 0 or not path.exists():
        return {"skipped": f"gpu_bench.py exited with {proc.returncode}"}
    return json.loads(path.read_text())


VLLM_PYTHON = C.ROOT / ".venv-vllm" / "bin" / "python"
VLLM_SHAPES = ("tiny", "vocab32k")


def vllm_section(repeats: int = 1, steps: int | None = None, gen_only: tuple[str, ...] = ()) -> dict:
    """psirl + vLLM vs psirl + HF per shape, each engine in its own .venv-vllm interpreter,
    `repeats` alternating rounds, the median round kept (as grpo_section). Shapes named in
    `gen_only` measure the engines alone (start, generation, sync), without the GRPO run."""
    if not VLLM_PYTHON.exists():
        return {"skipped": f"{VLLM_PYTHON} is absent (build it: make .venv-vllm/.installed)"}
    from transformers import AutoConfig

    out: dict = {}
    for name in VLLM_SHAPES:
        shape = C.SHAPES[name]
        ckpt = C.prepare_checkpoint(shape)
        model_cfg = AutoConfig.from_pretrained(ckpt)
        runs: dict[str, list[dict]] = {"hf": [], "vllm": []}
        for round_ in range(repeats):
            for engine in runs:
                log(f"vllm[{name}] psirl+{engine} (round {round_ + 1}/{repeats}) ...")
                extra = ["--steps", str(steps)] if steps is not None else []
                extra += ["--gen-only"] if name in gen_only else []
                raw = C.run_worker("psirl_vllm.py", ["--engine", engine, "--shape", name,
                                                     "--ckpt", str(ckpt), *extra],
                                   python=str(VLLM_PYTHON))
                if name in gen_only and "error" not in raw:
                    runs[engine].append({"raw": raw, "gen_only": True})
                    log(f"vllm[{name}] psirl+{engine}: generation "
                        f"{raw['generation']['tokens_per_s']:.0f} tokens/s")
                    continue
                summary = summarise_grpo(raw, model_cfg)
                runs[engine].append(summary)
                log(f"vllm[{name}] psirl+{engine}: " + (raw.get("error") or
                    f"{summary['median_step_s']:.3f} s/step"))
        out[name] = {}
        for engine, rs in runs.items():
            if name in gen_only:
                gens = sorted((r for r in rs if r.get("gen_only")),
                              key=lambda r: r["raw"]["generation"]["tokens_per_s"])
                out[name][engine] = gens[len(gens) // 2] if gens else rs[-1]
                continue
            ok = sorted((r for r in rs if "median_step_s" in r), key=lambda r: r["median_step_s"])
            out[name][engine] = ok[len(ok) // 2] if ok else rs[-1]
            if ok:
                out[name][engine]["round_medians"] = [r["median_step_s"] for r in ok]
    return out


def vllm_table(section: dict) -> list[str]:
    lines = ["#### 7. psirl + vLLM vs psirl + HF (rollout.engine), both in .venv-vllm", ""]
    if "skipped" in section:
        return lines + [f"Skipped: {section['skipped']}", ""]
    lines += ["| shape | engine | median s/step | generate s | score s | learn s | "
              "generation alone tokens/s | engine start s | sync s | peak RSS MB | mean reward |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, by_engine in section.items():
        for engine, s in by_engine.items():
            if s.get("gen_only"):
                gen = s["raw"]["generation"]
                lines.append(
                    f"| {name} | psirl+{engine} | (not run) | | | | {gen['tokens_per_s']:.0f} | "
                    f"{gen['engine_start_s']:.1f} | {gen['sync_s']:.3f} | | |")
                continue
            if "median_step_s" not in s:
                lines.append(f"| {name} | psirl+{engine} | error: {s.get('error')} |"
                             " | | | | | | | |")
                continue
            ph, gen = s.get("phase_median_s", {}), s["raw"].get("generation", {})
            lines.append(
                f"| {name} | psirl+{engine} | {s['median_step_s']:.3f} | "
                f"{_fmt(ph.get('generate_s'))} | {_fmt(ph.get('score_s'))} | "
                f"{_fmt(ph.get('learn_s'))} | {_fmt(gen.get('tokens_per_s'), 0)} | "
                f"{_fmt(gen.get('engine_start_s'), 1)} | {_fmt(gen.get('sync_s'))} | "
                f"{s['peak_rss_mb']:.0f} | {s['mean_reward']:.3f} |")
    return lines + [""]


# --------------------------------------------------------------------------- report


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def _fmt(x, nd=3):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _pct(s: dict, matmul_gflops: float | None) -> str:
    """Model FLOPs of a step / (median step time x measured fp32 matmul throughput), in %."""
    if not matmul_gflops or matmul_gflops != matmul_gflops:
        return "-"
    return f"{100.0 * s['model_gflop_per_step'] / s['median_step_s'] / matmul_gflops:.2f}"


def grpo_table(res: dict, title: str, matmul_gflops: float | None) -> list[str]:
    lines = [f"#### {title}", "",
             "| library | median s/step | min s/step | p10-p90 s | load avg (before->after) | steps/s | completion tokens/s | mean completion len | "
             "RSS MB after imports | peak RSS MB | peak - after imports MB | model GFLOP/step | % of fp32 matmul peak | "
             "generation tokens/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for lib, s in res.items():
        if not isinstance(s, dict) or "median_step_s" not in s:
            lines.append(f"| {lib} | error: {s.get('error') if isinstance(s, dict) else s} |")
            continue
        lines.append(
            f"| {lib} | {s['median_step_s']:.3f} | {s['min_step_s']:.3f} | "
            f"{s['step_s_p10_p90'][0]:.3f}-{s['step_s_p10_p90'][1]:.3f} | "
            f"{s['loadavg_1min'][0]:.2f}->{s['loadavg_1min'][1]:.2f} | "
            f"{s['steps_per_s']:.2f} | {s['completion_tokens_per_s']:.0f} | {s['completion_len']:.2f} | "
            f"{s['rss_after_imports_mb']:.0f} | {s['peak_rss_mb']:.0f} | "
            f"{s['peak_train_rss_mb'] - s['rss_after_imports_mb']:.0f} | {s['model_gflop_per_step']:.2f} | "
            f"{_pct(s, matmul_gflops)} | {_fmt(s.get('generation_tokens_per_s'), 0)} |")
    if all(isinstance(res.get(k), dict) and "median_step_s" in res[k] for k in ("trl", "psirl")):
        t, p = res["trl"], res["psirl"]
        grow_p = p["peak_train_rss_mb"] - p["rss_after_imports_mb"]
        grow_t = t["peak_train_rss_mb"] - t["rss_after_imports_mb"]
        lines += ["", f"psirl speed-up (TRL s/step / psirl s/step): **{t['median_step_s'] / p['median_step_s']:.2f}x**; "
                  f"peak RSS psirl / TRL: **{p['peak_rss_mb'] / t['peak_rss_mb']:.2f}** (whole process), "
                  f"**{grow_p / grow_t:.2f}** (growth above the RSS after imports)."]
        rounds = {k: res[k].get("round_medians_s") for k in ("trl", "psirl")}
        if all(v and len(v) > 1 for v in rounds.values()):
            lines += ["", "Median s/step of every round: " + "; ".join(
                f"{k} " + ", ".join(f"{x:.3f}" for x in v) for k, v in rounds.items()) + "."]
        if p.get("executed_gflop_per_step") is not None and matmul_gflops:
            executed = p["executed_gflop_per_step"]
            lines += ["", "Model GFLOP/step counts every sample's prompt and completion in every pass "
                      "(the same count for both libraries; % of peak = that / s/step / matmul peak). "
                      "psirl runs each prompt once per group (generation prefill, and packed "
                      "reference/policy rows where its cost model finds them cheaper), so it "
                      f"executes about {executed:.2f} GFLOP/step, i.e. "
                      f"{100.0 * executed / p['median_step_s'] / matmul_gflops:.1f} % of the matmul peak "
                      "in work actually done."]
        if "phase_median_s" in p:
            ph = ", ".join(f"{k} {v:.3f} s" for k, v in p["phase_median_s"].items())
            lines += ["", f"psirl phases (median): {ph}."]
    return lines + [""]


def render(results: dict) -> str:
    m = results["machine"]
    lines = [f"Command: `{results['command']}`  ", f"Date: {results['date']}  ",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB RAM; torch threads = {m['threads']}; "
             f"Python {m['python']}; torch {m['torch']}, transformers {m['transformers']}, trl {m['trl']}, "
             f"accelerate {m['accelerate']}" + (f"; GPU {m['gpu']}" if m.get("gpu") else "") + "  ",
             f"fp32 matmul throughput (torch.matmul 1024x1024, {m['threads']} threads, best of 20, measured "
             f"at the start and the end of the run, the higher kept): **{results['matmul_gflops']:.1f} GFLOP/s** "
             f"(measurements: {', '.join(f'{x:.1f}' for x in results['matmul_gflops_runs'])})", ""]
    for name, info in results.get("checkpoints", {}).items():
        if "sft_greedy_accuracy" in info:
            lines += [f"Checkpoint `{name}`: SFT {info['shape']['sft_steps']} steps x {info['shape']['sft_batch']} "
                      f"examples in {info['sft_seconds']:.0f} s, final loss {info['sft_final_loss']:.3f}, held-out "
                      f"greedy accuracy {info['sft_greedy_accuracy']:.3f} (256 prompts).", ""]
    if "grpo" in results:
        lines += grpo_table(results["grpo"], "1 + 3. GRPO step, tiny Qwen2 (char vocabulary), 8x8, 16 new tokens",
                            results["matmul_gflops"])
    if "vocab" in results:
        lines += grpo_table(results["vocab"], "6. GRPO step, 32k vocabulary, 128-token completions (random model)",
                            results["matmul_gflops"])
    if "vllm" in results:
        lines += vllm_table(results["vllm"])
    if "learn" in results:
        le = results["learn"]
        lines += ["#### 2. Learning efficiency (same SFT checkpoint, held-out greedy accuracy)", "",
                  f"SFT checkpoint accuracy on {le['eval_n']} held-out prompts (task test split): "
                  f"{le['sft_accuracy']:.3f}; target **{le['target']}**; GRPO lr {le['lr']}; evaluated every "
                  f"{le['eval_every']} steps (evaluation time not counted); at most {le['max_steps']} steps; "
                  f"seeds {le['seeds']}.", "",
                  "| library | seeds reaching target | median steps to target | median training s to target | "
                  "per seed: steps / s to target (best accuracy) | median s/step |",
                  "|---|---|---|---|---|---|"]
        for lib in LIBS:
            if lib not in le:
                continue
            s = le[lib]
            per = ", ".join(
                f"{_fmt(r['steps_to_target'])} / {_fmt(r['train_s_to_target'], 1)} ({r['best_accuracy']:.3f})"
                if "error" not in r else "error" for r in s["runs"])
            lines.append(f"| {lib} | {s['reached']}/{len(s['runs'])} | {_fmt(s['median_steps_to_target'], 1)} | "
                         f"{_fmt(s['median_train_s_to_target'], 1)} | {per} | {_fmt(s['median_step_s'])} |")
        if all(le.get(k, {}).get("median_train_s_to_target") for k in LIBS):
            ratio = le["trl"]["median_train_s_to_target"] / le["psirl"]["median_train_s_to_target"]
            lines += ["", f"TRL / psirl median training time to target: **{ratio:.2f}x**."]
        grpo = results.get("grpo", {})
        if all(le.get(k, {}).get("median_steps_to_target") and "median_step_s" in grpo.get(k, {})
               for k in LIBS):
            est = {k: le[k]["median_steps_to_target"] * grpo[k]["median_step_s"] for k in LIBS}
            lines += ["", "Contention-free estimate (median steps to target x the section-1 median "
                      "s/step): " + ", ".join(f"{k} {v:.1f} s" for k, v in est.items())
                      + f"; TRL / psirl **{est['trl'] / est['psirl']:.2f}x**."]
        lines.append("")
    if "logprob" in results:
        lines += ["#### 4. Log-prob memory (1 sequence, 8 prompt + 1024 completion tokens, hidden 256)", "",
                  "Peak RSS above the RSS just before the call (after a warm-up call; parameter grads "
                  "pre-allocated; glibc told to mmap every allocation >= 128 KiB so freed tensors leave RSS).", "",
                  "| vocab | method | fp32 [T,V] logits MB | peak extra MB forward | peak extra MB fwd+bwd | s fwd | s fwd+bwd |",
                  "|---|---|---|---|---|---|---|"]
        for r in results["logprob"]:
            if "error" in r:
                lines.append(f"| - | error: {r['error']} |")
                continue
            f, fb = r["forward"], r["forward_backward"]
            lines.append(f"| {r['vocab']} | {r['method']} | {r['logits_fp32_mb']:.0f} | {_fmt(f['peak_extra_mb'], 0)} | "
                         f"{_fmt(fb['peak_extra_mb'], 0)} | {f['seconds']:.2f} | {fb['seconds']:.2f} |")
        lines.append("")
    if "gpu" in results:
        g = results["gpu"]
        if "skipped" in g:
            lines += ["#### 5. GPU", "", f"Skipped: {g['skipped']}.", ""]
        else:
            import gpu_bench

            lines += ["#### 5. GPU", "", gpu_bench.render(g), ""]
    for name in DPO_SHAPES:
        if f"dpo:{name}" in results:
            lines += dpo_table(results[f"dpo:{name}"],
                               f"7. DPO step ({name}): batch 32 pairs, length <= 24")
    return "\n".join(lines)


def update_results_md(text: str) -> Path:
    path = C.HERE / "RESULTS.md"
    old = path.read_text() if path.exists() else f"# Benchmark results\n\n{BEGIN}\n{END}\n"
    if BEGIN not in old or END not in old:
        old = old.rstrip() + f"\n\n{BEGIN}\n{END}\n"
    head, rest = old.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")
    return path


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    ap.add_argument("--libs", default="trl,psirl")
    ap.add_argument("--steps", type=int, default=None, help="measured GRPO steps (default per shape)")
    ap.add_argument("--repeats", type=int, default=5,
                    help="GRPO rounds per library (alternating); the median round is kept")
    ap.add_argument("--vocab-repeats", type=int, default=1, help="rounds for the 32k-vocabulary shape")
    ap.add_argument("--vllm-repeats", type=int, default=1, help="rounds per engine, section vllm")
    ap.add_argument("--vllm-gen-only", default="",
                    help="section vllm: shapes measured by generation alone (e.g. vocab32k)")
    ap.add_argument("--dpo-repeats", type=int, default=3, help="DPO rounds per library and shape")
    ap.add_argument("--dpo-shapes", default=",".join(DPO_SHAPES))
    ap.add_argument("--learn-target", default="auto",
                    help="held-out greedy accuracy to reach; 'auto' = SFT checkpoint's + --learn-gain")
    ap.add_argument("--learn-gain", type=float, default=0.06)
    ap.add_argument("--learn-max-steps", type=int, default=100)
    ap.add_argument("--learn-eval-every", type=int, default=5)
    ap.add_argument("--learn-eval-n", type=int, default=1024)
    ap.add_argument("--learn-lr", type=float, default=None, help="default: the shape's lr")
    ap.add_argument("--learn-seeds", default="0,1,2,3,4,5,6,7", help="one learning run per seed and library")
    ap.add_argument("--vocabs", default="32768,65536,151936")
    ap.add_argument("--logprob-tokens", type=int, default=1024)
    ap.add_argument("--idle-max-busy", type=float, default=0.25,
                    help="before each timed subprocess wait until the CPUs are less busy than this "
                         "(fraction, over 1 s); 1 disables the wait")
    ap.add_argument("--idle-timeout", type=float, default=300.0, help="give up waiting after this")
    ap.add_argument("--out", default=str(C.CACHE / "results.json"))
    ap.add_argument("--update-results", action="store_true", help="rewrite benchmarks/RESULTS.md's table block")
    ap.add_argument("--render", metavar="RESULTS_JSON", default=None,
                    help="only re-render the tables of an earlier run's results.json (no measuring)")
    args = ap.parse_args(argv)
    if args.render:
        text = render(json.loads(Path(args.render).read_text()))
        print(text)
        if args.update_results:
            log(f"updated {update_results_md(text)}")
        return

    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        ap.error(f"--sections: unknown {sorted(unknown)}; known: {SECTIONS}")
    libs = [x.strip() for x in args.libs.split(",") if x.strip()]
    C.IDLE.update(max_busy=args.idle_max_busy, timeout=args.idle_timeout)
    C.CACHE.mkdir(parents=True, exist_ok=True)
    C.set_threads()
    results = {"command": " ".join([Path(sys.executable).name, *map(shlex.quote, sys.argv)]),
               "date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": C.machine_info(),
               "matmul_gflops_runs": []}
    C.wait_for_idle_cpu(args.idle_max_busy, args.idle_timeout)
    results["matmul_gflops_runs"].append(C.matmul_gflops())
    results["matmul_gflops"] = max(results["matmul_gflops_runs"])
    log(f"fp32 matmul: {results['matmul_gflops']:.1f} GFLOP/s on {C.THREADS} threads")
    t0 = time.perf_counter()
    if set(sections) & {"grpo", "learn"}:
        C.prepare_checkpoint(C.SHAPES["tiny"])  # built once (SFT), before any timing
    for section in sections:
        if section == "grpo":
            results["grpo"] = grpo_section(C.SHAPES["tiny"], libs, args.steps, args.repeats)
        elif section == "vocab":
            results["vocab"] = grpo_section(C.SHAPES["vocab32k"], libs, None, args.vocab_repeats)
        elif section == "learn":
            results["learn"] = learn_section(C.SHAPES["tiny"], libs, args.learn_target,
                                             args.learn_gain, args.learn_max_steps,
                                             args.learn_eval_every, args.learn_eval_n, args.learn_lr,
                                             [int(x) for x in args.learn_seeds.split(",")])
        elif section == "logprob":
            results["logprob"] = logprob_section([int(v) for v in args.vocabs.split(",")],
                                                 args.logprob_tokens)
        elif section == "gpu":
            results["gpu"] = gpu_section(libs, args.steps)
        elif section == "vllm":
            results["vllm"] = vllm_section(args.vllm_repeats, args.steps,
                                           tuple(x for x in args.vllm_gen_only.split(",") if x))
        elif section == "dpo":
            for name in [x for x in args.dpo_shapes.split(",") if x]:
                results[f"dpo:{name}"] = dpo_section(name, libs, args.steps, args.dpo_repeats)
        Path(args.out).write_text(json.dumps(results, indent=2))
    results["checkpoints"] = {name: C.checkpoint_info(shape) for name, shape in C.SHAPES.items()
                              if C.checkpoint_info(shape)}
    results["total_s"] = time.perf_counter() - t0
    C.wait_for_idle_cpu(args.idle_max_busy, args.idle_timeout)
    results["matmul_gflops_runs"].append(C.matmul_gflops())
    results["matmul_gflops"] = max(results["matmul_gflops_runs"])
    for key in ("grpo", "vocab"):
        for summary in results.get(key, {}).values():
            if isinstance(summary, dict) and "median_step_s" in summary:
                summary["pct_of_matmul_peak"] = float(_pct(summary, results["matmul_gflops"]))
    Path(args.out).write_text(json.dumps(results, indent=2))
    text = render(results)
    md = Path(args.out).with_suffix(".md")
    md.write_text(text + "\n")
    print(text)
    log(f"done in {results['total_s']:.0f} s; {args.out}, {md}")
    if args.update_results:
        log(f"updated {update_results_md(text)}")


if __name__ == "__main__":
    main()
