/* In-memory dirty bitmap: lazily allocated leaf pages under a hierarchical
 * summary, with qcow2 chunk serialization.
 *
 * Design
 * ------
 * The bits live in fixed-size leaf pages of PAGE_BITS (32768) bits, 4 KiB of
 * 64-bit words.  A page table holds one pointer per page, and a pointer is in
 * one of three states:
 *
 *   NULL        every bit of the page is clean (no memory held);
 *   PAGE_FULL   every bit of the page below nbits is dirty (a shared marker,
 *               never dereferenced, no memory held);
 *   allocated   a struct bm_page with the words, a population count and a
 *               per-page summary (bit i of sum[] says word i is non-zero).
 *
 * Invariants, checked by the unit test against a naive model:
 *   I1  an allocated page has 0 < count < page_nbits(): an operation that
 *       empties or fills a page turns it back into NULL or PAGE_FULL
 *       (page_settle), so "pointer != NULL" means "page has a dirty bit";
 *   I2  bits at or past nbits are zero in allocated pages, so serialization
 *       can copy whole words and counts need no masking;
 *   I3  bm->count is the number of set bits (O(1) bm_count);
 *   I4  bit p of summary level 0 is set iff pages[p] != NULL, and bit j of
 *       level k+1 is set iff word j of level k is non-zero (as QEMU's HBitmap
 *       upper levels), up to a single top word.
 *
 * Why: dirty bitmaps are sparse or dense in large runs.  A 64 TiB disk at
 * 64 KiB granularity is 2^30 bits; with a handful of dirty extents it holds
 * a few pages plus a 256 KiB page table, clear/copy/free/serialize touch
 * only the dirty pages, and next-dirty climbs the summary (at most ~5 levels
 * of single words for 2^41 bits) and the 8-word in-page summary instead of
 * reading every word.  Large ranges (bm_set over a whole disk, an all-ones
 * qcow2 table entry) become PAGE_FULL markers without touching memory.
 * Memory worst case is one bit per granule plus 1.6% of in-page summary,
 * 8 bytes per page of counts and 8 bytes per page of page table (~1.9%).
 * The page-level summary is O(npages / 64) words, negligible.
 *
 * Copies share pages (copy on write).  An allocated page carries a
 * reference count; bm_copy copies the page table and the summary and takes
 * a reference on each allocated page, and page_writable, the one way to a
 * page's words for editing, copies a page that another bitmap still holds
 * before changing it.  The block layer keeps a copy of every bitmap as the
 * rollback point and hands copies to read-only views, so without sharing
 * each open of a 16 TiB disk with a 4 KiB-granularity bitmap held 512 MiB
 * twice.  The counts are atomic because two bitmaps sharing a page may be
 * used by two threads (each bitmap still serialized by its caller); a
 * page whose count is 1 belongs to one bitmap, whose caller serializes.
 *
 * Next-clean scans the page table linearly (skipping PAGE_FULL pages in one
 * step each) and reads words only in partial pages; a clean page ends the
 * scan at once, so the cost is bounded by the dirty run being measured.
 *
 * Set/reset return void (the block layer dirties bits on the write path),
 * so a page allocation failure cannot be reported.  Instead the operation
 * errs on the dirty side: a set that cannot allocate a page marks the page
 * PAGE_FULL, a reset that cannot split a PAGE_FULL page leaves it.  A dirty
 * bit is never lost; an incremental backup may copy more than needed.
 *
 * Not internally locked: callers serialize access (see bitmap.h).  The only
 * file-scope object is the constant PAGE_FULL marker.
 */
#include <assert.h>

#include "bitmap.h"

#include "../util/util.h"

#define PAGE_SHIFT 15
#define PAGE_BITS ((uint64_t)1 << PAGE_SHIFT)
#define PAGE_MASK (PAGE_BITS - 1)
#define PAGE_WORDS (PAGE_BITS / 64)
#define SUM_WORDS (PAGE_WORDS / 64)
/* 2^41 bits / 2^15 per page = 2^26 pages: levels of 2^26, 2^20, 2^14, 2^8,
 * 4 bits; the top level is always one word. */
#define SUM_MAX_LEVELS 6
#define NONE UINT64_MAX

struct bm_page {
    uint32_t count;          /* set bits in w[] (at most PAGE_BITS) */
    uint32_t refs;           /* bitmaps sharing the page (atomic) */
    uint64_t sum[SUM_WORDS]; /* bit i set iff w[i] != 0 */
    uint64_t w[PAGE_WORDS];  /* bit b of the page is w[b/64] bit b%64 */
};

/* Hierarchical "which pages are non-NULL" summary (invariant I4). */
struct bm_summary {
    unsigned nlevels;
    uint64_t nbits[SUM_MAX_LEVELS]; /* bits in each level; level 0 = npages */
    uint64_t *lv[SUM_MAX_LEVELS];
};

struct bm_bitmap {
    uint64_t size;   /* bytes of disk covered */
    unsigned gbits;  /* log2 granularity */
    uint64_t nbits;  /* ceil(size / granularity) */
    uint64_t count;  /* set bits (I3) */
    uint64_t npages; /* ceil(nbits / PAGE_BITS) */
    uint64_t nalloc; /* allocated pages, for bm_mem_usage */
    struct bm_page **pages;
    struct bm_summary sum;
};

/* The PAGE_FULL marker: a unique, suitably aligned address. */
static const uint64_t page_full_tag;
#define PAGE_FULL ((struct bm_page *)(uintptr_t)&page_full_tag)

static inline unsigned ctz64(uint64_t v)
{
    return (unsigned)__builtin_ctzll(v);
}
static inline unsigned pop64(uint64_t v)
{
    return (unsigned)__builtin_popcountll(v);
}
static inline uint64_t bit64(uint64_t i)
{
    return (uint64_t)1 << (i % 64);
}

/* Bits of word i (of a page) that fall inside the in-page range [lo, hi). */
static uint64_t word_mask(uint64_t i, uint64_t lo, uint64_t hi)
{
    uint64_t base = i * 64;
    uint64_t s = MAX(lo, base) - base;
    uint64_t e = MIN(hi, base + 64) - base;
    uint64_t m = e == 64 ? ~(uint64_t)0 : ((uint64_t)1 << e) - 1;
    return m & ~(((uint64_t)1 << s) - 1);
}

/* ---- the page summary (I4) ---- */

static void sum_free(struct bm_summary *s)
{
    for (unsigned k = 0; k < s->nlevels; k++)
        free(s->lv[k]);
    memset(s, 0, sizeof(*s));
}

/* All-zero summary over nbits pages; 0 or -ENOMEM. */
static int sum_init(struct bm_summary *s, uint64_t nbits)
{
    uint64_t n = nbits, words;

    memset(s, 0, sizeof(*s));
    do {
        unsigned k = s->nlevels;
        assert(k < SUM_MAX_LEVELS);
        words = MAX(DIV_ROUND_UP(n, 64), 1);
        s->nbits[k] = n;
        s->lv[k] = calloc(words, sizeof(uint64_t));
        if (!s->lv[k]) {
            sum_free(s);
            return -ENOMEM;
        }
        s->nlevels++;
        n = words;
    } while (words > 1);
    return 0;
}

static size_t sum_mem(const struct bm_summary *s)
{
    size_t total = 0;
    for (unsigned k = 0; k < s->nlevels; k++)
        total += MAX(DIV_ROUND_UP(s->nbits[k], 64), 1) * sizeof(uint64_t);
    return total;
}

static void sum_set(struct bm_summary *s, uint64_t i)
{
    for (unsigned k = 0; k < s->nlevels; k++, i /= 64) {
        uint64_t old = s->lv[k][i / 64];
        s->lv[k][i / 64] = old | bit64(i);
        if (old)
            break; /* upper levels already say this word is non-zero */
    }
}

static void sum_clear(struct bm_summary *s, uint64_t i)
{
    for (unsigned k = 0; k < s->nlevels; k++, i /= 64) {
        s->lv[k][i / 64] &= ~bit64(i);
        if (s->lv[k][i / 64])
            break; /* the word stays non-zero: upper levels unchanged */
    }
}

/* First set bit >= i in level 0, or NONE.  Climb while the current word has
 * nothing at or after the position, then descend through non-zero words. */
static uint64_t sum_next(const struct bm_summary *s, uint64_t i)
{
    unsigned k = 0;

    for (;;) {
        if (i >= s->nbits[k])
            return NONE;
        uint64_t w = s->lv[k][i / 64] & (~(uint64_t)0 << (i % 64));
        if (w) {
            i = (i & ~(uint64_t)63) + ctz64(w);
            break;
        }
        if (k + 1 == s->nlevels)
            return NONE;
        i = i / 64 + 1; /* next word of level k = next bit of level k+1 */
        k++;
    }
    while (k > 0) {
        k--;
        i = i * 64 + ctz64(s->lv[k][i]); /* non-zero by I4 */
    }
    return i;
}

/* ---- pages ---- */

/* Bits of page p that lie below nbits. */
static uint64_t page_nbits(const struct bm_bitmap *bm, uint64_t p)
{
    return p + 1 < bm->npages ? PAGE_BITS : bm->nbits - (p << PAGE_SHIFT);
}

static uint64_t page_count(const struct bm_bitmap *bm, uint64_t p,
                           const struct bm_page *pg)
{
    if (!pg)
        return 0;
    return pg == PAGE_FULL ? page_nbits(bm, p) : pg->count;
}

/* A new allocated page with bits [0, n) set (n = 0: all clean); NULL on
 * ENOMEM. */
static struct bm_page *page_alloc(uint64_t n)
{
    struct bm_page *pg = calloc(1, sizeof(*pg));

    if (!pg)
        return NULL;
    for (uint64_t i = 0; i * 64 < n; i++) {
        pg->w[i] = word_mask(i, 0, n);
        pg->sum[i / 64] |= bit64(i);
    }
    pg->count = (uint32_t)n;
    pg->refs = 1;
    return pg;
}

/* Drop one reference to an allocated page; the last one frees it. */
static void page_unref(struct bm_page *pg)
{
    if (__atomic_sub_fetch(&pg->refs, 1, __ATOMIC_ACQ_REL) == 0)
        free(pg);
}

/* Replace page p by pg (NULL, PAGE_FULL or allocated), freeing the old one
 * and keeping the count (I3) and the summary (I4) right. */
static void page_store(struct bm_bitmap *bm, uint64_t p, struct bm_page *pg)
{
    struct bm_page *old = bm->pages[p];

    bm->count -= page_count(bm, p, old);
    bm->count += page_count(bm, p, pg);
    if (old && old != PAGE_FULL) {
        page_unref(old);
        bm->nalloc--;
    }
    if (pg && pg != PAGE_FULL)
        bm->nalloc++;
    bm->pages[p] = pg;
    if (pg && !old)
        sum_set(&bm->sum, p);
    else if (!pg && old)
        sum_clear(&bm->sum, p);
}

/* Restore I1 after editing the words of page p. */
static void page_settle(struct bm_bitmap *bm, uint64_t p)
{
    struct bm_page *pg = bm->pages[p];

    if (!pg || pg == PAGE_FULL)
        return;
    if (pg->count == 0)
        page_store(bm, p, NULL);
    else if (pg->count == page_nbits(bm, p))
        page_store(bm, p, PAGE_FULL);
}

/* Page p as an allocated page whose words can be edited (materializing NULL
 * or PAGE_FULL, or copying a page shared with another bitmap), or NULL if
 * that needs memory we cannot get. */
static struct bm_page *page_writable(struct bm_bitmap *bm, uint64_t p)
{
    struct bm_page *pg = bm->pages[p];

    if (pg && pg != PAGE_FULL) {
        /* refs == 1: only this bitmap holds it, and callers serialize the
         * calls on one bitmap, so no copy can start sharing it now. */
        if (__atomic_load_n(&pg->refs, __ATOMIC_ACQUIRE) == 1)
            return pg;
        struct bm_page *n = malloc(sizeof(*n));
        if (!n)
            return NULL;
        memcpy(n, pg, sizeof(*n));
        n->refs = 1;
        bm->pages[p] = n; /* same population: count and summary unchanged */
        page_unref(pg);
        return n;
    }
    pg = page_alloc(pg == PAGE_FULL ? page_nbits(bm, p) : 0);
    if (pg)
        page_store(bm, p, pg); /* same population: count unchanged */
    return pg;
}

/* Word i of pg becomes (old & ~m) | (v & m); keeps counts and sum[]. */
static void word_assign(struct bm_bitmap *bm, struct bm_page *pg, uint64_t i,
                        uint64_t m, uint64_t v)
{
    uint64_t old = pg->w[i];
    uint64_t nw = (old & ~m) | (v & m);

    if (nw == old)
        return;
    pg->w[i] = nw;
    pg->count -= pop64(old);
    pg->count += pop64(nw);
    bm->count -= pop64(old);
    bm->count += pop64(nw);
    if (!old)
        pg->sum[i / 64] |= bit64(i);
    else if (!nw)
        pg->sum[i / 64] &= ~bit64(i);
}

/* Set (ones) or reset in-page bits [lo, hi) of page p; hi <= page_nbits. */
static void page_fill(struct bm_bitmap *bm, uint64_t p, uint64_t lo,
                      uint64_t hi, bool ones)
{
    struct bm_page *pg = bm->pages[p];

    if (pg == (ones ? PAGE_FULL : NULL))
        return;
    if (lo == 0 && hi == page_nbits(bm, p)) {
        page_store(bm, p, ones ? PAGE_FULL : NULL);
        return;
    }
    pg = page_writable(bm, p);
    if (!pg) {
        /* Out of memory: over-approximate, never lose a dirty bit. */
        if (ones)
            page_store(bm, p, PAGE_FULL);
        return;
    }
    for (uint64_t i = lo / 64; i * 64 < hi; i++)
        word_assign(bm, pg, i, word_mask(i, lo, hi), ones ? ~(uint64_t)0 : 0);
    page_settle(bm, p);
}

/* Set or reset bits [b0, b1) of the bitmap, b1 <= nbits.  A reset visits
 * only non-NULL pages, so clearing a large sparse range is cheap. */
static void fill_bits(struct bm_bitmap *bm, uint64_t b0, uint64_t b1, bool ones)
{
    if (b0 >= b1)
        return;
    uint64_t first = b0 >> PAGE_SHIFT, last = (b1 - 1) >> PAGE_SHIFT;
    uint64_t p = ones ? first : sum_next(&bm->sum, first);

    while (p <= last) { /* NONE > last ends the loop */
        uint64_t lo = p == first ? (b0 & PAGE_MASK) : 0;
        uint64_t hi = p == last ? ((b1 - 1) & PAGE_MASK) + 1 : PAGE_BITS;
        page_fill(bm, p, lo, hi, ones);
        p = ones ? p + 1 : sum_next(&bm->sum, p + 1);
    }
}

/* First set in-page bit >= lo of an allocated page, or NONE.  Reads one
 * word, then the in-page summary, then the word it points at. */
static uint64_t page_next_set(const struct bm_page *pg, uint64_t lo)
{
    uint64_t i = lo / 64;
    uint64_t w = pg->w[i] & (~(uint64_t)0 << (lo % 64));

    if (w)
        return i * 64 + ctz64(w);
    for (uint64_t j = i + 1; j < PAGE_WORDS; j = (j / 64 + 1) * 64) {
        uint64_t s = pg->sum[j / 64] >> (j % 64);
        if (s) {
            j += ctz64(s);
            return j * 64 + ctz64(pg->w[j]);
        }
    }
    return NONE;
}

/* First clear in-page bit >= lo below n of an allocated page, or NONE. */
static uint64_t page_next_clear(const struct bm_page *pg, uint64_t lo,
                                uint64_t n)
{
    uint64_t m = ~(uint64_t)0 << (lo % 64);

    for (uint64_t i = lo / 64; i * 64 < n; i++, m = ~(uint64_t)0) {
        uint64_t w = ~pg->w[i] & m;
        if (w) {
            uint64_t r = i * 64 + ctz64(w);
            return r < n ? r : NONE;
        }
    }
    return NONE;
}

/* First set bit in [b, bend), or NONE; bend <= nbits. */
static uint64_t find_set(const struct bm_bitmap *bm, uint64_t b, uint64_t bend)
{
    while (b < bend) {
        uint64_t p = sum_next(&bm->sum, b >> PAGE_SHIFT);
        if (p == NONE)
            return NONE;
        if (p != b >> PAGE_SHIFT)
            b = p << PAGE_SHIFT;
        if (b >= bend)
            return NONE;
        const struct bm_page *pg = bm->pages[p];
        if (pg == PAGE_FULL)
            return b; /* b < bend <= nbits, so it is a real bit */
        uint64_t r = page_next_set(pg, b & PAGE_MASK);
        if (r != NONE) {
            r += p << PAGE_SHIFT;
            return r < bend ? r : NONE;
        }
        b = (p + 1) << PAGE_SHIFT;
    }
    return NONE;
}

/* First clear bit in [b, bend), or NONE; bend <= nbits. */
static uint64_t find_clear(const struct bm_bitmap *bm, uint64_t b,
                           uint64_t bend)
{
    while (b < bend) {
        uint64_t p = b >> PAGE_SHIFT;
        const struct bm_page *pg = bm->pages[p];
        if (!pg)
            return b;
        if (pg != PAGE_FULL) {
            uint64_t r = page_next_clear(pg, b & PAGE_MASK, page_nbits(bm, p));
            if (r != NONE) {
                r += p << PAGE_SHIFT;
                return r < bend ? r : NONE;
            }
        }
        b = (p + 1) << PAGE_SHIFT;
    }
    return NONE;
}

/* ---- construction ---- */

/* Validate and compute nbits; 0 or -EINVAL. */
static int check_geometry(uint64_t size, unsigned gbits, uint64_t *nbits)
{
    if (size > BM_MAX_SIZE)
        return -EINVAL;
    *nbits = size ? ((size - 1) >> gbits) + 1 : 0;
    return *nbits > BM_MAX_BITS ? -EINVAL : 0;
}

/* Empty bitmap of a validated geometry; NULL with errno ENOMEM. */
static struct bm_bitmap *bm_alloc(uint64_t size, unsigned gbits, uint64_t nbits)
{
    struct bm_bitmap *bm = calloc(1, sizeof(*bm));

    if (!bm)
        goto fail;
    bm->size = size;
    bm->gbits = gbits;
    bm->nbits = nbits;
    bm->npages = DIV_ROUND_UP(nbits, PAGE_BITS);
    /* At least one entry, so that realloc in resize never sees 0. */
    bm->pages = calloc(MAX(bm->npages, 1), sizeof(*bm->pages));
    if (!bm->pages || sum_init(&bm->sum, bm->npages) < 0)
        goto fail;
    return bm;

fail:
    if (bm) {
        free(bm->pages);
        free(bm);
    }
    errno = ENOMEM;
    return NULL;
}

struct bm_bitmap *bm_new(uint64_t size, uint64_t granularity)
{
    uint64_t nbits;

    if (!IS_POW2(granularity) || granularity < BM_MIN_GRANULARITY ||
        granularity > BM_MAX_GRANULARITY) {
        errno = EINVAL;
        return NULL;
    }
    unsigned gbits = ctz64(granularity);
    if (check_geometry(size, gbits, &nbits) < 0) {
        errno = EINVAL;
        return NULL;
    }
    return bm_alloc(size, gbits, nbits);
}

void bm_free(struct bm_bitmap *bm)
{
    if (!bm)
        return;
    for (uint64_t p = sum_next(&bm->sum, 0); p != NONE;
         p = sum_next(&bm->sum, p + 1)) {
        if (bm->pages[p] != PAGE_FULL)
            page_unref(bm->pages[p]);
    }
    free(bm->pages);
    sum_free(&bm->sum);
    free(bm);
}

/* The copy shares bm's allocated pages (copy on write: page_writable
 * copies a shared page before the first change of either bitmap), so a
 * copy costs the page table and the summary, not the bits. */
struct bm_bitmap *bm_copy(const struct bm_bitmap *bm)
{
    struct bm_bitmap *c = bm_alloc(bm->size, bm->gbits, bm->nbits);

    if (!c)
        return NULL;
    for (uint64_t p = sum_next(&bm->sum, 0); p != NONE;
         p = sum_next(&bm->sum, p + 1)) {
        struct bm_page *pg = bm->pages[p];
        if (pg != PAGE_FULL) {
            __atomic_add_fetch(&pg->refs, 1, __ATOMIC_RELAXED);
            c->nalloc++;
        }
        c->pages[p] = pg;
    }
    for (unsigned k = 0; k < bm->sum.nlevels; k++)
        memcpy(c->sum.lv[k], bm->sum.lv[k],
               MAX(DIV_ROUND_UP(bm->sum.nbits[k], 64), 1) * sizeof(uint64_t));
    c->count = bm->count;
    return c;
}

uint64_t bm_size(const struct bm_bitmap *bm)
{
    return bm->size;
}
uint64_t bm_granularity(const struct bm_bitmap *bm)
{
    return (uint64_t)1 << bm->gbits;
}
unsigned bm_granularity_bits(const struct bm_bitmap *bm)
{
    return bm->gbits;
}
uint64_t bm_nbits(const struct bm_bitmap *bm)
{
    return bm->nbits;
}

size_t bm_mem_usage(const struct bm_bitmap *bm)
{
    return sizeof(*bm) + MAX(bm->npages, 1) * sizeof(*bm->pages) +
           sum_mem(&bm->sum) + bm->nalloc * sizeof(struct bm_page);
}

/* ---- bit operations on byte ranges ---- */

/* Bits [*b0, *b1) of the granules that [off, off+len) overlaps, clamped to
 * the size; false if empty. */
static bool byte_range_bits(const struct bm_bitmap *bm, uint64_t off,
                            uint64_t len, uint64_t *b0, uint64_t *b1)
{
    uint64_t end;

    if (len == 0 || off >= bm->size)
        return false;
    if (add_overflow_u64(off, len, &end) || end > bm->size)
        end = bm->size;
    *b0 = off >> bm->gbits;
    *b1 = ((end - 1) >> bm->gbits) + 1;
    return true;
}

void bm_set(struct bm_bitmap *bm, uint64_t off, uint64_t len)
{
    uint64_t b0, b1;

    if (byte_range_bits(bm, off, len, &b0, &b1))
        fill_bits(bm, b0, b1, true);
}

void bm_reset(struct bm_bitmap *bm, uint64_t off, uint64_t len)
{
    uint64_t b0, b1;

    if (byte_range_bits(bm, off, len, &b0, &b1))
        fill_bits(bm, b0, b1, false);
}

bool bm_get(const struct bm_bitmap *bm, uint64_t off)
{
    if (off >= bm->size)
        return false;
    uint64_t b = off >> bm->gbits;
    const struct bm_page *pg = bm->pages[b >> PAGE_SHIFT];
    if (!pg || pg == PAGE_FULL)
        return pg != NULL;
    return pg->w[(b & PAGE_MASK) / 64] & bit64(b);
}

uint64_t bm_count(const struct bm_bitmap *bm)
{
    /* count <= nbits, and nbits << gbits < size + granularity: no overflow */
    return bm->count << bm->gbits;
}

void bm_clear(struct bm_bitmap *bm)
{
    for (uint64_t p = sum_next(&bm->sum, 0); p != NONE;
         p = sum_next(&bm->sum, p + 1))
        page_store(bm, p, NULL);
    assert(bm->count == 0);
}

/* Shared body of next_dirty/next_clean. */
static int64_t next_bit(const struct bm_bitmap *bm, uint64_t off, uint64_t end,
                        bool dirty)
{
    end = MIN(end, bm->size);
    if (off >= end)
        return -1;
    uint64_t b0 = off >> bm->gbits, b1 = ((end - 1) >> bm->gbits) + 1;
    uint64_t b = dirty ? find_set(bm, b0, b1) : find_clear(bm, b0, b1);
    if (b == NONE)
        return -1;
    /* b < nbits, so b << gbits < size <= INT64_MAX */
    return (int64_t)MAX(off, b << bm->gbits);
}

int64_t bm_next_dirty(const struct bm_bitmap *bm, uint64_t off, uint64_t end)
{
    return next_bit(bm, off, end, true);
}

int64_t bm_next_clean(const struct bm_bitmap *bm, uint64_t off, uint64_t end)
{
    return next_bit(bm, off, end, false);
}

bool bm_next_dirty_area(const struct bm_bitmap *bm, uint64_t *off, uint64_t end,
                        uint64_t *len)
{
    end = MIN(end, bm->size);
    int64_t start = bm_next_dirty(bm, *off, end);
    if (start < 0)
        return false;
    int64_t stop = bm_next_clean(bm, (uint64_t)start, end);
    *off = (uint64_t)start;
    *len = (stop < 0 ? end : (uint64_t)stop) - (uint64_t)start;
    return true;
}

/* ---- merge and resize ---- */

/* dst |= src page by page, for equal granularities (dst may be src). */
static void merge_pages(struct bm_bitmap *dst, const struct bm_bitmap *src)
{
    for (uint64_t p = sum_next(&src->sum, 0); p != NONE;
         p = sum_next(&src->sum, p + 1)) {
        const struct bm_page *s = src->pages[p];
        if (s == PAGE_FULL) {
            page_store(dst, p, PAGE_FULL);
            continue;
        }
        if (dst->pages[p] == PAGE_FULL)
            continue;
        struct bm_page *d = page_writable(dst, p);
        if (!d) {
            page_store(dst, p, PAGE_FULL); /* out of memory: err dirty */
            continue;
        }
        /* Only words the source summary marks non-zero can add bits. */
        for (uint64_t j = 0; j < SUM_WORDS; j++) {
            for (uint64_t sw = s->sum[j]; sw; sw &= sw - 1) {
                uint64_t i = j * 64 + ctz64(sw);
                word_assign(dst, d, i, s->w[i], ~(uint64_t)0);
            }
        }
        page_settle(dst, p);
    }
}

int bm_merge(struct bm_bitmap *dst, const struct bm_bitmap *src)
{
    if (dst->size != src->size)
        return -EINVAL;
    if (dst->gbits == src->gbits) {
        merge_pages(dst, src);
        return 0;
    }
    /* Different granularities: each dirty source area, rounded out to the
     * destination's granules by bm_set. */
    uint64_t off = 0, len;
    while (bm_next_dirty_area(src, &off, src->size, &len)) {
        bm_set(dst, off, len);
        off += len;
    }
    return 0;
}

int bm_resize(struct bm_bitmap *bm, uint64_t new_size)
{
    struct bm_summary nsum;
    struct bm_page *tail = NULL;
    uint64_t nbits, npages;

    if (check_geometry(new_size, bm->gbits, &nbits) < 0)
        return -EINVAL;
    npages = DIV_ROUND_UP(nbits, PAGE_BITS);

    /* Allocate everything that can fail before changing anything. */
    if (sum_init(&nsum, npages) < 0)
        return -ENOMEM;
    /* A partial PAGE_FULL last page would claim the new bits: split it. */
    uint64_t last = bm->npages - 1;
    if (nbits > bm->nbits && bm->npages > 0 && bm->pages[last] == PAGE_FULL &&
        page_nbits(bm, last) < PAGE_BITS) {
        tail = page_alloc(page_nbits(bm, last));
        if (!tail)
            goto nomem;
    }
    /* The page that keeps some bits of a shrink is edited below: unshare
     * it now, while failing still leaves the bitmap as it was. */
    if (nbits < bm->nbits && (nbits & PAGE_MASK) &&
        bm->pages[nbits >> PAGE_SHIFT] &&
        bm->pages[nbits >> PAGE_SHIFT] != PAGE_FULL &&
        !page_writable(bm, nbits >> PAGE_SHIFT))
        goto nomem;
    if (npages > bm->npages) {
        struct bm_page **np = realloc(bm->pages, npages * sizeof(*np));
        if (!np)
            goto nomem;
        memset(np + bm->npages, 0, (npages - bm->npages) * sizeof(*np));
        bm->pages = np;
    }

    if (tail) {
        bm->pages[last] = tail; /* same population, still non-NULL */
        bm->nalloc++;
    }
    if (nbits < bm->nbits) {
        /* Reset bits past the new end in the page that keeps some (I2); a
         * PAGE_FULL page there stays valid, as it means "all below nbits". */
        uint64_t p = nbits >> PAGE_SHIFT, lo = nbits & PAGE_MASK;
        struct bm_page *pg = p < bm->npages ? bm->pages[p] : NULL;
        if (lo && pg && pg != PAGE_FULL) {
            for (uint64_t i = lo / 64; i < PAGE_WORDS; i++)
                word_assign(bm, pg, i, word_mask(i, lo, PAGE_BITS), 0);
        }
        for (p = sum_next(&bm->sum, npages); p != NONE;
             p = sum_next(&bm->sum, p + 1))
            page_store(bm, p, NULL);
        if (npages < bm->npages) {
            /* Shrinking in place; failure just keeps the larger block. */
            struct bm_page **np =
                realloc(bm->pages, MAX(npages, 1) * sizeof(*np));
            if (np)
                bm->pages = np;
        }
    }

    sum_free(&bm->sum);
    bm->sum = nsum;
    bm->size = new_size;
    bm->nbits = nbits;
    bm->npages = npages;
    /* Rebuild the summary and the count for the new geometry: a PAGE_FULL
     * page kept at the new end now stands for fewer bits. */
    bm->count = 0;
    for (uint64_t p = 0; p < npages; p++) {
        if (bm->pages[p]) {
            sum_set(&bm->sum, p);
            bm->count += page_count(bm, p, bm->pages[p]);
        }
    }
    if (npages > 0)
        page_settle(bm, npages - 1); /* the last page may be empty or full */
    return 0;

nomem:
    free(tail);
    sum_free(&nsum);
    return -ENOMEM;
}

/* ---- qcow2 chunk serialization ---- */

static uint64_t chunk_bits(uint64_t chunk_bytes)
{
    assert(IS_POW2(chunk_bytes) && chunk_bytes >= 512 &&
           chunk_bytes <= ((uint64_t)1 << 31));
    return chunk_bytes * 8;
}

uint64_t bm_chunk_count(const struct bm_bitmap *bm, uint64_t chunk_bytes)
{
    return DIV_ROUND_UP(bm->nbits, chunk_bits(chunk_bytes));
}

/* Bits [*b0, *b1) held by a chunk; false for a chunk past the end. */
static bool chunk_range(const struct bm_bitmap *bm, uint64_t chunk,
                        uint64_t chunk_bytes, uint64_t *b0, uint64_t *b1)
{
    uint64_t bits = chunk_bits(chunk_bytes);

    if (chunk >= bm_chunk_count(bm, chunk_bytes))
        return false;
    *b0 = chunk * bits; /* < nbits: cannot overflow */
    *b1 = MIN(bm->nbits, *b0 + bits);
    return true;
}

bool bm_chunk_is_clean(const struct bm_bitmap *bm, uint64_t chunk,
                       uint64_t chunk_bytes)
{
    uint64_t b0, b1;

    return !chunk_range(bm, chunk, chunk_bytes, &b0, &b1) ||
           find_set(bm, b0, b1) == NONE;
}

/*
 * Chunk boundaries are multiples of 4096 bits (chunk_bytes >= 512) and page
 * boundaries multiples of 32768, so where a chunk and a page overlap the
 * overlap starts on a word and a byte of the stream.  Only its end may be
 * unaligned, at nbits, and I2 keeps the words' bits past nbits zero.
 */
void bm_serialize_chunk(const struct bm_bitmap *bm, uint64_t chunk,
                        uint64_t chunk_bytes, uint8_t *buf)
{
    uint64_t b0, b1;

    memset(buf, 0, chunk_bytes);
    if (!chunk_range(bm, chunk, chunk_bytes, &b0, &b1))
        return;
    uint64_t last = (b1 - 1) >> PAGE_SHIFT;
    for (uint64_t p = sum_next(&bm->sum, b0 >> PAGE_SHIFT); p <= last;
         p = sum_next(&bm->sum, p + 1)) {
        uint64_t base = p << PAGE_SHIFT;
        uint64_t lo = MAX(b0, base) - base,
                 hi = MIN(b1, base + PAGE_BITS) - base;
        uint8_t *dst = buf + (base + lo - b0) / 8;
        const struct bm_page *pg = bm->pages[p];
        if (pg == PAGE_FULL) {
            uint64_t n = hi - lo;
            memset(dst, 0xff, n / 8);
            if (n % 8)
                dst[n / 8] = (uint8_t)((1u << (n % 8)) - 1);
        } else {
            for (uint64_t i = lo / 64; i * 64 < hi; i++)
                stle64(dst + (i * 64 - lo) / 8, pg->w[i]);
        }
    }
}

/* Overwrite in-page bits [lo, hi) of page p from the stream at src (byte 0
 * = bit lo, lo a multiple of 64). */
static void page_assign(struct bm_bitmap *bm, uint64_t p, uint64_t lo,
                        uint64_t hi, const uint8_t *src)
{
    bool zeros = true, ones = true;

    for (uint64_t i = lo / 64; i * 64 < hi; i++) {
        uint64_t m = word_mask(i, lo, hi), v = ldle64(src + (i * 64 - lo) / 8);
        zeros = zeros && !(v & m);
        ones = ones && (v & m) == m;
    }
    if (zeros || ones) {
        page_fill(bm, p, lo, hi, ones); /* keeps NULL / PAGE_FULL cheap */
        return;
    }
    if (!bm->pages[p] && lo == 0 && hi == page_nbits(bm, p)) {
        /* A whole clean page (loading a bitmap): built in one pass, not a
         * word_assign per word. */
        struct bm_page *pg = malloc(sizeof(*pg));
        if (!pg) {
            page_store(bm, p, PAGE_FULL); /* out of memory: err dirty */
            return;
        }
        uint32_t count = 0;
        memset(pg->sum, 0, sizeof(pg->sum));
        for (uint64_t i = 0; i < PAGE_WORDS; i++) {
            uint64_t v = 0;
            if (i * 64 < hi)
                v = ldle64(src + i * 8) & word_mask(i, 0, hi);
            pg->w[i] = v;
            count += pop64(v);
            if (v)
                pg->sum[i / 64] |= bit64(i);
        }
        pg->count = count;
        pg->refs = 1;
        page_store(bm, p, pg); /* neither empty nor full: zeros, ones */
        return;
    }
    struct bm_page *pg = page_writable(bm, p);
    if (!pg) {
        page_store(bm, p, PAGE_FULL); /* out of memory: err dirty */
        return;
    }
    for (uint64_t i = lo / 64; i * 64 < hi; i++)
        word_assign(bm, pg, i, word_mask(i, lo, hi),
                    ldle64(src + (i * 64 - lo) / 8));
    page_settle(bm, p);
}

void bm_deserialize_chunk(struct bm_bitmap *bm, uint64_t chunk,
                          uint64_t chunk_bytes, const uint8_t *buf)
{
    uint64_t b0, b1;

    if (!chunk_range(bm, chunk, chunk_bytes, &b0, &b1))
        return;
    for (uint64_t p = b0 >> PAGE_SHIFT; p <= (b1 - 1) >> PAGE_SHIFT; p++) {
        uint64_t base = p << PAGE_SHIFT;
        uint64_t lo = MAX(b0, base) - base,
                 hi = MIN(b1, base + PAGE_BITS) - base;
        page_assign(bm, p, lo, hi, buf + (base + lo - b0) / 8);
    }
}

void bm_deserialize_fill(struct bm_bitmap *bm, uint64_t chunk,
                         uint64_t chunk_bytes, bool ones)
{
    uint64_t b0, b1;

    if (chunk_range(bm, chunk, chunk_bytes, &b0, &b1))
        fill_bits(bm, b0, b1, ones);
}
