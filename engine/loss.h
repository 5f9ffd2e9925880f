/* loss.h - PyTorch's losses on network outputs h [N, C] and their derivatives.
 *
 * Batch loss L = sum_n c * l_n with l_n the per-sample loss summed over the C
 * outputs and c the reduction scale (see cv_loss_scale).  Everything returned
 * here is for the batch loss L (already scaled by c) unless said otherwise.
 */
#ifndef CV_LOSS_H
#define CV_LOSS_H

#include <stddef.h>

#include "dataset.h"
#include "model.h"
#include "rng.h"

/* c: 1 for "sum"; 1/N for CrossEntropyLoss "mean"; 1/(N*C) for MSELoss and
 * BCEWithLogitsLoss "mean" (PyTorch averages over all entries). */
double cv_loss_scale(cv_loss_type t, cv_reduction r, size_t n, int C);

typedef struct {
    cv_loss_type type;
    int n, C;
    double scale;             /* c */
    const float *h;           /* outputs n*C (borrowed) */
    const int64_t *labels;    /* CE */
    const float *targets;     /* MSE, BCE */
    float *prob;              /* softmax (CE) or sigmoid (BCE) of h, n*C */
} cv_loss_state;

/* Evaluates L and dL/dh (n*C floats in gh).  The state keeps what the
 * second-order routines need.  Returns 0, or -1 when out of memory. */
int cv_loss_eval(cv_loss_state *s, const cv_model *m, const cv_batch *b, const float *h,
                 double *loss, float *gh);
void cv_loss_state_free(cv_loss_state *s);

/* Per-sample unscaled output gradient d l_n / dh for the data labels (n*C). */
void cv_loss_sample_grad(const cv_loss_state *s, float *g);

/* out_j = Lambda r_j for k stacked direction blocks r (k*n*C), Lambda the
 * (scaled) loss Hessian w.r.t. h, block-diagonal over samples. */
void cv_loss_hessian_apply(const cv_loss_state *s, int k, const float *r, float *out);

/* Draws mc gradient samples per data point: S (mc*n*C), sample m of data
 * point i at S + (m*n + i)*C, s = d l(h_i, yhat)/dh with yhat ~ p(y | h_i),
 * unscaled, so that E[s s^T] equals Lambda / c. */
void cv_loss_sample_mc(const cv_loss_state *s, cv_rng *rng, int mc, float *S);

/* out_j(i) = w * sum_m S_m(i) (S_m(i) . r_j(i)) for k stacked blocks, i.e.
 * the per-sample outer-product matrix sum_m s s^T scaled by w. */
void cv_loss_outer_apply(const cv_loss_state *s, int mc, const float *S, double w, int k,
                         const float *r, float *out);

/* Symmetric factor of the loss Hessian of sample i: Lambda_i = S_i S_i^T,
 * written as C x C row-major (column c = S_i[:, c]), scaled by sqrt(c). */
void cv_loss_hessian_sqrt(const cv_loss_state *s, int i, double *S);

#endif
