/*
 * qcow2 metadata overlap protection: a map of every host cluster the
 * image's metadata occupies, checked before each write, and the corrupt
 * state an image enters when a write would land on metadata.
 *
 * Why.  A damaged image can make two structures share a cluster (an L2
 * table that is also a refcount block, a data cluster that is the L1
 * table), or make the allocator hand out a metadata cluster whose refcount
 * reads 0.  Writing then destroys metadata, and the damage spreads with
 * every later write.  QEMU checks each write against its metadata first
 * (qcow2_check_metadata_overlap); on a hit it sets the corrupt bit and
 * refuses every further write.  cbt does the same, and checks more
 * structures: besides QEMU's (header, active L1 and L2 tables, refcount
 * table and blocks, snapshot table, snapshot L1 tables, bitmap
 * directory) the bitmap tables and bitmap data clusters, and the clusters
 * a free would give back (refcount.c, bitmap_ext.c).  Snapshots' L2 tables
 * are not tracked, as in QEMU's default mode: reading them all would cost
 * a pass over every snapshot.
 *
 * Cost.  QEMU walks the whole L1 table and refcount table for each check.
 * Here the map is kept sorted, so a check is two binary searches, whatever
 * the size of the write or of the image:
 *
 *  - `fixed`: the structures that move only with a rare event (header,
 *    L1 table, refcount table, snapshot table and L1 tables, bitmap
 *    directory and tables): ranges sorted by first cluster, with the
 *    running maximum of their ends, so that a search finds every range
 *    reaching into the write even when ranges overlap (damage).  Rebuilt
 *    as a whole (qcow2_meta_rebuild) when one of them moves;
 *  - `one`: one-cluster structures that come and go with writes (active
 *    L2 tables, refcount blocks, bitmap data): keys (cluster << 4 | kind),
 *    sorted; an L2 table or refcount block is added when it is allocated
 *    (most land at the end of the array, so the insertion moves little).
 *
 * Building the map at a read-write open walks the L1 and refcount tables
 * (which open reads anyway) and the bitmap tables; a read-only open builds
 * nothing.  A map that could not be built (no memory) refuses writes with
 * -ENOMEM rather than let them through unchecked.
 *
 * The corrupt state.  On a hit the write is not made, the message is
 * reported once (warn_to the node's callback: the data path returns -errno only) and kept in
 * s->corrupt_msg for the control path, the corrupt bit (incompatible bit
 * 1) is written into the header's feature field alone (nothing else of
 * the header, whose in-memory state may not be durable yet), and every
 * further write of this image fails with -EIO.  A read-write open refuses
 * an image with the bit set; `check -r` opens it and clears the bit once
 * the image is consistent (check.c), as qemu-img check does.
 *
 * Called with node->lock held.
 */
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>

#include "qcow2.h"

#define KIND_BITS 4 /* bits of a `one` key holding the kind's index */

static const char *const kind_names[QCOW2_OL_NKINDS] = {
    "qcow2_header", "active L1 table", "active L2 table", "refcount table",
    "refcount block", "snapshot table", "inactive L1 table",
    "inactive L2 table", "bitmap directory", "bitmap table", "bitmap data",
};

const char *qcow2_meta_kind_name(unsigned kind)
{
    unsigned i = kind ? (unsigned)__builtin_ctz(kind) : QCOW2_OL_NKINDS;
    return i < QCOW2_OL_NKINDS ? kind_names[i] : "metadata";
}

static unsigned kind_index(unsigned kind)
{
    return (unsigned)__builtin_ctz(kind);
}

void qcow2_meta_free(struct qcow2_meta_map *m)
{
    free(m->fixed);
    free(m->fixed_maxend);
    free(m->one);
    memset(m, 0, sizeof(*m));
}

/* ---- building ---- */

struct fixed_list {
    struct qcow2_meta_range *v;
    size_t n, cap;
    int err;
};

/* Clusters [first, end) of the byte range [off, off+len), or false when
 * the range is empty or reaches past what an offset can address. */
static bool cluster_range(const struct qcow2_state *s, uint64_t off,
                          uint64_t len, uint64_t *first, uint64_t *end)
{
    uint64_t last;
    if (len == 0 || add_overflow_u64(off, len - 1, &last))
        return false;
    *first = off >> s->cluster_bits;
    *end = (last >> s->cluster_bits) + 1;
    return true;
}

static void fixed_add(const struct qcow2_state *s, struct fixed_list *l,
                      uint64_t off, uint64_t len, unsigned kind)
{
    uint64_t first, end;
    if (l->err || !cluster_range(s, off, len, &first, &end))
        return;
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 16;
        struct qcow2_meta_range *v = realloc(l->v, cap * sizeof(*v));
        if (!v) {
            l->err = -ENOMEM;
            return;
        }
        l->v = v;
        l->cap = cap;
    }
    l->v[l->n++] = (struct qcow2_meta_range){ first, end, kind };
}

static int cmp_range(const void *a, const void *b)
{
    const struct qcow2_meta_range *x = a, *y = b;
    if (x->first != y->first)
        return x->first < y->first ? -1 : 1;
    return (x->kind > y->kind) - (x->kind < y->kind);
}

static int cmp_key(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

static int one_reserve(struct qcow2_meta_map *m, size_t extra)
{
    if (m->none + extra <= m->cap)
        return 0;
    size_t cap = MAX(m->cap ? m->cap * 2 : 64, m->none + extra);
    uint64_t *v = realloc(m->one, cap * sizeof(*v));
    if (!v)
        return -ENOMEM;
    m->one = v;
    m->cap = cap;
    return 0;
}

/* Append without keeping the order (building: sorted once at the end). */
static int one_append(struct qcow2_meta_map *m, uint64_t cluster,
                      unsigned kind)
{
    if (one_reserve(m, 1) < 0)
        return -ENOMEM;
    m->one[m->none++] = cluster << KIND_BITS | kind_index(kind);
    return 0;
}

static int one_append_off(struct qcow2_state *s, uint64_t off, unsigned kind)
{
    return off ? one_append(&s->meta, off >> s->cluster_bits, kind) : 0;
}

/* The bitmap data clusters of the directory in force (bitmap_ext.c walks the
 * tables and calls this for each). */
int qcow2_meta_add_bitmap_data(struct qcow2_state *s, uint64_t off)
{
    return one_append_off(s, off, QCOW2_OL_BITMAP_DATA);
}

static void note_conflict(struct qcow2_state *s, uint64_t first,
                          uint64_t end, unsigned kind)
{
    struct qcow2_meta_map *m = &s->meta;
    if (m->bitmap_conflict)
        return;
    unsigned hit = qcow2_meta_overlap(s, first << s->cluster_bits,
                                      (end - first) << s->cluster_bits,
                                      QCOW2_OL_BITMAPS);
    if (hit) {
        m->bitmap_conflict = hit;
        m->bitmap_conflict_off = first << s->cluster_bits;
        m->bitmap_conflict_kind = kind;
    }
}

/* A bitmap structure on other metadata: the next store would free it
 * (the old directory and tables go), so stores are refused. */
static void find_bitmap_conflict(struct qcow2_state *s)
{
    const struct qcow2_meta_map *m = &s->meta;
    for (size_t i = 0; i < m->nfixed; i++)
        if (m->fixed[i].kind & QCOW2_OL_BITMAPS)
            note_conflict(s, m->fixed[i].first, m->fixed[i].end,
                          m->fixed[i].kind);
    unsigned data = kind_index(QCOW2_OL_BITMAP_DATA);
    for (size_t i = 0; i < m->none; i++) {
        if ((m->one[i] & ((1u << KIND_BITS) - 1)) == data) {
            uint64_t c = m->one[i] >> KIND_BITS;
            note_conflict(s, c, c + 1, QCOW2_OL_BITMAP_DATA);
        }
    }
}

int qcow2_meta_rebuild(struct qcow2_state *s)
{
    struct qcow2_meta_map *m = &s->meta;
    struct fixed_list l = { 0 };
    qcow2_meta_free(m);
    fixed_add(s, &l, 0, s->cluster_size, QCOW2_OL_HEADER);
    fixed_add(s, &l, s->h.l1_table_offset, (uint64_t)s->l1_size * 8,
              QCOW2_OL_ACTIVE_L1);
    fixed_add(s, &l, s->h.refcount_table_offset, s->reftable_entries * 8,
              QCOW2_OL_REFCOUNT_TABLE);
    if (s->nb_snapshots)
        fixed_add(s, &l, s->h.snapshots_offset, s->snapshots_size,
                  QCOW2_OL_SNAPSHOT_TABLE);
    for (uint32_t i = 0; i < s->nb_snapshots; i++)
        fixed_add(s, &l, s->snapshots[i].l1_table_offset,
                  (uint64_t)s->snapshots[i].l1_size * 8, QCOW2_OL_INACTIVE_L1);
    if (s->bm_ext.present && s->bm_ext.len == QCOW2_BITMAPS_EXT_SIZE &&
        (s->h.autoclear_features & QCOW2_AUTOCLEAR_BITMAPS))
        fixed_add(s, &l, s->bm_ext.dir_offset,
                  MIN(s->bm_ext.dir_size, QCOW2_MAX_BITMAP_DIR_SIZE),
                  QCOW2_OL_BITMAP_DIR);
    for (uint32_t i = 0; i < s->bm_dir_n; i++)
        fixed_add(s, &l, s->bm_dir[i].table_offset,
                  (uint64_t)s->bm_dir[i].table_size * 8, QCOW2_OL_BITMAP_TABLE);
    int r = l.err;
    if (r == 0) {
        if (l.n)
            qsort(l.v, l.n, sizeof(*l.v), cmp_range);
        m->fixed = l.v;
        m->nfixed = l.n;
        m->fixed_maxend = malloc(MAX(l.n, 1) * sizeof(*m->fixed_maxend));
        if (!m->fixed_maxend)
            r = -ENOMEM;
        for (size_t i = 0; r == 0 && i < l.n; i++)
            m->fixed_maxend[i] = MAX(i ? m->fixed_maxend[i - 1] : 0,
                                     l.v[i].end);
    } else {
        free(l.v);
    }

    for (uint32_t i = 0; r == 0 && i < s->l1_size; i++) {
        uint64_t l2 = s->l1[i] & QCOW2_L1E_OFFSET_MASK;
        r = one_append_off(s, l2, QCOW2_OL_ACTIVE_L2);
    }
    for (uint64_t i = 0; r == 0 && i < s->reftable_entries; i++)
        r = one_append_off(s, s->reftable[i] & QCOW2_REFT_OFFSET_MASK,
                           QCOW2_OL_REFCOUNT_BLOCK);
    if (r == 0)
        r = qcow2_bitmaps_meta_data(s);
    if (r < 0) {
        qcow2_meta_free(m);
        return r;
    }
    if (m->none) /* qsort wants an array, also for 0 elements */
        qsort(m->one, m->none, sizeof(*m->one), cmp_key);
    m->valid = true;
    find_bitmap_conflict(s);
    return 0;
}

void qcow2_meta_invalidate(struct qcow2_state *s)
{
    qcow2_meta_free(&s->meta);
}

/* ---- changes of one-cluster structures ---- */

/* Index of the first key >= key. */
static size_t lower_bound(const struct qcow2_meta_map *m, uint64_t key)
{
    size_t lo = 0, hi = m->none;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (m->one[mid] < key)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

int qcow2_meta_add(struct qcow2_state *s, uint64_t off, unsigned kind)
{
    struct qcow2_meta_map *m = &s->meta;
    if (!m->valid)
        return 0; /* rebuilt (from the new state) before the next check */
    if (one_reserve(m, 1) < 0) {
        m->valid = false;
        return -ENOMEM;
    }
    uint64_t key = (off >> s->cluster_bits) << KIND_BITS | kind_index(kind);
    size_t i = lower_bound(m, key);
    memmove(&m->one[i + 1], &m->one[i], (m->none - i) * sizeof(*m->one));
    m->one[i] = key;
    m->none++;
    return 0;
}

void qcow2_meta_remove(struct qcow2_state *s, uint64_t off, unsigned kind)
{
    struct qcow2_meta_map *m = &s->meta;
    if (!m->valid)
        return;
    uint64_t key = (off >> s->cluster_bits) << KIND_BITS | kind_index(kind);
    size_t i = lower_bound(m, key);
    if (i < m->none && m->one[i] == key) {
        memmove(&m->one[i], &m->one[i + 1], (m->none - i - 1) * sizeof(*m->one));
        m->none--;
    }
}

/* ---- the check ---- */

unsigned qcow2_meta_overlap(struct qcow2_state *s, uint64_t off, uint64_t len,
                            unsigned ign)
{
    const struct qcow2_meta_map *m = &s->meta;
    uint64_t a, b;
    if (!cluster_range(s, off, len, &a, &b))
        return 0;
    unsigned hit = 0;
    /* Fixed ranges: the last one starting before b, then back while an
     * earlier range may still reach past a. */
    size_t lo = 0, hi = m->nfixed;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (m->fixed[mid].first < b)
            lo = mid + 1;
        else
            hi = mid;
    }
    for (size_t i = lo; i-- > 0 && m->fixed_maxend[i] > a;) {
        const struct qcow2_meta_range *r = &m->fixed[i];
        if (r->end > a && !(r->kind & ign))
            hit |= r->kind;
    }
    /* One-cluster structures in [a, b). */
    for (size_t i = lower_bound(m, a << KIND_BITS);
         i < m->none && (m->one[i] >> KIND_BITS) < b; i++) {
        unsigned kind = 1u << (m->one[i] & ((1u << KIND_BITS) - 1));
        if (!(kind & ign))
            hit |= kind;
    }
    return hit ? hit & -hit : 0; /* the first in QEMU's order */
}

/* ---- corruption ---- */

static void PRINTF_FMT(3, 0) vreport(struct qcow2_state *s, bool fatal,
                                      const char *fmt, va_list ap)
{
    char msg[sizeof(s->corrupt_msg)];
    vsnprintf(msg, sizeof(msg), fmt, ap);
    if (fatal)
        snprintf(s->corrupt_msg, sizeof(s->corrupt_msg), "%s", msg);
    /* Once per image, as QEMU: a damaged table can fail every request. */
    if (s->corruption_reported)
        return;
    s->corruption_reported = true;
    if (fatal)
        warn_to(&s->node->warner, "%s: Marking image as corrupt: %s; "
                "further writes are refused", s->node->filename, msg);
    else
        warn_to(&s->node->warner, "%s: Image is corrupt: %s",
                s->node->filename, msg);
}

void qcow2_report_corruption(struct qcow2_state *s, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vreport(s, false, fmt, ap);
    va_end(ap);
}

int qcow2_signal_corruption(struct qcow2_state *s, const char *fmt, ...)
{
    if (s->corrupt)
        return -EIO;
    s->corrupt = true;
    s->corruption_reported = false; /* this one is always told */
    va_list ap;
    va_start(ap, fmt);
    vreport(s, true, fmt, ap);
    va_end(ap);
    /* Only the feature field: a v2 header has none (QEMU cannot keep
     * the bit there either). */
    s->h.incompatible_features |= QCOW2_INCOMPAT_CORRUPT;
    if (s->h.version >= 3) {
        uint8_t be[8];
        stbe64(be, s->h.incompatible_features);
        if (file_pwrite_full(s->node->fd, be, sizeof(be), 72) == 0)
            (void)file_flush(s->node->fd);
    }
    return -EIO;
}

int qcow2_damaged(struct qcow2_state *s, const char *fmt, ...)
{
    char msg[sizeof(s->corrupt_msg)];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    /* As QEMU: fatal where the image could be written (a write relying on
     * the entry would make things worse), a report otherwise. */
    if (!s->node->read_only && !s->check_mode)
        return qcow2_signal_corruption(s, "%s", msg);
    qcow2_report_corruption(s, "%s", msg);
    return -EIO;
}

/*
 * The check behind qcow2_pre_write and qcow2_pre_free: 0 when [off,
 * off+len) touches no metadata but `ign`, else the image is marked
 * corrupt ("Preventing invalid <what> metadata (overlaps with ...)") and
 * -EIO; -EIO at once when it is corrupt already, -ENOMEM without a map.
 */
static int guard(struct qcow2_state *s, uint64_t off, uint64_t len,
                 unsigned ign, const char *what)
{
    if (s->corrupt)
        return -EIO;
    int r = s->meta.valid ? 0 : qcow2_meta_rebuild(s);
    unsigned hit = r == 0 ? qcow2_meta_overlap(s, off, len, ign) : 0;
    if (r < 0 || !hit)
        return r;
    return qcow2_signal_corruption(s, "Preventing invalid %s metadata "
                                   "(overlaps with %s): %" PRIu64 " bytes at "
                                   "offset 0x%" PRIx64, what,
                                   qcow2_meta_kind_name(hit), len, off);
}

int qcow2_pre_write(struct qcow2_state *s, uint64_t off, uint64_t len,
                    unsigned ign)
{
    return guard(s, off, len, ign, "write on");
}

int qcow2_pre_write_data(struct qcow2_state *s, uint64_t off, uint64_t len)
{
    if (s->corrupt)
        return -EIO;
    /* An external data file holds no metadata (QEMU skips it too). */
    return qcow2_has_data_file(s) ? 0 : qcow2_pre_write(s, off, len, 0);
}

int qcow2_pwrite_meta(struct qcow2_state *s, const void *buf, size_t len,
                      uint64_t off, unsigned ign)
{
    int r = qcow2_pre_write(s, off, len, ign);
    return r < 0 ? r : file_pwrite_full(s->node->fd, buf, len, off);
}

int qcow2_pre_free(struct qcow2_state *s, uint64_t off, uint64_t len,
                   unsigned ign)
{
    return guard(s, off, len, ign, "free of");
}

const char *qcow2_strerror(const struct qcow2_state *s, int r)
{
    if (r == -EIO && s->corrupt)
        return s->corrupt_msg;
    return strerror(-r);
}
