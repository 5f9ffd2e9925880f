/* layer_attention.c - the attribute classes of MultiheadAttention and
 * scaled_dot_product_attention (expanded by the graph parser into primitive
 * nodes, layer_attention.h) and attn_scale, y = s x. */
#include "layer_attention.h"

#include <math.h>
#include <string.h>

#include "layer_passthrough.h"

/* ---- MultiheadAttention ------------------------------------------------ */

static int mha_check(cv_layer *L, cv_err *e)
{
    const cv_mha_attr *a = CV_LAYER_ATTR(L, cv_mha_attr);
    if (a->embed_dim % a->num_heads)
        return cv_err_set(e, CV_EINVAL, "invalid_value", "num_heads",
                          "num_heads: must divide embed_dim (%d), got %d", a->embed_dim,
                          a->num_heads);
    if (!a->batch_first)
        return cv_err_set(e, CV_EINVAL, "unsupported", "batch_first",
                          "batch_first: false is not supported: the batch dimension comes "
                          "first in curvd (construct with batch_first=True)");
    return 0;
}

static const cv_field mha_fields[] = {
    CV_FIELD_INT_REQ("embed_dim", cv_mha_attr, embed_dim, 1),
    CV_FIELD_INT_REQ("num_heads", cv_mha_attr, num_heads, 1),
    {.name = "dropout", .kind = CV_F_NUMBER, .offset = offsetof(cv_mha_attr, dropout),
     .min = 0, .max = 1},
    CV_FIELD_BOOL("bias", cv_mha_attr, bias, 1),
    {.name = "add_bias_kv", .kind = CV_F_FIXED_BOOL, .offset = CV_F_NOSTORE, .def = 0,
     .text = "extra key/value biases are not implemented"},
    {.name = "add_zero_attn", .kind = CV_F_FIXED_BOOL, .offset = CV_F_NOSTORE, .def = 0,
     .text = "zero attention rows are not implemented"},
    {.name = "kdim", .kind = CV_F_IGNORED, .flags = CV_F_ACCEPT_NULL | CV_F_HIDDEN,
     .offset = CV_F_NOSTORE},
    {.name = "vdim", .kind = CV_F_IGNORED, .flags = CV_F_ACCEPT_NULL | CV_F_HIDDEN,
     .offset = CV_F_NOSTORE},
    CV_FIELD_BOOL("batch_first", cv_mha_attr, batch_first, 0),
};

const cv_layer_class cv_mha_class = {
    .name = "MultiheadAttention",
    .attr_size = sizeof(cv_mha_attr),
    CV_FIELDS(mha_fields),
    .check = mha_check,
};

/* ---- scaled_dot_product_attention -------------------------------------- */

static void sdpa_init(cv_layer *L) { CV_LAYER_ATTR(L, cv_sdpa_attr)->scale = NAN; }

static const cv_field sdpa_fields[] = {
    CV_FIELD_BOOL("is_causal", cv_sdpa_attr, is_causal, 0),
    {.name = "scale", .kind = CV_F_NUMBER, .flags = CV_F_NULLABLE | CV_F_MIN_OPEN,
     .offset = offsetof(cv_sdpa_attr, scale), .def = NAN, .min = 0, .max = INFINITY},
    {.name = "dropout_p", .kind = CV_F_NUMBER, .offset = offsetof(cv_sdpa_attr, dropout_p),
     .min = 0, .max = 0},
};

const cv_layer_class cv_sdpa_class = {
    .name = "scaled_dot_product_attention",
    .attr_size = sizeof(cv_sdpa_attr),
    CV_FIELDS(sdpa_fields),
    .init = sdpa_init,
    .min_inputs = 3,
    .max_inputs = 4,
};

/* ---- attn_scale: y = s x ------------------------------------------------- */

static void scale_init(cv_layer *L) { CV_LAYER_ATTR(L, cv_attn_scale_attr)->scale = NAN; }

static int scale_infer(cv_layer *L, const cv_shape *in, cv_err *e)
{
    cv_attn_scale_attr *a = CV_LAYER_ATTR(L, cv_attn_scale_attr);
    a->s = isnan(a->scale) ? 1.0 / sqrt((double)in[0].dim[in[0].rank - 1]) : a->scale;
    L->out_shape = in[0];
    return 0;
}

static float scale_of(const cv_layer_ctx *c)
{
    return (float)CV_LAYER_ATTR(c->L, cv_attn_scale_attr)->s;
}

static void scaled_copy(float *restrict y, const float *restrict x, float s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        y[i] = s * x[i];
}

static int scale_forward(cv_layer_ctx *c, float *y, cv_err *e)
{
    scaled_copy(y, c->x, scale_of(c), (size_t)c->n * c->in_numel);
    return 0;
}

static void scale_vjp(const cv_layer_ctx *c, int k, const float *gy, float *gx, float *gtheta)
{
    if (gx)
        scaled_copy(gx, gy, scale_of(c), (size_t)k * c->n * c->in_numel);
}

static void scale_jvp(const cv_layer_ctx *c, int k, const float *rx, const float *vtheta,
                      float *ry)
{
    size_t len = (size_t)k * c->n * c->out_numel;
    if (rx)
        scaled_copy(ry, rx, scale_of(c), len);
    else
        memset(ry, 0, sizeof(float) * len);
}

static const cv_layer_ops scale_ops = {
    .work_size = cv_no_work,
    .forward = scale_forward,
    .vjp = scale_vjp,
    .jvp = scale_jvp,
    .hvp_extra = cv_no_hvp_extra,
    .per_sample = cv_no_per_sample,
    .quad_extra = cv_no_quad_extra,
};

static const cv_field scale_fields[] = {
    {.name = "scale", .kind = CV_F_NUMBER, .flags = CV_F_NULLABLE | CV_F_MIN_OPEN,
     .offset = offsetof(cv_attn_scale_attr, scale), .def = NAN, .min = 0, .max = INFINITY},
};

const cv_layer_class cv_attn_scale_class = {
    .name = "attn_scale",
    .attr_size = sizeof(cv_attn_scale_attr),
    CV_FIELDS(scale_fields),
    .init = scale_init,
    .infer = scale_infer,
    .ops = &scale_ops,
};
