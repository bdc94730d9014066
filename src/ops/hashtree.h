/*
 * Block hashes as a tree (sha256-tree-v2, docs/backups.md): the leaves of
 * sha256-blocks-v1 (SHA-256 of each 64 KiB block) under a tree of fan-out
 * 256, stored per backup only where a node differs from the one the backup
 * inherits from its parent (its record file, TARGET.tree).  This module is
 * the format's one implementation: the tree's shape and its all-zeroes
 * subtrees, the record file (parsed with every bound checked, written
 * durably), the view of a chain of record files, the builder that turns
 * changed leaves into records and a root, the check that a view's records
 * recompute its root, and the merge of two record files (prune).
 */
#ifndef CBT_OPS_HASHTREE_H
#define CBT_OPS_HASHTREE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <cbt/error.h>

#include "manifest.h"

#define TREE_ALGORITHM TREE_ALGORITHM_NAME
#define TREE_FANOUT TREE_FANOUT_N
/* Levels above the leaves: ceil(log256(blocks)) is at most 6 for the
 * largest disk a manifest accepts (2^63 bytes = 2^47 blocks). */
#define TREE_MAX_LEVELS 6
#define TREE_HEADER 64u   /* magic, block size, fan-out, blocks, levels,
                           * parent root */
#define TREE_RECORD 41u   /* u8 level, u64le index, digest */
#define TREE_TRAILER 48u  /* magic, u64le record count, root */

/* The tree of a view of `size` bytes, and its all-zeroes subtrees. */
struct tree_shape {
    uint64_t size;
    uint64_t blocks;                           /* N, leaves */
    unsigned levels;                           /* L >= 1; root = (L, 0) */
    uint64_t count[TREE_MAX_LEVELS + 1];       /* nodes at each level */
    uint8_t zfull[TREE_MAX_LEVELS + 1][32];    /* a full-width zero node */
    uint8_t zedge[TREE_MAX_LEVELS + 1][32];    /* the last node's */
};
/* 0, or -EINVAL for a size larger than a manifest accepts. */
int tree_shape_init(struct tree_shape *s, uint64_t size);
/* Levels above the leaves for n blocks: max(1, ceil(log256(n))). */
unsigned tree_levels_for(uint64_t blocks);
/* Digest of node (k, i) when every block under it reads as zeroes. */
void tree_zero(const struct tree_shape *s, unsigned k, uint64_t i,
               uint8_t out[32]);
/* Children of node (k, i), k >= 1: [*first, *first + *n) at level k-1. */
void tree_children(const struct tree_shape *s, unsigned k, uint64_t i,
                   uint64_t *first, size_t *n);
/* SHA-256("cbt-tree-v2" || u8 k || u64le n || d_0 .. d_{n-1}). */
void tree_node_digest(unsigned k, const uint8_t *children, size_t n,
                      uint8_t out[32]);

/* ---- the record file ---- */

/* The checks of the record file's bytes, shared by the file reader and
 * the fuzz target.  Header: 0 if the 64 bytes are a header of a tree of
 * `blocks` leaves. */
struct tree_file_info {
    uint64_t blocks;
    unsigned levels;
    uint8_t parent_root[32];
    uint8_t root[32];
    uint64_t nrec;
    /* Record number where level k starts; level_first[levels + 1] = nrec. */
    uint64_t level_first[TREE_MAX_LEVELS + 2];
};
/* Parse a whole record file held in memory (what = its name in errors).
 * 0, or -1 with *errp naming what is wrong. */
int tree_file_parse(const uint8_t *buf, size_t len, uint64_t blocks,
                    const char *what, struct tree_file_info *info,
                    struct cbt_error **errp);

/* A record file open for reading: checked in one streamed pass (size,
 * header, every record in order and in range, trailer) which also gives
 * its SHA-256. */
struct tree_file {
    char *path;
    int fd;
    struct tree_file_info info;
};
int tree_file_open(struct tree_file *f, const char *path, uint64_t blocks,
                   char sha256_hex[65], struct cbt_error **errp);
void tree_file_close(struct tree_file *f);
/* Record number r (< nrec): its level, index and digest.  0 or -errno. */
int tree_file_record(struct tree_file *f, uint64_t r, unsigned *level,
                     uint64_t *index, uint8_t digest[32]);

/* A new record file, written in order through the durable writer of
 * .hashes files (bfile.c): header, records sorted by (level, index),
 * trailer.  Level 0 records go straight to the file; the upper levels,
 * at most a 255th as many at each step, wait in memory for finish. */
struct tree_writer {
    struct hashes_writer w;
    unsigned levels;
    uint64_t nrec;
    int last_level;               /* of the last record, for the order */
    uint64_t last_index;
    uint8_t *up[TREE_MAX_LEVELS + 1];   /* records of levels >= 1 */
    size_t upn[TREE_MAX_LEVELS + 1], upcap[TREE_MAX_LEVELS + 1];
};
int tree_writer_open(struct tree_writer *tw, const char *path,
                     const struct tree_shape *s,
                     const uint8_t parent_root[32], struct cbt_error **errp);
/* Records in (level, index) order within each level; level 0 ones in
 * order among themselves.  0 or -errno. */
int tree_writer_record(struct tree_writer *tw, unsigned k, uint64_t i,
                       const uint8_t d[32]);
/* Append the upper levels and the trailer, make the file durable and give
 * it its name (never replacing one) and its SHA-256.  Abort after,
 * either way. */
int tree_writer_finish(struct tree_writer *tw, const uint8_t root[32],
                       char sha256_hex[65], struct cbt_error **errp);
void tree_writer_abort(struct tree_writer *tw);

/* ---- the view of a chain ---- */

/* A record file's records of one level, read forward a buffer at a time;
 * a seek far ahead (or back) is a binary search. */
struct tree_cursor {
    struct tree_file *f;
    uint64_t first, end;          /* the level's record numbers */
    uint64_t pos;                 /* current record number */
    uint8_t *buf;                 /* records [bfirst, bfirst + bn) */
    uint64_t bfirst, bn;
    bool have_last;
    uint64_t last;                /* the level's last index */
};

/* Node (k, i) of the view = the newest file's record for it, else the
 * next older file's, ..., else the all-zeroes subtree's digest.  files[0]
 * is the newest; the files stay the caller's. */
struct tree_view {
    struct tree_shape shape;
    struct tree_file **files;
    size_t nfiles;
    struct tree_cursor *cur;      /* [k * nfiles + j] */
};
int tree_view_open(struct tree_view *v, uint64_t size,
                   struct tree_file **files, size_t nfiles);
void tree_view_close(struct tree_view *v);
/* Nodes (k, first .. first + count - 1) into out (count * 32 bytes);
 * src, when not NULL, gets for each the index of the file that holds it,
 * or -1 for a zero subtree's.  Cheapest in increasing order.  0 or
 * -errno. */
int tree_view_get(struct tree_view *v, unsigned k, uint64_t first,
                  uint64_t count, uint8_t *out, int *src);
/* The view's first record at level k with index >= from (the newest
 * file's on a tie): 1 with *index, digest and *src, 0 when there is none,
 * or -errno. */
int tree_view_next(struct tree_view *v, unsigned k, uint64_t from,
                   uint64_t *index, uint8_t digest[32], int *src);

/* ---- building ---- */

/* Called for every record of the new tree (a node that differs from the
 * base's) and, when set, for every node computed.  0, or -errno/-1 to
 * stop. */
typedef int tree_node_fn(void *opaque, unsigned k, uint64_t i,
                         const uint8_t d[32]);
struct tree_level_acc {
    bool active;
    uint64_t node;                /* at this level */
    size_t n;                     /* its children */
    uint8_t *child;               /* TREE_FANOUT * 32 */
};
/*
 * Builds a view's tree from the leaves that may differ from a base view
 * (the parent's, or NULL for the all-zeroes tree), in increasing block
 * order: each changed node is computed from its children, the changed ones
 * given and the others the base's, so the cost is the changed paths', never
 * the disk's.  Memory: one node's children per level.
 */
struct tree_builder {
    const struct tree_shape *s;
    struct tree_view *base;
    tree_node_fn *record, *computed;
    void *opaque;
    bool any;
    uint64_t next_leaf;           /* leaves below it were given */
    struct tree_level_acc acc[TREE_MAX_LEVELS + 1]; /* [k]: node at k */
    uint8_t root[32];
    bool have_root;
};
int tree_builder_init(struct tree_builder *b, const struct tree_shape *s,
                      struct tree_view *base, tree_node_fn *record,
                      tree_node_fn *computed, void *opaque);
/* Leaf i's digest (i at or after the last one given), or NULL: recompute
 * its path with its base value (a resize changes the edge nodes' widths).
 * 0, -EINVAL out of order, or what a callback or the base returned. */
int tree_builder_leaf(struct tree_builder *b, uint64_t i, const uint8_t *d);
int tree_builder_finish(struct tree_builder *b, uint8_t root[32]);
void tree_builder_free(struct tree_builder *b);

/*
 * Check a view: its leaf records recompute `root`, and every node the view
 * records equals the digest of its children in the view (so a later
 * backup may build on any of them).  0, or -1 with *errp naming the
 * record file at fault (CBT_ERR_CORRUPT), or another error.
 */
int tree_view_check(struct tree_view *v, const uint8_t root[32],
                    struct cbt_error **errp);

/*
 * Fold record files into one (prune): files[0] is the newest (the point
 * kept), files[n-1] the oldest folded into it.  The new file at out_path
 * has the newest's shape and root, the oldest's parent root, and for every
 * node the newest file's record for it (records outside the newest's
 * shape dropped), so the view through it, over the oldest's parent, is
 * the newest's view; its header names parent_root (the root of the
 * backup it now sits on; zeroes: none).  on_zeroes: the oldest starts the chain's tree (a
 * full, or one on a v1 parent): records equal to the all-zeroes subtree's
 * are dropped too, leaving exactly the nodes that are not zeroes.
 * Proportional to the files' records.
 */
int tree_merge(struct tree_file **files, size_t n, uint64_t size,
               bool on_zeroes, const uint8_t parent_root[32],
               const char *out_path, char sha_hex[65],
               struct cbt_error **errp);

/* ---- one interface for the leaves of either format ---- */

/*
 * A backup's leaves, read: a sha256-blocks-v1 .hashes file paged in, or
 * the view of a chain of sha256-tree-v2 record files.  verify, restore,
 * repo verify and a new backup's parent all read leaves through it, so
 * the format is chosen once, by the manifest's hash.algorithm.
 */
struct leaf_src {
    bool tree;
    uint64_t size, n;             /* the view's bytes and leaves */
    struct hashes_reader v1;
    struct tree_file *files;      /* newest first, nfiles */
    struct tree_file **fp;
    size_t nfiles;
    struct tree_view view;
    bool view_open;
    uint8_t *win;                 /* v2: leaves [wfirst, wfirst + wn) */
    uint64_t wfirst, wn;
};
/* v1: the .hashes file of a view of `size` bytes; hex, when not NULL,
 * gets the file's SHA-256. */
int leaf_src_open_v1(struct leaf_src *l, const char *path, uint64_t size,
                     char hex[65], struct cbt_error **errp);
/*
 * v2: the record files of a chain, newest first (paths[0] is the backup's
 * own; the last is that of the first v2 backup of the chain: a full, or
 * one on a v1 parent), each checked (tree_file_open) against its
 * manifest's block count and file-sha256 (sha[i], hex; NULL: not
 * compared).  On a bad file, *bad (when not NULL) gets its index and the
 * error (CBT_ERR_CORRUPT) names it.
 */
int leaf_src_open_tree(struct leaf_src *l, uint64_t size,
                       const char *const *paths, const uint64_t *blocks,
                       const char *const *sha, size_t n, size_t *bad,
                       struct cbt_error **errp);
/* Leaves from `first` (< n) on: *leaves points at *count >= 1 of them,
 * valid until the next call.  0 or -errno. */
int leaf_src_window(struct leaf_src *l, uint64_t first, const uint8_t **leaves,
                    uint64_t *count);
/* The first block in [first, first + count) whose leaf is not the digest
 * of zeroes (the short last block's own), in *found, or UINT64_MAX: for
 * v2 in the records of that range, not block by block.  0 or -errno. */
int leaf_src_nonzero(struct leaf_src *l, uint64_t first, uint64_t count,
                     uint64_t *found);
/* v2: tree_view_check of the chain against the backup's root (hex);
 * v1: nothing to do (the root is the file's SHA-256). */
int leaf_src_check_root(struct leaf_src *l, const char *root_hex,
                        struct cbt_error **errp);
void leaf_src_close(struct leaf_src *l);

/*
 * A new backup's leaves, written as a sha256-tree-v2 record file: taken in
 * block order (a data block's leaf, a run of zero blocks, a run of blocks
 * unchanged since the parent), only what differs from the parent's view
 * becomes a record.  On a v2 parent the parent's chain is the base and an
 * unchanged run costs nothing; on a v1 parent (or none) the base is the
 * all-zeroes tree and the unchanged runs feed the parent's leaves, so that
 * backup holds the whole tree once.
 */
struct leaf_sink {
    struct tree_shape shape;
    struct leaf_src *parent;      /* the caller's, or NULL for a full */
    struct tree_view base;
    bool base_open;
    struct tree_builder b;
    bool b_open;
    struct tree_writer tw;
    bool tw_open;
    uint64_t n;                   /* leaves taken */
    uint64_t touch[2];            /* resized: edges to recompute, sorted */
    size_t ntouch, itouch;
    uint64_t records;
};
int leaf_sink_open(struct leaf_sink *s, const char *path, uint64_t size,
                   struct leaf_src *parent, const uint8_t parent_root[32],
                   struct cbt_error **errp);
/* The next leaf; `count` zero blocks (the last of the disk possibly
 * short); `count` blocks unchanged since the parent.  0 or -errno. */
int leaf_sink_put(struct leaf_sink *s, const uint8_t leaf[32]);
int leaf_sink_zeroes(struct leaf_sink *s, uint64_t count);
int leaf_sink_same(struct leaf_sink *s, uint64_t count);
/* All leaves taken: the root and the record file's SHA-256 (hex), the file
 * durable under its name.  Abort after, either way. */
int leaf_sink_finish(struct leaf_sink *s, char root_hex[65],
                     char file_sha[65], struct cbt_error **errp);
void leaf_sink_abort(struct leaf_sink *s);
/* A record file's size and header are those of a tree of `blocks`
 * leaves (no record read: for the cheap checks of a chain). */
int tree_file_quick_check(const char *path, uint64_t blocks,
                          struct cbt_error **errp);
#endif
