/* func_view.c - the function classes that only change the shape of a sample,
 * not its memory layout: reshape (also x.view) and flatten (torch.flatten).
 * Their kernels are the passthrough ones (layer_passthrough.h): a copy. */
#include <stdint.h>
#include <string.h>

#include "func_shape.h"
#include "layer_passthrough.h"

/* ---- reshape: shape is the full shape, the batch entry -1 ----------------- */

CV_LAYER_ATTRS(cv_reshape_attr, { cv_int_list shape; });

static const cv_field reshape_fields[] = {
    CV_FIELD_INT_LIST("shape", cv_reshape_attr, shape, CV_F_REQUIRED),
};

static int reshape_check(cv_layer *L, cv_err *e)
{
    const cv_int_list *s = &CV_LAYER_ATTR(L, cv_reshape_attr)->shape;
    if (s->n < 2)
        return cv_err_set(e, CV_EINVAL, "invalid_value", "shape",
                          "shape: must be the full shape with the batch entry -1 and 1 to %d "
                          "per-sample entries (e.g. [-1, 4, 32]), got %d entries",
                          CV_MAX_RANK, s->n);
    if (s->v[0] != -1)
        return cv_err_set(e, CV_EINVAL, "invalid_value", "shape",
                          "shape: shape[0] must be -1 (the batch dimension, kept as it is), "
                          "got %d", s->v[0]);
    int unknown = 0;
    for (int i = 1; i < s->n; i++) {
        if (s->v[i] == -1 && unknown++)
            return cv_err_set(e, CV_EINVAL, "invalid_value", "shape",
                              "shape: at most one per-sample entry may be -1 (inferred)");
        if (s->v[i] != -1 && s->v[i] < 1)
            return cv_err_set(e, CV_EINVAL, "invalid_value", "shape",
                              "shape: shape[%d] must be a positive size or -1, got %d", i,
                              s->v[i]);
    }
    return 0;
}

static int reshape_infer(cv_layer *L, const cv_shape *in, cv_err *e)
{
    const cv_int_list *s = &CV_LAYER_ATTR(L, cv_reshape_attr)->shape;
    int64_t numel = (int64_t)cv_shape_numel(in), known = 1;
    int unknown = -1;
    for (int i = 1; i < s->n; i++) {
        if (s->v[i] == -1)
            unknown = i;
        else
            known *= s->v[i];
    }
    char got[64];
    cv_shape_str(in, got, sizeof got);
    if ((unknown < 0 && known != numel) || (unknown >= 0 && numel % known != 0))
        return cv_err_set(e, CV_EINVAL, "invalid_model", "shape",
                          "shape: a sample of shape %s (%lld entries) cannot be reshaped to "
                          "the given per-sample sizes", got, (long long)numel);
    cv_shape out = {s->n - 1, {0}};
    for (int i = 1; i < s->n; i++)
        out.dim[i - 1] = s->v[i] == -1 ? (int)(numel / known) : s->v[i];
    L->out_shape = out;
    return 0;
}

const cv_layer_class cv_reshape_class = {
    .name = "reshape",
    .attr_size = sizeof(cv_reshape_attr),
    CV_FIELDS(reshape_fields),
    .check = reshape_check,
    .infer = reshape_infer,
    .ops = &cv_passthrough_ops,
    .function = "reshape",
};

/* ---- flatten: torch.flatten(x, start_dim=0, end_dim=-1); start_dim 0 is refused */

CV_LAYER_ATTRS(cv_flatten_fn_attr, { int start_dim, end_dim; });

static const cv_field flatten_fields[] = {
    CV_FIELD_INT_ANY("start_dim", cv_flatten_fn_attr, start_dim, 0),
    CV_FIELD_INT_ANY("end_dim", cv_flatten_fn_attr, end_dim, -1),
};

static int flatten_check(cv_layer *L, cv_err *e)
{
    const cv_flatten_fn_attr *a = CV_LAYER_ATTR(L, cv_flatten_fn_attr);
    return cv_func_not_batch(a->start_dim, "start_dim", NULL, e) ||
                   cv_func_not_batch(a->end_dim, "end_dim", NULL, e)
               ? -1
               : 0;
}

static int flatten_infer(cv_layer *L, const cv_shape *in, cv_err *e)
{
    const cv_flatten_fn_attr *a = CV_LAYER_ATTR(L, cv_flatten_fn_attr);
    int s, t;
    if (cv_func_axis(a->start_dim, in->rank, "start_dim", NULL, &s, e) ||
        cv_func_axis(a->end_dim, in->rank, "end_dim", NULL, &t, e))
        return -1;
    if (s > t)
        return cv_err_set(e, CV_EINVAL, "invalid_model", "start_dim",
                          "start_dim: start_dim %d comes after end_dim %d", a->start_dim,
                          a->end_dim);
    cv_shape out = {0, {0}};
    for (int d = 0; d < in->rank; d++) {
        if (d <= s || d > t)
            out.dim[out.rank++] = in->dim[d];
        else
            out.dim[out.rank - 1] *= in->dim[d];
    }
    L->out_shape = out;
    return 0;
}

const cv_layer_class cv_flatten_fn_class = {
    .name = "flatten",
    .attr_size = sizeof(cv_flatten_fn_attr),
    CV_FIELDS(flatten_fields),
    .check = flatten_check,
    .infer = flatten_infer,
    .ops = &cv_passthrough_ops,
    .function = "flatten",
};
