/*
 * cbt repo verify: every point of a backup folder verified as cbt verify
 * verifies one, each stored block read and hashed once (repo.h).
 *
 * Why sharing is sound.  A qcow2 point's guest view is its own clusters
 * over its parent's view.  Walking each chain from its full backup up
 * (depth first, parents before children), a point's blocks fall in three
 * kinds, by the block status of its own layer:
 *   - blocks it holds (data, or zero clusters): read through the chain and
 *     hashed, or taken as zeroes without reading, and compared with the
 *     point's own recorded digest;
 *   - blocks it does not hold, wholly inside its parent's view: they read
 *     exactly as in the parent, whose digests were checked against the
 *     data already (or found bad: then they are bad here too, and said so);
 *     so the point's recorded digest must equal the parent's -- a
 *     comparison of two 32-byte strings, no data read;
 *   - anything else (a block partly held, or past the parent's end): read
 *     and hashed.
 * By induction every recorded digest of every point is checked against
 * the data it stands for, and every stored cluster a view shows is read
 * once, by the point that stores it.  Like cbt verify, the files are
 * checked first: every manifest is the one its child recorded (repo_open),
 * every hashes file has the recorded SHA-256 and root, every image opens
 * with the recorded size, is linked to its parent's file and passes the
 * consistency check; a point that fails these is reported and the points
 * above it are not checked (they are named as such).
 *
 * Raw chains are composed from the manifests' extents, not a chain of
 * images: a raw point holds the blocks its extents cover wholly (data read
 * from its own file, or zeroes), the others read as in its parent (zeroes
 * past the parent's end).  A raw point with a block partly covered (only
 * at a resized disk's tail) is verified alone, by cbt_verify.
 */
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>

#include <jansson.h>

#include <cbt/backup.h>
#include <cbt/image.h>

#include "../block/block.h"
#include "../ops/foldertx.h"
#include "../ops/hashtree.h"
#include "../util/util.h"
#include "repo.h"

#define BLOCK ((uint64_t)BLOCKHASH_BLOCK)
#define READ_CHUNK (1u << 20)

enum { B_UNSET, B_INHERIT, B_ZERO, B_READ };

struct ctx {
    struct repo *r;
    struct repo_verify_result *res;
    cbt_progress_fn *progress;
    void *progress_opaque;
    uint64_t done;
    uint8_t *buf;
};

/* What a verified point passes to its children. */
struct level {
    struct leaf_src leaves;   /* its leaves, paged in (either format) */
    uint64_t size;
    const char *file;     /* its image (path) */
    uint64_t *bad;        /* its bad blocks, increasing */
    const char **bad_file; /* raw: the file holding each (an ancestor's
                            * `file`, alive while its children are checked) */
    size_t nbad, cap;
};

static void level_free(struct level *l)
{
    leaf_src_close(&l->leaves);
    free(l->bad);
    free(l->bad_file);
    memset(l, 0, sizeof(*l));
}

static int add_bad(struct repo_verdict *v, const char *file, bool block,
                   uint64_t off, uint64_t len, const char *fmt, ...)
    PRINTF_FMT(6, 7);
static int add_bad(struct repo_verdict *v, const char *file, bool block,
                   uint64_t off, uint64_t len, const char *fmt, ...)
{
    v->ok = false;
    if (block) {
        v->bad_blocks += DIV_ROUND_UP(len, BLOCK);
        /* Adjacent bad blocks of one file are one range. */
        struct repo_bad *last = v->nbad ? &v->bad[v->nbad - 1] : NULL;
        if (last && last->block && last->offset + last->length == off &&
            strcmp(last->file, file) == 0) {
            last->length += len;
            return 0;
        }
    }
    if (v->nbad >= REPO_MAX_BAD)
        return 0;
    struct repo_bad *nv = realloc(v->bad, (v->nbad + 1) * sizeof(*nv));
    if (!nv)
        return -1;
    v->bad = nv;
    struct repo_bad *b = &nv[v->nbad];
    memset(b, 0, sizeof(*b));
    va_list ap;
    va_start(ap, fmt);
    int n = vasprintf(&b->problem, fmt, ap);
    va_end(ap);
    b->file = strdup(file);
    if (n < 0 || !b->file) {
        if (n >= 0)
            free(b->problem);
        free(b->file);
        return -1;
    }
    b->block = block;
    b->offset = off;
    b->length = len;
    v->nbad++;
    return 0;
}

/* The problem message of a library error (taken). */
static int add_err(struct repo_verdict *v, const char *file,
                   struct cbt_error *e)
{
    int r = add_bad(v, file, false, 0, 0, "%s", cbt_error_message(e));
    cbt_error_free(e);
    return r;
}

/* The file checks (see the top).  0 sound, 1 a problem was recorded, -1
 * out of memory or an image in use (*errp). */
static int check_files(struct ctx *c, size_t i, const char *img,
                       const char *hashes, struct cbt_error **errp)
{
    const struct repo_point *p = &c->r->points[i];
    struct repo_verdict *v = &c->res->v[i];
    const struct manifest *m = &p->m;
    struct cbt_error *e = NULL;
    char hex[65];
    int r = 0;
    if (m->tree)
        ; /* its record files and root: when its leaves are loaded */
    else if (strcasecmp(m->root, m->hash_file_sha256) != 0)
        r = add_bad(v, hashes, false, 0, 0, "%s: root hash %s differs from "
                    "the SHA-256 of its block hashes %s", hashes, m->root,
                    m->hash_file_sha256);
    else if (hashes_sha256(hashes, m->blocks, hex, &e) < 0)
        r = add_err(v, hashes, e);
    else if (strcasecmp(hex, m->hash_file_sha256) != 0)
        r = add_bad(v, hashes, false, 0, 0, "%s: SHA-256 %s differs from %s "
                    "recorded in its manifest", hashes, hex,
                    m->hash_file_sha256);
    if (r < 0)
        goto oom;
    if (!v->ok)
        return 1;

    if (strcmp(m->image_format, "raw") == 0) {
        /* A sparse file of exactly the virtual size (repo_open checked
         * its size already); nothing else to check without the data. */
        return 0;
    }
    struct cbt_check_result cr;
    memset(&cr, 0, sizeof(cr));
    if (cbt_image_check(img, "qcow2", 0, &cr, NULL, NULL, &e) < 0) {
        if (cbt_error_kind(e) == CBT_ERR_IN_USE) {
            *errp = e;
            return -1;
        }
        return add_err(v, img, e) < 0 ? (cbt_error_set(errp, ENOMEM,
                                                       "out of memory"), -1)
                                      : 1;
    }
    struct stat st;
    if (cr.corruptions || cr.check_errors)
        r = add_bad(v, img, false, 0, 0, "%s: damaged: the consistency check "
                    "found %" PRId64 " corruptions and %" PRId64 " other "
                    "errors (a check of the image lists them)", img,
                    cr.corruptions,
                    cr.check_errors);
    else if (stat(img, &st) == 0 &&
             cr.image_end_offset > ALIGN_UP((uint64_t)st.st_size, BLOCK))
        r = add_bad(v, img, false, 0, 0, "%s: truncated: the file is %" PRIu64
                    " bytes, but its clusters reach at least %" PRIu64, img,
                    (uint64_t)st.st_size, cr.image_end_offset);
    if (r < 0)
        goto oom;
    if (!v->ok)
        return 1;

    struct cbt_image *im = cbt_image_open(img, "qcow2", CBT_OPEN_NO_BACKING,
                                          &e);
    if (!im) {
        if (cbt_error_kind(e) == CBT_ERR_IN_USE) {
            *errp = e;
            return -1;
        }
        return add_err(v, img, e) < 0 ? -1 : 1;
    }
    uint64_t size = cbt_image_size(im);
    const char *have = im->backing_name, *want = m->parent_file;
    if (size < m->virtual_size || size > ALIGN_UP(m->virtual_size, 512))
        r = add_bad(v, img, false, 0, 0, "%s: virtual size is %" PRIu64
                    ", but its manifest records %" PRIu64, img, size,
                    m->virtual_size);
    else if (!want != !have || (want && strcmp(want, have) != 0))
        r = add_bad(v, img, false, 0, 0, "%s: backing file is '%s', but its "
                    "parent backup is '%s'", img, have ? have : "(none)",
                    want ? want : "(none: a full backup)");
    cbt_image_close(im, NULL);
    if (r < 0)
        goto oom;
    return v->ok ? 0 : 1;
oom:
    cbt_error_set(errp, ENOMEM, "out of memory");
    return -1;
}

/* The file holding the view's data at off (for a bad block). */
static const char *holder(struct cbt_image *view, uint64_t off, uint64_t len)
{
    struct cbt_extent e;
    if (cbt_image_block_status(view, off, len, &e) < 0 ||
        !(e.flags & CBT_BS_PRESENT))
        return cbt_image_filename(view);
    struct cbt_image *l = view;
    for (int d = 0; d < e.depth && cbt_image_backing(l); d++)
        l = cbt_image_backing(l);
    return cbt_image_filename(l);
}

/* The index of block b among l's bad blocks, or -1. */
static ssize_t in_bad(const struct level *l, uint64_t b)
{
    size_t lo = 0, hi = l ? l->nbad : 0;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (l->bad[mid] < b)
            lo = mid + 1;
        else
            hi = mid;
    }
    return l && lo < l->nbad && l->bad[lo] == b ? (ssize_t)lo : -1;
}

static int mark_bad(struct level *lv, uint64_t b, const char *file)
{
    if (lv->nbad == lv->cap) {
        size_t cap = lv->cap ? lv->cap * 2 : 64;
        uint64_t *v = realloc(lv->bad, cap * sizeof(*v));
        if (v)
            lv->bad = v;
        const char **f = realloc(lv->bad_file, cap * sizeof(*f));
        if (f)
            lv->bad_file = f;
        if (!v || !f)
            return -1;
        lv->cap = cap;
    }
    lv->bad_file[lv->nbad] = file;
    lv->bad[lv->nbad++] = b;
    return 0;
}

/* Classify every block of the view (see the top). */
static int classify(struct cbt_image *view, const struct level *parent,
                    uint64_t size, uint8_t *kind)
{
    struct cbt_image *base = cbt_image_backing(view);
    for (uint64_t off = 0; off < size;) {
        struct cbt_extent e;
        int r = cbt_image_block_status_above(view, base, off, size - off, &e);
        if (r < 0)
            return r;
        bool own = !base || (e.flags & (CBT_BS_PRESENT | CBT_BS_ZERO));
        uint8_t k = !own ? B_INHERIT
                         : (e.flags & CBT_BS_ZERO) ? B_ZERO : B_READ;
        for (uint64_t b = off / BLOCK; b * BLOCK < off + e.length; b++) {
            uint8_t nk = k;
            if (nk == B_INHERIT) {
                uint64_t end = MIN((b + 1) * BLOCK, size);
                if (!parent || end > parent->size)
                    nk = B_READ;
            }
            kind[b] = kind[b] == B_UNSET || kind[b] == nk ? nk : B_READ;
        }
        off += e.length;
    }
    return 0;
}

/* The same for a raw point, from its manifest's extents: a block wholly
 * inside one extent is its own (data: read from its file; zero); a block
 * no extent touches reads as in its parent (past the parent's end: as
 * zeroes).  1 when a block is partly carried and partly its parent's (a
 * resize's tail): no sharing for that point. */
static int classify_raw(const struct manifest *m, const struct level *parent,
                        uint64_t size, uint8_t *kind)
{
    uint64_t n = DIV_ROUND_UP(size, BLOCK);
    if (!parent && m->kind != CBT_BACKUP_FULL)
        return 1; /* its parent's view was not checked block by block */
    for (uint64_t b = 0; b < n; b++) {
        uint64_t end = MIN((b + 1) * BLOCK, size);
        kind[b] = !parent ? B_ZERO
                  : end <= parent->size ? B_INHERIT
                  : b * BLOCK >= parent->size ? B_ZERO
                                              : B_UNSET;
    }
    for (size_t i = 0; i < m->nextents; i++) {
        const struct manifest_extent *e = &m->extents[i];
        uint64_t s0 = e->start, s1 = MIN(e->start + e->length, size);
        for (uint64_t b = s0 / BLOCK; b * BLOCK < s1; b++) {
            uint64_t bs = b * BLOCK, be = MIN(bs + BLOCK, size);
            bool whole = s0 <= bs && s1 >= be;
            uint8_t k = e->zero ? B_ZERO : B_READ;
            if (!whole)
                return 1;
            kind[b] = k;
        }
    }
    for (uint64_t b = 0; b < n; b++)
        if (kind[b] == B_UNSET)
            return 1;
    return 0;
}

/*
 * The point's leaves (leaf_src: paged in, never held whole): a v1 .hashes
 * file (its digest checked by check_files); a v2 point's view of its
 * chain's record files, each checked against its manifest's file-sha256,
 * the records against the point's root.  0, or -1 with *e naming the
 * file at fault.
 */
static int load_leaves(struct ctx *c, size_t i, const char *hashes,
                       struct leaf_src *l, struct cbt_error **e)
{
    const struct repo_point *p = &c->r->points[i];
    uint64_t size = p->m.virtual_size;
    if (!p->m.tree)
        return leaf_src_open_v1(l, hashes, size, NULL, e);
    size_t n = 0;
    for (int j = (int)i; j >= 0 && c->r->points[j].m.tree;
         j = c->r->points[j].parent)
        n++;
    char **paths = calloc(n, sizeof(*paths));
    const char **sha = calloc(n, sizeof(*sha));
    uint64_t *blocks = calloc(n, sizeof(*blocks));
    size_t k = 0, bad;
    int r = -1;
    if (!paths || !sha || !blocks)
        goto oom;
    for (int j = (int)i; k < n; j = c->r->points[j].parent, k++) {
        const struct repo_point *q = &c->r->points[j];
        paths[k] = cbt_strdup_printf("%s/%s", c->r->dir, q->m.hash_file);
        if (!paths[k])
            goto oom;
        sha[k] = q->m.hash_file_sha256;
        blocks[k] = q->m.blocks;
    }
    if (leaf_src_open_tree(l, size, (const char *const *)paths, blocks, sha,
                           n, &bad, e) < 0)
        goto out;
    if (leaf_src_check_root(l, p->m.root, e) < 0) {
        leaf_src_close(l);
        goto out;
    }
    r = 0;
    goto out;
oom:
    cbt_error_set(e, ENOMEM, "out of memory");
out:
    for (k = 0; paths && k < n; k++)
        free(paths[k]);
    free(paths);
    free(sha);
    free(blocks);
    return r;
}

/* Leaf b of l into out.  0 or -errno. */
static int leaf_at(struct leaf_src *l, uint64_t b, uint8_t out[32])
{
    const uint8_t *leaf;
    uint64_t nl;
    int r = leaf_src_window(l, b, &leaf, &nl);
    if (r == 0)
        memcpy(out, leaf, 32);
    return r;
}

/* The data checks of a qcow2 point. */
static int check_data(struct ctx *c, size_t i, const char *img,
                      const char *hashes, struct level *parent,
                      struct level *lv, struct cbt_error **errp)
{
    const struct repo_point *p = &c->r->points[i];
    struct repo_verdict *v = &c->res->v[i];
    struct cbt_error *e = NULL;
    uint64_t size = p->m.virtual_size;
    lv->size = size;
    lv->file = img;
    if (load_leaves(c, i, hashes, &lv->leaves, &e) < 0)
        return cbt_error_errno(e) == ENOMEM
                   ? (*errp = e, -1)
                   : add_err(v, hashes, e) < 0 ? -1 : 1;
    bool raw = strcmp(p->m.image_format, "raw") == 0;
    struct cbt_image *view = cbt_image_open(img, p->m.image_format,
                                            raw ? CBT_OPEN_NO_BACKING : 0, &e);
    if (!view) {
        if (cbt_error_kind(e) == CBT_ERR_IN_USE) {
            *errp = e;
            return -1;
        }
        return add_err(v, img, e) < 0 ? -1 : 1;
    }
    int ret = -1, r = 0;
    uint64_t n = DIV_ROUND_UP(size, BLOCK);
    uint8_t own[32], theirs[32];
    uint8_t *kind = calloc(n + 1, 1);
    if (!kind)
        goto oom;
    if (raw) {
        if (classify_raw(&p->m, parent, size, kind) != 0) {
            ret = 2; /* the caller verifies it alone */
            goto out;
        }
    } else if ((r = classify(view, parent, size, kind)) < 0) {
        goto io;
    }
    for (uint64_t b = 0; b < n;) {
        uint64_t off = b * BLOCK;
        if (kind[b] != B_READ) {
            size_t len = (size_t)MIN(BLOCK, size - off);
            uint8_t d[32];
            bool bad = false, inherited = false;
            ssize_t pi = -1;
            if (kind[b] == B_ZERO) {
                blockhash_zero_digest(len, d);
                if ((r = leaf_at(&lv->leaves, b, own)) < 0)
                    goto io;
                bad = memcmp(d, own, 32) != 0;
                v->hashed++;
            } else {
                pi = in_bad(parent, b);
                inherited = pi >= 0;
                if (!inherited &&
                    ((r = leaf_at(&lv->leaves, b, own)) < 0 ||
                     (r = leaf_at(&parent->leaves, b, theirs)) < 0))
                    goto io;
                bad = inherited || memcmp(theirs, own, 32) != 0;
                v->shared++;
            }
            const char *hf = raw ? (inherited ? parent->bad_file[pi] : img)
                                 : holder(view, off, len);
            if (bad && (mark_bad(lv, b, raw ? hf : img) < 0 ||
                        add_bad(v, hf, true, off, len,
                                "%s",
                                inherited ? "the bad data of its parent"
                                : kind[b] == B_ZERO
                                    ? "reads as zeroes, but its recorded hash "
                                      "is not that of zeroes"
                                    : "is its parent's, but its recorded hash "
                                      "is not the parent's") < 0))
                goto oom;
            b++;
            c->done += len;
            continue;
        }
        /* A run of blocks to read, up to READ_CHUNK. */
        uint64_t e_b = b;
        while (e_b < n && kind[e_b] == B_READ &&
               (e_b - b + 1) * BLOCK <= READ_CHUNK)
            e_b++;
        size_t len = (size_t)(MIN(e_b * BLOCK, size) - off);
        if ((r = cbt_image_pread(view, c->buf, len, off)) < 0)
            goto io;
        for (uint64_t k = b; k < e_b; k++) {
            size_t bl = (size_t)MIN(BLOCK, size - k * BLOCK);
            uint8_t d[32];
            blockhash_digest(c->buf + (k - b) * BLOCK, bl, d);
            v->hashed++;
            if ((r = leaf_at(&lv->leaves, k, own)) < 0)
                goto io;
            if (memcmp(d, own, 32) != 0 &&
                (mark_bad(lv, k, img) < 0 ||
                 add_bad(v, holder(view, k * BLOCK, bl), true, k * BLOCK, bl,
                         "does not match its recorded hash") < 0))
                goto oom;
        }
        c->res->bytes_read += len;
        c->done += len;
        b = e_b;
        if (c->progress)
            c->progress(c->progress_opaque, c->done, c->res->bytes_total);
    }
    ret = 0;
    goto out;
io:
    cbt_error_set(errp, -r, "%s: cannot read the guest view: %s", img,
                  strerror(-r));
    goto out;
oom:
    cbt_error_set(errp, ENOMEM, "out of memory");
out:
    free(kind);
    cbt_image_close(view, NULL);
    return ret;
}

/* A raw point, by cbt_verify. */
static int verify_raw(struct ctx *c, size_t i, const char *img,
                      struct cbt_error **errp)
{
    struct repo_verdict *v = &c->res->v[i];
    struct cbt_verify_result vr;
    struct cbt_verify_opts vo = CBT_VERIFY_OPTS_INIT;
    vo.backup = img;
    if (cbt_verify(&vo, &vr, errp) < 0)
        return -1;
    int r = 0;
    if (!vr.ok)
        r = add_bad(v, vr.bad_file ? vr.bad_file : img, vr.bad_length > 0,
                    vr.bad_offset, vr.bad_length, "%s",
                    vr.problem ? vr.problem : "verification failed");
    uint64_t size = c->r->points[i].m.virtual_size;
    v->hashed += DIV_ROUND_UP(size, BLOCK);
    c->res->bytes_read += vr.bytes_checked;
    c->done += size;
    cbt_verify_result_free(&vr);
    if (r < 0)
        cbt_error_set(errp, ENOMEM, "out of memory");
    return r;
}

static int verify_point(struct ctx *c, size_t i, struct level *parent,
                        bool parent_failed, int depth,
                        struct cbt_error **errp)
{
    const struct repo_point *p = &c->r->points[i];
    struct repo_verdict *v = &c->res->v[i];
    CLEANUP_FREE char *img = cbt_strdup_printf("%s/%s", c->r->dir, p->file);
    CLEANUP_FREE char *hashes = cbt_strdup_printf("%s/%s", c->r->dir,
                                                  p->m.hash_file);
    if (!img || !hashes) {
        cbt_error_set(errp, ENOMEM, "out of memory");
        return -1;
    }
    struct level lv;
    memset(&lv, 0, sizeof(lv));
    bool usable = false;
    int r = 0;
    if (p->problem) {
        r = add_bad(v, img, false, 0, 0, "%s", p->problem);
    } else if (parent_failed) {
        r = add_bad(v, img, false, 0, 0, "not checked: its parent %s failed "
                    "its checks", c->r->points[p->parent].file);
    } else {
        r = check_files(c, i, img, hashes, errp);
        if (r == 0)
            r = check_data(c, i, img, hashes, parent, &lv, errp);
        if (r == 2) {
            /* A raw point whose blocks cannot be shared: alone. */
            level_free(&lv);
            memset(&lv, 0, sizeof(lv));
            r = verify_raw(c, i, img, errp);
        } else {
            usable = r == 0;
        }
        if (r > 0)
            r = 0;
    }
    if (r < 0) {
        level_free(&lv);
        return -1;
    }
    if (!v->ok)
        c->res->bad_points++;
    /* The points that start from this one. */
    for (size_t j = 0; r == 0 && j < c->r->npoints && depth < 4096; j++)
        if (c->r->points[j].parent == (int)i)
            r = verify_point(c, j, usable ? &lv : NULL,
                             !v->ok && !usable, depth + 1, errp);
    level_free(&lv);
    return r;
}

/* Record when each sound point was verified (REPO_VERIFIED_FILE), under
 * the folder's lock; a folder that cannot take the record (read-only, a
 * prune running) only gets a warning: the verdict stands. */
static void record(const struct repo *r, const struct repo_verify_result *res,
                   const char *when)
{
    json_t *root = json_object(), *pts = json_object();
    for (size_t i = 0; root && pts && i < res->n; i++) {
        if (!res->v[i].ok)
            continue;
        json_object_set_new(pts, r->points[i].file,
                            json_pack("{s:s, s:s}", "verified", when,
                                      "manifest-sha256", r->points[i].sha));
    }
    json_object_set_new(root, "format", json_string("cbt-verified"));
    json_object_set_new(root, "version", json_integer(1));
    json_object_set(root, "points", pts);
    char *t = json_dumps(root, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    json_decref(pts);
    json_decref(root);
    CLEANUP_FREE char *text = t ? cbt_strdup_printf("%s\n", t) : NULL;
    free(t);
    CLEANUP_FREE char *path = cbt_strdup_printf("%s/%s", r->dir,
                                                REPO_VERIFIED_FILE);
    struct cbt_error *e = NULL;
    int lock = text && path ? foldertx_lock(r->dir, &e) : -1;
    if (lock >= 0) {
        bfile_write_new(path, text, strlen(text), true, &e);
        close(lock);
    }
    if (e)
        cbt_warn("%s: not recording the verification: %s", r->dir,
                 cbt_error_message(e));
    cbt_error_free(e);
}

int repo_verify(const char *dir, cbt_progress_fn *progress,
                void *progress_opaque, struct repo_verify_result *res,
                struct cbt_error **errp)
{
    memset(res, 0, sizeof(*res));
    struct repo r;
    if (foldertx_recover(dir, errp) < 0 || repo_open(dir, &r, errp) < 0)
        return -1;
    struct ctx c = {.r = &r, .res = res, .progress = progress,
                    .progress_opaque = progress_opaque};
    int ret = -1;
    res->v = calloc(r.npoints + 1, sizeof(*res->v));
    c.buf = cbt_zalloc_aligned(READ_CHUNK);
    if (!res->v || !c.buf) {
        cbt_error_set(errp, ENOMEM, "out of memory");
        goto out;
    }
    res->n = r.npoints;
    for (size_t i = 0; i < r.npoints; i++) {
        res->v[i].ok = true;
        res->bytes_total += r.points[i].m.virtual_size;
        if (!(res->v[i].file = strdup(r.points[i].file))) {
            cbt_error_set(errp, ENOMEM, "out of memory");
            goto out;
        }
    }
    char when[48];
    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    size_t k = strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(when + k, sizeof(when) - k, ".%09ldZ", ts.tv_nsec);
    ret = 0;
    for (size_t i = 0; ret == 0 && i < r.npoints; i++)
        if (r.points[i].parent < 0)
            ret = verify_point(&c, i, NULL, false, 0, errp);
    if (ret == 0)
        record(&r, res, when);
out:
    free(c.buf);
    repo_close(&r);
    if (ret < 0)
        repo_verify_result_free(res);
    return ret;
}

void repo_verify_result_free(struct repo_verify_result *res)
{
    if (!res)
        return;
    for (size_t i = 0; i < res->n; i++) {
        struct repo_verdict *v = &res->v[i];
        for (size_t k = 0; k < v->nbad; k++) {
            free(v->bad[k].file);
            free(v->bad[k].problem);
        }
        free(v->bad);
        free(v->file);
    }
    free(res->v);
    memset(res, 0, sizeof(*res));
}
