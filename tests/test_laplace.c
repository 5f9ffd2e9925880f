/* test_laplace.c - engine/laplace.c: the evidence of one curvature in its
 * three representations (spectra, dense, low rank) agrees, the terms follow
 * their definitions, and the optimization finds MacKay's fixed point
 * (sum_i g lam_i / (g lam_i + delta) = delta ||theta||^2 for one delta),
 * per-block optima where the gradient vanishes, and sigma's optimum. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "engine/laplace.h"
#include "testutil.h"

#define D 7
#define K 3

/* A random orthonormal Q (D x D, column-major) and G = Q diag(lam) Q^T with
 * K non-zero eigenvalues (a low-rank PSD G). */
static void make_g(double *Q, double *lam, double *G, unsigned seed)
{
    srand(seed);
    for (int i = 0; i < D * D; i++)
        Q[i] = (double)rand() / RAND_MAX - 0.5;
    double tau[D];
    ck_assert_int_eq(LAPACKE_dgeqrf(LAPACK_COL_MAJOR, D, D, Q, D, tau), 0);
    ck_assert_int_eq(LAPACKE_dorgqr(LAPACK_COL_MAJOR, D, D, D, Q, D, tau), 0);
    for (int i = 0; i < D; i++)
        lam[i] = i < K ? 3.0 / (i + 1) : 0.0;
    for (int c = 0; c < D; c++)
        for (int r = 0; r < D; r++) {
            double s = 0;
            for (int i = 0; i < D; i++)
                s += Q[i * D + r] * lam[i] * Q[i * D + c];
            G[c * D + r] = s;
        }
}

/* blocks: coordinates [0, 4) and [4, 7) */
static const size_t dims[2] = {4, 3};

static void fill_common(cv_laplace *L, int gaussian)
{
    L->blocks[0].dim = dims[0];
    if (L->nblocks > 1)
        L->blocks[1].dim = dims[1];
    else
        L->blocks[0].dim = D;
    L->dim = D;
    L->nll = 2.5;
    L->gaussian = gaussian;
    L->n_outputs = 6;
}

static void make_dense(cv_laplace *L, const double *G, int nblocks)
{
    cv_err e;
    ck_assert_int_eq(cv_laplace_init(L, CV_LAPLACE_DENSE, nblocks, &e), 0);
    L->G = malloc(sizeof(double) * D * D);
    L->owner = malloc(sizeof(int) * D);
    memcpy(L->G, G, sizeof(double) * D * D);
    for (int i = 0; i < D; i++)
        L->owner[i] = nblocks > 1 && i >= 4;
}

static void make_lowrank(cv_laplace *L, const double *Q, const double *lam, int nblocks)
{
    cv_err e;
    ck_assert_int_eq(cv_laplace_init(L, CV_LAPLACE_LOWRANK, nblocks, &e), 0);
    L->k = K;
    L->lam = malloc(sizeof(double) * K);
    L->W = calloc((size_t)nblocks * K * K, sizeof(double));
    memcpy(L->lam, lam, sizeof(double) * K);
    for (int p = 0; p < D; p++) {
        double *W = L->W + (size_t)(nblocks > 1 && p >= 4) * K * K;
        for (int j = 0; j < K; j++)
            for (int i = 0; i < K; i++)
                W[j * K + i] += Q[i * D + p] * Q[j * D + p];
    }
}

static void make_spectra(cv_laplace *L, const double *lam)
{
    cv_err e;
    ck_assert_int_eq(cv_laplace_init(L, CV_LAPLACE_SPECTRA, 1, &e), 0);
    L->blocks[0].m = K;
    L->blocks[0].vals = malloc(sizeof(double) * K);
    memcpy(L->blocks[0].vals, lam, sizeof(double) * K);
}

START_TEST(representations_agree)
{
    double Q[D * D], lam[D], G[D * D];
    make_g(Q, lam, G, 3);
    int gaussian = _i;
    cv_laplace S, Dn, Lr, Dn2, Lr2;
    make_spectra(&S, lam);
    make_dense(&Dn, G, 1);
    make_lowrank(&Lr, Q, lam, 1);
    make_dense(&Dn2, G, 2);
    make_lowrank(&Lr2, Q, lam, 2);
    cv_laplace *all[] = {&S, &Dn, &Lr, &Dn2, &Lr2};
    for (int i = 0; i < 5; i++) {
        fill_common(all[i], gaussian);
        all[i]->blocks[0].sq_norm = all[i]->nblocks > 1 ? 1.5 : 2.25;
        if (all[i]->nblocks > 1)
            all[i]->blocks[1].sq_norm = 0.75;
    }
    cv_err e;
    double one[1] = {0.7}, two[2] = {0.7, 0.7}, sigma = 0.8, T = 1.3;
    cv_laplace_terms t[5];
    for (int i = 0; i < 5; i++)
        ck_assert_int_eq(cv_laplace_eval(all[i], all[i]->nblocks > 1 ? two : one, sigma, T, &t[i],
                                         NULL, &e),
                         0);
    /* by definition, with g = 1/(sigma^2 T) (sigma = 1 unless gaussian) */
    double s = gaussian ? sigma : 1.0, g = 1.0 / (s * s * T), ld = (D - K) * log(0.7);
    for (int i = 0; i < K; i++)
        ld += log(g * lam[i] + 0.7);
    double ll = -g * 2.5 - (gaussian ? 6 * log(s * sqrt(2 * M_PI)) : 0);
    for (int i = 0; i < 5; i++) {
        ck_assert_double_eq_tol(t[i].log_det_posterior_precision, ld, 1e-12);
        ck_assert_double_eq_tol(t[i].log_det_prior_precision, D * log(0.7), 1e-12);
        ck_assert_double_eq_tol(t[i].scatter, 0.7 * 2.25, 1e-12);
        ck_assert_double_eq_tol(t[i].log_likelihood, ll, 1e-12);
        ck_assert_double_eq_tol(t[i].log_marginal_likelihood,
                                ll - 0.5 * (ld - D * log(0.7) + 0.7 * 2.25), 1e-12);
    }
    /* per-block precisions: dense (Cholesky) and low rank (determinant lemma) agree */
    double pb[2] = {0.3, 4.0};
    cv_laplace_terms a, b;
    ck_assert_int_eq(cv_laplace_eval(&Dn2, pb, sigma, T, &a, NULL, &e), 0);
    ck_assert_int_eq(cv_laplace_eval(&Lr2, pb, sigma, T, &b, NULL, &e), 0);
    ck_assert_double_eq_tol(a.log_det_posterior_precision, b.log_det_posterior_precision, 1e-12);
    ck_assert_double_eq_tol(a.log_marginal_likelihood, b.log_marginal_likelihood, 1e-12);
    ck_assert_double_eq_tol(a.log_det_prior_precision, 4 * log(0.3) + 3 * log(4.0), 1e-12);
    for (int i = 0; i < 5; i++)
        cv_laplace_free(all[i]);
}
END_TEST

/* f(t) at delta = e^t for one common delta (all blocks). */
static double evidence(cv_laplace *L, const double *delta, double sigma)
{
    cv_laplace_terms t;
    cv_err e;
    ck_assert_int_eq(cv_laplace_eval(L, delta, sigma, 1.0, &t, NULL, &e), 0);
    return t.log_marginal_likelihood;
}

START_TEST(optimum_is_mackays_fixed_point)
{
    double Q[D * D], lam[D], G[D * D];
    make_g(Q, lam, G, 5);
    cv_laplace S;
    make_spectra(&S, lam);
    fill_common(&S, 0);
    S.blocks[0].sq_norm = 2.25;
    double delta = 1.0, sigma = 1.0;
    int evals = 0;
    cv_err e;
    ck_assert_int_eq(cv_laplace_optimize(&S, &delta, 0, 1, &sigma, 0, 1.0, &evals, &e), 0);
    double gamma = 0;
    for (int i = 0; i < K; i++)
        gamma += lam[i] / (lam[i] + delta);
    ck_assert_double_eq_tol(gamma, delta * 2.25, 1e-12);
    ck_assert_int_ge(evals, 2);
    ck_assert_int_lt(evals, 100);
    /* an optimum beyond the range ends at its bound: theta = 0 (the evidence grows
     * with delta) */
    S.blocks[0].sq_norm = 0;
    delta = 1.0;
    ck_assert_int_eq(cv_laplace_optimize(&S, &delta, 0, 1, &sigma, 0, 1.0, &evals, &e), 0);
    ck_assert_double_eq_tol(delta, CV_LAPLACE_DELTA_MAX, 1e-6 * CV_LAPLACE_DELTA_MAX);
    cv_laplace_free(&S);
}
END_TEST

/* Per block (dense, coupled) and sigma: the optimum is a stationary point in every
 * coordinate (central differences in the logs vanish) and beats the start. */
START_TEST(per_block_and_sigma_optimum_is_stationary)
{
    double Q[D * D], lam[D], G[D * D];
    make_g(Q, lam, G, 7);
    cv_laplace L;
    make_dense(&L, G, 2);
    fill_common(&L, 1);
    L.blocks[0].sq_norm = 1.5;
    L.blocks[1].sq_norm = 0.4;
    double delta[2] = {1.0, 1.0}, sigma = 1.0;
    double start = evidence(&L, delta, sigma);
    cv_err e;
    ck_assert_int_eq(cv_laplace_optimize(&L, delta, 1, 1, &sigma, 1, 1.0, NULL, &e), 0);
    double best = evidence(&L, delta, sigma), h = 1e-4;
    ck_assert(best > start);
    for (int c = 0; c < 3; c++) {
        double dp[2] = {delta[0], delta[1]}, dm[2] = {delta[0], delta[1]}, sp = sigma, sm = sigma;
        if (c < 2) {
            dp[c] *= exp(h);
            dm[c] *= exp(-h);
        } else {
            sp *= exp(h);
            sm *= exp(-h);
        }
        double fp = evidence(&L, dp, sp), fm = evidence(&L, dm, sm);
        ck_assert_msg(fabs(fp - fm) / (2 * h) < 1e-4, "coordinate %d: derivative %g", c,
                      (fp - fm) / (2 * h));
        ck_assert(fp <= best + 1e-12 && fm <= best + 1e-12);
    }
    cv_laplace_free(&L);
}
END_TEST

START_TEST(not_positive_definite_is_refused)
{
    cv_laplace S;
    cv_err e;
    ck_assert_int_eq(cv_laplace_init(&S, CV_LAPLACE_SPECTRA, 1, &e), 0);
    S.blocks[0].dim = 2;
    S.blocks[0].m = 2;
    S.blocks[0].vals = malloc(2 * sizeof(double));
    S.blocks[0].vals[0] = 1.0;
    S.blocks[0].vals[1] = -2.0;
    double delta = 1.0;
    cv_laplace_terms t;
    ck_assert_int_eq(cv_laplace_eval(&S, &delta, 1.0, 1.0, &t, NULL, &e), -1);
    ck_assert_str_eq(e.code, "not_positive_definite");
    ck_assert_str_eq(e.field, "options.prior_precision");
    delta = 3.0;
    ck_assert_int_eq(cv_laplace_eval(&S, &delta, 1.0, 1.0, &t, NULL, &e), 0);
    ck_assert_double_eq_tol(t.log_det_posterior_precision, log(4.0) + log(1.0), 1e-15);
    cv_laplace_free(&S);
}
END_TEST

static Suite *laplace_suite(void)
{
    Suite *s = suite_create("laplace");
    TCase *t = tcase_create("evidence");
    tcase_add_loop_test(t, representations_agree, 0, 2);
    tcase_add_test(t, optimum_is_mackays_fixed_point);
    tcase_add_test(t, per_block_and_sigma_optimum_is_stationary);
    tcase_add_test(t, not_positive_definite_is_refused);
    suite_add_tcase(s, t);
    return s;
}

int main(void) { return tu_main(laplace_suite); }
