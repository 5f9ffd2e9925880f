/* conv_direct.c - direct stride-1 convolution with AVX-512 register blocks
 * (see conv_direct.h): per sample, the input planes are copied once into a
 * zero-padded stack buffer, then every (16 output channels, output row,
 * CV_DCONV_RUN columns) block sums its taps in registers. */
#include "conv_direct.h"

#include <string.h>

#include "parallel.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define CV_DCONV_X86 1
#endif

#define CV_DCONV_OB 16        /* output channels per register block (one zmm) */
#define CV_DCONV_PLANE 32768  /* floats of the padded planes of one sample (stack) */

/* The padded planes: Hp rows of Wq floats per channel; plane (t, u) holds
 * input (t - ph, u - pw), 0 outside; Wq covers whole runs of CV_DCONV_RUN. */
static int runs_of(const cv_conv_geom *g) { return (g->ow + CV_DCONV_RUN - 1) / CV_DCONV_RUN; }
static int plane_h(const cv_conv_geom *g) { return g->oh + g->kh - 1; }
static int plane_w(const cv_conv_geom *g) { return runs_of(g) * CV_DCONV_RUN + g->kw - 1; }

static int cpu_has_avx512(void)
{
#ifdef CV_DCONV_X86
    return __builtin_cpu_supports("avx512f") != 0;
#else
    return 0;
#endif
}

int cv_dconv_supported(const cv_conv_geom *g, int cout)
{
    if (g->sh != 1 || g->sw != 1 || g->dh != 1 || g->dw != 1 || cout % CV_DCONV_OB != 0)
        return 0;
    if (g->ph >= g->kh || g->pw >= g->kw || g->oh != g->H + 2 * g->ph - g->kh + 1 ||
        g->ow != g->W + 2 * g->pw - g->kw + 1 || g->oh < 1 || g->ow < 1)
        return 0;
    if ((long)g->C * plane_h(g) * plane_w(g) > CV_DCONV_PLANE)
        return 0;
    return cpu_has_avx512();
}

cv_conv_geom cv_dconv_transposed(const cv_conv_geom *g, int cout)
{
    cv_conv_geom t = *g;
    t.C = cout;
    t.H = g->oh;
    t.W = g->ow;
    t.ph = g->kh - 1 - g->ph;
    t.pw = g->kw - 1 - g->pw;
    t.oh = g->H;
    t.ow = g->W;
    return t;
}

size_t cv_dconv_packed_floats(const cv_conv_geom *g, int cout)
{
    return (size_t)g->C * g->kh * g->kw * cout;
}

void cv_dconv_pack(const cv_conv_geom *g, int cout, const float *W, float *Wp)
{
    size_t K = (size_t)g->C * g->kh * g->kw;
    for (int o = 0; o < cout; o++)
        for (size_t r = 0; r < K; r++)
            Wp[r * cout + o] = W[o * K + r];
}

void cv_dconv_pack_transposed(const cv_conv_geom *g, int cout, const float *W, float *Wp)
{
    int kh = g->kh, kw = g->kw, taps = kh * kw;
    for (int o = 0; o < cout; o++)     /* input channel of the transposed conv */
        for (int c = 0; c < g->C; c++) /* its output channel */
            for (int i = 0; i < kh; i++)
                for (int j = 0; j < kw; j++)
                    Wp[((size_t)(o * kh + i) * kw + j) * g->C + c] =
                        W[((size_t)o * g->C + c) * taps + (kh - 1 - i) * kw + (kw - 1 - j)];
}

static void fill_planes(const cv_conv_geom *g, const float *xs, float *plane)
{
    int Hp = plane_h(g), Wq = plane_w(g);
    memset(plane, 0, sizeof(float) * (size_t)g->C * Hp * Wq);
    for (int c = 0; c < g->C; c++)
        for (int iy = 0; iy < g->H; iy++)
            memcpy(plane + ((size_t)c * Hp + iy + g->ph) * Wq + g->pw,
                   xs + ((size_t)c * g->H + iy) * g->W, sizeof(float) * (size_t)g->W);
}

/* y rows of 16 channels at (oy, ox0..ox0+R) from the block's lanes t[r*16 + l]. */
static void store_block(const cv_conv_geom *g, const float *t, const float *bias, int o0, int oy,
                        int ox0, int add, float *ys)
{
    int R = g->ow - ox0 < CV_DCONV_RUN ? g->ow - ox0 : CV_DCONV_RUN;
    size_t P = (size_t)g->oh * g->ow;
    for (int l = 0; l < CV_DCONV_OB; l++) {
        float *yo = ys + (size_t)(o0 + l) * P + (size_t)oy * g->ow + ox0;
        float b = bias ? bias[o0 + l] : 0.0f;
        for (int r = 0; r < R; r++)
            yo[r] = (add ? yo[r] : 0.0f) + (t[r * CV_DCONV_OB + l] + b);
    }
}

#ifdef CV_DCONV_X86
/* One block: sum over c, i, j of W[., c, i, j] x plane(oy + i, ox0 + r + j). */
__attribute__((target("avx512f,fma"))) static void block_sums(const cv_conv_geom *g, int cout,
                                                               const float *Wp, const float *plane,
                                                               int o0, int oy, int ox0, float *t)
{
    int Hp = plane_h(g), Wq = plane_w(g), kh = g->kh, kw = g->kw;
    __m512 acc[CV_DCONV_RUN];
#pragma GCC unroll 14
    for (int r = 0; r < CV_DCONV_RUN; r++)
        acc[r] = _mm512_setzero_ps();
    for (int c = 0; c < g->C; c++)
        for (int i = 0; i < kh; i++) {
            const float *xr = plane + ((size_t)c * Hp + oy + i) * Wq + ox0;
            const float *w = Wp + (size_t)(c * kh + i) * kw * cout + o0;
            for (int j = 0; j < kw; j++) {
                __m512 wv = _mm512_loadu_ps(w + (size_t)j * cout);
#pragma GCC unroll 14
                for (int r = 0; r < CV_DCONV_RUN; r++)
                    acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(xr[r + j]), wv, acc[r]);
            }
        }
#pragma GCC unroll 14
    for (int r = 0; r < CV_DCONV_RUN; r++)
        _mm512_storeu_ps(t + r * CV_DCONV_OB, acc[r]);
}

/* Two blocks of 16 channels (o0, o0 + 16) sharing the broadcasts. */
__attribute__((target("avx512f,fma"))) static void block_sums2(const cv_conv_geom *g, int cout,
                                                                const float *Wp, const float *plane,
                                                                int o0, int oy, int ox0, float *t)
{
    int Hp = plane_h(g), Wq = plane_w(g), kh = g->kh, kw = g->kw;
    __m512 a0[CV_DCONV_RUN], a1[CV_DCONV_RUN];
#pragma GCC unroll 14
    for (int r = 0; r < CV_DCONV_RUN; r++)
        a0[r] = a1[r] = _mm512_setzero_ps();
    for (int c = 0; c < g->C; c++)
        for (int i = 0; i < kh; i++) {
            const float *xr = plane + ((size_t)c * Hp + oy + i) * Wq + ox0;
            const float *w = Wp + (size_t)(c * kh + i) * kw * cout + o0;
            for (int j = 0; j < kw; j++, xr++, w += cout) {
                __m512 w0 = _mm512_loadu_ps(w);
                __m512 w1 = _mm512_loadu_ps(w + CV_DCONV_OB);
                __asm__("" : "+r"(xr)); /* no reuse of loads across taps: registers */
#pragma GCC unroll 14
                for (int r = 0; r < CV_DCONV_RUN; r++) {
                    __m512 xv = _mm512_set1_ps(xr[r]);
                    a0[r] = _mm512_fmadd_ps(xv, w0, a0[r]);
                    a1[r] = _mm512_fmadd_ps(xv, w1, a1[r]);
                }
            }
        }
#pragma GCC unroll 14
    for (int r = 0; r < CV_DCONV_RUN; r++) {
        _mm512_storeu_ps(t + r * CV_DCONV_OB, a0[r]);
        _mm512_storeu_ps(t + (CV_DCONV_RUN + r) * CV_DCONV_OB, a1[r]);
    }
}
#else
static void block_sums(const cv_conv_geom *g, int cout, const float *Wp, const float *plane,
                       int o0, int oy, int ox0, float *t)
{
    (void)g; (void)cout; (void)Wp; (void)plane; (void)o0; (void)oy; (void)ox0; (void)t;
}
#endif

typedef struct {
    const cv_conv_geom *g;
    int cout, add;
    const float *Wp, *bias, *x;
    size_t xstride, ystride;
    float *y;
} dconv_job;

static void dconv_range(void *p, size_t lo, size_t hi)
{
    const dconv_job *q = p;
    const cv_conv_geom *g = q->g;
    float plane[CV_DCONV_PLANE], t[2 * CV_DCONV_RUN * CV_DCONV_OB];
    for (size_t s = lo; s < hi; s++) {
        float *ys = q->y + s * q->ystride;
        fill_planes(g, q->x + s * q->xstride, plane);
        for (int o0 = 0; o0 < q->cout; o0 += 2 * CV_DCONV_OB)
            for (int oy = 0; oy < g->oh; oy++)
                for (int ox0 = 0; ox0 < g->ow; ox0 += CV_DCONV_RUN) {
                    if (o0 + 2 * CV_DCONV_OB <= q->cout) {
                        block_sums2(g, q->cout, q->Wp, plane, o0, oy, ox0, t);
                        store_block(g, t, q->bias, o0, oy, ox0, q->add, ys);
                        store_block(g, t + CV_DCONV_RUN * CV_DCONV_OB, q->bias, o0 + CV_DCONV_OB,
                                    oy, ox0, q->add, ys);
                    } else {
                        block_sums(g, q->cout, q->Wp, plane, o0, oy, ox0, t);
                        store_block(g, t, q->bias, o0, oy, ox0, q->add, ys);
                    }
                }
    }
}

void cv_dconv_run(const cv_conv_geom *g, int cout, const float *Wp, const float *bias, int n,
                  const float *x, size_t xstride, float *y, size_t ystride, int add)
{
    dconv_job q = {g, cout, add, Wp, bias, x, xstride, ystride, y};
    size_t work = (size_t)cout * g->oh * g->ow * g->C * g->kh * g->kw / 64;
    cv_parallel_for((size_t)n, cv_parallel_grain(work), dconv_range, &q);
}
