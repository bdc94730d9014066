/*
 * Dirty bitmaps of a node: the in-memory model, the write path that dirties
 * them, and the public API of include/cbt/bitmap.h with QEMU's semantics and
 * messages (FORMATS.md §3.1, §3.3).
 *
 * Model
 * -----
 * A node (an open image) owns a list of struct blk_bitmap, in the order of
 * the image's bitmap directory, guarded by node->lock like the rest of the
 * node's metadata.  The format driver fills the list when it opens the image
 * (qcow2: src/formats/qcow2/bitmap_ext.c); after that only this file changes it.
 * A bitmap is in one of these states (DESIGN.md §5):
 *
 *   recording     writes dirty it ('auto' on disk);
 *   disabled      writes do not;
 *   inconsistent  found in_use at open: bm is NULL, it never records, and
 *                 only remove is allowed;
 *   busy          held by a job or an export (not set by anything yet):
 *                 neither removed nor modified nor used by others.
 *
 * A persistent bitmap on a read-only node is "readonly" (QEMU's term): it
 * cannot be removed, cleared, merged into or renamed.
 *
 * Bits are read from the image lazily (block.h, struct blk_bitmap, "Lazy
 * bits"): the driver checks every table at open and leaves each bitmap
 * on_disk; counts and hashes stream it through driver->bitmap_read, a
 * merge streams a source of the same node into its target, and whatever
 * changes or keeps bits loads them (blk_bitmap_load, the first write for
 * the recording ones).  disk_key says a bitmap's bits are still those of
 * a table in the image, which a store then keeps instead of rewriting.
 *
 * Commit and rollback
 * -------------------
 * API changes live in memory.  cbt_bitmap_commit() hands the whole list to
 * the driver, which stores every persistent bitmap in one atomic update (for
 * qcow2, one header write); close commits too.  Before the first write
 * after a store the driver's mark_dirty hook marks the recording bitmaps
 * in_use on disk, so that a crash leaves them inconsistent, never stale.  The node keeps a copy
 * of the list as of the last commit (or open), `committed` (bm_copy shares
 * the bits until either side changes a page: no second copy of a large
 * bitmap);
 * cbt_bitmap_rollback() makes the live list a copy of it again.  The data
 * path dirties the recording bitmaps of both lists, so rolling back an
 * operation never forgets a guest write: a bitmap that was recording at the
 * last commit comes back with every write made since.
 *
 * Locking: every function here takes node->lock, except those named as
 * called with it held (blk_mark_dirty, the driver helpers).  The extents
 * callback runs without any lock on a private copy of the bitmap, so it may
 * call back into the library.  A merge between two nodes copies the source
 * under the source's lock, then merges under the target's: no two node
 * locks are ever held together here.
 */
#include <inttypes.h>
#include <stdio.h>

#include <cbt/bitmap.h>

#include "block.h"

#define BITMAP_MAX_NAME 1023           /* bytes, as QEMU */
#define DEFAULT_GRANULARITY (64u * 1024)
#define DEFAULT_GRANULARITY_MIN (4u * 1024)

/* Checks before an operation (QEMU's bdrv_dirty_bitmap_check flags). */
#define CHECK_BUSY (1u << 0)
#define CHECK_RO (1u << 1)
#define CHECK_INCONSISTENT (1u << 2)
#define CHECK_DEFAULT (CHECK_BUSY | CHECK_RO | CHECK_INCONSISTENT)
#define CHECK_ALLOW_RO (CHECK_BUSY | CHECK_INCONSISTENT)

/* ---- lists ---- */

static void entry_clear(struct blk_bitmap *b)
{
    free(b->name);
    bm_free(b->bm);
    memset(b, 0, sizeof(*b));
}

static void list_clear(struct blk_bitmap_list *l)
{
    for (size_t i = 0; i < l->n; i++)
        entry_clear(&l->v[i]);
    free(l->v);
    l->v = NULL;
    l->n = l->cap = 0;
}

/* Deep copy of src into *dst (which is overwritten, not freed). */
static int list_copy(struct blk_bitmap_list *dst,
                     const struct blk_bitmap_list *src)
{
    struct blk_bitmap_list l = { NULL, 0, src->n };
    if (src->n) {
        l.v = calloc(src->n, sizeof(*l.v));
        if (!l.v)
            return -ENOMEM;
    }
    for (; l.n < src->n; l.n++) {
        const struct blk_bitmap *s = &src->v[l.n];
        struct blk_bitmap *d = &l.v[l.n];
        *d = *s;
        d->name = strdup(s->name);
        d->bm = s->bm ? bm_copy(s->bm) : NULL;
        if (!d->name || (s->bm && !d->bm)) {
            l.n++;
            list_clear(&l);
            return -ENOMEM;
        }
    }
    *dst = l;
    return 0;
}

static int list_append(struct blk_bitmap_list *l, const struct blk_bitmap *b)
{
    if (l->n == l->cap) {
        size_t cap = l->cap ? 2 * l->cap : 8;
        struct blk_bitmap *v = realloc(l->v, cap * sizeof(*v));
        if (!v)
            return -ENOMEM;
        l->v = v;
        l->cap = cap;
    }
    l->v[l->n++] = *b;
    return 0;
}

static void list_remove(struct blk_bitmap_list *l, size_t i)
{
    entry_clear(&l->v[i]);
    memmove(&l->v[i], &l->v[i + 1], (l->n - i - 1) * sizeof(l->v[0]));
    l->n--;
}

static struct blk_bitmap *list_find(const struct blk_bitmap_list *l,
                                    const char *name)
{
    for (size_t i = 0; i < l->n; i++)
        if (strcmp(l->v[i].name, name) == 0)
            return &l->v[i];
    return NULL;
}

/* Dirty [off, off+len) in the recording bitmaps of l.  The first write
 * after open loads those still on disk (struct blk_bitmap, "Lazy bits");
 * if that fails, the write must not go ahead. */
static int list_mark_dirty(struct blk_node *node, struct blk_bitmap_list *l,
                           uint64_t off, uint64_t len, bool *any)
{
    for (size_t i = 0; i < l->n; i++) {
        struct blk_bitmap *b = &l->v[i];
        if (!b->recording)
            continue;
        if (b->on_disk) {
            struct cbt_error *err = NULL;
            if (blk_bitmap_load(node, b, &err) < 0) {
                cbt_debug("%s", cbt_error_message(err));
                int e = cbt_error_errno(err);
                cbt_error_free(err);
                return -(e ? e : EIO);
            }
        }
        if (b->bm) {
            bm_set(b->bm, off, len);
            blk_bitmap_changed(b);
            *any = true;
        }
    }
    return 0;
}

/* ---- for the data path and the drivers (node->lock held) ---- */

int blk_mark_dirty(struct blk_node *node, uint64_t off, uint64_t len)
{
    bool any = false;
    int r = list_mark_dirty(node, &node->bitmaps, off, len, &any);
    if (r == 0)
        r = list_mark_dirty(node, &node->committed, off, len, &any);
    if (any)
        node->bitmaps_written = true;
    if (r < 0)
        return r;
    if (node->drv->mark_dirty)
        return node->drv->mark_dirty(node, off, len);
    return 0;
}

int blk_bitmap_append(struct blk_node *node, const struct blk_bitmap *b)
{
    return list_append(&node->bitmaps, b);
}

struct blk_bitmap *blk_bitmap_find(struct blk_node *node, const char *name)
{
    return list_find(&node->bitmaps, name);
}

static int load_chunk(void *opaque, uint64_t chunk, uint64_t chunk_bytes,
                      const uint8_t *buf, bool ones)
{
    struct bm_bitmap *bm = opaque;
    if (buf)
        bm_deserialize_chunk(bm, chunk, chunk_bytes, buf);
    else if (ones)
        bm_deserialize_fill(bm, chunk, chunk_bytes, true);
    return 0;
}

/* A new bitmap holding the bits of on_disk b, read from the image. */
static struct bm_bitmap *read_bits(struct blk_node *node,
                                   const struct blk_bitmap *b,
                                   struct cbt_error **errp)
{
    struct bm_bitmap *bm = bm_new(node->size, b->granularity);
    if (!bm) {
        cbt_error_set(errp, errno, "%s: cannot create bitmap '%s': %s",
                      node->filename, b->name, strerror(errno));
        return NULL;
    }
    if (!node->drv->bitmap_read) {
        cbt_error_set(errp, ENOTSUP, "%s: bitmap '%s': the driver cannot "
                      "read bitmaps", node->filename, b->name);
        bm_free(bm);
        return NULL;
    }
    int r = node->drv->bitmap_read(node, b, load_chunk, bm, errp);
    if (r != 0) {
        bm_free(bm);
        return NULL;
    }
    return bm;
}

int blk_bitmap_load(struct blk_node *node, struct blk_bitmap *b,
                    struct cbt_error **errp)
{
    if (!b->on_disk)
        return 0;
    struct bm_bitmap *bm = read_bits(node, b, errp);
    if (!bm)
        return -1;
    b->bm = bm;
    b->on_disk = false; /* disk_key stays: the bits are the image's */
    /* Its twin in the other list (live or rollback point) has the same
     * bits: share the pages rather than read them again. */
    struct blk_bitmap_list *lists[] = {&node->bitmaps, &node->committed};
    for (size_t l = 0; l < 2; l++) {
        for (size_t i = 0; i < lists[l]->n; i++) {
            struct blk_bitmap *t = &lists[l]->v[i];
            if (t->on_disk && t->disk_key == b->disk_key &&
                t->granularity == b->granularity &&
                (t->bm = bm_copy(bm)) != NULL)
                t->on_disk = false;
        }
    }
    return 0;
}

int blk_bitmap_set(struct blk_node *node, struct blk_bitmap *b, uint64_t off,
                   uint64_t len, struct cbt_error **errp)
{
    if (blk_bitmap_load(node, b, errp) < 0)
        return -1;
    if (b->bm) {
        bm_set(b->bm, off, len);
        blk_bitmap_changed(b);
        /* A change of the live list, like the API's: without it a store
         * with nothing else changed would skip the image altogether. */
        node->bitmaps_changed = true;
    }
    return 0;
}

/* Load every on_disk bitmap of l. */
static int list_load(struct blk_node *node, struct blk_bitmap_list *l,
                     struct cbt_error **errp)
{
    for (size_t i = 0; i < l->n; i++)
        if (blk_bitmap_load(node, &l->v[i], errp) < 0)
            return -1;
    return 0;
}

int blk_bitmaps_snapshot(struct blk_node *node)
{
    struct blk_bitmap_list copy;
    int r = list_copy(&copy, &node->bitmaps);
    if (r < 0)
        return r;
    list_clear(&node->committed);
    node->committed = copy;
    node->bitmaps_changed = false;
    node->bitmaps_written = false;
    return 0;
}

void blk_bitmaps_free(struct blk_node *node)
{
    list_clear(&node->bitmaps);
    list_clear(&node->committed);
}

/* ---- errors ---- */

static void PRINTF_FMT(4, 5) set_error(struct cbt_error **errp,
                                       const struct cbt_image *img, int errnum,
                                       const char *fmt, ...)
{
    char *msg = NULL;
    va_list ap;
    va_start(ap, fmt);
    int n = vasprintf(&msg, fmt, ap);
    va_end(ap);
    if (n < 0)
        msg = NULL;
    cbt_error_set(errp, errnum, "%s: %s", img->filename,
                  msg ? msg : "out of memory formatting an error");
    free(msg);
}

/* QEMU's bdrv_dirty_bitmap_check. */
static int check_bitmap(struct cbt_image *img, const struct blk_bitmap *b,
                        unsigned flags, struct cbt_error **errp)
{
    if ((flags & CHECK_BUSY) && b->busy) {
        set_error(errp, img, EBUSY, "Bitmap '%s' is currently in use by "
                  "another operation and cannot be used", b->name);
        return -1;
    }
    if ((flags & CHECK_RO) && b->persistent && img->read_only) {
        set_error(errp, img, EROFS,
                  "Bitmap '%s' is readonly and cannot be modified", b->name);
        return -1;
    }
    if ((flags & CHECK_INCONSISTENT) && b->inconsistent &&
        img->shared_with_writer) {
        set_error(errp, img, EBUSY, "Bitmap '%s' is in use by the process "
                  "holding the image open for writing (-U): its contents are "
                  "in that process, not in the file", b->name);
        cbt_error_set_kind(errp, CBT_ERR_IN_USE);
        return -1;
    }
    if ((flags & CHECK_INCONSISTENT) && b->inconsistent) {
        set_error(errp, img, EINVAL,
                  "Bitmap '%s' is inconsistent and cannot be used", b->name);
        cbt_error_set_remedy(errp, CBT_REMEDY_REMOVE_BITMAP);
        return -1;
    }
    return 0;
}

static bool valid_image(struct cbt_image *img, struct cbt_error **errp)
{
    if (!img) {
        cbt_error_set(errp, EINVAL, "no image given");
        return false;
    }
    return true;
}

/* A name argument: present and not empty. */
static bool valid_name(struct cbt_image *img, const char *name,
                       struct cbt_error **errp)
{
    if (!name || !*name) {
        set_error(errp, img, EINVAL, "Bitmap name cannot be empty");
        return false;
    }
    return true;
}

/* Find a bitmap by name (lock held). */
static struct blk_bitmap *lookup(struct cbt_image *img, const char *name,
                                 struct cbt_error **errp)
{
    struct blk_bitmap *b = list_find(&img->bitmaps, name);
    if (!b)
        set_error(errp, img, ENOENT, "Dirty bitmap '%s' not found", name);
    return b;
}

static size_t index_of(const struct cbt_image *img, const struct blk_bitmap *b)
{
    return (size_t)(b - img->bitmaps.v);
}

/* ---- bits on disk (node->lock held) ---- */

/*
 * Reading an on_disk bitmap out without loading it: the chunks the driver
 * streams are the bitmap's serialized bit stream, so counting and hashing
 * need no bitmap in memory, only one chunk at a time (what QEMU's
 * qemu-nbd -B holds is every bitmap of the image).
 */
struct stream_state {
    uint64_t nbits;       /* bits of the bitmap */
    uint64_t set;         /* count: set bits seen */
    struct sha256_ctx *sha; /* sha256: hash the stream too */
    uint8_t *fill;        /* a chunk of clean or dirty bytes, lazily */
    int fill_byte;        /* what *fill holds, -1 if nothing */
};

static int stream_chunk(void *opaque, uint64_t chunk, uint64_t chunk_bytes,
                        const uint8_t *buf, bool ones)
{
    struct stream_state *st = opaque;
    uint64_t first = chunk * chunk_bytes * 8;
    if (first >= st->nbits)
        return 0;
    uint64_t n = MIN(chunk_bytes * 8, st->nbits - first); /* bits */
    if (!buf && st->sha) {
        int want = ones ? 0xff : 0;
        if (!st->fill) {
            st->fill = malloc(chunk_bytes);
            if (!st->fill)
                return -ENOMEM;
        }
        if (st->fill_byte != want) {
            memset(st->fill, want, chunk_bytes);
            st->fill_byte = want;
        }
        buf = st->fill;
    }
    if (!buf) {
        st->set += ones ? n : 0;
        return 0;
    }
    uint64_t whole = n / 64, set = 0;
    for (uint64_t w = 0; w < whole; w++) {
        uint64_t v;
        memcpy(&v, buf + 8 * w, 8);
        set += (uint64_t)__builtin_popcountll(v);
    }
    /* The bits past the bitmap's end in the last byte are not its own:
     * neither counted nor hashed (the stream has them zero). */
    uint8_t last = 0;
    for (uint64_t i = whole * 64; i < n; i++) {
        unsigned bit = (buf[i / 8] >> (i % 8)) & 1;
        set += bit;
        if (i / 8 == (n - 1) / 8)
            last |= (uint8_t)(bit << (i % 8));
    }
    st->set += set;
    if (st->sha) {
        uint64_t bytes = DIV_ROUND_UP(n, 8);
        if (n % 8) {
            sha256_update(st->sha, buf, (size_t)(bytes - 1));
            sha256_update(st->sha, &last, 1);
        } else {
            sha256_update(st->sha, buf, (size_t)bytes);
        }
    }
    return 0;
}

/* Stream on_disk b through st (node->lock held). */
static int stream_bits(struct blk_node *node, const struct blk_bitmap *b,
                       struct stream_state *st, struct cbt_error **errp)
{
    st->nbits = DIV_ROUND_UP(node->size, b->granularity);
    st->fill_byte = -1;
    int r = node->drv->bitmap_read
                ? node->drv->bitmap_read(node, b, stream_chunk, st, errp)
                : -ENOTSUP;
    free(st->fill);
    st->fill = NULL;
    if (r > 0 || r < -1) /* from stream_chunk, or no reader */
        cbt_error_set(errp, r < 0 ? -r : EIO, "%s: cannot read bitmap '%s': "
                      "%s", node->filename, b->name,
                      strerror(r < 0 ? -r : EIO));
    return r ? -1 : 0;
}

/* Dirty bytes of b (whole granules), on_disk or not (node->lock held).
 * An on_disk bitmap is counted once: listing twice reads it once. */
static int bits_count(struct blk_node *node, struct blk_bitmap *b,
                      uint64_t *count, struct cbt_error **errp)
{
    if (!b->on_disk) {
        *count = b->bm ? bm_count(b->bm) : 0;
        return 0;
    }
    if (!b->counted) {
        struct stream_state st = {0};
        if (stream_bits(node, b, &st, errp) < 0)
            return -1;
        b->disk_count = st.set << __builtin_ctzll(b->granularity);
        b->counted = true;
    }
    *count = b->disk_count;
    return 0;
}

/* A private copy of b's bits: shares pages with a loaded bitmap, is read
 * from the image for an on_disk one (node->lock held). */
static struct bm_bitmap *bits_copy(struct blk_node *node,
                                   const struct blk_bitmap *b,
                                   struct cbt_error **errp)
{
    if (b->on_disk)
        return read_bits(node, b, errp);
    struct bm_bitmap *copy = bm_copy(b->bm);
    if (!copy)
        set_error(errp, node, ENOMEM, "out of memory copying bitmap '%s'",
                  b->name);
    return copy;
}

/* ---- resize (node->lock held) ---- */

int blk_bitmaps_resize_check(struct blk_node *node, struct cbt_error **errp)
{
    for (size_t i = 0; i < node->bitmaps.n; i++)
        if (check_bitmap(node, &node->bitmaps.v[i], CHECK_DEFAULT, errp) < 0)
            return -1;
    /* A resize rewrites the tables on disk (qcow2 grows them): every bit
     * must be in memory first, the rollback point's too. */
    if (list_load(node, &node->bitmaps, errp) < 0 ||
        list_load(node, &node->committed, errp) < 0)
        return -1;
    return 0;
}

static void resize_list(struct blk_bitmap_list *l, uint64_t size)
{
    for (size_t i = 0; i < l->n; i++) {
        struct blk_bitmap *b = &l->v[i];
        if (!b->bm || bm_size(b->bm) == size)
            continue;
        blk_bitmap_changed(b);
        if (bm_resize(b->bm, size) == 0)
            continue;
        /* Out of memory: a wholly dirty bitmap of the new size needs no
         * pages, and errs on the safe side.  Failing that, the bitmap can
         * no longer be trusted. */
        struct bm_bitmap *n = bm_new(size, b->granularity);
        bm_free(b->bm);
        b->bm = n;
        if (n) {
            bm_set(n, 0, size);
        } else {
            b->inconsistent = true;
            b->recording = false;
        }
    }
}

void blk_bitmaps_resized(struct blk_node *node)
{
    resize_list(&node->bitmaps, node->size);
    resize_list(&node->committed, node->size);
}

/* ---- the public API ---- */

int cbt_bitmap_list(struct cbt_image *img, struct cbt_bitmap_info **list,
                    size_t *count, struct cbt_error **errp)
{
    if (!valid_image(img, errp))
        return -1;
    if (!list || !count) {
        set_error(errp, img, EINVAL, "no place given for the bitmap list");
        return -1;
    }
    *list = NULL;
    *count = 0;
    pthread_mutex_lock(&img->lock);
    size_t n = img->bitmaps.n;
    struct cbt_bitmap_info *v = calloc(n ? n : 1, sizeof(*v));
    size_t i = 0;
    int cr = 0;
    for (; v && i < n; i++) {
        struct blk_bitmap *b = &img->bitmaps.v[i];
        uint64_t dirty = 0;
        if (bits_count(img, b, &dirty, errp) < 0) {
            cr = -1;
            break;
        }
        v[i] = (struct cbt_bitmap_info){
            .name = strdup(b->name),
            .granularity = b->granularity,
            .recording = b->recording,
            .persistent = b->persistent,
            .in_use = b->in_use,
            .auto_flag = b->disk_auto,
            .inconsistent = b->inconsistent,
            .busy = b->busy,
            .count = dirty,
            .disk_bytes = b->disk_bytes,
        };
        if (!v[i].name)
            break;
    }
    pthread_mutex_unlock(&img->lock);
    if (!v || i < n) {
        cbt_bitmap_info_free_list(v, n);
        if (cr == 0)
            set_error(errp, img, ENOMEM, "out of memory listing bitmaps");
        return -1;
    }
    *list = v;
    *count = n;
    return 0;
}

void cbt_bitmap_info_free_list(struct cbt_bitmap_info *list, size_t count)
{
    for (size_t i = 0; list && i < count; i++)
        free(list[i].name);
    free(list);
}

/* QEMU's bdrv_get_default_bitmap_granularity. */
static uint64_t default_granularity(const struct cbt_image *img)
{
    if (!img->cluster_size)
        return DEFAULT_GRANULARITY;
    return MIN(MAX(img->cluster_size, DEFAULT_GRANULARITY_MIN),
               DEFAULT_GRANULARITY);
}

int cbt_bitmap_add(struct cbt_image *img, const char *name,
                   uint64_t granularity, bool disabled,
                   struct cbt_error **errp)
{
    if (!valid_image(img, errp) || !valid_name(img, name, errp))
        return -1;
    if (granularity != 0 &&
        (granularity < BM_MIN_GRANULARITY || !IS_POW2(granularity))) {
        set_error(errp, img, EINVAL,
                  "Granularity must be power of 2 and at least 512");
        return -1;
    }
    int ret = -1;
    pthread_mutex_lock(&img->lock);
    if (granularity == 0)
        granularity = default_granularity(img); /* a reopen sets the
                                                 * cluster size */
    /* As QEMU 7.2: a duplicate first, then the driver's can-store check
     * (whose refusals name the bitmap and the image). */
    if (list_find(&img->bitmaps, name)) {
        set_error(errp, img, EEXIST, "Bitmap already exists: %s", name);
        goto out;
    }
    if (!img->drv->bitmap_can_store || !img->drv->bitmap_store) {
        cbt_error_set(errp, ENOTSUP, "Can't store persistent bitmaps to '%s': "
                      "Operation not supported (%s images cannot hold "
                      "persistent bitmaps; use qcow2)", img->filename,
                      img->drv->name);
        goto out;
    }
    if (img->read_only) {
        cbt_error_set(errp, EROFS, "Can't make bitmap '%s' persistent in '%s': "
                      "the image is opened read-only", name, img->filename);
        goto out;
    }
    if (img->drv->bitmap_can_store(img, name, granularity, errp) < 0)
        goto out;
    if (strlen(name) > BITMAP_MAX_NAME) {
        set_error(errp, img, EINVAL, "Bitmap name too long: %s", name);
        goto out;
    }
    struct blk_bitmap b = {
        .name = strdup(name),
        .bm = bm_new(img->size, granularity),
        .granularity = granularity,
        .recording = !disabled,
        .persistent = true,
    };
    if (!b.name || !b.bm || list_append(&img->bitmaps, &b) < 0) {
        int e = b.bm ? ENOMEM : errno;
        free(b.name);
        bm_free(b.bm);
        set_error(errp, img, e, "cannot create bitmap '%s': %s", name,
                  strerror(e));
        goto out;
    }
    img->bitmaps_changed = true;
    ret = 0;
out:
    pthread_mutex_unlock(&img->lock);
    return ret;
}

/* Common frame of the single-bitmap operations: validate, lock, look up,
 * check, apply, unlock. */
enum simple_op { OP_REMOVE, OP_CLEAR, OP_ENABLE, OP_DISABLE };

static int simple_op(struct cbt_image *img, const char *name, enum simple_op op,
                     struct cbt_error **errp)
{
    static const unsigned checks[] = {
        [OP_REMOVE] = CHECK_BUSY | CHECK_RO,
        [OP_CLEAR] = CHECK_DEFAULT,
        [OP_ENABLE] = CHECK_ALLOW_RO,
        [OP_DISABLE] = CHECK_ALLOW_RO,
    };
    if (!valid_image(img, errp) || !valid_name(img, name, errp))
        return -1;
    int ret = -1;
    pthread_mutex_lock(&img->lock);
    struct blk_bitmap *b = lookup(img, name, errp);
    if (!b || check_bitmap(img, b, checks[op], errp) < 0)
        goto out;
    switch (op) {
    case OP_REMOVE:
        list_remove(&img->bitmaps, index_of(img, b));
        break;
    case OP_CLEAR:
        if (b->on_disk) {
            /* No need to read bits only to drop them. */
            struct bm_bitmap *bm = bm_new(img->size, b->granularity);
            if (!bm) {
                set_error(errp, img, errno, "cannot clear bitmap '%s': %s",
                          name, strerror(errno));
                goto out;
            }
            b->bm = bm;
            b->on_disk = false;
        } else {
            bm_clear(b->bm);
        }
        blk_bitmap_changed(b);
        break;
    case OP_ENABLE:
        /* Writes will dirty it: its bits must be in memory. */
        if (blk_bitmap_load(img, b, errp) < 0)
            goto out;
        b->recording = true;
        break;
    case OP_DISABLE:
        b->recording = false;
        break;
    }
    img->bitmaps_changed = true;
    ret = 0;
out:
    pthread_mutex_unlock(&img->lock);
    return ret;
}

int cbt_bitmap_remove(struct cbt_image *img, const char *name,
                      struct cbt_error **errp)
{
    return simple_op(img, name, OP_REMOVE, errp);
}

int cbt_bitmap_clear(struct cbt_image *img, const char *name,
                     struct cbt_error **errp)
{
    return simple_op(img, name, OP_CLEAR, errp);
}

int cbt_bitmap_enable(struct cbt_image *img, const char *name,
                      struct cbt_error **errp)
{
    return simple_op(img, name, OP_ENABLE, errp);
}

int cbt_bitmap_disable(struct cbt_image *img, const char *name,
                       struct cbt_error **errp)
{
    return simple_op(img, name, OP_DISABLE, errp);
}

/* Chunks of an on_disk source, each ORed into the target through a
 * scratch bitmap that holds one chunk's bits at a time. */
struct merge_state {
    struct bm_bitmap *dst, *scratch;
};

static int merge_chunk(void *opaque, uint64_t chunk, uint64_t chunk_bytes,
                       const uint8_t *buf, bool ones)
{
    struct merge_state *m = opaque;
    if (!buf && !ones)
        return 0;
    load_chunk(m->scratch, chunk, chunk_bytes, buf, ones);
    int r = bm_merge(m->dst, m->scratch);
    bm_clear(m->scratch);
    return r;
}

/*
 * dst |= the bits of on_disk src of the same node, streamed from the image
 * rather than loaded (node->lock held): the memory a merge takes is the
 * target's.  On failure dst is as it was: it is restored from a copy
 * (which shares its pages, so costs only the page table).
 */
static int merge_from_disk(struct blk_node *node, const struct blk_bitmap *src,
                           struct blk_bitmap *dst, struct cbt_error **errp)
{
    struct merge_state m = {
        .dst = dst->bm,
        .scratch = bm_new(node->size, src->granularity),
    };
    struct bm_bitmap *undo = bm_copy(dst->bm);
    int r = -1;
    if (!m.scratch || !undo) {
        set_error(errp, node, ENOMEM, "out of memory merging bitmap '%s'",
                  src->name);
    } else {
        r = node->drv->bitmap_read(node, src, merge_chunk, &m, errp);
        if (r > 0 || r < -1)
            set_error(errp, node, r < 0 ? -r : EIO, "cannot merge bitmap "
                      "'%s': %s", src->name, strerror(r < 0 ? -r : EIO));
    }
    if (r == 0) {
        blk_bitmap_changed(dst);
        bm_free(undo);
    } else if (undo) {
        bm_free(dst->bm);
        dst->bm = undo;
    }
    bm_free(m.scratch);
    return r ? -1 : 0;
}

/*
 * QEMU's block-dirty-bitmap-merge with one source: the target must exist,
 * then the source must exist and be usable (not busy, not inconsistent) and
 * cover the same number of bytes, then the target must be modifiable.  The
 * granularities may differ.  On failure the target is unchanged.
 */
int cbt_bitmap_merge(struct cbt_image *img, const char *target,
                     struct cbt_image *src_img, const char *src_name,
                     struct cbt_error **errp)
{
    return cbt_bitmap_merge_flags(img, target, src_img, src_name, 0, errp);
}

int cbt_bitmap_merge_flags(struct cbt_image *img, const char *target,
                           struct cbt_image *src_img, const char *src_name,
                           unsigned flags, struct cbt_error **errp)
{
    if (!valid_image(img, errp) || !valid_name(img, target, errp))
        return -1;
    if (!src_img)
        src_img = img;
    if (!valid_name(src_img, src_name, errp))
        return -1;

    pthread_mutex_lock(&img->lock);
    bool found = lookup(img, target, errp) != NULL;
    pthread_mutex_unlock(&img->lock);
    if (!found)
        return -1;

    /* A source on another node is copied under that node's lock. */
    struct bm_bitmap *copy = NULL;
    uint64_t src_size = 0;
    if (src_img != img) {
        pthread_mutex_lock(&src_img->lock);
        struct blk_bitmap *s = lookup(src_img, src_name, errp);
        int r = s ? check_bitmap(src_img, s, CHECK_ALLOW_RO, errp) : -1;
        if (r == 0) {
            copy = bits_copy(src_img, s, errp);
            if (copy)
                src_size = bm_size(copy);
            else
                r = -1;
        }
        pthread_mutex_unlock(&src_img->lock);
        if (r < 0)
            return -1;
    }

    int ret = -1;
    pthread_mutex_lock(&img->lock);
    struct blk_bitmap *dst = lookup(img, target, errp);
    if (!dst)
        goto out;
    const struct bm_bitmap *src = copy;
    struct blk_bitmap *src_b = NULL; /* a source on this node */
    if (!copy) {
        src_b = lookup(img, src_name, errp);
        if (!src_b || check_bitmap(img, src_b, CHECK_ALLOW_RO, errp) < 0)
            goto out;
        src_size = img->size; /* every bitmap of the node covers it */
    }
    if (src_size != img->size && (flags & CBT_MERGE_RESIZE) &&
        check_bitmap(img, dst, CHECK_DEFAULT, errp) == 0) {
        if (blk_bitmap_load(img, dst, errp) < 0)
            goto out;
        /* Another layer of a chain: its dirty bytes (clamped to its own
         * size), cut at the target's end; the target's bits past the
         * source's end are left alone. */
        uint64_t o = 0, n;
        blk_bitmap_changed(dst);
        while (bm_next_dirty_area(src, &o, src_size, &n) && o < img->size) {
            bm_set(dst->bm, o, MIN(n, img->size - o));
            o += n;
        }
        img->bitmaps_changed = true;
        ret = 0;
        goto out;
    }
    if (src_size != img->size) {
        set_error(errp, img, EINVAL, "Bitmaps are of different sizes "
                  "(destination size is %" PRIu64 ", source size is %" PRIu64
                  ") and can't be merged", img->size, src_size);
        goto out;
    }
    if (check_bitmap(img, dst, CHECK_DEFAULT, errp) < 0 ||
        blk_bitmap_load(img, dst, errp) < 0)
        goto out;
    if (src_b && src_b->on_disk) {
        if (merge_from_disk(img, src_b, dst, errp) < 0)
            goto out;
        img->bitmaps_changed = true;
        ret = 0;
        goto out;
    }
    if (src_b)
        src = src_b->bm;
    if (src != dst->bm) {
        blk_bitmap_changed(dst);
        int r = bm_merge(dst->bm, src);
        if (r < 0) {
            set_error(errp, img, -r, "Bitmaps are of different sizes "
                      "(destination size is %" PRIu64 ", source size is %"
                      PRIu64 ") and can't be merged", bm_size(dst->bm),
                      src_size);
            goto out;
        }
    }
    img->bitmaps_changed = true;
    ret = 0;
out:
    pthread_mutex_unlock(&img->lock);
    bm_free(copy);
    return ret;
}

int cbt_bitmap_rename(struct cbt_image *img, const char *name,
                      const char *new_name, struct cbt_error **errp)
{
    if (!valid_image(img, errp) || !valid_name(img, name, errp) ||
        !valid_name(img, new_name, errp))
        return -1;
    if (strlen(new_name) > BITMAP_MAX_NAME) {
        set_error(errp, img, EINVAL, "Name length exceeds maximum (%d "
                  "characters)", BITMAP_MAX_NAME);
        return -1;
    }
    int ret = -1;
    pthread_mutex_lock(&img->lock);
    struct blk_bitmap *b = lookup(img, name, errp);
    if (!b || check_bitmap(img, b, CHECK_DEFAULT, errp) < 0)
        goto out;
    if (strcmp(name, new_name) == 0) {
        ret = 0;
        goto out;
    }
    if (list_find(&img->bitmaps, new_name)) {
        set_error(errp, img, EEXIST, "Bitmap already exists: %s", new_name);
        goto out;
    }
    char *dup = strdup(new_name);
    if (!dup) {
        set_error(errp, img, ENOMEM, "out of memory renaming bitmap '%s'",
                  name);
        goto out;
    }
    free(b->name);
    b->name = dup;
    img->bitmaps_changed = true;
    ret = 0;
out:
    pthread_mutex_unlock(&img->lock);
    return ret;
}

/*
 * Dirty areas come from bm_next_dirty_area (whole granules, clamped to the
 * size), clean areas are the gaps, as QEMU's NBD server builds the
 * qemu:dirty-bitmap:NAME context; adjacent areas of one kind are merged.
 */
int cbt_bitmap_extents(struct cbt_image *img, const char *name,
                       cbt_extent_fn *fn, void *opaque,
                       struct cbt_error **errp)
{
    if (!valid_image(img, errp) || !valid_name(img, name, errp))
        return -1;
    if (!fn) {
        set_error(errp, img, EINVAL, "no extent callback given");
        return -1;
    }
    pthread_mutex_lock(&img->lock);
    struct bm_bitmap *copy = NULL;
    struct blk_bitmap *b = lookup(img, name, errp);
    int r = b ? check_bitmap(img, b, CHECK_ALLOW_RO, errp) : -1;
    if (r == 0) {
        copy = bits_copy(img, b, errp);
        if (!copy)
            r = -1;
    }
    pthread_mutex_unlock(&img->lock);
    if (r < 0)
        return -1;

    uint64_t size = bm_size(copy);
    uint64_t pos = 0;
    while (pos < size) {
        uint64_t start = pos, len = 0;
        bool dirty = bm_next_dirty_area(copy, &start, size, &len);
        if (!dirty)
            start = size;
        if (start > pos) {
            r = fn(opaque, pos, start - pos, false);
            if (r)
                break;
        }
        if (!dirty)
            break;
        r = fn(opaque, start, len, true);
        if (r)
            break;
        pos = start + len;
    }
    bm_free(copy);
    if (r) {
        set_error(errp, img, r < 0 ? -r : EINVAL,
                  "listing the extents of bitmap '%s' stopped: %s", name,
                  strerror(r < 0 ? -r : EINVAL));
        return -1;
    }
    return 0;
}

/* The hash of the qcow2 bit stream: ceil(nbits / 8) bytes, LSB first. */
int cbt_bitmap_sha256(struct cbt_image *img, const char *name, char hex[65],
                      struct cbt_error **errp)
{
    if (!valid_image(img, errp) || !valid_name(img, name, errp))
        return -1;
    if (!hex) {
        set_error(errp, img, EINVAL, "no place given for the hash");
        return -1;
    }
    const uint64_t chunk = 64 * 1024;
    CLEANUP_FREE uint8_t *buf = malloc(chunk);
    if (!buf) {
        set_error(errp, img, ENOMEM, "out of memory hashing bitmap '%s'", name);
        return -1;
    }
    int ret = -1;
    pthread_mutex_lock(&img->lock);
    struct blk_bitmap *b = lookup(img, name, errp);
    if (!b || check_bitmap(img, b, CHECK_ALLOW_RO, errp) < 0)
        goto out;
    struct sha256_ctx ctx;
    sha256_init(&ctx);
    if (b->on_disk) {
        /* The chunks on disk are the stream hashed: no need to load. */
        struct stream_state st = {.sha = &ctx};
        if (stream_bits(img, b, &st, errp) < 0)
            goto out;
        goto done;
    }
    uint64_t total = DIV_ROUND_UP(bm_nbits(b->bm), 8);
    for (uint64_t i = 0; i * chunk < total; i++) {
        uint64_t n = MIN(chunk, total - i * chunk);
        bm_serialize_chunk(b->bm, i, chunk, buf);
        sha256_update(&ctx, buf, (size_t)n);
    }
done:;
    uint8_t digest[32];
    sha256_final(&ctx, digest);
    sha256_hex(digest, hex);
    ret = 0;
out:
    pthread_mutex_unlock(&img->lock);
    return ret;
}

int cbt_bitmap_count(struct cbt_image *img, const char *name, uint64_t *count,
                     struct cbt_error **errp)
{
    if (!valid_image(img, errp) || !valid_name(img, name, errp))
        return -1;
    if (!count) {
        set_error(errp, img, EINVAL, "no place given for the count");
        return -1;
    }
    pthread_mutex_lock(&img->lock);
    struct blk_bitmap *b = lookup(img, name, errp);
    int r = -1;
    if (b && check_bitmap(img, b, CHECK_ALLOW_RO, errp) == 0)
        r = bits_count(img, b, count, errp);
    pthread_mutex_unlock(&img->lock);
    return r;
}

/* A store changed the image but the rollback point could not follow (out
 * of memory): its disk_keys may name tables the store freed.  Its loaded
 * bitmaps are to be written afresh by any later store; one never loaded
 * whose table is gone can no longer be trusted. */
static void committed_forget_disk(struct blk_node *node)
{
    for (size_t i = 0; i < node->committed.n; i++) {
        struct blk_bitmap *b = &node->committed.v[i];
        bool kept = false;
        for (size_t j = 0; b->on_disk && j < node->bitmaps.n; j++)
            kept |= node->bitmaps.v[j].disk_key == b->disk_key;
        if (b->on_disk && !kept) {
            b->on_disk = false;
            b->inconsistent = true;
            b->recording = false;
        }
        if (!b->on_disk)
            blk_bitmap_changed(b);
    }
}

int cbt_bitmap_commit(struct cbt_image *img, struct cbt_error **errp)
{
    if (!valid_image(img, errp))
        return -1;
    int ret = -1;
    pthread_mutex_lock(&img->lock);
    if (img->read_only) {
        if (img->bitmaps_changed) {
            set_error(errp, img, EROFS, "cannot store bitmap changes: the "
                      "image is opened read-only");
            goto out;
        }
        ret = 0;
        goto out;
    }
    img->bitmaps_switched = false;
    if (img->drv->bitmap_store && img->drv->bitmap_store(img, errp) < 0) {
        /* Failed after the file took the new state: that state is the
         * rollback point now, so a rollback cannot pretend otherwise. */
        if (img->bitmaps_switched && blk_bitmaps_snapshot(img) < 0)
            committed_forget_disk(img);
        goto out;
    }
    if (blk_bitmaps_snapshot(img) < 0) {
        committed_forget_disk(img);
        /* Stored, but the rollback point could not move. */
        set_error(errp, img, ENOMEM, "bitmaps stored, but out of memory "
                  "recording the new rollback point");
        goto out;
    }
    ret = 0;
out:
    pthread_mutex_unlock(&img->lock);
    return ret;
}

int cbt_bitmap_rollback(struct cbt_image *img, struct cbt_error **errp)
{
    if (!valid_image(img, errp))
        return -1;
    int ret = -1;
    pthread_mutex_lock(&img->lock);
    struct blk_bitmap_list copy;
    if (list_copy(&copy, &img->committed) < 0) {
        set_error(errp, img, ENOMEM, "out of memory restoring the bitmaps");
        goto out;
    }
    list_clear(&img->bitmaps);
    img->bitmaps = copy;
    img->bitmaps_changed = false;
    ret = 0;
out:
    pthread_mutex_unlock(&img->lock);
    return ret;
}
