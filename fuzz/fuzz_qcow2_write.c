/*
 * Fuzz target: open a hostile qcow2 image read-write and apply a few writes,
 * zero-writes and discards derived from the last bytes of the input, then
 * flush, close, reopen read-only and walk it.
 *
 * The op script is the input's last FUZZ_OP_BYTES bytes, 4 bytes an op:
 *   b0: bits 0-1 kind (write, zero, zero+unmap, discard), bit 2 unaligned
 *   b1,b2: offset as a fraction of the virtual size (b1b2 / 65536)
 *   b3: length (and, for writes, the data pattern)
 * The same bytes stay part of the image, so every seed is still a valid
 * image.  With CBT_FUZZ_VERIFY=1 each successful write is read back and
 * compared (off by default: on a corrupt image the engine may legitimately
 * overwrite its own metadata).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_common.h"

#define FUZZ_OP_BYTES 32
#define FUZZ_WRITE_MAX 65536
#define FUZZ_ZERO_MAX (1024 * 1024)

/* CBT_FUZZ_VERIFY=1, read once (LLVMFuzzerInitialize is fuzz_common's). */
static bool verify_writes(void)
{
    static int verify = -1;
    if (verify < 0) {
        const char *v = getenv("CBT_FUZZ_VERIFY");
        verify = v && strcmp(v, "1") == 0;
    }
    return verify;
}

static uint64_t scale(uint64_t size, unsigned frac16)
{
    return (uint64_t)(((unsigned __int128)size * frac16) >> 16);
}

static void run_ops(struct cbt_image *img, const uint8_t *ops, size_t n)
{
    static uint8_t buf[FUZZ_WRITE_MAX], back[FUZZ_WRITE_MAX];
    uint64_t size = cbt_image_size(img);
    size_t budget = FUZZ_READ_BUDGET;
    uint64_t cluster = 0;
    struct cbt_image_info info;
    if (cbt_image_get_info(img, &info, NULL) == 0) {
        cluster = info.cluster_size;
        cbt_image_info_free(&info);
    }

    for (size_t i = 0; i + 4 <= n; i += 4) {
        unsigned kind = ops[i] & 3;
        int unaligned = ops[i] & 4;
        uint64_t off = scale(size, (unsigned)ops[i + 1] << 8 | ops[i + 2]);
        unsigned b3 = ops[i + 3];
        uint64_t len;
        if (!unaligned)
            off &= ~(uint64_t)511;
        if (kind == 0)
            len = unaligned ? b3 * 257u + 1 : ((b3 & 0x7f) + 1) * 512u;
        else
            len = unaligned ? b3 * 4099u + 1 : (b3 + 1) * 4096u;
        if (off >= size)
            continue;
        if (len > size - off)
            len = size - off;
        if (len > budget)
            len = budget;
        if (len == 0)
            break;
        budget -= len;

        int r;
        if (kind == 0 && !unaligned && (b3 & 0x80) && cluster &&
            cluster <= FUZZ_WRITE_MAX) {
            /* One cluster written compressed (a short last cluster at the
             * end of the image), then read back. */
            off = off / cluster * cluster;
            len = cluster < size - off ? cluster : size - off;
            if (len > budget)
                continue;
            budget -= len;
            for (size_t k = 0; k < len; k++)
                buf[k] = (uint8_t)((k / 64) * (b3 | 1));
            r = cbt_image_pwrite_compressed(img, buf, (size_t)len, off);
            if (r == 0 && verify_writes()) {
                r = cbt_image_pread(img, back, (size_t)len, off);
                if (r == 0 && memcmp(buf, back, (size_t)len) != 0)
                    fuzz_fail("read-back mismatch after compressed write "
                              "at %llu", (unsigned long long)off);
            }
            if (r > 0)
                fuzz_fail("compressed write returned %d", r);
            continue;
        }
        switch (kind) {
        case 0:
            memset(buf, (int)(b3 | 1), (size_t)len);
            r = cbt_image_pwrite(img, buf, (size_t)len, off);
            if (r == 0 && verify_writes()) {
                r = cbt_image_pread(img, back, (size_t)len, off);
                if (r == 0 && memcmp(buf, back, (size_t)len) != 0)
                    fuzz_fail("read-back mismatch after write at %llu+%llu",
                              (unsigned long long)off,
                              (unsigned long long)len);
            }
            break;
        case 1:
        case 2:
            r = cbt_image_pwrite_zeroes(img, off, len,
                                        kind == 2 ? CBT_ZERO_MAY_UNMAP : 0);
            break;
        default:
            r = cbt_image_discard(img, off, len);
            break;
        }
        if (r > 0)
            fuzz_fail("data path returned %d, not 0 or -errno", r);
    }
    int r = cbt_image_flush(img);
    if (r > 0)
        fuzz_fail("flush returned %d", r);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (fuzz_may_name_data_file(data, size))
        return 0;
    const char *path = fuzz_put_file("image", data, size);
    struct cbt_error *err = NULL;
    struct cbt_image *img = cbt_image_open(
        path, "qcow2", CBT_OPEN_RDWR | CBT_OPEN_NO_BACKING, &err);
    if (!img) {
        if (!err || !cbt_error_message(err))
            fuzz_fail("open failed without an error message");
        cbt_error_free(err);
        return 0;
    }
    size_t nops = size < FUZZ_OP_BYTES ? size : FUZZ_OP_BYTES;
    run_ops(img, data + size - nops, nops);
    cbt_image_close(img, &err);
    cbt_error_free(err);
    err = NULL;

    img = cbt_image_open(path, "qcow2", CBT_OPEN_NO_BACKING, &err);
    if (!img) {
        cbt_error_free(err);
        return 0;
    }
    fuzz_walk(img, 256 * 1024);
    cbt_image_close(img, &err);
    cbt_error_free(err);
    return 0;
}
