/*
 * Checkpoints (include/cbt/checkpoint.h): a recording persistent bitmap per
 * checkpoint, kept over the chain by the chain rules, plus metadata in the
 * top layer, in a qcow2 header extension of cbt's own (checkpoint_meta.h;
 * the layout is in docs/checkpoints.md).
 *
 * Atomicity.  The extension is kept in memory by the qcow2 driver and
 * written in the same header update as the next bitmap store, so a change
 * of the top layer (bitmap added or removed, metadata changed) is: change
 * the bitmaps in memory, set the extension, one cbt_bitmap_commit(), then a
 * flush (which writes the header when no bitmap changed).  On any failure
 * before the commit lands, the bitmaps are rolled back and the old
 * extension is put back, so the file stays as it was.
 *
 * Layers below the top are changed after the top (delete, reconcile
 * --fix): a crash in between leaves copies of a bitmap without metadata
 * below the top, which the chain rules never take as valid (the top lacks
 * them) and which reconcile reports and a repeated delete removes.  The
 * other order could leave a checkpoint whose union silently misses the
 * lower copies.
 */
#include <inttypes.h>
#include <stdio.h>
#include <sys/random.h>
#include <time.h>

#include <cbt/bitmap.h>
#include <cbt/chain.h>
#include <cbt/checkpoint.h>

#include "../block/block.h"
#include "../util/util.h"
#include "checkpoint_meta.h"

_Static_assert(CKPT_NAME_MAX == CBT_CHECKPOINT_NAME_MAX,
               "checkpoint name limits differ");

/* ---- metadata of a disk ---- */

static const char *fname(struct cbt_image *img)
{
    return cbt_image_filename(img);
}

static void oom(struct cbt_error **errp, struct cbt_image *img)
{
    cbt_error_set(errp, ENOMEM, "%s: out of memory", fname(img));
}

/* Hand a library error on to *errp (or drop it). */
static void pass_error(struct cbt_error **errp, struct cbt_error *err)
{
    if (errp && !*errp)
        *errp = err;
    else
        cbt_error_free(err);
}

/* The raw extension of top: 0 (*present says whether there is one), or -1
 * with *errp. */
static int raw_load(struct cbt_image *top, uint8_t **buf, size_t *len,
                    bool *present, struct cbt_error **errp)
{
    *buf = NULL;
    *len = 0;
    int r = blk_ext_get(top, CKPT_EXT_TYPE, buf, len);
    *present = r == 0;
    if (r == -ENOENT || r == -ENOTSUP)
        return 0;
    if (r < 0) {
        cbt_error_set(errp, -r, "%s: cannot read the checkpoint metadata: %s",
                      fname(top), strerror(-r));
        return -1;
    }
    return 0;
}

/* Parse top's metadata into *m (empty when there is none).  A corrupt
 * extension is an error naming the file (*corrupt set when given). */
static int meta_load(struct cbt_image *top, struct ckpt_meta *m,
                     bool *present, struct cbt_error **errp)
{
    memset(m, 0, sizeof(*m));
    uint8_t *buf;
    size_t len;
    bool have;
    if (raw_load(top, &buf, &len, &have, errp) < 0)
        return -1;
    if (present)
        *present = have;
    if (!have)
        return 0;
    char why[256] = "";
    int r = ckpt_meta_parse(buf, len, m, why, sizeof(why));
    free(buf);
    if (r == 0)
        return 0;
    ckpt_meta_free(m);
    if (r == -ENOMEM) {
        oom(errp, top);
        return -1;
    }
    cbt_error_set(errp, EINVAL, "%s: the checkpoint metadata (qcow2 header "
                  "extension 0x%08x) is corrupt: %s; 'cbt checkpoint "
                  "reconcile --fix' rebuilds it from the bitmaps",
                  fname(top), CKPT_EXT_TYPE, why);
    return -1;
}

static int new_uuid(struct cbt_image *top, uint8_t uuid[16],
                    struct cbt_error **errp)
{
    size_t got = 0;
    while (got < 16) {
        ssize_t n = getrandom(uuid + got, 16 - got, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            cbt_error_set(errp, errno ? errno : EIO, "%s: cannot make a disk "
                          "id: getrandom: %s", fname(top),
                          strerror(errno ? errno : EIO));
            return -1;
        }
        got += (size_t)n;
    }
    uuid[6] = (uint8_t)((uuid[6] & 0x0f) | 0x40); /* version 4 */
    uuid[8] = (uint8_t)((uuid[8] & 0x3f) | 0x80); /* RFC 4122 variant */
    return 0;
}

static void uuid_str(const uint8_t u[16], char out[37])
{
    snprintf(out, 37,
             "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-"
             "%02x%02x%02x%02x%02x%02x",
             u[0], u[1], u[2], u[3], u[4], u[5], u[6], u[7], u[8], u[9],
             u[10], u[11], u[12], u[13], u[14], u[15]);
}

static ssize_t find_name(const struct ckpt_meta *m, const char *name)
{
    for (size_t i = 0; i < m->n; i++)
        if (strcmp(m->v[i].name, name) == 0)
            return (ssize_t)i;
    return -1;
}

/* Drop the seals of checkpoint `order`. */
static void seals_remove(struct ckpt_meta *m, uint64_t order)
{
    size_t k = 0;
    for (size_t j = 0; j < m->nseals; j++)
        if (m->seals[j].order != order)
            m->seals[k++] = m->seals[j];
    m->nseals = k;
}

/* Drop record i and its seals; its children get its parent. */
static void meta_remove(struct ckpt_meta *m, size_t i)
{
    uint64_t order = m->v[i].order, parent = m->v[i].parent;
    seals_remove(m, order);
    for (size_t j = 0; j < m->n; j++)
        if (m->v[j].parent == order)
            m->v[j].parent = parent;
    free(m->v[i].name);
    memmove(&m->v[i], &m->v[i + 1], (m->n - i - 1) * sizeof(*m->v));
    m->n--;
}

/* Append a record made now (the newest checkpoint becomes its parent).
 * Takes a copy of name.  0 or -ENOMEM. */
static int meta_append(struct ckpt_meta *m, const char *name,
                       uint64_t virtual_size, uint64_t granularity)
{
    struct ckpt_rec *v = realloc(m->v, (m->n + 1) * sizeof(*v));
    if (!v)
        return -ENOMEM;
    m->v = v;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct ckpt_rec r = {
        .order = m->next_order,
        .created_sec = ts.tv_sec,
        .created_nsec = (uint32_t)ts.tv_nsec,
        .parent = m->n ? m->v[m->n - 1].order : 0,
        .virtual_size = virtual_size,
        .granularity = granularity,
        .name = strdup(name),
    };
    if (!r.name)
        return -ENOMEM;
    m->v[m->n++] = r;
    m->next_order++;
    return 0;
}

/*
 * Set top's extension to *m in memory.  extra: bytes the header will grow
 * by with the coming bitmap store (the bitmaps extension when top has none
 * yet), checked first so that a header that would overflow is refused
 * before any bitmap cluster is written.
 */
static int meta_set(struct cbt_image *top, const struct ckpt_meta *m,
                    size_t extra, struct cbt_error **errp)
{
    uint8_t *buf;
    size_t len;
    int r = ckpt_meta_build(m, &buf, &len);
    if (r < 0) {
        cbt_error_set(errp, -r, "%s: cannot encode the checkpoint metadata: "
                      "%s", fname(top), strerror(-r));
        return -1;
    }
    struct cbt_error *err = NULL;
    r = 0;
    if (extra) {
        uint8_t *big = calloc(1, len + extra);
        if (!big) {
            free(buf);
            oom(errp, top);
            return -1;
        }
        memcpy(big, buf, len);
        /* In memory only: replaced below, never written. */
        r = blk_ext_set(top, CKPT_EXT_TYPE, big, len + extra, &err);
        free(big);
    }
    if (r == 0)
        r = blk_ext_set(top, CKPT_EXT_TYPE, buf, len, &err);
    free(buf);
    if (r == 0)
        return 0;
    if (cbt_error_errno(err) == ENOSPC) {
        cbt_error_free(err);
        cbt_error_set(errp, ENOSPC, "%s: the checkpoint metadata (%zu bytes "
                      "for %zu checkpoint%s) does not fit in the image header "
                      "(one cluster of %" PRIu32 " bytes); delete old "
                      "checkpoints or use shorter names", fname(top), len,
                      m->n, m->n == 1 ? "" : "s", top->cluster_size);
    } else {
        pass_error(errp, err);
    }
    return -1;
}

/* The saved extension of top, to put back after a failure. */
struct saved_ext {
    uint8_t *buf;
    size_t len;
    bool present;
};

static int save_ext(struct cbt_image *top, struct saved_ext *s,
                    struct cbt_error **errp)
{
    return raw_load(top, &s->buf, &s->len, &s->present, errp);
}

static void undo(struct cbt_image *top, struct saved_ext *s)
{
    cbt_bitmap_rollback(top, NULL);
    blk_ext_set(top, CKPT_EXT_TYPE, s->present ? s->buf : NULL, s->len, NULL);
}

/* Store top's bitmaps and extension in one header update and flush; on
 * failure undo everything in memory. */
static int commit_top(struct cbt_image *top, struct saved_ext *s,
                      struct cbt_error **errp)
{
    if (cbt_bitmap_commit(top, errp) < 0) {
        /* A store that failed after its header write landed (the sync
         * failed) put bitmaps and metadata in place together: keep them
         * so, in memory as on disk. */
        if (!top->bitmaps_switched)
            undo(top, s);
        return -1;
    }
    int r = cbt_image_flush(top);
    if (r < 0) {
        cbt_error_set(errp, -r, "%s: cannot flush the checkpoint metadata: %s",
                      fname(top), strerror(-r));
        return -1;
    }
    return 0;
}

static bool has_bitmap(struct cbt_image *img, const char *name,
                       const struct cbt_bitmap_info *list, size_t n)
{
    (void)img;
    for (size_t i = 0; i < n; i++)
        if (strcmp(list[i].name, name) == 0)
            return true;
    return false;
}

static int check_name(struct cbt_image *top, const char *name,
                      struct cbt_error **errp)
{
    if (!name || !*name) {
        cbt_error_set(errp, EINVAL, "%s: a checkpoint name must not be empty",
                      fname(top));
        return -1;
    }
    size_t len = strlen(name);
    if (len > CBT_CHECKPOINT_NAME_MAX) {
        cbt_error_set(errp, ENAMETOOLONG, "%s: checkpoint name is %zu bytes "
                      "long, at most %d are allowed", fname(top), len,
                      CBT_CHECKPOINT_NAME_MAX);
        return -1;
    }
    return 0;
}

static int need_rw(struct cbt_image *top, const char *what,
                   struct cbt_error **errp)
{
    if (top->read_only) {
        cbt_error_set(errp, EROFS, "%s: cannot %s: the disk is opened "
                      "read-only", fname(top), what);
        return -1;
    }
    if (!top->drv->ext_get) {
        cbt_error_set(errp, ENOTSUP, "%s: checkpoints need a qcow2 disk (this "
                      "one is %s)", fname(top), cbt_image_format(top));
        return -1;
    }
    return 0;
}

/* ---- health ---- */

struct verdict {
    int kind;            /* -1: usable, else an enum cbt_drift */
    char *problem;       /* NULL when usable */
    uint64_t count;      /* usable: the union's dirty bytes */
    uint64_t granularity;/* of the top copy, 0 when absent */
};

static int judge(struct cbt_image *disk, const struct ckpt_rec *r,
                 struct verdict *out, struct cbt_error **errp)
{
    *out = (struct verdict){ .kind = -1 };
    struct cbt_chain_bitmap v;
    struct cbt_error *err = NULL;
    if (cbt_chain_bitmap_get(disk, r->name, 0, &v, &err) < 0) {
        if (cbt_error_errno(err) != ENOENT) {
            pass_error(errp, err);
            return -1;
        }
        cbt_error_free(err);
        out->kind = CBT_DRIFT_METADATA_WITHOUT_BITMAP;
        out->problem = cbt_strdup_printf(
            "no layer holds its bitmap (removed behind cbt's back?): the "
            "changes since the checkpoint are unknown");
    } else {
        if (!v.valid) {
            out->kind = v.reason == CBT_CHAIN_NOT_IN_TOP
                            ? CBT_DRIFT_METADATA_WITHOUT_BITMAP
                            : CBT_DRIFT_BITMAP_UNUSABLE;
            out->problem = strdup(v.message);
        } else if (v.granularity != r->granularity) {
            out->kind = CBT_DRIFT_MISMATCH;
            out->problem = cbt_strdup_printf(
                "its bitmap has granularity %" PRIu64 " but the checkpoint "
                "was created with %" PRIu64 ": the bitmap was replaced since, "
                "the changes since the checkpoint are unknown",
                v.granularity, r->granularity);
        } else {
            out->count = v.count;
        }
        out->granularity = v.granularity;
        cbt_chain_bitmap_clear(&v);
    }
    if (out->kind >= 0 && !out->problem) {
        oom(errp, disk);
        return -1;
    }
    return 0;
}

static int fill(struct cbt_image *disk, const struct ckpt_meta *m,
                const struct ckpt_rec *r, struct cbt_checkpoint *c,
                struct cbt_error **errp)
{
    memset(c, 0, sizeof(*c));
    c->order = r->order;
    c->created_sec = r->created_sec;
    c->created_nsec = r->created_nsec;
    c->virtual_size = r->virtual_size;
    c->granularity = r->granularity;
    c->name = strdup(r->name);
    const struct ckpt_rec *p = r->parent ? ckpt_find_order(m->v, m->n, r->parent)
                                         : NULL;
    if (p)
        c->parent = strdup(p->name);
    if (!c->name || (p && !c->parent)) {
        cbt_checkpoint_clear(c);
        oom(errp, disk);
        return -1;
    }
    struct verdict v;
    if (judge(disk, r, &v, errp) < 0) {
        cbt_checkpoint_clear(c);
        return -1;
    }
    c->usable = v.kind < 0;
    c->problem = v.problem;
    c->dirty_bytes = v.count;
    return 0;
}

/* ---- the API ---- */

int cbt_checkpoint_disk_id(struct cbt_image *disk, char id[37],
                           struct cbt_error **errp)
{
    id[0] = 0;
    struct ckpt_meta m;
    bool present;
    if (meta_load(disk, &m, &present, errp) < 0)
        return -1;
    if (present)
        uuid_str(m.uuid, id);
    ckpt_meta_free(&m);
    return 0;
}

int cbt_checkpoint_create(struct cbt_image *disk, const char *name,
                          uint64_t granularity, struct cbt_error **errp)
{
    if (!disk) {
        cbt_error_set(errp, EINVAL, "checkpoint create: no disk");
        return -1;
    }
    if (check_name(disk, name, errp) < 0 ||
        need_rw(disk, "create a checkpoint", errp) < 0)
        return -1;
    struct ckpt_meta m;
    bool present;
    if (meta_load(disk, &m, &present, errp) < 0)
        return -1;
    struct saved_ext saved = { 0 };
    struct cbt_bitmap_info *list = NULL;
    size_t n = 0, top_persistent = 0;
    int ret = -1;
    bool added = false;

    if (find_name(&m, name) >= 0) {
        cbt_error_set(errp, EEXIST, "%s: checkpoint '%s' already exists",
                      fname(disk), name);
        goto out;
    }
    int depth = 0;
    for (struct cbt_image *l = disk; l; l = cbt_image_backing(l), depth++) {
        if (cbt_bitmap_list(l, &list, &n, errp) < 0)
            goto out;
        bool clash = has_bitmap(l, name, list, n);
        if (depth == 0)
            for (size_t i = 0; i < n; i++)
                top_persistent += list[i].persistent;
        cbt_bitmap_info_free_list(list, n);
        list = NULL;
        n = 0;
        if (clash) {
            cbt_error_set(errp, EEXIST, "%s: a bitmap named '%s' already "
                          "exists in layer '%s' (depth %d); a checkpoint name "
                          "must differ from every bitmap of the chain",
                          fname(disk), name, fname(l), depth);
            goto out;
        }
    }
    if (!present) {
        if (new_uuid(disk, m.uuid, errp) < 0)
            goto out;
        m.next_order = 1;
    }
    if (save_ext(disk, &saved, errp) < 0)
        goto out;
    if (cbt_bitmap_add(disk, name, granularity, false, errp) < 0)
        goto out;
    added = true;
    if (cbt_bitmap_list(disk, &list, &n, errp) < 0)
        goto out;
    uint64_t gran = 0;
    for (size_t i = 0; i < n; i++)
        if (strcmp(list[i].name, name) == 0)
            gran = list[i].granularity;
    if (meta_append(&m, name, cbt_image_size(disk), gran) < 0) {
        oom(errp, disk);
        goto out;
    }
    /* A top without stored bitmaps gains the bitmaps extension (8-byte
     * header + 24 bytes) with this store. */
    if (meta_set(disk, &m, top_persistent ? 0 : 32, errp) < 0)
        goto out;
    ret = commit_top(disk, &saved, errp);
    added = false;
out:
    if (ret < 0 && added)
        undo(disk, &saved);
    cbt_bitmap_info_free_list(list, n);
    free(saved.buf);
    ckpt_meta_free(&m);
    return ret;
}

int cbt_checkpoint_list(struct cbt_image *disk, struct cbt_checkpoint **list,
                        size_t *count, struct cbt_error **errp)
{
    *list = NULL;
    *count = 0;
    struct ckpt_meta m;
    if (meta_load(disk, &m, NULL, errp) < 0)
        return -1;
    struct cbt_checkpoint *v = calloc(m.n ? m.n : 1, sizeof(*v));
    if (!v) {
        ckpt_meta_free(&m);
        oom(errp, disk);
        return -1;
    }
    size_t k = 0;
    for (; k < m.n; k++)
        if (fill(disk, &m, &m.v[k], &v[k], errp) < 0)
            break;
    int ret = k == m.n ? 0 : -1;
    if (ret < 0)
        cbt_checkpoint_free_list(v, k);
    else {
        *list = v;
        *count = k;
    }
    ckpt_meta_free(&m);
    return ret;
}

void cbt_checkpoint_clear(struct cbt_checkpoint *c)
{
    if (!c)
        return;
    free(c->name);
    free(c->parent);
    free(c->problem);
    memset(c, 0, sizeof(*c));
}

void cbt_checkpoint_free_list(struct cbt_checkpoint *list, size_t count)
{
    for (size_t i = 0; list && i < count; i++)
        cbt_checkpoint_clear(&list[i]);
    free(list);
}

int cbt_checkpoint_get(struct cbt_image *disk, const char *name,
                       struct cbt_checkpoint *out, struct cbt_error **errp)
{
    memset(out, 0, sizeof(*out));
    if (check_name(disk, name, errp) < 0)
        return -1;
    struct ckpt_meta m;
    if (meta_load(disk, &m, NULL, errp) < 0)
        return -1;
    ssize_t i = find_name(&m, name);
    int ret;
    if (i < 0) {
        cbt_error_set(errp, ENOENT, "%s: no checkpoint named '%s'", fname(disk),
                      name);
        ret = -1;
    } else {
        ret = fill(disk, &m, &m.v[i], out, errp);
    }
    ckpt_meta_free(&m);
    return ret;
}

/* Remove bitmap `names[0..n)` from every layer below the top that holds
 * them, each layer in one commit (reopened read-write). */
static int remove_below(struct cbt_image *disk, char *const *names, size_t n,
                        struct cbt_error **errp)
{
    int depth = 1;
    for (struct cbt_image *l = cbt_image_backing(disk); l;
         l = cbt_image_backing(l), depth++) {
        struct cbt_bitmap_info *list = NULL;
        size_t ln = 0;
        if (cbt_bitmap_list(l, &list, &ln, errp) < 0)
            return -1;
        bool any = false;
        for (size_t i = 0; i < n && !any; i++)
            any = has_bitmap(l, names[i], list, ln);
        if (!any) {
            cbt_bitmap_info_free_list(list, ln);
            continue;
        }
        int r = blk_reopen_rw(l, errp);
        for (size_t i = 0; i < n && r == 0; i++)
            if (has_bitmap(l, names[i], list, ln))
                r = cbt_bitmap_remove(l, names[i], errp);
        cbt_bitmap_info_free_list(list, ln);
        if (r == 0)
            r = cbt_bitmap_commit(l, errp);
        if (r == 0 && (r = cbt_image_flush(l)) < 0)
            cbt_error_set(errp, -r, "%s: cannot flush: %s", fname(l),
                          strerror(-r));
        if (r < 0) {
            cbt_bitmap_rollback(l, NULL);
            cbt_error_prefix(errp, "%s: the top layer is updated, but the "
                             "bitmap copies in layer '%s' (depth %d) could "
                             "not be removed (run the command again)",
                             fname(disk), fname(l), depth);
            return -1;
        }
    }
    return 0;
}

/* Remove names[0..n) from the top's bitmaps in memory (those it holds). */
static int remove_in_top(struct cbt_image *disk, char *const *names, size_t n,
                         struct cbt_error **errp)
{
    struct cbt_bitmap_info *list = NULL;
    size_t ln = 0;
    if (cbt_bitmap_list(disk, &list, &ln, errp) < 0)
        return -1;
    int r = 0;
    for (size_t i = 0; i < n && r == 0; i++)
        if (has_bitmap(disk, names[i], list, ln))
            r = cbt_bitmap_remove(disk, names[i], errp);
    cbt_bitmap_info_free_list(list, ln);
    return r;
}

int cbt_checkpoint_delete(struct cbt_image *disk, const char *name,
                          bool *existed, struct cbt_error **errp)
{
    *existed = false;
    if (check_name(disk, name, errp) < 0 ||
        need_rw(disk, "delete a checkpoint", errp) < 0)
        return -1;
    struct ckpt_meta m;
    bool present;
    if (meta_load(disk, &m, &present, errp) < 0)
        return -1;
    struct saved_ext saved = { 0 };
    int ret = -1;
    char *names[1] = { (char *)name };
    if (save_ext(disk, &saved, errp) < 0)
        goto out;
    ssize_t i = find_name(&m, name);
    *existed = i >= 0;
    if (remove_in_top(disk, names, 1, errp) < 0) {
        undo(disk, &saved);
        goto out;
    }
    if (i >= 0) {
        meta_remove(&m, (size_t)i);
        if (meta_set(disk, &m, 0, errp) < 0) {
            undo(disk, &saved);
            goto out;
        }
    }
    if (commit_top(disk, &saved, errp) < 0)
        goto out;
    ret = remove_below(disk, names, 1, errp);
out:
    free(saved.buf);
    ckpt_meta_free(&m);
    return ret;
}

/* ---- reconcile ---- */

struct items {
    struct cbt_drift_item *v;
    size_t n;
};

static int push_item(struct items *it, enum cbt_drift kind, const char *name,
                     char *explanation, char *fix, bool fixed)
{
    struct cbt_drift_item *v = realloc(it->v, (it->n + 1) * sizeof(*v));
    char *nm = strdup(name);
    if (!v || !nm || !explanation || !fix) {
        if (v)
            it->v = v;
        free(nm);
        free(explanation);
        free(fix);
        return -1;
    }
    it->v = v;
    it->v[it->n++] = (struct cbt_drift_item){
        .kind = kind, .name = nm, .explanation = explanation, .fix = fix,
        .fixed = fixed,
    };
    return 0;
}

void cbt_drift_free_list(struct cbt_drift_item *items, size_t count)
{
    for (size_t i = 0; items && i < count; i++) {
        free(items[i].name);
        free(items[i].explanation);
        free(items[i].fix);
    }
    free(items);
}

const char *cbt_drift_code(enum cbt_drift kind)
{
    switch (kind) {
    case CBT_DRIFT_BITMAP_WITHOUT_METADATA:
        return "bitmap-without-metadata";
    case CBT_DRIFT_METADATA_WITHOUT_BITMAP:
        return "metadata-without-bitmap";
    case CBT_DRIFT_BITMAP_UNUSABLE:
        return "bitmap-unusable";
    case CBT_DRIFT_MISMATCH:
        return "mismatch";
    case CBT_DRIFT_METADATA_CORRUPT:
        return "metadata-corrupt";
    }
    return "unknown";
}

struct names {
    char **v;
    size_t n;
};

static int names_push(struct names *s, const char *name)
{
    char **v = realloc(s->v, (s->n + 1) * sizeof(*v));
    if (!v)
        return -1;
    s->v = v;
    if (!(s->v[s->n] = strdup(name)))
        return -1;
    s->n++;
    return 0;
}

static void names_free(struct names *s)
{
    for (size_t i = 0; i < s->n; i++)
        free(s->v[i]);
    free(s->v);
}

static bool names_has(const struct names *s, const char *name)
{
    for (size_t i = 0; i < s->n; i++)
        if (strcmp(s->v[i], name) == 0)
            return true;
    return false;
}

int cbt_checkpoint_reconcile(struct cbt_image *disk, bool fix,
                             struct cbt_drift_item **items, size_t *count,
                             struct cbt_error **errp)
{
    *items = NULL;
    *count = 0;
    if (fix && need_rw(disk, "repair checkpoints", errp) < 0)
        return -1;
    struct items it = { 0 };
    struct names drop = { 0 }, known = { 0 };
    struct ckpt_meta m = { 0 };
    struct saved_ext saved = { 0 };
    struct cbt_chain_bitmap *chain = NULL;
    size_t nchain = 0;
    bool changed = false, present = false;
    int ret = -1;

    if (raw_load(disk, &saved.buf, &saved.len, &saved.present, errp) < 0)
        goto out;
    present = saved.present;
    if (present) {
        char why[256] = "";
        int r = ckpt_meta_parse(saved.buf, saved.len, &m, why, sizeof(why));
        if (r == -ENOMEM)
            goto nomem;
        if (r < 0) {
            ckpt_meta_free(&m);
            memset(&m, 0, sizeof(m));
            present = false;
            changed = fix;
            if (push_item(&it, CBT_DRIFT_METADATA_CORRUPT, "",
                          cbt_strdup_printf("the checkpoint metadata is "
                                            "corrupt (%s): no checkpoint of "
                                            "this disk can be trusted", why),
                          cbt_strdup_printf("replace it with empty metadata "
                                            "(a new disk id) and adopt the "
                                            "bitmaps as below"),
                          fix) < 0)
                goto nomem;
        }
    }
    if (!present) {
        if (fix && new_uuid(disk, m.uuid, errp) < 0)
            goto out;
        m.next_order = 1;
    }
    for (size_t i = 0; i < m.n; i++)
        if (names_push(&known, m.v[i].name) < 0)
            goto nomem;

    /* Checkpoints whose bitmap is missing or broken. */
    for (size_t i = 0; i < m.n;) {
        struct verdict v;
        if (judge(disk, &m.v[i], &v, errp) < 0)
            goto out;
        if (v.kind < 0) {
            i++;
            continue;
        }
        const char *what =
            v.kind == CBT_DRIFT_METADATA_WITHOUT_BITMAP
                ? "drop the checkpoint (and any copies of its bitmap below "
                  "the top)"
                : "drop the checkpoint and its bitmap in every layer";
        int r = push_item(&it, (enum cbt_drift)v.kind, m.v[i].name,
                          cbt_strdup_printf("checkpoint '%s': %s", m.v[i].name,
                                            v.problem),
                          cbt_strdup_printf("%s; a backup since it must be a "
                                            "full one", what),
                          fix);
        free(v.problem);
        if (r < 0)
            goto nomem;
        if (fix) {
            if (names_push(&drop, m.v[i].name) < 0)
                goto nomem;
            meta_remove(&m, i);
            changed = true;
        } else {
            i++;
        }
    }

    /* Bitmaps no checkpoint describes. */
    if (cbt_chain_bitmap_list(disk, 0, &chain, &nchain, errp) < 0)
        goto out;
    for (size_t i = 0; i < nchain; i++) {
        const struct cbt_chain_bitmap *b = &chain[i];
        if (names_has(&known, b->name))
            continue;
        bool top = b->nlayers && b->layers[0].present;
        if (b->valid && top) {
            char *expl = cbt_strdup_printf(
                "bitmap '%s' has no checkpoint metadata; it is recording and "
                "valid over the chain (%s)", b->name, b->message);
            char *how = cbt_strdup_printf(
                "adopt it as checkpoint '%s' (created: now; the changes it "
                "holds may reach back before that)", b->name);
            if (push_item(&it, CBT_DRIFT_BITMAP_WITHOUT_METADATA, b->name,
                          expl, how, fix) < 0)
                goto nomem;
            if (fix) {
                if (meta_append(&m, b->name, cbt_image_size(disk),
                                b->granularity) < 0)
                    goto nomem;
                changed = true;
            }
            continue;
        }
        char *expl = cbt_strdup_printf(
            "bitmap '%s' has no checkpoint metadata and cannot be adopted: %s",
            b->name, b->valid ? "the top layer lacks it" : b->message);
        char *how = cbt_strdup_printf(
            "none: left as it is (remove it with 'cbt bitmap --remove' in the "
            "layers holding it if it is not wanted)");
        if (push_item(&it, CBT_DRIFT_BITMAP_WITHOUT_METADATA, b->name, expl,
                      how, false) < 0)
            goto nomem;
    }

    if (fix && changed) {
        if (remove_in_top(disk, drop.v, drop.n, errp) < 0 ||
            meta_set(disk, &m, 0, errp) < 0) {
            undo(disk, &saved);
            goto out;
        }
        if (commit_top(disk, &saved, errp) < 0)
            goto out;
        if (remove_below(disk, drop.v, drop.n, errp) < 0)
            goto out;
    }
    *items = it.v;
    *count = it.n;
    it.v = NULL;
    it.n = 0;
    ret = 0;
    goto out;
nomem:
    oom(errp, disk);
out:
    cbt_drift_free_list(it.v, it.n);
    cbt_chain_bitmap_free_list(chain, nchain);
    names_free(&drop);
    names_free(&known);
    ckpt_meta_free(&m);
    free(saved.buf);
    return ret;
}

int cbt_checkpoint_copy_metadata(struct cbt_image *from, struct cbt_image *to,
                                 const char *const *skip, size_t nskip,
                                 struct cbt_error **errp)
{
    uint8_t *buf;
    size_t len;
    bool present;
    if (raw_load(from, &buf, &len, &present, errp) < 0)
        return -1;
    if (!present)
        return 0;
    int r;
    if (nskip == 0) {
        /* Byte for byte, even when it is corrupt (reconcile repairs it). */
        r = blk_ext_set(to, CKPT_EXT_TYPE, buf, len, errp);
        free(buf);
    } else {
        free(buf);
        struct ckpt_meta m;
        if (meta_load(from, &m, NULL, errp) < 0)
            return -1;
        for (size_t i = 0; i < nskip; i++) {
            ssize_t k = find_name(&m, skip[i]);
            if (k >= 0)
                meta_remove(&m, (size_t)k);
        }
        r = meta_set(to, &m, 0, errp);
        ckpt_meta_free(&m);
    }
    if (r < 0)
        cbt_error_prefix(errp, "cannot copy the checkpoint metadata of '%s'",
                         fname(from));
    return r;
}
