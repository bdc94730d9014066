/*
 * Finding the disks of a running QEMU (disk.h).
 *
 * QEMU 7.2 describes its block graph in three queries, none complete on
 * its own:
 *   query-block               devices with a medium (qemu-system only: it
 *                             is empty on qemu-storage-daemon) and the node
 *                             each is attached to;
 *   query-block-exports       exports (qemu-storage-daemon) and their node;
 *   query-named-block-nodes   every node: driver, file name, virtual size,
 *                             read-only, dirty bitmaps (flat: true);
 *   x-debug-query-block-graph the edges (parent, child, role "file",
 *                             "backing", ...), the only way 7.2 tells which
 *                             node is below a filter.
 * While a job runs, a device or export is attached to the job's filter
 * (copy-before-write, mirror_top, ...), not to the disk's format node; so
 * cbt walks down from the attached node through filters (their "file"
 * child, or "backing" for the mirror and commit filters) to the first
 * format node, and from there along "backing" edges for the chain.
 * Everything QEMU answers is checked for its shape; a graph cbt cannot
 * follow is an error that says to name the node instead.
 */
#include <stdio.h>
#include <sys/stat.h>

#include "disk.h"

#define MAX_FILTER_DEPTH 16
#define MAX_CHAIN 256

/* Drivers whose node holds a disk's contents (cbt reads these). */
static bool is_format(const char *drv)
{
    static const char *const formats[] = {
        "qcow2", "raw", "qcow", "qed", "vmdk", "vdi", "vpc", "vhdx",
        "parallels", "bochs", "cloop", "dmg", "luks",
    };
    for (size_t i = 0; i < ARRAY_SIZE(formats); i++)
        if (strcmp(drv, formats[i]) == 0)
            return true;
    return false;
}

/* Protocol drivers: a device attached straight to one has no format
 * layer (a raw disk without the raw driver). */
static bool is_protocol(const char *drv)
{
    return strcmp(drv, "file") == 0 || strcmp(drv, "host_device") == 0 ||
           strcmp(drv, "host_cdrom") == 0 || strcmp(drv, "nbd") == 0 ||
           strcmp(drv, "null-co") == 0 || strcmp(drv, "null-aio") == 0;
}

/* The graph: nodes by name (from query-named-block-nodes) and the edges
 * (from x-debug-query-block-graph, by node name). */
struct edge {
    const char *parent, *child, *role; /* borrowed from the JSON */
};
struct graph {
    json_t *nodes;    /* query-named-block-nodes */
    json_t *raw;      /* x-debug-query-block-graph, or NULL */
    struct edge *edges;
    size_t nedges;
};

static void graph_free(struct graph *g)
{
    json_decref(g->nodes);
    json_decref(g->raw);
    free(g->edges);
    memset(g, 0, sizeof(*g));
}

/* The node named `name` in a query-named-block-nodes answer, or NULL. */
static json_t *find_node(json_t *nodes, const char *name)
{
    size_t i;
    json_t *n;
    json_array_foreach(nodes, i, n) {
        const char *nn = qmp_str(n, "node-name");
        if (nn && strcmp(nn, name) == 0)
            return n;
    }
    return NULL;
}

static json_t *node_by_name(const struct graph *g, const char *name)
{
    return find_node(g->nodes, name);
}

/* query-named-block-nodes, flat: the list, or NULL with *errp. */
static json_t *query_nodes(struct qmp *q, struct cbt_error **errp)
{
    json_t *nodes = qmp_execute(q, "query-named-block-nodes",
                                json_pack("{s:b}", "flat", 1), errp);
    if (nodes && !json_is_array(nodes)) {
        cbt_error_set(errp, EPROTO, "%s: query-named-block-nodes did not "
                      "return a list", qmp_name(q));
        json_decref(nodes);
        nodes = NULL;
    }
    return nodes;
}

static const char *child_of(const struct graph *g, const char *parent,
                            const char *role)
{
    for (size_t i = 0; i < g->nedges; i++)
        if (strcmp(g->edges[i].parent, parent) == 0 &&
            strcmp(g->edges[i].role, role) == 0)
            return g->edges[i].child;
    return NULL;
}

static int load_graph(struct qmp *q, struct graph *g, struct cbt_error **errp)
{
    g->nodes = query_nodes(q, errp);
    if (!g->nodes)
        return -1;
    g->raw = qmp_execute(q, "x-debug-query-block-graph", NULL, errp);
    if (!g->raw)
        return -1;
    json_t *gn = json_object_get(g->raw, "nodes");
    json_t *ge = json_object_get(g->raw, "edges");
    if (!json_is_array(gn) || !json_is_array(ge)) {
        cbt_error_set(errp, EPROTO, "%s: x-debug-query-block-graph: no "
                      "nodes and edges", qmp_name(q));
        return -1;
    }
    g->edges = calloc(json_array_size(ge) + 1, sizeof(*g->edges));
    if (!g->edges) {
        cbt_error_set(errp, ENOMEM, "out of memory");
        return -1;
    }
    size_t i;
    json_t *e;
    json_array_foreach(ge, i, e) {
        long long pid, cid;
        const char *role = qmp_str(e, "name");
        if (!qmp_int(e, "parent", &pid) || !qmp_int(e, "child", &cid) || !role)
            continue;
        const char *pn = NULL, *cn = NULL;
        size_t j;
        json_t *n;
        json_array_foreach(gn, j, n) {
            long long id;
            if (!qmp_int(n, "id", &id))
                continue;
            if (id == pid)
                pn = qmp_str(n, "name");
            if (id == cid)
                cn = qmp_str(n, "name");
        }
        if (pn && cn)
            g->edges[g->nedges++] = (struct edge){pn, cn, role};
    }
    return 0;
}

/* ---- building a disk ---- */

static int dupstr(char **dst, const char *src, struct cbt_error **errp)
{
    if (!src) {
        *dst = NULL;
        return 0;
    }
    *dst = strdup(src);
    if (!*dst) {
        cbt_error_set(errp, ENOMEM, "out of memory");
        return -1;
    }
    return 0;
}

/* A bitmap of query-named-block-nodes' "dirty-bitmaps", but its name. */
static void parse_bitmap(json_t *b, struct live_bitmap *lb)
{
    long long gran, count;
    if (!qmp_int(b, "granularity", &gran) || gran <= 0)
        gran = 0;
    if (!qmp_int(b, "count", &count) || count < 0)
        count = 0;
    lb->granularity = (uint64_t)gran;
    lb->count = (uint64_t)count;
    lb->recording = qmp_bool(b, "recording", false);
    lb->persistent = qmp_bool(b, "persistent", false);
    lb->busy = qmp_bool(b, "busy", false);
    lb->inconsistent = qmp_bool(b, "inconsistent", false);
}

static int fill_bitmaps(json_t *node, struct live_layer *l,
                        struct cbt_error **errp)
{
    json_t *bms = json_object_get(node, "dirty-bitmaps");
    if (!json_is_array(bms))
        return 0;
    l->bitmaps = calloc(json_array_size(bms) + 1, sizeof(*l->bitmaps));
    if (!l->bitmaps) {
        cbt_error_set(errp, ENOMEM, "out of memory");
        return -1;
    }
    size_t i;
    json_t *b;
    json_array_foreach(bms, i, b) {
        const char *name = qmp_str(b, "name");
        if (!name || !*name)
            continue; /* a job's own bitmap */
        struct live_bitmap *lb = &l->bitmaps[l->nbitmaps];
        parse_bitmap(b, lb);
        if (dupstr(&lb->name, name, errp) < 0)
            return -1;
        l->nbitmaps++;
    }
    return 0;
}

static int fill_layer(const struct graph *g, json_t *node,
                      struct live_layer *l, struct cbt_error **errp)
{
    long long size = 0;
    json_t *img = json_object_get(node, "image");
    if (!qmp_int(img, "virtual-size", &size) || size < 0)
        size = 0;
    l->size = (uint64_t)size;
    l->read_only = qmp_bool(node, "ro", false);
    /* The file's name is the protocol node's: a format node opened with
     * explicit options (a backing node given by name) shows a "json:"
     * pseudo-filename instead. */
    const char *fnode = child_of(g, qmp_str(node, "node-name"), "file");
    json_t *fjson = fnode ? node_by_name(g, fnode) : NULL;
    const char *fname = fjson ? qmp_str(fjson, "file") : NULL;
    /* A filter between the format node and its file (blkdebug's "image",
     * a throttle's "file") shows a json: name too: the file is below. */
    for (int depth = 0; fjson && fname && strncmp(fname, "json:", 5) == 0 &&
                        depth < 8;
         depth++) {
        const char *below = child_of(g, qmp_str(fjson, "node-name"), "image");
        if (!below)
            below = child_of(g, qmp_str(fjson, "node-name"), "file");
        json_t *bj = below ? node_by_name(g, below) : NULL;
        if (!bj)
            break;
        fjson = bj;
        fname = qmp_str(bj, "file");
    }
    if (!fname)
        fname = qmp_str(node, "file");
    if (dupstr(&l->file_node, fnode, errp) < 0 ||
        dupstr(&l->node, qmp_str(node, "node-name"), errp) < 0 ||
        dupstr(&l->drv, qmp_str(node, "drv"), errp) < 0 ||
        dupstr(&l->filename, fname, errp) < 0)
        return -1;
    return fill_bitmaps(node, l, errp);
}

/*
 * Resolve from the node `start` down through filters to a format node
 * and collect its chain into d.  0, or -1 with *errp.
 */
static int resolve(struct qmp *q, const struct graph *g, const char *start,
                   struct live_disk *d, struct cbt_error **errp)
{
    const char *name = start;
    json_t *node = NULL;
    for (int depth = 0;; depth++) {
        node = node_by_name(g, name);
        const char *drv = node ? qmp_str(node, "drv") : NULL;
        if (!drv) {
            cbt_error_set(errp, ENOENT, "%s: node '%s' is not in QEMU's "
                          "block graph", qmp_name(q), name);
            return -1;
        }
        if (is_format(drv) || is_protocol(drv))
            break;
        const char *below = child_of(g, name, "file");
        if (!below)
            below = child_of(g, name, "backing");
        if (!below || depth >= MAX_FILTER_DEPTH) {
            cbt_error_set(errp, ENOTSUP, "%s: cannot find the disk below "
                          "node '%s' (driver %s); name the disk's format "
                          "node instead", qmp_name(q), name, drv);
            return -1;
        }
        name = below;
    }
    if (dupstr(&d->attached, start, errp) < 0)
        return -1;
    d->layers = calloc(MAX_CHAIN, sizeof(*d->layers));
    if (!d->layers) {
        cbt_error_set(errp, ENOMEM, "out of memory");
        return -1;
    }
    while (node && d->nlayers < MAX_CHAIN) {
        if (fill_layer(g, node, &d->layers[d->nlayers++], errp) < 0)
            return -1;
        const char *b = child_of(g, qmp_str(node, "node-name"), "backing");
        node = b ? node_by_name(g, b) : NULL;
    }
    return 0;
}

void live_disk_clear(struct live_disk *d)
{
    for (size_t i = 0; i < d->nlayers; i++) {
        struct live_layer *l = &d->layers[i];
        for (size_t j = 0; j < l->nbitmaps; j++)
            free(l->bitmaps[j].name);
        free(l->bitmaps);
        free(l->node);
        free(l->drv);
        free(l->filename);
        free(l->file_node);
    }
    free(d->layers);
    free(d->id);
    free(d->qdev);
    free(d->device);
    free(d->export_id);
    free(d->attached);
    memset(d, 0, sizeof(*d));
}

void live_disks_free(struct live_disk *v, size_t n)
{
    for (size_t i = 0; i < n; i++)
        live_disk_clear(&v[i]);
    free(v);
}

/* "vda" of "/machine/peripheral/vda/virtio-backend"; NULL otherwise. */
static char *short_qdev(const char *qdev)
{
    static const char prefix[] = "/machine/peripheral/";
    if (!qdev || strncmp(qdev, prefix, sizeof(prefix) - 1) != 0)
        return NULL;
    const char *s = qdev + sizeof(prefix) - 1;
    const char *e = strchr(s, '/');
    return e ? strndup(s, (size_t)(e - s)) : strdup(s);
}

/* Add the disk attached at `node` (a device or an export), or merge into
 * the one already listed for the same format node. */
static int add_disk(struct qmp *q, const struct graph *g, const char *node,
                    const char *qdev, const char *device,
                    const char *export_id, struct live_disk **v, size_t *n,
                    struct cbt_error **errp)
{
    struct live_disk d = {0};
    if (resolve(q, g, node, &d, errp) < 0) {
        live_disk_clear(&d);
        return -1;
    }
    for (size_t i = 0; i < *n; i++) {
        struct live_disk *o = &(*v)[i];
        if (strcmp(o->layers[0].node, d.layers[0].node) != 0)
            continue;
        int r = 0;
        if (!o->qdev && qdev)
            r = dupstr(&o->qdev, qdev, errp);
        if (r == 0 && !o->device && device)
            r = dupstr(&o->device, device, errp);
        if (r == 0 && !o->export_id && export_id)
            r = dupstr(&o->export_id, export_id, errp);
        live_disk_clear(&d);
        return r;
    }
    char *id = short_qdev(qdev);
    const char *fallback = device && *device ? device
                           : export_id        ? export_id
                                              : d.layers[0].node;
    if ((!id && dupstr(&id, fallback, errp) < 0) ||
        dupstr(&d.qdev, qdev, errp) < 0 ||
        dupstr(&d.device, device && *device ? device : NULL, errp) < 0 ||
        dupstr(&d.export_id, export_id, errp) < 0) {
        free(id);
        live_disk_clear(&d);
        return -1;
    }
    d.id = id;
    struct live_disk *nv = realloc(*v, (*n + 1) * sizeof(*nv));
    if (!nv) {
        live_disk_clear(&d);
        cbt_error_set(errp, ENOMEM, "out of memory");
        return -1;
    }
    nv[(*n)++] = d;
    *v = nv;
    return 0;
}

static int collect(struct qmp *q, const struct graph *g, struct live_disk **v,
                   size_t *n, struct cbt_error **errp)
{
    json_t *blocks = qmp_execute(q, "query-block", NULL, errp);
    if (!blocks)
        return -1;
    size_t i;
    json_t *b;
    int r = 0;
    json_array_foreach(blocks, i, b) {
        json_t *ins = json_object_get(b, "inserted");
        const char *node = qmp_str(ins, "node-name");
        if (!node)
            continue; /* an empty drive */
        r = add_disk(q, g, node, qmp_str(b, "qdev"), qmp_str(b, "device"),
                     NULL, v, n, errp);
        if (r < 0)
            break;
    }
    json_decref(blocks);
    if (r < 0)
        return -1;
    json_t *exports = qmp_execute(q, "query-block-exports", NULL, errp);
    if (!exports) {
        /* qemu-system without exports support answers CommandNotFound. */
        const char *cls = qmp_last_error_class(q);
        if (cls && strcmp(cls, "CommandNotFound") == 0) {
            cbt_error_free(*errp);
            *errp = NULL;
            return 0;
        }
        return -1;
    }
    json_array_foreach(exports, i, b) {
        const char *node = qmp_str(b, "node-name");
        const char *id = qmp_str(b, "id");
        if (!node || !id || qmp_bool(b, "shutting-down", false))
            continue;
        if (strncmp(id, "cbt-", 4) == 0)
            continue; /* cbt's own backup exports are not disks */
        r = add_disk(q, g, node, NULL, NULL, id, v, n, errp);
        if (r < 0)
            break;
    }
    json_decref(exports);
    return r;
}

int live_disks(struct qmp *q, struct live_disk **v, size_t *n,
               struct cbt_error **errp)
{
    *v = NULL;
    *n = 0;
    struct graph g = {0};
    int r = load_graph(q, &g, errp);
    if (r == 0)
        r = collect(q, &g, v, n, errp);
    graph_free(&g);
    if (r < 0) {
        live_disks_free(*v, *n);
        *v = NULL;
        *n = 0;
    }
    return r;
}

/* Same file?  By name, then by identity when both can be stat'ed. */
static bool same_file(const char *a, const char *b)
{
    if (!a || !b)
        return false;
    if (strcmp(a, b) == 0)
        return true;
    struct stat sa, sb;
    return stat(a, &sa) == 0 && stat(b, &sb) == 0 && sa.st_dev == sb.st_dev &&
           sa.st_ino == sb.st_ino;
}

ssize_t live_find_layer(const struct live_disk *d, const char *name)
{
    for (size_t i = 0; i < d->nlayers; i++) {
        const struct live_layer *l = &d->layers[i];
        if ((l->node && strcmp(l->node, name) == 0) ||
            (l->file_node && strcmp(l->file_node, name) == 0))
            return (ssize_t)i;
    }
    for (size_t i = 0; i < d->nlayers; i++)
        if (same_file(d->layers[i].filename, name))
            return (ssize_t)i;
    return -1;
}

static bool matches(const struct live_disk *d, const char *name)
{
    const char *ids[] = {d->id,       d->qdev,           d->device,
                         d->export_id, d->attached,      d->layers[0].node,
                         d->layers[0].file_node};
    for (size_t i = 0; i < ARRAY_SIZE(ids); i++)
        if (ids[i] && strcmp(ids[i], name) == 0)
            return true;
    return same_file(d->layers[0].filename, name);
}

/* "vda (node disk1, /x/d.qcow2)" lines for messages. */
static char *describe(const struct live_disk *v, size_t n, const size_t *pick,
                      size_t npick)
{
    char *s = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&s, &len);
    if (!f)
        return NULL;
    for (size_t k = 0; k < (pick ? npick : n); k++) {
        const struct live_disk *d = &v[pick ? pick[k] : k];
        fprintf(f, "%s%s (node %s, %s)", k ? ", " : "", d->id,
                d->layers[0].node,
                d->layers[0].filename ? d->layers[0].filename : "no file");
    }
    fclose(f);
    return s;
}

int live_find_disk(struct qmp *q, const char *name, struct live_disk *d,
                   struct cbt_error **errp)
{
    memset(d, 0, sizeof(*d));
    struct graph g = {0};
    struct live_disk *v = NULL;
    size_t n = 0;
    int ret = -1;
    if (load_graph(q, &g, errp) < 0 || collect(q, &g, &v, &n, errp) < 0)
        goto out;
    size_t *hit = calloc(n + 1, sizeof(*hit));
    size_t nhit = 0;
    if (!hit) {
        cbt_error_set(errp, ENOMEM, "out of memory");
        goto out;
    }
    for (size_t i = 0; i < n; i++)
        if (matches(&v[i], name))
            hit[nhit++] = i;
    if (nhit == 1) {
        *d = v[hit[0]];
        memset(&v[hit[0]], 0, sizeof(v[0]));
        ret = 0;
    } else if (nhit > 1) {
        char *list = describe(v, n, hit, nhit);
        cbt_error_set(errp, EINVAL, "%s: '%s' names more than one disk: %s; "
                      "name one by its device, export or node", qmp_name(q),
                      name, list ? list : "?");
        cbt_error_set_kind(errp, CBT_ERR_USAGE);
        free(list);
    } else if (node_by_name(&g, name)) {
        /* A node no device or export uses directly (a layer, a node
         * added by hand). */
        ret = resolve(q, &g, name, d, errp);
        if (ret == 0 && dupstr(&d->id, name, errp) < 0)
            ret = -1;
        if (ret < 0)
            live_disk_clear(d);
    } else {
        char *list = describe(v, n, NULL, 0);
        cbt_error_set(errp, ENOENT, "%s: QEMU has no disk '%s'; its disks: "
                      "%s", qmp_name(q), name,
                      n ? (list ? list : "?") : "none");
        cbt_error_set_kind(errp, CBT_ERR_USAGE);
        free(list);
    }
    free(hit);
out:
    live_disks_free(v, n);
    graph_free(&g);
    return ret;
}

int live_node_bitmap(struct qmp *q, const char *node, const char *name,
                     struct live_bitmap *out, struct cbt_error **errp)
{
    memset(out, 0, sizeof(*out));
    json_t *nodes = query_nodes(q, errp);
    if (!nodes)
        return -1;
    json_t *n = find_node(nodes, node);
    int ret = 0;
    if (!n) {
        cbt_error_set(errp, ENOENT, "%s: QEMU has no node '%s' any more",
                      qmp_name(q), node);
        ret = -1;
    }
    json_t *bms = n ? json_object_get(n, "dirty-bitmaps") : NULL, *b;
    size_t i;
    json_array_foreach(bms, i, b) {
        const char *bn = qmp_str(b, "name");
        if (bn && strcmp(bn, name) == 0) {
            parse_bitmap(b, out);
            ret = 1;
            break;
        }
    }
    json_decref(nodes);
    return ret;
}

const struct live_bitmap *live_layer_bitmap(const struct live_layer *l,
                                            const char *name)
{
    for (size_t i = 0; i < l->nbitmaps; i++)
        if (strcmp(l->bitmaps[i].name, name) == 0)
            return &l->bitmaps[i];
    return NULL;
}
