/*
 * One open image used by several threads at once, as the live mode uses
 * it (docs/architecture.md, "Concurrency model"): the checks the block
 * layer makes (range, read-only) must see the size and mode that the
 * request then runs under, while other threads resize the image and
 * reopen its backing file read-write.  Meant for the ThreadSanitizer build
 * (`make tsan`), where any unlocked access to a node's state is a report;
 * in every build it checks the data against a model:
 *
 *  - a qcow2 overlay (8 MiB at most, 64 KiB clusters) over a 3 MiB qcow2
 *    backing file holding a known pattern, with a recording bitmap;
 *  - writer threads each own every NW-th 64 KiB block of the first 6 MiB
 *    and write, zero, discard and read back unaligned ranges of them,
 *    keeping a model of their blocks (the backing pattern, then what they
 *    wrote), so partial-cluster writes copy the backing data underneath
 *    while the backing node changes state;
 *  - a resizer grows and shrinks the overlay's tail (past 6 MiB) and a
 *    tail reader checks that a read there either fails with -EINVAL (past
 *    the end at that moment) or returns zeroes;
 *  - a thread reopens the backing node read-write and rewrites it with the
 *    pattern it already holds (the view does not change), flushing, while
 *    another walks block status over the whole chain and lists bitmaps;
 *  - afterwards every block matches the model, every written block is
 *    dirty in the bitmap, and qemu-img (the oracle) finds the image clean
 *    and equal to the model, also after closing and reopening.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
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

#include "block/block.h"
#include "tmpdir.h"

#define KiB 1024u
#define MiB (1024u * 1024u)
#define BLK (64 * KiB)
#define BASE_SIZE (3 * MiB)
#define FIXED (6 * MiB)        /* owned by the writers; never resized away */
#define TAIL (2 * MiB)         /* the resizer's playground past FIXED */
#define NBLK (FIXED / BLK)
#define NW 3                   /* writer threads */
#define ITER 400               /* operations per writer */

static char dir[TMPDIR_PATH_MAX];
static char *base_path, *top_path;
static struct cbt_image *top;
static int failures;           /* atomically incremented */
static int writers_done;       /* atomically incremented */

static void PRINTF_FMT(1, 2) tfail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("test_threads: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    __atomic_add_fetch(&failures, 1, __ATOMIC_SEQ_CST);
}

static bool writers_running(void)
{
    return __atomic_load_n(&writers_done, __ATOMIC_SEQ_CST) < NW;
}

static uint8_t base_byte(uint64_t off)
{
    return (uint8_t)((off * 7) ^ (off >> 9) ^ 0x5a);
}

static void base_fill(uint8_t *buf, uint64_t off, size_t len)
{
    for (size_t i = 0; i < len; i++)
        buf[i] = base_byte(off + i);
}

/* ---- writers ---- */

struct writer {
    int id;
    unsigned seed;
    uint8_t *model;            /* FIXED bytes; only our blocks are ours */
    bool written[NBLK];        /* blocks we changed (must be dirty) */
    pthread_t th;
};

static void check_range(struct writer *w, uint64_t off, size_t len,
                        const char *when)
{
    uint8_t *buf = malloc(len);
    int r = cbt_image_pread(top, buf, len, off);
    if (r < 0) {
        tfail("writer %d: read %" PRIu64 "+%zu %s: %s", w->id, off, len, when,
             strerror(-r));
    } else if (memcmp(buf, w->model + off, len) != 0) {
        size_t i = 0;
        while (buf[i] == w->model[off + i])
            i++;
        tfail("writer %d: byte %" PRIu64 " %s is %#x, the model says %#x",
             w->id, off + i, when, buf[i], w->model[off + i]);
    }
    free(buf);
}

static void *writer_main(void *arg)
{
    struct writer *w = arg;
    uint8_t *buf = malloc(BLK);
    for (int it = 0; it < ITER; it++) {
        uint64_t blk = (uint64_t)(rand_r(&w->seed) % (NBLK / NW)) * NW + w->id;
        uint64_t boff = blk * BLK;
        size_t start = (size_t)rand_r(&w->seed) % BLK;
        size_t len = 1 + (size_t)rand_r(&w->seed) % (BLK - start);
        uint64_t off = boff + start;
        int op = rand_r(&w->seed) % 8;
        int r = 0;
        if (op < 4) {
            uint8_t g = (uint8_t)rand_r(&w->seed);
            for (size_t i = 0; i < len; i++)
                buf[i] = (uint8_t)(g + i * 13 + w->id);
            r = cbt_image_pwrite(top, buf, len, off);
            if (r == 0)
                memcpy(w->model + off, buf, len);
        } else if (op == 4) {
            r = cbt_image_pwrite_zeroes(top, off, len,
                                        it % 2 ? CBT_ZERO_MAY_UNMAP : 0);
            if (r == 0)
                memset(w->model + off, 0, len);
        } else if (op == 5) {
            /* Whole clusters of a v3 image read as zeroes once discarded,
             * over a backing file too. */
            off = boff;
            len = BLK;
            r = cbt_image_discard(top, off, len);
            if (r == 0)
                memset(w->model + off, 0, len);
        } else {
            check_range(w, off, len, "during the run");
            continue;
        }
        if (r < 0)
            tfail("writer %d: op %d at %" PRIu64 "+%zu: %s", w->id, op, off,
                 len, strerror(-r));
        w->written[blk] = true;
        if (op < 5 && rand_r(&w->seed) % 4 == 0)
            check_range(w, off, len, "just after writing it");
    }
    free(buf);
    __atomic_add_fetch(&writers_done, 1, __ATOMIC_SEQ_CST);
    return NULL;
}

/* ---- the others ---- */

static void *resizer_main(void *arg)
{
    unsigned seed = 7;
    struct cbt_error *err = NULL;
    uint8_t *buf = malloc(TAIL);
    while (writers_running()) {
        uint64_t size = FIXED + (uint64_t)(rand_r(&seed) % 33) * (TAIL / 32);
        if (cbt_image_resize(top, size, true, &err) < 0) {
            tfail("resize to %" PRIu64 ": %s", size, cbt_error_message(err));
            cbt_error_free(err);
            err = NULL;
            break;
        }
        /* Nobody else writes the tail: what exists of it reads zero. */
        uint64_t now = cbt_image_size(top);
        if (now > FIXED) {
            int r = cbt_image_pread(top, buf, now - FIXED, FIXED);
            if (r == 0) {
                for (uint64_t i = 0; i < now - FIXED; i++)
                    if (buf[i]) {
                        tfail("tail byte %" PRIu64 " is %#x after resize",
                             FIXED + i, buf[i]);
                        break;
                    }
            } else if (r != -EINVAL) {
                tfail("tail read: %s", strerror(-r));
            }
        }
    }
    free(buf);
    return NULL;
}

static void *tail_reader_main(void *arg)
{
    unsigned seed = 11;
    uint8_t *buf = malloc(TAIL);
    while (writers_running()) {
        uint64_t off = FIXED - BLK / 2 + rand_r(&seed) % TAIL;
        size_t len = 1 + (size_t)rand_r(&seed) % (TAIL / 4);
        int r = cbt_image_pread(top, buf, len, off);
        if (r == -EINVAL)
            continue; /* past the end at that moment */
        if (r < 0) {
            tfail("tail read %" PRIu64 "+%zu: %s", off, len, strerror(-r));
            continue;
        }
        /* The half block before FIXED is a writer's: skip it. */
        size_t skip = off < FIXED ? (size_t)(FIXED - off) : 0;
        for (size_t i = skip; i < len; i++)
            if (buf[i]) {
                tfail("tail byte %" PRIu64 " is %#x", off + i, buf[i]);
                break;
            }
    }
    free(buf);
    return NULL;
}

static void *backing_main(void *arg)
{
    struct cbt_image *base = cbt_image_backing(top);
    struct cbt_error *err = NULL;
    unsigned seed = 3;
    uint8_t *buf = malloc(BLK);
    /* Let the writers start on a read-only backing node first. */
    usleep(1000);
    if (blk_reopen_rw(base, &err) < 0) {
        tfail("reopen of the backing file: %s", cbt_error_message(err));
        cbt_error_free(err);
        free(buf);
        return NULL;
    }
    while (writers_running()) {
        uint64_t off = rand_r(&seed) % BASE_SIZE;
        size_t len = 1 + (size_t)rand_r(&seed) % BLK;
        if (off + len > BASE_SIZE)
            len = (size_t)(BASE_SIZE - off);
        base_fill(buf, off, len);
        /* What it holds already: the view of the overlay is unchanged. */
        int r = blk_pwrite(base, buf, len, off, BLK_WRITE_NO_DIRTY);
        if (r == 0 && rand_r(&seed) % 8 == 0)
            r = cbt_image_flush(base);
        if (r < 0)
            tfail("rewriting the backing file at %" PRIu64 ": %s", off,
                 strerror(-r));
    }
    free(buf);
    return NULL;
}

static void *status_main(void *arg)
{
    struct cbt_error *err = NULL;
    while (writers_running()) {
        uint64_t off = 0, size = cbt_image_size(top);
        while (off < size) {
            struct cbt_extent e;
            int r = cbt_image_block_status(top, off, size - off, &e);
            if (r == -EINVAL)
                break; /* shrunk under us */
            if (r < 0) {
                tfail("block status at %" PRIu64 ": %s", off, strerror(-r));
                break;
            }
            off += e.length;
        }
        struct cbt_bitmap_info *list;
        size_t n;
        if (cbt_bitmap_list(top, &list, &n, &err) < 0) {
            tfail("bitmap list: %s", cbt_error_message(err));
            cbt_error_free(err);
            err = NULL;
        } else {
            cbt_bitmap_info_free_list(list, n);
        }
        struct cbt_image_info info;
        if (cbt_image_get_info(top, &info, &err) < 0) {
            tfail("info: %s", cbt_error_message(err));
            cbt_error_free(err);
            err = NULL;
        } else {
            cbt_image_info_free(&info);
        }
        if (cbt_image_flush(top) < 0)
            tfail("flush failed");
    }
    return NULL;
}

/* ---- setup and final checks ---- */

static int PRINTF_FMT(1, 2) run(const char *fmt, ...)
{
    char cmd[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof(cmd), fmt, ap);
    va_end(ap);
    int r = system(cmd);
    if (r != 0)
        fprintf(stderr, "test_threads: '%s' exited with %d\n", cmd, r);
    return r;
}

static void make_images(void)
{
    struct cbt_error *err = NULL;
    assert_int_equal(tmpdir_make(dir, "threads"), 0);
    base_path = tmpdir_join(dir, "base.qcow2");
    top_path = tmpdir_join(dir, "top.qcow2");
    struct cbt_create_opts o = {.struct_size = sizeof(struct cbt_create_opts),
                                .size = BASE_SIZE,
                                .size_given = true};
    assert_int_equal(cbt_image_create(base_path, &o, &err), 0);
    struct cbt_image *b = cbt_image_open(base_path, "qcow2", CBT_OPEN_RDWR,
                                         &err);
    assert_non_null(b);
    uint8_t *buf = malloc(BASE_SIZE);
    base_fill(buf, 0, BASE_SIZE);
    assert_int_equal(cbt_image_pwrite(b, buf, BASE_SIZE, 0), 0);
    free(buf);
    assert_int_equal(cbt_image_close(b, &err), 0);
    o = (struct cbt_create_opts){ .struct_size = sizeof(o),
                                  .size = FIXED, .size_given = true,
                                  .backing_file = "base.qcow2",
                                  .backing_format = "qcow2" };
    assert_int_equal(cbt_image_create(top_path, &o, &err), 0);
}

static int mark_dirty_blocks(void *opaque, uint64_t start, uint64_t length,
                             bool d)
{
    bool *dirty = opaque;
    for (uint64_t o = start; d && o < start + length && o < FIXED; o += BLK)
        dirty[o / BLK] = true;
    return 0;
}

/* Every block a writer changed is dirty in bitmap "b". */
static void check_bitmap_covers(struct writer *w)
{
    struct cbt_error *err = NULL;
    static bool dirty[NBLK];
    memset(dirty, 0, sizeof(dirty));
    assert_int_equal(cbt_bitmap_extents(top, "b", mark_dirty_blocks, dirty,
                                        &err), 0);
    for (int t = 0; t < NW; t++)
        for (uint64_t k = 0; k < NBLK; k++)
            if (w[t].written[k] && !dirty[k])
                tfail("block %" PRIu64 " written by writer %d is clean in the "
                     "bitmap", k, t);
}

static void check_all(struct writer *w, const char *when)
{
    for (int t = 0; t < NW; t++)
        for (uint64_t k = t; k < NBLK; k += NW)
            check_range(&w[t], k * BLK, BLK, when);
}

static void test_threads(void **state)
{
    struct cbt_error *err = NULL;
    make_images();
    top = cbt_image_open(top_path, "qcow2", CBT_OPEN_RDWR, &err);
    assert_non_null(top);
    assert_int_equal(cbt_bitmap_add(top, "b", BLK, false, &err), 0);

    struct writer w[NW];
    for (int t = 0; t < NW; t++) {
        w[t] = (struct writer){ .id = t, .seed = 100 + t };
        w[t].model = calloc(1, FIXED);
        base_fill(w[t].model, 0, BASE_SIZE);
    }
    pthread_t others[4];
    void *(*fns[4])(void *) = { resizer_main, tail_reader_main, backing_main,
                                status_main };
    for (int i = 0; i < 4; i++)
        assert_int_equal(pthread_create(&others[i], NULL, fns[i], NULL), 0);
    for (int t = 0; t < NW; t++)
        assert_int_equal(pthread_create(&w[t].th, NULL, writer_main, &w[t]),
                         0);
    for (int t = 0; t < NW; t++)
        pthread_join(w[t].th, NULL);
    for (int i = 0; i < 4; i++)
        pthread_join(others[i], NULL);

    assert_int_equal(cbt_image_resize(top, FIXED, true, &err), 0);
    check_all(w, "after the run");
    check_bitmap_covers(w);
    assert_int_equal(cbt_image_close(top, &err), 0);

    /* Reopened: the same data and bitmap; qemu-img agrees. */
    top = cbt_image_open(top_path, "qcow2", 0, &err);
    assert_non_null(top);
    check_all(w, "after reopening");
    check_bitmap_covers(w);
    assert_int_equal(cbt_image_close(top, &err), 0);

    const char *model_path = tmpdir_path(dir, "model.raw");
    FILE *f = fopen(model_path, "wb");
    assert_non_null(f);
    for (uint64_t k = 0; k < NBLK; k++)
        assert_int_equal(fwrite(w[k % NW].model + k * BLK, 1, BLK, f), BLK);
    assert_int_equal(fclose(f), 0);
    assert_int_equal(run("qemu-img check -q '%s'", top_path), 0);
    assert_int_equal(run("qemu-img compare -q -f qcow2 -F raw '%s' '%s'",
                         top_path, model_path),
                     0);
    for (int t = 0; t < NW; t++)
        free(w[t].model);
    assert_int_equal(__atomic_load_n(&failures, __ATOMIC_SEQ_CST), 0);
    (void)tmpdir_remove(dir);
    free(base_path);
    free(top_path);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_threads),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
