/*
 * Backup manifests and block hashes (src/ops/manifest.c, blockhash.c):
 *
 *  - digests against known SHA-256 values, the cached zero-block digest
 *    against a computed one, short zero blocks, the root;
 *  - manifests written and read back field by field (full qcow2,
 *    incremental raw with extents), the key order of docs/backups.md;
 *  - the parser refusing each kind of bad input (syntax, duplicate keys,
 *    types, ranges, cross-field rules, names leading out of the folder);
 *  - .hashes round trips and a file of the wrong length;
 *  - manifest_find_by_checkpoint over a folder with other disks' backups,
 *    incomplete and foreign files, and two claimants.
 */
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "ops/manifest.h"
#include "util/util.h"
#include "tmpdir.h"

static char tmpdir[TMPDIR_PATH_MAX];

static char *tpath(const char *name)
{
    return tmpdir_join(tmpdir, name);
}

static void put_file(const char *name, const char *text)
{
    char *p = tpath(name);
    FILE *f = fopen(p, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
    free(p);
}

static char *slurp(const char *path)
{
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    static char buf[1 << 16];
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    return strdup(buf);
}

static void hex_of(const uint8_t d[32], char hex[65])
{
    sha256_hex(d, hex);
}

/* ---- hashes ---- */

/* sha256_from_hex undoes sha256_hex, takes either case, and refuses
 * anything but exactly 64 hex digits. */
static void test_from_hex(void **state)
{
    (void)state;
    uint8_t d[32], back[32];
    for (int i = 0; i < 32; i++)
        d[i] = (uint8_t)(i * 37 + 5);
    char hex[65];
    sha256_hex(d, hex);
    assert_int_equal(sha256_from_hex(hex, back), 0);
    assert_memory_equal(d, back, 32);
    for (int i = 0; i < 64; i++)
        hex[i] = (char)toupper((unsigned char)hex[i]);
    memset(back, 0, sizeof(back));
    assert_int_equal(sha256_from_hex(hex, back), 0);
    assert_memory_equal(d, back, 32);
    char bad[66];
    memcpy(bad, hex, 65);
    bad[10] = 'g';
    assert_int_equal(sha256_from_hex(bad, back), -1);
    memcpy(bad, hex, 65);
    bad[63] = '\0';                       /* 63 digits */
    assert_int_equal(sha256_from_hex(bad, back), -1);
    memcpy(bad, hex, 64);
    bad[64] = '0';                        /* 65 digits */
    bad[65] = '\0';
    assert_int_equal(sha256_from_hex(bad, back), -1);
}

static void test_digests(void **state)
{
    (void)state;
    uint8_t d[32], z[32];
    char hex[65];
    blockhash_digest("abc", 3, d);
    hex_of(d, hex);
    assert_string_equal(hex, "ba7816bf8f01cfea414140de5dae2223"
                             "b00361a396177a9cb410ff61f20015ad");
    blockhash_digest("", 0, d);
    hex_of(d, hex);
    assert_string_equal(hex, "e3b0c44298fc1c149afbf4c8996fb924"
                             "27ae41e4649b934ca495991b7852b855");

    static uint8_t zeroes[BLOCKHASH_BLOCK];
    size_t lens[] = {BLOCKHASH_BLOCK, 1, 511, 4096, 4097, 65535, 0};
    for (size_t i = 0; i < sizeof(lens) / sizeof(lens[0]); i++) {
        blockhash_digest(zeroes, lens[i], d);
        blockhash_zero_digest(lens[i], z);
        assert_memory_equal(d, z, 32);
    }
    blockhash_zero_digest(BLOCKHASH_BLOCK, z);
    hex_of(z, hex);
    assert_string_equal(hex, "de2f256064a0af797747c2b97505dc0b"
                             "9f3df0de4f489eac731c23ae9ca9cc31");
}

/* The streaming interface: FIPS 180-4's two-block example, and a message
 * fed in pieces of awkward sizes equal to the one-shot digest. */
static void test_streaming(void **state)
{
    (void)state;
    struct sha256_ctx c;
    uint8_t d[32], one[32];
    char hex[65];
    const char *m = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    sha256_init(&c);
    sha256_update(&c, m, 10);
    sha256_update(&c, m + 10, strlen(m) - 10);
    sha256_final(&c, d);
    hex_of(d, hex);
    assert_string_equal(hex, "248d6a61d20638b8e5c026930c3e6039"
                             "a33ce45964ff2167f6ecedd419db06c1");

    static uint8_t buf[200003];
    for (size_t i = 0; i < sizeof(buf); i++)
        buf[i] = (uint8_t)(i * 131 + (i >> 9));
    sha256_digest(buf, sizeof(buf), one);
    size_t steps[] = {1, 63, 64, 65, 4095, 65536, 7};
    sha256_init(&c);
    for (size_t pos = 0, k = 0; pos < sizeof(buf); k++) {
        size_t n = MIN(steps[k % 7], sizeof(buf) - pos);
        sha256_update(&c, buf + pos, n);
        pos += n;
    }
    sha256_final(&c, d);
    assert_memory_equal(d, one, 32);
}

static void test_root(void **state)
{
    (void)state;
    struct blockhash h;
    assert_int_equal(blockhash_init(&h, 0), 0);
    assert_int_equal(h.n, 0);
    char hex[65];
    blockhash_root(&h, hex); /* SHA-256 of nothing */
    assert_string_equal(hex, "e3b0c44298fc1c149afbf4c8996fb924"
                             "27ae41e4649b934ca495991b7852b855");
    blockhash_free(&h);

    assert_int_equal(blockhash_init(&h, 2 * BLOCKHASH_BLOCK + 1), 0);
    assert_int_equal(h.n, 3);
    assert_int_equal(h.block, BLOCKHASH_BLOCK);
    uint8_t cat[96];
    for (int i = 0; i < 3; i++) {
        blockhash_zero_digest(i == 2 ? 1 : BLOCKHASH_BLOCK, h.leaf[i]);
        memcpy(cat + 32 * i, h.leaf[i], 32);
    }
    uint8_t d[32];
    char want[65];
    blockhash_digest(cat, sizeof(cat), d);
    hex_of(d, want);
    blockhash_root(&h, hex);
    assert_string_equal(hex, want);

    /* Round trip through a .hashes file; its SHA-256 is the root. */
    char *p = tpath("h.hashes"), fsha[65], fsha2[65];
    assert_int_equal(blockhash_write(&h, p, fsha, NULL), 0);
    assert_string_equal(fsha, want);
    assert_int_equal(hashes_sha256(p, 3, fsha2, NULL), 0);
    assert_string_equal(fsha2, want);
    struct blockhash r;
    assert_int_equal(blockhash_read(p, h.size, &r, NULL), 0);
    assert_int_equal(r.n, 3);
    assert_memory_equal(r.leaf, h.leaf, 96);
    blockhash_free(&r);
    /* Wrong length for the size. */
    struct cbt_error *err = NULL;
    assert_int_equal(blockhash_read(p, 4 * BLOCKHASH_BLOCK, &r, &err), -1);
    assert_non_null(strstr(cbt_error_message(err), "expected 128"));
    assert_non_null(strstr(cbt_error_message(err), p));
    cbt_error_free(err);
    err = NULL;
    /* The digest of a file of another length is refused before reading. */
    assert_int_equal(hashes_sha256(p, 4, fsha2, &err), -1);
    assert_non_null(
        strstr(cbt_error_message(err), "is 96 bytes; expected 128"));
    cbt_error_free(err);
    err = NULL;
    assert_int_equal(blockhash_read(p, 2 * BLOCKHASH_BLOCK, &r, &err), -1);
    cbt_error_free(err);
    err = NULL;
    char *missing = tpath("none.hashes");
    assert_int_equal(blockhash_read(missing, 1, &r, &err), -1);
    assert_int_equal(cbt_error_errno(err), ENOENT);
    cbt_error_free(err);
    free(missing);
    free(p);
    blockhash_free(&h);
}

/*
 * The streamed hashes writer and reader: leaves put one at a time,
 * repeated across the writer's 1 MiB buffer, and copied from a reader
 * across its windows give the file blockhash_write writes for the same
 * leaves, with the same digest; the reader's digest and windows are the
 * file's; an existing name is never replaced and leaves nothing behind.
 */
static void test_hashes_streamed(void **state)
{
    (void)state;
    /* 100,000 leaves: more than three buffers and windows of 32768. */
    enum { N = 100000 };
    struct blockhash h;
    assert_int_equal(blockhash_init(&h, (uint64_t)N * BLOCKHASH_BLOCK), 0);
    uint8_t zd[32];
    blockhash_zero_digest(BLOCKHASH_BLOCK, zd);
    for (uint64_t i = 0; i < N; i++) {
        if (i >= 1000 && i < 70000)
            memcpy(h.leaf[i], zd, 32); /* a long repeat */
        else
            blockhash_digest(&i, sizeof(i), h.leaf[i]);
    }
    char *ref = tpath("ref.hashes"), *src = tpath("src.hashes");
    char *out = tpath("out.hashes"), want[65], got[65], rd[65];
    assert_int_equal(blockhash_write(&h, ref, want, NULL), 0);
    assert_int_equal(blockhash_write(&h, src, want, NULL), 0);

    struct hashes_reader r = {0};
    assert_int_equal(hashes_reader_open(&r, src, N, rd, NULL), 0);
    assert_string_equal(rd, want);
    struct hashes_writer w;
    assert_int_equal(hashes_writer_open(&w, out, NULL), 0);
    for (uint64_t i = 0; i < 1000; i++)
        assert_int_equal(hashes_writer_put(&w, h.leaf[i]), 0);
    assert_int_equal(hashes_writer_repeat(&w, zd, 69000), 0);
    /* the rest from the reader, in pieces that straddle its windows */
    for (uint64_t i = 70000; i < N;) {
        uint64_t k = MIN((uint64_t)7777, (uint64_t)N - i);
        assert_int_equal(hashes_writer_copy(&w, &r, i, k), 0);
        i += k;
    }
    assert_int_equal(w.n, N);
    assert_int_equal(hashes_writer_finish(&w, got, NULL), 0);
    hashes_writer_abort(&w);
    assert_string_equal(got, want);
    char sha[65];
    assert_int_equal(hashes_sha256(out, N, sha, NULL), 0);
    assert_string_equal(sha, want);

    /* Windows: any first leaf, at least one leaf, the file's bytes. */
    for (uint64_t i = 0; i < N; i += 12345) {
        const uint8_t *lv;
        uint64_t k;
        assert_int_equal(hashes_reader_window(&r, i, &lv, &k), 0);
        assert_true(k >= 1 && i + k <= N);
        assert_memory_equal(lv, h.leaf[i], 32);
        assert_memory_equal(lv + (k - 1) * 32, h.leaf[i + k - 1], 32);
    }
    hashes_reader_close(&r);
    hashes_reader_close(&r); /* closing twice does nothing */

    /* Never over an existing file; nothing left behind. */
    assert_int_equal(hashes_writer_open(&w, out, NULL), 0);
    assert_int_equal(hashes_writer_put(&w, zd), 0);
    struct cbt_error *err = NULL;
    assert_int_equal(hashes_writer_finish(&w, got, &err), -1);
    assert_int_equal(cbt_error_errno(err), EEXIST);
    cbt_error_free(err);
    hashes_writer_abort(&w);
    assert_int_equal(hashes_sha256(out, N, sha, NULL), 0);
    assert_string_equal(sha, want);

    blockhash_free(&h);
    unlink(ref);
    unlink(src);
    unlink(out);
    free(ref);
    free(src);
    free(out);
}

/* ---- manifests ---- */

static const char *ID = "0f0e0d0c-0b0a-4908-8706-050403020100";
static const char *SHA_A =
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
static const char *SHA_B =
    "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

static void fill_full(struct manifest *m, const char *image, const char *ck,
                      const char *id)
{
    memset(m, 0, sizeof(*m));
    m->complete = true;
    m->tool = strdup("cbt 0.1.0");
    m->created = strdup("2026-01-02T03:04:05.000000006Z");
    m->disk_path = strdup("/vm/disk.qcow2");
    m->disk_id = strdup(id);
    m->kind = CBT_BACKUP_FULL;
    m->checkpoint = strdup(ck);
    m->checkpoint_order = 1;
    m->checkpoint_created = strdup("2026-01-02T03:04:06.000000000Z");
    m->image_file = strdup(image);
    m->image_format = strdup("qcow2");
    m->virtual_size = 3 * BLOCKHASH_BLOCK + 512;
    m->dirty = m->virtual_size;
    m->copied = 65536;
    m->zeroed = 512;
    m->block_size = BLOCKHASH_BLOCK;
    m->blocks = 4;
    m->hash_file = cbt_strdup_printf("%s.hashes", image);
    memcpy(m->hash_file_sha256, SHA_B, 65);
    memcpy(m->root, SHA_B, 65);
}

static void write_manifest(const char *name, const struct manifest *m)
{
    char *p = tpath(name);
    assert_int_equal(manifest_write(p, m, true, NULL), 0);
    free(p);
}

static void test_roundtrip(void **state)
{
    (void)state;
    struct manifest m, r;
    fill_full(&m, "full.qcow2", "c1", ID);
    write_manifest("full.qcow2.json", &m);
    char *p = tpath("full.qcow2.json");
    assert_int_equal(manifest_read(p, &r, NULL, NULL), 0);
    assert_true(r.complete);
    assert_string_equal(r.tool, m.tool);
    assert_string_equal(r.created, m.created);
    assert_string_equal(r.disk_path, m.disk_path);
    assert_string_equal(r.disk_id, ID);
    assert_int_equal(r.kind, CBT_BACKUP_FULL);
    assert_string_equal(r.checkpoint, "c1");
    assert_int_equal(r.checkpoint_order, 1);
    assert_null(r.since);
    assert_null(r.parent_file);
    assert_string_equal(r.image_file, "full.qcow2");
    assert_string_equal(r.image_format, "qcow2");
    assert_int_equal(r.virtual_size, m.virtual_size);
    assert_int_equal(r.dirty, m.dirty);
    assert_int_equal(r.copied, 65536);
    assert_int_equal(r.zeroed, 512);
    assert_false(r.has_extents);
    assert_int_equal(r.blocks, 4);
    assert_string_equal(r.hash_file, "full.qcow2.hashes");
    assert_string_equal(r.root, SHA_B);

    /* Keys in the documented order, and no temporary file left. */
    char *text = slurp(p);
    const char *keys[] = {"\"format\"", "\"version\"", "\"complete\"",
                          "\"tool\"", "\"created\"", "\"disk\"", "\"kind\"",
                          "\"checkpoint\"", "\"since\"", "\"parent\"",
                          "\"image\"", "\"bytes\"", "\"extents\"", "\"hash\""};
    const char *prev = text;
    for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
        const char *at = strstr(text, keys[i]);
        assert_non_null(at);
        assert_true(at >= prev);
        prev = at;
    }
    free(text);
    char *tmp = tpath("full.qcow2.json.tmp");
    assert_int_not_equal(access(tmp, F_OK), 0);
    free(tmp);
    manifest_free(&r);
    free(p);

    /* An incremental raw backup with extents. */
    free(m.image_file);
    free(m.image_format);
    free(m.hash_file);
    m.image_file = strdup("inc.raw");
    m.image_format = strdup("raw");
    m.hash_file = strdup("inc.raw.hashes");
    m.kind = CBT_BACKUP_INCREMENTAL;
    m.since = strdup("c1");
    m.parent_file = strdup("full.qcow2");
    memcpy(m.parent_manifest_sha256, SHA_A, 65);
    free(m.checkpoint);
    m.checkpoint = strdup("c2");
    m.checkpoint_order = 2;
    m.has_extents = true;
    struct manifest_extent ext[] = {{0, 65536, false},
                                    {65536, 4096, true},
                                    {3 * 65536, 512, false}};
    m.extents = malloc(sizeof(ext));
    memcpy(m.extents, ext, sizeof(ext));
    m.nextents = 3;
    write_manifest("inc.raw.json", &m);
    p = tpath("inc.raw.json");
    assert_int_equal(manifest_read(p, &r, NULL, NULL), 0);
    assert_int_equal(r.kind, CBT_BACKUP_INCREMENTAL);
    assert_string_equal(r.since, "c1");
    assert_string_equal(r.parent_file, "full.qcow2");
    assert_string_equal(r.parent_manifest_sha256, SHA_A);
    assert_true(r.has_extents);
    assert_int_equal(r.nextents, 3);
    for (size_t i = 0; i < 3; i++) {
        assert_int_equal(r.extents[i].start, ext[i].start);
        assert_int_equal(r.extents[i].length, ext[i].length);
        assert_int_equal(r.extents[i].zero, ext[i].zero);
    }
    manifest_free(&r);
    free(p);

    /* Raw with no extents at all is an empty list. */
    free(m.extents);
    m.extents = NULL;
    m.nextents = 0;
    write_manifest("inc.raw.json", &m);
    p = tpath("inc.raw.json");
    assert_int_equal(manifest_read(p, &r, NULL, NULL), 0);
    assert_true(r.has_extents);
    assert_int_equal(r.nextents, 0);
    manifest_free(&r);
    free(p);
    manifest_free(&m);
    manifest_free(&m); /* idempotent */
}

/* A valid full manifest as text, with `from` replaced by `to`. */
static char *variant(const char *from, const char *to)
{
    static const char *base =
        "{\"format\": \"cbt-backup\", \"version\": 1, \"complete\": true,"
        " \"tool\": \"cbt 0.1.0\", \"created\": \"2026-01-01T00:00:00Z\","
        " \"disk\": {\"path\": \"d.qcow2\","
        " \"id\": \"0f0e0d0c-0b0a-4908-8706-050403020100\"},"
        " \"kind\": \"full\","
        " \"checkpoint\": {\"name\": \"c1\", \"order\": 1,"
        " \"created\": \"2026-01-01T00:00:01Z\"},"
        " \"since\": null, \"parent\": null,"
        " \"image\": {\"file\": \"f.qcow2\", \"format\": \"qcow2\","
        " \"virtual-size\": 131073},"
        " \"bytes\": {\"dirty\": 131073, \"copied\": 65536, \"zeroed\": 0},"
        " \"extents\": null,"
        " \"hash\": {\"algorithm\": \"sha256-blocks-v1\", \"block-size\": 65536,"
        " \"blocks\": 3, \"file\": \"f.qcow2.hashes\","
        " \"file-sha256\": \"0123456789abcdef0123456789abcdef0123456789abcdef"
        "0123456789abcdef\","
        " \"root\": \"0123456789abcdef0123456789abcdef0123456789abcdef"
        "0123456789abcdef\"}}";
    if (!from)
        return strdup(base);
    const char *at = strstr(base, from);
    assert_non_null(at);
    return cbt_strdup_printf("%.*s%s%s", (int)(at - base), base, to,
                             at + strlen(from));
}

static void expect_bad(const char *from, const char *to, const char *msg)
{
    char *text = variant(from, to);
    struct manifest m;
    struct cbt_error *err = NULL;
    int r = manifest_parse(text, strlen(text), "x.json", &m, &err);
    if (r == 0)
        fail_msg("accepted: %s -> %s", from, to);
    assert_non_null(err);
    if (!strstr(cbt_error_message(err), msg))
        fail_msg("%s -> %s: message '%s' lacks '%s'", from, to,
                 cbt_error_message(err), msg);
    assert_non_null(strstr(cbt_error_message(err), "x.json"));
    cbt_error_free(err);
    free(text);
}

static void test_parse_refusals(void **state)
{
    (void)state;
    struct manifest m;
    char *ok = variant(NULL, NULL);
    assert_int_equal(manifest_parse(ok, strlen(ok), "x", &m, NULL), 0);
    assert_int_equal(m.blocks, 3);
    manifest_free(&m);
    /* Unknown keys are ignored. */
    char *more = variant("\"kind\"", "\"later\": [1, 2], \"kind\"");
    assert_int_equal(manifest_parse(more, strlen(more), "x", &m, NULL), 0);
    manifest_free(&m);
    free(more);
    /* The optional keys: absent in the base (old manifests), read when
     * present, their types and rules checked. */
    assert_int_equal(manifest_parse(ok, strlen(ok), "x", &m, NULL), 0);
    assert_false(m.rescan || m.has_file_bytes);
    assert_null(m.compression);
    manifest_free(&m);
    char *opt = variant("\"virtual-size\": 131073}",
                        "\"virtual-size\": 131073, \"compression\": \"zstd\"}");
    char *opt2 = cbt_strdup_printf("%.*s, \"file\": 4096}%s",
                                   (int)(strstr(opt, "\"zeroed\": 0}") +
                                         strlen("\"zeroed\": 0") - opt),
                                   opt, strstr(opt, "\"zeroed\": 0}") +
                                            strlen("\"zeroed\": 0}"));
    assert_int_equal(manifest_parse(opt2, strlen(opt2), "x", &m, NULL), 0);
    assert_string_equal(m.compression, "zstd");
    assert_true(m.has_file_bytes);
    assert_int_equal(m.file_bytes, 4096);
    manifest_free(&m);
    free(opt);
    free(opt2);
    expect_bad("\"virtual-size\": 131073}",
               "\"virtual-size\": 131073, \"compression\": \"lz4\"}",
               "'image.compression' is another string; expected \"zlib\" or "
               "\"zstd\"");
    expect_bad("\"zeroed\": 0}", "\"zeroed\": 0, \"file\": -1}",
               "'bytes.file'");
    expect_bad("\"extents\": null", "\"rescan\": 1, \"extents\": null",
               "'rescan' is an integer; expected true or false");
    expect_bad("\"extents\": null", "\"rescan\": true, \"extents\": null",
               "'rescan' is true for a full backup");
    /* Truncated anywhere: never accepted. */
    for (size_t len = 0; len < strlen(ok); len += 7) {
        struct cbt_error *err = NULL;
        assert_int_equal(manifest_parse(ok, len, "x", &m, &err), -1);
        cbt_error_free(err);
    }
    free(ok);

    expect_bad("{", "[", "not a valid manifest");
    expect_bad("\"kind\"", "\"kind\": \"full\", \"kind\"", "duplicate");
    expect_bad("\"cbt-backup\"", "\"other\"", "'format'");
    expect_bad("\"version\": 1", "\"version\": 2", "version 2");
    expect_bad("\"version\": 1", "\"version\": \"1\"", "'version'");
    expect_bad("\"complete\": true", "\"complete\": 1", "'complete'");
    expect_bad("\"tool\": \"cbt 0.1.0\"", "\"tool\": \"\"", "'tool' is empty");
    expect_bad("\"tool\": \"cbt 0.1.0\"", "\"tool\": \"a\\u0000b\"", "NUL");
    expect_bad("\"tool\": \"cbt 0.1.0\", ", "", "'tool' is missing");
    expect_bad("0f0e0d0c-0b0a", "0f0e0d0c+0b0a",
               "'disk.id' is not a UUID; expected a UUID");
    expect_bad("\"kind\": \"full\"", "\"kind\": \"fuller\"", "'kind'");
    expect_bad("\"order\": 1", "\"order\": 0",
               "'checkpoint.order' is 0; expected an integer from 1");
    expect_bad("\"order\": 1", "\"order\": -1", "negative");
    expect_bad("\"order\": 1", "\"order\": 1.5",
               "'checkpoint.order' is a real number; expected an integer");
    expect_bad("\"since\": null", "\"since\": \"c0\"", "since or parent");
    expect_bad("\"parent\": null", "\"parent\": 7", "'parent'");
    expect_bad("\"parent\": null",
               "\"parent\": {\"file\": \"../etc/x\", \"manifest-sha256\": "
               "\"0123456789abcdef0123456789abcdef0123456789abcdef0123456789"
               "abcdef\"}",
               "'parent.file' is a path; expected a plain file name");
    expect_bad("\"kind\": \"full\"", "\"kind\": \"incremental\"",
               "since or parent is null");
    expect_bad("\"file\": \"f.qcow2\"", "\"file\": \"/abs/f.qcow2\"",
               "'image.file' is a path; expected a plain file name");
    expect_bad("\"file\": \"f.qcow2\"", "\"file\": \"..\"", "plain file name");
    expect_bad("\"format\": \"qcow2\"", "\"format\": \"vmdk\"",
               "'image.format' is another string; expected \"qcow2\" or "
               "\"raw\"");
    expect_bad("\"virtual-size\": 131073", "\"virtual-size\": -5", "negative");
    expect_bad("\"copied\": 65536", "\"copied\": 999999999", "too large");
    expect_bad("\"extents\": null", "\"extents\": []",
               "expected null for a qcow2");
    expect_bad("\"sha256-blocks-v1\"", "\"sha512\"", "'hash.algorithm'");
    expect_bad("\"block-size\": 65536", "\"block-size\": 4096",
               "'hash.block-size' is 4096; expected 65536");
    expect_bad("\"blocks\": 3", "\"blocks\": 2",
               "'hash.blocks' is 2; expected 3 (the virtual size divided by "
               "65536");
    expect_bad("\"root\": \"0123", "\"root\": \"0A23", "SHA-256");
    expect_bad("\"root\": \"0123", "\"root\": \"123", "SHA-256");
    expect_bad("\"hash\": {", "\"hash\": 5, \"x\": {",
               "'hash' is an integer; expected an object");

    /* Raw: extents must be a sorted list inside the disk. */
    const char *rawfmt = "\"format\": \"raw\"";
    char *raw;
    struct {
        const char *ext, *msg;
    } cases[] = {
        {"null", "'extents' is null; expected an array"},
        {"[[0, 10]]", "'extents[0]' is not a list of three; expected [start"},
        {"[[0, 0, \"data\"]]", "length > 0"},
        {"[[-1, 10, \"data\"]]", "a start >= 0"},
        {"[[0, 10, \"hole\"]]", "\"data\" or \"zero\""},
        {"[[131000, 100, \"data\"]]", "past the virtual size"},
        {"[[100, 10, \"data\"], [0, 10, \"zero\"]]", "not sorted"},
        {"[[0, 10, \"data\"], [5, 10, \"zero\"]]",
         "'extents[1]' is not sorted or overlaps"},
        {"[[9223372036854775807, 9223372036854775807, \"data\"]]", "past"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char *a = variant("\"format\": \"qcow2\"", rawfmt);
        const char *at = strstr(a, "\"extents\": null");
        raw = cbt_strdup_printf("%.*s\"extents\": %s%s", (int)(at - a), a,
                                cases[i].ext, at + strlen("\"extents\": null"));
        struct cbt_error *err = NULL;
        assert_int_equal(manifest_parse(raw, strlen(raw), "r", &m, &err), -1);
        if (!strstr(cbt_error_message(err), cases[i].msg))
            fail_msg("%s: %s", cases[i].ext, cbt_error_message(err));
        cbt_error_free(err);
        free(raw);
        free(a);
    }
}

/* Issue 10: errors about the three file fields say which one, and what was
 * expected; non-regular files are refused without blocking or reading. */
static void test_messages_and_file_types(void **state)
{
    (void)state;
    const char *sha = "\"0123456789abcdef0123456789abcdef0123456789abcdef"
                      "0123456789abcdef\"";
    char *parent = cbt_strdup_printf("\"parent\": {\"file\": 7, "
                                     "\"manifest-sha256\": %s}", sha);
    struct {
        const char *from, *to, *msg;
    } cases[] = {
        {"\"parent\": null", parent,
         "x.json: manifest field 'parent.file' is an integer; expected a "
         "string of 1 to 255 bytes"},
        {"\"file\": \"f.qcow2\"", "\"file\": \"\"",
         "x.json: manifest field 'image.file' is empty; expected"},
        {"\"file\": \"f.qcow2.hashes\"", "\"file\": \"../h\"",
         "x.json: manifest field 'hash.file' is a path; expected a plain file "
         "name in the backup's folder"},
        {"\"file-sha256\": \"0123", "\"file-sha256\": \"X123",
         "x.json: manifest field 'hash.file-sha256' is not a SHA-256 digest; "
         "expected a SHA-256 digest (64 lower-case hex digits)"},
        {"\"virtual-size\": 131073", "\"virtual-size\": \"big\"",
         "x.json: manifest field 'image.virtual-size' is a string; expected "
         "an integer from 0 to 2^63-1"},
        {"\"copied\": 65536", "\"copied\": 131074",
         "'bytes.copied' is 131074 (too large); expected an integer from 0 "
         "to the virtual size (131073)"},
        {"\"created\": \"2026-01-01T00:00:01Z\"", "\"x\": 1",
         "'checkpoint.created' is missing; expected a string"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        expect_bad(cases[i].from, cases[i].to, cases[i].msg);
    free(parent);

    /* A FIFO, /dev/zero and a folder are refused as the manifest: no open
     * that waits for a writer, no read that never ends. */
    strcat(tmpdir, "/kinds");
    assert_int_equal(mkdir(tmpdir, 0755), 0);
    char *fifo = tpath("fifo.json");
    assert_int_equal(mkfifo(fifo, 0644), 0);
    char *zero = tpath("zero.json");
    assert_int_equal(symlink("/dev/zero", zero), 0);
    char *dir = tpath("dir.json");
    assert_int_equal(mkdir(dir, 0755), 0);
    const char *paths[] = {fifo, zero, dir};
    const char *types[] = {"a FIFO", "a character device", "a folder"};
    for (size_t i = 0; i < 3; i++) {
        struct manifest m;
        struct cbt_error *err = NULL;
        assert_int_equal(manifest_read(paths[i], &m, NULL, &err), -1);
        char *want = cbt_strdup_printf("%s: the manifest is %s, not a regular "
                                       "file", paths[i], types[i]);
        if (!strstr(cbt_error_message(err), want))
            fail_msg("'%s' lacks '%s'", cbt_error_message(err), want);
        assert_int_equal(cbt_error_kind(err), CBT_ERR_CORRUPT);
        free(want);
        cbt_error_free(err);
        err = NULL;
        struct blockhash h;
        assert_int_equal(blockhash_read(paths[i], 1, &h, &err), -1);
        assert_non_null(strstr(cbt_error_message(err), "not a regular file"));
        cbt_error_free(err);
        err = NULL;
        char hex[65];
        assert_int_equal(hashes_sha256(paths[i], 1, hex, &err), -1);
        assert_non_null(strstr(cbt_error_message(err), "not a regular file"));
        cbt_error_free(err);
    }
    /* A manifest larger than the bound is refused before it is read. */
    struct cbt_error *err = NULL;
    char *buf;
    size_t len;
    char *big = tpath("big.json");
    FILE *f = fopen(big, "w");
    assert_non_null(f);
    assert_int_equal(fseek(f, 4096, SEEK_SET), 0);
    fputc('x', f);
    fclose(f);
    assert_int_equal(bfile_read_all(big, "manifest", 4096, &buf, &len, &err),
                     -1);
    assert_non_null(strstr(cbt_error_message(err), "is 4097 bytes; expected "
                                                   "at most 4096"));
    cbt_error_free(err);
    unlink(fifo);
    unlink(zero);
    rmdir(dir);
    unlink(big);
    free(fifo);
    free(zero);
    free(dir);
    free(big);
    rmdir(tmpdir);
    *strrchr(tmpdir, '/') = '\0';
}

static void test_paths(void **state)
{
    (void)state;
    char *s = manifest_path_for("/b/x.qcow2");
    assert_string_equal(s, "/b/x.qcow2.json");
    free(s);
    s = hashes_path_for("x.qcow2");
    assert_string_equal(s, "x.qcow2.hashes");
    free(s);
    s = manifest_sibling("/b/x.qcow2", "y.qcow2");
    assert_string_equal(s, "/b/y.qcow2");
    free(s);
    s = manifest_sibling("x.qcow2", "y.qcow2");
    assert_string_equal(s, "y.qcow2");
    free(s);
}

static void test_find(void **state)
{
    (void)state;
    /* A folder of its own: the other tests leave manifests behind. */
    strcat(tmpdir, "/find");
    assert_int_equal(mkdir(tmpdir, 0755), 0);
    const char *other = "11111111-2222-3333-4444-555555555555";
    struct manifest m;
    fill_full(&m, "a.qcow2", "c1", ID);
    write_manifest("a.qcow2.json", &m);
    manifest_free(&m);
    fill_full(&m, "b.qcow2", "c2", ID);
    write_manifest("b.qcow2.json", &m);
    manifest_free(&m);
    fill_full(&m, "o.qcow2", "c1", other); /* another disk, same name */
    write_manifest("o.qcow2.json", &m);
    manifest_free(&m);
    fill_full(&m, "i.qcow2", "c3", ID); /* incomplete */
    m.complete = false;
    write_manifest("i.qcow2.json", &m);
    manifest_free(&m);
    fill_full(&m, "real.qcow2", "c4", ID); /* copied under another name */
    write_manifest("copy.qcow2.json", &m);
    manifest_free(&m);
    put_file("notes.json", "{\"hello\": 1}\n");
    put_file("junk.json", "not json");

    char *path, sha[65];
    struct cbt_error *err = NULL;
    if (manifest_find_by_checkpoint(tmpdir, ID, "c1", &path, &m, sha, &err) < 0)
        fail_msg("%s", cbt_error_message(err));
    char *want = tpath("a.qcow2");
    assert_string_equal(path, want);
    assert_string_equal(m.checkpoint, "c1");
    /* sha: the digest of the manifest's bytes. */
    char *apath = tpath("a.qcow2.json"), *text;
    size_t tlen;
    assert_int_equal(bfile_read_all(apath, "manifest", 1 << 20, &text, &tlen,
                                    NULL), 0);
    uint8_t d[32];
    char hex[65];
    sha256_digest(text, tlen, d);
    sha256_hex(d, hex);
    assert_string_equal(sha, hex);
    free(text);
    free(apath);
    free(want);
    free(path);
    manifest_free(&m);
    /* The id compares without regard to case. */
    assert_int_equal(manifest_find_by_checkpoint(
                         tmpdir, "11111111-2222-3333-4444-555555555555", "c1",
                         &path, &m, NULL, NULL),
                     0);
    assert_non_null(strstr(path, "o.qcow2"));
    free(path);
    manifest_free(&m);

    const char *absent[] = {"c3", "c4", "c9"};
    for (size_t i = 0; i < 3; i++) {
        assert_int_equal(manifest_find_by_checkpoint(tmpdir, ID, absent[i],
                                                     &path, &m, NULL, &err),
                         -1);
        assert_int_equal(cbt_error_errno(err), ENOENT);
        assert_null(path);
        cbt_error_free(err);
        err = NULL;
    }

    fill_full(&m, "a2.qcow2", "c1", ID);
    write_manifest("a2.qcow2.json", &m);
    manifest_free(&m);
    assert_int_equal(
        manifest_find_by_checkpoint(tmpdir, ID, "c1", &path, &m, NULL, &err),
        -1);
    assert_int_equal(cbt_error_errno(err), EEXIST);
    assert_non_null(strstr(cbt_error_message(err), "a.qcow2.json"));
    assert_non_null(strstr(cbt_error_message(err), "a2.qcow2.json"));
    cbt_error_free(err);
    err = NULL;

    char *nodir = tpath("nodir");
    assert_int_equal(
        manifest_find_by_checkpoint(nodir, ID, "c1", &path, &m, NULL, &err),
        -1);
    assert_int_equal(cbt_error_errno(err), ENOENT);
    cbt_error_free(err);
    free(nodir);
    *strrchr(tmpdir, '/') = '\0';
}

static void test_write_failure(void **state)
{
    (void)state;
    struct manifest m;
    fill_full(&m, "a.qcow2", "c1", ID);
    struct cbt_error *err = NULL;
    char *p = tpath("nodir/a.qcow2.json");
    assert_int_equal(manifest_write(p, &m, false, &err), -1);
    assert_non_null(strstr(cbt_error_message(err), "nodir"));
    cbt_error_free(err);
    free(p);
    manifest_free(&m);
}

/* The files in tmpdir, sorted, as one string "a b c". */
static char *listing(void)
{
    struct dirent **v;
    int n = scandir(tmpdir, &v, NULL, alphasort);
    assert_true(n >= 0);
    char *out = strdup("");
    for (int i = 0; i < n; i++) {
        if (v[i]->d_name[0] != '.') {
            char *t = cbt_strdup_printf("%s%s%s", out, *out ? " " : "",
                                        v[i]->d_name);
            free(out);
            out = t;
        }
        free(v[i]);
    }
    free(v);
    return out;
}

/* Issue 10: new files never go through a name that exists (a planted
 * symlink included), leave no temporary file, and only files this process
 * created are renamed or removed. */
static void test_new_files_are_exclusive(void **state)
{
    (void)state;
    strcat(tmpdir, "/excl");
    assert_int_equal(mkdir(tmpdir, 0755), 0);
    char *victim = tpath("victim"), *link = tpath("n.hashes");
    put_file("victim", "keep");
    assert_int_equal(symlink(victim, link), 0);
    struct cbt_error *err = NULL;
    /* a link at the name: refused, the file it points to untouched */
    assert_int_equal(bfile_write_new(link, "new", 3, false, &err), -1);
    assert_int_equal(cbt_error_errno(err), EEXIST);
    cbt_error_free(err);
    err = NULL;
    assert_int_equal(bfile_create_excl(link, &err), -1);
    assert_int_equal(cbt_error_errno(err), EEXIST);
    cbt_error_free(err);
    err = NULL;
    char *text = slurp(victim);
    assert_string_equal(text, "keep");
    free(text);
    /* the links cbt used to write through (NAME.tmp) change nothing */
    char *tmplink = tpath("m.json.tmp"), *m = tpath("m.json");
    assert_int_equal(symlink(victim, tmplink), 0);
    assert_int_equal(bfile_write_new(m, "first", 5, false, NULL), 0);
    text = slurp(victim);
    assert_string_equal(text, "keep");
    free(text);
    char *names = listing();
    assert_string_equal(names, "m.json m.json.tmp n.hashes victim");
    free(names);
    /* replace: a new file renamed over the old one, no temporary left */
    assert_int_equal(bfile_write_new(m, "second", 6, true, NULL), 0);
    text = slurp(m);
    assert_string_equal(text, "second");
    free(text);
    names = listing();
    assert_string_equal(names, "m.json m.json.tmp n.hashes victim");
    free(names);
    struct stat st;
    assert_int_equal(lstat(m, &st), 0);
    assert_true(S_ISREG(st.st_mode));
    /* rename and unlink only the file created */
    char *part = tpath("t.part"), *done = tpath("t");
    int fd = bfile_create_excl(part, NULL);
    assert_true(fd >= 0);
    assert_int_equal(unlink(part), 0);
    put_file("t.part", "someone else's");
    assert_int_equal(bfile_rename_ours(fd, part, done, &err), -1);
    assert_non_null(strstr(cbt_error_message(err), "no longer the file"));
    cbt_error_free(err);
    err = NULL;
    bfile_unlink_ours(fd, part);
    assert_int_equal(lstat(part, &st), 0);
    close(fd);
    assert_int_equal(unlink(part), 0);
    fd = bfile_create_excl(part, NULL);
    assert_true(fd >= 0);
    assert_int_equal(bfile_rename_ours(fd, part, done, NULL), 0);
    assert_int_equal(lstat(done, &st), 0);
    /* a name that appeared meanwhile is never replaced */
    int fd2 = bfile_create_excl(part, NULL);
    assert_true(fd2 >= 0);
    assert_int_equal(bfile_rename_ours(fd2, part, done, &err), -1);
    assert_int_equal(cbt_error_errno(err), EEXIST);
    cbt_error_free(err);
    bfile_unlink_ours(fd2, part);
    assert_int_equal(lstat(part, &st), -1);
    close(fd);
    close(fd2);
    free(part);
    free(done);
    free(tmplink);
    free(m);
    free(victim);
    free(link);
    *strrchr(tmpdir, '/') = '\0';
}

static int setup(void **state)
{
    (void)state;
    return tmpdir_make(tmpdir, "manifest");
}

static int teardown(void **state)
{
    (void)state;
    return tmpdir_remove(tmpdir);
}

static void quiet(void *opaque, const char *msg)
{
    (void)opaque;
    (void)msg;
}

int main(void)
{
    warn_scope_enter(quiet, NULL); /* the tests run on this thread */
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_digests),
        cmocka_unit_test(test_from_hex),
        cmocka_unit_test(test_streaming),
        cmocka_unit_test(test_root),
        cmocka_unit_test(test_hashes_streamed),
        cmocka_unit_test(test_roundtrip),
        cmocka_unit_test(test_parse_refusals),
        cmocka_unit_test(test_messages_and_file_types),
        cmocka_unit_test(test_paths),
        cmocka_unit_test(test_find),
        cmocka_unit_test(test_write_failure),
        cmocka_unit_test(test_new_files_are_exclusive),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
