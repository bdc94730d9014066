/*
 * The binary layout of cbt's checkpoint metadata (docs/checkpoints.md): its
 * parser and serializer (checkpoint_meta.h), shared by the checkpoint code
 * and the fuzz target of the parser, and the edits of the parsed form that
 * keep its rules (orders sorted, parents existing, seals sorted).
 */
#include <inttypes.h>
#include <stdio.h>
#include <time.h>
#include <zlib.h>

#include "../util/util.h"
#include "checkpoint_meta.h"

static uint32_t meta_crc(const uint8_t *buf, size_t len)
{
    uLong c = crc32(0L, Z_NULL, 0);
    c = crc32(c, buf, 4);
    c = crc32_z(c, buf + 8, len - 8);
    return (uint32_t)c;
}

void ckpt_meta_free(struct ckpt_meta *m)
{
    for (size_t i = 0; i < m->n; i++)
        free(m->v[i].name);
    free(m->v);
    free(m->seals);
    m->v = NULL;
    m->n = 0;
    m->seals = NULL;
    m->nseals = 0;
}

static int cmp_name_ptr(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

const struct ckpt_rec *ckpt_find_order(const struct ckpt_rec *v, size_t n,
                                       uint64_t order)
{
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (v[mid].order == order)
            return &v[mid];
        if (v[mid].order < order)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

#define BAD(...) (snprintf(why, whylen, __VA_ARGS__), -EINVAL)

/* The history section at *pos (after the records): its seals into m. */
static int parse_history(const uint8_t *buf, size_t len, size_t *pos,
                         struct ckpt_meta *m, char *why, size_t whylen)
{
    if (len - *pos < CKPT_HISTORY_HEADER)
        return BAD("the history section is truncated");
    uint32_t count = ldbe32(buf + *pos), reserved = ldbe32(buf + *pos + 4);
    *pos += CKPT_HISTORY_HEADER;
    if (reserved)
        return BAD("history: reserved field 0x%" PRIx32, reserved);
    if (count == 0)
        return BAD("history flag set, but no seal");
    if ((len - *pos) / CKPT_SEAL_SIZE < count)
        return BAD("%" PRIu32 " seals cannot fit in %zu bytes", count,
                   len - *pos);
    m->seals = calloc(count, sizeof(*m->seals));
    if (!m->seals)
        return -ENOMEM;
    for (uint32_t i = 0; i < count; i++) {
        const uint8_t *p = buf + *pos;
        struct ckpt_seal *sl = &m->seals[m->nseals++];
        sl->order = ldbe64(p);
        sl->depth = ldbe32(p + 8);
        uint32_t sflags = ldbe32(p + 12);
        sl->count = ldbe64(p + 16);
        memcpy(sl->sha256, p + 24, 32);
        *pos += CKPT_SEAL_SIZE;
        if (sflags)
            return BAD("seal %" PRIu32 ": unknown flags 0x%" PRIx32, i + 1,
                       sflags);
        if (!ckpt_find_order(m->v, m->n, sl->order))
            return BAD("seal %" PRIu32 ": order %" PRIu64 " is no "
                       "checkpoint's", i + 1, sl->order);
        if (sl->depth > CKPT_MAX_DEPTH)
            return BAD("seal %" PRIu32 ": depth %" PRIu32 " out of range "
                       "(0..%d)", i + 1, sl->depth, CKPT_MAX_DEPTH);
        const struct ckpt_seal *pr = i ? &m->seals[i - 1] : NULL;
        if (pr && (sl->order < pr->order ||
                   (sl->order == pr->order && sl->depth <= pr->depth)))
            return BAD("seal %" PRIu32 ": not sorted by order and depth",
                       i + 1);
    }
    return 0;
}

int ckpt_meta_parse(const uint8_t *buf, size_t len, struct ckpt_meta *m,
                    char *why, size_t whylen)
{
    memset(m, 0, sizeof(*m));
    if (len < CKPT_HEADER_SIZE)
        return BAD("%zu bytes, shorter than its %d-byte header", len,
                   CKPT_HEADER_SIZE);
    unsigned version = ldbe16(buf);
    if (version != CKPT_VERSION)
        return BAD("version %u (this cbt reads version %d)", version,
                   CKPT_VERSION);
    size_t hsize = ldbe16(buf + 2);
    if (hsize < CKPT_HEADER_SIZE || hsize > len)
        return BAD("header size %zu out of range (%d..%zu)", hsize,
                   CKPT_HEADER_SIZE, len);
    uint32_t stored = ldbe32(buf + 4), crc = meta_crc(buf, len);
    if (stored != crc)
        return BAD("checksum mismatch (stored 0x%08" PRIx32 ", computed 0x%08"
                   PRIx32 ")", stored, crc);
    uint32_t count = ldbe32(buf + 8), flags = ldbe32(buf + 12);
    if (flags & ~CKPT_F_HISTORY)
        return BAD("unknown flags 0x%" PRIx32, flags & ~CKPT_F_HISTORY);
    memcpy(m->uuid, buf + 16, 16);
    m->next_order = ldbe64(buf + 32);
    if (m->next_order == 0)
        return BAD("next order is 0");
    if ((len - hsize) / CKPT_RECORD_FIXED < count)
        return BAD("%" PRIu32 " checkpoints cannot fit in %zu bytes", count,
                   len);
    m->v = calloc(count ? count : 1, sizeof(*m->v));
    if (!m->v)
        return -ENOMEM;
    size_t pos = hsize;
    for (uint32_t i = 0; i < count; i++) {
        if (len - pos < CKPT_RECORD_FIXED)
            return BAD("checkpoint %" PRIu32 " is truncated", i + 1);
        const uint8_t *p = buf + pos;
        struct ckpt_rec r = {
            .order = ldbe64(p),
            .created_sec = (int64_t)ldbe64(p + 8),
            .created_nsec = ldbe32(p + 16),
            .parent = ldbe64(p + 24),
            .virtual_size = ldbe64(p + 32),
            .granularity = ldbe64(p + 40),
        };
        uint32_t rflags = ldbe32(p + 20);
        size_t nlen = ldbe16(p + 48);
        pos += CKPT_RECORD_FIXED;
        if (nlen == 0 || nlen > CKPT_NAME_MAX)
            return BAD("checkpoint %" PRIu32 ": name length %zu out of range "
                       "(1..%d)", i + 1, nlen, CKPT_NAME_MAX);
        if (len - pos < nlen)
            return BAD("checkpoint %" PRIu32 " is truncated", i + 1);
        if (memchr(buf + pos, 0, nlen))
            return BAD("checkpoint %" PRIu32 ": the name holds a NUL byte",
                       i + 1);
        r.name = strndup((const char *)buf + pos, nlen);
        if (!r.name)
            return -ENOMEM;
        pos += nlen;
        m->v[m->n++] = r;
        const char *nm = r.name;
        if (rflags)
            return BAD("checkpoint '%s': unknown flags 0x%" PRIx32, nm, rflags);
        if (r.order == 0 || r.order >= m->next_order)
            return BAD("checkpoint '%s': order %" PRIu64 " out of range "
                       "(1..%" PRIu64 ")", nm, r.order, m->next_order - 1);
        if (i > 0 && r.order <= m->v[i - 1].order)
            return BAD("checkpoint '%s': order %" PRIu64 " is not above the "
                       "previous one's (%" PRIu64 ")", nm, r.order,
                       m->v[i - 1].order);
        if (r.created_nsec >= 1000000000u)
            return BAD("checkpoint '%s': nanoseconds %" PRIu32 " out of range",
                       nm, r.created_nsec);
        if (!IS_POW2(r.granularity) || r.granularity < 512 ||
            r.granularity > (1ull << 31))
            return BAD("checkpoint '%s': granularity %" PRIu64 " is not a "
                       "power of two from 512 to 2G", nm, r.granularity);
        if (r.parent && !ckpt_find_order(m->v, i, r.parent))
            return BAD("checkpoint '%s': parent order %" PRIu64 " is not an "
                       "older checkpoint", nm, r.parent);
    }
    if (flags & CKPT_F_HISTORY) {
        int r = parse_history(buf, len, &pos, m, why, whylen);
        if (r < 0)
            return r;
    }
    if (pos != len)
        return BAD("%zu bytes after the last %s", len - pos,
                   (flags & CKPT_F_HISTORY) ? "seal" : "checkpoint");
    if (m->n > 1) {
        char **names = malloc(m->n * sizeof(*names));
        if (!names)
            return -ENOMEM;
        for (size_t i = 0; i < m->n; i++)
            names[i] = m->v[i].name;
        qsort(names, m->n, sizeof(*names), cmp_name_ptr);
        for (size_t i = 1; i < m->n; i++) {
            if (strcmp(names[i], names[i - 1]) == 0) {
                int r = BAD("two checkpoints are named '%s'", names[i]);
                free(names);
                return r;
            }
        }
        free(names);
    }
    return 0;
}

int ckpt_meta_build(const struct ckpt_meta *m, uint8_t **out, size_t *outlen)
{
    size_t len = CKPT_HEADER_SIZE;
    for (size_t i = 0; i < m->n; i++) {
        size_t nlen = strlen(m->v[i].name);
        if (nlen == 0 || nlen > CKPT_NAME_MAX)
            return -EINVAL;
        len += CKPT_RECORD_FIXED + nlen;
    }
    if (m->n > UINT32_MAX || m->nseals > UINT32_MAX)
        return -EINVAL;
    if (m->nseals)
        len += CKPT_HISTORY_HEADER + m->nseals * CKPT_SEAL_SIZE;
    uint8_t *buf = calloc(1, len);
    if (!buf)
        return -ENOMEM;
    stbe16(buf, CKPT_VERSION);
    stbe16(buf + 2, CKPT_HEADER_SIZE);
    stbe32(buf + 8, (uint32_t)m->n);
    stbe32(buf + 12, m->nseals ? CKPT_F_HISTORY : 0);
    memcpy(buf + 16, m->uuid, 16);
    stbe64(buf + 32, m->next_order);
    size_t pos = CKPT_HEADER_SIZE;
    for (size_t i = 0; i < m->n; i++) {
        const struct ckpt_rec *r = &m->v[i];
        uint8_t *p = buf + pos;
        size_t nlen = strlen(r->name);
        stbe64(p, r->order);
        stbe64(p + 8, (uint64_t)r->created_sec);
        stbe32(p + 16, r->created_nsec);
        stbe32(p + 20, 0);
        stbe64(p + 24, r->parent);
        stbe64(p + 32, r->virtual_size);
        stbe64(p + 40, r->granularity);
        stbe16(p + 48, (uint16_t)nlen);
        memcpy(p + CKPT_RECORD_FIXED, r->name, nlen);
        pos += CKPT_RECORD_FIXED + nlen;
    }
    if (m->nseals) {
        stbe32(buf + pos, (uint32_t)m->nseals);
        pos += CKPT_HISTORY_HEADER;
        for (size_t i = 0; i < m->nseals; i++) {
            const struct ckpt_seal *sl = &m->seals[i];
            uint8_t *p = buf + pos;
            stbe64(p, sl->order);
            stbe32(p + 8, sl->depth);
            stbe64(p + 16, sl->count);
            memcpy(p + 24, sl->sha256, 32);
            pos += CKPT_SEAL_SIZE;
        }
    }
    stbe32(buf + 4, meta_crc(buf, len));
    *out = buf;
    *outlen = len;
    return 0;
}

/* ---- editing metadata in memory ---- */

ssize_t ckpt_meta_find_name(const struct ckpt_meta *m, const char *name)
{
    for (size_t i = 0; i < m->n; i++)
        if (strcmp(m->v[i].name, name) == 0)
            return (ssize_t)i;
    return -1;
}

void ckpt_seals_drop(struct ckpt_meta *m, uint64_t order)
{
    size_t k = 0;
    for (size_t j = 0; j < m->nseals; j++)
        if (m->seals[j].order != order)
            m->seals[k++] = m->seals[j];
    m->nseals = k;
}

void ckpt_meta_remove(struct ckpt_meta *m, size_t i)
{
    uint64_t order = m->v[i].order, parent = m->v[i].parent;
    ckpt_seals_drop(m, order);
    for (size_t j = 0; j < m->n; j++)
        if (m->v[j].parent == order)
            m->v[j].parent = parent;
    free(m->v[i].name);
    memmove(&m->v[i], &m->v[i + 1], (m->n - i - 1) * sizeof(*m->v));
    m->n--;
}

int ckpt_meta_insert(struct ckpt_meta *m, const struct ckpt_rec *r)
{
    struct ckpt_rec *v = realloc(m->v, (m->n + 1) * sizeof(*v));
    if (!v)
        return -ENOMEM;
    m->v = v;
    struct ckpt_rec copy = *r;
    if (!(copy.name = strdup(r->name)))
        return -ENOMEM;
    size_t at = m->n;
    while (at > 0 && v[at - 1].order > r->order)
        at--;
    memmove(&v[at + 1], &v[at], (m->n - at) * sizeof(*v));
    v[at] = copy;
    m->n++;
    return 0;
}

int ckpt_meta_append(struct ckpt_meta *m, const char *name,
                     uint64_t virtual_size, uint64_t granularity)
{
    /* next_order must stay above every order: the last order a record can
     * take is UINT64_MAX - 1. */
    if (m->next_order == UINT64_MAX)
        return -EOVERFLOW;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct ckpt_rec r = {
        .order = m->next_order,
        .created_sec = ts.tv_sec,
        .created_nsec = (uint32_t)ts.tv_nsec,
        .parent = m->n ? m->v[m->n - 1].order : 0,
        .virtual_size = virtual_size,
        .granularity = granularity,
        .name = (char *)name,
    };
    int e = ckpt_meta_insert(m, &r);
    if (e == 0)
        m->next_order++;
    return e;
}

int ckpt_seal_add(struct ckpt_meta *m, const struct ckpt_seal *s)
{
    struct ckpt_seal *v = realloc(m->seals, (m->nseals + 1) * sizeof(*v));
    if (!v)
        return -ENOMEM;
    m->seals = v;
    size_t at = m->nseals;
    while (at > 0 && (v[at - 1].order > s->order ||
                      (v[at - 1].order == s->order &&
                       v[at - 1].depth > s->depth)))
        at--;
    memmove(&v[at + 1], &v[at], (m->nseals - at) * sizeof(*v));
    v[at] = *s;
    m->nseals++;
    return 0;
}
