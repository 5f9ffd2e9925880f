/* test_estimators.c - the numerical estimators (engine/estimators.h) on
 * dense test matrices, checked against LAPACK. */
#include "testutil.h"

#include <lapacke.h>
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/estimators.h"

/* ------------------------------------------------------------ helpers */

/* A dense symmetric matrix with its operator and progress record. */
typedef struct {
    int n;
    double *a;
    cv_dense_op ctx;
    cv_linop op;
    cv_progress prog;
} dmat;

static void dmat_init(dmat *m, int n)
{
    m->n = n;
    m->a = calloc((size_t)n * n, sizeof(double));
    ck_assert_ptr_nonnull(m->a);
    cv_linop_from_dense(&m->op, &m->ctx, (size_t)n, m->a);
    cv_progress_init(&m->prog);
    m->op.progress = &m->prog;
}

static void dmat_free(dmat *m) { free(m->a); }

static double *A_(dmat *m, int i, int j) { return &m->a[i + (size_t)j * m->n]; }

/* Symmetric with N(0,1) entries scaled by 1/sqrt(n). */
static void dmat_random(dmat *m, int n, uint64_t seed)
{
    dmat_init(m, n);
    cv_rng r;
    cv_rng_seed(&r, seed);
    for (int j = 0; j < n; j++)
        for (int i = 0; i <= j; i++)
            *A_(m, i, j) = *A_(m, j, i) = cv_rng_normal(&r) / sqrt((double)n);
}

/* Random orthogonal n x n (QR of a Gaussian matrix). */
static double *random_orthogonal(int n, uint64_t seed)
{
    double *q = malloc(sizeof(double) * n * n), *tau = malloc(sizeof(double) * n);
    cv_rng r;
    cv_rng_seed(&r, seed);
    cv_rng_gaussian(&r, q, (size_t)n * n);
    ck_assert_int_eq(LAPACKE_dgeqrf(LAPACK_COL_MAJOR, n, n, q, n, tau), 0);
    ck_assert_int_eq(LAPACKE_dorgqr(LAPACK_COL_MAJOR, n, n, n, q, n, tau), 0);
    free(tau);
    return q;
}

/* A = Q diag(lam) Q^T with a random orthogonal Q. */
static void dmat_spectrum(dmat *m, int n, const double *lam, uint64_t seed)
{
    dmat_init(m, n);
    double *q = random_orthogonal(n, seed);
    for (int j = 0; j < n; j++)
        for (int i = 0; i < n; i++) {
            double s = 0;
            for (int l = 0; l < n; l++)
                s += q[i + (size_t)l * n] * lam[l] * q[j + (size_t)l * n];
            *A_(m, i, j) = s;
        }
    for (int j = 0; j < n; j++) /* exact symmetry */
        for (int i = 0; i < j; i++)
            *A_(m, i, j) = *A_(m, j, i);
    free(q);
}

static double dmat_trace(dmat *m)
{
    double t = 0;
    for (int i = 0; i < m->n; i++)
        t += *A_(m, i, i);
    return t;
}

/* Eigenvalues, ascending (dsyev). */
static double *eigvals(dmat *m)
{
    int n = m->n;
    double *a = malloc(sizeof(double) * n * n), *w = malloc(sizeof(double) * n);
    memcpy(a, m->a, sizeof(double) * n * n);
    ck_assert_int_eq(LAPACKE_dsyev(LAPACK_COL_MAJOR, 'N', 'U', n, a, n, w), 0);
    free(a);
    return w;
}

static double opnorm(dmat *m)
{
    double *w = eigvals(m);
    double s = fmax(fabs(w[0]), fabs(w[m->n - 1]));
    free(w);
    return s;
}

/* ||A v - lam v|| for column v. */
static double residual_of(dmat *m, const double *v, double lam)
{
    int n = m->n;
    double s = 0;
    for (int i = 0; i < n; i++) {
        double t = -lam * v[i];
        for (int j = 0; j < n; j++)
            t += *A_(m, i, j) * v[j];
        s += t * t;
    }
    return sqrt(s);
}

/* max |V^T V - I| for n x k. */
static double orth_error(const double *V, int n, int k)
{
    double worst = 0;
    for (int a = 0; a < k; a++)
        for (int b = 0; b < k; b++) {
            double s = 0;
            for (int i = 0; i < n; i++)
                s += V[i + (size_t)a * n] * V[i + (size_t)b * n];
            worst = fmax(worst, fabs(s - (a == b)));
        }
    return worst;
}

static long done_of(dmat *m) { return atomic_load(&m->prog.done); }

/* ------------------------------------------------------------ probes */

/* Rademacher signs are the bits of successive 64-bit draws, bit b of a draw
 * giving +1 when set (the stream seeded jobs reproduce), including a tail
 * shorter than a draw; and both signs come out about equally often. */
START_TEST(rademacher_signs_are_the_draws_bits)
{
    enum { N = 64 * 3 + 17 };
    double v[N];
    cv_rng r, q;
    cv_rng_seed(&r, 42);
    cv_rng_seed(&q, 42);
    cv_rng_rademacher(&r, v, N);
    int plus = 0;
    for (int i = 0; i < N; i += 64) {
        uint64_t bits = cv_rng_u64(&q);
        for (int b = 0; b < 64 && i + b < N; b++) {
            double want = (bits >> b) & 1 ? 1.0 : -1.0;
            ck_assert_msg(v[i + b] == want, "entry %d: %g, want %g", i + b, v[i + b], want);
            plus += v[i + b] > 0;
        }
    }
    ck_assert_msg(plus > N / 4 && plus < 3 * N / 4, "%d of %d positive", plus, N);
    /* the next draw continues the stream after the tail's draw */
    ck_assert(cv_rng_u64(&r) == cv_rng_u64(&q));
}
END_TEST

/* ------------------------------------------------------------ trace */

START_TEST(trace_rademacher_diagonal_exact)
{
    dmat m;
    dmat_init(&m, 30);
    for (int i = 0; i < 30; i++)
        *A_(&m, i, i) = i - 7.5;
    cv_trace_options o;
    cv_trace_options_default(&o);
    o.tol = 0;
    o.max_probes = 20;
    o.return_samples = 1;
    cv_rng r;
    cv_rng_seed(&r, 3);
    cv_trace_result res;
    cv_err e;
    ck_assert_int_eq(cv_trace_hutchinson(&m.op, &o, &r, &res, &e), 0);
    ck_assert_int_eq(res.probes, 20);
    for (int s = 0; s < 20; s++)
        ck_assert_double_eq_tol(res.samples[s], dmat_trace(&m), 1e-12);
    ck_assert_double_eq_tol(res.trace, dmat_trace(&m), 1e-12);
    ck_assert_double_eq_tol(res.std_err, 0, 1e-12);
    ck_assert_int_eq(res.matvecs, 20);
    ck_assert_int_eq(done_of(&m), 20);
    cv_trace_result_free(&res);
    dmat_free(&m);
}
END_TEST

START_TEST(trace_random_within_3_stderr)
{
    for (int dist = 0; dist < 2; dist++)
        for (uint64_t seed = 1; seed <= 4; seed++) {
            dmat m;
            dmat_random(&m, 50, 100 + seed);
            cv_trace_options o;
            cv_trace_options_default(&o);
            o.tol = 0;
            o.distribution = dist;
            cv_rng r;
            cv_rng_seed(&r, seed);
            cv_trace_result res;
            cv_err e;
            ck_assert_int_eq(cv_trace_hutchinson(&m.op, &o, &r, &res, &e), 0);
            ck_assert_int_eq(res.probes, 100);
            ck_assert(res.std_err > 0);
            ck_assert_msg(fabs(res.trace - dmat_trace(&m)) <= 3 * res.std_err,
                          "dist %d seed %d: %g vs %g (se %g)", dist, (int)seed, res.trace,
                          dmat_trace(&m), res.std_err);
            cv_trace_result_free(&res);
            dmat_free(&m);
        }
}
END_TEST

START_TEST(trace_block_size_does_not_change_result)
{
    dmat m;
    dmat_random(&m, 40, 7);
    for (int i = 0; i < 40; i++)
        *A_(&m, i, i) += 2.0;
    cv_trace_options o;
    cv_trace_options_default(&o);
    o.tol = 1e-2;
    o.return_samples = 1;
    cv_trace_result ref;
    cv_err e;
    for (int block = 1; block <= 16; block += 5) {
        o.block = block;
        cv_rng r;
        cv_rng_seed(&r, 11);
        cv_trace_result res;
        ck_assert_int_eq(cv_trace_hutchinson(&m.op, &o, &r, &res, &e), 0);
        ck_assert_int_ge(res.matvecs, res.probes);
        ck_assert_int_lt(res.matvecs, res.probes + block);
        if (block == 1) {
            ref = res;
            ck_assert_int_eq(res.matvecs, res.probes);
            continue;
        }
        ck_assert_int_eq(res.probes, ref.probes);
        ck_assert(res.trace == ref.trace && res.std_err == ref.std_err);
        ck_assert_mem_eq(res.samples, ref.samples, sizeof(double) * res.probes);
        cv_trace_result_free(&res);
    }
    cv_trace_result_free(&ref);
    dmat_free(&m);
}
END_TEST

START_TEST(trace_tol_stops_early)
{
    dmat m;
    dmat_init(&m, 20);
    for (int i = 0; i < 20; i++)
        *A_(&m, i, i) = 1.0 + i;
    cv_trace_options o;
    cv_trace_options_default(&o); /* tol 1e-3 */
    o.block = 1;
    cv_rng r;
    cv_rng_seed(&r, 1);
    cv_trace_result res;
    cv_err e;
    /* diagonal: second sample equals the first, |dmean| = 0 */
    ck_assert_int_eq(cv_trace_hutchinson(&m.op, &o, &r, &res, &e), 0);
    ck_assert_int_eq(res.probes, 2);
    ck_assert_double_eq_tol(res.trace, 210.0, 1e-12);
    cv_trace_result_free(&res);
    dmat_free(&m);

    /* dominant diagonal plus noise: stops before max_probes; tol 0 does not */
    dmat_random(&m, 60, 5);
    for (int i = 0; i < 60; i++)
        *A_(&m, i, i) += 10.0;
    o.tol = 1e-2;
    ck_assert_int_eq(cv_trace_hutchinson(&m.op, &o, &r, &res, &e), 0);
    ck_assert_int_lt(res.probes, 100);
    ck_assert_int_gt(res.probes, 1);
    ck_assert_double_eq_tol(res.trace, dmat_trace(&m), 0.05 * dmat_trace(&m));
    cv_trace_result_free(&res);
    o.tol = 0;
    ck_assert_int_eq(cv_trace_hutchinson(&m.op, &o, &r, &res, &e), 0);
    ck_assert_int_eq(res.probes, 100);
    cv_trace_result_free(&res);
    dmat_free(&m);
}
END_TEST

START_TEST(hutchpp_beats_hutchinson)
{
    int n = 100, rank = 8;
    double lam[100];
    cv_rng r;
    cv_rng_seed(&r, 99);
    for (int i = 0; i < n; i++)
        lam[i] = i < rank ? 50.0 + 10 * i : 0.05 * cv_rng_normal(&r);
    dmat m;
    dmat_spectrum(&m, n, lam, 4);
    double exact = dmat_trace(&m), err_h = 0, err_pp = 0;
    cv_trace_options o;
    cv_trace_options_default(&o);
    o.tol = 0;
    o.max_probes = 45;
    for (uint64_t seed = 0; seed < 10; seed++) {
        cv_trace_result a, b;
        cv_err e;
        cv_rng_seed(&r, seed);
        ck_assert_int_eq(cv_trace_hutchinson(&m.op, &o, &r, &a, &e), 0);
        cv_rng_seed(&r, seed);
        long before = done_of(&m);
        ck_assert_int_eq(cv_trace_hutchpp(&m.op, &o, &r, &b, &e), 0);
        ck_assert_int_eq(b.matvecs, 45);
        ck_assert_int_eq(done_of(&m) - before, 45);
        ck_assert_int_eq(b.sketch, 15);
        ck_assert_int_eq(b.probes, 15);
        err_h += fabs(a.trace - exact);
        err_pp += fabs(b.trace - exact);
        cv_trace_result_free(&a);
        cv_trace_result_free(&b);
    }
    ck_assert_msg(err_pp < 0.1 * err_h, "hutch++ %g vs hutchinson %g", err_pp, err_h);
    dmat_free(&m);
}
END_TEST

START_TEST(hutchpp_full_sketch_is_exact)
{
    dmat m;
    dmat_random(&m, 10, 3);
    cv_trace_options o;
    cv_trace_options_default(&o);
    o.max_probes = 40; /* s = 13 > n: Q spans everything */
    cv_rng r;
    cv_rng_seed(&r, 1);
    cv_trace_result res;
    cv_err e;
    ck_assert_int_eq(cv_trace_hutchpp(&m.op, &o, &r, &res, &e), 0);
    ck_assert_int_eq(res.sketch, 10);
    ck_assert_int_eq(res.probes, 0);
    ck_assert_int_eq(res.matvecs, 20);
    ck_assert_double_eq_tol(res.trace, dmat_trace(&m), 1e-10);
    cv_trace_result_free(&res);
    dmat_free(&m);
}
END_TEST

/* Default options (tol 1e-3): Hutch++ has no stopping rule.  The exact
 * sketch part tr(Q^T A Q) dominates every sample here, so a rule on the
 * running total would stop after ~2 residual probes (the old behaviour). */
START_TEST(hutchpp_default_options_spend_budget)
{
    int n = 120;
    double lam[120];
    cv_rng r;
    cv_rng_seed(&r, 5);
    for (int i = 0; i < n; i++)
        lam[i] = i < 10 ? 100.0 + 10 * i : 1.0 + 0.5 * cv_rng_normal(&r);
    dmat m;
    dmat_spectrum(&m, n, lam, 6);
    double exact = dmat_trace(&m);
    for (int pass = 0; pass < 2; pass++) {
        cv_trace_options o;
        cv_trace_options_default(&o);
        ck_assert_double_eq(o.tol, 1e-3);
        o.return_samples = 1;
        if (pass)
            o.tol = 0.5; /* ignored as well */
        cv_trace_result res;
        cv_err e;
        long before = done_of(&m);
        cv_rng_seed(&r, 8 + (uint64_t)pass);
        ck_assert_int_eq(cv_trace_hutchpp(&m.op, &o, &r, &res, &e), 0);
        ck_assert_int_eq(res.sketch, 33);
        ck_assert_int_eq(res.probes, 100 - 2 * 33);
        ck_assert_int_eq(res.matvecs, 100);
        ck_assert_int_eq(done_of(&m) - before, 100);
        /* std_err: of the residual samples, recomputed from them (ddof 1) */
        double mean = 0, ss = 0;
        for (int i = 0; i < res.probes; i++)
            mean += res.samples[i] / res.probes;
        for (int i = 0; i < res.probes; i++)
            ss += (res.samples[i] - mean) * (res.samples[i] - mean);
        double se = sqrt(ss / (res.probes - 1) / res.probes);
        ck_assert_double_eq_tol(res.trace, mean, 1e-9 * fabs(mean));
        ck_assert(se > 0);
        ck_assert_double_eq_tol(res.std_err, se, 1e-9 * se);
        /* the residual has spectrum ~1 +- 0.5 on 110 dims: its Hutchinson
         * error is a few units, far below the dominant part's ~1000 */
        ck_assert_double_lt(res.std_err, 10.0);
        ck_assert_msg(fabs(res.trace - exact) <= 4 * res.std_err, "%g vs %g (se %g)",
                      res.trace, exact, res.std_err);
        cv_trace_result_free(&res);
    }
    dmat_free(&m);
}
END_TEST

/* ------------------------------------------------------------ diag */

START_TEST(diag_exact_equals_diagonal)
{
    dmat m;
    dmat_random(&m, 37, 8);
    cv_diag_options o;
    cv_diag_options_default(&o);
    o.block = 5;
    cv_diag_result res;
    cv_err e;
    ck_assert_int_eq(cv_diag_exact(&m.op, &o, &res, &e), 0);
    ck_assert_int_eq(res.matvecs, 37);
    ck_assert_int_eq(done_of(&m), 37);
    for (int i = 0; i < 37; i++) {
        ck_assert_double_eq_tol(res.diag[i], *A_(&m, i, i), 1e-14);
        ck_assert(res.std_err[i] == 0);
    }
    cv_diag_result_free(&res);
    dmat_free(&m);
}
END_TEST

START_TEST(diag_hutchinson)
{
    dmat m;
    dmat_init(&m, 25);
    for (int i = 0; i < 25; i++)
        *A_(&m, i, i) = sin(i + 1.0);
    cv_diag_options o;
    cv_diag_options_default(&o);
    o.max_probes = 7;
    cv_rng r;
    cv_rng_seed(&r, 2);
    cv_diag_result res;
    cv_err e;
    ck_assert_int_eq(cv_diag_hutchinson(&m.op, &o, &r, &res, &e), 0);
    ck_assert_int_eq(res.probes, 7);
    for (int i = 0; i < 25; i++) {
        ck_assert_double_eq_tol(res.diag[i], *A_(&m, i, i), 1e-14);
        ck_assert_double_eq_tol(res.std_err[i], 0, 1e-14);
    }
    cv_diag_result_free(&res);
    dmat_free(&m);

    /* random matrix: entries within 4 standard errors, and errors non-zero */
    dmat_random(&m, 30, 9);
    o.max_probes = 200;
    ck_assert_int_eq(cv_diag_hutchinson(&m.op, &o, &r, &res, &e), 0);
    int outside = 0;
    for (int i = 0; i < 30; i++) {
        ck_assert(res.std_err[i] > 0);
        outside += fabs(res.diag[i] - *A_(&m, i, i)) > 4 * res.std_err[i];
    }
    ck_assert_int_eq(outside, 0);
    cv_diag_result_free(&res);
    dmat_free(&m);
}
END_TEST

/* ------------------------------------------------------------ XTrace / XDiag */

/* A spectrum with a few large eigenvalues over a noise floor (Hutch++'s case). */
static void decaying(dmat *m, int n, uint64_t seed)
{
    double *lam = malloc(sizeof(double) * n);
    cv_rng r;
    cv_rng_seed(&r, seed);
    for (int i = 0; i < n; i++)
        lam[i] = i < 8 ? 50.0 + 10 * i : 0.05 * cv_rng_normal(&r);
    dmat_spectrum(m, n, lam, seed + 1);
    free(lam);
}

/* Unbiased (the mean over 300 seeds within 4 standard errors of that mean),
 * error estimates that cover (|err| < 3 stderr in >= 90% of runs), the
 * budget spent exactly, and a far smaller error than Hutchinson's and
 * Hutch++'s at the same 40 matvecs. */
START_TEST(xtrace_unbiased_covers_and_beats_hutchinson)
{
    int n = 100, runs = 300;
    dmat m;
    decaying(&m, n, 7);
    double exact = dmat_trace(&m), sum = 0, sum2 = 0, err_x = 0, err_h = 0, err_pp = 0;
    int covered = 0;
    cv_trace_options o;
    cv_trace_options_default(&o);
    o.tol = 0;
    o.max_probes = 40;
    for (int s = 0; s < runs; s++) {
        cv_rng r;
        cv_err e;
        cv_trace_result x, h, pp;
        cv_rng_seed(&r, (uint64_t)s);
        long before = done_of(&m);
        ck_assert_int_eq(cv_trace_xtrace(&m.op, &o, &r, &x, &e), 0);
        ck_assert_int_eq(done_of(&m) - before, 40);
        ck_assert_int_eq(x.matvecs, 40);
        ck_assert_int_eq(x.probes, 20);
        ck_assert_int_eq(x.sketch, 20);
        ck_assert(x.std_err > 0);
        sum += x.trace;
        sum2 += x.trace * x.trace;
        covered += fabs(x.trace - exact) < 3 * x.std_err;
        err_x += fabs(x.trace - exact);
        if (s < 20) {
            cv_rng_seed(&r, (uint64_t)s);
            ck_assert_int_eq(cv_trace_hutchinson(&m.op, &o, &r, &h, &e), 0);
            cv_rng_seed(&r, (uint64_t)s);
            ck_assert_int_eq(cv_trace_hutchpp(&m.op, &o, &r, &pp, &e), 0);
            err_h += fabs(h.trace - exact) * runs / 20;
            err_pp += fabs(pp.trace - exact) * runs / 20;
            cv_trace_result_free(&h);
            cv_trace_result_free(&pp);
        }
        cv_trace_result_free(&x);
    }
    double mean = sum / runs, sd = sqrt((sum2 / runs - mean * mean) * runs / (runs - 1));
    ck_assert_msg(fabs(mean - exact) < 4 * sd / sqrt(runs), "mean %g vs %g (sd %g)", mean,
                  exact, sd);
    ck_assert_msg(covered >= 0.9 * runs, "covered %d of %d", covered, runs);
    ck_assert_msg(err_x < 0.1 * err_h && err_x < err_pp, "xtrace %g hutch++ %g hutchinson %g",
                  err_x, err_pp, err_h);
    dmat_free(&m);
}
END_TEST

/* Rank r < q test vectors: A's range is in the sketch, the trace and the
 * diagonal are exact (stderr 0, q + r matvecs); samples all equal. */
START_TEST(xtrace_xdiag_exact_below_rank)
{
    int n = 60, rank = 5;
    double lam[60] = {0};
    for (int i = 0; i < rank; i++)
        lam[i] = 1.0 + i * (i % 2 ? -1.5 : 2.0);
    dmat m;
    dmat_spectrum(&m, n, lam, 3);
    cv_trace_options o;
    cv_trace_options_default(&o);
    o.max_probes = 20;
    o.return_samples = 1;
    cv_rng r;
    cv_rng_seed(&r, 1);
    cv_trace_result x;
    cv_err e;
    ck_assert_int_eq(cv_trace_xtrace(&m.op, &o, &r, &x, &e), 0);
    ck_assert_double_eq_tol(x.trace, dmat_trace(&m), 1e-10);
    ck_assert_double_eq(x.std_err, 0);
    ck_assert_int_eq(x.sketch, rank);
    ck_assert_int_eq(x.matvecs, 10 + rank);
    ck_assert_double_eq_tol(x.samples[9], x.trace, 1e-12);
    cv_trace_result_free(&x);
    cv_diag_options d;
    cv_diag_options_default(&d);
    d.max_probes = 20;
    cv_diag_result dr;
    ck_assert_int_eq(cv_diag_xdiag(&m.op, &d, &r, &dr, &e), 0);
    for (int i = 0; i < n; i++) {
        ck_assert_double_eq_tol(dr.diag[i], *A_(&m, i, i), 1e-10);
        ck_assert_double_eq(dr.std_err[i], 0);
    }
    ck_assert_int_eq(dr.matvecs, 10 + rank);
    cv_diag_result_free(&dr);
    /* A = 0: rank 0, trace 0 after q matvecs */
    memset(m.a, 0, sizeof(double) * n * n);
    ck_assert_int_eq(cv_trace_xtrace(&m.op, &o, &r, &x, &e), 0);
    ck_assert_double_eq(x.trace, 0);
    ck_assert_int_eq(x.matvecs, 10);
    cv_trace_result_free(&x);
    dmat_free(&m);
}
END_TEST

/* XDiag: unbiased entry by entry over 200 seeds, errors that cover, smaller
 * than Hutchinson's diagonal at the same matvecs; the budget and q probes;
 * Gaussian probes refused (the residual term would have no mean). */
START_TEST(xdiag_unbiased_and_beats_hutchinson)
{
    int n = 50, runs = 200;
    dmat m;
    decaying(&m, n, 11);
    double *mean = calloc((size_t)n, sizeof(double));
    double err_x = 0, err_h = 0;
    long covered = 0;
    cv_diag_options o;
    cv_diag_options_default(&o);
    o.max_probes = 30;
    for (int s = 0; s < runs; s++) {
        cv_rng r;
        cv_err e;
        cv_diag_result x, h;
        cv_rng_seed(&r, (uint64_t)s);
        long before = done_of(&m);
        ck_assert_int_eq(cv_diag_xdiag(&m.op, &o, &r, &x, &e), 0);
        ck_assert_int_eq(done_of(&m) - before, 30);
        ck_assert_int_eq(x.probes, 15);
        cv_rng_seed(&r, (uint64_t)s);
        ck_assert_int_eq(cv_diag_hutchinson(&m.op, &o, &r, &h, &e), 0);
        for (int i = 0; i < n; i++) {
            double a = *A_(&m, i, i);
            mean[i] += x.diag[i] / runs;
            covered += fabs(x.diag[i] - a) < 3 * x.std_err[i];
            err_x += (x.diag[i] - a) * (x.diag[i] - a);
            err_h += (h.diag[i] - a) * (h.diag[i] - a);
        }
        cv_diag_result_free(&x);
        cv_diag_result_free(&h);
    }
    double worst = 0, scale = 0;
    for (int i = 0; i < n; i++) {
        worst = fmax(worst, fabs(mean[i] - *A_(&m, i, i)));
        scale = fmax(scale, fabs(*A_(&m, i, i)));
    }
    ck_assert_msg(worst < 0.05 * scale, "bias %g (diagonal up to %g)", worst, scale);
    ck_assert_msg(covered >= 0.85 * runs * n, "covered %ld of %d", covered, runs * n);
    ck_assert_msg(err_x < 0.2 * err_h, "xdiag %g hutchinson %g", err_x, err_h);
    o.distribution = CV_PROBE_GAUSSIAN;
    cv_rng r;
    cv_rng_seed(&r, 1);
    cv_err e;
    cv_diag_result g;
    ck_assert_int_eq(cv_diag_xdiag(&m.op, &o, &r, &g, &e), -1);
    ck_assert_str_eq(e.field, "options.distribution");
    free(mean);
    dmat_free(&m);
}
END_TEST

START_TEST(xtrace_bad_budget)
{
    dmat m;
    dmat_random(&m, 10, 1);
    cv_trace_options o;
    cv_trace_options_default(&o);
    o.max_probes = 3;
    cv_rng r;
    cv_rng_seed(&r, 1);
    cv_trace_result x;
    cv_err e;
    ck_assert_int_eq(cv_trace_xtrace(&m.op, &o, &r, &x, &e), -1);
    ck_assert_str_eq(e.field, "options.max_probes");
    cv_diag_options d;
    cv_diag_options_default(&d);
    d.max_probes = 2;
    cv_diag_result dr;
    ck_assert_int_eq(cv_diag_xdiag(&m.op, &d, &r, &dr, &e), -1);
    ck_assert_str_eq(e.field, "options.max_probes");
    o.max_probes = 100; /* q capped at n = 10 */
    ck_assert_int_eq(cv_trace_xtrace(&m.op, &o, &r, &x, &e), 0);
    ck_assert_int_eq(x.probes, 10);
    ck_assert_double_eq_tol(x.trace, dmat_trace(&m), 1e-8 + 10 * x.std_err);
    cv_trace_result_free(&x);
    dmat_free(&m);
}
END_TEST

/* A PSD spectrum: a few large eigenvalues over a small positive floor. */
static void psd_decaying(dmat *m, int n, uint64_t seed)
{
    double *lam = malloc(sizeof(double) * n);
    cv_rng r;
    cv_rng_seed(&r, seed);
    for (int i = 0; i < n; i++)
        lam[i] = i < 8 ? 50.0 + 10 * i : 0.05 * fabs(cv_rng_normal(&r));
    dmat_spectrum(m, n, lam, seed + 1);
    free(lam);
}

/* XNysTrace on a PSD matrix: unbiased over 300 seeds, stderr covers, q = 40
 * test vectors for 40 matvecs, far below Hutchinson's error and of XTrace's
 * order at the same matvecs (here, with 8 dominant eigenvalues, both sketches
 * hold them: XTrace's error is the smaller one); power 2 estimates ||A||_F^2 the same way; an
 * indefinite matrix is refused (not_positive_definite). */
START_TEST(xnystrace_psd)
{
    int n = 100, runs = 300;
    dmat m;
    psd_decaying(&m, n, 5);
    double exact = dmat_trace(&m), fro2 = 0, sum = 0, sum2 = 0, fsum = 0;
    for (int i = 0; i < n * n; i++)
        fro2 += m.a[i] * m.a[i];
    double err_n = 0, err_x = 0, err_h = 0;
    int covered = 0;
    cv_trace_options o;
    cv_trace_options_default(&o);
    o.tol = 0;
    o.max_probes = 40;
    for (int s = 0; s < runs; s++) {
        cv_rng r;
        cv_err e;
        cv_trace_result x, h, f;
        cv_rng_seed(&r, (uint64_t)s);
        long before = done_of(&m);
        ck_assert_int_eq(cv_trace_xnystrace(&m.op, &o, 1, &r, &x, &e), 0);
        ck_assert_int_eq(done_of(&m) - before, 40);
        ck_assert_int_eq(x.probes, 40);
        sum += x.trace;
        sum2 += x.trace * x.trace;
        covered += fabs(x.trace - exact) < 3 * x.std_err;
        err_n += fabs(x.trace - exact);
        ck_assert_int_eq(cv_trace_xnystrace(&m.op, &o, 2, &r, &f, &e), 0);
        ck_assert_int_eq(f.probes, 20);
        fsum += f.trace / runs;
        if (s < 20) {
            cv_rng_seed(&r, (uint64_t)s);
            ck_assert_int_eq(cv_trace_hutchinson(&m.op, &o, &r, &h, &e), 0);
            err_h += fabs(h.trace - exact) * runs / 20;
            cv_trace_result_free(&h);
            cv_rng_seed(&r, (uint64_t)s);
            ck_assert_int_eq(cv_trace_xtrace(&m.op, &o, &r, &h, &e), 0);
            err_x += fabs(h.trace - exact) * runs / 20;
            cv_trace_result_free(&h);
        }
        cv_trace_result_free(&x);
        cv_trace_result_free(&f);
    }
    double mean = sum / runs, sd = sqrt((sum2 / runs - mean * mean) * runs / (runs - 1));
    ck_assert_msg(fabs(mean - exact) < 4 * sd / sqrt(runs) + 1e-9 * exact, "mean %g vs %g", mean,
                  exact);
    ck_assert_msg(covered >= 0.9 * runs, "covered %d of %d", covered, runs);
    ck_assert_msg(err_n < 0.1 * err_h && err_n < 2 * err_x, "xnys %g xtrace %g hutchinson %g",
                  err_n, err_x, err_h);
    ck_assert_msg(fabs(fsum - fro2) < 1e-3 * fro2, "||A||_F^2 %g vs %g", fsum, fro2);
    dmat_free(&m);

    dmat_random(&m, 30, 2); /* indefinite */
    cv_rng r;
    cv_rng_seed(&r, 1);
    cv_trace_result x;
    cv_err e;
    ck_assert_int_eq(cv_trace_xnystrace(&m.op, &o, 1, &r, &x, &e), -1);
    ck_assert_str_eq(e.code, "not_positive_definite");
    o.max_probes = 3;
    ck_assert_int_eq(cv_trace_xnystrace(&m.op, &o, 2, &r, &x, &e), -1);
    ck_assert_str_eq(e.field, "options.max_probes");
    dmat_free(&m);
}
END_TEST

/* ||A||_F^2 by Hutchinson: exact for Rademacher probes on a diagonal A (every
 * ||A v||^2 = sum a_ii^2), within 4 stderr on a random matrix. */
START_TEST(frobenius_hutchinson)
{
    dmat m;
    dmat_init(&m, 20);
    double want = 0;
    for (int i = 0; i < 20; i++) {
        *A_(&m, i, i) = sin(i + 1.0);
        want += sin(i + 1.0) * sin(i + 1.0);
    }
    cv_trace_options o;
    cv_trace_options_default(&o);
    o.max_probes = 5;
    o.tol = 0;
    cv_rng r;
    cv_rng_seed(&r, 3);
    cv_trace_result res;
    cv_err e;
    ck_assert_int_eq(cv_frobenius_hutchinson(&m.op, &o, &r, &res, &e), 0);
    ck_assert_double_eq_tol(res.trace, want, 1e-12);
    ck_assert_int_eq(res.probes, 5);
    ck_assert_int_eq(res.matvecs, 5);
    cv_trace_result_free(&res);
    dmat_free(&m);
    dmat_random(&m, 40, 4);
    want = 0;
    for (int i = 0; i < 40 * 40; i++)
        want += m.a[i] * m.a[i];
    o.max_probes = 400;
    ck_assert_int_eq(cv_frobenius_hutchinson(&m.op, &o, &r, &res, &e), 0);
    ck_assert(res.std_err > 0);
    ck_assert_msg(fabs(res.trace - want) < 4 * res.std_err, "%g vs %g (se %g)", res.trace, want,
                  res.std_err);
    cv_trace_result_free(&res);
    dmat_free(&m);
}
END_TEST

/* ------------------------------------------------------------ Lanczos */

/* Expected eigenvalues of `which` from ascending w. */
static void expected(const double *w, int n, int k, cv_which which, double *out)
{
    int idx[256];
    int lo = 0, hi = n - 1;
    for (int i = 0; i < k; i++) {
        if (which == CV_WHICH_SMALLEST)
            idx[i] = lo++;
        else if (which == CV_WHICH_LARGEST || fabs(w[hi]) >= fabs(w[lo]))
            idx[i] = hi--;
        else
            idx[i] = lo++;
        out[i] = w[idx[i]];
    }
}

static void check_eigen(dmat *m, const cv_eigen_result *res, const double *want, int k,
                        double rel)
{
    double nrm = opnorm(m);
    ck_assert_int_eq(res->k, k);
    for (int i = 0; i < k; i++)
        ck_assert_msg(fabs(res->eigenvalues[i] - want[i]) <= rel * fmax(fabs(want[i]), 1e-3 * nrm),
                      "eig %d: %.12g vs %.12g", i, res->eigenvalues[i], want[i]);
    if (res->eigenvectors) {
        ck_assert(orth_error(res->eigenvectors, m->n, k) < 1e-8);
        for (int i = 0; i < k; i++) {
            double r = residual_of(m, res->eigenvectors + (size_t)i * m->n,
                                   res->eigenvalues[i]);
            ck_assert_msg(r < 1e-4 * nrm, "residual %d: %g", i, r);
            ck_assert_msg(fabs(r - res->residuals[i]) < 1e-6 * nrm, "reported %g, true %g",
                          res->residuals[i], r);
        }
    }
}

START_TEST(lanczos_vs_dsyev)
{
    int sizes[] = {60, 120, 200};
    cv_which whichs[] = {CV_WHICH_LARGEST, CV_WHICH_SMALLEST, CV_WHICH_MAGNITUDE};
    for (int s = 0; s < 3; s++)
        for (int q = 0; q < 3; q++) {
            dmat m;
            dmat_random(&m, sizes[s], 20 + s);
            double *w = eigvals(&m), want[6];
            cv_eigen_options o;
            cv_eigen_options_default(&o);
            o.k = 6;
            o.which = whichs[q];
            o.return_vectors = 1;
            expected(w, m.n, o.k, o.which, want);
            cv_rng r;
            cv_rng_seed(&r, 5);
            cv_eigen_result res;
            cv_err e;
            ck_assert_msg(cv_eigen_lanczos(&m.op, &o, &r, &res, &e) == 0, "%s", e.message);
            ck_assert_int_eq(res.converged, 6);
            ck_assert_int_eq(res.matvecs, res.iterations);
            ck_assert_int_eq(done_of(&m), res.matvecs);
            check_eigen(&m, &res, want, 6, 1e-5);
            cv_eigen_result_free(&res);
            free(w);
            dmat_free(&m);
        }
}
END_TEST

/* Block Lanczos against dsyev: every `which`, block sizes 1, 4 and 8 (and
 * above n), reported residuals = true ones, matvecs a multiple of the block
 * (random matrices: a budget of n vectors); separated top eigenvalues
 * converge long before that;
 * a 5-fold top eigenvalue found 5 times with a block of 8; a rank-3 matrix
 * (invariant subspaces: restarts) and a tiny one whose basis fills n. */
START_TEST(block_lanczos_vs_dsyev)
{
    cv_which whichs[] = {CV_WHICH_LARGEST, CV_WHICH_SMALLEST, CV_WHICH_MAGNITUDE};
    int blocks[] = {1, 4, 8}; /* dividing n: the basis grows in whole blocks */
    for (int q = 0; q < 3; q++)
        for (int bi = 0; bi < 3; bi++) {
            dmat m;
            dmat_random(&m, 120, 30 + q);
            double *w = eigvals(&m), want[6];
            cv_eigen_options o;
            cv_eigen_options_default(&o);
            o.k = 6;
            o.which = whichs[q];
            o.return_vectors = 1;
            o.max_iter = m.n; /* a semicircle's clustered ends: blocks need more vectors */
            expected(w, m.n, o.k, o.which, want);
            cv_rng r;
            cv_rng_seed(&r, 5);
            cv_eigen_result res;
            cv_err e;
            ck_assert_msg(cv_eigen_block_lanczos(&m.op, &o, blocks[bi], &r, &res, &e) == 0,
                          "%s", e.message);
            ck_assert_msg(res.converged == 6, "which %d block %d: converged %d after %d blocks",
                          q, blocks[bi], res.converged, res.iterations);
            ck_assert_int_eq(done_of(&m), res.matvecs);
            ck_assert(res.matvecs == (long)res.iterations * blocks[bi] ||
                      res.matvecs == (long)res.iterations * blocks[bi] + 6); /* explicit res. */
            check_eigen(&m, &res, want, 6, 1e-5);
            cv_eigen_result_free(&res);
            free(w);
            dmat_free(&m);
        }
    /* separated top eigenvalues: converged long before the basis fills */
    {
        double ls[200];
        for (int i = 0; i < 200; i++)
            ls[i] = i < 6 ? 10.0 - i : (double)i / 200.0;
        dmat m;
        dmat_spectrum(&m, 200, ls, 11);
        cv_eigen_options o;
        cv_eigen_options_default(&o);
        o.k = 6;
        cv_rng r;
        cv_rng_seed(&r, 3);
        cv_eigen_result res;
        cv_err e;
        ck_assert_int_eq(cv_eigen_block_lanczos(&m.op, &o, 8, &r, &res, &e), 0);
        ck_assert_int_eq(res.converged, 6);
        ck_assert_msg(res.matvecs <= 100, "matvecs %ld", res.matvecs);
        for (int i = 0; i < 6; i++)
            ck_assert_double_eq_tol(res.eigenvalues[i], 10.0 - i, 1e-6 * 10);
        cv_eigen_result_free(&res);
        dmat_free(&m);
    }
    /* a 5-fold top eigenvalue */
    double lam[80];
    for (int i = 0; i < 80; i++)
        lam[i] = i < 5 ? 4.0 : 2.0 * (double)i / 80.0;
    dmat m;
    dmat_spectrum(&m, 80, lam, 9);
    cv_eigen_options o;
    cv_eigen_options_default(&o);
    o.k = 6;
    o.tol = 1e-8;
    cv_rng r;
    cv_rng_seed(&r, 2);
    cv_eigen_result res;
    cv_err e;
    ck_assert_int_eq(cv_eigen_block_lanczos(&m.op, &o, 8, &r, &res, &e), 0);
    for (int i = 0; i < 5; i++)
        ck_assert_double_eq_tol(res.eigenvalues[i], 4.0, 1e-7);
    ck_assert(res.eigenvalues[5] < 2.0);
    cv_eigen_result_free(&res);
    dmat_free(&m);
    /* rank 3 (restarts), k = 3 */
    double lr[50] = {3.0, 2.0, 1.0};
    dmat_spectrum(&m, 50, lr, 10);
    o.k = 3;
    ck_assert_int_eq(cv_eigen_block_lanczos(&m.op, &o, 4, &r, &res, &e), 0);
    ck_assert_double_eq_tol(res.eigenvalues[0], 3.0, 1e-8);
    ck_assert_double_eq_tol(res.eigenvalues[2], 1.0, 1e-8);
    cv_eigen_result_free(&res);
    dmat_free(&m);
    /* n = 6, block 16 (capped at n), k = n: the basis fills the space */
    dmat_random(&m, 6, 4);
    double *w = eigvals(&m), want[6];
    o.k = 6;
    o.return_vectors = 1;
    expected(w, 6, 6, CV_WHICH_LARGEST, want);
    ck_assert_int_eq(cv_eigen_block_lanczos(&m.op, &o, 16, &r, &res, &e), 0);
    check_eigen(&m, &res, want, 6, 1e-8);
    cv_eigen_result_free(&res);
    free(w);
    dmat_free(&m);
    ck_assert_int_eq(cv_eigen_block_lanczos(&m.op, &o, 0, &r, &res, &e), -1);
}
END_TEST

START_TEST(lanczos_repeated_and_rank_deficient)
{
    int n = 80;
    double lam[80];
    for (int i = 0; i < n; i++)
        lam[i] = i < 3 ? 5.0 : i < 5 ? 2.0 : i < 6 ? -1.0 : 0.0;
    dmat m;
    dmat_spectrum(&m, n, lam, 6);
    cv_eigen_options o;
    cv_eigen_options_default(&o);
    o.k = 6;
    o.return_vectors = 1;
    cv_rng r;
    cv_rng_seed(&r, 1);
    cv_eigen_result res;
    cv_err e;
    ck_assert_int_eq(cv_eigen_lanczos(&m.op, &o, &r, &res, &e), 0);
    double want[6] = {5, 5, 5, 2, 2, 0};
    ck_assert_int_eq(res.converged, 6);
    check_eigen(&m, &res, want, 6, 1e-5);
    cv_eigen_result_free(&res);

    o.which = CV_WHICH_SMALLEST;
    o.k = 3;
    double want_s[3] = {-1, 0, 0};
    ck_assert_int_eq(cv_eigen_lanczos(&m.op, &o, &r, &res, &e), 0);
    check_eigen(&m, &res, want_s, 3, 1e-5);
    cv_eigen_result_free(&res);
    dmat_free(&m);

    /* {5,5,5,3,0,...}: the first Krylov block sees one 5 and the 3; each
     * later block one more 5 */
    for (int i = 0; i < n; i++)
        lam[i] = i < 3 ? 5.0 : i < 4 ? 3.0 : 0.0;
    dmat_spectrum(&m, n, lam, 7);
    o.which = CV_WHICH_LARGEST;
    o.k = 3;
    double want3[3] = {5, 5, 5};
    ck_assert_int_eq(cv_eigen_lanczos(&m.op, &o, &r, &res, &e), 0);
    check_eigen(&m, &res, want3, 3, 1e-5);
    cv_eigen_result_free(&res);
    /* identity: every block is one step */
    for (int i = 0; i < n; i++)
        lam[i] = 1.0;
    dmat_free(&m);
    dmat_spectrum(&m, n, lam, 8);
    o.k = 4;
    double want_i[4] = {1, 1, 1, 1};
    ck_assert_int_eq(cv_eigen_lanczos(&m.op, &o, &r, &res, &e), 0);
    check_eigen(&m, &res, want_i, 4, 1e-5);
    ck_assert_int_le(res.iterations, 6);
    cv_eigen_result_free(&res);
    dmat_free(&m);
}
END_TEST

START_TEST(lanczos_repeated_top_in_random_spectrum)
{
    int n = 100;
    double lam[100];
    cv_rng r;
    cv_rng_seed(&r, 17);
    for (int i = 0; i < n; i++)
        lam[i] = i < 2 ? 4.0 : 2 * cv_rng_uniform(&r) - 1;
    dmat m;
    dmat_spectrum(&m, n, lam, 8);
    double *w = eigvals(&m), want[3];
    expected(w, n, 3, CV_WHICH_LARGEST, want);
    cv_eigen_options o;
    cv_eigen_options_default(&o);
    o.k = 3;
    cv_rng_seed(&r, 2);
    cv_eigen_result res;
    cv_err e;
    ck_assert_int_eq(cv_eigen_lanczos(&m.op, &o, &r, &res, &e), 0);
    check_eigen(&m, &res, want, 3, 1e-5);
    cv_eigen_result_free(&res);
    free(w);
    dmat_free(&m);
}
END_TEST

START_TEST(lanczos_k_equals_n)
{
    dmat m;
    dmat_random(&m, 40, 31);
    double *w = eigvals(&m), want[40];
    for (int q = 0; q < 3; q++) {
        cv_eigen_options o;
        cv_eigen_options_default(&o);
        o.k = 40;
        o.which = (cv_which)q;
        o.return_vectors = 1;
        expected(w, 40, 40, o.which, want);
        cv_rng r;
        cv_rng_seed(&r, 3);
        cv_eigen_result res;
        cv_err e;
        ck_assert_int_eq(cv_eigen_lanczos(&m.op, &o, &r, &res, &e), 0);
        ck_assert_int_eq(res.iterations, 40);
        check_eigen(&m, &res, want, 40, 1e-8);
        cv_eigen_result_free(&res);
    }
    free(w);
    dmat_free(&m);
}
END_TEST

START_TEST(lanczos_tridiagonal_relation)
{
    dmat m;
    dmat_random(&m, 30, 12);
    cv_lanczos_options o = {.steps = 12, .keep_basis = 1};
    double v0[30];
    for (int i = 0; i < 30; i++)
        v0[i] = 1.0 + i;
    cv_lanczos_result res;
    cv_err e;
    ck_assert_int_eq(cv_lanczos(&m.op, v0, &o, NULL, &res, &e), 0);
    ck_assert_int_eq(res.steps, 12);
    ck_assert(orth_error(res.basis, 30, 12) < 1e-12);
    /* V^T A V = T */
    for (int a = 0; a < 12; a++)
        for (int b = 0; b < 12; b++) {
            double s = 0;
            for (int i = 0; i < 30; i++)
                for (int j = 0; j < 30; j++)
                    s += res.basis[i + a * 30] * *A_(&m, i, j) * res.basis[j + b * 30];
            double t = a == b ? res.alpha[a] : abs(a - b) == 1 ? res.beta[a < b ? a : b] : 0;
            ck_assert_double_eq_tol(s, t, 1e-12);
        }
    cv_lanczos_result_free(&res);
    dmat_free(&m);
}
END_TEST

/* Large n: the reorthogonalization reads the float32 shadow of the basis
 * (reorth.h, n >= 2^16).  A diagonal operator with known spectrum (top five
 * 10, 9, 8, 7, 6; the rest in [0, 1)): the eigenvalues still converge to the
 * default tolerance, the basis stays orthogonal to float32 precision (not
 * the 1e-12 of the double path) and V^T A V = T to the same level. */
typedef struct {
    size_t n;
    double *d;
} diag_op;

static int diag_apply(void *ctx, int k, const double *X, double *Y, cv_err *e)
{
    const diag_op *q = ctx;
    for (int j = 0; j < k; j++)
        for (size_t i = 0; i < q->n; i++)
            Y[i + j * q->n] = q->d[i] * X[i + j * q->n];
    return 0;
}

START_TEST(lanczos_large_n_float_shadow)
{
    enum { N = 70000, STEPS = 40 };
    diag_op q = {N, malloc(sizeof(double) * N)};
    for (size_t i = 0; i < N; i++)
        q.d[i] = (double)((i * 7919) % N) / N; /* a permutation of [0, 1) */
    for (int t = 0; t < 5; t++)
        q.d[1000 * t + 17] = 10.0 - t;
    cv_linop op = {.n = N, .apply = diag_apply, .ctx = &q};
    cv_eigen_options o;
    cv_eigen_options_default(&o);
    o.k = 5;
    o.return_vectors = 1;
    cv_rng r;
    cv_rng_seed(&r, 3);
    cv_eigen_result res;
    cv_err e;
    ck_assert_msg(cv_eigen_lanczos(&op, &o, &r, &res, &e) == 0, "%s", e.message);
    ck_assert_int_eq(res.converged, 5);
    double *y = malloc(sizeof(double) * N);
    for (int t = 0; t < 5; t++) {
        ck_assert_msg(fabs(res.eigenvalues[t] - (10.0 - t)) <= 1e-6 * (10.0 - t), "eig %d: %.12g",
                      t, res.eigenvalues[t]);
        const double *v = res.eigenvectors + (size_t)t * N;
        diag_apply(&q, 1, v, y, &e);
        double rr = 0;
        for (size_t i = 0; i < N; i++)
            rr += (y[i] - res.eigenvalues[t] * v[i]) * (y[i] - res.eigenvalues[t] * v[i]);
        ck_assert_msg(sqrt(rr) < 1e-4 * 10, "residual %d: %g", t, sqrt(rr));
    }
    ck_assert_double_lt(orth_error(res.eigenvectors, N, 5), 1e-5);
    /* without eigenvectors only the float32 basis is kept (and grown past its
     * first 32 columns): the same steps, the same eigenvalues */
    cv_eigen_result nov;
    o.return_vectors = 0;
    o.k = 20;      /* bulk eigenvalues: far more steps than the first 40 columns */
    o.tol = 1e-10;
    cv_rng_seed(&r, 3);
    cv_eigen_result_free(&res);
    o.return_vectors = 1;
    ck_assert_int_eq(cv_eigen_lanczos(&op, &o, &r, &res, &e), 0);
    o.return_vectors = 0;
    cv_rng_seed(&r, 3);
    ck_assert_msg(cv_eigen_lanczos(&op, &o, &r, &nov, &e) == 0, "%s", e.message);
    ck_assert_ptr_null(nov.eigenvectors);
    ck_assert_msg(nov.iterations == res.iterations && nov.iterations > 40, "steps %d vs %d",
                  nov.iterations, res.iterations);
    for (int t = 0; t < 20; t++)
        ck_assert_msg(nov.eigenvalues[t] == res.eigenvalues[t] &&
                          nov.residuals[t] == res.residuals[t],
                      "pair %d differs without the double basis", t);
    cv_eigen_result_free(&nov);
    cv_eigen_result_free(&res);
    cv_rng_seed(&r, 3);

    cv_lanczos_options lo = {.steps = STEPS, .keep_basis = 1};
    cv_lanczos_result lr;
    ck_assert_int_eq(cv_lanczos(&op, NULL, &lo, &r, &lr, &e), 0);
    ck_assert_int_eq(lr.steps, STEPS);
    double oe = orth_error(lr.basis, N, STEPS);
    ck_assert_msg(oe < 1e-5, "basis orthogonality %g", oe);
    for (int a = 0; a < STEPS; a++) {
        diag_apply(&q, 1, lr.basis + (size_t)a * N, y, &e);
        for (int b = 0; b < STEPS; b++) {
            double s = 0;
            for (size_t i = 0; i < N; i++)
                s += lr.basis[i + (size_t)b * N] * y[i];
            double t = a == b ? lr.alpha[a] : abs(a - b) == 1 ? lr.beta[a < b ? a : b] : 0;
            ck_assert_msg(fabs(s - t) < 1e-5 * 10, "(V^T A V - T)[%d,%d] = %g", a, b, s - t);
        }
    }
    cv_lanczos_result_free(&lr);
    free(y);
    free(q.d);
}
END_TEST

/* Partial reorthogonalization (SLQ's mode from 2^16 on) against full, from
 * the same start on a diagonal operator whose outliers 10..6 converge early
 * (so orthogonality is lost and must be restored): the basis stays
 * semi-orthogonal, far fewer steps reorthogonalize, T has no ghost copies of
 * the outliers, its eigenvalues equal the full run's, and its quadrature
 * reproduces the moments v^T A^k v exactly computed on the diagonal. */
static void tridiag_quadrature(const cv_lanczos_result *lr, double *nodes, double *w)
{
    int m = lr->steps;
    double *S = malloc(sizeof(double) * (size_t)m * m), *off = malloc(sizeof(double) * m);
    memcpy(nodes, lr->alpha, sizeof(double) * m);
    memcpy(off, lr->beta, sizeof(double) * m);
    ck_assert_int_eq(LAPACKE_dstev(LAPACK_COL_MAJOR, 'V', m, nodes, off, S, m), 0);
    free(off);
    for (int i = 0; i < m; i++)
        w[i] = S[(size_t)i * m] * S[(size_t)i * m];
    free(S);
}

START_TEST(lanczos_partial_reorth_semi_orthogonal)
{
    enum { N = 70000, STEPS = 100 };
    diag_op q = {N, malloc(sizeof(double) * N)};
    for (size_t i = 0; i < N; i++)
        q.d[i] = (double)((i * 7919) % N) / N;
    for (int t = 0; t < 5; t++)
        q.d[1000 * t + 17] = 10.0 - t;
    cv_linop op = {.n = N, .apply = diag_apply, .ctx = &q};
    double *v0 = malloc(sizeof(double) * N);
    cv_rng r;
    cv_rng_seed(&r, 11);
    cv_rng_rademacher(&r, v0, N);
    cv_lanczos_result full, part;
    cv_lanczos_options fo = {.steps = STEPS}, po = {.steps = STEPS, .keep_basis = 1,
                                                     .partial_reorth = 1};
    cv_err e;
    ck_assert_int_eq(cv_lanczos(&op, v0, &fo, NULL, &full, &e), 0);
    ck_assert_int_eq(cv_lanczos(&op, v0, &po, NULL, &part, &e), 0);
    ck_assert_int_eq(part.steps, STEPS);
    ck_assert_int_eq(full.reorths, STEPS);
    /* without keep_basis only the float32 basis and two double vectors are
     * kept (SLQ's mode): the same arithmetic, the same T */
    cv_lanczos_result ring;
    po.keep_basis = 0;
    ck_assert_int_eq(cv_lanczos(&op, v0, &po, NULL, &ring, &e), 0);
    ck_assert_ptr_null(ring.basis);
    for (int i = 0; i < STEPS; i++)
        ck_assert_msg(ring.alpha[i] == part.alpha[i] && ring.beta[i] == part.beta[i],
                      "step %d differs without the double basis", i);
    cv_lanczos_result_free(&ring);
    ck_assert_msg(part.reorths > 0 && part.reorths <= STEPS * 4 / 5, "reorths %d", part.reorths);
    double oe = orth_error(part.basis, N, STEPS);
    ck_assert_msg(oe < 2e-3, "semi-orthogonality lost: %g", oe);
    double nf[STEPS], wf[STEPS], np[STEPS], wp[STEPS];
    tridiag_quadrature(&full, nf, wf);
    tridiag_quadrature(&part, np, wp);
    int near10 = 0;
    for (int i = 0; i < STEPS; i++) {
        ck_assert_msg(fabs(np[i] - nf[i]) <= 1e-5 * 10, "node %d: %.10g vs %.10g", i, np[i],
                      nf[i]);
        near10 += fabs(np[i] - 10.0) < 1e-3;
    }
    ck_assert_int_eq(near10, 1);
    for (int k = 1; k <= 8; k++) {
        double exact = 0, quad = 0;
        for (size_t i = 0; i < N; i++)
            exact += pow(q.d[i], k) / N; /* v0 is +-1: v^T A^k v / ||v||^2 */
        for (int i = 0; i < STEPS; i++)
            quad += wp[i] * pow(np[i], k);
        ck_assert_msg(fabs(quad - exact) <= 1e-5 * pow(10.0, k), "moment %d: %.10g vs %.10g",
                      k, quad, exact);
    }
    cv_lanczos_result_free(&full);
    cv_lanczos_result_free(&part);
    free(v0);
    free(q.d);
}
END_TEST

/* ------------------------------------------------------------ power */

START_TEST(power_vs_dsyev)
{
    int n = 80;
    double lam[80];
    cv_rng r;
    cv_rng_seed(&r, 3);
    for (int i = 0; i < n; i++)
        lam[i] = i == 0 ? 10.0 : i == 1 ? -7.0 : i == 2 ? 4.0 : 2 * cv_rng_uniform(&r) - 1;
    dmat m;
    dmat_spectrum(&m, n, lam, 10);
    cv_eigen_options o;
    cv_power_options_default(&o);
    o.k = 3;
    o.which = CV_WHICH_MAGNITUDE;
    o.tol = 1e-10;
    o.max_iter = 1000;
    o.return_vectors = 1;
    cv_eigen_result res;
    cv_err e;
    ck_assert_int_eq(cv_eigen_power(&m.op, &o, &r, &res, &e), 0);
    double want[3] = {10, -7, 4};
    ck_assert_int_eq(res.converged, 3);
    ck_assert_int_eq(res.matvecs, res.iterations);
    ck_assert_int_eq(done_of(&m), res.matvecs);
    check_eigen(&m, &res, want, 3, 1e-6);
    cv_eigen_result_free(&res);

    /* PyHessian defaults (tol 1e-3, 100 iterations), sorted descending */
    cv_power_options_default(&o);
    o.k = 3;
    ck_assert_int_eq(cv_eigen_power(&m.op, &o, &r, &res, &e), 0);
    double want_l[3] = {10, 4, -7};
    for (int i = 0; i < 3; i++)
        ck_assert_double_eq_tol(res.eigenvalues[i], want_l[i], 0.01 * fabs(want_l[i]));
    ck_assert_int_le(res.iterations, 300);
    cv_eigen_result_free(&res);

    o.which = CV_WHICH_SMALLEST;
    ck_assert_int_eq(cv_eigen_power(&m.op, &o, &r, &res, &e), -1);
    ck_assert_int_eq(e.status, CV_EINVAL);
    ck_assert_str_eq(e.field, "options.which");
    dmat_free(&m);
}
END_TEST

/* ------------------------------------------------------------ SLQ */

START_TEST(slq_moments_and_normalization)
{
    int n = 50;
    dmat m;
    dmat_random(&m, n, 41);
    for (int i = 0; i < n; i++)
        *A_(&m, i, i) += 0.3;
    double tr1 = dmat_trace(&m) / n, tr2 = 0;
    for (int i = 0; i < n * n; i++)
        tr2 += m.a[i] * m.a[i];
    tr2 /= n;
    cv_density_options o;
    cv_density_options_default(&o);
    o.runs = 400;
    o.lanczos_steps = 8;
    o.grid_points = 2000;
    cv_rng r;
    cv_rng_seed(&r, 6);
    cv_density_result res;
    cv_err e;
    ck_assert_int_eq(cv_density_slq(&m.op, &o, &r, &res, &e), 0);
    ck_assert_int_eq(res.matvecs, 400 * 8);
    ck_assert_int_eq(done_of(&m), 400 * 8);
    ck_assert_int_eq(atomic_load(&m.prog.planned), 400 * 8);
    double *w = eigvals(&m);
    double exact[3] = {1, tr1, tr2};
    for (int j = 0; j < 3; j++) {
        double mean = 0, m2 = 0;
        for (int k = 0; k < o.runs; k++) {
            double mom = 0;
            for (int i = 0; i < res.steps; i++) {
                double th = res.nodes[k * res.steps + i];
                mom += res.weights[k * res.steps + i] * pow(th, j);
                if (j == 0) {
                    ck_assert(th >= w[0] - 1e-9 && th <= w[n - 1] + 1e-9);
                    ck_assert(i == 0 || th >= res.nodes[k * res.steps + i - 1]);
                }
            }
            double d = mom - mean;
            mean += d / (k + 1);
            m2 += d * (mom - mean);
        }
        double se = sqrt(m2 / (o.runs - 1) / o.runs);
        if (j == 0)
            ck_assert_double_eq_tol(mean, 1.0, 1e-12);
        else
            ck_assert_msg(fabs(mean - exact[j]) <= 4 * se && se < 0.05 * fabs(exact[j]),
                          "moment %d: %g vs %g (se %g)", j, mean, exact[j], se);
    }
    double dx = res.grid[1] - res.grid[0], sum = 0, trap = 0;
    for (int g = 0; g < res.grid_points; g++) {
        ck_assert(res.values[g] >= 0);
        sum += res.values[g];
        trap += (g == 0 || g == res.grid_points - 1 ? 0.5 : 1.0) * res.values[g];
    }
    ck_assert_double_eq_tol(sum * dx, 1.0, 1e-12);
    ck_assert_double_eq_tol(trap * dx, 1.0, 1e-3);
    double lo = 0, hi = 0; /* PyHessian: mean extreme nodes -/+ 0.01 */
    for (int k = 0; k < o.runs; k++) {
        lo += res.nodes[k * res.steps] / o.runs;
        hi += res.nodes[k * res.steps + res.steps - 1] / o.runs;
    }
    ck_assert_double_eq_tol(res.grid[0], lo - 0.01, 1e-12);
    ck_assert_double_eq_tol(res.grid[res.grid_points - 1], hi + 0.01, 1e-12);
    ck_assert_double_eq_tol(res.sigma2_used, 1e-5 * fmax(1.0, res.grid[res.grid_points - 1] - res.grid[0]), 1e-15);
    free(w);
    cv_density_result_free(&res);
    dmat_free(&m);
}
END_TEST

START_TEST(slq_exact_for_small_matrix)
{
    /* steps = n: the quadrature is exact for every polynomial; nodes are
     * the eigenvalues for a start vector with all components non-zero */
    int n = 12;
    dmat m;
    dmat_random(&m, n, 2);
    cv_density_options o;
    cv_density_options_default(&o);
    o.lanczos_steps = 50; /* capped at n */
    o.grid_points = 500;
    cv_rng r;
    cv_rng_seed(&r, 1);
    cv_density_result res;
    cv_err e;
    ck_assert_int_eq(cv_density_slq(&m.op, &o, &r, &res, &e), 0);
    ck_assert_int_eq(res.steps, n);
    double *w = eigvals(&m);
    for (int i = 0; i < n; i++)
        ck_assert_double_eq_tol(res.nodes[i], w[i], 1e-10);
    free(w);
    cv_density_result_free(&res);
    dmat_free(&m);
}
END_TEST

/* ------------------------------------------------------------ solve */

static void spd(dmat *m, int n, uint64_t seed)
{
    dmat b;
    dmat_random(&b, n, seed);
    dmat_init(m, n);
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++) {
            double s = 0;
            for (int l = 0; l < n; l++)
                s += *A_(&b, l, i) * *A_(&b, l, j);
            *A_(m, i, j) = s + (i == j ? 0.1 : 0);
        }
    dmat_free(&b);
}

static double *rhs(int n, uint64_t seed)
{
    double *b = malloc(sizeof(double) * n);
    cv_rng r;
    cv_rng_seed(&r, seed);
    cv_rng_gaussian(&r, b, n);
    return b;
}

/* x = (A + delta I)^-1 b by dposv (spd) or dgesv. */
static double *dense_solve(dmat *m, const double *b, double delta, int spd_)
{
    int n = m->n;
    double *a = malloc(sizeof(double) * n * n), *x = malloc(sizeof(double) * n);
    memcpy(a, m->a, sizeof(double) * n * n);
    memcpy(x, b, sizeof(double) * n);
    for (int i = 0; i < n; i++)
        a[i + (size_t)i * n] += delta;
    if (spd_) {
        ck_assert_int_eq(LAPACKE_dposv(LAPACK_COL_MAJOR, 'U', n, 1, a, n, x, n), 0);
    } else {
        lapack_int *piv = malloc(sizeof(lapack_int) * n);
        ck_assert_int_eq(LAPACKE_dgesv(LAPACK_COL_MAJOR, n, 1, a, n, piv, x, n), 0);
        free(piv);
    }
    free(a);
    return x;
}

static double relerr(const double *a, const double *b, int n)
{
    double d = 0, s = 0;
    for (int i = 0; i < n; i++) {
        d += (a[i] - b[i]) * (a[i] - b[i]);
        s += b[i] * b[i];
    }
    return sqrt(d / s);
}

START_TEST(cg_vs_dposv)
{
    int n = 60;
    dmat m;
    spd(&m, n, 3);
    double *b = rhs(n, 4);
    double deltas[2] = {0.0, 0.5};
    for (int d = 0; d < 2; d++) {
        cv_solve_options o;
        cv_solve_options_default(&o);
        o.tol = 1e-10;
        o.damping = deltas[d];
        cv_solve_result res;
        cv_err e;
        long before = done_of(&m);
        ck_assert_int_eq(cv_solve(&m.op, b, &o, &res, NULL, &e), 0);
        double *x = dense_solve(&m, b, deltas[d], 1);
        ck_assert(res.converged);
        ck_assert(res.residual < 1e-9);
        ck_assert_msg(relerr(res.x, x, n) < 1e-7, "err %g", relerr(res.x, x, n));
        ck_assert_int_eq(res.matvecs, res.iterations + 1);
        ck_assert_int_eq(done_of(&m) - before, res.matvecs);
        free(x);
        cv_solve_result_free(&res);
    }
    free(b);
    dmat_free(&m);
}
END_TEST

START_TEST(cg_refuses_indefinite)
{
    int n = 40;
    dmat m;
    dmat_random(&m, n, 8);
    double *b = rhs(n, 1);
    cv_solve_options o;
    cv_solve_options_default(&o);
    cv_solve_result res;
    cv_err e;
    ck_assert_int_eq(cv_solve(&m.op, b, &o, &res, NULL, &e), -1);
    ck_assert_int_eq(e.status, CV_EINVAL);
    ck_assert_str_eq(e.code, "not_positive_definite");
    ck_assert_str_eq(e.field, "options.damping");
    ck_assert_ptr_nonnull(strstr(e.message, "minres"));
    ck_assert_ptr_null(res.x);
    /* enough damping makes it positive definite */
    double *w = eigvals(&m);
    o.damping = -w[0] + 0.5;
    o.tol = 1e-10;
    ck_assert_int_eq(cv_solve(&m.op, b, &o, &res, NULL, &e), 0);
    double *x = dense_solve(&m, b, o.damping, 1);
    ck_assert(relerr(res.x, x, n) < 1e-7);
    free(x);
    free(w);
    cv_solve_result_free(&res);
    free(b);
    dmat_free(&m);
}
END_TEST

/* method on the indefinite system (A + d I) x = b for d = 0 and 0.1: converged,
 * the true residual below 1e-9, x = dgesv's; each product counted once. */
static void check_vs_dgesv(dmat *m, const double *b, cv_solve_method method)
{
    cv_solve_options o;
    cv_solve_options_default(&o);
    o.method = method;
    o.tol = 1e-10;
    for (int d = 0; d < 2; d++) {
        o.damping = d ? 0.1 : 0.0;
        cv_solve_result res;
        cv_err e;
        long before = done_of(m);
        ck_assert_int_eq(cv_solve(&m->op, b, &o, &res, NULL, &e), 0);
        double *x = dense_solve(m, b, o.damping, 0);
        ck_assert(res.converged);
        ck_assert_msg(res.residual < 1e-9, "residual %g", res.residual);
        ck_assert_msg(relerr(res.x, x, m->n) < 1e-7, "err %g", relerr(res.x, x, m->n));
        ck_assert_int_eq(done_of(m) - before, res.matvecs);
        if (method == CV_SOLVE_LSMR)
            ck_assert_int_eq(res.matvecs, 2L * res.iterations + 2);
        free(x);
        cv_solve_result_free(&res);
    }
}

START_TEST(minres_indefinite_vs_dgesv)
{
    int n = 70;
    double lam[70];
    for (int i = 0; i < n; i++)
        lam[i] = (i % 2 ? -1.0 : 1.0) * (0.2 + 0.05 * i);
    dmat m;
    dmat_spectrum(&m, n, lam, 12);
    double *b = rhs(n, 2);
    check_vs_dgesv(&m, b, CV_SOLVE_MINRES);
    /* CG refuses the same system */
    cv_solve_options o;
    cv_solve_options_default(&o);
    o.method = CV_SOLVE_CG;
    o.damping = 0;
    cv_solve_result res;
    cv_err e;
    ck_assert_int_eq(cv_solve(&m.op, b, &o, &res, NULL, &e), -1);
    ck_assert_str_eq(e.code, "not_positive_definite");
    free(b);
    dmat_free(&m);
}
END_TEST

/* LSMR: indefinite (and damped) systems = dgesv; a singular inconsistent
 * system gives the minimum-norm least-squares solution (dgelsd), converged
 * (the Krylov space is exhausted); two matvecs per iteration plus one. */
START_TEST(lsmr_vs_lapack)
{
    int n = 60;
    double lam[60];
    for (int i = 0; i < n; i++)
        lam[i] = (i % 2 ? -1.0 : 1.0) * (0.2 + 0.05 * i);
    dmat m;
    dmat_spectrum(&m, n, lam, 13);
    double *b = rhs(n, 4);
    check_vs_dgesv(&m, b, CV_SOLVE_LSMR);
    dmat_free(&m);
    cv_solve_options o;
    cv_solve_options_default(&o);
    o.method = CV_SOLVE_LSMR;
    o.tol = 1e-10;
    /* rank 10 of 40, b outside the range: least squares, minimum norm */
    n = 40;
    double lr[40] = {0};
    for (int i = 0; i < 10; i++)
        lr[i] = 1.0 + i;
    dmat_spectrum(&m, n, lr, 14);
    double *a = malloc(sizeof(double) * n * n), *x = malloc(sizeof(double) * n), sv[40];
    memcpy(a, m.a, sizeof(double) * n * n);
    memcpy(x, b, sizeof(double) * n);
    lapack_int rank;
    ck_assert_int_eq(LAPACKE_dgelsd(LAPACK_COL_MAJOR, n, n, 1, a, n, x, n, sv, 1e-10, &rank), 0);
    ck_assert_int_eq(rank, 10);
    o.damping = 0;
    cv_solve_result res;
    cv_err e;
    ck_assert_int_eq(cv_solve(&m.op, b, &o, &res, NULL, &e), 0);
    ck_assert(res.converged);
    ck_assert_msg(relerr(res.x, x, n) < 1e-7, "least squares err %g", relerr(res.x, x, n));
    ck_assert(res.residual > 0.1); /* inconsistent: the residual stays */
    cv_solve_result_free(&res);
    free(a);
    free(x);
    free(b);
    dmat_free(&m);
}
END_TEST

/* Neumann: x = s sum_{k=0}^{K} (I - s M)^k b exactly (against the same sum
 * formed densely), converging to dposv's solution for s < 2 / lambda_max;
 * num_terms matvecs (+1 for the residual); divergence refused. */
START_TEST(neumann_series)
{
    int n = 30;
    double lam[30];
    for (int i = 0; i < n; i++)
        lam[i] = 0.5 + 0.05 * i; /* in (0.5, 2) */
    dmat m;
    dmat_spectrum(&m, n, lam, 15);
    double *b = rhs(n, 5);
    cv_solve_options o;
    cv_solve_options_default(&o);
    o.method = CV_SOLVE_NEUMANN;
    o.scale = 0.5;
    o.num_terms = 3;
    cv_solve_result res;
    cv_err e;
    long before = done_of(&m);
    ck_assert_int_eq(cv_solve(&m.op, b, &o, &res, NULL, &e), 0);
    ck_assert_int_eq(done_of(&m) - before, 4);
    ck_assert_int_eq(res.iterations, 3);
    double *t = malloc(sizeof(double) * n), *sum = calloc((size_t)n, sizeof(double));
    double *mt = malloc(sizeof(double) * n);
    memcpy(t, b, sizeof(double) * n);
    for (int k = 0; k <= 3; k++) {
        for (int i = 0; i < n; i++)
            sum[i] += 0.5 * t[i];
        for (int i = 0; i < n; i++) {
            mt[i] = 0;
            for (int j = 0; j < n; j++)
                mt[i] += *A_(&m, i, j) * t[j];
        }
        for (int i = 0; i < n; i++)
            t[i] -= 0.5 * mt[i];
    }
    ck_assert_msg(relerr(res.x, sum, n) < 1e-12, "err %g", relerr(res.x, sum, n));
    cv_solve_result_free(&res);
    o.num_terms = 200;
    o.tol = 1e-8;
    ck_assert_int_eq(cv_solve(&m.op, b, &o, &res, NULL, &e), 0);
    double *x = dense_solve(&m, b, 0, 1);
    ck_assert(res.converged);
    ck_assert_msg(relerr(res.x, x, n) < 1e-8, "err %g", relerr(res.x, x, n));
    cv_solve_result_free(&res);
    o.scale = 1.5; /* 1.5 * 1.95 > 2: diverges */
    ck_assert_int_eq(cv_solve(&m.op, b, &o, &res, NULL, &e), -1);
    ck_assert_str_eq(e.code, "diverges");
    ck_assert_str_eq(e.field, "options.scale");
    free(x);
    free(t);
    free(mt);
    free(sum);
    free(b);
    dmat_free(&m);
}
END_TEST

/* cv_solve_many: k CG systems in lockstep = k separate CG solves (the same
 * iterates up to the products' summation order), each's own iteration count
 * and residual; one system with a zero right-hand side; MINRES one by one. */
START_TEST(solve_many_lockstep_cg)
{
    int n = 40, k = 4;
    double lam[40];
    for (int i = 0; i < n; i++)
        lam[i] = 0.1 + 0.2 * i * (i % 3 ? 1 : 0.1);
    dmat m;
    dmat_spectrum(&m, n, lam, 16);
    double *B = calloc((size_t)n * k, sizeof(double));
    for (int j = 0; j < k; j++) {
        double *b = rhs(n, 20 + j);
        if (j != 2) /* system 2: b = 0 */
            memcpy(B + (size_t)j * n, b, sizeof(double) * n);
        free(b);
    }
    cv_solve_options o;
    cv_solve_options_default(&o);
    o.tol = 1e-10;
    o.damping = 0.05;
    cv_solve_result many[4];
    cv_err e;
    ck_assert_int_eq(cv_solve_many(&m.op, k, B, &o, many, &e), 0);
    for (int j = 0; j < k; j++) {
        cv_solve_result one;
        ck_assert_int_eq(cv_solve(&m.op, B + (size_t)j * n, &o, &one, NULL, &e), 0);
        ck_assert_msg(abs(one.iterations - many[j].iterations) <= 1, "system %d: %d vs %d", j,
                      one.iterations, many[j].iterations);
        ck_assert(many[j].converged);
        ck_assert_msg(relerr(many[j].x, one.x, n) < 1e-9 || j == 2, "system %d err %g", j,
                      relerr(many[j].x, one.x, n));
        ck_assert_msg(many[j].residual < 1e-9, "residual %g", many[j].residual);
        cv_solve_result_free(&one);
        cv_solve_result_free(&many[j]);
    }
    o.method = CV_SOLVE_MINRES;
    ck_assert_int_eq(cv_solve_many(&m.op, k, B, &o, many, &e), 0);
    for (int j = 0; j < k; j++) {
        ck_assert(many[j].converged);
        cv_solve_result_free(&many[j]);
    }
    free(B);
    dmat_free(&m);
}
END_TEST

/* Block CG (O'Leary; cv_solve_many method block_cg) against dposv: four
 * right-hand sides on a spectrum with four outliers (the block's Krylov
 * space captures them: fewer iterations than CG in lockstep), rank-deficient
 * right-hand sides (b2 = b0 + b1, b3 = 2 b0: the block shrinks to two
 * directions, x2 = x0 + x1), a zero right-hand side, one system (= CG), and
 * an indefinite operator refused naming the damping. */
START_TEST(solve_many_block_cg)
{
    int n = 80, k = 4;
    double lam[80];
    for (int i = 0; i < n; i++)
        lam[i] = i < 4 ? 100.0 * (i + 1) : 1.0 + (double)i / n;
    dmat m;
    dmat_spectrum(&m, n, lam, 31);
    double *B = calloc((size_t)n * k, sizeof(double));
    for (int j = 0; j < k; j++) {
        double *b = rhs(n, 40 + j);
        memcpy(B + (size_t)j * n, b, sizeof(double) * n);
        free(b);
    }
    cv_solve_options o;
    cv_solve_options_default(&o);
    o.tol = 1e-10;
    o.damping = 0.01;
    cv_solve_result blk[4], lock[4];
    cv_err e;
    o.method = CV_SOLVE_BLOCK_CG;
    ck_assert_int_eq(cv_solve_many(&m.op, k, B, &o, blk, &e), 0);
    o.method = CV_SOLVE_CG;
    ck_assert_int_eq(cv_solve_many(&m.op, k, B, &o, lock, &e), 0);
    int bi = 0, li = 0;
    for (int j = 0; j < k; j++) {
        double *x = dense_solve(&m, B + (size_t)j * n, o.damping, 1);
        ck_assert(blk[j].converged);
        ck_assert_msg(relerr(blk[j].x, x, n) < 1e-8, "system %d err %g", j,
                      relerr(blk[j].x, x, n));
        ck_assert_msg(blk[j].residual < 1e-9, "residual %g", blk[j].residual);
        bi = blk[j].iterations > bi ? blk[j].iterations : bi;
        li = lock[j].iterations > li ? lock[j].iterations : li;
        ck_assert_int_le(blk[j].matvecs, (long)k * blk[j].iterations + k);
        free(x);
        cv_solve_result_free(&blk[j]);
        cv_solve_result_free(&lock[j]);
    }
    ck_assert_msg(bi < li, "block CG %d iterations, CG %d", bi, li);

    /* rank 2: b2 = b0 + b1, b3 = 2 b0 */
    for (int i = 0; i < n; i++) {
        B[2 * n + i] = B[i] + B[n + i];
        B[3 * n + i] = 2 * B[i];
    }
    o.method = CV_SOLVE_BLOCK_CG;
    ck_assert_int_eq(cv_solve_many(&m.op, k, B, &o, blk, &e), 0);
    bi = 0;
    for (int j = 0; j < k; j++) {
        double *x = dense_solve(&m, B + (size_t)j * n, o.damping, 1);
        bi = blk[j].iterations > bi ? blk[j].iterations : bi;
        ck_assert(blk[j].converged);
        ck_assert_msg(relerr(blk[j].x, x, n) < 1e-8, "dependent system %d err %g", j,
                      relerr(blk[j].x, x, n));
        free(x);
    }
    ck_assert_msg(blk[0].matvecs <= 2L * bi + k, "%ld matvecs in %d iterations",
                  blk[0].matvecs, bi);
    for (int j = 0; j < k; j++)
        cv_solve_result_free(&blk[j]);

    /* a zero right-hand side; then one system (plain CG's iterates) */
    memset(B + n, 0, sizeof(double) * n);
    ck_assert_int_eq(cv_solve_many(&m.op, 2, B, &o, blk, &e), 0);
    ck_assert(blk[1].converged);
    ck_assert_int_eq(blk[1].iterations, 0);
    for (int i = 0; i < n; i++)
        ck_assert(blk[1].x[i] == 0);
    cv_solve_result one;
    o.method = CV_SOLVE_CG;
    ck_assert_int_eq(cv_solve(&m.op, B, &o, &one, NULL, &e), 0);
    ck_assert_msg(relerr(blk[0].x, one.x, n) < 1e-8, "err %g", relerr(blk[0].x, one.x, n));
    cv_solve_result_free(&one);
    cv_solve_result_free(&blk[0]);
    cv_solve_result_free(&blk[1]);

    /* indefinite: -1 in the spectrum, damping 0.5 too small */
    lam[10] = -1.0;
    dmat_free(&m);
    dmat_spectrum(&m, n, lam, 31);
    memcpy(B + n, B, sizeof(double) * n);
    B[n] += 1.0;
    o.method = CV_SOLVE_BLOCK_CG;
    o.damping = 0.5;
    ck_assert_int_eq(cv_solve_many(&m.op, 2, B, &o, blk, &e), -1);
    ck_assert_str_eq(e.code, "not_positive_definite");
    ck_assert_str_eq(e.field, "options.damping");
    ck_assert_ptr_null(blk[0].x);
    free(B);
    dmat_free(&m);
}
END_TEST

START_TEST(newton_step_and_prediction)
{
    int n = 30;
    dmat m;
    spd(&m, n, 21);
    double *g = rhs(n, 5), *mg = malloc(sizeof(double) * n);
    for (int i = 0; i < n; i++)
        mg[i] = -g[i];
    for (int meth = 0; meth < 2; meth++) {
        cv_solve_options o;
        cv_solve_options_default(&o);
        o.method = meth;
        o.damping = 0.3;
        o.tol = 1e-12;
        cv_newton_result res;
        cv_err e;
        ck_assert_int_eq(cv_newton_step(&m.op, g, &o, &res, &e), 0);
        double *s = dense_solve(&m, mg, 0.3, 1);
        ck_assert(relerr(res.step, s, n) < 1e-8);
        double pred = 0;
        for (int i = 0; i < n; i++) {
            double as = 0;
            for (int j = 0; j < n; j++)
                as += *A_(&m, i, j) * s[j];
            pred += 0.5 * s[i] * as + g[i] * s[i];
        }
        ck_assert_double_eq_tol(res.predicted_change, pred, 1e-8 * fabs(pred));
        ck_assert(res.predicted_change < 0);
        free(s);
        cv_newton_result_free(&res);
    }
    free(g);
    free(mg);
    dmat_free(&m);
}
END_TEST

/* ------------------------------------------------------------ cancellation */

static void cancel_after(cv_progress *p, void *user)
{
    if (atomic_load(&p->done) >= *(long *)user)
        atomic_store(p->cancel, 1);
}

/* Runs estimator `which_est` on m; returns its return code. */
static int run_estimator(int which_est, dmat *m, cv_err *e)
{
    cv_rng r;
    cv_rng_seed(&r, 1);
    double b[64];
    for (int i = 0; i < m->n; i++)
        b[i] = 1.0 + i;
    int rc = -1;
    switch (which_est) {
    case 0: {
        cv_trace_options o;
        cv_trace_options_default(&o);
        o.tol = 0;
        cv_trace_result res;
        rc = cv_trace_hutchinson(&m->op, &o, &r, &res, e);
        if (!rc)
            cv_trace_result_free(&res);
        break;
    }
    case 1: {
        cv_trace_options o;
        cv_trace_options_default(&o);
        o.tol = 0;
        cv_trace_result res;
        rc = cv_trace_hutchpp(&m->op, &o, &r, &res, e);
        if (!rc)
            cv_trace_result_free(&res);
        break;
    }
    case 2: {
        cv_diag_result res;
        rc = cv_diag_hutchinson(&m->op, NULL, &r, &res, e);
        if (!rc)
            cv_diag_result_free(&res);
        break;
    }
    case 3: {
        cv_diag_result res;
        rc = cv_diag_exact(&m->op, NULL, &res, e);
        if (!rc)
            cv_diag_result_free(&res);
        break;
    }
    case 4: {
        cv_eigen_options o;
        cv_eigen_options_default(&o);
        o.k = 3;
        o.tol = 1e-14;
        cv_eigen_result res;
        rc = cv_eigen_lanczos(&m->op, &o, &r, &res, e);
        if (!rc)
            cv_eigen_result_free(&res);
        break;
    }
    case 5: {
        cv_eigen_options o;
        cv_power_options_default(&o);
        o.k = 2;
        o.tol = 0;
        cv_eigen_result res;
        rc = cv_eigen_power(&m->op, &o, &r, &res, e);
        if (!rc)
            cv_eigen_result_free(&res);
        break;
    }
    case 6: {
        cv_density_options o;
        cv_density_options_default(&o);
        o.runs = 3;
        o.lanczos_steps = 20;
        cv_density_result res;
        rc = cv_density_slq(&m->op, &o, &r, &res, e);
        if (!rc)
            cv_density_result_free(&res);
        break;
    }
    default: {
        cv_solve_options o;
        cv_solve_options_default(&o);
        o.method = which_est == 7 ? CV_SOLVE_CG : CV_SOLVE_MINRES;
        o.tol = 0;
        o.max_iter = 50;
        cv_solve_result res;
        rc = cv_solve(&m->op, b, &o, &res, NULL, e);
        if (!rc)
            cv_solve_result_free(&res);
        break;
    }
    }
    return rc;
}

START_TEST(cancellation)
{
    for (int est = 0; est < 9; est++) {
        dmat m;
        spd(&m, 40, 77);
        atomic_int cancel = 1;
        m.prog.cancel = &cancel;
        cv_err e;
        ck_assert_int_eq(run_estimator(est, &m, &e), -1);
        ck_assert_int_eq(e.status, CV_ECANCELLED);
        ck_assert_int_eq(done_of(&m), 0);

        /* cancelled mid-run after about 7 matvecs */
        cv_progress_init(&m.prog);
        atomic_store(&cancel, 0);
        long after = 7;
        m.prog.cancel = &cancel;
        m.prog.on_progress = cancel_after;
        m.prog.user = &after;
        ck_assert_int_eq(run_estimator(est, &m, &e), -1);
        ck_assert_int_eq(e.status, CV_ECANCELLED);
        ck_assert_int_ge(done_of(&m), 7);
        ck_assert_int_le(done_of(&m), 7 + 16);

        /* a deadline in the past */
        cv_progress_init(&m.prog);
        m.prog.deadline = cv_now_s() - 1;
        ck_assert_int_eq(run_estimator(est, &m, &e), -1);
        ck_assert_int_eq(e.status, CV_ETIMEOUT);
        dmat_free(&m);
    }
}
END_TEST

START_TEST(progress_counts_match_matvecs)
{
    dmat m;
    spd(&m, 30, 5);
    cv_rng r;
    cv_rng_seed(&r, 4);
    cv_err e;
    cv_trace_result t;
    ck_assert_int_eq(cv_trace_hutchpp(&m.op, NULL, &r, &t, &e), 0);
    ck_assert_int_eq(done_of(&m), t.matvecs);
    long base = done_of(&m);
    cv_eigen_result ev;
    ck_assert_int_eq(cv_eigen_power(&m.op, NULL, &r, &ev, &e), 0);
    ck_assert_int_eq(done_of(&m) - base, ev.matvecs);
    ck_assert_int_le(done_of(&m), atomic_load(&m.prog.planned));
    base = done_of(&m);
    cv_diag_result d;
    ck_assert_int_eq(cv_diag_hutchinson(&m.op, NULL, &r, &d, &e), 0);
    ck_assert_int_eq(done_of(&m) - base, d.matvecs);
    ck_assert_int_eq(d.matvecs, 100);
    cv_trace_result_free(&t);
    cv_eigen_result_free(&ev);
    cv_diag_result_free(&d);
    dmat_free(&m);
}
END_TEST

/* Honest progress plans: CG/MINRES plan min(max_iter, n) + 1 matvecs (not
 * 10 n + 1 for the default max_iter); Lanczos publishes its leading Ritz
 * value with no standard error (the Ritz residual is none). */
START_TEST(progress_plans_and_partials)
{
    int n = 30;
    double *b = rhs(n, 3);
    for (int method = 0; method < 2; method++)
        for (int mi = 0; mi <= 5; mi += 5) {
            dmat m;
            spd(&m, n, 9);
            cv_solve_options o;
            cv_solve_options_default(&o);
            o.method = method;
            o.max_iter = mi;
            cv_solve_result res;
            cv_err e;
            ck_assert_int_eq(cv_solve(&m.op, b, &o, &res, NULL, &e), 0);
            long planned = atomic_load(&m.prog.planned);
            ck_assert_int_eq(planned, (mi ? mi : n) + 1);
            ck_assert_int_le(done_of(&m), planned);
            ck_assert_int_eq(done_of(&m), res.matvecs);
            if (!mi)
                ck_assert(res.converged);
            cv_solve_result_free(&res);
            dmat_free(&m);
        }
    free(b);

    dmat m;
    dmat_random(&m, 40, 12);
    cv_eigen_options eo;
    cv_eigen_options_default(&eo);
    eo.k = 2;
    cv_rng r;
    cv_rng_seed(&r, 2);
    cv_eigen_result er;
    cv_err e;
    atomic_store(&m.prog.partial_stderr, 123.0);
    ck_assert_int_eq(cv_eigen_lanczos(&m.op, &eo, &r, &er, &e), 0);
    double v, se;
    ck_assert_int_eq(cv_progress_get_partial(&m.prog, &v, &se), er.iterations);
    ck_assert(v == er.eigenvalues[0]);
    ck_assert(se == 0.0);
    cv_eigen_result_free(&er);
    dmat_free(&m);
}
END_TEST

/* ------------------------------------------------------------ options */

START_TEST(bad_options)
{
    dmat m;
    dmat_random(&m, 10, 1);
    cv_rng r;
    cv_rng_seed(&r, 1);
    cv_err e;

    cv_trace_options to;
    cv_trace_options_default(&to);
    to.max_probes = 0;
    cv_trace_result tr;
    ck_assert_int_eq(cv_trace_hutchinson(&m.op, &to, &r, &tr, &e), -1);
    ck_assert_int_eq(e.status, CV_EINVAL);
    ck_assert_str_eq(e.field, "options.max_probes");
    to.max_probes = 2;
    ck_assert_int_eq(cv_trace_hutchpp(&m.op, &to, &r, &tr, &e), -1);
    ck_assert_str_eq(e.field, "options.max_probes");
    to.max_probes = 10;
    to.distribution = 7;
    ck_assert_int_eq(cv_trace_hutchinson(&m.op, &to, &r, &tr, &e), -1);
    ck_assert_str_eq(e.field, "options.distribution");

    cv_diag_options dopt;
    cv_diag_options_default(&dopt);
    dopt.max_probes = -1;
    cv_diag_result dr;
    ck_assert_int_eq(cv_diag_hutchinson(&m.op, &dopt, &r, &dr, &e), -1);
    ck_assert_str_eq(e.field, "options.max_probes");

    cv_eigen_options eo;
    cv_eigen_options_default(&eo);
    cv_eigen_result er;
    int ks[2] = {0, 11};
    for (int i = 0; i < 2; i++) {
        eo.k = ks[i];
        ck_assert_int_eq(cv_eigen_lanczos(&m.op, &eo, &r, &er, &e), -1);
        ck_assert_int_eq(e.status, CV_EINVAL);
        ck_assert_str_eq(e.field, "options.k");
        ck_assert_int_eq(cv_eigen_power(&m.op, &eo, &r, &er, &e), -1);
        ck_assert_str_eq(e.field, "options.k");
    }
    eo.k = 4;
    eo.max_iter = 3;
    ck_assert_int_eq(cv_eigen_lanczos(&m.op, &eo, &r, &er, &e), -1);
    ck_assert_str_eq(e.field, "options.max_iter");
    eo.max_iter = 0;
    eo.which = 9;
    ck_assert_int_eq(cv_eigen_lanczos(&m.op, &eo, &r, &er, &e), -1);
    ck_assert_str_eq(e.field, "options.which");

    cv_density_options so;
    cv_density_options_default(&so);
    cv_density_result sr;
    so.grid_points = 1;
    ck_assert_int_eq(cv_density_slq(&m.op, &so, &r, &sr, &e), -1);
    ck_assert_str_eq(e.field, "options.grid_points");
    so.grid_points = 10;
    so.lanczos_steps = 0;
    ck_assert_int_eq(cv_density_slq(&m.op, &so, &r, &sr, &e), -1);
    ck_assert_str_eq(e.field, "options.lanczos_steps");
    so.lanczos_steps = 5;
    so.runs = 0;
    ck_assert_int_eq(cv_density_slq(&m.op, &so, &r, &sr, &e), -1);
    ck_assert_str_eq(e.field, "options.runs");
    so.runs = 1;
    so.sigma2 = 0;
    ck_assert_int_eq(cv_density_slq(&m.op, &so, &r, &sr, &e), -1);
    ck_assert_str_eq(e.field, "options.sigma2");

    cv_solve_options vo;
    cv_solve_options_default(&vo);
    cv_solve_result vr;
    double b[10] = {1};
    vo.damping = NAN;
    ck_assert_int_eq(cv_solve(&m.op, b, &vo, &vr, NULL, &e), -1);
    ck_assert_str_eq(e.field, "options.damping");
    vo.damping = 0;
    vo.max_iter = -2;
    ck_assert_int_eq(cv_solve(&m.op, b, &vo, &vr, NULL, &e), -1);
    ck_assert_str_eq(e.field, "options.max_iter");

    ck_assert_int_eq(done_of(&m), 0);
    ck_assert_int_eq(cv_which_from_name("magnitude"), CV_WHICH_MAGNITUDE);
    ck_assert_int_eq(cv_which_from_name("top"), -1);
    ck_assert_int_eq(cv_probe_dist_from_name("gaussian"), CV_PROBE_GAUSSIAN);
    ck_assert_int_eq(cv_solve_method_from_name("minres"), CV_SOLVE_MINRES);
    dmat_free(&m);
}
END_TEST

static int never_apply(void *ctx, int k, const double *X, double *Y, cv_err *e)
{
    return cv_err_set(e, CV_EINTERNAL, "applied", "", "apply must not be reached");
}

START_TEST(huge_dimension_is_out_of_memory)
{
    cv_linop op = {.n = 2147483647, .apply = never_apply};
    cv_rng r;
    cv_rng_seed(&r, 1);
    cv_err e;
    cv_trace_options to;
    cv_trace_options_default(&to);
    to.max_probes = 2000000000; /* Hutch++ sketch: n x 6.7e8 doubles */
    cv_trace_result tr;
    ck_assert_int_eq(cv_trace_hutchpp(&op, &to, &r, &tr, &e), -1);
    ck_assert_int_eq(e.status, CV_ENOMEM);
    cv_eigen_options eo;
    cv_eigen_options_default(&eo);
    eo.k = 100000;
    cv_eigen_result er;
    ck_assert_int_eq(cv_eigen_lanczos(&op, &eo, &r, &er, &e), -1);
    ck_assert_int_eq(e.status, CV_ENOMEM);
    ck_assert_ptr_null(er.eigenvalues);
}
END_TEST

START_TEST(same_seed_same_numbers)
{
    dmat m;
    dmat_random(&m, 50, 2);
    cv_eigen_options o;
    cv_eigen_options_default(&o);
    o.k = 2;
    cv_eigen_result a, b;
    cv_rng r;
    cv_err e;
    cv_rng_seed(&r, 42);
    ck_assert_int_eq(cv_eigen_lanczos(&m.op, &o, &r, &a, &e), 0);
    cv_rng_seed(&r, 42);
    ck_assert_int_eq(cv_eigen_lanczos(&m.op, &o, &r, &b, &e), 0);
    ck_assert_mem_eq(a.eigenvalues, b.eigenvalues, 2 * sizeof(double));
    ck_assert_int_eq(a.iterations, b.iterations);
    cv_eigen_result_free(&a);
    cv_eigen_result_free(&b);
    dmat_free(&m);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("estimators");
    TCase *t = tcase_create("core");
    tcase_set_timeout(t, 60);
    tcase_add_test(t, rademacher_signs_are_the_draws_bits);
    tcase_add_test(t, trace_rademacher_diagonal_exact);
    tcase_add_test(t, trace_random_within_3_stderr);
    tcase_add_test(t, trace_block_size_does_not_change_result);
    tcase_add_test(t, trace_tol_stops_early);
    tcase_add_test(t, hutchpp_beats_hutchinson);
    tcase_add_test(t, hutchpp_full_sketch_is_exact);
    tcase_add_test(t, hutchpp_default_options_spend_budget);
    tcase_add_test(t, diag_exact_equals_diagonal);
    tcase_add_test(t, diag_hutchinson);
    tcase_add_test(t, xtrace_unbiased_covers_and_beats_hutchinson);
    tcase_add_test(t, xtrace_xdiag_exact_below_rank);
    tcase_add_test(t, xdiag_unbiased_and_beats_hutchinson);
    tcase_add_test(t, xtrace_bad_budget);
    tcase_add_test(t, xnystrace_psd);
    tcase_add_test(t, frobenius_hutchinson);
    tcase_add_test(t, lanczos_vs_dsyev);
    tcase_add_test(t, block_lanczos_vs_dsyev);
    tcase_add_test(t, lanczos_repeated_and_rank_deficient);
    tcase_add_test(t, lanczos_repeated_top_in_random_spectrum);
    tcase_add_test(t, lanczos_k_equals_n);
    tcase_add_test(t, lanczos_tridiagonal_relation);
    tcase_add_test(t, lanczos_large_n_float_shadow);
    tcase_add_test(t, lanczos_partial_reorth_semi_orthogonal);
    tcase_add_test(t, power_vs_dsyev);
    tcase_add_test(t, slq_moments_and_normalization);
    tcase_add_test(t, slq_exact_for_small_matrix);
    tcase_add_test(t, cg_vs_dposv);
    tcase_add_test(t, cg_refuses_indefinite);
    tcase_add_test(t, minres_indefinite_vs_dgesv);
    tcase_add_test(t, lsmr_vs_lapack);
    tcase_add_test(t, neumann_series);
    tcase_add_test(t, solve_many_lockstep_cg);
    tcase_add_test(t, solve_many_block_cg);
    tcase_add_test(t, newton_step_and_prediction);
    tcase_add_test(t, cancellation);
    tcase_add_test(t, progress_counts_match_matvecs);
    tcase_add_test(t, progress_plans_and_partials);
    tcase_add_test(t, bad_options);
    tcase_add_test(t, huge_dimension_is_out_of_memory);
    tcase_add_test(t, same_seed_same_numbers);
    suite_add_tcase(s, t);
    return s;
}

int main(void) { return tu_main(suite); }
