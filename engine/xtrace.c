/* xtrace.c - XTrace and XDiag (Epperly, Tropp, Webber 2024, "XTrace: making
 * the most of every sample in stochastic trace estimation"): Hutch++'s
 * low-rank sketch and Hutchinson's residual estimate with every test vector
 * used for both (exchangeability), q = max_probes / 2 test vectors, 2q
 * matvecs.  The shared sketch: Y = A W, Y = Q R, and the leave-one-out
 * directions s_i (unit columns of R^-T: Q_i Q_i^T = Q (I - s_i s_i^T) Q^T is
 * the projector on the span of Y without column i). */
#include <cblas.h>
#include <lapacke.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "est_util.h"

/* Relative size of R's smallest singular value below which A W counts as
 * rank-deficient (a rank of A below q: exact arithmetic zeros, far below
 * the float32 rounding of the products). */
#define XT_RANK_TOL 1e-10

typedef struct {
    size_t n;
    int q;               /* test vectors */
    double *W, *Y, *Q;   /* n x q: probes, A W, orth(A W) */
    double *Z;           /* n x q: A Q (A Q_r in the rank-deficient case) */
    double *S;           /* q x q: leave-one-out directions (columns) */
    int rank;            /* q, or the numerical rank r < q of A W */
} xsketch;

static void xsketch_free(xsketch *x)
{
    free(x->W);
    free(x->Y);
    free(x->Q);
    free(x->Z);
    free(x->S);
    memset(x, 0, sizeof *x);
}

/* Singular values (descending) and left vectors U (q x q) of R, R kept. */
static int svd_r(int q, const double *R, double *sv, double *U, cv_err *e)
{
    double *Rc = CV_EST_ALLOC((size_t)q * q, double, e);
    double *vt = Rc ? CV_EST_ALLOC((size_t)q * q, double, e) : NULL;
    double *sup = vt ? CV_EST_ALLOC((size_t)q, double, e) : NULL;
    if (!sup) {
        free(Rc);
        free(vt);
        return -1;
    }
    memcpy(Rc, R, (size_t)q * q * sizeof *Rc);
    lapack_int info = LAPACKE_dgesvd(LAPACK_COL_MAJOR, 'A', 'N', q, q, Rc, q, sv, U, q, vt, q,
                                     sup);
    free(Rc);
    free(vt);
    free(sup);
    return info ? cv_err_set(e, CV_EINTERNAL, "lapack_failed", "", "SVD failed (info %d)",
                             (int)info)
                : 0;
}

/* S = R^-T with unit columns. */
static int loo_directions(int q, const double *R, double *S, cv_err *e)
{
    memset(S, 0, (size_t)q * q * sizeof *S);
    for (int i = 0; i < q; i++)
        S[(size_t)i * q + i] = 1;
    /* R^T X = I: X = R^-T (R upper, so R^T lower) */
    cblas_dtrsm(CblasColMajor, CblasLeft, CblasUpper, CblasTrans, CblasNonUnit, q, q, 1.0, R, q,
                S, q);
    for (int j = 0; j < q; j++) {
        double nrm = cblas_dnrm2(q, S + (size_t)j * q, 1);
        if (!(nrm > 0) || !isfinite(nrm))
            return cv_err_set(e, CV_EINTERNAL, "internal", "", "xtrace: singular sketch");
        cblas_dscal(q, 1.0 / nrm, S + (size_t)j * q, 1);
    }
    return 0;
}

/* The sketch of op with q test vectors: W, Y = A W, Q R = Y, and either S
 * (full rank) or, when A W is rank-deficient, Q replaced by the r leading
 * left singular vectors of Y (x->rank = r): then A's range lies in span(Q)
 * and the estimators are exact.  Z = A Q in both cases.  2q (q + r)
 * matvecs. */
static int xsketch_make(const cv_linop *op, int q, cv_probe_dist dist, int block, cv_rng *rng,
                        xsketch *x, cv_err *e)
{
    size_t n = op->n, nq = n * (size_t)q;
    memset(x, 0, sizeof *x);
    x->n = n;
    x->q = q;
    x->W = CV_EST_ALLOC(nq, double, e);
    x->Y = x->W ? CV_EST_ALLOC(nq, double, e) : NULL;
    x->Q = x->Y ? CV_EST_ALLOC(nq, double, e) : NULL;
    x->Z = x->Q ? CV_EST_ALLOC(nq, double, e) : NULL;
    x->S = x->Z ? CV_EST_ALLOC((size_t)q * q, double, e) : NULL;
    double *R = x->S ? CV_EST_ALLOC((size_t)q * q, double, e) : NULL;
    double *tau = R ? CV_EST_ALLOC((size_t)q, double, e) : NULL;
    double *sv = tau ? CV_EST_ALLOC((size_t)q, double, e) : NULL;
    double *U = sv ? CV_EST_ALLOC((size_t)q * q, double, e) : NULL;
    int rc = -1;
    if (!U)
        goto done;
    int b = cv_est_block_size(n, block, q);
    for (int c = 0; c < q; c++)
        cv_est_probe(rng, dist, x->W + (size_t)c * n, n);
    if (cv_est_apply_chunked(op, q, x->W, x->Y, b, e))
        goto done;
    memcpy(x->Q, x->Y, nq * sizeof(double));
    lapack_int info = LAPACKE_dgeqrf(LAPACK_COL_MAJOR, (int)n, q, x->Q, (int)n, tau);
    for (int j = 0; !info && j < q; j++) /* R: the upper triangle */
        for (int i = 0; i <= j; i++)
            R[(size_t)j * q + i] = x->Q[(size_t)j * n + i];
    if (!info)
        info = LAPACKE_dorgqr(LAPACK_COL_MAJOR, (int)n, q, q, x->Q, (int)n, tau);
    if (info) {
        cv_err_set(e, info == LAPACK_WORK_MEMORY_ERROR ? CV_ENOMEM : CV_EINTERNAL,
                   info == LAPACK_WORK_MEMORY_ERROR ? "out_of_memory" : "lapack_failed", "",
                   "QR of the sketch failed (info %d)", (int)info);
        goto done;
    }
    if (svd_r(q, R, sv, U, e))
        goto done;
    x->rank = q;
    while (x->rank > 0 && !(sv[x->rank - 1] > XT_RANK_TOL * sv[0]))
        x->rank--;
    if (x->rank < q) { /* Q <- Q U_r: the numerical range of Y */
        cblas_dgemm(CblasColMajor, CblasNoTrans, CblasNoTrans, (int)n, x->rank, q, 1.0, x->Q,
                    (int)n, U, q, 0.0, x->Z, (int)n);
        memcpy(x->Q, x->Z, n * (size_t)x->rank * sizeof(double));
    } else if (loo_directions(q, R, x->S, e)) {
        goto done;
    }
    if (x->rank > 0 && cv_est_apply_chunked(op, x->rank, x->Q, x->Z, b, e))
        goto done;
    rc = 0;
done:
    free(R);
    free(tau);
    free(sv);
    free(U);
    if (rc)
        xsketch_free(x);
    return rc;
}

/* M (q x q) = Q^T X for n x q X. */
static void qt_times(const xsketch *x, const double *X, double *M)
{
    int n = (int)x->n, q = x->q;
    cblas_dgemm(CblasColMajor, CblasTrans, CblasNoTrans, q, q, n, 1.0, x->Q, n, X, n, 0.0, M, q);
}

/* Column i of M (q x q) <- (I - s_i s_i^T) column i, for every i. */
static void deflate_columns(const xsketch *x, double *M)
{
    int q = x->q;
    for (int i = 0; i < q; i++) {
        const double *s = x->S + (size_t)i * q;
        double *m = M + (size_t)i * q;
        cblas_daxpy(q, -cblas_ddot(q, s, 1, m, 1), s, 1, m, 1);
    }
}

static int budget(const cv_linop *op, int max_probes, int *q, cv_err *e)
{
    if (cv_est_check_op(op, e))
        return -1;
    if (max_probes < 4)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.max_probes",
                          "xtrace/xdiag need a budget of at least 4 matvecs (2 test vectors) "
                          "in options.max_probes, got %d", max_probes);
    *q = max_probes / 2;
    if ((size_t)*q > op->n)
        *q = (int)op->n;
    return 0;
}

/* Mean and stderr (ddof 1) of the q values t. */
static void mean_stderr(int q, const double *t, double *mean, double *se)
{
    cv_est_stats st = {0};
    for (int i = 0; i < q; i++)
        cv_est_stats_add(&st, t[i]);
    *mean = st.mean;
    *se = cv_est_stats_stderr(&st);
}

/* XTrace's q exchangeable estimates t_i = tr(Q_i^T A Q_i) + w_i^T P_i A P_i w_i
 * (P_i = I - Q_i Q_i^T) into t; work: 2 n x q and 2 q x q. */
static void xtrace_samples(const xsketch *x, double *t, double *AP, double *M, double *H)
{
    int n = (int)x->n, q = x->q;
    size_t nq = (size_t)n * q;
    double trq = 0;
    for (size_t k = 0; k < nq; k++)
        trq += x->Q[k] * x->Z[k];
    qt_times(x, x->Z, H); /* H = Q^T A Q */
    qt_times(x, x->W, M); /* M_i = (I - s_i s_i^T) Q^T w_i */
    deflate_columns(x, M);
    memcpy(AP, x->Y, nq * sizeof *AP); /* AP_i = A w_i - A Q M_i = A P_i w_i */
    cblas_dgemm(CblasColMajor, CblasNoTrans, CblasNoTrans, n, q, q, -1.0, x->Z, n, M, q, 1.0, AP,
                n);
    qt_times(x, AP, M);
    deflate_columns(x, M);
    cblas_dgemm(CblasColMajor, CblasNoTrans, CblasNoTrans, n, q, q, -1.0, x->Q, n, M, q, 1.0, AP,
                n); /* AP_i <- P_i A P_i w_i */
    for (int i = 0; i < q; i++) {
        const double *s = x->S + (size_t)i * q;
        double shs = 0;
        for (int a = 0; a < q; a++)
            shs += s[a] * cblas_ddot(q, H + (size_t)a * q, 1, s, 1);
        t[i] = trq - shs + cv_est_dot(x->n, x->W + (size_t)i * n, AP + (size_t)i * n);
    }
}

int cv_trace_xtrace(const cv_linop *op, const cv_trace_options *opt, cv_rng *rng,
                    cv_trace_result *out, cv_err *e)
{
    cv_trace_options def;
    opt = CV_EST_OPTIONS(opt, &def, cv_trace_options_default);
    memset(out, 0, sizeof *out);
    int q;
    if (budget(op, opt->max_probes, &q, e) || cv_est_block_check(opt->block, e))
        return -1;
    cv_progress_plan(op->progress, 2L * q);
    xsketch x;
    if (xsketch_make(op, q, opt->distribution, opt->block, rng, &x, e))
        return -1;
    size_t nq = op->n * (size_t)q;
    double *t = CV_EST_ALLOC((size_t)q, double, e);
    double *AP = t ? CV_EST_ALLOC(nq, double, e) : NULL;
    double *M = AP ? CV_EST_ALLOC((size_t)q * q, double, e) : NULL;
    double *H = M ? CV_EST_ALLOC((size_t)q * q, double, e) : NULL;
    int rc = H ? 0 : -1;
    if (!rc && x.rank == q) {
        xtrace_samples(&x, t, AP, M, H);
        mean_stderr(q, t, &out->trace, &out->std_err);
    } else if (!rc) { /* exact: tr(Q_r^T A Q_r) = tr(A) */
        for (size_t k = 0; k < op->n * (size_t)x.rank; k++)
            out->trace += x.Q[k] * x.Z[k];
        for (int i = 0; i < q; i++)
            t[i] = out->trace;
    }
    if (!rc) {
        out->probes = q;
        out->sketch = x.rank;
        out->matvecs = (long)q + x.rank;
        if (opt->return_samples) {
            out->samples = t;
            t = NULL;
        }
    }
    free(t);
    free(AP);
    free(M);
    free(H);
    xsketch_free(&x);
    return rc;
}

/* XDiag's q exchangeable estimates of the diagonal, sample i in D + i*n:
 * diag(Q_i Q_i^T A) + w_i .* (I - Q_i Q_i^T) A w_i ./ w_i.^2; work: n x q
 * (twice) and q x q. */
static void xdiag_samples(const xsketch *x, double *D, double *T1, double *T2, double *M)
{
    int n = (int)x->n, q = x->q;
    cblas_dgemm(CblasColMajor, CblasNoTrans, CblasNoTrans, n, q, q, 1.0, x->Q, n, x->S, q, 0.0,
                T1, n); /* Q S */
    cblas_dgemm(CblasColMajor, CblasNoTrans, CblasNoTrans, n, q, q, 1.0, x->Z, n, x->S, q, 0.0,
                T2, n); /* A Q S */
    /* M = Z^T W = Q^T A W, deflated column by column */
    cblas_dgemm(CblasColMajor, CblasTrans, CblasNoTrans, q, q, n, 1.0, x->Z, n, x->W, n, 0.0, M,
                q);
    deflate_columns(x, M);
    for (size_t k = 0; k < (size_t)n; k++) {
        double base = 0;
        for (int j = 0; j < q; j++)
            base += x->Q[(size_t)j * n + k] * x->Z[(size_t)j * n + k];
        for (int i = 0; i < q; i++)
            D[(size_t)i * n + k] = base - T1[(size_t)i * n + k] * T2[(size_t)i * n + k];
    }
    /* + w_i .* (A w_i - Q M_i) ./ w_i.^2 */
    memcpy(T1, x->Y, (size_t)n * q * sizeof *T1);
    cblas_dgemm(CblasColMajor, CblasNoTrans, CblasNoTrans, n, q, q, -1.0, x->Q, n, M, q, 1.0, T1,
                n);
    for (size_t k = 0; k < (size_t)n * q; k++)
        D[k] += x->W[k] != 0 ? T1[k] / x->W[k] : 0;
}

int cv_diag_xdiag(const cv_linop *op, const cv_diag_options *opt, cv_rng *rng,
                  cv_diag_result *out, cv_err *e)
{
    cv_diag_options def;
    opt = CV_EST_OPTIONS(opt, &def, cv_diag_options_default);
    memset(out, 0, sizeof *out);
    int q;
    if (budget(op, opt->max_probes, &q, e) || cv_est_block_check(opt->block, e))
        return -1;
    if (opt->distribution != CV_PROBE_RADEMACHER)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.distribution",
                          "xdiag needs Rademacher probes (w .* A w ./ w.^2 has no mean for "
                          "Gaussian w)");
    size_t n = op->n, nq = n * (size_t)q;
    cv_progress_plan(op->progress, 2L * q);
    out->n = n;
    out->diag = CV_EST_ALLOC(n, double, e);
    out->std_err = out->diag ? CV_EST_ALLOC(n, double, e) : NULL;
    if (!out->std_err) {
        cv_diag_result_free(out);
        return -1;
    }
    xsketch x;
    if (xsketch_make(op, q, opt->distribution, opt->block, rng, &x, e)) {
        cv_diag_result_free(out);
        return -1;
    }
    double *D = x.rank == q ? CV_EST_ALLOC(nq, double, e) : NULL;
    double *T1 = D ? CV_EST_ALLOC(nq, double, e) : NULL;
    double *T2 = T1 ? CV_EST_ALLOC(nq, double, e) : NULL;
    double *M = T2 ? CV_EST_ALLOC((size_t)q * q, double, e) : NULL;
    int rc = x.rank < q || M ? 0 : -1;
    if (!rc && x.rank == q) {
        xdiag_samples(&x, D, T1, T2, M);
        double *row = T2; /* q values of entry k */
        for (size_t k = 0; k < n; k++) {
            for (int i = 0; i < q; i++)
                row[i] = D[(size_t)i * n + k];
            mean_stderr(q, row, &out->diag[k], &out->std_err[k]);
        }
    } else if (!rc) { /* exact: diag(Q_r Q_r^T A) = diag(A) */
        for (int j = 0; j < x.rank; j++)
            for (size_t k = 0; k < n; k++)
                out->diag[k] += x.Q[(size_t)j * n + k] * x.Z[(size_t)j * n + k];
    }
    if (!rc) {
        out->probes = q;
        out->matvecs = (long)q + x.rank;
    } else {
        cv_diag_result_free(out);
    }
    free(D);
    free(T1);
    free(T2);
    free(M);
    xsketch_free(&x);
    return rc;
}

/* ---- XNysTrace --------------------------------------------------------------------- */

/* XNysTrace's q exchangeable estimates of tr(M) from W and Y = M W (M PSD):
 * with the shift nu (M + nu I, removed again), H = W^T Y, G = Y^T Y and
 * K = H^-1, the Nystrom approximation from W without w_i plus Hutchinson on
 * its residual with w_i is t_i = tr(K G) - (K G K)_ii / K_ii + 1 / K_ii - nu n
 * (block-inverse identities).  Y is shifted in place. */
static int xnys_samples(size_t n, int q, const double *W, double *Y, double *t, cv_err *e)
{
    double ss = 0;
    for (int c = 0; c < q; c++) {
        double cn = cblas_dnrm2((int)n, Y + (size_t)c * n, 1);
        ss += cn * cn;
    }
    double nu = 1e-6 * sqrt(ss / (double)q);
    for (int c = 0; c < q; c++)
        cblas_daxpy((int)n, nu, W + (size_t)c * n, 1, Y + (size_t)c * n, 1);
    double *K = CV_EST_ALLOC((size_t)q * q, double, e);
    double *G = K ? CV_EST_ALLOC((size_t)q * q, double, e) : NULL;
    double *P = G ? CV_EST_ALLOC((size_t)q * q, double, e) : NULL;
    int rc = -1;
    if (!P)
        goto done;
    cblas_dgemm(CblasColMajor, CblasTrans, CblasNoTrans, q, q, (int)n, 1.0, W, (int)n, Y, (int)n,
                0.0, K, q); /* H */
    for (int j = 0; j < q; j++) /* symmetrize */
        for (int i = 0; i < j; i++)
            K[(size_t)j * q + i] = K[(size_t)i * q + j] =
                0.5 * (K[(size_t)j * q + i] + K[(size_t)i * q + j]);
    lapack_int info = LAPACKE_dpotrf(LAPACK_COL_MAJOR, 'U', q, K, q);
    if (info > 0) {
        cv_err_set(e, CV_EINVAL, "not_positive_definite", "options.method",
                   "xnystrace needs a positive semi-definite matrix: W^T A W is indefinite "
                   "(use hutchinson, hutch++ or xtrace)");
        goto done;
    }
    if (!info)
        info = LAPACKE_dpotri(LAPACK_COL_MAJOR, 'U', q, K, q);
    if (info) {
        cv_err_set(e, CV_EINTERNAL, "lapack_failed", "", "xnystrace: inverse failed (info %d)",
                   (int)info);
        goto done;
    }
    for (int j = 0; j < q; j++)
        for (int i = j + 1; i < q; i++)
            K[(size_t)j * q + i] = K[(size_t)i * q + j];
    cblas_dgemm(CblasColMajor, CblasTrans, CblasNoTrans, q, q, (int)n, 1.0, Y, (int)n, Y, (int)n,
                0.0, G, q);
    cblas_dgemm(CblasColMajor, CblasNoTrans, CblasNoTrans, q, q, q, 1.0, K, q, G, q, 0.0, P, q);
    double tkg = 0;
    for (int i = 0; i < q; i++)
        tkg += P[(size_t)i * q + i];
    for (int i = 0; i < q; i++) {
        double kii = K[(size_t)i * q + i], kgk = 0;
        for (int b = 0; b < q; b++)
            kgk += P[(size_t)b * q + i] * K[(size_t)i * q + b];
        t[i] = tkg - kgk / kii + 1.0 / kii - nu * (double)n;
    }
    rc = 0;
done:
    free(K);
    free(G);
    free(P);
    return rc;
}

/* The q estimates of tr(A^power) (power 1 or 2) from q test vectors:
 * Y = A W, or A (A W); q * power matvecs. */
static int xnys_run(const cv_linop *op, const cv_trace_options *o, int q, int power,
                    cv_rng *rng, double *t, cv_err *e)
{
    size_t n = op->n, nq = n * (size_t)q;
    int b = cv_est_block_size(n, o->block, q);
    double *W = CV_EST_ALLOC(nq, double, e);
    double *Y = W ? CV_EST_ALLOC(nq, double, e) : NULL;
    double *Y2 = Y && power == 2 ? CV_EST_ALLOC(nq, double, e) : NULL;
    int rc = -1;
    if (!Y || (power == 2 && !Y2))
        goto done;
    for (int c = 0; c < q; c++)
        cv_est_probe(rng, o->distribution, W + (size_t)c * n, n);
    if (cv_est_apply_chunked(op, q, W, Y, b, e) ||
        (power == 2 && cv_est_apply_chunked(op, q, Y, Y2, b, e)))
        goto done;
    rc = xnys_samples(n, q, W, power == 2 ? Y2 : Y, t, e);
done:
    free(W);
    free(Y);
    free(Y2);
    return rc;
}

int cv_trace_xnystrace(const cv_linop *op, const cv_trace_options *opt, int power,
                       cv_rng *rng, cv_trace_result *out, cv_err *e)
{
    cv_trace_options def;
    opt = CV_EST_OPTIONS(opt, &def, cv_trace_options_default);
    memset(out, 0, sizeof *out);
    if (cv_est_check_op(op, e) || cv_est_block_check(opt->block, e))
        return -1;
    if (power != 1 && power != 2)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "power", "power must be 1 or 2");
    int q = opt->max_probes / power;
    if (q < 2)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.max_probes",
                          "xnystrace needs a budget of at least %d matvecs (2 test vectors) in "
                          "options.max_probes, got %d", 2 * power, opt->max_probes);
    if ((size_t)q > op->n)
        q = (int)op->n;
    cv_progress_plan(op->progress, (long)q * power);
    double *t = CV_EST_ALLOC((size_t)q, double, e);
    if (!t || xnys_run(op, opt, q, power, rng, t, e)) {
        free(t);
        return -1;
    }
    mean_stderr(q, t, &out->trace, &out->std_err);
    out->probes = q;
    out->matvecs = (long)q * power;
    if (opt->return_samples)
        out->samples = t;
    else
        free(t);
    return 0;
}
