/*
 * cbt's entry point: finds the subcommand and runs it.
 *
 * Adding a command: write cmd_NAME.c defining
 *     int cmd_NAME(int argc, char **argv)   (argv[0] is "cbt NAME")
 * that parses its options with getopt_long, answers -h/--help with a usage
 * text, prints its own output and returns the exit status; then add one
 * line X(NAME, "summary") to CLI_COMMANDS in cli.h and list the file in
 * meson.build.  The table below, `cbt --help` and `cbt help NAME` pick it
 * up from there.  Only main() exits; commands return.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"

#ifndef CBT_VERSION
#define CBT_VERSION "unknown"
#endif

struct cli_command {
    const char *name;
    int (*run)(int argc, char **argv);
    const char *summary;
};

#define CLI_TABLE_ENTRY(name, summary) {#name, cmd_##name, summary},
static const struct cli_command commands[] = {CLI_COMMANDS(CLI_TABLE_ENTRY)};
#undef CLI_TABLE_ENTRY

#define N_COMMANDS (sizeof(commands) / sizeof(commands[0]))

static const struct cli_command *find_command(const char *name)
{
    for (size_t i = 0; i < N_COMMANDS; i++)
        if (strcmp(commands[i].name, name) == 0)
            return &commands[i];
    return NULL;
}

static void print_usage(FILE *f)
{
    fprintf(f,
            "Usage: cbt [--wait[=SECONDS]] COMMAND [OPTIONS] ARGS...\n"
            "       cbt help COMMAND | cbt COMMAND --help\n"
            "       cbt --version\n"
            "\n"
            "Changed-block tracking and backup for qcow2 images.  The image\n"
            "commands take qemu-img's (and, for io, qemu-io's) options.\n"
            "\n"
            "Every image is locked as QEMU locks it: one that a running VM,\n"
            "qemu-nbd, qemu-storage-daemon or another cbt holds is refused\n"
            "(exit status 75).  --wait waits for it instead, SECONDS at most\n"
            "(without a number: until it is free).\n"
            "\n"
            "Commands:\n");
    for (size_t i = 0; i < N_COMMANDS; i++)
        fprintf(f, "  %-10s %s\n", commands[i].name, commands[i].summary);
    fprintf(f, "\nExit status (every command; check and compare also keep "
               "qemu-img's):\n"
               "  0   success\n"
               "  1   any other failure\n"
               "  64  usage mistake (wrong options or arguments)\n"
               "  65  verification failed: corrupt or altered data\n"
               "  74  I/O or space error of the host\n"
               "  75  an image is in use by another process\n"
               "  79  an incremental backup is impossible: take a full one\n"
               "  128+N  killed by signal N (backup, restore, convert and\n"
               "      commit clean up first, as on a failure)\n"
               "\nExamples:\n"
               "  cbt create -f qcow2 disk.qcow2 10G\n"
               "  cbt info --output=json disk.qcow2\n"
               "  cbt io -c 'write -P 0xab 0 64k' disk.qcow2\n");
}

/* Run `cmd` with argv[0] = "cbt NAME" and the remaining arguments. */
static int run_command(const struct cli_command *cmd, int argc, char **argv)
{
    char prog[64];
    snprintf(prog, sizeof(prog), "cbt %s", cmd->name);
    char *saved = argv[0];
    argv[0] = prog;
    int ret = cmd->run(argc, argv);
    argv[0] = saved;
    return ret;
}

static int help_command(int argc, char **argv)
{
    if (argc < 2) {
        print_usage(stdout);
        return 0;
    }
    const struct cli_command *cmd = find_command(argv[1]);
    if (!cmd) {
        fprintf(stderr, "cbt: unknown command '%s'\n", argv[1]);
        fprintf(stderr, "Try 'cbt --help' for the list of commands.\n");
        return CLI_EXIT_USAGE;
    }
    char help_opt[] = "--help";
    char *hargv[] = {argv[1], help_opt, NULL};
    return run_command(cmd, 2, hargv);
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        print_usage(stderr);
        return CLI_EXIT_USAGE;
    }
    /* cbt --wait[=SECONDS] COMMAND ...: wait for images others hold. */
    while (argc >= 2 && strncmp(argv[1], "--wait", 6) == 0 &&
           (argv[1][6] == '\0' || argv[1][6] == '=')) {
        int secs = -1;
        if (argv[1][6] == '=') {
            char *end;
            long v = strtol(argv[1] + 7, &end, 10);
            if (end == argv[1] + 7 || *end || v < 0 || v > 86400 * 365) {
                fprintf(stderr, "cbt: --wait expects a number of seconds, "
                        "not '%s'\n", argv[1] + 7);
                return CLI_EXIT_USAGE;
            }
            secs = (int)v;
        }
        cbt_set_lock_wait(secs);
        argc--;
        argv++;
    }
    if (argc < 2) {
        print_usage(stderr);
        return CLI_EXIT_USAGE;
    }
    const char *name = argv[1];
    if (strcmp(name, "--help") == 0 || strcmp(name, "-h") == 0)
        return help_command(1, argv);
    if (strcmp(name, "--version") == 0 || strcmp(name, "-V") == 0) {
        printf("cbt version %s\n", CBT_VERSION);
        return 0;
    }
    if (strcmp(name, "help") == 0)
        return help_command(argc - 1, argv + 1);
    const struct cli_command *cmd = find_command(name);
    if (!cmd) {
        if (name[0] == '-')
            fprintf(stderr, "cbt: unknown option '%s'\n", name);
        else
            fprintf(stderr, "cbt: unknown command '%s'\n", name);
        fprintf(stderr, "Try 'cbt --help' for the list of commands.\n");
        return CLI_EXIT_USAGE;
    }
    int ret = run_command(cmd, argc - 1, argv + 1);
    if (fflush(stdout) != 0 && ret == 0) {
        perror("cbt: error writing output");
        ret = CLI_EXIT_FAILURE;
    }
    /* A command stopped by SIGINT, SIGTERM or SIGHUP has cleaned up: it
     * dies of that signal now (the exit status says the signal). */
    cli_signals_reraise();
    return ret;
}
