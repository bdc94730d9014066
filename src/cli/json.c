/* JSON output through jansson, in the layout qemu-img uses (4-space indent). */
#include <stdlib.h>

#include "cli.h"

json_t *cli_json_string(const char *s)
{
    json_t *v = json_string(s);
    /* File names need not be UTF-8; pass their bytes through as qemu does. */
    return v ? v : json_string_nocheck(s);
}

json_t *cli_json_u64(uint64_t v)
{
    /* Every value printed fits: sizes and counts are below 2^63. */
    return json_integer((json_int_t)v);
}

void cli_json_print(json_t *v)
{
    char *s = json_dumps(v, JSON_INDENT(4) | JSON_PRESERVE_ORDER);
    json_decref(v);
    if (!s) {
        cli_error("out of memory");
        return;
    }
    puts(s);
    free(s);
}
