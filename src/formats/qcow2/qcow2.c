/* qcow2 driver: open, close, info, resize, and the callback table. */
#include <fcntl.h>
#include <inttypes.h>
#include <sys/stat.h>

#include "qcow2.h"

#define L2_CACHE_BYTES (32u << 20)
#define RB_CACHE_BYTES (4u << 20)

static int qcow2_probe(const uint8_t *buf, size_t len)
{
    if (len >= 8 && ldbe32(buf) == QCOW2_MAGIC) {
        uint32_t v = ldbe32(buf + 4);
        return v == 2 || v == 3 ? 100 : 50;
    }
    return 0;
}

static void free_state(struct qcow2_state *s)
{
    if (!s)
        return;
    qcow2_cache_destroy(&s->l2_cache);
    qcow2_cache_destroy(&s->rb_cache);
    qcow2_free_snapshots(s);
    qcow2_bitmaps_free(s);
    qcow2_meta_free(&s->meta);
    qcow2_free_header(s);
    if (s->data_fd >= 0 && s->data_fd != s->node->fd)
        close(s->data_fd);
    blk_lock_release(s->data_lock, s->data_lock_role);
    free(s->data_path);
    free(s->l1);
    free(s->reftable);
    free(s->pending_free);
    free(s->pending_free_len);
    free(s);
}

static uint32_t cache_entries(uint64_t want, uint64_t bytes, uint64_t cs)
{
    uint64_t max = MAX(16, bytes / cs);
    return (uint32_t)MIN(MAX(want, 16), max);
}

static int open_data_file(struct qcow2_state *s, unsigned flags,
                          struct cbt_error **errp)
{
    s->data_path = path_resolve_relative(s->node->filename, s->data_file);
    if (!s->data_path) {
        cbt_error_set(errp, ENOMEM, "out of memory");
        return -1;
    }
    /* Locked as the image itself is (blk_open_file). */
    flags &= CBT_OPEN_RDWR | CBT_OPEN_FORCE_SHARE;
    s->data_fd = blk_open_file(s->data_path, flags, &s->data_lock, errp);
    s->data_lock_role = blk_lock_role_of(flags);
    if (s->data_fd < 0) {
        cbt_error_prefix(errp, "%s: cannot open external data file '%s'",
                         s->node->filename, s->data_path);
        return -1;
    }
    return 0;
}

/* QEMU's heuristic: clusters in use well beyond what the host file has
 * allocated means metadata was preallocated over holes. */
static void detect_metadata_prealloc(struct qcow2_state *s)
{
    uint64_t real = 0;
    if (file_allocated_size(s->node->fd, &real) < 0)
        return;
    uint64_t real_clusters = real >> s->cluster_bits;
    uint64_t threshold = MAX(real_clusters * 10 / 9, real_clusters + 2);
    s->metadata_prealloc = s->alloc_end >= threshold;
}

static int qcow2_open(struct blk_node *node, int fd, unsigned flags,
                      struct cbt_error **errp)
{
    struct qcow2_state *s = calloc(1, sizeof(*s));
    if (!s) {
        cbt_error_set(errp, ENOMEM, "%s: out of memory", node->filename);
        return -1;
    }
    s->node = node;
    s->data_fd = fd;
    s->check_mode = flags & CBT_OPEN_CHECK;
    node->opaque = s;
    bool rw = flags & CBT_OPEN_RDWR;
    const char *fn = node->filename;

    uint64_t file_len;
    int r = file_size(fd, &file_len);
    if (r < 0) {
        cbt_error_set(errp, -r, "%s: %s", fn, strerror(-r));
        goto fail;
    }
    if (qcow2_read_header(s, fd, file_len, errp) < 0)
        goto fail;
    struct qcow2_header *h = &s->h;
    s->l2_entry_size = s->ext_l2 ? 16 : 8;
    s->l2_bits = s->cluster_bits - (s->ext_l2 ? 4 : 3);
    s->l2_entries = 1ull << s->l2_bits;
    s->subcluster_bits = s->ext_l2 ? s->cluster_bits - 5 : s->cluster_bits;
    s->subcluster_size = 1ull << s->subcluster_bits;
    s->csize_shift = 62 - (s->cluster_bits - 8);
    s->csize_mask = (1ull << (s->cluster_bits - 8)) - 1;
    s->cmp_offset_mask = (1ull << s->csize_shift) - 1;
    node->size = h->size;
    node->cluster_size = (uint32_t)s->cluster_size;

    if ((h->incompatible_features & QCOW2_INCOMPAT_CORRUPT) && rw &&
        !s->check_mode) {
        cbt_error_set(errp, EROFS,
                      "%s: image is marked corrupt and cannot be opened "
                      "read-write", fn);
        cbt_error_set_kind(errp, CBT_ERR_CORRUPT);
        cbt_error_set_remedy(errp, CBT_REMEDY_REPAIR);
        goto fail;
    }
    if (qcow2_load_reftable(s, file_len, errp) < 0 ||
        qcow2_load_l1(s, file_len, errp) < 0 ||
        qcow2_read_snapshots(s, file_len, errp) < 0)
        goto fail;
    r = qcow2_cache_init(&s->l2_cache, s->cluster_size,
                         cache_entries(s->l1_size, L2_CACHE_BYTES, s->cluster_size),
                         true);
    if (r == 0)
        r = qcow2_cache_init(&s->rb_cache, s->cluster_size,
                             cache_entries(s->reftable_entries, RB_CACHE_BYTES,
                                           s->cluster_size),
                             false);
    if (r < 0) {
        cbt_error_set(errp, -r, "%s: out of memory for metadata caches", fn);
        goto fail;
    }
    s->free_hint = 0;
    r = qcow2_compute_alloc_end(s);
    if (r < 0 && !s->check_mode) {
        cbt_error_set(errp, -r, "%s: cannot read refcount blocks: %s", fn,
                      strerror(-r));
        goto fail;
    }
    if (s->alloc_end < 1)
        s->alloc_end = 1;
    if (s->data_file && open_data_file(s, flags, errp) < 0)
        goto fail;
    detect_metadata_prealloc(s);
    if (qcow2_bitmaps_load(s, rw, errp) < 0)
        goto fail;

    if (rw) {
        uint64_t unknown = h->autoclear_features & ~QCOW2_AUTOCLEAR_MASK;
        if (unknown) {
            h->autoclear_features &= QCOW2_AUTOCLEAR_MASK;
            s->header_dirty = true;
        }
        if ((h->incompatible_features & QCOW2_INCOMPAT_DIRTY) && !s->check_mode) {
            /* Lazy refcounts left stale by a crash: rebuild before writing. */
            struct cbt_check_result res;
            if (qcow2_check(node, CBT_CHECK_FIX_LEAKS | CBT_CHECK_FIX_ERRORS,
                            &res, NULL, NULL, errp) < 0)
                goto fail;
            if (res.corruptions || res.check_errors) {
                cbt_error_set(errp, EIO,
                              "%s: could not repair refcounts of a dirty image",
                              fn);
                goto fail;
            }
            h->incompatible_features &= ~QCOW2_INCOMPAT_DIRTY;
            s->header_dirty = true;
        }
        if (s->header_dirty && qcow2_write_header(s) < 0) {
            cbt_error_set(errp, EIO, "%s: cannot update the header", fn);
            goto fail;
        }
    }
    return 0;
fail:
    free_state(s);
    node->opaque = NULL;
    return -1;
}

/* A control-path failure of an image marked corrupt is that corruption
 * (its own exit status in the CLI), whatever errno came up. */
static void corrupt_kind(const struct qcow2_state *s, struct cbt_error **errp)
{
    if (s->corrupt)
        cbt_error_set_kind(errp, CBT_ERR_CORRUPT);
}

static int qcow2_close(struct blk_node *node, struct cbt_error **errp)
{
    struct qcow2_state *s = qcow2_state(node);
    int ret = 0;
    int r = node->read_only ? 0 : qcow2_flush_metadata(s);
    if (r < 0 && s->corrupt) {
        /* Nothing more was written (what was, in order, is consistent as
         * far as it goes; the rest is lost, as with a crash). */
        cbt_error_set(errp, EIO, "%s: the image is marked corrupt (%s); "
                      "changes since were not written", node->filename,
                      s->corrupt_msg);
        cbt_error_set_remedy(errp, CBT_REMEDY_REPAIR);
        ret = -1;
    } else if (r < 0) {
        cbt_error_set(errp, -r, "%s: failed to write metadata: %s",
                      node->filename, strerror(-r));
        ret = -1;
    }
    corrupt_kind(s, errp);
    free_state(s);
    node->opaque = NULL;
    return ret;
}

static int qcow2_get_info(struct blk_node *node, struct cbt_image_info *info,
                          struct cbt_error **errp)
{
    struct qcow2_state *s = qcow2_state(node);
    struct qcow2_header *h = &s->h;
    info->cluster_size = (uint32_t)s->cluster_size;
    info->is_qcow2 = true;
    info->version = (int)h->version;
    info->dirty_flag = h->incompatible_features & QCOW2_INCOMPAT_DIRTY;
    info->lazy_refcounts = h->compatible_features & QCOW2_COMPAT_LAZY_REFCOUNTS;
    info->refcount_bits = (int)s->refcount_bits;
    info->corrupt = h->incompatible_features & QCOW2_INCOMPAT_CORRUPT;
    info->extended_l2 = s->ext_l2;
    info->compression_type =
        h->compression_type == QCOW2_COMPRESSION_ZSTD ? "zstd" : "zlib";
    if (s->data_file) {
        info->data_file = strdup(s->data_file);
        if (!info->data_file)
            goto nomem;
    }
    info->data_file_raw = s->data_file_raw;
    if (s->nb_snapshots) {
        info->snapshots = calloc(s->nb_snapshots, sizeof(*info->snapshots));
        if (!info->snapshots)
            goto nomem;
        for (uint32_t i = 0; i < s->nb_snapshots; i++) {
            struct cbt_snapshot_info *o = &info->snapshots[i];
            const struct qcow2_snapshot *sn = &s->snapshots[i];
            info->nb_snapshots = i + 1;
            o->id = strdup(sn->id);
            o->name = strdup(sn->name);
            if (!o->id || !o->name)
                goto nomem;
            o->vm_state_size = sn->vm_state_size;
            o->date_sec = sn->date_sec;
            o->date_nsec = sn->date_nsec;
            o->vm_clock_nsec = sn->vm_clock_nsec;
            o->icount = sn->icount;
        }
    }
    return 0;
nomem:
    cbt_error_set(errp, ENOMEM, "%s: out of memory", node->filename);
    return -1;
}

/* Move the active L1 to a larger table at a fresh place. */
static int grow_l1(struct qcow2_state *s, uint64_t entries)
{
    uint64_t bytes = entries * 8;
    if (bytes > QCOW2_MAX_L1_BYTES)
        return -EFBIG;
    uint64_t nclusters = qcow2_size_to_clusters(s, bytes);
    uint64_t *l1 = calloc(entries, 8);
    if (!l1)
        return -ENOMEM;
    memcpy(l1, s->l1, (size_t)s->l1_size * 8);
    /* Everything the old L1 points at must be durable first. */
    int r = qcow2_flush_metadata(s);
    int64_t off = r < 0 ? r : qcow2_alloc_clusters_append(s, nclusters);
    if (off < 0) {
        free(l1);
        return (int)off;
    }
    r = qcow2_prepare_l2_writeback(s); /* the new table's refcounts */
    CLEANUP_FREE uint64_t *be = calloc(nclusters << s->cluster_bits, 1);
    if (r == 0 && !be)
        r = -ENOMEM;
    if (r == 0) {
        for (uint64_t i = 0; i < entries; i++)
            be[i] = cpu_to_be64(l1[i]);
        r = qcow2_pwrite_meta(s, be, nclusters << s->cluster_bits,
                              (uint64_t)off, 0);
        s->need_sync = true;
    }
    if (r == 0)
        r = qcow2_sync(s);
    if (r < 0) {
        /* Nothing points at the new table: give its clusters back. */
        (void)qcow2_update_refcount(s, (uint64_t)off,
                                    nclusters << s->cluster_bits, -1);
        free(l1);
        return r;
    }
    uint64_t old_off = s->h.l1_table_offset;
    uint32_t old_size = s->l1_size;
    uint64_t old_bytes = (uint64_t)old_size * 8;
    uint64_t *old_l1 = s->l1;
    s->h.l1_table_offset = (uint64_t)off;
    s->h.l1_size = (uint32_t)entries;
    s->l1 = l1;
    s->l1_size = (uint32_t)entries;
    bool written = false;
    r = qcow2_write_header_ex(s, &written);
    if (r < 0 && !written) {
        /* The header still points at the old table: keep it. */
        s->h.l1_table_offset = old_off;
        s->h.l1_size = old_size;
        s->l1 = old_l1;
        s->l1_size = old_size;
        free(l1);
        (void)qcow2_update_refcount(s, (uint64_t)off,
                                    nclusters << s->cluster_bits, -1);
        return r;
    }
    free(old_l1);
    qcow2_meta_invalidate(s);
    if (r < 0)
        return r; /* written, not synced: the new table is in force */
    return old_bytes ? qcow2_free_clusters_deferred(s, old_off, old_bytes) : 0;
}

int qcow2_resize(struct blk_node *node, uint64_t new_size, bool shrink,
                 struct cbt_error **errp)
{
    struct qcow2_state *s = qcow2_state(node);
    const char *fn = node->filename;
    uint64_t old_size = node->size;
    new_size = ALIGN_UP(new_size, 512);
    if (new_size == 0) {
        /* A qcow2 bitmap needs at least one bit (QEMU could not store
         * it either). */
        for (size_t i = 0; i < node->bitmaps.n; i++) {
            if (node->bitmaps.v[i].persistent) {
                cbt_error_set(errp, EINVAL,
                              "%s: cannot shrink to 0 bytes: persistent "
                              "bitmap '%s' could not be stored", fn,
                              node->bitmaps.v[i].name);
                return -1;
            }
        }
    }
    if (new_size < old_size) {
        if (!shrink) {
            cbt_error_set(errp, EINVAL,
                          "%s: shrinking the image loses the data past its "
                          "new end and is done only when asked for", fn);
            cbt_error_set_remedy(errp, CBT_REMEDY_SHRINK);
            return -1;
        }
        if (s->nb_snapshots) {
            cbt_error_set(errp, ENOTSUP,
                          "%s: cannot shrink an image with internal snapshots", fn);
            return -1;
        }
    }
    /* The bitmaps change size with the image.  Shrinking: until they are
     * stored again, the entries on disk must not claim to be valid. */
    if (new_size < old_size && qcow2_bitmaps_mark_all_in_use(s, errp) < 0)
        return -1;
    uint64_t need = qcow2_l1_entries_for(new_size, s->cluster_bits, s->l2_bits);
    int r = 0;
    if (need > s->l1_size)
        r = grow_l1(s, need);
    if (r == 0 && new_size > old_size) {
        /* Growing: a bitmap whose table is long enough stays valid as it
         * is (the grown area clean, as in memory); longer tables (QEMU
         * wants them exact) land in the same header update as the new
         * size, so no moment has bitmaps valid for neither size. */
        s->h.size = new_size;
        bool was_switched = node->bitmaps_switched;
        node->bitmaps_switched = false;
        r = qcow2_bitmaps_grow_tables(s, new_size, errp);
        bool landed = node->bitmaps_switched;
        node->bitmaps_switched = was_switched;
        if (r < 0 && landed) {
            /* The header with the new size and tables was written, only
             * its sync failed: the file says new size, so must we. */
            node->size = new_size;
            return -1;
        }
        if (r < 0) {
            s->h.size = old_size;
            return -1;
        }
    }
    if (r == 0 && new_size < old_size) {
        /* Drop every cluster wholly past the new end. */
        uint64_t lo = ALIGN_UP(new_size, s->cluster_size);
        for (uint64_t i = lo >> (s->cluster_bits + s->l2_bits);
             r == 0 && i < s->l1_size; i++) {
            uint64_t table_start = i << (s->cluster_bits + s->l2_bits);
            uint64_t from = MAX(lo, table_start);
            uint8_t *l2;
            uint64_t idx;
            r = qcow2_get_l2(s, from, true, &l2, &idx);
            if (r < 0 || !l2)
                break;
            r = qcow2_l2_clear_from(s, l2, idx);
            qcow2_cache_put(&s->l2_cache, l2);
        }
    }
    if (r == 0) {
        s->h.size = new_size;
        node->size = new_size;
        r = qcow2_flush_metadata(s);
    }
    if (r == 0)
        r = qcow2_write_header(s);
    uint64_t backing_size = blk_backing_size(node);
    if (r == 0 && new_size > old_size && backing_size > old_size) {
        /* The grown area must read zero, not the backing file's data. */
        uint64_t end = MIN(new_size, backing_size);
        r = qcow2_write_zeroes(node, old_size, end - old_size, 0);
        if (r == 0)
            r = qcow2_flush_metadata(s);
    }
    if (r == 0 && s->data_file_raw)
        r = file_truncate(s->data_fd, new_size);
    if (r < 0) {
        cbt_error_set(errp, -r, "%s: resize failed: %s", fn,
                      qcow2_strerror(s, r));
        return -1;
    }
    return 0;
}

static int qcow2_change_backing(struct blk_node *node, const char *name,
                                const char *fmt, struct cbt_error **errp)
{
    struct qcow2_state *s = qcow2_state(node);
    char *new_name = NULL, *new_fmt = NULL;
    if ((name && !(new_name = strdup(name))) ||
        (name && fmt && !(new_fmt = strdup(fmt)))) {
        free(new_name);
        cbt_error_set(errp, ENOMEM, "%s: out of memory", node->filename);
        return -1;
    }
    if (s->data_file_raw && name) {
        free(new_name);
        free(new_fmt);
        cbt_error_set(errp, ENOTSUP, "%s: an image with data-file-raw "
                      "cannot have a backing file", node->filename);
        return -1;
    }
    /* Data and metadata first: the new link must never point at a base
     * whose contents are not yet durable below this image. */
    int r = qcow2_flush(node);
    if (r < 0) {
        free(new_name);
        free(new_fmt);
        cbt_error_set(errp, -r, "%s: cannot flush before changing the "
                      "backing file: %s", node->filename, qcow2_strerror(s, r));
        return -1;
    }
    char *old_name = node->backing_name, *old_fmt = node->backing_fmt;
    node->backing_name = new_name;
    node->backing_fmt = new_fmt;
    /* Does the new header fit?  Checked before anything is written. */
    uint8_t *hdr = cbt_zalloc_aligned(s->cluster_size);
    r = hdr ? qcow2_build_header(s, hdr) : -ENOMEM;
    free(hdr);
    bool fits = r == 0, written = false;
    if (fits)
        r = qcow2_write_header_ex(s, &written);
    if (r < 0) {
        node->backing_name = old_name;
        node->backing_fmt = old_fmt;
        free(new_name);
        free(new_fmt);
        if (!fits && (r == -ENOSPC || r == -ENAMETOOLONG))
            cbt_error_set(errp, -r, "%s: the backing file name '%s' does not "
                          "fit in the image header", node->filename,
                          name ? name : "");
        else
            cbt_error_set(errp, -r, "%s: cannot write the header: %s",
                          node->filename, qcow2_strerror(s, r));
        /* A header write that landed (the sync failed) holds the new link:
         * put the old one back (best effort). */
        if (written)
            (void)qcow2_write_header(s);
        return -1;
    }
    free(old_name);
    free(old_fmt);
    return 0;
}

static int qcow2_ext_get(struct blk_node *node, uint32_t type,
                         uint8_t **data, size_t *len)
{
    const struct qcow2_state *s = qcow2_state(node);
    const struct qcow2_ext *e = qcow2_find_ext(s, type);
    if (!e)
        return -ENOENT;
    if (qcow2_count_ext(s, type) > 1)
        return -ENOTUNIQ;
    *data = malloc(e->len ? e->len : 1);
    if (!*data)
        return -ENOMEM;
    memcpy(*data, e->data, e->len);
    *len = e->len;
    return 0;
}

static int qcow2_ext_set(struct blk_node *node, uint32_t type,
                         const void *data, size_t len,
                         struct cbt_error **errp)
{
    struct qcow2_state *s = qcow2_state(node);
    if (len > UINT32_MAX / 2) {
        cbt_error_set(errp, EFBIG, "%s: header extension too large",
                      node->filename);
        return -1;
    }
    int r = qcow2_set_ext(s, type, data, (uint32_t)len);
    if (r == -ENOSPC) {
        cbt_error_set(errp, ENOSPC, "%s: the header extension (%zu bytes) "
                      "does not fit in the image header (one cluster of %"
                      PRIu64 " bytes)", node->filename, len,
                      (uint64_t)s->cluster_size);
        cbt_error_set_kind(errp, CBT_ERR_OTHER); /* not the host's space */
        return -1;
    }
    if (r < 0) {
        cbt_error_set(errp, -r, "%s: cannot set a header extension: %s",
                      node->filename, strerror(-r));
        return -1;
    }
    return 0;
}

/* The control callbacks that write, with the corrupt kind on failure. */
static int store_cb(struct blk_node *node, struct cbt_error **errp)
{
    int r = qcow2_bitmaps_store(node, errp);
    if (r < 0)
        corrupt_kind(qcow2_state(node), errp);
    return r;
}

static int resize_cb(struct blk_node *node, uint64_t new_size, bool shrink,
                     struct cbt_error **errp)
{
    int r = qcow2_resize(node, new_size, shrink, errp);
    if (r < 0)
        corrupt_kind(qcow2_state(node), errp);
    return r;
}

static int change_backing_cb(struct blk_node *node, const char *name,
                             const char *fmt, struct cbt_error **errp)
{
    int r = qcow2_change_backing(node, name, fmt, errp);
    if (r < 0)
        corrupt_kind(qcow2_state(node), errp);
    return r;
}

const struct blk_driver blk_qcow2_driver = {
    .name = "qcow2",
    .probe = qcow2_probe,
    .open = qcow2_open,
    .close = qcow2_close,
    .create = qcow2_create,
    .read = qcow2_read,
    .write = qcow2_write,
    .write_zeroes = qcow2_write_zeroes,
    .discard = qcow2_discard,
    .flush = qcow2_flush,
    .block_status = qcow2_block_status,
    .mark_dirty = qcow2_bitmaps_mark_dirty,
    .bitmap_can_store = qcow2_bitmap_can_store,
    .bitmap_store = store_cb,
    .bitmap_read = qcow2_bitmap_read,
    .get_info = qcow2_get_info,
    .check = qcow2_check,
    .resize = resize_cb,
    .change_backing = change_backing_cb,
    .ext_get = qcow2_ext_get,
    .ext_set = qcow2_ext_set,
    .write_compressed = qcow2_write_compressed,
    .compress = qcow2_compress_cluster,
    .make_empty = qcow2_make_empty,
};
