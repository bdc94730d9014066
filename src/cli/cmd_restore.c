/* cbt restore: flatten a backup (and its chain down to the full) into a new
 * qcow2 or raw image, checking every block's hash while writing
 * (cbt_restore()). */
#include <getopt.h>
#include <string.h>

#include <cbt/backup.h>

#include "cli.h"

static const char usage[] =
    "Usage: cbt restore [-O qcow2|raw] [--seed-checkpoint NAME] [--buffered]\n"
    "                   [-p] BACKUP OUT\n"
    "\n"
    "Write the guest view of the disk at the point in time of BACKUP (a\n"
    "backup image made by cbt backup; its manifest BACKUP.json and those of\n"
    "its parents lead down to the full backup) into OUT, a new image of the\n"
    "size the disk had then.  The chain is checked first (every parent\n"
    "present and unchanged, as cbt verify checks it), then every 64 KiB\n"
    "block is compared with the hash the backup recorded before it is\n"
    "written; the first mismatch stops the restore, names the guest range\n"
    "and the backup file holding it, and leaves no OUT.  Holes stay holes:\n"
    "ranges the backups hold as zeroes, and 4 KiB pieces of zeroes, are not\n"
    "written (a raw OUT is sparse).  OUT must not exist; the work is done in\n"
    "OUT.part, renamed to OUT at the end.\n"
    "\n"
    "Options:\n"
    "  -O FMT          format of OUT: qcow2 (default) or raw\n"
    "  --seed-checkpoint NAME\n"
    "                  give OUT (qcow2) the checkpoint BACKUP created, NAME,\n"
    "                  with an empty bitmap and the backed-up disk's id, so\n"
    "                  that 'cbt backup --incremental OUT' into the same\n"
    "                  backup folder continues the chain from BACKUP; NAME\n"
    "                  must be BACKUP's checkpoint (cbt verify shows it)\n"
    "  --buffered      write OUT through the host's page cache (qemu-img's\n"
    "                  -t writeback); by default its data goes around it\n"
    "                  (O_DIRECT, -t none) where the file system allows, as\n"
    "                  cbt backup writes\n"
    "  -p              show progress on stderr (when it is a terminal)\n"
    "  -h, --help      show this help\n"
    "\n"
    "SIGINT (Ctrl-C), SIGTERM, SIGHUP: the restore stops, OUT.part is\n"
    "removed, then cbt dies of the signal (a second one kills at once).\n"
    "\n"
    "Exit status: 0 done; 65 the chain is damaged or a block does not match\n"
    "its hash (nothing is left behind); 74 an I/O or space error; 64 a usage\n"
    "mistake; 1 any other failure (docs/cli.md, Exit status).\n"
    "\n"
    "Examples:\n"
    "  cbt restore backups/disk.inc3.qcow2 restored.qcow2\n"
    "  cbt restore -O raw backups/disk.full.qcow2 /var/tmp/disk.raw\n"
    "  cbt restore --seed-checkpoint cp3 backups/disk.inc3.qcow2 disk.qcow2\n";

int cmd_restore(int argc, char **argv)
{
    enum { OPT_SEED = 256, OPT_BUFFERED };
    static const struct option longopts[] = {
        {"help", no_argument, NULL, 'h'},
        {"seed-checkpoint", required_argument, NULL, OPT_SEED},
        {"buffered", no_argument, NULL, OPT_BUFFERED},
        {NULL, 0, NULL, 0},
    };
    const char *prog = argv[0];
    struct cbt_restore_opts o = CBT_RESTORE_OPTS_INIT;
    o.warn = cli_warn;
    bool progress_wanted = false;
    int c;
    optind = 0;
    while ((c = getopt_long(argc, argv, "hO:p", longopts, NULL)) != -1) {
        switch (c) {
        case 'h':
            return cli_help(usage);
        case 'O':
            o.format = optarg;
            break;
        case OPT_SEED:
            o.seed_checkpoint = optarg;
            break;
        case OPT_BUFFERED:
            o.buffered = true;
            break;
        case 'p':
            progress_wanted = true;
            break;
        default:
            return cli_bad_option(prog);
        }
    }
    if (o.format && strcmp(o.format, "qcow2") != 0 &&
        strcmp(o.format, "raw") != 0)
        return cli_usage_error(prog, "unknown image format '%s' (qcow2 or "
                               "raw)", o.format);
    if (o.seed_checkpoint && !o.seed_checkpoint[0])
        return cli_usage_error(prog, "empty checkpoint name");
    if (o.seed_checkpoint && o.format && strcmp(o.format, "raw") == 0)
        return cli_usage_error(prog, "--seed-checkpoint needs a qcow2 OUT (a "
                               "raw image cannot hold checkpoints)");
    if (argc - optind < 2)
        return cli_usage_error(prog, "Expecting BACKUP and OUT file names");
    if (argc - optind > 2)
        return cli_usage_error(prog, "unexpected argument '%s'",
                               argv[optind + 2]);
    o.backup = argv[optind];
    o.out = argv[optind + 1];

    struct cli_progress progress;
    cli_progress_init_rate(&progress, progress_wanted);
    o.progress = cli_progress_cb;
    o.progress_opaque = &progress;
    o.cancel = cli_signals_catch();
    struct cbt_error *err = NULL;
    int r = cbt_restore(&o, &err);
    cli_progress_end(&progress);
    return r < 0 ? cli_lib_error(err) : 0;
}
