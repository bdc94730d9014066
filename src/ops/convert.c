/*
 * cbt_convert(): qemu-img convert of one source chain to a new image (or,
 * with no_create, into an existing one) (include/cbt/ops.h).
 *
 * What gets written where
 * -----------------------
 * The copy walks the source's block status from offset 0 and sorts every
 * run into one of three kinds, as qemu-img convert does:
 *   DATA     the source may hold data here: read it and look at it;
 *   ZERO     the source reads as zeroes here;
 *   BACKING  (only with a backing file, -B) the source's top layer does not
 *            allocate this range: leave the target unallocated so that its
 *            own backing file shows through.
 * Without -B the status is that of the whole chain: a range no layer
 * allocates reads as zeroes.  With -B only the top layer counts (QEMU's
 * meaning: the target's backing file stands for the source's), except that
 * a range past the end of the source's backing file reads as zeroes and is
 * ZERO.  Past the end of the *target's* backing file zeroes need no
 * writing, so there ZERO becomes BACKING.
 *
 * A ZERO range costs nothing on a new target without backing file (it
 * reads as zeroes already); otherwise it becomes a zero-write that may
 * unmap.  A DATA range is read in chunks of up to 2 MiB and each chunk is
 * scanned the way qemu-img's default "-S 4k" sparse detection scans it, so
 * the target is allocated where qemu-img convert's would be:
 *   - the chunk is looked at in 512-byte sectors;
 *   - a run of like sectors (all zero, or not) ends on a 4 KiB boundary of
 *     the disk: a data run is stretched to the next boundary, a zero run is
 *     cut back to the previous one, and a zero run that does not reach a
 *     boundary counts as data;
 *   - once data has been seen, zero runs shorter than 4 KiB are swallowed
 *     into it; a zero run at the very end of the chunk is not.
 * The data parts are written, the zero parts treated as ZERO above.
 *
 * Runs are also cut so that they end on a boundary of the source's cluster
 * size when they are longer than the piece past that boundary, as recent
 * qemu-img does.  Where chunks start decides where a 4 KiB block may be
 * split between two chunks; the cut only matters for runs that end inside
 * a cluster smaller than 4 KiB, which block status never produces for
 * qcow2 (runs end on cluster or subcluster boundaries) or raw sources, so
 * the tests cannot tell it from its absence.
 *
 * Compressed (-c) copies go cluster by cluster of the target: a run
 * covering whole clusters keeps its kind (DATA one cluster at a time),
 * anything shorter than a cluster makes the cluster DATA.  A DATA cluster
 * that is all zeroes is treated as ZERO; any other is written with
 * cbt_image_pwrite_compressed().
 *
 * Bitmaps
 * -------
 * Planned before anything is created: for each name of the layers that
 * count (the whole chain; only the top layer with -B, whose lower layers
 * stay with the backing file), the granularity and recording state of the
 * topmost copy, and refusal of an inconsistent copy (or a warning and that
 * name left out).  After the data is copied (so the copying dirties
 * nothing), each name is added to the target and every copy is merged in
 * with cbt_bitmap_merge_flags(CBT_MERGE_RESIZE): a layer of another size
 * contributes its dirty bytes within its own size, cut at the target's end.
 *
 * Failure
 * -------
 * Everything that can be checked is checked before the target is touched.
 * After that, a target this call created is removed; a no_create target is
 * left as the copy left it.
 */
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <sys/stat.h>

#include <cbt/bitmap.h>
#include <cbt/checkpoint.h>
#include <cbt/image.h>
#include <cbt/ops.h>

#include "../block/block.h"
#include "checkpoint_meta.h"
#include "ops_util.h"

#define CONV_CHUNK ((size_t)2 << 20) /* qemu-img's I/O buffer */
#define SECTOR 512u
#define SPARSE_SECTORS 8u /* -S 4k: the minimum zero run and the alignment */

enum run_kind { RUN_DATA, RUN_ZERO, RUN_BACKING };

struct bm_plan {
    const char *name;     /* borrowed from the layer's list */
    uint64_t granularity; /* the topmost copy's */
    bool disabled;        /* the topmost copy does not record */
    bool skip;            /* broken and skipped */
};

struct conv {
    const struct cbt_convert_opts *o;
    struct cbt_image *src;
    struct cbt_image *dst;
    bool shallow;           /* -B: only the top layer is copied */
    bool zero_init;         /* the target reads as zeroes already */
    uint64_t size;          /* bytes to copy: the source's size */
    uint64_t src_align;     /* the source's cluster size (512 for raw) */
    bool tgt_backing_known; /* a new target's backing file size is known */
    uint64_t tgt_backing_size;
    uint64_t cluster;       /* the target's cluster size (compress) */
    uint8_t *buf;
    uint8_t *buf2;          /* copy_plain: the chunk being written */
    size_t buflen;
    uint64_t done;

    /* Bitmaps: the layers that count and their lists, and the plan. */
    size_t nlayers;
    struct cbt_image **layers;
    struct cbt_bitmap_info **lists;
    size_t *counts;
    struct bm_plan *plan;
    size_t nplan;
};

static void progress(struct conv *c, uint64_t upto)
{
    c->done = upto;
    if (c->o->progress)
        c->o->progress(c->o->progress_opaque, c->done, c->size);
}

/* ---- sparse detection ---- */

static bool is_zero(const uint8_t *p, size_t n)
{
    if (n == 0)
        return true;
    /* A quick look at the first bytes rejects most data at once. */
    size_t head = MIN(n, (size_t)16);
    for (size_t i = 0; i < head; i++)
        if (p[i])
            return false;
    return n <= head || memcmp(p, p + 1, n - 1) == 0;
}

/* Sector k of a buffer of len bytes (the last one may be short). */
static bool sector_zero(const uint8_t *buf, size_t len, size_t k)
{
    size_t start = k * SECTOR;
    return is_zero(buf + start, MIN((size_t)SECTOR, len - start));
}

/*
 * The first run of like sectors of buf (nsec sectors, len bytes, starting
 * at disk sector first), with its end moved to a 4 KiB boundary as
 * described at the top.  Returns its length in sectors; *data says whether
 * it is to be written as data.
 */
static size_t like_run(const uint8_t *buf, size_t len, size_t nsec,
                       uint64_t first, bool *data)
{
    bool zero = sector_zero(buf, len, 0);
    size_t i = 1;
    while (i < nsec && sector_zero(buf, len, i) == zero)
        i++;
    if (i < nsec) {
        size_t tail = (size_t)((first + i) % SPARSE_SECTORS);
        if (tail) {
            if (zero && i <= tail)
                zero = false; /* does not reach a boundary */
            if (!zero)
                i = MIN(i + SPARSE_SECTORS - tail, nsec);
            else
                i -= tail;
        }
    }
    *data = !zero;
    return i;
}

/* How many leading sectors of buf to handle together, and whether they are
 * written as data (zero runs under 4 KiB after data go with the data). */
static size_t sparse_run(const uint8_t *buf, size_t len, uint64_t first,
                         bool *data)
{
    size_t nsec = DIV_ROUND_UP(len, (size_t)SECTOR);
    size_t min = MIN(nsec, (size_t)SPARSE_SECTORS);
    size_t used = like_run(buf, len, nsec, first, data);
    if (!*data)
        return used;
    size_t checked = used;
    while (checked < nsec) {
        bool d;
        size_t n = like_run(buf + checked * SECTOR, len - checked * SECTOR,
                            nsec - checked, first + checked, &d);
        checked += n;
        if (d)
            used = checked;
        else if (n >= min)
            break;
    }
    return used;
}

/* ---- writing ---- */

static int write_zero_range(struct conv *c, uint64_t off, uint64_t len)
{
    if (c->zero_init || len == 0)
        return 0;
    return cbt_image_pwrite_zeroes(c->dst, off, len, CBT_ZERO_MAY_UNMAP);
}

/* Write the chunk in c->buf (len bytes at off) leaving out its zeroes. */
static int write_sparse_buf(struct conv *c, const uint8_t *buf, uint64_t off,
                            size_t len)
{
    size_t pos = 0;
    while (pos < len) {
        bool data;
        size_t n = sparse_run(buf + pos, len - pos, (off + pos) / SECTOR,
                              &data);
        size_t bytes = MIN(n * SECTOR, len - pos);
        int r = data ? cbt_image_pwrite(c->dst, buf + pos, bytes, off + pos)
                     : write_zero_range(c, off + pos, bytes);
        if (r < 0)
            return r;
        pos += bytes;
    }
    return 0;
}

static int write_sparse(struct conv *c, uint64_t off, size_t len)
{
    return write_sparse_buf(c, c->buf, off, len);
}

/* ---- the walk ---- */

/* The kind and length of the run at off (see the top of the file). */
static int next_run(struct conv *c, uint64_t off, enum run_kind *kind,
                    uint64_t *len)
{
    uint64_t n = c->size - off;
    bool past_tgt_backing = false;
    if (c->tgt_backing_known) {
        if (off >= c->tgt_backing_size)
            past_tgt_backing = true;
        else
            n = MIN(n, c->tgt_backing_size - off);
    }
    struct cbt_extent e;
    struct cbt_image *base = c->shallow ? cbt_image_backing(c->src) : NULL;
    int r = c->shallow ? cbt_image_block_status_above(c->src, base, off, n, &e)
                       : cbt_image_block_status(c->src, off, n, &e);
    if (r < 0)
        return r;
    n = e.length;
    unsigned f = e.flags;
    if (base && !(f & (CBT_BS_PRESENT | CBT_BS_ZERO))) {
        uint64_t bsize = cbt_image_size(base);
        if (off >= bsize)
            f |= CBT_BS_ZERO; /* past the end of the source's backing */
        else
            n = MIN(n, bsize - off);
    }
    /* Whole sectors (the image's last one may be short). */
    n = MIN(DIV_ROUND_UP(n, (uint64_t)SECTOR) * SECTOR, c->size - off);
    /* End on a source cluster boundary when the run goes past one. */
    uint64_t tail = (off + n) % c->src_align;
    if (off + n < c->size && n > tail)
        n -= tail;

    if (f & CBT_BS_ZERO)
        *kind = past_tgt_backing ? RUN_BACKING : RUN_ZERO;
    else if (f & CBT_BS_DATA)
        *kind = RUN_DATA;
    else
        *kind = c->shallow ? RUN_BACKING : RUN_DATA;
    *len = n;
    return 0;
}

static int status_error(struct conv *c, uint64_t off, int r,
                        struct cbt_error **errp)
{
    cbt_error_set(errp, -r, "%s: cannot read block status at offset %" PRIu64
                  ": %s", c->o->src, off, strerror(-r));
    return -1;
}

static int read_error(struct conv *c, uint64_t off, int r,
                      struct cbt_error **errp)
{
    cbt_error_set(errp, -r, "%s: error while reading at byte %" PRIu64 ": %s",
                  c->o->src, off, strerror(-r));
    return -1;
}

static int write_error(struct conv *c, uint64_t off, int r,
                       struct cbt_error **errp)
{
    cbt_error_set(errp, -r, "%s: error while writing at byte %" PRIu64 ": %s",
                  c->o->dst, off, strerror(-r));
    return -1;
}

/* The caller asked to stop (cbt_cancel_fn): the error, -1. */
static int cancel_error(struct conv *c, struct cbt_error **errp)
{
    ops_cancel_error(errp, c->o->dst,
                     c->o->no_create ? "the target is left as the copy left "
                                       "it (-n)"
                                     : "the new image is removed");
    return -1;
}

/* A chunk being written by a thread of its own while the next one is read
 * (copy_plain). */
struct wjob {
    struct conv *c;
    const uint8_t *buf;
    uint64_t off;
    size_t len;
    int r;
    struct cbt_warner warner; /* the convert's, for this thread */
};

static void *write_job(void *arg)
{
    struct wjob *j = arg;
    warn_scope_enter(j->warner.fn, j->warner.opaque);
    j->r = write_sparse_buf(j->c, j->buf, j->off, j->len);
    return NULL;
}

/* Wait for the chunk being written; its result (0 or -errno). */
static int write_wait(pthread_t *wt, bool *writing, const struct wjob *j)
{
    if (!*writing)
        return 0;
    pthread_join(*wt, NULL);
    *writing = false;
    return j->r;
}

/* Data runs are read in chunks into one buffer while the chunk before is
 * written from the other, by a thread of its own. */
static int copy_plain(struct conv *c, struct cbt_error **errp)
{
    uint64_t off = 0;
    struct wjob job = {0};
    pthread_t wt;
    bool writing = false;
    int ret = 0;
    while (off < c->size && ret == 0) {
        enum run_kind kind;
        uint64_t n;
        if (ops_cancelled(c->o->cancel, c->o->cancel_opaque)) {
            ret = cancel_error(c, errp);
            break;
        }
        int r = next_run(c, off, &kind, &n);
        if (r < 0) {
            ret = status_error(c, off, r, errp);
            break;
        }
        if (kind == RUN_ZERO) {
            if ((r = write_wait(&wt, &writing, &job)) < 0) {
                ret = write_error(c, job.off, r, errp);
                break;
            }
            r = write_zero_range(c, off, n);
            if (r < 0) {
                ret = write_error(c, off, r, errp);
                break;
            }
        } else if (kind == RUN_DATA) {
            for (uint64_t p = off; p < off + n;) {
                size_t chunk = (size_t)MIN((uint64_t)c->buflen, off + n - p);
                if (ops_cancelled(c->o->cancel, c->o->cancel_opaque)) {
                    ret = cancel_error(c, errp);
                    break;
                }
                r = cbt_image_pread(c->src, c->buf, chunk, p);
                if (r < 0) {
                    ret = read_error(c, p, r, errp);
                    break;
                }
                if ((r = write_wait(&wt, &writing, &job)) < 0) {
                    ret = write_error(c, job.off, r, errp);
                    break;
                }
                /* Swap: the chunk just read is written, the other buffer
                 * takes the next read. */
                uint8_t *t = c->buf;
                c->buf = c->buf2;
                c->buf2 = t;
                job = (struct wjob){c, c->buf2, p, chunk, 0,
                                    warn_scope_current()};
                if (pthread_create(&wt, NULL, write_job, &job) == 0) {
                    writing = true;
                } else {
                    write_job(&job);
                    if (job.r < 0) {
                        ret = write_error(c, p, job.r, errp);
                        break;
                    }
                }
                p += chunk;
                progress(c, p);
            }
        }
        off += n;
        if (ret == 0)
            progress(c, off);
    }
    int r = write_wait(&wt, &writing, &job);
    if (r < 0 && ret == 0)
        ret = write_error(c, job.off, r, errp);
    return ret;
}

/*
 * One cluster (or the source's last, partial one) in c->buf, compressed.
 * A compressed write must reach the target's end when it is shorter than
 * a cluster: a new target may be a little larger than the source (qcow2
 * rounds sizes up to 512 bytes), so the cluster is padded with zeroes up to
 * it; on an existing target that goes on past this cluster, the piece is
 * written uncompressed rather than touch bytes past the source's end.
 */
static int write_compressed(struct conv *c, uint64_t off, size_t len)
{
    uint64_t dsize = cbt_image_size(c->dst);
    if (len < c->cluster && off + len < dsize) {
        if (c->o->no_create || dsize - off > c->cluster)
            return write_sparse(c, off, len);
        size_t pad = (size_t)(dsize - off) - len;
        memset(c->buf + len, 0, pad);
        len += pad;
    }
    return cbt_image_pwrite_compressed(c->dst, c->buf, len, off);
}

/* -c: whole target clusters (see the top of the file). */
static int copy_compressed(struct conv *c, struct cbt_error **errp)
{
    uint64_t cs = c->cluster;
    uint64_t off = 0, run_end = 0;
    enum run_kind run_kind = RUN_DATA;
    while (off < c->size) {
        if (ops_cancelled(c->o->cancel, c->o->cancel_opaque))
            return cancel_error(c, errp);
        if (off >= run_end) {
            uint64_t n;
            int r = next_run(c, off, &run_kind, &n);
            if (r < 0)
                return status_error(c, off, r, errp);
            run_end = off + n;
        }
        uint64_t avail = run_end - off, len;
        enum run_kind kind = run_kind;
        if (avail < cs) {
            len = MIN(cs, c->size - off);
            kind = RUN_DATA;
        } else {
            len = kind == RUN_DATA ? cs : avail / cs * cs;
        }
        int r = 0;
        if (kind == RUN_ZERO) {
            r = write_zero_range(c, off, len);
        } else if (kind == RUN_DATA) {
            r = cbt_image_pread(c->src, c->buf, (size_t)len, off);
            if (r < 0)
                return read_error(c, off, r, errp);
            if (is_zero(c->buf, (size_t)len))
                r = write_zero_range(c, off, len);
            else
                r = write_compressed(c, off, (size_t)len);
        }
        if (r == -ENOTSUP) {
            cbt_error_set(errp, ENOTSUP, "%s: compressed writes are not "
                          "supported for format '%s'", c->o->dst,
                          cbt_image_format(c->dst));
            return -1;
        }
        if (r < 0)
            return write_error(c, off, r, errp);
        off += len;
        progress(c, off);
    }
    return 0;
}

/* ---- bitmaps ---- */

static struct bm_plan *plan_find(struct conv *c, const char *name)
{
    for (size_t i = 0; i < c->nplan; i++)
        if (strcmp(c->plan[i].name, name) == 0)
            return &c->plan[i];
    return NULL;
}

/* List the bitmaps of the layers that count and decide, before anything is
 * written, what the target gets. */
static int plan_bitmaps(struct conv *c, struct cbt_error **errp)
{
    size_t depth = 0;
    for (struct cbt_image *l = c->src; l; l = cbt_image_backing(l))
        depth++;
    if (c->shallow)
        depth = 1;
    c->layers = calloc(depth, sizeof(*c->layers));
    c->lists = calloc(depth, sizeof(*c->lists));
    c->counts = calloc(depth, sizeof(*c->counts));
    if (!c->layers || !c->lists || !c->counts)
        goto nomem;
    size_t total = 0;
    struct cbt_image *l = c->src;
    for (; c->nlayers < depth; c->nlayers++, l = cbt_image_backing(l)) {
        c->layers[c->nlayers] = l;
        if (cbt_bitmap_list(l, &c->lists[c->nlayers], &c->counts[c->nlayers],
                            errp) < 0)
            return -1;
        total += c->counts[c->nlayers];
    }
    c->plan = calloc(total ? total : 1, sizeof(*c->plan));
    if (!c->plan)
        goto nomem;
    /* Names in the order met from the top; the topmost copy decides. */
    for (size_t i = 0; i < c->nlayers; i++) {
        for (size_t j = 0; j < c->counts[i]; j++) {
            const struct cbt_bitmap_info *b = &c->lists[i][j];
            struct bm_plan *p = plan_find(c, b->name);
            if (!p) {
                p = &c->plan[c->nplan++];
                p->name = b->name;
                p->granularity = b->granularity;
                p->disabled = !b->recording;
            }
            if (!b->inconsistent || p->skip)
                continue;
            const char *lname = cbt_image_filename(c->layers[i]);
            if (!c->o->skip_broken_bitmaps) {
                cbt_error_set(errp, EINVAL, "%s: bitmap '%s' is inconsistent "
                              "and cannot be copied (skip it with "
                              "--skip-broken-bitmaps, or remove it)",
                              lname, b->name);
                return -1;
            }
            cbt_warn("%s: bitmap '%s' is inconsistent; it is not copied",
                     lname, b->name);
            p->skip = true;
        }
    }
    return 0;
nomem:
    cbt_error_set(errp, ENOMEM, "%s: out of memory", c->o->src);
    return -1;
}

/* A no_create target must not have a bitmap of a name to copy already. */
static int check_target_bitmaps(struct conv *c, struct cbt_error **errp)
{
    struct cbt_bitmap_info *list = NULL;
    size_t n = 0;
    if (cbt_bitmap_list(c->dst, &list, &n, errp) < 0)
        return -1;
    int ret = 0;
    for (size_t i = 0; i < n && ret == 0; i++) {
        const struct bm_plan *p = plan_find(c, list[i].name);
        if (p && !p->skip) {
            cbt_error_set(errp, EEXIST, "%s: bitmap '%s' already exists in "
                          "the target", c->o->dst, p->name);
            ret = -1;
        }
    }
    cbt_bitmap_info_free_list(list, n);
    return ret;
}

static bool layer_has(const struct conv *c, size_t i, const char *name)
{
    for (size_t j = 0; j < c->counts[i]; j++)
        if (strcmp(c->lists[i][j].name, name) == 0)
            return true;
    return false;
}

static int copy_bitmaps(struct conv *c, struct cbt_error **errp)
{
    for (size_t k = 0; k < c->nplan; k++) {
        const struct bm_plan *p = &c->plan[k];
        if (p->skip)
            continue;
        if (cbt_bitmap_add(c->dst, p->name, p->granularity, p->disabled,
                           errp) < 0)
            goto fail;
        for (size_t i = 0; i < c->nlayers; i++) {
            if (!layer_has(c, i, p->name))
                continue;
            struct cbt_image *l = c->layers[i];
            int r = cbt_bitmap_merge_flags(c->dst, p->name, l, p->name,
                                           CBT_MERGE_RESIZE, errp);
            if (r != 0) {
                cbt_error_prefix(errp, "cannot copy bitmap '%s' of '%s'",
                                 p->name, cbt_image_filename(l));
                goto fail;
            }
        }
    }
    /* Checkpoints travel with their bitmaps: the source's whose history is
     * intact land in the same header update as the target's bitmaps,
     * sealed along the target's chain (none for a full copy, whose
     * bitmaps are the unions; with -B the source's backing chain, which
     * the target's backing file stands for); one whose bitmap was skipped
     * stays behind, with a warning. */
    struct ckpt_carry carry;
    struct ckpt_relink rl = {
        c->dst, c->shallow ? cbt_image_backing(c->src) : NULL,
    };
    int r = ckpt_carry_prepare(c->src, 0, &carry, errp);
    if (r == 0) {
        ckpt_carry_warn(&carry, c->o->dst);
        r = ckpt_carry_set(&carry, c->dst, &rl, 0, errp);
    }
    ckpt_carry_free(&carry);
    if (r < 0)
        goto fail;
    if (cbt_bitmap_commit(c->dst, errp) < 0)
        goto fail;
    return 0;
fail:
    cbt_bitmap_rollback(c->dst, NULL);
    return -1;
}

static void free_bitmap_plan(struct conv *c)
{
    for (size_t i = 0; i < c->nlayers; i++)
        cbt_bitmap_info_free_list(c->lists[i], c->counts[i]);
    free(c->layers);
    free(c->lists);
    free(c->counts);
    free(c->plan);
}

/* ---- setup ---- */

static bool same_file(const struct stat *a, const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && st.st_dev == a->st_dev &&
           st.st_ino == a->st_ino;
}

/* Refuse a target that is a layer of the source chain or the target's
 * own backing file: creating it would destroy the data to be copied. */
static int check_not_source(struct conv *c, struct cbt_error **errp)
{
    struct stat st;
    if (stat(c->o->dst, &st) < 0)
        return 0;
    for (struct cbt_image *l = c->src; l; l = cbt_image_backing(l)) {
        if (same_file(&st, cbt_image_filename(l))) {
            cbt_error_set(errp, EINVAL, "%s: the target is '%s' of the "
                          "source chain; refusing to overwrite it",
                          c->o->dst, cbt_image_filename(l));
            return -1;
        }
    }
    const char *bf = c->o->create->backing_file;
    if (bf && !c->o->no_create) {
        char *path = path_resolve_relative(c->o->dst, bf);
        bool same = path && same_file(&st, path);
        free(path);
        if (same) {
            cbt_error_set(errp, EINVAL, "%s: the target cannot be its own "
                          "backing file", c->o->dst);
            return -1;
        }
    }
    return 0;
}

/* Checks of the request that need no image. */
static int check_opts(const struct cbt_convert_opts *o, const char *fmt,
                      struct cbt_error **errp)
{
    if (!o->src || !*o->src || !o->dst || !*o->dst) {
        cbt_error_set(errp, EINVAL, "convert: empty file name");
        return -1;
    }
    if (o->no_create)
        return 0;
    if (strcmp(fmt, "qcow2") != 0 && strcmp(fmt, "raw") != 0) {
        cbt_error_set(errp, EINVAL, "Unknown file format '%s'", fmt);
        return -1;
    }
    bool raw = strcmp(fmt, "raw") == 0;
    if (o->compress && raw) {
        cbt_error_set(errp, ENOTSUP, "%s: compression is not supported for "
                      "format 'raw'", o->dst);
        return -1;
    }
    if (o->compress && o->create->preallocation &&
        strcmp(o->create->preallocation, "off") != 0) {
        cbt_error_set(errp, EINVAL, "%s: compression and preallocation are "
                      "not supported at the same time", o->dst);
        return -1;
    }
    if (o->bitmaps && raw) {
        cbt_error_set(errp, ENOTSUP, "%s: format 'raw' does not support "
                      "bitmaps", o->dst);
        return -1;
    }
    if (o->bitmaps && o->create->compat == 2) {
        cbt_error_set(errp, ENOTSUP, "%s: compat=0.10 images do not support "
                      "bitmaps", o->dst);
        return -1;
    }
    if (o->create->backing_file && raw) {
        cbt_error_set(errp, EINVAL, "%s: raw images cannot have a backing "
                      "file", o->dst);
        return -1;
    }
    return 0;
}

/* Checks of an existing (no_create) target once open. */
static int check_existing_target(struct conv *c, struct cbt_error **errp)
{
    uint64_t tsize = cbt_image_size(c->dst);
    if (tsize < c->size) {
        cbt_error_set(errp, EINVAL, "%s: output file is smaller than input "
                      "file (%" PRIu64 " < %" PRIu64 " bytes)", c->o->dst,
                      tsize, c->size);
        return -1;
    }
    bool raw = strcmp(cbt_image_format(c->dst), "raw") == 0;
    if (c->o->bitmaps && raw) {
        cbt_error_set(errp, ENOTSUP, "%s: format 'raw' does not support "
                      "bitmaps", c->o->dst);
        return -1;
    }
    if (c->o->compress && raw) {
        cbt_error_set(errp, ENOTSUP, "%s: compression is not supported for "
                      "format 'raw'", c->o->dst);
        return -1;
    }
    if (c->o->bitmaps && check_target_bitmaps(c, errp) < 0)
        return -1;
    return 0;
}

static int target_geometry(struct conv *c, struct cbt_error **errp)
{
    struct cbt_image_info info;
    if (cbt_image_get_info(c->src, &info, errp) < 0)
        return -1;
    c->src_align = info.cluster_size ? info.cluster_size : SECTOR;
    cbt_image_info_free(&info);
    if (cbt_image_get_info(c->dst, &info, errp) < 0)
        return -1;
    c->cluster = info.cluster_size;
    cbt_image_info_free(&info);
    if (c->o->compress && c->cluster == 0) {
        cbt_error_set(errp, ENOTSUP, "%s: compression is not supported for "
                      "format '%s'", c->o->dst, cbt_image_format(c->dst));
        return -1;
    }
    c->buflen = CONV_CHUNK;
    if (c->o->compress)
        c->buflen = (size_t)MAX((uint64_t)c->buflen, c->cluster);
    /* Page-aligned: with -t none (CBT_OPEN_DIRECT) whole blocks of them
     * go straight to DST. */
    c->buf = cbt_zalloc_aligned(c->buflen);
    c->buf2 = cbt_zalloc_aligned(c->buflen);
    if (!c->buf || !c->buf2) {
        cbt_error_set(errp, ENOMEM, "%s: out of memory", c->o->dst);
        return -1;
    }
    if (!c->o->no_create && c->shallow && cbt_image_backing(c->dst)) {
        c->tgt_backing_known = true;
        c->tgt_backing_size = cbt_image_size(cbt_image_backing(c->dst));
    }
    return 0;
}

int cbt_convert(const struct cbt_convert_opts *opts, struct cbt_error **errp)
{
    struct cbt_convert_opts oc;
    if (OPTS_COPY(&oc, opts, cbt_convert_opts, errp) < 0)
        return -1;
    /* The creation options, read as cbt_image_create reads them. */
    struct cbt_create_opts cc = CBT_CREATE_OPTS_INIT;
    if (oc.create && OPTS_COPY(&cc, oc.create, cbt_create_opts, errp) < 0)
        return -1;
    oc.create = &cc;
    const struct cbt_convert_opts *o = &oc;
    WARN_SCOPE(o->warn, o->warn_opaque);
    const char *fmt = o->create->format ? o->create->format : "qcow2";
    if (check_opts(o, fmt, errp) < 0)
        return -1;

    struct conv c = {
        .o = o,
        .shallow = o->create->backing_file != NULL,
    };
    int ret = -1;
    bool created = false;
    c.src = cbt_image_open(o->src, o->src_format, 0, errp);
    if (!c.src)
        return -1;
    c.size = cbt_image_size(c.src);
    if (check_not_source(&c, errp) < 0)
        goto out;
    if (o->bitmaps && plan_bitmaps(&c, errp) < 0)
        goto out;

    if (!o->no_create) {
        struct cbt_create_opts co = *o->create;
        co.format = fmt;
        co.size = c.size;
        co.size_given = true;
        struct stat st;
        bool existed = lstat(o->dst, &st) == 0;
        if (cbt_image_create(o->dst, &co, errp) < 0) {
            /* A file that was there may or may not have been truncated;
             * only one this call made is removed. */
            created = !existed && lstat(o->dst, &st) == 0;
            goto out;
        }
        created = true;
        c.zero_init = !c.shallow;
    }
    c.dst = cbt_image_open(o->dst, o->no_create ? o->create->format : fmt,
                           CBT_OPEN_RDWR | (o->direct ? CBT_OPEN_DIRECT : 0),
                           errp);
    if (!c.dst)
        goto out;
    if (o->no_create && check_existing_target(&c, errp) < 0)
        goto out;
    if (target_geometry(&c, errp) < 0)
        goto out;

    progress(&c, 0);
    if ((o->compress ? copy_compressed(&c, errp) : copy_plain(&c, errp)) < 0)
        goto out;
    if (o->bitmaps && copy_bitmaps(&c, errp) < 0)
        goto out;
    int r = cbt_image_flush(c.dst);
    if (r < 0) {
        cbt_error_set(errp, -r, "%s: cannot flush: %s", o->dst, strerror(-r));
        goto out;
    }
    ret = 0;
out:
    if (c.dst && cbt_image_close(c.dst, ret == 0 ? errp : NULL) < 0)
        ret = -1;
    cbt_image_close(c.src, NULL);
    if (ret < 0 && created)
        unlink(o->dst);
    free_bitmap_plan(&c);
    free(c.buf);
    free(c.buf2);
    return ret;
}
