/*
 * A backup program on libcbt, built against the installed library:
 *
 *   cc backup_example.c $(pkg-config --cflags --libs cbt) -o backup_example
 *   ./backup_example [--cancel-at PERCENT] DISK.qcow2 BACKUP_DIR
 *
 * It opens the disk and lists its checkpoints, then takes an incremental
 * backup into BACKUP_DIR (the first one, with no checkpoint yet, is a full
 * one: auto_full), drawing a progress bar, and verifies the backup chain it
 * extended.  Ctrl-C (or --cancel-at, which cancels once the bar reaches
 * PERCENT) stops the backup through the cancel callback: the library then
 * fails it with ECANCELED, leaving the disk's checkpoints and the folder as
 * they were.
 *
 * Exit status: 0 done and verified, 1 failed, 2 usage, 3 cancelled,
 * 4 the verification found the backup bad.
 */
#define _POSIX_C_SOURCE 200809L /* sigaction, clock_gettime */
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cbt/cbt.h>

#if !CBT_CHECK_VERSION(0, 1, 0)
#error "libcbt 0.1.0 or newer is needed"
#endif

/* Set by SIGINT, or by the progress bar at --cancel-at; read by the cancel
 * callback, which may run in another of the library's threads. */
static volatile sig_atomic_t stop_requested;

static void on_sigint(int sig)
{
    (void)sig;
    stop_requested = 1;
}

struct bar {
    int cancel_at;   /* percent, or -1 */
    int last;        /* last percent drawn */
};

/* Progress (cbt_progress_fn): called one at a time, perhaps from a thread
 * of the library; it only draws and, for the demo, asks to stop. */
static void draw(void *opaque, uint64_t done, uint64_t total)
{
    struct bar *b = opaque;
    int pct = total ? (int)(done * 100 / total) : 100;
    if (pct != b->last) {
        b->last = pct;
        int w = pct / 4;
        fprintf(stderr, "\r[%.*s%*s] %3d%%", w,
                "#########################", 25 - w, "", pct);
    }
    if (b->cancel_at >= 0 && pct >= b->cancel_at)
        stop_requested = 1;
}

/* Cancellation (cbt_cancel_fn): asked between chunks of a few MiB. */
static bool cancelled(void *opaque)
{
    (void)opaque;
    return stop_requested != 0;
}

/* Warnings (cbt_warn_fn): the calls that take this callback report here
 * what did not fail them but is worth knowing. */
static void warned(void *opaque, const char *msg)
{
    fprintf(stderr, "\nbackup_example: %s: warning: %s\n",
            (const char *)opaque, msg);
}

static int list_checkpoints(const char *disk)
{
    struct cbt_error *err = NULL;
    /* Read-only: the backup opens the disk itself, for writing, once this
     * handle is closed. */
    struct cbt_open_opts oo = CBT_OPEN_OPTS_INIT;
    oo.warn = warned;
    oo.warn_opaque = (void *)"open";
    struct cbt_image *img = cbt_image_open_with(disk, &oo, &err);
    if (!img) {
        fprintf(stderr, "backup_example: %s\n", cbt_error_message(err));
        cbt_error_free(err);
        return -1;
    }
    struct cbt_checkpoint *list = NULL;
    size_t n = 0;
    int r = cbt_checkpoint_list(img, &list, &n, &err);
    if (r < 0) {
        fprintf(stderr, "backup_example: %s\n", cbt_error_message(err));
        cbt_error_free(err);
    } else {
        printf("%s: %zu checkpoint(s), %" PRIu64 " bytes\n", disk, n,
               cbt_image_size(img));
        for (size_t i = 0; i < n; i++)
            printf("  %-24s order %" PRIu64 "  %s  changed since: %" PRIu64
                   " bytes\n", list[i].name, list[i].order,
                   list[i].usable ? "usable" : list[i].problem,
                   list[i].dirty_bytes);
        cbt_checkpoint_free_list(list, n);
    }
    cbt_image_close(img, NULL);
    return r;
}

int main(int argc, char **argv)
{
    struct bar bar = { .cancel_at = -1, .last = -1 };
    int a = 1;
    if (argc == 5 && strcmp(argv[1], "--cancel-at") == 0) {
        bar.cancel_at = atoi(argv[2]);
        a = 3;
    }
    if (argc - a != 2) {
        fprintf(stderr, "usage: %s [--cancel-at PERCENT] DISK BACKUP_DIR\n",
                argv[0]);
        return 2;
    }
    const char *disk = argv[a], *dir = argv[a + 1];
    printf("libcbt %s (headers %s)\n", cbt_version(), CBT_VERSION_STRING);
    if (list_checkpoints(disk) < 0)
        return 1;

    struct sigaction sa = { .sa_handler = on_sigint };
    sigaction(SIGINT, &sa, NULL);

    /* One file per backup, named by the time: the library finds the parent
     * backup in the same folder by the checkpoint it starts from. */
    char target[4096];
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    snprintf(target, sizeof(target), "%s/backup-%lld-%09ld.qcow2", dir,
             (long long)now.tv_sec, now.tv_nsec);

    /* Every options struct starts from its _INIT macro, which sets its
     * struct_size: a newer libcbt knows from it which fields this program
     * knows of. */
    struct cbt_backup_opts o = {
        .struct_size = sizeof(struct cbt_backup_opts),
        .disk = disk,
        .target = target,
        .mode = CBT_BACKUP_INCREMENTAL,
        .auto_full = true,   /* the first backup of the disk is full */
        .progress = draw,
        .progress_opaque = &bar,
        .cancel = cancelled,
        .warn = warned,
        .warn_opaque = (void *)"backup",
    };
    struct cbt_backup_result res;
    struct cbt_error *err = NULL;
    int r = cbt_backup(&o, &res, &err);
    fputc('\n', stderr);
    if (r < 0) {
        bool was_cancelled = cbt_error_errno(err) == ECANCELED;
        fprintf(stderr, "backup_example: %s\n", cbt_error_message(err));
        cbt_error_free(err);
        return was_cancelled ? 3 : 1;
    }
    printf("%s backup %s: checkpoint %s, %" PRIu64 " of %" PRIu64
           " bytes copied%s%s\n", cbt_backup_mode_name(res.mode), target,
           res.checkpoint, res.bytes_copied, res.virtual_size,
           res.fallback ? "; full because: " : "",
           res.fallback ? res.fallback : "");
    cbt_backup_result_free(&res);

    struct cbt_verify_result v;
    struct cbt_verify_opts vo = CBT_VERIFY_OPTS_INIT;
    vo.backup = target;
    vo.warn = warned;
    vo.warn_opaque = (void *)"verify";
    if (cbt_verify(&vo, &v, &err) < 0) {
        fprintf(stderr, "backup_example: verify: %s\n",
                cbt_error_message(err));
        cbt_error_free(err);
        return 1;
    }
    int status = v.ok ? 0 : 4;
    if (v.ok)
        printf("verified: %zu backup(s), %" PRIu64 " bytes checked\n",
               v.backups, v.bytes_checked);
    else
        printf("verification FAILED: %s\n", v.problem);
    cbt_verify_result_free(&v);
    list_checkpoints(disk);
    return status;
}
