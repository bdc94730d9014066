/* cbt check: consistency check and repair, with qemu-img check's output and
 * exit codes (0 clean, 1 check failed, 2 corruptions, 3 leaks, 63
 * unsupported), besides cbt's common ones (usage, I/O, in use). */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"

static const char usage[] =
    "Usage: cbt check [-f FMT] [-r leaks|all] [--output=human|json] [-q] FILE\n"
    "\n"
    "Check the metadata of a qcow2 image (refcounts, L1/L2 tables, bitmaps)\n"
    "and optionally repair it.  Each problem found is reported on stderr.\n"
    "\n"
    "Options:\n"
    "  -f FMT          format of FILE (default: probe)\n"
    "  -r leaks        repair leaked clusters only\n"
    "  -r all          repair leaks and corruptions\n"
    "  --output=FMT    human (default) or json (qemu-img check's fields)\n"
    "  -q              quiet: print nothing on stdout\n"
    "  -U, --force-share  check an image another process holds for writing\n"
    "                     (not with -r; its state as last written)\n"
    "  -h, --help      show this help\n"
    "\n"
    "Exit status: 0 no problems, 1 the check could not run (or had internal\n"
    "errors), 2 corruptions remain, 3 only leaks remain, 63 the format has no\n"
    "consistency checks (raw); as every command: 64 a usage mistake, 74 an\n"
    "I/O error, 75 FILE is in use.\n"
    "\n"
    "Examples:\n"
    "  cbt check disk.qcow2\n"
    "  cbt check -r leaks --output=json disk.qcow2\n";

#define EXIT_CHECK_FAILED 1
#define EXIT_CORRUPT 2
#define EXIT_LEAKS 3
#define EXIT_UNSUPPORTED 63

struct check_args {
    const char *prog;
    const char *format;
    const char *filename;
    enum cli_output output;
    unsigned fix;
    bool quiet;
    bool force_share;
};

/* Returns 1 for --help, 0 to go on, -1 after a usage error. */
static int parse_args(int argc, char **argv, struct check_args *a)
{
    enum { OPT_OUTPUT = 256 };
    static const struct option longopts[] = {
        {"help", no_argument, NULL, 'h'},
        {"format", required_argument, NULL, 'f'},
        {"repair", required_argument, NULL, 'r'},
        {"output", required_argument, NULL, OPT_OUTPUT},
        {"force-share", no_argument, NULL, 'U'},
        {NULL, 0, NULL, 0},
    };
    int c;
    optind = 0;
    while ((c = getopt_long(argc, argv, "hf:r:qU", longopts, NULL)) != -1) {
        switch (c) {
        case 'h':
            return 1;
        case 'f':
            a->format = optarg;
            break;
        case 'r':
            if (strcmp(optarg, "leaks") == 0) {
                a->fix = CBT_CHECK_FIX_LEAKS;
            } else if (strcmp(optarg, "all") == 0) {
                a->fix = CBT_CHECK_FIX_LEAKS | CBT_CHECK_FIX_ERRORS;
            } else {
                cli_usage_error(a->prog,
                                "-r expects 'leaks' or 'all', not "
                                "'%s'",
                                optarg);
                return -1;
            }
            break;
        case 'q':
            a->quiet = true;
            break;
        case 'U':
            a->force_share = true;
            break;
        case OPT_OUTPUT:
            if (cli_parse_output(a->prog, optarg, &a->output) < 0)
                return -1;
            break;
        default:
            cli_bad_option(a->prog);
            return -1;
        }
    }
    return cli_take_filename(a->prog, argc, argv, &a->filename);
}

/* Messages about single problems go to stderr, as qemu-img's do. */
static void report(void *opaque, const char *msg)
{
    (void)opaque;
    size_t n = strlen(msg);
    fputs(msg, stderr);
    if (n == 0 || msg[n - 1] != '\n')
        fputc('\n', stderr);
}

static void print_human(const struct cbt_check_result *r)
{
    if (!r->corruptions && !r->leaks && !r->check_errors) {
        printf("No errors were found on the image.\n");
    } else {
        if (r->corruptions)
            printf("\n%" PRId64 " errors were found on the image.\n"
                   "Data may be corrupted, or further writes to the image "
                   "may corrupt it.\n",
                   r->corruptions);
        if (r->leaks)
            printf("\n%" PRId64 " leaked clusters were found on the image.\n"
                   "This means waste of disk space, but no harm to data.\n",
                   r->leaks);
        if (r->check_errors)
            printf("\n%" PRId64 " internal errors have occurred during the "
                   "check.\n",
                   r->check_errors);
    }
    if (r->total_clusters && r->allocated_clusters)
        printf("%" PRIu64 "/%" PRIu64 " = %0.2f%% allocated, %0.2f%% "
               "fragmented, %0.2f%% compressed clusters\n",
               r->allocated_clusters, r->total_clusters,
               (double)r->allocated_clusters * 100.0 /
                   (double)r->total_clusters,
               (double)r->fragmented_clusters * 100.0 /
                   (double)r->allocated_clusters,
               (double)r->compressed_clusters * 100.0 /
                   (double)r->allocated_clusters);
    if (r->image_end_offset)
        printf("Image end offset: %" PRIu64 "\n", r->image_end_offset);
}

/* qemu-img's ImageCheck: counters that are zero are left out, except
 * check-errors; the field order is the one qemu-img prints. */
static void print_json(const struct cbt_check_result *r, const char *filename,
                       const char *format)
{
    json_t *o = json_object();
    if (r->image_end_offset)
        json_object_set_new(o, "image-end-offset",
                            cli_json_u64(r->image_end_offset));
    if (r->compressed_clusters)
        json_object_set_new(o, "compressed-clusters",
                            cli_json_u64(r->compressed_clusters));
    if (r->total_clusters)
        json_object_set_new(o, "total-clusters",
                            cli_json_u64(r->total_clusters));
    if (r->corruptions)
        json_object_set_new(o, "corruptions", json_integer(r->corruptions));
    if (r->corruptions_fixed)
        json_object_set_new(o, "corruptions-fixed",
                            json_integer(r->corruptions_fixed));
    json_object_set_new(o, "check-errors", json_integer(r->check_errors));
    if (r->leaks)
        json_object_set_new(o, "leaks", json_integer(r->leaks));
    if (r->leaks_fixed)
        json_object_set_new(o, "leaks-fixed", json_integer(r->leaks_fixed));
    if (r->allocated_clusters)
        json_object_set_new(o, "allocated-clusters",
                            cli_json_u64(r->allocated_clusters));
    json_object_set_new(o, "filename", cli_json_string(filename));
    json_object_set_new(o, "format", cli_json_string(format));
    if (r->fragmented_clusters)
        json_object_set_new(o, "fragmented-clusters",
                            cli_json_u64(r->fragmented_clusters));
    cli_json_print(o);
}

/* Run one check pass; returns 0, or an exit status after printing. */
static int run_check(const struct check_args *a, unsigned fix,
                     struct cbt_check_result *res)
{
    struct cbt_error *err = NULL;
    if (a->force_share)
        fix |= CBT_CHECK_FORCE_SHARE;
    if (cbt_image_check(a->filename, a->format, fix, res, report, NULL,
                        &err) == 0)
        return 0;
    if (res->unsupported) {
        cbt_error_free(err);
        cli_error("This image format does not support checks");
        return EXIT_UNSUPPORTED;
    }
    cli_error("Check failed: %s%s", cbt_error_message(err), cli_advice(err));
    int status = cli_exit_status(err);
    cbt_error_free(err);
    return status;
}

/* Check (and repair); after a repair check again, as qemu-img does, and
 * report the second result with the first pass's repair counts. */
static int check_and_repair(const struct check_args *a,
                            struct cbt_check_result *res)
{
    int ret = run_check(a, a->fix, res);
    if (ret || (!res->corruptions_fixed && !res->leaks_fixed))
        return ret;
    int64_t leaks_fixed = res->leaks_fixed;
    int64_t corruptions_fixed = res->corruptions_fixed;
    if (a->output == CLI_OUTPUT_HUMAN && !a->quiet)
        printf("The following inconsistencies were found and repaired:\n\n"
               "    %" PRId64 " leaked clusters\n"
               "    %" PRId64 " corruptions\n\n"
               "Double checking the fixed image now...\n",
               leaks_fixed, corruptions_fixed);
    fflush(stdout);
    ret = run_check(a, 0, res);
    res->leaks_fixed = leaks_fixed;
    res->corruptions_fixed = corruptions_fixed;
    return ret;
}

static int check(const struct check_args *a)
{
    struct cbt_check_result res;
    int ret = check_and_repair(a, &res);
    if (ret == 0 && !a->quiet) {
        if (a->output == CLI_OUTPUT_JSON)
            print_json(&res, a->filename, res.format);
        else
            print_human(&res);
    }
    if (ret)
        return ret;
    if (res.check_errors) {
        fflush(stdout);
        cli_error("Check failed");
        return EXIT_CHECK_FAILED;
    }
    return res.corruptions ? EXIT_CORRUPT : res.leaks ? EXIT_LEAKS : 0;
}

int cmd_check(int argc, char **argv)
{
    struct check_args a = {.prog = argv[0], .output = CLI_OUTPUT_HUMAN};
    int r = parse_args(argc, argv, &a);
    if (r != 0)
        return r > 0 ? cli_help(usage) : CLI_EXIT_USAGE;
    return check(&a);
}
