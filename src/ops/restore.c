/*
 * cbt_restore() (include/cbt/backup.h): flatten the backup chain up to a
 * backup into a new image.
 *
 * Steps, and what a failure or a kill between them leaves
 * ------------------------------------------------------
 *   1. Refusals that need no file: bad options, an existing OUT, an
 *      existing OUT.part (the work file).
 *   2. The chain is opened and its integrity checked (src/ops/verify.c,
 *      bchain_open): a missing or altered backup, manifest or hashes file
 *      refuses the restore before anything is created.
 *   3. OUT.part is created exclusively (an existing file or a symlink
 *      planted there is refused, never written through), formatted (qcow2 or
 *      raw, the backup's virtual size) and filled by one pass over the guest
 *      view (bchain_walk): every 64 KiB block is hashed and compared with
 *      the manifest's leaf *before* it is written; ranges the chain holds as
 *      zeroes are neither read nor written, nor are 4 KiB pieces of zeroes
 *      inside data, so OUT is never thicker than `qemu-img convert` of the
 *      same chain (its -S 4k) makes it: holes stay holes, a raw OUT is
 *      sparse.  The first mismatch stops the restore and names the guest
 *      range and the backup file.
 *   4. OUT.part is flushed; with a seed checkpoint, it is created then
 *      (see below) and flushed with the image's header.
 *   5. OUT.part is renamed to OUT (never over a file that appeared
 *      meanwhile, and only while OUT.part is still the file created in 3)
 *      and the folder synced.
 * A failure in 2..5 removes OUT.part; a kill leaves at most OUT.part,
 * never an OUT that looks complete.
 *
 * Seeding a checkpoint
 * --------------------
 * Backups find their parent by disk id and checkpoint name
 * (docs/backups.md).  So that `cbt backup --incremental OUT` continues the
 * backup chain, the restored image gets the checkpoint the backup
 * created, as the backup recorded it: same name, same disk id, same order
 * and creation time; its bitmap is empty (OUT is exactly the backed-up
 * point in time).  The next incremental of OUT then finds this backup as
 * its parent in the same folder, and its checkpoint's order follows this
 * one.  --seed-checkpoint must therefore name the backup's own
 * checkpoint; anything else could not be continued from and is refused.
 * Without a seed, OUT has no checkpoint and no disk id: a new disk, whose
 * first backup is a full one.
 */
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <sys/stat.h>
#include <time.h>

#include <cbt/backup.h>
#include <cbt/checkpoint.h>
#include <cbt/image.h>

#include "../block/block.h"
#include "bchain.h"
#include "checkpoint_meta.h"
#include "manifest.h"
#include "ops_util.h"

/* Zeroes inside data are left out in pieces of this size (qemu-img
 * convert's default -S 4k), aligned to the guest offset. */
#define SPARSE_GRAIN ((size_t)4096)

struct restore {
    const struct cbt_restore_opts *o;
    const char *tmp;        /* OUT.part */
    struct cbt_image *out;
};

/* bchain_walk's piece: write the data, leave zeroes out (OUT is new and
 * reads as zeroes everywhere). */
static int write_piece(void *opaque, const uint8_t *buf, uint64_t off,
                       size_t len, struct cbt_error **errp)
{
    struct restore *rs = opaque;
    if (!buf)
        return 0;
    size_t p = 0;
    while (p < len) {
        size_t g = MIN(SPARSE_GRAIN, len - p);
        if (ops_is_zero(buf + p, g)) {
            p += g;
            continue;
        }
        size_t q = p + g;
        while (q < len) {
            size_t h = MIN(SPARSE_GRAIN, len - q);
            if (ops_is_zero(buf + q, h))
                break;
            q += h;
        }
        int r = cbt_image_pwrite(rs->out, buf + p, q - p, off + p);
        if (r < 0) {
            cbt_error_set(errp, -r, "%s: error while writing at byte %" PRIu64
                          ": %s", rs->o->out, off + p, strerror(-r));
            return -1;
        }
        p = q;
    }
    return 0;
}

/* "2026-11-22T01:02:03.123456789Z" (fraction optional) -> Unix time. */
static int parse_iso_time(const char *s, int64_t *sec, uint32_t *nsec)
{
    struct tm tm;
    memset(&tm, 0, sizeof(tm));
    int n = 0;
    if (sscanf(s, "%4d-%2d-%2dT%2d:%2d:%2d%n", &tm.tm_year, &tm.tm_mon,
               &tm.tm_mday, &tm.tm_hour, &tm.tm_min, &tm.tm_sec, &n) != 6)
        return -1;
    tm.tm_year -= 1900;
    tm.tm_mon -= 1;
    uint32_t frac = 0;
    const char *p = s + n;
    if (*p == '.') {
        uint32_t scale = 100000000;
        for (p++; *p >= '0' && *p <= '9'; p++) {
            frac += (uint32_t)(*p - '0') * scale;
            scale /= 10;
        }
    }
    if (strcmp(p, "Z") != 0)
        return -1;
    time_t t = timegm(&tm);
    if (t == (time_t)-1)
        return -1;
    *sec = (int64_t)t;
    *nsec = frac;
    return 0;
}

static int uuid_parse(const char *s, uint8_t out[16])
{
    size_t k = 0;
    for (const char *p = s; *p && k < 32; p++) {
        if (*p == '-')
            continue;
        unsigned v;
        if (sscanf(p, "%1x", &v) != 1)
            return -1;
        out[k / 2] = (uint8_t)(k % 2 ? (out[k / 2] | v) : v << 4);
        k++;
    }
    return k == 32 ? 0 : -1;
}

/*
 * The seed (see the top of the file): create the checkpoint, then give its
 * metadata the backup's disk id, order and creation time.  The metadata
 * reaches the file with the flush after it, in one header write.
 */
static int seed_checkpoint(struct restore *rs, const struct manifest *m,
                           struct cbt_error **errp)
{
    const char *name = rs->o->seed_checkpoint;
    if (cbt_checkpoint_create(rs->out, name, 0, errp) < 0)
        return -1;
    uint8_t *data = NULL;
    size_t len = 0;
    int r = blk_ext_get(rs->out, CKPT_EXT_TYPE, &data, &len);
    if (r < 0) {
        cbt_error_set(errp, -r, "%s: cannot read its checkpoint metadata: %s",
                      rs->o->out, strerror(-r));
        return -1;
    }
    struct ckpt_meta meta;
    char why[256] = "";
    r = ckpt_meta_parse(data, len, &meta, why, sizeof(why));
    free(data);
    int ret = -1;
    if (r < 0) {
        cbt_error_set(errp, -r, "%s: checkpoint metadata: %s", rs->o->out,
                      r == -ENOMEM ? strerror(ENOMEM) : why);
        goto out;
    }
    if (meta.n != 1 || strcmp(meta.v[0].name, name) != 0) {
        cbt_error_set(errp, EIO, "%s: unexpected checkpoint metadata after "
                      "creating '%s'", rs->o->out, name);
        goto out;
    }
    struct ckpt_rec *rec = &meta.v[0];
    if (uuid_parse(m->disk_id, meta.uuid) < 0 ||
        parse_iso_time(m->checkpoint_created, &rec->created_sec,
                       &rec->created_nsec) < 0 ||
        m->checkpoint_order == 0 || m->checkpoint_order == UINT64_MAX) {
        cbt_error_set(errp, EINVAL, "%s: cannot take over checkpoint '%s' "
                      "(disk id '%s', order %" PRIu64 ", created '%s')",
                      rs->o->out, name, m->disk_id, m->checkpoint_order,
                      m->checkpoint_created);
        goto out;
    }
    rec->order = m->checkpoint_order;
    rec->parent = 0;
    meta.next_order = m->checkpoint_order + 1;
    uint8_t *buf = NULL;
    r = ckpt_meta_build(&meta, &buf, &len);
    if (r < 0) {
        cbt_error_set(errp, -r, "%s: checkpoint metadata: %s", rs->o->out,
                      strerror(-r));
        goto out;
    }
    r = blk_ext_set(rs->out, CKPT_EXT_TYPE, buf, len, errp);
    free(buf);
    if (r < 0)
        goto out;
    r = cbt_image_flush(rs->out);
    if (r < 0) {
        cbt_error_set(errp, -r, "%s: cannot flush: %s", rs->o->out,
                      strerror(-r));
        goto out;
    }
    ret = 0;
out:
    ckpt_meta_free(&meta);
    return ret;
}

static int check_opt_values(const struct cbt_restore_opts *o,
                            const char *fmt, struct cbt_error **errp)
{
    if (!o->backup || !*o->backup || !o->out || !*o->out) {
        cbt_error_set(errp, EINVAL, "restore: empty file name");
        return -1;
    }
    if (strcmp(fmt, "qcow2") != 0 && strcmp(fmt, "raw") != 0) {
        cbt_error_set(errp, EINVAL, "%s: unknown image format '%s' (qcow2 or "
                      "raw)", o->out, fmt);
        return -1;
    }
    if (o->seed_checkpoint && strcmp(fmt, "qcow2") != 0) {
        cbt_error_set(errp, ENOTSUP, "%s: a raw image cannot hold "
                      "checkpoints (--seed-checkpoint needs qcow2)", o->out);
        return -1;
    }
    if (o->seed_checkpoint && !*o->seed_checkpoint) {
        cbt_error_set(errp, EINVAL, "%s: empty checkpoint name", o->out);
        return -1;
    }
    return 0;
}

/* Mistakes in the options (kind CBT_ERR_USAGE), then an existing OUT. */
static int check_opts(const struct cbt_restore_opts *o, const char *fmt,
                      struct cbt_error **errp)
{
    if (check_opt_values(o, fmt, errp) < 0) {
        cbt_error_set_kind(errp, CBT_ERR_USAGE);
        return -1;
    }
    struct stat st;
    if (lstat(o->out, &st) == 0) {
        cbt_error_set(errp, EEXIST, "%s: already exists; restore writes a "
                      "new image only", o->out);
        return -1;
    }
    return 0;
}

/* OUT.part must be free: only a regular file there can be what a killed
 * restore (or backup) left, and anything else is not cbt's. */
static int check_work_file(const char *tmp, const char *out,
                           struct cbt_error **errp)
{
    struct stat st;
    if (lstat(tmp, &st) == 0 && S_ISREG(st.st_mode)) {
        cbt_error_set(errp, EEXIST, "%s: exists: the work file of an "
                      "interrupted cbt restore or backup (cbt writes it and "
                      "renames it to %s when it is complete); if no cbt is "
                      "running on it, remove it", tmp, out);
        return -1;
    }
    if (lstat(tmp, &st) == 0) {
        cbt_error_set(errp, EEXIST, "%s: exists and is not a regular file, "
                      "so not a work file of cbt; refusing to write there: "
                      "choose another name for OUT", tmp);
        return -1;
    }
    return 0;
}

/* A seed checkpoint must be the one the backup created: the backups of the
 * restored image find their parent by it. */
static int check_seed(const struct cbt_restore_opts *o,
                      const struct manifest *m, struct cbt_error **errp)
{
    if (!o->seed_checkpoint)
        return 0;
    if (!m->checkpoint)
        cbt_error_set(errp, EINVAL, "%s: --seed-checkpoint: this backup made "
                      "no checkpoint (a copy-only backup, --no-checkpoint)",
                      o->backup);
    else if (strcmp(o->seed_checkpoint, m->checkpoint) != 0)
        cbt_error_set(errp, EINVAL, "%s: --seed-checkpoint must name the "
                      "checkpoint this backup created, '%s' (backups of the "
                      "restored image find their parent by it), not '%s'",
                      o->backup, m->checkpoint, o->seed_checkpoint);
    else
        return 0;
    cbt_error_set_kind(errp, CBT_ERR_USAGE);
    return -1;
}

/* Format OUT.part (created empty by the caller) and write c's guest view
 * into it, every block checked against the manifests; flushed, seeded and
 * closed (rs->out NULL again) on success. */
static int write_work_file(struct restore *rs, struct bchain *c,
                           const char *fmt, struct cbt_error **errp)
{
    const struct cbt_restore_opts *o = rs->o;
    struct cbt_create_opts co = {
        .struct_size = sizeof(struct cbt_create_opts),
        .format = fmt,
        .size = c->size,
        .size_given = true,
    };
    if (cbt_image_create(rs->tmp, &co, errp) < 0)
        return -1;
    unsigned direct = o->buffered ? 0 : CBT_OPEN_DIRECT;
    rs->out = cbt_image_open(rs->tmp, fmt, CBT_OPEN_RDWR | direct, errp);
    if (!rs->out)
        return -1;
    c->cancel = o->cancel;
    c->cancel_opaque = o->cancel_opaque;
    int r = bchain_walk(c, write_piece, rs, o->progress, o->progress_opaque,
                        NULL, errp);
    if (r == 1) {
        cbt_error_set(errp, EINVAL, "%s", c->problem);
        cbt_error_set_kind(errp, CBT_ERR_CORRUPT);
    }
    if (r == 2)
        ops_cancel_error(errp, o->out, "its work file is removed");
    if (r != 0)
        return -1;
    r = cbt_image_flush(rs->out);
    if (r < 0) {
        cbt_error_set(errp, -r, "%s: cannot flush: %s", rs->tmp,
                      strerror(-r));
        return -1;
    }
    if (o->seed_checkpoint && seed_checkpoint(rs, &c->v[0].m, errp) < 0)
        return -1;
    r = cbt_image_close(rs->out, errp);
    rs->out = NULL;
    return r;
}

/*
 * The steps: the options and OUT.part checked; the backup chain opened
 * and checked (bchain_open); OUT.part created exclusively, formatted and
 * written (write_work_file); renamed over OUT while it is still that file,
 * and the folder synced.  Until the rename a failure or a cancel removes
 * OUT.part; after it OUT is complete.
 */
int cbt_restore(const struct cbt_restore_opts *opts, struct cbt_error **errp)
{
    struct cbt_restore_opts oc;
    if (OPTS_COPY(&oc, opts, cbt_restore_opts, errp) < 0)
        return -1;
    const struct cbt_restore_opts *o = &oc;
    WARN_SCOPE(o->warn, o->warn_opaque);
    const char *fmt = o->format ? o->format : "qcow2";
    if (check_opts(o, fmt, errp) < 0)
        return -1;
    CLEANUP_FREE char *tmp = cbt_strdup_printf("%s.part", o->out);
    if (!tmp) {
        cbt_error_set(errp, ENOMEM, "%s: out of memory", o->out);
        return -1;
    }
    if (check_work_file(tmp, o->out, errp) < 0)
        return -1;

    struct restore rs = {.o = o, .tmp = tmp};
    struct bchain c;
    bool created = false;
    int ret = -1;
    int tmpfd = -1;
    int r = bchain_open(o->backup, 0, &c, errp);
    if (r == 1) {
        cbt_error_set(errp, EINVAL, "%s", c.problem);
        cbt_error_set_kind(errp, CBT_ERR_CORRUPT);
    }
    if (r != 0 || check_seed(o, &c.v[0].m, errp) < 0)
        goto out;
    if (ops_cancelled(o->cancel, o->cancel_opaque)) {
        ops_cancel_error(errp, o->out, "nothing was written");
        goto out;
    }
    /* OUT.part is ours alone: created exclusively (never through a file
     * or a link already there), then formatted; renamed, and on failure
     * removed, only while it is still that file. */
    tmpfd = bfile_create_excl(tmp, errp);
    if (tmpfd < 0)
        goto out;
    created = true;
    if (write_work_file(&rs, &c, fmt, errp) < 0)
        goto out;
    /* The last moment to stop: after the rename OUT is complete. */
    if (ops_cancelled(o->cancel, o->cancel_opaque)) {
        ops_cancel_error(errp, o->out, "its work file is removed");
        goto out;
    }
    if (bfile_rename_ours(tmpfd, tmp, o->out, errp) < 0)
        goto out;
    created = false;
    r = bfile_sync_folder_of(o->out);
    if (r < 0) {
        cbt_error_set(errp, -r, "%s: cannot sync its folder: %s", o->out,
                      strerror(-r));
        goto out;
    }
    ret = 0;
out:
    if (rs.out)
        cbt_image_close(rs.out, NULL);
    if (created)
        bfile_unlink_ours(tmpfd, tmp);
    if (tmpfd >= 0)
        close(tmpfd);
    bchain_close(&c);
    return ret;
}
