/*
 * The files of a backup folder, read and written safely (declared in
 * manifest.h).
 *
 * Reading.  Everything in a backup folder is untrusted (docs/backups.md):
 * a manifest or hashes file may have been replaced by a FIFO, a device or
 * a symlink to one.  A FIFO would make open() wait for a writer and
 * /dev/zero would make a read never end, so a file is stat'ed first and
 * refused unless it is a regular file, opened with O_NONBLOCK (a FIFO put
 * there between the stat and the open cannot block it either) and fstat'ed
 * again; then exactly the bytes of its size are read, and that size is
 * checked against what the caller expects (a hashes file: 32 bytes a block;
 * a manifest: at most MANIFEST_MAX_BYTES) before any is read.
 *
 * Writing.  A new file never goes through a name that already exists: not
 * through a file an earlier run left, not through a symlink someone planted
 * at the target's name or at a temporary name.  Whole files (manifests,
 * hashes) are written to an unnamed O_TMPFILE in the folder, made durable,
 * and linked into place under their name only then (linkat fails if the
 * name exists); where the file system has no O_TMPFILE, to a new file of a
 * random name created with O_CREAT|O_EXCL (which never follows a link),
 * renamed with RENAME_NOREPLACE.  Replacing a file (the manifest rewritten
 * after the checkpoint exists) renames a new file of ours over it, which
 * replaces the name, never writes through it.  Images (backup targets,
 * restore work files) are created with bfile_create_excl before the image
 * layer formats them, and renamed into place with bfile_rename_ours, which
 * renames only the file this process created.  A failure or a cancelled
 * job leaves no temporary file behind; only a kill can leave one of the
 * random names (".tmp-" and six characters), or nothing at all where
 * O_TMPFILE works.
 */
#include <assert.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>

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

/* ---- whose files ---- */

/* QEMU's lock bytes: 100 + permission bit and 200 + permission bit
 * (src/block/lock.c). */
#define QEMU_LOCK_START 100
#define QEMU_LOCK_LEN 200

static bool lock_held(int fd, off_t start, off_t len)
{
    struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET,
                       .l_start = start, .l_len = len};
    return fcntl(fd, F_OFD_GETLK, &fl) < 0 || fl.l_type != F_UNLCK;
}

bool bfile_held(int fd)
{
    return lock_held(fd, QEMU_LOCK_START, QEMU_LOCK_LEN) ||
           lock_held(fd, BFILE_SCRATCH_OWNER_BYTE, 1);
}

bool bfile_orphan_scratch(int dirfd, const char *name, int *fdp)
{
    if (fdp)
        *fdp = -1;
    size_t n = strlen(name);
    if (n <= 8 || strcmp(name + n - 8, ".scratch") != 0)
        return false;
    /* Read-write: an OFD read lock someone holds is seen as well. */
    int fd = openat(dirfd, name, O_RDWR | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0)
        return false;
    struct stat st;
    unsigned char magic[4] = {0};
    /* cbt's: a qcow2 file, or an empty one (killed before its header was
     * written). */
    bool orphan = fstat(fd, &st) == 0 && S_ISREG(st.st_mode) &&
                  (st.st_size == 0 ||
                   (pread(fd, magic, 4, 0) == 4 &&
                    memcmp(magic, "QFI\xfb", 4) == 0)) &&
                  !bfile_held(fd);
    if (orphan && fdp)
        *fdp = fd;
    else
        close(fd);
    return orphan;
}

/* ---- writing ---- */

char *bfile_folder_of(const char *path)
{
    const char *slash = strrchr(path, '/');
    if (!slash)
        return strdup(".");
    if (slash == path)
        return strdup("/");
    return strndup(path, (size_t)(slash - path));
}

int bfile_sync_folder_of(const char *path)
{
    CLEANUP_FREE char *dir = bfile_folder_of(path);
    if (!dir)
        return -ENOMEM;
    CLEANUP_CLOSE int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    return fsync(fd) < 0 ? -errno : 0;
}

int bfile_create_excl(const char *path, struct cbt_error **errp)
{
    int fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC,
                  0644);
    if (fd < 0)
        cbt_error_set(errp, errno, "%s: cannot create it: %s", path,
                      strerror(errno));
    return fd;
}

/* Is path (not following a link) the file open as fd? */
static bool is_ours(int fd, const char *path)
{
    struct stat a, b;
    return fstat(fd, &a) == 0 && lstat(path, &b) == 0 &&
           a.st_dev == b.st_dev && a.st_ino == b.st_ino;
}

void bfile_unlink_ours(int fd, const char *path)
{
    if (fd >= 0 && is_ours(fd, path))
        unlink(path);
}

/* rename(from, to) that fails with EEXIST when `to` exists (renameat2's
 * RENAME_NOREPLACE; where the file system lacks it, link + unlink, which
 * refuses the same way).  0 or -errno. */
static int rename_noreplace(const char *from, const char *to)
{
    if (renameat2(AT_FDCWD, from, AT_FDCWD, to, RENAME_NOREPLACE) == 0)
        return 0;
    if (errno != EINVAL && errno != ENOSYS)
        return -errno;
    if (link(from, to) < 0)
        return -errno;
    unlink(from);
    return 0;
}

int bfile_rename_ours(int fd, const char *from, const char *to,
                      struct cbt_error **errp)
{
    if (!is_ours(fd, from)) {
        cbt_error_set(errp, EEXIST, "%s: is no longer the file this cbt "
                      "created (replaced meanwhile?); not renaming it to %s",
                      from, to);
        return -1;
    }
    int r = rename_noreplace(from, to);
    if (r < 0) {
        cbt_error_set(errp, -r, "%s: cannot rename %s to it: %s", to, from,
                      strerror(-r));
        return -1;
    }
    return 0;
}

/* "PATH.tmp-XXXXXX" with six random letters; NULL when out of memory. */
static char *random_name(const char *path)
{
    static const char letters[] = "abcdefghijklmnopqrstuvwxyz0123456789";
    uint8_t rnd[6];
    if (getrandom(rnd, sizeof(rnd), 0) != (ssize_t)sizeof(rnd)) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        uint64_t x = (uint64_t)ts.tv_nsec ^ ((uint64_t)getpid() << 20);
        for (size_t i = 0; i < sizeof(rnd); i++, x >>= 5)
            rnd[i] = (uint8_t)x;
    }
    char sfx[7];
    for (size_t i = 0; i < 6; i++)
        sfx[i] = letters[rnd[i] % (sizeof(letters) - 1)];
    sfx[6] = '\0';
    return cbt_strdup_printf("%s.tmp-%s", path, sfx);
}

static int write_and_sync(int fd, const void *buf, size_t len)
{
    int r = file_pwrite_full(fd, buf, len, 0);
    return r < 0 ? r : file_flush(fd);
}

/* The O_TMPFILE route: 0 when placed, 1 when this file system (or /proc)
 * cannot do it (nothing was left), -errno on a failure. */
static int place_tmpfile(const char *path, const void *buf, size_t len,
                         bool replace)
{
    CLEANUP_FREE char *dir = bfile_folder_of(path);
    if (!dir)
        return -ENOMEM;
    CLEANUP_CLOSE int fd = open(dir, O_TMPFILE | O_WRONLY | O_CLOEXEC, 0644);
    if (fd < 0)
        return errno == EOPNOTSUPP || errno == EISDIR || errno == EINVAL
                   ? 1 : -errno;
    int r = write_and_sync(fd, buf, len);
    if (r < 0)
        return r;
    char proc[64];
    snprintf(proc, sizeof(proc), "/proc/self/fd/%d", fd);
    for (int tries = 0; tries < 16; tries++) {
        CLEANUP_FREE char *name = replace ? random_name(path) : strdup(path);
        if (!name)
            return -ENOMEM;
        if (linkat(AT_FDCWD, proc, AT_FDCWD, name, AT_SYMLINK_FOLLOW) < 0) {
            if (errno == ENOENT && tries == 0)
                return 1; /* no /proc: the named route */
            if (errno == EEXIST && replace)
                continue; /* that random name is taken */
            return -errno;
        }
        if (!replace)
            return 0;
        if (rename(name, path) < 0) {
            r = -errno;
            unlink(name);
            return r;
        }
        return 0;
    }
    return -EEXIST;
}

/* The named route: a new file of a random name, renamed into place. */
static int place_named(const char *path, const void *buf, size_t len,
                       bool replace)
{
    for (int tries = 0; tries < 16; tries++) {
        CLEANUP_FREE char *tmp = random_name(path);
        if (!tmp)
            return -ENOMEM;
        int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW |
                               O_CLOEXEC, 0644);
        if (fd < 0 && errno == EEXIST)
            continue;
        if (fd < 0)
            return -errno;
        int r = write_and_sync(fd, buf, len);
        if (close(fd) < 0 && r == 0)
            r = -errno;
        if (r == 0)
            r = replace ? (rename(tmp, path) < 0 ? -errno : 0)
                        : rename_noreplace(tmp, path);
        if (r < 0)
            unlink(tmp);
        return r;
    }
    return -EEXIST;
}

int bfile_write_new(const char *path, const void *buf, size_t len,
                    bool replace, struct cbt_error **errp)
{
    int r = place_tmpfile(path, buf, len, replace);
    if (r == 1)
        r = place_named(path, buf, len, replace);
    if (r == -EEXIST && !replace) {
        cbt_error_set(errp, EEXIST, "%s: already exists; a backup file is "
                      "never overwritten", path);
        return -1;
    }
    if (r < 0) {
        cbt_error_set(errp, -r, "%s: cannot write it: %s", path,
                      strerror(-r));
        return -1;
    }
    r = bfile_sync_folder_of(path);
    if (r < 0) {
        cbt_error_set(errp, -r, "%s: syncing its folder failed: %s", path,
                      strerror(-r));
        return -1;
    }
    return 0;
}

int blockhash_write(const struct blockhash *h, const char *path,
                    char file_sha256_hex[65], struct cbt_error **errp)
{
    /* The file is the leaves, so its SHA-256 is the root. */
    blockhash_root(h, file_sha256_hex);
    return bfile_write_new(path, h->leaf, (size_t)h->n * 32, false, errp);
}

/* ---- block hashes, streamed ----
 *
 * A backup's .hashes file holds 32 bytes per 64 KiB block of the whole
 * disk (8 GiB at 16 TiB), so it is never held in memory: the writer takes
 * the leaves in block order through a HASHES_BUF buffer into a new file
 * (the same O_TMPFILE or random-name route as bfile_write_new, linked or
 * renamed into place by hashes_writer_finish), hashing them as they pass;
 * the reader pages a parent's leaves in, a window at a time. */

#define HASHES_BUF ((size_t)1 << 20) /* bytes: 32768 leaves */
/* Start the kernel's writeback every so many bytes (as the block layer
 * does for images): the final fsync of an 8 GiB file then finds little
 * left to do instead of all of it, and the disk works while we hash. */
#define HASHES_KICK ((uint64_t)32 << 20)

static int hw_drain(struct hashes_writer *w)
{
    if (w->used == 0)
        return 0;
    sha256_update(&w->sha, w->buf, w->used);
    int r = file_pwrite_full(w->fd, w->buf, w->used, w->off);
    if (r < 0)
        return r;
    w->off += w->used;
    w->used = 0;
    if (w->off - w->kicked >= HASHES_KICK) {
        /* Advisory: where it fails the final flush does the work. */
        (void)sync_file_range(w->fd, (off64_t)w->kicked,
                              (off64_t)(w->off - w->kicked),
                              SYNC_FILE_RANGE_WRITE);
        w->kicked = w->off;
    }
    return 0;
}

int hashes_writer_open(struct hashes_writer *w, const char *path,
                       struct cbt_error **errp)
{
    CLEANUP_FREE char *dir = bfile_folder_of(path);
    memset(w, 0, sizeof(*w));
    w->fd = -1;
    w->path = strdup(path);
    w->buf = malloc(HASHES_BUF);
    if (!dir || !w->path || !w->buf)
        goto nomem;
    sha256_init(&w->sha);
    w->fd = open(dir, O_TMPFILE | O_WRONLY | O_CLOEXEC, 0644);
    if (w->fd >= 0)
        return 0;
    if (errno != EOPNOTSUPP && errno != EISDIR && errno != EINVAL) {
        cbt_error_set(errp, errno, "%s: cannot write it: %s", path,
                      strerror(errno));
        goto fail;
    }
    /* No O_TMPFILE here: a new file of a random name. */
    for (int tries = 0; tries < 16 && w->fd < 0; tries++) {
        free(w->tmpname);
        w->tmpname = random_name(path);
        if (!w->tmpname)
            goto nomem;
        w->fd = open(w->tmpname, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW |
                                     O_CLOEXEC, 0644);
        if (w->fd < 0 && errno != EEXIST) {
            cbt_error_set(errp, errno, "%s: cannot write it: %s", path,
                          strerror(errno));
            goto fail;
        }
    }
    if (w->fd >= 0)
        return 0;
    cbt_error_set(errp, EEXIST, "%s: cannot write it: %s", path,
                  strerror(EEXIST));
    goto fail;
nomem:
    cbt_error_set(errp, ENOMEM, "%s: out of memory", path);
fail:
    free(w->tmpname);
    w->tmpname = NULL;
    hashes_writer_abort(w);
    return -1;
}

int hashes_writer_bytes(struct hashes_writer *w, const void *buf, size_t len)
{
    const uint8_t *p = buf;
    while (len > 0) {
        if (w->used == HASHES_BUF) {
            int r = hw_drain(w);
            if (r < 0)
                return r;
        }
        size_t k = MIN(len, HASHES_BUF - w->used);
        memcpy(w->buf + w->used, p, k);
        w->used += k;
        p += k;
        len -= k;
    }
    return 0;
}

int hashes_writer_put(struct hashes_writer *w, const uint8_t leaf[32])
{
    if (w->used == HASHES_BUF) {
        int r = hw_drain(w);
        if (r < 0)
            return r;
    }
    memcpy(w->buf + w->used, leaf, 32);
    w->used += 32;
    w->n++;
    return 0;
}

int hashes_writer_repeat(struct hashes_writer *w, const uint8_t leaf[32],
                         uint64_t count)
{
    while (count > 0) {
        if (w->used == HASHES_BUF) {
            int r = hw_drain(w);
            if (r < 0)
                return r;
        }
        size_t room = (HASHES_BUF - w->used) / 32;
        size_t k = (size_t)MIN((uint64_t)room, count);
        for (size_t i = 0; i < k; i++)
            memcpy(w->buf + w->used + i * 32, leaf, 32);
        w->used += k * 32;
        w->n += k;
        count -= k;
    }
    return 0;
}

int hashes_writer_copy(struct hashes_writer *w, struct hashes_reader *r,
                       uint64_t first, uint64_t count)
{
    while (count > 0) {
        if (w->used == HASHES_BUF) {
            int e = hw_drain(w);
            if (e < 0)
                return e;
        }
        const uint8_t *src;
        uint64_t avail;
        int e = hashes_reader_window(r, first, &src, &avail);
        if (e < 0)
            return e;
        size_t k = (size_t)MIN(MIN(avail, count),
                               (uint64_t)((HASHES_BUF - w->used) / 32));
        memcpy(w->buf + w->used, src, k * 32);
        w->used += k * 32;
        w->n += k;
        first += k;
        count -= k;
    }
    return 0;
}

int hashes_writer_finish(struct hashes_writer *w, char hex[65],
                         struct cbt_error **errp)
{
    int r = hw_drain(w);
    if (r == 0)
        r = file_flush(w->fd);
    if (r < 0) {
        cbt_error_set(errp, -r, "%s: cannot write it: %s", w->path,
                      strerror(-r));
        return -1;
    }
    uint8_t d[32];
    sha256_final(&w->sha, d);
    sha256_hex(d, hex);
    if (w->tmpname) {
        r = rename_noreplace(w->tmpname, w->path);
    } else {
        char proc[64];
        snprintf(proc, sizeof(proc), "/proc/self/fd/%d", w->fd);
        r = linkat(AT_FDCWD, proc, AT_FDCWD, w->path, AT_SYMLINK_FOLLOW) < 0
                ? -errno : 0;
    }
    if (r == -EEXIST) {
        cbt_error_set(errp, EEXIST, "%s: already exists; a backup file is "
                      "never overwritten", w->path);
        return -1;
    }
    if (r < 0) {
        cbt_error_set(errp, -r, "%s: cannot write it: %s", w->path,
                      strerror(-r));
        return -1;
    }
    free(w->tmpname); /* the name is the real one now */
    w->tmpname = NULL;
    r = bfile_sync_folder_of(w->path);
    if (r < 0) {
        unlink(w->path); /* named by us a moment ago */
        cbt_error_set(errp, -r, "%s: syncing its folder failed: %s", w->path,
                      strerror(-r));
        return -1;
    }
    return 0;
}

void hashes_writer_abort(struct hashes_writer *w)
{
    if (w->tmpname)
        unlink(w->tmpname);
    if (w->fd >= 0)
        close(w->fd);
    free(w->tmpname);
    free(w->path);
    free(w->buf);
    memset(w, 0, sizeof(*w));
    w->fd = -1;
}

int hashes_reader_open(struct hashes_reader *r, const char *path,
                       uint64_t blocks, char hex[65], struct cbt_error **errp)
{
    return hashes_reader_open_scan(r, path, blocks, hex, NULL, NULL, errp);
}

int hashes_reader_open_scan(struct hashes_reader *r, const char *path,
                            uint64_t blocks, char hex[65],
                            hashes_scan_fn *scan, void *opaque,
                            struct cbt_error **errp)
{
    memset(r, 0, sizeof(*r));
    r->fd = hashes_open(path, blocks, errp);
    if (r->fd < 0)
        return -1;
    r->open = true;
    r->n = blocks;
    r->buf = malloc(HASHES_BUF);
    if (!r->buf) {
        cbt_error_set(errp, ENOMEM, "%s: out of memory", path);
        hashes_reader_close(r);
        return -1;
    }
    if (!hex)
        return 0;
    /* The file's digest, read through the same descriptor the leaves will
     * be read from. */
    struct sha256_ctx c;
    sha256_init(&c);
    for (uint64_t b = 0; b < blocks;) {
        const uint8_t *p;
        uint64_t k;
        int e = hashes_reader_window(r, b, &p, &k);
        if (e < 0) {
            cbt_error_set(errp, -e, "%s: cannot read the block hashes file: "
                          "%s", path, strerror(-e));
            hashes_reader_close(r);
            return -1;
        }
        sha256_update(&c, p, (size_t)k * 32);
        if (scan && scan(opaque, b, p, k) < 0) {
            cbt_error_set(errp, ENOMEM, "%s: out of memory", path);
            hashes_reader_close(r);
            return -1;
        }
        b += k;
    }
    uint8_t d[32];
    sha256_final(&c, d);
    sha256_hex(d, hex);
    return 0;
}

int hashes_reader_window(struct hashes_reader *r, uint64_t first,
                         const uint8_t **leaves, uint64_t *count)
{
    assert(first < r->n);
    if (first < r->first || first >= r->first + r->count) {
        uint64_t k = MIN(r->n - first, (uint64_t)(HASHES_BUF / 32));
        int e = file_pread_exact(r->fd, r->buf, (size_t)k * 32, first * 32);
        if (e < 0) {
            r->count = 0;
            return e;
        }
        r->first = first;
        r->count = k;
    }
    *leaves = r->buf + (first - r->first) * 32;
    *count = r->first + r->count - first;
    return 0;
}

void hashes_reader_close(struct hashes_reader *r)
{
    if (r->open && r->fd >= 0)
        close(r->fd);
    free(r->buf);
    memset(r, 0, sizeof(*r)); /* not open: closing again does nothing */
}
