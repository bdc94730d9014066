/*
 * The block pipeline (blockpipe.h).  One mutex guards the slot states and
 * the hand-out of hash work; callbacks always run without it.
 *
 * A slot goes FREE -> FILLED (fill returned 1; its segments are handed
 * to workers ITEM_SEGS at a time) -> HASHED (every item done) -> FREE
 * (drained).  The filler waits for its next slot to be FREE, workers for
 * work, the drainer for the next slot in order to be HASHED.  A stop
 * (any callback returning non-zero) wakes everybody; each thread then
 * leaves as soon as its current callback returns.
 */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "../util/util.h"
#include "blockpipe.h"

#define ITEM_SEGS 8   /* segments per unit of hash work */
#define MAX_WORKERS 8

enum slot_state { S_FREE, S_FILLED, S_HASHED };

struct slot {
    struct bp_chunk c;
    enum slot_state state;
    size_t items, handed, done;
};

struct pipe {
    const struct bp_ops *ops;
    void *opaque;
    struct cbt_warner warner; /* the running call's, for its threads */
    pthread_mutex_t m;
    pthread_cond_t cv_free, cv_work, cv_hashed;
    struct slot slot[BP_SLOTS];
    uint64_t filled;     /* chunks filled so far */
    uint64_t hand_seq;   /* the chunk whose items are being handed out */
    bool fill_done;
    bool stop;
    int rc;              /* the first non-zero callback result */
};

uint8_t *bp_take(struct bp_chunk *c, size_t len)
{
    if (len > BP_BUF - c->used)
        return NULL;
    if (c->used + len > c->ready) {
        size_t to = MIN(BP_BUF, ALIGN_UP(c->used + len, BP_READY_STEP));
#ifdef MADV_POPULATE_WRITE
        /* Best effort: where the kernel cannot (before 5.14), the reads
         * fault the pages in as before. */
        (void)madvise(c->buf + c->ready, to - c->ready, MADV_POPULATE_WRITE);
#endif
        c->ready = to;
    }
    uint8_t *p = c->buf + c->used;
    c->used += len;
    return p;
}

/* Caller holds p->m. */
static void set_stop(struct pipe *p, int rc)
{
    if (!p->stop) {
        p->stop = true;
        p->rc = rc;
    }
    pthread_cond_broadcast(&p->cv_free);
    pthread_cond_broadcast(&p->cv_work);
    pthread_cond_broadcast(&p->cv_hashed);
}

static void *worker(void *arg)
{
    struct pipe *p = arg;
    warn_scope_enter(p->warner.fn, p->warner.opaque);
    pthread_mutex_lock(&p->m);
    for (;;) {
        if (p->stop)
            break;
        struct slot *s = &p->slot[p->hand_seq % BP_SLOTS];
        if (p->hand_seq < p->filled && s->state == S_FILLED &&
            s->c.seq == p->hand_seq && s->handed < s->items) {
            size_t item = s->handed++;
            if (s->handed == s->items)
                p->hand_seq++;
            pthread_mutex_unlock(&p->m);
            size_t i = item * ITEM_SEGS, j = MIN(i + ITEM_SEGS, s->c.n);
            int rc = p->ops->hash(p->opaque, &s->c, i, j);
            pthread_mutex_lock(&p->m);
            if (rc != 0)
                set_stop(p, rc);
            if (++s->done == s->items) {
                s->state = S_HASHED;
                pthread_cond_broadcast(&p->cv_hashed);
            }
            continue;
        }
        if (p->fill_done && p->hand_seq >= p->filled)
            break;
        pthread_cond_wait(&p->cv_work, &p->m);
    }
    pthread_mutex_unlock(&p->m);
    return NULL;
}

static void *drainer(void *arg)
{
    struct pipe *p = arg;
    warn_scope_enter(p->warner.fn, p->warner.opaque);
    pthread_mutex_lock(&p->m);
    for (uint64_t seq = 0;; seq++) {
        struct slot *s = &p->slot[seq % BP_SLOTS];
        while (!p->stop && !(s->state == S_HASHED && s->c.seq == seq) &&
               !(p->fill_done && seq >= p->filled))
            pthread_cond_wait(&p->cv_hashed, &p->m);
        if (p->stop || s->state != S_HASHED || s->c.seq != seq)
            break;
        pthread_mutex_unlock(&p->m);
        int rc = p->ops->drain(p->opaque, &s->c);
        pthread_mutex_lock(&p->m);
        if (rc != 0)
            set_stop(p, rc);
        s->state = S_FREE;
        pthread_cond_broadcast(&p->cv_free);
    }
    pthread_mutex_unlock(&p->m);
    return NULL;
}

static void filler(struct pipe *p)
{
    for (uint64_t seq = 0;; seq++) {
        struct slot *s = &p->slot[seq % BP_SLOTS];
        pthread_mutex_lock(&p->m);
        while (!p->stop && s->state != S_FREE)
            pthread_cond_wait(&p->cv_free, &p->m);
        bool stop = p->stop;
        pthread_mutex_unlock(&p->m);
        if (stop)
            break;
        if (p->ops->cancelled && p->ops->cancelled(p->opaque)) {
            pthread_mutex_lock(&p->m);
            set_stop(p, -ECANCELED);
            pthread_mutex_unlock(&p->m);
            break;
        }
        uint8_t *buf = s->c.buf;
        size_t ready = s->c.ready; /* the pages stay present */
        memset(&s->c, 0, sizeof(s->c));
        s->c.buf = buf;
        s->c.ready = ready;
        s->c.seq = seq;
        int rc = p->ops->fill(p->opaque, &s->c);
        pthread_mutex_lock(&p->m);
        if (rc != 1 || s->c.n == 0) {
            if (rc != 1 && rc != 0)
                set_stop(p, rc);
            p->fill_done = true;
            pthread_cond_broadcast(&p->cv_work);
            pthread_cond_broadcast(&p->cv_hashed);
            pthread_mutex_unlock(&p->m);
            break;
        }
        s->items = DIV_ROUND_UP(s->c.n, (size_t)ITEM_SEGS);
        s->handed = s->done = 0;
        s->state = S_FILLED;
        p->filled = seq + 1;
        pthread_cond_broadcast(&p->cv_work);
        pthread_mutex_unlock(&p->m);
    }
}

int bp_run(const struct bp_ops *ops, void *opaque, int hash_threads)
{
    struct pipe *p = calloc(1, sizeof(*p));
    if (!p)
        return -ENOMEM;
    p->ops = ops;
    p->opaque = opaque;
    int rc = 0;
    for (int i = 0; i < BP_SLOTS; i++) {
        if (posix_memalign((void **)&p->slot[i].c.buf, 4096, BP_BUF) != 0) {
            p->slot[i].c.buf = NULL;
            rc = -ENOMEM;
        }
    }
    if (rc < 0)
        goto out;
    if (hash_threads <= 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        hash_threads = (int)MAX(1, MIN(n, (long)MAX_WORKERS));
    }
    hash_threads = MIN(hash_threads, MAX_WORKERS);
    pthread_mutex_init(&p->m, NULL);
    pthread_cond_init(&p->cv_free, NULL);
    pthread_cond_init(&p->cv_work, NULL);
    pthread_cond_init(&p->cv_hashed, NULL);

    p->warner = warn_scope_current();
    pthread_t w[MAX_WORKERS], d;
    int nw = 0;
    bool have_drainer = pthread_create(&d, NULL, drainer, p) == 0;
    for (int i = 0; have_drainer && i < hash_threads; i++)
        if (pthread_create(&w[nw], NULL, worker, p) == 0)
            nw++;
    if (!have_drainer || nw == 0) {
        pthread_mutex_lock(&p->m);
        set_stop(p, -EAGAIN);
        pthread_mutex_unlock(&p->m);
    } else {
        filler(p);
    }
    /* Let the workers and the drainer finish what was filled. */
    pthread_mutex_lock(&p->m);
    p->fill_done = true;
    pthread_cond_broadcast(&p->cv_work);
    pthread_cond_broadcast(&p->cv_hashed);
    pthread_mutex_unlock(&p->m);
    for (int i = 0; i < nw; i++)
        pthread_join(w[i], NULL);
    if (have_drainer)
        pthread_join(d, NULL);
    rc = p->rc;
    pthread_mutex_destroy(&p->m);
    pthread_cond_destroy(&p->cv_free);
    pthread_cond_destroy(&p->cv_work);
    pthread_cond_destroy(&p->cv_hashed);
out:
    for (int i = 0; i < BP_SLOTS; i++)
        free(p->slot[i].c.buf);
    free(p);
    return rc;
}
