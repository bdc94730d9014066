/* Helpers every command uses: error reporting, number parsing, formatting. */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include <getopt.h>

#include "cli.h"

void cli_try_help(const char *prog)
{
    fprintf(stderr, "Try '%s --help' for more information.\n", prog);
}

int cli_usage_error(const char *prog, const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "%s: ", prog);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    cli_try_help(prog);
    return CLI_EXIT_USAGE;
}

int cli_subcommand(const char *prog, int *argc, char ***argv,
                   const char *const *names, size_t n, const char *list,
                   int *sub)
{
    if (*argc < 2) {
        cli_usage_error(prog, "Expecting a subcommand: %s", list);
        return -1;
    }
    const char *arg = (*argv)[1];
    if (strcmp(arg, "-h") == 0 || strcmp(arg, "--help") == 0)
        return 1;
    size_t i = 0;
    while (i < n && strcmp(arg, names[i]) != 0)
        i++;
    if (i == n) {
        cli_usage_error(prog, "unknown subcommand '%s' (%s)", arg, list);
        return -1;
    }
    *sub = (int)i;
    (*argc)--;
    (*argv)++;
    return 0;
}

int cli_bad_option(const char *prog)
{
    cli_try_help(prog);
    return CLI_EXIT_USAGE;
}

void cli_error(const char *fmt, ...)
{
    va_list ap;
    fputs("cbt: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

static int kind_status(enum cbt_error_kind kind)
{
    switch (kind) {
    case CBT_ERR_USAGE:
        return CLI_EXIT_USAGE;
    case CBT_ERR_IN_USE:
        return CLI_EXIT_IN_USE;
    case CBT_ERR_NEED_FULL:
        return CLI_EXIT_NEED_FULL;
    case CBT_ERR_CORRUPT:
        return CLI_EXIT_CORRUPT;
    case CBT_ERR_IO:
        return CLI_EXIT_IO;
    case CBT_ERR_OTHER:
        break;
    }
    return CLI_EXIT_FAILURE;
}

int cli_exit_status(const struct cbt_error *err)
{
    return kind_status(cbt_error_kind(err));
}

int cli_errno_status(int errnum)
{
    return kind_status(cbt_errno_kind(errnum));
}

const char *cli_advice(const struct cbt_error *err)
{
    switch (cbt_error_remedy(err)) {
    case CBT_REMEDY_REPAIR:
        return " (repair: cbt check -r all)";
    case CBT_REMEDY_RECONCILE:
        return " (reconcile: cbt checkpoint reconcile --fix)";
    case CBT_REMEDY_WAIT:
        return "  Wait until it is done (cbt --wait); a running VM's disk is "
               "backed up and checkpointed through its QEMU: cbt "
               "backup|checkpoint --qmp QMP-SOCKET.";
    case CBT_REMEDY_WAIT_OR_SHARE:
        return "  Wait until it is done (cbt --wait); a running VM's disk is "
               "backed up and checkpointed through its QEMU: cbt "
               "backup|checkpoint --qmp QMP-SOCKET.  -U (--force-share) reads "
               "it anyway, as the holder last wrote it";
    case CBT_REMEDY_REMOVE_BITMAP:
        return "; try removing it (cbt bitmap --remove) to delete this bitmap "
               "from disk";
    case CBT_REMEDY_SHRINK:
        return " (--shrink)";
    case CBT_REMEDY_FULL_BACKUP:
        return " (--full, or --auto to fall back to one)";
    case CBT_REMEDY_FULL_OR_RESCAN:
        return " (--full, or --auto to fall back to one, or --rescan to "
               "compare the disk with its last backup instead)";
    case CBT_REMEDY_SWAP_DISK_TARGET:
        return "; the disk comes first: cbt backup ... DISK TARGET";
    case CBT_REMEDY_QCOW2_OR_COPY_ONLY:
        return "; back up a qcow2 disk (cbt convert -O qcow2), track it "
               "through a qcow2 metadata image (docs/cli.md, cbt create, "
               "data_file_raw), or take a copy-only backup (--full "
               "--no-checkpoint)";
    case CBT_REMEDY_NONE:
        break;
    }
    return "";
}

int cli_lib_error(struct cbt_error *err)
{
    cli_error("%s%s", err ? cbt_error_message(err) : "unknown error",
              cli_advice(err));
    int status = cli_exit_status(err);
    cbt_error_free(err);
    return status;
}

int cli_help(const char *text)
{
    fputs(text, stdout);
    return 0;
}

static int parse_hex(const char *s, uint64_t *out)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s + 2, &end, 16);
    if (end == s + 2 || *end != '\0')
        return -EINVAL;
    if (errno == ERANGE)
        return -ERANGE;
    *out = v;
    return 0;
}

int cli_parse_size(const char *s, uint64_t *out)
{
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X'))
        return parse_hex(s, out);
    return cbt_parse_size(s, out);
}

int cli_parse_size_arg(const char *prog, const char *what, const char *s,
                       uint64_t *out)
{
    int r = cli_parse_size(s, out);
    if (r == 0 && *out > INT64_MAX)
        r = -ERANGE;
    if (r == -ERANGE) {
        cli_usage_error(prog, "%s '%s' is too large (at most 8 EiB - 1)", what,
                        s);
        return -1;
    }
    if (r < 0) {
        cli_usage_error(prog,
                        "invalid %s '%s' (a number of bytes, optionally with "
                        "a k, M, G, T, P or E suffix)",
                        what, s);
        return -1;
    }
    return 0;
}

int cli_parse_output(const char *prog, const char *arg, enum cli_output *out)
{
    if (strcmp(arg, "human") == 0) {
        *out = CLI_OUTPUT_HUMAN;
    } else if (strcmp(arg, "json") == 0) {
        *out = CLI_OUTPUT_JSON;
    } else {
        cli_usage_error(prog, "--output must be 'human' or 'json', not '%s'",
                        arg);
        return -1;
    }
    return 0;
}

void cli_size_to_str(uint64_t val, char *buf, size_t len)
{
    static const char *const suffixes[] = {"",   "Ki", "Mi", "Gi",
                                           "Ti", "Pi", "Ei"};
    /*
     * As qemu: pick the unit so that the number shown is below 1000,
     * i.e. the largest i with 1024^i <= val * 1024 / 1000.
     */
    double x = (double)val * 1.024;
    double unit = 1;
    int i = 0;
    while (i < 6 && x >= unit * 1024) {
        unit *= 1024;
        i++;
    }
    snprintf(buf, len, "%0.3g %sB", (double)val / unit, suffixes[i]);
}

int cli_take_filename(const char *prog, int argc, char **argv,
                      const char **filename)
{
    if (optind >= argc) {
        cli_usage_error(prog, "missing image file name");
        return -1;
    }
    *filename = argv[optind++];
    if (optind < argc) {
        cli_usage_error(prog, "unexpected argument '%s'", argv[optind]);
        return -1;
    }
    return 0;
}

void cli_warn(void *opaque, const char *msg)
{
    (void)opaque;
    fprintf(stderr, "warning: %s\n", msg);
}

struct cbt_image *cli_open(const char *filename, const char *format,
                           unsigned flags, struct cbt_error **errp)
{
    struct cbt_open_opts o = CBT_OPEN_OPTS_INIT;
    o.format = format;
    o.flags = flags;
    o.warn = cli_warn;
    return cbt_image_open_with(filename, &o, errp);
}
