/* cbt_version(): the version libcbt was built as (cbt/version.h). */
#include <cbt/version.h>

const char *cbt_version(void)
{
    return CBT_VERSION_STRING;
}
