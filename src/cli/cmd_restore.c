/* cbt restore.  STUB: being written. */
#include "cli.h"

int cmd_restore(int argc, char **argv)
{
    (void)argc;
    cli_error("%s: not implemented yet", argv[0]);
    return CLI_EXIT_FAILURE;
}
