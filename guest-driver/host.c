// SPDX-License-Identifier: GPL-2.0
/*
 * balloond_balloon: telling the host.
 *
 * Every function here is called with vb->balloon_lock held: the buffers it
 * hands to the device (vb->pfns, vb->migr_buf) belong to the device until it
 * returns them, and the queues are driven by one caller at a time.  Each call
 * waits until the device has returned the buffer, so when it comes back the
 * host's bookkeeping is done and the pages concerned may be reused.
 */
#include <linux/scatterlist.h>
#include <linux/mm.h>

#include "balloond_balloon.h"

/*
 * Put one device-readable buffer on @vq, notify, and sleep until the device
 * gives it back.  The buffer is a single scatterlist entry, so the ring never
 * needs an indirect table and adding it allocates nothing; GFP_NOWAIT keeps
 * that true on the migration path, which may run inside direct compaction.
 */
static int bd_tell_host(struct balloond *vb, struct virtqueue *vq,
			void *buf, unsigned int len)
{
	struct scatterlist sg;
	unsigned int used;
	int err;

	sg_init_one(&sg, buf, len);
	err = virtqueue_add_outbuf(vq, &sg, 1, vb, GFP_NOWAIT);
	if (err) {
		dev_warn_ratelimited(&vb->vdev->dev,
				     "cannot queue a buffer on %s: %d\n",
				     vq->name, err);
		return err;
	}
	virtqueue_kick(vq);
	wait_event(vb->acked, virtqueue_get_buf(vq, &used));
	return 0;
}

/* Send vb->pfns[0..n) on the inflate or the deflate queue. */
int bd_send_pfns(struct balloond *vb, struct virtqueue *vq, unsigned int n)
{
	lockdep_assert_held(&vb->balloon_lock);
	if (!n)
		return 0;
	return bd_tell_host(vb, vq, vb->pfns, n * sizeof(vb->pfns[0]));
}

/*
 * Send vb->migr_buf[0..n) on the migrate queue as one buffer.  The format
 * allows up to BALLOOND_MIGRATIONS_PER_BUFFER records per buffer; the device
 * reads len / sizeof(record) of them.
 */
int bd_send_migrations(struct balloond *vb, unsigned int n)
{
	int err;

	lockdep_assert_held(&vb->balloon_lock);
	if (WARN_ON_ONCE(!vb->migrate_vq || n > BALLOOND_MIGRATIONS_PER_BUFFER))
		return -EINVAL;
	if (!n)
		return 0;
	err = bd_tell_host(vb, vb->migrate_vq, vb->migr_buf,
			   n * sizeof(vb->migr_buf[0]));
	if (!err) {
		atomic_long_add(n, &vb->cnt.ext_records);
		atomic_long_inc(&vb->cnt.ext_buffers);
	}
	return err;
}

/*
 * Tell the host that balloon membership moves from @oldpage to @newpage.
 * Called from the migrate path with both pages locked and balloon_lock held,
 * before anything about the pages has changed: on failure the caller returns
 * -EAGAIN and the migration is simply not done.
 *
 * With split migrations it is the old page's departure (see movable.c).
 * With the extension this is one record on the migrate queue.  Without it,
 * it is the stock protocol's pair: a one-page inflate of @newpage, then a
 * one-page deflate of @oldpage, which any virtio-balloon device understands.
 * If the inflate went through but the deflate cannot be queued the device is
 * broken (the queue is idle and has room otherwise); the migration goes on,
 * because undoing the inflate would need the same broken queue.
 */
int bd_report_migration(struct balloond *vb, struct page *oldpage,
			struct page *newpage)
{
	int err;

	lockdep_assert_held(&vb->balloon_lock);

	/* Split migrations: the host stops counting the old page now (with
	 * the rest of its batch, in one buffer); the new one is told later. */
	if (vb->use_split)
		return bd_report_departure(vb, oldpage);

	if (vb->use_ext) {
		vb->migr_buf[0].old_pfn = cpu_to_le64(page_to_pfn(oldpage));
		vb->migr_buf[0].new_pfn = cpu_to_le64(page_to_pfn(newpage));
		return bd_send_migrations(vb, 1);
	}

	vb->pfns[0] = bd_pfn32(vb, newpage);
	err = bd_send_pfns(vb, vb->inflate_vq, 1);
	if (err)
		return err;

	vb->pfns[0] = bd_pfn32(vb, oldpage);
	err = bd_send_pfns(vb, vb->deflate_vq, 1);
	if (err)
		dev_err_ratelimited(&vb->vdev->dev,
				    "deflate of migrated pfn %lu not sent: %d\n",
				    page_to_pfn(oldpage), err);
	atomic_long_inc(&vb->cnt.fallback_pairs);
	return 0;
}
