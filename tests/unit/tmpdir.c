/* The unit tests' scratch folders (tmpdir.h). */
#include "tmpdir.h"

#include <errno.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int tmpdir_make(char *dir, const char *tag)
{
    const char *t = getenv("TMPDIR");
    int n = snprintf(dir, TMPDIR_PATH_MAX, "%s/cbt-%s-XXXXXX",
                     t && *t ? t : "/tmp", tag);
    if (n < 0 || n >= TMPDIR_PATH_MAX) {
        dir[0] = '\0';
        errno = ENAMETOOLONG;
        return -1;
    }
    return mkdtemp(dir) ? 0 : -1;
}

char *tmpdir_path(const char *dir, const char *name)
{
    /* A ring, so that a call can take several paths without freeing any;
     * the index is taken atomically for the tests with threads. */
    static char ring[16][TMPDIR_PATH_MAX];
    static unsigned next;
    char *p = ring[__atomic_fetch_add(&next, 1, __ATOMIC_RELAXED) % 16];
    int n = snprintf(p, TMPDIR_PATH_MAX, "%s/%s", dir, name);
    if (n < 0 || n >= TMPDIR_PATH_MAX) {
        fprintf(stderr, "tmpdir_path: '%s/%s' is too long\n", dir, name);
        abort();
    }
    return p;
}

char *tmpdir_join(const char *dir, const char *name)
{
    size_t a = strlen(dir), b = strlen(name);
    char *p = malloc(a + b + 2);
    if (!p) {
        fprintf(stderr, "tmpdir_join: out of memory\n");
        abort();
    }
    memcpy(p, dir, a);
    p[a] = '/';
    memcpy(p + a + 1, name, b + 1);
    return p;
}

/* nftw passes no context: the first failure of the running removal. */
static __thread int remove_errno;

static int remove_entry(const char *path, const struct stat *sb, int flag,
                        struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    if (remove(path) < 0 && !remove_errno)
        remove_errno = errno;
    return 0;
}

int tmpdir_remove(const char *dir)
{
    remove_errno = 0;
    /* FTW_DEPTH: a folder's entries before the folder; FTW_PHYS: a link is
     * removed, never followed out of the folder. */
    if (nftw(dir, remove_entry, 16, FTW_DEPTH | FTW_PHYS) < 0)
        return -1;
    if (remove_errno) {
        errno = remove_errno;
        return -1;
    }
    return 0;
}
