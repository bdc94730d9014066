/* Private helpers shared by every layer: errors, endian, arithmetic, cleanup. */
#ifndef CBT_UTIL_H
#define CBT_UTIL_H

#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cbt/error.h>

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))
#define DIV_ROUND_UP(n, d) (((n) + (d) - 1) / (d))
/* a must be a power of two */
#define ALIGN_DOWN(n, a) ((n) & ~((__typeof__(n))(a) - 1))
#define ALIGN_UP(n, a) ALIGN_DOWN((n) + (a) - 1, (a))
#define IS_ALIGNED(n, a) (((n) & ((__typeof__(n))(a) - 1)) == 0)
#define IS_POW2(n) ((n) != 0 && ((n) & ((n) - 1)) == 0)

#define PRINTF_FMT(a, b) __attribute__((format(printf, a, b)))
#define WARN_UNUSED __attribute__((warn_unused_result))

/* ---- errors (error.c) ---- */
struct cbt_error {
    int errnum;
    enum cbt_error_kind kind; /* when !kind_set: derived from errnum */
    bool kind_set;
    enum cbt_error_remedy remedy;
    char *msg;
};
/* Store a new error in *errp unless errp is NULL or already holds one. */
void cbt_error_set(struct cbt_error **errp, int errnum, const char *fmt, ...)
    PRINTF_FMT(3, 4);
/* Set the kind of the error already in *errp (no-op without one); also
 * CBT_ERR_OTHER, for an errno that would otherwise say CBT_ERR_IO (ENOSPC
 * for a full image header is no host's space error). */
void cbt_error_set_kind(struct cbt_error **errp, enum cbt_error_kind kind);
/* Set the remedy of the error already in *errp (no-op without one). */
void cbt_error_set_remedy(struct cbt_error **errp,
                          enum cbt_error_remedy remedy);
/* Prepend "prefix: " to an error already in *errp. */
void cbt_error_prefix(struct cbt_error **errp, const char *fmt, ...)
    PRINTF_FMT(2, 3);
/* Run-time debug log, enabled by CBT_DEBUG=1 in the environment. */
void cbt_debug(const char *fmt, ...) PRINTF_FMT(1, 2);
/*
 * Warnings (cbt/error.h): each goes to the callback of the public call it
 * belongs to.  cbt_warn: to the call running on this thread (its entry
 * point opened a WARN_SCOPE with the caller's callback); warn_to: to a
 * given one, a node's (node->warner, the callback it was opened under)
 * for what concerns that node whichever call or thread meets it.  With no
 * callback, printed to stderr as "warning: MSG".
 */
struct cbt_warner {
    cbt_warn_fn *fn;
    void *opaque;
};
void cbt_warn(const char *fmt, ...) PRINTF_FMT(1, 2);
void warn_to(const struct cbt_warner *w, const char *fmt, ...)
    PRINTF_FMT(2, 3);
/* Set this thread's callback (fn NULL: keep the one set, the enclosing
 * call's); returns the one to restore. */
struct cbt_warner warn_scope_enter(cbt_warn_fn *fn, void *opaque);
void warn_scope_leave(const struct cbt_warner *prev);
struct cbt_warner warn_scope_current(void);
/* Warnings of the rest of the enclosing block go to fn(opaque, msg); the
 * previous callback is back when the block is left. */
#define WARN_SCOPE(fn, opaque)                                               \
    __attribute__((cleanup(warn_scope_leave), unused))                       \
    const struct cbt_warner warn_scope_prev_ = warn_scope_enter(fn, opaque)

/*
 * Options structs (include/cbt/: a first `size_t size` member the caller
 * sets to the sizeof it was built with).  Copies the caller's *in into
 * *out (out_size bytes, the library's sizeof): the fields its size covers,
 * zero (the defaults) for the rest.  A size that is no struct's, or a
 * newer struct setting fields this library does not know, is an EINVAL or
 * E2BIG error naming `what`.  0, or -1 with *errp.
 */
int opts_copy(void *out, size_t out_size, const void *in, const char *what,
              struct cbt_error **errp);
/* opts_copy for a struct tag: OPTS_COPY(&local, in, cbt_backup_opts, errp) */
#define OPTS_COPY(out, in, tag, errp)                                        \
    opts_copy((struct tag *){ (out) }, sizeof(struct tag), (in),             \
              "struct " #tag, (errp))

/* ---- checked arithmetic: return true on overflow ---- */
static inline bool add_overflow_u64(uint64_t a, uint64_t b, uint64_t *r)
{
    return __builtin_add_overflow(a, b, r);
}
static inline bool mul_overflow_u64(uint64_t a, uint64_t b, uint64_t *r)
{
    return __builtin_mul_overflow(a, b, r);
}

/* ---- big-endian conversion for on-disk fields ---- */
static inline uint16_t be16_to_cpu(uint16_t v) { return __builtin_bswap16(v); }
static inline uint32_t be32_to_cpu(uint32_t v) { return __builtin_bswap32(v); }
static inline uint64_t be64_to_cpu(uint64_t v) { return __builtin_bswap64(v); }
#define cpu_to_be16 be16_to_cpu
#define cpu_to_be32 be32_to_cpu
#define cpu_to_be64 be64_to_cpu
_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
               "endian helpers assume a little-endian host");

static inline uint16_t ldbe16(const void *p) { uint16_t v; memcpy(&v, p, 2); return be16_to_cpu(v); }
static inline uint32_t ldbe32(const void *p) { uint32_t v; memcpy(&v, p, 4); return be32_to_cpu(v); }
static inline uint64_t ldbe64(const void *p) { uint64_t v; memcpy(&v, p, 8); return be64_to_cpu(v); }
static inline void stbe16(void *p, uint16_t v) { v = cpu_to_be16(v); memcpy(p, &v, 2); }
static inline void stbe32(void *p, uint32_t v) { v = cpu_to_be32(v); memcpy(p, &v, 4); }
static inline void stbe64(void *p, uint64_t v) { v = cpu_to_be64(v); memcpy(p, &v, 8); }
static inline uint64_t ldle64(const void *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline void stle64(void *p, uint64_t v) { memcpy(p, &v, 8); }

/* ---- scope-based cleanup ---- */
static inline void cleanup_free_fn(void *p) { free(*(void **)p); }
#define CLEANUP_FREE __attribute__((cleanup(cleanup_free_fn)))
static inline void cleanup_close_fn(int *fd) { if (*fd >= 0) close(*fd); }
#define CLEANUP_CLOSE __attribute__((cleanup(cleanup_close_fn)))

/* ---- time ---- */
/* Nanoseconds of CLOCK_MONOTONIC: for deadlines and elapsed times. */
static inline int64_t cbt_mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* ---- memory ---- */
/* A zeroed buffer aligned to 4 KiB (fit for direct I/O); NULL on ENOMEM. */
void *cbt_zalloc_aligned(size_t size);
char *cbt_strdup_printf(const char *fmt, ...) PRINTF_FMT(1, 2);

/* ---- SHA-256, FIPS 180-4 (sha256.c, through libcrypto) ---- */
struct sha256_ctx {
    /* libcrypto's SHA256_CTX (112 bytes), kept opaque here; no allocation,
     * nothing to free. */
    _Alignas(16) unsigned char opaque[128];
};
void sha256_init(struct sha256_ctx *c);
void sha256_update(struct sha256_ctx *c, const void *data, size_t len);
void sha256_final(struct sha256_ctx *c, uint8_t digest[32]);
/* Lower-case hex of a digest, NUL-terminated. */
void sha256_hex(const uint8_t digest[32], char hex[65]);
/* The inverse: exactly 64 hex digits (either case); -1 otherwise. */
int sha256_from_hex(const char *hex, uint8_t digest[32]);
/* One-shot SHA-256 of a buffer (backup block hashes). */
void sha256_digest(const void *data, size_t len, uint8_t digest[32]);

/* ---- host files (file.c) ---- */
/* Full-length positional I/O; 0 or -errno.  A short read past EOF fills zero. */
int file_pread_full(int fd, void *buf, size_t len, uint64_t off);
/* Like file_pread_full but a short read is -EIO (for metadata). */
int file_pread_exact(int fd, void *buf, size_t len, uint64_t off);
int file_pwrite_full(int fd, const void *buf, size_t len, uint64_t off);
int file_flush(int fd);
int file_size(int fd, uint64_t *size);
int file_truncate(int fd, uint64_t size);
/* Deallocate (punch a hole) or fall back to writing zeroes. */
int file_punch_hole(int fd, uint64_t off, uint64_t len);
int file_write_zeroes(int fd, uint64_t off, uint64_t len);
/* Bytes actually allocated on the host (st_blocks * 512). */
int file_allocated_size(int fd, uint64_t *size);
/* Resolve `rel` (a backing path as stored) against the folder of `base`.
 * Absolute rel is returned as is.  Caller frees. */
char *path_resolve_relative(const char *base, const char *rel);

#endif
