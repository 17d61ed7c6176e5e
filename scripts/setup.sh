#!/usr/bin/env bash
# One entry point that prepares a Debian 12 machine (as root) for balloond's
# end-to-end tests, demo and benchmarks:
#   1. Debian packages needed at run and test time,
#   2. the QEMU build with the generic vhost-user device (scripts/build-qemu.sh),
#      and libvhost-user.so from its source (scripts/lib/libvhost-user.sh),
#   3. the guest kernels, headers and busybox, and the trixie root in which
#      modules for the 7.x guest kernel are built (scripts/build-guest-kit.sh),
#   4. the Python package the harness uses for QMP (qemu.qmp),
#   5. the static guest tool, compiled once as a check,
#   6. libvirt (daemon, virsh, the Python binding) for the libvirt tests.
# Idempotent: everything is cached; a second run only verifies.
#
# Environment: PYTHON (default python3) is the interpreter the tests use
# (e.g. a virtualenv's python).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export LOG_TAG=setup
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
. "$REPO_ROOT/scripts/lib/common.sh"
# shellcheck source-path=SCRIPTDIR source=lib/libvirt.sh
. "$REPO_ROOT/scripts/lib/libvirt.sh"
require_root
PYTHON="${PYTHON:-python3}"

step() { log "== $* =="; }
T0=$(date +%s)

step "1/6 Debian packages"
apt_install busybox-static qemu-system-data seabios gcc libc6-dev make kmod \
    xz-utils dwarves python3 python3-venv systemd

step "2/6 QEMU with vhost-user balloon support"
bash "$REPO_ROOT/scripts/build-qemu.sh"
# libvhost-user.so from the same QEMU source, for --engine libvhost-user.
bash "$REPO_ROOT/scripts/lib/libvhost-user.sh"

step "3/6 guest kernels, headers, build root, busybox"
bash "$REPO_ROOT/scripts/build-guest-kit.sh"

step "4/6 Python packages for the harness ($PYTHON)"
if "$PYTHON" -c 'import qemu.qmp' 2>/dev/null; then
    log "qemu.qmp already installed"
else
    log "pip install qemu.qmp"
    if ! out=$("$PYTHON" -m pip install -q qemu.qmp 2>&1); then
        if grep -q externally-managed <<<"$out"; then
            # Debian's own python3 refuses pip installs (PEP 668); this is a
            # dedicated test machine, so install beside Debian's packages.
            log "$PYTHON is externally managed; retrying with --break-system-packages"
            "$PYTHON" -m pip install -q --break-system-packages qemu.qmp
        else
            printf '%s\n' "$out" >&2
            die "pip install qemu.qmp failed"
        fi
    fi
fi

step "5/6 guest tool"
(cd "$REPO_ROOT" && "$PYTHON" -c '
from harness.guesttool import guesttool_binary
from harness.qemu import find_qemu
from harness.guest import available_kernels
q = find_qemu(require_vhost_user=True)
print("[setup] qemu:", q.binary, "|", q.version, "| generic device:", q.generic_device)
for k in available_kernels():
    print("[setup] kernel", k.series, k.release, "headers:", k.headers_dir)
print("[setup] guest tool:", guesttool_binary())
')
step "6/6 libvirt"
ensure_libvirt "$PYTHON"
log "ready in $(( $(date +%s) - T0 ))s"
