/*
 * cbt_snapshot(): an external snapshot that moves change tracking from the
 * top of a chain to a new overlay (include/cbt/ops.h).
 *
 * Steps, and what a failure at each leaves behind:
 *   1. refuse an existing overlay (nothing touched);
 *   2. open top read-write (without its backing chain) and list its
 *      bitmaps: nothing changed yet;
 *   3. reserve the overlay name with O_CREAT|O_EXCL, create the qcow2
 *      overlay, add its bitmaps and its checkpoint metadata (the checkpoints
 *      of top's chain whose history is intact, each with a seal of every
 *      copy below the overlay: checkpoint_chain.c) and commit them in one
 *      header update: on failure the overlay file is removed, top was not
 *      changed;
 *   4. disable top's copied bitmaps, mark its carried checkpoints sealed
 *      (a seal of depth 0: top is history now) and commit both (one header
 *      update), then flush.  On failure they are made to record again
 *      (rolled back in memory, re-enabled and committed again with the old
 *      metadata in case the change reached the file) and the overlay is
 *      removed; if that undo fails too, top's copies have stopped
 *      recording for good, so the overlay (whose copies record) is kept
 *      and the call succeeds with a warning: changes stay tracked either
 *      way.
 */
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <sys/stat.h>

#include <cbt/bitmap.h>
#include <cbt/checkpoint.h>
#include <cbt/image.h>
#include <cbt/ops.h>

#include "../util/util.h"
#include "checkpoint_meta.h"
#include "ops_util.h"

/* Names of the bitmaps of top to copy (recording, persistent, consistent);
 * warns about the inconsistent ones. */
static int pick_bitmaps(struct cbt_image *img, const char *top,
                        struct cbt_bitmap_info **list, size_t *count,
                        size_t **pick, size_t *npick, struct cbt_error **errp)
{
    if (cbt_bitmap_list(img, list, count, errp) < 0)
        return -1;
    *pick = calloc(*count ? *count : 1, sizeof(**pick));
    if (!*pick) {
        cbt_error_set(errp, ENOMEM, "%s: out of memory", top);
        return -1;
    }
    *npick = 0;
    for (size_t i = 0; i < *count; i++) {
        const struct cbt_bitmap_info *b = &(*list)[i];
        if (b->inconsistent) {
            cbt_warn("%s: bitmap '%s' is inconsistent; it is not copied to "
                     "the overlay and is left as it is",
                     top, b->name);
            continue;
        }
        if (b->recording && b->persistent)
            (*pick)[(*npick)++] = i;
    }
    return 0;
}

/* Create the overlay file (already reserved), its bitmaps and the
 * checkpoints it carries on. */
static int make_overlay(struct cbt_image *top_img, const char *top,
                        const char *overlay, bool copy_bitmaps,
                        const struct cbt_bitmap_info *list,
                        const size_t *pick, size_t npick,
                        const struct ckpt_carry *carry,
                        struct cbt_error **errp)
{
    char *bname = ops_backing_name(top, overlay);
    if (!bname) {
        cbt_error_set(errp, errno ? errno : ENOMEM,
                      "%s: cannot make the backing file name absolute: %s",
                      top, strerror(errno ? errno : ENOMEM));
        return -1;
    }
    struct cbt_create_opts o = {
        .struct_size = sizeof(struct cbt_create_opts),
        .format = "qcow2",
        .size = cbt_image_size(top_img),
        .size_given = true,
        .backing_file = bname,
        .backing_format = cbt_image_format(top_img),
    };
    int ret = cbt_image_create(overlay, &o, errp);
    free(bname);
    if (ret < 0 || !copy_bitmaps)
        return ret;

    struct cbt_image *ov =
        cbt_image_open(overlay, "qcow2", CBT_OPEN_RDWR | CBT_OPEN_NO_BACKING,
                       errp);
    if (!ov)
        return -1;
    ret = 0;
    for (size_t i = 0; i < npick && ret == 0; i++) {
        const struct cbt_bitmap_info *b = &list[pick[i]];
        ret = cbt_bitmap_add(ov, b->name, b->granularity, false, errp);
    }
    /* The checkpoints follow the top: their metadata, sealing the copies
     * below (top's first), lands in the same header update as the
     * overlay's bitmaps. */
    struct ckpt_relink rl = { ov, top_img };
    if (ret == 0)
        ret = ckpt_carry_set(carry, ov, &rl, 0, errp);
    if (ret == 0)
        ret = cbt_bitmap_commit(ov, errp);
    if (ret < 0)
        cbt_bitmap_rollback(ov, NULL);
    if (cbt_image_close(ov, ret == 0 ? errp : NULL) < 0)
        ret = -1;
    return ret;
}

/* True when every picked bitmap of img records (as its committed state). */
static bool all_recording(struct cbt_image *img,
                          const struct cbt_bitmap_info *list,
                          const size_t *pick, size_t npick)
{
    struct cbt_bitmap_info *now = NULL;
    size_t n = 0;
    if (cbt_bitmap_list(img, &now, &n, NULL) < 0)
        return false;
    size_t found = 0;
    for (size_t i = 0; i < npick; i++)
        for (size_t j = 0; j < n; j++)
            if (strcmp(now[j].name, list[pick[i]].name) == 0 &&
                now[j].recording)
                found++;
    cbt_bitmap_info_free_list(now, n);
    return found == npick;
}

/*
 * Stop top's copied bitmaps recording, stored and flushed.  Returns 0, or
 * -1 when top is back as before (its bitmaps record: the caller removes
 * the overlay), or 1 when the change reached top and could not be undone
 * (the overlay must stay: it is the only layer that records).
 */
static int disable_top(struct cbt_image *img, const char *top,
                       const struct cbt_bitmap_info *list, const size_t *pick,
                       size_t npick, const struct ckpt_carry *carry,
                       struct cbt_error **errp)
{
    struct ckpt_saved old = { 0 };
    int ret = ckpt_save(img, &old, errp);
    for (size_t i = 0; i < npick && ret == 0; i++)
        ret = cbt_bitmap_disable(img, list[pick[i]].name, errp);
    /* Top's checkpoints are history now: sealed in its own metadata. */
    if (ret == 0)
        ret = ckpt_carry_set(carry, img, NULL,
                             CKPT_SEALED | CKPT_KEEP_OTHERS | CKPT_QUIET,
                             errp);
    if (ret == 0)
        ret = cbt_bitmap_commit(img, errp);
    if (ret == 0) {
        int r = cbt_image_flush(img);
        if (r < 0) {
            cbt_error_set(errp, -r, "%s: cannot flush the bitmap changes: %s",
                          top, strerror(-r));
            ret = -1;
        }
    }
    if (ret == 0) {
        ckpt_saved_free(&old);
        return 0;
    }
    /* Undo: forget what did not land, and make them record again in case
     * the change reached the file (a failed sync after the header write). */
    cbt_bitmap_rollback(img, NULL);
    ckpt_restore(img, &old);
    ckpt_saved_free(&old);
    for (size_t i = 0; i < npick; i++)
        cbt_bitmap_enable(img, list[pick[i]].name, NULL);
    if (cbt_bitmap_commit(img, NULL) < 0)
        cbt_bitmap_rollback(img, NULL);
    else
        (void)cbt_image_flush(img);
    return all_recording(img, list, pick, npick) ? -1 : 1;
}

int cbt_snapshot(const struct cbt_snapshot_opts *opts,
                 struct cbt_error **errp)
{
    struct cbt_snapshot_opts o;
    if (OPTS_COPY(&o, opts, cbt_snapshot_opts, errp) < 0)
        return -1;
    WARN_SCOPE(o.warn, o.warn_opaque);
    const char *top = o.top, *overlay = o.overlay;
    bool copy_bitmaps = o.copy_bitmaps;
    if (!top || !*top || !overlay || !*overlay) {
        cbt_error_set(errp, EINVAL, "snapshot: empty file name");
        return -1;
    }
    struct stat st;
    if (lstat(overlay, &st) == 0) {
        cbt_error_set(errp, EEXIST, "%s: file exists; refusing to overwrite "
                      "it with the overlay", overlay);
        return -1;
    }
    if (errno != ENOENT) {
        cbt_error_set(errp, errno, "%s: %s", overlay, strerror(errno));
        return -1;
    }

    /* With its chain: the checkpoints are judged and sealed over it. */
    unsigned flags = copy_bitmaps ? CBT_OPEN_RDWR : CBT_OPEN_NO_BACKING;
    struct cbt_image *img = cbt_image_open(top, NULL, flags, errp);
    if (!img)
        return -1;

    struct cbt_bitmap_info *list = NULL;
    size_t count = 0, npick = 0, *pick = NULL;
    struct ckpt_carry carry = { 0 };
    bool created = false, switched = false;
    int ret = -1;
    if (copy_bitmaps &&
        (pick_bitmaps(img, top, &list, &count, &pick, &npick, errp) < 0 ||
         ckpt_carry_prepare(img, 0, &carry, errp) < 0))
        goto out;

    /* Reserve the name: never truncate a file that appeared meanwhile. */
    int fd = open(overlay, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) {
        int e = errno;
        cbt_error_set(errp, e, "%s: %s", overlay,
                      e == EEXIST ? "file exists; refusing to overwrite it "
                                    "with the overlay" : strerror(e));
        goto out;
    }
    close(fd);
    created = true;

    if (make_overlay(img, top, overlay, copy_bitmaps, list, pick, npick,
                     &carry, errp) < 0)
        goto out;
    ckpt_carry_warn(&carry, overlay);
    if (npick || carry.m.n) {
        struct cbt_error *derr = NULL;
        int d = disable_top(img, top, list, pick, npick, &carry, &derr);
        if (d < 0) {
            if (errp)
                *errp = derr;
            else
                cbt_error_free(derr);
            goto out;
        }
        if (d > 0) {
            /* Top's copies stopped recording and could not be restarted:
             * keeping the overlay keeps the changes tracked. */
            cbt_warn("%s: %s; the snapshot is kept, since the overlay's "
                     "bitmaps now track the changes", top,
                     cbt_error_message(derr));
            cbt_error_free(derr);
        }
    }
    /* From here on top's copies may have stopped recording: the overlay
     * must stay whatever happens (a failed close is reported, not undone). */
    switched = true;
    ret = 0;
out:
    if (cbt_image_close(img, ret == 0 ? errp : NULL) < 0)
        ret = -1;
    if (ret < 0 && created && !switched)
        unlink(overlay);
    cbt_bitmap_info_free_list(list, count);
    free(pick);
    ckpt_carry_free(&carry);
    return ret;
}
