/* cbt_stream() (include/cbt/ops.h).  STUB: being written. */
#include <cbt/ops.h>

#include "../util/util.h"

int cbt_stream(const char *file, const char *base, cbt_progress_fn *progress,
               void *progress_opaque, struct cbt_error **errp)
{
    (void)file; (void)base; (void)progress; (void)progress_opaque;
    cbt_error_set(errp, ENOTSUP, "stream: not implemented yet");
    return -1;
}
