/* kernel_check.h - an oracle for one layer class's kernels, independent of
 * the curvature driver: kc_check takes a cv_layer whose class, attributes,
 * nin and in_shapes[] are set, runs the class's own infer and layout hooks,
 * gives it random parameters and buffers, builds a cv_layer_ctx on n random
 * samples and checks every kernel the class provides:
 *   (a) jvp vs finite differences of forward, input and parameter directions
 *       separately (a fourth-order central stencil on float forwards, in
 *       double);
 *   (b) the adjoint identity <vjp(gy), (rx, v)> = <gy, jvp(rx, v)>;
 *   (c) hvp_extra vs finite differences of vjp with gy fixed, input and
 *       parameter directions separately, and hvp_extra's symmetry
 *       <d2, hvp(d1)> = <d1, hvp(d2)>;
 *   (d) per_sample rows sum to vjp's gtheta (classes with parameters);
 *   (e) quad_extra = <direction, hvp_extra>, vjp_hvp = vjp + hvp_extra,
 *       gram_add = the Gram of the per-sample gradients (each tensor mask);
 *   (f) k = 2 stacked vectors give what k = 1 gives for each;
 *   (g) contracts: vjp/jvp overwrite (their outputs start as NaN),
 *       hvp_extra adds (its outputs start random), NULL inputs equal zero
 *       inputs, NULL outputs are allowed, nothing is written past an output,
 *       the inputs, parameters and buffers are left as they were;
 *   (h) a one-input node of a class with both kernel sets: the single- and
 *       multi-input entry points agree.
 * Multi-input classes are driven through vjp_n/jvp_n/hvp_extra_n when the
 * class sets them, the single-input kernels otherwise.  Inputs flagged
 * constant (masks, token ids) get no direction and are never perturbed.
 *
 * Typical use in a Check test:
 *     cv_layer L;
 *     cv_shape s[2] = {kc_shape(2, 5, 4), kc_shape(1, 4)};
 *     ck_assert_int_eq(kc_layer(&L, "add", 2, s), 0);
 *     KC_ASSERT(&L, NULL);                  // default options
 * or with options:
 *     kc_opts o = kc_defaults();
 *     o.kinks = 1;
 *     o.inputs[1] = mask; o.constant[1] = 1;
 *     KC_ASSERT(&L, &o);
 */
#ifndef CV_KERNEL_CHECK_H
#define CV_KERNEL_CHECK_H

#include <stddef.h>
#include <stdint.h>

#include "engine/layer.h"

typedef struct {
    int n;                     /* samples (default 3) */
    uint64_t seed;             /* random inputs, parameters, directions */
    int kinks;                 /* piecewise-linear (ReLU, max): skip the finite
                                * differences (a), (c); everything else runs */
    double fd_eps;             /* step of the finite differences (default 1e-2;
                                * inputs and directions are ~N(0, 1)) */
    double fd_tol;             /* relative bound for (a), (c) (default 2e-3) */
    double tol;                /* relative bound for (b), (d)-(g) (default 1e-5) */
    double param_scale;        /* random parameters ~ param_scale * N(0, 1) (0.5) */
    /* Optional values, n * in_numel(i) floats each: e.g. token ids, masks,
     * inputs kept away from a pole (div, pow); NULL: N(0, 1). */
    const float *inputs[CV_MAX_NODE_INPUTS];
    int constant[CV_MAX_NODE_INPUTS]; /* 1: no direction, not perturbed */
    const float *params;       /* optional: P floats (state_dict order) */
    const float *buffers;      /* optional: the buffers; default U(0.5, 1.5) */
} kc_opts;

/* The defaults above. */
kc_opts kc_defaults(void);

/* A per-sample shape of rank 1..4 from its dims, e.g. kc_shape(2, T, d). */
cv_shape kc_shape(int rank, ...);

/* cv_layer_init with the class whose name or function name is `name`
 * ("Linear", "add"), nin inputs of per-sample shapes in[0..nin) (in_shape =
 * in[0]; nin 0: no input).  Returns 0, or -1 for an unknown name. */
int kc_layer(cv_layer *L, const char *name, int nin, const cv_shape *in);

/* Sets attribute `field` of L from a number (INT, BOOL, FIXED_BOOL: rounded;
 * ENUM: the index; NUMBER; PAIR: both entries).  Returns 0, or -1 when the
 * class has no such stored field. */
int kc_set(cv_layer *L, const char *field, double value);

/* Runs infer and layout on L (as cv_model_finalize would, tensors placed
 * contiguously from offset 0), then every check above.  Returns 0, or -1
 * with the first failure described in why. */
int kc_check(cv_layer *L, const kc_opts *o, char *why, size_t len);

/* Runs infer and layout on L, then forward on n samples into y (n *
 * out_numel floats): inputs[i] (n * in_numel(i) floats each; NULL or a NULL
 * entry: random), params and buffers (NULL: random as in kc_check).  For
 * checking forward values.  Returns 0, or -1 with why (e.g. infer's error). */
int kc_forward(cv_layer *L, int n, const float *const *inputs, const float *params,
               const float *buffers, float *y, char *why, size_t len);

/* In a Check test: kc_check must pass (o NULL: kc_defaults()). */
#define KC_ASSERT(L, o)                                                                      \
    do {                                                                                     \
        char kc_why_[512];                                                                   \
        int kc_rc_ = kc_check((L), (o), kc_why_, sizeof kc_why_);                            \
        ck_assert_msg(kc_rc_ == 0, "%s: %s", cv_layer_name(L), kc_why_);                     \
    } while (0)

#endif
