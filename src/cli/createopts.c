/* The -o keys of qemu-img create for qcow2 and raw, shared by cbt create and
 * cbt convert: their tables, '-o help', and parsing into cbt_create_opts. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"

/* The order of each table is the order of qemu-img's "Formatting" line;
 * `def` is what that line shows when the key is unset. */
static const struct cli_opt_desc qcow2_opts[] = {
    {"cluster_size", CLI_OPT_SIZE, "65536", "qcow2 cluster size"},
    {"extended_l2", CLI_OPT_BOOL, "off", "Extended L2 tables"},
    {"preallocation", CLI_OPT_STR, NULL,
     "Preallocation mode (allowed values: off, metadata, falloc, full)"},
    {"compression_type", CLI_OPT_STR, "zlib",
     "Compression method used for image cluster compression"},
    {"size", CLI_OPT_SIZE, NULL, "Virtual disk size"},
    {"compat", CLI_OPT_STR, NULL,
     "Compatibility level (v2 [0.10] or v3 [1.1])"},
    {"backing_file", CLI_OPT_STR, NULL, "File name of a base image"},
    {"backing_fmt", CLI_OPT_STR, NULL, "Image format of the base image"},
    {"data_file", CLI_OPT_STR, NULL, "File name of an external data file"},
    {"data_file_raw", CLI_OPT_BOOL, NULL,
     "The external data file must stay valid as a raw image"},
    {"lazy_refcounts", CLI_OPT_BOOL, "off", "Postpone refcount updates"},
    {"refcount_bits", CLI_OPT_NUM, "16",
     "Width of a reference count entry in bits"},
    {NULL, CLI_OPT_STR, NULL, NULL},
};

static const struct cli_opt_desc raw_opts[] = {
    {"size", CLI_OPT_SIZE, NULL, "Virtual disk size"},
    {"preallocation", CLI_OPT_STR, NULL,
     "Preallocation mode (allowed values: off, falloc, full)"},
    {NULL, CLI_OPT_STR, NULL, NULL},
};

const struct cli_opt_desc *cli_create_opt_table(const char *format)
{
    if (strcmp(format, "qcow2") == 0)
        return qcow2_opts;
    if (strcmp(format, "raw") == 0)
        return raw_opts;
    return NULL;
}

const struct cli_opt_desc *cli_create_opt_find(const struct cli_opt_desc *d,
                                               const char *name)
{
    for (; d->name; d++)
        if (strcmp(d->name, name) == 0)
            return d;
    return NULL;
}

bool cli_create_opts_want_help(const struct cli_kvlist *kv)
{
    return cli_kv_has(kv, "help") || cli_kv_has(kv, "?");
}

int cli_create_opts_help(const char *format)
{
    static const char *const type_names[] = {"str", "bool (on/off)", "size",
                                             "num"};
    const struct cli_opt_desc *descs = cli_create_opt_table(format);
    printf("Supported %s options:\n", format);
    /* Alphabetical, as qemu-img lists them. */
    const char *last = "";
    for (;;) {
        const struct cli_opt_desc *next = NULL;
        for (const struct cli_opt_desc *d = descs; d->name; d++)
            if (strcmp(d->name, last) > 0 &&
                (!next || strcmp(d->name, next->name) < 0))
                next = d;
        if (!next)
            break;
        char left[64];
        snprintf(left, sizeof(left), "%s=<%s>", next->name,
                 type_names[next->type]);
        printf("  %-22s - %s\n", left, next->help);
        last = next->name;
    }
    return 0;
}

static int parse_compat(const char *v, int *out)
{
    if (strcmp(v, "0.10") == 0 || strcmp(v, "v2") == 0)
        *out = 2;
    else if (strcmp(v, "1.1") == 0 || strcmp(v, "v3") == 0)
        *out = 3;
    else
        return -EINVAL;
    return 0;
}

static bool valid_prealloc(const char *v)
{
    return strcmp(v, "off") == 0 || strcmp(v, "metadata") == 0 ||
           strcmp(v, "falloc") == 0 || strcmp(v, "full") == 0;
}

/* Store one -o item into o; the value has been checked for presence.
 * Returns 0, or non-zero after printing what is wrong. */
static int apply_value(const char *prog, const struct cli_opt_desc *d,
                       const char *v, struct cbt_create_opts *o)
{
    const char *n = d->name;
    uint64_t num = 0;
    bool b = false;

    if (d->type == CLI_OPT_BOOL && cli_parse_bool(v, &b) < 0)
        return cli_usage_error(prog,
                               "parameter '%s' expects 'on' or "
                               "'off', not '%s'",
                               n, v);
    if (d->type == CLI_OPT_SIZE && cli_parse_size_arg(prog, n, v, &num) < 0)
        return CLI_EXIT_USAGE;

    if (strcmp(n, "size") == 0) {
        o->size = num;
        o->size_given = true;
    } else if (strcmp(n, "cluster_size") == 0) {
        if (num > UINT32_MAX)
            return cli_usage_error(prog,
                                   "cluster_size '%s' is too "
                                   "large (at most 2M)",
                                   v);
        o->cluster_size = (uint32_t)num;
    } else if (strcmp(n, "refcount_bits") == 0) {
        char *end;
        errno = 0;
        unsigned long rb = strtoul(v, &end, 10);
        if (errno || end == v || *end || rb > 64)
            return cli_usage_error(prog,
                                   "refcount_bits must be a power "
                                   "of two up to 64, not '%s'",
                                   v);
        o->refcount_bits = (int)rb;
    } else if (strcmp(n, "compat") == 0) {
        if (parse_compat(v, &o->compat) < 0)
            return cli_usage_error(prog,
                                   "invalid compat '%s' (0.10, "
                                   "v2, 1.1 or v3)",
                                   v);
    } else if (strcmp(n, "preallocation") == 0) {
        if (!valid_prealloc(v))
            return cli_usage_error(prog,
                                   "invalid preallocation '%s' "
                                   "(off, metadata, falloc or full)",
                                   v);
        o->preallocation = v;
    } else if (strcmp(n, "extended_l2") == 0) {
        o->extended_l2 = b;
    } else if (strcmp(n, "lazy_refcounts") == 0) {
        o->lazy_refcounts = b;
    } else if (strcmp(n, "data_file_raw") == 0) {
        o->data_file_raw = b;
    } else if (strcmp(n, "compression_type") == 0) {
        o->compression_type = v;
    } else if (strcmp(n, "data_file") == 0) {
        o->data_file = v;
    } else if (strcmp(n, "backing_file") == 0) {
        o->backing_file = v;
    } else if (strcmp(n, "backing_fmt") == 0) {
        o->backing_format = v;
    }
    return 0;
}

int cli_create_opts_apply(const char *prog, const char *format,
                          const struct cli_kvlist *kv,
                          struct cbt_create_opts *o, bool *size_in_opts)
{
    const struct cli_opt_desc *descs = cli_create_opt_table(format);
    *size_in_opts = false;
    for (size_t i = 0; i < kv->n; i++) {
        const struct cli_kv *item = &kv->items[i];
        const struct cli_opt_desc *d = cli_create_opt_find(descs, item->key);
        if (!d)
            return cli_usage_error(prog,
                                   "invalid parameter '%s' for "
                                   "format %s ('-o help' lists them)",
                                   item->key, format);
        const char *v = item->value;
        if (!v && d->type != CLI_OPT_BOOL)
            return cli_usage_error(prog,
                                   "parameter '%s' needs a value "
                                   "('%s=...')",
                                   item->key, item->key);
        int r = apply_value(prog, d, v ? v : "on", o);
        if (r != 0)
            return r;
        *size_in_opts |= strcmp(d->name, "size") == 0;
    }
    return 0;
}
