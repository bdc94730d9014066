/* Public API for operations that span several images.
 *
 * Threads: each operation opens the images it works on itself, so
 * operations on different files may run concurrently from different
 * threads.  Two operations on the same files must not (image locks belong
 * to the process and do not exclude them: cbt/image.h, "Threads"), nor may
 * another thread use a handle it opened on one of those files. */
#ifndef CBT_OPS_H
#define CBT_OPS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <cbt/error.h>
#include <cbt/image.h>

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
 * inconsistent ones are left alone and reported with a warning.  The
 * checkpoints of top's chain whose history is intact go with them: the
 * overlay gets their metadata, sealing top's copies and those below
 * (cbt/checkpoint.h), and top's metadata marks them sealed, in the same
 * header updates as the bitmaps; unusable ones are not carried (warned).
 *
 * All or nothing: an existing overlay is refused before anything is touched;
 * when a later step fails the overlay file is removed and top's bitmaps are
 * as before.  Returns 0, or -1 with *errp naming the file and the problem.
 */
struct cbt_snapshot_opts {
    size_t struct_size;            /* sizeof(struct cbt_snapshot_opts) */
    const char *top;
    const char *overlay;
    bool copy_bitmaps;
    cbt_warn_fn *warn;              /* this call's warnings (cbt/error.h) */
    void *warn_opaque;
};
#define CBT_SNAPSHOT_OPTS_INIT                                              \
    { .struct_size = sizeof(struct cbt_snapshot_opts) }
int cbt_snapshot(const struct cbt_snapshot_opts *opts,
                 struct cbt_error **errp);

/* Progress of a long operation: `done` of `total` units (bytes) so far.
 * Called from the calling thread or from a thread the operation started
 * (backup, restore and verify report from their writer thread), one call
 * at a time, never after the operation returned; may be NULL.  To stop the
 * operation, see cbt_cancel_fn. */
typedef void cbt_progress_fn(void *opaque, uint64_t done, uint64_t total);

/*
 * Cancellation of a long operation (backup, restore, verify, convert,
 * commit, stream):
 * asked between units of work (a chunk of a few MiB), from any of the
 * operation's threads; true stops it.  The operation then fails with
 * ECANCELED through its normal failure path, so it leaves exactly what a
 * failure leaves (documented with each operation); past its point of no
 * return (backup: the checkpoint exists; restore: OUT is in place; commit:
 * base's bitmaps are stored) it completes instead.  May be NULL.  The cbt
 * command answers it from a flag its SIGINT/SIGTERM/SIGHUP handler sets.
 */
typedef bool cbt_cancel_fn(void *opaque);

/*
 * Commit (qemu-img commit, and libvirt's intermediate block commit).
 *
 * The chain is opened from `active` (NULL: `top`).  `top` and `base` name
 * layers of that chain (matched by file identity, not by spelling); base
 * NULL means top's immediate backing file.  The data of every layer from
 * top down to just above base is written into base (grown to top's size
 * first if smaller).  For each bitmap name held by a layer in top..base,
 * base's bitmap of that name becomes the union over top..base (created in
 * base when absent, with the granularity and recording state of the
 * topmost copy; but in qemu-img's form, where the layers between stay in
 * the chain, only when all of them hold it too, since a copy in base below
 * a layer without it would be a gap); the copying itself adds no bits to
 * base's bitmaps.
 * Then:
 *   - the image directly above top (when active != top) is relinked onto
 *     base (relative name when in the same directory); when base is larger
 *     than top, base's bytes past top's end are zeroed first (the relinked
 *     image read zeroes there);
 *   - when top is the active layer and !drop, top is emptied (qemu-img's
 *     default; qemu-img -b implies -d, the CLI does that).  Only allowed
 *     when base is top's backing file: otherwise the layers between would
 *     show through the emptied top.
 * The disk's checkpoints (the view from active, cbt/checkpoint.h) go with
 * the data: when the layer holding their metadata is committed or is
 * base, base takes over those whose history is intact (a disk of its own
 * when nothing is above top: their bitmaps record; else history the
 * relinked image continues); what a committed layer above that holder
 * allocates where it lacks a checkpoint's bitmap is set in base's copy;
 * a holder that stays in the chain is sealed again.  A checkpoint base
 * cannot hold in qemu-img's form is warned about before anything is
 * written.
 * Refused before anything is written: base not below top, an inconsistent
 * copy or a gap (a layer lacking a name between two layers holding it) in
 * top..base unless skip_broken_bitmaps (then that name is left alone in
 * base, with a warning), a name in base with a different granularity than
 * the topmost copy, no room for the bitmaps (including a raw base, which
 * cannot hold any), emptying when base is not top's backing file or top's
 * format cannot be emptied.
 * A failure part way leaves every image openable, the guest view
 * unchanged, top's data intact (base may hold some of the copied data,
 * which is invisible through top), and base's bitmaps as before -- or as
 * after when only the relink or the emptying failed (they are stored
 * before either).  The one window where a bitmap is neither: a kill
 * between growing a smaller base and storing its resized bitmaps right
 * after leaves base's recording bitmaps in_use (inconsistent).
 */
struct cbt_commit_opts {
    size_t struct_size;            /* sizeof(struct cbt_commit_opts) */
    const char *top;
    const char *base;              /* NULL: top's backing file */
    const char *active;            /* NULL: top is the active layer */
    bool drop;                     /* do not empty top afterwards */
    /* Active commit with a pivot (libvirt's, offline): top is the active
     * layer (no image above it) and base takes its place afterwards, so
     * base's merged bitmaps take the recording state of the topmost copy
     * (a copy sealed by cbt snapshot records again).  Without it, base stays
     * a backing file and its copies keep their state. */
    bool pivot;
    bool skip_broken_bitmaps;
    cbt_progress_fn *progress;
    void *progress_opaque;
    cbt_cancel_fn *cancel;         /* stops the data copy; NULL: never */
    void *cancel_opaque;
    cbt_warn_fn *warn;             /* this call's warnings (cbt/error.h) */
    void *warn_opaque;
};
#define CBT_COMMIT_OPTS_INIT { .struct_size = sizeof(struct cbt_commit_opts) }
int cbt_commit(const struct cbt_commit_opts *opts, struct cbt_error **errp);

/*
 * Stream (block-stream offline): copy into `file` the data it reads from
 * the layers between it and `base` (NULL: all of its backing chain), then
 * relink it onto base (NULL: no backing file).  The guest view is
 * unchanged, and so is "what changed since X, seen from the top" for every
 * bitmap X: the copying dirties nothing, and the copies of X in the layers
 * that leave the chain (the part of X's valid run below file) are merged
 * into file's X before the relink, as libvirt does for block-pull.  A
 * bitmap that is invalid because of a gap or an inconsistent copy in a
 * leaving layer refuses the stream (dropping the layer would hide it).
 * file's checkpoint metadata is sealed again for the new chain, or taken
 * over from a leaving layer holding the disk's, in the relink's header
 * write.
 */
struct cbt_stream_opts {
    size_t struct_size;            /* sizeof(struct cbt_stream_opts) */
    const char *file;
    const char *base;              /* NULL: all of file's backing chain */
    cbt_progress_fn *progress;
    void *progress_opaque;
    /* Stops the data copy: file keeps what was copied (invisible in the
     * guest view, which it already decided) and its backing file, bitmaps
     * and checkpoints as before. */
    cbt_cancel_fn *cancel;
    void *cancel_opaque;
    cbt_warn_fn *warn;             /* this call's warnings (cbt/error.h) */
    void *warn_opaque;
};
#define CBT_STREAM_OPTS_INIT { .struct_size = sizeof(struct cbt_stream_opts) }
int cbt_stream(const struct cbt_stream_opts *opts, struct cbt_error **errp);

/*
 * Rebase (qemu-img rebase).  backing NULL or "": no backing file.  The name
 * is stored as given and, when relative, resolved against file's directory.
 * Safe mode (unsafe false) first copies into file every range it does not
 * allocate whose contents differ between the old and the new backing
 * view, so the guest view is unchanged; unsafe only rewrites the link.
 * Safe mode keeps every bitmap's view from the top as stream does
 * (copies in the old layers that leave the chain are merged into file's),
 * and its checkpoints as stream does; -u changes no bitmap and no
 * checkpoint (their seals tell whether the new chain holds their history).
 */
struct cbt_rebase_opts {
    size_t struct_size;            /* sizeof(struct cbt_rebase_opts) */
    const char *file;
    const char *file_format;       /* NULL: probe */
    const char *backing;
    const char *backing_format;    /* NULL: probe the new backing file */
    bool unsafe;
    cbt_progress_fn *progress;
    void *progress_opaque;
    cbt_warn_fn *warn;             /* this call's warnings (cbt/error.h) */
    void *warn_opaque;
    cbt_cancel_fn *cancel;         /* stops the safe mode's copy (ECANCELED:
                                      the link is unchanged, the file reads
                                      as before); NULL: never */
    void *cancel_opaque;
};
#define CBT_REBASE_OPTS_INIT { .struct_size = sizeof(struct cbt_rebase_opts) }
int cbt_rebase(const struct cbt_rebase_opts *opts, struct cbt_error **errp);

/*
 * Convert (qemu-img convert) of one source chain to a new image.
 * The target is created from `create` (format NULL: qcow2; cluster size,
 * compat, ...; size is always the source's) unless no_create (-n: it must
 * exist and be at least as large, and is opened with format create.format,
 * NULL: probe; nothing past the source's size is touched).  An existing
 * file is overwritten, as qemu-img does; a target that is a layer of the
 * source chain is refused.  Sparse, as qemu-img's default (-S 4k): ranges
 * the source chain does not allocate or that read as zeroes, and 4 KiB
 * blocks of zeroes inside data, are not written as data; a new target
 * without backing file is left unallocated there, otherwise they are
 * written as zeroes (which may unmap).  With create.backing_file (-B; also
 * with no_create) only what the source's top layer allocates is copied
 * (qemu-img's meaning: the target's backing file stands for the source's
 * backing chain); the rest is left to the target's backing file.
 * compress (-c) writes whole clusters compressed (qcow2 targets).  With
 * bitmaps, the target gets, for each bitmap name of the source chain (with
 * a backing file: of the top layer only), the union over the layers
 * holding it, as one persistent bitmap with the granularity and recording
 * state of the topmost copy (qemu-img copies the top layer's only); an
 * inconsistent copy fails the call before anything is created or written
 * unless skip_broken_bitmaps (then that name is not copied, with a
 * warning); so does a no_create target already holding one of the names.
 * On failure a target this call created is removed; a no_create target is
 * left as the copy left it.
 */
struct cbt_convert_opts {
    size_t struct_size;            /* sizeof(struct cbt_convert_opts) */
    const char *src;
    const char *src_format;        /* NULL: probe */
    const char *dst;
    /* NULL: all defaults.  format NULL: qcow2 (no_create: probe); size
     * ignored.  A pointer, so that each struct grows on its own. */
    const struct cbt_create_opts *create;
    bool compress;
    bool no_create;
    bool bitmaps;
    bool skip_broken_bitmaps;
    cbt_progress_fn *progress;
    void *progress_opaque;
    cbt_cancel_fn *cancel;         /* stops the copy; NULL: never */
    void *cancel_opaque;
    cbt_warn_fn *warn;             /* this call's warnings (cbt/error.h) */
    void *warn_opaque;
    /* Write DST's data around the page cache where the file system allows
     * (CBT_OPEN_DIRECT, cbt/image.h; qemu-img convert -t none).  Default:
     * through it, as qemu-img's -t writeback. */
    bool direct;
};
#define CBT_CONVERT_OPTS_INIT                                               \
    { .struct_size = sizeof(struct cbt_convert_opts) }
int cbt_convert(const struct cbt_convert_opts *opts, struct cbt_error **errp);

#ifdef __cplusplus
}
#endif

#endif
