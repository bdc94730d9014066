/* qcow2 compressed clusters: read the stored bytes and inflate them (zlib
 * raw deflate, or zstd), refusing output that does not fill the cluster. */
#include <zlib.h>
#include <zstd.h>

#include "qcow2.h"

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
    ZSTD_DCtx *dctx = ZSTD_createDCtx();
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
    ZSTD_freeDCtx(dctx);
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
