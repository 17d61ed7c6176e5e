/* SPDX-License-Identifier: (GPL-2.0-only OR MIT) */
/*
 * balloond guest<->host extension to virtio-balloon: page migration reports.
 *
 * The stock virtio-balloon protocol has no message for "the guest moved a
 * ballooned page": Linux reports each compaction migration as an inflate of
 * the new page followed by a deflate of the old one, two synchronous round
 * trips, and the host cannot tell a migration from two unrelated requests.
 * This extension adds one device-specific feature bit and one virtqueue that
 * carries migrations as single {old, new} records, batched; a device that
 * offers it also takes larger inflate and deflate buffers (below).
 *
 * This header is the one definition of the wire format; protocol/extension.py
 * mirrors it and tests/unit/test_extension_header.py keeps the two in agreement.
 */
#ifndef BALLOOND_EXT_H
#define BALLOOND_EXT_H

#include <linux/types.h>

/*
 * Device feature bit. 62 lies in the device-specific range 50..63 that the
 * virtio spec leaves to the device type, away from the low bits the balloon's
 * own standard features (0..5) occupy and may grow into.
 */
#define BALLOOND_F_MIGRATE_VQ	62

/*
 * The migrate queue is the last queue the driver uses: after inflate, deflate,
 * and then stats, free-page-hint and reporting, each only if negotiated.
 * Its buffers are device-readable arrays of struct balloond_migration; the
 * device reads (buffer length / sizeof(struct balloond_migration)) records and
 * returns the buffer once the host's bookkeeping has moved every record.
 */

/* One migration: balloon membership moves from old_pfn to new_pfn. */
struct balloond_migration {
	__le64 old_pfn;	/* frame number the balloon gives back to the guest */
	__le64 new_pfn;	/* frame number that is ballooned from now on */
};

/*
 * Split migrations, a second device feature bit, meaningful only together
 * with BALLOOND_F_MIGRATE_VQ.  When it is negotiated a record may also carry
 * only one half of a migration, which lets a driver tell the host about many
 * departing pages in one buffer, wait once, and tell it about the pages that
 * replace them later, again many per buffer:
 *
 *   { old, BALLOOND_PFN_NONE }    departure: old leaves the balloon because it
 *                                 is being migrated.  Once the buffer is
 *                                 returned the host no longer counts old and
 *                                 has cancelled any discard of it still
 *                                 pending, exactly as for a deflate.
 *   { BALLOOND_PFN_NONE, new }    arrival: new, the destination of a
 *                                 migration, enters the balloon (one move).
 *   { BALLOOND_PFN_RETURN, new }  return: new enters the balloon again, a
 *                                 departed page put back after its migration
 *                                 failed (not a move).
 *
 * Whole records { old, new } keep their meaning.  A device that did not
 * negotiate the bit refuses the new forms (they name no frame of RAM).
 */
#define BALLOOND_F_MIGRATE_SPLIT	61

#define BALLOOND_PFN_NONE	0xffffffffffffffffULL
#define BALLOOND_PFN_RETURN	0xfffffffffffffffeULL

/* Frame numbers are in 4 KiB units, as in the standard inflate/deflate queues. */
#define BALLOOND_PFN_SHIFT	12

/* The most records a driver puts in one buffer (one 4 KiB page of records). */
#define BALLOOND_MIGRATIONS_PER_BUFFER	256

/*
 * Larger inflate and deflate buffers.  A device that offers
 * BALLOOND_F_MIGRATE_VQ also accepts, on the standard inflate and deflate
 * queues, buffers of up to this many PFNs (one 4 KiB page of __le32).
 * Linux's own driver sends at most 256 and waits for each buffer, so a
 * balloon change costs one round trip per MiB; a driver that negotiated
 * the extension may send four times as many per buffer and wait a quarter
 * as often.  Nothing else about the queues changes.
 */
#define BALLOOND_PFNS_PER_BUFFER	1024

#endif /* BALLOOND_EXT_H */
