"""The guest driver packaged for DKMS, the way Debian users install
out-of-tree modules: ``dkms add``, ``dkms build`` and ``dkms install`` on the
real 7.3 headers in the guest kit's trixie root, then the installed module
boots in a 7.3 guest and runs the balloon.

The root is the kit's cached one, seen through an overlay in a private mount
namespace: whatever DKMS writes (/usr/src, /var/lib/dkms, /lib/modules) lands
in the test's tmp_path and never in the cache.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from harness import VhostUserBalloon, find_kernel
from tests.e2e.waiting import MIB, wait_for

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parents[2]
SERIES = "7.3"

SCRIPT = r"""
set -eu
root=$1 top=$2 rel=$3 repo=$4
mkdir -p "$top/upper" "$top/work" "$top/merged" "$top/out"
mount -t overlay overlay -o "lowerdir=$root,upperdir=$top/upper,workdir=$top/work" "$top/merged"
m=$top/merged
mount -t proc proc "$m/proc"
make -s -C "$repo/guest-driver" dkms-src DESTDIR="$m"
ver=$(sed -n 's/^PACKAGE_VERSION="\(.*\)"/\1/p' "$repo/guest-driver/dkms.conf")
inroot() { chroot "$m" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LC_ALL=C.UTF-8 "$@"; }
inroot dkms add "balloond-balloon/$ver"
inroot dkms build "balloond-balloon/$ver" -k "$rel"
inroot dkms install "balloond-balloon/$ver" -k "$rel"
inroot dkms status "balloond-balloon/$ver" -k "$rel"
for f in "$m/lib/modules/$rel/updates/dkms"/balloond_balloon.ko*; do
    [ -e "$f" ] || continue
    cp "$f" "$top/out/"
    echo "VERMAGIC: $(inroot modinfo -F vermagic "${f#"$m"}")"
done
"""


def dkms_install(tmp_path: Path) -> tuple[str, Path]:
    k = find_kernel(SERIES)
    assert k.build_root is not None, f"the kit has no build root for {k.release}"
    top = tmp_path / "dkms"
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", SCRIPT, "dkms-test",
         str(k.build_root), str(top), k.release, str(REPO)],
        capture_output=True, text=True, timeout=900,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"dkms failed on {k.release}:\n{log[-4000:]}"
    assert re.search(rf"balloond-balloon/\S+, {re.escape(k.release)}, x86_64: installed", log), log[-2000:]
    assert re.search(rf"^VERMAGIC: {re.escape(k.release)} ", log, re.M), log[-2000:]
    built = list((top / "out").glob("balloond_balloon.ko*"))
    assert len(built) == 1, f"dkms installed no module: {log[-2000:]}"
    return log, built[0]


def test_dkms_builds_and_installs_on_the_7_3_tree_and_the_module_runs(make_vm, daemon, tmp_path):
    log, ko = dkms_install(tmp_path)
    release = find_kernel(SERIES).release
    vm = make_vm(SERIES, memory_mib=512, balloon=VhostUserBalloon(daemon.sockets["guest"]), modules=[ko])
    assert vm.sh("uname -r").strip() == release
    vm.sh("insmod /lib/modules/balloond_balloon.ko")
    stats = dict(re.findall(r"^(\w+): (\S+)$", vm.sh("cat /sys/kernel/debug/balloond/stats"), re.M))
    assert stats["page_layer"] == "balloon-core"
    wait_for("the driver to start the device", lambda: daemon.api.vm("guest")["running"])
    daemon.api.set_target("guest", 32 * MIB)
    wait_for("the DKMS-built driver to fill the balloon",
             lambda: (v := daemon.api.vm("guest"))["actual_bytes"] == 32 * MIB and v["ballooned_bytes"] == 32 * MIB)
