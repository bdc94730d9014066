/*
 * qcow2 driver private declarations, grouped by the file that defines them.
 *
 * Design notes (the invariants every file relies on):
 *
 *  - On-disk structures are big-endian; they are converted at the edge by
 *    header.c (header, extensions), cluster.c (L1/L2 entries) and refcount.c
 *    (refcount entries).  L1 and the refcount table live in memory in native
 *    order; L2 tables and refcount blocks live in a metadata cache (cache.c)
 *    in on-disk order, accessed through get/set helpers.
 *
 *  - Crash safety comes from write ordering at flush time (qcow2_flush):
 *      data writes (already issued) and refcount increments
 *        -> fdatasync -> dirty L2 tables -> fdatasync -> dirty L1 entries
 *        -> fdatasync -> deferred frees (refcount decrements) -> fdatasync.
 *    So a refcount increment is durable before any metadata that points at
 *    the cluster, data before the L2 entry that maps it, L2 before L1, and a
 *    decrement only after every reference it drops is gone from disk.  An
 *    interruption at any moment leaves at worst leaked clusters.  Evicting a
 *    dirty L2 table from the cache follows the same order for that table.
 *
 *  - Freed clusters are not decremented at once: they join s->pending_free
 *    and keep their refcount until the flush that drops their references, so
 *    the allocator can never hand out a cluster still referenced on disk.
 *
 *  - Compressed clusters are packed byte by byte after the previous one
 *    (free_byte_offset, refcount.c): each host cluster their bytes touch
 *    holds one reference per compressed cluster.  The packing position is
 *    forgotten when its host cluster's refcount drops to 0, so a cluster
 *    reused for other data never receives compressed bytes.
 *
 *  - Persistent bitmaps (bitmap_ext.c) follow the same rule: a store writes
 *    the new tables, data and directory to fresh clusters, flushes, then
 *    switches with one header write and only then frees the old clusters.
 *    Before the first write after a store the recording bitmaps are marked
 *    in_use on disk (the mark_dirty hook), so a crash can leave them
 *    inconsistent, never stale.
 *
 *  - Every write to the image file is checked first against a map of its
 *    metadata (overlap.c); a write that would land on metadata is not
 *    made, and the image is marked corrupt and takes no more writes.
 *
 *  - Metadata-only allocations (the bitmap store, a moved L1 table, a
 *    grown refcount structure) take clusters past the end of the file and
 *    of everything in use (qcow2_alloc_clusters_append): a cluster whose
 *    refcount is 0 may still be referenced by a damaged L2 table, and
 *    only a full check could tell.
 *
 *  - All functions are called with node->lock held (the block layer takes
 *    it); nothing here is thread-safe on its own.
 */
#ifndef CBT_QCOW2_H
#define CBT_QCOW2_H

#include "../../block/block.h"

#define QCOW2_MAGIC 0x514649FBu
#define QCOW2_MIN_CLUSTER_BITS 9
#define QCOW2_MAX_CLUSTER_BITS 21
#define QCOW2_V2_HEADER_SIZE 72
#define QCOW2_V3_HEADER_SIZE 104
#define QCOW2_HEADER_SIZE 112 /* what we write, as QEMU */
#define QCOW2_MAX_BACKING_NAME 1023
#define QCOW2_MAX_BACKING_FMT 15
#define QCOW2_MAX_L1_BYTES (32u * 1024 * 1024)
#define QCOW2_MAX_REFTABLE_BYTES (8u * 1024 * 1024)
#define QCOW2_MAX_SNAPSHOTS 65536
#define QCOW2_MAX_SNAPSHOT_EXTRA 1024
#define QCOW2_MAX_DATA_FILE_NAME 4096
/* Header extensions cbt keeps in memory (unknown ones are preserved): far
 * above the handful QEMU writes, far below the 262,143 empty ones a 2 MiB
 * header cluster can hold. */
#define QCOW2_MAX_HEADER_EXTS 4096

/* Feature bits */
#define QCOW2_INCOMPAT_DIRTY (1ull << 0)
#define QCOW2_INCOMPAT_CORRUPT (1ull << 1)
#define QCOW2_INCOMPAT_DATA_FILE (1ull << 2)
#define QCOW2_INCOMPAT_COMPRESSION (1ull << 3)
#define QCOW2_INCOMPAT_EXTL2 (1ull << 4)
#define QCOW2_INCOMPAT_MASK 0x1Full
#define QCOW2_COMPAT_LAZY_REFCOUNTS (1ull << 0)
#define QCOW2_AUTOCLEAR_BITMAPS (1ull << 0)
#define QCOW2_AUTOCLEAR_DATA_FILE_RAW (1ull << 1)
#define QCOW2_AUTOCLEAR_MASK 0x3ull

/* Header extension types */
#define QCOW2_EXT_END 0x00000000u
#define QCOW2_EXT_BACKING_FORMAT 0xE2792ACAu
#define QCOW2_EXT_FEATURE_TABLE 0x6803F857u
#define QCOW2_EXT_BITMAPS 0x23852875u
#define QCOW2_EXT_CRYPTO 0x0537BE77u
#define QCOW2_EXT_DATA_FILE 0x44415441u

/* L1/L2 entry bits */
#define QCOW2_OFLAG_COPIED (1ull << 63)
#define QCOW2_OFLAG_COMPRESSED (1ull << 62)
#define QCOW2_OFLAG_ZERO (1ull << 0)
#define QCOW2_L1E_OFFSET_MASK 0x00FFFFFFFFFFFE00ull
#define QCOW2_L1E_RESERVED_MASK 0x7F000000000001FFull
#define QCOW2_L2E_OFFSET_MASK 0x00FFFFFFFFFFFE00ull
#define QCOW2_L2E_STD_RESERVED_MASK 0x3F000000000001FEull
#define QCOW2_REFT_OFFSET_MASK 0xFFFFFFFFFFFFFE00ull
#define QCOW2_L2_BITMAP_ALL_ALLOC 0x00000000FFFFFFFFull
#define QCOW2_L2_BITMAP_ALL_ZEROES 0xFFFFFFFF00000000ull
#define QCOW2_SUBCLUSTERS 32

/* Persistent bitmaps (FORMATS.md §2): the extension, directory entries
 * and table entries, with QEMU's limits. */
#define QCOW2_BITMAPS_EXT_SIZE 24
#define QCOW2_MAX_BITMAPS 65535
#define QCOW2_MAX_BITMAP_DIR_SIZE (1024ull * 65535)
#define QCOW2_BME_FIXED_SIZE 24           /* directory entry before the name */
#define QCOW2_BME_MAX_TABLE_SIZE 0x8000000ull
#define QCOW2_BME_MAX_PHYS_SIZE 0x20000000ull
#define QCOW2_BME_MIN_GRANULARITY_BITS 9
#define QCOW2_BME_MAX_GRANULARITY_BITS 31
#define QCOW2_BME_MAX_NAME_SIZE 1023
#define QCOW2_BME_FLAG_IN_USE (1u << 0)
#define QCOW2_BME_FLAG_AUTO (1u << 1)
#define QCOW2_BME_RESERVED_FLAGS 0xFFFFFFFCu
#define QCOW2_BME_TYPE_DIRTY_TRACKING 1
#define QCOW2_BME_TABLE_RESERVED_MASK 0xFF000000000001FEull
#define QCOW2_BME_TABLE_OFFSET_MASK 0x00FFFFFFFFFFFE00ull
#define QCOW2_BME_TABLE_ALL_ONES 1ull

/* Compression types */
#define QCOW2_COMPRESSION_ZLIB 0
#define QCOW2_COMPRESSION_ZSTD 1

/* The header, native order.  Fields past header_length read as zero. */
struct qcow2_header {
    uint32_t magic;
    uint32_t version;
    uint64_t backing_file_offset;
    uint32_t backing_file_size;
    uint32_t cluster_bits;
    uint64_t size;
    uint32_t crypt_method;
    uint32_t l1_size;
    uint64_t l1_table_offset;
    uint64_t refcount_table_offset;
    uint32_t refcount_table_clusters;
    uint32_t nb_snapshots;
    uint64_t snapshots_offset;
    uint64_t incompatible_features;
    uint64_t compatible_features;
    uint64_t autoclear_features;
    uint32_t refcount_order;
    uint32_t header_length;
    uint8_t compression_type;
};

/* A header extension kept verbatim (unknown ones, and the bitmaps one). */
struct qcow2_ext {
    uint32_t type;
    uint32_t len;
    uint8_t *data;
};

/* The bitmaps header extension, as found at open or last written. */
struct qcow2_bitmaps_ext {
    bool present;
    uint32_t len;         /* as found: 24 unless the image is broken */
    uint32_t nb_bitmaps;
    uint32_t reserved;
    uint64_t dir_size;
    uint64_t dir_offset;
};

/* One entry of the bitmap directory on disk (what the header points at). */
struct qcow2_bitmap_dirent {
    char *name;
    uint64_t table_offset;
    uint32_t table_size;  /* entries */
    uint32_t flags;
    uint8_t granularity_bits;
};

/* How one subcluster (or, without extended L2, one cluster) reads. */
enum qcow2_sc_type {
    QCOW2_SC_UNALLOC_PLAIN, /* backing file or zeroes */
    QCOW2_SC_UNALLOC_ALLOC, /* ext L2: cluster reserved, subcluster unallocated */
    QCOW2_SC_ZERO_PLAIN,
    QCOW2_SC_ZERO_ALLOC,
    QCOW2_SC_NORMAL,
    QCOW2_SC_COMPRESSED,
    QCOW2_SC_INVALID,
};

/* One internal snapshot, as parsed from the table. */
struct qcow2_snapshot {
    uint64_t l1_table_offset;
    uint32_t l1_size;
    char *id;
    char *name;
    uint32_t date_sec, date_nsec;
    uint64_t vm_clock_nsec;
    uint64_t vm_state_size;
    uint64_t disk_size;
    uint64_t icount;
    uint32_t extra_size;      /* extra data bytes, as kept (<= 1 KiB) */
    uint32_t extra_on_disk;   /* ... and as the entry says */
    bool extra_cut;           /* check mode: the entry had more */
    uint8_t *extra_unknown;   /* extra data past the 24 bytes cbt knows */
    uint32_t extra_unknown_len;
};

/*
 * Metadata kinds for overlap checks (overlap.c), in QEMU's order so that
 * the structure named on a hit is the one QEMU would name; QEMU has no
 * bits for the last two.
 */
#define QCOW2_OL_HEADER (1u << 0)
#define QCOW2_OL_ACTIVE_L1 (1u << 1)
#define QCOW2_OL_ACTIVE_L2 (1u << 2)
#define QCOW2_OL_REFCOUNT_TABLE (1u << 3)
#define QCOW2_OL_REFCOUNT_BLOCK (1u << 4)
#define QCOW2_OL_SNAPSHOT_TABLE (1u << 5)
#define QCOW2_OL_INACTIVE_L1 (1u << 6)
#define QCOW2_OL_INACTIVE_L2 (1u << 7) /* not tracked */
#define QCOW2_OL_BITMAP_DIR (1u << 8)
#define QCOW2_OL_BITMAP_TABLE (1u << 9)
#define QCOW2_OL_BITMAP_DATA (1u << 10)
#define QCOW2_OL_NKINDS 11
#define QCOW2_OL_BITMAPS \
    (QCOW2_OL_BITMAP_DIR | QCOW2_OL_BITMAP_TABLE | QCOW2_OL_BITMAP_DATA)

/* A structure of `kind` over clusters [first, end). */
struct qcow2_meta_range {
    uint64_t first, end;
    unsigned kind;
};

/* Where the image's metadata lies (overlap.c has the design). */
struct qcow2_meta_map {
    bool valid;                     /* built from the current state */
    struct qcow2_meta_range *fixed; /* sorted by first */
    uint64_t *fixed_maxend;         /* max(end) of fixed[0..i] */
    size_t nfixed;
    uint64_t *one;                  /* cluster << 4 | kind index, sorted */
    size_t none, cap;
    /* A bitmap structure that shares a cluster with other metadata: a
     * bitmap store would free it.  0, or the kind it overlaps. */
    unsigned bitmap_conflict;
    uint64_t bitmap_conflict_off;
    unsigned bitmap_conflict_kind;
};

/* Metadata cache of cluster-sized tables (cache.c). */
struct qcow2_cache_entry {
    uint64_t offset; /* 0 = empty slot */
    uint8_t *data;
    uint64_t lru;
    bool dirty;
    int pins;
};
struct qcow2_cache {
    struct qcow2_cache_entry *entries;
    uint8_t *mem;            /* nsets * ways tables, back to back (mmap) */
    size_t mem_len;
    uint64_t cluster_size;
    uint32_t ndirty;
    uint32_t nsets, ways;
    uint64_t lru_clock;
    bool is_l2; /* L2 cache: flush refcounts first when writing back */
};

struct qcow2_state {
    struct blk_node *node;
    struct qcow2_header h;
    uint8_t *extra_header;   /* header bytes in [112, header_length) */
    size_t extra_header_len;
    struct qcow2_ext *exts;  /* preserved unknown extensions */
    size_t nb_exts, cap_exts;
    struct qcow2_bitmaps_ext bm_ext;
    struct qcow2_bitmap_dirent *bm_dir; /* the directory bm_ext points at */
    uint32_t bm_dir_n;
    bool bm_loaded;          /* node->bitmaps came from the directory */
    bool bm_marked;          /* in_use set on disk since the last store */

    uint32_t cluster_bits;
    uint64_t cluster_size;
    bool ext_l2;
    uint32_t l2_entry_size;  /* 8 or 16 */
    uint32_t l2_bits;        /* log2(entries per L2 table) */
    uint64_t l2_entries;
    uint32_t subcluster_bits;
    uint64_t subcluster_size;
    uint32_t csize_shift;    /* compressed descriptor layout */
    uint64_t csize_mask;
    uint64_t cmp_offset_mask;

    uint32_t refcount_order;
    uint32_t refcount_bits;
    uint64_t refcount_max;
    uint32_t rb_bits;        /* log2(refcount entries per block) */
    uint64_t rb_entries;

    uint64_t *l1;            /* native order */
    uint32_t l1_size;
    uint32_t l1_dirty_lo, l1_dirty_hi; /* dirty range [lo, hi) */

    uint64_t *reftable;      /* native order */
    uint64_t reftable_entries;
    uint64_t reftable_dirty_lo, reftable_dirty_hi;

    struct qcow2_cache l2_cache;
    struct qcow2_cache rb_cache;

    uint64_t free_hint;      /* no free cluster below this index */
    uint64_t alloc_end;      /* first cluster index past every used one */
    uint64_t free_byte_offset; /* next byte for compressed data, 0: none */
    uint64_t *pending_free;  /* host offsets|nb clusters, see refcount.c */
    uint64_t *pending_free_len;
    size_t nb_pending_free, cap_pending_free;

    int data_fd;             /* external data file or node->fd */
    struct blk_lock *data_lock; /* its lock (blk_open_file), or NULL */
    enum blk_lock_role data_lock_role;
    char *data_file;         /* name as stored, or NULL */
    char *data_path;         /* resolved path */
    bool data_file_raw;

    struct qcow2_snapshot *snapshots;
    uint32_t nb_snapshots;
    uint64_t snapshots_size;  /* bytes: to the end of the last entry */

    struct qcow2_meta_map meta;
    bool corrupt;             /* a write hit metadata: no more writes */
    bool corruption_reported; /* a corruption was told (cbt_warn) */
    char corrupt_msg[256];

    bool metadata_prealloc;  /* file holes under allocated clusters */
    bool need_sync;          /* writes issued since the last fdatasync */
    bool check_mode;         /* opened for check/repair */
    bool header_dirty;
};

static inline struct qcow2_state *qcow2_state(struct blk_node *node)
{
    return node->opaque;
}
static inline uint64_t qcow2_offset_into_cluster(const struct qcow2_state *s,
                                                 uint64_t off)
{
    return off & (s->cluster_size - 1);
}
static inline uint64_t qcow2_size_to_clusters(const struct qcow2_state *s,
                                              uint64_t size)
{
    return (size + s->cluster_size - 1) >> s->cluster_bits;
}
static inline bool qcow2_has_data_file(const struct qcow2_state *s)
{
    return s->h.incompatible_features & QCOW2_INCOMPAT_DATA_FILE;
}
/* Entries of L1 needed for a virtual size. */
static inline uint64_t qcow2_l1_entries_for(uint64_t size, uint32_t cluster_bits,
                                            uint32_t l2_bits)
{
    uint64_t shift = cluster_bits + l2_bits;
    return (size + (1ull << shift) - 1) >> shift;
}

/* header.c */
int qcow2_read_header(struct qcow2_state *s, int fd, uint64_t file_len,
                      struct cbt_error **errp);
/* Serialize the first cluster (header, extensions, backing name) into buf
 * of cluster_size bytes.  -ENOSPC when it does not fit. */
int qcow2_build_header(const struct qcow2_state *s, uint8_t *buf);
/* Rewrite the first cluster on disk (one write) and sync. */
int qcow2_write_header(struct qcow2_state *s);
/* The same, saying whether the header write itself landed (*written: a
 * later sync may still have failed) or not (the header is unchanged). */
int qcow2_write_header_ex(struct qcow2_state *s, bool *written);
/* The first preserved (unknown to cbt's qcow2 code) extension of `type`,
 * or NULL; and how many of that type the header holds. */
const struct qcow2_ext *qcow2_find_ext(const struct qcow2_state *s,
                                      uint32_t type);
size_t qcow2_count_ext(const struct qcow2_state *s, uint32_t type);
/* Replace the preserved extensions of `type` by one (data NULL: drop them
 * all), in memory; the header is marked dirty and written by the next
 * flush or bitmap store (one header write with the bitmaps).  -ENOSPC
 * when the header would no longer fit in its cluster: then only copies
 * beyond the first may have gone. */
int qcow2_set_ext(struct qcow2_state *s, uint32_t type, const void *data,
                  uint32_t len);
void qcow2_free_header(struct qcow2_state *s);

/* cache.c */
int qcow2_cache_init(struct qcow2_cache *c, uint64_t cluster_size,
                     uint32_t nentries, bool is_l2);
void qcow2_cache_destroy(struct qcow2_cache *c);
/* Pin and return the table at offset, reading it unless `fresh` (then the
 * buffer is zeroed).  Release with qcow2_cache_put. */
int qcow2_cache_get(struct qcow2_state *s, struct qcow2_cache *c,
                    uint64_t offset, bool fresh, uint8_t **table);
void qcow2_cache_put(struct qcow2_cache *c, uint8_t *table);
void qcow2_cache_mark_dirty(struct qcow2_cache *c, uint8_t *table);
/* Write every dirty entry (no sync). */
int qcow2_cache_write_dirty(struct qcow2_state *s, struct qcow2_cache *c);
/* Forget an entry (its cluster was freed). */
void qcow2_cache_discard(struct qcow2_cache *c, uint64_t offset);
/* Is any entry dirty? */
bool qcow2_cache_is_dirty(const struct qcow2_cache *c);

/* refcount.c */
uint64_t qcow2_rb_get(const uint8_t *rb, uint64_t idx, uint32_t order);
void qcow2_rb_set(uint8_t *rb, uint64_t idx, uint32_t order, uint64_t v);
int qcow2_get_refcount(struct qcow2_state *s, uint64_t cluster_index,
                       uint64_t *refcount);
/* Allocate n contiguous clusters with refcount 1; returns host offset or
 * -errno.  _append: past the end of the file and of every cluster in use,
 * never a cluster with refcount 0 that something may still reference
 * (metadata-only jobs, see the design notes). */
int64_t qcow2_alloc_clusters(struct qcow2_state *s, uint64_t n);
int64_t qcow2_alloc_clusters_append(struct qcow2_state *s, uint64_t n);
/* Allocate `size` bytes (1..cluster_size) for compressed data, packed
 * after the previous compressed cluster when they fit (QEMU's
 * free_byte_offset): every host cluster the bytes touch gains one
 * reference.  Returns the host byte offset or -errno. */
int64_t qcow2_alloc_bytes(struct qcow2_state *s, uint64_t size);
/* Add `delta` (may be negative) to the refcount of every cluster touched by
 * [offset, offset+len). */
int qcow2_update_refcount(struct qcow2_state *s, uint64_t offset, uint64_t len,
                          int64_t delta);
/* Defer a refcount decrement to the next flush (see design notes). */
int qcow2_free_clusters_deferred(struct qcow2_state *s, uint64_t offset,
                                 uint64_t len);
/* Free what an L2 entry references (normal or compressed), deferred. */
int qcow2_free_l2_entry_clusters(struct qcow2_state *s, uint64_t l2e);
int qcow2_apply_pending_frees(struct qcow2_state *s);
/* Write dirty refblocks and reftable entries (no sync). */
int qcow2_write_refcounts(struct qcow2_state *s);
int qcow2_load_reftable(struct qcow2_state *s, uint64_t file_len,
                        struct cbt_error **errp);
/* Recompute alloc_end from the refcounts (last used cluster + 1). */
int qcow2_compute_alloc_end(struct qcow2_state *s);

/* cluster.c */
enum qcow2_sc_type qcow2_sc_type(const struct qcow2_state *s, uint64_t l2e,
                                 uint64_t bitmap, uint32_t sc);
uint64_t qcow2_l2_get(const struct qcow2_state *s, const uint8_t *l2,
                      uint64_t idx);
uint64_t qcow2_l2_get_bitmap(const struct qcow2_state *s, const uint8_t *l2,
                             uint64_t idx);
void qcow2_l2_set(const struct qcow2_state *s, uint8_t *l2, uint64_t idx,
                  uint64_t entry, uint64_t bitmap);
/* Mapping of guest [off, off+*bytes): on return *bytes is the length of the
 * run with one type and contiguous host offsets (within one L2 table). */
struct qcow2_map {
    enum qcow2_sc_type type;
    uint64_t host_offset;  /* NORMAL/ZERO_ALLOC/UNALLOC_ALLOC: of `off` */
    uint64_t l2e;          /* the raw entry (compressed descriptor) */
};
int qcow2_get_mapping(struct qcow2_state *s, uint64_t off, uint64_t *bytes,
                      struct qcow2_map *map);
/* Pin the L2 table for guest offset `off`, allocating it (and copying a
 * shared one) when `alloc`.  *l2 is NULL without alloc when unallocated. */
int qcow2_get_l2(struct qcow2_state *s, uint64_t off, bool alloc,
                 uint8_t **l2, uint64_t *l2_index);
/* Host offset of the compressed data and its length in bytes. */
void qcow2_compressed_span(const struct qcow2_state *s, uint64_t l2e,
                           uint64_t *host_off, uint64_t *len);
/* Validate an L1 entry; -EIO if it is corrupt. */
int qcow2_check_l1_entry(const struct qcow2_state *s, uint64_t l1e);
void qcow2_mark_l1_dirty(struct qcow2_state *s, uint32_t idx);
int qcow2_write_l1(struct qcow2_state *s);
int qcow2_load_l1(struct qcow2_state *s, uint64_t file_len,
                  struct cbt_error **errp);

/* io.c */
int qcow2_read(struct blk_node *node, void *buf, uint64_t off, size_t len);
int qcow2_write(struct blk_node *node, const void *buf, uint64_t off,
                size_t len);
int qcow2_write_zeroes(struct blk_node *node, uint64_t off, uint64_t len,
                       unsigned flags);
int qcow2_discard(struct blk_node *node, uint64_t off, uint64_t len);
/* Entries first..end of a (writable, cached) L2 table become 0 and what
 * they held is freed (not with an external data file, which is not
 * refcounted); the table is marked dirty.  make_empty and a shrinking
 * resize.  0 or -errno. */
int qcow2_l2_clear_from(struct qcow2_state *s, uint8_t *l2, uint64_t first);
/* The driver's make_empty: every entry of the active L2 tables becomes 0
 * (reads fall through to the backing file), what they held is freed. */
int qcow2_make_empty(struct blk_node *node);
int qcow2_flush(struct blk_node *node);
int qcow2_block_status(struct blk_node *node, uint64_t off, uint64_t len,
                       struct blk_status *st);
/* Write back all metadata in crash-safe order and sync (see notes). */
int qcow2_flush_metadata(struct qcow2_state *s);
/* Flush refcounts (and sync) before an L2 table may be written. */
int qcow2_prepare_l2_writeback(struct qcow2_state *s);
int qcow2_sync(struct qcow2_state *s);

/* compress.c */
int qcow2_decompress(const struct qcow2_state *s, const uint8_t *in,
                     size_t in_len, uint8_t *out, size_t out_len);
/* Read and inflate the cluster an L2 compressed entry points at. */
int qcow2_read_compressed(struct qcow2_state *s, uint64_t l2e, uint8_t *out);
/* Compress in_len bytes with the image's compression type into at most
 * out_cap bytes: the length, -ENOSPC when it does not fit, or -errno. */
int64_t qcow2_compress(const struct qcow2_state *s, const uint8_t *in,
                       size_t in_len, uint8_t *out, size_t out_cap);
/* The driver's write_compressed (see block.h): one cluster, stored
 * compressed, or normally when it does not shrink below cluster_size;
 * cbuf, when not NULL, is that cluster already compressed by
 * qcow2_compress_cluster (cbuf_len bytes; buf unused). */
int qcow2_write_compressed(struct blk_node *node, const void *buf,
                           uint64_t off, size_t len, const void *cbuf,
                           size_t cbuf_len);
/* The driver's compress (see block.h). */
int64_t qcow2_compress_cluster(struct blk_node *node, const void *buf,
                               size_t len, void *out, size_t cap);

/* snapshot.c */
/* Parse the table; images opened for check keep entries with too much
 * extra data (cut, extra_cut set) for check -r all to rewrite. */
int qcow2_read_snapshots(struct qcow2_state *s, uint64_t file_len,
                         struct cbt_error **errp);
void qcow2_free_snapshots(struct qcow2_state *s);
/* A v3 entry without the disk size in its extra data (QEMU: incomplete). */
bool qcow2_snapshot_incomplete(const struct qcow2_state *s,
                               const struct qcow2_snapshot *sn);
/* Write the table anew, complete (QEMU's qcow2_write_snapshots): new
 * clusters, then the header, then the old clusters freed.  0 or -errno. */
int qcow2_write_snapshots(struct qcow2_state *s);

/* create.c */
int qcow2_create(const char *filename, const struct cbt_create_opts *opts,
                 struct cbt_error **errp);

/* check.c */
int qcow2_check(struct blk_node *node, unsigned fix,
                struct cbt_check_result *res, cbt_report_fn *report,
                void *opaque, struct cbt_error **errp);

/* bitmap_ext.c */
/* Parse the bitmaps extension's directory and load every bitmap into the
 * node (open); an extension without autoclear bit 0 is dropped with a
 * warning.  Images opened for check load nothing.  0 or -1 with *errp. */
int qcow2_bitmaps_load(struct qcow2_state *s, bool rw, struct cbt_error **errp);
/* driver->bitmap_read (block.h). */
int qcow2_bitmap_read(struct blk_node *node, const struct blk_bitmap *b,
                      blk_bitmap_chunk_fn *cb, void *opaque,
                      struct cbt_error **errp);
/* Before a resize: every bitmap in_use on disk (their sizes will not
 * match the image until the next store). */
/* Growing the image to new_size (already in s->h.size, the L1 table
 * already large enough): give every valid bitmap whose table is too short
 * a longer one, in one header update that also carries the new size.
 * Nothing is written when no table needs to grow. */
int qcow2_bitmaps_grow_tables(struct qcow2_state *s, uint64_t new_size,
                              struct cbt_error **errp);
int qcow2_bitmaps_mark_all_in_use(struct qcow2_state *s,
                                  struct cbt_error **errp);
/* The driver's mark_dirty, bitmap_can_store and bitmap_store callbacks. */
int qcow2_bitmaps_mark_dirty(struct blk_node *node, uint64_t off, uint64_t len);
int qcow2_bitmap_can_store(struct blk_node *node, const char *name,
                           uint64_t granularity, struct cbt_error **errp);
int qcow2_bitmaps_store(struct blk_node *node, struct cbt_error **errp);
void qcow2_bitmaps_free(struct qcow2_state *s);
/* Add the data clusters of the directory in force to the metadata map
 * (qcow2_meta_add_bitmap_data), reading at most a bounded amount of
 * tables.  0 or -ENOMEM. */
int qcow2_bitmaps_meta_data(struct qcow2_state *s);
/* check -r all: rewrite the directory in place keeping only the entries
 * that pass every load-time check (dir_ok: the extension's fields are
 * sane and its directory may be rewritten where it is), or drop the
 * extension when none is left.  What the dropped entries used becomes
 * leaks.  0 or -errno. */
int qcow2_bitmaps_salvage(struct qcow2_state *s, bool dir_ok, uint32_t *kept,
                          uint32_t *dropped);
/* Parse and check a directory image of `size` bytes holding `nb` entries
 * (QEMU's bitmap_list_load and check_dir_entry, plus unique names without
 * NUL bytes).  0 with the entries (free with qcow2_bitmap_dir_free), or
 * -errno with the reason in why. */
int qcow2_bitmap_dir_parse(const struct qcow2_state *s, const uint8_t *dir,
                           uint64_t size, uint32_t nb,
                           struct qcow2_bitmap_dirent **out, uint32_t *nout,
                           char *why, size_t why_len);
void qcow2_bitmap_dir_free(struct qcow2_bitmap_dirent *dir, uint32_t n);
/* A bitmap table entry against QEMU's check_table_entry: no reserved
 * bits, and either no offset (the cluster reads as zeroes, or as ones
 * with bit 0) or a cluster-aligned offset without bit 0.  The one rule
 * load, salvage and check apply. */
bool qcow2_bitmap_table_entry_valid(const struct qcow2_state *s, uint64_t e);
/* Table entries a bitmap of this granularity needs for `size` bytes. */
uint64_t qcow2_bitmap_table_entries(const struct qcow2_state *s, uint64_t size,
                                    unsigned granularity_bits);
/* Encode the extension's 24 bytes. */
void qcow2_bitmaps_ext_encode(const struct qcow2_bitmaps_ext *e, uint8_t *buf);

/* overlap.c */
/* (Re)build the map from the state (L1, refcount table, snapshots, bitmap
 * directory and tables).  0 or -ENOMEM. */
int qcow2_meta_rebuild(struct qcow2_state *s);
/* Forget the map after a structure moved (rebuilt before the next check). */
void qcow2_meta_invalidate(struct qcow2_state *s);
void qcow2_meta_free(struct qcow2_meta_map *m);
/* A one-cluster structure (L2 table, refcount block, bitmap data) at host
 * offset off appeared or went.  0 or -ENOMEM. */
int qcow2_meta_add(struct qcow2_state *s, uint64_t off, unsigned kind);
void qcow2_meta_remove(struct qcow2_state *s, uint64_t off, unsigned kind);
/* For qcow2_bitmaps_meta_data, while the map is built. */
int qcow2_meta_add_bitmap_data(struct qcow2_state *s, uint64_t off);
/* The first kind (QEMU's order) of metadata, other than `ign`, in the
 * clusters [off, off+len) touches; 0 when none.  The map must be valid. */
unsigned qcow2_meta_overlap(struct qcow2_state *s, uint64_t off, uint64_t len,
                            unsigned ign);
const char *qcow2_meta_kind_name(unsigned kind);
/* Before writing [off, off+len) of the image file: 0, or -EIO when the
 * image is corrupt or the write would hit metadata other than `ign` (the
 * image is then marked corrupt).  _data: guest data (nothing to check in
 * an external data file).  qcow2_pwrite_meta: the check, then the write
 * (node->fd). */
int qcow2_pre_write(struct qcow2_state *s, uint64_t off, uint64_t len,
                    unsigned ign);
int qcow2_pre_write_data(struct qcow2_state *s, uint64_t off, uint64_t len);
int qcow2_pwrite_meta(struct qcow2_state *s, const void *buf, size_t len,
                      uint64_t off, unsigned ign);
/* Before dropping a reference to [off, off+len): the same check (a
 * cluster still holding metadata must keep its refcount). */
int qcow2_pre_free(struct qcow2_state *s, uint64_t off, uint64_t len,
                   unsigned ign);
/* Mark the image corrupt (QEMU's qcow2_signal_corruption, fatal): the
 * message (printf-style, without the file name) is reported once and kept
 * for qcow2_strerror; the header's corrupt bit is set; every later write
 * fails.  Returns -EIO. */
int qcow2_signal_corruption(struct qcow2_state *s, const char *fmt, ...)
    PRINTF_FMT(2, 3);
/* Report damage found while reading (QEMU's non-fatal corruption event):
 * once per image, through cbt_warn; the caller returns -EIO. */
void qcow2_report_corruption(struct qcow2_state *s, const char *fmt, ...)
    PRINTF_FMT(2, 3);
/* Damage found in a table the data path needs (QEMU's corruption events
 * on reads): marks the image corrupt when it is writable, else reports
 * it; returns -EIO.  Message printf-style, without the file name. */
int qcow2_damaged(struct qcow2_state *s, const char *fmt, ...)
    PRINTF_FMT(2, 3);
/* strerror(-r), or why the image was marked corrupt for its -EIO. */
const char *qcow2_strerror(const struct qcow2_state *s, int r);

/* qcow2.c */
int qcow2_resize(struct blk_node *node, uint64_t new_size, bool shrink,
                 struct cbt_error **errp);

#endif
