#!/usr/bin/env bash
# First step of `make venv` and `make vllm-venv`: create the virtual environment VENV with PYTHON (a Python 3.11)
# unless a working one is there, and say exactly what to install when PYTHON is missing, is not 3.11 or cannot
# create venvs (Debian ships venv support apart, in python3.11-venv). Idempotent: an existing venv with pip is left
# as it is.
#
# Usage: slurm/make-venv.sh PYTHON VENV
set -euo pipefail

readonly INSTALL_HINT="on Debian bookworm run 'make host' as root (it installs python3.11 and python3.11-venv); elsewhere install Python 3.11 with venv support, or name one: make PYTHON=/path/to/python3.11"

die() { echo "error: $*" >&2; exit 1; }

(($# == 2)) || { echo "usage: $0 PYTHON VENV" >&2; exit 2; }
readonly PYTHON=$1 VENV=$2

# python_version PYTHON: prints MAJOR.MINOR, or fails when PYTHON does not run.
python_version() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null; }

if [[ -x $VENV/bin/python && -x $VENV/bin/pip ]]; then
    version=$(python_version "$VENV/bin/python") || version=unknown
    [[ $version == 3.11 ]] ||
        die "the venv $VENV has Python $version, hpcllm needs 3.11: remove it (rm -rf $VENV) and run make again"
    exit 0
fi

command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found; hpcllm needs Python 3.11: $INSTALL_HINT"
version=$(python_version "$PYTHON") || die "$PYTHON does not run; hpcllm needs Python 3.11: $INSTALL_HINT"
[[ $version == 3.11 ]] || die "$PYTHON is Python $version; hpcllm needs Python 3.11: $INSTALL_HINT"

if [[ -e $VENV ]]; then
    echo "==> $VENV has no working pip (an interrupted earlier run?): creating it afresh" >&2
fi
echo "==> $PYTHON -m venv $VENV" >&2
"$PYTHON" -m venv --clear "$VENV" ||
    die "'$PYTHON -m venv $VENV' failed (see above); on Debian/Ubuntu venv support is the package python3.11-venv: run 'make host' as root, or apt-get install python3.11-venv"
