/*
 * The block pipeline (src/ops/blockpipe.c):
 *
 *  - every filled chunk is hashed completely before it is drained, and
 *    chunks are drained in fill order, whatever order the workers finish
 *    in (hash calls sleep for random times), with 1, 2, 3 and 8 workers;
 *  - a "bad" segment found early in a later chunk does not get ahead of an
 *    earlier one found late: the drain stops at the first in order, having
 *    drained exactly the chunks before it;
 *  - a non-zero result from fill, hash or drain stops the run and is what
 *    bp_run returns, without draining anything after it or hanging;
 *  - an empty run, and bp_take's accounting of the chunk buffer.
 */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cmocka.h>

#include "ops/blockpipe.h"
#include "util/util.h"

struct t {
    uint64_t nchunks;        /* chunks fill produces */
    uint64_t filled;         /* chunks filled so far */
    uint64_t next_off;       /* offset of the next segment */
    uint64_t drained;        /* chunks drained so far */
    uint64_t drained_off;    /* end of the last drained segment */
    uint64_t fail_fill_at;   /* chunk whose fill fails (UINT64_MAX: none) */
    uint64_t fail_drain_at;
    uint64_t fail_hash_at;
    uint64_t bad_chunk_slow; /* its hash is slow and marks a segment bad */
    uint64_t bad_chunk_fast; /* its hash marks a segment bad at once */
    uint64_t stopped_at;     /* drain: the chunk where it met a bad seg */
    uint64_t cancel_at;      /* cancelled asked before this fill says yes */
    uint64_t cancel_asked;   /* times cancelled was asked */
    unsigned seed;
    pthread_mutex_t m;       /* guards seed for rand_r across workers */
    bool ok;                 /* every invariant held */
};

static void init_t(struct t *t, uint64_t nchunks)
{
    memset(t, 0, sizeof(*t));
    t->nchunks = nchunks;
    t->fail_fill_at = t->fail_drain_at = t->fail_hash_at = UINT64_MAX;
    t->bad_chunk_slow = t->bad_chunk_fast = UINT64_MAX;
    t->stopped_at = UINT64_MAX;
    t->cancel_at = UINT64_MAX;
    t->seed = 12345;
    t->ok = true;
    pthread_mutex_init(&t->m, NULL);
}

/* An invariant failed (any thread). */
static void bad(struct t *t)
{
    __atomic_store_n(&t->ok, false, __ATOMIC_RELAXED);
}

static int t_fill(void *opaque, struct bp_chunk *c)
{
    struct t *t = opaque;
    if (c->seq != t->filled || c->n != 0 || c->used != 0)
        bad(t);
    if (t->filled == t->fail_fill_at)
        return -5;
    if (t->filled == t->nchunks)
        return 0;
    /* 1 to BP_SEGS segments, some with data in the buffer. */
    size_t n = 1 + (size_t)((t->filled * 7919) % BP_SEGS);
    for (size_t i = 0; i < n; i++) {
        uint64_t len = 1 + (t->next_off * 31 + i) % 4096;
        uint8_t *data = (i % 3) ? bp_take(c, (size_t)len) : NULL;
        if ((i % 3) && !data)
            bad(t);
        if (data)
            memset(data, (int)(t->filled & 0xff), (size_t)len);
        c->seg[c->n++] = (struct bp_seg){.off = t->next_off, .len = len,
                                         .data = data, .kind = -1};
        t->next_off += len;
    }
    t->filled++;
    return 1;
}

static unsigned rnd(struct t *t)
{
    pthread_mutex_lock(&t->m);
    unsigned r = (unsigned)rand_r(&t->seed);
    pthread_mutex_unlock(&t->m);
    return r;
}

static int t_hash(void *opaque, struct bp_chunk *c, size_t i, size_t j)
{
    struct t *t = opaque;
    if (i >= j || j > c->n)
        bad(t);
    if (c->seq == t->fail_hash_at)
        return 9;
    if (c->seq == t->bad_chunk_slow)
        usleep(50000);
    else
        usleep(rnd(t) % 300);
    for (size_t k = i; k < j; k++) {
        struct bp_seg *g = &c->seg[k];
        if (g->kind != -1)
            bad(t); /* hashed twice */
        if (g->data && g->data[g->len - 1] != (uint8_t)(c->seq & 0xff))
            bad(t); /* the buffer was overwritten */
        g->kind = (int)(g->off % 251);
        if ((c->seq == t->bad_chunk_slow || c->seq == t->bad_chunk_fast) &&
            k == c->n / 2)
            g->bad = 1;
    }
    return 0;
}

static int t_drain(void *opaque, struct bp_chunk *c)
{
    struct t *t = opaque;
    if (c->seq != t->drained)
        bad(t);
    for (size_t k = 0; k < c->n; k++) {
        struct bp_seg *g = &c->seg[k];
        if (g->kind != (int)(g->off % 251) || g->off != t->drained_off)
            bad(t);
        if (g->bad) {
            t->stopped_at = c->seq;
            return 1;
        }
        t->drained_off = g->off + g->len;
    }
    if (c->seq == t->fail_drain_at)
        return -7;
    t->drained++;
    return 0;
}

/* Asked in the filling thread before each fill. */
static bool t_cancelled(void *opaque)
{
    struct t *t = opaque;
    t->cancel_asked++;
    return t->filled >= t->cancel_at;
}

static const struct bp_ops OPS = {
    .fill = t_fill,
    .hash = t_hash,
    .drain = t_drain,
    .cancelled = t_cancelled,
};

static void test_order(void **state)
{
    (void)state;
    int threads[] = {1, 2, 3, 8};
    for (size_t i = 0; i < 4; i++) {
        struct t t;
        init_t(&t, 300);
        assert_int_equal(bp_run(&OPS, &t, threads[i]), 0);
        assert_true(t.ok);
        assert_int_equal(t.filled, 300);
        assert_int_equal(t.drained, 300);
        assert_int_equal(t.drained_off, t.next_off);
    }
}

static void test_first_bad_in_order(void **state)
{
    (void)state;
    struct t t;
    init_t(&t, 100);
    t.bad_chunk_slow = 10;
    t.bad_chunk_fast = 12;
    assert_int_equal(bp_run(&OPS, &t, 4), 1);
    assert_true(t.ok);
    assert_int_equal(t.stopped_at, 10);
    assert_int_equal(t.drained, 10);
    assert_true(t.filled < 100);
}

static void test_stops(void **state)
{
    (void)state;
    struct t t;
    init_t(&t, 1000);
    t.fail_fill_at = 7;
    assert_int_equal(bp_run(&OPS, &t, 2), -5);
    assert_true(t.ok);
    assert_true(t.drained <= 7);

    init_t(&t, 1000);
    t.fail_drain_at = 3;
    assert_int_equal(bp_run(&OPS, &t, 2), -7);
    assert_true(t.ok);
    assert_int_equal(t.drained, 3);
    assert_true(t.filled <= 3 + BP_SLOTS + 1);

    init_t(&t, 1000);
    t.fail_hash_at = 5;
    assert_int_equal(bp_run(&OPS, &t, 3), 9);
    assert_true(t.ok);
    assert_true(t.drained <= 5);
    assert_true(t.filled <= 5 + BP_SLOTS + 1);
}

/* A cancel stops the filling at once and the run, as any stop does (the
 * chunks in flight may be left undrained, never drained out of order);
 * bp_run returns -ECANCELED. */
static void test_cancel(void **state)
{
    (void)state;
    uint64_t at[] = {0, 1, 5, 40};
    for (size_t i = 0; i < 4; i++) {
        struct t t;
        init_t(&t, 1000);
        t.cancel_at = at[i];
        assert_int_equal(bp_run(&OPS, &t, 3), -ECANCELED);
        assert_true(t.ok);
        assert_int_equal(t.filled, at[i]);
        assert_true(t.drained <= at[i]);
        assert_int_equal(t.cancel_asked, at[i] + 1);
    }
    /* never cancelled: asked before every fill, also the last (empty) one */
    struct t t;
    init_t(&t, 20);
    assert_int_equal(bp_run(&OPS, &t, 2), 0);
    assert_int_equal(t.cancel_asked, 21);
}

static void test_empty(void **state)
{
    (void)state;
    struct t t;
    init_t(&t, 0);
    assert_int_equal(bp_run(&OPS, &t, 0), 0);
    assert_true(t.ok);
    assert_int_equal(t.drained, 0);
}

static void test_take(void **state)
{
    (void)state;
    static uint8_t buf[BP_BUF];
    struct bp_chunk c = {.buf = buf};
    assert_ptr_equal(bp_take(&c, 100), buf);
    assert_ptr_equal(bp_take(&c, 28), buf + 100);
    assert_ptr_equal(bp_take(&c, BP_BUF - 128), buf + 128);
    assert_null(bp_take(&c, 1));
    assert_int_equal(c.used, BP_BUF);
}

/* Pages of [p, p + len) the kernel has present (mincore). */
static size_t present_pages(const uint8_t *p, size_t len)
{
    size_t pg = (size_t)sysconf(_SC_PAGESIZE), n = len / pg, got = 0;
    unsigned char *v = malloc(n);
    assert_non_null(v);
    assert_int_equal(mincore((void *)p, len, v), 0);
    for (size_t i = 0; i < n; i++)
        got += v[i] & 1;
    free(v);
    return got;
}

/* bp_take makes the pages under what it hands out present, a step at a
 * time (the reads then fill them without a fault a page): after 64 KiB
 * the first step is in, after 600 KiB the second. */
static void test_take_makes_pages_present(void **state)
{
    (void)state;
    size_t pg = (size_t)sysconf(_SC_PAGESIZE);
    uint8_t *buf = mmap(NULL, BP_BUF, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    assert_true(buf != MAP_FAILED);
    struct bp_chunk c = {.buf = buf};
    assert_ptr_equal(bp_take(&c, 65536), buf);
    assert_int_equal(c.ready, BP_READY_STEP);
    assert_int_equal(present_pages(buf, BP_READY_STEP), BP_READY_STEP / pg);
    assert_ptr_equal(bp_take(&c, 600 * 1024 - 65536), buf + 65536);
    assert_int_equal(c.ready, 2 * BP_READY_STEP);
    assert_int_equal(present_pages(buf, 2 * BP_READY_STEP),
                     2 * BP_READY_STEP / pg);
    munmap(buf, BP_BUF);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_order),
        cmocka_unit_test(test_first_bad_in_order),
        cmocka_unit_test(test_stops),
        cmocka_unit_test(test_cancel),
        cmocka_unit_test(test_empty),
        cmocka_unit_test(test_take),
        cmocka_unit_test(test_take_makes_pages_present),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
