/* op_kron.h - the Kronecker-factored curvatures (kfac, kflr, kfra, ekfac;
 * issue 22) as the ops see them: the factors of the job's batch, computed
 * once per job (engine/kron.h), and for every block of the job a
 * block-diagonal operator (engine/kronop.h cv_kron_diag) whose slots are
 * the layers the block holds:
 *   - a Kronecker slot for a layer with a Kronecker structure (Linear,
 *     Conv1d/2d), P (B (x) A) P^T on its [weight, bias]; a block holding
 *     only the weight (or only the bias) of such a layer gets the principal
 *     sub-block of that, again a Kronecker product: B (x) A[:in, :in]
 *     (B (x) A[in, in]) - block_kinds says "kronecker" with its dim_a;
 *   - an exact slot (the matching exact curvature ggn / fisher_mc / ef on
 *     the layer's tensors in the block) for the other layers.
 * The cross-layer blocks are zero (the approximation is block-diagonal over
 * layers).  ops reach the forward operator through cv_op_linop (op_util.c);
 * the estimator ops take the exact paths below when every slot of the block
 * is a Kronecker slot. */
#ifndef CV_OP_KRON_H
#define CV_OP_KRON_H

#include <cJSON.h>

#include "api/ops.h"
#include "engine/estimators.h"
#include "engine/kron.h"
#include "engine/kronop.h"

/* Submit-time: options fisher_type / kfac_approx only with a Kronecker
 * curvature (400 invalid_option), kflr only with fisher_type type-2, and
 * the curvatures not available in this build (400 invalid_curvature). */
int cv_op_kron_check(const cv_opts *o, cv_curvature kind, cv_err *e);

/* The job's memory plan (cv_op_memory_fn): for a Kronecker curvature kind
 * (newton acp: kind kfac with an ACP flag) sets m->factor_bytes from m->kron:
 * the factors A and B (sum dim_a^2 + dim_b^2 doubles), with
 * CV_OP_KRON_MEM_EIGEN their eigendecompositions (another dim_a^2 + dim_b^2,
 * plus the eigenvalues: the exact paths of eigen, density, solve, newton,
 * logdet), for ekfac its values (dim_a dim_b per layer) and its eigenbasis in
 * any case; and raises m->max_vectors to the vectors per sample the factors'
 * backward walk takes at a time (C for type-2 / kflr, mc_samples for mc, 1 for
 * empirical and ACP's "max", none for kfra and a given ACP alpha; at most 32:
 * the walk's chunks, whose cotangents the workspace holds).  fisher_type:
 * cv_kron_fisher.  Other curvatures: nothing. */
enum { CV_OP_KRON_MEM_EIGEN = 1, CV_OP_KRON_MEM_ACP_MAX = 2, CV_OP_KRON_MEM_ACP_GIVEN = 4 };
void cv_op_kron_memory(cv_curvature kind, int fisher_type, int mc_samples, int C, int flags,
                       cv_op_memory *m);

/* The exact curvature the engine is built for: kind itself, or for a
 * Kronecker curvature the one its fisher_type matches (ggn, fisher_mc, ef). */
cv_curvature cv_op_kron_engine_kind(cv_curvature kind, const cv_op_base *b);

/* Computes the factors of c->curv and the operators of blocks[0..n); sets
 * c->kron.  0, or -1 with e filled (c->kron stays NULL). */
int cv_op_kron_new(cv_op_ctx *c, const cv_block *blocks, int n, cv_err *e);
void cv_op_kron_free(cv_op_ctx *c);

/* Newton method acp (George's amortized covariance preconditioner): the
 * factors are KFAC's A with B = alpha I (engine/kron.h options acp; alpha
 * from the option acp_alpha, a number or "max").  cv_op_kron_is_acp: the
 * job is one; cv_op_kron_acp_alphas adds "acp_alpha", [{name, alpha}] for
 * the Kronecker slots of block b, to out. */
int cv_op_kron_is_acp(const cv_op_ctx *c);
void cv_op_kron_acp_alphas(const cv_op_ctx *c, const cv_block *b, cJSON *out);

/* The factors (borrowed), NULL without a Kronecker curvature. */
const cv_kron *cv_op_kron_factors(const cv_op_ctx *c);

/* The forward operator of block b (one of the job's blocks; progress is
 * c->progress).  A block that is not one of the job's gets an operator
 * whose apply fails (internal). */
void cv_op_kron_linop(cv_op_ctx *c, const cv_block *b, cv_linop *op);

/* Adds "block_kinds" (one entry per layer slot of block b) to out. */
void cv_op_kron_block_kinds(const cv_op_ctx *c, const cv_block *b, cJSON *out);

/* Exact paths: each returns 1 when it answered (fields added to out,
 * "exact": true), 0 when it does not apply (not a Kronecker curvature, or a
 * slot of the block is exact; the op's estimator runs), -1 on error. */
int cv_op_kron_trace(cv_op_ctx *c, const cv_block *b, cJSON *out, cv_err *e);
int cv_op_kron_diag(cv_op_ctx *c, const cv_block *b, cJSON *out, cv_err *e);
int cv_op_kron_eigen(cv_op_ctx *c, const cv_block *b, const cv_eigen_options *o, cJSON *out,
                     cv_err *e);
int cv_op_kron_density(cv_op_ctx *c, const cv_block *b, const cv_density_options *o,
                       cJSON *out, cv_err *e);
/* (M + damping I) x = rhs by the exact damped inverse; 0 also when
 * M + damping I is not positive definite (the iterative method runs). */
int cv_op_kron_solve(cv_op_ctx *c, const cv_block *b, const double *rhs, double damping,
                     cJSON *out, cv_err *e);

/* The Kronecker Newton step s = -(M + damping I)^-1 g on block b (newton
 * kfac/ekfac/kfra), slot by slot: a Kronecker slot by the exact damped
 * inverse through the factors' eigenbases (factored = 0) or by the factored
 * damping (A + w sqrt(damping) I) (x) (B + sqrt(damping)/w I) of its own
 * factors (factored = 1; refused for ekfac values), an exact slot by
 * so->method (CG/MINRES, tol, max_iter) on its exact curvature plus damping.
 * *iterations / *converged / *exact: the exact slots' solver iterations
 * (summed), whether all converged, and whether every slot was Kronecker.
 * *sms (may be NULL): s^T M s with M the block's undamped operator (the
 * forward operator of cv_op_kron_linop), from the Kronecker slots' eigen
 * coordinates and one product per exact slot. */
int cv_op_kron_newton(cv_op_ctx *c, const cv_block *b, const double *g, double damping,
                      int factored, const cv_solve_options *so, double *s, int *iterations,
                      int *converged, int *exact, double *sms, cv_err *e);

#endif
