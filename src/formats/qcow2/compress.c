/*
 * qcow2 compressed clusters: read the stored bytes and inflate them (zlib
 * raw deflate, or zstd), refusing output that does not fill the cluster;
 * and write a cluster compressed.
 *
 * Writing: the cluster (a short tail cluster zero-padded) is deflated into
 * at most cluster_size - 1 bytes, QEMU's rule; what does not fit is written
 * as a normal cluster.  The bytes go to a byte-granular place from
 * qcow2_alloc_bytes (several compressed clusters share host clusters; each
 * host cluster the bytes touch holds one reference for this cluster), are
 * written at once, and only then does the L2 entry change in the cache, so
 * the flush order (refcounts, then L2) keeps it from ever pointing at
 * unwritten bytes.  Unlike QEMU, which refuses with EIO, a guest cluster
 * already allocated in this layer is overwritten: its old allocation is
 * released with the usual deferred free (a normal cluster loses one
 * reference, so one shared with an internal snapshot survives; a
 * compressed one drops one reference on each host cluster it touches).
 */
#include <pthread.h>
#include <zlib.h>
#include <zstd.h>
#include <zstd_errors.h>

#include "qcow2.h"

/*
 * One zstd context of each kind per thread, kept for the thread's life:
 * making one per cluster cost a workspace allocation and its set-up for
 * every 64 KiB (a backup's worker threads compress thousands).  Freed by
 * the key's destructor when the thread ends; the main thread's at exit
 * stays reachable through the key (not a leak).
 */
static pthread_key_t cctx_key, dctx_key;
static pthread_once_t zstd_keys_once = PTHREAD_ONCE_INIT;
static bool zstd_keys_ok;

static void *make_cctx(void) { return ZSTD_createCCtx(); }
static void *make_dctx(void) { return ZSTD_createDCtx(); }
static void free_cctx(void *p) { ZSTD_freeCCtx(p); }
static void free_dctx(void *p) { ZSTD_freeDCtx(p); }

static void make_zstd_keys(void)
{
    zstd_keys_ok = pthread_key_create(&cctx_key, free_cctx) == 0 &&
                   pthread_key_create(&dctx_key, free_dctx) == 0;
}

/* This thread's context under key (made by make on first use), or NULL
 * (out of memory). */
static void *thread_ctx(pthread_key_t *key, void *(*make)(void),
                        void (*drop)(void *))
{
    pthread_once(&zstd_keys_once, make_zstd_keys);
    if (!zstd_keys_ok)
        return NULL;
    void *c = pthread_getspecific(*key);
    if (!c && (c = make()) && pthread_setspecific(*key, c)) {
        drop(c);
        c = NULL;
    }
    return c;
}

static ZSTD_CCtx *thread_cctx(void)
{
    return thread_ctx(&cctx_key, make_cctx, free_cctx);
}

/* Reset for a new frame. */
static ZSTD_DCtx *thread_dctx(void)
{
    ZSTD_DCtx *d = thread_ctx(&dctx_key, make_dctx, free_dctx);
    if (d && ZSTD_isError(ZSTD_DCtx_reset(d, ZSTD_reset_session_only)))
        d = NULL;
    return d;
}

static int inflate_zlib(const uint8_t *in, size_t in_len, uint8_t *out,
                        size_t out_len)
{
    z_stream z;
    memset(&z, 0, sizeof(z));
    if (inflateInit2(&z, -12) != Z_OK) /* raw deflate, 4 KiB window */
        return -ENOMEM;
    z.next_in = (Bytef *)in;
    z.avail_in = (uInt)in_len;
    z.next_out = out;
    z.avail_out = (uInt)out_len;
    int r = inflate(&z, Z_FINISH);
    /* QEMU accepts a full output buffer even without the stream end (the
     * compressed span is rounded to sectors, so trailing bytes are junk). */
    bool ok = (r == Z_STREAM_END || r == Z_BUF_ERROR || r == Z_OK) &&
              z.avail_out == 0;
    inflateEnd(&z);
    return ok ? 0 : -EIO;
}

static int inflate_zstd(const uint8_t *in, size_t in_len, uint8_t *out,
                        size_t out_len)
{
    ZSTD_DCtx *dctx = thread_dctx();
    if (!dctx)
        return -ENOMEM;
    ZSTD_inBuffer ib = { in, in_len, 0 };
    ZSTD_outBuffer ob = { out, out_len, 0 };
    int ret = 0;
    /* Streaming, as QEMU writes it: stop once the cluster is full. */
    while (ob.pos < ob.size) {
        size_t r = ZSTD_decompressStream(dctx, &ob, &ib);
        if (ZSTD_isError(r)) {
            ret = -EIO;
            break;
        }
        if (ib.pos == ib.size && ob.pos < ob.size && r != 0) {
            ret = -EIO; /* input exhausted before the cluster is full */
            break;
        }
        if (r == 0 && ob.pos < ob.size) {
            ret = -EIO; /* frame ended early */
            break;
        }
    }
    return ret;
}

int qcow2_decompress(const struct qcow2_state *s, const uint8_t *in,
                     size_t in_len, uint8_t *out, size_t out_len)
{
    if (s->h.compression_type == QCOW2_COMPRESSION_ZSTD)
        return inflate_zstd(in, in_len, out, out_len);
    return inflate_zlib(in, in_len, out, out_len);
}

int qcow2_read_compressed(struct qcow2_state *s, uint64_t l2e, uint8_t *out)
{
    uint64_t off, len;
    qcow2_compressed_span(s, l2e, &off, &len);
    /* The span is bounded by the descriptor: at most cluster_size * 2. */
    if (len > 2 * s->cluster_size + 512)
        return -EIO;
    CLEANUP_FREE uint8_t *in = malloc(len);
    if (!in)
        return -ENOMEM;
    int r = file_pread_full(s->node->fd, in, len, off);
    if (r < 0)
        return r;
    return qcow2_decompress(s, in, len, out, s->cluster_size);
}

/* Deflate with QEMU's parameters (raw stream, 4 KiB window).  Returns the
 * compressed length, -ENOSPC when it does not fit in out_cap bytes. */
static int64_t deflate_zlib(const uint8_t *in, size_t in_len, uint8_t *out,
                            size_t out_cap)
{
    z_stream z;
    memset(&z, 0, sizeof(z));
    if (deflateInit2(&z, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9,
                     Z_DEFAULT_STRATEGY) != Z_OK)
        return -ENOMEM;
    z.next_in = (Bytef *)in;
    z.avail_in = (uInt)in_len;
    z.next_out = out;
    z.avail_out = (uInt)out_cap;
    int r = deflate(&z, Z_FINISH);
    int64_t ret = r == Z_STREAM_END ? (int64_t)(out_cap - z.avail_out)
                  : r == Z_OK || r == Z_BUF_ERROR ? -ENOSPC
                                                  : -EIO;
    deflateEnd(&z);
    return ret;
}

static int64_t deflate_zstd(const uint8_t *in, size_t in_len, uint8_t *out,
                            size_t out_cap)
{
    ZSTD_CCtx *cctx = thread_cctx();
    if (!cctx)
        return -ENOMEM;
    size_t r = ZSTD_compressCCtx(cctx, out, out_cap, in, in_len,
                                 ZSTD_CLEVEL_DEFAULT);
    if (!ZSTD_isError(r))
        return (int64_t)r;
    return ZSTD_getErrorCode(r) == ZSTD_error_dstSize_tooSmall ? -ENOSPC
                                                               : -EIO;
}

int64_t qcow2_compress(const struct qcow2_state *s, const uint8_t *in,
                       size_t in_len, uint8_t *out, size_t out_cap)
{
    if (s->h.compression_type == QCOW2_COMPRESSION_ZSTD)
        return deflate_zstd(in, in_len, out, out_cap);
    return deflate_zlib(in, in_len, out, out_cap);
}

/* The compressed descriptor for `len` bytes at host offset `host`. */
static uint64_t compressed_descriptor(const struct qcow2_state *s,
                                      uint64_t host, uint64_t len)
{
    uint64_t extra = ((host + len - 1) >> 9) - (host >> 9);
    return QCOW2_OFLAG_COMPRESSED | (extra << s->csize_shift) | host;
}

/* One cluster (a short tail cluster zero-padded) compressed into at most
 * cap bytes (at most cluster_size - 1): its length, 0 when it does not
 * shrink that far, or -errno.  Reads only what is fixed while the image is
 * open (compression type, cluster size): callable without node->lock. */
static int64_t compress_cluster(const struct qcow2_state *s, const void *buf,
                                size_t len, uint8_t *out, size_t cap)
{
    uint64_t cs = s->cluster_size;
    const uint8_t *src = buf;
    CLEANUP_FREE uint8_t *padded = NULL;
    if (len < cs) {
        if (!(padded = calloc(1, cs)))
            return -ENOMEM;
        memcpy(padded, buf, len);
        src = padded;
    }
    int64_t clen = qcow2_compress(s, src, cs, out, MIN(cap, cs - 1));
    return clen == -ENOSPC ? 0 : clen;
}

int64_t qcow2_compress_cluster(struct blk_node *node, const void *buf,
                               size_t len, void *out, size_t cap)
{
    struct qcow2_state *s = qcow2_state(node);
    if (qcow2_has_data_file(s))
        return -ENOTSUP;
    if (len == 0 || len > s->cluster_size)
        return -EINVAL;
    return compress_cluster(s, buf, len, out, cap);
}

int qcow2_write_compressed(struct blk_node *node, const void *buf,
                           uint64_t off, size_t len, const void *cbuf,
                           size_t cbuf_len)
{
    struct qcow2_state *s = qcow2_state(node);
    uint64_t cs = s->cluster_size;
    if (qcow2_has_data_file(s))
        return -ENOTSUP; /* no compressed clusters in a data file (spec) */
    if (!IS_ALIGNED(off, cs) || len > cs ||
        (len < cs && off + len != node->size))
        return -EINVAL;
    if (cbuf && (cbuf_len == 0 || cbuf_len >= cs))
        return -EINVAL;
    /* Room for the zero padding to the end of the last sector. */
    CLEANUP_FREE uint8_t *out = calloc(1, cs + 512);
    if (!out)
        return -ENOMEM;
    int64_t clen = (int64_t)cbuf_len;
    if (cbuf)
        memcpy(out, cbuf, cbuf_len); /* compressed by the caller */
    else
        clen = compress_cluster(s, buf, len, out, cs - 1);
    if (clen == 0)
        return qcow2_write(node, buf, off, len); /* does not shrink */
    if (clen < 0)
        return (int)clen;

    uint8_t *l2;
    uint64_t idx;
    int r = qcow2_get_l2(s, off, true, &l2, &idx);
    if (r < 0)
        return r;
    int64_t host = qcow2_alloc_bytes(s, (uint64_t)clen);
    if (host < 0) {
        qcow2_cache_put(&s->l2_cache, l2);
        return (int)host;
    }
    /* Up to the end of the sector: the bytes after ours there belong to
     * no one yet, and the file then always holds the descriptor's span. */
    uint64_t wlen = ALIGN_UP((uint64_t)host + (uint64_t)clen, 512) - (uint64_t)host;
    r = qcow2_pre_write_data(s, (uint64_t)host, wlen);
    if (r == 0)
        r = file_pwrite_full(node->fd, out, (size_t)wlen, (uint64_t)host);
    if (r == 0)
        blk_note_cached_write(node, node->fd, (uint64_t)host, wlen);
    if (r < 0) {
        /* Nothing points at the bytes: give their references back. */
        (void)qcow2_update_refcount(s, (uint64_t)host, (uint64_t)clen, -1);
        qcow2_cache_put(&s->l2_cache, l2);
        return r;
    }
    s->need_sync = true;
    uint64_t old = qcow2_l2_get(s, l2, idx);
    qcow2_l2_set(s, l2, idx,
                 compressed_descriptor(s, (uint64_t)host, (uint64_t)clen), 0);
    qcow2_cache_mark_dirty(&s->l2_cache, l2);
    qcow2_cache_put(&s->l2_cache, l2);
    /* The old entry's clusters (if any) lose their reference once the new
     * entry is durable. */
    return qcow2_free_l2_entry_clusters(s, old);
}
