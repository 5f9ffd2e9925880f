/* layer_conv.c - kernels of torch.nn.Conv2d (stride, padding, dilation,
 * groups, bias): y = W * x + b with W [out, in/groups, kh, kw]; Conv1d is
 * the same class of kernels on [C, L] seen as [C, 1, L].  Kernels work
 * on chunks of S samples unfolded (im2col) side by side into one K x S*P
 * matrix, and the k vectors' weight terms share one GEMM (k*cout rows), so
 * every product is a few large sgemm calls; outputs are scattered back to
 * NCHW, cotangents gathered channel-major and folded back through col2im.
 * Where conv_direct.h handles the geometry (stride 1, AVX-512, groups 1),
 * every kernel but per_sample and gram_add runs direct instead: the
 * convolutions (forward, tangents, input cotangents as transposed
 * convolutions) and the weight gradients. */
#include "layer_conv.h"

#include <cblas.h>
#include <limits.h>
#include <stdint.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "conv_direct.h"
#include "im2col.h"
#include "parallel.h"

#define CV_CONV_GRAM_BUDGET ((size_t)1 << 22)  /* floats, default per chunk */
#define CV_CONV_CHUNK_FLOATS ((size_t)1 << 21) /* unfolded chunk + its outputs */

typedef struct {
    cv_conv_geom g;
    int cout, groups, og, kg, K, P;
    size_t wnumel;
    int has_bias;
} conv_dims;

static conv_dims dims_of(const cv_layer_ctx *c)
{
    const cv_layer *L = c->L;
    const cv_conv2d_attr *A = CV_LAYER_ATTR(L, cv_conv2d_attr);
    int one_d = L->in_shape.rank == 2; /* Conv1d: [C, L] is [C, 1, L] */
    conv_dims d;
    d.g.C = L->in_shape.dim[0];
    d.g.H = one_d ? 1 : L->in_shape.dim[1];
    d.g.W = L->in_shape.dim[2 - one_d];
    d.g.kh = A->kernel[0];
    d.g.kw = A->kernel[1];
    d.g.sh = A->stride[0];
    d.g.sw = A->stride[1];
    d.g.ph = A->padding[0];
    d.g.pw = A->padding[1];
    d.g.dh = A->dilation[0];
    d.g.dw = A->dilation[1];
    d.g.oh = one_d ? 1 : L->out_shape.dim[1];
    d.g.ow = L->out_shape.dim[2 - one_d];
    d.cout = L->out_shape.dim[0];
    d.groups = A->groups;
    d.og = d.cout / d.groups;
    d.kg = d.g.C / d.groups * d.g.kh * d.g.kw;
    d.K = d.kg * d.groups;
    d.P = d.g.oh * d.g.ow;
    d.wnumel = (size_t)d.cout * d.kg;
    d.has_bias = A->has_bias;
    return d;
}

/* Samples per chunk for k vectors: the unfolded chunk (K x S*P) and the
 * k*cout x S*P outputs together within CV_CONV_CHUNK_FLOATS. */
static int chunk_samples(const conv_dims *d, int n, int k)
{
    size_t per = (size_t)d->P * (d->K + (size_t)k * d->cout);
    size_t s = CV_CONV_CHUNK_FLOATS / per;
    if (s < 1)
        s = 1;
    return s < (size_t)n ? (int)s : n;
}

/* Scratch of a chunk of S samples: the unfolded chunk, the k*cout x S*P
 * outputs or cotangents, and k stacked weight matrices. */
static size_t chunk_need(const conv_dims *d, int k, int S)
{
    size_t m = (size_t)S * d->P;
    return m * d->K + m * k * d->cout + (size_t)k * d->wnumel;
}

/* Direct kernels for the convolutions with W (forward, tangents) and with
 * W^T (input cotangents): both need groups == 1 and a supported geometry. */
static int direct_fwd(const conv_dims *d)
{
    return d->groups == 1 && cv_dconv_supported(&d->g, d->cout);
}

static int direct_bwd(const conv_dims *d)
{
    cv_conv_geom t = cv_dconv_transposed(&d->g, d->cout);
    return direct_fwd(d) && cv_dconv_supported(&t, d->g.C);
}

static int direct_wgrad(const conv_dims *d)
{
    return d->groups == 1 && cv_dconv_wgrad_supported(&d->g, d->cout);
}

/* Scratch of the direct kernels for a batch of n: two packed weights, the
 * weight gradient's partial sums, or packed weights and n outputs. */
static size_t direct_need(const conv_dims *d, int n)
{
    size_t packed = cv_dconv_packed_floats(&d->g, d->cout);
    size_t a = 2 * packed, b = cv_dconv_wgrad_scratch(&d->g, d->cout);
    size_t q = packed + (size_t)n * d->cout * d->P; /* conv_quad_extra */
    a = a > b ? a : b;
    return a > q ? a : q;
}

/* Whether a kernel runs direct: the convolutions with W, the input
 * cotangents if gx, the weight gradients if gtheta, and their scratch. */
static int use_direct(const cv_layer_ctx *c, const conv_dims *d, int gx, int gtheta)
{
    return (!gx || direct_bwd(d)) && (!gtheta || direct_wgrad(d)) && direct_fwd(d) &&
           c->work && c->work_floats >= direct_need(d, c->n);
}

static size_t conv_work(const cv_layer_ctx *c, int k)
{
    conv_dims d = dims_of(c);
    size_t direct = direct_fwd(&d) ? direct_need(&d, c->n) : 0;
    size_t a = chunk_need(&d, k + 1, chunk_samples(&d, c->n, k + 1)); /* conv_vjp_hvp */
    size_t b = (size_t)d.K * d.P;
    size_t quad = chunk_need(&d, 2, 1); /* conv_quad_extra: gy and one product */
    a = a > b ? a : b;
    a = a > direct ? a : direct;
    return a > quad ? a : quad;
}

/* Scratch of `need` floats: the driver's work buffer, NULL if it is too small. */
static float *scratch(const cv_layer_ctx *c, size_t need)
{
    return c->work && c->work_floats >= need ? c->work : NULL;
}

typedef struct {
    int S;      /* samples per chunk */
    float *u;   /* K x S*P: an unfolded chunk */
    float *t;   /* k*cout x S*P: outputs or cotangents, row (j, o), column (s, p) */
    float *ws;  /* k x wnumel: stacked weight directions or gradients */
} conv_chunk;

/* Splits the work buffer for k vectors; -1 if it is too small. */
static int chunk_scratch(const cv_layer_ctx *c, const conv_dims *d, int k, conv_chunk *ch)
{
    int S = chunk_samples(d, c->n, k);
    while (S > 1 && chunk_need(d, k, S) > c->work_floats)
        S--;
    ch->u = scratch(c, chunk_need(d, k, S));
    if (!ch->u)
        return -1;
    ch->S = S;
    ch->t = ch->u + (size_t)S * d->P * d->K;
    ch->ws = ch->t + (size_t)S * d->P * k * d->cout;
    return 0;
}

static void fill_nan(float *p, size_t len)
{
    for (size_t i = 0; i < len; i++)
        p[i] = NAN;
}

/* T (cout x m, ld lt) = W cols (+ beta T) per group; cols K x m with ld lc. */
static void gemm_w_cols(const conv_dims *d, const float *W, const float *cols, size_t lc, int m,
                        float beta, float *T, size_t lt)
{
    for (int g = 0; g < d->groups; g++)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, d->og, m, d->kg, 1.0f,
                    W + (size_t)g * d->og * d->kg, d->kg, cols + (size_t)g * d->kg * lc,
                    (int)lc, beta, T + (size_t)g * d->og * lt, (int)lt);
}

/* cols (K x m, ld lc) = W^T T (+ beta cols) per group: unfolded input cotangents. */
static void gemm_wt_t(const conv_dims *d, const float *W, const float *T, size_t lt, int m,
                      float beta, float *cols, size_t lc)
{
    for (int g = 0; g < d->groups; g++)
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, d->kg, m, d->og, 1.0f,
                    W + (size_t)g * d->og * d->kg, d->kg, T + (size_t)g * d->og * lt, (int)lt,
                    beta, cols + (size_t)g * d->kg * lc, (int)lc);
}

/* gW (cout x kg) = T cols^T (+ beta gW) per group: the weight gradient. */
static void gemm_t_colst(const conv_dims *d, const float *T, size_t lt, const float *cols,
                         size_t lc, int m, float beta, float *gW)
{
    for (int g = 0; g < d->groups; g++)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, d->og, d->kg, m, 1.0f,
                    T + (size_t)g * d->og * lt, (int)lt, cols + (size_t)g * d->kg * lc,
                    (int)lc, beta, gW + (size_t)g * d->og * d->kg, d->kg);
}

/* gb[o] += sum of row o of T (cout x m, ld lt). */
static void row_sums(const conv_dims *d, const float *T, size_t lt, size_t m, float *gb)
{
    for (int o = 0; o < d->cout; o++) {
        const float *r = T + (size_t)o * lt;
        float s = 0;
        for (size_t p = 0; p < m; p++)
            s += r[p];
        gb[o] += s;
    }
}

/* The samples of a chunk are unfolded, folded and copied in parallel
 * (cv_parallel_for over samples or (vector, sample) pairs): each writes its
 * own columns or planes, so the result does not depend on the threads. */
typedef struct {
    const cv_layer_ctx *c;
    const conv_dims *d;
    int n0, S, add;
    const float *src, *b;
    size_t bstride;
    float *dst;
} chunk_job;

static void unfold_range(void *p, size_t lo, size_t hi)
{
    const chunk_job *q = p;
    size_t ld = (size_t)q->S * q->d->P;
    for (size_t s = lo; s < hi; s++)
        cv_im2col_ld(&q->d->g, q->src + s * q->c->in_numel, 0, q->d->K, q->dst + s * q->d->P,
                     ld);
}

/* u (K x S*P) = the unfolded S samples at x (stride in_numel). */
static void unfold_chunk(const cv_layer_ctx *c, const conv_dims *d, const float *x, int S,
                         float *u)
{
    chunk_job q = {c, d, 0, S, 0, x, NULL, 0, u};
    cv_parallel_for((size_t)S, cv_parallel_grain((size_t)d->K * d->P), unfold_range, &q);
}

static void fold_range(void *p, size_t lo, size_t hi)
{
    const chunk_job *q = p;
    size_t ld = (size_t)q->S * q->d->P, in = q->c->in_numel;
    if (!q->add)
        memset(q->dst + lo * in, 0, sizeof(float) * (hi - lo) * in);
    for (size_t s = lo; s < hi; s++)
        cv_col2im_add_ld(&q->d->g, q->src + s * q->d->P, ld, q->dst + s * in);
}

/* x = (x +) the fold of S samples' unfolded cotangents u (K x S*P). */
static void fold_chunk(const cv_layer_ctx *c, const conv_dims *d, const float *u, int S, int add,
                       float *x)
{
    chunk_job q = {c, d, 0, S, add, u, NULL, 0, x};
    cv_parallel_for((size_t)S, cv_parallel_grain((size_t)d->K * d->P), fold_range, &q);
}

/* The two layouts scatter_chunk and gather_chunk convert between, for item
 * js = (vector j, chunk sample s) and channel o: the chunk matrix T (rows
 * (j, o), S*P columns) and the batch activations (sample n0 + s of vector j). */
static size_t chunk_off(const chunk_job *q, size_t js, int o)
{
    size_t j = js / (size_t)q->S, s = js % (size_t)q->S;
    return (j * q->d->cout + (size_t)o) * (size_t)q->S * q->d->P + s * q->d->P;
}

static size_t batch_off(const chunk_job *q, size_t js, int o)
{
    size_t j = js / (size_t)q->S, s = js % (size_t)q->S;
    return (j * q->c->n + q->n0 + s) * q->c->out_numel + (size_t)o * q->d->P;
}

/* y_(j, n0+s) = T rows (j, .), columns of s (+ b_j) for k vectors and the S
 * samples [n0, n0 + S); b_j = b + j*bstride (b NULL: no bias). */
static void scatter_range(void *p, size_t lo, size_t hi)
{
    const chunk_job *q = p;
    const conv_dims *d = q->d;
    for (size_t js = lo; js < hi; js++) {
        size_t j = js / (size_t)q->S;
        for (int o = 0; o < d->cout; o++) {
            const float *src = q->src + chunk_off(q, js, o);
            float *dst = q->dst + batch_off(q, js, o);
            float bo = q->b ? q->b[j * q->bstride + o] : 0.0f;
            for (int t = 0; t < d->P; t++)
                dst[t] = src[t] + bo;
        }
    }
}

static void scatter_chunk(const cv_layer_ctx *c, const conv_dims *d, int k, int n0, int S,
                          const float *T, const float *b, size_t bstride, float *y)
{
    chunk_job q = {c, d, n0, S, 0, T, b, bstride, y};
    cv_parallel_for((size_t)k * S, cv_parallel_grain(c->out_numel), scatter_range, &q);
}

/* T rows (j, .) = the cotangents gy_(j, n0+s), channel-major: the adjoint
 * layout of scatter_chunk. */
static void gather_range(void *p, size_t lo, size_t hi)
{
    const chunk_job *q = p;
    for (size_t js = lo; js < hi; js++)
        for (int o = 0; o < q->d->cout; o++)
            memcpy(q->dst + chunk_off(q, js, o), q->src + batch_off(q, js, o),
                   sizeof(float) * q->d->P);
}

static void gather_chunk(const cv_layer_ctx *c, const conv_dims *d, int k, int n0, int S,
                         const float *gy, float *T)
{
    chunk_job q = {c, d, n0, S, 0, gy, NULL, 0, T};
    cv_parallel_for((size_t)k * S, cv_parallel_grain(c->out_numel), gather_range, &q);
}

/* For every sample: y (+)= conv(x, W) (+ bias), direct; Wp: packing scratch. */
static void conv_direct(const cv_layer_ctx *c, const conv_dims *d, const float *W,
                        const float *bias, const float *x, int add, float *y, float *Wp)
{
    cv_dconv_pack(&d->g, d->cout, W, Wp);
    cv_dconv_run(&d->g, d->cout, Wp, bias, c->n, x, c->in_numel, y, c->out_numel, add);
}

/* For every sample: gx (+)= conv_transpose(gy, W), direct. */
static void tconv_direct(const cv_layer_ctx *c, const conv_dims *d, const float *W,
                         const float *gy, int add, float *gx, float *Wp)
{
    cv_conv_geom t = cv_dconv_transposed(&d->g, d->cout);
    cv_dconv_pack_transposed(&d->g, d->cout, W, Wp);
    cv_dconv_run(&t, d->g.C, Wp, NULL, c->n, gy, c->out_numel, gx, c->in_numel, add);
}

/* For k vectors: gtheta_j (+ gtheta_j if add) = the parameter gradient of
 * cotangents gy_j (at gy + j*gstep) against inputs at xin + j*xstep, direct;
 * the bias part (row sums) only when not adding: R-op terms have none. */
static void wgrad_direct(const cv_layer_ctx *c, const conv_dims *d, int k, const float *xin,
                         size_t xstep, const float *gy, size_t gstep, int add, float *gtheta)
{
    for (int j = 0; j < k; j++) {
        const float *gj = gy + j * gstep;
        float *gt = gtheta + (size_t)j * c->nparam;
        cv_dconv_weight_grad(&d->g, d->cout, c->n, xin + j * xstep, c->in_numel, gj,
                             c->out_numel, add, gt, c->work);
        if (add || !d->has_bias)
            continue;
        memset(gt + d->wnumel, 0, sizeof(float) * d->cout);
        for (int s = 0; s < c->n; s++)
            row_sums(d, gj + (size_t)s * c->out_numel, d->P, d->P, gt + d->wnumel);
    }
}

static int conv_forward(cv_layer_ctx *c, float *y, cv_err *e)
{
    conv_dims d = dims_of(c);
    if (direct_fwd(&d)) {
        float *Wp = malloc(sizeof(float) * cv_dconv_packed_floats(&d.g, d.cout));
        if (!Wp)
            return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "Conv2d packed weights");
        conv_direct(c, &d, c->theta, d.has_bias ? c->theta + d.wnumel : NULL, c->x, 0, y, Wp);
        free(Wp);
        return 0;
    }
    int S = chunk_samples(&d, c->n, 1);
    size_t m = (size_t)S * d.P;
    float *u = malloc(sizeof(float) * m * (d.K + (size_t)d.cout));
    if (!u)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "Conv2d unfold (%zu floats)",
                          m * (d.K + (size_t)d.cout));
    float *T = u + m * d.K;
    for (int n0 = 0; n0 < c->n; n0 += S) {
        int s = c->n - n0 < S ? c->n - n0 : S;
        unfold_chunk(c, &d, c->x + (size_t)n0 * c->in_numel, s, u);
        gemm_w_cols(&d, c->theta, u, (size_t)s * d.P, s * d.P, 0.0f, T, (size_t)s * d.P);
        scatter_chunk(c, &d, 1, n0, s, T, d.has_bias ? c->theta + d.wnumel : NULL, 0, y);
    }
    free(u);
    return 0;
}

/* Copies the weight parts of k parameter vectors into Ws (k x wnumel). */
static void stack_weights(const cv_layer_ctx *c, const conv_dims *d, int k, const float *v,
                          float *Ws)
{
    for (int j = 0; j < k; j++)
        memcpy(Ws + (size_t)j * d->wnumel, v + (size_t)j * c->nparam,
               sizeof(float) * d->wnumel);
}

/* Weight gradients of a chunk for all k cotangents T (rows (j, o)) against
 * the unfolded inputs u: one GEMM into the stacked Ws when groups == 1. */
static void weight_grads(const cv_layer_ctx *c, const conv_dims *d, int k, const float *T,
                         const float *u, int m, float beta, float *Ws, float *gtheta)
{
    if (d->groups == 1) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, k * d->cout, d->K, m, 1.0f, T, m,
                    u, m, beta, Ws, d->K);
        return;
    }
    for (int j = 0; j < k; j++)
        gemm_t_colst(d, T + (size_t)j * d->cout * m, m, u, m, m, beta,
                     gtheta + (size_t)j * c->nparam);
}

/* The parameter gradients of a chunk (samples [n0, n0 + S)) for its gathered
 * cotangents ch->t against its unfolded inputs, added from the second chunk
 * on: into ch->ws (groups == 1) or gtheta (weights), and gtheta (bias). */
static void chunk_param_grads(const cv_layer_ctx *c, const conv_dims *d, int k,
                              const conv_chunk *ch, int n0, int S, float *gtheta)
{
    int m = S * d->P;
    unfold_chunk(c, d, c->x + (size_t)n0 * c->in_numel, S, ch->u);
    weight_grads(c, d, k, ch->t, ch->u, m, n0 ? 1.0f : 0.0f, ch->ws, gtheta);
    for (int j = 0; d->has_bias && j < k; j++)
        row_sums(d, ch->t + (size_t)j * d->cout * m, m, m,
                 gtheta + (size_t)j * c->nparam + d->wnumel);
}

static void conv_vjp(const cv_layer_ctx *c, int k, const float *gy, float *gx, float *gtheta)
{
    conv_dims d = dims_of(c);
    int n = c->n;
    conv_chunk ch;
    if (use_direct(c, &d, gx != NULL, gtheta != NULL)) {
        for (int j = 0; gx && j < k; j++)
            tconv_direct(c, &d, c->theta, gy + (size_t)j * n * c->out_numel, 0,
                         gx + (size_t)j * n * c->in_numel, c->work);
        if (gtheta)
            wgrad_direct(c, &d, k, c->x, 0, gy, (size_t)n * c->out_numel, 0, gtheta);
        return;
    }
    if (chunk_scratch(c, &d, k, &ch)) {
        if (gx)
            fill_nan(gx, (size_t)k * n * c->in_numel);
        if (gtheta)
            fill_nan(gtheta, (size_t)k * c->nparam);
        return;
    }
    for (int j = 0; gtheta && d.has_bias && j < k; j++)
        memset(gtheta + (size_t)j * c->nparam + d.wnumel, 0, sizeof(float) * d.cout);
    for (int n0 = 0; n0 < n; n0 += ch.S) {
        int S = n - n0 < ch.S ? n - n0 : ch.S, m = S * d.P;
        gather_chunk(c, &d, k, n0, S, gy, ch.t);
        for (int j = 0; gx && j < k; j++) {
            gemm_wt_t(&d, c->theta, ch.t + (size_t)j * d.cout * m, m, m, 0.0f, ch.u, m);
            fold_chunk(c, &d, ch.u, S, 0, gx + ((size_t)j * n + n0) * c->in_numel);
        }
        if (!gtheta)
            continue;
        chunk_param_grads(c, &d, k, &ch, n0, S, gtheta);
    }
    for (int j = 0; gtheta && d.groups == 1 && j < k; j++)
        memcpy(gtheta + (size_t)j * c->nparam, ch.ws + (size_t)j * d.wnumel,
               sizeof(float) * d.wnumel);
}

/* T rows (j, .) = conv(x, V_j) over a chunk: one GEMM with the stacked Ws
 * when groups == 1. */
static void weight_tangents(const cv_layer_ctx *c, const conv_dims *d, int k, const float *Ws,
                            const float *vtheta, const float *u, int m, float *T)
{
    if (d->groups == 1) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, k * d->cout, m, d->K, 1.0f, Ws,
                    d->K, u, m, 0.0f, T, m);
        return;
    }
    for (int j = 0; j < k; j++)
        gemm_w_cols(d, vtheta + (size_t)j * c->nparam, u, m, m, 0.0f,
                    T + (size_t)j * d->cout * m, m);
}

/* ry_j = conv(rx_j, W) + conv(x, V_j) + b_j. */
static void conv_jvp(const cv_layer_ctx *c, int k, const float *rx, const float *vtheta,
                     float *ry)
{
    conv_dims d = dims_of(c);
    int n = c->n;
    size_t len = (size_t)k * n * c->out_numel;
    conv_chunk ch;
    if (!rx && !vtheta) {
        memset(ry, 0, sizeof(float) * len);
        return;
    }
    if (use_direct(c, &d, 0, 0)) {
        float *Wp = c->work, *Vp = Wp + cv_dconv_packed_floats(&d.g, d.cout);
        for (int j = 0; j < k; j++) {
            float *ryj = ry + (size_t)j * n * c->out_numel;
            const float *vj = vtheta ? vtheta + (size_t)j * c->nparam : NULL;
            if (vj)
                conv_direct(c, &d, vj, d.has_bias ? vj + d.wnumel : NULL, c->x, 0, ryj, Vp);
            if (rx)
                conv_direct(c, &d, c->theta, NULL, rx + (size_t)j * n * c->in_numel, vj != NULL,
                            ryj, Wp);
        }
        return;
    }
    if (chunk_scratch(c, &d, k, &ch)) {
        fill_nan(ry, len);
        return;
    }
    if (vtheta && d.groups == 1)
        stack_weights(c, &d, k, vtheta, ch.ws);
    for (int n0 = 0; n0 < n; n0 += ch.S) {
        int S = n - n0 < ch.S ? n - n0 : ch.S, m = S * d.P;
        if (vtheta) {
            unfold_chunk(c, &d, c->x + (size_t)n0 * c->in_numel, S, ch.u);
            weight_tangents(c, &d, k, ch.ws, vtheta, ch.u, m, ch.t);
        }
        for (int j = 0; rx && j < k; j++) {
            unfold_chunk(c, &d, rx + ((size_t)j * n + n0) * c->in_numel, S, ch.u);
            gemm_w_cols(&d, c->theta, ch.u, m, m, vtheta ? 1.0f : 0.0f,
                        ch.t + (size_t)j * d.cout * m, m);
        }
        scatter_chunk(c, &d, k, n0, S, ch.t, vtheta && d.has_bias ? vtheta + d.wnumel : NULL,
                      c->nparam, ry);
    }
}

/* R-op terms of the bilinear map (x, W) -> W * x:
 * gx_j += conv_transpose(gy, V_j), gW_j += sum_n gy_n unfold(rx_jn)^T.
 * The gradient cotangent gy of a chunk is gathered once for all j. */
static void conv_hvp_extra(const cv_layer_ctx *c, int k, const float *gy, const float *rx,
                           const float *vtheta, float *gx_add, float *gtheta_add)
{
    conv_dims d = dims_of(c);
    int n = c->n;
    conv_chunk ch;
    int do_gx = gx_add && vtheta, do_gt = gtheta_add && rx;
    if ((do_gx || do_gt) && use_direct(c, &d, do_gx, do_gt)) {
        for (int j = 0; do_gx && j < k; j++)
            tconv_direct(c, &d, vtheta + (size_t)j * c->nparam, gy, 1,
                         gx_add + (size_t)j * n * c->in_numel, c->work);
        if (do_gt)
            wgrad_direct(c, &d, k, rx, (size_t)n * c->in_numel, gy, 0, 1, gtheta_add);
        return;
    }
    if (!do_gx && !do_gt)
        return;
    if (chunk_scratch(c, &d, 1, &ch)) {
        if (gx_add)
            fill_nan(gx_add, (size_t)k * n * c->in_numel);
        if (gtheta_add)
            fill_nan(gtheta_add, (size_t)k * c->nparam);
        return;
    }
    for (int n0 = 0; n0 < n; n0 += ch.S) {
        int S = n - n0 < ch.S ? n - n0 : ch.S, m = S * d.P;
        gather_chunk(c, &d, 1, n0, S, gy, ch.t);
        for (int j = 0; j < k; j++) {
            size_t q = (size_t)j * n + n0;
            if (do_gx) {
                gemm_wt_t(&d, vtheta + (size_t)j * c->nparam, ch.t, m, m, 0.0f, ch.u, m);
                fold_chunk(c, &d, ch.u, S, 1, gx_add + q * c->in_numel);
            }
            if (do_gt) {
                unfold_chunk(c, &d, rx + q * c->in_numel, S, ch.u);
                gemm_t_colst(&d, ch.t, m, ch.u, m, m, 1.0f, gtheta_add + (size_t)j * c->nparam);
            }
        }
    }
}

/* conv_vjp then conv_hvp_extra in one pass over the chunks (im2col, groups == 1):
 * per vector one unfolded input cotangent W^T T_j + V_j^T T_g, folded once,
 * and the weight terms T_j unfold(x)^T + T_g unfold(rx_j)^T accumulated in
 * the stacked Ws; T_g (the gathered g0) sits in cotangent slot k. */
static void conv_vjp_hvp(const cv_layer_ctx *c, int k, const float *gy, const float *g0,
                         const float *rx, const float *vtheta, float *gx, float *gtheta)
{
    conv_dims d = dims_of(c);
    int n = c->n;
    conv_chunk ch;
    /* direct kernels share nothing between the two: run them one after the other */
    if (use_direct(c, &d, gx != NULL, gtheta != NULL) || d.groups != 1 ||
        chunk_scratch(c, &d, k + 1, &ch)) {
        conv_vjp(c, k, gy, gx, gtheta);
        conv_hvp_extra(c, k, g0, rx, vtheta, gx, gtheta);
        return;
    }
    const float *vx = gx ? vtheta : NULL, *rt = gtheta ? rx : NULL; /* the R-op terms */
    for (int j = 0; gtheta && d.has_bias && j < k; j++)
        memset(gtheta + (size_t)j * c->nparam + d.wnumel, 0, sizeof(float) * d.cout);
    for (int n0 = 0; n0 < n; n0 += ch.S) {
        int S = n - n0 < ch.S ? n - n0 : ch.S, m = S * d.P;
        float *tg = ch.t + (size_t)k * d.cout * m;
        gather_chunk(c, &d, k, n0, S, gy, ch.t);
        if (vx || rt)
            gather_chunk(c, &d, 1, n0, S, g0, tg);
        for (int j = 0; gx && j < k; j++) {
            gemm_wt_t(&d, c->theta, ch.t + (size_t)j * d.cout * m, m, m, 0.0f, ch.u, m);
            if (vx)
                gemm_wt_t(&d, vx + (size_t)j * c->nparam, tg, m, m, 1.0f, ch.u, m);
            fold_chunk(c, &d, ch.u, S, 0, gx + ((size_t)j * n + n0) * c->in_numel);
        }
        if (!gtheta)
            continue;
        chunk_param_grads(c, &d, k, &ch, n0, S, gtheta);
        for (int j = 0; rt && j < k; j++) {
            unfold_chunk(c, &d, rt + ((size_t)j * n + n0) * c->in_numel, S, ch.u);
            gemm_t_colst(&d, tg, m, ch.u, m, m, 1.0f, ch.ws + (size_t)j * d.wnumel);
        }
    }
    for (int j = 0; gtheta && j < k; j++)
        memcpy(gtheta + (size_t)j * c->nparam, ch.ws + (size_t)j * d.wnumel,
               sizeof(float) * d.wnumel);
}

/* Both R-op terms dotted with the direction are <gy, conv(rx_j, V_j)> (no
 * bias): q_j += 2 <gy, conv(rx_j, V_j)>, one GEMM per chunk and vector
 * against the chunk's gathered gy (rows of ch.t) in the same layout. */
static void conv_quad_extra(const cv_layer_ctx *c, int k, const float *gy, const float *rx,
                            const float *vtheta, double *q)
{
    conv_dims d = dims_of(c);
    int n = c->n;
    conv_chunk ch;
    if (!rx || !vtheta)
        return;
    if (use_direct(c, &d, 0, 0)) { /* conv(rx_j, V_j) for the batch, dotted with gy */
        size_t len = (size_t)n * c->out_numel;
        float *ty = c->work + cv_dconv_packed_floats(&d.g, d.cout);
        for (int j = 0; j < k; j++) {
            conv_direct(c, &d, vtheta + (size_t)j * c->nparam, NULL,
                        rx + (size_t)j * n * c->in_numel, 0, ty, c->work);
            q[j] += 2.0 * cblas_dsdot((int)len, gy, 1, ty, 1);
        }
        return;
    }
    if (chunk_scratch(c, &d, 2, &ch)) {
        for (int j = 0; j < k; j++)
            q[j] = NAN;
        return;
    }
    for (int n0 = 0; n0 < n; n0 += ch.S) {
        int S = n - n0 < ch.S ? n - n0 : ch.S, m = S * d.P;
        float *ty = ch.t + (size_t)d.cout * m;
        gather_chunk(c, &d, 1, n0, S, gy, ch.t);
        for (int j = 0; j < k; j++) {
            unfold_chunk(c, &d, rx + ((size_t)j * n + n0) * c->in_numel, S, ch.u);
            gemm_w_cols(&d, vtheta + (size_t)j * c->nparam, ch.u, m, m, 0.0f, ty, m);
            q[j] += 2.0 * cblas_dsdot(d.cout * m, ch.t, 1, ty, 1);
        }
    }
}

static void conv_per_sample(const cv_layer_ctx *c, const float *gy, float *G)
{
    conv_dims d = dims_of(c);
    float *buf = scratch(c, (size_t)d.K * d.P);
    if (!buf) {
        fill_nan(G, (size_t)c->n * c->nparam);
        return;
    }
    for (int i = 0; i < c->n; i++) {
        const float *g = gy + (size_t)i * c->out_numel;
        float *out = G + (size_t)i * c->nparam;
        cv_im2col(&d.g, c->x + (size_t)i * c->in_numel, 0, d.K, buf);
        gemm_t_colst(&d, g, d.P, buf, d.P, d.P, 0.0f, out);
        if (d.has_bias) {
            memset(out + d.wnumel, 0, sizeof(float) * (size_t)d.cout);
            row_sums(&d, g, d.P, d.P, out + d.wnumel);
        }
    }
}

/* ---- Gram ----------------------------------------------------------------
 * The per-(j, i) weight gradients gy_r U_i^T (U_i = unfold(x_i)) are formed
 * chunk by chunk over (group, output channels, unfolded rows) so that one
 * chunk B (R x width) stays within a memory budget; G += B B^T per chunk. */

typedef struct {
    int g, o0, o1; /* group, output channels [o0, o1) within the group */
    int a, b;      /* unfolded rows [a, b) within the group */
} gram_chunk;

/* B[r, (o - o0)*(b - a) + (t - a)] = sum_p gy_r[o, p] U_i[t, p] */
static void gram_fill(const cv_layer_ctx *c, const conv_dims *d, int k, const float *gy,
                      const gram_chunk *ch, float *U, float *B)
{
    int n = c->n, wr = ch->b - ch->a, width = (ch->o1 - ch->o0) * wr;
    int row0 = ch->g * d->kg;
    for (int i = 0; i < n; i++) {
        cv_im2col(&d->g, c->x + (size_t)i * c->in_numel, row0 + ch->a, row0 + ch->b, U);
        for (int j = 0; j < k; j++) {
            size_t r = (size_t)j * n + i;
            const float *g = gy + r * c->out_numel + (size_t)(ch->g * d->og + ch->o0) * d->P;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, ch->o1 - ch->o0, wr, d->P,
                        1.0f, g, d->P, U, d->P, 0.0f, B + r * width, wr);
        }
    }
}

/* Allocates the chunk buffer: up to the budget, halving on failure, at least R floats. */
static float *gram_buffer(size_t R, size_t want, size_t budget, size_t *got)
{
    if (!budget)
        budget = CV_CONV_GRAM_BUDGET;
    size_t cap = want < budget ? want : budget;
    if (cap < R)
        cap = R;
    for (;;) {
        float *B = malloc(sizeof(float) * cap);
        if (B || cap == R) {
            *got = B ? cap : 0;
            return B;
        }
        cap = cap / 2 < R ? R : cap / 2;
    }
}

static int gram_weight(const cv_layer_ctx *c, const conv_dims *d, int k, const float *gy,
                       double *G)
{
    size_t R = (size_t)k * c->n, cap;
    float *U = scratch(c, (size_t)d->K * d->P);
    float *B = gram_buffer(R, R * d->wnumel, c->gram_budget, &cap);
    if (!U || !B) {
        free(B);
        return -1;
    }
    size_t wmax = cap / R; /* columns per chunk */
    int oc = wmax >= (size_t)d->kg ? (int)(wmax / d->kg) : 1;
    int wr = wmax >= (size_t)d->kg ? d->kg : (int)wmax;
    if (oc > d->og)
        oc = d->og;
    for (int g = 0; g < d->groups; g++)
        for (int o0 = 0; o0 < d->og; o0 += oc)
            for (int a = 0; a < d->kg; a += wr) {
                gram_chunk ch = {g, o0, o0 + oc < d->og ? o0 + oc : d->og, a,
                                 a + wr < d->kg ? a + wr : d->kg};
                gram_fill(c, d, k, gy, &ch, U, B);
                cv_gram_add_rows((int)R, (ch.o1 - ch.o0) * (ch.b - ch.a), B, G);
            }
    free(B);
    return 0;
}

/* bias: <sum_p gy_r, sum_p gy_r'> */
static int gram_bias(const cv_layer_ctx *c, const conv_dims *d, int k, const float *gy,
                     double *G)
{
    size_t R = (size_t)k * c->n;
    float *S = calloc(R * d->cout, sizeof(float));
    if (!S)
        return -1;
    for (size_t r = 0; r < R; r++)
        row_sums(d, gy + r * c->out_numel, d->P, d->P, S + r * d->cout);
    cv_gram_add_rows((int)R, d->cout, S, G);
    free(S);
    return 0;
}

static void conv_gram_add(const cv_layer_ctx *c, int k, const float *gy, unsigned mask,
                          double *G)
{
    conv_dims d = dims_of(c);
    size_t R = (size_t)k * c->n;
    int bad = 0;
    if (mask & 1u)
        bad |= gram_weight(c, &d, k, gy, G);
    if (d.has_bias && (mask & 2u))
        bad |= gram_bias(c, &d, k, gy, G);
    if (bad) /* out of memory: make the failure visible rather than wrong */
        for (size_t q = 0; q < R * R; q++)
            G[q] = NAN;
}

/* ---- Kronecker factors (layer.h) -------------------------------------------
 * KFC (Grosse & Martens 2016): the positions are the P output pixels, the
 * input of position p the im2col column p of the sample (K = C*kh*kw rows,
 * the weight's row-major [out, in, kh, kw] flattening), the output
 * cotangent its cout channels at p.  groups > 1 has no Kronecker structure
 * here (block-diagonal over groups): the caller takes the exact block. */

#define CV_KRON_CHUNK_FLOATS ((size_t)1 << 20) /* unfolded samples per ssyrk */

static int conv_kron_dims(const cv_layer *L, int *dim_a, int *dim_b)
{
    const cv_conv2d_attr *A = CV_LAYER_ATTR(L, cv_conv2d_attr);
    if (A->groups != 1)
        return 0;
    *dim_a = L->in_shape.dim[0] * A->kernel[0] * A->kernel[1] + (A->has_bias != 0);
    *dim_b = L->out_shape.dim[0];
    return 1;
}

/* Expand: S += U U^T over chunks of samples unfolded side by side (K x S*P);
 * sums += the row sums of U. */
static int kron_a_expand(const cv_layer_ctx *c, const conv_dims *d, float *S, double *sums)
{
    size_t per = (size_t)d->K * d->P;
    int chunk = per >= CV_KRON_CHUNK_FLOATS ? 1 : (int)(CV_KRON_CHUNK_FLOATS / per);
    chunk = chunk < c->n ? chunk : c->n;
    float *U = malloc(sizeof(float) * per * chunk);
    if (!U)
        return -1;
    for (int i0 = 0; i0 < c->n; i0 += chunk) {
        int m = c->n - i0 < chunk ? c->n - i0 : chunk;
        size_t ld = (size_t)m * d->P;
        for (int s = 0; s < m; s++)
            cv_im2col_ld(&d->g, c->x + (size_t)(i0 + s) * c->in_numel, 0, d->K,
                         U + (size_t)s * d->P, ld);
        cblas_ssyrk(CblasRowMajor, CblasUpper, CblasNoTrans, d->K, (int)ld, 1.0f, U, (int)ld,
                    i0 ? 1.0f : 0.0f, S, d->K);
        for (int r = 0; sums && r < d->K; r++) {
            double v = 0;
            for (size_t q = 0; q < ld; q++)
                v += U[(size_t)r * ld + q];
            sums[r] += v;
        }
    }
    free(U);
    return 0;
}

/* Reduce: Ubar (n x K) holds each sample's mean column; S = Ubar^T Ubar. */
static int kron_a_reduce(const cv_layer_ctx *c, const conv_dims *d, float *S, double *sums)
{
    float *U = malloc(sizeof(float) * (size_t)d->K * d->P);
    float *bar = malloc(sizeof(float) * (size_t)c->n * d->K);
    int rc = U && bar ? 0 : -1;
    for (int i = 0; !rc && i < c->n; i++) {
        cv_im2col(&d->g, c->x + (size_t)i * c->in_numel, 0, d->K, U);
        for (int r = 0; r < d->K; r++) {
            float v = 0;
            for (int p = 0; p < d->P; p++)
                v += U[(size_t)r * d->P + p];
            bar[(size_t)i * d->K + r] = v / (float)d->P;
            if (sums)
                sums[r] += v / (float)d->P;
        }
    }
    if (!rc)
        cblas_ssyrk(CblasRowMajor, CblasUpper, CblasTrans, d->K, c->n, 1.0f, bar, d->K, 0.0f,
                    S, d->K);
    free(U);
    free(bar);
    return rc;
}

static int conv_kron_a_add(const cv_layer_ctx *c, int approx, double *A)
{
    conv_dims d = dims_of(c);
    int reduce = approx == CV_KRON_REDUCE && d.P > 1;
    float *S = malloc(sizeof(float) * (size_t)d.K * d.K);
    double *sums = d.has_bias ? calloc((size_t)d.K, sizeof(double)) : NULL;
    int rc = S && (sums || !d.has_bias) ? 0 : -1;
    if (!rc)
        rc = reduce ? kron_a_reduce(c, &d, S, sums) : kron_a_expand(c, &d, S, sums);
    if (!rc) {
        double w = reduce ? 1.0 : 1.0 / d.P;
        cv_kron_add_sym(d.K, S, w, A, d.K + (d.has_bias != 0));
        if (d.has_bias)
            cv_kron_add_bias(d.K, sums, w, c->n, A);
    }
    free(S);
    free(sums);
    return rc;
}

/* Expand: S = sum_r G_r G_r^T over the R cotangents G_r (cout x P each), the
 * G_r of a block of samples laid side by side (cout x rb*P) so that one ssyrk
 * takes the block (not one small call per sample). */
static int kron_b_expand(const cv_layer_ctx *c, const conv_dims *d, size_t R, const float *gy,
                         float *S)
{
    size_t per = (size_t)d->cout * d->P;
    size_t rb = per >= CV_KRON_CHUNK_FLOATS ? 1 : CV_KRON_CHUNK_FLOATS / per;
    rb = rb < R ? rb : R;
    float *G = malloc(sizeof(float) * per * rb);
    if (!G)
        return -1;
    for (size_t r0 = 0; r0 < R; r0 += rb) {
        size_t m = R - r0 < rb ? R - r0 : rb, ld = m * d->P;
        for (size_t r = 0; r < m; r++)
            for (int o = 0; o < d->cout; o++)
                memcpy(G + (size_t)o * ld + r * d->P,
                       gy + (r0 + r) * c->out_numel + (size_t)o * d->P, sizeof(float) * d->P);
        cblas_ssyrk(CblasRowMajor, CblasUpper, CblasNoTrans, d->cout, (int)ld, 1.0f, G, (int)ld,
                    r0 ? 1.0f : 0.0f, S, d->cout);
    }
    free(G);
    return 0;
}

static int conv_kron_b_add(const cv_layer_ctx *c, int k, const float *gy, int approx,
                           double *B)
{
    conv_dims d = dims_of(c);
    size_t R = (size_t)k * c->n;
    int reduce = approx == CV_KRON_REDUCE && d.P > 1;
    float *S = malloc(sizeof(float) * (size_t)d.cout * d.cout);
    float *sums = reduce ? malloc(sizeof(float) * R * d.cout) : NULL;
    if (!S || (reduce && !sums)) {
        free(S);
        free(sums);
        return -1;
    }
    if (reduce) {
        for (size_t r = 0; r < R; r++)
            for (int o = 0; o < d.cout; o++) {
                const float *g = gy + r * c->out_numel + (size_t)o * d.P;
                float v = 0;
                for (int p = 0; p < d.P; p++)
                    v += g[p];
                sums[r * d.cout + o] = v;
            }
        cblas_ssyrk(CblasRowMajor, CblasUpper, CblasTrans, d.cout, (int)R, 1.0f, sums, d.cout,
                    0.0f, S, d.cout);
    } else if (kron_b_expand(c, &d, R, gy, S)) {
        free(S);
        return -1;
    }
    cv_kron_add_sym(d.cout, S, 1.0, B, d.cout);
    free(S);
    free(sums);
    return 0;
}

/* EKFAC (layer.h ekfac_add): per sample the im2col patches U (K x P), per
 * (vector, sample) G = [g U^T | g 1] (cout x K (+1)), rotated. */
static int conv_ekfac_add(const cv_layer_ctx *c, int k, const float *gy, const double *qa,
                          const double *qb, double *s)
{
    conv_dims d = dims_of(c);
    int bias = d.has_bias != 0, da = d.K + bias;
    float *U = malloc(sizeof(float) * (size_t)d.K * d.P);
    float *Gf = malloc(sizeof(float) * (size_t)d.cout * d.K);
    double *G = malloc(sizeof(double) * (size_t)d.cout * da * 2);
    if (!U || !Gf || !G) {
        free(U), free(Gf), free(G);
        return -1;
    }
    for (int i = 0; i < c->n; i++) {
        cv_im2col(&d.g, c->x + (size_t)i * c->in_numel, 0, d.K, U);
        for (int j = 0; j < k; j++) {
            const float *g = gy + ((size_t)j * c->n + i) * c->out_numel; /* cout x P */
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, d.cout, d.K, d.P, 1.0f, g, d.P,
                        U, d.P, 0.0f, Gf, d.K);
            for (int o = 0; o < d.cout; o++) {
                for (int q = 0; q < d.K; q++)
                    G[(size_t)o * da + q] = Gf[(size_t)o * d.K + q];
                if (bias) {
                    double v = 0;
                    for (int p = 0; p < d.P; p++)
                        v += g[(size_t)o * d.P + p];
                    G[(size_t)o * da + d.K] = v;
                }
            }
            cv_kron_ekfac_rotate_add(da, d.cout, G, qa, qb, G + (size_t)d.cout * da, s);
        }
    }
    free(U), free(Gf), free(G);
    return 0;
}

static const cv_layer_ops conv2d_ops = {
    .diag_add = cv_layer_diag_per_sample,
    .ekfac_add = conv_ekfac_add,
    .kron_dims = conv_kron_dims,
    .kron_a_add = conv_kron_a_add,
    .kron_b_add = conv_kron_b_add,
    .work_size = conv_work,
    .forward = conv_forward,
    .vjp = conv_vjp,
    .jvp = conv_jvp,
    .hvp_extra = conv_hvp_extra,
    .per_sample = conv_per_sample,
    .gram_add = conv_gram_add,
    .quad_extra = conv_quad_extra,
    .vjp_hvp = conv_vjp_hvp,
};

/* ---- class ----------------------------------------------------------------- */

static const char *const conv_padding_keywords[] = {"valid", "same", NULL};

static const cv_field conv_fields[] = {
    CV_FIELD_INT_REQ("in_channels", cv_conv2d_attr, in_channels, 1),
    CV_FIELD_INT_REQ("out_channels", cv_conv2d_attr, out_channels, 1),
    CV_FIELD_PAIR_REQ("kernel_size", cv_conv2d_attr, kernel, 1),
    CV_FIELD_PAIR("stride", cv_conv2d_attr, stride, 1, 1),
    {.name = "padding", .kind = CV_F_PAIR, .offset = offsetof(cv_conv2d_attr, padding),
     .def = 0, .min = 0, .choices = conv_padding_keywords,
     .aux = offsetof(cv_conv2d_attr, padding_keyword),
     .text = "must be an integer, [ph, pw], \"valid\" or \"same\""},
    CV_FIELD_PAIR("dilation", cv_conv2d_attr, dilation, 1, 1),
    CV_FIELD_INT("groups", cv_conv2d_attr, groups, 1, 1),
    CV_FIELD_BOOL("bias", cv_conv2d_attr, has_bias, 1),
    {.name = "padding_mode", .kind = CV_F_FIXED_STRING, .offset = CV_F_NOSTORE, .text = "zeros"},
};

/* padding="valid" is 0; "same" pads d*(k-1) in all, as PyTorch: total//2 on
 * the top/left and the rest (one more for an even effective kernel) on the
 * bottom/right.  Then groups must divide both channel counts. */
static int conv_check(cv_layer *L, cv_err *e)
{
    cv_conv2d_attr *a = CV_LAYER_ATTR(L, cv_conv2d_attr);
    if (a->padding_keyword == 1) {
        a->padding[0] = a->padding[1] = 0;
        a->padding_keyword = 0;
    } else if (a->padding_keyword == 2) {
        if (a->stride[0] != 1 || a->stride[1] != 1)
            return cv_err_set(e, CV_EINVAL, "invalid_value", "padding",
                              "padding: padding='same' is not supported for strided "
                              "convolutions (as in PyTorch)");
        for (int i = 0; i < 2; i++) {
            int64_t total = (int64_t)a->dilation[i] * (a->kernel[i] - 1);
            if (total - total / 2 > CV_ATTR_INT_LIMIT)
                return cv_err_set(e, CV_EINVAL, "invalid_value", "padding",
                                  "padding: padding='same' with kernel_size %d and dilation %d "
                                  "needs padding %lld, too large (limit %d)", a->kernel[i],
                                  a->dilation[i], (long long)(total - total / 2),
                                  CV_ATTR_INT_LIMIT);
            a->padding[i] = (int)(total / 2);
            a->pad_extra[i] = (int)(total % 2);
        }
        if (!a->pad_extra[0] && !a->pad_extra[1])
            a->padding_keyword = 0; /* symmetric: numbers say it */
    }
    if (a->in_channels % a->groups || a->out_channels % a->groups)
        return cv_err_set(e, CV_EINVAL, "invalid_value", "groups",
                          "groups: in_channels (%d) and out_channels (%d) must be divisible by "
                          "groups (%d)", a->in_channels, a->out_channels, a->groups);
    return 0;
}

static int check_pos2(const int *v, int min) { return v[0] >= min && v[1] >= min; }

static int conv_infer(cv_layer *L, const cv_shape *in, cv_err *e)
{
    const cv_conv2d_attr *a = CV_LAYER_ATTR(L, cv_conv2d_attr);
    int one_d = L->cls == &cv_conv1d_class; /* [C, L] as [C, 1, L] (height-1 attributes) */
    char s[64];
    cv_shape_str(in, s, sizeof s);
    if (a->in_channels < 1 || a->out_channels < 1 || a->groups < 1)
        return cv_err_set(e, CV_EINVAL, "invalid_model", "",
                          "in_channels, out_channels and groups must be positive");
    if (a->in_channels % a->groups || a->out_channels % a->groups)
        return cv_err_set(e, CV_EINVAL, "invalid_model", "",
                          "in_channels and out_channels must be divisible by groups");
    if (!check_pos2(a->kernel, 1) || !check_pos2(a->stride, 1) || !check_pos2(a->dilation, 1) ||
        !check_pos2(a->padding, 0))
        return cv_err_set(e, CV_EINVAL, "invalid_model", "",
                          "kernel_size, stride, dilation must be >= 1 and padding >= 0");
    if (in->rank != 3 - one_d || in->dim[0] != a->in_channels)
        return cv_err_set(e, CV_EINVAL, "invalid_model", "",
                          "expects per-sample input [%d, %s], got %s", a->in_channels,
                          one_d ? "L" : "H, W", s);
    if (a->pad_extra[0] < 0 || a->pad_extra[1] < 0)
        return cv_err_set(e, CV_EINVAL, "invalid_model", "padding",
                          "padding: bottom/right padding must be >= 0");
    int wdims[4] = {a->out_channels, a->in_channels / a->groups, a->kernel[0], a->kernel[1]};
    int64_t wn = 1; /* also bounds the unfolded rows C*kh*kw */
    for (int i = 0; i < 4 && wn <= INT_MAX; i++)
        wn *= wdims[i];
    if (wn > INT_MAX)
        return cv_err_set(e, CV_EINVAL, "invalid_model", "kernel_size",
                          "kernel_size: the weight [%d, %d, %d, %d] has more than %d entries",
                          wdims[0], wdims[1], wdims[2], wdims[3], INT_MAX);
    cv_shape in3 = *in;
    if (one_d) {
        in3.rank = 3;
        in3.dim[1] = 1;
        in3.dim[2] = in->dim[1];
    }
    int o[2];
    for (int i = 0; i < 2; i++)
        if (cv_layer_window_out(&in3, i, a->kernel[i], a->stride[i], a->padding[i],
                                a->padding[i] + a->pad_extra[i], a->dilation[i], 0, &o[i], e))
            return -1;
    L->out_shape.rank = 3 - one_d;
    L->out_shape.dim[0] = a->out_channels;
    L->out_shape.dim[1] = o[one_d]; /* 1-d: the width */
    L->out_shape.dim[2] = one_d ? 0 : o[1];
    return 0;
}

static int conv_layout(cv_layer *L)
{
    const cv_conv2d_attr *a = CV_LAYER_ATTR(L, cv_conv2d_attr);
    int one_d = L->cls == &cv_conv1d_class; /* weight [out, in/groups, k] */
    int dims[4] = {a->out_channels, a->in_channels / a->groups, a->kernel[one_d], a->kernel[1]};
    return cv_layer_add_param(L, "weight", 4 - one_d, dims) ||
           (a->has_bias && cv_layer_add_param(L, "bias", 1, dims));
}

const cv_layer_class cv_conv2d_class = {
    .name = "Conv2d", .attr_size = sizeof(cv_conv2d_attr), CV_FIELDS(conv_fields),
    .check = conv_check, .infer = conv_infer, .layout = conv_layout, .ops = &conv2d_ops,
    .function = "conv2d"};

/* ---- Conv1d: a height-1 Conv2d ----------------------------------------------
 * The attributes are Conv2d's with the height entries fixed at kernel 1,
 * stride 1, padding 0, dilation 1 and the document's numbers in the width
 * entries; the kernels see [C, L] as [C, 1, L] (dims_of). */

#define CONV1D_FIELD(n, m, lo, d, fl)                                                        \
    {.name = n, .kind = CV_F_INT, .flags = CV_F_LIST1 | (fl),                                \
     .offset = offsetof(cv_conv2d_attr, m[1]), .def = (d), .min = (lo)}

static const cv_field conv1d_fields[] = {
    CV_FIELD_INT_REQ("in_channels", cv_conv2d_attr, in_channels, 1),
    CV_FIELD_INT_REQ("out_channels", cv_conv2d_attr, out_channels, 1),
    CONV1D_FIELD("kernel_size", kernel, 1, 0, CV_F_REQUIRED),
    CONV1D_FIELD("stride", stride, 1, 1, 0),
    {.name = "padding", .kind = CV_F_INT, .flags = CV_F_LIST1,
     .offset = offsetof(cv_conv2d_attr, padding[1]), .def = 0, .min = 0,
     .choices = conv_padding_keywords, .aux = offsetof(cv_conv2d_attr, padding_keyword),
     .text = "must be an integer, [p], \"valid\" or \"same\""},
    CONV1D_FIELD("dilation", dilation, 1, 1, 0),
    CV_FIELD_INT("groups", cv_conv2d_attr, groups, 1, 1),
    CV_FIELD_BOOL("bias", cv_conv2d_attr, has_bias, 1),
    {.name = "padding_mode", .kind = CV_F_FIXED_STRING, .offset = CV_F_NOSTORE, .text = "zeros"},
};

static void conv1d_init(cv_layer *L)
{
    cv_conv2d_attr *a = CV_LAYER_ATTR(L, cv_conv2d_attr);
    a->kernel[0] = a->stride[0] = a->dilation[0] = 1;
    a->padding[0] = a->pad_extra[0] = 0;
}

const cv_layer_class cv_conv1d_class = {
    .name = "Conv1d", .attr_size = sizeof(cv_conv2d_attr), CV_FIELDS(conv1d_fields),
    .init = conv1d_init, .check = conv_check, .infer = conv_infer, .layout = conv_layout,
    .ops = &conv2d_ops, .function = "conv1d"};
