/*
 * cbt repo clean: remove the leftovers of interrupted cbt runs (repo.h).
 *
 * What is a leftover is repo.c's business (the rules cbt's writers follow);
 * here each one is removed only when nobody is using it: an image file
 * (a work file NAME.part, a backup image without its manifest) only while
 * no process holds QEMU's locks on it -- a running backup or restore holds
 * its work file open with them -- and its hashes file with it; a live
 * backup's scratch file by the rule the live backup itself sweeps with
 * (bfile_orphan_scratch: nobody holds its owner byte or QEMU's locks); a
 * temporary NAME.tmp-XXXXXX, which its writer does not lock, only when it
 * has not been modified for a minute; a prune's new manifest only under
 * the folder's lock with no journal (then no prune is running).  The file
 * removed is the one checked: its name must still lead to the inode that
 * was opened.
 */
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <sys/stat.h>
#include <time.h>

#include "../ops/foldertx.h"
#include "../util/util.h"
#include "repo.h"

#define TEMP_QUIET_SECONDS 60

void repo_clean_result_free(struct repo_clean_result *res)
{
    if (!res)
        return;
    for (size_t i = 0; i < res->n; i++) {
        free(res->v[i].file);
        free(res->v[i].why);
        free(res->v[i].skipped);
    }
    free(res->v);
    memset(res, 0, sizeof(*res));
}

/* Open name in the folder (not following links, never blocking); -1 when
 * it is gone or not a regular file. */
static int open_leftover(int dfd, const char *name, struct stat *st)
{
    int fd = openat(dfd, name, O_RDWR | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0)
        fd = openat(dfd, name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0)
        return -1;
    if (fstat(fd, st) < 0 || !S_ISREG(st->st_mode)) {
        close(fd);
        return -1;
    }
    return fd;
}

/* Is the image `name` (or nothing of that name) free of other processes? */
static bool image_free(int dfd, const char *name)
{
    struct stat st;
    int fd = open_leftover(dfd, name, &st);
    if (fd < 0)
        return true;
    bool held = bfile_held(fd);
    close(fd);
    return !held;
}

static bool ends_with(const char *s, const char *sfx)
{
    size_t n = strlen(s), k = strlen(sfx);
    return n >= k && strcmp(s + n - k, sfx) == 0;
}

/* Why l must stay now, or NULL (it may go). */
static const char *must_stay(int dfd, const struct repo_leftover *l)
{
    CLEANUP_FREE char *base = NULL;
    struct stat st;
    switch (l->kind) {
    case REPO_LEFT_PART:
        return image_free(dfd, l->file) ? NULL
                                        : "in use: a running cbt backup or "
                                          "restore (or another process) has "
                                          "it open";
    case REPO_LEFT_NO_MANIFEST:
    case REPO_LEFT_ORPHAN_HASHES:
        /* The image it belongs to, or the work file beside it. */
        if (ends_with(l->file, ".hashes"))
            base = strndup(l->file, strlen(l->file) - 7);
        else if (ends_with(l->file, ".tree"))
            base = strndup(l->file, strlen(l->file) - 5);
        else
            base = strdup(l->file);
        if (!base)
            return "out of memory";
        if (!image_free(dfd, base))
            return "in use: its backup is still being written";
        {
            CLEANUP_FREE char *part = cbt_strdup_printf("%s.part", base);
            if (!part || !image_free(dfd, part))
                return "in use: its backup is still being written";
        }
        return NULL;
    case REPO_LEFT_SCRATCH: {
        int fd;
        bool orphan = bfile_orphan_scratch(dfd, l->file, &fd);
        if (fd >= 0)
            close(fd);
        return orphan ? NULL : "in use by a running live backup (or not a "
                               "scratch file of cbt's)";
    }
    case REPO_LEFT_TEMP:
        if (fstatat(dfd, l->file, &st, AT_SYMLINK_NOFOLLOW) < 0)
            return "gone";
        if (time(NULL) - st.st_mtime < TEMP_QUIET_SECONDS)
            return "modified in the last minute: perhaps being written";
        return NULL;
    case REPO_LEFT_PRUNE_NEW:
        return NULL;
    case REPO_LEFT_BAD_MANIFEST:
        return "damage, not a leftover";
    }
    return "unknown";
}

/* Remove name if it is still the file that was checked (same inode). */
static int remove_checked(int dfd, const char *name)
{
    struct stat a, b;
    int fd = open_leftover(dfd, name, &a);
    if (fd < 0)
        return -ENOENT;
    int r = 0;
    if (bfile_held(fd) && !ends_with(name, FOLDERTX_NEW_SUFFIX))
        r = -EBUSY;
    else if (fstatat(dfd, name, &b, AT_SYMLINK_NOFOLLOW) < 0 ||
             a.st_dev != b.st_dev || a.st_ino != b.st_ino)
        r = -ESTALE;
    else if (unlinkat(dfd, name, 0) < 0)
        r = -errno;
    close(fd);
    return r;
}

int repo_clean(const char *dir, bool dry_run, struct repo_clean_result *res,
               struct cbt_error **errp)
{
    memset(res, 0, sizeof(*res));
    int lock;
    struct repo r;
    if (repo_open_to_change(dir, dry_run, &r, &lock, errp) < 0)
        return -1;
    int ret = -1;
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0) {
        cbt_error_set(errp, errno, "%s: %s", dir, strerror(errno));
        goto out;
    }
    res->v = calloc(r.nleft + 1, sizeof(*res->v));
    if (!res->v)
        goto oom;
    bool synced = true;
    for (size_t i = 0; i < r.nleft; i++) {
        const struct repo_leftover *l = &r.left[i];
        if (!l->removable)
            continue;
        struct repo_clean_item *it = &res->v[res->n++];
        it->file = strdup(l->file);
        it->why = strdup(l->why);
        it->file_bytes = l->file_bytes;
        if (!it->file || !it->why)
            goto oom;
        const char *stay = must_stay(dfd, l);
        if (!stay && !dry_run) {
            int rr = remove_checked(dfd, l->file);
            if (rr == -EBUSY)
                stay = "in use by another process";
            else if (rr == -ESTALE)
                stay = "replaced while being checked";
            else if (rr < 0 && rr != -ENOENT)
                stay = strerror(-rr);
            else
                it->removed = true;
            synced = false;
        }
        if (stay && !(it->skipped = strdup(stay)))
            goto oom;
        if (!stay)
            res->bytes += l->file_bytes;
    }
    if (!synced && fsync(dfd) < 0) {
        cbt_error_set(errp, errno, "%s: syncing the folder failed: %s", dir,
                      strerror(errno));
        goto out;
    }
    ret = 0;
    goto out;
oom:
    cbt_error_set(errp, ENOMEM, "%s: out of memory", dir);
out:
    if (dfd >= 0)
        close(dfd);
    repo_close_unlock(&r, lock);
    if (ret < 0)
        repo_clean_result_free(res);
    return ret;
}
