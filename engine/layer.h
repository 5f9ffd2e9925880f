/* layer.h - the per-layer kernels every curvature product is assembled from.
 *
 * Each layer type implements five kernels on a batch of N samples with
 * float32 row-major activations (sample n of x at x + n*in_numel):
 *   forward   y = f(x; theta)
 *   vjp       transposed Jacobian: gx = J_x^T gy, gtheta = J_theta^T gy
 *   jvp       Jacobian: ry = J_x rx + J_theta vtheta
 *   hvp_extra second-order terms of the backward pass (Pearlmutter's R-op),
 *             added to gx / gtheta: R(J_x^T) gy and R(J_theta^T) gy for the
 *             fixed gradient cotangent gy, direction (rx, vtheta)
 *   per_sample parameter gradient of each sample separately
 *   quad_extra the hvp_extra terms dotted with the direction (rx, vtheta),
 *             for quadratic forms v^T H v without a backward pass
 * Kernels take k stacked vectors: sample n of vector j at ptr + (j*N + n)*numel.
 * A NULL input means zero; a NULL output means "not needed".  An output never
 * overlaps an input or the context's x, y and caches (the driver ping-pongs
 * separate buffers); the elementwise kernels rely on it (restrict pointers).
 * Parameter vectors of a layer are all its parameter tensors concatenated in
 * state_dict order (P = numel of weight + bias); theta points at them inside
 * the model's parameter vector.
 */
#ifndef CV_LAYER_H
#define CV_LAYER_H

#include <stddef.h>

#include "err.h"
#include "model.h"

typedef struct {
    const cv_layer *L;
    const float *theta;        /* the layer's parameters (P floats), or NULL */
    const float *buffers;      /* the layer's buffers (BatchNorm statistics), or NULL */
    int n;                     /* batch size */
    size_t in_numel, out_numel, nparam;
    const float *x;            /* forward input, n * in_numel */
    const float *y;            /* forward output, n * out_numel */
    float *d1, *d2;            /* cached first/second derivatives (activations) */
    int *idx;                  /* cached argmax (MaxPool2d) */
    size_t gram_budget;        /* floats a Gram kernel may buffer (0: its default) */
    float *work;               /* scratch owned by the caller, work_floats long */
    size_t work_floats;
} cv_layer_ctx;

typedef struct {
    /* Scratch floats the kernels need for k stacked vectors. */
    size_t (*work_size)(const cv_layer_ctx *c, int k);
    /* Allocates/computes caches (d1, d2, idx) and writes y. */
    int (*forward)(cv_layer_ctx *c, float *y, cv_err *e);
    void (*vjp)(const cv_layer_ctx *c, int k, const float *gy, float *gx, float *gtheta);
    void (*jvp)(const cv_layer_ctx *c, int k, const float *rx, const float *vtheta, float *ry);
    void (*hvp_extra)(const cv_layer_ctx *c, int k, const float *gy, const float *rx,
                      const float *vtheta, float *gx_add, float *gtheta_add);
    /* G: n x nparam, row i = gradient of sample i's contribution. */
    void (*per_sample)(const cv_layer_ctx *c, const float *gy, float *G);
    /* Gram matrix of per-sample parameter gradients (may be NULL for
     * layers without parameters): for k stacked cotangents gy, with row
     * r = j*n + i the gradient of theta produced by gy_j(sample i) alone,
     * G[r, r'] += <grad_r, grad_r'> restricted to the parameter tensors in
     * `mask` (bit t = t-th tensor of the layer).  G is (k*n) x (k*n),
     * row-major, double. */
    void (*gram_add)(const cv_layer_ctx *c, int k, const float *gy, unsigned mask, double *G);
    /* q[j] += rx_j . R(J_x^T) gy + vtheta_j . R(J_theta^T) gy for k
     * directions (the hvp_extra terms dotted with the direction), without
     * forming the terms.  NULL: the driver forms hvp_extra and dots it. */
    void (*quad_extra)(const cv_layer_ctx *c, int k, const float *gy, const float *rx,
                       const float *vtheta, double *q);
    /* vjp of the k cotangents gy, then hvp_extra of the gradient cotangent
     * g0 with the directions (rx, vtheta), in one pass, so that a layer can
     * share work between the two (Conv2d forms one unfolded input cotangent
     * per vector and folds it once).  NULL: the driver calls vjp, then
     * hvp_extra. */
    void (*vjp_hvp)(const cv_layer_ctx *c, int k, const float *gy, const float *g0,
                    const float *rx, const float *vtheta, float *gx, float *gtheta);
} cv_layer_ops;

/* The kernels of a layer type (NULL for unsupported types). */
const cv_layer_ops *cv_layer_ops_for(cv_layer_type t);

/* Release caches allocated by forward (d1, d2, idx). */
void cv_layer_ctx_release(cv_layer_ctx *c);

/* Kernel tables, one per module. */
extern const cv_layer_ops cv_linear_ops;
extern const cv_layer_ops cv_activation_ops;  /* elementwise nonlinearities */
extern const cv_layer_ops cv_passthrough_ops; /* Identity, Flatten, Dropout (eval) */
extern const cv_layer_ops cv_conv2d_ops;
extern const cv_layer_ops cv_maxpool2d_ops;
extern const cv_layer_ops cv_avgpool2d_ops;   /* AvgPool2d and AdaptiveAvgPool2d */
extern const cv_layer_ops cv_batchnorm_ops;

#endif
