/* rng.h - deterministic random numbers (xoshiro256**, seeded by splitmix64).
 *
 * Every random draw in curvd goes through a cv_rng owned by the caller, so a
 * job with a fixed seed gives the same numbers regardless of thread timing.
 */
#ifndef CV_RNG_H
#define CV_RNG_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    uint64_t s[4];
} cv_rng;

void cv_rng_seed(cv_rng *r, uint64_t seed);
/* Independent stream number `stream` derived from `seed` (for parallel probes). */
void cv_rng_seed_stream(cv_rng *r, uint64_t seed, uint64_t stream);
uint64_t cv_rng_u64(cv_rng *r);
double cv_rng_uniform(cv_rng *r);          /* [0, 1) */
double cv_rng_normal(cv_rng *r);           /* N(0, 1), Box-Muller */
uint64_t cv_rng_below(cv_rng *r, uint64_t n); /* uniform integer in [0, n) */
void cv_rng_rademacher(cv_rng *r, double *v, size_t n);  /* +-1 entries */
void cv_rng_gaussian(cv_rng *r, double *v, size_t n);

#endif
