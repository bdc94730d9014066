/*
 * qcow2 compressed-cluster writing and make_empty, through the library,
 * against a byte model of the guest view:
 *
 *  - round trips for cluster sizes 512 B..2 MiB, zlib and zstd, standard
 *    and extended L2, v2 and v3, refcount widths down to 1 bit: compressible
 *    clusters are stored compressed, incompressible ones normally, a short
 *    tail cluster is padded; block status says which; the data survives a
 *    reopen and check counts the compressed clusters;
 *  - packing: many small compressed clusters share host clusters (never more
 *    sharers than the refcount width allows), each host cluster's refcount
 *    equals the number of compressed clusters touching it; freeing them one
 *    by one in random order (normal writes, compressed rewrites, zero writes,
 *    discards) keeps check clean at every step and ends with nothing
 *    allocated;
 *  - random mixes of compressed writes, normal writes, zero writes and
 *    discards, over a backing file too, equal the model;
 *  - make_empty over images holding every kind of entry: reads come from the
 *    backing image again, nothing is left allocated or leaked;
 *  - refusals: external data files, misaligned requests, raw images.
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
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include <cbt/image.h>

#include "block/block.h"
#include "formats/qcow2/qcow2.h"
#include "tmpdir.h"

#define KiB 1024ull
#define MiB (1024ull * 1024)

static char tmpdir[TMPDIR_PATH_MAX];
static uint64_t seed = 1;

/* ---- helpers ---- */

static uint64_t rnd64(void)
{
    uint64_t z = (seed += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static uint64_t rnd(uint64_t n)
{
    return n ? rnd64() % n : 0;
}

static char *path_of(const char *name)
{
    return tmpdir_path(tmpdir, name);
}

static void fill_random(uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i += 8) {
        uint64_t v = rnd64();
        memcpy(p + i, &v, MIN(8, n - i));
    }
}

/* Runs of a few random byte values: compresses to a small fraction. */
static void fill_compressible(uint8_t *p, size_t n)
{
    uint8_t v = (uint8_t)rnd64();
    for (size_t i = 0; i < n; i += 64) {
        if (rnd(4) == 0)
            v = (uint8_t)rnd64();
        memset(p + i, v, MIN(64, n - i));
    }
}

enum fill { FILL_COMPRESSIBLE, FILL_RANDOM, FILL_HALF };

static void fill(uint8_t *p, size_t n, enum fill f)
{
    switch (f) {
    case FILL_COMPRESSIBLE:
        fill_compressible(p, n);
        break;
    case FILL_RANDOM:
        fill_random(p, n);
        break;
    case FILL_HALF:
        fill_random(p, n / 2);
        memset(p + n / 2, 0, n - n / 2);
        break;
    }
}

struct img_opts {
    uint32_t cluster_size;
    bool ext_l2;
    bool zstd;
    int refcount_bits;
    int compat;
    const char *backing;
    const char *backing_fmt;
    const char *data_file;
    bool data_file_raw;
};

static void create(const char *path, uint64_t size, const struct img_opts *io)
{
    struct cbt_create_opts o = {
        .struct_size = sizeof(struct cbt_create_opts),
        .format = "qcow2",
        .size = size,
        .size_given = true,
        .cluster_size = io->cluster_size,
        .extended_l2 = io->ext_l2,
        .compression_type = io->zstd ? "zstd" : NULL,
        .refcount_bits = io->refcount_bits,
        .compat = io->compat,
        .backing_file = io->backing,
        .backing_format = io->backing_fmt,
        .data_file = io->data_file,
        .data_file_raw = io->data_file_raw,
    };
    struct cbt_error *err = NULL;
    if (cbt_image_create(path, &o, &err) < 0)
        fail_msg("create %s: %s", path, cbt_error_message(err));
}

static struct cbt_image *open_img(const char *path, unsigned flags)
{
    struct cbt_error *err = NULL;
    struct cbt_image *img = cbt_image_open(path, NULL, flags, &err);
    if (!img)
        fail_msg("open %s: %s", path, cbt_error_message(err));
    return img;
}

static void close_img(struct cbt_image *img)
{
    struct cbt_error *err = NULL;
    if (cbt_image_close(img, &err) < 0)
        fail_msg("close: %s", cbt_error_message(err));
}

static void report_cb(void *opaque, const char *msg)
{
    (void)opaque;
    print_message("  check: %s\n", msg);
}

/* cbt check finds nothing wrong; returns the result for the counts. */
static struct cbt_check_result check_clean(const char *path, const char *what)
{
    struct cbt_check_result res;
    struct cbt_error *err = NULL;
    if (cbt_image_check(path, "qcow2", 0, &res, report_cb, NULL, &err) < 0)
        fail_msg("%s: check %s: %s", what, path, cbt_error_message(err));
    if (res.corruptions || res.leaks || res.check_errors)
        fail_msg("%s: check %s: %" PRId64 " corruptions, %" PRId64
                 " leaks, %" PRId64 " errors", what, path, res.corruptions,
                 res.leaks, res.check_errors);
    return res;
}

/* Read the whole image and compare it with the model. */
static void expect_model(struct cbt_image *img, const uint8_t *model,
                         uint64_t size, const char *what)
{
    CLEANUP_FREE uint8_t *buf = malloc(size);
    assert_non_null(buf);
    int r = cbt_image_pread(img, buf, size, 0);
    if (r < 0)
        fail_msg("%s: read: %s", what, strerror(-r));
    for (uint64_t i = 0; i < size; i++)
        if (buf[i] != model[i])
            fail_msg("%s: byte %" PRIu64 " (0x%" PRIx64 ") is 0x%02x, model "
                     "0x%02x", what, i, i, buf[i], model[i]);
}

/* Block-status flags of the top layer at off (one extent). */
static unsigned status_at(struct cbt_image *img, uint64_t off, uint64_t *len)
{
    struct cbt_extent e;
    int r = cbt_image_block_status(img, off, cbt_image_size(img) - off, &e);
    assert_int_equal(r, 0);
    if (len)
        *len = e.length;
    return e.depth == 0 ? e.flags : 0;
}

static bool is_compressed(struct cbt_image *img, uint64_t off)
{
    return status_at(img, off, NULL) & CBT_BS_COMPRESSED;
}

/* ---- round trips ---- */

struct rt_cfg {
    const char *name;
    struct img_opts o;
};

static const struct rt_cfg rt_cfgs[] = {
    { "c512_zlib", { .cluster_size = 512 } },
    { "c512_zstd", { .cluster_size = 512, .zstd = true } },
    { "c4k_zlib_rb1", { .cluster_size = 4096, .refcount_bits = 1 } },
    { "c4k_zstd_rb2", { .cluster_size = 4096, .zstd = true,
                        .refcount_bits = 2 } },
    { "c64k_zlib", { .cluster_size = 65536 } },
    { "c64k_zstd_rb64", { .cluster_size = 65536, .zstd = true,
                          .refcount_bits = 64 } },
    { "c64k_v2", { .cluster_size = 65536, .compat = 2 } },
    { "xl2_c32k_zlib", { .cluster_size = 32768, .ext_l2 = true } },
    { "xl2_c64k_zstd", { .cluster_size = 65536, .ext_l2 = true,
                         .zstd = true } },
    { "c2m_zlib", { .cluster_size = 2 * MiB } },
    { "xl2_c2m_zstd", { .cluster_size = 2 * MiB, .ext_l2 = true,
                        .zstd = true } },
};

/* Clusters: compressible, random, compressible, untouched, half random,
 * compressible, then a short tail (compressible) when cs > 512. */
static void test_round_trip(void **state)
{
    const struct rt_cfg *c = *state;
    uint64_t cs = c->o.cluster_size;
    uint64_t tail = cs > 512 ? cs / 4 + 512 : 0;
    uint64_t size = 6 * cs + tail;
    const char *path = path_of(c->name);
    create(path, size, &c->o);
    uint8_t *model = calloc(1, size);
    assert_non_null(model);
    static const enum fill kinds[] = { FILL_COMPRESSIBLE, FILL_RANDOM,
                                       FILL_COMPRESSIBLE, FILL_COMPRESSIBLE,
                                       FILL_HALF, FILL_COMPRESSIBLE };
    for (int i = 0; i < 6; i++)
        fill(model + i * cs, cs, kinds[i]);
    memset(model + 3 * cs, 0, cs);
    if (tail)
        fill_compressible(model + 6 * cs, tail);

    struct cbt_image *img = open_img(path, CBT_OPEN_RDWR);
    assert_int_equal(cbt_image_pwrite_compressed(img, model, 3 * cs, 0), 0);
    assert_int_equal(cbt_image_pwrite_compressed(img, model + 4 * cs,
                                                 2 * cs + tail, 4 * cs), 0);
    expect_model(img, model, size, c->name);
    for (int pass = 0; pass < 2; pass++) {
        assert_true(is_compressed(img, 0));
        unsigned f = status_at(img, cs, NULL);
        assert_false(f & CBT_BS_COMPRESSED);
        assert_true(f & CBT_BS_DATA);
        assert_true(f & CBT_BS_OFFSET_VALID);
        assert_true(is_compressed(img, 2 * cs));
        assert_false(status_at(img, 3 * cs, NULL) & CBT_BS_PRESENT);
        assert_true(is_compressed(img, 4 * cs));
        assert_true(is_compressed(img, 5 * cs));
        if (tail) {
            uint64_t len;
            assert_true(status_at(img, 6 * cs, &len) & CBT_BS_COMPRESSED);
            assert_int_equal(len, tail);
        }
        close_img(img);
        img = open_img(path, 0);
        expect_model(img, model, size, c->name);
    }
    close_img(img);
    struct cbt_check_result res = check_clean(path, c->name);
    assert_int_equal(res.compressed_clusters, tail ? 5 : 4);
    assert_int_equal(res.allocated_clusters, tail ? 6 : 5);
    free(model);
}

/* ---- packing and freeing ---- */

struct pack_cfg {
    const char *name;
    struct img_opts o;
    int nclusters;
};

static const struct pack_cfg pack_cfgs[] = {
    { "pack_c4k", { .cluster_size = 4096 }, 300 },
    { "pack_c4k_rb2", { .cluster_size = 4096, .refcount_bits = 2 }, 200 },
    { "pack_c64k_zstd", { .cluster_size = 65536, .zstd = true }, 120 },
    { "pack_xl2_c16k", { .cluster_size = 16384, .ext_l2 = true }, 200 },
    { "pack_c512_rb1", { .cluster_size = 512, .refcount_bits = 1 }, 200 },
};

/* Map: host cluster index -> number of compressed guest clusters whose
 * bytes touch it, gathered from the L2 entries. */
static void expect_shared_refcounts(struct cbt_image *img, int n,
                                    int *max_sharers)
{
    struct qcow2_state *s = qcow2_state(img);
    uint64_t cs = s->cluster_size;
    size_t cap = (size_t)s->alloc_end + 1;
    uint32_t *users = calloc(cap, sizeof(*users));
    assert_non_null(users);
    for (int i = 0; i < n; i++) {
        uint64_t bytes = cs;
        struct qcow2_map m;
        assert_int_equal(qcow2_get_mapping(s, (uint64_t)i * cs, &bytes, &m), 0);
        if (m.type != QCOW2_SC_COMPRESSED)
            continue;
        uint64_t off, len;
        qcow2_compressed_span(s, m.l2e, &off, &len);
        for (uint64_t h = off >> s->cluster_bits;
             h <= (off + len - 1) >> s->cluster_bits; h++) {
            assert_true(h < cap);
            users[h]++;
        }
    }
    *max_sharers = 0;
    for (size_t h = 0; h < cap; h++) {
        if (!users[h])
            continue;
        uint64_t rc;
        assert_int_equal(qcow2_get_refcount(s, h, &rc), 0);
        if (rc != users[h])
            fail_msg("host cluster %zu: refcount %" PRIu64 ", %u compressed "
                     "clusters touch it", h, rc, users[h]);
        *max_sharers = MAX(*max_sharers, (int)users[h]);
    }
    free(users);
}

static void test_pack_and_free(void **state)
{
    const struct pack_cfg *c = *state;
    uint64_t cs = c->o.cluster_size;
    int n = c->nclusters;
    uint64_t size = (uint64_t)n * cs;
    const char *path = path_of(c->name);
    create(path, size, &c->o);
    uint8_t *model = malloc(size);
    CLEANUP_FREE uint8_t *buf = malloc(cs);
    assert_non_null(model);
    assert_non_null(buf);
    fill_compressible(model, size);
    struct cbt_image *img = open_img(path, CBT_OPEN_RDWR);
    /* One call per cluster: each is packed after the previous one. */
    for (int i = 0; i < n; i++)
        assert_int_equal(cbt_image_pwrite_compressed(
                             img, model + (uint64_t)i * cs, cs,
                             (uint64_t)i * cs), 0);
    assert_int_equal(cbt_image_flush(img), 0);
    expect_model(img, model, size, c->name);
    int max_sharers;
    expect_shared_refcounts(img, n, &max_sharers);
    uint64_t rmax = c->o.refcount_bits ? (1ull << c->o.refcount_bits) - 1
                                       : 65535;
    assert_true((uint64_t)max_sharers <= rmax);
    if (rmax > 1)
        assert_true(max_sharers > 1); /* they do share */
    struct cbt_check_result res = check_clean(path, c->name);
    assert_int_equal(res.compressed_clusters, n);

    /* Free them one by one in random order. */
    int *order = malloc((size_t)n * sizeof(*order));
    assert_non_null(order);
    for (int i = 0; i < n; i++)
        order[i] = i;
    for (int i = n - 1; i > 0; i--) {
        int j = (int)rnd((uint64_t)i + 1), t = order[i];
        order[i] = order[j];
        order[j] = t;
    }
    int still_compressed = n;
    for (int k = 0; k < n; k++) {
        uint64_t off = (uint64_t)order[k] * cs;
        uint8_t *m = model + off;
        int r = 0;
        switch (rnd(6)) {
        case 0: /* partial normal write: copy-on-write of the rest */
            fill_random(buf, cs / 2);
            r = cbt_image_pwrite(img, buf, cs / 2, off + cs / 4);
            memcpy(m + cs / 4, buf, cs / 2);
            break;
        case 1: /* compressed rewrite that does not shrink */
            fill_random(m, cs);
            r = cbt_image_pwrite_compressed(img, m, cs, off);
            break;
        case 2:
            r = cbt_image_pwrite_zeroes(img, off, cs, 0);
            memset(m, 0, cs);
            break;
        case 3:
            r = cbt_image_pwrite_zeroes(img, off, cs, CBT_ZERO_MAY_UNMAP);
            memset(m, 0, cs);
            break;
        case 4:
            r = cbt_image_discard(img, off, cs);
            memset(m, 0, cs);
            break;
        default: /* a new compressed cluster replaces the old one */
            fill_compressible(m, cs);
            r = cbt_image_pwrite_compressed(img, m, cs, off);
            still_compressed++;
            break;
        }
        assert_int_equal(r, 0);
        still_compressed--;
        assert_int_equal(cbt_image_flush(img), 0);
        if (k % 16 == 0 || k == n - 1) {
            res = check_clean(path, c->name);
            assert_int_equal(res.compressed_clusters, still_compressed);
            expect_shared_refcounts(img, n, &max_sharers);
        }
    }
    expect_model(img, model, size, c->name);
    /* The last sharers are gone too: discard all, nothing stays allocated. */
    assert_int_equal(cbt_image_discard(img, 0, size), 0);
    close_img(img);
    res = check_clean(path, c->name);
    assert_int_equal(res.compressed_clusters, 0);
    assert_int_equal(res.allocated_clusters, 0);
    free(order);
    free(model);
}

/* A host cluster whose compressed data was all freed may go to a normal
 * cluster next; later compressed data must not be packed into it. */
static void test_reuse_after_free(void **state)
{
    (void)state;
    uint64_t cs = 4096;
    struct img_opts o = { .cluster_size = (uint32_t)cs };
    const char *path = path_of("reuse.qcow2");
    create(path, 64 * cs, &o);
    uint8_t model[3 * 4096], buf[4096];
    fill_compressible(model, sizeof(model));
    struct cbt_image *img = open_img(path, CBT_OPEN_RDWR);
    assert_int_equal(cbt_image_pwrite_compressed(img, model, cs, 0), 0);
    assert_int_equal(cbt_image_flush(img), 0);
    /* Overwrite it: its host cluster is free after the flush. */
    fill_random(model, cs);
    assert_int_equal(cbt_image_pwrite(img, model, cs, 0), 0);
    assert_int_equal(cbt_image_flush(img), 0);
    /* A normal cluster takes the lowest free cluster: that one. */
    fill_random(model + cs, cs);
    assert_int_equal(cbt_image_pwrite(img, model + cs, cs, cs), 0);
    assert_int_equal(cbt_image_pwrite_compressed(img, model + 2 * cs, cs,
                                                 2 * cs), 0);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(cbt_image_pread(img, buf, cs, (uint64_t)i * cs), 0);
        assert_memory_equal(buf, model + i * cs, cs);
    }
    close_img(img);
    check_clean(path, "reuse");
}

/* ---- random mixes ---- */

struct mix_cfg {
    const char *name;
    struct img_opts o;
    uint64_t size;
    bool backing;
};

static const struct mix_cfg mix_cfgs[] = {
    { "mix_c4k", { .cluster_size = 4096 }, 1 * MiB + 1536, false },
    { "mix_c64k_zstd_backing", { .cluster_size = 65536, .zstd = true },
      4 * MiB + 512, true },
    { "mix_xl2_c32k_backing", { .cluster_size = 32768, .ext_l2 = true },
      3 * MiB + 4096, true },
    { "mix_c512_rb4", { .cluster_size = 512, .refcount_bits = 4 },
      256 * KiB, false },
    { "mix_v2_c4k", { .cluster_size = 4096, .compat = 2 }, 1 * MiB, false },
};

static void test_mix(void **state)
{
    const struct mix_cfg *c = *state;
    uint64_t cs = c->o.cluster_size, size = c->size;
    uint64_t nclusters = DIV_ROUND_UP(size, cs);
    uint8_t *model = calloc(1, size);
    assert_non_null(model);
    struct img_opts o = c->o;
    if (c->backing) {
        const char *base = path_of("mix_base.raw");
        struct cbt_create_opts bo = {.struct_size =
                                         sizeof(struct cbt_create_opts),
                                     .format = "raw",
                                     .size = size,
                                     .size_given = true};
        struct cbt_error *err = NULL;
        if (cbt_image_create(base, &bo, &err) < 0)
            fail_msg("create base: %s", cbt_error_message(err));
        struct cbt_image *b = open_img(base, CBT_OPEN_RDWR);
        fill_random(model, size);
        assert_int_equal(cbt_image_pwrite(b, model, size, 0), 0);
        close_img(b);
        o.backing = base;
        o.backing_fmt = "raw";
    }
    const char *path = path_of(c->name);
    create(path, size, &o);
    struct cbt_image *img = open_img(path, CBT_OPEN_RDWR);
    CLEANUP_FREE uint8_t *buf = malloc(8 * cs);
    assert_non_null(buf);
    bool v2_backing = c->o.compat == 2 && c->backing;
    assert_false(v2_backing); /* discard semantics below assume this */
    for (int op = 0; op < 300; op++) {
        uint64_t first = rnd(nclusters);
        uint64_t n = 1 + rnd(MIN(8, nclusters - first));
        uint64_t off = first * cs, len = MIN(n * cs, size - off);
        int r = 0;
        switch (rnd(6)) {
        case 0:
        case 1: /* compressed, mostly compressible */
            fill(buf, len, rnd(4) ? FILL_COMPRESSIBLE : FILL_RANDOM);
            r = cbt_image_pwrite_compressed(img, buf, len, off);
            memcpy(model + off, buf, len);
            break;
        case 2: { /* normal, unaligned */
            uint64_t o2 = off + rnd(len), l2 = 1 + rnd(len);
            l2 = MIN(l2, size - o2);
            fill_random(buf, l2);
            r = cbt_image_pwrite(img, buf, l2, o2);
            memcpy(model + o2, buf, l2);
            break;
        }
        case 3: { /* zeroes, unaligned */
            uint64_t o2 = off + rnd(len), l2 = 1 + rnd(len);
            l2 = MIN(l2, size - o2);
            r = cbt_image_pwrite_zeroes(img, o2, l2,
                                        rnd(2) ? CBT_ZERO_MAY_UNMAP : 0);
            memset(model + o2, 0, l2);
            break;
        }
        case 4: /* discard whole clusters */
            r = cbt_image_discard(img, off, len);
            memset(model + off, 0, len);
            break;
        default:
            if (rnd(4) == 0) {
                close_img(img);
                check_clean(path, c->name);
                img = open_img(path, CBT_OPEN_RDWR);
            } else {
                r = cbt_image_flush(img);
            }
            break;
        }
        if (r < 0)
            fail_msg("%s: op %d at %" PRIu64 ": %s", c->name, op, off,
                     strerror(-r));
        if (op % 50 == 49)
            expect_model(img, model, size, c->name);
    }
    expect_model(img, model, size, c->name);
    close_img(img);
    check_clean(path, c->name);
    img = open_img(path, 0);
    expect_model(img, model, size, c->name);
    close_img(img);
    free(model);
}

/* ---- make_empty ---- */

struct me_cfg {
    const char *name;
    struct img_opts o;
    bool data_file;
};

static const struct me_cfg me_cfgs[] = {
    { "empty_c64k", { .cluster_size = 65536 }, false },
    { "empty_c4k_zstd_rb8", { .cluster_size = 4096, .zstd = true,
                              .refcount_bits = 8 }, false },
    { "empty_xl2_c32k", { .cluster_size = 32768, .ext_l2 = true }, false },
    { "empty_v2_c4k", { .cluster_size = 4096, .compat = 2 }, false },
    { "empty_datafile_c64k", { .cluster_size = 65536 }, true },
    { "empty_c512", { .cluster_size = 512 }, false },
};

static void test_make_empty(void **state)
{
    const struct me_cfg *c = *state;
    uint64_t cs = c->o.cluster_size;
    uint64_t size = 64 * cs + (cs > 512 ? 1024 : 0);
    if (size < 512 * KiB)
        size = 512 * KiB + 1024;
    uint64_t nclusters = DIV_ROUND_UP(size, cs);
    const char *base = path_of("me_base.qcow2");
    struct img_opts bo = { .cluster_size = 65536 };
    create(base, size, &bo);
    uint8_t *bmodel = malloc(size);
    uint8_t *model = malloc(size);
    assert_non_null(bmodel);
    assert_non_null(model);
    fill_random(bmodel, size);
    struct cbt_image *b = open_img(base, CBT_OPEN_RDWR);
    assert_int_equal(cbt_image_pwrite(b, bmodel, size, 0), 0);
    close_img(b);

    struct img_opts o = c->o;
    o.backing = base;
    o.backing_fmt = "qcow2";
    if (c->data_file)
        o.data_file = path_of("me_top.data");
    const char *path = path_of(c->name);
    create(path, size, &o);
    struct cbt_image *img = open_img(path, CBT_OPEN_RDWR);
    memcpy(model, bmodel, size);
    CLEANUP_FREE uint8_t *buf = malloc(cs);
    assert_non_null(buf);
    /* Every kind of entry: compressed, normal, zero (allocated and not),
     * discarded, partly written (extended L2). */
    for (uint64_t i = 0; i < nclusters; i++) {
        uint64_t off = i * cs, len = MIN(cs, size - off);
        int r = 0;
        switch (i % 6) {
        case 0:
            if (c->data_file)
                break;
            fill_compressible(buf, len);
            r = cbt_image_pwrite_compressed(img, buf, len, off);
            memcpy(model + off, buf, len);
            break;
        case 1:
            fill_random(buf, len);
            r = cbt_image_pwrite(img, buf, len, off);
            memcpy(model + off, buf, len);
            break;
        case 2:
            fill_random(buf, len);
            r = cbt_image_pwrite(img, buf, len, off);
            if (r == 0)
                r = cbt_image_pwrite_zeroes(img, off, len, 0);
            memset(model + off, 0, len);
            break;
        case 3:
            if (c->o.compat == 2)
                break; /* v2 over a backing file: zeroes need data */
            r = cbt_image_pwrite_zeroes(img, off, len, 0);
            memset(model + off, 0, len);
            break;
        case 4:
            if (c->o.compat == 2)
                break; /* v2 over a backing file: discard does nothing */
            fill_random(buf, len);
            r = cbt_image_pwrite(img, buf, len, off);
            if (r == 0)
                r = cbt_image_discard(img, off, len);
            memset(model + off, 0, len);
            break;
        default: {
            uint64_t part = MIN(len, 512);
            fill_random(buf, part);
            r = cbt_image_pwrite(img, buf, part, off + len - part);
            memcpy(model + off + len - part, buf, part);
            break;
        }
        }
        if (r < 0)
            fail_msg("%s: cluster %" PRIu64 ": %s", c->name, i, strerror(-r));
    }
    expect_model(img, model, size, c->name);
    assert_int_equal(cbt_image_flush(img), 0);
    struct cbt_check_result res = check_clean(path, c->name);
    assert_true(res.allocated_clusters > 0);

    assert_int_equal(blk_make_empty(img), 0);
    expect_model(img, bmodel, size, c->name);
    for (uint64_t off = 0; off < size;) {
        struct cbt_extent e;
        assert_int_equal(cbt_image_block_status(img, off, size - off, &e), 0);
        if (e.depth == 0 && (e.flags & (CBT_BS_PRESENT | CBT_BS_ZERO)))
            fail_msg("%s: %" PRIu64 "+%" PRIu64 " still allocated in the top "
                     "layer (flags 0x%x)", c->name, off, e.length, e.flags);
        off += e.length;
    }
    res = check_clean(path, c->name);
    assert_int_equal(res.allocated_clusters, 0);
    assert_int_equal(res.compressed_clusters, 0);
    /* Still usable: write again over the emptied layer. */
    fill_compressible(buf, cs);
    if (!c->data_file)
        assert_int_equal(cbt_image_pwrite_compressed(img, buf, cs, 0), 0);
    else
        assert_int_equal(cbt_image_pwrite(img, buf, cs, 0), 0);
    memcpy(bmodel, buf, cs);
    close_img(img);
    check_clean(path, c->name);
    img = open_img(path, 0);
    expect_model(img, bmodel, size, c->name);
    close_img(img);
    free(model);
    free(bmodel);
}

/* ---- refusals ---- */

static void test_refusals(void **state)
{
    (void)state;
    uint8_t buf[65536];
    fill_compressible(buf, sizeof(buf));

    /* External data file: no compressed clusters (QEMU: ENOTSUP). */
    struct img_opts o = { .cluster_size = 65536,
                          .data_file = path_of("ref_df.data") };
    create(path_of("ref_df.qcow2"), 1 * MiB, &o);
    struct cbt_image *img = open_img(path_of("ref_df.qcow2"), CBT_OPEN_RDWR);
    assert_int_equal(cbt_image_pwrite_compressed(img, buf, 65536, 0), -ENOTSUP);
    close_img(img);

    /* data-file-raw: make_empty cannot work. */
    struct img_opts r = { .cluster_size = 65536,
                          .data_file = path_of("ref_dfr.data"),
                          .data_file_raw = true };
    create(path_of("ref_dfr.qcow2"), 1 * MiB, &r);
    img = open_img(path_of("ref_dfr.qcow2"), CBT_OPEN_RDWR);
    assert_int_equal(cbt_image_pwrite(img, buf, 4096, 0), 0);
    assert_int_equal(blk_make_empty(img), -ENOTSUP);
    close_img(img);

    /* Misaligned requests; a short cluster only at the end. */
    struct img_opts p = { .cluster_size = 65536 };
    create(path_of("ref.qcow2"), 1 * MiB + 4096, &p);
    img = open_img(path_of("ref.qcow2"), CBT_OPEN_RDWR);
    assert_int_equal(cbt_image_pwrite_compressed(img, buf, 65536, 512), -EINVAL);
    assert_int_equal(cbt_image_pwrite_compressed(img, buf, 4096, 0), -EINVAL);
    assert_int_equal(cbt_image_pwrite_compressed(img, buf, 4096, 1 * MiB), 0);
    assert_int_equal(cbt_image_pwrite_compressed(img, buf, 8192, 1 * MiB),
                     -EINVAL);
    assert_true(is_compressed(img, 1 * MiB));
    close_img(img);
    check_clean(path_of("ref.qcow2"), "refusals");

    /* Read-only images and raw images. */
    img = open_img(path_of("ref.qcow2"), 0);
    assert_int_equal(cbt_image_pwrite_compressed(img, buf, 65536, 0), -EPERM);
    close_img(img);
    struct cbt_create_opts ro = {.struct_size = sizeof(struct cbt_create_opts),
                                 .format = "raw",
                                 .size = 1 * MiB,
                                 .size_given = true};
    struct cbt_error *err = NULL;
    assert_int_equal(cbt_image_create(path_of("ref.raw"), &ro, &err), 0);
    img = open_img(path_of("ref.raw"), CBT_OPEN_RDWR);
    assert_int_equal(cbt_image_pwrite_compressed(img, buf, 65536, 0), -ENOTSUP);
    assert_int_equal(blk_make_empty(img), -ENOTSUP);
    close_img(img);
}

/* ---- compressing apart from writing (cbt backup's worker threads) ---- */

/* cbt_image_compress_cluster + cbt_image_pwrite_precompressed store what
 * cbt_image_pwrite_compressed stores: compressible clusters compressed
 * (zlib and zstd, a short tail cluster too), incompressible ones reported
 * as not shrinking; the data reads back; refusals as the one-step call. */
static void test_two_steps(void **state)
{
    (void)state;
    for (int zstd = 0; zstd < 2; zstd++) {
        struct img_opts o = { .cluster_size = 65536, .zstd = zstd };
        const char *path = path_of(zstd ? "two_zstd.qcow2" : "two.qcow2");
        uint64_t size = 1 * MiB + 4096;
        create(path, size, &o);
        struct cbt_image *img = open_img(path, CBT_OPEN_RDWR);
        static uint8_t buf[65536], out[65536], back[65536];
        fill_compressible(buf, sizeof(buf));
        int64_t clen = cbt_image_compress_cluster(img, buf, 65536, 0, out,
                                                  sizeof(out));
        assert_true(clen > 0 && clen < 65536);
        assert_int_equal(cbt_image_pwrite_precompressed(img, out, (size_t)clen,
                                                        65536, 0), 0);
        assert_true(is_compressed(img, 0));
        assert_int_equal(cbt_image_pread(img, back, 65536, 0), 0);
        assert_memory_equal(back, buf, 65536);
        /* the short last cluster */
        clen = cbt_image_compress_cluster(img, buf, 4096, 1 * MiB, out,
                                          sizeof(out));
        assert_true(clen > 0);
        assert_int_equal(cbt_image_pwrite_precompressed(
                             img, out, (size_t)clen, 4096, 1 * MiB), 0);
        assert_true(is_compressed(img, 1 * MiB));
        assert_int_equal(cbt_image_pread(img, back, 4096, 1 * MiB), 0);
        assert_memory_equal(back, buf, 4096);
        /* incompressible: 0, the caller writes it normally */
        fill_random(buf, sizeof(buf));
        assert_int_equal(cbt_image_compress_cluster(img, buf, 65536, 65536,
                                                    out, sizeof(out)), 0);
        /* refusals */
        assert_int_equal(cbt_image_compress_cluster(img, buf, 65536, 512,
                                                    out, sizeof(out)), -EINVAL);
        assert_int_equal(cbt_image_compress_cluster(img, buf, 4096, 0, out,
                                                    sizeof(out)), -EINVAL);
        assert_int_equal(cbt_image_pwrite_precompressed(img, out, 0, 65536,
                                                        65536),
                         -EINVAL);
        assert_int_equal(cbt_image_pwrite_precompressed(img, out, 65536,
                                                        65536, 65536),
                         -EINVAL);
        close_img(img);
        check_clean(path, "two steps");
    }
    struct cbt_create_opts ro = {.struct_size = sizeof(struct cbt_create_opts),
                                 .format = "raw",
                                 .size = 1 * MiB,
                                 .size_given = true};
    struct cbt_error *err = NULL;
    assert_int_equal(cbt_image_create(path_of("two.raw"), &ro, &err), 0);
    struct cbt_image *img = open_img(path_of("two.raw"), CBT_OPEN_RDWR);
    static uint8_t b2[65536], o2[65536];
    assert_int_equal(cbt_image_compress_cluster(img, b2, 65536, 0, o2,
                                                sizeof(o2)), -ENOTSUP);
    close_img(img);
}

/* ---- cmocka plumbing ---- */

static int setup(void **state)
{
    (void)state;
    return tmpdir_make(tmpdir, "compress");
}

static int teardown(void **state)
{
    (void)state;
    (void)tmpdir_remove(tmpdir);
    return 0;
}

#define N_OF(a) (sizeof(a) / sizeof((a)[0]))

int main(void)
{
    const char *env = getenv("CBT_TEST_SEED");
    seed = env ? strtoull(env, NULL, 0) : 0xc0de5eedull;
    print_message("qcow2_compress: CBT_TEST_SEED=0x%" PRIx64 "\n", seed);
    enum { NT = N_OF(rt_cfgs) + N_OF(pack_cfgs) + N_OF(mix_cfgs) +
                N_OF(me_cfgs) + 3 };
    struct CMUnitTest tests[NT];
    size_t k = 0;
#define ADD(cfgs, fn) \
    for (size_t i = 0; i < N_OF(cfgs); i++) \
        tests[k++] = (struct CMUnitTest){ .name = cfgs[i].name, \
                                          .test_func = fn, \
                                          .setup_func = setup, \
                                          .teardown_func = teardown, \
                                          .initial_state = (void *)&cfgs[i] }
    ADD(rt_cfgs, test_round_trip);
    ADD(pack_cfgs, test_pack_and_free);
    ADD(mix_cfgs, test_mix);
    ADD(me_cfgs, test_make_empty);
    tests[k++] = (struct CMUnitTest){ .name = "reuse_after_free",
                                      .test_func = test_reuse_after_free,
                                      .setup_func = setup,
                                      .teardown_func = teardown };
    tests[k++] = (struct CMUnitTest){ .name = "refusals",
                                      .test_func = test_refusals,
                                      .setup_func = setup,
                                      .teardown_func = teardown };
    tests[k++] = (struct CMUnitTest){ .name = "two_steps",
                                      .test_func = test_two_steps,
                                      .setup_func = setup,
                                      .teardown_func = teardown };
    return _cmocka_run_group_tests("qcow2_compress", tests, k, NULL, NULL);
}
