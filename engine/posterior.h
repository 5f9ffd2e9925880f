/* posterior.h - a Laplace posterior N(theta, P^-1) over a parameter block in
 * one of the structures of issue 23 (full, diag, Kronecker blocks, low rank),
 * held in the form the predictive and the posterior samples need: P's
 * Cholesky factor, its diagonal, per-block Kronecker eigenbases (exact
 * damping) or dense Cholesky factors, or the Woodbury form of a low-rank P.
 * Pure math: no network (api/ops_predict.c builds the curvature).
 *
 * The two operations:
 *   whiten:  for k vectors X (dim x k), W (dim x k) and, for LOWRANK only,
 *            Wm (rank x k) such that X^T P^-1 X = W^T W - Wm^T Wm;
 *   sample:  for z (dim), R z with R R^T = P^-1 (not LOWRANK), so that
 *            theta + R z ~ N(theta, P^-1) for z ~ N(0, I).
 *
 * Not thread-safe: whiten and sample use the posterior's scratch.
 *
 * Errors: 0, or -1 with *e filled (CV_ENOMEM; CV_EINVAL
 * "not_positive_definite", field "options.prior_precision", when P is not
 * positive definite at the given precisions).
 */
#ifndef CV_POSTERIOR_H
#define CV_POSTERIOR_H

#include <stddef.h>

#include "err.h"
#include "kronop.h"

typedef enum { CV_POST_DENSE = 0, CV_POST_DIAG, CV_POST_BLOCKS, CV_POST_LOWRANK } cv_post_kind;

/* One diagonal block of a BLOCKS posterior: a Kronecker block with the
 * precision's eigenvalues in its eigen coordinates, or a dense block's
 * Cholesky factor. */
typedef struct {
    size_t dim;
    size_t *idx;           /* its coordinates in the posterior's vector (owned) */
    int contiguous;        /* idx is idx[0], idx[0] + 1, ... */
    cv_kron_block kron;    /* is_kron: the layer's factors (owns them) */
    int is_kron;
    double *s;             /* is_kron: P's eigenvalues^-1/2 in eigen coordinates (dim) */
    double *L;             /* dense: lower Cholesky factor of P's block (dim x dim) */
} cv_post_slot;

typedef struct {
    cv_post_kind kind;
    size_t dim;
    double *L;             /* DENSE: lower Cholesky factor of P (dim x dim, column-major) */
    double *p;             /* DIAG: P's diagonal; LOWRANK: P0's */
    int nslots;            /* BLOCKS */
    cv_post_slot *slots;
    int k;                 /* LOWRANK: P = V S V^T + P0 with k columns; */
    double *U;             /* U = P0^-1 V S^1/2 (dim x k) */
    double *M;             /* lower Cholesky factor of I + S^1/2 V^T P0^-1 V S^1/2 (k x k) */
    double *work;          /* BLOCKS: scratch of whiten / sample (owned) */
} cv_posterior;

/* DENSE: P = g G + diag(p0) (G: dim x dim column-major, symmetric; taken:
 * it is overwritten and freed with the posterior, also on failure). */
int cv_posterior_dense(cv_posterior *P, size_t dim, double *G, double g, const double *p0,
                       cv_err *e);
/* DIAG: P = g diag(d) + diag(p0). */
int cv_posterior_diag(cv_posterior *P, size_t dim, const double *d, double g, const double *p0,
                      cv_err *e);
/* BLOCKS: nslots zeroed slots over dim coordinates, then each slot set once. */
int cv_posterior_blocks(cv_posterior *P, size_t dim, int nslots, cv_err *e);
/* Slot i: the Kronecker block kb (moved in: P owns it; its factors must be
 * owned, take_ownership) with P_i = g kb's M + delta I, on coordinates idx
 * (copied, kb->dim of them). */
int cv_posterior_slot_kron(cv_posterior *P, int i, const size_t *idx, cv_kron_block *kb,
                           double g, double delta, cv_err *e);
/* Slot i: P_i = g G + delta I (G: dim x dim, taken as above). */
int cv_posterior_slot_dense(cv_posterior *P, int i, const size_t *idx, size_t dim, double *G,
                            double g, double delta, cv_err *e);
/* LOWRANK: P = V diag(g lam) V^T + diag(p0), V dim x k orthonormal columns
 * (g lam clipped at 0, as engine/laplace.h). */
int cv_posterior_lowrank(cv_posterior *P, size_t dim, int k, const double *V, const double *lam,
                         double g, const double *p0, cv_err *e);
void cv_posterior_free(cv_posterior *P);

/* Rows of Wm (0 unless LOWRANK: k). */
int cv_posterior_minus_rank(const cv_posterior *P);
/* See above; Wm may be NULL when cv_posterior_minus_rank is 0. */
int cv_posterior_whiten(cv_posterior *P, int k, const double *X, double *W, double *Wm,
                        cv_err *e);
/* out = R z (dim); refused for LOWRANK (CV_EINVAL "invalid_option", field
 * "options.return_posterior_samples"). */
int cv_posterior_sample(cv_posterior *P, const double *z, double *out, cv_err *e);

#endif
