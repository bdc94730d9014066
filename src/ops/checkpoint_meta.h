/*
 * The checkpoint metadata of a disk as stored in its top layer: a qcow2
 * header extension of cbt's own (type CKPT_EXT_TYPE), layout in
 * docs/checkpoints.md.  Private to libcbt (src/ops/checkpoint*.c) and to
 * the fuzz target of its parser (fuzz/fuzz_checkpoints.c).
 */
#ifndef CBT_CHECKPOINT_META_H
#define CBT_CHECKPOINT_META_H

#include <stddef.h>
#include <stdint.h>

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

#endif
