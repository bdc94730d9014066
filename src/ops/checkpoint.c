/*
 * Checkpoints (include/cbt/checkpoint.h): a recording persistent bitmap per
 * checkpoint, kept over the chain by the chain rules, plus metadata in the
 * top layer, in a qcow2 header extension of cbt's own (checkpoint_meta.h;
 * the layout is in docs/checkpoints.md).
 *
 * Atomicity.  The extension is kept in memory by the qcow2 driver and
 * written in the same header update as the next bitmap store, so a change
 * of the top layer (bitmap added or removed, metadata changed) is: change
 * the bitmaps in memory, set the extension, one cbt_bitmap_commit(), then a
 * flush (which writes the header when no bitmap changed).  On any failure
 * before the commit lands, the bitmaps are rolled back and the old
 * extension is put back, so the file stays as it was.
 *
 * Layers below the top are changed after the top (delete, reconcile
 * --fix): a crash in between leaves copies of a bitmap without metadata
 * below the top, which the chain rules never take as valid (the top lacks
 * them) and which reconcile reports and a repeated delete removes.  The
 * other order could leave a checkpoint whose union silently misses the
 * lower copies.
 */
#include <inttypes.h>
#include <stdio.h>
#include <sys/random.h>
#include <time.h>

#include <cbt/bitmap.h>
#include <cbt/chain.h>
#include <cbt/checkpoint.h>

#include "../block/block.h"
#include "../util/util.h"
#include "checkpoint_meta.h"
#include "journal.h"

_Static_assert(CKPT_NAME_MAX == CBT_CHECKPOINT_NAME_MAX,
               "checkpoint name limits differ");

/* ---- metadata of a disk ---- */

static const char *fname(struct cbt_image *img)
{
    return cbt_image_filename(img);
}

static void oom(struct cbt_error **errp, struct cbt_image *img)
{
    cbt_error_set(errp, ENOMEM, "%s: out of memory", fname(img));
}

static int new_uuid(struct cbt_image *top, uint8_t uuid[16],
                    struct cbt_error **errp)
{
    return ckpt_uuid_new(uuid, fname(top), errp);
}

/* Forget top's uncommitted bitmap and metadata changes. */
static void undo(struct cbt_image *top, struct ckpt_saved *s)
{
    cbt_bitmap_rollback(top, NULL);
    ckpt_restore(top, s);
}

/* Store top's bitmaps and extension in one header update and flush; on
 * failure undo everything in memory. */
static int commit_top(struct cbt_image *top, struct ckpt_saved *s,
                      struct cbt_error **errp)
{
    if (cbt_bitmap_commit(top, errp) < 0) {
        /* A store that failed after its header write landed (the sync
         * failed) put bitmaps and metadata in place together: keep them
         * so, in memory as on disk. */
        if (!top->bitmaps_switched)
            undo(top, s);
        return -1;
    }
    int r = cbt_image_flush(top);
    if (r < 0) {
        cbt_error_set(errp, -r, "%s: cannot flush the checkpoint metadata: %s",
                      fname(top), strerror(-r));
        return -1;
    }
    return 0;
}

int ckpt_fold_journal(struct cbt_image *top, struct cbt_error **errp)
{
    if (top->read_only || !top->drv->ext_get)
        return 0;
    struct journal j;
    if (ckpt_journal_load(top, &j, errp) < 0)
        return -1;
    if (!j.n && !j.disk_id[0]) {
        journal_free(&j);
        return 0;
    }
    /* What ckpt_layer_load gives is the metadata with the journal applied:
     * storing it folds the journal in; then the journal goes. */
    struct ckpt_meta m;
    struct ckpt_saved saved = { 0 };
    int ret = -1;
    if (ckpt_layer_load(top, &m, NULL, errp) < 0)
        goto out_journal;
    if (ckpt_save(top, &saved, errp) < 0)
        goto out;
    /* The bitmap a cbt killed during a live backup made and never kept
     * (QEMU stored it at its clean close): it describes no checkpoint. */
    for (size_t i = 0; i < j.n; i++) {
        const char *name = j.v[i].name;
        struct cbt_error *e = NULL;
        if (journal_stale_pending(&j, i) && ckpt_meta_find_name(&m, name) < 0 &&
            cbt_bitmap_remove(top, name, &e) == 0)
            warn_to(&top->warner, "%s: removed bitmap '%s', the new "
                    "checkpoint of a live backup that was interrupted",
                    fname(top), name);
        cbt_error_free(e);
    }
    if (ckpt_layer_set(top, &m, 0, errp) < 0)
        goto out;
    if (commit_top(top, &saved, errp) < 0)
        goto out;
    cbt_debug("%s: folded %zu live journal records into the image",
              fname(top), j.n);
    ret = journal_remove(&j, errp);
out:
    ckpt_saved_free(&saved);
    ckpt_meta_free(&m);
out_journal:
    if (ret < 0)
        cbt_error_prefix(errp, "%s: folding the live checkpoints of the "
                         "journal %s into the image", fname(top),
                         j.path ? j.path : "");
    journal_free(&j);
    return ret;
}

/* The error for a failed ckpt_meta_append of checkpoint `name`. */
static void orders_error(struct cbt_error **errp, struct cbt_image *top,
                         const char *name, const struct ckpt_meta *m, int r)
{
    if (r != -EOVERFLOW) {
        oom(errp, top);
        return;
    }
    cbt_error_set(errp, EOVERFLOW, "%s: cannot create checkpoint '%s': the "
                  "checkpoint metadata's next order is %" PRIu64 ", the "
                  "largest there is, so no new checkpoint can be numbered "
                  "(was the metadata altered?)", fname(top), name,
                  m->next_order);
}

static bool has_bitmap(struct cbt_image *img, const char *name,
                       const struct cbt_bitmap_info *list, size_t n)
{
    (void)img;
    for (size_t i = 0; i < n; i++)
        if (strcmp(list[i].name, name) == 0)
            return true;
    return false;
}

static int check_name(struct cbt_image *top, const char *name,
                      struct cbt_error **errp)
{
    if (!name || !*name) {
        cbt_error_set(errp, EINVAL, "%s: a checkpoint name must not be empty",
                      fname(top));
        return -1;
    }
    size_t len = strlen(name);
    if (len > CBT_CHECKPOINT_NAME_MAX) {
        cbt_error_set(errp, ENAMETOOLONG, "%s: checkpoint name is %zu bytes "
                      "long, at most %d are allowed", fname(top), len,
                      CBT_CHECKPOINT_NAME_MAX);
        return -1;
    }
    return 0;
}

static int need_rw(struct cbt_image *top, const char *what,
                   struct cbt_error **errp)
{
    if (top->read_only) {
        cbt_error_set(errp, EROFS, "%s: cannot %s: the disk is opened "
                      "read-only", fname(top), what);
        return -1;
    }
    if (!top->drv->ext_get) {
        cbt_error_set(errp, ENOTSUP, "%s: checkpoints need a qcow2 disk (this "
                      "one is %s)", fname(top), cbt_image_format(top));
        return -1;
    }
    return 0;
}

/*
 * The metadata a change of disk's checkpoints starts from: disk's own, or,
 * when disk has none but a layer below has (an overlay QEMU made), that
 * view adopted: its records whose history is intact, sealed along disk's
 * chain as it is now (the others are left out, with a warning).  *present:
 * there was metadata anywhere.
 */
static int disk_meta(struct cbt_image *disk, struct ckpt_meta *m,
                     bool *present, struct cbt_error **errp)
{
    memset(m, 0, sizeof(*m));
    bool own;
    if (ckpt_layer_load(disk, m, &own, errp) < 0)
        return -1;
    *present = own;
    if (own)
        return 0;
    struct ckpt_carry c;
    if (ckpt_carry_prepare(disk, 0, &c, errp) < 0)
        return -1;
    int r = 0;
    if (c.present) {
        ckpt_carry_warn(&c, fname(disk));
        r = ckpt_carry_build(&c, disk, NULL, 0, m, errp);
        *present = r == 0;
    }
    ckpt_carry_free(&c);
    return r;
}

static int fill(struct cbt_image *disk, const struct ckpt_view *view,
                const struct ckpt_rec *r, struct cbt_checkpoint *c,
                struct cbt_error **errp)
{
    const struct ckpt_meta *m = &view->m;
    memset(c, 0, sizeof(*c));
    c->order = r->order;
    c->created_sec = r->created_sec;
    c->created_nsec = r->created_nsec;
    c->virtual_size = r->virtual_size;
    c->granularity = r->granularity;
    c->name = strdup(r->name);
    const struct ckpt_rec *p =
        r->parent ? ckpt_find_order(m->v, m->n, r->parent) : NULL;
    if (p)
        c->parent = strdup(p->name);
    if (!c->name || (p && !c->parent)) {
        cbt_checkpoint_clear(c);
        oom(errp, disk);
        return -1;
    }
    struct ckpt_verdict v;
    if (ckpt_judge(disk, view, r, &v, errp) < 0) {
        cbt_checkpoint_clear(c);
        return -1;
    }
    c->usable = v.kind < 0 && !v.sealed;
    c->sealed = v.sealed;
    c->problem = v.problem;
    c->dirty_bytes = v.count;
    return 0;
}

/* ---- the API ---- */

int cbt_checkpoint_disk_id(struct cbt_image *disk, char id[37],
                           struct cbt_error **errp)
{
    id[0] = 0;
    struct ckpt_view v;
    if (ckpt_view_load(disk, &v, errp) < 0)
        return -1;
    if (v.present)
        ckpt_uuid_str(v.m.uuid, id);
    ckpt_view_free(&v);
    return 0;
}

int cbt_checkpoint_create(struct cbt_image *disk, const char *name,
                          uint64_t granularity, struct cbt_error **errp)
{
    if (!disk) {
        cbt_error_set(errp, EINVAL, "checkpoint create: no disk");
        return -1;
    }
    if (check_name(disk, name, errp) < 0 ||
        need_rw(disk, "create a checkpoint", errp) < 0 ||
        ckpt_fold_journal(disk, errp) < 0)
        return -1;
    struct ckpt_meta m;
    bool present;
    if (disk_meta(disk, &m, &present, errp) < 0)
        return -1;
    struct ckpt_saved saved = { 0 };
    struct cbt_bitmap_info *list = NULL;
    size_t n = 0, top_persistent = 0;
    int ret = -1;
    bool added = false;

    if (ckpt_meta_find_name(&m, name) >= 0) {
        cbt_error_set(errp, EEXIST, "%s: checkpoint '%s' already exists",
                      fname(disk), name);
        goto out;
    }
    if (present && m.next_order == UINT64_MAX) {
        orders_error(errp, disk, name, &m, -EOVERFLOW);
        goto out;
    }
    int depth = 0;
    for (struct cbt_image *l = disk; l; l = cbt_image_backing(l), depth++) {
        if (cbt_bitmap_list(l, &list, &n, errp) < 0)
            goto out;
        bool clash = has_bitmap(l, name, list, n);
        if (depth == 0)
            for (size_t i = 0; i < n; i++)
                top_persistent += list[i].persistent;
        cbt_bitmap_info_free_list(list, n);
        list = NULL;
        n = 0;
        if (clash) {
            cbt_error_set(errp, EEXIST, "%s: a bitmap named '%s' already "
                          "exists in layer '%s' (depth %d); a checkpoint name "
                          "must differ from every bitmap of the chain",
                          fname(disk), name, fname(l), depth);
            goto out;
        }
    }
    if (!present) {
        if (new_uuid(disk, m.uuid, errp) < 0)
            goto out;
        m.next_order = 1;
    }
    if (ckpt_save(disk, &saved, errp) < 0)
        goto out;
    if (cbt_bitmap_add(disk, name, granularity, false, errp) < 0)
        goto out;
    added = true;
    if (cbt_bitmap_list(disk, &list, &n, errp) < 0)
        goto out;
    uint64_t gran = 0;
    for (size_t i = 0; i < n; i++)
        if (strcmp(list[i].name, name) == 0)
            gran = list[i].granularity;
    int r = ckpt_meta_append(&m, name, cbt_image_size(disk), gran);
    if (r < 0) {
        orders_error(errp, disk, name, &m, r);
        goto out;
    }
    /* A top without stored bitmaps gains the bitmaps extension (8-byte
     * header + 24 bytes) with this store. */
    if (ckpt_layer_set(disk, &m, top_persistent ? 0 : 32, errp) < 0)
        goto out;
    ret = commit_top(disk, &saved, errp);
    added = false;
out:
    if (ret < 0 && added)
        undo(disk, &saved);
    cbt_bitmap_info_free_list(list, n);
    ckpt_saved_free(&saved);
    ckpt_meta_free(&m);
    return ret;
}

int cbt_checkpoint_list(struct cbt_image *disk, struct cbt_checkpoint **list,
                        size_t *count, struct cbt_error **errp)
{
    *list = NULL;
    *count = 0;
    struct ckpt_view view;
    if (ckpt_view_load(disk, &view, errp) < 0)
        return -1;
    const struct ckpt_meta *m = &view.m;
    struct cbt_checkpoint *v = calloc(m->n ? m->n : 1, sizeof(*v));
    if (!v) {
        ckpt_view_free(&view);
        oom(errp, disk);
        return -1;
    }
    size_t k = 0;
    for (; k < m->n; k++)
        if (fill(disk, &view, &m->v[k], &v[k], errp) < 0)
            break;
    int ret = k == m->n ? 0 : -1;
    if (ret < 0)
        cbt_checkpoint_free_list(v, k);
    else {
        *list = v;
        *count = k;
    }
    ckpt_view_free(&view);
    return ret;
}

void cbt_checkpoint_clear(struct cbt_checkpoint *c)
{
    if (!c)
        return;
    free(c->name);
    free(c->parent);
    free(c->problem);
    memset(c, 0, sizeof(*c));
}

void cbt_checkpoint_free_list(struct cbt_checkpoint *list, size_t count)
{
    for (size_t i = 0; list && i < count; i++)
        cbt_checkpoint_clear(&list[i]);
    free(list);
}

int cbt_checkpoint_get(struct cbt_image *disk, const char *name,
                       struct cbt_checkpoint *out, struct cbt_error **errp)
{
    memset(out, 0, sizeof(*out));
    if (check_name(disk, name, errp) < 0)
        return -1;
    struct ckpt_view view;
    if (ckpt_view_load(disk, &view, errp) < 0)
        return -1;
    ssize_t i = ckpt_meta_find_name(&view.m, name);
    int ret;
    if (i < 0) {
        cbt_error_set(errp, ENOENT, "%s: no checkpoint named '%s'", fname(disk),
                      name);
        ret = -1;
    } else {
        ret = fill(disk, &view, &view.m.v[i], out, errp);
    }
    ckpt_view_free(&view);
    return ret;
}

/* Drop the records of names[0..n) from *own, layer l's metadata, and set
 * it in memory (stored with l's next bitmap commit). */
static int drop_records(struct cbt_image *l, struct ckpt_meta *own,
                        char *const *names, size_t n,
                        struct cbt_error **errp)
{
    for (size_t i = 0; i < n; i++) {
        ssize_t k = ckpt_meta_find_name(own, names[i]);
        if (k >= 0)
            ckpt_meta_remove(own, (size_t)k);
    }
    return ckpt_layer_set(l, own, 0, errp);
}

/*
 * Remove bitmap `names[0..n)` from every layer below the top that holds
 * them, and their records from the metadata those layers hold, each layer
 * in one commit (reopened read-write).  With an owner (reconcile: the
 * disk's view), a name's walk stops at a layer where it is sealed history
 * (a depth-0 seal) that the owner did not seal itself: that copy, and the
 * history below it, belong to the overlay that continues it (a snapshot of
 * that layer by cbt), not to the repair of another overlay on it.
 */
static bool owns_copy(const struct ckpt_view *owner, const char *name,
                      int depth)
{
    ssize_t k = ckpt_meta_find_name(&owner->m, name);
    return k >= 0 && depth > owner->depth &&
           ckpt_find_seal(&owner->m, owner->m.v[k].order, (uint32_t)depth);
}

static int remove_below(struct cbt_image *disk, char *const *names, size_t n,
                        const struct ckpt_view *owner,
                        struct cbt_error **errp)
{
    if (n == 0)
        return 0;
    char **live = calloc(n ? n : 1, sizeof(*live));
    char **here = calloc(n ? n : 1, sizeof(*here));
    if (!live || !here) {
        free(live);
        free(here);
        oom(errp, disk);
        return -1;
    }
    memcpy(live, names, n * sizeof(*live));
    size_t nlive = n;
    int depth = 1, ret = 0;
    for (struct cbt_image *l = cbt_image_backing(disk); l && nlive && !ret;
         l = cbt_image_backing(l), depth++) {
        struct ckpt_meta own;
        struct cbt_error *err = NULL;
        if (ckpt_layer_load(l, &own, NULL, &err) < 0) {
            cbt_error_free(err); /* corrupt: its records are not touched */
            memset(&own, 0, sizeof(own));
        }
        struct cbt_bitmap_info *list = NULL;
        size_t ln = 0, nhere = 0;
        bool records = false;
        if (cbt_bitmap_list(l, &list, &ln, errp) < 0) {
            ckpt_meta_free(&own);
            ret = -1;
            break;
        }
        for (size_t i = 0; i < nlive;) {
            ssize_t k = ckpt_meta_find_name(&own, live[i]);
            if (owner && k >= 0 && ckpt_find_seal(&own, own.v[k].order, 0) &&
                !owns_copy(owner, live[i], depth)) {
                live[i] = live[--nlive]; /* history: this walk stops */
                continue;
            }
            records |= k >= 0;
            if (k >= 0 || has_bitmap(l, live[i], list, ln))
                here[nhere++] = live[i];
            i++;
        }
        if (nhere) {
            struct ckpt_saved saved = { 0 };
            int r = blk_reopen_rw(l, errp);
            if (r == 0)
                r = ckpt_save(l, &saved, errp);
            for (size_t i = 0; i < nhere && r == 0; i++)
                if (has_bitmap(l, here[i], list, ln))
                    r = cbt_bitmap_remove(l, here[i], errp);
            if (r == 0 && records)
                r = drop_records(l, &own, here, nhere, errp);
            if (r == 0)
                r = commit_top(l, &saved, errp);
            else
                undo(l, &saved);
            ckpt_saved_free(&saved);
            if (r < 0) {
                cbt_error_prefix(errp, "%s: the top layer is updated, but "
                                 "the bitmap copies in layer '%s' (depth %d) "
                                 "could not be removed (run the command "
                                 "again)", fname(disk), fname(l), depth);
                ret = -1;
            }
        }
        cbt_bitmap_info_free_list(list, ln);
        ckpt_meta_free(&own);
    }
    free(live);
    free(here);
    return ret;
}

/* Remove names[0..n) from the top's bitmaps in memory (those it holds). */
static int remove_in_top(struct cbt_image *disk, char *const *names, size_t n,
                         struct cbt_error **errp)
{
    struct cbt_bitmap_info *list = NULL;
    size_t ln = 0;
    if (cbt_bitmap_list(disk, &list, &ln, errp) < 0)
        return -1;
    int r = 0;
    for (size_t i = 0; i < n && r == 0; i++)
        if (has_bitmap(disk, names[i], list, ln))
            r = cbt_bitmap_remove(disk, names[i], errp);
    cbt_bitmap_info_free_list(list, ln);
    return r;
}

int cbt_checkpoint_delete(struct cbt_image *disk, const char *name,
                          bool *existed, struct cbt_error **errp)
{
    *existed = false;
    if (check_name(disk, name, errp) < 0 ||
        need_rw(disk, "delete a checkpoint", errp) < 0 ||
        ckpt_fold_journal(disk, errp) < 0)
        return -1;
    struct ckpt_saved saved = { 0 };
    struct ckpt_meta m;
    bool present;
    if (ckpt_save(disk, &saved, errp) < 0 ||
        disk_meta(disk, &m, &present, errp) < 0) {
        ckpt_saved_free(&saved);
        return -1;
    }
    int ret = -1;
    char *names[1] = { (char *)name };
    ssize_t i = ckpt_meta_find_name(&m, name);
    *existed = i >= 0;
    if (i >= 0 && ckpt_find_seal(&m, m.v[i].order, 0))
        warn_to(&disk->warner,
                "%s: checkpoint '%s' is sealed history that an overlay "
                "continues: the overlay's checkpoint '%s' cannot be used "
                "any more (a backup of it since '%s' must be a full one)",
                fname(disk), name, name, name);
    if (remove_in_top(disk, names, 1, errp) < 0) {
        undo(disk, &saved);
        goto out;
    }
    if (present) {
        if (i >= 0)
            ckpt_meta_remove(&m, (size_t)i);
        if (ckpt_layer_set(disk, &m, 0, errp) < 0) {
            undo(disk, &saved);
            goto out;
        }
    }
    if (commit_top(disk, &saved, errp) < 0)
        goto out;
    ret = remove_below(disk, names, 1, NULL, errp);
out:
    ckpt_saved_free(&saved);
    ckpt_meta_free(&m);
    return ret;
}

/* ---- reconcile ---- */

int drift_items_push(struct drift_items *it, enum cbt_drift kind,
                     const char *name, char *explanation, char *fix,
                     bool fixed)
{
    struct cbt_drift_item *v = realloc(it->v, (it->n + 1) * sizeof(*v));
    char *nm = strdup(name);
    if (!v || !nm || !explanation || !fix) {
        if (v)
            it->v = v;
        free(nm);
        free(explanation);
        free(fix);
        return -1;
    }
    it->v = v;
    it->v[it->n++] = (struct cbt_drift_item){
        .kind = kind, .name = nm, .explanation = explanation, .fix = fix,
        .fixed = fixed,
    };
    return 0;
}

void cbt_drift_free_list(struct cbt_drift_item *items, size_t count)
{
    for (size_t i = 0; items && i < count; i++) {
        free(items[i].name);
        free(items[i].explanation);
        free(items[i].fix);
    }
    free(items);
}

const char *cbt_drift_code(enum cbt_drift kind)
{
    switch (kind) {
    case CBT_DRIFT_BITMAP_WITHOUT_METADATA:
        return "bitmap-without-metadata";
    case CBT_DRIFT_METADATA_WITHOUT_BITMAP:
        return "metadata-without-bitmap";
    case CBT_DRIFT_BITMAP_UNUSABLE:
        return "bitmap-unusable";
    case CBT_DRIFT_MISMATCH:
        return "mismatch";
    case CBT_DRIFT_METADATA_CORRUPT:
        return "metadata-corrupt";
    case CBT_DRIFT_LEFTOVER:
        return "leftover";
    }
    return "unknown";
}

struct names {
    char **v;
    size_t n;
};

static int names_push(struct names *s, const char *name)
{
    char **v = realloc(s->v, (s->n + 1) * sizeof(*v));
    if (!v)
        return -1;
    s->v = v;
    if (!(s->v[s->n] = strdup(name)))
        return -1;
    s->n++;
    return 0;
}

static void names_free(struct names *s)
{
    for (size_t i = 0; i < s->n; i++)
        free(s->v[i]);
    free(s->v);
}

static bool names_has(const struct names *s, const char *name)
{
    for (size_t i = 0; i < s->n; i++)
        if (strcmp(s->v[i], name) == 0)
            return true;
    return false;
}

/* One reconcile: what it found (it), and with fix what it changes. */
struct reconcile {
    struct cbt_image *disk;
    bool fix;
    struct drift_items it;
    struct names drop;       /* checkpoints the fix drops */
    struct names known;      /* every checkpoint the metadata names */
    struct ckpt_view view;   /* the metadata as found */
    struct ckpt_meta m;      /* the metadata the fix writes */
    struct ckpt_saved saved; /* the top's extension before the fix */
    bool changed;
};

/*
 * Two copies of the metadata extension: readers took the first, writers
 * changed the last, so neither can be trusted.  The fix replaces them all
 * with one (a failed fix may leave none: then a full backup is needed,
 * never a wrong incremental).  0; 1 when there are two and no fix (the
 * report ends there); -1 with *errp.
 */
static int rc_duplicates(struct reconcile *rc, struct cbt_error **errp)
{
    struct cbt_image *disk = rc->disk;
    uint8_t *dbuf = NULL;
    size_t dlen = 0;
    bool dup = disk->drv->ext_get &&
               blk_ext_get(disk, CKPT_EXT_TYPE, &dbuf, &dlen) == -ENOTUNIQ;
    free(dbuf);
    if (!dup)
        return 0;
    if (drift_items_push(&rc->it, CBT_DRIFT_METADATA_CORRUPT, "",
                  cbt_strdup_printf("the image header holds more than "
                                    "one checkpoint metadata extension: "
                                    "which is current cannot be told, "
                                    "so no checkpoint of this disk can "
                                    "be trusted"),
                  cbt_strdup_printf("replace them with one, empty (a "
                                    "new disk id), and adopt the bitmaps "
                                    "as below"),
                  rc->fix) < 0) {
        oom(errp, disk);
        return -1;
    }
    if (!rc->fix)
        return 1;
    if (blk_ext_set(disk, CKPT_EXT_TYPE, NULL, 0, errp) < 0)
        return -1;
    rc->changed = true;
    return 0;
}

/* The metadata as found (the top's, saved for an undo; or, for an overlay
 * without its own, its chain's), a corrupt one reported; every name in
 * rc->known. */
static int rc_load(struct reconcile *rc, struct cbt_error **errp)
{
    struct cbt_image *disk = rc->disk;
    if (rc->fix && ckpt_fold_journal(disk, errp) < 0)
        return -1;
    if (ckpt_save(disk, &rc->saved, errp) < 0)
        return -1;
    if (rc->saved.present) {
        char why[256] = "";
        int r = ckpt_meta_parse(rc->saved.buf, rc->saved.len, &rc->view.m,
                                why, sizeof(why));
        if (r == -ENOMEM)
            goto nomem;
        rc->view.present = r == 0;
        rc->view.holder = disk;
        if (r < 0) {
            ckpt_meta_free(&rc->view.m);
            rc->changed = rc->fix;
            if (drift_items_push(&rc->it, CBT_DRIFT_METADATA_CORRUPT, "",
                          cbt_strdup_printf("the checkpoint metadata is "
                                            "corrupt (%s): no checkpoint of "
                                            "this disk can be trusted", why),
                          cbt_strdup_printf("replace it with empty metadata "
                                            "(a new disk id) and adopt the "
                                            "bitmaps as below"),
                          rc->fix) < 0)
                goto nomem;
        }
    } else if (ckpt_view_load(disk, &rc->view, errp) < 0) {
        return -1;
    }
    for (size_t i = 0; i < rc->view.m.n; i++)
        if (names_push(&rc->known, rc->view.m.v[i].name) < 0)
            goto nomem;
    return 0;
nomem:
    oom(errp, disk);
    return -1;
}

/* Checkpoints whose bitmap is missing or broken (with fix: to rc->drop).
 * Sealed ones are history an overlay continues: never drift, never
 * dropped here. */
static int rc_judge(struct reconcile *rc, struct cbt_error **errp)
{
    for (size_t i = 0; i < rc->view.m.n; i++) {
        const struct ckpt_rec *rec = &rc->view.m.v[i];
        struct ckpt_verdict v;
        if (ckpt_judge(rc->disk, &rc->view, rec, &v, errp) < 0)
            return -1;
        if (v.kind < 0 || v.sealed) {
            ckpt_verdict_clear(&v);
            continue;
        }
        const char *what =
            v.kind == CBT_DRIFT_METADATA_WITHOUT_BITMAP
                ? "drop the checkpoint (and any copies of its bitmap below "
                  "the top)"
                : "drop the checkpoint and its bitmap in every layer";
        int r = drift_items_push(&rc->it, (enum cbt_drift)v.kind, rec->name,
                          cbt_strdup_printf("checkpoint '%s': %s", rec->name,
                                            v.problem),
                          cbt_strdup_printf("%s; a backup since it must be a "
                                            "full one", what),
                          rc->fix);
        ckpt_verdict_clear(&v);
        if (r < 0 || (rc->fix && names_push(&rc->drop, rec->name) < 0)) {
            oom(errp, rc->disk);
            return -1;
        }
        rc->changed |= rc->fix;
    }
    return 0;
}

/* The metadata the fix writes (rc->m): the disk's own without what it
 * drops, or its chain's adopted (which leaves out the broken ones by
 * itself), or new. */
static int rc_plan(struct reconcile *rc, struct cbt_error **errp)
{
    struct ckpt_meta *m = &rc->m;
    const struct ckpt_view *view = &rc->view;
    if (view->present && view->depth == 0) {
        /* A copy: the view stays as it was, to say which sealed copies
         * below are this disk's (remove_below). */
        memcpy(m->uuid, view->m.uuid, 16);
        m->next_order = view->m.next_order;
        for (size_t i = 0; i < view->m.n; i++)
            if (ckpt_meta_insert(m, &view->m.v[i]) < 0)
                goto nomem;
        for (size_t i = 0; i < view->m.nseals; i++)
            if (ckpt_seal_add(m, &view->m.seals[i]) < 0)
                goto nomem;
        for (size_t i = 0; i < rc->drop.n; i++)
            ckpt_meta_remove(m,
                             (size_t)ckpt_meta_find_name(m, rc->drop.v[i]));
        return 0;
    }
    if (view->present) {
        struct ckpt_carry c;
        int r = ckpt_carry_prepare(rc->disk, 0, &c, errp);
        if (r == 0)
            r = ckpt_carry_build(&c, rc->disk, NULL, CKPT_QUIET, m, errp);
        ckpt_carry_free(&c);
        return r < 0 ? -1 : 0;
    }
    if (new_uuid(rc->disk, m->uuid, errp) < 0)
        return -1;
    m->next_order = 1;
    return 0;
nomem:
    oom(errp, rc->disk);
    return -1;
}

/* Bitmaps no checkpoint describes: a recording one valid over the chain is
 * adopted (with fix, into rc->m), the others reported and left alone. */
static int rc_orphans(struct reconcile *rc, struct cbt_error **errp)
{
    struct cbt_image *disk = rc->disk;
    struct cbt_chain_bitmap *chain = NULL;
    size_t nchain = 0;
    if (cbt_chain_bitmap_list(disk, 0, &chain, &nchain, errp) < 0)
        return -1;
    int ret = -1;
    for (size_t i = 0; i < nchain; i++) {
        const struct cbt_chain_bitmap *b = &chain[i];
        if (names_has(&rc->known, b->name))
            continue;
        bool top = b->nlayers && b->layers[0].present;
        char *expl, *how;
        bool adopt = b->valid && top;
        if (adopt) {
            expl = cbt_strdup_printf(
                "bitmap '%s' has no checkpoint metadata; it is recording and "
                "valid over the chain (%s)", b->name, b->message);
            how = cbt_strdup_printf(
                "adopt it as checkpoint '%s' (created: now; the changes it "
                "holds may reach back before that)", b->name);
        } else {
            expl = cbt_strdup_printf(
                "bitmap '%s' has no checkpoint metadata and cannot be "
                "adopted: %s",
                b->name, b->valid ? "the top layer lacks it" : b->message);
            how = cbt_strdup_printf(
                "none: left as it is (removing it from the layers holding it "
                "drops it, if it is not wanted)");
        }
        if (drift_items_push(&rc->it, CBT_DRIFT_BITMAP_WITHOUT_METADATA,
                             b->name, expl, how, adopt && rc->fix) < 0) {
            oom(errp, disk);
            goto out;
        }
        if (adopt && rc->fix) {
            int r = ckpt_meta_append(&rc->m, b->name, cbt_image_size(disk),
                                     b->granularity);
            if (r < 0) {
                orders_error(errp, disk, b->name, &rc->m, r);
                goto out;
            }
            rc->changed = true;
        }
    }
    ret = 0;
out:
    cbt_chain_bitmap_free_list(chain, nchain);
    return ret;
}

/* The fix written: the dropped checkpoints' bitmaps removed from the top
 * with the new metadata in one commit of the top, then their copies
 * below. */
static int rc_write(struct reconcile *rc, struct cbt_error **errp)
{
    struct cbt_image *disk = rc->disk;
    if (remove_in_top(disk, rc->drop.v, rc->drop.n, errp) < 0 ||
        ckpt_layer_set(disk, &rc->m, 0, errp) < 0) {
        undo(disk, &rc->saved);
        return -1;
    }
    if (commit_top(disk, &rc->saved, errp) < 0)
        return -1;
    return remove_below(disk, rc->drop.v, rc->drop.n, &rc->view, errp);
}

/* The steps, in order: duplicate extensions, the metadata as found, the
 * checkpoints judged, the metadata to write planned, the bitmaps without
 * a checkpoint, and with fix the write. */
int cbt_checkpoint_reconcile(struct cbt_image *disk, bool fix,
                             struct cbt_drift_item **items, size_t *count,
                             struct cbt_error **errp)
{
    *items = NULL;
    *count = 0;
    if (fix && need_rw(disk, "repair checkpoints", errp) < 0)
        return -1;
    struct reconcile rc = { .disk = disk, .fix = fix };
    int r = rc_duplicates(&rc, errp);
    if (r == 0 &&
        (rc_load(&rc, errp) < 0 || rc_judge(&rc, errp) < 0 ||
         (fix && rc_plan(&rc, errp) < 0) || rc_orphans(&rc, errp) < 0 ||
         (fix && rc.changed && rc_write(&rc, errp) < 0)))
        r = -1;
    if (r >= 0) {
        *items = rc.it.v;
        *count = rc.it.n;
        rc.it.v = NULL;
        rc.it.n = 0;
    }
    cbt_drift_free_list(rc.it.v, rc.it.n);
    names_free(&rc.drop);
    names_free(&rc.known);
    ckpt_view_free(&rc.view);
    ckpt_meta_free(&rc.m);
    ckpt_saved_free(&rc.saved);
    return r < 0 ? -1 : 0;
}
