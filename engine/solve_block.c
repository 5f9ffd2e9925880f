/* solve_block.c - block conjugate gradients (O'Leary 1980) for k right-hand
 * sides that share one Krylov space, in the breakdown-free form of Ji & Li
 * (2017, "A breakdown-free block conjugate gradient method"): every
 * iteration re-orthonormalizes the search block (SVQB: the eigenvectors of
 * its Gram matrix, two passes) and drops directions that became linearly
 * dependent, so the block may shrink but the s x s system P^T A P never
 * becomes singular.  Systems whose residual meets tol leave the search block
 * (their iterate still takes the block's updates). */
#include "solve_block.h"

#include <cblas.h>
#include <lapacke.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "est_util.h"

/* A direction is kept while its Gram eigenvalue exceeds this fraction of the
 * largest (unit columns: singular values below 1e-5 of the largest are
 * treated as dependence). */
#define BLOCK_DROP 1e-10

typedef struct {
    size_t n;
    int k;
    double *X, *R, *P, *Q, *W;       /* n x k each (column-major, stride n) */
    double *M, *L, *T, *G, *ev;      /* k x k (ev: k) */
    double *bnorm;
    int *done;                       /* system met tol */
    long matvecs;                    /* columns applied */
} block_ws;

static void block_free(block_ws *w)
{
    free(w->X);
    free(w->R);
    free(w->P);
    free(w->Q);
    free(w->W);
    free(w->M);
    free(w->L);
    free(w->T);
    free(w->G);
    free(w->ev);
    free(w->bnorm);
    free(w->done);
}

static int block_alloc(block_ws *w, size_t n, int k, cv_err *e)
{
    size_t nk = n * (size_t)k, kk = (size_t)k * (size_t)k;
    memset(w, 0, sizeof *w);
    w->n = n;
    w->k = k;
    double **big[] = {&w->X, &w->R, &w->P, &w->Q, &w->W};
    double **small[] = {&w->M, &w->L, &w->T, &w->G};
    for (size_t i = 0; i < sizeof big / sizeof *big; i++)
        if (!(*big[i] = CV_EST_ALLOC(nk, double, e)))
            return -1;
    for (size_t i = 0; i < sizeof small / sizeof *small; i++)
        if (!(*small[i] = CV_EST_ALLOC(kk, double, e)))
            return -1;
    w->ev = CV_EST_ALLOC((size_t)k, double, e);
    w->bnorm = w->ev ? CV_EST_ALLOC((size_t)k, double, e) : NULL;
    w->done = w->bnorm ? CV_EST_ALLOC((size_t)k, int, e) : NULL;
    return w->done ? 0 : -1;
}

/* One SVQB pass: dst (n x s) = an orthonormal basis of the m columns of src
 * (n x m), dropping directions whose Gram eigenvalue is below BLOCK_DROP of
 * the largest.  Returns s (0 when src is zero), -1 on a LAPACK failure. */
static int svqb(block_ws *w, const double *src, int m, double *dst)
{
    size_t n = w->n;
    if (m == 0)
        return 0;
    cblas_dgemm(CblasColMajor, CblasTrans, CblasNoTrans, m, m, (int)n, 1.0, src, (int)n, src,
                (int)n, 0.0, w->G, m);
    if (LAPACKE_dsyevd(LAPACK_COL_MAJOR, 'V', 'U', m, w->G, m, w->ev) != 0)
        return -1;
    double top = w->ev[m - 1];
    if (!(top > 0))
        return 0;
    int first = 0; /* ascending: keep the trailing eigenvectors */
    while (first < m && !(w->ev[first] > BLOCK_DROP * top))
        first++;
    int s = m - first;
    for (int c = 0; c < s; c++) /* V_s diag(lambda^-1/2), in place */
        cblas_dscal(m, 1.0 / sqrt(w->ev[first + c]), w->G + (size_t)(first + c) * m, 1);
    cblas_dgemm(CblasColMajor, CblasNoTrans, CblasNoTrans, (int)n, s, m, 1.0, src, (int)n,
                w->G + (size_t)first * m, m, 0.0, dst, (int)n);
    return s;
}

/* P = an orthonormal basis of the unconverged columns of W (scaled to unit
 * length first, so a small residual is not mistaken for dependence); two
 * SVQB passes (the second restores orthogonality lost to rounding).  W is
 * clobbered.  Returns the block size s >= 0, or -1 with e. */
static int orthonormalize(block_ws *w, cv_err *e)
{
    size_t n = w->n;
    int m = 0;
    for (int j = 0; j < w->k; j++) {
        if (w->done[j])
            continue;
        const double *col = w->W + (size_t)j * n;
        double nr = cv_est_norm(n, col);
        if (!(nr > 0))
            continue;
        double *to = w->W + (size_t)m * n;
        if (to != col)
            memmove(to, col, n * sizeof(double));
        cblas_dscal((int)n, 1.0 / nr, to, 1);
        m++;
    }
    int s = svqb(w, w->W, m, w->Q); /* Q is free here: scratch */
    s = s > 0 ? svqb(w, w->Q, s, w->P) : s;
    if (s < 0)
        return cv_err_set(e, CV_EINTERNAL, "internal", "",
                          "block CG: the eigendecomposition of the search block's Gram "
                          "matrix failed");
    return s;
}

/* The Cholesky factor of M = P^T (A + delta I) P (s x s) into L; refuses an
 * M that is not positive definite (the damped curvature is not on span P),
 * naming the Rayleigh quotient of its least eigenvector. */
static int factor_m(block_ws *w, int s, double delta, int it, cv_err *e)
{
    memcpy(w->L, w->M, sizeof(double) * (size_t)s * (size_t)s);
    if (LAPACKE_dpotrf(LAPACK_COL_MAJOR, 'L', s, w->L, s) == 0)
        return 0;
    memcpy(w->G, w->M, sizeof(double) * (size_t)s * (size_t)s);
    double low = NAN;
    if (LAPACKE_dsyevd(LAPACK_COL_MAJOR, 'N', 'U', s, w->G, s, w->ev) == 0)
        low = w->ev[0];
    return cv_err_set(e, CV_EINVAL, "not_positive_definite", "options.damping",
                      "matrix is not positive definite: the search block's P^T (A + %g I) P "
                      "has the eigenvalue %.6g <= 0 at block CG iteration %d; use damping "
                      "larger than %.6g (a lower bound: the smallest eigenvalue may be lower "
                      "still) or method minres",
                      delta, low, it, delta - low);
}

/* C (s x k) = M^-1 (sign * Y^T R) with Y one of P, Q (n x s). */
static void coefficients(block_ws *w, const double *Y, int s, double sign)
{
    int n = (int)w->n, k = w->k;
    cblas_dgemm(CblasColMajor, CblasTrans, CblasNoTrans, s, k, n, sign, Y, n, w->R, n, 0.0,
                w->T, s);
    LAPACKE_dpotrs(LAPACK_COL_MAJOR, 'L', s, k, w->L, s, w->T, s);
}

/* Marks systems whose residual meets tol at iteration it; returns how many are left. */
static int mark_converged(block_ws *w, const cv_solve_options *o, int it, cv_solve_result *out)
{
    int left = 0;
    for (int j = 0; j < w->k; j++) {
        if (!w->done[j]) {
            double rn = cv_est_norm(w->n, w->R + (size_t)j * w->n);
            if (!isfinite(rn))
                return -1;
            w->done[j] = rn <= o->tol * w->bnorm[j];
            out[j].iterations = it;
        }
        left += !w->done[j];
    }
    return left;
}

/* One block iteration on the s-column search block P: Q = (A + delta I) P,
 * the step X += P alpha, R -= Q alpha, then the next block from R + P beta.
 * *s: the next block's size; *left: systems not yet within tol. */
static int block_iter(const cv_linop *op, const cv_solve_options *o, block_ws *w, int it,
                      int *s, int *left, cv_solve_result *out, cv_err *e)
{
    int n = (int)w->n, k = w->k, b = *s;
    if (cv_est_apply_chunked(op, b, w->P, w->Q, cv_est_block_size(w->n, 0, b), e))
        return -1;
    w->matvecs += b;
    for (int c = 0; c < b; c++)
        cblas_daxpy(n, o->damping, w->P + (size_t)c * w->n, 1, w->Q + (size_t)c * w->n, 1);
    cblas_dgemm(CblasColMajor, CblasTrans, CblasNoTrans, b, b, n, 1.0, w->P, n, w->Q, n, 0.0,
                w->M, b);
    for (int i = 0; i < b; i++) /* symmetrize against rounding */
        for (int j = i + 1; j < b; j++)
            w->M[(size_t)i * b + j] = w->M[(size_t)j * b + i] =
                0.5 * (w->M[(size_t)i * b + j] + w->M[(size_t)j * b + i]);
    for (size_t i = 0; i < (size_t)b * (size_t)b; i++)
        if (!isfinite(w->M[i]))
            return cv_err_set(e, CV_EINVAL, "non_finite", "",
                              "the operator produced non-finite values (block CG iteration %d)",
                              it);
    if (factor_m(w, b, o->damping, it, e))
        return -1;
    coefficients(w, w->P, b, 1.0); /* alpha */
    cblas_dgemm(CblasColMajor, CblasNoTrans, CblasNoTrans, n, k, b, 1.0, w->P, n, w->T, b, 1.0,
                w->X, n);
    cblas_dgemm(CblasColMajor, CblasNoTrans, CblasNoTrans, n, k, b, -1.0, w->Q, n, w->T, b,
                1.0, w->R, n);
    if ((*left = mark_converged(w, o, it, out)) < 0)
        return cv_err_set(e, CV_EINVAL, "non_finite", "",
                          "the operator produced non-finite values (block CG iteration %d)",
                          it);
    if (*left == 0)
        return 0;
    coefficients(w, w->Q, b, -1.0); /* beta */
    memcpy(w->W, w->R, sizeof(double) * w->n * (size_t)k);
    cblas_dgemm(CblasColMajor, CblasNoTrans, CblasNoTrans, n, k, b, 1.0, w->P, n, w->T, b, 1.0,
                w->W, n);
    *s = orthonormalize(w, e);
    return *s < 0 ? -1 : 0;
}

int cv_solve_block_cg(const cv_linop *op, int k, const double *B, const cv_solve_options *o,
                      int max_iter, cv_solve_result *out, cv_err *e)
{
    size_t n = op->n;
    block_ws w;
    int rc = block_alloc(&w, n, k, e);
    int left = 0, s = 0;
    if (!rc) {
        memcpy(w.R, B, sizeof(double) * n * (size_t)k);
        memcpy(w.W, B, sizeof(double) * n * (size_t)k);
        for (int j = 0; j < k; j++) {
            w.bnorm[j] = cv_est_norm(n, B + (size_t)j * n);
            w.done[j] = w.bnorm[j] == 0 || w.bnorm[j] <= o->tol * w.bnorm[j]; /* x = 0 does */
            left += !w.done[j];
        }
        s = left ? orthonormalize(&w, e) : 0;
        rc = s < 0 ? -1 : 0;
    }
    for (int it = 1; !rc && left > 0 && s > 0 && it <= max_iter; it++)
        rc = block_iter(op, o, &w, it, &s, &left, out, e);
    for (int j = 0; j < k && !rc; j++) {
        out[j].n = n;
        out[j].converged = w.done[j];
        out[j].matvecs = w.matvecs;
        if (!(out[j].x = CV_EST_ALLOC(n, double, e)))
            rc = -1;
        else
            memcpy(out[j].x, w.X + (size_t)j * n, n * sizeof(double));
    }
    block_free(&w);
    return rc;
}
