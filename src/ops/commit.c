/* cbt_commit() (include/cbt/ops.h).  STUB: being written. */
#include <cbt/ops.h>

#include "../util/util.h"

int cbt_commit(const struct cbt_commit_opts *opts, struct cbt_error **errp)
{
    (void)opts;
    cbt_error_set(errp, ENOTSUP, "commit: not implemented yet");
    return -1;
}
