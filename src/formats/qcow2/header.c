/*
 * qcow2 header and header extensions: parse with every field checked
 * against a named limit, and serialize the first cluster the way QEMU
 * lays it out (header, backing format, data file, feature table, bitmaps,
 * preserved extensions, end marker, backing file name), keeping unknown
 * header fields and unknown extensions verbatim.  The bitmaps extension is
 * decoded into s->bm_ext here and checked when the bitmaps load (bitmap_ext.c).
 */
#include <inttypes.h>
#include <stdio.h>

#include "qcow2.h"

/* Names QEMU writes into the feature name table. */
static const struct {
    uint8_t type, bit;
    const char *name;
} feature_names[] = {
    { 0, 0, "dirty bit" },
    { 0, 1, "corrupt bit" },
    { 0, 2, "external data file" },
    { 0, 3, "compression type" },
    { 0, 4, "extended L2 entries" },
    { 1, 0, "lazy refcounts" },
    { 2, 0, "bitmaps" },
    { 2, 1, "raw external data" },
};

#define FEATURE_ENTRY_SIZE 48

static void decode_header(const uint8_t *b, struct qcow2_header *h)
{
    memset(h, 0, sizeof(*h));
    h->magic = ldbe32(b + 0);
    h->version = ldbe32(b + 4);
    h->backing_file_offset = ldbe64(b + 8);
    h->backing_file_size = ldbe32(b + 16);
    h->cluster_bits = ldbe32(b + 20);
    h->size = ldbe64(b + 24);
    h->crypt_method = ldbe32(b + 32);
    h->l1_size = ldbe32(b + 36);
    h->l1_table_offset = ldbe64(b + 40);
    h->refcount_table_offset = ldbe64(b + 48);
    h->refcount_table_clusters = ldbe32(b + 56);
    h->nb_snapshots = ldbe32(b + 60);
    h->snapshots_offset = ldbe64(b + 64);
    if (h->version >= 3) {
        h->incompatible_features = ldbe64(b + 72);
        h->compatible_features = ldbe64(b + 80);
        h->autoclear_features = ldbe64(b + 88);
        h->refcount_order = ldbe32(b + 96);
        h->header_length = ldbe32(b + 100);
    } else {
        h->refcount_order = 4;
        h->header_length = QCOW2_V2_HEADER_SIZE;
    }
}

static void encode_header(const struct qcow2_header *h, uint8_t *b)
{
    stbe32(b + 0, h->magic);
    stbe32(b + 4, h->version);
    stbe64(b + 8, h->backing_file_offset);
    stbe32(b + 16, h->backing_file_size);
    stbe32(b + 20, h->cluster_bits);
    stbe64(b + 24, h->size);
    stbe32(b + 32, h->crypt_method);
    stbe32(b + 36, h->l1_size);
    stbe64(b + 40, h->l1_table_offset);
    stbe64(b + 48, h->refcount_table_offset);
    stbe32(b + 56, h->refcount_table_clusters);
    stbe32(b + 60, h->nb_snapshots);
    stbe64(b + 64, h->snapshots_offset);
    if (h->version >= 3) {
        stbe64(b + 72, h->incompatible_features);
        stbe64(b + 80, h->compatible_features);
        stbe64(b + 88, h->autoclear_features);
        stbe32(b + 96, h->refcount_order);
        stbe32(b + 100, h->header_length);
        b[104] = h->compression_type;
        memset(b + 105, 0, 7);
    }
}

/* Describe unknown incompatible bits, with names from the image's own
 * feature table when it has one. */
static void report_unknown_features(struct qcow2_state *s, uint64_t mask,
                                    const uint8_t *table, uint32_t table_len,
                                    struct cbt_error **errp)
{
    char msg[512] = "";
    size_t used = 0;
    for (int bit = 0; bit < 64; bit++) {
        if (!(mask & (1ull << bit)))
            continue;
        char name[47] = "";
        for (uint32_t i = 0; table && i + FEATURE_ENTRY_SIZE <= table_len;
             i += FEATURE_ENTRY_SIZE) {
            if (table[i] == 0 && table[i + 1] == bit) {
                memcpy(name, table + i + 2, 46);
                name[46] = '\0';
            }
        }
        int n = snprintf(msg + used, sizeof(msg) - used, "%s%s", used ? ", " : "",
                         name[0] ? name : "");
        if (n > 0 && (size_t)n < sizeof(msg) - used)
            used += (size_t)n;
        if (!name[0]) {
            n = snprintf(msg + used, sizeof(msg) - used,
                         "unknown incompatible feature bit %d", bit);
            if (n > 0 && (size_t)n < sizeof(msg) - used)
                used += (size_t)n;
        }
    }
    cbt_error_set(errp, ENOTSUP, "%s: unsupported qcow2 feature(s): %s",
                  s->node->filename, msg);
}

/* Room for one more extension in s->exts, growing it geometrically (a
 * header may hold thousands).  0 or -ENOMEM. */
static int reserve_ext(struct qcow2_state *s)
{
    if (s->nb_exts < s->cap_exts)
        return 0;
    size_t cap = s->cap_exts ? s->cap_exts * 2 : 8;
    struct qcow2_ext *n = realloc(s->exts, cap * sizeof(*n));
    if (!n)
        return -ENOMEM;
    s->exts = n;
    s->cap_exts = cap;
    return 0;
}

static int add_ext(struct qcow2_state *s, uint32_t type, const uint8_t *data,
                   uint32_t len)
{
    if (reserve_ext(s) < 0)
        return -ENOMEM;
    uint8_t *copy = malloc(len ? len : 1);
    if (!copy)
        return -ENOMEM;
    memcpy(copy, data, len);
    s->exts[s->nb_exts++] = (struct qcow2_ext){ type, len, copy };
    return 0;
}

/* Parse the extension area [start, end) of the header cluster. */
static int read_extensions(struct qcow2_state *s, const uint8_t *buf,
                           uint64_t start, uint64_t end, const uint8_t **ftable,
                           uint32_t *ftable_len, struct cbt_error **errp)
{
    const char *fn = s->node->filename;
    uint64_t off = start;
    uint32_t count = 0;
    while (off < end) {
        if (end - off < 8) {
            cbt_error_set(errp, EINVAL,
                          "%s: header extension at offset %" PRIu64
                          " is truncated", fn, off);
            return -1;
        }
        uint32_t type = ldbe32(buf + off);
        uint32_t len = ldbe32(buf + off + 4);
        off += 8;
        if (type == QCOW2_EXT_END)
            break;
        if (++count > QCOW2_MAX_HEADER_EXTS) {
            cbt_error_set(errp, EINVAL,
                          "%s: more than %d header extensions (the one at "
                          "offset %" PRIu64 " is past the limit)", fn,
                          QCOW2_MAX_HEADER_EXTS, off - 8);
            return -1;
        }
        if (len > end - off) {
            cbt_error_set(errp, EINVAL,
                          "%s: header extension 0x%08x is too large (%u bytes, "
                          "%" PRIu64 " left in the header cluster)",
                          fn, type, len, end - off);
            return -1;
        }
        const uint8_t *data = buf + off;
        switch (type) {
        case QCOW2_EXT_BACKING_FORMAT:
            if (len > QCOW2_MAX_BACKING_FMT) {
                cbt_error_set(errp, EINVAL,
                              "%s: backing format name too long (%u bytes, "
                              "max %d)", fn, len, QCOW2_MAX_BACKING_FMT);
                return -1;
            }
            free(s->node->backing_fmt);
            s->node->backing_fmt = strndup((const char *)data, len);
            if (!s->node->backing_fmt)
                goto nomem;
            break;
        case QCOW2_EXT_FEATURE_TABLE:
            *ftable = data; /* regenerated on write */
            *ftable_len = len;
            break;
        case QCOW2_EXT_DATA_FILE:
            if (len == 0 || len > QCOW2_MAX_DATA_FILE_NAME) {
                cbt_error_set(errp, EINVAL,
                              "%s: external data file name has bad length %u",
                              fn, len);
                return -1;
            }
            free(s->data_file);
            s->data_file = strndup((const char *)data, len);
            if (!s->data_file)
                goto nomem;
            if (strlen(s->data_file) != len) {
                cbt_error_set(errp, EINVAL,
                              "%s: external data file name contains a NUL byte",
                              fn);
                return -1;
            }
            break;
        case QCOW2_EXT_BITMAPS:
            s->bm_ext = (struct qcow2_bitmaps_ext){ .present = true, .len = len };
            if (len == QCOW2_BITMAPS_EXT_SIZE) {
                s->bm_ext.nb_bitmaps = ldbe32(data);
                s->bm_ext.reserved = ldbe32(data + 4);
                s->bm_ext.dir_size = ldbe64(data + 8);
                s->bm_ext.dir_offset = ldbe64(data + 16);
            } else if (add_ext(s, type, data, len) < 0) {
                /* Kept verbatim so that check can report it. */
                goto nomem;
            }
            break;
        case QCOW2_EXT_CRYPTO:
            cbt_error_set(errp, ENOTSUP, "%s: encrypted images are not supported",
                          fn);
            return -1;
        default:
            /* Unknown extensions are kept verbatim. */
            if (add_ext(s, type, data, len) < 0)
                goto nomem;
            break;
        }
        off += ALIGN_UP((uint64_t)len, 8);
    }
    return 0;
nomem:
    cbt_error_set(errp, ENOMEM, "%s: out of memory", fn);
    return -1;
}

int qcow2_read_header(struct qcow2_state *s, int fd, uint64_t file_len,
                      struct cbt_error **errp)
{
    const char *fn = s->node->filename;
    uint8_t small[QCOW2_HEADER_SIZE] = { 0 };
    struct qcow2_header *h = &s->h;

    if (file_len < QCOW2_V2_HEADER_SIZE) {
        cbt_error_set(errp, EINVAL,
                      "%s: file too small for a qcow2 header (%" PRIu64 " bytes)",
                      fn, file_len);
        return -1;
    }
    int r = file_pread_full(fd, small, sizeof(small), 0);
    if (r < 0) {
        cbt_error_set(errp, -r, "%s: cannot read header: %s", fn, strerror(-r));
        return -1;
    }
    decode_header(small, h);
    if (h->magic != QCOW2_MAGIC) {
        cbt_error_set(errp, EINVAL, "%s: not a qcow2 image (bad magic)", fn);
        return -1;
    }
    if (h->version != 2 && h->version != 3) {
        cbt_error_set(errp, ENOTSUP, "%s: unsupported qcow2 version %u", fn,
                      h->version);
        return -1;
    }
    if (h->cluster_bits < QCOW2_MIN_CLUSTER_BITS ||
        h->cluster_bits > QCOW2_MAX_CLUSTER_BITS) {
        cbt_error_set(errp, EINVAL,
                      "%s: cluster_bits %u out of range (%d..%d)", fn,
                      h->cluster_bits, QCOW2_MIN_CLUSTER_BITS,
                      QCOW2_MAX_CLUSTER_BITS);
        return -1;
    }
    s->cluster_bits = h->cluster_bits;
    s->cluster_size = 1ull << h->cluster_bits;

    if (h->version >= 3) {
        if (h->header_length < QCOW2_V3_HEADER_SIZE) {
            cbt_error_set(errp, EINVAL,
                          "%s: header_length %u too short (minimum %d)", fn,
                          h->header_length, QCOW2_V3_HEADER_SIZE);
            return -1;
        }
        if (h->header_length > s->cluster_size) {
            cbt_error_set(errp, EINVAL,
                          "%s: header_length %u exceeds the cluster size", fn,
                          h->header_length);
            return -1;
        }
        if (h->header_length > QCOW2_V3_HEADER_SIZE)
            h->compression_type = small[104];
    }

    /* Read the whole header cluster (or what the file has of it). */
    uint64_t hc_len = MIN(s->cluster_size, file_len);
    CLEANUP_FREE uint8_t *buf = calloc(1, s->cluster_size);
    if (!buf) {
        cbt_error_set(errp, ENOMEM, "%s: out of memory", fn);
        return -1;
    }
    r = file_pread_full(fd, buf, hc_len, 0);
    if (r < 0) {
        cbt_error_set(errp, -r, "%s: cannot read header: %s", fn, strerror(-r));
        return -1;
    }
    if (h->header_length > QCOW2_HEADER_SIZE) {
        s->extra_header_len = h->header_length - QCOW2_HEADER_SIZE;
        s->extra_header = malloc(s->extra_header_len);
        if (!s->extra_header) {
            cbt_error_set(errp, ENOMEM, "%s: out of memory", fn);
            return -1;
        }
        memcpy(s->extra_header, buf + QCOW2_HEADER_SIZE, s->extra_header_len);
    }

    /* Backing file name. */
    uint64_t ext_end = s->cluster_size;
    if (h->backing_file_offset) {
        if (h->backing_file_size > QCOW2_MAX_BACKING_NAME) {
            cbt_error_set(errp, EINVAL,
                          "%s: backing file name too long (%u bytes, max %d)",
                          fn, h->backing_file_size, QCOW2_MAX_BACKING_NAME);
            return -1;
        }
        if (h->backing_file_offset > s->cluster_size ||
            h->backing_file_size > s->cluster_size - h->backing_file_offset) {
            cbt_error_set(errp, EINVAL,
                          "%s: backing file name at offset %" PRIu64
                          " lies outside the header cluster", fn,
                          h->backing_file_offset);
            return -1;
        }
        if (h->backing_file_size == 0) {
            cbt_error_set(errp, EINVAL, "%s: backing file name is empty", fn);
            return -1;
        }
        s->node->backing_name = strndup(
            (const char *)buf + h->backing_file_offset, h->backing_file_size);
        if (!s->node->backing_name) {
            cbt_error_set(errp, ENOMEM, "%s: out of memory", fn);
            return -1;
        }
        if (strlen(s->node->backing_name) != h->backing_file_size) {
            cbt_error_set(errp, EINVAL,
                          "%s: backing file name contains a NUL byte", fn);
            return -1;
        }
        ext_end = h->backing_file_offset;
    }

    const uint8_t *ftable = NULL;
    uint32_t ftable_len = 0;
    if (h->header_length < ext_end &&
        read_extensions(s, buf, h->header_length, ext_end, &ftable, &ftable_len,
                        errp) < 0)
        return -1;

    uint64_t unknown = h->incompatible_features & ~QCOW2_INCOMPAT_MASK;
    if (unknown) {
        report_unknown_features(s, unknown, ftable, ftable_len, errp);
        return -1;
    }
    if (h->crypt_method != 0) {
        cbt_error_set(errp, ENOTSUP,
                      "%s: encrypted images are not supported (crypt_method %u)",
                      fn, h->crypt_method);
        return -1;
    }
    if (h->refcount_order > 6) {
        cbt_error_set(errp, EINVAL, "%s: refcount_order %u out of range (0..6)",
                      fn, h->refcount_order);
        return -1;
    }
    if (h->compression_type > QCOW2_COMPRESSION_ZSTD) {
        cbt_error_set(errp, ENOTSUP, "%s: unknown compression type %u", fn,
                      h->compression_type);
        return -1;
    }
    if (h->compression_type != 0 &&
        !(h->incompatible_features & QCOW2_INCOMPAT_COMPRESSION)) {
        cbt_error_set(errp, EINVAL,
                      "%s: compression type %u set without its incompatible "
                      "feature bit", fn, h->compression_type);
        return -1;
    }
    s->ext_l2 = h->incompatible_features & QCOW2_INCOMPAT_EXTL2;
    if (s->ext_l2 && s->cluster_bits < 14) {
        cbt_error_set(errp, EINVAL,
                      "%s: extended L2 entries need clusters of at least 16 KiB",
                      fn);
        return -1;
    }
    if (qcow2_has_data_file(s) && !s->data_file) {
        cbt_error_set(errp, EINVAL,
                      "%s: external data file bit set but no data file name", fn);
        return -1;
    }
    if (!qcow2_has_data_file(s) && s->data_file) {
        /* QEMU ignores a stray name; so do we. */
        free(s->data_file);
        s->data_file = NULL;
    }
    s->data_file_raw = qcow2_has_data_file(s) &&
                       (h->autoclear_features & QCOW2_AUTOCLEAR_DATA_FILE_RAW);
    if (h->size > INT64_MAX) {
        cbt_error_set(errp, EINVAL, "%s: virtual size %" PRIu64 " too large",
                      fn, h->size);
        return -1;
    }
    return 0;
}

/* Append one extension record at *pos; -ENOSPC when it does not fit below
 * `limit`. */
static int put_ext(uint8_t *buf, size_t *pos, size_t limit, uint32_t type,
                   const void *data, uint32_t len)
{
    size_t need = 8 + ALIGN_UP((size_t)len, 8);
    if (*pos + need > limit)
        return -ENOSPC;
    stbe32(buf + *pos, type);
    stbe32(buf + *pos + 4, len);
    if (len)
        memcpy(buf + *pos + 8, data, len);
    memset(buf + *pos + 8 + len, 0, need - 8 - len);
    *pos += need;
    return 0;
}

int qcow2_build_header(const struct qcow2_state *s, uint8_t *buf)
{
    struct qcow2_header h = s->h;
    size_t cs = s->cluster_size;
    const char *backing = s->node ? s->node->backing_name : NULL;
    const char *bfmt = s->node ? s->node->backing_fmt : NULL;
    size_t backing_len = backing ? strlen(backing) : 0;
    if (backing_len > QCOW2_MAX_BACKING_NAME)
        return -ENAMETOOLONG;
    if (backing_len >= cs)
        return -ENOSPC;
    size_t limit = cs - backing_len;

    memset(buf, 0, cs);
    size_t pos;
    if (h.version >= 3) {
        h.header_length = (uint32_t)(QCOW2_HEADER_SIZE + s->extra_header_len);
        pos = h.header_length;
        if (pos > limit)
            return -ENOSPC;
        if (s->extra_header_len)
            memcpy(buf + QCOW2_HEADER_SIZE, s->extra_header, s->extra_header_len);
    } else {
        pos = QCOW2_V2_HEADER_SIZE;
    }
    int r;
    if (bfmt && backing &&
        (r = put_ext(buf, &pos, limit, QCOW2_EXT_BACKING_FORMAT, bfmt,
                     (uint32_t)strlen(bfmt))) < 0)
        return r;
    if (s->data_file &&
        (r = put_ext(buf, &pos, limit, QCOW2_EXT_DATA_FILE, s->data_file,
                     (uint32_t)strlen(s->data_file))) < 0)
        return r;
    if (h.version >= 3 && cs > 4096) {
        uint8_t table[ARRAY_SIZE(feature_names) * FEATURE_ENTRY_SIZE];
        memset(table, 0, sizeof(table));
        for (size_t i = 0; i < ARRAY_SIZE(feature_names); i++) {
            uint8_t *e = table + i * FEATURE_ENTRY_SIZE;
            e[0] = feature_names[i].type;
            e[1] = feature_names[i].bit;
            memcpy(e + 2, feature_names[i].name, strlen(feature_names[i].name));
        }
        if ((r = put_ext(buf, &pos, limit, QCOW2_EXT_FEATURE_TABLE, table,
                         sizeof(table))) < 0)
            return r;
    }
    if (s->bm_ext.present && s->bm_ext.len == QCOW2_BITMAPS_EXT_SIZE &&
        s->bm_ext.nb_bitmaps > 0) {
        uint8_t ext[QCOW2_BITMAPS_EXT_SIZE];
        qcow2_bitmaps_ext_encode(&s->bm_ext, ext);
        if ((r = put_ext(buf, &pos, limit, QCOW2_EXT_BITMAPS, ext,
                         sizeof(ext))) < 0)
            return r;
    }
    /* Never write more extensions than a reader accepts. */
    size_t known = (bfmt && backing) + (s->data_file != NULL) +
                   (h.version >= 3 && cs > 4096) +
                   (s->bm_ext.present &&
                    s->bm_ext.len == QCOW2_BITMAPS_EXT_SIZE &&
                    s->bm_ext.nb_bitmaps > 0);
    if (known + s->nb_exts > QCOW2_MAX_HEADER_EXTS)
        return -ENOSPC;
    for (size_t i = 0; i < s->nb_exts; i++) {
        if ((r = put_ext(buf, &pos, limit, s->exts[i].type, s->exts[i].data,
                         s->exts[i].len)) < 0)
            return r;
    }
    if ((r = put_ext(buf, &pos, limit, QCOW2_EXT_END, NULL, 0)) < 0)
        return r;
    if (backing) {
        h.backing_file_offset = pos;
        h.backing_file_size = (uint32_t)backing_len;
        memcpy(buf + pos, backing, backing_len);
    } else {
        h.backing_file_offset = 0;
        h.backing_file_size = 0;
    }
    encode_header(&h, buf);
    return 0;
}

int qcow2_write_header_ex(struct qcow2_state *s, bool *written)
{
    if (written)
        *written = false;
    if (s->corrupt)
        return -EIO;
    CLEANUP_FREE uint8_t *buf = cbt_zalloc_aligned(s->cluster_size);
    if (!buf)
        return -ENOMEM;
    int r = qcow2_build_header(s, buf);
    if (r < 0)
        return r;
    r = file_pwrite_full(s->node->fd, buf, s->cluster_size, 0);
    if (r < 0)
        return r;
    if (written)
        *written = true;
    s->header_dirty = false;
    return file_flush(s->node->fd);
}

int qcow2_write_header(struct qcow2_state *s)
{
    return qcow2_write_header_ex(s, NULL);
}

const struct qcow2_ext *qcow2_find_ext(const struct qcow2_state *s,
                                      uint32_t type)
{
    for (size_t i = 0; i < s->nb_exts; i++)
        if (s->exts[i].type == type)
            return &s->exts[i];
    return NULL;
}

size_t qcow2_count_ext(const struct qcow2_state *s, uint32_t type)
{
    size_t n = 0;
    for (size_t i = 0; i < s->nb_exts; i++)
        n += s->exts[i].type == type;
    return n;
}

/* Keep only the first extension of `type` (the one readers see). */
static void drop_duplicate_exts(struct qcow2_state *s, uint32_t type)
{
    size_t k = 0;
    bool seen = false;
    for (size_t i = 0; i < s->nb_exts; i++) {
        if (s->exts[i].type == type && seen) {
            free(s->exts[i].data);
            continue;
        }
        seen = seen || s->exts[i].type == type;
        s->exts[k++] = s->exts[i];
    }
    s->nb_exts = k;
}

int qcow2_set_ext(struct qcow2_state *s, uint32_t type, const void *data,
                  uint32_t len)
{
    /* Setting is replacing them all: copies left behind would hide the new
     * one from readers, which take the first.  Dropping them only makes
     * the header shorter, so it fits whatever follows. */
    if (qcow2_count_ext(s, type) > 1) {
        drop_duplicate_exts(s, type);
        s->header_dirty = true;
    }
    struct qcow2_ext *old = (struct qcow2_ext *)qcow2_find_ext(s, type);
    struct qcow2_ext saved = old ? *old : (struct qcow2_ext){ 0 };
    uint8_t *copy = NULL;
    if (data) {
        copy = malloc(len ? len : 1);
        if (!copy)
            return -ENOMEM;
        memcpy(copy, data, len);
    }
    if (data && !old) {
        if (reserve_ext(s) < 0) {
            free(copy);
            return -ENOMEM;
        }
        s->exts[s->nb_exts++] = (struct qcow2_ext){ type, len, copy };
    } else if (data) {
        *old = (struct qcow2_ext){ type, len, copy };
    } else if (old) {
        size_t i = (size_t)(old - s->exts);
        memmove(&s->exts[i], &s->exts[i + 1],
                (s->nb_exts - i - 1) * sizeof(*s->exts));
        s->nb_exts--;
    } else {
        return 0; /* nothing to drop */
    }
    /* The header must still fit in its cluster. */
    uint8_t *buf = cbt_zalloc_aligned(s->cluster_size);
    int r = buf ? qcow2_build_header(s, buf) : -ENOMEM;
    free(buf);
    if (r < 0) {
        /* Undo: put the previous state back. */
        if (data && !old) {
            s->nb_exts--;
            free(copy);
        } else if (data) {
            free(copy);
            *old = saved;
        } else {
            size_t i = (size_t)(old - s->exts);
            memmove(&s->exts[i + 1], &s->exts[i],
                    (s->nb_exts - i) * sizeof(*s->exts));
            s->exts[i] = saved;
            s->nb_exts++;
        }
        return r;
    }
    if (data && old)
        free(saved.data);
    if (!data)
        free(saved.data);
    s->header_dirty = true;
    return 0;
}

void qcow2_free_header(struct qcow2_state *s)
{
    for (size_t i = 0; i < s->nb_exts; i++)
        free(s->exts[i].data);
    free(s->exts);
    s->exts = NULL;
    s->nb_exts = s->cap_exts = 0;
    free(s->extra_header);
    s->extra_header = NULL;
    free(s->data_file);
    s->data_file = NULL;
}
