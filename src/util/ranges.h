/*
 * Growable arrays, and the one array libcbt grows most: sorted, disjoint
 * byte ranges (dirty extents gathered from bitmaps, unions of them).
 */
#ifndef CBT_RANGES_H
#define CBT_RANGES_H

#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/*
 * A growable array is any struct with members `v` (the elements), `n`
 * (used) and `cap` (allocated), zero-initialised when empty:
 *     struct ints { int *v; size_t n, cap; } a = {0};
 *     if (VEC_PUSH(&a, 42) < 0) ... out of memory ...
 *     free(a.v);
 * VEC_PUSH appends one element, doubling the allocation (from 64) when
 * full; 0, or -ENOMEM with the array unchanged.
 */
int vec_grow(void **v, size_t *cap, size_t need, size_t elem_size);
#define VEC_PUSH(a, item)                                                    \
    (vec_grow((void **)&(a)->v, &(a)->cap, (a)->n + 1, sizeof(*(a)->v)) < 0 \
         ? -ENOMEM                                                           \
         : ((a)->v[(a)->n++] = (item), 0))

/* [start, end) */
struct range {
    uint64_t start, end;
};

/* Sorted by start, disjoint and not touching (adjacent ranges merged). */
struct ranges {
    struct range *v;
    size_t n, cap;
};

/* Append [start, end), start not before the last range's start, merging
 * with the last range when they overlap or touch.  0 or -ENOMEM. */
int ranges_push(struct ranges *r, uint64_t start, uint64_t end);
/* *acc = *acc OR *add.  0, or -ENOMEM with *acc unchanged. */
int ranges_union(struct ranges *acc, const struct ranges *add);
/* A cbt_extent_fn gathering the dirty extents below `limit` (clamped)
 * into `r`: pass a struct ranges_collect as the opaque. */
struct ranges_collect {
    struct ranges r;
    uint64_t limit;
};
int ranges_collect_dirty(void *opaque, uint64_t start, uint64_t length,
                         bool dirty);
/* Is pos inside a range of r, and where does that state end (the range's
 * end, or the next range's start, or `size`)?  *i is a cursor that only
 * moves forward as pos does (start it at 0). */
bool ranges_state_at(const struct ranges *r, size_t *i, uint64_t pos,
                      uint64_t size, uint64_t *next);

#endif
