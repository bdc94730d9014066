/*
 * qcow2 data path: read, write (allocating and copying on write), zero
 * writes and discards with QEMU's rules, block status, and the ordered
 * flush that makes metadata durable (see the design notes in qcow2.h).
 *
 * Writes go straight to the host file; the L2 entries that map newly
 * allocated clusters change only in the metadata cache, so they reach the
 * disk after the data and the refcounts they depend on.
 */
#include <inttypes.h>

#include "qcow2.h"

int qcow2_sync(struct qcow2_state *s)
{
    if (!s->need_sync)
        return 0;
    int r = file_flush(s->node->fd);
    if (r == 0 && s->data_fd != s->node->fd)
        r = file_flush(s->data_fd);
    if (r == 0)
        s->need_sync = false;
    return r;
}

int qcow2_prepare_l2_writeback(struct qcow2_state *s)
{
    if (qcow2_cache_is_dirty(&s->rb_cache) ||
        s->reftable_dirty_lo < s->reftable_dirty_hi) {
        int r = qcow2_write_refcounts(s);
        if (r < 0)
            return r;
        s->need_sync = true;
    }
    return qcow2_sync(s);
}

int qcow2_flush_metadata(struct qcow2_state *s)
{
    if (s->corrupt)
        return -EIO;
    int r = qcow2_prepare_l2_writeback(s);
    if (r == 0)
        r = qcow2_cache_write_dirty(s, &s->l2_cache);
    if (r == 0 && s->l1_dirty_lo < s->l1_dirty_hi) {
        r = qcow2_sync(s);
        if (r == 0)
            r = qcow2_write_l1(s);
    }
    if (r == 0)
        r = qcow2_sync(s);
    if (r == 0 && s->nb_pending_free) {
        r = qcow2_apply_pending_frees(s);
        if (r == 0)
            r = qcow2_write_refcounts(s);
        if (r == 0) {
            s->need_sync = true;
            r = qcow2_sync(s);
        }
    }
    if (r == 0 && s->header_dirty)
        r = qcow2_write_header(s);
    return r;
}

int qcow2_flush(struct blk_node *node)
{
    struct qcow2_state *s = qcow2_state(node);
    s->need_sync = true; /* flush means durable, whatever we think */
    return qcow2_flush_metadata(s);
}

/* ---- reading ---- */

/*
 * Fill buf with how [off, off+len) of the cluster described by (e, bm)
 * reads today; the range lies within one cluster.  Used by reads and by
 * copy-on-write.
 */
static int read_cluster_view(struct qcow2_state *s, uint64_t guest_cluster,
                             uint64_t e, uint64_t bm, uint8_t *buf,
                             uint64_t from, uint64_t to)
{
    struct blk_node *node = s->node;
    if (e & QCOW2_OFLAG_COMPRESSED) {
        CLEANUP_FREE uint8_t *tmp = malloc(s->cluster_size);
        if (!tmp)
            return -ENOMEM;
        int r = qcow2_read_compressed(s, e, tmp);
        if (r < 0)
            return r;
        memcpy(buf, tmp + from, to - from);
        return 0;
    }
    uint64_t host = e & QCOW2_L2E_OFFSET_MASK;
    uint64_t pos = from;
    while (pos < to) {
        uint32_t sc = (uint32_t)(pos >> s->subcluster_bits);
        uint64_t sc_end = MIN(to, ((uint64_t)sc + 1) << s->subcluster_bits);
        uint8_t *dst = buf + (pos - from);
        int r = 0;
        switch (qcow2_sc_type(s, e, bm, sc)) {
        case QCOW2_SC_NORMAL:
            r = file_pread_full(s->data_fd, dst, sc_end - pos, host + pos);
            break;
        case QCOW2_SC_ZERO_PLAIN:
        case QCOW2_SC_ZERO_ALLOC:
            memset(dst, 0, sc_end - pos);
            break;
        case QCOW2_SC_UNALLOC_PLAIN:
        case QCOW2_SC_UNALLOC_ALLOC: {
            uint64_t g = guest_cluster + pos;
            uint64_t n = sc_end - pos;
            if (g >= node->size) {
                memset(dst, 0, n); /* past the end of the image */
            } else {
                uint64_t in = MIN(n, node->size - g);
                r = blk_read_backing(node, dst, g, (size_t)in);
                if (in < n)
                    memset(dst + in, 0, n - in);
            }
            break;
        }
        default:
            return -EIO;
        }
        if (r < 0)
            return r;
        pos = sc_end;
    }
    return 0;
}

int qcow2_read(struct blk_node *node, void *buf, uint64_t off, size_t len)
{
    struct qcow2_state *s = qcow2_state(node);
    uint8_t *p = buf;
    while (len > 0) {
        uint64_t bytes = len;
        struct qcow2_map map;
        int r = qcow2_get_mapping(s, off, &bytes, &map);
        if (r < 0)
            return r;
        switch (map.type) {
        case QCOW2_SC_UNALLOC_PLAIN:
        case QCOW2_SC_UNALLOC_ALLOC:
            r = blk_read_backing(node, p, off, (size_t)bytes);
            break;
        case QCOW2_SC_ZERO_PLAIN:
        case QCOW2_SC_ZERO_ALLOC:
            memset(p, 0, (size_t)bytes);
            break;
        case QCOW2_SC_NORMAL:
            r = file_pread_full(s->data_fd, p, (size_t)bytes, map.host_offset);
            break;
        case QCOW2_SC_COMPRESSED: {
            uint64_t in = qcow2_offset_into_cluster(s, off);
            r = read_cluster_view(s, off - in, map.l2e, 0, p, in, in + bytes);
            break;
        }
        default:
            r = -EIO;
        }
        if (r < 0)
            return r;
        p += bytes;
        off += bytes;
        len -= (size_t)bytes;
    }
    return 0;
}

/* ---- writing ---- */

/* Does [off, off+len) of this layer's view read as zeroes, judged from
 * metadata only (as QEMU's is_zero)?  Called with node->lock held; the
 * backing node is queried through its own lock (top before bottom). */
static bool range_reads_zero(struct qcow2_state *s, uint64_t off, uint64_t len)
{
    struct blk_node *node = s->node;
    while (len > 0) {
        uint64_t bytes = len;
        struct qcow2_map map;
        if (qcow2_get_mapping(s, off, &bytes, &map) < 0)
            return false;
        switch (map.type) {
        case QCOW2_SC_ZERO_PLAIN:
        case QCOW2_SC_ZERO_ALLOC:
            break;
        case QCOW2_SC_UNALLOC_PLAIN:
        case QCOW2_SC_UNALLOC_ALLOC: {
            struct blk_node *b = node->backing;
            uint64_t pos = off, left = bytes;
            while (b && pos < b->size && left > 0) {
                struct cbt_extent ext;
                uint64_t n = MIN(left, b->size - pos);
                if (cbt_image_block_status(b, pos, n, &ext) < 0 ||
                    !(ext.flags & CBT_BS_ZERO))
                    return false;
                pos += ext.length;
                left -= ext.length;
            }
            break;
        }
        default:
            return false;
        }
        off += bytes;
        len -= bytes;
    }
    return true;
}

/* Host file length as far as the data written so far goes. */
static uint64_t data_file_len(struct qcow2_state *s)
{
    uint64_t len = 0;
    if (file_size(s->data_fd, &len) < 0)
        return 0;
    return len;
}

/*
 * Give a standard (non-extended) cluster run new host clusters and write
 * [off, off+len) into them, copying what the write does not cover from the
 * old view.  `n` clusters starting at L2 index idx, all needing allocation.
 */
static int write_alloc_run(struct qcow2_state *s, uint8_t *l2, uint64_t idx,
                           uint64_t n, const uint8_t *buf, uint64_t off,
                           uint64_t len)
{
    uint64_t cs = s->cluster_size;
    int64_t host;
    if (qcow2_has_data_file(s))
        host = (int64_t)ALIGN_DOWN(off, cs); /* data file: host == guest */
    else
        host = qcow2_alloc_clusters(s, n);
    if (host < 0)
        return (int)host;
    uint64_t guest0 = ALIGN_DOWN(off, cs);
    uint64_t end = off + len;
    uint64_t flen = UINT64_MAX; /* the host file's length, when needed */
    CLEANUP_FREE uint8_t *tmp = NULL;
    int r = qcow2_pre_write_data(s, (uint64_t)host, n * cs);
    if (r < 0)
        goto fail;

    /* Fully covered clusters are written straight from buf in one go. */
    uint64_t full_lo = ALIGN_UP(off, cs), full_hi = ALIGN_DOWN(end, cs);
    if (full_hi > full_lo) {
        r = blk_data_pwrite(s->node, s->data_fd, buf + (full_lo - off),
                            full_hi - full_lo,
                            (uint64_t)host + (full_lo - guest0));
        if (r < 0)
            goto fail;
    }
    /* Partial head and tail clusters get the old view around the data. */
    for (int edge = 0; edge < 2; edge++) {
        uint64_t c = edge == 0 ? guest0 : ALIGN_DOWN(end - 1, cs);
        if (edge == 1 && c == guest0)
            break;
        uint64_t lo = MAX(off, c), hi = MIN(end, c + cs);
        if (lo == c && hi == c + cs)
            continue; /* fully covered, done above */
        uint64_t i = idx + ((c - guest0) >> s->cluster_bits);
        uint64_t old = qcow2_l2_get(s, l2, i);
        uint64_t hc = (uint64_t)host + (c - guest0);
        enum qcow2_sc_type t = qcow2_sc_type(s, old, 0, 0);
        bool zero_view = t == QCOW2_SC_ZERO_PLAIN || t == QCOW2_SC_ZERO_ALLOC ||
                         (t == QCOW2_SC_UNALLOC_PLAIN &&
                          c >= blk_backing_size(s->node));
        if (zero_view && !qcow2_has_data_file(s) && flen == UINT64_MAX)
            flen = data_file_len(s);
        if (zero_view && hc >= flen && !qcow2_has_data_file(s)) {
            /* Zero the cluster as allocated extents (not holes, so the
             * host file does not look preallocated), then add the data. */
            r = file_write_zeroes(s->data_fd, hc, cs);
            if (r == 0)
                r = file_pwrite_full(s->data_fd, buf + (lo - off), hi - lo,
                                     hc + (lo - c));
        } else {
            if (!tmp && !(tmp = malloc(cs))) {
                r = -ENOMEM;
                goto fail;
            }
            r = read_cluster_view(s, c, old, 0, tmp, 0, cs);
            if (r == 0) {
                memcpy(tmp + (lo - c), buf + (lo - off), hi - lo);
                r = file_pwrite_full(s->data_fd, tmp, cs, hc);
            }
        }
        if (r < 0)
            goto fail;
    }
    s->need_sync = true;
    /* Map the new clusters; release what the old entries held. */
    for (uint64_t k = 0; k < n; k++) {
        uint64_t old = qcow2_l2_get(s, l2, idx + k);
        qcow2_l2_set(s, l2, idx + k, ((uint64_t)host + k * cs) | QCOW2_OFLAG_COPIED,
                     0);
        if (!qcow2_has_data_file(s) &&
            (r = qcow2_free_l2_entry_clusters(s, old)) < 0)
            return r;
    }
    qcow2_cache_mark_dirty(&s->l2_cache, l2);
    return 0;

fail:
    /* Nothing maps the new clusters yet: give them back now. */
    if (!qcow2_has_data_file(s))
        (void)qcow2_update_refcount(s, (uint64_t)host, n * cs, -1);
    return r;
}

static bool std_in_place(const struct qcow2_state *s, uint64_t e)
{
    return qcow2_sc_type(s, e, 0, 0) == QCOW2_SC_NORMAL &&
           (e & QCOW2_OFLAG_COPIED);
}

/* Write within one L2 table (standard entries). Returns bytes done. */
static int64_t write_std(struct qcow2_state *s, const uint8_t *buf,
                         uint64_t off, uint64_t len)
{
    uint8_t *l2;
    uint64_t idx;
    int r = qcow2_get_l2(s, off, true, &l2, &idx);
    if (r < 0)
        return r;
    uint64_t cs = s->cluster_size;
    uint64_t in = qcow2_offset_into_cluster(s, off);
    uint64_t max = MIN(len, ((s->l2_entries - idx) << s->cluster_bits) - in);
    uint64_t nclusters = DIV_ROUND_UP(in + max, cs);
    uint64_t e = qcow2_l2_get(s, l2, idx);
    uint64_t k = 1, done;
    if (std_in_place(s, e)) {
        uint64_t host = e & QCOW2_L2E_OFFSET_MASK;
        while (k < nclusters) {
            uint64_t e2 = qcow2_l2_get(s, l2, idx + k);
            if (!std_in_place(s, e2) ||
                (e2 & QCOW2_L2E_OFFSET_MASK) != host + k * cs)
                break;
            k++;
        }
        done = MIN(max, k * cs - in);
        r = qcow2_pre_write_data(s, host + in, done);
        if (r == 0)
            r = blk_data_pwrite(s->node, s->data_fd, buf, done, host + in);
        s->need_sync = true;
    } else {
        while (k < nclusters && !std_in_place(s, qcow2_l2_get(s, l2, idx + k)))
            k++;
        done = MIN(max, k * cs - in);
        r = write_alloc_run(s, l2, idx, k, buf, off, done);
    }
    qcow2_cache_put(&s->l2_cache, l2);
    return r < 0 ? r : (int64_t)done;
}

/* Make the extended-L2 cluster at `off` writable in place: a host cluster
 * of its own (COPIED), holding what the old one held. */
static int ext_make_writable(struct qcow2_state *s, uint8_t *l2, uint64_t idx,
                             uint64_t guest_cluster)
{
    uint64_t e = qcow2_l2_get(s, l2, idx);
    uint64_t bm = qcow2_l2_get_bitmap(s, l2, idx);
    bool compressed = e & QCOW2_OFLAG_COMPRESSED;
    uint64_t host_old = compressed ? 0 : e & QCOW2_L2E_OFFSET_MASK;
    if (!compressed && (host_old || qcow2_has_data_file(s)) &&
        (e & QCOW2_OFLAG_COPIED))
        return 0;
    int64_t host = qcow2_has_data_file(s) ? (int64_t)guest_cluster
                                          : qcow2_alloc_clusters(s, 1);
    if (host < 0)
        return (int)host;
    int r = qcow2_pre_write_data(s, (uint64_t)host, s->cluster_size);
    if (r < 0) {
        if (!qcow2_has_data_file(s))
            (void)qcow2_update_refcount(s, (uint64_t)host, s->cluster_size, -1);
        return r;
    }
    uint64_t new_bm = compressed ? QCOW2_L2_BITMAP_ALL_ALLOC : bm;
    if (compressed || host_old) {
        /* Copy the old content: everything allocated must survive. */
        CLEANUP_FREE uint8_t *tmp = malloc(s->cluster_size);
        if (!tmp)
            return -ENOMEM;
        r = read_cluster_view(s, guest_cluster, e, bm, tmp, 0,
                              s->cluster_size);
        if (r < 0)
            return r;
        for (uint32_t sc = 0; sc < QCOW2_SUBCLUSTERS; sc++) {
            if (!(new_bm & (1ull << sc)))
                continue;
            uint64_t o = (uint64_t)sc << s->subcluster_bits;
            r = file_pwrite_full(s->data_fd, tmp + o, s->subcluster_size,
                                 (uint64_t)host + o);
            if (r < 0)
                return r;
        }
        s->need_sync = true;
    }
    qcow2_l2_set(s, l2, idx, (uint64_t)host | QCOW2_OFLAG_COPIED, new_bm);
    qcow2_cache_mark_dirty(&s->l2_cache, l2);
    if (!qcow2_has_data_file(s))
        return qcow2_free_l2_entry_clusters(s, e);
    return 0;
}

/* Write within one cluster (extended entries). Returns bytes done. */
static int64_t write_ext(struct qcow2_state *s, const uint8_t *buf,
                         uint64_t off, uint64_t len)
{
    uint8_t *l2;
    uint64_t idx;
    int r = qcow2_get_l2(s, off, true, &l2, &idx);
    if (r < 0)
        return r;
    uint64_t in = qcow2_offset_into_cluster(s, off);
    uint64_t guest_cluster = off - in;
    uint64_t done = MIN(len, s->cluster_size - in);
    r = ext_make_writable(s, l2, idx, guest_cluster);
    uint64_t e = qcow2_l2_get(s, l2, idx);
    uint64_t bm = qcow2_l2_get_bitmap(s, l2, idx);
    uint64_t host = e & QCOW2_L2E_OFFSET_MASK;
    if (r == 0)
        r = qcow2_pre_write_data(s, host + in, done);
    uint64_t pos = in, end = in + done;
    CLEANUP_FREE uint8_t *tmp = NULL;
    while (r == 0 && pos < end) {
        uint32_t sc = (uint32_t)(pos >> s->subcluster_bits);
        uint64_t sc_lo = (uint64_t)sc << s->subcluster_bits;
        uint64_t sc_hi = sc_lo + s->subcluster_size;
        uint64_t hi = MIN(end, sc_hi);
        enum qcow2_sc_type t = qcow2_sc_type(s, e, bm, sc);
        if (t == QCOW2_SC_NORMAL || (pos == sc_lo && hi == sc_hi)) {
            r = file_pwrite_full(s->data_fd, buf + (pos - in), hi - pos,
                                 host + pos);
        } else {
            /* Partial write into an unallocated or zero subcluster. */
            if (!tmp && !(tmp = malloc(s->subcluster_size))) {
                r = -ENOMEM;
                break;
            }
            r = read_cluster_view(s, guest_cluster, e, bm, tmp, sc_lo, sc_hi);
            if (r == 0) {
                memcpy(tmp + (pos - sc_lo), buf + (pos - in), hi - pos);
                r = file_pwrite_full(s->data_fd, tmp, s->subcluster_size,
                                     host + sc_lo);
            }
        }
        bm |= 1ull << sc;
        bm &= ~(1ull << (32 + sc));
        pos = hi;
    }
    if (r == 0) {
        s->need_sync = true;
        qcow2_l2_set(s, l2, idx, e, bm);
        qcow2_cache_mark_dirty(&s->l2_cache, l2);
    }
    qcow2_cache_put(&s->l2_cache, l2);
    return r < 0 ? r : (int64_t)done;
}

int qcow2_write(struct blk_node *node, const void *buf, uint64_t off,
                size_t len)
{
    struct qcow2_state *s = qcow2_state(node);
    const uint8_t *p = buf;
    while (len > 0) {
        int64_t n = s->ext_l2 ? write_ext(s, p, off, len)
                              : write_std(s, p, off, len);
        if (n < 0)
            return (int)n;
        p += n;
        off += (uint64_t)n;
        len -= (size_t)n;
    }
    return 0;
}

/* Write zero data (the fallback when metadata cannot express zeroes). */
static int write_zero_data(struct qcow2_state *s, uint64_t off, uint64_t len)
{
    uint64_t chunk = MIN(len, 4u << 20);
    CLEANUP_FREE uint8_t *zero = calloc(1, chunk ? chunk : 1);
    if (!zero)
        return -ENOMEM;
    while (len > 0) {
        uint64_t n = MIN(len, chunk);
        int r = qcow2_write(s->node, zero, off, (size_t)n);
        if (r < 0)
            return r;
        off += n;
        len -= n;
    }
    return 0;
}

static bool sc_type_allocated(enum qcow2_sc_type t)
{
    return t == QCOW2_SC_NORMAL || t == QCOW2_SC_ZERO_ALLOC ||
           t == QCOW2_SC_COMPRESSED;
}

/*
 * Mark whole (sub)clusters [off, off+len) zero in metadata (off and len
 * aligned to the subcluster size, or len reaching the end of the image).
 */
static int zero_aligned(struct qcow2_state *s, uint64_t off, uint64_t len,
                        unsigned flags)
{
    while (len > 0) {
        uint8_t *l2;
        uint64_t idx;
        int r = qcow2_get_l2(s, off, true, &l2, &idx);
        if (r < 0)
            return r;
        uint64_t in = qcow2_offset_into_cluster(s, off);
        uint64_t n = MIN(len, s->cluster_size - in);
        uint64_t e = qcow2_l2_get(s, l2, idx);
        uint64_t bm = qcow2_l2_get_bitmap(s, l2, idx);
        bool whole = in == 0 && (n == s->cluster_size || off + n >= s->node->size);
        uint64_t ne = e, nbm = bm;
        bool unmap = false;
        if (s->h.version < 3) {
            /* v2 has no zero flag; without a backing file (the only case
             * that gets here) an unallocated cluster reads zero. */
            unmap = sc_type_allocated(qcow2_sc_type(s, e, bm, 0));
            ne = 0;
        } else if (!s->ext_l2 || whole) {
            enum qcow2_sc_type t = qcow2_sc_type(s, e, bm, 0);
            unmap = t == QCOW2_SC_COMPRESSED ||
                    ((flags & CBT_ZERO_MAY_UNMAP) && sc_type_allocated(t));
            ne = unmap ? 0 : e;
            if (s->ext_l2)
                nbm = QCOW2_L2_BITMAP_ALL_ZEROES;
            else
                ne |= QCOW2_OFLAG_ZERO;
        } else if (e & QCOW2_OFLAG_COMPRESSED) {
            qcow2_cache_put(&s->l2_cache, l2);
            r = write_zero_data(s, off, n);
            if (r < 0)
                return r;
            off += n;
            len -= n;
            continue;
        } else {
            uint32_t sc0 = (uint32_t)(in >> s->subcluster_bits);
            uint32_t sc1 = (uint32_t)DIV_ROUND_UP(in + n, s->subcluster_size);
            for (uint32_t sc = sc0; sc < sc1; sc++) {
                nbm |= 1ull << (32 + sc);
                nbm &= ~(1ull << sc);
            }
        }
        if (ne != e || nbm != bm) {
            qcow2_l2_set(s, l2, idx, ne, nbm);
            qcow2_cache_mark_dirty(&s->l2_cache, l2);
            if (unmap && !qcow2_has_data_file(s))
                r = qcow2_free_l2_entry_clusters(s, e);
        }
        qcow2_cache_put(&s->l2_cache, l2);
        if (r < 0)
            return r;
        off += n;
        len -= n;
    }
    return 0;
}

/* A zero write of [off, off+len) inside one subcluster, not covering it. */
static int zero_partial(struct qcow2_state *s, uint64_t off, uint64_t len,
                        unsigned flags)
{
    uint64_t sc = s->subcluster_size;
    uint64_t lo = ALIGN_DOWN(off, sc);
    uint64_t hi = MIN(lo + sc, s->node->size);
    bool rest_zero = range_reads_zero(s, lo, off - lo) &&
                     range_reads_zero(s, off + len, hi - (off + len));
    if (rest_zero) {
        uint64_t bytes = sc;
        struct qcow2_map map;
        int r = qcow2_get_mapping(s, lo, &bytes, &map);
        if (r < 0)
            return r;
        if (map.type == QCOW2_SC_UNALLOC_PLAIN ||
            map.type == QCOW2_SC_UNALLOC_ALLOC ||
            map.type == QCOW2_SC_ZERO_PLAIN || map.type == QCOW2_SC_ZERO_ALLOC)
            return zero_aligned(s, lo, hi - lo, flags);
    }
    return write_zero_data(s, off, len);
}

int qcow2_write_zeroes(struct blk_node *node, uint64_t off, uint64_t len,
                       unsigned flags)
{
    struct qcow2_state *s = qcow2_state(node);
    if (s->h.version < 3 && node->backing)
        return write_zero_data(s, off, len);
    uint64_t sc = s->subcluster_size;
    uint64_t end = off + len;
    /* Head: up to the next subcluster boundary. */
    if (!IS_ALIGNED(off, sc)) {
        uint64_t n = MIN(len, ALIGN_UP(off, sc) - off);
        int r = zero_partial(s, off, n, flags);
        if (r < 0)
            return r;
        off += n;
    }
    if (off >= end)
        return 0;
    uint64_t mid_end = ALIGN_DOWN(end, sc);
    if (end == node->size)
        mid_end = end; /* the partial last subcluster ends the image */
    if (mid_end > off) {
        int r = zero_aligned(s, off, mid_end - off, flags);
        if (r < 0)
            return r;
        off = mid_end;
    }
    if (off < end)
        return zero_partial(s, off, end - off, flags);
    return 0;
}

int qcow2_discard(struct blk_node *node, uint64_t off, uint64_t len)
{
    struct qcow2_state *s = qcow2_state(node);
    /* v2 cannot make a range read zero over a backing file, and dropping
     * the clusters would expose the backing data: QEMU ignores such
     * discards, and so do we. */
    if (s->h.version < 3 && node->backing)
        return 0;
    uint64_t cs = s->cluster_size;
    uint64_t end = off + len;
    uint64_t lo = ALIGN_UP(off, cs);
    uint64_t hi = end == node->size ? end : ALIGN_DOWN(end, cs);
    while (lo < hi) {
        uint8_t *l2;
        uint64_t idx;
        int r = qcow2_get_l2(s, lo, false, &l2, &idx);
        if (r < 0)
            return r;
        uint64_t n = MIN(hi - lo, (s->l2_entries - idx) << s->cluster_bits);
        if (!l2 && !node->backing) {
            lo += n; /* unallocated without backing reads zero already */
            continue;
        }
        if (!l2) {
            r = qcow2_get_l2(s, lo, true, &l2, &idx);
            if (r < 0)
                return r;
        } else if (!(s->l1[lo >> (s->cluster_bits + s->l2_bits)] &
                     QCOW2_OFLAG_COPIED)) {
            /* Shared table: get our own copy before editing it. */
            qcow2_cache_put(&s->l2_cache, l2);
            r = qcow2_get_l2(s, lo, true, &l2, &idx);
            if (r < 0)
                return r;
        }
        for (uint64_t k = 0; k < DIV_ROUND_UP(n, cs) && r == 0; k++) {
            uint64_t e = qcow2_l2_get(s, l2, idx + k);
            uint64_t bm = qcow2_l2_get_bitmap(s, l2, idx + k);
            bool allocated = (e & QCOW2_OFLAG_COMPRESSED) ||
                             (e & QCOW2_L2E_OFFSET_MASK) ||
                             (qcow2_has_data_file(s) && (e & QCOW2_OFLAG_COPIED));
            uint64_t ne = e, nbm = bm;
            if (node->backing || allocated) {
                if (s->ext_l2) {
                    ne = 0;
                    nbm = QCOW2_L2_BITMAP_ALL_ZEROES;
                } else {
                    ne = s->h.version >= 3 ? QCOW2_OFLAG_ZERO : 0;
                }
            }
            if (ne == e && nbm == bm)
                continue;
            qcow2_l2_set(s, l2, idx + k, ne, nbm);
            qcow2_cache_mark_dirty(&s->l2_cache, l2);
            if (!qcow2_has_data_file(s))
                r = qcow2_free_l2_entry_clusters(s, e);
        }
        qcow2_cache_put(&s->l2_cache, l2);
        if (r < 0)
            return r;
        lo += n;
    }
    return 0;
}

/* Does the L2 table hold any entry that is not plainly unallocated? */
static bool l2_has_entries(const struct qcow2_state *s, const uint8_t *l2)
{
    for (uint64_t k = 0; k < s->l2_entries; k++)
        if (qcow2_l2_get(s, l2, k) || qcow2_l2_get_bitmap(s, l2, k))
            return true;
    return false;
}

int qcow2_l2_clear_from(struct qcow2_state *s, uint8_t *l2, uint64_t first)
{
    int r = 0;
    for (uint64_t k = first; k < s->l2_entries && r == 0; k++) {
        uint64_t e = qcow2_l2_get(s, l2, k);
        if (e == 0 && qcow2_l2_get_bitmap(s, l2, k) == 0)
            continue;
        qcow2_l2_set(s, l2, k, 0, 0);
        qcow2_cache_mark_dirty(&s->l2_cache, l2);
        if (!qcow2_has_data_file(s))
            r = qcow2_free_l2_entry_clusters(s, e);
    }
    return r;
}

int qcow2_make_empty(struct blk_node *node)
{
    struct qcow2_state *s = qcow2_state(node);
    /* A raw data file is the guest view itself: it cannot fall through. */
    if (s->data_file_raw)
        return -ENOTSUP;
    uint64_t table_bytes = s->l2_entries << s->cluster_bits;
    int r = 0;
    for (uint32_t i = 0; i < s->l1_size && r == 0; i++) {
        if (!(s->l1[i] & QCOW2_L1E_OFFSET_MASK))
            continue;
        uint64_t guest = (uint64_t)i * table_bytes;
        uint8_t *l2;
        uint64_t idx;
        r = qcow2_get_l2(s, guest, false, &l2, &idx);
        if (r < 0 || !l2)
            break;
        if (!l2_has_entries(s, l2)) {
            qcow2_cache_put(&s->l2_cache, l2);
            continue;
        }
        if (!(s->l1[i] & QCOW2_OFLAG_COPIED)) {
            /* Shared with a snapshot: edit a copy of our own. */
            qcow2_cache_put(&s->l2_cache, l2);
            r = qcow2_get_l2(s, guest, true, &l2, &idx);
            if (r < 0)
                break;
        }
        r = qcow2_l2_clear_from(s, l2, 0);
        qcow2_cache_put(&s->l2_cache, l2);
    }
    /* Tables first, then the frees (qcow2_flush_metadata's order). */
    if (r == 0)
        r = qcow2_flush_metadata(s);
    return r;
}

int qcow2_block_status(struct blk_node *node, uint64_t off, uint64_t len,
                       struct blk_status *st)
{
    struct qcow2_state *s = qcow2_state(node);
    uint64_t bytes = len;
    struct qcow2_map map;
    int r = qcow2_get_mapping(s, off, &bytes, &map);
    if (r < 0)
        return r;
    st->length = bytes;
    st->flags = 0;
    st->host_file = s->data_path ? s->data_path : node->filename;
    switch (map.type) {
    case QCOW2_SC_NORMAL:
        st->flags = BLK_STATUS_ALLOCATED | BLK_STATUS_DATA | BLK_STATUS_OFFSET;
        st->host_offset = map.host_offset;
        if (s->metadata_prealloc) {
            /* Preallocated metadata over a hole in the file reads zero. */
            off_t d = lseek(s->data_fd, (off_t)map.host_offset, SEEK_DATA);
            if (d < 0 || (uint64_t)d >= map.host_offset + bytes) {
                st->flags |= BLK_STATUS_ZERO;
            } else if ((uint64_t)d > map.host_offset) {
                st->flags |= BLK_STATUS_ZERO;
                st->length = (uint64_t)d - map.host_offset;
            } else {
                off_t h = lseek(s->data_fd, (off_t)map.host_offset, SEEK_HOLE);
                if (h > 0 && (uint64_t)h < map.host_offset + bytes)
                    st->length = (uint64_t)h - map.host_offset;
            }
        }
        break;
    case QCOW2_SC_ZERO_ALLOC:
        st->flags = BLK_STATUS_ALLOCATED | BLK_STATUS_ZERO | BLK_STATUS_OFFSET;
        st->host_offset = map.host_offset;
        break;
    case QCOW2_SC_ZERO_PLAIN:
        st->flags = BLK_STATUS_ALLOCATED | BLK_STATUS_ZERO;
        break;
    case QCOW2_SC_COMPRESSED:
        st->flags = BLK_STATUS_ALLOCATED | BLK_STATUS_DATA | BLK_STATUS_COMPRESSED;
        break;
    case QCOW2_SC_UNALLOC_ALLOC:
        /* Not allocated, but the cluster is reserved: QEMU reports it. */
        st->flags = BLK_STATUS_OFFSET;
        st->host_offset = map.host_offset;
        break;
    default:
        break;
    }
    return 0;
}
