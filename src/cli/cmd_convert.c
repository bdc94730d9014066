/* cbt convert: copy an image or a whole backing chain to a new qcow2 or raw
 * image, with qemu-img convert's options (cbt_convert()). */
#include <getopt.h>
#include <string.h>

#include <cbt/ops.h>

#include "cli.h"

static const char usage[] =
    "Usage: cbt convert [-f FMT] [-O qcow2|raw] [-o OPTIONS] [-c] [-t CACHE]\n"
    "                   [-B BACKING -F BACKING_FMT] [-n] [--bitmaps\n"
    "                   [--skip-broken-bitmaps]] [-p] [-q] SRC DST\n"
    "\n"
    "Copy the guest view of SRC (with its whole backing chain) to DST.\n"
    "DST is created with SRC's virtual size (an existing file is\n"
    "overwritten, as qemu-img does).  The copy is sparse: ranges that read\n"
    "as zeroes in SRC, including 4 KiB blocks of zeroes inside data, are\n"
    "left unallocated in DST (holes in a raw DST).  If the command fails,\n"
    "a DST it created is removed.\n"
    "\n"
    "Options:\n"
    "  -f FMT          format of SRC: qcow2 or raw (default: probe)\n"
    "  -O FMT          format of DST: qcow2 or raw (default: raw, as\n"
    "                  qemu-img; with -n: probe DST)\n"
    "  -o OPTIONS      creation options of DST, as 'cbt create -o' (',,' for\n"
    "                  a comma); '-o help' lists them\n"
    "  -c              compress every data cluster of DST (qcow2)\n"
    "  -t CACHE        how DST is written, as qemu-img's: none (or\n"
    "                  directsync): its data around the host's page cache\n"
    "                  (O_DIRECT) where the file system allows; writeback\n"
    "                  (default, or unsafe, writethrough): through it.  DST\n"
    "                  is flushed at the end either way\n"
    "  -B BACKING      create DST with the backing file BACKING and copy only\n"
    "                  what SRC's top layer allocates: BACKING must hold the\n"
    "                  same data as SRC's backing chain.  A relative name is\n"
    "                  relative to the folder of DST\n"
    "  -F BACKING_FMT  format of BACKING (required with -B)\n"
    "  -n              do not create DST: it must exist and be at least as\n"
    "                  large as SRC; ranges reading as zeroes in SRC are\n"
    "                  written as zeroes, the rest of DST is not touched\n"
    "  --bitmaps       copy the persistent bitmaps: DST gets, for each bitmap\n"
    "                  name, the union of that name over the layers of SRC's\n"
    "                  chain (with -B: SRC's top layer only), with the\n"
    "                  granularity and recording state of the topmost copy\n"
    "  --skip-broken-bitmaps\n"
    "                  with --bitmaps: leave out an inconsistent bitmap with\n"
    "                  a warning instead of failing\n"
    "  -p              show progress on stderr (when it is a terminal)\n"
    "  -q              quiet: no progress\n"
    "  -h, --help      show this help\n"
    "\n"
    "SIGINT (Ctrl-C), SIGTERM, SIGHUP: the copy stops, a DST it created is\n"
    "removed, then cbt dies of the signal (a second one kills at once).\n"
    "\n"
    "Exit status: 0 done; 74 an I/O or space error; 75 an image is in use;\n"
    "64 a usage mistake; 1 any other failure (docs/cli.md, Exit status).\n"
    "\n"
    "Examples:\n"
    "  cbt convert -O qcow2 disk.qcow2 flat.qcow2\n"
    "  cbt convert -O qcow2 -c -o compression_type=zstd disk.qcow2 c.qcow2\n"
    "  cbt convert -O qcow2 -B base.qcow2 -F qcow2 top.qcow2 new-top.qcow2\n"
    "  cbt convert -O qcow2 --bitmaps disk.qcow2 copy.qcow2\n"
    "  cbt convert -O raw disk.qcow2 disk.raw\n";

struct convert_req {
    const char *prog;
    const char *out_fmt;   /* -O, or NULL */
    const char *backing;   /* -B */
    const char *backing_fmt; /* -F */
    bool progress;
    bool quiet;
    struct cli_kvlist kv;
    struct cbt_convert_opts opts;
    struct cbt_create_opts create; /* opts.create */
};

/* Returns 1 for -h, 2 after -o help, 0 to go on, -1 after a usage error,
 * -2 out of memory. */
static int parse_args(int argc, char **argv, struct convert_req *req)
{
    enum { OPT_BITMAPS = 256, OPT_SKIP_BROKEN };
    static const struct option longopts[] = {
        {"help", no_argument, NULL, 'h'},
        {"bitmaps", no_argument, NULL, OPT_BITMAPS},
        {"skip-broken-bitmaps", no_argument, NULL, OPT_SKIP_BROKEN},
        {NULL, 0, NULL, 0},
    };
    struct cbt_convert_opts *o = &req->opts;
    int c;
    optind = 0;
    while ((c = getopt_long(argc, argv, "hf:O:o:cB:F:npqt:", longopts, NULL)) !=
           -1) {
        switch (c) {
        case 'h':
            return 1;
        case 'f':
            o->src_format = optarg;
            break;
        case 'O':
            req->out_fmt = optarg;
            break;
        case 'o':
            if (cli_kv_parse(&req->kv, optarg) < 0) {
                cli_error("out of memory");
                return -2;
            }
            break;
        case 'c':
            o->compress = true;
            break;
        case 't':
            if (strcmp(optarg, "none") == 0 ||
                strcmp(optarg, "directsync") == 0) {
                o->direct = true;
            } else if (strcmp(optarg, "writeback") != 0 &&
                       strcmp(optarg, "unsafe") != 0 &&
                       strcmp(optarg, "writethrough") != 0) {
                cli_usage_error(req->prog, "unknown cache mode '%s' (none, "
                                "directsync, writeback, unsafe or "
                                "writethrough)", optarg);
                return -1;
            }
            break;
        case 'B':
            req->backing = optarg;
            break;
        case 'F':
            req->backing_fmt = optarg;
            break;
        case 'n':
            o->no_create = true;
            break;
        case 'p':
            req->progress = true;
            break;
        case 'q':
            req->quiet = true;
            break;
        case OPT_BITMAPS:
            o->bitmaps = true;
            break;
        case OPT_SKIP_BROKEN:
            o->skip_broken_bitmaps = true;
            break;
        default:
            cli_bad_option(req->prog);
            return -1;
        }
    }
    const char *fmt = req->out_fmt ? req->out_fmt : "raw";
    if (cli_create_opts_want_help(&req->kv)) {
        if (!cli_create_opt_table(fmt)) {
            cli_usage_error(req->prog, "unknown image format '%s' (qcow2 or "
                            "raw)", fmt);
            return -1;
        }
        cli_create_opts_help(fmt);
        return 2;
    }
    if (argc - optind < 2) {
        cli_usage_error(req->prog, "Expecting SRC and DST file names");
        return -1;
    }
    if (argc - optind > 2) {
        cli_usage_error(req->prog, "unexpected argument '%s' (one source "
                        "image only)", argv[optind + 2]);
        return -1;
    }
    o->src = argv[optind];
    o->dst = argv[optind + 1];
    return 0;
}

/* Fill req->opts.create from -O, -o, -B and -F.  Returns 0, or non-zero
 * after printing what is wrong. */
static int creation_opts(struct convert_req *req)
{
    struct cbt_convert_opts *o = &req->opts;
    if (o->skip_broken_bitmaps && !o->bitmaps)
        return cli_usage_error(req->prog,
                               "--skip-broken-bitmaps requires --bitmaps");
    if (o->no_create) {
        if (req->kv.n)
            return cli_usage_error(req->prog, "-o has no effect when "
                                   "skipping image creation (-n)");
        /* -n: DST is opened, not created.  -O names its format (qemu-img
         * would default to raw; probing cannot destroy a qcow2 DST). */
        if (req->out_fmt && !cli_create_opt_table(req->out_fmt))
            return cli_usage_error(req->prog, "unknown image format '%s' "
                                   "(qcow2 or raw)", req->out_fmt);
        req->create.format = req->out_fmt;
        req->create.backing_file = req->backing;
        req->create.backing_format = req->backing_fmt;
        return 0;
    }
    const char *fmt = req->out_fmt ? req->out_fmt : "raw";
    if (!cli_create_opt_table(fmt))
        return cli_usage_error(req->prog, "unknown image format '%s' (qcow2 "
                               "or raw)", fmt);
    /* -B and -F win over backing_file= and backing_fmt= in -o. */
    if ((req->backing &&
         cli_kv_set(&req->kv, "backing_file", req->backing) < 0) ||
        (req->backing_fmt &&
         cli_kv_set(&req->kv, "backing_fmt", req->backing_fmt) < 0)) {
        cli_error("out of memory");
        return CLI_EXIT_FAILURE;
    }
    bool size_in_opts;
    int r = cli_create_opts_apply(req->prog, fmt, &req->kv, &req->create,
                                  &size_in_opts);
    if (r != 0)
        return r;
    /* As qemu-img: the size is always the source's (size= is overridden). */
    req->create.size = 0;
    req->create.size_given = false;
    req->create.format = fmt;
    if (req->create.backing_file && !req->create.backing_file[0]) {
        cli_error("%s: Expected backing file name, got empty string", o->dst);
        return CLI_EXIT_USAGE;
    }
    if (req->create.backing_file && !req->create.backing_format) {
        cli_error("%s: Use of backing file requires explicit backing format "
                  "(add -F FMT)", o->dst);
        return CLI_EXIT_USAGE;
    }
    return 0;
}

int cmd_convert(int argc, char **argv)
{
    struct convert_req req = {
        .prog = argv[0],
        .opts = CBT_CONVERT_OPTS_INIT,
        .create = CBT_CREATE_OPTS_INIT,
    };
    req.opts.create = &req.create;
    req.opts.warn = cli_warn;
    req.create.warn = cli_warn;
    int r = parse_args(argc, argv, &req);
    int ret;
    if (r == 1) {
        ret = cli_help(usage);
    } else if (r == 2) {
        ret = 0;
    } else if (r < 0) {
        ret = r == -2 ? CLI_EXIT_FAILURE : CLI_EXIT_USAGE;
    } else if ((ret = creation_opts(&req)) != 0) {
        /* reported */
    } else {
        struct cli_progress progress;
        cli_progress_init(&progress, req.progress && !req.quiet);
        req.opts.progress = cli_progress_cb;
        req.opts.progress_opaque = &progress;
        req.opts.cancel = cli_signals_catch();
        struct cbt_error *err = NULL;
        r = cbt_convert(&req.opts, &err);
        cli_progress_end(&progress);
        ret = r < 0 ? cli_lib_error(err) : 0;
    }
    cli_kv_free(&req.kv);
    return ret;
}
