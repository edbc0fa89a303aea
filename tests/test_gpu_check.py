"""benchmarks/gpu_check.sh and its Python parts, on the CPU: they parse, refuse to run a GPU
benchmark without CUDA with a clear message, and report what they were given (no GPU needed).
The full `bash benchmarks/gpu_check.sh OUT --dry-run` (the whole pipeline on a tiny CPU shape,
about 4 minutes on 2 busy cores) is the manual check; it is not run here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_shell_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")], check=True)


def test_bench_without_cuda_says_so():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_bench.py"),
                           "--out-dir", "/nonexistent-not-created"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "CUDA is not available" in proc.stderr + proc.stdout


def _raw(lib: str, step_s: float, gen: float) -> dict:
    return {"warmup": 1, "step_times": [30.0, step_s, step_s + 0.2, step_s - 0.2],
            "completion_len_per_step": [128.0] * 4, "batch": 64, "prompt_len": 6.0,
            "peak_gpu_mem_gb": 10.0 if lib == "psirl" else 20.0, "generation_tokens_per_s": gen,
            "phase_times": {"time/generate_s": [20.0, 0.3, 0.3, 0.3]}}


def test_summary_flops_fraction_and_table():
    """The step's model FLOPs over (median s/step x measured peak): exact for a known config."""
    from types import SimpleNamespace

    import common as C
    import gpu_bench

    cfg = SimpleNamespace(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                          num_key_value_heads=2, intermediate_size=4864, vocab_size=151936)
    flops = 64 * C.model_flops_per_sequence(cfg, 6.0, 128.0)
    assert flops / 1e12 == pytest.approx(42.1, abs=0.1)  # the "about 42 TFLOP"
    row = gpu_bench.summarise(_raw("psirl", 1.0, 30000.0), cfg, peak_tflops=700.0)
    assert row["median_step_s"] == 1.0 and row["min_step_s"] == 0.8
    assert row["fraction_of_bf16_matmul_peak"] == pytest.approx(flops / 1e12 / 700.0)
    res = {"shape": "qwen0.5b-gpu", "matmul_peak": {"dtype": "bfloat16", "tflops": 700.0, "n": 8192},
           "runs": {"psirl:bfloat16": row,
                    "trl:bfloat16": gpu_bench.summarise(_raw("trl", 3.0, 3000.0), cfg, 700.0),
                    "psirl:float32": {"error": "worker exited with 1"}}}
    text = gpu_bench.render(res)
    assert "**3.00x**" in text and "**10.0x**" in text and "**0.50**" in text
    assert "worker exited with 1" in text
    assert f"| {100 * flops / 1e12 / 700.0:.2f} |" in text


def test_report_merges_bench_and_junit(tmp_path):
    import gpu_report

    (tmp_path / "env.txt").write_text("date: 2026-11-30 03:00 UTC\nNVIDIA H200, 143771 MiB\n")
    (tmp_path / "gpu_bench.md").write_text("| bench table |\n")
    (tmp_path / "gpu_bench.json").write_text(json.dumps({"runs": {}}))
    (tmp_path / "gpu_tests.xml").write_text(
        '<testsuites><testsuite><testcase classname="tests.gpu.a" name="t1" time="1.5"/>'
        '<testcase classname="tests.gpu.a" name="t2" time="0.1"><failure message="boom"/>'
        "</testcase></testsuite></testsuites>")
    assert gpu_report.main(["--out-dir", str(tmp_path), "--bench-rc", "0", "--tests-rc", "1",
                            "--seconds", "400"]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["tests"]["counts"] == {"passed": 1, "failed": 1, "report missing": 1}
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| bench table |" in md and "| tests.gpu.a::t2 | failed (boom) | 0.1 |" in md
    assert "NVIDIA H200" in md
