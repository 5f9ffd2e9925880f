/* layer_pool.c - MaxPool2d (stride, padding as -inf, dilation, ceil_mode;
 * argmax cached in forward, PyTorch's tie and NaN rules), AvgPool2d (padding,
 * ceil_mode, count_include_pad) and AdaptiveAvgPool2d.  All are linear in x
 * (max pooling for its fixed argmax), so they have no second-order terms and
 * no parameters; every kernel works plane by plane over k*N*C planes. */
#include "layer.h"
#include "parallel.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define C_(c) ((c)->L->in_shape.dim[0])
#define H_(c) ((c)->L->in_shape.dim[1])
#define W_(c) ((c)->L->in_shape.dim[2])
#define OH_(c) ((c)->L->out_shape.dim[1])
#define OW_(c) ((c)->L->out_shape.dim[2])

static size_t pool_work(const cv_layer_ctx *c, int k) { return 0; }

static void pool_per_sample(const cv_layer_ctx *c, const float *gy, float *G) {}

static void pool_hvp_extra(const cv_layer_ctx *c, int k, const float *gy, const float *rx,
                           const float *vtheta, float *gx_add, float *gtheta_add)
{
}

/* Piecewise linear (max) or linear (average) in x, no parameters: no terms. */
static void pool_quad_extra(const cv_layer_ctx *c, int k, const float *gy, const float *rx,
                            const float *vtheta, double *q)
{
}

/* ---- MaxPool2d ------------------------------------------------------------ */

/* One step of the first-max-wins, NaN-wins scan (PyTorch's rule), as selects:
 * the signs of the values are random, so a branch here mispredicts. */
static inline void maxpool_take(float v, int i, float *mv, int *best)
{
    int take = (v > *mv) | (v != v);
    *mv = take ? v : *mv;
    *best = take ? i : *best;
}

/* y and in-plane argmax of one plane, as PyTorch's CPU kernel: the first
 * maximum wins, a NaN always wins; an empty window gives -inf and index -1. */
static void maxpool_plane(const cv_layer *L, int H, int W, int OH, int OW, const float *x,
                          float *y, int *idx)
{
    int kh = L->kernel[0], kw = L->kernel[1], dh = L->dilation[0], dw = L->dilation[1];
    for (int oy = 0; oy < OH; oy++) {
        int y0 = oy * L->stride[0] - L->padding[0];
        int y1 = y0 + (kh - 1) * dh + 1 < H ? y0 + (kh - 1) * dh + 1 : H;
        while (y0 < 0)
            y0 += dh;
        for (int ox = 0; ox < OW; ox++) {
            int x0 = ox * L->stride[1] - L->padding[1];
            int x1 = x0 + (kw - 1) * dw + 1 < W ? x0 + (kw - 1) * dw + 1 : W;
            while (x0 < 0)
                x0 += dw;
            int best = y0 < y1 && x0 < x1 ? y0 * W + x0 : -1;
            float mv = -INFINITY;
            for (int iy = y0; iy < y1; iy += dh)
                for (int ix = x0; ix < x1; ix += dw)
                    maxpool_take(x[iy * W + ix], iy * W + ix, &mv, &best);
            y[oy * OW + ox] = mv;
            idx[oy * OW + ox] = best;
        }
    }
}

/* maxpool_plane for the common 2x2 window, stride 2, no padding or dilation,
 * every window inside the plane: the same scan order and NaN rule, one
 * output row at a time so GCC vectorizes the selects. */
static void maxpool_row_2x2(int W, int OW, int b0, const float *restrict x, float *restrict y,
                            int *restrict idx)
{
    const float *restrict r0 = x + b0, *restrict r1 = r0 + W;
    for (int ox = 0; ox < OW; ox++) {
        float mv = r0[2 * ox], v1 = r0[2 * ox + 1], v2 = r1[2 * ox], v3 = r1[2 * ox + 1];
        int best = b0 + 2 * ox;
        maxpool_take(v1, b0 + 2 * ox + 1, &mv, &best);
        maxpool_take(v2, b0 + W + 2 * ox, &mv, &best);
        maxpool_take(v3, b0 + W + 2 * ox + 1, &mv, &best);
        y[ox] = mv;
        idx[ox] = best;
    }
}

static void maxpool_plane_2x2(int W, int OH, int OW, const float *x, float *y, int *idx)
{
    for (int oy = 0; oy < OH; oy++)
        maxpool_row_2x2(W, OW, 2 * oy * W, x, y + oy * OW, idx + oy * OW);
}

static int is_plain_2x2(const cv_layer_ctx *c)
{
    const cv_layer *L = c->L;
    return L->kernel[0] == 2 && L->kernel[1] == 2 && L->stride[0] == 2 && L->stride[1] == 2 &&
           L->padding[0] == 0 && L->padding[1] == 0 && L->dilation[0] == 1 &&
           L->dilation[1] == 1 && 2 * OH_(c) <= H_(c) && 2 * OW_(c) <= W_(c);
}

/* Planes (sample, channel, vector) are independent: cv_parallel_for over
 * them, each writing only its own output plane. */
typedef struct {
    const cv_layer_ctx *c;
    const float *in;
    float *out;
    int fast;
} plane_job;

static void forward_planes(void *p, size_t lo, size_t hi)
{
    const plane_job *j = p;
    const cv_layer_ctx *c = j->c;
    size_t op = (size_t)OH_(c) * OW_(c), ip = (size_t)H_(c) * W_(c);
    for (size_t q = lo; q < hi; q++)
        if (j->fast)
            maxpool_plane_2x2(W_(c), OH_(c), OW_(c), j->in + q * ip, j->out + q * op,
                              c->idx + q * op);
        else
            maxpool_plane(c->L, H_(c), W_(c), OH_(c), OW_(c), j->in + q * ip, j->out + q * op,
                          c->idx + q * op);
}

static void vjp_planes(void *p, size_t lo, size_t hi)
{
    const plane_job *j = p;
    const cv_layer_ctx *c = j->c;
    size_t planes = (size_t)c->n * C_(c), op = (size_t)OH_(c) * OW_(c),
           ip = (size_t)H_(c) * W_(c);
    memset(j->out + lo * ip, 0, sizeof(float) * (hi - lo) * ip);
    for (size_t q = lo; q < hi; q++) {
        const int *id = c->idx + (q % planes) * op;
        const float *g = j->in + q * op;
        float *o = j->out + q * ip;
        for (size_t t = 0; t < op; t++)
            if (id[t] >= 0)
                o[id[t]] += g[t];
    }
}

static void jvp_planes(void *p, size_t lo, size_t hi)
{
    const plane_job *j = p;
    const cv_layer_ctx *c = j->c;
    size_t planes = (size_t)c->n * C_(c), op = (size_t)OH_(c) * OW_(c),
           ip = (size_t)H_(c) * W_(c);
    for (size_t q = lo; q < hi; q++) {
        const int *id = c->idx + (q % planes) * op;
        const float *r = j->in + q * ip;
        float *o = j->out + q * op;
        for (size_t t = 0; t < op; t++)
            o[t] = id[t] >= 0 ? r[id[t]] : 0.0f;
    }
}

static int maxpool_forward(cv_layer_ctx *c, float *y, cv_err *e)
{
    size_t planes = (size_t)c->n * C_(c), op = (size_t)OH_(c) * OW_(c),
           ip = (size_t)H_(c) * W_(c);
    cv_layer_ctx_release(c);
    c->idx = malloc(sizeof(int) * (planes * op + 1));
    if (!c->idx)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "MaxPool2d indices (%zu)",
                          planes * op);
    plane_job j = {c, c->x, y, is_plain_2x2(c)};
    cv_parallel_for(planes, cv_parallel_grain(ip + op), forward_planes, &j);
    return 0;
}

static void maxpool_vjp(const cv_layer_ctx *c, int k, const float *gy, float *gx,
                        float *gtheta)
{
    if (!gx)
        return;
    size_t planes = (size_t)c->n * C_(c), op = (size_t)OH_(c) * OW_(c),
           ip = (size_t)H_(c) * W_(c);
    plane_job j = {c, gy, gx, 0};
    cv_parallel_for((size_t)k * planes, cv_parallel_grain(ip + op), vjp_planes, &j);
}

static void maxpool_jvp(const cv_layer_ctx *c, int k, const float *rx, const float *vtheta,
                        float *ry)
{
    size_t planes = (size_t)c->n * C_(c), op = (size_t)OH_(c) * OW_(c),
           ip = (size_t)H_(c) * W_(c);
    if (!rx) {
        memset(ry, 0, sizeof(float) * (size_t)k * c->n * c->out_numel);
        return;
    }
    plane_job j = {c, rx, ry, 0};
    cv_parallel_for((size_t)k * planes, cv_parallel_grain(ip + op), jvp_planes, &j);
}

const cv_layer_ops cv_maxpool2d_ops = {pool_work,      maxpool_forward, maxpool_vjp,
                                       maxpool_jvp,    pool_hvp_extra,  pool_per_sample,
                                       NULL,           pool_quad_extra, NULL};

/* ---- AvgPool2d / AdaptiveAvgPool2d ----------------------------------------
 * Windows are separable: per axis a start, an end (clipped to the input) and
 * the padded length count_include_pad divides by.  Forward caches them in
 * c->idx as [start, end, padded] for the OH rows, then for the OW columns. */

static void axis_windows(const cv_layer *L, int a, int in, int out, int *t)
{
    for (int o = 0; o < out; o++) {
        int s, e, len;
        if (L->type == CV_ADAPTIVEAVGPOOL2D) {
            s = (int)((long long)o * in / out);
            e = (int)(((long long)(o + 1) * in + out - 1) / out);
            len = e - s;
        } else {
            s = o * L->stride[a] - L->padding[a];
            e = s + L->kernel[a] < in + L->padding[a] ? s + L->kernel[a] : in + L->padding[a];
            len = e - s;
            s = s < 0 ? 0 : s;
            e = e > in ? in : e;
        }
        t[3 * o] = s;
        t[3 * o + 1] = e;
        t[3 * o + 2] = len;
    }
}

/* Divisor of output (oy, ox); 0 for an empty window (PyTorch writes 0). */
static int avg_divisor(const cv_layer_ctx *c, const int *ty, const int *tx)
{
    int h = ty[1] - ty[0], w = tx[1] - tx[0];
    if (h <= 0 || w <= 0)
        return 0;
    return c->L->type == CV_AVGPOOL2D && c->L->count_include_pad ? ty[2] * tx[2] : h * w;
}

/* y = A x for k*N*C planes (the forward map and its tangent). */
static void avg_apply(const cv_layer_ctx *c, size_t planes, const float *x, float *y)
{
    int W = W_(c), OH = OH_(c), OW = OW_(c);
    size_t ip = (size_t)H_(c) * W, op = (size_t)OH * OW;
    const int *ty = c->idx, *tx = c->idx + 3 * OH;
    for (size_t q = 0; q < planes; q++) {
        const float *xp = x + q * ip;
        float *yp = y + q * op;
        for (int oy = 0; oy < OH; oy++)
            for (int ox = 0; ox < OW; ox++) {
                const int *a = ty + 3 * oy, *b = tx + 3 * ox;
                float s = 0;
                for (int iy = a[0]; iy < a[1]; iy++)
                    for (int ix = b[0]; ix < b[1]; ix++)
                        s += xp[iy * W + ix];
                int div = avg_divisor(c, a, b);
                yp[oy * OW + ox] = div ? s / (float)div : 0.0f;
            }
    }
}

static int avgpool_forward(cv_layer_ctx *c, float *y, cv_err *e)
{
    cv_layer_ctx_release(c);
    c->idx = malloc(sizeof(int) * 3 * (size_t)(OH_(c) + OW_(c)));
    if (!c->idx)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "pooling windows");
    axis_windows(c->L, 0, H_(c), OH_(c), c->idx);
    axis_windows(c->L, 1, W_(c), OW_(c), c->idx + 3 * OH_(c));
    avg_apply(c, (size_t)c->n * C_(c), c->x, y);
    return 0;
}

static void avgpool_vjp(const cv_layer_ctx *c, int k, const float *gy, float *gx,
                        float *gtheta)
{
    if (!gx)
        return;
    int W = W_(c), OH = OH_(c), OW = OW_(c);
    size_t ip = (size_t)H_(c) * W, op = (size_t)OH * OW, planes = (size_t)k * c->n * C_(c);
    const int *ty = c->idx, *tx = c->idx + 3 * OH;
    memset(gx, 0, sizeof(float) * planes * ip);
    for (size_t q = 0; q < planes; q++) {
        const float *g = gy + q * op;
        float *o = gx + q * ip;
        for (int oy = 0; oy < OH; oy++)
            for (int ox = 0; ox < OW; ox++) {
                const int *a = ty + 3 * oy, *b = tx + 3 * ox;
                int div = avg_divisor(c, a, b);
                float v = div ? g[oy * OW + ox] / (float)div : 0.0f;
                for (int iy = a[0]; iy < a[1]; iy++)
                    for (int ix = b[0]; ix < b[1]; ix++)
                        o[iy * W + ix] += v;
            }
    }
}

static void avgpool_jvp(const cv_layer_ctx *c, int k, const float *rx, const float *vtheta,
                        float *ry)
{
    if (rx)
        avg_apply(c, (size_t)k * c->n * C_(c), rx, ry);
    else
        memset(ry, 0, sizeof(float) * (size_t)k * c->n * c->out_numel);
}

const cv_layer_ops cv_avgpool2d_ops = {pool_work,      avgpool_forward, avgpool_vjp,
                                       avgpool_jvp,    pool_hvp_extra,  pool_per_sample,
                                       NULL,           pool_quad_extra, NULL};
