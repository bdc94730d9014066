/*
 * The backup folder as one object (cbt repo): its points and chains, what is
 * broken and why, the leftovers of interrupted cbt runs, and retention.
 * Built on the backup files of src/ops/ (manifest.h, foldertx.h); the layout
 * is docs/backups.md.
 */
#ifndef CBT_REPO_REPO_H
#define CBT_REPO_REPO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <cbt/error.h>
#include <cbt/ops.h>

#include "../ops/manifest.h"

/* One backup (a point in time) of the folder. */
struct repo_point {
    char *file;            /* the image's file name in the folder */
    struct manifest m;
    char sha[65];          /* SHA-256 of its manifest's bytes */
    int64_t time;          /* m.created, seconds since the epoch (UTC) */
    int parent;            /* index in repo.points, or -1 */
    size_t nchildren;
    int root;              /* the full backup its chain starts from, or -1 */
    uint64_t file_bytes;   /* host bytes of its image, manifest and hashes */
    char *problem;         /* why it cannot be restored, or NULL */
    char *verified;        /* when cbt repo verify last found it sound (ISO
                            * 8601 UTC), or NULL (REPO_VERIFIED_FILE) */
};

/* A file of the folder that is not part of a point. */
enum repo_leftover_kind {
    REPO_LEFT_PART,        /* NAME.part: an interrupted backup's or restore's
                            * work file */
    REPO_LEFT_NO_MANIFEST, /* NAME with NAME.hashes, no NAME.json: a backup
                            * interrupted before its manifest */
    REPO_LEFT_ORPHAN_HASHES, /* NAME.hashes alone */
    REPO_LEFT_SCRATCH,     /* NAME.scratch: a live backup's scratch file */
    REPO_LEFT_TEMP,        /* NAME.tmp-XXXXXX: a file cbt was writing */
    REPO_LEFT_PRUNE_NEW,   /* NAME.json.prune-new without a journal */
    REPO_LEFT_BAD_MANIFEST, /* NAME.json of cbt's that does not parse, or
                             * describes another image: damage, never
                             * removed */
};
struct repo_leftover {
    char *file;
    enum repo_leftover_kind kind;
    char *why;             /* one line */
    bool removable;        /* cbt repo clean may remove it */
    uint64_t file_bytes;
};

struct repo {
    char *dir;
    struct repo_point *points;  /* by creation time, oldest first */
    size_t npoints;
    struct repo_leftover *left;
    size_t nleft;
    size_t nproblems;           /* points with a problem */
};

/* ---- repo.c ---- */

/*
 * REPO_VERIFIED_FILE: when cbt repo verify last found each point sound,
 * {"format": "cbt-verified", "version": 1, "points": {FILE: {"verified":
 * ISO time, "manifest-sha256": hex}}}.  An entry counts only while the
 * point's manifest has that SHA-256 (a prune that rewrote it, or any other
 * change, drops it).  Untrusted like the rest of the folder: parsed with
 * bounds, names plain.
 */
#define REPO_VERIFIED_FILE "cbt-verified.json"
#define REPO_VERIFIED_MAX_BYTES (16u << 20)
struct repo_verified {
    char **file, **time, **sha;
    size_t n;
};
int repo_verified_parse(const char *buf, size_t len, const char *what,
                        struct repo_verified *v, struct cbt_error **errp);
void repo_verified_free(struct repo_verified *v);

/* Read the folder: every manifest (parsed, checked as docs/backups.md
 * says), the links between points and the cheap checks of each point's
 * files (present, the sizes their manifest implies, the parent's manifest
 * the one recorded); no image data and no hashes file is read.  The
 * caller finishes an interrupted prune first (foldertx_recover).  0, or -1
 * with *errp (the folder cannot be read). */
int repo_open(const char *dir, struct repo *r, struct cbt_error **errp);
void repo_close(struct repo *r);
/* repo_open for a command that changes the folder (prune, clean): first
 * the folder's lock (foldertx_lock; not with dry_run, which changes
 * nothing) and an interrupted prune finished.  *lock is the lock's fd, -1
 * with dry_run.  0, or -1 with *errp and nothing held. */
int repo_open_to_change(const char *dir, bool dry_run, struct repo *r,
                        int *lock, struct cbt_error **errp);
/* repo_close, then the lock (-1: none) released. */
void repo_close_unlock(struct repo *r, int lock);
/* "full", "incremental", "differential". */
const char *repo_kind_name(const struct repo_point *p);
const char *repo_leftover_kind_name(enum repo_leftover_kind k);
/* Parse ISO 8601 UTC ("2026-12-07T05:50:01.123Z"); 0 or -1. */
int repo_parse_time(const char *s, int64_t *out);

/* ---- prune.c ---- */

struct repo_prune_opts {
    unsigned keep_last, keep_daily, keep_weekly, keep_monthly;
    bool dry_run;
    cbt_progress_fn *progress;
    void *progress_opaque;
    cbt_cancel_fn *cancel;        /* asked between steps */
    void *cancel_opaque;
};

/* What the policy decided for a point, and what the prune did. */
enum repo_fate {
    REPO_KEEP,                    /* the policy keeps it */
    REPO_KEEP_NEEDED,             /* retired by the policy but kept: see why */
    REPO_RETIRE,                  /* removed (no child) */
    REPO_MERGE,                   /* merged into its child */
};
struct repo_decision {
    char *file;
    char *created;
    char *checkpoint;             /* or NULL */
    enum repo_fate fate;
    char *why;                    /* the rules that keep it, or what goes */
    char *into;                   /* REPO_MERGE: the child taking its data */
};
struct repo_prune_result {
    struct repo_decision *v;      /* oldest first */
    size_t n;
    size_t steps_done;
    uint64_t bytes_freed;         /* host bytes (estimate for a dry run) */
};
int repo_prune(const char *dir, const struct repo_prune_opts *o,
               struct repo_prune_result *res, struct cbt_error **errp);
void repo_prune_result_free(struct repo_prune_result *res);

/* ---- clean.c ---- */

struct repo_clean_item {
    char *file;
    char *why;                    /* what it is (repo_leftover.why) */
    uint64_t file_bytes;
    bool removed;                 /* (not dry_run) it is gone */
    char *skipped;                /* why it stays (in use...), or NULL */
};
struct repo_clean_result {
    struct repo_clean_item *v;
    size_t n;
    uint64_t bytes;               /* of the items removed (or removable) */
};
/*
 * Remove the leftovers of interrupted cbt runs that repo_open recognises
 * (never anything else, never a damaged manifest), each only while no
 * process holds it (bfile_held; a live scratch file: bfile_orphan_scratch;
 * a temporary file: not modified for a minute), under the folder's lock,
 * after finishing an interrupted prune.  dry_run: only say what would go.
 */
int repo_clean(const char *dir, bool dry_run, struct repo_clean_result *res,
               struct cbt_error **errp);
void repo_clean_result_free(struct repo_clean_result *res);

/* ---- verify.c ---- */

/* One problem of a point: a file that fails a check, or a bad block. */
struct repo_bad {
    char *file;                   /* the file at fault (path) */
    char *problem;                /* one line */
    bool block;                   /* a block of the guest view: */
    uint64_t offset, length;      /* its guest range */
};
struct repo_verdict {
    char *file;                   /* the point's image file name */
    bool ok;
    uint64_t hashed, shared;      /* blocks hashed; blocks taken from the
                                   * parent's verified hashes */
    struct repo_bad *bad;         /* the first REPO_MAX_BAD problems */
    size_t nbad;
    uint64_t bad_blocks;          /* all bad blocks */
};
#define REPO_MAX_BAD 64
struct repo_verify_result {
    struct repo_verdict *v;       /* one per point, as repo_open orders */
    size_t n;
    size_t bad_points;
    uint64_t bytes_read;          /* guest bytes read and hashed */
    uint64_t bytes_total;         /* sum of every point's view */
};
/*
 * Verify every point of the folder, as cbt verify checks one, sharing the
 * work of one chain: every stored block is read and hashed once (a
 * point's view differs from its parent's only in the blocks it holds; the
 * others must carry the parent's verified digests).  Returns 0 (res says
 * what was found), or -1 with *errp when the folder cannot be read or an
 * image is in use.
 */
int repo_verify(const char *dir, cbt_progress_fn *progress,
                void *progress_opaque, struct repo_verify_result *res,
                struct cbt_error **errp);
void repo_verify_result_free(struct repo_verify_result *res);

#endif
