#!/usr/bin/env bash
# Body of `make down`: stop what `make up` started, in order: nginx (lets running streams finish), gateway (drains
# its streams), controller, then the dev cluster (jobs, slurmds, slurmctld, munged). Each service is stopped by
# the PID in its pid file.
set -uo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly REPO_ROOT
readonly RUN_DIR=${HPCLLM_RUN_DIR:-/var/tmp/hpcllm/run}
# The venv `make venv` made: make passes its VENV (absolute) as HPCLLM_VENV.
readonly PYTHON=${HPCLLM_VENV:-$REPO_ROOT/.venv}/bin/python
# shellcheck source=slurm/service-pids.sh
source "$REPO_ROOT/slurm/service-pids.sh"

stop_service() {
    local name=$1 pidfile=$RUN_DIR/$1.pid pid i
    [[ -f $pidfile ]] || return 0
    if pid=$(service_pid "$name"); then
        echo "==> stopping $name (pid $pid)" >&2
        kill -TERM "$pid"
        for ((i = 0; i < 160; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        kill -0 "$pid" 2>/dev/null && { echo "$name did not stop in 40 s; killing it" >&2; kill -KILL "$pid"; }
    else # a stale file (after a reboot): its PID may be another process's now
        pid=$(head -c 20 "$pidfile")
        echo "$name.pid names pid $pid, which is not a running 'hpcllm $name': left alone, file removed" >&2
    fi
    rm -f "$pidfile"
}

# The front door's stop checks that nginx.pid names this run folder's nginx (a stale file is removed, its PID left
# alone), then sends SIGQUIT, nginx's graceful stop: running streams get 30 s to finish.
stop_front_door() {
    [[ -f $RUN_DIR/nginx/nginx.pid ]] || return 0
    if [[ ! -x $PYTHON ]]; then
        echo "$PYTHON not found: nginx of $RUN_DIR/nginx not stopped (make venv, then make down)" >&2
        return 0
    fi
    "$PYTHON" -m hpcllm.gateway.frontdoor stop --run-dir "$RUN_DIR/nginx" --timeout-s 30
}

stop_front_door
stop_service gateway
stop_service controller
bash "$REPO_ROOT/slurm/devcluster.sh" stop
