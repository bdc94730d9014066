/*
 * Sorted byte ranges (src/util/ranges.h) against a naive model, a byte
 * array over a small space:
 *
 *  - ranges_push merges what overlaps or touches the last range, and the
 *    result stays sorted, disjoint and not touching;
 *  - ranges_union of two random sets is their OR;
 *  - ranges_state_at walks a set as a cursor: at every position it says
 *    inside or not, and where that state ends;
 *  - ranges_collect_dirty keeps dirty extents only, clamped to its limit;
 *  - VEC_PUSH grows any {v, n, cap} array, keeping what it held.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "util/ranges.h"

#define SPACE 512

/* A random sorted set of ranges within [0, SPACE), pushed in order (some
 * overlapping or touching the previous one), and its model. */
static void random_set(unsigned *seed, struct ranges *r, bool *model)
{
    memset(model, 0, SPACE);
    uint64_t pos = (uint64_t)(rand_r(seed) % 16);
    while (pos < SPACE) {
        uint64_t len = 1 + (uint64_t)(rand_r(seed) % 24);
        uint64_t end = pos + len > SPACE ? SPACE : pos + len;
        assert_int_equal(ranges_push(r, pos, end), 0);
        for (uint64_t i = pos; i < end; i++)
            model[i] = true;
        /* The next start: before the end (overlap), at it (touch) or
         * past it (a gap), never before this start. */
        int how = rand_r(seed) % 3;
        pos = how == 0   ? pos + (uint64_t)(rand_r(seed) % len)
              : how == 1 ? end
                         : end + 1 + (uint64_t)(rand_r(seed) % 32);
    }
}

static void check_against(const struct ranges *r, const bool *model)
{
    bool seen[SPACE] = {false};
    for (size_t i = 0; i < r->n; i++) {
        assert_true(r->v[i].start < r->v[i].end);
        if (i)
            assert_true(r->v[i - 1].end < r->v[i].start);
        for (uint64_t b = r->v[i].start; b < r->v[i].end; b++)
            seen[b] = true;
    }
    assert_memory_equal(seen, model, SPACE);
}

static void test_push_union_state(void **state)
{
    unsigned seed = 1;
    for (int round = 0; round < 500; round++) {
        struct ranges a = {0}, b = {0};
        bool ma[SPACE], mb[SPACE], mu[SPACE];
        random_set(&seed, &a, ma);
        random_set(&seed, &b, mb);
        check_against(&a, ma);
        check_against(&b, mb);

        /* The cursor over a, at every position. */
        size_t cur = 0;
        for (uint64_t pos = 0; pos < SPACE; pos++) {
            uint64_t next;
            bool in = ranges_state_at(&a, &cur, pos, SPACE, &next);
            assert_int_equal(in, ma[pos]);
            assert_true(next > pos && next <= SPACE);
            for (uint64_t q = pos; q < next; q++)
                assert_int_equal(ma[q], in);
            if (next < SPACE)
                assert_int_not_equal(ma[next], in);
        }

        for (int i = 0; i < SPACE; i++)
            mu[i] = ma[i] || mb[i];
        assert_int_equal(ranges_union(&a, &b), 0);
        check_against(&a, mu);
        free(a.v);
        free(b.v);
    }
}

static void test_collect(void **state)
{
    struct ranges_collect c = {.limit = 100};
    assert_int_equal(ranges_collect_dirty(&c, 0, 10, false), 0);
    assert_int_equal(ranges_collect_dirty(&c, 10, 20, true), 0);
    assert_int_equal(ranges_collect_dirty(&c, 30, 5, false), 0);
    assert_int_equal(ranges_collect_dirty(&c, 35, 5, true), 0);
    assert_int_equal(ranges_collect_dirty(&c, 40, 5, true), 0);  /* touches */
    assert_int_equal(ranges_collect_dirty(&c, 90, 50, true), 0); /* clamped */
    assert_int_equal(ranges_collect_dirty(&c, 140, 5, true), 0); /* past */
    assert_int_equal(c.r.n, 3);
    assert_int_equal(c.r.v[0].start, 10);
    assert_int_equal(c.r.v[0].end, 30);
    assert_int_equal(c.r.v[1].start, 35);
    assert_int_equal(c.r.v[1].end, 45);
    assert_int_equal(c.r.v[2].start, 90);
    assert_int_equal(c.r.v[2].end, 100);
    free(c.r.v);
}

static void test_vec(void **state)
{
    struct {
        int *v;
        size_t n, cap;
    } a = {0};
    for (int i = 0; i < 1000; i++)
        assert_int_equal(VEC_PUSH(&a, i * 3), 0);
    assert_int_equal(a.n, 1000);
    assert_true(a.cap >= 1000);
    for (int i = 0; i < 1000; i++)
        assert_int_equal(a.v[i], i * 3);
    free(a.v);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_push_union_state),
        cmocka_unit_test(test_collect),
        cmocka_unit_test(test_vec),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
