/*
 * Chain-wide views of persistent bitmaps (include/cbt/chain.h): the verdict
 * on a bitmap name over a backing chain and the union of its copies.
 *
 * Everything goes through the public per-layer API: one cbt_bitmap_list()
 * per layer is taken first (a "snapshot" of the names and states), the
 * verdict is computed from it, and the union reads each copy with
 * cbt_bitmap_extents().  Rules, walking from the top, first violation wins:
 *   - the top must hold the name (not-in-top);
 *   - within the run of layers holding it from the top: each copy
 *     consistent (inconsistent), persistent (transient), and recording if
 *     it is the top copy, or any copy under CBT_CHAIN_STRICT (disabled);
 *   - no layer below the run may hold it again (gap).
 * The union of the run: each copy's dirty extents (granule-rounded by
 * cbt_bitmap_extents, clamped to the top's size) collected as sorted
 * ranges and merged one layer at a time.  A run of one layer streams the
 * top's extents straight through, so it is exactly cbt_bitmap_extents.
 */
#include <inttypes.h>
#include <stdio.h>

#include <cbt/bitmap.h>
#include <cbt/chain.h>
#include <cbt/image.h>

#include "../util/ranges.h"
#include "../util/util.h"

/* ---- names ---- */

const char *cbt_chain_reason_code(enum cbt_chain_reason reason)
{
    switch (reason) {
    case CBT_CHAIN_VALID:
        return NULL;
    case CBT_CHAIN_NOT_IN_TOP:
        return "not-in-top";
    case CBT_CHAIN_GAP:
        return "gap";
    case CBT_CHAIN_INCONSISTENT:
        return "inconsistent";
    case CBT_CHAIN_TRANSIENT:
        return "transient";
    case CBT_CHAIN_DISABLED:
        return "disabled";
    }
    return "unknown";
}

const char *cbt_chain_copy_name(enum cbt_chain_copy copy)
{
    switch (copy) {
    case CBT_COPY_ABSENT:
        return "absent";
    case CBT_COPY_RECORDING:
        return "recording";
    case CBT_COPY_SEALED:
        return "sealed";
    case CBT_COPY_DISABLED:
        return "disabled";
    case CBT_COPY_INCONSISTENT:
        return "inconsistent";
    }
    return "unknown";
}

/* ---- the bitmaps of every layer, listed once ---- */

struct layer {
    struct cbt_image *img;
    struct cbt_bitmap_info *bm; /* cbt_bitmap_list's result */
    size_t n;
    size_t *sorted; /* indexes into bm, by name, for lookups */
};

struct chain {
    struct cbt_image *top;
    struct layer *v;
    size_t n;
};

static void chain_free(struct chain *c)
{
    for (size_t i = 0; c->v && i < c->n; i++) {
        cbt_bitmap_info_free_list(c->v[i].bm, c->v[i].n);
        free(c->v[i].sorted);
    }
    free(c->v);
    c->v = NULL;
    c->n = 0;
}

/* qsort_r context: the layer being sorted. */
static int by_name(const void *a, const void *b, void *opaque)
{
    const struct cbt_bitmap_info *bm = opaque;
    return strcmp(bm[*(const size_t *)a].name, bm[*(const size_t *)b].name);
}

static int chain_take(struct cbt_image *top, struct chain *c,
                      struct cbt_error **errp)
{
    *c = (struct chain){.top = top};
    if (!top) {
        cbt_error_set(errp, EINVAL, "no image given");
        return -1;
    }
    size_t n = 0;
    for (struct cbt_image *l = top; l; l = cbt_image_backing(l))
        n++;
    c->v = calloc(n, sizeof(*c->v));
    if (!c->v) {
        cbt_error_set(errp, ENOMEM, "%s: out of memory",
                      cbt_image_filename(top));
        return -1;
    }
    c->n = n;
    struct cbt_image *l = top;
    for (size_t d = 0; d < n; d++, l = cbt_image_backing(l)) {
        struct layer *ly = &c->v[d];
        ly->img = l;
        if (cbt_bitmap_list(l, &ly->bm, &ly->n, errp) < 0)
            goto fail;
        ly->sorted = calloc(ly->n ? ly->n : 1, sizeof(*ly->sorted));
        if (!ly->sorted) {
            cbt_error_set(errp, ENOMEM, "%s: out of memory",
                          cbt_image_filename(l));
            goto fail;
        }
        for (size_t i = 0; i < ly->n; i++)
            ly->sorted[i] = i;
        qsort_r(ly->sorted, ly->n, sizeof(*ly->sorted), by_name, ly->bm);
    }
    return 0;
fail:
    chain_free(c);
    return -1;
}

/* The copy of `name` in layer d, or NULL. */
static const struct cbt_bitmap_info *find(const struct chain *c, size_t d,
                                          const char *name)
{
    const struct layer *ly = &c->v[d];
    size_t lo = 0, hi = ly->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        const struct cbt_bitmap_info *b = &ly->bm[ly->sorted[mid]];
        int cmp = strcmp(name, b->name);
        if (cmp == 0)
            return b;
        if (cmp < 0)
            hi = mid;
        else
            lo = mid + 1;
    }
    return NULL;
}

static const char *layer_name(const struct chain *c, size_t d)
{
    return cbt_image_filename(c->v[d].img);
}

/* ---- the verdict ---- */

void cbt_chain_bitmap_clear(struct cbt_chain_bitmap *b)
{
    if (!b)
        return;
    for (size_t i = 0; b->layers && i < b->nlayers; i++)
        free(b->layers[i].filename);
    free(b->layers);
    free(b->name);
    free(b->message);
    memset(b, 0, sizeof(*b));
}

void cbt_chain_bitmap_free_list(struct cbt_chain_bitmap *list, size_t count)
{
    for (size_t i = 0; list && i < count; i++)
        cbt_chain_bitmap_clear(&list[i]);
    free(list);
}

/* The one-line message of a verdict (without the top's name).  NULL on
 * ENOMEM. */
static char *verdict_message(const struct chain *c,
                             const struct cbt_chain_bitmap *b, bool strict)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    if (!f)
        return NULL;
    int d = b->reason_depth;
    const char *code = cbt_chain_reason_code(b->reason);
    switch (b->reason) {
    case CBT_CHAIN_VALID:
        if (b->run == 1)
            fprintf(f, "bitmap '%s' is valid: only the top layer holds it",
                    b->name);
        else
            fprintf(f, "bitmap '%s' is valid: the union of its copies at "
                    "depths 0 to %d", b->name, b->run - 1);
        break;
    case CBT_CHAIN_NOT_IN_TOP: {
        fprintf(f, "bitmap '%s' is invalid (%s): the top layer lacks it; "
                "held only by", b->name, code);
        const char *sep = " ";
        for (size_t i = 1; i < b->nlayers; i++) {
            if (!b->layers[i].present)
                continue;
            fprintf(f, "%s'%s' (depth %zu)", sep, layer_name(c, i), i);
            sep = ", ";
        }
        break;
    }
    case CBT_CHAIN_GAP:
        fprintf(f, "bitmap '%s' is invalid (%s): layer '%s' (depth %d) lacks "
                "it but '%s' (depth %d) below it holds it", b->name, code,
                layer_name(c, (size_t)d), d,
                layer_name(c, (size_t)b->other_depth), b->other_depth);
        break;
    case CBT_CHAIN_INCONSISTENT:
        fprintf(f, "bitmap '%s' is invalid (%s): the copy in layer '%s' "
                "(depth %d) was found in use, its contents are unknown",
                b->name, code, layer_name(c, (size_t)d), d);
        break;
    case CBT_CHAIN_TRANSIENT:
        fprintf(f, "bitmap '%s' is invalid (%s): the copy in layer '%s' "
                "(depth %d) is not persistent", b->name, code,
                layer_name(c, (size_t)d), d);
        break;
    case CBT_CHAIN_DISABLED:
        if (d == 0)
            fprintf(f, "bitmap '%s' is invalid (%s): the copy in the top "
                    "layer '%s' (depth 0) is not recording, so writes to "
                    "the active layer are no longer tracked", b->name, code,
                    layer_name(c, 0));
        else
            fprintf(f, "bitmap '%s' is invalid (%s): the copy in layer '%s' "
                    "(depth %d) is not recording%s", b->name, code,
                    layer_name(c, (size_t)d), d,
                    strict ? " (strict: every copy must record)" : "");
        break;
    }
    if (fclose(f) != 0) {
        free(buf);
        return NULL;
    }
    return buf;
}

/* Fill *b with the verdict on `name` (everything but the union count).
 * Returns 0, or -1 with *errp (ENOENT when no layer holds it). */
static int judge(const struct chain *c, const char *name, unsigned flags,
                 struct cbt_chain_bitmap *b, struct cbt_error **errp)
{
    const char *top = cbt_image_filename(c->top);
    bool strict = flags & CBT_CHAIN_STRICT;
    memset(b, 0, sizeof(*b));
    b->reason_depth = b->other_depth = -1;
    b->name = strdup(name);
    b->layers = calloc(c->n, sizeof(*b->layers));
    if (!b->name || !b->layers)
        goto nomem;
    b->nlayers = c->n;

    bool anywhere = false;
    for (size_t d = 0; d < c->n; d++) {
        struct cbt_chain_layer *l = &b->layers[d];
        const struct cbt_bitmap_info *i = find(c, d, name);
        l->depth = (int)d;
        l->filename = strdup(layer_name(c, d));
        if (!l->filename)
            goto nomem;
        if (!i) {
            l->state = CBT_COPY_ABSENT;
            continue;
        }
        anywhere = true;
        l->present = true;
        l->granularity = i->granularity;
        l->recording = i->recording;
        l->persistent = i->persistent;
        l->inconsistent = i->inconsistent;
        l->count = i->count;
        l->state = i->inconsistent ? CBT_COPY_INCONSISTENT
                   : i->recording  ? CBT_COPY_RECORDING
                                   : CBT_COPY_DISABLED;
    }
    if (!anywhere) {
        cbt_error_set(errp, ENOENT,
                      "%s: Dirty bitmap '%s' not found in any layer of the "
                      "chain", top, name);
        cbt_chain_bitmap_clear(b);
        return -1;
    }

    while ((size_t)b->run < c->n && b->layers[b->run].present)
        b->run++;
    /* Below the top, a disabled copy within the run is sealed (accepted)
     * unless strict. */
    for (int d = 1; d < b->run && !strict; d++)
        if (b->layers[d].state == CBT_COPY_DISABLED)
            b->layers[d].state = CBT_COPY_SEALED;

    b->reason = CBT_CHAIN_VALID;
    if (b->run == 0) {
        b->reason = CBT_CHAIN_NOT_IN_TOP;
        b->reason_depth = 0;
        for (size_t d = 1; d < c->n && b->other_depth < 0; d++)
            if (b->layers[d].present)
                b->other_depth = (int)d;
    }
    for (int d = 0; d < b->run && b->reason == CBT_CHAIN_VALID; d++) {
        const struct cbt_chain_layer *l = &b->layers[d];
        if (l->inconsistent)
            b->reason = CBT_CHAIN_INCONSISTENT;
        else if (!l->persistent)
            b->reason = CBT_CHAIN_TRANSIENT;
        else if (!l->recording && (d == 0 || strict))
            b->reason = CBT_CHAIN_DISABLED;
        if (b->reason != CBT_CHAIN_VALID)
            b->reason_depth = d;
    }
    if (b->reason == CBT_CHAIN_VALID) {
        for (size_t d = (size_t)b->run + 1; d < c->n; d++) {
            if (b->layers[d].present) {
                b->reason = CBT_CHAIN_GAP;
                b->reason_depth = b->run;
                b->other_depth = (int)d;
                break;
            }
        }
    }
    b->valid = b->reason == CBT_CHAIN_VALID;
    if (b->layers[0].present)
        b->granularity = b->layers[0].granularity;
    if (b->valid) {
        b->union_granularity = b->layers[0].granularity;
        for (int d = 1; d < b->run; d++)
            b->union_granularity =
                MIN(b->union_granularity, b->layers[d].granularity);
    }
    b->message = verdict_message(c, b, strict);
    if (!b->message)
        goto nomem;
    return 0;
nomem:
    cbt_error_set(errp, ENOMEM, "%s: out of memory judging bitmap '%s'", top,
                  name);
    cbt_chain_bitmap_clear(b);
    return -1;
}

/* ---- the union ---- */

/* Report a callback that stopped the walk; returns its value. */
static int stopped(struct cbt_error **errp, const char *top, const char *name,
                   int r)
{
    int e = r < 0 ? -r : EINVAL;
    cbt_error_set(errp, e, "%s: listing the extents of bitmap '%s' stopped: %s",
                  top, name, strerror(e));
    return -1;
}

/* Visit the union of name's copies at depths 0..run-1 (run >= 1). */
static int union_walk(const struct chain *c, const char *name, int run,
                      cbt_extent_fn *fn, void *opaque, struct cbt_error **errp)
{
    if (run == 1)
        return cbt_bitmap_extents(c->top, name, fn, opaque, errp);

    const char *top = cbt_image_filename(c->top);
    uint64_t size = cbt_image_size(c->top);
    struct ranges acc = {0};
    int ret = -1;
    for (int d = 0; d < run; d++) {
        struct ranges_collect col = {.limit = size};
        int r = cbt_bitmap_extents(c->v[d].img, name, ranges_collect_dirty,
                                   &col, errp);
        if (r == 0 && ranges_union(&acc, &col.r) < 0) {
            cbt_error_set(errp, ENOMEM, "%s: out of memory merging bitmap "
                          "'%s'", top, name);
            r = -1;
        }
        free(col.r.v);
        if (r < 0)
            goto out;
    }

    uint64_t pos = 0;
    int r = 0;
    for (size_t i = 0; i < acc.n && r == 0; i++) {
        if (acc.v[i].start > pos)
            r = fn(opaque, pos, acc.v[i].start - pos, false);
        if (r == 0)
            r = fn(opaque, acc.v[i].start, acc.v[i].end - acc.v[i].start,
                   true);
        pos = acc.v[i].end;
    }
    if (r == 0 && pos < size)
        r = fn(opaque, pos, size - pos, false);
    ret = r ? stopped(errp, top, name, r) : 0;
out:
    free(acc.v);
    return ret;
}

/* ---- the difference of two bitmaps ---- */

/* The dirty ranges of one bitmap, below limit. */
static int collect(struct cbt_image *img, const char *name, uint64_t limit,
                   struct ranges *out, struct cbt_error **errp)
{
    struct ranges_collect col = {.limit = limit};
    if (cbt_bitmap_extents(img, name, ranges_collect_dirty, &col, errp) < 0) {
        free(col.r.v);
        return -1;
    }
    *out = col.r;
    return 0;
}

/*
 * Both bitmaps' dirty ranges are gathered (each from a copy taken under
 * its image's lock), then one sweep over the disk cuts it where either
 * changes state; runs of one kind are merged before they are reported.
 */
int cbt_bitmap_diff(struct cbt_image *img, const char *name,
                    struct cbt_image *other_img, const char *other_name,
                    cbt_diff_fn *fn, void *opaque, struct cbt_error **errp)
{
    if (!img || !name || !other_name || !fn) {
        cbt_error_set(errp, EINVAL, "bitmap diff: missing argument");
        return -1;
    }
    if (!other_img)
        other_img = img;
    uint64_t size = cbt_image_size(img), osize = cbt_image_size(other_img);
    if (osize != size) {
        cbt_error_set(errp, EINVAL, "Bitmaps are of different sizes (%s "
                      "covers %" PRIu64 " bytes, %s covers %" PRIu64 ") and "
                      "can't be compared", name, size, other_name, osize);
        return -1;
    }
    struct ranges a = {0}, b = {0};
    int r = -1;
    if (collect(img, name, size, &a, errp) < 0 ||
        collect(other_img, other_name, size, &b, errp) < 0)
        goto out;
    size_t i = 0, j = 0;
    uint64_t run_start = 0, run_len = 0;
    enum cbt_diff run_kind = CBT_DIFF_SAME;
    r = 0;
    for (uint64_t pos = 0; pos < size && r == 0;) {
        uint64_t next_a, next_b;
        bool in_a = ranges_state_at(&a, &i, pos, size, &next_a);
        bool in_b = ranges_state_at(&b, &j, pos, size, &next_b);
        uint64_t next = MIN(next_a, next_b);
        enum cbt_diff kind = in_a == in_b ? CBT_DIFF_SAME
                             : in_a       ? CBT_DIFF_ONLY_FIRST
                                          : CBT_DIFF_ONLY_SECOND;
        if (run_len && kind != run_kind) {
            r = fn(opaque, run_start, run_len, run_kind);
            run_len = 0;
        }
        if (!run_len) {
            run_start = pos;
            run_kind = kind;
        }
        run_len += next - pos;
        pos = next;
    }
    if (r == 0 && run_len)
        r = fn(opaque, run_start, run_len, run_kind);
    if (r) {
        int e = r < 0 ? -r : EINVAL;
        cbt_error_set(errp, e, "%s: comparing bitmaps '%s' and '%s' stopped: "
                      "%s", cbt_image_filename(img), name, other_name,
                      strerror(e));
        r = -1;
    }
out:
    free(a.v);
    free(b.v);
    return r;
}

/*
 * The union as the bit stream of one bitmap of granularity g: bit n set
 * when [n*g, (n+1)*g) holds a dirty byte.  Counts the set bits and, when
 * sha is given, hashes the ceil(nbits / 8) bytes (LSB first, tail zero).
 */
struct bits {
    uint64_t g, nbits;
    uint64_t next; /* first bit not yet produced */
    uint64_t set;
    struct sha256_ctx *sha;
    uint8_t cur;   /* the partial byte */
    unsigned used; /* bits in cur */
    uint8_t fill[2][256]; /* whole bytes of clean, dirty bits */
};

static void bits_put(struct bits *s, uint64_t n, bool one)
{
    if (one)
        s->set += n;
    s->next += n;
    if (!s->sha)
        return;
    while (n && s->used) {
        s->cur |= (uint8_t)(one << s->used);
        if (++s->used == 8) {
            sha256_update(s->sha, &s->cur, 1);
            s->cur = 0;
            s->used = 0;
        }
        n--;
    }
    for (uint64_t bytes = n / 8; bytes;) {
        size_t k = (size_t)MIN(bytes, sizeof(s->fill[0]));
        sha256_update(s->sha, s->fill[one], k);
        bytes -= k;
    }
    for (n %= 8; n; n--)
        s->cur |= (uint8_t)(one << s->used++);
}

static int bits_extent(void *opaque, uint64_t start, uint64_t length,
                       bool dirty)
{
    struct bits *s = opaque;
    if (!dirty)
        return 0;
    uint64_t lo = start / s->g;
    uint64_t hi = MIN(DIV_ROUND_UP(start + length, s->g), s->nbits);
    lo = MAX(lo, s->next); /* its first granule may be set already */
    if (hi <= lo)
        return 0;
    bits_put(s, lo - s->next, false);
    bits_put(s, hi - lo, true);
    return 0;
}

/* Count (and optionally hash) the union of a valid verdict. */
static int union_bits(const struct chain *c, const struct cbt_chain_bitmap *b,
                      uint64_t *count, char hex[65], struct cbt_error **errp)
{
    struct sha256_ctx sha;
    uint64_t size = cbt_image_size(c->top);
    struct bits s = {
        .g = b->union_granularity,
        .nbits = DIV_ROUND_UP(size, b->union_granularity),
        .sha = hex ? &sha : NULL,
    };
    memset(s.fill[1], 0xff, sizeof(s.fill[1]));
    if (hex)
        sha256_init(&sha);
    if (union_walk(c, b->name, b->run, bits_extent, &s, errp) < 0)
        return -1;
    bits_put(&s, s.nbits - s.next, false);
    if (hex) {
        if (s.used)
            sha256_update(&sha, &s.cur, 1);
        uint8_t digest[32];
        sha256_final(&sha, digest);
        sha256_hex(digest, hex);
    }
    if (count)
        *count = s.set * s.g;
    return 0;
}

/* ---- the public calls ---- */

static bool valid_name(struct cbt_image *top, const char *name,
                       struct cbt_error **errp)
{
    if (!top) {
        cbt_error_set(errp, EINVAL, "no image given");
        return false;
    }
    if (!name || !*name) {
        cbt_error_set(errp, EINVAL, "%s: Bitmap name cannot be empty",
                      cbt_image_filename(top));
        return false;
    }
    return true;
}

/* The verdict with its union count. */
static int judge_counted(const struct chain *c, const char *name,
                         unsigned flags, struct cbt_chain_bitmap *b,
                         struct cbt_error **errp)
{
    if (judge(c, name, flags, b, errp) < 0)
        return -1;
    if (!b->valid)
        return 0;
    if (b->run == 1) {
        b->count = b->layers[0].count;
        return 0;
    }
    if (union_bits(c, b, &b->count, NULL, errp) < 0) {
        cbt_chain_bitmap_clear(b);
        return -1;
    }
    return 0;
}

int cbt_chain_bitmap_get(struct cbt_image *top, const char *name,
                         unsigned flags, struct cbt_chain_bitmap *out,
                         struct cbt_error **errp)
{
    if (!valid_name(top, name, errp))
        return -1;
    if (!out) {
        cbt_error_set(errp, EINVAL, "%s: no place given for the verdict",
                      cbt_image_filename(top));
        return -1;
    }
    memset(out, 0, sizeof(*out));
    struct chain c;
    if (chain_take(top, &c, errp) < 0)
        return -1;
    int r = judge_counted(&c, name, flags, out, errp);
    chain_free(&c);
    return r;
}

int cbt_chain_bitmap_list(struct cbt_image *top, unsigned flags,
                          struct cbt_chain_bitmap **list, size_t *count,
                          struct cbt_error **errp)
{
    if (!top) {
        cbt_error_set(errp, EINVAL, "no image given");
        return -1;
    }
    if (!list || !count) {
        cbt_error_set(errp, EINVAL, "%s: no place given for the bitmap list",
                      cbt_image_filename(top));
        return -1;
    }
    *list = NULL;
    *count = 0;
    struct chain c;
    if (chain_take(top, &c, errp) < 0)
        return -1;

    size_t total = 0;
    for (size_t d = 0; d < c.n; d++)
        total += c.v[d].n;
    struct cbt_chain_bitmap *v = calloc(total ? total : 1, sizeof(*v));
    size_t n = 0;
    int ret = -1;
    if (!v) {
        cbt_error_set(errp, ENOMEM, "%s: out of memory",
                      cbt_image_filename(top));
        goto out;
    }
    for (size_t d = 0; d < c.n; d++) {
        for (size_t i = 0; i < c.v[d].n; i++) {
            const char *name = c.v[d].bm[i].name;
            bool seen = false;
            for (size_t u = 0; u < d && !seen; u++)
                seen = find(&c, u, name) != NULL;
            if (seen)
                continue;
            if (judge_counted(&c, name, flags, &v[n], errp) < 0)
                goto out;
            n++;
        }
    }
    *list = v;
    *count = n;
    v = NULL;
    ret = 0;
out:
    cbt_chain_bitmap_free_list(v, n);
    chain_free(&c);
    return ret;
}

/* Take the chain and the verdict; an invalid one becomes the error. */
static int valid_verdict(struct cbt_image *top, const char *name,
                         unsigned flags, struct chain *c,
                         struct cbt_chain_bitmap *b, struct cbt_error **errp)
{
    if (!valid_name(top, name, errp))
        return -1;
    if (chain_take(top, c, errp) < 0)
        return -1;
    if (judge(c, name, flags, b, errp) < 0) {
        chain_free(c);
        return -1;
    }
    if (!b->valid) {
        cbt_error_set(errp, EINVAL, "%s: %s", cbt_image_filename(top),
                      b->message);
        cbt_chain_bitmap_clear(b);
        chain_free(c);
        return -1;
    }
    return 0;
}

int cbt_chain_bitmap_extents(struct cbt_image *top, const char *name,
                             unsigned flags, cbt_extent_fn *fn, void *opaque,
                             struct cbt_error **errp)
{
    if (!fn) {
        cbt_error_set(errp, EINVAL, "no extent callback given");
        return -1;
    }
    struct chain c;
    struct cbt_chain_bitmap b;
    if (valid_verdict(top, name, flags, &c, &b, errp) < 0)
        return -1;
    int r = union_walk(&c, name, b.run, fn, opaque, errp);
    cbt_chain_bitmap_clear(&b);
    chain_free(&c);
    return r;
}

int cbt_chain_bitmap_sha256(struct cbt_image *top, const char *name,
                            unsigned flags, char hex[65],
                            struct cbt_error **errp)
{
    if (!hex) {
        cbt_error_set(errp, EINVAL, "no place given for the digest");
        return -1;
    }
    struct chain c;
    struct cbt_chain_bitmap b;
    if (valid_verdict(top, name, flags, &c, &b, errp) < 0)
        return -1;
    int r = union_bits(&c, &b, NULL, hex, errp);
    cbt_chain_bitmap_clear(&b);
    chain_free(&c);
    return r;
}
