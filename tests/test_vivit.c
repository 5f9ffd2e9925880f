/* test_vivit.c - engine/vivit.c and api/ops_vivit.c against dense oracles:
 * Gram eigenvalues vs the dense GGN / fisher_mc / diagonal blocks / sub-batch
 * GGN (LAPACK dsyev), eigenvectors (orthonormal, G e = lambda e via
 * cv_curv_matvec), gamma/lambda vs dense per-sample gradients and per-sample
 * GGNs, full damped Newton vs dposv on G + delta I, directional Newton vs the
 * dense eigenspace formula, SNRs on the noisy quadratic of 002 B.4/B.5,
 * bootstrap damping (and against an independent re-derivation of its
 * resampling), per-layer gradient SNR, and the ops through cv_job_run: per-layer
 * block Newton vs dense solves on the GGN's diagonal blocks, newton vivit with
 * mc / subsample vs the dense MC Fisher / sub-batch GGN, gram_path, residuals.
 * make_variant covers N*C < D and N*C > D (clipped Gram eigenvalues), mean and
 * sum reductions, for the spectrum, gamma/lambda/SNR and both Newton modes. */
#include "testutil.h"

#include <cJSON.h>
#include <cblas.h>

#include "api/job.h"
#include "api/op_util.h"
#include "engine/loss.h"
#include "engine/vivit.h"

typedef tu_fixture fixture;

static const cv_layer_class *const acts[] = {&cv_tanh_class, &cv_relu_class, &cv_sigmoid_class};
static const cv_loss_type losses[] = {CV_LOSS_CE, CV_LOSS_MSE, CV_LOSS_BCE};

/* _i: activation * 12 + loss * 4 + reduction * 2 + (N*C > D) */
static void make_variant(fixture *f, int i, const cv_curv_options *co)
{
    tu_layer net[] = {{&cv_linear_class, 6}, {acts[i / 12], 0}, {&cv_linear_class, 4},
                      {acts[i / 12], 0},     {&cv_linear_class, 3}};
    size_t n = (i % 2) ? 40 : 7; /* D = 79: 40 * 3 > D leaves zero Gram eigenvalues */
    tu_fx_make(f, 5, net, 5, losses[(i / 4) % 3], (cv_reduction)((i / 2) % 2), n,
               31 + (uint64_t)i, co);
}
#define NVARIANTS 36

/* Eigenvalues of a dense symmetric matrix, descending. */
static double *eigs_desc(const double *A, int n)
{
    double *w = malloc(sizeof(double) * (size_t)n);
    tu_eigvalsh(A, n, w);
    for (int i = 0; i < n / 2; i++) {
        double t = w[i];
        w[i] = w[n - 1 - i];
        w[n - 1 - i] = t;
    }
    return w;
}

static void vivit_make(cv_vivit *v, cv_curv *c, const cv_block *b, const cv_vivit_options *o)
{
    cv_err e;
    ck_assert_msg(cv_vivit_init(v, c, b, o, &e) == 0, "init: %s", e.message);
    ck_assert_msg(cv_vivit_eigh(v, &e) == 0, "eigh: %s", e.message);
}

/* The vivit eigenvalues are the dense ones above the threshold: every dense
 * eigenvalue above 10x the threshold is there, and they agree to 1e-5
 * relative (plus 1e-6 lambda_max for float32 noise). */
static void compare_spectrum(const cv_vivit *v, const double *w, int n, const char *what)
{
    double lmax = w[0], thr = v->threshold_used;
    int want = 0;
    while (want < n && w[want] > 10 * thr)
        want++;
    ck_assert_msg(v->rank >= want && v->rank <= n, "%s: rank %d, dense above 10 thr %d of %d",
                  what, v->rank, want, n);
    for (int k = 0; k < v->rank; k++) {
        double d = fabs(v->eigenvalues[k] - w[k]);
        ck_assert_msg(d <= 1e-5 * fabs(w[k]) + 1e-6 * lmax, "%s: lambda_%d %.10g vs dense %.10g",
                      what, k, v->eigenvalues[k], w[k]);
    }
}

START_TEST(gram_eigenvalues_match_dense_ggn)
{
    fixture f;
    make_variant(&f, _i, NULL);
    double *G = tu_dense(&f, CV_CURV_GGN, &f.full);
    double *w = eigs_desc(G, (int)f.full.dim);
    cv_vivit v;
    vivit_make(&v, f.c, &f.full, NULL);
    ck_assert_int_eq(v.R, (int)f.d.n * 3);
    char what[64];
    snprintf(what, sizeof what, "variant %d", _i);
    compare_spectrum(&v, w, (int)f.full.dim, what);
    /* CE roots have rank C-1: N of the Gram eigenvalues are clipped */
    if (f.m.loss == CV_LOSS_CE && f.d.n * 3 < f.full.dim)
        ck_assert_int_le(v.rank, (int)f.d.n * 2);
    cv_vivit_free(&v);
    free(G);
    free(w);
    tu_fx_free(&f);
}
END_TEST

START_TEST(eigenvectors_orthonormal_and_satisfy_ge)
{
    fixture f;
    make_variant(&f, _i, NULL);
    cv_vivit v;
    vivit_make(&v, f.c, &f.full, NULL);
    size_t D = f.full.dim;
    int K = v.rank;
    double *E = malloc(sizeof(double) * D * K), *GE = malloc(sizeof(double) * D * K);
    cv_err e;
    ck_assert_int_eq(cv_vivit_eigenvectors(&v, K, E, &e), 0);
    ck_assert_int_eq(cv_curv_matvec(f.c, CV_CURV_GGN, &f.full, K, E, GE, &e), 0);
    double lmax = v.eigenvalues[0];
    int checked = 0;
    for (int a = 0; a < K; a++) {
        for (int b = 0; b < K; b++) {
            double d = tu_dot(E + a * D, E + b * D, D);
            /* float32 products: eigenvectors of nearly equal eigenvalues mix */
            double tol = 1e-4 * lmax / fmax(fabs(v.eigenvalues[a] - v.eigenvalues[b]), lmax * 1e-3);
            ck_assert_msg(fabs(d - (a == b)) <= fmax(tol, 1e-5), "variant %d: e_%d . e_%d = %g",
                          _i, a, b, d);
        }
        double r = 0;
        for (size_t q = 0; q < D; q++)
            r += pow(GE[a * D + q] - v.eigenvalues[a] * E[a * D + q], 2);
        ck_assert_msg(sqrt(r) <= 1e-4 * lmax, "variant %d: |G e - lambda e|_%d = %g (lmax %g)",
                      _i, a, sqrt(r), lmax);
        /* Per eigenpair: float32 products leave an error floor proportional to
         * lambda_max (rounding of the largest terms, measured <= 5.3e-7 lambda_max
         * over the 36 variants) plus a relative part (measured <= 8.5e-7 for
         * lambda_k > 0.1 lambda_max): |r_k| <= 1e-5 lambda_k + 1e-6 lambda_max,
         * i.e. |r_k| / lambda_k <= 1.01e-3 for lambda_k > 1e-3 lambda_max (the
         * measured worst case uses 52% of it).  Below 1e-3 lambda_max the floor
         * dominates and only the bound above applies. */
        if (v.eigenvalues[a] > 1e-3 * lmax) {
            checked++;
            ck_assert_msg(sqrt(r) <= 1e-5 * v.eigenvalues[a] + 1e-6 * lmax,
                          "variant %d: |G e - lambda e|_%d = %g, lambda %g (lmax %g)", _i, a,
                          sqrt(r), v.eigenvalues[a], lmax);
        }
    }
    ck_assert_int_ge(checked, 2);
    /* the Gram came from the Linear layers' kernels, V was never formed */
    ck_assert_int_eq(v.gram_path, CV_VIVIT_GRAM_KERNEL);
    free(E);
    free(GE);
    cv_vivit_free(&v);
    tu_fx_free(&f);
}
END_TEST

START_TEST(layer_blocks_match_dense_diagonal_blocks)
{
    fixture f;
    make_variant(&f, _i * 4 + 1, NULL);
    cv_block blocks[8];
    int nb = cv_blocks_per_layer(&f.m, blocks, 8);
    int w0 = 0; /* and a block with one tensor: the first weight */
    ck_assert_int_eq(cv_block_from_indices(&f.m, &w0, 1, &blocks[nb], NULL), 0);
    for (int i = 0; i <= nb; i++) {
        double *A = tu_dense(&f, CV_CURV_GGN, &blocks[i]);
        double *w = eigs_desc(A, (int)blocks[i].dim);
        cv_vivit v;
        vivit_make(&v, f.c, &blocks[i], NULL);
        char what[64];
        snprintf(what, sizeof what, "variant %d block %d", _i * 4 + 1, i);
        compare_spectrum(&v, w, (int)blocks[i].dim, what);
        cv_vivit_free(&v);
        free(A);
        free(w);
    }
    tu_fx_free(&f);
}
END_TEST

START_TEST(mc_gram_matches_dense_fisher_mc)
{
    int mcs[] = {1, 3};
    for (int t = 0; t < 2; t++) {
        cv_curv_options co = {.mc_samples = mcs[t], .seed = 1234 + (uint64_t)_i};
        fixture f;
        make_variant(&f, _i * 4, &co);
        double *F = tu_dense(&f, CV_CURV_FISHER_MC, &f.full);
        double *w = eigs_desc(F, (int)f.full.dim);
        cv_vivit_options o;
        cv_vivit_options_default(&o);
        o.mc = mcs[t];
        o.mc_seed = co.seed;
        cv_vivit v;
        vivit_make(&v, f.c, &f.full, &o);
        ck_assert_int_eq(v.R, (int)f.d.n * mcs[t]);
        char what[64];
        snprintf(what, sizeof what, "variant %d mc %d", _i * 4, mcs[t]);
        compare_spectrum(&v, w, (int)f.full.dim, what);
        cv_vivit_free(&v);
        free(F);
        free(w);
        tu_fx_free(&f);
    }
}
END_TEST

/* Sub-sampled Gram = (N/ns) * GGN of the sub-batch in the batch's scale; the
 * masked path, a sub-batch engine and the explicit factor agree. */
START_TEST(subsample_matches_dense_sub_batch_ggn)
{
    fixture f;
    make_variant(&f, _i * 4 + 1, NULL); /* N = 40 */
    int n = (int)f.d.n, *idx = malloc(sizeof(int) * n);
    int ns = cv_vivit_subsample(n, 0.25, 99, idx);
    ck_assert_int_eq(ns, 10);
    int *idx2 = malloc(sizeof(int) * n);
    ck_assert_int_eq(cv_vivit_subsample(n, 0.25, 99, idx2), 10);
    ck_assert_mem_eq(idx, idx2, sizeof(int) * 10);
    size_t *sidx = malloc(sizeof(size_t) * ns);
    for (int i = 0; i < ns; i++)
        sidx[i] = (size_t)idx[i];
    cv_batch sb;
    cv_err e;
    ck_assert_int_eq(cv_batch_gather(&f.d, sidx, (size_t)ns, &sb, &e), 0);
    cv_curv *sc = cv_curv_new(&f.m, &sb, NULL, &e);
    ck_assert_ptr_nonnull(sc);
    size_t D = f.full.dim;
    double *A = malloc(sizeof(double) * D * D);
    ck_assert_int_eq(cv_curv_dense(sc, CV_CURV_GGN, &f.full, 4096, A, &e), 0);
    int C = 3;
    double cf = cv_loss_scale(f.m.loss, f.m.reduction, (size_t)n, C);
    double cs = cv_loss_scale(f.m.loss, f.m.reduction, (size_t)ns, C);
    for (size_t q = 0; q < D * D; q++)
        A[q] *= (double)n / ns * cf / cs;
    double *w = eigs_desc(A, (int)D);
    cv_vivit v[3];
    for (int mode = 0; mode < 3; mode++) {
        cv_vivit_options o;
        cv_vivit_options_default(&o);
        o.subset = idx;
        o.n_subset = ns;
        o.subset_curv = mode == 1 ? sc : NULL;
        o.explicit_factor = mode == 2;
        vivit_make(&v[mode], f.c, &f.full, &o);
        ck_assert_int_eq(v[mode].R, ns * C);
        ck_assert_int_eq(v[mode].gram_path, mode == 2 ? CV_VIVIT_GRAM_EXPLICIT
                                                      : CV_VIVIT_GRAM_KERNEL);
        char what[64];
        snprintf(what, sizeof what, "variant %d subsample mode %d", _i * 4 + 1, mode);
        compare_spectrum(&v[mode], w, (int)D, what);
    }
    ck_assert_int_eq(v[0].rank, v[1].rank);
    for (int k = 0; k < v[0].rank; k++)
        ck_assert_double_eq_tol(v[0].eigenvalues[k], v[1].eigenvalues[k],
                                1e-6 * v[0].eigenvalues[0]);
    for (int mode = 0; mode < 3; mode++)
        cv_vivit_free(&v[mode]);
    cv_curv_free(sc);
    tu_data_free(&sb);
    free(idx);
    free(idx2);
    free(sidx);
    free(A);
    free(w);
    tu_fx_free(&f);
}
END_TEST

START_TEST(refuses_too_many_columns)
{
    fixture f;
    make_variant(&f, 1, NULL);
    cv_vivit_options o;
    cv_vivit_options_default(&o);
    o.max_columns = 100; /* N*C = 120 */
    cv_vivit v;
    cv_err e;
    ck_assert_int_eq(cv_vivit_init(&v, f.c, &f.full, &o, &e), -1);
    ck_assert_int_eq(e.status, CV_ETOOLARGE);
    ck_assert_ptr_nonnull(strstr(e.message, "options.mc"));
    o.mc = 1; /* 40 columns fit */
    ck_assert_int_eq(cv_vivit_init(&v, f.c, &f.full, &o, &e), 0);
    cv_vivit_free(&v);
    tu_fx_free(&f);
}
END_TEST

/* Per-sample GGN G_n = J_n^T S_n S_n^T J_n from one-sample vjp cotangents. */
static void per_sample_ggn(fixture *f, int n, double *Gn)
{
    int C = 3, N = (int)f->d.n;
    size_t D = f->full.dim;
    double S[9], *col = malloc(sizeof(double) * D);
    float *cot = calloc((size_t)N * C, sizeof(float));
    cv_loss_hessian_sqrt(cv_curv_loss_state(f->c), n, S);
    memset(Gn, 0, sizeof(double) * D * D);
    cv_err e;
    for (int j = 0; j < C; j++) {
        for (int c = 0; c < C; c++)
            cot[n * C + c] = (float)S[c * C + j];
        ck_assert_int_eq(cv_curv_vjp(f->c, &f->full, 1, cot, col, &e), 0);
        for (size_t a = 0; a < D; a++)
            for (size_t b = 0; b < D; b++)
                Gn[a * D + b] += col[a] * col[b];
    }
    free(col);
    free(cot);
}

START_TEST(gamma_lambda_match_dense_per_sample)
{
    fixture f;
    make_variant(&f, _i, NULL); /* all variants: N*C > D clips Gram eigenvalues */
    cv_vivit v;
    vivit_make(&v, f.c, &f.full, NULL);
    size_t D = f.full.dim;
    int N = (int)f.d.n, K = v.rank < 5 ? v.rank : 5;
    double *E = malloc(sizeof(double) * D * K), *PG = malloc(sizeof(double) * N * D);
    double *Gn = malloc(sizeof(double) * D * D), *Gsum = calloc(D * D, sizeof(double));
    double *g = malloc(sizeof(double) * D), *tmp = malloc(sizeof(double) * D);
    double *go = malloc(sizeof(double) * N * K), *lo = malloc(sizeof(double) * N * K);
    cv_err e;
    ck_assert_int_eq(cv_vivit_eigenvectors(&v, K, E, &e), 0);
    cv_vivit_derivs d;
    ck_assert_int_eq(cv_vivit_directional(&v, K, E, &d, &e), 0);
    ck_assert_int_eq(cv_curv_per_sample_gradients(f.c, &f.full, PG, &e), 0);
    ck_assert_int_eq(cv_curv_gradient(f.c, &f.full, g, &e), 0);
    double gscale = 0, lscale = v.eigenvalues[0];
    int snr_checked = 0;
    for (int n = 0; n < N; n++)
        for (int k = 0; k < K; k++)
            gscale = fmax(gscale, fabs(N * tu_dot(E + k * D, PG + n * D, D)));
    for (int n = 0; n < N; n++) {
        per_sample_ggn(&f, n, Gn);
        for (size_t q = 0; q < D * D; q++)
            Gsum[q] += Gn[q];
        for (int k = 0; k < K; k++) {
            double gam = N * tu_dot(E + k * D, PG + n * D, D);
            cblas_dgemv(CblasColMajor, CblasNoTrans, (int)D, (int)D, 1.0, Gn, (int)D, E + k * D,
                        1, 0.0, tmp, 1);
            double lam = N * tu_dot(E + k * D, tmp, D);
            go[k * N + n] = gam;
            lo[k * N + n] = lam;
            ck_assert_msg(fabs(d.gamma[k * N + n] - gam) <= 1e-4 * gscale,
                          "variant %d gamma[%d,%d] %g vs %g", _i, n, k, d.gamma[k * N + n], gam);
            ck_assert_msg(fabs(d.lambda[k * N + n] - lam) <= 1e-4 * N * lscale,
                          "variant %d lambda[%d,%d] %g vs %g", _i, n, k, d.lambda[k * N + n],
                          lam);
        }
    }
    /* the oracle's G_n sum to the GGN; the means are e^T g and lambda_k */
    double *G = tu_dense(&f, CV_CURV_GGN, &f.full);
    ck_assert_double_le(tu_relerr(Gsum, G, D * D, 1e-12), 1e-5);
    for (int k = 0; k < K; k++) {
        cv_vivit_stat sg, sl;
        cv_vivit_stats(d.gamma + k * N, N, &sg);
        cv_vivit_stats(d.lambda + k * N, N, &sl);
        ck_assert_double_le(fabs(sg.mean - tu_dot(E + k * D, g, D)), 1e-4 * gscale);
        ck_assert_double_le(fabs(sl.mean - v.eigenvalues[k]), 1e-4 * lscale);
        /* SNR from the oracle's samples by the textbook formula (ddof 1): the
         * samples agree to 1e-4 of their scale, so the SNR does to 1e-3 unless
         * the variance is a tiny difference of big numbers (skipped) */
        for (int which = 0; which < 2; which++) {
            const double *x = which ? lo + k * N : go + k * N;
            double mu = 0, ss = 0, mx = 0;
            for (int n = 0; n < N; n++)
                mu += x[n] / N, mx = fmax(mx, fabs(x[n]));
            for (int n = 0; n < N; n++)
                ss += (x[n] - mu) * (x[n] - mu);
            double var = ss / (N - 1), snr = mu * mu / var;
            const cv_vivit_stat *st = which ? &sl : &sg;
            if (var < 1e-4 * mx * mx)
                continue;
            ck_assert_msg(fabs(st->var - var) <= 1e-3 * var && fabs(st->snr - snr) <= 1e-3 * snr +
                          1e-6, "variant %d %s SNR_%d %g vs %g (var %g vs %g)", _i,
                          which ? "lambda" : "gamma", k, st->snr, snr, st->var, var);
            snr_checked++;
        }
    }
    ck_assert_int_gt(snr_checked, 0);
    cv_vivit_derivs_free(&d);
    free(go); free(lo);
    free(E); free(PG); free(Gn); free(Gsum); free(g); free(tmp); free(G);
    cv_vivit_free(&v);
    tu_fx_free(&f);
}
END_TEST

/* Full damped Newton (matrix inversion lemma) vs dposv on the dense G + delta I,
 * at delta = 0.05 and 1e-3 lambda_max.  Both sides use float32 Jacobian
 * products, so G is known to eps_G ~ 1e-7 lambda_max (relative to lambda_max,
 * the size of the Gram's noise eigenvalues, see vivit.h); a perturbation of the
 * matrix by eps_G moves the solution by up to kappa * eps_G / lambda_max
 * relative, kappa = (lambda_max + delta) / delta the condition number of
 * G + delta I on the range the gradient lives in.  The tolerance is
 * 1e-6 * kappa + 2e-6 (10x eps_G for the gradient's own float32 error):
 * 2.3e-5 at 0.05 lambda_max, 1e-3 at 1e-3 lambda_max. */
START_TEST(full_newton_matches_dense_solve)
{
    fixture f;
    make_variant(&f, _i, NULL); /* all variants: N*C < D and N*C > D, mean and sum */
    size_t D = f.full.dim;
    double *G0 = tu_dense(&f, CV_CURV_GGN, &f.full), *g = malloc(sizeof(double) * D);
    double *G = malloc(sizeof(double) * D * D);
    double *s = malloc(sizeof(double) * D), *Gs = malloc(sizeof(double) * D);
    cv_err e;
    ck_assert_int_eq(cv_curv_gradient(f.c, &f.full, g, &e), 0);
    for (size_t a = 0; a < D; a++) /* symmetrize float noise */
        for (size_t b = 0; b < a; b++)
            G0[a * D + b] = G0[b * D + a] = 0.5 * (G0[a * D + b] + G0[b * D + a]);
    double *w = eigs_desc(G0, (int)D);
    cv_vivit v;
    ck_assert_int_eq(cv_vivit_init(&v, f.c, &f.full, NULL, &e), 0);
    double *step = malloc(sizeof(double) * D), pred;
    const double rel_delta[2] = {0.05, 1e-3};
    for (int t = 0; t < 2; t++) {
        double delta = rel_delta[t] * w[0], kappa = (w[0] + delta) / delta;
        memcpy(G, G0, sizeof(double) * D * D);
        for (size_t i = 0; i < D; i++) {
            G[i * D + i] += delta;
            s[i] = -g[i];
        }
        ck_assert_int_eq(LAPACKE_dposv(LAPACK_COL_MAJOR, 'U', (int)D, 1, G, (int)D, s, (int)D),
                         0);
        ck_assert_int_eq(cv_vivit_newton_full(&v, delta, step, &pred, &e), 0);
        double err = tu_relerr(step, s, D, 1e-12), tol = 1e-6 * kappa + 2e-6;
        ck_assert_msg(err < tol, "variant %d full Newton (delta %g lambda_max) rel err %g > %g",
                      _i, rel_delta[t], err, tol);
        ck_assert_int_eq(cv_curv_matvec(f.c, CV_CURV_GGN, &f.full, 1, step, Gs, &e), 0);
        double want = tu_dot(g, step, D) + 0.5 * tu_dot(step, Gs, D);
        ck_assert_double_le(fabs(pred - want), 1e-4 * fabs(want) + 1e-12);
    }
    ck_assert_int_eq(cv_vivit_newton_full(&v, 0.0, step, &pred, &e), -1);
    ck_assert_int_eq(e.status, CV_EINVAL);
    cv_vivit_free(&v);
    free(G0); free(G); free(g); free(s); free(Gs); free(w); free(step);
    tu_fx_free(&f);
}
END_TEST

START_TEST(directional_newton_all_matches_dense_eigenspace)
{
    fixture f;
    make_variant(&f, _i, NULL); /* all variants, N*C < D and N*C > D */
    size_t D = f.full.dim;
    double *G = tu_dense(&f, CV_CURV_GGN, &f.full), *g = malloc(sizeof(double) * D);
    double *w = malloc(sizeof(double) * D), *s = calloc(D, sizeof(double));
    cv_err e;
    ck_assert_int_eq(cv_curv_gradient(f.c, &f.full, g, &e), 0);
    for (size_t a = 0; a < D; a++)
        for (size_t b = 0; b < a; b++)
            G[a * D + b] = G[b * D + a] = 0.5 * (G[a * D + b] + G[b * D + a]);
    ck_assert_int_eq(LAPACKE_dsyev(LAPACK_COL_MAJOR, 'V', 'U', (int)D, G, (int)D, w), 0);
    cv_vivit v;
    vivit_make(&v, f.c, &f.full, NULL);
    double delta = 0.1 * v.eigenvalues[0];
    int used = 0;
    for (int i = (int)D - 1; i >= 0 && w[i] > v.threshold_used; i--, used++) {
        double tau = -tu_dot(G + (size_t)i * D, g, D) / (w[i] + delta);
        for (size_t q = 0; q < D; q++)
            s[q] += tau * G[(size_t)i * D + q];
    }
    ck_assert_int_eq(used, v.rank);
    cv_vivit_damping dm;
    cv_vivit_damping_default(&dm);
    dm.damping = delta;
    cv_vivit_newton r;
    ck_assert_int_eq(cv_vivit_newton_directional(&v, v.rank, &dm, &r, &e), 0);
    /* directions with lambda ~ 1e-6 lambda_max (the default clip) carry the
     * float32 Jacobians' error on both sides: 5e-4 for k = all ... */
    double err = tu_relerr(r.step, s, D, 1e-12);
    ck_assert_msg(err < 5e-4, "variant %d directional Newton rel err %g", _i, err);
    /* ... and 1e-5 over the directions above 1e-3 lambda_max */
    int k3 = 0;
    while (k3 < v.rank && v.eigenvalues[k3] > 1e-3 * v.eigenvalues[0])
        k3++;
    memset(s, 0, sizeof(double) * D);
    for (int i = (int)D - 1; i >= (int)D - k3; i--) {
        double tau = -tu_dot(G + (size_t)i * D, g, D) / (w[i] + delta);
        for (size_t q = 0; q < D; q++)
            s[q] += tau * G[(size_t)i * D + q];
    }
    cv_vivit_newton r3;
    ck_assert_int_eq(cv_vivit_newton_directional(&v, k3, &dm, &r3, &e), 0);
    err = tu_relerr(r3.step, s, D, 1e-12);
    ck_assert_msg(err < 1e-5, "variant %d directional Newton (k = %d) rel err %g", _i, k3,
                  err);
    cv_vivit_newton_free(&r3);
    /* predicted change of the quadratic model in the eigenspace */
    double *Gs = malloc(sizeof(double) * D);
    ck_assert_int_eq(cv_curv_matvec(f.c, CV_CURV_GGN, &f.full, 1, r.step, Gs, &e), 0);
    double want = tu_dot(g, r.step, D) + 0.5 * tu_dot(r.step, Gs, D);
    ck_assert_double_le(fabs(r.predicted_change - want), 1e-4 * fabs(want) + 1e-12);
    cv_vivit_newton_free(&r);
    cv_vivit_free(&v);
    free(G); free(g); free(w); free(s); free(Gs);
    tu_fx_free(&f);
}
END_TEST

/* ---- noisy quadratic (002 B.4/B.5) --------------------------------------------
 * Linear(1 -> P, no bias) with weight theta = 0, then Linear(P -> P, no bias)
 * with weight diag(s), MSELoss "sum".  On the block {0.weight} (theta):
 * J_n = x_n diag(s), G_n = 2 x_n^2 diag(s^2), so the eigenvectors are the unit
 * vectors (s descending), lambda_nd = N 2 x_n^2 s_d^2 and, with targets
 * y_nd = -gamma_nd / (2 N s_d x_n), gamma_nd = N e_d^T grad L_n is exactly the
 * planted draw gamma_nd ~ mu_d + N(0, 1); x_n^2 ~ Gamma(4) gives lambda an SNR
 * of 4 in every direction. */
#define NQ_P 4
#define NQ_N 256
static const double nq_s[NQ_P] = {3.0, 2.0, 1.5, 1.0};
static const double nq_mu[NQ_P] = {2.0, 1.0, 0.5, 0.2};

typedef struct {
    cv_model m;
    cv_dataset d;
    cv_curv *c;
    cv_block theta;
    double gamma[NQ_P][NQ_N], x2[NQ_N];
} noisy_quad;

static double gamma4(cv_rng *r)
{
    double s = 0; /* Gamma(4, 1) as a sum of four Exp(1) */
    for (int i = 0; i < 4; i++)
        s -= log(1.0 - cv_rng_uniform(r));
    return s;
}

static void nq_model(cv_model *m)
{
    memset(m, 0, sizeof *m);
    m->input_shape.rank = 1;
    m->input_shape.dim[0] = 1;
    m->nlayers = 2;
    m->loss = CV_LOSS_MSE;
    m->reduction = CV_RED_SUM;
    cv_layer_init(&m->layers[0], &cv_linear_class);
    cv_layer_init(&m->layers[1], &cv_linear_class);
    cv_linear_attr *a0 = CV_LAYER_ATTR(&m->layers[0], cv_linear_attr);
    cv_linear_attr *a1 = CV_LAYER_ATTR(&m->layers[1], cv_linear_attr);
    a0->in_features = 1;
    a0->out_features = a1->in_features = a1->out_features = NQ_P;
    a0->has_bias = a1->has_bias = 0;
    cv_err fe;
    ck_assert_msg(cv_model_finalize(m, &fe) == 0, "%s", fe.message);
    ck_assert_int_eq(cv_model_alloc(m), 0);
    float *W2 = m->params + cv_model_param(m, 1)->offset;
    for (int d = 0; d < NQ_P; d++)
        W2[d * NQ_P + d] = (float)nq_s[d];
}

static void nq_make(noisy_quad *q, uint64_t seed)
{
    nq_model(&q->m);
    cv_rng r;
    cv_rng_seed(&r, seed);
    cv_dataset *d = &q->d;
    memset(d, 0, sizeof *d);
    d->n = NQ_N;
    d->x_shape = q->m.input_shape;
    d->y_shape.rank = 1;
    d->y_shape.dim[0] = NQ_P;
    d->x = malloc(sizeof(float) * NQ_N);
    d->targets = malloc(sizeof(float) * NQ_N * NQ_P);
    for (int n = 0; n < NQ_N; n++) {
        d->x[n] = (float)sqrt(gamma4(&r));
        q->x2[n] = (double)d->x[n] * d->x[n];
        for (int k = 0; k < NQ_P; k++) {
            q->gamma[k][n] = nq_mu[k] + cv_rng_normal(&r);
            d->targets[n * NQ_P + k] = (float)(-q->gamma[k][n] / (2.0 * NQ_N * nq_s[k] * d->x[n]));
        }
    }
    cv_err e;
    q->c = cv_curv_new(&q->m, d, NULL, &e);
    ck_assert_ptr_nonnull(q->c);
    int t0 = 0;
    ck_assert_int_eq(cv_block_from_indices(&q->m, &t0, 1, &q->theta, &e), 0);
}

static void nq_free(noisy_quad *q)
{
    cv_curv_free(q->c);
    cv_model_free(&q->m);
    tu_data_free(&q->d);
}

START_TEST(noisy_quadratic_snr_recovers_planted_noise)
{
    static noisy_quad q;
    nq_make(&q, 2022);
    cv_vivit v;
    vivit_make(&v, q.c, &q.theta, NULL);
    ck_assert_int_eq(v.rank, NQ_P);
    double E[NQ_P * NQ_P];
    cv_err e;
    ck_assert_int_eq(cv_vivit_eigenvectors(&v, NQ_P, E, &e), 0);
    cv_vivit_derivs d;
    ck_assert_int_eq(cv_vivit_directional(&v, NQ_P, E, &d, &e), 0);
    cv_vivit_stat lx;
    cv_vivit_stats(q.x2, NQ_N, &lx);
    double gsnr_mean = 0;
    for (int k = 0; k < NQ_P; k++) {
        /* e_k = +-unit vector k */
        ck_assert_double_le(fabs(fabs(E[k * NQ_P + k]) - 1), 1e-5);
        double sign = E[k * NQ_P + k] > 0 ? 1 : -1;
        cv_vivit_stat sg, sl, pg;
        cv_vivit_stats(d.gamma + k * NQ_N, NQ_N, &sg);
        cv_vivit_stats(d.lambda + k * NQ_N, NQ_N, &sl);
        cv_vivit_stats(q.gamma[k], NQ_N, &pg);
        /* exactly the planted samples' statistics */
        ck_assert_double_le(fabs(sign * sg.mean - pg.mean), 1e-4);
        ck_assert_double_le(fabs(sg.var - pg.var), 1e-4 * pg.var);
        ck_assert_double_le(fabs(sg.snr - pg.snr), 1e-4 * pg.snr + 1e-6);
        ck_assert_double_le(fabs(sl.snr - lx.snr), 1e-4 * lx.snr);
        ck_assert_double_le(fabs(sl.mean - v.eigenvalues[k]), 1e-5 * v.eigenvalues[k]);
        ck_assert_double_le(fabs(v.eigenvalues[k] - 2.0 * nq_s[k] * nq_s[k] * lx.mean * NQ_N),
                            1e-5 * v.eigenvalues[k]);
        /* and within sampling tolerance of the population SNRs mu^2 and 4 */
        double want = nq_mu[k] * nq_mu[k];
        ck_assert_msg(fabs(sg.snr - want) <= 0.35 * want + 0.02, "gamma SNR %d: %g vs %g", k,
                      sg.snr, want);
        ck_assert_msg(fabs(sl.snr - 4.0) <= 1.2, "lambda SNR %d: %g vs 4", k, sl.snr);
        gsnr_mean += sg.snr / NQ_P;
    }
    /* per-parameter gradient SNR of theta: the parameters are the directions */
    cv_vivit_gsnr gs[4];
    int count;
    ck_assert_int_eq(cv_vivit_gsnr_layers(q.c, &q.theta, gs, 4, &count, NULL, &e), 0);
    ck_assert_int_eq(count, 1);
    ck_assert_int_eq((int)gs[0].params, NQ_P);
    ck_assert_double_le(fabs(gs[0].gsnr - gsnr_mean), 1e-4 * gsnr_mean);
    cv_vivit_derivs_free(&d);
    cv_vivit_free(&v);
    nq_free(&q);
}
END_TEST

START_TEST(bootstrap_damping_deterministic_and_on_grid)
{
    static noisy_quad q;
    nq_make(&q, 7);
    cv_vivit v;
    vivit_make(&v, q.c, &q.theta, NULL);
    double grid[13];
    for (int t = 0; t < 13; t++)
        grid[t] = pow(10.0, -3 + 0.5 * t) * v.eigenvalues[0];
    cv_vivit_damping dm;
    cv_vivit_damping_default(&dm);
    dm.bootstrap = 1;
    dm.grid = grid;
    dm.grid_n = 13;
    dm.samples = 200;
    dm.seed = 5;
    cv_vivit_newton r1, r2;
    cv_err e;
    ck_assert_int_eq(cv_vivit_newton_directional(&v, NQ_P, &dm, &r1, &e), 0);
    ck_assert_int_eq(cv_vivit_newton_directional(&v, NQ_P, &dm, &r2, &e), 0);
    ck_assert_mem_eq(r1.damping, r2.damping, sizeof(double) * NQ_P);
    ck_assert_mem_eq(r1.step, r2.step, sizeof(double) * NQ_P);
    for (int k = 0; k < NQ_P; k++) {
        int on = isinf(r1.damping[k]);
        for (int t = 0; t < 13; t++)
            on |= r1.damping[k] == grid[t];
        ck_assert_msg(on, "delta_%d = %g not from the grid", k, r1.damping[k]);
        if (isinf(r1.damping[k]))
            ck_assert_double_eq(r1.coeff[k], 0);
    }
    /* the high-SNR direction is damped no more than the noisiest one */
    ck_assert_msg(r1.damping[0] <= r1.damping[NQ_P - 1], "delta %g vs %g", r1.damping[0],
                  r1.damping[NQ_P - 1]);
    cv_vivit_newton_free(&r1);
    cv_vivit_newton_free(&r2);
    cv_vivit_free(&v);
    nq_free(&q);
}
END_TEST

START_TEST(bootstrap_limits)
{
    /* no noise: every resample is the batch model, gain decreases in delta */
    double gam[8], lam[8], grid[3] = {0.01, 0.1, 1.0}, gbar = 2.0, lbar = 3.0, delta;
    for (int i = 0; i < 8; i++)
        gam[i] = gbar, lam[i] = lbar;
    cv_vivit_damping dm;
    cv_vivit_damping_default(&dm);
    dm.bootstrap = 1;
    dm.grid = grid;
    dm.grid_n = 3;
    cv_err e;
    ck_assert_int_eq(cv_vivit_bootstrap_damping(gam, 8, lam, 8, 1, &gbar, &lbar, &dm, NULL,
                                                &delta, &e), 0);
    ck_assert_double_eq(delta, 0.01);
    /* gradient sign not reproducible: no delta gives a positive lower gain */
    double g2[8] = {5, -5, 5, -5, 5, -5, 5, -4.9}, gb2 = 0.0125;
    ck_assert_int_eq(cv_vivit_bootstrap_damping(g2, 8, lam, 8, 1, &gb2, &lbar, &dm, NULL,
                                                &delta, &e), 0);
    ck_assert(isinf(delta));
    /* default grid: values in [1e-4, 1e2] */
    dm.grid = NULL;
    ck_assert_int_eq(cv_vivit_bootstrap_damping(gam, 8, lam, 4, 1, &gbar, &lbar, &dm, NULL,
                                                &delta, &e), 0);
    ck_assert_double_eq_tol(delta, 1e-4, 1e-12);
}
END_TEST

/* ---- bootstrap damping against an independent re-derivation ------------------
 * The oracle redoes vivit.h's documented procedure from scratch: cv_rng seeded
 * with the seed, directions in order, per resample n draws cv_rng_below(n)
 * shared by gamma and lambda when ns == n (else n draws for gamma, then ns for
 * lambda), the resampled means, the gains -(tau g_b + tau^2 l_b / 2), their
 * percentile by torch.quantile's linear interpolation (insertion sort here),
 * the first grid value maximizing it among those >= 0, INFINITY if none. */
static double oracle_quantile(double *x, int n, double q)
{
    for (int i = 1; i < n; i++)
        for (int j = i; j > 0 && x[j - 1] > x[j]; j--) {
            double t = x[j];
            x[j] = x[j - 1];
            x[j - 1] = t;
        }
    double pos = q * (n - 1);
    int lo = (int)pos;
    return lo + 1 < n ? x[lo] + (pos - lo) * (x[lo + 1] - x[lo]) : x[n - 1];
}

static void oracle_bootstrap(const double *gam, int n, const double *lam, int ns, int k,
                             const double *gbar, const double *lbar, const double *grid, int G,
                             int B, double pct, uint64_t seed, double *delta)
{
    cv_rng r;
    cv_rng_seed(&r, seed);
    double *gb = malloc(sizeof(double) * B), *lb = malloc(sizeof(double) * B);
    double *gain = malloc(sizeof(double) * B);
    for (int j = 0; j < k; j++) {
        const double *x = gam + (size_t)j * n, *l = lam + (size_t)j * ns;
        for (int b = 0; b < B; b++) {
            double sg = 0, sl = 0;
            if (ns == n) {
                for (int i = 0; i < n; i++) {
                    uint64_t t = cv_rng_below(&r, (uint64_t)n);
                    sg += x[t];
                    sl += l[t];
                }
            } else {
                for (int i = 0; i < n; i++)
                    sg += x[cv_rng_below(&r, (uint64_t)n)];
                for (int i = 0; i < ns; i++)
                    sl += l[cv_rng_below(&r, (uint64_t)ns)];
            }
            gb[b] = sg / n;
            lb[b] = sl / ns;
        }
        double best = INFINITY, best_val = -INFINITY;
        for (int t = 0; t < G; t++) {
            double tau = -gbar[j] / (lbar[j] + grid[t]);
            for (int b = 0; b < B; b++)
                gain[b] = -(tau * gb[b] + 0.5 * tau * tau * lb[b]);
            double p = oracle_quantile(gain, B, pct / 100.0);
            if (p >= 0 && p > best_val)
                best_val = p, best = grid[t];
        }
        delta[j] = best;
    }
    free(gb);
    free(lb);
    free(gain);
}

START_TEST(bootstrap_damping_matches_oracle)
{
    /* hand-built samples: K directions with decreasing gradient SNR, lambda
     * noisy around its mean; gbar/lbar are the sample means */
    enum { N = 24, K = 4, NS = 12, GN = 25, B = 64 };
    static const double mu[K] = {2.0, 0.8, 0.4, 0.15}, lm[K] = {3.0, 1.5, 1.0, 0.5};
    double gam[K * N], lam[K * N], gbar[K], lbar[K], lbar_s[K], grid[GN];
    cv_rng r;
    cv_rng_seed(&r, 424242);
    for (int j = 0; j < K; j++) {
        gbar[j] = lbar[j] = lbar_s[j] = 0;
        for (int n = 0; n < N; n++) {
            gam[j * N + n] = mu[j] + cv_rng_normal(&r);
            lam[j * N + n] = lm[j] * fabs(1.0 + 0.5 * cv_rng_normal(&r));
            gbar[j] += gam[j * N + n] / N;
            lbar[j] += lam[j * N + n] / N;
        }
        for (int i = 0; i < NS; i++) /* the first NS lambda as a sub-sampled curvature */
            lbar_s[j] += lam[j * N + i] / NS;
    }
    for (int t = 0; t < GN; t++)
        grid[t] = pow(10.0, -3.0 + 0.25 * t);
    cv_vivit_damping dm;
    cv_vivit_damping_default(&dm);
    dm.bootstrap = 1;
    dm.grid = grid;
    dm.grid_n = GN;
    dm.samples = B;
    double got[2][2][K], want[K]; /* [seed][percentile] */
    const double pcts[2] = {5.0, 50.0};
    cv_err e;
    for (int sub = 0; sub < 2; sub++) {
        int ns = sub ? NS : N;
        /* lambda sub-sampled: its columns are NS long (the first NS samples) */
        double lam_s[K * N];
        for (int j = 0; j < K; j++)
            for (int i = 0; i < ns; i++)
                lam_s[j * ns + i] = lam[j * N + i];
        const double *lb = sub ? lbar_s : lbar;
        for (int si = 0; si < 2; si++)
            for (int pi = 0; pi < 2; pi++) {
                dm.seed = 11 + (uint64_t)si;
                dm.percentile = pcts[pi];
                ck_assert_int_eq(cv_vivit_bootstrap_damping(gam, N, lam_s, ns, K, gbar, lb, &dm,
                                                            NULL, got[si][pi], &e), 0);
                oracle_bootstrap(gam, N, lam_s, ns, K, gbar, lb, grid, GN, B, pcts[pi],
                                 dm.seed, want);
                for (int j = 0; j < K; j++)
                    ck_assert_msg(got[si][pi][j] == want[j] ||
                                      (isinf(got[si][pi][j]) && isinf(want[j])),
                                  "ns %d seed %d pct %g: delta_%d %g vs oracle %g", ns,
                                  (int)dm.seed, pcts[pi], j, got[si][pi][j], want[j]);
            }
        /* the 5th percentile and the median pick different grid points (the
         * cautious choice damps more), and the seed matters */
        int differ_pct = 0, differ_seed = 0;
        for (int j = 0; j < K; j++) {
            differ_pct += got[0][0][j] != got[0][1][j];
            differ_seed += got[0][0][j] != got[1][0][j];
            if (isfinite(got[0][1][j]))
                ck_assert_msg(got[0][0][j] >= got[0][1][j], "ns %d: delta_%d p5 %g < p50 %g",
                              ns, j, got[0][0][j], got[0][1][j]);
        }
        ck_assert_msg(differ_pct >= 2, "ns %d: only %d directions differ between p5 and p50",
                      ns, differ_pct);
        ck_assert_msg(differ_seed >= 1, "ns %d: seeds 11 and 12 give the same dampings", ns);
    }
}
END_TEST


START_TEST(stats_are_nan_safe)
{
    double a[3] = {1, 2, 3}, b[3] = {2, 2, 2}, z[3] = {0, 0, 0};
    cv_vivit_stat s;
    cv_vivit_stats(a, 3, &s);
    ck_assert_double_eq_tol(s.mean, 2, 1e-15);
    ck_assert_double_eq_tol(s.var, 1, 1e-15);
    ck_assert_double_eq_tol(s.snr, 4, 1e-15);
    cv_vivit_stats(b, 3, &s);
    ck_assert(isinf(s.snr) && s.var == 0);
    cv_vivit_stats(z, 3, &s);
    ck_assert(isnan(s.snr));
    cv_vivit_stats(a, 1, &s);
    ck_assert(isnan(s.var) && isnan(s.snr));
}
END_TEST

START_TEST(gsnr_matches_per_sample_gradients)
{
    fixture f;
    make_variant(&f, 13, NULL); /* ReLU: dead units give zero variance */
    cv_vivit_gsnr gs[8];
    int count;
    cv_err e;
    ck_assert_int_eq(cv_vivit_gsnr_layers(f.c, &f.full, gs, 8, &count, NULL, &e), 0);
    ck_assert_int_eq(count, 3);
    size_t D = f.full.dim, N = f.d.n, off = 0;
    double *PG = malloc(sizeof(double) * N * D), *col = malloc(sizeof(double) * N);
    ck_assert_int_eq(cv_curv_per_sample_gradients(f.c, &f.full, PG, &e), 0);
    for (int l = 0; l < count; l++) {
        double sum = 0;
        int cnt = 0;
        for (size_t q = off; q < off + gs[l].block.dim; q++) {
            for (size_t n = 0; n < N; n++)
                col[n] = PG[n * D + q];
            cv_vivit_stat s;
            cv_vivit_stats(col, (int)N, &s);
            if (s.var > 0)
                sum += s.snr, cnt++;
        }
        ck_assert_int_eq(cnt, (int)gs[l].params);
        ck_assert_int_eq((int)(gs[l].params + gs[l].zero_variance), (int)gs[l].block.dim);
        ck_assert_double_le(fabs(gs[l].gsnr - sum / cnt), 1e-9 * sum / cnt);
        off += gs[l].block.dim;
    }
    free(PG);
    free(col);
    tu_fx_free(&f);
}
END_TEST

/* ---- ops through cv_job_run ------------------------------------------------------ */

static cJSON *run_job(fixture *f, const char *json, cv_err *e)
{
    cJSON *job = cJSON_Parse(json);
    ck_assert_ptr_nonnull(job);
    cJSON *res = cv_job_run(job, &f->m, &f->d, NULL, NULL, e);
    cJSON_Delete(job);
    return res;
}

/* Per-layer block Newton (blocks "layer": one run of method vivit per block)
 * against dense solves on the GGN's diagonal blocks G_bb (cv_curv_dense on the
 * block) with the block gradients: mode full = -(G_bb + delta I)^-1 g_b, mode
 * directional = the eigenspace formula over G_bb's top eigenpairs (LAPACK). */
static double *json_vec(const cJSON *a, size_t n)
{
    ck_assert_msg(cJSON_IsArray(a) && cJSON_GetArraySize(a) == (int)n, "array of %zu", n);
    double *x = malloc(sizeof(double) * n);
    for (size_t i = 0; i < n; i++)
        x[i] = cJSON_GetArrayItem(a, (int)i)->valuedouble;
    return x;
}

START_TEST(layer_block_newton_matches_dense_blocks)
{
    fixture f;
    int var = _i * 3; /* 0, 3, ..., 33: every activation/loss, both reductions and N */
    make_variant(&f, var, NULL);
    cv_block blocks[8];
    int nb = cv_blocks_per_layer(&f.m, blocks, 8);
    ck_assert_int_eq(nb, 3);
    double *Gb[3], *wb[3], *gb[3], lmax = 0;
    cv_err e;
    for (int b = 0; b < nb; b++) {
        int d = (int)blocks[b].dim;
        Gb[b] = tu_dense(&f, CV_CURV_GGN, &blocks[b]);
        for (int a = 0; a < d; a++)
            for (int c = 0; c < a; c++)
                Gb[b][a * d + c] = Gb[b][c * d + a] = 0.5 * (Gb[b][a * d + c] + Gb[b][c * d + a]);
        wb[b] = malloc(sizeof(double) * d);
        gb[b] = malloc(sizeof(double) * d);
        ck_assert_int_eq(cv_curv_gradient(f.c, &blocks[b], gb[b], &e), 0);
        double *A = malloc(sizeof(double) * d * d);
        memcpy(A, Gb[b], sizeof(double) * d * d);
        tu_eigvalsh(A, d, wb[b]);
        lmax = fmax(lmax, wb[b][d - 1]);
        free(A);
    }
    double delta = 0.05 * lmax;
    char job[512];
    snprintf(job, sizeof job, "{\"op\":\"newton\",\"curvature\":\"ggn\",\"blocks\":\"layer\","
             "\"options\":{\"method\":\"vivit\",\"mode\":\"full\",\"damping\":%.17g}}", delta);
    cJSON *res = run_job(&f, job, &e);
    ck_assert_msg(res != NULL, "%s", e.message);
    const cJSON *arr = cJSON_GetObjectItem(res, "blocks");
    ck_assert_int_eq(cJSON_GetArraySize(arr), nb);
    for (int b = 0; b < nb; b++) {
        int d = (int)blocks[b].dim;
        const cJSON *o = cJSON_GetArrayItem(arr, b);
        ck_assert_int_eq((int)tu_num(o, "dim"), d);
        ck_assert_str_eq(cJSON_GetObjectItem(o, "gram_path")->valuestring, "kernel");
        double *A = malloc(sizeof(double) * d * d), *s = malloc(sizeof(double) * d);
        memcpy(A, Gb[b], sizeof(double) * d * d);
        for (int i = 0; i < d; i++)
            A[i * d + i] += delta, s[i] = -gb[b][i];
        ck_assert_int_eq(LAPACKE_dposv(LAPACK_COL_MAJOR, 'U', d, 1, A, d, s, d), 0);
        double *step = json_vec(cJSON_GetObjectItem(o, "step"), (size_t)d);
        /* as full_newton_matches_dense_solve: 1e-6 kappa + 2e-6 */
        double kappa = (wb[b][d - 1] + delta) / delta, err = tu_relerr(step, s, (size_t)d, 1e-12);
        ck_assert_msg(err < 1e-6 * kappa + 2e-6, "variant %d block %d full rel err %g", var, b,
                      err);
        free(A); free(s); free(step);
    }
    cJSON_Delete(res);
    /* directional: per block, k = the eigenvalues of G_bb above 1e-3 of its
     * largest (the 1e-5 regime of directional_newton_all_matches_dense_eigenspace),
     * then k "all" (eigenvalues down to the clip: 5e-4 there) */
    for (int b = 0; b < nb; b++) {
        int d = (int)blocks[b].dim;
        double *U = malloc(sizeof(double) * d * d), *w = malloc(sizeof(double) * d);
        double *s = calloc((size_t)d, sizeof(double));
        memcpy(U, Gb[b], sizeof(double) * d * d);
        ck_assert_int_eq(LAPACKE_dsyev(LAPACK_COL_MAJOR, 'V', 'U', d, U, d, w), 0);
        int kb = 0;
        while (kb < d && w[d - 1 - kb] > 1e-3 * w[d - 1])
            kb++;
        for (int pass = 0; pass < 2; pass++) {
            if (pass == 0)
                snprintf(job, sizeof job, "{\"op\":\"newton\",\"curvature\":\"ggn\",\"blocks\":"
                         "\"layer\",\"options\":{\"method\":\"vivit\",\"k\":%d,\"damping\":"
                         "%.17g}}", kb, delta);
            else
                snprintf(job, sizeof job, "{\"op\":\"newton\",\"curvature\":\"ggn\",\"blocks\":"
                         "\"layer\",\"options\":{\"method\":\"vivit\",\"k\":\"all\",\"damping\":"
                         "%.17g}}", delta);
            res = run_job(&f, job, &e);
            ck_assert_msg(res != NULL, "%s", e.message);
            const cJSON *o = cJSON_GetArrayItem(cJSON_GetObjectItem(res, "blocks"), b);
            int k = (int)tu_num(o, "k");
            if (pass == 0)
                ck_assert_int_eq(k, kb);
            else
                ck_assert_int_eq(k, (int)tu_num(o, "rank"));
            double thr = tu_num(o, "threshold");
            int used = 0;
            memset(s, 0, sizeof(double) * d);
            for (int i = d - 1; i >= d - k; i--, used++) {
                double tau = -tu_dot(U + (size_t)i * d, gb[b], (size_t)d) / (w[i] + delta);
                for (int q = 0; q < d; q++)
                    s[q] += tau * U[(size_t)i * d + q];
            }
            if (pass == 1) { /* the clip keeps what the dense spectrum has above it */
                int above = 0;
                while (above < d && w[d - 1 - above] > thr)
                    above++;
                ck_assert_msg(abs(above - k) <= 1, "variant %d block %d rank %d, dense %d",
                              var, b, k, above);
            }
            double *step = json_vec(cJSON_GetObjectItem(o, "step"), (size_t)d);
            double err = tu_relerr(step, s, (size_t)d, 1e-12), tol = pass ? 5e-4 : 1e-5;
            ck_assert_msg(err < tol, "variant %d block %d directional (k %d) rel err %g", var, b,
                          k, err);
            free(step);
            cJSON_Delete(res);
        }
        free(U); free(w); free(s);
    }
    for (int b = 0; b < nb; b++)
        free(Gb[b]), free(wb[b]), free(gb[b]);
    tu_fx_free(&f);
}
END_TEST

/* newton method vivit with options.mc / options.subsample (the Gram of the MC
 * factor / of a sub-batch) vs dense solves with the engine's fisher_mc (same
 * seed as cv_job_run gives it) and with the sub-batch GGN in the batch's
 * scale; the full-batch gradient either way. */
START_TEST(newton_vivit_mc_and_subsample)
{
    int var = _i ? 3 : 5; /* tanh, N = 40: CE sum, MSE mean */
    uint64_t seed = 7;
    cv_curv_options co = {.mc_samples = 2, .seed = CV_OP_CURV_SEED(seed)}; /* cv_job_run's engine seed */
    fixture f;
    make_variant(&f, var, &co);
    size_t D = f.full.dim;
    int n = (int)f.d.n, C = 3;
    double *g = malloc(sizeof(double) * D), *s = malloc(sizeof(double) * D);
    cv_err e;
    ck_assert_int_eq(cv_curv_gradient(f.c, &f.full, g, &e), 0);
    for (int mode = 0; mode < 2; mode++) {
        char job[512];
        snprintf(job, sizeof job, "{\"op\":\"newton\",\"curvature\":\"ggn\",\"seed\":%d,"
                 "\"options\":{\"method\":\"vivit\",\"mode\":\"full\",\"damping\":0.5,%s}}",
                 (int)seed, mode ? "\"subsample\":0.25" : "\"mc\":true,\"mc_samples\":2");
        cJSON *res = run_job(&f, job, &e);
        ck_assert_msg(res != NULL, "%s: %s", job, e.message);
        double *A;
        if (mode == 0) {
            ck_assert_int_eq((int)tu_num(res, "columns"), 2 * n);
            ck_assert_int_eq((int)tu_num(res, "mc_columns"), 2);
            A = tu_dense(&f, CV_CURV_FISHER_MC, &f.full);
        } else {
            const cJSON *ix = cJSON_GetObjectItem(res, "curvature_indices");
            int ns = cJSON_GetArraySize(ix);
            ck_assert_int_eq(ns, 10);
            ck_assert_int_eq((int)tu_num(res, "columns"), ns * C);
            size_t sidx[40];
            for (int i = 0; i < ns; i++)
                sidx[i] = (size_t)cJSON_GetArrayItem(ix, i)->valuedouble;
            cv_batch sb;
            ck_assert_int_eq(cv_batch_gather(&f.d, sidx, (size_t)ns, &sb, &e), 0);
            cv_curv *sc = cv_curv_new(&f.m, &sb, NULL, &e);
            ck_assert_ptr_nonnull(sc);
            A = malloc(sizeof(double) * D * D);
            ck_assert_int_eq(cv_curv_dense(sc, CV_CURV_GGN, &f.full, 4096, A, &e), 0);
            double cf = cv_loss_scale(f.m.loss, f.m.reduction, (size_t)n, C);
            double cs = cv_loss_scale(f.m.loss, f.m.reduction, (size_t)ns, C);
            for (size_t q = 0; q < D * D; q++)
                A[q] *= (double)n / ns * cf / cs;
            cv_curv_free(sc);
            tu_data_free(&sb);
        }
        double *w = eigs_desc(A, (int)D), delta = 0.5;
        for (size_t i = 0; i < D; i++)
            A[i * D + i] += delta, s[i] = -g[i];
        for (size_t a = 0; a < D; a++)
            for (size_t b = 0; b < a; b++)
                A[a * D + b] = A[b * D + a] = 0.5 * (A[a * D + b] + A[b * D + a]);
        ck_assert_int_eq(LAPACKE_dposv(LAPACK_COL_MAJOR, 'U', (int)D, 1, A, (int)D, s, (int)D), 0);
        double *step = json_vec(cJSON_GetObjectItem(res, "step"), D);
        double kappa = (w[0] + delta) / delta, err = tu_relerr(step, s, D, 1e-12);
        ck_assert_msg(err < 1e-6 * kappa + 2e-6, "variant %d %s: rel err %g (kappa %g)", var,
                      mode ? "subsample" : "mc", err, kappa);
        /* and the reference differs from the exact GGN's step: the option was used */
        double *G = tu_dense(&f, CV_CURV_GGN, &f.full), *s2 = malloc(sizeof(double) * D);
        for (size_t i = 0; i < D; i++)
            G[i * D + i] += delta, s2[i] = -g[i];
        ck_assert_int_eq(LAPACKE_dposv(LAPACK_COL_MAJOR, 'U', (int)D, 1, G, (int)D, s2, (int)D), 0);
        ck_assert_double_gt(tu_relerr(step, s2, D, 1e-12), 100 * (1e-6 * kappa + 2e-6));
        free(G); free(s2); free(A); free(w); free(step);
        cJSON_Delete(res);
    }
    free(g);
    free(s);
    tu_fx_free(&f);
}
END_TEST

START_TEST(ops_eigen_gram_snr_newton)
{
    fixture f;
    make_variant(&f, 0, NULL); /* tanh, CE mean, N = 7 */
    cv_err e;
    cJSON *g = run_job(&f, "{\"op\":\"eigen\",\"curvature\":\"ggn\",\"options\":{\"method\":"
                           "\"gram\",\"k\":4,\"return_vectors\":true}}", &e);
    ck_assert_msg(g != NULL, "%s", e.message);
    cJSON *l = run_job(&f, "{\"op\":\"eigen\",\"curvature\":\"ggn\",\"options\":{\"method\":"
                           "\"lanczos\",\"k\":4}}", &e);
    ck_assert_ptr_nonnull(l);
    const cJSON *ge = cJSON_GetObjectItem(g, "eigenvalues"), *le = cJSON_GetObjectItem(l, "eigenvalues");
    ck_assert_int_eq(cJSON_GetArraySize(ge), 4);
    for (int k = 0; k < 4; k++) {
        double a = cJSON_GetArrayItem(ge, k)->valuedouble, b = cJSON_GetArrayItem(le, k)->valuedouble;
        ck_assert_msg(fabs(a - b) <= 1e-4 * fabs(b), "gram %g vs lanczos %g", a, b);
        ck_assert_double_le(cJSON_GetArrayItem(cJSON_GetObjectItem(g, "residuals"), k)->valuedouble,
                            1e-4 * b + 1e-9);
    }
    ck_assert_int_eq(cJSON_GetArraySize(cJSON_GetObjectItem(g, "eigenvectors")), 4);
    ck_assert_str_eq(cJSON_GetObjectItem(g, "gram_path")->valuestring, "kernel");
    /* residuals come without return_vectors too (docs/interface.md), the same numbers */
    cJSON *g2 = run_job(&f, "{\"op\":\"eigen\",\"curvature\":\"ggn\",\"options\":{\"method\":"
                            "\"gram\",\"k\":4}}", &e);
    ck_assert_msg(g2 != NULL, "%s", e.message);
    ck_assert_ptr_null(cJSON_GetObjectItem(g2, "eigenvectors"));
    const cJSON *r1 = cJSON_GetObjectItem(g, "residuals"), *r2 = cJSON_GetObjectItem(g2, "residuals");
    ck_assert_int_eq(cJSON_GetArraySize(r2), 4);
    for (int k = 0; k < 4; k++)
        ck_assert_double_eq(cJSON_GetArrayItem(r1, k)->valuedouble,
                            cJSON_GetArrayItem(r2, k)->valuedouble);
    cJSON_Delete(g2);
    cJSON_Delete(g);
    cJSON_Delete(l);

    cJSON *s = run_job(&f, "{\"op\":\"snr\",\"curvature\":\"ggn\",\"blocks\":\"layer\","
                           "\"options\":{\"return_raw\":true}}", &e);
    ck_assert_msg(s != NULL, "%s", e.message);
    const cJSON *blocks = cJSON_GetObjectItem(s, "blocks");
    ck_assert_int_eq(cJSON_GetArraySize(blocks), 3);
    const cJSON *b0 = cJSON_GetArrayItem(blocks, 0);
    const cJSON *dirs = cJSON_GetObjectItem(b0, "directions");
    ck_assert_int_eq(cJSON_GetArraySize(dirs), 3); /* k defaults to C */
    const cJSON *d0 = cJSON_GetArrayItem(dirs, 0);
    const char *fields[] = {"eigenvalue", "gamma_mean", "gamma_var", "gamma_snr", "lambda_mean",
                            "lambda_var", "lambda_snr", "alignment"};
    for (int i = 0; i < 8; i++)
        ck_assert_ptr_nonnull(cJSON_GetObjectItem(d0, fields[i]));
    ck_assert_double_le(fabs(tu_num(d0, "lambda_mean") - tu_num(d0, "eigenvalue")),
                        1e-4 * tu_num(d0, "eigenvalue"));
    ck_assert_int_eq(cJSON_GetArraySize(cJSON_GetObjectItem(b0, "gamma")), 7);
    ck_assert_int_eq(cJSON_GetArraySize(cJSON_GetArrayItem(cJSON_GetObjectItem(b0, "gamma"), 0)), 3);
    const cJSON *gs = cJSON_GetArrayItem(cJSON_GetObjectItem(b0, "gsnr"), 0);
    ck_assert_str_eq(cJSON_GetArrayItem(cJSON_GetObjectItem(gs, "params"), 0)->valuestring,
                     "0.weight");
    cJSON_Delete(s);

    cJSON *n = run_job(&f, "{\"op\":\"newton\",\"curvature\":\"ggn\",\"seed\":3,\"options\":"
                           "{\"method\":\"vivit\",\"damping\":\"bootstrap\",\"k\":2,"
                           "\"bootstrap_samples\":50,\"actual_change\":true}}", &e);
    ck_assert_msg(n != NULL, "%s", e.message);
    ck_assert_int_eq(cJSON_GetArraySize(cJSON_GetObjectItem(n, "dampings")), 2);
    ck_assert_int_eq(cJSON_GetArraySize(cJSON_GetObjectItem(n, "step")), (int)f.full.dim);
    ck_assert_ptr_nonnull(cJSON_GetObjectItem(n, "actual_change"));
    cJSON_Delete(n);
    n = run_job(&f, "{\"op\":\"newton\",\"curvature\":\"fisher_mc\",\"options\":{\"method\":"
                    "\"vivit\",\"mode\":\"full\",\"damping\":0.01}}", &e);
    ck_assert_msg(n != NULL, "%s", e.message);
    ck_assert_double_le(tu_num(n, "predicted_change"), 0);
    ck_assert_int_eq((int)tu_num(n, "columns"), 7);
    cJSON_Delete(n);
    tu_fx_free(&f);
}
END_TEST

START_TEST(ops_refuse_bad_requests)
{
    fixture f;
    make_variant(&f, 0, NULL);
    const char *bad[] = {
        "{\"op\":\"snr\",\"curvature\":\"hessian\"}",
        "{\"op\":\"snr\"}",
        "{\"op\":\"eigen\",\"curvature\":\"ef\",\"options\":{\"method\":\"gram\"}}",
        "{\"op\":\"eigen\",\"curvature\":\"ggn\",\"options\":{\"method\":\"gram\",\"which\":\"smallest\"}}",
        "{\"op\":\"newton\",\"curvature\":\"ggn\",\"options\":{\"method\":\"vivit\",\"mode\":\"full\",\"damping\":\"bootstrap\"}}",
        "{\"op\":\"newton\",\"curvature\":\"ggn\",\"options\":{\"method\":\"vivit\",\"mode\":\"full\",\"damping\":0}}",
        "{\"op\":\"newton\",\"curvature\":\"ggn\",\"options\":{\"method\":\"vivit\",\"grid\":[1,2]}}",
        "{\"op\":\"newton\",\"curvature\":\"ggn\",\"options\":{\"method\":\"vivit\",\"damping\":\"bootstrap\",\"grid\":[-1]}}",
        "{\"op\":\"snr\",\"curvature\":\"ggn\",\"options\":{\"bogus\":1}}",
        "{\"op\":\"newton\",\"curvature\":\"ggn\",\"options\":{\"damping\":1,\"mc\":true}}",
        "{\"op\":\"newton\",\"curvature\":\"ggn\",\"options\":{\"damping\":1,\"subsample\":0.5}}",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        cv_err e;
        cv_err_clear(&e);
        cJSON *r = run_job(&f, bad[i], &e);
        ck_assert_msg(r == NULL, "accepted: %s", bad[i]);
        ck_assert_msg(e.status == CV_EINVAL, "%s: status %d", bad[i], e.status);
    }
    tu_fx_free(&f);
}
END_TEST

static Suite *vivit_suite(void)
{
    Suite *s = suite_create("vivit");
    TCase *g = tcase_create("gram");
    tcase_set_timeout(g, 300);
    tcase_add_loop_test(g, gram_eigenvalues_match_dense_ggn, 0, NVARIANTS);
    tcase_add_loop_test(g, eigenvectors_orthonormal_and_satisfy_ge, 0, NVARIANTS);
    tcase_add_loop_test(g, layer_blocks_match_dense_diagonal_blocks, 0, NVARIANTS / 4);
    tcase_add_loop_test(g, mc_gram_matches_dense_fisher_mc, 0, NVARIANTS / 4);
    tcase_add_loop_test(g, subsample_matches_dense_sub_batch_ggn, 0, NVARIANTS / 4);
    tcase_add_test(g, refuses_too_many_columns);
    suite_add_tcase(s, g);
    TCase *d = tcase_create("directional");
    tcase_set_timeout(d, 300);
    tcase_add_loop_test(d, gamma_lambda_match_dense_per_sample, 0, NVARIANTS);
    tcase_add_loop_test(d, full_newton_matches_dense_solve, 0, NVARIANTS);
    tcase_add_loop_test(d, directional_newton_all_matches_dense_eigenspace, 0, NVARIANTS);
    tcase_add_test(d, noisy_quadratic_snr_recovers_planted_noise);
    tcase_add_test(d, bootstrap_damping_deterministic_and_on_grid);
    tcase_add_test(d, bootstrap_limits);
    tcase_add_test(d, bootstrap_damping_matches_oracle);
    tcase_add_test(d, stats_are_nan_safe);
    tcase_add_test(d, gsnr_matches_per_sample_gradients);
    suite_add_tcase(s, d);
    TCase *o = tcase_create("ops");
    tcase_set_timeout(o, 300);
    tcase_add_test(o, ops_eigen_gram_snr_newton);
    tcase_add_test(o, ops_refuse_bad_requests);
    tcase_add_loop_test(o, layer_block_newton_matches_dense_blocks, 0, NVARIANTS / 3);
    tcase_add_loop_test(o, newton_vivit_mc_and_subsample, 0, 2);
    suite_add_tcase(s, o);
    return s;
}

int main(void) { return tu_main(vivit_suite); }
