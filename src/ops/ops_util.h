/* Helpers shared by the chain operations (src/ops). */
#ifndef CBT_OPS_UTIL_H
#define CBT_OPS_UTIL_H

#include <cbt/image.h>

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

#endif
