/*
 * Fuzz target: open a hostile qcow2 image read-only and walk it (info, block
 * status over the whole disk, reads of the first and last cluster and of
 * some data extents).  Backing files are not opened; an external data file
 * named by the image resolves inside the harness's scratch folder.
 */
#include <stdint.h>
#include <stdlib.h>

#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *path = fuzz_put_file("image", data, size);
    struct cbt_error *err = NULL;
    struct cbt_image *img =
        cbt_image_open(path, "qcow2", CBT_OPEN_NO_BACKING, &err);
    if (!img) {
        if (!err || !cbt_error_message(err))
            fuzz_fail("open failed without an error message");
        cbt_error_free(err);
        return 0;
    }
    fuzz_walk(img, FUZZ_READ_BUDGET);
    cbt_image_close(img, &err);
    cbt_error_free(err);
    return 0;
}
