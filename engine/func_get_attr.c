/* func_get_attr.c - get_attr: a learned tensor (nn.Parameter attribute, e.g.
 * a positional embedding) or a constant buffer (a mask) that no called
 * module owns.  No inputs; one tensor of the full shape `shape`, named by
 * the node's target (the layout declares it with the empty suffix).  Every
 * sample gets a copy: per sample the tensor without a leading 1, so that it
 * broadcasts against batched operands as in PyTorch.  As a function of its
 * parameter it is linear: vjp sums the cotangents over the samples, jvp
 * copies the direction, no second-order terms; sample n's gradient is gy_n. */
#include <string.h>

#include "func_elementwise.h"
#include "layer_passthrough.h"
#include "im2col.h"

#define GA(L) CV_LAYER_ATTR(L, cv_get_attr_attr)

/* the tensor: a parameter (c->theta) or a buffer */
static const float *ga_tensor(const cv_layer_ctx *c)
{
    return GA(c->L)->buffer ? c->buffers : c->theta;
}

static int ga_forward(cv_layer_ctx *c, float *y, cv_err *e)
{
    size_t P = c->out_numel;
    const float *t = ga_tensor(c);
    for (int s = 0; s < c->n; s++)
        memcpy(y + (size_t)s * P, t, sizeof(float) * P);
    return 0;
}

static void ga_vjp_n(const cv_layer_ctx *c, int k, const float *gy, float *const *gx,
                     float *gtheta)
{
    if (!gtheta || !c->nparam)
        return;
    size_t P = c->nparam;
    for (int j = 0; j < k; j++) {
        float *g = gtheta + (size_t)j * P;
        memset(g, 0, sizeof(float) * P);
        for (int s = 0; s < c->n; s++) {
            const float *src = gy + ((size_t)j * c->n + s) * P;
            for (size_t q = 0; q < P; q++)
                g[q] += src[q];
        }
    }
}

static void ga_jvp_n(const cv_layer_ctx *c, int k, const float *const *rx, const float *vtheta,
                     float *ry)
{
    size_t P = c->out_numel;
    for (int j = 0; j < k; j++)
        for (int s = 0; s < c->n; s++) {
            float *r = ry + ((size_t)j * c->n + s) * P;
            if (vtheta && c->nparam)
                memcpy(r, vtheta + (size_t)j * c->nparam, sizeof(float) * P);
            else
                memset(r, 0, sizeof(float) * P);
        }
}

static void ga_hvp_extra_n(const cv_layer_ctx *c, int k, const float *gy, const float *const *rx,
                           const float *vtheta, float *const *gx_add, float *gtheta_add)
{
}

static void ga_per_sample(const cv_layer_ctx *c, const float *gy, float *G)
{
    if (c->nparam)
        memcpy(G, gy, sizeof(float) * (size_t)c->n * c->nparam);
}

/* row r of the k stacked cotangents is grad_r itself */
static void ga_gram_add(const cv_layer_ctx *c, int k, const float *gy, unsigned mask, double *G)
{
    if (c->nparam && (mask & 1u))
        cv_gram_add_rows(k * c->n, (int)c->nparam, gy, G);
}

static const cv_layer_ops ga_ops = {
    .diag_add = cv_layer_diag_per_sample,
    .work_size = cv_no_work,
    .forward = ga_forward,
    .per_sample = ga_per_sample,
    .gram_add = ga_gram_add,
    .vjp_n = ga_vjp_n,
    .jvp_n = ga_jvp_n,
    .hvp_extra_n = ga_hvp_extra_n,
};

/* ---- class ---------------------------------------------------------------------- */

static int ga_check(cv_layer *L, cv_err *e)
{
    const cv_int_list *s = &GA(L)->shape;
    if (s->n < 1 || s->n > CV_MAX_RANK)
        return cv_err_set(e, CV_EINVAL, "invalid_value", "shape",
                          "shape: must list 1 to %d dimensions", CV_MAX_RANK);
    for (int i = 0; i < s->n; i++)
        if (s->v[i] < 1)
            return cv_err_set(e, CV_EINVAL, "invalid_value", "shape",
                              "shape[%d]: must be >= 1", i);
    return 0;
}

static int ga_infer(cv_layer *L, const cv_shape *in, cv_err *e)
{
    if (ga_check(L, e))
        return -1;
    const cv_int_list *s = &GA(L)->shape;
    int drop = s->n >= 2 && s->v[0] == 1;
    cv_shape o;
    memset(&o, 0, sizeof o);
    for (int i = drop; i < s->n; i++)
        o.dim[o.rank++] = s->v[i];
    if (cv_shape_numel(&o) > CV_MAX_SAMPLE_NUMEL)
        return cv_err_set(e, CV_EINVAL, "invalid_value", "shape", "shape: too large");
    L->out_shape = o;
    return 0;
}

static int ga_layout(cv_layer *L)
{
    const cv_int_list *s = &GA(L)->shape;
    return GA(L)->buffer ? cv_layer_add_buffer(L, "", s->n, s->v)
                         : cv_layer_add_param(L, "", s->n, s->v);
}

static const cv_field ga_fields[] = {
    {.name = "shape", .kind = CV_F_INT_LIST, .flags = CV_F_REQUIRED,
     .offset = offsetof(cv_get_attr_attr, shape), .min = 1, .max = CV_MAX_RANK},
    CV_FIELD_BOOL("buffer", cv_get_attr_attr, buffer, 0),
};

const cv_layer_class cv_get_attr_class = {
    .name = "get_attr", .attr_size = sizeof(cv_get_attr_attr), CV_FIELDS(ga_fields),
    .check = ga_check, .infer = ga_infer, .layout = ga_layout, .ops = &ga_ops,
    .min_inputs = 0, .max_inputs = 0, .function = "get_attr"};
