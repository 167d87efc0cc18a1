# Everything a fresh machine needs: `make demo` and `make test` create the virtual environment,
# install torch 2.13.0 (the CPU build; a bare `torch` would pull a multi-GB CUDA build) and the project.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,serve]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m pytest -q perf --presets tiny --backends eager --benchmark-disable
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m dllm.perf.report

clean:
	rm -rf $(VENV) demo-models build *.egg-info
