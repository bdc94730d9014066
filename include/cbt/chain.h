/* Public API for chain-wide views of persistent bitmaps.
 *
 * Threads: these read each layer through cbt/bitmap.h (a list, a copy of
 * the bits), one layer at a time, and change nothing, so they may run
 * concurrently with anything on the chain but cbt_image_close(); a view
 * taken during writes covers every write completed before the call, and
 * perhaps some made during it.  The free/clear functions and the name
 * functions touch only their arguments. */
#ifndef CBT_CHAIN_H
#define CBT_CHAIN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <cbt/bitmap.h>
#include <cbt/error.h>
#include <cbt/image.h>

#ifdef __cplusplus
extern "C" {
#endif

/*
 * A bitmap belongs to one layer, but after external snapshots the changes
 * since a checkpoint are spread over the copies of one bitmap name in
 * several layers (cbt snapshot moves recording to the new overlay and
 * leaves the old top's copy disabled).  These functions look at one name X
 * over a whole chain, opened from its top (a struct cbt_image opened
 * without CBT_OPEN_NO_BACKING; cbt_image_backing() walks down).  Layers
 * are numbered by depth: 0 the top, 1 its backing file, and so on.
 *
 * X is valid over the chain when (libvirt's qemuBlockBitmapChainIsValid,
 * walking from the top; the first violation found is reported):
 *   1. the top layer holds X                        (else NOT_IN_TOP);
 *   2. the layers holding X are contiguous from the top: no layer lacks X
 *      above a layer that holds it                  (else GAP);
 *   3. every copy is consistent                     (else INCONSISTENT)
 *      and persistent                               (else TRANSIENT);
 *   4. the top copy is recording                    (else DISABLED).
 * A disabled copy below the top is accepted as "sealed" (what cbt
 * snapshot leaves behind); with CBT_CHAIN_STRICT libvirt's literal rule
 * applies instead and any copy that is not recording makes X invalid
 * (DISABLED, naming that layer).
 *
 * The dirty set of a valid X, seen from the top, is the union of the copies
 * in the contiguous run of layers from the top that hold X: each copy's
 * dirty extents granule-rounded with its own granularity (as
 * cbt_bitmap_extents reports them), OR-ed byte-wise, clamped to the top's
 * virtual size; a layer smaller than the top contributes within its own
 * size.
 */

#define CBT_CHAIN_STRICT (1u << 0) /* every copy must be recording */

enum cbt_chain_reason {
    CBT_CHAIN_VALID = 0,
    CBT_CHAIN_NOT_IN_TOP,   /* the top lacks X; lower layers hold it */
    CBT_CHAIN_GAP,          /* a layer lacks X between layers holding it */
    CBT_CHAIN_INCONSISTENT, /* a copy was found in_use: contents unknown */
    CBT_CHAIN_TRANSIENT,    /* a copy is not persistent (library-made) */
    CBT_CHAIN_DISABLED,     /* the top copy (strict: any copy) not recording */
};

/* The reason's code as the CLI prints it ("not-in-top", "gap",
 * "inconsistent", "transient", "disabled"); NULL for CBT_CHAIN_VALID. */
const char *cbt_chain_reason_code(enum cbt_chain_reason reason);

/* What one layer holds of X. */
enum cbt_chain_copy {
    CBT_COPY_ABSENT,       /* the layer has no bitmap named X */
    CBT_COPY_RECORDING,
    CBT_COPY_SEALED,       /* disabled, below the top, in the run from the
                            * top, consistent, not strict: accepted */
    CBT_COPY_DISABLED,     /* any other copy that is not recording */
    CBT_COPY_INCONSISTENT, /* found in_use */
};

/* "absent", "recording", "sealed", "disabled", "inconsistent". */
const char *cbt_chain_copy_name(enum cbt_chain_copy copy);

struct cbt_chain_layer {
    int depth;
    char *filename;          /* as cbt_image_filename() of that layer */
    bool present;
    enum cbt_chain_copy state;
    /* When present (as cbt_bitmap_list reports the copy): */
    uint64_t granularity;
    bool recording;
    bool persistent;
    bool inconsistent;
    uint64_t count;          /* dirty bytes of this copy (whole granules) */
};

/* The verdict on one bitmap name over the chain. */
struct cbt_chain_bitmap {
    char *name;
    bool valid;
    enum cbt_chain_reason reason;
    /* The layer the reason is about: NOT_IN_TOP 0; GAP the first layer
     * lacking X; INCONSISTENT, TRANSIENT, DISABLED that copy.  -1 when
     * valid. */
    int reason_depth;
    /* GAP: the first layer below reason_depth holding X again;
     * NOT_IN_TOP: the topmost layer holding X.  Otherwise -1. */
    int other_depth;
    /* One line, without the top's file name: why X is invalid, naming the
     * layer(s), or for a valid X which layers its union covers. */
    char *message;
    uint64_t granularity;    /* of the top copy; 0 when the top lacks X */
    int run;                 /* layers holding X contiguously from the top */
    /* When valid (else 0): the finest granularity in the run, and the
     * union's dirty bytes counted in whole granules of it (for a chain of
     * one layer, that layer's count). */
    uint64_t union_granularity;
    uint64_t count;
    size_t nlayers;
    struct cbt_chain_layer *layers; /* every layer of the chain, by depth */
};

/*
 * The verdict on every bitmap name held by any layer of top's chain: the
 * top's names in directory order, then the names first met in each lower
 * layer, in its order.  flags: CBT_CHAIN_STRICT or 0.  Reads only (the
 * union count of each valid name is computed).  Caller frees the list
 * with cbt_chain_bitmap_free_list.  Returns 0 or -1 with *errp.
 */
int cbt_chain_bitmap_list(struct cbt_image *top, unsigned flags,
                          struct cbt_chain_bitmap **list, size_t *count,
                          struct cbt_error **errp);
void cbt_chain_bitmap_free_list(struct cbt_chain_bitmap *list, size_t count);

/* The verdict on one name, into *out (caller frees its contents with
 * cbt_chain_bitmap_clear).  Returns 0 whether or not X is valid; -1 with
 * *errp (ENOENT) when no layer holds X, or on other failures. */
int cbt_chain_bitmap_get(struct cbt_image *top, const char *name,
                         unsigned flags, struct cbt_chain_bitmap *out,
                         struct cbt_error **errp);
void cbt_chain_bitmap_clear(struct cbt_chain_bitmap *b);

/*
 * Visit the dirty and clean extents of X's union over [0, top's virtual
 * size) in order, adjacent extents alternating, as cbt_bitmap_extents does
 * for one layer (for a chain where only the top holds X, exactly the
 * same extents).  Fails before the first callback, with *errp "TOP:
 * MESSAGE" (EINVAL), when X is invalid over the chain; ENOENT when no layer
 * holds it.  The callback returns 0 to go on or a negative errno to stop:
 * the call then fails with that errno (cbt_error_errno).  0, or -1 with
 * *errp.
 */
int cbt_chain_bitmap_extents(struct cbt_image *top, const char *name,
                             unsigned flags, cbt_extent_fn *fn, void *opaque,
                             struct cbt_error **errp);

/*
 * SHA-256 of X's union laid out as one qcow2 bitmap of the finest
 * granularity G in the run (the union_granularity of the verdict): bit n
 * set when any byte of [n*G, (n+1)*G) is dirty in the union; the same
 * stream as cbt_bitmap_sha256 (which it equals for a chain where only the
 * top holds X).  Fails as cbt_chain_bitmap_extents.  hex: 65 bytes.
 */
int cbt_chain_bitmap_sha256(struct cbt_image *top, const char *name,
                            unsigned flags, char hex[65],
                            struct cbt_error **errp);

#ifdef __cplusplus
}
#endif

#endif
