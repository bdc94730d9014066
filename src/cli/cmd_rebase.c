/* cbt rebase: change the backing file of an image, keeping its guest view
 * unless -u (cbt_rebase()), as qemu-img rebase. */
#include <getopt.h>

#include <cbt/ops.h>

#include "cli.h"

static const char usage[] =
    "Usage: cbt rebase [-f FMT] [-u] [-p] [-q] -b BACKING [-F BACKING_FMT] FILE\n"
    "\n"
    "Make BACKING the backing file of FILE (-b \"\": no backing file).  The\n"
    "name is stored as given; a relative name is resolved against FILE's\n"
    "directory.  The backing format stored is BACKING_FMT, or BACKING's\n"
    "format as probed.\n"
    "\n"
    "Safe mode (the default) keeps what FILE reads: wherever FILE does not\n"
    "hold its own data and the old and the new backing chain differ, the old\n"
    "contents are first copied into FILE (zeroes as zeroes).  Backing files\n"
    "shorter than FILE read as zeroes past their end.  Unsafe mode (-u) only\n"
    "rewrites the link, as after renaming or moving a backing file; without\n"
    "-b it removes the link.  FILE's bitmaps are not changed in either mode.\n"
    "SIGINT (Ctrl-C), SIGTERM or SIGHUP during the copy stops it: FILE keeps\n"
    "its old backing file and reads as before.\n"
    "\n"
    "Options:\n"
    "  -b BACKING      the new backing file (\"\" for none)\n"
    "  -F BACKING_FMT  format of BACKING (default: probe)\n"
    "  -f FMT          format of FILE (default: probe)\n"
    "  -u              unsafe: change only the link\n"
    "  -p              show progress (on a terminal)\n"
    "  -q              quiet (rebase prints nothing anyway)\n"
    "  -h, --help      show this help\n"
    "\n"
    "Exit status: 0 done; 74 an I/O or space error; 75 an image is in use;\n"
    "64 a usage mistake; 1 any other failure (docs/cli.md, Exit status).\n"
    "\n"
    "Examples:\n"
    "  cbt rebase -b base.qcow2 -F qcow2 disk.qcow2\n"
    "  cbt rebase -b \"\" disk.qcow2\n"
    "  cbt rebase -u -b /new/place/base.qcow2 -F qcow2 disk.qcow2\n";

int cmd_rebase(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"help", no_argument, NULL, 'h'},
        {"format", required_argument, NULL, 'f'},
        {NULL, 0, NULL, 0},
    };
    const char *prog = argv[0];
    struct cbt_rebase_opts o = CBT_REBASE_OPTS_INIT;
    o.warn = cli_warn;
    bool progress = false;
    int c;
    optind = 0;
    while ((c = getopt_long(argc, argv, "hf:F:b:upq", longopts, NULL)) != -1) {
        switch (c) {
        case 'h':
            return cli_help(usage);
        case 'f':
            o.file_format = optarg;
            break;
        case 'F':
            o.backing_format = optarg;
            break;
        case 'b':
            o.backing = optarg;
            break;
        case 'u':
            o.unsafe = true;
            break;
        case 'p':
            progress = true;
            break;
        case 'q':
            break;
        default:
            return cli_bad_option(prog);
        }
    }
    if (argc - optind != 1)
        return cli_usage_error(prog, "Expecting one image file name");
    o.file = argv[optind];
    if (!o.backing && !o.unsafe)
        return cli_usage_error(prog, "Must specify backing file (-b) or use "
                               "unsafe mode (-u)");

    struct cli_progress pr;
    cli_progress_init(&pr, progress);
    o.progress = cli_progress_cb;
    o.progress_opaque = &pr;
    o.cancel = cli_signals_catch();
    struct cbt_error *err = NULL;
    int r = cbt_rebase(&o, &err);
    cli_progress_end(&pr);
    if (r < 0)
        return cli_lib_error(err);
    return 0;
}
