/* cbt copy --qmp: move a running VM's disk to a new image with QEMU's
 * blockdev-mirror, its checkpoints kept exact (live_copy()). */
#include <getopt.h>

#include "../live/livechain.h"
#include "cli.h"

static const char usage[] =
    "Usage: cbt copy --qmp SOCKET [--shallow] [-r RATE] [-p] DISK DEST\n"
    "\n"
    "Copy DISK of the running QEMU behind SOCKET (a device, export, node or\n"
    "image file) into DEST, a new qcow2 image, with QEMU's blockdev-mirror,\n"
    "then make DEST the disk's top (the pivot): the storage migration of a\n"
    "running VM.  Without --shallow DEST holds the whole chain's data and has\n"
    "no backing file; with it DEST holds the top layer's and is backed by the\n"
    "top's backing file.  Offline, 'cbt convert --bitmaps' makes such copies.\n"
    "\n"
    "Bitmaps: each bitmap of the top ends in DEST as the union of its copies\n"
    "in the layers DEST replaces (the top alone with --shallow), created just\n"
    "before the pivot while QEMU holds the disk still, so the mirror's own\n"
    "writes add nothing; the guest's writes of the final phase are caught by\n"
    "a temporary bitmap on DEST and merged.  The disk's checkpoints follow\n"
    "into DEST (its live journal): incremental backups continue.  The old\n"
    "images are left as they are.\n"
    "\n"
    "A job error or SIGINT (Ctrl-C) cancels the job: DEST is removed and the\n"
    "disk is as before.\n"
    "\n"
    "Options:\n"
    "  --qmp SOCKET  QEMU's QMP socket (required)\n"
    "  --shallow     copy the top layer only (DEST backed by its backing file)\n"
    "  -r RATE       QEMU's job copies at most RATE bytes a second\n"
    "  -p            show progress (on a terminal)\n"
    "  -h, --help    show this help\n"
    "\n"
    "Exit status: 0 done; 74 an I/O or space error; 64 a usage mistake;\n"
    "1 any other failure (docs/cli.md, Exit status).\n"
    "\n"
    "Examples:\n"
    "  cbt copy --qmp /run/vm1.qmp -p vda /fast/vm1.qcow2\n"
    "  cbt copy --qmp /run/vm1.qmp --shallow vda /vm/vm1.top.qcow2\n";

int cmd_copy(int argc, char **argv)
{
    enum { OPT_SHALLOW = 256 };
    static const struct option longopts[] = {
        {"help", no_argument, NULL, 'h'},
        {"qmp", required_argument, NULL, CLI_OPT_QMP},
        {"shallow", no_argument, NULL, OPT_SHALLOW},
        {NULL, 0, NULL, 0},
    };
    const char *prog = argv[0];
    struct cli_live_args la = { .sock = NULL };
    struct live_chain_opts lo = { .disk = NULL };
    int c;
    optind = 0;
    while ((c = getopt_long(argc, argv, "hpr:", longopts, NULL)) != -1) {
        switch (c) {
        case 'h':
            return cli_help(usage);
        case OPT_SHALLOW:
            lo.shallow = true;
            break;
        default:
            if (!cli_live_option(c, &la))
                return cli_bad_option(prog);
        }
    }
    if (!la.sock)
        return cli_usage_error(prog, "--qmp SOCKET is required (offline: "
                               "cbt convert --bitmaps)");
    if (argc - optind != 2)
        return cli_usage_error(prog, argc - optind < 2
                                         ? "Expecting DISK and DEST"
                                         : "unexpected argument '%s'",
                               argv[argc - 1]);
    lo.disk = argv[optind];
    lo.dest = argv[optind + 1];
    return cli_live_run(prog, &la, &lo, live_copy);
}
