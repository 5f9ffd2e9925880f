/* layer_upsample.c - torch.nn.Upsample with mode="nearest" (the functional
 * twin F.interpolate) on [C, L] and [C, H, W]: y[c, o] = x[c, src(o)] per
 * axis with PyTorch's source index on CPU, min(floor(o * scale), in - 1) in
 * float with scale 1/scale_factor when that is given, in/out otherwise (so
 * scale_factor 1.3 on length 3 gives 0 0 1, not the identity).  A gather: linear in
 * x, no parameters, no second-order terms.  Forward caches the source
 * indices in c->idx: the OH rows, then the OW columns. */
#include "layer_upsample.h"
#include "layer_passthrough.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define UP(L) CV_LAYER_ATTR(L, cv_upsample_attr)

/* [C, L] is [C, 1, L] */
static int one_d(const cv_shape *s) { return s->rank == 2; }
static int height(const cv_shape *s) { return one_d(s) ? 1 : s->dim[1]; }
static int width(const cv_shape *s) { return s->dim[s->rank - 1]; }

static int src_index(int o, int in, int out, double scale_factor)
{
    float scale = scale_factor > 0 ? (float)(1.0 / scale_factor) : (float)in / (float)out;
    int64_t s = (int64_t)floorf((float)o * scale);
    return s < in - 1 ? (int)s : in - 1;
}

/* y = the gather of k*N*C planes of x */
static void up_apply(const cv_layer_ctx *c, size_t planes, const float *x, float *y)
{
    const cv_shape *in = &c->L->in_shape, *out = &c->L->out_shape;
    int W = width(in), OH = height(out), OW = width(out);
    const int *iy = c->idx, *ix = c->idx + OH;
    size_t ip = (size_t)height(in) * W, op = (size_t)OH * OW;
    for (size_t q = 0; q < planes; q++) {
        const float *xp = x + q * ip;
        float *yp = y + q * op;
        for (int oy = 0; oy < OH; oy++) {
            const float *row = xp + (size_t)iy[oy] * W;
            for (int ox = 0; ox < OW; ox++)
                yp[oy * OW + ox] = row[ix[ox]];
        }
    }
}

static int up_forward(cv_layer_ctx *c, float *y, cv_err *e)
{
    const cv_shape *in = &c->L->in_shape, *out = &c->L->out_shape;
    double s = UP(c->L)->scale_factor;
    int OH = height(out), OW = width(out);
    cv_layer_ctx_release(c);
    c->idx = cv_layer_cache(c, sizeof(int) * (size_t)(OH + OW));
    if (!c->idx)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "Upsample indices");
    for (int o = 0; o < OH; o++)
        c->idx[o] = one_d(in) ? 0 : src_index(o, height(in), OH, s);
    for (int o = 0; o < OW; o++)
        c->idx[OH + o] = src_index(o, width(in), OW, s);
    up_apply(c, (size_t)c->n * in->dim[0], c->x, y);
    return 0;
}

static void up_vjp(const cv_layer_ctx *c, int k, const float *gy, float *gx, float *gtheta)
{
    if (!gx)
        return;
    const cv_shape *in = &c->L->in_shape, *out = &c->L->out_shape;
    int W = width(in), OH = height(out), OW = width(out);
    const int *iy = c->idx, *ix = c->idx + OH;
    size_t ip = (size_t)height(in) * W, op = (size_t)OH * OW;
    size_t planes = (size_t)k * c->n * in->dim[0];
    memset(gx, 0, sizeof(float) * planes * ip);
    for (size_t q = 0; q < planes; q++) {
        const float *g = gy + q * op;
        float *o = gx + q * ip;
        for (int oy = 0; oy < OH; oy++) {
            float *row = o + (size_t)iy[oy] * W;
            for (int ox = 0; ox < OW; ox++)
                row[ix[ox]] += g[oy * OW + ox];
        }
    }
}

static void up_jvp(const cv_layer_ctx *c, int k, const float *rx, const float *vtheta,
                   float *ry)
{
    if (rx)
        up_apply(c, (size_t)k * c->n * c->L->in_shape.dim[0], rx, ry);
    else
        memset(ry, 0, sizeof(float) * (size_t)k * c->n * c->out_numel);
}

static void up_hvp_extra(const cv_layer_ctx *c, int k, const float *gy, const float *rx,
                         const float *vtheta, float *gx_add, float *gtheta_add)
{
}

static const cv_layer_ops upsample_ops = {
    .work_size = cv_no_work,
    .forward = up_forward,
    .vjp = up_vjp,
    .jvp = up_jvp,
    .hvp_extra = up_hvp_extra,
    .per_sample = cv_no_per_sample,
};

/* ---- class ----------------------------------------------------------------- */

static const cv_field upsample_fields[] = {
    {.name = "size", .kind = CV_F_PAIR,
     .flags = CV_F_NULLABLE | CV_F_NO_NONE | CV_F_ZERO_NULL,
     .offset = offsetof(cv_upsample_attr, size), .def = 0, .min = 1},
    {.name = "scale_factor", .kind = CV_F_NUMBER,
     .flags = CV_F_NULLABLE | CV_F_MIN_OPEN | CV_F_ZERO_NULL,
     .offset = offsetof(cv_upsample_attr, scale_factor), .def = 0, .min = 0, .max = 1e6},
    {.name = "mode", .kind = CV_F_FIXED_STRING, .offset = CV_F_NOSTORE, .text = "nearest"},
    {.name = "align_corners", .kind = CV_F_FIXED_NULL, .offset = CV_F_NOSTORE},
    {.name = "recompute_scale_factor", .kind = CV_F_FIXED_BOOL,
     .flags = CV_F_NULLABLE | CV_F_HIDDEN, .offset = CV_F_NOSTORE, .def = 0,
     .text = "the source index uses 1/scale_factor (None or false)"},
    /* F.interpolate's (the graph form's function "interpolate") */
    {.name = "antialias", .kind = CV_F_FIXED_BOOL, .flags = CV_F_HIDDEN,
     .offset = CV_F_NOSTORE, .def = 0, .text = "nearest interpolation has no antialiasing"},
};

static int up_check(cv_layer *L, cv_err *e)
{
    const cv_upsample_attr *a = UP(L);
    if (!a->size[0] && a->scale_factor == 0)
        return cv_err_set(e, CV_EINVAL, "missing_field", "size",
                          "size: give size or scale_factor (both are None)");
    return 0;
}

/* Output length of one axis of length n: size s (0: none) and/or scale factor f. */
static int up_axis(int n, int s, double f, const char *what, int *out, cv_err *e)
{
    double o = f > 0 ? floor((double)n * f) : (double)s;
    if (o < 1 || o > (1 << 24))
        return cv_err_set(e, CV_EINVAL, "invalid_model", "scale_factor",
                          "scale_factor: %s %d times %g gives %.0f, out of range [1, %d]", what,
                          n, f, o, 1 << 24);
    if (f > 0 && s && s != (int)o)
        return cv_err_set(e, CV_EINVAL, "invalid_model", "size",
                          "size: %d disagrees with scale_factor %g (%s %d gives %d); give one "
                          "of them", s, f, what, n, (int)o);
    *out = (int)o;
    return 0;
}

static int up_infer(cv_layer *L, const cv_shape *in, cv_err *e)
{
    const cv_upsample_attr *a = UP(L);
    char s[64];
    cv_shape_str(in, s, sizeof s);
    if (in->rank != 2 && in->rank != 3)
        return cv_err_set(e, CV_EINVAL, "invalid_model", "",
                          "expects per-sample input [C, L] or [C, H, W], got %s", s);
    if (one_d(in) && a->size[0] != a->size[1])
        return cv_err_set(e, CV_EINVAL, "invalid_model", "size",
                          "size: input %s takes one size, got [%d, %d]", s, a->size[0],
                          a->size[1]);
    L->out_shape = *in;
    if (!one_d(in) && up_axis(in->dim[1], a->size[0], a->scale_factor, "height",
                              &L->out_shape.dim[1], e))
        return -1;
    return up_axis(width(in), a->size[1], a->scale_factor, one_d(in) ? "length" : "width",
                   &L->out_shape.dim[in->rank - 1], e);
}

const cv_layer_class cv_upsample_class = {
    .name = "Upsample", .attr_size = sizeof(cv_upsample_attr), CV_FIELDS(upsample_fields),
    .check = up_check, .infer = up_infer, .ops = &upsample_ops, .function = "interpolate"};
