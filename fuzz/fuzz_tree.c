/*
 * Fuzz target: the record file of sha256-tree-v2 (TARGET.tree,
 * src/ops/hashtree.c), read by verify, restore, prune and every
 * incremental.  The input is parsed in memory and, as a file, by the
 * streamed reader (tree_file_open); both must agree.  What they accept is
 * checked again here, independently: the size is a header, whole records
 * and a trailer, records are strictly increasing in (level, index) and
 * inside the tree their header describes.  An accepted file small enough
 * is then viewed and checked against its own root (tree_view_check):
 * whatever it holds, the result is 0 or an error with a reason.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_common.h"
#include "ops/hashtree.h"
#include "util/util.h"

static void check_accepted(const uint8_t *data, size_t size,
                           const struct tree_file_info *info)
{
    if (size < TREE_HEADER + TREE_TRAILER ||
        (size - TREE_HEADER - TREE_TRAILER) % TREE_RECORD ||
        info->nrec != (size - TREE_HEADER - TREE_TRAILER) / TREE_RECORD)
        fuzz_fail("accepted a file of %zu bytes with %llu records", size,
                  (unsigned long long)info->nrec);
    struct tree_shape s;
    if (info->blocks > ((uint64_t)INT64_MAX >> 16) + 1 ||
        tree_shape_init(&s, info->blocks * 65536) < 0 ||
        s.levels != info->levels)
        fuzz_fail("accepted a tree of %llu blocks",
                  (unsigned long long)info->blocks);
    int last_k = -1;
    uint64_t last_i = 0;
    for (uint64_t r = 0; r < info->nrec; r++) {
        const uint8_t *p = data + TREE_HEADER + r * TREE_RECORD;
        unsigned k = p[0];
        uint64_t i = ldle64(p + 1);
        if (k > s.levels || i >= s.count[k])
            fuzz_fail("accepted record %llu outside the tree",
                      (unsigned long long)r);
        if ((int)k < last_k || ((int)k == last_k && i <= last_i))
            fuzz_fail("accepted record %llu out of order",
                      (unsigned long long)r);
        if (r < info->level_first[k] || r >= info->level_first[k + 1])
            fuzz_fail("record %llu outside its level's range",
                      (unsigned long long)r);
        last_k = (int)k;
        last_i = i;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* The manifest gives the block count; take the header's so the
     * checks past it are reached. */
    uint64_t blocks = size >= 24 ? ldle64(data + 16) : 0;
    struct tree_file_info info;
    struct cbt_error *err = NULL;
    int r = tree_file_parse(data, size, blocks, "fuzz", &info, &err);
    if (r < 0 && (!err || !cbt_error_message(err)[0]))
        fuzz_fail("rejected without a reason");
    cbt_error_free(err);
    err = NULL;
    if (r == 0)
        check_accepted(data, size, &info);

    const char *path = fuzz_put_file("in.tree", data, size);
    struct tree_file f;
    char hex[65];
    int r2 = tree_file_open(&f, path, blocks, hex, &err);
    if (r2 < 0 && (!err || !cbt_error_message(err)[0]))
        fuzz_fail("open rejected without a reason");
    cbt_error_free(err);
    err = NULL;
    if ((r == 0) != (r2 == 0))
        fuzz_fail("parse %d but open %d", r, r2);
    if (r2 < 0)
        return 0;
    if (memcmp(&f.info, &info, sizeof(info)) != 0)
        fuzz_fail("parse and open disagree");
    if (info.nrec <= 256) {
        struct tree_file *fs[] = {&f};
        struct tree_view v;
        if (tree_view_open(&v, info.blocks * 65536, fs, 1) == 0) {
            if (tree_view_check(&v, info.root, &err) < 0 &&
                (!err || !cbt_error_message(err)[0]))
                fuzz_fail("check failed without a reason");
            cbt_error_free(err);
            uint8_t d[32];
            uint64_t idx;
            int src;
            for (unsigned k = 0; k <= v.shape.levels; k++)
                if (tree_view_next(&v, k, 0, &idx, d, &src) < 0)
                    fuzz_fail("view of level %u failed", k);
        }
        tree_view_close(&v);
    }
    tree_file_close(&f);
    return 0;
}
