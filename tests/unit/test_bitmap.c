/* Unit test of the dirty bitmap (src/bitmap): random operation sequences
 * checked against a naive one-byte-per-granule model, a sparse 64 TiB
 * case, and edge cases. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <time.h>

#include <cmocka.h>

#include "bitmap/bitmap.h"

#define KiB ((uint64_t)1 << 10)
#define MiB ((uint64_t)1 << 20)
#define GiB ((uint64_t)1 << 30)
#define TiB ((uint64_t)1 << 40)

/* Granules per leaf page in the implementation; used only to aim random
 * offsets at page boundaries, where the tricky cases live. */
#define PAGE_GRANULES ((uint64_t)32768)
/* Largest model, in granules: keeps the whole run well under a minute
 * under ASan+UBSan. */
#define MODEL_MAX_BITS ((uint64_t)100000)

/* ---- deterministic random numbers (xorshift64*) ---- */

static uint64_t rng_state;

static void rng_seed(uint64_t seed)
{
    rng_state = seed * 0x9E3779B97F4A7C15ull + 1;
}

static uint64_t rnd(void)
{
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1Dull;
}

/* Uniform in [0, n); n > 0. */
static uint64_t rnd_below(uint64_t n)
{
    return rnd() % n;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* ---- the naive model: one byte per granule ---- */

struct model {
    uint64_t size;
    unsigned g; /* log2 granularity */
    uint64_t n; /* granules */
    uint8_t *b;
};

static uint64_t nbits_of(uint64_t size, unsigned g)
{
    return size ? ((size - 1) >> g) + 1 : 0;
}

static void model_init(struct model *m, uint64_t size, unsigned g)
{
    m->size = size;
    m->g = g;
    m->n = nbits_of(size, g);
    m->b = calloc(m->n + 1, 1);
    assert_non_null(m->b);
}

static void model_free(struct model *m)
{
    free(m->b);
}

static void model_fill(struct model *m, uint64_t off, uint64_t len, uint8_t v)
{
    if (len == 0 || off >= m->size)
        return;
    uint64_t end = off + len < off || off + len > m->size ? m->size : off + len;
    for (uint64_t i = off >> m->g; i <= (end - 1) >> m->g; i++)
        m->b[i] = v;
}

static bool model_get(const struct model *m, uint64_t off)
{
    return off < m->size && m->b[off >> m->g];
}

static uint64_t model_count(const struct model *m)
{
    uint64_t c = 0;
    for (uint64_t i = 0; i < m->n; i++)
        c += m->b[i];
    return c << m->g;
}

/* First byte in [off, min(end, size)) whose granule has value v, or -1. */
static int64_t model_next(const struct model *m, uint64_t off, uint64_t end,
                          uint8_t v)
{
    if (end > m->size)
        end = m->size;
    if (off >= end)
        return -1;
    for (uint64_t i = off >> m->g; i < m->n && (i << m->g) < end; i++) {
        if (m->b[i] == v)
            return (int64_t)((i << m->g) > off ? (i << m->g) : off);
    }
    return -1;
}

static bool model_next_area(const struct model *m, uint64_t *off, uint64_t end,
                            uint64_t *len)
{
    if (end > m->size)
        end = m->size;
    int64_t s = model_next(m, *off, end, 1);
    if (s < 0)
        return false;
    int64_t c = model_next(m, (uint64_t)s, end, 0);
    *off = (uint64_t)s;
    *len = (c < 0 ? end : (uint64_t)c) - (uint64_t)s;
    return true;
}

/* The naive qcow2 encoder: bit n of the stream is byte n/8, bit n%8. */
static void model_encode(const struct model *m, uint64_t chunk, uint64_t cb,
                         uint8_t *buf)
{
    memset(buf, 0, cb);
    uint64_t b0 = chunk * cb * 8;
    for (uint64_t i = b0; i < m->n && i < b0 + cb * 8; i++) {
        if (m->b[i])
            buf[(i - b0) / 8] |= (uint8_t)(1u << ((i - b0) % 8));
    }
}

/* The naive decoder: overwrite the chunk's bits below n from buf. */
static void model_decode(struct model *m, uint64_t chunk, uint64_t cb,
                         const uint8_t *buf)
{
    uint64_t b0 = chunk * cb * 8;
    for (uint64_t i = b0; i < m->n && i < b0 + cb * 8; i++)
        m->b[i] = (buf[(i - b0) / 8] >> ((i - b0) % 8)) & 1;
}

static void model_resize(struct model *m, uint64_t size)
{
    uint64_t n = nbits_of(size, m->g);
    m->b = realloc(m->b, n + 1);
    assert_non_null(m->b);
    if (n > m->n)
        memset(m->b + m->n, 0, n - m->n);
    m->n = n;
    m->size = size;
}

/* ---- comparing the bitmap with the model ---- */

static void check_same(const struct bm_bitmap *bm, const struct model *m)
{
    assert_int_equal(bm_size(bm), m->size);
    assert_int_equal(bm_nbits(bm), m->n);
    assert_int_equal(bm_count(bm), model_count(m));
    for (uint64_t i = 0; i < m->n; i++) {
        /* any byte inside the granule, including a partial last one */
        uint64_t start = i << m->g;
        uint64_t span = (i + 1 == m->n) ? m->size - start : (1ull << m->g);
        assert_int_equal(bm_get(bm, start + rnd_below(span)), m->b[i]);
    }
    /* Dirty-area iteration, bounded by a random end now and then. */
    uint64_t end = rnd_below(4) ? UINT64_MAX : rnd_below(m->size + 1);
    uint64_t o1 = 0, o2 = 0, l1 = 0, l2 = 0;
    for (;;) {
        bool r1 = bm_next_dirty_area(bm, &o1, end, &l1);
        bool r2 = model_next_area(m, &o2, end, &l2);
        assert_int_equal(r1, r2);
        if (!r1)
            break;
        assert_int_equal(o1, o2);
        assert_int_equal(l1, l2);
        assert_true(l1 > 0);
        o1 += l1;
        o2 += l2;
    }
}

/* Serialize every chunk and compare bytes with the naive encoder; then
 * load the chunks into a fresh bitmap the way the qcow2 reader will (clean
 * chunks skipped, all-ones chunks as fill entries) and compare again. */
static void check_serialization(const struct bm_bitmap *bm,
                                const struct model *m, uint64_t cb)
{
    uint64_t nchunks = bm_chunk_count(bm, cb);
    uint8_t *buf = malloc(cb), *ref = malloc(cb);
    assert_non_null(buf);
    assert_non_null(ref);
    assert_int_equal(nchunks, (m->n + cb * 8 - 1) / (cb * 8));

    struct bm_bitmap *back = bm_new(m->size, 1ull << m->g);
    assert_non_null(back);
    for (uint64_t c = 0; c < nchunks; c++) {
        bm_serialize_chunk(bm, c, cb, buf);
        model_encode(m, c, cb, ref);
        assert_memory_equal(buf, ref, cb);

        bool clean = true, full = true;
        for (uint64_t i = c * cb * 8; i < m->n && i < (c + 1) * cb * 8; i++) {
            clean = clean && !m->b[i];
            full = full && m->b[i];
        }
        assert_int_equal(bm_chunk_is_clean(bm, c, cb), clean);
        if (clean)
            continue;
        if (full && rnd_below(2))
            bm_deserialize_fill(back, c, cb, true);
        else
            bm_deserialize_chunk(back, c, cb, buf);
    }
    /* A chunk past the end is clean and serializes as zeroes. */
    assert_true(bm_chunk_is_clean(bm, nchunks, cb));
    memset(buf, 0xAA, cb);
    bm_serialize_chunk(bm, nchunks, cb, buf);
    for (uint64_t i = 0; i < cb; i++)
        assert_int_equal(buf[i], 0);
    check_same(back, m);
    bm_free(back);
    free(buf);
    free(ref);
}

/* ---- random operation sequences ---- */

static const uint64_t chunk_sizes[] = {512, 1024, 4096, 8192, 65536};

static uint64_t rnd_chunk_bytes(void)
{
    return chunk_sizes[rnd_below(sizeof(chunk_sizes) / sizeof(chunk_sizes[0]))];
}

/* An offset, biased towards granule and leaf-page boundaries and the end. */
static uint64_t rnd_off(const struct model *m)
{
    uint64_t G = 1ull << m->g, span = m->size + G;
    switch (rnd_below(6)) {
    case 0:
        return rnd_below(m->n + 1) << m->g;
    case 1: {
        uint64_t p = rnd_below(m->n / PAGE_GRANULES + 2) * PAGE_GRANULES;
        uint64_t d = rnd_below(5);
        uint64_t b = rnd_below(2) ? p + d : (p > d ? p - d : 0);
        return (b << m->g) + (rnd_below(2) ? rnd_below(G) : 0);
    }
    case 2:
        return m->size > 0
                   ? m->size - 1 - rnd_below(m->size < 2 * G ? m->size : 2 * G)
                   : 0;
    default:
        return rnd_below(span);
    }
}

static uint64_t rnd_len(const struct model *m, uint64_t off)
{
    uint64_t G = 1ull << m->g;
    switch (rnd_below(10)) {
    case 0:
        return 0;
    case 1:
        return UINT64_MAX - rnd_below(3); /* saturates at the size */
    case 2:
        return off < m->size ? m->size - off : 1; /* ends exactly at size */
    case 3: /* overshoots the end by a little */
        return off < m->size ? m->size - off + 1 + rnd_below(3) : 1;
    case 4:
    case 5:
        return 1 + rnd_below(3 * G);
    case 6:
        return 1 + rnd_below(PAGE_GRANULES * G * 2);
    default:
        return 1 + rnd_below(m->size / 4 + 1);
    }
}

/* Fill a stream chunk with one of several patterns, including garbage in
 * the tail bits past nbits. */
static void rnd_chunk_data(uint8_t *buf, uint64_t cb)
{
    switch (rnd_below(5)) {
    case 0:
        memset(buf, 0, cb);
        break;
    case 1:
        memset(buf, 0xff, cb);
        break;
    case 2: /* sparse */
        memset(buf, 0, cb);
        for (int k = 0; k < 5; k++)
            buf[rnd_below(cb)] = (uint8_t)rnd();
        break;
    case 3: /* runs */
        for (uint64_t i = 0; i < cb;) {
            uint64_t run = 1 + rnd_below(cb / 4);
            uint8_t v = rnd_below(2) ? 0xff : 0;
            for (; run && i < cb; run--, i++)
                buf[i] = v;
        }
        break;
    default:
        for (uint64_t i = 0; i < cb; i++)
            buf[i] = (uint8_t)rnd();
        break;
    }
}

/* Random set/reset on a bitmap and its model. */
static void rnd_mutate(struct bm_bitmap *bm, struct model *m, int ops)
{
    for (int k = 0; k < ops; k++) {
        uint64_t off = rnd_off(m), len = rnd_len(m, off);
        bool set = rnd_below(3) != 0;
        if (set)
            bm_set(bm, off, len);
        else
            bm_reset(bm, off, len);
        model_fill(m, off, len, set);
    }
}

/* A granularity g2 for a merge source whose model stays small. */
static unsigned pick_other_granularity(uint64_t size)
{
    unsigned g2 = 9 + (unsigned)rnd_below(23);
    while (nbits_of(size, g2) > 2 * MODEL_MAX_BITS)
        g2++;
    return g2;
}

static void query_once(const struct bm_bitmap *bm, const struct model *m)
{
    uint64_t off = rnd_off(m);
    uint64_t end = rnd_below(3) ? off + rnd_len(m, off) : UINT64_MAX;
    if (end < off)
        end = UINT64_MAX;
    assert_int_equal(bm_get(bm, off), model_get(m, off));
    assert_int_equal(bm_next_dirty(bm, off, end), model_next(m, off, end, 1));
    assert_int_equal(bm_next_clean(bm, off, end), model_next(m, off, end, 0));
    uint64_t o1 = off, o2 = off, l1 = 0, l2 = 0;
    bool r1 = bm_next_dirty_area(bm, &o1, end, &l1);
    bool r2 = model_next_area(m, &o2, end, &l2);
    assert_int_equal(r1, r2);
    if (r1) {
        assert_int_equal(o1, o2);
        assert_int_equal(l1, l2);
    }
    assert_int_equal(bm_count(bm), model_count(m));
}

/* One random run at granularity 2^g over `granules` granules, the size
 * cut short of a whole granule by `rem` bytes. */
static void random_run(unsigned g, uint64_t granules, uint64_t rem, int nops)
{
    uint64_t G = 1ull << g;
    uint64_t size = granules * G - (granules ? rem % G : 0);
    struct model m;
    struct bm_bitmap *bm = bm_new(size, G);
    assert_non_null(bm);
    model_init(&m, size, g);
    check_same(bm, &m);

    for (int op = 0; op < nops; op++) {
        switch (rnd_below(20)) {
        case 0:
        case 1:
        case 2:
        case 3:
        case 4:
        case 5: {
            uint64_t off = rnd_off(&m), len = rnd_len(&m, off);
            bm_set(bm, off, len);
            model_fill(&m, off, len, 1);
            break;
        }
        case 6:
        case 7:
        case 8: {
            uint64_t off = rnd_off(&m), len = rnd_len(&m, off);
            bm_reset(bm, off, len);
            model_fill(&m, off, len, 0);
            break;
        }
        case 9: { /* deserialize one chunk over existing contents */
            uint64_t cb = rnd_chunk_bytes();
            uint64_t nch = bm_chunk_count(bm, cb);
            if (nch == 0)
                break;
            uint8_t *buf = malloc(cb);
            assert_non_null(buf);
            rnd_chunk_data(buf, cb);
            uint64_t c = rnd_below(nch);
            bm_deserialize_chunk(bm, c, cb, buf);
            model_decode(&m, c, cb, buf);
            free(buf);
            break;
        }
        case 10: { /* all-zeroes / all-ones table entries */
            uint64_t cb = rnd_chunk_bytes();
            uint64_t nch = bm_chunk_count(bm, cb);
            if (nch == 0)
                break;
            uint64_t c = rnd_below(nch);
            bool ones = rnd_below(2);
            bm_deserialize_fill(bm, c, cb, ones);
            for (uint64_t i = c * cb * 8; i < m.n && i < (c + 1) * cb * 8; i++)
                m.b[i] = ones;
            break;
        }
        case 11: { /* merge, same granularity */
            struct bm_bitmap *src = bm_new(size, G);
            struct model ms;
            assert_non_null(src);
            model_init(&ms, size, g);
            rnd_mutate(src, &ms, 1 + (int)rnd_below(6));
            assert_int_equal(bm_merge(bm, src), 0);
            for (uint64_t i = 0; i < m.n; i++)
                m.b[i] |= ms.b[i];
            check_same(src, &ms); /* the source is untouched */
            bm_free(src);
            model_free(&ms);
            assert_int_equal(bm_merge(bm, bm), 0); /* self merge: no-op */
            break;
        }
        case 12: { /* merge, other granularity: a source granule dirties
                    * every target granule it overlaps */
            unsigned g2 = pick_other_granularity(size);
            struct bm_bitmap *src = bm_new(size, 1ull << g2);
            struct model ms;
            assert_non_null(src);
            model_init(&ms, size, g2);
            rnd_mutate(src, &ms, 1 + (int)rnd_below(4));
            assert_int_equal(bm_merge(bm, src), 0);
            for (uint64_t i = 0; i < ms.n; i++) {
                if (ms.b[i])
                    model_fill(&m, i << g2, 1ull << g2, 1);
            }
            bm_free(src);
            model_free(&ms);
            /* sizes must match */
            struct bm_bitmap *other = bm_new(size + 1, 1ull << g2);
            assert_non_null(other);
            assert_int_equal(bm_merge(bm, other), -EINVAL);
            assert_int_equal(bm_merge(other, bm), -EINVAL);
            bm_free(other);
            break;
        }
        case 13: { /* resize: grow or shrink, not to whole granules */
            uint64_t ns;
            if (rnd_below(2))
                ns = size ? rnd_below(size + 1) : 0;
            else
                ns = size + rnd_below((MODEL_MAX_BITS - m.n) / 4 * G + 1);
            if (rnd_below(4) == 0 && size > 0)
                ns = size - 1 - rnd_below(size < G ? size : G); /* near end */
            assert_int_equal(bm_resize(bm, ns), 0);
            model_resize(&m, ns);
            size = ns;
            check_same(bm, &m);
            break;
        }
        case 14: { /* copy is independent of its source */
            struct bm_bitmap *c = bm_copy(bm);
            assert_non_null(c);
            check_same(c, &m);
            bm_set(c, 0, UINT64_MAX);
            bm_reset(c, rnd_off(&m), UINT64_MAX);
            assert_int_equal(bm_count(bm), model_count(&m));
            if (rnd_below(2)) { /* carry on with the copy */
                bm_free(bm);
                bm = bm_copy(c);
                assert_non_null(bm);
                bm_free(c);
                bm_clear(bm);
                memset(m.b, 0, m.n);
                rnd_mutate(bm, &m, 3);
            } else {
                bm_free(c);
            }
            break;
        }
        case 15:
            if (rnd_below(8) == 0) {
                bm_clear(bm);
                memset(m.b, 0, m.n);
            }
            break;
        case 16:
            check_serialization(bm, &m, rnd_chunk_bytes());
            break;
        default:
            query_once(bm, &m);
            break;
        }
        if (op % 25 == 24)
            check_same(bm, &m);
    }
    check_same(bm, &m);
    check_serialization(bm, &m, rnd_chunk_bytes());
    bm_free(bm);
    model_free(&m);
}

/* Every granularity 2^9..2^31: a tiny disk, one a few pages long, and one
 * just around a page boundary; sizes rarely whole granules. */
static void test_random_all_granularities(void **state)
{
    (void)state;
    for (unsigned g = 9; g <= 31; g++) {
        uint64_t G = 1ull << g;
        rng_seed(1000 + g);
        random_run(g, 1 + rnd_below(12), rnd_below(G), 150);
        random_run(g, 2000 + rnd_below(4000), rnd_below(G), 250);
        random_run(g, PAGE_GRANULES * (1 + rnd_below(2)) + rnd_below(3) - 1,
                   rnd_below(4) ? rnd_below(G) : 0, 200);
        random_run(g, 60000 + rnd_below(20000), rnd_below(G), 200);
    }
}

/* ---- huge sparse bitmaps against an extent-list model ---- */

/* The byte model cannot hold a 64 TiB disk, and small disks never grow the
 * page summary past one level.  This model keeps the dirty granules as a
 * sorted list of disjoint, non-adjacent [start, end) intervals instead. */
struct xmodel {
    uint64_t size;
    unsigned g;
    uint64_t n;
    uint64_t (*iv)[2];
    size_t cnt, cap;
};

static void xm_push(uint64_t (**out)[2], size_t *cnt, size_t *cap, uint64_t s,
                    uint64_t e)
{
    if (*cnt == *cap) {
        *cap = *cap ? *cap * 2 : 16;
        *out = realloc(*out, *cap * sizeof(**out));
        assert_non_null(*out);
    }
    (*out)[*cnt][0] = s;
    (*out)[*cnt][1] = e;
    (*cnt)++;
}

/* Set or reset granules [a, b). */
static void xm_apply(struct xmodel *m, uint64_t a, uint64_t b, bool set)
{
    uint64_t(*out)[2] = NULL;
    size_t cnt = 0, cap = 0, i = 0;

    if (a >= b)
        return;
    if (set) {
        uint64_t s = a, e = b;
        for (; i < m->cnt && m->iv[i][1] < a; i++)
            xm_push(&out, &cnt, &cap, m->iv[i][0], m->iv[i][1]);
        for (; i < m->cnt && m->iv[i][0] <= b; i++) {
            s = m->iv[i][0] < s ? m->iv[i][0] : s;
            e = m->iv[i][1] > e ? m->iv[i][1] : e;
        }
        xm_push(&out, &cnt, &cap, s, e);
        for (; i < m->cnt; i++)
            xm_push(&out, &cnt, &cap, m->iv[i][0], m->iv[i][1]);
    } else {
        for (; i < m->cnt; i++) {
            uint64_t s = m->iv[i][0], e = m->iv[i][1];
            if (e <= a || s >= b) {
                xm_push(&out, &cnt, &cap, s, e);
                continue;
            }
            if (s < a)
                xm_push(&out, &cnt, &cap, s, a);
            if (e > b)
                xm_push(&out, &cnt, &cap, b, e);
        }
    }
    free(m->iv);
    m->iv = out;
    m->cnt = cnt;
    m->cap = cap;
}

static void xm_fill(struct xmodel *m, uint64_t off, uint64_t len, bool set)
{
    if (len == 0 || off >= m->size)
        return;
    uint64_t end = off + len < off || off + len > m->size ? m->size : off + len;
    xm_apply(m, off >> m->g, ((end - 1) >> m->g) + 1, set);
}

static uint64_t xm_count(const struct xmodel *m)
{
    uint64_t c = 0;
    for (size_t i = 0; i < m->cnt; i++)
        c += m->iv[i][1] - m->iv[i][0];
    return c << m->g;
}

static bool xm_bit(const struct xmodel *m, uint64_t b)
{
    for (size_t i = 0; i < m->cnt; i++) {
        if (b >= m->iv[i][0] && b < m->iv[i][1])
            return true;
    }
    return false;
}

/* Byte offset of the first dirty (or clean) byte in [off, end), or -1. */
static int64_t xm_next(const struct xmodel *m, uint64_t off, uint64_t end,
                       bool dirty)
{
    if (end > m->size)
        end = m->size;
    if (off >= end)
        return -1;
    uint64_t b = off >> m->g, bend = ((end - 1) >> m->g) + 1, r = UINT64_MAX;
    for (size_t i = 0; i < m->cnt; i++) {
        if (dirty && m->iv[i][1] > b) {
            r = m->iv[i][0] > b ? m->iv[i][0] : b;
            break;
        }
        if (!dirty && m->iv[i][0] <= b && m->iv[i][1] > b) {
            b = m->iv[i][1]; /* intervals never touch: this is clean */
            break;
        }
    }
    if (!dirty)
        r = b < m->n ? b : UINT64_MAX;
    if (r == UINT64_MAX || r >= bend)
        return -1;
    return (int64_t)((r << m->g) > off ? (r << m->g) : off);
}

static void xm_check(const struct bm_bitmap *bm, const struct xmodel *m)
{
    assert_int_equal(bm_size(bm), m->size);
    assert_int_equal(bm_count(bm), xm_count(m));
    uint64_t off = 0, len;
    size_t i = 0;
    while (bm_next_dirty_area(bm, &off, UINT64_MAX, &len)) {
        assert_true(i < m->cnt);
        uint64_t s = m->iv[i][0] << m->g, e = m->iv[i][1] << m->g;
        assert_int_equal(off, s);
        assert_int_equal(len, (e < m->size ? e : m->size) - s);
        /* the granules around each edge */
        assert_true(bm_get(bm, s));
        assert_true(bm_get(bm, off + len - 1));
        assert_false(s > 0 && bm_get(bm, s - 1));
        assert_false(bm_get(bm, off + len));
        off += len;
        i++;
    }
    assert_int_equal(i, m->cnt);
}

/* Compare one chunk's serialization with an encoding of the intervals. */
static void xm_check_chunk(const struct bm_bitmap *bm, const struct xmodel *m,
                           uint64_t c, uint64_t cb, uint8_t *buf, uint8_t *ref)
{
    uint64_t c0 = c * cb * 8, c1 = c0 + cb * 8;
    bool clean = true;
    memset(ref, 0, cb);
    for (size_t i = 0; i < m->cnt; i++) {
        uint64_t s = m->iv[i][0] > c0 ? m->iv[i][0] : c0;
        uint64_t e = m->iv[i][1] < c1 ? m->iv[i][1] : c1;
        for (uint64_t b = s; b < e; b++) {
            ref[(b - c0) / 8] |= (uint8_t)(1u << ((b - c0) % 8));
            clean = false;
        }
    }
    assert_int_equal(bm_chunk_is_clean(bm, c, cb), clean);
    bm_serialize_chunk(bm, c, cb, buf);
    assert_memory_equal(buf, ref, cb);
}

/* An offset near one of a few hot spots, so that operations meet on the
 * same and neighbouring pages, or anywhere. */
static uint64_t xm_off(const struct xmodel *m, const uint64_t *hot, int nhot)
{
    uint64_t G = 1ull << m->g;
    if (rnd_below(8) == 0)
        return rnd_below(m->size + G);
    uint64_t h = hot[rnd_below((uint64_t)nhot)];
    uint64_t d = rnd_below(3 * PAGE_GRANULES * G);
    uint64_t o = rnd_below(2) ? h + d : (h > d ? h - d : 0);
    return rnd_below(2) ? o : o & ~(G - 1);
}

static uint64_t xm_len(const struct xmodel *m)
{
    uint64_t G = 1ull << m->g;
    switch (rnd_below(12)) {
    case 0:
        return UINT64_MAX;
    case 1:
        return rnd_below(m->size / 2 + 1); /* huge */
    case 2:
    case 3:
        return rnd_below(3 * PAGE_GRANULES * G);
    default:
        return rnd_below(300 * G);
    }
}

static void xm_run(unsigned g, uint64_t size, int nops)
{
    uint64_t G = 1ull << g, hot[6];
    struct xmodel m = {.size = size, .g = g, .n = nbits_of(size, g)};
    struct bm_bitmap *bm = bm_new(size, G);
    const uint64_t cb = 65536;
    uint8_t *buf = malloc(cb), *ref = malloc(cb);
    assert_non_null(bm);
    assert_non_null(buf);
    assert_non_null(ref);
    for (int i = 0; i < 6; i++)
        hot[i] = i == 0 ? 0 : i == 1 ? size : rnd_below(size);

    for (int op = 0; op < nops; op++) {
        uint64_t off = xm_off(&m, hot, 6), len = xm_len(&m);
        switch (rnd_below(12)) {
        case 0:
        case 1:
        case 2:
        case 3:
        case 4:
            bm_set(bm, off, len);
            xm_fill(&m, off, len, true);
            break;
        case 5:
        case 6:
        case 7:
            bm_reset(bm, off, len);
            xm_fill(&m, off, len, false);
            break;
        case 8: { /* one chunk: compare, then write it back or fill it */
            uint64_t nch = bm_chunk_count(bm, cb);
            uint64_t c = off / (cb * 8 * G);
            if (c >= nch)
                break;
            xm_check_chunk(bm, &m, c, cb, buf, ref);
            if (rnd_below(2)) {
                bool ones = rnd_below(2);
                bm_deserialize_fill(bm, c, cb, ones);
                uint64_t c1 = (c + 1) * cb * 8;
                xm_apply(&m, c * cb * 8, c1 < m.n ? c1 : m.n, ones);
            } else {
                bm_deserialize_chunk(bm, c, cb, buf);
            }
            xm_check_chunk(bm, &m, c, cb, buf, ref);
            break;
        }
        case 9: { /* merge a sparse bitmap of the same granularity */
            struct bm_bitmap *src = bm_new(size, G);
            assert_non_null(src);
            for (int k = 0; k < 3; k++) {
                uint64_t o = xm_off(&m, hot, 6), l = xm_len(&m) / 4;
                bm_set(src, o, l);
                xm_fill(&m, o, l, true);
            }
            assert_int_equal(bm_merge(bm, src), 0);
            bm_free(src);
            break;
        }
        case 10: { /* copy, then continue with the copy */
            struct bm_bitmap *c = bm_copy(bm);
            assert_non_null(c);
            bm_free(bm);
            bm = c;
            break;
        }
        default: {
            uint64_t end = rnd_below(2) ? UINT64_MAX : off + len;
            if (end < off)
                end = UINT64_MAX;
            assert_int_equal(bm_get(bm, off),
                             off < size && xm_bit(&m, off >> g));
            assert_int_equal(bm_next_dirty(bm, off, end),
                             xm_next(&m, off, end, true));
            assert_int_equal(bm_next_clean(bm, off, end),
                             xm_next(&m, off, end, false));
            break;
        }
        }
        assert_int_equal(bm_count(bm), xm_count(&m));
        if (op % 20 == 19)
            xm_check(bm, &m);
    }
    xm_check(bm, &m);
    /* Shrink into the middle, then grow back: the tail must be clean. */
    uint64_t ns = rnd_below(size + 1);
    assert_int_equal(bm_resize(bm, ns), 0);
    m.size = ns;
    m.n = nbits_of(ns, g);
    xm_apply(&m, m.n, UINT64_MAX, false);
    xm_check(bm, &m);
    assert_int_equal(bm_resize(bm, size), 0);
    m.size = size;
    m.n = nbits_of(size, g);
    xm_check(bm, &m);
    bm_clear(bm);
    free(m.iv);
    m.iv = NULL;
    m.cnt = m.cap = 0;
    xm_check(bm, &m);
    bm_free(bm);
    free(buf);
    free(ref);
}

/* Disks up to 64 TiB at every granularity: 2^17..2^37 bits, so the page
 * summary has one to four levels. */
static void test_random_huge_sparse(void **state)
{
    (void)state;
    for (unsigned g = 9; g <= 31; g++) {
        rng_seed(5000 + g);
        uint64_t G = 1ull << g;
        /* as many granules as 64 TiB has, capped at 2^37, but at least
         * 2^17, and not a whole number of granules */
        uint64_t n = (64 * TiB) >> g;
        if (n < (1ull << 17))
            n = 1ull << 17;
        n -= rnd_below(n / 3);
        xm_run(g, n * G - rnd_below(G), 250);
    }
}

/* ---- deterministic page-state transitions ---- */

/* Filling a page granule by granule, emptying it again, and splitting a
 * full page must keep the count and the memory usage consistent. */
static void test_page_transitions(void **state)
{
    (void)state;
    uint64_t G = 512, n = 3 * PAGE_GRANULES + 5;
    struct bm_bitmap *bm = bm_new(n * G - 7, G);
    assert_non_null(bm);
    size_t base = bm_mem_usage(bm);

    for (uint64_t i = 0; i < PAGE_GRANULES; i++)
        bm_set(bm, (PAGE_GRANULES + i) * G + i % G, 1);
    assert_int_equal(bm_count(bm), PAGE_GRANULES * G);
    assert_int_equal(bm_mem_usage(bm), base); /* full page holds no memory */
    assert_int_equal(bm_next_clean(bm, PAGE_GRANULES * G, UINT64_MAX),
                     2 * PAGE_GRANULES * G);

    bm_reset(bm, (PAGE_GRANULES + 77) * G, 1); /* split the full page */
    assert_true(bm_mem_usage(bm) > base);
    assert_false(bm_get(bm, (PAGE_GRANULES + 77) * G));
    assert_int_equal(bm_next_clean(bm, PAGE_GRANULES * G, UINT64_MAX),
                     (PAGE_GRANULES + 77) * G);
    for (uint64_t i = 0; i < PAGE_GRANULES; i++)
        bm_reset(bm, (PAGE_GRANULES + i) * G, G);
    assert_int_equal(bm_count(bm), 0);
    assert_int_equal(bm_mem_usage(bm), base); /* empty page freed */

    /* The partial last page (5 granules) fills and serializes its tail. */
    bm_set(bm, 3 * PAGE_GRANULES * G, UINT64_MAX);
    assert_int_equal(bm_count(bm), 5 * G);
    assert_int_equal(bm_mem_usage(bm), base);
    uint8_t buf[512];
    uint64_t last = bm_chunk_count(bm, 512) - 1;
    bm_serialize_chunk(bm, last, 512, buf);
    assert_int_equal(buf[0], 0x1f);
    for (size_t i = 1; i < sizeof(buf); i++)
        assert_int_equal(buf[i], 0);

    /* Growing past a full partial last page must not dirty the new bits. */
    assert_int_equal(bm_resize(bm, (4 * PAGE_GRANULES + 3) * G), 0);
    assert_int_equal(bm_count(bm), 5 * G);
    assert_int_equal(bm_next_clean(bm, 3 * PAGE_GRANULES * G, UINT64_MAX),
                     (3 * PAGE_GRANULES + 5) * G);
    /* Shrinking into the run keeps a partial last granule. */
    assert_int_equal(bm_resize(bm, (3 * PAGE_GRANULES + 2) * G + 1), 0);
    assert_int_equal(bm_nbits(bm), 3 * PAGE_GRANULES + 3);
    assert_int_equal(bm_count(bm), 3 * G);
    assert_true(bm_get(bm, (3 * PAGE_GRANULES + 2) * G));
    assert_int_equal(bm_resize(bm, (3 * PAGE_GRANULES + 9) * G), 0);
    assert_int_equal(bm_count(bm), 3 * G);
    bm_free(bm);
}

/* ---- 64 TiB sparse ---- */

struct extent {
    uint64_t off, len;
};

static void test_sparse_64tib(void **state)
{
    (void)state;
    const uint64_t size = 64 * TiB, G = 64 * KiB;
    /* Writes (unaligned on purpose) and the dirty extents they make. */
    static const struct extent writes[] = {
        {0, 1},
        {5 * GiB + 100, 3 * MiB},
        {2 * TiB - 64 * KiB, 128 * KiB}, /* across a leaf page boundary */
        {10 * TiB, 100 * GiB},           /* 50 whole leaf pages */
        {40 * TiB + 7, 0},               /* len 0: nothing */
        {64 * TiB - 1, 1000},            /* clamped at the end */
    };
    static const struct extent want[] = {
        {0, 64 * KiB},
        {5 * GiB, 3 * MiB + 64 * KiB},
        {2 * TiB - 64 * KiB, 128 * KiB},
        {10 * TiB, 100 * GiB},
        {64 * TiB - 64 * KiB, 64 * KiB},
    };
    const size_t nwant = sizeof(want) / sizeof(want[0]);
    double t0 = now();

    struct bm_bitmap *bm = bm_new(size, G);
    assert_non_null(bm);
    size_t base = bm_mem_usage(bm);
    for (size_t i = 0; i < sizeof(writes) / sizeof(writes[0]); i++)
        bm_set(bm, writes[i].off, writes[i].len);

    uint64_t total = 0, off = 0, len;
    size_t k = 0;
    while (bm_next_dirty_area(bm, &off, UINT64_MAX, &len)) {
        assert_true(k < nwant);
        assert_int_equal(off, want[k].off);
        assert_int_equal(len, want[k].len);
        total += len;
        off += len;
        k++;
    }
    assert_int_equal(k, nwant);
    assert_int_equal(bm_count(bm), total);
    assert_int_equal(bm_next_dirty(bm, 64 * KiB, UINT64_MAX),
                     (int64_t)(5 * GiB));
    assert_int_equal(bm_next_dirty(bm, 11 * TiB, 63 * TiB), -1);
    assert_int_equal(bm_next_clean(bm, 10 * TiB + 5, UINT64_MAX),
                     (int64_t)(10 * TiB + 100 * GiB));
    /* A handful of leaf pages, not 128 MiB of bits. */
    assert_true(bm_mem_usage(bm) - base < 64 * KiB);
    assert_true(bm_mem_usage(bm) < 1 * MiB);

    /* Serialization: 64 KiB clusters cover 32 GiB each; only chunks
     * holding an extent are dirty, and they round-trip. */
    const uint64_t cb = 64 * KiB, cover = cb * 8 * G;
    uint64_t nch = bm_chunk_count(bm, cb), ndirty = 0;
    assert_int_equal(nch, size / cover);
    struct bm_bitmap *back = bm_new(size, G);
    uint8_t *buf = malloc(cb);
    assert_non_null(back);
    assert_non_null(buf);
    for (uint64_t c = 0; c < nch; c++) {
        bool expect_clean = true;
        for (size_t i = 0; i < nwant; i++) {
            if (want[i].off < (c + 1) * cover &&
                want[i].off + want[i].len > c * cover)
                expect_clean = false;
        }
        assert_int_equal(bm_chunk_is_clean(bm, c, cb), expect_clean);
        if (expect_clean)
            continue;
        ndirty++;
        bm_serialize_chunk(bm, c, cb, buf);
        bm_deserialize_chunk(back, c, cb, buf);
    }
    assert_int_equal(ndirty, 8);
    assert_int_equal(bm_count(back), total);
    off = 0;
    k = 0;
    while (bm_next_dirty_area(back, &off, UINT64_MAX, &len)) {
        assert_int_equal(off, want[k].off);
        assert_int_equal(len, want[k].len);
        off += len;
        k++;
    }
    assert_int_equal(k, nwant);
    free(buf);
    bm_free(back);

    bm_clear(bm);
    assert_int_equal(bm_count(bm), 0);
    assert_int_equal(bm_mem_usage(bm), base);
    bm_free(bm);
    print_message("64 TiB @ 64 KiB sparse case: %.3f s\n", now() - t0);

    /* The same disk at 512 B granularity: 2^37 bits, dirtied whole. */
    t0 = now();
    bm = bm_new(size, 512);
    assert_non_null(bm);
    bm_set(bm, 0, size);
    assert_int_equal(bm_count(bm), size);
    assert_int_equal(bm_next_clean(bm, 0, UINT64_MAX), -1);
    bm_reset(bm, 33 * TiB + 1, 4096);
    assert_int_equal(bm_count(bm), size - 4096 - 512);
    assert_int_equal(bm_next_clean(bm, 1, UINT64_MAX), (int64_t)(33 * TiB));
    off = 0;
    assert_true(bm_next_dirty_area(bm, &off, UINT64_MAX, &len));
    assert_int_equal(off, 0);
    assert_int_equal(len, 33 * TiB);
    off += len;
    assert_true(bm_next_dirty_area(bm, &off, UINT64_MAX, &len));
    assert_int_equal(off, 33 * TiB + 4608);
    assert_int_equal(len, size - off);
    bm_reset(bm, 0, UINT64_MAX);
    assert_int_equal(bm_count(bm), 0);
    bm_set(bm, 63 * TiB + 3, 1);
    assert_int_equal(bm_next_dirty(bm, 0, UINT64_MAX), (int64_t)(63 * TiB));
    bm_free(bm);
    print_message("64 TiB @ 512 B full/clear case: %.3f s\n", now() - t0);
}

/* ---- edge cases ---- */

static void test_bm_new_validation(void **state)
{
    (void)state;
    static const uint64_t bad_g[] = {
        0,          1,          256,        511,
        513,        768,        3 * 512,    (1ull << 31) + 512,
        1ull << 32, 1ull << 63, UINT64_MAX,
    };
    for (size_t i = 0; i < sizeof(bad_g) / sizeof(bad_g[0]); i++) {
        errno = 0;
        assert_null(bm_new(1 * MiB, bad_g[i]));
        assert_int_equal(errno, EINVAL);
    }
    static const struct {
        uint64_t size, g;
    } bad_size[] = {
        {UINT64_MAX, 1ull << 31},
        {(uint64_t)INT64_MAX + 1, 1ull << 31},
        {(uint64_t)INT64_MAX, 512},    /* 2^54 bits > BM_MAX_BITS */
        {(BM_MAX_BITS << 9) + 1, 512}, /* one bit too many */
    };
    for (size_t i = 0; i < sizeof(bad_size) / sizeof(bad_size[0]); i++) {
        errno = 0;
        assert_null(bm_new(bad_size[i].size, bad_size[i].g));
        assert_int_equal(errno, EINVAL);
    }
    for (unsigned g = 9; g <= 31; g++) {
        struct bm_bitmap *bm = bm_new(12345, 1ull << g);
        assert_non_null(bm);
        assert_int_equal(bm_granularity(bm), 1ull << g);
        assert_int_equal(bm_granularity_bits(bm), g);
        assert_int_equal(bm_nbits(bm), (12345 + (1ull << g) - 1) >> g);
        bm_free(bm);
    }
    /* The largest size, at a granularity that keeps the bit count legal. */
    struct bm_bitmap *bm = bm_new(INT64_MAX, 1ull << 31);
    assert_non_null(bm);
    assert_int_equal(bm_nbits(bm), 1ull << 32);
    bm_set(bm, INT64_MAX - 1, UINT64_MAX);
    assert_int_equal(bm_next_dirty(bm, 0, UINT64_MAX),
                     (int64_t)(((uint64_t)INT64_MAX >> 31) << 31));
    assert_int_equal(bm_count(bm), 1ull << 31);
    assert_int_equal(bm_resize(bm, UINT64_MAX), -EINVAL);
    assert_int_equal(bm_resize(bm, (uint64_t)INT64_MAX + 1), -EINVAL);
    assert_int_equal(bm_size(bm), (uint64_t)INT64_MAX); /* unchanged */
    bm_free(bm);
    bm_free(NULL);
}

static void test_empty_bitmap(void **state)
{
    (void)state;
    struct bm_bitmap *bm = bm_new(0, 65536);
    assert_non_null(bm);
    assert_int_equal(bm_nbits(bm), 0);
    bm_set(bm, 0, 100);
    assert_int_equal(bm_count(bm), 0);
    assert_false(bm_get(bm, 0));
    assert_int_equal(bm_next_dirty(bm, 0, UINT64_MAX), -1);
    assert_int_equal(bm_next_clean(bm, 0, UINT64_MAX), -1);
    assert_int_equal(bm_chunk_count(bm, 512), 0);
    assert_true(bm_chunk_is_clean(bm, 0, 512));
    uint64_t off = 0, len = 0;
    assert_false(bm_next_dirty_area(bm, &off, UINT64_MAX, &len));
    assert_int_equal(bm_resize(bm, 1000), 0);
    bm_set(bm, 999, 1);
    assert_int_equal(bm_count(bm), 65536);
    assert_int_equal(bm_resize(bm, 0), 0);
    assert_int_equal(bm_count(bm), 0);
    struct bm_bitmap *c = bm_copy(bm);
    assert_non_null(c);
    assert_int_equal(bm_merge(c, bm), 0);
    bm_free(c);
    bm_free(bm);
}

static void test_ranges_at_the_edges(void **state)
{
    (void)state;
    const uint64_t G = 4096, size = 10 * G + 100; /* 11 granules */
    struct bm_bitmap *bm = bm_new(size, G);
    assert_non_null(bm);
    assert_int_equal(bm_nbits(bm), 11);

    bm_set(bm, 5 * G, 0); /* len 0 */
    assert_int_equal(bm_count(bm), 0);
    bm_set(bm, size, 1); /* off at size */
    bm_set(bm, size + G, UINT64_MAX);
    assert_int_equal(bm_count(bm), 0);
    assert_false(bm_get(bm, size));

    bm_set(bm, size - 1, 1); /* last byte: partial last granule */
    assert_true(bm_get(bm, 10 * G));
    assert_int_equal(bm_count(bm), G);
    uint64_t off = 0, len = 0;
    assert_true(bm_next_dirty_area(bm, &off, UINT64_MAX, &len));
    assert_int_equal(off, 10 * G);
    assert_int_equal(len, 100); /* clamped to size */
    assert_int_equal(bm_next_dirty(bm, size, UINT64_MAX), -1);
    assert_int_equal(bm_next_dirty(bm, 3, 3), -1); /* empty range */
    assert_int_equal(bm_next_dirty(bm, 10 * G + 7, UINT64_MAX), 10 * G + 7);
    assert_int_equal(bm_next_clean(bm, 10 * G, UINT64_MAX), -1);

    bm_set(bm, 2 * G - 1, 2); /* two bytes straddling a boundary */
    assert_true(bm_get(bm, G));
    assert_true(bm_get(bm, 2 * G));
    assert_int_equal(bm_count(bm), 3 * G);
    bm_reset(bm, 2 * G + G - 1, 1); /* any byte resets the whole granule */
    assert_false(bm_get(bm, 2 * G));
    bm_set(bm, 3 * G, size - 3 * G); /* range ending exactly at size */
    assert_int_equal(bm_count(bm), 9 * G);
    off = G + 1;
    assert_true(bm_next_dirty_area(bm, &off, 6 * G + 1, &len));
    assert_int_equal(off, G + 1); /* starts at the input offset */
    assert_int_equal(len, G - 1);
    off = 2 * G;
    assert_true(bm_next_dirty_area(bm, &off, 6 * G + 1, &len));
    assert_int_equal(off, 3 * G);
    assert_int_equal(len, 3 * G + 1); /* clamped to end */
    bm_reset(bm, 0, UINT64_MAX);
    assert_int_equal(bm_count(bm), 0);
    bm_free(bm);

    /* Ranges running one byte past an end that is a whole number of
     * granules (and of leaf pages) stop at the last granule. */
    static const uint64_t whole[] = {77, PAGE_GRANULES, 2 * PAGE_GRANULES};
    for (size_t i = 0; i < sizeof(whole) / sizeof(whole[0]); i++) {
        bm = bm_new(whole[i] * 512, 512);
        assert_non_null(bm);
        bm_set(bm, whole[i] * 512 - 1, 2);
        bm_set(bm, whole[i] * 512 - 600, 601);
        assert_int_equal(bm_count(bm), 2 * 512);
        assert_int_equal(bm_next_clean(bm, whole[i] * 512 - 1024, UINT64_MAX),
                         -1);
        bm_free(bm);
    }
}

/* Merging across granularities: a one-byte last source granule still
 * dirties the destination granule holding it, and coarse source granules
 * spread over every fine granule they cover. */
static void test_merge_granularities(void **state)
{
    (void)state;
    const uint64_t size = 3 * 4096 + 1;
    struct bm_bitmap *coarse = bm_new(size, 4096), *fine = bm_new(size, 512);
    assert_non_null(coarse);
    assert_non_null(fine);
    bm_set(coarse, size - 1, 1);
    assert_int_equal(bm_merge(fine, coarse), 0);
    assert_int_equal(bm_count(fine), 512);
    assert_true(bm_get(fine, size - 1));
    bm_set(coarse, 4096 + 5, 1);
    assert_int_equal(bm_merge(fine, coarse), 0);
    assert_int_equal(bm_count(fine), 9 * 512);
    bm_clear(coarse);
    bm_reset(fine, 0, UINT64_MAX);
    bm_set(fine, 2 * 4096 - 1, 2); /* two fine granules, two coarse ones */
    assert_int_equal(bm_merge(coarse, fine), 0);
    assert_int_equal(bm_count(coarse), 2 * 4096);
    assert_int_equal(bm_next_dirty(coarse, 0, UINT64_MAX), 4096);
    bm_free(coarse);
    bm_free(fine);
}

/* 2 GiB granularity with a disk smaller than one granule. */
static void test_huge_granularity_tiny_disk(void **state)
{
    (void)state;
    const uint64_t G = 1ull << 31;
    struct bm_bitmap *bm = bm_new(1000, G);
    assert_non_null(bm);
    assert_int_equal(bm_nbits(bm), 1);
    bm_set(bm, 999, 1);
    assert_true(bm_get(bm, 0));
    assert_int_equal(bm_count(bm), G); /* whole granules, as QEMU */
    assert_int_equal(bm_next_dirty(bm, 0, UINT64_MAX), 0);
    assert_int_equal(bm_next_dirty(bm, 500, UINT64_MAX), 500);
    assert_int_equal(bm_next_clean(bm, 0, UINT64_MAX), -1);
    uint64_t off = 0, len = 0;
    assert_true(bm_next_dirty_area(bm, &off, UINT64_MAX, &len));
    assert_int_equal(off, 0);
    assert_int_equal(len, 1000);

    uint8_t buf[512];
    assert_int_equal(bm_chunk_count(bm, 512), 1);
    bm_serialize_chunk(bm, 0, 512, buf);
    assert_int_equal(buf[0], 1);
    for (size_t i = 1; i < sizeof(buf); i++)
        assert_int_equal(buf[i], 0);

    /* An all-ones entry and an all-ones cluster set only the one bit. */
    bm_clear(bm);
    bm_deserialize_fill(bm, 0, 512, true);
    assert_int_equal(bm_count(bm), G);
    bm_deserialize_fill(bm, 0, 512, false);
    assert_int_equal(bm_count(bm), 0);
    memset(buf, 0xff, sizeof(buf));
    bm_deserialize_chunk(bm, 0, 512, buf);
    assert_int_equal(bm_count(bm), G);
    bm_serialize_chunk(bm, 0, 512, buf);
    assert_int_equal(buf[0], 1);
    assert_int_equal(buf[1], 0);
    /* A chunk past the end is ignored. */
    bm_deserialize_fill(bm, 1, 512, false);
    bm_deserialize_chunk(bm, 5, 512, buf);
    assert_int_equal(bm_count(bm), G);
    bm_free(bm);
}

/* The stream layout byte for byte: bit n in byte n/8, LSB first. */
static void test_stream_layout(void **state)
{
    (void)state;
    const uint64_t G = 512;
    struct bm_bitmap *bm =
        bm_new(4096 * 8 * G * 2 + 3 * G, G); /* 2 chunks + 3 bits */
    assert_non_null(bm);
    assert_int_equal(bm_chunk_count(bm, 4096), 3);
    bm_set(bm, 0 * G, 1);
    bm_set(bm, 9 * G, 1);
    bm_set(bm, 63 * G, 2 * G); /* bits 63, 64 */
    bm_set(bm, (4096 * 8 + 7) * G, 1);
    bm_set(bm, (4096 * 16 + 2) * G, 1);
    uint8_t buf[4096];
    bm_serialize_chunk(bm, 0, 4096, buf);
    assert_int_equal(buf[0], 0x01);
    assert_int_equal(buf[1], 0x02);
    assert_int_equal(buf[7], 0x80);
    assert_int_equal(buf[8], 0x01);
    bm_serialize_chunk(bm, 1, 4096, buf);
    assert_int_equal(buf[0], 0x80);
    bm_serialize_chunk(bm, 2, 4096, buf);
    assert_int_equal(buf[0], 0x04);
    /* Tail bits past nbits are ignored on load and zero on store. */
    memset(buf, 0xff, sizeof(buf));
    bm_deserialize_chunk(bm, 2, 4096, buf);
    bm_serialize_chunk(bm, 2, 4096, buf);
    assert_int_equal(buf[0], 0x07);
    for (size_t i = 1; i < sizeof(buf); i++)
        assert_int_equal(buf[i], 0);
    assert_false(bm_chunk_is_clean(bm, 1, 4096));
    bm_reset(bm, 4096 * 8 * G, 4096 * 8 * G);
    assert_true(bm_chunk_is_clean(bm, 1, 4096));
    bm_free(bm);
}

/*
 * Copies share their pages until one side changes (copy on write): random
 * changes to a bitmap and to copies of it, merges and deserializations
 * (which edit pages in place) and resizes, on both sides, must never show
 * through to the other.  Several copies stay alive at once, some of copies.
 */
static void test_copy_on_write(void **state)
{
    (void)state;
    rng_seed(1414);
    for (int round = 0; round < 40; round++) {
        unsigned g = 9 + (unsigned)rnd_below(4);
        uint64_t size = (1 + rnd_below(5 * 32768)) << g;
        enum { NB = 4 };
        struct bm_bitmap *bm[NB] = {NULL};
        struct model m[NB];
        bm[0] = bm_new(size, 1ull << g);
        assert_non_null(bm[0]);
        model_init(&m[0], size, g);
        rnd_mutate(bm[0], &m[0], 20);
        for (int op = 0; op < 60; op++) {
            int i = (int)rnd_below(NB), j = (int)rnd_below(NB);
            if (!bm[i])
                continue;
            switch (rnd_below(6)) {
            case 0: /* copy i into slot j */
                if (i == j)
                    break;
                if (bm[j]) {
                    bm_free(bm[j]);
                    model_free(&m[j]);
                }
                bm[j] = bm_copy(bm[i]);
                assert_non_null(bm[j]);
                model_init(&m[j], m[i].size, g);
                memcpy(m[j].b, m[i].b, m[i].n);
                break;
            case 1:
                rnd_mutate(bm[i], &m[i], 3);
                break;
            case 2: { /* deserialize a chunk */
                uint64_t cb = 512;
                uint64_t nch = bm_chunk_count(bm[i], cb);
                if (!nch)
                    break;
                uint8_t buf[512];
                uint64_t ch = rnd_below(nch);
                rnd_chunk_data(buf, cb);
                bm_deserialize_chunk(bm[i], ch, cb, buf);
                model_decode(&m[i], ch, cb, buf);
                break;
            }
            case 3: /* merge j into i */
                if (bm[j] && j != i && m[j].size == m[i].size) {
                    assert_int_equal(bm_merge(bm[i], bm[j]), 0);
                    for (uint64_t k = 0; k < m[i].n; k++)
                        m[i].b[k] |= m[j].b[k];
                }
                break;
            case 4: { /* shrink or grow a little: edits the last page */
                uint64_t ns = m[i].size > (1ull << g) && rnd_below(2)
                                  ? m[i].size - 1 - rnd_below(1ull << g)
                                  : m[i].size + rnd_below(64ull << g);
                assert_int_equal(bm_resize(bm[i], ns), 0);
                model_resize(&m[i], ns);
                break;
            }
            default: /* free */
                if (i != 0) {
                    bm_free(bm[i]);
                    bm[i] = NULL;
                    model_free(&m[i]);
                }
                break;
            }
            for (int k = 0; k < NB; k++)
                if (bm[k])
                    check_same(bm[k], &m[k]);
        }
        for (int k = 0; k < NB; k++) {
            if (bm[k]) {
                bm_free(bm[k]);
                model_free(&m[k]);
            }
        }
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bm_new_validation),
        cmocka_unit_test(test_empty_bitmap),
        cmocka_unit_test(test_ranges_at_the_edges),
        cmocka_unit_test(test_huge_granularity_tiny_disk),
        cmocka_unit_test(test_merge_granularities),
        cmocka_unit_test(test_stream_layout),
        cmocka_unit_test(test_page_transitions),
        cmocka_unit_test(test_sparse_64tib),
        cmocka_unit_test(test_random_all_granularities),
        cmocka_unit_test(test_random_huge_sparse),
        cmocka_unit_test(test_copy_on_write),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
