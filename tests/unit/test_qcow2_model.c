/*
 * Model-based test of the qcow2 mapping through the public API: a seeded
 * random sequence of writes, zero-writes and discards at unaligned offsets is
 * applied both to an image and to a byte array of its virtual size, and
 * reading the image back must always give the array.
 *
 * The model follows what qemu 7.2 does (checked with qemu-io on real images),
 * since cbt's image commands are drop-in replacements for qemu's:
 *   - a zero-write always reads back as zeroes, with or without MAY_UNMAP;
 *   - a qcow2 discard acts only on the whole clusters inside the range, plus
 *     the partial last cluster of an image whose size is not cluster-aligned
 *     when the range starts at or before that cluster and runs to the end;
 *     partial clusters are left untouched;
 *   - a discarded cluster reads as zeroes, with a backing file too (v3 and
 *     extended L2 set the zero flag rather than exposing the backing file);
 *   - on a compat=0.10 (v2) image with a backing file, discard does nothing
 *     (v2 has no zero flag, so qemu refuses rather than expose stale data);
 *   - a raw layer's discard leaves the range unspecified (the model stops
 *     comparing those bytes).
 * Backing layers get their own random content first; the model of a layer
 * is the whole chain's view, so it starts as a copy of the layer below.
 *
 * Besides reads, every verification walks cbt_image_block_status over the
 * image: extents must tile it, ZERO extents must be zero in the model, and a
 * DATA extent with a host offset must hold the model's bytes at that offset
 * of the named file.  At the end cbt_image_check must find nothing wrong.
 *
 * CBT_TEST_SEED=N picks the seed (printed on failure); CBT_TEST_FILTER=glob
 * runs only matching configurations.
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
#include <unistd.h>

#include <cmocka.h>

#include <cbt/image.h>

#include "tmpdir.h"

#define KiB 1024ull
#define MiB (1024ull * 1024)
#define MAX_LAYERS 3
#define MIN(a, b) ((a) < (b) ? (a) : (b))

/* ---- configurations ---- */

struct layer_cfg {
    const char *format;      /* "qcow2" or "raw" */
    uint32_t cluster_size;   /* 0: default (64 KiB) */
    int refcount_bits;       /* 0: default (16) */
    bool extended_l2;
    int compat;              /* 0: default (3) */
    uint64_t size;           /* 0: take it from the backing file */
    bool data_file;
    bool data_file_raw;
    bool lazy_refcounts;
    bool relative_backing;   /* store the backing file name relative */
    int nb_ops;
};

/* layers[0] is the bottom of the chain, layers[nb_layers-1] the top. */
struct config {
    const char *name;
    int nb_layers;
    struct layer_cfg layers[MAX_LAYERS];
};

#define Q(...) { .format = "qcow2", __VA_ARGS__ }
#define RAW(...) { .format = "raw", __VA_ARGS__ }

static const struct config configs[] = {
    /* cluster sizes and refcount widths, no backing */
    { "c512_rb16", 1, { Q(.cluster_size = 512, .refcount_bits = 16,
                          .size = 2 * MiB + 512, .nb_ops = 400) } },
    { "c512_rb1", 1, { Q(.cluster_size = 512, .refcount_bits = 1,
                         .size = 3 * MiB, .nb_ops = 400) } },
    { "c4k_rb1", 1, { Q(.cluster_size = 4096, .refcount_bits = 1,
                        .size = 4 * MiB + 1536, .nb_ops = 400) } },
    { "c4k_rb2", 1, { Q(.cluster_size = 4096, .refcount_bits = 2,
                        .size = 4 * MiB, .nb_ops = 400) } },
    { "c64k_rb4", 1, { Q(.cluster_size = 64 * KiB, .refcount_bits = 4,
                         .size = 6 * MiB + 4096, .nb_ops = 400) } },
    { "c64k_rb8", 1, { Q(.cluster_size = 64 * KiB, .refcount_bits = 8,
                         .size = 4 * MiB, .nb_ops = 400) } },
    { "defaults", 1, { Q(.size = 5 * MiB + 512, .nb_ops = 400) } },
    { "c64k_rb32", 1, { Q(.cluster_size = 64 * KiB, .refcount_bits = 32,
                          .size = 4 * MiB, .nb_ops = 400) } },
    { "c4k_rb64", 1, { Q(.cluster_size = 4096, .refcount_bits = 64,
                         .size = 3 * MiB + 2560, .nb_ops = 400) } },
    { "c2m_rb16", 1, { Q(.cluster_size = 2 * MiB, .refcount_bits = 16,
                         .size = 8 * MiB + 65536, .nb_ops = 200) } },
    { "c2m_rb64", 1, { Q(.cluster_size = 2 * MiB, .refcount_bits = 64,
                         .size = 6 * MiB, .nb_ops = 200) } },
    { "c64k_lazy", 1, { Q(.cluster_size = 64 * KiB, .lazy_refcounts = true,
                          .size = 4 * MiB, .nb_ops = 300) } },
    /* extended L2 */
    { "xl2_c16k_rb16", 1, { Q(.cluster_size = 16 * KiB, .extended_l2 = true,
                              .size = 4 * MiB + 512, .nb_ops = 400) } },
    { "xl2_c64k_rb2", 1, { Q(.cluster_size = 64 * KiB, .extended_l2 = true,
                             .refcount_bits = 2, .size = 5 * MiB,
                             .nb_ops = 400) } },
    { "xl2_c32k_rb64", 1, { Q(.cluster_size = 32 * KiB, .extended_l2 = true,
                              .refcount_bits = 64, .size = 3 * MiB + 8192,
                              .nb_ops = 400) } },
    { "xl2_c2m_rb8", 1, { Q(.cluster_size = 2 * MiB, .extended_l2 = true,
                            .refcount_bits = 8, .size = 8 * MiB + 4096,
                            .nb_ops = 200) } },
    /* compat 0.10 */
    { "v2_c64k", 1, { Q(.cluster_size = 64 * KiB, .compat = 2,
                        .size = 4 * MiB + 512, .nb_ops = 400) } },
    { "v2_c4k", 1, { Q(.cluster_size = 4096, .compat = 2,
                       .size = 3 * MiB, .nb_ops = 400) } },
    /* external data file */
    { "datafile_c64k", 1, { Q(.cluster_size = 64 * KiB, .data_file = true,
                              .size = 4 * MiB + 512, .nb_ops = 400) } },
    { "datafile_raw_c4k", 1, { Q(.cluster_size = 4096, .data_file = true,
                                 .data_file_raw = true, .size = 3 * MiB,
                                 .nb_ops = 400) } },
    { "datafile_xl2_c32k", 1, { Q(.cluster_size = 32 * KiB, .data_file = true,
                                  .extended_l2 = true, .refcount_bits = 4,
                                  .size = 4 * MiB, .nb_ops = 400) } },
    /* backing chains */
    { "back1_c64k_over_c4k", 2, {
        Q(.cluster_size = 4096, .size = 4 * MiB, .nb_ops = 120),
        Q(.cluster_size = 64 * KiB, .size = 4 * MiB, .nb_ops = 400) } },
    { "back1_xl2_c32k_short_backing", 2, {
        Q(.cluster_size = 64 * KiB, .extended_l2 = true,
          .size = 2 * MiB + 4096, .nb_ops = 120),
        Q(.cluster_size = 32 * KiB, .extended_l2 = true, .refcount_bits = 8,
          .size = 4 * MiB, .nb_ops = 400) } },
    { "back1_c512_rb4_size_from_backing", 2, {
        Q(.cluster_size = 64 * KiB, .size = 2 * MiB + 1024, .nb_ops = 120),
        Q(.cluster_size = 512, .refcount_bits = 4, .size = 0,
          .nb_ops = 400) } },
    { "back2_raw_qcow2_c4k_relative", 3, {
        RAW(.size = 3 * MiB, .nb_ops = 80),
        Q(.cluster_size = 64 * KiB, .size = 3 * MiB, .relative_backing = true,
          .nb_ops = 120),
        Q(.cluster_size = 4096, .refcount_bits = 8, .size = 4 * MiB,
          .relative_backing = true, .nb_ops = 400) } },
    { "back2_xl2_c64k", 3, {
        Q(.cluster_size = 512, .size = 4 * MiB, .nb_ops = 120),
        Q(.cluster_size = 16 * KiB, .extended_l2 = true, .size = 0,
          .nb_ops = 120),
        Q(.cluster_size = 64 * KiB, .extended_l2 = true, .size = 0,
          .nb_ops = 400) } },
    { "back1_c2m_over_longer", 2, {
        Q(.cluster_size = 64 * KiB, .size = 8 * MiB, .nb_ops = 100),
        Q(.cluster_size = 2 * MiB, .refcount_bits = 32,
          .size = 6 * MiB + 512, .nb_ops = 200) } },
    { "back1_v2_c64k", 2, {
        Q(.cluster_size = 4096, .compat = 2, .size = 4 * MiB, .nb_ops = 120),
        Q(.cluster_size = 64 * KiB, .compat = 2, .size = 4 * MiB,
          .nb_ops = 400) } },
    { "back2_v2_c4k_over_v3", 3, {
        RAW(.size = 2 * MiB, .nb_ops = 60),
        Q(.cluster_size = 64 * KiB, .size = 2 * MiB + 512, .nb_ops = 100),
        Q(.cluster_size = 4096, .compat = 2, .size = 0, .nb_ops = 400) } },
    { "back1_datafile_xl2_c64k", 2, {
        Q(.cluster_size = 4096, .size = 4 * MiB, .nb_ops = 120),
        Q(.cluster_size = 64 * KiB, .extended_l2 = true, .data_file = true,
          .size = 4 * MiB, .nb_ops = 400) } },
    /* raw on its own: the harness itself (discard leaves bytes unspecified) */
    { "raw_only", 1, { RAW(.size = 2 * MiB + 512, .nb_ops = 200) } },
};

/* ---- random numbers ---- */

static uint64_t base_seed;

static uint64_t splitmix64(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Uniform in [0, n), n > 0. */
static uint64_t rnd(uint64_t *s, uint64_t n)
{
    return splitmix64(s) % n;
}

static void fill_random(uint64_t *s, uint8_t *buf, size_t len)
{
    size_t i = 0;
    for (; i + 8 <= len; i += 8) {
        uint64_t v = splitmix64(s);
        memcpy(buf + i, &v, 8);
    }
    if (i < len) {
        uint64_t v = splitmix64(s);
        memcpy(buf + i, &v, len - i);
    }
}

/* ---- state ---- */

enum op_kind { OP_WRITE, OP_ZERO, OP_ZERO_UNMAP, OP_DISCARD, OP_READ,
               OP_FLUSH, OP_REOPEN, OP_VERIFY };
static const char *const op_names[] = {
    "write", "write_zeroes", "write_zeroes(MAY_UNMAP)", "discard", "read",
    "flush", "close+reopen", "verify-all",
};

struct op_rec {
    int layer;
    enum op_kind kind;
    uint64_t off, len;
};

struct layer {
    const struct layer_cfg *cfg;
    char *path;
    char *data_path;
    char *backing_name;  /* as stored in the header, or NULL */
    uint64_t size;
    uint32_t cluster_size;
    bool is_qcow2;
    bool v2;
    uint8_t *model;      /* the chain's view through this layer */
    uint8_t *known;      /* 1 where model is specified */
};

struct test_state {
    const struct config *cfg;
    uint64_t seed;       /* this configuration's seed */
    uint64_t rng;
    char *dir;
    struct layer layers[MAX_LAYERS];
    int nb_layers;
    int cur;             /* layer being worked on */
    struct cbt_image *img;
    uint8_t *buf, *buf2;
    size_t buf_size;
    struct op_rec *ops;
    size_t nb_ops, ops_cap;
    char *check_log;
    size_t check_log_len;
};

static void history_print(const struct test_state *ts, uint64_t off)
{
    int shown = 0;
    print_error("  operations covering offset %" PRIu64 " (0x%" PRIx64
                "), newest first:\n", off, off);
    for (size_t i = ts->nb_ops; i-- > 0 && shown < 12;) {
        const struct op_rec *o = &ts->ops[i];
        bool whole = o->kind == OP_REOPEN || o->kind == OP_FLUSH ||
                     o->kind == OP_VERIFY;
        if (whole ? o->layer != ts->cur
                  : !(off >= o->off && off - o->off < o->len))
            continue;
        print_error("    #%zu layer %d %s off=%" PRIu64 " (0x%" PRIx64
                    ") len=%" PRIu64 " (0x%" PRIx64 ")\n", i, o->layer,
                    op_names[o->kind], o->off, o->off, o->len, o->len);
        shown++;
    }
    print_error("  last operations:\n");
    size_t from = ts->nb_ops > 8 ? ts->nb_ops - 8 : 0;
    for (size_t i = from; i < ts->nb_ops; i++) {
        const struct op_rec *o = &ts->ops[i];
        print_error("    #%zu layer %d %s off=0x%" PRIx64 " len=0x%" PRIx64
                    "\n", i, o->layer, op_names[o->kind], o->off, o->len);
    }
}

/* Fail the test with the configuration, the seed and the message. */
#define FAIL(ts, ...) do { \
        print_error("FAIL [%s] seed=0x%" PRIx64 " (rerun: CBT_TEST_SEED=0x%" \
                    PRIx64 " CBT_TEST_FILTER=%s) layer %d/%d (%s), op #%zu: ", \
                    (ts)->cfg->name, (ts)->seed, base_seed, (ts)->cfg->name, \
                    (ts)->cur, (ts)->nb_layers - 1, \
                    (ts)->layers[(ts)->cur].path, (ts)->nb_ops); \
        print_error(__VA_ARGS__); \
        print_error("\n"); \
        fail(); \
    } while (0)

#define CHECK_RC(ts, r, what, o, l) do { \
        int r_ = (r); \
        if (r_ != 0) \
            FAIL(ts, "%s(off=%" PRIu64 ", len=%" PRIu64 ") returned %d (%s)", \
                 what, (uint64_t)(o), (uint64_t)(l), r_, strerror(-r_)); \
    } while (0)

static void record(struct test_state *ts, enum op_kind kind, uint64_t off,
                   uint64_t len)
{
    if (ts->nb_ops == ts->ops_cap) {
        ts->ops_cap = ts->ops_cap ? 2 * ts->ops_cap : 1024;
        ts->ops = realloc(ts->ops, ts->ops_cap * sizeof(*ts->ops));
        assert_non_null(ts->ops);
    }
    ts->ops[ts->nb_ops++] = (struct op_rec){ ts->cur, kind, off, len };
}

static char *xasprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *xasprintf(const char *fmt, ...)
{
    va_list ap;
    char *s = NULL;
    va_start(ap, fmt);
    int r = vasprintf(&s, fmt, ap);
    va_end(ap);
    assert_true(r >= 0);
    return s;
}

static void ensure_buf(struct test_state *ts, size_t len)
{
    if (len <= ts->buf_size)
        return;
    free(ts->buf);
    free(ts->buf2);
    ts->buf = malloc(len);
    ts->buf2 = malloc(len);
    assert_non_null(ts->buf);
    assert_non_null(ts->buf2);
    ts->buf_size = len;
}

/* ---- opening and creating ---- */

static struct cbt_image *open_layer(struct test_state *ts, int i,
                                    const char *format)
{
    struct cbt_error *err = NULL;
    struct cbt_image *img = cbt_image_open(ts->layers[i].path, format,
                                           CBT_OPEN_RDWR, &err);
    if (!img) {
        char *msg = xasprintf("cbt_image_open(%s, %s): %s",
                              ts->layers[i].path, format ? format : "probe",
                              cbt_error_message(err));
        cbt_error_free(err);
        print_error("%s\n", msg);
        free(msg);
        FAIL(ts, "open failed");
    }
    return img;
}

static void close_image(struct test_state *ts)
{
    struct cbt_error *err = NULL;
    struct cbt_image *img = ts->img;
    ts->img = NULL;
    if (cbt_image_close(img, &err) < 0) {
        print_error("cbt_image_close: %s\n", cbt_error_message(err));
        cbt_error_free(err);
        FAIL(ts, "close failed");
    }
}

static void create_layer(struct test_state *ts, int i)
{
    struct layer *l = &ts->layers[i];
    const struct layer_cfg *c = l->cfg;
    struct cbt_create_opts o = CBT_CREATE_OPTS_INIT;
    o.format = c->format;
    o.size = c->size;
    o.size_given = c->size != 0;
    o.cluster_size = c->cluster_size;
    o.compat = c->compat;
    o.refcount_bits = c->refcount_bits;
    o.extended_l2 = c->extended_l2;
    o.lazy_refcounts = c->lazy_refcounts;
    o.data_file = l->data_path;
    o.data_file_raw = c->data_file_raw;
    if (i > 0) {
        o.backing_file = l->backing_name;
        o.backing_format = ts->layers[i - 1].cfg->format;
    }
    struct cbt_error *err = NULL;
    if (cbt_image_create(l->path, &o, &err) < 0) {
        print_error("cbt_image_create(%s): %s\n", l->path,
                    cbt_error_message(err));
        cbt_error_free(err);
        FAIL(ts, "create failed");
    }
}

/* After creation: the image reports what was asked for. */
static void check_info(struct test_state *ts)
{
    struct layer *l = &ts->layers[ts->cur];
    const struct layer_cfg *c = l->cfg;
    struct cbt_image_info info;
    struct cbt_error *err = NULL;
    if (cbt_image_get_info(ts->img, &info, &err) < 0) {
        print_error("cbt_image_get_info: %s\n", cbt_error_message(err));
        cbt_error_free(err);
        FAIL(ts, "get_info failed");
    }
    char what[256] = "";
    uint64_t expect_size = l->size;
    if (info.virtual_size != expect_size)
        snprintf(what, sizeof(what), "virtual_size %" PRIu64 " != %" PRIu64,
                 info.virtual_size, expect_size);
    else if (strcmp(info.format, c->format) != 0)
        snprintf(what, sizeof(what), "format %s != %s", info.format, c->format);
    else if (l->is_qcow2 && info.cluster_size != l->cluster_size)
        snprintf(what, sizeof(what), "cluster_size %u != %u",
                 info.cluster_size, l->cluster_size);
    else if (l->is_qcow2 && !info.is_qcow2)
        snprintf(what, sizeof(what), "is_qcow2 false");
    else if (l->is_qcow2 && info.version != (l->v2 ? 2 : 3))
        snprintf(what, sizeof(what), "version %d", info.version);
    else if (l->is_qcow2 &&
             info.refcount_bits != (c->refcount_bits ? c->refcount_bits : 16))
        snprintf(what, sizeof(what), "refcount_bits %d", info.refcount_bits);
    else if (l->is_qcow2 && info.extended_l2 != c->extended_l2)
        snprintf(what, sizeof(what), "extended_l2 %d", info.extended_l2);
    else if (l->is_qcow2 && info.lazy_refcounts != c->lazy_refcounts)
        snprintf(what, sizeof(what), "lazy_refcounts %d", info.lazy_refcounts);
    else if (l->is_qcow2 && c->data_file &&
             (!info.data_file || info.data_file_raw != c->data_file_raw))
        snprintf(what, sizeof(what), "data_file %s raw %d",
                 info.data_file ? info.data_file : "(none)",
                 info.data_file_raw);
    else if (l->is_qcow2 && !c->data_file && info.data_file)
        snprintf(what, sizeof(what), "unexpected data_file %s", info.data_file);
    else if ((l->backing_name == NULL) != (info.backing_filename == NULL) ||
             (l->backing_name &&
              strcmp(l->backing_name, info.backing_filename) != 0))
        snprintf(what, sizeof(what), "backing_filename %s != %s",
                 info.backing_filename ? info.backing_filename : "(none)",
                 l->backing_name ? l->backing_name : "(none)");
    cbt_image_info_free(&info);
    if (what[0])
        FAIL(ts, "cbt_image_get_info: %s", what);
}

/* ---- verification ---- */

static void compare(struct test_state *ts, const uint8_t *got, uint64_t off,
                    size_t len, const char *how)
{
    struct layer *l = &ts->layers[ts->cur];
    const uint8_t *want = l->model + off;
    const uint8_t *known = l->known + off;
    if (memcmp(got, want, len) == 0)
        return;
    size_t i = 0;
    for (; i < len; i++)
        if (known[i] && got[i] != want[i])
            break;
    if (i == len)
        return;
    size_t j = i;
    while (j < len && (!known[j] || got[j] != want[j]))
        j++;
    history_print(ts, off + i);
    FAIL(ts, "%s: mismatch at offset %" PRIu64 " (0x%" PRIx64 "), %zu bytes"
         " (first run): expected 0x%02x got 0x%02x; read was off=%" PRIu64
         " len=%zu", how, off + i, off + i, j - i, want[i], got[i], off, len);
}

static void read_check(struct test_state *ts, uint64_t off, size_t len,
                       const char *how)
{
    ensure_buf(ts, len);
    memset(ts->buf, 0xa5, len);
    CHECK_RC(ts, cbt_image_pread(ts->img, ts->buf, len, off), "pread", off,
             len);
    compare(ts, ts->buf, off, len, how);
}

static void check_host_bytes(struct test_state *ts, const struct cbt_extent *e)
{
    struct layer *l = &ts->layers[ts->cur];
    int fd = open(e->filename, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        FAIL(ts, "block_status names file '%s' for [%" PRIu64 ", +%" PRIu64
             "): cannot open: %s", e->filename, e->start, e->length,
             strerror(errno));
    ensure_buf(ts, e->length);
    ssize_t n = pread(fd, ts->buf2, e->length, (off_t)e->offset);
    close(fd);
    if (n != (ssize_t)e->length)
        FAIL(ts, "block_status maps [%" PRIu64 ", +%" PRIu64 ") to %s @ %"
             PRIu64 " but only %zd bytes are there", e->start, e->length,
             e->filename, e->offset, n);
    for (uint64_t i = 0; i < e->length; i++) {
        if (l->known[e->start + i] && ts->buf2[i] != l->model[e->start + i]) {
            history_print(ts, e->start + i);
            FAIL(ts, "block_status maps [%" PRIu64 ", +%" PRIu64 ") to %s @ %"
                 PRIu64 " (depth %d) but the file holds 0x%02x at guest "
                 "offset %" PRIu64 " where the model has 0x%02x",
                 e->start, e->length, e->filename, e->offset, e->depth,
                 ts->buf2[i], e->start + i, l->model[e->start + i]);
        }
    }
}

static void check_block_status(struct test_state *ts)
{
    struct layer *l = &ts->layers[ts->cur];
    uint64_t off = 0;
    while (off < l->size) {
        struct cbt_extent e;
        memset(&e, 0, sizeof(e));
        int r = cbt_image_block_status(ts->img, off, l->size - off, &e);
        CHECK_RC(ts, r, "block_status", off, l->size - off);
        if (e.start != off || e.length == 0 || e.length > l->size - off)
            FAIL(ts, "block_status(%" PRIu64 ") gave start %" PRIu64
                 " length %" PRIu64 " (size %" PRIu64 ")", off, e.start,
                 e.length, l->size);
        if (e.depth < 0 || e.depth > ts->cur)
            FAIL(ts, "block_status(%" PRIu64 ") depth %d with %d backing "
                 "layers", off, e.depth, ts->cur);
        if (!(e.flags & CBT_BS_PRESENT) && !(e.flags & CBT_BS_ZERO))
            FAIL(ts, "block_status [%" PRIu64 ", +%" PRIu64 ") is neither "
                 "present nor zero", off, e.length);
        if (e.flags & CBT_BS_ZERO) {
            for (uint64_t i = 0; i < e.length; i++) {
                if (l->known[off + i] && l->model[off + i] != 0) {
                    history_print(ts, off + i);
                    FAIL(ts, "block_status says [%" PRIu64 ", +%" PRIu64
                         ") (flags 0x%x depth %d) reads as zeroes but the "
                         "model has 0x%02x at %" PRIu64, off, e.length,
                         e.flags, e.depth, l->model[off + i], off + i);
                }
            }
        } else if ((e.flags & CBT_BS_DATA) &&
                   (e.flags & CBT_BS_OFFSET_VALID) &&
                   !(e.flags & CBT_BS_COMPRESSED)) {
            if (!e.filename)
                FAIL(ts, "block_status offset valid but no filename");
            check_host_bytes(ts, &e);
        }
        off += e.length;
    }
}

static void verify_all(struct test_state *ts)
{
    struct layer *l = &ts->layers[ts->cur];
    record(ts, OP_VERIFY, 0, l->size);
    read_check(ts, 0, l->size, "whole-image read");
    /* Random unaligned pieces that tile the image. */
    uint64_t cs = l->cluster_size;
    for (uint64_t off = 0; off < l->size;) {
        uint64_t n = 1 + rnd(&ts->rng, 3 * cs + 1024);
        if (n > l->size - off)
            n = l->size - off;
        read_check(ts, off, n, "piecewise read");
        off += n;
    }
    /* Host bytes are only promised after a flush. */
    CHECK_RC(ts, cbt_image_flush(ts->img), "flush", 0, 0);
    check_block_status(ts);
}

/* ---- the random workload ---- */

static uint64_t gen_off(struct test_state *ts, const struct layer *l)
{
    uint64_t cs = l->cluster_size;
    uint64_t sub = l->cfg->extended_l2 ? cs / 32 : 512;
    uint64_t r = rnd(&ts->rng, 8), off;
    switch (r) {
    case 0: case 1: case 2:
        off = rnd(&ts->rng, l->size);
        break;
    case 3: case 4:
        off = rnd(&ts->rng, (l->size + cs - 1) / cs) * cs;
        break;
    case 5: {
        off = rnd(&ts->rng, l->size / cs + 1) * cs;
        uint64_t d = 1 + rnd(&ts->rng, 511);
        off = (rnd(&ts->rng, 2) && off >= d) ? off - d : off + d;
        break;
    }
    case 6:
        off = rnd(&ts->rng, l->size / sub + 1) * sub;
        break;
    default:
        off = l->size - 1 - rnd(&ts->rng, MIN(l->size, 2 * cs));
        break;
    }
    return off >= l->size ? rnd(&ts->rng, l->size) : off;
}

static uint64_t gen_len(struct test_state *ts, const struct layer *l,
                        uint64_t off)
{
    uint64_t cs = l->cluster_size;
    uint64_t sub = l->cfg->extended_l2 ? cs / 32 : 512;
    uint64_t r = rnd(&ts->rng, 20), len;
    if (r < 4)
        len = 1 + rnd(&ts->rng, 512);
    else if (r < 8)
        len = sub * (1 + rnd(&ts->rng, 4));
    else if (r < 13)
        len = cs * (1 + rnd(&ts->rng, 3));
    else if (r < 18)
        len = 1 + rnd(&ts->rng, 3 * cs + 1);
    else if (r < 19)
        len = 1 + rnd(&ts->rng, l->size / 3);
    else
        len = l->size - off; /* to the end */
    if (len > l->size - off)
        len = l->size - off;
    return len ? len : 1;
}

/* qemu 7.2's qcow2 discard, see the comment at the top. */
static void model_discard(struct layer *l, uint64_t off, uint64_t len)
{
    if (!l->is_qcow2) {
        memset(l->known + off, 0, len);
        return;
    }
    if (l->v2 && l->backing_name)
        return;
    uint64_t cs = l->cluster_size, end = off + len;
    uint64_t c = (off + cs - 1) / cs * cs;
    for (; c < end; c += cs) {
        uint64_t cend = c + cs;
        if (cend <= end || end == l->size) {
            uint64_t e = MIN(cend, l->size);
            memset(l->model + c, 0, e - c);
            memset(l->known + c, 1, e - c);
        }
    }
}

static void reopen(struct test_state *ts)
{
    record(ts, OP_REOPEN, 0, 0);
    close_image(ts);
    /* Alternate between naming the format and probing it. */
    ts->img = open_layer(ts, ts->cur,
                         rnd(&ts->rng, 2) ? ts->layers[ts->cur].cfg->format
                                          : NULL);
    if (cbt_image_size(ts->img) != ts->layers[ts->cur].size)
        FAIL(ts, "size after reopen %" PRIu64 " != %" PRIu64,
             cbt_image_size(ts->img), ts->layers[ts->cur].size);
    verify_all(ts);
}

static void run_ops(struct test_state *ts, int nops)
{
    struct layer *l = &ts->layers[ts->cur];
    bool qcow2 = l->is_qcow2;
    int reopen_at = nops / 2;
    for (int n = 0; n < nops; n++) {
        uint64_t off = gen_off(ts, l);
        uint64_t len = gen_len(ts, l, off);
        uint64_t r = rnd(&ts->rng, 100);
        if (r < 45) {
            ensure_buf(ts, len);
            fill_random(&ts->rng, ts->buf, len);
            record(ts, OP_WRITE, off, len);
            CHECK_RC(ts, cbt_image_pwrite(ts->img, ts->buf, len, off),
                     "pwrite", off, len);
            memcpy(l->model + off, ts->buf, len);
            memset(l->known + off, 1, len);
        } else if (r < 60) {
            bool unmap = r >= 52;
            record(ts, unmap ? OP_ZERO_UNMAP : OP_ZERO, off, len);
            CHECK_RC(ts, cbt_image_pwrite_zeroes(ts->img, off, len,
                                                 unmap ? CBT_ZERO_MAY_UNMAP : 0),
                     unmap ? "pwrite_zeroes(MAY_UNMAP)" : "pwrite_zeroes",
                     off, len);
            memset(l->model + off, 0, len);
            memset(l->known + off, 1, len);
        } else if (r < 75) {
            record(ts, OP_DISCARD, off, len);
            CHECK_RC(ts, cbt_image_discard(ts->img, off, len), "discard", off,
                     len);
            model_discard(l, off, len);
        } else if (r < 94) {
            record(ts, OP_READ, off, len);
            read_check(ts, off, len, "read after op");
        } else if (r < 97) {
            record(ts, OP_FLUSH, 0, 0);
            CHECK_RC(ts, cbt_image_flush(ts->img), "flush", 0, 0);
        } else if (r < 98 && n > 0) {
            reopen(ts);
        } else {
            /* A read that straddles the end of a backing layer. */
            if (ts->cur > 0) {
                uint64_t bsize = ts->layers[ts->cur - 1].size;
                if (bsize < l->size && bsize > 1024) {
                    record(ts, OP_READ, bsize - 1000, 2000);
                    read_check(ts, bsize - 1000, MIN(2000, l->size - bsize + 1000),
                               "read across the backing file's end");
                }
            }
        }
        if (n == reopen_at && qcow2)
            reopen(ts);
        else if (n % 100 == 99)
            verify_all(ts);
    }
    verify_all(ts);
}

static void report_cb(void *opaque, const char *msg)
{
    struct test_state *ts = opaque;
    size_t n = strlen(msg);
    char *p = realloc(ts->check_log, ts->check_log_len + n + 2);
    if (!p)
        return;
    ts->check_log = p;
    memcpy(p + ts->check_log_len, msg, n);
    p[ts->check_log_len + n] = '\n';
    p[ts->check_log_len + n + 1] = '\0';
    ts->check_log_len += n + 1;
}

static void check_clean(struct test_state *ts)
{
    struct layer *l = &ts->layers[ts->cur];
    if (!l->is_qcow2)
        return;
    struct cbt_check_result res;
    struct cbt_error *err = NULL;
    int r = cbt_image_check(l->path, "qcow2", 0, &res, report_cb, ts, &err);
    if (r < 0) {
        print_error("cbt_image_check: %s\n", cbt_error_message(err));
        cbt_error_free(err);
        FAIL(ts, "check could not run");
    }
    if (res.corruptions || res.leaks || res.check_errors) {
        /* cmocka truncates long messages: the first reports, line by line */
        const char *p = ts->check_log ? ts->check_log : "";
        for (int k = 0; *p && k < 12; k++) {
            const char *nl = strchr(p, '\n');
            int n = nl ? (int)(nl - p) : (int)strlen(p);
            print_error("  check: %.*s\n", n, p);
            p += n + (nl != NULL);
        }
        FAIL(ts, "cbt_image_check: %" PRId64 " corruptions, %" PRId64
             " leaks, %" PRId64 " check errors", res.corruptions, res.leaks,
             res.check_errors);
    }
}

/* ---- cmocka plumbing ---- */

static int setup(void **state)
{
    struct test_state *ts = calloc(1, sizeof(*ts));
    if (!ts)
        return -1;
    ts->cfg = *state;
    size_t idx = (size_t)(ts->cfg - configs);
    uint64_t s = base_seed ^ (0x9e3779b97f4a7c15ull * (idx + 1));
    ts->seed = splitmix64(&s);
    ts->rng = ts->seed;
    ts->dir = malloc(TMPDIR_PATH_MAX);
    if (!ts->dir || tmpdir_make(ts->dir, "qcow2-model") < 0) {
        free(ts->dir);
        free(ts);
        return -1;
    }
    *state = ts;
    return 0;
}

static int teardown(void **state)
{
    struct test_state *ts = *state;
    if (ts->img)
        cbt_image_close(ts->img, NULL);
    for (int i = 0; i < MAX_LAYERS; i++) {
        free(ts->layers[i].path);
        free(ts->layers[i].data_path);
        free(ts->layers[i].backing_name);
        free(ts->layers[i].model);
        free(ts->layers[i].known);
    }
    if (!getenv("CBT_TEST_KEEP"))
        (void)tmpdir_remove(ts->dir);
    else
        print_message("kept %s\n", ts->dir);
    free(ts->dir);
    free(ts->buf);
    free(ts->buf2);
    free(ts->ops);
    free(ts->check_log);
    free(ts);
    return 0;
}

static void test_config(void **state)
{
    struct test_state *ts = *state;
    const struct config *cfg = ts->cfg;
    ts->nb_layers = cfg->nb_layers;
    for (int i = 0; i < cfg->nb_layers; i++) {
        struct layer *l = &ts->layers[i];
        const struct layer_cfg *c = &cfg->layers[i];
        bool top = i == cfg->nb_layers - 1;
        l->cfg = c;
        l->is_qcow2 = strcmp(c->format, "qcow2") == 0;
        l->v2 = c->compat == 2;
        l->cluster_size = l->is_qcow2
            ? (c->cluster_size ? c->cluster_size : 65536) : 65536;
        const char *name = top ? "top" : (i == 0 ? "base" : "mid");
        l->path = xasprintf("%s/%s.%s", ts->dir, name, c->format);
        if (c->data_file)
            l->data_path = xasprintf("%s/%s.data", ts->dir, name);
        if (i > 0) {
            const struct layer *b = &ts->layers[i - 1];
            l->backing_name = c->relative_backing
                ? strdup(strrchr(b->path, '/') + 1) : strdup(b->path);
        }
        l->size = c->size ? c->size : ts->layers[i - 1].size;
        l->model = malloc(l->size);
        l->known = malloc(l->size);
        assert_non_null(l->model);
        assert_non_null(l->known);
        memset(l->model, 0, l->size);
        memset(l->known, 1, l->size);
        if (i > 0) {
            const struct layer *b = &ts->layers[i - 1];
            uint64_t n = MIN(b->size, l->size);
            memcpy(l->model, b->model, n);
            memcpy(l->known, b->known, n);
        }

        ts->cur = i;
        create_layer(ts, i);
        ts->img = open_layer(ts, i, c->format);
        if (cbt_image_size(ts->img) != l->size)
            FAIL(ts, "size after create %" PRIu64 " != %" PRIu64,
                 cbt_image_size(ts->img), l->size);
        check_info(ts);
        /* A fresh image reads as its backing chain (or zeroes). */
        verify_all(ts);
        run_ops(ts, c->nb_ops);
        close_image(ts);
        check_clean(ts);
        if (top) {
            /* Once more after a clean close, read-only. */
            struct cbt_error *err = NULL;
            ts->img = cbt_image_open(l->path, NULL, 0, &err);
            if (!ts->img) {
                print_error("%s\n", cbt_error_message(err));
                cbt_error_free(err);
                FAIL(ts, "read-only reopen failed");
            }
            verify_all(ts);
            close_image(ts);
        }
    }
}

int main(void)
{
    const char *env = getenv("CBT_TEST_SEED");
    base_seed = env ? strtoull(env, NULL, 0) : 0x20240611c0ffeeull;
    print_message("qcow2_model: CBT_TEST_SEED=0x%" PRIx64 "\n", base_seed);
    const char *filter = getenv("CBT_TEST_FILTER");
    if (filter)
        cmocka_set_test_filter(filter);

    enum { N = sizeof(configs) / sizeof(configs[0]) };
    struct CMUnitTest tests[N];
    for (size_t i = 0; i < N; i++) {
        tests[i] = (struct CMUnitTest){
            .name = configs[i].name,
            .test_func = test_config,
            .setup_func = setup,
            .teardown_func = teardown,
            .initial_state = (void *)&configs[i],
        };
    }
    return _cmocka_run_group_tests("qcow2_model", tests, N, NULL, NULL);
}
