/*
 * Block hashes of a guest view (sha256-blocks-v1, docs/backups.md): the
 * view cut into 64 KiB blocks, SHA-256 of each (the leaves), and the root,
 * SHA-256 of the concatenated leaves.  Reading and writing the .hashes file
 * is in manifest.c, with the backup's other files.
 */
#include <assert.h>

#include "../util/util.h"
#include "manifest.h"

/* SHA-256 of 65536 zero bytes: most zero blocks of a disk are whole
 * blocks, and their digest needs no hashing (checked by test_manifest). */
static const uint8_t zero_block_digest[32] = {
    0xde, 0x2f, 0x25, 0x60, 0x64, 0xa0, 0xaf, 0x79, 0x77, 0x47, 0xc2,
    0xb9, 0x75, 0x05, 0xdc, 0x0b, 0x9f, 0x3d, 0xf0, 0xde, 0x4f, 0x48,
    0x9e, 0xac, 0x73, 0x1c, 0x23, 0xae, 0x9c, 0xa9, 0xcc, 0x31,
};

int blockhash_init(struct blockhash *h, uint64_t size)
{
    memset(h, 0, sizeof(*h));
    uint64_t n = DIV_ROUND_UP(size, (uint64_t)BLOCKHASH_BLOCK), bytes;
    if (mul_overflow_u64(n, 32, &bytes) || bytes > SIZE_MAX)
        return -ENOMEM;
    h->size = size;
    h->block = BLOCKHASH_BLOCK;
    h->n = n;
    if (n) {
        h->leaf = calloc((size_t)n, 32);
        if (!h->leaf)
            return -ENOMEM;
    }
    return 0;
}

void blockhash_free(struct blockhash *h)
{
    free(h->leaf);
    memset(h, 0, sizeof(*h));
}

void blockhash_digest(const void *buf, size_t len, uint8_t out[32])
{
    sha256_digest(buf, len, out);
}

void blockhash_zero_digest(size_t len, uint8_t out[32])
{
    assert(len <= BLOCKHASH_BLOCK);
    if (len == BLOCKHASH_BLOCK) {
        memcpy(out, zero_block_digest, 32);
        return;
    }
    static const uint8_t zeroes[4096];
    struct sha256_ctx c;
    sha256_init(&c);
    for (size_t done = 0; done < len;) {
        size_t n = MIN(len - done, sizeof(zeroes));
        sha256_update(&c, zeroes, n);
        done += n;
    }
    sha256_final(&c, out);
}

void blockhash_root(const struct blockhash *h, char hex[65])
{
    struct sha256_ctx c;
    uint8_t d[32];
    sha256_init(&c);
    if (h->n)
        sha256_update(&c, h->leaf, (size_t)h->n * 32);
    sha256_final(&c, d);
    sha256_hex(d, hex);
}
