/* Chain operations on a running VM's disk, checkpoints kept exact
 * (livechain.c): snapshot, commit, stream and copy through QEMU's block
 * jobs. */
#ifndef CBT_LIVE_LIVECHAIN_H
#define CBT_LIVE_LIVECHAIN_H

#include <cbt/ops.h>

#include "qmp.h"

/* What a live commit, stream or copy works on. */
struct live_chain_opts {
    const char *disk;            /* the disk, as live_find_disk names one */
    /* Layers of the disk's chain, each by node name or image file:
     * commit: the topmost layer committed (NULL: the active layer, an
     * active commit) and the layer committed into (NULL: the one below
     * top); stream: the layer that stays the top's backing file (NULL:
     * none, the top takes all the data). */
    const char *top;
    const char *base;
    /* copy: the new image file, and whether it takes the top layer only. */
    const char *dest;
    bool shallow;
    uint64_t rate;               /* the job's speed limit, bytes per
                                  * second (QEMU's "speed"); 0: none */
    cbt_progress_fn *progress;   /* the job's progress; NULL: none */
    void *progress_opaque;
    cbt_cancel_fn *cancel;       /* true: cancel the job; NULL: never */
    void *cancel_opaque;
};

/*
 * cbt snapshot --qmp: create OVERLAY (a qcow2 file backed by the disk's
 * top image), add it to QEMU and, in one transaction, make it the disk's
 * top (blockdev-snapshot) with an empty persistent recording copy of
 * every persistent, recording, consistent bitmap of the old top (as
 * libvirt does); then the disk's checkpoints follow it into OVERLAY's live
 * journal.  On failure OVERLAY is removed from QEMU and from the disk.
 * 0, or -1 with *errp.
 */
int live_snapshot(struct qmp *q, const char *disk, const char *overlay,
                  struct cbt_error **errp);

/*
 * cbt commit --qmp: block-commit of top..above-base into base (an active
 * commit, pivoting base into top's place, when top is the active layer).
 * Each bitmap name held in top..base ends in base as the union of its
 * copies there (created in base when absent, with the granularity and
 * recording state of the topmost copy); the job's own writes into base
 * add nothing.  On a job error or a cancel, the chain and every bitmap
 * are as before.  0, or -1 with *errp (ECANCELED when cancelled).
 */
int live_commit(struct qmp *q, const struct live_chain_opts *o,
                struct cbt_error **errp);

/*
 * cbt stream --qmp: block-stream into the disk's top from the layers
 * above base (all of them without base); the copies those layers hold of
 * the top's bitmaps are merged into the top's before they leave the
 * chain.  0, or -1 with *errp (ECANCELED when cancelled).
 */
int live_stream(struct qmp *q, const struct live_chain_opts *o,
                struct cbt_error **errp);

/*
 * cbt copy --qmp: blockdev-mirror of the disk into DEST (o->dest), a new
 * qcow2 file (with o->shallow, only the top layer, DEST backed by the
 * top's backing file; else the whole chain, DEST without one), then the
 * pivot: DEST is the disk's top.  Each bitmap of the top ends in DEST as the union of
 * its copies in the layers DEST replaces (created before the pivot, while
 * the disk is drained; the mirror's own writes add nothing), and the
 * checkpoints follow into DEST's live journal.  On a job error or a
 * cancel, DEST is removed and nothing changed.  0, or -1 with *errp.
 */
int live_copy(struct qmp *q, const struct live_chain_opts *o,
              struct cbt_error **errp);

#endif
