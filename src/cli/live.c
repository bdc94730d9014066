/* What cbt commit, stream and copy share in their --qmp form: the options
 * -p, -r RATE and --qmp SOCKET, and running the job with progress and
 * SIGINT/SIGTERM/SIGHUP cancelling it (src/live/livechain.h). */
#include <getopt.h>

#include "../live/livechain.h"
#include "cli.h"

bool cli_live_option(int c, struct cli_live_args *a)
{
    switch (c) {
    case 'p':
        a->progress = true;
        return true;
    case 'r':
        a->rate = optarg;
        return true;
    case CLI_OPT_QMP:
        a->sock = optarg;
        return true;
    default:
        return false;
    }
}

int cli_live_run(const char *prog, const struct cli_live_args *a,
                 struct live_chain_opts *lo, cli_live_fn *run)
{
    if (a->rate && cli_parse_size_arg(prog, "rate", a->rate, &lo->rate) < 0)
        return CLI_EXIT_USAGE;
    struct cbt_error *err = NULL;
    struct qmp *q = qmp_connect(a->sock, &err);
    if (!q)
        return cli_lib_error(err);
    struct cli_progress pr;
    cli_progress_init_rate(&pr, a->progress);
    lo->progress = cli_progress_cb;
    lo->progress_opaque = &pr;
    lo->cancel = cli_signals_catch();
    int r = run(q, lo, &err);
    cli_progress_end(&pr);
    qmp_close(q);
    if (r < 0) {
        r = cli_lib_error(err);
        cli_signals_reraise();
        return r;
    }
    return 0;
}
