/*
 * cbt checkpoint: create, list, show, delete and reconcile the checkpoints
 * of a disk (include/cbt/checkpoint.h).  DISK is the top of a chain; it is
 * opened with its backing files, read-write for create, delete and
 * reconcile --fix (lower layers are reopened read-write by the library only
 * when they must change), read-only otherwise.
 */
#include <getopt.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cbt/checkpoint.h>

#include "../live/livebackup.h"
#include "../live/livecp.h"
#include "cli.h"

#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))

static const char usage[] =
    "Usage: cbt checkpoint create [-g GRANULARITY] DISK NAME\n"
    "       cbt checkpoint list [-U] [--output=human|json] DISK\n"
    "       cbt checkpoint show [-U] [--output=human|json] DISK NAME\n"
    "       cbt checkpoint delete DISK NAME\n"
    "       cbt checkpoint reconcile [--fix] [--output=human|json] DISK\n"
    "       cbt checkpoint create|list|show|delete|reconcile --qmp SOCKET ...\n"
    "                  DISK ...\n"
    "\n"
    "A checkpoint is a named point in time of a disk: a recording persistent\n"
    "dirty bitmap of the same name (everything written since) and metadata\n"
    "stored in the disk's top layer (creation order and time, parent, size\n"
    "and granularity at creation, the disk's id), in a qcow2 header\n"
    "extension QEMU keeps.  Copying the file carries its checkpoints.  DISK\n"
    "is the top of a chain; its backing files are opened too.\n"
    "\n"
    "Subcommands:\n"
    "  create      make checkpoint NAME now: its bitmap and its metadata land\n"
    "              in one header update, or nothing changes.  NAME (1 to 1023\n"
    "              bytes) must differ from every checkpoint and from every\n"
    "              bitmap of any layer\n"
    "  list        every checkpoint, oldest first: order, name, creation\n"
    "              time, parent, disk size and granularity at creation, bytes\n"
    "              changed since (the bitmap's union over the chain) and\n"
    "              health: ok; sealed (this layer is history an overlay made\n"
    "              by cbt snapshot continues: back up the overlay); BROKEN\n"
    "              (why its bitmap, or the copies below sealed by a snapshot,\n"
    "              cannot be used).  An overlay without metadata of its own\n"
    "              lists those of the layer below that has some\n"
    "  show        one checkpoint, with the same fields\n"
    "  delete      remove NAME's metadata and its bitmap in every layer\n"
    "              holding it (its children get its parent); a checkpoint\n"
    "              that does not exist is a warning, not an error; broken\n"
    "              bitmaps of that name are removed as well\n"
    "  reconcile   compare metadata and bitmaps and explain every\n"
    "              difference: checkpoints whose bitmap is missing, broken\n"
    "              (e.g. in use after a crash) or replaced, and bitmaps\n"
    "              without a checkpoint.  With --fix: drop the broken\n"
    "              checkpoints (a backup since them must be a full one) and\n"
    "              adopt valid recording bitmaps of the top layer as\n"
    "              checkpoints; other bitmaps are reported only.  Sealed\n"
    "              checkpoints are never drift.  With --qmp also what cbt\n"
    "              processes that are gone left in QEMU (jobs, exports,\n"
    "              temporary bitmaps, scratch nodes and files) and the new\n"
    "              checkpoints of their backups, which --fix removes\n"
    "\n"
    "Options:\n"
    "  -g, --granularity SIZE  bytes per bit of the new bitmap: a power of\n"
    "                      two from 512 to 2G, suffixes k, M, G (default: the\n"
    "                      cluster size, clamped to 4k..64k)\n"
    "  --fix               reconcile: repair what it finds\n"
    "  --output=FMT        human (default) or json (list, show, reconcile)\n"
    "  --qmp SOCKET        DISK is a disk of the running QEMU (qemu-system or\n"
    "                      qemu-storage-daemon) whose QMP socket this is: a\n"
    "                      device id (vda), export id, node name or image\n"
    "                      file.  cbt acts through QEMU and never writes the\n"
    "                      image: new checkpoints' metadata waits in cbt's\n"
    "                      state folder until cbt next has the image closed\n"
    "  -U, --force-share   list, show, reconcile without --fix: read DISK\n"
    "                      although another process (a running VM) holds it\n"
    "                      for writing; its bitmaps are then in use and what\n"
    "                      is shown is DISK as that process last wrote it\n"
    "  -h, --help          show this help\n"
    "\n"
    "Examples:\n"
    "  cbt checkpoint create disk.qcow2 monday\n"
    "  cbt checkpoint create -g 1M disk.qcow2 weekly-42\n"
    "  cbt checkpoint list disk.qcow2\n"
    "  cbt checkpoint list --output=json overlay.qcow2\n"
    "  cbt checkpoint show disk.qcow2 monday\n"
    "  cbt checkpoint delete disk.qcow2 monday\n"
    "  cbt checkpoint reconcile disk.qcow2\n"
    "  cbt checkpoint reconcile --fix disk.qcow2\n"
    "  cbt checkpoint reconcile --qmp /run/vm1.qmp --fix vda\n";

enum sub { SUB_CREATE, SUB_LIST, SUB_SHOW, SUB_DELETE, SUB_RECONCILE };

static const char *const sub_names[] = {
    [SUB_CREATE] = "create", [SUB_LIST] = "list", [SUB_SHOW] = "show",
    [SUB_DELETE] = "delete", [SUB_RECONCILE] = "reconcile",
};
/* The arguments each takes: DISK [NAME]. */
static const int sub_nargs[] = {
    [SUB_CREATE] = 2, [SUB_LIST] = 1, [SUB_SHOW] = 2, [SUB_DELETE] = 2,
    [SUB_RECONCILE] = 1,
};

struct args {
    const char *prog;
    enum sub sub;
    uint64_t granularity;
    bool granularity_given;
    bool fix;
    bool force_share;
    const char *qmp;
    enum cli_output output;
    bool output_given;
    const char *disk;
    const char *name;
};

/* ---- output helpers ---- */

/* Local time, ISO 8601 with the offset: 2026-11-22T01:19:39+01:00. */
static void local_iso(int64_t sec, char *buf, size_t len)
{
    time_t t = (time_t)sec;
    struct tm tm;
    char z[8] = "";
    if (!localtime_r(&t, &tm) ||
        strftime(buf, len, "%Y-%m-%dT%H:%M:%S", &tm) == 0) {
        snprintf(buf, len, "@%" PRId64, sec);
        return;
    }
    if (strftime(z, sizeof(z), "%z", &tm) == 5) {
        size_t n = strlen(buf);
        snprintf(buf + n, len - n, "%.3s:%.2s", z, z + 3);
    }
}

/* UTC, ISO 8601 with nanoseconds: 2026-11-22T00:19:39.123456789Z. */
static json_t *utc_iso(int64_t sec, uint32_t nsec)
{
    time_t t = (time_t)sec;
    struct tm tm;
    char buf[64];
    if (!gmtime_r(&t, &tm) ||
        strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%S", &tm) == 0)
        return json_null();
    size_t n = strlen(buf);
    snprintf(buf + n, sizeof(buf) - n, ".%09" PRIu32 "Z", nsec);
    return json_string(buf);
}

static json_t *checkpoint_json(const struct cbt_checkpoint *c)
{
    json_t *o = json_object();
    json_object_set_new(o, "order", cli_json_u64(c->order));
    json_object_set_new(o, "name", cli_json_string(c->name));
    json_object_set_new(o, "created", utc_iso(c->created_sec, c->created_nsec));
    json_object_set_new(o, "created-sec", json_integer(c->created_sec));
    json_object_set_new(o, "created-nsec", json_integer(c->created_nsec));
    json_object_set_new(o, "parent",
                        c->parent ? cli_json_string(c->parent) : json_null());
    json_object_set_new(o, "virtual-size", cli_json_u64(c->virtual_size));
    json_object_set_new(o, "granularity", cli_json_u64(c->granularity));
    json_object_set_new(o, "usable", json_boolean(c->usable));
    json_object_set_new(o, "sealed", json_boolean(c->sealed));
    json_object_set_new(o, "problem", c->problem ? cli_json_string(c->problem)
                                                 : json_null());
    json_object_set_new(o, "dirty-bytes", c->usable
                                              ? cli_json_u64(c->dirty_bytes)
                                              : json_null());
    return o;
}

static json_t *disk_id_json(const char *id)
{
    return *id ? json_string(id) : json_null();
}

/* Under the table: the reasons of the broken checkpoints, or of the
 * sealed ones, after a heading when there are any. */
static void print_reasons(const struct cbt_checkpoint *v, size_t n,
                          bool sealed, const char *heading)
{
    bool header = false;
    for (size_t i = 0; i < n; i++) {
        if (v[i].usable || v[i].sealed != sealed)
            continue;
        if (!header)
            printf("\n%s:\n", heading);
        header = true;
        printf("  %s: %s\n", v[i].name, v[i].problem ? v[i].problem : "?");
    }
}

static void print_table(const struct cbt_checkpoint *v, size_t n)
{
    int wo = 5, wn = 4, wp = 6, ws = 4, wg = 11, wd = 5;
    char (*created)[48] = calloc(n ? n : 1, sizeof(*created));
    char (*size)[32] = calloc(n ? n : 1, sizeof(*size));
    char (*gran)[32] = calloc(n ? n : 1, sizeof(*gran));
    char (*dirty)[32] = calloc(n ? n : 1, sizeof(*dirty));
    if (!created || !size || !gran || !dirty)
        goto out;
    for (size_t i = 0; i < n; i++) {
        const struct cbt_checkpoint *c = &v[i];
        local_iso(c->created_sec, created[i], sizeof(created[i]));
        cli_size_to_str(c->virtual_size, size[i], sizeof(size[i]));
        cli_size_to_str(c->granularity, gran[i], sizeof(gran[i]));
        if (c->usable)
            cli_size_to_str(c->dirty_bytes, dirty[i], sizeof(dirty[i]));
        else
            snprintf(dirty[i], sizeof(dirty[i]), "-");
        int o = snprintf(NULL, 0, "%" PRIu64, c->order);
        int nl = (int)MIN(strlen(c->name), (size_t)40);
        int pl = c->parent ? (int)MIN(strlen(c->parent), (size_t)40) : 1;
        wo = MAX(wo, o);
        wn = MAX(wn, nl);
        wp = MAX(wp, pl);
        ws = MAX(ws, (int)strlen(size[i]));
        wg = MAX(wg, (int)strlen(gran[i]));
        wd = MAX(wd, (int)strlen(dirty[i]));
    }
    int wc = n ? (int)strlen(created[0]) : 7;
    for (size_t i = 0; i < n; i++)
        wc = MAX(wc, (int)strlen(created[i]));
    printf("%*s  %-*s  %-*s  %-*s  %*s  %*s  %*s  %s\n", wo, "ORDER", wn,
           "NAME", wc, "CREATED", wp, "PARENT", ws, "SIZE", wg, "GRANULARITY",
           wd, "DIRTY", "HEALTH");
    for (size_t i = 0; i < n; i++) {
        const struct cbt_checkpoint *c = &v[i];
        printf("%*" PRIu64 "  %-*s  %-*s  %-*s  %*s  %*s  %*s  %s\n", wo,
               c->order, wn, c->name, wc, created[i], wp,
               c->parent ? c->parent : "-", ws, size[i], wg, gran[i], wd,
               dirty[i], c->usable ? "ok" : c->sealed ? "sealed" : "BROKEN");
    }
    print_reasons(v, n, false, "Broken (a backup since them must be a full "
                  "one; 'cbt checkpoint reconcile' explains, --fix repairs)");
    print_reasons(v, n, true, "Sealed (history that an overlay continues; "
                  "nothing to repair)");
out:
    free(created);
    free(size);
    free(gran);
    free(dirty);
}

static void print_one(const struct cbt_checkpoint *c, const char *id)
{
    char created[48], size[32], gran[32], dirty[32];
    local_iso(c->created_sec, created, sizeof(created));
    cli_size_to_str(c->virtual_size, size, sizeof(size));
    cli_size_to_str(c->granularity, gran, sizeof(gran));
    cli_size_to_str(c->dirty_bytes, dirty, sizeof(dirty));
    printf("name:          %s\n", c->name);
    printf("order:         %" PRIu64 "\n", c->order);
    printf("created:       %s\n", created);
    printf("parent:        %s\n", c->parent ? c->parent : "-");
    printf("virtual size:  %s (%" PRIu64 " bytes)\n", size, c->virtual_size);
    printf("granularity:   %s\n", gran);
    if (c->usable)
        printf("dirty since:   %s (%" PRIu64 " bytes)\n", dirty,
               c->dirty_bytes);
    else
        printf("dirty since:   unknown\n");
    printf("health:        %s\n", c->usable ? "ok" : c->problem);
    printf("disk id:       %s\n", id);
}

/* ---- subcommands ---- */

/* Open DISK; on failure report it and set *status to its exit status. */
static struct cbt_image *open_disk(const struct args *a, bool rw, int *status)
{
    struct cbt_error *err = NULL;
    unsigned flags = rw ? CBT_OPEN_RDWR : 0;
    if (a->force_share)
        flags |= CBT_OPEN_FORCE_SHARE;
    struct cbt_image *img = cli_open(a->disk, NULL, flags, &err);
    if (!img)
        *status = cli_lib_error(err);
    return img;
}

/* Close; an error is reported and turns ret into a failure. */
static int close_disk(struct cbt_image *img, int ret)
{
    struct cbt_error *err = NULL;
    if (cbt_image_close(img, &err) < 0) {
        int status = cli_lib_error(err);
        return ret ? ret : status;
    }
    return ret;
}

static int do_create(const struct args *a)
{
    int ret = 0;
    struct cbt_image *img = open_disk(a, true, &ret);
    if (!img)
        return ret;
    struct cbt_error *err = NULL;
    if (cbt_checkpoint_create(img, a->name, a->granularity, &err) < 0)
        ret = cli_lib_error(err);
    return close_disk(img, ret);
}

static int do_list(const struct args *a)
{
    int ret = 0;
    struct cbt_image *img = open_disk(a, false, &ret);
    if (!img)
        return ret;
    struct cbt_error *err = NULL;
    struct cbt_checkpoint *v = NULL;
    size_t n = 0;
    char id[37];
    if (cbt_checkpoint_disk_id(img, id, &err) < 0 ||
        cbt_checkpoint_list(img, &v, &n, &err) < 0) {
        ret = cli_lib_error(err);
    } else if (a->output == CLI_OUTPUT_JSON) {
        json_t *o = json_object();
        json_t *arr = json_array();
        for (size_t i = 0; i < n; i++)
            json_array_append_new(arr, checkpoint_json(&v[i]));
        json_object_set_new(o, "disk-id", disk_id_json(id));
        json_object_set_new(o, "checkpoints", arr);
        cli_json_print(o);
    } else if (n) {
        print_table(v, n);
    }
    cbt_checkpoint_free_list(v, n);
    return close_disk(img, ret);
}

static int do_show(const struct args *a)
{
    int ret = 0;
    struct cbt_image *img = open_disk(a, false, &ret);
    if (!img)
        return ret;
    struct cbt_error *err = NULL;
    struct cbt_checkpoint c;
    char id[37];
    if (cbt_checkpoint_disk_id(img, id, &err) < 0 ||
        cbt_checkpoint_get(img, a->name, &c, &err) < 0) {
        ret = cli_lib_error(err);
    } else {
        if (a->output == CLI_OUTPUT_JSON) {
            json_t *o = checkpoint_json(&c);
            json_object_set_new(o, "disk-id", disk_id_json(id));
            cli_json_print(o);
        } else {
            print_one(&c, id);
        }
        cbt_checkpoint_clear(&c);
    }
    return close_disk(img, ret);
}

static int do_delete(const struct args *a)
{
    int ret = 0;
    struct cbt_image *img = open_disk(a, true, &ret);
    if (!img)
        return ret;
    struct cbt_error *err = NULL;
    bool existed = false;
    if (cbt_checkpoint_delete(img, a->name, &existed, &err) < 0)
        ret = cli_lib_error(err);
    else if (!existed)
        cli_error("warning: %s: no checkpoint named '%s' (already deleted?); "
                  "nothing to delete", a->disk, a->name);
    return close_disk(img, ret);
}

/* Print reconcile's findings. */
static void print_drift(const struct args *a, const struct cbt_drift_item *v,
                        size_t n)
{
    if (a->output == CLI_OUTPUT_JSON) {
        json_t *o = json_object();
        json_t *arr = json_array();
        for (size_t i = 0; i < n; i++) {
            json_t *e = json_object();
            json_object_set_new(e, "kind",
                                json_string(cbt_drift_code(v[i].kind)));
            json_object_set_new(e, "name", cli_json_string(v[i].name));
            json_object_set_new(e, "explanation",
                                cli_json_string(v[i].explanation));
            json_object_set_new(e, "fix", cli_json_string(v[i].fix));
            json_object_set_new(e, "fixed", json_boolean(v[i].fixed));
            json_array_append_new(arr, e);
        }
        json_object_set_new(o, "fix", json_boolean(a->fix));
        json_object_set_new(o, "drift", arr);
        cli_json_print(o);
    } else if (n == 0) {
        printf("No drift: every checkpoint has a usable bitmap and every "
               "bitmap a checkpoint.\n");
    } else {
        size_t fixed = 0;
        for (size_t i = 0; i < n; i++) {
            printf("%s: %s\n", cbt_drift_code(v[i].kind), v[i].explanation);
            printf("    %s %s\n", v[i].fixed ? "fixed:" : "fix:  ", v[i].fix);
            fixed += v[i].fixed;
        }
        printf("%zu item%s of drift, %zu fixed%s\n", n, n == 1 ? "" : "s",
               fixed, a->fix ? "" : " (run with --fix to repair)");
    }
}

static int do_reconcile(const struct args *a)
{
    int ret = 0;
    struct cbt_image *img = open_disk(a, a->fix, &ret);
    if (!img)
        return ret;
    struct cbt_error *err = NULL;
    struct cbt_drift_item *v = NULL;
    size_t n = 0;
    if (cbt_checkpoint_reconcile(img, a->fix, &v, &n, &err) < 0)
        ret = cli_lib_error(err);
    else
        print_drift(a, v, n);
    cbt_drift_free_list(v, n);
    return close_disk(img, ret);
}

/* ---- parsing ---- */

/* Returns 1 for --help, 0 to go on, -1 after a usage error. */
static int parse_args(int argc, char **argv, struct args *a)
{
    enum { OPT_FIX = 256, OPT_OUTPUT, OPT_QMP };
    static const struct option longopts[] = {
        {"help", no_argument, NULL, 'h'},
        {"granularity", required_argument, NULL, 'g'},
        {"fix", no_argument, NULL, OPT_FIX},
        {"output", required_argument, NULL, OPT_OUTPUT},
        {"force-share", no_argument, NULL, 'U'},
        {"qmp", required_argument, NULL, OPT_QMP},
        {NULL, 0, NULL, 0},
    };
    int sub;
    int r = cli_subcommand(a->prog, &argc, &argv, sub_names,
                           ARRAY_SIZE(sub_names),
                           "create, list, show, delete or reconcile", &sub);
    if (r != 0)
        return r;
    a->sub = (enum sub)sub;
    int c;
    optind = 0;
    while ((c = getopt_long(argc, argv, "hg:U", longopts, NULL)) != -1) {
        switch (c) {
        case 'h':
            return 1;
        case 'g':
            if (cli_parse_size(optarg, &a->granularity) < 0) {
                cli_usage_error(a->prog, "invalid granularity '%s' (a power "
                                "of two from 512 to 2G; suffixes k, M, G)",
                                optarg);
                return -1;
            }
            a->granularity_given = true;
            break;
        case OPT_FIX:
            a->fix = true;
            break;
        case 'U':
            a->force_share = true;
            break;
        case OPT_QMP:
            a->qmp = optarg;
            break;
        case OPT_OUTPUT:
            if (cli_parse_output(a->prog, optarg, &a->output) < 0)
                return -1;
            a->output_given = true;
            break;
        default:
            cli_bad_option(a->prog);
            return -1;
        }
    }
    const char *name = sub_names[a->sub];
    int nargs = sub_nargs[a->sub];
    if (a->granularity_given && a->sub != SUB_CREATE) {
        cli_usage_error(a->prog, "-g is only supported with create");
        return -1;
    }
    if (a->force_share && (a->fix || (a->sub != SUB_LIST &&
                                      a->sub != SUB_SHOW &&
                                      a->sub != SUB_RECONCILE))) {
        cli_usage_error(a->prog, "-U (--force-share) is only supported with "
                                 "list, show and reconcile without --fix: cbt "
                                 "never changes a disk another process holds");
        return -1;
    }
    if (a->qmp && a->force_share) {
        cli_usage_error(a->prog, "--qmp needs no -U: QEMU answers for the "
                                 "disk it holds");
        return -1;
    }
    if (a->fix && a->sub != SUB_RECONCILE) {
        cli_usage_error(a->prog, "--fix is only supported with reconcile");
        return -1;
    }
    if (a->output_given && a->sub != SUB_LIST && a->sub != SUB_SHOW &&
        a->sub != SUB_RECONCILE) {
        cli_usage_error(a->prog, "--output is only supported with list, show "
                                 "and reconcile");
        return -1;
    }
    int left = argc - optind;
    if (left < nargs) {
        cli_usage_error(a->prog, "%s: expecting %s", name,
                        nargs == 2 ? "DISK and NAME" : "DISK");
        return -1;
    }
    if (left > nargs) {
        cli_usage_error(a->prog, "%s: unexpected argument '%s'", name,
                        argv[optind + nargs]);
        return -1;
    }
    a->disk = argv[optind];
    a->name = nargs == 2 ? argv[optind + 1] : NULL;
    return 0;
}

/* ---- the same subcommands on a running VM (--qmp) ---- */

static int do_live(const struct args *a)
{
    struct cbt_error *err = NULL;
    struct qmp *q = qmp_connect(a->qmp, &err);
    if (!q)
        return cli_lib_error(err);
    struct live_cp c;
    int ret = 0;
    if (live_cp_open(q, a->disk, &c, &err) < 0) {
        qmp_close(q);
        return cli_lib_error(err);
    }
    switch (a->sub) {
    case SUB_CREATE:
        if (live_cp_create(&c, a->name, a->granularity, &err) < 0)
            ret = cli_lib_error(err);
        break;
    case SUB_LIST:
        if (a->output == CLI_OUTPUT_JSON) {
            json_t *o = json_object();
            json_t *arr = json_array();
            for (size_t i = 0; i < c.n; i++)
                json_array_append_new(arr, checkpoint_json(&c.v[i]));
            json_object_set_new(o, "disk-id", disk_id_json(c.disk_id));
            json_object_set_new(o, "checkpoints", arr);
            cli_json_print(o);
        } else if (c.n) {
            print_table(c.v, c.n);
        }
        break;
    case SUB_SHOW: {
        const struct cbt_checkpoint *k = live_cp_find(&c, a->name);
        if (!k) {
            cli_error("%s: disk '%s' has no checkpoint named '%s'", a->qmp,
                      a->disk, a->name);
            ret = CLI_EXIT_FAILURE;
        } else if (a->output == CLI_OUTPUT_JSON) {
            json_t *o = checkpoint_json(k);
            json_object_set_new(o, "disk-id", disk_id_json(c.disk_id));
            cli_json_print(o);
        } else {
            print_one(k, c.disk_id);
        }
        break;
    }
    case SUB_DELETE: {
        bool existed = false;
        if (live_cp_delete(&c, a->name, &existed, &err) < 0)
            ret = cli_lib_error(err);
        else if (!existed)
            cli_error("warning: %s: no checkpoint named '%s' (already "
                      "deleted?); nothing to delete", a->disk, a->name);
        break;
    }
    case SUB_RECONCILE: {
        /* What dead cbt processes left in this QEMU (any disk's). */
        struct drift_items it = {0};
        int left = live_leftovers(q, a->fix, &err);
        if (left > 0) {
            char *expl = cbt_strdup_printf(
                "%d object%s (exports, jobs, temporary bitmaps, scratch "
                "nodes and files) that cbt processes which are gone left in "
                "QEMU", left, left == 1 ? "" : "s");
            char *how = cbt_strdup_printf("remove them");
            if (drift_items_push(&it, CBT_DRIFT_LEFTOVER, "", expl, how,
                                 a->fix) < 0) {
                cbt_error_set(&err, ENOMEM, "out of memory");
                left = -1;
            }
        }
        if (left < 0 || live_cp_reconcile(&c, a->fix, &it, &err) < 0)
            ret = cli_lib_error(err);
        else
            print_drift(a, it.v, it.n);
        cbt_drift_free_list(it.v, it.n);
        break;
    }
    }
    live_cp_close(&c);
    qmp_close(q);
    return ret;
}

int cmd_checkpoint(int argc, char **argv)
{
    struct args a = {.prog = argv[0]};
    int r = parse_args(argc, argv, &a);
    if (r > 0)
        return cli_help(usage);
    if (r < 0)
        return CLI_EXIT_USAGE;
    if (a.qmp)
        return do_live(&a);
    switch (a.sub) {
    case SUB_CREATE:
        return do_create(&a);
    case SUB_LIST:
        return do_list(&a);
    case SUB_SHOW:
        return do_show(&a);
    case SUB_DELETE:
        return do_delete(&a);
    case SUB_RECONCILE:
        return do_reconcile(&a);
    }
    return CLI_EXIT_FAILURE;
}
