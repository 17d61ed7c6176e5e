// SPDX-License-Identifier: GPL-2.0
/*
 * balloond_balloon: debugfs.
 *
 *   /sys/kernel/debug/balloond/pfns   one decimal 4 KiB PFN per line, sorted,
 *                                     of every page on the balloon's list
 *                                     (pages isolated by the migration core
 *                                     at that instant are not listed; stats
 *                                     shows how many there are)
 *   /sys/kernel/debug/balloond/stats  "name: value" lines
 *
 * A second balloon device, should one ever appear, gets "balloond-<dev>".
 * debugfs_remove_recursive() waits for readers inside our callbacks, so the
 * files never outlive struct balloond.
 */
#include <linux/debugfs.h>
#include <linux/seq_file.h>
#include <linux/slab.h>
#include <linux/mm.h>

#include "balloond_balloon.h"

struct bd_pfn_snap {
	unsigned long *pfn;
	size_t n;
};

static void *bd_pfns_start(struct seq_file *m, loff_t *pos)
{
	struct bd_pfn_snap *snap = m->private;

	return *pos < snap->n ? &snap->pfn[*pos] : NULL;
}

static void *bd_pfns_next(struct seq_file *m, void *v, loff_t *pos)
{
	++*pos;
	return bd_pfns_start(m, pos);
}

static void bd_pfns_stop(struct seq_file *m, void *v)
{
}

static int bd_pfns_show(struct seq_file *m, void *v)
{
	seq_printf(m, "%lu\n", *(unsigned long *)v);
	return 0;
}

static const struct seq_operations bd_pfns_sops = {
	.start	= bd_pfns_start,
	.next	= bd_pfns_next,
	.stop	= bd_pfns_stop,
	.show	= bd_pfns_show,
};

/* The list is copied once at open (under the balloon's list lock, see
 * bd_pfns_snapshot()) so that reading never holds a lock across read()
 * calls and costs O(n) however the reads are chunked. */
static int bd_pfns_open(struct inode *inode, struct file *file)
{
	struct balloond *vb = inode->i_private;
	struct bd_pfn_snap *snap;
	int err;

	snap = kzalloc(sizeof(*snap), GFP_KERNEL);
	if (!snap)
		return -ENOMEM;
	err = bd_pfns_snapshot(vb, &snap->pfn, &snap->n);
	if (err)
		goto err_free;
	err = seq_open(file, &bd_pfns_sops);
	if (err)
		goto err_free_arr;
	((struct seq_file *)file->private_data)->private = snap;
	return 0;

err_free_arr:
	kvfree(snap->pfn);
err_free:
	kfree(snap);
	return err;
}

static int bd_pfns_release(struct inode *inode, struct file *file)
{
	struct bd_pfn_snap *snap = ((struct seq_file *)file->private_data)->private;

	kvfree(snap->pfn);
	kfree(snap);
	return seq_release(inode, file);
}

static const struct file_operations bd_pfns_fops = {
	.owner		= THIS_MODULE,
	.open		= bd_pfns_open,
	.read		= seq_read,
	.llseek		= seq_lseek,
	.release	= bd_pfns_release,
};

static void bd_show_counter(struct seq_file *m, const char *name,
			    atomic_long_t *v)
{
	seq_printf(m, "%s: %ld\n", name, atomic_long_read(v));
}

static int bd_stats_show(struct seq_file *m, void *unused)
{
	struct balloond *vb = m->private;
	struct bd_counters *c = &vb->cnt;
	unsigned long on_list, isolated;
	bool own_ops = !BALLOOND_USE_BALLOON_CORE;

	bd_page_counts(vb, &on_list, &isolated);

	seq_printf(m, "pages: %u\n", READ_ONCE(vb->num_pages));
	seq_printf(m, "target: %u\n", bd_read_target(vb));
	seq_printf(m, "on_list: %lu\n", on_list);
	seq_printf(m, "isolated: %lu\n", isolated);
	bd_show_counter(m, "inflated", &c->inflated);
	bd_show_counter(m, "deflated", &c->deflated);
	bd_show_counter(m, "oom_deflated", &c->oom_deflated);
	bd_show_counter(m, "alloc_failures", &c->alloc_failures);
	/* With the balloon core, isolation and putback are the core's and
	 * are not seen by the driver. */
	if (own_ops) {
		bd_show_counter(m, "isolations", &c->isolations);
		bd_show_counter(m, "isolate_refused", &c->isolate_refused);
		bd_show_counter(m, "putback", &c->putback);
	}
	bd_show_counter(m, "migrated", &c->migrated);
	bd_show_counter(m, "migrate_busy", &c->migrate_busy);
	bd_show_counter(m, "migrate_failures", &c->migrate_failures);
	bd_show_counter(m, "ext_records", &c->ext_records);
	bd_show_counter(m, "ext_buffers", &c->ext_buffers);
	bd_show_counter(m, "ext_departures", &c->ext_departures);
	bd_show_counter(m, "ext_arrivals", &c->ext_arrivals);
	bd_show_counter(m, "ext_returns", &c->ext_returns);
	bd_show_counter(m, "ext_depart_buffers", &c->ext_depart_buffers);
	bd_show_counter(m, "fallback_pairs", &c->fallback_pairs);
#if !BALLOOND_USE_BALLOON_CORE
	seq_printf(m, "unannounced: %lu\n", READ_ONCE(vb->n_unannounced));
#endif
	seq_printf(m, "ext_negotiated: %s\n", vb->use_ext ? "yes" : "no");
	seq_printf(m, "ext_split: %s\n", vb->use_split ? "yes" : "no");
	seq_printf(m, "batch: %u\n", vb->batch);
	seq_printf(m, "stats_vq: %s\n", vb->stats_vq ? "yes" : "no");
	seq_printf(m, "deflate_on_oom: %s\n", vb->deflate_on_oom ? "yes" : "no");
	seq_printf(m, "must_tell_host: %s\n", vb->must_tell_host ? "yes" : "no");
	seq_printf(m, "page_layer: %s\n", bd_page_layer);
	return 0;
}
DEFINE_SHOW_ATTRIBUTE(bd_stats);

void bd_debugfs_init(struct balloond *vb)
{
	struct dentry *dir = debugfs_create_dir("balloond", NULL);

	if (IS_ERR(dir)) {
		char name[64];

		snprintf(name, sizeof(name), "balloond-%s",
			 dev_name(&vb->vdev->dev));
		dir = debugfs_create_dir(name, NULL);
	}
	vb->debugfs_dir = dir;
	debugfs_create_file("pfns", 0444, dir, vb, &bd_pfns_fops);
	debugfs_create_file("stats", 0444, dir, vb, &bd_stats_fops);
}

void bd_debugfs_exit(struct balloond *vb)
{
	debugfs_remove_recursive(vb->debugfs_dir);
	vb->debugfs_dir = NULL;
}
