/* In-memory dirty bitmap: one bit per granule of a virtual disk, in QEMU's
 * semantics and serializable to qcow2's on-disk bit layout. */
#ifndef CBT_BITMAP_H
#define CBT_BITMAP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/*
 * A bitmap covers `size` bytes of disk with one bit per `granularity` bytes
 * (a power of two from 512 B to 2 GiB); bit n covers bytes [n*G, (n+1)*G),
 * the last bit may cover a partial granule.  Byte ranges round out to whole
 * granules: setting one byte dirties its whole granule.
 *
 * Locking: a bitmap is NOT internally locked.  Callers serialize every call
 * on one bitmap (the block layer holds the image lock); concurrent readers
 * without writers are fine.
 *
 * Errors: constructors return NULL and set errno (EINVAL for a bad size or
 * granularity, ENOMEM); other fallible calls return 0 or -errno.  Nothing
 * prints.  set/reset/deserialize never fail: if memory runs out they err on
 * the dirty side (a few clean granules may read dirty, a dirty granule never
 * reads clean), which only costs extra copying in an incremental backup.
 */
struct bm_bitmap;

/* Limits, for callers that want to validate before calling bm_new. */
#define BM_MIN_GRANULARITY ((uint64_t)512)
#define BM_MAX_GRANULARITY ((uint64_t)1 << 31)
#define BM_MAX_BITS ((uint64_t)1 << 41) /* as QEMU's HBitmap */
#define BM_MAX_SIZE ((uint64_t)INT64_MAX)

/* New all-clean bitmap.  size may be 0 and need not be a multiple of the
 * granularity.  NULL with errno EINVAL (granularity not a power of two in
 * [512, 2^31], size > INT64_MAX, or more than BM_MAX_BITS bits) or ENOMEM.
 * Caller frees with bm_free. */
struct bm_bitmap *bm_new(uint64_t size, uint64_t granularity);
void bm_free(struct bm_bitmap *bm); /* NULL is fine */
/* Independent copy (it shares pages with bm until either changes them, so
 * it costs the page table, not the bits); NULL with errno ENOMEM.  Caller
 * frees. */
struct bm_bitmap *bm_copy(const struct bm_bitmap *bm);

uint64_t bm_size(const struct bm_bitmap *bm); /* bytes of disk covered */
uint64_t bm_granularity(const struct bm_bitmap *bm);
unsigned bm_granularity_bits(const struct bm_bitmap *bm);
uint64_t bm_nbits(const struct bm_bitmap *bm); /* ceil(size / granularity) */
/* Heap bytes held by the bitmap (leaf pages, page table, summaries). */
size_t bm_mem_usage(const struct bm_bitmap *bm);

/* Dirty / clean every granule that [off, off+len) overlaps.  The range is
 * clamped to the size; len 0 or off >= size does nothing. */
void bm_set(struct bm_bitmap *bm, uint64_t off, uint64_t len);
void bm_reset(struct bm_bitmap *bm, uint64_t off, uint64_t len);
/* Is the granule holding byte off dirty?  false for off >= size. */
bool bm_get(const struct bm_bitmap *bm, uint64_t off);
/* Dirty bytes counted in whole granules (set bits << granularity bits),
 * as QEMU's `count`; O(1). */
uint64_t bm_count(const struct bm_bitmap *bm);
void bm_clear(struct bm_bitmap *bm);

/* Offset of the first dirty byte in [off, MIN(end, size)): off itself when
 * its granule is dirty, else the start of the first dirty granule; -1 if
 * none. */
int64_t bm_next_dirty(const struct bm_bitmap *bm, uint64_t off, uint64_t end);
/* Same for the first clean byte. */
int64_t bm_next_clean(const struct bm_bitmap *bm, uint64_t off, uint64_t end);
/* Next dirty area starting at or after *off and before end: on true, *off =
 * start (>= the input *off), *len = length up to the first clean granule,
 * clamped to end and size.  Iterate with `off += len`. */
bool bm_next_dirty_area(const struct bm_bitmap *bm, uint64_t *off, uint64_t end,
                        uint64_t *len);

/* dst |= src.  A source granule dirties every dst granule it overlaps, so
 * granularities may differ.  -EINVAL if the sizes in bytes differ. */
int bm_merge(struct bm_bitmap *dst, const struct bm_bitmap *src);
/* Change the covered size.  Shrinking resets the bits past the new end (a
 * partial last granule keeps its bit); growing adds clean bits.  0, -EINVAL
 * (new size beyond the limits of bm_new) or -ENOMEM (bitmap unchanged). */
int bm_resize(struct bm_bitmap *bm, uint64_t new_size);

/*
 * Serialization in qcow2's layout, one chunk (a data cluster) at a time.
 * The stream holds bit n in byte n/8 at bit n%8 (LSB first); chunk i is
 * stream bytes [i*chunk_bytes, (i+1)*chunk_bytes).  chunk_bytes must be a
 * power of two in [512, 2^31] (asserted: it comes from a validated cluster
 * size).  Chunks at or past bm_chunk_count() are all clean, serialize as
 * zeroes and deserialize as no-ops.
 */
uint64_t bm_chunk_count(const struct bm_bitmap *bm, uint64_t chunk_bytes);
/* True if the chunk has no dirty bit (the writer leaves it unallocated).
 * Cost is proportional to the dirty pages, not the chunk length. */
bool bm_chunk_is_clean(const struct bm_bitmap *bm, uint64_t chunk,
                       uint64_t chunk_bytes);
/* Write chunk_bytes bytes of the stream to buf; bits past nbits are 0. */
void bm_serialize_chunk(const struct bm_bitmap *bm, uint64_t chunk,
                        uint64_t chunk_bytes, uint8_t *buf);
/* Overwrite the chunk's bits from chunk_bytes bytes of buf; stream bits
 * past nbits are ignored. */
void bm_deserialize_chunk(struct bm_bitmap *bm, uint64_t chunk,
                          uint64_t chunk_bytes, const uint8_t *buf);
/* Overwrite the chunk's bits with all zeroes or all ones (a table entry
 * with offset 0 and flag bit 0 clear/set); never sets bits past nbits. */
void bm_deserialize_fill(struct bm_bitmap *bm, uint64_t chunk,
                         uint64_t chunk_bytes, bool ones);

#endif
