/* The live journal: checkpoint metadata made while QEMU holds the image. */
#ifndef CBT_LIVE_JOURNAL_H
#define CBT_LIVE_JOURNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "../util/util.h"

/*
 * cbt never writes an image another process holds, so a checkpoint made
 * on a running VM has its bitmap in QEMU (written to the image when QEMU
 * closes it) and its metadata here, in a small JSON file per image in
 * cbt's state folder, until cbt next has the image to itself and folds
 * the records into the image's own metadata (docs/live.md).  A record is
 * a checkpoint created (with everything the image's metadata holds) or a
 * checkpoint of the image's metadata deleted.
 *
 * The state folder is $CBT_STATE_DIR, else /var/lib/cbt for root, else
 * $XDG_STATE_HOME/cbt or ~/.local/state/cbt; the file is
 * live/<first 32 hex digits of SHA-256 of the image's real path>.json.
 * Files are replaced atomically (a temporary file renamed over the old
 * one, then the folder synced) and read defensively (bounded, checked).
 */
/*
 * JOURNAL_PENDING: a live backup of process `pid` is about to create
 * checkpoint `name` in QEMU; a later CREATED or DELETED of the name
 * resolves it.  One left unresolved by a process that is gone names a
 * bitmap that process made and never kept: cbt removes it
 * (journal_stale_pending).
 */
enum journal_op { JOURNAL_CREATED, JOURNAL_DELETED, JOURNAL_PENDING };

struct journal_rec {
    enum journal_op op;
    char *name;
    /* JOURNAL_CREATED only: */
    uint64_t order;
    int64_t created_sec;
    uint32_t created_nsec;
    char *parent;          /* or NULL */
    uint64_t virtual_size;
    uint64_t granularity;
    /* JOURNAL_PENDING only: */
    int pid;
};

struct journal {
    char *path;            /* the journal file */
    char *image;           /* the image's real path */
    char disk_id[37];      /* "" until the disk has one */
    struct journal_rec *v;
    size_t n;
};

/* The most records one journal holds, and its largest size. */
#define JOURNAL_MAX_RECORDS 65536
#define JOURNAL_MAX_BYTES (64u << 20)

/* Load the journal of `image` (an empty one when there is none). */
int journal_load(const char *image, struct journal *j, struct cbt_error **errp);
/* Write it durably (removing the file when it has no records and no id). */
int journal_save(struct journal *j, struct cbt_error **errp);
/* Remove the file (after the records were folded into the image). */
int journal_remove(struct journal *j, struct cbt_error **errp);
void journal_free(struct journal *j);
/* Append a record (copies the strings); 0 or -1 with *errp. */
int journal_add(struct journal *j, const struct journal_rec *r,
                struct cbt_error **errp);
/* The newest CREATED record named `name` not deleted after it, or NULL. */
const struct journal_rec *journal_find(const struct journal *j,
                                       const char *name);
/* Is pid a running cbt (not another program that got its number)? */
bool journal_pid_is_cbt(int pid);
/* The PID in the name of an object a cbt made in QEMU ("cbt-PID-..."),
 * or 0 when the name is not one. */
int journal_name_pid(const char *name);
/* The PENDING record of index i is unresolved (no later CREATED or
 * DELETED of its name) and its process is no running cbt. */
bool journal_stale_pending(const struct journal *j, size_t i);
/* Parse a journal's bytes (exposed for the fuzz target); *j must be
 * zeroed.  0, or -1 with *errp naming `what`. */
int journal_parse(const char *buf, size_t len, const char *what,
                  struct journal *j, struct cbt_error **errp);

#endif
