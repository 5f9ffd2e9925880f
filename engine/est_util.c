/* est_util.c - helpers shared by the estimator modules: checked allocation,
 * operator, block and eigensolver-option checks, probe vectors, chunked
 * applies, Gram-Schmidt, the symmetric tridiagonal eigensolver and Ritz-value
 * selection. */
#include "est_util.h"
#include "bigmem.h"

#include <cblas.h>
#include <lapacke.h>
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>

void *cv_est_alloc(size_t count, size_t size, cv_err *e)
{
    if (count == 0)
        count = 1;
    if (size && count > SIZE_MAX / size) {
        cv_err_set(e, CV_ENOMEM, "out_of_memory", "",
                   "allocation of %zu x %zu bytes overflows", count, size);
        return NULL;
    }
    void *p = cv_big_calloc(count, size); /* calloc; from 1 MB on huge pages (bigmem.h) */
    if (!p)
        cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "could not allocate %zu bytes",
                   count * size);
    return p;
}

int cv_est_check_op(const cv_linop *op, cv_err *e)
{
    if (!op || !op->apply)
        return cv_err_set(e, CV_EINVAL, "invalid_operator", "", "no operator given");
    if (op->n < 1 || op->n > (size_t)INT_MAX)
        return cv_err_set(e, CV_EINVAL, "invalid_operator", "",
                          "operator dimension %zu is outside [1, %d]", op->n, INT_MAX);
    return 0;
}

int cv_est_block_check(int requested, cv_err *e)
{
    if (requested < 0)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.block",
                          "block must be >= 0 (0 = automatic), got %d", requested);
    return 0;
}

int cv_est_block_size(size_t n, int requested, long needed)
{
    long b = requested;
    if (b <= 0) {
        b = (long)(((size_t)1 << 24) / n);
        b = b > 16 ? 16 : b;
    }
    if (b > needed)
        b = needed;
    return b < 1 ? 1 : (int)b;
}

void cv_est_probe(cv_rng *r, cv_probe_dist d, double *v, size_t n)
{
    if (d == CV_PROBE_GAUSSIAN)
        cv_rng_gaussian(r, v, n);
    else
        cv_rng_rademacher(r, v, n);
}

int cv_est_apply_chunked(const cv_linop *op, int cols, const double *X, double *Y, int block,
                         cv_err *e)
{
    size_t n = op->n;
    for (int c = 0; c < cols; c += block) {
        int k = cols - c < block ? cols - c : block;
        if (cv_linop_apply(op, k, X + (size_t)c * n, Y + (size_t)c * n, e))
            return -1;
    }
    return 0;
}

double cv_est_dot(size_t n, const double *x, const double *y)
{
    return cblas_ddot((int)n, x, 1, y, 1);
}

/* sqrt(x.x) streams x once at ddot speed (OpenBLAS's scaled dnrm2 runs about
 * 3x slower); dnrm2 only where the sum of squares under- or overflowed. */
double cv_est_norm(size_t n, const double *x)
{
    double s = cblas_ddot((int)n, x, 1, x, 1);
    if (s > 1e-280 && s < 1e280)
        return sqrt(s);
    return cblas_dnrm2((int)n, x, 1);
}

double cv_est_cgs2(size_t n, int j, const double *V, double *w, double *h, double *tmp)
{
    if (h)
        memset(h, 0, sizeof(double) * (size_t)j);
    /* Classical Gram-Schmidt with the DGKS criterion: a second pass only
     * when the first removed more than 1 - 1/sqrt(2) of w's norm (each pass
     * streams the whole basis from memory, the dominant cost for large n). */
    double before = cv_est_norm(n, w), after = before;
    for (int pass = 0; pass < 2 && j > 0; pass++) {
        cblas_dgemv(CblasColMajor, CblasTrans, (int)n, j, 1.0, V, (int)n, w, 1, 0.0, tmp, 1);
        cblas_dgemv(CblasColMajor, CblasNoTrans, (int)n, j, -1.0, V, (int)n, tmp, 1, 1.0, w, 1);
        if (h)
            cblas_daxpy(j, 1.0, tmp, 1, h, 1);
        after = cv_est_norm(n, w);
        if (after >= M_SQRT1_2 * before)
            break;
        before = after;
    }
    return after;
}

int cv_est_tridiag_eig(int m, const double *alpha, const double *beta, double *theta,
                       double *S, cv_err *e)
{
    double *off = CV_EST_ALLOC((size_t)m, double, e);
    if (!off)
        return -1;
    memcpy(theta, alpha, sizeof(double) * (size_t)m);
    if (m > 1)
        memcpy(off, beta, sizeof(double) * (size_t)(m - 1));
    lapack_int info = LAPACKE_dstev(LAPACK_COL_MAJOR, S ? 'V' : 'N', m, theta, off, S,
                                    S ? m : 1);
    free(off);
    if (info != 0)
        return cv_err_set(e, CV_EINTERNAL, "lapack_failed", "",
                          "dstev failed (info %d) on a %d x %d tridiagonal matrix",
                          (int)info, m, m);
    return 0;
}

void cv_est_select(const double *theta, int m, int k, cv_which which, int *idx)
{
    int lo = 0, hi = m - 1;
    for (int i = 0; i < k; i++) {
        if (which == CV_WHICH_SMALLEST)
            idx[i] = lo++;
        else if (which == CV_WHICH_LARGEST)
            idx[i] = hi--;
        else if (fabs(theta[hi]) >= fabs(theta[lo]))
            idx[i] = hi--;
        else
            idx[i] = lo++;
    }
}

int cv_est_eigen_check(const cv_linop *op, const cv_eigen_options *o, cv_err *e)
{
    if (cv_est_check_op(op, e))
        return -1;
    if (o->k < 1 || (size_t)o->k > op->n)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.k",
                          "k must be in [1, %zu] (the dimension), got %d", op->n, o->k);
    if ((int)o->which < CV_WHICH_LARGEST || (int)o->which > CV_WHICH_MAGNITUDE)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.which",
                          "which must be largest, smallest or magnitude");
    return 0;
}
