/*
 * SIGINT, SIGTERM and SIGHUP during the long-running commands (backup,
 * restore, convert, commit): the handler only notes the signal, the
 * library sees it through its cancel callback (cbt_cancel_fn) between
 * chunks of work and fails through its normal failure path, which cleans
 * up; main() then dies of the same signal with its default action, so the
 * parent sees what a shell would (WIFSIGNALED; 130 for SIGINT in a shell).
 * The first signal also restores the default actions: a second one kills
 * at once, for when the clean-up itself is too slow.  A signal the parent
 * set to be ignored (nohup, a background job) stays ignored.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>

#include "cli.h"

static const int caught_signals[] = {SIGINT, SIGTERM, SIGHUP};
#define N_CAUGHT (sizeof(caught_signals) / sizeof(caught_signals[0]))

static volatile sig_atomic_t caught;

static void set_default_actions(void)
{
    struct sigaction dfl = {.sa_handler = SIG_DFL};
    sigemptyset(&dfl.sa_mask);
    for (size_t i = 0; i < N_CAUGHT; i++)
        sigaction(caught_signals[i], &dfl, NULL);
}

/* Async-signal-safe: a store and sigaction. */
static void on_signal(int sig)
{
    int saved = errno;
    if (!caught)
        caught = sig;
    set_default_actions();
    errno = saved;
}

cbt_cancel_fn *cli_signals_catch(void)
{
    struct sigaction sa = {.sa_handler = on_signal, .sa_flags = SA_RESTART};
    sigemptyset(&sa.sa_mask);
    for (size_t i = 0; i < N_CAUGHT; i++)
        sigaddset(&sa.sa_mask, caught_signals[i]);
    for (size_t i = 0; i < N_CAUGHT; i++) {
        struct sigaction old;
        if (sigaction(caught_signals[i], NULL, &old) == 0 &&
            old.sa_handler == SIG_IGN)
            continue;
        sigaction(caught_signals[i], &sa, NULL);
    }
    return cli_cancel_cb;
}

bool cli_cancel_cb(void *opaque)
{
    (void)opaque;
    return caught != 0;
}

void cli_signals_reraise(void)
{
    int sig = caught;
    if (!sig)
        return;
    fflush(stdout);
    fflush(stderr);
    set_default_actions();
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, sig);
    sigprocmask(SIG_UNBLOCK, &set, NULL);
    raise(sig);
}
