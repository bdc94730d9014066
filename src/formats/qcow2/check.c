/*
 * qcow2 consistency check and repair, with qemu-img check's findings,
 * counts, messages and repairs.
 *
 * A pass builds an in-memory reference count array (the IMRT: one entry per
 * host cluster, in the image's own refcount width, so that a slice of it is
 * a refcount block) by walking every reference the image holds: the header
 * cluster, the active and snapshot L1 tables, their L2 tables and the data
 * clusters those map, the snapshot table, the refcount table and blocks,
 * and the bitmap directory, tables and data.  Entries are checked on the
 * way.  The IMRT is then compared with the on-disk refcounts (a larger
 * on-disk count is a leak, a smaller one a corruption) and the COPIED flags
 * of the active tables are checked against the on-disk refcounts.
 *
 * Repairs follow QEMU.  Leaks (-r leaks) and refcounts that are too low but
 * not zero (-r all) are fixed in place through the normal refcount path.  A
 * referenced cluster whose refcount is 0, or a broken refcount table entry
 * or block, means the on-disk structure cannot be trusted to allocate from:
 * the whole structure is rebuilt from the IMRT (new blocks and a new table
 * written into clusters the IMRT shows free, then the header switched), and
 * the references are counted again, which turns the old structure into
 * leaks that are then dropped.  The clusters the rebuild takes are marked
 * in the IMRT before the blocks are written, so they count themselves.
 * Bitmap metadata that cannot be loaded (QEMU cannot open such an image)
 * blocks -r leaks, whose frees would trust it; -r all first salvages it:
 * the directory keeps the entries that load and shrinks in place, or the
 * extension goes, and what the dropped bitmaps used becomes leaks.
 *
 * The IMRT is bounded: a reference reaching a cluster or more past the end
 * of the file is a corruption and never grows it, so it holds at most the
 * file's clusters plus one (and never more than 2^31 - 1 entries, as QEMU).
 *
 * Tables are read straight from the file into private buffers, zero-filled
 * past its end as QEMU's reads are, never through the metadata cache; the
 * caches are flushed before each pass so both views agree, and every table
 * written here is dropped from the cache.  After a repair the check runs
 * once more (silently) and reports what is left plus what was fixed, as
 * qemu-img does.
 */
#include <inttypes.h>
#include <stdio.h>

#include "qcow2.h"

/* As QEMU: an image whose file has more clusters than this is refused. */
#define CHECK_MAX_CLUSTERS ((uint64_t)INT32_MAX)
/* A refcount block past the end of the file is made to exist by growing
 * the file (as QEMU does), but not by more than this or the file's size. */
#define CHECK_MAX_GROWTH (1ull << 30)

#define REFT_RESERVED_MASK 0x1FFull
/* What a rebuild of the refcount structure replaces: its writes may land
 * on the old one (clusters the references do not reach), nothing else. */
#define REBUILT (QCOW2_OL_REFCOUNT_TABLE | QCOW2_OL_REFCOUNT_BLOCK)

/* QEMU's cluster types (the whole cluster, not a subcluster). */
enum cluster_type {
    CT_UNALLOCATED,
    CT_ZERO_PLAIN,
    CT_ZERO_ALLOC,
    CT_NORMAL,
    CT_COMPRESSED,
};

struct check {
    struct qcow2_state *s;
    struct cbt_check_result *res;
    cbt_report_fn *report;
    void *opaque;
    uint64_t file_len;

    /* The IMRT: nb logical entries, cap allocated (a multiple of
     * rb_entries, so every refcount block's slice lies inside). */
    uint8_t *refs;
    uint64_t nb, cap;
    bool rebuild;
    bool need_rebuild;     /* failed: -r leaks cannot rebuild */
    bool bitmaps_broken;   /* bitmap metadata could not be parsed */
    uint32_t snapshot_bad; /* snapshot table entries -r all rewrites */
    bool bad_snapshot_offset;
    uint64_t highest;      /* last cluster with a refcount or reference */
    uint64_t snapshots_size;

    uint8_t *l2buf;        /* one cluster */
    /* A refcount block reaching past the end of the file, read privately
     * (zero-filled) because the cache only holds whole clusters. */
    uint8_t *tailbuf;
    uint64_t tail_off;     /* 0: tailbuf holds nothing */
};

static void PRINTF_FMT(2, 3) msg(struct check *c, const char *fmt, ...)
{
    if (!c->report)
        return;
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    c->report(c->opaque, buf);
}

/* ---- the in-memory reference count array ---- */

static uint64_t imrt_get(const struct check *c, uint64_t ci)
{
    return qcow2_rb_get(c->refs, ci, c->s->refcount_order);
}

static void imrt_set(struct check *c, uint64_t ci, uint64_t v)
{
    qcow2_rb_set(c->refs, ci, c->s->refcount_order, v);
}

static size_t imrt_bytes(const struct qcow2_state *s, uint64_t entries)
{
    return (size_t)((entries >> s->rb_bits) << s->cluster_bits);
}

/* Grow the IMRT to hold new_nb entries (new ones zero). */
static int imrt_resize(struct check *c, uint64_t new_nb)
{
    struct qcow2_state *s = c->s;
    if (new_nb > CHECK_MAX_CLUSTERS)
        return -EFBIG;
    if (new_nb > c->cap) {
        uint64_t cap = ALIGN_UP(new_nb, s->rb_entries);
        uint8_t *n = realloc(c->refs, imrt_bytes(s, cap));
        if (!n)
            return -ENOMEM;
        memset(n + imrt_bytes(s, c->cap), 0,
               imrt_bytes(s, cap) - imrt_bytes(s, c->cap));
        c->refs = n;
        c->cap = cap;
    }
    c->nb = MAX(c->nb, new_nb);
    return 0;
}

/*
 * Count one reference to every cluster touched by [offset, offset+size)
 * (QEMU's qcow2_inc_refcounts_imrt).  The last cluster of an image may be
 * partly past the end of the file, so a region may exceed it by less than
 * a cluster.  Returns 0 or -errno when the check cannot go on.
 */
static int inc_refs(struct check *c, uint64_t offset, uint64_t size)
{
    struct qcow2_state *s = c->s;
    if (size == 0)
        return 0;
    uint64_t end, limit;
    if (add_overflow_u64(offset, size, &end) ||
        add_overflow_u64(c->file_len, s->cluster_size, &limit) ||
        end >= limit) {
        msg(c, "ERROR: counting reference for region exceeding the end of "
            "the file by one cluster or more: offset 0x%" PRIx64
            " size 0x%" PRIx64, offset, size);
        c->res->corruptions++;
        return 0;
    }
    uint64_t first = offset >> s->cluster_bits;
    uint64_t last = (end - 1) >> s->cluster_bits;
    for (uint64_t k = first; k <= last; k++) {
        if (k >= c->nb) {
            int r = imrt_resize(c, k + 1);
            if (r < 0) {
                c->res->check_errors++;
                return r;
            }
        }
        uint64_t rc = imrt_get(c, k);
        if (rc == s->refcount_max) {
            msg(c, "ERROR: overflow cluster offset=0x%" PRIx64,
                k << s->cluster_bits);
            msg(c, "Use qemu-img amend to increase the refcount entry width "
                "or qemu-img convert to create a clean copy if the image "
                "cannot be opened for writing");
            c->res->corruptions++;
            continue;
        }
        imrt_set(c, k, rc + 1);
    }
    return 0;
}

/* ---- helpers ---- */

static enum cluster_type cluster_type(const struct qcow2_state *s, uint64_t e)
{
    if (e & QCOW2_OFLAG_COMPRESSED)
        return CT_COMPRESSED;
    if ((e & QCOW2_OFLAG_ZERO) && !s->ext_l2)
        return (e & QCOW2_L2E_OFFSET_MASK) ? CT_ZERO_ALLOC : CT_ZERO_PLAIN;
    if (!(e & QCOW2_L2E_OFFSET_MASK))
        return qcow2_has_data_file(s) && (e & QCOW2_OFLAG_COPIED)
                   ? CT_NORMAL : CT_UNALLOCATED;
    return CT_NORMAL;
}

/* Read `len` bytes at `off`; past the end of the file reads zeroes. */
static int read_meta(struct check *c, void *buf, size_t len, uint64_t off)
{
    if (off >= c->file_len) {
        memset(buf, 0, len);
        return 0;
    }
    return file_pread_full(c->s->node->fd, buf, len, off);
}

/* The bitmaps extension, when it is in force (autoclear bit 0 set). */
static const struct qcow2_bitmaps_ext *bitmaps_ext(const struct qcow2_state *s)
{
    if (!(s->h.autoclear_features & QCOW2_AUTOCLEAR_BITMAPS) ||
        !s->bm_ext.present)
        return NULL;
    return &s->bm_ext;
}

/*
 * Would writing [off, off+len) hit metadata other than `ign` (QEMU's
 * pre-write overlap check, through the driver's metadata map)?  Before a
 * repair writes a table we did not allocate, make sure it cannot clobber
 * the header, an L1 table or the refcount structure.  A map that cannot
 * be built (no memory) answers yes: no repair is better than a blind one.
 */
static bool overlaps_metadata(struct check *c, uint64_t off, uint64_t len,
                              unsigned ign)
{
    struct qcow2_state *s = c->s;
    if (!s->meta.valid && qcow2_meta_rebuild(s) < 0)
        return true;
    return qcow2_meta_overlap(s, off, len, ign) != 0;
}

/* Write a table (or part of one) we read ourselves, and forget any cached
 * copy of its cluster. */
static int write_meta(struct check *c, const void *buf, size_t len,
                      uint64_t off)
{
    struct qcow2_state *s = c->s;
    int r = file_pwrite_full(s->node->fd, buf, len, off);
    if (r == 0)
        r = file_flush(s->node->fd);
    qcow2_cache_discard(&s->l2_cache, ALIGN_DOWN(off, s->cluster_size));
    return r;
}

/* ---- L1 and L2 tables ---- */

/*
 * Turn an L2 entry into a plain zero cluster (its allocated subclusters
 * into zero ones), on disk.  The caller counted the corruption; this
 * counts it fixed.  *overlap tells that the write was refused.
 */
static int fix_l2_entry_by_zero(struct check *c, uint64_t l2_offset,
                                uint8_t *l2, uint64_t idx, bool active,
                                bool *overlap)
{
    struct qcow2_state *s = c->s;
    uint64_t e_off = l2_offset + idx * s->l2_entry_size;
    if (s->ext_l2) {
        uint64_t bm = qcow2_l2_get_bitmap(s, l2, idx);
        bm |= bm << 32;
        bm &= QCOW2_L2_BITMAP_ALL_ZEROES;
        qcow2_l2_set(s, l2, idx, 0, bm);
    } else {
        qcow2_l2_set(s, l2, idx, QCOW2_OFLAG_ZERO, 0);
    }
    *overlap = overlaps_metadata(c, e_off, s->l2_entry_size,
                                 active ? QCOW2_OL_ACTIVE_L2 : 0);
    if (*overlap) {
        msg(c, "ERROR: Overlap check failed");
        c->res->check_errors++;
        return -EIO;
    }
    int r = write_meta(c, l2 + idx * s->l2_entry_size, s->l2_entry_size, e_off);
    if (r < 0) {
        msg(c, "ERROR: Failed to overwrite L2 table entry: %s", strerror(-r));
        c->res->check_errors++;
        return r;
    }
    c->res->corruptions--;
    c->res->corruptions_fixed++;
    return 0;
}

/* Count the references of one L2 table and check its entries. */
static int check_l2(struct check *c, uint64_t l2_offset, bool active,
                    unsigned fix)
{
    struct qcow2_state *s = c->s;
    struct cbt_check_result *res = c->res;
    uint8_t *l2 = c->l2buf;
    uint64_t next_contiguous = 0;
    int r = read_meta(c, l2, s->cluster_size, l2_offset);
    if (r < 0) {
        msg(c, "ERROR: I/O error in check_refcounts_l2");
        res->check_errors++;
        return r;
    }
    for (uint64_t i = 0; i < s->l2_entries; i++) {
        uint64_t e = qcow2_l2_get(s, l2, i);
        uint64_t bm = qcow2_l2_get_bitmap(s, l2, i);
        enum cluster_type t = cluster_type(s, e);
        if (t != CT_COMPRESSED && (e & QCOW2_L2E_STD_RESERVED_MASK)) {
            msg(c, "ERROR found l2 entry with reserved bits set: %" PRIx64, e);
            res->corruptions++;
        }
        switch (t) {
        case CT_COMPRESSED: {
            if (e & QCOW2_OFLAG_COPIED) {
                msg(c, "ERROR: coffset=0x%" PRIx64 ": copied flag must never "
                    "be set for compressed clusters", e & s->cmp_offset_mask);
                e &= ~QCOW2_OFLAG_COPIED;
                res->corruptions++;
            }
            if (qcow2_has_data_file(s)) {
                msg(c, "ERROR compressed cluster %d with data file, "
                    "entry=0x%" PRIx64, (int)i, e);
                res->corruptions++;
                break;
            }
            if (bm) {
                msg(c, "ERROR compressed cluster %d with non-zero subcluster "
                    "allocation bitmap, entry=0x%" PRIx64, (int)i, e);
                res->corruptions++;
                break;
            }
            uint64_t coff, clen;
            qcow2_compressed_span(s, e, &coff, &clen);
            r = inc_refs(c, coff, clen);
            if (r < 0)
                return r;
            if (active) {
                /* Compressed clusters are fragmented by nature. */
                res->allocated_clusters++;
                res->compressed_clusters++;
                res->fragmented_clusters++;
            }
            break;
        }
        case CT_ZERO_ALLOC:
        case CT_NORMAL: {
            uint64_t off = e & QCOW2_L2E_OFFSET_MASK;
            if ((bm >> 32) & bm) {
                res->corruptions++;
                msg(c, "ERROR offset=%" PRIx64 ": Allocated cluster has "
                    "corrupted subcluster allocation bitmap", off);
            }
            if (qcow2_offset_into_cluster(s, off)) {
                res->corruptions++;
                bool has_data = s->ext_l2 ? (bm & QCOW2_L2_BITMAP_ALL_ALLOC) != 0
                                          : !(e & QCOW2_OFLAG_ZERO);
                if (!has_data) {
                    bool repair = fix & CBT_CHECK_FIX_ERRORS;
                    msg(c, "%s offset=%" PRIx64 ": Preallocated cluster is "
                        "not properly aligned; L2 entry corrupted.",
                        repair ? "Repairing" : "ERROR", off);
                    if (repair) {
                        bool overlap = false;
                        r = fix_l2_entry_by_zero(c, l2_offset, l2, i, active,
                                                 &overlap);
                        if (overlap)
                            return r;
                        if (r == 0)
                            continue; /* the cluster is no longer used */
                    }
                } else {
                    msg(c, "ERROR offset=%" PRIx64 ": Data cluster is not "
                        "properly aligned; L2 entry corrupted.", off);
                }
            }
            if (active) {
                res->allocated_clusters++;
                if (next_contiguous && off != next_contiguous)
                    res->fragmented_clusters++;
                next_contiguous = off + s->cluster_size;
            }
            if (!qcow2_has_data_file(s)) {
                r = inc_refs(c, off, s->cluster_size);
                if (r < 0)
                    return r;
            }
            break;
        }
        case CT_ZERO_PLAIN:
            break;
        case CT_UNALLOCATED:
            if (bm & QCOW2_L2_BITMAP_ALL_ALLOC) {
                res->corruptions++;
                msg(c, "ERROR: Unallocated cluster has non-zero subcluster "
                    "allocation map");
            }
            break;
        }
    }
    return 0;
}

/* Count an L1 table, its L2 tables and everything they map; fragmentation
 * statistics are kept for the active one. */
static int check_l1(struct check *c, uint64_t l1_offset, uint32_t l1_size,
                    bool active, unsigned fix)
{
    struct qcow2_state *s = c->s;
    if (l1_size == 0)
        return 0;
    uint64_t bytes = (uint64_t)l1_size * 8; /* callers bound l1_size */
    int r = inc_refs(c, l1_offset, bytes);
    if (r < 0)
        return r;
    CLEANUP_FREE uint64_t *l1 = malloc(bytes);
    if (!l1) {
        c->res->check_errors++;
        return -ENOMEM;
    }
    r = read_meta(c, l1, bytes, l1_offset);
    if (r < 0) {
        msg(c, "ERROR: I/O error in check_refcounts_l1");
        c->res->check_errors++;
        return r;
    }
    for (uint32_t i = 0; i < l1_size; i++) {
        uint64_t e = be64_to_cpu(l1[i]);
        if (!e)
            continue;
        if (e & QCOW2_L1E_RESERVED_MASK) {
            msg(c, "ERROR found L1 entry with reserved bits set: %" PRIx64, e);
            c->res->corruptions++;
        }
        uint64_t l2_offset = e & QCOW2_L1E_OFFSET_MASK;
        r = inc_refs(c, l2_offset, s->cluster_size);
        if (r < 0)
            return r;
        if (qcow2_offset_into_cluster(s, l2_offset)) {
            msg(c, "ERROR l2_offset=%" PRIx64 ": Table is not cluster "
                "aligned; L1 entry corrupted", l2_offset);
            c->res->corruptions++;
        }
        r = check_l2(c, l2_offset, active, fix);
        if (r < 0)
            return r;
    }
    return 0;
}

/* Length of the snapshot table as QEMU computes it: up to the end of the
 * last entry's name. */
static int snapshot_table_size(struct check *c, uint64_t *size)
{
    struct qcow2_state *s = c->s;
    uint64_t off = s->h.snapshots_offset;
    *size = 0;
    for (uint32_t i = 0; i < s->nb_snapshots; i++) {
        uint8_t fx[40];
        off = ALIGN_UP(off, 8);
        int r = file_pread_exact(s->node->fd, fx, sizeof(fx), off);
        if (r < 0)
            return r;
        off += sizeof(fx) + (uint64_t)ldbe32(fx + 36) + ldbe16(fx + 12) +
               ldbe16(fx + 14);
    }
    if (s->nb_snapshots)
        *size = off - s->h.snapshots_offset;
    return 0;
}

/*
 * Snapshot table entries QEMU's check counts as corrupt and -r all
 * rewrites (qcow2_check_read_snapshot_table): extra data cut to 1 KiB (only
 * an image opened for repair gets that far), and v3 entries without the
 * disk size.  Counted in c->snapshot_bad, added to the result at the end
 * of the pass (a refcount rebuild recounts the rest).
 */
static void check_snapshot_entries(struct check *c, unsigned fix)
{
    struct qcow2_state *s = c->s;
    bool repair = fix & CBT_CHECK_FIX_ERRORS;
    c->snapshot_bad = 0;
    for (uint32_t i = 0; i < s->nb_snapshots; i++) {
        const struct qcow2_snapshot *sn = &s->snapshots[i];
        if (sn->extra_cut) {
            msg(c, "Discarding too much extra metadata in snapshot table "
                "entry %u (%u > %d)", i, sn->extra_on_disk,
                QCOW2_MAX_SNAPSHOT_EXTRA);
            c->snapshot_bad++;
        }
        if (qcow2_snapshot_incomplete(s, sn)) {
            msg(c, "%s snapshot table entry %u is incomplete",
                repair ? "Repairing" : "ERROR", i);
            c->snapshot_bad++;
        }
    }
}

/* ---- persistent bitmaps ---- */

/*
 * Read and parse the bitmap directory as loading it does (bitmap_ext.c, after
 * QEMU's bitmap_list_load).  Returns the entries (free with
 * qcow2_bitmap_dir_free) or NULL with the reason in why.
 */
static struct qcow2_bitmap_dirent *load_bitmap_dir(struct check *c,
                                                   uint64_t dir_off,
                                                   uint64_t dir_size,
                                                   uint32_t nb_bitmaps,
                                                   uint32_t *n, char *why,
                                                   size_t why_len)
{
    struct qcow2_bitmap_dirent *v = NULL;
    *n = 0;
    /* dir_size <= QCOW2_MAX_BITMAP_DIR_SIZE, checked */
    CLEANUP_FREE uint8_t *dir = malloc(dir_size ? dir_size : 1);
    if (!dir) {
        snprintf(why, why_len, "out of memory");
        return NULL;
    }
    if (read_meta(c, dir, dir_size, dir_off) < 0) {
        snprintf(why, why_len, "cannot read the bitmap directory");
        return NULL;
    }
    if (qcow2_bitmap_dir_parse(c->s, dir, dir_size, nb_bitmaps, &v, n, why,
                               why_len) < 0)
        return NULL;
    return v;
}

/*
 * Count the bitmap directory, tables and data clusters (QEMU's
 * qcow2_check_bitmaps_refcounts); a broken directory or table is a
 * corruption, and leaves c->bitmaps_broken set: what it references is not
 * known, so the clusters will look leaked.  Without `count`, only validate
 * (silently).
 */
static int check_bitmaps(struct check *c, bool count)
{
    struct qcow2_state *s = c->s;
    const struct qcow2_bitmaps_ext *ext = bitmaps_ext(s);
    if (!ext)
        return 0;
    if (ext->len != QCOW2_BITMAPS_EXT_SIZE) {
        if (count) {
            msg(c, "ERROR bitmaps extension has an invalid length (%u)",
                ext->len);
            c->res->corruptions++;
        }
        c->bitmaps_broken = true;
        return 0;
    }
    uint32_t nb = ext->nb_bitmaps;
    uint32_t reserved = ext->reserved;
    uint64_t dir_size = ext->dir_size;
    uint64_t dir_off = ext->dir_offset;
    if (nb == 0 || nb > QCOW2_MAX_BITMAPS || reserved != 0 ||
        dir_size > QCOW2_MAX_BITMAP_DIR_SIZE || !IS_ALIGNED(dir_off, s->cluster_size)) {
        if (count) {
            msg(c, "ERROR bitmaps extension is invalid: %u bitmaps, directory "
                "offset 0x%" PRIx64 " size %" PRIu64, nb, dir_off, dir_size);
            c->res->corruptions++;
        }
        c->bitmaps_broken = true;
        return 0;
    }
    int r = count ? inc_refs(c, dir_off, dir_size) : 0;
    if (r < 0)
        return r;
    char why[1200];
    uint32_t n;
    struct qcow2_bitmap_dirent *dir = load_bitmap_dir(c, dir_off, dir_size, nb,
                                                      &n, why, sizeof(why));
    if (!dir) {
        if (count) {
            msg(c, "ERROR bitmap directory at 0x%" PRIx64 " is corrupted: %s",
                dir_off, why);
            c->res->corruptions++;
        }
        c->bitmaps_broken = true;
        return 0;
    }
    r = 0;
    for (uint32_t k = 0; k < n && r == 0; k++) {
        const struct qcow2_bitmap_dirent *d = &dir[k];
        uint64_t bytes = (uint64_t)d->table_size * 8; /* <= 8 MiB, checked */
        r = count ? inc_refs(c, d->table_offset, bytes) : 0;
        if (r < 0)
            break;
        uint8_t *table = malloc(bytes);
        if (!table) {
            if (count)
                c->res->check_errors++;
            r = -ENOMEM;
            break;
        }
        bool ok = read_meta(c, table, bytes, d->table_offset) == 0;
        /* Bits past the end of the file would read as clean: such a
         * bitmap cannot be loaded (counted as QEMU does, by inc_refs). */
        if (d->table_offset >= c->file_len ||
            bytes > c->file_len - d->table_offset)
            c->bitmaps_broken = true;
        for (uint32_t i = 0; ok && i < d->table_size; i++) {
            uint64_t te = ldbe64(table + 8 * (uint64_t)i);
            uint64_t off = te & QCOW2_BME_TABLE_OFFSET_MASK;
            if (!qcow2_bitmap_table_entry_valid(s, te))
                ok = false;
            if (off >= c->file_len)
                c->bitmaps_broken = true;
        }
        /* A bitmap that is not in_use must cover the virtual size exactly
         * (QEMU cannot load it otherwise). */
        uint64_t want = qcow2_bitmap_table_entries(s, s->h.size,
                                                   d->granularity_bits);
        bool sized = (d->flags & QCOW2_BME_FLAG_IN_USE) || d->table_size == want;
        if (!ok || !sized) {
            /* QEMU stops at the first broken table. */
            if (count && !ok)
                msg(c, "ERROR bitmap '%s': bitmap table at 0x%" PRIx64
                    " is corrupted", d->name, d->table_offset);
            else if (count)
                msg(c, "ERROR bitmap '%s': bitmap table has %u entries, the "
                    "virtual size needs %" PRIu64, d->name, d->table_size,
                    want);
            if (count)
                c->res->corruptions++;
            c->bitmaps_broken = true;
            free(table);
            break;
        }
        for (uint32_t i = 0; count && i < d->table_size && r == 0; i++) {
            uint64_t off = ldbe64(table + 8 * (uint64_t)i) & QCOW2_BME_TABLE_OFFSET_MASK;
            if (off)
                r = inc_refs(c, off, s->cluster_size);
        }
        free(table);
    }
    qcow2_bitmap_dir_free(dir, n);
    return r;
}

/*
 * -r all with bitmap metadata that cannot be loaded: keep the directory
 * entries that pass every load-time check, drop the others (the whole
 * extension if its own fields are bad).  The directory shrinks in place,
 * so nothing is allocated from refcounts not yet checked; it is rewritten
 * only where it does not overlap other metadata.  What the dropped entries
 * used turns into leaks, which the repair pass that follows reclaims.
 * QEMU cannot open such an image at all.
 */
static int repair_bitmaps(struct check *c)
{
    struct qcow2_state *s = c->s;
    const struct qcow2_bitmaps_ext *x = &s->bm_ext;
    /* The count and the reserved field are rewritten from what is kept. */
    bool dir_ok = x->len == QCOW2_BITMAPS_EXT_SIZE &&
                  x->dir_size > 0 && x->dir_size <= QCOW2_MAX_BITMAP_DIR_SIZE &&
                  IS_ALIGNED(x->dir_offset, s->cluster_size) &&
                  x->dir_offset < c->file_len &&
                  x->dir_size <= c->file_len - x->dir_offset;
    if (dir_ok)
        dir_ok = !overlaps_metadata(c, x->dir_offset, x->dir_size,
                                    QCOW2_OL_BITMAP_DIR);
    uint32_t kept, dropped;
    int r = qcow2_bitmaps_salvage(s, dir_ok, &kept, &dropped);
    qcow2_meta_invalidate(s);
    if (r < 0) {
        msg(c, "ERROR could not repair the bitmap metadata: %s", strerror(-r));
        return r;
    }
    if (kept)
        msg(c, "Repairing bitmap directory: kept %u bitmap(s), removed %u that "
            "could not be loaded", kept, dropped);
    else
        msg(c, "Repairing bitmap metadata: removed the bitmaps extension (%u "
            "bitmap(s) could not be loaded)", dropped);
    return 0;
}

/* ---- refcount structure ---- */

/* Check the refcount table entries and count each refcount block. */
static int check_refblocks(struct check *c, unsigned fix)
{
    struct qcow2_state *s = c->s;
    struct cbt_check_result *res = c->res;
    for (uint64_t i = 0; i < s->reftable_entries; i++) {
        uint64_t off = s->reftable[i] & QCOW2_REFT_OFFSET_MASK;
        uint64_t cluster = off >> s->cluster_bits;
        if (s->reftable[i] & REFT_RESERVED_MASK) {
            msg(c, "ERROR refcount table entry %" PRId64 " has reserved bits "
                "set", (int64_t)i);
            res->corruptions++;
            c->rebuild = true;
            continue;
        }
        if (qcow2_offset_into_cluster(s, off)) {
            msg(c, "ERROR refcount block %" PRId64 " is not cluster aligned; "
                "refcount table entry corrupted", (int64_t)i);
            res->corruptions++;
            c->rebuild = true;
            continue;
        }
        if (cluster >= c->nb) {
            bool repair = fix & CBT_CHECK_FIX_ERRORS;
            res->corruptions++;
            msg(c, "%s refcount block %" PRId64 " is outside image",
                repair ? "Repairing" : "ERROR", (int64_t)i);
            if (!repair)
                continue;
            /* As QEMU: grow the file so the block exists (reading zeroes);
             * the rebuild this leads to replaces it. */
            int r = -EFBIG;
            uint64_t new_len = off + s->cluster_size;
            if (off > INT64_MAX - s->cluster_size)
                r = -EINVAL;
            else if (new_len - c->file_len <= MAX(c->file_len, CHECK_MAX_GROWTH))
                r = file_truncate(s->node->fd, new_len);
            if (r == 0) {
                c->file_len = MAX(c->file_len, new_len);
                r = imrt_resize(c, qcow2_size_to_clusters(s, c->file_len));
                if (r < 0) {
                    res->check_errors++;
                    return r;
                }
                res->corruptions--;
                res->corruptions_fixed++;
                r = inc_refs(c, off, s->cluster_size);
                if (r < 0)
                    return r;
                continue;
            }
            c->rebuild = true;
            msg(c, "ERROR could not resize image: %s", strerror(-r));
            continue;
        }
        if (off != 0) {
            int r = inc_refs(c, off, s->cluster_size);
            if (r < 0)
                return r;
            uint64_t rc = imrt_get(c, cluster);
            if (rc != 1) {
                msg(c, "ERROR refcount block %" PRId64 " refcount=%" PRIu64,
                    (int64_t)i, rc);
                res->corruptions++;
                c->rebuild = true;
            }
        }
    }
    return 0;
}

/* Build the IMRT from every reference in the image (QEMU's
 * calculate_refcounts); c->refs must be zeroed. */
static int calculate_refcounts(struct check *c, unsigned fix)
{
    struct qcow2_state *s = c->s;
    struct cbt_check_result *res = c->res;
    int r = inc_refs(c, 0, s->cluster_size); /* header */
    if (r == 0)
        r = check_l1(c, s->h.l1_table_offset, s->l1_size, true, fix);
    if (r < 0)
        return r;

    if (qcow2_has_data_file(s) && s->nb_snapshots) {
        msg(c, "ERROR %d snapshots in image with data file",
            (int)s->nb_snapshots);
        res->corruptions++;
    }
    for (uint32_t i = 0; i < s->nb_snapshots; i++) {
        const struct qcow2_snapshot *sn = &s->snapshots[i];
        if (qcow2_offset_into_cluster(s, sn->l1_table_offset)) {
            msg(c, "ERROR snapshot %s (%s) l1_offset=%#" PRIx64 ": L1 table is "
                "not cluster aligned; snapshot table entry corrupted",
                sn->id, sn->name, sn->l1_table_offset);
            res->corruptions++;
            continue;
        }
        if ((uint64_t)sn->l1_size * 8 > QCOW2_MAX_L1_BYTES) {
            msg(c, "ERROR snapshot %s (%s) l1_size=%#" PRIx32 ": L1 table is "
                "too large; snapshot table entry corrupted", sn->id, sn->name,
                sn->l1_size);
            res->corruptions++;
            continue;
        }
        r = check_l1(c, sn->l1_table_offset, sn->l1_size, false, fix);
        if (r < 0)
            return r;
    }
    r = inc_refs(c, s->h.snapshots_offset, c->snapshots_size);
    if (r == 0)
        r = inc_refs(c, s->h.refcount_table_offset, s->reftable_entries * 8);
    if (r == 0)
        r = check_bitmaps(c, true);
    if (r == 0)
        r = check_refblocks(c, fix);
    return r;
}

/*
 * The on-disk refcount of cluster ci, read as QEMU reads it: 0 without a
 * block, -EIO when the table entry is not cluster aligned, and a block
 * past the end of the file reads as zeroes.
 */
static int disk_refcount(struct check *c, uint64_t ci, uint64_t *rc)
{
    struct qcow2_state *s = c->s;
    uint64_t g = ci >> s->rb_bits;
    *rc = 0;
    if (g >= s->reftable_entries)
        return 0;
    uint64_t off = s->reftable[g] & QCOW2_REFT_OFFSET_MASK;
    if (off == 0)
        return 0;
    if (qcow2_offset_into_cluster(s, off))
        return -EIO;
    if (off >= c->file_len)
        return 0;
    if (c->file_len - off < s->cluster_size) {
        if (c->tail_off != off) {
            int r = read_meta(c, c->tailbuf, s->cluster_size, off);
            if (r < 0)
                return r;
            c->tail_off = off;
        }
        *rc = qcow2_rb_get(c->tailbuf, ci & (s->rb_entries - 1),
                           s->refcount_order);
        return 0;
    }
    return qcow2_get_refcount(s, ci, rc);
}

/* Move the on-disk refcount of cluster ci from `from` to `to`. */
static int set_disk_refcount(struct qcow2_state *s, uint64_t ci, uint64_t from,
                             uint64_t to)
{
    while (from != to) {
        uint64_t d = from > to ? from - to : to - from;
        int64_t step = (int64_t)MIN(d, (uint64_t)INT64_MAX);
        int r = qcow2_update_refcount(s, ci << s->cluster_bits, 1,
                                      from > to ? -step : step);
        if (r < 0)
            return r;
        from = from > to ? from - (uint64_t)step : from + (uint64_t)step;
    }
    return 0;
}

/* Give a cluster nothing uses any more back to the host, as QEMU's repair
 * does (best effort: its contents no longer matter). */
static void discard_cluster(struct check *c, uint64_t ci)
{
    uint64_t off = ci << c->s->cluster_bits;
    if (off < c->file_len)
        (void)file_punch_hole(c->s->node->fd, off,
                              MIN(c->s->cluster_size, c->file_len - off));
}

/* Compare the IMRT with the on-disk refcounts, fixing what `fix` allows
 * (QEMU's compare_refcounts). */
static void compare_refcounts(struct check *c, unsigned fix)
{
    struct qcow2_state *s = c->s;
    struct cbt_check_result *res = c->res;
    c->highest = 0;
    for (uint64_t i = 0; i < c->nb; i++) {
        uint64_t disk, ref;
        int r = disk_refcount(c, i, &disk);
        if (r < 0) {
            msg(c, "Can't get refcount for cluster %" PRId64 ": %s",
                (int64_t)i, strerror(-r));
            res->check_errors++;
            continue;
        }
        ref = imrt_get(c, i);
        if (disk > 0 || ref > 0)
            c->highest = i;
        if (disk == ref)
            continue;
        int64_t *num_fixed = NULL;
        if (disk == 0)
            c->rebuild = true;
        else if (disk > ref && (fix & CBT_CHECK_FIX_LEAKS))
            num_fixed = &res->leaks_fixed;
        else if (disk < ref && (fix & CBT_CHECK_FIX_ERRORS))
            num_fixed = &res->corruptions_fixed;
        msg(c, "%s cluster %" PRId64 " refcount=%" PRIu64 " reference=%" PRIu64,
            num_fixed ? "Repairing" : disk < ref ? "ERROR" : "Leaked",
            (int64_t)i, disk, ref);
        if (num_fixed && set_disk_refcount(s, i, disk, ref) == 0) {
            (*num_fixed)++;
            if (ref == 0)
                discard_cluster(c, i);
            continue;
        }
        if (disk < ref)
            res->corruptions++;
        else
            res->leaks++;
    }
}

/* ---- rebuilding the refcount structure ---- */

/*
 * Take `count` contiguous clusters that the IMRT shows free, at or after
 * *first_free (which moves to the first gap seen), growing the IMRT past
 * the end of the image if needed.  Returns the host offset or -errno.
 */
static int64_t imrt_alloc(struct check *c, uint64_t count, uint64_t *first_free)
{
    uint64_t cluster = *first_free, contig = 0;
    bool first_gap = true;
    for (; cluster < c->nb && contig < count; cluster++) {
        if (imrt_get(c, cluster) == 0) {
            contig++;
            if (first_gap) {
                *first_free = cluster;
                first_gap = false;
            }
        } else {
            contig = 0;
        }
    }
    if (contig < count) {
        int r = imrt_resize(c, cluster + count - contig);
        if (r < 0)
            return r;
    }
    cluster -= contig;
    for (uint64_t i = 0; i < count; i++)
        imrt_set(c, cluster + i, 1);
    return (int64_t)(cluster << c->s->cluster_bits);
}

/*
 * Write the refcount blocks (slices of the IMRT) for every group of
 * clusters in [first, end) that holds a used cluster, allocating blocks
 * not yet in *table.  Returns 1 when *table had to grow, 0, or -errno.
 */
static int write_refblocks(struct check *c, uint64_t first, uint64_t end,
                           uint64_t **table, uint64_t *entries)
{
    struct qcow2_state *s = c->s;
    uint64_t first_free = 0;
    bool grown = false;
    for (uint64_t cluster = first; cluster < end; cluster++) {
        if (imrt_get(c, cluster) == 0)
            continue;
        uint64_t idx = cluster >> s->rb_bits;
        uint64_t start = idx << s->rb_bits;
        uint64_t rb_off;
        if (idx < *entries && (*table)[idx]) {
            rb_off = (*table)[idx];
        } else {
            /* Never in a group whose block is already written. */
            first_free = MAX(first_free, start);
            int64_t o = imrt_alloc(c, 1, &first_free);
            if (o < 0) {
                msg(c, "ERROR allocating refblock: %s", strerror((int)-o));
                return (int)o;
            }
            rb_off = (uint64_t)o;
            if ((rb_off >> s->cluster_bits) >= end)
                end = (rb_off >> s->cluster_bits) + 1; /* write its block too */
            if (idx >= *entries) {
                uint64_t n = ALIGN_UP((idx + 1) * 8, s->cluster_size) / 8;
                if (n * 8 > QCOW2_MAX_REFTABLE_BYTES) {
                    msg(c, "ERROR allocating reftable memory: %s",
                        strerror(EFBIG));
                    return -EFBIG;
                }
                uint64_t *t = realloc(*table, n * 8);
                if (!t) {
                    msg(c, "ERROR allocating reftable memory");
                    return -ENOMEM;
                }
                memset(t + *entries, 0, (n - *entries) * 8);
                *table = t;
                *entries = n;
                grown = true;
            }
            (*table)[idx] = rb_off;
        }
        int r = qcow2_pwrite_meta(s, c->refs + imrt_bytes(s, start),
                                  s->cluster_size, rb_off, REBUILT);
        if (r < 0) {
            msg(c, "ERROR writing refblock: %s", strerror(-r));
            return r;
        }
        cluster = start + s->rb_entries - 1; /* this group is done */
    }
    return grown;
}

/*
 * Replace the refcount structure by one built from the IMRT alone (QEMU's
 * rebuild_refcount_structure).  The old table and blocks are left behind
 * as leaks for the caller to count and drop.
 */
static int rebuild_refcount_structure(struct check *c)
{
    struct qcow2_state *s = c->s;
    uint64_t *table = NULL, entries = 0, toff = 0, tclusters = 0;
    int r = write_refblocks(c, 0, c->nb, &table, &entries);
    while (r > 0) {
        /* Place the table; that changes the IMRT, so write the blocks
         * covering it again, which may grow the table: repeat. */
        uint64_t first_free = 0;
        tclusters = qcow2_size_to_clusters(s, entries * 8);
        int64_t o = imrt_alloc(c, tclusters, &first_free);
        if (o < 0) {
            msg(c, "ERROR allocating reftable: %s", strerror((int)-o));
            r = (int)o;
            break;
        }
        toff = (uint64_t)o;
        r = write_refblocks(c, toff >> s->cluster_bits,
                            (toff >> s->cluster_bits) + tclusters, &table,
                            &entries);
    }
    if (r < 0)
        goto fail;
    uint64_t *be = calloc(entries, 8);
    if (!be) {
        r = -ENOMEM;
        goto fail;
    }
    for (uint64_t i = 0; i < entries; i++)
        be[i] = cpu_to_be64(table[i]);
    r = qcow2_pwrite_meta(s, be, entries * 8, toff, REBUILT);
    free(be);
    if (r == 0)
        r = file_flush(s->node->fd);
    if (r < 0) {
        msg(c, "ERROR writing reftable: %s", strerror(-r));
        goto fail;
    }
    /* Switch: forget the old blocks, then point the header at the new. */
    for (uint64_t i = 0; i < s->reftable_entries; i++) {
        uint64_t off = s->reftable[i] & QCOW2_REFT_OFFSET_MASK;
        if (off)
            qcow2_cache_discard(&s->rb_cache, off);
    }
    uint64_t old_off = s->h.refcount_table_offset;
    uint32_t old_clusters = s->h.refcount_table_clusters;
    s->h.refcount_table_offset = toff;
    s->h.refcount_table_clusters = (uint32_t)tclusters;
    r = qcow2_write_header(s);
    if (r < 0) {
        s->h.refcount_table_offset = old_off;
        s->h.refcount_table_clusters = old_clusters;
        msg(c, "ERROR setting reftable: %s", strerror(-r));
        goto fail;
    }
    free(s->reftable);
    s->reftable = table;
    s->reftable_entries = entries;
    qcow2_meta_invalidate(s);
    s->reftable_dirty_lo = UINT64_MAX;
    s->reftable_dirty_hi = 0;
    s->free_hint = 0;
    c->tail_off = 0;
    uint64_t len;
    if (file_size(s->node->fd, &len) == 0)
        c->file_len = len;
    r = qcow2_compute_alloc_end(s);
    if (r < 0)
        return r;
    s->alloc_end = MAX(s->alloc_end, 1);
    return 0;
fail:
    free(table);
    c->res->check_errors++;
    return r;
}

/* ---- COPIED flags ---- */

/* The COPIED flag of every active L1 and L2 entry must say refcount == 1
 * (QEMU's check_oflag_copied). */
static int check_oflag_copied(struct check *c, unsigned fix)
{
    struct qcow2_state *s = c->s;
    struct cbt_check_result *res = c->res;
    bool repair;
    if (fix & CBT_CHECK_FIX_ERRORS)
        repair = true;
    else if (fix & CBT_CHECK_FIX_LEAKS)
        /* Only when the refcounts are now known to be right. */
        repair = !res->check_errors && !res->corruptions && !res->leaks;
    else
        repair = false;

    for (uint32_t i = 0; i < s->l1_size; i++) {
        uint64_t l1e = s->l1[i];
        uint64_t l2_offset = l1e & QCOW2_L1E_OFFSET_MASK;
        if (!l2_offset)
            continue;
        uint64_t rc;
        if (disk_refcount(c, l2_offset >> s->cluster_bits, &rc) < 0)
            continue; /* reported by compare_refcounts */
        if ((rc == 1) != ((l1e & QCOW2_OFLAG_COPIED) != 0)) {
            res->corruptions++;
            msg(c, "%s OFLAG_COPIED L2 cluster: l1_index=%d l1_entry=%" PRIx64
                " refcount=%" PRIu64, repair ? "Repairing" : "ERROR", (int)i,
                l1e, rc);
            if (repair) {
                s->l1[i] = rc == 1 ? l1e | QCOW2_OFLAG_COPIED
                                   : l1e & ~QCOW2_OFLAG_COPIED;
                qcow2_mark_l1_dirty(s, i);
                int r = qcow2_write_l1(s);
                if (r == 0) {
                    s->need_sync = true;
                    r = qcow2_sync(s);
                }
                if (r < 0) {
                    res->check_errors++;
                    return r;
                }
                res->corruptions--;
                res->corruptions_fixed++;
            }
        }

        uint8_t *l2 = c->l2buf;
        int r = read_meta(c, l2, s->cluster_size, l2_offset);
        if (r < 0) {
            msg(c, "ERROR: Could not read L2 table: %s", strerror(-r));
            res->check_errors++;
            return r;
        }
        int64_t dirty = 0;
        for (uint64_t j = 0; j < s->l2_entries; j++) {
            uint64_t e = qcow2_l2_get(s, l2, j);
            enum cluster_type t = cluster_type(s, e);
            if (t != CT_NORMAL && t != CT_ZERO_ALLOC)
                continue;
            if (qcow2_has_data_file(s)) {
                rc = 1;
            } else if (disk_refcount(c, (e & QCOW2_L2E_OFFSET_MASK) >>
                                            s->cluster_bits, &rc) < 0) {
                continue;
            }
            if ((rc == 1) != ((e & QCOW2_OFLAG_COPIED) != 0)) {
                res->corruptions++;
                msg(c, "%s OFLAG_COPIED data cluster: l2_entry=%" PRIx64
                    " refcount=%" PRIu64, repair ? "Repairing" : "ERROR", e, rc);
                if (repair) {
                    uint64_t ne = rc == 1 ? e | QCOW2_OFLAG_COPIED
                                          : e & ~QCOW2_OFLAG_COPIED;
                    stbe64(l2 + j * s->l2_entry_size, ne);
                    dirty++;
                }
            }
        }
        if (dirty) {
            if (overlaps_metadata(c, l2_offset, s->cluster_size,
                                  QCOW2_OL_ACTIVE_L2)) {
                msg(c, "ERROR: Could not write L2 table; metadata overlap "
                    "check failed: %s", strerror(EIO));
                res->check_errors++;
                return -EIO;
            }
            r = write_meta(c, l2, s->cluster_size, l2_offset);
            if (r < 0) {
                msg(c, "ERROR: Could not write L2 table: %s", strerror(-r));
                res->check_errors++;
                return r;
            }
            res->corruptions -= dirty;
            res->corruptions_fixed += dirty;
        }
    }
    return 0;
}

/* ---- one pass ---- */

/* Reset the IMRT for a new count over (at least) the file's clusters;
 * keep_nb keeps its logical size, so that clusters the rebuild took past
 * the end of the file are compared too. */
static int imrt_reset(struct check *c, bool keep_nb)
{
    if (c->refs)
        memset(c->refs, 0, imrt_bytes(c->s, c->cap));
    if (!keep_nb)
        c->nb = 0;
    return imrt_resize(c, qcow2_size_to_clusters(c->s, c->file_len));
}

/* One check (and repair) pass: QEMU's qcow2_check_refcounts.  Returns 0,
 * or -errno when the check could not complete. */
static int check_pass(struct check *c, struct cbt_check_result *res,
                      unsigned fix)
{
    struct qcow2_state *s = c->s;
    memset(res, 0, sizeof(*res));
    c->res = res;
    c->rebuild = false;
    c->highest = 0;
    c->tail_off = 0;
    int r = file_size(s->node->fd, &c->file_len);
    if (r < 0) {
        res->check_errors++;
        return r;
    }
    if (qcow2_size_to_clusters(s, c->file_len) > CHECK_MAX_CLUSTERS) {
        res->check_errors++;
        return -EFBIG;
    }
    res->total_clusters = qcow2_size_to_clusters(s, ALIGN_DOWN(s->h.size, 512));
    /* QEMU validates the snapshot table pointer even without snapshots,
     * and gives up on the check when it is bad. */
    if (qcow2_offset_into_cluster(s, s->h.snapshots_offset) ||
        s->h.snapshots_offset > INT64_MAX - (uint64_t)s->nb_snapshots * 40) {
        msg(c, "ERROR snapshot table offset invalid");
        res->check_errors++;
        c->bad_snapshot_offset = true;
        return -EINVAL;
    }
    r = snapshot_table_size(c, &c->snapshots_size);
    if (r == 0)
        r = imrt_reset(c, false);
    if (r < 0) {
        res->check_errors++;
        return r;
    }
    check_snapshot_entries(c, fix);
    r = calculate_refcounts(c, fix);
    if (r < 0)
        return r;

    /* If a repair in place follows, it starts again from here. */
    struct cbt_check_result pre_compare = *res;
    compare_refcounts(c, 0);

    if (c->rebuild && (fix & CBT_CHECK_FIX_ERRORS)) {
        struct cbt_check_result old = *res;
        int64_t fresh_leaks = 0;
        msg(c, "Rebuilding refcount structure");
        r = rebuild_refcount_structure(c);
        if (r < 0)
            return r;
        res->corruptions = 0;
        res->leaks = 0;
        /* The old structure is gone: count the references again. */
        c->rebuild = false;
        r = imrt_reset(c, true);
        if (r < 0) {
            res->check_errors++;
            return r;
        }
        r = calculate_refcounts(c, 0);
        if (r < 0)
            return r;
        if (fix & CBT_CHECK_FIX_LEAKS) {
            /* Drop the old structure, now leaked; leaks left over are the
             * rebuild's own doing. */
            struct cbt_check_result saved = *res, tmp = { 0 };
            c->res = &tmp;
            compare_refcounts(c, CBT_CHECK_FIX_LEAKS);
            c->res = res;
            if (c->rebuild)
                msg(c, "ERROR rebuilt refcount structure is still broken");
            fresh_leaks = tmp.leaks;
            *res = saved;
        }
        if (res->corruptions < old.corruptions)
            res->corruptions_fixed += old.corruptions - res->corruptions;
        if (res->leaks < old.leaks)
            res->leaks_fixed += old.leaks - res->leaks;
        res->leaks += fresh_leaks;
    } else if (fix) {
        if (c->rebuild) {
            msg(c, "ERROR need to rebuild refcount structures");
            res->check_errors++;
            c->need_rebuild = true;
            return -EIO;
        }
        if (res->leaks || res->corruptions) {
            *res = pre_compare;
            compare_refcounts(c, fix);
        }
    }

    r = check_oflag_copied(c, fix);
    if (r < 0)
        return r;
    res->corruptions += c->snapshot_bad;
    res->image_end_offset = (c->highest + 1) << s->cluster_bits;
    return 0;
}

/* -r all, after the refcounts are repaired: the snapshot table entries
 * counted in c->snapshot_bad are rewritten (QEMU's
 * qcow2_check_fix_snapshot_table). */
static int fix_snapshot_table(struct check *c, struct cbt_check_result *res)
{
    int r = qcow2_write_snapshots(c->s);
    if (r < 0) {
        msg(c, "ERROR failed to update snapshot table: %s",
            qcow2_strerror(c->s, r));
        res->check_errors++;
        return r;
    }
    res->corruptions -= c->snapshot_bad;
    res->corruptions_fixed += c->snapshot_bad;
    c->snapshot_bad = 0;
    return 0;
}

/* Without -r all, a snapshot table entry with more extra data than QEMU
 * reads fails the check, as in QEMU (whose open fails). */
static int refuse_cut_snapshot(struct check *c, struct cbt_check_result *res,
                               struct cbt_error **errp)
{
    const struct qcow2_state *s = c->s;
    for (uint32_t i = 0; i < s->nb_snapshots; i++) {
        if (!s->snapshots[i].extra_cut)
            continue;
        msg(c, "ERROR failed to read the snapshot table: Too much extra "
            "metadata in snapshot table entry %u", i);
        res->check_errors++;
        cbt_error_set(errp, EFBIG, "%s: snapshot table entry %u has too much "
                      "extra data (%u bytes, at most %d); a repair "
                      "removes what is too much", s->node->filename, i,
                      s->snapshots[i].extra_on_disk, QCOW2_MAX_SNAPSHOT_EXTRA);
        /* QEMU's errno (its "Check failed: File too large"), not a host
         * space error: check's status 1, as qemu-img's */
        cbt_error_set_kind(errp, CBT_ERR_OTHER);
        cbt_error_set_remedy(errp, CBT_REMEDY_REPAIR);
        return -1;
    }
    return 0;
}

/* Bring the file up to date with everything repaired so far. */
static int flush_repairs(struct qcow2_state *s)
{
    s->need_sync = true;
    return qcow2_flush_metadata(s);
}

int qcow2_check(struct blk_node *node, unsigned fix,
                struct cbt_check_result *res, cbt_report_fn *report,
                void *opaque, struct cbt_error **errp)
{
    struct qcow2_state *s = qcow2_state(node);
    const char *fn = node->filename;
    memset(res, 0, sizeof(*res));
    if (fix && node->read_only) {
        cbt_error_set(errp, EROFS, "%s: cannot repair an image opened "
                      "read-only", fn);
        return -1;
    }
    struct check c = { .s = s, .report = report, .opaque = opaque };
    bool refused = false;
    int r = 0;
    if (!(fix & CBT_CHECK_FIX_ERRORS) && refuse_cut_snapshot(&c, res, errp) < 0)
        return -1;
    c.l2buf = malloc(s->cluster_size);
    c.tailbuf = malloc(s->cluster_size);
    if (!c.l2buf || !c.tailbuf) {
        r = -ENOMEM;
        goto out;
    }
    /* The checks read the file, not the caches: make them agree. */
    if (!node->read_only) {
        r = qcow2_flush_metadata(s);
        if (r < 0)
            goto out;
    }

    struct cbt_check_result first;
    int64_t bitmaps_fixed = 0;
    if (fix) {
        /* Repairs trust the references found to be all there are.  With
         * bitmap metadata that cannot be parsed (QEMU cannot even open
         * such an image), the clusters it uses would be freed as leaks or
         * overwritten by a rebuild: -r all first salvages it (dropping
         * what cannot be loaded); -r leaks alone checks but does not
         * repair. */
        r = file_size(node->fd, &c.file_len);
        if (r == 0)
            r = check_bitmaps(&c, false);
        if (r < 0)
            goto out;
        if (c.bitmaps_broken && (fix & CBT_CHECK_FIX_ERRORS)) {
            r = repair_bitmaps(&c);
            if (r < 0)
                goto out;
            bitmaps_fixed = 1;
            c.bitmaps_broken = false;
            r = check_bitmaps(&c, false);
            if (r < 0)
                goto out;
        }
        if (c.bitmaps_broken) {
            r = check_pass(&c, &first, 0);
            *res = first;
            if (r == 0) {
                msg(&c, "ERROR cannot repair leaks: the bitmap metadata is "
                    "corrupted (-r all repairs it, dropping the bitmaps that "
                    "cannot be loaded)");
                res->check_errors++;
                refused = true;
                r = -EINVAL;
            }
            goto out;
        }
    }
    r = check_pass(&c, &first, fix);
    first.corruptions += bitmaps_fixed;
    first.corruptions_fixed += bitmaps_fixed;
    *res = first;
    if (r < 0)
        goto out;
    if (fix) {
        r = flush_repairs(s);
        if (r < 0)
            goto out;
    }
    if ((fix & CBT_CHECK_FIX_ERRORS) && c.snapshot_bad) {
        /* New clusters past the end: safe even if refcounts are not. */
        r = fix_snapshot_table(&c, &first);
        *res = first;
        if (r < 0)
            goto out;
    }
    if (fix && !first.check_errors && !first.corruptions) {
        /* Refcounts are right now: the image is clean and consistent. */
        uint64_t bits = QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT;
        if (s->h.incompatible_features & bits) {
            s->h.incompatible_features &= ~bits;
            r = qcow2_write_header(s);
            if (r < 0)
                goto out;
        }
    }
    if (first.corruptions_fixed || first.leaks_fixed) {
        /* Check the repaired image again, as qemu-img does, and report
         * what is left (its messages were printed by the first pass). */
        c.report = NULL;
        struct cbt_check_result second;
        r = check_pass(&c, &second, 0);
        second.corruptions_fixed = first.corruptions_fixed;
        second.leaks_fixed = first.leaks_fixed;
        *res = second;
        if (r < 0)
            goto out;
    }
out:
    free(c.refs);
    free(c.l2buf);
    free(c.tailbuf);
    if (r < 0) {
        if (refused)
            cbt_error_set(errp, EINVAL, "%s: the bitmap metadata is corrupted; "
                          "not repairing leaks, as the clusters it uses would "
                          "be freed (-r all drops the broken bitmaps)", fn);
        else if (r == -EFBIG && res->check_errors)
            cbt_error_set(errp, EFBIG, "%s: image too large to check (more "
                          "than %" PRIu64 " clusters)", fn, CHECK_MAX_CLUSTERS);
        else if (c.bad_snapshot_offset)
            cbt_error_set(errp, EINVAL, "%s: the snapshot table offset 0x%"
                          PRIx64 " is invalid", fn, s->h.snapshots_offset);
        else if (c.need_rebuild)
            cbt_error_set(errp, EIO, "%s: the refcount structure must be "
                          "rebuilt; repair with -r all: %s", fn, strerror(EIO));
        else
            cbt_error_set(errp, -r, "%s: check failed: %s", fn, strerror(-r));
        return -1;
    }
    return 0;
}
