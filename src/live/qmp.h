/* The QMP client: cbt's control connection to a running QEMU
 * (qemu-system-* or qemu-storage-daemon). */
#ifndef CBT_LIVE_QMP_H
#define CBT_LIVE_QMP_H

#include <stdbool.h>
#include <stddef.h>

#include <jansson.h>

#include "../util/util.h"

/*
 * One QMP connection.  QEMU's monitor speaks one JSON object per line:
 * a greeting, then a reply for each command ({"return": ...} or
 * {"error": {"class", "desc"}}) and asynchronous events ({"event": NAME,
 * "data": ..., "timestamp": ...}) in between.  Everything the peer sends
 * is untrusted: lines are bounded (QMP_MAX_LINE), every reply is checked
 * for its shape, and a peer that is not QEMU, sends garbage, stops
 * answering (timeouts) or closes the socket gets an error naming the
 * socket and the step.  Not thread-safe: one thread drives a connection.
 */
struct qmp;

/* The longest line accepted from the peer (a query of many nodes with
 * many bitmaps stays far below). */
#define QMP_MAX_LINE (16u << 20)
/* Events kept while waiting for a reply; older ones are dropped. */
#define QMP_MAX_QUEUED_EVENTS 4096
/* Default time to wait for a reply or an event, in milliseconds. */
#define QMP_TIMEOUT_MS 60000
/* Time to wait for the greeting: a monitor busy with another client
 * accepts the connection but stays silent. */
#define QMP_GREETING_TIMEOUT_MS 10000

/*
 * Connect to the QMP socket `path` (a Unix socket), read the greeting and
 * negotiate capabilities.  NULL with *errp when the socket cannot be
 * reached or the peer is not a QMP server.
 */
struct qmp *qmp_connect(const char *path, struct cbt_error **errp);
/* Connect to qemu-guest-agent's socket (the same JSON, no greeting; a
 * guest-sync-delimited first brings both ends in step).  Commands then go
 * through qmp_execute/qmp_run. */
struct qmp *qmp_connect_agent(const char *path, struct cbt_error **errp);
/* Connect over an already connected descriptor (tests, fuzzing); takes
 * ownership of fd. */
struct qmp *qmp_connect_fd(int fd, const char *name, struct cbt_error **errp);
void qmp_close(struct qmp *q);

/* The peer's QEMU version, from the greeting. */
void qmp_version(const struct qmp *q, int *major, int *minor, int *micro);
/* Is the peer at least major.minor? */
bool qmp_version_at_least(const struct qmp *q, int major, int minor);
/* 0 when it is; else -1 with an error naming what needs it: "QEMU 4.1.0
 * at SOCK is too old for WHAT (QEMU 5.2 or newer)". */
int qmp_need_version(const struct qmp *q, int major, int minor,
                     const char *what, struct cbt_error **errp);
/* The process at the other end of the socket (SO_PEERCRED), or -1. */
int qmp_peer_pid(const struct qmp *q);
/* The socket's name, for messages. */
const char *qmp_name(const struct qmp *q);
/* Set the reply/event timeout in milliseconds (<= 0: the default). */
void qmp_set_timeout(struct qmp *q, int ms);

/*
 * Run `cmd` with `args` (a JSON object, stolen; NULL for none) and wait
 * for its reply.  Returns the "return" value (a new reference; an empty
 * object for commands that return nothing), or NULL with *errp: QEMU's
 * error ("QMP command 'cmd' failed: desc"), a timeout, or a broken
 * connection.  Events arriving meanwhile are queued for qmp_wait_event.
 */
json_t *qmp_execute(struct qmp *q, const char *cmd, json_t *args,
                    struct cbt_error **errp);
/* The same, for a command whose return value is not wanted: 0 or -1. */
int qmp_run(struct qmp *q, const char *cmd, json_t *args,
            struct cbt_error **errp);
/*
 * The class of the error of the last failed qmp_execute/qmp_run
 * ("GenericError", "CommandNotFound", "DeviceNotFound"), or NULL when it
 * did not come from QEMU (a timeout, a broken connection).
 */
const char *qmp_last_error_class(const struct qmp *q);

/*
 * Wait for an event named `name` whose "data" satisfies `match` (NULL:
 * any), taking it from the queue first.  Returns its "data" object (a new
 * reference; an empty object when it had none) or NULL with *errp after
 * timeout_ms (<= 0: the connection's timeout) or when the connection
 * breaks.  Other events stay queued.
 */
typedef bool qmp_event_match_fn(json_t *data, void *opaque);
json_t *qmp_wait_event(struct qmp *q, const char *name,
                       qmp_event_match_fn *match, void *opaque,
                       int timeout_ms, struct cbt_error **errp);
/* Drop every queued event. */
void qmp_clear_events(struct qmp *q);

/* Helpers for reading replies: a member of an object as a string or an
 * integer, NULL / false when absent or of another type. */
const char *qmp_str(json_t *obj, const char *key);
bool qmp_int(json_t *obj, const char *key, long long *out);
bool qmp_bool(json_t *obj, const char *key, bool dflt);

#endif
