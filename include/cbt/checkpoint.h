/* Public API for checkpoints: named points in time on a disk (issue 5).
 *
 * Threads: the functions that only read (disk_id, list, get, reconcile
 * without fix) may run concurrently with anything on the disk but
 * cbt_image_close().  Those that change it (create, delete, reconcile with
 * fix) take several steps, each under the layer's lock (bitmaps, the
 * metadata, one commit): they may run concurrently with the data path,
 * but not with one another or with bitmap changes (cbt/bitmap.h add,
 * remove, rename, enable/disable, commit, rollback) on the same disk. */
#ifndef CBT_CHECKPOINT_H
#define CBT_CHECKPOINT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <cbt/error.h>
#include <cbt/image.h>

#ifdef __cplusplus
extern "C" {
#endif

/*
 * A checkpoint of a disk is
 *   - a persistent, recording dirty bitmap named as the checkpoint, kept
 *     over the backing chain by the chain rules (cbt/chain.h: the top layer
 *     holds it, lower copies contiguous, ...), and
 *   - metadata stored in the top layer of the disk, in a qcow2 header
 *     extension of cbt's own (docs/checkpoints.md gives the layout; QEMU
 *     keeps unknown header extensions, so qemu-img check/info/commit and a
 *     running QEMU leave it alone): creation order and time, parent,
 *     virtual size and granularity at creation, and the disk's id.
 * Copying the image (cp, rsync) carries its checkpoints; there is no
 * host-local state.  The metadata and the bitmap of a checkpoint are
 * written in the same header update, so they land together or not at all.
 *
 * Every bitmap of every checkpoint keeps recording (libvirt's model): the
 * changes since checkpoint C are C's bitmap over the chain, whatever came
 * after C.
 *
 * `disk` below is the top of an open chain (struct cbt_image opened with
 * its backing files).  Functions that change anything need the top opened
 * read-write (CBT_OPEN_RDWR); they reopen lower layers themselves when they
 * must change them (delete, reconcile --fix).  They store the top's bitmaps
 * with cbt_bitmap_commit() (so bitmap changes the caller left uncommitted
 * are stored with them) and, when they fail, roll the top's uncommitted
 * bitmap changes back (cbt_bitmap_rollback()): commit your own first.
 */

#define CBT_CHECKPOINT_NAME_MAX 1023  /* bytes; QEMU's bitmap name limit */

struct cbt_checkpoint {
    char *name;
    uint64_t order;          /* 1, 2, ...: creation order, never reused */
    int64_t created_sec;     /* creation time, Unix seconds (UTC) */
    uint32_t created_nsec;
    char *parent;            /* the newest checkpoint when this one was
                              * created (NULL for the first); when that
                              * one is deleted, its own parent */
    uint64_t virtual_size;   /* the disk's size at creation */
    uint64_t granularity;    /* of its bitmap, bytes */
    /* Health, as seen over the chain when listed: */
    bool usable;             /* the bitmap is valid over the chain and the
                              * copies below the top are as sealed */
    bool sealed;             /* not usable: this layer's copy is history
                              * that an overlay made by cbt snapshot
                              * continues (back up the overlay) */
    char *problem;           /* NULL when usable, else one line: why not */
    uint64_t dirty_bytes;    /* usable: bytes changed since it, the union
                              * of its bitmap over the chain in whole
                              * granules (cbt_chain_bitmap's count); else 0 */
};

/* The disk's id (a random UUID made with the first checkpoint, kept in the
 * metadata): "" when the disk has no checkpoint metadata.  Backups record
 * it, so that a backup of another disk is never taken as a parent. */
int cbt_checkpoint_disk_id(struct cbt_image *disk, char id[37],
                           struct cbt_error **errp);

/*
 * Create checkpoint `name` now: an empty recording persistent bitmap of
 * that name in the top layer (granularity 0: the bitmap default) and its
 * metadata, in one atomic header update.  Refused (nothing changed): an
 * empty or over-long name, a name already used by a checkpoint or by a
 * bitmap in any layer of the chain, metadata that would not fit in the
 * header (delete old checkpoints), a raw disk.
 */
int cbt_checkpoint_create(struct cbt_image *disk, const char *name,
                          uint64_t granularity, struct cbt_error **errp);

/* Every checkpoint of the disk, oldest first, with its health.  Caller
 * frees with cbt_checkpoint_free_list. */
int cbt_checkpoint_list(struct cbt_image *disk, struct cbt_checkpoint **list,
                        size_t *count, struct cbt_error **errp);
void cbt_checkpoint_free_list(struct cbt_checkpoint *list, size_t count);
/* One checkpoint by name (ENOENT when there is none). */
int cbt_checkpoint_get(struct cbt_image *disk, const char *name,
                       struct cbt_checkpoint *out, struct cbt_error **errp);
void cbt_checkpoint_clear(struct cbt_checkpoint *c);

/*
 * Delete checkpoint `name`: its metadata, and its bitmap in every layer of
 * the chain that holds it (the children's parent becomes name's parent).
 * A checkpoint that does not exist is not an error: *existed is set false
 * (the CLI warns).  Bitmaps of that name without metadata are removed too.
 * Never blocked by a broken bitmap (an inconsistent one is removed).
 */
int cbt_checkpoint_delete(struct cbt_image *disk, const char *name,
                          bool *existed, struct cbt_error **errp);

/* Drift between metadata and bitmaps, found by reconcile. */
enum cbt_drift {
    CBT_DRIFT_BITMAP_WITHOUT_METADATA, /* a bitmap no checkpoint describes */
    CBT_DRIFT_METADATA_WITHOUT_BITMAP, /* the top layer lacks the bitmap */
    CBT_DRIFT_BITMAP_UNUSABLE,         /* bitmap invalid over the chain:
                                        * inconsistent, gap, disabled */
    CBT_DRIFT_MISMATCH,                /* granularity differs from metadata */
    CBT_DRIFT_METADATA_CORRUPT,        /* the metadata cannot be parsed (name
                                        * ""); fix: replaced by empty
                                        * metadata with a new disk id, then
                                        * the bitmaps are adopted */
    CBT_DRIFT_LEFTOVER,                /* live: objects a cbt that is gone
                                        * left in QEMU (name ""); fix:
                                        * removed */
};
/* "bitmap-without-metadata", "metadata-without-bitmap", "bitmap-unusable",
 * "mismatch", "metadata-corrupt", "leftover": the codes the CLI prints. */
const char *cbt_drift_code(enum cbt_drift kind);
struct cbt_drift_item {
    enum cbt_drift kind;
    char *name;
    char *explanation;   /* one line: what is wrong and what it means */
    char *fix;           /* one line: what --fix does (or did) */
    bool fixed;          /* with fix: it was repaired */
};
/*
 * Compare the metadata with the bitmaps of the chain and explain every
 * difference; with fix, repair them in one atomic update per layer:
 * metadata without a bitmap or with an unusable one (or one whose
 * granularity differs: it was replaced) is dropped (with the broken
 * bitmap, in every layer: the next backup since it must be a full one);
 * corrupt metadata is replaced by empty metadata; a consistent
 * recording bitmap of the top layer without metadata is adopted as a
 * checkpoint (time: now, marked adopted in the explanation); other bitmaps
 * without metadata (disabled, or only in lower layers) are reported, not
 * touched.  Caller frees with cbt_drift_free_list.
 */
int cbt_checkpoint_reconcile(struct cbt_image *disk, bool fix,
                             struct cbt_drift_item **items, size_t *count,
                             struct cbt_error **errp);
void cbt_drift_free_list(struct cbt_drift_item *items, size_t count);

#ifdef __cplusplus
}
#endif

#endif
