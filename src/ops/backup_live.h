/*
 * A backup of a disk cbt does not open itself (backup.c's second entry):
 * a running VM's disk, read over NBD at a point in time QEMU holds for it
 * (src/live/livebackup.c).  The caller provides the disk's checkpoints and
 * the steps that need QEMU; backup.c does the rest exactly as offline:
 * the plan (full or incremental, the parent in the folder), the copy, the
 * hashes, the manifest.  Private to libcbt.
 */
#ifndef CBT_OPS_BACKUP_LIVE_H
#define CBT_OPS_BACKUP_LIVE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <cbt/backup.h>
#include <cbt/checkpoint.h>

#include "../util/util.h"

/* One range of a batched read (bk_source.read_many). */
struct bk_read {
    void *buf;
    size_t len;
    uint64_t off;
    int err;        /* out: 0, or -errno of this range */
};

/* Where the data comes from once the point in time is frozen. */
struct bk_source {
    void *opaque;
    /* The run at off (at most len bytes) and whether all of it reads as
     * zeroes.  0 or -errno. */
    int (*status)(void *opaque, uint64_t off, uint64_t len, uint64_t *run,
                  bool *zero);
    /* Read [off, off+len).  0 or -errno. */
    int (*read)(void *opaque, void *buf, size_t len, uint64_t off);
    /* Optional (NULL: read, range by range): read the n ranges of v, as
     * many at once as the source can (a network source keeps requests in
     * flight).  Returns when no range is in progress any more, its buffer
     * the caller's again: 0, or the -errno of the first range that failed
     * (each range's own result in its err). */
    int (*read_many)(void *opaque, struct bk_read *v, size_t n);
    /* Optional: the copy has read all it needs, the source may let its
     * data go (a live view: its export, job and scratch node in QEMU).
     * Called at most once, after the last read, on a thread of its own
     * while the backup flushes its target and writes its records (which
     * use nothing of the source's); no other call of the source or of
     * its bk_live overlaps it. */
    void (*done)(void *opaque);
    /* Call cb for every extent of the disk with whether the checkpoint the
     * backup starts from saw it written (dirty).  0, or -1 with *errp. */
    int (*dirty)(void *opaque,
                 int (*cb)(void *cbop, uint64_t start, uint64_t len,
                           bool dirty),
                 void *cbop, struct cbt_error **errp);
};

struct bk_live {
    void *opaque;
    const char *label;      /* the disk as the user named it (manifest) */
    uint64_t size;          /* virtual size */
    char disk_id[37];       /* "" when the disk has none yet */
    /* The disk's checkpoints with their health, oldest first (a fresh
     * copy the caller frees with cbt_checkpoint_free_list). */
    int (*checkpoints)(struct bk_live *l, struct cbt_checkpoint **v,
                       size_t *n, struct cbt_error **errp);
    /* Is `name` taken by a checkpoint or a bitmap?  1, 0, or -1. */
    int (*name_taken)(struct bk_live *l, const char *name,
                      struct cbt_error **errp);
    /*
     * The point in time: create checkpoint `name` (granularity gran, 0:
     * default) at the instant the backup's view freezes, and give the
     * source of that view, with the dirty extents since checkpoint
     * `since` (NULL for a full backup).  Sets disk_id when the disk had
     * none.  0, or -1 with *errp and nothing left behind.
     */
    int (*freeze)(struct bk_live *l, const char *since, const char *name,
                  uint64_t gran, struct bk_source *src,
                  struct cbt_error **errp);
    /* What the new checkpoint's record will say: its order and creation
     * time (and disk_id set, made now for a disk that has none), before
     * anything is recorded.  0, or -1 with *errp. */
    int (*describe)(struct bk_live *l, const char *name, uint64_t *order,
                    int64_t *sec, uint32_t *nsec, struct cbt_error **errp);
    /* The backup and its manifest are durable: make the new checkpoint's
     * record durable too, as describe said.  0, or -1 with *errp. */
    int (*commit)(struct bk_live *l, const char *name,
                  struct cbt_error **errp);
    /* The backup failed after freeze: remove the new checkpoint. */
    void (*abort)(struct bk_live *l, const char *name);
    /* Release the frozen view (always called after a freeze). */
    void (*release)(struct bk_live *l);
};

/* cbt_backup for a disk described by l (o->disk is l's label): the phases
 * below, with l's freeze between planning and copying. */
int cbt_backup_live(const struct cbt_backup_opts *o, struct bk_live *l,
                    struct cbt_backup_result *res, struct cbt_error **errp);

/*
 * The same in phases, for several disks frozen at one instant (one
 * transaction for all, src/live/livebackup.c):
 *   bk_job_plan    check TARGET, choose the new checkpoint's name, plan
 *                  (full, or since which checkpoint; the parent); nothing
 *                  is written yet.  NULL with *errp.
 *   bk_job_since / bk_job_checkpoint: what the freeze must make.
 *   bk_job_copy    after the freeze: copy from src, write the target and
 *                  its hashes, rename the target into place.
 *   bk_job_finish  the manifest (l->describe gives the checkpoint's order
 *                  and time), then l->commit (the checkpoint's record):
 *                  the backup is complete.  A cbt killed in between leaves
 *                  a complete backup whose checkpoint the next run removes
 *                  (it is still pending), never a checkpoint without its
 *                  backup.
 *   bk_job_end     frees the job; unless ok (after bk_job_finish), the
 *                  job's files are removed and res cleared.  0 when ok and
 *                  the result is filled.
 * The caller removes the new checkpoints of jobs it does not finish.
 */
struct bk_job;
struct bk_job *bk_job_plan(const struct cbt_backup_opts *o, struct bk_live *l,
                           struct cbt_backup_result *res,
                           struct cbt_error **errp);
const char *bk_job_since(const struct bk_job *j);
const char *bk_job_checkpoint(const struct bk_job *j);
int bk_job_copy(struct bk_job *j, const struct bk_source *src,
                struct cbt_error **errp);
int bk_job_finish(struct bk_job *j, struct cbt_error **errp);
int bk_job_end(struct bk_job *j, bool ok, struct cbt_error **errp);

#endif
