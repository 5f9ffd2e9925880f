/* layer_linear.c - torch.nn.Linear: y = x W^T + b, W [out, in]; its class
 * (attributes, shape, weight and bias layout) and kernels.  As in PyTorch it
 * acts on the last dimension: a per-sample input [..., in] is T = numel / in
 * rows of the same sample, so that every GEMM runs over n*T rows and a
 * sample's parameter gradient sums over its rows (T = 1: a flat input). */
#include "layer_linear.h"

#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "im2col.h"
#include "linear_sparse.h"

#define ATTR(c) CV_LAYER_ATTR((c)->L, cv_linear_attr)
#define IN(c) (ATTR(c)->in_features)
#define OUT(c) (ATTR(c)->out_features)
#define ROWS(c) ((int)((c)->in_numel / (size_t)IN(c))) /* rows per sample, T */
#define NR(c) ((c)->n * ROWS(c))                       /* rows of the batch */
#define LINEAR_GRAM_BUDGET ((size_t)1 << 22) /* floats per Gram chunk by default */

/* One n*T x out product for quad_extra. */
static size_t linear_work(const cv_layer_ctx *c, int k) { return (size_t)NR(c) * OUT(c); }

static void add_bias(int n, int out, const float *b, float *y)
{
    for (int i = 0; i < n; i++)
        for (int o = 0; o < out; o++)
            y[(size_t)i * out + o] += b[o];
}

static int linear_forward(cv_layer_ctx *c, float *y, cv_err *e)
{
    const float *W = c->theta;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, NR(c), OUT(c), IN(c), 1.0f, c->x, IN(c),
                W, IN(c), 0.0f, y, OUT(c));
    if (ATTR(c)->has_bias)
        add_bias(NR(c), OUT(c), W + (size_t)OUT(c) * IN(c), y);
    return 0;
}

/* gtheta_j = [gy_j^T x, colsum(gy_j)] for one cotangent block gy_j (n*T x out). */
static void weight_grad(const cv_layer_ctx *c, const float *gy, const float *x, float beta,
                        float *gt)
{
    int n = NR(c), in = IN(c), out = OUT(c);
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, out, in, n, 1.0f, gy, out, x, in, beta,
                gt, in);
}

static void bias_grad(const cv_layer_ctx *c, const float *gy, float *gb)
{
    int n = NR(c), out = OUT(c);
    memset(gb, 0, sizeof(float) * (size_t)out);
    for (int i = 0; i < n; i++)
        for (int o = 0; o < out; o++)
            gb[o] += gy[(size_t)i * out + o];
}

static void linear_vjp(const cv_layer_ctx *c, int k, const float *gy, float *gx, float *gtheta)
{
    int n = NR(c), in = IN(c), out = OUT(c);
    if (gx && cv_lsparse_worth(k, n, out, gy))
        cv_lsparse_vjp(k, n, out, in, gy, c->theta, gx);
    else if (gx)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, k * n, in, out, 1.0f, gy, out,
                    c->theta, in, 0.0f, gx, in);
    if (!gtheta)
        return;
    for (int j = 0; j < k; j++) {
        const float *g = gy + (size_t)j * n * out;
        float *gt = gtheta + (size_t)j * c->nparam;
        weight_grad(c, g, c->x, 0.0f, gt);
        if (ATTR(c)->has_bias)
            bias_grad(c, g, gt + (size_t)out * in);
    }
}

static void linear_jvp(const cv_layer_ctx *c, int k, const float *rx, const float *vtheta,
                       float *ry)
{
    int n = NR(c), in = IN(c), out = OUT(c);
    if (rx)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, k * n, out, in, 1.0f, rx, in,
                    c->theta, in, 0.0f, ry, out);
    else
        memset(ry, 0, sizeof(float) * (size_t)k * n * out);
    if (!vtheta)
        return;
    for (int j = 0; j < k; j++) {
        const float *V = vtheta + (size_t)j * c->nparam;
        float *r = ry + (size_t)j * n * out;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, out, in, 1.0f, c->x, in, V, in,
                    1.0f, r, out);
        if (ATTR(c)->has_bias)
            add_bias(n, out, V + (size_t)out * in, r);
    }
}

/* R-op terms: gx += gy V_j (weight direction), dW += gy^T rx_j. */
static void linear_hvp_extra(const cv_layer_ctx *c, int k, const float *gy, const float *rx,
                             const float *vtheta, float *gx_add, float *gtheta_add)
{
    int n = NR(c), in = IN(c), out = OUT(c);
    for (int j = 0; j < k; j++) {
        if (gx_add && vtheta)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, in, out, 1.0f, gy, out,
                        vtheta + (size_t)j * c->nparam, in, 1.0f, gx_add + (size_t)j * n * in,
                        in);
        if (gtheta_add && rx)
            weight_grad(c, gy, rx + (size_t)j * n * in, 1.0f,
                        gtheta_add + (size_t)j * c->nparam);
    }
}

/* Both R-op terms dotted with the direction are <gy, rx_j V_j^T> (the bias
 * enters linearly and has none): q_j += 2 <gy, rx_j V_j^T>, one GEMM. */
static void linear_quad_extra(const cv_layer_ctx *c, int k, const float *gy, const float *rx,
                              const float *vtheta, double *q)
{
    int n = NR(c), in = IN(c), out = OUT(c);
    if (!rx || !vtheta)
        return;
    float *t = c->work_floats >= (size_t)n * out ? c->work : NULL;
    for (int j = 0; j < k && !t; j++)
        q[j] = NAN;
    for (int j = 0; j < k && t; j++) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, out, in, 1.0f,
                    rx + (size_t)j * n * in, in, vtheta + (size_t)j * c->nparam, in, 0.0f, t,
                    out);
        q[j] += 2.0 * cblas_dsdot(n * out, gy, 1, t, 1);
    }
}

/* Rows T > 1: sample i's gradient is gy_i^T x_i (one GEMM) and the column
 * sums of gy_i. */
static void per_sample_rows(const cv_layer_ctx *c, const float *gy, float *G)
{
    int in = IN(c), out = OUT(c), T = ROWS(c);
    for (int i = 0; i < c->n; i++) {
        float *g = G + (size_t)i * c->nparam;
        const float *gi = gy + (size_t)i * T * out, *xi = c->x + (size_t)i * T * in;
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, out, in, T, 1.0f, gi, out, xi, in,
                    0.0f, g, in);
        if (!ATTR(c)->has_bias)
            continue;
        float *gb = g + (size_t)out * in;
        memset(gb, 0, sizeof(float) * (size_t)out);
        for (int t = 0; t < T; t++)
            for (int o = 0; o < out; o++)
                gb[o] += gi[(size_t)t * out + o];
    }
}

static void linear_per_sample(const cv_layer_ctx *c, const float *gy, float *G)
{
    int in = IN(c), out = OUT(c);
    if (ROWS(c) > 1) {
        per_sample_rows(c, gy, G);
        return;
    }
    for (int i = 0; i < c->n; i++) {
        float *g = G + (size_t)i * c->nparam;
        const float *gi = gy + (size_t)i * out, *xi = c->x + (size_t)i * in;
        for (int o = 0; o < out; o++)
            for (int a = 0; a < in; a++)
                g[(size_t)o * in + a] = gi[o] * xi[a];
        if (ATTR(c)->has_bias)
            memcpy(g + (size_t)out * in, gi, sizeof(float) * (size_t)out);
    }
}

static void gram_fail(size_t R, double *G)
{
    for (size_t i = 0; i < R * R; i++)
        G[i] = NAN;
}

/* The row-pair kernel (T = 1: <gy_r x_i^T, gy_r' x_i'^T> = (gy_r . gy_r')
 * (x_i . x_i'), bias gy_r . gy_r')
 *   G[r, r'] += sum_{t,t'} (s_rt . s_r't') ((x_it . x_i't') + 1 for the bias)
 * from the Gram matrices of the cotangent rows (R T x R T) and of the input
 * rows (n T x n T).  Returns -1 when out of memory. */
static int gram_row_pairs(const cv_layer_ctx *c, int k, const float *gy, unsigned mask,
                          double *G)
{
    int n = c->n, in = IN(c), out = OUT(c), T = ROWS(c), R = k * n;
    size_t RT = (size_t)R * T, nT = (size_t)n * T;
    int use_w = (mask & 1u) != 0, use_b = ATTR(c)->has_bias && (mask & 2u);
    float *S = malloc(sizeof(float) * RT * RT), *X = malloc(sizeof(float) * nT * nT);
    if (!S || !X) {
        free(S);
        free(X);
        return -1;
    }
    cblas_ssyrk(CblasRowMajor, CblasUpper, CblasNoTrans, (int)RT, out, 1.0f, gy, out, 0.0f, S,
                (int)RT);
    cblas_ssyrk(CblasRowMajor, CblasUpper, CblasNoTrans, (int)nT, in, 1.0f, c->x, in, 0.0f, X,
                (int)nT);
    for (int r = 0; r < R; r++)
        for (int q = r; q < R; q++) {
            size_t i = (size_t)(r % n), i2 = (size_t)(q % n);
            double v = 0;
            for (int t = 0; t < T; t++)
                for (int t2 = 0; t2 < T; t2++) {
                    size_t a = (size_t)r * T + t, b = (size_t)q * T + t2; /* a <= b unless r == q */
                    size_t xa = i * T + t, xb = i2 * T + t2;
                    double s = a <= b ? S[a * RT + b] : S[b * RT + a];
                    double xx = xa <= xb ? X[xa * nT + xb] : X[xb * nT + xa];
                    v += s * ((use_w ? xx : 0.0) + (use_b ? 1.0 : 0.0));
                }
            G[(size_t)r * R + q] += v;
            if (q != r)
                G[(size_t)q * R + r] += v;
        }
    free(S);
    free(X);
    return 0;
}

/* A flat input (T = 1): the row-pair kernel.  Rows T > 1: the per-sample
 * weight gradients gy_r^T x_i (out x in) in chunks of output rows that fit
 * the budget, G += B B^T per chunk; the bias: column sums of gy_r; or the
 * row-pair kernel where it is cheaper, T^2 (in + out) < in out, and its
 * matrices fit the budget. */
static void gram_rows(const cv_layer_ctx *c, int k, const float *gy, unsigned mask, double *G)
{
    int n = c->n, in = IN(c), out = OUT(c), T = ROWS(c), R = k * n;
    size_t budget = c->gram_budget ? c->gram_budget : LINEAR_GRAM_BUDGET;
    size_t RT = (size_t)R * T;
    if (T == 1 || ((size_t)T * T * (in + out) < (size_t)in * out && RT * RT <= budget)) {
        if (gram_row_pairs(c, k, gy, mask, G))
            gram_fail((size_t)R, G);
        return;
    }
    size_t per_o = (size_t)R * in;
    int oc = budget / per_o > (size_t)out ? out : budget / per_o < 1 ? 1 : (int)(budget / per_o);
    float *B = (mask & 1u) ? malloc(sizeof(float) * per_o * oc) : NULL;
    if ((mask & 1u) && !B) {
        gram_fail((size_t)R, G);
        return;
    }
    for (int o0 = 0; (mask & 1u) && o0 < out; o0 += oc) {
        int w = o0 + oc < out ? oc : out - o0;
        for (int r = 0; r < R; r++)
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, w, in, T, 1.0f,
                        gy + (size_t)r * T * out + o0, out, c->x + (size_t)(r % n) * T * in,
                        in, 0.0f, B + (size_t)r * w * in, in);
        cv_gram_add_rows(R, w * in, B, G);
    }
    free(B);
    if (!ATTR(c)->has_bias || !(mask & 2u))
        return;
    float *S = calloc((size_t)R * out, sizeof(float));
    if (!S) {
        gram_fail((size_t)R, G);
        return;
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++)
            for (int o = 0; o < out; o++)
                S[(size_t)r * out + o] += gy[((size_t)r * T + t) * out + o];
    cv_gram_add_rows(R, out, S, G);
    free(S);
}

static void linear_gram_add(const cv_layer_ctx *c, int k, const float *gy, unsigned mask,
                            double *G)
{
    gram_rows(c, k, gy, mask, G);
}

/* ---- Kronecker factors (layer.h: kron_dims, kron_a_add, kron_b_add) ------
 * Positions are the T rows of a sample: expand uses every row (A with 1/T),
 * reduce the mean input row and the summed output cotangent row. */

static int linear_kron_dims(const cv_layer *L, int *dim_a, int *dim_b)
{
    const cv_linear_attr *a = CV_LAYER_ATTR(L, cv_linear_attr);
    *dim_a = a->in_features + (a->has_bias != 0);
    *dim_b = a->out_features;
    return 1;
}

/* rows (m x w, row-major) -> per-sample sums of T consecutive rows, times s
 * (m/T x w) into out. */
static void sum_rows(const float *rows, size_t m, int T, int w, float s, float *out)
{
    for (size_t i = 0; i < m / (size_t)T; i++)
        for (int q = 0; q < w; q++) {
            float v = 0;
            for (int t = 0; t < T; t++)
                v += rows[((size_t)i * T + t) * w + q];
            out[(size_t)i * w + q] = s * v;
        }
}

/* A += M^T M (float32 products in panels: cv_kron_gram_add) and, with a bias, the column sums
 * of M and `count` in its last row/column; w weighs the M terms. */
static int kron_rows_a(const float *M, size_t m, int in, int bias, double w, double count,
                       double *A)
{
    if (cv_kron_gram_add(M, m, in, w, A, in + bias))
        return -1;
    if (bias) {
        double *cs = calloc((size_t)in, sizeof(double));
        if (!cs)
            return -1;
        for (size_t r = 0; r < m; r++)
            for (int a = 0; a < in; a++)
                cs[a] += M[r * in + a];
        cv_kron_add_bias(in, cs, w, count, A);
        free(cs);
    }
    return 0;
}

static int linear_kron_a_add(const cv_layer_ctx *c, int approx, double *A)
{
    int in = IN(c), T = ROWS(c), bias = ATTR(c)->has_bias != 0;
    if (T == 1 || approx == CV_KRON_EXPAND)
        return kron_rows_a(c->x, (size_t)NR(c), in, bias, 1.0 / T, c->n, A);
    float *mean = malloc(sizeof(float) * (size_t)c->n * in);
    if (!mean)
        return -1;
    sum_rows(c->x, (size_t)NR(c), T, in, 1.0f / (float)T, mean);
    int rc = kron_rows_a(mean, (size_t)c->n, in, bias, 1.0, c->n, A);
    free(mean);
    return rc;
}

static int linear_kron_b_add(const cv_layer_ctx *c, int k, const float *gy, int approx,
                             double *B)
{
    int out = OUT(c), T = ROWS(c);
    size_t m = (size_t)k * NR(c);
    float *sums = T > 1 && approx == CV_KRON_REDUCE ? malloc(sizeof(float) * m / T * out) : NULL;
    if (T > 1 && approx == CV_KRON_REDUCE && !sums)
        return -1;
    if (sums)
        sum_rows(gy, m, T, out, 1.0f, sums);
    int rc = kron_rows_a(sums ? sums : gy, sums ? m / T : m, out, 0, 1.0, 0, B);
    free(sums);
    return rc;
}

/* EKFAC (layer.h ekfac_add).  One row per sample (T = 1): G = g a~^T is rank one, so
 * Q_B^T G Q_A = u v^T with u = Q_B^T g, v = Q_A^T a~ and s += sum (u.^2)(v.^2)^T;
 * T rows: G = sum_t g_t a~_t^T formed per (vector, sample) and rotated. */
static int linear_ekfac_add(const cv_layer_ctx *c, int k, const float *gy, const double *qa,
                            const double *qb, double *s)
{
    int in = IN(c), out = OUT(c), T = ROWS(c), bias = ATTR(c)->has_bias != 0, da = in + bias;
    size_t nr = (size_t)NR(c), m = (size_t)k * c->n;
    double *a = malloc(sizeof(double) * nr * da);                  /* a~ rows */
    double *g = malloc(sizeof(double) * (T > 1 ? (size_t)T : m) * out);
    double *u = malloc(sizeof(double) * (T > 1 ? (size_t)2 * out * da : m * out));
    double *v = T > 1 ? NULL : malloc(sizeof(double) * nr * da);
    if (!a || !g || !u || (T == 1 && !v)) {
        free(a), free(g), free(u), free(v);
        return -1;
    }
    for (size_t r = 0; r < nr; r++) {
        for (int q = 0; q < in; q++)
            a[r * da + q] = c->x[r * in + q];
        if (bias)
            a[r * da + in] = 1;
    }
    if (T == 1) {
        for (size_t q = 0; q < m * out; q++)
            g[q] = gy[q];
        cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)m, out, out, 1.0, g, out, qb,
                    out, 0.0, u, out);
        cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)nr, da, da, 1.0, a, da, qa,
                    da, 0.0, v, da);
        for (size_t q = 0; q < m * out; q++)
            u[q] *= u[q];
        for (size_t q = 0; q < nr * da; q++)
            v[q] *= v[q];
        for (int j = 0; j < k; j++)
            cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, out, da, c->n, 1.0,
                        u + (size_t)j * c->n * out, out, v, da, 1.0, s, da);
    } else {
        double *G = u + (size_t)out * da;
        for (size_t ji = 0; ji < m; ji++) {
            const float *gj = gy + ji * T * out;
            for (size_t q = 0; q < (size_t)T * out; q++)
                g[q] = gj[q];
            cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, out, da, T, 1.0, g, out,
                        a + (ji % c->n) * T * da, da, 0.0, G, da);
            cv_kron_ekfac_rotate_add(da, out, G, qa, qb, u, s);
        }
    }
    free(a), free(g), free(u), free(v);
    return 0;
}

/* Exact diagonal from the summed squared cotangents (layer.h diag_sq_add):
 * d_W += sq^T (x.^2), d_b += the column sums of sq; one row per sample only. */
static int linear_diag_sq_add(const cv_layer_ctx *c, const float *sq, double *d)
{
    if (ROWS(c) > 1)
        return 1;
    if (!sq)
        return 0;
    int in = IN(c), out = OUT(c), n = c->n, bias = ATTR(c)->has_bias != 0;
    size_t nw = (size_t)out * in;
    float *x2 = malloc(sizeof(float) * ((size_t)n * in + nw));
    if (!x2)
        return -1;
    float *w = x2 + (size_t)n * in;
    for (size_t q = 0; q < (size_t)n * in; q++)
        x2[q] = c->x[q] * c->x[q];
    /* float32 GEMM of nonnegative terms: relative error ~ sqrt(n) eps, no cancellation */
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, out, in, n, 1.0f, sq, out, x2, in, 0.0f,
                w, in);
    for (size_t q = 0; q < nw; q++)
        d[q] += w[q];
    double *db = d + nw;
    for (int i = 0; bias && i < n; i++)
        for (int o = 0; o < out; o++)
            db[o] += sq[(size_t)i * out + o];
    free(x2);
    return 0;
}

/* Exact diagonal (layer.h diag_add).  One row per sample: g_ji = gy_ji x_i^T
 * is rank one, so sum_j sum_i g_ji.^2 = s^T (x.^2) with s_i = sum_j gy_ji.^2
 * (one float GEMM over the samples, added to d in double); T rows (or per
 * sample): g_ji = gy_ji^T x_i formed per (vector, sample) and squared. */
static int linear_diag_add(const cv_layer_ctx *c, int k, const float *gy, int per_sample,
                           double *d)
{
    int in = IN(c), out = OUT(c), T = ROWS(c), n = c->n, bias = ATTR(c)->has_bias != 0;
    if (T > 1 || per_sample) {
        float *g = malloc(sizeof(float) * ((size_t)out * in + out));
        if (!g)
            return -1;
        for (size_t ji = 0; ji < (size_t)k * n; ji++) {
            const float *gj = gy + ji * T * out, *xi = c->x + (ji % n) * T * in;
            double *di = per_sample ? d + (ji % n) * c->nparam : d, *dbi = di + (size_t)out * in;
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, out, in, T, 1.0f, gj, out, xi,
                        in, 0.0f, g, in);
            for (size_t q = 0; q < (size_t)out * in; q++)
                di[q] += (double)g[q] * (double)g[q];
            for (int o = 0; bias && o < out; o++) {
                double v = 0;
                for (int t = 0; t < T; t++)
                    v += gj[(size_t)t * out + o];
                dbi[o] += v * v;
            }
        }
        free(g);
        return 0;
    }
    float *sq = calloc((size_t)n * out, sizeof(float));
    if (!sq)
        return -1;
    for (size_t ji = 0; ji < (size_t)k * n; ji++) {
        const float *gj = gy + ji * out;
        float *si = sq + (ji % n) * out;
        for (int o = 0; o < out; o++)
            si[o] += gj[o] * gj[o];
    }
    int rc = linear_diag_sq_add(c, sq, d);
    free(sq);
    return rc;
}

static const cv_layer_ops linear_ops = {
    .diag_add = linear_diag_add,
    .diag_sq_add = linear_diag_sq_add,
    .ekfac_add = linear_ekfac_add,
    .kron_dims = linear_kron_dims,
    .kron_a_add = linear_kron_a_add,
    .kron_b_add = linear_kron_b_add,
    .work_size = linear_work,
    .forward = linear_forward,
    .vjp = linear_vjp,
    .jvp = linear_jvp,
    .hvp_extra = linear_hvp_extra,
    .per_sample = linear_per_sample,
    .gram_add = linear_gram_add,
    .quad_extra = linear_quad_extra,
};

/* ---- class ----------------------------------------------------------------- */

static int linear_infer(cv_layer *L, const cv_shape *in, cv_err *e)
{
    const cv_linear_attr *a = CV_LAYER_ATTR(L, cv_linear_attr);
    char s[64];
    cv_shape_str(in, s, sizeof s);
    if (a->in_features < 1 || a->out_features < 1)
        return cv_err_set(e, CV_EINVAL, "invalid_model", "",
                          "in_features and out_features must be positive");
    if (in->rank < 1 || in->dim[in->rank - 1] != a->in_features) {
        int flat = in->rank > 1 && cv_shape_numel(in) == (size_t)a->in_features;
        if (in->rank <= 1)
            return cv_err_set(e, CV_EINVAL, "invalid_model", "",
                              "expects per-sample input [%d], got %s", a->in_features, s);
        return cv_err_set(e, CV_EINVAL, "invalid_model", "",
                          "expects per-sample input [..., %d] (it acts on the last dimension), "
                          "got %s%s",
                          a->in_features, s, flat ? " (add a Flatten layer before it)" : "");
    }
    L->out_shape = *in; /* [..., in] -> [..., out] */
    L->out_shape.dim[in->rank - 1] = a->out_features;
    return 0;
}

static int linear_layout(cv_layer *L)
{
    const cv_linear_attr *a = CV_LAYER_ATTR(L, cv_linear_attr);
    int dims[2] = {a->out_features, a->in_features};
    return cv_layer_add_param(L, "weight", 2, dims) ||
           (a->has_bias && cv_layer_add_param(L, "bias", 1, dims));
}

static const cv_field linear_fields[] = {
    CV_FIELD_INT_REQ("in_features", cv_linear_attr, in_features, 1),
    CV_FIELD_INT_REQ("out_features", cv_linear_attr, out_features, 1),
    CV_FIELD_BOOL("bias", cv_linear_attr, has_bias, 1),
};

const cv_layer_class cv_linear_class = {
    .name = "Linear", .attr_size = sizeof(cv_linear_attr), CV_FIELDS(linear_fields),
    .infer = linear_infer, .layout = linear_layout, .ops = &linear_ops, .function = "linear"};
