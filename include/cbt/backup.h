/* Public API for backups: full, incremental, differential; restore; verify
 * (issue 5).  The on-disk layout of a backup (image + manifest + block
 * hashes) is specified in docs/backups.md.
 *
 * Threads: as cbt/ops.h: backups, restores and verifications of different
 * disks and folders may run concurrently; two on one disk or one backup
 * folder must not (the disk's checkpoints and the folder's files are
 * read, then written).  The progress and cancel callbacks are called as
 * cbt/ops.h says. */
#ifndef CBT_BACKUP_H
#define CBT_BACKUP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <cbt/error.h>
#include <cbt/image.h>
#include <cbt/ops.h>

#ifdef __cplusplus
extern "C" {
#endif

enum cbt_backup_mode {
    CBT_BACKUP_FULL,
    CBT_BACKUP_INCREMENTAL,  /* since the newest checkpoint */
    CBT_BACKUP_DIFFERENTIAL, /* since an older named checkpoint */
};
/* "full", "incremental" or "differential" (the manifest's "kind"). */
const char *cbt_backup_mode_name(enum cbt_backup_mode mode);

/*
 * cbt backup.  A backup is TARGET (a qcow2 or raw image) with the manifest
 * TARGET.json and the block hashes TARGET.tree beside it (sha256-tree-v2;
 * older backups' TARGET.hashes are still read).  The backups of
 * one disk live in one folder: an incremental finds its parent there (the
 * backup whose manifest names the disk's id and the checkpoint it starts
 * from).
 *   full: the whole guest view of DISK;
 *   incremental: what changed since the newest checkpoint (its bitmap over
 *     the chain), on top of the backup that created that checkpoint;
 *   differential: what changed since checkpoint `since`, on top of the
 *     backup that created it.
 * Each creates checkpoint `checkpoint` (NULL: a generated name) on DISK at
 * the point in time of the data it read.  qcow2 targets of incrementals
 * and differentials have the parent backup as backing file (relative
 * name), so a backup chain is a qcow2 chain qemu-img reads; unchanged
 * clusters stay unallocated, zeroed or discarded ranges are zero clusters;
 * raw targets are sparse and the manifest lists the extents they carry.
 * Order: target written and flushed, hashes and manifest written (renamed
 * into place), then the checkpoint created on DISK.  A failure before the
 * checkpoint lands removes the target and its files and leaves DISK's
 * checkpoints exactly as before.
 * An incremental that is impossible (no checkpoint, its bitmap unusable,
 * no backup of it in the folder, a backup of another disk, the parent's
 * chain incomplete or damaged as far as is cheap to check) is refused with
 * the reason (kind CBT_ERR_NEED_FULL, or CBT_ERR_CORRUPT for a damaged
 * parent), unless auto_full: then a full backup is taken and
 * result->fallback says why.
 * rescan: the incremental or differential does not use the checkpoint's
 * bitmap (it may be gone or inconsistent: QEMU killed, removed behind
 * cbt's back); the whole disk is read and hashed, and only the blocks
 * whose digest differs from the parent backup's leaf are written.  It
 * needs the parent backup (the one of the checkpoint it starts from) and
 * that checkpoint's record on the disk, not its bitmap.  auto_full takes
 * a rescan where the checkpoint's bitmap is unusable but its backup is
 * fine (result->rescan, result->fallback saying why), and a full backup
 * only when that is impossible too.
 */
struct cbt_backup_opts {
    size_t struct_size;           /* sizeof(struct cbt_backup_opts) */
    const char *disk;
    const char *disk_format;      /* NULL: probe */
    const char *target;
    enum cbt_backup_mode mode;
    const char *since;            /* differential: the checkpoint */
    const char *checkpoint;       /* new checkpoint's name; NULL: generated */
    const char *format;           /* "qcow2" (default) or "raw" */
    uint64_t granularity;         /* new checkpoint's bitmap; 0: default */
    bool auto_full;
    bool rescan;                  /* compare every block with the parent */
    /* NULL, or "zstd" / "zlib": a qcow2 target's data clusters are stored
     * compressed (compressed in the worker threads; a cluster that does
     * not shrink is stored as it is), so qemu-img still reads the chain. */
    const char *compress;
    cbt_progress_fn *progress;
    void *progress_opaque;
    cbt_cancel_fn *cancel;        /* stops it before the checkpoint exists */
    void *cancel_opaque;
    /* A copy-only full backup: no checkpoint is made, the disk is only
     * read (opened read-only, sharing reading: any format, a raw disk or a
     * file without write permission), and no incremental can follow it. */
    bool no_checkpoint;
    cbt_warn_fn *warn;            /* this call's warnings (cbt/error.h) */
    void *warn_opaque;
    /* Write the target through the host's page cache.  By default its data
     * goes around it (CBT_OPEN_DIRECT, cbt/image.h) where the file system
     * allows: a backup then leaves the host's cache to its VMs and costs
     * less CPU. */
    bool buffered;
};
#define CBT_BACKUP_OPTS_INIT { .struct_size = sizeof(struct cbt_backup_opts) }
struct cbt_backup_result {
    enum cbt_backup_mode mode;    /* what was done (auto_full may change it) */
    char *checkpoint;             /* the checkpoint created */
    char *since;                  /* the checkpoint it started from, or NULL */
    char *parent;                 /* the parent backup's image file, or NULL */
    bool rescan;                  /* the blocks to copy were found by
                                   * comparing every block's hash with the
                                   * parent's (no bitmap read) */
    char *fallback;               /* why a full backup (or with auto_full,
                                   * a rescan) was taken instead */
    uint64_t virtual_size;
    uint64_t dirty_bytes;         /* what the bitmap said changed (rescan:
                                   * the blocks found to differ) */
    uint64_t bytes_copied;        /* data written to the target */
    uint64_t bytes_zeroed;        /* ranges recorded as zeroes */
    uint64_t file_bytes;          /* the target file's size */
    char root_hash[65];           /* of the point-in-time guest view */
};
int cbt_backup(const struct cbt_backup_opts *opts,
               struct cbt_backup_result *res, struct cbt_error **errp);
void cbt_backup_result_free(struct cbt_backup_result *res);

/*
 * cbt restore: flatten the backup chain up to `backup` (a backup image
 * path; its manifest is beside it) into a new image `out` of the backed-up
 * virtual size; holes stay holes; every block's hash is checked against
 * the manifest while writing (a mismatch fails the restore and removes
 * out).  seed_checkpoint: give out an empty checkpoint of that name (qcow2
 * only) so backups of it can go on incrementally.
 */
struct cbt_restore_opts {
    size_t struct_size;           /* sizeof(struct cbt_restore_opts) */
    const char *backup;
    const char *out;
    const char *format;           /* "qcow2" (default) or "raw" */
    const char *seed_checkpoint;  /* or NULL */
    cbt_progress_fn *progress;
    void *progress_opaque;
    cbt_cancel_fn *cancel;        /* stops it before OUT is in place */
    void *cancel_opaque;
    cbt_warn_fn *warn;            /* this call's warnings (cbt/error.h) */
    void *warn_opaque;
    bool buffered;                /* as cbt_backup_opts' */
};
#define CBT_RESTORE_OPTS_INIT                                               \
    { .struct_size = sizeof(struct cbt_restore_opts) }
int cbt_restore(const struct cbt_restore_opts *opts,
                struct cbt_error **errp);

/*
 * cbt verify: check the chain up to `backup` without writing anything:
 * every parent present, manifests consistent (disk id, order, parent
 * links and their digests, sizes), the block hashes file intact, and the
 * guest view recomputed from the chain equal to the manifest's hashes.
 * Returns 0 when the check ran (res says whether it passed; on the first
 * bad block, its range and the file it lies in), -1 with *errp when it
 * could not run.
 */
/* One backup of the chain as its manifest describes it (for listing). */
struct cbt_verify_backup {
    char *file;                   /* the backup image's path */
    enum cbt_backup_mode kind;
    char *checkpoint;             /* the checkpoint it created, or NULL
                                   * (a copy-only backup) */
    uint64_t virtual_size;
    uint64_t copied;              /* data bytes it carries */
};
struct cbt_verify_result {
    bool ok;
    size_t backups;               /* backups in the chain checked */
    /* The chain from the full backup up to `backup` (oldest first), as far
     * as its manifests could be read and parsed, whatever the verdict:
     * for showing the chain, nothing is checked beyond the parse. */
    struct cbt_verify_backup *chain;
    size_t nchain;
    uint64_t bytes_checked;
    char *problem;                /* NULL when ok: one line */
    char *bad_file;               /* the backup file at fault, or NULL */
    uint64_t bad_offset, bad_length; /* guest range, when a block is bad */
};
/* CBT_VERIFY_FORCE_SHARE reads backup images other processes hold for
 * writing (CBT_OPEN_FORCE_SHARE). */
#define CBT_VERIFY_FORCE_SHARE (1u << 0)
struct cbt_verify_opts {
    size_t struct_size;           /* sizeof(struct cbt_verify_opts) */
    const char *backup;
    unsigned flags;               /* CBT_VERIFY_* */
    cbt_progress_fn *progress;
    void *progress_opaque;
    /* Stops the check (it writes nothing): the call fails with ECANCELED
     * and res is empty. */
    cbt_cancel_fn *cancel;
    void *cancel_opaque;
    cbt_warn_fn *warn;            /* this call's warnings (cbt/error.h) */
    void *warn_opaque;
};
#define CBT_VERIFY_OPTS_INIT { .struct_size = sizeof(struct cbt_verify_opts) }
int cbt_verify(const struct cbt_verify_opts *opts,
               struct cbt_verify_result *res, struct cbt_error **errp);
/* Frees the strings and the chain of res. */
void cbt_verify_result_free(struct cbt_verify_result *res);

#ifdef __cplusplus
}
#endif

#endif
