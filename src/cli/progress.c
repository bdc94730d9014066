/* Progress for long jobs (-p): a percentage on stderr, only on a terminal,
 * in qemu-img's form "    (12.34/100%)"; for cbt's own jobs also the rate
 * and the time left. */
#include <time.h>
#include <unistd.h>

#include "cli.h"

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

void cli_progress_init(struct cli_progress *p, bool requested)
{
    p->enabled = requested && isatty(STDERR_FILENO);
    p->last = -1;
    p->rate = false;
    p->t0 = p->drawn = now();
    p->width = 0;
    cli_progress_update(p, 0, 1);
}

void cli_progress_init_rate(struct cli_progress *p, bool requested)
{
    cli_progress_init(p, requested);
    p->rate = true;
}

/* "312 MiB/s, 0:07 left" once a second of work tells a rate. */
static void rate_text(struct cli_progress *p, uint64_t done, uint64_t total,
                      char *buf, size_t len)
{
    buf[0] = '\0';
    double secs = now() - p->t0;
    if (secs < 1.0 || done == 0)
        return;
    double bps = (double)done / secs;
    char r[32];
    cli_size_to_str((uint64_t)bps, r, sizeof(r));
    double left = total > done ? (double)(total - done) / bps : 0;
    unsigned l = left > 359999 ? 359999 : (unsigned)(left + 0.5);
    if (l >= 3600)
        snprintf(buf, len, "  %s/s, %u:%02u:%02u left", r, l / 3600,
                 l / 60 % 60, l % 60);
    else
        snprintf(buf, len, "  %s/s, %u:%02u left", r, l / 60, l % 60);
}

void cli_progress_update(struct cli_progress *p, uint64_t done, uint64_t total)
{
    if (!p->enabled)
        return;
    int tenths = total ? (int)((double)done * 1000.0 / (double)total) : 1000;
    if (tenths > 1000)
        tenths = 1000;
    double t = now();
    /* Redraw on a new tenth of a percent, or, for the rate, twice a
     * second. */
    if (tenths == p->last && !(p->rate && t - p->drawn >= 0.5))
        return;
    p->last = tenths;
    p->drawn = t;
    char extra[64] = "";
    if (p->rate)
        rate_text(p, done, total, extra, sizeof(extra));
    int w = fprintf(stderr, "\r    (%d.%d/100%%)%s", tenths / 10, tenths % 10,
                    extra);
    /* Blank what a longer earlier line left. */
    if (w > 0 && w < p->width)
        fprintf(stderr, "%*s", p->width - w, "");
    if (w > p->width)
        p->width = w;
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
    fprintf(stderr, "\r%*s\r", p->width > 16 ? p->width : 16, "");
    fflush(stderr);
    p->last = -1;
}
