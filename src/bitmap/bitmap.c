/* In-memory dirty bitmap (placeholder). */
#include "bitmap.h"
