/* conv_direct.c - direct stride-1 convolution with AVX-512 register tiles
 * (see conv_direct.h): per sample, the input planes are copied once into a
 * zero-padded stack buffer, then every (64, 32 or 16 output channels, output
 * row, 7 or 14 columns) tile sums its taps in registers; weight gradients
 * stage samples in the caller's scratch and sum per sample group. */
#include "conv_direct.h"

#include <math.h>
#include <string.h>

#include "parallel.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(CV_DCONV_PORTABLE)
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

/* y rows of 16 channels at (oy, ox0 .. ox0 + run) from the block's lanes t[r*16 + l]. */
static void store_block(const cv_conv_geom *g, const float *t, const float *bias, int o0, int oy,
                        int ox0, int run, int add, float *ys)
{
    int R = g->ow - ox0 < run ? g->ow - ox0 : run;
    size_t P = (size_t)g->oh * g->ow;
    for (int l = 0; l < CV_DCONV_OB; l++) {
        float *yo = ys + (size_t)(o0 + l) * P + (size_t)oy * g->ow + ox0;
        float b = bias ? bias[o0 + l] : 0.0f;
        for (int r = 0; r < R; r++)
            yo[r] = (add ? yo[r] : 0.0f) + (t[r * CV_DCONV_OB + l] + b);
    }
}

/* Register blocks: NB x 16 output channels by RUN columns (NB * RUN <= 28
 * accumulators); more channels per block share each broadcast input. */
typedef struct {
    int nb, run;
} dconv_shape;

static dconv_shape shape_for(int cout)
{
    dconv_shape s = {1, CV_DCONV_RUN};
    if (cout % (4 * CV_DCONV_OB) == 0)
        s.nb = 4, s.run = CV_DCONV_RUN / 2;
    else if (cout % (2 * CV_DCONV_OB) == 0)
        s.nb = 2;
    return s;
}

#ifdef CV_DCONV_X86
/* The register-tile step both kernels are made of: acc[r][b] += x[r] v[b]
 * for R broadcast inputs and NB vectors of 16 (a rank-1 update). */
__attribute__((always_inline, target("avx512f,fma"))) static inline void
tile_update(__m512 acc[][4], const float *x, const float *v, const int R, const int NB)
{
    __m512 vb[4];
#pragma GCC unroll 4
    for (int b = 0; b < NB; b++)
        vb[b] = _mm512_loadu_ps(v + b * CV_DCONV_OB);
#pragma GCC unroll 14
    for (int r = 0; r < R; r++) {
        __m512 xv = _mm512_set1_ps(x[r]);
#pragma GCC unroll 4
        for (int b = 0; b < NB; b++)
            acc[r][b] = _mm512_fmadd_ps(xv, vb[b], acc[r][b]);
    }
}

/* One block: t[b][r][l] = sum over c, i, j of W[o0 + 16b + l, c, i, j] x
 * plane(oy + i, ox0 + r + j). */
__attribute__((always_inline, target("avx512f,fma"))) static inline void
block_sums_k(const cv_conv_geom *g, int cout, const float *Wp, const float *plane, int o0, int oy,
             int ox0, float *t, const int NB, const int RUN)
{
    int Hp = plane_h(g), Wq = plane_w(g), kh = g->kh, kw = g->kw;
    __m512 acc[CV_DCONV_RUN][4];
#pragma GCC unroll 14
    for (int r = 0; r < RUN; r++)
#pragma GCC unroll 4
        for (int b = 0; b < NB; b++)
            acc[r][b] = _mm512_setzero_ps();
    for (int c = 0; c < g->C; c++)
        for (int i = 0; i < kh; i++) {
            const float *xr = plane + ((size_t)c * Hp + oy + i) * Wq + ox0;
            const float *w = Wp + (size_t)(c * kh + i) * kw * cout + o0;
            for (int j = 0; j < kw; j++, xr++, w += cout) {
                __asm__("" : "+r"(xr)); /* no reuse of loads across taps: registers */
                tile_update(acc, xr, w, RUN, NB);
            }
        }
#pragma GCC unroll 4
    for (int b = 0; b < NB; b++)
#pragma GCC unroll 14
        for (int r = 0; r < RUN; r++)
            _mm512_storeu_ps(t + (b * RUN + r) * CV_DCONV_OB, acc[r][b]);
}

__attribute__((target("avx512f,fma"))) static void block_sums(const cv_conv_geom *g, int cout,
                                                               const float *Wp,
                                                               const float *plane, int o0,
                                                               int oy, int ox0, dconv_shape s,
                                                               float *t)
{
    if (s.nb == 4)
        block_sums_k(g, cout, Wp, plane, o0, oy, ox0, t, 4, CV_DCONV_RUN / 2);
    else if (s.nb == 2)
        block_sums_k(g, cout, Wp, plane, o0, oy, ox0, t, 2, CV_DCONV_RUN);
    else
        block_sums_k(g, cout, Wp, plane, o0, oy, ox0, t, 1, CV_DCONV_RUN);
}
#else /* never called: cv_dconv_supported is 0 without AVX-512 */
static void block_sums(const cv_conv_geom *g, int cout, const float *Wp, const float *plane,
                       int o0, int oy, int ox0, dconv_shape s, float *t)
{
    (void)g; (void)cout; (void)Wp; (void)plane; (void)o0; (void)oy; (void)ox0;
    for (int r = 0; r < s.nb * s.run * CV_DCONV_OB; r++)
        t[r] = NAN;
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
    dconv_shape sh = shape_for(q->cout);
    float plane[CV_DCONV_PLANE], t[2 * CV_DCONV_RUN * CV_DCONV_OB];
    for (size_t s = lo; s < hi; s++) {
        float *ys = q->y + s * q->ystride;
        fill_planes(g, q->x + s * q->xstride, plane);
        for (int o0 = 0; o0 < q->cout; o0 += sh.nb * CV_DCONV_OB)
            for (int oy = 0; oy < g->oh; oy++)
                for (int ox0 = 0; ox0 < g->ow; ox0 += sh.run) {
                    block_sums(g, q->cout, q->Wp, plane, o0, oy, ox0, sh, t);
                    for (int b = 0; b < sh.nb; b++)
                        store_block(g, t + b * sh.run * CV_DCONV_OB, q->bias,
                                    o0 + b * CV_DCONV_OB, oy, ox0, sh.run, q->add, ys);
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

/* ---- weight gradients ---------------------------------------------------- */

#define CV_DWG_CHUNK 2   /* samples whose planes and transposed cotangents are staged */
#define CV_DWG_GROUPS 16 /* sample groups with their own partial sums */
#define CV_DWG_MAXKW 7
#define CV_DWG_MAXKW4 5  /* widest kernel with 64-channel items: 5 x 4 accumulators */

int cv_dconv_wgrad_supported(const cv_conv_geom *g, int cout)
{
    return g->kw <= CV_DWG_MAXKW && cv_dconv_supported(g, cout);
}

static size_t wg_sample_floats(const cv_conv_geom *g, int cout)
{
    return (size_t)g->oh * g->ow * cout + (size_t)g->C * plane_h(g) * plane_w(g);
}

/* Per sample group: its partial sums, then (after all of those) its staging slot. */
size_t cv_dconv_wgrad_scratch(const cv_conv_geom *g, int cout)
{
    return CV_DWG_GROUPS * (cv_dconv_packed_floats(g, cout) + CV_DWG_CHUNK * wg_sample_floats(g, cout));
}

typedef struct {
    const cv_conv_geom *g;
    int cout, nb;           /* nb: 16-channel blocks per item (1, 2 or 4) */
    const float *x, *gy;
    size_t xstride, gystride;
    float *Gp;              /* accumulators, packed [(c*kh + i)*kw + j][cout] */
    float *stage;           /* per staged sample: gy^T [P][cout], then planes */
    int s0;                 /* first sample of the staged chunk */
    int n, groups;
    float *partials;        /* groups x packed accumulators */
} wg_job;

/* Stages samples s0 + s, s < m: padded planes and gy transposed to [P][cout]. */
static void wg_stage(const wg_job *q, int m)
{
    const cv_conv_geom *g = q->g;
    size_t P = (size_t)g->oh * g->ow;
    for (size_t s = 0; s < (size_t)m; s++) {
        float *gt = q->stage + s * wg_sample_floats(g, q->cout);
        const float *gs = q->gy + (q->s0 + s) * q->gystride;
        for (int o = 0; o < q->cout; o++)
            for (size_t t = 0; t < P; t++)
                gt[t * q->cout + o] = gs[(size_t)o * P + t];
        fill_planes(g, q->x + (q->s0 + s) * q->xstride, gt + P * q->cout);
    }
}

#ifdef CV_DCONV_X86
/* Item (channel block o0, input channel c, tap row i) over m staged samples:
 * Gp[(c, i, j)][o0 ..] += sum_s sum_p gy^T_s[p][o0 ..] plane_s[c](oy + i, ox + j). */
__attribute__((always_inline, target("avx512f,fma"))) static inline void
wg_item_k(const wg_job *q, int o0, int c, int i, int m, const int KW, const int NB)
{
    const cv_conv_geom *g = q->g;
    int Hp = plane_h(g), Wq = plane_w(g), cout = q->cout;
    size_t P = (size_t)g->oh * g->ow, per = wg_sample_floats(g, cout);
    float *G = q->Gp + (size_t)(c * g->kh + i) * KW * cout + o0;
    __m512 acc[CV_DWG_MAXKW][4];
#pragma GCC unroll 7
    for (int j = 0; j < KW; j++)
#pragma GCC unroll 4
        for (int b = 0; b < NB; b++)
            acc[j][b] = _mm512_loadu_ps(G + (size_t)j * cout + b * CV_DCONV_OB);
    for (int s = 0; s < m; s++) {
        const float *gt = q->stage + s * per;
        const float *pl = gt + P * cout + (size_t)c * Hp * Wq;
        for (int oy = 0; oy < g->oh; oy++) {
            const float *xr = pl + (size_t)(oy + i) * Wq;
            const float *gv = gt + (size_t)oy * g->ow * cout + o0;
            for (int ox = 0; ox < g->ow; ox++, xr++, gv += cout)
                tile_update(acc, xr, gv, KW, NB);
        }
    }
#pragma GCC unroll 7
    for (int j = 0; j < KW; j++)
#pragma GCC unroll 4
        for (int b = 0; b < NB; b++)
            _mm512_storeu_ps(G + (size_t)j * cout + b * CV_DCONV_OB, acc[j][b]);
}

#define CV_WG_CASE(KW)                                                                         \
    case KW:                                                                                   \
        if (KW <= CV_DWG_MAXKW4 && q->nb == 4)                                                 \
            wg_item_k(q, o0, c, i, m, KW, 4);                                                  \
        else if (q->nb == 2)                                                                   \
            wg_item_k(q, o0, c, i, m, KW, 2);                                                  \
        else                                                                                   \
            wg_item_k(q, o0, c, i, m, KW, 1);                                                  \
        break;

__attribute__((target("avx512f,fma"))) static void wg_item(const wg_job *q, int o0, int c,
                                                            int i, int m)
{
    switch (q->g->kw) {
        CV_WG_CASE(1) CV_WG_CASE(2) CV_WG_CASE(3) CV_WG_CASE(4) CV_WG_CASE(5) CV_WG_CASE(6)
        CV_WG_CASE(7)
    default: break;
    }
}
#else
static void wg_item(const wg_job *q, int o0, int c, int i, int m)
{
    (void)q; (void)o0; (void)c; (void)i; (void)m;
}
#endif

/* All items of the m staged samples into q->Gp, in item order. */
static void wg_items_all(const wg_job *q, int m)
{
    int per_block = q->g->C * q->g->kh, blocks = q->cout / (q->nb * CV_DCONV_OB);
    for (int ob = 0; ob < blocks; ob++)
        for (int rest = 0; rest < per_block; rest++)
            wg_item(q, ob * q->nb * CV_DCONV_OB, rest / q->g->kh, rest % q->g->kh, m);
}

/* Sample groups [lo, hi): each into its partial sums, staging CV_DWG_CHUNK
 * samples at a time in its own slot of the scratch (base->stage). */
static void wg_group_range(void *p, size_t lo, size_t hi)
{
    const wg_job *base = p;
    size_t packed = cv_dconv_packed_floats(base->g, base->cout);
    size_t slot = CV_DWG_CHUNK * wg_sample_floats(base->g, base->cout);
    for (size_t gr = lo; gr < hi; gr++) {
        wg_job q = *base;
        int a = (int)(gr * (size_t)q.n / q.groups), b = (int)((gr + 1) * (size_t)q.n / q.groups);
        q.Gp = q.partials + gr * packed;
        q.stage = base->stage + gr * slot;
        memset(q.Gp, 0, sizeof(float) * packed);
        for (q.s0 = a; q.s0 < b; q.s0 += CV_DWG_CHUNK) {
            int m = b - q.s0 < CV_DWG_CHUNK ? b - q.s0 : CV_DWG_CHUNK;
            wg_stage(&q, m);
            wg_items_all(&q, m);
        }
    }
}

void cv_dconv_weight_grad(const cv_conv_geom *g, int cout, int n, const float *x,
                          size_t xstride, const float *gy, size_t gystride, int add, float *gW,
                          float *scratch)
{
    size_t K = (size_t)g->C * g->kh * g->kw, packed = K * cout;
    int groups = n < CV_DWG_GROUPS ? n : CV_DWG_GROUPS;
    int nb = cout % (4 * CV_DCONV_OB) == 0 && g->kw <= CV_DWG_MAXKW4 ? 4
             : cout % (2 * CV_DCONV_OB) == 0                         ? 2
                                                                     : 1;
    wg_job q = {g, cout, nb, x, gy, xstride, gystride, NULL,
                scratch + CV_DWG_GROUPS * packed, 0, n, groups, scratch};
    size_t group_floats = (size_t)(n / groups + 1) * packed; /* ~ FMAs per group / 16 */
    cv_parallel_for((size_t)groups, cv_parallel_grain(group_floats), wg_group_range, &q);
    for (int gr = 1; gr < groups; gr++) /* partial sums in group order */
        for (size_t t = 0; t < packed; t++)
            scratch[t] += scratch[gr * packed + t];
    for (int o = 0; o < cout; o++)
        for (size_t r = 0; r < K; r++)
            gW[o * K + r] = (add ? gW[o * K + r] : 0.0f) + scratch[r * cout + o];
}
