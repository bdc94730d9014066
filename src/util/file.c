/* Host file I/O: full-length positional reads and writes, flush, holes. */
#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/stat.h>

#include "util.h"

int file_pread_full(int fd, void *buf, size_t len, uint64_t off)
{
    char *p = buf;
    while (len > 0) {
        ssize_t r = pread(fd, p, len, (off_t)off);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0) {
            memset(p, 0, len);  /* past EOF reads as zeroes */
            return 0;
        }
        p += r;
        len -= (size_t)r;
        off += (uint64_t)r;
    }
    return 0;
}

int file_pread_exact(int fd, void *buf, size_t len, uint64_t off)
{
    char *p = buf;
    while (len > 0) {
        ssize_t r = pread(fd, p, len, (off_t)off);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0)
            return -EIO;
        p += r;
        len -= (size_t)r;
        off += (uint64_t)r;
    }
    return 0;
}

int file_pwrite_full(int fd, const void *buf, size_t len, uint64_t off)
{
    const char *p = buf;
    while (len > 0) {
        ssize_t r = pwrite(fd, p, len, (off_t)off);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0)
            return -EIO;
        p += r;
        len -= (size_t)r;
        off += (uint64_t)r;
    }
    return 0;
}

int file_flush(int fd)
{
    return fdatasync(fd) < 0 ? -errno : 0;
}

int file_size(int fd, uint64_t *size)
{
    struct stat st;
    if (fstat(fd, &st) < 0)
        return -errno;
    if (S_ISBLK(st.st_mode)) {
        off_t end = lseek(fd, 0, SEEK_END);
        if (end < 0)
            return -errno;
        *size = (uint64_t)end;
        return 0;
    }
    *size = (uint64_t)st.st_size;
    return 0;
}

int file_allocated_size(int fd, uint64_t *size)
{
    struct stat st;
    if (fstat(fd, &st) < 0)
        return -errno;
    *size = (uint64_t)st.st_blocks * 512;
    return 0;
}

int file_truncate(int fd, uint64_t size)
{
    while (ftruncate(fd, (off_t)size) < 0) {
        if (errno != EINTR)
            return -errno;
    }
    return 0;
}

int file_write_zeroes(int fd, uint64_t off, uint64_t len)
{
    if (fallocate(fd, FALLOC_FL_ZERO_RANGE, (off_t)off, (off_t)len) == 0)
        return 0;
    static const char zeroes[65536];
    while (len > 0) {
        size_t n = (size_t)MIN(len, sizeof(zeroes));
        int r = file_pwrite_full(fd, zeroes, n, off);
        if (r < 0)
            return r;
        off += n;
        len -= n;
    }
    return 0;
}

int file_punch_hole(int fd, uint64_t off, uint64_t len)
{
    if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off,
                  (off_t)len) == 0)
        return 0;
    return file_write_zeroes(fd, off, len);
}

char *path_resolve_relative(const char *base, const char *rel)
{
    if (rel[0] == '/' || !strchr(base, '/'))
        return strdup(rel);
    const char *slash = strrchr(base, '/');
    size_t dirlen = (size_t)(slash - base) + 1;
    char *out = malloc(dirlen + strlen(rel) + 1);
    if (!out)
        return NULL;
    memcpy(out, base, dirlen);
    strcpy(out + dirlen, rel);
    return out;
}
