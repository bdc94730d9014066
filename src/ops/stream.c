/*
 * cbt_stream(): pull into an image the data it reads from the layers
 * between it and a base, then link it directly onto the base (offline
 * block-stream; include/cbt/ops.h).
 *
 * Steps, and what a failure or a kill at each leaves behind:
 *   1. open the chain read-only and find base below file: refusals here
 *      change nothing;
 *   2. reopen file read-write and copy, for every range file does not
 *      allocate whose contents come from a layer above base, file's own
 *      view into file, without dirtying its bitmaps (the guest view does
 *      not change, so it is no change to track).  Zeroes from those layers
 *      are written as zeroes when base exists (its data would show
 *      otherwise); without base they may stay unallocated.  A kill leaves
 *      file with some of the data it already showed: the same guest view.
 *   3. flush file; merge into each valid bitmap X of file the copies of X
 *      in the layers that leave the chain (ops_pull_bitmaps: "what changed
 *      since X, seen from the top" must not lose their bits) and commit
 *      them (one header update; the merged bits are already in the view
 *      through those layers, so a kill here changes no view);
 *   4. rewrite its backing link to base (the driver flushes and rewrites
 *      the header in one step): before it the old chain is valid, after it
 *      the new one is, and both read the same.  The same header write
 *      stores file's checkpoint metadata for the new chain (its seals
 *      counted from base, or the checkpoints of a leaving layer that held
 *      the disk's: ops_pull_checkpoints), judged in step 1, so link and
 *      seals change together.
 * The copying never dirties file's bitmaps.  A bitmap invalid because of a
 * gap or an inconsistent copy in a leaving layer is refused in step 1
 * (dropping the layer would make it look valid).
 */
#include <inttypes.h>
#include <stdio.h>

#include <cbt/bitmap.h>
#include <cbt/image.h>
#include <cbt/ops.h>

#include "../block/block.h"
#include "checkpoint_meta.h"
#include "ops_util.h"

#define STREAM_CHUNK (2u * 1024 * 1024)

static int stream_data(struct cbt_image *f, struct cbt_image *base,
                       const struct cbt_stream_opts *o,
                       struct cbt_error **errp)
{
    cbt_progress_fn *progress = o->progress;
    void *opaque = o->progress_opaque;
    void *buf = malloc(STREAM_CHUNK);
    if (!buf) {
        cbt_error_set(errp, ENOMEM, "%s: out of memory", f->filename);
        return -1;
    }
    const uint64_t size = f->size;
    uint64_t off = 0;
    int r = 0;
    if (progress)
        progress(opaque, 0, size);
    while (off < size) {
        if (ops_cancelled(o->cancel, o->cancel_opaque)) {
            free(buf);
            ops_cancel_error(errp, f->filename, "it keeps its backing file; "
                             "what was copied is what the backing file "
                             "reads there");
            return -1;
        }
        struct cbt_extent e;
        r = cbt_image_block_status_above(f, base, off,
                                         MIN(size - off, STREAM_CHUNK), &e);
        if (r < 0)
            break;
        bool own = (e.flags & CBT_BS_PRESENT) && e.depth == 0;
        if (own) {
            /* file decides these bytes already */
        } else if (e.flags & CBT_BS_ZERO) {
            if (base)
                r = blk_pwrite_zeroes(f, off, e.length, 0,
                                      BLK_WRITE_NO_DIRTY);
        } else if (e.flags & CBT_BS_PRESENT) {
            r = ops_copy_range(f, f, off, e.length, buf, STREAM_CHUNK);
        }
        if (r < 0)
            break;
        off += e.length;
        if (progress)
            progress(opaque, off, size);
    }
    free(buf);
    if (r < 0) {
        cbt_error_set(errp, -r, "%s: streaming failed at offset %" PRIu64
                      ": %s", f->filename, off, strerror(-r));
        return -1;
    }
    return 0;
}

int cbt_stream(const struct cbt_stream_opts *opts, struct cbt_error **errp)
{
    struct cbt_stream_opts o;
    if (OPTS_COPY(&o, opts, cbt_stream_opts, errp) < 0)
        return -1;
    WARN_SCOPE(o.warn, o.warn_opaque);
    const char *file = o.file, *base = o.base;
    if (!file || !*file || (base && !*base)) {
        cbt_error_set(errp, EINVAL, "stream: empty file name");
        return -1;
    }
    struct cbt_image *f = cbt_image_open(file, NULL, 0, errp);
    if (!f)
        return -1;
    int ret = -1;
    char *name = NULL;
    struct cbt_image *b = NULL;
    struct ckpt_carry carry = { 0 };
    struct ckpt_saved saved = { 0 };
    if (base) {
        int depth = 0;
        struct cbt_error *ignored = NULL;
        b = ops_find_layer(f, base, &depth, &ignored);
        cbt_error_free(ignored);
        if (!b || depth == 0) {
            if (!b && access(base, F_OK) < 0)
                cbt_error_set(errp, errno, "%s: %s", base, strerror(errno));
            else
                cbt_error_set(errp, EINVAL, "Did not find '%s' in the "
                              "backing chain of '%s'", base, file);
            goto out;
        }
    }
    if (f->backing == b) {
        ret = 0; /* already linked to base (or to nothing): no-op */
        goto out;
    }
    if (!f->drv->change_backing) {
        cbt_error_set(errp, ENOTSUP, "%s: format '%s' cannot store a backing "
                      "file", file, f->drv->name);
        goto out;
    }
    if (b) {
        name = ops_backing_name(b->filename, file);
        if (!name) {
            int e = errno ? errno : ENOMEM;
            cbt_error_set(errp, e, "%s: cannot name the base in '%s': %s",
                          b->filename, file, strerror(e));
            goto out;
        }
    }
    if (ops_pull_bitmaps(f, b, false, errp) < 0 ||
        ops_pull_checkpoints(f, b, &carry, errp) < 0 ||
        blk_reopen_rw(f, errp) < 0 ||
        stream_data(f, b, &o, errp) < 0)
        goto out;
    int r = cbt_image_flush(f);
    if (r < 0) {
        cbt_error_set(errp, -r, "%s: flush failed: %s", file, strerror(-r));
        goto out;
    }
    /* The leaving layers' bits of each bitmap, before the link drops them. */
    if (ops_pull_bitmaps(f, b, true, errp) < 0 ||
        cbt_bitmap_commit(f, errp) < 0) {
        cbt_bitmap_rollback(f, NULL);
        goto out;
    }
    /* The checkpoints for the new chain, in the relink's header write. */
    if (ckpt_save(f, &saved, errp) < 0 ||
        ops_pull_checkpoints_set(f, b, &carry, errp) < 0 ||
        blk_set_backing(f, name, b ? b->drv->name : NULL, errp) < 0) {
        ckpt_restore(f, &saved);
        goto out;
    }
    ret = 0;
out:
    if (cbt_image_close(f, ret == 0 ? errp : NULL) < 0)
        ret = -1;
    free(name);
    ckpt_carry_free(&carry);
    ckpt_saved_free(&saved);
    return ret;
}
