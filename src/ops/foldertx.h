/*
 * Transactions on a backup folder: one step of a prune (a point merged into
 * its child, or removed), written down in a journal before anything the
 * folder's points use is changed, and rolled forward by whichever cbt opens
 * the folder next when a kill interrupts it.  Design: foldertx.c; layout:
 * docs/backups.md ("Pruning").
 */
#ifndef CBT_OPS_FOLDERTX_H
#define CBT_OPS_FOLDERTX_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <cbt/error.h>
#include <cbt/ops.h>

/* The journal's file name in the folder, and the suffix of the new
 * manifests a transaction writes before its journal. */
#define FOLDERTX_JOURNAL "cbt-prune.journal"
#define FOLDERTX_NEW_SUFFIX ".prune-new"

/* One transaction.  Every name is a plain file name in the folder. */
struct foldertx {
    /* Merge: the image merge_from (the retired point) takes merge_into's
     * data over its own and then replaces merge_into by a rename.  NULL:
     * no merge. */
    char *merge_from, *merge_into;
    char *merge_format;           /* "qcow2" or "raw" */
    uint64_t merge_from_size;     /* merge_from's virtual size, as recorded */
    /* Then these renames (new manifests into place), in order... */
    size_t nrename;
    char **rename_from, **rename_to;
    /* ...then these removals (the retired point's files), in order. */
    size_t nremove;
    char **remove;
};

/* ---- foldertx.c ---- */

/* Take the folder's lock (flock on the folder, exclusive, not waiting): the
 * descriptor, or -1 with *errp (kind CBT_ERR_IN_USE when another cbt holds
 * it). */
int foldertx_lock(const char *dir, struct cbt_error **errp);
/* Write tx's journal into dir (the commit point: durable before its name
 * appears), carry it out, then remove the journal.  The caller holds the
 * lock (foldertx_lock) and has written every rename's source.  0, or -1
 * with *errp: before the journal exists nothing changed; after it, the
 * error says that the rest is done when cbt next opens the folder. */
int foldertx_run(const char *dir, const struct foldertx *tx,
                 cbt_progress_fn *progress, void *progress_opaque,
                 struct cbt_error **errp);
/* Finish a transaction a killed cbt left in dir, if any (taking and
 * releasing the lock).  0 nothing to do, 1 finished one (said with a
 * warning), -1 with *errp (CBT_ERR_IN_USE: another cbt is running it). */
int foldertx_recover(const char *dir, struct cbt_error **errp);
/* The same, the caller holding the lock. */
int foldertx_recover_locked(const char *dir, struct cbt_error **errp);
/* The same for the folder holding the file `path`. */
int foldertx_recover_beside(const char *path, struct cbt_error **errp);
/* Is there a journal in dir? */
bool foldertx_pending(const char *dir);
/* Parse a journal held in memory (untrusted: every name must be a plain
 * name of the folder, counts bounded); `what` names it in errors. */
int foldertx_parse(const char *buf, size_t len, const char *what,
                   struct foldertx *tx, struct cbt_error **errp);
void foldertx_free(struct foldertx *tx);

#endif
