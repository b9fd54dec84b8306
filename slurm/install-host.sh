#!/usr/bin/env bash
# Installs the Debian bookworm packages hpcllm needs on this host: Python 3.11 with venv (for `make venv`), curl
# (slurm/up.sh polls the services with it), Slurm 22.05 daemons and client, munge, OpenMPI with PMIx, slurmrestd
# with JWT auth, nginx and openssl (the gateway's TLS front door, conf/nginx/, with a self-signed certificate on
# the dev host), libpq5 (the PostgreSQL client library the venv's psycopg loads for a PostgreSQL registry or
# limits database). Idempotent: when every package is installed it only says so, for any user.
#
# Usage: slurm/install-host.sh [--test-tools]
#   --test-tools  also what `make test` needs beyond running hpcllm: shellcheck (the shell-script checks),
#                 postgresql (the registry tests against a real PostgreSQL server) and chromium (headless, the
#                 status page tests)
#
# The packages' daemons are NOT started by the install: the dev cluster (slurm/devcluster.sh) runs its own
# munged/slurmctld/slurmd with their own config, and the distribution's defaults would clash with it.
#
# Environment: HPCLLM_HOST_PACKAGES  space-separated package list replacing the default one (e.g. to add slurmdbd)
#              HPCLLM_POLICY_RC_D    the policy-rc.d written during the install (default /usr/sbin/policy-rc.d;
#                                    tests point it at a scratch file)
set -euo pipefail

readonly DEFAULT_PACKAGES="python3.11 python3.11-venv curl munge slurmctld slurmd slurm-client openmpi-bin libopenmpi-dev libpmix2 slurmrestd slurm-wlm-jwt-plugin nginx openssl libpq5"
readonly TEST_PACKAGES="shellcheck postgresql chromium"
readonly POLICY_RC_D=${HPCLLM_POLICY_RC_D:-/usr/sbin/policy-rc.d}
readonly POLICY_BACKUP=$POLICY_RC_D.hpcllm-saved
# The first lines of the policy-rc.d this script writes (recognised when an interrupted run left it behind).
readonly POLICY_HEADER='#!/bin/sh
# Written by hpcllm slurm/install-host.sh for the duration of an install.'

die() { echo "install-host: error: $*" >&2; exit 1; }
say() { echo "install-host: $*" >&2; }

read -r -a PACKAGES <<<"${HPCLLM_HOST_PACKAGES:-$DEFAULT_PACKAGES}"
((${#PACKAGES[@]})) || die "HPCLLM_HOST_PACKAGES is empty; unset it to install the default packages"
make_target=host # the make target that runs this script with these arguments (named in the hint for non-root)
while (($#)); do
    case $1 in
    --test-tools)
        read -r -a test_packages <<<"$TEST_PACKAGES"
        PACKAGES+=("${test_packages[@]}")
        make_target=test-host
        ;;
    *) die "unknown argument '$1' (usage: $0 [--test-tools])" ;;
    esac
    shift
done

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q '^install ok installed$'; }

missing_packages() {
    local package
    for package in "${PACKAGES[@]}"; do installed "$package" || echo "$package"; done
}

command -v dpkg-query >/dev/null 2>&1 || die "dpkg-query not found: this script supports Debian/Ubuntu (apt) hosts only"
mapfile -t MISSING < <(missing_packages)
if ((${#MISSING[@]} == 0)); then
    say "host packages already installed (${PACKAGES[*]})"
    exit 0
fi

[[ $EUID -eq 0 ]] || die "run as root: packages to install: ${MISSING[*]} (try: sudo make $make_target)"
command -v apt-get >/dev/null 2>&1 || die "apt-get not found: install these packages by hand: ${MISSING[*]}"

# policy-rc.d exiting 101 tells invoke-rc.d / deb-systemd-invoke not to start services during the install.
# Restore the previous state on every exit path, failure and interruption included.
restore_policy() {
    rm -f "$POLICY_RC_D"
    if [[ -e $POLICY_BACKUP ]]; then mv "$POLICY_BACKUP" "$POLICY_RC_D"; fi
}
ours() { [[ -f $POLICY_RC_D && $(head -n 2 "$POLICY_RC_D") == "$POLICY_HEADER" ]]; }
if [[ -e $POLICY_BACKUP ]] && ours; then
    say "an interrupted earlier run left its policy-rc.d; $POLICY_BACKUP (the original) will be restored"
elif [[ -e $POLICY_RC_D ]]; then
    mv "$POLICY_RC_D" "$POLICY_BACKUP"
fi
trap restore_policy EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
printf '%s\nexit 101\n' "$POLICY_HEADER" >"$POLICY_RC_D"
chmod 755 "$POLICY_RC_D"

export DEBIAN_FRONTEND=noninteractive
readonly APT_OPTS=(-q -o DPkg::Lock::Timeout=120)

say "installing: ${MISSING[*]}"
apt-get "${APT_OPTS[@]}" update ||
    die "apt-get update failed (see its output above), so nothing was installed; missing: ${MISSING[*]}; check the network and /etc/apt/sources.list*"

unavailable=()
for package in "${MISSING[@]}"; do
    candidate=$(apt-cache policy "$package" 2>/dev/null | awk '/Candidate:/ {print $2}')
    [[ -n $candidate && $candidate != "(none)" ]] || unavailable+=("$package")
done
((${#unavailable[@]} == 0)) ||
    die "package(s) not available from the configured apt sources: ${unavailable[*]} (hpcllm expects Debian bookworm)"

if ! apt-get "${APT_OPTS[@]}" install -y "${MISSING[@]}"; then
    mapfile -t STILL_MISSING < <(missing_packages)
    die "apt-get install failed; not installed: ${STILL_MISSING[*]:-none (a package setup script failed)} (see apt output above)"
fi

mapfile -t STILL_MISSING < <(missing_packages)
((${#STILL_MISSING[@]} == 0)) || die "after apt-get install these are still not installed: ${STILL_MISSING[*]}"
say "installed: ${MISSING[*]} (their services were not started; slurm/devcluster.sh runs its own daemons)"
