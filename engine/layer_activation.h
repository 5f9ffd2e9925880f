/* layer_activation.h - elementwise nonlinearities: the attributes and layer
 * classes of ReLU, Tanh, Sigmoid, LeakyReLU, ELU, GELU, Softplus, Mish and
 * Hardswish, and the shared kernels any other activation's class can use
 * (e.g. layer_silu.c): give the class ops = &cv_activation_ops and impl = a cv_activation whose
 * forward CV_ACTIVATION_FORWARD generates from phi. */
#ifndef CV_LAYER_ACTIVATION_H
#define CV_LAYER_ACTIVATION_H

#include "layer.h"

CV_LAYER_ATTRS(cv_leakyrelu_attr, {
    double negative_slope;
});

CV_LAYER_ATTRS(cv_elu_attr, {
    double alpha;
});

CV_LAYER_ATTRS(cv_gelu_attr, {
    int approximate; /* 0 "none" (erf), 1 "tanh" */
});

CV_LAYER_ATTRS(cv_softplus_attr, {
    double beta, threshold;
});

extern const cv_layer_class cv_relu_class;
extern const cv_layer_class cv_tanh_class;
extern const cv_layer_class cv_sigmoid_class;
extern const cv_layer_class cv_leakyrelu_class;
extern const cv_layer_class cv_elu_class;
extern const cv_layer_class cv_gelu_class;
extern const cv_layer_class cv_softplus_class;
extern const cv_layer_class cv_mish_class;
extern const cv_layer_class cv_hardswish_class;

/* phi(x), phi'(x), phi''(x) */
typedef struct {
    double f, d1, d2;
} cv_act_val;

/* An activation class's impl. */
typedef struct {
    /* y = phi(x), c->d1 = phi'(x) and (unless piecewise_linear) c->d2 =
     * phi''(x) for entries [lo, hi) of the forward input c->x */
    void (*forward)(const cv_layer_ctx *c, float *y, size_t lo, size_t hi);
    int piecewise_linear; /* phi'' = 0 almost everywhere: no d2 cache */
} cv_activation;

/* The elementwise kernels: forward through the class's cv_activation, the
 * products from the cached phi' and phi''. */
extern const cv_layer_ops cv_activation_ops;

/* Defines `static void name(...)`, a cv_activation forward evaluating
 * `cv_act_val PHI(const cv_layer *L, double x)` (static inline, so each
 * activation gets its own loop with phi inlined). */
#define CV_ACTIVATION_FORWARD(name, PHI)                                            \
    static void name(const cv_layer_ctx *c, float *y, size_t lo, size_t hi)        \
    {                                                                               \
        for (size_t i = lo; i < hi; i++) {                                          \
            cv_act_val v = PHI(c->L, c->x[i]);                                      \
            y[i] = (float)v.f;                                                      \
            c->d1[i] = (float)v.d1;                                                 \
            c->d2[i] = (float)v.d2;                                                 \
        }                                                                           \
    }

#endif
