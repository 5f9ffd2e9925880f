/* power.c - power iteration with deflation (PyHessian's eigenvalues()):
 * the k dominant eigenpairs, one after the other. */
#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "est_util.h"

void cv_power_options_default(cv_eigen_options *o)
{
    memset(o, 0, sizeof *o);
    o->k = 1;
    o->which = CV_WHICH_LARGEST;
    o->max_iter = 100;
    o->tol = 1e-3;
}

static int power_check(const cv_linop *op, const cv_eigen_options *o, cv_err *e)
{
    if (cv_est_eigen_check(op, o, e))
        return -1;
    if (o->which == CV_WHICH_SMALLEST)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.which",
                          "method power finds the dominant (largest |eigenvalue|) "
                          "eigenvalues; use method lanczos for which = smallest");
    if (o->max_iter < 0)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.max_iter",
                          "max_iter must be >= 0 (0 = 100), got %d", o->max_iter);
    if (!(o->tol >= 0) || !isfinite(o->tol))
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.tol",
                          "tol must be a finite number >= 0");
    return 0;
}

/* Workspace for one deflated power iteration. */
typedef struct {
    const cv_linop *op;
    size_t n;
    double *U;              /* n x k: pairs found so far (column i is the current one) */
    double *v, *y, *tmp;
    int iterations;
    long matvecs;
} power_ws;

/* v <- unit vector orthogonal to the first i columns of U; redraws v if
 * it lies in their span. */
static void orthonormalize(power_ws *w, int i, cv_rng *rng)
{
    for (int attempt = 0; attempt < 3; attempt++) {
        double nv = cv_est_cgs2(w->n, i, w->U, w->v, NULL, w->tmp);
        if (nv > 0 && isfinite(nv)) {
            cblas_dscal((int)w->n, 1.0 / nv, w->v, 1);
            return;
        }
        cv_rng_gaussian(rng, w->v, w->n);
    }
}

/* Finds pair i: eigenvalue in *lam, residual in *res, vector in U[:, i].
 * Each iteration streams the vectors as few times as it can: the residual
 * and the copy into U are only formed for the iterate that is returned. */
static int power_one(power_ws *w, int i, const cv_eigen_options *o, int max_iter, cv_rng *rng,
                     double *lam, double *res, int *conv, cv_err *e)
{
    size_t n = w->n;
    double *u = w->U + (size_t)i * n, prev = 0;
    cv_rng_gaussian(rng, w->v, n);
    *conv = 0;
    for (int it = 0; it < max_iter; it++) {
        orthonormalize(w, i, rng);
        if (cv_linop_apply(w->op, 1, w->v, w->y, e))
            return -1;
        w->matvecs++;
        w->iterations++;
        double l = cv_est_dot(n, w->v, w->y);
        if (!isfinite(l))
            return cv_err_set(e, CV_EINVAL, "non_finite", "",
                              "the operator produced non-finite values (power iteration)");
        double ny = cv_est_norm(n, w->y);
        *conv = (it > 0 && fabs(l - prev) / (fabs(prev) + 1e-6) < o->tol) || ny == 0;
        if (*conv || it == max_iter - 1) {
            memcpy(u, w->v, sizeof(double) * n);
            *lam = l;
            cblas_daxpy((int)n, -l, w->v, 1, w->y, 1); /* y <- A v - l v */
            *res = cv_est_norm(n, w->y);
            return 0;
        }
        prev = l;
        double *t = w->v; /* next iterate: A v, normalized by orthonormalize */
        w->v = w->y;
        w->y = t;
    }
    return 0;
}

/* Sorts the k pairs of out as `which` asks (insertion sort; k is small). */
static void sort_pairs(cv_eigen_result *out, cv_which which, double *U, size_t n,
                       double *col)
{
    for (int i = 1; i < out->k; i++) {
        for (int j = i; j > 0; j--) {
            double a = out->eigenvalues[j - 1], b = out->eigenvalues[j];
            int swap = which == CV_WHICH_MAGNITUDE ? fabs(b) > fabs(a) : b > a;
            if (!swap)
                break;
            out->eigenvalues[j - 1] = b;
            out->eigenvalues[j] = a;
            double t = out->residuals[j - 1];
            out->residuals[j - 1] = out->residuals[j];
            out->residuals[j] = t;
            memcpy(col, U + (size_t)(j - 1) * n, sizeof(double) * n);
            memcpy(U + (size_t)(j - 1) * n, U + (size_t)j * n, sizeof(double) * n);
            memcpy(U + (size_t)j * n, col, sizeof(double) * n);
        }
    }
}

int cv_eigen_power(const cv_linop *op, const cv_eigen_options *opt, cv_rng *rng,
                   cv_eigen_result *out, cv_err *e)
{
    cv_eigen_options def;
    opt = CV_EST_OPTIONS(opt, &def, cv_power_options_default);
    memset(out, 0, sizeof *out);
    if (power_check(op, opt, e))
        return -1;
    size_t n = op->n;
    int k = opt->k, max_iter = opt->max_iter > 0 ? opt->max_iter : 100;
    power_ws w = {.op = op, .n = n};
    w.U = CV_EST_ALLOC(n * (size_t)k, double, e);
    w.v = w.U ? CV_EST_ALLOC(n, double, e) : NULL;
    w.y = w.v ? CV_EST_ALLOC(n, double, e) : NULL;
    w.tmp = w.y ? CV_EST_ALLOC((size_t)k, double, e) : NULL;
    out->eigenvalues = w.tmp ? CV_EST_ALLOC((size_t)k, double, e) : NULL;
    out->residuals = out->eigenvalues ? CV_EST_ALLOC((size_t)k, double, e) : NULL;
    if (!out->residuals)
        goto fail;
    cv_progress_plan(op->progress, (long)k * max_iter);
    for (int i = 0; i < k; i++) {
        int conv;
        if (power_one(&w, i, opt, max_iter, rng, &out->eigenvalues[i], &out->residuals[i],
                      &conv, e))
            goto fail;
        out->converged += conv;
    }
    out->n = n;
    out->k = k;
    sort_pairs(out, opt->which, w.U, n, w.v);
    out->iterations = w.iterations;
    out->matvecs = w.matvecs;
    if (opt->return_vectors) {
        out->eigenvectors = w.U;
        w.U = NULL;
    }
    free(w.U);
    free(w.v);
    free(w.y);
    free(w.tmp);
    return 0;
fail:
    free(w.U);
    free(w.v);
    free(w.y);
    free(w.tmp);
    cv_eigen_result_free(out);
    return -1;
}
