/* Helpers shared by the chain operations (src/ops). */
#ifndef CBT_OPS_UTIL_H
#define CBT_OPS_UTIL_H

#include <stdbool.h>

#include <cbt/image.h>
#include <cbt/ops.h>

/*
 * The backing name to store in `image` for `backing`: backing's basename
 * when both files are in the same directory, otherwise backing's path made
 * absolute.  malloc'd, or NULL with errno set.
 */
char *ops_backing_name(const char *backing, const char *image);

/*
 * The layer of the open chain `top` that is the file `path` (compared by
 * device and inode, so any spelling matches).  Returns the node and its
 * depth (0 = top) in *depth, or NULL with *errp when path is not in the
 * chain or cannot be stat'ed.
 */
struct cbt_image *ops_find_layer(struct cbt_image *top, const char *path,
                                 int *depth, struct cbt_error **errp);

/*
 * Copy [off, off+len) of from's guest view into `to` with
 * BLK_WRITE_NO_DIRTY (the data moves between layers, the guest view does
 * not change), through buf of bufsize bytes.  0 or -errno.
 */
int ops_copy_range(struct cbt_image *from, struct cbt_image *to, uint64_t off,
                   uint64_t len, void *buf, size_t bufsize);

/* True when len bytes of buf are all zero. */
bool ops_is_zero(const void *buf, size_t len);

/* Has the caller of a long operation asked it to stop (cbt_cancel_fn)? */
static inline bool ops_cancelled(cbt_cancel_fn *fn, void *opaque)
{
    return fn && fn(opaque);
}
/* The error of a cancelled operation: "WHAT: interrupted; WHAT_LEFT". */
void ops_cancel_error(struct cbt_error **errp, const char *what,
                      const char *left);

/*
 * Before a relink that drops layers from file's chain (stream, safe
 * rebase): keep "what changed since X, seen from the top" for every bitmap
 * X of file.  `stay` is the first layer of file's current chain that stays
 * below file (the new base when it is in the old chain), NULL when every
 * layer leaves.  For each consistent bitmap X of file, the copies of X in
 * the leaving layers directly below file (X's run) are merged into file's
 * X, in memory (the caller commits them after the data is durable and
 * before the relink).  Refused, naming the layer, when the run reaches an
 * inconsistent copy in a leaving layer, or stops at a leaving layer
 * without X while a layer further down holds X (a gap): dropping that
 * layer would make X look whole while it misses changes.  Disabled (sealed)
 * copies are merged like recording ones; file may itself be a sealed
 * layer below the active one.  With apply false, only the refusals are
 * checked (file may be read-only).
 */
int ops_pull_bitmaps(struct cbt_image *file, struct cbt_image *stay,
                     bool apply, struct cbt_error **errp);

struct ckpt_carry;

/*
 * The checkpoints through the same relink (checkpoint_chain.c): before it
 * changes anything, the checkpoints of file's disk whose history is intact
 * when file holds their metadata or its holder is a layer that leaves;
 * *c stays empty (not present) when the holder stays below, whose seals do
 * not change.  Warns about the ones not carried, and when file is sealed
 * history itself.  Then, once file's merged bitmaps are stored, _set puts
 * file's metadata for the chain after the relink in memory, so that the
 * relink's header write stores both at once.  Caller frees *c with
 * ckpt_carry_free.
 */
int ops_pull_checkpoints(struct cbt_image *file, struct cbt_image *stay,
                         struct ckpt_carry *c, struct cbt_error **errp);
int ops_pull_checkpoints_set(struct cbt_image *file,
                             struct cbt_image *new_backing,
                             const struct ckpt_carry *c,
                             struct cbt_error **errp);

#endif
