/* test_posterior.c - engine/posterior.c: for each representation of a
 * Laplace posterior (dense, diagonal, Kronecker and dense blocks on
 * scattered coordinates, Woodbury low rank) the whitening reproduces
 * X^T P^-1 X (W^T W - Wm^T Wm) and the sampling map R has R R^T = P^-1,
 * against P formed densely and inverted by LAPACK; P not positive definite
 * is refused. */
#include <lapacke.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "engine/posterior.h"
#include "testutil.h"

#define D 7
#define NX 3

static double rnd(void) { return (double)rand() / RAND_MAX - 0.5; }

/* n x n S = A A^T + shift I, A random. */
static void spd(double *S, int n, double shift)
{
    double A[D * D];
    for (int i = 0; i < n * n; i++)
        A[i] = rnd();
    for (int c = 0; c < n; c++)
        for (int r = 0; r < n; r++) {
            double s = r == c ? shift : 0;
            for (int i = 0; i < n; i++)
                s += A[i * n + r] * A[i * n + c];
            S[c * n + r] = s;
        }
}

/* Checks P's whitening and sampling against the dense Pd (D x D). */
static void check_against(cv_posterior *P, const double *Pd, int can_sample, const double *Xin)
{
    double Pi[D * D];
    memcpy(Pi, Pd, sizeof Pi);
    ck_assert_int_eq(LAPACKE_dpotrf(LAPACK_COL_MAJOR, 'L', D, Pi, D), 0);
    ck_assert_int_eq(LAPACKE_dpotri(LAPACK_COL_MAJOR, 'L', D, Pi, D), 0);
    for (int c = 0; c < D; c++)
        for (int r = 0; r < c; r++)
            Pi[c * D + r] = Pi[r * D + c];
    double X[D * NX], W[D * NX], Wm[D * NX];
    for (int i = 0; i < D * NX; i++)
        X[i] = Xin ? Xin[i] : rnd();
    cv_err e;
    ck_assert_int_eq(cv_posterior_whiten(P, NX, X, W, Wm, &e), 0);
    int mr = cv_posterior_minus_rank(P);
    for (int a = 0; a < NX; a++)
        for (int b = 0; b < NX; b++) {
            double want = 0, got = 0;
            for (int i = 0; i < D; i++)
                for (int j = 0; j < D; j++)
                    want += X[a * D + i] * Pi[j * D + i] * X[b * D + j];
            for (int i = 0; i < D; i++)
                got += W[a * D + i] * W[b * D + i];
            for (int i = 0; i < mr; i++)
                got -= Wm[a * mr + i] * Wm[b * mr + i];
            ck_assert_double_eq_tol(got, want, 1e-12 * (1 + fabs(want)));
        }
    double R[D * D], z[D];
    for (int j = 0; j < D; j++) {
        memset(z, 0, sizeof z);
        z[j] = 1;
        int rc = cv_posterior_sample(P, z, R + j * D, &e);
        if (!can_sample) {
            ck_assert_int_eq(rc, -1);
            ck_assert_str_eq(e.field, "options.return_posterior_samples");
            return;
        }
        ck_assert_int_eq(rc, 0);
    }
    for (int c = 0; c < D; c++)
        for (int r = 0; r < D; r++) {
            double s = 0;
            for (int j = 0; j < D; j++)
                s += R[j * D + r] * R[j * D + c];
            ck_assert_double_eq_tol(s, Pi[c * D + r], 1e-12);
        }
}

static const double g = 0.8;
static const double p0[D] = {0.5, 0.5, 0.5, 0.5, 2.0, 2.0, 2.0};

START_TEST(dense_and_diag)
{
    srand(1);
    double G[D * D], Pd[D * D];
    spd(G, D, 0);
    for (int i = 0; i < D * D; i++)
        Pd[i] = g * G[i] + (i % (D + 1) == 0 ? p0[i / D] : 0);
    cv_posterior P;
    cv_err e;
    double *Gc = malloc(sizeof G);
    memcpy(Gc, G, sizeof G);
    ck_assert_int_eq(cv_posterior_dense(&P, D, Gc, g, p0, &e), 0);
    check_against(&P, Pd, 1, NULL);
    cv_posterior_free(&P);
    double d[D];
    memset(Pd, 0, sizeof Pd);
    for (int i = 0; i < D; i++) {
        d[i] = G[i * D + i];
        Pd[i * D + i] = g * d[i] + p0[i];
    }
    ck_assert_int_eq(cv_posterior_diag(&P, D, d, g, p0, &e), 0);
    check_against(&P, Pd, 1, NULL);
    cv_posterior_free(&P);
}
END_TEST

START_TEST(kron_and_dense_blocks_on_scattered_coordinates)
{
    srand(2);
    /* slot 0: Linear(1 -> 2) with a bias (dim_a 2, dim_b 2: 4 parameters) on
     * coordinates {0, 2, 4, 6}; slot 1: a dense 3 x 3 block on {1, 3, 5} */
    static const size_t i0[4] = {0, 2, 4, 6}, i1[3] = {1, 3, 5};
    double *A = malloc(4 * sizeof(double)), *B = malloc(4 * sizeof(double));
    spd(A, 2, 0.1);
    spd(B, 2, 0.1);
    cv_err e;
    /* the reference block g M + delta I, M from the factors (no eigenbasis) */
    cv_kron_block ref;
    ck_assert_int_eq(cv_kron_block_init(&ref, 1, 2, 1, A, B, 0, &e), 0);
    double I4[16] = {0}, M[16];
    for (int i = 0; i < 4; i++)
        I4[i * 4 + i] = 1;
    ck_assert_int_eq(cv_kron_block_apply(&ref, NULL, 0, 4, I4, M, &e), 0);
    double Gb[9], Pd[D * D] = {0};
    spd(Gb, 3, 0);
    for (int c = 0; c < 4; c++)
        for (int r = 0; r < 4; r++)
            Pd[i0[c] * D + i0[r]] = g * M[c * 4 + r] + (r == c ? 0.5 : 0);
    for (int c = 0; c < 3; c++)
        for (int r = 0; r < 3; r++)
            Pd[i1[c] * D + i1[r]] = g * Gb[c * 3 + r] + (r == c ? 2.0 : 0);
    cv_posterior P;
    ck_assert_int_eq(cv_posterior_blocks(&P, D, 2, &e), 0);
    double *Ac = malloc(4 * sizeof(double)), *Bc = malloc(4 * sizeof(double)),
           *Gc = malloc(sizeof Gb);
    memcpy(Ac, A, 4 * sizeof(double));
    memcpy(Bc, B, 4 * sizeof(double));
    memcpy(Gc, Gb, sizeof Gb);
    cv_kron_block kb;
    ck_assert_int_eq(cv_kron_block_init(&kb, 1, 2, 1, Ac, Bc, 1, &e), 0);
    ck_assert_int_eq(cv_posterior_slot_kron(&P, 0, i0, &kb, g, 0.5, &e), 0);
    ck_assert_int_eq(cv_posterior_slot_dense(&P, 1, i1, 3, Gc, g, 2.0, &e), 0);
    check_against(&P, Pd, 1, NULL);
    /* vectors whose Kronecker part is of rank one (W~ = u v^T: theta = [u0 v0, u1 v0,
     * u0 v1, u1 v1], a Linear layer's per-sample Jacobian row): the rank-one path */
    double X[D * NX];
    for (int j = 0; j < NX; j++) {
        double u[2] = {rnd(), rnd()}, v[2] = {rnd(), rnd()};
        double th[4] = {u[0] * v[0], u[1] * v[0], u[0] * v[1], u[1] * v[1]};
        for (int i = 0; i < 4; i++)
            X[j * D + i0[i]] = th[i];
        for (int i = 0; i < 3; i++)
            X[j * D + i1[i]] = rnd();
    }
    X[D + i0[0]] = X[D + i0[1]] = X[D + i0[2]] = X[D + i0[3]] = 0; /* and a zero one */
    check_against(&P, Pd, 1, X);
    cv_posterior_free(&P);
    cv_kron_block_free(&ref);
    free(A);
    free(B);
}
END_TEST

START_TEST(lowrank_woodbury)
{
    srand(3);
    double V[D * 2], tau[2], lam[2] = {3.0, 1.0};
    for (int i = 0; i < D * 2; i++)
        V[i] = rnd();
    ck_assert_int_eq(LAPACKE_dgeqrf(LAPACK_COL_MAJOR, D, 2, V, D, tau), 0);
    ck_assert_int_eq(LAPACKE_dorgqr(LAPACK_COL_MAJOR, D, 2, 2, V, D, tau), 0);
    double Pd[D * D];
    for (int c = 0; c < D; c++)
        for (int r = 0; r < D; r++)
            Pd[c * D + r] = g * (lam[0] * V[r] * V[c] + lam[1] * V[D + r] * V[D + c]) +
                            (r == c ? p0[r] : 0);
    cv_posterior P;
    cv_err e;
    ck_assert_int_eq(cv_posterior_lowrank(&P, D, 2, V, lam, g, p0, &e), 0);
    ck_assert_int_eq(cv_posterior_minus_rank(&P), 2);
    check_against(&P, Pd, 0, NULL);
    cv_posterior_free(&P);
}
END_TEST

START_TEST(not_positive_definite_is_refused)
{
    double d[D], Pd[D * D];
    for (int i = 0; i < D; i++)
        d[i] = i == 3 ? -1.0 : 1.0; /* g d + 0.5 < 0 at coordinate 3 */
    cv_posterior P;
    cv_err e;
    ck_assert_int_eq(cv_posterior_diag(&P, D, d, g, p0, &e), -1);
    ck_assert_str_eq(e.code, "not_positive_definite");
    ck_assert_str_eq(e.field, "options.prior_precision");
    cv_posterior_free(&P);
    double *G = malloc(sizeof Pd);
    memset(G, 0, sizeof Pd);
    for (int i = 0; i < D; i++)
        G[i * D + i] = d[i];
    ck_assert_int_eq(cv_posterior_dense(&P, D, G, g, p0, &e), -1);
    ck_assert_str_eq(e.code, "not_positive_definite");
    cv_posterior_free(&P);
}
END_TEST

static Suite *posterior_suite(void)
{
    Suite *s = suite_create("posterior");
    TCase *t = tcase_create("whiten_and_sample");
    tcase_add_test(t, dense_and_diag);
    tcase_add_test(t, kron_and_dense_blocks_on_scattered_coordinates);
    tcase_add_test(t, lowrank_woodbury);
    tcase_add_test(t, not_positive_definite_is_refused);
    suite_add_tcase(s, t);
    return s;
}

int main(void) { return tu_main(posterior_suite); }
