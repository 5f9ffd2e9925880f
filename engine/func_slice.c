/* func_slice.c - the function classes that cut and join samples along one
 * axis: narrow (x.narrow(dim, start, length); chunk/split + getitem map onto
 * it) and cat (torch.cat of 2 to CV_MAX_NODE_INPUTS tensors).  A sample is
 * seen as [outer, size along the axis, inner]; the kernels move contiguous
 * runs of (size * inner) floats.  Both are linear: no second-order terms. */
#include <stdio.h>
#include <string.h>

#include "func_shape.h"
#include "layer_passthrough.h"

/* outer (product of the dims before axis) and inner (after it) of s. */
static void split_at(const cv_shape *s, int axis, size_t *outer, size_t *inner)
{
    *outer = *inner = 1;
    for (int d = 0; d < s->rank; d++) {
        if (d < axis)
            *outer *= (size_t)s->dim[d];
        else if (d > axis)
            *inner *= (size_t)s->dim[d];
    }
}

/* ---- narrow ---------------------------------------------------------------- */

CV_LAYER_ATTRS(cv_narrow_attr, { int dim, start, length; });

static const cv_field narrow_fields[] = {
    CV_FIELD_INT_ANY_REQ("dim", cv_narrow_attr, dim),
    CV_FIELD_INT_ANY_REQ("start", cv_narrow_attr, start),
    CV_FIELD_INT_REQ("length", cv_narrow_attr, length, 1),
};

static int narrow_check(cv_layer *L, cv_err *e)
{
    return cv_func_not_batch(CV_LAYER_ATTR(L, cv_narrow_attr)->dim, "dim", NULL, e);
}

/* The axis and the first index (a negative start counts from the end). */
static int narrow_resolve(const cv_layer *L, int *axis, int *start, cv_err *e)
{
    const cv_narrow_attr *a = CV_LAYER_ATTR(L, cv_narrow_attr);
    const cv_shape *in = &L->in_shape;
    if (cv_func_axis(a->dim, in->rank, "dim", NULL, axis, e))
        return -1;
    int size = in->dim[*axis];
    *start = a->start < 0 ? a->start + size : a->start;
    if (*start < 0 || *start > size)
        return cv_err_set(e, CV_EINVAL, "invalid_model", "start",
                          "start: %d is out of range for dimension %d of size %d", a->start,
                          *axis + 1, size);
    if (a->length > size - *start)
        return cv_err_set(e, CV_EINVAL, "invalid_model", "length",
                          "length: start %d + length %d exceeds the size %d of dimension %d",
                          *start, a->length, size, *axis + 1);
    return 0;
}

static int narrow_infer(cv_layer *L, const cv_shape *in, cv_err *e)
{
    int axis, start;
    if (narrow_resolve(L, &axis, &start, e))
        return -1;
    L->out_shape = *in;
    L->out_shape.dim[axis] = CV_LAYER_ATTR(L, cv_narrow_attr)->length;
    return 0;
}

/* count samples: out = src[.., start:start+length, ..] (gather) or, with
 * scatter, the window of out = src and the rest zero. */
static void narrow_move(const cv_layer_ctx *c, size_t count, const float *src, float *dst,
                        int scatter)
{
    const cv_layer *L = c->L;
    int axis = 0, start = 0;
    cv_err e;
    narrow_resolve(L, &axis, &start, &e);
    size_t outer, inner;
    split_at(&L->in_shape, axis, &outer, &inner);
    size_t run = (size_t)CV_LAYER_ATTR(L, cv_narrow_attr)->length * inner;
    size_t full = (size_t)L->in_shape.dim[axis] * inner, off = (size_t)start * inner;
    if (scatter)
        memset(dst, 0, sizeof(float) * count * c->in_numel);
    for (size_t s = 0; s < count * outer; s++) {
        if (scatter)
            memcpy(dst + s * full + off, src + s * run, sizeof(float) * run);
        else
            memcpy(dst + s * run, src + s * full + off, sizeof(float) * run);
    }
}

static int narrow_forward(cv_layer_ctx *c, float *y, cv_err *e)
{
    narrow_move(c, (size_t)c->n, c->x, y, 0);
    return 0;
}

static void narrow_vjp(const cv_layer_ctx *c, int k, const float *gy, float *gx,
                       float *gtheta)
{
    if (gx)
        narrow_move(c, (size_t)k * c->n, gy, gx, 1);
}

static void narrow_jvp(const cv_layer_ctx *c, int k, const float *rx, const float *vtheta,
                       float *ry)
{
    if (rx)
        narrow_move(c, (size_t)k * c->n, rx, ry, 0);
    else
        memset(ry, 0, sizeof(float) * (size_t)k * c->n * c->out_numel);
}

static void narrow_hvp_extra(const cv_layer_ctx *c, int k, const float *gy, const float *rx,
                             const float *vtheta, float *gx_add, float *gtheta_add)
{
}

static const cv_layer_ops narrow_ops = {
    .work_size = cv_no_work,
    .forward = narrow_forward,
    .vjp = narrow_vjp,
    .jvp = narrow_jvp,
    .hvp_extra = narrow_hvp_extra,
    .per_sample = cv_no_per_sample,
};

const cv_layer_class cv_narrow_class = {
    .name = "narrow",
    .attr_size = sizeof(cv_narrow_attr),
    CV_FIELDS(narrow_fields),
    .check = narrow_check,
    .infer = narrow_infer,
    .ops = &narrow_ops,
    .function = "narrow",
};

/* ---- cat ------------------------------------------------------------------- */

CV_LAYER_ATTRS(cv_cat_attr, { int dim; });

static const cv_field cat_fields[] = {
    CV_FIELD_INT_ANY("dim", cv_cat_attr, dim, 0),
};

static int cat_check(cv_layer *L, cv_err *e)
{
    return cv_func_not_batch(CV_LAYER_ATTR(L, cv_cat_attr)->dim, "dim", NULL, e);
}

static int cat_infer(cv_layer *L, const cv_shape *in, cv_err *e)
{
    int axis;
    if (cv_func_axis(CV_LAYER_ATTR(L, cv_cat_attr)->dim, in->rank, "dim", NULL, &axis, e))
        return -1;
    cv_shape out = *in;
    for (int i = 1; i < L->nin; i++) {
        const cv_shape *s = &L->in_shapes[i];
        int same = s->rank == in->rank;
        for (int d = 0; same && d < in->rank; d++)
            same = d == axis || s->dim[d] == in->dim[d];
        if (!same) {
            char a[64], b[64];
            cv_shape_str(in, a, sizeof a);
            cv_shape_str(s, b, sizeof b);
            return cv_err_set(e, CV_EINVAL, "invalid_model", "dim",
                              "dim: input %d of shape %s does not fit input 0 of shape %s: "
                              "sizes must match except along dimension %d",
                              i, b, a, axis + 1);
        }
        out.dim[axis] += s->dim[axis];
    }
    L->out_shape = out;
    return 0;
}

/* Moves k*n samples between the inputs' buffers part[] (NULL: zeros, or
 * not needed on a split) and the joined buffer; join: part -> whole. */
static void cat_move(const cv_layer_ctx *c, int k, const float *const *part, float *const *dst,
                     const float *whole_src, float *whole_dst)
{
    const cv_layer *L = c->L;
    int axis = 0;
    cv_err e;
    cv_func_axis(CV_LAYER_ATTR(L, cv_cat_attr)->dim, L->in_shapes[0].rank, "dim", NULL, &axis,
                 &e);
    size_t outer, inner, run[CV_MAX_NODE_INPUTS], total = 0;
    split_at(&L->in_shapes[0], axis, &outer, &inner);
    for (int i = 0; i < c->nin; i++) {
        run[i] = (size_t)L->in_shapes[i].dim[axis] * inner;
        total += run[i];
    }
    for (size_t s = 0; s < (size_t)k * c->n * outer; s++) {
        size_t o = s * total;
        for (int i = 0; i < c->nin; o += run[i], i++) {
            size_t bytes = sizeof(float) * run[i];
            if (whole_dst) {
                if (part[i])
                    memcpy(whole_dst + o, part[i] + s * run[i], bytes);
                else
                    memset(whole_dst + o, 0, bytes);
            } else if (dst[i]) {
                memcpy(dst[i] + s * run[i], whole_src + o, bytes);
            }
        }
    }
}

static int cat_forward(cv_layer_ctx *c, float *y, cv_err *e)
{
    cat_move(c, 1, c->xs, NULL, NULL, y);
    return 0;
}

static void cat_vjp_n(const cv_layer_ctx *c, int k, const float *gy, float *const *gx,
                      float *gtheta)
{
    cat_move(c, k, NULL, gx, gy, NULL);
}

static void cat_jvp_n(const cv_layer_ctx *c, int k, const float *const *rx, const float *vtheta,
                      float *ry)
{
    cat_move(c, k, rx, NULL, NULL, ry);
}

static void cat_hvp_extra_n(const cv_layer_ctx *c, int k, const float *gy,
                            const float *const *rx, const float *vtheta, float *const *gx_add,
                            float *gtheta_add)
{
}

static const cv_layer_ops cat_ops = {
    .work_size = cv_no_work,
    .forward = cat_forward,
    .per_sample = cv_no_per_sample,
    .vjp_n = cat_vjp_n,
    .jvp_n = cat_jvp_n,
    .hvp_extra_n = cat_hvp_extra_n,
};

const cv_layer_class cv_cat_class = {
    .name = "cat",
    .attr_size = sizeof(cv_cat_attr),
    CV_FIELDS(cat_fields),
    .check = cat_check,
    .infer = cat_infer,
    .ops = &cat_ops,
    .min_inputs = 2,
    .max_inputs = CV_MAX_NODE_INPUTS,
    .function = "cat",
};
