/* Public API for disk images: open, create, read, write, map, check, resize. */
#ifndef CBT_IMAGE_H
#define CBT_IMAGE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <cbt/error.h>

#ifdef __cplusplus
extern "C" {
#endif

/*
 * An open image: one node of a backing chain, with its backing nodes open
 * beneath it (unless CBT_OPEN_NO_BACKING).  Closing the top closes the chain.
 */
struct cbt_image;

/*
 * Threads.  libcbt needs no initialisation and every function may be
 * called from any thread.  Functions that take file names (open, create,
 * check, and the operations of cbt/ops.h, cbt/backup.h) work on images of
 * their own and may run concurrently on different files.  One open image
 * (its whole chain) may be shared by threads as follows:
 *
 *  - the data path (cbt_image_pread, pwrite, pwrite_zeroes, discard,
 *    pwrite_compressed, compress_cluster, pwrite_precompressed, flush,
 *    block_status, block_status_above), the
 *    queries (cbt_image_size, get_info, filename, format, backing,
 *    shared_with_writer), cbt_image_resize and cbt/bitmap.h may be called
 *    concurrently on the same image.  Each call runs under the lock of the
 *    node it addresses and is atomic with respect to the other calls on
 *    that node; a read falling through to a backing node takes that
 *    node's lock for each piece it reads there.  A request checks its
 *    range against the size at the moment it runs: after a concurrent
 *    shrink it fails with -EINVAL, and cbt_image_size() may be out of date
 *    as soon as it returns;
 *  - cbt_image_close() must be the last call on the chain: no other thread
 *    may use the image, or any node of its chain, while or after it runs;
 *  - image locks belong to the process (as QEMU's), so two opens of one
 *    file in one process do not exclude each other.  Do not write a file
 *    through two handles, or run two operations that write the same files
 *    at once: each handle caches metadata of its own.
 *
 * Process-wide settings (cbt_set_lock_wait) are read when an open starts:
 * set them before opening images.
 */

#define CBT_OPEN_RDWR (1u << 0)       /* open the top layer read-write */
#define CBT_OPEN_NO_BACKING (1u << 1) /* do not open backing files */
#define CBT_OPEN_CHECK (1u << 2)      /* open damaged images for check/repair */
/*
 * Read an image other processes may be writing (qemu-img's -U,
 * --force-share): no write lock is refused.  What is read is the image as
 * the writer last wrote it, which may be inconsistent; read-only opens only.
 */
#define CBT_OPEN_FORCE_SHARE (1u << 3)
/* With CBT_OPEN_FORCE_SHARE: no warning when a writer holds the image
 * (the caller knows: the live mode reads what QEMU does not change). */
#define CBT_OPEN_SHARE_QUIET (1u << 4)
/*
 * With CBT_OPEN_RDWR: write data around the host's page cache (O_DIRECT)
 * where the file system allows, for a bulk writer of a new file (a backup,
 * a restore): it does not push the host's cached data out, and it costs
 * the CPU no copy into the cache and no writeback.  Only writes whose
 * buffer, offset and length suit the file system's direct I/O alignment
 * go around it (whole blocks from an aligned buffer); metadata and the
 * rest go through it as without the flag.  A file system without direct
 * I/O (tmpfs) or one that refuses it later: every write through the cache,
 * silently.  Durability is unchanged: cbt_image_flush() makes both kinds
 * stable.  Top layer only.
 */
#define CBT_OPEN_DIRECT (1u << 5)

/*
 * format: "qcow2", "raw" or NULL to probe.
 *
 * Every file of the chain (and a qcow2 external data file) is locked as
 * QEMU locks it, before anything is read: a read-only open shares reading
 * only, a read-write open takes write and resize and shares neither, so
 * cbt and QEMU's programs (and two cbt) exclude each other as two QEMU
 * processes do.  A conflict fails the open with cbt_error_kind()
 * CBT_ERR_IN_USE and QEMU's message.  Only regular files and block
 * devices are opened.
 */
struct cbt_image *cbt_image_open(const char *filename, const char *format,
                                 unsigned flags, struct cbt_error **errp);
/* The same with options: the image's warning callback (cbt/error.h). */
struct cbt_open_opts {
    size_t struct_size;          /* sizeof(struct cbt_open_opts) */
    const char *format;          /* as cbt_image_open's */
    unsigned flags;              /* CBT_OPEN_* */
    cbt_warn_fn *warn;           /* warnings about this image, for as long
                                  * as it is open */
    void *warn_opaque;
};
#define CBT_OPEN_OPTS_INIT { .struct_size = sizeof(struct cbt_open_opts) }
struct cbt_image *cbt_image_open_with(const char *filename,
                                      const struct cbt_open_opts *opts,
                                      struct cbt_error **errp);
/*
 * How long an open (or a reopen for writing) waits for a file another
 * process holds before it fails with CBT_ERR_IN_USE: 0 (the default) not at
 * all, a negative value without end, else that many seconds.  For the
 * whole process, as the locks are; set it before opening images.
 */
void cbt_set_lock_wait(int seconds);
/* Flushes and closes the whole chain; frees img even on failure.  The last
 * call on the chain: not concurrently with any other use of it. */
int cbt_image_close(struct cbt_image *img, struct cbt_error **errp);

/*
 * Data path.  Return 0 or a negative errno.  Offsets and lengths are in
 * bytes, need no alignment, and must lie within the virtual size.  All may
 * be called concurrently on one image (see "Threads" above).
 */
int cbt_image_pread(struct cbt_image *img, void *buf, size_t len, uint64_t off);
int cbt_image_pwrite(struct cbt_image *img, const void *buf, size_t len,
                     uint64_t off);
#define CBT_ZERO_MAY_UNMAP (1u << 0) /* zeroed clusters may be deallocated */
int cbt_image_pwrite_zeroes(struct cbt_image *img, uint64_t off, uint64_t len,
                            unsigned flags);
/* Discard: the host may drop the storage of the range.  As QEMU: qcow2 v3
 * discards whole clusters only and they then read as zeroes (also over a
 * backing file); v2 drops them (zeroes) only without a backing file and
 * ignores the discard otherwise; raw punches a hole (zeroes). */
int cbt_image_discard(struct cbt_image *img, uint64_t off, uint64_t len);
/* Write whole clusters compressed (qemu-io's write -c): off cluster-aligned,
 * len a multiple of the cluster size or reaching the end of the image.
 * Each cluster is compressed on its own; one that does not shrink is
 * stored uncompressed.  -ENOTSUP for
 * formats without compression (raw). */
int cbt_image_pwrite_compressed(struct cbt_image *img, const void *buf,
                                size_t len, uint64_t off);
/* The same in two steps, for callers that compress in several threads and
 * write in order.  cbt_image_compress_cluster compresses the one cluster at
 * off (len bytes: the cluster, or the image's short last one) as
 * cbt_image_pwrite_compressed would, into out (cap bytes), writing
 * nothing; it holds the image's lock only to check off and len against
 * the size, and compresses without it, so threads compress at once (any
 * thread, while img is open).  Returns the compressed length, 0 when the cluster does not
 * shrink (write it normally), or -errno (-ENOTSUP: no compression).
 * cbt_image_pwrite_precompressed stores that cluster (len bytes at off) in
 * its compressed form cbuf (cbuf_len bytes, from
 * cbt_image_compress_cluster). */
int64_t cbt_image_compress_cluster(struct cbt_image *img, const void *buf,
                                   size_t len, uint64_t off, void *out,
                                   size_t cap);
int cbt_image_pwrite_precompressed(struct cbt_image *img, const void *cbuf,
                                   size_t cbuf_len, size_t len, uint64_t off);
/* Durable: returns once everything written before it is on stable storage. */
int cbt_image_flush(struct cbt_image *img);

/* Queries; concurrently with anything but cbt_image_close().  The size is
 * the one at the moment of the call (a resize may change it). */
uint64_t cbt_image_size(const struct cbt_image *img);
const char *cbt_image_filename(const struct cbt_image *img);
const char *cbt_image_format(const struct cbt_image *img);
/* Opened with CBT_OPEN_FORCE_SHARE while another process (a running VM)
 * held this layer for writing: its contents may change underneath and its
 * bitmaps show as inconsistent (in use by that process). */
bool cbt_image_shared_with_writer(const struct cbt_image *img);
/* The backing node, or NULL.  Borrowed: owned by img. */
struct cbt_image *cbt_image_backing(const struct cbt_image *img);

/*
 * Block status over the chain, with qemu-img map's meaning.  Describes the
 * longest run starting at off (at most len bytes) with uniform status.
 */
#define CBT_BS_PRESENT (1u << 0)      /* allocated in some layer of the chain */
#define CBT_BS_ZERO (1u << 1)         /* reads as zeroes */
#define CBT_BS_DATA (1u << 2)         /* data is stored (not a hole) */
#define CBT_BS_OFFSET_VALID (1u << 3) /* host offset valid in `offset` */
#define CBT_BS_COMPRESSED (1u << 4)   /* stored compressed */
struct cbt_extent {
    uint64_t start;
    uint64_t length;
    unsigned flags;
    int depth;         /* 0 = top layer, 1 = its backing, ... */
    uint64_t offset;   /* host offset in `filename` when OFFSET_VALID */
    const char *filename; /* file holding the data when OFFSET_VALID */
};
int cbt_image_block_status(struct cbt_image *img, uint64_t off, uint64_t len,
                           struct cbt_extent *ext);
/* The same, looking only at the layers above `base` (a node of img's chain,
 * or NULL for the whole chain): a range no layer above base allocates has
 * neither CBT_BS_PRESENT nor CBT_BS_ZERO (it reads from base). */
int cbt_image_block_status_above(struct cbt_image *img,
                                 const struct cbt_image *base, uint64_t off,
                                 uint64_t len, struct cbt_extent *ext);

/* Creation options, as qemu-img create -o.  Start from
 * CBT_CREATE_OPTS_INIT (every other field zero: its default), then set. */
struct cbt_create_opts {
    size_t struct_size;          /* sizeof(struct cbt_create_opts) */
    const char *format;          /* "qcow2" (default) or "raw" */
    uint64_t size;               /* virtual size in bytes */
    bool size_given;             /* false: take it from the backing file */
    const char *backing_file;    /* as stored in the header */
    const char *backing_format;  /* NULL: probe */
    uint32_t cluster_size;       /* 0: 64 KiB */
    int compat;                  /* 2 (0.10) or 3 (1.1); 0: 3 */
    int refcount_bits;           /* 0: 16 */
    bool extended_l2;
    const char *compression_type; /* NULL/"zlib" or "zstd" */
    const char *data_file;       /* external data file, or NULL */
    bool data_file_raw;
    bool lazy_refcounts;
    const char *preallocation;   /* NULL/"off", "metadata", "falloc", "full" */
    cbt_warn_fn *warn;           /* this call's warnings (cbt/error.h) */
    void *warn_opaque;
};
#define CBT_CREATE_OPTS_INIT { .struct_size = sizeof(struct cbt_create_opts) }
int cbt_image_create(const char *filename, const struct cbt_create_opts *opts,
                     struct cbt_error **errp);

/* Internal snapshot, as listed by qemu-img info. */
struct cbt_snapshot_info {
    char *id;
    char *name;
    uint64_t vm_state_size;
    uint32_t date_sec, date_nsec;
    uint64_t vm_clock_nsec;
    uint64_t icount;  /* UINT64_MAX when absent */
};

/* What qemu-img info reports. */
struct cbt_image_info {
    const char *filename;
    const char *format;
    uint64_t virtual_size;
    uint64_t actual_size;        /* bytes allocated on the host */
    uint32_t cluster_size;       /* 0 when the format has none (raw) */
    bool dirty_flag;
    char *backing_filename;      /* as stored, or NULL */
    char *full_backing_filename; /* resolved, or NULL */
    char *backing_format;        /* or NULL */
    /* qcow2 format-specific */
    bool is_qcow2;
    int version;                 /* 2 -> compat "0.10", 3 -> "1.1" */
    bool lazy_refcounts;
    int refcount_bits;
    bool corrupt;
    bool extended_l2;
    const char *compression_type; /* "zlib" or "zstd" */
    char *data_file;             /* or NULL */
    bool data_file_raw;
    size_t nb_snapshots;
    struct cbt_snapshot_info *snapshots;
};
/* Concurrently with the data path and resize: a consistent picture taken
 * under the image's lock. */
int cbt_image_get_info(struct cbt_image *img, struct cbt_image_info *info,
                       struct cbt_error **errp);
void cbt_image_info_free(struct cbt_image_info *info);

/* Consistency check, as qemu-img check. */
#define CBT_CHECK_FIX_LEAKS (1u << 0)
#define CBT_CHECK_FIX_ERRORS (1u << 1)
/* Not a fix: open with CBT_OPEN_FORCE_SHARE (only without fixes). */
#define CBT_CHECK_FORCE_SHARE (1u << 8)
struct cbt_check_result {
    const char *format;          /* the checked image's format (static) */
    bool unsupported;            /* the format has nothing to check (raw) */
    int64_t corruptions;
    int64_t leaks;
    int64_t check_errors;
    int64_t corruptions_fixed;
    int64_t leaks_fixed;
    uint64_t image_end_offset;
    uint64_t total_clusters;
    uint64_t allocated_clusters;
    uint64_t fragmented_clusters;
    uint64_t compressed_clusters;
};
/*
 * Check (and with fix flags, repair) one image file.  Returns 0 when the
 * check ran (res says what it found), -1 with *errp when it could not run
 * (res->unsupported set: the format has no metadata to check, e.g. raw).
 * Messages about individual problems go to `report` (may be NULL).
 */
typedef void cbt_report_fn(void *opaque, const char *msg);
int cbt_image_check(const char *filename, const char *format, unsigned fix,
                    struct cbt_check_result *res, cbt_report_fn *report,
                    void *opaque, struct cbt_error **errp);

/* Change the virtual size of the top layer (opened read-write).  May run
 * concurrently with the data path: requests run wholly before or after it
 * and are checked against the size they run under. */
int cbt_image_resize(struct cbt_image *img, uint64_t new_size, bool shrink,
                     struct cbt_error **errp);

/* Parse a size with an optional k/M/G/T/P/E suffix (powers of 1024) or b.
 * Pure: from any thread. */
int cbt_parse_size(const char *s, uint64_t *out);

#ifdef __cplusplus
}
#endif

#endif
