/* Progress for long jobs (-p): a percentage on stderr, only on a terminal. */
#include <unistd.h>

#include "cli.h"

void cli_progress_init(struct cli_progress *p, bool requested)
{
    p->enabled = requested && isatty(STDERR_FILENO);
    p->last = -1;
    cli_progress_update(p, 0, 1);
}

void cli_progress_update(struct cli_progress *p, uint64_t done, uint64_t total)
{
    if (!p->enabled)
        return;
    int tenths = total ? (int)((double)done * 1000.0 / (double)total) : 1000;
    if (tenths > 1000)
        tenths = 1000;
    if (tenths == p->last)
        return;
    p->last = tenths;
    fprintf(stderr, "\r    (%d.%d/100%%)", tenths / 10, tenths % 10);
    fflush(stderr);
}

void cli_progress_cb(void *opaque, uint64_t done, uint64_t total)
{
    cli_progress_update(opaque, done, total);
}

void cli_progress_end(struct cli_progress *p)
{
    if (!p->enabled || p->last < 0)
        return;
    fputs("\r                \r", stderr);
    fflush(stderr);
    p->last = -1;
}
