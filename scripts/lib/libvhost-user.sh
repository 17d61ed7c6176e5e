#!/usr/bin/env bash
# Build libvhost-user.so, QEMU's own C library for vhost-user backends, from
# the very QEMU source tarball scripts/build-qemu.sh builds QEMU from, for
# `balloond --engine libvhost-user`.
#
# Why build it: QEMU ships the library only as a static archive inside its
# tree (no distribution or PyPI package carries a shared object), and its
# structs are no stable ABI. So the library and a layout probe are compiled
# here from the same headers: the probe prints the size of every struct and
# the offset of every field the ctypes binding declares, and the daemon
# refuses to load a library whose layout.json disagrees with its own.
#
# Result: $BALLOOND_CACHE/libvhost-user-<qemu version>-<key>/ holding
# libvhost-user.so and layout.json, and a "libvhost-user-current" symlink to
# it (the daemon's default; BALLOOND_LIBVHOST_USER names another directory).
# The key hashes the tarball's name, this script and the probe's source, so
# a new QEMU source or probe rebuilds. A second run is a no-op.
#
# Usable as `bash scripts/lib/libvhost-user.sh` (setup.sh does this).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export LOG_TAG=libvhost-user
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$REPO_ROOT/scripts/lib/common.sh"
CACHE="$BALLOOND_CACHE"
PROBE_SRC="$REPO_ROOT/balloond/engine/libvhost_user/layout_probe.c"
SELF="$REPO_ROOT/scripts/lib/libvhost-user.sh"

command -v gcc >/dev/null || die "gcc is needed (scripts/setup.sh installs it)"

# The QEMU build says which upstream version it built; its tarball is cached
# beside it (sid for >= 10.2, bookworm-backports for the fallback).
QEMU_ENV="$CACHE/qemu-current/qemu.env"
[ -f "$QEMU_ENV" ] || die "no QEMU build found ($QEMU_ENV); run scripts/build-qemu.sh first"
VARIANT=$(sed -n 's/^QEMU_VARIANT=//p' "$QEMU_ENV")
case "$VARIANT" in
    10.0-fallback) SRC_DIR="$CACHE/qemu-src/bpo"; PATTERN='qemu_10.0*.orig.tar.*' ;;
    *) SRC_DIR="$CACHE/qemu-src/sid"; PATTERN="qemu_${VARIANT}*.orig.tar.*" ;;
esac
ORIG=$(find "$SRC_DIR" -maxdepth 1 -name "$PATTERN" 2>/dev/null | LC_ALL=C sort | tail -n1)
if [ -z "$ORIG" ]; then
    # QEMU came from a cache without its source: fetch the same version again.
    [ "$VARIANT" != 10.0-fallback ] || die "QEMU source tarball missing in $SRC_DIR"
    require_root
    add_apt_suite sid deb-src || true
    apt_update_once
    VER=$(apt-cache showsrc qemu 2>/dev/null | awk '/^Version:/{print $2}' | grep -F ":$VARIANT+" | sort -V | tail -n1 || true)
    [ -n "$VER" ] || die "no qemu $VARIANT source package found"
    mkdir -p "$SRC_DIR"
    log "downloading source qemu=$VER"
    (cd "$SRC_DIR" && apt_get -o APT::Sandbox::User=root source -qq --download-only "qemu=$VER") >&2 \
        || log "apt-get source reported errors; checking for the orig tarball"
    ORIG=$(find "$SRC_DIR" -maxdepth 1 -name "$PATTERN" | LC_ALL=C sort | tail -n1)
    [ -n "$ORIG" ] || die "could not fetch the QEMU $VARIANT source tarball"
fi

KEY=$( (basename "$ORIG"; sha256sum < "$SELF"; sha256sum < "$PROBE_SRC") | sha256sum | cut -c1-12)
OUT="$CACHE/libvhost-user-${VARIANT%%-*}-$KEY"
if [ -f "$OUT/.stamp" ] && [ -f "$OUT/libvhost-user.so" ] && [ -s "$OUT/layout.json" ] \
   && [ -z "${BALLOOND_LIBVHOST_USER_REBUILD:-}" ]; then
    ln -sfn "$(basename "$OUT")" "$CACHE/libvhost-user-current"
    log "cached: $OUT/libvhost-user.so; nothing to do"
    exit 0
fi

WORK=$(mktemp -d "$CACHE/libvhost-user-build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
log "extracting libvhost-user and its headers from $(basename "$ORIG")"
tar -xf "$ORIG" -C "$WORK" --strip-components=1 --wildcards \
    '*/subprojects/libvhost-user/*' '*/include/qemu/atomic.h' '*/include/qemu/compiler.h' \
    '*/include/standard-headers/*'
LIBDIR="$WORK/subprojects/libvhost-user"
[ -f "$LIBDIR/libvhost-user.c" ] || die "$(basename "$ORIG") has no subprojects/libvhost-user/libvhost-user.c"

log "compiling libvhost-user.so and the layout probe"
gcc -O2 -shared -fPIC -D_GNU_SOURCE -pthread -I"$LIBDIR" \
    -o "$WORK/libvhost-user.so" "$LIBDIR/libvhost-user.c"
gcc -O2 -D_GNU_SOURCE -I"$LIBDIR" -o "$WORK/layout-probe" "$PROBE_SRC"
"$WORK/layout-probe" > "$WORK/layout.json"

rm -rf "$OUT"
mkdir -p "$OUT"
install -m 0644 "$WORK/libvhost-user.so" "$WORK/layout.json" "$OUT/"
echo "$(basename "$ORIG")" > "$OUT/.stamp"
ln -sfn "$(basename "$OUT")" "$CACHE/libvhost-user-current"
log "done: $OUT/libvhost-user.so ($(stat -c %s "$OUT/libvhost-user.so") bytes)"
