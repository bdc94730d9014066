/* qcow2 driver private declarations (placeholder). */
#ifndef CBT_QCOW2_H
#define CBT_QCOW2_H
#include "../../block/block.h"
#endif
