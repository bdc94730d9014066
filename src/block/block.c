/*
 * The block layer: opens images and their backing chains, and is the one
 * place every read, write, zero-write and discard passes through.  It checks
 * ranges and read-only state, dirties recording bitmaps (blk_mark_dirty),
 * takes the node lock, and then calls the format driver.
 */
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <sys/stat.h>

#include "block.h"

static const struct blk_driver *const drivers[] = {
    &blk_qcow2_driver,
    &blk_raw_driver,
};

const struct blk_driver *blk_find_driver(const char *name)
{
    for (size_t i = 0; i < ARRAY_SIZE(drivers); i++)
        if (strcmp(drivers[i]->name, name) == 0)
            return drivers[i];
    return NULL;
}

const struct blk_driver *blk_probe(int fd)
{
    uint8_t buf[512];
    if (file_pread_full(fd, buf, sizeof(buf), 0) < 0)
        return NULL;
    const struct blk_driver *best = NULL;
    int best_score = 0;
    for (size_t i = 0; i < ARRAY_SIZE(drivers); i++) {
        if (!drivers[i]->probe)
            continue;
        int score = drivers[i]->probe(buf, sizeof(buf));
        if (score > best_score) {
            best_score = score;
            best = drivers[i];
        }
    }
    return best;
}

/* Identity of the files already in the chain being opened, to find loops. */
struct chain_seen {
    dev_t dev[BLK_MAX_CHAIN_DEPTH + 1];
    ino_t ino[BLK_MAX_CHAIN_DEPTH + 1];
    int n;
    int failed; /* depth of the layer that failed to open, or 0 */
};

static void node_free(struct blk_node *node)
{
    if (!node)
        return;
    if (node->fd >= 0)
        close(node->fd);
    if (node->direct_fd >= 0)
        close(node->direct_fd);
    blk_lock_release(node->file_lock, node->lock_role);
    blk_bitmaps_free(node);
    pthread_mutex_destroy(&node->lock);
    free(node->filename);
    free(node->backing_name);
    free(node->backing_fmt);
    free(node);
}

int blk_open_file(const char *filename, unsigned flags,
                  struct blk_lock **lockp, struct cbt_error **errp)
{
    if ((flags & CBT_OPEN_FORCE_SHARE) && (flags & CBT_OPEN_RDWR)) {
        cbt_error_set(errp, EINVAL, "%s: force-share (-U) can only be used "
                      "with read-only images", filename);
        cbt_error_set_kind(errp, CBT_ERR_USAGE);
        return -1;
    }
    bool rw = flags & CBT_OPEN_RDWR;
    /* O_NONBLOCK: opening a FIFO must not wait for a writer. */
    int fd = open(filename, (rw ? O_RDWR : O_RDONLY) | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        cbt_error_set(errp, errno, "Could not open '%s': %s", filename,
                      strerror(errno));
        return -1;
    }
    struct stat st;
    if (fstat(fd, &st) < 0) {
        int e = errno;
        close(fd);
        cbt_error_set(errp, e, "Could not open '%s': %s", filename,
                      strerror(e));
        return -1;
    }
    if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)) {
        close(fd);
        cbt_error_set(errp, EINVAL, "Could not open '%s': not a regular file "
                      "or block device (%s)", filename,
                      S_ISDIR(st.st_mode)    ? "a directory"
                      : S_ISFIFO(st.st_mode) ? "a FIFO"
                      : S_ISCHR(st.st_mode)  ? "a character device"
                      : S_ISSOCK(st.st_mode) ? "a socket"
                                             : "another kind of file");
        return -1;
    }
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl & ~O_NONBLOCK) < 0) {
        int e = errno;
        close(fd);
        cbt_error_set(errp, e, "Could not open '%s': %s", filename,
                      strerror(e));
        return -1;
    }
    *lockp = blk_lock_acquire(fd, filename, blk_lock_role_of(flags), errp);
    if (!*lockp) {
        close(fd);
        cbt_error_prefix(errp, "Could not open '%s'", filename);
        return -1;
    }
    return fd;
}

int blk_create_file(const char *filename, bool keep, struct blk_lock **lockp,
                    struct cbt_error **errp)
{
    /* No O_TRUNC: a file somebody holds must not lose a byte before its
     * lock has been tested. */
    int fd = open(filename, O_RDWR | O_CREAT | O_CLOEXEC | O_NONBLOCK, 0644);
    if (fd < 0) {
        cbt_error_set(errp, errno, "%s: cannot create: %s", filename,
                      strerror(errno));
        return -1;
    }
    struct stat st;
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        int e = errno;
        close(fd);
        if (e == 0 || S_ISDIR(st.st_mode) || !S_ISREG(st.st_mode))
            cbt_error_set(errp, EINVAL, "%s: cannot create: not a regular "
                          "file", filename);
        else
            cbt_error_set(errp, e, "%s: cannot create: %s", filename,
                          strerror(e));
        return -1;
    }
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl & ~O_NONBLOCK) < 0) {
        cbt_error_set(errp, errno, "%s: cannot create: %s", filename,
                      strerror(errno));
        close(fd);
        return -1;
    }
    *lockp = blk_lock_acquire(fd, filename, BLK_LOCK_CREATE, errp);
    if (!*lockp) {
        cbt_error_prefix(errp, "Could not create '%s'", filename);
        close(fd);
        return -1;
    }
    int r = keep ? 0 : file_truncate(fd, 0);
    if (r < 0) {
        close(fd);
        blk_lock_release(*lockp, BLK_LOCK_CREATE);
        cbt_error_set(errp, -r, "%s: cannot create: %s", filename,
                      strerror(-r));
        return -1;
    }
    return fd;
}

static struct blk_node *open_chain(const char *filename, const char *format,
                                   unsigned flags, struct chain_seen *seen,
                                   struct cbt_error **errp)
{
    if (seen->n > BLK_MAX_CHAIN_DEPTH) {
        cbt_error_set(errp, ELOOP, "%s: backing chain deeper than %d layers",
                      filename, BLK_MAX_CHAIN_DEPTH);
        return NULL;
    }
    struct blk_lock *lock = NULL;
    int fd = blk_open_file(filename, flags, &lock, errp);
    if (fd < 0)
        return NULL;
    struct blk_node *node = calloc(1, sizeof(*node));
    if (!node) {
        close(fd);
        blk_lock_release(lock, blk_lock_role_of(flags));
        cbt_error_set(errp, ENOMEM, "%s: out of memory", filename);
        return NULL;
    }
    pthread_mutex_init(&node->lock, NULL);
    node->warner = warn_scope_current();
    node->fd = fd;
    node->direct_fd = node->direct_of = -1;
    node->wb_fd = -1;
    node->wb_lo = UINT64_MAX; /* wb_reset's empty span */
    node->file_lock = lock;
    node->lock_role = blk_lock_role_of(flags);
    node->filename = strdup(filename);
    if (!node->filename) {
        node_free(node);
        cbt_error_set(errp, ENOMEM, "%s: out of memory", filename);
        return NULL;
    }
    struct stat st;
    if (fstat(fd, &st) < 0) {
        int e = errno;
        node_free(node);
        cbt_error_set(errp, e, "%s: %s", filename, strerror(e));
        return NULL;
    }
    for (int i = 0; i < seen->n; i++) {
        if (seen->dev[i] == st.st_dev && seen->ino[i] == st.st_ino) {
            node_free(node);
            cbt_error_set(errp, ELOOP,
                          "%s: backing chain loops back to this file", filename);
            return NULL;
        }
    }
    seen->dev[seen->n] = st.st_dev;
    seen->ino[seen->n] = st.st_ino;
    seen->n++;

    const struct blk_driver *drv;
    if (format) {
        drv = blk_find_driver(format);
        if (!drv) {
            node_free(node);
            cbt_error_set(errp, EINVAL, "Unknown file format '%s'", format);
            return NULL;
        }
    } else {
        drv = blk_probe(fd);
        if (!drv)
            drv = &blk_raw_driver;
    }
    node->drv = drv;
    node->flags = flags;
    node->read_only = !(flags & CBT_OPEN_RDWR);
    if ((flags & CBT_OPEN_FORCE_SHARE) && blk_lock_writer_present(fd)) {
        node->shared_with_writer = true;
        if (!(flags & CBT_OPEN_SHARE_QUIET))
            warn_to(&node->warner,
                    "%s is open for writing in another process (-U): what "
                     "cbt reads is the image as that process last wrote it, "
                     "which may be inconsistent, and its bitmaps are in use",
                     filename);
    }
    if (drv->open(node, fd, flags, errp) < 0) {
        node_free(node);
        return NULL;
    }
    /* The rollback point of the bitmaps the driver loaded. */
    if (blk_bitmaps_snapshot(node) < 0) {
        cbt_error_set(errp, ENOMEM, "%s: out of memory", filename);
        cbt_image_close(node, NULL);
        return NULL;
    }

    if (node->backing_name && !(flags & CBT_OPEN_NO_BACKING)) {
        char *path = path_resolve_relative(filename, node->backing_name);
        if (!path) {
            cbt_error_set(errp, ENOMEM, "%s: out of memory", filename);
            cbt_image_close(node, NULL);
            return NULL;
        }
        /* Backing files are always opened read-only. */
        unsigned bflags = flags & ~(unsigned)(CBT_OPEN_RDWR | CBT_OPEN_CHECK);
        int depth = seen->n; /* of the backing file */
        node->backing = open_chain(path, node->backing_fmt, bflags, seen, errp);
        if (!node->backing) {
            /* Name the layer that failed and its overlay, and, when that
             * lies deeper, the top: one line, however long the chain. */
            if (!seen->failed) {
                seen->failed = depth;
                cbt_error_prefix(errp, "Could not open backing file of '%s'",
                                 filename);
            } else if (depth == 1) {
                cbt_error_prefix(errp, "'%s', layer %d of its backing chain",
                                 filename, seen->failed);
            }
            free(path);
            cbt_image_close(node, NULL);
            return NULL;
        }
        free(path);
    }
    return node;
}

struct cbt_image *cbt_image_open(const char *filename, const char *format,
                                 unsigned flags, struct cbt_error **errp)
{
    struct chain_seen seen = { .n = 0, .failed = 0 };
    return open_chain(filename, format, flags, &seen, errp);
}

struct cbt_image *cbt_image_open_with(const char *filename,
                                      const struct cbt_open_opts *opts,
                                      struct cbt_error **errp)
{
    struct cbt_open_opts o;
    if (OPTS_COPY(&o, opts, cbt_open_opts, errp) < 0)
        return NULL;
    /* Every node of the chain (and what the open itself says: a lock it
     * waits for) takes the caller's callback. */
    WARN_SCOPE(o.warn, o.warn_opaque);
    return cbt_image_open(filename, o.format, o.flags, errp);
}

static int gather_flush_locked(struct blk_node *node);

int cbt_image_close(struct cbt_image *img, struct cbt_error **errp)
{
    int ret = 0;
    while (img) {
        struct blk_node *backing = img->backing;
        /* Nobody else may use the chain any more (image.h): the lock
         * only keeps the driver's contract. */
        pthread_mutex_lock(&img->lock);
        int r = gather_flush_locked(img);
        if (r < 0) {
            cbt_error_set(errp, -r, "%s: cannot write: %s", img->filename,
                          strerror(-r));
            ret = -1;
        }
        if (img->drv && img->opaque && !img->read_only &&
            img->drv->bitmap_store) {
            /* Closing commits the bitmaps. */
            if (img->drv->bitmap_store(img, errp) < 0)
                ret = -1;
        }
        pthread_mutex_unlock(&img->lock);
        if (img->drv && img->drv->close && img->opaque) {
            if (img->drv->close(img, errp) < 0)
                ret = -1;
        }
        node_free(img);
        img = backing;
    }
    return ret;
}

/* Resize and reopen change the size under the node's lock: read it there.
 * The lock is the node's own, so a const image still takes it. */
uint64_t cbt_image_size(const struct cbt_image *img)
{
    struct blk_node *node = (struct blk_node *)img;
    pthread_mutex_lock(&node->lock);
    uint64_t size = node->size;
    pthread_mutex_unlock(&node->lock);
    return size;
}

uint64_t blk_backing_size(struct blk_node *node)
{
    return node->backing ? cbt_image_size(node->backing) : 0;
}

bool cbt_image_shared_with_writer(const struct cbt_image *img)
{
    return img->shared_with_writer;
}
const char *cbt_image_filename(const struct cbt_image *img) { return img->filename; }
const char *cbt_image_format(const struct cbt_image *img) { return img->drv->name; }
struct cbt_image *cbt_image_backing(const struct cbt_image *img) { return img->backing; }

/* ---- the data path ----
 *
 * The checks of a request (range, read-only) are made under node->lock,
 * together with the driver call: a resize or a reopen in another thread
 * changes size and mode under that lock, so a check made before taking it
 * could pass for a size or mode the request then does not run under.
 */

/* Caller holds node->lock. */
static int check_range(const struct blk_node *node, uint64_t off, uint64_t len)
{
    uint64_t end;
    if (add_overflow_u64(off, len, &end) || end > node->size)
        return -EINVAL;
    return 0;
}

int cbt_image_pread(struct cbt_image *img, void *buf, size_t len, uint64_t off)
{
    pthread_mutex_lock(&img->lock);
    int r = check_range(img, off, len);
    if (r == 0 && len > 0)
        r = img->drv->read(img, buf, off, len);
    pthread_mutex_unlock(&img->lock);
    return r;
}

/* Called with node->lock held; takes the backing node's lock below it (the
 * top-to-bottom order), and decides how much of the range the backing
 * node holds under that lock, where its size cannot change. */
int blk_read_backing(struct blk_node *node, void *buf, uint64_t off, size_t len)
{
    struct blk_node *b = node->backing;
    size_t n = 0;
    if (b) {
        pthread_mutex_lock(&b->lock);
        int r = 0;
        if (off < b->size) {
            n = (size_t)MIN((uint64_t)len, b->size - off);
            r = b->drv->read(b, buf, off, n);
        }
        pthread_mutex_unlock(&b->lock);
        if (r < 0)
            return r;
    }
    if (n < len)
        memset((char *)buf + n, 0, len - n);
    return 0;
}

/*
 * Streaming writeback.  Bulk jobs (convert, commit, stream, a merge, a
 * --buffered backup) write their data through the page cache; left alone,
 * the flush that ends them finds gigabytes to write and takes as long as
 * the rest of the job.  So after every WRITEBACK_STEP bytes of data
 * written through the cache, the kernel is asked to start writing them
 * back, without waiting: only the span of the file they were written in
 * (sync_file_range over the whole file walks all of its cached pages), and
 * only when they fill a good part of it.  Scattered writes (a merge of
 * 5% of a disk's clusters in place, 200 MiB over 4 GiB) are left to the
 * final flush, which sends them in file order, as qemu-img commit does: a
 * kick there had the caller wait for the device's queue with thousands of
 * small requests (21-75 ms per kick on a loaded machine, bench/RESULTS.md).
 * Direct writes are on their way to the disk already and are not counted.
 * Caller holds node->lock.
 */
#define WRITEBACK_STEP ((uint64_t)32 << 20)
#define WRITEBACK_DENSITY 4 /* kick when the span <= this x the bytes */

static void wb_reset(struct blk_node *node)
{
    node->wb_bytes = 0;
    node->wb_lo = UINT64_MAX;
    node->wb_hi = 0;
}

static void kick_locked(struct blk_node *node, bool dense_only)
{
    uint64_t span = node->wb_hi - node->wb_lo;
    if (node->wb_bytes > 0 &&
        (!dense_only || span / WRITEBACK_DENSITY <= node->wb_bytes)) {
        /* Advisory: an error (e.g. a file system without it) changes
         * nothing, the flush still does the whole work. */
        (void)sync_file_range(node->wb_fd, (off_t)node->wb_lo, (off_t)span,
                              SYNC_FILE_RANGE_WRITE);
    }
    wb_reset(node);
}

void blk_note_cached_write(struct blk_node *node, int fd, uint64_t off,
                           uint64_t len)
{
    if (len == 0)
        return;
    if (node->wb_bytes > 0 && fd != node->wb_fd)
        kick_locked(node, true); /* one file's span at a time */
    node->wb_fd = fd;
    node->wb_lo = MIN(node->wb_lo, off);
    node->wb_hi = MAX(node->wb_hi, off + len);
    node->wb_bytes += len;
    if (node->wb_bytes >= WRITEBACK_STEP)
        kick_locked(node, true);
}

void blk_start_writeback(struct blk_node *node)
{
    pthread_mutex_lock(&node->lock);
    if (!node->read_only)
        kick_locked(node, false);
    pthread_mutex_unlock(&node->lock);
}

/*
 * Direct writes (CBT_OPEN_DIRECT).  The O_DIRECT descriptor is a second
 * open of the very file node->fd has open (through /proc/self/fd, else by
 * name, checked to be the same file); the image's locks are the process's
 * (lock.c), so it needs none of its own.  Its alignment comes from statx
 * (STATX_DIOALIGN, Linux 6.1); where that says nothing, 4 KiB, which every
 * common file system and device accepts.  Caller holds node->lock.
 */
#define DIRECT_ALIGN_DEFAULT 4096u

static int open_same_file_direct(struct blk_node *node)
{
    char proc[48];
    snprintf(proc, sizeof(proc), "/proc/self/fd/%d", node->fd);
    int fd = open(proc, O_WRONLY | O_DIRECT | O_CLOEXEC);
    if (fd < 0 && errno == ENOENT) /* no /proc */
        fd = open(node->filename, O_WRONLY | O_DIRECT | O_CLOEXEC);
    if (fd < 0)
        return -1;
    struct stat a, b;
    if (fstat(fd, &a) < 0 || fstat(node->fd, &b) < 0 ||
        a.st_dev != b.st_dev || a.st_ino != b.st_ino || !S_ISREG(a.st_mode)) {
        close(fd);
        return -1;
    }
    return fd;
}

static uint32_t direct_alignment(int fd)
{
    uint32_t align = DIRECT_ALIGN_DEFAULT;
#ifdef STATX_DIOALIGN
    struct statx stx;
    if (statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &stx) == 0 &&
        (stx.stx_mask & STATX_DIOALIGN)) {
        if (stx.stx_dio_offset_align == 0)
            return 0; /* the file system says: no direct I/O here */
        align = MAX(stx.stx_dio_mem_align, stx.stx_dio_offset_align);
    }
#endif
    return align;
}

/* The O_DIRECT descriptor for node->fd's file, or -1. */
static int direct_fd_locked(struct blk_node *node)
{
    if (!(node->flags & CBT_OPEN_DIRECT) || node->read_only)
        return -1;
    if (node->direct_of == node->fd)
        return node->direct_fd;
    if (node->direct_fd >= 0)
        close(node->direct_fd);
    node->direct_of = node->fd;
    node->direct_fd = open_same_file_direct(node);
    if (node->direct_fd < 0)
        return -1;
    uint32_t a = node->direct_align = direct_alignment(node->direct_fd);
    if (a == 0 || (a & (a - 1)) != 0) { /* none, or not a power of two */
        close(node->direct_fd);
        node->direct_fd = -1;
    }
    return node->direct_fd;
}

/* A write of [off, off + len) of fd through the cache, counted for the
 * streaming writeback. */
static int cached_write(struct blk_node *node, int fd, const void *buf,
                        size_t len, uint64_t off)
{
    int r = file_pwrite_full(fd, buf, len, off);
    if (r == 0)
        blk_note_cached_write(node, fd, off, len);
    return r;
}

/* A direct write of [off, off + len) from buf, or through the cache once
 * direct I/O is refused. */
static int direct_write(struct blk_node *node, const void *buf, size_t len,
                        uint64_t off)
{
    if (node->direct_fd >= 0) {
        int r = file_pwrite_full(node->direct_fd, buf, len, off);
        if (r != -EINVAL)
            return r;
        /* Refused after all (a rule statx did not tell): through the cache
         * from now on; the same bytes again, so nothing is lost if part of
         * them went. */
        close(node->direct_fd);
        node->direct_fd = -1;
    }
    return cached_write(node, node->fd, buf, len, off);
}

/* Issue the held-back write, if any. */
static int gather_flush_locked(struct blk_node *node)
{
    if (node->gather_len == 0)
        return 0;
    size_t len = node->gather_len;
    node->gather_len = 0;
    return direct_write(node, node->gather_buf, len, node->gather_off);
}

int blk_data_pwrite(struct blk_node *node, int fd, const void *buf,
                    size_t len, uint64_t off)
{
    int dfd = fd == node->fd ? direct_fd_locked(node) : -1;
    uint64_t m = dfd >= 0 ? node->direct_align - 1 : 0;
    bool direct = dfd >= 0 && (((uintptr_t)buf | off | len) & m) == 0;
    if (direct && node->gathering) {
        if (node->gather_len && node->gather_buf + node->gather_len == buf &&
            node->gather_off + node->gather_len == off &&
            node->gather_len + len <= BLK_GATHER_MAX) {
            node->gather_len += len;
            return 0;
        }
        int r = gather_flush_locked(node);
        if (r < 0)
            return r;
        node->gather_buf = buf;
        node->gather_off = off;
        node->gather_len = len;
        return 0;
    }
    /* In the order the caller wrote them. */
    int r = gather_flush_locked(node);
    if (r < 0)
        return r;
    return direct ? direct_write(node, buf, len, off)
                  : cached_write(node, fd, buf, len, off);
}

void blk_gather_begin(struct blk_node *node)
{
    pthread_mutex_lock(&node->lock);
    node->gathering = true;
    pthread_mutex_unlock(&node->lock);
}

int blk_gather_end(struct blk_node *node)
{
    pthread_mutex_lock(&node->lock);
    int r = gather_flush_locked(node);
    node->gathering = false;
    pthread_mutex_unlock(&node->lock);
    return r;
}

/* Caller holds img->lock. */
static int write_check_locked(struct cbt_image *img, uint64_t off,
                              uint64_t len)
{
    if (img->read_only)
        return -EPERM;
    return check_range(img, off, len);
}

/*
 * The steps before the driver call of a write, zero-write or discard, with
 * node->lock held: the checks, then dirtying the recording bitmaps unless
 * BLK_WRITE_NO_DIRTY.  1: call the driver; 0: nothing to do (len 0);
 * else -errno.
 */
static int write_begin_locked(struct blk_node *node, uint64_t off,
                              uint64_t len, unsigned bflags)
{
    int r = write_check_locked(node, off, len);
    if (r < 0 || len == 0)
        return r;
    if (!(bflags & BLK_WRITE_NO_DIRTY) &&
        (r = blk_mark_dirty(node, off, len)) < 0)
        return r;
    return 1;
}

int blk_pwrite(struct blk_node *node, const void *buf, size_t len,
               uint64_t off, unsigned bflags)
{
    pthread_mutex_lock(&node->lock);
    int r = write_begin_locked(node, off, len, bflags);
    if (r > 0) {
        r = node->drv->write(node, buf, off, len);
    }
    pthread_mutex_unlock(&node->lock);
    return r;
}

int blk_pwrite_zeroes(struct blk_node *node, uint64_t off, uint64_t len,
                      unsigned zflags, unsigned bflags)
{
    pthread_mutex_lock(&node->lock);
    int r = write_begin_locked(node, off, len, bflags);
    if (r > 0)
        r = node->drv->write_zeroes(node, off, len, zflags);
    pthread_mutex_unlock(&node->lock);
    return r;
}

int blk_discard(struct blk_node *node, uint64_t off, uint64_t len,
                unsigned bflags)
{
    pthread_mutex_lock(&node->lock);
    int r = write_begin_locked(node, off, len, bflags);
    if (r > 0)
        r = node->drv->discard ? node->drv->discard(node, off, len) : 0;
    pthread_mutex_unlock(&node->lock);
    return r;
}

int blk_make_empty(struct blk_node *node)
{
    if (!node->drv->make_empty)
        return -ENOTSUP;
    pthread_mutex_lock(&node->lock);
    int r = node->read_only ? -EPERM : node->drv->make_empty(node);
    pthread_mutex_unlock(&node->lock);
    return r;
}

int cbt_image_pwrite(struct cbt_image *img, const void *buf, size_t len,
                     uint64_t off)
{
    return blk_pwrite(img, buf, len, off, 0);
}

int cbt_image_pwrite_zeroes(struct cbt_image *img, uint64_t off, uint64_t len,
                            unsigned flags)
{
    return blk_pwrite_zeroes(img, off, len, flags, 0);
}

int cbt_image_discard(struct cbt_image *img, uint64_t off, uint64_t len)
{
    return blk_discard(img, off, len, 0);
}

int cbt_image_pwrite_compressed(struct cbt_image *img, const void *buf,
                                size_t len, uint64_t off)
{
    pthread_mutex_lock(&img->lock);
    int r = write_check_locked(img, off, len);
    if (r < 0 || len == 0)
        goto out;
    r = -ENOTSUP;
    if (!img->drv->write_compressed || img->cluster_size == 0)
        goto out;
    uint64_t cs = img->cluster_size;
    /* Whole clusters, the last one possibly cut by the end of the image. */
    r = -EINVAL;
    if (off % cs || (len % cs && off + len != img->size))
        goto out;
    r = blk_mark_dirty(img, off, len);
    for (size_t done = 0; r == 0 && done < len; done += cs) {
        size_t n = (size_t)MIN((uint64_t)(len - done), cs);
        r = img->drv->write_compressed(img, (const char *)buf + done,
                                       off + done, n, NULL, 0);
    }
out:
    pthread_mutex_unlock(&img->lock);
    return r;
}

int64_t cbt_image_compress_cluster(struct cbt_image *img, const void *buf,
                                   size_t len, uint64_t off, void *out,
                                   size_t cap)
{
    if (!img->drv->compress)
        return -ENOTSUP;
    /* The lock only for the checks (a resize changes the size); the
     * compression itself reads only what is fixed while img is open, so
     * several threads compress at once. */
    pthread_mutex_lock(&img->lock);
    uint64_t cs = img->cluster_size, size = img->size;
    pthread_mutex_unlock(&img->lock);
    if (cs == 0)
        return -ENOTSUP;
    if (len == 0 || off % cs || off >= size || len > cs ||
        (len < cs && off + len != size))
        return -EINVAL;
    return img->drv->compress(img, buf, len, out, cap);
}

int cbt_image_pwrite_precompressed(struct cbt_image *img, const void *cbuf,
                                   size_t cbuf_len, size_t len, uint64_t off)
{
    pthread_mutex_lock(&img->lock);
    int r = write_check_locked(img, off, len);
    if (r < 0 || len == 0)
        goto out;
    r = -ENOTSUP;
    if (!img->drv->write_compressed || img->cluster_size == 0)
        goto out;
    uint64_t cs = img->cluster_size;
    r = -EINVAL;
    if (off % cs || len > cs || (len < cs && off + len != img->size) ||
        cbuf_len == 0 || cbuf_len >= cs)
        goto out;
    r = blk_mark_dirty(img, off, len);
    if (r == 0)
        r = img->drv->write_compressed(img, NULL, off, len, cbuf, cbuf_len);
out:
    pthread_mutex_unlock(&img->lock);
    return r;
}

int cbt_image_flush(struct cbt_image *img)
{
    pthread_mutex_lock(&img->lock);
    int r = img->read_only ? 0 : gather_flush_locked(img);
    if (r == 0 && !img->read_only)
        r = img->drv->flush(img);
    if (r == 0)
        wb_reset(img); /* nothing left for a kick */
    pthread_mutex_unlock(&img->lock);
    return r;
}

int cbt_image_block_status(struct cbt_image *img, uint64_t off, uint64_t len,
                           struct cbt_extent *ext)
{
    return cbt_image_block_status_above(img, NULL, off, len, ext);
}

/* Fill ext from a layer's answer that decides the contents (or, with
 * zero, a range past the end of the layer below). */
static void status_to_extent(const struct blk_node *node,
                             const struct blk_status *st, bool zero,
                             struct cbt_extent *ext)
{
    if (!zero) {
        ext->flags |= CBT_BS_PRESENT;
        if (st->flags & BLK_STATUS_ZERO)
            ext->flags |= CBT_BS_ZERO;
        if (st->flags & BLK_STATUS_DATA)
            ext->flags |= CBT_BS_DATA;
        if (st->flags & BLK_STATUS_COMPRESSED)
            ext->flags |= CBT_BS_COMPRESSED;
    } else {
        ext->flags |= CBT_BS_ZERO;
    }
    if (st->flags & BLK_STATUS_OFFSET) {
        ext->flags |= CBT_BS_OFFSET_VALID;
        ext->offset = st->host_offset;
        ext->filename = st->host_file ? st->host_file : node->filename;
    }
}

/*
 * Each layer's lock is taken around its own checks and driver call only,
 * never nested: the top's range check, and each lower layer's "is off past
 * my end" (a shorter backing file), are made under the lock of the layer
 * whose size they read.
 */
int cbt_image_block_status_above(struct cbt_image *img,
                                 const struct cbt_image *base, uint64_t off,
                                 uint64_t len, struct cbt_extent *ext)
{
    memset(ext, 0, sizeof(*ext));
    ext->start = off;
    struct blk_node *node = img, *above = NULL;
    struct blk_status above_st = { 0 };
    for (int depth = 0;; depth++) {
        struct blk_status st = { 0 };
        int r = 0;
        bool past_end = false;
        pthread_mutex_lock(&node->lock);
        if (depth == 0) {
            r = check_range(node, off, len);
            if (r == 0 && len == 0)
                r = -EINVAL;
        } else if (off >= node->size) {
            past_end = true;
        } else {
            len = MIN(len, node->size - off);
        }
        if (r == 0 && !past_end)
            r = node->drv->block_status(node, off, len, &st);
        pthread_mutex_unlock(&node->lock);
        if (r < 0)
            return r;
        if (past_end) {
            /* Past the end of a shorter backing file: zeroes, reported at
             * the layer above.  A host offset that layer still reserves
             * (qcow2 subclusters) is reported, as QEMU does. */
            status_to_extent(above, &above_st, true, ext);
            break;
        }
        if (st.length == 0 || st.length > len)
            return -EIO;
        len = st.length;
        ext->depth = depth;
        if (st.flags & BLK_STATUS_ALLOCATED) {
            status_to_extent(node, &st, false, ext);
            break;
        }
        struct blk_node *b = node->backing;
        if (b && b == base) {
            /* Not allocated above base: neither present nor zero here. */
            break;
        }
        if (!b) {
            /* No backing file: zeroes, reported at this layer. */
            status_to_extent(node, &st, true, ext);
            break;
        }
        above = node;
        above_st = st;
        node = b;
    }
    ext->length = len;
    return 0;
}

/* ---- control path ---- */

int blk_reopen_rw(struct blk_node *node, struct cbt_error **errp)
{
    /* Mode, flags and lock role change under node->lock (below): read them
     * there.  filename never changes. */
    pthread_mutex_lock(&node->lock);
    bool ro = node->read_only;
    unsigned oflags = node->flags;
    enum blk_lock_role role = node->lock_role;
    pthread_mutex_unlock(&node->lock);
    if (!ro)
        return 0;
    if (oflags & CBT_OPEN_FORCE_SHARE) {
        cbt_error_set(errp, EINVAL, "%s: opened with force-share (-U), "
                      "which cannot write", node->filename);
        return -1;
    }
    /* Take the write lock first: a conflict is found before anything
     * changes. */
    if (blk_lock_change(node->file_lock, node->filename, role,
                        BLK_LOCK_WRITE, errp) < 0) {
        cbt_error_prefix(errp, "Could not open '%s' read-write",
                         node->filename);
        return -1;
    }
    int fd = open(node->filename, O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        cbt_error_set(errp, errno, "Could not open '%s' read-write: %s",
                      node->filename, strerror(errno));
        (void)blk_lock_change(node->file_lock, node->filename, BLK_LOCK_WRITE,
                              role, NULL);
        return -1;
    }
    pthread_mutex_lock(&node->lock);
    struct stat a, b;
    bool raced = !node->read_only; /* another thread reopened it meanwhile */
    if (raced || fstat(fd, &a) < 0 || fstat(node->fd, &b) < 0 ||
        a.st_dev != b.st_dev || a.st_ino != b.st_ino) {
        pthread_mutex_unlock(&node->lock);
        close(fd);
        (void)blk_lock_change(node->file_lock, node->filename, BLK_LOCK_WRITE,
                              role, NULL);
        if (raced)
            return 0;
        cbt_error_set(errp, ESTALE, "%s: the file changed while it was open",
                      node->filename);
        return -1;
    }
    /* Drop the read-only driver state (nothing to write back), then load
     * it again through the writable descriptor. */
    if (node->drv->close && node->opaque)
        node->drv->close(node, NULL);
    node->opaque = NULL;
    blk_bitmaps_free(node);
    free(node->backing_name);
    free(node->backing_fmt);
    node->backing_name = node->backing_fmt = NULL;
    int oldfd = node->fd;
    unsigned flags = (node->flags & ~(unsigned)CBT_OPEN_CHECK) | CBT_OPEN_RDWR;
    node->fd = fd;
    node->read_only = false;
    node->flags = flags;
    int r = node->drv->open(node, fd, flags, errp);
    if (r == 0 && blk_bitmaps_snapshot(node) < 0) {
        cbt_error_set(errp, ENOMEM, "%s: out of memory", node->filename);
        if (node->drv->close)
            node->drv->close(node, NULL);
        node->opaque = NULL;
        blk_bitmaps_free(node);
        r = -1;
    }
    if (r < 0) {
        /* Back to the read-only descriptor and state. */
        close(fd);
        node->fd = oldfd;
        node->read_only = true;
        node->flags = flags & ~(unsigned)CBT_OPEN_RDWR;
        free(node->backing_name);
        free(node->backing_fmt);
        node->backing_name = node->backing_fmt = NULL;
        if (node->drv->open(node, oldfd, node->flags, NULL) < 0 ||
            blk_bitmaps_snapshot(node) < 0)
            node->opaque = NULL; /* unusable; close copes */
        (void)blk_lock_change(node->file_lock, node->filename, BLK_LOCK_WRITE,
                              role, NULL);
        pthread_mutex_unlock(&node->lock);
        return -1;
    }
    close(oldfd);
    node->lock_role = BLK_LOCK_WRITE;
    pthread_mutex_unlock(&node->lock);
    return 0;
}

int blk_ext_get(struct blk_node *node, uint32_t type, uint8_t **data,
                size_t *len)
{
    if (!node->drv->ext_get)
        return -ENOTSUP;
    pthread_mutex_lock(&node->lock);
    int r = node->drv->ext_get(node, type, data, len);
    pthread_mutex_unlock(&node->lock);
    return r;
}

int blk_ext_set(struct blk_node *node, uint32_t type, const void *data,
                size_t len, struct cbt_error **errp)
{
    if (!node->drv->ext_set) {
        cbt_error_set(errp, ENOTSUP, "%s: format '%s' cannot store cbt "
                      "metadata", node->filename, node->drv->name);
        return -1;
    }
    pthread_mutex_lock(&node->lock);
    int r = -1;
    if (node->read_only)
        cbt_error_set(errp, EPERM, "%s: image is read-only", node->filename);
    else
        r = node->drv->ext_set(node, type, data, len, errp);
    pthread_mutex_unlock(&node->lock);
    return r;
}

int blk_set_backing(struct blk_node *node, const char *name, const char *fmt,
                    struct cbt_error **errp)
{
    if (!node->drv->change_backing) {
        cbt_error_set(errp, ENOTSUP,
                      "%s: format '%s' cannot store a backing file",
                      node->filename, node->drv->name);
        return -1;
    }
    pthread_mutex_lock(&node->lock);
    int r = -1;
    if (node->read_only)
        cbt_error_set(errp, EPERM, "%s: image is read-only", node->filename);
    else
        r = node->drv->change_backing(node, name, fmt, errp);
    pthread_mutex_unlock(&node->lock);
    return r;
}

int cbt_image_create(const char *filename, const struct cbt_create_opts *opts,
                     struct cbt_error **errp)
{
    struct cbt_create_opts o;
    if (OPTS_COPY(&o, opts, cbt_create_opts, errp) < 0)
        return -1;
    WARN_SCOPE(o.warn, o.warn_opaque);
    const char *fmt = o.format ? o.format : "qcow2";
    const struct blk_driver *drv = blk_find_driver(fmt);
    if (!drv || !drv->create) {
        cbt_error_set(errp, EINVAL, "Unknown file format '%s'", fmt);
        return -1;
    }
    return drv->create(filename, &o, errp);
}

int cbt_image_get_info(struct cbt_image *img, struct cbt_image_info *info,
                       struct cbt_error **errp)
{
    memset(info, 0, sizeof(*info));
    info->filename = img->filename;
    info->format = img->drv->name;
    /* Size, descriptor and backing link change under the lock (resize,
     * reopen, a new backing link). */
    pthread_mutex_lock(&img->lock);
    info->virtual_size = img->size;
    if (file_allocated_size(img->fd, &info->actual_size) < 0)
        info->actual_size = 0;
    if (img->backing_name) {
        info->backing_filename = strdup(img->backing_name);
        info->full_backing_filename =
            path_resolve_relative(img->filename, img->backing_name);
        if (img->backing_fmt)
            info->backing_format = strdup(img->backing_fmt);
    }
    int r = img->drv->get_info ? img->drv->get_info(img, info, errp) : 0;
    pthread_mutex_unlock(&img->lock);
    if (r < 0) {
        cbt_image_info_free(info);
        return -1;
    }
    return 0;
}

void cbt_image_info_free(struct cbt_image_info *info)
{
    free(info->backing_filename);
    free(info->full_backing_filename);
    free(info->backing_format);
    free(info->data_file);
    for (size_t i = 0; i < info->nb_snapshots; i++) {
        free(info->snapshots[i].id);
        free(info->snapshots[i].name);
    }
    free(info->snapshots);
    memset(info, 0, sizeof(*info));
}

int cbt_image_check(const char *filename, const char *format, unsigned fix,
                    struct cbt_check_result *res, cbt_report_fn *report,
                    void *opaque, struct cbt_error **errp)
{
    memset(res, 0, sizeof(*res));
    unsigned flags = CBT_OPEN_NO_BACKING | CBT_OPEN_CHECK;
    if (fix & CBT_CHECK_FORCE_SHARE)
        flags |= CBT_OPEN_FORCE_SHARE;
    fix &= ~CBT_CHECK_FORCE_SHARE;
    if (fix)
        flags |= CBT_OPEN_RDWR;
    struct cbt_image *img = cbt_image_open(filename, format, flags, errp);
    if (!img)
        return -1;
    res->format = img->drv->name;
    int r = -1;
    if (img->drv->check) {
        pthread_mutex_lock(&img->lock);
        r = img->drv->check(img, fix, res, report, opaque, errp);
        pthread_mutex_unlock(&img->lock);
        res->format = img->drv->name;
    } else {
        res->unsupported = true;
        cbt_error_set(errp, ENOTSUP, "%s: format '%s' does not support checks",
                      filename, img->drv->name);
    }
    if (cbt_image_close(img, r < 0 ? NULL : errp) < 0)
        r = -1;
    return r;
}

int cbt_image_resize(struct cbt_image *img, uint64_t new_size, bool shrink,
                     struct cbt_error **errp)
{
    if (!img->drv->resize) {
        cbt_error_set(errp, ENOTSUP, "%s: format '%s' cannot be resized",
                      img->filename, img->drv->name);
        return -1;
    }
    pthread_mutex_lock(&img->lock);
    if (img->read_only) {
        pthread_mutex_unlock(&img->lock);
        cbt_error_set(errp, EPERM, "%s: image is read-only", img->filename);
        return -1;
    }
    uint64_t old_size = img->size;
    int r = blk_bitmaps_resize_check(img, errp);
    if (r == 0)
        r = img->drv->resize(img, new_size, shrink, errp);
    /* The bitmaps follow the size the node has now, also after a failure
     * that left the file at the new size (a header written, not synced). */
    if (r == 0 || img->size != old_size) {
        blk_bitmaps_resized(img);
    } else if (new_size < old_size) {
        /* A failed shrink may have dropped data past the new end. */
        (void)blk_mark_dirty(img, new_size, old_size - new_size);
    }
    pthread_mutex_unlock(&img->lock);
    return r;
}
