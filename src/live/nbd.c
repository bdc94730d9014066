/*
 * The NBD reader (nbd.h), on libnbd.
 *
 * A backup needs, for every range of the disk, whether it changed (the
 * export's qemu:dirty-bitmap:NAME context, bit 0) and whether it reads as
 * zeroes (base:allocation, NBD_STATE_ZERO), and then the data of the
 * changed ranges that are not zero.  One NBD_CMD_BLOCK_STATUS request
 * answers for both contexts, each as its own list of (length, flags)
 * pairs starting at the request's offset; each list may stop short of
 * the requested length and need not break where the other does.  The
 * merge walks both lists at once and cuts a range wherever either
 * changes, up to where the shorter list ends.  Whatever the server says
 * is checked: an empty extent, a reply that covers nothing, or extents
 * past the request (clamped) never reach the backup.
 */
#include <inttypes.h>
#include <stdio.h>
#include <time.h>

#include <libnbd.h>

#include "../ops/backup_live.h"
#include "nbd.h"


struct live_nbd {
    struct nbd_handle *h;
    char *uri;
    char *ctx_dirty;   /* "qemu:dirty-bitmap:NAME", or NULL */
    uint64_t size;
    bool broken;       /* reads were left in flight: never poll again */
};

/* The errno of the libnbd call that just failed (EIO when it gave none),
 * negated. */
static int nbd_errno(void)
{
    int e = nbd_get_errno();
    return -(e > 0 ? e : EIO);
}

/* A failed libnbd call: its message, naming the export. */
static void nbd_failed(struct cbt_error **errp, const char *uri,
                       const char *what)
{
    int e = nbd_get_errno();
    const char *msg = nbd_get_error();
    cbt_error_set(errp, e > 0 ? e : EIO, "%s: %s: %s", uri, what,
                  msg ? msg : "unknown NBD error");
}

/* Connect, giving up after ms milliseconds (a socket that is not an NBD
 * server may accept and stay silent).  0, or -1 (libnbd's error, or
 * ETIMEDOUT). */
static int connect_within(struct nbd_handle *h, const char *uri, int ms,
                          bool *timed_out)
{
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    *timed_out = false;
    if (nbd_aio_connect_uri(h, uri) < 0)
        return -1;
    while (nbd_aio_is_connecting(h) == 1) {
        clock_gettime(CLOCK_MONOTONIC, &t);
        long long left = ms - ((t.tv_sec - t0.tv_sec) * 1000LL +
                               (t.tv_nsec - t0.tv_nsec) / 1000000);
        if (left <= 0) {
            *timed_out = true;
            return -1;
        }
        if (nbd_poll(h, (int)left) < 0)
            return -1;
    }
    return nbd_aio_is_ready(h) == 1 ? 0 : -1;
}

struct live_nbd *live_nbd_open(const char *uri, const char *bitmap,
                               struct cbt_error **errp)
{
    return live_nbd_open_within(uri, bitmap, LIVE_NBD_CONNECT_MS, errp);
}

struct live_nbd *live_nbd_open_within(const char *uri, const char *bitmap,
                                      int ms, struct cbt_error **errp)
{
    return live_nbd_open_maybe(uri, bitmap, ms, NULL, errp);
}

struct live_nbd *live_nbd_open_maybe(const char *uri, const char *bitmap,
                                     int ms, bool *has_bitmap,
                                     struct cbt_error **errp)
{
    struct live_nbd *n = calloc(1, sizeof(*n));
    if (!n || !(n->uri = strdup(uri))) {
        free(n);
        cbt_error_set(errp, ENOMEM, "out of memory");
        return NULL;
    }
    n->h = nbd_create();
    if (!n->h) {
        nbd_failed(errp, uri, "cannot create an NBD handle");
        live_nbd_close(n);
        return NULL;
    }
    /* libnbd zeroes every read buffer first (pread_initialize), so that a
     * caller ignoring a failed read leaks no old memory: 6% of a backup's
     * CPU, on its reading thread.  Every read here is checked, and one
     * succeeds only when the server sent as many bytes as asked for
     * (nbd_aio_command_completed); a server that repeats some bytes and
     * leaves others out could only leave in the backup what the buffer
     * held before (cbt's own memory: most often an earlier chunk of the
     * same disk), no worse than sending wrong bytes.  (libnbd >= 1.12.) */
#ifdef LIBNBD_HAVE_NBD_SET_PREAD_INITIALIZE
    (void)nbd_set_pread_initialize(n->h, false);
#endif
    if (bitmap && asprintf(&n->ctx_dirty, "qemu:dirty-bitmap:%s", bitmap) < 0) {
        n->ctx_dirty = NULL;
        cbt_error_set(errp, ENOMEM, "out of memory");
        live_nbd_close(n);
        return NULL;
    }
    if (nbd_add_meta_context(n->h, LIBNBD_CONTEXT_BASE_ALLOCATION) < 0 ||
        (n->ctx_dirty && nbd_add_meta_context(n->h, n->ctx_dirty) < 0)) {
        nbd_failed(errp, uri, "cannot ask for the meta contexts");
        live_nbd_close(n);
        return NULL;
    }
    bool timed_out;
    if (connect_within(n->h, uri, ms, &timed_out) < 0) {
        if (timed_out)
            cbt_error_set(errp, ETIMEDOUT, "%s: no NBD server answered within "
                          "%d ms", uri, ms);
        else
            nbd_failed(errp, uri, "cannot connect");
        live_nbd_close(n);
        return NULL;
    }
    int64_t size = nbd_get_size(n->h);
    if (size < 0) {
        nbd_failed(errp, uri, "cannot get the export's size");
        live_nbd_close(n);
        return NULL;
    }
    n->size = (uint64_t)size;
    if (nbd_can_meta_context(n->h, LIBNBD_CONTEXT_BASE_ALLOCATION) != 1) {
        cbt_error_set(errp, ENOTSUP, "%s: the export does not report "
                      "allocation (meta context base:allocation)", uri);
        live_nbd_close(n);
        return NULL;
    }
    bool have = !n->ctx_dirty || nbd_can_meta_context(n->h, n->ctx_dirty) == 1;
    if (has_bitmap) {
        *has_bitmap = have;
        if (!have) {
            /* Connected without it: every range reads as dirty,
             * as with no bitmap asked for. */
            free(n->ctx_dirty);
            n->ctx_dirty = NULL;
        }
    } else if (!have) {
        cbt_error_set(errp, ENOENT, "%s: the export has no dirty bitmap "
                      "'%s' (meta context %s): export it with the bitmap "
                      "(qemu-nbd -B %s, block-export-add bitmaps)", uri,
                      bitmap, n->ctx_dirty, bitmap);
        live_nbd_close(n);
        return NULL;
    }
    return n;
}

void live_nbd_close(struct live_nbd *n)
{
    if (!n)
        return;
    if (n->h) {
        /* A clean disconnect runs the connection until the server has
         * answered everything; reads abandoned in flight (broken) would
         * then land in buffers their callers have freed. */
        if (!n->broken)
            (void)nbd_shutdown(n->h, 0);
        nbd_close(n->h);
    }
    free(n->ctx_dirty);
    free(n->uri);
    free(n);
}

uint64_t live_nbd_size(const struct live_nbd *n) { return n->size; }
bool live_nbd_read_only(const struct live_nbd *n)
{
    return nbd_is_read_only(n->h) == 1;
}
const char *live_nbd_uri(const struct live_nbd *n) { return n->uri; }

/* ---- extents ---- */

/* One context's reply, walked pair by pair. */
struct walk {
    const uint32_t *e; /* (length, flags) pairs */
    size_t n, i;
    uint64_t pos;      /* start of pair i */
};

int live_nbd_merge(uint64_t off, uint64_t len, const uint32_t *alloc,
                   size_t nalloc, const uint32_t *dirty, size_t ndirty,
                   struct live_nbd_extent *v, size_t max, const char *what,
                   struct cbt_error **errp)
{
    struct walk a = {alloc, nalloc, 0, off}, d = {dirty, ndirty, 0, off};
    uint64_t end = off + len; /* caller keeps it inside the export */
    uint64_t pos = off;
    size_t out = 0;
    while (pos < end && out < max && a.i < a.n && (!dirty || d.i < d.n)) {
        uint32_t alen = a.e[2 * a.i], dlen = dirty ? d.e[2 * d.i] : 0;
        if (alen == 0 || (dirty && dlen == 0)) {
            cbt_error_set(errp, EPROTO, "%s: the server sent an empty extent "
                          "at %" PRIu64, what, pos);
            return -1;
        }
        uint64_t aend = a.pos + alen;
        uint64_t dend = dirty ? d.pos + dlen : UINT64_MAX;
        uint64_t stop = MIN(MIN(aend, dend), end);
        unsigned af = a.e[2 * a.i + 1], df = dirty ? d.e[2 * d.i + 1] : 1;
        unsigned flags = ((df & 1) ? LIVE_NBD_DIRTY : 0) |
                         ((af & LIBNBD_STATE_ZERO) ? LIVE_NBD_ZERO : 0) |
                         ((af & LIBNBD_STATE_HOLE) ? LIVE_NBD_HOLE : 0);
        if (out > 0 && v[out - 1].flags == flags &&
            v[out - 1].start + v[out - 1].length == pos) {
            v[out - 1].length += stop - pos;
        } else {
            v[out++] = (struct live_nbd_extent){pos, stop - pos, flags};
        }
        pos = stop;
        if (aend == stop) {
            a.pos = aend;
            a.i++;
        }
        if (dirty && dend == stop) {
            d.pos = dend;
            d.i++;
        }
    }
    if (out == 0) {
        cbt_error_set(errp, EPROTO, "%s: the server's block status covers "
                      "nothing at %" PRIu64, what, off);
        return -1;
    }
    return (int)out;
}

/* What the extent callback keeps of one reply. */
struct reply {
    const char *ctx_dirty;
    uint32_t *alloc, *dirty;
    size_t nalloc, ndirty;
    bool too_many;
    bool oom;
};

static int on_extents(void *opaque, const char *ctx, uint64_t offset,
                      uint32_t *entries, size_t nr_entries, int *error)
{
    struct reply *r = opaque;
    (void)offset;
    (void)error;
    uint32_t **dst;
    size_t *n;
    if (strcmp(ctx, LIBNBD_CONTEXT_BASE_ALLOCATION) == 0) {
        dst = &r->alloc;
        n = &r->nalloc;
    } else if (r->ctx_dirty && strcmp(ctx, r->ctx_dirty) == 0) {
        dst = &r->dirty;
        n = &r->ndirty;
    } else {
        return 0; /* a context we did not ask for: ignored */
    }
    size_t pairs = nr_entries / 2;
    if (*dst || pairs == 0)
        return 0; /* a second reply for one context: the first counts */
    if (pairs > LIVE_NBD_MAX_EXTENTS) {
        r->too_many = true;
        pairs = LIVE_NBD_MAX_EXTENTS;
    }
    *dst = malloc(pairs * 2 * sizeof(uint32_t));
    if (!*dst) {
        r->oom = true;
        return 0;
    }
    memcpy(*dst, entries, pairs * 2 * sizeof(uint32_t));
    *n = pairs;
    return 0;
}

int live_nbd_extents(struct live_nbd *n, uint64_t off, uint64_t len,
                     struct live_nbd_extent *v, size_t max,
                     struct cbt_error **errp)
{
    if (off >= n->size || len == 0) {
        cbt_error_set(errp, EINVAL, "%s: block status past the end",
                      n->uri);
        return -1;
    }
    if (n->broken) {
        cbt_error_set(errp, EIO, "%s: the connection failed before",
                      n->uri);
        return -1;
    }
    len = MIN(MIN(len, n->size - off), LIVE_NBD_STATUS_MAX);
    struct reply r = {.ctx_dirty = n->ctx_dirty};
    nbd_extent_callback cb = {.callback = on_extents, .user_data = &r};
    int ret;
    if (nbd_block_status(n->h, len, off, cb, 0) < 0) {
        nbd_failed(errp, n->uri, "block status");
        ret = -1;
    } else if (r.oom) {
        cbt_error_set(errp, ENOMEM, "%s: out of memory for extents", n->uri);
        ret = -1;
    } else if (!r.alloc || (n->ctx_dirty && !r.dirty)) {
        cbt_error_set(errp, EPROTO, "%s: the server answered block status "
                      "without %s", n->uri,
                      !r.alloc ? LIBNBD_CONTEXT_BASE_ALLOCATION
                               : n->ctx_dirty);
        ret = -1;
    } else {
        ret = live_nbd_merge(off, len, r.alloc, r.nalloc, r.dirty, r.ndirty,
                             v, max, n->uri, errp);
    }
    free(r.alloc);
    free(r.dirty);
    return ret;
}

/* ---- reads ---- */

int live_nbd_pread(struct live_nbd *n, void *buf, size_t len, uint64_t off)
{
    if (n->broken)
        return -EIO;
    return nbd_pread(n->h, buf, len, off, 0) < 0 ? nbd_errno() : 0;
}

/*
 * Many reads on one connection: the ranges are cut into requests of at
 * most LIVE_NBD_READ_PIECE bytes, issued in order while fewer than
 * LIVE_NBD_IN_FLIGHT are in flight, and retired as their replies come
 * (in any order) with nbd_aio_command_completed, which also fails a read
 * whose structured reply did not carry every byte asked for (a completion
 * callback would not see that check).  After the first failure nothing
 * more is issued, but the requests in flight are still waited for: until
 * libnbd has retired them it may write into their buffers.  Only when
 * the connection cannot be driven any more while requests are still in
 * flight (nbd_poll fails and the handle is not dead, where libnbd would
 * have aborted them) are they abandoned, and the handle marked broken so
 * nothing polls it again (not even the disconnect in live_nbd_close).
 */
int live_nbd_pread_many(struct live_nbd *n, struct live_nbd_read *v,
                        size_t nv)
{
    struct {
        int64_t cookie;
        size_t range;
    } fl[LIVE_NBD_IN_FLIGHT];
    size_t nfl = 0, next = 0, at = 0; /* next byte to ask: v[next] + at */
    bool stop = n->broken, dead = false;
    for (size_t i = 0; i < nv; i++)
        v[i].err = n->broken ? -EIO : 0;
    for (;;) {
        while (!stop && next < nv && nfl < LIVE_NBD_IN_FLIGHT) {
            struct live_nbd_read *r = &v[next];
            size_t len = MIN(r->len - at, LIVE_NBD_READ_PIECE);
            int64_t c = len == 0 ? 0
                        : nbd_aio_pread(n->h, (char *)r->buf + at, len,
                                        r->off + at, NBD_NULL_COMPLETION, 0);
            if (c < 0) {
                r->err = nbd_errno();
                stop = true;
                break;
            }
            if (len) {
                fl[nfl].cookie = c;
                fl[nfl++].range = next;
            }
            at += len;
            if (at == r->len) {
                next++;
                at = 0;
            }
        }
        bool retired = false;
        for (size_t k = 0; k < nfl;) {
            int r = nbd_aio_command_completed(n->h, (uint64_t)fl[k].cookie);
            if (r == 0) {
                k++;
                continue;
            }
            if (r < 0) {
                struct live_nbd_read *f = &v[fl[k].range];
                if (f->err == 0)
                    f->err = nbd_errno();
                stop = true;
            }
            fl[k] = fl[--nfl];
            retired = true;
        }
        if (nfl == 0 && (stop || next == nv))
            break;
        if (retired || nbd_poll(n->h, -1) >= 0)
            continue;
        int e = nbd_errno();
        stop = true;
        /* A connection that died: libnbd aborted what was in flight, the
         * next round retires it (once: never poll a dead handle again). */
        if (!dead && (nbd_aio_is_dead(n->h) == 1 ||
                      nbd_aio_is_closed(n->h) == 1)) {
            dead = true;
            continue;
        }
        n->broken = true;
        for (size_t k = 0; k < nfl; k++)
            if (v[fl[k].range].err == 0)
                v[fl[k].range].err = e;
        break;
    }
    for (size_t i = 0; i < nv; i++)
        if (v[i].err)
            return v[i].err;
    return 0;
}

/* ---- as a backup's source ---- */

/*
 * The zero map.  A backup asks the source's block status over and over:
 * the dirty extents of the whole disk first (src_dirty), then the zeroes
 * of the whole disk again (backup.c's add_stale_zeroes), then the zeroes
 * of every chunk it copies.  What the source shows does not change while
 * it is read (a frozen view, an export its owner keeps still), so one walk
 * over the disk answers all of them: each extent's dirtiness goes to
 * src_dirty's callback as it comes, and its zeroes are kept in memory, a
 * bit per LIVE_NBD_ZERO_GRAIN set when all of the grain reads as zeroes
 * (the extents covering it may be several).  The answers are coarser than
 * the server's, never wrong: a grain partly zero is "data", which only
 * means it is read.  The grain is the backup's block (backup.c asks about
 * whole blocks only), so nothing is lost, and the map's size depends on
 * the disk's (2 KiB a GiB), not on how finely the server cuts its
 * extents.  Without src_dirty (a full backup) the walk goes as far as the
 * questions.
 */

#define STATUS_BATCH 4096 /* extents taken from one block-status reply */

static bool zero_bit(const struct live_nbd_source *s, uint64_t g)
{
    return (s->zero[g / 64] >> (g % 64)) & 1;
}

/* One more extent of the walk (they come in order, contiguous). */
static void note_zero(struct live_nbd_source *s,
                      const struct live_nbd_extent *e, uint64_t size)
{
    uint64_t end = e->start + e->length;
    if (!(e->flags & LIVE_NBD_ZERO)) {
        s->zero_from = UINT64_MAX;
        return;
    }
    if (s->zero_from == UINT64_MAX)
        s->zero_from = e->start;
    /* The grains inside [zero_from, end) not set before (those ending at
     * e->start or earlier were); the disk's last grain may be short. */
    uint64_t g = MAX(DIV_ROUND_UP(s->zero_from, LIVE_NBD_ZERO_GRAIN),
                     e->start / LIVE_NBD_ZERO_GRAIN);
    uint64_t g1 = end == size ? DIV_ROUND_UP(end, LIVE_NBD_ZERO_GRAIN)
                              : end / LIVE_NBD_ZERO_GRAIN;
    for (; g < g1; g++)
        s->zero[g / 64] |= (uint64_t)1 << (g % 64);
}

/* Walk block status from s->walked until at least upto, telling cb (when
 * not NULL) each extent's dirtiness.  0, or -1 with *errp. */
static int status_walk(struct live_nbd_source *s, uint64_t upto,
                       int (*cb)(void *cbop, uint64_t start, uint64_t len,
                                 bool dirty),
                       void *cbop, struct cbt_error **errp)
{
    uint64_t size = live_nbd_size(s->nbd);
    uint64_t grains = DIV_ROUND_UP(size, LIVE_NBD_ZERO_GRAIN);
    if (!s->zero && !(s->zero = calloc(MAX(DIV_ROUND_UP(grains, 64), 1),
                                       sizeof(uint64_t)))) {
        cbt_error_set(errp, ENOMEM, "out of memory");
        return -1;
    }
    struct live_nbd_extent *v = malloc(STATUS_BATCH * sizeof(*v));
    if (!v) {
        cbt_error_set(errp, ENOMEM, "out of memory");
        return -1;
    }
    int ret = 0;
    while (s->walked < MIN(upto, size) && ret == 0) {
        int n = live_nbd_extents(s->nbd, s->walked, size - s->walked, v,
                                 STATUS_BATCH, errp);
        if (n < 0) {
            ret = -1;
            break;
        }
        for (int i = 0; i < n && ret == 0; i++) {
            note_zero(s, &v[i], size);
            s->walked = v[i].start + v[i].length;
            int r = cb ? cb(cbop, v[i].start, v[i].length,
                            (v[i].flags & LIVE_NBD_DIRTY) != 0)
                       : 0;
            if (r < 0) {
                cbt_error_set(errp, -r, "out of memory");
                ret = -1;
            }
        }
    }
    free(v);
    return ret;
}

static int src_status(void *opaque, uint64_t off, uint64_t len, uint64_t *run,
                      bool *zero)
{
    struct live_nbd_source *s = opaque;
    uint64_t size = live_nbd_size(s->nbd);
    if (off >= size || len == 0)
        return -EIO;
    /* Off's grain known whole, then the run of grains like it. */
    uint64_t g = off / LIVE_NBD_ZERO_GRAIN;
    if (status_walk(s, (g + 1) * LIVE_NBD_ZERO_GRAIN, NULL, NULL, NULL) < 0)
        return -EIO;
    uint64_t known = s->walked >= size
                         ? size
                         : ALIGN_DOWN(s->walked, LIVE_NBD_ZERO_GRAIN);
    uint64_t end = off + MIN(len, known - off);
    bool z = zero_bit(s, g);
    uint64_t stop = (g + 1) * LIVE_NBD_ZERO_GRAIN;
    while (stop < end && zero_bit(s, stop / LIVE_NBD_ZERO_GRAIN) == z)
        stop += LIVE_NBD_ZERO_GRAIN;
    *run = MIN(stop, end) - off;
    *zero = z;
    return 0;
}

static int src_read(void *opaque, void *buf, size_t len, uint64_t off)
{
    struct live_nbd_source *s = opaque;
    return live_nbd_pread(s->nbd, buf, len, off);
}

/* The ranges in flight together, READ_BATCH at a time (backup.c asks for
 * at most one chunk's, BP_SEGS). */
#define READ_BATCH 64

static int src_read_many(void *opaque, struct bk_read *v, size_t n)
{
    struct live_nbd_source *s = opaque;
    struct live_nbd_read r[READ_BATCH];
    int ret = 0;
    for (size_t i = 0; i < n && ret == 0; i += READ_BATCH) {
        size_t k = MIN(n - i, (size_t)READ_BATCH);
        for (size_t j = 0; j < k; j++)
            r[j] = (struct live_nbd_read){.buf = v[i + j].buf,
                                          .len = v[i + j].len,
                                          .off = v[i + j].off};
        ret = live_nbd_pread_many(s->nbd, r, k);
        for (size_t j = 0; j < k; j++)
            v[i + j].err = r[j].err;
    }
    return ret;
}

static int src_dirty(void *opaque,
                     int (*cb)(void *cbop, uint64_t start, uint64_t len,
                               bool dirty),
                     void *cbop, struct cbt_error **errp)
{
    struct live_nbd_source *s = opaque;
    /* The whole disk for cb, from the start (what a question walked
     * before is walked again: the same answers, the same bits). */
    s->walked = 0;
    s->zero_from = UINT64_MAX;
    int r = status_walk(s, UINT64_MAX, cb, cbop, errp);
    cbt_debug("nbd: block status walked");
    return r;
}

static void src_done(void *opaque)
{
    struct live_nbd_source *s = opaque;
    if (s->done)
        s->done(s->done_opaque);
}

void live_nbd_source_init(struct live_nbd_source *s, struct live_nbd *n,
                          struct bk_source *src)
{
    free(s->zero);
    *s = (struct live_nbd_source){.nbd = n, .zero_from = UINT64_MAX,
                                  .done = s->done,
                                  .done_opaque = s->done_opaque};
    *src = (struct bk_source){
        .opaque = s,
        .status = src_status,
        .read = src_read,
        .read_many = src_read_many,
        .done = src_done,
        .dirty = src_dirty,
    };
}

void live_nbd_source_fini(struct live_nbd_source *s)
{
    free(s->zero);
    s->zero = NULL;
    s->walked = 0;
    s->zero_from = UINT64_MAX;
}
