# Everything a fresh machine needs: `make demo` and `make test` create the virtual environment,
# install torch 2.13.0 and the project. The pin fixes the version the tests run against, not the build:
# pip installs whatever torch==2.13.0 wheel its index offers for the platform. On Linux x86_64 PyPI's
# is the CUDA build (GBs of nvidia-* wheels); this dev machine gets the CPU build from its local wheel
# folder. CPU-only elsewhere: create .venv and install torch==2.13.0 from PyTorch's CPU-only wheel index
# first (see pytorch.org's install page), then make (the pin is then met). `make gpu-check` makes no venv:
# it installs the project into GPU_PYTHON, a Python that already holds a CUDA torch.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --disable-pip-version-check --progress-bar on
CORE   := $(VENV)/.core
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint bench gpu-check clean

$(CORE): pyproject.toml
	@echo "== setup 1/2: $(VENV) with torch 2.13.0 and dllm-runtime itself (all the demo needs) =="
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e .
	touch $(CORE)

$(STAMP): $(CORE)
	@echo "== setup 2/2: the test, serve and eval extras (pytest, ruff, openai, starlette, uvicorn, lm-eval, ...) =="
	$(PIP) -e '.[test,serve,eval]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(CORE)
	@echo "== make demo: the trained model under every cache policy, tiny LLaDA / Dream checkpoints =="
	$(PY) examples/demo.py

test: $(STAMP)
	@echo "== make test 1/3: lint (ruff: pyproject.toml [tool.ruff]) =="
	$(PY) -m ruff check .
	@echo "== make test 2/3: benchmark suite smoke run (perf/, tiny preset, eager) =="
	$(PY) -m pytest -q perf --presets tiny --backends eager --benchmark-disable
	@echo "== make test 3/3: test suite (tests/, without the slow soak: pytest -m slow tests runs it) =="
	$(PY) -m pytest -q -m "not slow" tests

lint: $(STAMP)   # ruff (pyproject.toml [tool.ruff]); make test runs it first
	$(PY) -m ruff check .

bench: $(STAMP)
	$(PY) -m dllm.perf.report

# The first GPU run (docs/gpu.md), offline: into a Python that already holds a CUDA torch, no venv, no index.
GPU_PYTHON ?= python3
GPU_CHECK_ARGS ?=
gpu-check:
	$(GPU_PYTHON) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation --no-index -e .
	$(strip $(GPU_PYTHON) -m dllm.perf.gpu_check $(GPU_CHECK_ARGS))

clean:
	rm -rf $(VENV) demo-models build *.egg-info
