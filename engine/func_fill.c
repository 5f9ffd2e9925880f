/* func_fill.c - masked_fill (x, mask: where the mask, broadcast to x, is
 * nonzero the output is `value`) and causal_fill (x [..., T, S]: entries
 * above the diagonal, column j > row i, become `value`; PyTorch's
 * is_causal mask keeps j <= i).  Both are x times a 0/1 keep pattern plus
 * constants: forward caches the pattern as phi' (layer_activation.h), every
 * product is the activation kernels' (no second-order terms).  The mask is a
 * constant: its cotangent is zero. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "broadcast.h"
#include "layer_passthrough.h"
#include "func_elementwise.h"
#include "layer_activation.h"

#define FILL(L) CV_LAYER_ATTR(L, cv_fill_attr)

/* ---- masked_fill ------------------------------------------------------------ */

static int masked_fill_forward(cv_layer_ctx *c, float *y, cv_err *e)
{
    size_t nx = c->in_numels[0], nm = c->in_numels[1], len = (size_t)c->n * nx;
    float value = (float)FILL(c->L)->value;
    cv_layer_ctx_release(c);
    c->d1 = cv_layer_cache(c, sizeof(float) * len);
    if (!c->d1)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "masked_fill cache (%zu floats)",
                          len);
    cv_bcast w;
    cv_bcast_init(&w, &c->L->in_shapes[0], &c->L->in_shapes[1]);
    for (int s = 0; s < c->n; s++) {
        const float *x = c->xs[0] + (size_t)s * nx, *m = c->xs[1] + (size_t)s * nm;
        float *ys = y + (size_t)s * nx, *keep = c->d1 + (size_t)s * nx;
        for (size_t r = 0; r < w.rows; r++) {
            size_t ox, om;
            cv_bcast_row(&w, r, &ox, &om);
            for (size_t i = 0; i < w.len; i++) {
                int fill = m[om + i * w.ib] != 0;
                keep[ox + i] = fill ? 0.0f : 1.0f;
                ys[ox + i] = fill ? value : x[ox + i];
            }
        }
    }
    return 0;
}

static void masked_fill_vjp_n(const cv_layer_ctx *c, int k, const float *gy, float *const *gx,
                              float *gtheta)
{
    cv_activation_ops.vjp(c, k, gy, gx[0], NULL);
    if (gx[1])
        memset(gx[1], 0, sizeof(float) * (size_t)k * c->n * c->in_numels[1]);
}

static void masked_fill_jvp_n(const cv_layer_ctx *c, int k, const float *const *rx,
                              const float *vtheta, float *ry)
{
    cv_activation_ops.jvp(c, k, rx[0], NULL, ry);
}

static void masked_fill_hvp_extra_n(const cv_layer_ctx *c, int k, const float *gy,
                                    const float *const *rx, const float *vtheta,
                                    float *const *gx_add, float *gtheta_add)
{
}

static const cv_layer_ops masked_fill_ops = {
    .work_size = cv_no_work,
    .forward = masked_fill_forward,
    .per_sample = cv_no_per_sample,
    .vjp_n = masked_fill_vjp_n,
    .jvp_n = masked_fill_jvp_n,
    .hvp_extra_n = masked_fill_hvp_extra_n,
};

/* the mask broadcasts to x's shape (not the other way round) */
static int masked_fill_infer(cv_layer *L, const cv_shape *in, cv_err *e)
{
    cv_shape o;
    if (cv_bcast_shape(&L->in_shapes[0], &L->in_shapes[1], &o) || o.rank != in->rank ||
        memcmp(o.dim, in->dim, sizeof(int) * (size_t)in->rank) != 0) {
        char a[64], b[64];
        cv_shape_str(&L->in_shapes[0], a, sizeof a);
        cv_shape_str(&L->in_shapes[1], b, sizeof b);
        return cv_err_set(e, CV_EINVAL, "invalid_model", "",
                          "the mask's per-sample shape %s does not broadcast to the input's %s",
                          b, a);
    }
    L->out_shape = *in;
    return 0;
}

/* ---- causal_fill --------------------------------------------------------------- */

/* entry i of the batch: row and column within its last two dimensions */
static void causal_forward(const cv_layer_ctx *c, float *y, size_t lo, size_t hi)
{
    const cv_shape *s = &c->L->in_shape;
    size_t S = (size_t)s->dim[s->rank - 1], T = (size_t)s->dim[s->rank - 2];
    float value = (float)FILL(c->L)->value;
    for (size_t i = lo; i < hi; i++) {
        size_t col = i % S, row = (i / S) % T;
        int keep = col <= row;
        c->d1[i] = keep ? 1.0f : 0.0f;
        y[i] = keep ? c->x[i] : value;
    }
}

static int causal_infer(cv_layer *L, const cv_shape *in, cv_err *e)
{
    if (in->rank < 2)
        return cv_err_set(e, CV_EINVAL, "invalid_model", "",
                          "causal_fill needs a per-sample input of rank >= 2 ([..., T, S])");
    L->out_shape = *in;
    return 0;
}

static const cv_activation causal_act = {causal_forward, 1};

/* ---- classes -------------------------------------------------------------------- */

static const cv_field masked_fill_fields[] = {
    {.name = "value", .kind = CV_F_NUMBER, .flags = CV_F_REQUIRED | CV_F_INF_STRINGS,
     .offset = offsetof(cv_fill_attr, value), .min = -INFINITY, .max = INFINITY},
};

static const cv_field causal_fill_fields[] = {
    {.name = "value", .kind = CV_F_NUMBER, .flags = CV_F_INF_STRINGS,
     .offset = offsetof(cv_fill_attr, value), .def = -INFINITY, .min = -INFINITY,
     .max = INFINITY},
};

const cv_layer_class cv_masked_fill_class = {
    .name = "masked_fill", .attr_size = sizeof(cv_fill_attr), CV_FIELDS(masked_fill_fields),
    .infer = masked_fill_infer, .ops = &masked_fill_ops, .min_inputs = 2, .max_inputs = 2,
    .function = "masked_fill"};

const cv_layer_class cv_causal_fill_class = {
    .name = "causal_fill", .attr_size = sizeof(cv_fill_attr), CV_FIELDS(causal_fill_fields),
    .infer = causal_infer, .ops = &cv_activation_ops, .function = "causal_fill",
    .impl = &causal_act};
