/*
 * The leaves of a backup through one interface, whichever its format
 * (hashtree.h: leaf_src to read them, leaf_sink to write a new backup's).
 * sha256-blocks-v1 is read only: every new backup writes sha256-tree-v2.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "../util/util.h"
#include "hashtree.h"

/* ---- reading ---- */

int leaf_src_open_v1(struct leaf_src *l, const char *path, uint64_t size,
                     char hex[65], struct cbt_error **errp)
{
    memset(l, 0, sizeof(*l));
    l->size = size;
    l->n = DIV_ROUND_UP(size, (uint64_t)BLOCKHASH_BLOCK);
    return hashes_reader_open(&l->v1, path, l->n, hex, errp);
}

int leaf_src_open_tree(struct leaf_src *l, uint64_t size,
                       const char *const *paths, const uint64_t *blocks,
                       const char *const *sha, size_t n, size_t *bad,
                       struct cbt_error **errp)
{
    memset(l, 0, sizeof(*l));
    l->tree = true;
    l->size = size;
    l->n = DIV_ROUND_UP(size, (uint64_t)BLOCKHASH_BLOCK);
    l->files = calloc(n ? n : 1, sizeof(*l->files));
    l->fp = calloc(n ? n : 1, sizeof(*l->fp));
    l->win = malloc(TREE_FANOUT * 32);
    if (!l->files || !l->fp || !l->win) {
        cbt_error_set(errp, ENOMEM, "%s: out of memory",
                      n ? paths[0] : "leaves");
        leaf_src_close(l);
        return -1;
    }
    for (size_t i = 0; i < n; i++) {
        char hex[65];
        if (bad)
            *bad = i;
        if (tree_file_open(&l->files[i], paths[i], blocks[i], hex, errp) < 0) {
            leaf_src_close(l);
            return -1;
        }
        l->fp[i] = &l->files[i];
        l->nfiles = i + 1;
        if (sha && sha[i] && strcasecmp(hex, sha[i]) != 0) {
            cbt_error_set(errp, EINVAL, "%s: SHA-256 %s differs from %s "
                          "recorded in its manifest", paths[i], hex, sha[i]);
            cbt_error_set_kind(errp, CBT_ERR_CORRUPT);
            leaf_src_close(l);
            return -1;
        }
    }
    int r = tree_view_open(&l->view, size, l->fp, n);
    if (r < 0) {
        cbt_error_set(errp, -r, "%s: %s", n ? paths[0] : "leaves",
                      strerror(-r));
        leaf_src_close(l);
        return -1;
    }
    l->view_open = true;
    return 0;
}

int leaf_src_window(struct leaf_src *l, uint64_t first, const uint8_t **leaves,
                    uint64_t *count)
{
    if (!l->tree)
        return hashes_reader_window(&l->v1, first, leaves, count);
    if (first >= l->n)
        return -EINVAL;
    if (first < l->wfirst || first >= l->wfirst + l->wn) {
        /* A whole level-1 node's leaves at a time. */
        uint64_t start = ALIGN_DOWN(first, (uint64_t)TREE_FANOUT);
        uint64_t n = MIN((uint64_t)TREE_FANOUT, l->n - start);
        l->wn = 0;
        int r = tree_view_get(&l->view, 0, start, n, l->win, NULL);
        if (r < 0)
            return r;
        l->wfirst = start;
        l->wn = n;
    }
    *leaves = l->win + (first - l->wfirst) * 32;
    *count = l->wfirst + l->wn - first;
    return 0;
}

int leaf_src_nonzero(struct leaf_src *l, uint64_t first, uint64_t count,
                     uint64_t *found)
{
    *found = UINT64_MAX;
    if (count == 0)
        return 0;
    if (l->tree) {
        /* Only a record can differ from zeroes: the records of the
         * range, not its blocks. */
        uint64_t from = first, idx;
        uint8_t d[32], z[32];
        for (;;) {
            int r = tree_view_next(&l->view, 0, from, &idx, d, NULL);
            if (r <= 0)
                return r;
            if (idx >= first + count)
                return 0;
            tree_zero(&l->view.shape, 0, idx, z);
            if (memcmp(d, z, 32) != 0) {
                *found = idx;
                return 0;
            }
            from = idx + 1;
        }
    }
    uint8_t zfull[32], zlast[32];
    blockhash_zero_digest(BLOCKHASH_BLOCK, zfull);
    if (l->size % BLOCKHASH_BLOCK)
        blockhash_zero_digest((size_t)(l->size % BLOCKHASH_BLOCK), zlast);
    else
        memcpy(zlast, zfull, 32);
    for (uint64_t b = first; b < first + count;) {
        const uint8_t *leaf;
        uint64_t nl;
        int r = hashes_reader_window(&l->v1, b, &leaf, &nl);
        if (r < 0)
            return r;
        nl = MIN(nl, first + count - b);
        for (uint64_t i = 0; i < nl; i++) {
            const uint8_t *z = b + i + 1 == l->n ? zlast : zfull;
            if (memcmp(leaf + i * 32, z, 32) != 0) {
                *found = b + i;
                return 0;
            }
        }
        b += nl;
    }
    return 0;
}

int leaf_src_check_root(struct leaf_src *l, const char *root_hex,
                        struct cbt_error **errp)
{
    if (!l->tree)
        return 0;
    uint8_t root[32];
    for (int i = 0; i < 32; i++) {
        unsigned v;
        if (sscanf(root_hex + 2 * i, "%2x", &v) != 1) {
            cbt_error_set(errp, EINVAL, "root hash '%.64s' is not hex",
                          root_hex);
            return -1;
        }
        root[i] = (uint8_t)v;
    }
    return tree_view_check(&l->view, root, errp);
}

void leaf_src_close(struct leaf_src *l)
{
    hashes_reader_close(&l->v1);
    if (l->view_open)
        tree_view_close(&l->view);
    for (size_t i = 0; i < l->nfiles; i++)
        tree_file_close(&l->files[i]);
    free(l->files);
    free(l->fp);
    free(l->win);
    memset(l, 0, sizeof(*l));
}

/* ---- writing ---- */

static int sink_record(void *opaque, unsigned k, uint64_t i,
                       const uint8_t d[32])
{
    struct leaf_sink *s = opaque;
    s->records++;
    return tree_writer_record(&s->tw, k, i, d);
}

int leaf_sink_open(struct leaf_sink *s, const char *path, uint64_t size,
                   struct leaf_src *parent, const uint8_t parent_root[32],
                   struct cbt_error **errp)
{
    memset(s, 0, sizeof(*s));
    s->parent = parent;
    int r = tree_shape_init(&s->shape, size);
    if (r == 0 && parent && parent->tree) {
        /* The parent's chain seen with this backup's shape: where the
         * sizes differ, its edge nodes are recomputed (touch). */
        r = tree_view_open(&s->base, size, parent->fp, parent->nfiles);
        s->base_open = r == 0;
        if (r == 0 && parent->n != s->shape.blocks) {
            if (parent->n && parent->n - 1 < s->shape.blocks)
                s->touch[s->ntouch++] = parent->n - 1;
            if (s->shape.blocks &&
                (!s->ntouch || s->touch[0] != s->shape.blocks - 1))
                s->touch[s->ntouch++] = s->shape.blocks - 1;
            if (s->ntouch == 2 && s->touch[0] > s->touch[1]) {
                uint64_t t = s->touch[0];
                s->touch[0] = s->touch[1];
                s->touch[1] = t;
            }
        } else if (r == 0 && parent->size != size && s->shape.blocks) {
            /* Same blocks, another length of the short last one. */
            s->touch[s->ntouch++] = s->shape.blocks - 1;
        }
    }
    if (r == 0)
        r = tree_builder_init(&s->b, &s->shape, s->base_open ? &s->base : NULL,
                              sink_record, NULL, s);
    s->b_open = r == 0;
    if (r < 0) {
        cbt_error_set(errp, -r, "%s: %s", path, strerror(-r));
        leaf_sink_abort(s);
        return -1;
    }
    if (tree_writer_open(&s->tw, path, &s->shape, parent_root, errp) < 0) {
        leaf_sink_abort(s);
        return -1;
    }
    s->tw_open = true;
    return 0;
}

/* The touches before block `upto` (and one at it, which a leaf given
 * there covers). */
static int sink_touches(struct leaf_sink *s, uint64_t upto, bool at)
{
    while (s->itouch < s->ntouch && s->touch[s->itouch] <= upto) {
        uint64_t t = s->touch[s->itouch++];
        if (t == upto && !at)
            continue;
        int r = tree_builder_leaf(&s->b, t, NULL);
        if (r < 0)
            return r;
    }
    return 0;
}

static int sink_leaf(struct leaf_sink *s, uint64_t i, const uint8_t d[32])
{
    int r = sink_touches(s, i, false);
    return r < 0 ? r : tree_builder_leaf(&s->b, i, d);
}

int leaf_sink_put(struct leaf_sink *s, const uint8_t leaf[32])
{
    if (s->n >= s->shape.blocks)
        return -EINVAL;
    int r = sink_leaf(s, s->n, leaf);
    if (r == 0)
        s->n++;
    return r;
}

int leaf_sink_zeroes(struct leaf_sink *s, uint64_t count)
{
    if (count > s->shape.blocks - s->n)
        return -EINVAL;
    uint64_t first = s->n;
    s->n += count;
    if (!s->base_open)
        return 0; /* the base is the all-zeroes tree */
    /* Only the blocks the parent's view records can differ from zeroes. */
    uint64_t from = first, idx;
    uint8_t d[32], z[32];
    for (;;) {
        int r = tree_view_next(&s->base, 0, from, &idx, d, NULL);
        if (r <= 0)
            return r;
        if (idx >= first + count)
            return 0;
        tree_zero(&s->shape, 0, idx, z);
        r = sink_leaf(s, idx, z);
        if (r < 0)
            return r;
        from = idx + 1;
    }
}

int leaf_sink_same(struct leaf_sink *s, uint64_t count)
{
    if (count > s->shape.blocks - s->n || (count && !s->parent) ||
        (s->parent && count > s->parent->n - MIN(s->n, s->parent->n)))
        return -EINVAL;
    uint64_t first = s->n;
    s->n += count;
    if (s->base_open || count == 0)
        return 0; /* the base holds them */
    /* A v1 parent: its leaves, a window at a time. */
    for (uint64_t b = first; b < first + count;) {
        const uint8_t *leaf;
        uint64_t nl;
        int r = leaf_src_window(s->parent, b, &leaf, &nl);
        if (r < 0)
            return r;
        nl = MIN(nl, first + count - b);
        for (uint64_t i = 0; i < nl; i++) {
            r = sink_leaf(s, b + i, leaf + i * 32);
            if (r < 0)
                return r;
        }
        b += nl;
    }
    return 0;
}

int leaf_sink_finish(struct leaf_sink *s, char root_hex[65],
                     char file_sha[65], struct cbt_error **errp)
{
    uint8_t root[32];
    int r = s->n == s->shape.blocks ? 0 : -EINVAL;
    if (r == 0)
        r = sink_touches(s, UINT64_MAX, true);
    if (r == 0)
        r = tree_builder_finish(&s->b, root);
    if (r < 0) {
        cbt_error_set(errp, -r, "%s: cannot write it: %s", s->tw.w.path,
                      strerror(-r));
        return -1;
    }
    sha256_hex(root, root_hex);
    return tree_writer_finish(&s->tw, root, file_sha, errp);
}

void leaf_sink_abort(struct leaf_sink *s)
{
    if (s->b_open)
        tree_builder_free(&s->b);
    if (s->base_open)
        tree_view_close(&s->base);
    if (s->tw_open)
        tree_writer_abort(&s->tw);
    memset(s, 0, sizeof(*s));
}
