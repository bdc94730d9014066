/* Error objects for the control path, debug logging and warnings. */
#include <pthread.h>
#include <stdio.h>

#include "util.h"

const char *cbt_error_message(const struct cbt_error *err)
{
    return err ? err->msg : "no error";
}

int cbt_error_errno(const struct cbt_error *err)
{
    return err ? err->errnum : 0;
}

enum cbt_error_kind cbt_error_kind(const struct cbt_error *err)
{
    if (!err)
        return CBT_ERR_OTHER;
    if (err->kind_set)
        return err->kind;
    return cbt_errno_kind(err->errnum);
}

enum cbt_error_remedy cbt_error_remedy(const struct cbt_error *err)
{
    return err ? err->remedy : CBT_REMEDY_NONE;
}

enum cbt_error_kind cbt_errno_kind(int errnum)
{
    switch (errnum < 0 ? -errnum : errnum) {
    case EIO:
    case ENOSPC:
    case EDQUOT:
    case EFBIG:
    case EROFS:
        return CBT_ERR_IO;
    default:
        return CBT_ERR_OTHER;
    }
}

void cbt_error_set_kind(struct cbt_error **errp, enum cbt_error_kind kind)
{
    if (errp && *errp) {
        (*errp)->kind = kind;
        (*errp)->kind_set = true;
    }
}

void cbt_error_set_remedy(struct cbt_error **errp,
                          enum cbt_error_remedy remedy)
{
    if (errp && *errp)
        (*errp)->remedy = remedy;
}

void cbt_error_free(struct cbt_error *err)
{
    if (err) {
        free(err->msg);
        free(err);
    }
}

static char *PRINTF_FMT(1, 0) vformat(const char *fmt, va_list ap)
{
    char *s = NULL;
    if (vasprintf(&s, fmt, ap) < 0)
        return NULL;
    return s;
}

void cbt_error_set(struct cbt_error **errp, int errnum, const char *fmt, ...)
{
    if (!errp || *errp)
        return;
    struct cbt_error *e = calloc(1, sizeof(*e));
    if (!e)
        return;
    va_list ap;
    va_start(ap, fmt);
    e->msg = vformat(fmt, ap);
    va_end(ap);
    if (!e->msg)
        e->msg = strdup("out of memory formatting an error");
    e->errnum = errnum > 0 ? errnum : (errnum < 0 ? -errnum : EIO);
    *errp = e;
}

void cbt_error_prefix(struct cbt_error **errp, const char *fmt, ...)
{
    if (!errp || !*errp)
        return;
    va_list ap;
    va_start(ap, fmt);
    char *prefix = vformat(fmt, ap);
    va_end(ap);
    if (!prefix)
        return;
    char *msg = NULL;
    if (asprintf(&msg, "%s: %s", prefix, (*errp)->msg) >= 0) {
        free((*errp)->msg);
        (*errp)->msg = msg;
    }
    free(prefix);
}

/* Read once, whichever thread asks first. */
static pthread_once_t debug_once = PTHREAD_ONCE_INIT;
static bool debug_enabled;

static int64_t debug_t0;

static void read_debug_flag(void)
{
    const char *e = getenv("CBT_DEBUG");
    debug_enabled = e && *e && strcmp(e, "0") != 0;
    debug_t0 = cbt_mono_ns();
}

void cbt_debug(const char *fmt, ...)
{
    pthread_once(&debug_once, read_debug_flag);
    if (!debug_enabled)
        return;
    /* Milliseconds since the first line: where a run spends its time. */
    double ms = (double)(cbt_mono_ns() - debug_t0) / 1e6;
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "cbt debug: %9.3f ms: ", ms);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

/*
 * The warning callback of the public call running on this thread (set by
 * its entry point for its duration, and handed to the threads it starts):
 * how a warning deep inside an operation reaches the caller of that
 * operation without every layer passing it down.  Nodes keep the one they
 * were opened under (blk_node.warner) for what is said about them later.
 */
static __thread struct cbt_warner scope_warner;

struct cbt_warner warn_scope_enter(cbt_warn_fn *fn, void *opaque)
{
    struct cbt_warner prev = scope_warner;
    /* NULL keeps the enclosing call's: an operation's own creates and
     * opens pass none, and their warnings are the operation's. */
    if (fn)
        scope_warner = (struct cbt_warner){ fn, opaque };
    return prev;
}

void warn_scope_leave(const struct cbt_warner *prev)
{
    scope_warner = *prev;
}

struct cbt_warner warn_scope_current(void)
{
    return scope_warner;
}

static void PRINTF_FMT(2, 0)
    warn_va(const struct cbt_warner *w, const char *fmt, va_list ap)
{
    char *msg = vformat(fmt, ap);
    if (!msg)
        return;
    if (w && w->fn)
        w->fn(w->opaque, msg);
    else
        fprintf(stderr, "warning: %s\n", msg);
    free(msg);
}

void cbt_warn(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    warn_va(&scope_warner, fmt, ap);
    va_end(ap);
}

void warn_to(const struct cbt_warner *w, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    warn_va(w, fmt, ap);
    va_end(ap);
}

void *cbt_zalloc_aligned(size_t size)
{
    void *p = NULL;
    if (posix_memalign(&p, 4096, size ? size : 1) != 0)
        return NULL;
    memset(p, 0, size);
    return p;
}

char *cbt_strdup_printf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *s = vformat(fmt, ap);
    va_end(ap);
    return s;
}
