/* Growable arrays and sorted byte ranges (ranges.h). */
#include <errno.h>
#include <stdbool.h>
#include <stdlib.h>

#include "ranges.h"
#include "util.h"

int vec_grow(void **v, size_t *cap, size_t need, size_t elem_size)
{
    if (need <= *cap)
        return 0;
    size_t n = *cap ? *cap : 64;
    while (n < need) {
        if (n > SIZE_MAX / 2)
            return -ENOMEM;
        n *= 2;
    }
    if (n > SIZE_MAX / elem_size)
        return -ENOMEM;
    void *p = realloc(*v, n * elem_size);
    if (!p)
        return -ENOMEM;
    *v = p;
    *cap = n;
    return 0;
}

int ranges_push(struct ranges *r, uint64_t start, uint64_t end)
{
    if (r->n && r->v[r->n - 1].end >= start) {
        r->v[r->n - 1].end = MAX(r->v[r->n - 1].end, end);
        return 0;
    }
    return VEC_PUSH(r, ((struct range){start, end}));
}

int ranges_union(struct ranges *acc, const struct ranges *add)
{
    struct ranges out = {0};
    size_t i = 0, j = 0;
    while (i < acc->n || j < add->n) {
        const struct range *x;
        if (j == add->n || (i < acc->n && acc->v[i].start <= add->v[j].start))
            x = &acc->v[i++];
        else
            x = &add->v[j++];
        if (ranges_push(&out, x->start, x->end) < 0) {
            free(out.v);
            return -ENOMEM;
        }
    }
    free(acc->v);
    *acc = out;
    return 0;
}

int ranges_collect_dirty(void *opaque, uint64_t start, uint64_t length,
                         bool dirty)
{
    struct ranges_collect *c = opaque;
    if (!dirty || start >= c->limit)
        return 0;
    return ranges_push(&c->r, start, MIN(start + length, c->limit));
}

bool ranges_state_at(const struct ranges *r, size_t *i, uint64_t pos,
                     uint64_t size, uint64_t *next)
{
    while (*i < r->n && r->v[*i].end <= pos)
        (*i)++;
    if (*i < r->n && r->v[*i].start <= pos) {
        *next = r->v[*i].end;
        return true;
    }
    *next = *i < r->n ? r->v[*i].start : size;
    return false;
}
