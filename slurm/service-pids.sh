#!/usr/bin/env bash
# Sourced by slurm/up.sh and slurm/down.sh (RUN_DIR set): the PIDs of the services `make up` started, read from
# their pid files and checked, so that a stale pid file (RUN_DIR is under /var/tmp, which outlives a reboot) naming
# a PID another process now has is neither taken for a running service nor signalled.

# service_pid NAME: prints the PID in RUN_DIR/NAME.pid when it is a live `hpcllm NAME` process. With setproctitle
# installed, gunicorn rewrites its master's command line to `gunicorn: master [PROC_NAME]` (the gateway's proc_name
# is hpcllm-gateway, hpcllm/gateway/server.py), so that title counts too.
service_pid() {
    local pid
    pid=$(cat "$RUN_DIR/$1.pid" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -e "hpcllm $1" -e "[hpcllm-$1]" || return 1
    echo "$pid"
}
