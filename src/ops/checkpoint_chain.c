/*
 * Checkpoints over a backing chain: which layer's metadata a disk's
 * checkpoints come from, what the bitmap copies below it must still hold
 * (seals), and how a chain operation carries checkpoints to the layer that
 * is a disk afterwards (checkpoint_meta.h, docs/checkpoints.md "History
 * across snapshots").
 *
 * The changes since checkpoint C, seen from a disk, are the union of C's
 * bitmap copies over the chain (cbt/chain.h).  The chain rules say which
 * copies take part; they cannot say whether a copy below the top still
 * holds what it held when its layer stopped being the top.  A copy that
 * was removed and made again, edited, or that lives in a backing file that
 * was replaced, makes a union that looks valid and misses changes.  So
 * whenever cbt moves the top away from a copy (a snapshot) or rebuilds the
 * copies below a disk (commit, stream, rebase, convert), the metadata that
 * the disk reads records a seal for every copy below it: depth, dirty count
 * and SHA-256.  A checkpoint is usable only when every seal still matches:
 * the same depth holds a consistent copy with the same digest, and when
 * that layer carries checkpoint metadata, the same disk id.  Nothing else
 * is trusted: a wrong seal never makes a checkpoint usable, it only makes
 * it unusable (a full backup), and digests of different histories differ.
 *
 * The layer a snapshot moves away from gets a seal of depth 0: its own
 * copy is history an overlay continues.  Listed alone it reports such a
 * checkpoint as sealed (not broken: nothing there is to repair), and a
 * backup of that layer alone must be a full one.
 *
 * The view.  The metadata of a disk is in its top layer.  An overlay made
 * by QEMU (qemu-img create -b, blockdev-snapshot) has none: the disk's
 * checkpoints are then those of the first layer below that has metadata
 * (the holder), with its seals shifted by its depth, the layers above it
 * trusted by the chain rules alone.  The first change a cbt command makes
 * to such a disk's checkpoints writes that view into the top (adoption),
 * sealing the copies below it as they are then.
 *
 * Carrying.  A chain operation first judges the checkpoints of the view
 * (ckpt_carry_prepare), then does its work, then writes the records whose
 * history was intact into the layer that holds the disk's checkpoints
 * afterwards, with seals computed afresh along its new chain
 * (ckpt_carry_build/set).  Records that were unusable before are not
 * carried (with a warning): they can never become usable again, and
 * carrying them without their old seals could make them look usable.
 */
#include <inttypes.h>
#include <stdio.h>
#include <sys/random.h>

#include <cbt/bitmap.h>
#include <cbt/chain.h>
#include <cbt/checkpoint.h>

#include "../block/block.h"
#include "../util/util.h"
#include "checkpoint_meta.h"
#include "journal.h"

static const char *fname(struct cbt_image *img)
{
    return cbt_image_filename(img);
}

static void oom(struct cbt_error **errp, struct cbt_image *img)
{
    cbt_error_set(errp, ENOMEM, "%s: out of memory", fname(img));
}

/* ---- one layer's metadata ---- */

int ckpt_layer_raw(struct cbt_image *l, uint8_t **buf, size_t *len,
                   bool *present, struct cbt_error **errp)
{
    *buf = NULL;
    *len = 0;
    int r = blk_ext_get(l, CKPT_EXT_TYPE, buf, len);
    *present = r == 0;
    if (r == -ENOENT || r == -ENOTSUP)
        return 0;
    if (r == -ENOTUNIQ) {
        /* Readers took the first copy, writers changed the last: neither
         * can be trusted (reconcile --fix replaces them). */
        cbt_error_set(errp, EINVAL, "%s: the image header holds more than "
                      "one checkpoint metadata extension (type 0x%08x); cbt "
                      "writes one, and which copy is current cannot be "
                      "told, so no checkpoint of this disk is used or "
                      "changed; a reconcile replaces them with new "
                      "metadata", fname(l), CKPT_EXT_TYPE);
        cbt_error_set_remedy(errp, CBT_REMEDY_RECONCILE);
        return -1;
    }
    if (r < 0) {
        cbt_error_set(errp, -r, "%s: cannot read the checkpoint metadata: %s",
                      fname(l), strerror(-r));
        return -1;
    }
    return 0;
}

int ckpt_journal_load(struct cbt_image *l, struct journal *j,
                      struct cbt_error **errp)
{
    memset(j, 0, sizeof(*j));
    if (!l->drv->ext_get)
        return 0; /* a format without checkpoints */
    return journal_load(l->filename, j, errp);
}

/*
 * Apply the live journal of layer l (journal.h: checkpoints made or
 * deleted through QEMU while it held the image) to its metadata *m, in
 * memory: a created checkpoint is added as it was made (its bitmap is
 * judged as any other: one QEMU never stored shows as missing), a deleted
 * one is dropped.  *present becomes true when the journal gives the disk
 * metadata it had none of.  Applying twice changes nothing more.
 */
static int apply_journal(struct cbt_image *l, const struct journal *j,
                         struct ckpt_meta *m, bool *present,
                         struct cbt_error **errp)
{
    if (!*present && j->disk_id[0]) {
        unsigned u[16];
        if (sscanf(j->disk_id,
                   "%2x%2x%2x%2x-%2x%2x-%2x%2x-%2x%2x-%2x%2x%2x%2x%2x%2x",
                   &u[0], &u[1], &u[2], &u[3], &u[4], &u[5], &u[6], &u[7],
                   &u[8], &u[9], &u[10], &u[11], &u[12], &u[13], &u[14],
                   &u[15]) == 16) {
            for (int i = 0; i < 16; i++)
                m->uuid[i] = (uint8_t)u[i];
            m->next_order = MAX(m->next_order, 1);
            *present = true;
        }
    }
    for (size_t i = 0; i < j->n; i++) {
        const struct journal_rec *r = &j->v[i];
        if (r->op == JOURNAL_PENDING)
            continue; /* metadata only comes with CREATED */
        ssize_t k = ckpt_meta_find_name(m, r->name);
        if (r->op == JOURNAL_DELETED) {
            if (k >= 0)
                ckpt_meta_remove(m, (size_t)k);
            continue;
        }
        if (k >= 0 || ckpt_find_order(m->v, m->n, r->order))
            continue; /* folded already */
        ssize_t p = r->parent ? ckpt_meta_find_name(m, r->parent) : -1;
        struct ckpt_rec rec = {
            .order = r->order,
            .created_sec = r->created_sec,
            .created_nsec = r->created_nsec,
            .parent = p >= 0 ? m->v[p].order : 0,
            .virtual_size = r->virtual_size,
            .granularity = r->granularity,
            .name = r->name,
        };
        if (ckpt_meta_insert(m, &rec) < 0) {
            oom(errp, l);
            return -1;
        }
        m->next_order = MAX(m->next_order, r->order + 1);
        *present = true;
    }
    return 0;
}

int ckpt_layer_load(struct cbt_image *l, struct ckpt_meta *m, bool *present,
                    struct cbt_error **errp)
{
    memset(m, 0, sizeof(*m));
    uint8_t *buf;
    size_t len;
    bool have;
    if (ckpt_layer_raw(l, &buf, &len, &have, errp) < 0)
        return -1;
    int r = 0;
    char why[256] = "";
    if (have) {
        r = ckpt_meta_parse(buf, len, m, why, sizeof(why));
        free(buf);
    }
    if (r == 0) {
        struct journal j;
        r = ckpt_journal_load(l, &j, errp);
        if (r == 0 && (j.n || j.disk_id[0]))
            r = apply_journal(l, &j, m, &have, errp);
        journal_free(&j);
        if (r < 0) {
            ckpt_meta_free(m);
            return -1;
        }
        if (present)
            *present = have;
        return 0;
    }
    ckpt_meta_free(m);
    if (present)
        *present = have;
    if (r == -ENOMEM) {
        oom(errp, l);
        return -1;
    }
    cbt_error_set(errp, EINVAL, "%s: the checkpoint metadata (qcow2 header "
                  "extension 0x%08x) is corrupt: %s; a reconcile "
                  "rebuilds it from the bitmaps", fname(l), CKPT_EXT_TYPE,
                  why);
    cbt_error_set_remedy(errp, CBT_REMEDY_RECONCILE);
    return -1;
}

int ckpt_layer_set(struct cbt_image *l, const struct ckpt_meta *m,
                   size_t extra, struct cbt_error **errp)
{
    uint8_t *buf;
    size_t len;
    int r = ckpt_meta_build(m, &buf, &len);
    if (r < 0) {
        cbt_error_set(errp, -r, "%s: cannot encode the checkpoint metadata: "
                      "%s", fname(l), strerror(-r));
        return -1;
    }
    struct cbt_error *err = NULL;
    r = 0;
    if (extra) {
        uint8_t *big = calloc(1, len + extra);
        if (!big) {
            free(buf);
            oom(errp, l);
            return -1;
        }
        memcpy(big, buf, len);
        /* In memory only: replaced below, never written. */
        r = blk_ext_set(l, CKPT_EXT_TYPE, big, len + extra, &err);
        free(big);
    }
    if (r == 0)
        r = blk_ext_set(l, CKPT_EXT_TYPE, buf, len, &err);
    free(buf);
    if (r == 0)
        return 0;
    if (cbt_error_errno(err) == ENOSPC) {
        cbt_error_free(err);
        char seals[48] = "";
        if (m->nseals)
            snprintf(seals, sizeof(seals), " and %zu seal%s", m->nseals,
                     m->nseals == 1 ? "" : "s");
        cbt_error_set(errp, ENOSPC, "%s: the checkpoint metadata (%zu bytes "
                      "for %zu checkpoint%s%s) does not fit in the image "
                      "header (one cluster of %" PRIu32 " bytes); delete old "
                      "checkpoints or use shorter names", fname(l), len, m->n,
                      m->n == 1 ? "" : "s", seals, l->cluster_size);
        /* a full header, not a full host disk (exit status 1, not 74) */
        cbt_error_set_kind(errp, CBT_ERR_OTHER);
    } else if (errp && !*errp) {
        *errp = err;
    } else {
        cbt_error_free(err);
    }
    return -1;
}

int ckpt_save(struct cbt_image *l, struct ckpt_saved *s,
              struct cbt_error **errp)
{
    ckpt_saved_free(s);
    if (ckpt_layer_raw(l, &s->buf, &s->len, &s->present, errp) < 0)
        return -1;
    s->taken = true;
    return 0;
}

void ckpt_restore(struct cbt_image *l, const struct ckpt_saved *s)
{
    if (s->taken)
        blk_ext_set(l, CKPT_EXT_TYPE, s->present ? s->buf : NULL, s->len,
                    NULL);
}

void ckpt_saved_free(struct ckpt_saved *s)
{
    free(s->buf);
    memset(s, 0, sizeof(*s));
}

int ckpt_uuid_new(uint8_t uuid[16], const char *what, struct cbt_error **errp)
{
    size_t got = 0;
    while (got < 16) {
        ssize_t n = getrandom(uuid + got, 16 - got, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            int e = n < 0 ? errno : EIO;
            cbt_error_set(errp, e, "%s: cannot make a disk id: getrandom: %s",
                          what, strerror(e));
            return -1;
        }
        got += (size_t)n;
    }
    uuid[6] = (uint8_t)((uuid[6] & 0x0f) | 0x40); /* version 4 */
    uuid[8] = (uint8_t)((uuid[8] & 0x3f) | 0x80); /* RFC 4122 variant */
    return 0;
}

void ckpt_uuid_str(const uint8_t u[16], char out[37])
{
    snprintf(out, 37,
             "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-"
             "%02x%02x%02x%02x%02x%02x",
             u[0], u[1], u[2], u[3], u[4], u[5], u[6], u[7], u[8], u[9],
             u[10], u[11], u[12], u[13], u[14], u[15]);
}

/* ---- the view ---- */

int ckpt_view_load(struct cbt_image *disk, struct ckpt_view *v,
                   struct cbt_error **errp)
{
    memset(v, 0, sizeof(*v));
    int depth = 0;
    for (struct cbt_image *l = disk; l; l = cbt_image_backing(l), depth++) {
        bool present;
        if (ckpt_layer_load(l, &v->m, &present, errp) < 0)
            return -1;
        if (!present)
            continue;
        v->present = true;
        v->depth = depth;
        v->holder = l;
        for (size_t i = 0; i < v->m.nseals; i++)
            v->m.seals[i].depth += (uint32_t)depth;
        return 0;
    }
    return 0;
}

void ckpt_view_free(struct ckpt_view *v)
{
    ckpt_meta_free(&v->m);
    memset(v, 0, sizeof(*v));
}

/* ---- seals ---- */

const struct ckpt_seal *ckpt_find_seal(const struct ckpt_meta *m,
                                       uint64_t order, uint32_t depth)
{
    for (size_t i = 0; i < m->nseals; i++)
        if (m->seals[i].order == order && m->seals[i].depth == depth)
            return &m->seals[i];
    return NULL;
}

/* The layer `depth` levels below top, or NULL. */
static struct cbt_image *layer_at(struct cbt_image *top, uint32_t depth)
{
    struct cbt_image *l = top;
    for (uint32_t d = 0; l && d < depth; d++)
        l = cbt_image_backing(l);
    return l;
}

/* What layer l holds of bitmap `name`. */
struct copy {
    bool present, consistent, recording;
    uint64_t granularity, count;
};

static int copy_of(struct cbt_image *l, const char *name, struct copy *out,
                   struct cbt_error **errp)
{
    *out = (struct copy){ 0 };
    struct cbt_bitmap_info *list = NULL;
    size_t n = 0;
    if (cbt_bitmap_list(l, &list, &n, errp) < 0)
        return -1;
    for (size_t i = 0; i < n; i++) {
        if (strcmp(list[i].name, name) != 0)
            continue;
        out->present = true;
        out->consistent = !list[i].inconsistent;
        out->recording = list[i].recording;
        out->granularity = list[i].granularity;
        out->count = list[i].count;
    }
    cbt_bitmap_info_free_list(list, n);
    return 0;
}

/* A consistent copy's digest, in binary. */
static int copy_sha256(struct cbt_image *l, const char *name, uint8_t sha[32],
                       struct cbt_error **errp)
{
    char hex[65];
    if (cbt_bitmap_sha256(l, name, hex, errp) < 0)
        return -1;
    (void)sha256_from_hex(hex, sha); /* 64 digits, as sha256_hex wrote */
    return 0;
}

/* The disk id in layer l's metadata: 1 when it has valid metadata, 0 when
 * it has none or it cannot be parsed (the digest alone then decides). */
static int layer_uuid(struct cbt_image *l, uint8_t uuid[16])
{
    struct ckpt_meta m;
    bool present;
    struct cbt_error *err = NULL;
    int r = ckpt_layer_load(l, &m, &present, &err);
    cbt_error_free(err);
    if (r < 0 || !present)
        return 0;
    memcpy(uuid, m.uuid, 16);
    ckpt_meta_free(&m);
    return 1;
}

/* Check one seal of depth >= 1 seen from disk: 0 with out->kind set when
 * it fails (problem filled), 0 unchanged when it holds, -1 on errors. */
static int check_seal(struct cbt_image *disk, const struct ckpt_view *v,
                      const struct ckpt_rec *r, const struct ckpt_seal *sl,
                      struct ckpt_verdict *out, struct cbt_error **errp)
{
    struct cbt_image *l = layer_at(disk, sl->depth);
    if (!l) {
        out->kind = CBT_DRIFT_METADATA_WITHOUT_BITMAP;
        out->problem = cbt_strdup_printf(
            "its history continues %" PRIu32 " layer%s below, but the chain "
            "is shorter now (a backing file was dropped): the changes since "
            "the checkpoint are unknown", sl->depth,
            sl->depth == 1 ? "" : "s");
        return out->problem ? 0 : (oom(errp, disk), -1);
    }
    struct copy c;
    if (copy_of(l, r->name, &c, errp) < 0)
        return -1;
    uint8_t sha[32], id[16];
    if (!c.present || !c.consistent) {
        out->kind = c.present ? CBT_DRIFT_BITMAP_UNUSABLE
                              : CBT_DRIFT_METADATA_WITHOUT_BITMAP;
        out->problem = cbt_strdup_printf(
            "the copy of its bitmap sealed in '%s' (depth %" PRIu32 ") %s: "
            "the changes made there since the checkpoint are unknown",
            fname(l), sl->depth,
            c.present ? "is inconsistent" : "is gone (removed behind cbt's "
                                            "back, or the backing file was "
                                            "replaced)");
    } else if (copy_sha256(l, r->name, sha, errp) < 0) {
        return -1;
    } else if (memcmp(sha, sl->sha256, 32) != 0) {
        out->kind = CBT_DRIFT_BITMAP_UNUSABLE;
        out->problem = cbt_strdup_printf(
            "the copy of its bitmap sealed in '%s' (depth %" PRIu32 ") was "
            "changed since (%" PRIu64 " bytes dirty when sealed, %" PRIu64
            " now; the backing file was replaced or its bitmap edited): the "
            "changes since the checkpoint cannot be trusted", fname(l),
            sl->depth, sl->count, c.count);
    } else if (layer_uuid(l, id) && memcmp(id, v->m.uuid, 16) != 0) {
        char a[37], b[37];
        ckpt_uuid_str(id, a);
        ckpt_uuid_str(v->m.uuid, b);
        out->kind = CBT_DRIFT_BITMAP_UNUSABLE;
        out->problem = cbt_strdup_printf(
            "'%s' (depth %" PRIu32 "), where its history continues, belongs "
            "to another disk (id %s, this one's %s): the backing file was "
            "replaced", fname(l), sl->depth, a, b);
    } else {
        return 0;
    }
    return out->problem ? 0 : (oom(errp, disk), -1);
}

/*
 * The view of an overlay without metadata (made by QEMU) trusts only
 * recording copies down to the holder: a disabled copy there (one a
 * snapshot by cbt sealed, or one disabled by hand) may have missed writes
 * to its layer made after it stopped recording, such as a qemu-img commit
 * into it; only an overlay made by cbt snapshot, whose seals go with it,
 * continues a sealed history.  Sets out->kind and problem (-1 on ENOMEM).
 */
static int chain_view_problem(const struct cbt_chain_bitmap *b,
                              const struct ckpt_view *v,
                              const struct ckpt_rec *r,
                              struct ckpt_verdict *out)
{
    int held = v->depth;
    if (ckpt_find_seal(&v->m, r->order, (uint32_t)held)) {
        out->kind = CBT_DRIFT_BITMAP_UNUSABLE;
        out->problem = cbt_strdup_printf(
            "its copy in '%s' (depth %d) is sealed: that history continues "
            "in an overlay made by 'cbt snapshot', not in this one",
            b->layers[held].filename, held);
        return out->problem ? 0 : -1;
    }
    for (int d = 0; d <= held; d++) {
        if (b->layers[d].recording)
            continue;
        out->kind = CBT_DRIFT_BITMAP_UNUSABLE;
        out->problem = cbt_strdup_printf(
            "its copy in '%s' (depth %d) does not record: writes to that "
            "layer after it stopped may be missing (this overlay has no "
            "checkpoint metadata of its own: copies down to '%s', which "
            "holds it, must all record)", b->layers[d].filename, d,
            b->layers[held].filename);
        return out->problem ? 0 : -1;
    }
    return 0;
}

/* The verdict's other rules, once a disabled top copy is accepted (the
 * chain rules report only the first violation): every copy of the run
 * consistent and persistent, no copy below it (a gap). */
static bool run_whole(const struct cbt_chain_bitmap *b)
{
    for (size_t d = 0; d < b->nlayers; d++) {
        const struct cbt_chain_layer *l = &b->layers[d];
        if ((int)d < b->run ? l->inconsistent || !l->persistent : l->present)
            return false;
    }
    return true;
}

int ckpt_judge(struct cbt_image *disk, const struct ckpt_view *v,
               const struct ckpt_rec *r, struct ckpt_verdict *out,
               struct cbt_error **errp)
{
    *out = (struct ckpt_verdict){ .kind = -1 };
    out->sealed = v->depth == 0 && ckpt_find_seal(&v->m, r->order, 0);
    struct cbt_chain_bitmap b;
    struct cbt_error *err = NULL;
    if (cbt_chain_bitmap_get(disk, r->name, 0, &b, &err) < 0) {
        if (cbt_error_errno(err) != ENOENT) {
            if (errp && !*errp)
                *errp = err;
            else
                cbt_error_free(err);
            return -1;
        }
        cbt_error_free(err);
        out->kind = CBT_DRIFT_METADATA_WITHOUT_BITMAP;
        out->problem = cbt_strdup_printf(
            "no layer holds its bitmap (removed behind cbt's back?): the "
            "changes since the checkpoint are unknown");
        goto done;
    }
    out->granularity = b.granularity;
    /* A sealed copy in the disk's own layer is history, not recording. */
    bool sealed_top = out->sealed && b.reason == CBT_CHAIN_DISABLED &&
                      b.reason_depth == 0 && run_whole(&b);
    int held = v->depth; /* the copy in the layer holding the metadata */
    if (!b.valid && !sealed_top) {
        out->kind = b.reason == CBT_CHAIN_NOT_IN_TOP
                        ? CBT_DRIFT_METADATA_WITHOUT_BITMAP
                        : CBT_DRIFT_BITMAP_UNUSABLE;
        out->problem = strdup(b.message);
    } else if (b.run <= held) {
        out->kind = CBT_DRIFT_METADATA_WITHOUT_BITMAP;
        out->problem = cbt_strdup_printf(
            "its bitmap does not reach down to '%s' (depth %d), which holds "
            "the checkpoint's metadata: the changes since the checkpoint are "
            "unknown", fname(v->holder), held);
    } else if (held > 0 && chain_view_problem(&b, v, r, out) < 0) {
        cbt_chain_bitmap_clear(&b);
        oom(errp, disk);
        return -1;
    } else if (out->kind >= 0) {
        /* chain_view_problem said why */
    } else if (b.layers[held].granularity != r->granularity) {
        out->kind = CBT_DRIFT_MISMATCH;
        out->problem = cbt_strdup_printf(
            "its bitmap has granularity %" PRIu64 " but the checkpoint "
            "was created with %" PRIu64 ": the bitmap was replaced since, "
            "the changes since the checkpoint are unknown",
            b.layers[held].granularity, r->granularity);
    } else {
        out->count = b.count;
        for (size_t i = 0; i < v->m.nseals && out->kind < 0; i++) {
            const struct ckpt_seal *sl = &v->m.seals[i];
            if (sl->order == r->order && sl->depth > 0 &&
                check_seal(disk, v, r, sl, out, errp) < 0) {
                cbt_chain_bitmap_clear(&b);
                return -1;
            }
        }
    }
    if (out->kind >= 0 || out->sealed)
        out->count = 0;
    cbt_chain_bitmap_clear(&b);
done:
    if (out->sealed) {
        /* History is reported as such, broken or not: repairing it here
         * is the overlay's business (its list says what it lost). */
        char *why = out->problem;
        out->problem = cbt_strdup_printf(
            "sealed: this layer is history that an overlay made by 'cbt "
            "snapshot' continues; back up the overlay (this layer alone "
            "needs a full backup)%s%s", why ? "; that history is broken: " : "",
            why ? why : "");
        free(why);
    }
    if ((out->kind >= 0 || out->sealed) && !out->problem) {
        oom(errp, disk);
        return -1;
    }
    return 0;
}

void ckpt_verdict_clear(struct ckpt_verdict *v)
{
    free(v->problem);
    memset(v, 0, sizeof(*v));
}

/* ---- carrying checkpoints through chain operations ---- */

void ckpt_carry_free(struct ckpt_carry *c)
{
    ckpt_meta_free(&c->m);
    free(c->sealed);
    for (size_t i = 0; i < c->ndropped; i++) {
        free(c->dropped[i].name);
        free(c->dropped[i].why);
    }
    free(c->dropped);
    memset(c, 0, sizeof(*c));
}

static int push_dropped(struct ckpt_carry *c, const char *name,
                        const char *why)
{
    struct ckpt_dropped *v =
        realloc(c->dropped, (c->ndropped + 1) * sizeof(*v));
    if (!v)
        return -1;
    c->dropped = v;
    v[c->ndropped] = (struct ckpt_dropped){ strdup(name), strdup(why) };
    if (!v[c->ndropped].name || !v[c->ndropped].why) {
        free(v[c->ndropped].name);
        free(v[c->ndropped].why);
        return -1;
    }
    c->ndropped++;
    return 0;
}

int ckpt_carry_prepare(struct cbt_image *from, unsigned flags,
                       struct ckpt_carry *c, struct cbt_error **errp)
{
    memset(c, 0, sizeof(*c));
    struct ckpt_view v;
    if (ckpt_view_load(from, &v, errp) < 0)
        return -1;
    if (!v.present)
        return 0;
    for (size_t i = 0; i < v.m.nseals; i++)
        c->holder_sealed |= v.m.seals[i].depth == (uint32_t)v.depth;
    struct ckpt_view own = v; /* shares v's arrays, freed with v */
    struct cbt_image *at = from;
    if (flags & CKPT_AT_HOLDER) {
        /* The holder's own records, judged from the holder (its copies
         * may be sealed): the layers above it are the operation's. */
        for (size_t i = 0; i < own.m.nseals; i++)
            own.m.seals[i].depth -= (uint32_t)v.depth;
        own.depth = 0;
        at = v.holder;
    }
    c->present = true;
    c->holder = v.holder;
    c->depth = v.depth;
    int ret = -1;
    bool *drop = calloc(v.m.n ? v.m.n : 1, sizeof(*drop));
    if (!drop)
        goto nomem;
    for (size_t i = 0; i < v.m.n; i++) {
        struct ckpt_verdict vd;
        if (ckpt_judge(at, &own, &v.m.v[i], &vd, errp) < 0)
            goto out;
        drop[i] = vd.kind >= 0 || (vd.sealed && !(flags & CKPT_AT_HOLDER));
        int e = drop[i] ? push_dropped(c, v.m.v[i].name, vd.problem) : 0;
        if (!drop[i] && vd.sealed) {
            uint64_t *s2 = realloc(c->sealed, (c->nsealed + 1) * sizeof(*s2));
            if (s2) {
                c->sealed = s2;
                c->sealed[c->nsealed++] = v.m.v[i].order;
            }
            e = s2 ? e : -1;
        }
        ckpt_verdict_clear(&vd);
        if (e < 0)
            goto nomem;
    }
    /* Take the records over, then drop from the end so that indexes stay
     * right; children of a dropped record get its parent. */
    c->m = v.m;
    memset(&v.m, 0, sizeof(v.m));
    free(c->m.seals);
    c->m.seals = NULL;
    c->m.nseals = 0;
    for (size_t i = c->m.n; i-- > 0;)
        if (drop[i])
            ckpt_meta_remove(&c->m, i);
    ret = 0;
    goto out;
nomem:
    oom(errp, from);
out:
    free(drop);
    ckpt_view_free(&v);
    return ret;
}

void ckpt_carry_warn(const struct ckpt_carry *c, const char *where)
{
    for (size_t i = 0; i < c->ndropped; i++)
        cbt_warn("checkpoint '%s' cannot be used (%s); it is not carried "
                 "over to '%s': a backup since it must be a full one",
                 c->dropped[i].name, c->dropped[i].why, where);
}

/* The layer below n in the chain after a relink of from onto to. */
static struct cbt_image *next_layer(struct cbt_image *n,
                                    const struct ckpt_relink *rl)
{
    if (rl && n == rl->from)
        return rl->to;
    return cbt_image_backing(n);
}

/*
 * The seals of record r for target: its own copy (depth 0) when `sealed`,
 * and every copy in the run below target along the chain after the
 * relink.  1 when target cannot hold r (no usable copy there, or a gap
 * below: *why says which), 0 when sealed, -1 on errors.
 */
static int seal_record(struct cbt_image *target, const struct ckpt_relink *rl,
                       const struct ckpt_rec *r, bool sealed,
                       struct ckpt_meta *m, const char **why,
                       struct cbt_error **errp)
{
    struct copy c;
    if (copy_of(target, r->name, &c, errp) < 0)
        return -1;
    if (!c.present || !c.consistent || (!sealed && !c.recording)) {
        *why = "the layer has no recording copy of its bitmap";
        return 1;
    }
    if (c.granularity != r->granularity) {
        *why = "the layer's copy of its bitmap has another granularity";
        return 1;
    }
    struct ckpt_seal sl = { .order = r->order, .count = c.count };
    if (sealed && (copy_sha256(target, r->name, sl.sha256, errp) < 0 ||
                   ckpt_seal_add(m, &sl) < 0))
        return -1;
    uint32_t depth = 1;
    struct cbt_image *l = next_layer(target, rl);
    for (; l; l = next_layer(l, rl), depth++) {
        if (copy_of(l, r->name, &c, errp) < 0)
            return -1;
        if (!c.present)
            break;
        if (!c.consistent) {
            *why = "a copy of its bitmap below is inconsistent";
            return 1;
        }
        if (depth > CKPT_MAX_DEPTH) {
            *why = "its history is deeper than the metadata can record";
            return 1;
        }
        sl.depth = depth;
        sl.count = c.count;
        if (copy_sha256(l, r->name, sl.sha256, errp) < 0 ||
            ckpt_seal_add(m, &sl) < 0)
            return -1;
    }
    for (; l; l = next_layer(l, rl)) {
        if (copy_of(l, r->name, &c, errp) < 0)
            return -1;
        if (c.present) {
            *why = "its bitmap has a gap below the layer";
            return 1;
        }
    }
    return 0;
}

int ckpt_carry_build(const struct ckpt_carry *c, struct cbt_image *target,
                     const struct ckpt_relink *rl, unsigned flags,
                     struct ckpt_meta *out, struct cbt_error **errp)
{
    memset(out, 0, sizeof(*out));
    if ((flags & CKPT_KEEP_OTHERS) &&
        ckpt_layer_load(target, out, NULL, errp) < 0)
        return -1;
    memcpy(out->uuid, c->m.uuid, 16);
    out->next_order = MAX(out->next_order, c->m.next_order);
    /* The carried records replace the layer's own of the same order. */
    for (size_t i = 0; i < c->m.n; i++) {
        const struct ckpt_rec *r = &c->m.v[i];
        ssize_t k = ckpt_meta_find_name(out, r->name);
        if (k >= 0)
            ckpt_meta_remove(out, (size_t)k);
        for (size_t j = 0; j < out->n; j++) {
            if (out->v[j].order == r->order) {
                ckpt_meta_remove(out, j);
                break;
            }
        }
        if (ckpt_meta_insert(out, r) < 0)
            goto nomem;
    }
    /* Seal each; the ones the layer cannot hold go again. */
    for (size_t i = 0; i < c->m.n; i++) {
        const struct ckpt_rec *r = &c->m.v[i];
        const char *why = NULL;
        bool history = false;
        for (size_t k = 0; k < c->nsealed; k++)
            history |= c->sealed[k] == r->order;
        int s = 1;
        if (history && !(flags & CKPT_SEALED))
            why = "it is history that an overlay made by 'cbt snapshot' "
                  "continues, and the layer is to be a disk of its own";
        else
            s = seal_record(target, rl, r, flags & CKPT_SEALED, out, &why,
                            errp);
        if (s < 0)
            goto fail;
        if (s == 0)
            continue;
        if (!(flags & CKPT_QUIET) || history)
            warn_to(&target->warner,
                    "checkpoint '%s' is not carried over to '%s': %s; a "
                    "backup since it must be a full one", r->name,
                    fname(target), why);
        ckpt_meta_remove(out, (size_t)ckpt_meta_find_name(out, r->name));
    }
    return 0;
nomem:
    oom(errp, target);
fail:
    ckpt_meta_free(out);
    return -1;
}

int ckpt_carry_set(const struct ckpt_carry *c, struct cbt_image *target,
                   const struct ckpt_relink *rl, unsigned flags,
                   struct cbt_error **errp)
{
    if (!c->present)
        return 0;
    struct ckpt_meta m;
    if (ckpt_carry_build(c, target, rl, flags, &m, errp) < 0)
        return -1;
    int r = ckpt_layer_set(target, &m, 0, errp);
    ckpt_meta_free(&m);
    return r;
}
