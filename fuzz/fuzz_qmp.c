/*
 * Fuzz target: the QMP client's parsing of what a peer sends (src/live/
 * qmp.c).  The input is the whole byte stream of a would-be QEMU monitor:
 * greeting, replies, events.  It is written into one end of a socketpair
 * whose writing side is then closed, and the client connects over the
 * other end, runs three commands and waits for two events.  Whatever the
 * input, the client must return a value or an error with a reason, never
 * crash, hang, read outside its buffers or allocate beyond its limits.
 * Replies are matched by id; the client numbers its commands cbt-1
 * (qmp_capabilities), cbt-2, ... so the seeds carry those ids.  The
 * fourth command (cbt-5) is live_node_bitmap's query-named-block-nodes,
 * whose answer it searches for node "disk" and its bitmap "c1".
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "fuzz_common.h"
#include "live/disk.h"
#include "live/qmp.h"

struct feed {
    int fd;
    const uint8_t *data;
    size_t size;
};

/* Write the stream, then drain what the client sends until it closes. */
static void *feeder(void *opaque)
{
    struct feed *f = opaque;
    size_t off = 0;
    while (off < f->size) {
        ssize_t w = send(f->fd, f->data + off, f->size - off, MSG_NOSIGNAL);
        if (w <= 0)
            break;
        off += (size_t)w;
    }
    shutdown(f->fd, SHUT_WR);
    char buf[4096];
    while (read(f->fd, buf, sizeof(buf)) > 0)
        ;
    return NULL;
}

static bool any(json_t *data, void *opaque)
{
    (void)opaque;
    return json_is_object(data);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) < 0)
        abort();
    struct feed f = {.fd = sv[1], .data = data, .size = size};
    pthread_t t;
    if (pthread_create(&t, NULL, feeder, &f) != 0)
        abort();
    struct cbt_error *err = NULL;
    struct qmp *q = qmp_connect_fd(sv[0], "fuzz.sock", &err);
    if (q) {
        qmp_set_timeout(q, 50);
        static const char *const cmds[] = {"query-block",
                                           "query-named-block-nodes",
                                           "transaction"};
        for (size_t i = 0; i < 3; i++) {
            json_t *v = qmp_execute(q, cmds[i], json_object(), &err);
            if (!v && !err)
                fuzz_fail("a failed command without an error");
            json_decref(v);
            cbt_error_free(err);
            err = NULL;
        }
        struct live_bitmap bm;
        int found = live_node_bitmap(q, "disk", "c1", &bm, &err);
        if (found < 0 && !err)
            fuzz_fail("live_node_bitmap failed without an error");
        if (found >= 0 && err)
            fuzz_fail("live_node_bitmap answered with an error set");
        if (found == 1 && bm.name)
            fuzz_fail("live_node_bitmap filled the name");
        cbt_error_free(err);
        err = NULL;
        json_t *e = qmp_wait_event(q, "BLOCK_JOB_COMPLETED", any, NULL, 50,
                                   &err);
        json_decref(e);
        cbt_error_free(err);
        err = NULL;
        e = qmp_wait_event(q, "JOB_STATUS_CHANGE", NULL, NULL, 50, &err);
        json_decref(e);
        qmp_close(q);
    } else if (!err || !cbt_error_message(err)[0]) {
        fuzz_fail("a failed connect without an error");
    }
    cbt_error_free(err);
    pthread_join(t, NULL);
    close(sv[1]);
    return 0;
}
