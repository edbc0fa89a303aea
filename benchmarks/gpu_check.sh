#!/usr/bin/env bash
# psirl on one NVIDIA GPU: the GPU tests and the GPU benchmark (psirl vs TRL, fp32 and bf16),
# one JSON + one Markdown table, in under 8 minutes, without network.
#
#   bash benchmarks/gpu_check.sh OUTDIR          # default OUTDIR: $OUT, else runs/gpu_check
#   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh OUTDIR
#   bash benchmarks/gpu_check.sh OUTDIR --dry-run   # CPU: the same steps on a tiny shape
#
# Needs: torch with CUDA, the project's dependencies (pip install -e '.[dev,bench]': transformers,
# trl, pytest). Every step runs under `timeout`; the benchmark goes first (its budget is fixed),
# the tests get the time left. Outputs in OUTDIR: gpu_check.json (everything), gpu_check.md
# (the tables), gpu_bench.{json,md}, gpu_tests{,_learn}.{xml,log} (pytest), env.txt.
set -u
cd "$(dirname "$0")/.."
OUTDIR="${1:-${OUT:-runs/gpu_check}}"
DRY=""
if [ "${2:-}" = "--dry-run" ] || [ "${1:-}" = "--dry-run" ]; then
    DRY="--dry-run"
    [ "${1:-}" = "--dry-run" ] && OUTDIR="${OUT:-runs/gpu_check}"
fi
PY="${PYTHON:-python}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
TOTAL_S="${GPU_CHECK_TOTAL_S:-470}"   # < 8 minutes including the final report
BENCH_S="${GPU_CHECK_BENCH_S:-280}"
START=$(date +%s)
left() { echo $(( TOTAL_S - ($(date +%s) - START) )); }

# No network: everything is local. Deterministic cuBLAS (the resume test; costs nothing here).
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export CUBLAS_WORKSPACE_CONFIG="${CUBLAS_WORKSPACE_CONFIG:-:4096:8}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "python: $PY"
    timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || echo "nvidia-smi: not available"
    timeout 60 "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); print('transformers', transformers.__version__)" 2>&1
    timeout 30 "$PY" -c "import trl; print('trl', trl.__version__)" 2>&1 || echo "trl: not installed"
} > "$OUTDIR/env.txt"
cat "$OUTDIR/env.txt"

echo "== 1/3 GPU benchmark (budget ${BENCH_S}s)"
timeout $(( BENCH_S + 30 )) "$PY" benchmarks/gpu_bench.py --out-dir "$OUTDIR" --budget-s "$BENCH_S" $DRY
BENCH_RC=$?
echo "gpu_bench exit code: $BENCH_RC"

echo "== 2/3 GPU tests ($(left)s left)"
# Two pytest runs, so a timeout in the long learning test cannot take the others' report with it.
run_tests() {  # run_tests NAME SECONDS PYTEST-ARGS...
    local name="$1" secs="$2"; shift 2
    if [ "$secs" -le 20 ]; then
        echo "no time left for $name" > "$OUTDIR/$name.log"; return 124
    fi
    timeout "$secs" "$PY" -m pytest -q -p no:cacheprovider -rs --durations=10 \
        --junitxml="$OUTDIR/$name.xml" "$@" > "$OUTDIR/$name.log" 2>&1
}
run_tests gpu_tests $(( $(left) - 100 )) tests/gpu --deselect \
    tests/gpu/test_cuda_bf16_learns.py::test_bf16_demo_learns_on_cuda
TEST_RC=$?
tail -n 15 "$OUTDIR/gpu_tests.log"
run_tests gpu_tests_learn $(( $(left) - 25 )) tests/gpu/test_cuda_bf16_learns.py
LEARN_RC=$?
tail -n 8 "$OUTDIR/gpu_tests_learn.log"
[ "$TEST_RC" -eq 0 ] && TEST_RC=$LEARN_RC
echo "pytest exit codes: $TEST_RC (all), $LEARN_RC (learning test)"

echo "== 3/3 report"
timeout 60 "$PY" benchmarks/gpu_report.py --out-dir "$OUTDIR" --bench-rc "$BENCH_RC" \
    --tests-rc "$TEST_RC" --seconds $(( $(date +%s) - START ))
REPORT_RC=$?
echo "total $(( $(date +%s) - START ))s; outputs in $OUTDIR"
[ "$BENCH_RC" -eq 0 ] && [ "$TEST_RC" -eq 0 ] && [ "$REPORT_RC" -eq 0 ]
