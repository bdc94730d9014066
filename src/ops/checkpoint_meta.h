/*
 * The checkpoint metadata of a disk as stored in its top layer: a qcow2
 * header extension of cbt's own (type CKPT_EXT_TYPE), layout in
 * docs/checkpoints.md.  Private to libcbt (src/ops/checkpoint*.c) and to
 * the fuzz target of its parser (fuzz/fuzz_checkpoints.c).
 */
#ifndef CBT_CHECKPOINT_META_H
#define CBT_CHECKPOINT_META_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <cbt/checkpoint.h>

/* "cbtc": not one of QEMU's header extension types. */
#define CKPT_EXT_TYPE 0x63627463u
#define CKPT_VERSION 1
#define CKPT_HEADER_SIZE 40   /* fixed part before the records */
#define CKPT_RECORD_FIXED 50  /* fixed part of a record, before its name */
#define CKPT_NAME_MAX 1023
/* Header flag: a history section follows the records.  Readers that do
 * not know it must refuse the metadata (they would trust chains whose
 * history they cannot check), as they refuse every unknown flag. */
#define CKPT_F_HISTORY 1u
#define CKPT_HISTORY_HEADER 8 /* count and reserved, before the seals */
#define CKPT_SEAL_SIZE 56     /* one seal */
#define CKPT_MAX_DEPTH 255    /* a chain has at most 256 layers */

struct ckpt_rec {
    uint64_t order;        /* >= 1, strictly increasing over the records */
    int64_t created_sec;
    uint32_t created_nsec; /* < 10^9 */
    uint64_t parent;       /* order of an earlier record, or 0 */
    uint64_t virtual_size;
    uint64_t granularity;  /* power of two, 512 .. 2 GiB */
    char *name;            /* 1..CKPT_NAME_MAX bytes, no NUL, unique */
};

/*
 * A seal: what one bitmap copy of a checkpoint held when it stopped being
 * the top's (docs/checkpoints.md, "History across snapshots").  depth 0:
 * the copy in the layer holding this metadata, which is history an overlay
 * continues; depth d >= 1: the copy d layers below, which the union of
 * this layer's checkpoint needs as it was.
 */
struct ckpt_seal {
    uint64_t order;        /* the checkpoint's record */
    uint32_t depth;        /* 0..CKPT_MAX_DEPTH */
    uint64_t count;        /* dirty bytes of the copy (whole granules) */
    uint8_t sha256[32];    /* of the copy, as cbt_bitmap_sha256 */
};

struct ckpt_meta {
    uint8_t uuid[16];
    uint64_t next_order;   /* greater than every record's order */
    size_t n;
    struct ckpt_rec *v;    /* oldest first (by order) */
    size_t nseals;
    struct ckpt_seal *seals; /* sorted by (order, depth), each order a
                              * record's; with none the history section
                              * and its flag are left out */
};

/* checkpoint_meta.c */

/*
 * Parse an extension's bytes into *m (zeroed first; free with
 * ckpt_meta_free, also after a failure).  Returns 0, -EINVAL with a one-line
 * reason in why[0..whylen) (without a file name) when the bytes are not
 * valid metadata, or -ENOMEM.  Never reads outside buf[0..len).
 */
int ckpt_meta_parse(const uint8_t *buf, size_t len, struct ckpt_meta *m,
                    char *why, size_t whylen);
/* Serialize a valid *m (as ckpt_meta_parse accepts it) into a malloc'd
 * buffer.  0 or -ENOMEM (-EINVAL for a name that is too long). */
int ckpt_meta_build(const struct ckpt_meta *m, uint8_t **buf, size_t *len);
void ckpt_meta_free(struct ckpt_meta *m);
/* The record of `order` among the first n records of v (sorted by order),
 * or NULL. */
const struct ckpt_rec *ckpt_find_order(const struct ckpt_rec *v, size_t n,
                                       uint64_t order);

/* Index of the record named `name`, or -1. */
ssize_t ckpt_meta_find_name(const struct ckpt_meta *m, const char *name);
/* Drop the seals of checkpoint `order`. */
void ckpt_seals_drop(struct ckpt_meta *m, uint64_t order);
/* Drop record i and its seals; its children get its parent. */
void ckpt_meta_remove(struct ckpt_meta *m, size_t i);
/* Insert a copy of *r (its name copied) where its order sorts.  0 or
 * -ENOMEM. */
int ckpt_meta_insert(struct ckpt_meta *m, const struct ckpt_rec *r);
/* Append a record made now, of order next_order (then incremented), the
 * newest record its parent.  0, -ENOMEM, or -EOVERFLOW when the orders are
 * used up (next_order is UINT64_MAX). */
int ckpt_meta_append(struct ckpt_meta *m, const char *name,
                     uint64_t virtual_size, uint64_t granularity);
/* Insert a seal where it sorts.  0 or -ENOMEM. */
int ckpt_seal_add(struct ckpt_meta *m, const struct ckpt_seal *s);

/* checkpoint_chain.c: checkpoints over a backing chain */

struct cbt_image;
struct cbt_error;

/* One layer's metadata.  raw: the extension's bytes (*present says whether
 * there is one).  load: parsed (empty without one; a corrupt extension is
 * an error naming the layer).  set: the extension in memory, stored with
 * the layer's next bitmap commit; extra is room the header must also have
 * for that commit (the bitmaps extension when the layer has none yet). */
int ckpt_layer_raw(struct cbt_image *l, uint8_t **buf, size_t *len,
                   bool *present, struct cbt_error **errp);
/* Store the metadata of top (opened read-write) with its live journal
 * applied, then remove the journal (checkpoint.c).  A no-op without a
 * journal or on a read-only top. */
int ckpt_fold_journal(struct cbt_image *top, struct cbt_error **errp);
/* The live journal of layer l (journal.h), empty for formats without
 * checkpoints.  ckpt_layer_load applies it to what it loads. */
struct journal;
int ckpt_journal_load(struct cbt_image *l, struct journal *j,
                      struct cbt_error **errp);
int ckpt_layer_load(struct cbt_image *l, struct ckpt_meta *m, bool *present,
                    struct cbt_error **errp);
int ckpt_layer_set(struct cbt_image *l, const struct ckpt_meta *m,
                   size_t extra, struct cbt_error **errp);
/* A layer's extension as it was, to put back in memory after a failure
 * (ckpt_restore: no-op unless saved).  Zero-initialise; free with
 * ckpt_saved_free. */
struct ckpt_saved {
    uint8_t *buf;
    size_t len;
    bool present, taken;
};
int ckpt_save(struct cbt_image *l, struct ckpt_saved *s,
              struct cbt_error **errp);
void ckpt_restore(struct cbt_image *l, const struct ckpt_saved *s);
void ckpt_saved_free(struct ckpt_saved *s);
void ckpt_uuid_str(const uint8_t u[16], char out[37]);
/* A new random disk id (UUID version 4); 0, or -1 with *errp naming what. */
int ckpt_uuid_new(uint8_t uuid[16], const char *what, struct cbt_error **errp);
const struct ckpt_seal *ckpt_find_seal(const struct ckpt_meta *m,
                                       uint64_t order, uint32_t depth);

/* The checkpoints of a disk as its chain holds them: the metadata of the
 * first layer from the disk down that has any (the holder), its seals made
 * relative to the disk. */
struct ckpt_view {
    struct ckpt_meta m;
    bool present;              /* some layer has metadata */
    int depth;                 /* the holder's depth */
    struct cbt_image *holder;
};
int ckpt_view_load(struct cbt_image *disk, struct ckpt_view *v,
                   struct cbt_error **errp);
void ckpt_view_free(struct ckpt_view *v);

/* The health of one record of a view, seen from the disk. */
struct ckpt_verdict {
    int kind;          /* -1: its history is intact; else an enum cbt_drift */
    bool sealed;       /* the disk's own copy is history (a depth-0 seal):
                        * never usable from this layer */
    char *problem;     /* set when kind >= 0 or sealed */
    uint64_t count;    /* usable: the union's dirty bytes */
    uint64_t granularity; /* of the top copy, 0 when absent */
};
int ckpt_judge(struct cbt_image *disk, const struct ckpt_view *v,
               const struct ckpt_rec *r, struct ckpt_verdict *out,
               struct cbt_error **errp);
void ckpt_verdict_clear(struct ckpt_verdict *v);

/*
 * Carrying checkpoints through a chain operation: prepare before it
 * changes anything (the records of the view whose history is intact, with
 * the view's disk id and next order; the others are listed as dropped),
 * then, once the bitmaps are in place, build or set the metadata of the
 * layer that holds them afterwards: the carried records, each sealed along
 * that layer's chain as it will be (rl: a relink the open chain does not
 * show yet, NULL for none).  A carried record whose bitmap that layer
 * cannot hold (no recording copy, or a gap below) is left out, with a
 * warning.  set does nothing when prepare found no metadata.
 */
#define CKPT_AT_HOLDER (1u << 0)   /* prepare: judge from the holder, whose
                                    * own copies may be sealed (the layers
                                    * above it are the operation's) */
#define CKPT_SEALED (1u << 1)      /* build: the layer is history (depth-0
                                    * seals; its copies need not record) */
#define CKPT_KEEP_OTHERS (1u << 2) /* build: keep the layer's own records
                                    * that are not carried */
#define CKPT_QUIET (1u << 3)       /* build: no warnings */
struct ckpt_dropped {
    char *name, *why;
};
struct ckpt_carry {
    bool present;
    struct ckpt_meta m;        /* no seals */
    struct cbt_image *holder;
    int depth;
    bool holder_sealed;        /* the holder's metadata has depth-0 seals:
                                * it is history an overlay continues */
    uint64_t *sealed;          /* orders of the carried records sealed at
                                * the holder (CKPT_AT_HOLDER): they stay
                                * history, never become a disk's */
    size_t nsealed;
    struct ckpt_dropped *dropped;
    size_t ndropped;
};
struct ckpt_relink {
    struct cbt_image *from, *to; /* from's backing is to */
};
int ckpt_carry_prepare(struct cbt_image *from, unsigned flags,
                       struct ckpt_carry *c, struct cbt_error **errp);
/* Warn about the records prepare dropped ("not carried over to WHERE"). */
void ckpt_carry_warn(const struct ckpt_carry *c, const char *where);
int ckpt_carry_build(const struct ckpt_carry *c, struct cbt_image *target,
                     const struct ckpt_relink *rl, unsigned flags,
                     struct ckpt_meta *out, struct cbt_error **errp);
int ckpt_carry_set(const struct ckpt_carry *c, struct cbt_image *target,
                   const struct ckpt_relink *rl, unsigned flags,
                   struct cbt_error **errp);
void ckpt_carry_free(struct ckpt_carry *c);

/* A growing list of reconcile's findings (checkpoint.c, livecp.c). */
struct drift_items {
    struct cbt_drift_item *v;
    size_t n;
};
/* Append one; takes explanation and fix (malloc'd; NULL: out of memory).
 * 0, or -1 when out of memory (everything freed). */
int drift_items_push(struct drift_items *it, enum cbt_drift kind,
                     const char *name, char *explanation, char *fix,
                     bool fixed);

#endif
