/*
 * cbt_backup(): full, incremental and differential backups of a disk into
 * a folder of backups (include/cbt/backup.h; layout in docs/backups.md).
 *
 * What is copied
 * --------------
 * Everything moves in 64 KiB blocks, the block of the block hashes
 * (BLOCKHASH_BLOCK), which is also the cluster size of qcow2 targets, so a
 * block is a cluster.  The blocks to copy are
 *   full:         all of them;
 *   incremental / differential: the blocks the checkpoint's bitmap (its
 *                 union over the disk's chain) touches, plus, when the disk
 *                 was resized since the parent backup, every block from the
 *                 one holding the smallest end onwards: of the parent's
 *                 size, the disk's, and the sizes the checkpoints since
 *                 saw (a shrink and a grow change the tail without a bit
 *                 in any bitmap, as in QEMU).
 * Each block to copy is classified by the disk's block status and, when
 * that says data, by its contents:
 *   ZERO  block status says the whole block reads as zeroes (nothing is
 *         read), or it was read and is all zeroes;
 *   DATA  anything else.
 * Its digest is SHA-256 of its bytes (ZERO blocks use the known digest of
 * zeroes without reading).  The other blocks' digests come from the
 * parent's .hashes file, which is checked against the parent's manifest
 * first, so a damaged parent is never built upon.
 *
 * How it is written
 * -----------------
 *   full, qcow2 or raw:  the target starts empty (reads as zeroes), so ZERO
 *       blocks are not written at all and DATA blocks are written leaving
 *       out 4 KiB pieces of zeroes, as cbt convert / qemu-img convert do:
 *       the target is no thicker than the disk.
 *   incremental qcow2:   the target's backing file is the parent backup:
 *       unchanged blocks stay unallocated (they read from the parent); a
 *       DATA block is written whole; a ZERO block becomes a zero cluster
 *       (never data, never unallocated, which would show the parent), except
 *       past the parent's end, where a qcow2 chain reads zeroes anyway.
 *   incremental raw:     a sparse file of the full size: DATA blocks are
 *       written (their zero pieces left as holes), ZERO blocks are holes;
 *       the manifest's extents list both, which is how restore and verify
 *       know what this file carries.
 *
 * Order and failure
 * -----------------
 * Everything that can be refused is refused before any file is created: a
 * TARGET (or its .part / .json / .hashes) that exists, also as a link, a
 * TARGET in the disk's chain, a checkpoint name in use, a raw disk (no
 * checkpoints), and an incremental that is impossible (with auto_full: a
 * full backup instead, saying why).  Then: the target written as TARGET.part
 * (created exclusively, bfile_create_excl) and flushed, the .hashes written
 * (a new file, bfile_write_new), TARGET.part renamed to TARGET (only while
 * it is the file created), the manifest written (a new file, complete), and
 * only then the checkpoint created on the disk.  No file is ever written
 * through a name that existed before: nothing outside the folder can be
 * reached by a link planted in it.  The checkpoint's order and time are
 * known only once it exists, so the manifest is rewritten with them (the
 * predicted order is nearly always right; a crash between the two leaves a
 * manifest whose order the next incremental will not accept, so it asks for
 * a full: safe).  A disk with no checkpoint metadata yet has no id until its
 * first checkpoint is created; then the checkpoint comes before the
 * manifest, and a failure to write the manifest deletes it again.  Any
 * failure before the checkpoint exists removes every file this call created,
 * and the disk is untouched (it is opened read-write only so the checkpoint
 * can be created; the data path never writes it).
 */
#include <assert.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <sys/stat.h>
#include <time.h>

#include <cbt/backup.h>
#include <cbt/bitmap.h>
#include <cbt/chain.h>
#include <cbt/checkpoint.h>

#include "../bitmap/bitmap.h"
#include "../block/block.h"
#include "../util/util.h"
#include "backup_live.h"
#include "bchain.h"
#include "checkpoint_meta.h"
#include "blockpipe.h"
#include "hashtree.h"
#include "manifest.h"
#include "ops_util.h"

#ifdef CBT_VERSION
#define BACKUP_TOOL "cbt " CBT_VERSION
#else
#define BACKUP_TOOL "cbt"
#endif

#define B ((uint64_t)BLOCKHASH_BLOCK)
#define bk bk_job /* the state of one backup (backup_live.h calls it a job) */
#define SPARSE 4096u      /* zero pieces left out of new targets */
#define GRAN_MIN 512ull
#define GRAN_MAX (2ull << 30)

struct range {
    uint64_t start, end;
};

/* K_SAME: a rescan found the block's digest equal to the parent's: not
 * written (it reads from the parent).  K_CDATA: a DATA block the hash
 * stage compressed (--compress) into its own buffer (seg.clen bytes). */
enum blk_kind { K_NONE, K_DATA, K_ZERO, K_SAME, K_CDATA };

struct bk_job {
    const struct cbt_backup_opts *o;
    struct cbt_backup_result *res;
    struct cbt_image *disk;   /* offline: the disk, open; live: NULL */
    struct bk_live *live;     /* live: what QEMU's side provides */
    struct bk_source src;     /* where the data is read */
    bool frozen;              /* live: the view is frozen, the new
                               * checkpoint exists in QEMU */
    bool kept;                /* live: the backup and its record are kept */
    pthread_t done_thread;    /* live: src.done running beside the target's
                               * last writes (done_running) */
    bool done_running;
    struct cbt_warner done_warner;
    struct cbt_image *dst;
    const char *fmt;          /* target format */
    bool raw;
    bool full;
    bool rescan;              /* every block read, compared with the
                               * parent's digest; only changed ones kept */
    bool bitmap_lost;         /* the checkpoint's bitmap was the reason */
    uint64_t size;            /* the disk's virtual size */
    char disk_id[37];
    char *dir;                /* the target's folder */
    char *ckname;             /* the new checkpoint */
    char *created;            /* ISO time the backup started */
    uint64_t predicted_order;
    /* why an incremental is impossible: CBT_ERR_NEED_FULL, or
     * CBT_ERR_CORRUPT when the parent is damaged */
    enum cbt_error_kind why_kind;

    /* incremental / differential */
    struct cbt_checkpoint since;
    bool have_since;
    char *parent_path;
    struct manifest pm;
    char parent_manifest_sha[65];
    struct leaf_src ph;       /* the parent's leaves (either format) */
    struct bm_bitmap *pdata;  /* v1 parent: one bit a block, its leaf is not
                               * the zero block's digest (found while its
                               * digest is checked; for add_stale_zeroes);
                               * a v2 parent's records say it themselves */
    uint64_t psize;           /* the parent's virtual size */
    uint64_t min_size;        /* the smallest size since the checkpoint */
    struct range *dirty;      /* what to copy (a full: [0, size)); block-
                               * aligned, sorted, disjoint */
    size_t ndirty, capdirty;

    /* the new leaves, taken in block order as the drain passes them into
     * the new record file (sha256-tree-v2: only what differs from the
     * parent's view is stored); never whole in memory */
    struct leaf_sink hw;
    bool hw_open;
    uint64_t nblocks;         /* leaves of the new backup */
    struct manifest_extent *ext; /* raw targets: what the file carries */
    size_t next, capext;
    /* the copy (copy_all): the next block to read is fpos, in the range
     * [fpos, fend), then dirty range number frange; block status said
     * data up to fknown */
    uint64_t fpos, fend, fknown;
    size_t frange;
    struct io_fail {
        const char *what;     /* "reading", "writing", "block status" */
        const char *file;
        uint64_t off;
        int err;
    } fill_fail, drain_fail;
    uint64_t done, total;     /* progress, counted by the drain thread */

    /* pending write of consecutive like blocks */
    enum blk_kind pend;
    uint64_t pend_off, pend_len;
    const uint8_t *pend_buf;

    /* the files of the new backup: only those this call created are
     * removed on failure */
    char *target_json, *target_hashes, *target_part;
    int part_fd;              /* TARGET.part (later TARGET), open: ours */
    bool made_hashes, renamed, made_json;
    char tree_sha[65];        /* the record file's SHA-256 */
};

static void oom(struct cbt_error **errp)
{
    cbt_error_set(errp, ENOMEM, "backup: out of memory");
}

static char *iso_time(int64_t sec, uint32_t nsec)
{
    time_t t = (time_t)sec;
    struct tm tm;
    char buf[64];
    if (!gmtime_r(&t, &tm) ||
        strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%S", &tm) == 0)
        return strdup("1970-01-01T00:00:00.000000000Z");
    return cbt_strdup_printf("%s.%09" PRIu32 "Z", buf, nsec);
}

static const char *base_name(const char *path)
{
    const char *slash = strrchr(path, '/');
    return slash ? slash + 1 : path;
}

static void progress(struct bk *b)
{
    if (b->o->progress)
        b->o->progress(b->o->progress_opaque, b->done, b->total);
}

/* ---- refusals before anything is written ---- */

static int check_opt_values(const struct cbt_backup_opts *o,
                            struct cbt_error **errp)
{
    if (!o->disk || !*o->disk || !o->target || !*o->target) {
        cbt_error_set(errp, EINVAL, "backup: empty file name");
        return -1;
    }
    if (o->format && strcmp(o->format, "qcow2") != 0 &&
        strcmp(o->format, "raw") != 0) {
        cbt_error_set(errp, EINVAL, "%s: unknown backup format '%s' (qcow2 "
                      "or raw)", o->target, o->format);
        return -1;
    }
    if (o->mode == CBT_BACKUP_DIFFERENTIAL && (!o->since || !*o->since)) {
        cbt_error_set(errp, EINVAL, "%s: a differential backup needs the "
                      "checkpoint it starts from", o->target);
        return -1;
    }
    if (o->checkpoint && (!*o->checkpoint ||
                          strlen(o->checkpoint) > CBT_CHECKPOINT_NAME_MAX)) {
        cbt_error_set(errp, EINVAL, "%s: checkpoint name must be 1 to %d "
                      "bytes", o->disk, CBT_CHECKPOINT_NAME_MAX);
        return -1;
    }
    if (o->compress && strcmp(o->compress, "zstd") != 0 &&
        strcmp(o->compress, "zlib") != 0) {
        cbt_error_set(errp, EINVAL, "%s: unknown compression '%s' (zstd or "
                      "zlib)", o->target, o->compress);
        return -1;
    }
    if (o->compress && o->format && strcmp(o->format, "raw") == 0) {
        cbt_error_set(errp, EINVAL, "%s: a raw backup cannot be compressed "
                      "(--compress writes qcow2 compressed clusters)",
                      o->target);
        return -1;
    }
    if (o->rescan && o->mode == CBT_BACKUP_FULL) {
        cbt_error_set(errp, EINVAL, "%s: --rescan makes an incremental or "
                      "differential backup (it compares the disk with the "
                      "previous backup); a full backup reads everything "
                      "anyway", o->target);
        return -1;
    }
    if (o->no_checkpoint && (o->mode != CBT_BACKUP_FULL || o->auto_full ||
                             o->checkpoint || o->granularity)) {
        cbt_error_set(errp, EINVAL, "%s: a copy-only backup (no checkpoint) "
                      "is a full backup: --no-checkpoint goes with --full "
                      "only, without --checkpoint or -g", o->target);
        return -1;
    }
    uint64_t g = o->granularity;
    if (g && (!IS_POW2(g) || g < GRAN_MIN || g > GRAN_MAX)) {
        cbt_error_set(errp, EINVAL, "%s: granularity %" PRIu64 " must be a "
                      "power of two between 512 B and 2 GiB", o->disk, g);
        return -1;
    }
    return 0;
}

/* Mistakes in the options (kind CBT_ERR_USAGE). */
static int check_opts(const struct cbt_backup_opts *o, struct cbt_error **errp)
{
    if (check_opt_values(o, errp) < 0) {
        cbt_error_set_kind(errp, CBT_ERR_USAGE);
        return -1;
    }
    return 0;
}

/*
 * Whose files are these?  cbt recognises what it leaves behind by name and
 * order (see "Order and failure" above): a backup is written as
 * TARGET.part, then TARGET.hashes appears, then TARGET.part is renamed to
 * TARGET, then TARGET.json appears.  So an interrupted backup leaves
 * TARGET.part (with or without TARGET.hashes), or TARGET with TARGET.hashes
 * and no manifest; a restore leaves OUT.part.  Those, and only those, are
 * named as leftovers that may be removed.  Any other file at TARGET is not
 * cbt's: it is refused without advice to remove it, and when it is an
 * image holding checkpoints or bitmaps (a disk) the arguments are taken to
 * be swapped.
 */

/* Does path exist (as anything, a dangling link too)? */
static bool exists(const char *path)
{
    struct stat st;
    return lstat(path, &st) == 0;
}

/* Is path itself (not a link) a regular file whose size is a multiple of
 * `unit`? */
static bool regular_file(const char *path, uint64_t unit)
{
    struct stat st;
    return lstat(path, &st) == 0 && S_ISREG(st.st_mode) &&
           (uint64_t)st.st_size % unit == 0;
}

/* Is the image at path a disk: one holding checkpoints or bitmaps? */
static bool looks_like_disk(const char *path)
{
    /* Only what can be an image is opened (a FIFO would block). */
    struct stat st;
    if (stat(path, &st) < 0 || !(S_ISREG(st.st_mode) || S_ISBLK(st.st_mode)))
        return false;
    struct cbt_error *e = NULL;
    struct cbt_image *img = cbt_image_open(path, NULL, CBT_OPEN_NO_BACKING,
                                           &e);
    cbt_error_free(e);
    if (!img)
        return false;
    struct cbt_bitmap_info *list = NULL;
    size_t n = 0;
    e = NULL;
    bool disk = cbt_bitmap_list(img, &list, &n, &e) == 0 && n > 0;
    cbt_bitmap_info_free_list(list, n);
    cbt_error_free(e);
    if (!disk) {
        char id[37];
        e = NULL;
        disk = cbt_checkpoint_disk_id(img, id, &e) == 0 && id[0];
        cbt_error_free(e);
    }
    cbt_image_close(img, NULL);
    return disk;
}

/* Is path a backup made by cbt: path.json beside it, a manifest that
 * describes it? */
static bool is_backup(const char *path)
{
    CLEANUP_FREE char *mp = manifest_path_for(path);
    struct manifest m;
    struct cbt_error *e = NULL;
    if (!mp || manifest_read(mp, &m, NULL, &e) < 0) {
        cbt_error_free(e);
        return false;
    }
    bool ok = strcmp(m.image_file, base_name(path)) == 0;
    manifest_free(&m);
    return ok;
}

/* The error just set is a mistake in the arguments: -1. */
static int usage_mistake(struct cbt_error **errp)
{
    cbt_error_set_kind(errp, CBT_ERR_USAGE);
    return -1;
}

/* A folder as TARGET. */
static int check_not_folder(const char *t, struct cbt_error **errp)
{
    struct stat st;
    if (stat(t, &st) == 0 && S_ISDIR(st.st_mode)) {
        cbt_error_set(errp, EISDIR, "%s: is a folder; TARGET names the new "
                      "backup file in the backup folder, e.g. %s%sNAME.qcow2",
                      t, t, t[strlen(t) - 1] == '/' ? "" : "/");
        return usage_mistake(errp);
    }
    return 0;
}

/* Before DISK is opened: a folder as TARGET, a backup as DISK. */
static int check_roles(struct bk *b, struct cbt_error **errp)
{
    const char *disk = b->o->disk, *t = b->o->target;
    if (check_not_folder(t, errp) < 0)
        return -1;
    if (!is_backup(disk))
        return 0;
    if (exists(t)) {
        cbt_error_set(errp, EINVAL,
                      "%s: is a backup made by cbt (%s.json is "
                      "its manifest) and %s exists: the disk and the "
                      "target look swapped",
                      disk, disk, t);
        cbt_error_set_remedy(errp, CBT_REMEDY_SWAP_DISK_TARGET);
    } else {
        cbt_error_set(errp, EINVAL,
                      "%s: is a backup made by cbt (%s.json is "
                      "its manifest), not a disk; backing it up would change "
                      "it (restore it first)",
                      disk, disk);
    }
    return usage_mistake(errp);
}

/* TARGET, its work file and its two companions must not exist; TARGET must
 * not be a layer of the disk.  Only what cbt leaves behind (see above) is
 * named as a leftover to remove. */
static int check_target(struct bk *b, struct cbt_error **errp)
{
    const char *t = b->o->target;
    struct cbt_error *e = NULL;
    int depth;
    /* (A live disk is held by QEMU: its files are locked against this.) */
    if (b->disk && ops_find_layer(b->disk, t, &depth, &e)) {
        cbt_error_set(errp, EINVAL, "%s: the target is layer %d of the "
                      "disk's chain; refusing to overwrite it", t, depth);
        return usage_mistake(errp);
    }
    cbt_error_free(e);
    bool has_json = exists(b->target_json);
    bool our_hashes = !has_json && regular_file(b->target_hashes,
                                                TREE_HEADER + TREE_TRAILER);
    if (exists(b->target_part)) {
        if (!regular_file(b->target_part, 1))
            cbt_error_set(errp, EEXIST, "%s: exists and is not a regular "
                          "file, so not a work file of cbt; refusing to "
                          "write there: choose another name", b->target_part);
        else
            cbt_error_set(errp, EEXIST, "%s: exists: the work file of an "
                          "interrupted cbt backup or restore (cbt writes %s "
                          "and renames it to %s when it is complete); if no "
                          "cbt is running on it, remove it%s%s",
                          b->target_part, b->target_part, t,
                          our_hashes ? " and " : "",
                          our_hashes ? b->target_hashes : "");
        return -1;
    }
    if (exists(t)) {
        if (has_json) {
            cbt_error_set(errp, EEXIST, "%s: already exists; a backup is "
                          "never overwritten: choose another name", t);
        } else if (our_hashes && regular_file(t, 1)) {
            cbt_error_set(errp, EEXIST, "%s: exists with %s but without its "
                          "manifest %s: left by an interrupted cbt backup "
                          "(which writes the block hashes, then renames the "
                          "image into place, then writes the manifest); if "
                          "no cbt is running on it, remove %s and %s", t,
                          b->target_hashes, b->target_json, t,
                          b->target_hashes);
        } else if (looks_like_disk(t)) {
            cbt_error_set(errp, EEXIST,
                          "%s: exists and is a disk image with "
                          "checkpoints or bitmaps, not a backup: the disk "
                          "and the target look swapped",
                          t);
            cbt_error_set_remedy(errp, CBT_REMEDY_SWAP_DISK_TARGET);
            return usage_mistake(errp);
        } else {
            cbt_error_set(errp, EEXIST, "%s: already exists and is not a "
                          "backup made by cbt (no manifest %s beside it); a "
                          "backup never overwrites a file: choose another "
                          "name", t, b->target_json);
        }
        return -1;
    }
    CLEANUP_FREE char *v1 = hashes_path_for(t); /* an older cbt's name */
    const char *others[] = {b->target_json, b->target_hashes, v1};
    for (size_t i = 0; i < 3; i++) {
        if (!others[i]) {
            oom(errp);
            return -1;
        }
        if (exists(others[i])) {
            cbt_error_set(errp, EEXIST, "%s: already exists; a backup is "
                          "never overwritten: choose another name", others[i]);
            return -1;
        }
    }
    return 0;
}

static bool bitmap_in_chain(struct cbt_image *disk, const char *name,
                            struct cbt_error **errp, int *err)
{
    *err = 0;
    for (struct cbt_image *l = disk; l; l = cbt_image_backing(l)) {
        struct cbt_bitmap_info *list = NULL;
        size_t n = 0;
        if (cbt_bitmap_list(l, &list, &n, errp) < 0) {
            *err = -1;
            return false;
        }
        bool found = false;
        for (size_t i = 0; i < n; i++)
            found = found || strcmp(list[i].name, name) == 0;
        cbt_bitmap_info_free_list(list, n);
        if (found)
            return true;
    }
    return false;
}

/* Does a backup of this disk in the target's folder name checkpoint
 * `name`?  (One of a cbt killed before its checkpoint was kept does, and
 * its checkpoint is gone: a new checkpoint of that name would make two
 * backups of one name, and no parent.) */
static bool named_in_folder(struct bk *b, const char *name)
{
    if (!b->disk_id[0] || !b->dir)
        return false;
    char *img = NULL;
    struct manifest m;
    struct cbt_error *e = NULL;
    int r = manifest_find_by_checkpoint(b->dir, b->disk_id, name, &img, &m,
                                        NULL, &e);
    bool taken = r == 0 || cbt_error_errno(e) == EEXIST;
    if (r == 0)
        manifest_free(&m);
    free(img);
    cbt_error_free(e);
    return taken;
}

/* 0 when `name` is free for a new checkpoint, 1 when taken, -1 on error. */
static int name_taken(struct bk *b, const char *name, struct cbt_error **errp)
{
    if (named_in_folder(b, name))
        return 1;
    if (b->live)
        return b->live->name_taken(b->live, name, errp);
    struct cbt_checkpoint c;
    struct cbt_error *e = NULL;
    if (cbt_checkpoint_get(b->disk, name, &c, &e) == 0) {
        cbt_checkpoint_clear(&c);
        return 1;
    }
    if (cbt_error_errno(e) != ENOENT) {
        if (errp && !*errp)
            *errp = e;
        else
            cbt_error_free(e);
        return -1;
    }
    cbt_error_free(e);
    int err;
    bool bm = bitmap_in_chain(b->disk, name, errp, &err);
    if (err < 0)
        return -1;
    return bm ? 1 : 0;
}

/* The new checkpoint's name: as given (refused when in use), or
 * "cbt-YYYYMMDDTHHMMSSZ" with "-2", "-3"... when that is taken. */
static int choose_name(struct bk *b, struct cbt_error **errp)
{
    if (b->o->checkpoint) {
        int t = name_taken(b, b->o->checkpoint, errp);
        if (t < 0)
            return -1;
        if (t) {
            cbt_error_set(errp, EEXIST, "%s: checkpoint (or bitmap) '%s' "
                          "already exists, or a backup in %s was made of a "
                          "checkpoint of that name; choose another name "
                          "with --checkpoint", b->o->disk, b->o->checkpoint,
                          b->dir);
            return -1;
        }
        b->ckname = strdup(b->o->checkpoint);
        if (!b->ckname) {
            oom(errp);
            return -1;
        }
        return 0;
    }
    time_t now = time(NULL);
    struct tm tm;
    char stamp[32];
    gmtime_r(&now, &tm);
    strftime(stamp, sizeof(stamp), "cbt-%Y%m%dT%H%M%SZ", &tm);
    for (unsigned k = 1; k < 1000; k++) {
        char *name = k == 1 ? strdup(stamp)
                            : cbt_strdup_printf("%s-%u", stamp, k);
        if (!name) {
            oom(errp);
            return -1;
        }
        int t = name_taken(b, name, errp);
        if (t == 0) {
            b->ckname = name;
            return 0;
        }
        free(name);
        if (t < 0)
            return -1;
    }
    cbt_error_set(errp, EEXIST, "%s: cannot find a free checkpoint name; "
                  "give one with --checkpoint", b->o->disk);
    return -1;
}

/* ---- is an incremental possible? ---- */

/* The planning functions below return 1 with a malloc'd reason in *why
 * when the incremental or differential cannot be taken; 0 when it can
 * (parent found and loaded); -1 with *errp on a hard error.
 * plan_incremental returns 2 instead of 1 when the reason is the
 * checkpoint: none, or one that cannot be trusted.  impossible() makes
 * the reason: 1, or -1 with *errp when there is no memory for it. */
static int PRINTF_FMT(3, 4)
    impossible(char **why, struct cbt_error **errp, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    if (vasprintf(why, fmt, ap) < 0)
        *why = NULL;
    va_end(ap);
    if (*why)
        return 1;
    cbt_error_set(errp, ENOMEM, "out of memory");
    return -1;
}

/*
 * Before building on the parent: what is cheap to check of its chain
 * (bchain_open's BCHAIN_CHEAP: every manifest down to the full, vouched for
 * by its child's digest, their links and orders, which rules out loops;
 * each hashes file's length; each image a regular file, qcow2 ones linked
 * to their parent).  The hashes files' digests are not read here (for a
 * large disk they are gigabytes per backup); the parent's own leaves are,
 * below.  A file gone (old backups rotated away) means a full backup is
 * needed; anything else is damage (run cbt verify).  On 0 the chain stays
 * open in *c for the leaves (the caller closes it).
 */
static int check_parent_chain(struct bk *b, struct bchain *c, char **why,
                              struct cbt_error **errp)
{
    struct cbt_error *e = NULL;
    int r = bchain_open(b->parent_path, BCHAIN_CHEAP, c, &e);
    int ret = 0;
    if (r < 0 && cbt_error_errno(e) == ENOMEM) {
        if (errp && !*errp)
            *errp = e;
        else
            cbt_error_free(e);
        ret = -1;
    } else if (r < 0) {
        b->why_kind = cbt_error_errno(e) == ENOENT ? CBT_ERR_NEED_FULL
                                                   : CBT_ERR_CORRUPT;
        ret = impossible(why, errp, "the parent backup cannot be used: %s",
                         cbt_error_message(e));
        cbt_error_free(e);
    } else if (r > 0 && c->missing) {
        b->why_kind = CBT_ERR_NEED_FULL;
        ret = impossible(why, errp,
                         "the chain of the parent backup %s is "
                         "incomplete: %s; a backup on top of it could not be "
                         "restored",
                         b->parent_path, c->problem);
    } else if (r > 0) {
        b->why_kind = CBT_ERR_CORRUPT;
        ret = impossible(why, errp,
                         "the chain of the parent backup %s is damaged: "
                         "%s (a verification of %s names the damage)",
                         b->parent_path, c->problem, b->parent_path);
    }
    if (ret != 0)
        bchain_close(c);
    return ret;
}

/* The disk's checkpoints with their health (caller frees the list). */
static int list_checkpoints(struct bk *b, struct cbt_checkpoint **list,
                            size_t *n, struct cbt_error **errp)
{
    if (b->live)
        return b->live->checkpoints(b->live, list, n, errp);
    return cbt_checkpoint_list(b->disk, list, n, errp);
}

/* The parent's blocks whose leaf is not the zero block's digest, marked
 * in b->pdata while its hashes file is checked: add_stale_zeroes then
 * needs no second pass over that file (8 GiB at 16 TiB). */
static int scan_parent_leaf(void *opaque, uint64_t first,
                            const uint8_t *leaves, uint64_t count)
{
    struct bk *b = opaque;
    uint8_t zd[32];
    blockhash_zero_digest((size_t)B, zd);
    for (uint64_t i = 0; i < count;) {
        if (memcmp(leaves + i * 32, zd, 32) == 0) {
            i++;
            continue;
        }
        uint64_t j = i + 1;
        while (j < count && memcmp(leaves + j * 32, zd, 32) != 0)
            j++;
        bm_set(b->pdata, (first + i) * B, (j - i) * B);
        i = j;
    }
    return 0;
}

/*
 * A sha256-tree-v2 parent: the record files of its chain (the parent's,
 * down to the first v2 backup of the chain), each checked against its
 * manifest's file-sha256 while it is read (proportional to the chain's
 * records, not to the disk).  Which of the parent's blocks are not
 * zeroes is asked of its level-0 records when needed (parent_data), not
 * noted for the whole disk beforehand.  The root is not recomputed here:
 * cbt verify does that.  c: the chain check_parent_chain found sound.
 * 0, 1 with *why, or -1.
 */
static int open_parent_tree(struct bk *b, struct bchain *c, char **why,
                            struct cbt_error **errp)
{
    struct cbt_error *e = NULL;
    int ret = 0;
    size_t n = bchain_tree_links(c), bad = 0;
    const char **paths = calloc(n, sizeof(*paths));
    const char **sha = calloc(n, sizeof(*sha));
    uint64_t *blocks = calloc(n, sizeof(*blocks));
    if (!paths || !sha || !blocks) {
        oom(errp);
        ret = -1;
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        paths[i] = c->v[i].hashes_path;
        sha[i] = c->v[i].m.hash_file_sha256;
        blocks[i] = c->v[i].m.blocks;
    }
    if (leaf_src_open_tree(&b->ph, b->pm.virtual_size, paths, blocks, sha, n,
                           &bad, &e) < 0) {
        if (cbt_error_errno(e) == ENOMEM) {
            *errp = e;
            ret = -1;
            goto out;
        }
        b->why_kind = CBT_ERR_CORRUPT;
        ret = impossible(why, errp, "parent backup: %s (damaged? a "
                         "verification of %s names the damage)",
                         cbt_error_message(e), b->parent_path);
        cbt_error_free(e);
        goto out;
    }
out:
    free(paths);
    free(sha);
    free(blocks);
    return ret;
}

/* The parent backup of the checkpoint b->since in the folder, its chain
 * checked and its leaves loaded: 0, 1 with *why, or -1 (plan_incremental's
 * convention). */
static int plan_parent(struct bk *b, char **why, struct cbt_error **errp)
{
    const struct cbt_backup_opts *o = b->o;
    const char *disk = o->disk;
    int ret;
    if (!b->disk_id[0])
        return impossible(why, errp,
                          "%s has no disk id (no checkpoint metadata)", disk);
    struct cbt_error *e = NULL;
    if (manifest_find_by_checkpoint(b->dir, b->disk_id, b->since.name,
                                    &b->parent_path, &b->pm,
                                    b->parent_manifest_sha, &e) < 0) {
        ret = impossible(why, errp, "%s", cbt_error_message(e));
        cbt_error_free(e);
        return ret;
    }
    const struct manifest *pm = &b->pm;
    if (pm->checkpoint_order != b->since.order)
        return impossible(why, errp,
                          "%s: backup %s is of an older checkpoint named "
                          "'%s' (order %" PRIu64 ", the disk's is %" PRIu64 ")",
                          disk, b->parent_path, b->since.name,
                          pm->checkpoint_order, b->since.order);
    bool parent_raw = strcmp(pm->image_format, "raw") == 0;
    if (o->format && strcmp(o->format, pm->image_format) != 0)
        return impossible(why, errp,
                          "%s: the parent backup %s is %s; the backups "
                          "of one chain share one format",
                          o->target, b->parent_path, pm->image_format);
    b->fmt = parent_raw ? "raw" : "qcow2";
    struct bchain chain;
    if ((ret = check_parent_chain(b, &chain, why, errp)) != 0)
        return ret;

    /* The parent's leaves, checked against its manifest before the new
     * backup takes the digests of its unchanged blocks from them. */
    if (pm->tree) {
        ret = open_parent_tree(b, &chain, why, errp);
        bchain_close(&chain);
        if (ret != 0)
            return ret;
        b->psize = pm->virtual_size;
        return 0;
    }
    bchain_close(&chain);
    CLEANUP_FREE char *phash = manifest_sibling(b->parent_path, pm->hash_file);
    if (!phash) {
        oom(errp);
        return -1;
    }
    char root[65];
    b->pdata = bm_new(pm->virtual_size, B);
    if (!b->pdata) {
        oom(errp);
        return -1;
    }
    b->ph.size = pm->virtual_size;
    b->ph.n = DIV_ROUND_UP(pm->virtual_size, B);
    if (hashes_reader_open_scan(&b->ph.v1, phash, b->ph.n, root,
                                scan_parent_leaf, b, &e) < 0) {
        b->why_kind = CBT_ERR_CORRUPT;
        ret = impossible(why, errp, "parent backup: %s", cbt_error_message(e));
        cbt_error_free(e);
        return ret;
    }
    if (strcmp(root, pm->hash_file_sha256) != 0 ||
        strcmp(root, pm->root) != 0) {
        b->why_kind = CBT_ERR_CORRUPT;
        return impossible(why, errp,
                          "%s: the block hashes do not match the "
                          "manifest %s.json (damaged? a verification of the "
                          "chain tells)",
                          phash, b->parent_path);
    }
    b->psize = pm->virtual_size;
    return 0;
}

static int plan_incremental(struct bk *b, char **why, struct cbt_error **errp)
{
    const struct cbt_backup_opts *o = b->o;
    const char *disk = o->disk;
    struct cbt_checkpoint *list = NULL;
    size_t n = 0;
    if (list_checkpoints(b, &list, &n, errp) < 0)
        return -1;
    for (size_t i = 0; i < n; i++)
        b->predicted_order = MAX(b->predicted_order, list[i].order);
    int ret = 0;
    const struct cbt_checkpoint *c = NULL;
    if (o->mode == CBT_BACKUP_INCREMENTAL) {
        if (n == 0)
            ret = impossible(why, errp,
                             "%s has no checkpoint to start an "
                             "incremental backup from",
                             disk);
        else
            c = &list[n - 1];
    } else {
        for (size_t i = 0; i < n && !c; i++)
            if (strcmp(list[i].name, o->since) == 0)
                c = &list[i];
        if (!c)
            ret = impossible(why, errp, "%s has no checkpoint '%s'", disk,
                             o->since);
    }
    char *bitmap_why = NULL;
    if (c && !c->usable) {
        ret = impossible(why, errp, "%s: checkpoint '%s' cannot be used: %s",
                         disk, c->name,
                         c->problem ? c->problem
                                    : "its bitmap is "
                                      "not valid over the chain");
        /* The bitmap is lost, not the checkpoint's record nor its backup:
         * a rescan needs neither the bitmap nor anything it vouches for. */
        if (ret > 0 && (o->rescan || o->auto_full)) {
            bitmap_why = *why;
            *why = NULL;
            ret = 0;
        }
        b->bitmap_lost = ret > 0;
    }
    /* No checkpoint to trust: a full backup is what is needed. */
    if (ret > 0)
        ret = 2;
    b->rescan = ret == 0 && (o->rescan || bitmap_why);
    if (c && ret == 0) {
        /* The smallest size the disk had since c, as far as the
         * checkpoints saw it: a shrink and a grow since then changed the
         * tail without a bit in any bitmap (QEMU's resize semantics). */
        b->min_size = b->size;
        for (size_t i = 0; i < n; i++)
            if (list[i].order >= c->order)
                b->min_size = MIN(b->min_size, list[i].virtual_size);
        b->since = *c;
        /* Take the strings over; the list's copy is cleared below. */
        list[c - list] = (struct cbt_checkpoint){0};
        b->have_since = true;
    }
    cbt_checkpoint_free_list(list, n);
    if (ret == 0)
        ret = plan_parent(b, why, errp);
    if (bitmap_why && ret > 0) {
        /* Neither the bitmap nor a rescan: say both. */
        char *both = cbt_strdup_printf("%s; and no rescan instead: %s",
                                       bitmap_why, *why);
        free(*why);
        *why = both;
        ret = both ? ret : -1;
        if (!both)
            oom(errp);
    } else if (bitmap_why && ret == 0 && !o->rescan) {
        /* auto_full chose the rescan: the reason goes to the result. */
        b->res->fallback = bitmap_why;
        bitmap_why = NULL;
    }
    free(bitmap_why);
    return ret;
}

/* ---- the source: the open disk (offline) ---- */

static int img_status(void *opaque, uint64_t off, uint64_t len, uint64_t *run,
                      bool *zero)
{
    struct bk *b = opaque;
    struct cbt_extent e;
    int r = cbt_image_block_status(b->disk, off, len, &e);
    if (r < 0)
        return r;
    *run = e.length;
    *zero = (e.flags & CBT_BS_ZERO) != 0;
    return 0;
}

static int img_read(void *opaque, void *buf, size_t len, uint64_t off)
{
    struct bk *b = opaque;
    return cbt_image_pread(b->disk, buf, len, off);
}

static int img_dirty(void *opaque,
                     int (*cb)(void *cbop, uint64_t start, uint64_t len,
                               bool dirty),
                     void *cbop, struct cbt_error **errp)
{
    struct bk *b = opaque;
    return cbt_chain_bitmap_extents(b->disk, b->since.name, 0, cb, cbop, errp);
}

static void use_image_source(struct bk *b)
{
    b->src = (struct bk_source){
        .opaque = b,
        .status = img_status,
        .read = img_read,
        .dirty = img_dirty,
    };
}

/* ---- the dirty set ---- */

static int push_range(struct bk *b, uint64_t start, uint64_t end)
{
    if (start >= end)
        return 0;
    /* Merge with the last range when in order (bitmap extents come in
     * order; the resize range may not, collect_dirty sorts then). */
    if (b->ndirty && start >= b->dirty[b->ndirty - 1].start &&
        start <= b->dirty[b->ndirty - 1].end) {
        struct range *last = &b->dirty[b->ndirty - 1];
        last->end = MAX(last->end, end);
        return 0;
    }
    if (b->ndirty == b->capdirty) {
        size_t cap = b->capdirty ? b->capdirty * 2 : 64;
        struct range *v = realloc(b->dirty, cap * sizeof(*v));
        if (!v)
            return -ENOMEM;
        b->dirty = v;
        b->capdirty = cap;
    }
    b->dirty[b->ndirty++] = (struct range){start, end};
    return 0;
}

static int on_extent(void *opaque, uint64_t start, uint64_t length,
                     bool dirty)
{
    struct bk *b = opaque;
    if (!dirty || start >= b->size)
        return 0;
    uint64_t end = MIN(start + length, b->size);
    b->res->dirty_bytes += end - start;
    return push_range(b, ALIGN_DOWN(start, B), MIN(ALIGN_UP(end, B), b->size));
}

static int cmp_range(const void *x, const void *y)
{
    const struct range *a = x, *c = y;
    return a->start < c->start ? -1 : a->start > c->start;
}

static void sort_merge(struct bk *b)
{
    if (b->ndirty < 2)
        return;
    qsort(b->dirty, b->ndirty, sizeof(*b->dirty), cmp_range);
    size_t k = 0;
    for (size_t i = 0; i < b->ndirty; i++) {
        if (k && b->dirty[i].start <= b->dirty[k - 1].end)
            b->dirty[k - 1].end = MAX(b->dirty[k - 1].end, b->dirty[i].end);
        else
            b->dirty[k++] = b->dirty[i];
    }
    b->ndirty = k;
}

/* The first of the parent's blocks in [*o, end) (whole blocks) whose
 * leaf is not the zero block's digest: 1 with *o and *n (a run of them),
 * 0 when there is none, or -errno. */
static int parent_data(struct bk *b, uint64_t *o, uint64_t end, uint64_t *n)
{
    if (b->pdata)
        return bm_next_dirty_area(b->pdata, o, end, n) ? 1 : 0;
    uint64_t found;
    int r = leaf_src_nonzero(&b->ph, *o / B, (end - *o) / B, &found);
    if (r < 0)
        return r;
    if (found == UINT64_MAX)
        return 0;
    *o = found * B;
    *n = B;
    return 1;
}

/*
 * Blocks below `upto` that read as zeroes now (block status, metadata only)
 * while the parent's digest says they held something else changed, whether
 * or not the bitmap saw it: a shrink and a grow between two checkpoints cut
 * the tail off without a bit in any bitmap (QEMU's resize semantics).  They
 * are copied too (as zeroes), with a warning.  Cheap: no data is read.
 */
static int add_stale_zeroes(struct bk *b, uint64_t upto,
                            struct cbt_error **errp)
{
    size_t nd = b->ndirty, j = 0; /* the sorted ranges from the bitmap */
    uint64_t found = 0;
    for (uint64_t pos = 0; pos < upto;) {
        uint64_t run;
        bool zero;
        int r = b->src.status(b->src.opaque, pos, upto - pos, &run, &zero);
        if (r < 0) {
            cbt_error_set(errp, -r, "%s: cannot read block status at offset "
                          "%" PRIu64 ": %s", b->o->disk, pos, strerror(-r));
            return -1;
        }
        /* The whole blocks of a zero run whose parent leaf is not that of
         * zeroes (parent_data; upto is below the parent's end) and that no
         * dirty range holds. */
        uint64_t end = ALIGN_DOWN(pos + run, B), o = ALIGN_UP(pos, B), n;
        while (zero && o < end && (r = parent_data(b, &o, end, &n)) > 0) {
            for (uint64_t i = o / B; i < (o + n) / B; i++) {
                while (j < nd && b->dirty[j].end <= i * B)
                    j++;
                if (j < nd && b->dirty[j].start <= i * B)
                    continue;
                if (push_range(b, i * B, (i + 1) * B) < 0) {
                    oom(errp);
                    return -1;
                }
                found++;
            }
            o += n;
        }
        if (r < 0) {
            cbt_error_set(errp, -r, "%s: cannot read the parent's block "
                          "hashes: %s", b->parent_path, strerror(-r));
            return -1;
        }
        pos += run;
    }
    if (found)
        cbt_warn("%s: %" PRIu64 " blocks of 64 KiB read as zeroes but were "
                 "not marked in checkpoint '%s' (a shrink and a grow since "
                 "it?); they are backed up too",
                 b->o->disk, found, b->since.name);
    return 0;
}

static int collect_dirty(struct bk *b, struct cbt_error **errp)
{
    if (b->rescan) {
        /* No bitmap: every block is read and compared with the parent's
         * digest (the hash stage), which also covers any resize. */
        if (push_range(b, 0, b->size) < 0) {
            oom(errp);
            return -1;
        }
        b->total = b->size;
        return 0;
    }
    if (b->src.dirty(b->src.opaque, on_extent, b, errp) < 0)
        return -1;
    /* A resize since the parent: the blocks from the one holding the
     * smallest end onwards changed length, appeared, or were cut off and
     * grown again (reading zeroes now). */
    uint64_t lo = MIN(MIN(b->psize, b->size), b->min_size);
    uint64_t from = ALIGN_DOWN(lo, B);
    if ((b->psize != b->size || lo < b->size) &&
        push_range(b, from, b->size) < 0) {
        oom(errp);
        return -1;
    }
    sort_merge(b);
    if (add_stale_zeroes(b, from, errp) < 0)
        return -1;
    sort_merge(b);
    for (size_t i = 0; i < b->ndirty; i++)
        b->total += b->dirty[i].end - b->dirty[i].start;
    return 0;
}

/* ---- writing ---- */

static int push_extent(struct bk *b, uint64_t start, uint64_t len, bool zero)
{
    if (!b->raw || len == 0)
        return 0;
    if (b->next) {
        struct manifest_extent *l = &b->ext[b->next - 1];
        if (l->zero == zero && l->start + l->length == start) {
            l->length += len;
            return 0;
        }
    }
    if (b->next == b->capext) {
        size_t cap = b->capext ? b->capext * 2 : 64;
        struct manifest_extent *v = realloc(b->ext, cap * sizeof(*v));
        if (!v)
            return -ENOMEM;
        b->ext = v;
        b->capext = cap;
    }
    b->ext[b->next++] = (struct manifest_extent){start, len, zero};
    return 0;
}

/* Write len bytes of buf at off leaving out 4 KiB pieces of zeroes (the
 * target reads zeroes there already).  Counts what it writes. */
static int write_sparse(struct bk *b, const uint8_t *buf, uint64_t off,
                        uint64_t len)
{
    uint64_t pos = 0;
    while (pos < len) {
        uint64_t n = MIN((uint64_t)SPARSE, len - pos);
        if (ops_is_zero(buf + pos, (size_t)n)) {
            b->res->bytes_zeroed += n;
            pos += n;
            continue;
        }
        uint64_t run = n;
        while (pos + run < len) {
            uint64_t m = MIN((uint64_t)SPARSE, len - pos - run);
            if (ops_is_zero(buf + pos + run, (size_t)m))
                break;
            run += m;
        }
        int r = cbt_image_pwrite(b->dst, buf + pos, (size_t)run, off + pos);
        if (r < 0)
            return r;
        b->res->bytes_copied += run;
        pos += run;
    }
    return 0;
}

/* Write the pending run of like blocks. */
static int flush_pending(struct bk *b)
{
    enum blk_kind k = b->pend;
    uint64_t off = b->pend_off, len = b->pend_len;
    b->pend = K_NONE;
    b->pend_len = 0;
    if (k == K_NONE || len == 0)
        return 0;
    int r = push_extent(b, off, len, k == K_ZERO);
    if (r < 0)
        return r;
    if (k == K_ZERO) {
        /* Only an incremental qcow2 target needs zero clusters: a new
         * target reads zeroes already, a raw target keeps a hole, and past
         * the parent's end a qcow2 chain reads zeroes. */
        if (!b->full && !b->raw && off < b->psize) {
            uint64_t n = MIN(len, b->psize - off);
            r = cbt_image_pwrite_zeroes(b->dst, off, n, 0);
            if (r < 0)
                return r;
        }
        b->res->bytes_zeroed += len;
        return 0;
    }
    if (b->full || b->raw)
        return write_sparse(b, b->pend_buf, off, len);
    r = cbt_image_pwrite(b->dst, b->pend_buf, (size_t)len, off);
    if (r == 0)
        b->res->bytes_copied += len;
    return r;
}

static int add_block(struct bk *b, enum blk_kind k, const uint8_t *buf,
                     uint64_t off, uint64_t len)
{
    if (b->pend == k && b->pend_off + b->pend_len == off) {
        b->pend_len += len;
        return 0;
    }
    int r = flush_pending(b);
    if (r < 0)
        return r;
    b->pend = k;
    b->pend_off = off;
    b->pend_len = len;
    b->pend_buf = buf;
    return 0;
}

/*
 * The copy runs on the block pipeline (blockpipe.h): this thread gathers
 * up to BP_SEGS blocks to copy into a chunk (scattered dirty blocks of an
 * incremental share a chunk) and reads them; worker threads classify and
 * hash them; the drain thread writes each chunk, in order.
 */

/* The next piece to copy into *off / *len (the ranges of b->dirty in
 * order): one block, or a run of more than one whole block that block
 * status says reads as zeroes (*zero set), which is never read and costs
 * one segment, however long: an empty 16 TiB disk is one extent, not 2^28
 * blocks.  1, 0 when there is none, -1 with b->fill_fail. */
static int next_block(struct bk *b, uint64_t *off, uint64_t *len, bool *zero)
{
    while (b->fpos >= b->fend) {
        if (b->frange >= b->ndirty)
            return 0;
        b->fpos = b->dirty[b->frange].start;
        b->fend = b->dirty[b->frange].end;
        b->frange++;
    }
    *off = b->fpos;
    *len = MIN(B, b->fend - b->fpos);
    *zero = false;
    /* (Not for a rescan, which compares every block with its parent's.) */
    if (!b->rescan && b->fpos >= b->fknown && b->fend - b->fpos > B) {
        /* Status once per extent: a data extent is not asked again. */
        uint64_t run;
        bool z;
        int r = b->src.status(b->src.opaque, b->fpos, b->fend - b->fpos,
                              &run, &z);
        if (r < 0) {
            b->fill_fail = (struct io_fail){"reading block status of",
                                            b->o->disk, b->fpos, r};
            return -1;
        }
        run = MIN(run, b->fend - b->fpos);
        if (z && b->fpos + run == b->fend)
            *len = run;           /* to the range's end (maybe the disk's) */
        else if (z)
            *len = MAX(ALIGN_DOWN(run, B), B);
        *zero = z && *len > B;
        b->fknown = z ? b->fpos : b->fpos + run;
    }
    b->fpos += *len;
    return 1;
}

/* A segment of more than one block: a zero run from next_block. */
static bool is_zero_run(const struct bp_seg *g)
{
    return g->len > B;
}

/* Segments [i, j) are adjacent blocks: which of them block status calls
 * zero as a whole (kind K_ZERO, not read); the others are K_NONE. */
static int mark_zero_status(struct bk *b, struct bp_chunk *c, size_t i,
                            size_t j)
{
    uint64_t off = c->seg[i].off, end = c->seg[j - 1].off + c->seg[j - 1].len;
    for (size_t k = i; k < j; k++)
        c->seg[k].kind = K_ZERO;
    for (uint64_t pos = off; pos < end;) {
        uint64_t run;
        bool zero;
        int r = b->src.status(b->src.opaque, pos, end - pos, &run, &zero);
        if (r < 0) {
            b->fill_fail = (struct io_fail){"reading block status of",
                                            b->o->disk, pos, r};
            return -1;
        }
        if (!zero) {
            size_t k0 = i + (size_t)((pos - off) / B);
            size_t k1 = i + (size_t)DIV_ROUND_UP(pos + run - off, B);
            for (size_t k = k0; k < MIN(k1, j); k++)
                c->seg[k].kind = K_NONE;
        }
        pos += run;
    }
    return 0;
}

/* Read the ranges of a chunk (in order), all at once when the source
 * can.  0, or -1 with the first failure in b->fill_fail. */
static int read_ranges(struct bk *b, struct bk_read *v, size_t n)
{
    int r = 0;
    if (n && b->src.read_many)
        r = b->src.read_many(b->src.opaque, v, n);
    for (size_t i = 0; i < n && r == 0 && !b->src.read_many; i++)
        r = v[i].err = b->src.read(b->src.opaque, v[i].buf, v[i].len,
                                   v[i].off);
    if (r == 0)
        return 0;
    size_t i = 0;
    while (i + 1 < n && v[i].err == 0)
        i++;
    b->fill_fail = (struct io_fail){"reading", b->o->disk, v[i].off,
                                    v[i].err ? v[i].err : r};
    return -1;
}

/* A rescan compares every block with the parent's leaf: the fill, the
 * one thread reading the parent's file, puts it in the segment (g->bad
 * set: g->digest holds it) for the hash stage.  0, or -1 with
 * b->fill_fail. */
static int rescan_leaves(struct bk *b, struct bp_chunk *c)
{
    for (size_t k = 0; k < c->n; k++) {
        struct bp_seg *g = &c->seg[k];
        uint64_t bi = g->off / B, nl;
        const uint8_t *leaf;
        if (bi >= b->ph.n)
            continue;
        int r = leaf_src_window(&b->ph, bi, &leaf, &nl);
        if (r < 0) {
            b->fill_fail = (struct io_fail){"reading the parent's block "
                                            "hashes", b->parent_path,
                                            g->off, r};
            return -1;
        }
        memcpy(g->digest, leaf, 32);
        g->bad = 1;
    }
    return 0;
}

static int bk_fill(void *opaque, struct bp_chunk *c)
{
    struct bk *b = opaque;
    uint64_t off, len;
    bool zero;
    int got;
    while (c->n < BP_SEGS && (got = next_block(b, &off, &len, &zero)) > 0)
        c->seg[c->n++] = (struct bp_seg){.off = off, .len = len,
                                         .kind = zero ? K_ZERO : K_NONE};
    if (got < 0 || (b->rescan && rescan_leaves(b, c) < 0))
        return -1;
    if (c->n == 0)
        return 0;
    /* Block status per run of adjacent blocks (zero runs are known), then
     * one read per run of adjacent blocks that may hold data. */
    for (size_t i = 0, j; i < c->n; i = j) {
        j = i + 1;
        if (is_zero_run(&c->seg[i]))
            continue;
        for (; j < c->n && !is_zero_run(&c->seg[j]) &&
               c->seg[j].off == c->seg[j - 1].off + c->seg[j - 1].len;
             j++)
            ;
        if (mark_zero_status(b, c, i, j) < 0)
            return -1;
    }
    struct bk_read rd[BP_SEGS];
    size_t nr = 0;
    for (size_t i = 0, j; i < c->n; i = j) {
        j = i + 1;
        if (c->seg[i].kind == K_ZERO)
            continue;
        uint64_t rlen = c->seg[i].len;
        c->seg[i].data = bp_take(c, (size_t)B);
        for (; j < c->n && c->seg[j].kind != K_ZERO &&
               c->seg[j].off == c->seg[j - 1].off + c->seg[j - 1].len;
             j++) {
            c->seg[j].data = bp_take(c, (size_t)B);
            rlen += c->seg[j].len;
        }
        rd[nr++] = (struct bk_read){.buf = c->seg[i].data,
                                    .len = (size_t)rlen,
                                    .off = c->seg[i].off};
    }
    return read_ranges(b, rd, nr) < 0 ? -1 : 1;
}

/* --compress: a DATA block compressed (after its digest was taken: hashes
 * are of the data) into its own place in the chunk's buffer, then K_CDATA;
 * one that does not shrink stays K_DATA.  *scratch: this call's buffer. */
static int compress_block(struct bk *b, struct bp_seg *g, uint8_t **scratch)
{
    if (!*scratch && !(*scratch = malloc((size_t)B)))
        return -ENOMEM;
    int64_t n = cbt_image_compress_cluster(b->dst, g->data, (size_t)g->len,
                                           g->off, *scratch, (size_t)B);
    if (n < 0)
        return (int)n;
    if (n > 0) {
        memcpy(g->data, *scratch, (size_t)n);
        g->clen = (size_t)n;
        g->kind = K_CDATA;
    }
    return 0;
}

/* Kind and digest of each block, into its own segment (compressed with
 * --compress). */
static int bk_hash(void *opaque, struct bp_chunk *c, size_t i, size_t j)
{
    struct bk *b = opaque;
    uint8_t *cbuf = NULL;
    for (size_t k = i; k < j; k++) {
        struct bp_seg *g = &c->seg[k];
        uint8_t leaf[32];
        if (is_zero_run(g))
            continue; /* K_ZERO; its leaves are the drain's */
        if (!g->data || ops_is_zero(g->data, (size_t)g->len)) {
            blockhash_zero_digest((size_t)g->len, leaf);
            g->kind = K_ZERO;
        } else {
            blockhash_digest(g->data, (size_t)g->len, leaf);
            g->kind = K_DATA;
        }
        /* A rescan keeps what differs from the parent (its leaf is in
         * g->digest when g->bad says so: rescan_leaves).  A digest covers
         * the block's length too: a block whose length changed with a
         * resize differs. */
        if (b->rescan && g->bad && memcmp(leaf, g->digest, 32) == 0)
            g->kind = K_SAME;
        memcpy(g->digest, leaf, 32);
        if (b->o->compress && g->kind == K_DATA) {
            int r = compress_block(b, g, &cbuf);
            if (r < 0) {
                free(cbuf);
                return r;
            }
        }
    }
    free(cbuf);
    return 0;
}

/* A block the hash stage compressed: written on its own. */
static int write_compressed(struct bk *b, const struct bp_seg *g)
{
    int r = flush_pending(b);
    if (r == 0)
        r = cbt_image_pwrite_precompressed(b->dst, g->data, g->clen,
                                           (size_t)g->len, g->off);
    if (r == 0)
        b->res->bytes_copied += g->len;
    return r;
}

/* The leaves up to block `upto` (exclusive) that no segment brought: the
 * parent's, for the blocks an incremental does not copy (every block past
 * the parent's end is copied: collect_dirty). */
static int parent_leaves(struct bk *b, uint64_t upto)
{
    if (b->hw.n >= upto)
        return 0;
    assert(!b->full && upto <= b->ph.n);
    return leaf_sink_same(&b->hw, upto - b->hw.n);
}

/* The leaves of segment g, in block order after those before it. */
static int put_leaves(struct bk *b, const struct bp_seg *g)
{
    int r = parent_leaves(b, g->off / B);
    if (r < 0)
        return r;
    assert(b->hw.n == g->off / B);
    if (!is_zero_run(g))
        return leaf_sink_put(&b->hw, g->digest);
    return leaf_sink_zeroes(&b->hw, DIV_ROUND_UP(g->len, B));
}

/* Write a chunk and its leaves.  Only the drain thread touches the
 * pending-write state, the byte counters, the extents list and the
 * hashes writer. */
/* One chunk's segments, written in order (zero runs, compressed clusters,
 * runs of adjacent data blocks). */
static int drain_segments(struct bk *b, struct bp_chunk *c)
{
    for (size_t k = 0; k < c->n; k++) {
        struct bp_seg *g = &c->seg[k];
        int r = put_leaves(b, g);
        if (r < 0) {
            b->drain_fail = (struct io_fail){"writing", b->target_hashes,
                                             g->off, r};
            return -1;
        }
        b->done += g->len;
        if (g->kind == K_SAME)
            continue;
        if (b->rescan)
            b->res->dirty_bytes += g->len;
        r = g->kind == K_CDATA ? write_compressed(b, g)
                               : add_block(b, g->kind, g->data, g->off,
                                           g->len);
        if (r < 0) {
            b->drain_fail = (struct io_fail){"writing", b->o->target,
                                             g->off, r};
            return -1;
        }
    }
    int r = flush_pending(b);
    if (r < 0) {
        b->drain_fail = (struct io_fail){"writing", b->o->target,
                                         c->seg[0].off, r};
        return -1;
    }
    return 0;
}

/* The chunk's data blocks lie one after the other in its buffer, and a
 * new target's clusters for them one after the other in the file: its
 * direct writes are gathered (blk_gather_begin), a few large ones instead
 * of one per block. */
static int bk_drain(void *opaque, struct bp_chunk *c)
{
    struct bk *b = opaque;
    blk_gather_begin(b->dst);
    int r = drain_segments(b, c);
    /* The chunk's buffer is reused after this: nothing may stay held. */
    int e = blk_gather_end(b->dst);
    if (r < 0)
        return -1;
    if (e < 0) {
        b->drain_fail = (struct io_fail){"writing", b->o->target,
                                         c->seg[0].off, e};
        return -1;
    }
    progress(b);
    return 0;
}

static bool bk_cancelled(void *opaque)
{
    struct bk *b = opaque;
    return ops_cancelled(b->o->cancel, b->o->cancel_opaque);
}

/* Stopped by the caller (cbt_cancel_fn) before the checkpoint exists. */
static int cancel_error(struct bk *b, struct cbt_error **errp)
{
    ops_cancel_error(errp, b->o->target, "the backup's files are removed and "
                     "the disk's checkpoints are as before");
    return -1;
}

static int copy_all(struct bk *b, struct cbt_error **errp)
{
    static const struct bp_ops ops = {
        .fill = bk_fill,
        .hash = bk_hash,
        .drain = bk_drain,
        .cancelled = bk_cancelled,
    };
    b->done = 0;
    progress(b);
    /* A full backup copies the one range [0, size).  Otherwise the
     * digests of the blocks not copied come from the parent; the copied
     * ones are overwritten by the hash stage. */
    if (b->full && push_range(b, 0, b->size) < 0) {
        oom(errp);
        return -1;
    }
    /* The record file names the root it was built on. */
    uint8_t proot[32] = {0};
    if (!b->full)
        (void)sha256_from_hex(b->pm.root, proot); /* checked by the parser */
    if (leaf_sink_open(&b->hw, b->target_hashes, b->size,
                       b->full ? NULL : &b->ph, proot, errp) < 0)
        return -1;
    b->hw_open = true;
    int r = bp_run(&ops, b, 0);
    if (r == 0) {
        /* The untouched blocks after the last copied one. */
        r = parent_leaves(b, b->nblocks);
        if (r < 0) {
            cbt_error_set(errp, -r, "%s: error writing: %s",
                          b->target_hashes, strerror(-r));
            return -1;
        }
        assert(b->hw.n == b->nblocks);
        return 0;
    }
    if (r == -ECANCELED)
        return cancel_error(b, errp);
    struct io_fail *f = b->drain_fail.err ? &b->drain_fail : &b->fill_fail;
    if (r == -1 && f->err) {
        cbt_error_set(errp, -f->err, "%s: error %s at byte %" PRIu64 ": %s",
                      f->file, f->what, f->off, strerror(-f->err));
        return -1;
    }
    cbt_error_set(errp, r == -1 ? EIO : -r, "backup: cannot run the copy: "
                  "%s", strerror(r == -1 ? EIO : -r));
    return -1;
}

/* ---- the target ---- */

static int create_target(struct bk *b, struct cbt_error **errp)
{
    struct cbt_create_opts co = {
        .struct_size = sizeof(struct cbt_create_opts),
        .format = b->fmt,
        .size = b->size,
        .size_given = true,
    };
    CLEANUP_FREE char *backing = NULL;
    if (!b->raw) {
        co.cluster_size = (uint32_t)B;
        co.compression_type = b->o->compress;
        if (!b->full) {
            backing = ops_backing_name(b->parent_path, b->o->target);
            if (!backing) {
                oom(errp);
                return -1;
            }
            co.backing_file = backing;
            co.backing_format = "qcow2";
        }
    }
    /* TARGET.part is created here, exclusively: never through a file or a
     * link already at that name; then the image layer formats it. */
    b->part_fd = bfile_create_excl(b->target_part, errp);
    if (b->part_fd < 0)
        return -1;
    if (cbt_image_create(b->target_part, &co, errp) < 0)
        return -1;
    b->dst = cbt_image_open(b->target_part, b->fmt,
                            CBT_OPEN_RDWR |
                                (b->o->buffered ? 0 : CBT_OPEN_DIRECT),
                            errp);
    return b->dst ? 0 : -1;
}

static int finish_target(struct bk *b, struct cbt_error **errp)
{
    int r = cbt_image_flush(b->dst);
    if (r < 0) {
        cbt_error_set(errp, -r, "%s: cannot flush: %s", b->o->target,
                      strerror(-r));
        return -1;
    }
    struct cbt_image *dst = b->dst;
    b->dst = NULL;
    if (cbt_image_close(dst, errp) < 0)
        return -1;
    /* What the backup costs on disk (the manifest's bytes.file). */
    struct stat st;
    if (fstat(b->part_fd, &st) == 0)
        b->res->file_bytes = (uint64_t)st.st_size;
    return 0;
}

/* ---- the manifest ---- */

static void fill_manifest(struct bk *b, struct manifest *m)
{
    memset(m, 0, sizeof(*m));
    m->complete = true;
    m->tool = (char *)BACKUP_TOOL;
    m->created = b->created;
    m->disk_path = (char *)b->o->disk;
    m->disk_id = b->disk_id;
    m->kind = b->res->mode;
    m->checkpoint = b->ckname; /* NULL: a copy-only backup */
    m->checkpoint_order = b->ckname ? b->predicted_order + 1 : 0;
    m->checkpoint_created = b->ckname ? b->created : NULL;
    if (!b->full) {
        m->since = b->since.name;
        m->parent_file = (char *)base_name(b->parent_path);
        memcpy(m->parent_manifest_sha256, b->parent_manifest_sha, 65);
    }
    m->image_file = (char *)base_name(b->o->target);
    m->image_format = (char *)b->fmt;
    m->virtual_size = b->size;
    m->dirty = b->res->dirty_bytes;
    m->copied = b->res->bytes_copied;
    m->zeroed = b->res->bytes_zeroed;
    m->rescan = b->rescan;
    m->has_file_bytes = true;
    m->file_bytes = b->res->file_bytes;
    m->compression = b->raw ? NULL : b->o->compress;
    m->has_extents = b->raw;
    m->extents = b->ext;
    m->nextents = b->next;
    m->block_size = B;
    m->blocks = b->nblocks;
    m->hash_file = (char *)base_name(b->target_hashes);
    m->version = MANIFEST_VERSION;
    m->tree = true;
    memcpy(m->root, b->res->root_hash, 65);
    memcpy(m->hash_file_sha256, b->tree_sha, 65);
}

/* After the checkpoint exists: its real order and time into *m. */
static int checkpoint_facts(struct bk *b, struct manifest *m, char **created,
                            struct cbt_error **errp)
{
    struct cbt_checkpoint c;
    if (cbt_checkpoint_get(b->disk, b->ckname, &c, errp) < 0)
        return -1;
    m->checkpoint_order = c.order;
    *created = iso_time(c.created_sec, c.created_nsec);
    cbt_checkpoint_clear(&c);
    if (!*created) {
        oom(errp);
        return -1;
    }
    m->checkpoint_created = *created;
    return 0;
}

/* The copy is complete: the hashes written, the target renamed into place.
 * The last moment to stop: a few fsyncs away from a complete backup, and
 * from here on it runs to its end. */
static int write_target(struct bk *b, struct cbt_error **errp)
{
    if (bk_cancelled(b))
        return cancel_error(b, errp);
    if (leaf_sink_finish(&b->hw, b->res->root_hash, b->tree_sha, errp) < 0)
        return -1;
    b->made_hashes = true;
    if (bfile_rename_ours(b->part_fd, b->target_part, b->o->target, errp) < 0)
        return -1;
    b->renamed = true;
    return 0;
}

/* Write hashes and manifest, create the checkpoint (see the top). */
static int commit(struct bk *b, struct cbt_error **errp)
{
    if (write_target(b, errp) < 0)
        return -1;
    struct manifest m;
    fill_manifest(b, &m);
    if (b->o->no_checkpoint) {
        /* No checkpoint: the manifest completes the backup. */
        if (manifest_write(b->target_json, &m, false, errp) < 0)
            return -1;
        b->made_json = true;
        return 0;
    }
    CLEANUP_FREE char *created = NULL;
    bool had_id = b->disk_id[0] != '\0';
    if (had_id && manifest_write(b->target_json, &m, false, errp) < 0)
        return -1;
    b->made_json = had_id;
    struct cbt_error *ce = NULL;
    if (cbt_checkpoint_create(b->disk, b->ckname, b->o->granularity, &ce) < 0) {
        /* A create can fail after its header update reached the disk (a
         * failed sync): when the checkpoint is there, so must the backup
         * be, or the next incremental would find no parent. */
        struct cbt_checkpoint probe;
        struct cbt_error *pe = NULL;
        if (cbt_checkpoint_get(b->disk, b->ckname, &probe, &pe) < 0) {
            cbt_error_free(pe);
            if (errp)
                *errp = ce;
            else
                cbt_error_free(ce);
            return -1;
        }
        cbt_checkpoint_clear(&probe);
        cbt_warn("%s: %s; the checkpoint is in place, so the backup is kept",
                 b->o->disk, cbt_error_message(ce));
        cbt_error_free(ce);
    }
    /* From here the checkpoint exists: the backup must stay. */
    struct cbt_error *e = NULL;
    if (!had_id && cbt_checkpoint_disk_id(b->disk, b->disk_id, &e) < 0)
        goto undo;
    if (checkpoint_facts(b, &m, &created, &e) < 0 ||
        manifest_write(b->target_json, &m, had_id, &e) < 0) {
        if (!had_id)
            goto undo;
        /* The manifest of the predicted order stays: complete and right
         * but for the order and time. */
        cbt_warn("%s: the manifest could not be updated with the "
                 "checkpoint's order and time: %s", b->target_json,
                 cbt_error_message(e));
        cbt_error_free(e);
    }
    return 0;
undo:;
    /* The first checkpoint of the disk: without a manifest there is no
     * backup, so the checkpoint goes again. */
    bool existed;
    struct cbt_error *e2 = NULL;
    if (cbt_checkpoint_delete(b->disk, b->ckname, &existed, &e2) < 0) {
        cbt_error_set(errp, cbt_error_errno(e), "%s (and checkpoint '%s' "
                      "could not be removed again: %s)", cbt_error_message(e),
                      b->ckname, cbt_error_message(e2));
        cbt_error_free(e2);
    } else if (errp && !*errp) {
        *errp = e;
        e = NULL;
    }
    cbt_error_free(e);
    return -1;
}

/* ---- the whole operation ---- */

static void remove_files(struct bk *b)
{
    if (b->made_json)
        unlink(b->target_json);
    if (b->made_hashes)
        unlink(b->target_hashes);
    bfile_unlink_ours(b->part_fd, b->renamed ? b->o->target
                                             : b->target_part);
}

static void free_bk(struct bk *b)
{
    free(b->dir);
    free(b->ckname);
    free(b->created);
    cbt_checkpoint_clear(&b->since);
    free(b->parent_path);
    manifest_free(&b->pm);
    leaf_src_close(&b->ph);
    bm_free(b->pdata);
    if (b->hw_open)
        leaf_sink_abort(&b->hw);
    free(b->dirty);
    free(b->ext);
    free(b->target_json);
    free(b->target_hashes);
    free(b->target_part);
    if (b->part_fd >= 0)
        close(b->part_fd);
}

static int result_strings(struct bk *b, struct cbt_error **errp)
{
    struct cbt_backup_result *res = b->res;
    if (!b->ckname)
        return 0; /* a copy-only backup */
    res->checkpoint = strdup(b->ckname);
    if (!b->full) {
        res->since = strdup(b->since.name);
        res->parent = strdup(b->parent_path);
    }
    if (!res->checkpoint || (!b->full && (!res->since || !res->parent))) {
        oom(errp);
        return -1;
    }
    return 0;
}

/* The paths of the new backup's files; 0, or -1 with *errp. */
static int setup(struct bk *b, struct cbt_error **errp)
{
    const struct cbt_backup_opts *o = b->o;
    struct timespec t0;
    clock_gettime(CLOCK_REALTIME, &t0);
    b->created = iso_time(t0.tv_sec, (uint32_t)t0.tv_nsec);
    b->dir = bfile_folder_of(o->target);
    b->target_json = manifest_path_for(o->target);
    b->target_hashes = tree_path_for(o->target);
    b->target_part = cbt_strdup_printf("%s.part", o->target);
    if (!b->created || !b->dir || !b->target_json || !b->target_hashes ||
        !b->target_part) {
        oom(errp);
        return -1;
    }
    return 0;
}

/* Full, incremental or differential (with auto_full, the fallback), and
 * for a full backup what it copies.  0, or -1 with *errp. */
static int plan(struct bk *b, struct cbt_error **errp)
{
    const struct cbt_backup_opts *o = b->o;
    struct cbt_backup_result *res = b->res;
    res->mode = o->mode;
    if (o->mode != CBT_BACKUP_FULL) {
        char *why = NULL;
        int r = plan_incremental(b, &why, errp);
        if (r < 0)
            return -1;
        if (r > 0 && !o->auto_full && o->rescan) {
            cbt_error_set(errp, EINVAL,
                          "%s; a rescan compares the disk with "
                          "its previous backup in the target's folder (the "
                          "one of the checkpoint it starts from) and there is "
                          "none to use: take a full backup",
                          why);
            cbt_error_set_kind(errp, b->why_kind);
            cbt_error_set_remedy(errp, CBT_REMEDY_FULL_BACKUP);
            free(why);
            return -1;
        }
        if (r > 0 && !o->auto_full) {
            cbt_error_set(errp, EINVAL,
                          "%s; %s %s backup is impossible: "
                          "take a full one",
                          why, o->mode == CBT_BACKUP_INCREMENTAL ? "an" : "a",
                          cbt_backup_mode_name(o->mode));
            cbt_error_set_kind(errp, b->why_kind);
            cbt_error_set_remedy(errp, b->bitmap_lost
                                           ? CBT_REMEDY_FULL_OR_RESCAN
                                           : CBT_REMEDY_FULL_BACKUP);
            free(why);
            return -1;
        }
        if (r > 0) {
            free(res->fallback);
            res->fallback = why;
            res->mode = CBT_BACKUP_FULL;
        }
    }
    b->full = res->mode == CBT_BACKUP_FULL;
    b->rescan = b->rescan && !b->full;
    res->rescan = b->rescan;
    if (b->full) {
        /* A fallback starts a new chain: the checkpoints' orders. */
        struct cbt_checkpoint *list = NULL;
        size_t n = 0;
        if (!o->no_checkpoint && list_checkpoints(b, &list, &n, errp) < 0)
            return -1;
        for (size_t i = 0; i < n; i++)
            b->predicted_order = MAX(b->predicted_order, list[i].order);
        cbt_checkpoint_free_list(list, n);
        b->fmt = o->format ? o->format : "qcow2";
        b->total = b->size;
        res->dirty_bytes = b->size;
    }
    b->raw = strcmp(b->fmt, "raw") == 0;
    if (o->compress && b->raw) {
        cbt_error_set(errp, EINVAL, "%s: the parent backup %s is raw, and a "
                      "raw backup cannot be compressed (--compress writes "
                      "qcow2 compressed clusters; the backups of one chain "
                      "share one format)", o->target, b->parent_path);
        cbt_error_set_kind(errp, CBT_ERR_USAGE);
        return -1;
    }
    res->virtual_size = b->size;
    return 0;
}

static void *run_done(void *opaque)
{
    struct bk *b = opaque;
    WARN_SCOPE(b->done_warner.fn, b->done_warner.opaque);
    b->src.done(b->src.opaque);
    return NULL;
}

/* The source lets go (a live view's QEMU round trips) on a thread of its
 * own while this one flushes the target and writes its records, which
 * touch nothing of the source's; join_done waits for it before anything
 * else talks to QEMU.  Inline when no thread can be had. */
static void start_done(struct bk *b)
{
    b->done_warner = warn_scope_current();
    b->done_running =
        pthread_create(&b->done_thread, NULL, run_done, b) == 0;
    if (!b->done_running)
        b->src.done(b->src.opaque);
}

static void join_done(struct bk *b)
{
    if (b->done_running)
        pthread_join(b->done_thread, NULL);
    b->done_running = false;
}

/* The dirty set (incremental), then the new target written and closed. */
static int copy(struct bk *b, struct cbt_error **errp)
{
    if (!b->full && collect_dirty(b, errp) < 0)
        return -1;
    cbt_debug("backup: %" PRIu64 " bytes to copy", b->total);
    b->nblocks = DIV_ROUND_UP(b->size, B);
    if (bk_cancelled(b))
        return cancel_error(b, errp);
    if (create_target(b, errp) < 0)
        return -1;
    cbt_debug("backup: target %s made", b->target_part);
    if (copy_all(b, errp) < 0)
        return -1;
    cbt_debug("backup: copied");
    if (b->src.done) {
        /* Nothing more to read: the source lets go while the disk takes
         * the target's last data. */
        blk_start_writeback(b->dst);
        start_done(b);
    }
    return finish_target(b, errp);
}

int cbt_backup(const struct cbt_backup_opts *opts,
               struct cbt_backup_result *res, struct cbt_error **errp)
{
    memset(res, 0, sizeof(*res));
    struct cbt_backup_opts oc;
    if (OPTS_COPY(&oc, opts, cbt_backup_opts, errp) < 0)
        return -1;
    const struct cbt_backup_opts *o = &oc;
    WARN_SCOPE(o->warn, o->warn_opaque);
    if (check_opts(o, errp) < 0)
        return -1;
    struct bk b = {.o = o, .res = res, .part_fd = -1,
                   .why_kind = CBT_ERR_NEED_FULL};
    int ret = -1;
    bool ckpt_made = false;
    if (setup(&b, errp) < 0 || check_roles(&b, errp) < 0)
        goto out;

    /* The disk is opened read-write only to create the checkpoint; a
     * copy-only backup reads it and shares reading. */
    b.disk = cbt_image_open(o->disk, o->disk_format,
                            o->no_checkpoint ? 0 : CBT_OPEN_RDWR, errp);
    if (!b.disk)
        goto out;
    use_image_source(&b);
    if (!o->no_checkpoint && strcmp(cbt_image_format(b.disk), "qcow2") != 0) {
        cbt_error_set(errp, ENOTSUP,
                      "%s: a %s disk cannot hold checkpoints", o->disk,
                      cbt_image_format(b.disk));
        cbt_error_set_remedy(errp, CBT_REMEDY_QCOW2_OR_COPY_ONLY);
        goto out;
    }
    b.size = cbt_image_size(b.disk);
    /* Checkpoints made live (docs/live.md) join the image's metadata. */
    if (ckpt_fold_journal(b.disk, errp) < 0)
        goto out;
    if (check_target(&b, errp) < 0)
        goto out;
    if (o->no_checkpoint) {
        /* The disk's id when it has one; else one of its own, as no
         * incremental will look for this backup. */
        uint8_t u[16];
        if (cbt_checkpoint_disk_id(b.disk, b.disk_id, errp) < 0)
            goto out;
        if (!b.disk_id[0]) {
            if (ckpt_uuid_new(u, o->disk, errp) < 0)
                goto out;
            ckpt_uuid_str(u, b.disk_id);
        }
    } else if (choose_name(&b, errp) < 0 ||
               cbt_checkpoint_disk_id(b.disk, b.disk_id, errp) < 0) {
        goto out;
    }
    if (plan(&b, errp) < 0 || copy(&b, errp) < 0 || commit(&b, errp) < 0)
        goto out;
    ckpt_made = true;
    if (result_strings(&b, errp) < 0)
        goto out;
    ret = 0;
out:
    if (b.dst)
        cbt_image_close(b.dst, NULL);
    if (b.disk && cbt_image_close(b.disk, ret == 0 ? errp : NULL) < 0)
        ret = -1;
    if (ret < 0 && !ckpt_made)
        remove_files(&b);
    free_bk(&b);
    if (ret < 0 && !ckpt_made)
        cbt_backup_result_free(res);
    return ret;
}

/* ---- a live disk (backup_live.h) ---- */


/* The manifest with the checkpoint's order and time, then the checkpoint's
 * record.  A failure takes the checkpoint away again (the caller's abort)
 * and the manifest with the backup's files, so a checkpoint never lacks
 * its backup; a kill between the two leaves a checkpoint still pending,
 * which the next run removes, and a complete backup. */
static int finish_live(struct bk *b, struct cbt_error **errp)
{
    uint64_t order;
    int64_t sec;
    uint32_t nsec;
    if (b->live->describe(b->live, b->ckname, &order, &sec, &nsec, errp) < 0)
        return -1;
    memcpy(b->disk_id, b->live->disk_id, sizeof(b->disk_id));
    struct manifest m;
    fill_manifest(b, &m);
    CLEANUP_FREE char *created = iso_time(sec, nsec);
    if (!created) {
        oom(errp);
        return -1;
    }
    m.checkpoint_order = order;
    m.checkpoint_created = created;
    if (manifest_write(b->target_json, &m, false, errp) < 0)
        return -1;
    b->made_json = true;
    return b->live->commit(b->live, b->ckname, errp);
}

struct bk_job *bk_job_plan(const struct cbt_backup_opts *o, struct bk_live *l,
                           struct cbt_backup_result *res,
                           struct cbt_error **errp)
{
    memset(res, 0, sizeof(*res));
    if (check_opts(o, errp) < 0)
        return NULL;
    if (o->no_checkpoint) {
        cbt_error_set(errp, EINVAL, "%s: --no-checkpoint is for disks cbt "
                      "opens itself; a running VM's backup makes its "
                      "checkpoint in QEMU", o->disk);
        cbt_error_set_kind(errp, CBT_ERR_USAGE);
        return NULL;
    }
    struct bk *b = calloc(1, sizeof(*b));
    if (!b) {
        oom(errp);
        return NULL;
    }
    *b = (struct bk){.o = o, .res = res, .part_fd = -1, .live = l,
                     .why_kind = CBT_ERR_NEED_FULL};
    b->size = l->size;
    memcpy(b->disk_id, l->disk_id, sizeof(b->disk_id));
    if (setup(b, errp) < 0 || check_not_folder(o->target, errp) < 0 ||
        check_target(b, errp) < 0 || choose_name(b, errp) < 0 ||
        plan(b, errp) < 0) {
        bk_job_end(b, false, NULL);
        return NULL;
    }
    return b;
}

const char *bk_job_since(const struct bk_job *b)
{
    /* A rescan reads the whole view, as a full backup: no bitmap. */
    return b->full || b->rescan ? NULL : b->since.name;
}

const char *bk_job_checkpoint(const struct bk_job *b) { return b->ckname; }

int bk_job_copy(struct bk_job *b, const struct bk_source *src,
                struct cbt_error **errp)
{
    b->src = *src;
    b->frozen = true;
    int r = copy(b, errp) < 0 || write_target(b, errp) < 0 ? -1 : 0;
    join_done(b);
    if (r == 0)
        cbt_debug("backup: target written");
    return r;
}

int bk_job_finish(struct bk_job *b, struct cbt_error **errp)
{
    if (finish_live(b, errp) < 0)
        return -1;
    b->kept = true;
    cbt_debug("backup: checkpoint committed");
    return 0;
}

int bk_job_end(struct bk_job *b, bool ok, struct cbt_error **errp)
{
    int ret = 0;
    if (b->dst)
        cbt_image_close(b->dst, NULL);
    b->dst = NULL;
    if (ok && b->kept && result_strings(b, errp) < 0)
        ret = -1;
    if (!ok || !b->kept) {
        remove_files(b);
        cbt_backup_result_free(b->res);
        ret = -1;
    }
    free_bk(b);
    free(b);
    return ret;
}

int cbt_backup_live(const struct cbt_backup_opts *o, struct bk_live *l,
                    struct cbt_backup_result *res, struct cbt_error **errp)
{
    WARN_SCOPE(o->warn, o->warn_opaque);
    struct bk_job *j = bk_job_plan(o, l, res, errp);
    if (!j)
        return -1;
    cbt_debug("backup: planned");
    /* The instant of the backup: from here QEMU holds the view and the
     * new checkpoint records every later write. */
    struct bk_source src;
    bool frozen = l->freeze(l, bk_job_since(j), bk_job_checkpoint(j),
                            o->granularity, &src, errp) == 0;
    if (frozen)
        cbt_debug("backup: view frozen");
    bool ok = frozen && bk_job_copy(j, &src, errp) == 0 &&
              bk_job_finish(j, errp) == 0;
    if (frozen) {
        if (!ok)
            l->abort(l, bk_job_checkpoint(j));
        l->release(l);
    }
    return bk_job_end(j, ok, errp) == 0 && ok ? 0 : -1;
}

void cbt_backup_result_free(struct cbt_backup_result *res)
{
    if (!res)
        return;
    free(res->checkpoint);
    free(res->since);
    free(res->parent);
    free(res->fallback);
    memset(res, 0, sizeof(*res));
}
