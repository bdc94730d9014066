/* cbt command-line entry point (placeholder until the CLI lands). */
#include <stdio.h>
int main(void)
{
    fputs("cbt: not built yet\n", stderr);
    return 1;
}
