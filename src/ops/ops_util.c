/* Helpers shared by the chain operations: backing names, finding layers,
 * keeping bitmaps and checkpoints through a relink. */
#include <limits.h>
#include <stdio.h>
#include <sys/stat.h>

#include <cbt/bitmap.h>

#include "../block/block.h"
#include "checkpoint_meta.h"
#include "manifest.h"
#include "ops_util.h"

/* True when the directories holding a and b are the same directory. */
static bool same_dir(const char *a, const char *b)
{
    char *da = bfile_folder_of(a), *db = bfile_folder_of(b);
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

/* What layer n holds of bitmap `name`: 0 none, 1 a consistent copy, 2 an
 * inconsistent one. */
static int copy_state(struct cbt_image *n, const char *name)
{
    pthread_mutex_lock(&n->lock);
    struct blk_bitmap *b = blk_bitmap_find(n, name);
    int st = !b ? 0 : b->inconsistent ? 2 : 1;
    pthread_mutex_unlock(&n->lock);
    return st;
}

int ops_pull_bitmaps(struct cbt_image *file, struct cbt_image *stay,
                     bool apply, struct cbt_error **errp)
{
    struct cbt_bitmap_info *list = NULL;
    size_t count = 0;
    if (cbt_bitmap_list(file, &list, &count, errp) < 0)
        return -1;
    int ret = 0;
    for (size_t i = 0; i < count && ret == 0; i++) {
        const char *name = list[i].name;
        if (list[i].inconsistent)
            continue; /* file's own copy: stays what it is */
        /* Walk X's run below file through the layers that leave. */
        struct cbt_image *n = file->backing;
        for (; n && n != stay; n = n->backing) {
            int st = copy_state(n, name);
            if (st == 0)
                break;
            if (st == 2) {
                cbt_error_set(errp, EINVAL, "%s: bitmap '%s' is inconsistent "
                              "in '%s', which would leave the chain: its "
                              "changes since '%s' would be lost unseen; "
                              "nothing was changed (remove or repair the "
                              "bitmap first)", file->filename, name,
                              n->filename, name);
                ret = -1;
                break;
            }
            if (apply && cbt_bitmap_merge_flags(file, name, n, name,
                                                CBT_MERGE_RESIZE, errp) < 0) {
                cbt_error_prefix(errp, "%s: cannot keep the changes of "
                                 "bitmap '%s' from '%s'", file->filename,
                                 name, n->filename);
                ret = -1;
                break;
            }
        }
        if (ret < 0 || !n || n == stay)
            continue;
        /* The run stops at a leaving layer without X: a gap when X shows up
         * again below; dropping that layer would close the gap unseen. */
        for (struct cbt_image *m = n->backing; m; m = m->backing) {
            if (copy_state(m, name)) {
                cbt_error_set(errp, EINVAL, "%s: bitmap '%s' has a gap: "
                              "'%s' lacks it but '%s' below holds it; "
                              "dropping '%s' from the chain would hide the "
                              "changes it misses, so nothing was changed "
                              "(remove the bitmap first)", file->filename,
                              name, n->filename, m->filename, n->filename);
                ret = -1;
                break;
            }
        }
    }
    cbt_bitmap_info_free_list(list, count);
    return ret;
}

void ops_cancel_error(struct cbt_error **errp, const char *what,
                      const char *left)
{
    cbt_error_set(errp, ECANCELED, "%s: interrupted; %s", what, left);
}

int ops_pull_checkpoints(struct cbt_image *file, struct cbt_image *stay,
                         struct ckpt_carry *c, struct cbt_error **errp)
{
    if (ckpt_carry_prepare(file, CKPT_AT_HOLDER, c, errp) < 0)
        return -1;
    if (!c->present)
        return 0;
    bool leaves = false;
    for (struct cbt_image *n = file->backing; n && n != stay; n = n->backing)
        leaves |= n == c->holder;
    if (c->holder != file && !leaves) {
        /* The holder stays below: its seals count from it, unchanged. */
        ckpt_carry_free(c);
        return 0;
    }
    if (c->holder_sealed)
        warn_to(&file->warner,
                "%s: its checkpoints are history that an overlay made by an "
                "external snapshot continues; the bitmap copies merged into "
                "it change that history, so the overlay's checkpoints may "
                "need a full backup afterwards", file->filename);
    ckpt_carry_warn(c, file->filename);
    return 0;
}

int ops_pull_checkpoints_set(struct cbt_image *file,
                             struct cbt_image *new_backing,
                             const struct ckpt_carry *c,
                             struct cbt_error **errp)
{
    struct ckpt_relink rl = { file, new_backing };
    unsigned how = CKPT_QUIET | (c->holder_sealed ? CKPT_SEALED : 0);
    return ckpt_carry_set(c, file, &rl, how, errp);
}
