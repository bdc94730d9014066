/*
 * cbt_rebase(): change the backing file of an image, as qemu-img rebase
 * (include/cbt/ops.h).
 *
 * Safe mode keeps the guest view: for every range the image does not
 * allocate, the old backing view (the current chain) and the new one are
 * read side by side, compared in 512-byte sectors as qemu-img does, and
 * each run of differing sectors is written into the image from the old
 * view, without dirtying its bitmaps (the guest view does not change).
 * Backing files shorter than the image read as zeroes past their end.
 * When the new backing file is a layer of the old chain, only the ranges
 * allocated above it can differ, and only those are compared.
 *
 * Steps, and what a failure or a kill at each leaves behind:
 *   1. open the image read-only (with its chain in safe mode) and the new
 *      backing file, refuse what cannot work (a format without backing
 *      links, a new backing file whose chain holds the image): nothing
 *      changed;
 *   2. reopen the image read-write and copy: a kill leaves the image with
 *      some data it already showed, linked to the old chain: the same view;
 *   3. flush; merge into each valid bitmap of the image the copies in the
 *      layers of the old chain that leave it (ops_pull_bitmaps), and commit;
 *   4. rewrite the link (the driver flushes and rewrites the header in one
 *      step), with the image's checkpoint metadata for the new chain in
 *      the same header write (ops_pull_checkpoints, as cbt_stream).
 * Unsafe mode (-u) only does step 4: the user vouches for the new chain.
 */
#include <inttypes.h>
#include <stdio.h>

#include <cbt/bitmap.h>
#include <cbt/image.h>
#include <cbt/ops.h>

#include "../block/block.h"
#include "checkpoint_meta.h"
#include "ops_util.h"

#define REBASE_CHUNK (1u * 1024 * 1024)
#define REBASE_SECTOR 512u

struct rebase {
    const struct cbt_rebase_opts *o;
    struct cbt_image *f;      /* the image, its old chain below it */
    struct cbt_image *nb;     /* the new backing chain, or NULL */
    struct cbt_image *prefix; /* the layer of the old chain that is the new
                               * backing file, or NULL */
    uint8_t *old_buf, *new_buf;
};

/* Read [off, off+n) of the view of chain `img` (NULL: no backing), zero
 * past its end. */
static int read_view(struct cbt_image *img, uint8_t *buf, uint64_t off,
                     size_t n)
{
    size_t have = 0;
    if (img && off < img->size) {
        have = (size_t)MIN((uint64_t)n, img->size - off);
        int r = cbt_image_pread(img, buf, have, off);
        if (r < 0)
            return r;
    }
    memset(buf + have, 0, n - have);
    return 0;
}

/* Write into the image every run of sectors of [off, off+n) in which the
 * old and the new view differ, from the old view. */
static int write_differences(struct rebase *rb, uint64_t off, size_t n)
{
    size_t i = 0;
    while (i < n) {
        size_t len = MIN((size_t)REBASE_SECTOR, n - i);
        if (memcmp(rb->old_buf + i, rb->new_buf + i, len) == 0) {
            i += len;
            continue;
        }
        size_t start = i;
        while (i < n) {
            len = MIN((size_t)REBASE_SECTOR, n - i);
            if (memcmp(rb->old_buf + i, rb->new_buf + i, len) == 0)
                break;
            i += len;
        }
        const uint8_t *p = rb->old_buf + start;
        int r;
        if (ops_is_zero(p, i - start))
            r = blk_pwrite_zeroes(rb->f, off + start, i - start, 0,
                                  BLK_WRITE_NO_DIRTY);
        else
            r = blk_pwrite(rb->f, p, i - start, off + start,
                           BLK_WRITE_NO_DIRTY);
        if (r < 0)
            return r;
    }
    return 0;
}

/* Length of the run at off (at most len) that the old chain does not
 * allocate above the prefix layer, or 0 when the run may differ. */
static int same_in_both(struct rebase *rb, uint64_t off, uint64_t len,
                        uint64_t *same)
{
    struct cbt_image *old = rb->f->backing;
    *same = 0;
    if (rb->prefix == old) {
        *same = len; /* the same chain: nothing can differ */
        return 0;
    }
    if (!rb->prefix || off >= old->size)
        return 0;
    struct cbt_extent e;
    int r = cbt_image_block_status_above(old, rb->prefix, off,
                                         MIN(len, old->size - off), &e);
    if (r < 0)
        return r;
    if (!(e.flags & (CBT_BS_PRESENT | CBT_BS_ZERO)))
        *same = e.length;
    return 0;
}

static int copy_differences(struct rebase *rb, struct cbt_error **errp)
{
    const struct cbt_rebase_opts *o = rb->o;
    struct cbt_image *f = rb->f;
    const uint64_t size = f->size;
    uint64_t off = 0;
    int r = 0;
    if (o->progress)
        o->progress(o->progress_opaque, 0, size);
    while (off < size) {
        if (ops_cancelled(o->cancel, o->cancel_opaque)) {
            /* What was copied reads the same through the old link. */
            ops_cancel_error(errp, f->filename, "it keeps its backing file "
                             "and reads as before");
            return -1;
        }
        uint64_t n = MIN(size - off, (uint64_t)REBASE_CHUNK);
        struct cbt_extent e;
        r = cbt_image_block_status_above(f, f->backing, off, n, &e);
        if (r < 0)
            break;
        n = e.length;
        if (!((e.flags & CBT_BS_PRESENT) && e.depth == 0)) {
            uint64_t same;
            r = same_in_both(rb, off, n, &same);
            if (r < 0)
                break;
            if (same) {
                n = same;
            } else {
                r = read_view(f->backing, rb->old_buf, off, (size_t)n);
                if (r == 0)
                    r = read_view(rb->nb, rb->new_buf, off, (size_t)n);
                if (r == 0)
                    r = write_differences(rb, off, (size_t)n);
                if (r < 0)
                    break;
            }
        }
        off += n;
        if (o->progress)
            o->progress(o->progress_opaque, off, size);
    }
    if (r < 0) {
        cbt_error_set(errp, -r, "%s: rebase failed at offset %" PRIu64 ": %s",
                      f->filename, off, strerror(-r));
        return -1;
    }
    return 0;
}

/* Open the new backing file (step 1).  Safe mode needs its chain; unsafe
 * mode only probes its format when none is given, and tolerates a file
 * it cannot open (qemu-img -u allows a backing file that does not exist
 * yet). */
static int open_new_backing(struct rebase *rb, const char *path,
                            struct cbt_error **errp)
{
    const struct cbt_rebase_opts *o = rb->o;
    if (o->backing_format && !blk_find_driver(o->backing_format)) {
        cbt_error_set(errp, EINVAL, "Unknown file format '%s'",
                      o->backing_format);
        return -1;
    }
    struct cbt_error *err = NULL;
    rb->nb = cbt_image_open(path, o->backing_format,
                            o->unsafe ? CBT_OPEN_NO_BACKING : 0, &err);
    if (!rb->nb && o->unsafe) {
        if (!o->backing_format)
            cbt_warn("%s: cannot open the new backing file to probe its "
                     "format (%s); no backing format is stored", o->file,
                     cbt_error_message(err));
        cbt_error_free(err);
        return 0;
    }
    if (!rb->nb) {
        cbt_error_set(errp, cbt_error_errno(err), "Could not open new backing "
                      "file '%s': %s", path, cbt_error_message(err));
        cbt_error_free(err);
        return -1;
    }
    /* The image must not end up below itself (in unsafe mode only the
     * new backing file itself is open to look at). */
    struct cbt_error *ignored = NULL;
    if (ops_find_layer(rb->nb, o->file, NULL, &ignored)) {
        cbt_error_set(errp, ELOOP, "%s: cannot use '%s' as its backing "
                      "file: its backing chain contains '%s' (a loop)",
                      o->file, o->backing, o->file);
        return -1;
    }
    cbt_error_free(ignored);
    ignored = NULL;
    if (!o->unsafe && rb->f->backing) {
        /* Is the new backing file a layer of the old chain, read through
         * the same format? */
        struct cbt_image *p = ops_find_layer(rb->f->backing, path, NULL,
                                             &ignored);
        cbt_error_free(ignored);
        if (p && p->drv == rb->nb->drv)
            rb->prefix = p;
    }
    return 0;
}

int cbt_rebase(const struct cbt_rebase_opts *opts, struct cbt_error **errp)
{
    struct cbt_rebase_opts oc;
    if (OPTS_COPY(&oc, opts, cbt_rebase_opts, errp) < 0)
        return -1;
    const struct cbt_rebase_opts *o = &oc;
    WARN_SCOPE(o->warn, o->warn_opaque);
    if (!o || !o->file || !*o->file) {
        cbt_error_set(errp, EINVAL, "rebase: empty file name");
        return -1;
    }
    const char *backing = o->backing && *o->backing ? o->backing : NULL;
    struct rebase rb = { .o = o };
    struct ckpt_carry carry = { 0 };
    struct ckpt_saved saved = { 0 };
    char *path = NULL;
    int ret = -1;
    rb.f = cbt_image_open(o->file, o->file_format,
                          o->unsafe ? CBT_OPEN_NO_BACKING : 0, errp);
    if (!rb.f)
        return -1;
    if (!rb.f->drv->change_backing) {
        cbt_error_set(errp, ENOTSUP, "%s: format '%s' cannot store a backing "
                      "file", o->file, rb.f->drv->name);
        goto out;
    }
    if (backing) {
        path = path_resolve_relative(o->file, backing);
        if (!path) {
            cbt_error_set(errp, ENOMEM, "%s: out of memory", o->file);
            goto out;
        }
        if (open_new_backing(&rb, path, errp) < 0)
            goto out;
    }
    if ((!o->unsafe && (ops_pull_bitmaps(rb.f, rb.prefix, false, errp) < 0 ||
                        ops_pull_checkpoints(rb.f, rb.prefix, &carry,
                                             errp) < 0)) ||
        blk_reopen_rw(rb.f, errp) < 0)
        goto out;
    if (!o->unsafe) {
        rb.old_buf = malloc(REBASE_CHUNK);
        rb.new_buf = malloc(REBASE_CHUNK);
        if (!rb.old_buf || !rb.new_buf) {
            cbt_error_set(errp, ENOMEM, "%s: out of memory", o->file);
            goto out;
        }
        if (copy_differences(&rb, errp) < 0)
            goto out;
        int r = cbt_image_flush(rb.f);
        if (r < 0) {
            cbt_error_set(errp, -r, "%s: flush failed: %s", o->file,
                          strerror(-r));
            goto out;
        }
        /* Keep the bits of the layers that leave the chain. */
        if (ops_pull_bitmaps(rb.f, rb.prefix, true, errp) < 0 ||
            cbt_bitmap_commit(rb.f, errp) < 0) {
            cbt_bitmap_rollback(rb.f, NULL);
            goto out;
        }
    }
    const char *fmt = NULL;
    if (backing)
        fmt = o->backing_format ? o->backing_format
              : rb.nb ? rb.nb->drv->name : NULL;
    /* The checkpoints for the new chain, in the relink's header write
     * (unsafe mode carries none: the seals show whether the user's new
     * chain holds the same history). */
    if (ckpt_save(rb.f, &saved, errp) < 0 ||
        (!o->unsafe &&
         ops_pull_checkpoints_set(rb.f, rb.nb, &carry, errp) < 0) ||
        blk_set_backing(rb.f, backing, fmt, errp) < 0) {
        ckpt_restore(rb.f, &saved);
        goto out;
    }
    ret = 0;
out:
    if (rb.nb)
        cbt_image_close(rb.nb, NULL);
    if (cbt_image_close(rb.f, ret == 0 ? errp : NULL) < 0)
        ret = -1;
    free(rb.old_buf);
    free(rb.new_buf);
    free(path);
    ckpt_carry_free(&carry);
    ckpt_saved_free(&saved);
    return ret;
}
