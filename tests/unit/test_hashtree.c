/*
 * sha256-tree-v2 (src/ops/hashtree.c), against two oracles:
 *
 *  - roots of all-zero views and of a small view, computed by an
 *    independent Python model (tests/treemodel.py, hashlib only) and
 *    pasted here: the zero-subtree digests of every width and level;
 *  - a naive model in this file that computes every node of the tree from
 *    the whole leaf array, level by level: the builder's records and root
 *    for a full tree, an incremental over a chain, a resized incremental,
 *    and the merge of two record files (prune) must all give views equal
 *    to it node for node, and pass tree_view_check;
 *  - the record file's parser refusing each kind of damage by name, and
 *    tree_view_check naming the file of a record that does not add up.
 */
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "ops/hashtree.h"
#include "util/util.h"
#include "tmpdir.h"

static char tmpdir[TMPDIR_PATH_MAX];

static char *tpath(const char *name)
{
    return tmpdir_join(tmpdir, name);
}

static void hex_to(const char *hex, uint8_t out[32])
{
    for (int i = 0; i < 32; i++) {
        unsigned v;
        sscanf(hex + 2 * i, "%2x", &v);
        out[i] = (uint8_t)v;
    }
}

/* tests/treemodel.py: tree(size, {})[1] for each size. */
static void test_zero_roots(void **state)
{
    (void)state;
    static const struct {
        uint64_t size;
        const char *root;
    } v[] = {
        {0, "33e0bf045f17ffd163db1dcfa65f39b76e142200f9e2d57e86aa6aab05bf15f2"},
        {1, "cbfcf55f9cf17022cb9a7286a167d4e3b952570be38df7e9d45d62e0f4deb47d"},
        {65536,
         "30dbadfe13292970bf7daec9001c0b7105fbed3e90a5fb5617612c0065220de3"},
        {65537,
         "c4a40dccb0f8e99ecdb3a7688dffac266fa7ae293b7fcade9fba6ab94783b01e"},
        {16777216,
         "3def70c48a12280f4c86a7ab90a54ffc501d8f0e374066e7f765cc65fa081abe"},
        {16777316,
         "f955b10ad3a29e9c0f11e52eb679375f3fef2f60c1c1480baf93700f99b9baf6"},
        {16842752,
         "594f830e75b316e8da67c4aefb963d4c4eb20956eb2f2b439bd7c37725d4c78f"},
        {4294967301ull,
         "e7cc91c510d065b5855ba12a775c55eafd07b50db89298bccadabb18fe588648"},
        {17592186044416ull,
         "22864ef9020f815dd4abb50da1f2bd2380ec20a81847631fe5da6eec31b007a2"},
    };
    for (size_t j = 0; j < ARRAY_SIZE(v); j++) {
        struct tree_shape s;
        uint8_t want[32], got[32];
        assert_int_equal(tree_shape_init(&s, v[j].size), 0);
        hex_to(v[j].root, want);
        tree_zero(&s, s.levels, 0, got);
        assert_memory_equal(got, want, 32);
        /* The builder with nothing changed gives the same root. */
        struct tree_builder b;
        assert_int_equal(tree_builder_init(&b, &s, NULL, NULL, NULL, NULL), 0);
        assert_int_equal(tree_builder_finish(&b, got), 0);
        tree_builder_free(&b);
        assert_memory_equal(got, want, 32);
    }
    assert_int_equal(tree_levels_for(0), 1);
    assert_int_equal(tree_levels_for(256), 1);
    assert_int_equal(tree_levels_for(257), 2);
    assert_int_equal(tree_levels_for(1ull << 28), 4);
    assert_int_equal(tree_levels_for((1ull << 47)), 6);
    struct tree_shape s;
    assert_int_equal(tree_shape_init(&s, (uint64_t)INT64_MAX), 0);
    assert_int_equal(s.levels, 6);
    assert_int_equal(tree_shape_init(&s, (uint64_t)INT64_MAX + 1), -EINVAL);
}

static void sha_of(const char *text, uint8_t out[32])
{
    sha256_digest(text, strlen(text), out);
}

/* tests/treemodel.py: leaves sha256("a") at 0, "c" at 256, "b" at 299 of a
 * 300-block view whose last block is 7 bytes. */
static void test_small_root(void **state)
{
    (void)state;
    struct tree_shape s;
    uint8_t want[32], got[32], d[32];
    assert_int_equal(tree_shape_init(&s, 300ull * 65536 + 7), 0);
    hex_to("30bf27f8f800ed49df40cdf45b551b1aa74fe18b01721cd46ad8cee59b31e53c",
           want);
    struct tree_builder b;
    assert_int_equal(tree_builder_init(&b, &s, NULL, NULL, NULL, NULL), 0);
    sha_of("a", d);
    assert_int_equal(tree_builder_leaf(&b, 0, d), 0);
    sha_of("c", d);
    assert_int_equal(tree_builder_leaf(&b, 256, d), 0);
    /* Out of order: refused. */
    assert_int_equal(tree_builder_leaf(&b, 100, d), -EINVAL);
    sha_of("b", d);
    assert_int_equal(tree_builder_leaf(&b, 299, d), 0);
    assert_int_equal(tree_builder_finish(&b, got), 0);
    tree_builder_free(&b);
    assert_memory_equal(got, want, 32);
}

/* ---- the naive model: every node from the whole leaf array ---- */

struct naive {
    struct tree_shape s;
    uint8_t *lv[TREE_MAX_LEVELS + 1];
};

static void naive_build(struct naive *m, uint64_t size, const uint8_t *leaves)
{
    memset(m, 0, sizeof(*m));
    assert_int_equal(tree_shape_init(&m->s, size), 0);
    for (unsigned k = 0; k <= m->s.levels; k++) {
        m->lv[k] = malloc(m->s.count[k] * 32 + 32);
        assert_non_null(m->lv[k]);
    }
    if (m->s.blocks)
        memcpy(m->lv[0], leaves, m->s.blocks * 32);
    for (unsigned k = 1; k <= m->s.levels; k++) {
        for (uint64_t i = 0; i < m->s.count[k]; i++) {
            uint64_t first;
            size_t n;
            tree_children(&m->s, k, i, &first, &n);
            tree_node_digest(k, m->lv[k - 1] + first * 32, n,
                             m->lv[k] + i * 32);
        }
    }
}

static void naive_free(struct naive *m)
{
    for (unsigned k = 0; k <= TREE_MAX_LEVELS; k++)
        free(m->lv[k]);
    memset(m, 0, sizeof(*m));
}

/* Leaves of a view of size bytes: zero blocks, and data where
 * (i * 7 + seed) % every == 0. */
static uint8_t *make_leaves(uint64_t size, unsigned seed, unsigned every)
{
    struct tree_shape s;
    assert_int_equal(tree_shape_init(&s, size), 0);
    uint8_t *l = malloc(s.blocks * 32 + 32);
    assert_non_null(l);
    for (uint64_t i = 0; i < s.blocks; i++) {
        if ((i * 7 + seed) % every == 0) {
            char t[64];
            snprintf(t, sizeof(t), "%u/%llu", seed, (unsigned long long)i);
            sha_of(t, l + i * 32);
        } else {
            tree_zero(&s, 0, i, l + i * 32);
        }
    }
    return l;
}

struct wctx {
    struct tree_writer tw;
    uint64_t nrec;
};

static int put_rec(void *opaque, unsigned k, uint64_t i, const uint8_t d[32])
{
    struct wctx *w = opaque;
    w->nrec++;
    return tree_writer_record(&w->tw, k, i, d);
}

/*
 * Write `name`: the tree of `leaves` (a view of size bytes) over the base
 * view (NULL: the all-zeroes tree), given the leaves that differ from
 * old_leaves (NULL: from zero blocks) and touches at base_blocks - 1 and
 * blocks - 1 when the size changed.  Returns the root in root.
 */
static void write_tree(const char *name, uint64_t size, const uint8_t *leaves,
                       struct tree_view *base, const uint8_t *old_leaves,
                       uint64_t old_blocks, const uint8_t parent_root[32],
                       uint8_t root[32], uint64_t *nrec)
{
    struct tree_shape s;
    assert_int_equal(tree_shape_init(&s, size), 0);
    char *p = tpath(name);
    struct wctx w = {0};
    struct cbt_error *err = NULL;
    assert_int_equal(tree_writer_open(&w.tw, p, &s, parent_root, &err), 0);
    struct tree_builder b;
    assert_int_equal(tree_builder_init(&b, &s, base, put_rec, NULL, &w), 0);
    bool resized = old_leaves && old_blocks != s.blocks;
    for (uint64_t i = 0; i < s.blocks; i++) {
        uint8_t z[32];
        const uint8_t *old = NULL;
        if (old_leaves && i < old_blocks)
            old = old_leaves + i * 32;
        if (!old) {
            tree_zero(&s, 0, i, z);
            old = z;
        }
        bool touch = resized && (i + 1 == old_blocks || i + 1 == s.blocks);
        if (memcmp(old, leaves + i * 32, 32) != 0)
            assert_int_equal(tree_builder_leaf(&b, i, leaves + i * 32), 0);
        else if (touch)
            assert_int_equal(tree_builder_leaf(&b, i, NULL), 0);
    }
    assert_int_equal(tree_builder_finish(&b, root), 0);
    tree_builder_free(&b);
    char hex[65];
    assert_int_equal(tree_writer_finish(&w.tw, root, hex, &err), 0);
    tree_writer_abort(&w.tw);
    if (nrec)
        *nrec = w.nrec;
    free(p);
}

static void open_file(struct tree_file *f, const char *name, uint64_t size)
{
    char *p = tpath(name);
    struct cbt_error *err = NULL;
    char hex[65];
    int r = tree_file_open(f, p, DIV_ROUND_UP(size, 65536), hex, &err);
    if (r < 0)
        fail_msg("%s", cbt_error_message(err));
    free(p);
}

/* The view of files over a view of size bytes equals the model node for
 * node, and passes the check with the model's root. */
static void expect_view(struct tree_file **files, size_t n, uint64_t size,
                        const struct naive *m)
{
    struct tree_view v;
    assert_int_equal(tree_view_open(&v, size, files, n), 0);
    uint8_t buf[TREE_FANOUT * 32];
    for (unsigned k = 0; k <= m->s.levels; k++) {
        for (uint64_t i = 0; i < m->s.count[k]; i += TREE_FANOUT) {
            uint64_t c = MIN((uint64_t)TREE_FANOUT, m->s.count[k] - i);
            assert_int_equal(tree_view_get(&v, k, i, c, buf, NULL), 0);
            assert_memory_equal(buf, m->lv[k] + i * 32, c * 32);
        }
    }
    struct cbt_error *err = NULL;
    int r = tree_view_check(&v, m->lv[m->s.levels], &err);
    if (r < 0)
        fail_msg("%s", cbt_error_message(err));
    tree_view_close(&v);
}

/* Nodes of b that differ from a (same shape). */
static uint64_t diff_nodes(const struct naive *a, const struct naive *b)
{
    uint64_t n = 0;
    for (unsigned k = 0; k <= b->s.levels; k++)
        for (uint64_t i = 0; i < b->s.count[k]; i++) {
            uint8_t z[32];
            const uint8_t *old = z;
            if (a)
                old = a->lv[k] + i * 32;
            else
                tree_zero(&b->s, k, i, z);
            n += memcmp(old, b->lv[k] + i * 32, 32) != 0;
        }
    return n;
}

/* keep: the resized view keeps every block but the old last one and
 * has no data past it, so only the resize changes the edge nodes. */
static void chain_case(uint64_t size, uint64_t size2, bool keep)
{
    uint8_t root1[32], root2[32], root3[32], zeroes[32] = {0};
    uint64_t nrec;
    /* Full backup. */
    uint8_t *a = make_leaves(size, 1, 5);
    struct naive ma;
    naive_build(&ma, size, a);
    write_tree("f1", size, a, NULL, NULL, 0, zeroes, root1, &nrec);
    assert_memory_equal(root1, ma.lv[ma.s.levels], 32);
    assert_int_equal(nrec, diff_nodes(NULL, &ma));
    struct tree_file f1, f2, f3, f4;
    open_file(&f1, "f1", size);
    assert_int_equal(f1.info.nrec, nrec);
    assert_memory_equal(f1.info.root, root1, 32);
    struct tree_file *c1[] = {&f1};
    expect_view(c1, 1, size, &ma);

    /* Incremental: some blocks rewritten, some zeroed. */
    uint8_t *bl = make_leaves(size, 1, 5);
    uint8_t *other = make_leaves(size, 2, 11);
    struct tree_shape s;
    assert_int_equal(tree_shape_init(&s, size), 0);
    for (uint64_t i = 0; i < s.blocks; i++) {
        if (i % 13 == 3)
            memcpy(bl + i * 32, other + i * 32, 32);
        if (i % 17 == 4)
            tree_zero(&s, 0, i, bl + i * 32);
    }
    struct naive mb;
    naive_build(&mb, size, bl);
    struct tree_view base;
    assert_int_equal(tree_view_open(&base, size, c1, 1), 0);
    write_tree("f2", size, bl, &base, a, s.blocks, root1, root2, &nrec);
    tree_view_close(&base);
    assert_memory_equal(root2, mb.lv[mb.s.levels], 32);
    assert_int_equal(nrec, diff_nodes(&ma, &mb));
    open_file(&f2, "f2", size);
    assert_memory_equal(f2.info.parent_root, root1, 32);
    struct tree_file *c2[] = {&f2, &f1};
    expect_view(c2, 2, size, &mb);

    /* Prune: f1 folded into f2. */
    char *p3 = tpath("f3");
    struct cbt_error *err = NULL;
    char hex[65];
    struct tree_file *fold[] = {&f2, &f1};
    assert_int_equal(tree_merge(fold, 2, size, true, zeroes, p3, hex, &err),
                     0);
    free(p3);
    open_file(&f3, "f3", size);
    assert_memory_equal(f3.info.root, root2, 32);
    assert_memory_equal(f3.info.parent_root, zeroes, 32);
    struct tree_file *c3[] = {&f3};
    expect_view(c3, 1, size, &mb);

    /* Resized incremental over f2 <- f1. */
    uint8_t *cl = make_leaves(size2, 3, keep ? 1000000007u : 9);
    struct tree_shape s2;
    assert_int_equal(tree_shape_init(&s2, size2), 0);
    for (uint64_t i = 0; i + 1 < MIN(s.blocks, s2.blocks); i++)
        if (keep || i % 4)
            memcpy(cl + i * 32, bl + i * 32, 32);
    struct naive mc;
    naive_build(&mc, size2, cl);
    assert_int_equal(tree_view_open(&base, size2, c2, 2), 0);
    write_tree("f4", size2, cl, &base, bl, s.blocks, root2, root3, NULL);
    tree_view_close(&base);
    assert_memory_equal(root3, mc.lv[mc.s.levels], 32);
    open_file(&f4, "f4", size2);
    struct tree_file *c4[] = {&f4, &f2, &f1};
    expect_view(c4, 3, size2, &mc);
    /* Prune of two points at once, across the resize. */
    struct tree_file f5;
    char *p5 = tpath("f5");
    assert_int_equal(tree_merge(c4, 3, size2, true, zeroes, p5, hex, &err),
                     0);
    free(p5);
    open_file(&f5, "f5", size2);
    /* Only the nodes that are not zeroes are left. */
    assert_int_equal(f5.info.nrec, diff_nodes(NULL, &mc));
    struct tree_file *c5[] = {&f5};
    expect_view(c5, 1, size2, &mc);
    tree_file_close(&f5);

    tree_file_close(&f1);
    tree_file_close(&f2);
    tree_file_close(&f3);
    tree_file_close(&f4);
    naive_free(&ma);
    naive_free(&mb);
    naive_free(&mc);
    free(a);
    free(bl);
    free(other);
    free(cl);
    const char *names[] = {"f1", "f2", "f3", "f4", "f5"};
    for (size_t j = 0; j < ARRAY_SIZE(names); j++) {
        char *p = tpath(names[j]);
        unlink(p);
        free(p);
    }
}

static void test_chain(void **state)
{
    (void)state;
    chain_case(300ull * 65536 + 7, 300ull * 65536 + 7, false); /* 2 levels */
    chain_case(256ull * 65536, 700ull * 65536 + 1, false);     /* grow */
    chain_case(70000ull * 65536 + 3, 1000ull * 65536, false);  /* shrink */
    chain_case(65536, 65536 * 2, false);                       /* one block */
    chain_case(0, 100, false);
    chain_case(300ull * 65536, 600ull * 65536, true);
    chain_case(600ull * 65536, 300ull * 65536, true);
    chain_case(300ull * 65536, 70000ull * 65536, true);
}

/* ---- damage ---- */

static uint8_t *read_whole(const char *name, size_t *len)
{
    char *p = tpath(name);
    FILE *f = fopen(p, "rb");
    assert_non_null(f);
    fseek(f, 0, SEEK_END);
    *len = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *b = malloc(*len);
    assert_int_equal(fread(b, 1, *len, f), *len);
    fclose(f);
    free(p);
    return b;
}

static void write_whole(const char *name, const uint8_t *b, size_t len)
{
    char *p = tpath(name);
    FILE *f = fopen(p, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(b, 1, len, f), len);
    fclose(f);
    free(p);
}

static void expect_refused(const uint8_t *b, size_t len, uint64_t blocks,
                           const char *want)
{
    struct tree_file_info info;
    struct cbt_error *err = NULL;
    assert_int_equal(tree_file_parse(b, len, blocks, "t", &info, &err), -1);
    const char *msg = cbt_error_message(err);
    if (!strstr(msg, want))
        fail_msg("'%s' lacks '%s'", msg, want);
    cbt_error_free(err);
}

static void test_damage(void **state)
{
    (void)state;
    uint64_t size = 600ull * 65536;
    uint8_t root[32], zeroes[32] = {0};
    uint8_t *a = make_leaves(size, 1, 3);
    write_tree("d", size, a, NULL, NULL, 0, zeroes, root, NULL);
    size_t len;
    uint8_t *good = read_whole("d", &len);
    uint8_t *b = malloc(len);
    struct tree_file_info info;
    struct cbt_error *err = NULL;
    assert_int_equal(tree_file_parse(good, len, 600, "t", &info, &err), 0);
    assert_int_equal(info.levels, 2);
    assert_true(info.nrec > 4);

    expect_refused(good, 10, 600, "shorter than a header");
    expect_refused(good, len - 1, 600, "whole 41-byte records");
    expect_refused(good, len, 601, "its manifest says 601");
    memcpy(b, good, len);
    b[0] = 'X';
    expect_refused(b, len, 600, "CBTTREE2");
    memcpy(b, good, len);
    b[12] = 16;
    expect_refused(b, len, 600, "fan-out");
    memcpy(b, good, len);
    b[24] = 3;
    expect_refused(b, len, 600, "levels");
    /* Two records swapped: out of order. */
    memcpy(b, good, len);
    memcpy(b + 64, good + 64 + 41, 41);
    memcpy(b + 64 + 41, good + 64, 41);
    expect_refused(b, len, 600, "out of order");
    /* A leaf index past the disk. */
    memcpy(b, good, len);
    stle64(b + 64 + 1 + 41 * 3, 600);
    expect_refused(b, len, 600, "node 600 of level 0, which has 600");
    memcpy(b, good, len);
    b[64 + 41 * 2] = 7;
    expect_refused(b, len, 600, "at level 7");
    memcpy(b, good, len);
    b[len - 40] ^= 1;
    expect_refused(b, len, 600, "trailer counts");
    memcpy(b, good, len);
    b[len - 1] ^= 1;
    expect_refused(b, len, 600, "root record and its trailer's root differ");

    /* Well formed, but a level-1 record that is not its children's
     * digest: the check names the file and the node. */
    memcpy(b, good, len);
    uint64_t r1 = info.level_first[1];
    b[64 + r1 * 41 + 20] ^= 1;
    write_whole("d-bad", b, len);
    struct tree_file f;
    open_file(&f, "d-bad", size);
    struct tree_file *fs[] = {&f};
    struct tree_view v;
    assert_int_equal(tree_view_open(&v, size, fs, 1), 0);
    assert_int_equal(tree_view_check(&v, root, &err), -1);
    assert_non_null(strstr(cbt_error_message(err), "d-bad"));
    assert_non_null(strstr(cbt_error_message(err), "of level 1"));
    assert_int_equal(cbt_error_kind(err), CBT_ERR_CORRUPT);
    cbt_error_free(err);
    err = NULL;
    tree_view_close(&v);
    tree_file_close(&f);

    /* A leaf changed: the root no longer recomputes. */
    memcpy(b, good, len);
    b[64 + 41 * 1 + 20] ^= 1;
    write_whole("d-leaf", b, len);
    open_file(&f, "d-leaf", size);
    fs[0] = &f;
    assert_int_equal(tree_view_open(&v, size, fs, 1), 0);
    assert_int_equal(tree_view_check(&v, root, &err), -1);
    assert_non_null(strstr(cbt_error_message(err), "d-leaf"));
    cbt_error_free(err);
    err = NULL;
    tree_view_close(&v);
    tree_file_close(&f);

    /* A record removed from the middle (count fixed): a node above it no
     * longer matches. */
    size_t l2 = len - 41;
    memcpy(b, good, 64 + 41);
    memcpy(b + 64 + 41, good + 64 + 82, len - 64 - 82);
    stle64(b + l2 - 40, info.nrec - 1);
    write_whole("d-gone", b, l2);
    open_file(&f, "d-gone", size);
    fs[0] = &f;
    assert_int_equal(tree_view_open(&v, size, fs, 1), 0);
    assert_int_equal(tree_view_check(&v, root, &err), -1);
    cbt_error_free(err);
    tree_view_close(&v);
    tree_file_close(&f);
    free(a);
    free(b);
    free(good);
}

/* ---- the cost of a scan ---- */

/* Read system calls this process made so far (/proc/self/io's syscr). */
static uint64_t read_calls(void)
{
    FILE *f = fopen("/proc/self/io", "r");
    assert_non_null(f);
    char line[128];
    unsigned long long n = 0;
    bool found = false;
    while (fgets(line, sizeof(line), f))
        if (sscanf(line, "syscr: %llu", &n) == 1)
            found = true;
    fclose(f);
    if (!found)
        fail_msg("/proc/self/io has no syscr line");
    return n;
}

/* A scan of a level in order (tree_view_next from each index + 1, as
 * tree_view_check walks a view's leaves) reads each of its records
 * once, a buffer at a time: not a binary search over the file each time
 * a buffer runs out.  And it sees every record, in order. */
static void test_scan_reads_in_order(void **state)
{
    (void)state;
    uint64_t size = 20000ull * 65536; /* 40 buffers of level-0 records */
    uint8_t *a = make_leaves(size, 4, 1);
    uint8_t root[32], zeroes[32] = {0};
    write_tree("scan", size, a, NULL, NULL, 0, zeroes, root, NULL);
    struct tree_file f;
    open_file(&f, "scan", size);
    struct tree_file *c[] = {&f};
    struct tree_view v;
    assert_int_equal(tree_view_open(&v, size, c, 1), 0);
    uint64_t before = read_calls(), from = 0, idx, seen = 0;
    uint8_t d[32];
    int r;
    while ((r = tree_view_next(&v, 0, from, &idx, d, NULL)) > 0) {
        assert_int_equal(idx, seen);
        assert_memory_equal(d, a + idx * 32, 32);
        seen++;
        from = idx + 1;
    }
    uint64_t calls = read_calls() - before;
    assert_int_equal(r, 0);
    assert_int_equal(seen, 20000);
    /* 40 buffers, the level's last index, the first seek's binary search
     * (15 steps) and /proc/self/io itself; 416 when every buffer's end
     * began a binary search. */
    if (calls > 20000 / 512 + 1 + 1 + 15 + 3)
        fail_msg("a scan of 20000 records made %llu read calls",
                 (unsigned long long)calls);
    tree_view_close(&v);
    tree_file_close(&f);
    free(a);
    char *p = tpath("scan");
    unlink(p);
    free(p);
}

static int setup(void **state)
{
    (void)state;
    return tmpdir_make(tmpdir, "hashtree");
}

static int teardown(void **state)
{
    (void)state;
    return tmpdir_remove(tmpdir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_zero_roots),
        cmocka_unit_test(test_small_root),
        cmocka_unit_test(test_chain),
        cmocka_unit_test(test_damage),
        cmocka_unit_test(test_scan_reads_in_order),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
