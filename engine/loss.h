/* loss.h - PyTorch's losses on network outputs h (C entries per sample, any
 * per-sample shape) and their derivatives.
 *
 * Batch loss L = sum_n c * l_n with l_n the per-sample loss summed over the
 * sample's output entries (MSE, BCE) or target positions (CE, NLL) and c the
 * reduction scale (see cv_loss_scale).  Everything returned here is for the
 * batch loss L (already scaled by c) unless said otherwise.
 *
 * CrossEntropyLoss / NLLLoss on an output of per-sample shape [K, d1, ...]
 * (class_dim 1, PyTorch's layout) or [d1, ..., K] (class_dim -1, classes
 * last): K classes at S = prod(d) positions; the class k of position p is
 * entry k*S + p (class_dim 1) or p*K + k (class_dim -1).  Targets are S class
 * indices per sample (position p of sample n at labels[n*S + p]); a target
 * equal to ignore_index adds nothing (value, gradient, curvature) and is not
 * counted in the mean.  Per counted position, with p = softmax(h_p) over the
 * classes and eps the label smoothing:
 *     l = lse(h_p) - (1 - eps) h_p[y] - eps/K sum_k h_p[k],
 *     dl/dh_p = p - (1 - eps) e_y - eps/K,   d2l/dh_p^2 = diag(p) - p p^T.
 * NLLLoss is computed exactly as CrossEntropyLoss on its input (the input is
 * a log_softmax, so softmax(h) = exp(h) and lse(h) = 0: the same loss of the
 * parameters, hence the same gradient and Hessian; the output Hessian is that
 * of CE before the log_softmax, so the GGN is CE's), without label smoothing.
 */
#ifndef CV_LOSS_H
#define CV_LOSS_H

#include <stddef.h>
#include <stdint.h>

#include "dataset.h"
#include "model.h"
#include "rng.h"

/* 1 for CrossEntropyLoss and NLLLoss (class-index targets). */
int cv_loss_is_class(cv_loss_type t);

/* The output layout of a model's loss.  For CE/NLL: classes K, positions S,
 * the strides of a class and of a position (entry k*cstride + p*pstride), the
 * per-sample target shape (the output shape without its class dimension: []
 * for a flat [K] output), and the resolved loss fields.  For MSE/BCE:
 * classes = C (the output numel), positions = 1, label_shape = output shape.
 * A model whose class_dim is 0 was not built by the architecture parser (a
 * zero-initialized cv_model): it gets PyTorch's defaults, class_dim 1,
 * ignore_index -100, its own label_smoothing. */
typedef struct {
    int classes, positions;
    int cstride, pstride;
    int class_dim;            /* 1 or -1 */
    int64_t ignore_index;
    double label_smoothing;   /* 0 for NLLLoss, MSE, BCE */
    cv_shape out_shape;       /* per-sample network output */
    cv_shape label_shape;     /* per-sample target shape */
} cv_loss_layout;

void cv_loss_layout_of(const cv_model *m, cv_loss_layout *lay);

/* c: 1 for "sum"; for "mean": 1/n for CrossEntropyLoss/NLLLoss with n the
 * number of counted (not ignored) target positions of the batch (0 when there
 * are none: the batch has no loss terms; PyTorch would give NaN), 1/(n*C) for
 * MSELoss and BCEWithLogitsLoss with n samples of C entries (PyTorch averages
 * over all entries). */
double cv_loss_scale(cv_loss_type t, cv_reduction r, size_t n, int C);

typedef struct {
    cv_loss_type type;
    int n, C;                 /* samples, output entries per sample */
    int K, S;                 /* CE/NLL: classes, positions per sample (C = K*S) */
    int cs, ps;               /* CE/NLL: class k of position p is entry k*cs + p*ps */
    int64_t ignore_index;     /* CE/NLL */
    double smoothing;         /* CE: label smoothing eps */
    size_t counted;           /* CE/NLL: positions of the batch not ignored */
    double scale;             /* c */
    const float *h;           /* outputs n*C (borrowed) */
    const int64_t *labels;    /* CE/NLL: n*S (borrowed) */
    const float *targets;     /* MSE, BCE (borrowed) */
    float *prob;              /* softmax over the classes (CE/NLL) or sigmoid (BCE) of h */
} cv_loss_state;

/* Evaluates L and dL/dh (n*C floats in gh, may be NULL).  The state keeps
 * what the second-order routines need.  Returns 0, or -1 when out of memory. */
int cv_loss_eval(cv_loss_state *s, const cv_model *m, const cv_batch *b, const float *h,
                 double *loss, float *gh);
void cv_loss_state_free(cv_loss_state *s);
/* The same with the reduction scale c given (scale >= 0): a micro-batch of a
 * larger batch is scaled as the whole batch (cv_loss_batch_scale of it), so
 * its loss and derivatives are its share of the batch's. */
int cv_loss_eval_scaled(cv_loss_state *s, const cv_model *m, const cv_batch *b,
                        const float *h, double scale, double *loss, float *gh);
/* The reduction scale c of batch b (labels only: counts the ignored targets). */
double cv_loss_batch_scale(const cv_model *m, const cv_batch *b);

/* The unscaled loss l_i of sample i of the state (the reduction's scale c
 * not applied: L = c * sum_i l_i). */
double cv_loss_sample(const cv_loss_state *s, int i);

/* Per-sample unscaled output gradient d l_n / dh for the data labels (n*C). */
void cv_loss_sample_grad(const cv_loss_state *s, float *g);

/* out_j = Lambda r_j for k stacked direction blocks r (k*n*C), Lambda the
 * (scaled) loss Hessian w.r.t. h, block-diagonal over samples (and, for
 * CE/NLL, over target positions; ignored positions give 0). */
void cv_loss_hessian_apply(const cv_loss_state *s, int k, const float *r, float *out);

/* Draws mc gradient samples per data point: S (mc*n*C), sample m of data
 * point i at S + (m*n + i)*C, s = d l(h_i, yhat)/dh with yhat ~ p(y | h_i)
 * (CE/NLL: one class drawn per counted position, independently, s = p - e_yhat
 * there, the negative log-likelihood's gradient also under label smoothing;
 * ignored positions 0), unscaled, so that E[s s^T] equals Lambda / c. */
void cv_loss_sample_mc(const cv_loss_state *s, cv_rng *rng, int mc, float *S);
/* The same with sample i drawn from its own stream (seed, first + i): the
 * draws of a sample do not depend on which micro-batch holds it. */
void cv_loss_sample_mc_at(const cv_loss_state *s, uint64_t seed, size_t first, int mc,
                          float *S);

/* out_j(i) = w * sum_m S_m(i) (S_m(i) . r_j(i)) for k stacked blocks, i.e.
 * the per-sample outer-product matrix sum_m s s^T scaled by w. */
void cv_loss_outer_apply(const cv_loss_state *s, int mc, const float *S, double w, int k,
                         const float *r, float *out);

/* Symmetric factor of the loss Hessian of sample i: Lambda_i = S_i S_i^T,
 * written as C x C row-major (C the output entries per sample; column j =
 * S_i[:, j]), scaled by sqrt(c).  CE/NLL: block-diagonal over positions,
 * zero for ignored ones. */
void cv_loss_hessian_sqrt(const cv_loss_state *s, int i, double *S);

/* Columns of the narrowest factor cv_loss_hessian_factor writes: CE/NLL
 * with K >= 2 classes: C - S (each position's block diag(p) - p p^T has the
 * null vector 1, rank K - 1), otherwise C. */
int cv_loss_factor_columns(const cv_loss_state *s);
/* A factor of sample i's loss Hessian with kf = cv_loss_factor_columns(s)
 * columns, C x kf row-major: F F^T = S_i S_i^T (cv_loss_hessian_sqrt, which
 * it writes into S, C x C scratch, where kf < C), for uses that only sum the
 * columns' outer products or squares (exact diagonals): CE/NLL drop, per
 * position, the direction sqrt(p) of S_i's right null space (S_i sqrt(p) = 0)
 * by a Householder reflection H with H sqrt(p) a multiple of e_k (k the
 * largest p): F = the columns of S_i H but k.  Returns -1 when out of memory. */
int cv_loss_hessian_factor(const cv_loss_state *s, int i, double *S, double *F);

#endif
