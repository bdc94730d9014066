/* qcow2: placeholder, filled in by the engine work. */
#include "qcow2.h"
