/* Parsing of human sizes with qemu-img's suffixes (k, M, G, T, P, E; b = bytes). */
#include <ctype.h>
#include <inttypes.h>

#include "util.h"
#include <cbt/image.h>

int cbt_parse_size(const char *s, uint64_t *out)
{
    if (!s || !*s || !isdigit((unsigned char)*s))
        return -EINVAL;
    errno = 0;
    char *end;
    unsigned long long whole = strtoull(s, &end, 10);
    if (errno)
        return -EINVAL;
    /* qemu-img accepts a fraction with a unit ("1.5G"). */
    double frac = 0;
    if (*end == '.') {
        char *fend;
        frac = strtod(end, &fend);
        end = fend;
    }
    unsigned shift = 0;
    switch (*end) {
    case '\0': break;
    case 'b': case 'B': end++; break;
    case 'k': case 'K': shift = 10; end++; break;
    case 'm': case 'M': shift = 20; end++; break;
    case 'g': case 'G': shift = 30; end++; break;
    case 't': case 'T': shift = 40; end++; break;
    case 'p': case 'P': shift = 50; end++; break;
    case 'e': case 'E': shift = 60; end++; break;
    default: return -EINVAL;
    }
    if (*end != '\0')
        return -EINVAL;
    if (frac != 0 && shift == 0)
        return -EINVAL;
    if (shift && whole > (UINT64_MAX >> shift))
        return -ERANGE;
    uint64_t v = (uint64_t)whole << shift;
    if (frac != 0) {
        double extra = frac * (double)((uint64_t)1 << shift);
        if (add_overflow_u64(v, (uint64_t)extra, &v))
            return -ERANGE;
    }
    *out = v;
    return 0;
}
