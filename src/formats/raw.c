/* The raw format driver: guest offset == file offset, holes via SEEK_HOLE. */
#include <fcntl.h>
#include <stdio.h>

#include "../block/block.h"

static int raw_probe(const uint8_t *buf, size_t len)
{
    (void)buf;
    (void)len;
    return 1; /* the fallback: anything is raw */
}

static int raw_open(struct blk_node *node, int fd, unsigned flags,
                    struct cbt_error **errp)
{
    (void)flags;
    int r = file_size(fd, &node->size);
    if (r < 0) {
        cbt_error_set(errp, -r, "%s: cannot get size: %s", node->filename,
                      strerror(-r));
        return -1;
    }
    node->opaque = node; /* no private state */
    return 0;
}

static int raw_close(struct blk_node *node, struct cbt_error **errp)
{
    if (!node->read_only && file_flush(node->fd) < 0) {
        cbt_error_set(errp, errno, "%s: flush failed: %s", node->filename,
                      strerror(errno));
        return -1;
    }
    return 0;
}

static int raw_read(struct blk_node *node, void *buf, uint64_t off, size_t len)
{
    return file_pread_full(node->fd, buf, len, off);
}

static int raw_write(struct blk_node *node, const void *buf, uint64_t off,
                     size_t len)
{
    return blk_data_pwrite(node, node->fd, buf, len, off);
}

static int raw_write_zeroes(struct blk_node *node, uint64_t off, uint64_t len,
                            unsigned flags)
{
    if (flags & CBT_ZERO_MAY_UNMAP)
        return file_punch_hole(node->fd, off, len);
    return file_write_zeroes(node->fd, off, len);
}

static int raw_discard(struct blk_node *node, uint64_t off, uint64_t len)
{
    return file_punch_hole(node->fd, off, len);
}

static int raw_flush(struct blk_node *node)
{
    return file_flush(node->fd);
}

static int raw_block_status(struct blk_node *node, uint64_t off, uint64_t len,
                            struct blk_status *st)
{
    st->flags = BLK_STATUS_ALLOCATED | BLK_STATUS_OFFSET;
    st->host_offset = off;
    off_t data = lseek(node->fd, (off_t)off, SEEK_DATA);
    if (data < 0 && errno == ENXIO) {
        /* Only a hole from here to the end of the file. */
        st->flags |= BLK_STATUS_ZERO;
        st->length = len;
        return 0;
    }
    if (data < 0) {
        st->flags |= BLK_STATUS_DATA;
        st->length = len;
        return 0;
    }
    if ((uint64_t)data > off) {
        st->flags |= BLK_STATUS_ZERO;
        st->length = MIN(len, (uint64_t)data - off);
        return 0;
    }
    off_t hole = lseek(node->fd, (off_t)off, SEEK_HOLE);
    st->flags |= BLK_STATUS_DATA;
    st->length = hole < 0 || (uint64_t)hole <= off ? len
                                                  : MIN(len, (uint64_t)hole - off);
    return 0;
}

static int raw_create(const char *filename, const struct cbt_create_opts *opts,
                      struct cbt_error **errp)
{
    if (opts->backing_file) {
        cbt_error_set(errp, EINVAL, "%s: raw images cannot have a backing file",
                      filename);
        return -1;
    }
    const char *prealloc = opts->preallocation ? opts->preallocation : "off";
    if (strcmp(prealloc, "off") && strcmp(prealloc, "falloc") &&
        strcmp(prealloc, "full")) {
        cbt_error_set(errp, EINVAL,
                      "%s: invalid preallocation mode '%s' for raw (off, falloc, full)",
                      filename, prealloc);
        return -1;
    }
    struct blk_lock *lock = NULL;
    int fd = blk_create_file(filename, false, &lock, errp);
    if (fd < 0)
        return -1;
    int r = file_truncate(fd, opts->size);
    if (r == 0 && strcmp(prealloc, "falloc") == 0 && opts->size)
        r = posix_fallocate(fd, 0, (off_t)opts->size) ? -EIO : 0;
    if (r == 0 && strcmp(prealloc, "full") == 0) {
        static const char zeroes[65536];
        for (uint64_t o = 0; r == 0 && o < opts->size; o += sizeof(zeroes))
            r = file_pwrite_full(fd, zeroes,
                                 (size_t)MIN(sizeof(zeroes), opts->size - o), o);
    }
    if (r == 0)
        r = file_flush(fd);
    close(fd);
    blk_lock_release(lock, BLK_LOCK_CREATE);
    if (r < 0) {
        cbt_error_set(errp, -r, "%s: %s", filename, strerror(-r));
        return -1;
    }
    return 0;
}

static int raw_resize(struct blk_node *node, uint64_t new_size, bool shrink,
                      struct cbt_error **errp)
{
    if (new_size < node->size && !shrink) {
        cbt_error_set(errp, EINVAL,
                      "%s: shrinking an image loses the data past its new "
                      "end and is done only when asked for", node->filename);
        cbt_error_set_remedy(errp, CBT_REMEDY_SHRINK);
        return -1;
    }
    int r = file_truncate(node->fd, new_size);
    if (r < 0) {
        cbt_error_set(errp, -r, "%s: resize failed: %s", node->filename,
                      strerror(-r));
        return -1;
    }
    node->size = new_size;
    return 0;
}

const struct blk_driver blk_raw_driver = {
    .name = "raw",
    .probe = raw_probe,
    .open = raw_open,
    .close = raw_close,
    .create = raw_create,
    .read = raw_read,
    .write = raw_write,
    .write_zeroes = raw_write_zeroes,
    .discard = raw_discard,
    .flush = raw_flush,
    .block_status = raw_block_status,
    .resize = raw_resize,
};
