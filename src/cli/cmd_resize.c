/* cbt resize: change the virtual size of an image, as qemu-img resize. */
#include <getopt.h>
#include <inttypes.h>
#include <string.h>

#include "cli.h"

static const char usage[] =
    "Usage: cbt resize [--shrink] [-f FMT] [-q] FILE [+|-]SIZE\n"
    "\n"
    "Set the virtual size of FILE to SIZE, or grow (+SIZE) or shrink (-SIZE)\n"
    "it by that much.  Suffixes k, M, G, T, P, E are powers of 1024.\n"
    "Shrinking discards the data past the new end and needs --shrink.\n"
    "\n"
    "Options:\n"
    "  --shrink      allow the image to get smaller\n"
    "  -f FMT        format of FILE (default: probe)\n"
    "  -q            quiet: do not print 'Image resized.'\n"
    "  -h, --help    show this help\n"
    "\n"
    "Examples:\n"
    "  cbt resize disk.qcow2 +10G\n"
    "  cbt resize --shrink disk.qcow2 -- -1G\n";

struct resize_args {
    const char *prog;
    const char *format;
    const char *filename;
    const char *size_arg;
    bool shrink;
    bool quiet;
};

/* A relative size such as "-1G" would look like an option to getopt; take
 * it off the end of argv first, as qemu-img does. */
static bool looks_like_relative_size(const char *s)
{
    return (s[0] == '-' || s[0] == '+') &&
           ((s[1] >= '0' && s[1] <= '9') || s[1] == '.');
}

/* Returns 1 for --help, 0 to go on, -1 after a usage error. */
static int parse_args(int argc, char **argv, struct resize_args *a)
{
    enum { OPT_SHRINK = 256 };
    static const struct option longopts[] = {
        {"help", no_argument, NULL, 'h'},
        {"format", required_argument, NULL, 'f'},
        {"shrink", no_argument, NULL, OPT_SHRINK},
        {NULL, 0, NULL, 0},
    };
    if (argc >= 3 && looks_like_relative_size(argv[argc - 1]))
        a->size_arg = argv[--argc];
    int c;
    optind = 0;
    while ((c = getopt_long(argc, argv, "hf:q", longopts, NULL)) != -1) {
        switch (c) {
        case 'h':
            return 1;
        case 'f':
            a->format = optarg;
            break;
        case 'q':
            a->quiet = true;
            break;
        case OPT_SHRINK:
            a->shrink = true;
            break;
        default:
            cli_bad_option(a->prog);
            return -1;
        }
    }
    if (optind >= argc) {
        cli_usage_error(a->prog, "missing image file name");
        return -1;
    }
    a->filename = argv[optind++];
    if (!a->size_arg && optind < argc)
        a->size_arg = argv[optind++];
    if (optind < argc) {
        cli_usage_error(a->prog, "unexpected argument '%s'", argv[optind]);
        return -1;
    }
    if (!a->size_arg) {
        cli_usage_error(a->prog, "missing size for '%s'", a->filename);
        return -1;
    }
    return 0;
}

/* The new size from "[+|-]SIZE" and the current size; -1 after an error. */
static int new_size(const struct resize_args *a, uint64_t cur, uint64_t *out)
{
    const char *s = a->size_arg;
    int sign = 0;
    if (*s == '+' || *s == '-')
        sign = *s++ == '+' ? 1 : -1;
    uint64_t n;
    if (cli_parse_size_arg(a->prog, "size", s, &n) < 0)
        return -1;
    if (sign > 0 && (n > INT64_MAX - cur)) {
        cli_error("%s: New image size is too large", a->filename);
        return -1;
    }
    uint64_t size = sign > 0 ? cur + n : sign < 0 ? cur - n : n;
    if ((sign < 0 && n >= cur) || size == 0) {
        cli_error("%s: New image size must be positive", a->filename);
        return -1;
    }
    *out = size;
    return 0;
}

static int resize(struct cbt_image *img, const struct resize_args *a)
{
    uint64_t cur = cbt_image_size(img), size;
    if (new_size(a, cur, &size) < 0)
        return CLI_EXIT_USAGE;
    if (size < cur && !a->shrink) {
        cli_error("%s: Use the --shrink option to perform a shrink "
                  "operation.",
                  a->filename);
        cli_error("warning: Shrinking an image will delete all data beyond "
                  "the shrunken image's end. Before performing such an "
                  "operation, make sure there is no important data there.");
        return CLI_EXIT_USAGE;
    }
    struct cbt_error *err = NULL;
    if (cbt_image_resize(img, size, a->shrink, &err) < 0)
        return cli_lib_error(err);
    return 0;
}

int cmd_resize(int argc, char **argv)
{
    struct resize_args a = {.prog = argv[0]};
    int r = parse_args(argc, argv, &a);
    if (r != 0)
        return r > 0 ? cli_help(usage) : CLI_EXIT_USAGE;

    struct cbt_error *err = NULL;
    struct cbt_image *img =
        cli_open(a.filename, a.format, CBT_OPEN_RDWR, &err);
    if (!img)
        return cli_lib_error(err);
    int ret = resize(img, &a);
    if (cbt_image_close(img, ret ? NULL : &err) < 0 && ret == 0)
        ret = cli_lib_error(err);
    if (ret == 0 && !a.quiet)
        printf("Image resized.\n");
    return ret;
}
