/* qcow2 consistency check and repair (being written: see the check work). */
#include "qcow2.h"

int qcow2_check(struct blk_node *node, unsigned fix,
                struct cbt_check_result *res, cbt_report_fn *report,
                void *opaque, struct cbt_error **errp)
{
    (void)node; (void)fix; (void)report; (void)opaque;
    memset(res, 0, sizeof(*res));
    cbt_error_set(errp, ENOTSUP, "qcow2 check is being written");
    return -1;
}
