/* laplace.h - the Laplace approximation's evidence (issue 23): the log
 * marginal likelihood of a MAP network under a Gaussian prior N(0, P0^-1),
 * P0 = diag(delta_b I) over parameter blocks b, from a curvature that was
 * computed once (a spectrum per block, a dense matrix or k eigenpairs), and
 * its maximization over the prior precisions (and the Gaussian noise sigma).
 * Pure math: no network and no JSON here (api/ops_laplace.c builds the
 * curvature and the result).
 *
 * Conventions (laplace-torch's BaseLaplace / ParametricLaplace):
 *   G      the GGN of the summed negative log-likelihood at unit noise and
 *          temperature (MSE: of (1/2) sum ||y - f||^2, i.e. J^T J);
 *   g      = 1 / (sigma^2 T)   (the "H factor"; sigma = 1 unless gaussian);
 *   P      = g G + P0          (the posterior precision);
 *   log_likelihood = -g nll - [gaussian] N C log(sigma sqrt(2 pi)),
 *          nll the summed NLL at unit noise without normaliser (MSE:
 *          (1/2) sum ||y - f||^2);
 *   log_marginal_likelihood = log_likelihood
 *          - 1/2 (log det P - log det P0) - 1/2 theta^T P0 theta.
 *
 * Representations of G (cv_laplace_kind):
 *   SPECTRA  block-diagonal over the blocks, block b known by its
 *            eigenvalues (vals: m of them, the other dim - m are 0): diag,
 *            kron (the Kronecker products mu_i lambda_j), or one block
 *            (full with one prior precision, lowrank top-k with one);
 *            log det P = sum_b [sum_i log(g v_i + delta_b) + (dim_b - m_b) log delta_b];
 *   DENSE    G dense (dim x dim); log det P by Cholesky (full with one prior
 *            precision per block);
 *   LOWRANK  G = V diag(lam) V^T (k orthonormal columns), kept as the k x k
 *            Gram matrices W_b = V_b^T V_b of V's rows in block b:
 *            log det P = log det P0 + log det(I + S^1/2 (sum_b W_b / delta_b) S^1/2),
 *            S = g diag(lam) clipped at 0 (the matrix determinant lemma,
 *            laplace-torch's LowRankLaplace).
 *
 * Errors: 0, or -1 with *e filled (CV_ENOMEM; CV_EINVAL
 * "not_positive_definite", field "options.prior_precision", when P is not
 * positive definite at the given precisions).
 */
#ifndef CV_LAPLACE_H
#define CV_LAPLACE_H

#include <stddef.h>

#include "err.h"

typedef enum { CV_LAPLACE_SPECTRA = 0, CV_LAPLACE_DENSE, CV_LAPLACE_LOWRANK } cv_laplace_kind;

typedef struct {
    size_t dim;        /* parameters of the block */
    size_t m;          /* SPECTRA: eigenvalues in vals (<= dim; the rest are 0) */
    double *vals;      /* SPECTRA: the block's eigenvalues of G (owned, malloc'd) */
    double sq_norm;    /* ||theta_b||^2 */
} cv_laplace_block;

typedef struct {
    cv_laplace_kind kind;
    int nblocks;
    cv_laplace_block *blocks; /* nblocks (owned) */
    size_t dim;               /* sum of the blocks' dims */
    /* DENSE: G (dim x dim, column-major, owned) and the block of each coordinate. */
    double *G;
    int *owner;
    /* LOWRANK: k eigenvalues of G and the nblocks Gram matrices W_b (k x k each, owned). */
    int k;
    double *lam, *W;
    /* The likelihood. */
    double nll;               /* see above */
    int gaussian;             /* sigma enters (MSE) */
    double n_outputs;         /* N C (the Gaussian normaliser) */
} cv_laplace;

/* Zeroes L and allocates nblocks zeroed blocks. */
int cv_laplace_init(cv_laplace *L, cv_laplace_kind kind, int nblocks, cv_err *e);
void cv_laplace_free(cv_laplace *L);

typedef struct {
    double log_marginal_likelihood, log_likelihood;
    double log_det_posterior_precision, log_det_prior_precision;
    double scatter;           /* theta^T P0 theta */
} cv_laplace_terms;

/* The terms at prior precisions delta (nblocks, > 0), sigma (> 0; ignored
 * unless gaussian) and temperature T (> 0).  block_logdet (nblocks doubles,
 * may be NULL) gets each block's share of log det P (SPECTRA only; NaN
 * otherwise). */
int cv_laplace_eval(const cv_laplace *L, const double *delta, double sigma, double temperature,
                    cv_laplace_terms *t, double *block_logdet, cv_err *e);

/* Search ranges of the optimization (in log space). */
#define CV_LAPLACE_DELTA_MIN 1e-10
#define CV_LAPLACE_DELTA_MAX 1e10
#define CV_LAPLACE_SIGMA_MIN 1e-6
#define CV_LAPLACE_SIGMA_MAX 1e6
/* DENSE with fewer blocks than this optimizes by Newton steps (below). */
#define CV_LAPLACE_MAX_NEWTON 257

/* Maximizes the log marginal likelihood over log delta (opt_prior: one
 * common value when per_block is 0, one per block otherwise) and log sigma
 * (opt_sigma, gaussian only), each in the ranges above, by coordinate ascent
 * with a golden-section search per coordinate (the evidence is concave in
 * the log delta's - log det(G + sum_b delta_b E_b) is a log-sum-exp in
 * them - and in log sigma; SPECTRA, separable: Newton's method on the
 * root of the derivative in each log delta, safeguarded by bisection;
 * DENSE (one delta per block, fewer than CV_LAPLACE_MAX_NEWTON blocks):
 * Newton steps in all the log delta's and log sigma at once, gradient and
 * Hessian from P^-1, with a backtracking line search), sweeping until a
 * sweep gains less than 1e-12 (1 + |evidence|) or after 100 sweeps.  delta and *sigma hold the
 * start (for the coordinates not optimized, the value used) and get the
 * optimum; *evals (may be NULL) the evaluations made.  P must be positive
 * definite somewhere in the range (points where it is not count as -inf). */
int cv_laplace_optimize(const cv_laplace *L, double *delta, int per_block, int opt_prior,
                        double *sigma, int opt_sigma, double temperature, int *evals,
                        cv_err *e);

#endif
