/* Options structs that grow: reading a caller's struct of any version. */
#include <stdio.h>

#include <cbt/cbt.h>

#include "util.h"

/* A size past the library's struct by more than this is no struct of a
 * later version (they grow by a few fields) but garbage: refused without
 * reading the caller's memory that far. */
#define OPTS_GROWTH_MAX 4096

int opts_copy(void *out, size_t out_size, const void *in, const char *what,
              struct cbt_error **errp)
{
    memset(out, 0, out_size);
    if (!in) {
        cbt_error_set(errp, EINVAL, "%s: no options given", what);
        return -1;
    }
    size_t size;
    memcpy(&size, in, sizeof(size));
    if (size < sizeof(size_t) || size > out_size + OPTS_GROWTH_MAX) {
        cbt_error_set(errp, EINVAL, "%s: size %zu is no size of this struct "
                      "(set it to sizeof, as its _INIT macro does)", what,
                      size);
        return -1;
    }
    /* A larger struct comes from a program built against a newer libcbt:
     * fine while it leaves every field this library does not know at its
     * default (zero), as Linux's openat2() and clone3() take theirs. */
    for (size_t i = out_size; i < size; i++) {
        if (((const unsigned char *)in)[i]) {
            cbt_error_set(errp, E2BIG, "%s: sets fields libcbt %s does not "
                          "know (the program was built against a newer "
                          "libcbt)", what, cbt_version());
            return -1;
        }
    }
    memcpy(out, in, size < out_size ? size : out_size);
    return 0;
}
