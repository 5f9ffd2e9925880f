/* diag_exact.h - the exact diagonal of ggn, fisher_mc, ef and the Hessian by
 * backpropagation (BackPACK's DiagGGNExact, DiagGGNMC, the squared sample
 * gradients of its SumGradSquared, and DiagHessian): one backward
 * walk of the curvature's output factor (engine/part.h cv_part_kron_walk:
 * the C columns of the loss Hessian's square root, the mc_samples gradient
 * samples fisher_mc draws, or the sample gradients), each layer squaring
 * the per-(sample, column) gradients of its parameters (layer.h diag_add),
 * summed over micro-batches and ranks; the Hessian adds, for every
 * elementwise activation a = phi(z), the residual sum_n sum_u phi''(z_nu)
 * dL/da_nu (dz_nu/dtheta)^2 as two more walks (its positive and negative
 * parts) of the unit vectors of z from z down.  Cost: the forward pass and
 * cv_diag_backprop_columns vectors per sample, at any dimension. */
#ifndef CV_DIAG_EXACT_H
#define CV_DIAG_EXACT_H

#include "curv.h"

/* 0 when cv_curv_diag_backprop can compute kind's diagonal on block b of
 * model m: kind is ggn, fisher_mc, ef or hessian (then every layer of the
 * model is Linear, Conv, ConvTranspose2d, BatchNorm (eval), Embedding,
 * pooling, an elementwise activation or a passthrough), and every layer with a tensor in
 * the block has a diag_add kernel and no tensor of the block is used by
 * several layers (tied weights: a sample's gradient would sum over the uses
 * before squaring).  Else -1 with e (CV_EINVAL "unsupported", field
 * "options.method") naming the first layer at fault. */
int cv_diag_backprop_check(const cv_model *m, cv_curvature kind, const cv_block *b, cv_err *e);

/* The vectors per sample the walks of cv_curv_diag_backprop backpropagate
 * (its cost in backward passes, plus the forward pass): C (ggn), mc_samples
 * (fisher_mc), 1 (ef); the Hessian: C plus twice the units of every
 * elementwise activation with a second derivative (not ReLU-like) that a
 * layer of the block leads to (its residual's positive and negative parts). */
long cv_diag_backprop_columns(const cv_model *m, cv_curvature kind, const cv_block *b,
                              int mc_samples);

/* d (b->dim doubles, in the block's vector order) = the exact diagonal of
 * kind on block b, on every rank (collective: every rank calls it).
 * per_sample: d is N x b->dim (N = cv_curv_batch_size, row i = sample i's
 * own term of the sum: the same weight, so the rows sum to the diagonal). */
int cv_curv_diag_backprop(cv_curv *c, cv_curvature kind, const cv_block *b, int per_sample,
                          double *d, cv_err *e);

#endif
