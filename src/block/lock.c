/*
 * Image locks, the same as QEMU's, so that cbt and QEMU's programs (a VM,
 * qemu-img, qemu-io, qemu-nbd, qemu-storage-daemon) and other cbt processes
 * exclude one another exactly as two QEMU processes do.
 *
 * QEMU (block/file-posix.c) expresses what an open file needs as two sets
 * of permissions: those it uses (perm) and those it lets others have
 * (shared).  The permissions are bits: consistent read (0), write (1),
 * write unchanged (2), resize (3).  On the file it takes shared OFD locks
 * on one byte per bit: byte 100+i while it holds permission i, byte 200+i
 * while it does not share permission i.  Opening then checks, without
 * taking them, whether anybody else holds a lock that excludes it: byte
 * 200+i for each permission it wants (somebody does not share it), byte
 * 100+i for each permission it does not share (somebody holds it).  The
 * locks are taken first and tested second, so of two processes racing for
 * the same file at least one sees the other: never both succeed.
 *
 * Locks are open file description (OFD) locks: they belong to the open
 * file, not the process, are released when its last descriptor closes, and
 * two descriptions of one file in one process conflict like two processes.
 * A cbt job may open one file twice (snapshot: the old top read-write and
 * again as the new overlay's backing file), so the locks of a process live
 * in one table, one entry per file (device and inode): the entry keeps a
 * descriptor of the first open, holds the union of the lock bytes of every
 * open of the file in this process, and is tested against other processes
 * only.  QEMU gets the same from its block graph, where one file is one
 * node.  Nodes may reopen their data descriptor at will (blk_reopen_rw):
 * the lock stays with the entry.
 *
 * The sets cbt uses (docs/architecture.md, "Locks"): a read-only open
 * needs consistent read and shares everything but write and resize (what
 * QEMU takes for a qcow2 image or backing file read-only); a read-write
 * open adds write and resize and still shares neither; -U (force share)
 * needs consistent read and shares everything; creating a file needs write
 * and resize and shares neither before it truncates.
 */
#include <dirent.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <sys/stat.h>
#include <time.h>

#include <pthread.h>

#include "block.h"

#define LOCK_PERM_BASE 100
#define LOCK_SHARED_BASE 200

static const char *const perm_names[BLK_PERM_BITS] = {
    "consistent read",
    "write",
    "write unchanged",
    "resize",
};

static void role_sets(enum blk_lock_role role, unsigned *perm,
                      unsigned *shared)
{
    switch (role) {
    case BLK_LOCK_NONE:
    case BLK_LOCK_ROLES:
        *perm = 0;
        *shared = BLK_PERM_ALL;
        return;
    case BLK_LOCK_READ:
        *perm = BLK_PERM_CONSISTENT_READ;
        *shared = BLK_PERM_ALL & ~(BLK_PERM_WRITE | BLK_PERM_RESIZE);
        return;
    case BLK_LOCK_SHARED_READ:
        *perm = BLK_PERM_CONSISTENT_READ;
        *shared = BLK_PERM_ALL;
        return;
    case BLK_LOCK_WRITE:
        *perm = BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE | BLK_PERM_RESIZE;
        *shared = BLK_PERM_ALL & ~(BLK_PERM_WRITE | BLK_PERM_RESIZE);
        return;
    case BLK_LOCK_CREATE:
        *perm = BLK_PERM_WRITE | BLK_PERM_RESIZE;
        *shared = BLK_PERM_ALL & ~(BLK_PERM_WRITE | BLK_PERM_RESIZE);
        return;
    }
    *perm = 0;
    *shared = BLK_PERM_ALL;
}

/* The lock bytes a role holds: bit i for byte 100+i, bit 8+i for 200+i. */
static unsigned role_bytes(enum blk_lock_role role)
{
    unsigned perm, shared;
    role_sets(role, &perm, &shared);
    return perm | ((~shared & BLK_PERM_ALL) << 8);
}

static off_t byte_offset(unsigned bit)
{
    return bit < 8 ? LOCK_PERM_BASE + (off_t)bit
                   : LOCK_SHARED_BASE + (off_t)(bit - 8);
}

static int ofd_lock(int fd, off_t off, short type)
{
    struct flock fl = {
        .l_whence = SEEK_SET,
        .l_start = off,
        .l_len = 1,
        .l_type = type,
    };
    return fcntl(fd, F_OFD_SETLK, &fl) < 0 ? -errno : 0;
}

/* 0 when nobody else holds a lock on the byte, -EAGAIN when somebody
 * does, another -errno when the test itself failed. */
static int ofd_test(int fd, off_t off)
{
    struct flock fl = {
        .l_whence = SEEK_SET,
        .l_start = off,
        .l_len = 1,
        .l_type = F_WRLCK,
    };
    if (fcntl(fd, F_OFD_GETLK, &fl) < 0)
        return -errno;
    return fl.l_type == F_UNLCK ? 0 : -EAGAIN;
}

/* The lock-byte bits in order: permissions 0..3, then shared 8..11. */
static unsigned nth_bit(unsigned k)
{
    return k < BLK_PERM_BITS ? k : 8 + (k - BLK_PERM_BITS);
}

/* Set the bytes of `want` that are not in `have`, then drop the bytes of
 * `drop` (a subset of have).  Stops at the first failure, undoing what it
 * set. */
static int apply_bytes(int fd, unsigned have, unsigned want, unsigned drop)
{
    unsigned set = 0;
    for (unsigned k = 0; k < 2 * BLK_PERM_BITS; k++) {
        unsigned bit = nth_bit(k), b = 1u << bit;
        if (!(want & b) || (have & b))
            continue;
        int r = ofd_lock(fd, byte_offset(bit), F_RDLCK);
        if (r < 0) {
            for (unsigned j = 0; j < k; j++)
                if (set & (1u << nth_bit(j)))
                    (void)ofd_lock(fd, byte_offset(nth_bit(j)), F_UNLCK);
            return r;
        }
        set |= b;
    }
    for (unsigned k = 0; k < 2 * BLK_PERM_BITS; k++)
        if (drop & (1u << nth_bit(k)))
            (void)ofd_lock(fd, byte_offset(nth_bit(k)), F_UNLCK);
    return 0;
}

/*
 * Who else holds a lock on the file open in fd?  Looks through the open
 * files of every process we may see (/proc/PID/fd) for the same inode and
 * names the first one other than us: "qemu-nbd (pid 1234)".  Best effort,
 * for the error message only; empty when nobody can be named.
 */
static void find_holder(int fd, char *buf, size_t len)
{
    buf[0] = '\0';
    struct stat st;
    if (fstat(fd, &st) < 0)
        return;
    DIR *proc = opendir("/proc");
    if (!proc)
        return;
    pid_t self = getpid();
    struct dirent *de;
    while (!buf[0] && (de = readdir(proc)) != NULL) {
        char *end;
        long pid = strtol(de->d_name, &end, 10);
        if (*end || pid <= 0 || pid == self)
            continue;
        char path[64];
        snprintf(path, sizeof(path), "/proc/%ld/fd", pid);
        DIR *fds = opendir(path);
        if (!fds)
            continue;
        struct dirent *fe;
        while ((fe = readdir(fds)) != NULL) {
            if (fe->d_name[0] == '.')
                continue;
            struct stat fst;
            if (fstatat(dirfd(fds), fe->d_name, &fst, 0) < 0 ||
                fst.st_dev != st.st_dev ||
                fst.st_ino != st.st_ino)
                continue;
            char comm[64] = "";
            snprintf(path, sizeof(path), "/proc/%ld/comm", pid);
            FILE *f = fopen(path, "re");
            if (f) {
                if (!fgets(comm, sizeof(comm), f))
                    comm[0] = '\0';
                fclose(f);
            }
            comm[strcspn(comm, "\n")] = '\0';
            snprintf(buf, len, "%s (pid %ld)", comm[0] ? comm : "a process",
                     pid);
            break;
        }
        closedir(fds);
    }
    closedir(proc);
}

/* Test the bytes that exclude the lock bytes `bytes` as QEMU does
 * (raw_check_lock_bytes): first the permissions held, then those not
 * shared.  `role` only chooses the hint. */
static int check_bytes(int fd, const char *filename, unsigned bytes,
                       enum blk_lock_role role, struct cbt_error **errp)
{
    unsigned perm = bytes & BLK_PERM_ALL;
    unsigned shared = ~(bytes >> 8) & BLK_PERM_ALL;
    for (int pass = 0; pass < 2; pass++) {
        for (unsigned i = 0; i < BLK_PERM_BITS; i++) {
            bool wanted = pass == 0 ? (perm >> i) & 1 : !((shared >> i) & 1);
            if (!wanted)
                continue;
            off_t off = (pass == 0 ? LOCK_SHARED_BASE : LOCK_PERM_BASE) + i;
            int r = ofd_test(fd, off);
            if (r == 0)
                continue;
            if (r != -EAGAIN) {
                cbt_error_set(errp, -r, "%s: cannot test lock byte %lld: %s",
                              filename, (long long)off, strerror(-r));
                return -1;
            }
            char holder[128], who[192];
            find_holder(fd, holder, sizeof(holder));
            if (holder[0])
                snprintf(who, sizeof(who), "%s has it open", holder);
            else
                snprintf(who, sizeof(who), "Another process has it open");
            cbt_error_set(
                errp, EAGAIN,
                "Failed to get %s\"%s\" lock\n"
                "Is another process using the image [%s]?\n"
                "%s: a running VM (QEMU, qemu-storage-daemon, qemu-nbd) or "
                "another cbt is using it.",
                pass == 0 ? "" : "shared ", perm_names[i], filename, who);
            cbt_error_set_kind(errp, CBT_ERR_IN_USE);
            cbt_error_set_remedy(errp, role == BLK_LOCK_READ
                                           ? CBT_REMEDY_WAIT_OR_SHARE
                                           : CBT_REMEDY_WAIT);
            return -1;
        }
    }
    return 0;
}

/* File systems without OFD locks (some network file systems): warn and go
 * on unlocked, as QEMU does with locking=auto. */
static bool locks_unsupported(int r)
{
    return r == -EINVAL || r == -ENOTSUP || r == -ENOLCK || r == -ENOSYS;
}

/* One file this process has open, with the opens that hold its locks. */
struct blk_lock {
    dev_t dev;
    ino_t ino;
    int fd;                        /* a descriptor of the locked description */
    unsigned count[BLK_LOCK_ROLES]; /* opens per role */
    unsigned held;                 /* the lock bytes held (role_bytes) */
    bool unlocked;                 /* the file system has no locks */
    struct blk_lock *next;
};

static pthread_mutex_t table_lock = PTHREAD_MUTEX_INITIALIZER;
static struct blk_lock *table;
/* cbt_set_lock_wait(): seconds, < 0 forever; read under table_lock. */
static int lock_wait;

void cbt_set_lock_wait(int seconds)
{
    pthread_mutex_lock(&table_lock);
    lock_wait = seconds;
    pthread_mutex_unlock(&table_lock);
}

/*
 * After a conflict: wait a little and say to try again (true), or give up
 * (false, the error stays in *errp).  *waited counts the milliseconds
 * spent; the first wait tells the user what it waits for.  Called with
 * table_lock held; drops it while sleeping.
 */
static bool wait_again(const char *filename, unsigned *waited,
                       struct cbt_error **errp)
{
    if (!errp || !*errp || cbt_error_kind(*errp) != CBT_ERR_IN_USE ||
        lock_wait == 0 ||
        (lock_wait > 0 && *waited >= (unsigned)lock_wait * 1000u))
        return false;
    if (*waited == 0 && lock_wait > 0)
        cbt_warn("%s is in use; waiting for it (up to %d s)", filename,
                 lock_wait);
    else if (*waited == 0)
        cbt_warn("%s is in use; waiting for it", filename);
    cbt_error_free(*errp);
    *errp = NULL;
    unsigned step = *waited < 1000 ? 50 : 250;
    pthread_mutex_unlock(&table_lock);
    struct timespec ts = {.tv_sec = 0, .tv_nsec = (long)step * 1000000L};
    nanosleep(&ts, NULL);
    pthread_mutex_lock(&table_lock);
    *waited += step;
    return true;
}

static unsigned wanted_bytes(const struct blk_lock *l)
{
    unsigned b = 0;
    for (int r = 0; r < BLK_LOCK_ROLES; r++)
        if (l->count[r])
            b |= role_bytes((enum blk_lock_role)r);
    return b;
}

/*
 * Move l's bytes to what its opens want with count[role] changed by delta
 * (+1 a new open, -1 a closed one), as QEMU does: take the new bytes, test
 * for conflicts, drop what is no longer needed.  On a conflict nothing
 * changes.  Called with table_lock held.
 */
static int update(struct blk_lock *l, const char *filename,
                  enum blk_lock_role role, int delta, struct cbt_error **errp)
{
    l->count[role] += (unsigned)delta;
    unsigned want = wanted_bytes(l);
    if (l->unlocked || want == l->held)
        return 0;
    int r = apply_bytes(l->fd, l->held, want, 0);
    if (r < 0) {
        l->count[role] -= (unsigned)delta;
        if (locks_unsupported(r)) {
            cbt_warn("%s: the file system does not support file locks (%s): "
                     "cbt cannot tell whether another process uses it",
                     filename, strerror(-r));
            l->count[role] += (unsigned)delta;
            l->unlocked = true;
            return 0;
        }
        if (r == -EAGAIN || r == -EACCES) {
            /* A conflicting exclusive lock: not QEMU's, but still a user. */
            cbt_error_set(errp, EAGAIN, "Failed to lock byte %d\n"
                          "Is another process using the image [%s]?",
                          LOCK_PERM_BASE, filename);
            cbt_error_set_kind(errp, CBT_ERR_IN_USE);
            return -1;
        }
        cbt_error_set(errp, -r, "%s: cannot lock: %s", filename, strerror(-r));
        return -1;
    }
    if ((want & ~l->held) && check_bytes(l->fd, filename, want, role, errp) < 0) {
        /* Back to what was held before. */
        (void)apply_bytes(l->fd, want, l->held, want & ~l->held);
        l->count[role] -= (unsigned)delta;
        return -1;
    }
    (void)apply_bytes(l->fd, want, want, l->held & ~want);
    l->held = want;
    return 0;
}

/* Hand a local error to the caller's errp (or drop it). */
static void pass_error(struct cbt_error **errp, struct cbt_error *err)
{
    if (errp && !*errp)
        *errp = err;
    else
        cbt_error_free(err);
}

/* The entry of fd's file, or a new one (not yet in the table); NULL with
 * *errp.  Called with table_lock held. */
static struct blk_lock *find_entry(int fd, const char *filename,
                                   struct cbt_error **errp)
{
    struct stat st;
    if (fstat(fd, &st) < 0) {
        cbt_error_set(errp, errno, "%s: %s", filename, strerror(errno));
        return NULL;
    }
    for (struct blk_lock *l = table; l; l = l->next)
        if (l->dev == st.st_dev && l->ino == st.st_ino)
            return l;
    struct blk_lock *l = calloc(1, sizeof(*l));
    int dfd = l ? fcntl(fd, F_DUPFD_CLOEXEC, 3) : -1;
    if (dfd < 0) {
        int e = l ? errno : ENOMEM;
        free(l);
        cbt_error_set(errp, e, "%s: %s", filename, strerror(e));
        return NULL;
    }
    l->dev = st.st_dev;
    l->ino = st.st_ino;
    l->fd = dfd;
    return l;
}

static bool in_table(const struct blk_lock *l)
{
    for (const struct blk_lock *t = table; t; t = t->next)
        if (t == l)
            return true;
    return false;
}

struct blk_lock *blk_lock_acquire(int fd, const char *filename,
                                  enum blk_lock_role role,
                                  struct cbt_error **errp)
{
    struct cbt_error *err = NULL;
    unsigned waited = 0;
    struct blk_lock *l;
    pthread_mutex_lock(&table_lock);
    for (;;) {
        l = find_entry(fd, filename, &err);
        if (!l)
            break;
        bool fresh = !in_table(l);
        if (update(l, filename, role, +1, &err) == 0) {
            if (fresh) {
                l->next = table;
                table = l;
            }
            break;
        }
        if (fresh) {
            close(l->fd);
            free(l);
        }
        l = NULL;
        if (!wait_again(filename, &waited, &err))
            break;
    }
    pthread_mutex_unlock(&table_lock);
    if (err)
        pass_error(errp, err);
    return l;
}

int blk_lock_change(struct blk_lock *l, const char *filename,
                    enum blk_lock_role from, enum blk_lock_role to,
                    struct cbt_error **errp)
{
    struct cbt_error *err = NULL;
    unsigned waited = 0;
    int r;
    pthread_mutex_lock(&table_lock);
    do {
        r = update(l, filename, to, +1, &err);
    } while (r < 0 && wait_again(filename, &waited, &err));
    if (r == 0)
        (void)update(l, filename, from, -1, NULL);
    pthread_mutex_unlock(&table_lock);
    if (err)
        pass_error(errp, err);
    return r;
}

void blk_lock_release(struct blk_lock *l, enum blk_lock_role role)
{
    if (!l)
        return;
    pthread_mutex_lock(&table_lock);
    (void)update(l, "", role, -1, NULL);
    unsigned opens = 0;
    for (int r = 0; r < BLK_LOCK_ROLES; r++)
        opens += l->count[r];
    if (opens == 0) {
        struct blk_lock **pp = &table;
        while (*pp != l)
            pp = &(*pp)->next;
        *pp = l->next;
        close(l->fd); /* the last descriptor: the locks go with it */
        free(l);
    }
    pthread_mutex_unlock(&table_lock);
}

bool blk_lock_writer_present(int fd)
{
    return ofd_test(fd, LOCK_PERM_BASE + 1) == -EAGAIN;
}
