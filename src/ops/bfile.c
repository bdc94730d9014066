/*
 * The files of a backup folder, read safely (declared in manifest.h).
 *
 * Everything in a backup folder is untrusted (docs/backups.md): a manifest
 * or hashes file may have been replaced by a FIFO, a device or a symlink to
 * one.  A FIFO would make open() wait for a writer and /dev/zero would make
 * a read never end, so a file is stat'ed first and refused unless it is a
 * regular file, opened with O_NONBLOCK (a FIFO put there between the stat
 * and the open cannot block it either) and fstat'ed again; then exactly
 * the bytes of its size are read, and that size is checked against what
 * the caller expects (a hashes file: 32 bytes a block; a manifest: at most
 * MANIFEST_MAX_BYTES) before any is read.
 */
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <sys/stat.h>

#include "../util/util.h"
#include "manifest.h"

/* ---- reading ---- */

static const char *file_type(mode_t mode)
{
    if (S_ISDIR(mode))
        return "a folder";
    if (S_ISFIFO(mode))
        return "a FIFO";
    if (S_ISCHR(mode))
        return "a character device";
    if (S_ISBLK(mode))
        return "a block device";
    if (S_ISSOCK(mode))
        return "a socket";
    return "not a regular file";
}

static int not_regular(const char *path, const char *what, mode_t mode,
                       struct cbt_error **errp)
{
    cbt_error_set(errp, EINVAL, "%s: the %s is %s, not a regular file", path,
                  what, file_type(mode));
    cbt_error_set_kind(errp, CBT_ERR_CORRUPT);
    return -1;
}

int bfile_open_read(const char *path, const char *what, uint64_t *size,
                    struct cbt_error **errp)
{
    struct stat st;
    if (stat(path, &st) < 0) {
        cbt_error_set(errp, errno, "%s: %s (the %s)", path, strerror(errno),
                      what);
        return -1;
    }
    if (!S_ISREG(st.st_mode))
        return not_regular(path, what, st.st_mode, errp);
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
    if (fd < 0) {
        cbt_error_set(errp, errno, "%s: %s (the %s)", path, strerror(errno),
                      what);
        return -1;
    }
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        int e = errno;
        close(fd);
        if (!S_ISREG(st.st_mode))
            return not_regular(path, what, st.st_mode, errp);
        cbt_error_set(errp, e, "%s: %s (the %s)", path, strerror(e), what);
        return -1;
    }
    *size = (uint64_t)st.st_size;
    return fd;
}

int bfile_read_all(const char *path, const char *what, uint64_t max,
                   char **out, size_t *outlen, struct cbt_error **errp)
{
    uint64_t size;
    CLEANUP_CLOSE int fd = bfile_open_read(path, what, &size, errp);
    if (fd < 0)
        return -1;
    if (size > max || size >= SIZE_MAX) {
        cbt_error_set(errp, EINVAL, "%s: the %s is %" PRIu64 " bytes; "
                      "expected at most %" PRIu64, path, what, size, max);
        cbt_error_set_kind(errp, CBT_ERR_CORRUPT);
        return -1;
    }
    char *buf = malloc((size_t)size + 1);
    if (!buf) {
        cbt_error_set(errp, ENOMEM, "%s: out of memory", path);
        return -1;
    }
    int r = file_pread_exact(fd, buf, (size_t)size, 0);
    if (r < 0) {
        free(buf);
        cbt_error_set(errp, -r, "%s: cannot read the %s: %s", path, what,
                      strerror(-r));
        return -1;
    }
    buf[size] = '\0';
    *out = buf;
    *outlen = (size_t)size;
    return 0;
}

int hashes_open(const char *path, uint64_t blocks, struct cbt_error **errp)
{
    uint64_t size, want;
    int fd = bfile_open_read(path, "block hashes file", &size, errp);
    if (fd < 0)
        return -1;
    if (mul_overflow_u64(blocks, 32, &want) || size != want) {
        close(fd);
        cbt_error_set(errp, EINVAL, "%s: the block hashes file is %" PRIu64
                      " bytes; expected %" PRIu64 " (32 for each of the %"
                      PRIu64 " blocks its manifest's hash.blocks gives)",
                      path, size, blocks * 32, blocks);
        cbt_error_set_kind(errp, CBT_ERR_CORRUPT);
        return -1;
    }
    return fd;
}

int hashes_sha256(const char *path, uint64_t blocks, char hex[65],
                  struct cbt_error **errp)
{
    CLEANUP_CLOSE int fd = hashes_open(path, blocks, errp);
    if (fd < 0)
        return -1;
    enum { CHUNK = 1 << 20 };
    CLEANUP_FREE uint8_t *buf = malloc(CHUNK);
    if (!buf) {
        cbt_error_set(errp, ENOMEM, "%s: out of memory", path);
        return -1;
    }
    struct sha256_ctx c;
    sha256_init(&c);
    /* Exactly the size checked: a file that grows meanwhile is not read
     * further. */
    uint64_t left = blocks * 32;
    for (uint64_t off = 0; left > 0;) {
        size_t n = (size_t)MIN(left, (uint64_t)CHUNK);
        int r = file_pread_exact(fd, buf, n, off);
        if (r < 0) {
            cbt_error_set(errp, -r, "%s: cannot read the block hashes file: "
                          "%s", path, strerror(-r));
            return -1;
        }
        sha256_update(&c, buf, n);
        off += n;
        left -= n;
    }
    uint8_t d[32];
    sha256_final(&c, d);
    sha256_hex(d, hex);
    return 0;
}

int blockhash_read(const char *path, uint64_t size, struct blockhash *h,
                   struct cbt_error **errp)
{
    memset(h, 0, sizeof(*h));
    uint64_t n = DIV_ROUND_UP(size, (uint64_t)BLOCKHASH_BLOCK);
    CLEANUP_CLOSE int fd = hashes_open(path, n, errp);
    if (fd < 0)
        return -1;
    int r = blockhash_init(h, size);
    if (r < 0) {
        cbt_error_set(errp, -r, "%s: %s", path, strerror(-r));
        return -1;
    }
    r = file_pread_exact(fd, h->leaf, (size_t)n * 32, 0);
    if (r < 0) {
        blockhash_free(h);
        cbt_error_set(errp, -r, "%s: cannot read the block hashes file: %s",
                      path, strerror(-r));
        return -1;
    }
    return 0;
}
