/* lanczos_block.c - block Lanczos for eigenpairs (issue 26): p vectors per
 * product (the engine's multi-vector products cost less per vector than
 * single ones), full reorthogonalization of every block against the whole
 * basis (block classical Gram-Schmidt, twice), Rayleigh-Ritz on the block
 * tridiagonal T = V^T A V after every block step. */
#include <cblas.h>
#include <float.h>
#include <lapacke.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "est_util.h"

typedef struct {
    const cv_linop *op;
    size_t n;
    int p, cap;           /* block size; basis columns allocated */
    int cols;             /* basis columns so far (blocks * p) */
    double *V;            /* n x cap */
    double *W;            /* n x p: the next block before orthonormalization */
    double *T;            /* cap x cap, column-major: V^T A V (block tridiagonal) */
    double *tmp;          /* cap x p */
    long matvecs;
    int restarts;
} blz_state;

static void blz_free(blz_state *s)
{
    free(s->V);
    free(s->W);
    free(s->T);
    free(s->tmp);
}

/* W <- W - V (V^T W) over the basis so far, twice. */
static void reorthogonalize(blz_state *s)
{
    int n = (int)s->n, c = s->cols, p = s->p;
    for (int pass = 0; c > 0 && pass < 2; pass++) {
        cblas_dgemm(CblasColMajor, CblasTrans, CblasNoTrans, c, p, n, 1.0, s->V, n, s->W, n,
                    0.0, s->tmp, c);
        cblas_dgemm(CblasColMajor, CblasNoTrans, CblasNoTrans, n, p, c, -1.0, s->V, n, s->tmp,
                    c, 1.0, s->W, n);
    }
}

/* Orthonormalizes W's p columns (modified Gram-Schmidt, twice, against the
 * basis and each other) into the basis' next block; R (p x p, upper) gets
 * the coefficients.  A column that vanishes (an invariant subspace) is
 * replaced by a random vector orthogonal to everything (R's column stays 0). */
static int next_block(blz_state *s, cv_rng *rng, double *R)
{
    size_t n = s->n;
    int p = s->p;
    memset(R, 0, sizeof(double) * p * p);
    reorthogonalize(s);
    double *Vn = s->V + (size_t)s->cols * n;
    for (int j = 0; j < p; j++) {
        double *w = s->W + (size_t)j * n, norm0 = cv_est_norm(n, w);
        for (int pass = 0; pass < 2; pass++)
            for (int i = 0; i < j; i++) {
                double h = cv_est_dot(n, Vn + (size_t)i * n, w);
                cblas_daxpy((int)n, -h, Vn + (size_t)i * n, 1, w, 1);
                R[(size_t)j * p + i] += h;
            }
        double nrm = cv_est_norm(n, w);
        if (!(nrm > 1e-10 * (norm0 > 0 ? norm0 : 1)) || nrm == 0) { /* invariant: restart */
            if (!rng)
                return 1;
            s->restarts++;
            cv_est_probe(rng, CV_PROBE_GAUSSIAN, w, n);
            int saved = s->cols;
            s->cols += j; /* orthogonal to the basis and this block's first j */
            double *W0 = s->W;
            s->W = w;
            int pp = s->p;
            s->p = 1;
            reorthogonalize(s);
            s->p = pp;
            s->W = W0;
            s->cols = saved;
            nrm = cv_est_norm(n, w);
            if (!(nrm > 0))
                return 1;
        } else {
            R[(size_t)j * p + j] = nrm;
        }
        for (size_t i = 0; i < n; i++)
            Vn[(size_t)j * n + i] = w[i] / nrm;
    }
    s->cols += p;
    return 0;
}

/* One block step: W = A V_j, T's diagonal block and the next block with the
 * off-diagonal block B_j (T[j+1, j] = R).  1 when the basis is full. */
static int block_step(blz_state *s, cv_rng *rng, double *R, cv_err *e)
{
    size_t n = s->n;
    int p = s->p, c0 = s->cols - p, cap = s->cap;
    const double *Vj = s->V + (size_t)c0 * n;
    if (cv_linop_apply(s->op, p, Vj, s->W, e))
        return -1;
    s->matvecs += p;
    /* diagonal block: V_j^T W (symmetrized) */
    cblas_dgemm(CblasColMajor, CblasTrans, CblasNoTrans, p, p, (int)n, 1.0, Vj, (int)n, s->W,
                (int)n, 0.0, s->tmp, p);
    for (int a = 0; a < p; a++)
        for (int b = 0; b < p; b++)
            s->T[(size_t)(c0 + b) * cap + c0 + a] =
                0.5 * (s->tmp[(size_t)b * p + a] + s->tmp[(size_t)a * p + b]);
    if (s->cols + p > cap || (size_t)(s->cols + p) > n)
        return 1; /* no room for another block: T holds the blocks applied */
    int rc = next_block(s, rng, R);
    if (rc)
        return rc;
    for (int a = 0; a < p; a++) /* T[c0+p+a, c0+b] = R[a, b] and its transpose */
        for (int b = 0; b < p; b++) {
            double r = R[(size_t)b * p + a];
            s->T[(size_t)(c0 + b) * cap + c0 + p + a] = r;
            s->T[(size_t)(c0 + p + a) * cap + c0 + b] = r;
        }
    return 0;
}

/* Ritz values (ascending) and vectors S (m x m) of T's leading m x m. */
static int ritz(const blz_state *s, int m, double *theta, double *S, cv_err *e)
{
    for (int j = 0; j < m; j++)
        memcpy(S + (size_t)j * m, s->T + (size_t)j * s->cap, sizeof(double) * m);
    lapack_int info = LAPACKE_dsyevd(LAPACK_COL_MAJOR, 'V', 'U', m, S, m, theta);
    return info ? cv_err_set(e, CV_EINTERNAL, "lapack_failed", "",
                             "block Lanczos: dsyevd failed (info %d)", (int)info)
                : 0;
}

/* How many of the k residuals meet tol (Lanczos's rule). */
static int count_converged(int m, const double *theta, const int *idx, int k, double tol,
                           const double *res)
{
    double tmax = 0;
    int conv = 0;
    for (int i = 0; i < m; i++)
        tmax = fmax(tmax, fabs(theta[i]));
    for (int q = 0; q < k; q++) {
        double scale = fmax(fabs(theta[idx[q]]), 1e-6 * tmax);
        conv += res[q] <= tol * scale || res[q] <= 1e3 * DBL_EPSILON * tmax;
    }
    return conv;
}

/* Residuals ||A x_i - theta_i x_i|| = ||R (last p rows of s_i)|| for the
 * wanted idx (R: the next block's coefficients). */
static void residuals(const blz_state *s, int m, const double *S, const double *R,
                      const int *idx, int k, double *res)
{
    int p = s->p;
    for (int q = 0; q < k; q++) {
        const double *si = S + (size_t)idx[q] * m + (m - p);
        double ss = 0;
        for (int a = 0; a < p; a++) {
            double v = 0;
            for (int b = 0; b < p; b++)
                v += R[(size_t)b * p + a] * si[b];
            ss += v * v;
        }
        res[q] = sqrt(ss);
    }
}

/* The residuals formed explicitly (k products) when no next block exists. */
static int residuals_explicit(blz_state *s, int m, const double *theta, const double *S,
                              const int *idx, int k, double *res, cv_err *e)
{
    size_t n = s->n;
    double *X = CV_EST_ALLOC(n * (size_t)k, double, e);
    double *Y = X ? CV_EST_ALLOC(n * (size_t)k, double, e) : NULL;
    int rc = Y ? 0 : -1;
    for (int q = 0; !rc && q < k; q++)
        cblas_dgemv(CblasColMajor, CblasNoTrans, (int)n, m, 1.0, s->V, (int)n,
                    S + (size_t)idx[q] * m, 1, 0.0, X + (size_t)q * n, 1);
    if (!rc && (rc = cv_est_apply_chunked(s->op, k, X, Y, cv_est_block_size(n, 0, k), e)) == 0)
        s->matvecs += k;
    for (int q = 0; !rc && q < k; q++) {
        cblas_daxpy((int)n, -theta[idx[q]], X + (size_t)q * n, 1, Y + (size_t)q * n, 1);
        res[q] = cv_est_norm(n, Y + (size_t)q * n);
    }
    free(X);
    free(Y);
    return rc;
}

static int blz_init(blz_state *s, const cv_linop *op, int p, int cap, cv_rng *rng, cv_err *e)
{
    memset(s, 0, sizeof *s);
    s->op = op;
    s->n = op->n;
    s->p = p;
    s->cap = cap;
    s->V = CV_EST_ALLOC(s->n * (size_t)cap, double, e);
    s->W = s->V ? CV_EST_ALLOC(s->n * (size_t)p, double, e) : NULL;
    s->T = s->W ? CV_EST_ALLOC((size_t)cap * cap, double, e) : NULL;
    s->tmp = s->T ? CV_EST_ALLOC((size_t)cap * p, double, e) : NULL;
    if (!s->tmp) {
        blz_free(s);
        return -1;
    }
    for (int j = 0; j < p; j++)
        cv_est_probe(rng, CV_PROBE_RADEMACHER, s->W + (size_t)j * s->n, s->n);
    double *R = CV_EST_ALLOC((size_t)p * p, double, e);
    int rc = R ? next_block(s, rng, R) : -1;
    free(R);
    if (rc) {
        blz_free(s);
        return rc < 0 ? -1 : cv_err_set(e, CV_EINTERNAL, "lanczos_breakdown", "",
                                        "block Lanczos: no start block");
    }
    return 0;
}

/* The k wanted pairs into out: values, residuals, vectors (V S_idx). */
static int fill_result(const blz_state *s, int m, const double *theta, const double *S,
                       const int *idx, const double *res, const cv_eigen_options *o,
                       cv_eigen_result *out, cv_err *e)
{
    int k = o->k;
    out->n = s->n;
    out->k = k;
    out->eigenvalues = CV_EST_ALLOC((size_t)k, double, e);
    out->residuals = out->eigenvalues ? CV_EST_ALLOC((size_t)k, double, e) : NULL;
    if (!out->residuals)
        return -1;
    for (int q = 0; q < k; q++) {
        out->eigenvalues[q] = theta[idx[q]];
        out->residuals[q] = res[q];
    }
    if (!o->return_vectors)
        return 0;
    out->eigenvectors = CV_EST_ALLOC(s->n * (size_t)k, double, e);
    if (!out->eigenvectors)
        return -1;
    for (int q = 0; q < k; q++)
        cblas_dgemv(CblasColMajor, CblasNoTrans, (int)s->n, m, 1.0, s->V, (int)s->n,
                    S + (size_t)idx[q] * m, 1, 0.0, out->eigenvectors + (size_t)q * s->n, 1);
    return 0;
}

int cv_eigen_block_lanczos(const cv_linop *op, const cv_eigen_options *opt, int block,
                           cv_rng *rng, cv_eigen_result *out, cv_err *e)
{
    cv_eigen_options def;
    opt = CV_EST_OPTIONS(opt, &def, cv_eigen_options_default);
    memset(out, 0, sizeof *out);
    if (cv_est_eigen_check(op, opt, e))
        return -1;
    if (block < 1)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.block_size",
                          "block_size must be >= 1, got %d", block);
    int p = (size_t)block > op->n ? (int)op->n : block;
    long want = opt->max_iter > 0 ? opt->max_iter : (10L * opt->k > 100 ? 10L * opt->k : 100);
    if (want < opt->k)
        want = opt->k;
    if ((size_t)want > op->n)
        want = (long)op->n;
    int blocks = (int)((want + p - 1) / p), cap = (blocks + 1) * p;
    if ((size_t)cap > op->n)
        cap = (int)op->n;
    cv_progress_plan(op->progress, (long)blocks * p);
    blz_state s;
    if (blz_init(&s, op, p, cap, rng, e))
        return -1;
    int k = opt->k, m = 0, conv = 0, rc = 0;
    double *theta = CV_EST_ALLOC((size_t)cap, double, e);
    double *S = theta ? CV_EST_ALLOC((size_t)cap * cap, double, e) : NULL;
    double *R = S ? CV_EST_ALLOC((size_t)p * p, double, e) : NULL;
    double *res = R ? CV_EST_ALLOC((size_t)k, double, e) : NULL;
    int *idx = res ? CV_EST_ALLOC((size_t)cap, int, e) : NULL;
    if (!idx)
        rc = -1;
    while (!rc) {
        int step = block_step(&s, rng, R, e);
        if (step < 0) {
            rc = -1;
            break;
        }
        m = step ? s.cols : s.cols - p; /* T's filled part: the blocks applied */
        if (m >= k) {
            if (ritz(&s, m, theta, S, e)) {
                rc = -1;
                break;
            }
            cv_est_select(theta, m, k, opt->which, idx);
            if (step && residuals_explicit(&s, m, theta, S, idx, k, res, e)) {
                rc = -1;
                break;
            }
            if (!step)
                residuals(&s, m, S, R, idx, k, res);
            conv = count_converged(m, theta, idx, k, opt->tol, res);
            cv_progress_partial(op->progress, theta[idx[0]], 0.0, m);
            if (conv == k || step || m >= want)
                break;
        }
    }
    if (!rc && m < k)
        rc = cv_err_set(e, CV_EINTERNAL, "lanczos_breakdown", "",
                        "block Lanczos found only %d directions, fewer than k = %d", m, k);
    if (!rc)
        rc = fill_result(&s, m, theta, S, idx, res, opt, out, e);
    if (!rc) {
        out->iterations = m / p;
        out->converged = conv;
        out->matvecs = s.matvecs;
    } else {
        cv_eigen_result_free(out);
    }
    free(theta);
    free(S);
    free(R);
    free(res);
    free(idx);
    blz_free(&s);
    return rc;
}
