/*
 * The API contract of docs/api.md that no command shows:
 *
 *  - options structs grow: a program built with an older (smaller)
 *    struct still works, the fields it does not know taking their
 *    defaults; a newer (larger) one works while it leaves the fields this
 *    library does not know at zero; a size that is no struct's is a clear
 *    error;
 *  - warnings go to the caller they concern: two images open at once,
 *    each with its own callback, used from two threads, each get their
 *    own warnings (those of the open, and a corruption found by a write
 *    later) and nothing of the other's; an operation's go to its options'
 *    callback;
 *  - verify, stream and rebase stop when their cancel callback says so, with
 *    ECANCELED, leaving what a failure leaves (nothing written; the file
 *    on its backing file, reading as before);
 *  - errors carry a remedy (cbt_error_remedy) where their message, which
 *    names no command, says something fixes them;
 *  - a stopped extent walk returns -1 with the callback's errno in *errp.
 */
#include <errno.h>
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

#include <cbt/cbt.h>

#include "formats/qcow2/qcow2.h"
#include "tmpdir.h"

#define MiB (1024 * 1024)

static char dir[TMPDIR_PATH_MAX];

static int setup(void **state)
{
    (void)state;
    return tmpdir_make(dir, "api");
}

static int teardown(void **state)
{
    (void)state;
    return tmpdir_remove(dir);
}

static const char *path_of(const char *name)
{
    return tmpdir_path(dir, name);
}

static void ok(int r, struct cbt_error *err, const char *what)
{
    if (r < 0)
        fail_msg("%s: %s", what, cbt_error_message(err));
}

/* A qcow2 image of size bytes (today's options struct). */
static void create_qcow2(const char *path, uint64_t size)
{
    struct cbt_error *err = NULL;
    struct cbt_create_opts o = CBT_CREATE_OPTS_INIT;
    o.size = size;
    o.size_given = true;
    ok(cbt_image_create(path, &o, &err), err, "create");
}

/* ---- options structs of other versions ---- */

/*
 * struct cbt_create_opts and struct cbt_commit_opts as a program built
 * against an older libcbt has them: today's without the fields added at
 * the end since (the warning callback; commit's cancellation too).  The
 * asserts keep them true prefixes of today's.
 */
struct create_opts_old {
    size_t struct_size;
    const char *format;
    uint64_t size;
    bool size_given;
    const char *backing_file;
    const char *backing_format;
    uint32_t cluster_size;
    int compat;
    int refcount_bits;
    bool extended_l2;
    const char *compression_type;
    const char *data_file;
    bool data_file_raw;
    bool lazy_refcounts;
    const char *preallocation;
};
_Static_assert(offsetof(struct create_opts_old, preallocation) ==
                   offsetof(struct cbt_create_opts, preallocation),
               "a prefix of today's struct");
_Static_assert(sizeof(struct create_opts_old) < sizeof(struct cbt_create_opts),
               "smaller than today's");

struct commit_opts_old {
    size_t struct_size;
    const char *top;
    const char *base;
    const char *active;
    bool drop;
    bool pivot;
    bool skip_broken_bitmaps;
    cbt_progress_fn *progress;
    void *progress_opaque;
};
_Static_assert(offsetof(struct commit_opts_old, progress_opaque) ==
                   offsetof(struct cbt_commit_opts, progress_opaque),
               "a prefix of today's struct");
_Static_assert(sizeof(struct commit_opts_old) < sizeof(struct cbt_commit_opts),
               "smaller than today's");

static void progress_count(void *opaque, uint64_t done, uint64_t total)
{
    (void)done;
    (void)total;
    (*(int *)opaque)++;
}

static void test_older_struct(void **state)
{
    (void)state;
    struct cbt_error *err = NULL;
    /* Older create options: the image is made from the fields given. */
    struct create_opts_old co = {
        .struct_size = sizeof(co),
        .format = "qcow2",
        .size = 4 * MiB,
        .size_given = true,
        .cluster_size = 4096,
    };
    const char *base = path_of("old-base.qcow2");
    ok(cbt_image_create(base, (const struct cbt_create_opts *)&co, &err), err,
       "create with the older struct");
    co.backing_file = "old-base.qcow2";
    co.backing_format = "qcow2";
    const char *top = path_of("old-top.qcow2");
    ok(cbt_image_create(top, (const struct cbt_create_opts *)&co, &err), err,
       "create the overlay with the older struct");

    struct cbt_image *img = cbt_image_open(top, NULL, CBT_OPEN_RDWR, &err);
    assert_non_null(img);
    assert_int_equal(cbt_image_size(img), 4 * MiB);
    struct cbt_image_info info;
    ok(cbt_image_get_info(img, &info, &err), err, "info");
    assert_int_equal(info.cluster_size, 4096);
    cbt_image_info_free(&info);
    uint8_t buf[8192];
    memset(buf, 0x5a, sizeof(buf));
    assert_int_equal(cbt_image_pwrite(img, buf, sizeof(buf), MiB), 0);
    ok(cbt_image_close(img, &err), err, "close");

    /* Older commit options: committed, with progress reported, and no
     * cancellation (the field it does not have reads as NULL). */
    int calls = 0;
    struct commit_opts_old mo = {
        .struct_size = sizeof(mo),
        .top = top,
        .progress = progress_count,
        .progress_opaque = &calls,
    };
    ok(cbt_commit((const struct cbt_commit_opts *)&mo, &err), err,
       "commit with the older struct");
    assert_true(calls > 0);
    img = cbt_image_open(base, NULL, 0, &err);
    assert_non_null(img);
    uint8_t back[8192];
    assert_int_equal(cbt_image_pread(img, back, sizeof(back), MiB), 0);
    assert_memory_equal(back, buf, sizeof(buf));
    ok(cbt_image_close(img, &err), err, "close base");
}

/* A program built against a newer libcbt: today's struct and more. */
struct create_opts_newer {
    struct cbt_create_opts today;
    uint64_t a_later_field;
    uint64_t another;
};

static void expect_refused(int r, struct cbt_error **err, int errnum,
                           const char *part)
{
    assert_int_equal(r, -1);
    assert_non_null(*err);
    assert_int_equal(cbt_error_errno(*err), errnum);
    if (!strstr(cbt_error_message(*err), part))
        fail_msg("'%s' does not say '%s'", cbt_error_message(*err), part);
    cbt_error_free(*err);
    *err = NULL;
}

static void test_sizes(void **state)
{
    (void)state;
    struct cbt_error *err = NULL;
    const char *path = path_of("sizes.qcow2");
    struct create_opts_newer n = {
        .today = CBT_CREATE_OPTS_INIT,
    };
    n.today.struct_size = sizeof(n);
    n.today.size = MiB;
    n.today.size_given = true;
    /* Larger, the fields this library does not know left at zero. */
    ok(cbt_image_create(path, &n.today, &err), err, "a newer struct");
    /* ... and one of them set: refused, nothing made. */
    unlink(path);
    n.another = 1;
    expect_refused(cbt_image_create(path, &n.today, &err), &err, E2BIG,
                   "newer libcbt");
    assert_int_equal(access(path, F_OK), -1);

    /* Not set, garbage, NULL. */
    struct cbt_create_opts o = { .size = MiB, .size_given = true };
    expect_refused(cbt_image_create(path, &o, &err), &err, EINVAL,
                   "struct cbt_create_opts: size 0");
    o.struct_size = (size_t)1 << 40;
    expect_refused(cbt_image_create(path, &o, &err), &err, EINVAL,
                   "struct cbt_create_opts");
    expect_refused(cbt_image_create(path, NULL, &err), &err, EINVAL,
                   "no options");
    assert_int_equal(access(path, F_OK), -1);

    /* Every struct is checked. */
    struct cbt_backup_opts b = { .disk = path, .target = path };
    struct cbt_backup_result br;
    expect_refused(cbt_backup(&b, &br, &err), &err, EINVAL,
                   "struct cbt_backup_opts");
    struct cbt_verify_opts v = { .backup = path };
    struct cbt_verify_result vr;
    expect_refused(cbt_verify(&v, &vr, &err), &err, EINVAL,
                   "struct cbt_verify_opts");
    struct cbt_open_opts oo = { .struct_size = 3 };
    assert_null(cbt_image_open_with(path, &oo, &err));
    expect_refused(-1, &err, EINVAL, "struct cbt_open_opts");
}

/* ---- warnings ---- */

struct heard {
    pthread_mutex_t m;
    char text[4096];
    int count;
};

static void hear(void *opaque, const char *msg)
{
    struct heard *h = opaque;
    pthread_mutex_lock(&h->m);
    size_t used = strlen(h->text);
    snprintf(h->text + used, sizeof(h->text) - used, "%s\n", msg);
    h->count++;
    pthread_mutex_unlock(&h->m);
}

/*
 * A qcow2 image with a persistent bitmap whose autoclear bit a program
 * without bitmap support has cleared: opening it warns (as QEMU does).
 */
static void make_stale_bitmaps(const char *path)
{
    struct cbt_error *err = NULL;
    create_qcow2(path, 4 * MiB);
    struct cbt_image *img = cbt_image_open(path, NULL, CBT_OPEN_RDWR, &err);
    assert_non_null(img);
    ok(cbt_bitmap_add(img, "b0", 0, false, &err), err, "bitmap add");
    ok(cbt_image_close(img, &err), err, "close");
    FILE *f = fopen(path, "r+b");
    assert_non_null(f);
    uint8_t ac[8];
    assert_int_equal(fseek(f, 88, SEEK_SET), 0); /* autoclear_features */
    assert_int_equal(fread(ac, 1, 8, f), 8);
    assert_true(ac[7] & 1);
    ac[7] &= (uint8_t)~1u;
    assert_int_equal(fseek(f, 88, SEEK_SET), 0);
    assert_int_equal(fwrite(ac, 1, 8, f), 8);
    assert_int_equal(fclose(f), 0);
}

struct opener {
    const char *path;
    struct heard *heard;
    struct cbt_image *img;
};

static void *open_thread(void *opaque)
{
    struct opener *op = opaque;
    struct cbt_open_opts o = CBT_OPEN_OPTS_INIT;
    o.flags = CBT_OPEN_RDWR;
    o.warn = hear;
    o.warn_opaque = op->heard;
    struct cbt_error *err = NULL;
    op->img = cbt_image_open_with(op->path, &o, &err);
    if (!op->img)
        fail_msg("open %s: %s", op->path, cbt_error_message(err));
    return NULL;
}

/* A write that the image's metadata protection refuses: the L2 entry of
 * cluster 0 is pointed at the refcount table (as test_qcow2_overlap). */
static void *corrupt_write_thread(void *opaque)
{
    struct cbt_image *img = opaque;
    struct qcow2_state *s = qcow2_state(img);
    uint8_t buf[4096];
    memset(buf, 0x11, sizeof(buf));
    assert_int_equal(cbt_image_pwrite(img, buf, sizeof(buf), 0), 0);
    assert_int_equal(cbt_image_flush(img), 0);
    uint8_t *l2;
    uint64_t idx;
    pthread_mutex_lock(&img->lock);
    assert_int_equal(qcow2_get_l2(s, 0, false, &l2, &idx), 0);
    qcow2_l2_set(s, l2, idx, s->h.refcount_table_offset | QCOW2_OFLAG_COPIED,
                 0);
    qcow2_cache_put(&s->l2_cache, l2);
    pthread_mutex_unlock(&img->lock);
    assert_int_equal(cbt_image_pwrite(img, buf, sizeof(buf), 0), -EIO);
    return NULL;
}

static void test_warnings_per_handle(void **state)
{
    (void)state;
    const char *pa = path_of("a.qcow2"), *pb = path_of("b.qcow2");
    make_stale_bitmaps(pa);
    make_stale_bitmaps(pb);
    struct heard ha = { .m = PTHREAD_MUTEX_INITIALIZER };
    struct heard hb = { .m = PTHREAD_MUTEX_INITIALIZER };

    /* Both opened at once, each from a thread of its own. */
    struct opener oa = { pa, &ha, NULL }, ob = { pb, &hb, NULL };
    pthread_t ta, tb;
    assert_int_equal(pthread_create(&ta, NULL, open_thread, &oa), 0);
    assert_int_equal(pthread_create(&tb, NULL, open_thread, &ob), 0);
    pthread_join(ta, NULL);
    pthread_join(tb, NULL);
    assert_int_equal(ha.count, 1);
    assert_int_equal(hb.count, 1);
    assert_non_null(strstr(ha.text, pa));
    assert_non_null(strstr(ha.text, "bitmaps are now considered "
                                    "inconsistent"));
    assert_null(strstr(ha.text, pb));
    assert_non_null(strstr(hb.text, pb));
    assert_null(strstr(hb.text, pa));

    /* Later, a write on a (from another thread, which opened nothing)
     * finds a corruption: a's callback hears it, b's does not. */
    pthread_t tw;
    assert_int_equal(pthread_create(&tw, NULL, corrupt_write_thread, oa.img),
                     0);
    pthread_join(tw, NULL);
    assert_int_equal(ha.count, 2);
    assert_non_null(strstr(ha.text, "Marking image as corrupt"));
    assert_int_equal(hb.count, 1);
    /* Now b, from this thread. */
    corrupt_write_thread(ob.img);
    assert_int_equal(hb.count, 2);
    assert_non_null(strstr(hb.text, "Marking image as corrupt"));
    assert_int_equal(ha.count, 2);

    struct cbt_error *err = NULL;
    assert_int_equal(cbt_image_close(oa.img, &err), -1);
    cbt_error_free(err);
    err = NULL;
    assert_int_equal(cbt_image_close(ob.img, &err), -1);
    cbt_error_free(err);
}

/* An operation's warnings go to its options' callback: a snapshot of the
 * image whose bitmaps open as inconsistent warns that they stay behind. */
static void test_warnings_per_call(void **state)
{
    (void)state;
    const char *disk = path_of("snap-disk.qcow2");
    make_stale_bitmaps(disk);
    struct heard h = { .m = PTHREAD_MUTEX_INITIALIZER };
    struct cbt_snapshot_opts so = CBT_SNAPSHOT_OPTS_INIT;
    so.top = disk;
    so.overlay = path_of("snap-top.qcow2");
    so.copy_bitmaps = true;
    so.warn = hear;
    so.warn_opaque = &h;
    struct cbt_error *err = NULL;
    ok(cbt_snapshot(&so, &err), err, "snapshot");
    assert_true(h.count >= 1);
    assert_non_null(strstr(h.text, disk));
}

/* ---- cancellation of verify and stream ---- */

struct stopper {
    int asked;
    int stop_after; /* answer true from this question on */
};

static bool stop_cb(void *opaque)
{
    struct stopper *st = opaque;
    return ++st->asked >= st->stop_after;
}

static void fill(const char *path, uint64_t off, size_t len, uint8_t pat)
{
    struct cbt_error *err = NULL;
    struct cbt_image *img = cbt_image_open(path, NULL, CBT_OPEN_RDWR, &err);
    if (!img)
        fail_msg("open %s: %s", path, cbt_error_message(err));
    uint8_t *buf = malloc(len);
    assert_non_null(buf);
    memset(buf, pat, len);
    assert_int_equal(cbt_image_pwrite(img, buf, len, off), 0);
    free(buf);
    ok(cbt_image_close(img, &err), err, "close");
}

static void expect_cancelled(int r, struct cbt_error **err)
{
    assert_int_equal(r, -1);
    assert_int_equal(cbt_error_errno(*err), ECANCELED);
    assert_non_null(strstr(cbt_error_message(*err), "interrupted"));
    cbt_error_free(*err);
    *err = NULL;
}

static void test_cancel_verify(void **state)
{
    (void)state;
    struct cbt_error *err = NULL;
    const char *disk = path_of("vdisk.qcow2");
    create_qcow2(disk, 32 * MiB);
    fill(disk, 0, 24 * MiB, 0x42);
    struct cbt_backup_opts bo = CBT_BACKUP_OPTS_INIT;
    bo.disk = disk;
    bo.target = path_of("vfull.qcow2");
    bo.mode = CBT_BACKUP_FULL;
    struct cbt_backup_result br;
    ok(cbt_backup(&bo, &br, &err), err, "backup");
    cbt_backup_result_free(&br);

    /* Stopped at the first question, and at a later one. */
    for (int after = 1; after <= 3; after += 2) {
        struct stopper st = { 0, after };
        struct cbt_verify_opts vo = CBT_VERIFY_OPTS_INIT;
        vo.backup = bo.target;
        vo.cancel = stop_cb;
        vo.cancel_opaque = &st;
        struct cbt_verify_result vr;
        expect_cancelled(cbt_verify(&vo, &vr, &err), &err);
        assert_int_equal(st.asked, after);
        assert_false(vr.ok);
        assert_null(vr.chain);
    }
    /* Never stopped: it verifies. */
    struct stopper never = { 0, 1 << 30 };
    struct cbt_verify_opts vo = CBT_VERIFY_OPTS_INIT;
    vo.backup = bo.target;
    vo.cancel = stop_cb;
    vo.cancel_opaque = &never;
    struct cbt_verify_result vr;
    ok(cbt_verify(&vo, &vr, &err), err, "verify");
    assert_true(vr.ok);
    assert_true(never.asked > 1);
    cbt_verify_result_free(&vr);
}

static void test_cancel_stream(void **state)
{
    (void)state;
    struct cbt_error *err = NULL;
    const char *base = path_of("sbase.qcow2"), *top = path_of("stop.qcow2");
    struct cbt_create_opts co = CBT_CREATE_OPTS_INIT;
    co.size = 16 * MiB;
    co.size_given = true;
    ok(cbt_image_create(base, &co, &err), err, "create base");
    fill(base, 0, 12 * MiB, 0x17);
    co.backing_file = "sbase.qcow2";
    co.backing_format = "qcow2";
    co.size_given = false;
    ok(cbt_image_create(top, &co, &err), err, "create top");
    fill(top, 4 * MiB, 1 * MiB, 0x29);

    struct stopper st = { 0, 2 };
    struct cbt_stream_opts so = CBT_STREAM_OPTS_INIT;
    so.file = top;
    so.cancel = stop_cb;
    so.cancel_opaque = &st;
    expect_cancelled(cbt_stream(&so, &err), &err);
    assert_int_equal(st.asked, 2);
    /* Still on its backing file, reading as before. */
    struct cbt_image *img = cbt_image_open(top, NULL, 0, &err);
    assert_non_null(img);
    assert_non_null(cbt_image_backing(img));
    uint8_t *buf = malloc(16 * MiB);
    assert_non_null(buf);
    assert_int_equal(cbt_image_pread(img, buf, 16 * MiB, 0), 0);
    for (uint64_t i = 0; i < 16 * MiB; i++) {
        uint8_t want = i >= 4 * MiB && i < 5 * MiB ? 0x29
                       : i < 12 * MiB              ? 0x17
                                                   : 0;
        if (buf[i] != want)
            fail_msg("byte %llu: %#x, expected %#x", (unsigned long long)i,
                     buf[i], want);
    }
    free(buf);
    ok(cbt_image_close(img, &err), err, "close");

    /* Not stopped: streamed, no backing file left. */
    so.cancel = NULL;
    ok(cbt_stream(&so, &err), err, "stream");
    img = cbt_image_open(top, NULL, 0, &err);
    assert_non_null(img);
    assert_null(cbt_image_backing(img));
    ok(cbt_image_close(img, &err), err, "close");
}

/* Rebase onto nothing in safe mode copies the backing file's data into
 * the top; stopped, the top keeps its link and reads as before. */
static void test_cancel_rebase(void **state)
{
    (void)state;
    struct cbt_error *err = NULL;
    const char *base = path_of("rbase.qcow2"), *top = path_of("rtop.qcow2");
    struct cbt_create_opts co = CBT_CREATE_OPTS_INIT;
    co.size = 16 * MiB;
    co.size_given = true;
    ok(cbt_image_create(base, &co, &err), err, "create base");
    fill(base, 0, 12 * MiB, 0x33);
    co.backing_file = "rbase.qcow2";
    co.backing_format = "qcow2";
    co.size_given = false;
    ok(cbt_image_create(top, &co, &err), err, "create top");
    fill(top, 2 * MiB, 1 * MiB, 0x44);

    struct stopper st = { 0, 3 };
    struct cbt_rebase_opts ro = CBT_REBASE_OPTS_INIT;
    ro.file = top;
    ro.backing = "";
    ro.cancel = stop_cb;
    ro.cancel_opaque = &st;
    expect_cancelled(cbt_rebase(&ro, &err), &err);
    assert_int_equal(st.asked, 3);
    for (int pass = 0; pass < 2; pass++) {
        struct cbt_image *img = cbt_image_open(top, NULL, 0, &err);
        assert_non_null(img);
        if (pass == 0)
            assert_non_null(cbt_image_backing(img));
        else
            assert_null(cbt_image_backing(img));
        uint8_t *buf = malloc(16 * MiB);
        assert_non_null(buf);
        assert_int_equal(cbt_image_pread(img, buf, 16 * MiB, 0), 0);
        for (uint64_t i = 0; i < 16 * MiB; i++) {
            uint8_t want = i >= 2 * MiB && i < 3 * MiB ? 0x44
                           : i < 12 * MiB              ? 0x33
                                                       : 0;
            if (buf[i] != want)
                fail_msg("pass %d, byte %llu: %#x, expected %#x", pass,
                         (unsigned long long)i, buf[i], want);
        }
        free(buf);
        ok(cbt_image_close(img, &err), err, "close");
        /* Not stopped: the data copied, the link gone, the same view. */
        ro.cancel = NULL;
        if (pass == 0)
            ok(cbt_rebase(&ro, &err), err, "rebase");
    }
}

/* ---- remedies: the library names no command, the error says what fixes it */

static void test_remedies(void **state)
{
    (void)state;
    struct cbt_error *err = NULL;
    const char *path = path_of("rem.qcow2");
    create_qcow2(path, 4 * MiB);

    /* Shrinking unasked. */
    struct cbt_image *img = cbt_image_open(path, NULL, CBT_OPEN_RDWR, &err);
    assert_non_null(img);
    assert_int_equal(cbt_image_resize(img, MiB, false, &err), -1);
    assert_int_equal(cbt_error_remedy(err), CBT_REMEDY_SHRINK);
    assert_null(strstr(cbt_error_message(err), "--"));
    cbt_error_free(err);
    err = NULL;
    ok(cbt_image_close(img, &err), err, "close");

    /* Marked corrupt: opening it for writing needs a repair. */
    FILE *f = fopen(path, "r+b");
    assert_non_null(f);
    uint8_t inc[8];
    assert_int_equal(fseek(f, 72, SEEK_SET), 0); /* incompatible_features */
    assert_int_equal(fread(inc, 1, 8, f), 8);
    inc[7] |= 2; /* corrupt */
    assert_int_equal(fseek(f, 72, SEEK_SET), 0);
    assert_int_equal(fwrite(inc, 1, 8, f), 8);
    assert_int_equal(fclose(f), 0);
    assert_null(cbt_image_open(path, NULL, CBT_OPEN_RDWR, &err));
    assert_int_equal(cbt_error_kind(err), CBT_ERR_CORRUPT);
    assert_int_equal(cbt_error_remedy(err), CBT_REMEDY_REPAIR);
    assert_null(strstr(cbt_error_message(err), "cbt check"));
    cbt_error_free(err);
    err = NULL;

    /* An error without one, and none at all. */
    assert_null(cbt_image_open(path_of("missing.qcow2"), NULL, 0, &err));
    assert_int_equal(cbt_error_remedy(err), CBT_REMEDY_NONE);
    cbt_error_free(err);
    assert_int_equal(cbt_error_remedy(NULL), CBT_REMEDY_NONE);
}

/* ---- one return convention: 0, or -1 with *errp ---- */

static int stop_extents(void *opaque, uint64_t start, uint64_t length,
                        bool dirty)
{
    (void)start;
    (void)length;
    (void)dirty;
    (*(int *)opaque)++;
    return -ECANCELED;
}

static void test_extents_stopped(void **state)
{
    (void)state;
    struct cbt_error *err = NULL;
    const char *path = path_of("ext.qcow2");
    create_qcow2(path, 4 * MiB);
    struct cbt_image *img = cbt_image_open(path, NULL, CBT_OPEN_RDWR, &err);
    assert_non_null(img);
    ok(cbt_bitmap_add(img, "e", 0, false, &err), err, "bitmap add");
    /* The callback's errno is the error's; the result is -1, not it. */
    int calls = 0;
    assert_int_equal(cbt_bitmap_extents(img, "e", stop_extents, &calls, &err),
                     -1);
    assert_int_equal(calls, 1);
    assert_int_equal(cbt_error_errno(err), ECANCELED);
    cbt_error_free(err);
    err = NULL;
    assert_int_equal(cbt_chain_bitmap_extents(img, "e", 0, stop_extents,
                                              &calls, &err),
                     -1);
    assert_int_equal(calls, 2);
    assert_int_equal(cbt_error_errno(err), ECANCELED);
    cbt_error_free(err);
    err = NULL;
    ok(cbt_image_close(img, &err), err, "close");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_older_struct),
        cmocka_unit_test(test_sizes),
        cmocka_unit_test(test_warnings_per_handle),
        cmocka_unit_test(test_warnings_per_call),
        cmocka_unit_test(test_cancel_verify),
        cmocka_unit_test(test_cancel_stream),
        cmocka_unit_test(test_cancel_rebase),
        cmocka_unit_test(test_remedies),
        cmocka_unit_test(test_extents_stopped),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
