/*
 * The unit tests' scratch folders: made under $TMPDIR, paths in them, and
 * their removal (with nftw, no shell).  Linked into every unit test
 * (tests/unit/meson.build).
 */
#ifndef CBT_TESTS_TMPDIR_H
#define CBT_TESTS_TMPDIR_H

#include <stddef.h>

/* Bytes of a buffer that tmpdir_make fills. */
#define TMPDIR_PATH_MAX 4096

/* Make a new empty folder $TMPDIR/cbt-TAG-XXXXXX (/tmp when TMPDIR is
 * unset or empty), only its owner allowed in, and put its name into dir
 * (TMPDIR_PATH_MAX bytes).  0, or -1 with errno (ENAMETOOLONG when the
 * name does not fit). */
int tmpdir_make(char *dir, const char *tag);

/* "DIR/NAME" in a buffer of the helper's; the last 16 results stay valid
 * (whichever threads asked).  Aborts with a message when the path is
 * longer than TMPDIR_PATH_MAX: a test must not work on a truncated name. */
char *tmpdir_path(const char *dir, const char *name);

/* "DIR/NAME", malloc'd (the caller frees it); aborts when out of memory. */
char *tmpdir_join(const char *dir, const char *name);

/* Remove dir and everything below it, without following symbolic links;
 * goes on past an entry it cannot remove.  0, or -1 with errno of the
 * first failure. */
int tmpdir_remove(const char *dir);

#endif
