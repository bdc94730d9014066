/*
 * qcow2 internal snapshot table: parsed (bounded, every length checked)
 * for info and for check, and rewritten by check -r all when an entry is
 * broken in a way QEMU repairs (qemu-img check's
 * qcow2_check_fix_snapshot_table): a v3 entry with less than 16 bytes of
 * extra data (incomplete: no disk size), or with more than QEMU's 1 KiB
 * (cut to 1 KiB).  Outside check such a table is kept as it is on disk.
 */
#include <inttypes.h>

#include "qcow2.h"

#define SNAPSHOT_FIXED 40
#define SNAPSHOT_KNOWN_EXTRA 24 /* vm_state_size, disk_size, icount */

void qcow2_free_snapshots(struct qcow2_state *s)
{
    for (uint32_t i = 0; i < s->nb_snapshots; i++) {
        free(s->snapshots[i].id);
        free(s->snapshots[i].name);
        free(s->snapshots[i].extra_unknown);
    }
    free(s->snapshots);
    s->snapshots = NULL;
    s->nb_snapshots = 0;
}

int qcow2_read_snapshots(struct qcow2_state *s, uint64_t file_len,
                         struct cbt_error **errp)
{
    const char *fn = s->node->filename;
    struct qcow2_header *h = &s->h;
    s->snapshots_size = 0;
    if (h->nb_snapshots == 0)
        return 0;
    if (h->nb_snapshots > QCOW2_MAX_SNAPSHOTS) {
        cbt_error_set(errp, EINVAL, "%s: too many snapshots (%u, max %d)", fn,
                      h->nb_snapshots, QCOW2_MAX_SNAPSHOTS);
        return -1;
    }
    if (!IS_ALIGNED(h->snapshots_offset, s->cluster_size) ||
        h->snapshots_offset >= file_len) {
        cbt_error_set(errp, EINVAL,
                      "%s: snapshot table offset 0x%" PRIx64 " is invalid", fn,
                      h->snapshots_offset);
        return -1;
    }
    s->snapshots = calloc(h->nb_snapshots, sizeof(*s->snapshots));
    if (!s->snapshots) {
        cbt_error_set(errp, ENOMEM, "%s: out of memory", fn);
        return -1;
    }
    uint64_t off = h->snapshots_offset;
    for (uint32_t i = 0; i < h->nb_snapshots; i++) {
        uint8_t fx[SNAPSHOT_FIXED];
        if (off + SNAPSHOT_FIXED > file_len ||
            file_pread_exact(s->node->fd, fx, sizeof(fx), off) < 0)
            goto truncated;
        struct qcow2_snapshot *sn = &s->snapshots[i];
        s->nb_snapshots = i + 1;
        sn->l1_table_offset = ldbe64(fx);
        sn->l1_size = ldbe32(fx + 8);
        uint16_t id_len = ldbe16(fx + 12), name_len = ldbe16(fx + 14);
        sn->date_sec = ldbe32(fx + 16);
        sn->date_nsec = ldbe32(fx + 20);
        sn->vm_clock_nsec = ldbe64(fx + 24);
        sn->vm_state_size = ldbe32(fx + 32);
        uint32_t extra = ldbe32(fx + 36);
        sn->icount = UINT64_MAX;
        sn->disk_size = h->size;
        sn->extra_size = sn->extra_on_disk = extra;
        if (extra > QCOW2_MAX_SNAPSHOT_EXTRA) {
            /* check -r all cuts it to what QEMU keeps. */
            if (!s->check_mode) {
                cbt_error_set(errp, EINVAL,
                              "%s: snapshot table entry %u has too much extra "
                              "data (%u bytes, at most %d); a repair removes "
                              "what is too much", fn, i, extra,
                              QCOW2_MAX_SNAPSHOT_EXTRA);
                cbt_error_set_remedy(errp, CBT_REMEDY_REPAIR);
                return -1;
            }
            sn->extra_size = QCOW2_MAX_SNAPSHOT_EXTRA;
            sn->extra_cut = true;
        }
        off += SNAPSHOT_FIXED;
        uint8_t ex[QCOW2_MAX_SNAPSHOT_EXTRA];
        if (off + extra + id_len + name_len > file_len ||
            file_pread_exact(s->node->fd, ex, sn->extra_size, off) < 0)
            goto truncated;
        if (sn->extra_size >= 8)
            sn->vm_state_size = ldbe64(ex);
        if (sn->extra_size >= 16)
            sn->disk_size = ldbe64(ex + 8);
        if (sn->extra_size >= 24)
            sn->icount = ldbe64(ex + 16);
        if (sn->extra_size > SNAPSHOT_KNOWN_EXTRA) {
            /* Kept verbatim should the table be rewritten. */
            sn->extra_unknown_len = sn->extra_size - SNAPSHOT_KNOWN_EXTRA;
            sn->extra_unknown = malloc(sn->extra_unknown_len);
            if (!sn->extra_unknown) {
                cbt_error_set(errp, ENOMEM, "%s: out of memory", fn);
                return -1;
            }
            memcpy(sn->extra_unknown, ex + SNAPSHOT_KNOWN_EXTRA,
                   sn->extra_unknown_len);
        }
        off += extra;
        sn->id = calloc(1, (size_t)id_len + 1);
        sn->name = calloc(1, (size_t)name_len + 1);
        if (!sn->id || !sn->name) {
            cbt_error_set(errp, ENOMEM, "%s: out of memory", fn);
            return -1;
        }
        if (file_pread_exact(s->node->fd, sn->id, id_len, off) < 0)
            goto truncated;
        off += id_len;
        if (file_pread_exact(s->node->fd, sn->name, name_len, off) < 0)
            goto truncated;
        off += name_len;
        s->snapshots_size = off - h->snapshots_offset; /* QEMU's length */
        off = ALIGN_UP(off, 8);
        if ((uint64_t)sn->l1_size * 8 > QCOW2_MAX_L1_BYTES ||
            !IS_ALIGNED(sn->l1_table_offset, s->cluster_size)) {
            cbt_error_set(errp, EINVAL,
                          "%s: snapshot '%s' has an invalid L1 table", fn,
                          sn->name);
            return -1;
        }
    }
    return 0;
truncated:
    cbt_error_set(errp, EINVAL, "%s: snapshot table runs past the end of the file",
                  fn);
    return -1;
}

bool qcow2_snapshot_incomplete(const struct qcow2_state *s,
                               const struct qcow2_snapshot *sn)
{
    return s->h.version >= 3 && sn->extra_size < 16;
}

/* The table as QEMU 7.2 writes it: every entry with at least the 24 bytes
 * of known extra data, unknown extra data after them. */
static uint8_t *build_table(const struct qcow2_state *s, uint64_t *size)
{
    uint64_t len = 0;
    for (uint32_t i = 0; i < s->nb_snapshots; i++) {
        const struct qcow2_snapshot *sn = &s->snapshots[i];
        len = ALIGN_UP(len, 8) + SNAPSHOT_FIXED + SNAPSHOT_KNOWN_EXTRA +
              sn->extra_unknown_len + strlen(sn->id) + strlen(sn->name);
    }
    uint8_t *buf = calloc(1, len ? len : 1);
    if (!buf)
        return NULL;
    uint64_t pos = 0;
    for (uint32_t i = 0; i < s->nb_snapshots; i++) {
        const struct qcow2_snapshot *sn = &s->snapshots[i];
        size_t id_len = strlen(sn->id), name_len = strlen(sn->name);
        uint8_t *p = buf + ALIGN_UP(pos, 8);
        stbe64(p, sn->l1_table_offset);
        stbe32(p + 8, sn->l1_size);
        stbe16(p + 12, (uint16_t)id_len);
        stbe16(p + 14, (uint16_t)name_len);
        stbe32(p + 16, sn->date_sec);
        stbe32(p + 20, sn->date_nsec);
        stbe64(p + 24, sn->vm_clock_nsec);
        /* A size past 32 bits reads as a disk-only snapshot to old
         * readers (QEMU's rule). */
        stbe32(p + 32, sn->vm_state_size <= UINT32_MAX
                           ? (uint32_t)sn->vm_state_size : 0);
        stbe32(p + 36, SNAPSHOT_KNOWN_EXTRA + sn->extra_unknown_len);
        p += SNAPSHOT_FIXED;
        stbe64(p, sn->vm_state_size);
        stbe64(p + 8, sn->disk_size);
        stbe64(p + 16, sn->icount);
        p += SNAPSHOT_KNOWN_EXTRA;
        if (sn->extra_unknown_len)
            memcpy(p, sn->extra_unknown, sn->extra_unknown_len);
        p += sn->extra_unknown_len;
        memcpy(p, sn->id, id_len);
        memcpy(p + id_len, sn->name, name_len);
        pos = (uint64_t)(p + id_len + name_len - buf);
    }
    *size = len;
    return buf;
}

int qcow2_write_snapshots(struct qcow2_state *s)
{
    uint64_t size;
    CLEANUP_FREE uint8_t *buf = build_table(s, &size);
    if (!buf)
        return -ENOMEM;
    uint64_t bytes = ALIGN_UP(size, s->cluster_size);
    int64_t off = qcow2_alloc_clusters_append(s, bytes >> s->cluster_bits);
    if (off < 0)
        return (int)off;
    /* The new table, then its refcounts, durable before the header. */
    int r = qcow2_pwrite_meta(s, buf, size, (uint64_t)off, 0);
    s->need_sync = true;
    if (r == 0)
        r = qcow2_flush_metadata(s);
    uint64_t old_off = s->h.snapshots_offset, old_size = s->snapshots_size;
    bool written = false;
    if (r == 0) {
        s->h.snapshots_offset = (uint64_t)off;
        r = qcow2_write_header_ex(s, &written);
    }
    if (r < 0 && !written) {
        s->h.snapshots_offset = old_off;
        (void)qcow2_update_refcount(s, (uint64_t)off, bytes, -1);
        return r;
    }
    s->snapshots_size = size;
    for (uint32_t i = 0; i < s->nb_snapshots; i++) {
        struct qcow2_snapshot *sn = &s->snapshots[i];
        sn->extra_size = sn->extra_on_disk =
            SNAPSHOT_KNOWN_EXTRA + sn->extra_unknown_len;
        sn->extra_cut = false;
    }
    qcow2_meta_invalidate(s);
    if (r < 0)
        return r; /* in force, not synced: the old table must stay */
    /* Nothing refers to the old table any more. */
    r = qcow2_pre_free(s, old_off, old_size, 0);
    if (r == 0)
        r = qcow2_update_refcount(s, old_off, old_size, -1);
    return r == 0 ? qcow2_flush_metadata(s) : r;
}
