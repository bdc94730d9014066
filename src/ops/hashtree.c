/*
 * sha256-tree-v2 (docs/backups.md "Block hashes as a tree"): the tree's
 * shape, the record file, the view of a chain of them, building a tree
 * from changed leaves, checking a view and merging two record files.
 *
 * A record file is untrusted input: restore and verify size their work by
 * it and a later backup builds on it.  So its size must be exactly what
 * its record count says, every field is checked against the tree its
 * manifest describes, and records must be strictly increasing in (level,
 * index) with each index inside its level: a reader may then binary-search
 * it.  Reads after the check re-check what they use (a file changed
 * meanwhile gives -EIO, never an out-of-range index).
 */
#include <assert.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../util/util.h"
#include "hashtree.h"

static const char tree_magic[8] = {'C', 'B', 'T', 'T', 'R', 'E', 'E', '2'};
static const char tree_end_magic[8] = {'C', 'B', 'T', 'T', 'E', 'N', 'D', '2'};
static const char node_prefix[] = "cbt-tree-v2"; /* 11 bytes, no NUL */

/* The largest view a manifest accepts (manifest.c): INT64_MAX bytes. */
#define TREE_MAX_BLOCKS (((uint64_t)INT64_MAX) / BLOCKHASH_BLOCK + 1)
#define CURSOR_RECORDS 512u

static uint32_t ldle32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
           (uint32_t)p[3] << 24;
}

static void stle32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

/* ---- shape ---- */

unsigned tree_levels_for(uint64_t blocks)
{
    unsigned l = 1;
    /* Covers TREE_FANOUT^l blocks; stops before it could overflow. */
    for (uint64_t cap = TREE_FANOUT; cap < blocks; cap *= TREE_FANOUT)
        l++;
    return l;
}

void tree_node_digest(unsigned k, const uint8_t *children, size_t n,
                      uint8_t out[32])
{
    uint8_t hdr[sizeof(node_prefix) - 1 + 9];
    memcpy(hdr, node_prefix, sizeof(node_prefix) - 1);
    hdr[sizeof(node_prefix) - 1] = (uint8_t)k;
    stle64(hdr + sizeof(node_prefix), (uint64_t)n);
    struct sha256_ctx c;
    sha256_init(&c);
    sha256_update(&c, hdr, sizeof(hdr));
    if (n)
        sha256_update(&c, children, n * 32);
    sha256_final(&c, out);
}

void tree_children(const struct tree_shape *s, unsigned k, uint64_t i,
                   uint64_t *first, size_t *n)
{
    assert(k >= 1 && k <= s->levels);
    uint64_t below = s->count[k - 1];
    uint64_t f = i * TREE_FANOUT; /* i < count[k]: cannot overflow */
    *first = f;
    *n = f >= below ? 0 : (size_t)MIN(below - f, (uint64_t)TREE_FANOUT);
}

int tree_shape_init(struct tree_shape *s, uint64_t size)
{
    memset(s, 0, sizeof(*s));
    if (size > (uint64_t)INT64_MAX)
        return -EINVAL;
    s->size = size;
    s->blocks = DIV_ROUND_UP(size, (uint64_t)BLOCKHASH_BLOCK);
    s->levels = tree_levels_for(s->blocks);
    assert(s->levels <= TREE_MAX_LEVELS);
    s->count[0] = s->blocks;
    for (unsigned k = 1; k <= s->levels; k++)
        s->count[k] = MAX(1, DIV_ROUND_UP(s->count[k - 1],
                                          (uint64_t)TREE_FANOUT));
    /* Zero subtrees: a full-width one per level, and the right edge's
     * (the short last block, the partial nodes above it): O(L) hashes. */
    blockhash_zero_digest(BLOCKHASH_BLOCK, s->zfull[0]);
    if (s->blocks)
        blockhash_zero_digest((size_t)(size - (s->blocks - 1) *
                                                  BLOCKHASH_BLOCK),
                              s->zedge[0]);
    else
        memcpy(s->zedge[0], s->zfull[0], 32);
    uint8_t *buf = malloc(TREE_FANOUT * 32);
    if (!buf)
        return -ENOMEM;
    for (unsigned k = 1; k <= s->levels; k++) {
        for (unsigned j = 0; j < TREE_FANOUT; j++)
            memcpy(buf + j * 32, s->zfull[k - 1], 32);
        tree_node_digest(k, buf, TREE_FANOUT, s->zfull[k]);
        uint64_t first;
        size_t n;
        tree_children(s, k, s->count[k] - 1, &first, &n);
        if (n)
            memcpy(buf + (n - 1) * 32, s->zedge[k - 1], 32);
        tree_node_digest(k, buf, n, s->zedge[k]);
    }
    free(buf);
    return 0;
}

void tree_zero(const struct tree_shape *s, unsigned k, uint64_t i,
               uint8_t out[32])
{
    assert(k <= s->levels);
    memcpy(out, i + 1 == s->count[k] ? s->zedge[k] : s->zfull[k], 32);
}

/* ---- checking the record file's bytes ---- */

static int corrupt(struct cbt_error **errp, const char *what,
                   const char *fmt, ...) PRINTF_FMT(3, 4);
static int corrupt(struct cbt_error **errp, const char *what,
                   const char *fmt, ...)
{
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    cbt_error_set(errp, EINVAL, "%s: tree record file: %s", what, msg);
    cbt_error_set_kind(errp, CBT_ERR_CORRUPT);
    return -1;
}

/* Counts of nodes per level for `blocks` leaves (tree_shape_init's,
 * without the zero digests). */
static unsigned level_counts(uint64_t blocks, uint64_t *count)
{
    unsigned l = tree_levels_for(blocks);
    count[0] = blocks;
    for (unsigned k = 1; k <= l; k++)
        count[k] = MAX(1, DIV_ROUND_UP(count[k - 1], (uint64_t)TREE_FANOUT));
    return l;
}

/* The state of one check: the header read, then records one by one. */
struct tree_check {
    const char *what;
    struct tree_file_info *info;
    uint64_t count[TREE_MAX_LEVELS + 1];
    uint64_t seen;
    int last_level;
    uint64_t last_index;
};

static int check_header(struct tree_check *ck, const uint8_t *h,
                        uint64_t file_size, uint64_t blocks,
                        struct cbt_error **errp)
{
    struct tree_file_info *info = ck->info;
    memset(info, 0, sizeof(*info));
    if (file_size < TREE_HEADER + TREE_TRAILER)
        return corrupt(errp, ck->what, "it is %" PRIu64 " bytes, shorter "
                       "than a header and a trailer (%u)", file_size,
                       TREE_HEADER + TREE_TRAILER);
    if (memcmp(h, tree_magic, 8) != 0)
        return corrupt(errp, ck->what, "no CBTTREE2 magic at its start");
    if (ldle32(h + 8) != BLOCKHASH_BLOCK)
        return corrupt(errp, ck->what, "block size %" PRIu32 "; expected %u",
                       ldle32(h + 8), BLOCKHASH_BLOCK);
    if (ldle32(h + 12) != TREE_FANOUT)
        return corrupt(errp, ck->what, "fan-out %" PRIu32 "; expected %u",
                       ldle32(h + 12), TREE_FANOUT);
    if (ldle64(h + 16) != blocks)
        return corrupt(errp, ck->what, "%" PRIu64 " blocks; its manifest "
                       "says %" PRIu64, ldle64(h + 16), blocks);
    if (blocks > TREE_MAX_BLOCKS)
        return corrupt(errp, ck->what, "%" PRIu64 " blocks, more than a "
                       "disk can have", blocks);
    unsigned l = level_counts(blocks, ck->count);
    if (ldle32(h + 24) != l)
        return corrupt(errp, ck->what, "%" PRIu32 " levels; expected %u for "
                       "%" PRIu64 " blocks", ldle32(h + 24), l, blocks);
    if (ldle32(h + 28) != 0)
        return corrupt(errp, ck->what, "reserved header field is %" PRIu32
                       "; expected 0", ldle32(h + 28));
    uint64_t body = file_size - TREE_HEADER - TREE_TRAILER;
    if (body % TREE_RECORD)
        return corrupt(errp, ck->what, "it is %" PRIu64 " bytes: not a "
                       "header, whole %u-byte records and a trailer",
                       file_size, TREE_RECORD);
    info->blocks = blocks;
    info->levels = l;
    memcpy(info->parent_root, h + 32, 32);
    info->nrec = body / TREE_RECORD;
    ck->seen = 0;
    ck->last_level = -1;
    for (unsigned k = 0; k <= l + 1; k++)
        info->level_first[k] = info->nrec;
    return 0;
}

static int check_record(struct tree_check *ck, const uint8_t *r,
                        struct cbt_error **errp)
{
    struct tree_file_info *info = ck->info;
    unsigned k = r[0];
    uint64_t i = ldle64(r + 1);
    if (k > info->levels)
        return corrupt(errp, ck->what, "record %" PRIu64 " is at level %u; "
                       "the tree has %u", ck->seen, k, info->levels);
    if (i >= ck->count[k])
        return corrupt(errp, ck->what, "record %" PRIu64 " is node %" PRIu64
                       " of level %u, which has %" PRIu64, ck->seen, i, k,
                       ck->count[k]);
    if ((int)k < ck->last_level ||
        ((int)k == ck->last_level && i <= ck->last_index))
        return corrupt(errp, ck->what, "record %" PRIu64 " (level %u, node %"
                       PRIu64 ") is out of order", ck->seen, k, i);
    if ((int)k != ck->last_level)
        for (int j = ck->last_level + 1; j <= (int)k; j++)
            info->level_first[j] = ck->seen;
    ck->last_level = (int)k;
    ck->last_index = i;
    ck->seen++;
    return 0;
}

static int check_trailer(struct tree_check *ck, const uint8_t *t,
                         const uint8_t *root_record, struct cbt_error **errp)
{
    struct tree_file_info *info = ck->info;
    if (memcmp(t, tree_end_magic, 8) != 0)
        return corrupt(errp, ck->what, "no CBTTEND2 magic at its end");
    if (ldle64(t + 8) != info->nrec)
        return corrupt(errp, ck->what, "its trailer counts %" PRIu64
                       " records; it holds %" PRIu64, ldle64(t + 8),
                       info->nrec);
    memcpy(info->root, t + 16, 32);
    if (root_record && memcmp(root_record, info->root, 32) != 0)
        return corrupt(errp, ck->what, "its root record and its trailer's "
                       "root differ");
    for (int j = ck->last_level + 1; j <= (int)info->levels + 1; j++)
        info->level_first[j] = info->nrec;
    return 0;
}

int tree_file_parse(const uint8_t *buf, size_t len, uint64_t blocks,
                    const char *what, struct tree_file_info *info,
                    struct cbt_error **errp)
{
    struct tree_check ck = {.what = what, .info = info};
    memset(info, 0, sizeof(*info));
    if (len < TREE_HEADER)
        return corrupt(errp, what, "it is %zu bytes, shorter than a header "
                       "and a trailer (%u)", len, TREE_HEADER + TREE_TRAILER);
    if (check_header(&ck, buf, len, blocks, errp) < 0)
        return -1;
    const uint8_t *root_record = NULL;
    for (uint64_t r = 0; r < info->nrec; r++) {
        const uint8_t *p = buf + TREE_HEADER + r * TREE_RECORD;
        if (check_record(&ck, p, errp) < 0)
            return -1;
        if (p[0] == info->levels)
            root_record = p + 9;
    }
    return check_trailer(&ck, buf + len - TREE_TRAILER, root_record, errp);
}

int tree_file_open(struct tree_file *f, const char *path, uint64_t blocks,
                   char sha_hex[65], struct cbt_error **errp)
{
    memset(f, 0, sizeof(*f));
    f->fd = -1;
    uint64_t size;
    int fd = bfile_open_read(path, "tree record file", &size, errp);
    if (fd < 0)
        return -1;
    f->fd = fd;
    f->path = strdup(path);
    enum { CHUNK = (int)(TREE_RECORD * 25600) }; /* about 1 MiB */
    uint8_t *buf = malloc(CHUNK);
    if (!f->path || !buf) {
        free(buf);
        tree_file_close(f);
        cbt_error_set(errp, ENOMEM, "%s: out of memory", path);
        return -1;
    }
    struct tree_check ck = {.what = path, .info = &f->info};
    struct sha256_ctx sha;
    sha256_init(&sha);
    uint8_t hdr[TREE_HEADER], trl[TREE_TRAILER], rootrec[32];
    bool have_root = false;
    int r = size >= TREE_HEADER ? file_pread_exact(fd, hdr, TREE_HEADER, 0)
                                : 0;
    if (r < 0)
        goto ioerr;
    if (size < TREE_HEADER) {
        corrupt(errp, path, "it is %" PRIu64 " bytes, shorter than a header "
                "and a trailer (%u)", size, TREE_HEADER + TREE_TRAILER);
        goto fail;
    }
    if (check_header(&ck, hdr, size, blocks, errp) < 0)
        goto fail;
    sha256_update(&sha, hdr, TREE_HEADER);
    /* Exactly the size checked: a file that grows meanwhile is not read
     * further. */
    for (uint64_t rec = 0; rec < f->info.nrec;) {
        uint64_t n = MIN(f->info.nrec - rec, (uint64_t)(CHUNK / TREE_RECORD));
        r = file_pread_exact(fd, buf, (size_t)(n * TREE_RECORD),
                             TREE_HEADER + rec * TREE_RECORD);
        if (r < 0)
            goto ioerr;
        sha256_update(&sha, buf, (size_t)(n * TREE_RECORD));
        for (uint64_t j = 0; j < n; j++) {
            const uint8_t *p = buf + j * TREE_RECORD;
            if (check_record(&ck, p, errp) < 0)
                goto fail;
            if (p[0] == f->info.levels) {
                memcpy(rootrec, p + 9, 32);
                have_root = true;
            }
        }
        rec += n;
    }
    r = file_pread_exact(fd, trl, TREE_TRAILER, size - TREE_TRAILER);
    if (r < 0)
        goto ioerr;
    if (check_trailer(&ck, trl, have_root ? rootrec : NULL, errp) < 0)
        goto fail;
    sha256_update(&sha, trl, TREE_TRAILER);
    if (sha_hex) {
        uint8_t d[32];
        sha256_final(&sha, d);
        sha256_hex(d, sha_hex);
    }
    free(buf);
    return 0;
ioerr:
    cbt_error_set(errp, -r, "%s: cannot read the tree record file: %s", path,
                  strerror(-r));
fail:
    free(buf);
    tree_file_close(f);
    return -1;
}

int tree_file_quick_check(const char *path, uint64_t blocks,
                          struct cbt_error **errp)
{
    uint64_t size;
    int fd = bfile_open_read(path, "tree record file", &size, errp);
    if (fd < 0)
        return -1;
    uint8_t h[TREE_HEADER];
    int r = size >= TREE_HEADER ? file_pread_exact(fd, h, TREE_HEADER, 0) : 0;
    close(fd);
    if (r < 0) {
        cbt_error_set(errp, -r, "%s: cannot read the tree record file: %s",
                      path, strerror(-r));
        return -1;
    }
    struct tree_file_info info;
    struct tree_check ck = {.what = path, .info = &info};
    if (size < TREE_HEADER)
        return corrupt(errp, path, "it is %" PRIu64 " bytes, shorter than a "
                       "header and a trailer (%u)", size,
                       TREE_HEADER + TREE_TRAILER);
    return check_header(&ck, h, size, blocks, errp);
}

void tree_file_close(struct tree_file *f)
{
    if (f->fd >= 0)
        close(f->fd);
    free(f->path);
    memset(f, 0, sizeof(*f));
    f->fd = -1;
}

int tree_file_record(struct tree_file *f, uint64_t r, unsigned *level,
                     uint64_t *index, uint8_t digest[32])
{
    uint8_t b[TREE_RECORD];
    if (r >= f->info.nrec)
        return -EINVAL;
    int e = file_pread_exact(f->fd, b, TREE_RECORD,
                             TREE_HEADER + r * TREE_RECORD);
    if (e < 0)
        return e;
    *level = b[0];
    *index = ldle64(b + 1);
    if (digest)
        memcpy(digest, b + 9, 32);
    return 0;
}

/* ---- writing ---- */

int tree_writer_open(struct tree_writer *tw, const char *path,
                     const struct tree_shape *s,
                     const uint8_t parent_root[32], struct cbt_error **errp)
{
    memset(tw, 0, sizeof(*tw));
    if (hashes_writer_open(&tw->w, path, errp) < 0)
        return -1;
    tw->levels = s->levels;
    tw->last_level = -1;
    uint8_t h[TREE_HEADER] = {0};
    memcpy(h, tree_magic, 8);
    stle32(h + 8, BLOCKHASH_BLOCK);
    stle32(h + 12, TREE_FANOUT);
    stle64(h + 16, s->blocks);
    stle32(h + 24, s->levels);
    if (parent_root)
        memcpy(h + 32, parent_root, 32);
    int r = hashes_writer_bytes(&tw->w, h, sizeof(h));
    if (r < 0) {
        cbt_error_set(errp, -r, "%s: cannot write it: %s", path,
                      strerror(-r));
        tree_writer_abort(tw);
        return -1;
    }
    return 0;
}

static void put_record(uint8_t *p, unsigned k, uint64_t i,
                       const uint8_t d[32])
{
    p[0] = (uint8_t)k;
    stle64(p + 1, i);
    memcpy(p + 9, d, 32);
}

int tree_writer_record(struct tree_writer *tw, unsigned k, uint64_t i,
                       const uint8_t d[32])
{
    if (k > tw->levels)
        return -EINVAL;
    uint8_t rec[TREE_RECORD];
    put_record(rec, k, i, d);
    if (k == 0) {
        if (tw->last_level == 0 && i <= tw->last_index)
            return -EINVAL;
        tw->last_level = 0;
        tw->last_index = i;
        tw->nrec++;
        return hashes_writer_bytes(&tw->w, rec, TREE_RECORD);
    }
    size_t n = tw->upn[k];
    if (n && ldle64(tw->up[k] + (n - 1) * TREE_RECORD + 1) >= i)
        return -EINVAL;
    if (n == tw->upcap[k]) {
        size_t cap = tw->upcap[k] ? tw->upcap[k] * 2 : 256;
        uint8_t *p = realloc(tw->up[k], cap * TREE_RECORD);
        if (!p)
            return -ENOMEM;
        tw->up[k] = p;
        tw->upcap[k] = cap;
    }
    memcpy(tw->up[k] + n * TREE_RECORD, rec, TREE_RECORD);
    tw->upn[k]++;
    return 0;
}

int tree_writer_finish(struct tree_writer *tw, const uint8_t root[32],
                       char sha_hex[65], struct cbt_error **errp)
{
    int r = 0;
    for (unsigned k = 1; k <= tw->levels && r == 0; k++) {
        if (tw->upn[k])
            r = hashes_writer_bytes(&tw->w, tw->up[k],
                                    tw->upn[k] * TREE_RECORD);
        tw->nrec += tw->upn[k];
    }
    uint8_t t[TREE_TRAILER];
    memcpy(t, tree_end_magic, 8);
    stle64(t + 8, tw->nrec);
    memcpy(t + 16, root, 32);
    if (r == 0)
        r = hashes_writer_bytes(&tw->w, t, sizeof(t));
    if (r < 0) {
        cbt_error_set(errp, -r, "%s: cannot write it: %s", tw->w.path,
                      strerror(-r));
        return -1;
    }
    return hashes_writer_finish(&tw->w, sha_hex, errp);
}

void tree_writer_abort(struct tree_writer *tw)
{
    hashes_writer_abort(&tw->w);
    for (unsigned k = 0; k <= TREE_MAX_LEVELS; k++)
        free(tw->up[k]);
    memset(tw, 0, sizeof(*tw));
    tw->w.fd = -1;
}

/* ---- cursors and the view ---- */

static void cursor_init(struct tree_cursor *c, struct tree_file *f,
                        unsigned k)
{
    memset(c, 0, sizeof(*c));
    c->f = f;
    if (k <= f->info.levels) {
        c->first = f->info.level_first[k];
        c->end = f->info.level_first[k + 1];
    } else {
        c->first = c->end = f->info.nrec;
    }
    c->pos = c->first;
}

/* Index of record r (in the cursor's level), read from the file.  */
static int cursor_index_at(struct tree_cursor *c, uint64_t r, uint64_t *index)
{
    if (r >= c->bfirst && r < c->bfirst + c->bn) {
        *index = ldle64(c->buf + (r - c->bfirst) * TREE_RECORD + 1);
        return 0;
    }
    uint8_t b[9];
    int e = file_pread_exact(c->f->fd, b, 9, TREE_HEADER + r * TREE_RECORD);
    if (e < 0)
        return e;
    *index = ldle64(b + 1);
    return 0;
}

/* The record at c->pos: 1 with its index and digest, 0 at the level's
 * end, or -errno. */
static int cursor_peek(struct tree_cursor *c, unsigned k, uint64_t *index,
                       const uint8_t **digest)
{
    if (c->pos >= c->end)
        return 0;
    if (c->pos < c->bfirst || c->pos >= c->bfirst + c->bn) {
        if (!c->buf) {
            c->buf = malloc(CURSOR_RECORDS * TREE_RECORD);
            if (!c->buf)
                return -ENOMEM;
        }
        uint64_t n = MIN(c->end - c->pos, (uint64_t)CURSOR_RECORDS);
        int e = file_pread_exact(c->f->fd, c->buf, (size_t)(n * TREE_RECORD),
                                 TREE_HEADER + c->pos * TREE_RECORD);
        if (e < 0) {
            c->bn = 0;
            return e;
        }
        c->bfirst = c->pos;
        c->bn = n;
    }
    const uint8_t *p = c->buf + (c->pos - c->bfirst) * TREE_RECORD;
    /* Checked at open; a file changed since is an I/O error, not a
     * reason to look outside the tree. */
    if (p[0] != k)
        return -EIO;
    *index = ldle64(p + 1);
    *digest = p + 9;
    return 1;
}

/* Move to the first record of the level with index >= want: a step
 * forward within the buffer when it holds it, the next buffer's records
 * when a scan has just used up this one, else a binary search. */
static int cursor_seek(struct tree_cursor *c, unsigned k, uint64_t want)
{
    uint64_t idx;
    const uint8_t *d;
    if (c->first == c->end)
        return 0;
    if (!c->have_last) {
        int e = cursor_index_at(c, c->end - 1, &c->last);
        if (e < 0)
            return e;
        c->have_last = true;
    }
    if (want > c->last) {
        c->pos = c->end;
        return 0;
    }
    /* Forward from pos while the buffer holds it (or pos is just past its
     * end, where a scan in order leaves it): within the buffer, and on
     * into the records after it once when everything up to its end is
     * below want.  A scan then reads each record once, not the level's
     * every 2^n-th one at each buffer's end.  below: every record before
     * pos is known to be below want. */
    bool below = false;
    for (int step = 0; step < 2 && c->bn && c->pos < c->end &&
                       c->pos >= c->bfirst && c->pos <= c->bfirst + c->bn;
         step++) {
        uint64_t last;
        int e = cursor_index_at(c, c->bfirst + c->bn - 1, &last);
        if (e < 0)
            return e;
        if (c->pos < c->bfirst + c->bn) {
            e = cursor_index_at(c, c->pos, &idx);
            if (e < 0)
                return e;
            if (idx >= want) {
                uint64_t prev = 0;
                if (below || c->pos == c->first)
                    return 0;
                e = cursor_index_at(c, c->pos - 1, &prev);
                if (e < 0)
                    return e;
                if (prev < want)
                    return 0;
                break; /* want is behind pos */
            }
        }
        if (last >= want) {
            if (c->pos == c->bfirst + c->bn)
                break; /* behind pos too */
            for (;;) {
                e = cursor_peek(c, k, &idx, &d);
                if (e <= 0)
                    return e;
                if (idx >= want)
                    return 0;
                c->pos++;
            }
        }
        /* Everything up to the buffer's end is below want; the level goes
         * on past it (want <= the level's last index). */
        c->pos = c->bfirst + c->bn;
        below = true;
        e = cursor_peek(c, k, &idx, &d);
        if (e < 0)
            return e;
    }
    uint64_t lo = c->first, hi = c->end;
    while (lo < hi) {
        uint64_t mid = lo + (hi - lo) / 2;
        int e = cursor_index_at(c, mid, &idx);
        if (e < 0)
            return e;
        if (idx < want)
            lo = mid + 1;
        else
            hi = mid;
    }
    c->pos = lo;
    return 0;
}

int tree_view_open(struct tree_view *v, uint64_t size,
                   struct tree_file **files, size_t nfiles)
{
    memset(v, 0, sizeof(*v));
    int r = tree_shape_init(&v->shape, size);
    if (r < 0)
        return r;
    v->files = files;
    v->nfiles = nfiles;
    if (nfiles) {
        v->cur = calloc((size_t)(v->shape.levels + 1) * nfiles,
                        sizeof(*v->cur));
        if (!v->cur)
            return -ENOMEM;
        for (unsigned k = 0; k <= v->shape.levels; k++)
            for (size_t j = 0; j < nfiles; j++)
                cursor_init(&v->cur[k * nfiles + j], files[j], k);
    }
    return 0;
}

void tree_view_close(struct tree_view *v)
{
    if (v->cur)
        for (size_t j = 0; j < (size_t)(v->shape.levels + 1) * v->nfiles; j++)
            free(v->cur[j].buf);
    free(v->cur);
    memset(v, 0, sizeof(*v));
}

int tree_view_get(struct tree_view *v, unsigned k, uint64_t first,
                  uint64_t count, uint8_t *out, int *src)
{
    int tmp[TREE_FANOUT];
    if (k > v->shape.levels || count > TREE_FANOUT ||
        first > v->shape.count[k] || count > v->shape.count[k] - first)
        return -EINVAL;
    if (!src)
        src = tmp;
    for (uint64_t j = 0; j < count; j++) {
        tree_zero(&v->shape, k, first + j, out + j * 32);
        src[j] = -1;
    }
    for (size_t f = 0; f < v->nfiles && count; f++) {
        struct tree_cursor *c = &v->cur[k * v->nfiles + f];
        int e = cursor_seek(c, k, first);
        if (e < 0)
            return e;
        for (;;) {
            uint64_t idx;
            const uint8_t *d;
            e = cursor_peek(c, k, &idx, &d);
            if (e < 0)
                return e;
            if (e == 0 || idx >= first + count)
                break;
            if (idx >= first && src[idx - first] < 0) {
                memcpy(out + (idx - first) * 32, d, 32);
                src[idx - first] = (int)f;
            }
            c->pos++;
        }
    }
    return 0;
}

int tree_view_next(struct tree_view *v, unsigned k, uint64_t from,
                   uint64_t *index, uint8_t digest[32], int *src)
{
    if (k > v->shape.levels)
        return 0;
    int best = -1;
    uint64_t best_idx = 0;
    for (size_t f = 0; f < v->nfiles; f++) {
        struct tree_cursor *c = &v->cur[k * v->nfiles + f];
        int e = cursor_seek(c, k, from);
        if (e < 0)
            return e;
        uint64_t idx;
        const uint8_t *d;
        e = cursor_peek(c, k, &idx, &d);
        if (e < 0)
            return e;
        /* Records of an older, larger shape past this view's end are not
         * part of it. */
        if (e == 0 || idx >= v->shape.count[k])
            continue;
        if (best < 0 || idx < best_idx) {
            best = (int)f;
            best_idx = idx;
            memcpy(digest, d, 32);
        }
    }
    if (best < 0)
        return 0;
    *index = best_idx;
    if (src)
        *src = best;
    return 1;
}

/* ---- building ---- */

int tree_builder_init(struct tree_builder *b, const struct tree_shape *s,
                      struct tree_view *base, tree_node_fn *record,
                      tree_node_fn *computed, void *opaque)
{
    memset(b, 0, sizeof(*b));
    b->s = s;
    b->base = base;
    b->record = record;
    b->computed = computed;
    b->opaque = opaque;
    for (unsigned k = 1; k <= s->levels; k++) {
        b->acc[k].child = malloc(TREE_FANOUT * 32);
        if (!b->acc[k].child) {
            tree_builder_free(b);
            return -ENOMEM;
        }
    }
    return 0;
}

void tree_builder_free(struct tree_builder *b)
{
    for (unsigned k = 0; k <= TREE_MAX_LEVELS; k++)
        free(b->acc[k].child);
    memset(b, 0, sizeof(*b));
}

/* The base's nodes (k, first .. first + n - 1). */
static int base_get(struct tree_builder *b, unsigned k, uint64_t first,
                    size_t n, uint8_t *out)
{
    if (b->base)
        return tree_view_get(b->base, k, first, n, out, NULL);
    for (size_t j = 0; j < n; j++)
        tree_zero(b->s, k, first + j, out + j * 32);
    return 0;
}

static int feed(struct tree_builder *b, unsigned k, uint64_t child,
                const uint8_t *d);

static int finish_node(struct tree_builder *b, unsigned k)
{
    struct tree_level_acc *a = &b->acc[k];
    uint8_t d[32], old[32];
    tree_node_digest(k, a->child, a->n, d);
    a->active = false;
    int r = base_get(b, k, a->node, 1, old);
    if (r == 0 && memcmp(d, old, 32) != 0 && b->record)
        r = b->record(b->opaque, k, a->node, d);
    if (r == 0 && b->computed)
        r = b->computed(b->opaque, k, a->node, d);
    if (r < 0)
        return r;
    if (k == b->s->levels) {
        memcpy(b->root, d, 32);
        b->have_root = true;
        return 0;
    }
    return feed(b, k + 1, a->node, d);
}

/* Make node (k, child / F) the one level k gathers, finishing the one
 * before it. */
static int start_node(struct tree_builder *b, unsigned k, uint64_t child)
{
    struct tree_level_acc *a = &b->acc[k];
    uint64_t node = child / TREE_FANOUT;
    if (a->active && a->node == node)
        return 0;
    if (a->active && node < a->node)
        return -EINVAL;
    if (a->active) {
        int r = finish_node(b, k);
        if (r < 0)
            return r;
    }
    uint64_t first;
    tree_children(b->s, k, node, &first, &a->n);
    a->node = node;
    a->active = true;
    return base_get(b, k - 1, first, a->n, a->child);
}

/* Child `child` of level k - 1 has the new digest d (NULL: its base
 * value, only its parent is recomputed). */
static int feed(struct tree_builder *b, unsigned k, uint64_t child,
                const uint8_t *d)
{
    int r = start_node(b, k, child);
    if (r < 0 || !d)
        return r;
    memcpy(b->acc[k].child + (child % TREE_FANOUT) * 32, d, 32);
    return 0;
}

int tree_builder_leaf(struct tree_builder *b, uint64_t i, const uint8_t *d)
{
    if (i >= b->s->blocks || (b->any && i < b->next_leaf))
        return -EINVAL;
    b->any = true;
    b->next_leaf = i + 1;
    int r = start_node(b, 1, i);
    if (r < 0 || !d)
        return r;
    uint8_t *slot = b->acc[1].child + (i % TREE_FANOUT) * 32;
    if (memcmp(slot, d, 32) == 0)
        return 0;
    memcpy(slot, d, 32);
    return b->record ? b->record(b->opaque, 0, i, d) : 0;
}

int tree_builder_finish(struct tree_builder *b, uint8_t root[32])
{
    for (unsigned k = 1; k <= b->s->levels; k++) {
        if (b->acc[k].active) {
            int r = finish_node(b, k);
            if (r < 0)
                return r;
        }
    }
    if (!b->have_root) {
        int r = base_get(b, b->s->levels, 0, 1, b->root);
        if (r < 0)
            return r;
        b->have_root = true;
    }
    memcpy(root, b->root, 32);
    return 0;
}

/* ---- checking a view ---- */

struct check_ctx {
    struct tree_view *v;
    struct cbt_error **errp;
    bool failed;
};

static int bad_node(struct check_ctx *c, int src, unsigned k, uint64_t i,
                    const char *why)
{
    const char *file = c->v->nfiles ? c->v->files[src < 0 ? 0 : src]->path
                                    : "(no record file)";
    corrupt(c->errp, file, "node %" PRIu64 " of level %u %s", i, k, why);
    c->failed = true;
    return -1;
}

/* A node computed from the view's leaves must be what the view says. */
static int check_computed(void *opaque, unsigned k, uint64_t i,
                          const uint8_t d[32])
{
    struct check_ctx *c = opaque;
    uint8_t have[32];
    int src;
    int r = tree_view_get(c->v, k, i, 1, have, &src);
    if (r < 0)
        return r;
    if (memcmp(have, d, 32) != 0)
        return bad_node(c, src, k, i, src < 0
                            ? "has no record; its leaves say it is not zeroes"
                            : "is not the digest of the leaves below it");
    return 0;
}

int tree_view_check(struct tree_view *v, const uint8_t root[32],
                    struct cbt_error **errp)
{
    const struct tree_shape *s = &v->shape;
    struct check_ctx c = {.v = v, .errp = errp};
    struct tree_builder b;
    uint8_t got[32], d[32];
    CLEANUP_FREE uint8_t *kids = malloc(TREE_FANOUT * 32);
    int r = kids ? tree_builder_init(&b, s, NULL, NULL, check_computed, &c)
                 : -ENOMEM;
    if (r < 0)
        goto err;
    /* The leaves the view records, in order (the newest file's on a tie),
     * against the all-zeroes tree: every node above one is computed. */
    uint64_t from = 0, idx;
    int src;
    for (;;) {
        r = tree_view_next(v, 0, from, &idx, d, &src);
        if (r <= 0)
            break;
        r = tree_builder_leaf(&b, idx, d);
        if (r < 0)
            break;
        from = idx + 1;
    }
    if (r == 0)
        r = tree_builder_finish(&b, got);
    tree_builder_free(&b);
    if (c.failed)
        return -1;
    if (r < 0)
        goto err;
    if (memcmp(got, root, 32) != 0)
        return corrupt(errp, v->nfiles ? v->files[0]->path : "(no file)",
                       "its records and its parents' do not recompute the "
                       "root its manifest gives");
    /* Every recorded node (the ones above no leaf record included) is the
     * digest of its children in the view. */
    for (unsigned k = 1; k <= s->levels; k++) {
        for (from = 0;;) {
            r = tree_view_next(v, k, from, &idx, d, &src);
            if (r < 0)
                goto err;
            if (r == 0)
                break;
            uint64_t first;
            size_t n;
            tree_children(s, k, idx, &first, &n);
            r = tree_view_get(v, k - 1, first, n, kids, NULL);
            if (r < 0)
                goto err;
            tree_node_digest(k, kids, n, got);
            if (memcmp(got, d, 32) != 0) {
                bad_node(&c, src, k, idx,
                         "is not the digest of its children");
                return -1;
            }
            from = idx + 1;
        }
    }
    return 0;
err:
    cbt_error_set(errp, -r, "%s: cannot read the tree records: %s",
                  v->nfiles ? v->files[0]->path : "(no file)", strerror(-r));
    return -1;
}

/* ---- merging (prune) ---- */

/*
 * Level k of the merge: repeatedly the smallest index any file has left,
 * the newest file's record for it (files[0] first) written unless
 * on_zeroes drops it for being the all-zero node, and every file moved
 * past it.  at[j]: cursor j's next index (UINT64_MAX: none), from its one
 * peek per step.  0 or -errno.
 */
static int merge_level(const struct tree_shape *s, unsigned k,
                       struct tree_cursor *cur, uint64_t *at, size_t n,
                       bool on_zeroes, struct tree_writer *tw)
{
    for (;;) {
        size_t best = n;
        uint64_t bi = 0;
        const uint8_t *bd = NULL;
        for (size_t j = 0; j < n; j++) {
            uint64_t idx;
            const uint8_t *d;
            int e = cursor_peek(&cur[j], k, &idx, &d);
            if (e < 0)
                return e;
            at[j] = e > 0 ? idx : UINT64_MAX;
            if (e > 0 && idx < s->count[k] && (best == n || idx < bi)) {
                best = j;
                bi = idx;
                bd = d;
            }
        }
        if (best == n)
            return 0;
        uint8_t z[32];
        tree_zero(s, k, bi, z);
        if (!on_zeroes || memcmp(bd, z, 32) != 0) {
            int e = tree_writer_record(tw, k, bi, bd);
            if (e < 0)
                return e;
        }
        for (size_t j = 0; j < n; j++)
            if (at[j] == bi)
                cur[j].pos++;
    }
}

int tree_merge(struct tree_file **files, size_t n, uint64_t size,
               bool on_zeroes, const uint8_t parent_root[32],
               const char *out_path, char sha_hex[65],
               struct cbt_error **errp)
{
    struct tree_shape s;
    if (n == 0 || tree_shape_init(&s, size) < 0 ||
        s.blocks != files[0]->info.blocks) {
        cbt_error_set(errp, EINVAL, "%s: its size does not match %" PRIu64
                      " bytes", n ? files[0]->path : out_path, size);
        return -1;
    }
    struct tree_writer tw;
    if (tree_writer_open(&tw, out_path, &s, parent_root, errp) < 0)
        return -1;
    struct tree_cursor *cur = calloc(n, sizeof(*cur));
    uint64_t *at = calloc(n, sizeof(*at));
    int r = cur && at ? 0 : -ENOMEM;
    for (unsigned k = 0; k <= s.levels && r == 0; k++) {
        for (size_t j = 0; j < n; j++)
            cursor_init(&cur[j], files[j], k);
        r = merge_level(&s, k, cur, at, n, on_zeroes, &tw);
        for (size_t j = 0; j < n; j++) {
            free(cur[j].buf);
            cur[j].buf = NULL;
        }
    }
    free(cur);
    free(at);
    if (r < 0) {
        cbt_error_set(errp, -r, "%s: cannot merge %s into it: %s", out_path,
                      files[n - 1]->path, strerror(-r));
        tree_writer_abort(&tw);
        return -1;
    }
    r = tree_writer_finish(&tw, files[0]->info.root, sha_hex, errp);
    tree_writer_abort(&tw);
    return r;
}
