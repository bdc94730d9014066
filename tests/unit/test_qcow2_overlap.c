/*
 * The qcow2 metadata map (src/formats/qcow2/overlap.c) against a naive
 * model: the answer for a range is recomputed by walking every structure
 * of the state (what QEMU's qcow2_check_metadata_overlap does), and must
 * equal the map's, after random writes that allocate L2 tables and
 * refcount blocks (kept up to date one by one), bitmap stores and an L1
 * table that moves (rebuilt), for several cluster sizes:
 *
 *  - random ranges, cluster-aligned and not, with random kinds ignored;
 *  - every cluster the model says is metadata is found by the map;
 *  - a write through the data path that would land on metadata (an L2
 *    entry pointed at the refcount table) is refused, the image marked
 *    corrupt, and later writes fail too.
 *
 * CBT_TEST_SEED=N picks the random seed.
 */
#include <errno.h>
#include <inttypes.h>
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

#include <cbt/bitmap.h>
#include <cbt/image.h>

#include "formats/qcow2/qcow2.h"
#include "tmpdir.h"

#define N_OF(a) (sizeof(a) / sizeof((a)[0]))

static uint64_t seed;

static uint64_t rnd(void)
{
    seed ^= seed << 13;
    seed ^= seed >> 7;
    seed ^= seed << 17;
    return seed;
}

struct cfg {
    const char *name;
    uint64_t cluster_size;
    uint64_t size;
};

static const struct cfg cfgs[] = {
    { "c512", 512, 8 << 20 },
    { "c4k", 4096, 64 << 20 },
    { "c64k", 65536, 256 << 20 },
};

static char dir[TMPDIR_PATH_MAX];

static int setup(void **state)
{
    (void)state;
    return tmpdir_make(dir, "overlap");
}

static int teardown(void **state)
{
    (void)state;
    return tmpdir_remove(dir);
}

static struct cbt_image *make(const struct cfg *c, const char *name)
{
    char file[128];
    snprintf(file, sizeof(file), "%s.qcow2", name);
    const char *path = tmpdir_path(dir, file);
    struct cbt_create_opts o = {
        .struct_size = sizeof(struct cbt_create_opts),
        .format = "qcow2",
        .size = c->size,
        .size_given = true,
        .cluster_size = c->cluster_size,
    };
    struct cbt_error *err = NULL;
    if (cbt_image_create(path, &o, &err) < 0)
        fail_msg("create: %s", cbt_error_message(err));
    struct cbt_image *img = cbt_image_open(path, NULL, CBT_OPEN_RDWR, &err);
    if (!img)
        fail_msg("open: %s", cbt_error_message(err));
    return img;
}

static bool touches(const struct qcow2_state *s, uint64_t a, uint64_t b,
                    uint64_t off, uint64_t len)
{
    if (len == 0)
        return false;
    uint64_t first = off >> s->cluster_bits;
    uint64_t end = ((off + len - 1) >> s->cluster_bits) + 1;
    return first < b && a < end;
}

/* QEMU's way: every structure, one by one. */
static unsigned naive(struct qcow2_state *s, uint64_t off, uint64_t len,
                      unsigned ign)
{
    uint64_t a = off >> s->cluster_bits;
    uint64_t b = ((off + len - 1) >> s->cluster_bits) + 1;
    unsigned hit = 0;
#define T(o, l, k)                                       \
    if (!((k) & ign) && touches(s, a, b, (o), (l)))       \
        hit |= (k);
    T(0, s->cluster_size, QCOW2_OL_HEADER);
    T(s->h.l1_table_offset, (uint64_t)s->l1_size * 8, QCOW2_OL_ACTIVE_L1);
    T(s->h.refcount_table_offset, s->reftable_entries * 8,
      QCOW2_OL_REFCOUNT_TABLE);
    for (uint32_t i = 0; i < s->l1_size; i++) {
        uint64_t l2 = s->l1[i] & QCOW2_L1E_OFFSET_MASK;
        if (l2)
            T(l2, s->cluster_size, QCOW2_OL_ACTIVE_L2);
    }
    for (uint64_t i = 0; i < s->reftable_entries; i++) {
        uint64_t rb = s->reftable[i] & QCOW2_REFT_OFFSET_MASK;
        if (rb)
            T(rb, s->cluster_size, QCOW2_OL_REFCOUNT_BLOCK);
    }
    if (s->bm_ext.present && s->bm_ext.len == QCOW2_BITMAPS_EXT_SIZE)
        T(s->bm_ext.dir_offset, s->bm_ext.dir_size, QCOW2_OL_BITMAP_DIR);
    for (uint32_t i = 0; i < s->bm_dir_n; i++) {
        const struct qcow2_bitmap_dirent *d = &s->bm_dir[i];
        T(d->table_offset, (uint64_t)d->table_size * 8, QCOW2_OL_BITMAP_TABLE);
        uint64_t *t = malloc((size_t)d->table_size * 8);
        assert_non_null(t);
        assert_int_equal(pread(s->node->fd, t, (size_t)d->table_size * 8,
                               (off_t)d->table_offset),
                         (ssize_t)d->table_size * 8);
        for (uint32_t k = 0; k < d->table_size; k++) {
            uint64_t e = __builtin_bswap64(t[k]) & QCOW2_BME_TABLE_OFFSET_MASK;
            if (e)
                T(e, s->cluster_size, QCOW2_OL_BITMAP_DATA);
        }
        free(t);
    }
#undef T
    return hit & -hit;
}

static void compare(struct qcow2_state *s, int rounds)
{
    if (!s->meta.valid)
        assert_int_equal(qcow2_meta_rebuild(s), 0);
    uint64_t file_clusters = s->alloc_end + 4;
    for (int i = 0; i < rounds; i++) {
        uint64_t off = (rnd() % file_clusters) << s->cluster_bits;
        if (rnd() % 2)
            off += rnd() % s->cluster_size;
        uint64_t len = 1 + rnd() % (3 * s->cluster_size);
        unsigned ign = rnd() % 4 ? 0 : (unsigned)(rnd() & 0x7FF);
        unsigned want = naive(s, off, len, ign);
        unsigned got = qcow2_meta_overlap(s, off, len, ign);
        if (got != want)
            fail_msg("[0x%" PRIx64 ", +%" PRIu64 ") ign 0x%x: map 0x%x, "
                     "model 0x%x", off, len, ign, got, want);
    }
    /* Every metadata cluster, one by one. */
    for (uint64_t c = 0; c < file_clusters; c++) {
        uint64_t off = c << s->cluster_bits;
        assert_int_equal(qcow2_meta_overlap(s, off, 1, 0),
                         naive(s, off, 1, 0));
    }
}

static void random_writes(struct cbt_image *img, uint64_t size, int n)
{
    uint8_t buf[8192];
    memset(buf, 0x5a, sizeof(buf));
    for (int i = 0; i < n; i++) {
        uint64_t len = 1 + rnd() % sizeof(buf);
        uint64_t off = rnd() % (size - len);
        assert_int_equal(cbt_image_pwrite(img, buf, len, off), 0);
    }
}

static void test_map(void **state)
{
    const struct cfg *c = *state;
    struct cbt_image *img = make(c, c->name);
    struct qcow2_state *s = qcow2_state(img);
    struct cbt_error *err = NULL;
    for (int round = 0; round < 4; round++) {
        random_writes(img, c->size, 200);
        compare(s, 2000);
        /* A bitmap store moves the directory and tables. */
        char name[16];
        snprintf(name, sizeof(name), "b%d", round);
        if (cbt_bitmap_add(img, name, 0, false, &err) < 0 ||
            cbt_bitmap_commit(img, &err) < 0)
            fail_msg("bitmap: %s", cbt_error_message(err));
        random_writes(img, c->size, 50);
        compare(s, 2000);
    }
    /* Growing moves the L1 table (and stores the bitmaps again). */
    if (cbt_image_resize(img, c->size * 64, false, &err) < 0)
        fail_msg("resize: %s", cbt_error_message(err));
    random_writes(img, c->size * 64, 200);
    compare(s, 4000);
    if (cbt_image_close(img, &err) < 0)
        fail_msg("close: %s", cbt_error_message(err));
}

/* An L2 entry pointed at the refcount table: the write is refused and the
 * image takes no more writes. */
static void test_refused(void **state)
{
    (void)state;
    const struct cfg *c = &cfgs[2];
    struct cbt_image *img = make(c, "refused");
    struct qcow2_state *s = qcow2_state(img);
    uint8_t buf[4096];
    memset(buf, 0x11, sizeof(buf));
    assert_int_equal(cbt_image_pwrite(img, buf, sizeof(buf), 0), 0);
    assert_int_equal(cbt_image_flush(img), 0);
    uint8_t *l2;
    uint64_t idx;
    assert_int_equal(qcow2_get_l2(s, 0, false, &l2, &idx), 0);
    qcow2_l2_set(s, l2, idx, s->h.refcount_table_offset | QCOW2_OFLAG_COPIED,
                 0);
    qcow2_cache_put(&s->l2_cache, l2);
    uint8_t before[512];
    assert_int_equal(pread(img->fd, before, sizeof(before),
                           (off_t)s->h.refcount_table_offset),
                     (ssize_t)sizeof(before));
    assert_int_equal(cbt_image_pwrite(img, buf, sizeof(buf), 0), -EIO);
    assert_true(s->corrupt);
    assert_non_null(strstr(s->corrupt_msg, "refcount table"));
    uint8_t after[512];
    assert_int_equal(pread(img->fd, after, sizeof(after),
                           (off_t)s->h.refcount_table_offset),
                     (ssize_t)sizeof(after));
    assert_memory_equal(before, after, sizeof(before));
    /* Elsewhere too, and flushes. */
    assert_int_equal(cbt_image_pwrite(img, buf, sizeof(buf), 8 << 20), -EIO);
    assert_int_equal(cbt_image_flush(img), -EIO);
    uint8_t hdr[8];
    assert_int_equal(pread(img->fd, hdr, 8, 72), 8);
    assert_true(hdr[7] & QCOW2_INCOMPAT_CORRUPT);
    struct cbt_error *err = NULL;
    assert_int_equal(cbt_image_close(img, &err), -1);
    assert_non_null(strstr(cbt_error_message(err), "marked corrupt"));
    assert_int_equal(cbt_error_kind(err), CBT_ERR_CORRUPT);
    cbt_error_free(err);
}

int main(void)
{
    const char *env = getenv("CBT_TEST_SEED");
    seed = env ? strtoull(env, NULL, 0) : 0x0e71a95eedull;
    print_message("qcow2_overlap: CBT_TEST_SEED=0x%" PRIx64 "\n", seed);
    struct CMUnitTest tests[N_OF(cfgs) + 1];
    size_t k = 0;
    for (size_t i = 0; i < N_OF(cfgs); i++)
        tests[k++] = (struct CMUnitTest){ .name = cfgs[i].name,
                                          .test_func = test_map,
                                          .initial_state = (void *)&cfgs[i] };
    tests[k++] = (struct CMUnitTest){ .name = "refused",
                                      .test_func = test_refused };
    return _cmocka_run_group_tests("qcow2_overlap", tests, k, setup, teardown);
}
