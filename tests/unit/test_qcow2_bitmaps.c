/*
 * Persistent dirty bitmaps in qcow2, through the public API, against a
 * naive model: one byte per granule, set by the same writes.
 *
 *  - round trips (add, write, commit or close, reopen, extents and SHA-256
 *    equal the model's) over cluster sizes 512 B..2 MiB, granularities
 *    512 B..1 MiB and sizes that are not multiples of either, and a 1 TiB
 *    sparse disk;
 *  - the on-disk layout: table entries (0 for clean chunks, all-ones entries
 *    read back as all dirty), in_use while a writer holds the image and
 *    clear after a clean close, a killed writer (fork + _exit) leaves the
 *    bitmap inconsistent: only remove works;
 *  - autoclear bit 0 clear: the extension is ignored with a warning and a
 *    read-write open drops it;
 *  - every load-time check of FORMATS.md §2.3 on hand-made directories;
 *  - the API: errors and their messages, rollback, merge across
 *    granularities and images, resize, SHA-256 (FIPS 180-4 vectors).
 *
 * After each scenario the image must pass cbt's check with no errors.
 * CBT_TEST_SEED=N picks the random seed.
 */
#include <errno.h>
#include <fcntl.h>
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
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include <cbt/bitmap.h>
#include <cbt/image.h>

#include "util/util.h"
#include "tmpdir.h"

#define KiB 1024ull
#define MiB (1024ull * 1024)
#define GiB (1024ull * MiB)
#define TiB (1024ull * GiB)

#define BM_EXT_TYPE 0x23852875u
#define FLAG_IN_USE 1u
#define FLAG_AUTO 2u

static char tmpdir[TMPDIR_PATH_MAX];
static uint64_t seed = 1;

/* ---- small helpers ---- */

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

/* A path in the test's folder; the last 16 results stay valid. */
static char *path_of(const char *name)
{
    return tmpdir_path(tmpdir, name);
}

static void die_err(const char *what, struct cbt_error *err)
{
    fail_msg("%s: %s", what, cbt_error_message(err));
}

static void create(const char *path, uint64_t size, uint32_t cluster_size,
                   int compat)
{
    struct cbt_create_opts o = {.struct_size = sizeof(struct cbt_create_opts),
                                .format = "qcow2",
                                .size = size,
                                .size_given = true,
                                .cluster_size = cluster_size,
                                .compat = compat};
    struct cbt_error *err = NULL;
    if (cbt_image_create(path, &o, &err) < 0)
        die_err("create", err);
}

static struct cbt_image *open_img(const char *path, unsigned flags)
{
    struct cbt_error *err = NULL;
    struct cbt_image *img = cbt_image_open(path, NULL, flags, &err);
    if (!img)
        die_err(path, err);
    return img;
}

/* Open that must fail; returns the message (caller frees). */
static char *open_fails(const char *path, unsigned flags, const char *what)
{
    struct cbt_error *err = NULL;
    struct cbt_image *img = cbt_image_open(path, NULL, flags, &err);
    if (img) {
        cbt_image_close(img, NULL);
        fail_msg("%s: %s opened, but should not have", what, path);
    }
    char *m = strdup(cbt_error_message(err));
    cbt_error_free(err);
    return m;
}

static void close_img(struct cbt_image *img)
{
    struct cbt_error *err = NULL;
    if (cbt_image_close(img, &err) < 0)
        die_err("close", err);
}

static void ok(int r, struct cbt_error *err, const char *what)
{
    if (r < 0)
        die_err(what, err);
}

/* An API call that must fail with a message containing `want`; *errp is
 * read after the call, then freed and reset. */
static void expect_error(int r, struct cbt_error **errp, const char *want,
                         const char *what)
{
    if (r >= 0)
        fail_msg("%s succeeded, should fail with \"%s\"", what, want);
    const char *m = cbt_error_message(*errp);
    if (!strstr(m, want))
        fail_msg("%s: message \"%s\" lacks \"%s\"", what, m, want);
    cbt_error_free(*errp);
    *errp = NULL;
}

static void write_pattern(struct cbt_image *img, uint64_t off, uint64_t len)
{
    static uint8_t buf[256 * 1024];
    memset(buf, (int)(off & 0xff) | 1, sizeof(buf));
    while (len) {
        size_t n = (size_t)MIN(len, sizeof(buf));
        assert_int_equal(cbt_image_pwrite(img, buf, n, off), 0);
        off += n;
        len -= n;
    }
}

static void check_clean(const char *path)
{
    struct cbt_check_result res;
    struct cbt_error *err = NULL;
    if (cbt_image_check(path, "qcow2", 0, &res, NULL, NULL, &err) < 0)
        die_err("check", err);
    if (res.corruptions || res.leaks || res.check_errors)
        fail_msg("%s: check found %" PRId64 " corruptions, %" PRId64
                 " leaks, %" PRId64 " errors", path, res.corruptions,
                 res.leaks, res.check_errors);
}

static void check_no_corruption(const char *path, unsigned fix)
{
    struct cbt_check_result res;
    struct cbt_error *err = NULL;
    if (cbt_image_check(path, "qcow2", fix, &res, NULL, NULL, &err) < 0)
        die_err("check", err);
    if (res.corruptions || res.check_errors)
        fail_msg("%s: check found %" PRId64 " corruptions, %" PRId64
                 " errors", path, res.corruptions, res.check_errors);
}

/* ---- the naive model ---- */

struct model {
    uint64_t size, gran, n;
    uint8_t *bit; /* one byte per granule */
};

static void model_init(struct model *m, uint64_t size, uint64_t gran)
{
    m->size = size;
    m->gran = gran;
    m->n = (size + gran - 1) / gran;
    m->bit = calloc(m->n ? m->n : 1, 1);
    assert_non_null(m->bit);
}

static void model_set(struct model *m, uint64_t off, uint64_t len)
{
    if (!len)
        return;
    for (uint64_t i = off / m->gran; i <= (off + len - 1) / m->gran; i++)
        m->bit[i] = 1;
}

static void model_merge(struct model *dst, const struct model *src)
{
    for (uint64_t i = 0; i < src->n; i++) {
        if (!src->bit[i])
            continue;
        uint64_t lo = i * src->gran;
        uint64_t hi = MIN(lo + src->gran, src->size);
        model_set(dst, lo, hi - lo);
    }
}

static uint64_t model_count(const struct model *m)
{
    uint64_t c = 0;
    for (uint64_t i = 0; i < m->n; i++)
        c += m->bit[i];
    return c * m->gran;
}

/* SHA-256 of the model's qcow2 bit stream, computed independently. */
static void model_sha(const struct model *m, char hex[65])
{
    struct sha256_ctx c;
    sha256_init(&c);
    uint8_t byte = 0;
    for (uint64_t i = 0; i < m->n; i++) {
        if (m->bit[i])
            byte |= (uint8_t)(1u << (i % 8));
        if (i % 8 == 7) {
            sha256_update(&c, &byte, 1);
            byte = 0;
        }
    }
    if (m->n % 8)
        sha256_update(&c, &byte, 1);
    uint8_t d[32];
    sha256_final(&c, d);
    sha256_hex(d, hex);
}

/* ---- extents ---- */

struct ext {
    uint64_t start, len;
    bool dirty;
};
struct ext_list {
    struct ext *v;
    size_t n, cap;
};

static int collect(void *opaque, uint64_t start, uint64_t len, bool dirty)
{
    struct ext_list *l = opaque;
    if (l->n == l->cap) {
        l->cap = l->cap ? l->cap * 2 : 64;
        l->v = realloc(l->v, l->cap * sizeof(*l->v));
        assert_non_null(l->v);
    }
    l->v[l->n++] = (struct ext){ start, len, dirty };
    return 0;
}

static void model_extents(const struct model *m, struct ext_list *l)
{
    uint64_t i = 0;
    while (i < m->n) {
        uint64_t j = i;
        while (j < m->n && m->bit[j] == m->bit[i])
            j++;
        collect(l, i * m->gran, MIN(j * m->gran, m->size) - i * m->gran,
                m->bit[i]);
        i = j;
    }
}

static void print_extents(const char *title, const struct ext_list *l)
{
    fprintf(stderr, "%s:\n", title);
    for (size_t i = 0; i < l->n && i < 40; i++)
        fprintf(stderr, "  %12" PRIu64 " %12" PRIu64 " %s\n", l->v[i].start,
                l->v[i].len, l->v[i].dirty ? "dirty" : "clean");
}

/* The bitmap's extents, count and hash equal the model's. */
static void expect_model(struct cbt_image *img, const char *name,
                         const struct model *m)
{
    struct ext_list got = { 0 }, want = { 0 };
    struct cbt_error *err = NULL;
    ok(cbt_bitmap_extents(img, name, collect, &got, &err), err, "extents");
    model_extents(m, &want);
    bool same = got.n == want.n;
    for (size_t i = 0; same && i < got.n; i++)
        same = got.v[i].start == want.v[i].start &&
               got.v[i].len == want.v[i].len &&
               got.v[i].dirty == want.v[i].dirty;
    if (!same) {
        print_extents("cbt", &got);
        print_extents("model", &want);
        fail_msg("bitmap '%s': extents differ from the model (seed %" PRIu64
                 ")", name, seed);
    }
    free(got.v);
    free(want.v);

    struct cbt_bitmap_info *list;
    size_t n;
    ok(cbt_bitmap_list(img, &list, &n, &err), err, "list");
    bool found = false;
    for (size_t i = 0; i < n; i++) {
        if (strcmp(list[i].name, name) == 0) {
            found = true;
            assert_int_equal(list[i].granularity, m->gran);
            assert_int_equal(list[i].count, model_count(m));
        }
    }
    cbt_bitmap_info_free_list(list, n);
    assert_true(found);

    char hex[65], mhex[65];
    ok(cbt_bitmap_sha256(img, name, hex, &err), err, "sha256");
    model_sha(m, mhex);
    assert_string_equal(hex, mhex);
}

static const struct cbt_bitmap_info *find_info(struct cbt_bitmap_info *list,
                                               size_t n, const char *name)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(list[i].name, name) == 0)
            return &list[i];
    return NULL;
}

/* ---- the image on disk ---- */

static uint8_t *read_file_range(const char *path, uint64_t off, size_t len)
{
    int fd = open(path, O_RDONLY);
    assert_true(fd >= 0);
    uint8_t *buf = calloc(1, len ? len : 1);
    assert_non_null(buf);
    ssize_t r = pread(fd, buf, len, (off_t)off);
    assert_true(r >= 0);
    close(fd);
    return buf;
}

static void write_file_range(const char *path, uint64_t off, const void *buf,
                             size_t len)
{
    int fd = open(path, O_WRONLY);
    assert_true(fd >= 0);
    assert_int_equal(pwrite(fd, buf, len, (off_t)off), (ssize_t)len);
    close(fd);
}

static uint64_t file_len(const char *path)
{
    struct stat st;
    assert_int_equal(stat(path, &st), 0);
    return (uint64_t)st.st_size;
}

/* What the header says about bitmaps. */
struct disk_hdr {
    uint32_t cluster_size;
    uint64_t autoclear;
    uint64_t ext_off;       /* file offset of the extension's data, 0 if none */
    uint32_t ext_len;
    uint32_t nb, reserved;
    uint64_t dir_size, dir_off;
};

static void read_hdr(const char *path, struct disk_hdr *h)
{
    uint8_t *b = read_file_range(path, 0, 4096);
    memset(h, 0, sizeof(*h));
    h->cluster_size = 1u << ldbe32(b + 20);
    h->autoclear = ldbe64(b + 88);
    uint32_t hl = ldbe32(b + 100);
    free(b);
    uint32_t cs = h->cluster_size;
    b = read_file_range(path, 0, cs);
    for (uint64_t off = hl; off + 8 <= cs;) {
        uint32_t t = ldbe32(b + off), len = ldbe32(b + off + 4);
        if (t == 0)
            break;
        if (t == BM_EXT_TYPE) {
            h->ext_off = off + 8;
            h->ext_len = len;
            h->nb = ldbe32(b + off + 8);
            h->reserved = ldbe32(b + off + 12);
            h->dir_size = ldbe64(b + off + 16);
            h->dir_off = ldbe64(b + off + 24);
        }
        off += 8 + ALIGN_UP((uint64_t)len, 8);
    }
    free(b);
}

struct dirent {
    char name[1100];
    uint64_t table_off;
    uint32_t table_size, flags;
    uint8_t gbits;
};

/* The directory on disk; returns the number of entries. */
static size_t read_dir(const char *path, struct dirent *v, size_t max)
{
    struct disk_hdr h;
    read_hdr(path, &h);
    if (!h.ext_off)
        return 0;
    uint8_t *d = read_file_range(path, h.dir_off, h.dir_size);
    size_t n = 0;
    for (uint64_t pos = 0; pos < h.dir_size && n < max;) {
        const uint8_t *e = d + pos;
        uint16_t ns = ldbe16(e + 18);
        v[n].table_off = ldbe64(e);
        v[n].table_size = ldbe32(e + 8);
        v[n].flags = ldbe32(e + 12);
        v[n].gbits = e[17];
        memcpy(v[n].name, e + 24, ns);
        v[n].name[ns] = 0;
        n++;
        pos += ALIGN_UP(24ull + ns + ldbe32(e + 20), 8);
    }
    free(d);
    return n;
}

static uint32_t disk_flags(const char *path, const char *name)
{
    struct dirent v[8];
    size_t n = read_dir(path, v, 8);
    for (size_t i = 0; i < n; i++)
        if (strcmp(v[i].name, name) == 0)
            return v[i].flags;
    fail_msg("bitmap '%s' not in the directory of %s", name, path);
    return 0;
}

static void copy_file(const char *from, const char *to)
{
    uint64_t len = file_len(from);
    uint8_t *b = read_file_range(from, 0, len);
    int fd = open(to, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, b, len), (ssize_t)len);
    close(fd);
    free(b);
}

static bool same_file(const char *a, const char *b)
{
    uint64_t la = file_len(a), lb = file_len(b);
    if (la != lb)
        return false;
    uint8_t *x = read_file_range(a, 0, la), *y = read_file_range(b, 0, lb);
    bool same = memcmp(x, y, la) == 0;
    free(x);
    free(y);
    return same;
}

/* ---- warnings ---- */

static char warned[4096];
static void warn_capture(void *opaque, const char *msg)
{
    snprintf(warned, sizeof(warned), "%s", msg);
}

/* ---- setup ---- */

static int setup(void **state)
{
    (void)state;
    if (tmpdir_make(tmpdir, "bm") < 0)
        return -1;
    warned[0] = 0;
    /* The tests run on this thread: the images they open keep it. */
    warn_scope_enter(warn_capture, NULL);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    const struct cbt_warner none = {NULL, NULL};
    warn_scope_leave(&none);
    return tmpdir_remove(tmpdir);
}

/* ==== round trips ==== */

struct rt_cfg {
    uint32_t cluster_size;
    uint64_t size;
    uint64_t grans[3];
    int writes;
};

static void roundtrip(const struct rt_cfg *c, bool commit_then_close)
{
    const char *p = path_of("rt.qcow2");
    create(p, c->size, c->cluster_size, 3);
    struct cbt_image *img = open_img(p, CBT_OPEN_RDWR);
    struct model m[3];
    char names[3][8];
    struct cbt_error *err = NULL;
    int nb = 0;
    for (; nb < 3 && c->grans[nb]; nb++) {
        snprintf(names[nb], sizeof(names[nb]), "b%d", nb);
        model_init(&m[nb], c->size, c->grans[nb]);
        ok(cbt_bitmap_add(img, names[nb], c->grans[nb], false, &err), err,
           "add");
    }
    for (int i = 0; i < c->writes; i++) {
        uint64_t len = 1 + rnd(i % 4 == 0 ? 4 * MiB : 70000);
        uint64_t off = rnd(c->size);
        len = MIN(len, c->size - off);
        if (!len)
            continue;
        switch (rnd(3)) {
        case 0:
            write_pattern(img, off, len);
            break;
        case 1:
            assert_int_equal(cbt_image_pwrite_zeroes(img, off, len, 0), 0);
            break;
        default:
            assert_int_equal(cbt_image_discard(img, off, len), 0);
            break;
        }
        for (int b = 0; b < nb; b++)
            model_set(&m[b], off, len);
    }
    /* The last byte and the first, always. */
    write_pattern(img, c->size - 1, 1);
    write_pattern(img, 0, 1);
    for (int b = 0; b < nb; b++) {
        model_set(&m[b], c->size - 1, 1);
        model_set(&m[b], 0, 1);
        expect_model(img, names[b], &m[b]);
    }
    if (commit_then_close)
        ok(cbt_bitmap_commit(img, &err), err, "commit");
    close_img(img);
    check_clean(p);

    img = open_img(p, 0);
    for (int b = 0; b < nb; b++)
        expect_model(img, names[b], &m[b]);
    close_img(img);
    for (int b = 0; b < nb; b++) {
        assert_int_equal(disk_flags(p, names[b]), FLAG_AUTO);
        free(m[b].bit);
    }
    unlink(p);
}

static void test_roundtrip(void **state)
{
    (void)state;
    static const struct rt_cfg cfgs[] = {
        { 512, 3 * MiB + 512, { 512, 4096, 65536 }, 40 },
        { 512, 100 * MiB - 1536, { 4096, 1 * MiB, 0 }, 40 },
        { 4096, 64 * MiB + 7 * 512, { 512, 65536, 0 }, 40 },
        { 65536, 1 * GiB + 512, { 512, 65536, 1 * MiB }, 40 },
        { 65536, 10 * MiB, { 4096, 0, 0 }, 20 },
        { 2 * MiB, 300 * MiB + 512, { 512, 4096, 2 * MiB }, 30 },
        { 2 * MiB, 4 * GiB + 2 * MiB + 512, { 512, 0, 0 }, 20 },
    };
    for (size_t i = 0; i < ARRAY_SIZE(cfgs); i++) {
        roundtrip(&cfgs[i], false);
        roundtrip(&cfgs[i], true);
    }
}

/* The default granularity is the cluster size clamped to 4..64 KiB. */
static void test_default_granularity(void **state)
{
    (void)state;
    static const struct { uint32_t cs; uint64_t g; } v[] = {
        { 512, 4096 }, { 4096, 4096 }, { 16384, 16384 }, { 65536, 65536 },
        { 2 * MiB, 65536 },
    };
    for (size_t i = 0; i < ARRAY_SIZE(v); i++) {
        const char *p = path_of("g.qcow2");
        create(p, 16 * MiB, v[i].cs, 3);
        struct cbt_image *img = open_img(p, CBT_OPEN_RDWR);
        struct cbt_error *err = NULL;
        ok(cbt_bitmap_add(img, "d", 0, false, &err), err, "add");
        close_img(img);
        struct dirent d[1];
        assert_int_equal(read_dir(p, d, 1), 1);
        assert_int_equal(1ull << d[0].gbits, v[i].g);
        unlink(p);
    }
}

/* A 1 TiB sparse disk: few data clusters, clean chunks stay entry 0. */
static void test_sparse_1tib(void **state)
{
    (void)state;
    const char *p = path_of("big.qcow2");
    create(p, 1 * TiB, 65536, 3);
    struct cbt_image *img = open_img(p, CBT_OPEN_RDWR);
    struct cbt_error *err = NULL;
    struct model m64, m512;
    model_init(&m64, 1 * TiB, 65536);
    model_init(&m512, 1 * TiB, 512);
    ok(cbt_bitmap_add(img, "g64k", 65536, false, &err), err, "add");
    ok(cbt_bitmap_add(img, "g512", 512, false, &err), err, "add");
    const uint64_t offs[] = { 0, 5 * GiB + 100, 512 * GiB - 1, 1 * TiB - 4096 };
    for (size_t i = 0; i < ARRAY_SIZE(offs); i++) {
        write_pattern(img, offs[i], 3000);
        model_set(&m64, offs[i], 3000);
        model_set(&m512, offs[i], 3000);
    }
    close_img(img);
    check_clean(p);
    img = open_img(p, 0);
    expect_model(img, "g64k", &m64);
    expect_model(img, "g512", &m512);
    struct cbt_bitmap_info *list;
    size_t n;
    ok(cbt_bitmap_list(img, &list, &n, &err), err, "list");
    /* g64k: 2^24 bits = 32 chunks of 32 GiB; the writes dirty chunks 0,
     * 15, 16 (the one at 512 GiB straddles two) and 31: 4 data clusters
     * and one table cluster.  g512: 4096 chunks of 256 MiB, dirty 0, 20,
     * 2047, 2048, 4095: 5, and a 32 KiB table in one cluster. */
    assert_int_equal(find_info(list, n, "g64k")->disk_bytes, 5 * 65536);
    assert_int_equal(find_info(list, n, "g512")->disk_bytes, 6 * 65536);
    cbt_bitmap_info_free_list(list, n);
    close_img(img);
    struct dirent d[2];
    assert_int_equal(read_dir(p, d, 2), 2);
    assert_int_equal(d[0].table_size, 32);
    assert_int_equal(d[1].table_size, 4096);
    free(m64.bit);
    free(m512.bit);
}

/* Table entry 1 (all ones) reads as a wholly dirty chunk; a store writes
 * a data cluster instead (QEMU never emits the flag). */
static void test_all_ones_entry(void **state)
{
    (void)state;
    const char *p = path_of("ones.qcow2");
    /* 512-byte clusters at 512 B granularity: a chunk covers 2 MiB. */
    uint64_t size = 5 * MiB + 3 * 512;
    create(p, size, 512, 3);
    struct cbt_image *img = open_img(p, CBT_OPEN_RDWR);
    struct cbt_error *err = NULL;
    ok(cbt_bitmap_add(img, "b", 512, false, &err), err, "add");
    write_pattern(img, 100, 1);             /* chunk 0 */
    write_pattern(img, 4 * MiB + 512, 512); /* chunk 2, the partial one */
    close_img(img);
    struct dirent d[1];
    assert_int_equal(read_dir(p, d, 1), 1);
    assert_int_equal(d[0].table_size, 3);
    uint8_t *t = read_file_range(p, d[0].table_off, 24);
    assert_int_not_equal(ldbe64(t), 0);
    assert_int_equal(ldbe64(t + 8), 0); /* clean chunk: no cluster */
    assert_int_not_equal(ldbe64(t + 16), 0);
    /* Chunks 1 and 2 become "all ones"; their data cluster leaks. */
    uint8_t e[8];
    stbe64(e, 1);
    write_file_range(p, d[0].table_off + 8, e, 8);
    write_file_range(p, d[0].table_off + 16, e, 8);
    free(t);

    struct model m;
    model_init(&m, size, 512);
    model_set(&m, 100, 1);
    model_set(&m, 2 * MiB, size - 2 * MiB);
    img = open_img(p, 0);
    expect_model(img, "b", &m);
    close_img(img);

    struct cbt_check_result res;
    ok(cbt_image_check(p, "qcow2", 0, &res, NULL, NULL, &err), err, "check");
    assert_int_equal(res.corruptions, 0);
    assert_int_equal(res.leaks, 1);
    ok(cbt_image_check(p, "qcow2", CBT_CHECK_FIX_LEAKS, &res, NULL, NULL,
                       &err), err, "check -r");
    check_clean(p);

    /* Rewritten: data clusters, the same bits. */
    img = open_img(p, CBT_OPEN_RDWR);
    write_pattern(img, 0, 1);
    close_img(img);
    assert_int_equal(read_dir(p, d, 1), 1);
    t = read_file_range(p, d[0].table_off, 24);
    for (int i = 0; i < 3; i++)
        assert_int_equal(ldbe64(t + 8 * i) & 0x1ff, 0);
    assert_int_not_equal(ldbe64(t + 8), 0);
    free(t);
    img = open_img(p, 0);
    model_set(&m, 0, 1);
    expect_model(img, "b", &m);
    close_img(img);
    check_clean(p);
    free(m.bit);
}

/* ==== in_use ==== */

static void make_with_bitmaps(const char *p, uint64_t size)
{
    create(p, size, 65536, 3);
    struct cbt_image *img = open_img(p, CBT_OPEN_RDWR);
    struct cbt_error *err = NULL;
    ok(cbt_bitmap_add(img, "rec", 65536, false, &err), err, "add");
    ok(cbt_bitmap_add(img, "dis", 4096, true, &err), err, "add");
    write_pattern(img, 1 * MiB, 100);
    close_img(img);
}

static void test_in_use_lifecycle(void **state)
{
    (void)state;
    const char *p = path_of("use.qcow2");
    const char *copy = path_of("use-copy.qcow2");
    make_with_bitmaps(p, 64 * MiB);
    assert_int_equal(disk_flags(p, "rec"), FLAG_AUTO);
    assert_int_equal(disk_flags(p, "dis"), 0);

    /* A read-only open changes nothing. */
    copy_file(p, copy);
    struct cbt_image *img = open_img(p, 0);
    struct cbt_error *err = NULL;
    ok(cbt_bitmap_commit(img, &err), err, "commit");
    close_img(img);
    assert_true(same_file(p, copy));

    /* Nor does a read-write open without writes or changes. */
    img = open_img(p, CBT_OPEN_RDWR);
    char hex[65];
    ok(cbt_bitmap_sha256(img, "rec", hex, &err), err, "sha256");
    ok(cbt_bitmap_commit(img, &err), err, "commit");
    close_img(img);
    assert_true(same_file(p, copy));

    /* The first write marks the recording bitmap in_use on disk, before
     * the data lands; the disabled one is not affected by writes. */
    img = open_img(p, CBT_OPEN_RDWR);
    write_pattern(img, 0, 10);
    assert_int_equal(disk_flags(p, "rec"), FLAG_AUTO | FLAG_IN_USE);
    assert_int_equal(disk_flags(p, "dis"), 0);
    /* A commit stores a clean checkpoint... */
    ok(cbt_bitmap_commit(img, &err), err, "commit");
    assert_int_equal(disk_flags(p, "rec"), FLAG_AUTO);
    /* ...and the next write marks it again. */
    write_pattern(img, 8 * MiB, 10);
    assert_int_equal(disk_flags(p, "rec"), FLAG_AUTO | FLAG_IN_USE);
    close_img(img);
    assert_int_equal(disk_flags(p, "rec"), FLAG_AUTO);
    assert_int_equal(disk_flags(p, "dis"), 0);
    check_clean(p);

    /* A recording bitmap disabled in memory is still 'auto' on disk:
     * writes mark it too. */
    img = open_img(p, CBT_OPEN_RDWR);
    ok(cbt_bitmap_disable(img, "rec", &err), err, "disable");
    write_pattern(img, 0, 10);
    assert_int_equal(disk_flags(p, "rec"), FLAG_AUTO | FLAG_IN_USE);
    close_img(img);
    assert_int_equal(disk_flags(p, "rec"), 0);
    check_clean(p);
}

/* A writer killed without closing: in_use stays, the bitmap is
 * inconsistent, every use but remove is refused. */
static void test_killed_writer(void **state)
{
    (void)state;
    const char *p = path_of("kill.qcow2");
    make_with_bitmaps(p, 64 * MiB);
    struct model dis; /* disabled from the start: stays clean */
    model_init(&dis, 64 * MiB, 4096);

    fflush(NULL);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        struct cbt_image *img = cbt_image_open(p, NULL, CBT_OPEN_RDWR, NULL);
        if (!img)
            _exit(2);
        static uint8_t buf[65536];
        if (cbt_image_pwrite(img, buf, sizeof(buf), 3 * MiB) < 0)
            _exit(3);
        _exit(0); /* no close: as if killed */
    }
    int st;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    assert_int_equal(disk_flags(p, "rec"), FLAG_AUTO | FLAG_IN_USE);
    assert_int_equal(disk_flags(p, "dis"), 0);
    check_no_corruption(p, 0);

    struct cbt_image *img = open_img(p, CBT_OPEN_RDWR);
    struct cbt_error *err = NULL;
    struct cbt_bitmap_info *list;
    size_t n;
    ok(cbt_bitmap_list(img, &list, &n, &err), err, "list");
    const struct cbt_bitmap_info *rec = find_info(list, n, "rec");
    assert_true(rec->inconsistent && rec->in_use && rec->auto_flag);
    assert_false(rec->recording);
    assert_int_equal(rec->count, 0);
    assert_true(rec->persistent);
    const struct cbt_bitmap_info *d = find_info(list, n, "dis");
    assert_false(d->inconsistent || d->in_use);
    cbt_bitmap_info_free_list(list, n);
    expect_model(img, "dis", &dis);

    const char *bad = "Bitmap 'rec' is inconsistent and cannot be used";
    char hex[65];
    struct ext_list l = { 0 };
    expect_error(cbt_bitmap_clear(img, "rec", &err), &err, bad, "clear");
    expect_error(cbt_bitmap_enable(img, "rec", &err), &err, bad, "enable");
    expect_error(cbt_bitmap_disable(img, "rec", &err), &err, bad, "disable");
    expect_error(cbt_bitmap_merge(img, "rec", img, "dis", &err), &err, bad,
                 "merge into");
    expect_error(cbt_bitmap_merge(img, "dis", img, "rec", &err), &err, bad,
                 "merge from");
    expect_error(cbt_bitmap_rename(img, "rec", "x", &err), &err, bad, "rename");
    expect_error(cbt_bitmap_extents(img, "rec", collect, &l, &err), &err, bad,
                 "extents");
    expect_error(cbt_bitmap_sha256(img, "rec", hex, &err), &err, bad, "sha256");
    expect_error(cbt_bitmap_add(img, "rec", 0, false, &err), &err,
                 "Bitmap already exists: rec", "add");

    /* Kept, untouched, across stores. */
    write_pattern(img, 0, 1); /* 'dis' is disabled: not dirtied */
    ok(cbt_bitmap_commit(img, &err), err, "commit");
    close_img(img);
    assert_int_equal(disk_flags(p, "rec"), FLAG_AUTO | FLAG_IN_USE);
    check_no_corruption(p, CBT_CHECK_FIX_LEAKS);
    check_clean(p);

    img = open_img(p, CBT_OPEN_RDWR);
    expect_model(img, "dis", &dis);
    ok(cbt_bitmap_remove(img, "rec", &err), err, "remove");
    close_img(img);
    struct dirent v[4];
    assert_int_equal(read_dir(p, v, 4), 1);
    assert_string_equal(v[0].name, "dis");
    check_clean(p);
    free(dis.bit);
}

/* Killed after opening read-write but before writing: nothing was marked,
 * the bitmaps are still good. */
static void test_killed_before_write(void **state)
{
    (void)state;
    const char *p = path_of("kill2.qcow2");
    make_with_bitmaps(p, 16 * MiB);
    fflush(NULL);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        struct cbt_image *img = cbt_image_open(p, NULL, CBT_OPEN_RDWR, NULL);
        _exit(img ? 0 : 2);
    }
    int st;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    assert_int_equal(disk_flags(p, "rec"), FLAG_AUTO);
    struct cbt_image *img = open_img(p, 0);
    struct model m;
    model_init(&m, 16 * MiB, 65536);
    model_set(&m, 1 * MiB, 100);
    expect_model(img, "rec", &m);
    close_img(img);
    free(m.bit);
}

/* ==== autoclear bit 0 clear ==== */

static void test_autoclear_clear(void **state)
{
    (void)state;
    const char *p = path_of("ac.qcow2");
    const char *copy = path_of("ac-copy.qcow2");
    make_with_bitmaps(p, 16 * MiB);
    struct disk_hdr h;
    read_hdr(p, &h);
    assert_true(h.autoclear & 1);
    uint8_t b[8];
    stbe64(b, h.autoclear & ~1ull);
    write_file_range(p, 88, b, 8);

    /* Read-only: ignored with QEMU's warning, nothing written. */
    copy_file(p, copy);
    warned[0] = 0;
    struct cbt_image *img = open_img(p, 0);
    assert_non_null(strstr(warned, "a program lacking bitmap support "
                                   "modified this file"));
    struct cbt_bitmap_info *list;
    size_t n;
    struct cbt_error *err = NULL;
    ok(cbt_bitmap_list(img, &list, &n, &err), err, "list");
    assert_int_equal(n, 0);
    cbt_bitmap_info_free_list(list, n);
    close_img(img);
    assert_true(same_file(p, copy));

    /* Read-write: the header loses the extension; its clusters leak. */
    warned[0] = 0;
    img = open_img(p, CBT_OPEN_RDWR);
    assert_non_null(strstr(warned, "considered inconsistent"));
    close_img(img);
    read_hdr(p, &h);
    assert_int_equal(h.ext_off, 0);
    assert_false(h.autoclear & 1);
    struct cbt_check_result res;
    ok(cbt_image_check(p, "qcow2", 0, &res, NULL, NULL, &err), err, "check");
    assert_int_equal(res.corruptions, 0);
    assert_true(res.leaks > 0);
    ok(cbt_image_check(p, "qcow2", CBT_CHECK_FIX_LEAKS, &res, NULL, NULL,
                       &err), err, "check -r leaks");
    check_clean(p);

    /* New bitmaps work again. */
    img = open_img(p, CBT_OPEN_RDWR);
    ok(cbt_bitmap_add(img, "new", 0, false, &err), err, "add");
    close_img(img);
    read_hdr(p, &h);
    assert_true(h.autoclear & 1);
    assert_int_equal(h.nb, 1);
    check_clean(p);
}

/* ==== hand-made directories: every check of FORMATS.md §2.3 ==== */

/* A fresh image with bitmaps "b1" (64 KiB) and "b2" (4 KiB), 1 GiB: one
 * table entry each, and one covers 256 MiB at 512 B granularity. */
static void base_image(const char *p)
{
    create(p, 1 * GiB, 65536, 3);
    struct cbt_image *img = open_img(p, CBT_OPEN_RDWR);
    struct cbt_error *err = NULL;
    ok(cbt_bitmap_add(img, "b1", 65536, false, &err), err, "add");
    ok(cbt_bitmap_add(img, "b2", 4096, false, &err), err, "add");
    write_pattern(img, 0, 100);
    close_img(img);
}

/* Rewrite the extension's fields in place. */
static void set_ext(const char *p, uint32_t nb, uint32_t reserved,
                    uint64_t dir_size, uint64_t dir_off)
{
    struct disk_hdr h;
    read_hdr(p, &h);
    uint8_t b[24];
    stbe32(b, nb);
    stbe32(b + 4, reserved);
    stbe64(b + 8, dir_size);
    stbe64(b + 16, dir_off);
    write_file_range(p, h.ext_off, b, 24);
}

/* Put a directory image at a fresh cluster past the end of the file and
 * point the extension at it. */
static void put_dir(const char *p, const uint8_t *dir, uint64_t size,
                    uint32_t nb)
{
    uint64_t off = ALIGN_UP(file_len(p), 65536ull);
    write_file_range(p, off, dir, size);
    set_ext(p, nb, 0, size, off);
}

/* Append an entry to a directory being built. */
static uint64_t add_entry(uint8_t *dir, uint64_t pos, uint64_t table_off,
                          uint32_t table_size, uint32_t flags, uint8_t type,
                          uint8_t gbits, const char *name, uint16_t name_size,
                          uint32_t extra)
{
    uint8_t *e = dir + pos;
    stbe64(e, table_off);
    stbe32(e + 8, table_size);
    stbe32(e + 12, flags);
    e[16] = type;
    e[17] = gbits;
    stbe16(e + 18, name_size);
    stbe32(e + 20, extra);
    memset(e + 24, 0, extra);
    memcpy(e + 24 + extra, name, MIN(strlen(name), name_size));
    return pos + ALIGN_UP(24ull + name_size + extra, 8);
}

/* check -r all salvages what loads: afterwards the image is clean, opens,
 * and holds exactly the bitmaps named in `names` (comma-separated). */
static void repair_keeps(const char *p, const char *names, const char *what)
{
    /* Not from path_of: the callers' p may be one of its last results. */
    char *f = tmpdir_join(tmpdir, "fixed.qcow2");
    copy_file(p, f);
    struct cbt_check_result res;
    struct cbt_error *err = NULL;
    ok(cbt_image_check(f, "qcow2", CBT_CHECK_FIX_LEAKS | CBT_CHECK_FIX_ERRORS,
                       &res, NULL, NULL, &err), err, what);
    if (res.corruptions || res.check_errors || res.corruptions_fixed < 1)
        fail_msg("%s: check -r all left %" PRId64 " corruptions, fixed %"
                 PRId64, what, res.corruptions, res.corruptions_fixed);
    check_clean(f);
    struct cbt_image *img = open_img(f, 0);
    struct cbt_bitmap_info *list;
    size_t n;
    ok(cbt_bitmap_list(img, &list, &n, &err), err, "list");
    char got[256] = "";
    for (size_t i = 0; i < n; i++)
        snprintf(got + strlen(got), sizeof(got) - strlen(got), "%s%s",
                 i ? "," : "", list[i].name);
    cbt_bitmap_info_free_list(list, n);
    close_img(img);
    free(f);
    if (strcmp(got, names) != 0)
        fail_msg("%s: after check -r all the bitmaps are \"%s\", want \"%s\"",
                 what, got, names);
}

struct dir_case {
    const char *name;
    const char *want;
    /* fields of the first entry ("b1" unless name set) */
    uint64_t table_off;   /* 1: the real one */
    uint32_t table_size;  /* 0xFFFFFFFF: the real one */
    uint32_t flags;
    uint8_t type;
    uint8_t gbits;
    uint16_t name_size;   /* 0: strlen */
    uint32_t extra;
    const char *ename;
};

#define REAL_OFF 1
#define REAL_SIZE 0xFFFFFFFFu

static void test_bad_directories(void **state)
{
    (void)state;
    static char long_name[1100];
    memset(long_name, 'n', 1024);
    long_name[1024] = 0;
    static const struct dir_case cases[] = {
        { "table size 0", "doesn't satisfy the constraints: bitmap_table_size is 0",
          REAL_OFF, 0, FLAG_AUTO, 1, 16, 0, 0, NULL },
        { "table offset 0", "bitmap_table_offset is 0",
          0, REAL_SIZE, FLAG_AUTO, 1, 16, 0, 0, NULL },
        { "unaligned table", "is not cluster aligned",
          REAL_OFF + 512, REAL_SIZE, FLAG_AUTO, 1, 16, 0, 0, NULL },
        { "table too large", "exceeds 134217728",
          REAL_OFF, 0x8000001, FLAG_AUTO, 1, 16, 0, 0, NULL },
        { "granularity 8", "granularity_bits 8 is outside 9..31",
          REAL_OFF, REAL_SIZE, FLAG_AUTO, 1, 8, 0, 0, NULL },
        { "granularity 32", "granularity_bits 32 is outside 9..31",
          REAL_OFF, REAL_SIZE, FLAG_AUTO, 1, 32, 0, 0, NULL },
        { "reserved flag", "has reserved bits set",
          REAL_OFF, REAL_SIZE, FLAG_AUTO | 4, 1, 16, 0, 0, NULL },
        { "name too long", "name_size 1024 exceeds 1023",
          REAL_OFF, REAL_SIZE, FLAG_AUTO, 1, 16, 1024, 0, long_name },
        { "type 2", "type 2 is not 1",
          REAL_OFF, REAL_SIZE, FLAG_AUTO, 2, 16, 0, 0, NULL },
        { "phys size", "more than 536870912",
          REAL_OFF, 8193, FLAG_AUTO, 1, 16, 0, 0, NULL },
        { "virtual size", "is too small for the virtual size",
          REAL_OFF, REAL_SIZE, FLAG_AUTO, 1, 9, 0, 0, NULL },
        { "extra data", "Bitmap extra data is not supported",
          REAL_OFF, REAL_SIZE, FLAG_AUTO, 1, 16, 0, 8, NULL },
        { "table size mismatch", "bitmap_table_size is 2, but",
          REAL_OFF, 2, FLAG_AUTO, 1, 16, 0, 0, NULL },
        { "duplicate name", "Bitmap already exists: b2",
          REAL_OFF, REAL_SIZE, FLAG_AUTO, 1, 16, 0, 0, "b2" },
        { "empty name", "an empty name",
          REAL_OFF, REAL_SIZE, FLAG_AUTO, 1, 16, 0, 0, "" },
    };
    const char *base = path_of("base.qcow2");
    base_image(base);
    struct dirent real[2];
    assert_int_equal(read_dir(base, real, 2), 2);
    const char *p = path_of("bad.qcow2");
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        const struct dir_case *c = &cases[i];
        copy_file(base, p);
        uint8_t dir[4096] = { 0 };
        const char *nm = c->ename ? c->ename : "b1";
        uint16_t ns = c->name_size ? c->name_size : (uint16_t)strlen(nm);
        uint64_t pos = add_entry(
            dir, 0, c->table_off == REAL_OFF ? real[0].table_off
                    : c->table_off == REAL_OFF + 512 ? real[0].table_off + 512
                                                     : c->table_off,
            c->table_size == REAL_SIZE ? real[0].table_size : c->table_size,
            c->flags, c->type, c->gbits, nm, ns, c->extra);
        pos = add_entry(dir, pos, real[1].table_off, real[1].table_size,
                        FLAG_AUTO, 1, 12, "b2", 2, 0);
        put_dir(p, dir, pos, 2);
        char *m = open_fails(p, 0, c->name);
        if (!strstr(m, c->want))
            fail_msg("%s: \"%s\" lacks \"%s\"", c->name, m, c->want);
        free(m);
        /* check still runs and reports the damage; -r all keeps b2 */
        struct cbt_check_result res;
        struct cbt_error *err = NULL;
        ok(cbt_image_check(p, "qcow2", 0, &res, NULL, NULL, &err), err,
           "check");
        assert_true(res.corruptions > 0);
        repair_keeps(p, "b2", c->name);
    }

    /* The extension and the directory as a whole. */
    struct disk_hdr h;
    read_hdr(base, &h);
    uint8_t *dir = read_file_range(base, h.dir_off, h.dir_size);
    static const struct {
        const char *name, *want;
        uint32_t nb, reserved;
        int64_t size_delta;
        uint64_t off_delta;
        const char *kept; /* after check -r all */
    } ext_cases[] = {
        { "reserved", "Reserved field is not zero", 2, 1, 0, 0, "b1,b2" },
        { "too many", "exceeding the QEMU supported maximum of 65535", 65536, 0,
          0, 0, "b1,b2" },
        { "zero bitmaps", "found bitmaps extension with zero bitmaps", 0, 0, 0,
          0, "b1,b2" },
        { "unaligned dir", "invalid bitmap directory offset", 2, 0, 0, 8, "" },
        { "dir too big", "exceeds the maximum supported size", 2, 0,
          67107841, 0, "" },
        { "dir size 0", "Requested bitmap directory size is zero", 2, 0,
          INT64_MIN, 0, "" },
        { "more bitmaps", "More bitmaps found than specified", 1, 0, 0, 0,
          "b1,b2" },
        { "less bitmaps", "Less bitmaps found than specified", 3, 0, 0, 0,
          "b1,b2" },
        { "broken dir", "Broken bitmap directory", 2, 0, -8, 0, "b1" },
        { "leftover", "Broken bitmap directory", 3, 0, 16, 0, "b1,b2" },
    };
    for (size_t i = 0; i < ARRAY_SIZE(ext_cases); i++) {
        copy_file(base, p);
        uint64_t size = ext_cases[i].size_delta == INT64_MIN ? 0
                        : ext_cases[i].size_delta > 1000
                            ? (uint64_t)ext_cases[i].size_delta
                            : h.dir_size + (uint64_t)ext_cases[i].size_delta;
        set_ext(p, ext_cases[i].nb, ext_cases[i].reserved, size,
                h.dir_off + ext_cases[i].off_delta);
        char *m = open_fails(p, 0, ext_cases[i].name);
        if (!strstr(m, ext_cases[i].want))
            fail_msg("%s: \"%s\" lacks \"%s\"", ext_cases[i].name, m,
                     ext_cases[i].want);
        free(m);
        struct cbt_check_result res;
        struct cbt_error *err = NULL;
        ok(cbt_image_check(p, "qcow2", 0, &res, NULL, NULL, &err), err,
           "check");
        assert_true(res.corruptions > 0);
        repair_keeps(p, ext_cases[i].kept, ext_cases[i].name);
    }
    free(dir);

    /* An extension whose length is not 24. */
    copy_file(base, p);
    uint8_t len[4];
    stbe32(len, 32); /* swallows the end marker; zeroes follow */
    write_file_range(p, h.ext_off - 4, len, 4);
    char *m = open_fails(p, 0, "length 32");
    assert_non_null(strstr(m, "bitmaps_ext: Invalid extension length"));
    free(m);
    repair_keeps(p, "", "length 32");

    /* A table entry with reserved bits, and one with offset and bit 0. */
    for (int k = 0; k < 2; k++) {
        copy_file(base, p);
        uint8_t e[8];
        stbe64(e, k == 0 ? 0x2ull : (real[1].table_off + 65536) | 1);
        write_file_range(p, real[1].table_off, e, 8);
        m = open_fails(p, 0, "table entry");
        assert_non_null(strstr(m, "Could not read bitmap_table table from "
                                  "image for bitmap 'b2': entry 0 is invalid"));
        free(m);
        struct cbt_check_result res;
        struct cbt_error *err = NULL;
        ok(cbt_image_check(p, "qcow2", 0, &res, NULL, NULL, &err), err,
           "check");
        assert_true(res.corruptions > 0);
        repair_keeps(p, "b1", "table entry");
    }

    /* An in_use entry may have a table too small for the size. */
    copy_file(base, p);
    uint8_t d2[256] = { 0 };
    uint64_t pos = add_entry(d2, 0, real[0].table_off, real[0].table_size,
                             FLAG_AUTO | FLAG_IN_USE, 1, 9, "b1", 2, 0);
    pos = add_entry(d2, pos, real[1].table_off, real[1].table_size, FLAG_AUTO,
                    1, 12, "b2", 2, 0);
    put_dir(p, d2, pos, 2);
    struct cbt_image *img = open_img(p, 0);
    close_img(img);
}

/* ==== the API ==== */

static void test_api_errors(void **state)
{
    (void)state;
    const char *p = path_of("api.qcow2");
    create(p, 16 * MiB, 65536, 3);
    struct cbt_image *img = open_img(p, CBT_OPEN_RDWR);
    struct cbt_error *err = NULL;
    ok(cbt_bitmap_add(img, "a", 0, false, &err), err, "add");
    expect_error(cbt_bitmap_add(img, "a", 0, false, &err), &err,
                 "Bitmap already exists: a", "dup");
    expect_error(cbt_bitmap_add(img, "", 0, false, &err), &err,
                 "Bitmap name cannot be empty", "empty");
    expect_error(cbt_bitmap_add(img, NULL, 0, false, &err), &err,
                 "Bitmap name cannot be empty", "null");
    static const uint64_t bad_g[] = { 1, 256, 511, 1000, 3 * MiB };
    for (size_t i = 0; i < ARRAY_SIZE(bad_g); i++) {
        expect_error(cbt_bitmap_add(img, "g", bad_g[i], false, &err), &err,
                     "Granularity must be power of 2 and at least 512", "gran");
    }
    expect_error(cbt_bitmap_add(img, "g", 1ull << 32, false, &err), &err,
                 "Granularity exceeds maximum (2147483648 bytes)", "gran max");
    ok(cbt_bitmap_add(img, "g31", 1ull << 31, false, &err), err, "gran 2^31");
    char name[1025];
    memset(name, 'x', 1024);
    name[1024] = 0;
    expect_error(cbt_bitmap_add(img, name, 0, false, &err), &err,
                 "Name length exceeds maximum (1023 characters)", "long");
    name[1023] = 0;
    ok(cbt_bitmap_add(img, name, 0, false, &err), err, "1023");
    expect_error(cbt_bitmap_remove(img, "nosuch", &err), &err,
                 "Dirty bitmap 'nosuch' not found", "remove");
    expect_error(cbt_bitmap_clear(img, "nosuch", &err), &err,
                 "Dirty bitmap 'nosuch' not found", "clear");
    expect_error(cbt_bitmap_merge(img, "a", img, "nosuch", &err), &err,
                 "Dirty bitmap 'nosuch' not found", "merge");
    expect_error(cbt_bitmap_rename(img, "a", "g31", &err), &err,
                 "Bitmap already exists: g31", "rename");
    expect_error(cbt_bitmap_rename(img, "a", "", &err), &err,
                 "Bitmap name cannot be empty", "rename empty");
    expect_error(cbt_bitmap_extents(img, "a", NULL, NULL, &err), &err,
                 "no extent callback", "extents");
    expect_error(cbt_bitmap_list(NULL, NULL, NULL, &err), &err, "no image",
                 "list");
    ok(cbt_bitmap_rename(img, "a", "renamed", &err), err, "rename");
    close_img(img);
    check_clean(p);

    /* The image on disk has what the session left. */
    struct dirent v[4];
    assert_int_equal(read_dir(p, v, 4), 3);
    assert_string_equal(v[0].name, "renamed");
    assert_string_equal(v[1].name, "g31");
    assert_int_equal(v[1].gbits, 31);
    assert_int_equal(strlen(v[2].name), 1023);

    /* Read-only: nothing can be changed. */
    img = open_img(p, 0);
    expect_error(cbt_bitmap_add(img, "n", 0, false, &err), &err,
                 "opened read-only", "add ro");
    expect_error(cbt_bitmap_remove(img, "renamed", &err), &err,
                 "Bitmap 'renamed' is readonly and cannot be modified", "ro");
    expect_error(cbt_bitmap_clear(img, "renamed", &err), &err,
                 "is readonly and cannot be modified", "ro clear");
    /* QEMU allows enabling and disabling a read-only bitmap in memory, but
     * such a change cannot be committed. */
    ok(cbt_bitmap_disable(img, "renamed", &err), err, "disable ro");
    expect_error(cbt_bitmap_commit(img, &err), &err, "read-only", "commit ro");
    ok(cbt_bitmap_rollback(img, &err), err, "rollback");
    ok(cbt_bitmap_commit(img, &err), err, "commit ro unchanged");
    close_img(img);

    /* v2 images and raw images cannot hold persistent bitmaps. */
    const char *v2 = path_of("v2.qcow2");
    create(v2, 16 * MiB, 65536, 2);
    img = open_img(v2, CBT_OPEN_RDWR);
    expect_error(cbt_bitmap_add(img, "a", 0, false, &err), &err,
                 "Cannot store dirty bitmaps in qcow2 v2 files", "v2");
    close_img(img);
    const char *raw = path_of("r.raw");
    struct cbt_create_opts o = {.struct_size = sizeof(struct cbt_create_opts),
                                .format = "raw",
                                .size = MiB,
                                .size_given = true};
    ok(cbt_image_create(raw, &o, &err), err, "create raw");
    img = open_img(raw, CBT_OPEN_RDWR);
    expect_error(cbt_bitmap_add(img, "a", 0, false, &err), &err,
                 "Can't store persistent bitmaps to", "raw");
    close_img(img);

    /* A zero-size image cannot hold a qcow2 bitmap (QEMU loses it). */
    const char *z = path_of("z.qcow2");
    create(z, 0, 65536, 3);
    img = open_img(z, CBT_OPEN_RDWR);
    expect_error(cbt_bitmap_add(img, "a", 0, false, &err), &err,
                 "the image is empty", "zero size");
    close_img(img);

    /* Too much space: 4 TiB at 512 bytes needs 1 GiB of bits. */
    const char *big = path_of("4t.qcow2");
    create(big, 4 * TiB, 65536, 3);
    img = open_img(big, CBT_OPEN_RDWR);
    expect_error(cbt_bitmap_add(img, "a", 512, false, &err), &err,
                 "Too much space will be occupied by the bitmap", "space");
    close_img(img);
}

/* Rollback restores the last commit; writes made since stay recorded. */
static void test_rollback(void **state)
{
    (void)state;
    const char *p = path_of("rb.qcow2");
    create(p, 32 * MiB, 65536, 3);
    struct cbt_image *img = open_img(p, CBT_OPEN_RDWR);
    struct cbt_error *err = NULL;
    struct model a;
    model_init(&a, 32 * MiB, 65536);
    ok(cbt_bitmap_add(img, "a", 0, false, &err), err, "add");
    write_pattern(img, 0, 1000);
    model_set(&a, 0, 1000);
    ok(cbt_bitmap_commit(img, &err), err, "commit");

    ok(cbt_bitmap_add(img, "b", 0, false, &err), err, "add b");
    ok(cbt_bitmap_clear(img, "a", &err), err, "clear a");
    ok(cbt_bitmap_rename(img, "a", "a2", &err), err, "rename");
    write_pattern(img, 5 * MiB, 10);
    model_set(&a, 5 * MiB, 10);
    ok(cbt_bitmap_rollback(img, &err), err, "rollback");
    struct cbt_bitmap_info *list;
    size_t n;
    ok(cbt_bitmap_list(img, &list, &n, &err), err, "list");
    assert_int_equal(n, 1);
    assert_string_equal(list[0].name, "a");
    cbt_bitmap_info_free_list(list, n);
    expect_model(img, "a", &a);

    /* Remove, write, roll back: the bitmap returns with the write. */
    ok(cbt_bitmap_remove(img, "a", &err), err, "remove");
    write_pattern(img, 9 * MiB, 10);
    model_set(&a, 9 * MiB, 10);
    ok(cbt_bitmap_rollback(img, &err), err, "rollback");
    expect_model(img, "a", &a);

    /* Disable, roll back: recording again. */
    ok(cbt_bitmap_disable(img, "a", &err), err, "disable");
    ok(cbt_bitmap_rollback(img, &err), err, "rollback");
    write_pattern(img, 20 * MiB, 1);
    model_set(&a, 20 * MiB, 1);
    expect_model(img, "a", &a);

    /* Changes, then rolled back, then close: the disk has the commit plus
     * the writes. */
    ok(cbt_bitmap_clear(img, "a", &err), err, "clear");
    ok(cbt_bitmap_rollback(img, &err), err, "rollback");
    close_img(img);
    check_clean(p);
    img = open_img(p, 0);
    expect_model(img, "a", &a);
    ok(cbt_bitmap_list(img, &list, &n, &err), err, "list");
    assert_int_equal(n, 1);
    cbt_bitmap_info_free_list(list, n);
    close_img(img);
    free(a.bit);
}

/* Many changes, one commit: all of them on disk, in one directory. */
static void test_commit_atomic(void **state)
{
    (void)state;
    const char *p = path_of("at.qcow2");
    create(p, 32 * MiB, 65536, 3);
    struct cbt_image *img = open_img(p, CBT_OPEN_RDWR);
    struct cbt_error *err = NULL;
    ok(cbt_bitmap_add(img, "x", 0, false, &err), err, "add");
    ok(cbt_bitmap_add(img, "y", 0, false, &err), err, "add");
    ok(cbt_bitmap_commit(img, &err), err, "commit");
    struct disk_hdr before;
    read_hdr(p, &before);

    ok(cbt_bitmap_add(img, "z", 4096, true, &err), err, "add");
    ok(cbt_bitmap_remove(img, "x", &err), err, "remove");
    ok(cbt_bitmap_rename(img, "y", "y2", &err), err, "rename");
    /* Nothing reaches the disk before the commit. */
    struct dirent v[4];
    assert_int_equal(read_dir(p, v, 4), 2);
    ok(cbt_bitmap_commit(img, &err), err, "commit");
    assert_int_equal(read_dir(p, v, 4), 2);
    assert_string_equal(v[0].name, "y2");
    assert_string_equal(v[1].name, "z");
    assert_int_equal(v[1].flags, 0);
    assert_int_equal(v[1].gbits, 12);
    struct disk_hdr after;
    read_hdr(p, &after);
    assert_int_not_equal(after.dir_off, before.dir_off);
    check_no_corruption(p, 0);
    ok(cbt_bitmap_remove(img, "y2", &err), err, "remove");
    ok(cbt_bitmap_remove(img, "z", &err), err, "remove");
    close_img(img);
    /* No bitmaps left: no extension, bit 0 clear. */
    read_hdr(p, &after);
    assert_int_equal(after.ext_off, 0);
    assert_false(after.autoclear & 1);
    check_clean(p);
}

/* Merge equals the naive model, across granularities and images. */
static void test_merge(void **state)
{
    (void)state;
    static const uint64_t grans[] = { 512, 4096, 65536, 1 * MiB };
    const uint64_t size = 40 * MiB + 1536;
    const char *p = path_of("m.qcow2");
    const char *q = path_of("m2.qcow2");
    create(p, size, 65536, 3);
    create(q, size, 4096, 3);
    struct cbt_image *img = open_img(p, CBT_OPEN_RDWR);
    struct cbt_image *other = open_img(q, CBT_OPEN_RDWR);
    struct cbt_error *err = NULL;
    struct model m[4], o;
    char names[4][8];
    for (int i = 0; i < 4; i++) {
        snprintf(names[i], sizeof(names[i]), "g%d", i);
        model_init(&m[i], size, grans[i]);
        ok(cbt_bitmap_add(img, names[i], grans[i], false, &err), err, "add");
    }
    model_init(&o, size, 2048);
    ok(cbt_bitmap_add(other, "o", 2048, false, &err), err, "add");
    for (int w = 0; w < 60; w++) {
        uint64_t off = rnd(size), len = 1 + rnd(300000);
        len = MIN(len, size - off);
        /* each bitmap sees a different subset of the writes */
        int mask = (int)rnd(16);
        for (int i = 0; i < 4; i++)
            if (!(mask & (1 << i)))
                ok(cbt_bitmap_disable(img, names[i], &err), err, "disable");
        write_pattern(img, off, len);
        for (int i = 0; i < 4; i++) {
            if (mask & (1 << i))
                model_set(&m[i], off, len);
            else
                ok(cbt_bitmap_enable(img, names[i], &err), err, "enable");
        }
        if (w % 3 == 0) {
            write_pattern(other, off, len);
            model_set(&o, off, len);
        }
    }
    for (int d = 0; d < 4; d++) {
        for (int s = 0; s < 4; s++) {
            if (d == s)
                continue;
            ok(cbt_bitmap_merge(img, names[d], img, names[s], &err), err,
               "merge");
            model_merge(&m[d], &m[s]);
            expect_model(img, names[d], &m[d]);
        }
        ok(cbt_bitmap_merge(img, names[d], other, "o", &err), err,
           "merge other");
        model_merge(&m[d], &o);
        expect_model(img, names[d], &m[d]);
    }
    /* Into itself: nothing changes. */
    ok(cbt_bitmap_merge(img, "g0", img, "g0", &err), err, "self");
    expect_model(img, "g0", &m[0]);

    /* Different sizes: refused, target unchanged. */
    const char *r = path_of("m3.qcow2");
    create(r, size + 512, 65536, 3);
    struct cbt_image *third = open_img(r, CBT_OPEN_RDWR);
    ok(cbt_bitmap_add(third, "t", 0, false, &err), err, "add");
    write_pattern(third, 0, 1);
    expect_error(cbt_bitmap_merge(img, "g1", third, "t", &err), &err,
                 "Bitmaps are of different sizes (destination size is "
                 "41944576, source size is 41945088) and can't be merged",
                 "sizes");
    expect_model(img, "g1", &m[1]);
    /* With CBT_MERGE_RESIZE a larger source is cut to the target's size
     * (its dirty last byte lies past the end and is dropped) ... */
    write_pattern(third, size - 4096, 4096 + 512);
    ok(cbt_bitmap_merge_flags(img, "g1", third, "t", CBT_MERGE_RESIZE, &err),
       err, "merge resize larger");
    /* t's 64 KiB granules, cut at the target's end. */
    model_set(&m[1], 0, 65536);
    uint64_t last = (size - 4096) / 65536 * 65536;
    model_set(&m[1], last, size - last);
    expect_model(img, "g1", &m[1]);
    /* ... and a smaller one is extended clean. */
    const char *sm = path_of("m4.qcow2");
    create(sm, size / 2 + 512, 4096, 3);
    struct cbt_image *small = open_img(sm, CBT_OPEN_RDWR);
    ok(cbt_bitmap_add(small, "s", 512, false, &err), err, "add");
    write_pattern(small, size / 2, 512);
    write_pattern(small, 1000, 3000);
    ok(cbt_bitmap_merge_flags(img, "g0", small, "s", CBT_MERGE_RESIZE, &err),
       err, "merge resize smaller");
    model_set(&m[0], size / 2, 512);
    model_set(&m[0], 1000, 3000);
    expect_model(img, "g0", &m[0]);
    close_img(small);
    close_img(third);
    close_img(other);
    close_img(img);
    check_clean(p);
    img = open_img(p, 0);
    for (int i = 0; i < 4; i++) {
        expect_model(img, names[i], &m[i]);
        free(m[i].bit);
    }
    close_img(img);
    free(o.bit);
}

/* Resize grows and shrinks the bitmaps; inconsistent ones refuse it. */
static void test_resize(void **state)
{
    (void)state;
    const char *p = path_of("rs.qcow2");
    create(p, 10 * MiB, 65536, 3);
    struct cbt_image *img = open_img(p, CBT_OPEN_RDWR);
    struct cbt_error *err = NULL;
    ok(cbt_bitmap_add(img, "a", 4096, false, &err), err, "add");
    write_pattern(img, 10 * MiB - 1, 1);
    ok(cbt_bitmap_commit(img, &err), err, "commit");
    ok(cbt_image_resize(img, 100 * MiB + 512, false, &err), err, "grow");
    /* Growing keeps the entry valid on disk (its table covers the new
     * size, or a longer one lands with the size in one header update):
     * another reader sees the grown bitmap at once. */
    assert_int_equal(disk_flags(p, "a"), FLAG_AUTO);
    struct model m;
    model_init(&m, 100 * MiB + 512, 4096);
    model_set(&m, 10 * MiB - 1, 1);
    expect_model(img, "a", &m);
    struct cbt_image *reader = open_img(p, 0);
    expect_model(reader, "a", &m);
    close_img(reader);
    write_pattern(img, 100 * MiB, 512);
    model_set(&m, 100 * MiB, 512);
    close_img(img);
    check_clean(p);
    img = open_img(p, CBT_OPEN_RDWR);
    expect_model(img, "a", &m);
    ok(cbt_image_resize(img, 6 * MiB + 1000, true, &err), err, "shrink");
    free(m.bit);
    model_init(&m, 6 * MiB + 1024, 4096);
    expect_model(img, "a", &m);
    write_pattern(img, 6 * MiB, 1024);
    model_set(&m, 6 * MiB, 1024);
    close_img(img);
    check_clean(p);
    img = open_img(p, 0);
    expect_model(img, "a", &m);
    close_img(img);
    free(m.bit);

    /* 512-byte clusters: growing 1 MiB -> 64 MiB needs a 4-entry table
     * instead of 1; it is valid on disk at once, QEMU-exact. */
    const char *q = path_of("rs512.qcow2");
    create(q, 1 * MiB, 512, 3);
    struct cbt_image *small = open_img(q, CBT_OPEN_RDWR);
    ok(cbt_bitmap_add(small, "t", 4096, false, &err), err, "add");
    write_pattern(small, 700 * KiB, 5000);
    ok(cbt_bitmap_commit(small, &err), err, "commit");
    ok(cbt_image_resize(small, 64 * MiB, false, &err), err, "grow 512");
    assert_int_equal(disk_flags(q, "t"), FLAG_AUTO);
    struct model m2;
    model_init(&m2, 64 * MiB, 4096);
    model_set(&m2, 700 * KiB, 5000);
    reader = open_img(q, 0);
    expect_model(reader, "t", &m2);
    close_img(reader);
    close_img(small);
    check_clean(q);
    free(m2.bit);

    /* An inconsistent bitmap blocks a resize. */
    struct dirent v[1];
    assert_int_equal(read_dir(p, v, 1), 1);
    struct disk_hdr h;
    read_hdr(p, &h);
    uint8_t f[4];
    stbe32(f, FLAG_AUTO | FLAG_IN_USE);
    write_file_range(p, h.dir_off + 12, f, 4);
    img = open_img(p, CBT_OPEN_RDWR);
    expect_error(cbt_image_resize(img, 20 * MiB, false, &err), &err,
                 "Bitmap 'a' is inconsistent and cannot be used", "resize");
    ok(cbt_bitmap_remove(img, "a", &err), err, "remove");
    ok(cbt_image_resize(img, 20 * MiB, false, &err), err, "resize");
    close_img(img);
    check_clean(p);
}

/* FIPS 180-4 example vectors, and split updates. */
static void test_sha256(void **state)
{
    (void)state;
    static const struct { const char *in; const char *out; } v[] = {
        { "", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855" },
        { "abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad" },
        { "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
          "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1" },
        { "abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopqklmnopqrlmnopqrsmnopqrstnopqrstu",
          "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1" },
    };
    for (size_t i = 0; i < ARRAY_SIZE(v); i++) {
        for (size_t split = 0; split <= strlen(v[i].in); split += 7) {
            struct sha256_ctx c;
            uint8_t d[32];
            char hex[65];
            sha256_init(&c);
            sha256_update(&c, v[i].in, split);
            sha256_update(&c, v[i].in + split, strlen(v[i].in) - split);
            sha256_final(&c, d);
            sha256_hex(d, hex);
            assert_string_equal(hex, v[i].out);
        }
    }
    /* One million 'a' (FIPS 180-2 appendix B.3). */
    static char mil[1000000];
    memset(mil, 'a', sizeof(mil));
    struct sha256_ctx c;
    uint8_t d[32];
    char hex[65];
    sha256_init(&c);
    sha256_update(&c, mil, sizeof(mil));
    sha256_final(&c, d);
    sha256_hex(d, hex);
    assert_string_equal(hex, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");

    /* An empty bitmap of 9 bits hashes its 2 zero bytes. */
    const char *p = path_of("h.qcow2");
    create(p, 9 * 512, 512, 3);
    struct cbt_image *img = open_img(p, CBT_OPEN_RDWR);
    struct cbt_error *err = NULL;
    ok(cbt_bitmap_add(img, "h", 512, false, &err), err, "add");
    ok(cbt_bitmap_sha256(img, "h", hex, &err), err, "sha");
    static const uint8_t two[2];
    sha256_init(&c);
    sha256_update(&c, two, 2);
    sha256_final(&c, d);
    char want[65];
    sha256_hex(d, want);
    assert_string_equal(hex, want);
    close_img(img);
}

/*
 * Lazy bits: after a reopen no bitmap is loaded.  A bitmap disabled before
 * the first write stays on disk while its rollback twin (still recording)
 * is loaded by the write; views of it, a rollback, a merge streamed from a
 * bitmap never loaded, a clear without reading, an enable and a commit
 * must all give the model's bits, on disk too.
 */
static void test_lazy_bits(void **state)
{
    (void)state;
    const char *p = path_of("lazy.qcow2");
    const uint64_t size = 48 * MiB + 4096;
    create(p, size, 65536, 3);
    struct cbt_image *img = open_img(p, CBT_OPEN_RDWR);
    struct cbt_error *err = NULL;
    struct model r, d, r_old;
    model_init(&r, size, 65536);
    model_init(&d, size, 4096);
    model_init(&r_old, size, 65536);
    ok(cbt_bitmap_add(img, "r", 65536, false, &err), err, "add r");
    ok(cbt_bitmap_add(img, "d", 4096, false, &err), err, "add d");
    write_pattern(img, 3 * MiB + 512, 70000);
    model_set(&r, 3 * MiB + 512, 70000);
    model_set(&d, 3 * MiB + 512, 70000);
    ok(cbt_bitmap_disable(img, "d", &err), err, "disable d");
    write_pattern(img, size - 100, 100);
    model_set(&r, size - 100, 100);
    close_img(img);
    memcpy(r_old.bit, r.bit, r.n);

    img = open_img(p, CBT_OPEN_RDWR);
    ok(cbt_bitmap_disable(img, "r", &err), err, "disable r");
    write_pattern(img, 20 * MiB, 5000); /* the rollback point's r records */
    expect_model(img, "r", &r_old);
    expect_model(img, "d", &d);
    ok(cbt_bitmap_rollback(img, &err), err, "rollback");
    model_set(&r, 20 * MiB, 5000);
    expect_model(img, "r", &r);
    uint64_t c;
    ok(cbt_bitmap_count(img, "d", &c, &err), err, "count d");
    assert_int_equal(c, model_count(&d));

    /* d was never loaded: the merge streams it into r. */
    ok(cbt_bitmap_merge(img, "r", NULL, "d", &err), err, "merge");
    model_merge(&r, &d);
    expect_model(img, "r", &r);
    ok(cbt_bitmap_commit(img, &err), err, "commit");
    ok(cbt_bitmap_clear(img, "d", &err), err, "clear d");
    memset(d.bit, 0, d.n);
    ok(cbt_bitmap_enable(img, "d", &err), err, "enable d");
    write_pattern(img, 40 * MiB, 4096);
    model_set(&d, 40 * MiB, 4096);
    model_set(&r, 40 * MiB, 4096);
    expect_model(img, "d", &d);
    close_img(img);
    check_clean(p);

    img = open_img(p, 0);
    expect_model(img, "r", &r);
    expect_model(img, "d", &d);
    close_img(img);
    free(r.bit);
    free(d.bit);
    free(r_old.bit);
}

int main(void)
{
    const char *s = getenv("CBT_TEST_SEED");
    seed = s ? strtoull(s, NULL, 0) : (uint64_t)getpid();
    fprintf(stderr, "test_qcow2_bitmaps: seed %" PRIu64 "\n", seed);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_sha256, setup, teardown),
        cmocka_unit_test_setup_teardown(test_roundtrip, setup, teardown),
        cmocka_unit_test_setup_teardown(test_default_granularity, setup, teardown),
        cmocka_unit_test_setup_teardown(test_sparse_1tib, setup, teardown),
        cmocka_unit_test_setup_teardown(test_all_ones_entry, setup, teardown),
        cmocka_unit_test_setup_teardown(test_in_use_lifecycle, setup, teardown),
        cmocka_unit_test_setup_teardown(test_killed_writer, setup, teardown),
        cmocka_unit_test_setup_teardown(test_killed_before_write, setup, teardown),
        cmocka_unit_test_setup_teardown(test_autoclear_clear, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bad_directories, setup, teardown),
        cmocka_unit_test_setup_teardown(test_api_errors, setup, teardown),
        cmocka_unit_test_setup_teardown(test_rollback, setup, teardown),
        cmocka_unit_test_setup_teardown(test_commit_atomic, setup, teardown),
        cmocka_unit_test_setup_teardown(test_merge, setup, teardown),
        cmocka_unit_test_setup_teardown(test_resize, setup, teardown),
        cmocka_unit_test_setup_teardown(test_lazy_bits, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
