/*
 * Chain operations on a running VM's disk with every checkpoint kept
 * exact (livechain.h, docs/live.md "Chain operations").
 *
 * QEMU does the work (blockdev-snapshot, block-commit, block-stream,
 * blockdev-mirror); cbt
 * handles the bitmaps around it as libvirt does (LIVE.md 5.1 (f)-(g)),
 * with one merge rule: a bitmap's copies in the layers that leave the
 * chain are merged into the layer that takes their place, created there
 * when absent.  The view of a checkpoint from the top (the union of its
 * copies) is then the same before and after, plus the writes since.
 *
 * Two facts of QEMU (checked on 7.2) shape the commit:
 *   - the commit job writes into base through the ordinary write path, so
 *     base's recording bitmaps take every cluster it copies (a superset
 *     of the changes).  cbt saves base's copies into temporary disabled
 *     bitmaps before the job and rebuilds them from those and the copies
 *     above at the end: the job's writes leave no trace;
 *   - with auto-finalize off, a job that finished its copy waits in
 *     PENDING with base still writable and the leaving layers still in the
 *     chain, and an active commit holds the disk drained from the end of
 *     its copy to the pivot: no guest write lands between cbt's merge and
 *     the switch.  So the merge is done there, in one transaction, before
 *     job-finalize.  A temporary recording bitmap on base added when the
 *     active commit is ready (libvirt's "activewrite") is merged too: it
 *     holds the guest writes mirrored into base in the final phase, which
 *     the top's copies hold as well; nothing is lost if QEMU ever lets one
 *     through.
 * With on-error=stop a job that meets an I/O error pauses with base still
 * writable: cbt puts base's copies back from the saved ones, then cancels
 * the job; a cancel (Ctrl-C) pauses the job first for the same reason.
 * A cbt killed meanwhile leaves the job and the temporary bitmaps named
 * cbt-PID-..., which the next live command removes (the job cancelled):
 * base's copies may then hold extra bits, never fewer.
 *
 * A copy (mirror) is the active commit's twin: DEST gets no bitmap until
 * the job is pending (the disk drained), so the mirror's writes leave
 * nothing to undo; then each of the top's bitmaps is made there as the
 * union of the copies in the layers DEST replaces.
 */
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <time.h>

#include <cbt/image.h>

#include "../ops/ops_util.h"
#include "livebackup.h"
#include "livechain.h"
#include "livecp.h"

#define NAME_MAX_QEMU 31 /* node names and job ids */
#define POLL_MS 200

/* A bitmap cbt may carry: persistent, and not one of cbt's temporary ones. */
static bool carried(const struct live_bitmap *b)
{
    return b->persistent && !journal_name_pid(b->name);
}

static int one_transaction(struct qmp *q, json_t *acts,
                           struct cbt_error **errp)
{
    if (json_array_size(acts) == 0) {
        json_decref(acts);
        return 0;
    }
    return qmp_run(q, "transaction", json_pack("{s:o}", "actions", acts),
                   errp);
}

static json_t *act(const char *type, json_t *data)
{
    return json_pack("{s:s, s:o}", "type", type, "data", data);
}

static json_t *bm_add(const char *node, const char *name, uint64_t gran,
                      bool persistent, bool disabled)
{
    return act("block-dirty-bitmap-add",
               json_pack("{s:s, s:s, s:b, s:b, s:I}", "node", node, "name",
                         name, "persistent", persistent, "disabled", disabled,
                         "granularity", (json_int_t)gran));
}

static json_t *bm_simple(const char *type, const char *node, const char *name)
{
    return act(type, json_pack("{s:s, s:s}", "node", node, "name", name));
}

static json_t *src(const char *node, const char *name)
{
    return json_pack("{s:s, s:s}", "node", node, "name", name);
}

static json_t *bm_merge(const char *node, const char *target, json_t *srcs)
{
    return act("block-dirty-bitmap-merge",
               json_pack("{s:s, s:s, s:o}", "node", node, "target", target,
                         "bitmaps", srcs));
}

/*
 * The node name of an image cbt adds to the chain (a snapshot's overlay, a
 * copy's destination): "cbt-ovl-PID-TIME", never "cbt-PID-..." (the
 * overlay outlives this cbt, and the sweep of a dead cbt's objects must
 * not take the disk's top for one).  The PID lets a later cbt delete the
 * node of a cbt killed before the node joined the chain (live_leftovers:
 * QEMU refuses to delete a node in use).
 */
static void own_node_name(char *node, size_t len)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    snprintf(node, len, "cbt-ovl-%x-%llx%02lx", (unsigned)getpid(),
             (unsigned long long)ts.tv_sec, (long)(ts.tv_nsec / 10000000));
}

/* ---- snapshot ---- */

int live_snapshot(struct qmp *q, const char *disk, const char *overlay,
                  struct cbt_error **errp)
{
    struct live_cp c;
    if (live_cp_open_uncounted(q, disk, &c, errp) < 0)
        return -1;
    const struct live_layer *top = &c.disk.layers[0];
    int ret = -1;
    bool created = false, added = false;
    char node[NAME_MAX_QEMU + 1], fnode[NAME_MAX_QEMU + 8];
    own_node_name(node, sizeof(node));
    snprintf(fnode, sizeof(fnode), "%s-file", node);

    struct stat st;
    if (lstat(overlay, &st) == 0) {
        cbt_error_set(errp, EEXIST, "%s: file exists; refusing to overwrite "
                      "it with the overlay", overlay);
        goto out;
    }
    if (errno != ENOENT) {
        cbt_error_set(errp, errno, "%s: %s", overlay, strerror(errno));
        goto out;
    }
    int fd = open(overlay, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) {
        cbt_error_set(errp, errno, "%s: %s", overlay, strerror(errno));
        goto out;
    }
    close(fd);
    created = true;
    /* A journal left for this path (a file removed since) is not this new
     * file's. */
    live_cp_uncarry(overlay);
    char *bname = ops_backing_name(top->filename, overlay);
    if (!bname) {
        cbt_error_set(errp, errno ? errno : ENOMEM, "%s: cannot name the "
                      "backing file: %s", overlay, strerror(errno ? errno
                                                                  : ENOMEM));
        goto out;
    }
    struct cbt_create_opts co = {
        .struct_size = sizeof(struct cbt_create_opts),
        .format = "qcow2",
        .size = top->size,
        .size_given = true,
        .backing_file = bname,
        .backing_format = top->drv,
    };
    int r = cbt_image_create(overlay, &co, errp);
    free(bname);
    if (r < 0)
        goto out;
    /* QEMU links it in the transaction (blockdev-snapshot wants an overlay
     * without a backing node); by its absolute path: QEMU's working
     * folder is not cbt's. */
    char *abs = realpath(overlay, NULL);
    if (!abs) {
        cbt_error_set(errp, errno, "%s: %s", overlay, strerror(errno));
        goto out;
    }
    json_t *add = json_pack("{s:s, s:s, s:{s:s, s:s, s:s}, s:n}", "driver",
                            "qcow2", "node-name", node, "file", "driver",
                            "file", "node-name", fnode, "filename", abs,
                            "backing");
    free(abs);
    if (qmp_run(q, "blockdev-add", add, errp) < 0)
        goto out;
    added = true;

    json_t *acts = json_array();
    json_array_append_new(acts, act("blockdev-snapshot",
                                    json_pack("{s:s, s:s}", "node", top->node,
                                              "overlay", node)));
    for (size_t i = 0; i < top->nbitmaps; i++) {
        const struct live_bitmap *b = &top->bitmaps[i];
        if (!carried(b) || !b->recording)
            continue;
        if (b->inconsistent) {
            cbt_warn("%s: bitmap '%s' of %s is inconsistent; it is not "
                     "copied to the overlay", qmp_name(q), b->name,
                     top->filename);
            continue;
        }
        json_array_append_new(acts, bm_add(node, b->name, b->granularity,
                                           true, false));
    }
    /* The checkpoints follow the top: their records go into the overlay's
     * journal first, so that a cbt killed after the transaction leaves an
     * overlay that has them (one killed before leaves a file no chain
     * uses, its journal naming it). */
    if (live_cp_carry(&c, overlay, true, errp) < 0) {
        json_decref(acts);
        goto out;
    }
    if (one_transaction(q, acts, errp) < 0)
        goto out;
    added = created = false; /* the disk's now */
    ret = 0;
out:
    if (added)
        (void)qmp_run(q, "blockdev-del", json_pack("{s:s}", "node-name", node),
                      NULL);
    if (created) {
        live_cp_uncarry(overlay);
        (void)unlink(overlay);
    }
    live_cp_close(&c);
    return ret;
}

/* ---- running a job ---- */

struct job {
    struct qmp *q;
    const struct live_chain_opts *o;
    char id[NAME_MAX_QEMU + 1];
    const char *what;            /* "commit", "stream" */
    /* Called once the job is ready (an active commit, before job-complete)
     * and once it is pending (its copy done, before job-finalize); undo
     * runs while the job is paused or pending, before it is cancelled. */
    int (*at_ready)(struct job *j, struct cbt_error **errp);
    int (*at_pending)(struct job *j, struct cbt_error **errp);
    int (*undo)(struct job *j);
    void *opaque;
    bool undo_failed;            /* some bitmaps may keep extra bits */
};

static bool id_is(json_t *data, void *opaque)
{
    const char *id = qmp_str(data, "id");
    const char *dev = qmp_str(data, "device");
    return (id && strcmp(id, opaque) == 0) || (dev && strcmp(dev, opaque) == 0);
}

/* The job's entry of query-jobs (a new reference), or NULL. */
static json_t *job_info(struct job *j, struct cbt_error **errp)
{
    json_t *v = qmp_execute(j->q, "query-jobs", NULL, errp);
    if (!v)
        return NULL;
    size_t i;
    json_t *x, *found = NULL;
    json_array_foreach(v, i, x) {
        const char *id = qmp_str(x, "id");
        if (id && strcmp(id, j->id) == 0)
            found = json_incref(x);
    }
    json_decref(v);
    if (!found)
        cbt_error_set(errp, ENOENT, "%s: QEMU's %s job '%s' vanished",
                      qmp_name(j->q), j->what, j->id);
    return found;
}

static const char *status_of(json_t *info)
{
    const char *s = qmp_str(info, "status");
    return s ? s : "";
}

/* Wait until the job's status is one of `want` (a list ending in NULL);
 * that status, or NULL on error. */
static const char *wait_status(struct job *j, const char *const *want,
                               json_t **info, struct cbt_error **errp)
{
    for (int tries = 0; tries < QMP_TIMEOUT_MS / POLL_MS; tries++) {
        json_decref(*info);
        *info = job_info(j, errp);
        if (!*info)
            return NULL;
        const char *s = status_of(*info);
        for (size_t k = 0; want[k]; k++)
            if (strcmp(s, want[k]) == 0)
                return want[k];
        json_decref(qmp_wait_event(j->q, "JOB_STATUS_CHANGE", id_is, j->id,
                                   POLL_MS, NULL));
    }
    cbt_error_set(errp, ETIMEDOUT, "%s: QEMU's %s job '%s' did not stop",
                  qmp_name(j->q), j->what, j->id);
    return NULL;
}

/* Stop the job with everything as before: pause it (unless it stopped by
 * itself), undo, cancel, dismiss. */
static void job_abandon(struct job *j, bool paused)
{
    json_t *info = NULL;
    static const char *const stopped[] = {"paused", "standby", "pending",
                                          "concluded", NULL};
    if (!paused)
        (void)qmp_run(j->q, "job-pause", json_pack("{s:s}", "id", j->id),
                      NULL);
    const char *s = wait_status(j, stopped, &info, NULL);
    /* Also when the job ended by itself: the temporary bitmaps go, and a
     * base already read-only again keeps what the job set (said so). */
    if (j->undo && j->undo(j) < 0)
        j->undo_failed = true;
    if (!s || strcmp(s, "concluded") != 0) {
        (void)qmp_run(j->q, "job-cancel", json_pack("{s:s}", "id", j->id),
                      NULL);
        static const char *const end[] = {"concluded", NULL};
        (void)wait_status(j, end, &info, NULL);
    }
    json_decref(info);
    (void)qmp_run(j->q, "job-dismiss", json_pack("{s:s}", "id", j->id), NULL);
}

/* Did the job stop on an I/O error (on-error=stop)?  Its io-status says
 * so, not "ok"; a job someone paused has "ok". */
static bool io_failed(struct job *j)
{
    json_t *v = qmp_execute(j->q, "query-block-jobs", NULL, NULL);
    size_t i;
    json_t *x;
    bool failed = false;
    json_array_foreach(v, i, x) {
        const char *dev = qmp_str(x, "device");
        const char *io = qmp_str(x, "io-status");
        if (dev && strcmp(dev, j->id) == 0)
            failed = !io || strcmp(io, "ok") != 0;
    }
    json_decref(v);
    return failed;
}

/* The I/O error that stopped a job (BLOCK_JOB_ERROR), for messages. */
static char *job_error_text(struct job *j)
{
    json_t *ev = qmp_wait_event(j->q, "BLOCK_JOB_ERROR", id_is, j->id, 1,
                                NULL);
    const char *op = ev ? qmp_str(ev, "operation") : NULL;
    char *s = cbt_strdup_printf("an I/O error%s%s", op ? " on " : "",
                                op ? op : "");
    json_decref(ev);
    return s;
}

static const char *as_before(const struct job *j)
{
    return j->undo_failed ? " (some bitmaps may hold extra changes: a "
                            "backup since them copies a little more)"
                          : ", and so are its bitmaps";
}

/* Drive the started job to its end: progress, ready, pending, concluded,
 * dismissed.  0, or -1 with *errp (the job gone, every change undone
 * where QEMU let it). */
static int job_run(struct job *j, struct cbt_error **errp)
{
    bool completed = false, finalized = false;
    for (;;) {
        json_t *info = job_info(j, errp);
        if (!info) {
            job_abandon(j, false);
            return -1;
        }
        char s[32];
        snprintf(s, sizeof(s), "%s", status_of(info));
        long long cur = 0, tot = 0;
        (void)qmp_int(info, "current-progress", &cur);
        (void)qmp_int(info, "total-progress", &tot);
        if (j->o->progress && tot > 0)
            j->o->progress(j->o->progress_opaque, (uint64_t)cur,
                           (uint64_t)tot);
        if (strcmp(s, "concluded") == 0) {
            const char *err = qmp_str(info, "error");
            if ((err || !finalized) && j->undo && j->undo(j) < 0)
                j->undo_failed = true;
            if (err)
                cbt_error_set(errp, EIO, "%s: QEMU's %s job failed: %s%s",
                              qmp_name(j->q), j->what, err,
                              j->undo_failed ? as_before(j) : "");
            else if (!finalized)
                cbt_error_set(errp, ECANCELED, "%s: QEMU's %s job ended "
                              "before cbt finished it (cancelled by someone "
                              "else?)%s", qmp_name(j->q), j->what,
                              j->undo_failed ? as_before(j) : "");
            json_decref(info);
            (void)qmp_run(j->q, "job-dismiss", json_pack("{s:s}", "id", j->id),
                          NULL);
            return errp && *errp ? -1 : 0;
        }
        if (strcmp(s, "paused") == 0 && !finalized && io_failed(j)) {
            /* on-error=stop: an I/O error (a job paused by someone else,
             * a user's job-pause, is waited for) */
            json_decref(info);
            char *why = job_error_text(j);
            job_abandon(j, true);
            cbt_error_set(errp, EIO, "%s: QEMU's %s job stopped on %s; it "
                          "was cancelled, the chain is as before%s",
                          qmp_name(j->q), j->what, why, as_before(j));
            free(why);
            return -1;
        }
        json_decref(info);
        if (!finalized && j->o->cancel && j->o->cancel(j->o->cancel_opaque)) {
            job_abandon(j, false);
            cbt_error_set(errp, ECANCELED, "%s: the %s was cancelled; the "
                          "chain is as before%s", qmp_name(j->q), j->what,
                          as_before(j));
            return -1;
        }
        if (strcmp(s, "ready") == 0 && !completed) {
            if ((j->at_ready && j->at_ready(j, errp) < 0) ||
                qmp_run(j->q, "job-complete", json_pack("{s:s}", "id", j->id),
                        errp) < 0) {
                job_abandon(j, false);
                return -1;
            }
            completed = true;
            continue;
        }
        if (strcmp(s, "pending") == 0 && !finalized) {
            if (j->at_pending && j->at_pending(j, errp) < 0) {
                job_abandon(j, true);
                return -1;
            }
            if (qmp_run(j->q, "job-finalize", json_pack("{s:s}", "id", j->id),
                        errp) < 0) {
                /* The bitmaps changed; the layers may still be there, and
                 * the merged copies only add what the union held. */
                job_abandon(j, true);
                return -1;
            }
            finalized = true;
            continue;
        }
        json_decref(qmp_wait_event(j->q, "JOB_STATUS_CHANGE", id_is, j->id,
                                   POLL_MS, NULL));
    }
}

/*
 * The backing file name QEMU writes into the image relinked onto `base`
 * (block-commit's and block-stream's "backing-file"), as the offline
 * commands write it: base's file name when both are in one folder, else
 * its absolute path.  Left to itself QEMU writes base's node filename,
 * which for a node added with options (a snapshot's overlay) is a json:
 * pseudo-filename no later open resolves.
 */
static int set_backing_name(json_t *args, const struct live_layer *base,
                            const struct live_layer *image,
                            struct cbt_error **errp)
{
    if (!base->filename || !image->filename) {
        cbt_error_set(errp, EINVAL, "an image of the chain has no file name "
                      "(node %s)", base->filename ? image->node : base->node);
        return -1;
    }
    char *name = ops_backing_name(base->filename, image->filename);
    if (!name) {
        cbt_error_set(errp, errno ? errno : ENOMEM, "%s: cannot name the "
                      "backing file: %s", image->filename,
                      strerror(errno ? errno : ENOMEM));
        return -1;
    }
    json_object_set_new(args, "backing-file", json_string(name));
    free(name);
    return 0;
}

/* Delete the overlays cbt snapshot --qmp added that left the chain (layers
 * from..to-1); QEMU keeps a node added by blockdev-add until it is
 * deleted.  Other nodes are their owner's. */
static void drop_own_nodes(struct qmp *q, const struct live_disk *d,
                           size_t from, size_t to)
{
    for (size_t i = from; i < to && i < d->nlayers; i++) {
        if (strncmp(d->layers[i].node, "cbt-ovl-", 8) != 0)
            continue;
        (void)qmp_run(q, "blockdev-del",
                      json_pack("{s:s}", "node-name", d->layers[i].node),
                      NULL);
        /* The journal cbt gave it as the disk's top: it is none now, and
         * records left for its path would be taken for a later file's. */
        if (d->layers[i].filename)
            live_cp_uncarry(d->layers[i].filename);
    }
}

/*
 * Start the job: QEMU's `cmd` with `args` plus what every cbt job has: the
 * id cbt-PID-WHAT (a later cbt finds a dead one's jobs by it), no
 * auto-finalize or auto-dismiss (job_run steps them), and the rate.
 */
static int job_start(struct job *j, const char *cmd, json_t *args,
                     struct cbt_error **errp)
{
    snprintf(j->id, sizeof(j->id), "cbt-%d-%s", (int)getpid(), j->what);
    json_object_set_new(args, "job-id", json_string(j->id));
    json_object_set_new(args, "auto-finalize", json_false());
    json_object_set_new(args, "auto-dismiss", json_false());
    if (j->o->rate)
        json_object_set_new(args, "speed",
                            json_integer((json_int_t)j->o->rate));
    return qmp_run(j->q, cmd, args, errp);
}

/* ---- activewrite bitmaps (active commit, copy) ---- */

/*
 * The temporary recording bitmaps a job's target gets when the job is
 * ready, one per granularity of the recording bitmaps it takes over: they
 * catch the guest writes mirrored into the target in the final phase.
 */
struct aw {
    uint64_t gran[8];
    size_t n;
    bool added;                  /* they exist (from ready on) */
};

static void aw_name(char *buf, size_t len, uint64_t gran)
{
    int lg = 0;
    while ((1ull << lg) < gran)
        lg++;
    snprintf(buf, len, "cbt-%d-aw%d", (int)getpid(), lg);
}

/* Plan one for `gran` (once a granularity); false when it would be a
 * granularity more than the set holds. */
static bool aw_want(struct aw *a, uint64_t gran)
{
    for (size_t g = 0; g < a->n; g++)
        if (a->gran[g] == gran)
            return true;
    if (a->n == ARRAY_SIZE(a->gran))
        return false;
    a->gran[a->n++] = gran;
    return true;
}

/* The job is ready: add them on `node`, in one transaction. */
static int aw_add(struct qmp *q, const char *node, struct aw *a,
                  struct cbt_error **errp)
{
    json_t *acts = json_array();
    for (size_t g = 0; g < a->n; g++) {
        char aw[48];
        aw_name(aw, sizeof(aw), a->gran[g]);
        json_array_append_new(acts, bm_add(node, aw, a->gran[g], false,
                                           false));
    }
    if (one_transaction(q, acts, errp) < 0)
        return -1;
    a->added = a->n > 0;
    return 0;
}

/* Their removal from `node` into `acts`, when they were added. */
static void aw_drop(const struct aw *a, const char *node, json_t *acts)
{
    for (size_t g = 0; a->added && g < a->n; g++) {
        char aw[48];
        aw_name(aw, sizeof(aw), a->gran[g]);
        json_array_append_new(acts, bm_simple("block-dirty-bitmap-remove",
                                              node, aw));
    }
}

/*
 * A bitmap of the top is carried down only when its copies in layers
 * 1..upto-1 are whole: none below a layer that lacks it (a gap), none
 * inconsistent (the offline rule; the merge would be wrong).
 */
static int copies_whole(struct qmp *q, const struct live_disk *d,
                        const struct live_bitmap *b, size_t upto,
                        struct cbt_error **errp)
{
    bool gap = false;
    for (size_t r = 1; r < upto; r++) {
        const struct live_bitmap *c = live_layer_bitmap(&d->layers[r],
                                                        b->name);
        if (!c) {
            gap = true;
            continue;
        }
        if (gap || c->inconsistent) {
            cbt_error_set(errp, EINVAL, "%s: the copy of bitmap '%s' in "
                          "%s is %s; nothing was done", qmp_name(q),
                          b->name, d->layers[r].filename,
                          gap ? "below a layer that lacks it (a gap)"
                              : "inconsistent");
            return -1;
        }
    }
    return 0;
}

/* ---- commit ---- */

/* One bitmap name of top..base. */
struct cplan {
    const char *name;
    uint64_t gran;               /* of the topmost copy */
    bool recording;              /* of the topmost copy */
    bool in_top;                 /* the disk's top layer holds it */
    size_t first;                /* the topmost layer holding it */
    const struct live_bitmap *at_base; /* base's copy, or NULL */
    char saved[48];              /* base's copy saved before the job */
};

struct commit {
    struct live_cp c;
    size_t t, b;                 /* layer indexes: top, base */
    struct cplan *v;
    size_t n;
    bool active;
    bool saved;                  /* the saved copies exist */
    struct aw aw;
};

/* The plan, or a refusal before anything changed. */
static int commit_plan(struct commit *m, struct cbt_error **errp)
{
    const struct live_disk *d = &m->c.disk;
    struct qmp *q = m->c.q;
    for (size_t i = m->t; i <= m->b; i++) {
        const struct live_layer *l = &d->layers[i];
        for (size_t k = 0; k < l->nbitmaps; k++) {
            const struct live_bitmap *b = &l->bitmaps[k];
            if (!carried(b))
                continue;
            bool seen = false;
            for (size_t p = 0; p < m->n && !seen; p++)
                seen = strcmp(m->v[p].name, b->name) == 0;
            if (seen)
                continue;
            struct cplan *nv = realloc(m->v, (m->n + 1) * sizeof(*nv));
            if (!nv) {
                cbt_error_set(errp, ENOMEM, "out of memory");
                return -1;
            }
            m->v = nv;
            struct cplan *p = &m->v[m->n++];
            memset(p, 0, sizeof(*p));
            p->name = b->name;
            p->gran = b->granularity;
            p->recording = b->recording;
            p->first = i;
            p->in_top = live_layer_bitmap(&d->layers[0], b->name) != NULL;
            p->at_base = live_layer_bitmap(&d->layers[m->b], b->name);
            snprintf(p->saved, sizeof(p->saved), "cbt-%d-s%zu", (int)getpid(),
                     m->n - 1);
            /* The rules of the offline commit: no inconsistent copy, no
             * gap, base's copy of the same granularity. */
            bool gap = false;
            for (size_t r = i; r <= m->b; r++) {
                const struct live_bitmap *c =
                    live_layer_bitmap(&d->layers[r], b->name);
                if (!c) {
                    gap = true;
                    continue;
                }
                if (c->inconsistent) {
                    cbt_error_set(errp, EINVAL, "%s: the copy of bitmap '%s' "
                                  "in %s is inconsistent; nothing was done",
                                  qmp_name(q), b->name,
                                  d->layers[r].filename);
                    return -1;
                }
                if (gap) {
                    cbt_error_set(errp, EINVAL, "%s: bitmap '%s' has a copy "
                                  "in %s below a layer that lacks it (a gap); "
                                  "nothing was done", qmp_name(q), b->name,
                                  d->layers[r].filename);
                    return -1;
                }
            }
            if (p->at_base && p->at_base->granularity != p->gran) {
                cbt_error_set(errp, EINVAL, "%s: bitmap '%s' has granularity "
                              "%" PRIu64 " in the base and %" PRIu64 " above; "
                              "nothing was done", qmp_name(q), b->name,
                              p->at_base->granularity, p->gran);
                return -1;
            }
            if (m->active && p->in_top && p->recording &&
                !aw_want(&m->aw, p->gran)) {
                cbt_error_set(errp, ENOTSUP, "%s: too many bitmap "
                              "granularities", qmp_name(q));
                return -1;
            }
        }
    }
    return 0;
}

/* Base's copies saved, before the job writes into base. */
static int commit_save(struct commit *m, struct cbt_error **errp)
{
    const char *base = m->c.disk.layers[m->b].node;
    json_t *acts = json_array();
    for (size_t i = 0; i < m->n; i++) {
        const struct cplan *p = &m->v[i];
        if (!p->at_base)
            continue;
        json_array_append_new(acts, bm_add(base, p->saved, p->gran, false,
                                           true));
        json_t *srcs = json_array();
        json_array_append_new(srcs, src(base, p->name));
        json_array_append_new(acts, bm_merge(base, p->saved, srcs));
    }
    if (one_transaction(m->c.q, acts, errp) < 0)
        return -1;
    m->saved = true;
    return 0;
}

/* The temporary bitmaps go (in `acts`, or on their own when NULL). */
static void commit_drop_temps(struct commit *m, json_t *acts)
{
    const char *base = m->c.disk.layers[m->b].node;
    json_t *own = acts ? acts : json_array();
    for (size_t i = 0; m->saved && i < m->n; i++)
        if (m->v[i].at_base)
            json_array_append_new(own, bm_simple("block-dirty-bitmap-remove",
                                                 base, m->v[i].saved));
    aw_drop(&m->aw, base, own);
    if (!acts)
        (void)one_transaction(m->c.q, own, NULL);
}

/* The pivot makes base the disk's top: its copy records as the topmost
 * copy did (as offline; a copy sealed by an offline snapshot records
 * again). */
static void commit_pivot_recording(const struct commit *m,
                                   const struct cplan *p, json_t *acts)
{
    if (m->active && p->at_base && p->at_base->recording != p->recording)
        json_array_append_new(
            acts, bm_simple(p->recording ? "block-dirty-bitmap-enable"
                                         : "block-dirty-bitmap-disable",
                            m->c.disk.layers[m->b].node, p->name));
}

/* Put base's copies back as they were (the job paused or pending).  0, or
 * -1 when they may keep extra bits (a warning says so). */
static int commit_undo(struct job *j)
{
    struct commit *m = j->opaque;
    const char *base = m->c.disk.layers[m->b].node;
    json_t *acts = json_array();
    for (size_t i = 0; m->saved && i < m->n; i++) {
        const struct cplan *p = &m->v[i];
        if (!p->at_base)
            continue;
        json_array_append_new(acts, bm_simple("block-dirty-bitmap-clear",
                                              base, p->name));
        json_t *srcs = json_array();
        json_array_append_new(srcs, src(base, p->saved));
        json_array_append_new(acts, bm_merge(base, p->name, srcs));
        commit_pivot_recording(m, p, acts);
    }
    commit_drop_temps(m, acts);
    struct cbt_error *e = NULL;
    if (one_transaction(m->c.q, acts, &e) < 0) {
        cbt_warn("%s: the base's bitmaps could not be put back (%s); they "
                 "may hold more changes than happened, never fewer",
                 qmp_name(m->c.q), cbt_error_message(e));
        cbt_error_free(e);
        commit_drop_temps(m, NULL);
        m->saved = m->aw.added = false;
        return -1;
    }
    m->saved = m->aw.added = false;
    return 0;
}

/* Ready (active commit): catch what lands in base from now on. */
static int commit_ready(struct job *j, struct cbt_error **errp)
{
    struct commit *m = j->opaque;
    return aw_add(m->c.q, m->c.disk.layers[m->b].node, &m->aw, errp);
}

/* Pending: base's copies become the unions, in one transaction. */
static int commit_pending(struct job *j, struct cbt_error **errp)
{
    struct commit *m = j->opaque;
    const struct live_disk *d = &m->c.disk;
    const char *base = d->layers[m->b].node;
    json_t *acts = json_array();
    for (size_t i = 0; i < m->n; i++) {
        const struct cplan *p = &m->v[i];
        json_t *srcs = json_array();
        if (p->at_base) {
            json_array_append_new(acts, bm_simple("block-dirty-bitmap-clear",
                                                  base, p->name));
            json_array_append_new(srcs, src(base, p->saved));
        } else {
            json_array_append_new(acts, bm_add(base, p->name, p->gran, true,
                                               !p->recording));
        }
        for (size_t r = p->first;
             r < m->b && live_layer_bitmap(&d->layers[r], p->name); r++)
            json_array_append_new(srcs, src(d->layers[r].node, p->name));
        if (m->active && p->in_top && p->recording) {
            char aw[48];
            aw_name(aw, sizeof(aw), p->gran);
            json_array_append_new(srcs, src(base, aw));
        }
        json_array_append_new(acts, bm_merge(base, p->name, srcs));
        commit_pivot_recording(m, p, acts);
    }
    commit_drop_temps(m, acts);
    if (one_transaction(m->c.q, acts, errp) < 0)
        return -1;
    m->saved = m->aw.added = false;
    return 0;
}

static int find_layer(const struct live_cp *c, const char *name,
                      const char *what, size_t *out, struct cbt_error **errp)
{
    ssize_t i = live_find_layer(&c->disk, name);
    if (i < 0) {
        cbt_error_set(errp, ENOENT, "%s: %s '%s' is no layer of disk '%s' "
                      "(a node name or an image file of its chain)",
                      qmp_name(c->q), what, name, c->disk.id);
        cbt_error_set_kind(errp, CBT_ERR_USAGE);
        return -1;
    }
    *out = (size_t)i;
    return 0;
}

/* Refuse a disk another job holds (a filter on top of it). */
static int no_job(const struct live_cp *c, struct cbt_error **errp)
{
    const struct live_disk *d = &c->disk;
    if (d->attached && strcmp(d->attached, d->layers[0].node) != 0) {
        cbt_error_set(errp, EBUSY, "%s: disk '%s' is busy with a block job "
                      "(node %s sits on top of it)", qmp_name(c->q), d->id,
                      d->attached);
        return -1;
    }
    return 0;
}

/* The start of commit, stream and copy: the leftovers of a dead cbt
 * cleaned, the disk's chain read, and a disk another job holds refused. */
static int chain_open(struct qmp *q, const struct live_chain_opts *o,
                      struct live_cp *c, struct cbt_error **errp)
{
    if (live_cleanup(q, errp) < 0 ||
        live_cp_open_uncounted(q, o->disk, c, errp) < 0)
        return -1;
    if (no_job(c, errp) < 0) {
        live_cp_close(c);
        return -1;
    }
    return 0;
}

int live_commit(struct qmp *q, const struct live_chain_opts *o,
                struct cbt_error **errp)
{
    struct commit m;
    memset(&m, 0, sizeof(m));
    if (chain_open(q, o, &m.c, errp) < 0)
        return -1;
    int ret = -1;
    const struct live_disk *d = &m.c.disk;
    if (o->top && find_layer(&m.c, o->top, "top", &m.t, errp) < 0)
        goto out;
    if (o->base) {
        if (find_layer(&m.c, o->base, "base", &m.b, errp) < 0)
            goto out;
    } else {
        m.b = m.t + 1;
    }
    if (m.b >= d->nlayers || m.b <= m.t) {
        cbt_error_set(errp, EINVAL, "%s: %s", qmp_name(q),
                      m.b >= d->nlayers ? "the top has no backing layer to "
                                          "commit into"
                                        : "the base must be below the top");
        cbt_error_set_kind(errp, CBT_ERR_USAGE);
        goto out;
    }
    m.active = m.t == 0;
    if (commit_plan(&m, errp) < 0 || commit_save(&m, errp) < 0)
        goto out;

    struct job j = {.q = q, .o = o, .what = "commit", .opaque = &m,
                    .at_ready = commit_ready, .at_pending = commit_pending,
                    .undo = commit_undo};
    json_t *args = json_pack("{s:s, s:s, s:s, s:s}", "device",
                             d->layers[0].node, "top-node",
                             d->layers[m.t].node, "base-node",
                             d->layers[m.b].node, "on-error", "stop");
    if (!m.active && set_backing_name(args, &d->layers[m.b],
                                      &d->layers[m.t - 1], errp) < 0) {
        json_decref(args);
        commit_drop_temps(&m, NULL);
        goto out;
    }
    if (job_start(&j, "block-commit", args, errp) < 0) {
        commit_drop_temps(&m, NULL);
        goto out;
    }
    if (job_run(&j, errp) < 0)
        goto out;
    /* An active commit made base the disk's top: the checkpoints follow
     * (from memory), then the dropped layers' nodes and journals go. */
    if (m.active) {
        struct cbt_error *e = NULL;
        if (live_cp_carry(&m.c, d->layers[m.b].filename, false, &e) < 0) {
            cbt_error_set(errp, cbt_error_errno(e), "%s is the disk's top "
                          "now, but its checkpoints' records could not follow "
                          "it: %s", d->layers[m.b].filename,
                          cbt_error_message(e));
            cbt_error_free(e);
            goto out;
        }
    }
    drop_own_nodes(q, d, m.t, m.b);
    ret = 0;
out:
    free(m.v);
    live_cp_close(&m.c);
    return ret;
}

/* ---- stream ---- */

struct stream {
    struct live_cp c;
    size_t b;                    /* the base's index, or nlayers: none */
};

/* Pending: the leaving layers' copies into the top's bitmaps. */
static int stream_pending(struct job *j, struct cbt_error **errp)
{
    struct stream *s = j->opaque;
    const struct live_disk *d = &s->c.disk;
    const struct live_layer *top = &d->layers[0];
    json_t *acts = json_array();
    for (size_t k = 0; k < top->nbitmaps; k++) {
        const struct live_bitmap *b = &top->bitmaps[k];
        if (!carried(b))
            continue;
        json_t *srcs = json_array();
        for (size_t r = 1; r < s->b; r++) {
            if (!live_layer_bitmap(&d->layers[r], b->name))
                break;
            json_array_append_new(srcs, src(d->layers[r].node, b->name));
        }
        if (json_array_size(srcs) == 0) {
            json_decref(srcs);
            continue;
        }
        json_array_append_new(acts, bm_merge(top->node, b->name, srcs));
    }
    return one_transaction(j->q, acts, errp);
}

int live_stream(struct qmp *q, const struct live_chain_opts *o,
                struct cbt_error **errp)
{
    struct stream s;
    memset(&s, 0, sizeof(s));
    if (chain_open(q, o, &s.c, errp) < 0)
        return -1;
    int ret = -1;
    const struct live_disk *d = &s.c.disk;
    s.b = d->nlayers;
    if (o->base && find_layer(&s.c, o->base, "base", &s.b, errp) < 0)
        goto out;
    if (s.b == 0) {
        cbt_error_set(errp, EINVAL, "%s: the base must be below the top",
                      qmp_name(q));
        cbt_error_set_kind(errp, CBT_ERR_USAGE);
        goto out;
    }
    /* The copies in the leaving layers must be whole. */
    const struct live_layer *top = &d->layers[0];
    for (size_t k = 0; k < top->nbitmaps; k++) {
        const struct live_bitmap *b = &top->bitmaps[k];
        if (carried(b) && copies_whole(q, d, b, s.b, errp) < 0)
            goto out;
    }
    if (s.b == 1) {
        ret = 0; /* nothing between: nothing to do */
        goto out;
    }
    struct job j = {.q = q, .o = o, .what = "stream", .opaque = &s,
                    .at_pending = stream_pending};
    json_t *args = json_pack("{s:s, s:s}", "device", top->node, "on-error",
                             "stop");
    if (s.b < d->nlayers) {
        json_object_set_new(args, "base-node",
                            json_string(d->layers[s.b].node));
        if (set_backing_name(args, &d->layers[s.b], top, errp) < 0) {
            json_decref(args);
            goto out;
        }
    }
    if (job_start(&j, "block-stream", args, errp) < 0 ||
        job_run(&j, errp) < 0)
        goto out;
    drop_own_nodes(q, d, 1, s.b);
    ret = 0;
out:
    live_cp_close(&s.c);
    return ret;
}

/* ---- copy (mirror) ---- */

struct copy {
    struct live_cp c;
    const char *dest;
    char node[NAME_MAX_QEMU + 1];  /* DEST's node */
    size_t upto;                 /* the layers DEST replaces: 0..upto-1 */
    struct aw aw;
};

static void copy_drop_aw(struct copy *m, json_t *acts)
{
    json_t *own = acts ? acts : json_array();
    aw_drop(&m->aw, m->node, own);
    if (!acts)
        (void)one_transaction(m->c.q, own, NULL);
    m->aw.added = false;
}

static int copy_undo(struct job *j)
{
    copy_drop_aw(j->opaque, NULL);
    return 0;
}

/* Ready: catch what the mirror writes into DEST from now on (the guest's
 * writes, which the top's copies hold too). */
static int copy_ready(struct job *j, struct cbt_error **errp)
{
    struct copy *m = j->opaque;
    return aw_add(m->c.q, m->node, &m->aw, errp);
}

/* Pending (the copy done, the disk drained until the pivot): DEST's
 * bitmaps, each the union of the copies in the layers it replaces. */
static int copy_pending(struct job *j, struct cbt_error **errp)
{
    struct copy *m = j->opaque;
    const struct live_disk *d = &m->c.disk;
    const struct live_layer *top = &d->layers[0];
    json_t *acts = json_array();
    for (size_t k = 0; k < top->nbitmaps; k++) {
        const struct live_bitmap *b = &top->bitmaps[k];
        if (!carried(b) || b->inconsistent)
            continue;
        json_array_append_new(acts, bm_add(m->node, b->name, b->granularity,
                                           true, !b->recording));
        json_t *srcs = json_array();
        for (size_t r = 0;
             r < m->upto && live_layer_bitmap(&d->layers[r], b->name); r++)
            json_array_append_new(srcs, src(d->layers[r].node, b->name));
        if (b->recording && m->aw.added) {
            char aw[48];
            aw_name(aw, sizeof(aw), b->granularity);
            json_array_append_new(srcs, src(m->node, aw));
        }
        json_array_append_new(acts, bm_merge(m->node, b->name, srcs));
    }
    copy_drop_aw(m, acts);
    /* The checkpoints' records into DEST's journal before the pivot: a
     * cbt killed after it leaves a top that has them. */
    if (live_cp_carry(&m->c, m->dest, true, errp) < 0) {
        json_decref(acts);
        return -1;
    }
    return one_transaction(m->c.q, acts, errp);
}

int live_copy(struct qmp *q, const struct live_chain_opts *o,
              struct cbt_error **errp)
{
    const char *dest = o->dest;
    bool shallow = o->shallow;
    struct copy m;
    memset(&m, 0, sizeof(m));
    if (chain_open(q, o, &m.c, errp) < 0)
        return -1;
    const struct live_disk *d = &m.c.disk;
    const struct live_layer *top = &d->layers[0];
    int ret = -1;
    bool created = false, added = false;
    char fnode[NAME_MAX_QEMU + 8];
    own_node_name(m.node, sizeof(m.node));
    snprintf(fnode, sizeof(fnode), "%s-file", m.node);
    m.upto = shallow ? 1 : d->nlayers;
    m.dest = dest;
    if (shallow && d->nlayers < 2) {
        cbt_error_set(errp, EINVAL, "%s: disk '%s' has no backing file: "
                      "--shallow needs one", qmp_name(q), d->id);
        cbt_error_set_kind(errp, CBT_ERR_USAGE);
        goto out;
    }
    /* The activewrite bitmaps, one per granularity of the top's recording
     * bitmaps; copies that would not be whole are refused first. */
    for (size_t k = 0; k < top->nbitmaps; k++) {
        const struct live_bitmap *b = &top->bitmaps[k];
        if (!carried(b))
            continue;
        if (b->inconsistent) {
            cbt_warn("%s: bitmap '%s' is inconsistent; it is not copied",
                     qmp_name(q), b->name);
            continue;
        }
        if (copies_whole(q, d, b, m.upto, errp) < 0)
            goto out;
        if (b->recording)
            (void)aw_want(&m.aw, b->granularity);
    }

    struct stat st;
    if (lstat(dest, &st) == 0) {
        cbt_error_set(errp, EEXIST, "%s: file exists; refusing to overwrite "
                      "it", dest);
        goto out;
    }
    int fd = open(dest, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) {
        cbt_error_set(errp, errno, "%s: %s", dest, strerror(errno));
        goto out;
    }
    close(fd);
    created = true;
    live_cp_uncarry(dest); /* a journal left for this path is not DEST's */
    struct cbt_create_opts co = {
        .struct_size = sizeof(struct cbt_create_opts),
        .format = "qcow2",
        .size = top->size,
        .size_given = true,
    };
    char *bname = NULL;
    if (shallow) {
        bname = ops_backing_name(d->layers[1].filename, dest);
        if (!bname) {
            cbt_error_set(errp, errno ? errno : ENOMEM, "%s: cannot name the "
                          "backing file", dest);
            goto out;
        }
        co.backing_file = bname;
        co.backing_format = d->layers[1].drv;
    }
    int r = cbt_image_create(dest, &co, errp);
    free(bname);
    if (r < 0)
        goto out;
    char *abs = realpath(dest, NULL); /* QEMU's working folder is not ours */
    if (!abs) {
        cbt_error_set(errp, errno, "%s: %s", dest, strerror(errno));
        goto out;
    }
    json_t *add = json_pack("{s:s, s:s, s:{s:s, s:s, s:s}}", "driver",
                            "qcow2", "node-name", m.node, "file", "driver",
                            "file", "node-name", fnode, "filename", abs);
    free(abs);
    json_object_set_new(add, "backing", shallow
                                            ? json_string(d->layers[1].node)
                                            : json_null());
    if (qmp_run(q, "blockdev-add", add, errp) < 0)
        goto out;
    added = true;

    struct job j = {.q = q, .o = o, .what = "copy", .opaque = &m,
                    .at_ready = copy_ready, .at_pending = copy_pending,
                    .undo = copy_undo};
    json_t *args = json_pack(
        "{s:s, s:s, s:s, s:s, s:s}", "device", top->node, "target", m.node,
        "sync", shallow ? "top" : "full", "on-source-error", "stop",
        "on-target-error", "stop");
    if (job_start(&j, "blockdev-mirror", args, errp) < 0 ||
        job_run(&j, errp) < 0)
        goto out;
    added = created = false; /* the disk's now */
    drop_own_nodes(q, d, 0, m.upto);
    ret = 0;
out:
    if (added)
        (void)qmp_run(q, "blockdev-del",
                      json_pack("{s:s}", "node-name", m.node), NULL);
    if (created) {
        live_cp_uncarry(dest);
        (void)unlink(dest);
    }
    live_cp_close(&m.c);
    return ret;
}
