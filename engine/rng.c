/* rng.c - xoshiro256** generator and the distributions curvd draws from. */
#include "rng.h"

#include <math.h>

static uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

void cv_rng_seed(cv_rng *r, uint64_t seed)
{
    uint64_t x = seed;
    for (int i = 0; i < 4; i++)
        r->s[i] = splitmix64(&x);
}

void cv_rng_seed_stream(cv_rng *r, uint64_t seed, uint64_t stream)
{
    uint64_t x = seed ^ (0xD1B54A32D192ED03ull * (stream + 1));
    cv_rng_seed(r, splitmix64(&x));
}

uint64_t cv_rng_u64(cv_rng *r)
{
    uint64_t *s = r->s;
    uint64_t result = rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

double cv_rng_uniform(cv_rng *r) { return (double)(cv_rng_u64(r) >> 11) * 0x1.0p-53; }

double cv_rng_normal(cv_rng *r)
{
    double u1 = cv_rng_uniform(r), u2 = cv_rng_uniform(r);
    if (u1 < 1e-300)
        u1 = 1e-300;
    return sqrt(-2.0 * log(u1)) * cos(2.0 * M_PI * u2);
}

uint64_t cv_rng_below(cv_rng *r, uint64_t n)
{
    if (n == 0)
        return 0;
    uint64_t limit = UINT64_MAX - UINT64_MAX % n;
    uint64_t x;
    do {
        x = cv_rng_u64(r);
    } while (x >= limit);
    return x % n;
}

/* Bit b of each 64-bit draw gives sign b: 2*bit - 1, without a branch on
 * random bits (a mispredicted branch per entry dominated probe drawing). */
void cv_rng_rademacher(cv_rng *r, double *v, size_t n)
{
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
        uint64_t bits = cv_rng_u64(r);
        for (int b = 0; b < 64; b++)
            v[i + b] = (double)(int)(((bits >> b) & 1) << 1) - 1.0;
    }
    if (i < n) {
        uint64_t bits = cv_rng_u64(r);
        for (int b = 0; i < n; b++, i++)
            v[i] = (double)(int)(((bits >> b) & 1) << 1) - 1.0;
    }
}

void cv_rng_gaussian(cv_rng *r, double *v, size_t n)
{
    for (size_t i = 0; i < n; i++)
        v[i] = cv_rng_normal(r);
}
