/*
 * qcow2 persistent dirty bitmaps: load the bitmaps extension at open with
 * QEMU's checks (directory and every table; the bits are read later, a
 * cluster at a time, by qcow2_bitmap_read), and store every persistent
 * bitmap of the node with QEMU's crash-safe protocol (FORMATS.md §2,
 * byte-compatible with QEMU); a bitmap whose bits did not change keeps
 * its table and data clusters.
 *
 * On disk
 * -------
 * The header's bitmaps extension points at the bitmap directory: one entry
 * per bitmap (table offset and size, flags in_use/auto, granularity, name),
 * each padded to 8 bytes.  A bitmap's table has one u64 per cluster of its
 * serialized bits (bit n in byte n/8 at bit n%8): 0 = all clean, 1 = all
 * dirty, else the offset of a data cluster.  Autoclear bit 0 says the
 * extension is valid; a writer that knows nothing of bitmaps clears it, and
 * then the extension is ignored (and its clusters leak until check -r).
 *
 * The store protocol
 * ------------------
 * Nothing referenced by the current header is ever written in place.  A
 * store (cbt_bitmap_commit, close, marking in_use) builds the new state in
 * fresh clusters and switches to it with one header write:
 *
 *   1. data clusters (one per chunk with a dirty bit; clean chunks get
 *      table entry 0), then each table, then the directory, all newly
 *      allocated;
 *   2. flush: the new clusters and their refcounts are durable;
 *   3. rewrite the header (extension + autoclear bit 0 set, or neither when
 *      no bitmap is left), synced;
 *   4. free the old directory, and the tables and data of every old entry
 *      the new directory does not reuse, then flush.  Nothing on disk
 *      refers to them any more, so they are freed at once (a corrupt
 *      image whose refcounts cannot drop only leaks them).
 *
 * A crash before 3 leaves the old bitmaps and leaked clusters; after 3, the
 * new bitmaps and leaked clusters: `check -r leaks` reclaims them, and the
 * image is never inconsistent.  Any number of changes (add, remove, clear,
 * merge, rename...) lands in the one header write: all or nothing.
 *
 * in_use: an entry on disk must never claim bits that miss a write.  QEMU
 * marks every bitmap in_use when it opens an image read-write.  We mark them
 * lazily, in the driver's mark_dirty hook, before the first write after a
 * store: the directory is rewritten (same protocol, only the directory is
 * new) with in_use set on every entry that has 'auto' (a disabled bitmap
 * on disk is not affected by writes).  A store (commit or close) writes
 * the bits with in_use clear and re-arms the hook.  So a read-write open
 * that writes nothing leaves the file untouched, a commit leaves a clean
 * checkpoint on disk, and a crash after writes leaves the recording
 * bitmaps in_use, as QEMU's do.  A resize marks every entry in_use first,
 * as its size no longer matches the image.  A bitmap found in_use at open
 * is inconsistent: every store carries its entry over unchanged until it
 * is removed.  A read-only open writes nothing.
 *
 * All functions are called with node->lock held.
 */
#include <inttypes.h>
#include <stdio.h>

#include "qcow2.h"

/* The bits all the bitmaps of one image may hold in memory (32 GiB when
 * dirty): far beyond real use (256 bitmaps of a 64 TiB disk at 64 KiB),
 * but a hostile directory of 65535 entries sharing one table could ask for
 * 2^48 (QEMU would abort). */
#define MAX_LOADED_BITS (1ull << 38)

static const char *fname(const struct qcow2_state *s)
{
    return s->node->filename;
}

void qcow2_bitmaps_ext_encode(const struct qcow2_bitmaps_ext *e, uint8_t *buf)
{
    stbe32(buf, e->nb_bitmaps);
    stbe32(buf + 4, 0);
    stbe64(buf + 8, e->dir_size);
    stbe64(buf + 16, e->dir_offset);
}

static uint64_t dirent_size(size_t name_len)
{
    return ALIGN_UP(QCOW2_BME_FIXED_SIZE + (uint64_t)name_len, 8);
}

/*
 * The directory entry codec (FORMATS.md §2.2), the one place that knows
 * the entry's byte layout: load, check and salvage decode through
 * dirent_decode, store encodes through dirent_encode.
 */
struct dirent_raw {
    uint64_t table_offset;
    uint32_t table_size;
    uint32_t flags;
    uint8_t type;
    uint8_t granularity_bits;
    uint16_t name_size;
    uint32_t extra_size;
    const char *name;  /* name_size bytes in the directory (not NUL-ended),
                        * after the extra data */
    uint64_t size;     /* bytes the entry takes, padded to 8 */
};

/* Decode the entry at dir + pos of a directory of `size` bytes: false when
 * it (its fixed part, extra data or name) runs past the end. */
static bool dirent_decode(const uint8_t *dir, uint64_t size, uint64_t pos,
                          struct dirent_raw *r)
{
    if (pos > size || size - pos < QCOW2_BME_FIXED_SIZE)
        return false;
    const uint8_t *e = dir + pos;
    *r = (struct dirent_raw){
        .table_offset = ldbe64(e),
        .table_size = ldbe32(e + 8),
        .flags = ldbe32(e + 12),
        .type = e[16],
        .granularity_bits = e[17],
        .name_size = ldbe16(e + 18),
        .extra_size = ldbe32(e + 20),
    };
    r->size = ALIGN_UP(QCOW2_BME_FIXED_SIZE + (uint64_t)r->name_size +
                       r->extra_size, 8);
    if (r->size > size - pos)
        return false;
    r->name = (const char *)e + QCOW2_BME_FIXED_SIZE + r->extra_size;
    return true;
}

/* Encode d at e, which has dirent_size(strlen(d->name)) zeroed bytes (the
 * padding stays zero); no extra data.  Returns the bytes taken. */
static uint64_t dirent_encode(uint8_t *e, const struct qcow2_bitmap_dirent *d)
{
    size_t len = strlen(d->name);
    stbe64(e, d->table_offset);
    stbe32(e + 8, d->table_size);
    stbe32(e + 12, d->flags);
    e[16] = QCOW2_BME_TYPE_DIRTY_TRACKING;
    e[17] = d->granularity_bits;
    stbe16(e + 18, (uint16_t)len);
    stbe32(e + 20, 0);
    memcpy(e + QCOW2_BME_FIXED_SIZE, d->name, len);
    return dirent_size(len);
}

static void free_dir(struct qcow2_bitmap_dirent *dir, uint32_t n)
{
    for (uint32_t i = 0; dir && i < n; i++)
        free(dir[i].name);
    free(dir);
}

void qcow2_bitmaps_free(struct qcow2_state *s)
{
    free_dir(s->bm_dir, s->bm_dir_n);
    s->bm_dir = NULL;
    s->bm_dir_n = 0;
}

/* Table entries needed for a bitmap of this size and granularity:
 * ceil(ceil(size / G) / 8) bytes of bits, one entry per cluster. */
static uint64_t table_entries(const struct qcow2_state *s, uint64_t size,
                              unsigned gbits)
{
    uint64_t nbits = (size >> gbits) + ((size & ((1ull << gbits) - 1)) != 0);
    return qcow2_size_to_clusters(s, DIV_ROUND_UP(nbits, 8));
}

static uint64_t table_bytes_on_disk(const struct qcow2_state *s,
                                    uint32_t table_size)
{
    return ALIGN_UP((uint64_t)table_size * 8, s->cluster_size);
}

bool qcow2_bitmap_table_entry_valid(const struct qcow2_state *s, uint64_t e)
{
    uint64_t off = e & QCOW2_BME_TABLE_OFFSET_MASK;
    if (e & QCOW2_BME_TABLE_RESERVED_MASK)
        return false;
    return off == 0 || (!(e & QCOW2_BME_TABLE_ALL_ONES) &&
                        IS_ALIGNED(off, s->cluster_size));
}

/*
 * Read a bitmap table into native order.  Returns the table (caller frees)
 * or NULL: *bad is the index of the first invalid entry, or UINT64_MAX
 * with *err set for an I/O error or no memory.
 */
static uint64_t *read_table(struct qcow2_state *s, uint64_t offset,
                            uint32_t size, uint64_t *bad, int *err)
{
    *bad = UINT64_MAX;
    *err = 0;
    uint64_t *t = malloc((size_t)size * 8);
    if (!t) {
        *err = -ENOMEM;
        return NULL;
    }
    int r = file_pread_full(s->node->fd, t, (size_t)size * 8, offset);
    if (r < 0) {
        *err = r;
        free(t);
        return NULL;
    }
    for (uint32_t i = 0; i < size; i++) {
        t[i] = be64_to_cpu(t[i]);
        if (!qcow2_bitmap_table_entry_valid(s, t[i])) {
            *bad = i;
            free(t);
            return NULL;
        }
    }
    return t;
}

/* ---- loading ---- */

/*
 * One directory entry against QEMU's check_dir_entry.  Returns NULL when
 * it satisfies the constraints, else the field that does not.
 */
static const char *dirent_problem(const struct qcow2_state *s,
                                  const struct qcow2_bitmap_dirent *d,
                                  uint8_t type, uint16_t name_size,
                                  char *why, size_t why_len)
{
    if (d->table_size == 0)
        return "bitmap_table_size is 0";
    if (d->table_offset == 0)
        return "bitmap_table_offset is 0";
    if (!IS_ALIGNED(d->table_offset, s->cluster_size)) {
        snprintf(why, why_len, "bitmap_table_offset 0x%" PRIx64 " is not "
                 "cluster aligned", d->table_offset);
        return why;
    }
    if (d->table_size > QCOW2_BME_MAX_TABLE_SIZE) {
        snprintf(why, why_len, "bitmap_table_size %u exceeds %llu", d->table_size,
                 QCOW2_BME_MAX_TABLE_SIZE);
        return why;
    }
    if (d->granularity_bits > QCOW2_BME_MAX_GRANULARITY_BITS ||
        d->granularity_bits < QCOW2_BME_MIN_GRANULARITY_BITS) {
        snprintf(why, why_len, "granularity_bits %u is outside %d..%d",
                 d->granularity_bits, QCOW2_BME_MIN_GRANULARITY_BITS,
                 QCOW2_BME_MAX_GRANULARITY_BITS);
        return why;
    }
    if (d->flags & QCOW2_BME_RESERVED_FLAGS) {
        snprintf(why, why_len, "flags 0x%x has reserved bits set", d->flags);
        return why;
    }
    if (name_size > QCOW2_BME_MAX_NAME_SIZE) {
        snprintf(why, why_len, "name_size %u exceeds %d", name_size,
                 QCOW2_BME_MAX_NAME_SIZE);
        return why;
    }
    if (type != QCOW2_BME_TYPE_DIRTY_TRACKING) {
        snprintf(why, why_len, "type %u is not 1 (dirty tracking)", type);
        return why;
    }
    uint64_t phys = (uint64_t)d->table_size << s->cluster_bits;
    if (phys > QCOW2_BME_MAX_PHYS_SIZE) {
        snprintf(why, why_len, "bitmap_table_size %u covers %" PRIu64
                 " bytes of bits, more than %llu", d->table_size, phys,
                 QCOW2_BME_MAX_PHYS_SIZE);
        return why;
    }
    /* phys <= 2^29 and granularity_bits <= 31: no overflow. */
    if (!(d->flags & QCOW2_BME_FLAG_IN_USE) &&
        s->h.size > ((phys * 8) << d->granularity_bits)) {
        snprintf(why, why_len, "bitmap_table_size %u is too small for the "
                 "virtual size %" PRIu64, d->table_size, s->h.size);
        return why;
    }
    return NULL;
}

/* The header fields of the extension (QEMU's qcow2_read_extensions). */
static int check_ext(struct qcow2_state *s, struct cbt_error **errp)
{
    const struct qcow2_bitmaps_ext *e = &s->bm_ext;
    const char *fn = fname(s);
    if (e->reserved != 0) {
        cbt_error_set(errp, EINVAL, "%s: bitmaps_ext: Reserved field is not "
                      "zero (0x%x)", fn, e->reserved);
        return -1;
    }
    if (e->nb_bitmaps > QCOW2_MAX_BITMAPS) {
        cbt_error_set(errp, EINVAL, "%s: bitmaps_ext: Image has %u bitmaps, "
                      "exceeding the QEMU supported maximum of %d", fn,
                      e->nb_bitmaps, QCOW2_MAX_BITMAPS);
        return -1;
    }
    if (e->nb_bitmaps == 0) {
        cbt_error_set(errp, EINVAL, "%s: found bitmaps extension with zero "
                      "bitmaps", fn);
        return -1;
    }
    if (!IS_ALIGNED(e->dir_offset, s->cluster_size)) {
        cbt_error_set(errp, EINVAL, "%s: bitmaps_ext: invalid bitmap directory "
                      "offset 0x%" PRIx64 " (not cluster aligned)", fn,
                      e->dir_offset);
        return -1;
    }
    if (e->dir_size > QCOW2_MAX_BITMAP_DIR_SIZE) {
        cbt_error_set(errp, EINVAL, "%s: bitmaps_ext: bitmap directory size "
                      "(%" PRIu64 ") exceeds the maximum supported size (%llu)",
                      fn, e->dir_size, QCOW2_MAX_BITMAP_DIR_SIZE);
        return -1;
    }
    if (e->dir_size == 0) {
        cbt_error_set(errp, EINVAL, "%s: Requested bitmap directory size is "
                      "zero", fn);
        return -1;
    }
    return 0;
}

/* A set of names, to find duplicates in O(n) (a directory may hold 65535
 * entries from a hostile file). */
struct name_set {
    const char **slot;
    size_t cap; /* a power of two, at least twice the names */
};

static uint64_t name_hash(const char *p, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ull; /* FNV-1a */
    for (size_t i = 0; i < n; i++)
        h = (h ^ (uint8_t)p[i]) * 0x100000001b3ull;
    return h;
}

static int name_set_init(struct name_set *ns, size_t max)
{
    ns->cap = 16;
    while (ns->cap < 2 * max)
        ns->cap *= 2;
    ns->slot = calloc(ns->cap, sizeof(*ns->slot));
    return ns->slot ? 0 : -ENOMEM;
}

/* Add a NUL-terminated name; false if it is there already. */
static bool name_set_add(struct name_set *ns, const char *name)
{
    size_t i = name_hash(name, strlen(name)) & (ns->cap - 1);
    for (; ns->slot[i]; i = (i + 1) & (ns->cap - 1))
        if (strcmp(ns->slot[i], name) == 0)
            return false;
    ns->slot[i] = name;
    return true;
}

/* Why a directory entry cannot be loaded (its fixed part and name are
 * inside the directory), or NULL: extra data, QEMU's check_dir_entry, and
 * a name that is empty or holds a NUL byte. */
static const char *entry_problem(const struct qcow2_state *s,
                                 const struct dirent_raw *r, uint32_t index,
                                 char *why, size_t why_len)
{
    uint16_t name_size = r->name_size;
    const char *name = r->name;
    if (r->extra_size != 0) {
        snprintf(why, why_len, "Bitmap extra data is not supported (bitmap "
                 "%u has extra_data_size %u)", index, r->extra_size);
        return why;
    }
    struct qcow2_bitmap_dirent d = {
        .table_offset = r->table_offset, .table_size = r->table_size,
        .flags = r->flags, .granularity_bits = r->granularity_bits,
    };
    char field[160];
    const char *problem = dirent_problem(s, &d, r->type, name_size, field,
                                         sizeof(field));
    if (problem) {
        snprintf(why, why_len, "Bitmap '%.*s' doesn't satisfy the "
                 "constraints: %s", (int)MIN(name_size, 1023), name, problem);
        return why;
    }
    if (name_size == 0 || memchr(name, 0, name_size)) {
        snprintf(why, why_len, "bitmap %u of the directory has an empty name "
                 "or a name with a NUL byte", index);
        return why;
    }
    return NULL;
}

int qcow2_bitmap_dir_parse(const struct qcow2_state *s, const uint8_t *dir,
                           uint64_t size, uint32_t nb,
                           struct qcow2_bitmap_dirent **out, uint32_t *nout,
                           char *why, size_t why_len)
{
    *out = NULL;
    *nout = 0;
    if (size == 0) {
        snprintf(why, why_len, "Requested bitmap directory size is zero");
        return -EINVAL;
    }
    if (size > QCOW2_MAX_BITMAP_DIR_SIZE) {
        snprintf(why, why_len, "Requested bitmap directory size is too big");
        return -EINVAL;
    }
    if (nb > QCOW2_MAX_BITMAPS) {
        snprintf(why, why_len, "Image has %u bitmaps, exceeding the QEMU "
                 "supported maximum of %d", nb, QCOW2_MAX_BITMAPS);
        return -EINVAL;
    }
    struct qcow2_bitmap_dirent *v = calloc(MAX(nb, 1), sizeof(*v));
    struct name_set names = { NULL, 0 };
    if (!v || name_set_init(&names, nb) < 0) {
        free(v);
        snprintf(why, why_len, "out of memory for the bitmap directory");
        return -ENOMEM;
    }
    int r = -EINVAL;
    uint32_t n = 0;
    uint64_t pos = 0;
    while (pos < size) {
        struct dirent_raw e;
        bool whole = dirent_decode(dir, size, pos, &e);
        if (!whole && size - pos < QCOW2_BME_FIXED_SIZE)
            goto broken;
        if (n == nb) {
            snprintf(why, why_len, "More bitmaps found than specified in "
                     "header extension (%u)", nb);
            goto fail;
        }
        if (!whole)
            goto broken;
        if (entry_problem(s, &e, n, why, why_len))
            goto fail;
        uint64_t esize = e.size;
        struct qcow2_bitmap_dirent *d = &v[n];
        d->table_offset = e.table_offset;
        d->table_size = e.table_size;
        d->flags = e.flags;
        d->granularity_bits = e.granularity_bits;
        d->name = strndup(e.name, e.name_size);
        if (!d->name) {
            snprintf(why, why_len, "out of memory");
            r = -ENOMEM;
            goto fail;
        }
        n++;
        if (!name_set_add(&names, d->name)) {
            snprintf(why, why_len, "Bitmap already exists: %s (two directory "
                     "entries have this name)", d->name);
            goto fail;
        }
        pos += esize;
    }
    if (n != nb) {
        snprintf(why, why_len, "Less bitmaps found than specified in header "
                 "extension (%u found, %u specified)", n, nb);
        goto fail;
    }
    free(names.slot);
    *out = v;
    *nout = n;
    return 0;
broken:
    snprintf(why, why_len, "Broken bitmap directory (entry %u at byte %" PRIu64
             " runs past its end)", n, pos);
fail:
    free(names.slot);
    free_dir(v, n);
    return r;
}

void qcow2_bitmap_dir_free(struct qcow2_bitmap_dirent *dir, uint32_t n)
{
    free_dir(dir, n);
}

uint64_t qcow2_bitmap_table_entries(const struct qcow2_state *s, uint64_t size,
                                    unsigned granularity_bits)
{
    return table_entries(s, size, granularity_bits);
}

/* Does [off, off+len) lie past the end of the file (flen bytes)?  A read
 * there gives zeroes: an empty directory, or bits read as clean. */
static bool past_eof(uint64_t off, uint64_t len, uint64_t flen)
{
    return off > flen || len > flen - off;
}

/* Read and check the directory (QEMU's bitmap_list_load). */
static int load_dir(struct qcow2_state *s, uint64_t flen,
                    struct cbt_error **errp)
{
    const char *fn = fname(s);
    uint64_t size = s->bm_ext.dir_size; /* checked: <= 64 MiB */
    if (past_eof(s->bm_ext.dir_offset, size, flen)) {
        cbt_error_set(errp, EINVAL, "%s: the bitmap directory (offset 0x%"
                      PRIx64 ", %" PRIu64 " bytes) lies past the end of the "
                      "file (%" PRIu64 " bytes)", fn, s->bm_ext.dir_offset,
                      size, flen);
        return -1;
    }
    CLEANUP_FREE uint8_t *dir = malloc(size ? size : 1);
    if (!dir) {
        cbt_error_set(errp, ENOMEM, "%s: out of memory for the bitmap "
                      "directory", fn);
        return -1;
    }
    int r = file_pread_full(s->node->fd, dir, size, s->bm_ext.dir_offset);
    if (r < 0) {
        cbt_error_set(errp, -r, "%s: Failed to read bitmap directory: %s", fn,
                      strerror(-r));
        return -1;
    }
    char why[1200];
    r = qcow2_bitmap_dir_parse(s, dir, size, s->bm_ext.nb_bitmaps, &s->bm_dir,
                               &s->bm_dir_n, why, sizeof(why));
    if (r < 0) {
        cbt_error_set(errp, -r, "%s: %s", fn, why);
        return -1;
    }
    return 0;
}

/*
 * Check the table of a bitmap that was not in_use (the checks of QEMU's
 * load_bitmap) and count what it holds on disk.  Done at open for every
 * bitmap, so a damaged table fails the open as it does in QEMU, even when
 * the bits are only read later (qcow2_bitmap_read).
 */
static int check_table(struct qcow2_state *s, const struct qcow2_bitmap_dirent *d,
                       uint64_t flen, uint64_t *disk_bytes,
                       struct cbt_error **errp)
{
    const char *fn = fname(s);
    uint64_t bad;
    int err;
    if (past_eof(d->table_offset, (uint64_t)d->table_size * 8, flen)) {
        cbt_error_set(errp, EINVAL, "%s: Could not read bitmap '%s' from "
                      "image: its table (offset 0x%" PRIx64 ", %u entries) "
                      "lies past the end of the file (%" PRIu64 " bytes); "
                      "a repair drops the bitmap", fn,
                      d->name, d->table_offset, d->table_size, flen);
        cbt_error_set_remedy(errp, CBT_REMEDY_REPAIR);
        return -1;
    }
    CLEANUP_FREE uint64_t *t = read_table(s, d->table_offset, d->table_size,
                                          &bad, &err);
    if (!t) {
        if (bad != UINT64_MAX)
            cbt_error_set(errp, EINVAL, "%s: Could not read bitmap_table table "
                          "from image for bitmap '%s': entry %" PRIu64
                          " is invalid", fn, d->name, bad);
        else
            cbt_error_set(errp, -err, "%s: Could not read bitmap_table table "
                          "from image for bitmap '%s': %s", fn, d->name,
                          strerror(-err));
        return -1;
    }
    uint64_t want = table_entries(s, s->h.size, d->granularity_bits);
    if (d->table_size != want) {
        cbt_error_set(errp, EINVAL, "%s: Could not read bitmap '%s' from image: "
                      "bitmap_table_size is %u, but its granularity and the "
                      "virtual size need %" PRIu64, fn, d->name, d->table_size,
                      want);
        return -1;
    }
    uint64_t used = 0;
    for (uint32_t i = 0; i < d->table_size; i++) {
        uint64_t off = t[i] & QCOW2_BME_TABLE_OFFSET_MASK;
        if (off == 0)
            continue;
        if (past_eof(off, 1, flen)) {
            cbt_error_set(errp, EINVAL, "%s: Could not read bitmap '%s' from "
                          "image: table entry %u points at 0x%" PRIx64 ", past "
                          "the end of the file (%" PRIu64 " bytes); a repair "
                          "drops the bitmap", fn, d->name, i, off, flen);
            cbt_error_set_remedy(errp, CBT_REMEDY_REPAIR);
            return -1;
        }
        used += s->cluster_size;
    }
    *disk_bytes = used + table_bytes_on_disk(s, d->table_size);
    return 0;
}

/* The directory entry whose table holds the bits of b (b->disk_key).  Its
 * in_use flag may be ours (set before the first write): the table still
 * holds the bits of the last store, and a bitmap that writes dirty was
 * loaded before that flag was set. */
static const struct qcow2_bitmap_dirent *dirent_of_bits(
    const struct qcow2_state *s, const struct blk_bitmap *b)
{
    unsigned gbits = (unsigned)__builtin_ctzll(b->granularity);
    for (uint32_t i = 0; i < s->bm_dir_n; i++) {
        const struct qcow2_bitmap_dirent *d = &s->bm_dir[i];
        if (d->table_offset == b->disk_key && d->granularity_bits == gbits &&
            d->table_size == table_entries(s, s->h.size, gbits))
            return d;
    }
    return NULL;
}

/* The bits of an on_disk bitmap, a cluster at a time (QEMU's load_bitmap
 * reads them the same way, at open).  The table was checked at open; it is
 * read again (8 bytes a cluster of bits) rather than kept. */
int qcow2_bitmap_read(struct blk_node *node, const struct blk_bitmap *b,
                      blk_bitmap_chunk_fn *cb, void *opaque,
                      struct cbt_error **errp)
{
    struct qcow2_state *s = qcow2_state(node);
    const char *fn = fname(s);
    const struct qcow2_bitmap_dirent *d = dirent_of_bits(s, b);
    if (!d) {
        cbt_error_set(errp, EIO, "%s: Could not read bitmap '%s' from image: "
                      "its table is no longer in the bitmap directory", fn,
                      b->name);
        return -1;
    }
    uint64_t bad;
    int err;
    CLEANUP_FREE uint64_t *t = read_table(s, d->table_offset, d->table_size,
                                          &bad, &err);
    if (!t) {
        if (err == 0)
            err = -EINVAL;
        cbt_error_set(errp, -err, "%s: Could not read bitmap_table table "
                      "from image for bitmap '%s': %s", fn, b->name,
                      bad == UINT64_MAX ? strerror(-err) : "invalid entry");
        return -1;
    }
    CLEANUP_FREE uint8_t *buf = malloc(s->cluster_size);
    if (!buf) {
        cbt_error_set(errp, ENOMEM, "%s: out of memory", fn);
        return -1;
    }
    for (uint32_t i = 0; i < d->table_size; i++) {
        uint64_t off = t[i] & QCOW2_BME_TABLE_OFFSET_MASK;
        int r;
        if (off == 0) {
            r = cb(opaque, i, s->cluster_size, NULL,
                   t[i] & QCOW2_BME_TABLE_ALL_ONES);
        } else {
            r = file_pread_full(s->node->fd, buf, s->cluster_size, off);
            if (r < 0) {
                cbt_error_set(errp, -r, "%s: Could not read bitmap '%s' from "
                              "image: %s", fn, b->name, strerror(-r));
                return -1;
            }
            r = cb(opaque, i, s->cluster_size, buf, false);
        }
        if (r)
            return r;
    }
    return 0;
}

/* Bytes an in_use bitmap holds on disk, as far as its table can tell.
 * Only for the report: once *budget bytes of tables were read, the tables
 * alone are counted (a hostile directory may hold 65535 such entries). */
static uint64_t inconsistent_disk_bytes(struct qcow2_state *s,
                                        const struct qcow2_bitmap_dirent *d,
                                        uint64_t *budget)
{
    uint64_t bytes = table_bytes_on_disk(s, d->table_size), bad;
    uint64_t tbytes = (uint64_t)d->table_size * 8;
    if (tbytes > *budget)
        return bytes;
    *budget -= tbytes;
    int err;
    uint64_t *t = read_table(s, d->table_offset, d->table_size, &bad, &err);
    for (uint32_t i = 0; t && i < d->table_size; i++)
        if (t[i] & QCOW2_BME_TABLE_OFFSET_MASK)
            bytes += s->cluster_size;
    free(t);
    return bytes;
}

int qcow2_bitmaps_load(struct qcow2_state *s, bool rw, struct cbt_error **errp)
{
    struct blk_node *node = s->node;
    const char *fn = fname(s);
    s->bm_loaded = !s->check_mode;
    if (!s->bm_ext.present)
        return 0;
    if (s->bm_ext.len != QCOW2_BITMAPS_EXT_SIZE) {
        if (s->check_mode)
            return 0; /* check reports it */
        cbt_error_set(errp, EINVAL, "%s: bitmaps_ext: Invalid extension length "
                      "(%u bytes, must be %d)", fn, s->bm_ext.len,
                      QCOW2_BITMAPS_EXT_SIZE);
        return -1;
    }
    if (!(s->h.autoclear_features & QCOW2_AUTOCLEAR_BITMAPS)) {
        if (s->h.version < 3)
            warn_to(&s->node->warner,
                    "%s: This qcow2 v2 image contains bitmaps, but they may "
                    "have been modified by a program without persistent "
                    "bitmap support; so now they must all be considered "
                    "inconsistent. Some clusters may be leaked; a check "
                    "repairing leaks frees them.", fn);
        else
            warn_to(&s->node->warner,
                    "%s: a program lacking bitmap support modified this "
                    "file, so all bitmaps are now considered inconsistent. "
                    "Some clusters may be leaked; a check repairing leaks "
                    "frees them.", fn);
        /* Forget the extension; a read-write open rewrites the header
         * without it, as QEMU. */
        s->bm_ext = (struct qcow2_bitmaps_ext){ .present = false };
        if (rw)
            s->header_dirty = true;
        return 0;
    }
    if (s->check_mode)
        return 0; /* check validates and counts it itself */
    uint64_t flen;
    int fr = file_size(node->fd, &flen);
    if (fr < 0) {
        cbt_error_set(errp, -fr, "%s: %s", fn, strerror(-fr));
        return -1;
    }
    if (check_ext(s, errp) < 0 || load_dir(s, flen, errp) < 0)
        return -1;

    uint64_t total_bits = 0;
    uint64_t budget = 64ull << 20; /* bytes of in_use tables to read */
    for (uint32_t i = 0; i < s->bm_dir_n; i++) {
        const struct qcow2_bitmap_dirent *d = &s->bm_dir[i];
        struct blk_bitmap b = {
            .granularity = 1ull << d->granularity_bits,
            .persistent = true,
            .in_use = d->flags & QCOW2_BME_FLAG_IN_USE,
            .disk_auto = d->flags & QCOW2_BME_FLAG_AUTO,
        };
        if (b.in_use) {
            /* Its contents are unknown: keep it, unusable, until removed. */
            b.inconsistent = true;
            b.disk_bytes = inconsistent_disk_bytes(s, d, &budget);
        } else {
            b.recording = d->flags & QCOW2_BME_FLAG_AUTO;
            total_bits += DIV_ROUND_UP(s->h.size, b.granularity);
            if (total_bits > MAX_LOADED_BITS) {
                cbt_error_set(errp, EFBIG, "%s: the bitmaps need more than "
                              "%llu bits of memory in all (at bitmap '%s')",
                              fn, MAX_LOADED_BITS, d->name);
                return -1;
            }
            if (check_table(s, d, flen, &b.disk_bytes, errp) < 0)
                return -1;
            /* The bits stay on disk until asked for (struct blk_bitmap,
             * "Lazy bits"); the first write loads the recording ones. */
            b.on_disk = true;
            b.disk_key = d->table_offset;
        }
        b.name = strdup(d->name);
        if (!b.name || blk_bitmap_append(node, &b) < 0) {
            free(b.name);
            bm_free(b.bm);
            cbt_error_set(errp, ENOMEM, "%s: out of memory", fn);
            return -1;
        }
    }
    return 0;
}

/* ---- storing ---- */

/* One entry of the directory being built. */
struct new_entry {
    const char *name;
    struct blk_bitmap *b;      /* the node's bitmap it stores, if any */
    uint64_t table_offset;
    uint32_t table_size;
    uint32_t flags;
    uint8_t granularity_bits;
    bool fresh;                /* table and data written by this store */
    bool grown;                /* GROW_TABLES: a longer copy of the table
                                * at old_table_offset; the data clusters
                                * stay shared with it */
    uint64_t old_table_offset;
    uint32_t old_table_size;
    uint64_t disk_bytes;
};

static const struct qcow2_bitmap_dirent *find_dirent(const struct qcow2_state *s,
                                                     const char *name)
{
    for (uint32_t i = 0; i < s->bm_dir_n; i++)
        if (strcmp(s->bm_dir[i].name, name) == 0)
            return &s->bm_dir[i];
    return NULL;
}

/*
 * Give clusters back at once.  The caller knows nothing on disk refers to
 * them (the synced header no longer points at them, or never did), so the
 * deferral of qcow2_free_clusters_deferred is not needed, and an error
 * here (a refcount that would drop below zero: a corrupt image) only
 * leaks what is left instead of failing every later flush.  Whole freed
 * clusters are punched out of the file, as QEMU discards bitmap clusters.
 */
static int release(struct qcow2_state *s, uint64_t off, uint64_t len)
{
    /* Nothing but bitmaps may live there (the map holds the directory in
     * force, which no longer has these clusters). */
    int r = qcow2_pre_free(s, off, len, 0);
    if (r == 0)
        r = qcow2_update_refcount(s, off, len, -1);
    if (r < 0)
        return r;
    /* One punch per run of freed clusters: each call can cost a journal
     * commit (tens of ms on a busy ext4), and a bitmap's data clusters
     * were allocated in a row. */
    uint64_t run = 0, run_len = 0;
    for (uint64_t c = ALIGN_DOWN(off, s->cluster_size); c < off + len;
         c += s->cluster_size) {
        uint64_t rc;
        if (qcow2_get_refcount(s, c >> s->cluster_bits, &rc) == 0 && rc == 0) {
            if (run_len == 0)
                run = c;
            run_len += s->cluster_size;
            continue;
        }
        if (run_len)
            (void)file_punch_hole(s->node->fd, run, run_len);
        run_len = 0;
    }
    if (run_len)
        (void)file_punch_hole(s->node->fd, run, run_len);
    return 0;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Free a table and the data clusters it points at.  A table that cannot
 * be read or is invalid keeps its data (leaked, never a wrong cluster
 * freed). */
static int free_table(struct qcow2_state *s, uint64_t table_offset,
                      uint32_t table_size)
{
    uint64_t bad;
    int err;
    uint64_t *t = read_table(s, table_offset, table_size, &bad, &err);
    int r = 0;
    /* The data clusters in order of offset, released a run of adjacent
     * ones at a time (a store allocates them in a row).  A cluster the
     * table names twice (a corrupt image) is released twice, as before:
     * the second fails and the rest leaks. */
    uint32_t n = 0;
    for (uint32_t i = 0; t && i < table_size; i++)
        if (t[i] & QCOW2_BME_TABLE_OFFSET_MASK)
            t[n++] = t[i] & QCOW2_BME_TABLE_OFFSET_MASK;
    if (t)
        qsort(t, n, sizeof(*t), cmp_u64);
    for (uint32_t i = 0; t && i < n && r == 0;) {
        uint32_t j = i + 1;
        while (j < n && t[j] == t[j - 1] + s->cluster_size)
            j++;
        r = release(s, t[i], (uint64_t)(j - i) * s->cluster_size);
        i = j;
    }
    free(t);
    if (r == 0)
        r = release(s, table_offset, (uint64_t)table_size * 8);
    return r;
}

/* Undo the allocations of a store that did not reach the header. */
static void drop_fresh(struct qcow2_state *s, const uint64_t *tab,
                       uint64_t tab_n, const struct new_entry *v, size_t n)
{
    for (uint64_t i = 0; tab && i < tab_n; i++)
        if (tab[i] & QCOW2_BME_TABLE_OFFSET_MASK)
            (void)release(s, tab[i] & QCOW2_BME_TABLE_OFFSET_MASK,
                          s->cluster_size);
    for (size_t i = 0; i < n; i++) {
        if (v[i].fresh)
            (void)free_table(s, v[i].table_offset, v[i].table_size);
        else if (v[i].grown) /* its data belongs to the old table */
            (void)release(s, v[i].table_offset,
                          (uint64_t)v[i].table_size * 8);
    }
}

/*
 * Step 4: free the old directory and every old table (with its data) the
 * new directory does not keep.  A table shared by several entries (a
 * corrupt image) is freed once.
 */
static int free_old(struct qcow2_state *s, const struct qcow2_bitmaps_ext *old,
                    const struct qcow2_bitmap_dirent *old_dir, uint32_t old_n,
                    const struct new_entry *v, size_t k)
{
    int r = 0;
    if (old->present && old->len == QCOW2_BITMAPS_EXT_SIZE && old->dir_size)
        r = release(s, old->dir_offset, old->dir_size);
    uint64_t *keep = calloc(2 * k + 1, sizeof(*keep));
    /* pairs (table offset, table size), sorted by offset */
    uint64_t (*drop)[2] = calloc(old_n + 1, sizeof(*drop));
    if (!keep || !drop) {
        free(keep);
        free(drop);
        return -ENOMEM;
    }
    size_t nk = 0, nd = 0;
    for (size_t j = 0; j < k; j++) {
        if (!v[j].fresh)
            keep[nk++] = v[j].table_offset;
        if (v[j].grown) {
            /* The longer copy took over the data clusters: only the old
             * table goes (and never with its data, below). */
            keep[nk++] = v[j].old_table_offset;
            if (r == 0)
                r = release(s, v[j].old_table_offset,
                            (uint64_t)v[j].old_table_size * 8);
        }
    }
    qsort(keep, nk, sizeof(*keep), cmp_u64);
    for (uint32_t i = 0; i < old_n; i++) {
        const struct qcow2_bitmap_dirent *d = &old_dir[i];
        if (!bsearch(&d->table_offset, keep, nk, sizeof(*keep), cmp_u64)) {
            drop[nd][0] = d->table_offset;
            drop[nd++][1] = d->table_size;
        }
    }
    qsort(drop, nd, sizeof(*drop), cmp_u64); /* by the first member */
    for (size_t i = 0; i < nd && r == 0; i++)
        if (i == 0 || drop[i][0] != drop[i - 1][0])
            r = free_table(s, drop[i][0], (uint32_t)drop[i][1]);
    free(keep);
    free(drop);
    return r;
}

/*
 * Write the bits of b to fresh data clusters and a fresh table (QEMU's
 * store_bitmap): chunk i of the bit stream goes to its own cluster unless
 * it is all clean (entry 0).
 */
static int write_bitmap(struct qcow2_state *s, struct new_entry *ne,
                        uint8_t *buf, struct cbt_error **errp)
{
    const char *fn = fname(s);
    const struct blk_bitmap *b = ne->b;
    uint64_t cs = s->cluster_size;
    uint64_t tb_size = table_entries(s, bm_size(b->bm),
                                     bm_granularity_bits(b->bm));
    if (tb_size > QCOW2_BME_MAX_TABLE_SIZE ||
        tb_size * cs > QCOW2_BME_MAX_PHYS_SIZE) {
        cbt_error_set(errp, EFBIG, "%s: Bitmap '%s' is too big", fn, b->name);
        return -1;
    }
    if (tb_size == 0) {
        cbt_error_set(errp, EINVAL, "%s: Bitmap '%s' cannot be stored: the "
                      "image is empty", fn, b->name);
        return -1;
    }
    uint64_t *tab = calloc(tb_size, 8);
    if (!tab) {
        cbt_error_set(errp, ENOMEM, "%s: out of memory", fn);
        return -1;
    }
    uint64_t used = 0;
    int r = 0;
    for (uint64_t i = 0; i < tb_size; i++) {
        if (bm_chunk_is_clean(b->bm, i, cs))
            continue;
        int64_t off = qcow2_alloc_clusters_append(s, 1);
        if (off < 0) {
            r = (int)off;
            cbt_error_set(errp, -r, "%s: Failed to allocate clusters for "
                          "bitmap '%s': %s", fn, b->name, strerror(-r));
            goto fail;
        }
        tab[i] = (uint64_t)off;
        bm_serialize_chunk(b->bm, i, cs, buf);
        r = qcow2_pwrite_meta(s, buf, cs, (uint64_t)off, 0);
        if (r < 0) {
            cbt_error_set(errp, -r, "%s: Failed to write bitmap '%s' to file: "
                          "%s", fn, b->name, qcow2_strerror(s, r));
            goto fail;
        }
        used += cs;
    }
    uint64_t tbytes = tb_size * 8;
    uint64_t cbytes = table_bytes_on_disk(s, (uint32_t)tb_size);
    int64_t toff = qcow2_alloc_clusters_append(s, cbytes >> s->cluster_bits);
    if (toff < 0) {
        r = (int)toff;
        cbt_error_set(errp, -r, "%s: Failed to allocate clusters for bitmap "
                      "'%s': %s", fn, b->name, strerror(-r));
        goto fail;
    }
    uint8_t *be = calloc(1, cbytes);
    if (!be) {
        r = -ENOMEM;
        cbt_error_set(errp, ENOMEM, "%s: out of memory", fn);
    } else {
        for (uint64_t i = 0; i < tb_size; i++)
            stbe64(be + 8 * i, tab[i]);
        r = qcow2_pwrite_meta(s, be, cbytes, (uint64_t)toff, 0);
        free(be);
        if (r < 0)
            cbt_error_set(errp, -r, "%s: Failed to write bitmap '%s' to file: "
                          "%s", fn, b->name, qcow2_strerror(s, r));
    }
    if (r < 0) {
        (void)release(s, (uint64_t)toff, tbytes);
        goto fail;
    }
    s->need_sync = true;
    ne->table_offset = (uint64_t)toff;
    ne->table_size = (uint32_t)tb_size;
    ne->fresh = true;
    ne->disk_bytes = used + cbytes;
    free(tab);
    return 0;
fail:
    s->need_sync = true;
    drop_fresh(s, tab, tb_size, NULL, 0);
    free(tab);
    return -1;
}

/* Does the directory on disk already hold exactly these entries? */
static bool same_as_disk(const struct qcow2_state *s, const struct new_entry *v,
                         size_t n)
{
    if (n != s->bm_dir_n)
        return false;
    for (size_t i = 0; i < n; i++) {
        const struct qcow2_bitmap_dirent *d = &s->bm_dir[i];
        if (v[i].fresh || strcmp(v[i].name, d->name) != 0 ||
            v[i].table_offset != d->table_offset ||
            v[i].table_size != d->table_size || v[i].flags != d->flags ||
            v[i].granularity_bits != d->granularity_bits)
            return false;
    }
    return true;
}

enum store_mode {
    STORE_ALL,       /* the node's persistent bitmaps, bits written afresh */
    MARK_RECORDING,  /* the directory on disk, its 'auto' entries in_use */
    MARK_ALL,        /* the directory on disk, every entry in_use */
    GROW_TABLES,     /* the directory on disk, tables too short for the
                      * size being grown to replaced by longer copies;
                      * the header switch carries the new size */
};

/*
 * GROW_TABLES: a copy of d's table long enough for `size`, the new
 * entries zero (clean), written to fresh clusters; the data clusters stay
 * where they are, shared until the switch frees the old table.  QEMU loads
 * a table only when its length is exact for the image's size, so the
 * switch to these must be the header update that changes the size
 * (qcow2_resize sets h.size first).
 */
static int grow_table(struct qcow2_state *s, const struct qcow2_bitmap_dirent *d,
                      uint64_t need, struct new_entry *ne,
                      struct cbt_error **errp)
{
    const char *fn = fname(s);
    if (need > QCOW2_BME_MAX_TABLE_SIZE ||
        need * s->cluster_size > QCOW2_BME_MAX_PHYS_SIZE) {
        cbt_error_set(errp, EFBIG, "%s: bitmap '%s' would be too big for the "
                      "new size", fn, d->name);
        return -1;
    }
    uint64_t bad;
    int err;
    uint64_t *t = read_table(s, d->table_offset, d->table_size, &bad, &err);
    if (!t) {
        if (err == 0)
            err = -EINVAL;
        cbt_error_set(errp, -err, "%s: cannot read the table of bitmap '%s': "
                      "%s", fn, d->name, bad == UINT64_MAX ? strerror(-err)
                      : "invalid entry");
        return -1;
    }
    uint64_t cbytes = table_bytes_on_disk(s, (uint32_t)need);
    uint8_t *be = calloc(1, cbytes);
    int r = be ? 0 : -ENOMEM;
    for (uint32_t i = 0; be && i < d->table_size; i++)
        stbe64(be + 8 * i, t[i]);
    free(t);
    int64_t toff = r < 0 ? r : qcow2_alloc_clusters_append(s, cbytes >> s->cluster_bits);
    if (toff < 0) {
        free(be);
        cbt_error_set(errp, (int)-toff, "%s: cannot allocate a table for "
                      "bitmap '%s': %s", fn, d->name, strerror((int)-toff));
        return -1;
    }
    r = qcow2_pwrite_meta(s, be, cbytes, (uint64_t)toff, 0);
    free(be);
    s->need_sync = true;
    if (r < 0) {
        (void)release(s, (uint64_t)toff, need * 8);
        cbt_error_set(errp, -r, "%s: cannot write the table of bitmap '%s': "
                      "%s", fn, d->name, qcow2_strerror(s, r));
        return -1;
    }
    ne->old_table_offset = d->table_offset;
    ne->old_table_size = d->table_size;
    ne->table_offset = (uint64_t)toff;
    ne->table_size = (uint32_t)need;
    ne->grown = true;
    return 0;
}

/* The entries of the new directory (step 1 of the protocol). */
static int build_entries(struct qcow2_state *s, enum store_mode mode,
                         uint64_t grow_size, struct new_entry *v, size_t *nv,
                         uint8_t *buf, struct cbt_error **errp)
{
    struct blk_node *node = s->node;
    size_t k = 0;
    if (mode != STORE_ALL) {
        /* Only flags change; every table stays where it is. */
        for (uint32_t i = 0; i < s->bm_dir_n; i++) {
            const struct qcow2_bitmap_dirent *d = &s->bm_dir[i];
            v[k] = (struct new_entry){
                .name = d->name,
                .table_offset = d->table_offset,
                .table_size = d->table_size,
                .flags = d->flags,
                .granularity_bits = d->granularity_bits,
            };
            if (mode == MARK_ALL ||
                (mode == MARK_RECORDING && (d->flags & QCOW2_BME_FLAG_AUTO)))
                v[k].flags |= QCOW2_BME_FLAG_IN_USE;
            /* An in_use entry has no size to satisfy (QEMU's rule). */
            if (mode == GROW_TABLES && !(d->flags & QCOW2_BME_FLAG_IN_USE)) {
                uint64_t need = table_entries(s, grow_size, d->granularity_bits);
                if (need > d->table_size &&
                    grow_table(s, d, need, &v[k], errp) < 0) {
                    *nv = k;
                    return -1;
                }
            }
            k++;
        }
        *nv = k;
        return 0;
    }
    for (size_t i = 0; i < node->bitmaps.n; i++) {
        struct blk_bitmap *b = &node->bitmaps.v[i];
        if (!b->persistent)
            continue;
        struct new_entry *ne = &v[k];
        *ne = (struct new_entry){ .name = b->name, .b = b,
                                  .disk_bytes = b->disk_bytes };
        const struct qcow2_bitmap_dirent *kd =
            b->disk_key && !b->inconsistent ? dirent_of_bits(s, b) : NULL;
        if (b->inconsistent) {
            /* Kept on disk as it is until removed. */
            const struct qcow2_bitmap_dirent *d = find_dirent(s, b->name);
            if (!d)
                continue; /* never stored: nothing to keep */
            ne->table_offset = d->table_offset;
            ne->table_size = d->table_size;
            ne->granularity_bits = d->granularity_bits;
            ne->flags = d->flags;
        } else if (kd || b->on_disk) {
            /* Bits unchanged since they were read or stored (never loaded,
             * or loaded and not changed): the entry keeps the table it has
             * on disk, found by offset (it may have been renamed).  Only
             * changed bitmaps are written (QEMU rewrites every one). */
            const struct qcow2_bitmap_dirent *d = kd;
            if (!d) {
                cbt_error_set(errp, EIO, "%s: bitmap '%s' cannot be stored: "
                              "its table is no longer in the bitmap "
                              "directory", fname(s), b->name);
                *nv = k;
                return -1;
            }
            ne->table_offset = d->table_offset;
            ne->table_size = d->table_size;
            ne->granularity_bits = d->granularity_bits;
            ne->flags = b->recording ? QCOW2_BME_FLAG_AUTO : 0;
        } else {
            ne->granularity_bits = (uint8_t)bm_granularity_bits(b->bm);
            ne->flags = b->recording ? QCOW2_BME_FLAG_AUTO : 0;
            if (write_bitmap(s, ne, buf, errp) < 0) {
                *nv = k;
                return -1;
            }
        }
        k++;
    }
    *nv = k;
    return 0;
}

/*
 * Before a store: the image is not marked corrupt, and no structure of the
 * directory in force shares a cluster with other metadata (the store
 * frees the old directory and tables, and would give that metadata's
 * clusters away).  0, or -1 with *errp (the image then marked corrupt).
 */
static int refuse_damaged(struct qcow2_state *s, struct cbt_error **errp)
{
    const struct qcow2_meta_map *m = &s->meta;
    int r = s->corrupt ? -EIO : m->valid ? 0 : qcow2_meta_rebuild(s);
    if (r == 0 && m->bitmap_conflict)
        r = qcow2_signal_corruption(
            s, "Preventing a bitmap update on damaged metadata (the %s at "
            "offset 0x%" PRIx64 " overlaps with %s)",
            qcow2_meta_kind_name(m->bitmap_conflict_kind),
            m->bitmap_conflict_off, qcow2_meta_kind_name(m->bitmap_conflict));
    if (r == 0)
        return 0;
    cbt_error_set(errp, -r, "%s: cannot update the bitmaps: %s", fname(s),
                  qcow2_strerror(s, r));
    if (s->corrupt)
        cbt_error_set_kind(errp, CBT_ERR_CORRUPT);
    return -1;
}

/* Store step 0: what refuses a store of n bitmaps before anything is
 * written.  0 or -1 with *errp. */
static int store_refusals(struct qcow2_state *s, size_t n,
                          struct cbt_error **errp)
{
    if (refuse_damaged(s, errp) < 0)
        return -1;
    if (n && s->h.version < 3) {
        cbt_error_set(errp, ENOTSUP, "%s: Cannot store dirty bitmaps in qcow2 "
                      "v2 files", fname(s));
        return -1;
    }
    if (n > QCOW2_MAX_BITMAPS) {
        cbt_error_set(errp, EINVAL, "%s: Too many persistent bitmaps (%zu, at "
                      "most %d)", fname(s), n, QCOW2_MAX_BITMAPS);
        return -1;
    }
    return 0;
}

/* Store step 0b: the header must have room for the bitmaps extension (and
 * whatever else it carries now) before any cluster is written.  buf: one
 * cluster of scratch. */
static int header_room(struct qcow2_state *s, size_t n, uint8_t *buf,
                       struct cbt_error **errp)
{
    struct qcow2_bitmaps_ext saved = s->bm_ext;
    s->bm_ext.present = true;
    s->bm_ext.len = QCOW2_BITMAPS_EXT_SIZE;
    s->bm_ext.nb_bitmaps = (uint32_t)n;
    int hr = qcow2_build_header(s, buf);
    s->bm_ext = saved;
    if (hr < 0) {
        cbt_error_set(errp, -hr, "%s: the image header (one cluster of "
                      "%" PRIu64 " bytes) has no room for the bitmaps "
                      "extension", fname(s), (uint64_t)s->cluster_size);
        return -1;
    }
    return 0;
}

/* The directory entry of a new entry. */
static struct qcow2_bitmap_dirent dirent_of(const struct new_entry *e)
{
    return (struct qcow2_bitmap_dirent){
        .name = (char *)e->name,
        .table_offset = e->table_offset,
        .table_size = e->table_size,
        .flags = e->flags,
        .granularity_bits = e->granularity_bits,
    };
}

/* Store step 1b: encode the k entries into a new directory of dir_size
 * bytes in clusters of its own, written (not yet flushed); its offset in
 * *dir_off.  0, or -1 with *errp and nothing allocated. */
static int write_dir(struct qcow2_state *s, const struct new_entry *v,
                     size_t k, uint64_t dir_size, uint64_t *dir_off,
                     struct cbt_error **errp)
{
    const char *fn = fname(s);
    uint64_t dbytes = ALIGN_UP(dir_size, s->cluster_size);
    CLEANUP_FREE uint8_t *dir = calloc(1, dbytes);
    if (!dir) {
        cbt_error_set(errp, ENOMEM, "%s: out of memory", fn);
        return -1;
    }
    uint64_t pos = 0;
    for (size_t i = 0; i < k; i++) {
        struct qcow2_bitmap_dirent d = dirent_of(&v[i]);
        pos += dirent_encode(dir + pos, &d);
    }
    int64_t off = qcow2_alloc_clusters_append(s, dbytes >> s->cluster_bits);
    int r = off < 0 ? (int)off
                    : qcow2_pwrite_meta(s, dir, dbytes, (uint64_t)off, 0);
    s->need_sync = true;
    if (r < 0) {
        if (off >= 0)
            (void)release(s, (uint64_t)off, dbytes);
        cbt_error_set(errp, -r, "%s: Failed to write the bitmap directory: "
                      "%s", fn, qcow2_strerror(s, r));
        return -1;
    }
    *dir_off = (uint64_t)off;
    return 0;
}

/* Store step 3b: the in-memory copy of the directory now in force (names
 * copied), or NULL when out of memory. */
static struct qcow2_bitmap_dirent *dir_of_entries(const struct new_entry *v,
                                                  size_t k)
{
    struct qcow2_bitmap_dirent *nd = calloc(k ? k : 1, sizeof(*nd));
    for (size_t i = 0; nd && i < k; i++) {
        nd[i] = dirent_of(&v[i]);
        nd[i].name = strdup(v[i].name);
        if (!nd[i].name) {
            free_dir(nd, (uint32_t)i);
            nd = NULL;
        }
    }
    return nd;
}

/* Store step 3c: what each bitmap now uses on disk (a grown table is a
 * longer copy of the old one; the data clusters stay shared). */
static void account_disk_bytes(struct qcow2_state *s,
                               const struct new_entry *v, size_t k)
{
    struct blk_node *node = s->node;
    for (size_t i = 0; i < k; i++) {
        if (v[i].b) {
            v[i].b->disk_bytes = v[i].disk_bytes;
            /* Its bits are now those of this table. */
            if (!v[i].b->inconsistent)
                v[i].b->disk_key = v[i].table_offset;
        }
        for (size_t j = 0; v[i].grown && j < node->bitmaps.n; j++) {
            struct blk_bitmap *b = &node->bitmaps.v[j];
            if (b->persistent && strcmp(b->name, v[i].name) == 0)
                b->disk_bytes += table_bytes_on_disk(s, v[i].table_size) -
                                 table_bytes_on_disk(s, v[i].old_table_size);
        }
    }
    /* A grown table replaces the one the bits were read from (the resize
     * loaded them all first, and changes them next). */
    for (size_t i = 0; i < k; i++) {
        for (size_t j = 0; v[i].grown && j < node->bitmaps.n; j++)
            if (node->bitmaps.v[j].disk_key == v[i].old_table_offset)
                blk_bitmap_changed(&node->bitmaps.v[j]);
        for (size_t j = 0; v[i].grown && j < node->committed.n; j++)
            if (node->committed.v[j].disk_key == v[i].old_table_offset)
                blk_bitmap_changed(&node->committed.v[j]);
    }
}

static int store(struct qcow2_state *s, enum store_mode mode,
                 uint64_t grow_size, struct cbt_error **errp)
{
    struct blk_node *node = s->node;
    const char *fn = fname(s);
    size_t n = s->bm_dir_n;
    if (mode == STORE_ALL) {
        n = 0;
        for (size_t i = 0; i < node->bitmaps.n; i++)
            n += node->bitmaps.v[i].persistent;
    }
    if (n == 0 && s->bm_dir_n == 0)
        return 0;
    if (store_refusals(s, n, errp) < 0)
        return -1;
    struct new_entry *v = calloc(n ? n : 1, sizeof(*v));
    CLEANUP_FREE uint8_t *buf = malloc(s->cluster_size);
    if (!v || !buf) {
        free(v);
        cbt_error_set(errp, ENOMEM, "%s: out of memory", fn);
        return -1;
    }
    if (n && header_room(s, n, buf, errp) < 0) {
        free(v);
        return -1;
    }

    /* 1. The entries and the bits, then the directory. */
    size_t k = 0;
    if (build_entries(s, mode, grow_size, v, &k, buf, errp) < 0)
        goto fail;
    uint64_t dir_size = 0;
    for (size_t i = 0; i < k; i++)
        dir_size += dirent_size(strlen(v[i].name));
    if (dir_size > QCOW2_MAX_BITMAP_DIR_SIZE) {
        cbt_error_set(errp, EINVAL, "%s: Bitmap directory is too large (%"
                      PRIu64 " bytes, at most %llu)", fn, dir_size,
                      QCOW2_MAX_BITMAP_DIR_SIZE);
        goto fail;
    }
    if (same_as_disk(s, v, k)) {
        free(v);
        return 0;
    }
    uint64_t dir_off = 0;
    if (k && write_dir(s, v, k, dir_size, &dir_off, errp) < 0)
        goto fail;

    /* 2. Everything new, and its refcounts, durable before the header.
     * A header change waiting for the next write (cbt's own extensions:
     * checkpoint metadata) must land in the switch below, with the
     * bitmaps, not one write earlier. */
    bool header_was_dirty = s->header_dirty;
    s->header_dirty = false;
    int r = qcow2_flush_metadata(s);
    s->header_dirty = s->header_dirty || header_was_dirty;
    if (r < 0) {
        cbt_error_set(errp, -r, "%s: Failed to update bitmap extension: %s",
                      fn, qcow2_strerror(s, r));
        if (dir_off)
            (void)release(s, dir_off, dir_size);
        goto fail;
    }

    /* 3. The switch. */
    struct qcow2_bitmaps_ext old_ext = s->bm_ext;
    uint64_t old_autoclear = s->h.autoclear_features;
    if (k) {
        s->bm_ext = (struct qcow2_bitmaps_ext){
            .present = true, .len = QCOW2_BITMAPS_EXT_SIZE,
            .nb_bitmaps = (uint32_t)k, .dir_size = dir_size,
            .dir_offset = dir_off,
        };
        s->h.autoclear_features |= QCOW2_AUTOCLEAR_BITMAPS;
    } else {
        s->bm_ext = (struct qcow2_bitmaps_ext){ .present = false };
        s->h.autoclear_features &= ~QCOW2_AUTOCLEAR_BITMAPS;
    }
    bool written = false;
    r = qcow2_write_header_ex(s, &written);
    if (r < 0 && !written) {
        /* The header is unchanged: nothing references the new clusters. */
        s->bm_ext = old_ext;
        s->h.autoclear_features = old_autoclear;
        cbt_error_set(errp, -r, "%s: Failed to update bitmap extension: %s",
                      fn, qcow2_strerror(s, r));
        if (dir_off)
            (void)release(s, dir_off, dir_size);
        goto fail;
    }
    /* Written, but maybe not durable when the sync failed: the new state
     * is what the file says now, and the old clusters must stay (the old
     * header may come back after a power loss). */
    bool synced = r == 0;

    /* The new directory is in force: remember it. */
    struct qcow2_bitmap_dirent *nd = dir_of_entries(v, k);
    account_disk_bytes(s, v, k);

    /* 4. Free what only the old directory referenced, checked against
     * the metadata of the new state (the map is rebuilt from it). */
    struct qcow2_bitmap_dirent *old_dir = s->bm_dir;
    uint32_t old_n = s->bm_dir_n;
    s->bm_dir = nd;
    s->bm_dir_n = nd ? (uint32_t)k : 0;
    qcow2_meta_invalidate(s);
    int fr = synced ? free_old(s, &old_ext, old_dir, old_n, v, k) : 0;
    if (fr == 0 && synced)
        fr = qcow2_flush_metadata(s);
    free(v);
    free_dir(old_dir, old_n);
    if (mode != GROW_TABLES)
        s->bm_marked = mode != STORE_ALL;
    if (!nd) {
        /* Out of memory: the image is right, but we cannot track it. */
        s->bm_loaded = false;
        cbt_error_set(errp, ENOMEM, "%s: bitmaps stored, but out of memory "
                      "recording the new directory", fn);
        return -1;
    }
    if (!synced) {
        /* The caller must know the disk has the new state. */
        node->bitmaps_switched = true;
        cbt_error_set(errp, -r, "%s: bitmaps written, but the header could "
                      "not be synced: %s", fn, strerror(-r));
        return -1;
    }
    if (fr < 0 && s->corrupt) {
        cbt_error_set(errp, EIO, "%s: bitmaps stored, but the image is now "
                      "marked corrupt: %s", fn, s->corrupt_msg);
        cbt_error_set_kind(errp, CBT_ERR_CORRUPT);
        return -1;
    }
    if (fr < 0) {
        /* The new state is in force; a leak is harmless (check -r leaks). */
        warn_to(&s->node->warner,
                "%s: bitmaps stored, but freeing the old bitmap clusters "
                "failed (they are leaked until a check repairs leaks): %s",
                fn, strerror(-fr));
    }
    return 0;

fail:
    drop_fresh(s, NULL, 0, v, k);
    free(v);
    return -1;
}

int qcow2_bitmaps_mark_dirty(struct blk_node *node, uint64_t off, uint64_t len)
{
    struct qcow2_state *s = qcow2_state(node);
    if (!s->bm_loaded || s->bm_marked)
        return 0;
    struct cbt_error *err = NULL;
    if (store(s, MARK_RECORDING, 0, &err) < 0) {
        cbt_debug("%s", cbt_error_message(err));
        int e = cbt_error_errno(err);
        cbt_error_free(err);
        return -e;
    }
    s->bm_marked = true;
    return 0;
}

int qcow2_bitmaps_mark_all_in_use(struct qcow2_state *s,
                                  struct cbt_error **errp)
{
    if (!s->bm_loaded)
        return 0;
    if (store(s, MARK_ALL, 0, errp) < 0)
        return -1;
    s->bm_marked = true;
    return 0;
}

int qcow2_bitmaps_grow_tables(struct qcow2_state *s, uint64_t new_size,
                              struct cbt_error **errp)
{
    if (!s->bm_loaded)
        return 0;
    return store(s, GROW_TABLES, new_size, errp);
}

int qcow2_bitmaps_store(struct blk_node *node, struct cbt_error **errp)
{
    struct qcow2_state *s = qcow2_state(node);
    if (!s->bm_loaded)
        return 0;
    /* Unchanged since the last store, and not in_use: the disk is right. */
    if (!node->bitmaps_changed && !node->bitmaps_written && !s->bm_marked)
        return 0;
    return store(s, STORE_ALL, 0, errp);
}

int qcow2_bitmaps_meta_data(struct qcow2_state *s)
{
    /* Tables are small (8 bytes a cluster of bits); a hostile directory
     * of 65535 entries is read up to this much, the rest not tracked. */
    uint64_t budget = 64ull << 20;
    for (uint32_t i = 0; i < s->bm_dir_n; i++) {
        const struct qcow2_bitmap_dirent *d = &s->bm_dir[i];
        uint64_t bytes = (uint64_t)d->table_size * 8, bad;
        if (bytes > budget)
            break;
        budget -= bytes;
        int err;
        uint64_t *t = read_table(s, d->table_offset, d->table_size, &bad, &err);
        if (!t && err == -ENOMEM)
            return -ENOMEM;
        int r = 0;
        for (uint32_t k = 0; t && k < d->table_size && r == 0; k++)
            r = qcow2_meta_add_bitmap_data(s, t[k] & QCOW2_BME_TABLE_OFFSET_MASK);
        free(t);
        if (r < 0)
            return r;
    }
    return 0;
}

/* ---- salvage (check -r all) ---- */

/* Would this entry load (and pass check's table check)?  Its name is
 * added to `names` when it does and is new. */
static bool salvageable(struct qcow2_state *s, const struct dirent_raw *e,
                        struct name_set *names, char *name)
{
    char why[1200];
    if (entry_problem(s, e, 0, why, sizeof(why)))
        return false;
    uint32_t table_size = e->table_size;
    if (!(e->flags & QCOW2_BME_FLAG_IN_USE) &&
        table_size != table_entries(s, s->h.size, e->granularity_bits))
        return false;
    uint64_t bad, flen = 0;
    int err;
    (void)file_size(s->node->fd, &flen);
    if (past_eof(e->table_offset, (uint64_t)table_size * 8, flen))
        return false;
    uint64_t *t = read_table(s, e->table_offset, table_size, &bad, &err);
    bool ok = t != NULL;
    for (uint32_t i = 0; ok && i < table_size; i++) {
        uint64_t off = t[i] & QCOW2_BME_TABLE_OFFSET_MASK;
        ok = !off || !past_eof(off, 1, flen);
    }
    free(t);
    return ok && name_set_add(names, name);
}

int qcow2_bitmaps_salvage(struct qcow2_state *s, bool dir_ok, uint32_t *kept,
                          uint32_t *dropped)
{
    const struct qcow2_bitmaps_ext *x = &s->bm_ext;
    *kept = *dropped = 0;
    CLEANUP_FREE uint8_t *dir = NULL, *out = NULL;
    char **kept_names = NULL;
    struct name_set names = { NULL, 0 };
    uint64_t out_size = 0;
    uint32_t seen = 0;
    int r = 0;
    if (dir_ok) {
        uint64_t max = x->dir_size / QCOW2_BME_FIXED_SIZE + 1;
        dir = malloc(x->dir_size);
        out = calloc(1, x->dir_size);
        kept_names = calloc(max, sizeof(*kept_names));
        if (!dir || !out || !kept_names || name_set_init(&names, max) < 0) {
            r = -ENOMEM;
            goto out;
        }
        r = file_pread_full(s->node->fd, dir, x->dir_size, x->dir_offset);
        struct dirent_raw e;
        for (uint64_t pos = 0;
             r == 0 && dirent_decode(dir, x->dir_size, pos, &e);
             pos += e.size) {
            /* (Nothing past a broken entry can be trusted.) */
            seen++;
            char *name = strndup(e.name, e.name_size);
            if (!name) {
                r = -ENOMEM;
                break;
            }
            if (*kept < QCOW2_MAX_BITMAPS &&
                salvageable(s, &e, &names, name)) {
                kept_names[(*kept)++] = name;
                /* Kept entries have no extra data: encoded as they were. */
                out_size += dirent_encode(out + out_size,
                    &(struct qcow2_bitmap_dirent){
                        .name = name, .table_offset = e.table_offset,
                        .table_size = e.table_size, .flags = e.flags,
                        .granularity_bits = e.granularity_bits,
                    });
            } else {
                free(name);
            }
        }
        if (r < 0)
            goto out;
    }
    *dropped = MAX(x->nb_bitmaps, seen) - *kept;
    if (x->len != QCOW2_BITMAPS_EXT_SIZE) {
        /* Kept verbatim among the unknown extensions: forget it. */
        *dropped = 1;
        size_t k = 0;
        for (size_t i = 0; i < s->nb_exts; i++) {
            if (s->exts[i].type == QCOW2_EXT_BITMAPS)
                free(s->exts[i].data);
            else
                s->exts[k++] = s->exts[i];
        }
        s->nb_exts = k;
    }

    /* Turn the extension off while the directory changes in place (QEMU's
     * in-place protocol): a crash in between leaves it ignored, never
     * inconsistent. */
    s->h.autoclear_features &= ~QCOW2_AUTOCLEAR_BITMAPS;
    r = qcow2_write_header(s);
    if (r < 0 || *kept == 0) {
        if (r == 0) {
            s->bm_ext = (struct qcow2_bitmaps_ext){ .present = false };
            r = qcow2_write_header(s);
        }
        goto out;
    }
    r = qcow2_pwrite_meta(s, out, out_size, x->dir_offset, QCOW2_OL_BITMAP_DIR);
    if (r == 0)
        r = file_flush(s->node->fd);
    if (r == 0) {
        s->bm_ext.len = QCOW2_BITMAPS_EXT_SIZE;
        s->bm_ext.nb_bitmaps = *kept;
        s->bm_ext.reserved = 0;
        s->bm_ext.dir_size = out_size;
        s->h.autoclear_features |= QCOW2_AUTOCLEAR_BITMAPS;
        r = qcow2_write_header(s);
    }
out:
    for (uint32_t i = 0; kept_names && i < *kept; i++)
        free(kept_names[i]);
    free(kept_names);
    free(names.slot);
    return r;
}

/* QEMU's qcow2_co_can_store_new_dirty_bitmap (and check_constraints). */
int qcow2_bitmap_can_store(struct blk_node *node, const char *name,
                           uint64_t granularity, struct cbt_error **errp)
{
    struct qcow2_state *s = qcow2_state(node);
    char why[128];
    const char *msg = why;
    unsigned gbits = (unsigned)__builtin_ctzll(granularity);
    uint64_t nbits = DIV_ROUND_UP(node->size, granularity);
    uint64_t bytes = DIV_ROUND_UP(nbits, 8);
    size_t count = 0;
    uint64_t dir_size = dirent_size(strlen(name));
    for (size_t i = 0; i < node->bitmaps.n; i++) {
        if (node->bitmaps.v[i].persistent) {
            count++;
            dir_size += dirent_size(strlen(node->bitmaps.v[i].name));
        }
    }
    if (!s->bm_loaded) {
        msg = "the image is opened for a check";
    } else if (s->h.version < 3) {
        msg = "Cannot store dirty bitmaps in qcow2 v2 files";
    } else if (gbits > QCOW2_BME_MAX_GRANULARITY_BITS) {
        snprintf(why, sizeof(why), "Granularity exceeds maximum (%llu bytes)",
                 1ull << QCOW2_BME_MAX_GRANULARITY_BITS);
    } else if (gbits < QCOW2_BME_MIN_GRANULARITY_BITS) {
        snprintf(why, sizeof(why), "Granularity is under minimum (%llu bytes)",
                 1ull << QCOW2_BME_MIN_GRANULARITY_BITS);
    } else if (bytes > QCOW2_BME_MAX_PHYS_SIZE ||
               bytes > QCOW2_BME_MAX_TABLE_SIZE * s->cluster_size) {
        msg = "Too much space will be occupied by the bitmap. Use larger "
              "granularity";
    } else if (strlen(name) > QCOW2_BME_MAX_NAME_SIZE) {
        snprintf(why, sizeof(why), "Name length exceeds maximum (%d "
                 "characters)", QCOW2_BME_MAX_NAME_SIZE);
    } else if (count + 1 > QCOW2_MAX_BITMAPS) {
        msg = "Maximum number of persistent bitmaps is already reached";
    } else if (dir_size > QCOW2_MAX_BITMAP_DIR_SIZE) {
        msg = "Not enough space in the bitmap directory";
    } else if (node->size == 0) {
        msg = "the image is empty (a qcow2 bitmap needs at least one bit)";
    } else {
        return 0;
    }
    cbt_error_set(errp, EINVAL, "Can't make bitmap '%s' persistent in '%s': %s",
                  name, node->filename, msg);
    return -1;
}
