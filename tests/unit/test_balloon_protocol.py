"""virtio-balloon formats: features, queue roles, config, stats, PFN arrays."""

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import balloon as vb
from protocol import extension as ext
from protocol.balloon import Feature
from protocol.errors import GuestError


def bits(*features):
    return sum(1 << f for f in features)


@pytest.mark.parametrize(
    "features, roles",
    [
        (0, ["inflate", "deflate"]),
        (bits(Feature.STATS_VQ), ["inflate", "deflate", "stats"]),
        (bits(Feature.REPORTING), ["inflate", "deflate", "reporting"]),
        (bits(Feature.STATS_VQ, Feature.REPORTING), ["inflate", "deflate", "stats", "reporting"]),
        (bits(Feature.STATS_VQ, Feature.FREE_PAGE_HINT, Feature.REPORTING),
         ["inflate", "deflate", "stats", "free_page_hint", "reporting"]),
        (bits(Feature.BALLOOND_MIGRATE_VQ), ["inflate", "deflate", "migrate"]),
        (bits(Feature.STATS_VQ, Feature.REPORTING, Feature.BALLOOND_MIGRATE_VQ),
         ["inflate", "deflate", "stats", "reporting", "migrate"]),
        # bits that add no queue change nothing
        (bits(Feature.MUST_TELL_HOST, Feature.DEFLATE_ON_OOM, Feature.PAGE_POISON, Feature.VERSION_1),
         ["inflate", "deflate"]),
    ],
)
def test_queue_roles_follow_negotiated_features(features, roles):
    assert [r.value for r in vb.queue_roles(features)] == roles


def test_config_layout_is_little_endian_16_bytes():
    cfg = vb.BalloonConfig(num_pages=0x01020304, actual=5, free_page_hint_cmd_id=6, poison_val=0xAA)
    assert cfg.encode() == struct.pack("<IIII", 0x01020304, 5, 6, 0xAA)
    assert cfg.read(4, 4) == struct.pack("<I", 5)
    assert cfg.read(14, 4) == b"\0\0\0\0"  # past the end reads zero


def test_driver_write_takes_only_driver_fields():
    cfg = vb.BalloonConfig(num_pages=100)
    # QEMU forwards its whole cached config, with a stale num_pages of 7
    changed = cfg.driver_write(0, struct.pack("<IIII", 7, 42, 9, 0))
    assert changed == ["actual"]
    assert (cfg.num_pages, cfg.actual, cfg.free_page_hint_cmd_id) == (100, 42, 0)
    assert cfg.driver_write(4, struct.pack("<I", 42)) == []
    assert cfg.driver_write(12, struct.pack("<I", 0xAAAAAAAA)) == ["poison_val"]
    assert cfg.driver_write(40, b"xx") == []


def test_stats_decode_all_tags_including_6_12_ones():
    entries = {tag: 1000 + tag for tag in vb.StatTag}
    decoded = vb.decode_stats(vb.encode_stats(entries))
    assert decoded["oom_kills"] == 1010 and decoded["direct_reclaims"] == 1015
    assert decoded["available_memory"] == 1006
    assert len(decoded) == 16
    assert vb.decode_stats(struct.pack("<HQ", 99, 1)) == {"tag99": 1}
    with pytest.raises(GuestError):
        vb.decode_stats(b"\0" * 11)


@given(st.lists(st.integers(0, 2**32 - 1), max_size=256))
def test_pfn_round_trip(pfns):
    assert list(vb.decode_pfns(vb.encode_pfns(pfns))) == pfns


def test_pfn_buffer_must_be_whole_u32s():
    with pytest.raises(GuestError):
        vb.decode_pfns(b"\0" * 5)


@given(st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)), max_size=ext.MIGRATIONS_PER_BUFFER))
def test_migration_records_round_trip(pairs):
    records = [ext.Migration(a, b) for a, b in pairs]
    assert ext.decode_migrations(ext.encode_migrations(records)) == records


def test_migration_buffer_limits():
    with pytest.raises(GuestError):
        ext.decode_migrations(b"\0" * 17)
    with pytest.raises(GuestError, match="more than"):
        ext.decode_migrations(b"\0" * 16 * (ext.MIGRATIONS_PER_BUFFER + 1))


def test_feature_names():
    assert vb.feature_names(bits(Feature.STATS_VQ, Feature.BALLOOND_MIGRATE_VQ)) == ["STATS_VQ", "BALLOOND_MIGRATE_VQ"]
    assert vb.feature_names(1 << 40) == ["bit40"]
