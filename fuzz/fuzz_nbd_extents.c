/*
 * Fuzz target: the NBD reader's merge of a server's block-status replies
 * (live_nbd_merge in src/live/nbd.c), the part of the reader that turns
 * untrusted extent lists into the ranges a backup copies.  The input
 * gives the request (offset, length), whether a dirty-bitmap context
 * answered, and the (length, flags) pairs of both contexts.  Whatever the
 * input, the merge must return ranges that start at the request's offset,
 * follow each other without gaps, stay inside the request and are never
 * empty, or an error with a reason.
 */
#include <inttypes.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_common.h"
#include "live/nbd.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 17)
        return 0;
    uint64_t off, len;
    memcpy(&off, data, 8);
    memcpy(&len, data + 8, 8);
    off &= ((uint64_t)1 << 62) - 1;
    len = len % ((uint64_t)1 << 40) + 1;
    bool with_dirty = data[16] & 1;
    size_t max = (size_t)(data[16] >> 1) + 1;
    data += 17;
    size -= 17;
    size_t pairs = size / 8;
    size_t na = with_dirty ? pairs / 2 : pairs, nd = pairs - na;
    uint32_t *a = calloc(na * 2 + 1, sizeof(uint32_t));
    uint32_t *d = calloc(nd * 2 + 1, sizeof(uint32_t));
    struct live_nbd_extent *v = calloc(max, sizeof(*v));
    if (!a || !d || !v)
        abort();
    memcpy(a, data, na * 8);
    memcpy(d, data + na * 8, nd * 8);
    struct cbt_error *err = NULL;
    int r = live_nbd_merge(off, len, a, na, with_dirty ? d : NULL, nd, v, max,
                           "fuzz", &err);
    if (r < 0) {
        if (!err || !cbt_error_message(err)[0])
            fuzz_fail("merge failed without a reason");
    } else {
        if (r == 0 || (size_t)r > max)
            fuzz_fail("merge returned %d extents (max %zu)", r, max);
        uint64_t pos = off;
        for (int i = 0; i < r; i++) {
            if (v[i].start != pos || v[i].length == 0 ||
                v[i].start + v[i].length > off + len)
                fuzz_fail("extent %d [%" PRIu64 ", +%" PRIu64 ") breaks "
                          "the request [%" PRIu64 ", +%" PRIu64 ")", i,
                          v[i].start, v[i].length, off, len);
            pos += v[i].length;
        }
    }
    cbt_error_free(err);
    free(a);
    free(d);
    free(v);
    return 0;
}
