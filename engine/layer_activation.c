/* layer_activation.c - elementwise nonlinearities: ReLU, Tanh, Sigmoid,
 * LeakyReLU, ELU, GELU (erf form, PyTorch's default, or tanh form),
 * Softplus, Mish and Hardswish, with PyTorch's values and derivative conventions (e.g. ReLU'(0)=0):
 * their classes and the kernels every activation class shares.  Forward
 * caches phi'(x) and phi''(x) (the class's cv_activation computes them);
 * all products are elementwise. */
#include "layer_activation.h"
#include "layer_passthrough.h"

#include <math.h>
#include <stdlib.h>

#include "bigmem.h"
#include "parallel.h"

static cv_act_val sigmoid_val(double x)
{
    double s = x >= 0 ? 1.0 / (1.0 + exp(-x)) : exp(x) / (1.0 + exp(x));
    cv_act_val v = {s, s * (1 - s), s * (1 - s) * (1 - 2 * s)};
    return v;
}

static cv_act_val gelu_erf(double x)
{
    double cdf = 0.5 * (1.0 + erf(x * M_SQRT1_2));
    double pdf = exp(-0.5 * x * x) / sqrt(2.0 * M_PI);
    cv_act_val v = {x * cdf, cdf + x * pdf, pdf * (2.0 - x * x)};
    return v;
}

static cv_act_val gelu_tanh(double x)
{
    const double k = sqrt(2.0 / M_PI), a = 0.044715;
    double u = k * (x + a * x * x * x), du = k * (1 + 3 * a * x * x), ddu = k * 6 * a * x;
    double t = tanh(u), sech2 = 1 - t * t;
    cv_act_val v;
    v.f = 0.5 * x * (1 + t);
    v.d1 = 0.5 * (1 + t) + 0.5 * x * sech2 * du;
    v.d2 = sech2 * du + 0.5 * x * (-2 * t * sech2 * du * du + sech2 * ddu);
    return v;
}

/* phi of each class, with PyTorch's values and derivative conventions */

static inline cv_act_val tanh_phi(const cv_layer *L, double x)
{
    cv_act_val v = {x, 1, 0};
    double t = tanh(x);
    v.f = t;
    v.d1 = 1 - t * t;
    v.d2 = -2 * t * (1 - t * t);
    return v;
}

static inline cv_act_val sigmoid_phi(const cv_layer *L, double x) { return sigmoid_val(x); }

static inline cv_act_val elu_phi(const cv_layer *L, double x)
{
    double alpha = CV_LAYER_ATTR(L, cv_elu_attr)->alpha;
    cv_act_val v = {x, 1, 0};
    if (x <= 0) {
        double ex = alpha * exp(x);
        v.f = ex - alpha;
        v.d1 = v.d2 = ex;
    }
    return v;
}

static inline cv_act_val gelu_phi(const cv_layer *L, double x)
{
    return CV_LAYER_ATTR(L, cv_gelu_attr)->approximate ? gelu_tanh(x) : gelu_erf(x);
}

static inline cv_act_val softplus_phi(const cv_layer *L, double x)
{
    const cv_softplus_attr *a = CV_LAYER_ATTR(L, cv_softplus_attr);
    cv_act_val v = {x, 1, 0};
    double bx = a->beta * x;
    if (bx <= a->threshold) {
        cv_act_val s = sigmoid_val(bx);
        v.f = (bx > 0 ? bx + log1p(exp(-bx)) : log1p(exp(bx))) / a->beta;
        v.d1 = s.f;
        v.d2 = a->beta * s.d1;
    }
    return v;
}

/* Mish: x tanh(softplus(x)); with t = tanh(softplus(x)), s = sigmoid(x) =
 * softplus'(x), t' = (1 - t^2) s:
 *   phi' = t + x (1 - t^2) s,
 *   phi'' = (1 - t^2) s (2 + x (1 - s - 2 t s)). */
static inline cv_act_val mish_phi(const cv_layer *L, double x)
{
    double sp = x > 0 ? x + log1p(exp(-x)) : log1p(exp(x));
    double t = tanh(sp), s = sigmoid_val(x).f, u = (1 - t * t) * s;
    cv_act_val v = {x * t, t + x * u, u * (2 + x * (1 - s - 2 * t * s))};
    return v;
}

/* Hardswish: x relu6(x + 3) / 6; PyTorch's derivative takes the middle
 * piece on the closed interval [-3, 3]. */
static inline cv_act_val hardswish_phi(const cv_layer *L, double x)
{
    cv_act_val v = {0, 0, 0};
    if (x > 3) {
        v.f = x;
        v.d1 = 1;
    } else if (x >= -3) {
        v.f = x * (x + 3) / 6;
        v.d1 = x / 3 + 0.5;
        v.d2 = 1.0 / 3;
    }
    return v;
}

CV_ACTIVATION_FORWARD(tanh_forward, tanh_phi)
CV_ACTIVATION_FORWARD(sigmoid_forward, sigmoid_phi)
CV_ACTIVATION_FORWARD(elu_forward, elu_phi)
CV_ACTIVATION_FORWARD(gelu_forward, gelu_phi)
CV_ACTIVATION_FORWARD(softplus_forward, softplus_phi)
CV_ACTIVATION_FORWARD(mish_forward, mish_phi)
CV_ACTIVATION_FORWARD(hardswish_forward, hardswish_phi)

/* Elementwise loops run on cv_parallel_for ranges of one vector. */
#define CV_ACT_GRAIN cv_parallel_grain(1)

typedef struct {
    cv_layer_ctx *c;
    const cv_activation *act;
    const float *d, *a, *b; /* factors: a and out hold k vectors of len floats, d and b one */
    float *out;
    int add;
    int k;
    size_t len;
} act_job;

/* ReLU, LeakyReLU (slope s for x <= 0): the hot path */
static inline void forward_pl(const cv_layer_ctx *c, float *y_, size_t lo, size_t hi, float s)
{
    const float *restrict x = c->x;
    float *restrict y = y_, *restrict d1 = c->d1;
    for (size_t i = lo; i < hi; i++) { /* a select, not a branch: vectorizes */
        float d = x[i] > 0 ? 1.0f : s;
        y[i] = x[i] * d;
        d1[i] = d;
    }
}

static void relu_forward(const cv_layer_ctx *c, float *y, size_t lo, size_t hi)
{
    forward_pl(c, y, lo, hi, 0.0f);
}

static void leakyrelu_forward(const cv_layer_ctx *c, float *y, size_t lo, size_t hi)
{
    forward_pl(c, y, lo, hi, (float)CV_LAYER_ATTR(c->L, cv_leakyrelu_attr)->negative_slope);
}

static void forward_range(void *p, size_t lo, size_t hi)
{
    const act_job *q = p;
    q->act->forward(q->c, q->out, lo, hi);
}

/* out_j = (out_j +) d ⊙ a_j (⊙ b when b is set) on [lo, hi) of each of the k
 * vectors; restrict locals let GCC vectorize */
static void scale_one(const act_job *q, int j, size_t lo, size_t hi)
{
    const float *restrict d = q->d, *restrict a = q->a + (size_t)j * q->len, *restrict b = q->b;
    float *restrict out = q->out + (size_t)j * q->len;
    if (b)
        for (size_t i = lo; i < hi; i++)
            out[i] += d[i] * a[i] * b[i];
    else if (q->add)
        for (size_t i = lo; i < hi; i++)
            out[i] += d[i] * a[i];
    else
        for (size_t i = lo; i < hi; i++)
            out[i] = d[i] * a[i];
}

static void scale_range(void *p, size_t lo, size_t hi)
{
    const act_job *q = p;
    for (int j = 0; j < q->k; j++)
        scale_one(q, j, lo, hi);
}

/* the k-vector loop above as one fork-join over the positions */
static void scale_vectors(act_job *q)
{
    cv_parallel_for(q->len, cv_parallel_grain((size_t)q->k), scale_range, q);
}

static int act_forward(cv_layer_ctx *c, float *y, cv_err *e)
{
    size_t len = (size_t)c->n * c->in_numel;
    const cv_activation *act = c->L->cls->impl;
    int piecewise_linear = act->piecewise_linear;
    cv_layer_ctx_release(c);
    c->d1 = cv_layer_cache(c, sizeof(float) * len);
    c->d2 = piecewise_linear ? NULL : cv_layer_cache(c, sizeof(float) * len); /* NULL: phi'' = 0 */
    if (!c->d1 || (!piecewise_linear && !c->d2))
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "activation cache (%zu floats)",
                          2 * len);
    act_job q = {c, act, NULL, NULL, NULL, y, 0, 1, len};
    cv_parallel_for(len, CV_ACT_GRAIN, forward_range, &q);
    return 0;
}

/* out_j = d ⊙ in_j for each of k stacked vectors (add != 0: out_j += ...) */
static void scale_stack(const cv_layer_ctx *c, int k, const float *d, const float *in,
                        float *out, int add)
{
    act_job q = {NULL, NULL, d, in, NULL, out, add, k, (size_t)c->n * c->in_numel};
    scale_vectors(&q);
}

static void act_vjp(const cv_layer_ctx *c, int k, const float *gy, float *gx, float *gtheta)
{
    if (gx)
        scale_stack(c, k, c->d1, gy, gx, 0);
}

static void act_jvp(const cv_layer_ctx *c, int k, const float *rx, const float *vtheta,
                    float *ry)
{
    size_t len = (size_t)c->n * c->in_numel;
    if (rx)
        scale_stack(c, k, c->d1, rx, ry, 0);
    else
        for (size_t i = 0; i < (size_t)k * len; i++)
            ry[i] = 0;
}

/* gx += phi''(x) ⊙ rx ⊙ gy */
static void act_hvp_extra(const cv_layer_ctx *c, int k, const float *gy, const float *rx,
                          const float *vtheta, float *gx_add, float *gtheta_add)
{
    if (!gx_add || !rx || !c->d2)
        return;
    act_job q = {NULL, NULL, c->d2, rx, gy, gx_add, 1, k, (size_t)c->n * c->in_numel};
    scale_vectors(&q);
}

const cv_layer_ops cv_activation_ops = {
    .work_size = cv_no_work,
    .forward = act_forward,
    .vjp = act_vjp,
    .jvp = act_jvp,
    .hvp_extra = act_hvp_extra,
    .per_sample = cv_no_per_sample,
};

/* ---- classes --------------------------------------------------------------- */

static const cv_activation relu_act = {relu_forward, 1}, leakyrelu_act = {leakyrelu_forward, 1},
                           tanh_act = {tanh_forward, 0}, sigmoid_act = {sigmoid_forward, 0},
                           elu_act = {elu_forward, 0}, gelu_act = {gelu_forward, 0},
                           softplus_act = {softplus_forward, 0}, mish_act = {mish_forward, 0},
                           hardswish_act = {hardswish_forward, 0};

static const cv_field inplace_fields[] = {CV_FIELD_INPLACE};

static const cv_field leakyrelu_fields[] = {
    CV_FIELD_NUMBER("negative_slope", cv_leakyrelu_attr, negative_slope, 0.01, -INFINITY,
                    INFINITY),
    CV_FIELD_INPLACE,
};

static const cv_field elu_fields[] = {
    CV_FIELD_NUMBER("alpha", cv_elu_attr, alpha, 1.0, -INFINITY, INFINITY),
    CV_FIELD_INPLACE,
};

static const char *const gelu_approximations[] = {"none", "tanh", NULL};

static const cv_field gelu_fields[] = {
    {.name = "approximate", .kind = CV_F_ENUM, .offset = offsetof(cv_gelu_attr, approximate),
     .def = 0, .choices = gelu_approximations},
};

static const cv_field softplus_fields[] = {
    CV_FIELD_NUMBER("beta", cv_softplus_attr, beta, 1.0, -INFINITY, INFINITY),
    CV_FIELD_NUMBER("threshold", cv_softplus_attr, threshold, 20.0, -INFINITY, INFINITY),
};

static int softplus_check(cv_layer *L, cv_err *e)
{
    if (CV_LAYER_ATTR(L, cv_softplus_attr)->beta == 0)
        return cv_err_set(e, CV_EINVAL, "invalid_value", "beta", "beta: must not be 0");
    return 0;
}

const cv_layer_class cv_relu_class = {
    .name = "ReLU", CV_FIELDS(inplace_fields), .ops = &cv_activation_ops, .function = "relu",
    .impl = &relu_act};
const cv_layer_class cv_tanh_class = {
    .name = "Tanh", .ops = &cv_activation_ops, .function = "tanh", .impl = &tanh_act};
const cv_layer_class cv_sigmoid_class = {
    .name = "Sigmoid", .ops = &cv_activation_ops, .function = "sigmoid", .impl = &sigmoid_act};
const cv_layer_class cv_leakyrelu_class = {
    .name = "LeakyReLU", .attr_size = sizeof(cv_leakyrelu_attr), CV_FIELDS(leakyrelu_fields),
    .ops = &cv_activation_ops, .function = "leaky_relu", .impl = &leakyrelu_act};
const cv_layer_class cv_elu_class = {
    .name = "ELU", .attr_size = sizeof(cv_elu_attr), CV_FIELDS(elu_fields),
    .ops = &cv_activation_ops, .function = "elu", .impl = &elu_act};
const cv_layer_class cv_gelu_class = {
    .name = "GELU", .attr_size = sizeof(cv_gelu_attr), CV_FIELDS(gelu_fields),
    .ops = &cv_activation_ops, .function = "gelu", .impl = &gelu_act};
const cv_layer_class cv_softplus_class = {
    .name = "Softplus", .attr_size = sizeof(cv_softplus_attr), CV_FIELDS(softplus_fields),
    .check = softplus_check, .ops = &cv_activation_ops, .function = "softplus",
    .impl = &softplus_act};
const cv_layer_class cv_mish_class = {
    .name = "Mish", CV_FIELDS(inplace_fields), .ops = &cv_activation_ops, .impl = &mish_act,
    .function = "mish"};
const cv_layer_class cv_hardswish_class = {
    .name = "Hardswish", CV_FIELDS(inplace_fields), .ops = &cv_activation_ops,
    .impl = &hardswish_act, .function = "hardswish"};
