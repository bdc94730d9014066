/* Backups of a running VM's disk: QMP for the point in time, NBD for the
 * data (livebackup.c). */
#ifndef CBT_LIVE_LIVEBACKUP_H
#define CBT_LIVE_LIVEBACKUP_H

#include <cbt/backup.h>

#include "qmp.h"

struct live_backup_opts {
    /* The NBD server's Unix socket when QEMU already runs one cbt cannot
     * find (qemu-storage-daemon --nbd-server); NULL: find it, or start
     * one on a private socket. */
    const char *nbd_socket;
    /* qemu-guest-agent's socket: the guest's file systems are frozen for
     * the instant of the backup (guest-fsfreeze-freeze just before the
     * transaction, guest-fsfreeze-thaw right after it, also when it
     * fails); NULL: no quiescing. */
    const char *qga;
    /* QEMU writes the backup's data into a scratch file (blockdev-backup
     * sync=full or incremental), which cbt then reads as the source: no
     * NBD.  Taken by itself, with a warning, when QEMU runs an NBD server
     * cbt cannot find. */
    bool push;
};

/*
 * cbt backup --qmp: back up disk o->disk of the QEMU behind q into
 * o->target (a pull backup, docs/live.md): one transaction creates the new
 * checkpoint, a temporary disabled copy of the old one and a point-in-time
 * view (blockdev-backup sync=none into a scratch overlay); cbt reads that
 * view over NBD, writes the backup as offline, and removes the view.  On
 * failure the new checkpoint is removed again.  0, or -1 with *errp.
 */
int live_backup(struct qmp *q, const struct cbt_backup_opts *o,
                const struct live_backup_opts *lo,
                struct cbt_backup_result *res, struct cbt_error **errp);

/* One disk's part of a backup of every disk. */
struct live_disk_result {
    char *disk;                  /* its id (device, export or node) */
    char *target;                /* FOLDER/ID.CHECKPOINT.qcow2 */
    struct cbt_backup_result res;
};
void live_disk_results_free(struct live_disk_result *v, size_t n);

/*
 * cbt backup --qmp --all-disks: every disk of the VM that can hold
 * checkpoints (writable qcow2), at one instant (one transaction for all),
 * into the folder o->target, one backup per disk named ID.CHECKPOINT.qcow2
 * (.raw with -O raw), one checkpoint name across them (o->checkpoint, or
 * cbt-TIME).  Each disk's mode is planned on its own (with auto_full a
 * disk that cannot take an incremental takes a full).  If one disk fails,
 * all are undone: no new checkpoint on any disk, no new file, the old
 * checkpoints intact.  *v: one result per disk (live_disk_results_free).
 */
int live_backup_all(struct qmp *q, const struct cbt_backup_opts *o,
                    const struct live_backup_opts *lo,
                    struct live_disk_result **v, size_t *n,
                    struct cbt_error **errp);

/*
 * Remove what cbt processes that are gone left in this QEMU: exports,
 * jobs, nodes and temporary bitmaps named cbt-PID-... of a PID that is no
 * running cbt, and their scratch files.  Returns how many objects went,
 * or -1 with *errp.
 */
int live_cleanup(struct qmp *q, struct cbt_error **errp);
/* The same; with remove false, only counts them. */
int live_leftovers(struct qmp *q, bool remove, struct cbt_error **errp);

#endif
