/*
 * Transactions on a backup folder (foldertx.h): the step order that keeps
 * every kept point of a prune restorable whenever the process dies.
 *
 * Why a journal.  A point's manifest records the SHA-256 of its parent's
 * manifest, and a qcow2 point's image names its parent's image as backing
 * file.  Retiring a point P that has one child C means: C's image takes
 * P's data under its own (so C's guest view, hence C's block hashes, stay
 * what they were), C's manifest gets P's parent (or becomes a full one),
 * and, since C's manifest changed, every manifest above C must record the
 * new digest of the one below it.  That is an image and several manifests
 * replaced; no rename replaces several files at once.  So the step is
 * written down first and rolled forward:
 *
 *   1. (caller, folder locked) every new manifest is written beside the
 *      old one as NAME.json.prune-new (a new file, durable before its name
 *      appears).  A kill here leaves only those files: every point is as it
 *      was; cbt repo clean and the next prune remove them.
 *   2. the journal cbt-prune.journal appears (durable before its name):
 *      the commit point.  From here on the step is finished, by this
 *      process or by the next cbt that opens the folder (bchain_open, that
 *      is restore and verify; the parent search of backup; every cbt repo
 *      command), which replays the journal:
 *   3. merge (when P has a child): C's own clusters are written into P's
 *      image in place -- zero clusters as zero clusters, data as data, the
 *      size made C's -- then P's image is flushed and renamed over C's.
 *      Writing into P never changes C's view (C's clusters shadow the very
 *      ranges written), so a replay simply writes them again; once the
 *      rename happened P's image name is gone and the step is skipped.
 *   4. each NAME.json.prune-new is renamed over NAME.json, and C's folded
 *      record file NAME.tree.prune-new over NAME.tree (sha256-tree-v2:
 *      C's records alone are not its view once P goes) (each skipped when
 *      it is gone: done before);
 *   5. P's remaining files are removed (manifest first), the folder synced,
 *      the journal removed.
 * Before step 2 nothing a point uses has changed; after it, the replay
 * reaches the same end state from any point of the interruption, because
 * every step is idempotent and the journal is removed last.
 *
 * Locking.  The folder lock (flock on the folder) is held by a prune,
 * clean and a replay for their whole run, so at most one of them changes a
 * folder, and a reader that finds a journal while a running cbt holds the
 * lock is told the folder is in use instead of replaying it a second time.
 * The images a merge writes and reads are opened with QEMU's locks, so a
 * merge never writes an image another process has open.
 *
 * The journal is untrusted input like everything in the folder: every name
 * must be a plain name of the folder (no '/', not . or ..), so a replay can
 * never touch a file outside it.
 */
#include <dirent.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <sys/file.h>
#include <sys/stat.h>

#include <jansson.h>

#include <cbt/image.h>

#include "../block/block.h"
#include "../util/util.h"
#include "foldertx.h"
#include "manifest.h"

#define JOURNAL_FORMAT "cbt-prune-journal"
#define JOURNAL_VERSION 1
#define JOURNAL_MAX_BYTES (16u << 20)
#define JOURNAL_MAX_ITEMS 65536
#define NAME_MAX_BYTES 255
/* Bytes copied per step of a merge. */
#define MERGE_CHUNK (1u << 20)

/* ---- the lock ---- */

int foldertx_lock(const char *dir, struct cbt_error **errp)
{
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) {
        cbt_error_set(errp, errno, "%s: %s", dir, strerror(errno));
        return -1;
    }
    if (flock(fd, LOCK_EX | LOCK_NB) < 0) {
        int e = errno;
        if (e != EWOULDBLOCK) {
            /* A file system without flock on folders (NFS emulates it with
             * byte-range locks, which a folder cannot take): as the image
             * locks do there, say so and go on. */
            cbt_warn("%s: cannot lock the backup folder (%s); going on "
                     "without: run one prune or clean at a time", dir,
                     strerror(e));
            return fd;
        }
        close(fd);
        cbt_error_set(errp, e, "%s: the backup folder is being changed by "
                      "another cbt (a prune or clean holds its lock)", dir);
        cbt_error_set_kind(errp, CBT_ERR_IN_USE);
        return -1;
    }
    return fd;
}

/* ---- the journal ---- */

void foldertx_free(struct foldertx *tx)
{
    if (!tx)
        return;
    free(tx->merge_from);
    free(tx->merge_into);
    free(tx->merge_format);
    for (size_t i = 0; i < tx->nrename; i++) {
        free(tx->rename_from[i]);
        free(tx->rename_to[i]);
    }
    free(tx->rename_from);
    free(tx->rename_to);
    for (size_t i = 0; i < tx->nremove; i++)
        free(tx->remove[i]);
    free(tx->remove);
    memset(tx, 0, sizeof(*tx));
}

static bool plain_name(const char *s, size_t len)
{
    return len > 0 && len <= NAME_MAX_BYTES && strlen(s) == len &&
           !strchr(s, '/') && strcmp(s, ".") != 0 && strcmp(s, "..") != 0;
}

static int jbad(struct cbt_error **errp, const char *what, const char *field,
                const char *expected)
{
    cbt_error_set(errp, EINVAL, "%s: journal field '%s': expected %s", what,
                  field, expected);
    cbt_error_set_kind(errp, CBT_ERR_CORRUPT);
    return -1;
}

/* A plain file name; malloc'd copy in *out. */
static int jname(json_t *v, const char *what, const char *field, char **out,
                 struct cbt_error **errp)
{
    if (!json_is_string(v) ||
        !plain_name(json_string_value(v), json_string_length(v)))
        return jbad(errp, what, field, "a plain file name of the folder");
    *out = strdup(json_string_value(v));
    if (!*out) {
        cbt_error_set(errp, ENOMEM, "%s: out of memory", what);
        return -1;
    }
    return 0;
}

static int jarray(json_t *root, const char *key, const char *what,
                  json_t **out, struct cbt_error **errp)
{
    json_t *a = json_object_get(root, key);
    if (!json_is_array(a) || json_array_size(a) > JOURNAL_MAX_ITEMS)
        return jbad(errp, what, key, "an array of at most 65536 items");
    *out = a;
    return 0;
}

static bool ends_with(const char *s, const char *sfx)
{
    size_t n = strlen(s), k = strlen(sfx);
    return n >= k && strcmp(s + n - k, sfx) == 0;
}

int foldertx_parse(const char *buf, size_t len, const char *what,
                   struct foldertx *tx, struct cbt_error **errp)
{
    memset(tx, 0, sizeof(*tx));
    json_error_t jerr;
    json_t *root = json_loadb(buf, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) {
        cbt_error_set(errp, EINVAL, "%s: not a valid journal (line %d: %s)",
                      what, jerr.line, jerr.text);
        cbt_error_set_kind(errp, CBT_ERR_CORRUPT);
        return -1;
    }
    int ret = -1;
    json_t *v, *m, *ren, *rem;
    if (!json_is_object(root))
        goto bad_root;
    v = json_object_get(root, "format");
    if (!json_is_string(v) || strcmp(json_string_value(v), JOURNAL_FORMAT))
        goto bad_root;
    v = json_object_get(root, "version");
    if (!json_is_integer(v) || json_integer_value(v) != JOURNAL_VERSION) {
        jbad(errp, what, "version", "1");
        goto out;
    }
    m = json_object_get(root, "merge");
    if (!m) {
        jbad(errp, what, "merge", "an object or null");
        goto out;
    }
    if (!json_is_null(m)) {
        json_t *fmt = json_object_get(m, "format");
        json_t *fs = json_object_get(m, "from-size");
        if (!json_is_object(m)) {
            jbad(errp, what, "merge", "an object or null");
            goto out;
        }
        if (jname(json_object_get(m, "from"), what, "merge.from",
                  &tx->merge_from, errp) < 0 ||
            jname(json_object_get(m, "into"), what, "merge.into",
                  &tx->merge_into, errp) < 0)
            goto out;
        if (strcmp(tx->merge_from, tx->merge_into) == 0) {
            jbad(errp, what, "merge.into", "another file than merge.from");
            goto out;
        }
        if (!json_is_string(fmt) ||
            (strcmp(json_string_value(fmt), "qcow2") != 0 &&
             strcmp(json_string_value(fmt), "raw") != 0)) {
            jbad(errp, what, "merge.format", "\"qcow2\" or \"raw\"");
            goto out;
        }
        if (!json_is_integer(fs) || json_integer_value(fs) < 0) {
            jbad(errp, what, "merge.from-size", "a size in bytes");
            goto out;
        }
        tx->merge_from_size = (uint64_t)json_integer_value(fs);
        tx->merge_format = strdup(json_string_value(fmt));
        if (!tx->merge_format) {
            cbt_error_set(errp, ENOMEM, "%s: out of memory", what);
            goto out;
        }
    }
    if (jarray(root, "rename", what, &ren, errp) < 0 ||
        jarray(root, "remove", what, &rem, errp) < 0)
        goto out;
    size_t nren = json_array_size(ren), nrem = json_array_size(rem);
    tx->rename_from = calloc(nren + 1, sizeof(char *));
    tx->rename_to = calloc(nren + 1, sizeof(char *));
    tx->remove = calloc(nrem + 1, sizeof(char *));
    if (!tx->rename_from || !tx->rename_to || !tx->remove) {
        cbt_error_set(errp, ENOMEM, "%s: out of memory", what);
        goto out;
    }
    for (size_t i = 0; i < nren; i++) {
        json_t *p = json_array_get(ren, i);
        if (!json_is_array(p) || json_array_size(p) != 2) {
            jbad(errp, what, "rename", "pairs [new file, manifest]");
            goto out;
        }
        tx->nrename = i + 1;
        if (jname(json_array_get(p, 0), what, "rename", &tx->rename_from[i],
                  errp) < 0 ||
            jname(json_array_get(p, 1), what, "rename", &tx->rename_to[i],
                  errp) < 0)
            goto out;
        /* Only a new manifest over the manifest it replaces, or a new
         * record file (sha256-tree-v2, records folded) over the one it
         * replaces. */
        const char *f = tx->rename_from[i], *t = tx->rename_to[i];
        size_t tl = strlen(t);
        if ((!ends_with(t, ".json") && !ends_with(t, ".tree")) ||
            strncmp(f, t, tl) != 0 || strcmp(f + tl, FOLDERTX_NEW_SUFFIX) != 0) {
            jbad(errp, what, "rename", "pairs [NAME.json.prune-new, "
                 "NAME.json] or [NAME.tree.prune-new, NAME.tree]");
            goto out;
        }
    }
    for (size_t i = 0; i < nrem; i++) {
        tx->nremove = i + 1;
        if (jname(json_array_get(rem, i), what, "remove", &tx->remove[i],
                  errp) < 0)
            goto out;
    }
    ret = 0;
    goto out;
bad_root:
    cbt_error_set(errp, EINVAL, "%s: not a cbt prune journal (no \"format\": "
                  "\"%s\")", what, JOURNAL_FORMAT);
    cbt_error_set_kind(errp, CBT_ERR_CORRUPT);
out:
    json_decref(root);
    if (ret < 0)
        foldertx_free(tx);
    return ret;
}

static char *journal_text(const struct foldertx *tx)
{
    json_t *root = json_object(), *ren = json_array(), *rem = json_array();
    json_t *m = tx->merge_from
                    ? json_pack("{s:s, s:s, s:s, s:I}", "from", tx->merge_from,
                                "into", tx->merge_into, "format",
                                tx->merge_format, "from-size",
                                (json_int_t)tx->merge_from_size)
                    : json_null();
    bool ok = root && ren && rem && m;
    for (size_t i = 0; ok && i < tx->nrename; i++)
        ok = json_array_append_new(ren, json_pack("[ss]", tx->rename_from[i],
                                                  tx->rename_to[i])) == 0;
    for (size_t i = 0; ok && i < tx->nremove; i++)
        ok = json_array_append_new(rem, json_string(tx->remove[i])) == 0;
    ok = ok &&
         json_object_set_new(root, "format", json_string(JOURNAL_FORMAT)) == 0 &&
         json_object_set_new(root, "version", json_integer(JOURNAL_VERSION)) == 0 &&
         json_object_set(root, "merge", m) == 0 &&
         json_object_set(root, "rename", ren) == 0 &&
         json_object_set(root, "remove", rem) == 0;
    char *text = ok ? json_dumps(root, JSON_INDENT(2) | JSON_PRESERVE_ORDER)
                    : NULL;
    json_decref(m);
    json_decref(ren);
    json_decref(rem);
    json_decref(root);
    return text;
}

/* ---- carrying it out ---- */

static char *in_dir(const char *dir, const char *name)
{
    return cbt_strdup_printf("%s/%s", dir, name);
}

static int sync_dir(const char *dir)
{
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    int r = fsync(fd) < 0 ? -errno : 0;
    close(fd);
    return r;
}

/* Copy [off, off + len) of from's view into to.  With compress (the
 * retired point, whose file becomes the merged image, was a compressed
 * backup: its manifest's compression describes the merged one, prune.c),
 * whole clusters are written compressed as the backup wrote them (those
 * that do not shrink plain), so a prune does not grow what it keeps;
 * otherwise, and for a range's partial clusters, plain. */
static int copy_range(struct cbt_image *from, struct cbt_image *to,
                      uint8_t *buf, uint64_t off, uint64_t len, bool compress)
{
    uint64_t cl = to->cluster_size;
    uint64_t tsize = cbt_image_size(to);
    while (len > 0) {
        size_t n = (size_t)MIN(len, (uint64_t)MERGE_CHUNK);
        int r = cbt_image_pread(from, buf, n, off);
        if (r < 0)
            return r;
        /* The whole clusters of [off, off + n): off rounded up, the end
         * rounded down unless it is the image's end. */
        uint64_t end = off + n;
        uint64_t c0 = cl ? ALIGN_UP(off, cl) : end;
        uint64_t c1 = cl ? (end == tsize ? end : ALIGN_DOWN(end, cl)) : end;
        if (!compress || c0 >= c1) {
            r = cbt_image_pwrite(to, buf, n, off);
        } else {
            r = c0 > off ? cbt_image_pwrite(to, buf, c0 - off, off) : 0;
            if (r >= 0)
                r = cbt_image_pwrite_compressed(to, buf + (c0 - off),
                                                c1 - c0, c0);
            if (r >= 0 && end > c1)
                r = cbt_image_pwrite(to, buf + (c1 - off), end - c1, c1);
        }
        if (r < 0)
            return r;
        off += n;
        len -= n;
    }
    return 0;
}

/* Write what `into`'s chain holds above base (the node of `from` in it:
 * `into` itself, or `into` and the retired points between them) into p
 * (`from`, open for writing): data as data, zero clusters and ranges past
 * a smaller layer's end as zeroes; ranges nothing above base holds are
 * left alone (they read p's data anyway).  Every value written is the
 * view's final one, read through the chain, so a replay writing it again
 * changes nothing; and `into`'s view never changes, as every range written
 * is shadowed by a layer above p. */
static int merge_qcow2_ranges(struct cbt_image *view,
                              const struct cbt_image *base,
                              struct cbt_image *p, uint8_t *buf,
                              uint64_t size, bool compress,
                              cbt_progress_fn *progress, void *popaque)
{
    for (uint64_t off = 0; off < size;) {
        struct cbt_extent e;
        int r = cbt_image_block_status_above(view, base, off, size - off, &e);
        if (r < 0)
            return r;
        if (!(e.flags & (CBT_BS_PRESENT | CBT_BS_ZERO)))
            r = 0;
        else if (e.flags & CBT_BS_ZERO)
            r = cbt_image_pwrite_zeroes(p, off, e.length, 0);
        else
            r = copy_range(view, p, buf, off, e.length, compress);
        if (r < 0)
            return r;
        off += e.length;
        if (progress)
            progress(popaque, off, size);
    }
    return 0;
}

/* The node of `into`'s chain that is the file `from` (same inode). */
static const struct cbt_image *find_layer(struct cbt_image *view,
                                          const char *from)
{
    struct stat a, b;
    if (stat(from, &a) < 0)
        return NULL;
    for (struct cbt_image *l = cbt_image_backing(view); l;
         l = cbt_image_backing(l))
        if (fstat(l->fd, &b) == 0 && a.st_dev == b.st_dev &&
            a.st_ino == b.st_ino)
            return l;
    return NULL;
}

/* The same for a raw c: the extents its manifest says it carries. */
static int merge_raw_ranges(const struct manifest *m, struct cbt_image *c,
                            struct cbt_image *p, uint8_t *buf,
                            cbt_progress_fn *progress, void *popaque)
{
    for (size_t i = 0; i < m->nextents; i++) {
        const struct manifest_extent *e = &m->extents[i];
        int r = e->zero ? cbt_image_pwrite_zeroes(p, e->start, e->length,
                                                  CBT_ZERO_MAY_UNMAP)
                        : copy_range(c, p, buf, e->start, e->length, false);
        if (r < 0)
            return r;
        if (progress)
            progress(popaque, e->start + e->length, m->virtual_size);
    }
    return 0;
}

/* Was the retired point `from` (still in place: this step renames it) a
 * compressed backup?  What its manifest says; no manifest or a broken one
 * reads as "no" (the merge is then plain, which is never wrong). */
static bool from_compressed(const char *from)
{
    CLEANUP_FREE char *mp = manifest_path_for(from);
    struct manifest m;
    memset(&m, 0, sizeof(m));
    if (!mp || manifest_read(mp, &m, NULL, NULL) < 0)
        return false;
    bool c = m.compression != NULL;
    manifest_free(&m);
    return c;
}

/* Step 3 (see the top of the file). */
static int merge_data(const char *dir, const struct foldertx *tx,
                      cbt_progress_fn *progress, void *popaque,
                      struct cbt_error **errp)
{
    CLEANUP_FREE char *from = in_dir(dir, tx->merge_from);
    CLEANUP_FREE char *into = in_dir(dir, tx->merge_into);
    if (!from || !into) {
        cbt_error_set(errp, ENOMEM, "%s: out of memory", dir);
        return -1;
    }
    struct stat st;
    if (lstat(from, &st) < 0) {
        if (errno == ENOENT)
            return 0; /* renamed over `into` already */
        cbt_error_set(errp, errno, "%s: %s", from, strerror(errno));
        return -1;
    }
    if (!S_ISREG(st.st_mode)) {
        cbt_error_set(errp, EINVAL, "%s: not a regular file; the prune "
                      "journal names it as the image to merge into", from);
        return -1;
    }
    bool raw = strcmp(tx->merge_format, "raw") == 0;
    struct manifest m;
    memset(&m, 0, sizeof(m));
    if (raw) {
        /* The old manifest of `into`: its renames come after this step. */
        CLEANUP_FREE char *mp = manifest_path_for(into);
        if (!mp || manifest_read(mp, &m, NULL, errp) < 0) {
            if (!mp)
                cbt_error_set(errp, ENOMEM, "%s: out of memory", dir);
            return -1;
        }
        if (!m.has_extents || strcmp(m.image_file, tx->merge_into) != 0) {
            cbt_error_set(errp, EINVAL, "%s: not the raw backup %s the prune "
                          "journal merges", mp, tx->merge_into);
            manifest_free(&m);
            return -1;
        }
    }
    int ret = -1, r = 0;
    const char *what = "";
    uint8_t *buf = NULL;
    struct cbt_image *p = cbt_image_open(from, tx->merge_format,
                                         CBT_OPEN_RDWR | CBT_OPEN_NO_BACKING,
                                         errp);
    /* qcow2: `into` with its chain, down through the retired points
     * between it and `from` (they go only after this step) to `from`. */
    struct cbt_image *c = p ? cbt_image_open(into, tx->merge_format,
                                             raw ? CBT_OPEN_NO_BACKING : 0,
                                             errp)
                            : NULL;
    if (!c)
        goto out;
    const struct cbt_image *base = raw ? NULL : find_layer(c, from);
    if (!raw && !base) {
        cbt_error_set(errp, EINVAL, "%s: is not in the backing chain of %s, "
                      "which the prune journal merges into it", from, into);
        goto out;
    }
    buf = cbt_zalloc_aligned(MERGE_CHUNK);
    if (!buf) {
        cbt_error_set(errp, ENOMEM, "%s: out of memory", from);
        goto out;
    }
    uint64_t csize = cbt_image_size(c), psize = cbt_image_size(p);
    if (csize > psize && cbt_image_resize(p, csize, false, errp) < 0)
        goto out;
    /* Grown over a backing file: the new area must read zeroes as it did
     * through `into`, not the backing file's data. */
    if (!raw && p->backing_name && csize > tx->merge_from_size &&
        (r = cbt_image_pwrite_zeroes(p, tx->merge_from_size,
                                     csize - tx->merge_from_size, 0)) < 0) {
        what = "zeroing the grown area";
        goto io;
    }
    r = raw ? merge_raw_ranges(&m, c, p, buf, progress, popaque)
            : merge_qcow2_ranges(c, base, p, buf, csize,
                                 from_compressed(from), progress, popaque);
    if (r < 0) {
        what = "copying the data";
        goto io;
    }
    if (csize < cbt_image_size(p) &&
        cbt_image_resize(p, csize, true, errp) < 0)
        goto out;
    if ((r = cbt_image_flush(p)) < 0) {
        what = "flushing";
        goto io;
    }
    ret = 0;
    goto out;
io:
    cbt_error_set(errp, -r, "%s: merging %s into it failed while %s: %s",
                  from, into, what, strerror(-r));
out:
    free(buf);
    manifest_free(&m);
    if (c)
        cbt_image_close(c, NULL);
    if (p && cbt_image_close(p, ret == 0 ? errp : NULL) < 0)
        ret = -1;
    if (ret < 0)
        return -1;
    if (rename(from, into) < 0) {
        cbt_error_set(errp, errno, "%s: cannot rename it to %s: %s", from,
                      into, strerror(errno));
        return -1;
    }
    if ((r = sync_dir(dir)) < 0) {
        cbt_error_set(errp, -r, "%s: syncing the folder failed: %s", dir,
                      strerror(-r));
        return -1;
    }
    return 0;
}

/* Steps 3 to 5. */
static int replay(const char *dir, const struct foldertx *tx,
                  cbt_progress_fn *progress, void *popaque,
                  struct cbt_error **errp)
{
    if (tx->merge_from &&
        merge_data(dir, tx, progress, popaque, errp) < 0)
        return -1;
    for (size_t i = 0; i < tx->nrename; i++) {
        CLEANUP_FREE char *f = in_dir(dir, tx->rename_from[i]);
        CLEANUP_FREE char *t = in_dir(dir, tx->rename_to[i]);
        if (!f || !t) {
            cbt_error_set(errp, ENOMEM, "%s: out of memory", dir);
            return -1;
        }
        struct stat st;
        if (lstat(f, &st) < 0 && errno == ENOENT) {
            if (lstat(t, &st) == 0)
                continue; /* renamed before */
            cbt_error_set(errp, ENOENT, "%s: missing, and so is %s, which "
                          "the prune journal renames it to", f, t);
            return -1;
        }
        if (rename(f, t) < 0) {
            cbt_error_set(errp, errno, "%s: cannot rename it to %s: %s", f, t,
                          strerror(errno));
            return -1;
        }
    }
    int r = sync_dir(dir);
    for (size_t i = 0; r == 0 && i < tx->nremove; i++) {
        CLEANUP_FREE char *f = in_dir(dir, tx->remove[i]);
        if (!f)
            r = -ENOMEM;
        else if (unlink(f) < 0 && errno != ENOENT)
            r = -errno;
    }
    if (r == 0)
        r = sync_dir(dir);
    if (r < 0) {
        cbt_error_set(errp, -r, "%s: removing the retired point's files "
                      "failed: %s", dir, strerror(-r));
        return -1;
    }
    return 0;
}

static int end_journal(const char *dir, struct cbt_error **errp)
{
    CLEANUP_FREE char *jp = in_dir(dir, FOLDERTX_JOURNAL);
    if (!jp || (unlink(jp) < 0 && errno != ENOENT)) {
        cbt_error_set(errp, jp ? errno : ENOMEM, "%s: cannot remove the "
                      "journal: %s", jp ? jp : dir,
                      strerror(jp ? errno : ENOMEM));
        return -1;
    }
    int r = sync_dir(dir);
    if (r < 0) {
        cbt_error_set(errp, -r, "%s: syncing the folder failed: %s", dir,
                      strerror(-r));
        return -1;
    }
    return 0;
}

int foldertx_run(const char *dir, const struct foldertx *tx,
                 cbt_progress_fn *progress, void *progress_opaque,
                 struct cbt_error **errp)
{
    CLEANUP_FREE char *jp = in_dir(dir, FOLDERTX_JOURNAL);
    CLEANUP_FREE char *text = journal_text(tx);
    if (!jp || !text) {
        cbt_error_set(errp, ENOMEM, "%s: out of memory", dir);
        return -1;
    }
    if (bfile_write_new(jp, text, strlen(text), false, errp) < 0) {
        /* Its name may have appeared (the folder's sync failed): take it
         * back, so the step did not happen (the caller made sure no
         * journal was there). */
        unlink(jp);
        sync_dir(dir);
        return -1;
    }
    if (replay(dir, tx, progress, progress_opaque, errp) < 0 ||
        end_journal(dir, errp) < 0) {
        cbt_error_prefix(errp, "%s: the prune step is recorded there and is "
                         "finished when cbt next opens the folder %s (a "
                         "listing does)", jp, dir);
        return -1;
    }
    return 0;
}

bool foldertx_pending(const char *dir)
{
    CLEANUP_FREE char *jp = in_dir(dir, FOLDERTX_JOURNAL);
    struct stat st;
    return jp && lstat(jp, &st) == 0;
}

int foldertx_recover_locked(const char *dir, struct cbt_error **errp)
{
    if (!foldertx_pending(dir))
        return 0;
    CLEANUP_FREE char *jp = in_dir(dir, FOLDERTX_JOURNAL);
    CLEANUP_FREE char *text = NULL;
    size_t len = 0;
    struct foldertx tx;
    if (!jp ||
        bfile_read_all(jp, "prune journal", JOURNAL_MAX_BYTES, &text, &len,
                       errp) < 0 ||
        foldertx_parse(text, len, jp, &tx, errp) < 0)
        return -1;
    int ret = -1;
    if (replay(dir, &tx, NULL, NULL, errp) == 0 &&
        end_journal(dir, errp) == 0) {
        cbt_warn("%s: finished the prune step an interrupted cbt had begun",
                 dir);
        ret = 1;
    } else {
        cbt_error_prefix(errp, "%s: finishing an interrupted prune", jp);
    }
    foldertx_free(&tx);
    return ret;
}

int foldertx_recover(const char *dir, struct cbt_error **errp)
{
    if (!foldertx_pending(dir))
        return 0;
    int lock = foldertx_lock(dir, errp);
    if (lock < 0)
        return -1;
    /* Another cbt may have finished it while this one took the lock. */
    int ret = foldertx_recover_locked(dir, errp);
    close(lock);
    return ret;
}

int foldertx_recover_beside(const char *path, struct cbt_error **errp)
{
    CLEANUP_FREE char *dir = bfile_folder_of(path);
    if (!dir) {
        cbt_error_set(errp, ENOMEM, "%s: out of memory", path);
        return -1;
    }
    return foldertx_recover(dir, errp);
}
