/*
 * The QMP client (qmp.h).
 *
 * QEMU's monitor sends JSON objects, normally one per line ending in
 * "\r\n", but a monitor configured with pretty=on spreads one object over
 * many lines; so the reader does not rely on lines: it accumulates bytes
 * and lets jansson parse one complete value from the front of the buffer
 * (JSON_DISABLE_EOF_CHECK), asking for more bytes only when jansson says
 * the input ended early.  A value that is not an object, a reply of the
 * wrong shape, or a buffer growing past QMP_MAX_LINE without a complete
 * value is a protocol error: the peer is not (or no longer) a QEMU we can
 * trust, and the connection is unusable afterwards.
 *
 * Commands carry an "id" ("cbt-N"), which QEMU echoes in the reply; a
 * reply with another id means the stream is out of step and is an error.
 * Events that arrive while a reply is awaited are queued (bounded) for
 * qmp_wait_event.  Every wait has a deadline; poll() drives it.
 */
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>

#include "qmp.h"

struct qmp_event {
    char *name;
    json_t *data;
};

struct qmp {
    int fd;
    char *name;          /* the socket path, for messages */
    bool broken;         /* a protocol or I/O error: no further use */
    bool agent;          /* qemu-guest-agent: no greeting, 0xFF syncs */
    int timeout_ms;
    int major, minor, micro;
    unsigned long next_id;
    char *buf;           /* bytes read and not parsed yet: buf[0..len) */
    size_t len, cap;
    size_t tried;        /* buf[0..tried) was an incomplete message */
    struct qmp_event *events; /* queued, oldest first */
    size_t nevents, cap_events;
    char last_class[64];
};

static long long now_ms(void) { return cbt_mono_ns() / 1000000; }

static void fail(struct qmp *q, struct cbt_error **errp, int errnum,
                 const char *fmt, ...) PRINTF_FMT(4, 5);

/* Record a connection-level failure: the connection is unusable now. */
static void fail(struct qmp *q, struct cbt_error **errp, int errnum,
                 const char *fmt, ...)
{
    char *msg = NULL;
    va_list ap;
    va_start(ap, fmt);
    if (vasprintf(&msg, fmt, ap) < 0)
        msg = NULL;
    va_end(ap);
    q->broken = true;
    q->last_class[0] = '\0';
    cbt_error_set(errp, errnum, "%s: %s", q->name,
                  msg ? msg : "QMP connection failed");
    free(msg);
}

/* A short, printable excerpt of untrusted bytes for an error message. */
static void excerpt(const char *p, size_t n, char *out, size_t outlen)
{
    size_t o = 0;
    for (size_t i = 0; i < n && o + 5 < outlen; i++) {
        unsigned char c = (unsigned char)p[i];
        if (c >= 0x20 && c < 0x7f && c != '\\') {
            out[o++] = (char)c;
        } else {
            o += (size_t)snprintf(out + o, outlen - o, "\\x%02x", c);
        }
    }
    if (n > 0 && o + 5 >= outlen && outlen > 4)
        o = outlen - 4, memcpy(out + o, "...", 3), o += 3;
    out[o] = '\0';
}

/* Read more bytes into the buffer, waiting until the deadline.  0, or -1
 * with *errp. */
static int fill(struct qmp *q, long long deadline, const char *step,
                struct cbt_error **errp)
{
    if (q->len >= QMP_MAX_LINE) {
        fail(q, errp, EPROTO, "%s: a message from QEMU exceeds %u bytes",
             step, QMP_MAX_LINE);
        return -1;
    }
    if (q->cap - q->len < 65536) {
        size_t cap = q->cap ? q->cap * 2 : 65536;
        if (cap > QMP_MAX_LINE + 65536u)
            cap = QMP_MAX_LINE + 65536u;
        char *nb = realloc(q->buf, cap);
        if (!nb) {
            fail(q, errp, ENOMEM, "%s: out of memory", step);
            return -1;
        }
        q->buf = nb;
        q->cap = cap;
    }
    for (;;) {
        long long left = deadline - now_ms();
        if (left <= 0) {
            /* Not fatal: what arrived so far stays buffered, and the
             * caller may go on (cancel a job that takes too long). */
            cbt_error_set(errp, ETIMEDOUT, "%s: %s: no answer from QEMU in "
                          "time", q->name, step);
            return -1;
        }
        struct pollfd p = {.fd = q->fd, .events = POLLIN};
        int r = poll(&p, 1, left > 1000000 ? 1000000 : (int)left);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            fail(q, errp, errno, "%s: %s", step, strerror(errno));
            return -1;
        }
        if (r == 0)
            continue;
        ssize_t n = read(q->fd, q->buf + q->len, q->cap - q->len);
        if (n < 0 && (errno == EINTR || errno == EAGAIN))
            continue;
        if (n < 0) {
            fail(q, errp, errno, "%s: %s", step, strerror(errno));
            return -1;
        }
        if (n == 0) {
            fail(q, errp, ECONNRESET, "%s: QEMU closed the QMP connection",
                 step);
            return -1;
        }
        q->len += (size_t)n;
        return 0;
    }
}

/*
 * The next JSON object from the peer (a new reference), or NULL with
 * *errp.  Waits until the deadline.
 */
static json_t *next_message(struct qmp *q, long long deadline,
                            const char *step, struct cbt_error **errp)
{
    if (q->broken) {
        cbt_error_set(errp, EPIPE, "%s: %s: the QMP connection failed "
                      "earlier", q->name, step);
        return NULL;
    }
    for (;;) {
        size_t skip = 0;
        while (skip < q->len &&
               (q->buf[skip] == ' ' || q->buf[skip] == '\t' ||
                q->buf[skip] == '\r' || q->buf[skip] == '\n' ||
                (q->agent && (unsigned char)q->buf[skip] == 0xff)))
            skip++; /* (the agent marks a sync's reply with 0xFF) */
        if (skip) {
            memmove(q->buf, q->buf + skip, q->len - skip);
            q->len -= skip;
            q->tried = q->tried > skip ? q->tried - skip : 0;
        }
        /* A message can only have ended in what arrived since the last
         * try if that holds its closing brace or a line's end: parsing the
         * whole buffer again after every read would take time growing
         * with the square of a long message's length. */
        if (q->tried > 0) {
            const char *fresh = q->buf + q->tried;
            size_t nfresh = q->len - q->tried;
            if (!memchr(fresh, '}', nfresh) && !memchr(fresh, '\n', nfresh) &&
                !memchr(fresh, '\0', nfresh)) {
                q->tried = q->len;
                if (fill(q, deadline, step, errp) < 0)
                    return NULL;
                continue;
            }
        }
        if (q->len > 0 && memchr(q->buf, '\0', q->len)) {
            /* QMP is text: a NUL byte is never part of it. */
            char ex[80];
            excerpt(q->buf, MIN(q->len, (size_t)48), ex, sizeof(ex));
            fail(q, errp, EPROTO, "%s: not QMP: a NUL byte (received \"%s\")",
                 step, ex);
            return NULL;
        }
        if (q->len > 0) {
            json_error_t jerr;
            json_t *v = json_loadb(q->buf, q->len,
                                   JSON_DISABLE_EOF_CHECK | JSON_REJECT_DUPLICATES,
                                   &jerr);
            if (v) {
                size_t used = (size_t)jerr.position;
                if (used == 0 || used > q->len)
                    used = q->len;
                memmove(q->buf, q->buf + used, q->len - used);
                q->len -= used;
                q->tried = 0;
                if (!json_is_object(v)) {
                    json_decref(v);
                    fail(q, errp, EPROTO, "%s: QEMU sent a JSON value that "
                         "is not an object", step);
                    return NULL;
                }
                return v;
            }
            if (json_error_code(&jerr) != json_error_premature_end_of_input) {
                /* jansson's text may quote the bad bytes: escaped too. */
                char ex[80], why[160];
                excerpt(q->buf, MIN(q->len, (size_t)48), ex, sizeof(ex));
                excerpt(jerr.text, strlen(jerr.text), why, sizeof(why));
                fail(q, errp, EPROTO, "%s: not QMP: %s (received \"%s\")",
                     step, why, ex);
                return NULL;
            }
            q->tried = q->len;
        }
        if (fill(q, deadline, step, errp) < 0)
            return NULL;
    }
}

/* Queue an event; the oldest is dropped when the queue is full. */
static void queue_event(struct qmp *q, json_t *msg)
{
    const char *name = qmp_str(msg, "event");
    if (!name)
        return;
    if (q->nevents == QMP_MAX_QUEUED_EVENTS) {
        free(q->events[0].name);
        json_decref(q->events[0].data);
        memmove(q->events, q->events + 1,
                (q->nevents - 1) * sizeof(q->events[0]));
        q->nevents--;
    }
    if (q->nevents == q->cap_events) {
        size_t cap = q->cap_events ? q->cap_events * 2 : 16;
        struct qmp_event *ne = realloc(q->events, cap * sizeof(*ne));
        if (!ne)
            return; /* an event lost to memory pressure: waits time out */
        q->events = ne;
        q->cap_events = cap;
    }
    json_t *data = json_object_get(msg, "data");
    char *n = strdup(name);
    if (!n)
        return;
    q->events[q->nevents].name = n;
    q->events[q->nevents].data = data ? json_incref(data) : json_object();
    q->nevents++;
}

static int send_message(struct qmp *q, json_t *msg, long long deadline,
                        const char *step, struct cbt_error **errp)
{
    char *json = json_dumps(msg, JSON_COMPACT);
    char *s = NULL;
    if (!json || asprintf(&s, "%s\n", json) < 0) {
        free(json);
        cbt_error_set(errp, ENOMEM, "%s: %s: out of memory", q->name, step);
        return -1;
    }
    free(json);
    size_t n = strlen(s), off = 0;
    int ret = 0;
    while (off < n) {
        long long left = deadline - now_ms();
        struct pollfd pf = {.fd = q->fd, .events = POLLOUT};
        int r = left > 0 ? poll(&pf, 1, left > 1000000 ? 1000000 : (int)left)
                         : 0;
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            fail(q, errp, r == 0 ? ETIMEDOUT : errno,
                 "%s: cannot send the command to QEMU: %s", step,
                 r == 0 ? "timed out" : strerror(errno));
            ret = -1;
            break;
        }
        ssize_t w = send(q->fd, s + off, n - off, MSG_NOSIGNAL);
        if (w < 0 && (errno == EINTR || errno == EAGAIN))
            continue;
        if (w < 0) {
            fail(q, errp, errno, "%s: cannot send the command to QEMU: %s",
                 step, errno == EPIPE || errno == ECONNRESET
                           ? "QEMU closed the QMP connection"
                           : strerror(errno));
            ret = -1;
            break;
        }
        off += (size_t)w;
    }
    free(s);
    return ret;
}

/* Wait for the reply with id `id`, queueing events. */
static json_t *wait_reply(struct qmp *q, const char *id, const char *cmd,
                          struct cbt_error **errp)
{
    long long deadline = now_ms() + q->timeout_ms;
    for (;;) {
        json_t *msg = next_message(q, deadline, cmd, errp);
        if (!msg)
            return NULL;
        if (json_object_get(msg, "event")) {
            queue_event(q, msg);
            json_decref(msg);
            continue;
        }
        const char *rid = qmp_str(msg, "id");
        json_t *ret = json_object_get(msg, "return");
        json_t *err = json_object_get(msg, "error");
        unsigned long n;
        char end;
        if (rid && strcmp(rid, id) != 0 && (ret || err) &&
            sscanf(rid, "cbt-%lu%c", &n, &end) == 1 && n < q->next_id) {
            /* The late reply to a command that timed out earlier. */
            json_decref(msg);
            continue;
        }
        if (q->agent && rid && strcmp(rid, id) != 0) {
            /* An agent may answer what a client before us asked (an
             * agent that echoes no id at all answers in order). */
            json_decref(msg);
            continue;
        }
        if (!rid || strcmp(rid, id) != 0 || (!ret && !err)) {
            json_decref(msg);
            fail(q, errp, EPROTO, "%s: QEMU's reply is not the reply to "
                 "this command (wrong id or shape)", cmd);
            return NULL;
        }
        if (err) {
            const char *cls = qmp_str(err, "class");
            const char *desc = qmp_str(err, "desc");
            snprintf(q->last_class, sizeof(q->last_class), "%s",
                     cls ? cls : "");
            cbt_error_set(errp, cls && strcmp(cls, "CommandNotFound") == 0
                                    ? ENOTSUP
                                    : EIO,
                          "%s: QMP command '%s' failed: %s", q->name, cmd,
                          desc ? desc : "(no description)");
            json_decref(msg);
            return NULL;
        }
        json_incref(ret);
        json_decref(msg);
        return ret;
    }
}

json_t *qmp_execute(struct qmp *q, const char *cmd, json_t *args,
                    struct cbt_error **errp)
{
    q->last_class[0] = '\0';
    char id[32];
    snprintf(id, sizeof(id), "cbt-%lu", ++q->next_id);
    json_t *msg = json_object();
    if (!msg) {
        json_decref(args);
        cbt_error_set(errp, ENOMEM, "%s: out of memory", q->name);
        return NULL;
    }
    json_object_set_new(msg, "execute", json_string(cmd));
    if (args)
        json_object_set_new(msg, "arguments", args);
    json_object_set_new(msg, "id", json_string(id));
    cbt_debug("qmp %s <- %s", q->name, cmd);
    long long deadline = now_ms() + q->timeout_ms;
    int r = q->broken ? -1 : send_message(q, msg, deadline, cmd, errp);
    json_decref(msg);
    if (r < 0) {
        if (q->broken)
            cbt_error_set(errp, EPIPE, "%s: %s: the QMP connection failed "
                          "earlier", q->name, cmd);
        return NULL;
    }
    return wait_reply(q, id, cmd, errp);
}

int qmp_run(struct qmp *q, const char *cmd, json_t *args,
            struct cbt_error **errp)
{
    json_t *r = qmp_execute(q, cmd, args, errp);
    if (!r)
        return -1;
    json_decref(r);
    return 0;
}

const char *qmp_last_error_class(const struct qmp *q)
{
    return q->last_class[0] ? q->last_class : NULL;
}

json_t *qmp_wait_event(struct qmp *q, const char *name,
                       qmp_event_match_fn *match, void *opaque,
                       int timeout_ms, struct cbt_error **errp)
{
    long long deadline =
        now_ms() + (timeout_ms > 0 ? timeout_ms : q->timeout_ms);
    char step[96];
    snprintf(step, sizeof(step), "waiting for %s", name);
    for (;;) {
        for (size_t i = 0; i < q->nevents; i++) {
            struct qmp_event *e = &q->events[i];
            if (strcmp(e->name, name) != 0 || (match && !match(e->data, opaque)))
                continue;
            json_t *data = e->data;
            free(e->name);
            memmove(q->events + i, q->events + i + 1,
                    (q->nevents - i - 1) * sizeof(q->events[0]));
            q->nevents--;
            return data;
        }
        json_t *msg = next_message(q, deadline, step, errp);
        if (!msg)
            return NULL;
        if (!json_object_get(msg, "event")) {
            json_decref(msg);
            fail(q, errp, EPROTO, "%s: QEMU sent a reply nobody asked for",
                 step);
            return NULL;
        }
        queue_event(q, msg);
        json_decref(msg);
    }
}

void qmp_clear_events(struct qmp *q)
{
    for (size_t i = 0; i < q->nevents; i++) {
        free(q->events[i].name);
        json_decref(q->events[i].data);
    }
    q->nevents = 0;
}

/* ---- connecting ---- */

static int greet(struct qmp *q, struct cbt_error **errp)
{
    long long deadline = now_ms() + QMP_GREETING_TIMEOUT_MS;
    json_t *g;
    /* Events before the greeting: QEMU flushes the events of a previous
     * client's session (a job that ended as that client left) to the
     * next one it accepts.  They are no greeting; skip a bounded number. */
    for (int skipped = 0;; skipped++) {
        g = next_message(q, deadline, "reading QEMU's greeting", errp);
        if (!g || skipped >= 256 || !json_object_get(g, "event") ||
            json_object_get(g, "QMP"))
            break;
        json_decref(g);
    }
    if (!g) {
        if (cbt_error_errno(errp ? *errp : NULL) == ETIMEDOUT && q->len) {
            char ex[80];
            excerpt(q->buf, MIN(q->len, (size_t)48), ex, sizeof(ex));
            cbt_error_free(*errp);
            *errp = NULL;
            fail(q, errp, EPROTO, "not a QMP server: no complete greeting "
                 "within %d s (received \"%s\")",
                 QMP_GREETING_TIMEOUT_MS / 1000, ex);
        } else if (cbt_error_errno(errp ? *errp : NULL) == ETIMEDOUT) {
            cbt_error_free(*errp);
            *errp = NULL;
            cbt_error_set(errp, ETIMEDOUT, "%s: QEMU did not greet within "
                          "%d s: another client is probably connected to this "
                          "QMP socket (a QMP monitor serves one client at a "
                          "time); give cbt a monitor of its own (-qmp "
                          "unix:PATH,server=on,wait=off, or --chardev + "
                          "--monitor for qemu-storage-daemon)", q->name,
                          QMP_GREETING_TIMEOUT_MS / 1000);
        }
        return -1;
    }
    json_t *qmp = json_object_get(g, "QMP");
    json_t *ver = json_object_get(json_object_get(qmp, "version"), "qemu");
    long long ma, mi, mc;
    if (!json_is_object(qmp) || !qmp_int(ver, "major", &ma) ||
        !qmp_int(ver, "minor", &mi) || !qmp_int(ver, "micro", &mc) ||
        ma < 0 || ma > 1000 || mi < 0 || mi > 1000 || mc < 0 || mc > 1000) {
        json_decref(g);
        fail(q, errp, EPROTO, "not a QMP server: its greeting has no QEMU "
             "version");
        return -1;
    }
    q->major = (int)ma;
    q->minor = (int)mi;
    q->micro = (int)mc;
    json_decref(g);
    if (qmp_run(q, "qmp_capabilities", NULL, errp) < 0) {
        cbt_error_prefix(errp, "%s: QMP capabilities negotiation", q->name);
        return -1;
    }
    return 0;
}

struct qmp *qmp_connect_fd(int fd, const char *name, struct cbt_error **errp)
{
    struct qmp *q = calloc(1, sizeof(*q));
    if (!q || !(q->name = strdup(name))) {
        free(q);
        close(fd);
        cbt_error_set(errp, ENOMEM, "%s: out of memory", name);
        return NULL;
    }
    q->fd = fd;
    q->timeout_ms = QMP_TIMEOUT_MS;
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0)
        (void)fcntl(fd, F_SETFL, fl | O_NONBLOCK);
    if (greet(q, errp) < 0) {
        qmp_close(q);
        return NULL;
    }
    cbt_debug("qmp %s: QEMU %d.%d.%d", name, q->major, q->minor, q->micro);
    return q;
}

/* Connect to a Unix socket; the descriptor or -1 with *errp. */
static int unix_connect(const char *path, const char *what,
                        struct cbt_error **errp)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof(sa.sun_path)) {
        cbt_error_set(errp, ENAMETOOLONG, "%s: socket path longer than %zu "
                      "bytes", path, sizeof(sa.sun_path) - 1);
        return -1;
    }
    memcpy(sa.sun_path, path, strlen(path) + 1);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        cbt_error_set(errp, errno, "%s: %s", path, strerror(errno));
        return -1;
    }
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        int e = errno;
        close(fd);
        cbt_error_set(errp, e, "%s: cannot connect to the %s socket: %s",
                      path, what, strerror(e));
        return -1;
    }
    return fd;
}

struct qmp *qmp_connect_agent(const char *path, struct cbt_error **errp)
{
    int fd = unix_connect(path, "guest agent", errp);
    if (fd < 0)
        return NULL;
    struct qmp *q = calloc(1, sizeof(*q));
    if (!q || !(q->name = strdup(path))) {
        free(q);
        close(fd);
        cbt_error_set(errp, ENOMEM, "%s: out of memory", path);
        return NULL;
    }
    q->fd = fd;
    q->agent = true;
    q->timeout_ms = QMP_TIMEOUT_MS;
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0)
        (void)fcntl(fd, F_SETFL, fl | O_NONBLOCK);
    /* The agent may hold half a request of an earlier client: a sync
     * with a fresh id brings both ends in step (its reply starts with
     * 0xFF); older replies are skipped. */
    qmp_set_timeout(q, QMP_GREETING_TIMEOUT_MS);
    json_int_t id = (json_int_t)(getpid() ^ (long)time(NULL)) & 0x7fffffff;
    json_t *r = qmp_execute(q, "guest-sync-delimited",
                            json_pack("{s:I}", "id", id), errp);
    if (!r || !json_is_integer(r) || json_integer_value(r) != id) {
        json_decref(r);
        if (errp && !*errp)
            cbt_error_set(errp, EPROTO, "%s: the guest agent did not answer "
                          "its sync", path);
        cbt_error_prefix(errp, "qemu-guest-agent");
        qmp_close(q);
        return NULL;
    }
    json_decref(r);
    qmp_set_timeout(q, QMP_TIMEOUT_MS);
    return q;
}

struct qmp *qmp_connect(const char *path, struct cbt_error **errp)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof(sa.sun_path)) {
        cbt_error_set(errp, ENAMETOOLONG, "%s: socket path longer than %zu "
                      "bytes", path, sizeof(sa.sun_path) - 1);
        return NULL;
    }
    memcpy(sa.sun_path, path, strlen(path) + 1);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        cbt_error_set(errp, errno, "%s: %s", path, strerror(errno));
        return NULL;
    }
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        int e = errno;
        close(fd);
        cbt_error_set(errp, e, "%s: cannot connect to the QMP socket: %s%s",
                      path, strerror(e),
                      e == ECONNREFUSED ? " (is QEMU running, and is "
                                          "another client connected? QMP "
                                          "serves one client at a time)"
                                        : "");
        return NULL;
    }
    return qmp_connect_fd(fd, path, errp);
}

void qmp_close(struct qmp *q)
{
    if (!q)
        return;
    qmp_clear_events(q);
    free(q->events);
    if (q->fd >= 0)
        close(q->fd);
    free(q->buf);
    free(q->name);
    free(q);
}

void qmp_version(const struct qmp *q, int *major, int *minor, int *micro)
{
    *major = q->major;
    *minor = q->minor;
    *micro = q->micro;
}

bool qmp_version_at_least(const struct qmp *q, int major, int minor)
{
    return q->major > major || (q->major == major && q->minor >= minor);
}

const char *qmp_name(const struct qmp *q) { return q->name; }

int qmp_need_version(const struct qmp *q, int major, int minor,
                     const char *what, struct cbt_error **errp)
{
    if (qmp_version_at_least(q, major, minor))
        return 0;
    cbt_error_set(errp, ENOTSUP, "%s: QEMU %d.%d.%d is too old for %s (it "
                  "needs QEMU %d.%d or newer)", q->name, q->major, q->minor,
                  q->micro, what, major, minor);
    return -1;
}

int qmp_peer_pid(const struct qmp *q)
{
    struct ucred cr;
    socklen_t len = sizeof(cr);
    if (getsockopt(q->fd, SOL_SOCKET, SO_PEERCRED, &cr, &len) < 0)
        return -1;
    return cr.pid > 0 ? (int)cr.pid : -1;
}

void qmp_set_timeout(struct qmp *q, int ms)
{
    q->timeout_ms = ms > 0 ? ms : QMP_TIMEOUT_MS;
}

/* ---- reply helpers ---- */

const char *qmp_str(json_t *obj, const char *key)
{
    json_t *v = json_object_get(obj, key);
    return json_is_string(v) ? json_string_value(v) : NULL;
}

bool qmp_int(json_t *obj, const char *key, long long *out)
{
    json_t *v = json_object_get(obj, key);
    if (!json_is_integer(v))
        return false;
    *out = (long long)json_integer_value(v);
    return true;
}

bool qmp_bool(json_t *obj, const char *key, bool dflt)
{
    json_t *v = json_object_get(obj, key);
    return json_is_boolean(v) ? json_is_true(v) : dflt;
}
