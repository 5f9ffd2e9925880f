/* layer_passthrough.c - Identity, Flatten, Dropout (evaluation mode) and the
 * function contiguous: their
 * classes and kernels.  The memory layout of a sample does not change, so
 * every kernel copies. */
#include "layer_passthrough.h"

#include <string.h>

size_t cv_no_work(const cv_layer_ctx *c, int k) { return 0; }

static int pass_forward(cv_layer_ctx *c, float *y, cv_err *e)
{
    memcpy(y, c->x, sizeof(float) * (size_t)c->n * c->in_numel);
    return 0;
}

static void pass_vjp(const cv_layer_ctx *c, int k, const float *gy, float *gx, float *gtheta)
{
    if (gx)
        memcpy(gx, gy, sizeof(float) * (size_t)k * c->n * c->in_numel);
}

static void pass_jvp(const cv_layer_ctx *c, int k, const float *rx, const float *vtheta,
                     float *ry)
{
    size_t len = sizeof(float) * (size_t)k * c->n * c->out_numel;
    if (rx)
        memcpy(ry, rx, len);
    else
        memset(ry, 0, len);
}

void cv_no_hvp_extra(const cv_layer_ctx *c, int k, const float *gy, const float *rx,
                     const float *vtheta, float *gx_add, float *gtheta_add)
{
}

void cv_no_quad_extra(const cv_layer_ctx *c, int k, const float *gy, const float *rx,
                      const float *vtheta, double *q)
{
}

void cv_no_per_sample(const cv_layer_ctx *c, const float *gy, float *G) {}

const cv_layer_ops cv_passthrough_ops = {
    .work_size = cv_no_work,
    .forward = pass_forward,
    .vjp = pass_vjp,
    .jvp = pass_jvp,
    .hvp_extra = cv_no_hvp_extra,
    .per_sample = cv_no_per_sample,
    .quad_extra = cv_no_quad_extra,
};

/* ---- classes --------------------------------------------------------------- */

static const cv_field flatten_fields[] = {
    CV_FIELD_INT("start_dim", cv_flatten_attr, start_dim, -CV_ATTR_INT_LIMIT, 1),
    CV_FIELD_INT("end_dim", cv_flatten_attr, end_dim, -CV_ATTR_INT_LIMIT, -1),
};

static int flatten_check(cv_layer *L, cv_err *e)
{
    if (CV_LAYER_ATTR(L, cv_flatten_attr)->start_dim == 0)
        return cv_err_set(e, CV_EINVAL, "invalid_value", "start_dim",
                          "start_dim: 0 would flatten the batch dimension; use start_dim >= 1");
    return 0;
}

static int flatten_infer(cv_layer *L, const cv_shape *in, cv_err *e)
{
    const cv_flatten_attr *a = CV_LAYER_ATTR(L, cv_flatten_attr);
    int full_rank = in->rank + 1;
    int sd = a->start_dim < 0 ? a->start_dim + full_rank : a->start_dim;
    int ed = a->end_dim < 0 ? a->end_dim + full_rank : a->end_dim;
    if (sd < 1 || ed >= full_rank || sd > ed)
        return cv_err_set(e, CV_EINVAL, "invalid_model", "",
                          "start_dim/end_dim must select per-sample dimensions (start_dim >= 1)");
    cv_shape out = {0, {0}};
    for (int d = 1; d < full_rank; d++) {
        if (d <= sd || d > ed)
            out.dim[out.rank++] = in->dim[d - 1];
        else
            out.dim[out.rank - 1] *= in->dim[d - 1];
    }
    L->out_shape = out;
    return 0;
}

static const cv_field dropout_fields[] = {
    CV_FIELD_NUMBER("p", cv_dropout_attr, p, 0.5, 0.0, 1.0),
    CV_FIELD_INPLACE,
    {.name = "training", .kind = CV_F_FIXED_BOOL, .flags = CV_F_HIDDEN, .offset = CV_F_NOSTORE,
     .def = 0,
     .text = "curvd evaluates models in evaluation mode, where Dropout is the identity"},
};

const cv_layer_class cv_identity_class = {
    .name = "Identity", .ops = &cv_passthrough_ops, .function = "identity"};

/* x.contiguous(): a function only (graph form); the layout never changes here */
const cv_layer_class cv_contiguous_class = {
    .name = "contiguous", .ops = &cv_passthrough_ops, .function = "contiguous"};

const cv_layer_class cv_flatten_class = {
    .name = "Flatten", .attr_size = sizeof(cv_flatten_attr), CV_FIELDS(flatten_fields),
    .check = flatten_check, .infer = flatten_infer, .ops = &cv_passthrough_ops};

const cv_layer_class cv_dropout_class = {
    .name = "Dropout", .attr_size = sizeof(cv_dropout_attr), CV_FIELDS(dropout_fields),
    .ops = &cv_passthrough_ops, .function = "dropout"};
