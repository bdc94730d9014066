/*
 * Fuzz target: qemu-img check on a hostile qcow2 image, first read-only,
 * then with both repair flags on a scratch copy, which is then opened and
 * read a little.  Inputs that may name an external data file skip the
 * repair half (see fuzz_may_name_data_file).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_common.h"

static void count_report(void *opaque, const char *msg)
{
    size_t *n = opaque;
    if (!msg)
        fuzz_fail("check reported a NULL message");
    *n += strlen(msg) + 1;
}

static void run_check(const char *path, unsigned fix)
{
    struct cbt_check_result res;
    struct cbt_error *err = NULL;
    size_t reported = 0;
    int r = cbt_image_check(path, "qcow2", fix, &res, count_report, &reported,
                            &err);
    if (r < 0) {
        if (!err || !cbt_error_message(err))
            fuzz_fail("check failed without an error message");
        cbt_error_free(err);
    } else if (r != 0) {
        fuzz_fail("check returned %d, not 0 or -1", r);
    } else if (res.corruptions < 0 || res.leaks < 0 || res.check_errors < 0 ||
               res.corruptions_fixed < 0 || res.leaks_fixed < 0) {
        fuzz_fail("check returned negative counts");
    } else if (err) {
        fuzz_fail("check succeeded but set an error");
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    run_check(fuzz_put_file("image", data, size), 0);
    if (fuzz_may_name_data_file(data, size))
        return 0;

    const char *copy = fuzz_put_file("repair", data, size);
    run_check(copy, CBT_CHECK_FIX_LEAKS | CBT_CHECK_FIX_ERRORS);

    struct cbt_error *err = NULL;
    struct cbt_image *img =
        cbt_image_open(copy, "qcow2", CBT_OPEN_NO_BACKING, &err);
    if (!img) {
        cbt_error_free(err);
        return 0;
    }
    fuzz_walk(img, 256 * 1024);
    cbt_image_close(img, &err);
    cbt_error_free(err);
    return 0;
}
