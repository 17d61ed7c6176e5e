#!/usr/bin/env bash
# Build a QEMU that can attach a vhost-user virtio-balloon backend.
#
# Why: the generic vhost-user device that lets QEMU hand a whole virtio
# device (here virtio-id 5, the balloon) to a vhost-user backend is only
# user-creatable from QEMU 10.2 on ("vhost-user-test-device-pci").  Debian 12
# ships 10.0, which refuses it.  So we build Debian sid's 10.2.2 source
# (deb-src only: no sid binaries are ever installed).  If that source cannot
# be had, we fall back to bookworm-backports' 10.0.x source with a small local
# change making the older "vhost-user-device-pci" user-creatable.
#
# Only qemu-system-x86_64 is kept.  Firmware and option ROMs come from
# Debian's qemu-system-data and seabios packages at run time
# (-L /usr/share/qemu -L /usr/share/seabios).
#
# Patches: every qemu-patches/*.patch in this repository is applied in name
# order (patch -p1).  Their hash is part of the cache key, so adding, changing
# or removing a patch triggers a rebuild.
#
# Result: $BALLOOND_CACHE/qemu-<version>[-<patchhash>]/bin/qemu-system-x86_64
# plus a "current" symlink and qemu.env describing it.  A second run is a no-op.
#
# Environment:
#   XDG_CACHE_HOME / BALLOOND_CACHE  cache location (default ~/.cache/balloond)
#   QEMU_SID_VERSION                 Debian source version to build
#   BALLOOND_QEMU_FORCE_FALLBACK=1   skip sid and use the backports fallback
#   BALLOOND_QEMU_REBUILD=1          ignore the stamp and rebuild
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export LOG_TAG=build-qemu
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
. "$REPO_ROOT/scripts/lib/common.sh"
CACHE="$BALLOOND_CACHE"
SID_VERSION="${QEMU_SID_VERSION:-1:10.2.2+ds-1}"
PATCH_DIR="$REPO_ROOT/qemu-patches"
JOBS="$(nproc)"

require_root

# ---------------------------------------------------------------- cache key
patch_hash() {
    # Stable hash of the patch set (names and contents); "none" when empty.
    local files
    files=$(find "$PATCH_DIR" -maxdepth 1 -name '*.patch' 2>/dev/null | LC_ALL=C sort || true)
    if [ -z "$files" ]; then echo none; return; fi
    # shellcheck disable=SC2086
    (for f in $files; do basename "$f"; sha256sum < "$f"; done) | sha256sum | cut -c1-12
}
PHASH="$(patch_hash)"

prefix_for() {  # $1 = upstream version, e.g. 10.2.2
    if [ "$PHASH" = none ]; then echo "$CACHE/qemu-$1"; else echo "$CACHE/qemu-$1-p$PHASH"; fi
}

# Libraries the binary links against and the firmware it loads at run time.
RUNTIME_DEPS=(qemu-system-data seabios libglib2.0-0 libfdt1 libpixman-1-0 libslirp0 zlib1g)

already_cached() {
    [ -z "${BALLOOND_QEMU_REBUILD:-}" ] || return 1
    local p
    for p in "$CACHE"/qemu-[0-9]*/; do
        p="${p%/}"
        if [ ! -f "$p/.stamp" ] || [ ! -x "$p/bin/qemu-system-x86_64" ] || [ ! -f "$p/qemu.env" ]; then
            continue
        fi
        grep -qx "QEMU_PATCH_HASH=$PHASH" "$p/qemu.env" || continue
        "$p/bin/qemu-system-x86_64" --version >/dev/null 2>&1 || continue
        ln -sfn "$(basename "$p")" "$CACHE/qemu-current"
        log "cached: $p/bin/qemu-system-x86_64 (patch set: $PHASH); nothing to do"
        return 0
    done
    return 1
}
mkdir -p "$CACHE"
apt_install "${RUNTIME_DEPS[@]}"
if already_cached; then exit 0; fi

# ---------------------------------------------------------------- packages
BUILD_DEPS=(build-essential pkg-config python3 python3-venv
    libglib2.0-dev libfdt-dev libpixman-1-dev libslirp-dev zlib1g-dev
    ninja-build flex bison device-tree-compiler dpkg-dev patch xz-utils bzip2
    qemu-system-data seabios)
apt_install "${BUILD_DEPS[@]}"

# A private venv with a new enough meson (QEMU 10.2 needs >= 1.5; bookworm has 1.0).
VENV="$CACHE/build-venv"
if ! "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
    log "creating build venv $VENV"
    /usr/bin/python3 -m venv "$VENV"
fi
# QEMU's configure runs offline; it also wants pycotap (test output helper),
# which the Debian-repacked tarball does not carry as a wheel.
if ! "$VENV/bin/meson" --version 2>/dev/null | awk -F. '{exit !($1>1 || ($1==1 && $2>=5))}' \
   || ! "$VENV/bin/python" -c 'import pycotap' 2>/dev/null; then
    log "installing meson >= 1.5 and pycotap from PyPI into the build venv"
    "$VENV/bin/pip" install -q --upgrade 'meson>=1.5,<2' 'pycotap>=1.1.0'
fi
log "meson $("$VENV/bin/meson" --version)"

# ---------------------------------------------------------------- sources
SRC_WORK="$CACHE/qemu-src"
mkdir -p "$SRC_WORK"

fetch_source() {  # $1 = dir, $2 = pkg=version ; prints orig tarball path
    local dir="$1" spec="$2" up
    mkdir -p "$dir"
    up="${spec#*=}"; up="${up#*:}"; up="${up%-*}"      # 1:10.2.2+ds-1 -> 10.2.2+ds
    local orig
    orig=$(find "$dir" -maxdepth 1 -name "qemu_$up.orig.tar.*" | head -n1)
    if [ -z "$orig" ]; then
        log "downloading source $spec (apt-get source --download-only)"
        # Only the upstream (orig) tarball is used; a mirror missing the
        # Debian packaging files (.dsc, debian.tar) is tolerated.
        (cd "$dir" && apt_get -o APT::Sandbox::User=root source -qq --download-only "$spec") >&2 \
            || log "apt-get source reported errors; checking for the orig tarball"
        orig=$(find "$dir" -maxdepth 1 -name "qemu_$up.orig.tar.*" | head -n1)
    fi
    [ -n "$orig" ] || return 1
    echo "$orig"
}

unpack() {  # $1 = tarball, $2 = dest
    rm -rf "$2"; mkdir -p "$2"
    log "unpacking $(basename "$1")"
    tar -xf "$1" -C "$2" --strip-components=1
}

apply_repo_patches() {  # $1 = src dir
    local p
    for p in $(find "$PATCH_DIR" -maxdepth 1 -name '*.patch' 2>/dev/null | LC_ALL=C sort); do
        log "applying $(basename "$p")"
        patch -d "$1" -p1 --forward --batch < "$p"
    done
}

upstream_of() {  # 1:10.2.2+ds-1 -> 10.2.2
    local v="${1#*:}"; v="${v%-*}"; echo "${v%%+*}"
}

VARIANT=""
SRC=""
if [ -z "${BALLOOND_QEMU_FORCE_FALLBACK:-}" ]; then
    add_apt_suite sid deb-src || true
    apt_update_once
    # The pinned version first; if sid has moved on, its newest >= 10.2.
    CANDIDATES=("$SID_VERSION")
    NEWEST=$(apt-cache showsrc qemu 2>/dev/null | awk '/^Version:/{print $2}' | sort -V | tail -n1 || true)
    if [ -n "$NEWEST" ] && [ "$NEWEST" != "$SID_VERSION" ] \
       && dpkg --compare-versions "$NEWEST" ge 1:10.2; then
        CANDIDATES+=("$NEWEST")
    fi
    for ver in "${CANDIDATES[@]}"; do
        if ORIG=$(fetch_source "$SRC_WORK/sid" "qemu=$ver"); then
            VARIANT=$(upstream_of "$ver")
            SRC="$SRC_WORK/sid/build-src"
            unpack "$ORIG" "$SRC"
            break
        fi
        log "could not fetch qemu=$ver source"
    done
    [ -n "$VARIANT" ] || log "no QEMU >= 10.2 source available; trying the bookworm-backports fallback"
fi
if [ -z "$VARIANT" ]; then
    add_apt_suite bookworm-backports deb-src || true
    apt_update_once
    BPO_VER=$(apt-cache showsrc qemu 2>/dev/null | awk '/^Version: 1:10\.0\./{print $2}' | sort -V | tail -n1)
    [ -n "$BPO_VER" ] || die "no QEMU 10.x source found in sid or bookworm-backports"
    ORIG=$(fetch_source "$SRC_WORK/bpo" "qemu=$BPO_VER") || die "cannot download qemu=$BPO_VER source"
    VARIANT=10.0-fallback
    SRC="$SRC_WORK/bpo/build-src"
    unpack "$ORIG" "$SRC"
    log "fallback: making vhost-user-device(-pci) user-creatable"
    for f in hw/virtio/vhost-user-device.c hw/virtio/vhost-user-device-pci.c; do
        grep -q 'user_creatable = false' "$SRC/$f" || die "$f: expected 'user_creatable = false' not found"
        sed -i 's/user_creatable = false/user_creatable = true/' "$SRC/$f"
    done
fi
PREFIX="$(prefix_for "$VARIANT")"

# The +ds tarball carries no firmware blobs: don't try to unpack EDK2 images.
# (meson.build sets it to false, then to bzip2.found() per EDK2 target.)
sed -i -E 's/^([[:space:]]*unpack_edk2_blobs[[:space:]]*=).*/\1 false/' "$SRC/meson.build"
if grep -E '^[[:space:]]*unpack_edk2_blobs[[:space:]]*=' "$SRC/meson.build" | grep -vq 'false'; then
    die "could not disable unpack_edk2_blobs in meson.build"
fi
apply_repo_patches "$SRC"

# ---------------------------------------------------------------- build
BUILD="$SRC/build"
mkdir -p "$BUILD"
log "configuring QEMU $VARIANT (x86_64-softmmu only)"
START=$(date +%s)
(
    cd "$BUILD"
    export PATH="$VENV/bin:$PATH"
    ../configure --prefix="$PREFIX" --python="$VENV/bin/python3" \
        --target-list=x86_64-softmmu --without-default-features \
        --enable-kvm --enable-tcg --enable-vhost-user --enable-slirp \
        --enable-fdt=system --disable-docs --disable-install-blobs \
        > "$BUILD/configure.log" 2>&1 || { tail -n 40 "$BUILD/configure.log" >&2; exit 1; }
    log "compiling with ninja -j$JOBS (about 3-6 minutes on 2 cores; log: $BUILD/ninja.log)"
    run_with_heartbeat "$BUILD/ninja.log" ninja -j"$JOBS" qemu-system-x86_64
)
log "build took $(( $(date +%s) - START ))s"

rm -rf "$PREFIX"
mkdir -p "$PREFIX/bin"
install -s -m 0755 "$BUILD/qemu-system-x86_64" "$PREFIX/bin/qemu-system-x86_64"
# Module-less build (no --enable-modules), so the binary is self-contained
# apart from shared libraries from Debian packages installed above.
if ldd "$PREFIX/bin/qemu-system-x86_64" | grep -q 'not found'; then
    ldd "$PREFIX/bin/qemu-system-x86_64" >&2
    die "built binary has unresolved libraries"
fi
GENERIC=$("$PREFIX/bin/qemu-system-x86_64" -device help 2>/dev/null \
    | grep -oE '"vhost-user-(test-)?device-pci"' | tr -d '"' | head -n1 || true)
[ -n "$GENERIC" ] || die "built QEMU offers no generic vhost-user device"
{
    echo "QEMU_BIN=$PREFIX/bin/qemu-system-x86_64"
    echo "QEMU_VARIANT=$VARIANT"
    echo "QEMU_GENERIC_DEVICE=$GENERIC"
    echo "QEMU_PATCH_HASH=$PHASH"
} > "$PREFIX/qemu.env"
"$PREFIX/bin/qemu-system-x86_64" --version | head -n1 > "$PREFIX/.stamp"
ln -sfn "$(basename "$PREFIX")" "$CACHE/qemu-current"
log "done: $PREFIX/bin/qemu-system-x86_64 (generic device: $GENERIC)"
log "removing the unpacked source tree to save disk (the tarball stays cached)"
rm -rf "$SRC"
