# Two commands on a fresh machine: `make run` and `make test`.
# torch is pinned and installed first: an open range would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: run test lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev,bench]"
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/selfmod train

test: $(STAMP)
	$(VENV)/bin/ruff check selfmod tests benchmarks examples
	$(VENV)/bin/ruff format --check selfmod tests benchmarks examples
	$(PY) -m pytest -q -n auto --maxprocesses 4

lint: $(STAMP)
	$(VENV)/bin/ruff check selfmod tests benchmarks examples
	$(VENV)/bin/ruff format --check selfmod tests benchmarks examples

bench: $(STAMP)
	$(PY) benchmarks/metagrad.py

clean:
	rm -rf $(VENV) runs .pytest_cache
