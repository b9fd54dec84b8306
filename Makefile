# Two commands on a fresh Debian machine (as root):
#   make up    install everything, start the dev Slurm cluster and hpcllm on its embedded default
#   make test  run the test suite (sets up first if needed)
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup host venv up down test test-all bench-load

setup: host venv

host:
	@bash slurm/install-host.sh

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; hpcllm needs Python 3.11" >&2; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test,mpi,bench]'
	@touch $@

up: setup
	@bash slurm/up.sh

down:
	@bash slurm/down.sh

test: setup
	$(BIN)/pytest -q

bench-load: setup
	$(BIN)/python bench/load.py
