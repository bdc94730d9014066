/* Helpers shared by the libFuzzer targets (see fuzz_common.h). */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fuzz_common.h"
#include "util/util.h"

static char scratch_dir[4096];

struct scratch_file {
    const char *name;
    char path[4200];
};
static struct scratch_file files[4];

_Noreturn void fuzz_fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("fuzz: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    abort();
}

static void remove_scratch(void)
{
    for (size_t i = 0; i < ARRAY_SIZE(files); i++)
        if (files[i].name)
            unlink(files[i].path);
    if (scratch_dir[0])
        rmdir(scratch_dir);
}

static void quiet_warning(void *opaque, const char *msg)
{
    (void)opaque;
    (void)msg;
}

/* The one LLVMFuzzerInitialize of every target: they all need the scratch
 * folder and the quiet warning handler, and nothing else before their first
 * input. */
static void fuzz_init(void)
{
    if (scratch_dir[0])
        return;
    /* tmpfs first: the engine fdatasyncs on flush and repair, which costs
     * milliseconds per input on a disk and nothing on tmpfs. */
    const char *tmp = getenv("CBT_FUZZ_TMPDIR");
    if (!tmp || !*tmp)
        tmp = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : getenv("TMPDIR");
    if (!tmp || !*tmp)
        tmp = "/tmp";
    snprintf(scratch_dir, sizeof(scratch_dir), "%s/cbt-fuzz-XXXXXX", tmp);
    if (!mkdtemp(scratch_dir))
        fuzz_fail("mkdtemp %s: %s", scratch_dir, strerror(errno));
    atexit(remove_scratch);
    const char *verbose = getenv("CBT_FUZZ_VERBOSE");
    if (!verbose || strcmp(verbose, "1") != 0)
        warn_scope_enter(quiet_warning, NULL); /* inputs run on this thread */
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    fuzz_init();
    return 0;
}

const char *fuzz_put_file(const char *name, const uint8_t *data, size_t size)
{
    struct scratch_file *f = NULL;
    for (size_t i = 0; i < ARRAY_SIZE(files) && !f; i++) {
        if (!files[i].name || strcmp(files[i].name, name) == 0)
            f = &files[i];
    }
    if (!f)
        fuzz_fail("too many scratch files");
    if (!f->name) {
        f->name = name;
        snprintf(f->path, sizeof(f->path), "%s/%s", scratch_dir, name);
    }
    int fd = open(f->path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0)
        fuzz_fail("open %s: %s", f->path, strerror(errno));
    if (size && file_pwrite_full(fd, data, size, 0) < 0)
        fuzz_fail("write %s failed", f->path);
    close(fd);
    return f->path;
}

bool fuzz_may_name_data_file(const uint8_t *data, size_t size)
{
    return memmem(data, size, "DATA", 4) != NULL;
}

/* Touch every byte of a string so ASan sees a dangling or unterminated one. */
static size_t touch(const char *s)
{
    return s ? strlen(s) : 0;
}

static void walk_info(struct cbt_image *img)
{
    struct cbt_image_info info;
    struct cbt_error *err = NULL;
    if (cbt_image_get_info(img, &info, &err) < 0) {
        if (!err || !cbt_error_message(err))
            fuzz_fail("get_info failed without an error message");
        cbt_error_free(err);
        return;
    }
    size_t n = touch(info.filename) + touch(info.format) +
               touch(info.backing_filename) +
               touch(info.full_backing_filename) +
               touch(info.backing_format) + touch(info.compression_type) +
               touch(info.data_file);
    if (info.nb_snapshots && !info.snapshots)
        fuzz_fail("get_info: %zu snapshots but no array", info.nb_snapshots);
    for (size_t i = 0; i < info.nb_snapshots; i++)
        n += touch(info.snapshots[i].id) + touch(info.snapshots[i].name);
    if (info.virtual_size != cbt_image_size(img))
        fuzz_fail("get_info: virtual_size %" PRIu64 " != image size %" PRIu64,
                  info.virtual_size, cbt_image_size(img));
    (void)n;
    cbt_image_info_free(&info);
}

/* Read up to `want` bytes at off (clipped to the disk and the budget). */
static void read_some(struct cbt_image *img, uint8_t *buf, size_t bufsize,
                      uint64_t off, size_t want, size_t *budget)
{
    uint64_t size = cbt_image_size(img);
    if (off >= size)
        return;
    size_t len = (size_t)MIN((uint64_t)want, size - off);
    len = MIN(len, MIN(bufsize, *budget));
    if (len == 0)
        return;
    *budget -= len;
    int r = cbt_image_pread(img, buf, len, off);
    if (r > 0)
        fuzz_fail("pread returned %d, not 0 or -errno", r);
}

/* Extents of one bitmap must tile the disk from 0, dirty and clean
 * alternating; the walk stops after FUZZ_MAX_EXTENTS of them. */
struct extent_walk {
    uint64_t next;
    int n;
    int last_dirty;
};

static int check_extent(void *opaque, uint64_t start, uint64_t length,
                        bool dirty)
{
    struct extent_walk *w = opaque;
    if (start != w->next || length == 0)
        fuzz_fail("bitmap extent [%" PRIu64 ", +%" PRIu64 ") after %" PRIu64,
                  start, length, w->next);
    if (w->last_dirty == (int)dirty)
        fuzz_fail("two bitmap extents in a row with dirty=%d", (int)dirty);
    w->next = start + length;
    w->last_dirty = dirty;
    return ++w->n >= FUZZ_MAX_EXTENTS ? -ECANCELED : 0;
}

/* The persistent bitmaps the image loaded: list, extents, digest. */
static void walk_bitmaps(struct cbt_image *img)
{
    struct cbt_bitmap_info *list = NULL;
    size_t n = 0;
    if (cbt_bitmap_list(img, &list, &n, NULL) < 0)
        return;
    for (size_t i = 0; i < n && i < 8; i++) {
        if (list[i].inconsistent)
            continue;
        struct extent_walk w = { .last_dirty = -1 };
        int r = cbt_bitmap_extents(img, list[i].name, check_extent, &w, NULL);
        if (r == 0 && w.next != cbt_image_size(img))
            fuzz_fail("bitmap extents end at %" PRIu64 ", disk size %" PRIu64,
                      w.next, cbt_image_size(img));
        char hex[65];
        (void)cbt_bitmap_sha256(img, list[i].name, hex, NULL);
        /* The count streamed from the image (or kept) is the listed one. */
        uint64_t c;
        if (cbt_bitmap_count(img, list[i].name, &c, NULL) == 0 &&
            c != list[i].count)
            fuzz_fail("bitmap '%s': count %" PRIu64 ", listed %" PRIu64,
                      list[i].name, c, list[i].count);
    }
    cbt_bitmap_info_free_list(list, n);
}

void fuzz_walk(struct cbt_image *img, size_t budget)
{
    walk_bitmaps(img);

    static uint8_t buf[65536];
    uint64_t size = cbt_image_size(img);

    walk_info(img);
    if (size == 0)
        return;

    uint64_t cluster = 65536;
    struct cbt_image_info info;
    if (cbt_image_get_info(img, &info, NULL) == 0) {
        if (info.cluster_size >= 512 && info.cluster_size <= 65536)
            cluster = info.cluster_size;
        cbt_image_info_free(&info);
    }

    read_some(img, buf, sizeof(buf), 0, cluster, &budget);
    read_some(img, buf, sizeof(buf), ALIGN_DOWN(size - 1, cluster), cluster,
              &budget);
    /* Unaligned, crossing a cluster boundary. */
    if (size > cluster)
        read_some(img, buf, sizeof(buf), cluster - 7, 1031, &budget);

    uint64_t off = 0;
    for (int i = 0; i < FUZZ_MAX_EXTENTS && off < size; i++) {
        struct cbt_extent ext;
        uint64_t len = size - off;
        int r = cbt_image_block_status(img, off, len, &ext);
        if (r < 0)
            break;
        if (r > 0)
            fuzz_fail("block_status returned %d", r);
        if (ext.start != off || ext.length == 0 || ext.length > len)
            fuzz_fail("block_status(%" PRIu64 ", %" PRIu64 ") gave extent "
                      "[%" PRIu64 ", +%" PRIu64 ")",
                      off, len, ext.start, ext.length);
        if (ext.flags & CBT_BS_OFFSET_VALID)
            touch(ext.filename);
        /* Read the head of every few data extents while budget lasts. */
        if ((ext.flags & CBT_BS_DATA) && (i % 4) == 0)
            read_some(img, buf, sizeof(buf), off, 4096, &budget);
        off += ext.length;
    }
}
