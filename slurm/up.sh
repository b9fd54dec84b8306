#!/usr/bin/env bash
# Body of `make up`: bring hpcllm up on this host, on the dev Slurm cluster.
# `make up` has already run `make host` (slurm/install-host.sh) and `make venv`.
#
# Each step is one function called from main, in order, and must be idempotent (safe when already up).
# Later parts of hpcllm add their steps here (controller, gateway, demo model).
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly REPO_ROOT
readonly DEVCLUSTER=$REPO_ROOT/slurm/devcluster.sh

# The venv `make venv` made: make passes its VENV (absolute) as HPCLLM_VENV.
readonly HPCLLM=${HPCLLM_VENV:-$REPO_ROOT/.venv}/bin/hpcllm
export HPCLLM_CONFIG=${HPCLLM_CONFIG:-$REPO_ROOT/conf/dev.toml}
readonly RUN_DIR=${HPCLLM_RUN_DIR:-/var/tmp/hpcllm/run}
readonly MODELS_DIR=/var/tmp/hpcllm/models
readonly CONTROLLER_URL=http://127.0.0.1:8700
readonly GATEWAY_URL=http://127.0.0.1:8000
# The front door users reach: nginx with TLS (conf/nginx/hpcllm.conf), certificate signed by a dev CA.
readonly FRONT_URL=https://localhost:8443
readonly NGINX_DIR=$RUN_DIR/nginx
readonly PYTHON=${HPCLLM_VENV:-$REPO_ROOT/.venv}/bin/python

step() { echo "==> $*" >&2; }
die() { echo "error: $*" >&2; exit 1; }

# wait_http URL SECONDS LOG: poll until URL answers 200, or fail naming the log to read.
wait_http() {
    local url=$1 seconds=$2 log=$3 i
    for ((i = 0; i < seconds * 4; i++)); do
        curl -fsS -o /dev/null "$url" 2>/dev/null && return 0
        sleep 0.25
    done
    die "$url did not come up within ${seconds}s; see $log"
}

# shellcheck source=slurm/service-pids.sh
source "$REPO_ROOT/slurm/service-pids.sh"

# start_service NAME HEALTH_URL CMD...: start CMD in the background once (idempotent), wait for its health.
start_service() {
    local name=$1 health=$2; shift 2
    local log=$RUN_DIR/$name.log
    local pid
    if pid=$(service_pid "$name"); then
        step "$name already running (pid $pid)"
    else
        # Something else answering there would pass the health check below while our process fails to bind.
        if curl -fsS -o /dev/null "$health" 2>/dev/null; then
            die "$health already answers, but not from the $name of $RUN_DIR/$name.pid: stop what listens there (if another checkout ran make up, run make down in it), then make up again"
        fi
        step "$name: $*"
        setsid "$@" >>"$log" 2>&1 </dev/null &
        echo $! >"$RUN_DIR/$name.pid"
    fi
    wait_http "$health" 120 "$log"
}

start_dev_cluster() {
    step "dev Slurm cluster: slurm/devcluster.sh start --rest"
    local exports
    exports=$(bash "$DEVCLUSTER" start --rest)
    eval "$exports" # SLURM_CONF for the steps below
    SLURM_CONF_EXPORT=$exports
    sinfo
}

build_demo_model() {
    local dest=$MODELS_DIR/tiny-llama
    if [[ -f $dest/manifest.json ]]; then
        step "demo model already converted at $dest"
        return
    fi
    step "demo model: building tiny Llama (offline, seeded) and converting it to $dest"
    local hf=$RUN_DIR/tiny-llama-hf
    rm -rf "$hf"
    "$HPCLLM" dev make-model llama "$hf" --size tiny
    "$HPCLLM" convert "$hf" "$dest"
}

start_services() {
    start_service controller "$CONTROLLER_URL/health" "$HPCLLM" controller
    step "deploy conf/models/tiny-llama.toml"
    "$HPCLLM" deploy "$REPO_ROOT/conf/models/tiny-llama.toml" --url "$CONTROLLER_URL"
    start_service gateway "$GATEWAY_URL/health" "$HPCLLM" gateway
}

# Idempotent: start says "nginx already running" when this run folder's nginx is (hpcllm/gateway/frontdoor.py).
start_front_door() {
    step "front door: nginx with TLS on $FRONT_URL (clients verify with $NGINX_DIR/ca.pem)"
    "$PYTHON" -m hpcllm.gateway.frontdoor start --run-dir "$NGINX_DIR" --listen 127.0.0.1:8443 ||
        die "nginx did not start; see $NGINX_DIR/nginx-error.log (nginx missing? run make host as root)"
    curl -fsS -o /dev/null --cacert "$NGINX_DIR/ca.pem" "$FRONT_URL/health" ||
        die "$FRONT_URL/health does not answer through nginx; see $NGINX_DIR/nginx-error.log"
}

print_summary() {
    echo
    echo "The dev Slurm cluster is up (docs/devcluster.md). To use its Slurm commands in your shell:"
    echo "  $SLURM_CONF_EXPORT"
    echo "Status: bash slurm/devcluster.sh status; HPCLLM_CONFIG=$HPCLLM_CONFIG $HPCLLM status    Stop: make down"
    echo "Logs: $RUN_DIR/*.log"
    echo
    echo "hpcllm is serving tiny-llama at $FRONT_URL, nginx with TLS in front of the gateway (the first request is a"
    echo "cold start: a Slurm job starts a node agent, which loads the model). Stream a completion:"
    echo "  curl -N --cacert $NGINX_DIR/ca.pem $FRONT_URL/v1/completions -H 'Authorization: Bearer dev-key' \\"
    echo "    -H 'Content-Type: application/json' \\"
    echo "    -d '{\"model\": \"tiny-llama\", \"prompt\": \"Once upon a time\", \"max_tokens\": 16, \"stream\": true}'"
}

main() {
    [[ -x $HPCLLM ]] || die "$HPCLLM not found: run 'make venv' first"
    mkdir -p "$RUN_DIR" "$MODELS_DIR"
    start_dev_cluster
    build_demo_model
    start_services
    start_front_door
    print_summary
}

main "$@"
