/* The NBD reader: a backup's source when the disk is read over NBD (a live
 * pull backup, libvirt's pull-mode export, qemu-nbd -B). */
#ifndef CBT_LIVE_NBD_H
#define CBT_LIVE_NBD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "../util/util.h"

/*
 * One connection to an NBD export through libnbd, with the meta contexts
 * base:allocation and, when a bitmap is named, qemu:dirty-bitmap:NAME.
 * The server is untrusted: extents are checked (non-empty, inside the
 * request, bounded in number) before cbt uses them.  Thread-safe: libnbd
 * serializes the requests of one handle; but one thread at a time may
 * call live_nbd_pread_many (it waits for its own replies only).
 */
struct live_nbd;

/* Flags of a range (live_nbd_extent). */
#define LIVE_NBD_DIRTY (1u << 0) /* dirty in the bitmap (always, without one) */
#define LIVE_NBD_ZERO (1u << 1)  /* reads as zeroes */
#define LIVE_NBD_HOLE (1u << 2)  /* not allocated */

struct live_nbd_extent {
    uint64_t start, length;
    unsigned flags;
};

/* Most extents kept from one block-status reply of one context. */
#define LIVE_NBD_MAX_EXTENTS (1u << 20)
/* Longest range asked for in one block-status request. */
#define LIVE_NBD_STATUS_MAX ((uint64_t)1 << 30)

/*
 * Connect to `uri` (nbd+unix:///EXPORT?socket=PATH, nbd://HOST/EXPORT, ...)
 * asking for base:allocation and, with `bitmap`, qemu:dirty-bitmap:bitmap.
 * NULL with *errp when the export cannot be reached or lacks the bitmap.
 */
struct live_nbd *live_nbd_open(const char *uri, const char *bitmap,
                               struct cbt_error **errp);
/* The same, giving up after ms milliseconds (a socket that is not an NBD
 * server may accept and say nothing); live_nbd_open waits
 * LIVE_NBD_CONNECT_MS. */
#define LIVE_NBD_CONNECT_MS 30000
struct live_nbd *live_nbd_open_within(const char *uri, const char *bitmap,
                                      int ms, struct cbt_error **errp);
/* The same, but an export without the bitmap is no error: *has_bitmap
 * says whether it has it, and without it every range reads as dirty (as
 * when no bitmap is asked for). */
struct live_nbd *live_nbd_open_maybe(const char *uri, const char *bitmap,
                                     int ms, bool *has_bitmap,
                                     struct cbt_error **errp);
void live_nbd_close(struct live_nbd *n);
uint64_t live_nbd_size(const struct live_nbd *n);
/* Does the server say nobody can write through this export? */
bool live_nbd_read_only(const struct live_nbd *n);
const char *live_nbd_uri(const struct live_nbd *n);

/*
 * The ranges of [off, off+len) with their flags, from the first: fills up
 * to `max` extents into v, contiguous from off, and returns how many (at
 * least 1), or -1 with *errp.  Ask again from the end of the last one for
 * more.
 */
int live_nbd_extents(struct live_nbd *n, uint64_t off, uint64_t len,
                     struct live_nbd_extent *v, size_t max,
                     struct cbt_error **errp);

/* Read [off, off+len) (len <= 32 MiB).  0 or -errno. */
int live_nbd_pread(struct live_nbd *n, void *buf, size_t len, uint64_t off);

/* One range of live_nbd_pread_many. */
struct live_nbd_read {
    void *buf;
    size_t len;     /* <= 32 MiB */
    uint64_t off;
    int err;        /* out: 0, or -errno of this range */
};

/* Requests live_nbd_pread_many keeps in flight at most, and the longest
 * one: a range longer than that goes as several requests. */
#define LIVE_NBD_IN_FLIGHT 32
#define LIVE_NBD_READ_PIECE ((size_t)1 << 20)

/*
 * Read the nv ranges of v, keeping up to LIVE_NBD_IN_FLIGHT requests in
 * flight on the connection (the server answers them in any order).
 * Returns once no request is left in flight, so the buffers are the
 * caller's again: 0 when every range was read, else the first failed
 * range's -errno (each range's own result is in its err).  A failure of
 * the connection itself leaves the handle unusable: later calls fail.
 */
int live_nbd_pread_many(struct live_nbd *n, struct live_nbd_read *v,
                        size_t nv);

/*
 * A backup's source (backup_live.h) reading n: the data (many reads in
 * flight at once), block status answered from one walk of the disk kept
 * as a map of zeroes (nbd.c), and the dirty extents of n's bitmap (every
 * range, without one).  s must outlive the backup and start zeroed; n
 * stays the caller's.  done (when set before init) runs when the backup
 * has read all it needs.  live_nbd_source_fini frees the map.
 */
#define LIVE_NBD_ZERO_GRAIN ((uint64_t)65536)
struct live_nbd_source {
    struct live_nbd *nbd;
    uint64_t *zero;     /* a bit per LIVE_NBD_ZERO_GRAIN: reads as zeroes */
    uint64_t walked;    /* block status known up to here */
    uint64_t zero_from; /* where the zero extents ending at walked start
                         * (UINT64_MAX: it is not zero) */
    void (*done)(void *opaque);
    void *done_opaque;
};
struct bk_source;
void live_nbd_source_init(struct live_nbd_source *s, struct live_nbd *n,
                          struct bk_source *src);
void live_nbd_source_fini(struct live_nbd_source *s);

/*
 * The merge of two contexts' replies (exposed for the fuzz target):
 * alloc and dirty are arrays of (length, flags) pairs as the server sent
 * them for a request of [off, off+len); dirty may be NULL (all dirty).
 * Writes up to max merged extents and returns their number (>= 1), or -1
 * with *errp when a reply is malformed (an empty extent, no extent).
 */
int live_nbd_merge(uint64_t off, uint64_t len, const uint32_t *alloc,
                   size_t nalloc, const uint32_t *dirty, size_t ndirty,
                   struct live_nbd_extent *v, size_t max, const char *what,
                   struct cbt_error **errp);

#endif
