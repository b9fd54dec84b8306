#!/usr/bin/env bash
# Body of `make down`: stop what `make up` started, in order: nginx (lets running streams finish), gateway (drains
# its streams), controller, then the dev cluster (jobs, slurmds, slurmctld, munged). Each service is stopped by
# the PID in its pid file.
set -uo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly REPO_ROOT
readonly RUN_DIR=${HPCLLM_RUN_DIR:-/var/tmp/hpcllm/run}
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

# nginx writes and removes its own pid file; SIGQUIT is its graceful stop.
stop_front_door() {
    local pid i
    # Not a live nginx: a stale file (after a reboot) that the front door's next start must not take for nginx's.
    pid=$(nginx_pid) || { rm -f "$RUN_DIR/nginx/nginx.pid"; return 0; }
    echo "==> stopping nginx (pid $pid)" >&2
    kill -QUIT "$pid"
    for ((i = 0; i < 120; i++)); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.25; done
    echo "nginx did not stop in 30 s; killing it" >&2
    kill -TERM "$pid"
}

stop_front_door
stop_service gateway
stop_service controller
bash "$REPO_ROOT/slurm/devcluster.sh" stop
