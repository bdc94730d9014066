/* The whole public API of libcbt in one include (docs/api.md). */
#ifndef CBT_CBT_H
#define CBT_CBT_H

#include <cbt/version.h>
#include <cbt/error.h>
#include <cbt/image.h>
#include <cbt/bitmap.h>
#include <cbt/chain.h>
#include <cbt/checkpoint.h>
#include <cbt/ops.h>
#include <cbt/backup.h>

#endif
