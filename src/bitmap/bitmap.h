/* In-memory dirty bitmap (placeholder). */
#ifndef CBT_BITMAP_H
#define CBT_BITMAP_H
#endif
