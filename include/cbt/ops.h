/* Public API for operations that span several images. */
#ifndef CBT_OPS_H
#define CBT_OPS_H

#include <stdbool.h>

#include <cbt/error.h>

#ifdef __cplusplus
extern "C" {
#endif

/*
 * External snapshot: create the qcow2 image `overlay` backed by `top` and
 * move change tracking onto it.
 *
 * The overlay's backing name is top's basename when both files are in the
 * same directory, otherwise top's path made absolute; its backing format is
 * top's format and its size top's size.  With copy_bitmaps, every recording
 * persistent bitmap of top gets an empty, recording, persistent twin of the
 * same name and granularity in the overlay, and then stops recording in top
 * (one commit of top's bitmaps).  Disabled bitmaps are not copied;
 * inconsistent ones are left alone and reported with a warning.
 *
 * All or nothing: an existing overlay is refused before anything is touched;
 * when a later step fails the overlay file is removed and top's bitmaps are
 * as before.  Returns 0, or -1 with *errp naming the file and the problem.
 */
int cbt_snapshot(const char *top, const char *overlay, bool copy_bitmaps,
                 struct cbt_error **errp);

#ifdef __cplusplus
}
#endif

#endif
