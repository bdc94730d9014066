/* Backup manifests (TARGET.json) and sha256-blocks-v1 block hashes
 * (TARGET.hashes; sha256-tree-v2's TARGET.tree is hashtree.h): reading,
 * writing and finding them.  Layout: docs/backups.md. */
#ifndef CBT_OPS_MANIFEST_H
#define CBT_OPS_MANIFEST_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <cbt/backup.h>
#include <cbt/error.h>

#include "../util/util.h"

/* The newest version read and written; version 1 (sha256-blocks-v1
 * hashes) is still read. */
#define MANIFEST_VERSION 2
#define BLOCKHASH_ALGORITHM "sha256-blocks-v1"
#define TREE_ALGORITHM_NAME "sha256-tree-v2" /* = TREE_ALGORITHM */
#define TREE_FANOUT_N 256u                   /* = TREE_FANOUT */
#define BLOCKHASH_BLOCK 65536u

struct manifest_extent {
    uint64_t start, length;
    bool zero;                    /* "zero", else "data" */
};

/* A parsed manifest.  Strings are malloc'd; manifest_free releases them. */
struct manifest {
    int version;                  /* 1 or 2 */
    bool tree;                    /* hash.algorithm sha256-tree-v2
                                   * (version 2), else sha256-blocks-v1 */
    bool complete;
    char *tool;
    char *created;                /* ISO 8601 UTC */
    char *disk_path;
    char *disk_id;                /* UUID text, 36 chars */
    enum cbt_backup_mode kind;
    char *checkpoint;
    uint64_t checkpoint_order;
    char *checkpoint_created;
    char *since;                  /* or NULL */
    char *parent_file;            /* relative to the manifest's folder, or NULL */
    char parent_manifest_sha256[65];
    char *image_file;             /* relative to the manifest's folder */
    char *image_format;           /* "qcow2" or "raw" */
    uint64_t virtual_size;
    uint64_t dirty, copied, zeroed;
    /* Optional keys (absent in manifests written before them): */
    bool has_file_bytes;          /* "bytes.file": the image file's size */
    uint64_t file_bytes;
    const char *compression;      /* "image.compression": "zlib" or
                                   * "zstd" (a static string), or NULL */
    bool rescan;                  /* optional key "rescan": changes found
                                   * by comparing hashes, not a bitmap */
    bool has_extents;             /* raw targets */
    struct manifest_extent *extents;
    size_t nextents;
    uint64_t block_size;
    uint64_t blocks;
    char *hash_file;              /* relative to the manifest's folder */
    char hash_file_sha256[65];
    char root[65];
};

/* ---- manifest.c ---- */

/* Parse and validate a manifest held in memory (untrusted bytes: every
 * field type, range and cross-field rule is checked; `what` names the file
 * in errors, which name the field and what was expected).  0, or -1 with
 * *errp. */
int manifest_parse(const char *buf, size_t len, const char *what,
                   struct manifest *m, struct cbt_error **errp);
/* Read (bfile_read_all: a regular file, bounded) and parse path; sha256,
 * when not NULL, gets the SHA-256 (hex) of the bytes read, also when they
 * do not parse ("" when nothing could be read). */
int manifest_read(const char *path, struct manifest *m, char sha256[65],
                  struct cbt_error **errp);
/* Write path as a new file (bfile_write_new): refused when path exists,
 * unless replace (then path, a manifest this backup wrote, is replaced
 * atomically). */
int manifest_write(const char *path, const struct manifest *m, bool replace,
                   struct cbt_error **errp);
void manifest_free(struct manifest *m);
/* Is s a disk id as manifests hold it (a UUID: 8-4-4-4-12 hex digits)? */
bool manifest_is_uuid(const char *s);

/* TARGET -> TARGET.json / TARGET.hashes / TARGET.tree (malloc'd). */
char *manifest_path_for(const char *image_path);
char *hashes_path_for(const char *image_path);
char *tree_path_for(const char *image_path);
/* dir/name for a name relative to the folder of `beside` (malloc'd). */
char *manifest_sibling(const char *beside, const char *name);

/*
 * Call fn for every complete manifest in the folder `dir` that describes
 * the image beside it (NAME.json for image NAME), with the manifest's file
 * name, the parsed manifest (fn may take its strings over, leaving *m
 * zeroed) and the SHA-256 of its bytes.  Files that are not manifests are
 * skipped, a damaged manifest of cbt's with a warning.  fn returns 0 to go
 * on, 1 to stop, -1 to fail (with *errp).  0, or -1 with *errp.
 */
typedef int manifest_scan_fn(void *opaque, const char *name,
                             struct manifest *m, const char sha256[65],
                             struct cbt_error **errp);
int manifest_scan(const char *dir, manifest_scan_fn *fn, void *opaque,
                  struct cbt_error **errp);

/*
 * Find, in the folder `dir`, the complete backup whose manifest names disk
 * `disk_id` and created checkpoint `checkpoint`.  On success *image_path is
 * the backup image's path (malloc'd), *m its manifest and sha256 (when not
 * NULL) the SHA-256 of the manifest's bytes as parsed.  -1 with *errp
 * (ENOENT) when there is none; a folder with two such backups is an error
 * naming both.
 */
int manifest_find_by_checkpoint(const char *dir, const char *disk_id,
                                const char *checkpoint, char **image_path,
                                struct manifest *m, char sha256[65],
                                struct cbt_error **errp);

/* Block hashes of a guest view of `size` bytes in BLOCKHASH_BLOCK blocks. */
struct blockhash {
    uint64_t size;
    uint64_t block;               /* BLOCKHASH_BLOCK */
    uint64_t n;                   /* ceil(size / block) */
    uint8_t (*leaf)[32];
};
/* ---- blockhash.c ---- */
int blockhash_init(struct blockhash *h, uint64_t size);
void blockhash_free(struct blockhash *h);
/* SHA-256 of len bytes (one block). */
void blockhash_digest(const void *buf, size_t len, uint8_t out[32]);
/* Digest of `len` zero bytes (cached for full blocks). */
void blockhash_zero_digest(size_t len, uint8_t out[32]);
/* The root: SHA-256 of the concatenated leaves, hex. */
void blockhash_root(const struct blockhash *h, char hex[65]);
/* ---- bfile.c: the files of a backup folder, read and written safely ---- */

/* Open path for reading when it is a regular file (never blocking on a
 * FIFO, never a device: see bfile.c); `what` names it in errors ("manifest").
 * Returns the descriptor and its size, or -1 with *errp (kind CBT_ERR_CORRUPT
 * for a file that is not a regular one). */
int bfile_open_read(const char *path, const char *what, uint64_t *size,
                    struct cbt_error **errp);
/* The whole file, at most max bytes (more is refused before reading), in a
 * malloc'd NUL-terminated buffer. */
int bfile_read_all(const char *path, const char *what, uint64_t max,
                   char **out, size_t *outlen, struct cbt_error **errp);
/* Open a block hashes file that must hold `blocks` digests (its size is
 * checked first); the descriptor, or -1 with *errp. */
int hashes_open(const char *path, uint64_t blocks, struct cbt_error **errp);
/* SHA-256 (hex) of such a file, streamed. */
int hashes_sha256(const char *path, uint64_t blocks, char hex[65],
                  struct cbt_error **errp);
/* Read leaves for a view of `size` bytes (hashes_open). */
int blockhash_read(const char *path, uint64_t size, struct blockhash *h,
                   struct cbt_error **errp);
/* Write the leaves to the new file path (bfile_write_new, never replacing)
 * and give the file's SHA-256. */
int blockhash_write(const struct blockhash *h, const char *path,
                    char file_sha256[65], struct cbt_error **errp);

/* A parent's leaves, paged in a window at a time (memory: 1 MiB whatever
 * the disk's size).  Zero-initialized: not open, and close does nothing. */
struct hashes_reader {
    int fd;
    bool open;
    uint64_t n;                   /* leaves in the file */
    uint8_t *buf;
    uint64_t first, count;        /* the leaves in buf */
};
/* Open a hashes file of `blocks` leaves (hashes_open's checks) and, when
 * hex is not NULL, give the SHA-256 of its contents, read through the
 * descriptor kept for the leaves.  0, or -1 with *errp. */
int hashes_reader_open(struct hashes_reader *r, const char *path,
                       uint64_t blocks, char hex[65],
                       struct cbt_error **errp);
/* hashes_reader_open that also shows every window of leaves to scan
 * (leaves [first, first+count)) as it hashes them: one pass over the file
 * for the digest and whatever the caller gathers.  scan returns 0, or -1
 * (out of memory) to fail the open. */
typedef int hashes_scan_fn(void *opaque, uint64_t first,
                           const uint8_t *leaves, uint64_t count);
int hashes_reader_open_scan(struct hashes_reader *r, const char *path,
                            uint64_t blocks, char hex[65],
                            hashes_scan_fn *scan, void *opaque,
                            struct cbt_error **errp);
/* Leaves from `first` (< n) on: *leaves points at *count >= 1 of them,
 * valid until the next call.  0 or -errno. */
int hashes_reader_window(struct hashes_reader *r, uint64_t first,
                         const uint8_t **leaves, uint64_t *count);
void hashes_reader_close(struct hashes_reader *r);

/* A new hashes file written in block order, never held whole in memory:
 * the same safety as bfile_write_new (a new unnamed or random-named file,
 * made durable, then given its name, never replacing one). */
struct hashes_writer {
    char *path;
    int fd;
    char *tmpname;                /* the random name, where no O_TMPFILE */
    uint8_t *buf;
    size_t used;                  /* bytes in buf */
    uint64_t off;                 /* bytes written to fd */
    uint64_t kicked;              /* bytes whose writeback was started */
    uint64_t n;                   /* leaves taken */
    struct sha256_ctx sha;        /* of the leaves taken */
};
int hashes_writer_open(struct hashes_writer *w, const char *path,
                       struct cbt_error **errp);
/* Append one leaf, `count` copies of one, or leaves [first, first+count)
 * of r.  0 or -errno (the writer must then be aborted). */
int hashes_writer_put(struct hashes_writer *w, const uint8_t leaf[32]);
/* Append len bytes as they are (the record files of sha256-tree-v2 use
 * the same durable writer; n counts leaves only). */
int hashes_writer_bytes(struct hashes_writer *w, const void *buf, size_t len);
int hashes_writer_repeat(struct hashes_writer *w, const uint8_t leaf[32],
                         uint64_t count);
int hashes_writer_copy(struct hashes_writer *w, struct hashes_reader *r,
                       uint64_t first, uint64_t count);
/* Make it durable, give it its name (refused if the name exists) and the
 * file's SHA-256 (= the root).  0, or -1 with *errp; abort either way
 * after (it frees; the file stays only when finish succeeded). */
int hashes_writer_finish(struct hashes_writer *w, char hex[65],
                         struct cbt_error **errp);
void hashes_writer_abort(struct hashes_writer *w);
/* Write buf as the new file path, complete and durable before its name
 * appears; refused (EEXIST) when path exists unless replace.  Never writes
 * through an existing name or a planted link; leaves no temporary file on
 * failure. */
int bfile_write_new(const char *path, const void *buf, size_t len,
                    bool replace, struct cbt_error **errp);
/* Create path exclusively (O_CREAT|O_EXCL|O_NOFOLLOW, mode 0644): an
 * existing file or a link at path is refused, never followed.  The
 * descriptor (keep it to prove the file is ours), or -1 with *errp. */
int bfile_create_excl(const char *path, struct cbt_error **errp);
/* Rename `from`, which must still be the file open as fd, to `to`, which
 * must not exist.  0 or -1 with *errp. */
int bfile_rename_ours(int fd, const char *from, const char *to,
                      struct cbt_error **errp);
/* Remove path if it is still the file open as fd (bfile_create_excl's). */
void bfile_unlink_ours(int fd, const char *path);
/* The folder of path (malloc'd), "." for a bare name. */
char *bfile_folder_of(const char *path);
/* fsync the folder holding path.  0 or -errno. */
int bfile_sync_folder_of(const char *path);

/*
 * Whose files are these, for removal: a leftover of cbt's is removed only
 * while nobody holds it.  A live backup's scratch file (NAME.scratch, a
 * qcow2 file) carries, while its cbt runs, an OFD write lock on the byte
 * BFILE_SCRATCH_OWNER_BYTE (far from QEMU's lock bytes), taken before its
 * name appears; every image cbt or QEMU has open carries QEMU's locks.
 */
#define BFILE_SCRATCH_OWNER_BYTE 0x636274 /* "cbt" */
/* Does any process hold an OFD/POSIX lock on a byte of QEMU's lock range
 * or on BFILE_SCRATCH_OWNER_BYTE of fd's file? */
bool bfile_held(int fd);
/* Is `name` in the folder open as dirfd the scratch file of a cbt that is
 * gone: a regular file named *.scratch, empty or a qcow2 file, that no
 * process holds (bfile_held)?  fd, when not NULL, gets it open (caller
 * closes; -1 otherwise). */
bool bfile_orphan_scratch(int dirfd, const char *name, int *fd);

#endif
