/*
 * Backups read from an NBD export someone else set up (nbdbackup.h).
 *
 * libvirt's pull-mode backup-begin, qemu-nbd -B on a closed image and a
 * qemu-storage-daemon export with bitmaps all show a disk at one instant,
 * with base:allocation and, for an incremental, a dirty bitmap of what
 * changed since an older checkpoint.  The export's owner made both
 * checkpoints; cbt sends no QMP and creates none.  So the backup is
 * backup.c's live path (cbt_backup_live) with trivial hooks: the view is
 * frozen already, there is nothing to commit in the disk, nothing to undo.
 *
 * What cbt knows of the disk's checkpoints
 * ----------------------------------------
 * Only the backup folder: every complete manifest there that created a
 * checkpoint is one checkpoint of its disk id, with the manifest's order
 * and size.  The disk id of a backup since checkpoint C is the id of the
 * backup in the folder that created C (--disk-id picks one when backups of
 * several disks did); a full backup's is new, unless given.  The new
 * checkpoint's order is one more than the highest its disk's backups in
 * the folder recorded (cbt's own numbering: the owner's checkpoints have
 * none that NBD shows), its creation time the instant cbt started reading.
 * The backup is an incremental when C is the newest of its disk's
 * checkpoints in the folder, a differential otherwise.
 *
 * Why a full backup is needed
 * ---------------------------
 * backup.c refuses (CBT_ERR_NEED_FULL), or with --auto takes a full
 * backup, when the checkpoint C it starts from cannot be used; here C is
 * unusable when no backup in the folder created it, when the export has
 * no such bitmap, or when the export's size differs from the size the disk
 * had at C's backup (a resize: a dirty bitmap cannot say what changed).
 * The connection is made before the plan, which needs the export's size
 * and whether it has the bitmap; the export holds its instant all along.
 */
#include <assert.h>
#include <ctype.h>
#include <inttypes.h>
#include <stdio.h>
#include <time.h>

#include "../ops/backup_live.h"
#include "../ops/checkpoint_meta.h"
#include "../ops/manifest.h"
#include "nbd.h"
#include "nbdbackup.h"

/* A backup in the folder that created a checkpoint. */
struct rec {
    char *file;           /* the backup image's file name */
    char *checkpoint;
    char disk_id[37];
    uint64_t order;
    uint64_t size;        /* the disk's virtual size then */
};

struct nb {
    struct bk_live l;     /* first: the hooks get &nb->l */
    const struct cbt_backup_opts *o;
    char *dir;
    struct rec *recs;
    size_t nrecs;
    const struct rec *since;   /* the backup that created o->since */
    char *since_problem;       /* why o->since cannot be used, or NULL */
    struct live_nbd *nbd;
    bool has_bitmap;
    int64_t sec;               /* when cbt started reading */
    uint32_t nsec;
    struct live_nbd_source src;
};

static struct nb *nb_of(struct bk_live *l) { return (struct nb *)l; }

static void oom(struct cbt_error **errp)
{
    cbt_error_set(errp, ENOMEM, "out of memory");
}

/* ---- the folder's records ---- */

static int add_rec(void *opaque, const char *name, struct manifest *m,
                   const char sha256[65], struct cbt_error **errp)
{
    (void)name;
    (void)sha256;
    struct nb *nb = opaque;
    if (!m->checkpoint)
        return 0; /* a copy-only backup: no checkpoint */
    struct rec *v = realloc(nb->recs, (nb->nrecs + 1) * sizeof(*v));
    if (!v) {
        oom(errp);
        return -1;
    }
    nb->recs = v;
    struct rec *r = &v[nb->nrecs];
    *r = (struct rec){.order = m->checkpoint_order,
                      .size = m->virtual_size};
    r->file = m->image_file;
    r->checkpoint = m->checkpoint;
    m->image_file = m->checkpoint = NULL;
    snprintf(r->disk_id, sizeof(r->disk_id), "%s", m->disk_id);
    for (char *c = r->disk_id; *c; c++)
        *c = (char)tolower((unsigned char)*c);
    nb->nrecs++;
    return 0;
}

/* Is r a backup of the disk (any disk while the id is not known yet)? */
static bool of_disk(const struct nb *nb, const struct rec *r)
{
    return !nb->l.disk_id[0] || strcmp(r->disk_id, nb->l.disk_id) == 0;
}

/* The backup of the disk that created checkpoint `name`, or NULL. */
static const struct rec *created(const struct nb *nb, const char *name)
{
    for (size_t i = 0; i < nb->nrecs; i++)
        if (of_disk(nb, &nb->recs[i]) &&
            strcmp(nb->recs[i].checkpoint, name) == 0)
            return &nb->recs[i];
    return NULL;
}

static uint64_t newest_order(const struct nb *nb)
{
    uint64_t max = 0;
    for (size_t i = 0; i < nb->nrecs; i++)
        if (of_disk(nb, &nb->recs[i]))
            max = MAX(max, nb->recs[i].order);
    return max;
}

/* The disk id of a backup since checkpoint `since`: that of the backup
 * that created it, unless backups of several disks did. */
static int id_of_since(struct nb *nb, const char *since,
                       struct cbt_error **errp)
{
    const struct rec *first = NULL;
    for (size_t i = 0; i < nb->nrecs; i++) {
        const struct rec *r = &nb->recs[i];
        if (strcmp(r->checkpoint, since) != 0)
            continue;
        if (first && strcmp(first->disk_id, r->disk_id) != 0) {
            cbt_error_set(errp, EINVAL, "%s: backups of two disks created "
                          "checkpoint '%s': %s (disk %s) and %s (disk %s); "
                          "say which disk this is with --disk-id", nb->dir,
                          since, first->file, first->disk_id, r->file,
                          r->disk_id);
            cbt_error_set_kind(errp, CBT_ERR_USAGE);
            return -1;
        }
        first = first ? first : r;
    }
    if (first)
        memcpy(nb->l.disk_id, first->disk_id, sizeof(nb->l.disk_id));
    return 0;
}

/* ---- the hooks ---- */

static int by_order(const void *x, const void *y)
{
    const struct cbt_checkpoint *a = x, *b = y;
    return a->order < b->order ? -1 : a->order > b->order;
}

/* The disk's checkpoints: those its backups in the folder created, and
 * o->since, unusable, when none did. */
static int nb_checkpoints(struct bk_live *l, struct cbt_checkpoint **v,
                          size_t *n, struct cbt_error **errp)
{
    struct nb *nb = nb_of(l);
    const char *since = nb->o->since;
    *n = 0;
    *v = calloc(nb->nrecs + 1, sizeof(**v));
    if (!*v) {
        oom(errp);
        return -1;
    }
    bool ok = true;
    for (size_t i = 0; i < nb->nrecs && ok; i++) {
        const struct rec *r = &nb->recs[i];
        if (!of_disk(nb, r) || !l->disk_id[0])
            continue;
        struct cbt_checkpoint *c = &(*v)[(*n)++];
        *c = (struct cbt_checkpoint){.order = r->order,
                                     .virtual_size = r->size,
                                     .usable = true};
        ok = (c->name = strdup(r->checkpoint)) != NULL;
        if (ok && r == nb->since && nb->since_problem) {
            c->usable = false;
            ok = (c->problem = strdup(nb->since_problem)) != NULL;
        }
    }
    if (ok && since && !nb->since) {
        struct cbt_checkpoint *c = &(*v)[(*n)++];
        *c = (struct cbt_checkpoint){.usable = false};
        ok = (c->name = strdup(since)) &&
             (c->problem = strdup(nb->since_problem));
    }
    if (!ok) {
        cbt_checkpoint_free_list(*v, *n);
        *v = NULL;
        *n = 0;
        oom(errp);
        return -1;
    }
    qsort(*v, *n, sizeof(**v), by_order);
    return 0;
}

static int nb_name_taken(struct bk_live *l, const char *name,
                         struct cbt_error **errp)
{
    (void)errp;
    return created(nb_of(l), name) != NULL;
}

static int nb_freeze(struct bk_live *l, const char *since, const char *name,
                     uint64_t gran, struct bk_source *src,
                     struct cbt_error **errp)
{
    struct nb *nb = nb_of(l);
    (void)name;
    (void)gran;
    (void)errp;
    /* Without the bitmap, o->since is unusable: the plan took a full. */
    assert(!since || nb->has_bitmap);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    nb->sec = ts.tv_sec;
    nb->nsec = (uint32_t)ts.tv_nsec;
    live_nbd_source_init(&nb->src, nb->nbd, src);
    return 0;
}

/* The checkpoint exists already (the owner made it): its order in the
 * folder's numbering, and the disk's id when it is a new one. */
static int nb_describe(struct bk_live *l, const char *name, uint64_t *order,
                       int64_t *sec, uint32_t *nsec, struct cbt_error **errp)
{
    struct nb *nb = nb_of(l);
    (void)name;
    *order = l->disk_id[0] ? newest_order(nb) + 1 : 1;
    *sec = nb->sec;
    *nsec = nb->nsec;
    if (!l->disk_id[0]) {
        uint8_t u[16];
        if (ckpt_uuid_new(u, nb->o->disk, errp) < 0)
            return -1;
        ckpt_uuid_str(u, l->disk_id);
    }
    return 0;
}

static int nb_commit(struct bk_live *l, const char *name,
                     struct cbt_error **errp)
{
    (void)l;
    (void)name;
    (void)errp; /* the owner's checkpoint: cbt keeps no record of it */
    return 0;
}

static void nb_abort(struct bk_live *l, const char *name)
{
    (void)l;
    (void)name; /* not cbt's checkpoint: it stays */
}

static void nb_release(struct bk_live *l)
{
    (void)l; /* the export is its owner's */
}

/* ---- the whole operation ---- */

/* Why o->since cannot be used (NULL: it can); malloc'd, or -1. */
static int since_problem(struct nb *nb, const char *bitmap, bool named,
                         struct cbt_error **errp)
{
    uint64_t size = live_nbd_size(nb->nbd);
    char *p = NULL;
    if (!nb->since && nb->l.disk_id[0])
        p = cbt_strdup_printf("no backup of disk %s in %s created it",
                              nb->l.disk_id, nb->dir);
    else if (!nb->since)
        p = cbt_strdup_printf("no backup in %s created it", nb->dir);
    else if (nb->since->size != size)
        p = cbt_strdup_printf("the export's size, %" PRIu64 " bytes, is not "
                              "the disk's at backup %s/%s, %" PRIu64 " bytes "
                              "(a resized disk: a dirty bitmap cannot say "
                              "what changed)", size, nb->dir,
                              nb->since->file, nb->since->size);
    else if (!nb->has_bitmap)
        p = cbt_strdup_printf("the export has no dirty bitmap '%s' (meta "
                              "context qemu:dirty-bitmap:%s; nbdinfo --list "
                              "shows the export's)%s", bitmap, bitmap,
                              named ? "" : "; name the export's bitmap with "
                                           "--bitmap");
    else
        return 0;
    if (!p) {
        oom(errp);
        return -1;
    }
    nb->since_problem = p;
    return 0;
}

static int set_disk_id(struct nb *nb, const char *id, struct cbt_error **errp)
{
    if (!manifest_is_uuid(id)) {
        cbt_error_set(errp, EINVAL, "--disk-id %s: not a UUID (8-4-4-4-12 "
                      "hex digits, as the manifests' disk.id)", id);
        cbt_error_set_kind(errp, CBT_ERR_USAGE);
        return -1;
    }
    for (size_t i = 0; i < 36; i++)
        nb->l.disk_id[i] = (char)tolower((unsigned char)id[i]);
    nb->l.disk_id[36] = '\0';
    return 0;
}

static int prepare(struct nb *nb, const struct nbd_backup_opts *no,
                   struct cbt_backup_opts *o, struct cbt_error **errp)
{
    if (!o->checkpoint) {
        cbt_error_set(errp, EINVAL, "%s: cbt makes no checkpoint in an NBD "
                      "export; name the one its owner made for this backup "
                      "(--checkpoint)", o->disk);
        cbt_error_set_kind(errp, CBT_ERR_USAGE);
        return -1;
    }
    if (no->disk_id && set_disk_id(nb, no->disk_id, errp) < 0)
        return -1;
    nb->dir = bfile_folder_of(o->target);
    if (!nb->dir) {
        oom(errp);
        return -1;
    }
    if (manifest_scan(nb->dir, add_rec, nb, errp) < 0)
        return -1;
    if (o->since && !no->disk_id && id_of_since(nb, o->since, errp) < 0)
        return -1;
    const struct rec *r = created(nb, o->checkpoint);
    if (r) {
        cbt_error_set(errp, EEXIST, "%s/%s: this backup created checkpoint "
                      "'%s' already; --checkpoint names the checkpoint the "
                      "export's owner made for the new backup", nb->dir,
                      r->file, o->checkpoint);
        return -1;
    }
    const char *bitmap = o->since ? (no->bitmap ? no->bitmap : o->since)
                                  : NULL;
    nb->nbd = live_nbd_open_maybe(o->disk, bitmap, LIVE_NBD_CONNECT_MS,
                                  &nb->has_bitmap, errp);
    if (!nb->nbd)
        return -1;
    if (!live_nbd_read_only(nb->nbd))
        cbt_warn("%s: the export is writable: the backup is the disk at one "
                 "instant only if nothing writes to it meanwhile", o->disk);
    nb->l.size = live_nbd_size(nb->nbd);
    if (!o->since)
        return 0;
    nb->since = nb->l.disk_id[0] ? created(nb, o->since) : NULL;
    if (since_problem(nb, bitmap, no->bitmap != NULL, errp) < 0)
        return -1;
    /* An incremental when it starts from the newest checkpoint (the only
     * one of the highest order: backup.c takes the last one listed). */
    uint64_t newest = newest_order(nb);
    size_t at_newest = 0;
    for (size_t i = 0; i < nb->nrecs; i++)
        at_newest += of_disk(nb, &nb->recs[i]) && nb->recs[i].order == newest;
    if (nb->since && nb->since->order == newest && at_newest == 1)
        o->mode = CBT_BACKUP_INCREMENTAL;
    return 0;
}

int nbd_backup(const struct nbd_backup_opts *no, struct cbt_backup_opts *o,
               struct cbt_backup_result *res, struct cbt_error **errp)
{
    struct nb *nb = calloc(1, sizeof(*nb));
    if (!nb) {
        memset(res, 0, sizeof(*res));
        oom(errp);
        return -1;
    }
    nb->o = o;
    nb->l = (struct bk_live){
        .label = o->disk,
        .checkpoints = nb_checkpoints,
        .name_taken = nb_name_taken,
        .freeze = nb_freeze,
        .describe = nb_describe,
        .commit = nb_commit,
        .abort = nb_abort,
        .release = nb_release,
    };
    int r = -1;
    if (prepare(nb, no, o, errp) == 0)
        r = cbt_backup_live(o, &nb->l, res, errp);
    else
        memset(res, 0, sizeof(*res));
    live_nbd_source_fini(&nb->src);
    live_nbd_close(nb->nbd);
    for (size_t i = 0; i < nb->nrecs; i++) {
        free(nb->recs[i].file);
        free(nb->recs[i].checkpoint);
    }
    free(nb->recs);
    free(nb->since_problem);
    free(nb->dir);
    free(nb);
    return r;
}
