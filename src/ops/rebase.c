/* cbt_rebase() (include/cbt/ops.h).  STUB: being written. */
#include <cbt/ops.h>

#include "../util/util.h"

int cbt_rebase(const struct cbt_rebase_opts *opts, struct cbt_error **errp)
{
    (void)opts;
    cbt_error_set(errp, ENOTSUP, "rebase: not implemented yet");
    return -1;
}
