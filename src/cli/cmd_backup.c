/* cbt backup: full, incremental and differential backups of a disk into a
 * folder of backups, each creating a checkpoint (cbt_backup()); of a
 * running VM's disks (--qmp) or of an NBD export (--nbd). */
#include <getopt.h>
#include <inttypes.h>
#include <string.h>
#include <time.h>

#include <cbt/backup.h>

#include "../live/livebackup.h"
#include "../live/nbdbackup.h"
#include "cli.h"

static const char usage[] =
    "Usage: cbt backup (--full | --incremental | --since CHECKPOINT | --auto)\n"
    "                  [--rescan] [--compress[=zstd|zlib]]\n"
    "                  [--checkpoint NAME] [-O qcow2|raw] [-g GRANULARITY]\n"
    "                  [-f FMT] [-p] [--output=human|json] DISK TARGET\n"
    "       cbt backup --full --no-checkpoint [-O qcow2|raw] [-f FMT] [-p]\n"
    "                  [--output=human|json] DISK TARGET\n"
    "       cbt backup --qmp SOCKET [--nbd-socket PATH | --push] [--qga SOCKET]\n"
    "                  (--full | ...)\n"
    "                  [--checkpoint NAME] [-O ...] [-g ...] [-p]\n"
    "                  [--output=human|json] (DISK TARGET | --all-disks FOLDER)\n"
    "       cbt backup --nbd URI (--full | [--auto] --since CHECKPOINT\n"
    "                  [--bitmap NAME]) --checkpoint NAME [--disk-id UUID]\n"
    "                  [-O qcow2|raw] [-p] [--output=human|json] TARGET\n"
    "\n"
    "Back up DISK (the top of a qcow2 chain) to TARGET, a new file, and\n"
    "create a checkpoint on DISK at the point in time of the backup.  Beside\n"
    "TARGET go TARGET.json (the manifest: disk, checkpoint, parent backup,\n"
    "sizes, the content hash) and TARGET.tree (a SHA-256 tree over every\n"
    "64 KiB of the disk, storing only what differs from the parent backup's);\n"
    "see docs/backups.md.  The backups of one disk share a folder: an\n"
    "incremental finds its parent there (older TARGET.hashes folders too).\n"
    "\n"
    "  --full          copy the whole disk (its guest view)\n"
    "  --incremental   copy what changed since DISK's newest checkpoint, on\n"
    "                  top of the backup that created that checkpoint\n"
    "  --since CHECKPOINT\n"
    "                  differential: copy what changed since CHECKPOINT, on\n"
    "                  top of the backup that created it\n"
    "  --auto          --incremental, or a full backup when an incremental is\n"
    "                  impossible (no checkpoint, its bitmap broken or its\n"
    "                  history below the top altered, no backup of it in\n"
    "                  TARGET's folder, its chain incomplete or damaged);\n"
    "                  says why.  With --since: that differential, or a full\n"
    "                  backup\n"
    "  --rescan        with --incremental, --since or alone: do not use the\n"
    "                  checkpoint's bitmap (lost: QEMU killed, removed\n"
    "                  behind cbt's back); read and hash the whole disk and\n"
    "                  write only the blocks whose hash differs from the\n"
    "                  previous backup's (the block hashes of the backup\n"
    "                  of that checkpoint), as an ordinary incremental on top\n"
    "                  of it: the chain goes on with a new checkpoint.\n"
    "                  --auto rescans by itself where the bitmap is lost\n"
    "                  but the previous backup is fine (and says so on\n"
    "                  stderr); a full backup only when that fails too\n"
    "One of them is required: a full backup is never taken by surprise.\n"
    "  --no-checkpoint with --full: a copy only, for a disk that cannot\n"
    "                  hold checkpoints (raw) or may not be written (a\n"
    "                  read-only file, a disk others read): DISK is only\n"
    "                  read, sharing reading as qemu-img does; no checkpoint\n"
    "                  is made, so no incremental can follow it\n"
    "\n"
    "A qcow2 incremental or differential has its parent backup as backing\n"
    "file (relative name), so qemu-img reads the backup chain; unchanged\n"
    "clusters are unallocated, zeroed or discarded ranges are zero clusters.\n"
    "Raw targets are sparse.  TARGET names the new file in the backup\n"
    "folder (not the folder); an existing file is never overwritten, and\n"
    "swapped arguments (a backup as DISK, a disk as TARGET) are refused.  If\n"
    "the backup fails, its files are removed and DISK's checkpoints are as\n"
    "before.\n"
    "\n"
    "A running VM's disk (--qmp SOCKET, QEMU's QMP socket; docs/live.md):\n"
    "DISK names one of its disks (device id, export id, node name or image\n"
    "file).  One QMP transaction makes the new checkpoint and freezes the\n"
    "disk's view at that instant (blockdev-backup sync=none into a scratch\n"
    "file TARGET.scratch, removed afterwards); cbt reads the view over NBD,\n"
    "the guest writing on.  cbt starts an NBD server on a private socket,\n"
    "or finds the one QEMU runs (--nbd-socket names it).  --all-disks:\n"
    "every writable qcow2 disk of the VM at one instant (one transaction),\n"
    "one backup each in FOLDER named ID.CHECKPOINT.qcow2, one checkpoint\n"
    "name across them; if one disk fails, none keeps a new checkpoint or\n"
    "file.  --push: QEMU itself writes the data (blockdev-backup into the\n"
    "scratch file), cbt then reads it from there: no NBD (taken by itself,\n"
    "with a warning, when QEMU's NBD server cannot be reached).\n"
    "--qga SOCKET (qemu-guest-agent's socket) freezes the guest's\n"
    "file systems for the instant of the transaction and thaws them right\n"
    "after (also when it fails).\n"
    "\n"
    "An NBD export someone else set up (--nbd URI, e.g.\n"
    "nbd+unix:///vda?socket=/run/backup.sock: libvirt's pull-mode backup,\n"
    "qemu-nbd -r -B, a qemu-storage-daemon export; docs/live.md): the export\n"
    "is the disk at one instant, so there is no DISK argument, and cbt makes\n"
    "no checkpoint and sends no QMP; the export's owner made them.\n"
    "  --checkpoint NAME  (required) the checkpoint the owner made for this\n"
    "                  backup, recorded in the manifest: the next backup\n"
    "                  --since NAME finds this one as its parent\n"
    "  --since CHECKPOINT  the checkpoint the export's dirty bitmap starts\n"
    "                  from (cbt cannot see it: name the one the owner used,\n"
    "                  libvirt's <incremental>); the parent is the backup in\n"
    "                  TARGET's folder that created it (an incremental when\n"
    "                  it is the newest there, else a differential).  Without\n"
    "                  a backup of it, with an export lacking the bitmap or\n"
    "                  of another size: exit 79, or with --auto a full backup\n"
    "  --bitmap NAME   the export's bitmap, qemu:dirty-bitmap:NAME (default:\n"
    "                  CHECKPOINT, as qemu-nbd -B exports it; libvirt names\n"
    "                  it backup-DISK, e.g. backup-vda)\n"
    "  --disk-id UUID  the disk's id in the manifests (default: the parent's;\n"
    "                  for a full backup a new one)\n"
    "Checkpoint orders in the manifests are cbt's own (one more than the\n"
    "highest of the disk's backups in the folder).\n"
    "\n"
    "Options:\n"
    "  --compress[=zstd|zlib]\n"
    "                  store TARGET's data clusters compressed (qcow2\n"
    "                  compressed clusters, default zstd), compressing in\n"
    "                  every CPU; a cluster that does not shrink is stored as\n"
    "                  it is.  qemu-img, restore and verify read it as any\n"
    "                  chain; hashes are of the data.  The summary shows the\n"
    "                  data bytes against the file's size.  qcow2 only\n"
    "  --checkpoint NAME  name of the new checkpoint (default:\n"
    "                  cbt-YYYYMMDDTHHMMSSZ, the time in UTC)\n"
    "  -O FMT          format of TARGET: qcow2 or raw (default: qcow2 for a\n"
    "                  full backup, the parent's format otherwise)\n"
    "  -g, --granularity SIZE\n"
    "                  bytes per bit of the new checkpoint's bitmap (a power\n"
    "                  of two from 512 to 2G; default: as cbt checkpoint)\n"
    "  -f FMT          format of DISK (default: probe)\n"
    "  --buffered      write TARGET through the host's page cache (qemu-img's\n"
    "                  -t writeback).  By default its data goes around it\n"
    "                  (O_DIRECT, as -t none) where the file system allows:\n"
    "                  the backup leaves the cache to the VMs and costs less\n"
    "                  CPU; on a file system without direct I/O (tmpfs) the\n"
    "                  cache is used anyway.  Durable either way\n"
    "  -p              show progress on stderr (when it is a terminal)\n"
    "  --output=FMT    human (default) or json\n"
    "  -h, --help      show this help\n"
    "\n"
    "SIGINT (Ctrl-C), SIGTERM, SIGHUP: the backup stops, its files are\n"
    "removed, then cbt dies of the signal (a second one kills at once).\n"
    "\n"
    "Exit status: 0 done; 79 the incremental or differential is impossible\n"
    "(a full backup is needed; --auto takes one instead), e.g. old backups\n"
    "of the chain were deleted; 65 the parent's chain is damaged (run cbt\n"
    "verify; --auto takes a full backup); 74 an I/O or space error; 75 DISK\n"
    "is in use; 64 a usage mistake; 1 any other failure (docs/cli.md).\n"
    "\n"
    "Examples:\n"
    "  cbt backup --full disk.qcow2 /backups/vm1/full.qcow2\n"
    "  cbt backup --incremental disk.qcow2 /backups/vm1/inc-1.qcow2\n"
    "  cbt backup --since monday --checkpoint tuesday disk.qcow2 \\\n"
    "      /backups/vm1/diff-tue.qcow2\n"
    "  cbt backup --auto -p disk.qcow2 /backups/vm1/$(date +%F).qcow2\n"
    "  cbt backup --rescan disk.qcow2 /backups/vm1/after-crash.qcow2\n"
    "  cbt backup --full -O raw disk.qcow2 /backups/vm1/full.raw\n"
    "  cbt backup --auto --compress disk.qcow2 /backups/vm1/$(date +%F).qcow2\n"
    "  cbt backup --nbd 'nbd+unix:///vda?socket=/run/bk.sock' --since ck1 \\\n"
    "      --bitmap backup-vda --checkpoint ck2 /backups/vm1/ck2.qcow2\n";


static double pct(uint64_t part, uint64_t whole)
{
    return whole ? 100.0 * (double)part / (double)whole : 0.0;
}

/* --auto chose a rescan: said on stderr (stdout may be JSON). */
static void note_rescan(const struct cbt_backup_opts *o,
                        const struct cbt_backup_result *r)
{
    if (r->rescan && r->fallback)
        fprintf(stderr, "cbt backup: %s: %s; rescanned the whole disk "
                "instead of taking a full backup: only the blocks whose hash "
                "differs from %s were written\n", o->target, r->fallback,
                r->parent ? r->parent : "the previous backup");
}

static void print_human(const struct cbt_backup_opts *o,
                        const struct cbt_backup_result *r, double secs)
{
    char vs[32], dirty[32], copied[32], zeroed[32];
    cli_size_to_str(r->virtual_size, vs, sizeof(vs));
    cli_size_to_str(r->dirty_bytes, dirty, sizeof(dirty));
    cli_size_to_str(r->bytes_copied, copied, sizeof(copied));
    cli_size_to_str(r->bytes_zeroed, zeroed, sizeof(zeroed));
    if (r->fallback && !r->rescan)
        printf("Note: full backup instead of %s: %s\n",
               o->mode == CBT_BACKUP_DIFFERENTIAL ? "differential"
                                                  : "incremental",
               r->fallback);
    printf("%s backup of %s -> %s\n", cbt_backup_mode_name(r->mode), o->disk, o->target);
    if (r->parent)
        printf("  parent      %s\n", r->parent);
    if (r->checkpoint)
        printf("  checkpoint  %s -> %s\n", r->since ? r->since : "(none)",
               r->checkpoint);
    else
        printf("  checkpoint  none (a copy only)\n");
    if (r->mode == CBT_BACKUP_FULL)
        printf("  disk        %s\n", vs);
    else if (r->rescan)
        printf("  changed     %s of %s (%.1f%%), found by reading and "
               "hashing the whole disk (rescan)\n", dirty, vs,
               pct(r->dirty_bytes, r->virtual_size));
    else
        printf("  dirty       %s of %s (%.1f%%)\n", dirty, vs,
               pct(r->dirty_bytes, r->virtual_size));
    printf("  copied      %s data (%.1f%% of the disk), %s zeroes\n", copied,
           pct(r->bytes_copied, r->virtual_size), zeroed);
    char file[32];
    cli_size_to_str(r->file_bytes, file, sizeof(file));
    if (o->compress)
        printf("  file        %s, %s compressed (%.1f%% of the data copied)\n",
               file, o->compress, pct(r->file_bytes, r->bytes_copied));
    else
        printf("  file        %s\n", file);
    printf("  time        %.2f s\n", secs);
    printf("  root hash   %s\n", r->root_hash);
}

static json_t *result_json(const struct cbt_backup_opts *o,
                           const struct cbt_backup_result *r, double secs)
{
    json_t *j = json_object();
    json_object_set_new(j, "kind", json_string(cbt_backup_mode_name(r->mode)));
    json_object_set_new(j, "disk", cli_json_string(o->disk));
    json_object_set_new(j, "target", cli_json_string(o->target));
    json_object_set_new(j, "checkpoint", r->checkpoint
                                             ? cli_json_string(r->checkpoint)
                                             : json_null());
    json_object_set_new(j, "since",
                        r->since ? cli_json_string(r->since) : json_null());
    json_object_set_new(j, "parent",
                        r->parent ? cli_json_string(r->parent) : json_null());
    json_object_set_new(j, "fallback", r->fallback
                                           ? cli_json_string(r->fallback)
                                           : json_null());
    json_object_set_new(j, "rescan", json_boolean(r->rescan));
    json_object_set_new(j, "virtual-size", cli_json_u64(r->virtual_size));
    json_object_set_new(j, "dirty-bytes", cli_json_u64(r->dirty_bytes));
    json_object_set_new(j, "bytes-copied", cli_json_u64(r->bytes_copied));
    json_object_set_new(j, "bytes-zeroed", cli_json_u64(r->bytes_zeroed));
    json_object_set_new(j, "file-bytes", cli_json_u64(r->file_bytes));
    json_object_set_new(j, "compression", o->compress
                                              ? json_string(o->compress)
                                              : json_null());
    json_object_set_new(j, "milliseconds",
                        cli_json_u64((uint64_t)(secs * 1000.0 + 0.5)));
    json_object_set_new(j, "root", json_string(r->root_hash));
    return j;
}

static void print_json(const struct cbt_backup_opts *o,
                       const struct cbt_backup_result *r, double secs)
{
    cli_json_print(result_json(o, r, secs));
}

/* --all-disks: every disk's result (their options differ only in DISK
 * and TARGET). */
static void print_all(const struct cbt_backup_opts *o,
                      const struct live_disk_result *v, size_t n, double secs,
                      enum cli_output output)
{
    json_t *arr = output == CLI_OUTPUT_JSON ? json_array() : NULL;
    for (size_t i = 0; i < n; i++) {
        struct cbt_backup_opts one = *o;
        one.disk = v[i].disk;
        one.target = v[i].target;
        note_rescan(&one, &v[i].res);
        if (arr)
            json_array_append_new(arr, result_json(&one, &v[i].res, secs));
        else
            print_human(&one, &v[i].res, secs);
    }
    if (arr)
        cli_json_print(arr);
}

/* The options that go with --nbd (the export's owner makes the
 * checkpoints; no QMP).  0, or the exit status of a usage mistake. */
static int check_nbd_opts(const char *prog, const struct cbt_backup_opts *o,
                          bool inc, bool qmp, const struct nbd_backup_opts *no)
{
    if (qmp)
        return cli_usage_error(prog, "--nbd excludes --qmp, --nbd-socket, "
                               "--all-disks, --qga and --push");
    if (inc || !(o->mode == CBT_BACKUP_FULL || o->since))
        return cli_usage_error(prog, "--nbd: name the checkpoint the "
                               "export's bitmap starts from with --since "
                               "CHECKPOINT");
    if (o->granularity || o->disk_format || o->no_checkpoint)
        return cli_usage_error(prog, "--nbd: -g, -f and --no-checkpoint do "
                               "not apply (the export's owner makes the "
                               "checkpoints)");
    if (!o->checkpoint)
        return cli_usage_error(prog, "--nbd needs --checkpoint NAME: the "
                               "checkpoint the export's owner made for this "
                               "backup (cbt makes none)");
    if (no->bitmap && !o->since)
        return cli_usage_error(prog, "--bitmap goes with --since (a full "
                               "backup reads no bitmap)");
    return 0;
}

/* What the command line asks for, filled in steps by cmd_backup(). */
struct backup_cli {
    struct cbt_backup_opts o;
    struct live_backup_opts lo;  /* --qmp */
    struct nbd_backup_opts no;   /* --nbd */
    const char *qmp_sock;
    const char *nbd_uri;
    bool all, full, inc, progress;
    enum cli_output output;
};

enum {
    OPT_FULL = 256,
    OPT_INC,
    OPT_SINCE,
    OPT_AUTO,
    OPT_CKPT,
    OPT_OUT,
    OPT_NOCKPT,
    OPT_QMP,
    OPT_NBDSOCK,
    OPT_ALL,
    OPT_QGA,
    OPT_PUSH,
    OPT_NBD,
    OPT_BITMAP,
    OPT_DISKID,
    OPT_RESCAN,
    OPT_COMPRESS,
    OPT_BUFFERED,
};

/* The options, one at a time.  -1: go on; otherwise the exit status
 * (--help, or a value that is wrong by itself). */
static int parse_options(int argc, char **argv, struct backup_cli *a)
{
    static const struct option longopts[] = {
        {"help", no_argument, NULL, 'h'},
        {"full", no_argument, NULL, OPT_FULL},
        {"incremental", no_argument, NULL, OPT_INC},
        {"since", required_argument, NULL, OPT_SINCE},
        {"auto", no_argument, NULL, OPT_AUTO},
        {"checkpoint", required_argument, NULL, OPT_CKPT},
        {"granularity", required_argument, NULL, 'g'},
        {"output", required_argument, NULL, OPT_OUT},
        {"no-checkpoint", no_argument, NULL, OPT_NOCKPT},
        {"qmp", required_argument, NULL, OPT_QMP},
        {"nbd-socket", required_argument, NULL, OPT_NBDSOCK},
        {"all-disks", no_argument, NULL, OPT_ALL},
        {"qga", required_argument, NULL, OPT_QGA},
        {"push", no_argument, NULL, OPT_PUSH},
        {"nbd", required_argument, NULL, OPT_NBD},
        {"bitmap", required_argument, NULL, OPT_BITMAP},
        {"disk-id", required_argument, NULL, OPT_DISKID},
        {"rescan", no_argument, NULL, OPT_RESCAN},
        {"compress", optional_argument, NULL, OPT_COMPRESS},
        {"buffered", no_argument, NULL, OPT_BUFFERED},
        {NULL, 0, NULL, 0},
    };
    const char *prog = argv[0];
    struct cbt_backup_opts *o = &a->o;
    int c;
    optind = 0;
    while ((c = getopt_long(argc, argv, "hO:g:f:p", longopts, NULL)) != -1) {
        switch (c) {
        case 'h':
            return cli_help(usage);
        case OPT_FULL:
            a->full = true;
            break;
        case OPT_INC:
            a->inc = true;
            break;
        case OPT_SINCE:
            o->since = optarg;
            break;
        case OPT_AUTO:
            o->auto_full = true;
            break;
        case OPT_RESCAN:
            o->rescan = true;
            break;
        case OPT_COMPRESS:
            o->compress = optarg ? optarg : "zstd";
            if (strcmp(o->compress, "zstd") != 0 &&
                strcmp(o->compress, "zlib") != 0)
                return cli_usage_error(prog, "unknown compression '%s' "
                                       "(zstd or zlib)", o->compress);
            break;
        case OPT_BUFFERED:
            o->buffered = true;
            break;
        case OPT_CKPT:
            o->checkpoint = optarg;
            break;
        case OPT_NOCKPT:
            o->no_checkpoint = true;
            break;
        case OPT_QMP:
            a->qmp_sock = optarg;
            break;
        case OPT_NBDSOCK:
            a->lo.nbd_socket = optarg;
            break;
        case OPT_ALL:
            a->all = true;
            break;
        case OPT_QGA:
            a->lo.qga = optarg;
            break;
        case OPT_PUSH:
            a->lo.push = true;
            break;
        case OPT_NBD:
            a->nbd_uri = optarg;
            break;
        case OPT_BITMAP:
            a->no.bitmap = optarg;
            break;
        case OPT_DISKID:
            a->no.disk_id = optarg;
            break;
        case 'O':
            o->format = optarg;
            break;
        case 'g':
            if (cli_parse_size_arg(prog, "granularity", optarg,
                                   &o->granularity) < 0)
                return CLI_EXIT_USAGE;
            break;
        case 'f':
            o->disk_format = optarg;
            break;
        case 'p':
            a->progress = true;
            break;
        case OPT_OUT:
            if (cli_parse_output(prog, optarg, &a->output) < 0)
                return CLI_EXIT_USAGE;
            break;
        default:
            return cli_bad_option(prog);
        }
    }
    return -1;
}

/* Options that exclude or need each other; sets the backup's mode.
 * 0, or the usage error's exit status. */
static int check_combination(const char *prog, struct backup_cli *a)
{
    struct cbt_backup_opts *o = &a->o;
    if (a->full + a->inc + (o->since != NULL) > 1)
        return cli_usage_error(prog, "--full, --incremental and --since "
                               "exclude each other");
    if (a->full && o->rescan)
        return cli_usage_error(prog, "--rescan makes an incremental or "
                               "differential backup; it excludes --full");
    if (!a->full && !a->inc && !o->since && !o->auto_full && !o->rescan)
        return cli_usage_error(prog, "say which backup: --full, "
                               "--incremental, --since CHECKPOINT or --auto");
    if (o->compress && o->format && strcmp(o->format, "raw") == 0)
        return cli_usage_error(prog, "--compress writes qcow2 compressed "
                               "clusters: not with -O raw");
    if (o->since && !*o->since)
        return cli_usage_error(prog, "--since needs a checkpoint name");
    if (o->format && strcmp(o->format, "qcow2") != 0 &&
        strcmp(o->format, "raw") != 0)
        return cli_usage_error(prog, "unknown backup format '%s' (qcow2 or "
                               "raw)", o->format);
    o->mode = a->full ? CBT_BACKUP_FULL
              : o->since ? CBT_BACKUP_DIFFERENTIAL
                         : CBT_BACKUP_INCREMENTAL;
    if (a->nbd_uri) {
        int r = check_nbd_opts(prog, o, a->inc,
                               a->qmp_sock || a->lo.nbd_socket || a->all ||
                                   a->lo.qga || a->lo.push,
                               &a->no);
        if (r)
            return r;
    } else if (a->no.bitmap || a->no.disk_id) {
        return cli_usage_error(prog, "--bitmap and --disk-id go with --nbd");
    }
    if (a->all && !a->qmp_sock)
        return cli_usage_error(prog, "--all-disks goes with --qmp");
    if ((a->lo.qga || a->lo.push) && !a->qmp_sock)
        return cli_usage_error(prog, "--qga and --push go with --qmp");
    if (a->lo.push && a->lo.nbd_socket)
        return cli_usage_error(prog, "--push reads no NBD export: "
                               "--nbd-socket goes without it");
    return 0;
}

/* DISK and TARGET (TARGET alone with --all-disks or --nbd).  0, or the
 * usage error's exit status. */
static int take_arguments(const char *prog, int argc, char **argv,
                          struct backup_cli *a)
{
    struct cbt_backup_opts *o = &a->o;
    if (a->all) {
        if (argc - optind != 1)
            return cli_usage_error(prog, "with --all-disks: expecting the "
                                   "target folder alone");
        o->disk = "";
        o->target = argv[optind];
    } else if (a->nbd_uri) {
        if (argc - optind != 1)
            return cli_usage_error(prog, "with --nbd: expecting TARGET alone "
                                   "(the export is the disk)");
        o->disk = a->nbd_uri;
        o->target = argv[optind];
    } else if (argc - optind < 2) {
        return cli_usage_error(prog, "expecting DISK and TARGET");
    } else if (argc - optind > 2) {
        return cli_usage_error(prog, "unexpected argument '%s'",
                               argv[optind + 2]);
    } else {
        o->disk = argv[optind];
        o->target = argv[optind + 1];
    }
    if (a->lo.nbd_socket && !a->qmp_sock)
        return cli_usage_error(prog, "--nbd-socket goes with --qmp");
    return 0;
}

static double seconds_since(const struct timespec *t0)
{
    struct timespec t1;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    return (double)(t1.tv_sec - t0->tv_sec) +
           (double)(t1.tv_nsec - t0->tv_nsec) / 1e9;
}

/* --all-disks: one backup a disk, one transaction. */
static int run_all_disks(struct backup_cli *a, struct cli_progress *pr,
                         const struct timespec *t0)
{
    struct cbt_error *err = NULL;
    struct qmp *q = qmp_connect(a->qmp_sock, &err);
    struct live_disk_result *v = NULL;
    size_t n = 0;
    int r = q ? live_backup_all(q, &a->o, &a->lo, &v, &n, &err) : -1;
    qmp_close(q);
    cli_progress_end(pr);
    if (r < 0)
        return cli_lib_error(err);
    print_all(&a->o, v, n, seconds_since(t0), a->output);
    live_disk_results_free(v, n);
    return 0;
}

/* One disk: through its QEMU (--qmp), from an NBD export (--nbd), or
 * opened by cbt. */
static int run_one(struct backup_cli *a, struct cli_progress *pr,
                   const struct timespec *t0)
{
    struct cbt_backup_result res;
    struct cbt_error *err = NULL;
    int r;
    if (a->qmp_sock) {
        struct qmp *q = qmp_connect(a->qmp_sock, &err);
        r = q ? live_backup(q, &a->o, &a->lo, &res, &err) : -1;
        if (!q)
            memset(&res, 0, sizeof(res));
        qmp_close(q);
    } else if (a->nbd_uri) {
        r = nbd_backup(&a->no, &a->o, &res, &err);
    } else {
        r = cbt_backup(&a->o, &res, &err);
    }
    cli_progress_end(pr);
    if (r < 0) {
        cbt_backup_result_free(&res);
        return cli_lib_error(err);
    }
    double secs = seconds_since(t0);
    note_rescan(&a->o, &res);
    if (a->output == CLI_OUTPUT_JSON)
        print_json(&a->o, &res, secs);
    else
        print_human(&a->o, &res, secs);
    cbt_backup_result_free(&res);
    return 0;
}

int cmd_backup(int argc, char **argv)
{
    const char *prog = argv[0];
    struct backup_cli a = {
        .o = CBT_BACKUP_OPTS_INIT,
        .output = CLI_OUTPUT_HUMAN,
    };
    a.o.warn = cli_warn;
    int r = parse_options(argc, argv, &a);
    if (r >= 0)
        return r;
    if ((r = check_combination(prog, &a)) != 0 ||
        (r = take_arguments(prog, argc, argv, &a)) != 0)
        return r;

    struct cli_progress pr;
    cli_progress_init_rate(&pr, a.progress);
    a.o.progress = cli_progress_cb;
    a.o.progress_opaque = &pr;
    a.o.cancel = cli_signals_catch();
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    return a.all ? run_all_disks(&a, &pr, &t0) : run_one(&a, &pr, &t0);
}
