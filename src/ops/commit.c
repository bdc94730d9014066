/*
 * cbt_commit(): commit the layers top..above-base of a chain into base,
 * carrying their dirty bitmaps and the disk's checkpoints along
 * (include/cbt/ops.h, docs/checkpoints.md "Chain operations").
 *
 * Terms: the chain is opened from `active` (the image a guest would use),
 * top and base are layers of it, base below top.  "The layers" are
 * top..base inclusive; "above" is the image directly above top (none when
 * top is the active layer).
 *
 * Steps, and what a failure or a kill at each leaves behind:
 *   1. open the chain read-only, find top, base and above, and plan the
 *      bitmaps: for each name held in the layers, the copies to merge into
 *      base.  Every refusal (base not below top, a gap, an inconsistent
 *      copy, a granularity collision with base, emptying a top whose
 *      backing file is not base) happens here: nothing is written.  The
 *      disk's checkpoints are judged too (which base takes over, which
 *      of base's bitmaps get what a layer without them allocated), and a
 *      checkpoint base cannot hold is warned about.
 *   2. reopen read-write only the nodes written later (base; above when it
 *      is relinked; top when it is emptied) and check that base can hold
 *      the bitmaps it will gain (added in memory, then rolled back):
 *      still nothing written.
 *   3. when base is smaller than top, grow it: its bitmaps are valid on
 *      disk at every moment (the qcow2 driver switches to longer tables in
 *      the header update that changes the size), the new area clean; then
 *      store them (a no-op unless something else changed).  The chain's
 *      guest view is unchanged either way (the grown area reads zeroes, as
 *      it did through the chain).
 *   4. build base's new bitmaps in memory (add the missing names, merge
 *      every copy into base's), then copy the data: every range allocated
 *      above base is read through top and written into base without
 *      dirtying any bitmap; ranges reading as zeroes become zeroes, and so
 *      does base past top's end when above is relinked (above read zeroes
 *      there, past top's end, and would read base's old data); then what
 *      each committed layer above the checkpoints' holder allocates is
 *      set in base's copies of the checkpoints that layer lacks.  A
 *      failure rolls the in-memory bitmaps back; a kill leaves base's
 *      bitmaps as before on disk (the copy writes do not mark them in_use)
 *      and some copied data in base, invisible through top.
 *   5. flush base, then commit its bitmaps with the checkpoint metadata
 *      it takes over (one atomic header update) and flush again; then the
 *      holder of the checkpoints, when it stays above base, gets its seals
 *      for the new chain (its own header update, or the relink's when it
 *      is the relinked image).  A kill between those two updates leaves
 *      the holder's checkpoints unusable (a full backup), never wrongly
 *      usable.  Data first: a bitmap must never be stored for data that
 *      could still be lost; bitmaps before the relink: once above no
 *      longer reads through top, top's bits must already be in base.
 *   6. relink above onto base (the driver flushes first).  A kill before
 *      leaves the old, still valid chain: base holds top's data, which top
 *      shadows anyway.
 *   7. empty top (active commit without drop), then flush it.  Base holds
 *      everything top held, so a partly emptied top reads the same.
 * Bitmaps of top and of the layers between are never changed.
 */
#include <inttypes.h>
#include <stdio.h>

#include <cbt/bitmap.h>
#include <cbt/image.h>
#include <cbt/ops.h>

#include "../block/block.h"
#include "checkpoint_meta.h"
#include "ops_util.h"

/* Bytes read and written per step of the data copy. */
#define COMMIT_CHUNK (2u * 1024 * 1024)

/* One layer of top..base, topmost first. */
struct layer {
    struct cbt_image *node;
    struct cbt_bitmap_info *bm;
    size_t nbm;
};

/* What to do with one bitmap name. */
struct name_plan {
    const char *name;      /* borrowed from a layer's list */
    int first;             /* topmost layer holding it */
    uint64_t granularity;  /* of the topmost copy */
    bool recording;        /* of the topmost copy */
    bool in_base;
    bool skip;             /* nothing to do (only base holds it, or broken
                            * and skipped) */
    bool broken;           /* skipped because a copy is broken */
};

struct commit {
    const struct cbt_commit_opts *o;
    struct cbt_image *root;   /* the open chain (from active or top) */
    struct cbt_image *top, *base, *above;
    bool empty_top;
    struct layer *layers;     /* top_depth..base_depth */
    int nlayers;
    struct name_plan *names;
    size_t nnames;
    int top_depth, base_depth;
    /* The disk's checkpoints (checkpoint_chain.c): the records of root's
     * view whose history is intact at their holder.  base takes them over
     * when the holder is one of the committed layers or base itself; the
     * holder is sealed again along the new chain when it stays above
     * base.  mark: names of base's bitmaps that get every committed range,
     * because a committed layer lacks them (its writes are changes since
     * the checkpoint that no copy recorded). */
    struct ckpt_carry carry;
    bool base_inherits, reseal_holder;
    const char **mark;
    size_t nmark;
    const char **unheld;      /* carried names base cannot hold */
    size_t nunheld;
    struct ckpt_saved holder_saved; /* its metadata before the reseal */
};

static const struct cbt_bitmap_info *layer_find(const struct layer *l,
                                                const char *name)
{
    for (size_t i = 0; i < l->nbm; i++)
        if (strcmp(l->bm[i].name, name) == 0)
            return &l->bm[i];
    return NULL;
}

/* Find top, base and above in the chain opened at c->root. */
static int find_layers(struct commit *c, struct cbt_error **errp)
{
    const struct cbt_commit_opts *o = c->o;
    int top_depth, base_depth = 0;
    c->top = ops_find_layer(c->root, o->top, &top_depth, errp);
    if (!c->top)
        return -1;
    if (o->base) {
        struct cbt_error *ignored = NULL;
        c->base = ops_find_layer(c->root, o->base, &base_depth, &ignored);
        cbt_error_free(ignored);
        if (!c->base || base_depth <= top_depth) {
            if (!c->base && access(o->base, F_OK) < 0) {
                cbt_error_set(errp, errno, "%s: %s", o->base, strerror(errno));
                return -1;
            }
            cbt_error_set(errp, EINVAL,
                          "Did not find '%s' in the backing chain of '%s'",
                          o->base, o->top);
            return -1;
        }
    } else {
        c->base = c->top->backing;
        base_depth = top_depth + 1;
        if (!c->base) {
            cbt_error_set(errp, EINVAL,
                          "Image '%s' does not have a backing file", o->top);
            return -1;
        }
    }
    c->above = NULL;
    for (struct cbt_image *n = c->root; n != c->top; n = n->backing)
        c->above = n;

    c->top_depth = top_depth;
    c->base_depth = base_depth;
    c->nlayers = base_depth - top_depth + 1;
    c->layers = calloc((size_t)c->nlayers, sizeof(*c->layers));
    if (!c->layers) {
        cbt_error_set(errp, ENOMEM, "%s: out of memory", o->top);
        return -1;
    }
    struct cbt_image *n = c->top;
    for (int i = 0; i < c->nlayers; i++, n = n->backing)
        c->layers[i].node = n;
    return 0;
}

/* The plan of bitmap `name`, or NULL. */
static const struct name_plan *plan_find(const struct commit *c,
                                         const char *name)
{
    for (size_t k = 0; k < c->nnames; k++)
        if (strcmp(c->names[k].name, name) == 0)
            return &c->names[k];
    return NULL;
}

/* Add `name` (first seen in layer `first`) to the plan unless present. */
static int plan_add_name(struct commit *c, const struct cbt_bitmap_info *b,
                         int first)
{
    if (plan_find(c, b->name))
        return 0;
    struct name_plan *v =
        realloc(c->names, (c->nnames + 1) * sizeof(*c->names));
    if (!v)
        return -1;
    c->names = v;
    c->names[c->nnames++] = (struct name_plan){
        .name = b->name,
        .first = first,
        .granularity = b->granularity,
        .recording = b->recording,
    };
    return 0;
}

/*
 * Decide, for each name held by a layer, whether and how base's copy is
 * rebuilt; refuse gaps, inconsistent copies (unless skipped) and
 * granularity collisions.  Nothing is changed.
 */
static int plan_bitmaps(struct commit *c, struct cbt_error **errp)
{
    const bool skip_broken = c->o->skip_broken_bitmaps;
    struct layer *base_l = &c->layers[c->nlayers - 1];
    for (int i = 0; i < c->nlayers; i++) {
        struct layer *l = &c->layers[i];
        if (cbt_bitmap_list(l->node, &l->bm, &l->nbm, errp) < 0)
            return -1;
        for (size_t k = 0; k < l->nbm; k++) {
            if (plan_add_name(c, &l->bm[k], i) < 0) {
                cbt_error_set(errp, ENOMEM, "%s: out of memory",
                              l->node->filename);
                return -1;
            }
        }
    }
    for (size_t k = 0; k < c->nnames; k++) {
        struct name_plan *p = &c->names[k];
        const struct cbt_bitmap_info *in_base = layer_find(base_l, p->name);
        p->in_base = in_base != NULL;
        if (p->first == c->nlayers - 1) {
            p->skip = true; /* only base holds it: unchanged */
            continue;
        }
        /* When the chain stays as it is (qemu-img's form: top keeps its
         * place and the layers between stay under it), a name base lacks
         * is created there only if every layer from its topmost holder
         * down holds it: otherwise the new copy in base would sit below a
         * layer without it, a gap that makes the name unusable from the
         * top.  Top's own copies still say what changed above base. */
        if (!p->in_base && !c->above && !c->o->pivot) {
            bool whole = true;
            for (int i = p->first; i < c->nlayers - 1 && whole; i++)
                whole = layer_find(&c->layers[i], p->name) != NULL;
            if (!whole) {
                p->skip = true;
                continue;
            }
        }
        /* Broken: an inconsistent copy, or a layer without the name
         * between two layers with it (the union would miss that layer's
         * changes). */
        const char *why = NULL, *where = NULL, *between = NULL;
        int last = p->first;
        for (int i = p->first; i < c->nlayers; i++)
            if (layer_find(&c->layers[i], p->name))
                last = i;
        for (int i = p->first; i <= last && !why; i++) {
            const struct cbt_bitmap_info *b = layer_find(&c->layers[i], p->name);
            where = c->layers[i].node->filename;
            if (!b) {
                why = "gap";
                between = c->layers[last].node->filename;
            } else if (b->inconsistent) {
                why = "inconsistent";
            }
        }
        if (why) {
            char *msg;
            if (strcmp(why, "gap") == 0)
                msg = cbt_strdup_printf(
                    "bitmap '%s': '%s' does not hold it, but '%s' above it "
                    "and '%s' below it do (its changes would be missing from "
                    "the union)", p->name, where,
                    c->layers[p->first].node->filename, between);
            else
                msg = cbt_strdup_printf("bitmap '%s' in '%s' is inconsistent",
                                        p->name, where);
            if (!msg) {
                cbt_error_set(errp, ENOMEM, "%s: out of memory", c->o->top);
                return -1;
            }
            if (!skip_broken) {
                cbt_error_set(errp, EINVAL, "%s; nothing was committed "
                              "(--skip-broken-bitmaps leaves this bitmap "
                              "alone)", msg);
                free(msg);
                return -1;
            }
            cbt_warn("%s; it is left alone in '%s'", msg,
                     base_l->node->filename);
            free(msg);
            p->skip = p->broken = true;
            continue;
        }
        if (in_base && in_base->granularity != p->granularity) {
            cbt_error_set(errp, EINVAL,
                          "bitmap '%s': granularity %" PRIu64 " in '%s' but "
                          "%" PRIu64 " in '%s'; nothing was committed",
                          p->name, p->granularity,
                          c->layers[p->first].node->filename,
                          in_base->granularity, base_l->node->filename);
            return -1;
        }
    }
    return 0;
}

/* Add base's missing bitmaps and merge every copy into base's, in memory. */
static int build_bitmaps(struct commit *c, struct cbt_error **errp)
{
    for (size_t k = 0; k < c->nnames; k++) {
        const struct name_plan *p = &c->names[k];
        if (p->skip)
            continue;
        if (!p->in_base &&
            cbt_bitmap_add(c->base, p->name, p->granularity, !p->recording,
                           errp) < 0) {
            cbt_error_prefix(errp, "cannot carry bitmap '%s' of '%s' into "
                             "the base", p->name,
                             c->layers[p->first].node->filename);
            return -1;
        }
        for (int i = p->first; i < c->nlayers - 1; i++) {
            struct cbt_image *n = c->layers[i].node;
            if (layer_find(&c->layers[i], p->name) &&
                cbt_bitmap_merge_flags(c->base, p->name, n, p->name,
                                       CBT_MERGE_RESIZE, errp) < 0)
                return -1;
        }
        /* A pivot makes base the active layer: its copy records as the
         * topmost copy did (a copy sealed by cbt snapshot records again). */
        if (p->in_base && c->o->pivot && !c->above &&
            (p->recording ? cbt_bitmap_enable(c->base, p->name, errp)
                          : cbt_bitmap_disable(c->base, p->name, errp)) < 0)
            return -1;
    }
    /* A base that takes the disk's checkpoints over as a disk of its own
     * (no image above top) records them: their unions are whole there. */
    for (size_t i = 0; c->base_inherits && !c->above && i < c->carry.m.n;
         i++) {
        struct cbt_error *err = NULL;
        if (cbt_bitmap_enable(c->base, c->carry.m.v[i].name, &err) < 0 &&
            cbt_error_errno(err) != ENOENT) {
            if (errp && !*errp)
                *errp = err;
            else
                cbt_error_free(err);
            return -1;
        }
        cbt_error_free(err);
    }
    return 0;
}

static int flush_node(struct cbt_image *n, struct cbt_error **errp)
{
    int r = cbt_image_flush(n);
    if (r < 0) {
        cbt_error_set(errp, -r, "%s: flush failed: %s", n->filename,
                      strerror(-r));
        return -1;
    }
    return 0;
}

/* ---- checkpoints ---- */

/* Committed layers above the holder (their writes came after every
 * checkpoint it holds), as indexes into c->layers: [0, n). */
static int above_holder(const struct commit *c)
{
    return MIN(c->carry.depth, c->base_depth) - c->top_depth;
}

/* Does a committed layer above the holder lack bitmap `name`? */
static bool lacking_above_holder(const struct commit *c, const char *name)
{
    for (int i = 0; i < above_holder(c); i++)
        if (!layer_find(&c->layers[i], name))
            return true;
    return false;
}

/*
 * Step 1 for checkpoints: who holds them afterwards, which of base's
 * bitmaps get the committed ranges, and, before anything is written, a
 * warning for each checkpoint base cannot hold (qemu-img's form keeps the
 * chain, so a copy in base below a layer without it would be a gap).
 */
static int plan_checkpoints(struct commit *c, struct cbt_error **errp)
{
    if (ckpt_carry_prepare(c->root, CKPT_AT_HOLDER, &c->carry, errp) < 0)
        return -1;
    if (!c->carry.present)
        return 0;
    int h = c->carry.depth;
    bool qemu_form = !c->above && !c->o->pivot;
    c->base_inherits = h >= c->top_depth && h <= c->base_depth;
    c->reseal_holder = h < c->top_depth || (qemu_form && h < c->base_depth);
    if (!c->base_inherits && !c->reseal_holder)
        return 0;
    ckpt_carry_warn(&c->carry, c->base_inherits ? c->base->filename
                                                : c->carry.holder->filename);
    if (!c->base_inherits)
        return 0;
    c->mark = calloc(c->carry.m.n ? c->carry.m.n : 1, sizeof(*c->mark));
    c->unheld = calloc(c->carry.m.n ? c->carry.m.n : 1, sizeof(*c->unheld));
    if (!c->mark || !c->unheld) {
        cbt_error_set(errp, ENOMEM, "%s: out of memory", c->o->top);
        return -1;
    }
    for (size_t i = 0; i < c->carry.m.n; i++) {
        const char *name = c->carry.m.v[i].name;
        const struct name_plan *p = plan_find(c, name);
        bool held = p && !p->broken && (!p->skip || p->in_base);
        if (held) {
            if (lacking_above_holder(c, name))
                c->mark[c->nmark++] = name;
            continue;
        }
        cbt_warn("checkpoint '%s' stays with '%s' only: '%s' cannot hold its "
                 "bitmap (%s); a commit of '%s' into '%s' that pivots "
                 "(takes its place) makes '%s' the disk with it", name,
                 c->carry.holder->filename, c->base->filename,
                 p && p->broken ? "a copy is broken"
                                : "a layer between lacks it",
                 c->o->top, c->base->filename, c->base->filename);
        c->unheld[c->nunheld++] = name;
    }
    return 0;
}

/*
 * Step 4, after the copy: what each committed layer above the holder
 * allocates is a change since the checkpoints; set it in base's copy of
 * every name of c->mark that layer lacks (in memory; stored in step 5).
 * Layers holding the name have their changes in their copy, merged.
 */
static int mark_lacking(struct commit *c, struct cbt_error **errp)
{
    for (int i = 0; c->nmark && i < above_holder(c); i++) {
        struct cbt_image *l = c->layers[i].node;
        const uint64_t end = MIN(l->size, c->base->size);
        for (uint64_t off = 0; off < end;) {
            struct cbt_extent e;
            int r = cbt_image_block_status_above(l, l->backing, off,
                                                 MIN(end - off, COMMIT_CHUNK),
                                                 &e);
            if (r < 0) {
                cbt_error_set(errp, -r, "%s: cannot read its allocation at "
                              "offset %" PRIu64 ": %s", l->filename, off,
                              strerror(-r));
                return -1;
            }
            if (e.flags & (CBT_BS_PRESENT | CBT_BS_ZERO)) {
                pthread_mutex_lock(&c->base->lock);
                for (size_t k = 0; k < c->nmark && r == 0; k++) {
                    struct blk_bitmap *b = blk_bitmap_find(c->base,
                                                           c->mark[k]);
                    if (!b || layer_find(&c->layers[i], c->mark[k]))
                        continue;
                    r = blk_bitmap_set(c->base, b, off, e.length, errp);
                }
                pthread_mutex_unlock(&c->base->lock);
                if (r < 0)
                    return -1;
            }
            off += e.length;
        }
    }
    return 0;
}

/* Step 5: base's checkpoint metadata, set in memory before base's bitmaps
 * are stored (the same header update): a disk of its own when nothing is
 * above top, else history the relinked image continues. */
static int base_checkpoints(struct commit *c, struct cbt_error **errp)
{
    if (!c->base_inherits)
        return 0;
    unsigned how = CKPT_QUIET | (c->above ? CKPT_SEALED : 0);
    struct ckpt_meta m;
    if (ckpt_carry_build(&c->carry, c->base, NULL, how, &m, errp) < 0)
        return -1;
    /* Warned about in step 1. */
    for (size_t i = 0; i < c->nunheld; i++) {
        ssize_t k = ckpt_meta_find_name(&m, c->unheld[i]);
        if (k >= 0)
            ckpt_meta_remove(&m, (size_t)k);
    }
    int r = ckpt_layer_set(c->base, &m, 0, errp);
    ckpt_meta_free(&m);
    return r;
}

/*
 * After step 5: the holder, when it stays above base, sealed again along
 * the chain it has now (base's copies changed, layers left).  Stored now,
 * or by the relink when the holder is the relinked image (one header
 * update for both).  On failure its old metadata is put back in memory.
 */
static int reseal_holder(struct commit *c, struct cbt_error **errp)
{
    if (!c->reseal_holder)
        return 0;
    struct cbt_image *h = c->carry.holder;
    struct ckpt_relink rl = { c->above, c->base };
    unsigned how = c->carry.holder_sealed ? CKPT_SEALED : 0;
    int r = blk_reopen_rw(h, errp);
    if (r == 0)
        r = ckpt_save(h, &c->holder_saved, errp);
    if (r == 0)
        r = ckpt_carry_set(&c->carry, h, c->above ? &rl : NULL, how, errp);
    if (r == 0 && h != c->above) {
        r = cbt_bitmap_commit(h, errp);
        if (r == 0)
            r = flush_node(h, errp);
    }
    if (r < 0 && !h->bitmaps_switched)
        ckpt_restore(h, &c->holder_saved);
    return r;
}

/* Step 3: grow base to top's size (its bitmaps stay valid throughout). */
static int grow_base(struct commit *c, struct cbt_error **errp)
{
    if (c->base->size >= c->top->size)
        return 0;
    if (cbt_image_resize(c->base, c->top->size, false, errp) < 0)
        return -1;
    if (cbt_bitmap_commit(c->base, errp) < 0)
        return -1;
    return flush_node(c->base, errp);
}

/*
 * A base larger than top: the image relinked onto it read zeroes past
 * top's end and would now read base's data there, so those bytes of base
 * become zeroes (where they do not read as zeroes already).
 */
static int zero_past_top(struct commit *c, uint64_t *off)
{
    if (!c->above || c->base->size <= c->top->size)
        return 0;
    uint64_t end = MIN(c->base->size, c->above->size);
    for (*off = c->top->size; *off < end;) {
        struct cbt_extent e;
        int r = cbt_image_block_status(c->base, *off,
                                       MIN(end - *off, COMMIT_CHUNK), &e);
        if (r == 0 && !(e.flags & CBT_BS_ZERO))
            r = blk_pwrite_zeroes(c->base, *off, e.length, 0,
                                  BLK_WRITE_NO_DIRTY);
        if (r < 0)
            return r;
        *off += e.length;
    }
    return 0;
}

/* Step 4's data copy. */
static int copy_data(struct commit *c, struct cbt_error **errp)
{
    void *buf = malloc(COMMIT_CHUNK);
    if (!buf) {
        cbt_error_set(errp, ENOMEM, "%s: out of memory", c->o->top);
        return -1;
    }
    const uint64_t size = c->top->size;
    int r = 0;
    uint64_t off = 0;
    if (c->o->progress)
        c->o->progress(c->o->progress_opaque, 0, size);
    while (off < size) {
        struct cbt_extent e;
        /* Asked to stop: the failure path of step 4 (base's bitmaps as
         * they were, the copied data invisible through top). */
        if (ops_cancelled(c->o->cancel, c->o->cancel_opaque)) {
            free(buf);
            ops_cancel_error(errp, c->top->filename, "the chain reads as "
                             "before; some data may be copied into the base "
                             "already, invisible through the top");
            return -1;
        }
        r = cbt_image_block_status_above(c->top, c->base, off,
                                         MIN(size - off, COMMIT_CHUNK), &e);
        if (r < 0)
            break;
        if (e.flags & CBT_BS_ZERO) {
            /* Zeroes written above base, or the zero tail of a shorter
             * layer between: base's old data must not show through. */
            r = blk_pwrite_zeroes(c->base, off, e.length, 0,
                                  BLK_WRITE_NO_DIRTY);
        } else if (e.flags & CBT_BS_PRESENT) {
            r = ops_copy_range(c->top, c->base, off, e.length, buf,
                               COMMIT_CHUNK);
        }
        if (r < 0)
            break;
        off += e.length;
        if (c->o->progress)
            c->o->progress(c->o->progress_opaque, off, size);
    }
    free(buf);
    if (r == 0)
        r = zero_past_top(c, &off);
    if (r < 0) {
        cbt_error_set(errp, -r, "%s: committing into '%s' failed at "
                      "offset %" PRIu64 ": %s", c->top->filename,
                      c->base->filename, off, strerror(-r));
        return -1;
    }
    return 0;
}

/* Steps 2 to 7. */
static int run_commit(struct commit *c, struct cbt_error **errp)
{
    /* Step 2. */
    if (blk_reopen_rw(c->base, errp) < 0 ||
        (c->above && blk_reopen_rw(c->above, errp) < 0) ||
        (c->empty_top && blk_reopen_rw(c->top, errp) < 0))
        return -1;
    if (build_bitmaps(c, errp) < 0) {
        cbt_bitmap_rollback(c->base, NULL);
        return -1;
    }
    if (cbt_bitmap_rollback(c->base, errp) < 0)
        return -1;

    /* Step 3. */
    if (grow_base(c, errp) < 0)
        return -1;

    /* Steps 4 and 5. */
    if (build_bitmaps(c, errp) < 0 || copy_data(c, errp) < 0 ||
        mark_lacking(c, errp) < 0 || flush_node(c->base, errp) < 0) {
        cbt_bitmap_rollback(c->base, NULL);
        return -1;
    }
    struct ckpt_saved old = { 0 };
    if (ckpt_save(c->base, &old, errp) < 0 || base_checkpoints(c, errp) < 0 ||
        cbt_bitmap_commit(c->base, errp) < 0) {
        if (!c->base->bitmaps_switched) {
            cbt_bitmap_rollback(c->base, NULL);
            ckpt_restore(c->base, &old);
        }
        ckpt_saved_free(&old);
        return -1;
    }
    ckpt_saved_free(&old);
    if (flush_node(c->base, errp) < 0 || reseal_holder(c, errp) < 0)
        return -1;

    /* Step 6. */
    if (c->above) {
        char *name = ops_backing_name(c->base->filename, c->above->filename);
        if (!name) {
            int e = errno ? errno : ENOMEM;
            cbt_error_set(errp, e, "%s: cannot name the base in '%s': %s",
                          c->base->filename, c->above->filename, strerror(e));
            return -1;
        }
        int r = blk_set_backing(c->above, name, c->base->drv->name, errp);
        free(name);
        if (r < 0) {
            /* The holder's new seals went with this header write. */
            if (c->reseal_holder && c->carry.holder == c->above)
                ckpt_restore(c->above, &c->holder_saved);
            return -1;
        }
    }

    /* Step 7. */
    if (c->empty_top) {
        int r = blk_make_empty(c->top);
        if (r < 0) {
            cbt_error_set(errp, -r, "%s: the data was committed, but "
                          "emptying the image failed: %s", c->top->filename,
                          strerror(-r));
            return -1;
        }
        if (flush_node(c->top, errp) < 0)
            return -1;
    }
    return 0;
}

int cbt_commit(const struct cbt_commit_opts *opts, struct cbt_error **errp)
{
    struct cbt_commit_opts oc;
    if (OPTS_COPY(&oc, opts, cbt_commit_opts, errp) < 0)
        return -1;
    const struct cbt_commit_opts *o = &oc;
    WARN_SCOPE(o->warn, o->warn_opaque);
    if (!o || !o->top || !*o->top || (o->base && !*o->base) ||
        (o->active && !*o->active)) {
        cbt_error_set(errp, EINVAL, "commit: empty file name");
        return -1;
    }
    struct commit c = { .o = o };
    int ret = -1;
    c.root = cbt_image_open(o->active ? o->active : o->top, NULL, 0, errp);
    if (!c.root)
        return -1;
    if (find_layers(&c, errp) < 0)
        goto out;
    c.empty_top = !c.above && !o->drop;
    if (c.empty_top) {
        /* Emptying top exposes its backing file: only right when that is
         * base, which now holds top's data. */
        if (c.top->backing != c.base) {
            cbt_error_set(errp, EINVAL, "%s: cannot empty the image after "
                          "committing into '%s', which is not its backing "
                          "file (the layers between would show through); "
                          "keep it (drop)", o->top, c.base->filename);
            goto out;
        }
        if (!c.top->drv->make_empty) {
            cbt_error_set(errp, ENOTSUP, "%s: format '%s' cannot be emptied "
                          "after the commit; keep it (drop)", o->top,
                          c.top->drv->name);
            goto out;
        }
    }
    if (plan_bitmaps(&c, errp) < 0 || plan_checkpoints(&c, errp) < 0)
        goto out;
    ret = run_commit(&c, errp);
out:
    /* Closing stores the bitmaps of written nodes: on failure base's were
     * rolled back above, so nothing changes there. */
    if (cbt_image_close(c.root, ret == 0 ? errp : NULL) < 0)
        ret = -1;
    for (int i = 0; i < c.nlayers; i++)
        cbt_bitmap_info_free_list(c.layers[i].bm, c.layers[i].nbm);
    free(c.layers);
    free(c.names);
    free(c.mark);
    free(c.unheld);
    ckpt_carry_free(&c.carry);
    ckpt_saved_free(&c.holder_saved);
    return ret;
}
