/* layer_pool.c - MaxPool2d (stride, padding as -inf, dilation, ceil_mode;
 * argmax cached in forward, PyTorch's tie and NaN rules), AvgPool2d (padding,
 * ceil_mode, count_include_pad) and AdaptiveAvgPool2d.  All are linear in x
 * (max pooling for its fixed argmax), so they have no second-order terms and
 * no parameters; every kernel works plane by plane over k*N*C planes.
 * MaxPool1d, AvgPool1d and AdaptiveAvgPool1d are the same at height 1. */
#include "layer_pool.h"
#include "layer_passthrough.h"
#include "bigmem.h"
#include "parallel.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The 1-d classes see [C, L] as [C, 1, L], their attributes in the width
 * entries (the height ones: kernel 1, stride 1, padding 0, dilation 1). */
#define ONE_D(c) ((c)->L->in_shape.rank == 2)
#define C_(c) ((c)->L->in_shape.dim[0])
#define H_(c) (ONE_D(c) ? 1 : (c)->L->in_shape.dim[1])
#define W_(c) ((c)->L->in_shape.dim[ONE_D(c) ? 1 : 2])
#define OH_(c) (ONE_D(c) ? 1 : (c)->L->out_shape.dim[1])
#define OW_(c) ((c)->L->out_shape.dim[ONE_D(c) ? 1 : 2])

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
    const cv_pool2d_attr *A = CV_LAYER_ATTR(L, cv_pool2d_attr);
    int kh = A->kernel[0], kw = A->kernel[1], dh = A->dilation[0], dw = A->dilation[1];
    int sh = A->stride[0], sw = A->stride[1], ph = A->padding[0], pw = A->padding[1];
    for (int oy = 0; oy < OH; oy++) {
        int y0 = oy * sh - ph;
        int y1 = y0 + (kh - 1) * dh + 1 < H ? y0 + (kh - 1) * dh + 1 : H;
        while (y0 < 0)
            y0 += dh;
        for (int ox = 0; ox < OW; ox++) {
            int x0 = ox * sw - pw;
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
    const cv_pool2d_attr *A = CV_LAYER_ATTR(c->L, cv_pool2d_attr);
    return A->kernel[0] == 2 && A->kernel[1] == 2 && A->stride[0] == 2 && A->stride[1] == 2 &&
           A->padding[0] == 0 && A->padding[1] == 0 && A->dilation[0] == 1 &&
           A->dilation[1] == 1 && 2 * OH_(c) <= H_(c) && 2 * OW_(c) <= W_(c);
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
    c->idx = cv_layer_cache(c, sizeof(int) * (planes * op + 1));
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

static const cv_layer_ops maxpool2d_ops = {
    .work_size = cv_no_work,
    .forward = maxpool_forward,
    .vjp = maxpool_vjp,
    .jvp = maxpool_jvp,
    .hvp_extra = pool_hvp_extra,
    .per_sample = cv_no_per_sample,
    .quad_extra = pool_quad_extra,
};

/* ---- AvgPool2d / AdaptiveAvgPool2d ----------------------------------------
 * Windows are separable: per axis a start, an end (clipped to the input) and
 * the padded length count_include_pad divides by.  Forward caches them in
 * c->idx as [start, end, padded] for the OH rows, then for the OW columns. */

static void axis_windows(const cv_layer *L, int a, int in, int out, int *t)
{
    const cv_pool2d_attr *A = CV_LAYER_ATTR(L, cv_pool2d_attr);
    int adaptive = L->cls == &cv_adaptiveavgpool2d_class || L->cls == &cv_adaptiveavgpool1d_class;
    int k = A->kernel[a], st = A->stride[a], p = A->padding[a];
    for (int o = 0; o < out; o++) {
        int s, e, len;
        if (adaptive) {
            s = (int)((long long)o * in / out);
            e = (int)(((long long)(o + 1) * in + out - 1) / out);
            len = e - s;
        } else {
            s = o * st - p;
            e = s + k < in + p ? s + k : in + p;
            len = e - s;
            s = s < 0 ? 0 : s;
            e = e > in ? in : e;
        }
        t[3 * o] = s;
        t[3 * o + 1] = e;
        t[3 * o + 2] = len;
    }
}

/* AvgPool2d's count_include_pad (AdaptiveAvgPool2d: 0) */
static int include_pad(const cv_layer_ctx *c)
{
    return (c->L->cls == &cv_avgpool2d_class || c->L->cls == &cv_avgpool1d_class) &&
           CV_LAYER_ATTR(c->L, cv_pool2d_attr)->count_include_pad;
}

/* Divisor of output (oy, ox); 0 for an empty window (PyTorch writes 0). */
static int avg_divisor(int incl, const int *ty, const int *tx)
{
    int h = ty[1] - ty[0], w = tx[1] - tx[0];
    if (h <= 0 || w <= 0)
        return 0;
    return incl ? ty[2] * tx[2] : h * w;
}

/* y = A x for k*N*C planes (the forward map and its tangent). */
static void avg_apply(const cv_layer_ctx *c, size_t planes, const float *x, float *y)
{
    int W = W_(c), OH = OH_(c), OW = OW_(c), incl = include_pad(c);
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
                int div = avg_divisor(incl, a, b);
                yp[oy * OW + ox] = div ? s / (float)div : 0.0f;
            }
    }
}

static int avgpool_forward(cv_layer_ctx *c, float *y, cv_err *e)
{
    cv_layer_ctx_release(c);
    c->idx = cv_layer_cache(c, sizeof(int) * 3 * (size_t)(OH_(c) + OW_(c)));
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
    int W = W_(c), OH = OH_(c), OW = OW_(c), incl = include_pad(c);
    size_t ip = (size_t)H_(c) * W, op = (size_t)OH * OW, planes = (size_t)k * c->n * C_(c);
    const int *ty = c->idx, *tx = c->idx + 3 * OH;
    memset(gx, 0, sizeof(float) * planes * ip);
    for (size_t q = 0; q < planes; q++) {
        const float *g = gy + q * op;
        float *o = gx + q * ip;
        for (int oy = 0; oy < OH; oy++)
            for (int ox = 0; ox < OW; ox++) {
                const int *a = ty + 3 * oy, *b = tx + 3 * ox;
                int div = avg_divisor(incl, a, b);
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

static const cv_layer_ops avgpool2d_ops = {
    .work_size = cv_no_work,
    .forward = avgpool_forward,
    .vjp = avgpool_vjp,
    .jvp = avgpool_jvp,
    .hvp_extra = pool_hvp_extra,
    .per_sample = cv_no_per_sample,
    .quad_extra = pool_quad_extra,
};

/* ---- classes --------------------------------------------------------------- */

static const cv_field maxpool_fields[] = {
    CV_FIELD_PAIR_REQ("kernel_size", cv_pool2d_attr, kernel, 1),
    /* PyTorch: stride=None means kernel_size (0 until pool_check) */
    {.name = "stride", .kind = CV_F_PAIR, .flags = CV_F_NULLABLE,
     .offset = offsetof(cv_pool2d_attr, stride), .def = 0, .min = 1},
    CV_FIELD_PAIR("padding", cv_pool2d_attr, padding, 0, 0),
    CV_FIELD_PAIR("dilation", cv_pool2d_attr, dilation, 1, 1),
    CV_FIELD_BOOL("ceil_mode", cv_pool2d_attr, ceil_mode, 0),
    {.name = "return_indices", .kind = CV_F_FIXED_BOOL, .flags = CV_F_HIDDEN,
     .offset = CV_F_NOSTORE, .def = 0, .text = "a layer in Sequential must return one tensor"},
};

static const cv_field avgpool_fields[] = {
    CV_FIELD_PAIR_REQ("kernel_size", cv_pool2d_attr, kernel, 1),
    {.name = "stride", .kind = CV_F_PAIR, .flags = CV_F_NULLABLE,
     .offset = offsetof(cv_pool2d_attr, stride), .def = 0, .min = 1},
    CV_FIELD_PAIR("padding", cv_pool2d_attr, padding, 0, 0),
    CV_FIELD_BOOL("ceil_mode", cv_pool2d_attr, ceil_mode, 0),
    CV_FIELD_BOOL("count_include_pad", cv_pool2d_attr, count_include_pad, 1),
    {.name = "divisor_override", .kind = CV_F_FIXED_NULL, .flags = CV_F_HIDDEN,
     .offset = CV_F_NOSTORE},
};

static const cv_field adaptive_fields[] = {
    {.name = "output_size", .kind = CV_F_PAIR, .flags = CV_F_REQUIRED | CV_F_NO_NONE,
     .offset = offsetof(cv_pool2d_attr, output_size), .min = 1},
};

static void avgpool_init(cv_layer *L)
{
    cv_pool2d_attr *a = CV_LAYER_ATTR(L, cv_pool2d_attr);
    a->dilation[0] = a->dilation[1] = 1;
}

static int pool_check(cv_layer *L, cv_err *e)
{
    cv_pool2d_attr *a = CV_LAYER_ATTR(L, cv_pool2d_attr);
    if (a->stride[1] == 0) { /* not given, or null */
        a->stride[0] = a->kernel[0];
        a->stride[1] = a->kernel[1];
    }
    for (int i = 0; i < 2; i++)
        if (2 * a->padding[i] > a->kernel[i])
            return cv_err_set(e, CV_EINVAL, "invalid_value", "padding",
                              "padding: must be at most half of kernel_size (%d > %d / 2), as "
                              "in PyTorch", a->padding[i], a->kernel[i]);
    return 0;
}

static int check_pos2(const int *v, int min) { return v[0] >= min && v[1] >= min; }

static int is_one_d(const cv_layer *L)
{
    return L->cls == &cv_maxpool1d_class || L->cls == &cv_avgpool1d_class ||
           L->cls == &cv_adaptiveavgpool1d_class;
}

/* Output sizes [h, w] of a window over in3 ([C, H, W]) into o. */
static int pool_windows_out(cv_pool2d_attr *a, const cv_shape *in3, int *o, cv_err *e)
{
    if (!check_pos2(a->kernel, 1) || !check_pos2(a->stride, 1) || !check_pos2(a->dilation, 1) ||
        !check_pos2(a->padding, 0))
        return cv_err_set(e, CV_EINVAL, "invalid_model", "",
                          "kernel_size, stride, dilation must be >= 1 and padding >= 0");
    if (2 * (int64_t)a->padding[0] > a->kernel[0] || 2 * (int64_t)a->padding[1] > a->kernel[1])
        return cv_err_set(e, CV_EINVAL, "invalid_model", "",
                          "padding must be at most half of kernel_size");
    for (int i = 0; i < 2; i++)
        if (cv_layer_window_out(in3, i, a->kernel[i], a->stride[i], a->padding[i],
                                a->padding[i], a->dilation[i], a->ceil_mode, &o[i], e))
            return -1;
    return 0;
}

static int pool_infer(cv_layer *L, const cv_shape *in, cv_err *e)
{
    cv_pool2d_attr *a = CV_LAYER_ATTR(L, cv_pool2d_attr);
    int one_d = is_one_d(L);
    char s[64];
    cv_shape_str(in, s, sizeof s);
    if (in->rank != 3 - one_d)
        return cv_err_set(e, CV_EINVAL, "invalid_model", "",
                          "expects per-sample input [C, %s], got %s", one_d ? "L" : "H, W", s);
    L->out_shape = *in;
    if (L->cls == &cv_adaptiveavgpool2d_class || L->cls == &cv_adaptiveavgpool1d_class) {
        if (!check_pos2(a->output_size, 1))
            return cv_err_set(e, CV_EINVAL, "invalid_model", "", "output_size must be positive");
        L->out_shape.dim[1] = a->output_size[one_d];
        if (!one_d)
            L->out_shape.dim[2] = a->output_size[1];
        return 0;
    }
    if (L->cls == &cv_avgpool2d_class || L->cls == &cv_avgpool1d_class)
        a->dilation[0] = a->dilation[1] = 1;
    if (one_d) {
        cv_shape in3 = {.rank = 3, .dim = {in->dim[0], 1, in->dim[1]}};
        int o[2];
        if (pool_windows_out(a, &in3, o, e))
            return -1;
        L->out_shape.dim[1] = o[1];
        return 0;
    }
    return pool_windows_out(a, in, &L->out_shape.dim[1], e);
}

const cv_layer_class cv_maxpool2d_class = {
    .name = "MaxPool2d", .attr_size = sizeof(cv_pool2d_attr), CV_FIELDS(maxpool_fields),
    .check = pool_check, .infer = pool_infer, .ops = &maxpool2d_ops, .function = "max_pool2d"};

/* AvgPool2d: no dilation attribute (1); AdaptiveAvgPool2d: output_size only */
const cv_layer_class cv_avgpool2d_class = {
    .name = "AvgPool2d", .attr_size = sizeof(cv_pool2d_attr), CV_FIELDS(avgpool_fields),
    .init = avgpool_init, .check = pool_check, .infer = pool_infer, .ops = &avgpool2d_ops,
    .function = "avg_pool2d"};
const cv_layer_class cv_adaptiveavgpool2d_class = {
    .name = "AdaptiveAvgPool2d", .attr_size = sizeof(cv_pool2d_attr), CV_FIELDS(adaptive_fields),
    .infer = pool_infer, .ops = &avgpool2d_ops, .function = "adaptive_avg_pool2d"};

/* ---- 1-d classes: the 2-d kernels at height 1 -------------------------------- */

#define POOL1D_FIELD(n, m, lo, d, fl)                                                        \
    {.name = n, .kind = CV_F_INT, .flags = CV_F_LIST1 | (fl),                                \
     .offset = offsetof(cv_pool2d_attr, m[1]), .def = (d), .min = (lo)}

static const cv_field maxpool1d_fields[] = {
    POOL1D_FIELD("kernel_size", kernel, 1, 0, CV_F_REQUIRED),
    POOL1D_FIELD("stride", stride, 1, 0, CV_F_NULLABLE), /* None: kernel_size */
    POOL1D_FIELD("padding", padding, 0, 0, 0),
    POOL1D_FIELD("dilation", dilation, 1, 1, 0),
    CV_FIELD_BOOL("ceil_mode", cv_pool2d_attr, ceil_mode, 0),
    {.name = "return_indices", .kind = CV_F_FIXED_BOOL, .flags = CV_F_HIDDEN,
     .offset = CV_F_NOSTORE, .def = 0, .text = "a layer in Sequential must return one tensor"},
};

static const cv_field avgpool1d_fields[] = {
    POOL1D_FIELD("kernel_size", kernel, 1, 0, CV_F_REQUIRED),
    POOL1D_FIELD("stride", stride, 1, 0, CV_F_NULLABLE),
    POOL1D_FIELD("padding", padding, 0, 0, 0),
    CV_FIELD_BOOL("ceil_mode", cv_pool2d_attr, ceil_mode, 0),
    CV_FIELD_BOOL("count_include_pad", cv_pool2d_attr, count_include_pad, 1),
};

static const cv_field adaptive1d_fields[] = {
    POOL1D_FIELD("output_size", output_size, 1, 0, CV_F_REQUIRED),
};

/* The height entries of a 1-d window: kernel 1, stride 1, padding 0, dilation 1. */
static void pool1d_init(cv_layer *L)
{
    cv_pool2d_attr *a = CV_LAYER_ATTR(L, cv_pool2d_attr);
    a->kernel[0] = a->stride[0] = a->dilation[0] = a->output_size[0] = 1;
    a->padding[0] = 0;
    if (L->cls != &cv_maxpool1d_class)
        a->dilation[1] = 1;
}

const cv_layer_class cv_maxpool1d_class = {
    .name = "MaxPool1d", .attr_size = sizeof(cv_pool2d_attr), CV_FIELDS(maxpool1d_fields),
    .init = pool1d_init, .check = pool_check, .infer = pool_infer, .ops = &maxpool2d_ops,
    .function = "max_pool1d"};
const cv_layer_class cv_avgpool1d_class = {
    .name = "AvgPool1d", .attr_size = sizeof(cv_pool2d_attr), CV_FIELDS(avgpool1d_fields),
    .init = pool1d_init, .check = pool_check, .infer = pool_infer, .ops = &avgpool2d_ops,
    .function = "avg_pool1d"};
const cv_layer_class cv_adaptiveavgpool1d_class = {
    .name = "AdaptiveAvgPool1d", .attr_size = sizeof(cv_pool2d_attr),
    CV_FIELDS(adaptive1d_fields), .init = pool1d_init, .infer = pool_infer,
    .ops = &avgpool2d_ops, .function = "adaptive_avg_pool1d"};
