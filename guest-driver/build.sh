#!/bin/sh
# SPDX-License-Identifier: GPL-2.0
#
# Build balloond_balloon.ko for one kernel without writing into the source
# tree: the sources (this directory and protocol/balloond_ext.h) are copied
# into OUTDIR/<release>/src and built there.  The build log goes to stderr;
# the path of the built module is the only line printed on stdout.
#
# usage: build.sh [-o OUTDIR] [-k KDIR] [RELEASE] [MAKE_VAR=value ...]
#   RELEASE   kernel release, e.g. 6.1.0-56-amd64 (default: uname -r);
#             KDIR defaults to /lib/modules/RELEASE/build
#   -k KDIR   kernel build directory (overrides RELEASE for the build,
#             RELEASE is then only the name of the output subdirectory)
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

while [ $# -gt 0 ]; do
	case "$1" in
	-o) outdir=$2; shift 2 ;;
	-k) kdir=$2; shift 2 ;;
	-h|--help) sed -n '3,21p' "$0"; exit 0 ;;
	*=*) break ;;
	-*) echo "build.sh: unknown option $1" >&2; exit 2 ;;
	*) release=$1; shift ;;
	esac
done

[ -n "$release" ] || release=$(uname -r)
[ -n "$kdir" ] || kdir=/lib/modules/$release/build

if [ ! -f "$kdir/Makefile" ]; then
	echo "build.sh: no kernel build tree at $kdir" >&2
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

make -C "$kdir" M="$src" "$@" modules >&2

ko="$src/balloond_balloon.ko"
[ -f "$ko" ] || { echo "build.sh: $ko was not produced" >&2; exit 1; }
echo "$ko"
