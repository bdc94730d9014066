/* qcow2 internal snapshot table: parsed (bounded, every length checked)
 * for info and for check; the table itself is kept as it is on disk. */
#include <inttypes.h>

#include "qcow2.h"

#define SNAPSHOT_FIXED 40

void qcow2_free_snapshots(struct qcow2_state *s)
{
    for (uint32_t i = 0; i < s->nb_snapshots; i++) {
        free(s->snapshots[i].id);
        free(s->snapshots[i].name);
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
        if (extra > QCOW2_MAX_SNAPSHOT_EXTRA) {
            cbt_error_set(errp, EINVAL,
                          "%s: snapshot %u has too much extra data (%u bytes)",
                          fn, i, extra);
            return -1;
        }
        off += SNAPSHOT_FIXED;
        uint8_t ex[QCOW2_MAX_SNAPSHOT_EXTRA];
        if (off + extra + id_len + name_len > file_len ||
            file_pread_exact(s->node->fd, ex, extra, off) < 0)
            goto truncated;
        if (extra >= 8)
            sn->vm_state_size = ldbe64(ex);
        if (extra >= 16)
            sn->disk_size = ldbe64(ex + 8);
        if (extra >= 24)
            sn->icount = ldbe64(ex + 16);
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
