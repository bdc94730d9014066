/* cbt verify: check a backup chain's integrity and recompute the guest
 * view's block hashes without writing anything (cbt_verify()). */
#include <getopt.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include <cbt/backup.h>

#include "cli.h"

static const char usage[] =
    "Usage: cbt verify [--output=human|json] [-p] [-U] BACKUP\n"
    "\n"
    "Check the backup BACKUP (a backup image made by cbt backup) and its\n"
    "chain down to the full backup, without restoring it:\n"
    "  - every parent is present, and its manifest is the one its child\n"
    "    recorded (SHA-256); one disk, checkpoints in order, the root a full\n"
    "    backup, one image format;\n"
    "  - every image opens with the recorded virtual size, qcow2 backups\n"
    "    are linked to their parent's file and pass a consistency check;\n"
    "  - every block hashes file is intact (SHA-256 and length);\n"
    "  - the guest view at BACKUP's point in time, read from the chain, has\n"
    "    the recorded SHA-256 in every 64 KiB block.\n"
    "The first problem is reported with the file it lies in (and for a bad\n"
    "block, the guest range).\n"
    "\n"
    "Options:\n"
    "  --output=FMT    human (default: one line per backup, oldest first,\n"
    "                  and a verdict) or json\n"
    "  -p              show progress on stderr (when it is a terminal)\n"
    "  -U, --force-share  read backup images another process holds for\n"
    "                  writing (as they are now: a verdict on a moving file)\n"
    "  -h, --help      show this help\n"
    "\n"
    "Exit status: 0 the chain is sound; 65 it is not (the problem is on\n"
    "stderr); 74 an I/O error; 64 a usage mistake; 75 a backup image is in\n"
    "use by another process; 1 the check could not run (BACKUP missing, no\n"
    "manifest).\n"
    "\n"
    "Examples:\n"
    "  cbt verify backups/disk.inc3.qcow2\n"
    "  cbt verify --output=json backups/disk.full.qcow2\n";

/* ---- output: the chain as its manifests describe it, and the verdict ---- */

static void print_human(const char *backup,
                        const struct cbt_verify_result *res)
{
    const struct cbt_verify_backup *v = res->chain;
    size_t n = res->nchain;
    int wk = 4, wc = 10, wf = 4;
    for (size_t i = 0; i < n; i++) {
        int k = (int)strlen(cbt_backup_mode_name(v[i].kind));
        int c = (int)strlen(v[i].checkpoint ? v[i].checkpoint : "-");
        int f = (int)strlen(v[i].file);
        wk = k > wk ? k : wk;
        wc = c > wc ? c : wc;
        wf = f > wf ? f : wf;
    }
    printf("%-*s  %-*s  %-*s  %12s  %12s\n", wk, "KIND", wc, "CHECKPOINT", wf,
           "FILE", "VIRTUAL SIZE", "COPIED");
    for (size_t i = 0; i < n; i++) {
        char vs[32], cp[32];
        cli_size_to_str(v[i].virtual_size, vs, sizeof(vs));
        cli_size_to_str(v[i].copied, cp, sizeof(cp));
        printf("%-*s  %-*s  %-*s  %12s  %12s\n", wk,
               cbt_backup_mode_name(v[i].kind), wc,
               v[i].checkpoint ? v[i].checkpoint : "-", wf,
               v[i].file, vs, cp);
    }
    char checked[32];
    cli_size_to_str(res->bytes_checked, checked, sizeof(checked));
    if (res->ok)
        printf("OK: %s: %zu backup%s, %s of the guest view match the "
               "recorded block hashes\n", backup, res->backups,
               res->backups == 1 ? "" : "s", checked);
    else
        printf("FAILED: %s: the problem lies in %s\n", backup,
               res->bad_file ? res->bad_file : backup);
}

static void print_json(const char *backup, const struct cbt_verify_result *res)
{
    json_t *o = json_object();
    json_object_set_new(o, "backup", cli_json_string(backup));
    json_object_set_new(o, "ok", json_boolean(res->ok));
    json_object_set_new(o, "backups", cli_json_u64(res->backups));
    json_object_set_new(o, "bytes-checked", cli_json_u64(res->bytes_checked));
    json_t *chain = json_array();
    for (size_t i = 0; i < res->nchain; i++) {
        const struct cbt_verify_backup *b = &res->chain[i];
        json_t *e = json_object();
        json_object_set_new(e, "file", cli_json_string(b->file));
        json_object_set_new(e, "kind",
                            json_string(cbt_backup_mode_name(b->kind)));
        json_object_set_new(e, "checkpoint",
                            b->checkpoint ? cli_json_string(b->checkpoint)
                                          : json_null());
        json_object_set_new(e, "virtual-size", cli_json_u64(b->virtual_size));
        json_object_set_new(e, "copied", cli_json_u64(b->copied));
        json_array_append_new(chain, e);
    }
    json_object_set_new(o, "chain", chain);
    json_object_set_new(o, "problem", res->problem
                                          ? cli_json_string(res->problem)
                                          : json_null());
    json_object_set_new(o, "bad-file", res->bad_file
                                           ? cli_json_string(res->bad_file)
                                           : json_null());
    bool range = !res->ok && res->bad_length > 0;
    json_object_set_new(o, "bad-offset", range ? cli_json_u64(res->bad_offset)
                                               : json_null());
    json_object_set_new(o, "bad-length", range ? cli_json_u64(res->bad_length)
                                               : json_null());
    cli_json_print(o);
}

int cmd_verify(int argc, char **argv)
{
    enum { OPT_OUTPUT = 256 };
    static const struct option longopts[] = {
        {"help", no_argument, NULL, 'h'},
        {"output", required_argument, NULL, OPT_OUTPUT},
        {"force-share", no_argument, NULL, 'U'},
        {NULL, 0, NULL, 0},
    };
    const char *prog = argv[0];
    enum cli_output output = CLI_OUTPUT_HUMAN;
    bool progress_wanted = false;
    unsigned flags = 0;
    int c;
    optind = 0;
    while ((c = getopt_long(argc, argv, "hpU", longopts, NULL)) != -1) {
        switch (c) {
        case 'h':
            return cli_help(usage);
        case OPT_OUTPUT:
            if (cli_parse_output(prog, optarg, &output) < 0)
                return CLI_EXIT_USAGE;
            break;
        case 'p':
            progress_wanted = true;
            break;
        case 'U':
            flags |= CBT_VERIFY_FORCE_SHARE;
            break;
        default:
            return cli_bad_option(prog);
        }
    }
    const char *backup;
    if (cli_take_filename(prog, argc, argv, &backup) < 0)
        return CLI_EXIT_USAGE;

    struct cli_progress progress;
    cli_progress_init_rate(&progress, progress_wanted);
    struct cbt_verify_result res;
    struct cbt_error *err = NULL;
    struct cbt_verify_opts vo = CBT_VERIFY_OPTS_INIT;
    vo.backup = backup;
    vo.flags = flags;
    vo.progress = cli_progress_cb;
    vo.progress_opaque = &progress;
    vo.cancel = cli_signals_catch();
    vo.warn = cli_warn;
    int r = cbt_verify(&vo, &res, &err);
    cli_progress_end(&progress);
    if (r < 0)
        return cli_lib_error(err);

    if (output == CLI_OUTPUT_JSON)
        print_json(backup, &res);
    else
        print_human(backup, &res);
    fflush(stdout);
    int ret = 0;
    if (!res.ok) {
        cli_error("%s", res.problem ? res.problem : "verification failed");
        ret = CLI_EXIT_CORRUPT;
    }
    cbt_verify_result_free(&res);
    return ret;
}
