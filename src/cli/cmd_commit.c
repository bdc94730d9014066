/* cbt commit: commit the data of upper layers of a chain into a lower one,
 * carrying the dirty bitmaps along (cbt_commit()), as qemu-img commit and
 * libvirt's offline block commit. */
#include <getopt.h>
#include <string.h>

#include <cbt/ops.h>

#include "../live/livechain.h"
#include "cli.h"

static const char usage[] =
    "Usage: cbt commit [-f FMT] [-b BASE] [-d] [-p] [-q] [--skip-broken-bitmaps]\n"
    "                  FILE\n"
    "       cbt commit --top TOP [--base BASE] [--active ACTIVE] [-p] [-q]\n"
    "                  [--skip-broken-bitmaps]\n"
    "       cbt commit --qmp SOCKET [--top TOP] [--base BASE] [-r RATE] [-p]\n"
    "                  [-q] DISK\n"
    "\n"
    "Write the data of FILE (or TOP) and of every layer below it down to just\n"
    "above BASE into BASE (default: the backing file of FILE or TOP), growing\n"
    "BASE to FILE's size if it is smaller.  The guest view of the chain does\n"
    "not change.\n"
    "\n"
    "Bitmaps: for each bitmap name held by a layer from FILE down to BASE,\n"
    "BASE's bitmap of that name becomes the union of those layers' bitmaps\n"
    "(created in BASE when missing, with the granularity and recording state\n"
    "of the topmost copy); the commit's own writes add no bits.  The bitmaps\n"
    "of the other layers are not changed.  Refused before anything is\n"
    "written: a layer lacking a name between two layers holding it, an\n"
    "inconsistent copy (unless --skip-broken-bitmaps: that name is then left\n"
    "alone, with a warning), a name in BASE with another granularity than the\n"
    "topmost copy, a BASE that cannot hold the bitmaps (raw).\n"
    "\n"
    "First form (qemu-img commit): FILE is the active layer.  Afterwards FILE\n"
    "is emptied (its data now lives in its backing file) unless -d or -b is\n"
    "given; -b implies -d, as in qemu-img, because the layers between FILE\n"
    "and BASE would show through an emptied FILE.\n"
    "\n"
    "Second form (intermediate commit, as libvirt's block commit): TOP is a\n"
    "layer of ACTIVE's chain (default ACTIVE: TOP itself).  The image directly\n"
    "above TOP is relinked onto BASE (by its file name when both are in the\n"
    "same directory, otherwise its absolute path; backing format BASE's),\n"
    "so TOP and the layers between leave the chain; no image is emptied.\n"
    "\n"
    "Third form (a running VM, --qmp SOCKET; docs/live.md): QEMU's\n"
    "block-commit of DISK's layers TOP (default: the active layer, an active\n"
    "commit that pivots BASE into its place) down to above BASE (default:\n"
    "the layer below TOP); TOP and BASE are node names or image files of the\n"
    "chain.  The bitmaps end as in the offline forms: BASE's copies are\n"
    "saved before the job (its writes into BASE would dirty them) and, once\n"
    "the copy is done and before the layers leave the chain, rebuilt as the\n"
    "unions in one transaction; after an active commit the checkpoints\n"
    "follow into BASE.  A job error or SIGINT (Ctrl-C) cancels the job and\n"
    "puts BASE's bitmaps back: the chain and its checkpoints stay as they\n"
    "were.\n"
    "\n"
    "Layers are matched by file identity, so any spelling of a path works.\n"
    "A failure leaves every image usable and the guest view unchanged.\n"
    "\n"
    "Options:\n"
    "  -f FMT                 format of FILE (default: probe; must match)\n"
    "  -b, --base BASE        commit into BASE, a layer below FILE or TOP\n"
    "  -d                     do not empty FILE afterwards\n"
    "  --top TOP              the topmost layer to commit (second form)\n"
    "  --active ACTIVE        the active layer of the chain holding TOP\n"
    "  --qmp SOCKET           act on the running QEMU behind SOCKET\n"
    "  -r RATE                with --qmp: QEMU's job copies at most RATE bytes\n"
    "                         a second (k, M, G suffixes), as qemu-img commit -r\n"
    "  --skip-broken-bitmaps  leave alone bitmap names with an inconsistent\n"
    "                         copy or a gap, instead of refusing\n"
    "  -p                     show progress (on a terminal)\n"
    "  -q                     quiet: do not print 'Image committed.'\n"
    "  -h, --help             show this help\n"
    "\n"
    "SIGINT (Ctrl-C), SIGTERM, SIGHUP: the copy stops (the chain reads as\n"
    "before, BASE's bitmaps unchanged), then cbt dies of the signal.\n"
    "\n"
    "Exit status: 0 done; 74 an I/O or space error; 75 an image is in use;\n"
    "64 a usage mistake; 1 any other failure (docs/cli.md, Exit status).\n"
    "\n"
    "Examples:\n"
    "  cbt commit disk.2.qcow2\n"
    "  cbt commit -b disk.0.qcow2 -p disk.2.qcow2\n"
    "  cbt commit --top disk.1.qcow2 --base disk.0.qcow2 --active disk.3.qcow2\n"
    "  cbt commit --qmp /run/vm1.qmp -p vda\n";

/* -f FMT: the library probes, so check that FMT is what it will find. */
static int check_format(const char *file, const char *fmt)
{
    struct cbt_error *err = NULL;
    struct cbt_image *img = cli_open(file, fmt, CBT_OPEN_NO_BACKING, &err);
    if (!img)
        return cli_lib_error(err);
    cbt_image_close(img, NULL);
    img = cli_open(file, NULL, CBT_OPEN_NO_BACKING, &err);
    if (!img)
        return cli_lib_error(err);
    int ret = 0;
    if (strcmp(cbt_image_format(img), fmt) != 0) {
        cli_error("%s: the image is in format '%s', not '%s'", file,
                  cbt_image_format(img), fmt);
        ret = CLI_EXIT_FAILURE;
    }
    cbt_image_close(img, NULL);
    return ret;
}

/* cbt commit --qmp SOCKET [--top T] [--base B] DISK */
static int live_form(const char *prog, int argc, char **argv,
                     const struct cli_live_args *la,
                     const struct cbt_commit_opts *o, const char *fmt,
                     bool quiet)
{
    if (fmt || o->active || o->drop || o->skip_broken_bitmaps)
        return cli_usage_error(prog, "-f, -d, --active and "
                               "--skip-broken-bitmaps do not go with --qmp");
    struct live_chain_opts lo = { .top = o->top, .base = o->base };
    if (cli_take_filename(prog, argc, argv, &lo.disk) < 0)
        return CLI_EXIT_USAGE;
    int r = cli_live_run(prog, la, &lo, live_commit);
    if (r == 0 && !quiet)
        printf("Image committed.\n");
    return r;
}

int cmd_commit(int argc, char **argv)
{
    enum { OPT_TOP = 256, OPT_ACTIVE, OPT_SKIP_BROKEN };
    static const struct option longopts[] = {
        {"help", no_argument, NULL, 'h'},
        {"format", required_argument, NULL, 'f'},
        {"base", required_argument, NULL, 'b'},
        {"top", required_argument, NULL, OPT_TOP},
        {"active", required_argument, NULL, OPT_ACTIVE},
        {"skip-broken-bitmaps", no_argument, NULL, OPT_SKIP_BROKEN},
        {"qmp", required_argument, NULL, CLI_OPT_QMP},
        {NULL, 0, NULL, 0},
    };
    const char *prog = argv[0];
    const char *fmt = NULL;
    struct cbt_commit_opts o = CBT_COMMIT_OPTS_INIT;
    o.warn = cli_warn;
    bool quiet = false;
    struct cli_live_args la = { .sock = NULL };
    int c;
    optind = 0;
    while ((c = getopt_long(argc, argv, "hf:b:dpqr:", longopts, NULL)) != -1) {
        switch (c) {
        case 'h':
            return cli_help(usage);
        case 'f':
            fmt = optarg;
            break;
        case 'b':
            o.base = optarg;
            break;
        case 'd':
            o.drop = true;
            break;
        case 'q':
            quiet = true;
            break;
        case OPT_TOP:
            o.top = optarg;
            break;
        case OPT_ACTIVE:
            o.active = optarg;
            break;
        case OPT_SKIP_BROKEN:
            o.skip_broken_bitmaps = true;
            break;
        default:
            if (!cli_live_option(c, &la))
                return cli_bad_option(prog);
        }
    }
    if (la.sock)
        return live_form(prog, argc, argv, &la, &o, fmt, quiet);
    if (la.rate)
        return cli_usage_error(prog, "-r goes with --qmp (QEMU's job)");
    bool top_form = o.top != NULL;
    if (top_form) {
        if (optind < argc)
            return cli_usage_error(prog, "unexpected argument '%s' (--top "
                                   "names the image)", argv[optind]);
        if (fmt)
            return cli_usage_error(prog, "-f goes with the FILE form, not "
                                   "with --top");
    } else {
        if (o.active)
            return cli_usage_error(prog, "--active needs --top");
        if (cli_take_filename(prog, argc, argv, &o.top) < 0)
            return CLI_EXIT_USAGE;
    }
    /* Only `cbt commit FILE` empties FILE (qemu-img: -b implies -d). */
    if (o.base || top_form)
        o.drop = true;
    /* --top without an image above it: base takes top's place. */
    o.pivot = top_form;
    int ret;
    if (fmt && (ret = check_format(o.top, fmt)) != 0)
        return ret;

    struct cli_progress pr;
    cli_progress_init(&pr, la.progress);
    o.progress = cli_progress_cb;
    o.progress_opaque = &pr;
    o.cancel = cli_signals_catch();
    struct cbt_error *err = NULL;
    int r = cbt_commit(&o, &err);
    cli_progress_end(&pr);
    if (r < 0)
        return cli_lib_error(err);
    if (!quiet)
        printf("Image committed.\n");
    return 0;
}
