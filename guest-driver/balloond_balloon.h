/* SPDX-License-Identifier: GPL-2.0 */
/*
 * balloond_balloon: shared definitions of the guest balloon driver.
 *
 * The driver is split in layers:
 *   main.c     virtio glue: probe/remove, queues, config changes, the size
 *              worker, the statistics queue and the OOM notifier;
 *   host.c     the conversations with the host (pfn batches on the inflate
 *              and deflate queues, migration reports on the extension queue
 *              or through the inflate+deflate fallback);
 *   movable.c  the page layer for kernels that let a module register its own
 *              movable_operations (6.1 .. 6.16);
 *   core.c     the page layer built on the kernel's balloon core, for 6.17+
 *              where modules can no longer register movable_operations (the
 *              6.x API of <linux/balloon_compaction.h> and the 7.x one of
 *              <linux/balloon.h>);
 *   debugfs.c  /sys/kernel/debug/balloond/{pfns,stats}.
 *
 * Exactly one of movable.c and core.c has a body; BALLOOND_USE_BALLOON_CORE
 * below decides which.
 */
#ifndef BALLOOND_BALLOON_H
#define BALLOOND_BALLOON_H

#include <linux/version.h>
#include <linux/types.h>
#include <linux/atomic.h>
#include <linux/list.h>
#include <linux/mutex.h>
#include <linux/spinlock.h>
#include <linux/wait.h>
#include <linux/workqueue.h>
#include <linux/notifier.h>
#include <linux/xarray.h>
#include <linux/mm.h>
#include <linux/vmstat.h>
#include <linux/virtio.h>
#include <linux/virtio_config.h>
#include <linux/virtio_balloon.h>

#include "balloond_ext.h"

/*
 * Which page layer to build.
 *
 * From 6.17 the kernel derives the movable_operations of a page from its page
 * type and keeps the only slot for PageOffline pages for the balloon core, so
 * a module has to go through balloon_dev_info and its migratepage hook.  The
 * Kbuild option BALLOOND_BALLOON_CORE=1 forces the balloon-core layer on older
 * kernels too; 6.1 .. 6.16 carry the same balloon core API, which lets the
 * 6.17 code path be compiled and exercised on the kernels we can test.
 *
 * Linux 7.x reworked that core: <linux/balloon_compaction.h> became
 * <linux/balloon.h>, the lock of every balloon's list is one global
 * balloon_pages_lock private to mm/balloon.c, the core inserts the new page
 * and finalizes the old one around the driver's migratepage hook, does the
 * managed-page accounting when asked to, and the page lock is no longer part
 * of the protocol.  The header that exists decides which contract core.c
 * follows (BALLOOND_BALLOON_API 7 or 6), not a version number: the rework
 * is what matters, whichever release carries it.
 */
#if __has_include(<linux/balloon.h>)
#define BALLOOND_USE_BALLOON_CORE 1
#define BALLOOND_BALLOON_API 7
#include <linux/balloon.h>
#elif LINUX_VERSION_CODE >= KERNEL_VERSION(6, 17, 0) || \
	defined(BALLOOND_FORCE_BALLOON_CORE)
#define BALLOOND_USE_BALLOON_CORE 1
#define BALLOOND_BALLOON_API 6
#include <linux/balloon_compaction.h>
#else
#define BALLOOND_USE_BALLOON_CORE 0
#define BALLOOND_BALLOON_API 0
#endif

/*
 * PFNs in one inflate or deflate buffer: 256 (a 1 KiB array of __virtio32,
 * as Linux's own driver sends) on any device, BALLOOND_PFNS_PER_BUFFER (4 KiB)
 * on a device that offered the extension, which accepts that many.  Every
 * buffer is a round trip the driver waits for, so the larger buffer makes
 * a balloon change wait a quarter as often.  vb->batch holds the one in use.
 */
#define BD_PFNS_STOCK		256

/* Queues we may use: inflate, deflate, stats, migrate. */
#define BD_MAX_VQS		4

/*
 * Split migrations (movable-ops layer, BALLOOND_F_MIGRATE_SPLIT): isolated
 * pages whose departure the host has not been told yet, at most this many
 * noted (compaction isolates COMPACT_CLUSTER_MAX = 32 at a time); one more
 * is told alone when its own migration comes.  Departures and the arrivals
 * that ride along share one buffer of BALLOOND_MIGRATIONS_PER_BUFFER.
 */
#define BD_DEPART_MAX		128

/* Pending arrivals are told this long after the last migration at the
 * latest (sooner if a departure, a deflate or a pfns read comes first). */
#define BD_ARRIVAL_DELAY	(HZ / 50)

/* Monotonic counters shown in debugfs; atomics, so no lock is needed. */
struct bd_counters {
	atomic_long_t inflated;		/* pages handed to the host */
	atomic_long_t deflated;		/* pages given back to the guest */
	atomic_long_t oom_deflated;	/* of those, from the OOM notifier */
	atomic_long_t alloc_failures;	/* inflate rounds cut short */
	atomic_long_t isolations;	/* isolate_page said yes */
	atomic_long_t isolate_refused;	/* isolate_page said no */
	atomic_long_t putback;		/* putback_page calls */
	atomic_long_t migrated;		/* successful migrations */
	atomic_long_t migrate_busy;	/* -EAGAIN: balloon_lock was taken */
	atomic_long_t migrate_failures;	/* -EAGAIN: the host report failed */
	atomic_long_t ext_records;	/* migration records sent, any form */
	atomic_long_t ext_buffers;	/* migrate-queue buffers sent */
	atomic_long_t ext_departures;	/* of the records: departures, */
	atomic_long_t ext_arrivals;	/* arrivals (one per move told), */
	atomic_long_t ext_returns;	/* and returns */
	atomic_long_t ext_depart_buffers; /* buffers carrying departures */
	atomic_long_t fallback_pairs;	/* inflate+deflate pairs sent */
};

struct balloond {
	struct virtio_device *vdev;

	/* Set in probe, constant afterwards. */
	struct virtqueue *inflate_vq;
	struct virtqueue *deflate_vq;
	struct virtqueue *stats_vq;	/* NULL unless STATS_VQ negotiated */
	struct virtqueue *migrate_vq;	/* NULL unless the extension is used */
	bool use_ext;			/* BALLOOND_F_MIGRATE_VQ negotiated */
	unsigned int batch;		/* PFNs per inflate/deflate buffer */
	bool use_split;			/* BALLOOND_F_MIGRATE_SPLIT negotiated */
	/*
	 * Set (under balloon_lock) while a buffer of pending arrivals is with
	 * the device; cleared with a wake-up of drain_wq.  A migrate callback
	 * that finds balloon_lock taken waits for this instead of failing:
	 * the arrival flush takes no page lock and allocates nothing, so
	 * waiting for it cannot deadlock, and a compaction batch meeting
	 * arrival_work would otherwise exhaust its retries within the one
	 * round trip (hundreds of failed migrations measured on 6.1).
	 */
	bool arrivals_in_flight;
	bool deflate_on_oom;		/* VIRTIO_BALLOON_F_DEFLATE_ON_OOM */
	bool must_tell_host;		/* VIRTIO_BALLOON_F_MUST_TELL_HOST */

	/*
	 * stop_lock protects stop_work.  The config-change and stats
	 * callbacks run in interrupt context and queue work only while
	 * stop_work is false; remove() sets it before cancelling the work, so
	 * nothing is queued behind its back.  Taken with irqsave everywhere.
	 */
	spinlock_t stop_lock;
	bool stop_work;

	struct delayed_work size_work;	/* moves num_pages towards the target */
	struct work_struct stats_work;	/* answers the host's stats request */
	struct delayed_work arrival_work; /* tells the host of pending arrivals */

	/* Woken by the inflate/deflate/migrate queue callbacks. */
	wait_queue_head_t acked;

	/*
	 * balloon_lock (mutex) serialises every change of balloon membership
	 * and every conversation on the inflate, deflate and migrate queues.
	 * It protects:
	 *   num_pages   - pages in the balloon, isolated ones included
	 *                 (lock-free readers use READ_ONCE and accept a stale
	 *                 value: the size worker, debugfs);
	 *   pfns[]      - the inflate/deflate buffer while the host owns it;
	 *   migr_buf    - the migrate-queue buffer while the host owns it;
	 *   sending[]   - the pages whose departures are in migr_buf;
	 *   the config field "actual", written only under this lock so two
	 *   writers cannot leave a stale value behind.
	 * The migrate callback only trylocks it (it runs with both pages
	 * locked, and inflate takes page locks under this mutex) and returns
	 * -EAGAIN when it is busy.  No allocation of balloon pages happens
	 * with it held.
	 */
	struct mutex balloon_lock;
	unsigned int num_pages;
	__virtio32 pfns[BALLOOND_PFNS_PER_BUFFER];
	struct balloond_migration *migr_buf;
	struct page *sending[BD_DEPART_MAX + 1];

#if BALLOOND_BALLOON_API == 7
	/*
	 * The balloon core's descriptor.  Its pages list, isolated_pages and
	 * page->private of its pages are protected by balloon_pages_lock,
	 * which is private to mm/balloon.c: the driver never reads the list
	 * and reads isolated_pages only as a racy figure for debugfs.  What
	 * the driver needs to know about its pages it keeps itself:
	 *   frames - the PFNs the host was told are in the balloon (isolated
	 *            ones included), an xarray changed only under balloon_lock
	 *            (inflate, deflate, the migratepage hook), so it is the set
	 *            the host holds, read by debugfs under the same lock.
	 */
	struct balloon_dev_info bdev;
	struct xarray frames;
#elif BALLOOND_USE_BALLOON_CORE
	/*
	 * The balloon core's descriptor.  Its pages list, isolated_pages and
	 * page->private of its pages are protected by bdev.pages_lock, taken
	 * with irqsave as the core does.
	 */
	struct balloon_dev_info bdev;
#else
	/*
	 * pages_lock (spinlock, never taken from interrupt context) protects:
	 *   pages            - list of balloon pages not isolated, linked by
	 *                      page->lru;
	 *   on_list          - length of that list;
	 *   isolated         - pages taken off the list by isolate_page and not
	 *                      yet migrated or put back (their page->lru
	 *                      belongs to the migration core meanwhile);
	 *   refuse_isolation - set by remove() so isolate_page says no.
	 *   unannounced      - balloon pages the host has not been told of
	 *                      yet (split migrations: a move's destination, or
	 *                      a departed page put back), linked by page->lru,
	 *                      and their number n_unannounced;
	 *   departing[]      - isolated pages the host still counts and has
	 *                      not yet been told are leaving, n_departing of
	 *                      them;
	 *   the state bits of page->private (movable.c: BD_KNOWN ...).
	 * A page's movable/offline state and its owner in page->private change
	 * only with the page locked and this lock held; the state bits of an
	 * isolated page may change with this lock alone (a departure sent for
	 * the whole batch).  Lock order:
	 *   page lock -> pages_lock   (isolate, putback, migrate, inflate);
	 * deflate goes pages_lock -> trylock_page, which cannot deadlock.
	 */
	spinlock_t pages_lock;
	struct list_head pages;
	unsigned long on_list;
	unsigned long isolated;
	bool refuse_isolation;
	struct list_head unannounced;
	unsigned long n_unannounced;
	struct page *departing[BD_DEPART_MAX];
	unsigned int n_departing;
#endif

	/* Woken when pages come back from isolation; remove() waits on it. */
	wait_queue_head_t drain_wq;

	/* Only the stats worker touches these after probe. */
	struct virtio_balloon_stat host_stats[VIRTIO_BALLOON_S_NR];
	unsigned long vm_events[NR_VM_EVENT_ITEMS];

	struct notifier_block oom_nb;
	struct dentry *debugfs_dir;
	struct bd_counters cnt;
};

/* main.c */
extern bool bd_migrate_ext;
extern bool bd_migrate_split;
void bd_queue_arrivals(struct balloond *vb);
u32 bd_read_target(struct balloond *vb);
void bd_write_actual(struct balloond *vb);
unsigned int bd_alloc_batch(struct balloond *vb, unsigned int want,
			    struct list_head *pages,
			    struct page *(*alloc)(void));
void bd_publish_batch(struct balloond *vb, struct virtqueue *vq,
		      unsigned int n, const char *what);
void bd_give_back(struct balloond *vb, struct list_head *released);
int bd_migration_begin(struct balloond *vb, struct page *page,
		       struct page *newpage);
void bd_migration_done(struct balloond *vb);

/* host.c */
int bd_send_pfns(struct balloond *vb, struct virtqueue *vq, unsigned int n);
int bd_report_migration(struct balloond *vb, struct page *oldpage,
			struct page *newpage);
int bd_send_migrations(struct balloond *vb, unsigned int n);
static inline void bd_record(struct balloond *vb, unsigned int i, u64 old_pfn,
			     u64 new_pfn)
{
	vb->migr_buf[i].old_pfn = cpu_to_le64(old_pfn);
	vb->migr_buf[i].new_pfn = cpu_to_le64(new_pfn);
}

/* movable.c or core.c */
void bd_pages_init(struct balloond *vb);
unsigned int bd_inflate(struct balloond *vb, unsigned int want);
unsigned int bd_deflate(struct balloond *vb, unsigned int want);
void bd_drain(struct balloond *vb);
void bd_pages_resume(struct balloond *vb);
int bd_report_departure(struct balloond *vb, struct page *page);
int bd_flush_arrivals(struct balloond *vb);
int bd_pfns_snapshot(struct balloond *vb, unsigned long **pfns, size_t *n);
void bd_page_counts(struct balloond *vb, unsigned long *on_list,
		    unsigned long *isolated);
extern const char *const bd_page_layer;

/* debugfs.c */
void bd_debugfs_init(struct balloond *vb);
void bd_debugfs_exit(struct balloond *vb);

/* Managed-page accounting, as the in-kernel balloon does it: a balloon
 * without deflate-on-OOM shrinks MemTotal, one with it only uses memory.
 * The 7.x balloon core does it itself in enqueue, dequeue and migration
 * (bdev.adjust_managed_page_count, set in bd_pages_init). */
static inline void bd_account(struct balloond *vb, struct page *page, long n)
{
#if BALLOOND_BALLOON_API != 7
	if (!vb->deflate_on_oom)
		adjust_managed_page_count(page, n);
#endif
}

/*
 * /proc/vmstat balloon_inflate/deflate/migrate.  vm_event_states is exported
 * and count_vm_events() is an inline per-cpu increment, so a module can
 * count them; the events exist only with these config options.
 */
static inline void bd_count_inflate(unsigned long n)
{
#ifdef CONFIG_MEMORY_BALLOON
	count_vm_events(BALLOON_INFLATE, n);
#endif
}

static inline void bd_count_deflate(unsigned long n)
{
#ifdef CONFIG_MEMORY_BALLOON
	count_vm_events(BALLOON_DEFLATE, n);
#endif
}

static inline void bd_count_migrate(void)
{
#ifdef CONFIG_BALLOON_COMPACTION
	count_vm_event(BALLOON_MIGRATE);
#endif
}

static inline __virtio32 bd_pfn32(struct balloond *vb, struct page *page)
{
	return cpu_to_virtio32(vb->vdev, (u32)page_to_pfn(page));
}

#endif /* BALLOOND_BALLOON_H */
