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
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <strings.h>
#include <sys/stat.h>

#include <jansson.h>

#include "../util/util.h"
#include "foldertx.h"
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

/* ---- parsing helpers ----
 * Every error names the file, the field (its full path, "parent.file"), what
 * was found and what was expected:
 *   "bk/b2.qcow2.json: manifest field 'hash.blocks' is 7; expected 3 (the
 *    virtual size divided by 65536, rounded up)".
 * String values from the file are never echoed (they could carry terminal
 * control characters); numbers are. */

struct pctx {
    const char *what;
    struct cbt_error **errp;
};

static int bad(struct pctx *p, const char *key, const char *is,
               const char *expected)
{
    cbt_error_set(p->errp, EINVAL, "%s: manifest field '%s' %s; expected %s",
                  p->what, key, is, expected);
    return -1;
}

/* What a JSON value is, for "is ..." in errors. */
static const char *jtype(json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT:
        return "an object";
    case JSON_ARRAY:
        return "an array";
    case JSON_STRING:
        return "a string";
    case JSON_INTEGER:
        return "an integer";
    case JSON_REAL:
        return "a real number";
    case JSON_TRUE:
        return "true";
    case JSON_FALSE:
        return "false";
    case JSON_NULL:
        return "null";
    }
    return "of an unknown type";
}

static int bad_type(struct pctx *p, const char *key, json_t *v,
                    const char *expected)
{
    char is[48];
    snprintf(is, sizeof(is), "is %s", jtype(v));
    return bad(p, key, is, expected);
}

/* The member of obj named by the last component of key ("image.file":
 * "file"); missing is an error. */
static json_t *get(struct pctx *p, json_t *obj, const char *key,
                   const char *expected)
{
    const char *dot = strrchr(key, '.');
    json_t *v = json_object_get(obj, dot ? dot + 1 : key);
    if (!v)
        bad(p, key, "is missing", expected);
    return v;
}

static int get_obj(struct pctx *p, json_t *obj, const char *key, json_t **out)
{
    json_t *v = get(p, obj, key, "an object");
    if (!v)
        return -1;
    if (!json_is_object(v))
        return bad_type(p, key, v, "an object");
    *out = v;
    return 0;
}

/* A string of 1..max bytes without NUL; malloc'd copy in *out. */
static int get_str(struct pctx *p, json_t *obj, const char *key, size_t max,
                   char **out)
{
    char expected[64];
    snprintf(expected, sizeof(expected), "a string of 1 to %zu bytes", max);
    json_t *v = get(p, obj, key, expected);
    if (!v)
        return -1;
    if (!json_is_string(v))
        return bad_type(p, key, v, expected);
    size_t len = json_string_length(v);
    const char *s = json_string_value(v);
    char is[64];
    if (len == 0)
        return bad(p, key, "is empty", expected);
    if (len > max) {
        snprintf(is, sizeof(is), "is too long (%zu bytes)", len);
        return bad(p, key, is, expected);
    }
    if (memchr(s, '\0', len))
        return bad(p, key, "contains a NUL character", expected);
    *out = strdup(s);
    if (!*out) {
        cbt_error_set(p->errp, ENOMEM, "%s: out of memory", p->what);
        return -1;
    }
    return 0;
}

/* An integer in [min, max]; `expected` describes the range in words. */
static int get_u64(struct pctx *p, json_t *obj, const char *key, uint64_t min,
                   uint64_t max, const char *expected, uint64_t *out)
{
    json_t *v = get(p, obj, key, expected);
    if (!v)
        return -1;
    if (!json_is_integer(v))
        return bad_type(p, key, v, expected);
    json_int_t i = json_integer_value(v);
    if (i < 0 || (uint64_t)i < min || (uint64_t)i > max) {
        char is[48];
        snprintf(is, sizeof(is), "is %lld%s", (long long)i,
                 i < 0 ? " (negative)" : (uint64_t)i > max ? " (too large)"
                                                           : "");
        return bad(p, key, is, expected);
    }
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

#define SHA_EXPECTED "a SHA-256 digest (64 lower-case hex digits)"

static int get_hex64(struct pctx *p, json_t *obj, const char *key,
                     char out[65])
{
    json_t *v = get(p, obj, key, SHA_EXPECTED);
    if (!v)
        return -1;
    if (!json_is_string(v))
        return bad_type(p, key, v, SHA_EXPECTED);
    if (!is_hex64(json_string_value(v), json_string_length(v)))
        return bad(p, key, "is not a SHA-256 digest", SHA_EXPECTED);
    memcpy(out, json_string_value(v), 65);
    return 0;
}

bool manifest_is_uuid(const char *s)
{
    if (strlen(s) != 36)
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

#define NAME_EXPECTED                                                          \
    "a plain file name in the backup's folder (no '/', not '.' or '..')"

static int get_name(struct pctx *p, json_t *obj, const char *key, char **out)
{
    if (get_str(p, obj, key, NAME_MAX, out) < 0)
        return -1;
    if (!is_plain_name(*out))
        return bad(p, key, "is a path", NAME_EXPECTED);
    return 0;
}

/* A string that must be one of the NULL-terminated `words`; the index in
 * *out. */
static int get_word(struct pctx *p, json_t *obj, const char *key,
                    const char *const *words, const char *expected, int *out)
{
    json_t *v = get(p, obj, key, expected);
    if (!v)
        return -1;
    if (!json_is_string(v))
        return bad_type(p, key, v, expected);
    for (int i = 0; words[i]; i++) {
        if (strcmp(json_string_value(v), words[i]) == 0) {
            *out = i;
            return 0;
        }
    }
    return bad(p, key, "is another string", expected);
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
    char key[48], expected[128];
    uint64_t prev_end = 0;
    for (size_t i = 0; i < n; i++) {
        snprintf(key, sizeof(key), "extents[%zu]", i);
        json_t *e = json_array_get(arr, i);
        if (!json_is_array(e) || json_array_size(e) != 3)
            return bad(p, key, "is not a list of three",
                       "[start, length, \"data\" or \"zero\"]");
        json_t *js = json_array_get(e, 0), *jl = json_array_get(e, 1);
        json_t *jt = json_array_get(e, 2);
        if (!json_is_integer(js) || !json_is_integer(jl) ||
            json_integer_value(js) < 0 || json_integer_value(jl) <= 0)
            return bad(p, key, "has a bad start or length",
                       "a start >= 0 and a length > 0, both integers");
        uint64_t start = (uint64_t)json_integer_value(js);
        uint64_t len = (uint64_t)json_integer_value(jl), end;
        if (add_overflow_u64(start, len, &end) || end > m->virtual_size) {
            snprintf(expected, sizeof(expected), "a range inside the virtual "
                     "size (%" PRIu64 " bytes)", m->virtual_size);
            return bad(p, key, "ends past the virtual size", expected);
        }
        if (start < prev_end) {
            snprintf(expected, sizeof(expected), "a start at or after %" PRIu64
                     " (the end of the entry before; entries sorted, not "
                     "overlapping)", prev_end);
            return bad(p, key, "is not sorted or overlaps the one before",
                       expected);
        }
        const char *t = json_string_value(jt);
        bool zero;
        if (t && strcmp(t, "zero") == 0)
            zero = true;
        else if (t && strcmp(t, "data") == 0)
            zero = false;
        else
            return bad(p, key, "has an unknown type",
                       "\"data\" or \"zero\" as its third item");
        m->extents[i] = (struct manifest_extent){start, len, zero};
        m->nextents = i + 1;
        prev_end = end;
    }
    return 0;
}

#define SIZE_EXPECTED "an integer from 0 to 2^63-1"

static int parse_header(struct pctx *p, json_t *root, struct manifest *m)
{
    static const char *const format_words[] = {"cbt-backup", NULL};
    json_t *v, *o = NULL;
    int w;
    if (get_word(p, root, "format", format_words, "\"cbt-backup\"", &w) < 0)
        return -1;
    if (!(v = get(p, root, "version", "the integer 1 or 2")))
        return -1;
    if (!json_is_integer(v))
        return bad_type(p, "version", v, "the integer 1 or 2");
    /* 1: sha256-blocks-v1 hashes; 2: sha256-tree-v2 (a change of meaning
     * of hash.file, so an older cbt refuses it by its version). */
    if (json_integer_value(v) != 1 &&
        json_integer_value(v) != MANIFEST_VERSION) {
        cbt_error_set(p->errp, ENOTSUP,
                      "%s: manifest version %lld is not supported (this cbt "
                      "reads versions 1 and %d)",
                      p->what, (long long)json_integer_value(v),
                      MANIFEST_VERSION);
        return -1;
    }
    m->version = (int)json_integer_value(v);
    if (!(v = get(p, root, "complete", "true or false")))
        return -1;
    if (!json_is_boolean(v))
        return bad_type(p, "complete", v, "true or false");
    m->complete = json_is_true(v);
    if (get_str(p, root, "tool", MANIFEST_TEXT_MAX, &m->tool) < 0 ||
        get_str(p, root, "created", MANIFEST_TEXT_MAX, &m->created) < 0)
        return -1;
    if (get_obj(p, root, "disk", &o) < 0 ||
        get_str(p, o, "disk.path", MANIFEST_TEXT_MAX, &m->disk_path) < 0 ||
        get_str(p, o, "disk.id", 36, &m->disk_id) < 0)
        return -1;
    if (!manifest_is_uuid(m->disk_id))
        return bad(p, "disk.id", "is not a UUID",
                   "a UUID (36 characters, 8-4-4-4-12 hex digits)");
    return 0;
}

/* kind, checkpoint, since, parent and the rules between them. */
static int parse_lineage(struct pctx *p, json_t *root, struct manifest *m)
{
    static const char *const kinds[] = {"full", "incremental",
                                        "differential", NULL};
    static const enum cbt_backup_mode modes[] = {
        CBT_BACKUP_FULL, CBT_BACKUP_INCREMENTAL, CBT_BACKUP_DIFFERENTIAL};
    json_t *v, *o = NULL;
    int w;
    if (get_word(p, root, "kind", kinds,
                 "\"full\", \"incremental\" or \"differential\"", &w) < 0)
        return -1;
    m->kind = modes[w];
    /* A copy-only full backup (--no-checkpoint) made no checkpoint. */
    if (m->kind == CBT_BACKUP_FULL &&
        json_is_null(json_object_get(root, "checkpoint")))
        goto lineage_rest;
    if (get_obj(p, root, "checkpoint", &o) < 0 ||
        get_str(p, o, "checkpoint.name", MANIFEST_NAME_MAX,
                &m->checkpoint) < 0 ||
        get_u64(p, o, "checkpoint.order", 1, (uint64_t)INT64_MAX,
                "an integer from 1 to 2^63-1 (orders start at 1)",
                &m->checkpoint_order) < 0 ||
        get_str(p, o, "checkpoint.created", MANIFEST_TEXT_MAX,
                &m->checkpoint_created) < 0)
        return -1;
lineage_rest:
    if (!(v = get(p, root, "since", "null or a checkpoint name")))
        return -1;
    if (!json_is_null(v) &&
        get_str(p, root, "since", MANIFEST_NAME_MAX, &m->since) < 0)
        return -1;
    if (!(v = get(p, root, "parent", "null or an object")))
        return -1;
    if (!json_is_null(v)) {
        if (!json_is_object(v))
            return bad_type(p, "parent", v, "null or an object");
        if (get_name(p, v, "parent.file", &m->parent_file) < 0 ||
            get_hex64(p, v, "parent.manifest-sha256",
                      m->parent_manifest_sha256) < 0)
            return -1;
    }
    if (m->kind == CBT_BACKUP_FULL && (m->since || m->parent_file))
        return bad(p, "kind", "is \"full\" but since or parent is set",
                   "since and parent null for a full backup");
    if (m->kind != CBT_BACKUP_FULL && (!m->since || !m->parent_file))
        return bad(p, "kind", "is an incremental or differential but since "
                   "or parent is null",
                   "since and parent set for a backup with a parent");
    /* Optional (added after version 1's first manifests): absent = false. */
    v = json_object_get(root, "rescan");
    if (v && !json_is_boolean(v))
        return bad_type(p, "rescan", v, "true or false");
    m->rescan = v && json_is_true(v);
    if (m->rescan && m->kind == CBT_BACKUP_FULL)
        return bad(p, "rescan", "is true for a full backup",
                   "a rescan only for a backup with a parent");
    return 0;
}

static int parse_image(struct pctx *p, json_t *root, struct manifest *m)
{
    static const char *const formats[] = {"qcow2", "raw", NULL};
    json_t *o = NULL;
    int w;
    if (get_obj(p, root, "image", &o) < 0 ||
        get_name(p, o, "image.file", &m->image_file) < 0 ||
        get_word(p, o, "image.format", formats, "\"qcow2\" or \"raw\"",
                 &w) < 0 ||
        get_u64(p, o, "image.virtual-size", 0, MANIFEST_MAX_SIZE,
                SIZE_EXPECTED, &m->virtual_size) < 0)
        return -1;
    m->image_format = strdup(formats[w]);
    if (!m->image_format) {
        cbt_error_set(p->errp, ENOMEM, "%s: out of memory", p->what);
        return -1;
    }
    /* Optional: qcow2 targets whose data clusters may be compressed. */
    static const char *const methods[] = {"zlib", "zstd", NULL};
    if (json_object_get(o, "compression")) {
        if (get_word(p, o, "image.compression", methods,
                     "\"zlib\" or \"zstd\"", &w) < 0)
            return -1;
        if (strcmp(m->image_format, "qcow2") != 0)
            return bad(p, "image.compression", "is set for a raw backup",
                       "no compression for a raw backup (absent)");
        m->compression = methods[w];
    }
    if (m->parent_file && strcmp(m->parent_file, m->image_file) == 0)
        return bad(p, "parent.file", "names the backup itself",
                   "another backup's file name");
    char expected[96];
    snprintf(expected, sizeof(expected), "an integer from 0 to the virtual "
             "size (%" PRIu64 ")", m->virtual_size);
    if (get_obj(p, root, "bytes", &o) < 0 ||
        get_u64(p, o, "bytes.dirty", 0, MANIFEST_MAX_SIZE, SIZE_EXPECTED,
                &m->dirty) < 0 ||
        get_u64(p, o, "bytes.copied", 0, m->virtual_size, expected,
                &m->copied) < 0 ||
        get_u64(p, o, "bytes.zeroed", 0, m->virtual_size, expected,
                &m->zeroed) < 0)
        return -1;
    /* Optional: the image file's size once complete. */
    if (json_object_get(o, "file")) {
        if (get_u64(p, o, "bytes.file", 0, (uint64_t)INT64_MAX,
                    "an integer from 0 to 2^63-1 (the file's size)",
                    &m->file_bytes) < 0)
            return -1;
        m->has_file_bytes = true;
    }
    json_t *v = get(p, root, "extents", "an array (raw) or null (qcow2)");
    if (!v)
        return -1;
    if (strcmp(m->image_format, "raw") == 0) {
        if (!json_is_array(v))
            return bad_type(p, "extents", v, "an array: a raw backup lists "
                            "the ranges it carries");
        m->has_extents = true;
        return parse_extents(p, v, m);
    }
    if (!json_is_null(v))
        return bad_type(p, "extents", v, "null for a qcow2 backup");
    return 0;
}

static int parse_hash(struct pctx *p, json_t *root, struct manifest *m)
{
    static const char *const v1[] = {BLOCKHASH_ALGORITHM, NULL};
    static const char *const v2[] = {TREE_ALGORITHM_NAME, NULL};
    json_t *o = NULL;
    int w;
    bool tree = m->version == 2;
    if (get_obj(p, root, "hash", &o) < 0 ||
        get_word(p, o, "hash.algorithm", tree ? v2 : v1,
                 tree ? "\"" TREE_ALGORITHM_NAME "\" (manifest version 2)"
                      : "\"" BLOCKHASH_ALGORITHM "\" (manifest version 1)",
                 &w) < 0 ||
        get_u64(p, o, "hash.block-size", BLOCKHASH_BLOCK, BLOCKHASH_BLOCK,
                "65536", &m->block_size) < 0)
        return -1;
    m->tree = tree;
    uint64_t fan;
    if (tree && get_u64(p, o, "hash.fanout", TREE_FANOUT_N, TREE_FANOUT_N,
                        "256", &fan) < 0)
        return -1;
    uint64_t want = DIV_ROUND_UP(m->virtual_size, (uint64_t)BLOCKHASH_BLOCK);
    char expected[96];
    snprintf(expected, sizeof(expected), "%" PRIu64 " (the virtual size "
             "divided by 65536, rounded up)", want);
    if (get_u64(p, o, "hash.blocks", want, want, expected, &m->blocks) < 0 ||
        get_name(p, o, "hash.file", &m->hash_file) < 0 ||
        get_hex64(p, o, "hash.file-sha256", m->hash_file_sha256) < 0 ||
        get_hex64(p, o, "hash.root", m->root) < 0)
        return -1;
    return 0;
}

static int parse_root(struct pctx *p, json_t *root, struct manifest *m)
{
    if (!json_is_object(root))
        return bad_type(p, "(top level)", root, "a JSON object");
    if (parse_header(p, root, m) < 0 || parse_lineage(p, root, m) < 0 ||
        parse_image(p, root, m) < 0 || parse_hash(p, root, m) < 0)
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
        /* jansson quotes the text near the error: no control characters
         * of the file reach the terminal. */
        for (char *c = jerr.text; *c; c++)
            if ((unsigned char)*c < 0x20 || *c == 0x7f)
                *c = '?';
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

int manifest_read(const char *path, struct manifest *m, char sha256[65],
                  struct cbt_error **errp)
{
    memset(m, 0, sizeof(*m));
    if (sha256)
        sha256[0] = '\0';
    char *buf;
    size_t len;
    if (bfile_read_all(path, "manifest", MANIFEST_MAX_BYTES, &buf, &len,
                       errp) < 0)
        return -1;
    if (sha256) {
        /* The digest of the very bytes parsed: what a child recorded
         * vouches for what is read here. */
        uint8_t d[32];
        sha256_digest(buf, len, d);
        sha256_hex(d, sha256);
    }
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
    bool has_ck = m->checkpoint != NULL; /* else a copy-only full backup */
    json_t *ext = m->has_extents ? json_array() : json_null();
    bool ok = root && disk && ck && img && bytes && hash && parent && ext;

    ok = ok && put(disk, "path", json_string(m->disk_path)) &&
         put(disk, "id", json_string(m->disk_id));
    if (has_ck)
        ok = ok && put(ck, "name", json_string(m->checkpoint)) &&
             put(ck, "order", jint(m->checkpoint_order)) &&
             put(ck, "created", json_string(m->checkpoint_created));
    if (ok && m->parent_file)
        ok = put(parent, "file", json_string(m->parent_file)) &&
             put(parent, "manifest-sha256",
                 json_string(m->parent_manifest_sha256));
    ok = ok && put(img, "file", json_string(m->image_file)) &&
         put(img, "format", json_string(m->image_format)) &&
         put(img, "virtual-size", jint(m->virtual_size)) &&
         (!m->compression ||
          put(img, "compression", json_string(m->compression)));
    ok = ok && put(bytes, "dirty", jint(m->dirty)) &&
         put(bytes, "copied", jint(m->copied)) &&
         put(bytes, "zeroed", jint(m->zeroed)) &&
         (!m->has_file_bytes || put(bytes, "file", jint(m->file_bytes)));
    for (size_t i = 0; ok && m->has_extents && i < m->nextents; i++) {
        const struct manifest_extent *e = &m->extents[i];
        json_t *t = json_pack("[IIs]", (json_int_t)e->start,
                              (json_int_t)e->length, e->zero ? "zero" : "data");
        ok = t && json_array_append_new(ext, t) == 0;
    }
    ok = ok && put(hash, "algorithm", json_string(m->tree
                                                   ? TREE_ALGORITHM_NAME
                                                   : BLOCKHASH_ALGORITHM)) &&
         put(hash, "block-size", jint(m->block_size)) &&
         (!m->tree || put(hash, "fanout", jint(TREE_FANOUT_N))) &&
         put(hash, "blocks", jint(m->blocks)) &&
         put(hash, "file", json_string(m->hash_file)) &&
         put(hash, "file-sha256", json_string(m->hash_file_sha256)) &&
         put(hash, "root", json_string(m->root));

    /* The order of docs/backups.md (jansson keeps insertion order). */
    ok = ok && put(root, "format", json_string("cbt-backup")) &&
         put(root, "version", json_integer(m->tree ? 2 : 1)) &&
         put(root, "complete", json_boolean(m->complete)) &&
         put(root, "tool", json_string(m->tool)) &&
         put(root, "created", json_string(m->created)) &&
         put(root, "disk", json_incref(disk)) &&
         put(root, "kind", json_string(cbt_backup_mode_name(m->kind))) &&
         put(root, "checkpoint", has_ck ? json_incref(ck) : json_null()) &&
         put(root, "since", jstr_or_null(m->since)) &&
         put(root, "parent", json_incref(parent)) &&
         put(root, "image", json_incref(img)) &&
         put(root, "bytes", json_incref(bytes)) &&
         (!m->rescan || put(root, "rescan", json_true())) &&
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

int manifest_write(const char *path, const struct manifest *m, bool replace,
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
    int ret = bfile_write_new(path, withnl, len + 1, replace, errp);
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

char *manifest_path_for(const char *image_path)
{
    return cbt_strdup_printf("%s.json", image_path);
}

char *hashes_path_for(const char *image_path)
{
    return cbt_strdup_printf("%s.hashes", image_path);
}

char *tree_path_for(const char *image_path)
{
    return cbt_strdup_printf("%s.tree", image_path);
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

int manifest_scan(const char *dir, manifest_scan_fn *fn, void *opaque,
                  struct cbt_error **errp)
{
    /* A prune a kill interrupted is finished first (foldertx.c). */
    if (foldertx_recover(dir, errp) < 0)
        return -1;
    DIR *d = opendir(dir);
    if (!d) {
        cbt_error_set(errp, errno, "%s: %s", dir, strerror(errno));
        return -1;
    }
    int ret = 0, rd_err = 0;
    for (;;) {
        errno = 0;
        struct dirent *de = readdir(d);
        if (!de) {
            rd_err = errno;
            break;
        }
        const char *name = de->d_name;
        if (name[0] == '.' || !ends_with(name, ".json"))
            continue;
        CLEANUP_FREE char *path = cbt_strdup_printf("%s/%s", dir, name);
        if (!path) {
            cbt_error_set(errp, ENOMEM, "%s: out of memory", dir);
            ret = -1;
            break;
        }
        struct manifest cand;
        char sha[65];
        struct cbt_error *perr = NULL;
        if (manifest_read(path, &cand, sha, &perr) < 0) {
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
        /* A manifest describes the image it sits beside: NAME.json for
         * image NAME.  A copy under another name is not a backup here. */
        size_t nl = strlen(name) - 5;
        int r = 0;
        if (cand.complete && strlen(cand.image_file) == nl &&
            strncmp(cand.image_file, name, nl) == 0)
            r = fn(opaque, name, &cand, sha, errp);
        manifest_free(&cand);
        if (r != 0) {
            ret = r < 0 ? -1 : 0;
            break;
        }
    }
    if (rd_err) {
        cbt_error_set(errp, rd_err, "%s: %s", dir, strerror(rd_err));
        ret = -1;
    }
    closedir(d);
    return ret;
}

/* manifest_find_by_checkpoint's search. */
struct find {
    const char *dir, *disk_id, *checkpoint;
    char *found;             /* the manifest's file name */
    struct manifest best;
    char best_sha[65];
};

static int find_one(void *opaque, const char *name, struct manifest *m,
                    const char sha[65], struct cbt_error **errp)
{
    struct find *f = opaque;
    if (!m->checkpoint || strcasecmp(m->disk_id, f->disk_id) != 0 ||
        strcmp(m->checkpoint, f->checkpoint) != 0)
        return 0;
    if (f->found) {
        cbt_error_set(errp, EEXIST,
                      "%s: two backups created checkpoint '%s' of disk "
                      "%s: %s and %s; remove one",
                      f->dir, f->checkpoint, f->disk_id, f->found, name);
        return -1;
    }
    f->found = strdup(name);
    if (!f->found) {
        cbt_error_set(errp, ENOMEM, "%s: out of memory", f->dir);
        return -1;
    }
    f->best = *m;
    memset(m, 0, sizeof(*m));
    memcpy(f->best_sha, sha, 65);
    return 0;
}

int manifest_find_by_checkpoint(const char *dir, const char *disk_id,
                                const char *checkpoint, char **image_path,
                                struct manifest *m, char sha256[65],
                                struct cbt_error **errp)
{
    *image_path = NULL;
    memset(m, 0, sizeof(*m));
    struct find f = {.dir = dir, .disk_id = disk_id,
                     .checkpoint = checkpoint};
    int ret = -1;
    if (manifest_scan(dir, find_one, &f, errp) < 0)
        goto out;
    if (!f.found) {
        cbt_error_set(errp, ENOENT,
                      "%s: no backup of checkpoint '%s' of this disk in this "
                      "folder",
                      dir, checkpoint);
        goto out;
    }
    *image_path = cbt_strdup_printf("%s/%s", dir, f.best.image_file);
    if (!*image_path) {
        cbt_error_set(errp, ENOMEM, "%s: out of memory", dir);
        goto out;
    }
    *m = f.best;
    memset(&f.best, 0, sizeof(f.best));
    if (sha256)
        memcpy(sha256, f.best_sha, 65);
    ret = 0;
out:
    free(f.found);
    manifest_free(&f.best);
    return ret;
}
