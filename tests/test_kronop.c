/* test_kronop.c - Kronecker-factored blocks on given factors (engine/kronop.h)
 * against the dense dim x dim matrix P (B (x) A) P^T built here entry by
 * entry (the permutation P written out independently of the engine), and
 * LAPACK on it. */
#include "testutil.h"

#include <float.h>
#include <lapacke.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "engine/estimators.h"
#include "engine/kronop.h"
#include "engine/rng.h"

/* ------------------------------------------------------------------ helpers */

typedef enum { B_SPD, B_SINGULAR, B_INDEFINITE, B_ZERO } b_kind;

typedef struct {
    int in, out, bias, da, db, n;
    double *A, *B;  /* owned by kb */
    double *M;      /* dense n x n, column-major */
    cv_kron_block kb;
} kcase;

/* theta index of W~[o, j] (j = in: the bias): the conventions, written out */
static int theta_index(const kcase *c, int o, int j)
{
    return j < c->in ? o * c->in + j : c->out * c->in + o;
}

/* Random symmetric n x n with the given spectrum (NULL: SPD from a Gaussian Gram). */
static double *rand_sym(int n, const double *spec, uint64_t seed)
{
    cv_rng r;
    cv_rng_seed(&r, seed);
    double *a = calloc((size_t)n * n, sizeof(double));
    double *g = malloc(sizeof(double) * n * n), *tau = malloc(sizeof(double) * n);
    cv_rng_gaussian(&r, g, (size_t)n * n);
    if (!spec) {
        for (int i = 0; i < n; i++)
            for (int j = 0; j < n; j++) {
                double s = 0;
                for (int l = 0; l < n; l++)
                    s += g[i + l * n] * g[j + l * n];
                a[i + j * n] = s / n + (i == j ? 0.1 : 0);
            }
    } else {
        ck_assert_int_eq(LAPACKE_dgeqrf(LAPACK_COL_MAJOR, n, n, g, n, tau), 0);
        ck_assert_int_eq(LAPACKE_dorgqr(LAPACK_COL_MAJOR, n, n, n, g, n, tau), 0);
        for (int i = 0; i < n; i++)
            for (int j = 0; j < n; j++) {
                double s = 0;
                for (int l = 0; l < n; l++)
                    s += g[i + l * n] * spec[l] * g[j + l * n];
                a[i + j * n] = s;
            }
        for (int i = 0; i < n; i++)
            for (int j = 0; j < i; j++)
                a[i + j * n] = a[j + i * n];
    }
    free(g);
    free(tau);
    return a;
}

static void kcase_make(kcase *c, int in, int out, int bias, b_kind bk, uint64_t seed)
{
    memset(c, 0, sizeof *c);
    c->in = in;
    c->out = out;
    c->bias = bias;
    c->da = in + bias;
    c->db = out;
    c->n = c->da * c->db;
    c->A = rand_sym(c->da, NULL, seed);
    double spec[16] = {0};
    ck_assert_int_le(out, 16);
    for (int i = 0; i < out; i++)
        spec[i] = 0.5 + i;
    if (bk == B_SINGULAR)
        spec[0] = 0;
    if (bk == B_INDEFINITE)
        spec[0] = -2.5;
    if (bk == B_ZERO)
        for (int i = 0; i < out; i++)
            spec[i] = 0;
    c->B = rand_sym(out, bk == B_SPD ? NULL : spec, seed + 1);
    c->M = calloc((size_t)c->n * c->n, sizeof(double));
    for (int o = 0; o < out; o++)
        for (int j = 0; j < c->da; j++)
            for (int o2 = 0; o2 < out; o2++)
                for (int j2 = 0; j2 < c->da; j2++)
                    c->M[theta_index(c, o, j) + (size_t)theta_index(c, o2, j2) * c->n] =
                        c->B[o + o2 * out] * c->A[j + j2 * c->da];
    cv_err e;
    ck_assert_msg(cv_kron_block_init(&c->kb, in, out, bias, c->A, c->B, 1, &e) == 0, "%s",
                  e.message);
    ck_assert_uint_eq(c->kb.dim, (size_t)c->n);
}

static void kcase_free(kcase *c)
{
    cv_kron_block_free(&c->kb);
    free(c->M);
}

/* Y = S X for a dense n x n S (column-major), k columns. */
static void dense_mul(const double *S, int n, int k, const double *X, double *Y)
{
    for (int c = 0; c < k; c++)
        for (int i = 0; i < n; i++) {
            double s = 0;
            for (int l = 0; l < n; l++)
                s += S[i + (size_t)l * n] * X[l + (size_t)c * n];
            Y[i + (size_t)c * n] = s;
        }
}

static double *randv(size_t n, uint64_t seed)
{
    cv_rng r;
    cv_rng_seed(&r, seed);
    double *v = malloc(sizeof(double) * n);
    cv_rng_gaussian(&r, v, n);
    return v;
}

/* X = (S + lambda I)^-1 B by dgesv on a copy. */
static void dense_solve(const double *S, int n, double lambda, int k, const double *B, double *X)
{
    double *a = malloc(sizeof(double) * n * n);
    lapack_int *piv = malloc(sizeof(lapack_int) * n);
    memcpy(a, S, sizeof(double) * n * n);
    for (int i = 0; i < n; i++)
        a[i + i * n] += lambda;
    memcpy(X, B, sizeof(double) * n * k);
    ck_assert_int_eq(LAPACKE_dgesv(LAPACK_COL_MAJOR, n, k, a, n, piv, X, n), 0);
    free(a);
    free(piv);
}

/* Eigen-decomposition of a dense symmetric S: w ascending, V (may be NULL). */
static void dense_eigh(const double *S, int n, double *w, double *V)
{
    double *a = malloc(sizeof(double) * n * n);
    memcpy(a, S, sizeof(double) * n * n);
    ck_assert_int_eq(LAPACKE_dsyev(LAPACK_COL_MAJOR, V ? 'V' : 'N', 'U', n, a, n, w), 0);
    if (V)
        memcpy(V, a, sizeof(double) * n * n);
    free(a);
}

static double max_abs(const double *a, size_t n)
{
    double m = 0;
    for (size_t i = 0; i < n; i++)
        m = fmax(m, fabs(a[i]));
    return m;
}

/* The dense eigenvalues ordered as `which` asks (ties of the dense values
 * are not an issue: compared by value). */
static int cmp_key_which;
static int cmp_which(const void *pa, const void *pb)
{
    double a = *(const double *)pa, b = *(const double *)pb;
    double ka = cmp_key_which == CV_WHICH_LARGEST    ? a
                : cmp_key_which == CV_WHICH_SMALLEST ? -a
                                                     : fabs(a);
    double kb = cmp_key_which == CV_WHICH_LARGEST    ? b
                : cmp_key_which == CV_WHICH_SMALLEST ? -b
                                                     : fabs(b);
    return ka > kb ? -1 : ka < kb;
}

static void order_which(double *w, int n, cv_which which)
{
    cmp_key_which = which;
    qsort(w, n, sizeof(double), cmp_which);
}

/* Values equal as `which` orders them: compare keys (magnitude: |v|) and,
 * as a set, the values themselves. */
static void check_topk(const double *got, const double *dense_sorted, int k, cv_which which,
                       double tol, const char *tag)
{
    for (int t = 0; t < k; t++) {
        double kg = which == CV_WHICH_MAGNITUDE ? fabs(got[t]) : got[t];
        double kd = which == CV_WHICH_MAGNITUDE ? fabs(dense_sorted[t]) : dense_sorted[t];
        ck_assert_msg(fabs(kg - kd) <= tol, "%s which %d: #%d %.15g vs dense %.15g", tag, which,
                      t, got[t], dense_sorted[t]);
    }
}

/* --------------------------------------------------------------- the cases */

static const struct {
    int in, out, bias;
    b_kind bk;
} CASES[] = {
    {3, 3, 1, B_SPD},        /* dim_a 4 (3 + 1), dim_b 3 */
    {4, 3, 0, B_SPD},        /* no bias: P = I */
    {3, 3, 1, B_SINGULAR},   /* PSD singular B */
    {2, 4, 1, B_INDEFINITE}, /* a negative eigenvalue of B: the heap's other direction */
    {5, 2, 1, B_SPD},
};
#define NCASES ((int)(sizeof CASES / sizeof CASES[0]))

static void make_case(kcase *c, int i)
{
    kcase_make(c, CASES[i].in, CASES[i].out, CASES[i].bias, CASES[i].bk, 100 + 7 * i);
}

START_TEST(mapping_round_trip_and_layout)
{
    kcase c;
    make_case(&c, 0);
    int n = c.n, k = 2;
    double *t = randv((size_t)n * k, 1), *m = malloc(sizeof(double) * n * k),
           *t2 = malloc(sizeof(double) * n * k);
    cv_kron_theta_to_mat(&c.kb, k, t, m);
    for (int v = 0; v < k; v++)
        for (int o = 0; o < c.out; o++)
            for (int j = 0; j < c.da; j++)
                ck_assert_double_eq(m[v * n + o * c.da + j], t[v * n + theta_index(&c, o, j)]);
    cv_kron_mat_to_theta(&c.kb, k, m, t2);
    ck_assert_mem_eq(t, t2, sizeof(double) * n * k);
    free(t);
    free(m);
    free(t2);
    kcase_free(&c);
}
END_TEST

START_TEST(matvec_vs_dense)
{
    for (int ci = 0; ci < NCASES; ci++) {
        kcase c;
        make_case(&c, ci);
        int n = c.n, k = 3;
        double *x = randv((size_t)n * k, 2), *y = malloc(sizeof(double) * n * k),
               *want = malloc(sizeof(double) * n * k);
        cv_err e;
        for (int pass = 0; pass < 2; pass++) {
            double shift = pass ? 0.3 : 0;
            ck_assert_int_eq(cv_kron_block_apply(&c.kb, NULL, shift, k, x, y, &e), 0);
            dense_mul(c.M, n, k, x, want);
            for (int r = 0; r < n * k; r++)
                want[r] += shift * x[r];
            ck_assert_msg(tu_relerr(y, want, (size_t)n * k, 1e-12) < 1e-13,
                          "case %d shift %g: %g", ci, shift,
                          tu_relerr(y, want, (size_t)n * k, 1e-12));
        }
        free(x);
        free(y);
        free(want);
        kcase_free(&c);
    }
}
END_TEST

START_TEST(damped_inverse_vs_solve)
{
    for (int ci = 0; ci < NCASES; ci++) {
        kcase c;
        make_case(&c, ci);
        int n = c.n, k = 2;
        double lambda = CASES[ci].bk == B_INDEFINITE ? 10.0 : 0.05;
        double *x = randv((size_t)n * k, 3), *y = malloc(sizeof(double) * n * k),
               *want = malloc(sizeof(double) * n * k);
        cv_err e;
        ck_assert_msg(cv_kron_block_inverse(&c.kb, NULL, lambda, k, x, y, &e) == 0, "%s",
                      e.message);
        dense_solve(c.M, n, lambda, k, x, want);
        ck_assert_msg(tu_relerr(y, want, (size_t)n * k, 1e-12) < 1e-10, "case %d: %g", ci,
                      tu_relerr(y, want, (size_t)n * k, 1e-12));
        if (CASES[ci].bk == B_SINGULAR) { /* lambda 0 on a singular M: refused */
            ck_assert_int_eq(cv_kron_block_inverse(&c.kb, NULL, 0, k, x, y, &e), -1);
            ck_assert_str_eq(e.code, "not_positive_definite");
        }
        if (CASES[ci].bk == B_INDEFINITE) {
            ck_assert_int_eq(cv_kron_block_inverse(&c.kb, NULL, 0.05, k, x, y, &e), -1);
            ck_assert_str_eq(e.code, "not_positive_definite");
        }
        free(x);
        free(y);
        free(want);
        kcase_free(&c);
    }
}
END_TEST

/* y^T M y for k vectors by the forward product (M: KFAC, or EKFAC with s). */
static void quad_ref(cv_kron_block *kb, const double *s, int k, const double *y, double *q)
{
    double *t = malloc(sizeof(double) * kb->dim * k);
    cv_err e;
    ck_assert_int_eq(cv_kron_block_apply(kb, s, 0, k, y, t, &e), 0);
    for (int c = 0; c < k; c++)
        q[c] = tu_dot(y + (size_t)c * kb->dim, t + (size_t)c * kb->dim, kb->dim);
    free(t);
}

/* The inverses' quad outputs (y^T M y from the eigen coordinates, the Newton
 * step's curvature term) against the forward product: exact damping (KFAC
 * and EKFAC) and factored damping, including the zero-factor limit. */
START_TEST(inverse_quad_vs_product)
{
    for (int ci = 0; ci < NCASES; ci++) {
        kcase c;
        make_case(&c, ci);
        int n = c.n, k = 2, indef = CASES[ci].bk == B_INDEFINITE;
        double lambda = indef ? 10.0 : 0.05, q[2], want[2];
        double *x = randv((size_t)n * k, 8), *y = malloc(sizeof(double) * n * k);
        double *s = randv((size_t)n, 9);
        for (int r = 0; r < n; r++)
            s[r] = fabs(s[r]) + 0.1;
        cv_err e;
        ck_assert_int_eq(cv_kron_block_inverse_quad(&c.kb, NULL, lambda, k, x, y, q, &e), 0);
        quad_ref(&c.kb, NULL, k, y, want);
        for (int j = 0; j < k; j++)
            ck_assert_msg(fabs(q[j] - want[j]) < 1e-11 * (1 + fabs(want[j])), "case %d: %g vs %g",
                          ci, q[j], want[j]);
        ck_assert_int_eq(cv_kron_block_inverse_quad(&c.kb, s, lambda, k, x, y, q, &e), 0);
        quad_ref(&c.kb, s, k, y, want);
        for (int j = 0; j < k; j++)
            ck_assert_msg(fabs(q[j] - want[j]) < 1e-11 * (1 + fabs(want[j])), "ekfac case %d",
                          ci);
        if (!indef) {
            ck_assert_int_eq(
                cv_kron_block_factored_inverse_quad(&c.kb, 0.2, k, x, y, NULL, q, &e), 0);
            quad_ref(&c.kb, NULL, k, y, want);
            for (int j = 0; j < k; j++)
                ck_assert_msg(fabs(q[j] - want[j]) < 1e-11 * (1 + fabs(want[j])),
                              "factored case %d", ci);
        }
        free(x);
        free(y);
        free(s);
        kcase_free(&c);
    }
    kcase c; /* B = 0: the factored limit X / lambda, M = 0 */
    kcase_make(&c, 3, 3, 1, B_ZERO, 77);
    double *x = randv(c.n, 5), *y = malloc(sizeof(double) * c.n), q = 1;
    cv_err e;
    ck_assert_int_eq(cv_kron_block_factored_inverse_quad(&c.kb, 0.5, 1, x, y, NULL, &q, &e), 0);
    ck_assert_double_eq_tol(q, 0, 1e-15);
    free(x);
    free(y);
    kcase_free(&c);
}
END_TEST

/* Dense inverse of a small SPD matrix plus d I. */
static double *dense_inv_shift(const double *S, int n, double d)
{
    double *Id = calloc((size_t)n * n, sizeof(double)), *X = malloc(sizeof(double) * n * n);
    for (int i = 0; i < n; i++)
        Id[i + i * n] = 1;
    dense_solve(S, n, d, n, Id, X);
    free(Id);
    return X;
}

START_TEST(factored_damping_vs_dense_kron)
{
    for (int ci = 0; ci < NCASES; ci++) {
        if (CASES[ci].bk == B_INDEFINITE)
            continue;
        kcase c;
        make_case(&c, ci);
        int n = c.n, k = 2;
        double lambda = 0.2, tra = 0, trb = 0;
        for (int j = 0; j < c.da; j++)
            tra += c.A[j + j * c.da];
        for (int i = 0; i < c.db; i++)
            trb += c.B[i + i * c.db];
        double w = sqrt((tra / c.da) / (trb / c.db));
        double *Ai = dense_inv_shift(c.A, c.da, w * sqrt(lambda));
        double *Bi = dense_inv_shift(c.B, c.db, sqrt(lambda) / w);
        double *F = calloc((size_t)n * n, sizeof(double));
        for (int o = 0; o < c.out; o++)
            for (int j = 0; j < c.da; j++)
                for (int o2 = 0; o2 < c.out; o2++)
                    for (int j2 = 0; j2 < c.da; j2++)
                        F[theta_index(&c, o, j) + (size_t)theta_index(&c, o2, j2) * n] =
                            Bi[o + o2 * c.db] * Ai[j + j2 * c.da];
        double *x = randv((size_t)n * k, 4), *y = malloc(sizeof(double) * n * k),
               *want = malloc(sizeof(double) * n * k), wgot;
        cv_err e;
        ck_assert_int_eq(cv_kron_block_factored_inverse(&c.kb, lambda, k, x, y, &wgot, &e), 0);
        ck_assert_double_eq_tol(wgot, w, 1e-14 * w);
        dense_mul(F, n, k, x, want);
        ck_assert_msg(tu_relerr(y, want, (size_t)n * k, 1e-12) < 1e-10, "case %d: %g", ci,
                      tu_relerr(y, want, (size_t)n * k, 1e-12));
        free(Ai);
        free(Bi);
        free(F);
        free(x);
        free(y);
        free(want);
        kcase_free(&c);
    }
    /* B = 0 (tr(B) = 0): w -> inf, the limit X / lambda */
    kcase c;
    kcase_make(&c, 3, 3, 1, B_ZERO, 77);
    double *x = randv(c.n, 5), *y = malloc(sizeof(double) * c.n), w;
    cv_err e;
    ck_assert_int_eq(cv_kron_block_factored_inverse(&c.kb, 0.5, 1, x, y, &w, &e), 0);
    ck_assert_double_eq(w, 0);
    for (int r = 0; r < c.n; r++)
        ck_assert_double_eq_tol(y[r], x[r] / 0.5, 1e-15);
    ck_assert_int_eq(cv_kron_block_factored_inverse(&c.kb, 0, 1, x, y, &w, &e), -1);
    free(x);
    free(y);
    kcase_free(&c);
}
END_TEST

START_TEST(trace_diag_logdet_vs_dense)
{
    for (int ci = 0; ci < NCASES; ci++) {
        kcase c;
        make_case(&c, ci);
        int n = c.n;
        cv_err e;
        double tr, want = 0, *d = malloc(sizeof(double) * n), *wd = malloc(sizeof(double) * n);
        for (int i = 0; i < n; i++)
            want += c.M[i + i * n], wd[i] = c.M[i + i * n];
        ck_assert_int_eq(cv_kron_block_trace(&c.kb, NULL, &tr, &e), 0);
        ck_assert_double_eq_tol(tr, want, 1e-12 * fabs(want));
        ck_assert_int_eq(cv_kron_block_diag(&c.kb, NULL, d, &e), 0);
        ck_assert(tu_relerr(d, wd, n, 1e-12) < 1e-14);
        /* logdet(M + lambda I) vs dpotrf */
        double lambda = CASES[ci].bk == B_INDEFINITE ? 10.0 : 0.01, ld;
        double *L = malloc(sizeof(double) * n * n);
        memcpy(L, c.M, sizeof(double) * n * n);
        for (int i = 0; i < n; i++)
            L[i + i * n] += lambda;
        ck_assert_int_eq(LAPACKE_dpotrf(LAPACK_COL_MAJOR, 'L', n, L, n), 0);
        double wl = 0;
        for (int i = 0; i < n; i++)
            wl += 2 * log(L[i + i * n]);
        ck_assert_int_eq(cv_kron_block_logdet(&c.kb, NULL, lambda, &ld, &e), 0);
        ck_assert_msg(fabs(ld - wl) < 1e-10 * (1 + fabs(wl)), "case %d: %.15g vs %.15g", ci, ld,
                      wl);
        if (CASES[ci].bk == B_SPD) { /* lambda 0: da logdet B + db logdet A */
            ck_assert_int_eq(cv_kron_block_logdet(&c.kb, NULL, 0, &ld, &e), 0);
            memcpy(L, c.M, sizeof(double) * n * n);
            ck_assert_int_eq(LAPACKE_dpotrf(LAPACK_COL_MAJOR, 'L', n, L, n), 0);
            wl = 0;
            for (int i = 0; i < n; i++)
                wl += 2 * log(L[i + i * n]);
            ck_assert_double_eq_tol(ld, wl, 1e-10 * (1 + fabs(wl)));
        } else { /* singular / indefinite with lambda 0: refused, never -inf */
            ck_assert_int_eq(cv_kron_block_logdet(&c.kb, NULL, 0, &ld, &e), -1);
            ck_assert_str_eq(e.code, "not_positive_definite");
        }
        free(L);
        free(d);
        free(wd);
        kcase_free(&c);
    }
}
END_TEST

START_TEST(eigen_vs_dsyev)
{
    const cv_which whs[] = {CV_WHICH_LARGEST, CV_WHICH_SMALLEST, CV_WHICH_MAGNITUDE};
    for (int ci = 0; ci < NCASES; ci++) {
        kcase c;
        make_case(&c, ci);
        int n = c.n;
        cv_err e;
        double *w = malloc(sizeof(double) * n), *V = malloc(sizeof(double) * n * n);
        double *all = malloc(sizeof(double) * n);
        dense_eigh(c.M, n, w, V);
        double scale = max_abs(w, n);
        ck_assert_int_eq(cv_kron_block_eigenvalues(&c.kb, NULL, all, &e), 0);
        for (int i = 0; i < n; i++)
            ck_assert_msg(fabs(all[i] - w[i]) < 1e-12 * scale, "case %d: %d %g vs %g", ci, i,
                          all[i], w[i]);
        for (int wi = 0; wi < 3; wi++) {
            for (int k = 1; k <= n; k += (k < 5 ? 1 : n - 5 > 0 ? n - 5 : 1)) {
                double *vals = malloc(sizeof(double) * k), *vecs = malloc(sizeof(double) * n * k);
                int *co = malloc(sizeof(int) * k);
                ck_assert_int_eq(
                    cv_kron_block_eigen(&c.kb, NULL, whs[wi], k, vals, co, vecs, &e), 0);
                double *ws = malloc(sizeof(double) * n);
                memcpy(ws, w, sizeof(double) * n);
                order_which(ws, n, whs[wi]);
                check_topk(vals, ws, k, whs[wi], 1e-12 * scale, "eigen");
                /* unit vectors, residuals, orthogonality */
                double *Mv = malloc(sizeof(double) * n * k);
                dense_mul(c.M, n, k, vecs, Mv);
                for (int t = 0; t < k; t++) {
                    double *v = vecs + (size_t)t * n, res = 0;
                    ck_assert_double_eq_tol(tu_norm(v, n), 1, 1e-13);
                    for (int r = 0; r < n; r++)
                        res += pow(Mv[t * n + r] - vals[t] * v[r], 2);
                    ck_assert_msg(sqrt(res) < 1e-12 * scale, "case %d which %d #%d res %g", ci,
                                  wi, t, sqrt(res));
                    for (int u = 0; u < t; u++)
                        ck_assert(fabs(tu_dot(v, vecs + (size_t)u * n, n)) < 1e-13);
                    /* a simple dense eigenvalue: the same vector up to sign */
                    int near = -1, mult = 0;
                    for (int i = 0; i < n; i++)
                        if (fabs(w[i] - vals[t]) < 1e-9 * scale)
                            near = i, mult++;
                    if (mult == 1)
                        ck_assert_msg(fabs(fabs(tu_dot(v, V + (size_t)near * n, n)) - 1) < 1e-9,
                                      "case %d: vector #%d", ci, t);
                }
                free(Mv);
                free(ws);
                free(vals);
                free(vecs);
                free(co);
            }
        }
        ck_assert_int_eq(cv_kron_block_eigen(&c.kb, NULL, CV_WHICH_LARGEST, 0, all, NULL, NULL,
                                             &e), -1);
        ck_assert_int_eq(cv_kron_block_eigen(&c.kb, NULL, CV_WHICH_LARGEST, n + 1, all, NULL,
                                             NULL, &e), -1);
        free(w);
        free(V);
        free(all);
        kcase_free(&c);
    }
}
END_TEST

/* The dense Q: columns Q e_c by unrotating identity columns. */
static double *dense_Q(kcase *c)
{
    int n = c->n;
    double *Id = calloc((size_t)n * n, sizeof(double)), *Q = malloc(sizeof(double) * n * n);
    for (int i = 0; i < n; i++)
        Id[i + i * n] = 1;
    cv_err e;
    ck_assert_int_eq(cv_kron_block_unrotate(&c->kb, n, Id, Q, &e), 0);
    free(Id);
    return Q;
}

START_TEST(ekfac_rotation_and_operator)
{
    for (int ci = 0; ci < NCASES; ci++) {
        kcase c;
        make_case(&c, ci);
        int n = c.n, k = 3;
        cv_err e;
        double *x = randv((size_t)n * k, 6), *z = malloc(sizeof(double) * n * k),
               *x2 = malloc(sizeof(double) * n * k);
        ck_assert_int_eq(cv_kron_block_rotate(&c.kb, k, x, z, &e), 0);
        ck_assert_int_eq(cv_kron_block_unrotate(&c.kb, k, z, x2, &e), 0);
        ck_assert(tu_relerr(x2, x, (size_t)n * k, 1e-12) < 1e-14);
        /* Q orthogonal, Q^T M Q = diag(products) */
        double *Q = dense_Q(&c), *MQ = malloc(sizeof(double) * n * n);
        double *s = malloc(sizeof(double) * n);
        ck_assert_int_eq(cv_kron_block_products(&c.kb, s, &e), 0);
        dense_mul(c.M, n, n, Q, MQ);
        double scale = max_abs(s, n);
        for (int a = 0; a < n; a++)
            for (int b = 0; b < n; b++) {
                double qq = tu_dot(Q + (size_t)a * n, Q + (size_t)b * n, n);
                double qmq = tu_dot(Q + (size_t)a * n, MQ + (size_t)b * n, n);
                ck_assert(fabs(qq - (a == b)) < 1e-13);
                ck_assert_msg(fabs(qmq - (a == b ? s[a] : 0)) < 1e-12 * scale,
                              "case %d: (Q^T M Q)[%d,%d] %g, s %g", ci, a, b, qmq, s[a]);
            }
        /* rotate == Q^T x */
        double *qt = malloc(sizeof(double) * n);
        for (int a = 0; a < n; a++)
            qt[a] = tu_dot(Q + (size_t)a * n, x, n);
        ck_assert(tu_relerr(z, qt, n, 1e-12) < 1e-13);
        /* EKFAC with arbitrary positive s: Q diag(s) Q^T, its inverse, spectra */
        cv_rng r;
        cv_rng_seed(&r, 8 + ci);
        for (int i = 0; i < n; i++)
            s[i] = 0.1 + cv_rng_uniform(&r);
        double *S = calloc((size_t)n * n, sizeof(double));
        for (int i = 0; i < n; i++)
            for (int j = 0; j < n; j++)
                for (int l = 0; l < n; l++)
                    S[i + (size_t)j * n] += Q[i + (size_t)l * n] * s[l] * Q[j + (size_t)l * n];
        double *y = malloc(sizeof(double) * n * k), *want = malloc(sizeof(double) * n * k);
        ck_assert_int_eq(cv_kron_block_apply(&c.kb, s, 0.2, k, x, y, &e), 0);
        dense_mul(S, n, k, x, want);
        for (int i = 0; i < n * k; i++)
            want[i] += 0.2 * x[i];
        ck_assert(tu_relerr(y, want, (size_t)n * k, 1e-12) < 1e-12);
        ck_assert_int_eq(cv_kron_block_inverse(&c.kb, s, 0.2, k, x, y, &e), 0);
        dense_solve(S, n, 0.2, k, x, want);
        ck_assert(tu_relerr(y, want, (size_t)n * k, 1e-12) < 1e-11);
        double tr, wt = 0, ld, *d = malloc(sizeof(double) * n), *wd = malloc(sizeof(double) * n);
        for (int i = 0; i < n; i++)
            wt += S[i + i * n], wd[i] = S[i + i * n];
        ck_assert_int_eq(cv_kron_block_trace(&c.kb, s, &tr, &e), 0);
        ck_assert_double_eq_tol(tr, wt, 1e-12 * wt);
        ck_assert_int_eq(cv_kron_block_diag(&c.kb, s, d, &e), 0);
        ck_assert(tu_relerr(d, wd, n, 1e-12) < 1e-13);
        ck_assert_int_eq(cv_kron_block_logdet(&c.kb, s, 0, &ld, &e), 0);
        double wl = 0;
        for (int i = 0; i < n; i++)
            wl += log(s[i]);
        ck_assert_double_eq_tol(ld, wl, 1e-12 * (1 + fabs(wl)));
        double *w = malloc(sizeof(double) * n), vals[3];
        dense_eigh(S, n, w, NULL);
        double *vecs = malloc(sizeof(double) * n * 3), *Sv = malloc(sizeof(double) * n * 3);
        ck_assert_int_eq(cv_kron_block_eigen(&c.kb, s, CV_WHICH_LARGEST, 3, vals, NULL, vecs, &e),
                         0);
        dense_mul(S, n, 3, vecs, Sv);
        for (int t = 0; t < 3; t++) {
            ck_assert_double_eq_tol(vals[t], w[n - 1 - t], 1e-12);
            for (int i = 0; i < n; i++)
                ck_assert(fabs(Sv[t * n + i] - vals[t] * vecs[t * n + i]) < 1e-12);
        }
        free(w);
        free(vecs);
        free(Sv);
        free(d);
        free(wd);
        free(S);
        free(y);
        free(want);
        free(qt);
        free(Q);
        free(MQ);
        free(s);
        free(x);
        free(z);
        free(x2);
        kcase_free(&c);
    }
}
END_TEST

/* ------------------------------------------------------- block-diagonal */

START_TEST(block_diagonal_linop)
{
    /* three layers (bias, no bias, singular B) plus an EKFAC copy of the first */
    kcase c[3];
    make_case(&c[0], 0);
    make_case(&c[1], 1);
    make_case(&c[2], 2);
    cv_err e;
    double *s = malloc(sizeof(double) * c[0].n);
    ck_assert_int_eq(cv_kron_block_products(&c[0].kb, s, &e), 0);
    for (int i = 0; i < c[0].n; i++)
        s[i] = 1.5 * s[i] + 0.05; /* EKFAC values: same basis, other spectrum */
    cv_kron_diag d;
    cv_kron_diag_init(&d);
    for (int i = 0; i < 3; i++)
        ck_assert_int_eq(cv_kron_diag_add(&d, &c[i].kb, NULL, &e), 0);
    ck_assert_int_eq(cv_kron_diag_add(&d, &c[0].kb, s, &e), 0);
    int n = (int)d.n, offs[5] = {0};
    ck_assert_int_eq(n, c[0].n * 2 + c[1].n + c[2].n);
    /* the dense block-diagonal matrix */
    double *D = calloc((size_t)n * n, sizeof(double));
    for (int b = 0; b < 4; b++) {
        kcase *cb = &c[b < 3 ? b : 0];
        int m = cb->n;
        offs[b + 1] = offs[b] + m;
        double *blk = cb->M, *Sd = NULL;
        if (b == 3) { /* Q diag(s) Q^T */
            double *Q = dense_Q(cb);
            Sd = calloc((size_t)m * m, sizeof(double));
            for (int i = 0; i < m; i++)
                for (int j = 0; j < m; j++)
                    for (int l = 0; l < m; l++)
                        Sd[i + (size_t)j * m] += Q[i + (size_t)l * m] * s[l] * Q[j + (size_t)l * m];
            free(Q);
            blk = Sd;
        }
        for (int i = 0; i < m; i++)
            for (int j = 0; j < m; j++)
                D[offs[b] + i + (size_t)(offs[b] + j) * n] = blk[i + (size_t)j * m];
        free(Sd);
    }
    cv_block cb = {.dim = (size_t)n};
    ck_assert_int_eq(cv_kron_diag_check(&d, &cb, &e), 0);
    cb.dim++;
    ck_assert_int_eq(cv_kron_diag_check(&d, &cb, &e), -1);

    /* forward and inverse linops vs dense */
    int k = 2;
    double *x = randv((size_t)n * k, 9), *y = malloc(sizeof(double) * n * k),
           *want = malloc(sizeof(double) * n * k);
    cv_linop op;
    ck_assert_int_eq(cv_kron_diag_linop(&d, CV_KRON_FORWARD, 0.1, &op, &e), 0);
    ck_assert_int_eq(cv_linop_apply(&op, k, x, y, &e), 0);
    dense_mul(D, n, k, x, want);
    for (int i = 0; i < n * k; i++)
        want[i] += 0.1 * x[i];
    ck_assert(tu_relerr(y, want, (size_t)n * k, 1e-12) < 1e-13);
    ck_assert_int_eq(cv_kron_diag_linop(&d, CV_KRON_INVERSE, 0.1, &op, &e), 0);
    ck_assert_int_eq(cv_linop_apply(&op, k, x, y, &e), 0);
    dense_solve(D, n, 0.1, k, x, want);
    ck_assert(tu_relerr(y, want, (size_t)n * k, 1e-12) < 1e-10);
    ck_assert_int_eq(cv_kron_diag_linop(&d, CV_KRON_INVERSE, 0, &op, &e), -1); /* singular */
    ck_assert_int_eq(cv_kron_diag_linop(&d, CV_KRON_FACTORED, 0.1, &op, &e), -1); /* EKFAC */

    /* exact quantities */
    double tr, wt = 0, ld, *dg = malloc(sizeof(double) * n), *wd = malloc(sizeof(double) * n);
    for (int i = 0; i < n; i++)
        wt += D[i + (size_t)i * n], wd[i] = D[i + (size_t)i * n];
    ck_assert_int_eq(cv_kron_diag_trace(&d, &tr, &e), 0);
    ck_assert_double_eq_tol(tr, wt, 1e-12 * wt);
    ck_assert_int_eq(cv_kron_diag_diagonal(&d, dg, &e), 0);
    ck_assert(tu_relerr(dg, wd, n, 1e-12) < 1e-13);
    double *L = malloc(sizeof(double) * n * n), wl = 0;
    memcpy(L, D, sizeof(double) * n * n);
    for (int i = 0; i < n; i++)
        L[i + (size_t)i * n] += 0.01;
    ck_assert_int_eq(LAPACKE_dpotrf(LAPACK_COL_MAJOR, 'L', n, L, n), 0);
    for (int i = 0; i < n; i++)
        wl += 2 * log(L[i + (size_t)i * n]);
    ck_assert_int_eq(cv_kron_diag_logdet(&d, 0.01, &ld, &e), 0);
    ck_assert_double_eq_tol(ld, wl, 1e-10 * (1 + fabs(wl)));
    ck_assert_int_eq(cv_kron_diag_logdet(&d, 0, &ld, &e), -1);
    double *w = malloc(sizeof(double) * n), *all = malloc(sizeof(double) * n);
    dense_eigh(D, n, w, NULL);
    double scale = max_abs(w, n);
    ck_assert_int_eq(cv_kron_diag_eigenvalues(&d, all, &e), 0);
    for (int i = 0; i < n; i++)
        ck_assert(fabs(all[i] - w[i]) < 1e-12 * scale);
    const cv_which whs[] = {CV_WHICH_LARGEST, CV_WHICH_SMALLEST, CV_WHICH_MAGNITUDE};
    int kk = 7;
    double vals[7], *vecs = malloc(sizeof(double) * n * kk), *Dv = malloc(sizeof(double) * n * kk);
    int sl[7];
    for (int wi = 0; wi < 3; wi++) {
        ck_assert_int_eq(cv_kron_diag_eigen(&d, whs[wi], kk, vals, vecs, sl, &e), 0);
        double *ws = malloc(sizeof(double) * n);
        memcpy(ws, w, sizeof(double) * n);
        order_which(ws, n, whs[wi]);
        check_topk(vals, ws, kk, whs[wi], 1e-12 * scale, "merged");
        dense_mul(D, n, kk, vecs, Dv);
        for (int t = 0; t < kk; t++) {
            ck_assert_double_eq_tol(tu_norm(vecs + (size_t)t * n, n), 1, 1e-13);
            for (int i = 0; i < n; i++) {
                ck_assert(fabs(Dv[t * n + i] - vals[t] * vecs[t * n + i]) < 1e-12 * scale);
                if (i < offs[sl[t]] || i >= offs[sl[t] + 1])
                    ck_assert_double_eq(vecs[t * n + i], 0);
            }
        }
        free(ws);
    }

    /* Lanczos on the linop finds the exact merged top-k */
    ck_assert_int_eq(cv_kron_diag_linop(&d, CV_KRON_FORWARD, 0, &op, &e), 0);
    cv_eigen_options eo;
    cv_eigen_options_default(&eo);
    eo.k = 4;
    eo.tol = 1e-10;
    cv_eigen_result er;
    cv_rng r;
    cv_rng_seed(&r, 3);
    ck_assert_int_eq(cv_eigen_lanczos(&op, &eo, &r, &er, &e), 0);
    ck_assert_int_eq(cv_kron_diag_eigen(&d, CV_WHICH_LARGEST, 4, vals, NULL, NULL, &e), 0);
    for (int t = 0; t < 4; t++)
        ck_assert_msg(fabs(er.eigenvalues[t] - vals[t]) < 1e-8 * scale, "lanczos #%d %.12g vs %.12g",
                      t, er.eigenvalues[t], vals[t]);
    cv_eigen_result_free(&er);

    /* a callback (non-Kronecker) slot: forward works, exact quantities refuse */
    double *E = rand_sym(5, NULL, 55);
    cv_dense_op dctx;
    cv_linop eop;
    cv_linop_from_dense(&eop, &dctx, 5, E);
    ck_assert_int_eq(cv_kron_diag_add_op(&d, &eop, &e), 0);
    int n2 = (int)d.n;
    ck_assert_int_eq(n2, n + 5);
    double *x2 = randv((size_t)n2, 10), *y2 = malloc(sizeof(double) * n2);
    ck_assert_int_eq(cv_kron_diag_linop(&d, CV_KRON_FORWARD, 0.1, &op, &e), 0);
    ck_assert_int_eq(cv_linop_apply(&op, 1, x2, y2, &e), 0);
    dense_mul(D, n, 1, x2, want);
    for (int i = 0; i < n; i++)
        ck_assert(fabs(y2[i] - want[i] - 0.1 * x2[i]) < 1e-12);
    for (int i = 0; i < 5; i++) {
        double v = 0.1 * x2[n + i];
        for (int j = 0; j < 5; j++)
            v += E[i + 5 * j] * x2[n + j];
        ck_assert(fabs(y2[n + i] - v) < 1e-12);
    }
    ck_assert_int_eq(cv_kron_diag_trace(&d, &tr, &e), -1);
    ck_assert_str_eq(e.code, "not_exact");
    ck_assert_int_eq(cv_kron_diag_linop(&d, CV_KRON_INVERSE, 0.1, &op, &e), -1);

    free(E);
    free(x2);
    free(y2);
    free(vecs);
    free(Dv);
    free(w);
    free(all);
    free(L);
    free(dg);
    free(wd);
    free(x);
    free(y);
    free(want);
    free(D);
    free(s);
    cv_kron_diag_free(&d);
    for (int i = 0; i < 3; i++)
        kcase_free(&c[i]);
}
END_TEST

/* A wider block: the heap's top-k equals a full sort of the products. */
START_TEST(heap_topk_equals_sort)
{
    kcase c;
    kcase_make(&c, 30, 12, 1, B_INDEFINITE, 5);
    int n = c.n;
    cv_err e;
    double *all = malloc(sizeof(double) * n), *vals = malloc(sizeof(double) * n);
    ck_assert_int_eq(cv_kron_block_products(&c.kb, all, &e), 0);
    const cv_which whs[] = {CV_WHICH_LARGEST, CV_WHICH_SMALLEST, CV_WHICH_MAGNITUDE};
    for (int wi = 0; wi < 3; wi++) {
        ck_assert_int_eq(cv_kron_block_eigen(&c.kb, NULL, whs[wi], n, vals, NULL, NULL, &e), 0);
        double *ws = malloc(sizeof(double) * n);
        memcpy(ws, all, sizeof(double) * n);
        order_which(ws, n, whs[wi]);
        for (int t = 0; t < n; t++)
            ck_assert_double_eq(whs[wi] == CV_WHICH_MAGNITUDE ? fabs(vals[t]) : vals[t],
                                whs[wi] == CV_WHICH_MAGNITUDE ? fabs(ws[t]) : ws[t]);
        free(ws);
    }
    free(all);
    free(vals);
    kcase_free(&c);
}
END_TEST

/* F (n x n) = sum of r outer products of float32 rows, as the Kronecker
 * kernels form them, and its eigenvalues by LAPACK's dsyevd in double
 * (rounded as kronop.h says). */
static double *float_rows_factor(int n, int r, uint64_t seed, double *wref)
{
    double *F = calloc((size_t)n * n, sizeof(double)), *q = malloc(sizeof(double) * n * n);
    float *U = malloc(sizeof(float) * (size_t)r * n);
    cv_rng g;
    cv_rng_seed(&g, seed);
    for (int i = 0; i < r * n; i++)
        U[i] = (float)(cv_rng_normal(&g) * (i % 5 == 0 ? 3.0 : 1.0));
    for (int a = 0; a < r; a++)
        for (int i = 0; i < n; i++)
            for (int j = 0; j < n; j++)
                F[(size_t)i * n + j] += (double)(U[a * n + i] * U[a * n + j]);
    memcpy(q, F, sizeof(double) * n * n);
    ck_assert_int_eq(LAPACKE_dsyevd(LAPACK_COL_MAJOR, 'N', 'U', n, q, n, wref), 0);
    double tol = sqrt((double)n) * FLT_EPSILON * fmax(fabs(wref[0]), fabs(wref[n - 1]));
    for (int i = 0; i < n; i++) /* kronop.h's rounding: float32 noise is 0 */
        if (fabs(wref[i]) <= tol)
            wref[i] = 0;
    free(q);
    free(U);
    return F;
}

/* ||w - wref|| / ||wref||, ascending w checked, the nonzeros of w counted. */
static double values_rel(const double *w, const double *wref, int n, int *nz)
{
    double num = 0, den = 0;
    *nz = 0;
    for (int i = 0; i < n; i++) {
        num += (w[i] - wref[i]) * (w[i] - wref[i]);
        den += wref[i] * wref[i];
        *nz += w[i] != 0;
        if (i)
            ck_assert(w[i - 1] <= w[i]);
    }
    return sqrt(num / den);
}

/* A factor with rank r well below n: its eigenvalues from its range
 * (cv_kron_factor_eigenvalues_rank) equal dsyevd's in double, those of the
 * values-only route (n >= 128: ssyevd on a float32 copy) within float32
 * precision, and the noise ones are 0 in both. */
START_TEST(factor_eigenvalues_on_range)
{
    const int n = 300, r = 40;
    double *wref = malloc(sizeof(double) * n);
    double *F = float_rows_factor(n, r, 7, wref);
    double *w1 = malloc(sizeof(double) * n), *w2 = malloc(sizeof(double) * n);
    cv_err e;
    ck_assert_int_eq(cv_kron_factor_eigenvalues(F, n, w1, &e), 0);
    ck_assert_int_eq(cv_kron_factor_eigenvalues_rank(F, n, r, w2, &e), 0);
    int nz1, nz2;
    double r1 = values_rel(w1, wref, n, &nz1), r2 = values_rel(w2, wref, n, &nz2);
    ck_assert_msg(r1 < 1e-5, "values-only route: rel %g", r1);
    ck_assert_msg(r2 < 1e-12, "range route: rel %g", r2);
    ck_assert_int_eq(nz1, r);
    ck_assert_int_eq(nz2, r);
    free(F);
    free(w1);
    free(w2);
    free(wref);
}
END_TEST

/* Full-rank factors: the values-only route (float32 from n = 128 on, double
 * below) against dsyevd in double, every eigenvalue relatively close. */
START_TEST(factor_eigenvalues_full_rank)
{
    const int ns[] = {60, 200};
    for (int c = 0; c < 2; c++) {
        int n = ns[c], nz;
        double *wref = malloc(sizeof(double) * n), *w = malloc(sizeof(double) * n);
        double *F = float_rows_factor(n, 2 * n, 11 + (uint64_t)c, wref);
        cv_err e;
        ck_assert_int_eq(cv_kron_factor_eigenvalues(F, n, w, &e), 0);
        double rel = values_rel(w, wref, n, &nz);
        ck_assert_msg(rel < (n < 128 ? 1e-13 : 1e-5), "n %d: rel %g", n, rel);
        ck_assert_int_eq(nz, n);
        for (int i = 0; i < n; i++) /* well conditioned: each value to float32 precision */
            ck_assert_msg(fabs(w[i] - wref[i]) < (n < 128 ? 1e-12 : 1e-4) * wref[i],
                          "n %d #%d: %.9g vs %.9g", n, i, w[i], wref[i]);
        free(F);
        free(w);
        free(wref);
    }
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("kronop");
    TCase *t = tcase_create("core");
    tcase_set_timeout(t, 60);
    tcase_add_test(t, mapping_round_trip_and_layout);
    tcase_add_test(t, matvec_vs_dense);
    tcase_add_test(t, damped_inverse_vs_solve);
    tcase_add_test(t, factored_damping_vs_dense_kron);
    tcase_add_test(t, inverse_quad_vs_product);
    tcase_add_test(t, trace_diag_logdet_vs_dense);
    tcase_add_test(t, eigen_vs_dsyev);
    tcase_add_test(t, ekfac_rotation_and_operator);
    tcase_add_test(t, block_diagonal_linop);
    tcase_add_test(t, heap_topk_equals_sort);
    tcase_add_test(t, factor_eigenvalues_on_range);
    tcase_add_test(t, factor_eigenvalues_full_rank);
    suite_add_tcase(s, t);
    return s;
}

int main(void) { return tu_main(suite); }
