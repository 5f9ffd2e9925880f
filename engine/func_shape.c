/* func_shape.c - the function classes that permute the axes of a sample
 * (transpose, permute: out axis i is input axis p[i]), and the dimension
 * helpers every function class shares (func_shape.h).  Permutations are
 * linear and have no second-order terms; the vjp applies the inverse
 * permutation (a scatter through the same plan). */
#include "func_shape.h"
#include "layer_passthrough.h"

#include <stdio.h>
#include <string.h>

#include "parallel.h"

int cv_func_axis(int dim, int rank, const char *attr, const char *what, int *axis, cv_err *e)
{
    int full = rank + 1, d = dim < 0 ? dim + full : dim;
    if (!what)
        what = attr;
    if (d < 0 || d >= full)
        return cv_err_set(e, CV_EINVAL, "invalid_model", attr,
                          "%s: dimension %d is out of range for an input of %d dimensions "
                          "(the batch and %d per sample): expected %d to %d",
                          what, dim, full, rank, -full, full - 1);
    if (d == 0)
        return cv_err_set(e, CV_EINVAL, "invalid_model", attr,
                          "%s: dimension %d is the batch dimension; operations over the batch "
                          "dimension are not supported (use 1 to %d or -%d to -1)",
                          what, dim, rank, rank);
    *axis = d - 1;
    return 0;
}

int cv_func_not_batch(int dim, const char *attr, const char *what, cv_err *e)
{
    if (dim != 0)
        return 0;
    return cv_err_set(e, CV_EINVAL, "invalid_value", attr,
                      "%s: 0 is the batch dimension; operations over the batch dimension are "
                      "not supported", what ? what : attr);
}

/* ---- the permutation kernels --------------------------------------------- */

CV_LAYER_ATTRS(cv_transpose_attr, { int dim0, dim1; });
CV_LAYER_ATTRS(cv_permute_attr, { cv_int_list dims; });

extern const cv_layer_class cv_transpose_class;

/* The per-sample permutation p of L (validated by infer). */
static void perm_of(const cv_layer *L, int *p)
{
    int r = L->in_shape.rank;
    for (int i = 0; i < r; i++)
        p[i] = i;
    cv_err e;
    if (L->cls == &cv_transpose_class) {
        const cv_transpose_attr *a = CV_LAYER_ATTR(L, cv_transpose_attr);
        int a0 = 0, a1 = 0;
        if (cv_func_axis(a->dim0, r, "dim0", NULL, &a0, &e) == 0 &&
            cv_func_axis(a->dim1, r, "dim1", NULL, &a1, &e) == 0) {
            p[a0] = a1;
            p[a1] = a0;
        }
        return;
    }
    const cv_permute_attr *a = CV_LAYER_ATTR(L, cv_permute_attr);
    for (int i = 1; i < a->dims.n && i <= r; i++) {
        int ax = 0;
        if (cv_func_axis(a->dims.v[i], r, "dims", NULL, &ax, &e) == 0)
            p[i - 1] = ax;
    }
}

/* Output walk of one sample, padded to 4 axes: out dims od, input strides is. */
typedef struct {
    int od[4];
    size_t is[4];
    size_t numel;
} perm_plan;

static void perm_plan_of(const cv_layer *L, perm_plan *pl)
{
    const cv_shape *in = &L->in_shape;
    int r = in->rank, p[CV_MAX_RANK];
    size_t st[CV_MAX_RANK], s = 1;
    for (int i = r - 1; i >= 0; i--) {
        st[i] = s;
        s *= (size_t)in->dim[i];
    }
    perm_of(L, p);
    int pad = 4 - r;
    for (int i = 0; i < 4; i++) {
        pl->od[i] = i < pad ? 1 : in->dim[p[i - pad]];
        pl->is[i] = i < pad ? 0 : st[p[i - pad]];
    }
    pl->numel = s;
}

typedef struct {
    const perm_plan *pl;
    const float *src;
    float *dst;
    int scatter; /* 0: dst[out] = src[in]; 1: dst[in] = src[out] (the inverse) */
} perm_job;

static void perm_range(void *ctx, size_t lo, size_t hi)
{
    const perm_job *j = ctx;
    const perm_plan *pl = j->pl;
    for (size_t s = lo; s < hi; s++) {
        const float *src = j->src + s * pl->numel;
        float *dst = j->dst + s * pl->numel;
        size_t o = 0;
        for (int a = 0; a < pl->od[0]; a++)
            for (int b = 0; b < pl->od[1]; b++)
                for (int c = 0; c < pl->od[2]; c++, o += (size_t)pl->od[3]) {
                    size_t base = a * pl->is[0] + b * pl->is[1] + c * pl->is[2];
                    if (pl->is[3] == 1) {
                        if (j->scatter)
                            memcpy(dst + base, src + o, sizeof(float) * (size_t)pl->od[3]);
                        else
                            memcpy(dst + o, src + base, sizeof(float) * (size_t)pl->od[3]);
                    } else if (j->scatter) {
                        for (int d = 0; d < pl->od[3]; d++)
                            dst[base + d * pl->is[3]] = src[o + d];
                    } else {
                        for (int d = 0; d < pl->od[3]; d++)
                            dst[o + d] = src[base + d * pl->is[3]];
                    }
                }
    }
}

/* count samples of src permuted (or inverse-permuted) into dst. */
static void perm_apply(const cv_layer *L, size_t count, const float *src, float *dst,
                       int scatter)
{
    perm_plan pl;
    perm_plan_of(L, &pl);
    perm_job j = {&pl, src, dst, scatter};
    cv_parallel_for(count, cv_parallel_grain(pl.numel), perm_range, &j);
}

static int perm_forward(cv_layer_ctx *c, float *y, cv_err *e)
{
    perm_apply(c->L, (size_t)c->n, c->x, y, 0);
    return 0;
}

static void perm_vjp(const cv_layer_ctx *c, int k, const float *gy, float *gx, float *gtheta)
{
    if (gx)
        perm_apply(c->L, (size_t)k * c->n, gy, gx, 1);
}

static void perm_jvp(const cv_layer_ctx *c, int k, const float *rx, const float *vtheta,
                     float *ry)
{
    if (rx)
        perm_apply(c->L, (size_t)k * c->n, rx, ry, 0);
    else
        memset(ry, 0, sizeof(float) * (size_t)k * c->n * c->out_numel);
}

static void perm_hvp_extra(const cv_layer_ctx *c, int k, const float *gy, const float *rx,
                           const float *vtheta, float *gx_add, float *gtheta_add)
{
}

static const cv_layer_ops perm_ops = {
    .work_size = cv_no_work,
    .forward = perm_forward,
    .vjp = perm_vjp,
    .jvp = perm_jvp,
    .hvp_extra = perm_hvp_extra,
    .per_sample = cv_no_per_sample,
};

/* out = in with its axes permuted by perm_of (infer has validated them). */
static void permuted_shape(cv_layer *L, const cv_shape *in)
{
    int p[CV_MAX_RANK];
    perm_of(L, p);
    L->out_shape.rank = in->rank;
    for (int i = 0; i < in->rank; i++)
        L->out_shape.dim[i] = in->dim[p[i]];
}

/* ---- transpose ----------------------------------------------------------- */

static const cv_field transpose_fields[] = {
    CV_FIELD_INT_ANY_REQ("dim0", cv_transpose_attr, dim0),
    CV_FIELD_INT_ANY_REQ("dim1", cv_transpose_attr, dim1),
};

static int transpose_check(cv_layer *L, cv_err *e)
{
    const cv_transpose_attr *a = CV_LAYER_ATTR(L, cv_transpose_attr);
    return cv_func_not_batch(a->dim0, "dim0", NULL, e) || cv_func_not_batch(a->dim1, "dim1", NULL, e)
               ? -1
               : 0;
}

static int transpose_infer(cv_layer *L, const cv_shape *in, cv_err *e)
{
    const cv_transpose_attr *a = CV_LAYER_ATTR(L, cv_transpose_attr);
    int a0, a1;
    if (cv_func_axis(a->dim0, in->rank, "dim0", NULL, &a0, e) ||
        cv_func_axis(a->dim1, in->rank, "dim1", NULL, &a1, e))
        return -1;
    permuted_shape(L, in);
    return 0;
}

const cv_layer_class cv_transpose_class = {
    .name = "transpose",
    .attr_size = sizeof(cv_transpose_attr),
    CV_FIELDS(transpose_fields),
    .check = transpose_check,
    .infer = transpose_infer,
    .ops = &perm_ops,
    .function = "transpose",
};

/* ---- permute ------------------------------------------------------------- */

static const cv_field permute_fields[] = {
    CV_FIELD_INT_LIST("dims", cv_permute_attr, dims, CV_F_REQUIRED),
};

static int permute_check(cv_layer *L, cv_err *e)
{
    const cv_permute_attr *a = CV_LAYER_ATTR(L, cv_permute_attr);
    if (a->dims.n < 2)
        return cv_err_set(e, CV_EINVAL, "invalid_value", "dims",
                          "dims: must list every dimension of the input, the batch first "
                          "(e.g. [0, 2, 1]), got %d", a->dims.n);
    if (a->dims.v[0] != 0)
        return cv_err_set(e, CV_EINVAL, "invalid_value", "dims",
                          "dims: dims[0] must be 0: the batch dimension stays first "
                          "(permuting it is not supported), got %d", a->dims.v[0]);
    return 0;
}

static int permute_infer(cv_layer *L, const cv_shape *in, cv_err *e)
{
    const cv_permute_attr *a = CV_LAYER_ATTR(L, cv_permute_attr);
    if (a->dims.n != in->rank + 1)
        return cv_err_set(e, CV_EINVAL, "invalid_model", "dims",
                          "dims: %d entries for an input of %d dimensions (the batch and %d "
                          "per sample): dims must list every dimension once",
                          a->dims.n, in->rank + 1, in->rank);
    int seen[CV_MAX_RANK] = {0};
    for (int i = 1; i < a->dims.n; i++) {
        char what[24];
        int ax;
        snprintf(what, sizeof what, "dims[%d]", i);
        if (cv_func_axis(a->dims.v[i], in->rank, "dims", what, &ax, e))
            return -1;
        if (seen[ax]++)
            return cv_err_set(e, CV_EINVAL, "invalid_model", "dims",
                              "dims: dimension %d is listed twice; dims must list every "
                              "dimension once", ax + 1);
    }
    permuted_shape(L, in);
    return 0;
}

const cv_layer_class cv_permute_class = {
    .name = "permute",
    .attr_size = sizeof(cv_permute_attr),
    CV_FIELDS(permute_fields),
    .check = permute_check,
    .infer = permute_infer,
    .ops = &perm_ops,
    .function = "permute",
};
