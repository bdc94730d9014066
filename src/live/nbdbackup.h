/* Backups read from an NBD export someone else set up (nbdbackup.c):
 * libvirt's pull-mode backup, qemu-nbd -B, a qemu-storage-daemon export. */
#ifndef CBT_LIVE_NBDBACKUP_H
#define CBT_LIVE_NBDBACKUP_H

#include <cbt/backup.h>

struct nbd_backup_opts {
    /* The export's dirty bitmap (qemu:dirty-bitmap:NAME) for a backup
     * since o->since; NULL: named as that checkpoint (qemu-nbd -B). */
    const char *bitmap;
    /* The disk's id in the manifests; NULL: the parent backup's, or a new
     * one for a full backup. */
    const char *disk_id;
};

/*
 * cbt backup --nbd: back up the export o->disk (an NBD URI) into
 * o->target.  cbt makes no checkpoint: the export's owner made checkpoint
 * o->checkpoint (required) at the instant the export shows, and the
 * export's bitmap holds what changed since checkpoint o->since (mode
 * CBT_BACKUP_DIFFERENTIAL) or the backup is a full one.  The checkpoints
 * the disk has, as far as cbt knows, are those the backups of its disk id
 * in TARGET's folder created; o->mode becomes CBT_BACKUP_INCREMENTAL when
 * o->since is the newest of them.  An export without the bitmap, of
 * another size than the parent backup's disk, or no backup of o->since in
 * the folder: CBT_ERR_NEED_FULL, or with o->auto_full a full backup.
 * 0, or -1 with *errp.
 */
int nbd_backup(const struct nbd_backup_opts *no, struct cbt_backup_opts *o,
               struct cbt_backup_result *res, struct cbt_error **errp);

#endif
