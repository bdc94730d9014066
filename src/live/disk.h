/* The disks of a running QEMU: finding the qcow2 node behind a name. */
#ifndef CBT_LIVE_DISK_H
#define CBT_LIVE_DISK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "qmp.h"

/* A named dirty bitmap of a node, as QEMU reports it.  QEMU's own job
 * bitmaps have no name and are left out. */
struct live_bitmap {
    char *name;
    uint64_t granularity;
    uint64_t count;        /* dirty bytes */
    bool recording;
    bool persistent;
    bool busy;
    bool inconsistent;
};

/* One format node of a disk's backing chain. */
struct live_layer {
    char *node;            /* node name (QEMU's "#blockNNN" for -drive) */
    char *drv;             /* "qcow2", "raw", ... */
    char *filename;        /* the image file */
    char *file_node;       /* the node of that file (its "file" child) */
    uint64_t size;         /* virtual size */
    bool read_only;
    struct live_bitmap *bitmaps;
    size_t nbitmaps;
};

/*
 * A disk: what a device (qemu-system) or an export (qemu-storage-daemon)
 * is attached to, down through filters to the format node, and that
 * node's backing chain, top first.
 */
struct live_disk {
    char *id;              /* how cbt names it: the device's id ("vda"),
                            * the export's id, or the node name */
    char *qdev;            /* the device's qdev path, or NULL */
    char *device;          /* the device's drive id (-drive), or NULL */
    char *export_id;       /* the export's id (qemu-storage-daemon), or NULL */
    char *attached;        /* the node the device/export uses (may be a
                            * filter while a job runs) */
    struct live_layer *layers;
    size_t nlayers;        /* >= 1: layers[0] is the disk's format node */
};

/*
 * Every disk QEMU has: each device with a medium (query-block) and each
 * block export (query-block-exports), resolved to their format nodes; a
 * node both a device and an export use is listed once.  0, or -1 with
 * *errp.  Free with live_disks_free.
 */
int live_disks(struct qmp *q, struct live_disk **v, size_t *n,
               struct cbt_error **errp);
void live_disks_free(struct live_disk *v, size_t n);
void live_disk_clear(struct live_disk *d);

/*
 * The disk `name` names: a device id or qdev path ("vda",
 * "/machine/peripheral/vda/virtio-backend"), a drive id, an export id, a
 * node name (of the format node, a filter above it or its file node), or
 * the image's file name.  Several disks matching is an error listing them,
 * as is none (listing what there is).  0, or -1 with *errp.
 */
int live_find_disk(struct qmp *q, const char *name, struct live_disk *d,
                   struct cbt_error **errp);

/* The index in d->layers of the layer `name` names (its node name, its
 * file node's name, or its image file, by identity), or -1. */
ssize_t live_find_layer(const struct live_disk *d, const char *name);

/* The bitmap `name` of a layer, or NULL. */
const struct live_bitmap *live_layer_bitmap(const struct live_layer *l,
                                            const char *name);

/* The bitmap `name` of node `node` as QEMU shows it now, from one
 * query-named-block-nodes (not the whole disk's discovery): 1 with *out
 * (its name left NULL), 0 when the node has no such bitmap, -1 with *errp
 * (the node gone among them). */
int live_node_bitmap(struct qmp *q, const char *node, const char *name,
                     struct live_bitmap *out, struct cbt_error **errp);

#endif
