/*
 * cbt bitmap: change the persistent dirty bitmaps of a closed qcow2 image
 * with qemu-img bitmap's actions, or look at them (list, dump, count,
 * sha256, diff).
 *
 * The actions of one call run in command-line order on the in-memory
 * bitmaps and are then stored with one cbt_bitmap_commit(): all of them or,
 * when any fails, none (cbt_bitmap_rollback() and the file is left as it
 * was).  qemu-img stores each action as it goes, so a failing second action
 * leaves the first one in the image; that is the one intended difference.
 * The views open the image read-only and never change it.  With --chain
 * they look at a bitmap name over the whole backing chain (cbt/chain.h):
 * the verdict on each name, and the union of a valid name's copies.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include <cbt/bitmap.h>
#include <cbt/chain.h>

#include "cli.h"

static const char usage[] =
    "Usage: cbt bitmap (--merge SOURCE | --add | --remove | --clear\n"
    "                   | --enable | --disable | --rename NEWNAME)...\n"
    "                  [-b SOURCE_FILE [-F SOURCE_FMT]] [-g GRANULARITY]\n"
    "                  [-f FMT] FILE BITMAP\n"
    "       cbt bitmap --remove-all [-f FMT] FILE\n"
    "       cbt bitmap --list [--chain [--strict]] [--output=human|json]\n"
    "                  [-f FMT] FILE\n"
    "       cbt bitmap (--dump | --count | --sha256) [--chain [--strict]]\n"
    "                  [--output=human|json] [-f FMT] FILE BITMAP\n"
    "       cbt bitmap --diff OTHER [-b SOURCE_FILE [-F SOURCE_FMT]]\n"
    "                  [--output=human|json] [-f FMT] FILE BITMAP\n"
    "\n"
    "Change the persistent dirty bitmaps of a qcow2 image that no other\n"
    "program has open, with qemu-img bitmap's actions, or show them.  The\n"
    "actions run in command-line order on BITMAP and are stored together:\n"
    "either all of them land in FILE, or one fails and FILE is not changed.\n"
    "\n"
    "Actions (repeatable; run in the order given):\n"
    "  --add             create BITMAP, persistent and recording (-g sets\n"
    "                    its granularity)\n"
    "  --remove          delete BITMAP\n"
    "  --clear           mark every part of the disk clean in BITMAP\n"
    "  --enable          make BITMAP record writes\n"
    "  --disable         stop BITMAP recording writes\n"
    "  --merge SOURCE    add the dirty bits of bitmap SOURCE (of FILE, or of\n"
    "                    -b SOURCE_FILE) to BITMAP\n"
    "  --rename NEWNAME  rename BITMAP; the actions after it act on NEWNAME\n"
    "  --remove-all      delete every bitmap of FILE (alone, no BITMAP)\n"
    "\n"
    "Views (one at a time, read-only; FILE is not changed):\n"
    "  --list            every bitmap: name, granularity, state (recording,\n"
    "                    disabled or inconsistent), persistence, on-disk\n"
    "                    flags, dirty bytes and bytes used on disk\n"
    "  --dump            the dirty and clean extents of BITMAP over the whole\n"
    "                    disk, laid out as nbdinfo --map prints them\n"
    "  --count           the dirty bytes of BITMAP (whole granules)\n"
    "  --sha256          SHA-256 of BITMAP's bits (see docs/bitmaps.md)\n"
    "  --diff OTHER      extents over the whole disk: dirty only in BITMAP\n"
    "                    (type 1), dirty only in OTHER (type 2), the same in\n"
    "                    both (0); OTHER is a bitmap of FILE or of -b\n"
    "                    SOURCE_FILE (same disk size)\n"
    "\n"
    "Over the backing chain of FILE (FILE is its top layer, depth 0):\n"
    "  --chain           with --list: every bitmap name of any layer, whether\n"
    "                    it is valid over the chain (held by the top and the\n"
    "                    layers right below it, no gap, every copy\n"
    "                    consistent, the top copy recording) or why not, and\n"
    "                    each layer's copy; with --dump, --count, --sha256:\n"
    "                    the union of BITMAP's copies, or an error when\n"
    "                    BITMAP is not valid over the chain\n"
    "  --strict          with --chain: every copy must be recording (by\n"
    "                    default a disabled copy below the top is accepted as\n"
    "                    sealed, as cbt snapshot leaves it)\n"
    "\n"
    "Options:\n"
    "  -g, --granularity SIZE  bytes per bit for --add: a power of two from\n"
    "                      512 to 2G, suffixes k, M, G (default: the cluster\n"
    "                      size, clamped to 4k..64k)\n"
    "  -b, --source-file SOURCE_FILE  image holding the --merge sources (or\n"
    "                      the --diff OTHER), opened read-only\n"
    "  -F, --source-format SOURCE_FMT  format of SOURCE_FILE (default: probe)\n"
    "  -f, --format FMT    format of FILE (default: probe)\n"
    "  --output=FMT        human (default) or json, for the views\n"
    "  -U, --force-share   views only: read FILE although another process\n"
    "                      (a running VM) holds it for writing; what is shown\n"
    "                      is FILE as that process last wrote it, and its\n"
    "                      bitmaps are in use (inconsistent) while it runs\n"
    "  -h, --help          show this help\n"
    "\n"
    "Examples:\n"
    "  cbt bitmap --add disk.qcow2 b1\n"
    "  cbt bitmap --add -g 1M --disable disk.qcow2 b2\n"
    "  cbt bitmap --merge b1 --enable disk.qcow2 b2\n"
    "  cbt bitmap --merge b1 -b backup-base.qcow2 disk.qcow2 b1\n"
    "  cbt bitmap --rename weekly disk.qcow2 b2\n"
    "  cbt bitmap --list --output=json disk.qcow2\n"
    "  cbt bitmap --dump disk.qcow2 b1\n"
    "  cbt bitmap --diff b2 disk.qcow2 b1\n"
    "  cbt bitmap --list --chain top.qcow2\n"
    "  cbt bitmap --dump --chain --output=json top.qcow2 b1\n";

enum action_kind {
    ACT_ADD,
    ACT_REMOVE,
    ACT_CLEAR,
    ACT_ENABLE,
    ACT_DISABLE,
    ACT_MERGE,
    ACT_RENAME,
};

/* The operation names of qemu-img's "Operation %s on bitmap %s failed". */
static const char *const action_names[] = {
    [ACT_ADD] = "add",       [ACT_REMOVE] = "remove",   [ACT_CLEAR] = "clear",
    [ACT_ENABLE] = "enable", [ACT_DISABLE] = "disable", [ACT_MERGE] = "merge",
    [ACT_RENAME] = "rename",
};

struct action {
    enum action_kind kind;
    const char *arg; /* --merge SOURCE, --rename NEWNAME */
};

/* What the call does besides (or instead of) the action list. */
enum view {
    VIEW_NONE, /* the action list */
    VIEW_REMOVE_ALL,
    VIEW_LIST,
    VIEW_DUMP,
    VIEW_COUNT,
    VIEW_SHA256,
    VIEW_DIFF,
};

static const char *const view_options[] = {
    [VIEW_NONE] = "",         [VIEW_REMOVE_ALL] = "--remove-all",
    [VIEW_LIST] = "--list",   [VIEW_DUMP] = "--dump",
    [VIEW_COUNT] = "--count", [VIEW_SHA256] = "--sha256",
    [VIEW_DIFF] = "--diff",
};

struct bitmap_args {
    const char *prog;
    struct action *actions; /* argc entries at most; caller frees */
    size_t n_actions;
    bool add, merge; /* some --add / --merge among the actions */
    enum view view;
    bool view_conflict; /* two views, kept to report after parsing */
    enum view other_view;
    const char *diff_other; /* --diff OTHER */
    const char *format;
    const char *src_file;
    const char *src_format;
    uint64_t granularity; /* 0: default, as qemu-img treats -g 0 */
    enum cli_output output;
    bool output_given;
    bool chain;  /* --chain */
    bool strict; /* --strict */
    bool force_share; /* -U */
    const char *filename;
    const char *bitmap;
};

static void set_view(struct bitmap_args *a, enum view v)
{
    if (a->view == VIEW_NONE || a->view == v) {
        a->view = v;
    } else if (!a->view_conflict) {
        a->view_conflict = true;
        a->other_view = v;
    }
}

static void push_action(struct bitmap_args *a, enum action_kind kind,
                        const char *arg)
{
    a->actions[a->n_actions++] = (struct action){.kind = kind, .arg = arg};
    if (kind == ACT_ADD)
        a->add = true;
    if (kind == ACT_MERGE)
        a->merge = true;
}

/* The checks after getopt, in qemu-img's order, then cbt's own.  Returns 0
 * or -1 after a usage error. */
static int check_args(struct bitmap_args *a, int argc, char **argv)
{
    if (a->n_actions == 0 && a->view == VIEW_NONE) {
        cli_usage_error(a->prog,
                        "Need at least one of --add, --remove, --clear, "
                        "--enable, --disable, or --merge (or --rename, "
                        "--remove-all, --list, --dump, --count, --sha256, "
                        "--diff)");
        return -1;
    }
    if (a->view_conflict) {
        cli_usage_error(a->prog, "%s cannot be combined with %s",
                        view_options[a->view], view_options[a->other_view]);
        return -1;
    }
    if (a->view != VIEW_NONE && a->n_actions) {
        cli_usage_error(a->prog, "%s cannot be combined with --%s",
                        view_options[a->view],
                        action_names[a->actions[0].kind]);
        return -1;
    }
    if (a->granularity && !a->add) {
        cli_usage_error(a->prog, "granularity only supported with --add");
        return -1;
    }
    if (a->src_format && !a->src_file) {
        cli_usage_error(a->prog, "-F only supported with -b");
        return -1;
    }
    if (a->src_file && !a->merge && a->view != VIEW_DIFF) {
        cli_usage_error(a->prog,
                        "Merge bitmap source file only supported with --merge");
        return -1;
    }
    if (a->output_given &&
        (a->view == VIEW_NONE || a->view == VIEW_REMOVE_ALL)) {
        cli_usage_error(a->prog, "--output only supported with --list, "
                                 "--dump, --count, --sha256 or --diff");
        return -1;
    }
    if (a->chain && a->view != VIEW_LIST && a->view != VIEW_DUMP &&
        a->view != VIEW_COUNT && a->view != VIEW_SHA256) {
        cli_usage_error(a->prog, "--chain only supported with --list, --dump, "
                                 "--count or --sha256");
        return -1;
    }
    if (a->force_share &&
        (a->view == VIEW_NONE || a->view == VIEW_REMOVE_ALL)) {
        cli_usage_error(a->prog, "-U (--force-share) only supported with "
                                 "--list, --dump, --count, --sha256 or "
                                 "--diff: cbt never changes an image another "
                                 "process holds");
        return -1;
    }
    if (a->strict && !a->chain) {
        cli_usage_error(a->prog, "--strict only supported with --chain");
        return -1;
    }
    if (a->view == VIEW_LIST || a->view == VIEW_REMOVE_ALL) {
        if (optind != argc - 1) {
            cli_usage_error(a->prog, "Expecting filename");
            return -1;
        }
        a->filename = argv[optind];
        return 0;
    }
    if (optind != argc - 2) {
        cli_usage_error(a->prog, "Expecting filename and bitmap name");
        return -1;
    }
    a->filename = argv[optind];
    a->bitmap = argv[optind + 1];
    return 0;
}

/* Returns 1 for --help, 0 to go on, -1 after a usage error. */
static int parse_args(int argc, char **argv, struct bitmap_args *a)
{
    enum {
        OPT_ADD = 256,
        OPT_REMOVE,
        OPT_CLEAR,
        OPT_ENABLE,
        OPT_DISABLE,
        OPT_MERGE,
        OPT_RENAME,
        OPT_REMOVE_ALL,
        OPT_LIST,
        OPT_DUMP,
        OPT_COUNT,
        OPT_SHA256,
        OPT_DIFF,
        OPT_OUTPUT,
        OPT_CHAIN,
        OPT_STRICT,
    };
    static const struct option longopts[] = {
        {"help", no_argument, NULL, 'h'},
        {"add", no_argument, NULL, OPT_ADD},
        {"remove", no_argument, NULL, OPT_REMOVE},
        {"clear", no_argument, NULL, OPT_CLEAR},
        {"enable", no_argument, NULL, OPT_ENABLE},
        {"disable", no_argument, NULL, OPT_DISABLE},
        {"merge", required_argument, NULL, OPT_MERGE},
        {"rename", required_argument, NULL, OPT_RENAME},
        {"remove-all", no_argument, NULL, OPT_REMOVE_ALL},
        {"list", no_argument, NULL, OPT_LIST},
        {"dump", no_argument, NULL, OPT_DUMP},
        {"count", no_argument, NULL, OPT_COUNT},
        {"sha256", no_argument, NULL, OPT_SHA256},
        {"diff", required_argument, NULL, OPT_DIFF},
        {"output", required_argument, NULL, OPT_OUTPUT},
        {"chain", no_argument, NULL, OPT_CHAIN},
        {"strict", no_argument, NULL, OPT_STRICT},
        {"granularity", required_argument, NULL, 'g'},
        {"source-file", required_argument, NULL, 'b'},
        {"source-format", required_argument, NULL, 'F'},
        {"format", required_argument, NULL, 'f'},
        {"force-share", no_argument, NULL, 'U'},
        {NULL, 0, NULL, 0},
    };
    int c;
    optind = 0;
    while ((c = getopt_long(argc, argv, "hb:F:g:f:U", longopts, NULL)) != -1) {
        switch (c) {
        case 'h':
            return 1;
        case OPT_ADD:
            push_action(a, ACT_ADD, NULL);
            break;
        case OPT_REMOVE:
            push_action(a, ACT_REMOVE, NULL);
            break;
        case OPT_CLEAR:
            push_action(a, ACT_CLEAR, NULL);
            break;
        case OPT_ENABLE:
            push_action(a, ACT_ENABLE, NULL);
            break;
        case OPT_DISABLE:
            push_action(a, ACT_DISABLE, NULL);
            break;
        case OPT_MERGE:
            push_action(a, ACT_MERGE, optarg);
            break;
        case OPT_RENAME:
            push_action(a, ACT_RENAME, optarg);
            break;
        case OPT_REMOVE_ALL:
            set_view(a, VIEW_REMOVE_ALL);
            break;
        case OPT_LIST:
            set_view(a, VIEW_LIST);
            break;
        case OPT_DUMP:
            set_view(a, VIEW_DUMP);
            break;
        case OPT_COUNT:
            set_view(a, VIEW_COUNT);
            break;
        case OPT_SHA256:
            set_view(a, VIEW_SHA256);
            break;
        case OPT_DIFF:
            set_view(a, VIEW_DIFF);
            a->diff_other = optarg;
            break;
        case OPT_OUTPUT:
            if (cli_parse_output(a->prog, optarg, &a->output) < 0)
                return -1;
            a->output_given = true;
            break;
        case OPT_CHAIN:
            a->chain = true;
            break;
        case OPT_STRICT:
            a->strict = true;
            break;
        case 'g':
            /* qemu-img's cvtnum message, on one line. */
            if (cli_parse_size(optarg, &a->granularity) < 0) {
                cli_usage_error(a->prog,
                                "Invalid granularity specified. You may use "
                                "k, M, G, T, P or E suffixes for kilobytes, "
                                "megabytes, gigabytes, terabytes, petabytes "
                                "and exabytes.");
                return -1;
            }
            break;
        case 'b':
            a->src_file = optarg;
            break;
        case 'F':
            a->src_format = optarg;
            break;
        case 'f':
            a->format = optarg;
            break;
        case 'U':
            a->force_share = true;
            break;
        default:
            cli_bad_option(a->prog);
            return -1;
        }
    }
    return check_args(a, argc, argv);
}

/* The open flags of the read-only views. */
static unsigned view_flags(const struct bitmap_args *a)
{
    return a->force_share ? CBT_OPEN_FORCE_SHARE : 0;
}

/* ---- actions: in memory, then one commit ---- */

/*
 * The reason of a failed action without the library's "IMAGE: " prefix:
 * qemu-img's "Operation %s on bitmap %s failed: %s" carries QEMU's bare
 * message, and the image is the one on the command line.
 */
static const char *reason(const struct cbt_error *err, struct cbt_image *img,
                          struct cbt_image *src)
{
    const char *msg = cbt_error_message(err);
    struct cbt_image *imgs[] = {img, src};
    for (size_t i = 0; i < 2; i++) {
        if (!imgs[i])
            continue;
        const char *fn = cbt_image_filename(imgs[i]);
        size_t len = strlen(fn);
        if (strncmp(msg, fn, len) == 0 && strncmp(msg + len, ": ", 2) == 0)
            return msg + len + 2;
    }
    return msg;
}

static int run_action(struct cbt_image *img, struct cbt_image *src,
                      const struct bitmap_args *a, const struct action *act,
                      const char *name, struct cbt_error **errp)
{
    switch (act->kind) {
    case ACT_ADD:
        return cbt_bitmap_add(img, name, a->granularity, false, errp);
    case ACT_REMOVE:
        return cbt_bitmap_remove(img, name, errp);
    case ACT_CLEAR:
        return cbt_bitmap_clear(img, name, errp);
    case ACT_ENABLE:
        return cbt_bitmap_enable(img, name, errp);
    case ACT_DISABLE:
        return cbt_bitmap_disable(img, name, errp);
    case ACT_MERGE:
        return cbt_bitmap_merge(img, name, src ? src : img, act->arg, errp);
    case ACT_RENAME:
        return cbt_bitmap_rename(img, name, act->arg, errp);
    }
    return -EINVAL;
}

/* Forget the uncommitted changes after a failure; reports its own error. */
static void rollback(struct cbt_image *img)
{
    struct cbt_error *err = NULL;
    if (cbt_bitmap_rollback(img, &err) < 0)
        cli_lib_error(err);
}

/* Store everything changed since open; on failure roll back.  0 or the
 * exit status. */
static int commit(struct cbt_image *img)
{
    struct cbt_error *err = NULL;
    if (cbt_bitmap_commit(img, &err) < 0) {
        int status = cli_lib_error(err);
        rollback(img);
        return status;
    }
    return 0;
}

/* Report a failed action in qemu-img's words, roll back; the exit status. */
static int action_failed(struct cbt_image *img, struct cbt_image *src,
                         enum action_kind kind, const char *name,
                         struct cbt_error *err)
{
    cli_error("Operation %s on bitmap %s failed: %s%s", action_names[kind],
              name, reason(err, img, src), cli_advice(err));
    int status = cli_exit_status(err);
    cbt_error_free(err);
    rollback(img);
    return status;
}

static int run_actions(struct cbt_image *img, struct cbt_image *src,
                       const struct bitmap_args *a)
{
    const char *name = a->bitmap;
    for (size_t i = 0; i < a->n_actions; i++) {
        const struct action *act = &a->actions[i];
        struct cbt_error *err = NULL;
        if (run_action(img, src, a, act, name, &err) < 0)
            return action_failed(img, src, act->kind, name, err);
        if (act->kind == ACT_RENAME)
            name = act->arg;
    }
    return commit(img);
}

static int remove_all(struct cbt_image *img)
{
    struct cbt_bitmap_info *list = NULL;
    size_t n = 0;
    struct cbt_error *err = NULL;
    if (cbt_bitmap_list(img, &list, &n, &err) < 0)
        return cli_lib_error(err);
    int ret = 0;
    for (size_t i = 0; i < n && ret == 0; i++) {
        if (cbt_bitmap_remove(img, list[i].name, &err) < 0)
            ret = action_failed(img, NULL, ACT_REMOVE, list[i].name, err);
    }
    cbt_bitmap_info_free_list(list, n);
    return ret == 0 ? commit(img) : ret;
}

/* Open the -b image (read-only) first, then FILE read-write, run, close. */
static int do_modify(const struct bitmap_args *a)
{
    struct cbt_error *err = NULL;
    struct cbt_image *src = NULL;
    if (a->src_file) {
        src = cli_open(a->src_file, a->src_format, CBT_OPEN_NO_BACKING,
                             &err);
        if (!src)
            return cli_lib_error(err);
    }
    struct cbt_image *img = cli_open(
        a->filename, a->format, CBT_OPEN_RDWR | CBT_OPEN_NO_BACKING, &err);
    if (!img) {
        int status = cli_lib_error(err);
        cbt_image_close(src, NULL);
        return status;
    }
    int ret =
        a->view == VIEW_REMOVE_ALL ? remove_all(img) : run_actions(img, src, a);
    if (cbt_image_close(img, &err) < 0) {
        int status = cli_lib_error(err);
        ret = ret ? ret : status;
    }
    if (src)
        cbt_image_close(src, NULL);
    return ret;
}

/* ---- views ---- */

/* "auto", "in-use,auto" or "-": the on-disk flags, as qemu-img info names
 * them. */
static const char *flags_str(const struct cbt_bitmap_info *b)
{
    if (b->in_use)
        return b->auto_flag ? "in-use,auto" : "in-use";
    return b->auto_flag ? "auto" : "-";
}

static const char *state_str(const struct cbt_bitmap_info *b)
{
    if (b->inconsistent)
        return "inconsistent";
    return b->recording ? "recording" : "disabled";
}

static json_t *info_json(const struct cbt_bitmap_info *b)
{
    json_t *o = json_object();
    json_object_set_new(o, "name", cli_json_string(b->name));
    json_object_set_new(o, "granularity", cli_json_u64(b->granularity));
    json_object_set_new(o, "recording", json_boolean(b->recording));
    json_object_set_new(o, "persistent", json_boolean(b->persistent));
    json_object_set_new(o, "in-use", json_boolean(b->in_use));
    json_object_set_new(o, "auto", json_boolean(b->auto_flag));
    json_object_set_new(o, "inconsistent", json_boolean(b->inconsistent));
    json_object_set_new(o, "busy", json_boolean(b->busy));
    json_object_set_new(o, "count", cli_json_u64(b->count));
    json_object_set_new(o, "disk-size", cli_json_u64(b->disk_bytes));
    return o;
}

static void print_list(const struct cbt_bitmap_info *list, size_t n,
                       enum cli_output output)
{
    if (output == CLI_OUTPUT_JSON) {
        json_t *arr = json_array();
        for (size_t i = 0; i < n; i++)
            json_array_append_new(arr, info_json(&list[i]));
        cli_json_print(arr);
        return;
    }
    if (n == 0)
        return;
    /* Columns as wide as their widest value (names up to 64 bytes). */
    int w = 4, wd = 5, wk = 4;
    for (size_t i = 0; i < n; i++) {
        size_t len = strlen(list[i].name);
        if (len > (size_t)w)
            w = len > 64 ? 64 : (int)len;
        int d = snprintf(NULL, 0, "%" PRIu64, list[i].count);
        int k = snprintf(NULL, 0, "%" PRIu64, list[i].disk_bytes);
        wd = d > wd ? d : wd;
        wk = k > wk ? k : wk;
    }
    printf("%-*s  %11s  %-12s  %-10s  %-11s  %*s  %*s\n", w, "NAME",
           "GRANULARITY", "STATE", "PERSISTENT", "FLAGS", wd, "DIRTY", wk,
           "DISK");
    for (size_t i = 0; i < n; i++) {
        const struct cbt_bitmap_info *b = &list[i];
        printf("%-*s  %11" PRIu64 "  %-12s  %-10s  %-11s  %*" PRIu64
               "  %*" PRIu64 "\n",
               w, b->name, b->granularity, state_str(b),
               b->persistent ? "yes" : "no", flags_str(b), wd, b->count, wk,
               b->disk_bytes);
    }
}

static int view_list(struct cbt_image *img, const struct bitmap_args *a)
{
    struct cbt_bitmap_info *list = NULL;
    size_t n = 0;
    struct cbt_error *err = NULL;
    if (cbt_bitmap_list(img, &list, &n, &err) < 0)
        return cli_lib_error(err);
    print_list(list, n, a->output);
    cbt_bitmap_info_free_list(list, n);
    return 0;
}

/* --dump: one extent per line as it comes, so memory stays bounded. */
struct dump_state {
    enum cli_output output;
    bool first;
};

static int dump_extent(void *opaque, uint64_t start, uint64_t length,
                       bool dirty)
{
    struct dump_state *s = opaque;
    if (s->output == CLI_OUTPUT_HUMAN) {
        /* nbdinfo --map's layout: offset, length, type, description. */
        printf("%10" PRIu64 "  %10" PRIu64 "  %3d  %s\n", start, length,
               dirty ? 1 : 0, dirty ? "dirty" : "clean");
    } else {
        printf("%s{ \"start\": %" PRIu64 ", \"length\": %" PRIu64
               ", \"dirty\": %s}",
               s->first ? "[" : ",\n", start, length, dirty ? "true" : "false");
    }
    s->first = false;
    return 0;
}

static int view_dump(struct cbt_image *img, const struct bitmap_args *a)
{
    struct dump_state s = {.output = a->output, .first = true};
    struct cbt_error *err = NULL;
    int r = cbt_bitmap_extents(img, a->bitmap, dump_extent, &s, &err);
    if (a->output == CLI_OUTPUT_JSON && (r == 0 || !s.first))
        printf("%s]\n", s.first ? "[" : "");
    return r < 0 ? cli_lib_error(err) : 0;
}

static int view_count(struct cbt_image *img, const struct bitmap_args *a)
{
    struct cbt_error *err = NULL;
    uint64_t count;
    /* One bitmap counted (from the image when not loaded): the library
     * says why it cannot be (missing, inconsistent), in its words. */
    if (cbt_bitmap_count(img, a->bitmap, &count, &err) < 0)
        return cli_lib_error(err);
    if (a->output == CLI_OUTPUT_JSON) {
        json_t *o = json_object();
        json_object_set_new(o, "count", cli_json_u64(count));
        cli_json_print(o);
    } else {
        printf("%" PRIu64 "\n", count);
    }
    return 0;
}

static int view_sha256(struct cbt_image *img, const struct bitmap_args *a)
{
    char hex[65];
    struct cbt_error *err = NULL;
    if (cbt_bitmap_sha256(img, a->bitmap, hex, &err) < 0)
        return cli_lib_error(err);
    if (a->output == CLI_OUTPUT_JSON) {
        json_t *o = json_object();
        json_object_set_new(o, "sha256", json_string(hex));
        cli_json_print(o);
    } else {
        printf("%s\n", hex);
    }
    return 0;
}

/* --diff: the library cuts the disk into extents of three kinds (dirty
 * only in BITMAP: 1, only in OTHER: 2, the same in both: 0); we print. */
struct diff_out {
    const struct bitmap_args *a;
    bool first;
};

static int diff_print(void *opaque, uint64_t start, uint64_t length,
                      enum cbt_diff kind)
{
    struct diff_out *o = opaque;
    const struct bitmap_args *a = o->a;
    int type = (int)kind;
    if (a->output == CLI_OUTPUT_HUMAN) {
        printf("%10" PRIu64 "  %10" PRIu64 "  %3d  ", start, length, type);
        if (kind == CBT_DIFF_SAME)
            printf("same\n");
        else
            printf("only in %s\n",
                   kind == CBT_DIFF_ONLY_FIRST ? a->bitmap : a->diff_other);
    } else {
        printf("%s{ \"start\": %" PRIu64 ", \"length\": %" PRIu64
               ", \"dirty\": %s, \"only-in\": %s}",
               o->first ? "[" : ",\n", start, length,
               kind == CBT_DIFF_ONLY_FIRST ? "true" : "false",
               kind == CBT_DIFF_ONLY_FIRST    ? "\"bitmap\""
               : kind == CBT_DIFF_ONLY_SECOND ? "\"other\""
                                              : "null");
    }
    o->first = false;
    return 0;
}

static int view_diff(struct cbt_image *img, const struct bitmap_args *a)
{
    struct cbt_image *other_img = img;
    struct cbt_error *err = NULL;
    if (a->src_file) {
        other_img = cli_open(a->src_file, a->src_format,
                                   view_flags(a) | CBT_OPEN_NO_BACKING, &err);
        if (!other_img)
            return cli_lib_error(err);
    }
    struct diff_out o = {.a = a, .first = true};
    int ret = 0;
    if (cbt_bitmap_diff(img, a->bitmap, other_img, a->diff_other, diff_print,
                        &o, &err) < 0)
        ret = cli_lib_error(err);
    else if (a->output == CLI_OUTPUT_JSON)
        printf("%s]\n", o.first ? "[" : "");
    if (other_img != img)
        cbt_image_close(other_img, NULL);
    return ret;
}

/* ---- views over the backing chain (--chain) ---- */

static unsigned chain_flags(const struct bitmap_args *a)
{
    return a->strict ? CBT_CHAIN_STRICT : 0;
}

static json_t *u64_or_null(bool have, uint64_t v)
{
    return have ? cli_json_u64(v) : json_null();
}

static json_t *chain_json(const struct cbt_chain_bitmap *b)
{
    json_t *o = json_object();
    json_object_set_new(o, "name", cli_json_string(b->name));
    json_object_set_new(o, "valid", json_boolean(b->valid));
    const char *code = cbt_chain_reason_code(b->reason);
    json_object_set_new(o, "reason", code ? json_string(code) : json_null());
    json_object_set_new(o, "reason-depth", b->valid ? json_null()
                                           : json_integer(b->reason_depth));
    json_object_set_new(o, "message", cli_json_string(b->message));
    json_object_set_new(o, "granularity",
                        u64_or_null(b->granularity != 0, b->granularity));
    json_object_set_new(o, "count", u64_or_null(b->valid, b->count));
    json_t *layers = json_array();
    for (size_t i = 0; i < b->nlayers; i++) {
        const struct cbt_chain_layer *l = &b->layers[i];
        json_t *e = json_object();
        json_object_set_new(e, "depth", json_integer(l->depth));
        json_object_set_new(e, "filename", cli_json_string(l->filename));
        json_object_set_new(e, "present", json_boolean(l->present));
        if (l->present) {
            json_object_set_new(e, "state",
                                json_string(cbt_chain_copy_name(l->state)));
            json_object_set_new(e, "granularity",
                                cli_json_u64(l->granularity));
            json_object_set_new(e, "recording", json_boolean(l->recording));
            json_object_set_new(e, "persistent", json_boolean(l->persistent));
            json_object_set_new(e, "inconsistent",
                                json_boolean(l->inconsistent));
            json_object_set_new(e, "count", cli_json_u64(l->count));
        }
        json_array_append_new(layers, e);
    }
    json_object_set_new(o, "layers", layers);
    return o;
}

/* The STATE column of a bitmap's line: "valid" or "invalid (REASON)". */
static void verdict_str(const struct cbt_chain_bitmap *b, char *buf,
                        size_t len)
{
    if (b->valid)
        snprintf(buf, len, "valid");
    else
        snprintf(buf, len, "invalid (%s)", cbt_chain_reason_code(b->reason));
}

/*
 * Human: one table.  Each bitmap has a line (name, verdict, the top copy's
 * granularity, the union's dirty bytes), then one line per layer (depth,
 * what the layer holds, its granularity and dirty bytes, its file), then,
 * when invalid, the reason in words.
 */
static void print_chain_list(const struct cbt_chain_bitmap *list, size_t n)
{
    if (n == 0)
        return;
    int w = (int)strlen("NAME/DEPTH"), ws = (int)strlen("inconsistent");
    int wd = 5;
    for (size_t i = 0; i < n; i++) {
        char v[64];
        verdict_str(&list[i], v, sizeof(v));
        size_t len = strlen(list[i].name);
        if (len > (size_t)w)
            w = len > 64 ? 64 : (int)len;
        ws = (int)strlen(v) > ws ? (int)strlen(v) : ws;
        int d = snprintf(NULL, 0, "%" PRIu64, list[i].count);
        wd = d > wd ? d : wd;
        for (size_t k = 0; k < list[i].nlayers; k++) {
            d = snprintf(NULL, 0, "%" PRIu64, list[i].layers[k].count);
            wd = d > wd ? d : wd;
        }
    }
    printf("%-*s  %-*s  %11s  %*s  %s\n", w, "NAME/DEPTH", ws, "STATE",
           "GRANULARITY", wd, "DIRTY", "FILE");
    for (size_t i = 0; i < n; i++) {
        const struct cbt_chain_bitmap *b = &list[i];
        char v[64], g[24] = "-", d[24] = "-";
        verdict_str(b, v, sizeof(v));
        if (b->granularity)
            snprintf(g, sizeof(g), "%" PRIu64, b->granularity);
        if (b->valid)
            snprintf(d, sizeof(d), "%" PRIu64, b->count);
        printf("%-*s  %-*s  %11s  %*s\n", w, b->name, ws, v, g, wd, d);
        for (size_t k = 0; k < b->nlayers; k++) {
            const struct cbt_chain_layer *l = &b->layers[k];
            g[0] = d[0] = '-';
            g[1] = d[1] = '\0';
            if (l->present) {
                snprintf(g, sizeof(g), "%" PRIu64, l->granularity);
                snprintf(d, sizeof(d), "%" PRIu64, l->count);
            }
            printf("  %-*d  %-*s  %11s  %*s  %s\n", w - 2, l->depth, ws,
                   cbt_chain_copy_name(l->state), g, wd, d, l->filename);
        }
        if (!b->valid)
            printf("  %s\n", b->message);
    }
}

static int view_chain_list(struct cbt_image *img, const struct bitmap_args *a)
{
    struct cbt_chain_bitmap *list = NULL;
    size_t n = 0;
    struct cbt_error *err = NULL;
    if (cbt_chain_bitmap_list(img, chain_flags(a), &list, &n, &err) < 0)
        return cli_lib_error(err);
    if (a->output == CLI_OUTPUT_JSON) {
        json_t *arr = json_array();
        for (size_t i = 0; i < n; i++)
            json_array_append_new(arr, chain_json(&list[i]));
        cli_json_print(arr);
    } else {
        print_chain_list(list, n);
    }
    cbt_chain_bitmap_free_list(list, n);
    return 0;
}

static int view_chain_dump(struct cbt_image *img, const struct bitmap_args *a)
{
    struct dump_state s = {.output = a->output, .first = true};
    struct cbt_error *err = NULL;
    int r = cbt_chain_bitmap_extents(img, a->bitmap, chain_flags(a),
                                     dump_extent, &s, &err);
    if (a->output == CLI_OUTPUT_JSON && (r == 0 || !s.first))
        printf("%s]\n", s.first ? "[" : "");
    return r < 0 ? cli_lib_error(err) : 0;
}

static int view_chain_count(struct cbt_image *img,
                            const struct bitmap_args *a)
{
    struct cbt_chain_bitmap b;
    struct cbt_error *err = NULL;
    if (cbt_chain_bitmap_get(img, a->bitmap, chain_flags(a), &b, &err) < 0)
        return cli_lib_error(err);
    int ret = 0;
    if (!b.valid) {
        cli_error("%s: %s", cbt_image_filename(img), b.message);
        ret = CLI_EXIT_FAILURE;
    } else if (a->output == CLI_OUTPUT_JSON) {
        json_t *o = json_object();
        json_object_set_new(o, "count", cli_json_u64(b.count));
        cli_json_print(o);
    } else {
        printf("%" PRIu64 "\n", b.count);
    }
    cbt_chain_bitmap_clear(&b);
    return ret;
}

static int view_chain_sha256(struct cbt_image *img,
                             const struct bitmap_args *a)
{
    char hex[65];
    struct cbt_error *err = NULL;
    if (cbt_chain_bitmap_sha256(img, a->bitmap, chain_flags(a), hex, &err) < 0)
        return cli_lib_error(err);
    if (a->output == CLI_OUTPUT_JSON) {
        json_t *o = json_object();
        json_object_set_new(o, "sha256", json_string(hex));
        cli_json_print(o);
    } else {
        printf("%s\n", hex);
    }
    return 0;
}

static int do_chain_view(const struct bitmap_args *a)
{
    struct cbt_error *err = NULL;
    struct cbt_image *img =
        cli_open(a->filename, a->format, view_flags(a), &err);
    if (!img)
        return cli_lib_error(err);
    int ret = CLI_EXIT_FAILURE;
    switch (a->view) {
    case VIEW_LIST:
        ret = view_chain_list(img, a);
        break;
    case VIEW_DUMP:
        ret = view_chain_dump(img, a);
        break;
    case VIEW_COUNT:
        ret = view_chain_count(img, a);
        break;
    case VIEW_SHA256:
        ret = view_chain_sha256(img, a);
        break;
    default:
        break;
    }
    cbt_image_close(img, NULL);
    return ret;
}

static int do_view(const struct bitmap_args *a)
{
    if (a->chain)
        return do_chain_view(a);
    struct cbt_error *err = NULL;
    struct cbt_image *img = cli_open(
        a->filename, a->format, view_flags(a) | CBT_OPEN_NO_BACKING, &err);
    if (!img)
        return cli_lib_error(err);
    int ret = CLI_EXIT_FAILURE;
    switch (a->view) {
    case VIEW_LIST:
        ret = view_list(img, a);
        break;
    case VIEW_DUMP:
        ret = view_dump(img, a);
        break;
    case VIEW_COUNT:
        ret = view_count(img, a);
        break;
    case VIEW_SHA256:
        ret = view_sha256(img, a);
        break;
    case VIEW_DIFF:
        ret = view_diff(img, a);
        break;
    case VIEW_NONE:
    case VIEW_REMOVE_ALL:
        break;
    }
    cbt_image_close(img, NULL);
    return ret;
}

int cmd_bitmap(int argc, char **argv)
{
    struct bitmap_args a = {.prog = argv[0], .output = CLI_OUTPUT_HUMAN};
    a.actions = calloc(argc > 0 ? (size_t)argc : 1, sizeof(*a.actions));
    if (!a.actions) {
        cli_error("out of memory");
        return CLI_EXIT_FAILURE;
    }
    int r = parse_args(argc, argv, &a);
    int ret;
    if (r != 0)
        ret = r > 0 ? cli_help(usage) : CLI_EXIT_USAGE;
    else if (a.view == VIEW_NONE || a.view == VIEW_REMOVE_ALL)
        ret = do_modify(&a);
    else
        ret = do_view(&a);
    free(a.actions);
    return ret;
}
