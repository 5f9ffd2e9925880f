/* func_reduce.c - the function classes sum and mean over per-sample dims
 * (x.sum(dim, keepdim), x.mean(dim, keepdim)).  `dim` is required: without
 * it PyTorch reduces the batch dimension too, which is refused.  A result
 * without per-sample dims (every one reduced, keepdim false) has the
 * per-sample shape [1].  Linear maps: y = s * R x with R the sum over the
 * reduced axes and s 1 or 1/(their size); R^T broadcasts back.  Second-order
 * terms are zero. */
#include <stdio.h>
#include <string.h>

#include "func_shape.h"
#include "layer_passthrough.h"
#include "parallel.h"

CV_LAYER_ATTRS(cv_reduce_attr, {
    cv_int_list dim;
    int keepdim;
});

extern const cv_layer_class cv_mean_class;

static const cv_field reduce_fields[] = {
    CV_FIELD_INT_LIST("dim", cv_reduce_attr, dim, CV_F_NULLABLE), /* None: refused */
    CV_FIELD_BOOL("keepdim", cv_reduce_attr, keepdim, 0),
    {.name = "dtype", .kind = CV_F_FIXED_NULL, .flags = CV_F_HIDDEN, .offset = CV_F_NOSTORE},
};

static int reduce_check(cv_layer *L, cv_err *e)
{
    const cv_int_list *d = &CV_LAYER_ATTR(L, cv_reduce_attr)->dim;
    if (d->n == 0)
        return cv_err_set(e, CV_EINVAL, "invalid_value", "dim",
                          "dim: required: without it %s reduces the batch dimension too, "
                          "which is not supported (give the per-sample dims, e.g. [-1])",
                          L->cls->name);
    for (int i = 0; i < d->n; i++) {
        char what[24];
        snprintf(what, sizeof what, "dim[%d]", i);
        if (cv_func_not_batch(d->v[i], "dim", what, e))
            return -1;
    }
    return 0;
}

/* Bit a set: per-sample axis a is reduced.  -1 with e on a bad dim. */
static int reduced_axes(const cv_layer *L, const cv_shape *in, unsigned *mask, cv_err *e)
{
    const cv_int_list *d = &CV_LAYER_ATTR(L, cv_reduce_attr)->dim;
    *mask = 0;
    for (int i = 0; i < d->n; i++) {
        char what[24];
        int ax;
        snprintf(what, sizeof what, "dim[%d]", i);
        if (cv_func_axis(d->v[i], in->rank, "dim", what, &ax, e))
            return -1;
        if (*mask & (1u << ax))
            return cv_err_set(e, CV_EINVAL, "invalid_model", "dim",
                              "dim: dimension %d appears twice", ax + 1);
        *mask |= 1u << ax;
    }
    return 0;
}

static int reduce_infer(cv_layer *L, const cv_shape *in, cv_err *e)
{
    unsigned mask;
    if (reduced_axes(L, in, &mask, e))
        return -1;
    int keep = CV_LAYER_ATTR(L, cv_reduce_attr)->keepdim;
    cv_shape out = {0, {0}};
    for (int a = 0; a < in->rank; a++)
        if (!(mask & (1u << a)))
            out.dim[out.rank++] = in->dim[a];
        else if (keep)
            out.dim[out.rank++] = 1;
    if (out.rank == 0)
        out = (cv_shape){1, {1}};
    L->out_shape = out;
    return 0;
}

/* One sample's input walk padded to 4 axes: dims id, output strides os (0
 * on a reduced axis), and the scale s. */
typedef struct {
    int id[4];
    size_t os[4];
    size_t in_numel, out_numel;
    float scale;
} reduce_plan;

static void reduce_plan_of(const cv_layer *L, reduce_plan *p)
{
    const cv_shape *in = &L->in_shape;
    unsigned mask = 0;
    cv_err e;
    reduced_axes(L, in, &mask, &e);
    size_t st = 1, count = 1;
    int pad = 4 - in->rank;
    for (int i = 3; i >= 0; i--) {
        int a = i - pad;
        p->id[i] = a < 0 ? 1 : in->dim[a];
        p->os[i] = a < 0 || (mask & (1u << a)) ? 0 : st;
        if (a >= 0 && !(mask & (1u << a)))
            st *= (size_t)in->dim[a];
        else if (a >= 0)
            count *= (size_t)in->dim[a];
    }
    p->in_numel = cv_shape_numel(in);
    p->out_numel = st;
    p->scale = L->cls == &cv_mean_class ? (float)(1.0 / (double)count) : 1.0f;
}

typedef struct {
    const reduce_plan *p;
    const float *src;
    float *dst;
    int expand; /* 0: dst (out) = s R src (in); 1: dst (in) = s R^T src (out) */
} reduce_job;

static void reduce_range(void *ctx, size_t lo, size_t hi)
{
    const reduce_job *j = ctx;
    const reduce_plan *p = j->p;
    float s = p->scale;
    for (size_t n = lo; n < hi; n++) {
        const float *x = j->src + n * (j->expand ? p->out_numel : p->in_numel);
        float *y = j->dst + n * (j->expand ? p->in_numel : p->out_numel);
        if (!j->expand)
            memset(y, 0, sizeof(float) * p->out_numel);
        size_t i = 0;
        for (int a = 0; a < p->id[0]; a++)
            for (int b = 0; b < p->id[1]; b++)
                for (int c = 0; c < p->id[2]; c++, i += (size_t)p->id[3]) {
                    size_t o = a * p->os[0] + b * p->os[1] + c * p->os[2], os = p->os[3];
                    if (j->expand)
                        for (int d = 0; d < p->id[3]; d++)
                            y[i + d] = s * x[o + d * os];
                    else
                        for (int d = 0; d < p->id[3]; d++)
                            y[o + d * os] += x[i + d];
                }
        if (!j->expand && s != 1.0f)
            for (size_t o = 0; o < p->out_numel; o++)
                y[o] *= s;
    }
}

static void reduce_apply(const cv_layer *L, size_t count, const float *src, float *dst,
                         int expand)
{
    reduce_plan p;
    reduce_plan_of(L, &p);
    reduce_job j = {&p, src, dst, expand};
    cv_parallel_for(count, cv_parallel_grain(p.in_numel), reduce_range, &j);
}

static int reduce_forward(cv_layer_ctx *c, float *y, cv_err *e)
{
    reduce_apply(c->L, (size_t)c->n, c->x, y, 0);
    return 0;
}

static void reduce_vjp(const cv_layer_ctx *c, int k, const float *gy, float *gx, float *gtheta)
{
    if (gx)
        reduce_apply(c->L, (size_t)k * c->n, gy, gx, 1);
}

static void reduce_jvp(const cv_layer_ctx *c, int k, const float *rx, const float *vtheta,
                       float *ry)
{
    if (rx)
        reduce_apply(c->L, (size_t)k * c->n, rx, ry, 0);
    else
        memset(ry, 0, sizeof(float) * (size_t)k * c->n * c->out_numel);
}

static void reduce_hvp_extra(const cv_layer_ctx *c, int k, const float *gy, const float *rx,
                             const float *vtheta, float *gx_add, float *gtheta_add)
{
}

static const cv_layer_ops reduce_ops = {
    .work_size = cv_no_work,
    .forward = reduce_forward,
    .vjp = reduce_vjp,
    .jvp = reduce_jvp,
    .hvp_extra = reduce_hvp_extra,
    .per_sample = cv_no_per_sample,
};

const cv_layer_class cv_sum_class = {
    .name = "sum",
    .attr_size = sizeof(cv_reduce_attr),
    CV_FIELDS(reduce_fields),
    .check = reduce_check,
    .infer = reduce_infer,
    .ops = &reduce_ops,
    .function = "sum",
};

const cv_layer_class cv_mean_class = {
    .name = "mean",
    .attr_size = sizeof(cv_reduce_attr),
    CV_FIELDS(reduce_fields),
    .check = reduce_check,
    .infer = reduce_infer,
    .ops = &reduce_ops,
    .function = "mean",
};
