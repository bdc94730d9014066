/*
 * Gathered direct writes (block.h, blk_gather_begin): a write held back
 * must reach the file at blk_gather_end, and also when the image is
 * flushed or closed first, and before any later write through the cache
 * (a cached write over the same bytes must win).  A raw image opened with
 * CBT_OPEN_DIRECT; the file is read back with plain pread.  Where the
 * scratch folder's file system takes no direct I/O nothing is held, and
 * only the data is checked (the held state is asserted where it is).
 */
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include <cbt/image.h>

#include "block/block.h"
#include "tmpdir.h"
#include "util/util.h"

#define BLK ((size_t)64 << 10)
#define SIZE ((off_t)1 << 20)

static char dir[TMPDIR_PATH_MAX];
static uint8_t *buf; /* two blocks, aligned for direct I/O */

static int setup(void **state)
{
    (void)state;
    buf = cbt_zalloc_aligned(2 * BLK);
    return buf ? tmpdir_make(dir, "gather") : -1;
}

static int teardown(void **state)
{
    (void)state;
    free(buf);
    return tmpdir_remove(dir);
}

/* A new raw image of SIZE bytes, open for direct writes, gathering. */
static struct cbt_image *open_gathering(const char *name)
{
    const char *path = tmpdir_path(dir, name);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
    assert_true(fd >= 0);
    assert_int_equal(ftruncate(fd, SIZE), 0);
    close(fd);
    struct cbt_error *err = NULL;
    struct cbt_image *img = cbt_image_open(
        path, "raw", CBT_OPEN_RDWR | CBT_OPEN_DIRECT, &err);
    assert_non_null(img);
    blk_gather_begin(img);
    return img;
}

/* Write one block of c at off (an aligned buffer: eligible for direct
 * I/O), and check it is held where direct I/O works. */
static void write_held(struct cbt_image *img, int c, uint64_t off)
{
    memset(buf, c, BLK);
    assert_int_equal(cbt_image_pwrite(img, buf, BLK, off), 0);
    if (img->direct_fd >= 0)
        assert_int_equal(img->gather_len, BLK);
}

/* The file's bytes [off, off + len) all equal c. */
static void assert_file_bytes(const char *name, uint64_t off, size_t len,
                              int c)
{
    int fd = open(tmpdir_path(dir, name), O_RDONLY);
    assert_true(fd >= 0);
    uint8_t *got = malloc(len);
    assert_non_null(got);
    assert_int_equal(pread(fd, got, len, (off_t)off), (ssize_t)len);
    for (size_t i = 0; i < len; i++)
        if (got[i] != c)
            fail_msg("%s: byte %zu is 0x%02x, not 0x%02x", name,
                     (size_t)off + i, got[i], c);
    free(got);
    close(fd);
}

static void test_close_issues_held_write(void **state)
{
    (void)state;
    struct cbt_image *img = open_gathering("close.raw");
    write_held(img, 0x5a, 3 * BLK);
    assert_int_equal(cbt_image_close(img, NULL), 0);
    assert_file_bytes("close.raw", 3 * BLK, BLK, 0x5a);
}

static void test_flush_issues_held_write(void **state)
{
    (void)state;
    struct cbt_image *img = open_gathering("flush.raw");
    write_held(img, 0x6b, BLK);
    assert_int_equal(cbt_image_flush(img), 0);
    assert_int_equal(img->gather_len, 0);
    assert_file_bytes("flush.raw", BLK, BLK, 0x6b);
    assert_int_equal(blk_gather_end(img), 0);
    assert_int_equal(cbt_image_close(img, NULL), 0);
}

static void test_cached_write_after_held_one_wins(void **state)
{
    (void)state;
    struct cbt_image *img = open_gathering("order.raw");
    write_held(img, 0x11, 0);
    /* 100 bytes at 1000: unaligned, so through the cache; the held block
     * under them must go first, or it would overwrite them. */
    uint8_t small[100];
    memset(small, 0x22, sizeof(small));
    assert_int_equal(cbt_image_pwrite(img, small, sizeof(small), 1000), 0);
    assert_int_equal(img->gather_len, 0);
    assert_int_equal(blk_gather_end(img), 0);
    assert_int_equal(cbt_image_close(img, NULL), 0);
    assert_file_bytes("order.raw", 0, 1000, 0x11);
    assert_file_bytes("order.raw", 1000, sizeof(small), 0x22);
    assert_file_bytes("order.raw", 1100, BLK - 1100, 0x11);
}

static void test_adjacent_writes_join(void **state)
{
    (void)state;
    struct cbt_image *img = open_gathering("join.raw");
    memset(buf, 0x33, BLK);
    memset(buf + BLK, 0x44, BLK);
    assert_int_equal(cbt_image_pwrite(img, buf, BLK, 4 * BLK), 0);
    assert_int_equal(cbt_image_pwrite(img, buf + BLK, BLK, 5 * BLK), 0);
    if (img->direct_fd >= 0)
        assert_int_equal(img->gather_len, 2 * BLK);
    assert_int_equal(blk_gather_end(img), 0);
    assert_int_equal(cbt_image_close(img, NULL), 0);
    assert_file_bytes("join.raw", 4 * BLK, BLK, 0x33);
    assert_file_bytes("join.raw", 5 * BLK, BLK, 0x44);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_close_issues_held_write),
        cmocka_unit_test(test_flush_issues_held_write),
        cmocka_unit_test(test_cached_write_after_held_one_wins),
        cmocka_unit_test(test_adjacent_writes_join),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
