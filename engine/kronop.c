/* kronop.c - Kronecker-factored curvature blocks on given factors: the
 * theta <-> W~ mapping, products, exact and factored damped inverses, EKFAC
 * rotations, exact trace/diag/logdet/spectra, and the block-diagonal
 * operator over several layers (see kronop.h for the conventions). */
#include "kronop.h"

#include <cblas.h>
#include <float.h>
#include <lapacke.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "bigmem.h"
#include "rng.h"

/* ---- helpers ----------------------------------------------------------------- */

static void *kr_alloc(size_t count, size_t size, const char *what, cv_err *e)
{
    if (size && count > SIZE_MAX / size) {
        cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "%s: %zu x %zu bytes is too large", what,
                   count, size);
        return NULL;
    }
    void *p = cv_big_calloc(count ? count : 1, size ? size : 1); /* zeroed; huge pages */
    if (!p)
        cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "%s: %zu x %zu bytes", what, count, size);
    return p;
}

/* kr_alloc's large, uninitialised sibling (cv_big_malloc: huge pages). */
static void *kr_big(size_t count, size_t size, const char *what, cv_err *e)
{
    void *p = size && count > SIZE_MAX / size ? NULL : cv_big_malloc(count * size);
    if (!p)
        cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "%s: %zu x %zu bytes", what, count, size);
    return p;
}

static int not_pd(double v, cv_err *e)
{
    return cv_err_set(e, CV_EINVAL, "not_positive_definite", "options.damping",
                      "the damped Kronecker operator is singular or indefinite: eigenvalue "
                      "%g + damping <= 0", v);
}

/* Columns per batched GEMM so that rows * cols fits an int. */
static int chunk_cols(int k, int per)
{
    int c = INT_MAX / (per > 0 ? per : 1);
    return c < 1 ? 1 : (k < c ? k : c);
}

/* ---- block ------------------------------------------------------------------- */

int cv_kron_block_init(cv_kron_block *kb, int in, int out, int has_bias, const double *A,
                       const double *B, int take_ownership, cv_err *e)
{
    memset(kb, 0, sizeof *kb);
    kb->A = A;
    kb->B = B;
    kb->owns = take_ownership;
    if (in < 0 || out < 1 || in + (has_bias != 0) < 1 || !A || !B ||
        (size_t)(in + (has_bias != 0)) * (size_t)out > (size_t)INT_MAX) {
        int rc = cv_err_set(e, CV_EINVAL, "invalid_shape", "",
                            "Kronecker block: in %d, out %d, bias %d, factors %s", in, out,
                            has_bias, A && B ? "given" : "missing");
        cv_kron_block_free(kb);
        return rc;
    }
    kb->has_bias = has_bias != 0;
    kb->in = in;
    kb->dim_a = in + kb->has_bias;
    kb->dim_b = out;
    kb->dim = (size_t)kb->dim_a * (size_t)kb->dim_b;
    for (int j = 0; j < kb->dim_a; j++)
        kb->tr_a += A[j + (size_t)j * kb->dim_a];
    for (int i = 0; i < kb->dim_b; i++)
        kb->tr_b += B[i + (size_t)i * kb->dim_b];
    return 0;
}

void cv_kron_block_free(cv_kron_block *kb)
{
    if (kb->owns) {
        free((void *)kb->A);
        free((void *)kb->B);
    }
    free(kb->q_a);
    free(kb->lam_a);
    free(kb->q_b);
    free(kb->mu_b);
    memset(kb, 0, sizeof *kb);
}

static int eig_failed(int info, const char *what, const char *name, int n, cv_err *e)
{
    int mem = info == LAPACK_WORK_MEMORY_ERROR;
    return cv_err_set(e, mem ? CV_ENOMEM : CV_EINTERNAL, mem ? "out_of_memory" : "internal", "",
                      "eigendecomposition of Kronecker factor %s (%s, n = %d) failed: info %d",
                      name, what, n, info);
}

/* |w| <= sqrt(n) eps32 max|w| set to 0: the factors are sums of float32
 * activations and cotangents (accumulated in double), so a factor that is
 * singular in exact arithmetic has eigenvalues of float32 noise (~1e-9 max|w|
 * seen), not of double's. */
static void round_noise(double *w, int n)
{
    double mx = fmax(fabs(w[0]), fabs(w[n - 1]));
    double tol = sqrt((double)n) * FLT_EPSILON * mx;
    for (int i = 0; i < n; i++)
        if (fabs(w[i]) <= tol)
            w[i] = 0;
}

/* Eigenvalues w (n) of a symmetric n x n factor and its eigenvectors in q
 * (n x n), dsyevd with its workspace from cv_big_malloc (LAPACKE's own is a
 * fresh malloc per call, 2 n^2 doubles), rounded as round_noise. */
static int factor_eig_full(const double *F, int n, double *q, double *w, const char *name,
                           cv_err *e)
{
    memcpy(q, F, sizeof(double) * (size_t)n * n);
    double wq;
    lapack_int iwq, info = LAPACKE_dsyevd_work(LAPACK_COL_MAJOR, 'V', 'U', n, q, n, w, &wq, -1,
                                               &iwq, -1);
    if (info)
        return eig_failed((int)info, "dsyevd", name, n, e);
    lapack_int lw = (lapack_int)wq, liw = iwq;
    double *work = cv_big_malloc(sizeof(double) * (size_t)lw);
    lapack_int *iwork = work ? malloc(sizeof(lapack_int) * (size_t)liw) : NULL;
    info = iwork ? LAPACKE_dsyevd_work(LAPACK_COL_MAJOR, 'V', 'U', n, q, n, w, work, lw, iwork,
                                       liw)
                 : LAPACK_WORK_MEMORY_ERROR;
    free(work);
    free(iwork);
    if (info)
        return eig_failed((int)info, "dsyevd", name, n, e);
    round_noise(w, n);
    return 0;
}

/* From this size on the values-only route works in float32 (see
 * cv_kron_factor_eigenvalues_rank). */
#define EIG_FLOAT_MIN 128

/* Eigenvalues only: dsyevd 'N' below EIG_FLOAT_MIN, else ssyevd 'N' on a
 * float32 copy of F (the tridiagonal reduction is memory-bound: half the
 * bytes, ~1.8x faster at n = 512-1024).  The factor's entries are float32
 * sums accumulated in double, so its eigenvalues are not known better than
 * float32's rounding of it: ssyevd's absolute error, O(n eps32 max|w|) at
 * worst and ~eps32 max|w| in practice, is of that order. */
static int factor_values(const double *F, int n, double *w, cv_err *e)
{
    size_t nn = (size_t)n * n;
    if (n < EIG_FLOAT_MIN) {
        double *q = cv_big_malloc(sizeof(double) * nn);
        if (!q)
            return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "Kronecker factor copy");
        memcpy(q, F, sizeof(double) * nn);
        lapack_int info = LAPACKE_dsyevd(LAPACK_COL_MAJOR, 'N', 'U', n, q, n, w);
        free(q);
        if (info)
            return eig_failed((int)info, "dsyevd", "", n, e);
        round_noise(w, n);
        return 0;
    }
    float *f = cv_big_malloc(sizeof(float) * (nn + (size_t)n));
    if (!f)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "Kronecker factor copy");
    float *wf = f + nn;
    for (int j = 0; j < n; j++) /* the upper triangle is all ssyevd reads */
        for (int i = 0; i <= j; i++)
            f[(size_t)j * n + i] = (float)F[(size_t)j * n + i];
    lapack_int info = LAPACKE_ssyevd(LAPACK_COL_MAJOR, 'N', 'U', n, f, n, wf);
    for (int i = 0; !info && i < n; i++)
        w[i] = wf[i];
    free(f);
    if (info)
        return eig_failed((int)info, "ssyevd", "", n, e);
    round_noise(w, n);
    return 0;
}

/* F = f I (ACP's B = alpha I): its eigendecomposition is q = I, w = f, what
 * dsyevd returns for it, without dsyevd's O(n^3). */
static int scalar_identity(const double *F, int n)
{
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++)
            if (F[(size_t)i * n + j] != (i == j ? F[0] : 0.0))
                return 0;
    return 1;
}

static int factor_eig(const double *F, int n, double *q, double *w, const char *name, cv_err *e)
{
    if (!scalar_identity(F, n))
        return factor_eig_full(F, n, q, w, name, e);
    memset(q, 0, sizeof(double) * (size_t)n * n);
    for (int i = 0; i < n; i++) {
        q[(size_t)i * n + i] = 1;
        w[i] = F[0];
    }
    return 0;
}

int cv_kron_factor_eigenvalues(const double *F, int n, double *w, cv_err *e)
{
    return cv_kron_factor_eigenvalues_rank(F, n, n, w, e);
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Rayleigh-Ritz on the range of F: Q = orth(F Omega) (n x k, Omega a fixed
 * Gaussian n x k), the eigenvalues of Q^T F Q, and n - k zeros.  With
 * rank(F) <= k - 8 in exact arithmetic the range of F Omega holds the range
 * of F (Omega has full rank with probability 1), so these are F's
 * eigenvalues up to F's own rounding (the float32 noise of its sums, see
 * round_noise): Weyl's bound. */
static int factor_eig_ritz(const double *F, int n, int k, double *w, cv_err *e)
{
    size_t nk = (size_t)n * k;
    double *Y = kr_big(2 * nk + (size_t)k * k + k, sizeof(double), "Kronecker factor range", e);
    if (!Y)
        return -1;
    double *Z = Y + nk, *M = Z + nk, *tau = M + (size_t)k * k;
    cv_rng r;
    cv_rng_seed(&r, 0x6b726f6eULL + (uint64_t)n);
    cv_rng_gaussian(&r, Z, nk);
    /* F is symmetric: its row-major and column-major readings agree */
    cblas_dgemm(CblasColMajor, CblasNoTrans, CblasNoTrans, n, k, n, 1.0, F, n, Z, n, 0.0, Y, n);
    lapack_int info = LAPACKE_dgeqrf(LAPACK_COL_MAJOR, n, k, Y, n, tau);
    if (!info)
        info = LAPACKE_dorgqr(LAPACK_COL_MAJOR, n, k, k, Y, n, tau);
    if (!info) {
        cblas_dgemm(CblasColMajor, CblasNoTrans, CblasNoTrans, n, k, n, 1.0, F, n, Y, n, 0.0, Z,
                    n);
        cblas_dgemm(CblasColMajor, CblasTrans, CblasNoTrans, k, k, n, 1.0, Y, n, Z, n, 0.0, M, k);
        for (int i = 0; i < k; i++) /* symmetrize the rounding */
            for (int j = i + 1; j < k; j++)
                M[(size_t)i * k + j] = M[(size_t)j * k + i] =
                    0.5 * (M[(size_t)i * k + j] + M[(size_t)j * k + i]);
        memset(w, 0, sizeof(double) * (size_t)(n - k));
        info = LAPACKE_dsyevd(LAPACK_COL_MAJOR, 'N', 'U', k, M, k, w + (n - k));
    }
    free(Y);
    if (info)
        return cv_err_set(e, info == LAPACK_WORK_MEMORY_ERROR ? CV_ENOMEM : CV_EINTERNAL,
                          info == LAPACK_WORK_MEMORY_ERROR ? "out_of_memory" : "internal", "",
                          "eigenvalues of a Kronecker factor on its range (n = %d, k = %d) "
                          "failed: info %d", n, k, (int)info);
    qsort(w, (size_t)n, sizeof(double), cmp_double);
    round_noise(w, n);
    return 0;
}

int cv_kron_factor_eigenvalues_rank(const double *F, int n, long rank, double *w, cv_err *e)
{
    /* the range route pays 4 n^2 k flops of dgemm against dsyevd's ~(4/3) n^3, half
     * of it memory-bound symmetric matrix-vector products */
    if (rank >= 0 && rank + 8 <= n / 4)
        return factor_eig_ritz(F, n, (int)rank + 8, w, e);
    return factor_values(F, n, w, e);
}

int cv_kron_block_eig(cv_kron_block *kb, cv_err *e)
{
    if (kb->eig_ready)
        return 0;
    int da = kb->dim_a, db = kb->dim_b;
    double *qa = kr_big((size_t)da * da, sizeof(double), "Kronecker factor A eigenvectors", e);
    double *la = qa ? kr_alloc((size_t)da, sizeof(double), "factor A eigenvalues", e) : NULL;
    double *qb = la ? kr_big((size_t)db * db, sizeof(double), "factor B eigenvectors", e) : NULL;
    double *mb = qb ? kr_alloc((size_t)db, sizeof(double), "factor B eigenvalues", e) : NULL;
    if (!mb || factor_eig(kb->A, da, qa, la, "A", e) || factor_eig(kb->B, db, qb, mb, "B", e)) {
        free(qa);
        free(la);
        free(qb);
        free(mb);
        return -1;
    }
    kb->q_a = qa;
    kb->lam_a = la;
    kb->q_b = qb;
    kb->mu_b = mb;
    kb->eig_ready = 1;
    return 0;
}

/* ---- mapping ----------------------------------------------------------------- */

/* k vectors between theta's order and W~'s row-major order (to_mat 1: theta
 * to W~): row o of W~ is W's row o followed by b_o. */
static void permute(const cv_kron_block *kb, int k, const double *src, double *dst, int to_mat)
{
    size_t dim = kb->dim;
    int da = kb->dim_a, in = kb->in, out = kb->dim_b;
    for (int c = 0; c < k; c++) {
        const double *x = src + (size_t)c * dim;
        double *y = dst + (size_t)c * dim;
        if (!kb->has_bias) {
            memcpy(y, x, sizeof(double) * dim);
            continue;
        }
        for (int o = 0; o < out; o++) {
            size_t w = (size_t)o * in, m = (size_t)o * da, bias = (size_t)out * in + o;
            memcpy(y + (to_mat ? m : w), x + (to_mat ? w : m), sizeof(double) * (size_t)in);
            y[to_mat ? m + in : bias] = x[to_mat ? bias : m + in];
        }
    }
}

void cv_kron_theta_to_mat(const cv_kron_block *kb, int k, const double *theta, double *mat)
{
    permute(kb, k, theta, mat, 1);
}

void cv_kron_mat_to_theta(const cv_kron_block *kb, int k, const double *mat, double *theta)
{
    permute(kb, k, mat, theta, 0);
}

/* ---- two-sided products ---------------------------------------------------------
 * Matrix forms are column-major dim_a x dim_b (W~^T).  For k of them stacked
 * (dim_a x dim_b*k): Y_c = L^op X_c R^op with L dim_a x dim_a, R dim_b x dim_b;
 * the left product runs batched, the right one per matrix.  T: dim scratch
 * per matrix (k * dim). */
static void two_sided(const cv_kron_block *kb, const double *L, CBLAS_TRANSPOSE tl,
                      const double *R, CBLAS_TRANSPOSE tr, int k, const double *X, double *T,
                      double *Y)
{
    int da = kb->dim_a, db = kb->dim_b;
    int step = chunk_cols(k, db);
    for (int c0 = 0; c0 < k; c0 += step) {
        int kc = k - c0 < step ? k - c0 : step;
        cblas_dgemm(CblasColMajor, tl, CblasNoTrans, da, db * kc, da, 1.0, L, da,
                    X + (size_t)c0 * kb->dim, da, 0.0, T + (size_t)c0 * kb->dim, da);
    }
    for (int c = 0; c < k; c++)
        cblas_dgemm(CblasColMajor, CblasNoTrans, tr, da, db, db, 1.0, T + (size_t)c * kb->dim,
                    da, R, db, 0.0, Y + (size_t)c * kb->dim, da);
}

/* Y = Q diag(wts) Q^T X on theta vectors (wts: dim, eigen coordinates); with
 * quad (k values) also quad[c] = Y_c^T M Y_c = sum_r ev_r (wts_r z_cr)^2, z_c =
 * Q^T X_c and ev the operator's eigenvalues (s, or KFAC's mu_i lam_j when s is
 * NULL): the curvature of the result without a product with M. */
static int spectral_apply(cv_kron_block *kb, const double *wts, int k, const double *X,
                          double *Y, const double *s, double *quad, cv_err *e)
{
    if (cv_kron_block_eig(kb, e))
        return -1;
    size_t n = kb->dim * (size_t)k;
    double *m = kr_big(n, sizeof(double), "Kronecker work", e);
    double *t = m ? kr_big(n, sizeof(double), "Kronecker work", e) : NULL;
    if (!t) {
        free(m);
        return -1;
    }
    cv_kron_theta_to_mat(kb, k, X, m);
    /* Z = Q_A^T X Q_B: entry (j, i) is eigen coordinate i*dim_a + j */
    two_sided(kb, kb->q_a, CblasTrans, kb->q_b, CblasNoTrans, k, m, t, m);
    int da = kb->dim_a;
    for (int c = 0; c < k; c++) {
        double *z = m + (size_t)c * kb->dim, q = 0;
        for (size_t r = 0; r < kb->dim; r++) {
            z[r] *= wts[r];
            if (quad)
                q += (s ? s[r] : kb->mu_b[r / da] * kb->lam_a[r % da]) * z[r] * z[r];
        }
        if (quad)
            quad[c] = q;
    }
    two_sided(kb, kb->q_a, CblasNoTrans, kb->q_b, CblasTrans, k, m, t, m);
    cv_kron_mat_to_theta(kb, k, m, Y);
    free(m);
    free(t);
    return 0;
}

int cv_kron_block_products(cv_kron_block *kb, double *s, cv_err *e)
{
    if (cv_kron_block_eig(kb, e))
        return -1;
    for (int i = 0; i < kb->dim_b; i++)
        for (int j = 0; j < kb->dim_a; j++)
            s[(size_t)i * kb->dim_a + j] = kb->mu_b[i] * kb->lam_a[j];
    return 0;
}

/* The eigenvalues (s, or the products) into a new dim array. */
static double *eigvals_coords(cv_kron_block *kb, const double *s, cv_err *e)
{
    double *v = kr_big(kb->dim, sizeof(double), "Kronecker eigenvalues", e);
    if (!v)
        return NULL;
    if (s)
        memcpy(v, s, sizeof(double) * kb->dim);
    else if (cv_kron_block_products(kb, v, e)) {
        free(v);
        return NULL;
    }
    return v;
}

int cv_kron_block_apply(cv_kron_block *kb, const double *s, double shift, int k,
                        const double *X, double *Y, cv_err *e)
{
    if (k < 1)
        return 0;
    if (s) {
        double *w = eigvals_coords(kb, s, e);
        if (!w)
            return -1;
        for (size_t r = 0; r < kb->dim; r++)
            w[r] += shift;
        int rc = spectral_apply(kb, w, k, X, Y, NULL, NULL, e);
        free(w);
        return rc;
    }
    size_t n = kb->dim * (size_t)k;
    double *m = kr_big(n, sizeof(double), "Kronecker work", e);
    double *t = m ? kr_big(n, sizeof(double), "Kronecker work", e) : NULL;
    if (!t) {
        free(m);
        return -1;
    }
    cv_kron_theta_to_mat(kb, k, X, m);
    /* (B W~ A)^T = A W~^T B */
    two_sided(kb, kb->A, CblasNoTrans, kb->B, CblasNoTrans, k, m, t, m);
    cv_kron_mat_to_theta(kb, k, m, Y);
    for (size_t r = 0; shift != 0 && r < n; r++)
        Y[r] += shift * X[r];
    free(m);
    free(t);
    return 0;
}

int cv_kron_block_inverse(cv_kron_block *kb, const double *s, double lambda, int k,
                          const double *X, double *Y, cv_err *e)
{
    return cv_kron_block_inverse_quad(kb, s, lambda, k, X, Y, NULL, e);
}

int cv_kron_block_inverse_quad(cv_kron_block *kb, const double *s, double lambda, int k,
                               const double *X, double *Y, double *quad, cv_err *e)
{
    double *w = eigvals_coords(kb, s, e);
    if (!w)
        return -1;
    for (size_t r = 0; r < kb->dim; r++) {
        double d = w[r] + lambda;
        if (!(d > 0)) {
            double v = w[r];
            free(w);
            return not_pd(v, e);
        }
        w[r] = 1.0 / d;
    }
    int rc = k < 1 ? 0 : spectral_apply(kb, w, k, X, Y, s, quad, e);
    free(w);
    return rc;
}

double cv_kron_factored_weight(const cv_kron_block *kb)
{
    if (!(kb->tr_a > 0) || !(kb->tr_b > 0))
        return 0;
    return sqrt((kb->tr_a / kb->dim_a) / (kb->tr_b / kb->dim_b));
}

int cv_kron_block_factored_inverse(cv_kron_block *kb, double lambda, int k, const double *X,
                                   double *Y, double *w_out, cv_err *e)
{
    return cv_kron_block_factored_inverse_quad(kb, lambda, k, X, Y, w_out, NULL, e);
}

/* quad[c] = Y_c^T M Y_c by the forward product (the zero-factor case). */
static int quad_by_product(cv_kron_block *kb, int k, const double *Y, double *quad, cv_err *e)
{
    double *t = kr_big(kb->dim, sizeof(double), "Kronecker product", e);
    int rc = t ? 0 : -1;
    for (int c = 0; !rc && c < k; c++) {
        const double *y = Y + (size_t)c * kb->dim;
        rc = cv_kron_block_apply(kb, NULL, 0, 1, y, t, e);
        quad[c] = 0;
        for (size_t r = 0; !rc && r < kb->dim; r++)
            quad[c] += y[r] * t[r];
    }
    free(t);
    return rc;
}

int cv_kron_block_factored_inverse_quad(cv_kron_block *kb, double lambda, int k,
                                        const double *X, double *Y, double *w_out,
                                        double *quad, cv_err *e)
{
    double w = cv_kron_factored_weight(kb);
    if (w_out)
        *w_out = w;
    if (w == 0) { /* a zero factor: the limit (and M = 0's exact inverse) X / lambda */
        if (!(lambda > 0))
            return not_pd(0, e);
        for (size_t r = 0; r < kb->dim * (size_t)(k > 0 ? k : 0); r++)
            Y[r] = X[r] / lambda;
        return quad && k > 0 ? quad_by_product(kb, k, Y, quad, e) : 0;
    }
    if (cv_kron_block_eig(kb, e))
        return -1;
    double sl = sqrt(lambda > 0 ? lambda : 0);
    double pa = w * sl, pb = sl / w;
    double *wts = kr_big(kb->dim, sizeof(double), "Kronecker weights", e);
    if (!wts)
        return -1;
    for (int i = 0; i < kb->dim_b; i++) {
        double db = kb->mu_b[i] + pb;
        for (int j = 0; j < kb->dim_a; j++) {
            double da = kb->lam_a[j] + pa;
            if (!(da > 0) || !(db > 0)) {
                free(wts);
                return not_pd(da > 0 ? kb->mu_b[i] : kb->lam_a[j], e);
            }
            wts[(size_t)i * kb->dim_a + j] = 1.0 / (da * db);
        }
    }
    int rc = k < 1 ? 0 : spectral_apply(kb, wts, k, X, Y, NULL, quad, e);
    free(wts);
    return rc;
}

/* ---- exact quantities ------------------------------------------------------------ */

int cv_kron_block_trace(cv_kron_block *kb, const double *s, double *out, cv_err *e)
{
    if (!s) {
        *out = kb->tr_a * kb->tr_b;
        return 0;
    }
    double t = 0;
    for (size_t r = 0; r < kb->dim; r++)
        t += s[r];
    *out = t;
    return 0;
}

int cv_kron_block_diag(cv_kron_block *kb, const double *s, double *d, cv_err *e)
{
    int da = kb->dim_a, db = kb->dim_b;
    double *m = kr_alloc(kb->dim, sizeof(double), "Kronecker diagonal", e);
    if (!m)
        return -1;
    if (!s) {
        for (int o = 0; o < db; o++)
            for (int j = 0; j < da; j++)
                m[(size_t)o * da + j] = kb->B[o + (size_t)o * db] * kb->A[j + (size_t)j * da];
    } else {
        /* diag at (o, j) = sum_{i, jj} Q_B[o,i]^2 Q_A[j,jj]^2 s[i*da + jj]
         * = ((Q_A.^2) S (Q_B.^2)^T)(j, o), S the dim_a x dim_b matrix of s */
        if (cv_kron_block_eig(kb, e)) {
            free(m);
            return -1;
        }
        double *a2 = kr_alloc((size_t)da * da + (size_t)db * db + kb->dim, sizeof(double),
                              "Kronecker diagonal", e);
        if (!a2) {
            free(m);
            return -1;
        }
        double *b2 = a2 + (size_t)da * da, *t = b2 + (size_t)db * db;
        for (size_t r = 0; r < (size_t)da * da; r++)
            a2[r] = kb->q_a[r] * kb->q_a[r];
        for (size_t r = 0; r < (size_t)db * db; r++)
            b2[r] = kb->q_b[r] * kb->q_b[r];
        cblas_dgemm(CblasColMajor, CblasNoTrans, CblasNoTrans, da, db, da, 1.0, a2, da, s, da,
                    0.0, t, da);
        cblas_dgemm(CblasColMajor, CblasNoTrans, CblasTrans, da, db, db, 1.0, t, da, b2, db,
                    0.0, m, da);
        free(a2);
    }
    cv_kron_mat_to_theta(kb, 1, m, d);
    free(m);
    return 0;
}

int cv_kron_block_logdet(cv_kron_block *kb, const double *s, double lambda, double *out,
                         cv_err *e)
{
    double *w = eigvals_coords(kb, s, e);
    if (!w)
        return -1;
    double sum = 0;
    for (size_t r = 0; r < kb->dim; r++) {
        double d = w[r] + lambda;
        if (!(d > 0)) {
            double v = w[r];
            free(w);
            return not_pd(v, e);
        }
        sum += log(d);
    }
    free(w);
    *out = sum;
    return 0;
}

int cv_kron_block_eigenvalues(cv_kron_block *kb, const double *s, double *vals, cv_err *e)
{
    if (s)
        memcpy(vals, s, sizeof(double) * kb->dim);
    else if (cv_kron_block_products(kb, vals, e))
        return -1;
    qsort(vals, kb->dim, sizeof(double), cmp_double);
    return 0;
}

int cv_kron_block_eigvec(cv_kron_block *kb, int c, double *v, cv_err *e)
{
    if (c < 0 || (size_t)c >= kb->dim)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "", "eigen coordinate %d of %zu", c,
                          kb->dim);
    if (cv_kron_block_eig(kb, e))
        return -1;
    int da = kb->dim_a, db = kb->dim_b, i = c / da, j = c % da;
    double *m = kr_alloc(kb->dim, sizeof(double), "Kronecker eigenvector", e);
    if (!m)
        return -1;
    const double *qa = kb->q_a + (size_t)j * da, *qb = kb->q_b + (size_t)i * db;
    for (int o = 0; o < db; o++)
        for (int jj = 0; jj < da; jj++)
            m[(size_t)o * da + jj] = qb[o] * qa[jj];
    cv_kron_mat_to_theta(kb, 1, m, v);
    free(m);
    return 0;
}

/* ---- top-k selection ---------------------------------------------------------------
 * Keys: the bigger, the earlier: largest v, smallest -v, magnitude |v|.  The
 * KFAC heap breaks ties between rows by the lower eigen coordinate (within a
 * row, by the row's order); sorts by the lower index. */
static double which_key(cv_which w, double v)
{
    return w == CV_WHICH_LARGEST ? v : w == CV_WHICH_SMALLEST ? -v : fabs(v);
}

typedef struct {
    double key;
    int i, p;           /* KFAC: row i (B's eigenvalue), position p in the row's order */
    long coord;
} kr_item;

static int item_before(const kr_item *a, const kr_item *b)
{
    return a->key > b->key || (a->key == b->key && a->coord < b->coord);
}

static void heap_down(kr_item *h, int n, int at)
{
    for (;;) {
        int l = 2 * at + 1, r = l + 1, best = at;
        if (l < n && item_before(&h[l], &h[best]))
            best = l;
        if (r < n && item_before(&h[r], &h[best]))
            best = r;
        if (best == at)
            return;
        kr_item t = h[at];
        h[at] = h[best];
        h[best] = t;
        at = best;
    }
}

/* Row i's p-th column j in the order where its keys do not increase. */
typedef struct {
    const cv_kron_block *kb;
    cv_which which;
    const int *absdesc;  /* A's indices by descending |lam| */
} kr_rows;

static int row_col(const kr_rows *R, int i, int p)
{
    int da = R->kb->dim_a;
    double mu = R->kb->mu_b[i];
    if (R->which == CV_WHICH_MAGNITUDE)
        return R->absdesc[p];
    int desc = (R->which == CV_WHICH_LARGEST) == (mu >= 0);
    return desc ? da - 1 - p : p;
}

static void row_item(const kr_rows *R, int i, int p, kr_item *it)
{
    int j = row_col(R, i, p);
    it->i = i;
    it->p = p;
    it->coord = (long)i * R->kb->dim_a + j;
    it->key = which_key(R->which, R->kb->mu_b[i] * R->kb->lam_a[j]);
}

/* A's indices by descending |lam| (lam ascending; ties: lower index): a merge
 * of the negative part (|.| descends from index 0 up) and the non-negative
 * part (|.| descends from n-1 down). */
static void abs_order(const double *lam, int n, int *ord)
{
    int neg = 0;
    while (neg < n && lam[neg] < 0)
        neg++;
    int a = 0, b = n - 1, o = 0; /* negatives: |.| descends from 0 up; non-negatives from n-1 down */
    while (o < n) {
        int take_a;
        if (a >= neg)
            take_a = 0;
        else if (b < neg)
            take_a = 1;
        else
            take_a = -lam[a] > lam[b] || (-lam[a] == lam[b] && a < b);
        ord[o++] = take_a ? a++ : b--;
    }
}

/* The k best eigen coordinates of a KFAC block (vals, coords). */
static int kfac_topk(cv_kron_block *kb, cv_which which, int k, double *vals, int *coords,
                     cv_err *e)
{
    int da = kb->dim_a, db = kb->dim_b;
    kr_item *h = kr_alloc((size_t)db, sizeof(kr_item), "Kronecker eigen heap", e);
    int *ord = h ? kr_alloc((size_t)da, sizeof(int), "Kronecker eigen order", e) : NULL;
    if (!ord) {
        free(h);
        return -1;
    }
    abs_order(kb->lam_a, da, ord);
    kr_rows R = {kb, which, ord};
    for (int i = 0; i < db; i++)
        row_item(&R, i, 0, &h[i]);
    int n = db;
    for (int i = n / 2 - 1; i >= 0; i--)
        heap_down(h, n, i);
    for (int t = 0; t < k; t++) {
        kr_item top = h[0];
        vals[t] = kb->mu_b[top.i] * kb->lam_a[top.coord % da];
        coords[t] = (int)top.coord;
        if (top.p + 1 < da)
            row_item(&R, top.i, top.p + 1, &h[0]);
        else
            h[0] = h[--n];
        heap_down(h, n, 0);
    }
    free(h);
    free(ord);
    return 0;
}

typedef struct {
    double key;
    long tie;
    int idx;
} kr_cand;

static int cmp_cand(const void *a, const void *b)
{
    const kr_cand *x = a, *y = b;
    if (x->key != y->key)
        return x->key > y->key ? -1 : 1;
    return (x->tie > y->tie) - (x->tie < y->tie);
}

/* The k best of n values (ties: lower index): vals and idx. */
static int sort_topk(const double *v, size_t n, cv_which which, int k, double *vals, int *idx,
                     cv_err *e)
{
    kr_cand *c = kr_alloc(n, sizeof(kr_cand), "eigenvalue sort", e);
    if (!c)
        return -1;
    for (size_t r = 0; r < n; r++) {
        c[r].key = which_key(which, v[r]);
        c[r].tie = (long)r;
        c[r].idx = (int)r;
    }
    qsort(c, n, sizeof *c, cmp_cand);
    for (int t = 0; t < k; t++) {
        vals[t] = v[c[t].idx];
        idx[t] = c[t].idx;
    }
    free(c);
    return 0;
}

static int bad_k(int k, size_t n, cv_err *e)
{
    return cv_err_set(e, CV_EINVAL, "invalid_option", "options.k",
                      "k must be in [1, %zu], got %d", n, k);
}

int cv_kron_block_eigen(cv_kron_block *kb, const double *s, cv_which which, int k,
                        double *vals, int *coords, double *vecs, cv_err *e)
{
    if (k < 1 || (size_t)k > kb->dim)
        return bad_k(k, kb->dim, e);
    if (cv_kron_block_eig(kb, e))
        return -1;
    int *cs = coords ? coords : kr_alloc((size_t)k, sizeof(int), "eigen coordinates", e);
    if (!cs)
        return -1;
    int rc = s ? sort_topk(s, kb->dim, which, k, vals, cs, e)
               : kfac_topk(kb, which, k, vals, cs, e);
    for (int t = 0; !rc && vecs && t < k; t++)
        rc = cv_kron_block_eigvec(kb, cs[t], vecs + (size_t)t * kb->dim, e);
    if (cs != coords)
        free(cs);
    return rc;
}

/* ---- EKFAC rotations ------------------------------------------------------------- */

static int rotate(cv_kron_block *kb, int k, const double *X, double *Z, int back, cv_err *e)
{
    if (k < 1)
        return 0;
    if (cv_kron_block_eig(kb, e))
        return -1;
    size_t n = kb->dim * (size_t)k;
    double *m = kr_alloc(n, sizeof(double), "Kronecker work", e);
    double *t = m ? kr_alloc(n, sizeof(double), "Kronecker work", e) : NULL;
    if (!t) {
        free(m);
        return -1;
    }
    if (!back) {
        cv_kron_theta_to_mat(kb, k, X, m);
        two_sided(kb, kb->q_a, CblasTrans, kb->q_b, CblasNoTrans, k, m, t, Z);
    } else {
        two_sided(kb, kb->q_a, CblasNoTrans, kb->q_b, CblasTrans, k, X, t, m);
        cv_kron_mat_to_theta(kb, k, m, Z);
    }
    free(m);
    free(t);
    return 0;
}

int cv_kron_block_rotate(cv_kron_block *kb, int k, const double *X, double *Z, cv_err *e)
{
    return rotate(kb, k, X, Z, 0, e);
}

int cv_kron_block_unrotate(cv_kron_block *kb, int k, const double *Z, double *X, cv_err *e)
{
    return rotate(kb, k, Z, X, 1, e);
}

/* ---- block-diagonal operator --------------------------------------------------------- */

void cv_kron_diag_init(cv_kron_diag *d) { memset(d, 0, sizeof *d); }

void cv_kron_diag_free(cv_kron_diag *d)
{
    free(d->slots);
    memset(d, 0, sizeof *d);
}

static cv_kron_slot *diag_push(cv_kron_diag *d, size_t dim, cv_err *e)
{
    if (dim < 1 || dim > (size_t)INT_MAX) {
        cv_err_set(e, CV_EINVAL, "invalid_block", "", "a diagonal block of dimension %zu", dim);
        return NULL;
    }
    if (d->count == d->cap) {
        int cap = d->cap ? 2 * d->cap : 8;
        cv_kron_slot *s = realloc(d->slots, sizeof(cv_kron_slot) * (size_t)cap);
        if (!s) {
            cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "Kronecker slots");
            return NULL;
        }
        d->slots = s;
        d->cap = cap;
    }
    cv_kron_slot *s = &d->slots[d->count++];
    memset(s, 0, sizeof *s);
    s->offset = d->n;
    s->dim = dim;
    d->n += dim;
    return s;
}

int cv_kron_diag_add(cv_kron_diag *d, cv_kron_block *kb, const double *s, cv_err *e)
{
    cv_kron_slot *sl = diag_push(d, kb->dim, e);
    if (!sl)
        return -1;
    sl->kron = kb;
    sl->s = s;
    return 0;
}

int cv_kron_diag_add_op(cv_kron_diag *d, const cv_linop *op, cv_err *e)
{
    cv_kron_slot *sl = diag_push(d, op->n, e);
    if (!sl)
        return -1;
    sl->op = op;
    return 0;
}

int cv_kron_diag_check(const cv_kron_diag *d, const cv_block *b, cv_err *e)
{
    if (d->n != b->dim)
        return cv_err_set(e, CV_EINVAL, "invalid_block", "blocks",
                          "the Kronecker blocks cover %zu parameters, the block has %zu", d->n,
                          b->dim);
    return 0;
}

static int not_exact(cv_err *e)
{
    return cv_err_set(e, CV_EINVAL, "not_exact", "",
                      "a diagonal block without Kronecker structure has no exact spectrum here");
}

static int diag_apply(void *ctx, int k, const double *X, double *Y, cv_err *e)
{
    cv_kron_diag *d = ctx;
    size_t maxd = 0;
    for (int i = 0; i < d->count; i++)
        maxd = d->slots[i].dim > maxd ? d->slots[i].dim : maxd;
    double *x = kr_alloc(2 * maxd * (size_t)k, sizeof(double), "Kronecker slot vectors", e);
    if (!x)
        return -1;
    int rc = 0;
    for (int i = 0; !rc && i < d->count; i++) {
        const cv_kron_slot *s = &d->slots[i];
        double *y = x + s->dim * (size_t)k;
        for (int c = 0; c < k; c++)
            memcpy(x + (size_t)c * s->dim, X + (size_t)c * d->n + s->offset,
                   sizeof(double) * s->dim);
        if (!s->kron) {
            rc = s->op->apply(s->op->ctx, k, x, y, e);
            for (size_t r = 0; !rc && d->lambda != 0 && r < s->dim * (size_t)k; r++)
                y[r] += d->lambda * x[r];
        } else if (d->mode == CV_KRON_FORWARD)
            rc = cv_kron_block_apply(s->kron, s->s, d->lambda, k, x, y, e);
        else if (d->mode == CV_KRON_INVERSE)
            rc = cv_kron_block_inverse(s->kron, s->s, d->lambda, k, x, y, e);
        else
            rc = cv_kron_block_factored_inverse(s->kron, d->lambda, k, x, y, NULL, e);
        for (int c = 0; !rc && c < k; c++)
            memcpy(Y + (size_t)c * d->n + s->offset, y + (size_t)c * s->dim,
                   sizeof(double) * s->dim);
    }
    free(x);
    return rc;
}

int cv_kron_diag_linop(cv_kron_diag *d, cv_kron_mode mode, double lambda, cv_linop *op,
                       cv_err *e)
{
    if (d->count < 1)
        return cv_err_set(e, CV_EINVAL, "invalid_block", "", "no diagonal blocks");
    for (int i = 0; i < d->count; i++) {
        cv_kron_slot *s = &d->slots[i];
        if (!s->kron && mode != CV_KRON_FORWARD)
            return cv_err_set(e, CV_EINVAL, "invalid_option", "options.method",
                              "a block without Kronecker structure has no %s inverse here",
                              mode == CV_KRON_INVERSE ? "exact" : "factored");
        if (s->kron && s->s && mode == CV_KRON_FACTORED)
            return cv_err_set(e, CV_EINVAL, "invalid_option", "options.damping_mode",
                              "factored damping needs Kronecker factors, not EKFAC values");
        if (s->kron && (mode != CV_KRON_FORWARD || s->s) && cv_kron_block_eig(s->kron, e))
            return -1;
        if (s->kron && mode == CV_KRON_INVERSE) { /* refuse now, not in the middle of a job */
            double *w = eigvals_coords(s->kron, s->s, e);
            if (!w)
                return -1;
            for (size_t r = 0; r < s->dim; r++)
                if (!(w[r] + lambda > 0)) {
                    double v = w[r];
                    free(w);
                    return not_pd(v, e);
                }
            free(w);
        }
        if (s->kron && mode == CV_KRON_FACTORED && cv_kron_factored_weight(s->kron) == 0 &&
            !(lambda > 0))
            return not_pd(0, e);
    }
    d->mode = mode;
    d->lambda = lambda;
    memset(op, 0, sizeof *op);
    op->n = d->n;
    op->apply = diag_apply;
    op->ctx = d;
    return 0;
}

static int all_kron(const cv_kron_diag *d, cv_err *e)
{
    for (int i = 0; i < d->count; i++)
        if (!d->slots[i].kron)
            return not_exact(e);
    return 0;
}

int cv_kron_diag_trace(cv_kron_diag *d, double *out, cv_err *e)
{
    if (all_kron(d, e))
        return -1;
    double t = 0;
    for (int i = 0; i < d->count; i++) {
        double ti;
        if (cv_kron_block_trace(d->slots[i].kron, d->slots[i].s, &ti, e))
            return -1;
        t += ti;
    }
    *out = t;
    return 0;
}

int cv_kron_diag_diagonal(cv_kron_diag *d, double *diag, cv_err *e)
{
    if (all_kron(d, e))
        return -1;
    for (int i = 0; i < d->count; i++)
        if (cv_kron_block_diag(d->slots[i].kron, d->slots[i].s, diag + d->slots[i].offset, e))
            return -1;
    return 0;
}

int cv_kron_diag_logdet(cv_kron_diag *d, double lambda, double *out, cv_err *e)
{
    if (all_kron(d, e))
        return -1;
    double t = 0;
    for (int i = 0; i < d->count; i++) {
        double ti;
        if (cv_kron_block_logdet(d->slots[i].kron, d->slots[i].s, lambda, &ti, e))
            return -1;
        t += ti;
    }
    *out = t;
    return 0;
}

int cv_kron_diag_eigenvalues(cv_kron_diag *d, double *vals, cv_err *e)
{
    if (all_kron(d, e))
        return -1;
    for (int i = 0; i < d->count; i++) {
        const cv_kron_slot *s = &d->slots[i];
        if (s->s)
            memcpy(vals + s->offset, s->s, sizeof(double) * s->dim);
        else if (cv_kron_block_products(s->kron, vals + s->offset, e))
            return -1;
    }
    qsort(vals, d->n, sizeof(double), cmp_double);
    return 0;
}

int cv_kron_diag_eigen(cv_kron_diag *d, cv_which which, int k, double *vals, double *vecs,
                       int *slots, cv_err *e)
{
    if (all_kron(d, e))
        return -1;
    if (k < 1 || (size_t)k > d->n)
        return bad_k(k, d->n, e);
    size_t total = 0;
    for (int i = 0; i < d->count; i++)
        total += (size_t)k < d->slots[i].dim ? (size_t)k : d->slots[i].dim;
    kr_cand *c = kr_alloc(total, sizeof(kr_cand), "merged eigenvalues", e);
    double *v = c ? kr_alloc(total, sizeof(double), "merged eigenvalues", e) : NULL;
    int *co = v ? kr_alloc(total, sizeof(int), "merged eigenvalues", e) : NULL;
    int *sl = co ? kr_alloc(total, sizeof(int), "merged eigenvalues", e) : NULL;
    int rc = sl ? 0 : -1;
    size_t at = 0;
    for (int i = 0; !rc && i < d->count; i++) {
        const cv_kron_slot *s = &d->slots[i];
        int ki = (size_t)k < s->dim ? k : (int)s->dim;
        rc = cv_kron_block_eigen(s->kron, s->s, which, ki, v + at, co + at, NULL, e);
        for (int t = 0; !rc && t < ki; t++, at++) {
            c[at].key = which_key(which, v[at]);
            c[at].tie = (long)at; /* slot, then the slot's order */
            c[at].idx = (int)at;
            sl[at] = i;
        }
    }
    if (!rc) {
        qsort(c, total, sizeof *c, cmp_cand);
        if (vecs)
            memset(vecs, 0, sizeof(double) * d->n * (size_t)k);
        for (int t = 0; !rc && t < k; t++) {
            int r = c[t].idx;
            const cv_kron_slot *s = &d->slots[sl[r]];
            vals[t] = v[r];
            if (slots)
                slots[t] = sl[r];
            if (vecs)
                rc = cv_kron_block_eigvec(s->kron, co[r], vecs + (size_t)t * d->n + s->offset, e);
        }
    }
    free(c);
    free(v);
    free(co);
    free(sl);
    return rc;
}
