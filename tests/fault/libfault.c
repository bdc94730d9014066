/*
 * libfault: a fault-injecting file layer for tests, loaded with LD_PRELOAD.
 *
 * It follows the file descriptors opened on one file (CBT_FAULT_PATH) and
 * makes the Nth write-like or flush call on them fail with a chosen errno,
 * or only counts those calls.  Test-only: nothing in cbt links it.
 *
 * Environment (read once, at the first intercepted call):
 *   CBT_FAULT_PATH        the file to fault: when it contains a '/', any
 *                         opened path containing it; otherwise an opened
 *                         path whose basename is exactly this.  Unset: the
 *                         shim only passes calls through.
 *   CBT_FAULT_OP          write | flush | any (default any).
 *                         write: write, pwrite(64), writev, pwritev(64/2),
 *                         fallocate(64), posix_fallocate(64),
 *                         copy_file_range into the file, and ftruncate(64)
 *                         when it grows the file.
 *                         flush: fsync, fdatasync, sync_file_range.
 *   CBT_FAULT_NTH         fail the Nth matching call (1-based); 0 or unset:
 *                         fail none (count mode).
 *   CBT_FAULT_STICKY      1: also fail every matching call after the Nth
 *                         (a full disk, a dead device).
 *   CBT_FAULT_ERRNO       ENOSPC | EIO | EDQUOT | EROFS | a number
 *                         (default EIO).
 *   CBT_FAULT_SIGNAL      a signal number: at the Nth matching call, send
 *                         it to the process (kill(getpid(), ...)) and then
 *                         let the call go through, instead of failing it.
 *                         The signal lands exactly there, however fast the
 *                         program runs on (a test that sends it from
 *                         outside can come too late, after the exit).
 *   CBT_FAULT_COUNT_FILE  at exit, write one line
 *                           "matching=M write=W flush=F injected=I"
 *                         (M = calls that matched CBT_FAULT_OP, counted up
 *                         to and including injected ones).
 *   CBT_FAULT_VERBOSE     1: report each injected failure on stderr;
 *                         2: also every matching call (a trace).
 *
 * Descriptors are followed through open, open64, openat, openat64, creat,
 * creat64, dup, dup2, dup3 and close, and through an open of
 * /proc/self/fd/N for a followed N.  Not followed: fcntl(F_DUPFD), stdio
 * streams, descriptors inherited from the parent.
 *
 * Built without sanitizers; with an ASan-built program set
 * ASAN_OPTIONS=verify_asan_link_order=0 (the shim comes before libasan).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#undef _FORTIFY_SOURCE
/* Define both pwrite and pwrite64 (and friends): no 64-bit renaming. */
#undef _FILE_OFFSET_BITS
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#define MAX_FDS 65536

enum fault_op { OP_WRITE = 1, OP_FLUSH = 2, OP_ANY = 3 };

static struct {
    int ready;                  /* 0 no, 1 being set up, 2 done */
    const char *path;
    bool path_is_substring;
    unsigned ops;
    unsigned long nth;
    bool sticky;
    int err;
    int signal;
    int verbose;
    const char *count_file;
} cfg;

static unsigned char tracked[MAX_FDS];
static unsigned long n_matching, n_write, n_flush, n_injected;

/* ---- the next definitions in the lookup order ---- */

#define REAL(name) real_##name
#define DECLARE_REAL(ret, name, ...) \
    static ret (*real_##name)(__VA_ARGS__)

DECLARE_REAL(int, open, const char *, int, ...);
DECLARE_REAL(int, open64, const char *, int, ...);
DECLARE_REAL(int, openat, int, const char *, int, ...);
DECLARE_REAL(int, openat64, int, const char *, int, ...);
DECLARE_REAL(int, creat, const char *, mode_t);
DECLARE_REAL(int, creat64, const char *, mode_t);
DECLARE_REAL(int, close, int);
DECLARE_REAL(int, dup, int);
DECLARE_REAL(int, dup2, int, int);
DECLARE_REAL(int, dup3, int, int, int);
DECLARE_REAL(ssize_t, write, int, const void *, size_t);
DECLARE_REAL(ssize_t, pwrite, int, const void *, size_t, off_t);
DECLARE_REAL(ssize_t, pwrite64, int, const void *, size_t, off64_t);
DECLARE_REAL(ssize_t, writev, int, const struct iovec *, int);
DECLARE_REAL(ssize_t, pwritev, int, const struct iovec *, int, off_t);
DECLARE_REAL(ssize_t, pwritev64, int, const struct iovec *, int, off64_t);
DECLARE_REAL(ssize_t, pwritev2, int, const struct iovec *, int, off_t, int);
DECLARE_REAL(int, fallocate, int, int, off_t, off_t);
DECLARE_REAL(int, fallocate64, int, int, off64_t, off64_t);
DECLARE_REAL(int, posix_fallocate, int, off_t, off_t);
DECLARE_REAL(int, posix_fallocate64, int, off64_t, off64_t);
DECLARE_REAL(int, ftruncate, int, off_t);
DECLARE_REAL(int, ftruncate64, int, off64_t);
DECLARE_REAL(ssize_t, copy_file_range, int, off64_t *, int, off64_t *,
             size_t, unsigned int);
DECLARE_REAL(int, fsync, int);
DECLARE_REAL(int, fdatasync, int);
DECLARE_REAL(int, sync_file_range, int, off64_t, off64_t, unsigned int);

/* Resolve real_NAME once; abort loudly if the symbol is missing. */
#define RESOLVE(name)                                                       \
    do {                                                                    \
        if (!real_##name) {                                                 \
            void *p_ = dlsym(RTLD_NEXT, #name);                             \
            if (!p_) {                                                      \
                static const char m_[] = "libfault: no next " #name "\n";   \
                ssize_t ignored_ = syscall_write(2, m_, sizeof(m_) - 1);    \
                (void)ignored_;                                             \
                abort();                                                    \
            }                                                               \
            memcpy(&real_##name, &p_, sizeof(p_));                          \
        }                                                                   \
    } while (0)

/* Writes to stderr or the count file bypass the interposed write(). */
static ssize_t syscall_write(int fd, const void *buf, size_t len)
{
    static ssize_t (*w)(int, const void *, size_t);
    if (!w) {
        void *p = dlsym(RTLD_NEXT, "write");
        if (!p)
            return -1;
        memcpy(&w, &p, sizeof(p));
    }
    return w(fd, buf, len);
}

static int parse_errno(const char *s)
{
    static const struct { const char *name; int val; } names[] = {
        {"ENOSPC", ENOSPC}, {"EIO", EIO}, {"EDQUOT", EDQUOT},
        {"EROFS", EROFS}, {"EFBIG", EFBIG}, {"EINTR", EINTR},
    };
    if (!s || !*s)
        return EIO;
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        if (strcmp(s, names[i].name) == 0)
            return names[i].val;
    char *end;
    long v = strtol(s, &end, 10);
    if (*end || v <= 0 || v > 4095)
        return EIO;
    return (int)v;
}

static void setup(void)
{
    if (__atomic_load_n(&cfg.ready, __ATOMIC_ACQUIRE) == 2)
        return;
    int expect = 0;
    if (!__atomic_compare_exchange_n(&cfg.ready, &expect, 1, false,
                                     __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
        while (__atomic_load_n(&cfg.ready, __ATOMIC_ACQUIRE) != 2)
            ;
        return;
    }
    const char *p = getenv("CBT_FAULT_PATH");
    cfg.path = p && *p ? p : NULL;
    cfg.path_is_substring = cfg.path && strchr(cfg.path, '/');
    const char *op = getenv("CBT_FAULT_OP");
    if (!op || !*op || strcmp(op, "any") == 0)
        cfg.ops = OP_ANY;
    else if (strcmp(op, "write") == 0)
        cfg.ops = OP_WRITE;
    else if (strcmp(op, "flush") == 0)
        cfg.ops = OP_FLUSH;
    else {
        static const char m[] = "libfault: CBT_FAULT_OP must be write, "
                                "flush or any\n";
        ssize_t ignored = syscall_write(2, m, sizeof(m) - 1);
        (void)ignored;
        abort();
    }
    const char *n = getenv("CBT_FAULT_NTH");
    cfg.nth = n && *n ? strtoul(n, NULL, 10) : 0;
    const char *s = getenv("CBT_FAULT_STICKY");
    cfg.sticky = s && strcmp(s, "1") == 0;
    cfg.err = parse_errno(getenv("CBT_FAULT_ERRNO"));
    const char *sg = getenv("CBT_FAULT_SIGNAL");
    cfg.signal = sg && *sg ? atoi(sg) : 0;
    const char *v = getenv("CBT_FAULT_VERBOSE");
    cfg.verbose = v && *v ? atoi(v) : 0;
    const char *c = getenv("CBT_FAULT_COUNT_FILE");
    cfg.count_file = c && *c ? c : NULL;
    __atomic_store_n(&cfg.ready, 2, __ATOMIC_RELEASE);
}

static bool path_matches(const char *path)
{
    setup();
    if (!cfg.path || !path)
        return false;
    if (cfg.path_is_substring)
        return strstr(path, cfg.path) != NULL;
    const char *slash = strrchr(path, '/');
    return strcmp(slash ? slash + 1 : path, cfg.path) == 0;
}

static void track(int fd, bool on)
{
    if (fd >= 0 && fd < MAX_FDS)
        __atomic_store_n(&tracked[fd], on ? 1 : 0, __ATOMIC_RELAXED);
}

static bool is_tracked(int fd)
{
    return fd >= 0 && fd < MAX_FDS &&
           __atomic_load_n(&tracked[fd], __ATOMIC_RELAXED);
}

/*
 * Called before a write-like or flush call on fd.  Returns true when the
 * call must fail (errno is set).
 */
static bool inject(int fd, unsigned op, const char *what, long long off,
                   long long len)
{
    setup();
    if (!is_tracked(fd))
        return false;
    if (op == OP_WRITE)
        __atomic_add_fetch(&n_write, 1, __ATOMIC_RELAXED);
    else
        __atomic_add_fetch(&n_flush, 1, __ATOMIC_RELAXED);
    if (!(cfg.ops & op))
        return false;
    unsigned long k = __atomic_add_fetch(&n_matching, 1, __ATOMIC_RELAXED);
    bool fail = cfg.nth != 0 && (k == cfg.nth || (k > cfg.nth && cfg.sticky));
    if (fail)
        __atomic_add_fetch(&n_injected, 1, __ATOMIC_RELAXED);
    if (cfg.verbose >= 2 || (fail && cfg.verbose)) {
        char m[256];
        int n = snprintf(m, sizeof(m),
                         "libfault: call %lu: %s(fd %d, offset %lld, length "
                         "%lld)%s%s\n", k, what, fd, off, len,
                         !fail ? "" : cfg.signal ? ": signal " : ": failed with ",
                         !fail ? "" : cfg.signal ? strsignal(cfg.signal)
                                                 : strerror(cfg.err));
        if (n > 0) {
            ssize_t ignored = syscall_write(
                2, m, (size_t)n < sizeof(m) ? (size_t)n : sizeof(m) - 1);
            (void)ignored;
        }
    }
    if (fail && cfg.signal) {
        int e = errno;
        kill(getpid(), cfg.signal);
        errno = e;
        return false;
    }
    if (fail)
        errno = cfg.err;
    return fail;
}

__attribute__((destructor)) static void write_counts(void)
{
    setup();
    if (!cfg.count_file)
        return;
    RESOLVE(open);
    RESOLVE(close);
    int fd = REAL(open)(cfg.count_file, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC,
                        0644);
    if (fd < 0)
        return;
    char m[160];
    int len = snprintf(m, sizeof(m), "matching=%lu write=%lu flush=%lu "
                       "injected=%lu\n",
                       __atomic_load_n(&n_matching, __ATOMIC_RELAXED),
                       __atomic_load_n(&n_write, __ATOMIC_RELAXED),
                       __atomic_load_n(&n_flush, __ATOMIC_RELAXED),
                       __atomic_load_n(&n_injected, __ATOMIC_RELAXED));
    if (len > 0) {
        ssize_t ignored = syscall_write(fd, m, (size_t)len);
        (void)ignored;
    }
    REAL(close)(fd);
}

/* ---- opening and closing ---- */

static bool wants_mode(int flags)
{
#ifdef O_TMPFILE
    if ((flags & O_TMPFILE) == O_TMPFILE)
        return true;
#endif
    return (flags & O_CREAT) != 0;
}

/* A reopen of a followed descriptor through /proc/self/fd/N (how cbt
 * opens the O_DIRECT twin of an image it writes) is followed too. */
static bool reopens_tracked(const char *path)
{
    static const char pre[] = "/proc/self/fd/";
    if (!path || strncmp(path, pre, sizeof(pre) - 1) != 0)
        return false;
    char *end;
    long n = strtol(path + sizeof(pre) - 1, &end, 10);
    return *end == '\0' && n >= 0 && n < MAX_FDS && is_tracked((int)n);
}

static int opened(int fd, const char *path)
{
    if (fd >= 0) {
        int e = errno;
        track(fd, path_matches(path) || reopens_tracked(path));
        errno = e;
    }
    return fd;
}

int open(const char *path, int flags, ...)
{
    mode_t mode = 0;
    if (wants_mode(flags)) {
        va_list ap;
        va_start(ap, flags);
        mode = (mode_t)va_arg(ap, int);
        va_end(ap);
    }
    RESOLVE(open);
    return opened(REAL(open)(path, flags, mode), path);
}

int open64(const char *path, int flags, ...)
{
    mode_t mode = 0;
    if (wants_mode(flags)) {
        va_list ap;
        va_start(ap, flags);
        mode = (mode_t)va_arg(ap, int);
        va_end(ap);
    }
    RESOLVE(open64);
    return opened(REAL(open64)(path, flags, mode), path);
}

int openat(int dirfd, const char *path, int flags, ...)
{
    mode_t mode = 0;
    if (wants_mode(flags)) {
        va_list ap;
        va_start(ap, flags);
        mode = (mode_t)va_arg(ap, int);
        va_end(ap);
    }
    RESOLVE(openat);
    return opened(REAL(openat)(dirfd, path, flags, mode), path);
}

int openat64(int dirfd, const char *path, int flags, ...)
{
    mode_t mode = 0;
    if (wants_mode(flags)) {
        va_list ap;
        va_start(ap, flags);
        mode = (mode_t)va_arg(ap, int);
        va_end(ap);
    }
    RESOLVE(openat64);
    return opened(REAL(openat64)(dirfd, path, flags, mode), path);
}

int creat(const char *path, mode_t mode)
{
    RESOLVE(creat);
    return opened(REAL(creat)(path, mode), path);
}

int creat64(const char *path, mode_t mode)
{
    RESOLVE(creat64);
    return opened(REAL(creat64)(path, mode), path);
}

int close(int fd)
{
    RESOLVE(close);
    track(fd, false);
    return REAL(close)(fd);
}

int dup(int fd)
{
    RESOLVE(dup);
    int r = REAL(dup)(fd);
    if (r >= 0)
        track(r, is_tracked(fd));
    return r;
}

int dup2(int fd, int fd2)
{
    RESOLVE(dup2);
    int r = REAL(dup2)(fd, fd2);
    if (r >= 0)
        track(r, is_tracked(fd));
    return r;
}

int dup3(int fd, int fd2, int flags)
{
    RESOLVE(dup3);
    int r = REAL(dup3)(fd, fd2, flags);
    if (r >= 0)
        track(r, is_tracked(fd));
    return r;
}

/* ---- writes ---- */

static long long iov_len(const struct iovec *iov, int n)
{
    long long t = 0;
    for (int i = 0; i < n; i++)
        t += (long long)iov[i].iov_len;
    return t;
}

ssize_t write(int fd, const void *buf, size_t len)
{
    RESOLVE(write);
    if (inject(fd, OP_WRITE, "write", -1, (long long)len))
        return -1;
    return REAL(write)(fd, buf, len);
}

ssize_t pwrite(int fd, const void *buf, size_t len, off_t off)
{
    RESOLVE(pwrite);
    if (inject(fd, OP_WRITE, "pwrite", off, (long long)len))
        return -1;
    return REAL(pwrite)(fd, buf, len, off);
}

ssize_t pwrite64(int fd, const void *buf, size_t len, off64_t off)
{
    RESOLVE(pwrite64);
    if (inject(fd, OP_WRITE, "pwrite64", off, (long long)len))
        return -1;
    return REAL(pwrite64)(fd, buf, len, off);
}

ssize_t writev(int fd, const struct iovec *iov, int n)
{
    RESOLVE(writev);
    if (inject(fd, OP_WRITE, "writev", -1, iov_len(iov, n)))
        return -1;
    return REAL(writev)(fd, iov, n);
}

ssize_t pwritev(int fd, const struct iovec *iov, int n, off_t off)
{
    RESOLVE(pwritev);
    if (inject(fd, OP_WRITE, "pwritev", off, iov_len(iov, n)))
        return -1;
    return REAL(pwritev)(fd, iov, n, off);
}

ssize_t pwritev64(int fd, const struct iovec *iov, int n, off64_t off)
{
    RESOLVE(pwritev64);
    if (inject(fd, OP_WRITE, "pwritev64", off, iov_len(iov, n)))
        return -1;
    return REAL(pwritev64)(fd, iov, n, off);
}

ssize_t pwritev2(int fd, const struct iovec *iov, int n, off_t off, int flags)
{
    RESOLVE(pwritev2);
    if (inject(fd, OP_WRITE, "pwritev2", off, iov_len(iov, n)))
        return -1;
    return REAL(pwritev2)(fd, iov, n, off, flags);
}

int fallocate(int fd, int mode, off_t off, off_t len)
{
    RESOLVE(fallocate);
    if (inject(fd, OP_WRITE, mode ? "fallocate(mode)" : "fallocate", off, len))
        return -1;
    return REAL(fallocate)(fd, mode, off, len);
}

int fallocate64(int fd, int mode, off64_t off, off64_t len)
{
    RESOLVE(fallocate64);
    if (inject(fd, OP_WRITE, mode ? "fallocate64(mode)" : "fallocate64", off, len))
        return -1;
    return REAL(fallocate64)(fd, mode, off, len);
}

/* posix_fallocate returns the error number instead of setting errno. */
int posix_fallocate(int fd, off_t off, off_t len)
{
    RESOLVE(posix_fallocate);
    int e = errno;
    if (inject(fd, OP_WRITE, "posix_fallocate", off, len)) {
        int r = errno;
        errno = e;
        return r;
    }
    return REAL(posix_fallocate)(fd, off, len);
}

int posix_fallocate64(int fd, off64_t off, off64_t len)
{
    RESOLVE(posix_fallocate64);
    int e = errno;
    if (inject(fd, OP_WRITE, "posix_fallocate64", off, len)) {
        int r = errno;
        errno = e;
        return r;
    }
    return REAL(posix_fallocate64)(fd, off, len);
}

/* ftruncate counts as a write only when it grows the file. */
static bool grows(int fd, off64_t len)
{
    if (!is_tracked(fd))
        return false;
    struct stat st;
    int e = errno;
    bool g = fstat(fd, &st) == 0 && (off64_t)st.st_size < len;
    errno = e;
    return g;
}

int ftruncate(int fd, off_t len)
{
    RESOLVE(ftruncate);
    if (grows(fd, len) && inject(fd, OP_WRITE, "ftruncate", len, 0))
        return -1;
    return REAL(ftruncate)(fd, len);
}

int ftruncate64(int fd, off64_t len)
{
    RESOLVE(ftruncate64);
    if (grows(fd, len) && inject(fd, OP_WRITE, "ftruncate64", len, 0))
        return -1;
    return REAL(ftruncate64)(fd, len);
}

ssize_t copy_file_range(int fd_in, off64_t *off_in, int fd_out,
                        off64_t *off_out, size_t len, unsigned int flags)
{
    RESOLVE(copy_file_range);
    if (inject(fd_out, OP_WRITE, "copy_file_range", off_out ? *off_out : -1, (long long)len))
        return -1;
    return REAL(copy_file_range)(fd_in, off_in, fd_out, off_out, len, flags);
}

/* ---- flushes ---- */

int fsync(int fd)
{
    RESOLVE(fsync);
    if (inject(fd, OP_FLUSH, "fsync", -1, -1))
        return -1;
    return REAL(fsync)(fd);
}

int fdatasync(int fd)
{
    RESOLVE(fdatasync);
    if (inject(fd, OP_FLUSH, "fdatasync", -1, -1))
        return -1;
    return REAL(fdatasync)(fd);
}

int sync_file_range(int fd, off64_t off, off64_t len, unsigned int flags)
{
    RESOLVE(sync_file_range);
    if (inject(fd, OP_FLUSH, "sync_file_range", off, len))
        return -1;
    return REAL(sync_file_range)(fd, off, len, flags);
}
