/* Error objects for libcbt's control path (open, create, check, commands). */
#ifndef CBT_ERROR_H
#define CBT_ERROR_H

#ifdef __cplusplus
extern "C" {
#endif

/*
 * Threads: an error belongs to the caller that received it; the functions
 * here only read or free it, and may be called from any thread.
 *
 * Control-path functions take a `struct cbt_error **errp`.  On failure they
 * store a newly allocated error there (if errp is non-NULL and *errp is NULL)
 * and return a failure value; the caller frees it with cbt_error_free().
 * The message names the object and the reason, for example
 * "base.qcow2: cluster_bits 30 out of range (9..21)".
 */
struct cbt_error;

const char *cbt_error_message(const struct cbt_error *err);
/* The errno value behind the error (EINVAL, EIO, ENOSPC, ...), never 0. */
int cbt_error_errno(const struct cbt_error *err);

/*
 * What kind of failure an error is, for callers that act on it (the cbt
 * command turns each kind into its own exit status, docs/cli.md).  Set by
 * the code that knows (a lock conflict, a verification failure); otherwise
 * derived from the errno: ENOSPC, EDQUOT, EFBIG, EROFS are CBT_ERR_IO.
 * The values are stable (docs/api.md): new kinds are added at the end, and
 * a kind a program does not know is to be treated as CBT_ERR_OTHER.
 */
enum cbt_error_kind {
    CBT_ERR_OTHER = 0,
    CBT_ERR_USAGE,     /* wrong arguments or options */
    CBT_ERR_IN_USE,    /* a file is held by another process (its lock) */
    CBT_ERR_NEED_FULL, /* an incremental or differential is impossible */
    CBT_ERR_CORRUPT,   /* verification failed: corrupt or altered data */
    CBT_ERR_IO,        /* an I/O or space error of the host */
};
enum cbt_error_kind cbt_error_kind(const struct cbt_error *err);
/* The kind an errno value stands for on its own (-errno results of the
 * data path): CBT_ERR_IO for the values above, else CBT_ERR_OTHER. */
enum cbt_error_kind cbt_errno_kind(int errnum);
/*
 * What may fix the failure, for callers that advise their users: the
 * library's messages state what is wrong and name no command; the cbt
 * command adds the command that does the remedy.  Stable values, as the
 * kinds; a remedy a program does not know is to be treated as NONE.
 */
enum cbt_error_remedy {
    CBT_REMEDY_NONE = 0,
    /* The image's metadata is damaged in a way a repair fixes:
     * cbt_image_check() with CBT_CHECK_FIX_LEAKS | CBT_CHECK_FIX_ERRORS. */
    CBT_REMEDY_REPAIR,
    /* The disk's checkpoint metadata cannot be used; rebuilding it from
     * the bitmaps fixes it: cbt_checkpoint_reconcile() with fix. */
    CBT_REMEDY_RECONCILE,
    /* A file is in use (CBT_ERR_IN_USE): wait for its holder
     * (cbt_set_lock_wait()), or, when the holder is a running VM, go
     * through it (the live mode). */
    CBT_REMEDY_WAIT,
    /* The same, and a read-only open may also read it shared with the
     * writer (CBT_OPEN_FORCE_SHARE), as the holder last wrote it. */
    CBT_REMEDY_WAIT_OR_SHARE,
    /* A bitmap cannot be used; removing it (cbt_bitmap_remove) deletes it
     * from the image. */
    CBT_REMEDY_REMOVE_BITMAP,
    /* The call would lose data it was not asked to lose: cbt_image_resize
     * shrinks only with its shrink argument. */
    CBT_REMEDY_SHRINK,
    /* An incremental or differential backup is impossible: take a full
     * one (CBT_BACKUP_FULL, or auto_full to fall back to one). */
    CBT_REMEDY_FULL_BACKUP,
    /* The same, or a rescan (cbt_backup_opts.rescan) compares the disk
     * with its last backup instead of reading the lost bitmap. */
    CBT_REMEDY_FULL_OR_RESCAN,
    /* A backup's disk and target look swapped (CBT_ERR_USAGE). */
    CBT_REMEDY_SWAP_DISK_TARGET,
    /* The disk cannot hold checkpoints: back up a qcow2 copy of it, track
     * it through a qcow2 image whose raw data file it is (data_file_raw),
     * or take a copy-only backup (CBT_BACKUP_FULL with no_checkpoint). */
    CBT_REMEDY_QCOW2_OR_COPY_ONLY,
};
enum cbt_error_remedy cbt_error_remedy(const struct cbt_error *err);
void cbt_error_free(struct cbt_error *err);

/*
 * Warnings: conditions worth telling the user that do not fail the call
 * (an image another process is writing, opened with CBT_OPEN_FORCE_SHARE;
 * a bitmap left out of a snapshot).  Each goes to the caller it concerns,
 * never to a process-wide handler:
 *
 *  - an operation that takes an options struct (cbt_backup, cbt_restore,
 *    cbt_verify, cbt_convert, cbt_commit, cbt_stream, cbt_rebase,
 *    cbt_snapshot, cbt_image_create) calls its
 *    opts->warn with the warnings of that call, including those about the
 *    images it opens for itself;
 *  - an image opened with cbt_image_open_with() keeps its open options'
 *    warn for everything said about it (or a node of its chain) later:
 *    by its reads and writes (a corruption found), its bitmaps and
 *    checkpoints, its close, whichever thread makes the call.
 *
 * fn(opaque, msg) gets the message without "warning: " or a newline; msg
 * is freed after it returns.  It may be called from a thread the library
 * started, and at once from several threads when several calls or images
 * share it.  With fn NULL (and from cbt_image_open(), the functions
 * without options) the warning is printed to stderr as "warning: MSG".
 */
typedef void cbt_warn_fn(void *opaque, const char *msg);

#ifdef __cplusplus
}
#endif

#endif
