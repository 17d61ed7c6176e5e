// SPDX-License-Identifier: GPL-2.0
/*
 * balloond_balloon: a virtio-balloon guest driver for the balloond device.
 *
 * It speaks the standard virtio-balloon protocol (inflate and deflate queues,
 * optional statistics queue, MUST_TELL_HOST, DEFLATE_ON_OOM) and, when the
 * device offers BALLOOND_F_MIGRATE_VQ, reports each page migration of a
 * ballooned page as one {old, new} record on an extra queue instead of the
 * stock inflate+deflate pair.  Free page hinting and free page reporting are
 * never negotiated.
 *
 * This file holds the virtio glue; see balloond_balloon.h for the layout.
 */
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/slab.h>
#include <linux/mm.h>
#include <linux/oom.h>
#include <linux/scatterlist.h>
#include <linux/vmstat.h>
#include <linux/virtio.h>
#include <linux/virtio_config.h>
#include <linux/virtio_balloon.h>

#include "balloond_balloon.h"

bool bd_migrate_ext = true;
module_param_named(migrate_ext, bd_migrate_ext, bool, 0644);
MODULE_PARM_DESC(migrate_ext,
		 "Use the migration-report queue when the device offers it (default 1); read when a device is bound");

bool bd_migrate_split = true;
module_param_named(migrate_split, bd_migrate_split, bool, 0644);
MODULE_PARM_DESC(migrate_split,
		 "With the migration-report queue, report a batch's departing pages in one buffer and their replacements later when the device offers it (default 1; movable-ops page layer only); read when a device is bound");

static unsigned int bd_oom_pages = 256;
module_param_named(oom_pages, bd_oom_pages, uint, 0644);
MODULE_PARM_DESC(oom_pages,
		 "Pages to give back per OOM notification when DEFLATE_ON_OOM is negotiated (default 256)");

/* ---- config space ---------------------------------------------------- */

/* The balloon's config space is little-endian even for legacy devices. */
u32 bd_read_target(struct balloond *vb)
{
	u32 num_pages;

	virtio_cread_le(vb->vdev, struct virtio_balloon_config, num_pages,
			&num_pages);
	return num_pages;
}

/* Called with balloon_lock held after every batch. */
void bd_write_actual(struct balloond *vb)
{
	u32 actual = vb->num_pages;

	lockdep_assert_held(&vb->balloon_lock);
	virtio_cwrite_le(vb->vdev, struct virtio_balloon_config, actual,
			 &actual);
}

/* ---- the page-layer-independent halves of a batch ------------------- */

/*
 * Pages for an inflate, allocated with no lock held: allocating may reclaim
 * or compact, and compaction may call back into the migration hook, which
 * takes balloon_lock.
 */
unsigned int bd_alloc_batch(struct balloond *vb, unsigned int want,
			    struct list_head *pages,
			    struct page *(*alloc)(void))
{
	struct page *page;
	unsigned int got;

	for (got = 0; got < want; got++) {
		page = alloc();
		if (!page)
			break;
		list_add(&page->lru, pages);
	}
	if (got < want) {
		atomic_long_inc(&vb->cnt.alloc_failures);
		dev_info_ratelimited(&vb->vdev->dev,
				     "out of memory: got %u of %u pages\n",
				     got, want);
	}
	return got;
}

/* With balloon_lock held: send the batch's n PFNs (in vb->pfns) on vq and
 * publish the new balloon size.  A failed send is logged, not retried: the
 * host learns the size from `actual` either way. */
void bd_publish_batch(struct balloond *vb, struct virtqueue *vq,
		      unsigned int n, const char *what)
{
	int err;

	if (!n)
		return;
	err = bd_send_pfns(vb, vq, n);
	if (err)
		dev_err_ratelimited(&vb->vdev->dev,
				    "%s of %u pages not sent: %d\n", what, n,
				    err);
	bd_write_actual(vb);
}

/* Deflated pages back to the guest, once the host has heard of them. */
void bd_give_back(struct balloond *vb, struct list_head *released)
{
	struct page *page, *tmp;

	list_for_each_entry_safe(page, tmp, released, lru) {
		list_del(&page->lru);
		bd_account(vb, page, 1);
		put_page(page);
	}
}

/*
 * The first half of moving a balloon page, the same for both page layers.
 * balloon_lock is only tried, never waited for: its holder may be inflating
 * and waiting for a page lock, or this may be direct compaction entered
 * from that very holder; the migration core retries -EAGAIN, then puts the
 * page back (but for an arrival flush, which is waited for: see
 * arrivals_in_flight).  The host hears of the move before it is made.  Returns 0 with
 * balloon_lock held and the balloon's reference taken on the new page, or
 * -EAGAIN without the lock.
 */
int bd_migration_begin(struct balloond *vb, struct page *page,
		       struct page *newpage)
{
	int err;

	if (!mutex_trylock(&vb->balloon_lock)) {
		/* Taken by an arrival flush (split migrations): waiting for
		 * it is safe, see arrivals_in_flight. */
		if (!READ_ONCE(vb->arrivals_in_flight) ||
		    !wait_event_timeout(vb->drain_wq,
					!READ_ONCE(vb->arrivals_in_flight),
					HZ) ||
		    !mutex_trylock(&vb->balloon_lock)) {
			atomic_long_inc(&vb->cnt.migrate_busy);
			return -EAGAIN;
		}
	}

	err = bd_report_migration(vb, page, newpage);
	if (err) {
		mutex_unlock(&vb->balloon_lock);
		atomic_long_inc(&vb->cnt.migrate_failures);
		dev_warn_ratelimited(&vb->vdev->dev,
				     "migration %lu -> %lu not reported: %d\n",
				     page_to_pfn(page), page_to_pfn(newpage),
				     err);
		return -EAGAIN;
	}

#if BALLOOND_BALLOON_API != 7
	/* The balloon's reference on the new page; the core drops its own. */
	get_page(newpage);
	if (page_zone(page) != page_zone(newpage)) {
		bd_account(vb, page, 1);
		bd_account(vb, newpage, -1);
	}
#endif
	/* On 7.x balloon_page_migrate() takes that reference and fixes the
	 * zones' managed counts itself once the hook returned 0. */
	return 0;
}

/* The second half, once the new page is in the balloon's list: drop
 * balloon_lock, count the move and wake a drain waiting for it. */
void bd_migration_done(struct balloond *vb)
{
	mutex_unlock(&vb->balloon_lock);
	atomic_long_inc(&vb->cnt.migrated);
	bd_count_migrate();
	wake_up(&vb->drain_wq);
}

/* ---- work scheduling ------------------------------------------------- */

/*
 * Pending arrivals (split migrations) are told once migrations have been
 * quiet for BD_ARRIVAL_DELAY: every new one pushes the work back, so it
 * does not take balloon_lock in the middle of a compaction run (where the
 * migrate callback would find it busy); during a run they ride along with
 * the next batch's departures anyway.  Callable from any context.
 */
void bd_queue_arrivals(struct balloond *vb)
{
	unsigned long flags;

	spin_lock_irqsave(&vb->stop_lock, flags);
	if (!vb->stop_work)
		mod_delayed_work(system_freezable_wq, &vb->arrival_work,
				 BD_ARRIVAL_DELAY);
	spin_unlock_irqrestore(&vb->stop_lock, flags);
}

static void bd_arrival_work_fn(struct work_struct *work)
{
	struct balloond *vb = container_of(to_delayed_work(work),
					   struct balloond, arrival_work);

	mutex_lock(&vb->balloon_lock);
	bd_flush_arrivals(vb);
	mutex_unlock(&vb->balloon_lock);
}

static void bd_queue_size_work(struct balloond *vb, unsigned long delay)
{
	unsigned long flags;

	spin_lock_irqsave(&vb->stop_lock, flags);
	if (!vb->stop_work)
		mod_delayed_work(system_freezable_wq, &vb->size_work, delay);
	spin_unlock_irqrestore(&vb->stop_lock, flags);
}

static void bd_config_changed(struct virtio_device *vdev)
{
	/* May run in interrupt context: defer to the worker. */
	bd_queue_size_work(vdev->priv, 0);
}

/*
 * One batch towards the target per run, then requeue: remove() and the
 * freezer get a chance between batches.  A short batch (out of memory, or
 * the pages to deflate are all isolated right now) retries after a pause.
 */
static void bd_size_work_fn(struct work_struct *work)
{
	struct balloond *vb = container_of(to_delayed_work(work),
					   struct balloond, size_work);
	u32 target = bd_read_target(vb);
	u32 cur = READ_ONCE(vb->num_pages);
	unsigned int want, done;

	if (target == cur)
		return;

	if (target > cur) {
		want = min_t(u32, target - cur, vb->batch);
		done = bd_inflate(vb, want);
	} else {
		want = min_t(u32, cur - target, vb->batch);
		done = bd_deflate(vb, want);
	}
	bd_queue_size_work(vb, done < want ? HZ / 5 : 0);
}

/* ---- statistics queue ------------------------------------------------ */

static inline u64 bd_bytes(unsigned long pages)
{
	return (u64)pages << PAGE_SHIFT;
}

static void bd_set_stat(struct balloond *vb, unsigned int *idx, u16 tag,
			u64 val)
{
	if (WARN_ON_ONCE(*idx >= VIRTIO_BALLOON_S_NR))
		return;
	vb->host_stats[*idx].tag = cpu_to_virtio16(vb->vdev, tag);
	vb->host_stats[*idx].val = cpu_to_virtio64(vb->vdev, val);
	(*idx)++;
}

/* Fill vb->host_stats; returns the number of entries. */
static unsigned int bd_fill_host_stats(struct balloond *vb)
{
	unsigned long *ev = vb->vm_events;
	unsigned int idx = 0;
	struct sysinfo si;

	si_meminfo(&si);
#ifdef CONFIG_VM_EVENT_COUNTERS
	all_vm_events(ev);
	bd_set_stat(vb, &idx, VIRTIO_BALLOON_S_SWAP_IN, bd_bytes(ev[PSWPIN]));
	bd_set_stat(vb, &idx, VIRTIO_BALLOON_S_SWAP_OUT, bd_bytes(ev[PSWPOUT]));
	bd_set_stat(vb, &idx, VIRTIO_BALLOON_S_MAJFLT, ev[PGMAJFAULT]);
	bd_set_stat(vb, &idx, VIRTIO_BALLOON_S_MINFLT,
		    ev[PGFAULT] - ev[PGMAJFAULT]);
#ifdef CONFIG_HUGETLB_PAGE
	bd_set_stat(vb, &idx, VIRTIO_BALLOON_S_HTLB_PGALLOC,
		    ev[HTLB_BUDDY_PGALLOC]);
	bd_set_stat(vb, &idx, VIRTIO_BALLOON_S_HTLB_PGFAIL,
		    ev[HTLB_BUDDY_PGALLOC_FAIL]);
#endif
#ifdef VIRTIO_BALLOON_S_OOM_KILL
	{
		/* The ALLOCSTALL_* events follow the zone order. */
		unsigned long stalls = 0;
		int zid;

		for (zid = 0; zid < MAX_NR_ZONES; zid++)
			stalls += ev[ALLOCSTALL_NORMAL - ZONE_NORMAL + zid];
		bd_set_stat(vb, &idx, VIRTIO_BALLOON_S_OOM_KILL, ev[OOM_KILL]);
		bd_set_stat(vb, &idx, VIRTIO_BALLOON_S_ALLOC_STALL, stalls);
		bd_set_stat(vb, &idx, VIRTIO_BALLOON_S_ASYNC_SCAN,
			    bd_bytes(ev[PGSCAN_KSWAPD]));
		bd_set_stat(vb, &idx, VIRTIO_BALLOON_S_DIRECT_SCAN,
			    bd_bytes(ev[PGSCAN_DIRECT]));
		bd_set_stat(vb, &idx, VIRTIO_BALLOON_S_ASYNC_RECLAIM,
			    bd_bytes(ev[PGSTEAL_KSWAPD]));
		bd_set_stat(vb, &idx, VIRTIO_BALLOON_S_DIRECT_RECLAIM,
			    bd_bytes(ev[PGSTEAL_DIRECT]));
	}
#endif
#endif /* CONFIG_VM_EVENT_COUNTERS */
	bd_set_stat(vb, &idx, VIRTIO_BALLOON_S_MEMFREE, bd_bytes(si.freeram));
	bd_set_stat(vb, &idx, VIRTIO_BALLOON_S_MEMTOT, bd_bytes(si.totalram));
	bd_set_stat(vb, &idx, VIRTIO_BALLOON_S_AVAIL,
		    bd_bytes(si_mem_available()));
	bd_set_stat(vb, &idx, VIRTIO_BALLOON_S_CACHES,
		    bd_bytes(global_node_page_state(NR_FILE_PAGES)));
	return idx;
}

/* Hand the (refilled) stats buffer to the device. */
static void bd_post_stats(struct balloond *vb)
{
	struct scatterlist sg;
	unsigned int n = bd_fill_host_stats(vb);
	int err;

	sg_init_one(&sg, vb->host_stats, n * sizeof(vb->host_stats[0]));
	err = virtqueue_add_outbuf(vb->stats_vq, &sg, 1, vb, GFP_KERNEL);
	if (err) {
		dev_warn_ratelimited(&vb->vdev->dev,
				     "cannot queue the stats buffer: %d\n", err);
		return;
	}
	virtqueue_kick(vb->stats_vq);
}

/*
 * The device asks for statistics by returning the buffer we gave it; we
 * take it back, refill it and give it again.
 */
static void bd_stats_work_fn(struct work_struct *work)
{
	struct balloond *vb = container_of(work, struct balloond, stats_work);
	unsigned int len;

	if (!virtqueue_get_buf(vb->stats_vq, &len))
		return;
	bd_post_stats(vb);
}

static void bd_stats_request(struct virtqueue *vq)
{
	struct balloond *vb = vq->vdev->priv;
	unsigned long flags;

	spin_lock_irqsave(&vb->stop_lock, flags);
	if (!vb->stop_work)
		queue_work(system_freezable_wq, &vb->stats_work);
	spin_unlock_irqrestore(&vb->stop_lock, flags);
}

/* Inflate, deflate and migrate queues: the host returned a buffer. */
static void bd_ack(struct virtqueue *vq)
{
	struct balloond *vb = vq->vdev->priv;

	wake_up(&vb->acked);
}

/* ---- OOM ------------------------------------------------------------- */

static int bd_oom_notify(struct notifier_block *nb, unsigned long unused,
			 void *parm)
{
	struct balloond *vb = container_of(nb, struct balloond, oom_nb);
	unsigned long *freed = parm;
	unsigned int n;

	/* The host asked for DEFLATE_ON_OOM: the guest's survival comes
	 * before the target.  The size worker is not kicked, so the balloon
	 * does not refill until the host changes the target again. */
	n = bd_deflate(vb, bd_oom_pages);
	*freed += n;
	atomic_long_add(n, &vb->cnt.oom_deflated);
	if (n)
		dev_info_ratelimited(&vb->vdev->dev,
				     "OOM: gave back %u pages\n", n);
	return NOTIFY_OK;
}

/* ---- queues ---------------------------------------------------------- */

/*
 * The driver numbers only the queues it uses, consecutively: inflate,
 * deflate, then stats if negotiated, then (free page hinting and reporting
 * are never negotiated) the migrate queue if the extension is in use.
 */
static int bd_init_vqs(struct balloond *vb)
{
	struct virtio_device *vdev = vb->vdev;
	struct virtqueue *vqs[BD_MAX_VQS];
	vq_callback_t *callbacks[BD_MAX_VQS];
	const char *names[BD_MAX_VQS];
	unsigned int n = 0, stats_idx = 0, migrate_idx = 0;
	int err;

	names[n] = "inflate";
	callbacks[n++] = bd_ack;
	names[n] = "deflate";
	callbacks[n++] = bd_ack;
	if (virtio_has_feature(vdev, VIRTIO_BALLOON_F_STATS_VQ)) {
		stats_idx = n;
		names[n] = "stats";
		callbacks[n++] = bd_stats_request;
	}
	if (vb->use_ext) {
		migrate_idx = n;
		names[n] = "migrate";
		callbacks[n++] = bd_ack;
	}

#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 11, 0)
	{
		struct virtqueue_info info[BD_MAX_VQS] = {};
		unsigned int i;

		for (i = 0; i < n; i++) {
			info[i].name = names[i];
			info[i].callback = callbacks[i];
		}
		err = virtio_find_vqs(vdev, n, vqs, info, NULL);
	}
#else
	err = virtio_find_vqs(vdev, n, vqs, callbacks, names, NULL);
#endif
	if (err)
		return err;

	vb->inflate_vq = vqs[0];
	vb->deflate_vq = vqs[1];
	vb->stats_vq = stats_idx ? vqs[stats_idx] : NULL;
	vb->migrate_vq = migrate_idx ? vqs[migrate_idx] : NULL;
	return 0;
}

/* ---- driver ---------------------------------------------------------- */

/* Queues exist: go live, hand the stats buffer over, start moving. */
static void bd_start(struct balloond *vb)
{
	virtio_device_ready(vb->vdev);
	if (vb->stats_vq)
		bd_post_stats(vb);
	if (bd_read_target(vb))
		bd_queue_size_work(vb, 0);
}

/* No work item runs or gets queued after this returns. */
static void bd_stop_work(struct balloond *vb)
{
	unsigned long flags;

	spin_lock_irqsave(&vb->stop_lock, flags);
	vb->stop_work = true;
	spin_unlock_irqrestore(&vb->stop_lock, flags);
	cancel_delayed_work_sync(&vb->size_work);
	cancel_work_sync(&vb->stats_work);
	/* Pending arrivals are told by the drain's deflates. */
	cancel_delayed_work_sync(&vb->arrival_work);
}

/* Every page back to the guest (the host told first), then the queues go. */
static void bd_shutdown(struct balloond *vb)
{
	bd_drain(vb);
	virtio_reset_device(vb->vdev);
	vb->vdev->config->del_vqs(vb->vdev);
	vb->inflate_vq = vb->deflate_vq = vb->stats_vq = vb->migrate_vq = NULL;
}

static int bd_validate(struct virtio_device *vdev)
{
	if (!vdev->config->get)
		return -EINVAL;
	/*
	 * Runs after the feature bits are intersected and before they are
	 * acknowledged to the device: dropping the bit here means the
	 * extension is not negotiated at all, so the device does not expect
	 * the migrate queue.
	 */
	if (!bd_migrate_ext)
		__virtio_clear_bit(vdev, BALLOOND_F_MIGRATE_VQ);
	/*
	 * Split migrations need the extension's queue and the driver's own
	 * isolate_page (the movable-ops layer): with the balloon core the
	 * kernel isolates, and each migration stays one whole record.
	 */
	if (!bd_migrate_ext || !bd_migrate_split || BALLOOND_USE_BALLOON_CORE)
		__virtio_clear_bit(vdev, BALLOOND_F_MIGRATE_SPLIT);
	return 0;
}

static int bd_probe(struct virtio_device *vdev)
{
	struct balloond *vb;
	int err;

	/* Balloon pages are guest pages; the protocol counts 4 KiB frames. */
	BUILD_BUG_ON(PAGE_SHIFT != VIRTIO_BALLOON_PFN_SHIFT);
	BUILD_BUG_ON(BALLOOND_PFN_SHIFT != VIRTIO_BALLOON_PFN_SHIFT);
	BUILD_BUG_ON(sizeof(struct balloond_migration) != 16);

	vb = kzalloc(sizeof(*vb), GFP_KERNEL);
	if (!vb)
		return -ENOMEM;
	vdev->priv = vb;
	vb->vdev = vdev;
	vb->use_ext = virtio_has_feature(vdev, BALLOOND_F_MIGRATE_VQ);
	vb->batch = vb->use_ext ? BALLOOND_PFNS_PER_BUFFER : BD_PFNS_STOCK;
	vb->use_split = vb->use_ext &&
		virtio_has_feature(vdev, BALLOOND_F_MIGRATE_SPLIT);
	vb->deflate_on_oom =
		virtio_has_feature(vdev, VIRTIO_BALLOON_F_DEFLATE_ON_OOM);
	vb->must_tell_host =
		virtio_has_feature(vdev, VIRTIO_BALLOON_F_MUST_TELL_HOST);

	spin_lock_init(&vb->stop_lock);
	INIT_DELAYED_WORK(&vb->size_work, bd_size_work_fn);
	INIT_WORK(&vb->stats_work, bd_stats_work_fn);
	INIT_DELAYED_WORK(&vb->arrival_work, bd_arrival_work_fn);
	init_waitqueue_head(&vb->acked);
	init_waitqueue_head(&vb->drain_wq);
	mutex_init(&vb->balloon_lock);
	bd_pages_init(vb);

	if (vb->use_ext) {
		vb->migr_buf = kcalloc(BALLOOND_MIGRATIONS_PER_BUFFER,
				       sizeof(*vb->migr_buf), GFP_KERNEL);
		if (!vb->migr_buf) {
			err = -ENOMEM;
			goto err_free;
		}
	}

	err = bd_init_vqs(vb);
	if (err)
		goto err_free;

	if (vb->deflate_on_oom) {
		vb->oom_nb.notifier_call = bd_oom_notify;
		vb->oom_nb.priority = 80;
		err = register_oom_notifier(&vb->oom_nb);
		if (err)
			goto err_del_vqs;
	}

	bd_start(vb);
	bd_debugfs_init(vb);

	dev_info(&vdev->dev,
		 "balloon ready: pages=%s stats=%s deflate-on-oom=%s must-tell-host=%s migrate-ext=%s%s\n",
		 bd_page_layer, vb->stats_vq ? "yes" : "no",
		 vb->deflate_on_oom ? "yes" : "no",
		 vb->must_tell_host ? "yes" : "no",
		 vb->use_ext ? "yes" : "no", vb->use_split ? " (split)" : "");
	return 0;

err_del_vqs:
	vdev->config->del_vqs(vdev);
err_free:
	kfree(vb->migr_buf);
	kfree(vb);
	vdev->priv = NULL;
	return err;
}

static void bd_remove(struct virtio_device *vdev)
{
	struct balloond *vb = vdev->priv;

	bd_stop_work(vb);
	if (vb->deflate_on_oom)
		unregister_oom_notifier(&vb->oom_nb);
	bd_debugfs_exit(vb);
	bd_shutdown(vb);

	kfree(vb->migr_buf);
	kfree(vb);
	vdev->priv = NULL;
}

#ifdef CONFIG_PM_SLEEP
/*
 * Suspend and hibernation reset the device, so the queues cannot survive:
 * like remove, give every page back (telling the host) and drop the queues;
 * restore sets them up again and lets the size worker re-inflate.  The PM
 * core has frozen system_freezable_wq already; stopping the work makes sure
 * nothing queued meanwhile runs before restore.
 */
static int bd_freeze(struct virtio_device *vdev)
{
	struct balloond *vb = vdev->priv;

	bd_stop_work(vb);
	bd_shutdown(vb);
	return 0;
}

static int bd_restore(struct virtio_device *vdev)
{
	struct balloond *vb = vdev->priv;
	unsigned long flags;
	int err;

	err = bd_init_vqs(vb);
	if (err)
		return err;
	bd_pages_resume(vb);
	spin_lock_irqsave(&vb->stop_lock, flags);
	vb->stop_work = false;
	spin_unlock_irqrestore(&vb->stop_lock, flags);
	bd_start(vb);
	return 0;
}
#endif

static const struct virtio_device_id bd_id_table[] = {
	{ VIRTIO_ID_BALLOON, VIRTIO_DEV_ANY_ID },
	{ 0 },
};
MODULE_DEVICE_TABLE(virtio, bd_id_table);

static unsigned int bd_features[] = {
	VIRTIO_BALLOON_F_MUST_TELL_HOST,
	VIRTIO_BALLOON_F_STATS_VQ,
	VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
	BALLOOND_F_MIGRATE_VQ,
	BALLOOND_F_MIGRATE_SPLIT,
};

static struct virtio_driver bd_driver = {
	.feature_table		= bd_features,
	.feature_table_size	= ARRAY_SIZE(bd_features),
	.driver.name		= KBUILD_MODNAME,
#ifndef register_virtio_driver
	/* Kernels before the owner-passing register macro need it here. */
	.driver.owner		= THIS_MODULE,
#endif
	.id_table		= bd_id_table,
	.validate		= bd_validate,
	.probe			= bd_probe,
	.remove			= bd_remove,
	.config_changed		= bd_config_changed,
#ifdef CONFIG_PM_SLEEP
	.freeze			= bd_freeze,
	.restore		= bd_restore,
#endif
};

module_virtio_driver(bd_driver);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("virtio-balloon guest driver with balloond migration reports");
