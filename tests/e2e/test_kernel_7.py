"""What Linux 7.3's stock virtio_balloon can send, against what protocol/
knows.

7.3 (trixie-backports) reworked the balloon core, but the device interface
the driver speaks is unchanged from 6.12: the uapi header has the same
feature bits, the same 16-byte config and the same 16 statistics tags
(0..15, "swap-in" .. "direct-reclaims"), and the driver asks for its queues
in the same order (inflate, deflate, then stats, free page hint and
reporting when negotiated).  These tests keep it so: the first reads the
header of the 7.3 kernel the kit carries (so a newer 7.x with a new tag,
feature or config field fails here first), the second checks that every
statistic a real 7.3 guest sends is decoded by name, none as an unknown
``tag<N>``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from harness import VhostUserBalloon, find_kernel
from protocol import balloon
from tests.e2e.conftest import ENGINES
from tests.e2e.waiting import wait_for

pytestmark = pytest.mark.vm

SERIES = "7.3"
#: The statistics a 7.3 guest sends reach the device through either engine.
E2E_ENGINES = ENGINES


def uapi_header() -> str:
    k = find_kernel(SERIES)
    assert k.build_root is not None and k.headers_dir is not None
    # Debian puts the uapi headers in the -common package next to the
    # arch one; the arch tree links to it.
    found = sorted(Path(k.build_root, "usr/src").glob(
        f"linux-headers-{k.release.rsplit('-', 1)[0]}-common/include/uapi/linux/virtio_balloon.h"))
    assert found, f"no uapi virtio_balloon.h for {k.release} under {k.build_root}/usr/src"
    return found[0].read_text()


def defines(text: str, prefix: str) -> dict[str, int]:
    return {m[0]: int(m[1]) for m in re.findall(rf"^#define\s+{prefix}(\w+)\s+(\d+)\b", text, re.M)}


def test_protocol_knows_every_feature_tag_and_config_field_of_the_7_3_header():
    text = uapi_header()
    features = defines(text, "VIRTIO_BALLOON_F_")
    assert features, "no feature bits parsed"
    assert features == {f.name: f.value for f in balloon.Feature if f.value < 24
                        and f is not balloon.Feature.BALLOOND_MIGRATE_VQ}

    tags = defines(text, "VIRTIO_BALLOON_S_")
    count = tags.pop("NR")
    assert count == len(balloon.StatTag) == len(tags)
    assert sorted(tags.values()) == [t.value for t in balloon.StatTag]
    # the names Linux gives the tags, in tag order, are ours with dashes
    names = re.findall(r'VIRTIO_BALLOON_S_NAMES_prefix "([a-z-]+)"', text)
    assert names == [t.key.replace("_", "-") for t in balloon.StatTag]

    config = re.search(r"struct virtio_balloon_config \{(.*?)\n\};", text, re.S)
    assert config is not None
    # every member is an __le32 (a union of two counts as one)
    body = re.sub(r"/\*.*?\*/", "", config.group(1), flags=re.S)
    body = re.sub(r"union \{[^}]*\};", "__le32 union_;", body, flags=re.S)
    members = re.findall(r"(__le32|__u8|__le16|__le64)\s+\w+;", body)
    assert members == ["__le32"] * 4
    assert balloon.CONFIG_SIZE == 4 * len(members)


@pytest.mark.daemon_args("--stats-interval", "1")
def test_every_statistic_a_7_3_guest_sends_is_decoded_by_name(make_vm, daemon):
    make_vm(SERIES, memory_mib=512, balloon=VhostUserBalloon(daemon.sockets["guest"]), load_balloon=True)
    info = wait_for("a stats sample", lambda: (v := daemon.api.vm("guest"))["stats_updated_at"] and v)
    sent = set(info["stats"])
    unknown = {k for k in sent if k.startswith("tag")}
    assert not unknown, f"the 7.3 driver sent tags protocol/ does not know: {unknown}"
    # Debian's 7.3 has hugetlb, so its driver sends all sixteen
    assert sent == {t.key for t in balloon.StatTag}
    assert info["counters"]["guest_errors"] == 0
