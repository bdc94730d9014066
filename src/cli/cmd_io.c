/*
 * cbt io: qemu-io's command language (read, write, discard, flush) on one
 * open image, from -c arguments or from stdin, one command per line.
 *
 * Each command must be cheap, as benchmarks pipe 100,000 of them: the image
 * is opened once, one I/O buffer is reused (grown up to IO_CHUNK and never
 * past it: longer requests are split), and a write buffer keeps its pattern
 * so it is not refilled for every command.  Output and messages follow
 * qemu-io 7.2 byte for byte; a failing command does not stop the following
 * ones, but makes the exit status 1.
 */
#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cli.h"

static const char usage[] =
    "Usage: cbt io [-f FMT] [-r] [-c COMMAND]... FILE\n"
    "\n"
    "Run qemu-io style commands on FILE.  Without -c, commands are read from\n"
    "stdin, one per line (blank lines and lines starting with # are skipped).\n"
    "\n"
    "Options:\n"
    "  -f FMT        format of FILE (default: probe)\n"
    "  -r            open read-only\n"
    "  -c COMMAND    run COMMAND (repeatable; run in order)\n"
    "  -U            read FILE although another process holds it for\n"
    "                writing (with -r only; its state as last written)\n"
    "  -n, -k, -t CACHE, -d DISCARD, -i AIO\n"
    "                accepted for qemu-io compatibility (no effect)\n"
    "  -h, --help    show this help\n"
    "\n"
    "Commands (OFF and LEN take k, M, G, T, P, E suffixes or 0x hex):\n"
    "  read [-qv] [-P PATTERN [-s OFF] [-l LEN]] OFF LEN\n"
    "        read; with -P every byte must equal PATTERN (decimal or 0x hex);\n"
    "        -s/-l restrict the check to a part of the range; -v hex dump\n"
    "  write [-cq] [-P PATTERN | -z [-u]] OFF LEN\n"
    "        write PATTERN (default 0xcd); -z writes zeroes, -u lets zeroed\n"
    "        clusters be deallocated; -c stores whole clusters compressed\n"
    "        (OFF and LEN cluster-aligned, or LEN reaching the end)\n"
    "  discard [-q] OFF LEN    discard (unmap) a range\n"
    "  flush                   write everything to stable storage\n"
    "  help, quit\n"
    "  -q (all commands): print nothing on success\n"
    "\n"
    "Exit status: 0 when every command succeeded, 1 otherwise.\n"
    "\n"
    "Examples:\n"
    "  cbt io -c 'write -P 0xab 0 64k' -c 'read -P 0xab 0 64k' disk.qcow2\n"
    "  printf 'write 0 4k\\nflush\\n' | cbt io disk.qcow2\n";

/* Largest single library request; longer commands are split. */
#define IO_CHUNK (4u << 20)
#define IO_MAX_ARGS 64
#define DEFAULT_PATTERN 0xcd

struct io_ctx {
    struct cbt_image *img;
    uint64_t size;
    bool read_only;
    bool quit;
    uint8_t *buf;
    size_t buf_size;
    int buf_pattern; /* byte the whole buffer holds, or -1 */
    uint32_t cluster_size; /* for write -c: 0 until first needed */
};

struct io_cmd {
    const char *name;
    const char *altname;
    int (*fn)(struct io_ctx *ctx, int argc, char **argv);
    int argmin, argmax; /* argmax -1: no limit */
    bool writes;
    const char *args;
    const char *oneline;
};

/* ---- qemu-io's number formatting (cvtstr, timestr, print_report) ---- */

static void cvtstr(double value, char *str, size_t size)
{
    static const struct {
        double unit;
        const char *suffix;
    } units[] = {
        {1152921504606846976.0, " EiB"},
        {1125899906842624.0, " PiB"},
        {1099511627776.0, " TiB"},
        {1073741824.0, " GiB"},
        {1048576.0, " MiB"},
        {1024.0, " KiB"},
    };
    const char *suffix = " bytes";
    snprintf(str, size - 6, "%f", value);
    for (size_t i = 0; i < sizeof(units) / sizeof(units[0]); i++) {
        if (value >= units[i].unit) {
            suffix = units[i].suffix;
            snprintf(str, size - 4, "%.3f", value / units[i].unit);
            break;
        }
    }
    char *trim = strstr(str, ".000");
    if (trim)
        strcpy(trim, suffix);
    else
        strcat(str, suffix);
}

static void timestr(const struct timespec *t, char *ts, size_t size)
{
    double frac = (double)t->tv_nsec / 1e9;
    unsigned long secs = (unsigned long)t->tv_sec;
    if (secs)
        snprintf(ts, size, "%lu:%02lu:%05.2f", secs / 3600, secs / 60 % 60,
                 (double)(secs % 60) + frac);
    else
        snprintf(ts, size, "%05.2f sec", frac);
}

static struct timespec now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t;
}

static void print_report(const char *op, struct timespec t1, uint64_t offset,
                         uint64_t count)
{
    struct timespec t2 = now(), t = {
                                    .tv_sec = t2.tv_sec - t1.tv_sec,
                                    .tv_nsec = t2.tv_nsec - t1.tv_nsec,
                                };
    if (t.tv_nsec < 0) {
        t.tv_sec--;
        t.tv_nsec += 1000000000;
    }
    double secs = (double)t.tv_sec + (double)t.tv_nsec / 1e9;
    if (secs <= 0)
        secs = 1e-9;
    char s1[64], s2[64], ts[64];
    timestr(&t, ts, sizeof(ts));
    cvtstr((double)count, s1, sizeof(s1));
    cvtstr((double)count / secs, s2, sizeof(s2));
    printf("%s %" PRIu64 "/%" PRIu64 " bytes at offset %" PRIu64 "\n", op,
           count, count, offset);
    printf("%s, %d ops; %s (%s/sec and %.4f ops/sec)\n", s1, 1, ts, s2,
           1.0 / secs);
}

static void dump_buffer(const uint8_t *p, uint64_t offset, size_t len)
{
    for (size_t i = 0; i < len; i += 16) {
        size_t n = len - i < 16 ? len - i : 16;
        printf("%08" PRIx64 ":  ", offset + i);
        for (size_t j = 0; j < n; j++)
            printf("%02x ", p[i + j]);
        putchar(' ');
        for (size_t j = 0; j < n; j++)
            putchar(isalnum(p[i + j]) ? p[i + j] : '.');
        putchar('\n');
    }
}

/* ---- argument helpers ---- */

static const struct io_cmd *cmd_by_name(const char *name);

static int cmd_usage(const char *name)
{
    const struct io_cmd *c = cmd_by_name(name);
    printf("%s %s -- %s\n", c->name, c->args, c->oneline);
    return -EINVAL;
}

/* qemu-io's cvtnum plus its error messages (on stdout, as qemu-io). */
static int parse_num(const char *s, uint64_t *out)
{
    int r = cli_parse_size(s, out);
    if (r == 0 && *out > INT64_MAX)
        r = -ERANGE;
    if (r == -ERANGE)
        printf("Parsing error: argument too large -- %s\n", s);
    else if (r < 0)
        printf("Parsing error: non-numeric argument, or extraneous/"
               "unrecognized suffix -- %s\n",
               s);
    return r;
}

static int parse_pattern(const char *s)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 0);
    if (errno || end == s || *end || v < 0 || v > UCHAR_MAX) {
        printf("%s is not a valid pattern byte\n", s);
        return -1;
    }
    return (int)v;
}

/* Parse "OFF LEN" at argv[optind..] and check the range lies in the image.
 * Returns 0, -EINVAL after a parse message, or -EIO for a bad range (the
 * caller reports it as qemu-io does). */
static int parse_range(struct io_ctx *ctx, char **argv, uint64_t *off,
                       uint64_t *len)
{
    int r = parse_num(argv[optind], off);
    if (r == 0)
        r = parse_num(argv[optind + 1], len);
    if (r < 0)
        return r;
    if (*off > ctx->size || *len > ctx->size - *off)
        return -EIO;
    return 0;
}

/* The I/O buffer, at least min(len, IO_CHUNK) bytes; NULL when out of
 * memory.  Its contents are kept (see buf_pattern). */
static uint8_t *get_buf(struct io_ctx *ctx, uint64_t len)
{
    size_t want = len < IO_CHUNK ? (size_t)len : IO_CHUNK;
    if (want == 0)
        want = 1;
    if (want <= ctx->buf_size)
        return ctx->buf;
    size_t n = ctx->buf_size ? ctx->buf_size : 4096;
    while (n < want)
        n *= 2;
    uint8_t *b = realloc(ctx->buf, n);
    if (!b)
        return NULL;
    ctx->buf = b;
    ctx->buf_size = n;
    ctx->buf_pattern = -1;
    return b;
}

static bool all_bytes(const uint8_t *p, size_t n, int pattern)
{
    return n == 0 || (p[0] == pattern && memcmp(p, p + 1, n - 1) == 0);
}

/* ---- commands ---- */

struct read_opts {
    bool quiet, verbose, pflag, sflag, lflag;
    int pattern;
    uint64_t poff, plen; /* the part of the range checked against pattern */
};

/* Read [off, off+len) chunk by chunk; check the pattern; set *mismatch.
 * With -v and a single chunk, the buffer holds the data afterwards. */
static int do_read(struct io_ctx *ctx, const struct read_opts *o, uint64_t off,
                   uint64_t len, bool *mismatch)
{
    uint8_t *buf = get_buf(ctx, len);
    if (!buf)
        return -ENOMEM;
    ctx->buf_pattern = -1;
    for (uint64_t done = 0; done < len;) {
        size_t n = len - done < IO_CHUNK ? (size_t)(len - done) : IO_CHUNK;
        int r = cbt_image_pread(ctx->img, buf, n, off + done);
        if (r < 0)
            return r;
        if (o->pflag && !*mismatch) {
            uint64_t lo = o->poff > done ? o->poff : done;
            uint64_t hi =
                o->poff + o->plen < done + n ? o->poff + o->plen : done + n;
            if (lo < hi &&
                !all_bytes(buf + (lo - done), (size_t)(hi - lo), o->pattern))
                *mismatch = true;
        }
        done += n;
    }
    return 0;
}

/* -v on a read longer than one chunk: read it again to dump it. */
static int dump_range(struct io_ctx *ctx, uint64_t off, uint64_t len)
{
    for (uint64_t done = 0; done < len;) {
        size_t n = len - done < IO_CHUNK ? (size_t)(len - done) : IO_CHUNK;
        int r = cbt_image_pread(ctx->img, ctx->buf, n, off + done);
        if (r < 0)
            return r;
        dump_buffer(ctx->buf, off + done, n);
        done += n;
    }
    return 0;
}

static int parse_read_opts(int argc, char **argv, struct read_opts *o)
{
    int c;
    optind = 0;
    while ((c = getopt(argc, argv, "P:qs:l:v")) != -1) {
        switch (c) {
        case 'P':
            o->pflag = true;
            if ((o->pattern = parse_pattern(optarg)) < 0)
                return -EINVAL;
            break;
        case 'q':
            o->quiet = true;
            break;
        case 's':
            o->sflag = true;
            if (parse_num(optarg, &o->poff) < 0)
                return -EINVAL;
            break;
        case 'l':
            o->lflag = true;
            if (parse_num(optarg, &o->plen) < 0)
                return -EINVAL;
            break;
        case 'v':
            o->verbose = true;
            break;
        default:
            return cmd_usage("read");
        }
    }
    if (optind != argc - 2 || (!o->pflag && (o->sflag || o->lflag)))
        return cmd_usage("read");
    return 0;
}

static int read_f(struct io_ctx *ctx, int argc, char **argv)
{
    struct read_opts o = {.pattern = 0};
    uint64_t off, len;
    int r = parse_read_opts(argc, argv, &o);
    if (r < 0)
        return r;
    r = parse_range(ctx, argv, &off, &len);
    if (r == -EINVAL)
        return r;
    if (!o.lflag)
        o.plen = len - (o.poff < len ? o.poff : len);
    if (o.pflag && (o.poff > len || o.plen > len - o.poff)) {
        printf("pattern verification range exceeds end of read data\n");
        return -EINVAL;
    }
    struct timespec t1 = now();
    bool mismatch = false;
    if (r == 0)
        r = do_read(ctx, &o, off, len, &mismatch);
    if (r < 0) {
        printf("read failed: %s\n", strerror(-r));
        return r;
    }
    if (mismatch) {
        printf("Pattern verification failed at offset %" PRIu64 ", %" PRIu64
               " bytes\n",
               off + o.poff, o.plen);
        r = -EINVAL;
    }
    if (o.quiet)
        return r;
    if (o.verbose) {
        if (len <= IO_CHUNK)
            dump_buffer(ctx->buf, off, (size_t)len);
        else if (dump_range(ctx, off, len) < 0)
            r = -EIO;
    }
    print_report("read", t1, off, len);
    return r;
}

/* A compressed write longer than one chunk is checked as a whole first,
 * so a bad end fails it before any chunk is written (as qemu-io). */
static int check_compressed_range(struct io_ctx *ctx, uint64_t off,
                                  uint64_t len)
{
    if (len <= IO_CHUNK)
        return 0; /* one library call checks it */
    if (!ctx->cluster_size) {
        struct cbt_image_info info;
        struct cbt_error *err = NULL;
        if (cbt_image_get_info(ctx->img, &info, &err) < 0) {
            int r = -cbt_error_errno(err);
            cbt_error_free(err);
            return r < 0 ? r : -EIO;
        }
        ctx->cluster_size = info.cluster_size;
        cbt_image_info_free(&info);
    }
    uint64_t cs = ctx->cluster_size;
    if (cs == 0)
        return -ENOTSUP;
    if (off % cs || (len % cs && off + len != ctx->size))
        return -EINVAL;
    return 0;
}

/* Write `pattern` over [off, off+len) in chunks of the shared buffer;
 * compressed: whole clusters (IO_CHUNK is a multiple of every cluster
 * size). */
static int do_write(struct io_ctx *ctx, int pattern, uint64_t off, uint64_t len,
                    bool compressed)
{
    if (compressed) {
        int r = check_compressed_range(ctx, off, len);
        if (r < 0)
            return r;
    }
    uint8_t *buf = get_buf(ctx, len);
    if (!buf)
        return -ENOMEM;
    if (ctx->buf_pattern != pattern) {
        memset(buf, pattern, ctx->buf_size);
        ctx->buf_pattern = pattern;
    }
    for (uint64_t done = 0; done < len;) {
        size_t n = len - done < IO_CHUNK ? (size_t)(len - done) : IO_CHUNK;
        int r = compressed
                    ? cbt_image_pwrite_compressed(ctx->img, buf, n, off + done)
                    : cbt_image_pwrite(ctx->img, buf, n, off + done);
        if (r < 0)
            return r;
        done += n;
    }
    return 0;
}

static int write_f(struct io_ctx *ctx, int argc, char **argv)
{
    bool quiet = false, zero = false, unmap = false, pflag = false;
    bool compressed = false;
    int pattern = DEFAULT_PATTERN, c;
    optind = 0;
    while ((c = getopt(argc, argv, "cP:quz")) != -1) {
        switch (c) {
        case 'c':
            compressed = true;
            break;
        case 'P':
            pflag = true;
            if ((pattern = parse_pattern(optarg)) < 0)
                return -EINVAL;
            break;
        case 'q':
            quiet = true;
            break;
        case 'u':
            unmap = true;
            break;
        case 'z':
            zero = true;
            break;
        default:
            return cmd_usage("write");
        }
    }
    if (optind != argc - 2)
        return cmd_usage("write");
    if (zero && pflag) {
        printf(
            "Only one of -z, -P, and -s can be specified at the same time\n");
        return -EINVAL;
    }
    if (unmap && !zero) {
        printf("-u requires -z to be specified\n");
        return -EINVAL;
    }
    uint64_t off, len;
    int r = parse_range(ctx, argv, &off, &len);
    if (r == -EINVAL)
        return r;
    if (compressed && off % 512) {
        printf("%" PRIu64 " is not a sector-aligned value for 'offset'\n", off);
        return -EINVAL;
    }
    if (compressed && len % 512) {
        printf("%" PRIu64 " is not a sector-aligned value for 'count'\n", len);
        return -EINVAL;
    }
    struct timespec t1 = now();
    /* -z wins over -c, as in qemu-io. */
    if (r == 0 && zero)
        r = cbt_image_pwrite_zeroes(ctx->img, off, len,
                                    unmap ? CBT_ZERO_MAY_UNMAP : 0);
    else if (r == 0)
        r = do_write(ctx, pattern, off, len, compressed && len > 0);
    if (r < 0) {
        printf("write failed: %s\n", strerror(-r));
        return r;
    }
    if (!quiet)
        print_report("wrote", t1, off, len);
    return 0;
}

static int discard_f(struct io_ctx *ctx, int argc, char **argv)
{
    bool quiet = false;
    int c;
    optind = 0;
    while ((c = getopt(argc, argv, "q")) != -1) {
        if (c != 'q')
            return cmd_usage("discard");
        quiet = true;
    }
    if (optind != argc - 2)
        return cmd_usage("discard");
    uint64_t off, len;
    int r = parse_range(ctx, argv, &off, &len);
    if (r == -EINVAL)
        return r;
    struct timespec t1 = now();
    if (r == 0)
        r = cbt_image_discard(ctx->img, off, len);
    if (r < 0) {
        printf("discard failed: %s\n", strerror(-r));
        return r;
    }
    if (!quiet)
        print_report("discard", t1, off, len);
    return 0;
}

static int flush_f(struct io_ctx *ctx, int argc, char **argv)
{
    (void)argc;
    (void)argv;
    int r = cbt_image_flush(ctx->img);
    if (r < 0)
        printf("flush failed: %s\n", strerror(-r));
    return r;
}

static int quit_f(struct io_ctx *ctx, int argc, char **argv)
{
    (void)argc;
    (void)argv;
    ctx->quit = true;
    return 0;
}

static int help_f(struct io_ctx *ctx, int argc, char **argv);

static const struct io_cmd io_cmds[] = {
    {"read", "r", read_f, 2, -1, false,
     "[-qv] [-P pattern [-s off] [-l len]] off len",
     "reads a number of bytes at a specified offset"},
    {"write", "w", write_f, 2, -1, true, "[-cquz] [-P pattern] off len",
     "writes a number of bytes at a specified offset"},
    {"discard", "d", discard_f, 2, -1, true, "[-q] off len",
     "discards a number of bytes at a specified offset"},
    {"flush", "f", flush_f, 0, 0, false, "",
     "flush all in-core file state to disk"},
    {"help", "?", help_f, 0, 1, false, "[command]",
     "help for one or all commands"},
    {"quit", "q", quit_f, 0, 0, false, "", "exit the program"},
};

#define N_IO_CMDS (sizeof(io_cmds) / sizeof(io_cmds[0]))

static const struct io_cmd *cmd_by_name(const char *name)
{
    for (size_t i = 0; i < N_IO_CMDS; i++)
        if (strcmp(io_cmds[i].name, name) == 0 ||
            strcmp(io_cmds[i].altname, name) == 0)
            return &io_cmds[i];
    return NULL;
}

static int help_f(struct io_ctx *ctx, int argc, char **argv)
{
    (void)ctx;
    if (argc == 2) {
        const struct io_cmd *c = cmd_by_name(argv[1]);
        if (!c) {
            printf("command %s not found\n", argv[1]);
            return -EINVAL;
        }
        printf("%s %s -- %s\n", c->name, c->args, c->oneline);
        return 0;
    }
    for (size_t i = 0; i < N_IO_CMDS; i++)
        printf("%s (or %s) %s -- %s\n", io_cmds[i].name, io_cmds[i].altname,
               io_cmds[i].args, io_cmds[i].oneline);
    return 0;
}

/* ---- the command loop ---- */

static bool check_argc(const struct io_cmd *c, int argc)
{
    int n = argc - 1;
    if (n >= c->argmin && (c->argmax == -1 || n <= c->argmax))
        return true;
    if (c->argmax == -1)
        fprintf(stderr,
                "bad argument count %d to %s, expected at least %d "
                "arguments\n",
                n, c->name, c->argmin);
    else if (c->argmin == c->argmax)
        fprintf(stderr,
                "bad argument count %d to %s, expected %d "
                "arguments\n",
                n, c->name, c->argmin);
    else
        fprintf(stderr,
                "bad argument count %d to %s, expected between %d "
                "and %d arguments\n",
                n, c->name, c->argmin, c->argmax);
    return false;
}

/* Run one command line (modified in place).  Returns 0 or -errno. */
static int run_line(struct io_ctx *ctx, char *line)
{
    char *argv[IO_MAX_ARGS + 1];
    int argc = 0;
    char *save = NULL;
    for (char *tok = strtok_r(line, " \t\r\n", &save); tok;
         tok = strtok_r(NULL, " \t\r\n", &save)) {
        if (argc == IO_MAX_ARGS) {
            fprintf(stderr, "too many arguments\n");
            return -EINVAL;
        }
        argv[argc++] = tok;
    }
    argv[argc] = NULL;
    if (argc == 0)
        return 0;
    const struct io_cmd *c = cmd_by_name(argv[0]);
    if (!c) {
        fprintf(stderr, "command \"%s\" not found\n", argv[0]);
        return -EINVAL;
    }
    if (!check_argc(c, argc))
        return -EINVAL;
    if (c->writes && ctx->read_only) {
        fflush(stdout);
        cli_error("Block node is read-only");
        return -EPERM;
    }
    argv[0] = (char *)c->name; /* getopt's messages name the command */
    return c->fn(ctx, argc, argv);
}

/* Commands from stdin, one per line; blank and '#' lines are skipped. */
static int stdin_loop(struct io_ctx *ctx)
{
    bool tty = isatty(STDIN_FILENO);
    char *line = NULL;
    size_t cap = 0;
    int ret = 0;
    while (!ctx->quit) {
        if (tty) {
            fputs("cbt> ", stdout);
            fflush(stdout);
        }
        if (getline(&line, &cap, stdin) < 0)
            break;
        const char *p = line + strspn(line, " \t\r\n");
        if (*p == '\0' || *p == '#')
            continue;
        if (run_line(ctx, line) < 0)
            ret = CLI_EXIT_FAILURE;
        /* A driver on the other end of the pipe waits for each reply. */
        fflush(stdout);
    }
    free(line);
    return ret;
}

static int args_loop(struct io_ctx *ctx, char **cmds, int n)
{
    int ret = 0;
    for (int i = 0; i < n && !ctx->quit; i++) {
        char *copy = strdup(cmds[i]);
        if (!copy) {
            cli_error("out of memory");
            return CLI_EXIT_FAILURE;
        }
        if (run_line(ctx, copy) < 0)
            ret = CLI_EXIT_FAILURE;
        free(copy);
    }
    return ret;
}

struct io_args {
    const char *format;
    const char *filename;
    bool read_only;
    bool force_share;
    char **cmds;
    int ncmds;
};

/* Returns 1 for --help, 0 to go on, -1 after a usage error. */
static int parse_args(int argc, char **argv, struct io_args *a)
{
    static const struct option longopts[] = {
        {"help", no_argument, NULL, 'h'},
        {"format", required_argument, NULL, 'f'},
        {"read-only", no_argument, NULL, 'r'},
        {"cmd", required_argument, NULL, 'c'},
        {"force-share", no_argument, NULL, 'U'},
        {"nocache", no_argument, NULL, 'n'},
        {"cache", required_argument, NULL, 't'},
        {"discard", required_argument, NULL, 'd'},
        {"aio", required_argument, NULL, 'i'},
        {"native-aio", no_argument, NULL, 'k'},
        {NULL, 0, NULL, 0},
    };
    int c;
    optind = 0;
    while ((c = getopt_long(argc, argv, "hf:rc:Unt:d:i:k", longopts, NULL)) !=
           -1) {
        switch (c) {
        case 'h':
            return 1;
        case 'f':
            a->format = optarg;
            break;
        case 'r':
            a->read_only = true;
            break;
        case 'c':
            a->cmds[a->ncmds++] = optarg;
            break;
        case 'U':
            a->force_share = true;
            break;
        case 'n': /* qemu-io's cache and AIO options: no effect */
        case 't':
        case 'd':
        case 'i':
        case 'k':
            break;
        default:
            cli_bad_option(argv[0]);
            return -1;
        }
    }
    return cli_take_filename(argv[0], argc, argv, &a->filename);
}

static int run(struct io_args *a)
{
    struct cbt_error *err = NULL;
    struct io_ctx ctx = {.read_only = a->read_only, .buf_pattern = -1};
    unsigned flags = a->read_only ? 0 : CBT_OPEN_RDWR;
    if (a->force_share)
        flags |= CBT_OPEN_FORCE_SHARE;
    ctx.img = cli_open(a->filename, a->format, flags, &err);
    if (!ctx.img)
        return cli_lib_error(err);
    ctx.size = cbt_image_size(ctx.img);
    int ret = a->ncmds ? args_loop(&ctx, a->cmds, a->ncmds) : stdin_loop(&ctx);
    free(ctx.buf);
    fflush(stdout);
    if (cbt_image_close(ctx.img, &err) < 0)
        ret = cli_lib_error(err);
    return ret;
}

int cmd_io(int argc, char **argv)
{
    /* At most one -c per argument. */
    struct io_args a = {.cmds = calloc((size_t)argc, sizeof(char *))};
    if (!a.cmds) {
        cli_error("out of memory");
        return CLI_EXIT_FAILURE;
    }
    int r = parse_args(argc, argv, &a);
    int ret;
    if (r > 0)
        ret = cli_help(usage);
    else if (r < 0)
        ret = CLI_EXIT_USAGE;
    else
        ret = run(&a);
    free(a.cmds);
    return ret;
}
