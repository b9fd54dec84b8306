#!/usr/bin/env bash
# Body of `make up`: bring hpcllm up on this host, on the dev Slurm cluster.
# `make up` has already run `make host` (slurm/install-host.sh) and `make venv`.
#
# Each step is one function called from main, in order, and must be idempotent (safe when already up).
# Later parts of hpcllm add their steps here (controller, gateway, demo model).
set -euo pipefail

readonly REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly DEVCLUSTER=$REPO_ROOT/slurm/devcluster.sh

step() { echo "==> $*" >&2; }

start_dev_cluster() {
    step "dev Slurm cluster: slurm/devcluster.sh start --rest"
    local exports
    exports=$(bash "$DEVCLUSTER" start --rest)
    eval "$exports" # SLURM_CONF for the steps below
    SLURM_CONF_EXPORT=$exports
    sinfo
}

print_summary() {
    echo
    echo "The dev Slurm cluster is up (docs/devcluster.md). To use its Slurm commands in your shell:"
    echo "  $SLURM_CONF_EXPORT"
    echo "Status: bash slurm/devcluster.sh status    Stop: make down"
}

main() {
    start_dev_cluster
    print_summary
}

main "$@"
