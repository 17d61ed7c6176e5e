#!/bin/sh
# SPDX-License-Identifier: GPL-2.0
#
# Build balloond_balloon.ko for one kernel without writing into the source
# tree: the sources (this directory and protocol/balloond_ext.h) are copied
# into OUTDIR/<release>/src and built there.  The build log goes to stderr;
# the path of the built module is the only line printed on stdout.
#
# usage: build.sh [-o OUTDIR] [-k KDIR] [-r ROOT] [RELEASE] [MAKE_VAR=value ...]
#   RELEASE   kernel release, e.g. 6.1.0-56-amd64 (default: uname -r);
#             KDIR defaults to /lib/modules/RELEASE/build
#   -k KDIR   kernel build directory (overrides RELEASE for the build,
#             RELEASE is then only the name of the output subdirectory)
#   -r ROOT   build inside this Debian root (chroot in a private mount
#             namespace; KDIR is then a path inside ROOT).  Default: the
#             guest kit's root for RELEASE when the host has no build tree
#             for it (7.x kernels, whose kbuild needs trixie's glibc and gcc:
#             <kit cache>/kernels/RELEASE/build-root, see
#             scripts/build-guest-kit.sh)
#   -o OUTDIR output root (default: $BALLOOND_BUILD_DIR or
#             ${XDG_CACHE_HOME:-$HOME/.cache}/balloond/guest-driver)
#   MAKE_VAR=value  passed to make, e.g. W=1 or BALLOOND_BALLOON_CORE=1
#
# Exit status is make's; 0 means the .ko exists.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
proto="$here/../protocol/balloond_ext.h"

outdir=${BALLOOND_BUILD_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/balloond/guest-driver}
kdir=
release=
root=

while [ $# -gt 0 ]; do
	case "$1" in
	-o) outdir=$2; shift 2 ;;
	-k) kdir=$2; shift 2 ;;
	-r) root=$2; shift 2 ;;
	-h|--help) sed -n '3,27p' "$0"; exit 0 ;;
	*=*) break ;;
	-*) echo "build.sh: unknown option $1" >&2; exit 2 ;;
	*) release=$1; shift ;;
	esac
done

[ -n "$release" ] || release=$(uname -r)
[ -n "$kdir" ] || kdir=/lib/modules/$release/build
if [ -z "$root" ] && [ ! -f "$kdir/Makefile" ]; then
	kit=${BALLOOND_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/balloond}/kernels/$release/build-root
	[ -d "$kit" ] && root=$(cd "$kit" && pwd -P)
fi

# In a root, KDIR is a path inside it (often an absolute symlink there).
if [ -n "$root" ]; then
	found=$(chroot "$root" /bin/sh -c 'test -f "$1/Makefile" && echo yes' sh "$kdir" || true)
else
	found=$([ -f "$kdir/Makefile" ] && echo yes || true)
fi
if [ "$found" != yes ]; then
	echo "build.sh: no kernel build tree at $kdir${root:+ in $root}" >&2
	exit 1
fi
if [ ! -f "$proto" ]; then
	echo "build.sh: $proto not found" >&2
	exit 1
fi

case "$outdir" in
/*) ;;
*) outdir=$(pwd)/$outdir ;;
esac

work="$outdir/$release"
src="$work/src/guest-driver"
rm -rf "$work/src"
mkdir -p "$src" "$work/src/protocol"
cp "$here"/Kbuild "$here"/Makefile "$here"/*.c "$here"/*.h "$src"/
cp "$proto" "$work/src/protocol/"

if [ -n "$root" ]; then
	# The work tree is bind-mounted at /build inside the root, in a mount
	# namespace of this command only: nothing stays mounted, and builds for
	# other layers or kernels can run at the same time.
	unshare --mount --propagation private -- /bin/sh -c '
		root=$1 work=$2 kdir=$3; shift 3
		mkdir -p "$root/build"
		mount --bind "$work" "$root/build" || exit 1
		mount -t proc proc "$root/proc" || exit 1
		exec chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
			LC_ALL=C.UTF-8 make -C "$kdir" M=/build/src/guest-driver "$@" modules' \
		build.sh "$root" "$work" "$kdir" "$@" >&2
else
	make -C "$kdir" M="$src" "$@" modules >&2
fi

ko="$src/balloond_balloon.ko"
[ -f "$ko" ] || { echo "build.sh: $ko was not produced" >&2; exit 1; }
echo "$ko"
