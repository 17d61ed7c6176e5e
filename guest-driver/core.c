// SPDX-License-Identifier: GPL-2.0
/*
 * balloond_balloon: page layer on top of the kernel's balloon core.
 *
 * Used on 6.17 and later, where the kernel picks a page's movable_operations
 * from its page type and keeps the PageOffline slot for the balloon core, so
 * a module can no longer register movable_operations of its own.  The core
 * then owns isolation and putback and calls our migratepage hook to move a
 * page.  Two contracts, chosen by balloond_balloon.h from the header the
 * kernel has:
 *
 * 6.x, <linux/balloon_compaction.h> (BALLOOND_BALLOON_API 6): the list,
 *   isolated_pages and page->private are the core's, under bdev.pages_lock.
 *   The driver's migratepage inserts the new page (balloon_page_insert,
 *   isolated_pages--) under bdev.pages_lock, finalizes the old page and
 *   drops its reference.  The same code builds and runs on 6.1 and 6.12
 *   with BALLOOND_BALLOON_CORE=1, which is how it is exercised in CI.
 *
 * 7.x, <linux/balloon.h> (BALLOOND_BALLOON_API 7), as 7.3 has it.  The
 *   header's rules, and where this file follows them:
 *     i.  inflation/deflation set/clear page->private under
 *         balloon_pages_lock: we never touch page->private; we enqueue with
 *         balloon_page_enqueue() and dequeue with balloon_page_list_dequeue(),
 *         which do it under that lock (bd_inflate, bd_deflate);
 *     ii. isolation or dequeueing removes the page from the device's list
 *         under balloon_pages_lock: isolation is the core's own callback;
 *         our only dequeue is balloon_page_list_dequeue(), and we never
 *         walk or edit bdev.pages, since the lock is private to mm/balloon.c
 *         (bd_page_counts, bd_pfns_snapshot use our own record instead).
 *   The hook only tells the host: balloon_page_migrate() then takes the
 *   balloon's reference on the new page, inserts it (page->private, list,
 *   isolated_pages--) and finalizes and releases the old one, all under
 *   balloon_pages_lock, and fixes managed-page counts across zones because
 *   we set bdev.adjust_managed_page_count.  The page lock is no longer part
 *   of the protocol: the hook runs with neither page locked, and relies on
 *   balloon_lock alone (trylocked, so compaction started by an allocation
 *   made under it cannot deadlock).  The hook never returns -ENOENT (old
 *   page deflated, new one not inflated): it reports the whole move or
 *   nothing and returns -EAGAIN.
 */
#include <linux/mm.h>
#include <linux/migrate.h>
#include <linux/pagemap.h>
#include <linux/sort.h>
#include <linux/slab.h>

#include "balloond_balloon.h"

#if BALLOOND_BALLOON_API == 7

#ifndef CONFIG_BALLOON_MIGRATION
#error "the balloon-core page layer needs CONFIG_BALLOON_MIGRATION"
#endif

const char *const bd_page_layer = "balloon-core";

/* Any non-NULL entry: frames records presence only. */
#define BD_FRAME	xa_mk_value(1)

static int bd_core_migratepage(struct balloon_dev_info *bdev,
			       struct page *newpage, struct page *page,
			       enum migrate_mode mode)
{
	struct balloond *vb = container_of(bdev, struct balloond, bdev);
	unsigned long newpfn = page_to_pfn(newpage);

	/* Room for the new frame first, without reclaim (we may be inside
	 * compaction): if there is none, the move is retried later. */
	if (xa_reserve(&vb->frames, newpfn, GFP_NOWAIT | __GFP_NOWARN)) {
		atomic_long_inc(&vb->cnt.migrate_busy);
		return -EAGAIN;
	}
	if (bd_migration_begin(vb, page, newpage)) {
		xa_release(&vb->frames, newpfn);
		return -EAGAIN;
	}
	/* balloon_lock held: the host now has newpage instead of page. */
	xa_store(&vb->frames, newpfn, BD_FRAME, GFP_NOWAIT | __GFP_NOWARN);
	xa_erase(&vb->frames, page_to_pfn(page));
	bd_migration_done(vb);
	return 0;	/* the core moves the pages between lists and references */
}

void bd_pages_init(struct balloond *vb)
{
	balloon_devinfo_init(&vb->bdev);
	vb->bdev.migratepage = bd_core_migratepage;
	/* The core adjusts managed pages in enqueue, dequeue and migration. */
	vb->bdev.adjust_managed_page_count = !vb->deflate_on_oom;
	xa_init(&vb->frames);
}

unsigned int bd_inflate(struct balloond *vb, unsigned int want)
{
	LIST_HEAD(fresh);
	struct page *page, *tmp;
	unsigned int n = 0;

	want = min_t(unsigned int, want, vb->batch);
	if (!bd_alloc_batch(vb, want, &fresh, balloon_page_alloc))
		return 0;

	/*
	 * Room in frames for every page, made before balloon_lock is taken:
	 * an allocation under it could enter reclaim and the OOM killer, whose
	 * notifier deflates and so takes balloon_lock.  A page we cannot
	 * record never becomes a balloon page; only our reference is dropped.
	 */
	list_for_each_entry_safe(page, tmp, &fresh, lru) {
		if (xa_reserve(&vb->frames, page_to_pfn(page), GFP_KERNEL)) {
			list_del(&page->lru);
			put_page(page);
		}
	}

	mutex_lock(&vb->balloon_lock);
	list_for_each_entry_safe(page, tmp, &fresh, lru) {
		list_del(&page->lru);
		/* Into the slot reserved above: nothing is allocated. */
		xa_store(&vb->frames, page_to_pfn(page), BD_FRAME, GFP_NOWAIT);
		/* Rule i: page->private is set under balloon_pages_lock by the
		 * core; it also counts BALLOON_INFLATE and adjusts managed
		 * pages. */
		balloon_page_enqueue(&vb->bdev, page);
		vb->pfns[n++] = bd_pfn32(vb, page);
	}
	vb->num_pages += n;
	bd_publish_batch(vb, vb->inflate_vq, n, "inflate");
	mutex_unlock(&vb->balloon_lock);

	atomic_long_add(n, &vb->cnt.inflated);
	return n;
}

unsigned int bd_deflate(struct balloond *vb, unsigned int want)
{
	LIST_HEAD(released);
	struct page *page;
	unsigned int n = 0;
	size_t got;

	mutex_lock(&vb->balloon_lock);
	want = min3(want, vb->batch, vb->num_pages);

	/* Rules i and ii: the core takes the pages off the list and clears
	 * page->private under balloon_pages_lock; it also counts
	 * BALLOON_DEFLATE and gives the managed pages back.  Isolated pages
	 * are not on the list, so they are never dequeued. */
	got = balloon_page_list_dequeue(&vb->bdev, &released, want);
	list_for_each_entry(page, &released, lru) {
		vb->pfns[n++] = bd_pfn32(vb, page);
		xa_erase(&vb->frames, page_to_pfn(page));
	}
	WARN_ON_ONCE(n != got);

	vb->num_pages -= n;
	/* Host first, then reuse (MUST_TELL_HOST order, always kept). */
	bd_publish_batch(vb, vb->deflate_vq, n, "deflate");
	mutex_unlock(&vb->balloon_lock);
	bd_give_back(vb, &released);

	atomic_long_add(n, &vb->cnt.deflated);
	return n;
}

/*
 * Give every page back.  The core's isolate callback cannot be told to
 * refuse, so pages may keep being isolated while we drain; each one comes
 * back through putback (onto the list) or leaves through a migration (its
 * replacement goes onto the list), and we keep deflating until num_pages,
 * which counts isolated pages too, reaches zero.  Whether the list is
 * empty is read without balloon_pages_lock (list_empty() is one READ_ONCE):
 * it only decides whether to sleep for a tenth of a second first.
 */
void bd_drain(struct balloond *vb)
{
	while (READ_ONCE(vb->num_pages)) {
		if (bd_deflate(vb, READ_ONCE(vb->num_pages)))
			continue;
		wait_event_timeout(vb->drain_wq, !list_empty(&vb->bdev.pages),
				   HZ / 10);
	}
	xa_destroy(&vb->frames);
}

void bd_pages_resume(struct balloond *vb)
{
	/* Nothing to undo: the balloon core never refuses isolation. */
}

/* For debugfs: isolated_pages is read without balloon_pages_lock (rule ii
 * keeps us off it), so the split is a moment's figure, not a snapshot. */
void bd_page_counts(struct balloond *vb, unsigned long *on_list,
		    unsigned long *isolated)
{
	unsigned long all = READ_ONCE(vb->num_pages);
	unsigned long iso = READ_ONCE(vb->bdev.isolated_pages);

	*isolated = iso;
	*on_list = all > iso ? all - iso : 0;
}

/* How often a pfns read starts its walk again when the balloon outgrew its
 * array during the walk (a balloon that keeps growing is still listed). */
#define BD_SNAPSHOT_TRIES 8

/*
 * The frames the host holds, ascending (xarray order).
 *
 * Walked without balloon_lock: a read must not wait for the host, and with
 * the host away (a daemon restarting) a buffer in flight holds balloon_lock
 * until it is back.  The walk is safe while frames changes (each step is an
 * RCU lookup; reserved slots are skipped), so a balloon at rest lists exactly
 * itself and one that changes meanwhile lists frames each of which was in it
 * during the walk.  A walk that finds more frames than its array holds is
 * made again with a larger one, BD_SNAPSHOT_TRIES times at most.
 */
int bd_pfns_snapshot(struct balloond *vb, unsigned long **pfns, size_t *n)
{
	unsigned long *arr, index;
	size_t cap, cnt;
	void *entry;
	int tries;

	for (tries = 0; ; tries++) {
		cap = READ_ONCE(vb->num_pages) + 64;
		arr = kvmalloc_array(cap, sizeof(*arr), GFP_KERNEL);
		if (!arr)
			return -ENOMEM;
		cnt = 0;
		xa_for_each(&vb->frames, index, entry) {
			if (cnt == cap)
				break;
			arr[cnt++] = index;
		}
		if (cnt < cap || tries + 1 == BD_SNAPSHOT_TRIES)
			break;
		/* Full: the balloon grew during the walk. */
		kvfree(arr);
	}

	*pfns = arr;
	*n = cnt;
	return 0;
}

#elif BALLOOND_USE_BALLOON_CORE

#ifndef CONFIG_BALLOON_COMPACTION
#error "the balloon-core page layer needs CONFIG_BALLOON_COMPACTION"
#endif

const char *const bd_page_layer = "balloon-core";

static int bd_core_migratepage(struct balloon_dev_info *bdev,
			       struct page *newpage, struct page *page,
			       enum migrate_mode mode)
{
	struct balloond *vb = container_of(bdev, struct balloond, bdev);
	unsigned long flags;

	if (bd_migration_begin(vb, page, newpage))
		return -EAGAIN;

	spin_lock_irqsave(&bdev->pages_lock, flags);
	balloon_page_insert(bdev, newpage);
	bdev->isolated_pages--;
	spin_unlock_irqrestore(&bdev->pages_lock, flags);

	/* Old page: no longer a balloon page (movable state, private and,
	 * depending on the kernel, the offline type are cleared). */
	balloon_page_finalize(page);

	bd_migration_done(vb);

	put_page(page);		/* the balloon's reference */
	return 0;		/* success */
}

void bd_pages_init(struct balloond *vb)
{
	balloon_devinfo_init(&vb->bdev);
	vb->bdev.migratepage = bd_core_migratepage;
}

unsigned int bd_inflate(struct balloond *vb, unsigned int want)
{
	LIST_HEAD(fresh);
	struct page *page, *tmp;
	unsigned int n = 0;

	want = min_t(unsigned int, want, vb->batch);
	if (!bd_alloc_batch(vb, want, &fresh, balloon_page_alloc))
		return 0;

	mutex_lock(&vb->balloon_lock);
	list_for_each_entry_safe(page, tmp, &fresh, lru) {
		list_del(&page->lru);
		/* Counts BALLOON_INFLATE in /proc/vmstat itself. */
		balloon_page_enqueue(&vb->bdev, page);
		bd_account(vb, page, -1);
		vb->pfns[n++] = bd_pfn32(vb, page);
	}
	vb->num_pages += n;
	bd_publish_batch(vb, vb->inflate_vq, n, "inflate");
	mutex_unlock(&vb->balloon_lock);

	atomic_long_add(n, &vb->cnt.inflated);
	return n;
}

unsigned int bd_deflate(struct balloond *vb, unsigned int want)
{
	LIST_HEAD(released);
	struct page *page;
	unsigned int n = 0;
	size_t got;

	mutex_lock(&vb->balloon_lock);
	want = min3(want, vb->batch, vb->num_pages);

	/* Takes pages off the list and finalizes them; counts
	 * BALLOON_DEFLATE itself.  Isolated pages are not on the list. */
	got = balloon_page_list_dequeue(&vb->bdev, &released, want);
	list_for_each_entry(page, &released, lru)
		vb->pfns[n++] = bd_pfn32(vb, page);
	WARN_ON_ONCE(n != got);

	vb->num_pages -= n;
	/* Host first, then reuse (MUST_TELL_HOST order, always kept). */
	bd_publish_batch(vb, vb->deflate_vq, n, "deflate");
	mutex_unlock(&vb->balloon_lock);
	bd_give_back(vb, &released);

	atomic_long_add(n, &vb->cnt.deflated);
	return n;
}

static bool bd_core_list_nonempty(struct balloond *vb)
{
	unsigned long flags;
	bool ret;

	spin_lock_irqsave(&vb->bdev.pages_lock, flags);
	ret = !list_empty(&vb->bdev.pages) || !vb->bdev.isolated_pages;
	spin_unlock_irqrestore(&vb->bdev.pages_lock, flags);
	return ret;
}

/*
 * Give every page back.  The core's isolate callback cannot be told to
 * refuse, so pages may keep being isolated while we drain; each one comes
 * back through putback (onto the list) or leaves through our migratepage
 * hook (its replacement goes onto the list), and we keep deflating until
 * num_pages, which counts isolated pages too, reaches zero.
 */
void bd_drain(struct balloond *vb)
{
	while (READ_ONCE(vb->num_pages)) {
		if (bd_deflate(vb, READ_ONCE(vb->num_pages)))
			continue;
		wait_event_timeout(vb->drain_wq, bd_core_list_nonempty(vb),
				   HZ / 10);
	}
}

void bd_pages_resume(struct balloond *vb)
{
	/* Nothing to undo: the balloon core never refuses isolation. */
}

void bd_page_counts(struct balloond *vb, unsigned long *on_list,
		    unsigned long *isolated)
{
	unsigned long flags, cnt = 0;
	struct page *page;

	spin_lock_irqsave(&vb->bdev.pages_lock, flags);
	list_for_each_entry(page, &vb->bdev.pages, lru)
		cnt++;
	*isolated = vb->bdev.isolated_pages;
	spin_unlock_irqrestore(&vb->bdev.pages_lock, flags);
	*on_list = cnt;
}

static int bd_cmp_ulong(const void *a, const void *b)
{
	unsigned long x = *(const unsigned long *)a;
	unsigned long y = *(const unsigned long *)b;

	return x < y ? -1 : x > y;
}

int bd_pfns_snapshot(struct balloond *vb, unsigned long **pfns, size_t *n)
{
	unsigned long *arr, isolated, on_list, flags;
	struct page *page;
	size_t cap, cnt;

	for (;;) {
		bd_page_counts(vb, &on_list, &isolated);
		cap = on_list + 64;
		arr = kvmalloc_array(cap, sizeof(*arr), GFP_KERNEL);
		if (!arr)
			return -ENOMEM;

		spin_lock_irqsave(&vb->bdev.pages_lock, flags);
		cnt = 0;
		list_for_each_entry(page, &vb->bdev.pages, lru)
			cnt++;
		if (cnt <= cap)
			break;
		/* The list grew past the array meanwhile: try again. */
		spin_unlock_irqrestore(&vb->bdev.pages_lock, flags);
		kvfree(arr);
	}
	cnt = 0;
	list_for_each_entry(page, &vb->bdev.pages, lru)
		arr[cnt++] = page_to_pfn(page);
	spin_unlock_irqrestore(&vb->bdev.pages_lock, flags);

	sort(arr, cnt, sizeof(*arr), bd_cmp_ulong, NULL);
	*pfns = arr;
	*n = cnt;
	return 0;
}

#endif

#if BALLOOND_USE_BALLOON_CORE
/*
 * Split migrations are never negotiated with the balloon core (validate()
 * clears the bit): the core isolates pages without telling the driver, so
 * there is no batch to announce, and each migration stays one record.
 */
int bd_report_departure(struct balloond *vb, struct page *page)
{
	WARN_ON_ONCE(1);
	return -EINVAL;
}

int bd_flush_arrivals(struct balloond *vb)
{
	return 0;
}
#endif /* BALLOOND_USE_BALLOON_CORE */
