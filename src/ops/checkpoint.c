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
#include <zlib.h>

#include <cbt/bitmap.h>
#include <cbt/chain.h>
#include <cbt/checkpoint.h>

#include "../block/block.h"
#include "../util/util.h"
#include "checkpoint_meta.h"

_Static_assert(CKPT_NAME_MAX == CBT_CHECKPOINT_NAME_MAX,
               "checkpoint name limits differ");

/* ---- the binary layout (docs/checkpoints.md) ---- */

static uint32_t meta_crc(const uint8_t *buf, size_t len)
{
    uLong c = crc32(0L, Z_NULL, 0);
    c = crc32(c, buf, 4);
    c = crc32_z(c, buf + 8, len - 8);
    return (uint32_t)c;
}

void ckpt_meta_free(struct ckpt_meta *m)
{
    for (size_t i = 0; i < m->n; i++)
        free(m->v[i].name);
    free(m->v);
    m->v = NULL;
    m->n = 0;
}

static int cmp_name_ptr(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* The record of `order` among the first n records (sorted by order). */
static const struct ckpt_rec *find_order(const struct ckpt_rec *v, size_t n,
                                         uint64_t order)
{
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (v[mid].order == order)
            return &v[mid];
        if (v[mid].order < order)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

#define BAD(...) (snprintf(why, whylen, __VA_ARGS__), -EINVAL)

int ckpt_meta_parse(const uint8_t *buf, size_t len, struct ckpt_meta *m,
                    char *why, size_t whylen)
{
    memset(m, 0, sizeof(*m));
    if (len < CKPT_HEADER_SIZE)
        return BAD("%zu bytes, shorter than its %d-byte header", len,
                   CKPT_HEADER_SIZE);
    unsigned version = ldbe16(buf);
    if (version != CKPT_VERSION)
        return BAD("version %u (this cbt reads version %d)", version,
                   CKPT_VERSION);
    size_t hsize = ldbe16(buf + 2);
    if (hsize < CKPT_HEADER_SIZE || hsize > len)
        return BAD("header size %zu out of range (%d..%zu)", hsize,
                   CKPT_HEADER_SIZE, len);
    uint32_t stored = ldbe32(buf + 4), crc = meta_crc(buf, len);
    if (stored != crc)
        return BAD("checksum mismatch (stored 0x%08" PRIx32 ", computed 0x%08"
                   PRIx32 ")", stored, crc);
    uint32_t count = ldbe32(buf + 8), flags = ldbe32(buf + 12);
    if (flags)
        return BAD("unknown flags 0x%" PRIx32, flags);
    memcpy(m->uuid, buf + 16, 16);
    m->next_order = ldbe64(buf + 32);
    if (m->next_order == 0)
        return BAD("next order is 0");
    if ((len - hsize) / CKPT_RECORD_FIXED < count)
        return BAD("%" PRIu32 " checkpoints cannot fit in %zu bytes", count,
                   len);
    m->v = calloc(count ? count : 1, sizeof(*m->v));
    if (!m->v)
        return -ENOMEM;
    size_t pos = hsize;
    for (uint32_t i = 0; i < count; i++) {
        if (len - pos < CKPT_RECORD_FIXED)
            return BAD("checkpoint %" PRIu32 " is truncated", i + 1);
        const uint8_t *p = buf + pos;
        struct ckpt_rec r = {
            .order = ldbe64(p),
            .created_sec = (int64_t)ldbe64(p + 8),
            .created_nsec = ldbe32(p + 16),
            .parent = ldbe64(p + 24),
            .virtual_size = ldbe64(p + 32),
            .granularity = ldbe64(p + 40),
        };
        uint32_t rflags = ldbe32(p + 20);
        size_t nlen = ldbe16(p + 48);
        pos += CKPT_RECORD_FIXED;
        if (nlen == 0 || nlen > CKPT_NAME_MAX)
            return BAD("checkpoint %" PRIu32 ": name length %zu out of range "
                       "(1..%d)", i + 1, nlen, CKPT_NAME_MAX);
        if (len - pos < nlen)
            return BAD("checkpoint %" PRIu32 " is truncated", i + 1);
        if (memchr(buf + pos, 0, nlen))
            return BAD("checkpoint %" PRIu32 ": the name holds a NUL byte",
                       i + 1);
        r.name = strndup((const char *)buf + pos, nlen);
        if (!r.name)
            return -ENOMEM;
        pos += nlen;
        m->v[m->n++] = r;
        const char *nm = r.name;
        if (rflags)
            return BAD("checkpoint '%s': unknown flags 0x%" PRIx32, nm, rflags);
        if (r.order == 0 || r.order >= m->next_order)
            return BAD("checkpoint '%s': order %" PRIu64 " out of range "
                       "(1..%" PRIu64 ")", nm, r.order, m->next_order - 1);
        if (i > 0 && r.order <= m->v[i - 1].order)
            return BAD("checkpoint '%s': order %" PRIu64 " is not above the "
                       "previous one's (%" PRIu64 ")", nm, r.order,
                       m->v[i - 1].order);
        if (r.created_nsec >= 1000000000u)
            return BAD("checkpoint '%s': nanoseconds %" PRIu32 " out of range",
                       nm, r.created_nsec);
        if (!IS_POW2(r.granularity) || r.granularity < 512 ||
            r.granularity > (1ull << 31))
            return BAD("checkpoint '%s': granularity %" PRIu64 " is not a "
                       "power of two from 512 to 2G", nm, r.granularity);
        if (r.parent && !find_order(m->v, i, r.parent))
            return BAD("checkpoint '%s': parent order %" PRIu64 " is not an "
                       "older checkpoint", nm, r.parent);
    }
    if (pos != len)
        return BAD("%zu bytes after the last checkpoint", len - pos);
    if (m->n > 1) {
        char **names = malloc(m->n * sizeof(*names));
        if (!names)
            return -ENOMEM;
        for (size_t i = 0; i < m->n; i++)
            names[i] = m->v[i].name;
        qsort(names, m->n, sizeof(*names), cmp_name_ptr);
        for (size_t i = 1; i < m->n; i++) {
            if (strcmp(names[i], names[i - 1]) == 0) {
                int r = BAD("two checkpoints are named '%s'", names[i]);
                free(names);
                return r;
            }
        }
        free(names);
    }
    return 0;
}

int ckpt_meta_build(const struct ckpt_meta *m, uint8_t **out, size_t *outlen)
{
    size_t len = CKPT_HEADER_SIZE;
    for (size_t i = 0; i < m->n; i++) {
        size_t nlen = strlen(m->v[i].name);
        if (nlen == 0 || nlen > CKPT_NAME_MAX)
            return -EINVAL;
        len += CKPT_RECORD_FIXED + nlen;
    }
    if (m->n > UINT32_MAX)
        return -EINVAL;
    uint8_t *buf = calloc(1, len);
    if (!buf)
        return -ENOMEM;
    stbe16(buf, CKPT_VERSION);
    stbe16(buf + 2, CKPT_HEADER_SIZE);
    stbe32(buf + 8, (uint32_t)m->n);
    stbe32(buf + 12, 0);
    memcpy(buf + 16, m->uuid, 16);
    stbe64(buf + 32, m->next_order);
    size_t pos = CKPT_HEADER_SIZE;
    for (size_t i = 0; i < m->n; i++) {
        const struct ckpt_rec *r = &m->v[i];
        uint8_t *p = buf + pos;
        size_t nlen = strlen(r->name);
        stbe64(p, r->order);
        stbe64(p + 8, (uint64_t)r->created_sec);
        stbe32(p + 16, r->created_nsec);
        stbe32(p + 20, 0);
        stbe64(p + 24, r->parent);
        stbe64(p + 32, r->virtual_size);
        stbe64(p + 40, r->granularity);
        stbe16(p + 48, (uint16_t)nlen);
        memcpy(p + CKPT_RECORD_FIXED, r->name, nlen);
        pos += CKPT_RECORD_FIXED + nlen;
    }
    stbe32(buf + 4, meta_crc(buf, len));
    *out = buf;
    *outlen = len;
    return 0;
}

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
 * with *errp.  Two or more copies of it are an error, unless dup is given:
 * then *dup is set and the metadata counts as absent. */
static int raw_load(struct cbt_image *top, uint8_t **buf, size_t *len,
                    bool *present, bool *dup, struct cbt_error **errp)
{
    *buf = NULL;
    *len = 0;
    int r = blk_ext_get(top, CKPT_EXT_TYPE, buf, len);
    *present = r == 0;
    if (dup)
        *dup = r == -ENOTUNIQ;
    if (r == -ENOENT || r == -ENOTSUP || (r == -ENOTUNIQ && dup))
        return 0;
    if (r == -ENOTUNIQ) {
        cbt_error_set(errp, EINVAL, "%s: the image header holds more than "
                      "one checkpoint metadata extension (type 0x%08x); cbt "
                      "writes one, and which copy is current cannot be "
                      "told, so no checkpoint of this disk is used or "
                      "changed; 'cbt checkpoint reconcile --fix' replaces "
                      "them with new metadata", fname(top), CKPT_EXT_TYPE);
        return -1;
    }
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
    if (raw_load(top, &buf, &len, &have, NULL, errp) < 0)
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

/* Drop record i; its children get its parent. */
static void meta_remove(struct ckpt_meta *m, size_t i)
{
    uint64_t order = m->v[i].order, parent = m->v[i].parent;
    for (size_t j = 0; j < m->n; j++)
        if (m->v[j].parent == order)
            m->v[j].parent = parent;
    free(m->v[i].name);
    memmove(&m->v[i], &m->v[i + 1], (m->n - i - 1) * sizeof(*m->v));
    m->n--;
}

/* Append a record made now (the newest checkpoint becomes its parent).
 * Takes a copy of name.  0, -ENOMEM, or -EOVERFLOW when the orders are
 * used up: next_order must stay above every order, so the last one a
 * record can take is UINT64_MAX - 1. */
static int meta_append(struct ckpt_meta *m, const char *name,
                       uint64_t virtual_size, uint64_t granularity)
{
    if (m->next_order == UINT64_MAX)
        return -EOVERFLOW;
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

/* The error for a failed meta_append of checkpoint `name`. */
static void orders_error(struct cbt_error **errp, struct cbt_image *top,
                         const char *name, const struct ckpt_meta *m, int r)
{
    if (r != -EOVERFLOW) {
        oom(errp, top);
        return;
    }
    cbt_error_set(errp, EOVERFLOW, "%s: cannot create checkpoint '%s': the "
                  "checkpoint metadata's next order is %" PRIu64 ", the "
                  "largest there is, so no new checkpoint can be numbered "
                  "(was the metadata altered?)", fname(top), name,
                  m->next_order);
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
    return raw_load(top, &s->buf, &s->len, &s->present, NULL, errp);
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
    const struct ckpt_rec *p = r->parent ? find_order(m->v, m->n, r->parent)
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
    if (present && m.next_order == UINT64_MAX) {
        orders_error(errp, disk, name, &m, -EOVERFLOW);
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
    int r = meta_append(&m, name, cbt_image_size(disk), gran);
    if (r < 0) {
        orders_error(errp, disk, name, &m, r);
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

    bool dup = false;
    if (raw_load(disk, &saved.buf, &saved.len, &saved.present, &dup,
                 errp) < 0)
        goto out;
    present = saved.present;
    if (dup) {
        /* Readers took the first copy, writers changed the last: neither
         * can be trusted.  The fix replaces them all with one (a failed
         * fix may leave none: then a full backup is needed, never a
         * wrong incremental). */
        changed = fix;
        if (push_item(&it, CBT_DRIFT_METADATA_CORRUPT, "",
                      cbt_strdup_printf("the image header holds more than "
                                        "one checkpoint metadata extension: "
                                        "which is current cannot be told, "
                                        "so no checkpoint of this disk can "
                                        "be trusted"),
                      cbt_strdup_printf("replace them with one, empty "
                                        "(a new disk id), and adopt the "
                                        "bitmaps as below"),
                      fix) < 0)
            goto nomem;
    }
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
                int r = meta_append(&m, b->name, cbt_image_size(disk),
                                    b->granularity);
                if (r < 0) {
                    orders_error(errp, disk, b->name, &m, r);
                    goto out;
                }
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
    if (raw_load(from, &buf, &len, &present, NULL, errp) < 0)
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
