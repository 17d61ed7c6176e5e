# Shared helpers for the build scripts (sourced, not executed).
#
# Why a shared file: every script installs Debian packages on a machine where
# other tools may run apt at the same time, and all of them agree on one cache
# location.  Keeping that logic in one place keeps the scripts consistent.

# shellcheck shell=bash

BALLOOND_CACHE="${BALLOOND_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/balloond}"
export DEBIAN_FRONTEND=noninteractive

: "${LOG_TAG:=balloond}"
log() { printf '[%s] %s\n' "$LOG_TAG" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

require_root() {
    [ "$(id -u)" = 0 ] || die "run as root (this script installs Debian packages)"
}

# apt-get that waits for another package manager to finish instead of failing
# at once on the dpkg/apt locks.
apt_get() {
    local err
    err=$(mktemp)
    for _ in $(seq 1 90); do
        if apt-get -o DPkg::Lock::Timeout=600 "$@" 2> "$err"; then
            grep -v '^W: Download is performed unsandboxed' "$err" >&2 || true
            rm -f "$err"; return 0
        fi
        if ! grep -qE 'Could not get lock|Unable to acquire|Unable to lock' "$err"; then
            cat "$err" >&2; rm -f "$err"; return 1
        fi
        log "apt is busy (another package manager holds the lock); waiting"
        sleep 10
    done
    cat "$err" >&2; rm -f "$err"; return 1
}

# Run `apt-get update` at most once per script run.
APT_UPDATED=""
apt_update_once() {
    if [ -z "$APT_UPDATED" ]; then
        log "apt-get update"
        apt_get update -qq
        APT_UPDATED=1
    fi
}

# Install the given Debian packages if any of them is missing.
apt_install() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' \
            || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    apt_update_once
    log "installing Debian packages: ${missing[*]}"
    apt_get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# True if an apt source (deb, not deb-src) for the given suite is configured.
have_apt_suite() {  # $1 = suite, $2 = type (deb|deb-src)
    local suite="$1" type="${2:-deb}"
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        grep -Eq "^[[:space:]]*${type}[[:space:]].*[[:space:]]${suite}([[:space:]]|$)" "$f" && return 0
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        # deb822: a stanza with Types containing $type and Suites containing $suite
        awk -v t="$type" -v s="$suite" '
            BEGIN { RS=""; FS="\n" }
            {
                ty=0; su=0; en=1
                for (i=1;i<=NF;i++) {
                    if ($i ~ /^Types:/)   { n=split(substr($i,7),a," "); for(j=1;j<=n;j++) if(a[j]==t) ty=1 }
                    if ($i ~ /^Suites:/)  { n=split(substr($i,8),a," "); for(j=1;j<=n;j++) if(a[j]==s) su=1 }
                    if ($i ~ /^Enabled:[[:space:]]*no/) en=0
                }
                if (ty && su && en) { found=1 }
            }
            END { exit !found }' "$f" && return 0
    done
    return 1
}

# Add a Debian suite as a separate deb822 sources file (idempotent).
add_apt_suite() {  # $1 = suite, $2 = type (deb|deb-src)
    local suite="$1" type="${2:-deb}"
    have_apt_suite "$suite" "$type" && return 1
    local f="/etc/apt/sources.list.d/balloond-$suite-$type.sources"
    log "adding apt source: $type $suite ($f)"
    cat > "$f" <<EOF
# Added by balloond's build scripts.
Types: $type
URIs: http://deb.debian.org/debian
Suites: $suite
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    APT_UPDATED=""
    return 0
}

# Run a long command in the background, printing a heartbeat with the last
# line of its log every 30 s so the user sees progress.
run_with_heartbeat() {  # $1 = log file, rest = command
    local logf="$1"; shift
    "$@" > "$logf" 2>&1 &
    local pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        sleep 30
        kill -0 "$pid" 2>/dev/null && log "  ... $(tail -n1 "$logf" | cut -c1-70)"
    done
    if ! wait "$pid"; then
        tail -n 40 "$logf" >&2
        return 1
    fi
}
