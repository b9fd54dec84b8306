# Two commands on a fresh Debian machine (as root):
#   make up    install everything, start the dev Slurm cluster and hpcllm on its embedded default
#   make test  run the test suite (sets up first if needed, test tools included)
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup host test-host venv up down test test-all bench-load gpu-wheels

setup: host venv

host:
	@bash slurm/install-host.sh

# The host packages plus what the tests need (shellcheck, postgresql), in one apt run.
test-host:
	@bash slurm/install-host.sh --test-tools

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	@bash slurm/make-venv.sh '$(PYTHON)' '$(VENV)'
	$(BIN)/pip install -q -e '.[test,mpi,bench,postgres]'
	@touch $@

up: setup
	@HPCLLM_VENV='$(abspath $(VENV))' bash slurm/up.sh

down:
	@bash slurm/down.sh

test: test-host venv
	$(BIN)/pytest -q

bench-load: setup
	$(BIN)/python bench/load.py

# Wheels of what the GPU `device` machine lacks (Python 3.12, no network), at the versions this venv tested, for
# bench/gpu_check.sh (docs/gpu-checks.md).
GPU_WHEELS := pydantic pydantic_core annotated-types typing-inspection flask itsdangerous blinker gunicorn
gpu-wheels: venv
	@rm -rf .whl && mkdir -p .whl
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
		$$($(BIN)/python -c 'import importlib.metadata as m, sys; print(" ".join(f"{n}=={m.version(n)}" for n in sys.argv[1:]))' $(GPU_WHEELS))
	@ls .whl
