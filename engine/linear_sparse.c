/* linear_sparse.c - input cotangents of a Linear layer from row groups that
 * share their zeros (see linear_sparse.h): per group the units non-zero in
 * one of its k rows and their k coefficients are staged, then AVX-512
 * register tiles (up to 9 rows x 48 inputs, 12 x 32 for 10-12 rows) sum the
 * listed rows of W;
 * LS_GROUPS groups are staged at a time so that a 48- or 32-column block of W is
 * reused from cache across them. */
#include "linear_sparse.h"

#include <cblas.h>
#include <stdlib.h>

#include "parallel.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(CV_LSPARSE_PORTABLE)
#include <immintrin.h>
#define CV_LSPARSE_X86 1
#endif

#define LS_R 12      /* rows per register tile (24 accumulators) */
#define LS_GROUPS 16 /* row groups staged together */
#define LS_PROBE 32  /* groups cv_lsparse_worth looks at */
#ifndef LS_AHEAD
#define LS_AHEAD 8   /* units ahead whose W row is prefetched */
#endif

static int cpu_has_avx512(void)
{
#ifdef CV_LSPARSE_X86
    return __builtin_cpu_supports("avx512f") != 0;
#else
    return 0;
#endif
}

#ifdef CV_LSPARSE_X86
/* The units q < out where one of group r's k rows is non-zero, in order
 * (into idx when not NULL); returns their count. */
__attribute__((target("avx512f"))) static int group_units(int k, int n, int out,
                                                          const float *gy, int r, int *idx)
{
    int m = 0;
    __m512 zero = _mm512_setzero_ps();
    for (int q0 = 0; q0 < out; q0 += 16) {
        int rest = out - q0;
        __mmask16 lanes = rest >= 16 ? 0xFFFF : (__mmask16)((1u << rest) - 1), nz = 0;
        for (int j = 0; j < k; j++) {
            const float *row = gy + ((size_t)j * n + (size_t)r) * out + q0;
            nz |= _mm512_mask_cmp_ps_mask(lanes, _mm512_maskz_loadu_ps(lanes, row), zero,
                                          _CMP_NEQ_UQ);
        }
        for (unsigned bits = nz; bits; bits &= bits - 1, m++)
            if (idx)
                idx[m] = q0 + __builtin_ctz(bits);
    }
    return m;
}
#endif

int cv_lsparse_worth(int k, int n, int out, const float *gy)
{
    if (k < CV_LSPARSE_MIN_K || n < 1 || out < 64 || !cpu_has_avx512())
        return 0;
#ifdef CV_LSPARSE_X86
    int probe = n < LS_PROBE ? n : LS_PROBE;
    long units = 0;
    for (int r = 0; r < probe; r++)
        units += group_units(k, n, out, gy, r, NULL);
    return (double)units <= CV_LSPARSE_MAX_DENSITY * (double)probe * out;
#else
    (void)gy;
    return 0;
#endif
}

typedef struct {
    int k, n, out, in;
    const float *gy, *W;
    float *gx;
} ls_job;

/* One staged group: m units idx[t] with coefficients gq[t*k + j] (row j). */
typedef struct {
    const int *idx;
    const float *gq;
    int m;
} ls_group;

#ifdef CV_LSPARSE_X86
static __mmask16 lanes_from(int rest)
{
    return rest >= 16 ? (__mmask16)0xFFFF : rest <= 0 ? (__mmask16)0 : (__mmask16)((1u << rest) - 1);
}

/* gx rows j0 .. j0+R-1 of group r, inputs ib .. ib+16 NB-1 (masked past
 * in): the sum over the group's units of gq x W's row. */
__attribute__((always_inline, target("avx512f,fma"))) static inline void
tile_k(const ls_job *q, const ls_group *g, int r, int j0, int ib, const int R, const int NB)
{
    __mmask16 m[3];
    __m512 a[LS_R][3];
#pragma GCC unroll 3
    for (int b = 0; b < NB; b++)
        m[b] = lanes_from(q->in - ib - 16 * b);
#pragma GCC unroll 12
    for (int j = 0; j < R; j++)
#pragma GCC unroll 3
        for (int b = 0; b < NB; b++)
            a[j][b] = _mm512_setzero_ps();
    for (int t = 0; t < g->m; t++) {
        const float *w = q->W + (size_t)g->idx[t] * q->in + ib;
        if (t + LS_AHEAD < g->m) /* W's rows are scattered: no hardware prefetch */
            _mm_prefetch((const char *)(q->W + (size_t)g->idx[t + LS_AHEAD] * q->in + ib),
                         _MM_HINT_T0);
        __m512 wv[3];
#pragma GCC unroll 3
        for (int b = 0; b < NB; b++)
            wv[b] = _mm512_maskz_loadu_ps(m[b], w + 16 * b);
        const float *c = g->gq + (size_t)t * q->k + j0;
#pragma GCC unroll 12
        for (int j = 0; j < R; j++) {
            __m512 x = _mm512_set1_ps(c[j]);
#pragma GCC unroll 3
            for (int b = 0; b < NB; b++)
                a[j][b] = _mm512_fmadd_ps(x, wv[b], a[j][b]);
        }
    }
#pragma GCC unroll 12
    for (int j = 0; j < R; j++) {
        float *o = q->gx + ((size_t)(j0 + j) * q->n + (size_t)r) * q->in + ib;
#pragma GCC unroll 3
        for (int b = 0; b < NB; b++)
            _mm512_mask_storeu_ps(o + 16 * b, m[b], a[j][b]);
    }
}

/* Tiles of R rows: three zmm of inputs up to 9 rows (27 accumulators), two
 * above (24). */
#define LS_NB(R) ((R) <= 9 ? 3 : 2)
#define LS_TILE(R)                                                                     \
    __attribute__((target("avx512f,fma"))) static void tile_##R(const ls_job *q,      \
                                                               const ls_group *g,     \
                                                               int r, int j0, int ib) \
    {                                                                                  \
        tile_k(q, g, r, j0, ib, R, LS_NB(R));                                          \
    }
LS_TILE(1)
LS_TILE(2)
LS_TILE(3)
LS_TILE(4)
LS_TILE(5)
LS_TILE(6)
LS_TILE(7)
LS_TILE(8)
LS_TILE(9)
LS_TILE(10)
LS_TILE(11)
LS_TILE(12)

typedef void (*ls_tile_fn)(const ls_job *, const ls_group *, int, int, int);
static const ls_tile_fn tiles[LS_R + 1] = {NULL,     tile_1, tile_2, tile_3,  tile_4,
                                           tile_5,   tile_6, tile_7, tile_8,  tile_9,
                                           tile_10,  tile_11, tile_12};

/* Stages groups g0 .. g0+G-1 and runs their tiles, R rows and 16 LS_NB(R)
 * inputs at a time. */
static void run_groups(const ls_job *q, int g0, int G, int *idx, float *gq)
{
    ls_group grp[LS_GROUPS];
    size_t out = (size_t)q->out, k = (size_t)q->k;
    for (int g = 0; g < G; g++) {
        int *ix = idx + (size_t)g * out;
        float *c = gq + (size_t)g * out * k;
        int m = group_units(q->k, q->n, q->out, q->gy, g0 + g, ix);
        for (int t = 0; t < m; t++)
            for (size_t j = 0; j < k; j++)
                c[(size_t)t * k + j] = q->gy[(j * q->n + (size_t)(g0 + g)) * out + ix[t]];
        grp[g] = (ls_group){ix, c, m};
    }
    for (int j0 = 0; j0 < q->k; j0 += LS_R) {
        int R = q->k - j0 < LS_R ? q->k - j0 : LS_R;
        for (int ib = 0; ib < q->in; ib += 16 * LS_NB(R))
            for (int g = 0; g < G; g++)
                tiles[R](q, &grp[g], g0 + g, j0, ib);
    }
}
#endif

/* Rows lo .. hi-1 of every block by sgemm (no scratch for the staging). */
static void dense_rows(const ls_job *q, size_t lo, size_t hi)
{
    for (int j = 0; j < q->k; j++) {
        size_t row = (size_t)j * q->n + lo;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)(hi - lo), q->in, q->out,
                    1.0f, q->gy + row * q->out, q->out, q->W, q->in, 0.0f,
                    q->gx + row * q->in, q->in);
    }
}

static void ls_range(void *p, size_t lo, size_t hi)
{
    const ls_job *q = p;
#ifdef CV_LSPARSE_X86
    if (!cpu_has_avx512()) {
        dense_rows(q, lo, hi);
        return;
    }
    int *idx = malloc(sizeof(int) * LS_GROUPS * (size_t)q->out);
    float *gq = malloc(sizeof(float) * LS_GROUPS * (size_t)q->out * (size_t)q->k);
    if (idx && gq) {
        for (size_t g0 = lo; g0 < hi; g0 += LS_GROUPS)
            run_groups(q, (int)g0, hi - g0 < LS_GROUPS ? (int)(hi - g0) : LS_GROUPS, idx, gq);
        free(idx);
        free(gq);
        return;
    }
    free(idx);
    free(gq);
#endif
    dense_rows(q, lo, hi);
}

void cv_lsparse_vjp(int k, int n, int out, int in, const float *gy, const float *W, float *gx)
{
    ls_job q = {k, n, out, in, gy, W, gx};
    size_t per = (size_t)k * (size_t)in * (size_t)out / 8;
    cv_parallel_for((size_t)n, cv_parallel_grain(per ? per : 1), ls_range, &q);
}
