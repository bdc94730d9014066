/*
 * cbt repo: a backup folder as one object -- list its points and chains
 * and what is broken, verify every point, clean the leftovers of
 * interrupted runs, prune by a retention policy (src/repo/repo.h).
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include <cbt/backup.h>

#include "../ops/foldertx.h"
#include "../repo/repo.h"
#include "cli.h"

static const char usage[] =
    "Usage: cbt repo list [--output=human|json] FOLDER\n"
    "       cbt repo verify [--output=human|json] [-p] FOLDER\n"
    "       cbt repo clean [--dry-run|--force] [--output=human|json] FOLDER\n"
    "       cbt repo prune [--keep-last N] [--keep-daily N] [--keep-weekly N]\n"
    "                      [--keep-monthly N] [--dry-run|--force]\n"
    "                      [--output=human|json] [-p] FOLDER\n"
    "\n"
    "FOLDER is a folder of backups made by cbt backup (docs/backups.md): each\n"
    "point is an image with its manifest NAME.json and block hashes\n"
    "NAME.tree (NAME.hashes before sha256-tree-v2); incrementals and\n"
    "differentials build chains on a full backup.\n"
    "\n"
    "Subcommands:\n"
    "  list    every point, oldest first, by chain: creation time, kind,\n"
    "          checkpoint, parent, disk id and size, data bytes the backup\n"
    "          wrote, host bytes of its files; then what is broken and why (a\n"
    "          missing parent, a manifest that is not the one its child\n"
    "          recorded, missing or truncated files, a manifest that does not\n"
    "          parse) and the leftovers of interrupted cbt runs (work files\n"
    "          NAME.part, a backup's image and hashes without manifest, orphan\n"
    "          NAME.tree, live scratch files, temporary files).  Files that\n"
    "          are not cbt's are not mentioned.  Only the cheap checks: cbt\n"
    "          repo verify reads the data\n"
    "  verify  every point, as cbt verify checks one: manifests, block\n"
    "          hashes files, images (consistency, size, backing link) and\n"
    "          every 64 KiB block of each point's view against its recorded\n"
    "          SHA-256, naming each bad file and block.  Points of one chain\n"
    "          share the work: each stored block is read and hashed once\n"
    "          (a block a point does not hold must carry its parent's\n"
    "          verified digest)\n"
    "  clean   remove the leftovers list shows (never anything else, never\n"
    "          a damaged manifest), each only while no process has it open\n"
    "          (QEMU's locks; a live backup's scratch file: its owner lock; a\n"
    "          temporary file: not modified for a minute).  A dry run unless\n"
    "          --force\n"
    "  prune   retire the points the policy does not keep, per disk:\n"
    "          --keep-last N the N newest; --keep-daily/--keep-weekly/\n"
    "          --keep-monthly N the newest point of each of the N most recent\n"
    "          days/ISO weeks/months (UTC) that have points.  The point of\n"
    "          the disk's newest checkpoint always stays (the next\n"
    "          incremental's parent); damaged points are never touched.  A\n"
    "          retired point without children is removed; one with a single\n"
    "          child is merged into it (the child takes its data and its\n"
    "          parent, and becomes the full backup when it was the full), so\n"
    "          every kept point restores bit-identically, verifies against\n"
    "          its original hashes and keeps its checkpoint; one that several\n"
    "          points start from stays.  A dry run unless --force: prints what\n"
    "          goes and what stays.  A kill at any moment leaves every kept\n"
    "          point restorable: the interrupted step is finished by the next\n"
    "          cbt that opens the folder\n"
    "\n"
    "Options:\n"
    "  --output=FMT      human (default) or json\n"
    "  --keep-last N, --keep-daily N, --keep-weekly N, --keep-monthly N\n"
    "                    the retention policy (prune; at least one)\n"
    "  --dry-run         prune, clean: only show what would go (the default)\n"
    "  --force           prune, clean: do it\n"
    "  -p                show progress on stderr (when it is a terminal)\n"
    "  -h, --help        show this help\n"
    "\n"
    "Exit status: 0 done (list: also when it reports problems); 65 verify\n"
    "found a bad point (each on stderr); 64 a usage\n"
    "mistake; 75 the folder or an image is in use by another process (a\n"
    "running prune, backup, restore or verify); 74 an I/O error; 1 another\n"
    "failure.\n"
    "\n"
    "Examples:\n"
    "  cbt repo list backups/\n"
    "  cbt repo list --output=json backups/\n"
    "  cbt repo verify backups/\n"
    "  cbt repo clean --force backups/\n"
    "  cbt repo prune --keep-last 7 backups/\n"
    "  cbt repo prune --keep-daily 7 --keep-weekly 4 --keep-monthly 12 \\\n"
    "      --force backups/\n";

enum sub { SUB_LIST, SUB_PRUNE, SUB_VERIFY, SUB_CLEAN };

struct args {
    const char *prog;
    enum sub sub;
    enum cli_output output;
    struct repo_prune_opts prune;
    bool policy_given, force, dry_run, progress;
    const char *dir;
};

/* ---- list ---- */

static const char *or_dash(const char *s)
{
    return s ? s : "-";
}

/* "2026-12-07T05:50:01.123456789Z" -> "2026-12-07 05:50:01Z". */
static void short_time(const char *iso, char *buf, size_t len)
{
    if (strlen(iso) >= 19)
        snprintf(buf, len, "%.10s %.8sZ", iso, iso + 11);
    else
        snprintf(buf, len, "%s", iso);
}

static void print_point_row(const struct repo *r, const struct repo_point *p,
                            int wf, int wc)
{
    char t[40], data[32], files[32], ver[40] = "-";
    short_time(p->m.created, t, sizeof(t));
    if (p->verified)
        short_time(p->verified, ver, sizeof(ver));
    cli_size_to_str(p->m.copied, data, sizeof(data));
    cli_size_to_str(p->file_bytes, files, sizeof(files));
    const char *parent = p->parent >= 0 ? r->points[p->parent].file
                                        : p->m.parent_file;
    printf("  %-21s  %-12s  %-*s  %-*s  %-*s  %10s  %10s  %-6s  %s\n", t,
           repo_kind_name(p), wc, or_dash(p->m.checkpoint), wf, p->file, wf,
           or_dash(parent), data, files, p->problem ? "BROKEN" : "ok", ver);
}

static void print_list_human(const struct repo *r)
{
    size_t nchains = 0;
    for (size_t i = 0; i < r->npoints; i++)
        nchains += r->points[i].parent < 0 && r->points[i].root == (int)i;
    size_t removable = 0;
    for (size_t i = 0; i < r->nleft; i++)
        removable += r->left[i].removable;
    printf("Backup folder %s: %zu point%s in %zu chain%s, %zu broken, %zu "
           "leftover%s\n", r->dir, r->npoints, r->npoints == 1 ? "" : "s",
           nchains, nchains == 1 ? "" : "s", r->nproblems, removable,
           removable == 1 ? "" : "s");
    int wf = 6, wc = 10;
    for (size_t i = 0; i < r->npoints; i++) {
        int f = (int)strlen(r->points[i].file);
        int c = (int)strlen(or_dash(r->points[i].m.checkpoint));
        wf = f > wf ? f : wf;
        wc = c > wc ? c : wc;
    }
    /* Chains by their full backup, then the points no full reaches. */
    for (size_t i = 0; i <= r->npoints; i++) {
        bool broken = i == r->npoints;
        if (!broken && r->points[i].root != (int)i)
            continue;
        bool any = false;
        for (size_t j = 0; j < r->npoints; j++) {
            const struct repo_point *p = &r->points[j];
            if (broken ? p->root >= 0 : p->root != (int)i)
                continue;
            if (!any) {
                char vs[32];
                cli_size_to_str(p->m.virtual_size, vs, sizeof(vs));
                if (broken)
                    printf("\nPoints whose chain reaches no full backup:\n");
                else
                    printf("\nChain of %s: disk %s (%s), %s\n", p->file,
                           p->m.disk_id, p->m.disk_path, vs);
                printf("  %-21s  %-12s  %-*s  %-*s  %-*s  %10s  %10s  %-6s  %s\n",
                       "CREATED", "KIND", wc, "CHECKPOINT", wf, "FILE", wf,
                       "PARENT", "DATA", "FILES", "STATE", "VERIFIED");
                any = true;
            }
            print_point_row(r, p, wf, wc);
        }
    }
    if (r->nproblems) {
        printf("\nBroken points (cannot be restored):\n");
        for (size_t i = 0; i < r->npoints; i++)
            if (r->points[i].problem)
                printf("  %s: %s\n", r->points[i].file, r->points[i].problem);
    }
    bool hdr = false;
    for (size_t i = 0; i < r->nleft; i++) {
        const struct repo_leftover *l = &r->left[i];
        if (!l->removable)
            continue;
        if (!hdr)
            printf("\nLeftovers of interrupted cbt runs (cbt repo clean "
                   "removes them):\n");
        hdr = true;
        char sz[32];
        cli_size_to_str(l->file_bytes, sz, sizeof(sz));
        printf("  %s (%s): %s\n", l->file, sz, l->why);
    }
    hdr = false;
    for (size_t i = 0; i < r->nleft; i++) {
        const struct repo_leftover *l = &r->left[i];
        if (l->removable)
            continue;
        if (!hdr)
            printf("\nDamaged files of cbt's (never removed by cbt):\n");
        hdr = true;
        printf("  %s\n", l->why);
    }
}

static json_t *point_json(const struct repo *r, const struct repo_point *p)
{
    const struct manifest *m = &p->m;
    json_t *o = json_object();
    json_object_set_new(o, "file", cli_json_string(p->file));
    json_object_set_new(o, "created", cli_json_string(m->created));
    json_object_set_new(o, "kind", json_string(repo_kind_name(p)));
    json_t *ck = json_null();
    if (m->checkpoint) {
        ck = json_object();
        json_object_set_new(ck, "name", cli_json_string(m->checkpoint));
        json_object_set_new(ck, "order", cli_json_u64(m->checkpoint_order));
        json_object_set_new(ck, "created",
                            cli_json_string(m->checkpoint_created));
    }
    json_object_set_new(o, "checkpoint", ck);
    json_object_set_new(o, "since", m->since ? cli_json_string(m->since)
                                             : json_null());
    json_object_set_new(o, "parent", m->parent_file
                                         ? cli_json_string(m->parent_file)
                                         : json_null());
    json_t *disk = json_object();
    json_object_set_new(disk, "id", cli_json_string(m->disk_id));
    json_object_set_new(disk, "path", cli_json_string(m->disk_path));
    json_object_set_new(o, "disk", disk);
    json_object_set_new(o, "format", cli_json_string(m->image_format));
    json_object_set_new(o, "virtual-size", cli_json_u64(m->virtual_size));
    json_object_set_new(o, "data-bytes", cli_json_u64(m->copied));
    json_object_set_new(o, "zeroed-bytes", cli_json_u64(m->zeroed));
    json_object_set_new(o, "file-bytes", cli_json_u64(p->file_bytes));
    json_object_set_new(o, "chain", p->root >= 0
                                        ? cli_json_string(r->points[p->root].file)
                                        : json_null());
    json_object_set_new(o, "children", cli_json_u64(p->nchildren));
    json_object_set_new(o, "verified", p->verified
                                           ? cli_json_string(p->verified)
                                           : json_null());
    json_object_set_new(o, "ok", json_boolean(!p->problem));
    json_object_set_new(o, "problem", p->problem ? cli_json_string(p->problem)
                                                 : json_null());
    return o;
}

static void print_list_json(const struct repo *r)
{
    json_t *o = json_object(), *pts = json_array(), *chains = json_array();
    json_t *left = json_array(), *damaged = json_array();
    uint64_t data = 0, files = 0;
    for (size_t i = 0; i < r->npoints; i++) {
        const struct repo_point *p = &r->points[i];
        json_array_append_new(pts, point_json(r, p));
        data += p->m.copied;
        files += p->file_bytes;
        if (p->root != (int)i)
            continue;
        json_t *c = json_object(), *members = json_array();
        json_object_set_new(c, "full", cli_json_string(p->file));
        json_object_set_new(c, "disk-id", cli_json_string(p->m.disk_id));
        for (size_t j = 0; j < r->npoints; j++)
            if (r->points[j].root == (int)i)
                json_array_append_new(members,
                                      cli_json_string(r->points[j].file));
        json_object_set_new(c, "points", members);
        json_array_append_new(chains, c);
    }
    for (size_t i = 0; i < r->nleft; i++) {
        const struct repo_leftover *l = &r->left[i];
        json_t *e = json_object();
        json_object_set_new(e, "file", cli_json_string(l->file));
        json_object_set_new(e, "kind",
                            json_string(repo_leftover_kind_name(l->kind)));
        json_object_set_new(e, "why", cli_json_string(l->why));
        json_object_set_new(e, "file-bytes", cli_json_u64(l->file_bytes));
        json_array_append_new(l->removable ? left : damaged, e);
    }
    json_object_set_new(o, "folder", cli_json_string(r->dir));
    json_object_set_new(o, "points", pts);
    json_object_set_new(o, "chains", chains);
    json_object_set_new(o, "broken", cli_json_u64(r->nproblems));
    json_object_set_new(o, "leftovers", left);
    json_object_set_new(o, "damaged", damaged);
    json_object_set_new(o, "data-bytes", cli_json_u64(data));
    json_object_set_new(o, "file-bytes", cli_json_u64(files));
    cli_json_print(o);
}

static int do_list(const struct args *a)
{
    struct cbt_error *err = NULL;
    struct repo r;
    if (foldertx_recover(a->dir, &err) < 0 || repo_open(a->dir, &r, &err) < 0)
        return cli_lib_error(err);
    if (a->output == CLI_OUTPUT_JSON)
        print_list_json(&r);
    else
        print_list_human(&r);
    repo_close(&r);
    return 0;
}

/* ---- prune ---- */

static const char *fate_name(enum repo_fate f)
{
    switch (f) {
    case REPO_KEEP:
    case REPO_KEEP_NEEDED:
        return "keep";
    case REPO_RETIRE:
        return "remove";
    case REPO_MERGE:
        return "merge";
    }
    return "?";
}

static void print_prune(const struct args *a,
                        const struct repo_prune_result *res, bool failed)
{
    size_t merged = 0, removed = 0, kept = 0;
    for (size_t i = 0; i < res->n; i++) {
        merged += res->v[i].fate == REPO_MERGE;
        removed += res->v[i].fate == REPO_RETIRE;
        kept += res->v[i].fate == REPO_KEEP || res->v[i].fate == REPO_KEEP_NEEDED;
    }
    bool dry = a->prune.dry_run;
    if (a->output == CLI_OUTPUT_JSON) {
        json_t *o = json_object(), *pts = json_array();
        for (size_t i = 0; i < res->n; i++) {
            const struct repo_decision *d = &res->v[i];
            json_t *e = json_object();
            json_object_set_new(e, "file", cli_json_string(d->file));
            json_object_set_new(e, "created", cli_json_string(d->created));
            json_object_set_new(e, "checkpoint",
                                d->checkpoint ? cli_json_string(d->checkpoint)
                                              : json_null());
            json_object_set_new(e, "action", json_string(fate_name(d->fate)));
            json_object_set_new(e, "into", d->into ? cli_json_string(d->into)
                                                   : json_null());
            json_object_set_new(e, "why", d->why ? cli_json_string(d->why)
                                                 : json_null());
            json_array_append_new(pts, e);
        }
        json_object_set_new(o, "folder", cli_json_string(a->dir));
        json_object_set_new(o, "dry-run", json_boolean(dry));
        json_object_set_new(o, "points", pts);
        json_object_set_new(o, "kept", cli_json_u64(kept));
        json_object_set_new(o, "merged", cli_json_u64(merged));
        json_object_set_new(o, "removed", cli_json_u64(removed));
        json_object_set_new(o, "steps-done", cli_json_u64(res->steps_done));
        json_object_set_new(o, "bytes-freed", dry ? json_null()
                                                  : cli_json_u64(res->bytes_freed));
        cli_json_print(o);
        return;
    }
    int wf = 4, wc = 10;
    for (size_t i = 0; i < res->n; i++) {
        int f = (int)strlen(res->v[i].file);
        int c = (int)strlen(or_dash(res->v[i].checkpoint));
        wf = f > wf ? f : wf;
        wc = c > wc ? c : wc;
    }
    for (size_t i = 0; i < res->n; i++) {
        const struct repo_decision *d = &res->v[i];
        char t[40];
        short_time(d->created, t, sizeof(t));
        printf("%-6s  %-21s  %-*s  %-*s  ", fate_name(d->fate), t, wc,
               or_dash(d->checkpoint), wf, d->file);
        if (d->fate == REPO_MERGE)
            printf("into %s (it takes this point's data)\n", d->into);
        else if (d->fate == REPO_RETIRE)
            printf("no point starts from it\n");
        else
            printf("%s\n", or_dash(d->why));
    }
    if (dry) {
        printf("Dry run: %zu point%s would go (%zu merged into a later "
               "point, %zu removed), %zu stay%s.  Run with --force to "
               "prune.\n", merged + removed,
               merged + removed == 1 ? "" : "s", merged, removed, kept,
               kept == 1 ? "s" : "");
    } else if (!failed) {
        char fr[32];
        cli_size_to_str(res->bytes_freed, fr, sizeof(fr));
        printf("Pruned: %zu point%s gone (%zu merged into a later point, "
               "%zu removed), %zu stay%s; %s freed.\n", merged + removed,
               merged + removed == 1 ? "" : "s", merged, removed, kept,
               kept == 1 ? "s" : "", fr);
    }
}

static int do_prune(struct args *a)
{
    if (!a->policy_given)
        return cli_usage_error(a->prog, "prune needs a policy: --keep-last, "
                               "--keep-daily, --keep-weekly or "
                               "--keep-monthly");
    a->prune.dry_run = !a->force;
    struct cli_progress progress;
    cli_progress_init(&progress, a->progress);
    if (!a->prune.dry_run) {
        a->prune.cancel = cli_signals_catch();
        a->prune.progress = cli_progress_cb;
        a->prune.progress_opaque = &progress;
    }
    struct repo_prune_result res;
    struct cbt_error *err = NULL;
    int r = repo_prune(a->dir, &a->prune, &res, &err);
    cli_progress_end(&progress);
    if (res.v)
        print_prune(a, &res, r < 0);
    fflush(stdout);
    repo_prune_result_free(&res);
    return r < 0 ? cli_lib_error(err) : 0;
}

/* ---- verify ---- */

static int do_verify(const struct args *a)
{
    struct cli_progress progress;
    cli_progress_init_rate(&progress, a->progress);
    struct repo_verify_result res;
    struct cbt_error *err = NULL;
    int r = repo_verify(a->dir, cli_progress_cb, &progress, &res, &err);
    cli_progress_end(&progress);
    if (r < 0)
        return cli_lib_error(err);
    if (a->output == CLI_OUTPUT_JSON) {
        json_t *o = json_object(), *pts = json_array();
        for (size_t i = 0; i < res.n; i++) {
            const struct repo_verdict *v = &res.v[i];
            json_t *e = json_object(), *probs = json_array();
            json_object_set_new(e, "file", cli_json_string(v->file));
            json_object_set_new(e, "ok", json_boolean(v->ok));
            json_object_set_new(e, "blocks-hashed", cli_json_u64(v->hashed));
            json_object_set_new(e, "blocks-shared", cli_json_u64(v->shared));
            json_object_set_new(e, "bad-blocks", cli_json_u64(v->bad_blocks));
            for (size_t k = 0; k < v->nbad; k++) {
                const struct repo_bad *b = &v->bad[k];
                json_t *pb = json_object();
                json_object_set_new(pb, "file", cli_json_string(b->file));
                json_object_set_new(pb, "problem", cli_json_string(b->problem));
                json_object_set_new(pb, "offset", b->block ? cli_json_u64(b->offset)
                                                           : json_null());
                json_object_set_new(pb, "length", b->block ? cli_json_u64(b->length)
                                                           : json_null());
                json_array_append_new(probs, pb);
            }
            json_object_set_new(e, "problems", probs);
            json_array_append_new(pts, e);
        }
        json_object_set_new(o, "folder", cli_json_string(a->dir));
        json_object_set_new(o, "ok", json_boolean(res.bad_points == 0));
        json_object_set_new(o, "points", pts);
        json_object_set_new(o, "bad-points", cli_json_u64(res.bad_points));
        json_object_set_new(o, "bytes-read", cli_json_u64(res.bytes_read));
        json_object_set_new(o, "bytes-total", cli_json_u64(res.bytes_total));
        cli_json_print(o);
    } else {
        int wf = 4;
        for (size_t i = 0; i < res.n; i++) {
            int f = (int)strlen(res.v[i].file);
            wf = f > wf ? f : wf;
        }
        for (size_t i = 0; i < res.n; i++) {
            const struct repo_verdict *v = &res.v[i];
            printf("%-6s  %-*s  %" PRIu64 " blocks hashed, %" PRIu64
                   " shared with its parent", v->ok ? "ok" : "BAD", wf,
                   v->file, v->hashed, v->shared);
            if (v->bad_blocks)
                printf(", %" PRIu64 " bad", v->bad_blocks);
            printf("\n");
            for (size_t k = 0; k < v->nbad; k++) {
                const struct repo_bad *b = &v->bad[k];
                if (b->block)
                    printf("          %s: guest range at offset %" PRIu64
                           ", length %" PRIu64 " (blocks %" PRIu64 "..%"
                           PRIu64 "): %s\n", b->file, b->offset, b->length,
                           b->offset / 65536,
                           (b->offset + b->length - 1) / 65536, b->problem);
                else
                    printf("          %s\n", b->problem);
            }
        }
        char rd[32], tot[32];
        cli_size_to_str(res.bytes_read, rd, sizeof(rd));
        cli_size_to_str(res.bytes_total, tot, sizeof(tot));
        if (res.bad_points == 0)
            printf("OK: %s: %zu point%s sound; read %s for views of %s in "
                   "all (each stored block once)\n", a->dir, res.n,
                   res.n == 1 ? "" : "s", rd, tot);
        else
            printf("FAILED: %s: %zu of %zu points are bad\n", a->dir,
                   res.bad_points, res.n);
    }
    fflush(stdout);
    int ret = 0;
    if (res.bad_points) {
        for (size_t i = 0; i < res.n; i++) {
            const struct repo_verdict *v = &res.v[i];
            if (v->ok || !v->nbad)
                continue;
            const struct repo_bad *b = &v->bad[0];
            const char *base = strrchr(b->file, '/');
            bool own = strcmp(base ? base + 1 : b->file, v->file) == 0;
            if (b->block)
                cli_error("%s/%s: guest range at offset %" PRIu64
                          ", length %" PRIu64 "%s%s%s: %s", a->dir, v->file,
                          b->offset, b->length, own ? "" : " (data in ",
                          own ? "" : b->file, own ? "" : ")", b->problem);
            else
                cli_error("%s/%s: %s", a->dir, v->file, b->problem);
        }
        ret = CLI_EXIT_CORRUPT;
    }
    repo_verify_result_free(&res);
    return ret;
}

/* ---- clean ---- */

static int do_clean(const struct args *a)
{
    struct repo_clean_result res;
    struct cbt_error *err = NULL;
    bool dry = !a->force;
    if (repo_clean(a->dir, dry, &res, &err) < 0)
        return cli_lib_error(err);
    size_t gone = 0, stay = 0;
    for (size_t i = 0; i < res.n; i++) {
        gone += !res.v[i].skipped;
        stay += res.v[i].skipped != NULL;
    }
    if (a->output == CLI_OUTPUT_JSON) {
        json_t *o = json_object(), *items = json_array();
        for (size_t i = 0; i < res.n; i++) {
            const struct repo_clean_item *it = &res.v[i];
            json_t *e = json_object();
            json_object_set_new(e, "file", cli_json_string(it->file));
            json_object_set_new(e, "why", cli_json_string(it->why));
            json_object_set_new(e, "file-bytes", cli_json_u64(it->file_bytes));
            json_object_set_new(e, "removed", json_boolean(it->removed));
            json_object_set_new(e, "kept", it->skipped
                                               ? cli_json_string(it->skipped)
                                               : json_null());
            json_array_append_new(items, e);
        }
        json_object_set_new(o, "folder", cli_json_string(a->dir));
        json_object_set_new(o, "dry-run", json_boolean(dry));
        json_object_set_new(o, "leftovers", items);
        json_object_set_new(o, "bytes", cli_json_u64(res.bytes));
        cli_json_print(o);
    } else {
        for (size_t i = 0; i < res.n; i++) {
            const struct repo_clean_item *it = &res.v[i];
            char sz[32];
            cli_size_to_str(it->file_bytes, sz, sizeof(sz));
            printf("%-7s %s (%s): %s%s%s\n",
                   it->skipped ? "keep" : dry ? "remove" : "removed",
                   it->file, sz, it->why, it->skipped ? "; kept: " : "",
                   it->skipped ? it->skipped : "");
        }
        char sz[32];
        cli_size_to_str(res.bytes, sz, sizeof(sz));
        if (res.n == 0)
            printf("%s: no leftovers of interrupted cbt runs\n", a->dir);
        else if (dry)
            printf("Dry run: %zu file%s (%s) would go, %zu in use stay%s.  "
                   "Run with --force to remove them.\n", gone,
                   gone == 1 ? "" : "s", sz, stay, stay == 1 ? "s" : "");
        else
            printf("Removed %zu file%s (%s); %zu in use stay%s.\n", gone,
                   gone == 1 ? "" : "s", sz, stay, stay == 1 ? "s" : "");
    }
    repo_clean_result_free(&res);
    return 0;
}

/* ---- arguments ---- */

static int parse_count(const char *prog, const char *opt, const char *s,
                       unsigned *out)
{
    char *end;
    errno = 0;
    unsigned long v = strtoul(s, &end, 10);
    if (!*s || *end || errno || v > 1000000 || s[0] == '-') {
        cli_usage_error(prog, "%s: '%s' is not a count (0 to 1000000)", opt,
                        s);
        return -1;
    }
    *out = (unsigned)v;
    return 0;
}

static int parse_args(int argc, char **argv, struct args *a)
{
    enum { OPT_OUTPUT = 256, OPT_LAST, OPT_DAILY, OPT_WEEKLY, OPT_MONTHLY,
           OPT_DRY, OPT_FORCE };
    static const struct option longopts[] = {
        {"help", no_argument, NULL, 'h'},
        {"output", required_argument, NULL, OPT_OUTPUT},
        {"keep-last", required_argument, NULL, OPT_LAST},
        {"keep-daily", required_argument, NULL, OPT_DAILY},
        {"keep-weekly", required_argument, NULL, OPT_WEEKLY},
        {"keep-monthly", required_argument, NULL, OPT_MONTHLY},
        {"dry-run", no_argument, NULL, OPT_DRY},
        {"force", no_argument, NULL, OPT_FORCE},
        {NULL, 0, NULL, 0},
    };
    static const char *const names[] = {[SUB_LIST] = "list",
                                        [SUB_PRUNE] = "prune",
                                        [SUB_VERIFY] = "verify",
                                        [SUB_CLEAN] = "clean"};
    int sub;
    int r = cli_subcommand(a->prog, &argc, &argv, names,
                           sizeof(names) / sizeof(names[0]),
                           "list, verify, clean or prune", &sub);
    if (r != 0)
        return r;
    a->sub = (enum sub)sub;
    int c;
    optind = 0;
    while ((c = getopt_long(argc, argv, "hp", longopts, NULL)) != -1) {
        unsigned *count = NULL;
        switch (c) {
        case 'h':
            return 1;
        case 'p':
            a->progress = true;
            break;
        case OPT_OUTPUT:
            if (cli_parse_output(a->prog, optarg, &a->output) < 0)
                return -1;
            break;
        case OPT_LAST:
            count = &a->prune.keep_last;
            break;
        case OPT_DAILY:
            count = &a->prune.keep_daily;
            break;
        case OPT_WEEKLY:
            count = &a->prune.keep_weekly;
            break;
        case OPT_MONTHLY:
            count = &a->prune.keep_monthly;
            break;
        case OPT_DRY:
            a->dry_run = true;
            break;
        case OPT_FORCE:
            a->force = true;
            break;
        default:
            cli_bad_option(a->prog);
            return -1;
        }
        if (count) {
            if (a->sub != SUB_PRUNE) {
                cli_usage_error(a->prog, "--keep-* options are for prune");
                return -1;
            }
            if (parse_count(a->prog, argv[optind - 1], optarg, count) < 0)
                return -1;
            a->policy_given = true;
        }
    }
    if ((a->dry_run || a->force) && a->sub != SUB_PRUNE &&
        a->sub != SUB_CLEAN) {
        cli_usage_error(a->prog, "--dry-run and --force are for prune and "
                        "clean");
        return -1;
    }
    if (a->dry_run && a->force) {
        cli_usage_error(a->prog, "--dry-run and --force contradict each "
                        "other");
        return -1;
    }
    if (optind + 1 != argc) {
        cli_usage_error(a->prog, optind >= argc ? "Expecting a backup folder"
                                                : "Too many arguments");
        return -1;
    }
    a->dir = argv[optind];
    return 0;
}

int cmd_repo(int argc, char **argv)
{
    struct args a = {.prog = argv[0]};
    int r = parse_args(argc, argv, &a);
    if (r > 0)
        return cli_help(usage);
    if (r < 0)
        return CLI_EXIT_USAGE;
    switch (a.sub) {
    case SUB_LIST:
        return do_list(&a);
    case SUB_PRUNE:
        return do_prune(&a);
    case SUB_VERIFY:
        return do_verify(&a);
    case SUB_CLEAN:
        return do_clean(&a);
    }
    return CLI_EXIT_FAILURE;
}
