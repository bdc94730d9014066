/*
 * qcow2 image creation.  The new file gets QEMU's layout: header cluster,
 * refcount table, refcount blocks, L1 table.  Preallocation then goes
 * through the ordinary allocation path of the opened image, so there is one
 * allocator to trust.
 */
#include <fcntl.h>
#include <inttypes.h>
#include <sys/stat.h>

#include "qcow2.h"

static int parse_options(const char *fn, const struct cbt_create_opts *o,
                         struct qcow2_state *s, int *prealloc,
                         struct cbt_error **errp)
{
    uint64_t cs = o->cluster_size ? o->cluster_size : 65536;
    if (!IS_POW2(cs) || cs < 512 || cs > (2u << 20)) {
        cbt_error_set(errp, EINVAL,
                      "%s: cluster size %" PRIu64 " must be a power of two "
                      "between 512 and 2M", fn, cs);
        return -1;
    }
    int version = o->compat ? o->compat : 3;
    if (version != 2 && version != 3) {
        cbt_error_set(errp, EINVAL, "%s: compat must be 0.10 or 1.1", fn);
        return -1;
    }
    int rb = o->refcount_bits ? o->refcount_bits : 16;
    if (!IS_POW2((unsigned)rb) || rb > 64) {
        cbt_error_set(errp, EINVAL,
                      "%s: refcount_bits %d must be a power of two up to 64", fn,
                      rb);
        return -1;
    }
    if (version == 2 && rb != 16) {
        cbt_error_set(errp, EINVAL,
                      "%s: compat=0.10 images support only refcount_bits=16", fn);
        return -1;
    }
    bool zstd = false;
    if (o->compression_type && strcmp(o->compression_type, "zlib") != 0) {
        if (strcmp(o->compression_type, "zstd") != 0) {
            cbt_error_set(errp, EINVAL,
                          "%s: unknown compression type '%s' (zlib or zstd)", fn,
                          o->compression_type);
            return -1;
        }
        zstd = true;
    }
    if (version == 2 && (zstd || o->extended_l2 || o->data_file ||
                         o->lazy_refcounts)) {
        cbt_error_set(errp, EINVAL,
                      "%s: compat=0.10 images support none of compression_type, "
                      "extended_l2, data_file, lazy_refcounts", fn);
        return -1;
    }
    if (o->extended_l2 && cs < 16384) {
        cbt_error_set(errp, EINVAL,
                      "%s: extended_l2 needs a cluster size of at least 16k", fn);
        return -1;
    }
    if (o->data_file_raw && !o->data_file) {
        cbt_error_set(errp, EINVAL, "%s: data_file_raw requires data_file", fn);
        return -1;
    }
    if (o->data_file_raw && o->backing_file) {
        cbt_error_set(errp, EINVAL,
                      "%s: data_file_raw cannot be used with a backing file", fn);
        return -1;
    }
    const char *p = o->preallocation ? o->preallocation : "off";
    if (!strcmp(p, "off"))
        *prealloc = 0;
    else if (!strcmp(p, "metadata"))
        *prealloc = 1;
    else if (!strcmp(p, "falloc"))
        *prealloc = 2;
    else if (!strcmp(p, "full"))
        *prealloc = 3;
    else {
        cbt_error_set(errp, EINVAL,
                      "%s: invalid preallocation mode '%s' (off, metadata, "
                      "falloc, full)", fn, p);
        return -1;
    }
    if (*prealloc && o->backing_file) {
        cbt_error_set(errp, EINVAL,
                      "%s: preallocation and a backing file cannot be combined",
                      fn);
        return -1;
    }
    if (o->data_file_raw && *prealloc == 0)
        *prealloc = 1; /* as QEMU: raw data files need mapped metadata */

    struct qcow2_header *h = &s->h;
    h->magic = QCOW2_MAGIC;
    h->version = (uint32_t)version;
    h->cluster_bits = (uint32_t)__builtin_ctzll(cs);
    h->refcount_order = (uint32_t)__builtin_ctz((unsigned)rb);
    h->header_length = version >= 3 ? QCOW2_HEADER_SIZE : QCOW2_V2_HEADER_SIZE;
    if (zstd) {
        h->compression_type = QCOW2_COMPRESSION_ZSTD;
        h->incompatible_features |= QCOW2_INCOMPAT_COMPRESSION;
    }
    if (o->extended_l2)
        h->incompatible_features |= QCOW2_INCOMPAT_EXTL2;
    if (o->data_file) {
        h->incompatible_features |= QCOW2_INCOMPAT_DATA_FILE;
        if (o->data_file_raw)
            h->autoclear_features |= QCOW2_AUTOCLEAR_DATA_FILE_RAW;
    }
    if (o->lazy_refcounts)
        h->compatible_features |= QCOW2_COMPAT_LAZY_REFCOUNTS;
    s->cluster_bits = h->cluster_bits;
    s->cluster_size = cs;
    return 0;
}

/* Size from the backing file when none was given, and the probed format
 * when none was named.  Read with a shared open (no lock taken against a
 * writer), as qemu-img create does: only the header is read, and an
 * overlay of a running VM's disk is made while QEMU holds it. */
static int backing_info(const char *fn, const struct cbt_create_opts *o,
                        uint64_t *size, char **fmt, struct cbt_error **errp)
{
    char *path = path_resolve_relative(fn, o->backing_file);
    if (!path) {
        cbt_error_set(errp, ENOMEM, "out of memory");
        return -1;
    }
    struct cbt_image *b = cbt_image_open(
        path, o->backing_format,
        CBT_OPEN_NO_BACKING | CBT_OPEN_FORCE_SHARE | CBT_OPEN_SHARE_QUIET,
        errp);
    free(path);
    if (!b) {
        cbt_error_prefix(errp, "%s: could not open backing file", fn);
        return -1;
    }
    *size = cbt_image_size(b);
    *fmt = strdup(o->backing_format ? o->backing_format : cbt_image_format(b));
    cbt_image_close(b, NULL);
    if (!*fmt) {
        cbt_error_set(errp, ENOMEM, "out of memory");
        return -1;
    }
    return 0;
}

static int preallocate(struct cbt_image *img, int mode)
{
    struct qcow2_state *s = qcow2_state(img);
    uint64_t cs = s->cluster_size;
    for (uint64_t off = 0; off < img->size;) {
        uint8_t *l2;
        uint64_t idx;
        int r = qcow2_get_l2(s, off, true, &l2, &idx);
        if (r < 0)
            return r;
        uint64_t n = MIN(s->l2_entries - idx,
                         DIV_ROUND_UP(img->size - off, cs));
        int64_t host = qcow2_has_data_file(s) ? (int64_t)off
                                              : qcow2_alloc_clusters(s, n);
        if (host < 0) {
            qcow2_cache_put(&s->l2_cache, l2);
            return (int)host;
        }
        for (uint64_t k = 0; k < n; k++)
            qcow2_l2_set(s, l2, idx + k, ((uint64_t)host + k * cs) |
                         QCOW2_OFLAG_COPIED,
                         /* As QEMU: subclusters stay unallocated, except
                          * over a raw data file, whose data is the image. */
                         s->ext_l2 && s->data_file_raw
                             ? QCOW2_L2_BITMAP_ALL_ALLOC : 0);
        qcow2_cache_mark_dirty(&s->l2_cache, l2);
        qcow2_cache_put(&s->l2_cache, l2);
        int fd = s->data_fd;
        uint64_t len = n * cs;
        if (mode == 2)
            r = posix_fallocate(fd, (off_t)host, (off_t)len) ? -EIO : 0;
        else if (mode == 3)
            r = file_write_zeroes(fd, (uint64_t)host, len);
        if (r < 0)
            return r;
        off += len;
    }
    /* The file covers every allocated cluster, as QEMU leaves it. */
    uint64_t end = s->alloc_end << s->cluster_bits, cur;
    if (file_size(img->fd, &cur) == 0 && cur < end) {
        int r = file_truncate(img->fd, end);
        if (r < 0)
            return r;
    }
    return qcow2_flush_metadata(s);
}

int qcow2_create(const char *filename, const struct cbt_create_opts *opts,
                 struct cbt_error **errp)
{
    struct qcow2_state st = { 0 };
    struct cbt_image fake = { 0 };
    int prealloc = 0;
    CLEANUP_FREE char *bfmt = NULL;
    uint64_t size = opts->size;
    if (parse_options(filename, opts, &st, &prealloc, errp) < 0)
        return -1;
    if (opts->backing_file) {
        if (strlen(opts->backing_file) > QCOW2_MAX_BACKING_NAME) {
            cbt_error_set(errp, ENAMETOOLONG,
                          "%s: backing file name too long (max %d bytes)",
                          filename, QCOW2_MAX_BACKING_NAME);
            return -1;
        }
        uint64_t bsize;
        if (backing_info(filename, opts, &bsize, &bfmt, errp) < 0)
            return -1;
        if (!opts->size_given)
            size = bsize;
    } else if (!opts->size_given) {
        cbt_error_set(errp, EINVAL, "%s: image size required", filename);
        return -1;
    }
    size = ALIGN_UP(size, 512);
    st.h.size = size;
    uint64_t cs = st.cluster_size;
    uint32_t l2_bits = st.cluster_bits - (opts->extended_l2 ? 4 : 3);
    uint64_t l1_entries = qcow2_l1_entries_for(size, st.cluster_bits, l2_bits);
    if (l1_entries * 8 > QCOW2_MAX_L1_BYTES) {
        cbt_error_set(errp, EFBIG,
                      "%s: image size %" PRIu64 " too large for cluster size %"
                      PRIu64, filename, size, cs);
        return -1;
    }
    uint64_t l1_clusters = DIV_ROUND_UP(MAX(l1_entries, 1) * 8, cs);
    uint64_t rb_entries = (cs * 8) >> st.h.refcount_order;
    /* Header, table, blocks and L1 must all be covered by the blocks. */
    uint64_t t = 1, b = 1;
    for (;;) {
        uint64_t total = 1 + t + b + l1_clusters;
        uint64_t nb = DIV_ROUND_UP(total, rb_entries);
        uint64_t nt = DIV_ROUND_UP(nb * 8, cs);
        if (nb == b && nt == t)
            break;
        b = nb;
        t = nt;
    }
    st.h.refcount_table_offset = cs;
    st.h.refcount_table_clusters = (uint32_t)t;
    st.h.l1_table_offset = (1 + t + b) * cs;
    st.h.l1_size = (uint32_t)l1_entries;
    if (opts->data_file) {
        st.data_file = strdup(opts->data_file);
        if (!st.data_file) {
            cbt_error_set(errp, ENOMEM, "out of memory");
            return -1;
        }
    }
    fake.backing_name = opts->backing_file ? (char *)opts->backing_file : NULL;
    fake.backing_fmt = opts->backing_file ? bfmt : NULL;
    st.node = &fake;

    uint64_t total = 1 + t + b + l1_clusters;
    CLEANUP_FREE uint8_t *buf = calloc(total, cs);
    if (!buf) {
        free(st.data_file);
        cbt_error_set(errp, ENOMEM, "%s: out of memory", filename);
        return -1;
    }
    int r = qcow2_build_header(&st, buf);
    free(st.data_file);
    if (r < 0) {
        cbt_error_set(errp, -r, "%s: header does not fit in one cluster",
                      filename);
        return -1;
    }
    uint8_t *table = buf + cs;
    for (uint64_t i = 0; i < b; i++)
        stbe64(table + i * 8, (1 + t + i) * cs);
    for (uint64_t c = 0; c < total; c++)
        qcow2_rb_set(buf + (1 + t) * cs + (c / rb_entries) * cs, c % rb_entries,
                     st.h.refcount_order, 1);

    if (opts->data_file) {
        char *dpath = path_resolve_relative(filename, opts->data_file);
        if (!dpath) {
            cbt_error_set(errp, ENOMEM, "%s: out of memory", filename);
            return -1;
        }
        struct blk_lock *dlock = NULL;
        /* A raw data file keeps what it holds: that is how an existing
         * raw disk gets a qcow2 metadata image for its bitmaps (qemu-img
         * would empty it). */
        int dfd = blk_create_file(dpath, opts->data_file_raw, &dlock, errp);
        bool ok = dfd >= 0;
        struct stat dst;
        if (ok && fstat(dfd, &dst) < 0) {
            cbt_error_set(errp, errno, "%s: cannot create data file '%s': "
                          "%s", filename, dpath, strerror(errno));
            ok = false;
        }
        if (ok && opts->data_file_raw && (uint64_t)dst.st_size > size) {
            cbt_error_set(errp, EINVAL, "%s: data file '%s' holds %" PRIu64
                          " bytes, more than the virtual size %" PRIu64
                          "; give its size (or more)", filename, dpath,
                          (uint64_t)dst.st_size, size);
            ok = false;
        }
        if (ok) {
            r = file_truncate(dfd, opts->data_file_raw ? size : 0);
            if (r < 0) {
                cbt_error_set(errp, -r, "%s: cannot create data file '%s': "
                              "%s", filename, dpath, strerror(-r));
                ok = false;
            }
        }
        free(dpath);
        if (dfd >= 0)
            close(dfd);
        blk_lock_release(dlock, BLK_LOCK_CREATE);
        if (!ok)
            return -1;
    }
    struct blk_lock *lock = NULL;
    int fd = blk_create_file(filename, false, &lock, errp);
    if (fd < 0)
        return -1;
    /* As QEMU, the file ends right after the L1 entries. */
    uint64_t len = (1 + t + b) * cs + MAX(l1_entries, 1) * 8;
    r = file_pwrite_full(fd, buf, len, 0);
    if (r == 0)
        r = file_flush(fd);
    close(fd);
    blk_lock_release(lock, BLK_LOCK_CREATE);
    if (r < 0) {
        cbt_error_set(errp, -r, "%s: write failed: %s", filename, strerror(-r));
        return -1;
    }
    if (!prealloc)
        return 0;
    struct cbt_image *img = cbt_image_open(
        filename, "qcow2", CBT_OPEN_RDWR | CBT_OPEN_NO_BACKING, errp);
    if (!img)
        return -1;
    r = preallocate(img, prealloc);
    if (r < 0) {
        cbt_image_close(img, NULL);
        cbt_error_set(errp, -r, "%s: preallocation failed: %s", filename,
                      strerror(-r));
        return -1;
    }
    return cbt_image_close(img, errp);
}
