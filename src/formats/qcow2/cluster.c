/*
 * qcow2 L1/L2 mapping: decoding L2 entries (standard and extended) into
 * per-subcluster types, finding the mapping of a guest range, and getting
 * an L2 table ready for writing (allocating a new one, or copying one that
 * an internal snapshot shares).  Without extended L2 a cluster is treated as
 * one subcluster, so the read and write paths have one shape for both.
 */
#include <inttypes.h>

#include "qcow2.h"

uint64_t qcow2_l2_get(const struct qcow2_state *s, const uint8_t *l2,
                      uint64_t idx)
{
    return ldbe64(l2 + idx * s->l2_entry_size);
}

uint64_t qcow2_l2_get_bitmap(const struct qcow2_state *s, const uint8_t *l2,
                             uint64_t idx)
{
    return s->ext_l2 ? ldbe64(l2 + idx * 16 + 8) : 0;
}

void qcow2_l2_set(const struct qcow2_state *s, uint8_t *l2, uint64_t idx,
                  uint64_t entry, uint64_t bitmap)
{
    stbe64(l2 + idx * s->l2_entry_size, entry);
    if (s->ext_l2)
        stbe64(l2 + idx * 16 + 8, bitmap);
}

/* Type of subcluster sc of the cluster described by (l2e, bitmap). */
enum qcow2_sc_type qcow2_sc_type(const struct qcow2_state *s, uint64_t l2e,
                                 uint64_t bitmap, uint32_t sc)
{
    if (l2e & QCOW2_OFLAG_COMPRESSED) {
        if (s->ext_l2 && bitmap != 0)
            return QCOW2_SC_INVALID;
        return QCOW2_SC_COMPRESSED;
    }
    uint64_t off = l2e & QCOW2_L2E_OFFSET_MASK;
    bool allocated = off != 0 ||
                     (qcow2_has_data_file(s) && (l2e & QCOW2_OFLAG_COPIED));
    if (!s->ext_l2) {
        if (l2e & QCOW2_OFLAG_ZERO)
            return allocated ? QCOW2_SC_ZERO_ALLOC : QCOW2_SC_ZERO_PLAIN;
        return allocated ? QCOW2_SC_NORMAL : QCOW2_SC_UNALLOC_PLAIN;
    }
    bool alloc_bit = bitmap & (1ull << sc);
    bool zero_bit = bitmap & (1ull << (32 + sc));
    if (alloc_bit && zero_bit)
        return QCOW2_SC_INVALID;
    if (!allocated) {
        if (bitmap & QCOW2_L2_BITMAP_ALL_ALLOC)
            return QCOW2_SC_INVALID;
        return zero_bit ? QCOW2_SC_ZERO_PLAIN : QCOW2_SC_UNALLOC_PLAIN;
    }
    if (zero_bit)
        return QCOW2_SC_ZERO_ALLOC;
    return alloc_bit ? QCOW2_SC_NORMAL : QCOW2_SC_UNALLOC_ALLOC;
}

int qcow2_check_l1_entry(const struct qcow2_state *s, uint64_t l1e)
{
    uint64_t off = l1e & QCOW2_L1E_OFFSET_MASK;
    if (off && !IS_ALIGNED(off, s->cluster_size))
        return -EIO;
    return 0;
}

int qcow2_load_l1(struct qcow2_state *s, uint64_t file_len,
                  struct cbt_error **errp)
{
    const char *fn = s->node->filename;
    struct qcow2_header *h = &s->h;
    uint64_t needed = qcow2_l1_entries_for(h->size, s->cluster_bits, s->l2_bits);
    if ((uint64_t)h->l1_size * 8 > QCOW2_MAX_L1_BYTES) {
        cbt_error_set(errp, EFBIG,
                      "%s: L1 table too large (%u entries, max %u bytes)", fn,
                      h->l1_size, QCOW2_MAX_L1_BYTES);
        return -1;
    }
    if (h->l1_size < needed) {
        cbt_error_set(errp, EINVAL,
                      "%s: L1 table too small (%u entries) for virtual size "
                      "%" PRIu64 " (needs %" PRIu64 ")", fn, h->l1_size, h->size,
                      needed);
        return -1;
    }
    if (h->l1_size && !IS_ALIGNED(h->l1_table_offset, s->cluster_size)) {
        cbt_error_set(errp, EINVAL,
                      "%s: L1 table offset 0x%" PRIx64 " is not cluster aligned",
                      fn, h->l1_table_offset);
        return -1;
    }
    uint64_t bytes = (uint64_t)h->l1_size * 8, end;
    if (h->l1_size && (add_overflow_u64(h->l1_table_offset, bytes, &end) ||
                       (end > file_len && !s->check_mode))) {
        cbt_error_set(errp, EINVAL,
                      "%s: L1 table (offset 0x%" PRIx64 ", %" PRIu64
                      " bytes) lies past the end of the file", fn,
                      h->l1_table_offset, bytes);
        return -1;
    }
    s->l1_size = h->l1_size;
    s->l1 = calloc(MAX(s->l1_size, 1), 8);
    if (!s->l1) {
        cbt_error_set(errp, ENOMEM, "%s: out of memory", fn);
        return -1;
    }
    if (bytes) {
        int r = file_pread_full(s->node->fd, s->l1, bytes, h->l1_table_offset);
        if (r < 0) {
            cbt_error_set(errp, -r, "%s: cannot read L1 table: %s", fn,
                          strerror(-r));
            return -1;
        }
    }
    for (uint32_t i = 0; i < s->l1_size; i++)
        s->l1[i] = be64_to_cpu(s->l1[i]);
    s->l1_dirty_lo = UINT32_MAX;
    s->l1_dirty_hi = 0;
    return 0;
}

void qcow2_mark_l1_dirty(struct qcow2_state *s, uint32_t idx)
{
    s->l1_dirty_lo = MIN(s->l1_dirty_lo, idx);
    s->l1_dirty_hi = MAX(s->l1_dirty_hi, idx + 1);
}

int qcow2_write_l1(struct qcow2_state *s)
{
    if (s->l1_dirty_lo >= s->l1_dirty_hi)
        return 0;
    uint32_t lo = s->l1_dirty_lo, hi = s->l1_dirty_hi;
    uint64_t *be = malloc((size_t)(hi - lo) * 8);
    if (!be)
        return -ENOMEM;
    for (uint32_t i = lo; i < hi; i++)
        be[i - lo] = cpu_to_be64(s->l1[i]);
    int r = qcow2_pwrite_meta(s, be, (size_t)(hi - lo) * 8,
                              s->h.l1_table_offset + (uint64_t)lo * 8,
                              QCOW2_OL_ACTIVE_L1);
    free(be);
    if (r < 0)
        return r;
    s->need_sync = true;
    s->l1_dirty_lo = UINT32_MAX;
    s->l1_dirty_hi = 0;
    return 0;
}

/* L2 table offset for an L1 index; 0 if unallocated, -EIO if corrupt. */
static int64_t l2_offset(struct qcow2_state *s, uint64_t l1_index)
{
    if (l1_index >= s->l1_size)
        return 0;
    uint64_t l1e = s->l1[l1_index];
    uint64_t off = l1e & QCOW2_L1E_OFFSET_MASK;
    if (qcow2_check_l1_entry(s, l1e) < 0)
        return qcow2_damaged(s, "L2 table offset %#" PRIx64 " unaligned (L1 "
                             "index: %#" PRIx64 ")", off, l1_index);
    if (off == 0)
        return 0;
    if (off < s->cluster_size)
        return qcow2_damaged(s, "L2 table offset %#" PRIx64 " is in the "
                             "header cluster (L1 index: %#" PRIx64 ")", off,
                             l1_index);
    return (int64_t)off;
}

/* Pin the L2 table at l2_off for reading, saying which table could not be
 * read (a short read: past the end of the file). */
static int read_l2(struct qcow2_state *s, uint64_t l2_off, uint64_t l1_index,
                   uint8_t **l2)
{
    int r = qcow2_cache_get(s, &s->l2_cache, l2_off, false, l2);
    if (r != -EIO)
        return r;
    uint64_t len = 0;
    (void)file_size(s->node->fd, &len);
    if (len > l2_off && len - l2_off >= s->cluster_size)
        return r; /* the host's I/O error, not the image's damage */
    return qcow2_damaged(s, "cannot read the L2 table at %#" PRIx64 " (L1 "
                         "index: %#" PRIx64 "): the file ends at %#" PRIx64,
                         l2_off, l1_index, len);
}

int qcow2_get_l2(struct qcow2_state *s, uint64_t off, bool alloc, uint8_t **l2,
                 uint64_t *l2_index)
{
    uint64_t cluster = off >> s->cluster_bits;
    uint64_t l1_index = cluster >> s->l2_bits;
    *l2_index = cluster & (s->l2_entries - 1);
    *l2 = NULL;
    int64_t l2_off = l2_offset(s, l1_index);
    if (l2_off < 0)
        return (int)l2_off;
    if (l1_index >= s->l1_size)
        return alloc ? -EIO : 0; /* the caller checked the range */
    bool copied = s->l1[l1_index] & QCOW2_OFLAG_COPIED;
    /* A table about to change must be one that can be written back: found
     * out now, before the caller writes any data for it. */
    int r = alloc && l2_off && copied
                ? qcow2_pre_write(s, (uint64_t)l2_off, s->cluster_size,
                                  QCOW2_OL_ACTIVE_L2)
                : 0;
    if (r < 0)
        return r;
    if (l2_off && (copied || !alloc))
        return read_l2(s, (uint64_t)l2_off, l1_index, l2);
    if (!alloc)
        return 0;

    /* Allocate a fresh table, copying a shared one if there is one. */
    int64_t new_off = qcow2_alloc_clusters(s, 1);
    if (new_off < 0)
        return (int)new_off;
    r = qcow2_pre_write(s, (uint64_t)new_off, s->cluster_size, 0);
    if (r < 0)
        return r;
    uint8_t *table;
    r = qcow2_cache_get(s, &s->l2_cache, (uint64_t)new_off, true, &table);
    if (r < 0)
        return r;
    r = qcow2_meta_add(s, (uint64_t)new_off, QCOW2_OL_ACTIVE_L2);
    if (r < 0) {
        qcow2_cache_put(&s->l2_cache, table);
        return r;
    }
    if (l2_off) {
        uint8_t *old;
        r = read_l2(s, (uint64_t)l2_off, l1_index, &old);
        if (r < 0) {
            qcow2_cache_put(&s->l2_cache, table);
            return r;
        }
        memcpy(table, old, s->cluster_size);
        qcow2_cache_put(&s->l2_cache, old);
        /* Data clusters keep their refcounts: qcow2 counts one reference
         * per L1 -> L2 path, and the snapshot that shared this table has
         * counted its path already.  Only the old table loses the active
         * L1's reference. */
        if (r == 0) {
            /* From now on a snapshot's table (not tracked), no longer
             * the active one. */
            qcow2_meta_remove(s, (uint64_t)l2_off, QCOW2_OL_ACTIVE_L2);
            r = qcow2_free_clusters_deferred(s, (uint64_t)l2_off, s->cluster_size);
        }
        if (r < 0) {
            qcow2_cache_put(&s->l2_cache, table);
            return r;
        }
    }
    qcow2_cache_mark_dirty(&s->l2_cache, table);
    s->l1[l1_index] = (uint64_t)new_off | QCOW2_OFLAG_COPIED;
    qcow2_mark_l1_dirty(s, (uint32_t)l1_index);
    *l2 = table;
    return 0;
}

int qcow2_get_mapping(struct qcow2_state *s, uint64_t off, uint64_t *bytes,
                      struct qcow2_map *map)
{
    uint8_t *l2;
    uint64_t idx;
    int r = qcow2_get_l2(s, off, false, &l2, &idx);
    if (r < 0)
        return r;
    uint64_t in_cluster = qcow2_offset_into_cluster(s, off);
    uint32_t sc = (uint32_t)(in_cluster >> s->subcluster_bits);
    /* The longest run stays within this L2 table. */
    uint64_t table_left = ((s->l2_entries - idx) << s->cluster_bits) - in_cluster;
    uint64_t max = MIN(*bytes, table_left);
    memset(map, 0, sizeof(*map));
    if (!l2) {
        map->type = QCOW2_SC_UNALLOC_PLAIN;
        *bytes = max;
        return 0;
    }
    uint64_t e = qcow2_l2_get(s, l2, idx);
    uint64_t bm = qcow2_l2_get_bitmap(s, l2, idx);
    enum qcow2_sc_type t = qcow2_sc_type(s, e, bm, sc);
    map->type = t;
    map->l2e = e;
    uint64_t l2_off = s->l1[off >> (s->cluster_bits + s->l2_bits)] &
                      QCOW2_L1E_OFFSET_MASK;
    if (t == QCOW2_SC_INVALID) {
        qcow2_cache_put(&s->l2_cache, l2);
        return qcow2_damaged(s, "Invalid cluster entry found (L2 offset: %#"
                             PRIx64 ", L2 index: %#" PRIx64 ")", l2_off, idx);
    }
    uint64_t host0 = e & QCOW2_L2E_OFFSET_MASK;
    if (t == QCOW2_SC_NORMAL || t == QCOW2_SC_ZERO_ALLOC ||
        t == QCOW2_SC_UNALLOC_ALLOC) {
        if (!qcow2_has_data_file(s) && !IS_ALIGNED(host0, s->cluster_size)) {
            qcow2_cache_put(&s->l2_cache, l2);
            return qcow2_damaged(s, "Cluster allocation offset %#" PRIx64
                                 " unaligned (L2 offset: %#" PRIx64 ", L2 "
                                 "index: %#" PRIx64 ")", host0, l2_off, idx);
        }
        map->host_offset = host0 + in_cluster;
    }
    if (t == QCOW2_SC_COMPRESSED) {
        /* One compressed cluster at a time. */
        qcow2_cache_put(&s->l2_cache, l2);
        *bytes = MIN(max, s->cluster_size - in_cluster);
        return 0;
    }
    /* Extend over following subclusters and clusters of the same type
     * (and, for mapped types, contiguous host offsets). */
    uint64_t len = MIN(max, s->subcluster_size -
                                (in_cluster & (s->subcluster_size - 1)));
    uint64_t cur_idx = idx;
    uint32_t cur_sc = sc + 1;
    uint64_t cur_e = e, cur_bm = bm;
    while (len < max) {
        if (cur_sc >= (s->ext_l2 ? QCOW2_SUBCLUSTERS : 1)) {
            cur_idx++;
            cur_sc = 0;
            cur_e = qcow2_l2_get(s, l2, cur_idx);
            cur_bm = qcow2_l2_get_bitmap(s, l2, cur_idx);
        }
        enum qcow2_sc_type t2 = qcow2_sc_type(s, cur_e, cur_bm, cur_sc);
        if (t2 != t)
            break;
        if (map->host_offset) {
            uint64_t expect = host0 + ((cur_idx - idx) << s->cluster_bits) +
                              ((uint64_t)cur_sc << s->subcluster_bits);
            if ((cur_e & QCOW2_L2E_OFFSET_MASK) +
                    ((uint64_t)cur_sc << s->subcluster_bits) != expect)
                break;
        }
        len = MIN(max, len + s->subcluster_size);
        cur_sc++;
    }
    qcow2_cache_put(&s->l2_cache, l2);
    *bytes = len;
    return 0;
}
