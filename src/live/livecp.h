/* Checkpoints of a running VM's disk, through QMP (livecp.c). */
#ifndef CBT_LIVE_LIVECP_H
#define CBT_LIVE_LIVECP_H

#include <cbt/checkpoint.h>

#include "disk.h"
#include "../ops/checkpoint_meta.h"
#include "../ops/journal.h"
#include "qmp.h"

/*
 * A disk of a running QEMU with its checkpoints as cbt sees them: the
 * records of the image's own metadata (read with a shared lock: the
 * header QEMU found at open, which it keeps unchanged), the live journal's
 * records on top, and each checkpoint's health from QEMU's bitmaps over
 * the disk's chain (not from the file, where QEMU's bitmaps are in use).
 */
struct live_cp {
    struct qmp *q;               /* borrowed */
    struct live_disk disk;
    struct journal j;
    char disk_id[37];            /* "" when the disk has none yet */
    uint64_t next_order;         /* the order the next checkpoint gets */
    struct cbt_checkpoint *v;    /* oldest first, with health */
    size_t n;
    bool uncounted;              /* live_cp_open_uncounted */
};

/* Resolve `disk` and load its checkpoints.  0, or -1 with *errp. */
int live_cp_open(struct qmp *q, const char *disk, struct live_cp *c,
                 struct cbt_error **errp);
/* The same without the bytes changed since each checkpoint (dirty_bytes
 * stays 0 for a checkpoint with copies in several layers: counting their
 * union takes QEMU three commands), for chain operations that only need
 * to know which checkpoints are usable. */
int live_cp_open_uncounted(struct qmp *q, const char *disk, struct live_cp *c,
                           struct cbt_error **errp);
void live_cp_close(struct live_cp *c);
/* The checkpoint `name`, or NULL. */
const struct cbt_checkpoint *live_cp_find(const struct live_cp *c,
                                          const char *name);

/*
 * The health of checkpoint bitmap `name` over the disk's chain, by cbt's
 * rule (the top layer holds it, recording; lower copies contiguous,
 * consistent, persistent; a disabled copy below the top is sealed
 * history and accepted): NULL when usable, else a static reason.
 * *dirty: the bytes changed since it (the union over the layers, counted
 * by QEMU).
 */
const char *live_cp_health(struct live_cp *c, const char *name,
                           uint64_t granularity, uint64_t *dirty,
                           struct cbt_error **errp);

/*
 * The new checkpoint's record (order, parent, time, size, granularity):
 * after a transaction that added its bitmap to the disk's format node
 * (live_cp_bitmap_add_action), note it in the journal.  0 or -1.
 */
int live_cp_note_created(struct live_cp *c, const char *name,
                         int64_t sec, uint32_t nsec, struct cbt_error **errp);
/* Give the disk its id now when it has none (kept by the next
 * live_cp_note_created).  0, or -1 with *errp. */
int live_cp_ensure_disk_id(struct live_cp *c, struct cbt_error **errp);
/* The transaction action that creates checkpoint `name`'s bitmap. */
json_t *live_cp_bitmap_add_action(const struct live_cp *c, const char *name,
                                  uint64_t granularity);
/* Is `name` free for a new checkpoint (no checkpoint, no bitmap in any
 * layer)?  0, or -1 with *errp. */
int live_cp_name_free(const struct live_cp *c, const char *name,
                      struct cbt_error **errp);

/* The journal of a live backup's new checkpoint: PENDING before the
 * transaction (live_cp_note_pending); resolved by live_cp_note_created,
 * or by live_cp_resolve when the backup failed.  live_cp_resolve_stale
 * removes the bitmaps of pending checkpoints of cbt processes that are
 * gone (a cbt killed during a backup).  0 or -1 with *errp. */
int live_cp_note_pending(struct live_cp *c, const char *name,
                         struct cbt_error **errp);
int live_cp_resolve(struct live_cp *c, const char *name,
                    struct cbt_error **errp);
int live_cp_resolve_stale(struct live_cp *c, struct cbt_error **errp);

/*
 * Make the checkpoints of `image` (its own metadata as its live journal
 * changes it) those of c, after a live chain operation made `image` the
 * layer that holds the disk's checkpoints (a snapshot's overlay, the base
 * of an active commit): its journal gets a record for each usable
 * checkpoint of c it lacks, a deletion for each it has that c lacks or
 * cannot use, and c's disk id when the image has none.  An unusable
 * checkpoint is not carried (a warning says a backup since it must be a
 * full one), as offline.  fresh: `image` is a file cbt just created
 * (no metadata of its own; QEMU may hold it as a mirror's target, which
 * no one may read).  0, or -1 with *errp.
 */
int live_cp_carry(const struct live_cp *c, const char *image, bool fresh,
                  struct cbt_error **errp);

/* Remove the live journal of `image`, a new file a failed operation
 * removes (live_cp_carry wrote it first, so that a kill never leaves the
 * file in the chain without its checkpoints).  Errors are ignored. */
void live_cp_uncarry(const char *image);

/* cbt checkpoint create|delete --qmp. */
int live_cp_create(struct live_cp *c, const char *name, uint64_t granularity,
                   struct cbt_error **errp);
int live_cp_delete(struct live_cp *c, const char *name, bool *existed,
                   struct cbt_error **errp);

/*
 * cbt checkpoint reconcile --qmp: append to `it` what is wrong with the
 * disk's checkpoints as QEMU holds them, as offline reconcile does (the
 * new checkpoints of live backups whose cbt is gone, checkpoints whose
 * bitmap is missing or unusable, bitmaps of the top layer without a
 * checkpoint); with fix, repair it: remove the first, drop the second (a
 * full backup follows), adopt recording persistent bitmaps.  0 or -1.
 */
int live_cp_reconcile(struct live_cp *c, bool fix, struct drift_items *it,
                      struct cbt_error **errp);

#endif
