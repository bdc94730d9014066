/* qcow2 driver (placeholder until the engine lands). */
#include "qcow2.h"

static int qcow2_probe(const uint8_t *buf, size_t len)
{
    return len >= 4 && memcmp(buf, "QFI\xfb", 4) == 0 ? 100 : 0;
}

static int qcow2_open(struct blk_node *node, int fd, unsigned flags,
                      struct cbt_error **errp)
{
    (void)fd; (void)flags;
    cbt_error_set(errp, ENOTSUP, "%s: qcow2 not yet supported", node->filename);
    return -1;
}

const struct blk_driver blk_qcow2_driver = {
    .name = "qcow2",
    .probe = qcow2_probe,
    .open = qcow2_open,
};
