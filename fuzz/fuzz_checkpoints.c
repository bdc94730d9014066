/*
 * Fuzz target: the parser of cbt's checkpoint metadata (the qcow2 header
 * extension 0x63627463, docs/checkpoints.md), fed the input as the
 * extension's bytes.  Whatever the input, the parser must return 0 or an
 * error with a reason, never read outside the buffer; what it accepts must
 * satisfy the documented invariants, serialize again, and parse back to the
 * same metadata (byte-identical when the header has its standard size).
 * Each input is parsed twice: as it is, and with its checksum set right,
 * so that mutations reach the checks behind the checksum.
 */
#include <errno.h>
#include <stdbool.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "fuzz_common.h"
#include "ops/checkpoint_meta.h"

static void check_invariants(const struct ckpt_meta *m)
{
    for (size_t i = 0; i < m->n; i++) {
        const struct ckpt_rec *r = &m->v[i];
        size_t len = strlen(r->name);
        if (len == 0 || len > CKPT_NAME_MAX)
            fuzz_fail("accepted a name of %zu bytes", len);
        if (r->order == 0 || r->order >= m->next_order)
            fuzz_fail("accepted order %" PRIu64 " (next %" PRIu64 ")",
                      r->order, m->next_order);
        if (i && r->order <= m->v[i - 1].order)
            fuzz_fail("accepted orders out of sequence");
        if (r->parent >= r->order)
            fuzz_fail("accepted a parent that is not older");
        if (r->granularity < 512 || (r->granularity & (r->granularity - 1)))
            fuzz_fail("accepted granularity %" PRIu64, r->granularity);
        if (r->created_nsec >= 1000000000u)
            fuzz_fail("accepted nanoseconds %" PRIu32, r->created_nsec);
    }
    for (size_t i = 0; i < m->nseals; i++) {
        const struct ckpt_seal *s = &m->seals[i];
        bool found = false;
        for (size_t j = 0; j < m->n && !found; j++)
            found = m->v[j].order == s->order;
        if (!found)
            fuzz_fail("accepted a seal of no checkpoint");
        if (s->depth > CKPT_MAX_DEPTH)
            fuzz_fail("accepted seal depth %" PRIu32, s->depth);
        if (i && (s->order < m->seals[i - 1].order ||
                  (s->order == m->seals[i - 1].order &&
                   s->depth <= m->seals[i - 1].depth)))
            fuzz_fail("accepted seals out of order");
    }
}

static void check_same(const struct ckpt_meta *a, const struct ckpt_meta *b)
{
    if (memcmp(a->uuid, b->uuid, 16) || a->next_order != b->next_order ||
        a->n != b->n)
        fuzz_fail("round trip changed the header");
    for (size_t i = 0; i < a->n; i++) {
        const struct ckpt_rec *x = &a->v[i], *y = &b->v[i];
        if (x->order != y->order || x->created_sec != y->created_sec ||
            x->created_nsec != y->created_nsec || x->parent != y->parent ||
            x->virtual_size != y->virtual_size ||
            x->granularity != y->granularity || strcmp(x->name, y->name))
            fuzz_fail("round trip changed checkpoint %zu", i);
    }
    if (a->nseals != b->nseals)
        fuzz_fail("round trip changed the number of seals");
    for (size_t i = 0; i < a->nseals; i++) {
        const struct ckpt_seal *x = &a->seals[i], *y = &b->seals[i];
        if (x->order != y->order || x->depth != y->depth ||
            x->count != y->count || memcmp(x->sha256, y->sha256, 32))
            fuzz_fail("round trip changed seal %zu", i);
    }
}

static void one(const uint8_t *data, size_t size)
{
    struct ckpt_meta m;
    char why[256];
    why[0] = 0;
    int r = ckpt_meta_parse(data, size, &m, why, sizeof(why));
    if (r < 0) {
        if (r == -EINVAL && !why[0])
            fuzz_fail("rejected without a reason");
        if (r != -EINVAL && r != -ENOMEM)
            fuzz_fail("unexpected return %d", r);
        ckpt_meta_free(&m);
        return;
    }
    check_invariants(&m);
    uint8_t *buf = NULL;
    size_t len = 0;
    if (ckpt_meta_build(&m, &buf, &len) < 0)
        fuzz_fail("cannot serialize what was accepted");
    if (size >= 4 && data[2] == 0 && data[3] == CKPT_HEADER_SIZE &&
        (len != size || memcmp(buf, data, len) != 0))
        fuzz_fail("serialization differs from a canonical input");
    struct ckpt_meta m2;
    if (ckpt_meta_parse(buf, len, &m2, why, sizeof(why)) < 0)
        fuzz_fail("cannot parse its own output: %s", why);
    check_same(&m, &m2);
    ckpt_meta_free(&m2);
    ckpt_meta_free(&m);
    free(buf);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    one(data, size);
    if (size < 8)
        return 0;
    uint8_t *copy = malloc(size);
    if (!copy)
        return 0;
    memcpy(copy, data, size);
    uLong c = crc32(0L, Z_NULL, 0);
    c = crc32(c, copy, 4);
    c = crc32_z(c, copy + 8, size - 8);
    copy[4] = (uint8_t)(c >> 24);
    copy[5] = (uint8_t)(c >> 16);
    copy[6] = (uint8_t)(c >> 8);
    copy[7] = (uint8_t)c;
    one(copy, size);
    free(copy);
    return 0;
}
