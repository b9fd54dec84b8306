#!/usr/bin/env bash
# A real Slurm 22.05 cluster on this one host, for development and tests: 4 named nodes n1-n4 (one slurmd each),
# 2 fake GPUs per node, partitions `batch` (default, preemptable) and `high`, its own munged, optional slurmrestd.
#
# Usage: slurm/devcluster.sh start [--rest]   start (idempotent); prints `export SLURM_CONF=...` on stdout
#        slurm/devcluster.sh stop              cancel jobs, stop slurmds, slurmctld, slurmrestd, munged (by PID)
#        slurm/devcluster.sh status [--rest]   print state; exit 0 when up, 3 when down
#
# Everything (config, keys, logs, spool, pid files, munge socket) lives under one folder:
#   HPCLLM_DEVCLUSTER_DIR        default /var/tmp/hpcllm-devcluster
#   HPCLLM_DEVCLUSTER_PORT_BASE  default 17810: slurmctld on BASE, slurmd n1-n4 on BASE+1..BASE+4,
#                                slurmrestd (with --rest) on 127.0.0.1:BASE+10
#   HPCLLM_DEVCLUSTER_START_TIMEOUT  seconds to wait for the nodes to come up (default 60)
# docs/devcluster.md describes the settings.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly SCRIPT_DIR
readonly TEMPLATE_DIR=$SCRIPT_DIR/devcluster
readonly STATE_DIR=${HPCLLM_DEVCLUSTER_DIR:-/var/tmp/hpcllm-devcluster}
readonly CONF=$STATE_DIR/conf/slurm.conf
readonly PORTS_FILE=$STATE_DIR/conf/ports.env
readonly LOG_DIR=$STATE_DIR/log
readonly RUN_DIR=$STATE_DIR/run
readonly MUNGE_DIR=$STATE_DIR/munge
readonly MUNGE_SOCKET=$MUNGE_DIR/munge.socket.2
readonly JWT_KEY=$STATE_DIR/jwt/jwt.key
readonly NODES=(n1 n2 n3 n4)
readonly START_TIMEOUT=${HPCLLM_DEVCLUSTER_START_TIMEOUT:-60}
readonly STOP_TIMEOUT=30
readonly REST_API=v0.0.38
readonly EXIT_DOWN=3

export SLURM_CONF=$CONF

die() { echo "devcluster: error: $*" >&2; exit 1; }
say() { echo "devcluster: $*" >&2; }

usage() {
    sed -n '5,7p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

require_root() {
    [[ $EUID -eq 0 ]] || die "run as root: the dev cluster's daemons (munged, slurmctld, slurmd) run as root (try: sudo $0 $1)"
}

require_packages() {
    local missing=() bin
    for bin in munged slurmctld slurmd sinfo scontrol squeue scancel; do
        command -v "$bin" >/dev/null 2>&1 || [[ -x /usr/sbin/$bin ]] || missing+=("$bin")
    done
    ((${#missing[@]} == 0)) || die "missing programs: ${missing[*]}; install them as root with: make host (runs slurm/install-host.sh)"
}

# munged refuses a socket below a folder that not every user may enter (clients of all users need the socket).
require_searchable_parents() {
    local dir
    dir=$(realpath -m "$STATE_DIR")
    while dir=$(dirname "$dir"); [[ $dir != / ]]; do
        [[ ! -d $dir ]] && continue
        (($(stat -c '%a' "$dir" | sed 's/.*\(.\)$/\1/') & 1)) ||
            die "$dir must be searchable by all users (o+x) for munged's socket under $STATE_DIR; choose another HPCLLM_DEVCLUSTER_DIR or chmod o+x $dir"
    done
}

# slurm.conf and gres.conf take each path as one word, read as is: whitespace ends it, '#' starts a comment, ','
# separates AuthInfo's settings, '%' is expanded per node (SlurmdSpoolDir=.../%n) and '[' starts a range in
# gres.conf's File= (.../fakegpu[0-1]). Such a folder is refused.
require_plain_state_dir() {
    [[ $STATE_DIR != *[[:space:]#,%[]* ]] ||
        die "HPCLLM_DEVCLUSTER_DIR '$STATE_DIR' has a space, '#', ',', '%' or '[', which slurm.conf cannot hold in a path; choose another folder"
}

jwt_plugin_installed() {
    compgen -G '/usr/lib/*/slurm-wlm/auth_jwt.so' >/dev/null || compgen -G '/usr/lib/slurm/auth_jwt.so' >/dev/null
}

# ---------------------------------------------------------------- ports

# Ports come from the running cluster's ports.env when there is one, else from HPCLLM_DEVCLUSTER_PORT_BASE.
load_ports() {
    if [[ -r $PORTS_FILE ]]; then
        # ports.env is written at start (write_ports_file); there is no file in the repo to follow.
        # shellcheck source=/dev/null
        source "$PORTS_FILE"
        return
    fi
    local base=${HPCLLM_DEVCLUSTER_PORT_BASE:-17810}
    if ! [[ $base =~ ^[0-9]+$ ]] || ((base < 1024 || base > 65500)); then
        die "HPCLLM_DEVCLUSTER_PORT_BASE=$base is not a port number between 1024 and 65500"
    fi
    CTLD_PORT=$base
    SLURMD_PORT_FIRST=$((base + 1))
    SLURMD_PORT_LAST=$((base + ${#NODES[@]}))
    REST_PORT=$((base + 10))
}

write_ports_file() {
    cat >"$PORTS_FILE.tmp" <<EOF
CTLD_PORT=$CTLD_PORT
SLURMD_PORT_FIRST=$SLURMD_PORT_FIRST
SLURMD_PORT_LAST=$SLURMD_PORT_LAST
REST_PORT=$REST_PORT
EOF
    mv "$PORTS_FILE.tmp" "$PORTS_FILE"
}

slurmd_port() { echo $((SLURMD_PORT_FIRST + $1)); } # $1: node index

# Prints who listens on the TCP port (empty when free).
port_listener() {
    local port=$1
    if command -v ss >/dev/null 2>&1; then
        ss -Htlnp "sport = :$port" 2>/dev/null | head -n1
    elif (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "a process accepting connections on 127.0.0.1:$port"
    fi
}

require_port_free() {
    local port=$1 what=$2 holder
    holder=$(port_listener "$port")
    [[ -z $holder ]] || die "port $port (for $what) is already in use: $holder
  choose another block with HPCLLM_DEVCLUSTER_PORT_BASE=N (uses N..N+10), or stop what holds port $port"
}

# ---------------------------------------------------------------- daemons by PID

# Prints the PID recorded in pid file $1 if that process is alive, runs program $2 and belongs to this state dir
# (its command line names the state dir). A stale file or a recycled PID prints nothing.
running_pid() {
    local pidfile=$1 comm=$2 pid
    [[ -r $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ -r /proc/$pid/comm && $(<"/proc/$pid/comm") == "$comm" ]] || return 1
    ! process_gone "$pid" || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$STATE_DIR" || return 1
    echo "$pid"
}

munged_pid() { running_pid "$RUN_DIR/munged.pid" munged; }
slurmctld_pid() { running_pid "$RUN_DIR/slurmctld.pid" slurmctld; }
slurmd_pid() { running_pid "$RUN_DIR/slurmd-$1.pid" slurmd; }
slurmrestd_pid() { running_pid "$RUN_DIR/slurmrestd.pid" slurmrestd; }

all_core_running() {
    munged_pid >/dev/null && slurmctld_pid >/dev/null || return 1
    local node
    for node in "${NODES[@]}"; do slurmd_pid "$node" >/dev/null || return 1; done
}

any_core_running() {
    munged_pid >/dev/null || slurmctld_pid >/dev/null && return 0
    local node
    for node in "${NODES[@]}"; do slurmd_pid "$node" >/dev/null && return 0; done
    return 1
}

# wait_until SECONDS COMMAND...: polls COMMAND every 0.2 s; fails after SECONDS.
wait_until() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

# A killed daemon stays a zombie until PID 1 reaps it (in containers that can take seconds): count it as gone.
process_gone() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
    stat=${stat##*) }
    [[ ${stat%% *} == Z ]]
}

# stop_pid NAME PID: SIGTERM, wait, then SIGKILL. Only ever a PID read from our own pid file.
stop_pid() {
    local name=$1 pid=$2
    kill -TERM "$pid" 2>/dev/null || return 0
    if ! wait_until "$STOP_TIMEOUT" process_gone "$pid"; then
        say "$name (pid $pid) ignored SIGTERM for ${STOP_TIMEOUT}s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        wait_until 5 process_gone "$pid" || die "$name (pid $pid) survived SIGKILL"
    fi
    say "stopped $name (pid $pid)"
}

log_tail() {
    if [[ -r $1 ]]; then
        { echo "--- last lines of $1:"; tail -n 15 "$1" || true; } >&2
    fi
}

# ---------------------------------------------------------------- start

prepare_state_dir() {
    # A fresh start: forget old jobs, spool, pid files and logs; keep the keys.
    rm -rf "$STATE_DIR/ctld" "$STATE_DIR/spool" "$STATE_DIR/tmp" "$RUN_DIR" "$LOG_DIR"
    mkdir -p "$STATE_DIR/conf" "$STATE_DIR/ctld" "$RUN_DIR" "$LOG_DIR" "$STATE_DIR/dev" "$MUNGE_DIR" \
        "$(dirname "$JWT_KEY")"
    local node
    for node in "${NODES[@]}"; do mkdir -p "$STATE_DIR/spool/$node" "$STATE_DIR/tmp/$node"; done
    # slurmrestd runs as nobody and must read the config; munged insists on a socket folder that is not writable
    # by others.
    chmod 755 "$STATE_DIR" "$STATE_DIR/conf" "$MUNGE_DIR"
    chmod 700 "$(dirname "$JWT_KEY")"

    if [[ ! -s $MUNGE_DIR/munge.key ]]; then
        (umask 077 && head -c 1024 /dev/urandom >"$MUNGE_DIR/munge.key.tmp")
        mv "$MUNGE_DIR/munge.key.tmp" "$MUNGE_DIR/munge.key"
    fi
    if [[ ! -s $JWT_KEY ]]; then
        (umask 077 && head -c 32 /dev/urandom >"$JWT_KEY.tmp")
        mv "$JWT_KEY.tmp" "$JWT_KEY"
    fi
    # Fake GPUs: character devices behaving like /dev/null, referenced by gres.conf's File=.
    local gpu
    for gpu in 0 1; do
        [[ -c $STATE_DIR/dev/fakegpu$gpu ]] || mknod -m 666 "$STATE_DIR/dev/fakegpu$gpu" c 1 3 ||
            die "cannot create the fake GPU device $STATE_DIR/dev/fakegpu$gpu with mknod (needs CAP_MKNOD)"
    done
}

render_template() { # render_template TEMPLATE OUTPUT
    local jwt_lines="# JWT: slurm-wlm-jwt-plugin is not installed, so slurmrestd and scontrol token are unavailable"
    if jwt_plugin_installed; then
        jwt_lines="AuthAltTypes=auth/jwt
AuthAltParameters=jwt_key=$JWT_KEY"
    fi
    local rendered
    rendered=$(<"$1")
    # Quoted: bash 5.2 (patsub_replacement) reads an unquoted '&' in a replacement as the matched text.
    rendered=${rendered//@STATE_DIR@/"$STATE_DIR"}
    rendered=${rendered//@CTLD_PORT@/"$CTLD_PORT"}
    rendered=${rendered//@SLURMD_PORTS@/"$SLURMD_PORT_FIRST-$SLURMD_PORT_LAST"}
    rendered=${rendered//@JWT_LINES@/"$jwt_lines"}
    printf '%s\n' "$rendered" >"$2.tmp"
    chmod 644 "$2.tmp"
    mv "$2.tmp" "$2"
}

write_config() {
    render_template "$TEMPLATE_DIR/slurm.conf.in" "$CONF"
    render_template "$TEMPLATE_DIR/gres.conf.in" "$STATE_DIR/conf/gres.conf"
    write_ports_file
}

STARTED_PIDS=()

start_munged() {
    munged_pid >/dev/null && return
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    munged --socket="$MUNGE_SOCKET" --key-file="$MUNGE_DIR/munge.key" --pid-file="$RUN_DIR/munged.pid" \
        --log-file="$LOG_DIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed" 9>&- ||
        start_failed "munged did not start" "$LOG_DIR/munged.log"
    wait_until 10 test -S "$MUNGE_SOCKET" || start_failed "munged created no socket" "$LOG_DIR/munged.log"
    STARTED_PIDS+=("munged:$(munged_pid)")
}

ctld_answers() { scontrol ping 2>/dev/null | grep -q 'is UP'; }

start_slurmctld() {
    slurmctld_pid >/dev/null && return
    require_port_free "$CTLD_PORT" slurmctld
    # -c: start without old jobs; a dev cluster starts clean.
    slurmctld -c -f "$CONF" 9>&- || start_failed "slurmctld did not start" "$LOG_DIR/slurmctld.log"
    wait_until 20 slurmctld_pid >/dev/null || start_failed "slurmctld exited" "$LOG_DIR/slurmctld.log"
    STARTED_PIDS+=("slurmctld:$(slurmctld_pid)")
    wait_until 20 ctld_answers || start_failed "slurmctld does not answer scontrol ping" "$LOG_DIR/slurmctld.log"
}

start_slurmd() {
    local node=$1 index=$2
    slurmd_pid "$node" >/dev/null && return
    require_port_free "$(slurmd_port "$index")" "slurmd $node"
    slurmd -f "$CONF" -N "$node" 9>&- || start_failed "slurmd $node did not start" "$LOG_DIR/slurmd-$node.log"
    wait_until 20 slurmd_pid "$node" >/dev/null || start_failed "slurmd $node exited" "$LOG_DIR/slurmd-$node.log"
    STARTED_PIDS+=("slurmd $node:$(slurmd_pid "$node")")
}

rest_answers() { (exec 3<>"/dev/tcp/127.0.0.1/$REST_PORT") 2>/dev/null; }

start_slurmrestd() {
    slurmrestd_pid >/dev/null && return
    command -v slurmrestd >/dev/null 2>&1 || [[ -x /usr/sbin/slurmrestd ]] ||
        die "slurmrestd is not installed; run make host (slurm/install-host.sh) as root"
    jwt_plugin_installed || die "the Slurm JWT plugin is not installed (package slurm-wlm-jwt-plugin); run make host"
    grep -q '^AuthAltTypes=auth/jwt' "$CONF" ||
        die "the running cluster was started without JWT auth; restart it: $0 stop && $0 start --rest"
    require_port_free "$REST_PORT" slurmrestd
    local group
    group=$(id -gn nobody)
    # slurmrestd refuses to run as root; it binds first, then becomes nobody. SLURM_JWT=daemon: it authenticates
    # each request with the caller's token instead of holding a key itself.
    SLURM_JWT=daemon setsid slurmrestd -f "$CONF" -u nobody -g "$group" -s "openapi/$REST_API" -a rest_auth/jwt \
        "127.0.0.1:$REST_PORT" </dev/null >>"$LOG_DIR/slurmrestd.log" 2>&1 9>&- &
    echo $! >"$RUN_DIR/slurmrestd.pid"
    wait_until 20 rest_answers || start_failed "slurmrestd does not accept connections on 127.0.0.1:$REST_PORT" \
        "$LOG_DIR/slurmrestd.log"
    STARTED_PIDS+=("slurmrestd:$(slurmrestd_pid)")
}

# On a failed start, stop what this invocation started (newest first) so no half cluster is left behind.
start_failed() {
    local message=$1 log=$2 entry
    echo "devcluster: error: $message" >&2
    log_tail "$log"
    for ((i = ${#STARTED_PIDS[@]} - 1; i >= 0; i--)); do
        entry=${STARTED_PIDS[i]}
        if [[ -n ${entry#*:} ]]; then stop_pid "${entry%%:*}" "${entry#*:}"; fi
    done
    echo "devcluster: all logs are in $LOG_DIR" >&2
    exit 1
}

nodes_up() {
    local states
    states=$(sinfo -h -N -p batch -o '%N %T' 2>/dev/null) || return 1
    [[ $(grep -cE ' (idle|mixed|allocated|completing)$' <<<"$states") -eq ${#NODES[@]} ]]
}

cmd_start() {
    local with_rest=$1
    require_root start
    require_packages
    # Unix socket paths are limited to 107 bytes.
    ((${#MUNGE_SOCKET} <= 100)) ||
        die "HPCLLM_DEVCLUSTER_DIR is too long for munged's socket path ($MUNGE_SOCKET); choose a shorter folder"
    require_plain_state_dir
    require_searchable_parents
    mkdir -p "$STATE_DIR"
    # fd 9 holds the lock; every daemon is started with 9>&- so it does not inherit (and hold) the lock.
    exec 9>>"$STATE_DIR/.lock"
    flock -w 120 9 || die "another devcluster.sh start/stop has held $STATE_DIR/.lock for 120 s"

    if all_core_running; then
        load_ports
        say "already running (state in $STATE_DIR)"
    else
        if any_core_running; then
            load_ports # partly up: keep its config, start the missing daemons
            say "partly running; starting the missing daemons"
        else
            rm -f "$PORTS_FILE"
            load_ports
            require_port_free "$CTLD_PORT" slurmctld
            local i
            for i in "${!NODES[@]}"; do require_port_free "$(slurmd_port "$i")" "slurmd ${NODES[i]}"; done
            ((with_rest)) && require_port_free "$REST_PORT" slurmrestd
            prepare_state_dir
            write_config
        fi
        start_munged
        start_slurmctld
        local i
        for i in "${!NODES[@]}"; do start_slurmd "${NODES[i]}" "$i"; done
        if ! wait_until "$START_TIMEOUT" nodes_up; then
            sinfo -N -p batch >&2 2>/dev/null || true
            start_failed "the ${#NODES[@]} nodes are not up after ${START_TIMEOUT}s" "$LOG_DIR/slurmctld.log"
        fi
        say "started: nodes ${NODES[*]} idle, slurmctld on port $CTLD_PORT, state in $STATE_DIR"
    fi
    if ((with_rest)); then
        start_slurmrestd
        say "slurmrestd: http://127.0.0.1:$REST_PORT (openapi/$REST_API; token: scontrol token)"
    fi
    echo "export SLURM_CONF=$CONF"
}

# ---------------------------------------------------------------- stop

active_jobs() { squeue -h -o '%A' 2>/dev/null; }
no_active_jobs() { [[ -z $(active_jobs) ]]; }

cancel_all_jobs() {
    local listed jobs
    listed=$(active_jobs) || return 0
    [[ -n $listed ]] || return 0
    mapfile -t jobs <<<"$listed"
    say "cancelling jobs: ${jobs[*]}"
    scancel "${jobs[@]}" 2>/dev/null || true
    # Jobs that trap SIGTERM get SIGKILL after KillWait; slurmds must outlive their jobs' steps.
    if ! wait_until "$STOP_TIMEOUT" no_active_jobs; then
        say "warning: jobs still active after ${STOP_TIMEOUT}s: $(active_jobs | paste -sd ' ')"
    fi
}

cmd_stop() {
    require_root stop
    if [[ ! -d $STATE_DIR ]]; then
        say "not running (no state in $STATE_DIR)"
        return 0
    fi
    exec 9>>"$STATE_DIR/.lock"
    flock -w 120 9 || die "another devcluster.sh start/stop has held $STATE_DIR/.lock for 120 s"
    local pid node stopped=0
    if slurmctld_pid >/dev/null; then cancel_all_jobs; fi
    for node in "${NODES[@]}"; do
        if pid=$(slurmd_pid "$node"); then stop_pid "slurmd $node" "$pid"; stopped=1; fi
    done
    if pid=$(slurmctld_pid); then stop_pid slurmctld "$pid"; stopped=1; fi
    if pid=$(slurmrestd_pid); then stop_pid slurmrestd "$pid"; stopped=1; fi
    if pid=$(munged_pid); then stop_pid munged "$pid"; stopped=1; fi
    rm -f "$RUN_DIR"/*.pid
    if ((stopped)); then say "stopped (state kept in $STATE_DIR)"; else say "not running"; fi
}

# ---------------------------------------------------------------- status

cmd_status() {
    local with_rest=$1 pid node up=1
    describe() { # describe NAME PID_OR_EMPTY DETAIL
        if [[ -n $2 ]]; then echo "  $1: running (pid $2)$3"; else echo "  $1: not running"; fi
    }
    if [[ -r $PORTS_FILE ]]; then load_ports; fi
    echo "dev cluster state dir: $STATE_DIR"
    pid=$(munged_pid) || up=0
    describe munged "$pid" ", socket $MUNGE_SOCKET"
    pid=$(slurmctld_pid) || up=0
    describe slurmctld "$pid" ", port ${CTLD_PORT:-?}"
    for node in "${NODES[@]}"; do
        pid=$(slurmd_pid "$node") || up=0
        describe "slurmd $node" "$pid" ""
    done
    if pid=$(slurmrestd_pid); then
        describe slurmrestd "$pid" ", http://127.0.0.1:$REST_PORT (openapi/$REST_API)"
    else
        echo "  slurmrestd: not running (start it with: $0 start --rest)"
        ((with_rest)) && up=0
    fi
    if ((up)); then
        echo "up"
        sinfo -N -p batch -o '%N %T %G' 2>/dev/null | sed 's/^/  /' || true
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    if any_core_running; then
        echo "down: only partly running (complete it with: $0 start, or clean up with: $0 stop)"
    else
        echo "down (start it with: $0 start)"
    fi
    return $EXIT_DOWN
}

main() {
    (($# >= 1)) || usage
    local command=$1 with_rest=0
    shift
    while (($#)); do
        case $1 in
        --rest) with_rest=1 ;;
        -h | --help) usage ;;
        *) die "unknown option '$1' (known: --rest)" ;;
        esac
        shift
    done
    case $command in
    start) cmd_start "$with_rest" ;;
    stop) cmd_stop ;;
    status) cmd_status "$with_rest" ;;
    -h | --help | help) usage ;;
    *) die "unknown command '$command' (use start, stop or status)" ;;
    esac
}

main "$@"
