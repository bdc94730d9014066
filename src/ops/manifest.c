/*
 * Backup manifests (TARGET.json): parsing, validation, writing and finding
 * them in a backup folder.  The layout is docs/backups.md.
 *
 * A manifest is untrusted input: restore and verify follow its names to
 * other files and size their work by its numbers.  So the parser checks
 * every field's JSON type and range, refuses duplicate keys, and checks
 * the cross-field rules (a full backup has no parent, blocks matches the
 * virtual size, extents are sorted and inside the disk, file names are
 * plain names in the manifest's own folder: never a path that leads out of
 * it).  Unknown keys are ignored, so a later minor addition does not make
 * old readers refuse; a change of meaning bumps "version".
 */
#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <strings.h>
#include <sys/stat.h>

#include <jansson.h>

#include "../util/util.h"
#include "manifest.h"

/* Largest manifest read: a raw target's extents list is the only part that
 * grows with the disk (about 40 bytes an extent). */
#define MANIFEST_MAX_BYTES (256u << 20)
/* The largest virtual size accepted (QEMU's limit for any image). */
#define MANIFEST_MAX_SIZE ((uint64_t)INT64_MAX)
/* Checkpoint names: CBT_CHECKPOINT_NAME_MAX is in cbt/checkpoint.h; the
 * manifest does not need more. */
#define MANIFEST_NAME_MAX 1023
#define MANIFEST_TEXT_MAX 4096 /* tool, created, disk path */

/* ---- parsing helpers: each sets *errp naming the key ---- */

struct pctx {
    const char *what;
    struct cbt_error **errp;
};

static int bad(struct pctx *p, const char *key, const char *why)
{
    cbt_error_set(p->errp, EINVAL, "%s: manifest field '%s' %s", p->what,
                  key, why);
    return -1;
}

static json_t *get(struct pctx *p, json_t *obj, const char *key)
{
    json_t *v = json_object_get(obj, key);
    if (!v)
        bad(p, key, "is missing");
    return v;
}

static int get_obj(struct pctx *p, json_t *obj, const char *key, json_t **out)
{
    json_t *v = get(p, obj, key);
    if (!v)
        return -1;
    if (!json_is_object(v))
        return bad(p, key, "is not an object");
    *out = v;
    return 0;
}

/* A string of 1..max bytes without NUL; malloc'd copy in *out. */
static int get_str(struct pctx *p, json_t *obj, const char *key, size_t max,
                   char **out)
{
    json_t *v = get(p, obj, key);
    if (!v)
        return -1;
    if (!json_is_string(v))
        return bad(p, key, "is not a string");
    size_t len = json_string_length(v);
    const char *s = json_string_value(v);
    if (len == 0)
        return bad(p, key, "is empty");
    if (len > max)
        return bad(p, key, "is too long");
    if (memchr(s, '\0', len))
        return bad(p, key, "contains a NUL character");
    *out = strdup(s);
    if (!*out) {
        cbt_error_set(p->errp, ENOMEM, "%s: out of memory", p->what);
        return -1;
    }
    return 0;
}

static int get_u64(struct pctx *p, json_t *obj, const char *key, uint64_t max,
                   uint64_t *out)
{
    json_t *v = get(p, obj, key);
    if (!v)
        return -1;
    if (!json_is_integer(v))
        return bad(p, key, "is not an integer");
    json_int_t i = json_integer_value(v);
    if (i < 0)
        return bad(p, key, "is negative");
    if ((uint64_t)i > max)
        return bad(p, key, "is too large");
    *out = (uint64_t)i;
    return 0;
}

static bool is_hex64(const char *s, size_t len)
{
    if (len != 64)
        return false;
    for (size_t i = 0; i < 64; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
            return false;
    return true;
}

static int get_hex64(struct pctx *p, json_t *obj, const char *key,
                     char out[65])
{
    json_t *v = get(p, obj, key);
    if (!v)
        return -1;
    if (!json_is_string(v) ||
        !is_hex64(json_string_value(v), json_string_length(v)))
        return bad(p, key, "is not a SHA-256 digest (64 lower-case hex digits)");
    memcpy(out, json_string_value(v), 65);
    return 0;
}

static bool is_uuid(const char *s, size_t len)
{
    if (len != 36)
        return false;
    for (size_t i = 0; i < 36; i++) {
        bool dash = i == 8 || i == 13 || i == 18 || i == 23;
        char c = s[i];
        if (dash ? c != '-'
                 : !((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') ||
                     (c >= 'A' && c <= 'F')))
            return false;
    }
    return true;
}

/* A plain file name in the manifest's folder: no '/', not "." or "..". */
static bool is_plain_name(const char *s)
{
    return s[0] && !strchr(s, '/') && strcmp(s, ".") != 0 &&
           strcmp(s, "..") != 0;
}

static int get_name(struct pctx *p, json_t *obj, const char *key, char **out)
{
    if (get_str(p, obj, key, NAME_MAX, out) < 0)
        return -1;
    if (!is_plain_name(*out))
        return bad(p, key, "is not a plain file name in the backup's folder");
    return 0;
}

static int parse_extents(struct pctx *p, json_t *arr, struct manifest *m)
{
    size_t n = json_array_size(arr);
    if (n == 0)
        return 0;
    m->extents = calloc(n, sizeof(*m->extents));
    if (!m->extents) {
        cbt_error_set(p->errp, ENOMEM, "%s: out of memory", p->what);
        return -1;
    }
    uint64_t prev_end = 0;
    for (size_t i = 0; i < n; i++) {
        json_t *e = json_array_get(arr, i);
        if (!json_is_array(e) || json_array_size(e) != 3)
            return bad(p, "extents",
                       "has an entry that is not [start, length, type]");
        json_t *js = json_array_get(e, 0), *jl = json_array_get(e, 1);
        json_t *jt = json_array_get(e, 2);
        if (!json_is_integer(js) || !json_is_integer(jl) ||
            json_integer_value(js) < 0 || json_integer_value(jl) <= 0)
            return bad(p, "extents",
                       "has an entry whose start or length is not a "
                       "non-negative integer (length > 0)");
        uint64_t start = (uint64_t)json_integer_value(js);
        uint64_t len = (uint64_t)json_integer_value(jl), end;
        if (add_overflow_u64(start, len, &end) || end > m->virtual_size)
            return bad(p, "extents", "has an entry past the virtual size");
        if (start < prev_end)
            return bad(p, "extents", "is not sorted or has overlapping entries");
        const char *t = json_string_value(jt);
        bool zero;
        if (t && strcmp(t, "zero") == 0)
            zero = true;
        else if (t && strcmp(t, "data") == 0)
            zero = false;
        else
            return bad(p, "extents", "has an entry whose type is not "
                                     "\"data\" or \"zero\"");
        m->extents[i] = (struct manifest_extent){start, len, zero};
        m->nextents = i + 1;
        prev_end = end;
    }
    return 0;
}

static int parse_root(struct pctx *p, json_t *root, struct manifest *m)
{
    json_t *v, *o;

    if (!json_is_object(root))
        return bad(p, "(top level)", "is not a JSON object");

    if (!(v = get(p, root, "format")))
        return -1;
    if (!json_is_string(v) || strcmp(json_string_value(v), "cbt-backup") != 0)
        return bad(p, "format", "is not \"cbt-backup\"");
    if (!(v = get(p, root, "version")))
        return -1;
    if (!json_is_integer(v))
        return bad(p, "version", "is not an integer");
    if (json_integer_value(v) != MANIFEST_VERSION) {
        cbt_error_set(p->errp, ENOTSUP,
                      "%s: manifest version %lld is not supported (this cbt "
                      "reads version %d)",
                      p->what, (long long)json_integer_value(v),
                      MANIFEST_VERSION);
        return -1;
    }
    if (!(v = get(p, root, "complete")))
        return -1;
    if (!json_is_boolean(v))
        return bad(p, "complete", "is not true or false");
    m->complete = json_is_true(v);
    if (get_str(p, root, "tool", MANIFEST_TEXT_MAX, &m->tool) < 0 ||
        get_str(p, root, "created", MANIFEST_TEXT_MAX, &m->created) < 0)
        return -1;

    if (get_obj(p, root, "disk", &o) < 0 ||
        get_str(p, o, "path", MANIFEST_TEXT_MAX, &m->disk_path) < 0 ||
        get_str(p, o, "id", 36, &m->disk_id) < 0)
        return -1;
    if (!is_uuid(m->disk_id, strlen(m->disk_id)))
        return bad(p, "id", "is not a UUID");

    if (!(v = get(p, root, "kind")))
        return -1;
    const char *kind = json_string_value(v);
    if (kind && strcmp(kind, "full") == 0)
        m->kind = CBT_BACKUP_FULL;
    else if (kind && strcmp(kind, "incremental") == 0)
        m->kind = CBT_BACKUP_INCREMENTAL;
    else if (kind && strcmp(kind, "differential") == 0)
        m->kind = CBT_BACKUP_DIFFERENTIAL;
    else
        return bad(p, "kind",
                   "is not \"full\", \"incremental\" or \"differential\"");

    if (get_obj(p, root, "checkpoint", &o) < 0 ||
        get_str(p, o, "name", MANIFEST_NAME_MAX, &m->checkpoint) < 0 ||
        get_u64(p, o, "order", (uint64_t)INT64_MAX, &m->checkpoint_order) < 0 ||
        get_str(p, o, "created", MANIFEST_TEXT_MAX, &m->checkpoint_created) < 0)
        return -1;
    if (m->checkpoint_order == 0)
        return bad(p, "order", "is 0 (checkpoint orders start at 1)");

    if (!(v = get(p, root, "since")))
        return -1;
    if (!json_is_null(v) &&
        get_str(p, root, "since", MANIFEST_NAME_MAX, &m->since) < 0)
        return -1;

    if (!(v = get(p, root, "parent")))
        return -1;
    if (!json_is_null(v)) {
        if (!json_is_object(v))
            return bad(p, "parent", "is neither null nor an object");
        if (get_name(p, v, "file", &m->parent_file) < 0 ||
            get_hex64(p, v, "manifest-sha256", m->parent_manifest_sha256) < 0)
            return -1;
    }
    if (m->kind == CBT_BACKUP_FULL && (m->since || m->parent_file))
        return bad(p, "kind", "is \"full\" but since or parent is set");
    if (m->kind != CBT_BACKUP_FULL && (!m->since || !m->parent_file))
        return bad(p, "kind", "is an incremental or differential but since "
                              "or parent is null");

    if (get_obj(p, root, "image", &o) < 0 ||
        get_name(p, o, "file", &m->image_file) < 0 ||
        get_str(p, o, "format", 8, &m->image_format) < 0 ||
        get_u64(p, o, "virtual-size", MANIFEST_MAX_SIZE, &m->virtual_size) < 0)
        return -1;
    bool raw = strcmp(m->image_format, "raw") == 0;
    if (!raw && strcmp(m->image_format, "qcow2") != 0)
        return bad(p, "format", "is not \"qcow2\" or \"raw\"");
    if (m->parent_file && strcmp(m->parent_file, m->image_file) == 0)
        return bad(p, "parent", "names the backup itself");

    if (get_obj(p, root, "bytes", &o) < 0 ||
        get_u64(p, o, "dirty", MANIFEST_MAX_SIZE, &m->dirty) < 0 ||
        get_u64(p, o, "copied", m->virtual_size, &m->copied) < 0 ||
        get_u64(p, o, "zeroed", m->virtual_size, &m->zeroed) < 0)
        return -1;

    if (!(v = get(p, root, "extents")))
        return -1;
    if (raw) {
        if (!json_is_array(v))
            return bad(p, "extents", "is not an array (a raw backup must "
                                     "list the ranges it carries)");
        m->has_extents = true;
        if (parse_extents(p, v, m) < 0)
            return -1;
    } else if (!json_is_null(v)) {
        return bad(p, "extents", "is not null for a qcow2 backup");
    }

    if (get_obj(p, root, "hash", &o) < 0)
        return -1;
    if (!(v = get(p, o, "algorithm")))
        return -1;
    if (!json_is_string(v) ||
        strcmp(json_string_value(v), BLOCKHASH_ALGORITHM) != 0)
        return bad(p, "algorithm", "is not \"" BLOCKHASH_ALGORITHM "\"");
    if (get_u64(p, o, "block-size", UINT32_MAX, &m->block_size) < 0)
        return -1;
    if (m->block_size != BLOCKHASH_BLOCK)
        return bad(p, "block-size", "is not 65536");
    if (get_u64(p, o, "blocks", MANIFEST_MAX_SIZE, &m->blocks) < 0)
        return -1;
    if (m->blocks != DIV_ROUND_UP(m->virtual_size, (uint64_t)BLOCKHASH_BLOCK))
        return bad(p, "blocks", "does not match the virtual size");
    if (get_name(p, o, "file", &m->hash_file) < 0 ||
        get_hex64(p, o, "file-sha256", m->hash_file_sha256) < 0 ||
        get_hex64(p, o, "root", m->root) < 0)
        return -1;
    return 0;
}

int manifest_parse(const char *buf, size_t len, const char *what,
                   struct manifest *m, struct cbt_error **errp)
{
    memset(m, 0, sizeof(*m));
    json_error_t jerr;
    json_t *root = json_loadb(buf, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) {
        cbt_error_set(errp, EINVAL, "%s: not a valid manifest: %s (line %d)",
                      what, jerr.text, jerr.line);
        return -1;
    }
    struct pctx p = {what, errp};
    int ret = parse_root(&p, root, m);
    json_decref(root);
    if (ret < 0)
        manifest_free(m);
    return ret;
}

/* Read a whole small file (at most max bytes) into a malloc'd buffer. */
static int read_file(const char *path, size_t max, char **out, size_t *outlen,
                     struct cbt_error **errp)
{
    CLEANUP_CLOSE int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        cbt_error_set(errp, errno, "%s: %s", path, strerror(errno));
        return -1;
    }
    struct stat st;
    if (fstat(fd, &st) < 0) {
        cbt_error_set(errp, errno, "%s: %s", path, strerror(errno));
        return -1;
    }
    if (!S_ISREG(st.st_mode)) {
        cbt_error_set(errp, EINVAL, "%s: not a regular file", path);
        return -1;
    }
    if ((uint64_t)st.st_size > max) {
        cbt_error_set(errp, EFBIG, "%s: too large for a manifest (%lld bytes)",
                      path, (long long)st.st_size);
        return -1;
    }
    size_t len = (size_t)st.st_size;
    char *buf = malloc(len + 1);
    if (!buf) {
        cbt_error_set(errp, ENOMEM, "%s: out of memory", path);
        return -1;
    }
    int r = file_pread_exact(fd, buf, len, 0);
    if (r < 0) {
        free(buf);
        cbt_error_set(errp, -r, "%s: read failed: %s", path, strerror(-r));
        return -1;
    }
    buf[len] = '\0';
    *out = buf;
    *outlen = len;
    return 0;
}

int manifest_read(const char *path, struct manifest *m,
                  struct cbt_error **errp)
{
    memset(m, 0, sizeof(*m));
    char *buf;
    size_t len;
    if (read_file(path, MANIFEST_MAX_BYTES, &buf, &len, errp) < 0)
        return -1;
    int ret = manifest_parse(buf, len, path, m, errp);
    free(buf);
    return ret;
}

/* ---- writing ---- */

const char *cbt_backup_mode_name(enum cbt_backup_mode k)
{
    switch (k) {
    case CBT_BACKUP_FULL:
        return "full";
    case CBT_BACKUP_INCREMENTAL:
        return "incremental";
    case CBT_BACKUP_DIFFERENTIAL:
        return "differential";
    }
    return "full";
}

/* Set obj[key] = v, taking v's reference; false on failure (v NULL too). */
static bool put(json_t *obj, const char *key, json_t *v)
{
    return v && json_object_set_new(obj, key, v) == 0;
}

static json_t *jint(uint64_t v)
{
    return v > (uint64_t)INT64_MAX ? NULL : json_integer((json_int_t)v);
}

static json_t *jstr_or_null(const char *s)
{
    return s ? json_string(s) : json_null();
}

static json_t *build(const struct manifest *m)
{
    json_t *root = json_object();
    json_t *disk = json_object(), *ck = json_object(), *img = json_object();
    json_t *bytes = json_object(), *hash = json_object();
    json_t *parent = m->parent_file ? json_object() : json_null();
    json_t *ext = m->has_extents ? json_array() : json_null();
    bool ok = root && disk && ck && img && bytes && hash && parent && ext;

    ok = ok && put(disk, "path", json_string(m->disk_path)) &&
         put(disk, "id", json_string(m->disk_id));
    ok = ok && put(ck, "name", json_string(m->checkpoint)) &&
         put(ck, "order", jint(m->checkpoint_order)) &&
         put(ck, "created", json_string(m->checkpoint_created));
    if (ok && m->parent_file)
        ok = put(parent, "file", json_string(m->parent_file)) &&
             put(parent, "manifest-sha256",
                 json_string(m->parent_manifest_sha256));
    ok = ok && put(img, "file", json_string(m->image_file)) &&
         put(img, "format", json_string(m->image_format)) &&
         put(img, "virtual-size", jint(m->virtual_size));
    ok = ok && put(bytes, "dirty", jint(m->dirty)) &&
         put(bytes, "copied", jint(m->copied)) &&
         put(bytes, "zeroed", jint(m->zeroed));
    for (size_t i = 0; ok && m->has_extents && i < m->nextents; i++) {
        const struct manifest_extent *e = &m->extents[i];
        json_t *t = json_pack("[IIs]", (json_int_t)e->start,
                              (json_int_t)e->length, e->zero ? "zero" : "data");
        ok = t && json_array_append_new(ext, t) == 0;
    }
    ok = ok && put(hash, "algorithm", json_string(BLOCKHASH_ALGORITHM)) &&
         put(hash, "block-size", jint(m->block_size)) &&
         put(hash, "blocks", jint(m->blocks)) &&
         put(hash, "file", json_string(m->hash_file)) &&
         put(hash, "file-sha256", json_string(m->hash_file_sha256)) &&
         put(hash, "root", json_string(m->root));

    /* The order of docs/backups.md (jansson keeps insertion order). */
    ok = ok && put(root, "format", json_string("cbt-backup")) &&
         put(root, "version", json_integer(MANIFEST_VERSION)) &&
         put(root, "complete", json_boolean(m->complete)) &&
         put(root, "tool", json_string(m->tool)) &&
         put(root, "created", json_string(m->created)) &&
         put(root, "disk", json_incref(disk)) &&
         put(root, "kind", json_string(cbt_backup_mode_name(m->kind))) &&
         put(root, "checkpoint", json_incref(ck)) &&
         put(root, "since", jstr_or_null(m->since)) &&
         put(root, "parent", json_incref(parent)) &&
         put(root, "image", json_incref(img)) &&
         put(root, "bytes", json_incref(bytes)) &&
         put(root, "extents", json_incref(ext)) &&
         put(root, "hash", json_incref(hash));
    json_decref(disk);
    json_decref(ck);
    json_decref(img);
    json_decref(bytes);
    json_decref(hash);
    json_decref(parent);
    json_decref(ext);
    if (!ok) {
        json_decref(root);
        return NULL;
    }
    return root;
}

/* fsync the folder holding path, so a rename in it is durable. */
static int sync_parent_dir(const char *path)
{
    const char *slash = strrchr(path, '/');
    CLEANUP_FREE char *dir = slash ? strndup(path, (size_t)(slash - path) + 1)
                                   : strdup(".");
    if (!dir)
        return -ENOMEM;
    CLEANUP_CLOSE int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    if (fsync(fd) < 0)
        return -errno;
    return 0;
}

/* Write buf to path.tmp, fsync, rename over path, fsync the folder.  The
 * temporary file is removed on failure. */
static int write_atomic(const char *path, const void *buf, size_t len,
                                struct cbt_error **errp)
{
    CLEANUP_FREE char *tmp = cbt_strdup_printf("%s.tmp", path);
    if (!tmp) {
        cbt_error_set(errp, ENOMEM, "%s: out of memory", path);
        return -1;
    }
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        cbt_error_set(errp, errno, "%s: %s", tmp, strerror(errno));
        return -1;
    }
    int r = file_pwrite_full(fd, buf, len, 0);
    if (r == 0)
        r = file_flush(fd);
    if (close(fd) < 0 && r == 0)
        r = -errno;
    if (r == 0 && rename(tmp, path) < 0)
        r = -errno;
    if (r < 0) {
        unlink(tmp);
        cbt_error_set(errp, -r, "%s: write failed: %s", path, strerror(-r));
        return -1;
    }
    r = sync_parent_dir(path);
    if (r < 0) {
        cbt_error_set(errp, -r, "%s: syncing its folder failed: %s", path,
                      strerror(-r));
        return -1;
    }
    return 0;
}

int manifest_write(const char *path, const struct manifest *m,
                   struct cbt_error **errp)
{
    json_t *root = build(m);
    if (!root) {
        cbt_error_set(errp, ENOMEM, "%s: cannot build the manifest", path);
        return -1;
    }
    char *text = json_dumps(root, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    json_decref(root);
    if (!text) {
        cbt_error_set(errp, ENOMEM, "%s: cannot build the manifest", path);
        return -1;
    }
    size_t len = strlen(text);
    /* One trailing newline, as text files have. */
    char *withnl = cbt_strdup_printf("%s\n", text);
    free(text);
    if (!withnl) {
        cbt_error_set(errp, ENOMEM, "%s: out of memory", path);
        return -1;
    }
    int ret = write_atomic(path, withnl, len + 1, errp);
    free(withnl);
    return ret;
}

void manifest_free(struct manifest *m)
{
    if (!m)
        return;
    free(m->tool);
    free(m->created);
    free(m->disk_path);
    free(m->disk_id);
    free(m->checkpoint);
    free(m->checkpoint_created);
    free(m->since);
    free(m->parent_file);
    free(m->image_file);
    free(m->image_format);
    free(m->extents);
    free(m->hash_file);
    memset(m, 0, sizeof(*m));
}

/* ---- files and paths ---- */

int file_sha256(const char *path, char hex[65], struct cbt_error **errp)
{
    CLEANUP_CLOSE int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        cbt_error_set(errp, errno, "%s: %s", path, strerror(errno));
        return -1;
    }
    enum { CHUNK = 1 << 20 };
    CLEANUP_FREE uint8_t *buf = malloc(CHUNK);
    if (!buf) {
        cbt_error_set(errp, ENOMEM, "%s: out of memory", path);
        return -1;
    }
    struct sha256_ctx c;
    sha256_init(&c);
    for (;;) {
        ssize_t n = read(fd, buf, CHUNK);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            cbt_error_set(errp, errno, "%s: read failed: %s", path,
                          strerror(errno));
            return -1;
        }
        if (n == 0)
            break;
        sha256_update(&c, buf, (size_t)n);
    }
    uint8_t d[32];
    sha256_final(&c, d);
    sha256_hex(d, hex);
    return 0;
}

char *manifest_path_for(const char *image_path)
{
    return cbt_strdup_printf("%s.json", image_path);
}

char *hashes_path_for(const char *image_path)
{
    return cbt_strdup_printf("%s.hashes", image_path);
}

char *manifest_sibling(const char *beside, const char *name)
{
    return path_resolve_relative(beside, name);
}

/* ---- finding a backup by checkpoint ---- */

static bool ends_with(const char *s, const char *suffix)
{
    size_t ls = strlen(s), lx = strlen(suffix);
    return ls >= lx && strcmp(s + ls - lx, suffix) == 0;
}

int manifest_find_by_checkpoint(const char *dir, const char *disk_id,
                                const char *checkpoint, char **image_path,
                                struct manifest *m, struct cbt_error **errp)
{
    *image_path = NULL;
    memset(m, 0, sizeof(*m));
    DIR *d = opendir(dir);
    if (!d) {
        cbt_error_set(errp, errno, "%s: %s", dir, strerror(errno));
        return -1;
    }
    char *found = NULL;      /* the manifest's file name */
    struct manifest best = {0};
    int ret = -1;
    for (;;) {
        errno = 0;
        struct dirent *de = readdir(d);
        if (!de)
            break;
        const char *name = de->d_name;
        if (name[0] == '.' || !ends_with(name, ".json"))
            continue;
        CLEANUP_FREE char *path = cbt_strdup_printf("%s/%s", dir, name);
        if (!path) {
            cbt_error_set(errp, ENOMEM, "%s: out of memory", dir);
            goto out;
        }
        struct manifest cand;
        struct cbt_error *perr = NULL;
        if (manifest_read(path, &cand, &perr) < 0) {
            /* Files that are not cbt manifests are none of our business;
             * a damaged manifest of ours is worth a warning. */
            const char *msg = cbt_error_message(perr);
            if (strstr(msg, "not a valid manifest") ||
                strstr(msg, "manifest field 'format'"))
                cbt_debug("backup folder: skipping %s: %s", path, msg);
            else
                cbt_warn("ignoring %s", msg);
            cbt_error_free(perr);
            continue;
        }
        bool match = cand.complete && strcasecmp(cand.disk_id, disk_id) == 0 &&
                     strcmp(cand.checkpoint, checkpoint) == 0;
        /* A manifest describes the image it sits beside: NAME.json for
         * image NAME.  A copy under another name is not a backup here. */
        size_t nl = strlen(name) - 5;
        match = match && strlen(cand.image_file) == nl &&
                strncmp(cand.image_file, name, nl) == 0;
        if (!match) {
            manifest_free(&cand);
            continue;
        }
        if (found) {
            cbt_error_set(errp, EEXIST,
                          "%s: two backups created checkpoint '%s' of disk "
                          "%s: %s and %s; remove one",
                          dir, checkpoint, disk_id, found, name);
            manifest_free(&cand);
            goto out;
        }
        found = strdup(name);
        if (!found) {
            manifest_free(&cand);
            cbt_error_set(errp, ENOMEM, "%s: out of memory", dir);
            goto out;
        }
        best = cand;
    }
    if (errno) {
        cbt_error_set(errp, errno, "%s: %s", dir, strerror(errno));
        goto out;
    }
    if (!found) {
        cbt_error_set(errp, ENOENT,
                      "%s: no backup of checkpoint '%s' of this disk in this "
                      "folder",
                      dir, checkpoint);
        goto out;
    }
    *image_path = cbt_strdup_printf("%s/%s", dir, best.image_file);
    if (!*image_path) {
        cbt_error_set(errp, ENOMEM, "%s: out of memory", dir);
        goto out;
    }
    *m = best;
    memset(&best, 0, sizeof(best));
    ret = 0;
out:
    closedir(d);
    free(found);
    manifest_free(&best);
    return ret;
}

/* ---- the block hashes file (TARGET.hashes) ---- */

int blockhash_write(const struct blockhash *h, const char *path,
                    char file_sha256_hex[65], struct cbt_error **errp)
{
    /* The file is the leaves, so its SHA-256 is the root. */
    blockhash_root(h, file_sha256_hex);
    return write_atomic(path, h->leaf, (size_t)h->n * 32, errp);
}

int blockhash_read(const char *path, uint64_t size, struct blockhash *h,
                   struct cbt_error **errp)
{
    memset(h, 0, sizeof(*h));
    CLEANUP_CLOSE int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        cbt_error_set(errp, errno, "%s: %s", path, strerror(errno));
        return -1;
    }
    uint64_t n = DIV_ROUND_UP(size, (uint64_t)BLOCKHASH_BLOCK), want, have;
    int r = file_size(fd, &have);
    if (r < 0) {
        cbt_error_set(errp, -r, "%s: %s", path, strerror(-r));
        return -1;
    }
    if (mul_overflow_u64(n, 32, &want) || have != want) {
        cbt_error_set(errp, EINVAL,
                      "%s: block hashes file is %llu bytes, expected %llu "
                      "(32 for each of %llu blocks)",
                      path, (unsigned long long)have,
                      (unsigned long long)want, (unsigned long long)n);
        return -1;
    }
    r = blockhash_init(h, size);
    if (r < 0) {
        cbt_error_set(errp, -r, "%s: %s", path, strerror(-r));
        return -1;
    }
    r = file_pread_exact(fd, h->leaf, (size_t)want, 0);
    if (r < 0) {
        blockhash_free(h);
        cbt_error_set(errp, -r, "%s: read failed: %s", path, strerror(-r));
        return -1;
    }
    return 0;
}
