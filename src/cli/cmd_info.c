/* cbt info: what qemu-img info shows, as text or with its JSON field names. */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cbt/bitmap.h>

#include "cli.h"

static const char usage[] =
    "Usage: cbt info [-f FMT] [--output=human|json] [--backing-chain] FILE\n"
    "\n"
    "Show the format, virtual and allocated size, backing file, snapshots\n"
    "and format settings of an image.  JSON uses qemu-img info's field\n"
    "names; with --backing-chain it is a list with one object per layer,\n"
    "top first.\n"
    "\n"
    "Options:\n"
    "  -f FMT           format of FILE (qcow2 or raw; default: probe)\n"
    "  --output=FMT     human (default) or json\n"
    "  --backing-chain  also show every backing file below FILE\n"
    "  -U, --force-share  read an image another process holds for writing\n"
    "                     (its state as that process last wrote it)\n"
    "  -h, --help       show this help\n"
    "\n"
    "Examples:\n"
    "  cbt info disk.qcow2\n"
    "  cbt info --output=json --backing-chain overlay.qcow2\n";

#define NSEC_PER_SEC 1000000000ULL

/* One layer: what cbt_image_get_info reports plus its bitmaps. */
struct layer_info {
    struct cbt_image_info info;
    struct cbt_bitmap_info *bitmaps;
    size_t nb_bitmaps;
};

static json_t *snapshot_json(const struct cbt_snapshot_info *sn)
{
    json_t *o = json_object();
    if (sn->icount != UINT64_MAX)
        json_object_set_new(o, "icount", cli_json_u64(sn->icount));
    json_object_set_new(o, "vm-clock-nsec",
                        cli_json_u64(sn->vm_clock_nsec % NSEC_PER_SEC));
    json_object_set_new(o, "name", cli_json_string(sn->name));
    json_object_set_new(o, "date-sec", cli_json_u64(sn->date_sec));
    json_object_set_new(o, "date-nsec", cli_json_u64(sn->date_nsec));
    json_object_set_new(o, "vm-clock-sec",
                        cli_json_u64(sn->vm_clock_nsec / NSEC_PER_SEC));
    json_object_set_new(o, "id", cli_json_string(sn->id));
    json_object_set_new(o, "vm-state-size", cli_json_u64(sn->vm_state_size));
    return o;
}

/* qemu's Qcow2BitmapInfo: flags as found on disk, in qemu's key order. */
static json_t *bitmap_json(const struct cbt_bitmap_info *b)
{
    json_t *o = json_object();
    json_t *flags = json_array();
    if (b->in_use)
        json_array_append_new(flags, json_string("in-use"));
    if (b->auto_flag)
        json_array_append_new(flags, json_string("auto"));
    json_object_set_new(o, "flags", flags);
    json_object_set_new(o, "name", cli_json_string(b->name));
    json_object_set_new(o, "granularity", cli_json_u64(b->granularity));
    return o;
}

/* The "data" of format-specific for qcow2, in qemu's field order. */
static json_t *qcow2_specific_json(const struct layer_info *l)
{
    const struct cbt_image_info *info = &l->info;
    json_t *d = json_object();
    bool v3 = info->version >= 3;
    json_object_set_new(d, "compat", json_string(v3 ? "1.1" : "0.10"));
    json_object_set_new(
        d, "compression-type",
        json_string(info->compression_type ? info->compression_type : "zlib"));
    if (v3)
        json_object_set_new(d, "lazy-refcounts",
                            json_boolean(info->lazy_refcounts));
    if (v3 && l->nb_bitmaps) {
        json_t *list = json_array();
        for (size_t i = 0; i < l->nb_bitmaps; i++)
            json_array_append_new(list, bitmap_json(&l->bitmaps[i]));
        json_object_set_new(d, "bitmaps", list);
    }
    json_object_set_new(d, "refcount-bits", json_integer(info->refcount_bits));
    if (v3 && info->data_file) {
        json_object_set_new(d, "data-file", cli_json_string(info->data_file));
        json_object_set_new(d, "data-file-raw",
                            json_boolean(info->data_file_raw));
    }
    if (v3) {
        json_object_set_new(d, "corrupt", json_boolean(info->corrupt));
        json_object_set_new(d, "extended-l2", json_boolean(info->extended_l2));
    }
    return d;
}

/* One image as qemu-img's ImageInfo object (field order as qemu prints). */
static json_t *info_json(const struct layer_info *l)
{
    const struct cbt_image_info *info = &l->info;
    json_t *o = json_object();
    if (info->backing_filename && info->backing_format)
        json_object_set_new(o, "backing-filename-format",
                            cli_json_string(info->backing_format));
    if (info->nb_snapshots) {
        json_t *list = json_array();
        for (size_t i = 0; i < info->nb_snapshots; i++)
            json_array_append_new(list, snapshot_json(&info->snapshots[i]));
        json_object_set_new(o, "snapshots", list);
    }
    json_object_set_new(o, "virtual-size", cli_json_u64(info->virtual_size));
    json_object_set_new(o, "filename", cli_json_string(info->filename));
    if (info->cluster_size)
        json_object_set_new(o, "cluster-size",
                            cli_json_u64(info->cluster_size));
    json_object_set_new(o, "format", cli_json_string(info->format));
    json_object_set_new(o, "actual-size", cli_json_u64(info->actual_size));
    if (info->is_qcow2) {
        json_t *fs = json_object();
        json_object_set_new(fs, "type", json_string("qcow2"));
        json_object_set_new(fs, "data", qcow2_specific_json(l));
        json_object_set_new(o, "format-specific", fs);
    }
    if (info->backing_filename) {
        if (info->full_backing_filename)
            json_object_set_new(o, "full-backing-filename",
                                cli_json_string(info->full_backing_filename));
        json_object_set_new(o, "backing-filename",
                            cli_json_string(info->backing_filename));
    }
    json_object_set_new(o, "dirty-flag", json_boolean(info->dirty_flag));
    return o;
}

static void print_snapshot_row(const struct cbt_snapshot_info *sn)
{
    char size[32], date[32] = "", clock[48], icount[32] = "";
    cli_size_to_str(sn->vm_state_size, size, sizeof(size));
    time_t t = (time_t)sn->date_sec;
    struct tm tm;
    if (localtime_r(&t, &tm))
        strftime(date, sizeof(date), "%Y-%m-%d %H:%M:%S", &tm);
    uint64_t secs = sn->vm_clock_nsec / NSEC_PER_SEC;
    snprintf(clock, sizeof(clock), "%02" PRIu64 ":%02u:%02u.%03u", secs / 3600,
             (unsigned)(secs / 60 % 60), (unsigned)(secs % 60),
             (unsigned)(sn->vm_clock_nsec / 1000000 % 1000));
    if (sn->icount != UINT64_MAX)
        snprintf(icount, sizeof(icount), "%" PRIu64, sn->icount);
    printf("%-9s %-16s %8s%20s%13s%11s\n", sn->id, sn->name, size, date, clock,
           icount);
}

static void dump_value(int indent, json_t *v);

/* qemu's dump_qdict: "key: value", '-' in keys turned into ' ', four
 * spaces per level; a list or object value starts on the next line. */
static void dump_object(int indent, json_t *o)
{
    const char *key;
    json_t *v;
    json_object_foreach(o, key, v)
    {
        printf("%*s", indent * 4, "");
        for (const char *p = key; *p; p++)
            putchar(*p == '-' ? ' ' : *p);
        putchar(':');
        putchar(json_is_object(v) || json_is_array(v) ? '\n' : ' ');
        dump_value(indent + 1, v);
    }
}

/* qemu's dump_qlist: the elements as "[0]: value". */
static void dump_array(int indent, json_t *a)
{
    size_t i;
    json_t *v;
    json_array_foreach(a, i, v)
    {
        printf("%*s[%zu]:%c", indent * 4, "", i,
               json_is_object(v) || json_is_array(v) ? '\n' : ' ');
        dump_value(indent + 1, v);
    }
}

static void dump_value(int indent, json_t *v)
{
    if (json_is_object(v))
        dump_object(indent, v);
    else if (json_is_array(v))
        dump_array(indent, v);
    else if (json_is_string(v))
        printf("%s\n", json_string_value(v));
    else if (json_is_integer(v))
        printf("%" JSON_INTEGER_FORMAT "\n", json_integer_value(v));
    else
        printf("%s\n", json_is_true(v) ? "true" : "false");
}

/* The "Format specific information" block: qemu dumps the JSON data. */
static void print_specific(json_t *data)
{
    printf("Format specific information:\n");
    dump_object(1, data);
}

static void print_backing(const struct cbt_image_info *info)
{
    printf("backing file: %s", info->backing_filename);
    if (!info->full_backing_filename)
        printf(" (cannot determine actual path)");
    else if (strcmp(info->backing_filename, info->full_backing_filename))
        printf(" (actual path: %s)", info->full_backing_filename);
    putchar('\n');
    if (info->backing_format)
        printf("backing file format: %s\n", info->backing_format);
}

static void print_human(const struct layer_info *l)
{
    const struct cbt_image_info *info = &l->info;
    char vsize[32], dsize[32];
    cli_size_to_str(info->virtual_size, vsize, sizeof(vsize));
    cli_size_to_str(info->actual_size, dsize, sizeof(dsize));
    printf("image: %s\nfile format: %s\n", info->filename, info->format);
    printf("virtual size: %s (%" PRIu64 " bytes)\n", vsize, info->virtual_size);
    printf("disk size: %s\n", dsize);
    if (info->cluster_size)
        printf("cluster_size: %" PRIu32 "\n", info->cluster_size);
    if (info->dirty_flag)
        printf("cleanly shut down: no\n");
    if (info->backing_filename)
        print_backing(info);
    if (info->nb_snapshots) {
        printf("Snapshot list:\n");
        printf("%-10s%-17s%8s%20s%13s%11s\n", "ID", "TAG", "VM SIZE", "DATE",
               "VM CLOCK", "ICOUNT");
        for (size_t i = 0; i < info->nb_snapshots; i++)
            print_snapshot_row(&info->snapshots[i]);
    }
    if (info->is_qcow2) {
        json_t *data = qcow2_specific_json(l);
        print_specific(data);
        json_decref(data);
    }
}

struct info_args {
    const char *prog;
    const char *format;
    const char *filename;
    enum cli_output output;
    bool chain;
    bool force_share;
};

/* Returns 1 for --help, 0 to go on, -1 after a usage error. */
static int parse_args(int argc, char **argv, struct info_args *a)
{
    enum { OPT_OUTPUT = 256, OPT_CHAIN };
    static const struct option longopts[] = {
        {"help", no_argument, NULL, 'h'},
        {"format", required_argument, NULL, 'f'},
        {"output", required_argument, NULL, OPT_OUTPUT},
        {"backing-chain", no_argument, NULL, OPT_CHAIN},
        {"force-share", no_argument, NULL, 'U'},
        {NULL, 0, NULL, 0},
    };
    int c;
    optind = 0;
    while ((c = getopt_long(argc, argv, "hf:U", longopts, NULL)) != -1) {
        switch (c) {
        case 'h':
            return 1;
        case 'f':
            a->format = optarg;
            break;
        case 'U':
            a->force_share = true;
            break;
        case OPT_OUTPUT:
            if (cli_parse_output(a->prog, optarg, &a->output) < 0)
                return -1;
            break;
        case OPT_CHAIN:
            a->chain = true;
            break;
        default:
            cli_bad_option(a->prog);
            return -1;
        }
    }
    return cli_take_filename(a->prog, argc, argv, &a->filename);
}

/*
 * Print `v` as qemu does, then release it: jansson's 4-space layout, except
 * that qemu writes an empty list or object across two lines ("[" newline,
 * indentation, "]"), which jansson prints as "[]".
 */
static void print_json_qemu(json_t *v)
{
    char *s = json_dumps(v, JSON_INDENT(4) | JSON_PRESERVE_ORDER);
    json_decref(v);
    if (!s) {
        cli_error("out of memory");
        return;
    }
    bool in_string = false, escaped = false;
    int indent = 0;      /* leading spaces of the current line */
    bool leading = true; /* still in those spaces */
    for (const char *p = s; *p; p++) {
        char c = *p;
        putchar(c);
        if (in_string) {
            if (escaped)
                escaped = false;
            else if (c == '\\')
                escaped = true;
            else if (c == '"')
                in_string = false;
        } else if (c == '"') {
            in_string = true;
        } else if ((c == '[' && p[1] == ']') || (c == '{' && p[1] == '}')) {
            printf("\n%*s", indent, "");
        }
        if (c == '\n') {
            indent = 0;
            leading = true;
        } else if (leading && c == ' ') {
            indent++;
        } else {
            leading = false;
        }
    }
    putchar('\n');
    free(s);
}

/* Fill l for one layer; the bitmaps only of qcow2 images.  0, or the exit
 * status after printing the error. */
static int get_layer(struct cbt_image *img, struct layer_info *l)
{
    struct cbt_error *err = NULL;
    *l = (struct layer_info){0};
    if (cbt_image_get_info(img, &l->info, &err) < 0)
        return cli_lib_error(err);
    if (!l->info.is_qcow2)
        return 0;
    if (cbt_bitmap_list(img, &l->bitmaps, &l->nb_bitmaps, &err) < 0) {
        /* A library without bitmap support lists none. */
        if (cbt_error_errno(err) == ENOTSUP) {
            cbt_error_free(err);
            return 0;
        }
        cbt_image_info_free(&l->info);
        return cli_lib_error(err);
    }
    return 0;
}

static void free_layer(struct layer_info *l)
{
    cbt_bitmap_info_free_list(l->bitmaps, l->nb_bitmaps);
    cbt_image_info_free(&l->info);
}

/* Print every layer (or only the top); JSON as one object or a list. */
static int show(struct cbt_image *top, const struct info_args *a)
{
    json_t *list = json_array();
    int ret = 0;
    for (struct cbt_image *img = top; img; img = cbt_image_backing(img)) {
        struct layer_info l;
        if ((ret = get_layer(img, &l)) != 0)
            break;
        if (a->output == CLI_OUTPUT_JSON) {
            json_array_append_new(list, info_json(&l));
        } else {
            if (img != top)
                putchar('\n');
            print_human(&l);
        }
        free_layer(&l);
        if (!a->chain)
            break;
    }
    if (ret == 0 && a->output == CLI_OUTPUT_JSON) {
        if (a->chain)
            print_json_qemu(json_incref(list));
        else
            print_json_qemu(json_incref(json_array_get(list, 0)));
    }
    json_decref(list);
    return ret;
}

int cmd_info(int argc, char **argv)
{
    struct info_args a = {.prog = argv[0], .output = CLI_OUTPUT_HUMAN};
    int r = parse_args(argc, argv, &a);
    if (r != 0)
        return r > 0 ? cli_help(usage) : CLI_EXIT_USAGE;

    struct cbt_error *err = NULL;
    unsigned flags = a.chain ? 0 : CBT_OPEN_NO_BACKING;
    if (a.force_share)
        flags |= CBT_OPEN_FORCE_SHARE;
    struct cbt_image *img = cli_open(a.filename, a.format, flags, &err);
    if (!img)
        return cli_lib_error(err);
    int ret = show(img, &a);
    cbt_image_close(img, NULL);
    return ret;
}
