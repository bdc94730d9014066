/*
 * SHA-256 (FIPS 180-4) through libcrypto's low-level interface, which uses
 * the CPU's SHA instructions when present and needs no allocation, so a
 * context can live on the stack and be dropped without a free.  (The
 * interface is deprecated in OpenSSL 3 in favour of EVP, whose contexts are
 * heap objects; it is still part of the library and as fast.)
 */
#define OPENSSL_SUPPRESS_DEPRECATED 1

#include <stdio.h>

#include <openssl/sha.h>

#include "util.h"

_Static_assert(sizeof(SHA256_CTX) <= sizeof(((struct sha256_ctx *)0)->opaque),
               "struct sha256_ctx too small for SHA256_CTX");

static SHA256_CTX *ctx_of(struct sha256_ctx *c)
{
    return (SHA256_CTX *)(void *)c->opaque;
}

void sha256_init(struct sha256_ctx *c)
{
    SHA256_Init(ctx_of(c));
}

void sha256_update(struct sha256_ctx *c, const void *data, size_t len)
{
    SHA256_Update(ctx_of(c), data, len);
}

void sha256_final(struct sha256_ctx *c, uint8_t digest[32])
{
    SHA256_Final(digest, ctx_of(c));
}

void sha256_hex(const uint8_t digest[32], char hex[65])
{
    static const char digits[] = "0123456789abcdef";
    for (int i = 0; i < 32; i++) {
        hex[2 * i] = digits[digest[i] >> 4];
        hex[2 * i + 1] = digits[digest[i] & 15];
    }
    hex[64] = '\0';
}

int sha256_from_hex(const char *hex, uint8_t digest[32])
{
    for (int i = 0; i < 64; i++) {
        char c = hex[i];
        int v = c >= '0' && c <= '9'   ? c - '0'
                : c >= 'a' && c <= 'f' ? c - 'a' + 10
                : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                       : -1;
        if (v < 0)
            return -1;
        if (i % 2 == 0)
            digest[i / 2] = (uint8_t)(v << 4);
        else
            digest[i / 2] |= (uint8_t)v;
    }
    return hex[64] == '\0' ? 0 : -1;
}

void sha256_digest(const void *data, size_t len, uint8_t digest[32])
{
    /* Not OpenSSL 3's one-shot SHA256(): it goes through EVP_Q_digest,
     * whose first call loads openssl.cnf and the default provider (about
     * 1 ms of every cbt process that hashes a path). */
    struct sha256_ctx c;
    sha256_init(&c);
    sha256_update(&c, data, len);
    sha256_final(&c, digest);
}
