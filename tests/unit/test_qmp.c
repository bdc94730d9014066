/*
 * The QMP client against a scripted peer on a socketpair: a thread plays
 * QEMU, reading the client's commands and writing prepared answers, so
 * every protocol path (greeting, ids, events between replies, pretty
 * printing, errors, garbage, oversized messages, a peer that hangs up or
 * stays silent) is exercised without a QEMU.  The integration tests drive
 * the same client against real qemu-storage-daemon and qemu-system.
 */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <sys/socket.h>

#include <cmocka.h>

#include "live/disk.h"
#include "live/qmp.h"

#define GREETING                                                              \
    "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 22, \"minor\": 2, "      \
    "\"major\": 7}, \"package\": \"\"}, \"capabilities\": [\"oob\"]}}\r\n"

/* What the peer does: send `pre` at once, then for each command line it
 * reads, send the next answer (with "%ID%" replaced by the command's id). */
struct script {
    int fd;
    const char *pre;
    const char *answers[8];
    bool hang_up_after; /* close once the answers are used up */
};

static void send_all(int fd, const char *s, size_t n)
{
    while (n) {
        ssize_t w = send(fd, s, n, MSG_NOSIGNAL);
        if (w <= 0)
            return;
        s += w;
        n -= (size_t)w;
    }
}

/* Read one command line; copy its "id" value into id. */
static bool read_command(int fd, char *id, size_t idlen)
{
    char line[4096];
    size_t n = 0;
    while (n + 1 < sizeof(line)) {
        char c;
        if (read(fd, &c, 1) != 1)
            return false;
        if (c == '\n')
            break;
        line[n++] = c;
    }
    line[n] = '\0';
    const char *p = strstr(line, "\"id\":\"");
    id[0] = '\0';
    if (p) {
        p += 6;
        size_t k = 0;
        while (*p && *p != '"' && k + 1 < idlen)
            id[k++] = *p++;
        id[k] = '\0';
    }
    return true;
}

static void *peer(void *opaque)
{
    struct script *s = opaque;
    if (s->pre)
        send_all(s->fd, s->pre, strlen(s->pre));
    for (size_t i = 0; i < 8 && s->answers[i]; i++) {
        char id[64];
        if (!read_command(s->fd, id, sizeof(id)))
            break;
        const char *a = s->answers[i];
        const char *m = strstr(a, "%ID%");
        if (m) {
            send_all(s->fd, a, (size_t)(m - a));
            send_all(s->fd, id, strlen(id));
            send_all(s->fd, m + 4, strlen(m + 4));
        } else {
            send_all(s->fd, a, strlen(a));
        }
    }
    if (s->hang_up_after)
        shutdown(s->fd, SHUT_RDWR);
    return NULL;
}

struct run {
    struct script s;
    pthread_t t;
    int client_fd;
};

static void start(struct run *r)
{
    int sv[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
    r->s.fd = sv[1];
    r->client_fd = sv[0];
    assert_int_equal(pthread_create(&r->t, NULL, peer, &r->s), 0);
}

static void finish(struct run *r)
{
    shutdown(r->s.fd, SHUT_RDWR);
    pthread_join(r->t, NULL);
    close(r->s.fd);
}

#define CAPS_OK "{\"return\": {}, \"id\": \"%ID%\"}\r\n"

static void test_greeting_and_commands(void **state)
{
    (void)state;
    struct run r = {.s = {.pre = GREETING,
                          .answers = {
                              CAPS_OK,
                              /* an event before the reply; pretty-printed */
                              "{\"event\": \"JOB_STATUS_CHANGE\", \"data\": "
                              "{\"id\": \"j1\", \"status\": \"running\"}}\r\n"
                              "{\n  \"return\": [\n    {\"id\": \"e\"}\n  ],\n"
                              "  \"id\": \"%ID%\"\n}\r\n",
                              "{\"error\": {\"class\": \"GenericError\", "
                              "\"desc\": \"Bitmap 'x' not found\"}, \"id\": "
                              "\"%ID%\"}\r\n",
                          }}};
    start(&r);
    struct cbt_error *err = NULL;
    struct qmp *q = qmp_connect_fd(r.client_fd, "test.sock", &err);
    assert_non_null(q);
    int ma, mi, mc;
    qmp_version(q, &ma, &mi, &mc);
    assert_int_equal(ma, 7);
    assert_int_equal(mi, 2);
    assert_int_equal(mc, 22);
    assert_true(qmp_version_at_least(q, 7, 1));
    assert_false(qmp_version_at_least(q, 8, 0));

    json_t *v = qmp_execute(q, "query-block-exports", NULL, &err);
    assert_non_null(v);
    assert_true(json_is_array(v));
    assert_string_equal(qmp_str(json_array_get(v, 0), "id"), "e");
    json_decref(v);

    assert_int_equal(qmp_run(q, "block-dirty-bitmap-remove", NULL, &err), -1);
    assert_non_null(strstr(cbt_error_message(err), "Bitmap 'x' not found"));
    assert_non_null(strstr(cbt_error_message(err), "block-dirty-bitmap-remove"));
    assert_string_equal(qmp_last_error_class(q), "GenericError");
    cbt_error_free(err);
    err = NULL;

    /* The event that came before the reply is still there. */
    json_t *d = qmp_wait_event(q, "JOB_STATUS_CHANGE", NULL, NULL, 1000, &err);
    assert_non_null(d);
    assert_string_equal(qmp_str(d, "status"), "running");
    json_decref(d);
    qmp_close(q);
    finish(&r);
}

static bool status_is(json_t *data, void *opaque)
{
    const char *s = qmp_str(data, "status");
    return s && strcmp(s, opaque) == 0;
}

static void test_wait_event_matching(void **state)
{
    (void)state;
    struct run r = {.s = {.pre = GREETING,
                          .answers = {CAPS_OK,
                                      "{\"event\": \"JOB_STATUS_CHANGE\", "
                                      "\"data\": {\"status\": \"running\"}}\r\n"
                                      "{\"event\": \"BLOCK_JOB_COMPLETED\", "
                                      "\"data\": {\"device\": \"a\"}}\r\n"
                                      "{\"event\": \"JOB_STATUS_CHANGE\", "
                                      "\"data\": {\"status\": \"concluded\"}}"
                                      "\r\n" CAPS_OK}}};
    start(&r);
    struct cbt_error *err = NULL;
    struct qmp *q = qmp_connect_fd(r.client_fd, "t", &err);
    assert_non_null(q);
    assert_int_equal(qmp_run(q, "x", NULL, &err), 0);
    json_t *d = qmp_wait_event(q, "JOB_STATUS_CHANGE", status_is,
                               (void *)"concluded", 1000, &err);
    assert_non_null(d);
    json_decref(d);
    d = qmp_wait_event(q, "BLOCK_JOB_COMPLETED", NULL, NULL, 1000, &err);
    assert_non_null(d);
    assert_string_equal(qmp_str(d, "device"), "a");
    json_decref(d);
    /* Nothing more comes: a timeout, and the connection stays usable. */
    d = qmp_wait_event(q, "BLOCK_JOB_COMPLETED", NULL, NULL, 100, &err);
    assert_null(d);
    assert_int_equal(cbt_error_errno(err), ETIMEDOUT);
    cbt_error_free(err);
    qmp_close(q);
    finish(&r);
}

/* Peers that are not QEMU, or break: connect or the command fails with a
 * message naming the socket, and nothing crashes. */
static void expect_connect_error(const char *pre, const char *answer,
                                 const char *needle)
{
    struct run r = {.s = {.pre = pre, .answers = {answer},
                          .hang_up_after = true}};
    start(&r);
    struct cbt_error *err = NULL;
    struct qmp *q = qmp_connect_fd(r.client_fd, "bad.sock", &err);
    if (q) {
        /* The greeting was fine: the first command meets the problem. */
        assert_null(qmp_execute(q, "query-version", NULL, &err));
        qmp_close(q);
    }
    assert_non_null(err);
    const char *m = cbt_error_message(err);
    if (!strstr(m, needle) || !strstr(m, "bad.sock"))
        fail_msg("message '%s' lacks '%s'", m, needle);
    cbt_error_free(err);
    finish(&r);
}

static void test_bad_peers(void **state)
{
    (void)state;
    expect_connect_error("SSH-2.0-OpenSSH_9.2\r\n", NULL, "not QMP");
    expect_connect_error("{\"hello\": 1}\r\n", NULL, "not a QMP server");
    expect_connect_error("[1, 2]\r\n", NULL, "not an object");
    expect_connect_error("", NULL, "closed the QMP connection");
    expect_connect_error("{\"QMP\": {\"version\": {\"qemu\": {\"major\": "
                         "\"7\"}}}}\r\n",
                         NULL, "not a QMP server");
    expect_connect_error(GREETING, "{\"return\": {}, \"id\": \"other\"}\r\n",
                         "not the reply");
    expect_connect_error(GREETING, "{\"id\": \"%ID%\"}\r\n", "not the reply");
    expect_connect_error(GREETING,
                         "{\"return\": {}, \"id\": \"%ID%\", \"return\": 2}"
                         "\r\n",
                         "not QMP");
    expect_connect_error(GREETING, "{\"return\": {}, \"id\": \"%ID%\"}\r\n",
                         "closed the QMP connection");
}

/* A peer that sends a never-ending value is cut off at QMP_MAX_LINE. */
static void *flood(void *opaque)
{
    int fd = *(int *)opaque;
    send_all(fd, "{\"QMP\": \"", 9);
    static char chunk[65536];
    memset(chunk, 'a', sizeof(chunk));
    for (size_t sent = 0; sent < 2 * (size_t)QMP_MAX_LINE;
         sent += sizeof(chunk)) {
        ssize_t w = send(fd, chunk, sizeof(chunk), MSG_NOSIGNAL);
        if (w <= 0)
            break;
    }
    return NULL;
}

static void test_oversized_message(void **state)
{
    (void)state;
    int sv[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, flood, &sv[1]), 0);
    struct cbt_error *err = NULL;
    struct qmp *q = qmp_connect_fd(sv[0], "big.sock", &err);
    assert_null(q);
    assert_non_null(strstr(cbt_error_message(err), "exceeds"));
    cbt_error_free(err);
    shutdown(sv[1], SHUT_RDWR);
    pthread_join(t, NULL);
    close(sv[1]);
}

static void test_late_reply_after_timeout(void **state)
{
    (void)state;
    /* The peer answers the second command twice late: first the reply to
     * the first (timed out) command, then its own. */
    struct run r = {.s = {.pre = GREETING,
                          .answers = {CAPS_OK, "",
                                      "{\"return\": 1, \"id\": \"cbt-2\"}\r\n"
                                      "{\"return\": 2, \"id\": \"%ID%\"}\r\n"}}};
    start(&r);
    struct cbt_error *err = NULL;
    struct qmp *q = qmp_connect_fd(r.client_fd, "slow.sock", &err);
    assert_non_null(q);
    qmp_set_timeout(q, 200);
    assert_null(qmp_execute(q, "slow", NULL, &err));
    assert_int_equal(cbt_error_errno(err), ETIMEDOUT);
    cbt_error_free(err);
    err = NULL;
    qmp_set_timeout(q, 2000);
    json_t *v = qmp_execute(q, "next", NULL, &err);
    assert_non_null(v);
    assert_int_equal(json_integer_value(v), 2);
    json_decref(v);
    qmp_close(q);
    finish(&r);
}

/* live_node_bitmap: one query-named-block-nodes, then the node's bitmap:
 * found (1, its fields), not there (0), the node gone (-1 naming it), an
 * answer that is not a list (-1). */
static void test_node_bitmap(void **state)
{
    (void)state;
    static const char nodes[] =
        "{\"return\": [{\"node-name\": \"disk-file\"}, {\"node-name\": "
        "\"disk\", \"dirty-bitmaps\": [{\"name\": \"c0\", "
        "\"granularity\": 65536, \"count\": 5}, {\"name\": \"c1\", "
        "\"granularity\": 131072, \"count\": 7, \"recording\": true, "
        "\"persistent\": true}]}], \"id\": \"%ID%\"}\r\n";
    struct run r = {.s = {.pre = GREETING,
                          .answers = {CAPS_OK, nodes, nodes, nodes,
                                      "{\"return\": {}, \"id\": \"%ID%\"}"
                                      "\r\n"}}};
    start(&r);
    struct cbt_error *err = NULL;
    struct qmp *q = qmp_connect_fd(r.client_fd, "test.sock", &err);
    assert_non_null(q);
    struct live_bitmap b;
    assert_int_equal(live_node_bitmap(q, "disk", "c1", &b, &err), 1);
    assert_null(err);
    assert_null(b.name);
    assert_int_equal(b.granularity, 131072);
    assert_int_equal(b.count, 7);
    assert_true(b.recording && b.persistent && !b.busy);
    assert_int_equal(live_node_bitmap(q, "disk", "c9", &b, &err), 0);
    assert_null(err);
    assert_int_equal(live_node_bitmap(q, "gone", "c1", &b, &err), -1);
    assert_non_null(strstr(cbt_error_message(err), "no node 'gone'"));
    cbt_error_free(err);
    err = NULL;
    assert_int_equal(live_node_bitmap(q, "disk", "c1", &b, &err), -1);
    assert_non_null(strstr(cbt_error_message(err), "did not return a list"));
    cbt_error_free(err);
    qmp_close(q);
    finish(&r);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_greeting_and_commands),
        cmocka_unit_test(test_wait_event_matching),
        cmocka_unit_test(test_bad_peers),
        cmocka_unit_test(test_oversized_message),
        cmocka_unit_test(test_late_reply_after_timeout),
        cmocka_unit_test(test_node_bitmap),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
