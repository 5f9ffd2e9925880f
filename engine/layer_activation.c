/* layer_activation.c - elementwise nonlinearities: ReLU, Tanh, Sigmoid,
 * LeakyReLU, ELU, GELU (erf form, PyTorch's default, or tanh form) and
 * Softplus, with PyTorch's values and derivative conventions (e.g. ReLU'(0)=0).
 * Forward caches phi'(x) and phi''(x); all products are elementwise. */
#include "layer.h"

#include <math.h>
#include <stdlib.h>

#include "parallel.h"

typedef struct {
    double f, d1, d2;
} act_val;

static act_val sigmoid_val(double x)
{
    double s = x >= 0 ? 1.0 / (1.0 + exp(-x)) : exp(x) / (1.0 + exp(x));
    act_val v = {s, s * (1 - s), s * (1 - s) * (1 - 2 * s)};
    return v;
}

static act_val gelu_erf(double x)
{
    double cdf = 0.5 * (1.0 + erf(x * M_SQRT1_2));
    double pdf = exp(-0.5 * x * x) / sqrt(2.0 * M_PI);
    act_val v = {x * cdf, cdf + x * pdf, pdf * (2.0 - x * x)};
    return v;
}

static act_val gelu_tanh(double x)
{
    const double k = sqrt(2.0 / M_PI), a = 0.044715;
    double u = k * (x + a * x * x * x), du = k * (1 + 3 * a * x * x), ddu = k * 6 * a * x;
    double t = tanh(u), sech2 = 1 - t * t;
    act_val v;
    v.f = 0.5 * x * (1 + t);
    v.d1 = 0.5 * (1 + t) + 0.5 * x * sech2 * du;
    v.d2 = sech2 * du + 0.5 * x * (-2 * t * sech2 * du * du + sech2 * ddu);
    return v;
}

static act_val act_eval(const cv_layer *L, double x)
{
    act_val v = {x, 1, 0};
    switch (L->type) {
    case CV_RELU:
        if (x <= 0)
            v.f = v.d1 = 0;
        break;
    case CV_LEAKYRELU:
        if (x <= 0) {
            v.f = L->negative_slope * x;
            v.d1 = L->negative_slope;
        }
        break;
    case CV_TANH: {
        double t = tanh(x);
        v.f = t;
        v.d1 = 1 - t * t;
        v.d2 = -2 * t * (1 - t * t);
        break;
    }
    case CV_SIGMOID:
        v = sigmoid_val(x);
        break;
    case CV_ELU:
        if (x <= 0) {
            double ex = L->alpha * exp(x);
            v.f = ex - L->alpha;
            v.d1 = v.d2 = ex;
        }
        break;
    case CV_GELU:
        v = L->gelu_tanh ? gelu_tanh(x) : gelu_erf(x);
        break;
    case CV_SOFTPLUS: {
        double bx = L->beta * x;
        if (bx <= L->threshold) {
            act_val s = sigmoid_val(bx);
            v.f = (bx > 0 ? bx + log1p(exp(-bx)) : log1p(exp(bx))) / L->beta;
            v.d1 = s.f;
            v.d2 = L->beta * s.d1;
        }
        break;
    }
    default:
        break;
    }
    return v;
}

static size_t act_work(const cv_layer_ctx *c, int k) { return 0; }

/* Elementwise loops run on cv_parallel_for ranges of one vector. */
#define CV_ACT_GRAIN cv_parallel_grain(1)

typedef struct {
    cv_layer_ctx *c;
    const float *d, *a, *b; /* factors */
    float *out;
    int add;
} act_job;

static void forward_pl_range(void *p, size_t lo, size_t hi) /* ReLU, LeakyReLU: hot path */
{
    const act_job *q = p;
    const float *restrict x = q->c->x;
    float *restrict y = q->out, *restrict d1 = q->c->d1;
    float s = q->c->L->type == CV_RELU ? 0.0f : (float)q->c->L->negative_slope;
    for (size_t i = lo; i < hi; i++) { /* a select, not a branch: vectorizes */
        float d = x[i] > 0 ? 1.0f : s;
        y[i] = x[i] * d;
        d1[i] = d;
    }
}

static void forward_range(void *p, size_t lo, size_t hi)
{
    const act_job *q = p;
    cv_layer_ctx *c = q->c;
    for (size_t i = lo; i < hi; i++) {
        act_val v = act_eval(c->L, c->x[i]);
        q->out[i] = (float)v.f;
        c->d1[i] = (float)v.d1;
        c->d2[i] = (float)v.d2;
    }
}

/* out = (out +) d ⊙ a (⊙ b when b is set); restrict locals let GCC vectorize */
static void scale_range(void *p, size_t lo, size_t hi)
{
    const act_job *q = p;
    const float *restrict d = q->d, *restrict a = q->a, *restrict b = q->b;
    float *restrict out = q->out;
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

static int act_forward(cv_layer_ctx *c, float *y, cv_err *e)
{
    size_t len = (size_t)c->n * c->in_numel;
    int piecewise_linear = c->L->type == CV_RELU || c->L->type == CV_LEAKYRELU;
    cv_layer_ctx_release(c);
    c->d1 = malloc(sizeof(float) * len);
    c->d2 = piecewise_linear ? NULL : malloc(sizeof(float) * len); /* NULL: phi'' = 0 */
    if (!c->d1 || (!piecewise_linear && !c->d2))
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "activation cache (%zu floats)",
                          2 * len);
    act_job q = {c, NULL, NULL, NULL, y, 0};
    cv_parallel_for(len, CV_ACT_GRAIN, piecewise_linear ? forward_pl_range : forward_range, &q);
    return 0;
}

/* out_j = d ⊙ in_j for each of k stacked vectors (add != 0: out_j += ...) */
static void scale_stack(const cv_layer_ctx *c, int k, const float *d, const float *in,
                        float *out, int add)
{
    size_t len = (size_t)c->n * c->in_numel;
    for (int j = 0; j < k; j++) {
        act_job q = {NULL, d, in + (size_t)j * len, NULL, out + (size_t)j * len, add};
        cv_parallel_for(len, CV_ACT_GRAIN, scale_range, &q);
    }
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
    size_t len = (size_t)c->n * c->in_numel;
    for (int j = 0; j < k; j++) {
        act_job q = {NULL, c->d2, rx + (size_t)j * len, gy, gx_add + (size_t)j * len, 1};
        cv_parallel_for(len, CV_ACT_GRAIN, scale_range, &q);
    }
}

static void act_per_sample(const cv_layer_ctx *c, const float *gy, float *G) {}

const cv_layer_ops cv_activation_ops = {act_work, act_forward, act_vjp, act_jvp, act_hvp_extra,
                                        act_per_sample, NULL,
                                        NULL, NULL};
