/* layer_conv.c - kernels of torch.nn.Conv2d (stride, padding, dilation,
 * groups, bias): y = W * x + b with W [out, in/groups, kh, kw].  Every kernel
 * unfolds one sample at a time (im2col, K x P) and runs per-group sgemm;
 * input cotangents go back through col2im. */
#include "layer.h"

#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "im2col.h"

#define CV_CONV_GRAM_BUDGET ((size_t)1 << 22) /* floats, default per chunk */

typedef struct {
    cv_conv_geom g;
    int cout, groups, og, kg, K, P;
    size_t wnumel;
    int has_bias;
} conv_dims;

static conv_dims dims_of(const cv_layer_ctx *c)
{
    const cv_layer *L = c->L;
    conv_dims d;
    d.g.C = L->in_shape.dim[0];
    d.g.H = L->in_shape.dim[1];
    d.g.W = L->in_shape.dim[2];
    d.g.kh = L->kernel[0];
    d.g.kw = L->kernel[1];
    d.g.sh = L->stride[0];
    d.g.sw = L->stride[1];
    d.g.ph = L->padding[0];
    d.g.pw = L->padding[1];
    d.g.dh = L->dilation[0];
    d.g.dw = L->dilation[1];
    d.g.oh = L->out_shape.dim[1];
    d.g.ow = L->out_shape.dim[2];
    d.cout = L->out_shape.dim[0];
    d.groups = L->groups;
    d.og = d.cout / d.groups;
    d.kg = d.g.C / d.groups * d.g.kh * d.g.kw;
    d.K = d.kg * d.groups;
    d.P = d.g.oh * d.g.ow;
    d.wnumel = (size_t)d.cout * d.kg;
    d.has_bias = L->has_bias;
    return d;
}

static size_t conv_work(const cv_layer_ctx *c, int k)
{
    conv_dims d = dims_of(c);
    return (size_t)d.K * d.P;
}

/* Scratch of `need` floats: the driver's work buffer, NULL if it is too small. */
static float *scratch(const cv_layer_ctx *c, size_t need)
{
    return c->work && c->work_floats >= need ? c->work : NULL;
}

static void fill_nan(float *p, size_t len)
{
    for (size_t i = 0; i < len; i++)
        p[i] = NAN;
}

/* y (cout x P) = W cols (+ beta y), per group. */
static void gemm_w_cols(const conv_dims *d, const float *W, const float *cols, float beta,
                        float *y)
{
    for (int g = 0; g < d->groups; g++)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, d->og, d->P, d->kg, 1.0f,
                    W + (size_t)g * d->og * d->kg, d->kg, cols + (size_t)g * d->kg * d->P, d->P,
                    beta, y + (size_t)g * d->og * d->P, d->P);
}

/* cols (K x P) = W^T gy, per group: the unfolded input cotangent. */
static void gemm_wt_gy(const conv_dims *d, const float *W, const float *gy, float *cols)
{
    for (int g = 0; g < d->groups; g++)
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, d->kg, d->P, d->og, 1.0f,
                    W + (size_t)g * d->og * d->kg, d->kg, gy + (size_t)g * d->og * d->P, d->P,
                    0.0f, cols + (size_t)g * d->kg * d->P, d->P);
}

/* gW (cout x kg) = gy cols^T (+ beta gW), per group: the weight gradient. */
static void gemm_gy_colst(const conv_dims *d, const float *gy, const float *cols, float beta,
                          float *gW)
{
    for (int g = 0; g < d->groups; g++)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, d->og, d->kg, d->P, 1.0f,
                    gy + (size_t)g * d->og * d->P, d->P, cols + (size_t)g * d->kg * d->P, d->P,
                    beta, gW + (size_t)g * d->og * d->kg, d->kg);
}

static void add_bias(const conv_dims *d, const float *b, float *y)
{
    for (int o = 0; o < d->cout; o++)
        for (int p = 0; p < d->P; p++)
            y[(size_t)o * d->P + p] += b[o];
}

/* gb[o] += sum_p gy[o, p] */
static void bias_sums(const conv_dims *d, const float *gy, float *gb)
{
    for (int o = 0; o < d->cout; o++) {
        const float *r = gy + (size_t)o * d->P;
        float s = 0;
        for (int p = 0; p < d->P; p++)
            s += r[p];
        gb[o] += s;
    }
}

static int conv_forward(cv_layer_ctx *c, float *y, cv_err *e)
{
    conv_dims d = dims_of(c);
    float *cols = malloc(sizeof(float) * (size_t)d.K * d.P);
    if (!cols)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "Conv2d unfold (%zu floats)",
                          (size_t)d.K * d.P);
    for (int n = 0; n < c->n; n++) {
        float *yn = y + (size_t)n * c->out_numel;
        cv_im2col(&d.g, c->x + (size_t)n * c->in_numel, 0, d.K, cols);
        gemm_w_cols(&d, c->theta, cols, 0.0f, yn);
        if (d.has_bias)
            add_bias(&d, c->theta + d.wnumel, yn);
    }
    free(cols);
    return 0;
}

/* gx_s = conv_transpose(gy_s, W) for `count` samples s (gx += if add). */
static void input_cotangent(const cv_layer_ctx *c, const conv_dims *d, int count,
                            const float *W, const float *gy, size_t gy_stride, float *gx,
                            float *cols, int add)
{
    for (int s = 0; s < count; s++) {
        float *g = gx + (size_t)s * c->in_numel;
        if (!add)
            memset(g, 0, sizeof(float) * c->in_numel);
        gemm_wt_gy(d, W, gy + (size_t)s * gy_stride, cols);
        cv_col2im_add(&d->g, cols, g);
    }
}

static void conv_vjp(const cv_layer_ctx *c, int k, const float *gy, float *gx, float *gtheta)
{
    conv_dims d = dims_of(c);
    int n = c->n;
    float *cols = scratch(c, conv_work(c, k));
    if (!cols) {
        if (gx)
            fill_nan(gx, (size_t)k * n * c->in_numel);
        if (gtheta)
            fill_nan(gtheta, (size_t)k * c->nparam);
        return;
    }
    if (gx)
        input_cotangent(c, &d, k * n, c->theta, gy, c->out_numel, gx, cols, 0);
    if (!gtheta)
        return;
    for (int i = 0; i < n; i++) {
        cv_im2col(&d.g, c->x + (size_t)i * c->in_numel, 0, d.K, cols);
        for (int j = 0; j < k; j++)
            gemm_gy_colst(&d, gy + ((size_t)j * n + i) * c->out_numel, cols, i ? 1.0f : 0.0f,
                          gtheta + (size_t)j * c->nparam);
    }
    if (d.has_bias)
        for (int j = 0; j < k; j++) {
            float *gb = gtheta + (size_t)j * c->nparam + d.wnumel;
            memset(gb, 0, sizeof(float) * (size_t)d.cout);
            for (int i = 0; i < n; i++)
                bias_sums(&d, gy + ((size_t)j * n + i) * c->out_numel, gb);
        }
}

/* ry_j += conv(x, V_j) + b_j: the parameter direction's tangent. */
static void param_tangent(const cv_layer_ctx *c, const conv_dims *d, int k, const float *vtheta,
                          float beta, float *ry, float *cols)
{
    int n = c->n;
    for (int i = 0; i < n; i++) {
        cv_im2col(&d->g, c->x + (size_t)i * c->in_numel, 0, d->K, cols);
        for (int j = 0; j < k; j++) {
            const float *V = vtheta + (size_t)j * c->nparam;
            float *r = ry + ((size_t)j * n + i) * c->out_numel;
            gemm_w_cols(d, V, cols, beta, r);
            if (d->has_bias)
                add_bias(d, V + d->wnumel, r);
        }
    }
}

static void conv_jvp(const cv_layer_ctx *c, int k, const float *rx, const float *vtheta,
                     float *ry)
{
    conv_dims d = dims_of(c);
    size_t len = (size_t)k * c->n * c->out_numel;
    float *cols = scratch(c, conv_work(c, k));
    if (!cols) {
        fill_nan(ry, len);
        return;
    }
    if (rx)
        for (int s = 0; s < k * c->n; s++) {
            cv_im2col(&d.g, rx + (size_t)s * c->in_numel, 0, d.K, cols);
            gemm_w_cols(&d, c->theta, cols, 0.0f, ry + (size_t)s * c->out_numel);
        }
    if (vtheta)
        param_tangent(c, &d, k, vtheta, rx ? 1.0f : 0.0f, ry, cols);
    if (!rx && !vtheta)
        memset(ry, 0, sizeof(float) * len);
}

/* R-op terms of the bilinear map (x, W) -> W * x:
 * gx_j += conv_transpose(gy, V_j), gW_j += sum_n gy_n unfold(rx_jn)^T. */
static void conv_hvp_extra(const cv_layer_ctx *c, int k, const float *gy, const float *rx,
                           const float *vtheta, float *gx_add, float *gtheta_add)
{
    conv_dims d = dims_of(c);
    int n = c->n;
    float *cols = scratch(c, conv_work(c, k));
    if (!cols) {
        if (gx_add)
            fill_nan(gx_add, (size_t)k * n * c->in_numel);
        if (gtheta_add)
            fill_nan(gtheta_add, (size_t)k * c->nparam);
        return;
    }
    for (int j = 0; j < k; j++) {
        if (gx_add && vtheta)
            input_cotangent(c, &d, n, vtheta + (size_t)j * c->nparam, gy, c->out_numel,
                            gx_add + (size_t)j * n * c->in_numel, cols, 1);
        if (gtheta_add && rx)
            for (int i = 0; i < n; i++) {
                cv_im2col(&d.g, rx + ((size_t)j * n + i) * c->in_numel, 0, d.K, cols);
                gemm_gy_colst(&d, gy + (size_t)i * c->out_numel, cols, 1.0f,
                              gtheta_add + (size_t)j * c->nparam);
            }
    }
}

static void conv_per_sample(const cv_layer_ctx *c, const float *gy, float *G)
{
    conv_dims d = dims_of(c);
    float *cols = scratch(c, conv_work(c, 1));
    if (!cols) {
        fill_nan(G, (size_t)c->n * c->nparam);
        return;
    }
    for (int i = 0; i < c->n; i++) {
        const float *g = gy + (size_t)i * c->out_numel;
        float *out = G + (size_t)i * c->nparam;
        cv_im2col(&d.g, c->x + (size_t)i * c->in_numel, 0, d.K, cols);
        gemm_gy_colst(&d, g, cols, 0.0f, out);
        if (d.has_bias) {
            memset(out + d.wnumel, 0, sizeof(float) * (size_t)d.cout);
            bias_sums(&d, g, out + d.wnumel);
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
    float *U = scratch(c, conv_work(c, k));
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
        bias_sums(d, gy + r * c->out_numel, S + r * d->cout);
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

const cv_layer_ops cv_conv2d_ops = {conv_work,      conv_forward,    conv_vjp,
                                    conv_jvp,       conv_hvp_extra,  conv_per_sample,
                                    conv_gram_add};
