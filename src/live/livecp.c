/*
 * Checkpoints of a running VM's disk (livecp.h).
 *
 * While QEMU holds a disk, cbt changes nothing in its files.  A
 * checkpoint is then made as libvirt makes one: a transaction adding a
 * persistent bitmap named as the checkpoint to the disk's format node
 * (QEMU writes it to the image when it closes it cleanly), and its
 * metadata (order, parent, time, size, granularity, the disk's id) goes
 * to the live journal (journal.h), to be folded into the image's own
 * metadata the next time cbt has the image to itself.  The checkpoints
 * cbt lists are the image's records (as QEMU found them: it keeps cbt's
 * header extension untouched), changed by the journal's records, each
 * judged on QEMU's bitmaps, which are the truth while the VM runs.
 */
#include <inttypes.h>
#include <stdio.h>
#include <time.h>

#include "../block/block.h"
#include "../ops/checkpoint_meta.h"
#include "livecp.h"

#define GRAN_MIN 512ull
#define GRAN_MAX (2ull << 30)

static void uuid_new(char out[37], struct cbt_error **errp)
{
    uint8_t u[16];
    out[0] = '\0';
    if (ckpt_uuid_new(u, "live checkpoint", errp) == 0)
        ckpt_uuid_str(u, out);
}

/* The image's own checkpoint metadata, read beside QEMU (-U). */
static int read_file_meta(const char *filename, struct ckpt_meta *m,
                          struct cbt_error **errp)
{
    memset(m, 0, sizeof(*m));
    struct cbt_image *img = cbt_image_open(
        filename, "qcow2",
        CBT_OPEN_FORCE_SHARE | CBT_OPEN_SHARE_QUIET | CBT_OPEN_NO_BACKING,
        errp);
    if (!img)
        return -1;
    uint8_t *buf = NULL;
    size_t len = 0;
    int r = blk_ext_get(img, CKPT_EXT_TYPE, &buf, &len);
    int ret = 0;
    if (r == 0) {
        char why[256] = "";
        r = ckpt_meta_parse(buf, len, m, why, sizeof(why));
        if (r < 0) {
            cbt_error_set(errp, r == -ENOMEM ? ENOMEM : EINVAL,
                          "%s: the checkpoint metadata is corrupt: %s",
                          filename, why);
            ret = -1;
        }
    } else if (r != -ENOENT) {
        cbt_error_set(errp, -r, "%s: cannot read the checkpoint metadata: %s",
                      filename, strerror(-r));
        ret = -1;
    }
    free(buf);
    cbt_image_close(img, NULL);
    return ret;
}

static const char *name_of_order(const struct ckpt_meta *m, uint64_t order)
{
    for (size_t i = 0; i < m->n; i++)
        if (m->v[i].order == order)
            return m->v[i].name;
    return NULL;
}

/* Add a checkpoint to the view (copies the strings). */
static int push(struct live_cp *c, const char *name, uint64_t order,
                int64_t sec, uint32_t nsec, const char *parent, uint64_t size,
                uint64_t gran, struct cbt_error **errp)
{
    struct cbt_checkpoint *nv = realloc(c->v, (c->n + 1) * sizeof(*nv));
    if (!nv) {
        cbt_error_set(errp, ENOMEM, "out of memory");
        return -1;
    }
    c->v = nv;
    struct cbt_checkpoint *k = &c->v[c->n];
    memset(k, 0, sizeof(*k));
    k->name = strdup(name);
    k->parent = parent ? strdup(parent) : NULL;
    if (!k->name || (parent && !k->parent)) {
        free(k->name);
        free(k->parent);
        cbt_error_set(errp, ENOMEM, "out of memory");
        return -1;
    }
    k->order = order;
    k->created_sec = sec;
    k->created_nsec = nsec;
    k->virtual_size = size;
    k->granularity = gran;
    c->n++;
    return 0;
}

static void drop(struct live_cp *c, const char *name)
{
    for (size_t i = 0; i < c->n; i++) {
        if (strcmp(c->v[i].name, name) != 0)
            continue;
        cbt_checkpoint_clear(&c->v[i]);
        memmove(c->v + i, c->v + i + 1, (c->n - i - 1) * sizeof(c->v[0]));
        c->n--;
        return;
    }
}

static int build_view(struct live_cp *c, const struct ckpt_meta *m,
                      struct cbt_error **errp)
{
    for (size_t i = 0; i < m->n; i++) {
        const struct ckpt_rec *r = &m->v[i];
        if (push(c, r->name, r->order, r->created_sec, r->created_nsec,
                 name_of_order(m, r->parent), r->virtual_size, r->granularity,
                 errp) < 0)
            return -1;
    }
    c->next_order = m->next_order ? m->next_order : 1;
    for (size_t i = 0; i < c->j.n; i++) {
        const struct journal_rec *r = &c->j.v[i];
        if (r->op == JOURNAL_PENDING)
            continue;
        drop(c, r->name);
        if (r->op != JOURNAL_CREATED)
            continue;
        if (push(c, r->name, r->order, r->created_sec, r->created_nsec,
                 r->parent, r->virtual_size, r->granularity, errp) < 0)
            return -1;
        if (r->order >= c->next_order)
            c->next_order = r->order + 1;
    }
    return 0;
}

/* ---- health ---- */

/* The count of bitmap `name` of node `node`, asked anew. */
static int bitmap_count(struct live_cp *c, const char *node, const char *name,
                        uint64_t *count, struct cbt_error **errp)
{
    json_t *nodes = qmp_execute(c->q, "query-named-block-nodes",
                                json_pack("{s:b}", "flat", 1), errp);
    if (!nodes)
        return -1;
    size_t i, k;
    json_t *n, *b;
    int ret = -1;
    json_array_foreach(nodes, i, n) {
        const char *nn = qmp_str(n, "node-name");
        if (!nn || strcmp(nn, node) != 0)
            continue;
        json_array_foreach(json_object_get(n, "dirty-bitmaps"), k, b) {
            const char *bn = qmp_str(b, "name");
            long long v;
            if (bn && strcmp(bn, name) == 0 && qmp_int(b, "count", &v) &&
                v >= 0) {
                *count = (uint64_t)v;
                ret = 0;
            }
        }
    }
    json_decref(nodes);
    if (ret < 0)
        cbt_error_set(errp, ENOENT, "%s: bitmap '%s' of node '%s' vanished",
                      qmp_name(c->q), name, node);
    return ret;
}

/* The union of `name` over the first `holders` layers, counted by QEMU in
 * a temporary disabled bitmap on the top node (removed again). */
static int union_count(struct live_cp *c, const char *name, size_t holders,
                       uint64_t gran, uint64_t *count, struct cbt_error **errp)
{
    char tmp[64];
    snprintf(tmp, sizeof(tmp), "cbt-%d-count", (int)getpid());
    const char *top = c->disk.layers[0].node;
    json_t *srcs = json_array();
    for (size_t i = 0; i < holders; i++)
        json_array_append_new(srcs, json_pack("{s:s, s:s}", "node",
                                              c->disk.layers[i].node, "name",
                                              name));
    json_t *acts = json_pack(
        "[{s:s, s:{s:s, s:s, s:b, s:b, s:I}}, {s:s, s:{s:s, s:s, s:o}}]",
        "type", "block-dirty-bitmap-add", "data", "node", top, "name", tmp,
        "persistent", 0, "disabled", 1, "granularity", (json_int_t)gran,
        "type", "block-dirty-bitmap-merge", "data", "node", top, "target", tmp,
        "bitmaps", srcs);
    if (qmp_run(c->q, "transaction", json_pack("{s:o}", "actions", acts),
                errp) < 0)
        return -1;
    int r = bitmap_count(c, top, tmp, count, errp);
    struct cbt_error *e2 = NULL;
    int rr = qmp_run(c->q, "block-dirty-bitmap-remove",
                     json_pack("{s:s, s:s}", "node", top, "name", tmp), &e2);
    if (r == 0 && rr < 0) {
        if (errp && !*errp)
            *errp = e2;
        else
            cbt_error_free(e2);
        return -1;
    }
    cbt_error_free(e2);
    return r;
}

const char *live_cp_health(struct live_cp *c, const char *name,
                           uint64_t granularity, uint64_t *dirty,
                           struct cbt_error **errp)
{
    *dirty = 0;
    const struct live_layer *l = c->disk.layers;
    const struct live_bitmap *b0 = live_layer_bitmap(&l[0], name);
    if (!b0)
        return "its bitmap is missing from the disk's top layer";
    if (b0->inconsistent)
        return "its bitmap is inconsistent (found in use: QEMU did not close "
               "the image cleanly)";
    if (!b0->persistent)
        return "its bitmap is not persistent (it would vanish with QEMU)";
    if (!b0->recording)
        return "its bitmap in the top layer does not record writes";
    if (granularity && b0->granularity != granularity)
        return "its bitmap's granularity differs from the checkpoint's (the "
               "bitmap was replaced)";
    size_t holders = 1;
    bool gap = false;
    for (size_t i = 1; i < c->disk.nlayers; i++) {
        const struct live_bitmap *b = live_layer_bitmap(&l[i], name);
        if (!b) {
            gap = true;
            continue;
        }
        if (gap)
            return "a lower layer holds a copy of its bitmap below a layer "
                   "that lacks it (a gap)";
        if (b->inconsistent)
            return "a copy of its bitmap in a lower layer is inconsistent";
        if (!b->persistent)
            return "a copy of its bitmap in a lower layer is not persistent";
        holders++;
    }
    if (holders == 1) {
        *dirty = b0->count;
        return NULL;
    }
    if (c->uncounted)
        return NULL;
    if (union_count(c, name, holders, b0->granularity, dirty, errp) < 0)
        return "its size could not be counted";
    return NULL;
}

/* ---- open ---- */

static int cp_open(struct qmp *q, const char *disk, struct live_cp *c,
                   bool uncounted, struct cbt_error **errp)
{
    memset(c, 0, sizeof(*c));
    c->q = q;
    c->uncounted = uncounted;
    /* x-debug-query-block-graph (the disks below filters) and bitmap
     * merges in transactions: QEMU 4.0. */
    if (qmp_need_version(q, 4, 0, "cbt's live mode (block graph queries, "
                         "bitmap merges)", errp) < 0 ||
        live_find_disk(q, disk, &c->disk, errp) < 0)
        return -1;
    const struct live_layer *top = &c->disk.layers[0];
    if (strcmp(top->drv, "qcow2") != 0 || !top->filename) {
        cbt_error_set(errp, ENOTSUP, "%s: disk '%s' is %s, which cannot hold "
                      "checkpoints (only qcow2 keeps bitmaps)", qmp_name(q),
                      c->disk.id, top->drv);
        live_cp_close(c);
        return -1;
    }
    struct ckpt_meta m;
    if (read_file_meta(top->filename, &m, errp) < 0 ||
        journal_load(top->filename, &c->j, errp) < 0) {
        ckpt_meta_free(&m);
        live_cp_close(c);
        return -1;
    }
    if (m.n || m.next_order > 1) {
        ckpt_uuid_str(m.uuid, c->disk_id);
    } else if (c->j.disk_id[0]) {
        memcpy(c->disk_id, c->j.disk_id, sizeof(c->disk_id));
    }
    int r = build_view(c, &m, errp);
    ckpt_meta_free(&m);
    for (size_t i = 0; r == 0 && i < c->n; i++) {
        struct cbt_checkpoint *k = &c->v[i];
        const char *why = live_cp_health(c, k->name, k->granularity,
                                         &k->dirty_bytes, errp);
        if (why && errp && *errp) {
            r = -1;
            break;
        }
        k->usable = !why;
        if (why && !(k->problem = strdup(why))) {
            cbt_error_set(errp, ENOMEM, "out of memory");
            r = -1;
        }
    }
    if (r < 0)
        live_cp_close(c);
    return r;
}

int live_cp_open(struct qmp *q, const char *disk, struct live_cp *c,
                 struct cbt_error **errp)
{
    return cp_open(q, disk, c, false, errp);
}

int live_cp_open_uncounted(struct qmp *q, const char *disk, struct live_cp *c,
                           struct cbt_error **errp)
{
    return cp_open(q, disk, c, true, errp);
}

void live_cp_close(struct live_cp *c)
{
    cbt_checkpoint_free_list(c->v, c->n);
    live_disk_clear(&c->disk);
    journal_free(&c->j);
    memset(c, 0, sizeof(*c));
}

const struct cbt_checkpoint *live_cp_find(const struct live_cp *c,
                                          const char *name)
{
    for (size_t i = 0; i < c->n; i++)
        if (strcmp(c->v[i].name, name) == 0)
            return &c->v[i];
    return NULL;
}

/* ---- create and delete ---- */

int live_cp_name_free(const struct live_cp *c, const char *name,
                      struct cbt_error **errp)
{
    size_t len = strlen(name);
    if (len == 0 || len > CBT_CHECKPOINT_NAME_MAX) {
        cbt_error_set(errp, EINVAL, "checkpoint names are 1 to %d bytes",
                      CBT_CHECKPOINT_NAME_MAX);
        cbt_error_set_kind(errp, CBT_ERR_USAGE);
        return -1;
    }
    if (live_cp_find(c, name)) {
        cbt_error_set(errp, EEXIST, "%s: disk '%s' already has a checkpoint "
                      "named '%s'", qmp_name(c->q), c->disk.id, name);
        return -1;
    }
    for (size_t i = 0; i < c->disk.nlayers; i++) {
        if (live_layer_bitmap(&c->disk.layers[i], name)) {
            cbt_error_set(errp, EEXIST, "%s: a bitmap named '%s' exists in "
                          "layer %zu (node %s) of disk '%s'", qmp_name(c->q),
                          name, i, c->disk.layers[i].node, c->disk.id);
            return -1;
        }
    }
    return 0;
}

json_t *live_cp_bitmap_add_action(const struct live_cp *c, const char *name,
                                  uint64_t granularity)
{
    json_t *data = json_pack("{s:s, s:s, s:b}", "node",
                             c->disk.layers[0].node, "name", name,
                             "persistent", 1);
    if (granularity)
        json_object_set_new(data, "granularity",
                            json_integer((json_int_t)granularity));
    return json_pack("{s:s, s:o}", "type", "block-dirty-bitmap-add", "data",
                     data);
}

int live_cp_ensure_disk_id(struct live_cp *c, struct cbt_error **errp)
{
    if (!c->disk_id[0])
        uuid_new(c->disk_id, errp);
    return c->disk_id[0] ? 0 : -1;
}

int live_cp_note_created(struct live_cp *c, const char *name, int64_t sec,
                         uint32_t nsec, struct cbt_error **errp)
{
    /* The granularity QEMU gave the new bitmap. */
    struct live_bitmap now;
    int found = live_node_bitmap(c->q, c->disk.layers[0].node, name, &now,
                                 errp);
    if (found < 0)
        return -1;
    uint64_t gran = now.granularity;
    if (!found) {
        cbt_error_set(errp, ENOENT, "%s: the new bitmap '%s' is not there",
                      qmp_name(c->q), name);
        return -1;
    }
    if (live_cp_ensure_disk_id(c, errp) < 0)
        return -1;
    memcpy(c->j.disk_id, c->disk_id, sizeof(c->disk_id));
    const char *parent = NULL;
    uint64_t best = 0;
    for (size_t i = 0; i < c->n; i++)
        if (c->v[i].order > best) {
            best = c->v[i].order;
            parent = c->v[i].name;
        }
    struct journal_rec r = {
        .op = JOURNAL_CREATED,
        .name = (char *)name,
        .order = c->next_order,
        .created_sec = sec,
        .created_nsec = nsec,
        .parent = (char *)parent,
        .virtual_size = c->disk.layers[0].size,
        .granularity = gran,
    };
    if (journal_add(&c->j, &r, errp) < 0 || journal_save(&c->j, errp) < 0)
        return -1;
    c->next_order++;
    return push(c, name, r.order, sec, nsec, parent, r.virtual_size, gran,
                errp);
}

int live_cp_note_pending(struct live_cp *c, const char *name,
                         struct cbt_error **errp)
{
    struct journal_rec r = {.op = JOURNAL_PENDING, .name = (char *)name,
                            .pid = (int)getpid()};
    return journal_add(&c->j, &r, errp) < 0 || journal_save(&c->j, errp) < 0
               ? -1
               : 0;
}

int live_cp_resolve(struct live_cp *c, const char *name,
                    struct cbt_error **errp)
{
    struct journal_rec r = {.op = JOURNAL_DELETED, .name = (char *)name};
    return journal_add(&c->j, &r, errp) < 0 || journal_save(&c->j, errp) < 0
               ? -1
               : 0;
}

int live_cp_resolve_stale(struct live_cp *c, struct cbt_error **errp)
{
    size_t n = c->j.n, gone = 0;
    for (size_t i = 0; i < n; i++) {
        if (!journal_stale_pending(&c->j, i))
            continue;
        /* The new checkpoint of a cbt that died before keeping it. */
        const char *name = c->j.v[i].name;
        if (live_layer_bitmap(&c->disk.layers[0], name))
            (void)qmp_run(c->q, "block-dirty-bitmap-remove",
                          json_pack("{s:s, s:s}", "node",
                                    c->disk.layers[0].node, "name", name),
                          NULL);
        struct journal_rec r = {.op = JOURNAL_DELETED, .name = (char *)name};
        if (journal_add(&c->j, &r, errp) < 0)
            return -1;
        gone++;
    }
    if (gone) {
        cbt_warn("%s: removed %zu checkpoint%s that a cbt that is gone made "
                 "and never kept", qmp_name(c->q), gone, gone == 1 ? "" : "s");
        return journal_save(&c->j, errp);
    }
    return 0;
}

int live_cp_create(struct live_cp *c, const char *name, uint64_t granularity,
                   struct cbt_error **errp)
{
    if (granularity &&
        (!IS_POW2(granularity) || granularity < GRAN_MIN ||
         granularity > GRAN_MAX)) {
        cbt_error_set(errp, EINVAL, "granularity %" PRIu64 " is not a power "
                      "of two from 512 to 2G", granularity);
        cbt_error_set_kind(errp, CBT_ERR_USAGE);
        return -1;
    }
    if (live_cp_resolve_stale(c, errp) < 0 || live_cp_name_free(c, name, errp) < 0)
        return -1;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    json_t *acts = json_array();
    json_array_append_new(acts, live_cp_bitmap_add_action(c, name, granularity));
    if (qmp_run(c->q, "transaction", json_pack("{s:o}", "actions", acts),
                errp) < 0)
        return -1;
    if (live_cp_note_created(c, name, ts.tv_sec, (uint32_t)ts.tv_nsec,
                             errp) < 0) {
        /* No record, no checkpoint: take the bitmap away again. */
        (void)qmp_run(c->q, "block-dirty-bitmap-remove",
                      json_pack("{s:s, s:s}", "node", c->disk.layers[0].node,
                                "name", name),
                      NULL);
        return -1;
    }
    return 0;
}

int live_cp_delete(struct live_cp *c, const char *name, bool *existed,
                   struct cbt_error **errp)
{
    if (live_cp_resolve_stale(c, errp) < 0)
        return -1;
    *existed = live_cp_find(c, name) != NULL;
    /* Its bitmap in every layer QEMU may change (a read-only backing
     * layer keeps its copy: below a top that lacks the bitmap, it is never
     * used, and a later checkpoint of the name sees a harmless superset). */
    json_t *acts = json_array();
    for (size_t i = 0; i < c->disk.nlayers; i++) {
        const struct live_layer *l = &c->disk.layers[i];
        if (!live_layer_bitmap(l, name) || (i > 0 && l->read_only))
            continue;
        json_array_append_new(
            acts, json_pack("{s:s, s:{s:s, s:s}}", "type",
                            "block-dirty-bitmap-remove", "data", "node",
                            l->node, "name", name));
    }
    if (json_array_size(acts) == 0)
        json_decref(acts);
    else if (qmp_run(c->q, "transaction", json_pack("{s:o}", "actions", acts),
                     errp) < 0)
        return -1;
    if (!*existed)
        return 0;
    struct journal_rec r = {.op = JOURNAL_DELETED, .name = (char *)name};
    if (journal_add(&c->j, &r, errp) < 0 || journal_save(&c->j, errp) < 0)
        return -1;
    drop(c, name);
    return 0;
}

/* ---- carrying the checkpoints to another layer ---- */

int live_cp_carry(const struct live_cp *c, const char *image, bool fresh,
                  struct cbt_error **errp)
{
    struct ckpt_meta m;
    struct live_cp t;
    memset(&t, 0, sizeof(t));
    memset(&m, 0, sizeof(m));
    t.q = c->q;
    if (!fresh && read_file_meta(image, &m, errp) < 0)
        return -1;
    bool own_id = m.n || m.next_order > 1;
    int ret = -1;
    if (journal_load(image, &t.j, errp) < 0 || build_view(&t, &m, errp) < 0)
        goto out;
    size_t before = t.j.n;
    /* What the image has that c does not keep. */
    for (size_t i = 0; i < t.n; i++) {
        const struct cbt_checkpoint *k = live_cp_find(c, t.v[i].name);
        if (k && k->usable && k->order == t.v[i].order)
            continue;
        struct journal_rec r = {.op = JOURNAL_DELETED,
                                .name = t.v[i].name};
        if (journal_add(&t.j, &r, errp) < 0)
            goto out;
    }
    /* What c keeps that the image lacks. */
    for (size_t i = 0; i < c->n; i++) {
        const struct cbt_checkpoint *k = &c->v[i];
        if (!k->usable) {
            if (!k->sealed)
                cbt_warn("%s: checkpoint '%s' is not carried to %s (%s): a "
                         "backup since it must be a full one", qmp_name(c->q),
                         k->name, image, k->problem ? k->problem : "unusable");
            continue;
        }
        const struct cbt_checkpoint *have = live_cp_find(&t, k->name);
        if (have && have->order == k->order)
            continue;
        struct journal_rec r = {
            .op = JOURNAL_CREATED,
            .name = k->name,
            .order = k->order,
            .created_sec = k->created_sec,
            .created_nsec = k->created_nsec,
            .parent = k->parent,
            .virtual_size = k->virtual_size,
            .granularity = k->granularity,
        };
        if (journal_add(&t.j, &r, errp) < 0)
            goto out;
    }
    bool id = !own_id && c->disk_id[0] &&
              strcmp(t.j.disk_id, c->disk_id) != 0;
    if (id)
        memcpy(t.j.disk_id, c->disk_id, sizeof(c->disk_id));
    ret = t.j.n != before || id ? journal_save(&t.j, errp) : 0;
out:
    ckpt_meta_free(&m);
    cbt_checkpoint_free_list(t.v, t.n);
    journal_free(&t.j);
    return ret;
}

void live_cp_uncarry(const char *image)
{
    struct journal j;
    if (journal_load(image, &j, NULL) == 0)
        (void)journal_remove(&j, NULL);
    journal_free(&j);
}

/* ---- reconcile ---- */

/* An unresolved PENDING record names `name` (a live backup's new
 * checkpoint, kept or not yet). */
static bool pending(const struct journal *j, const char *name)
{
    for (size_t i = 0; i < j->n; i++) {
        if (j->v[i].op != JOURNAL_PENDING || strcmp(j->v[i].name, name) != 0)
            continue;
        bool resolved = false;
        for (size_t k = i + 1; k < j->n && !resolved; k++)
            resolved = j->v[k].op != JOURNAL_PENDING &&
                       strcmp(j->v[k].name, name) == 0;
        if (!resolved)
            return true;
    }
    return false;
}

static enum cbt_drift problem_kind(const char *why)
{
    if (strstr(why, "missing"))
        return CBT_DRIFT_METADATA_WITHOUT_BITMAP;
    if (strstr(why, "granularity"))
        return CBT_DRIFT_MISMATCH;
    return CBT_DRIFT_BITMAP_UNUSABLE;
}

/* The names reconcile dealt with (a fix may have removed their bitmaps
 * from QEMU while the layer's list, read at open, still shows them). */
static bool dealt(const struct drift_items *it, size_t from,
                  const char *name)
{
    for (size_t i = from; i < it->n; i++)
        if (strcmp(it->v[i].name, name) == 0)
            return true;
    return false;
}

int live_cp_reconcile(struct live_cp *c, bool fix, struct drift_items *it,
                      struct cbt_error **errp)
{
    size_t first = it->n;
    /* New checkpoints of live backups whose cbt died before keeping them. */
    bool stale = false;
    for (size_t i = 0; i < c->j.n; i++) {
        if (!journal_stale_pending(&c->j, i))
            continue;
        const struct journal_rec *r = &c->j.v[i];
        bool there = live_layer_bitmap(&c->disk.layers[0], r->name) != NULL;
        char *expl = cbt_strdup_printf(
            "'%s' is the new checkpoint of a live backup by cbt %d, which is "
            "gone; it was never kept%s", r->name, r->pid,
            there ? " but its bitmap is still on the disk" : "");
        char *how = cbt_strdup_printf(
            "%sclose its journal record (the next incremental starts from "
            "the last kept checkpoint)", there ? "remove the bitmap and " : "");
        if (drift_items_push(it, CBT_DRIFT_BITMAP_WITHOUT_METADATA, r->name,
                             expl, how, fix) < 0)
            goto nomem;
        stale = true;
    }
    if (fix && stale && live_cp_resolve_stale(c, errp) < 0)
        return -1;

    /* Checkpoints whose bitmap QEMU cannot use. */
    size_t from = it->n;
    for (size_t i = 0; i < c->n; i++) {
        const struct cbt_checkpoint *k = &c->v[i];
        if (k->usable || k->sealed)
            continue;
        const char *why = k->problem ? k->problem : "unusable";
        char *expl = cbt_strdup_printf("checkpoint '%s': %s", k->name, why);
        char *how = cbt_strdup_printf(
            "drop checkpoint '%s' and its bitmap where QEMU may change it "
            "(the next backup since it must be a full one)", k->name);
        if (drift_items_push(it, problem_kind(why), k->name, expl, how,
                             fix) < 0)
            goto nomem;
    }
    for (size_t i = from; fix && i < it->n; i++) {
        bool existed;
        if (live_cp_delete(c, it->v[i].name, &existed, errp) < 0)
            return -1;
    }

    /* Bitmaps of the top layer no checkpoint describes (not cbt's own
     * temporary ones, not a backup's new checkpoint on its way). */
    const struct live_layer *top = &c->disk.layers[0];
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    for (size_t i = 0; i < top->nbitmaps; i++) {
        const char *name = top->bitmaps[i].name;
        const struct live_bitmap *b = &top->bitmaps[i];
        if (live_cp_find(c, name) || journal_name_pid(name) ||
            pending(&c->j, name) || dealt(it, first, name))
            continue;
        bool ok = b->persistent && b->recording && !b->inconsistent;
        char *expl = cbt_strdup_printf(
            "bitmap '%s' has no checkpoint metadata; %s", name,
            ok ? "it is persistent and recording"
            : b->inconsistent ? "it is inconsistent (left in use)"
            : !b->persistent  ? "it is not persistent (QEMU drops it at exit)"
                              : "it does not record writes");
        char *how = ok ? cbt_strdup_printf(
                             "adopt it as checkpoint '%s' (created: now; the "
                             "changes it holds may reach back before that)",
                             name)
                       : cbt_strdup_printf("none: reported, not touched "
                                           "(another tool's bitmap?)");
        if (drift_items_push(it, CBT_DRIFT_BITMAP_WITHOUT_METADATA, name,
                             expl, how, fix && ok) < 0)
            goto nomem;
        if (fix && ok &&
            live_cp_note_created(c, name, ts.tv_sec, (uint32_t)ts.tv_nsec,
                                 errp) < 0)
            return -1;
    }
    return 0;
nomem:
    cbt_error_set(errp, ENOMEM, "out of memory");
    return -1;
}
