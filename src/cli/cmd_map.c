/* cbt map: the allocation of an image as extents, merged and printed the way
 * qemu-img map does (human table or JSON lines). */
#include <getopt.h>
#include <inttypes.h>
#include <string.h>

#include "cli.h"

static const char usage[] =
    "Usage: cbt map [-f FMT] [--output=human|json] [--start-offset OFF]\n"
    "               [--max-length LEN] FILE\n"
    "\n"
    "Show how the guest-visible range of FILE maps to its backing chain and\n"
    "host files.  JSON lists every extent with start, length, depth\n"
    "(0 = FILE, 1 = its backing file, ...), present, zero, data and the host\n"
    "offset when there is one; the human table lists only extents holding\n"
    "data.\n"
    "\n"
    "Options:\n"
    "  -f FMT              format of FILE (default: probe)\n"
    "  --output=FMT        human (default) or json\n"
    "  -s, --start-offset OFF  first byte to map (default 0)\n"
    "  -l, --max-length LEN    map at most LEN bytes\n"
    "  -U, --force-share   map an image another process holds for writing\n"
    "                      (its state as that process last wrote it)\n"
    "  -h, --help          show this help\n"
    "\n"
    "Examples:\n"
    "  cbt map disk.qcow2\n"
    "  cbt map --output=json --start-offset 1G --max-length 64M top.qcow2\n";

/* qemu-img map asks about at most this much at a time. */
#define MAP_PROBE_MAX (1ULL << 30)

struct map_entry {
    uint64_t start;
    uint64_t length;
    uint64_t offset;
    int depth;
    bool present, zero, data, has_offset;
    const char *filename; /* owned by the open image */
};

struct map_args {
    const char *prog;
    const char *format;
    const char *filename;
    enum cli_output output;
    uint64_t start;
    uint64_t max_length;
    bool has_max_length;
    bool force_share;
};

static void entry_from_extent(const struct cbt_extent *e, struct map_entry *m)
{
    *m = (struct map_entry){
        .start = e->start,
        .length = e->length,
        .depth = e->depth,
        .present = e->flags & CBT_BS_PRESENT,
        .zero = e->flags & CBT_BS_ZERO,
        .data = e->flags & CBT_BS_DATA,
        .has_offset = e->flags & CBT_BS_OFFSET_VALID,
    };
    if (m->has_offset) {
        m->offset = e->offset;
        m->filename = e->filename;
    }
}

/* qemu-img's entry_mergeable(). */
static bool mergeable(const struct map_entry *cur, const struct map_entry *next)
{
    if (cur->length == 0)
        return false;
    if (cur->zero != next->zero || cur->data != next->data ||
        cur->depth != next->depth || cur->present != next->present ||
        !cur->filename != !next->filename ||
        cur->has_offset != next->has_offset)
        return false;
    if (cur->filename && strcmp(cur->filename, next->filename) != 0)
        return false;
    if (cur->has_offset && cur->offset + cur->length != next->offset)
        return false;
    return true;
}

/* Print one entry; `next` (NULL for the last) may be adjusted as qemu-img
 * does for the human table.  Returns 0, or -1 after printing an error. */
static int dump_entry(enum cli_output out, const struct map_entry *e,
                      struct map_entry *next)
{
    if (out == CLI_OUTPUT_JSON) {
        printf("{ \"start\": %" PRIu64 ", \"length\": %" PRIu64
               ", \"depth\": %d, \"present\": %s, \"zero\": %s, \"data\": %s",
               e->start, e->length, e->depth, e->present ? "true" : "false",
               e->zero ? "true" : "false", e->data ? "true" : "false");
        if (e->has_offset)
            printf(", \"offset\": %" PRIu64, e->offset);
        putchar('}');
        if (next)
            puts(",");
        return 0;
    }
    if (e->data && !e->has_offset) {
        fflush(stdout);
        cli_error("File contains external, encrypted or compressed clusters.");
        return -1;
    }
    if (e->data && !e->zero)
        printf("%#-16" PRIx64 "%#-16" PRIx64 "%#-16" PRIx64 "%s\n", e->start,
               e->length, e->has_offset ? e->offset : 0,
               e->filename ? e->filename : "");
    /* The table ignores the difference between hole, zero and zero data:
     * fold them together so that more entries merge. */
    if (next && (!next->data || next->zero)) {
        next->data = false;
        next->zero = true;
    }
    return 0;
}

/* qemu-img map's loop: walk [start, end), merge, print. */
static int map_image(struct cbt_image *img, const struct map_args *a)
{
    uint64_t size = cbt_image_size(img);
    uint64_t end = size;
    if (a->has_max_length && a->start + a->max_length < end)
        end = a->start + a->max_length;
    if (a->output == CLI_OUTPUT_JSON)
        putchar('[');
    else
        printf("%-16s%-16s%-16s%s\n", "Offset", "Length", "Mapped to", "File");

    struct map_entry cur = {.start = a->start}, next;
    while (cur.start + cur.length < end) {
        uint64_t off = cur.start + cur.length;
        uint64_t n = end - off < MAP_PROBE_MAX ? end - off : MAP_PROBE_MAX;
        struct cbt_extent ext;
        int r = cbt_image_block_status(img, off, n, &ext);
        if (r < 0) {
            fflush(stdout);
            cli_error("Could not read file metadata: %s, guest offset %#"
                      PRIx64 ": %s", a->filename, off, strerror(-r));
            return cli_errno_status(r);
        }
        entry_from_extent(&ext, &next);
        if (mergeable(&cur, &next)) {
            cur.length += next.length;
            continue;
        }
        if (cur.length > 0 && dump_entry(a->output, &cur, &next) < 0)
            return CLI_EXIT_FAILURE;
        cur = next;
    }
    if (dump_entry(a->output, &cur, NULL) < 0)
        return CLI_EXIT_FAILURE;
    if (a->output == CLI_OUTPUT_JSON)
        puts("]");
    return 0;
}

/* Returns 1 for --help, 0 to go on, -1 after a usage error. */
static int parse_args(int argc, char **argv, struct map_args *a)
{
    enum { OPT_OUTPUT = 256 };
    static const struct option longopts[] = {
        {"help", no_argument, NULL, 'h'},
        {"format", required_argument, NULL, 'f'},
        {"output", required_argument, NULL, OPT_OUTPUT},
        {"start-offset", required_argument, NULL, 's'},
        {"max-length", required_argument, NULL, 'l'},
        {"force-share", no_argument, NULL, 'U'},
        {NULL, 0, NULL, 0},
    };
    int c;
    optind = 0;
    while ((c = getopt_long(argc, argv, "hf:s:l:U", longopts, NULL)) != -1) {
        switch (c) {
        case 'h':
            return 1;
        case 'f':
            a->format = optarg;
            break;
        case 'U':
            a->force_share = true;
            break;
        case 's':
            if (cli_parse_size_arg(a->prog, "start offset", optarg, &a->start) <
                0)
                return -1;
            break;
        case 'l':
            if (cli_parse_size_arg(a->prog, "max length", optarg,
                                   &a->max_length) < 0)
                return -1;
            a->has_max_length = true;
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

int cmd_map(int argc, char **argv)
{
    struct map_args a = {.prog = argv[0], .output = CLI_OUTPUT_HUMAN};
    int r = parse_args(argc, argv, &a);
    if (r != 0)
        return r > 0 ? cli_help(usage) : CLI_EXIT_USAGE;

    struct cbt_error *err = NULL;
    struct cbt_image *img = cli_open(
        a.filename, a.format, a.force_share ? CBT_OPEN_FORCE_SHARE : 0, &err);
    if (!img)
        return cli_lib_error(err);
    int ret = map_image(img, &a);
    cbt_image_close(img, NULL);
    return ret;
}
