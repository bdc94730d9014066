/* STUB: being written (issue 5). */
#include "../util/util.h"
