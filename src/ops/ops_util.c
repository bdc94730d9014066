/* Helpers shared by the chain operations: backing names, finding layers. */
#include <limits.h>
#include <stdio.h>
#include <sys/stat.h>

#include "../block/block.h"
#include "ops_util.h"

/* The directory part of path ("." when it has none), malloc'd. */
static char *dir_of(const char *path)
{
    const char *slash = strrchr(path, '/');
    if (!slash)
        return strdup(".");
    if (slash == path)
        return strdup("/");
    size_t n = (size_t)(slash - path);
    char *d = malloc(n + 1);
    if (d) {
        memcpy(d, path, n);
        d[n] = '\0';
    }
    return d;
}

/* True when the directories holding a and b are the same directory. */
static bool same_dir(const char *a, const char *b)
{
    char *da = dir_of(a), *db = dir_of(b);
    bool same = false;
    if (da && db) {
        struct stat sa, sb;
        same = stat(da, &sa) == 0 && stat(db, &sb) == 0 &&
               sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
    }
    free(da);
    free(db);
    return same;
}

char *ops_backing_name(const char *backing, const char *image)
{
    if (same_dir(backing, image)) {
        const char *slash = strrchr(backing, '/');
        return strdup(slash ? slash + 1 : backing);
    }
    if (backing[0] == '/')
        return strdup(backing);
    char cwd[PATH_MAX];
    if (!getcwd(cwd, sizeof(cwd)))
        return NULL;
    return cbt_strdup_printf("%s/%s", cwd, backing);
}

struct cbt_image *ops_find_layer(struct cbt_image *top, const char *path,
                                 int *depth, struct cbt_error **errp)
{
    struct stat want;
    if (stat(path, &want) < 0) {
        cbt_error_set(errp, errno, "%s: %s", path, strerror(errno));
        return NULL;
    }
    int d = 0;
    for (struct cbt_image *n = top; n; n = n->backing, d++) {
        struct stat st;
        if (fstat(n->fd, &st) == 0 && st.st_dev == want.st_dev &&
            st.st_ino == want.st_ino) {
            if (depth)
                *depth = d;
            return n;
        }
    }
    cbt_error_set(errp, ENOENT, "'%s' is not in the backing chain of '%s'",
                  path, top->filename);
    return NULL;
}


int ops_copy_range(struct cbt_image *from, struct cbt_image *to, uint64_t off,
                   uint64_t len, void *buf, size_t bufsize)
{
    while (len > 0) {
        size_t n = (size_t)MIN(len, (uint64_t)bufsize);
        int r = cbt_image_pread(from, buf, n, off);
        if (r == 0)
            r = blk_pwrite(to, buf, n, off, BLK_WRITE_NO_DIRTY);
        if (r < 0)
            return r;
        off += n;
        len -= n;
    }
    return 0;
}

bool ops_is_zero(const void *buf, size_t len)
{
    const unsigned char *p = buf;
    /* Check the head, then compare the buffer with itself shifted: it is
     * all zero when the first 16 bytes are and every byte equals the one
     * 16 before it. */
    size_t head = MIN(len, (size_t)16);
    for (size_t i = 0; i < head; i++)
        if (p[i])
            return false;
    return len <= 16 || memcmp(p, p + 16, len - 16) == 0;
}
