/*
 * Fuzz target: parse a hostile backup manifest (TARGET.json,
 * docs/backups.md).  An accepted manifest must satisfy the documented
 * rules (checked again here, independently of the parser), and writing it
 * back and parsing the result must give the same manifest.  A refused one
 * must be refused with a message naming the file (and, for a field, the
 * field and what was expected).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_common.h"
#include "ops/manifest.h"
#include "util/util.h"

static bool plain(const char *s)
{
    return s && s[0] && !strchr(s, '/') && strcmp(s, ".") && strcmp(s, "..");
}

static void check_rules(const struct manifest *m)
{
    if (!plain(m->image_file) || !plain(m->hash_file) ||
        (m->parent_file && !plain(m->parent_file)))
        fuzz_fail("accepted a file name that is not plain");
    if ((m->kind == CBT_BACKUP_FULL) != (m->parent_file == NULL) ||
        (m->parent_file == NULL) != (m->since == NULL))
        fuzz_fail("accepted inconsistent kind/since/parent");
    if (m->block_size != BLOCKHASH_BLOCK ||
        m->blocks != (m->virtual_size + BLOCKHASH_BLOCK - 1) / BLOCKHASH_BLOCK)
        fuzz_fail("accepted blocks %llu for size %llu",
                  (unsigned long long)m->blocks,
                  (unsigned long long)m->virtual_size);
    /* Version 2 is exactly sha256-tree-v2, version 1 sha256-blocks-v1. */
    if ((m->version != 1 && m->version != 2) || (m->version == 2) != m->tree)
        fuzz_fail("accepted version %d with %s hashes", m->version,
                  m->tree ? "tree" : "v1");
    if (m->has_extents != (strcmp(m->image_format, "raw") == 0))
        fuzz_fail("extents present for the wrong format");
    uint64_t prev = 0;
    for (size_t i = 0; i < m->nextents; i++) {
        const struct manifest_extent *e = &m->extents[i];
        if (e->length == 0 || e->start < prev ||
            e->start + e->length < e->start ||
            e->start + e->length > m->virtual_size)
            fuzz_fail("accepted a bad extent %zu", i);
        prev = e->start + e->length;
    }
    if (strlen(m->root) != 64 || strlen(m->hash_file_sha256) != 64 ||
        strlen(m->disk_id) != 36 ||
        /* a copy-only backup (checkpoint null) has no order */
        (m->checkpoint != NULL) != (m->checkpoint_order != 0))
        fuzz_fail("accepted a bad digest, id or order");
}

static bool same_str(const char *a, const char *b)
{
    return (!a && !b) || (a && b && strcmp(a, b) == 0);
}

static void check_same(const struct manifest *a, const struct manifest *b)
{
    bool same =
        a->complete == b->complete && same_str(a->tool, b->tool) &&
        same_str(a->created, b->created) &&
        same_str(a->disk_path, b->disk_path) &&
        same_str(a->disk_id, b->disk_id) && a->kind == b->kind &&
        same_str(a->checkpoint, b->checkpoint) &&
        a->checkpoint_order == b->checkpoint_order &&
        same_str(a->checkpoint_created, b->checkpoint_created) &&
        same_str(a->since, b->since) &&
        same_str(a->parent_file, b->parent_file) &&
        (!a->parent_file || strcmp(a->parent_manifest_sha256,
                                   b->parent_manifest_sha256) == 0) &&
        same_str(a->image_file, b->image_file) &&
        same_str(a->image_format, b->image_format) &&
        a->virtual_size == b->virtual_size && a->dirty == b->dirty &&
        a->copied == b->copied && a->zeroed == b->zeroed &&
        a->rescan == b->rescan && a->has_file_bytes == b->has_file_bytes &&
        (!a->has_file_bytes || a->file_bytes == b->file_bytes) &&
        same_str(a->compression, b->compression) &&
        a->has_extents == b->has_extents && a->nextents == b->nextents &&
        a->blocks == b->blocks && same_str(a->hash_file, b->hash_file) &&
        strcmp(a->hash_file_sha256, b->hash_file_sha256) == 0 &&
        strcmp(a->root, b->root) == 0;
    for (size_t i = 0; same && i < a->nextents; i++)
        same = a->extents[i].start == b->extents[i].start &&
               a->extents[i].length == b->extents[i].length &&
               a->extents[i].zero == b->extents[i].zero;
    if (!same)
        fuzz_fail("a manifest written back reads differently");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct manifest m;
    struct cbt_error *err = NULL;
    if (manifest_parse((const char *)data, size, "fuzz.json", &m, &err) < 0) {
        if (!err || !cbt_error_message(err))
            fuzz_fail("parse failed without an error message");
        /* Every error names the file; a field error also the field and
         * what was expected. */
        const char *msg = cbt_error_message(err);
        if (strncmp(msg, "fuzz.json: ", 11) != 0)
            fuzz_fail("error without the file name: %s", msg);
        if (strncmp(msg + 11, "manifest field '", 16) == 0 &&
            !strstr(msg, "; expected "))
            fuzz_fail("field error without what was expected: %s", msg);
        for (const char *c = msg; *c; c++)
            if ((unsigned char)*c < 0x20 || *c == 0x7f)
                fuzz_fail("a control character in an error: %s", msg);
        cbt_error_free(err);
        return 0;
    }
    check_rules(&m);

    /* Round trip through a file. */
    const char *path = fuzz_put_file("manifest.json", NULL, 0);
    if (manifest_write(path, &m, true, &err) < 0)
        fuzz_fail("writing an accepted manifest failed: %s",
                  cbt_error_message(err));
    struct manifest back;
    if (manifest_read(path, &back, NULL, &err) < 0)
        fuzz_fail("a manifest written back does not parse: %s",
                  cbt_error_message(err));
    check_same(&m, &back);
    manifest_free(&back);
    manifest_free(&m);
    return 0;
}
