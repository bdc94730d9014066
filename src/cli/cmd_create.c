/* cbt create: make a new qcow2 or raw image, with qemu-img create's options. */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"

static const char usage[] =
    "Usage: cbt create [-f FMT] [-b BACKING -F BACKING_FMT] [-u] [-o OPTIONS]\n"
    "                  [-q] FILE [SIZE]\n"
    "\n"
    "Create the image FILE with a virtual size of SIZE bytes (suffixes k, M,\n"
    "G, T, P, E: powers of 1024).  Without SIZE the size of the backing file\n"
    "is used.\n"
    "\n"
    "Options:\n"
    "  -f FMT          image format: qcow2 or raw (default: raw, as qemu-img)\n"
    "  -b BACKING      backing file name, stored as given; a relative name is\n"
    "                  relative to the folder of FILE\n"
    "  -F BACKING_FMT  format of the backing file (required with -b)\n"
    "  -u              unsafe: do not open the backing file (SIZE needed)\n"
    "  -o OPTIONS      format options key=value,key=value (',,' for a comma);\n"
    "                  '-o help' lists them\n"
    "  -q              quiet: do not print the 'Formatting ...' line\n"
    "  -h, --help      show this help\n"
    "\n"
    "qcow2 options: cluster_size, extended_l2 (on/off), compression_type\n"
    "  (zlib/zstd), refcount_bits, data_file, data_file_raw (on/off),\n"
    "  lazy_refcounts (on/off), preallocation (off/metadata/falloc/full),\n"
    "  compat (0.10/v2/1.1/v3), backing_file, backing_fmt, size\n"
    "raw options: preallocation (off/falloc/full), size\n"
    "\n"
    "Examples:\n"
    "  cbt create -f qcow2 disk.qcow2 20G\n"
    "  cbt create -f qcow2 -b base.qcow2 -F qcow2 overlay.qcow2\n"
    "  cbt create -f qcow2 -o cluster_size=2M,extended_l2=on big.qcow2 1T\n";

struct create_req {
    const char *prog;
    const char *format;
    const struct cli_opt_desc *descs;
    const char *filename;
    const char *size_arg;
    struct cli_kvlist kv;
    struct cbt_create_opts opts;
    bool quiet;
    bool unsafe;
};

static bool wants_opts_help(const struct create_req *req)
{
    return cli_create_opts_want_help(&req->kv);
}

/* Returns 1 for -h, 0 to go on, -1 after a usage error, -2 out of memory. */
static int parse_args(int argc, char **argv, struct create_req *req)
{
    static const struct option longopts[] = {
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    const char *backing = NULL, *backing_fmt = NULL;
    int c;
    optind = 0;
    while ((c = getopt_long(argc, argv, "hf:b:F:o:qu", longopts, NULL)) != -1) {
        switch (c) {
        case 'h':
            return 1;
        case 'f':
            req->format = optarg;
            break;
        case 'b':
            backing = optarg;
            break;
        case 'F':
            backing_fmt = optarg;
            break;
        case 'o':
            if (cli_kv_parse(&req->kv, optarg) < 0) {
                cli_error("out of memory");
                return -2;
            }
            break;
        case 'q':
            req->quiet = true;
            break;
        case 'u':
            req->unsafe = true;
            break;
        default:
            cli_bad_option(req->prog);
            return -1;
        }
    }
    /* -b and -F win over backing_file= and backing_fmt= in -o. */
    if ((backing && cli_kv_set(&req->kv, "backing_file", backing) < 0) ||
        (backing_fmt && cli_kv_set(&req->kv, "backing_fmt", backing_fmt) < 0)) {
        cli_error("out of memory");
        return -2;
    }
    if (optind >= argc && wants_opts_help(req))
        return 0; /* -o help needs no file */
    if (optind >= argc) {
        cli_usage_error(req->prog, "missing image file name");
        return -1;
    }
    req->filename = argv[optind++];
    if (optind < argc)
        req->size_arg = argv[optind++];
    if (optind < argc) {
        cli_usage_error(req->prog, "unexpected argument '%s'", argv[optind]);
        return -1;
    }
    return 0;
}

/* Check every -o key against the format and fill req->opts, then the SIZE
 * argument.  Returns 0, or non-zero after printing what is wrong. */
static int apply_kv(struct create_req *req)
{
    bool size_in_opts;
    int r = cli_create_opts_apply(req->prog, req->format, &req->kv,
                                  &req->opts, &size_in_opts);
    if (r != 0)
        return r;
    if (!req->size_arg)
        return 0;
    if (size_in_opts) {
        cli_error("%s: The image size must be specified only once",
                  req->filename);
        return CLI_EXIT_USAGE;
    }
    if (cli_parse_size_arg(req->prog, "image size", req->size_arg,
                           &req->opts.size) < 0)
        return CLI_EXIT_USAGE;
    req->opts.size_given = true;
    return 0;
}

/* The backing file's path as seen from here: relative names are relative
 * to the folder of the new image (as qemu resolves them).  Caller frees. */
static char *backing_path(const char *filename, const char *backing)
{
    const char *slash = strrchr(filename, '/');
    if (backing[0] == '/' || !slash)
        return strdup(backing);
    size_t dirlen = (size_t)(slash - filename) + 1;
    char *out = malloc(dirlen + strlen(backing) + 1);
    if (out) {
        memcpy(out, filename, dirlen);
        strcpy(out + dirlen, backing);
    }
    return out;
}

/* Open the backing file (unless -u) to check it and take its size.
 * Returns 0, or the exit status after printing the error. */
static int check_backing(struct create_req *req)
{
    struct cbt_create_opts *o = &req->opts;
    if (!o->backing_file)
        return 0;
    if (strcmp(o->backing_file, req->filename) == 0) {
        cli_error("%s: Trying to create an image with the same filename as "
                  "the backing file",
                  req->filename);
        return CLI_EXIT_USAGE;
    }
    if (!o->backing_file[0]) {
        cli_error("%s: Expected backing file name, got empty string",
                  req->filename);
        return CLI_EXIT_USAGE;
    }
    if (req->unsafe) {
        if (o->backing_format)
            return 0;
        cli_error("%s: Backing file specified without backing format "
                  "(add -F FMT)",
                  req->filename);
        return CLI_EXIT_USAGE;
    }
    char *path = backing_path(req->filename, o->backing_file);
    if (!path) {
        cli_error("out of memory");
        return CLI_EXIT_FAILURE;
    }
    struct cbt_error *err = NULL;
    struct cbt_image *img = cli_open(path, o->backing_format, 0, &err);
    free(path);
    if (!img) {
        cli_error("%s: Could not open backing image: %s%s", req->filename,
                  cbt_error_message(err), cli_advice(err));
        int status = cli_exit_status(err);
        cbt_error_free(err);
        return status;
    }
    int ret = 0;
    if (!o->backing_format) {
        cli_error("%s: Backing file specified without backing format "
                  "(detected format: %s; add -F %s)",
                  req->filename, cbt_image_format(img), cbt_image_format(img));
        ret = CLI_EXIT_USAGE;
    } else if (!o->size_given) {
        o->size = cbt_image_size(img);
        o->size_given = true;
    }
    cbt_image_close(img, NULL);
    return ret;
}

/* qemu prints string options with commas doubled, as -o would take them. */
static void print_escaped(const char *s)
{
    for (; *s; s++) {
        if (*s == ',')
            putchar(',');
        putchar(*s);
    }
}

/* "Formatting 'FILE', fmt=FMT key=value ..." exactly as qemu-img prints it. */
static void print_formatting(const struct create_req *req)
{
    printf("Formatting '%s', fmt=%s ", req->filename, req->format);
    const char *sep = "";
    for (const struct cli_opt_desc *d = req->descs; d->name; d++) {
        bool given = cli_kv_has(&req->kv, d->name);
        const char *v = cli_kv_get(&req->kv, d->name);
        if (given && !v)
            v = "on"; /* a bare boolean key */
        if (strcmp(d->name, "size") == 0) {
            printf("%ssize=%" PRIu64, sep, req->opts.size);
        } else if (strcmp(d->name, "cluster_size") == 0 && given) {
            printf("%s%s=%" PRIu32, sep, d->name, req->opts.cluster_size);
        } else if (strcmp(d->name, "refcount_bits") == 0 && given) {
            printf("%s%s=%d", sep, d->name, req->opts.refcount_bits);
        } else if (given || d->def) {
            printf("%s%s=", sep, d->name);
            print_escaped(given ? v : d->def);
        } else {
            continue;
        }
        sep = " ";
    }
    putchar('\n');
    fflush(stdout);
}

static int select_format(struct create_req *req)
{
    req->descs = cli_create_opt_table(req->format);
    if (!req->descs) {
        cli_usage_error(req->prog, "unknown image format '%s' (qcow2 or raw)",
                        req->format);
        return -1;
    }
    req->opts.format = req->format;
    return 0;
}

static int create(struct create_req *req)
{
    if (wants_opts_help(req))
        return cli_create_opts_help(req->format);
    int r = apply_kv(req);
    if (r == 0)
        r = check_backing(req);
    if (r != 0)
        return r;
    if (!req->opts.size_given)
        return cli_usage_error(req->prog,
                               "missing size for '%s' (give SIZE, or a "
                               "backing file to take it from)",
                               req->filename);
    if (req->opts.size > INT64_MAX) {
        cli_error("%s: image size too large", req->filename);
        return CLI_EXIT_USAGE;
    }
    if (!req->quiet)
        print_formatting(req);
    struct cbt_error *err = NULL;
    if (cbt_image_create(req->filename, &req->opts, &err) < 0)
        return cli_lib_error(err);
    return 0;
}

int cmd_create(int argc, char **argv)
{
    struct create_req req = {
        .prog = argv[0],
        .format = "raw",
        .opts = CBT_CREATE_OPTS_INIT,
    };
    req.opts.warn = cli_warn;
    int r = parse_args(argc, argv, &req);
    int ret;
    if (r > 0)
        ret = cli_help(usage);
    else if (r < 0)
        ret = r == -2 ? CLI_EXIT_FAILURE : CLI_EXIT_USAGE;
    else if (select_format(&req) < 0)
        ret = CLI_EXIT_USAGE;
    else
        ret = create(&req);
    cli_kv_free(&req.kv);
    return ret;
}
