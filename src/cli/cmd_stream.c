/* cbt stream: copy into an image the data of the layers between it and a
 * base, and link it directly onto the base (cbt_stream()). */
#include <getopt.h>

#include <cbt/ops.h>

#include "../live/livechain.h"
#include "cli.h"

static const char usage[] =
    "Usage: cbt stream [-b BASE] [-p] FILE\n"
    "       cbt stream --qmp SOCKET [-b BASE] [-r RATE] [-p] DISK\n"
    "\n"
    "Copy into FILE the data it reads from the layers of its backing chain\n"
    "above BASE, then make BASE its backing file (by its file name when both\n"
    "are in the same directory, otherwise its absolute path; backing format\n"
    "BASE's).  Without -b, FILE gets all the data of its chain and no backing\n"
    "file.  The guest view of FILE does not change, its bitmaps are not\n"
    "changed, and the layers between are left as they are (they are no\n"
    "longer part of FILE's chain).  This is block-stream (a 'pull'), offline.\n"
    "\n"
    "On a running VM (--qmp SOCKET; docs/live.md): QEMU's block-stream into\n"
    "DISK's top layer (DISK: device, export, node or image file; BASE a node\n"
    "name or image file of its chain).  Before the layers leave the chain,\n"
    "their copies of each of the top's bitmaps are merged into the top's\n"
    "(one transaction), so every checkpoint keeps its changes.  A job error\n"
    "or SIGINT (Ctrl-C) cancels the job: the chain stays as it was.\n"
    "\n"
    "Options:\n"
    "  -b, --base BASE  the layer of FILE's chain to keep as its backing file\n"
    "  --qmp SOCKET     act on the running QEMU behind SOCKET\n"
    "  -r RATE          with --qmp: QEMU's job copies at most RATE bytes a\n"
    "                   second (k, M, G suffixes)\n"
    "  -p               show progress (on a terminal)\n"
    "  -h, --help       show this help\n"
    "\n"
    "Exit status: 0 done; 74 an I/O or space error; 75 an image is in use;\n"
    "64 a usage mistake; 1 any other failure (docs/cli.md, Exit status).\n"
    "\n"
    "Examples:\n"
    "  cbt stream disk.2.qcow2\n"
    "  cbt stream -b disk.0.qcow2 -p disk.2.qcow2\n"
    "  cbt stream --qmp /run/vm1.qmp -b disk.0.qcow2 vda\n";

int cmd_stream(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"help", no_argument, NULL, 'h'},
        {"base", required_argument, NULL, 'b'},
        {"qmp", required_argument, NULL, CLI_OPT_QMP},
        {NULL, 0, NULL, 0},
    };
    const char *prog = argv[0];
    const char *base = NULL, *file;
    struct cli_live_args la = { .sock = NULL };
    int c;
    optind = 0;
    while ((c = getopt_long(argc, argv, "hb:pr:", longopts, NULL)) != -1) {
        switch (c) {
        case 'h':
            return cli_help(usage);
        case 'b':
            base = optarg;
            break;
        default:
            if (!cli_live_option(c, &la))
                return cli_bad_option(prog);
        }
    }
    if (cli_take_filename(prog, argc, argv, &file) < 0)
        return CLI_EXIT_USAGE;

    if (la.sock) {
        struct live_chain_opts lo = { .disk = file, .base = base };
        return cli_live_run(prog, &la, &lo, live_stream);
    }
    if (la.rate)
        return cli_usage_error(prog, "-r goes with --qmp (QEMU's job)");
    struct cli_progress pr;
    struct cbt_error *err = NULL;
    cli_progress_init(&pr, la.progress);
    struct cbt_stream_opts so = CBT_STREAM_OPTS_INIT;
    so.file = file;
    so.base = base;
    so.progress = cli_progress_cb;
    so.progress_opaque = &pr;
    so.cancel = cli_signals_catch();
    so.warn = cli_warn;
    int r = cbt_stream(&so, &err);
    cli_progress_end(&pr);
    if (r < 0)
        return cli_lib_error(err);
    return 0;
}
