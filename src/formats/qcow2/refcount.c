/*
 * qcow2 refcounts and cluster allocation.
 *
 * Two levels: the refcount table (in memory, native order) points at
 * refcount blocks (in the metadata cache, on-disk order).  Entries are
 * 1..64 bits wide (refcount_order 0..6): sub-byte widths are packed
 * LSB-first within each byte, wider ones are big-endian integers.
 *
 * Allocation scans for a free run from free_hint (no free cluster lies
 * below it).  A cluster in a group with no refcount block is free; giving
 * the group a block puts the block inside the group itself, at the first
 * cluster of the run being allocated, so the block describes itself.  When
 * the table itself is full it is grown: new blocks and a larger table are
 * placed together past the last used cluster, covering themselves, written
 * and synced, and only then does the header switch to them (a crash before
 * leaves leaks, after it leaves the old table leaked until freed).
 *
 * Decrements are deferred (qcow2_free_clusters_deferred) until the flush
 * that removes the references; see qcow2.h.
 */
#include <inttypes.h>

#include "qcow2.h"

uint64_t qcow2_rb_get(const uint8_t *rb, uint64_t idx, uint32_t order)
{
    switch (order) {
    case 0: case 1: case 2: {
        uint32_t width = 1u << order;
        uint64_t bit = idx * width;
        return (rb[bit / 8] >> (bit % 8)) & ((1u << width) - 1);
    }
    case 3: return rb[idx];
    case 4: return ldbe16(rb + 2 * idx);
    case 5: return ldbe32(rb + 4 * idx);
    default: return ldbe64(rb + 8 * idx);
    }
}

void qcow2_rb_set(uint8_t *rb, uint64_t idx, uint32_t order, uint64_t v)
{
    switch (order) {
    case 0: case 1: case 2: {
        uint32_t width = 1u << order;
        uint64_t bit = idx * width;
        uint8_t mask = (uint8_t)(((1u << width) - 1) << (bit % 8));
        rb[bit / 8] = (uint8_t)((rb[bit / 8] & ~mask) |
                                ((v << (bit % 8)) & mask));
        break;
    }
    case 3: rb[idx] = (uint8_t)v; break;
    case 4: stbe16(rb + 2 * idx, (uint16_t)v); break;
    case 5: stbe32(rb + 4 * idx, (uint32_t)v); break;
    default: stbe64(rb + 8 * idx, v); break;
    }
}

int qcow2_load_reftable(struct qcow2_state *s, uint64_t file_len,
                        struct cbt_error **errp)
{
    const char *fn = s->node->filename;
    struct qcow2_header *h = &s->h;
    s->refcount_order = h->refcount_order;
    s->refcount_bits = 1u << h->refcount_order;
    s->refcount_max = s->refcount_bits == 64 ? UINT64_MAX
                                             : (1ull << s->refcount_bits) - 1;
    s->rb_bits = s->cluster_bits + 3 - h->refcount_order;
    s->rb_entries = 1ull << s->rb_bits;

    if (!IS_ALIGNED(h->refcount_table_offset, s->cluster_size)) {
        cbt_error_set(errp, EINVAL,
                      "%s: refcount table offset 0x%" PRIx64 " is not "
                      "cluster aligned", fn, h->refcount_table_offset);
        return -1;
    }
    if (h->refcount_table_clusters == 0 && !s->check_mode) {
        cbt_error_set(errp, EINVAL, "%s: image has no refcount table", fn);
        return -1;
    }
    uint64_t bytes = (uint64_t)h->refcount_table_clusters << s->cluster_bits;
    if (bytes > QCOW2_MAX_REFTABLE_BYTES) {
        cbt_error_set(errp, EINVAL,
                      "%s: refcount table too large (%u clusters, max %u bytes)",
                      fn, h->refcount_table_clusters, QCOW2_MAX_REFTABLE_BYTES);
        return -1;
    }
    uint64_t end;
    /* Check mode reads what there is (zeroes past the end) so that check
     * can report and rebuild; anything else refuses the image. */
    if (add_overflow_u64(h->refcount_table_offset, bytes, &end) ||
        (end > ALIGN_UP(file_len, s->cluster_size) && !s->check_mode)) {
        cbt_error_set(errp, EINVAL,
                      "%s: refcount table (offset 0x%" PRIx64 ", %" PRIu64
                      " bytes) lies past the end of the file", fn,
                      h->refcount_table_offset, bytes);
        return -1;
    }
    s->reftable_entries = bytes / 8;
    s->reftable = calloc(MAX(s->reftable_entries, 1), 8);
    if (!s->reftable) {
        cbt_error_set(errp, ENOMEM, "%s: out of memory", fn);
        return -1;
    }
    if (bytes) {
        int r = file_pread_full(s->node->fd, s->reftable, bytes,
                                h->refcount_table_offset);
        if (r < 0) {
            cbt_error_set(errp, -r, "%s: cannot read refcount table: %s", fn,
                          strerror(-r));
            return -1;
        }
    }
    for (uint64_t i = 0; i < s->reftable_entries; i++)
        s->reftable[i] = be64_to_cpu(s->reftable[i]);
    s->reftable_dirty_lo = UINT64_MAX;
    s->reftable_dirty_hi = 0;
    return 0;
}

/* Offset of the refcount block of group g, 0 if none; -EIO if corrupt. */
static int64_t refblock_offset(struct qcow2_state *s, uint64_t g)
{
    if (g >= s->reftable_entries)
        return 0;
    uint64_t off = s->reftable[g] & QCOW2_REFT_OFFSET_MASK;
    if (off == 0)
        return 0;
    if (!IS_ALIGNED(off, s->cluster_size) || off > INT64_MAX)
        return -EIO;
    return (int64_t)off;
}

int qcow2_get_refcount(struct qcow2_state *s, uint64_t ci, uint64_t *refcount)
{
    int64_t rb_off = refblock_offset(s, ci >> s->rb_bits);
    if (rb_off <= 0) {
        *refcount = 0;
        return (int)rb_off;
    }
    uint8_t *rb;
    int r = qcow2_cache_get(s, &s->rb_cache, (uint64_t)rb_off, false, &rb);
    if (r < 0)
        return r;
    *refcount = qcow2_rb_get(rb, ci & (s->rb_entries - 1), s->refcount_order);
    qcow2_cache_put(&s->rb_cache, rb);
    return 0;
}

static void mark_reftable_dirty(struct qcow2_state *s, uint64_t g)
{
    s->reftable_dirty_lo = MIN(s->reftable_dirty_lo, g);
    s->reftable_dirty_hi = MAX(s->reftable_dirty_hi, g + 1);
}

static int grow_reftable(struct qcow2_state *s, uint64_t min_entries);

/* Give group g a refcount block placed at cluster `at` (inside group g). */
static int create_refblock(struct qcow2_state *s, uint64_t g, uint64_t at)
{
    if (g >= s->reftable_entries) {
        int r = grow_reftable(s, g + 1);
        if (r < 0)
            return r;
        if (refblock_offset(s, g) != 0)
            return 0; /* the growth covered g already */
    }
    uint8_t *rb;
    int r = qcow2_cache_get(s, &s->rb_cache, at << s->cluster_bits, true, &rb);
    if (r < 0)
        return r;
    qcow2_rb_set(rb, at & (s->rb_entries - 1), s->refcount_order, 1);
    qcow2_cache_mark_dirty(&s->rb_cache, rb);
    qcow2_cache_put(&s->rb_cache, rb);
    r = qcow2_meta_add(s, at << s->cluster_bits, QCOW2_OL_REFCOUNT_BLOCK);
    if (r < 0)
        return r;
    s->reftable[g] = at << s->cluster_bits;
    mark_reftable_dirty(s, g);
    s->alloc_end = MAX(s->alloc_end, at + 1);
    return 0;
}

/* Add delta to one cluster's refcount; its block must exist if delta > 0. */
static int update_one(struct qcow2_state *s, uint64_t ci, int64_t delta)
{
    int64_t rb_off = refblock_offset(s, ci >> s->rb_bits);
    if (rb_off < 0)
        return (int)rb_off;
    if (rb_off == 0)
        return -EIO; /* decrement of an unrefcounted cluster, or a bug */
    /* A block that cannot be written back must not change: found out
     * before anything is written for the allocation it serves. */
    int r = qcow2_pre_write(s, (uint64_t)rb_off, s->cluster_size,
                            QCOW2_OL_REFCOUNT_BLOCK);
    if (r < 0)
        return r;
    uint8_t *rb;
    r = qcow2_cache_get(s, &s->rb_cache, (uint64_t)rb_off, false, &rb);
    if (r < 0)
        return r;
    uint64_t idx = ci & (s->rb_entries - 1);
    uint64_t old = qcow2_rb_get(rb, idx, s->refcount_order);
    uint64_t val;
    if (delta < 0) {
        if (old < (uint64_t)-delta) {
            qcow2_cache_put(&s->rb_cache, rb);
            return -EIO; /* refcount would drop below zero */
        }
        val = old - (uint64_t)-delta;
    } else {
        if (s->refcount_max - old < (uint64_t)delta) {
            qcow2_cache_put(&s->rb_cache, rb);
            return -ERANGE;
        }
        val = old + (uint64_t)delta;
    }
    qcow2_rb_set(rb, idx, s->refcount_order, val);
    qcow2_cache_mark_dirty(&s->rb_cache, rb);
    qcow2_cache_put(&s->rb_cache, rb);
    if (val == 0) {
        s->free_hint = MIN(s->free_hint, ci);
        /* The partly used cluster of compressed data is gone: the next
         * compressed cluster must not share it with a new owner. */
        if (s->free_byte_offset && (s->free_byte_offset >> s->cluster_bits) == ci)
            s->free_byte_offset = 0;
        /* A freed cluster may have been a cached table. */
        qcow2_cache_discard(&s->l2_cache, ci << s->cluster_bits);
        qcow2_cache_discard(&s->rb_cache, ci << s->cluster_bits);
    } else if (old == 0) {
        s->alloc_end = MAX(s->alloc_end, ci + 1);
    }
    return 0;
}

int qcow2_update_refcount(struct qcow2_state *s, uint64_t offset, uint64_t len,
                          int64_t delta)
{
    if (len == 0)
        return 0;
    uint64_t first = offset >> s->cluster_bits;
    uint64_t last = (offset + len - 1) >> s->cluster_bits;
    for (uint64_t ci = first; ci <= last; ci++) {
        if (delta > 0 && refblock_offset(s, ci >> s->rb_bits) == 0) {
            /* Only reached for clusters of a group without a block, e.g.
             * when check repairs refcounts: give the group a block at the
             * first free cluster found by the allocator. */
            int64_t at = qcow2_alloc_clusters(s, 1);
            if (at < 0)
                return (int)at;
            if (refblock_offset(s, ci >> s->rb_bits) == 0)
                return -EIO;
            /* Release the cluster the allocator handed out. */
            int r = update_one(s, (uint64_t)at >> s->cluster_bits, -1);
            if (r < 0)
                return r;
        }
        int r = update_one(s, ci, delta);
        if (r < 0)
            return r;
    }
    return 0;
}

/* Largest cluster index whose offset fits in an L2/L1 entry. */
#define MAX_CLUSTER_OFFSET (QCOW2_L2E_OFFSET_MASK)

/* The first cluster past the end of the file and past every cluster in
 * use: nothing there can be referenced, whatever the refcounts say. */
static uint64_t append_start(struct qcow2_state *s)
{
    uint64_t len = 0;
    (void)file_size(s->node->fd, &len);
    return MAX(s->alloc_end, qcow2_size_to_clusters(s, len));
}

static int64_t alloc_clusters(struct qcow2_state *s, uint64_t n, bool append)
{
    if (n == 0)
        return -EINVAL;
    /* Appending starts past everything there is now; refcount blocks the
     * attempts below add there are skipped like any used cluster. */
    uint64_t base = append ? append_start(s) : 0;
    for (int attempts = 0; attempts < 1000; attempts++) {
        /* Find n free clusters in a row, starting at free_hint (or past
         * everything, where all are free). */
        uint64_t start = append ? base : MAX(s->free_hint, 1);
        uint64_t run = 0;
        bool hint_moved = append;
        while (run < n) {
            uint64_t ci = start + run;
            if ((ci << s->cluster_bits) > MAX_CLUSTER_OFFSET)
                return -ENOSPC;
            uint64_t rc;
            int r;
            if (ci >= s->alloc_end) {
                rc = 0; /* nothing past the last used cluster */
            } else if ((r = qcow2_get_refcount(s, ci, &rc)) < 0) {
                return r;
            }
            if (rc == 0) {
                if (!hint_moved && run == 0) {
                    s->free_hint = ci;
                    hint_moved = true;
                }
                run++;
            } else {
                start = ci + 1;
                run = 0;
            }
        }
        /* Every group the run touches needs a refcount block. */
        bool retry = false;
        for (uint64_t g = start >> s->rb_bits; g <= (start + n - 1) >> s->rb_bits;
             g++) {
            int64_t rb = refblock_offset(s, g);
            if (rb < 0)
                return rb;
            if (rb == 0) {
                /* Put the block in this group but outside the run, so the
                 * run survives; only a run covering the whole group has to
                 * move (and then the next try fits). */
                uint64_t g_lo = g << s->rb_bits, g_hi = (g + 1) << s->rb_bits;
                uint64_t at = g_lo < start ? (append ? start : g_lo)
                              : start + n < g_hi ? start + n
                                                 : g_lo;
                int r = create_refblock(s, g, at);
                if (r < 0)
                    return r;
                retry = true;
                break;
            }
        }
        if (retry)
            continue;
        for (uint64_t ci = start; ci < start + n; ci++) {
            int r = update_one(s, ci, 1);
            if (r < 0)
                return r;
        }
        if (s->free_hint == start)
            s->free_hint = start + n;
        s->alloc_end = MAX(s->alloc_end, start + n);
        return (int64_t)(start << s->cluster_bits);
    }
    return -EIO;
}

int64_t qcow2_alloc_clusters(struct qcow2_state *s, uint64_t n)
{
    return alloc_clusters(s, n, false);
}

int64_t qcow2_alloc_clusters_append(struct qcow2_state *s, uint64_t n)
{
    return alloc_clusters(s, n, true);
}

int64_t qcow2_alloc_bytes(struct qcow2_state *s, uint64_t size)
{
    uint64_t cs = s->cluster_size;
    if (size == 0 || size > cs)
        return -EINVAL;
    uint64_t off = s->free_byte_offset;
    if (off) {
        /* A cluster whose refcount cannot grow takes no more sharers. */
        uint64_t rc;
        int r = qcow2_get_refcount(s, off >> s->cluster_bits, &rc);
        if (r < 0)
            return r;
        if (rc == 0 || rc >= s->refcount_max)
            off = 0;
    }
    int64_t start;
    if (off && cs - qcow2_offset_into_cluster(s, off) >= size) {
        int r = qcow2_update_refcount(s, off, 1, 1);
        if (r < 0)
            return r;
        start = (int64_t)off;
    } else {
        int64_t c = qcow2_alloc_clusters(s, 1);
        if (c < 0)
            return c;
        if (off && (uint64_t)c == ALIGN_UP(off, cs)) {
            /* Contiguous: the bytes run on from the partly used cluster,
             * which gains a reference too. */
            int r = qcow2_update_refcount(s, off, 1, 1);
            if (r < 0) {
                (void)qcow2_update_refcount(s, (uint64_t)c, cs, -1);
                return r;
            }
            start = (int64_t)off;
        } else {
            start = c;
        }
    }
    uint64_t end = (uint64_t)start + size;
    if (end - 1 > s->cmp_offset_mask) {
        /* Beyond what a compressed descriptor can address. */
        (void)qcow2_update_refcount(s, (uint64_t)start, size, -1);
        s->free_byte_offset = 0;
        return -ENOSPC;
    }
    s->free_byte_offset = qcow2_offset_into_cluster(s, end) ? end : 0;
    return start;
}

/*
 * Grow the refcount table to at least min_entries: new blocks for the
 * groups the new area lands in, and the new table, all past alloc_end and
 * refcounted by those blocks.  Synced before the header switches over.
 */
static int grow_reftable(struct qcow2_state *s, uint64_t min_entries)
{
    uint64_t per_cluster = s->cluster_size / 8;
    uint64_t entries = MAX(min_entries, s->reftable_entries * 2);
    entries = ALIGN_UP(entries, per_cluster);
    if (entries * 8 > QCOW2_MAX_REFTABLE_BYTES)
        return -EFBIG;
    uint64_t tclusters = entries / per_cluster;
    uint64_t start = append_start(s);
    uint64_t nblocks = 0;
    for (;;) {
        uint64_t end = start + nblocks + tclusters;
        uint64_t need = 0;
        for (uint64_t g = start >> s->rb_bits; g <= (end - 1) >> s->rb_bits; g++)
            if (g >= s->reftable_entries || s->reftable[g] == 0)
                need++;
        if (need == nblocks)
            break;
        nblocks = need;
    }
    uint64_t *table = calloc(entries, 8);
    if (!table)
        return -ENOMEM;
    memcpy(table, s->reftable, s->reftable_entries * 8);
    uint64_t *old_table = s->reftable;
    uint64_t old_entries = s->reftable_entries;
    uint64_t old_offset = s->h.refcount_table_offset;
    uint64_t old_clusters = s->h.refcount_table_clusters;

    /* Place the new blocks first, then the table. */
    uint64_t k = 0;
    uint64_t end = start + nblocks + tclusters;
    for (uint64_t g = start >> s->rb_bits; g <= (end - 1) >> s->rb_bits; g++) {
        if (g < old_entries && old_table[g] != 0)
            continue;
        uint64_t at = start + k++;
        uint8_t *rb;
        int r = qcow2_cache_get(s, &s->rb_cache, at << s->cluster_bits, true, &rb);
        if (r < 0) {
            free(table);
            return r;
        }
        qcow2_cache_mark_dirty(&s->rb_cache, rb);
        qcow2_cache_put(&s->rb_cache, rb);
        table[g] = at << s->cluster_bits;
    }
    s->reftable = table;
    s->reftable_entries = entries;
    int r = 0;
    for (uint64_t ci = start; ci < end && r == 0; ci++)
        r = update_one(s, ci, 1);
    s->alloc_end = MAX(s->alloc_end, end);
    uint64_t toff = (start + nblocks) << s->cluster_bits;
    if (r == 0)
        r = qcow2_cache_write_dirty(s, &s->rb_cache);
    if (r == 0) {
        /* Write the whole new table in one go. */
        uint64_t *be = malloc(entries * 8);
        if (!be) {
            r = -ENOMEM;
        } else {
            for (uint64_t i = 0; i < entries; i++)
                be[i] = cpu_to_be64(table[i]);
            r = qcow2_pwrite_meta(s, be, entries * 8, toff, 0);
            free(be);
        }
    }
    if (r == 0)
        r = qcow2_sync(s);
    if (r == 0) {
        s->h.refcount_table_offset = toff;
        s->h.refcount_table_clusters = (uint32_t)tclusters;
        r = qcow2_write_header(s);
    }
    if (r < 0) {
        /* Keep using the old table; the new area is leaked at worst. */
        s->h.refcount_table_offset = old_offset;
        s->h.refcount_table_clusters = (uint32_t)old_clusters;
        s->reftable = old_table;
        s->reftable_entries = old_entries;
        free(table);
        return r;
    }
    free(old_table);
    s->reftable_dirty_lo = UINT64_MAX;
    s->reftable_dirty_hi = 0;
    qcow2_meta_invalidate(s);
    /* The header no longer points at the old table: free it now. */
    return qcow2_update_refcount(s, old_offset, old_clusters << s->cluster_bits,
                                 -1);
}

int qcow2_free_clusters_deferred(struct qcow2_state *s, uint64_t offset,
                                 uint64_t len)
{
    if (len == 0)
        return 0;
    if (s->nb_pending_free == s->cap_pending_free) {
        size_t cap = s->cap_pending_free ? s->cap_pending_free * 2 : 64;
        uint64_t *o = realloc(s->pending_free, cap * sizeof(*o));
        if (!o)
            return -ENOMEM;
        s->pending_free = o;
        uint64_t *l = realloc(s->pending_free_len, cap * sizeof(*l));
        if (!l)
            return -ENOMEM;
        s->pending_free_len = l;
        s->cap_pending_free = cap;
    }
    s->pending_free[s->nb_pending_free] = offset;
    s->pending_free_len[s->nb_pending_free] = len;
    s->nb_pending_free++;
    return 0;
}

void qcow2_compressed_span(const struct qcow2_state *s, uint64_t l2e,
                           uint64_t *host_off, uint64_t *len)
{
    uint64_t off = l2e & s->cmp_offset_mask;
    uint64_t nsect = ((l2e >> s->csize_shift) & s->csize_mask) + 1;
    *host_off = off;
    /* The data runs to the end of its last 512-byte sector. */
    *len = nsect * 512 - (off & 511);
}

int qcow2_free_l2_entry_clusters(struct qcow2_state *s, uint64_t l2e)
{
    if (l2e & QCOW2_OFLAG_COMPRESSED) {
        uint64_t off, len;
        qcow2_compressed_span(s, l2e, &off, &len);
        return qcow2_free_clusters_deferred(s, off, len);
    }
    uint64_t off = l2e & QCOW2_L2E_OFFSET_MASK;
    if (off == 0 || qcow2_has_data_file(s))
        return 0;
    return qcow2_free_clusters_deferred(s, off, s->cluster_size);
}

int qcow2_apply_pending_frees(struct qcow2_state *s)
{
    /* Whole freed clusters go back to the host file system, one hole per
     * run of adjacent ones (emptying a layer frees thousands at once). */
    uint64_t hole = 0, hole_end = 0;
    int r = 0;
    size_t i;
    for (i = 0; i < s->nb_pending_free; i++) {
        uint64_t off = s->pending_free[i], len = s->pending_free_len[i];
        /* What the dropped references pointed at may not be metadata. */
        r = qcow2_pre_free(s, off, len, 0);
        if (r == 0)
            r = qcow2_update_refcount(s, off, len, -1);
        if (r < 0)
            break;
        uint64_t first = ALIGN_UP(off, s->cluster_size);
        uint64_t end = ALIGN_DOWN(off + len, s->cluster_size);
        for (uint64_t c = first; c < end; c += s->cluster_size) {
            uint64_t rc;
            if (qcow2_get_refcount(s, c >> s->cluster_bits, &rc) < 0 || rc)
                continue;
            if (c != hole_end) {
                if (hole_end > hole)
                    (void)file_punch_hole(s->node->fd, hole, hole_end - hole);
                hole = c;
            }
            hole_end = c + s->cluster_size;
        }
    }
    if (hole_end > hole)
        (void)file_punch_hole(s->node->fd, hole, hole_end - hole);
    /* Keep only what was not applied: a retry must not free twice. */
    size_t left = s->nb_pending_free - i;
    memmove(s->pending_free, s->pending_free + i,
            left * sizeof(*s->pending_free));
    memmove(s->pending_free_len, s->pending_free_len + i,
            left * sizeof(*s->pending_free_len));
    s->nb_pending_free = left;
    return r;
}

int qcow2_write_refcounts(struct qcow2_state *s)
{
    int r = qcow2_cache_write_dirty(s, &s->rb_cache);
    if (r < 0)
        return r;
    if (s->reftable_dirty_lo >= s->reftable_dirty_hi)
        return 0;
    /* New blocks must be durable before the table points at them. */
    r = qcow2_sync(s);
    if (r < 0)
        return r;
    uint64_t lo = s->reftable_dirty_lo, hi = s->reftable_dirty_hi;
    uint64_t *be = malloc((hi - lo) * 8);
    if (!be)
        return -ENOMEM;
    for (uint64_t i = lo; i < hi; i++)
        be[i - lo] = cpu_to_be64(s->reftable[i]);
    r = qcow2_pwrite_meta(s, be, (hi - lo) * 8,
                          s->h.refcount_table_offset + lo * 8,
                          QCOW2_OL_REFCOUNT_TABLE);
    free(be);
    if (r < 0)
        return r;
    s->need_sync = true;
    s->reftable_dirty_lo = UINT64_MAX;
    s->reftable_dirty_hi = 0;
    return 0;
}

int qcow2_compute_alloc_end(struct qcow2_state *s)
{
    /* Walk groups from the top to find the last cluster in use. */
    for (uint64_t g = s->reftable_entries; g-- > 0;) {
        int64_t rb_off = refblock_offset(s, g);
        if (rb_off < 0)
            return (int)rb_off;
        if (rb_off == 0)
            continue;
        uint8_t *rb;
        int r = qcow2_cache_get(s, &s->rb_cache, (uint64_t)rb_off, false, &rb);
        if (r < 0)
            return r;
        for (uint64_t i = s->rb_entries; i-- > 0;) {
            if (qcow2_rb_get(rb, i, s->refcount_order)) {
                s->alloc_end = (g << s->rb_bits) + i + 1;
                qcow2_cache_put(&s->rb_cache, rb);
                return 0;
            }
        }
        qcow2_cache_put(&s->rb_cache, rb);
    }
    s->alloc_end = 1;
    return 0;
}
