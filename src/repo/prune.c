/*
 * cbt repo prune: retention that keeps every remaining point restorable
 * (repo.h; docs/backups.md "Pruning").
 *
 * The policy (restic's and borg's vocabulary), per disk: --keep-last N
 * keeps the N newest points; --keep-daily/weekly/monthly N keep, for each
 * of the N most recent days (weeks, months; UTC, ISO weeks) that have
 * points, the newest point of that day.  Whatever the options, the point
 * holding the disk's newest checkpoint stays (the next incremental's
 * parent), and damaged points are never touched.
 *
 * Retiring a point P:
 *   - without children: its files go (manifest first);
 *   - with one child C: P is merged into C.  C's image takes P's data
 *     under its own, C's manifest takes P's parent (P full: C becomes a
 *     full backup; else a differential since P's starting checkpoint), so
 *     C's guest view, its block hashes and its checkpoint are unchanged:
 *     it restores bit-identically, verifies against its original hashes,
 *     and the disk's checkpoint still finds its backup.  The manifests
 *     above C record the new digests below them;
 *   - with two or more children (a full with differentials on it): kept,
 *     saying which points need it (merging it would copy its data into
 *     each of them).
 * Leaves go first, then merges from the root up: merging the oldest point
 * first writes each kept point's data once (into the growing base), the
 * other way round would copy it again at every step.
 *
 * Each step is one transaction of foldertx.c (new manifests beside the
 * old, then the journal, then the merge, the renames and the removals):
 * a kill at any moment leaves every kept point restorable.  The folder
 * is re-read before each step, so every step starts from what is on disk.
 */
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <strings.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>

#include <jansson.h>

#include <cbt/backup.h>
#include <cbt/image.h>

#include "../block/block.h"
#include "../ops/foldertx.h"
#include "../ops/hashtree.h"
#include "../ops/ops_util.h"
#include "../util/util.h"
#include "repo.h"

#define MANIFEST_MAX_READ (256u << 20)

void repo_prune_result_free(struct repo_prune_result *res)
{
    if (!res)
        return;
    for (size_t i = 0; i < res->n; i++) {
        free(res->v[i].file);
        free(res->v[i].created);
        free(res->v[i].checkpoint);
        free(res->v[i].why);
        free(res->v[i].into);
    }
    free(res->v);
    memset(res, 0, sizeof(*res));
}

/* Append ", text" (or "text") to *why. */
static int add_why(char **why, const char *fmt, ...) PRINTF_FMT(2, 3);
static int add_why(char **why, const char *fmt, ...)
{
    char *s = NULL;
    va_list ap;
    va_start(ap, fmt);
    int n = vasprintf(&s, fmt, ap);
    va_end(ap);
    if (n < 0)
        return -1;
    char *t = *why ? cbt_strdup_printf("%s, %s", *why, s) : s;
    if (*why)
        free(s);
    if (!t)
        return -1;
    free(*why);
    *why = t;
    return 0;
}

/* ---- the policy ---- */

enum span { DAY, WEEK, MONTH };

/* The day, ISO week or month of t (UTC), as text. */
static void bucket(int64_t t, enum span s, char *buf, size_t len)
{
    time_t tt = (time_t)t;
    struct tm tm;
    size_t n = 0;
    if (gmtime_r(&tt, &tm)) {
        if (s == DAY)
            n = strftime(buf, len, "%Y-%m-%d", &tm);
        else if (s == WEEK)
            n = strftime(buf, len, "%G-W%V", &tm);
        else
            n = strftime(buf, len, "%Y-%m", &tm);
    }
    if (n == 0)
        snprintf(buf, len, "?");
}

/* Keep, in `keep`, the newest point of each of the n newest buckets. */
static int keep_buckets(const struct repo *r, const size_t *idx, size_t m,
                        unsigned n, enum span span, const char *rule,
                        bool *keep, char **why)
{
    char last[32] = "";
    unsigned count = 0;
    for (size_t k = 0; k < m && count < n; k++) {
        char b[32];
        bucket(r->points[idx[k]].time, span, b, sizeof(b));
        if (strcmp(b, last) == 0)
            continue;
        snprintf(last, sizeof(last), "%s", b);
        count++;
        keep[idx[k]] = true;
        if (add_why(&why[idx[k]], "%s %s", rule, b) < 0)
            return -1;
    }
    return 0;
}

/* The policy's verdict for every point: keep[i], why[i]. */
static int apply_policy(const struct repo *r, const struct repo_prune_opts *o,
                        bool *keep, char **why)
{
    size_t n = r->npoints;
    CLEANUP_FREE size_t *idx = malloc((n + 1) * sizeof(*idx));
    CLEANUP_FREE bool *done = calloc(n + 1, sizeof(*done));
    if (!idx || !done)
        return -1;
    for (size_t i = 0; i < n; i++) {
        if (done[i])
            continue;
        /* The disk's points, newest first (points are oldest first). */
        size_t m = 0;
        const char *disk = r->points[i].m.disk_id;
        for (size_t j = n; j-- > 0;) {
            if (strcasecmp(r->points[j].m.disk_id, disk) != 0)
                continue;
            done[j] = true;
            const struct repo_point *p = &r->points[j];
            if (p->problem) {
                keep[j] = true;
                if (add_why(&why[j], "damaged, not touched (%s)",
                            p->problem) < 0)
                    return -1;
                continue;
            }
            idx[m++] = j;
        }
        for (size_t k = 0; k < m && k < o->keep_last; k++) {
            keep[idx[k]] = true;
            if (add_why(&why[idx[k]], "last %zu", k + 1) < 0)
                return -1;
        }
        if (keep_buckets(r, idx, m, o->keep_daily, DAY, "daily", keep,
                         why) < 0 ||
            keep_buckets(r, idx, m, o->keep_weekly, WEEK, "weekly", keep,
                         why) < 0 ||
            keep_buckets(r, idx, m, o->keep_monthly, MONTH, "monthly", keep,
                         why) < 0)
            return -1;
        /* The holder of the disk's newest checkpoint. */
        size_t best = SIZE_MAX;
        for (size_t k = 0; k < m; k++) {
            const struct manifest *pm = &r->points[idx[k]].m;
            if (pm->checkpoint &&
                (best == SIZE_MAX ||
                 pm->checkpoint_order > r->points[best].m.checkpoint_order))
                best = idx[k];
        }
        if (best != SIZE_MAX) {
            keep[best] = true;
            if (add_why(&why[best], "the disk's newest checkpoint (the next "
                        "incremental's parent)") < 0)
                return -1;
        }
    }
    return 0;
}

/* ---- the plan ---- */

enum step_kind { STEP_REMOVE, STEP_MERGE };
struct step {
    enum step_kind kind;
    size_t p, c;          /* point indices in the first reading: the point
                           * retired (the bottom of a merge), its target */
    const size_t *mid;    /* a merge: the retired points between p and c,
                           * from p's child up */
    size_t nmid;
};

static size_t only_child(const struct repo *r, const bool *alive,
                         const int *parent, size_t i)
{
    for (size_t j = 0; j < r->npoints; j++)
        if (alive[j] && parent[j] == (int)i)
            return j;
    return SIZE_MAX;
}

static size_t live_children(const struct repo *r, const bool *alive,
                            const int *parent, size_t i, size_t *only)
{
    size_t k = 0;
    for (size_t j = 0; j < r->npoints; j++) {
        if (alive[j] && parent[j] == (int)i) {
            k++;
            *only = j;
        }
    }
    return k;
}

/* Decide the steps: res->v gets every point's fate, *steps the order,
 * *mids the storage of the steps' mid lists (caller frees both).
 * O(n^2) for n points: each round removes the leaves and merges one run. */
static int plan(const struct repo *r, const bool *keep, char **why,
                struct repo_prune_result *res, struct step **steps,
                size_t *nsteps, size_t **mids)
{
    size_t n = r->npoints, nm = 0;
    CLEANUP_FREE bool *alive = malloc((n + 1) * sizeof(bool));
    CLEANUP_FREE int *parent = malloc((n + 1) * sizeof(int));
    CLEANUP_FREE size_t *kids = calloc(n + 1, sizeof(size_t));
    CLEANUP_FREE size_t *depth = calloc(n + 1, sizeof(size_t));
    *steps = calloc(n + 1, sizeof(**steps));
    *mids = calloc(n + 1, sizeof(**mids));
    res->v = calloc(n + 1, sizeof(*res->v));
    if (!alive || !parent || !kids || !depth || !*steps || !*mids || !res->v)
        return -1;
    res->n = n;
    for (size_t i = 0; i < n; i++) {
        alive[i] = true;
        parent[i] = r->points[i].parent;
        if (parent[i] >= 0)
            kids[parent[i]]++;
        struct repo_decision *d = &res->v[i];
        d->fate = keep[i] ? REPO_KEEP : REPO_RETIRE;
        d->file = strdup(r->points[i].file);
        d->created = strdup(r->points[i].m.created);
        d->checkpoint = r->points[i].m.checkpoint
                            ? strdup(r->points[i].m.checkpoint)
                            : NULL;
        d->why = why[i];
        why[i] = NULL;
        if (!d->file || !d->created ||
            (r->points[i].m.checkpoint && !d->checkpoint))
            return -1;
    }
    /* Depth in the first reading (links were checked: no loop; bounded
     * anyway).  Merges keep the order of depths along a chain, which is
     * all the choice below needs. */
    for (size_t i = 0; i < n; i++)
        for (int k = parent[i]; k >= 0 && depth[i] <= n; k = parent[k])
            depth[i]++;
    for (bool progress = true; progress;) {
        progress = false;
        /* Retired leaves go first. */
        for (size_t i = 0; i < n; i++) {
            if (!alive[i] || keep[i] || kids[i] != 0)
                continue;
            (*steps)[(*nsteps)++] = (struct step){STEP_REMOVE, i, i, NULL, 0};
            alive[i] = false;
            if (parent[i] >= 0)
                kids[parent[i]]--;
            progress = true;
        }
        /* Then the merge closest to a root, with the retired points above
         * it that have one child each (one step: the data goes into the
         * bottom one's image once, the manifests above are rewritten
         * once).  Raw chains merge one point a step. */
        size_t best = SIZE_MAX;
        for (size_t i = 0; i < n; i++) {
            if (!alive[i] || keep[i] || kids[i] != 1 ||
                (best != SIZE_MAX && depth[i] >= depth[best]))
                continue;
            size_t c = only_child(r, alive, parent, i);
            if (c != SIZE_MAX && !r->points[c].problem)
                best = i;
        }
        if (best == SIZE_MAX)
            continue;
        bool qcow2 = strcmp(r->points[best].m.image_format, "qcow2") == 0;
        size_t target = only_child(r, alive, parent, best);
        struct step *st = &(*steps)[(*nsteps)++];
        *st = (struct step){STEP_MERGE, best, 0, *mids + nm, 0};
        while (qcow2 && !keep[target] && kids[target] == 1) {
            size_t up = only_child(r, alive, parent, target);
            if (up == SIZE_MAX || r->points[up].problem)
                break;
            (*mids)[nm++] = target;
            st->nmid++;
            target = up;
        }
        st->c = target;
        parent[target] = parent[best];
        alive[best] = false;
        res->v[best].fate = REPO_MERGE;
        for (size_t k = 0; k < st->nmid; k++) {
            alive[st->mid[k]] = false;
            res->v[st->mid[k]].fate = REPO_MERGE;
        }
        for (size_t k = 0; k <= st->nmid; k++) {
            size_t x = k == 0 ? best : st->mid[k - 1];
            if (!(res->v[x].into = strdup(r->points[target].file)))
                return -1;
        }
        progress = true;
    }
    /* What the policy retires but the chains need. */
    for (size_t i = 0; i < n; i++) {
        if (!alive[i] || keep[i])
            continue;
        res->v[i].fate = REPO_KEEP_NEEDED;
        size_t only = 0;
        size_t k = live_children(r, alive, parent, i, &only);
        int rr;
        if (k == 1)
            rr = add_why(&res->v[i].why, "needed: its child %s is damaged",
                         r->points[only].file);
        else
            rr = add_why(&res->v[i].why, "needed by %zu points that start "
                         "from it (merging it would copy its data into each)",
                         k);
        if (rr < 0)
            return -1;
    }
    return 0;
}

/* ---- one step ---- */

static int find_point(const struct repo *r, const char *file)
{
    for (size_t i = 0; i < r->npoints; i++)
        if (strcmp(r->points[i].file, file) == 0)
            return (int)i;
    return -1;
}

static json_t *load_json(const char *dir, const char *file,
                         struct cbt_error **errp)
{
    CLEANUP_FREE char *path = cbt_strdup_printf("%s/%s.json", dir, file);
    CLEANUP_FREE char *text = NULL;
    size_t len;
    if (!path) {
        cbt_error_set(errp, ENOMEM, "out of memory");
        return NULL;
    }
    if (bfile_read_all(path, "manifest", MANIFEST_MAX_READ, &text, &len,
                       errp) < 0)
        return NULL;
    json_error_t je;
    json_t *j = json_loadb(text, len, JSON_REJECT_DUPLICATES, &je);
    if (!j || !json_is_object(j)) {
        json_decref(j);
        cbt_error_set(errp, EINVAL, "%s: not a valid manifest", path);
        return NULL;
    }
    return j;
}

/* The manifest text of j (with a newline) and its SHA-256, checked to
 * parse as a manifest. */
static char *dump_manifest(json_t *j, const char *what, char sha[65],
                           struct cbt_error **errp)
{
    char *t = json_dumps(j, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    char *text = t ? cbt_strdup_printf("%s\n", t) : NULL;
    free(t);
    if (!text) {
        cbt_error_set(errp, ENOMEM, "%s: out of memory", what);
        return NULL;
    }
    struct manifest m;
    if (manifest_parse(text, strlen(text), what, &m, errp) < 0) {
        cbt_error_prefix(errp, "the new manifest does not check");
        free(text);
        return NULL;
    }
    manifest_free(&m);
    uint8_t d[32];
    sha256_digest(text, strlen(text), d);
    sha256_hex(d, sha);
    return text;
}

/* The raw extent type at off: 0 none, 1 data, 2 zero. */
static int raw_type(const struct manifest *m, uint64_t off)
{
    size_t lo = 0, hi = m->nextents;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        const struct manifest_extent *e = &m->extents[mid];
        if (e->start + e->length <= off)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo < m->nextents && m->extents[lo].start <= off)
        return m->extents[lo].zero ? 2 : 1;
    return 0;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* The merged raw extents of P (pm) under C (cm) as JSON, and the bytes. */
static json_t *raw_merged(const struct manifest *pm, const struct manifest *cm,
                          uint64_t *copied, uint64_t *zeroed)
{
    size_t nb = 2 * (pm->nextents + cm->nextents) + 3, k = 0;
    CLEANUP_FREE uint64_t *b = malloc(nb * sizeof(*b));
    json_t *arr = json_array();
    if (!b || !arr) {
        json_decref(arr);
        return NULL;
    }
    uint64_t size = cm->virtual_size;
    b[k++] = 0;
    b[k++] = size;
    b[k++] = MIN(pm->virtual_size, size);
    for (size_t i = 0; i < pm->nextents; i++) {
        b[k++] = MIN(pm->extents[i].start, size);
        b[k++] = MIN(pm->extents[i].start + pm->extents[i].length, size);
    }
    for (size_t i = 0; i < cm->nextents; i++) {
        b[k++] = MIN(cm->extents[i].start, size);
        b[k++] = MIN(cm->extents[i].start + cm->extents[i].length, size);
    }
    qsort(b, k, sizeof(*b), cmp_u64);
    bool full = pm->kind == CBT_BACKUP_FULL;
    uint64_t run_start = 0, run_end = 0;
    int run_type = 0;
    *copied = *zeroed = 0;
    for (size_t i = 0; i + 1 <= k; i++) {
        uint64_t a = b[i], e = i + 1 < k ? b[i + 1] : a;
        int t = 0;
        if (a < e) {
            t = raw_type(cm, a);
            if (!t && a < pm->virtual_size)
                t = raw_type(pm, a);
            /* C read zeroes past P's end; so must the merged point, and a
             * full one carries everything. */
            if (!t && (full || a >= pm->virtual_size))
                t = 2;
        }
        if (a < e && t == run_type && a == run_end) {
            run_end = e;
            continue;
        }
        if (run_type && run_end > run_start) {
            json_array_append_new(arr, json_pack("[IIs]",
                                                 (json_int_t)run_start,
                                                 (json_int_t)(run_end -
                                                              run_start),
                                                 run_type == 2 ? "zero"
                                                               : "data"));
            *(run_type == 2 ? zeroed : copied) += run_end - run_start;
        }
        run_start = a;
        run_end = a < e ? e : a;
        run_type = a < e ? t : 0;
    }
    if (run_type && run_end > run_start) {
        json_array_append_new(arr, json_pack("[IIs]", (json_int_t)run_start,
                                             (json_int_t)(run_end - run_start),
                                             run_type == 2 ? "zero" : "data"));
        *(run_type == 2 ? zeroed : copied) += run_end - run_start;
    }
    return arr;
}

/* The qcow2 merged point's bytes: what C, the nmid points below it and P
 * carry above P's parent. */
static int qcow2_merged_bytes(const char *cpath, size_t nmid,
                              uint64_t *copied, uint64_t *zeroed,
                              struct cbt_error **errp)
{
    struct cbt_image *c = cbt_image_open(cpath, "qcow2", 0, errp);
    if (!c)
        return -1;
    struct cbt_image *p = cbt_image_backing(c);
    for (size_t k = 0; p && k < nmid; k++)
        p = cbt_image_backing(p);
    struct cbt_image *base = p ? cbt_image_backing(p) : NULL;
    uint64_t size = cbt_image_size(c);
    *copied = *zeroed = 0;
    int r = 0;
    for (uint64_t off = 0; off < size;) {
        struct cbt_extent e;
        r = cbt_image_block_status_above(c, base, off, size - off, &e);
        if (r < 0)
            break;
        if ((e.flags & CBT_BS_ZERO))
            *zeroed += e.length;
        else if (e.flags & CBT_BS_PRESENT)
            *copied += e.length;
        off += e.length;
    }
    cbt_image_close(c, NULL);
    if (r < 0) {
        cbt_error_set(errp, -r, "%s: cannot read its allocation: %s", cpath,
                      strerror(-r));
        return -1;
    }
    return 0;
}

/* New files this step wrote (removed again when the step fails before
 * its journal). */
struct written {
    char **v;
    size_t n;
};

static void written_undo(const char *dir, struct written *w, bool remove)
{
    for (size_t i = 0; i < w->n; i++) {
        if (remove) {
            CLEANUP_FREE char *p = cbt_strdup_printf("%s/%s", dir, w->v[i]);
            if (p)
                unlink(p);
        }
        free(w->v[i]);
    }
    free(w->v);
    memset(w, 0, sizeof(*w));
}

/* Record in tx the rename of the written file `from` over `to` (names in
 * the folder), and `from` among the files to remove if the prune fails.
 * Copies both names.  -1 when out of memory, nothing recorded then. */
static int add_rename(struct foldertx *tx, struct written *w,
                      const char *from, const char *to)
{
    char **nf = realloc(tx->rename_from, (tx->nrename + 1) * sizeof(char *));
    if (!nf)
        return -1;
    tx->rename_from = nf;
    char **nt = realloc(tx->rename_to, (tx->nrename + 1) * sizeof(char *));
    if (!nt)
        return -1;
    tx->rename_to = nt;
    char **nw = realloc(w->v, (w->n + 1) * sizeof(char *));
    if (!nw)
        return -1;
    w->v = nw;
    char *f = strdup(from), *t = strdup(to), *wf = strdup(from);
    if (!f || !t || !wf) {
        free(f);
        free(t);
        free(wf);
        return -1;
    }
    tx->rename_from[tx->nrename] = f;
    tx->rename_to[tx->nrename] = t;
    tx->nrename++;
    w->v[w->n++] = wf;
    return 0;
}

/* Write NAME.json.prune-new for point `file` with `text`; record it in tx. */
static int write_new(const char *dir, const char *file, const char *text,
                     struct foldertx *tx, struct written *w,
                     struct cbt_error **errp)
{
    CLEANUP_FREE char *from = cbt_strdup_printf("%s.json%s", file,
                                                FOLDERTX_NEW_SUFFIX);
    CLEANUP_FREE char *to = cbt_strdup_printf("%s.json", file);
    CLEANUP_FREE char *path = from ? cbt_strdup_printf("%s/%s", dir, from)
                                   : NULL;
    if (!to || !path) {
        cbt_error_set(errp, ENOMEM, "%s: out of memory", dir);
        return -1;
    }
    /* A stale one (a prune killed before its journal) is ours to replace:
     * the folder is locked and has no journal. */
    unlink(path);
    if (bfile_write_new(path, text, strlen(text), false, errp) < 0)
        return -1;
    if (add_rename(tx, w, from, to) < 0) {
        unlink(path);
        cbt_error_set(errp, ENOMEM, "%s: out of memory", dir);
        return -1;
    }
    return 0;
}

static int add_remove(struct foldertx *tx, const char *name)
{
    char **v = realloc(tx->remove, (tx->nremove + 1) * sizeof(char *));
    if (!v)
        return -1;
    tx->remove = v;
    if (!(v[tx->nremove] = strdup(name)))
        return -1;
    tx->nremove++;
    return 0;
}

/* The new manifests of the points above point `top` (whose new digest is
 * sha), each recording the new digest of the one below it. */
static int rewrite_above(const struct repo *r, size_t top, const char *sha,
                         struct foldertx *tx, struct written *w,
                         struct cbt_error **errp)
{
    for (size_t j = 0; j < r->npoints; j++) {
        if (r->points[j].parent != (int)top)
            continue;
        const char *file = r->points[j].file;
        json_t *dj = load_json(r->dir, file, errp);
        if (!dj)
            return -1;
        json_t *par = json_object_get(dj, "parent");
        char nsha[65];
        CLEANUP_FREE char *text = NULL;
        if (json_is_object(par) &&
            json_object_set_new(par, "manifest-sha256", json_string(sha)) == 0)
            text = dump_manifest(dj, file, nsha, errp);
        else
            cbt_error_set(errp, EINVAL, "%s.json: no parent object", file);
        json_decref(dj);
        if (!text || write_new(r->dir, file, text, tx, w, errp) < 0 ||
            rewrite_above(r, j, nsha, tx, w, errp) < 0)
            return -1;
    }
    return 0;
}

/* Is the image at path free of other processes (no QEMU lock held on it,
 * bfile_held)?  0, or -1 with *errp (CBT_ERR_IN_USE). */
static int check_free(const char *path, struct cbt_error **errp)
{
    int fd = open(path, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) {
        cbt_error_set(errp, errno, "%s: %s", path, strerror(errno));
        return -1;
    }
    bool held = bfile_held(fd);
    close(fd);
    if (held) {
        cbt_error_set(errp, EBUSY, "%s: in use by another process (it holds "
                      "the image's lock): not pruning it now", path);
        cbt_error_set_kind(errp, CBT_ERR_IN_USE);
        return -1;
    }
    return 0;
}

/*
 * The record files of the v2 points among P, mid[] and C that make C's
 * view (from C down while they are v2), folded into C's record file: the
 * new one written as NAME.tree.prune-new (durable before its name, like
 * the new manifests, and like them renamed over NAME.tree by the journal,
 * removed if the step fails before it), its digest in C's new manifest
 * (cj).  Proportional to those records, not to the disk.
 */
static int fold_records(const struct repo *r, const struct repo_point *p,
                        const size_t *mid, size_t nmid,
                        const struct repo_point *c, json_t *cj,
                        struct foldertx *tx, struct written *w,
                        struct cbt_error **errp)
{
    size_t hl = strlen(c->m.hash_file);
    if (hl <= 5 || strcmp(c->m.hash_file + hl - 5, ".tree") != 0) {
        cbt_error_set(errp, EINVAL, "%s.json: its record file '%s' is not "
                      "named NAME.tree; not merging into it", c->file,
                      c->m.hash_file);
        return -1;
    }
    CLEANUP_FREE const struct repo_point **order =
        calloc(nmid + 2, sizeof(*order));
    CLEANUP_FREE struct tree_file *files = calloc(nmid + 2, sizeof(*files));
    CLEANUP_FREE struct tree_file **fp = calloc(nmid + 2, sizeof(*fp));
    size_t n = 0;
    if (!order || !files || !fp) {
        cbt_error_set(errp, ENOMEM, "%s: out of memory", r->dir);
        return -1;
    }
    order[n++] = c;
    for (size_t k = nmid; k-- > 0 && order[n - 1]->m.tree;)
        order[n++] = &r->points[mid[k]];
    if (order[n - 1]->m.tree)
        order[n++] = p;
    while (n > 0 && !order[n - 1]->m.tree)
        n--;
    size_t opened = 0;
    int ret = -1;
    CLEANUP_FREE char *name = cbt_strdup_printf("%s%s", c->m.hash_file,
                                                FOLDERTX_NEW_SUFFIX);
    CLEANUP_FREE char *out = name ? cbt_strdup_printf("%s/%s", r->dir, name)
                                  : NULL;
    if (!name || !out) {
        cbt_error_set(errp, ENOMEM, "%s: out of memory", r->dir);
        return -1;
    }
    for (; opened < n; opened++) {
        const struct repo_point *x = order[opened];
        CLEANUP_FREE char *path = cbt_strdup_printf("%s/%s", r->dir,
                                                    x->m.hash_file);
        char hex[65];
        if (!path) {
            cbt_error_set(errp, ENOMEM, "%s: out of memory", r->dir);
            goto out;
        }
        if (tree_file_open(&files[opened], path, x->m.blocks, hex, errp) < 0)
            goto out;
        fp[opened] = &files[opened];
        if (strcasecmp(hex, x->m.hash_file_sha256) != 0) {
            opened++;
            cbt_error_set(errp, EINVAL, "%s: SHA-256 %s differs from %s "
                          "recorded in its manifest", path, hex,
                          x->m.hash_file_sha256);
            cbt_error_set_kind(errp, CBT_ERR_CORRUPT);
            goto out;
        }
    }
    /* A stale one (a prune killed before its journal) is ours to replace:
     * the folder is locked and has no journal. */
    unlink(out);
    char sha[65];
    /* The oldest folded starts the chain's tree when its parent is not
     * v2 (none, or a v1 backup): nothing below the new file then. */
    const struct repo_point *oldest = order[n - 1];
    bool on_zeroes = oldest->parent < 0 ||
                     !r->points[oldest->parent].m.tree;
    /* The folded file sits on what P sat on. */
    uint8_t proot[32] = {0};
    if (p->parent >= 0) /* checked by the manifest parser */
        (void)sha256_from_hex(r->points[p->parent].m.root, proot);
    if (tree_merge(fp, n, c->m.virtual_size, on_zeroes, proot, out, sha,
                   errp) < 0)
        goto out;
    json_t *hash = json_object_get(cj, "hash");
    if (!json_is_object(hash) ||
        json_object_set_new(hash, "file-sha256", json_string(sha)) ||
        add_rename(tx, w, name, c->m.hash_file) < 0) {
        unlink(out);
        cbt_error_set(errp, ENOMEM, "%s: out of memory", r->dir);
        goto out;
    }
    ret = 0;
out:
    for (size_t k = 0; k < opened; k++)
        tree_file_close(&files[k]);
    return ret;
}

/* Merge point pi, and the nmid points mid[] above it (each the only child
 * of the one below), into ci, the only child of the last (indices in r,
 * freshly read). */
static int do_merge(const struct repo *r, size_t pi, size_t ci,
                    const size_t *mid, size_t nmid,
                    const struct repo_prune_opts *o, struct cbt_error **errp)
{
    const struct repo_point *p = &r->points[pi], *c = &r->points[ci];
    struct foldertx tx;
    memset(&tx, 0, sizeof(tx));
    struct written w = {0};
    int ret = -1;
    json_t *pj = load_json(r->dir, p->file, errp);
    json_t *cj = pj ? load_json(r->dir, c->file, errp) : NULL;
    CLEANUP_FREE char *cpath = cbt_strdup_printf("%s/%s", r->dir, c->file);
    CLEANUP_FREE char *ppath = cbt_strdup_printf("%s/%s", r->dir, p->file);
    CLEANUP_FREE char *pjson = cbt_strdup_printf("%s.json", p->file);
    CLEANUP_FREE char *text = NULL;
    if (!cj || !cpath || !ppath || !pjson)
        goto out;
    bool raw = strcmp(c->m.image_format, "raw") == 0;
    bool full = p->m.kind == CBT_BACKUP_FULL;
    uint64_t copied = 0, zeroed = 0;
    json_t *ext = json_null();
    if (raw) {
        ext = raw_merged(&p->m, &c->m, &copied, &zeroed);
        if (!ext) {
            cbt_error_set(errp, ENOMEM, "%s: out of memory", r->dir);
            goto out;
        }
    } else if (qcow2_merged_bytes(cpath, nmid, &copied, &zeroed, errp) < 0) {
        goto out;
    }
    uint64_t dirty = full ? c->m.virtual_size : copied + zeroed;
    /* In place, so keys this cbt does not know stay. */
    json_t *bytes = json_object_get(cj, "bytes");
    if (!json_is_object(bytes)) {
        json_decref(ext);
        cbt_error_set(errp, EINVAL, "%s.json: no bytes object", c->file);
        goto out;
    }
    json_t *parent = json_deep_copy(json_object_get(pj, "parent"));
    json_t *since = json_deep_copy(json_object_get(pj, "since"));
    if (!parent || !since ||
        json_object_set_new(bytes, "dirty", json_integer((json_int_t)dirty)) ||
        json_object_set_new(bytes, "copied",
                            json_integer((json_int_t)copied)) ||
        json_object_set_new(bytes, "zeroed",
                            json_integer((json_int_t)zeroed)) ||
        json_object_set_new(cj, "kind",
                            json_string(full ? "full" : "differential")) ||
        json_object_set_new(cj, "since", since) ||
        json_object_set_new(cj, "parent", parent) ||
        json_object_set_new(cj, "extents", ext)) {
        cbt_error_set(errp, ENOMEM, "%s: out of memory", r->dir);
        goto out;
    }
    /* What no longer describes the merged point: the file's size (known
     * only once merged), "made by a rescan" (a full cannot be one); the
     * image is P's file, with P's compressed clusters if any (C's are
     * written compressed into a compressed P, foldertx.c), so its
     * compression is P's. */
    json_object_del(bytes, "file");
    json_object_del(cj, "rescan");
    json_t *cimg = json_object_get(cj, "image");
    json_t *pcomp = json_object_get(json_object_get(pj, "image"),
                                    "compression");
    if (json_is_object(cimg)) {
        if (pcomp)
            json_object_set(cimg, "compression", pcomp);
        else
            json_object_del(cimg, "compression");
    }
    /* sha256-tree-v2: C's records alone are not its view once the points
     * below it go; they are folded, newest first, into a new record file
     * the new manifest names (the old one goes with the transaction). */
    if (c->m.tree &&
        fold_records(r, p, mid, nmid, c, cj, &tx, &w, errp) < 0)
        goto out;
    char sha[65];
    if (!(text = dump_manifest(cj, c->file, sha, errp)) ||
        write_new(r->dir, c->file, text, &tx, &w, errp) < 0 ||
        rewrite_above(r, ci, sha, &tx, &w, errp) < 0)
        goto out;
    for (size_t k = 0; k < nmid; k++) {
        const struct repo_point *x = &r->points[mid[k]];
        CLEANUP_FREE char *xj = cbt_strdup_printf("%s.json", x->file);
        CLEANUP_FREE char *xp = cbt_strdup_printf("%s/%s", r->dir, x->file);
        if (!xj || !xp || check_free(xp, errp) < 0 ||
            add_remove(&tx, xj) < 0 || add_remove(&tx, x->file) < 0 ||
            add_remove(&tx, x->m.hash_file) < 0) {
            if (!xj || !xp)
                cbt_error_set(errp, ENOMEM, "%s: out of memory", r->dir);
            goto out;
        }
    }
    if (add_remove(&tx, pjson) < 0 ||
        add_remove(&tx, p->m.hash_file) < 0 ||
        !(tx.merge_from = strdup(p->file)) ||
        !(tx.merge_into = strdup(c->file)) ||
        !(tx.merge_format = strdup(c->m.image_format))) {
        cbt_error_set(errp, ENOMEM, "%s: out of memory", r->dir);
        goto out;
    }
    tx.merge_from_size = p->m.virtual_size;
    /* The merge writes at most C's clusters into P's image before C's
     * image goes: refuse a step the folder has no room for before its
     * journal (after it, a full disk would hold the kept points hostage
     * until space is freed). */
    struct statvfs vfs;
    uint64_t need = c->file_bytes + (4u << 20);
    if (statvfs(r->dir, &vfs) == 0 &&
        (uint64_t)vfs.f_bavail * vfs.f_frsize < need) {
        cbt_error_set(errp, ENOSPC, "%s: merging %s into %s needs up to %"
                      PRIu64 " bytes free; %" PRIu64 " are", r->dir, p->file,
                      c->file, need, (uint64_t)vfs.f_bavail * vfs.f_frsize);
        goto out;
    }
    /* A merge never starts on an image another process has open (it would
     * fail after the commit point; the merge itself takes QEMU's locks). */
    if (check_free(ppath, errp) < 0 || check_free(cpath, errp) < 0)
        goto out;
    if (foldertx_run(r->dir, &tx, o->progress, o->progress_opaque, errp) < 0) {
        /* After the journal the renames are the replay's. */
        if (foldertx_pending(r->dir))
            written_undo(r->dir, &w, false);
        goto out;
    }
    written_undo(r->dir, &w, false);
    ret = 0;
out:
    written_undo(r->dir, &w, true);
    foldertx_free(&tx);
    json_decref(pj);
    json_decref(cj);
    return ret;
}

static int do_remove(const struct repo *r, size_t pi, struct cbt_error **errp)
{
    const struct repo_point *p = &r->points[pi];
    struct foldertx tx;
    memset(&tx, 0, sizeof(tx));
    CLEANUP_FREE char *pjson = cbt_strdup_printf("%s.json", p->file);
    CLEANUP_FREE char *ppath = cbt_strdup_printf("%s/%s", r->dir, p->file);
    int ret = -1;
    if (!pjson || !ppath || add_remove(&tx, pjson) < 0 ||
        add_remove(&tx, p->file) < 0 || add_remove(&tx, p->m.hash_file) < 0) {
        cbt_error_set(errp, ENOMEM, "%s: out of memory", r->dir);
        goto out;
    }
    /* Not while another process has it open. */
    if (check_free(ppath, errp) < 0)
        goto out;
    ret = foldertx_run(r->dir, &tx, NULL, NULL, errp);
out:
    foldertx_free(&tx);
    return ret;
}

/* Host bytes of every point. */
static uint64_t total_bytes(const struct repo *r)
{
    uint64_t t = 0;
    for (size_t i = 0; i < r->npoints; i++)
        t += r->points[i].file_bytes;
    return t;
}

/* Step s, on the folder as it is now. */
static int run_step(const char *dir, const struct repo *first,
                    const struct step *s, const struct repo_prune_opts *o,
                    uint64_t *freed, struct cbt_error **errp)
{
    struct repo r;
    if (repo_open(dir, &r, errp) < 0)
        return -1;
    uint64_t before = total_bytes(&r);
    int ret = -1;
    const char *pf = first->points[s->p].file;
    int pi = find_point(&r, pf);
    if (pi < 0 || r.points[pi].problem) {
        cbt_error_set(errp, EAGAIN, "%s/%s: changed while pruning (%s); "
                      "stopped", dir, pf, pi < 0 ? "gone" : "damaged");
        goto out;
    }
    size_t kids = r.points[pi].nchildren;
    if (s->kind == STEP_REMOVE) {
        if (kids != 0) {
            cbt_error_set(errp, EAGAIN, "%s/%s: a new point starts from it; "
                          "stopped", dir, pf);
            goto out;
        }
        ret = do_remove(&r, (size_t)pi, errp);
    } else {
        /* The chain from p up to c must still be p, the mids, c, each
         * below the next its only child. */
        CLEANUP_FREE size_t *mid = calloc(s->nmid + 1, sizeof(size_t));
        int below = pi, ci = -1;
        bool ok = mid && kids == 1;
        for (size_t k = 0; ok && k <= s->nmid; k++) {
            size_t want = k < s->nmid ? s->mid[k] : s->c;
            int x = find_point(&r, first->points[want].file);
            ok = x >= 0 && r.points[x].parent == below &&
                 !r.points[x].problem &&
                 (k == s->nmid || r.points[x].nchildren == 1);
            if (ok && k < s->nmid)
                mid[k] = (size_t)x;
            below = ci = x;
        }
        if (!ok) {
            cbt_error_set(errp, EAGAIN, "%s/%s: the points above it changed "
                          "while pruning; stopped", dir, pf);
            goto out;
        }
        ret = do_merge(&r, (size_t)pi, (size_t)ci, mid, s->nmid, o, errp);
    }
    if (ret == 0) {
        struct repo after;
        struct cbt_error *e = NULL;
        if (repo_open(dir, &after, &e) == 0) {
            uint64_t now = total_bytes(&after);
            *freed += before > now ? before - now : 0;
            repo_close(&after);
        }
        cbt_error_free(e);
    }
out:
    repo_close(&r);
    return ret;
}

int repo_prune(const char *dir, const struct repo_prune_opts *o,
               struct repo_prune_result *res, struct cbt_error **errp)
{
    memset(res, 0, sizeof(*res));
    int lock;
    struct repo r;
    if (repo_open_to_change(dir, o->dry_run, &r, &lock, errp) < 0)
        return -1;
    int ret = -1;
    size_t n = r.npoints, nsteps = 0;
    bool *keep = calloc(n + 1, sizeof(bool));
    char **why = calloc(n + 1, sizeof(char *));
    struct step *steps = NULL;
    size_t *mids = NULL;
    if (!keep || !why || apply_policy(&r, o, keep, why) < 0 ||
        plan(&r, keep, why, res, &steps, &nsteps, &mids) < 0) {
        cbt_error_set(errp, ENOMEM, "%s: out of memory", dir);
        goto out;
    }
    ret = 0;
    for (size_t i = 0; !o->dry_run && i < nsteps; i++) {
        if (ops_cancelled(o->cancel, o->cancel_opaque)) {
            cbt_error_set(errp, ECANCELED, "%s: prune interrupted after %zu "
                          "of %zu steps (each step is whole)", dir, i,
                          nsteps);
            ret = -1;
            break;
        }
        if (run_step(dir, &r, &steps[i], o, &res->bytes_freed, errp) < 0) {
            cbt_error_prefix(errp, "prune step %zu of %zu (%s %s)", i + 1,
                             nsteps,
                             steps[i].kind == STEP_MERGE ? "merging"
                                                         : "removing",
                             r.points[steps[i].p].file);
            ret = -1;
            break;
        }
        res->steps_done++;
    }
out:
    for (size_t i = 0; why && i < n; i++)
        free(why[i]);
    free(why);
    free(keep);
    free(steps);
    free(mids);
    repo_close_unlock(&r, lock);
    if (ret < 0 && res->steps_done == 0 && !res->v)
        repo_prune_result_free(res);
    return ret;
}
