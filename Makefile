# Two commands for a fresh machine: `make run` (the tiny curriculum) and `make test` (the suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= configs/curriculum/tiny.yaml

.PHONY: install run test test-fast lint bench clean

install: $(STAMP)

# torch first and pinned (the CPU wheel on these machines; an open range pulls a multi-GB CUDA build),
# then the package with its extras, then DeepSpeed's CPU comm op built once (else every first stage
# would pay the ~1-2 min JIT compile).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[dev]"
	$(PY) -m avatarforge.train.prebuild
	touch $(STAMP)

run: install
	$(VENV)/bin/avatarforge run $(CONFIG) $(ARGS)

test: install
	$(PY) -m pytest -q --timeout=1500 --durations=15

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) benchmarks/step_rate.py

clean:
	rm -rf runs .pytest_cache
