/*
 * Metadata cache for L2 tables and refcount blocks: set-associative, LRU
 * within a set, write-back.  Entries in use are pinned so a nested lookup
 * cannot evict them.  Writing back a dirty L2 table first makes every
 * refcount change durable (qcow2_prepare_l2_writeback), which is what keeps
 * "refcount before reference" true for evictions as well as flushes.
 */
#include <sys/mman.h>

#include "qcow2.h"

#define CACHE_WAYS 8

int qcow2_cache_init(struct qcow2_cache *c, uint64_t cluster_size,
                     uint32_t nentries, bool is_l2)
{
    memset(c, 0, sizeof(*c));
    c->ways = CACHE_WAYS;
    c->nsets = MAX(1u, nentries / CACHE_WAYS);
    c->is_l2 = is_l2;
    size_t n = (size_t)c->nsets * c->ways;
    c->cluster_size = cluster_size;
    c->entries = calloc(n, sizeof(*c->entries));
    /* Anonymous pages: page-aligned and zeroed by the kernel on first
     * touch, so a cache sized for a large image costs nothing until used
     * (a memset here was a tenth of a small incremental backup). */
    c->mem_len = n * cluster_size;
    void *mem = mmap(NULL, c->mem_len, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    c->mem = mem == MAP_FAILED ? NULL : mem;
    if (!c->entries || !c->mem) {
        qcow2_cache_destroy(c);
        return -ENOMEM;
    }
    for (size_t i = 0; i < n; i++)
        c->entries[i].data = c->mem + i * cluster_size;
    return 0;
}

void qcow2_cache_destroy(struct qcow2_cache *c)
{
    free(c->entries);
    if (c->mem)
        munmap(c->mem, c->mem_len);
    c->entries = NULL;
    c->mem = NULL;
}

static struct qcow2_cache_entry *set_of(struct qcow2_cache *c, uint64_t offset,
                                        uint32_t cluster_bits)
{
    uint64_t key = offset >> cluster_bits;
    /* Mix the key so tables spaced a power of two apart spread over sets. */
    key ^= key >> 17;
    key *= 0x9E3779B97F4A7C15ull;
    return &c->entries[(key >> 32) % c->nsets * c->ways];
}

/* Write e back if dirty.  An L2 table goes after the refcounts and the
 * data it maps are durable (qcow2_prepare_l2_writeback), unless the
 * caller did that already for a run of tables (prepared). */
static int write_entry(struct qcow2_state *s, struct qcow2_cache *c,
                       struct qcow2_cache_entry *e, bool prepared)
{
    if (!e->dirty)
        return 0;
    if (c->is_l2 && !prepared) {
        int r = qcow2_prepare_l2_writeback(s);
        if (r < 0)
            return r;
    }
    int r = qcow2_pwrite_meta(s, e->data, s->cluster_size, e->offset,
                              c->is_l2 ? QCOW2_OL_ACTIVE_L2
                                       : QCOW2_OL_REFCOUNT_BLOCK);
    if (r < 0)
        return r;
    e->dirty = false;
    c->ndirty--;
    s->need_sync = true;
    return 0;
}

int qcow2_cache_get(struct qcow2_state *s, struct qcow2_cache *c,
                    uint64_t offset, bool fresh, uint8_t **table)
{
    struct qcow2_cache_entry *set = set_of(c, offset, s->cluster_bits);
    struct qcow2_cache_entry *victim = NULL;
    for (uint32_t i = 0; i < c->ways; i++) {
        struct qcow2_cache_entry *e = &set[i];
        if (e->offset == offset) {
            if (fresh)
                memset(e->data, 0, s->cluster_size);
            e->lru = ++c->lru_clock;
            e->pins++;
            *table = e->data;
            return 0;
        }
        if (e->pins)
            continue;
        if (!victim || e->offset == 0 ||
            (victim->offset != 0 && e->lru < victim->lru))
            victim = e;
    }
    if (!victim)
        return -EBUSY; /* every way pinned: a bug in the caller */
    if (victim->offset) {
        int r = write_entry(s, c, victim, false);
        if (r < 0)
            return r;
        victim->offset = 0;
    }
    if (fresh) {
        memset(victim->data, 0, s->cluster_size);
    } else {
        int r = file_pread_exact(s->node->fd, victim->data, s->cluster_size,
                                 offset);
        if (r < 0)
            return r;
    }
    victim->offset = offset;
    victim->lru = ++c->lru_clock;
    victim->pins = 1;
    *table = victim->data;
    return 0;
}

static struct qcow2_cache_entry *find_by_data(struct qcow2_cache *c,
                                              const uint8_t *table)
{
    size_t i = (size_t)(table - c->mem) / c->cluster_size;
    return i < (size_t)c->nsets * c->ways ? &c->entries[i] : NULL;
}

void qcow2_cache_put(struct qcow2_cache *c, uint8_t *table)
{
    struct qcow2_cache_entry *e = find_by_data(c, table);
    if (e && e->pins > 0)
        e->pins--;
}

void qcow2_cache_mark_dirty(struct qcow2_cache *c, uint8_t *table)
{
    struct qcow2_cache_entry *e = find_by_data(c, table);
    if (e && !e->dirty) {
        e->dirty = true;
        c->ndirty++;
    }
}

int qcow2_cache_write_dirty(struct qcow2_state *s, struct qcow2_cache *c)
{
    /* One ordering point for all the L2 tables: nothing they depend on
     * changes while they are written, and they do not depend on one
     * another (a sync before each was one fdatasync per dirty table). */
    if (c->is_l2 && c->ndirty) {
        int r = qcow2_prepare_l2_writeback(s);
        if (r < 0)
            return r;
    }
    for (size_t i = 0; i < (size_t)c->nsets * c->ways; i++) {
        struct qcow2_cache_entry *e = &c->entries[i];
        if (e->offset && e->dirty) {
            int r = write_entry(s, c, e, true);
            if (r < 0)
                return r;
        }
    }
    return 0;
}

bool qcow2_cache_is_dirty(const struct qcow2_cache *c)
{
    return c->ndirty > 0;
}

void qcow2_cache_discard(struct qcow2_cache *c, uint64_t offset)
{
    for (size_t i = 0; i < (size_t)c->nsets * c->ways; i++) {
        struct qcow2_cache_entry *e = &c->entries[i];
        if (e->offset == offset && !e->pins) {
            e->offset = 0;
            if (e->dirty)
                c->ndirty--;
            e->dirty = false;
        }
    }
}
