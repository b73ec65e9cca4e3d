# FinetunerExecutor: `make demo` and `make test` work from a fresh clone; each installs into .venv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
export JINA_OPTOUT_TELEMETRY := 1
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: help install lint format test test-slow test-all demo bench lock clean

help:  ## this list
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 12

# The .pth file puts this repository on the venv's path, so `jina flow --uses flows/search.yml` and `jina executor
# --uses config.yml` find the `executor` package from any folder without PYTHONPATH.
install: $(STAMP)  ## create or reuse .venv with the pinned requirements
	@$(PY) -c "import pathlib, site; pathlib.Path(site.getsitepackages()[0], 'finetuner-executor.pth').write_text('$(CURDIR)\n')"

# The stamp depends on the requirements and the lock: an unchanged .venv is reused as it is. The engines' clients
# (requirements-engines.txt) are installed too: make test runs VectorIndexer's contract on Qdrant and Milvus.
$(STAMP): requirements.txt requirements-engines.txt requirements.lock
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# This machine's pip 23.2 gives up on the pinned set (ResolutionImpossible); pip 26 resolves it.
	$(PIP) install -q --upgrade 'pip>=26'
	$(PIP) install -q -r requirements.txt -r requirements-engines.txt -c requirements.lock
	@touch $(STAMP)
	@echo ".venv is ready"

# Re-resolve requirements.txt and record every version (run after editing requirements.txt).
lock:  ## re-resolve requirements.txt (and the engines) into requirements.lock
	$(PIP) install -q -r requirements.txt -r requirements-engines.txt
	$(PIP) freeze --exclude-editable | grep -v '^-e ' > requirements.lock

# ruff's settings are in pyproject.toml; CI (.ci/run) runs this before the tests.
lint: install  ## ruff check and ruff format --check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install  ## apply ruff's fixes and formatter
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: install  ## the test suite without the slow and GPU tests (what CI runs)
	$(PY) -m pytest -m "not slow and not gpu"

test-slow: install  ## the slow tests
	$(PY) -m pytest -m "slow and not gpu"

test-all: install  ## every test (GPU tests need a GPU)
	$(PY) -m pytest

# DEMO=text-to-image: a two-tower model trained on captioned digits (or DEMO_DATA=captions.csv), searched by sentence
demo: install  ## the search flow on real digits: fine-tune, export, index, search
	$(PY) -m $(if $(filter text-to-image,$(DEMO)),executor.demo_text_to_image,executor.demo)

bench: install  ## the benchmarks under bench/, each printing side-by-side ratios
	$(PY) bench/train_overhead.py
	$(PY) bench/encode.py --quick
	$(PY) bench/knn.py
	$(PY) bench/ddp.py
	$(PY) bench/batching.py --rounds 1 --seconds 10

clean:  ## remove .venv
	rm -rf $(VENV) .pytest_cache
