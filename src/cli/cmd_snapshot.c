/* cbt snapshot: create a qcow2 overlay of an image and move the recording
 * of its persistent dirty bitmaps onto the overlay (cbt_snapshot()). */
#include <getopt.h>

#include <cbt/ops.h>

#include "cli.h"

static const char usage[] =
    "Usage: cbt snapshot [--no-bitmaps] TOP OVERLAY\n"
    "\n"
    "Create OVERLAY, a new qcow2 image backed by TOP (TOP's size and format;\n"
    "the backing name is TOP's file name when both are in the same\n"
    "directory, otherwise TOP's absolute path).  For each recording bitmap\n"
    "of TOP, OVERLAY gets an empty recording persistent bitmap of the same\n"
    "name and granularity, and the bitmap in TOP stops recording: changes\n"
    "made through OVERLAY from now on are tracked in OVERLAY only.\n"
    "Disabled bitmaps of TOP are not copied; inconsistent ones are left as\n"
    "they are, with a warning.\n"
    "\n"
    "All or nothing: an existing OVERLAY is refused and nothing is touched;\n"
    "if a step fails, OVERLAY is removed and TOP is left as it was.\n"
    "\n"
    "Options:\n"
    "  --no-bitmaps  only create OVERLAY; TOP's bitmaps keep recording\n"
    "  -h, --help    show this help\n"
    "\n"
    "Examples:\n"
    "  cbt snapshot disk.qcow2 disk.1.qcow2\n"
    "  cbt snapshot --no-bitmaps base.qcow2 /tmp/scratch.qcow2\n";

int cmd_snapshot(int argc, char **argv)
{
    enum { OPT_NO_BITMAPS = 256 };
    static const struct option longopts[] = {
        {"help", no_argument, NULL, 'h'},
        {"no-bitmaps", no_argument, NULL, OPT_NO_BITMAPS},
        {NULL, 0, NULL, 0},
    };
    const char *prog = argv[0];
    bool copy_bitmaps = true;
    int c;
    optind = 0;
    while ((c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
        switch (c) {
        case 'h':
            return cli_help(usage);
        case OPT_NO_BITMAPS:
            copy_bitmaps = false;
            break;
        default:
            return cli_bad_option(prog);
        }
    }
    if (argc - optind < 2)
        return cli_usage_error(prog, "Expecting TOP and OVERLAY file names");
    if (argc - optind > 2)
        return cli_usage_error(prog, "unexpected argument '%s'",
                               argv[optind + 2]);

    struct cbt_error *err = NULL;
    if (cbt_snapshot(argv[optind], argv[optind + 1], copy_bitmaps, &err) < 0)
        return cli_lib_error(err);
    return 0;
}
