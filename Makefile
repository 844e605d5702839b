# Two commands for a new user: `make demo` and `make test`. Each creates .venv when it is
# missing and installs the pinned development environment (constraints.txt) before running.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.hierbayes-installed
OUT ?= runs/demo

# Small-op PyTorch workloads run faster on one thread here; PASSIVE stops idle OpenMP threads
# from spinning against a second busy process (measured: 10-70x slowdowns without it).
export OMP_WAIT_POLICY := PASSIVE
export PYTHONUNBUFFERED := 1

.PHONY: demo test test-slow test-gpu lint typecheck bench bench-demo bench-report clean install

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	# torch first and pinned: constraints.txt holds torch==2.13.0, the CPU build on disk here.
	$(BIN)/python -m pip install --quiet -c constraints.txt torch
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m hierbayes demo --out $(OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not gpu" -n 2 -p no:cacheprovider

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m "slow" -p no:cacheprovider

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -m "gpu" -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check hierbayes tests benchmarks examples
	$(BIN)/ruff format --check hierbayes tests benchmarks examples

typecheck: $(STAMP)
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_meta_step.py --out benchmarks/results

# The demo's figures for BENCHMARKS.md (its printed report, at the commit recorded beside it).
bench-demo: $(STAMP)
	commit=$$(git rev-parse --short HEAD) && \
	$(BIN)/python -m hierbayes demo --out benchmarks/results/demo --no-progress && \
	echo $$commit > benchmarks/results/demo/COMMIT

# Regenerate BENCHMARKS.md's measured tables from the JSON under benchmarks/results/.
bench-report: $(STAMP)
	$(BIN)/python benchmarks/report.py

# The documentation site (mkdocs-material, mkdocstrings, mkdocs-gallery) into site/: the docs
# extra installed into .venv beside the development environment, then a strict build (a broken
# link, an unresolved cross-reference or a failing tutorial fails it). Tutorials run in fast
# mode unless HIERBAYES_DOCS_FAST=0 (`make docs-full`: the full configurations; reruns every
# tutorial). Open site/index.html, or serve it with `$(BIN)/mkdocs serve`.
DOCS_STAMP := $(VENV)/.hierbayes-docs-installed
HIERBAYES_DOCS_FAST ?= 1

$(DOCS_STAMP): $(STAMP) pyproject.toml constraints.txt
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev,docs]"
	touch $(DOCS_STAMP)

.PHONY: docs docs-full
docs: $(DOCS_STAMP)
	HIERBAYES_DOCS_FAST=$(HIERBAYES_DOCS_FAST) OMP_NUM_THREADS=1 NO_MKDOCS_2_WARNING=1 \
		$(BIN)/mkdocs build --strict

docs-full: $(DOCS_STAMP)
	rm -rf docs/generated
	$(MAKE) docs HIERBAYES_DOCS_FAST=0

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
