/* Helpers shared by the libFuzzer targets: a per-process scratch file that
 * holds the input image, and a bounded walk over an open image. */
#ifndef CBT_FUZZ_COMMON_H
#define CBT_FUZZ_COMMON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <cbt/bitmap.h>
#include <cbt/image.h>

/* Most bytes a target reads back from one image in total. */
#define FUZZ_READ_BUDGET (1024 * 1024)
/* Most block-status calls per walk (an image may have 2^40 extents). */
#define FUZZ_MAX_EXTENTS 2048

/*
 * The libFuzzer entry points.  fuzz_common.c defines LLVMFuzzerInitialize
 * for every target: it creates the scratch folder (in $CBT_FUZZ_TMPDIR, else
 * /dev/shm, else $TMPDIR, else /tmp) and silences library warnings (set
 * CBT_FUZZ_VERBOSE=1 to see them).  Each target defines only
 * LLVMFuzzerTestOneInput.
 */
int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/*
 * Replace the scratch file `name` (a plain file name) with data[0..size) and
 * return its path, valid until the next call with the same name.  Relative
 * file names stored in the image (data file) resolve inside the scratch
 * folder.  Aborts on host I/O failure: that is the harness failing, not the
 * engine.
 */
const char *fuzz_put_file(const char *name, const uint8_t *data, size_t size);

/*
 * True when the input may carry an external data file name (the "DATA"
 * header extension magic appears anywhere in it).  Targets that open images
 * read-write skip such inputs: a mutated image can name any host file as its
 * data file, and the harness must never write to files it did not create.
 */
bool fuzz_may_name_data_file(const uint8_t *data, size_t size);

/*
 * Exercise an open image read-only: info, block status over the whole disk
 * (at most FUZZ_MAX_EXTENTS calls) and reads of the first and last cluster
 * and of some data extents, reading at most `budget` bytes.  Aborts when the
 * library breaks a documented contract of its public API.
 */
void fuzz_walk(struct cbt_image *img, size_t budget);

/* abort() with a message: the fuzzer then saves the input as a crash. */
_Noreturn void fuzz_fail(const char *fmt, ...)
    __attribute__((format(printf, 1, 2)));

#endif
