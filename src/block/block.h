/* Block layer: nodes (open images), backing chains, the driver contract and
 * the single write path. */
#ifndef CBT_BLOCK_H
#define CBT_BLOCK_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include <cbt/image.h>

#include "../util/util.h"

/* Inside libcbt a node is the image object: struct blk_node == struct
 * cbt_image, spelled blk_node in the block layer and the drivers. */
#define blk_node cbt_image
struct blk_node;

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

    /* Called by blk_mark_dirty before guest data changes in
     * [off, off+len): the driver keeps its persistent change tracking
     * (qcow2 bitmaps) truthful.  Optional. */
    int (*mark_dirty)(struct blk_node *node, uint64_t off, uint64_t len);

    int (*get_info)(struct blk_node *node, struct cbt_image_info *info,
                    struct cbt_error **errp);
    int (*check)(struct blk_node *node, unsigned fix,
                 struct cbt_check_result *res, cbt_report_fn *report,
                 void *opaque, struct cbt_error **errp);
    int (*resize)(struct blk_node *node, uint64_t new_size, bool shrink,
                  struct cbt_error **errp);
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
    struct blk_node *backing;
    char *backing_name;     /* backing file name as stored (driver sets) */
    char *backing_fmt;      /* backing format as stored, or NULL */
    pthread_mutex_t lock;
};

/* block.c */
extern const struct blk_driver blk_raw_driver;
extern const struct blk_driver blk_qcow2_driver;
const struct blk_driver *blk_find_driver(const char *name);
/* Probe the format of an open file; NULL when unknown (falls back to raw). */
const struct blk_driver *blk_probe(int fd);
/* Read [off, off+len) of the node's backing view: the backing node's data
 * within its size, zeroes past it or without a backing node. */
int blk_read_backing(struct blk_node *node, void *buf, uint64_t off,
                     size_t len);
/* Where the data path dirties recording bitmaps: every write, zero-write
 * and discard passes here first, with node->lock held. */
int blk_mark_dirty(struct blk_node *node, uint64_t off, uint64_t len);

#define BLK_MAX_CHAIN_DEPTH 256

#endif
