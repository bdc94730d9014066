/*
 * Fuzz target: the parser of a backup folder's record of verifications
 * (cbt-verified.json, src/repo/repo.c), read by cbt repo list.  Whatever
 * the input, repo_verified_parse returns 0 or an error with a reason, and
 * what it accepts has plain file names, parseable times and 64 hex digits.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_common.h"
#include "repo/repo.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct repo_verified v;
    struct cbt_error *err = NULL;
    if (repo_verified_parse((const char *)data, size, "fuzz", &v, &err) < 0) {
        if (!err || !cbt_error_message(err)[0])
            fuzz_fail("rejected without a reason");
    } else {
        for (size_t i = 0; i < v.n; i++) {
            int64_t t;
            if (!v.file[i][0] || strchr(v.file[i], '/') ||
                strlen(v.sha[i]) != 64 ||
                repo_parse_time(v.time[i], &t) < 0)
                fuzz_fail("accepted entry %zu", i);
        }
    }
    cbt_error_free(err);
    repo_verified_free(&v);
    return 0;
}
