"""The C header and protocol/extension.py describe the same wire format.

The header is compiled with the system C compiler (as the guest driver's
build would see it, against the kernel's uapi types) and asked for its
constants, sizes and offsets; every one must equal the Python mirror.
"""

import shutil
import subprocess
from pathlib import Path

import pytest

from protocol import extension as ext
from protocol.balloon import PFN_SHIFT, Feature

HEADER = Path(__file__).resolve().parents[2] / "protocol" / "balloond_ext.h"

PROBE = r"""
#include <stddef.h>
#include <stdio.h>
#include "balloond_ext.h"
int main(void) {
    printf("F_MIGRATE_VQ=%d\n", BALLOOND_F_MIGRATE_VQ);
    printf("F_MIGRATE_SPLIT=%d\n", BALLOOND_F_MIGRATE_SPLIT);
    printf("PFN_NONE=%llu\n", (unsigned long long)BALLOOND_PFN_NONE);
    printf("PFN_RETURN=%llu\n", (unsigned long long)BALLOOND_PFN_RETURN);
    printf("PFN_SHIFT=%d\n", BALLOOND_PFN_SHIFT);
    printf("MIGRATIONS_PER_BUFFER=%d\n", BALLOOND_MIGRATIONS_PER_BUFFER);
    printf("PFNS_PER_BUFFER=%d\n", BALLOOND_PFNS_PER_BUFFER);
    printf("MIGRATION_SIZE=%zu\n", sizeof(struct balloond_migration));
    printf("OFFSET_OLD_PFN=%zu\n", offsetof(struct balloond_migration, old_pfn));
    printf("OFFSET_NEW_PFN=%zu\n", offsetof(struct balloond_migration, new_pfn));
    printf("SIZE_OLD_PFN=%zu\n", sizeof(((struct balloond_migration *)0)->old_pfn));
    return 0;
}
"""


@pytest.fixture(scope="module")
def c_values(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc, "a C compiler is needed to check the extension header"
    d = tmp_path_factory.mktemp("probe")
    (d / "probe.c").write_text(PROBE)
    subprocess.run([cc, "-Wall", "-Werror", "-I", str(HEADER.parent), "-o", str(d / "probe"), str(d / "probe.c")],
                   check=True)
    out = subprocess.run([str(d / "probe")], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split("=") for line in out.split())}


def test_constants_agree(c_values):
    assert c_values["F_MIGRATE_VQ"] == ext.F_MIGRATE_VQ == Feature.BALLOOND_MIGRATE_VQ
    assert c_values["PFN_SHIFT"] == ext.PFN_SHIFT == PFN_SHIFT
    assert c_values["MIGRATIONS_PER_BUFFER"] == ext.MIGRATIONS_PER_BUFFER
    assert c_values["PFNS_PER_BUFFER"] == ext.PFNS_PER_BUFFER
    assert c_values["F_MIGRATE_SPLIT"] == ext.F_MIGRATE_SPLIT == Feature.BALLOOND_MIGRATE_SPLIT
    assert c_values["PFN_NONE"] == ext.PFN_NONE
    assert c_values["PFN_RETURN"] == ext.PFN_RETURN


def test_record_layout_agrees(c_values):
    assert c_values["MIGRATION_SIZE"] == ext.MIGRATION_SIZE == ext.MIGRATION.size
    assert c_values["OFFSET_OLD_PFN"] == ext.OFFSET_OLD_PFN
    assert c_values["OFFSET_NEW_PFN"] == ext.OFFSET_NEW_PFN
    assert c_values["SIZE_OLD_PFN"] == 8
    packed = ext.MIGRATION.pack(1, 2)
    assert packed[ext.OFFSET_OLD_PFN] == 1 and packed[ext.OFFSET_NEW_PFN] == 2


def test_feature_bit_is_in_the_device_specific_range():
    # virtio reserves 24..49 for transport features; 50..63 belong to the device type.
    assert 50 <= ext.F_MIGRATE_VQ <= 63
    assert 50 <= ext.F_MIGRATE_SPLIT <= 63 and ext.F_MIGRATE_SPLIT != ext.F_MIGRATE_VQ


def test_split_record_kinds():
    assert ext.Migration(5, 6).kind == "move"
    assert ext.departure(5).kind == "depart"
    assert ext.arrival(6).kind == "arrive"
    assert ext.returned(6).kind == "return"
    # markers where a frame belongs, or no frame at all
    for bad in ((ext.PFN_NONE, ext.PFN_NONE), (ext.PFN_RETURN, ext.PFN_NONE), (5, ext.PFN_RETURN),
                (ext.PFN_NONE, ext.PFN_RETURN), (ext.PFN_RETURN, ext.PFN_RETURN)):
        assert ext.Migration(*bad).kind == "invalid", bad
    # the new forms are the same 16-byte record on the wire
    data = ext.encode_migrations([ext.departure(5), ext.arrival(6), ext.returned(7)])
    assert ext.decode_migrations(data) == [ext.departure(5), ext.arrival(6), ext.returned(7)]
