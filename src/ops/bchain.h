/*
 * A backup chain opened for reading: the backup asked for, its parents
 * down to the full, their integrity, and the guest view at the backup's
 * point in time with its block hashes.  Shared by cbt verify
 * (src/ops/verify.c, which defines these) and cbt restore
 * (src/ops/restore.c).  Layout of backups: docs/backups.md.
 */
#ifndef CBT_OPS_BCHAIN_H
#define CBT_OPS_BCHAIN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <cbt/image.h>
#include <cbt/ops.h>

#include "hashtree.h"
#include "manifest.h"

/* One backup of the chain. */
struct bchain_link {
    char *image;          /* the backup image's path */
    char *manifest_path;  /* image + ".json" */
    char *hashes_path;    /* the manifest's hash file, beside it */
    struct manifest m;
    struct cbt_image *raw; /* raw chains: this backup's image, open */
};

/* bchain_open's flags. */
enum {
    /* Only what is cheap, for building a new backup on this chain: every
     * manifest (read, parsed, vouched for by its child's digest, the
     * links between them, which rule out loops), every hashes file's
     * length, every image a regular file of the recorded virtual size,
     * qcow2 ones linked to their parent; no hashes file is read, no image
     * checked for consistency, and no view is opened (top and leaves stay
     * empty, bchain_walk is not for such a chain). */
    BCHAIN_CHEAP = 1,
    /* Open the images with CBT_OPEN_FORCE_SHARE (verify -U). */
    BCHAIN_FORCE_SHARE = 2,
};

struct bchain {
    struct bchain_link *v; /* v[0]: the backup asked for; v[n-1]: its full */
    size_t n;
    unsigned flags;
    bool qcow2;            /* every backup is qcow2 (else every one raw) */
    uint64_t size;         /* the guest view's size: v[0]'s virtual size */
    /* Set by the caller before bchain_walk: asked between chunks, true
     * stops the walk (bchain_walk returns 2). */
    cbt_cancel_fn *cancel;
    void *cancel_opaque;
    struct cbt_image *top; /* qcow2: v[0]'s image with its backing chain */
    struct leaf_src leaves;      /* v[0]'s leaves (hashtree.h) */
    /* The first problem found (then the walk stops), or NULL. */
    char *problem;         /* one line, starting with the file at fault */
    char *bad_file;        /* that file */
    bool missing;          /* the problem is a file that does not exist */
    bool bad_range;        /* the problem is a block of the guest view */
    uint64_t bad_offset, bad_length;
};

/*
 * Open the chain of the backup image `backup` and check its integrity
 * before any data is read: every parent present; each parent's manifest
 * the one its child recorded (SHA-256); one disk id; checkpoint orders
 * rising toward the child; the root a full backup, every other backup
 * starting from its parent's checkpoint; one image format; every image
 * opening as its manifest says, of its recorded virtual size, qcow2 images
 * linked to their parent's file and passing a consistency check; each
 * block hashes file intact (SHA-256 and length).
 * Returns 0 when the chain is sound (c ready for bchain_walk), 1 when a
 * problem was found (c->problem and c->bad_file say what and where), -1
 * with *errp when the check could not run (backup missing or not a
 * backup, out of memory).  Release with bchain_close in every case.
 */
int bchain_open(const char *backup, unsigned flags, struct bchain *c,
                struct cbt_error **errp);
void bchain_close(struct bchain *c);
/* How many links from v[0] on make v[0]'s sha256-tree-v2 view: the
 * leading links whose manifest is v2 (a v2 backup on a v1 parent holds
 * its whole tree).  0 when v[0] is v1. */
size_t bchain_tree_links(const struct bchain *c);

/*
 * Called by bchain_walk for each piece of the view, in order, after every
 * block of the piece matched its hash: len bytes at guest offset off,
 * buf NULL when the piece reads as zeroes without having been read.
 * Returns 0, or -1 with *errp to stop the walk.
 */
typedef int bchain_piece_fn(void *opaque, const uint8_t *buf, uint64_t off,
                            size_t len, struct cbt_error **errp);

/*
 * Read the guest view from offset 0 to c->size (ranges the chain holds as
 * zeroes are not read), compute each 64 KiB block's SHA-256 and compare it
 * with the manifest's leaf.  Returns 0 when every block matched, 1 at the
 * first block that does not (c->problem names the guest range and the
 * backup file holding that block; nothing of that block is passed to
 * piece), 2 when c->cancel stopped it (no error set), -1 with *errp on an
 * I/O error or when piece fails.
 * *checked: bytes of the view checked so far (may be NULL).
 */
int bchain_walk(struct bchain *c, bchain_piece_fn *piece, void *opaque,
                cbt_progress_fn *progress, void *progress_opaque,
                uint64_t *checked, struct cbt_error **errp);

#endif
