/* Public API for persistent dirty bitmaps of an open image. */
#ifndef CBT_PUBLIC_BITMAP_H
#define CBT_PUBLIC_BITMAP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <cbt/error.h>
#include <cbt/image.h>

#ifdef __cplusplus
extern "C" {
#endif

/*
 * Threads: every function here takes the image's lock for what it reads or
 * changes, so it may be called concurrently with the data path, resize
 * and the other functions here on the same image (cbt/image.h,
 * "Threads").  A write is counted in a bitmap before it reaches the
 * image, so a bitmap read at any moment covers every write completed
 * before that moment.  cbt_bitmap_extents and cbt_bitmap_sha256 work on
 * a copy taken at one instant; cbt_bitmap_merge from another image copies
 * the source under that image's lock, then merges under the target's (not
 * one instant for both).  Callbacks run without any lock held.
 *
 * Bitmaps belong to one node (one layer of a chain).  Opening the image
 * checks every bitmap's metadata; a bitmap's bits are read from the image
 * when first needed (counts and hashes stream them without keeping them),
 * so an unreadable cluster of bits is reported by the call that reads it
 * (a write, when it must dirty that bitmap).  Every write, zero-write and
 * discard through the image sets the bits of its recording bitmaps.  Changes made through this
 * API live in memory until cbt_bitmap_commit() stores every persistent
 * bitmap of the image at once (one header update: all or nothing), or until
 * cbt_image_close(), which commits.  cbt_bitmap_rollback() forgets the
 * uncommitted changes.  While an image with persistent bitmaps is open
 * read-write, its recording bitmaps are marked in_use on disk (as QEMU).
 *
 * Names: 1..1023 bytes, unique per image.  Granularity: a power of two from
 * 512 B to 2 GiB; 0 picks the default (cluster size clamped to 4..64 KiB).
 */

struct cbt_bitmap_info {
    char *name;
    uint64_t granularity;   /* bytes per bit */
    bool recording;         /* on disk: the 'auto' flag */
    bool persistent;
    bool in_use;            /* on disk flag as found at open */
    bool auto_flag;         /* on disk 'auto' flag as found at open (what
                             * qemu-img info shows; an inconsistent bitmap
                             * may have it and still not be recording) */
    bool inconsistent;      /* found in_use at open: contents unknown */
    bool busy;
    uint64_t count;         /* dirty bytes (whole granules), 0 if inconsistent */
    uint64_t disk_bytes;    /* bytes its table and data clusters use on disk */
};

/* All bitmaps of the node, in directory order.  Caller frees with
 * cbt_bitmap_info_free_list. */
int cbt_bitmap_list(struct cbt_image *img, struct cbt_bitmap_info **list,
                    size_t *count, struct cbt_error **errp);
void cbt_bitmap_info_free_list(struct cbt_bitmap_info *list, size_t count);

/* qemu-img bitmap's operations (QMP semantics and errors). */
int cbt_bitmap_add(struct cbt_image *img, const char *name,
                   uint64_t granularity, bool disabled,
                   struct cbt_error **errp);
int cbt_bitmap_remove(struct cbt_image *img, const char *name,
                      struct cbt_error **errp);
int cbt_bitmap_clear(struct cbt_image *img, const char *name,
                     struct cbt_error **errp);
int cbt_bitmap_enable(struct cbt_image *img, const char *name,
                      struct cbt_error **errp);
int cbt_bitmap_disable(struct cbt_image *img, const char *name,
                       struct cbt_error **errp);
/* OR bitmap src_name of src_img (may be img itself) into target. */
int cbt_bitmap_merge(struct cbt_image *img, const char *target,
                     struct cbt_image *src_img, const char *src_name,
                     struct cbt_error **errp);
/* The same with flags.  CBT_MERGE_RESIZE: a source on another image whose
 * virtual size differs contributes its dirty bytes within its own size,
 * cut at the target's end (chain operations over layers of different
 * sizes); without it, different sizes are an error, as QEMU's merge.  Granularities may
 * differ in every case (a source granule sets every target granule it
 * overlaps). */
#define CBT_MERGE_RESIZE (1u << 0)
int cbt_bitmap_merge_flags(struct cbt_image *img, const char *target,
                           struct cbt_image *src_img, const char *src_name,
                           unsigned flags, struct cbt_error **errp);
int cbt_bitmap_rename(struct cbt_image *img, const char *name,
                      const char *new_name, struct cbt_error **errp);

/* Visit the dirty and clean extents covering [0, virtual size) in order;
 * adjacent extents alternate.  The callback returns 0 to go on, or a
 * negative errno to stop: the call then fails with that errno
 * (cbt_error_errno).  Granule-rounded, as QEMU's NBD export of
 * qemu:dirty-bitmap:NAME, clamped to the virtual size.  0, or -1 with
 * *errp. */
typedef int cbt_extent_fn(void *opaque, uint64_t start, uint64_t length,
                          bool dirty);
int cbt_bitmap_extents(struct cbt_image *img, const char *name,
                       cbt_extent_fn *fn, void *opaque,
                       struct cbt_error **errp);

/*
 * Compare bitmap `name` of img with bitmap `other_name` of other_img (NULL:
 * img itself): visit extents covering [0, virtual size) in order, each of
 * one kind (adjacent extents differ in kind): dirty in both or in neither
 * (CBT_DIFF_SAME), only in the first, only in the second.  Dirty ranges
 * are granule-rounded as cbt_bitmap_extents reports them; the granularities
 * may differ, the images' virtual sizes may not (EINVAL).  The callback
 * returns 0 to go on, non-zero to stop: the call then fails (-1 and
 * *errp).  Returns 0 or -1 with *errp.  Each bitmap is read at one instant
 * (under its image's lock), the two not at the same one.
 */
enum cbt_diff {
    CBT_DIFF_SAME = 0,
    CBT_DIFF_ONLY_FIRST = 1,
    CBT_DIFF_ONLY_SECOND = 2,
};
typedef int cbt_diff_fn(void *opaque, uint64_t start, uint64_t length,
                        enum cbt_diff kind);
int cbt_bitmap_diff(struct cbt_image *img, const char *name,
                    struct cbt_image *other_img, const char *other_name,
                    cbt_diff_fn *fn, void *opaque, struct cbt_error **errp);

/* Dirty bytes of bitmap `name` (whole granules, as cbt_bitmap_info's
 * count), with the errors of cbt_bitmap_extents (missing, inconsistent).
 * A bitmap not loaded yet is counted from the image, not loaded. */
int cbt_bitmap_count(struct cbt_image *img, const char *name, uint64_t *count,
                     struct cbt_error **errp);

/* SHA-256 of the bitmap's qcow2 bit layout: the ceil(ceil(size/gran)/8)
 * bytes of the LSB-first bit stream, unused tail bits zero.  hex: 65
 * bytes. */
int cbt_bitmap_sha256(struct cbt_image *img, const char *name, char hex[65],
                      struct cbt_error **errp);

/* Store all persistent bitmaps now (atomically), or forget the changes
 * made since the last commit. */
int cbt_bitmap_commit(struct cbt_image *img, struct cbt_error **errp);
int cbt_bitmap_rollback(struct cbt_image *img, struct cbt_error **errp);

#ifdef __cplusplus
}
#endif

#endif
