/* Shared declarations of the cbt command line: the command list and helpers. */
#ifndef CBT_CLI_H
#define CBT_CLI_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include <jansson.h>

#include <cbt/error.h>
#include <cbt/image.h>
#include <cbt/ops.h>

/*
 * The command list: X(name, summary).  main.c turns it into its dispatch
 * table and every command is `int cmd_NAME(int argc, char **argv)` in
 * cmd_NAME.c.  argv[0] is "cbt NAME" (so getopt's messages name the
 * command); the return value is the process exit status.
 */
#define CLI_COMMANDS(X)                                                        \
    X(create, "Create a new qcow2 or raw image")                               \
    X(info, "Show the format, size and settings of an image")                  \
    X(check, "Check (and repair) the consistency of an image")                 \
    X(map, "Show the allocation of an image as extents")                       \
    X(compare, "Check whether two images have the same contents")              \
    X(io, "Read, write, zero and discard ranges (qemu-io's commands)")         \
    X(resize, "Change the virtual size of an image")                           \
    X(bitmap, "Add, change, list and dump persistent dirty bitmaps")          \
    X(snapshot, "Create an overlay and move bitmap recording onto it")       \
    X(commit, "Commit the data of upper layers into a backing file")         \
    X(stream, "Copy backing data into an image and shorten its chain")       \
    X(rebase, "Change the backing file of an image")                          \
    X(convert, "Copy an image or chain to a new image (qcow2 or raw)")       \
    X(copy, "Move a running VM's disk to a new image (QEMU's mirror)")       \
    X(checkpoint, "Create, list, delete and reconcile checkpoints of a disk") \
    X(backup, "Back up a disk: full, incremental or differential")           \
    X(restore, "Restore a backup (and its chain) to a new image")            \
    X(verify, "Verify a backup chain without restoring it")                  \
    X(repo, "List, verify, clean and prune a folder of backups")

#define CLI_DECLARE_COMMAND(name, summary)                                     \
    int cmd_##name(int argc, char **argv);
CLI_COMMANDS(CLI_DECLARE_COMMAND)
#undef CLI_DECLARE_COMMAND

/*
 * Process exit statuses, the same for every command (docs/cli.md, "Exit
 * status").  check and compare keep qemu-img's result codes besides these
 * (check: 2 corruptions, 3 leaks, 63 unsupported; compare: 1 different).
 * A command stopped by SIGINT, SIGTERM or SIGHUP dies of that signal after
 * cleaning up, so its parent sees it as the shell does (128 + n).
 */
#define CLI_EXIT_FAILURE 1    /* any other failure */
#define CLI_EXIT_USAGE 64     /* wrong arguments or options */
#define CLI_EXIT_CORRUPT 65   /* verification failed: corruption found */
#define CLI_EXIT_IO 74        /* an I/O or space error of the host */
#define CLI_EXIT_IN_USE 75    /* an image is in use by another process */
#define CLI_EXIT_NEED_FULL 79 /* an incremental is impossible: take a full */

/* The exit status for a library error (by cbt_error_kind). */
int cli_exit_status(const struct cbt_error *err);
/* The exit status for a data-path failure, -errno or errno (cbt_errno_kind:
 * I/O and space errors are CLI_EXIT_IO). */
int cli_errno_status(int errnum);

/* util.c: errors, argument parsing, number formatting */

/*
 * Report a usage mistake of command `prog` ("cbt create"): one line naming
 * the problem, then "Try 'PROG --help' ...".  Returns CLI_EXIT_USAGE.
 */
int cli_usage_error(const char *prog, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
/* getopt has already printed what is wrong with an option: add the "Try"
 * line and return CLI_EXIT_USAGE. */
int cli_bad_option(const char *prog);
/* After option parsing: take the one remaining argument, the image file
 * name, into *filename; a missing or extra argument is a usage error.
 * Returns 0 or -1 (message printed). */
int cli_take_filename(const char *prog, int argc, char **argv,
                      const char **filename);
/*
 * For a command with subcommands (cbt repo, cbt checkpoint): look argv[1]
 * up in names[0..n) into *sub; `list` names them in the messages ("list,
 * verify, clean or prune").  Then argc/argv drop PROG, so that getopt sees
 * the subcommand as argv[0].  1 when argv[1] is -h or --help, 0, or -1
 * after a usage error (missing or unknown subcommand).
 */
int cli_subcommand(const char *prog, int *argc, char ***argv,
                   const char *const *names, size_t n, const char *list,
                   int *sub);
/* The "Try 'PROG --help' for more information." line alone. */
void cli_try_help(const char *prog);
/* Print "cbt: MESSAGE" for a library error, with the cbt command that is
 * its remedy (cli_advice), and free it (NULL is tolerated).  Returns the
 * error's exit status (cli_exit_status). */
int cli_lib_error(struct cbt_error *err);
/* The advice the cbt command adds to a library error for its remedy
 * (cbt_error_remedy: the library names no command), to print right after
 * the message: "" when it has none. */
const char *cli_advice(const struct cbt_error *err);
/* Print "cbt: " + printf-style message on stderr. */
void cli_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Print a command's help text (stdout) and return 0. */
int cli_help(const char *text);

/*
 * Parse a byte count: decimal with an optional k/M/G/T/P/E suffix (powers
 * of 1024, fractions allowed with a suffix: "1.5G") or 0x hex.  Returns 0 or
 * -EINVAL / -ERANGE.
 */
int cli_parse_size(const char *s, uint64_t *out);
/* Parse a size argument of `prog` named `what` ("image size"); on failure
 * print a usage error and return -1. */
int cli_parse_size_arg(const char *prog, const char *what, const char *s,
                       uint64_t *out);

enum cli_output { CLI_OUTPUT_HUMAN, CLI_OUTPUT_JSON };
/* Parse --output=human|json; on failure print a usage error, return -1. */
int cli_parse_output(const char *prog, const char *arg, enum cli_output *out);

/* qemu's size_to_str: "0 B", "64 KiB", "1.5 GiB" (3 significant digits). */
void cli_size_to_str(uint64_t val, char *buf, size_t len);

/* json.c: JSON output through jansson, laid out as qemu-img lays it out */

/* A JSON string; never fails on non-UTF-8 input (bytes are passed through). */
json_t *cli_json_string(const char *s);
json_t *cli_json_u64(uint64_t v);
/* Print `v` with 4-space indentation and a newline, then release it. */
void cli_json_print(json_t *v);

/* kvopts.c: qemu-style "key=value,key2=value2" option lists (-o) */

struct cli_kv {
    char *key;
    char *value; /* NULL when the item had no '=' ("help") */
};
struct cli_kvlist {
    struct cli_kv *items;
    size_t n;
};
/* Append the items of `s` (",," is a literal comma) to `list`.
 * Returns 0, or -ENOMEM. */
int cli_kv_parse(struct cli_kvlist *list, const char *s);
/* Append key=value (copied verbatim, no escapes); it overrides earlier
 * items of the same key.  Returns 0 or -ENOMEM. */
int cli_kv_set(struct cli_kvlist *list, const char *key, const char *value);
/* The value of the last item named `key`, or NULL. */
const char *cli_kv_get(const struct cli_kvlist *list, const char *key);
bool cli_kv_has(const struct cli_kvlist *list, const char *key);
void cli_kv_free(struct cli_kvlist *list);
/* Parse qemu's boolean spellings (on/off, yes/no, true/false). */
int cli_parse_bool(const char *s, bool *out);

/* createopts.c: qemu-img create's -o keys (cbt create, cbt convert) */

enum cli_opt_type { CLI_OPT_STR, CLI_OPT_BOOL, CLI_OPT_SIZE, CLI_OPT_NUM };
/* One -o key; tables end with a NULL name.  The order of a table is the
 * order of qemu-img's "Formatting" line; `def` is what that line shows when
 * the key is unset. */
struct cli_opt_desc {
    const char *name;
    enum cli_opt_type type;
    const char *def;
    const char *help;
};
/* The keys of "qcow2" or "raw"; NULL for any other format. */
const struct cli_opt_desc *cli_create_opt_table(const char *format);
const struct cli_opt_desc *cli_create_opt_find(const struct cli_opt_desc *d,
                                               const char *name);
/* Does the list ask for '-o help' (or '?')? */
bool cli_create_opts_want_help(const struct cli_kvlist *kv);
/* Print qemu-img's "Supported FORMAT options:" list; returns 0. */
int cli_create_opts_help(const char *format);
/* Check every key of kv against format (one of the table's) and store the
 * values in o (strings are borrowed from kv); *size_in_opts tells whether
 * size= was given.  Returns 0, or non-zero after printing a usage error. */
int cli_create_opts_apply(const char *prog, const char *format,
                          const struct cli_kvlist *kv,
                          struct cbt_create_opts *o, bool *size_in_opts);

/*
 * The library's warnings (cbt_warn_fn, cbt/error.h): every options struct
 * the commands fill and every image they open names this callback, which
 * prints "warning: MSG" on stderr.
 */
void cli_warn(void *opaque, const char *msg);
/* cbt_image_open with cli_warn as the image's warning callback. */
struct cbt_image *cli_open(const char *filename, const char *format,
                           unsigned flags, struct cbt_error **errp);

/* progress.c: a percentage drawn on stderr while a long job runs */

struct cli_progress {
    bool enabled; /* -p given and stderr is a terminal */
    int last;     /* last percentage drawn, in tenths of a percent */
    bool rate;    /* also the rate and the time left */
    double t0;    /* when the job started (monotonic seconds) */
    double drawn; /* when the line was last drawn */
    int width;    /* of the last line drawn */
};
void cli_progress_init(struct cli_progress *p, bool requested);
/* The same, the line showing the rate and the time left besides the
 * percentage (backup, restore, verify): "    (42.0/100%)  312 MiB/s,
 * 0:07 left". */
void cli_progress_init_rate(struct cli_progress *p, bool requested);
void cli_progress_update(struct cli_progress *p, uint64_t done, uint64_t total);
/* A library progress callback (cbt_progress_fn) drawing on the struct
 * cli_progress passed as its opaque pointer. */
void cli_progress_cb(void *opaque, uint64_t done, uint64_t total);
/* Erase the progress line (so later messages start on a clean line). */
void cli_progress_end(struct cli_progress *p);

/* signals.c: SIGINT, SIGTERM, SIGHUP during the long-running commands */

/* From now on those signals are noted instead of killing (those ignored
 * stay ignored); the returned cbt_cancel_fn (cli_cancel_cb), set as the
 * library's cancel callback, stops the operation so that it cleans up.
 * Called by every long command just before its operation:
 *     o.cancel = cli_signals_catch(); */
cbt_cancel_fn *cli_signals_catch(void);
/* A cbt_cancel_fn: has one of those signals arrived? */
bool cli_cancel_cb(void *opaque);
/* main(), at the end: when a signal was caught, die of it (its default
 * action); returns otherwise. */
void cli_signals_reraise(void);

/* live.c: the --qmp form of commit, stream and copy */

struct qmp;
struct live_chain_opts;

/* The long option --qmp SOCKET's getopt value in those commands. */
#define CLI_OPT_QMP 0x1000

/* Their options -p, -r RATE and --qmp SOCKET, as given. */
struct cli_live_args {
    const char *sock;
    const char *rate;
    bool progress;
};
/* In the getopt loop: take option c into *a when it is one of those;
 * false when it is not. */
bool cli_live_option(int c, struct cli_live_args *a);

/* live_commit, live_stream or live_copy. */
typedef int cli_live_fn(struct qmp *q, const struct live_chain_opts *o,
                        struct cbt_error **errp);
/*
 * Run `run` on the QEMU behind a->sock with *lo, its rate from -r, its
 * progress line (-p, with the rate and time left) and the signals
 * cancelling it; the exit status (an error printed, and a caught signal
 * re-raised, when it failed).
 */
int cli_live_run(const char *prog, const struct cli_live_args *a,
                 struct live_chain_opts *lo, cli_live_fn *run);

#endif
