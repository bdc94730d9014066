/*
 * Backups of a running VM's disk (livebackup.h): a pull backup as libvirt
 * takes one, on any QEMU with transactions (qemu-system or
 * qemu-storage-daemon).
 *
 * The point in time
 * -----------------
 * cbt creates a scratch qcow2 file beside the target and adds it to QEMU
 * as node cbt-PID-scratch, its backing node the disk.  Then ONE
 * transaction:
 *   - block-dirty-bitmap-add: the new checkpoint, persistent, recording,
 *     on the disk's format node;
 *   - (incremental, differential) block-dirty-bitmap-add cbt-PID-bk on the
 *     scratch node, disabled and transient, and block-dirty-bitmap-merge
 *     into it of the old checkpoint's copies in every layer that holds it
 *     (the old checkpoint itself is never touched: no job clears it);
 *   - blockdev-backup sync=none from the disk into the scratch node: from
 *     now on QEMU copies every cluster the guest overwrites into the
 *     scratch before the write, so the scratch node reads as the disk did
 *     at this instant (clusters never overwritten read through to it).
 * All four happen at the same instant or not at all (LIVE.md: a split
 * loses writes).  cbt exports the scratch node read-only over NBD, with
 * the temporary bitmap, and backup.c reads the changed ranges through
 * src/live/nbd.c, hashing and writing them as offline.
 *
 * The end
 * -------
 * As soon as backup.c has read everything (bk_source.done, before the
 * target's flush), the export goes, the job is cancelled (a sync=none job
 * ends that way), the scratch node is deleted (its temporary bitmap with
 * it) and its file removed.  On success the new checkpoint's record goes to the live
 * journal; on failure the new checkpoint's bitmap is removed again, so
 * the next backup starts from the old one.  Every QEMU object cbt makes is
 * named cbt-PID-...: a later cbt removes those of a PID that is no longer
 * a running cbt (live_cleanup), and their scratch files.
 */
#include <dirent.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>

#include <cbt/image.h>

#include "../ops/backup_live.h"
#include "../ops/manifest.h"
#include "livebackup.h"
#include "livecp.h"
#include "nbd.h"

#define NAME_MAX_QEMU 31 /* node names and job ids */

/* What the disks of one backup share: the QMP connection, the NBD server. */
struct lb_vm {
    struct qmp *q;
    const struct live_backup_opts *lo;
    char *nbd_sock;              /* the server's socket, once known */
    bool server_checked;         /* ensure_server ran */
    bool started_server;         /* ours: stopped at the end */
    bool push;                   /* QEMU writes the data (push mode) */
};

/* One disk of a backup. */
struct lb {
    struct bk_live l;            /* first: the hooks get &lb->l */
    struct lb_vm *vm;
    struct qmp *q;               /* vm->q */
    struct live_cp cp;
    const struct cbt_backup_opts *o;
    char scratch_node[NAME_MAX_QEMU + 1];
    char scratch_file_node[NAME_MAX_QEMU + 1];
    char job[NAME_MAX_QEMU + 1];
    char filter[NAME_MAX_QEMU + 1];
    char export_id[NAME_MAX_QEMU + 1];
    char tmp_bitmap[NAME_MAX_QEMU + 1];
    char *scratch_path;
    int scratch_fd;              /* holds the owner lock (-1: none) */
    bool made_scratch, added_scratch, job_running, exported;
    bool tmp_on_disk;            /* push: the temporary bitmap is on the
                                  * disk's node */
    struct cbt_image *pushed;    /* push: the scratch file, open */
    bool pushed_inc;             /* push: holds the dirty blocks only */
    char *new_ckpt;              /* added by the transaction, not yet kept
                                  * (a copy: the job's name may be gone) */
    struct live_nbd *nbd;
    int64_t sec;                 /* the instant of the freeze */
    uint32_t nsec;
    struct live_nbd_source src; /* the backup's source over nbd */
};

static struct lb *lb_of(struct bk_live *l) { return (struct lb *)l; }

/* ---- checkpoints ---- */

static int lb_checkpoints(struct bk_live *l, struct cbt_checkpoint **v,
                          size_t *n, struct cbt_error **errp)
{
    struct lb *b = lb_of(l);
    *v = calloc(b->cp.n ? b->cp.n : 1, sizeof(**v));
    *n = 0;
    if (!*v) {
        cbt_error_set(errp, ENOMEM, "out of memory");
        return -1;
    }
    for (size_t i = 0; i < b->cp.n; i++) {
        const struct cbt_checkpoint *s = &b->cp.v[i];
        struct cbt_checkpoint *d = &(*v)[i];
        *d = *s;
        d->name = strdup(s->name);
        d->parent = s->parent ? strdup(s->parent) : NULL;
        d->problem = s->problem ? strdup(s->problem) : NULL;
        *n = i + 1;
        if (!d->name || (s->parent && !d->parent) ||
            (s->problem && !d->problem)) {
            cbt_checkpoint_free_list(*v, *n);
            *v = NULL;
            *n = 0;
            cbt_error_set(errp, ENOMEM, "out of memory");
            return -1;
        }
    }
    return 0;
}

static int lb_name_taken(struct bk_live *l, const char *name,
                         struct cbt_error **errp)
{
    (void)errp;
    struct lb *b = lb_of(l);
    if (live_cp_find(&b->cp, name))
        return 1;
    for (size_t i = 0; i < b->cp.disk.nlayers; i++)
        if (live_layer_bitmap(&b->cp.disk.layers[i], name))
            return 1;
    return 0;
}

static bool id_is(json_t *data, void *opaque);

/* ---- the NBD server ---- */

/* Unix sockets QEMU (pid) listens on, other than `except`: from its open
 * files and /proc/net/unix.  A malloc'd array of paths, *n of them. */
static char **listening_sockets(int pid, const char *except, size_t *n)
{
    *n = 0;
    char path[64];
    snprintf(path, sizeof(path), "/proc/%d/fd", pid);
    DIR *d = opendir(path);
    if (!d)
        return NULL;
    unsigned long inodes[512];
    size_t ni = 0;
    struct dirent *de;
    while ((de = readdir(d)) != NULL && ni < ARRAY_SIZE(inodes)) {
        char target[64];
        ssize_t r = readlinkat(dirfd(d), de->d_name, target,
                               sizeof(target) - 1);
        if (r <= 0)
            continue;
        target[r] = '\0';
        unsigned long ino;
        if (sscanf(target, "socket:[%lu]", &ino) == 1)
            inodes[ni++] = ino;
    }
    closedir(d);
    FILE *f = fopen("/proc/net/unix", "re");
    if (!f)
        return NULL;
    char **out = NULL;
    char line[4096 + 128];
    while (fgets(line, sizeof(line), f)) {
        unsigned long flags, ino;
        unsigned type, st;
        char sock[4096 + 1];
        /* Num RefCount Protocol Flags Type St Inode Path */
        if (sscanf(line, "%*s %*s %*s %lx %x %x %lu %4096s", &flags, &type,
                   &st, &ino, sock) != 5)
            continue;
        if (!(flags & 0x10000) || sock[0] != '/' || strcmp(sock, except) == 0)
            continue; /* not listening (__SO_ACCEPTCON), abstract, or QMP */
        bool ours = false;
        for (size_t i = 0; i < ni && !ours; i++)
            ours = inodes[i] == ino;
        if (!ours)
            continue;
        char **nv = realloc(out, (*n + 1) * sizeof(*nv));
        if (!nv)
            break;
        out = nv;
        if ((out[*n] = strdup(sock)))
            (*n)++;
    }
    fclose(f);
    return out;
}

/*
 * Which of QEMU's listening Unix sockets is its NBD server?  An NBD server
 * speaks first ("NBDMAGIC"); so does a free QMP monitor ('{'), while a
 * monitor another client holds stays silent.  Every socket is tried at
 * once, so a silent one costs no time unless no socket is NBD (then at
 * most `ms`).  Reorders socks[0..n) with the NBD greeters first; returns
 * how many greeted so.
 */
static size_t nbd_greeters_first(char **socks, size_t n, int ms)
{
    struct pollfd *p = calloc(n ? n : 1, sizeof(*p));
    bool *nbd = calloc(n ? n : 1, sizeof(*nbd));
    size_t found = 0, open = 0;
    if (!p || !nbd)
        goto out;
    for (size_t i = 0; i < n; i++) {
        p[i].fd = -1;
        struct sockaddr_un sa = {.sun_family = AF_UNIX};
        if (strlen(socks[i]) >= sizeof(sa.sun_path))
            continue;
        strcpy(sa.sun_path, socks[i]);
        int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0)
            continue;
        if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 &&
            errno != EINPROGRESS && errno != EAGAIN) {
            close(fd);
            continue;
        }
        p[i].fd = fd;
        p[i].events = POLLIN;
        open++;
    }
    int64_t t0 = cbt_mono_ns();
    while (open && !found) {
        long left = ms - (long)((cbt_mono_ns() - t0) / 1000000);
        if (left <= 0 || poll(p, n, (int)left) <= 0)
            break;
        for (size_t i = 0; i < n; i++) {
            if (p[i].fd < 0 || !p[i].revents)
                continue;
            char magic[8];
            /* The greeting's first 8 bytes come in one piece. */
            ssize_t r = recv(p[i].fd, magic, sizeof(magic), MSG_DONTWAIT);
            nbd[i] = r == 8 && memcmp(magic, "NBDMAGIC", 8) == 0;
            found += nbd[i];
            close(p[i].fd);
            p[i].fd = -1;
            open--;
        }
    }
    /* Stable: the NBD greeters first, the others after (not ruled out:
     * they may only have been slow). */
    for (size_t i = 0, k = 0; i < n; i++) {
        if (!nbd[i])
            continue;
        char *s = socks[i];
        memmove(&socks[k + 1], &socks[k], (i - k) * sizeof(*socks));
        socks[k++] = s;
    }
out:
    for (size_t i = 0; p && i < n; i++)
        if (p[i].fd >= 0)
            close(p[i].fd);
    free(p);
    free(nbd);
    return found;
}

/* Connect to the export on the server QEMU runs: the socket given, or the
 * one of QEMU's listening sockets that serves it. */
static int open_export(struct lb *b, const char *bitmap,
                       struct cbt_error **errp)
{
    char *uri = NULL;
    if (b->vm->nbd_sock) {
        if (asprintf(&uri, "nbd+unix:///%s?socket=%s", b->export_id,
                     b->vm->nbd_sock) < 0)
            goto oom;
        b->nbd = live_nbd_open(uri, bitmap, errp);
        free(uri);
        return b->nbd ? 0 : -1;
    }
    int pid = qmp_peer_pid(b->q);
    size_t n = 0;
    char **socks = pid > 0 ? listening_sockets(pid, qmp_name(b->q), &n) : NULL;
    nbd_greeters_first(socks, n, 2000);
    for (size_t i = 0; i < n && !b->nbd; i++) {
        if (asprintf(&uri, "nbd+unix:///%s?socket=%s", b->export_id,
                     socks[i]) < 0)
            uri = NULL;
        /* Other sockets (a second QMP monitor) may accept and be silent. */
        if (uri && (b->nbd = live_nbd_open_within(uri, bitmap, 2000, NULL)))
            b->vm->nbd_sock = strdup(socks[i]);
        free(uri);
    }
    for (size_t i = 0; i < n; i++)
        free(socks[i]);
    free(socks);
    if (b->nbd)
        return 0;
    cbt_error_set(errp, ENOENT, "%s: QEMU runs an NBD server cbt cannot "
                  "find (none of QEMU's Unix sockets serves the export: a "
                  "TCP or TLS server?); give its Unix socket with "
                  "--nbd-socket", qmp_name(b->q));
    return -1;
oom:
    cbt_error_set(errp, ENOMEM, "out of memory");
    return -1;
}

/* A server of our own on a private socket, unless QEMU runs one (then
 * open_export finds its socket). */
static int ensure_server(struct lb_vm *vm, struct cbt_error **errp)
{
    if (vm->server_checked)
        return 0;
    if (vm->lo && vm->lo->nbd_socket) {
        vm->nbd_sock = strdup(vm->lo->nbd_socket);
        vm->server_checked = vm->nbd_sock != NULL;
        if (!vm->nbd_sock)
            cbt_error_set(errp, ENOMEM, "out of memory");
        return vm->nbd_sock ? 0 : -1;
    }
    char *sock = NULL;
    const char *tmp = getenv("TMPDIR");
    if (asprintf(&sock, "%s/cbt-%d-nbd.sock", tmp && *tmp ? tmp : "/tmp",
                 (int)getpid()) < 0) {
        cbt_error_set(errp, ENOMEM, "out of memory");
        return -1;
    }
    (void)unlink(sock);
    struct cbt_error *e = NULL;
    json_t *args = json_pack("{s:{s:s, s:{s:s}}}", "addr", "type", "unix",
                             "data", "path", sock);
    if (qmp_run(vm->q, "nbd-server-start", args, &e) == 0) {
        vm->nbd_sock = sock;
        vm->started_server = vm->server_checked = true;
        return 0;
    }
    free(sock);
    /* "NBD server already running": find it when the export exists. */
    if (strstr(cbt_error_message(e), "already running")) {
        cbt_error_free(e);
        vm->server_checked = true;
        return 0;
    }
    if (errp && !*errp)
        *errp = e;
    else
        cbt_error_free(e);
    return -1;
}

/*
 * Pull or push.  Pull (cbt reads over NBD) unless asked to push, or QEMU
 * runs an NBD server cbt cannot find: a read-only probe export of the
 * disk's node is tried on each of QEMU's listening Unix sockets first.
 */
static int choose_mode(struct lb_vm *vm, const char *node,
                       struct cbt_error **errp)
{
    vm->push = vm->lo && vm->lo->push;
    if (vm->push)
        return 0;
    if (ensure_server(vm, errp) < 0)
        return -1;
    if (vm->nbd_sock)
        return 0;
    char probe[NAME_MAX_QEMU + 1];
    snprintf(probe, sizeof(probe), "cbt-%d-probe", (int)getpid());
    json_t *exp = json_pack("{s:s, s:s, s:s, s:s, s:b}", "type", "nbd", "id",
                            probe, "node-name", node, "name", probe,
                            "writable", 0);
    if (qmp_run(vm->q, "block-export-add", exp, errp) < 0)
        return -1;
    int pid = qmp_peer_pid(vm->q);
    size_t n = 0;
    char **socks =
        pid > 0 ? listening_sockets(pid, qmp_name(vm->q), &n) : NULL;
    nbd_greeters_first(socks, n, 2000);
    for (size_t i = 0; i < n && !vm->nbd_sock; i++) {
        char *uri = NULL;
        if (asprintf(&uri, "nbd+unix:///%s?socket=%s", probe, socks[i]) < 0)
            uri = NULL;
        struct live_nbd *t = uri ? live_nbd_open_within(uri, NULL, 2000, NULL)
                                 : NULL;
        if (t) {
            vm->nbd_sock = strdup(socks[i]);
            live_nbd_close(t);
        }
        free(uri);
    }
    for (size_t i = 0; i < n; i++)
        free(socks[i]);
    free(socks);
    if (qmp_run(vm->q, "block-export-del",
                json_pack("{s:s, s:s}", "id", probe, "mode", "hard"),
                NULL) == 0)
        json_decref(qmp_wait_event(vm->q, "BLOCK_EXPORT_DELETED", id_is,
                                   probe, 0, NULL));
    if (!vm->nbd_sock) {
        cbt_warn("%s: QEMU runs an NBD server cbt cannot reach (none of its "
                 "Unix sockets: a TCP or TLS server?): QEMU writes the "
                 "backup's data itself (--push); --nbd-socket names the "
                 "server to read it over NBD instead", qmp_name(vm->q));
        vm->push = true;
    }
    return 0;
}

static void vm_end(struct lb_vm *vm)
{
    if (vm->started_server) {
        (void)qmp_run(vm->q, "nbd-server-stop", NULL, NULL);
        (void)unlink(vm->nbd_sock);
    }
    free(vm->nbd_sock);
    memset(vm, 0, sizeof(*vm));
}

/* ---- freeze, commit, abort, release ---- */

/*
 * A scratch file is cbt's while the cbt that made it runs: it holds an
 * OFD write lock on one byte far from QEMU's lock bytes (100 + n and
 * 200 + n, file-posix.c) from the moment the file exists, so QEMU's own
 * locking is not disturbed, and the lock dies with the process.  A
 * scratch file nobody locks (neither a cbt nor a QEMU) is what a killed
 * cbt left after taking its node out of QEMU or before adding it.
 */
static int own_scratch(int fd)
{
    struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET,
                       .l_start = BFILE_SCRATCH_OWNER_BYTE, .l_len = 1};
    return fcntl(fd, F_OFD_SETLK, &fl);
}

/*
 * Remove the scratch files (NAME.scratch, a qcow2 file) in folder `d` that
 * no running cbt owns and no process has open with QEMU's locks: a killed
 * cbt's (the rule is bfile_orphan_scratch's, shared with cbt repo clean).
 * Says what it removed.
 */
static void sweep_scratch(const char *d)
{
    DIR *dh = opendir(d);
    struct dirent *de;
    while (dh && (de = readdir(dh))) {
        int fd;
        if (bfile_orphan_scratch(dirfd(dh), de->d_name, &fd) &&
            unlinkat(dirfd(dh), de->d_name, 0) == 0)
            cbt_warn("%s/%s: removed the scratch file of an interrupted cbt "
                     "backup", d, de->d_name);
        if (fd >= 0)
            close(fd);
    }
    if (dh)
        closedir(dh);
}

/* The same in the folder of file `target`. */
static void sweep_scratch_beside(const char *target)
{
    const char *slash = strrchr(target, '/');
    if (!slash) {
        sweep_scratch(".");
        return;
    }
    char *dir = strndup(target, slash == target ? 1 : (size_t)(slash - target));
    if (dir)
        sweep_scratch(dir);
    free(dir);
}

static int make_scratch(struct lb *b, struct cbt_error **errp)
{
    if (asprintf(&b->scratch_path, "%s.scratch", b->o->target) < 0) {
        b->scratch_path = NULL;
        cbt_error_set(errp, ENOMEM, "out of memory");
        return -1;
    }
    /* The file appears already locked (an unnamed file, locked, then
     * linked in), so no sweep of another cbt takes it for a killed cbt's;
     * without O_TMPFILE (some file systems) it is created and locked. */
    int fd = -1, err = 0;
    const char *slash = strrchr(b->scratch_path, '/');
    char *dir = slash ? strndup(b->scratch_path, slash == b->scratch_path
                                                    ? 1
                                                    : (size_t)(slash -
                                                               b->scratch_path))
                      : strdup(".");
    if (dir)
        fd = open(dir, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
    free(dir);
    if (fd >= 0) {
        char proc[64];
        snprintf(proc, sizeof(proc), "/proc/self/fd/%d", fd);
        if (own_scratch(fd) < 0 ||
            linkat(AT_FDCWD, proc, AT_FDCWD, b->scratch_path,
                   AT_SYMLINK_FOLLOW) < 0) {
            err = errno;
            close(fd);
            fd = -1;
        }
    } else if (errno == EOPNOTSUPP || errno == EISDIR || errno == EINVAL ||
               errno == ENOENT) {
        fd = open(b->scratch_path,
                  O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
        if (fd < 0 || own_scratch(fd) < 0) {
            err = errno;
            if (fd >= 0) {
                (void)unlink(b->scratch_path);
                close(fd);
            }
            fd = -1;
        }
    } else {
        err = errno;
    }
    if (fd < 0) {
        cbt_error_set(errp, err, "%s: cannot create the scratch file of "
                      "the backup: %s%s", b->scratch_path, strerror(err),
                      err == EEXIST ? " (left by an interrupted cbt "
                                      "backup? cbt removes its own "
                                      "leftovers when it starts)"
                                    : "");
        return -1;
    }
    b->made_scratch = true;
    b->scratch_fd = fd;
    struct cbt_create_opts co = {
        .struct_size = sizeof(struct cbt_create_opts),
        .format = "qcow2",
        .size = b->l.size,
        .size_given = true,
        .cluster_size = 65536,
    };
    return cbt_image_create(b->scratch_path, &co, errp);
}

/* Before the transaction: the scratch file and its node. */
static int lb_prepare(struct lb *b, struct cbt_error **errp)
{
    const struct live_layer *top = &b->cp.disk.layers[0];
    if (make_scratch(b, errp) < 0)
        return -1;
    /* The file node is named too: a later cbt finds the scratch file of
     * a cbt that died by it (live_cleanup).  cache.no-flush (its file
     * node inherits it): what QEMU writes here lives only as long as the
     * backup, so no flush goes to the disk, neither during the job nor
     * when the node is deleted (a push's whole dirty set, fdatasync'd
     * only to be unlinked).  QEMU still writes the qcow2 metadata out to
     * the file at every flush and at the node's close, which is all that
     * cbt's reading of a push's file needs. */
    json_t *add = json_pack("{s:s, s:s, s:{s:b}, s:{s:s, s:s, s:s}}",
                            "driver", "qcow2", "node-name", b->scratch_node,
                            "cache", "no-flush", 1, "file", "driver", "file",
                            "node-name", b->scratch_file_node, "filename",
                            b->scratch_path);
    /* Pull: the view falls through to the disk where QEMU copied nothing.
     * Push: a plain target QEMU writes the data into. */
    json_object_set_new(add, "backing",
                        b->vm->push ? json_null() : json_string(top->node));
    if (qmp_run(b->q, "blockdev-add", add, errp) < 0)
        return -1;
    b->added_scratch = true;
    return 0;
}

/* This disk's actions of the transaction. */
static void lb_actions(struct lb *b, json_t *acts, const char *since,
                       const char *name, uint64_t gran)
{
    const struct live_layer *top = &b->cp.disk.layers[0];
    json_array_append_new(acts, live_cp_bitmap_add_action(&b->cp, name, gran));
    if (since) {
        const struct live_bitmap *old = live_layer_bitmap(top, since);
        json_t *srcs = json_array();
        for (size_t i = 0; i < b->cp.disk.nlayers; i++) {
            const struct live_layer *layer = &b->cp.disk.layers[i];
            if (!live_layer_bitmap(layer, since))
                break;
            json_array_append_new(srcs, json_pack("{s:s, s:s}", "node",
                                                  layer->node, "name", since));
        }
        /* Pull exports it with the view; push's job reads it on the
         * disk's node (and clears that copy, never the checkpoint). */
        const char *tmp_node = b->vm->push ? top->node : b->scratch_node;
        b->tmp_on_disk = b->vm->push;
        json_array_append_new(
            acts, json_pack("{s:s, s:{s:s, s:s, s:b, s:b, s:I}}", "type",
                            "block-dirty-bitmap-add", "data", "node",
                            tmp_node, "name", b->tmp_bitmap,
                            "persistent", 0, "disabled", 1, "granularity",
                            (json_int_t)(old ? old->granularity : 65536)));
        json_array_append_new(
            acts, json_pack("{s:s, s:{s:s, s:s, s:o}}", "type",
                            "block-dirty-bitmap-merge", "data", "node",
                            tmp_node, "target", b->tmp_bitmap,
                            "bitmaps", srcs));
    }
    json_t *job = json_pack("{s:s, s:s, s:s, s:s, s:s}", "device", top->node,
                            "target", b->scratch_node, "job-id", b->job,
                            "filter-node-name", b->filter, "sync",
                            !b->vm->push ? "none"
                            : since      ? "incremental"
                                         : "full");
    if (b->vm->push) {
        json_object_set_new(job, "auto-dismiss", json_false());
        if (since)
            json_object_set_new(job, "bitmap", json_string(b->tmp_bitmap));
    }
    json_array_append_new(acts, json_pack("{s:s, s:o}", "type",
                                          "blockdev-backup", "data", job));
}

static void lb_release(struct bk_live *l);

/* The copy has read everything (bk_source.done): the view goes now, not
 * after the target's flush, the hashes and the records; the guest's
 * writes stop paying for copy-before-write that much sooner. */
static void lb_done(void *opaque)
{
    struct lb *b = opaque;
    lb_release(&b->l);
}

/* ---- push: QEMU wrote the data, cbt reads the file ---- */

static int push_status(void *opaque, uint64_t off, uint64_t len,
                       uint64_t *run, bool *zero)
{
    struct lb *b = opaque;
    struct cbt_extent e;
    int r = cbt_image_block_status(b->pushed, off, len, &e);
    if (r < 0)
        return r;
    *run = e.length;
    /* Unallocated: zeroes in a full backup (QEMU left them out); in an
     * incremental a block QEMU did not copy, whose content the file does
     * not know (never "zero", or the backup would take every clean block
     * of data for one cut off by a shrink). */
    if (!(e.flags & CBT_BS_PRESENT))
        *zero = !b->pushed_inc;
    else
        *zero = (e.flags & CBT_BS_ZERO) != 0;
    return 0;
}

static int push_read(void *opaque, void *buf, size_t len, uint64_t off)
{
    struct lb *b = opaque;
    return cbt_image_pread(b->pushed, buf, len, off);
}

/* The dirty set of a pushed incremental: what QEMU wrote into the file. */
static int push_dirty(void *opaque,
                      int (*cb)(void *cbop, uint64_t start, uint64_t len,
                                bool dirty),
                      void *cbop, struct cbt_error **errp)
{
    struct lb *b = opaque;
    uint64_t size = cbt_image_size(b->pushed);
    for (uint64_t pos = 0; pos < size;) {
        struct cbt_extent e;
        int r = cbt_image_block_status(b->pushed, pos, size - pos, &e);
        /* Allocated in the file (data or a zero cluster): QEMU wrote it.
         * Unallocated reads as zeroes here (no backing file) but is not
         * dirty. */
        if (r == 0)
            r = cb(cbop, pos, e.length, (e.flags & CBT_BS_PRESENT) != 0);
        if (r < 0) {
            cbt_error_set(errp, -r, "%s: %s", b->scratch_path, strerror(-r));
            return -1;
        }
        pos += e.length;
    }
    return 0;
}

static bool job_is(json_t *data, void *opaque)
{
    const char *dev = qmp_str(data, "device");
    return dev && strcmp(dev, opaque) == 0;
}

/* Push: wait for QEMU's job, take its target node away, open its file. */
static int push_finish(struct lb *b, const char *since,
                       struct bk_source *src, struct cbt_error **errp)
{
    b->pushed_inc = since != NULL;
    json_t *done = NULL;
    while (!done) {
        struct cbt_error *e = NULL;
        done = qmp_wait_event(b->q, "BLOCK_JOB_COMPLETED", job_is, b->job,
                              1000, &e);
        if (!done && cbt_error_errno(e) != ETIMEDOUT) {
            if (errp && !*errp)
                *errp = e;
            else
                cbt_error_free(e);
            return -1;
        }
        cbt_error_free(e);
    }
    const char *jerr = qmp_str(done, "error");
    if (jerr) {
        cbt_error_set(errp, EIO, "%s: QEMU's backup job failed: %s",
                      qmp_name(b->q), jerr);
        json_decref(done);
        return -1;
    }
    json_decref(done);
    (void)qmp_run(b->q, "job-dismiss", json_pack("{s:s}", "id", b->job), NULL);
    b->job_running = false;
    if (qmp_run(b->q, "blockdev-del",
                json_pack("{s:s}", "node-name", b->scratch_node), errp) < 0)
        return -1;
    b->added_scratch = false;
    b->pushed = cbt_image_open(b->scratch_path, "qcow2", CBT_OPEN_NO_BACKING,
                               errp);
    if (!b->pushed)
        return -1;
    *src = (struct bk_source){
        .opaque = b,
        .status = push_status,
        .read = push_read,
        .done = lb_done,
        .dirty = push_dirty,
    };
    return 0;
}

/* After the transaction: the view exported and opened (pull), or QEMU's
 * copy done and opened (push). */
static int lb_expose(struct lb *b, const char *since, struct bk_source *src,
                     struct cbt_error **errp)
{
    if (b->vm->push)
        return push_finish(b, since, src, errp);
    if (ensure_server(b->vm, errp) < 0)
        return -1;
    json_t *exp = json_pack("{s:s, s:s, s:s, s:s, s:b}", "type", "nbd", "id",
                            b->export_id, "node-name", b->scratch_node, "name",
                            b->export_id, "writable", 0);
    if (since)
        json_object_set_new(exp, "bitmaps", json_pack("[s]", b->tmp_bitmap));
    if (qmp_run(b->q, "block-export-add", exp, errp) < 0)
        return -1;
    b->exported = true;
    if (open_export(b, since ? b->tmp_bitmap : NULL, errp) < 0)
        return -1;
    cbt_debug("live: export %s open", b->export_id);
    if (live_nbd_size(b->nbd) < b->l.size) {
        cbt_error_set(errp, EPROTO, "%s: the export is smaller than the disk",
                      qmp_name(b->q));
        return -1;
    }
    b->src.done = lb_done;
    b->src.done_opaque = b;
    live_nbd_source_init(&b->src, b->nbd, src);
    return 0;
}

/* The point in time of the disks [0, n) with their plans: one transaction
 * (the caller prepared each disk). */
/* Quiesce the guest through its agent: frozen, or -1 with *errp (after a
 * failed freeze the guest is thawed again). */
static struct qmp *guest_freeze(const char *path, struct cbt_error **errp)
{
    struct qmp *g = qmp_connect_agent(path, errp);
    if (!g)
        return NULL;
    if (qmp_run(g, "guest-fsfreeze-freeze", NULL, errp) < 0) {
        cbt_error_prefix(errp, "quiescing the guest (--qga)");
        (void)qmp_run(g, "guest-fsfreeze-thaw", NULL, NULL);
        qmp_close(g);
        return NULL;
    }
    return g;
}

static void guest_thaw(struct qmp *g)
{
    struct cbt_error *e = NULL;
    if (g && qmp_run(g, "guest-fsfreeze-thaw", NULL, &e) < 0)
        cbt_warn("the guest's file systems may still be frozen: %s; thaw "
                 "them (guest-fsfreeze-thaw)", cbt_error_message(e));
    cbt_error_free(e);
    qmp_close(g);
}

static int freeze_all(struct lb *const *v, const char *const *since,
                      const char *const *names, uint64_t gran, size_t n,
                      struct cbt_error **errp)
{
    /* First the intent: a cbt killed from here on leaves a pending record
     * a later cbt finds the new checkpoint by (live_cp_resolve_stale). */
    for (size_t i = 0; i < n; i++)
        if (live_cp_note_pending(&v[i]->cp, names[i], errp) < 0)
            return -1;
    json_t *acts = json_array();
    for (size_t i = 0; i < n; i++)
        lb_actions(v[i], acts, since[i], names[i], gran);
    struct qmp *agent = NULL;
    const struct live_backup_opts *lo = v[0]->vm->lo;
    if (lo && lo->qga && !(agent = guest_freeze(lo->qga, errp))) {
        json_decref(acts);
        for (size_t i = 0; i < n; i++)
            (void)live_cp_resolve(&v[i]->cp, names[i], NULL);
        return -1;
    }
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    int r = qmp_run(v[0]->q, "transaction", json_pack("{s:o}", "actions", acts),
                    errp);
    guest_thaw(agent); /* the instant is taken: the guest goes on */
    if (r < 0) {
        cbt_error_prefix(errp, "the backup's point in time");
        for (size_t i = 0; i < n; i++)
            (void)live_cp_resolve(&v[i]->cp, names[i], NULL);
        return -1;
    }
    for (size_t i = 0; i < n; i++) {
        v[i]->sec = ts.tv_sec;
        v[i]->nsec = (uint32_t)ts.tv_nsec;
        v[i]->job_running = true;
        free(v[i]->new_ckpt);
        v[i]->new_ckpt = strdup(names[i]);
    }
    return 0;
}

static int lb_freeze(struct bk_live *l, const char *since, const char *name,
                     uint64_t gran, struct bk_source *src,
                     struct cbt_error **errp)
{
    struct lb *b = lb_of(l);
    struct lb *v[1] = {b};
    if (choose_mode(b->vm, b->cp.disk.layers[0].node, errp) < 0 ||
        lb_prepare(b, errp) < 0 ||
        freeze_all(v, &since, &name, gran, 1, errp) < 0)
        return -1;
    return lb_expose(b, since, src, errp);
}

static int lb_describe(struct bk_live *l, const char *name, uint64_t *order,
                       int64_t *sec, uint32_t *nsec, struct cbt_error **errp)
{
    (void)name;
    struct lb *b = lb_of(l);
    if (live_cp_ensure_disk_id(&b->cp, errp) < 0)
        return -1;
    *order = b->cp.next_order;
    *sec = b->sec;
    *nsec = b->nsec;
    memcpy(l->disk_id, b->cp.disk_id, sizeof(l->disk_id));
    return 0;
}

static int lb_commit(struct bk_live *l, const char *name,
                     struct cbt_error **errp)
{
    struct lb *b = lb_of(l);
    if (live_cp_note_created(&b->cp, name, b->sec, b->nsec, errp) < 0)
        return -1;
    free(b->new_ckpt);
    b->new_ckpt = NULL;
    return 0;
}

static void lb_abort(struct bk_live *l, const char *name_in)
{
    struct lb *b = lb_of(l);
    struct cbt_error *e = NULL;
    /* name_in may be b->new_ckpt, freed below. */
    char *name = strdup(name_in);
    if (!name)
        return;
    if (qmp_run(b->q, "block-dirty-bitmap-remove",
                json_pack("{s:s, s:s}", "node", b->cp.disk.layers[0].node,
                          "name", name),
                &e) < 0)
        cbt_warn("the new checkpoint '%s' could not be removed: %s; a "
                 "checkpoint delete through QEMU (the live mode) removes it",
                 name, cbt_error_message(e));
    cbt_error_free(e);
    e = NULL;
    bool existed;
    /* Its journal record when it was kept already, else its pending
     * record is resolved. */
    if (live_cp_find(&b->cp, name)
            ? live_cp_delete(&b->cp, name, &existed, &e) < 0
            : live_cp_resolve(&b->cp, name, &e) < 0)
        cbt_warn("%s", cbt_error_message(e));
    cbt_error_free(e);
    free(b->new_ckpt);
    b->new_ckpt = NULL;
    free(name);
}

static bool id_is(json_t *data, void *opaque)
{
    const char *id = qmp_str(data, "id");
    const char *dev = qmp_str(data, "device");
    return (id && strcmp(id, opaque) == 0) || (dev && strcmp(dev, opaque) == 0);
}

static void lb_release(struct bk_live *l)
{
    struct lb *b = lb_of(l);
    struct cbt_error *e = NULL;
    /* Called again at the end (lb_end): the second time finds nothing. */
    bool held = b->nbd || b->pushed || b->tmp_on_disk || b->exported ||
                b->job_running || b->added_scratch || b->made_scratch ||
                b->scratch_fd >= 0;
    live_nbd_close(b->nbd);
    b->nbd = NULL;
    live_nbd_source_fini(&b->src);
    if (b->pushed)
        cbt_image_close(b->pushed, NULL);
    b->pushed = NULL;
    if (b->tmp_on_disk)
        (void)qmp_run(b->q, "block-dirty-bitmap-remove",
                      json_pack("{s:s, s:s}", "node",
                                b->cp.disk.layers[0].node, "name",
                                b->tmp_bitmap),
                      NULL);
    b->tmp_on_disk = false;
    if (b->exported &&
        qmp_run(b->q, "block-export-del",
                json_pack("{s:s}", "id", b->export_id), &e) == 0)
        json_decref(qmp_wait_event(b->q, "BLOCK_EXPORT_DELETED", id_is,
                                   b->export_id, 0, &e));
    cbt_error_free(e);
    e = NULL;
    if (b->job_running &&
        qmp_run(b->q, "block-job-cancel",
                json_pack("{s:s, s:b}", "device", b->job, "force", 1),
                &e) == 0)
        json_decref(qmp_wait_event(b->q, "BLOCK_JOB_CANCELLED", id_is,
                                   b->job, 0, &e));
    cbt_error_free(e);
    e = NULL;
    if (b->job_running && b->vm->push) /* auto-dismiss off: dismiss it */
        (void)qmp_run(b->q, "job-dismiss", json_pack("{s:s}", "id", b->job),
                      NULL);
    if (b->added_scratch)
        (void)qmp_run(b->q, "blockdev-del",
                      json_pack("{s:s}", "node-name", b->scratch_node), NULL);
    if (b->made_scratch)
        (void)unlink(b->scratch_path);
    if (b->scratch_fd >= 0)
        close(b->scratch_fd);
    b->scratch_fd = -1;
    b->exported = b->job_running = b->added_scratch = b->made_scratch = false;
    if (held)
        cbt_debug("live: view released");
}

/* ---- the whole operation ---- */

/* Set up disk `disk` (a name live_find_disk takes) as backup number idx
 * of this process.  0, or -1 with *errp. */
static int lb_init(struct lb *b, struct lb_vm *vm, const char *disk,
                   const struct cbt_backup_opts *o, int idx,
                   struct cbt_error **errp)
{
    memset(b, 0, sizeof(*b));
    b->scratch_fd = -1;
    b->vm = vm;
    b->q = vm->q;
    b->o = o;
    int pid = (int)getpid();
    snprintf(b->scratch_node, sizeof(b->scratch_node), "cbt-%d-%d-scratch",
             pid, idx);
    snprintf(b->scratch_file_node, sizeof(b->scratch_file_node),
             "cbt-%d-%d-scratch-file", pid, idx);
    snprintf(b->job, sizeof(b->job), "cbt-%d-%d-fleece", pid, idx);
    snprintf(b->filter, sizeof(b->filter), "cbt-%d-%d-cbw", pid, idx);
    snprintf(b->export_id, sizeof(b->export_id), "cbt-%d-%d-export", pid,
             idx);
    snprintf(b->tmp_bitmap, sizeof(b->tmp_bitmap), "cbt-%d-%d-bk", pid, idx);
    if (live_cp_open(vm->q, disk, &b->cp, errp) < 0 ||
        live_cp_resolve_stale(&b->cp, errp) < 0)
        return -1;
    b->l = (struct bk_live){
        .label = o->disk,
        .size = b->cp.disk.layers[0].size,
        .checkpoints = lb_checkpoints,
        .name_taken = lb_name_taken,
        .freeze = lb_freeze,
        .describe = lb_describe,
        .commit = lb_commit,
        .abort = lb_abort,
        .release = lb_release,
    };
    memcpy(b->l.disk_id, b->cp.disk_id, sizeof(b->l.disk_id));
    return 0;
}

/* Whatever a disk still has in QEMU, then its memory. */
static void lb_end(struct lb *b)
{
    /* A freeze that failed half way: the new checkpoint goes again. */
    if (b->new_ckpt)
        lb_abort(&b->l, b->new_ckpt);
    lb_release(&b->l);
    live_cp_close(&b->cp);
    free(b->scratch_path);
    free(b->new_ckpt);
}

int live_backup(struct qmp *q, const struct cbt_backup_opts *o,
                const struct live_backup_opts *lo,
                struct cbt_backup_result *res, struct cbt_error **errp)
{
    struct lb_vm vm = {.q = q, .lo = lo};
    struct lb b;
    memset(res, 0, sizeof(*res));
    if (qmp_need_version(q, 5, 2, "a live backup (block-export-add with "
                         "dirty bitmaps)", errp) < 0 ||
        live_cleanup(q, errp) < 0)
        return -1;
    sweep_scratch_beside(o->target);
    if (lb_init(&b, &vm, o->disk, o, 0, errp) < 0) {
        lb_end(&b);
        return -1;
    }
    int r = cbt_backup_live(o, &b.l, res, errp);
    lb_end(&b);
    vm_end(&vm);
    return r;
}

/* ---- every disk at one instant (--all-disks) ---- */

void live_disk_results_free(struct live_disk_result *v, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        free(v[i].disk);
        free(v[i].target);
        cbt_backup_result_free(&v[i].res);
    }
    free(v);
}

/* The disks that can hold checkpoints: qcow2, writable. */
static int backup_disks(struct qmp *q, struct live_disk **v, size_t *n,
                        struct cbt_error **errp)
{
    if (live_disks(q, v, n, errp) < 0)
        return -1;
    size_t k = 0;
    for (size_t i = 0; i < *n; i++) {
        const struct live_layer *top = &(*v)[i].layers[0];
        if (strcmp(top->drv, "qcow2") == 0 && !top->read_only && top->filename)
            (*v)[k++] = (*v)[i];
        else
            live_disk_clear(&(*v)[i]);
    }
    *n = k;
    if (k == 0) {
        cbt_error_set(errp, ENOENT, "%s: the VM has no disk that can hold "
                      "checkpoints (a writable qcow2 disk)", qmp_name(q));
        return -1;
    }
    return 0;
}

/* A checkpoint name free on every disk: the one given, or
 * cbt-YYYYMMDDTHHMMSSZ (with -2, -3 ... when taken). */
/* Does a regular file of folder `dir` carry `name` as ID.NAME.EXT (the
 * files of an --all-disks backup made of checkpoint NAME, perhaps by a
 * cbt killed before the checkpoint was kept)? */
static bool folder_names(const char *dir, const char *name)
{
    DIR *d = opendir(dir);
    if (!d)
        return false;
    size_t nl = strlen(name);
    bool found = false;
    struct dirent *de;
    while (!found && (de = readdir(d))) {
        const char *dot = strchr(de->d_name, '.');
        struct stat st;
        found = dot && strncmp(dot + 1, name, nl) == 0 &&
                dot[1 + nl] == '.' &&
                fstatat(dirfd(d), de->d_name, &st, AT_SYMLINK_NOFOLLOW) == 0 &&
                S_ISREG(st.st_mode);
    }
    closedir(d);
    return found;
}

static char *common_name(struct lb *v, size_t n, const char *folder,
                         const char *given, struct cbt_error **errp)
{
    char stamp[32];
    time_t now = time(NULL);
    struct tm tm;
    gmtime_r(&now, &tm);
    strftime(stamp, sizeof(stamp), "cbt-%Y%m%dT%H%M%SZ", &tm);
    for (unsigned k = 1; k < 1000; k++) {
        char *name = given ? strdup(given)
                     : k == 1 ? strdup(stamp)
                              : cbt_strdup_printf("%s-%u", stamp, k);
        if (!name) {
            cbt_error_set(errp, ENOMEM, "out of memory");
            return NULL;
        }
        bool taken = folder_names(folder, name);
        for (size_t i = 0; i < n && !taken; i++)
            taken = lb_name_taken(&v[i].l, name, NULL) != 0;
        if (!taken)
            return name;
        free(name);
        if (given) {
            cbt_error_set(errp, EEXIST, "checkpoint (or bitmap) '%s' exists "
                          "on a disk of the VM, or %s has backups of a "
                          "checkpoint of that name; choose another name with "
                          "--checkpoint", given, folder);
            return NULL;
        }
    }
    cbt_error_set(errp, EEXIST, "no free checkpoint name");
    return NULL;
}

int live_backup_all(struct qmp *q, const struct cbt_backup_opts *o,
                    const struct live_backup_opts *lo,
                    struct live_disk_result **out, size_t *nout,
                    struct cbt_error **errp)
{
    *out = NULL;
    *nout = 0;
    struct lb_vm vm = {.q = q, .lo = lo};
    struct live_disk *disks = NULL;
    size_t n = 0;
    if (qmp_need_version(q, 5, 2, "a live backup (block-export-add with "
                         "dirty bitmaps)", errp) < 0 ||
        live_cleanup(q, errp) < 0 || backup_disks(q, &disks, &n, errp) < 0)
        return -1;
    sweep_scratch(o->target);
    struct lb *v = calloc(n, sizeof(*v));
    struct cbt_backup_opts *opts = calloc(n, sizeof(*opts));
    struct bk_job **jobs = calloc(n, sizeof(*jobs));
    struct live_disk_result *res = calloc(n, sizeof(*res));
    const char **since = calloc(n, sizeof(*since));
    const char **names = calloc(n, sizeof(*names));
    struct bk_source *src = calloc(n, sizeof(*src));
    char *name = NULL;
    size_t ninit = 0;
    bool ok = false;
    if (!v || !opts || !jobs || !res || !since || !names || !src) {
        cbt_error_set(errp, ENOMEM, "out of memory");
        goto out;
    }
    /* Each disk, then one checkpoint name for all, then each plan. */
    for (size_t i = 0; i < n; i++, ninit++) {
        res[i].disk = strdup(disks[i].id);
        if (!res[i].disk ||
            lb_init(&v[i], &vm, disks[i].layers[0].node, &opts[i], (int)i,
                    errp) < 0)
            goto out;
        v[i].l.label = res[i].disk;
    }
    if (!(name = common_name(v, n, o->target, o->checkpoint, errp)))
        goto out;
    for (size_t i = 0; i < n; i++) {
        opts[i] = *o;
        opts[i].disk = res[i].disk;
        opts[i].checkpoint = name;
        res[i].target = cbt_strdup_printf("%s/%s.%s.%s", o->target,
                                          res[i].disk, name,
                                          o->format && !strcmp(o->format,
                                                               "raw")
                                              ? "raw"
                                              : "qcow2");
        if (!res[i].target) {
            cbt_error_set(errp, ENOMEM, "out of memory");
            goto out;
        }
        opts[i].target = res[i].target;
        jobs[i] = bk_job_plan(&opts[i], &v[i].l, &res[i].res, errp);
        if (!jobs[i]) {
            cbt_error_prefix(errp, "disk %s", res[i].disk);
            goto out;
        }
        since[i] = bk_job_since(jobs[i]);
        names[i] = bk_job_checkpoint(jobs[i]);
    }
    /* One instant for all disks. */
    if (choose_mode(&vm, v[0].cp.disk.layers[0].node, errp) < 0)
        goto out;
    for (size_t i = 0; i < n; i++)
        if (lb_prepare(&v[i], errp) < 0)
            goto out;
    {
        struct lb **pv = calloc(n, sizeof(*pv));
        if (!pv) {
            cbt_error_set(errp, ENOMEM, "out of memory");
            goto out;
        }
        for (size_t i = 0; i < n; i++)
            pv[i] = &v[i];
        int r = freeze_all(pv, since, names, o->granularity, n, errp);
        free(pv);
        if (r < 0)
            goto out;
    }
    for (size_t i = 0; i < n; i++) {
        if (lb_expose(&v[i], since[i], &src[i], errp) < 0 ||
            bk_job_copy(jobs[i], &src[i], errp) < 0) {
            cbt_error_prefix(errp, "disk %s", res[i].disk);
            goto out;
        }
        /* Done reading this disk: its view goes now. */
        lb_release(&v[i].l);
    }
    /* Every disk copied: keep them all, or none. */
    for (size_t i = 0; i < n; i++) {
        if (bk_job_finish(jobs[i], errp) < 0) {
            cbt_error_prefix(errp, "disk %s", res[i].disk);
            goto out;
        }
    }
    ok = true;
out:
    if (!ok)
        for (size_t i = 0; i < ninit; i++)
            if (v[i].job_running || v[i].new_ckpt || (jobs && jobs[i])) {
                const char *nm = jobs && jobs[i] ? bk_job_checkpoint(jobs[i])
                                                 : NULL;
                if (nm && v[i].sec)
                    lb_abort(&v[i].l, nm);
            }
    for (size_t i = 0; jobs && i < n; i++) {
        if (jobs[i] && bk_job_end(jobs[i], ok, ok ? errp : NULL) < 0)
            ok = false;
    }
    for (size_t i = 0; i < ninit; i++)
        lb_end(&v[i]);
    vm_end(&vm);
    live_disks_free(disks, n);
    free(name);
    free(v);
    free(opts);
    free(jobs);
    free(since);
    free(names);
    free(src);
    if (ok) {
        *out = res;
        *nout = n;
        return 0;
    }
    live_disk_results_free(res, res ? n : 0);
    return -1;
}

/* ---- leftovers of dead cbt processes ---- */

static bool stale(const char *name)
{
    int pid = journal_name_pid(name);
    return pid && pid != (int)getpid() && !journal_pid_is_cbt(pid);
}

/* Does node `name` have a parent (a node or a device/export above it) in
 * x-debug-query-block-graph's answer? */
static bool has_parent(json_t *graph, const char *name)
{
    size_t i;
    json_t *n, *e;
    long long id = -1;
    json_array_foreach(json_object_get(graph, "nodes"), i, n) {
        const char *nn = qmp_str(n, "name");
        long long v;
        if (nn && strcmp(nn, name) == 0 && qmp_int(n, "id", &v))
            id = v;
    }
    json_array_foreach(json_object_get(graph, "edges"), i, e) {
        long long c;
        if (qmp_int(e, "child", &c) && c == id)
            return true;
    }
    return id < 0; /* not found: leave it alone */
}

int live_leftovers(struct qmp *q, bool remove, struct cbt_error **errp)
{
    int removed = 0;
    struct cbt_error *e = NULL;
    json_t *v = qmp_execute(q, "query-block-exports", NULL, &e);
    size_t i;
    json_t *x;
    if (!v) {
        /* QEMU without exports (older qemu-system): nothing to remove. */
        cbt_error_free(e);
        e = NULL;
    }
    json_array_foreach(v, i, x) {
        const char *id = qmp_str(x, "id");
        if (!stale(id))
            continue;
        if (!remove) {
            removed++;
            continue;
        }
        if (qmp_run(q, "block-export-del",
                    json_pack("{s:s, s:s}", "id", id, "mode", "hard"),
                    &e) == 0) {
            json_decref(qmp_wait_event(q, "BLOCK_EXPORT_DELETED", id_is,
                                       (void *)id, 0, NULL));
            removed++;
        }
        cbt_error_free(e);
        e = NULL;
    }
    json_decref(v);
    v = qmp_execute(q, "query-jobs", NULL, errp);
    if (!v)
        return -1;
    json_array_foreach(v, i, x) {
        const char *id = qmp_str(x, "id");
        if (!stale(id))
            continue;
        const char *status = qmp_str(x, "status");
        if (!remove) {
            removed++;
            continue;
        }
        if (status && strcmp(status, "concluded") == 0) {
            (void)qmp_run(q, "job-dismiss", json_pack("{s:s}", "id", id),
                          NULL);
        } else if (qmp_run(q, "job-cancel", json_pack("{s:s}", "id", id),
                           NULL) == 0) {
            json_decref(qmp_wait_event(q, "BLOCK_JOB_CANCELLED", id_is,
                                       (void *)id, 0, NULL));
            /* A job made with auto-dismiss off (push backups, the chain
             * operations) stays concluded until dismissed. */
            (void)qmp_run(q, "job-dismiss", json_pack("{s:s}", "id", id),
                          NULL);
        }
        removed++;
    }
    json_decref(v);
    v = qmp_execute(q, "query-named-block-nodes", json_pack("{s:b}", "flat", 1),
                    errp);
    if (!v)
        return -1;
    /* Scratch files: the file nodes named cbt-PID-scratch-file, whose
     * files end in ".scratch" (cbt made them beside a backup target). */
    char *files[64];
    size_t nfiles = 0;
    json_array_foreach(v, i, x) {
        const char *node = qmp_str(x, "node-name");
        const char *file = qmp_str(x, "file");
        size_t nl = node ? strlen(node) : 0, fl = file ? strlen(file) : 0;
        if (stale(node) && nl > 13 && strcmp(node + nl - 13, "-scratch-file") == 0 &&
            fl > 8 && strcmp(file + fl - 8, ".scratch") == 0 && remove &&
            nfiles < ARRAY_SIZE(files))
            files[nfiles++] = strdup(file);
    }
    json_array_foreach(v, i, x) {
        const char *node = qmp_str(x, "node-name");
        size_t k;
        json_t *bm;
        json_array_foreach(json_object_get(x, "dirty-bitmaps"), k, bm) {
            const char *name = qmp_str(bm, "name");
            if (stale(name) &&
                (!remove ||
                 qmp_run(q, "block-dirty-bitmap-remove",
                        json_pack("{s:s, s:s}", "node", node, "name", name),
                        NULL) == 0))
                removed++;
        }
    }
    json_array_foreach(v, i, x) {
        const char *node = qmp_str(x, "node-name");
        size_t nl = node ? strlen(node) : 0;
        /* The format node; its file node goes with it. */
        if (!stale(node) ||
            (nl > 13 && strcmp(node + nl - 13, "-scratch-file") == 0))
            continue;
        if (!remove || qmp_run(q, "blockdev-del",
                               json_pack("{s:s}", "node-name", node),
                               NULL) == 0)
            removed++;
    }
    /* Images a chain operation of a dead cbt added and never linked in
     * (cbt-ovl-PID-...: livechain.c), nothing above them in the graph;
     * the disk's layers have a parent and stay (QEMU would refuse to
     * delete them anyway).  Their files are left. */
    json_t *graph = NULL;
    json_array_foreach(v, i, x) {
        const char *node = qmp_str(x, "node-name");
        unsigned pid;
        int end = 0;
        size_t nl = node ? strlen(node) : 0;
        if (!remove || !node ||
            sscanf(node, "cbt-ovl-%x-%*x%n", &pid, &end) != 1 ||
            (size_t)end != nl || (int)pid == (int)getpid() ||
            journal_pid_is_cbt((int)pid))
            continue;
        if (!graph &&
            !(graph = qmp_execute(q, "x-debug-query-block-graph", NULL, NULL)))
            break;
        if (has_parent(graph, node))
            continue;
        struct cbt_error *de = NULL;
        if (qmp_run(q, "blockdev-del", json_pack("{s:s}", "node-name", node),
                    &de) == 0)
            removed++;
        cbt_error_free(de);
    }
    json_decref(graph);
    for (size_t k = 0; k < nfiles; k++) {
        if (files[k])
            (void)unlink(files[k]);
        free(files[k]);
    }
    json_decref(v);
    if (removed && remove)
        cbt_warn("%s: removed %d objects a cbt that is gone left in QEMU",
                 qmp_name(q), removed);
    return removed;
}

int live_cleanup(struct qmp *q, struct cbt_error **errp)
{
    return live_leftovers(q, true, errp);
}
