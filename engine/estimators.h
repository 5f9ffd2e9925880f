/* estimators.h - matrix-free numerical estimators over a symmetric operator.
 *
 * The estimators see a curvature matrix A only as a cv_linop (n, and
 * Y = A X on n x k column-major blocks), so the same code serves the Hessian,
 * GGN, Fisher, a Kronecker factor or a dense test matrix.
 *
 *   trace    Hutchinson (PyHessian stopping rule), Hutch++        trace.c
 *            XTrace                                               xtrace.c
 *   diag     Hutchinson diagonal, exact diagonal (identity columns) diag.c
 *            XDiag                                                xtrace.c
 *   eigen    Lanczos (full reorthogonalization) top/bottom/|.|-k  lanczos.c
 *            block Lanczos (p vectors per product)                lanczos_block.c
 *            power iteration with deflation (PyHessian)           power.c
 *   density  stochastic Lanczos quadrature (PyHessian density)    slq.c
 *   solve    CG, MINRES on (A + damping I) x = b                  solve.c
 *   newton   s = -(A + damping I)^-1 g and its predicted change   newton.c
 *
 * Conventions shared by every function below:
 *  - Products: every product goes through cv_linop_apply(), which checks the
 *    job's cancel flag and deadline before each apply (the estimator then
 *    fails with CV_ECANCELLED / CV_ETIMEOUT) and counts one matvec per
 *    column in op->progress.  Each estimator first announces its planned
 *    matvecs with cv_progress_plan() (an upper bound: early stops leave
 *    done < planned).  A result's `matvecs` is exactly what the call added
 *    to op->progress->done.
 *  - Randomness: only from the caller's cv_rng (seed it from the job seed),
 *    drawn in a fixed order, so a fixed seed gives the same numbers; the
 *    numbers do not depend on `block` (probes per apply).
 *  - Options: fill with cv_X_options_default() and override; passing NULL
 *    options means the defaults.  Bad options fail with CV_EINVAL and
 *    e->field set to the job document's path of the option
 *    ("options.max_probes", "options.k", ...), as the job validation does.
 *  - Results: each function zeroes *out first.  It returns 0 on success
 *    (free with cv_X_result_free), or -1 with *e filled and nothing left to
 *    free.  Allocation failures give CV_ENOMEM.  n must be in [1, INT_MAX].
 *  - Memory: "vectors" below means n doubles each.  `block` columns cost two
 *    n x block buffers; block = 0 picks min(16, max(1, 2^24 / n)) columns
 *    (at most ~256 MiB for the two buffers).
 *  - All math in double; dense work in BLAS (OpenBLAS) and LAPACKE.
 */
#ifndef CV_ESTIMATORS_H
#define CV_ESTIMATORS_H

#include <stddef.h>

#include "err.h"
#include "linop.h"
#include "rng.h"

/* ------------------------------------------------------------------ probes */

typedef enum { CV_PROBE_RADEMACHER = 0, CV_PROBE_GAUSSIAN } cv_probe_dist;

/* "rademacher" | "gaussian" -> cv_probe_dist, -1 if unknown. */
int cv_probe_dist_from_name(const char *name);
const char *cv_probe_dist_name(cv_probe_dist d);

/* ------------------------------------------------------------------- trace */

typedef struct {
    int max_probes;         /* >= 1 (default 100); Hutch++: the matvec budget, >= 3 */
    double tol;             /* Hutchinson: default 1e-3; <= 0: use all max_probes.
                               Not used by Hutch++ (always spends its budget). */
    cv_probe_dist distribution; /* default rademacher */
    int block;              /* probes per apply, 0 = auto (see above) */
    int return_samples;     /* non-zero: fill samples */
} cv_trace_options;

typedef struct {
    double trace;           /* estimate of tr(A) */
    double std_err;         /* sample std (ddof 1) / sqrt(probes); 0 if probes < 2 */
    int probes;             /* Hutchinson probes used */
    int sketch;             /* Hutch++: columns of the sketch Q (0 for Hutchinson) */
    long matvecs;           /* includes computed-but-discarded probes (see below) */
    double *samples;        /* `probes` per-probe estimates (mean = trace), or NULL */
} cv_trace_result;

void cv_trace_options_default(cv_trace_options *o);
void cv_trace_result_free(cv_trace_result *r);

/* Hutchinson: tr(A) ~ mean_s v_s^T A v_s.  Stopping rule of PyHessian's
 * trace(): after each probe, with m_S the mean of the first S samples and
 * m_0 = 0, stop when |m_S - m_{S-1}| / (|m_{S-1}| + 1e-6) < tol.  The rule is
 * evaluated probe by probe, so the result equals the sequential one for any
 * `block`; probes of the last block beyond the stop are computed (counted in
 * matvecs, at most block-1 of them) but discarded.  Memory: 2*block vectors. */
int cv_trace_hutchinson(const cv_linop *op, const cv_trace_options *opt, cv_rng *rng,
                        cv_trace_result *out, cv_err *e);

/* Hutch++ (Meyer, Musco, Musco, Woodruff 2021) with budget m = max_probes
 * matvecs: s = m/3 sketch columns S (capped at n), Q = orth(A S) (Householder
 * QR: dgeqrf/dorgqr), tr(Q^T A Q) exactly (s matvecs), plus Hutchinson with
 * p = m - 2s probes on (I - QQ^T) A (I - QQ^T) (skipped when s = n).  There
 * is no stopping rule (opt->tol is ignored): all m matvecs are spent, as in
 * curvlinops (a rule on the running total would see the exact tr(Q^T A Q)
 * dominate and stop after a couple of probes).  probes = p; samples are
 * per-probe totals tr(Q^T A Q) + g^T P A P g and std_err is the residual
 * samples' (the exact part adds no variance).  Memory: 2*s + 2*block vectors. */
int cv_trace_hutchpp(const cv_linop *op, const cv_trace_options *opt, cv_rng *rng,
                     cv_trace_result *out, cv_err *e);

/* XTrace (Epperly, Tropp, Webber 2024; engine/xtrace.c) with budget m =
 * max_probes (>= 4) matvecs: q = m/2 test vectors W (capped at n), Y = A W,
 * Q R = Y, Z = A Q; the q exchangeable estimates
 *   t_i = tr(Q_i^T A Q_i) + w_i^T (I - Q_i Q_i^T) A (I - Q_i Q_i^T) w_i,
 * Q_i an orthonormal basis of Y without column i (Q_i Q_i^T = Q (I - s_i
 * s_i^T) Q^T, s_i the unit columns of R^-T); trace = mean t_i, std_err = their
 * sample std (ddof 1) / sqrt(q) (the paper's error estimate); samples = t;
 * probes = q; sketch = q.  When A's rank r is below q - 1, every Q_i spans
 * A's range and each t_i is tr(A) up to the products' rounding (std_err
 * near 0).  When A W is singular to working precision (singular values of R
 * below 1e-10 of the largest: exact zeros, e.g. A = 0 or exactly low-rank
 * double operators, not the float32 rounding of network products), the
 * answer is tr(Q_r^T A Q_r) on Y's r leading left singular vectors (std_err
 * 0, sketch = r, q + r matvecs).  tol is not used (the whole budget is
 * spent).  Memory: 5q vectors. */
int cv_trace_xtrace(const cv_linop *op, const cv_trace_options *opt, cv_rng *rng,
                    cv_trace_result *out, cv_err *e);

/* XNysTrace (Epperly, Tropp, Webber 2024; engine/xtrace.c) for a positive
 * semi-definite A: tr(A^power) (power 1: the trace; 2: the squared
 * Frobenius norm, A^2 being PSD for any symmetric A) from q = max_probes /
 * power test vectors W (capped at n) and Y = A^power W, q * power matvecs:
 * the Nystrom approximation from W without w_i plus Hutchinson on its
 * residual with w_i, t_i = tr(K G) - (K G K)_ii / K_ii + 1 / K_ii with
 * H = W^T Y, G = Y^T Y, K = H^-1, on A^power + nu I (nu = 1e-6 ||Y||_F /
 * sqrt(q), above the float32 rounding of the products; nu n is subtracted
 * again).  trace = mean t_i, std_err their standard error, samples the t_i,
 * probes = q.  An indefinite W^T A W (A not PSD, power 1): CV_EINVAL
 * "not_positive_definite".  Memory: 3q vectors (power 2) + 3 q x q. */
int cv_trace_xnystrace(const cv_linop *op, const cv_trace_options *opt, int power,
                       cv_rng *rng, cv_trace_result *out, cv_err *e);

/* Squared Frobenius norm ||A||_F^2 = tr(A^2) by Hutchinson: samples
 * ||A v||^2 (one matvec each), PyHessian's stopping rule on opt->tol as
 * cv_trace_hutchinson; the result as a trace result (trace = the estimate of
 * ||A||_F^2).  Memory: 2*block vectors. */
int cv_frobenius_hutchinson(const cv_linop *op, const cv_trace_options *opt, cv_rng *rng,
                            cv_trace_result *out, cv_err *e);

/* -------------------------------------------------------------------- diag */

typedef struct {
    int max_probes;         /* Hutchinson probes, >= 1 (default 100) */
    cv_probe_dist distribution; /* default rademacher */
    int block;              /* probes (or identity columns) per apply, 0 = auto */
} cv_diag_options;

typedef struct {
    size_t n;
    double *diag;           /* n */
    double *std_err;        /* n: per-entry sample std (ddof 1) / sqrt(probes); 0 for exact */
    int probes;             /* Hutchinson probes (0 for exact) */
    long matvecs;
} cv_diag_result;

void cv_diag_options_default(cv_diag_options *o);
void cv_diag_result_free(cv_diag_result *r);

/* diag(A) ~ mean_s (A v_s) .* v_s over max_probes probes (no early stop).
 * Exact for Rademacher probes on a diagonal A.  Memory: 2*block + 2 vectors. */
int cv_diag_hutchinson(const cv_linop *op, const cv_diag_options *opt, cv_rng *rng,
                       cv_diag_result *out, cv_err *e);

/* XDiag (Epperly, Tropp, Webber 2024; engine/xtrace.c): the sketch of
 * cv_trace_xtrace (q = max_probes/2 >= 2 test vectors, 2q matvecs) and the
 * q exchangeable estimates diag(Q_i Q_i^T A) + w_i .* (I - Q_i Q_i^T) A w_i
 * ./ w_i.^2 (A symmetric: Q^T A = (A Q)^T); diag = their mean, std_err per
 * entry their std (ddof 1) / sqrt(q); probes = q.  Rademacher probes only
 * (CV_EINVAL for Gaussian: w .* A w ./ w.^2 has no mean then).  Near-exact
 * for a rank below q - 1, exact for a singular A W, as for XTrace.  Memory:
 * 7q vectors. */
int cv_diag_xdiag(const cv_linop *op, const cv_diag_options *opt, cv_rng *rng,
                  cv_diag_result *out, cv_err *e);

/* Exact diagonal: A applied to identity columns, block at a time: n matvecs.
 * Only `block` is used from opt.  Memory: 2*block + 2 vectors. */
int cv_diag_exact(const cv_linop *op, const cv_diag_options *opt, cv_diag_result *out,
                  cv_err *e);

/* ----------------------------------------------------------------- Lanczos */

typedef struct {
    int steps;              /* Lanczos steps m >= 1 (default 100); capped at n */
    int keep_basis;         /* non-zero: return the n x steps basis */
    /* Non-zero: partial reorthogonalization (Simon's omega recurrence) from
     * n >= 2^16 on, where the basis is kept in float32 (below, it is
     * ignored: full reorthogonalization in double): reorthogonalize only on
     * the steps where the estimated loss of orthogonality reaches
     * sqrt(FLT_EPSILON), and the step after, keeping the basis
     * semi-orthogonal; T then equals the projection of A on the Krylov
     * space to float32 precision.  For spectra (SLQ), not vectors. */
    int partial_reorth;
} cv_lanczos_options;

typedef struct {
    size_t n;
    int steps;              /* steps done = min(asked, n) */
    /* T = tridiag(beta[0..steps-2], alpha, beta[0..steps-2]) = V^T A V and
     * A V = V T + beta[steps-1] r e_m^T (r a unit vector orthogonal to V).
     * beta[i] = 0 marks an invariant subspace after step i, where the next
     * vector was a random one orthogonal to the basis (`restarts`). */
    double *alpha;          /* steps */
    double *beta;           /* steps */
    double *basis;          /* n x steps orthonormal columns, or NULL */
    int restarts;
    long matvecs;           /* = steps */
    int reorths;            /* steps that reorthogonalized against the basis */
} cv_lanczos_result;

void cv_lanczos_options_default(cv_lanczos_options *o);
void cv_lanczos_result_free(cv_lanczos_result *r);

/* m steps of Lanczos from v0 (normalized here; NULL: a Rademacher vector
 * from rng) with full reorthogonalization (classical Gram-Schmidt, twice,
 * against all previous Lanczos vectors) or partial (opt->partial_reorth).
 * rng also draws restart vectors (may be NULL if v0 is given; a needed
 * restart then ends the run early).  Memory: steps + 1 vectors (the basis
 * is kept for reorthogonalization); from n >= 2^16 without keep_basis, the
 * basis is kept in float32 only: about steps/2 + 4 vectors. */
int cv_lanczos(const cv_linop *op, const double *v0, const cv_lanczos_options *opt,
               cv_rng *rng, cv_lanczos_result *out, cv_err *e);

/* ------------------------------------------------------------------- eigen */

typedef enum {
    CV_WHICH_LARGEST = 0,   /* algebraic; sorted descending */
    CV_WHICH_SMALLEST,      /* algebraic; sorted ascending */
    CV_WHICH_MAGNITUDE      /* largest |lambda|; sorted by descending |lambda| */
} cv_which;

/* "largest" | "smallest" | "magnitude" -> cv_which, -1 if unknown. */
int cv_which_from_name(const char *name);
const char *cv_which_name(cv_which w);

typedef struct {
    int k;                  /* eigenpairs, 1 <= k <= n (default 1) */
    cv_which which;         /* default largest */
    int max_iter;           /* Lanczos: steps (0 = min(n, max(100, 10k)); always capped
                               at n; >= k).  Power: iterations per eigenpair (0 = 100). */
    double tol;             /* Lanczos default 1e-6, power default 1e-3 (see below) */
    int return_vectors;     /* non-zero: fill eigenvectors */
} cv_eigen_options;

typedef struct {
    size_t n;
    int k;
    double *eigenvalues;    /* k, sorted as `which` asks */
    double *residuals;      /* k: ||A x_i - lambda_i x_i|| (Lanczos: |beta_m s_{m,i}|) */
    double *eigenvectors;   /* n x k orthonormal columns, or NULL */
    int iterations;         /* Lanczos steps / total power iterations */
    int converged;          /* how many of the k met tol */
    long matvecs;
} cv_eigen_result;

void cv_eigen_options_default(cv_eigen_options *o);   /* Lanczos defaults */

/* Block Lanczos (engine/lanczos_block.c): p = block vectors per product
 * (capped at n) from a Rademacher start block, full reorthogonalization of
 * every block against the basis (block Gram-Schmidt, twice), Rayleigh-Ritz
 * on the block tridiagonal T after every block; the k wanted pairs converge
 * by cv_eigen_lanczos's rule, their residuals ||R_j s_i|| from the next
 * block's coefficients (or formed explicitly, k more matvecs, when the basis
 * cannot grow by another whole block: it holds floor(n / p) p columns).
 * max_iter counts basis vectors (default max(100, 10k), at least k, at most
 * n), rounded up to whole blocks.  An invariant subspace (a rank-
 * deficient GGN) restarts the lost columns with random vectors orthogonal to
 * the basis.  iterations = blocks.  Memory: max_iter + 2p vectors (+ 2k for
 * the explicit residuals). */
int cv_eigen_block_lanczos(const cv_linop *op, const cv_eigen_options *opt, int block,
                           cv_rng *rng, cv_eigen_result *out, cv_err *e);
void cv_power_options_default(cv_eigen_options *o);   /* PyHessian: 100 iter, tol 1e-3 */
void cv_eigen_result_free(cv_eigen_result *r);

/* Lanczos with full reorthogonalization from a Rademacher start vector drawn
 * from rng.  Runs until the k wanted Ritz pairs (by `which`) have residual
 * |beta_m s_{m,i}| <= tol * max(|theta_i|, 1e-6 max_j |theta_j|) (or below
 * 1e3 eps ||T||, where nothing better is possible), or max_iter steps.
 * Ritz values from LAPACK dstev on T, checked every step up to 64 steps and
 * every ~m/32 steps after.  An invariant subspace (beta ~ 0, e.g. a
 * low-rank GGN or repeated eigenvalues) restarts with a random vector
 * orthogonal to the basis; each such Krylov block sees one more copy of
 * every multiple eigenvalue, so after a restart the result is final only
 * once the current block is invariant too and adds no wanted value beyond
 * the earlier blocks' (e.g. {5,5,5,3,0,...}, k = 3 gives 5,5,5).  Without
 * invariant subspaces a single-vector Krylov method can still miss copies
 * of an exactly multiple eigenvalue (rounding usually brings them in).
 * Not converging within max_iter is not an error: check `converged` and
 * `residuals`.  Progress: the partial estimate is the leading wanted Ritz
 * value with std_err 0 (a Ritz residual is no standard error).
 * Memory: about max_iter + 1 vectors (the basis grows as needed) + k for
 * vectors; without return_vectors and from n >= 2^16, the basis is kept in
 * float32 only (about max_iter/2 + 4 vectors). */
int cv_eigen_lanczos(const cv_linop *op, const cv_eigen_options *opt, cv_rng *rng,
                     cv_eigen_result *out, cv_err *e);

/* Power iteration with deflation as PyHessian's eigenvalues(): for each of
 * k pairs, a normalized Gaussian start; iterate: orthogonalize v against the
 * pairs found (Gram-Schmidt, twice), normalize, y = A v, lambda = v^T y,
 * stop when |lambda - lambda_prev| / (|lambda_prev| + 1e-6) < tol or after
 * max_iter, else v = y / ||y||.  It finds the dominant (largest |lambda|)
 * eigenvalues: which = largest sorts them descending, magnitude by
 * descending |lambda|; smallest is refused (use Lanczos).  The returned
 * vector is the last iterate v (lambda is exactly its Rayleigh quotient), so
 * the residual ||A v - lambda v|| costs no extra matvec.  Memory: k + 2. */
int cv_eigen_power(const cv_linop *op, const cv_eigen_options *opt, cv_rng *rng,
                   cv_eigen_result *out, cv_err *e);

/* ----------------------------------------------------------------- density */

typedef struct {
    int lanczos_steps;      /* per run, >= 1 (default 100, PyHessian iter); capped at n */
    int runs;               /* >= 1 (default 1, PyHessian n_v) */
    int grid_points;        /* >= 2 (default 10000) */
    double sigma2;          /* > 0 (default 1e-5) */
    double margin;          /* >= 0 (default 0.01, PyHessian's absolute overhead) */
} cv_density_options;

typedef struct {
    int runs;
    int steps;              /* nodes per run = min(lanczos_steps, n) */
    double *nodes;          /* runs x steps: run r at nodes + r*steps, ascending */
    double *weights;        /* same layout; each run's weights sum to 1 */
    int grid_points;
    double *grid;           /* grid_points, equally spaced */
    double *values;         /* grid_points, sum(values) * (grid[1]-grid[0]) = 1 */
    double sigma2_used;     /* the Gaussian variance used */
    long matvecs;           /* = runs * steps */
    long reorths;           /* Lanczos steps that reorthogonalized, all runs */
} cv_density_result;

void cv_density_options_default(cv_density_options *o);
void cv_density_result_free(cv_density_result *r);

/* Stochastic Lanczos quadrature with PyHessian density() conventions: each
 * run does `steps` Lanczos steps (full reorthogonalization; partial from
 * n >= 2^16, see cv_lanczos_options) from a
 * normalized Rademacher vector; nodes = eigenvalues of T (dstev), weights =
 * squared first components of T's eigenvectors, so sum_i w_i f(theta_i)
 * ~ v^T f(A) v and E[...] = tr(f(A)) / n (exact for polynomials of degree
 * < 2*steps).  The grid spans [mean_r min theta - margin, mean_r max theta
 * + margin]; each node is a Gaussian of variance
 * sigma2_used = sigma2 * max(1, grid span); the runs are averaged and the
 * density normalized so that sum(values) * spacing = 1 (PyHessian's
 * normalization; the trapezoid rule gives 1 up to the end points).
 * Memory: steps + 2 vectors (float32 basis from n >= 2^16: about steps/2 + 5).
 * reorths counts the steps that reorthogonalized. */
int cv_density_slq(const cv_linop *op, const cv_density_options *opt, cv_rng *rng,
                   cv_density_result *out, cv_err *e);

/* The density of a known spectrum (n eigenvalues, ascending; the Kronecker
 * curvatures' exact path): one "run" with the n values as nodes, each of
 * weight 1/n, broadened and normalized exactly as cv_density_slq broadens
 * its nodes (same grid, sigma2_used and normalization); matvecs 0. */
int cv_density_from_spectrum(const double *vals, size_t n, const cv_density_options *opt,
                             cv_density_result *out, cv_err *e);

/* ------------------------------------------------------------ solve/newton */

typedef enum {
    CV_SOLVE_CG = 0,
    CV_SOLVE_MINRES,
    CV_SOLVE_LSMR,
    CV_SOLVE_NEUMANN,
    CV_SOLVE_BLOCK_CG /* several right-hand sides (cv_solve_many); one: CG */
} cv_solve_method;

/* "cg" | "minres" | "lsmr" | "neumann" | "block_cg" -> cv_solve_method, -1 if unknown. */
int cv_solve_method_from_name(const char *name);
const char *cv_solve_method_name(cv_solve_method m);

typedef struct {
    cv_solve_method method; /* default cg */
    double damping;         /* delta, finite (default 0) */
    double tol;             /* relative residual ||r|| / ||b||, >= 0 (default 1e-6) */
    int max_iter;           /* >= 0, 0 = 10 n (cg, minres, lsmr) */
    double scale;           /* neumann: s > 0 (default 1) */
    int num_terms;          /* neumann: K >= 0 terms after the first (default 100) */
} cv_solve_options;

typedef struct {
    size_t n;
    double *x;              /* n */
    double residual;        /* true ||b - (A + delta I) x|| / ||b|| (0 if b = 0) */
    int iterations;
    int converged;          /* the solver's residual met tol */
    long matvecs;           /* iterations + 1 (the final true residual) */
} cv_solve_result;

void cv_solve_options_default(cv_solve_options *o);
void cv_solve_result_free(cv_solve_result *r);

/* Solves (A + delta I) x = b from x0 = 0.
 * CG: for positive definite A + delta I; a direction with
 * p^T (A + delta I) p <= 0 fails with CV_EINVAL, field "options.damping", code
 * "not_positive_definite" and a message naming a damping that would have
 * helped (a lower bound) or method minres.
 * MINRES (Paige-Saunders): any symmetric A + delta I; for a singular
 * inconsistent system it stops at max_iter with converged = 0.
 * LSMR (Fong-Saunders 2011): least squares min ||b - (A + delta I) x|| for
 * any A (singular, indefinite), two matvecs per iteration; stops when the
 * residual carried by recurrence (M x updated with the products already
 * made; the final residual is recomputed and may exceed tol by the float32
 * rounding of the products) is within tol, when the normal
 * equations hold (||M r|| <= tol ||M||_F-estimate ||r||: a least-squares
 * solution of an inconsistent system, from x = 0 the minimum-norm one) or
 * the bidiagonalization ends; converged = 1 in each of these cases.
 * Neumann: x = s sum_{k=0}^{K} (I - s (A + delta I))^k b with s = scale,
 * K = num_terms (K matvecs, max_iter and tol unused for stopping;
 * converged = residual <= tol); converges iff every eigenvalue of
 * A + delta I lies in (0, 2/s); a term growing past 1e8 ||b|| fails with
 * CV_EINVAL "diverges" (field "options.scale") - a slowly diverging series
 * (|1 - s lambda| slightly above 1) may end before that with converged = 0
 * and a large residual.
 * Not converging within max_iter is not an error (see converged/residual).
 * Progress plan: min(max_iter, n) + 1 matvecs (in exact arithmetic both
 * methods finish within n iterations; rounding can take more, and the plan
 * then grows with the matvecs done).  If Ax is non-NULL it receives A x
 * (undamped, n doubles) from the final residual product.
 * Memory: CG 4 vectors, MINRES 8 vectors, LSMR 10, Neumann 4. */
int cv_solve(const cv_linop *op, const double *b, const cv_solve_options *opt,
             cv_solve_result *out, double *Ax, cv_err *e);

/* k systems (A + delta I) x_j = b_j, b_j column j of B (n x k column-major),
 * into out[0..k) (each as cv_solve's; free each with cv_solve_result_free).
 * CG runs the k systems in lockstep with one product of the still active
 * directions per iteration (at most the auto block of 16 columns per apply;
 * a system leaves when its residual meets tol:
 * the same iterates as k separate CG runs, fewer and wider products).
 * BLOCK_CG is O'Leary's block CG (engine/solve_block.h): the systems share
 * one Krylov space, each iteration applying A to a search block of at most
 * the unconverged systems' count of columns (fewer iterations than CG when
 * the right-hand sides are related or the spectrum has a few outliers; each
 * system's out[j].matvecs is then the block's total).  The other methods
 * solve one system after the other.  The true residuals come from one
 * k-column product.  Memory: CG 4k + 1 vectors, BLOCK_CG 5k + 1.  0, or -1
 * with e filled (as cv_solve; out zeroed). */
int cv_solve_many(const cv_linop *op, int k, const double *B, const cv_solve_options *opt,
                  cv_solve_result *out, cv_err *e);

typedef struct {
    size_t n;
    double *step;           /* s = -(A + delta I)^-1 g, n */
    double predicted_change; /* 1/2 s^T A s + g^T s (undamped A) */
    double residual;        /* as cv_solve_result */
    int iterations;
    int converged;
    long matvecs;
} cv_newton_result;

void cv_newton_result_free(cv_newton_result *r);

/* Damped Newton step through cv_solve (CG or MINRES per opt->method); the
 * predicted change uses A s from the solver's final residual product, so it
 * costs no extra matvec. */
int cv_newton_step(const cv_linop *op, const double *g, const cv_solve_options *opt,
                   cv_newton_result *out, cv_err *e);

#endif
