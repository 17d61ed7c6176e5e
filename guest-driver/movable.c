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
 * Module unload is safe because remove() refuses new isolations and waits
 * until every page has left the balloon; a page leaves only under its page
 * lock, and the core holds that lock around every callback it makes, so no
 * callback into this module can be running or start afterwards.
 */
#include <linux/mm.h>
#include <linux/migrate.h>
#include <linux/pagemap.h>
#include <linux/sort.h>
#include <linux/slab.h>

#include "balloond_balloon.h"

#if !BALLOOND_USE_BALLOON_CORE

const char *const bd_page_layer = "movable-ops";

static const struct movable_operations bd_mops;

static inline struct balloond *bd_page_owner(struct page *page)
{
	return (struct balloond *)page_private(page);
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

void bd_pages_init(struct balloond *vb)
{
	spin_lock_init(&vb->pages_lock);
	INIT_LIST_HEAD(&vb->pages);
	vb->on_list = 0;
	vb->isolated = 0;
	vb->refuse_isolation = false;
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

	want = min_t(unsigned int, want, BD_PFNS_PER_BATCH);
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
	want = min3(want, (unsigned int)BD_PFNS_PER_BATCH, vb->num_pages);

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
	ret = vb->on_list || !vb->isolated;
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
		vb->on_list--;
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

	spin_lock(&vb->pages_lock);
	list_add(&page->lru, &vb->pages);
	vb->on_list++;
	vb->isolated--;
	spin_unlock(&vb->pages_lock);

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
	bd_page_enter(vb, newpage);
	vb->isolated--;
	bd_page_leave(vb, page);
	spin_unlock(&vb->pages_lock);

	bd_migration_done(vb);

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
int bd_pfns_snapshot(struct balloond *vb, unsigned long **pfns, size_t *n)
{
	unsigned long *arr;
	struct page *page;
	size_t cap, cnt;

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
