# A minimal Debian trixie root, for building kernel modules against guest
# kernels whose build tools the host cannot run (sourced, not executed).
#
# Why: the headers of Debian's 7.x kernels (trixie-backports) come with a
# linux-kbuild whose programs need glibc >= 2.38 and gcc-14; the host is
# Debian 12 (glibc 2.36, gcc-12).  Rather than upgrade the host, the setup
# makes a trixie root with mmdebstrap (from Debian's own packages) and builds
# inside it with chroot in a private mount namespace.  The root has its own
# apt configuration (trixie and trixie-backports), so nothing of trixie ever
# reaches the host's apt sources or packages.
#
# The root is cached under $BALLOOND_CACHE/build-roots/, named after a hash
# of everything that determines it (suites, mirror, variant, package list);
# kernel headers are added to it per release by scripts/build-guest-kit.sh.

# shellcheck shell=bash

BUILD_ROOT_SUITE=trixie
BUILD_ROOT_MIRROR=http://deb.debian.org/debian
BUILD_ROOT_VARIANT=minbase
# gcc-14/make/libc6-dev: kbuild; dwarves: BTF for modules (the 7.x headers
# carry vmlinux); kmod/xz-utils: depmod and compressed modules; dkms: the
# packaged driver is tested the way users install it (openssl: its module
# signing key, as on a user's machine).
BUILD_ROOT_PACKAGES="gcc-14,make,libc6-dev,dwarves,kmod,xz-utils,dkms,openssl"
BUILD_ROOT_SOURCES=(
    "deb $BUILD_ROOT_MIRROR $BUILD_ROOT_SUITE main"
    "deb $BUILD_ROOT_MIRROR $BUILD_ROOT_SUITE-backports main"
)

build_root_key() {
    printf '%s\n' "v1" "$BUILD_ROOT_SUITE" "$BUILD_ROOT_VARIANT" "$BUILD_ROOT_PACKAGES" \
        "${BUILD_ROOT_SOURCES[@]}" | sha256sum | cut -c1-12
}

build_root_path() {
    printf '%s/build-roots/%s-%s\n' "$BALLOOND_CACHE" "$BUILD_ROOT_SUITE" "$(build_root_key)"
}

# Run a command inside the root: a private mount namespace (nothing mounted
# outlives the command) with /proc and the host's current resolv.conf (the
# root's copy is from the day it was made), then chroot.
build_root_run() {  # $1 = root, rest = command
    local root="$1"; shift
    unshare --mount --propagation private -- /bin/sh -c '
        root=$1; shift
        mount -t proc proc "$root/proc" || exit 1
        if [ -f /etc/resolv.conf ]; then
            [ -f "$root/etc/resolv.conf" ] || : > "$root/etc/resolv.conf"
            mount --bind /etc/resolv.conf "$root/etc/resolv.conf" || exit 1
        fi
        exec chroot "$root" "$@"' build-root "$root" \
        /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LC_ALL=C.UTF-8 \
        DEBIAN_FRONTEND=noninteractive "$@"
}

# Make (once) and print the path of the root.
build_root_ensure() {
    local root
    root=$(build_root_path)
    if [ -f "$root/.stamp" ]; then
        log "build root $BUILD_ROOT_SUITE: cached ($root)"
        printf '%s\n' "$root"
        return 0
    fi
    apt_install mmdebstrap
    mkdir -p "$(dirname "$root")"
    local tmp="$root.tmp.$$"
    rm -rf "$tmp" "$root"
    log "build root $BUILD_ROOT_SUITE: mmdebstrap ($BUILD_ROOT_PACKAGES)"
    # The apt lists are kept: kernels and headers are picked from them later.
    if ! mmdebstrap --quiet --variant="$BUILD_ROOT_VARIANT" --include="$BUILD_ROOT_PACKAGES" \
            --skip=cleanup/apt/lists "$BUILD_ROOT_SUITE" "$tmp" "${BUILD_ROOT_SOURCES[@]}" >&2; then
        rm -rf "$tmp"
        die "mmdebstrap of $BUILD_ROOT_SUITE failed"
    fi
    # Where guest-driver/build.sh bind-mounts the tree it builds.
    mkdir -p "$tmp/build"
    date -u +%FT%TZ > "$tmp/.stamp"
    mv "$tmp" "$root"
    # A root made for another key (older package list) is not used again.
    local old
    for old in "$(dirname "$root")/$BUILD_ROOT_SUITE"-*; do
        [ -d "$old" ] && [ "$old" != "$root" ] && case "$old" in *.tmp.*) ;; *)
            log "build root: removing the outdated $old"; rm -rf "$old" ;; esac
    done
    printf '%s\n' "$root"
}
