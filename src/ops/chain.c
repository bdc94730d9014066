/* Chain-wide bitmap views (include/cbt/chain.h).  STUB: being written. */
#include <cbt/chain.h>

#include "../util/util.h"
