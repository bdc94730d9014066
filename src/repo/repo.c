/*
 * Reading a backup folder as one object (repo.h): its points, the links
 * between them and what is broken, and the files cbt's interrupted runs
 * left behind.
 *
 * Whose files are these?  A file is cbt's only by the rules its writers
 * follow (src/ops/backup.c "Whose files are these?", bfile.c, restore.c,
 * src/live/livebackup.c, foldertx.c): a manifest NAME.json describing the
 * image NAME beside it makes a point of NAME, NAME.hashes and NAME.json;
 * an interrupted backup leaves NAME.part (with or without NAME.hashes), or
 * NAME with NAME.hashes and no manifest; a restore leaves OUT.part; bfile's
 * fallback for file systems without O_TMPFILE leaves NAME.tmp-XXXXXX; a
 * live backup leaves NAME.scratch; a prune killed before its journal
 * leaves NAME.json.prune-new.  Those, and nothing else, are leftovers; a
 * NAME.json that is cbt's (an image or hashes file of that name beside it)
 * but does not parse is damage, reported and never offered for removal.
 * Every other file is not cbt's business and is not mentioned.
 *
 * The checks here are the cheap ones (no image data, no hashes file read):
 * every file present with the size its manifest implies, and the links
 * between manifests as verify checks them (the parent's manifest is the
 * one its child recorded, same disk and format, the child starting from
 * the parent's checkpoint, orders rising).  cbt repo verify reads the rest.
 */
#include <dirent.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>

#include <jansson.h>

#include <cbt/backup.h>

#include "../ops/foldertx.h"
#include "../util/util.h"
#include "../ops/hashtree.h"
#include "repo.h"

const char *repo_kind_name(const struct repo_point *p)
{
    return cbt_backup_mode_name(p->m.kind);
}

const char *repo_leftover_kind_name(enum repo_leftover_kind k)
{
    switch (k) {
    case REPO_LEFT_PART:
        return "work-file";
    case REPO_LEFT_NO_MANIFEST:
        return "no-manifest";
    case REPO_LEFT_ORPHAN_HASHES:
        return "orphan-hashes";
    case REPO_LEFT_SCRATCH:
        return "scratch";
    case REPO_LEFT_TEMP:
        return "temporary";
    case REPO_LEFT_PRUNE_NEW:
        return "prune-new";
    case REPO_LEFT_BAD_MANIFEST:
        return "damaged-manifest";
    }
    return "unknown";
}

int repo_parse_time(const char *s, int64_t *out)
{
    struct tm tm;
    memset(&tm, 0, sizeof(tm));
    int n = 0;
    if (!s || sscanf(s, "%4d-%2d-%2dT%2d:%2d:%2d%n", &tm.tm_year, &tm.tm_mon,
                     &tm.tm_mday, &tm.tm_hour, &tm.tm_min, &tm.tm_sec,
                     &n) != 6 || n != 19)
        return -1;
    tm.tm_year -= 1900;
    tm.tm_mon -= 1;
    time_t t = timegm(&tm);
    if (t == (time_t)-1)
        return -1;
    *out = (int64_t)t;
    return 0;
}

static bool ends_with(const char *s, const char *sfx)
{
    size_t n = strlen(s), k = strlen(sfx);
    return n >= k && strcmp(s + n - k, sfx) == 0;
}

/* ---- the record of verifications ---- */

void repo_verified_free(struct repo_verified *v)
{
    for (size_t i = 0; v && i < v->n; i++) {
        free(v->file[i]);
        free(v->time[i]);
        free(v->sha[i]);
    }
    if (v) {
        free(v->file);
        free(v->time);
        free(v->sha);
        memset(v, 0, sizeof(*v));
    }
}

static bool hex64(const char *s)
{
    if (strlen(s) != 64)
        return false;
    for (const char *c = s; *c; c++)
        if (!((*c >= '0' && *c <= '9') || (*c >= 'a' && *c <= 'f')))
            return false;
    return true;
}

int repo_verified_parse(const char *buf, size_t len, const char *what,
                        struct repo_verified *v, struct cbt_error **errp)
{
    memset(v, 0, sizeof(*v));
    json_error_t je;
    json_t *root = json_loadb(buf, len, JSON_REJECT_DUPLICATES, &je);
    json_t *f = root ? json_object_get(root, "format") : NULL;
    json_t *ver = root ? json_object_get(root, "version") : NULL;
    json_t *pts = root ? json_object_get(root, "points") : NULL;
    if (!json_is_object(root) || !json_is_string(f) ||
        strcmp(json_string_value(f), "cbt-verified") != 0 ||
        !json_is_integer(ver) || json_integer_value(ver) != 1 ||
        !json_is_object(pts) || json_object_size(pts) > 65536) {
        json_decref(root);
        cbt_error_set(errp, EINVAL, "%s: not a record of verifications "
                      "(format \"cbt-verified\", version 1, at most 65536 "
                      "points)", what);
        cbt_error_set_kind(errp, CBT_ERR_CORRUPT);
        return -1;
    }
    size_t n = json_object_size(pts);
    v->file = calloc(n + 1, sizeof(char *));
    v->time = calloc(n + 1, sizeof(char *));
    v->sha = calloc(n + 1, sizeof(char *));
    int ret = -1;
    if (!v->file || !v->time || !v->sha)
        goto oom;
    const char *key;
    json_t *e;
    json_object_foreach(pts, key, e) {
        json_t *t = json_object_get(e, "verified");
        json_t *h = json_object_get(e, "manifest-sha256");
        int64_t when;
        if (!key[0] || strlen(key) > 255 || strchr(key, '/') ||
            strcmp(key, ".") == 0 || strcmp(key, "..") == 0 ||
            !json_is_string(t) || json_string_length(t) > 64 ||
            repo_parse_time(json_string_value(t), &when) < 0 ||
            !json_is_string(h) || !hex64(json_string_value(h))) {
            cbt_error_set(errp, EINVAL, "%s: a point's entry is not "
                          "{\"verified\": ISO time, \"manifest-sha256\": "
                          "hex} under a plain file name", what);
            cbt_error_set_kind(errp, CBT_ERR_CORRUPT);
            goto out;
        }
        v->file[v->n] = strdup(key);
        v->time[v->n] = strdup(json_string_value(t));
        v->sha[v->n] = strdup(json_string_value(h));
        v->n++;
        if (!v->file[v->n - 1] || !v->time[v->n - 1] || !v->sha[v->n - 1])
            goto oom;
    }
    ret = 0;
    goto out;
oom:
    cbt_error_set(errp, ENOMEM, "%s: out of memory", what);
out:
    json_decref(root);
    if (ret < 0)
        repo_verified_free(v);
    return ret;
}

/* The verification times of the points (a damaged record is ignored with
 * a warning: it only informs). */
static int read_verified(struct repo *r)
{
    CLEANUP_FREE char *path = cbt_strdup_printf("%s/%s", r->dir,
                                                REPO_VERIFIED_FILE);
    CLEANUP_FREE char *text = NULL;
    size_t len;
    struct stat st;
    if (!path)
        return -1;
    if (lstat(path, &st) < 0)
        return 0;
    struct cbt_error *e = NULL;
    struct repo_verified v;
    if (bfile_read_all(path, "record of verifications",
                       REPO_VERIFIED_MAX_BYTES, &text, &len, &e) < 0 ||
        repo_verified_parse(text, len, path, &v, &e) < 0) {
        cbt_warn("ignoring %s", cbt_error_message(e));
        cbt_error_free(e);
        return 0;
    }
    for (size_t i = 0; i < v.n; i++) {
        for (size_t j = 0; j < r->npoints; j++) {
            struct repo_point *p = &r->points[j];
            if (strcmp(p->file, v.file[i]) == 0 &&
                strcasecmp(p->sha, v.sha[i]) == 0 && !p->verified &&
                !(p->verified = strdup(v.time[i]))) {
                repo_verified_free(&v);
                return -1;
            }
        }
    }
    repo_verified_free(&v);
    return 0;
}

/* ---- the folder's names ---- */

struct names {
    char **v;
    size_t n;
};

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static bool has(const struct names *ns, const char *name)
{
    return name && ns->n &&
           bsearch(&name, ns->v, ns->n, sizeof(char *), cmp_str);
}

static bool has_sfx(const struct names *ns, const char *base, const char *sfx)
{
    CLEANUP_FREE char *n = cbt_strdup_printf("%s%s", base, sfx);
    return n && has(ns, n);
}

/* The length of a block hashes file's suffix (".hashes": v1, ".tree":
 * v2), or 0. */
static size_t hashes_suffix(const char *name)
{
    return ends_with(name, ".hashes") ? 7 : ends_with(name, ".tree") ? 5 : 0;
}

/* Is base.hashes or base.tree in the folder? */
static bool has_hashes(const struct names *ns, const char *base)
{
    return has_sfx(ns, base, ".hashes") || has_sfx(ns, base, ".tree");
}

static void names_free(struct names *ns)
{
    for (size_t i = 0; i < ns->n; i++)
        free(ns->v[i]);
    free(ns->v);
}

static int read_names(const char *dir, struct names *ns,
                      struct cbt_error **errp)
{
    memset(ns, 0, sizeof(*ns));
    DIR *d = opendir(dir);
    if (!d) {
        cbt_error_set(errp, errno, "%s: %s", dir, strerror(errno));
        return -1;
    }
    size_t cap = 0;
    int err = 0;
    for (;;) {
        errno = 0;
        struct dirent *de = readdir(d);
        if (!de) {
            err = errno;
            break;
        }
        if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
            continue;
        if (ns->n == cap) {
            cap = cap ? cap * 2 : 64;
            char **v = realloc(ns->v, cap * sizeof(*v));
            if (!v) {
                err = ENOMEM;
                break;
            }
            ns->v = v;
        }
        if (!(ns->v[ns->n] = strdup(de->d_name))) {
            err = ENOMEM;
            break;
        }
        ns->n++;
    }
    closedir(d);
    if (err) {
        names_free(ns);
        cbt_error_set(errp, err, "%s: %s", dir, strerror(err));
        return -1;
    }
    if (ns->n)
        qsort(ns->v, ns->n, sizeof(char *), cmp_str);
    return 0;
}

/* ---- building the object ---- */

static uint64_t host_bytes(const char *dir, const char *name)
{
    CLEANUP_FREE char *p = cbt_strdup_printf("%s/%s", dir, name);
    struct stat st;
    if (!p || lstat(p, &st) < 0 || !S_ISREG(st.st_mode))
        return 0;
    return (uint64_t)st.st_blocks * 512;
}

static int add_left(struct repo *r, const char *file,
                    enum repo_leftover_kind kind, bool removable,
                    const char *fmt, ...) PRINTF_FMT(5, 6);
static int add_left(struct repo *r, const char *file,
                    enum repo_leftover_kind kind, bool removable,
                    const char *fmt, ...)
{
    struct repo_leftover *v = realloc(r->left, (r->nleft + 1) * sizeof(*v));
    if (!v)
        return -1;
    r->left = v;
    struct repo_leftover *l = &v[r->nleft];
    memset(l, 0, sizeof(*l));
    va_list ap;
    va_start(ap, fmt);
    int n = vasprintf(&l->why, fmt, ap);
    va_end(ap);
    l->file = strdup(file);
    if (n < 0 || !l->file) {
        if (n >= 0)
            free(l->why);
        free(l->file);
        return -1;
    }
    l->kind = kind;
    l->removable = removable;
    l->file_bytes = host_bytes(r->dir, file);
    r->nleft++;
    return 0;
}

static bool regular(const char *dir, const char *name)
{
    CLEANUP_FREE char *p = cbt_strdup_printf("%s/%s", dir, name);
    struct stat st;
    return p && lstat(p, &st) == 0 && S_ISREG(st.st_mode);
}

/* A name of bfile's fallback temporary files: BASE.tmp-XXXXXX. */
static bool temp_name(const char *s)
{
    const char *t = strstr(s, ".tmp-");
    if (!t || t == s || strlen(t) != 11)
        return false;
    for (const char *c = t + 5; *c; c++)
        if (!((*c >= 'a' && *c <= 'z') || (*c >= '0' && *c <= '9')))
            return false;
    return true;
}

/* NAME.json files: points, or damage. */
static int read_manifests(struct repo *r, const struct names *ns,
                          struct cbt_error **errp)
{
    for (size_t i = 0; i < ns->n; i++) {
        const char *name = ns->v[i];
        if (!ends_with(name, ".json") || strlen(name) <= 5)
            continue;
        CLEANUP_FREE char *base = strndup(name, strlen(name) - 5);
        CLEANUP_FREE char *path = cbt_strdup_printf("%s/%s", r->dir, name);
        if (!base || !path)
            goto oom;
        struct manifest m;
        char sha[65];
        struct cbt_error *e = NULL;
        if (manifest_read(path, &m, sha, &e) < 0) {
            /* Ours when its image or hashes file is beside it. */
            bool ours = has(ns, base) || has_hashes(ns, base) ||
                        has_sfx(ns, base, ".part");
            int rr = 0;
            if (ours)
                rr = add_left(r, name, REPO_LEFT_BAD_MANIFEST, false, "%s",
                              cbt_error_message(e));
            cbt_error_free(e);
            if (rr < 0)
                goto oom;
            continue;
        }
        if (!m.complete || strcmp(m.image_file, base) != 0) {
            int rr = add_left(r, name, REPO_LEFT_BAD_MANIFEST, false,
                              !m.complete ? "%s: describes an incomplete "
                                            "backup%s"
                                          : "%s: describes the image '%s', "
                                            "not the file it is named after",
                              path, m.complete ? m.image_file : "");
            manifest_free(&m);
            if (rr < 0)
                goto oom;
            continue;
        }
        struct repo_point *v = realloc(r->points,
                                       (r->npoints + 1) * sizeof(*v));
        if (!v) {
            manifest_free(&m);
            goto oom;
        }
        r->points = v;
        struct repo_point *p = &v[r->npoints++];
        memset(p, 0, sizeof(*p));
        p->m = m;
        memcpy(p->sha, sha, sizeof(p->sha));
        p->parent = p->root = -1;
        if (repo_parse_time(m.created, &p->time) < 0)
            p->time = 0;
        if (!(p->file = strdup(base)))
            goto oom;
        p->file_bytes = host_bytes(r->dir, base) + host_bytes(r->dir, name) +
                        host_bytes(r->dir, m.hash_file);
    }
    return 0;
oom:
    cbt_error_set(errp, ENOMEM, "%s: out of memory", r->dir);
    return -1;
}

static bool is_point(const struct repo *r, const char *name)
{
    for (size_t i = 0; i < r->npoints; i++)
        if (strcmp(r->points[i].file, name) == 0 ||
            strcmp(r->points[i].m.hash_file, name) == 0)
            return true;
    return false;
}

/* The leftovers (see the top of the file). */
static int find_leftovers(struct repo *r, const struct names *ns,
                          bool pending)
{
    for (size_t i = 0; i < ns->n; i++) {
        const char *name = ns->v[i];
        size_t len = strlen(name);
        if (is_point(r, name) || !regular(r->dir, name))
            continue;
        CLEANUP_FREE char *base = NULL;
        int rr = 0;
        if (ends_with(name, ".part") && len > 5) {
            rr = add_left(r, name, REPO_LEFT_PART, true, "the work file of "
                          "an interrupted cbt backup or restore");
        } else if (hashes_suffix(name) && len > hashes_suffix(name)) {
            if (!(base = strndup(name, len - hashes_suffix(name))))
                return -1;
            if (has_sfx(ns, base, ".json"))
                continue; /* a damaged point's: not a leftover */
            if (has(ns, base) && regular(r->dir, base))
                rr = add_left(r, name, REPO_LEFT_NO_MANIFEST, true, "the "
                              "block hashes of %s, a backup interrupted "
                              "before its manifest was written", base);
            else if (has_sfx(ns, base, ".part"))
                rr = add_left(r, name, REPO_LEFT_ORPHAN_HASHES, true, "the "
                              "block hashes of an interrupted backup (its "
                              "work file %s.part is beside it)", base);
            else
                rr = add_left(r, name, REPO_LEFT_ORPHAN_HASHES, true,
                              "block hashes without their backup (no image, "
                              "no manifest)");
        } else if (ends_with(name, ".scratch") && len > 8) {
            rr = add_left(r, name, REPO_LEFT_SCRATCH, true, "the scratch file "
                          "of an interrupted live backup");
        } else if (temp_name(name)) {
            rr = add_left(r, name, REPO_LEFT_TEMP, true, "a file cbt was "
                          "writing (a manifest or block hashes) when it was "
                          "interrupted");
        } else if (ends_with(name, FOLDERTX_NEW_SUFFIX)) {
            if (pending)
                continue; /* the journal's: the replay renames it */
            rr = add_left(r, name, REPO_LEFT_PRUNE_NEW, true, "a %s a "
                          "prune wrote before it was interrupted (before its "
                          "journal: the prune did not happen)",
                          strstr(name, ".tree" FOLDERTX_NEW_SUFFIX)
                              ? "record file" : "manifest");
        } else if (!has_sfx(ns, name, ".json") && !ends_with(name, ".json") &&
                   has_hashes(ns, name)) {
            rr = add_left(r, name, REPO_LEFT_NO_MANIFEST, true, "the image of "
                          "a backup interrupted before its manifest was "
                          "written (%s.%s beside it, no %s.json)", name,
                          has_sfx(ns, name, ".tree") ? "tree" : "hashes",
                          name);
        }
        if (rr < 0)
            return -1;
    }
    return 0;
}

static int point_problem(struct repo_point *p, const char *fmt, ...)
    PRINTF_FMT(2, 3);
static int point_problem(struct repo_point *p, const char *fmt, ...)
{
    if (p->problem)
        return 0;
    va_list ap;
    va_start(ap, fmt);
    int n = vasprintf(&p->problem, fmt, ap);
    va_end(ap);
    if (n < 0) {
        p->problem = NULL;
        return -1;
    }
    return 0;
}

/* The cheap checks of one point's own files. */
static int check_files(const struct repo *r, struct repo_point *p)
{
    CLEANUP_FREE char *img = cbt_strdup_printf("%s/%s", r->dir, p->file);
    CLEANUP_FREE char *hp = cbt_strdup_printf("%s/%s", r->dir,
                                              p->m.hash_file);
    if (!img || !hp)
        return -1;
    struct stat st;
    if (lstat(img, &st) < 0)
        return point_problem(p, "its image %s: %s", p->file, strerror(errno));
    if (!S_ISREG(st.st_mode))
        return point_problem(p, "its image %s is not a regular file",
                             p->file);
    if (strcmp(p->m.image_format, "raw") == 0 &&
        (uint64_t)st.st_size != p->m.virtual_size)
        return point_problem(p, "its image %s is %" PRIu64 " bytes; its "
                             "manifest records %" PRIu64, p->file,
                             (uint64_t)st.st_size, p->m.virtual_size);
    if (lstat(hp, &st) < 0)
        return point_problem(p, "its block hashes %s: %s", p->m.hash_file,
                             strerror(errno));
    if (p->m.tree) {
        struct cbt_error *e = NULL;
        int rr = 0;
        if (tree_file_quick_check(hp, p->m.blocks, &e) < 0)
            rr = point_problem(p, "its block hashes %s: %s", p->m.hash_file,
                               cbt_error_message(e));
        cbt_error_free(e);
        return rr;
    }
    if (!S_ISREG(st.st_mode) || (uint64_t)st.st_size != p->m.blocks * 32)
        return point_problem(p, "its block hashes %s are not a file of %"
                             PRIu64 " bytes (32 for each of %" PRIu64
                             " blocks)", p->m.hash_file, p->m.blocks * 32,
                             p->m.blocks);
    return 0;
}

/* The link of point i to its parent. */
static int link_parent(struct repo *r, const struct names *ns, size_t i)
{
    struct repo_point *p = &r->points[i];
    const struct manifest *m = &p->m;
    if (!m->parent_file)
        return 0;
    for (size_t j = 0; j < r->npoints; j++) {
        struct repo_point *q = &r->points[j];
        if (j == i || strcmp(q->file, m->parent_file) != 0)
            continue;
        const struct manifest *pm = &q->m;
        if (strcasecmp(q->sha, m->parent_manifest_sha256) != 0)
            return point_problem(p, "its parent's manifest %s.json is not "
                                 "the one it recorded (SHA-256 %s, recorded "
                                 "%s)", q->file, q->sha,
                                 m->parent_manifest_sha256);
        if (strcasecmp(pm->disk_id, m->disk_id) != 0 ||
            strcmp(pm->image_format, m->image_format) != 0)
            return point_problem(p, "its parent %s is a backup of another "
                                 "disk or format", q->file);
        if (!pm->checkpoint || !m->since ||
            strcmp(pm->checkpoint, m->since) != 0 ||
            pm->checkpoint_order >= m->checkpoint_order)
            return point_problem(p, "it starts from checkpoint '%s', but its "
                                 "parent %s created '%s'", m->since,
                                 q->file, pm->checkpoint ? pm->checkpoint
                                                         : "(none)");
        p->parent = (int)j;
        q->nchildren++;
        return 0;
    }
    if (has(ns, m->parent_file))
        return point_problem(p, "its parent %s has no valid manifest",
                             m->parent_file);
    return point_problem(p, "its parent %s is missing (deleted?)",
                         m->parent_file);
}

static int cmp_points(const void *a, const void *b)
{
    const struct repo_point *x = a, *y = b;
    if (x->time != y->time)
        return x->time < y->time ? -1 : 1;
    int c = strcmp(x->m.created, y->m.created);
    if (c)
        return c;
    if (x->m.checkpoint_order != y->m.checkpoint_order)
        return x->m.checkpoint_order < y->m.checkpoint_order ? -1 : 1;
    return strcmp(x->file, y->file);
}

int repo_open(const char *dir, struct repo *r, struct cbt_error **errp)
{
    memset(r, 0, sizeof(*r));
    struct names ns;
    if (!(r->dir = strdup(dir))) {
        cbt_error_set(errp, ENOMEM, "%s: out of memory", dir);
        return -1;
    }
    if (read_names(dir, &ns, errp) < 0) {
        repo_close(r);
        return -1;
    }
    int ret = -1;
    if (read_manifests(r, &ns, errp) < 0)
        goto out;
    if (r->npoints)
        qsort(r->points, r->npoints, sizeof(*r->points), cmp_points);
    if (find_leftovers(r, &ns, foldertx_pending(dir)) < 0)
        goto oom;
    for (size_t i = 0; i < r->npoints; i++)
        if (check_files(r, &r->points[i]) < 0 || link_parent(r, &ns, i) < 0)
            goto oom;
    /* Each point's root, and the problems of the points above a broken
     * one.  Walking at most npoints links rules out loops. */
    for (size_t i = 0; i < r->npoints; i++) {
        struct repo_point *p = &r->points[i];
        int k = (int)i;
        size_t steps = 0;
        const char *broken = NULL;
        while (r->points[k].parent >= 0 && steps++ < r->npoints) {
            k = r->points[k].parent;
            if (!broken && r->points[k].problem)
                broken = r->points[k].file;
        }
        const struct repo_point *top = &r->points[k];
        if (top->parent < 0 && top->m.kind == CBT_BACKUP_FULL &&
            steps <= r->npoints)
            p->root = k;
        if (broken && point_problem(p, "its chain is broken at %s",
                                    broken) < 0)
            goto oom;
        if (p->root < 0 && point_problem(p, "its chain does not reach a "
                                         "full backup") < 0)
            goto oom;
    }
    for (size_t i = 0; i < r->npoints; i++)
        r->nproblems += r->points[i].problem != NULL;
    if (read_verified(r) < 0)
        goto oom;
    ret = 0;
    goto out;
oom:
    cbt_error_set(errp, ENOMEM, "%s: out of memory", dir);
out:
    names_free(&ns);
    if (ret < 0)
        repo_close(r);
    return ret;
}

int repo_open_to_change(const char *dir, bool dry_run, struct repo *r,
                        int *lock, struct cbt_error **errp)
{
    *lock = -1;
    if (!dry_run) {
        if ((*lock = foldertx_lock(dir, errp)) < 0)
            return -1;
        if (foldertx_recover_locked(dir, errp) < 0)
            goto fail;
    } else if (foldertx_recover(dir, errp) < 0) {
        return -1;
    }
    if (repo_open(dir, r, errp) < 0)
        goto fail;
    return 0;
fail:
    if (*lock >= 0)
        close(*lock);
    *lock = -1;
    return -1;
}

void repo_close_unlock(struct repo *r, int lock)
{
    repo_close(r);
    if (lock >= 0)
        close(lock);
}

void repo_close(struct repo *r)
{
    if (!r)
        return;
    for (size_t i = 0; i < r->npoints; i++) {
        manifest_free(&r->points[i].m);
        free(r->points[i].file);
        free(r->points[i].problem);
        free(r->points[i].verified);
    }
    free(r->points);
    for (size_t i = 0; i < r->nleft; i++) {
        free(r->left[i].file);
        free(r->left[i].why);
    }
    free(r->left);
    free(r->dir);
    memset(r, 0, sizeof(*r));
}
