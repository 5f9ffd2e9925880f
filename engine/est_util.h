/* est_util.h - internal helpers shared by the estimator modules (not part of
 * the public API; see estimators.h for that). */
#ifndef CV_EST_UTIL_H
#define CV_EST_UTIL_H

#include <math.h>
#include <stddef.h>

#include "estimators.h"

/* The options an estimator runs with: opt, or (opt NULL) *def filled in by
 * init (the estimator's options_default). */
#define CV_EST_OPTIONS(opt, def, init) ((opt) ? (opt) : ((init)(def), (def)))

/* calloc(count, size) that fills e with CV_ENOMEM on failure or overflow. */
void *cv_est_alloc(size_t count, size_t size, cv_err *e);
#define CV_EST_ALLOC(count, type, e) ((type *)cv_est_alloc((count), sizeof(type), (e)))

/* op is usable: non-NULL, has apply, 1 <= n <= INT_MAX (else CV_EINVAL). */
int cv_est_check_op(const cv_linop *op, cv_err *e);

/* Checks `block` (>= 0, field "options.block") and returns the columns per apply:
 * requested, or auto for 0, never more than `needed` nor less than 1. */
int cv_est_block_check(int requested, cv_err *e);
int cv_est_block_size(size_t n, int requested, long needed);

/* Fills v (n) with a probe of distribution d from r. */
void cv_est_probe(cv_rng *r, cv_probe_dist d, double *v, size_t n);

/* Y = A X for `cols` columns, applied `block` columns at a time. */
int cv_est_apply_chunked(const cv_linop *op, int cols, const double *X, double *Y, int block,
                         cv_err *e);

/* w -= V (V^T w) twice (classical Gram-Schmidt with reorthogonalization)
 * for the j orthonormal columns of V (n x j).  h (j, may be NULL) gets the
 * summed coefficients; tmp needs j doubles.  Returns ||w|| afterwards. */
double cv_est_cgs2(size_t n, int j, const double *V, double *w, double *h, double *tmp);

double cv_est_dot(size_t n, const double *x, const double *y);
double cv_est_norm(size_t n, const double *x);

/* Eigenvalues theta (ascending) and, if S is non-NULL, orthonormal
 * eigenvectors S (m x m, column-major) of the symmetric tridiagonal matrix
 * with diagonal alpha (m) and off-diagonal beta (m-1): LAPACK dstev. */
int cv_est_tridiag_eig(int m, const double *alpha, const double *beta, double *theta,
                       double *S, cv_err *e);

/* Indices of the k values of theta (m, ascending) wanted by `which`, in the
 * order `which` sorts them. */
void cv_est_select(const double *theta, int m, int k, cv_which which, int *idx);

/* cv_lanczos; plan = 0 leaves the progress plan to the caller. */
int cv_est_lanczos(const cv_linop *op, const double *v0, const cv_lanczos_options *opt,
                   cv_rng *rng, int plan, cv_lanczos_result *out, cv_err *e);

/* The checks every eigensolver makes first: op usable (cv_est_check_op),
 * 1 <= k <= n ("options.k") and a valid `which` ("options.which"). */
int cv_est_eigen_check(const cv_linop *op, const cv_eigen_options *o, cv_err *e);

/* Running mean and variance (Welford). */
typedef struct {
    long count;
    double mean, m2;
} cv_est_stats;

static inline void cv_est_stats_add(cv_est_stats *s, double x)
{
    s->count++;
    double d = x - s->mean;
    s->mean += d / (double)s->count;
    s->m2 += d * (x - s->mean);
}

/* Sample std (ddof 1) / sqrt(count); 0 for fewer than two samples. */
static inline double cv_est_stats_stderr(const cv_est_stats *s)
{
    if (s->count < 2)
        return 0.0;
    double var = s->m2 / (double)(s->count - 1);
    return sqrt((var > 0 ? var : 0) / (double)s->count);
}

#endif
