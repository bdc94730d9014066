/* cbt snapshot: create a qcow2 overlay of an image and move the recording
 * of its persistent dirty bitmaps onto the overlay (cbt_snapshot()). */
#include <getopt.h>

#include <cbt/ops.h>

#include "../live/livechain.h"
#include "cli.h"

static const char usage[] =
    "Usage: cbt snapshot [--no-bitmaps] TOP OVERLAY\n"
    "       cbt snapshot --qmp SOCKET DISK OVERLAY\n"
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
    "On a running VM (--qmp SOCKET, QEMU's QMP socket; docs/live.md): DISK\n"
    "names one of its disks (device, export, node or image file).  cbt\n"
    "creates OVERLAY backed by the disk's top image, and one transaction\n"
    "makes it the disk's top (blockdev-snapshot) with an empty recording copy\n"
    "of each persistent, recording bitmap of the old top, as libvirt does;\n"
    "the old top's copies keep their history.  The disk's checkpoints follow\n"
    "into OVERLAY (its live journal).  If the transaction fails, OVERLAY is\n"
    "removed and nothing changed.\n"
    "\n"
    "Options:\n"
    "  --no-bitmaps  only create OVERLAY; TOP's bitmaps keep recording\n"
    "  --qmp SOCKET  act on the running QEMU behind SOCKET\n"
    "  -h, --help    show this help\n"
    "\n"
    "Examples:\n"
    "  cbt snapshot disk.qcow2 disk.1.qcow2\n"
    "  cbt snapshot --no-bitmaps base.qcow2 /tmp/scratch.qcow2\n"
    "  cbt snapshot --qmp /run/vm1.qmp vda /vm/vm1.2.qcow2\n";

int cmd_snapshot(int argc, char **argv)
{
    enum { OPT_NO_BITMAPS = 256, OPT_QMP };
    static const struct option longopts[] = {
        {"help", no_argument, NULL, 'h'},
        {"no-bitmaps", no_argument, NULL, OPT_NO_BITMAPS},
        {"qmp", required_argument, NULL, OPT_QMP},
        {NULL, 0, NULL, 0},
    };
    const char *prog = argv[0];
    bool copy_bitmaps = true;
    const char *qmp_sock = NULL;
    int c;
    optind = 0;
    while ((c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
        switch (c) {
        case 'h':
            return cli_help(usage);
        case OPT_NO_BITMAPS:
            copy_bitmaps = false;
            break;
        case OPT_QMP:
            qmp_sock = optarg;
            break;
        default:
            return cli_bad_option(prog);
        }
    }
    if (argc - optind < 2)
        return cli_usage_error(prog, qmp_sock ? "Expecting DISK and OVERLAY"
                                              : "Expecting TOP and OVERLAY "
                                                "file names");
    if (argc - optind > 2)
        return cli_usage_error(prog, "unexpected argument '%s'",
                               argv[optind + 2]);

    struct cbt_error *err = NULL;
    if (qmp_sock) {
        if (!copy_bitmaps)
            return cli_usage_error(prog, "--no-bitmaps does not go with "
                                   "--qmp");
        struct qmp *q = qmp_connect(qmp_sock, &err);
        if (!q)
            return cli_lib_error(err);
        int r = live_snapshot(q, argv[optind], argv[optind + 1], &err);
        qmp_close(q);
        return r < 0 ? cli_lib_error(err) : 0;
    }
    struct cbt_snapshot_opts so = CBT_SNAPSHOT_OPTS_INIT;
    so.top = argv[optind];
    so.overlay = argv[optind + 1];
    so.copy_bitmaps = copy_bitmaps;
    so.warn = cli_warn;
    if (cbt_snapshot(&so, &err) < 0)
        return cli_lib_error(err);
    return 0;
}
