/* cbt_convert() (include/cbt/ops.h).  STUB: being written. */
#include <cbt/ops.h>

#include "../util/util.h"

int cbt_convert(const struct cbt_convert_opts *opts, struct cbt_error **errp)
{
    (void)opts;
    cbt_error_set(errp, ENOTSUP, "convert: not implemented yet");
    return -1;
}
