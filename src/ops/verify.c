/*
 * cbt_verify() (include/cbt/backup.h) and the backup-chain reader it shares
 * with cbt restore (src/ops/bchain.h).
 *
 * Trust
 * -----
 * Everything in a backup folder is untrusted: files go missing, get
 * truncated, copied over each other or have bytes flipped.  The chain is
 * anchored in the manifest of the backup asked for (nothing records its
 * digest); from there each manifest vouches for the next one down by the
 * SHA-256 of the parent's manifest it recorded, and each manifest vouches
 * for its block hashes file by that file's SHA-256.  So once the chain is
 * open, every manifest and every .hashes file is the one written at backup
 * time, and only the image data remain to be checked: the guest view is
 * read from the images and every 64 KiB block's SHA-256 compared with the
 * leaves of the backup asked for.  A flipped byte anywhere shows up as a
 * digest mismatch of the manifest or hashes file that holds it, or of a
 * block of the guest view -- unless it lies in image data no later backup
 * shows (a cluster an incremental overwrote): that data is not part of
 * this point in time, and verifying the older backup finds it.  The qcow2
 * images are also run through the consistency check (refcounts, L1/L2
 * tables, a file shorter than its clusters) so damaged metadata is named
 * even where the view reads right.
 *
 * Order of the checks, from the backup asked for down to its full; the
 * first problem stops the check and is reported naming its file:
 *   1. the parent's image and manifest exist and the manifest's SHA-256 is
 *      what the child recorded;
 *   2. the manifest parses (manifest_parse checks types, ranges, and the
 *      rules within one manifest), is complete and describes this image;
 *   3. against the child: same disk id and format, an older checkpoint
 *      (order strictly lower), and it created the checkpoint the child
 *      starts from;
 *   4. the .hashes file: length blocks * 32, SHA-256 as recorded, and the
 *      manifest's root equal to that SHA-256 (docs/backups.md: the root is
 *      the digest of the leaves, which is the file);
 *   5. the image opens in its recorded format, its virtual size is the
 *      recorded one (qcow2 may round up to 512 bytes; a raw file must be
 *      exactly that long), a qcow2 image's backing link names the parent's
 *      file (and nothing for the full), and it passes the check;
 *   6. the last backup reached is a full one.
 *
 * The guest view
 * --------------
 * qcow2 backups form a qcow2 chain (checked in 5), so the view is the top
 * image opened with its backing files; block status walks it so that
 * ranges reading as zeroes are not read, and its depth names the layer,
 * hence the backup file, holding a bad block.  Raw backups are composed
 * here: newest first, a backup's manifest extents say which ranges it
 * carries (data, or zeroes); elsewhere the parent decides; past a
 * backup's virtual size the view reads zeroes (a parent smaller than its
 * child), and ranges no backup carries read zeroes.
 */
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <strings.h>
#include <sys/stat.h>

#include <cbt/backup.h>
#include <cbt/image.h>

#include "../block/block.h"
#include "bchain.h"
#include "blockpipe.h"
#include "foldertx.h"
#include "manifest.h"
#include "ops_util.h"

/* Zero ranges are passed on in pieces of at most this (progress). */
#define ZERO_PIECE ((uint64_t)1 << 30)
#define BLOCK ((uint64_t)BLOCKHASH_BLOCK)

_Static_assert(BP_BUF / BLOCKHASH_BLOCK >= BP_SEGS, "a block per segment");

/* ---- problems ---- */

/* Record the first problem: msg (malloc'd, taken; NULL: out of memory)
 * found in file.  Returns 1, or -1 with *errp when out of memory. */
static int set_problem(struct bchain *c, struct cbt_error **errp,
                       const char *file, char *msg)
{
    if (c->problem) {
        free(msg);
        return 1;
    }
    c->problem = msg;
    c->bad_file = strdup(file);
    if (!c->problem || !c->bad_file) {
        cbt_error_set(errp, ENOMEM, "%s: out of memory", file);
        return -1;
    }
    return 1;
}

/* Record the first problem: "FILE: message". */
static int problem(struct bchain *c, struct cbt_error **errp, const char *file,
                   const char *fmt, ...) PRINTF_FMT(4, 5);
static int problem(struct bchain *c, struct cbt_error **errp, const char *file,
                   const char *fmt, ...)
{
    char *msg = NULL;
    va_list ap;
    va_start(ap, fmt);
    int r = vasprintf(&msg, fmt, ap);
    va_end(ap);
    char *line = r < 0 ? NULL : cbt_strdup_printf("%s: %s", file, msg);
    free(r < 0 ? NULL : msg);
    return set_problem(c, errp, file, line);
}

/* A library error about `file` becomes the problem: its message says
 * what, and gets "FILE: " in front unless it starts with that.  Out
 * of memory stays an error.  Takes err. */
static int problem_from(struct bchain *c, struct cbt_error **errp,
                        const char *file, struct cbt_error *err)
{
    /* Not a verdict on the backup: out of memory, or a file another
     * process holds (the lock conflict keeps its kind and exit status). */
    if (cbt_error_errno(err) == ENOMEM ||
        cbt_error_kind(err) == CBT_ERR_IN_USE) {
        if (errp && !*errp)
            *errp = err;
        else
            cbt_error_free(err);
        return -1;
    }
    const char *msg = cbt_error_message(err);
    size_t fl = strlen(file);
    bool named = strncmp(msg, file, fl) == 0 && msg[fl] == ':';
    char *line = named ? strdup(msg) : cbt_strdup_printf("%s: %s", file, msg);
    cbt_error_free(err);
    return set_problem(c, errp, file, line);
}

static const char *base_name(const char *path)
{
    const char *s = strrchr(path, '/');
    return s ? s + 1 : path;
}

/* The open flag of BCHAIN_FORCE_SHARE. */
static unsigned share(const struct bchain *c)
{
    return (c->flags & BCHAIN_FORCE_SHARE) ? CBT_OPEN_FORCE_SHARE : 0;
}


/* ---- opening the chain ---- */

/* Step 1: the parent's image and manifest exist (the manifest's digest is
 * checked in load_link, on the bytes it parses). */
static int check_parent_files(struct bchain *c, size_t i,
                              struct cbt_error **errp)
{
    struct bchain_link *l = &c->v[i], *child = &c->v[i - 1];
    struct stat st;
    if (stat(l->image, &st) < 0) {
        c->missing = errno == ENOENT;
        return problem(c, errp, l->image, "%s (the parent backup named by "
                       "%s)", strerror(errno), child->manifest_path);
    }
    if (stat(l->manifest_path, &st) < 0) {
        c->missing = errno == ENOENT;
        return problem(c, errp, l->manifest_path, "%s (the manifest of %s, "
                       "the parent of %s)", strerror(errno), l->image,
                       child->image);
    }
    return 0;
}

/* Step 3: the link against its child. */
static int check_against_child(struct bchain *c, size_t i,
                               struct cbt_error **errp)
{
    const struct manifest *m = &c->v[i].m, *cm = &c->v[i - 1].m;
    const char *mp = c->v[i].manifest_path, *cmp = c->v[i - 1].manifest_path;
    if (strcasecmp(m->disk_id, cm->disk_id) != 0)
        return problem(c, errp, mp, "a backup of disk %s, but its child %s "
                       "is one of disk %s", m->disk_id, cmp, cm->disk_id);
    if (strcmp(m->image_format, cm->image_format) != 0)
        return problem(c, errp, mp, "a %s backup, but its child %s is %s",
                       m->image_format, cmp, cm->image_format);
    if (m->checkpoint_order >= cm->checkpoint_order)
        return problem(c, errp, cmp, "checkpoint '%s' (order %" PRIu64 ") is "
                       "not newer than its parent's '%s' (order %" PRIu64
                       ", %s)", cm->checkpoint, cm->checkpoint_order,
                       m->checkpoint, m->checkpoint_order, mp);
    if (cm->kind == CBT_BACKUP_FULL)
        return problem(c, errp, cmp, "a full backup with a parent");
    if (!cm->since || !m->checkpoint || strcmp(cm->since, m->checkpoint) != 0)
        return problem(c, errp, cmp, "an %s backup since checkpoint '%s', "
                       "but its parent %s created '%s'", cbt_backup_mode_name(cm->kind),
                       cm->since ? cm->since : "(none)", mp,
                       m->checkpoint ? m->checkpoint : "none");
    return 0;
}

/* Step 4: the block hashes file. */
static int check_hashes(struct bchain *c, struct bchain_link *l,
                        struct cbt_error **errp)
{
    l->hashes_path = manifest_sibling(l->image, l->m.hash_file);
    if (!l->hashes_path) {
        cbt_error_set(errp, ENOMEM, "%s: out of memory", l->image);
        return -1;
    }
    if (!l->m.tree && strcasecmp(l->m.root, l->m.hash_file_sha256) != 0)
        return problem(c, errp, l->manifest_path, "root hash %s differs from "
                       "the SHA-256 of its block hashes %s", l->m.root,
                       l->m.hash_file_sha256);
    struct stat st;
    if (stat(l->hashes_path, &st) < 0) {
        c->missing = errno == ENOENT;
        return problem(c, errp, l->hashes_path, "%s (the block hashes of %s)",
                       strerror(errno), l->image);
    }
    struct cbt_error *err = NULL;
    if (l->m.tree) {
        /* Its header here; its records, their digest and the root when
         * the view is opened (bchain_open), in one read. */
        if (tree_file_quick_check(l->hashes_path, l->m.blocks, &err) < 0)
            return problem_from(c, errp, l->hashes_path, err);
        return 0;
    }
    if (c->flags & BCHAIN_CHEAP) {
        int fd = hashes_open(l->hashes_path, l->m.blocks, &err);
        if (fd < 0)
            return problem_from(c, errp, l->hashes_path, err);
        close(fd);
        return 0;
    }
    char hex[65];
    if (hashes_sha256(l->hashes_path, l->m.blocks, hex, &err) < 0)
        return problem_from(c, errp, l->hashes_path, err);
    if (strcasecmp(hex, l->m.hash_file_sha256) != 0)
        return problem(c, errp, l->hashes_path, "SHA-256 %s differs from %s "
                       "recorded in %s", hex, l->m.hash_file_sha256,
                       l->manifest_path);
    return 0;
}

/* Step 5 for a qcow2 image: size, backing link, consistency check. */
static int check_qcow2_image(struct bchain *c, struct bchain_link *l,
                             struct cbt_image *img, struct cbt_error **errp)
{
    const char *want = l->m.parent_file;
    const char *have = img->backing_name;
    if (!want && have)
        return problem(c, errp, l->image, "has the backing file '%s', but it "
                       "is a full backup (%s)", have, l->manifest_path);
    if (want && (!have || strcmp(want, have) != 0))
        return problem(c, errp, l->image, "backing file is '%s', but its "
                       "parent backup is '%s' (%s)", have ? have : "(none)",
                       want, l->manifest_path);
    if (want && img->backing_fmt && strcmp(img->backing_fmt, "qcow2") != 0)
        return problem(c, errp, l->image, "backing format is '%s', not qcow2",
                       img->backing_fmt);
    if (c->flags & BCHAIN_CHEAP)
        return 0;

    struct cbt_check_result res;
    memset(&res, 0, sizeof(res));
    struct cbt_error *err = NULL;
    unsigned fix = (c->flags & BCHAIN_FORCE_SHARE) ? CBT_CHECK_FORCE_SHARE : 0;
    if (cbt_image_check(l->image, "qcow2", fix, &res, NULL, NULL, &err) < 0)
        return problem_from(c, errp, l->image, err);
    struct stat st;
    if (stat(l->image, &st) < 0)
        return problem(c, errp, l->image, "%s", strerror(errno));
    /* A valid image may end inside its last cluster (e.g. after an L1
     * table of a few bytes): truncated means a whole cluster is missing. */
    uint64_t cs = img->cluster_size ? img->cluster_size : 512;
    if (res.image_end_offset > ALIGN_UP((uint64_t)st.st_size, cs))
        return problem(c, errp, l->image, "truncated: the file is %" PRIu64
                       " bytes, but its clusters reach at least %" PRIu64,
                       (uint64_t)st.st_size, res.image_end_offset);
    if (res.corruptions || res.check_errors)
        return problem(c, errp, l->image, "damaged: the consistency check "
                       "found %" PRId64 " corruptions and %" PRId64 " other "
                       "errors (a check of the image lists them)",
                       res.corruptions,
                       res.check_errors);
    return 0;
}

/* Step 5.  Only a regular file is opened: a backup image replaced by a
 * FIFO or a device would block or never end. */
static int check_image(struct bchain *c, struct bchain_link *l,
                       struct cbt_error **errp)
{
    struct cbt_error *err = NULL;
    struct stat st;
    if (stat(l->image, &st) < 0) {
        c->missing = errno == ENOENT;
        return problem(c, errp, l->image, "%s (the backup image of %s)",
                       strerror(errno), l->manifest_path);
    }
    if (!S_ISREG(st.st_mode))
        return problem(c, errp, l->image, "the backup image is not a regular "
                       "file");
    struct cbt_image *img = cbt_image_open(l->image, l->m.image_format,
                                           CBT_OPEN_NO_BACKING | share(c), &err);
    if (!img)
        return problem_from(c, errp, l->image, err);
    uint64_t vs = l->m.virtual_size, size = cbt_image_size(img);
    int r = 0;
    if (c->qcow2) {
        if (size < vs || size > ALIGN_UP(vs, (uint64_t)512))
            r = problem(c, errp, l->image, "virtual size is %" PRIu64 ", but "
                        "%s records %" PRIu64, size, l->manifest_path, vs);
        else
            r = check_qcow2_image(c, l, img, errp);
        cbt_image_close(img, NULL);
        return r;
    }
    if (size != vs) {
        r = problem(c, errp, l->image, "%s: the file is %" PRIu64 " bytes, "
                    "but %s records a virtual size of %" PRIu64,
                    size < vs ? "truncated" : "wrong size", size,
                    l->manifest_path, vs);
        cbt_image_close(img, NULL);
        return r;
    }
    if (c->flags & BCHAIN_CHEAP)
        cbt_image_close(img, NULL);
    else
        l->raw = img;
    return 0;
}

/* Steps 1 to 5 for link i (image and manifest_path set). */
static int load_link(struct bchain *c, size_t i, struct cbt_error **errp)
{
    struct bchain_link *l = &c->v[i];
    int r;
    if (i > 0 && (r = check_parent_files(c, i, errp)) != 0)
        return r;
    struct cbt_error *err = NULL;
    char sha[65];
    r = manifest_read(l->manifest_path, &l->m, sha, &err);
    if (i > 0 && sha[0] &&
        strcasecmp(sha, c->v[i - 1].m.parent_manifest_sha256) != 0) {
        cbt_error_free(err);
        return problem(c, errp, l->manifest_path, "SHA-256 %s differs from "
                       "%s recorded in %s: the manifest was changed or "
                       "replaced", sha, c->v[i - 1].m.parent_manifest_sha256,
                       c->v[i - 1].manifest_path);
    }
    if (r < 0)
        return problem_from(c, errp, l->manifest_path, err);
    if (!l->m.complete)
        return problem(c, errp, l->manifest_path, "describes an incomplete "
                       "backup");
    if (strcmp(l->m.image_file, base_name(l->image)) != 0)
        return problem(c, errp, l->manifest_path, "describes the image '%s', "
                       "not '%s'", l->m.image_file, base_name(l->image));
    if (i == 0)
        c->qcow2 = strcmp(l->m.image_format, "qcow2") == 0;
    else if ((r = check_against_child(c, i, errp)) != 0)
        return r;
    if ((r = check_hashes(c, l, errp)) != 0)
        return r;
    return check_image(c, l, errp);
}

static int add_link(struct bchain *c, const char *image,
                    struct cbt_error **errp)
{
    struct bchain_link *v = realloc(c->v, (c->n + 1) * sizeof(*v));
    if (!v) {
        cbt_error_set(errp, ENOMEM, "%s: out of memory", image);
        return -1;
    }
    c->v = v;
    struct bchain_link *l = &v[c->n];
    memset(l, 0, sizeof(*l));
    c->n++;
    l->image = strdup(image);
    l->manifest_path = manifest_path_for(image);
    if (!l->image || !l->manifest_path) {
        cbt_error_set(errp, ENOMEM, "%s: out of memory", image);
        return -1;
    }
    return 0;
}

/* The qcow2 view: the top image with its backing chain, which must be the
 * backups of the chain, layer for layer. */
static int open_qcow2_view(struct bchain *c, struct cbt_error **errp)
{
    struct cbt_error *err = NULL;
    c->top = cbt_image_open(c->v[0].image, "qcow2", share(c), &err);
    if (!c->top)
        return problem_from(c, errp, c->v[0].image, err);
    size_t depth = 0;
    for (struct cbt_image *l = c->top; l; l = cbt_image_backing(l)) {
        if (depth < c->n) {
            struct stat a, b;
            if (stat(c->v[depth].image, &b) < 0 || fstat(l->fd, &a) < 0 ||
                a.st_dev != b.st_dev || a.st_ino != b.st_ino)
                return problem(c, errp, cbt_image_filename(l), "is layer %zu "
                               "of the qcow2 chain of %s, but the backup "
                               "chain has %s there", depth, c->v[0].image,
                               c->v[depth].image);
        }
        depth++;
    }
    if (depth != c->n)
        return problem(c, errp, c->v[0].image, "its qcow2 chain has %zu "
                       "layers, its backup chain %zu backups", depth, c->n);
    return 0;
}

size_t bchain_tree_links(const struct bchain *c)
{
    size_t n = 0;
    while (n < c->n && c->v[n].m.tree)
        n++;
    return n;
}

/* v[0]'s sha256-tree-v2 view: each record file of its chain read once,
 * checked against its manifest's file-sha256, then the records against
 * v[0]'s root.  0, 1 with the problem, or -1. */
static int open_tree_view(struct bchain *c, struct cbt_error **errp)
{
    size_t n = bchain_tree_links(c), bad = 0;
    CLEANUP_FREE const char **paths = calloc(n, sizeof(*paths));
    CLEANUP_FREE const char **sha = calloc(n, sizeof(*sha));
    CLEANUP_FREE uint64_t *blocks = calloc(n, sizeof(*blocks));
    if (!paths || !sha || !blocks) {
        cbt_error_set(errp, ENOMEM, "%s: out of memory", c->v[0].image);
        return -1;
    }
    for (size_t i = 0; i < n; i++) {
        paths[i] = c->v[i].hashes_path;
        sha[i] = c->v[i].m.hash_file_sha256;
        blocks[i] = c->v[i].m.blocks;
    }
    struct cbt_error *err = NULL;
    if (leaf_src_open_tree(&c->leaves, c->size, paths, blocks, sha, n, &bad,
                           &err) < 0)
        return problem_from(c, errp, paths[bad], err);
    if (leaf_src_check_root(&c->leaves, c->v[0].m.root, &err) < 0) {
        /* The error names the record file at fault. */
        const char *msg = cbt_error_message(err);
        const char *file = paths[0];
        for (size_t i = 0; i < n; i++)
            if (strncmp(msg, paths[i], strlen(paths[i])) == 0 &&
                msg[strlen(paths[i])] == ':')
                file = paths[i];
        return problem_from(c, errp, file, err);
    }
    return 0;
}

int bchain_open(const char *backup, unsigned flags, struct bchain *c,
                struct cbt_error **errp)
{
    memset(c, 0, sizeof(*c));
    c->flags = flags;
    struct stat st;
    if (stat(backup, &st) < 0) {
        cbt_error_set(errp, errno, "%s: %s", backup, strerror(errno));
        return -1;
    }
    if (S_ISDIR(st.st_mode)) {
        cbt_error_set(errp, EISDIR, "%s: a folder, not a backup image",
                      backup);
        return -1;
    }
    CLEANUP_FREE char *mpath = manifest_path_for(backup);
    if (!mpath) {
        cbt_error_set(errp, ENOMEM, "%s: out of memory", backup);
        return -1;
    }
    /* A prune a kill interrupted is finished first (foldertx.c). */
    if (foldertx_recover_beside(backup, errp) < 0)
        return -1;
    if (stat(mpath, &st) < 0) {
        cbt_error_set(errp, errno, "%s: not a backup: no manifest %s (%s)",
                      backup, mpath, strerror(errno));
        return -1;
    }

    int r = add_link(c, backup, errp);
    for (size_t i = 0; r == 0; i++) {
        r = load_link(c, i, errp);
        if (r != 0)
            break;
        const struct bchain_link *l = &c->v[i];
        if (!l->m.parent_file) {
            if (l->m.kind != CBT_BACKUP_FULL)
                r = problem(c, errp, l->manifest_path, "an %s backup without "
                            "a parent: the chain does not reach a full "
                            "backup", cbt_backup_mode_name(l->m.kind));
            break;
        }
        if (c->n >= BLK_MAX_CHAIN_DEPTH) {
            r = problem(c, errp, c->v[0].image, "its chain is longer than "
                        "%d backups", BLK_MAX_CHAIN_DEPTH);
            break;
        }
        CLEANUP_FREE char *parent = manifest_sibling(l->image,
                                                     l->m.parent_file);
        if (!parent) {
            cbt_error_set(errp, ENOMEM, "%s: out of memory", l->image);
            return -1;
        }
        r = add_link(c, parent, errp);
    }
    if (r != 0)
        return r;

    c->size = c->v[0].m.virtual_size;
    if (flags & BCHAIN_CHEAP)
        return 0;
    struct cbt_error *err = NULL;
    if (c->v[0].m.tree) {
        if ((r = open_tree_view(c, errp)) != 0)
            return r;
    } else if (leaf_src_open_v1(&c->leaves, c->v[0].hashes_path, c->size,
                                NULL, &err) < 0) {
        /* Its digest was checked with the link; the leaves are paged in
         * as the walk goes (8 GiB of them for a 16 TiB disk). */
        return problem_from(c, errp, c->v[0].hashes_path, err);
    }
    if (c->qcow2 && (r = open_qcow2_view(c, errp)) != 0)
        return r;
    return 0;
}

void bchain_close(struct bchain *c)
{
    for (size_t i = 0; i < c->n; i++) {
        struct bchain_link *l = &c->v[i];
        if (l->raw)
            cbt_image_close(l->raw, NULL);
        manifest_free(&l->m);
        free(l->image);
        free(l->manifest_path);
        free(l->hashes_path);
    }
    free(c->v);
    if (c->top)
        cbt_image_close(c->top, NULL);
    leaf_src_close(&c->leaves);
    free(c->problem);
    free(c->bad_file);
    memset(c, 0, sizeof(*c));
}

/* ---- the guest view ---- */

/* A run of the view with one source: [start, end) reads as zeroes or from
 * backup `link` (-1: no backup holds it, it reads as zeroes). */
struct run {
    uint64_t start, end;
    bool zero;
    int link;
};

/* The raw chain's run at off (see the top of the file). */
static void raw_run(const struct bchain *c, uint64_t off, struct run *r)
{
    uint64_t end = c->size;
    r->start = off;
    r->zero = true;
    r->link = -1;
    for (size_t i = 0; i < c->n; i++) {
        const struct manifest *m = &c->v[i].m;
        if (off >= m->virtual_size)
            break;
        end = MIN(end, m->virtual_size);
        /* The first extent ending after off. */
        size_t lo = 0, hi = m->nextents;
        while (lo < hi) {
            size_t mid = lo + (hi - lo) / 2;
            const struct manifest_extent *e = &m->extents[mid];
            if (e->start + e->length <= off)
                lo = mid + 1;
            else
                hi = mid;
        }
        if (lo < m->nextents) {
            const struct manifest_extent *e = &m->extents[lo];
            if (e->start <= off) {
                r->end = MIN(end, e->start + e->length);
                r->zero = e->zero;
                r->link = (int)i;
                return;
            }
            end = MIN(end, e->start);
        }
    }
    r->end = end;
}

static int run_at(struct bchain *c, uint64_t off, struct run *r)
{
    if (!c->qcow2) {
        raw_run(c, off, r);
        return 0;
    }
    struct cbt_extent e;
    int ret = cbt_image_block_status(c->top, off, c->size - off, &e);
    if (ret < 0)
        return ret;
    r->start = off;
    r->end = off + e.length;
    r->zero = (e.flags & CBT_BS_ZERO) != 0;
    r->link = (e.flags & CBT_BS_PRESENT) ? e.depth : -1;
    return 0;
}

/* The run holding off, from the cache when it has it. */
static int run_cached(struct bchain *c, uint64_t off, struct run *cur)
{
    if (off >= cur->start && off < cur->end)
        return 0;
    return run_at(c, off, cur);
}

/* Does the block at off read as zeroes by the chain's own account? */
static int block_zero(struct bchain *c, uint64_t off, struct run *cur,
                      bool *zero)
{
    uint64_t end = MIN(off + BLOCK, c->size);
    for (uint64_t p = off; p < end; p = cur->end) {
        int r = run_cached(c, p, cur);
        if (r < 0)
            return r;
        if (!cur->zero) {
            *zero = false;
            return 0;
        }
    }
    *zero = true;
    return 0;
}

/* The layer `depth` below the top of a qcow2 chain (0: the top). */
static struct cbt_image *layer_at(const struct bchain *c, int depth)
{
    struct cbt_image *img = c->top;
    for (int d = 0; d < depth && img; d++)
        img = cbt_image_backing(img);
    return img;
}

/*
 * Read [off, off+len) of the view run by run, each from the one layer that
 * holds it (the run cache says which, from the block status the walk asked
 * anyway), so a read costs one layer's lookup however deep the chain: read
 * through the top, every cluster a layer lacks would be looked up again in
 * each layer below it, 50 lookups a block under 50 incrementals.
 */
static int read_view(struct bchain *c, uint8_t *buf, size_t len, uint64_t off,
                     struct run *cur)
{
    for (uint64_t p = off; p < off + len;) {
        int r = run_cached(c, p, cur);
        if (r < 0)
            return r;
        size_t n = (size_t)(MIN(cur->end, off + len) - p);
        struct cbt_image *src = NULL;
        if (!cur->zero && cur->link >= 0)
            src = c->qcow2 ? layer_at(c, cur->link) : c->v[cur->link].raw;
        if (!cur->zero && c->qcow2 && (!src || p >= cbt_image_size(src)))
            src = c->top; /* cannot happen (status said so); be safe */
        if (!src)
            memset(buf + (p - off), 0, n);
        else if ((r = cbt_image_pread(src, buf + (p - off), n, p)) < 0)
            return r;
        p += n;
    }
    return 0;
}

/* Block idx did not match: name it and the backup(s) holding it. */
static int bad_block(struct bchain *c, uint64_t idx, struct cbt_error **errp)
{
    uint64_t off = idx * BLOCK, len = MIN(BLOCK, c->size - off);
    int holders[2] = {-1, -1};
    struct run cur = {0};
    for (uint64_t p = off; p < off + len; p = cur.end) {
        int r = run_at(c, p, &cur);
        if (r < 0) {
            cbt_error_set(errp, -r, "%s: cannot read block status at offset "
                          "%" PRIu64 ": %s", c->v[0].image, p, strerror(-r));
            return -1;
        }
        if (cur.link < 0 || cur.link == holders[0] || cur.link == holders[1])
            continue;
        if (holders[0] < 0)
            holders[0] = cur.link;
        else if (holders[1] < 0)
            holders[1] = cur.link;
    }
    c->bad_range = true;
    c->bad_offset = off;
    c->bad_length = len;
    const char *hashes = c->v[0].hashes_path;
    if (holders[0] < 0)
        return problem(c, errp, c->v[0].image, "guest range at offset %" PRIu64
                       ", length %" PRIu64 " (block %" PRIu64 ") reads as "
                       "zeroes in every backup of the chain, but its hash in "
                       "%s is not that of zeroes", off, len, idx, hashes);
    const struct bchain_link *h = &c->v[holders[0]];
    if (holders[1] >= 0)
        return problem(c, errp, h->image, "guest range at offset %" PRIu64
                       ", length %" PRIu64 " (block %" PRIu64 ") does not "
                       "match its hash in %s (the block also has data from "
                       "%s)", off, len, idx, hashes,
                       c->v[holders[1]].image);
    return problem(c, errp, h->image, "guest range at offset %" PRIu64
                   ", length %" PRIu64 " (block %" PRIu64 ") does not match "
                   "its hash in %s", off, len, idx, hashes);
}

/*
 * The walk runs on the block pipeline (blockpipe.h): this thread cuts the
 * view into segments (a 64 KiB block that is read, or a stretch of blocks
 * the chain holds as zeroes, not read) and reads them; worker threads
 * compare each block's digest with its leaf; the drain thread passes the
 * checked segments to `piece`, in order, and stops at the first segment
 * with a bad block, so nothing after it is passed on.
 */
struct walk {
    struct bchain *c;
    bchain_piece_fn *piece;
    void *opaque;
    cbt_progress_fn *progress;
    void *progress_opaque;
    uint64_t *checked;
    struct cbt_error **errp;
    uint64_t off;        /* fill: the next guest offset */
    struct run cur;      /* fill: the run cache */
    int fill_err;        /* fill: -errno */
    const char *fill_what;
    uint64_t fill_off;
    uint64_t bad;        /* drain: the first bad block */
    uint8_t *zpat;       /* WALK_ZPAT copies of the zero block's digest */
};

#define WALK_ZPAT ((size_t)4096)

#define WALK_STOP_BAD 1
#define WALK_STOP_PIECE (-1)
#define WALK_STOP_IO (-2)

/*
 * The leaves of a new segment, looked up by the fill thread (the reader is
 * not shared): a data block's leaf goes into the segment for the hash
 * stage; a stretch of zeroes is checked here, each leaf against the digest
 * of zeroes, and its first mismatch marked bad.  0 or -errno.
 */
static int seg_leaves(struct walk *w, struct bp_seg *g)
{
    const uint8_t *leaf;
    uint64_t nl, first = g->off / BLOCK;
    if (g->data) {
        int r = leaf_src_window(&w->c->leaves, first, &leaf, &nl);
        if (r == 0)
            memcpy(g->digest, leaf, 32);
        return r;
    }
    /* A stretch of zeroes: its first leaf that is not the digest of
     * zeroes (the short last block's own), if any. */
    uint64_t bad;
    int r = leaf_src_nonzero(&w->c->leaves, first, DIV_ROUND_UP(g->len, BLOCK),
                             &bad);
    if (r == 0 && bad != UINT64_MAX)
        g->bad = bad + 1;
    return r;
}

static int walk_fill(void *opaque, struct bp_chunk *ch)
{
    struct walk *w = opaque;
    struct bchain *c = w->c;
    while (ch->n < BP_SEGS && w->off < c->size) {
        bool zero, next;
        uint64_t off = w->off, end = MIN(off + BLOCK, c->size);
        int r = block_zero(c, off, &w->cur, &zero);
        while (r == 0 && zero && end < c->size && end - off < ZERO_PIECE) {
            if (w->cur.zero && end >= w->cur.start && end < w->cur.end) {
                /* The cached run is zeroes past end: its whole blocks
                 * at once, not one block_zero each. */
                uint64_t to = w->cur.end >= c->size
                                  ? c->size : ALIGN_DOWN(w->cur.end, BLOCK);
                to = MIN(to, off + ZERO_PIECE);
                if (to > end) {
                    end = to;
                    continue;
                }
            }
            r = block_zero(c, end, &w->cur, &next);
            if (r == 0 && !next)
                break;
            end = MIN(end + BLOCK, c->size);
        }
        if (r < 0) {
            w->fill_err = r;
            w->fill_what = "cannot read block status";
            w->fill_off = end;
            return WALK_STOP_IO;
        }
        uint8_t *data = NULL;
        if (!zero && !(data = bp_take(ch, (size_t)BLOCK)))
            break;
        ch->seg[ch->n] = (struct bp_seg){.off = off, .len = end - off,
                                         .data = data};
        r = seg_leaves(w, &ch->seg[ch->n]);
        if (r < 0) {
            w->fill_err = r;
            w->fill_what = "cannot read the block hashes file, for the block";
            w->fill_off = off;
            return WALK_STOP_IO;
        }
        ch->n++;
        w->off = end;
    }
    if (ch->n == 0)
        return 0;
    /* One read per run of adjacent blocks (adjacent in the buffer too). */
    for (size_t i = 0, j; i < ch->n; i = j) {
        j = i + 1;
        if (!ch->seg[i].data)
            continue;
        uint64_t len = ch->seg[i].len;
        for (; j < ch->n && ch->seg[j].data &&
               ch->seg[j].off == ch->seg[j - 1].off + ch->seg[j - 1].len; j++)
            len += ch->seg[j].len;
        int r = read_view(c, ch->seg[i].data, (size_t)len, ch->seg[i].off,
                          &w->cur);
        if (r < 0) {
            w->fill_err = r;
            w->fill_what = "error while reading the guest view";
            w->fill_off = ch->seg[i].off;
            return WALK_STOP_IO;
        }
    }
    return 1;
}

/* Compare each block with its leaf; seg->bad = first bad block + 1. */
static int walk_hash(void *opaque, struct bp_chunk *ch, size_t i, size_t j)
{
    (void)opaque;
    for (size_t k = i; k < j; k++) {
        struct bp_seg *g = &ch->seg[k];
        if (!g->data)
            continue; /* zeroes: checked by seg_leaves */
        uint8_t d[32];
        blockhash_digest(g->data, (size_t)g->len, d); /* one block */
        if (memcmp(d, g->digest, 32) != 0)
            g->bad = g->off / BLOCK + 1;
    }
    return 0;
}

static int walk_drain(void *opaque, struct bp_chunk *ch)
{
    struct walk *w = opaque;
    for (size_t i = 0, j; i < ch->n; i = j) {
        struct bp_seg *g = &ch->seg[i];
        if (g->bad) {
            w->bad = g->bad - 1;
            if (w->checked)
                *w->checked = w->bad * BLOCK;
            return WALK_STOP_BAD;
        }
        /* Adjacent data segments are one piece (one write). */
        uint64_t len = g->len;
        for (j = i + 1; g->data && j < ch->n && ch->seg[j].data &&
                        !ch->seg[j].bad &&
                        ch->seg[j].off == g->off + len;
             j++)
            len += ch->seg[j].len;
        if (w->piece &&
            w->piece(w->opaque, g->data, g->off, (size_t)len, w->errp) < 0)
            return WALK_STOP_PIECE;
        if (w->checked)
            *w->checked = g->off + len;
        if (w->progress)
            w->progress(w->progress_opaque, g->off + len, w->c->size);
    }
    return 0;
}

static bool walk_cancelled(void *opaque)
{
    struct walk *w = opaque;
    return ops_cancelled(w->c->cancel, w->c->cancel_opaque);
}

int bchain_walk(struct bchain *c, bchain_piece_fn *piece, void *opaque,
                cbt_progress_fn *progress, void *progress_opaque,
                uint64_t *checked, struct cbt_error **errp)
{
    static const struct bp_ops ops = {
        .fill = walk_fill,
        .hash = walk_hash,
        .drain = walk_drain,
        .cancelled = walk_cancelled,
    };
    struct walk w = {.c = c, .piece = piece, .opaque = opaque,
                     .progress = progress, .progress_opaque = progress_opaque,
                     .checked = checked, .errp = errp};
    w.zpat = malloc(WALK_ZPAT * 32);
    if (!w.zpat) {
        cbt_error_set(errp, ENOMEM, "%s: out of memory", c->v[0].image);
        return -1;
    }
    blockhash_zero_digest((size_t)BLOCK, w.zpat);
    for (size_t i = 1; i < WALK_ZPAT; i++)
        memcpy(w.zpat + i * 32, w.zpat, 32);
    if (checked)
        *checked = 0;
    if (progress)
        progress(progress_opaque, 0, c->size);
    int r = bp_run(&ops, &w, 0);
    free(w.zpat);
    switch (r) {
    case 0:
        return 0;
    case WALK_STOP_BAD:
        return bad_block(c, w.bad, errp) < 0 ? -1 : 1;
    case WALK_STOP_PIECE:
        return -1;
    case -ECANCELED:
        return 2;
    case WALK_STOP_IO:
        if (errp && *errp)
            return -1;
        cbt_error_set(errp, -w.fill_err, "%s: %s at offset %" PRIu64 ": %s",
                      c->v[0].image, w.fill_what, w.fill_off,
                      strerror(-w.fill_err));
        return -1;
    default:
        if (!(errp && *errp))
            cbt_error_set(errp, -r, "%s: cannot run the walk: %s",
                          c->v[0].image, strerror(-r));
        return -1;
    }
}

/* ---- cbt verify ---- */

/* res->chain: the manifests from backup down its parent links, as far as
 * they read (manifest_read: regular files, bounded; names plain, so never
 * out of the folder), oldest first; at most BLK_MAX_CHAIN_DEPTH (a loop
 * stops there).  -1 only when out of memory. */
static int list_chain(const char *backup, struct cbt_verify_result *res)
{
    char *image = strdup(backup);
    if (!image)
        return -1;
    while (image && res->nchain < BLK_MAX_CHAIN_DEPTH) {
        CLEANUP_FREE char *mpath = manifest_path_for(image);
        if (!mpath)
            goto oom;
        struct manifest m;
        struct cbt_error *err = NULL;
        if (manifest_read(mpath, &m, NULL, &err) < 0) {
            cbt_error_free(err);
            break;
        }
        struct cbt_verify_backup *v =
            realloc(res->chain, (res->nchain + 1) * sizeof(*v));
        if (!v) {
            manifest_free(&m);
            goto oom;
        }
        res->chain = v;
        v[res->nchain++] = (struct cbt_verify_backup){
            .file = image,
            .kind = m.kind,
            .checkpoint = m.checkpoint,
            .virtual_size = m.virtual_size,
            .copied = m.copied,
        };
        m.checkpoint = NULL;
        image = m.parent_file ? manifest_sibling(image, m.parent_file) : NULL;
        bool lost = m.parent_file && !image;
        manifest_free(&m);
        if (lost)
            goto oom;
        if (!image)
            break;
    }
    free(image);
    for (size_t i = 0, n = res->nchain; i < n / 2; i++) {
        struct cbt_verify_backup t = res->chain[i];
        res->chain[i] = res->chain[n - 1 - i];
        res->chain[n - 1 - i] = t;
    }
    return 0;
oom:
    free(image);
    return -1;
}

int cbt_verify(const struct cbt_verify_opts *opts,
               struct cbt_verify_result *res, struct cbt_error **errp)
{
    memset(res, 0, sizeof(*res));
    struct cbt_verify_opts o;
    if (OPTS_COPY(&o, opts, cbt_verify_opts, errp) < 0)
        return -1;
    WARN_SCOPE(o.warn, o.warn_opaque);
    const char *backup = o.backup;
    if (!backup || !*backup) {
        cbt_error_set(errp, EINVAL, "verify: empty file name");
        return -1;
    }
    struct bchain c;
    int r = bchain_open(backup,
                        (o.flags & CBT_VERIFY_FORCE_SHARE)
                            ? BCHAIN_FORCE_SHARE
                            : 0,
                        &c, errp);
    if (r == 0) {
        c.cancel = o.cancel;
        c.cancel_opaque = o.cancel_opaque;
        r = bchain_walk(&c, NULL, NULL, o.progress, o.progress_opaque,
                        &res->bytes_checked, errp);
        if (r == 2) {
            ops_cancel_error(errp, backup, "nothing was written");
            r = -1;
        }
    }
    if (r >= 0 && list_chain(backup, res) < 0) {
        cbt_error_set(errp, ENOMEM, "%s: out of memory", backup);
        r = -1;
    }
    if (r >= 0) {
        res->backups = c.n;
        res->ok = r == 0;
        if (r == 1) {
            res->problem = c.problem;
            res->bad_file = c.bad_file;
            c.problem = c.bad_file = NULL;
            if (c.bad_range) {
                res->bad_offset = c.bad_offset;
                res->bad_length = c.bad_length;
            }
        }
        r = 0;
    }
    bchain_close(&c);
    if (r < 0)
        cbt_verify_result_free(res);
    return r;
}

void cbt_verify_result_free(struct cbt_verify_result *res)
{
    if (!res)
        return;
    free(res->problem);
    free(res->bad_file);
    for (size_t i = 0; i < res->nchain; i++) {
        free(res->chain[i].file);
        free(res->chain[i].checkpoint);
    }
    free(res->chain);
    memset(res, 0, sizeof(*res));
}
