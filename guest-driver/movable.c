// SPDX-License-Identifier: GPL-2.0
/*
 * balloond_balloon: page layer with the driver's own movable_operations
 * (kernels 6.1 .. 6.16).
 *
 * A balloon page is an order-0 page the driver allocated and holds one
 * reference to.  While it is in the balloon it is:
 *   - registered movable with bd_mops (__SetPageMovable), so compaction,
 *     memory offlining and alloc_contig_range can move it;
 *   - marked PageOffline, like the in-kernel balloon does: its contents are
 *     gone (the host may have discarded the frame), so kdump/makedumpfile,
 *     /proc/kcore readers and hibernation must skip it;
 *   - page->private = the owning struct balloond;
 *   - either on vb->pages (linked through page->lru) or isolated by the
 *     migration core (which then owns page->lru).
 *
 * The contract we follow (the non-LRU movable page description plus what
 * 6.1 and 6.12 actually do in mm/migrate.c):
 *
 *   isolate_page(page): called with the page locked and an extra reference
 *     held by the caller.  We take the page off our list and count it
 *     isolated, or return false (remove() in progress).  We do NOT touch
 *     PG_isolated: since 5.19 isolate_movable_page() sets it itself after a
 *     successful isolate_page and warns if the driver already did.
 *
 *   migrate_page(dst, src): both pages locked.  We tell the host first (one
 *     extension record, or inflate dst + deflate src) and return -EAGAIN,
 *     changing nothing, if balloon_lock is busy or the report fails.  Then
 *     dst joins the balloon (our reference, movable, offline, on the list)
 *     and src leaves it: __ClearPageMovable(src), offline and private
 *     cleared, then our reference is dropped.  The core clears PG_isolated
 *     of src after a successful migrate_page (move_to_new_folio()) and drops
 *     the isolation reference, which frees src.
 *
 *   putback_page(page): page locked.  Back on our list; the core clears
 *     PG_isolated after we return (putback_movable_folio()).
 *
 *   Releasing a page (deflate) happens only for pages on our list, never
 *     for isolated ones: we trylock the page, take it off the list, clear
 *     movable/offline/private under the page lock, and only then drop our
 *     reference.  A racing isolate_movable_page() that already holds a
 *     reference rechecks PageMovable under the page lock and backs off.
 *
 * Split migrations (BALLOOND_F_MIGRATE_SPLIT negotiated, vb->use_split):
 *   compaction isolates a batch of pages before it migrates any of them,
 *   and a migrated source is free as soon as migrate_page returns, so the
 *   host must have stopped counting it by then.  Instead of one round trip
 *   per page, isolate_page notes each page as departing (departing[]); the
 *   first migrate_page of the batch sends every noted departure in one
 *   buffer and waits once; the following ones find their source already
 *   told.  A move's destination joins the balloon unannounced (the host
 *   does not count it yet, which is safe: it is merely not discarded yet)
 *   and is told later, many per buffer: riding along with the next
 *   departures, or from arrival_work once migrations have been quiet for
 *   BD_ARRIVAL_DELAY, or before a deflate or a pfns read.  The state bits
 *   in page->private say what the host knows of a page:
 *     BD_KNOWN        the host counts it (on pages, or isolated: departing);
 *     BD_SENDING      isolated, its departure is in the buffer in flight;
 *     BD_DEPARTED     isolated, the host no longer counts it;
 *     BD_UNANNOUNCED  the host does not count it (on unannounced, or
 *                     isolated again: then it is simply no longer pending);
 *     | BD_RETURNING  ... because it departed and was put back: told as a
 *                     return rather than as a move's arrival.
 *   A departed page put back becomes unannounced.  Deflate only ever takes
 *   BD_KNOWN pages from pages, after telling pending arrivals, so it never
 *   names a frame the host has not heard of.
 *
 * Module unload is safe because remove() refuses new isolations and waits
 * until every page has left the balloon; a page leaves only under its page
 * lock, and the core holds that lock around every callback it makes, so no
 * callback into this module can be running or start afterwards.
 */
#include <linux/delay.h>
#include <linux/mm.h>
#include <linux/migrate.h>
#include <linux/pagemap.h>
#include <linux/sort.h>
#include <linux/slab.h>

#include "balloond_balloon.h"

#if !BALLOOND_USE_BALLOON_CORE

const char *const bd_page_layer = "movable-ops";

static const struct movable_operations bd_mops;

/* page->private: the owning balloon, and in its low bits what the host
 * knows of the page (see above; struct balloond is kmalloc'ed, so those
 * bits of its address are zero). */
#define BD_KNOWN	0UL
#define BD_SENDING	1UL
#define BD_DEPARTED	2UL
#define BD_UNANNOUNCED	3UL
#define BD_STATE	3UL
#define BD_RETURNING	4UL
#define BD_FLAGS	7UL

static inline struct balloond *bd_page_owner(struct page *page)
{
	return (struct balloond *)(READ_ONCE(page->private) & ~BD_FLAGS);
}

static inline unsigned long bd_flags(struct page *page)
{
	return page_private(page) & BD_FLAGS;
}

static inline void bd_set_flags(struct balloond *vb, struct page *page,
				unsigned long flags)
{
	lockdep_assert_held(&vb->pages_lock);
	WRITE_ONCE(page->private, (unsigned long)vb | flags);
}

static gfp_t bd_gfp(void)
{
	/* Movable pages may come from ZONE_MOVABLE and CMA areas. */
	gfp_t gfp = IS_ENABLED(CONFIG_MIGRATION) ? GFP_HIGHUSER_MOVABLE :
						   GFP_HIGHUSER;

	return gfp | __GFP_NOMEMALLOC | __GFP_NORETRY | __GFP_NOWARN;
}

/* Page locked, pages_lock held: @page becomes a balloon page. */
static void bd_page_enter(struct balloond *vb, struct page *page)
{
	lockdep_assert_held(&vb->pages_lock);
	__SetPageOffline(page);
	__SetPageMovable(page, &bd_mops);
	set_page_private(page, (unsigned long)vb);
	list_add(&page->lru, &vb->pages);
	vb->on_list++;
}

/*
 * Page locked, pages_lock held, page already off the list: @page stops
 * being a balloon page.  Movable is cleared before our reference goes, as
 * the contract requires; PG_isolated is the core's business.
 */
static void bd_page_leave(struct balloond *vb, struct page *page)
{
	lockdep_assert_held(&vb->pages_lock);
	__ClearPageMovable(page);
	__ClearPageOffline(page);
	set_page_private(page, 0);
}

/* Page locked, pages_lock held: @page joins the balloon unannounced. */
static void bd_page_enter_unannounced(struct balloond *vb, struct page *page)
{
	lockdep_assert_held(&vb->pages_lock);
	__SetPageOffline(page);
	__SetPageMovable(page, &bd_mops);
	bd_set_flags(vb, page, BD_UNANNOUNCED);
	list_add_tail(&page->lru, &vb->unannounced);
	vb->n_unannounced++;
}

/* pages_lock held: forget @page in departing[] if it is there. */
static void bd_departing_forget(struct balloond *vb, struct page *page)
{
	unsigned int i;

	lockdep_assert_held(&vb->pages_lock);
	for (i = 0; i < vb->n_departing; i++) {
		if (vb->departing[i] == page) {
			vb->departing[i] = vb->departing[--vb->n_departing];
			return;
		}
	}
}

void bd_pages_init(struct balloond *vb)
{
	WARN_ON((unsigned long)vb & BD_FLAGS);
	spin_lock_init(&vb->pages_lock);
	INIT_LIST_HEAD(&vb->pages);
	INIT_LIST_HEAD(&vb->unannounced);
	vb->on_list = 0;
	vb->isolated = 0;
	vb->n_unannounced = 0;
	vb->n_departing = 0;
	vb->refuse_isolation = false;
}

/*
 * balloon_lock and pages_lock held: move up to the rest of migr_buf's
 * room (from @n) of unannounced pages to the list, as known, and write their
 * arrival or return records.  They count as known before the host has the
 * buffer: a frame the host does not count yet is safe in the balloon (it is
 * merely not discarded yet), and every later message about it (a departure,
 * a deflate) is sent after this buffer, under the same balloon_lock.
 * Returns the new record count; *arrivals and *returns are added to.
 */
static unsigned int bd_take_arrivals(struct balloond *vb, unsigned int n,
				     long *arrivals, long *returns)
{
	struct page *page, *tmp;

	lockdep_assert_held(&vb->pages_lock);
	list_for_each_entry_safe(page, tmp, &vb->unannounced, lru) {
		if (n == BALLOOND_MIGRATIONS_PER_BUFFER)
			break;
		if (bd_flags(page) & BD_RETURNING) {
			bd_record(vb, n++, BALLOOND_PFN_RETURN, page_to_pfn(page));
			(*returns)++;
		} else {
			bd_record(vb, n++, BALLOOND_PFN_NONE, page_to_pfn(page));
			(*arrivals)++;
		}
		bd_set_flags(vb, page, BD_KNOWN);
		list_move(&page->lru, &vb->pages);
		vb->n_unannounced--;
		vb->on_list++;
	}
	return n;
}

static void bd_count_split(struct balloond *vb, long departures,
			   long arrivals, long returns)
{
	atomic_long_add(departures, &vb->cnt.ext_departures);
	atomic_long_add(arrivals, &vb->cnt.ext_arrivals);
	atomic_long_add(returns, &vb->cnt.ext_returns);
}

/*
 * balloon_lock held: tell the host of every unannounced page.  Called by
 * arrival_work, and before anything that must see host and guest agree:
 * a deflate (it must never name a frame the host has not heard of), a
 * pfns read, and so remove() and freeze(), which deflate everything.
 */
int bd_flush_arrivals(struct balloond *vb)
{
	long arrivals, returns;
	unsigned int n;
	int err;

	lockdep_assert_held(&vb->balloon_lock);
	if (!vb->use_split)
		return 0;
	do {
		arrivals = returns = 0;
		spin_lock(&vb->pages_lock);
		n = bd_take_arrivals(vb, 0, &arrivals, &returns);
		spin_unlock(&vb->pages_lock);
		if (!n)
			return 0;
		WRITE_ONCE(vb->arrivals_in_flight, true);
		err = bd_send_migrations(vb, n);
		WRITE_ONCE(vb->arrivals_in_flight, false);
		wake_up(&vb->drain_wq);
		if (err) {
			/* A broken queue: the pages stay in the balloon, the
			 * host does not count them, which frees nothing. */
			dev_err_ratelimited(&vb->vdev->dev,
					    "%u arrivals not sent: %d\n", n, err);
			return err;
		}
		bd_count_split(vb, 0, arrivals, returns);
	} while (n == BALLOOND_MIGRATIONS_PER_BUFFER);
	return 0;
}

/*
 * From the migrate path (@page locked and isolated, balloon_lock held):
 * make sure the host no longer counts @page.  If it was already told (a
 * batch's departures went in an earlier call) or never knew the page,
 * nothing is sent.  Otherwise @page and every other noted departure go in
 * one buffer, pending arrivals filling the room that is left, and the call
 * waits for it once.  0 when the host no longer counts @page.
 */
int bd_report_departure(struct balloond *vb, struct page *page)
{
	long departures, arrivals = 0, returns = 0;
	unsigned int i, n = 0, nd;
	struct page *p;
	int err;

	lockdep_assert_held(&vb->balloon_lock);
	spin_lock(&vb->pages_lock);
	switch (bd_flags(page) & BD_STATE) {
	case BD_DEPARTED:
	case BD_UNANNOUNCED:
		spin_unlock(&vb->pages_lock);
		return 0;
	case BD_SENDING:
		/* Only while a departure buffer is in flight, which needs
		 * the balloon_lock we hold. */
		spin_unlock(&vb->pages_lock);
		WARN_ON_ONCE(1);
		return -EINVAL;
	}
	bd_departing_forget(vb, page);
	vb->sending[n] = page;
	bd_record(vb, n++, page_to_pfn(page), BALLOOND_PFN_NONE);
	bd_set_flags(vb, page, BD_SENDING);
	for (i = 0; i < vb->n_departing; i++) {
		p = vb->departing[i];
		vb->sending[n] = p;
		bd_record(vb, n++, page_to_pfn(p), BALLOOND_PFN_NONE);
		bd_set_flags(vb, p, BD_SENDING);
	}
	vb->n_departing = 0;
	nd = n;
	n = bd_take_arrivals(vb, n, &arrivals, &returns);
	spin_unlock(&vb->pages_lock);

	err = bd_send_migrations(vb, n);

	/*
	 * A page of the batch may have been put back meanwhile (another
	 * compaction's batch): putback saw BD_SENDING and made it an
	 * unannounced return, which the host hears of after this buffer.
	 * The rest are departed now, or known again if the buffer could not
	 * be queued (a broken queue; a page put back meanwhile is then told
	 * as a return of a frame the host still counts, which it refuses:
	 * nothing is freed either way).
	 */
	spin_lock(&vb->pages_lock);
	for (i = 0; i < nd; i++) {
		p = vb->sending[i];
		if ((bd_flags(p) & BD_STATE) == BD_SENDING)
			bd_set_flags(vb, p, err ? BD_KNOWN : BD_DEPARTED);
	}
	spin_unlock(&vb->pages_lock);
	if (err)
		return err;
	departures = nd;
	bd_count_split(vb, departures, arrivals, returns);
	atomic_long_inc(&vb->cnt.ext_depart_buffers);
	return 0;
}

static struct page *bd_alloc_page(void)
{
	return alloc_page(bd_gfp());
}

unsigned int bd_inflate(struct balloond *vb, unsigned int want)
{
	LIST_HEAD(fresh);
	struct page *page, *tmp;
	unsigned int n = 0;

	want = min_t(unsigned int, want, vb->batch);
	if (!bd_alloc_batch(vb, want, &fresh, bd_alloc_page))
		return 0;

	mutex_lock(&vb->balloon_lock);
	list_for_each_entry_safe(page, tmp, &fresh, lru) {
		list_del(&page->lru);
		bd_account(vb, page, -1);
		/* __SetPageMovable wants the page locked; nobody else can
		 * hold the lock of a page we just allocated for long. */
		lock_page(page);
		spin_lock(&vb->pages_lock);
		bd_page_enter(vb, page);
		spin_unlock(&vb->pages_lock);
		unlock_page(page);
		vb->pfns[n++] = bd_pfn32(vb, page);
	}
	vb->num_pages += n;
	bd_publish_batch(vb, vb->inflate_vq, n, "inflate");
	mutex_unlock(&vb->balloon_lock);

	atomic_long_add(n, &vb->cnt.inflated);
	bd_count_inflate(n);
	return n;
}

unsigned int bd_deflate(struct balloond *vb, unsigned int want)
{
	LIST_HEAD(released);
	struct page *page, *tmp;
	unsigned int n = 0;

	mutex_lock(&vb->balloon_lock);
	/* Only known pages are taken below; pending arrivals become known
	 * (and their frames the host's) first, so nothing is left behind. */
	bd_flush_arrivals(vb);
	want = min3(want, vb->batch, vb->num_pages);

	spin_lock(&vb->pages_lock);
	list_for_each_entry_safe(page, tmp, &vb->pages, lru) {
		if (n == want)
			break;
		/* A locked page is being looked at by the migration core
		 * (about to be isolated, or refused); take another one. */
		if (!trylock_page(page))
			continue;
		list_move(&page->lru, &released);
		vb->on_list--;
		bd_page_leave(vb, page);
		unlock_page(page);
		vb->pfns[n++] = bd_pfn32(vb, page);
	}
	spin_unlock(&vb->pages_lock);

	vb->num_pages -= n;
	/* The host hears about the pages before any of them is reused; this
	 * is what VIRTIO_BALLOON_F_MUST_TELL_HOST asks, and harmless without
	 * it, so it is always done. */
	bd_publish_batch(vb, vb->deflate_vq, n, "deflate");
	mutex_unlock(&vb->balloon_lock);
	bd_give_back(vb, &released);

	atomic_long_add(n, &vb->cnt.deflated);
	bd_count_deflate(n);
	return n;
}

static bool bd_drained_or_back(struct balloond *vb)
{
	bool ret;

	spin_lock(&vb->pages_lock);
	ret = vb->on_list || vb->n_unannounced || !vb->isolated;
	spin_unlock(&vb->pages_lock);
	return ret;
}

/*
 * Give every page back (remove path).  New isolations are refused; pages
 * already isolated come back through putback or leave through migrate, and
 * are deflated once they are on the list again.
 */
void bd_drain(struct balloond *vb)
{
	spin_lock(&vb->pages_lock);
	vb->refuse_isolation = true;
	spin_unlock(&vb->pages_lock);

	while (READ_ONCE(vb->num_pages)) {
		if (bd_deflate(vb, READ_ONCE(vb->num_pages)))
			continue;
		wait_event_timeout(vb->drain_wq, bd_drained_or_back(vb),
				   HZ / 10);
	}
}

/* After bd_drain(): accept isolations again (restore from suspend). */
void bd_pages_resume(struct balloond *vb)
{
	spin_lock(&vb->pages_lock);
	vb->refuse_isolation = false;
	spin_unlock(&vb->pages_lock);
}

/* ---- movable_operations ---------------------------------------------- */

static bool bd_isolate_page(struct page *page, isolate_mode_t mode)
{
	struct balloond *vb = bd_page_owner(page);
	bool isolated = false;

	/* Page locked by the caller: page->private cannot change under us. */
	if (WARN_ON_ONCE(!vb))
		return false;

	spin_lock(&vb->pages_lock);
	if (!vb->refuse_isolation) {
		list_del(&page->lru);
		if ((bd_flags(page) & BD_STATE) == BD_UNANNOUNCED) {
			/* Not pending any more: told when it comes back or
			 * as the arrival of its destination. */
			vb->n_unannounced--;
		} else {
			vb->on_list--;
			if (vb->use_split && vb->n_departing < BD_DEPART_MAX)
				vb->departing[vb->n_departing++] = page;
		}
		vb->isolated++;
		isolated = true;
	}
	spin_unlock(&vb->pages_lock);

	atomic_long_inc(isolated ? &vb->cnt.isolations :
				   &vb->cnt.isolate_refused);
	return isolated;
}

static void bd_putback_page(struct page *page)
{
	struct balloond *vb = bd_page_owner(page);

	if (WARN_ON_ONCE(!vb))
		return;

	bool unannounced = false;

	spin_lock(&vb->pages_lock);
	vb->isolated--;
	switch (bd_flags(page) & BD_STATE) {
	case BD_KNOWN:
		bd_departing_forget(vb, page);
		list_add(&page->lru, &vb->pages);
		vb->on_list++;
		break;
	case BD_SENDING:
	case BD_DEPARTED:
		/* The host no longer counts it (or will not once the buffer
		 * in flight is back): it has to be told again. */
		bd_set_flags(vb, page, BD_UNANNOUNCED | BD_RETURNING);
		fallthrough;
	default:
		list_add_tail(&page->lru, &vb->unannounced);
		vb->n_unannounced++;
		unannounced = true;
	}
	spin_unlock(&vb->pages_lock);

	if (unannounced)
		bd_queue_arrivals(vb);
	atomic_long_inc(&vb->cnt.putback);
	wake_up(&vb->drain_wq);
}

static int bd_migrate_page(struct page *newpage, struct page *page,
			   enum migrate_mode mode)
{
	struct balloond *vb = bd_page_owner(page);

	if (WARN_ON_ONCE(!vb))
		return -EAGAIN;
	if (bd_migration_begin(vb, page, newpage))
		return -EAGAIN;

	spin_lock(&vb->pages_lock);
	if (vb->use_split)
		bd_page_enter_unannounced(vb, newpage);
	else
		bd_page_enter(vb, newpage);
	vb->isolated--;
	bd_page_leave(vb, page);
	spin_unlock(&vb->pages_lock);

	bd_migration_done(vb);
	if (vb->use_split)
		bd_queue_arrivals(vb);

	/* Drop the balloon's reference; the isolation reference the core
	 * still holds is dropped after we return and frees the page. */
	put_page(page);
	return MIGRATEPAGE_SUCCESS;
}

static const struct movable_operations bd_mops = {
	.isolate_page	= bd_isolate_page,
	.migrate_page	= bd_migrate_page,
	.putback_page	= bd_putback_page,
};

/* ---- observability -------------------------------------------------- */

void bd_page_counts(struct balloond *vb, unsigned long *on_list,
		    unsigned long *isolated)
{
	spin_lock(&vb->pages_lock);
	*on_list = vb->on_list;
	*isolated = vb->isolated;
	spin_unlock(&vb->pages_lock);
}

static int bd_cmp_ulong(const void *a, const void *b)
{
	unsigned long x = *(const unsigned long *)a;
	unsigned long y = *(const unsigned long *)b;

	return x < y ? -1 : x > y;
}

/*
 * Copy the PFNs of the pages on the list (sorted) into a new array.  Pages
 * isolated at this instant are not on the list and so not included.  The
 * array is allocated outside the lock and the copy retried if the list grew
 * in between.
 */
/* How long a pfns read waits for balloon_lock to flush arrivals: 100 x 10 ms. */
#define BD_SNAPSHOT_LOCK_TRIES 100

int bd_pfns_snapshot(struct balloond *vb, unsigned long **pfns, size_t *n)
{
	unsigned long *arr;
	struct page *page;
	size_t cap, cnt;
	int tries;

	/*
	 * Pending arrivals are told first, so that the list below is all the
	 * host counts (but for pages isolated right now); it lists only pages
	 * the host knows either way.  The read must not wait for the host:
	 * with the host away (a daemon restarting) a batch in flight holds
	 * balloon_lock until it is back, so the lock is tried for a while
	 * and, if still held, the unannounced pages are simply not flushed
	 * (stats shows how many there are).
	 */
	for (tries = 0; tries < BD_SNAPSHOT_LOCK_TRIES; tries++) {
		if (mutex_trylock(&vb->balloon_lock)) {
			bd_flush_arrivals(vb);
			mutex_unlock(&vb->balloon_lock);
			break;
		}
		msleep(10);
	}

	for (;;) {
		spin_lock(&vb->pages_lock);
		cap = vb->on_list + 64;
		spin_unlock(&vb->pages_lock);

		arr = kvmalloc_array(cap, sizeof(*arr), GFP_KERNEL);
		if (!arr)
			return -ENOMEM;

		spin_lock(&vb->pages_lock);
		if (vb->on_list <= cap)
			break;
		spin_unlock(&vb->pages_lock);
		kvfree(arr);
	}

	cnt = 0;
	list_for_each_entry(page, &vb->pages, lru)
		arr[cnt++] = page_to_pfn(page);
	spin_unlock(&vb->pages_lock);

	sort(arr, cnt, sizeof(*arr), bd_cmp_ulong, NULL);
	*pfns = arr;
	*n = cnt;
	return 0;
}

#endif /* !BALLOOND_USE_BALLOON_CORE */
