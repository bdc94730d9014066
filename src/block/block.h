/* Block layer: nodes (open images), backing chains, the driver contract and
 * the single write path. */
#ifndef CBT_BLOCK_H
#define CBT_BLOCK_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include <cbt/image.h>

#include "../bitmap/bitmap.h"
#include "../util/util.h"

/* Inside libcbt a node is the image object: struct blk_node == struct
 * cbt_image, spelled blk_node in the block layer and the drivers. */
#define blk_node cbt_image
struct blk_node;

/* lock.c: QEMU's image locks (see its header comment). */
#define BLK_PERM_CONSISTENT_READ (1u << 0)
#define BLK_PERM_WRITE (1u << 1)
#define BLK_PERM_WRITE_UNCHANGED (1u << 2)
#define BLK_PERM_RESIZE (1u << 3)
#define BLK_PERM_BITS 4
#define BLK_PERM_ALL ((1u << BLK_PERM_BITS) - 1)
/* What an open file is used for; each role is a pair of permission sets. */
enum blk_lock_role {
    BLK_LOCK_NONE,        /* no locks */
    BLK_LOCK_READ,        /* read; nobody may write or resize */
    BLK_LOCK_SHARED_READ, /* read; others may do anything (-U) */
    BLK_LOCK_WRITE,       /* read, write, resize; nobody else writes */
    BLK_LOCK_CREATE,      /* write, resize: before truncating a new file */
    BLK_LOCK_ROLES
};
/*
 * The locks of one file of this process (lock.c keeps one per file, shared
 * by every open of it in the process).  blk_lock_acquire: lock the file
 * open in fd for `role` as QEMU does (take the bytes, then test for
 * conflicting holders in other processes).  The handle, or NULL with *errp
 * (kind CBT_ERR_IN_USE for a conflict: QEMU's message, who holds the file
 * and what to do).  On a file system without OFD locks, warns and goes on.
 * blk_lock_change: one open of the file moves from role `from` to `to`
 * (0, or -1 with *errp and nothing changed).  blk_lock_release: one open
 * of `role` ends (NULL is tolerated); the last one drops the locks.
 */
struct blk_lock;
struct blk_lock *blk_lock_acquire(int fd, const char *filename,
                                  enum blk_lock_role role,
                                  struct cbt_error **errp);
int blk_lock_change(struct blk_lock *l, const char *filename,
                    enum blk_lock_role from, enum blk_lock_role to,
                    struct cbt_error **errp);
void blk_lock_release(struct blk_lock *l, enum blk_lock_role role);
/* Does another open file hold the write permission on fd's file? */
bool blk_lock_writer_present(int fd);
/* The role of an open with these CBT_OPEN_* flags. */
static inline enum blk_lock_role blk_lock_role_of(unsigned flags)
{
    if (flags & CBT_OPEN_RDWR)
        return BLK_LOCK_WRITE;
    return (flags & CBT_OPEN_FORCE_SHARE) ? BLK_LOCK_SHARED_READ
                                          : BLK_LOCK_READ;
}

/* Block-status answers of a driver about its own layer. */
#define BLK_STATUS_ALLOCATED (1u << 0) /* this layer decides the contents */
#define BLK_STATUS_DATA (1u << 1)      /* data stored at host_offset */
#define BLK_STATUS_ZERO (1u << 2)      /* reads as zeroes */
#define BLK_STATUS_OFFSET (1u << 3)    /* host_offset valid */
#define BLK_STATUS_COMPRESSED (1u << 4)

struct blk_status {
    uint64_t length;      /* run length with this status, > 0 */
    unsigned flags;
    uint64_t host_offset; /* in the file named by host_file */
    const char *host_file;
};

/*
 * One dirty bitmap of a node.  States (DESIGN.md §5): recording or
 * disabled; persistent (stored in the image) or transient; busy (held by a
 * job or an export); inconsistent (found in_use when the image was opened:
 * its contents are unknown, bm is NULL, and only remove is allowed).
 *
 * Lazy bits: a persistent bitmap whose bits are still only on disk is
 * `on_disk` (bm NULL, not inconsistent): the driver checked its table at
 * open, and bitmap_read streams its bits from disk_key when asked.  Reading
 * a bitmap out (count, sha256) streams them without loading; anything
 * that changes or keeps the bits loads them first (blk_bitmap_load).  The
 * first write loads the recording bitmaps before it goes ahead (and fails
 * if they cannot be read); enable loads the bitmap it enables.
 * A loaded bitmap keeps disk_key until its bits change, so a store
 * rewrites only the bitmaps that changed.
 */
struct blk_bitmap {
    char *name;
    struct bm_bitmap *bm;   /* the bits; NULL when inconsistent or on_disk */
    bool on_disk;           /* bits not loaded: read them via disk_key */
    uint64_t disk_key;      /* non-zero: the bits (loaded or not) are those
                             * the image holds there (qcow2: the table
                             * offset), so a store may keep that table;
                             * 0 once they change (blk_bitmap_changed) */
    bool counted;           /* on_disk: disk_count is known */
    uint64_t disk_count;    /* on_disk: dirty bytes, counted once (the
                             * bits cannot change while on disk) */
    uint64_t granularity;   /* bytes per bit */
    bool recording;         /* writes dirty it (qcow2: the 'auto' flag) */
    bool persistent;
    bool in_use;            /* the image had in_use set when it was opened */
    bool disk_auto;         /* ... and 'auto' */
    bool inconsistent;
    bool busy;
    uint64_t disk_bytes;    /* table and data bytes in the image (driver) */
};

typedef int blk_bitmap_chunk_fn(void *opaque, uint64_t chunk,
                                uint64_t chunk_bytes, const uint8_t *buf,
                                bool ones);

/* The bitmaps of a node, in directory order. */
struct blk_bitmap_list {
    struct blk_bitmap *v;
    size_t n, cap;
};

/*
 * A format driver: a table of callbacks.  The block layer has already
 * checked that [off, off+len) lies within the node's size, that writes only
 * reach writable nodes, and has dirtied recording bitmaps; drivers never
 * repeat those checks.  Data-path callbacks return 0 or -errno.  Callbacks
 * are called with node->lock held unless the driver says otherwise.
 */
struct blk_driver {
    const char *name;
    /* Score 0..100 of how likely buf (the first bytes of a file) is ours. */
    int (*probe)(const uint8_t *buf, size_t len);
    int (*open)(struct blk_node *node, int fd, unsigned flags,
                struct cbt_error **errp);
    /* Write back caches; do not free node. */
    int (*close)(struct blk_node *node, struct cbt_error **errp);
    int (*create)(const char *filename, const struct cbt_create_opts *opts,
                  struct cbt_error **errp);

    /* Reads of unallocated ranges go to blk_read_backing(). */
    int (*read)(struct blk_node *node, void *buf, uint64_t off, size_t len);
    int (*write)(struct blk_node *node, const void *buf, uint64_t off,
                 size_t len);
    int (*write_zeroes)(struct blk_node *node, uint64_t off, uint64_t len,
                        unsigned flags);
    int (*discard)(struct blk_node *node, uint64_t off, uint64_t len);
    int (*flush)(struct blk_node *node);
    int (*block_status)(struct blk_node *node, uint64_t off, uint64_t len,
                        struct blk_status *st);

    /*
     * Persistent bitmaps.  Optional: without them a node holds none.
     * open loads the image's bitmaps into node->bitmaps (blk_bitmap_append).
     * mark_dirty: called by blk_mark_dirty before guest data changes in
     *   [off, off+len); the driver keeps its on-disk bitmaps truthful (qcow2
     *   marks the recording ones in_use before the first write after a
     *   store).  An error fails the write.
     * bitmap_can_store: may a new persistent bitmap `name` be added (the
     *   driver's limits; the block layer has checked name and granularity)?
     * bitmap_store: store every persistent bitmap of node->bitmaps in one
     *   atomic update of the image, not in_use (commit and close); a no-op
     *   when nothing changed since the last store.  Read-write nodes only.
 *   A store that fails after the new state reached the file (e.g. the
 *   header sync failed) sets node->bitmaps_switched before returning -1.
     */
    int (*mark_dirty)(struct blk_node *node, uint64_t off, uint64_t len);
    int (*bitmap_can_store)(struct blk_node *node, const char *name,
                            uint64_t granularity, struct cbt_error **errp);
    int (*bitmap_store)(struct blk_node *node, struct cbt_error **errp);
    /* bitmap_read: stream the bits of an on_disk bitmap b (its disk_key)
     * as chunks of its serialized bit stream (bm_serialize_chunk's layout,
     * chunk_bytes each), in order, every chunk once: fn gets buf, or NULL
     * with `ones` for a chunk that is all clean or all dirty.  Bits past
     * the bitmap's end in buf are undefined.  fn's non-zero return stops
     * the read and is returned; else 0, or -1 with *errp. */
    int (*bitmap_read)(struct blk_node *node, const struct blk_bitmap *b,
                       blk_bitmap_chunk_fn *fn, void *opaque,
                       struct cbt_error **errp);

    int (*get_info)(struct blk_node *node, struct cbt_image_info *info,
                    struct cbt_error **errp);
    int (*check)(struct blk_node *node, unsigned fix,
                 struct cbt_check_result *res, cbt_report_fn *report,
                 void *opaque, struct cbt_error **errp);
    int (*resize)(struct blk_node *node, uint64_t new_size, bool shrink,
                  struct cbt_error **errp);

    /*
     * Optional.  write_compressed: store [off, off+len) compressed; off is
     * cluster-aligned and len is one cluster (or the tail of the image
     * when its size is not a multiple of the cluster size).  A cluster
     * that does not shrink is stored uncompressed.  cbuf, when not NULL,
     * is the cluster already compressed by the driver's compress (cbuf_len
     * bytes, 0 < cbuf_len < cluster size): stored as it is (buf is then
     * NULL).
     * compress: compress one such cluster of buf (len bytes) into out (at
     * most cap bytes) as write_compressed would, without writing: the
     * compressed length, 0 when it does not shrink, or -errno.  Reads only
     * what is fixed while the node is open: called without node->lock,
     * from any thread.
     * change_backing: rewrite the backing link stored in the image (name
     * NULL: no backing file; fmt may be NULL) and make it durable; on
     * failure node->backing_name/backing_fmt and the file are unchanged.
     */
    int (*write_compressed)(struct blk_node *node, const void *buf,
                            uint64_t off, size_t len, const void *cbuf,
                            size_t cbuf_len);
    int64_t (*compress)(struct blk_node *node, const void *buf, size_t len,
                        void *out, size_t cap);
    int (*change_backing)(struct blk_node *node, const char *name,
                          const char *fmt, struct cbt_error **errp);
    /* Deallocate every range of this layer (reads fall through to the
     * backing file again), as QEMU's bdrv_make_empty. */
    int (*make_empty)(struct blk_node *node);
    /*
     * Optional: opaque header extensions cbt keeps in the image for its own
     * metadata (checkpoints), preserved by QEMU as unknown extensions.
     * ext_get: a malloc'd copy of the extension of `type`, -ENOENT when
     * absent, -ENOTUNIQ when the image holds more than one of that type
     * (which one is current cannot be told).  ext_set: replace it, or
     * every copy of it (data NULL: remove them), in memory; it becomes
     * durable with the next bitmap store or flush, in the same header
     * write as the bitmaps.  Fails when the header would not fit,
     * changing nothing but, perhaps, dropping the surplus copies.
     */
    int (*ext_get)(struct blk_node *node, uint32_t type, uint8_t **data,
                   size_t *len);
    int (*ext_set)(struct blk_node *node, uint32_t type, const void *data,
                   size_t len, struct cbt_error **errp);
};

/*
 * An open image.  `lock` guards the driver's metadata (caches, allocation,
 * refcounts, bitmaps); see docs/architecture.md for the concurrency model.
 */
struct cbt_image {
    const struct blk_driver *drv;
    void *opaque;           /* driver state */
    char *filename;         /* as given by the user */
    int fd;
    unsigned flags;         /* CBT_OPEN_* */
    bool read_only;
    uint64_t size;          /* virtual size, set by the driver's open */
    uint32_t cluster_size;  /* set by the driver's open; 0 if it has none */
    struct blk_node *backing;
    /* Where warnings about this node go: the callback of the call that
     * opened it (cbt/error.h), for all its life. */
    struct cbt_warner warner;
    char *backing_name;     /* backing file name as stored (driver sets) */
    char *backing_fmt;      /* backing format as stored, or NULL */
    /* Dirty bitmaps (guarded by lock): the live list, and a copy of it as
     * of the last commit (or open) that cbt_bitmap_rollback() restores.
     * Writes dirty both, so a rollback never loses a write. */
    struct blk_bitmap_list bitmaps;
    struct blk_bitmap_list committed;
    bool bitmaps_changed;   /* API changes since the last commit */
    bool bitmaps_written;   /* writes dirtied bitmaps since the last commit */
    bool bitmaps_switched;  /* set by a driver's bitmap_store that failed
                             * after the new state reached the file: the
                             * live list is what the disk holds */
    /* Streaming writeback (block.c, guarded by lock): data bytes written
     * through the cache into wb_fd since the last start, and their span. */
    uint64_t wb_bytes;
    uint64_t wb_lo, wb_hi;
    int wb_fd;
    /* CBT_OPEN_DIRECT (guarded by lock): a second descriptor of fd's file
     * opened with O_DIRECT at the first write that could use it, the fd
     * it was opened for (a reopen replaces fd), and the alignment of the
     * buffer, offset and length it takes. */
    int direct_fd;          /* -1: none (not tried, or not possible) */
    int direct_of;          /* fd when it was tried; -1 before */
    uint32_t direct_align;
    /* Gathering (blk_gather_begin): the direct write held back, to be
     * issued with the ones that continue it. */
    bool gathering;
    const uint8_t *gather_buf;
    uint64_t gather_off;
    size_t gather_len;
    /* The image lock (lock.c), held for lock_role; it does not depend on
     * fd, which a reopen replaces. */
    struct blk_lock *file_lock;
    enum blk_lock_role lock_role;
    bool shared_with_writer; /* -U, and another process holds write */
    pthread_mutex_t lock;
};

/* block.c */
/*
 * Open one file of an image (the image, a backing file, an external data
 * file) for CBT_OPEN_* flags: read-write with CBT_OPEN_RDWR, locked for
 * the role those flags give (blk_lock_acquire, handle in *lockp, to be
 * released with that role) before anything is read.
 * Refuses what is neither a regular file nor a block device (a FIFO would
 * block, /dev/zero never ends).  The descriptor, or -1 with *errp.
 */
int blk_open_file(const char *filename, unsigned flags,
                  struct blk_lock **lockp, struct cbt_error **errp);
/*
 * Create (or empty) a regular file for a new image, locked for creation
 * (BLK_LOCK_CREATE) before it is truncated: a file another process holds
 * is refused untouched.  keep: do not empty an existing file (a raw data
 * file adopted with its contents).  The read-write descriptor, or -1 with
 * *errp; the caller releases *lockp (role BLK_LOCK_CREATE) after closing
 * it.
 */
int blk_create_file(const char *filename, bool keep, struct blk_lock **lockp,
                    struct cbt_error **errp);
extern const struct blk_driver blk_raw_driver;
extern const struct blk_driver blk_qcow2_driver;
const struct blk_driver *blk_find_driver(const char *name);
/* Probe the format of an open file; NULL when unknown (falls back to raw). */
const struct blk_driver *blk_probe(int fd);
/* Read [off, off+len) of the node's backing view: the backing node's data
 * within its size, zeroes past it or without a backing node.  Called with
 * node->lock held; takes the backing node's. */
int blk_read_backing(struct blk_node *node, void *buf, uint64_t off,
                     size_t len);
/* The virtual size of the node's backing node, 0 without one.  A driver
 * holding node->lock calls it instead of reading backing->size, which a
 * reopen of the backing node changes under the backing node's lock (taken
 * here, below node's: the top-to-bottom order). */
uint64_t blk_backing_size(struct blk_node *node);
/* A driver's data write of [off, off + len) of fd through the page cache,
 * done (blk_data_pwrite notes its own): counted for the streaming
 * writeback (block.c).  node->lock held. */
void blk_note_cached_write(struct blk_node *node, int fd, uint64_t off,
                           uint64_t len);
/*
 * A driver's data write of len bytes of buf at off into fd, node's own
 * file or another (an external data file): with CBT_OPEN_DIRECT, into
 * node's own file, and buf, off and len aligned for direct I/O, around
 * the page cache; else through it.  A direct write the file system
 * refuses (EINVAL) is done through the cache, and so is every later one.
 * 0 or -errno.  node->lock held.
 */
int blk_data_pwrite(struct blk_node *node, int fd, const void *buf,
                    size_t len, uint64_t off);
/*
 * Gathering direct writes.  Small direct writes cost a device round trip
 * each (a 64 KiB one several times its share of a 4 MiB one), and a qcow2
 * target of scattered blocks gets one per block, though its new clusters
 * follow one another in the file as the blocks do in the caller's buffer.
 * Between blk_gather_begin and blk_gather_end, a direct write that
 * continues the one held back (in the file and in memory) joins it; the
 * held one is issued when one does not, at BLK_GATHER_MAX bytes, before
 * any write through the cache, and at blk_gather_end (or a flush, or the
 * close).  The caller keeps every buffer it wrote from unchanged until
 * blk_gather_end, writes the node from one thread only meanwhile, and does
 * not read back what it wrote before then.  A held write may reach the
 * file after metadata that maps it (a qcow2 L2 table evicted meanwhile),
 * so gather only into a file that means nothing until its final flush (a
 * new backup target, renamed into place after it).  blk_gather_end: 0, or the
 * -errno of a held write (what a write of it returns).  Takes node->lock.
 */
#define BLK_GATHER_MAX ((size_t)8 << 20)
void blk_gather_begin(struct blk_node *node);
int blk_gather_end(struct blk_node *node);
/* Start writing back what a node wrote through the cache since the last
 * start (streaming writeback, in block.c, does it every 32 MiB): a job
 * that has written everything and has other work before its flush lets
 * the disk start now.  Takes node->lock. */
void blk_start_writeback(struct blk_node *node);

/*
 * Writes for chain operations (commit, stream, rebase).  bflags:
 * BLK_WRITE_NO_DIRTY leaves the node's bitmaps alone: the write moves data
 * between layers without changing the guest view, so it is not a change
 * to track (DESIGN.md §5).  Otherwise as cbt_image_pwrite & co.
 */
#define BLK_WRITE_NO_DIRTY (1u << 0)
int blk_pwrite(struct blk_node *node, const void *buf, size_t len,
               uint64_t off, unsigned bflags);
int blk_pwrite_zeroes(struct blk_node *node, uint64_t off, uint64_t len,
                      unsigned zflags, unsigned bflags);
int blk_discard(struct blk_node *node, uint64_t off, uint64_t len,
                unsigned bflags);
/* Make every allocated range of the node's own layer unallocated again
 * (qemu-img commit's "empty the image"), without dirtying bitmaps.  For
 * formats without allocation (raw) this fails with -ENOTSUP. */
int blk_make_empty(struct blk_node *node);

/*
 * Switch an open node (any layer of a chain) to read-write in place: the
 * file is reopened O_RDWR and the driver state reloaded; node->backing and
 * the layers below stay as they are.  A no-op for read-write nodes.  On
 * failure the node stays usable read-only.
 */
int blk_reopen_rw(struct blk_node *node, struct cbt_error **errp);
/* Rewrite the backing link stored in a read-write node
 * (drv->change_backing), durably.  node->backing (the open graph) is not
 * touched: a caller relinking a chain in memory moves the nodes itself. */
int blk_set_backing(struct blk_node *node, const char *name, const char *fmt,
                    struct cbt_error **errp);

/* Header extensions of a node (drv->ext_get / ext_set, under the node
 * lock).  blk_ext_get: 0, -ENOENT, -ENOTUNIQ (two or more of the type),
 * -ENOTSUP (format without extensions) or -ENOMEM.  blk_ext_set: 0 or -1
 * with *errp; the node must be writable. */
int blk_ext_get(struct blk_node *node, uint32_t type, uint8_t **data,
                size_t *len);
int blk_ext_set(struct blk_node *node, uint32_t type, const void *data,
                size_t len, struct cbt_error **errp);

/* bitmap_registry.c */
/* Where the data path dirties recording bitmaps: every write, zero-write
 * and discard passes here first, with node->lock held.  Sets every granule
 * overlapping [off, off+len) in each recording bitmap of the node (and of
 * its committed copy), then lets the driver update its on-disk state
 * (driver->mark_dirty).  0, or -errno: the write must not go ahead. */
int blk_mark_dirty(struct blk_node *node, uint64_t off, uint64_t len);
/* Append a bitmap to node->bitmaps, taking ownership of b->name and b->bm
 * (on success only).  0 or -ENOMEM.  For drivers loading an image. */
int blk_bitmap_append(struct blk_node *node, const struct blk_bitmap *b);
struct blk_bitmap *blk_bitmap_find(struct blk_node *node, const char *name);
/* The bits of b are about to change (or did): they no longer match the
 * image's copy.  For the registry and the drivers; other code changes bits
 * through blk_bitmap_set, which calls it (node->lock held). */
static inline void blk_bitmap_changed(struct blk_bitmap *b)
{
    b->disk_key = 0;
}
/* Bring an on_disk bitmap's bits into memory (b->bm); a no-op for any
 * other.  0, or -1 with *errp (b unchanged).  node->lock held, or at open. */
int blk_bitmap_load(struct blk_node *node, struct blk_bitmap *b,
                    struct cbt_error **errp);
/* Set [off, off + len) in b, loading its bits first and noting that they
 * no longer match the image's: how code outside the registry dirties a
 * bitmap by hand (a commit marking what it copied); the next
 * cbt_bitmap_commit stores it, cbt_bitmap_rollback forgets it (the live
 * list only, as an API change).  No-op for a bitmap without bits
 * (inconsistent).  0, or -1 with *errp.  node->lock held. */
int blk_bitmap_set(struct blk_node *node, struct blk_bitmap *b, uint64_t off,
                   uint64_t len, struct cbt_error **errp);
/* Make the committed copy equal to the live list (after open, after a
 * commit).  0 or -ENOMEM (the old copy is kept). */
int blk_bitmaps_snapshot(struct blk_node *node);
/* Free both lists. */
void blk_bitmaps_free(struct blk_node *node);
/* Before a resize: may the node's bitmaps be resized (none busy or
 * inconsistent, QEMU's rule)?  0, or -1 with *errp. */
int blk_bitmaps_resize_check(struct blk_node *node, struct cbt_error **errp);
/* After a successful resize: bring every bitmap to node->size (growing
 * adds clean bits, shrinking drops the bits past the end). */
void blk_bitmaps_resized(struct blk_node *node);

#define BLK_MAX_CHAIN_DEPTH 256

#endif
