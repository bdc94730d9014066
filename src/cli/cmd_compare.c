/*
 * cbt compare: do two images read the same?  qemu-img compare's semantics
 * and exit codes.  Ranges that read as zeroes in both images (by block
 * status) are skipped without reading; everything else is read in chunks
 * of at most CMP_CHUNK bytes.  A size mismatch is allowed unless -s: the
 * common part must match and the rest of the larger image must read as
 * zeroes.  Mismatch offsets are reported at 512-byte granularity, as
 * qemu-img does.
 */
#include <getopt.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"

static const char usage[] =
    "Usage: cbt compare [-f FMT] [-F FMT] [-s] [-q] [-p] FILE1 FILE2\n"
    "\n"
    "Check whether FILE1 and FILE2 have the same guest-visible contents\n"
    "(including their backing chains).  Images of different sizes compare\n"
    "equal when the larger one reads as zeroes past the end of the smaller.\n"
    "\n"
    "Options:\n"
    "  -f FMT        format of FILE1 (default: probe)\n"
    "  -F FMT        format of FILE2 (default: probe)\n"
    "  -s            strict: a size or allocation difference is a mismatch\n"
    "  -q            quiet: print nothing on stdout\n"
    "  -p            show progress on stderr (when it is a terminal)\n"
    "  -U, --force-share  compare images another process holds for writing\n"
    "                     (their state as that process last wrote them)\n"
    "  -h, --help    show this help\n"
    "\n"
    "Exit status: 0 identical, 1 different, 2 an image could not be opened\n"
    "(75: it is in use), 3 allocation could not be queried, 4 read error,\n"
    "64 a usage mistake.\n"
    "\n"
    "Examples:\n"
    "  cbt compare disk.qcow2 restored.raw\n"
    "  cbt compare -s -f qcow2 -F qcow2 a.qcow2 b.qcow2\n";

#define CMP_CHUNK (2u << 20)
#define SECTOR 512u
#define STRICT_FLAGS (CBT_BS_PRESENT | CBT_BS_ZERO | CBT_BS_DATA)

enum {
    CMP_SAME = 0,
    CMP_DIFFERENT = 1,
    CMP_OPEN_ERROR = 2,
    CMP_STATUS_ERROR = 3,
    CMP_READ_ERROR = 4,
};

struct cmp_image {
    const char *name;
    const char *format;
    struct cbt_image *img;
    uint64_t size;
};

struct cmp_job {
    struct cmp_image a, b;
    uint8_t *buf1, *buf2;
    bool strict, quiet, force_share;
    struct cli_progress progress;
    uint64_t progress_base;
    uint64_t done;
};

static bool is_zero(const uint8_t *p, size_t n)
{
    return n == 0 || (p[0] == 0 && memcmp(p, p + 1, n - 1) == 0);
}

static void mismatch(struct cmp_job *j, uint64_t off)
{
    cli_progress_end(&j->progress);
    if (!j->quiet)
        printf("Content mismatch at offset %" PRIu64 "!\n", off);
}

static int read_chunk(struct cmp_job *j, struct cmp_image *im, uint8_t *buf,
                      uint64_t off, size_t len)
{
    int r = cbt_image_pread(im->img, buf, len, off);
    if (r < 0) {
        cli_progress_end(&j->progress);
        cli_error("Error while reading offset %" PRIu64 " of %s: %s", off,
                  im->name, strerror(-r));
        return CMP_READ_ERROR;
    }
    return 0;
}

/* The data of `im` at [off, off+len) must read as zeroes. */
static int check_empty(struct cmp_job *j, struct cmp_image *im, uint64_t off,
                       size_t len)
{
    int r = read_chunk(j, im, j->buf1, off, len);
    if (r)
        return r;
    for (size_t i = 0; i < len; i += SECTOR) {
        size_t n = len - i < SECTOR ? len - i : SECTOR;
        if (!is_zero(j->buf1 + i, n)) {
            mismatch(j, off + i);
            return CMP_DIFFERENT;
        }
    }
    return 0;
}

/* Both images hold data at [off, off+len): read and compare them. */
static int compare_data(struct cmp_job *j, uint64_t off, size_t len)
{
    int r = read_chunk(j, &j->a, j->buf1, off, len);
    if (!r)
        r = read_chunk(j, &j->b, j->buf2, off, len);
    if (r || memcmp(j->buf1, j->buf2, len) == 0)
        return r;
    for (size_t i = 0; i < len; i += SECTOR) {
        size_t n = len - i < SECTOR ? len - i : SECTOR;
        if (memcmp(j->buf1 + i, j->buf2 + i, n) != 0) {
            mismatch(j, off + i);
            return CMP_DIFFERENT;
        }
    }
    return 0;
}

static int block_status(struct cmp_job *j, struct cmp_image *im, uint64_t off,
                        uint64_t end, struct cbt_extent *e)
{
    int r = cbt_image_block_status(im->img, off, end - off, e);
    if (r < 0) {
        cli_progress_end(&j->progress);
        cli_error("Sector allocation test failed for %s: %s", im->name,
                  strerror(-r));
        return CMP_STATUS_ERROR;
    }
    return 0;
}

static void advance(struct cmp_job *j, uint64_t n)
{
    j->done += n;
    cli_progress_update(&j->progress, j->done, j->progress_base);
}

/* Compare [0, end), the range both images have. */
static int compare_common(struct cmp_job *j, uint64_t end)
{
    for (uint64_t off = 0; off < end;) {
        struct cbt_extent e1, e2;
        int r = block_status(j, &j->a, off, end, &e1);
        if (!r)
            r = block_status(j, &j->b, off, end, &e2);
        if (r)
            return r;
        uint64_t chunk = e1.length < e2.length ? e1.length : e2.length;
        bool alloc1 = e1.flags & CBT_BS_PRESENT;
        bool alloc2 = e2.flags & CBT_BS_PRESENT;
        if (j->strict &&
            (e1.flags & STRICT_FLAGS) != (e2.flags & STRICT_FLAGS)) {
            cli_progress_end(&j->progress);
            if (!j->quiet)
                printf("Strict mode: Offset %" PRIu64
                       " block status mismatch!\n",
                       off);
            return CMP_DIFFERENT;
        }
        if ((e1.flags & CBT_BS_ZERO) && (e2.flags & CBT_BS_ZERO)) {
            /* zeroes on both sides: nothing to read */
        } else if (alloc1 == alloc2) {
            if (chunk > CMP_CHUNK)
                chunk = CMP_CHUNK;
            if (alloc1 && (r = compare_data(j, off, (size_t)chunk)))
                return r;
        } else {
            if (chunk > CMP_CHUNK)
                chunk = CMP_CHUNK;
            r = check_empty(j, alloc1 ? &j->a : &j->b, off, (size_t)chunk);
            if (r)
                return r;
        }
        off += chunk;
        advance(j, chunk);
    }
    return 0;
}

/* The larger image past the end of the smaller must read as zeroes. */
static int compare_tail(struct cmp_job *j, uint64_t off)
{
    struct cmp_image *over = j->a.size > j->b.size ? &j->a : &j->b;
    uint64_t end = over->size;
    while (off < end) {
        struct cbt_extent e;
        int r = block_status(j, over, off, end, &e);
        if (r)
            return r;
        uint64_t chunk = e.length;
        if ((e.flags & CBT_BS_PRESENT) && !(e.flags & CBT_BS_ZERO)) {
            if (chunk > CMP_CHUNK)
                chunk = CMP_CHUNK;
            r = check_empty(j, over, off, (size_t)chunk);
            if (r)
                return r;
        }
        off += chunk;
        advance(j, chunk);
    }
    return 0;
}

static int compare(struct cmp_job *j, bool progress)
{
    if (j->strict && j->a.size != j->b.size) {
        if (!j->quiet)
            printf("Strict mode: Image size mismatch!\n");
        return CMP_DIFFERENT;
    }
    j->buf1 = malloc(CMP_CHUNK);
    j->buf2 = malloc(CMP_CHUNK);
    if (!j->buf1 || !j->buf2) {
        cli_error("out of memory");
        return CMP_READ_ERROR;
    }
    uint64_t common = j->a.size < j->b.size ? j->a.size : j->b.size;
    j->progress_base = j->a.size > j->b.size ? j->a.size : j->b.size;
    cli_progress_init(&j->progress, progress);
    int r = compare_common(j, common);
    if (!r && j->a.size != j->b.size) {
        cli_progress_end(&j->progress);
        if (!j->quiet)
            printf("Warning: Image size mismatch!\n");
        r = compare_tail(j, common);
    }
    cli_progress_end(&j->progress);
    if (!r && !j->quiet)
        printf("Images are identical.\n");
    return r;
}

static int open_side(struct cmp_image *im, bool force_share)
{
    struct cbt_error *err = NULL;
    im->img = cli_open(im->name, im->format,
                             force_share ? CBT_OPEN_FORCE_SHARE : 0, &err);
    if (!im->img) {
        /* qemu-img's 2, unless the image is held by another process: that
         * status is the same for every command. */
        int status = cli_lib_error(err);
        return status == CLI_EXIT_IN_USE ? status : CMP_OPEN_ERROR;
    }
    im->size = cbt_image_size(im->img);
    return 0;
}

/* Returns 1 for --help, 0 to go on, -1 after a usage error. */
static int parse_args(int argc, char **argv, struct cmp_job *j, bool *progress)
{
    static const struct option longopts[] = {
        {"help", no_argument, NULL, 'h'},
        {"force-share", no_argument, NULL, 'U'},
        {NULL, 0, NULL, 0},
    };
    int c;
    optind = 0;
    while ((c = getopt_long(argc, argv, "hf:F:spqU", longopts, NULL)) != -1) {
        switch (c) {
        case 'h':
            return 1;
        case 'f':
            j->a.format = optarg;
            break;
        case 'F':
            j->b.format = optarg;
            break;
        case 's':
            j->strict = true;
            break;
        case 'p':
            *progress = true;
            break;
        case 'q':
            j->quiet = true;
            break;
        case 'U':
            j->force_share = true;
            break;
        default:
            cli_bad_option(argv[0]);
            return -1;
        }
    }
    if (argc - optind < 2) {
        cli_usage_error(argv[0], "expecting two image file names");
        return -1;
    }
    if (argc - optind > 2) {
        cli_usage_error(argv[0], "unexpected argument '%s'", argv[optind + 2]);
        return -1;
    }
    j->a.name = argv[optind];
    j->b.name = argv[optind + 1];
    return 0;
}

int cmd_compare(int argc, char **argv)
{
    struct cmp_job j = {.quiet = false};
    bool progress = false;
    int r = parse_args(argc, argv, &j, &progress);
    if (r != 0)
        return r > 0 ? cli_help(usage) : CLI_EXIT_USAGE;
    int ret = open_side(&j.a, j.force_share);
    if (!ret)
        ret = open_side(&j.b, j.force_share);
    if (!ret)
        ret = compare(&j, progress);
    free(j.buf1);
    free(j.buf2);
    if (j.a.img)
        cbt_image_close(j.a.img, NULL);
    if (j.b.img)
        cbt_image_close(j.b.img, NULL);
    return ret;
}
