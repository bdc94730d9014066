/*
 * Fuzz target: the parser of a prune's journal (src/ops/foldertx.c,
 * cbt-prune.journal in a backup folder), which the next cbt opening the
 * folder replays: renames and removals of files named by it.  Whatever the
 * input, foldertx_parse returns 0 or an error with a reason, and what it
 * accepts never names a file outside the folder: every name is a plain
 * name (no '/', not . or ..), renames only put NAME.json.prune-new over
 * NAME.json (or NAME.tree.prune-new over NAME.tree), and the merge format
 * is qcow2 or raw.
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_common.h"
#include "ops/foldertx.h"

static void plain(const char *s)
{
    if (!s || !s[0] || strchr(s, '/') || strcmp(s, ".") == 0 ||
        strcmp(s, "..") == 0 || strlen(s) > 255)
        fuzz_fail("accepted the name '%s'", s ? s : "(null)");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct foldertx tx;
    struct cbt_error *err = NULL;
    int r = foldertx_parse((const char *)data, size, "fuzz", &tx, &err);
    if (r < 0) {
        if (!err || !cbt_error_message(err)[0])
            fuzz_fail("rejected without a reason");
    } else {
        if (tx.merge_from) {
            plain(tx.merge_from);
            plain(tx.merge_into);
            if (strcmp(tx.merge_format, "qcow2") && strcmp(tx.merge_format, "raw"))
                fuzz_fail("accepted the format '%s'", tx.merge_format);
        }
        for (size_t i = 0; i < tx.nrename; i++) {
            plain(tx.rename_from[i]);
            plain(tx.rename_to[i]);
            size_t n = strlen(tx.rename_to[i]);
            bool kind = n > 5 && (!strcmp(tx.rename_to[i] + n - 5, ".json") ||
                                  !strcmp(tx.rename_to[i] + n - 5, ".tree"));
            if (!kind || strncmp(tx.rename_from[i], tx.rename_to[i], n) ||
                strcmp(tx.rename_from[i] + n, FOLDERTX_NEW_SUFFIX))
                fuzz_fail("accepted the rename %s -> %s", tx.rename_from[i],
                          tx.rename_to[i]);
        }
        for (size_t i = 0; i < tx.nremove; i++)
            plain(tx.remove[i]);
    }
    cbt_error_free(err);
    foldertx_free(&tx);
    return 0;
}
