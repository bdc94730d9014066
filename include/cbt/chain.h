/* Public API for chain-wide views of persistent bitmaps.  STUB: being
 * written (issue 4 §1). */
#ifndef CBT_CHAIN_H
#define CBT_CHAIN_H

#include <cbt/bitmap.h>

#endif
