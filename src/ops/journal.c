/*
 * The live journal (journal.h): one JSON file per image in cbt's state
 * folder,
 *
 *   {"version": 1, "image": "/abs/path/disk.qcow2", "disk-id": "uuid",
 *    "records": [
 *      {"op": "created", "name": "c5", "order": 5, "parent": "c4",
 *       "created-sec": 1765000000, "created-nsec": 12, "virtual-size": N,
 *       "granularity": 65536},
 *      {"op": "deleted", "name": "c2"} ]}
 *
 * written as a new file and renamed over the old one (so a reader sees
 * the old or the new journal, never half of one), with the file and the
 * folder synced.  It is cbt's own file, but it is parsed like anything
 * else read from disk: bounded in size and count, every field checked.
 */
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <limits.h>
#include <stdio.h>
#include <sys/stat.h>

#include <jansson.h>

#include "journal.h"

static int state_dir(char **out, struct cbt_error **errp)
{
    const char *env = getenv("CBT_STATE_DIR");
    int r;
    if (env && *env)
        r = asprintf(out, "%s", env);
    else if (geteuid() == 0)
        r = asprintf(out, "/var/lib/cbt");
    else if ((env = getenv("XDG_STATE_HOME")) && *env)
        r = asprintf(out, "%s/cbt", env);
    else if ((env = getenv("HOME")) && *env)
        r = asprintf(out, "%s/.local/state/cbt", env);
    else {
        *out = NULL; /* no state folder: no journal (journal_load) */
        return 0;
    }
    if (r < 0) {
        *out = NULL;
        cbt_error_set(errp, ENOMEM, "out of memory");
        return -1;
    }
    return 0;
}

/* mkdir -p for the state folder (0700: the journal names images). */
static int make_dirs(char *path, struct cbt_error **errp)
{
    for (char *p = path + 1;; p++) {
        if (*p != '/' && *p != '\0')
            continue;
        char c = *p;
        *p = '\0';
        int r = mkdir(path, 0700);
        int e = errno;
        *p = c;
        if (r < 0 && e != EEXIST) {
            cbt_error_set(errp, e, "%s: cannot create cbt's state folder: %s",
                          path, strerror(e));
            return -1;
        }
        if (c == '\0')
            return 0;
    }
}

static int journal_path(const char *image, char **path, char **real,
                        struct cbt_error **errp)
{
    *path = *real = NULL;
    *real = realpath(image, NULL);
    if (!*real) {
        cbt_error_set(errp, errno, "%s: %s", image, strerror(errno));
        return -1;
    }
    uint8_t d[32];
    char hex[65];
    sha256_digest(*real, strlen(*real), d);
    sha256_hex(d, hex);
    hex[32] = '\0';
    char *dir = NULL;
    if (state_dir(&dir, errp) < 0)
        return -1;
    if (!dir)
        return 0; /* no state folder: *path stays NULL */
    int r = asprintf(path, "%s/live/%s.json", dir, hex);
    free(dir);
    if (r < 0) {
        *path = NULL;
        cbt_error_set(errp, ENOMEM, "out of memory");
        return -1;
    }
    return 0;
}

static void rec_free(struct journal_rec *r)
{
    free(r->name);
    free(r->parent);
}

void journal_free(struct journal *j)
{
    for (size_t i = 0; i < j->n; i++)
        rec_free(&j->v[i]);
    free(j->v);
    free(j->path);
    free(j->image);
    memset(j, 0, sizeof(*j));
}

static char *copy(const char *s, bool *oom)
{
    if (!s)
        return NULL;
    char *c = strdup(s);
    if (!c)
        *oom = true;
    return c;
}

int journal_add(struct journal *j, const struct journal_rec *r,
                struct cbt_error **errp)
{
    if (j->n >= JOURNAL_MAX_RECORDS) {
        cbt_error_set(errp, E2BIG, "%s: the live journal is full (%u "
                      "records): shut the VM down cleanly so cbt can fold it "
                      "into the image", j->path ? j->path : "journal",
                      JOURNAL_MAX_RECORDS);
        return -1;
    }
    struct journal_rec *nv = realloc(j->v, (j->n + 1) * sizeof(*nv));
    if (!nv) {
        cbt_error_set(errp, ENOMEM, "out of memory");
        return -1;
    }
    j->v = nv;
    bool oom = false;
    struct journal_rec c = *r;
    c.name = copy(r->name, &oom);
    c.parent = copy(r->parent, &oom);
    if (oom || !c.name) {
        rec_free(&c);
        cbt_error_set(errp, ENOMEM, "out of memory");
        return -1;
    }
    j->v[j->n++] = c;
    return 0;
}

const struct journal_rec *journal_find(const struct journal *j,
                                       const char *name)
{
    for (size_t i = j->n; i-- > 0;) {
        if (strcmp(j->v[i].name, name) != 0 || j->v[i].op == JOURNAL_PENDING)
            continue;
        return j->v[i].op == JOURNAL_CREATED ? &j->v[i] : NULL;
    }
    return NULL;
}

int journal_name_pid(const char *name)
{
    int pid = 0, n = 0;
    if (!name || sscanf(name, "cbt-%d-%n", &pid, &n) != 1 || n == 0)
        return 0;
    return pid > 0 ? pid : 0;
}

bool journal_pid_is_cbt(int pid)
{
    char path[64], comm[32] = "";
    snprintf(path, sizeof(path), "/proc/%d/comm", pid);
    FILE *f = fopen(path, "re");
    if (!f)
        return kill(pid, 0) == 0 || errno == EPERM;
    if (!fgets(comm, sizeof(comm), f))
        comm[0] = '\0';
    fclose(f);
    comm[strcspn(comm, "\n")] = '\0';
    return strcmp(comm, "cbt") == 0;
}

bool journal_stale_pending(const struct journal *j, size_t i)
{
    const struct journal_rec *p = &j->v[i];
    if (p->op != JOURNAL_PENDING)
        return false;
    for (size_t k = i + 1; k < j->n; k++)
        if (j->v[k].op != JOURNAL_PENDING && strcmp(j->v[k].name, p->name) == 0)
            return false;
    return p->pid != (int)getpid() && !journal_pid_is_cbt(p->pid);
}

/* ---- parsing ---- */

static bool get_u64(json_t *o, const char *k, uint64_t *out)
{
    json_t *v = json_object_get(o, k);
    if (!json_is_integer(v) || json_integer_value(v) < 0)
        return false;
    *out = (uint64_t)json_integer_value(v);
    return true;
}

static bool valid_name(const char *s)
{
    size_t n = strlen(s);
    return n >= 1 && n <= 1023;
}

int journal_parse(const char *buf, size_t len, const char *what,
                  struct journal *j, struct cbt_error **errp)
{
    json_error_t jerr;
    json_t *doc = json_loadb(buf, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!doc) {
        cbt_error_set(errp, EINVAL, "%s: not a cbt live journal: %s (line "
                      "%d)", what, jerr.text, jerr.line);
        return -1;
    }
    int ret = -1;
    json_t *recs = json_object_get(doc, "records");
    json_t *ver = json_object_get(doc, "version");
    const char *image = json_string_value(json_object_get(doc, "image"));
    const char *id = json_string_value(json_object_get(doc, "disk-id"));
    if (!json_is_integer(ver) || json_integer_value(ver) != 1) {
        cbt_error_set(errp, EINVAL, "%s: field 'version': expected 1", what);
        goto out;
    }
    if (!image || !*image || !json_is_array(recs)) {
        cbt_error_set(errp, EINVAL, "%s: field '%s': missing or of the "
                      "wrong type", what, !image || !*image ? "image"
                                                            : "records");
        goto out;
    }
    if (id && strlen(id) != 36) {
        cbt_error_set(errp, EINVAL, "%s: field 'disk-id': expected a UUID",
                      what);
        goto out;
    }
    if (json_array_size(recs) > JOURNAL_MAX_RECORDS) {
        cbt_error_set(errp, E2BIG, "%s: more than %u records", what,
                      JOURNAL_MAX_RECORDS);
        goto out;
    }
    bool oom = false;
    j->image = copy(image, &oom);
    snprintf(j->disk_id, sizeof(j->disk_id), "%s", id ? id : "");
    size_t i;
    json_t *r;
    json_array_foreach(recs, i, r) {
        struct journal_rec rec = {0};
        const char *op = json_string_value(json_object_get(r, "op"));
        const char *name = json_string_value(json_object_get(r, "name"));
        const char *parent = json_string_value(json_object_get(r, "parent"));
        uint64_t nsec = 0, order = 0, size = 0, gran = 0;
        json_t *sec = json_object_get(r, "created-sec");
        if (!op || !name || !valid_name(name)) {
            cbt_error_set(errp, EINVAL, "%s: record %zu: field '%s' missing "
                          "or invalid", what, i, !op ? "op" : "name");
            goto out;
        }
        if (strcmp(op, "deleted") == 0) {
            rec.op = JOURNAL_DELETED;
        } else if (strcmp(op, "pending") == 0) {
            uint64_t pid = 0;
            if (!get_u64(r, "pid", &pid) || pid == 0 || pid > INT32_MAX) {
                cbt_error_set(errp, EINVAL, "%s: record %zu ('%s'): field "
                              "'pid': expected a process id", what, i, name);
                goto out;
            }
            rec.op = JOURNAL_PENDING;
            rec.pid = (int)pid;
        } else if (strcmp(op, "created") == 0) {
            rec.op = JOURNAL_CREATED;
            if (!get_u64(r, "order", &order) || order == 0 ||
                !json_is_integer(sec) || !get_u64(r, "created-nsec", &nsec) ||
                nsec >= 1000000000u || !get_u64(r, "virtual-size", &size) ||
                !get_u64(r, "granularity", &gran) || !IS_POW2(gran) ||
                gran < 512 || gran > (2ull << 30) ||
                (parent && !valid_name(parent))) {
                cbt_error_set(errp, EINVAL, "%s: record %zu ('%s'): a field "
                              "is missing or out of range (order, created-"
                              "sec, created-nsec, virtual-size, granularity, "
                              "parent)", what, i, name);
                goto out;
            }
            rec.created_sec = (int64_t)json_integer_value(sec);
        } else {
            cbt_error_set(errp, EINVAL, "%s: record %zu: field 'op': "
                          "expected 'created', 'deleted' or 'pending'", what,
                          i);
            goto out;
        }
        rec.name = (char *)name;
        rec.parent = rec.op == JOURNAL_CREATED ? (char *)parent : NULL;
        rec.order = order;
        rec.created_nsec = (uint32_t)nsec;
        rec.virtual_size = size;
        rec.granularity = gran;
        if (journal_add(j, &rec, errp) < 0)
            goto out;
    }
    if (oom) {
        cbt_error_set(errp, ENOMEM, "out of memory");
        goto out;
    }
    ret = 0;
out:
    json_decref(doc);
    return ret;
}

int journal_load(const char *image, struct journal *j, struct cbt_error **errp)
{
    memset(j, 0, sizeof(*j));
    char *real = NULL;
    if (journal_path(image, &j->path, &real, errp) < 0) {
        free(real);
        journal_free(j);
        return -1;
    }
    int fd = j->path ? open(j->path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW |
                                         O_NONBLOCK)
                     : -1;
    if (!j->path || (fd < 0 && errno == ENOENT)) {
        j->image = real;
        return 0;
    }
    struct stat st;
    int ret = -1;
    char *buf = NULL;
    if (fd < 0 || fstat(fd, &st) < 0) {
        cbt_error_set(errp, errno, "%s: %s", j->path, strerror(errno));
    } else if (!S_ISREG(st.st_mode) || st.st_size > JOURNAL_MAX_BYTES) {
        cbt_error_set(errp, EINVAL, "%s: not a regular file of at most %u "
                      "bytes", j->path, JOURNAL_MAX_BYTES);
    } else if (!(buf = malloc((size_t)st.st_size + 1))) {
        cbt_error_set(errp, ENOMEM, "out of memory");
    } else {
        int r = file_pread_exact(fd, buf, (size_t)st.st_size, 0);
        if (r < 0)
            cbt_error_set(errp, -r, "%s: %s", j->path, strerror(-r));
        else
            ret = journal_parse(buf, (size_t)st.st_size, j->path, j, errp);
    }
    if (ret == 0 && strcmp(j->image, real) != 0) {
        cbt_error_set(errp, EINVAL, "%s: the journal is for %s, not %s",
                      j->path, j->image, real);
        ret = -1;
    }
    if (fd >= 0)
        close(fd);
    free(buf);
    free(real);
    if (ret < 0)
        journal_free(j);
    return ret;
}

/* ---- writing ---- */

static json_t *to_json(const struct journal *j)
{
    json_t *recs = json_array();
    for (size_t i = 0; i < j->n; i++) {
        const struct journal_rec *r = &j->v[i];
        json_t *o;
        if (r->op == JOURNAL_DELETED)
            o = json_pack("{s:s, s:s}", "op", "deleted", "name", r->name);
        else if (r->op == JOURNAL_PENDING)
            o = json_pack("{s:s, s:s, s:i}", "op", "pending", "name", r->name,
                          "pid", r->pid);
        else
            o = json_pack("{s:s, s:s, s:I, s:o, s:I, s:I, s:I, s:I}", "op",
                          "created", "name", r->name, "order",
                          (json_int_t)r->order, "parent",
                          r->parent ? json_string(r->parent) : json_null(),
                          "created-sec", (json_int_t)r->created_sec,
                          "created-nsec", (json_int_t)r->created_nsec,
                          "virtual-size", (json_int_t)r->virtual_size,
                          "granularity", (json_int_t)r->granularity);
        json_array_append_new(recs, o);
    }
    return json_pack("{s:i, s:s, s:o, s:o}", "version", 1, "image", j->image,
                     "disk-id",
                     j->disk_id[0] ? json_string(j->disk_id) : json_null(),
                     "records", recs);
}

int journal_save(struct journal *j, struct cbt_error **errp)
{
    if (!j->path) {
        cbt_error_set(errp, ENOENT, "no folder for cbt's state (no HOME): "
                      "set CBT_STATE_DIR");
        return -1;
    }
    if (j->n == 0 && !j->disk_id[0])
        return journal_remove(j, errp);
    char *dir = strdup(j->path);
    char *slash = dir ? strrchr(dir, '/') : NULL;
    if (!slash) {
        free(dir);
        cbt_error_set(errp, ENOMEM, "out of memory");
        return -1;
    }
    *slash = '\0';
    int ret = -1;
    char *tmp = NULL;
    json_t *doc = to_json(j);
    char *text = doc ? json_dumps(doc, JSON_INDENT(1)) : NULL;
    json_decref(doc);
    if (!text || asprintf(&tmp, "%s.tmp.%d", j->path, (int)getpid()) < 0) {
        tmp = NULL;
        cbt_error_set(errp, ENOMEM, "out of memory");
        goto out;
    }
    if (make_dirs(dir, errp) < 0)
        goto out;
    int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC,
                  0600);
    if (fd < 0) {
        cbt_error_set(errp, errno, "%s: %s", tmp, strerror(errno));
        goto out;
    }
    int r = file_pwrite_full(fd, text, strlen(text), 0);
    if (r == 0)
        r = file_flush(fd);
    close(fd);
    if (r == 0 && rename(tmp, j->path) < 0)
        r = -errno;
    if (r < 0) {
        unlink(tmp);
        cbt_error_set(errp, -r, "%s: cannot write the live journal: %s",
                      j->path, strerror(-r));
        goto out;
    }
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
        (void)fsync(dfd);
        close(dfd);
    }
    ret = 0;
out:
    free(text);
    free(tmp);
    free(dir);
    return ret;
}

int journal_remove(struct journal *j, struct cbt_error **errp)
{
    if (j->path && unlink(j->path) < 0 && errno != ENOENT) {
        cbt_error_set(errp, errno, "%s: %s", j->path, strerror(errno));
        return -1;
    }
    return 0;
}
