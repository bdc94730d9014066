/*
 * A three-stage pipeline for the jobs that read, hash and write block by
 * block (backup, restore, verify): the calling thread fills chunks (block
 * status and reads), a pool of worker threads hashes their segments, and
 * one drain thread consumes the chunks strictly in order (writes).  Up to
 * BP_SLOTS chunks are in flight, so reading, hashing and writing overlap
 * and hashing uses every CPU.  Threads are started once per run, not per
 * chunk.
 *
 * A chunk is a list of segments: guest ranges, each either read into the
 * chunk's buffer (data != NULL) or not read at all (data == NULL, e.g.
 * ranges block status calls zero).  Segments need not be adjacent (an
 * incremental backup gathers scattered dirty blocks into one chunk).
 *
 * Stopping: any callback returning non-zero stops the run; bp_run returns
 * the first such value after every thread has finished.  The drain
 * callback sees chunk k only after chunk k-1 was drained and every
 * segment of chunk k was hashed, so "the first bad block in order" is
 * found by the drain, never by a worker racing ahead.
 */
#ifndef CBT_OPS_BLOCKPIPE_H
#define CBT_OPS_BLOCKPIPE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Chunks of 32 blocks (2 MiB): against 64 (4 MiB) the first chunk is
 * hashed and written sooner and the buffers, first touched by the reads,
 * fault in half the pages; a 1% live incremental and an offline full
 * backup were no slower and up to 12% faster, restore and verify the
 * same (bench/RESULTS.md, 2026-12-07 18:30). */
#define BP_SEGS 32                     /* segments per chunk */
#define BP_BUF ((size_t)2 << 20)       /* buffer bytes per chunk */
#define BP_SLOTS 4                     /* chunks in flight */
#define BP_READY_STEP ((size_t)512 << 10) /* pages made present at a time */

struct bp_seg {
    uint64_t off, len;   /* guest range */
    uint8_t *data;       /* its bytes in the chunk's buffer, or NULL */
    int kind;            /* the caller's, e.g. set by the hash stage */
    uint64_t bad;        /* the caller's, e.g. a mismatching block + 1 */
    size_t clen;         /* the caller's, e.g. data's length compressed */
    uint8_t digest[32];  /* the caller's, e.g. the block's hash */
};

struct bp_chunk {
    size_t n;                     /* segments in use */
    struct bp_seg seg[BP_SEGS];
    uint8_t *buf;                 /* BP_BUF bytes, 4 KiB aligned */
    size_t used;                  /* buffer bytes handed out (bp_take) */
    size_t ready;                 /* buffer bytes whose pages are in */
    uint64_t seq;                 /* 0, 1, 2, ... in fill order */
};

struct bp_ops {
    /* Calling thread: fill c (n >= 1 segments, reads done).  Returns 1
     * when c was filled, 0 when there is nothing more, or another value
     * (negative) to stop. */
    int (*fill)(void *opaque, struct bp_chunk *c);
    /* Worker threads: process segments [i, j) of c; concurrent calls get
     * disjoint segments (of the same or other chunks).  0, or non-zero to
     * stop. */
    int (*hash)(void *opaque, struct bp_chunk *c, size_t i, size_t j);
    /* Drain thread, chunks in seq order.  0, or non-zero to stop. */
    int (*drain)(void *opaque, struct bp_chunk *c);
    /* Calling thread, before each fill (may be NULL): true stops the run
     * with -ECANCELED, as any stop (above). */
    bool (*cancelled)(void *opaque);
};

/* Room for len more bytes in c's buffer, right after the bytes handed out
 * before: a pointer to them, or NULL when the buffer is full.  The pages
 * under them are made present first, BP_READY_STEP at a time, in one call
 * (MADV_POPULATE_WRITE), not faulted in one by one by the reads that fill
 * them; a small job populates only what it takes. */
uint8_t *bp_take(struct bp_chunk *c, size_t len);

/*
 * Run the pipeline to the end: 0 when fill ran out of chunks and every
 * chunk was drained; else the first non-zero value a callback returned
 * (or -ENOMEM when the buffers could not be allocated).  hash_threads:
 * workers to start (0: one per online CPU, at most 8).
 */
int bp_run(const struct bp_ops *ops, void *opaque, int hash_threads);

#endif
