/* test_estimators_net.c - the estimator ops (trace, diag, eigen, density,
 * solve, newton; blocks "full" and "layer") run through the job document
 * (cv_job_run) on a small MLP, checked against LAPACK on the dense curvature
 * matrix built here from cv_curv_matvec on identity columns.
 *
 * Net: 5 -> Linear 6 -> Tanh -> Linear 4, CrossEntropy (mean), N = 8, D = 64;
 * curvatures hessian (indefinite, 7 zero eigenvalues from the softmax shift
 * invariance) and ggn (PSD, rank <= N (C-1) = 24).
 *
 * Tolerances.  The operator computes in float32, so every product carries a
 * rounding error E with ||E|| of order 1e-7 ||A||; it is not even exactly
 * symmetric.  `noise` = ||A - A^T||_F of the matrix as built measures it
 * (the antisymmetric part is pure rounding).  The reference is LAPACK on the
 * symmetrized matrix; by Weyl an eigenvalue moves by at most ||E||_2, so
 * eigenvalues are compared to 1e-5 relative plus a floor of 3 * noise (about
 * 5e-7 here, below 1e-5 of all but the zero eigenvalues).  Solutions of
 * (A + delta I) x = b move by cond * (||E|| / ||A|| + residual), so solves
 * are compared to 10 * cond * (noise / ||A||_F + solver tol) relative.
 * Stochastic estimates (Hutchinson, Hutch++, SLQ moments) are compared
 * within 4 of their standard errors at fixed seeds, plus the float floor. */
#include "testutil.h"

#include <cJSON.h>
#include <stdarg.h>

#include "api/job.h"

#define MAXD 64
#define NKIND 2

static const cv_curvature kinds[NKIND] = {CV_CURV_HESSIAN, CV_CURV_GGN};
static const char *const kind_names[NKIND] = {"hessian", "ggn"};

typedef struct {
    cv_model m;
    cv_dataset d;
    cv_curv *c;
    cv_block full;
    int D;
    const char *kind;       /* curvature name for the job */
    double *A;              /* D x D dense curvature, symmetrized */
    double *w;              /* its eigenvalues, ascending */
    double noise;           /* ||A - A^T||_F before symmetrizing */
    double fro;             /* ||A||_F */
    double *g;              /* batch gradient */
    int nl;                 /* layer blocks */
    int start[4], dim[4];
} net;

/* Dense restriction of the curvature to block b: A e_j for all j. */
static double *dense_of(net *f, cv_curvature kind, const cv_block *b)
{
    size_t n = b->dim;
    double *X = calloc(n * n, sizeof(double)), *A = malloc(sizeof(double) * n * n);
    ck_assert_ptr_nonnull(X);
    ck_assert_ptr_nonnull(A);
    for (size_t j = 0; j < n; j++)
        X[j + j * n] = 1.0;
    cv_err e;
    for (size_t j = 0; j < n; j += 8) {
        int k = n - j < 8 ? (int)(n - j) : 8;
        ck_assert_int_eq(cv_curv_matvec(f->c, kind, b, k, X + j * n, A + j * n, &e), 0);
    }
    free(X);
    return A;
}

static void net_make(net *f, int kind)
{
    static const tu_layer layers[] = {{&cv_linear_class, 6}, {&cv_tanh_class, 0},
                                      {&cv_linear_class, 4}};
    tu_model(&f->m, 5, layers, 3, CV_LOSS_CE, CV_RED_MEAN, 11);
    tu_data(&f->d, &f->m, 8, 111);
    cv_err e;
    f->c = cv_curv_new(&f->m, &f->d, NULL, &e);
    ck_assert_msg(f->c != NULL, "cv_curv_new: %s", e.message);
    cv_block_full(&f->m, &f->full);
    f->D = (int)f->full.dim;
    ck_assert_int_eq(f->D, MAXD);
    f->kind = kind_names[kind];
    f->A = dense_of(f, kinds[kind], &f->full);
    int D = f->D;
    double as = 0, fr = 0;
    for (int i = 0; i < D; i++)
        for (int j = 0; j < D; j++) {
            double a = f->A[i + j * D], t = a - f->A[j + i * D];
            as += t * t;
            fr += a * a;
        }
    f->noise = sqrt(as);
    f->fro = sqrt(fr);
    for (int i = 0; i < D; i++)
        for (int j = 0; j < i; j++)
            f->A[i + j * D] = f->A[j + i * D] = 0.5 * (f->A[i + j * D] + f->A[j + i * D]);
    f->w = malloc(sizeof(double) * D);
    tu_eigvalsh(f->A, D, f->w);
    f->g = malloc(sizeof(double) * D);
    ck_assert_int_eq(cv_curv_gradient(f->c, &f->full, f->g, &e), 0);
    cv_block lb[4];
    f->nl = cv_blocks_per_layer(&f->m, lb, 4);
    ck_assert_int_eq(f->nl, 2);
    for (int l = 0, s = 0; l < f->nl; s += (int)lb[l].dim, l++) {
        f->start[l] = s;
        f->dim[l] = (int)lb[l].dim;
    }
    /* sanity of the premise: float noise, not a broken operator */
    ck_assert_double_lt(f->noise, 1e-5 * f->fro);
}

static void net_free(net *f)
{
    free(f->A);
    free(f->w);
    free(f->g);
    cv_curv_free(f->c);
    cv_model_free(&f->m);
    tu_data_free(&f->d);
}

/* Diagonal block [s, s+n) of f->A (new n x n). */
static double *sub(const net *f, int s, int n)
{
    double *B = malloc(sizeof(double) * n * n);
    for (int j = 0; j < n; j++)
        for (int i = 0; i < n; i++)
            B[i + j * n] = f->A[(s + i) + (size_t)(s + j) * f->D];
    return B;
}

static double eig_floor(const net *f) { return 3 * f->noise; }

/* ---- jobs ----------------------------------------------------------------- */

static cJSON *vjob(net *f, cv_err *e, const char *fmt, va_list ap)
{
    char buf[1024];
    vsnprintf(buf, sizeof buf, fmt, ap);
    cJSON *job = cJSON_Parse(buf);
    ck_assert_msg(job != NULL, "bad test job %s", buf);
    cJSON *res = cv_job_run(job, &f->m, &f->d, NULL, NULL, e);
    cJSON_Delete(job);
    return res;
}

/* Runs a job (printf-style JSON) that must succeed. */
static cJSON *run(net *f, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    cv_err e;
    cJSON *res = vjob(f, &e, fmt, ap);
    va_end(ap);
    ck_assert_msg(res != NULL, "job failed: %s (field %s)", e.message, e.field);
    return res;
}

/* Runs a job that must fail; returns its error. */
static cv_err run_fails(net *f, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    cv_err e;
    cJSON *res = vjob(f, &e, fmt, ap);
    va_end(ap);
    ck_assert_msg(res == NULL, "job should have failed");
    return e;
}

/* The list o[k] of exactly n numbers into out. */
static void list(const cJSON *o, const char *k, double *out, int n)
{
    const cJSON *a = cJSON_GetObjectItemCaseSensitive(o, k);
    ck_assert_msg(cJSON_IsArray(a), "result field %s missing", k);
    ck_assert_int_eq(cJSON_GetArraySize(a), n);
    int i = 0;
    for (const cJSON *v = a->child; v; v = v->next)
        out[i++] = v->valuedouble;
}

/* Result of block i (blocks other than "full"). */
static const cJSON *block(const cJSON *res, int i)
{
    const cJSON *b = cJSON_GetObjectItemCaseSensitive(res, "blocks");
    ck_assert_msg(cJSON_IsArray(b), "no blocks in result");
    return cJSON_GetArrayItem(b, i);
}

/* ---- dense references ----------------------------------------------------- */

static double dense_trace(const double *A, int n)
{
    double t = 0;
    for (int i = 0; i < n; i++)
        t += A[i + (size_t)i * n];
    return t;
}

/* x = (A + delta I)^-1 b (dposv if spd, else dsysv); *cond = 2-norm
 * condition number of A + delta I from its eigenvalues. */
static void dense_solve(const double *A, int n, double delta, const double *b, int spd,
                        double *x, double *cond)
{
    double *M = malloc(sizeof(double) * n * n), *w = malloc(sizeof(double) * n);
    memcpy(M, A, sizeof(double) * n * n);
    for (int i = 0; i < n; i++)
        M[i + (size_t)i * n] += delta;
    tu_eigvalsh(M, n, w);
    double lo = INFINITY, hi = 0;
    for (int i = 0; i < n; i++) {
        lo = fmin(lo, fabs(w[i]));
        hi = fmax(hi, fabs(w[i]));
    }
    *cond = hi / lo;
    memcpy(x, b, sizeof(double) * n);
    if (spd) {
        ck_assert_int_eq(LAPACKE_dposv(LAPACK_COL_MAJOR, 'U', n, 1, M, n, x, n), 0);
    } else {
        lapack_int *ipiv = malloc(sizeof(lapack_int) * n);
        ck_assert_int_eq(LAPACKE_dsysv(LAPACK_COL_MAJOR, 'U', n, 1, M, n, ipiv, x, n), 0);
        free(ipiv);
    }
    free(M);
    free(w);
}

/* ||(A + delta I) x - b|| / ||b|| with the dense matrix. */
static double dense_residual(const double *A, int n, double delta, const double *x,
                             const double *b)
{
    double s = 0;
    for (int i = 0; i < n; i++) {
        double r = delta * x[i] - b[i];
        for (int j = 0; j < n; j++)
            r += A[i + (size_t)j * n] * x[j];
        s += r * r;
    }
    return sqrt(s) / tu_norm(b, (size_t)n);
}

/* 1/2 s^T A s + g^T s */
static double dense_predicted(const double *A, int n, const double *s, const double *g)
{
    double q = 0;
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++)
            q += s[i] * A[i + (size_t)j * n] * s[j];
    return 0.5 * q + tu_dot(g, s, (size_t)n);
}

/* Checks job eigenvalues (sorted as `which` asks) against ascending w. */
static void check_eigs(const net *f, const double *got, const double *w, int n, int k,
                       const char *which, const char *what)
{
    int lo = 0, hi = n - 1;
    for (int i = 0; i < k; i++) {
        double want;
        if (!strcmp(which, "largest"))
            want = w[hi--];
        else if (!strcmp(which, "smallest"))
            want = w[lo++];
        else
            want = fabs(w[hi]) >= fabs(w[lo]) ? w[hi--] : w[lo++];
        double tol = 1e-5 * fabs(want) + eig_floor(f);
        ck_assert_msg(fabs(got[i] - want) <= tol, "%s %s %s #%d: %.9g vs LAPACK %.9g (tol %.2g)",
                      f->kind, what, which, i, got[i], want, tol);
    }
}

/* Loss of the model with parameters theta + step on [s, s + n) (the rest
 * unchanged), from a fresh cv_curv on a clone: independent of the op's
 * cv_curv_loss_at. */
static double loss_after(const net *f, int s, int n, const double *step)
{
    cv_model m2;
    ck_assert_int_eq(cv_model_clone(&f->m, &m2), 0);
    for (int i = 0; i < n; i++)
        m2.params[s + i] += (float)step[i];
    cv_err e;
    cv_curv *c2 = cv_curv_new(&m2, &f->d, NULL, &e);
    ck_assert_msg(c2 != NULL, "cv_curv_new: %s", e.message);
    double l = cv_curv_loss(c2);
    cv_curv_free(c2);
    cv_model_free(&m2);
    return l;
}

/* ---- trace and diag ------------------------------------------------------- */

START_TEST(trace_exact_hutchinson_hutchpp)
{
    net f;
    net_make(&f, _i);
    double tr = dense_trace(f.A, f.D), ftol = 1e-5 * fabs(tr) + f.noise;
    cJSON *r = run(&f, "{\"op\":\"diag\",\"curvature\":\"%s\",\"options\":{\"method\":"
                       "\"exact\"}}", f.kind);
    ck_assert_msg(fabs(tu_num(r, "trace") - tr) <= ftol, "exact trace %g vs %g", tu_num(r, "trace"),
                  tr);
    double diag[MAXD];
    list(r, "diag", diag, f.D);
    for (int i = 0; i < f.D; i++)
        ck_assert_msg(fabs(diag[i] - f.A[i + i * f.D]) <= 1e-5 * fabs(f.A[i + i * f.D]) +
                                                            f.noise,
                      "diag[%d] %g vs %g", i, diag[i], f.A[i + i * f.D]);
    cJSON_Delete(r);

    for (int seed = 0; seed < 3; seed++) {
        r = run(&f, "{\"op\":\"trace\",\"curvature\":\"%s\",\"seed\":%d,\"options\":"
                    "{\"max_probes\":200,\"tol\":0}}", f.kind, seed);
        double t = tu_num(r, "trace"), se = tu_num(r, "stderr");
        ck_assert_int_eq((int)tu_num(r, "probes"), 200);
        ck_assert_double_gt(se, 0);
        ck_assert_msg(fabs(t - tr) <= 4 * se + ftol, "%s seed %d: hutchinson %g +- %g vs %g",
                      f.kind, seed, t, se, tr);
        cJSON_Delete(r);
    }

    /* Hutch++ with default options spends all 100 matvecs: 33 sketch, 33
     * projection and 34 residual probes (the old tol rule stopped after ~2) */
    r = run(&f, "{\"op\":\"trace\",\"curvature\":\"%s\",\"seed\":5,\"options\":{\"method\":"
                "\"hutch++\",\"return_samples\":true}}", f.kind);
    ck_assert_int_eq((int)tu_num(r, "matvecs"), 100);
    ck_assert_int_eq((int)tu_num(r, "sketch"), 33);
    ck_assert_int_eq((int)tu_num(r, "probes"), 34);
    double s[34], mean = 0, ss = 0;
    list(r, "samples", s, 34);
    for (int i = 0; i < 34; i++)
        mean += s[i] / 34;
    for (int i = 0; i < 34; i++)
        ss += (s[i] - mean) * (s[i] - mean);
    double se = sqrt(ss / 33 / 34), t = tu_num(r, "trace");
    ck_assert_double_le(fabs(tu_num(r, "stderr") - se), 1e-9 * se + 1e-15);
    ck_assert_msg(fabs(t - tr) <= 4 * se + ftol, "%s hutch++ %g +- %g vs %g", f.kind, t, se,
                  tr);
    cJSON_Delete(r);
    cv_err e = run_fails(&f, "{\"op\":\"trace\",\"curvature\":\"%s\",\"options\":{\"method\":"
                             "\"hutch++\",\"tol\":1e-3}}", f.kind);
    ck_assert_int_eq(e.status, CV_EINVAL);
    ck_assert_str_eq(e.field, "options.tol");
    r = run(&f, "{\"op\":\"trace\",\"curvature\":\"%s\",\"options\":{\"method\":\"hutch++\","
                "\"tol\":0}}", f.kind);
    ck_assert_int_eq((int)tu_num(r, "matvecs"), 100);
    cJSON_Delete(r);
    net_free(&f);
}
END_TEST

/* ---- eigenvalues ---------------------------------------------------------- */

START_TEST(lanczos_and_power_vs_dsyev)
{
    net f;
    net_make(&f, _i);
    static const char *const which[] = {"largest", "smallest", "magnitude"};
    for (int wi = 0; wi < 3; wi++) {
        cJSON *r = run(&f, "{\"op\":\"eigen\",\"curvature\":\"%s\",\"seed\":1,\"options\":"
                           "{\"k\":3,\"which\":\"%s\"}}", f.kind, which[wi]);
        double ev[3];
        list(r, "eigenvalues", ev, 3);
        check_eigs(&f, ev, f.w, f.D, 3, which[wi], "lanczos");
        cJSON_Delete(r);
    }
    cJSON *r = run(&f, "{\"op\":\"eigen\",\"curvature\":\"%s\",\"seed\":2,\"options\":"
                       "{\"method\":\"power\",\"k\":1,\"tol\":1e-10,\"max_iter\":5000}}",
                   f.kind);
    double ev;
    list(r, "eigenvalues", &ev, 1);
    ck_assert_int_eq((int)tu_num(r, "converged"), 1);
    check_eigs(&f, &ev, f.w, f.D, 1, "magnitude", "power");
    cJSON_Delete(r);
    net_free(&f);
}
END_TEST

/* ---- SLQ ------------------------------------------------------------------ */

/* The per-run quadratures of a density result: th / w (runs x steps,
 * run-major) = nodes / weights, each run of exactly `steps` entries. */
static void quadrature(const cJSON *r, int runs, int steps, double *th, double *w)
{
    const cJSON *nodes = cJSON_GetObjectItem(r, "nodes");
    const cJSON *weights = cJSON_GetObjectItem(r, "weights");
    ck_assert_int_eq(cJSON_GetArraySize(nodes), runs);
    ck_assert_int_eq(cJSON_GetArraySize(weights), runs);
    for (int k = 0; k < runs; k++) {
        const cJSON *nr = cJSON_GetArrayItem(nodes, k), *wr = cJSON_GetArrayItem(weights, k);
        ck_assert_int_eq(cJSON_GetArraySize(nr), steps);
        ck_assert_int_eq(cJSON_GetArraySize(wr), steps);
        for (int i = 0; i < steps; i++) {
            th[(size_t)k * steps + i] = cJSON_GetArrayItem(nr, i)->valuedouble;
            w[(size_t)k * steps + i] = cJSON_GetArrayItem(wr, i)->valuedouble;
        }
    }
}

/* Each run's quadrature gives u^T A^k u (u the normalized Rademacher start)
 * exactly for k < 2 * lanczos_steps, and E[u^T A^k u] = tr(A^k) / D: the
 * mean over runs must be within 4 standard errors of tr(A^k)/D. */
START_TEST(slq_moments_vs_trace_of_powers)
{
    net f;
    net_make(&f, _i);
    enum { RUNS = 40, STEPS = 10, KMAX = 4 };
    cJSON *r = run(&f, "{\"op\":\"density\",\"curvature\":\"%s\",\"seed\":3,\"options\":"
                       "{\"lanczos_steps\":%d,\"runs\":%d,\"grid_points\":50}}",
                   f.kind, STEPS, RUNS);
    double th[RUNS][STEPS], w[RUNS][STEPS], mom[RUNS][KMAX + 1];
    quadrature(r, RUNS, STEPS, &th[0][0], &w[0][0]);
    for (int run_i = 0; run_i < RUNS; run_i++) {
        for (int k = 0; k <= KMAX; k++) {
            double m = 0;
            for (int i = 0; i < STEPS; i++)
                m += w[run_i][i] * pow(th[run_i][i], k);
            mom[run_i][k] = m;
        }
        ck_assert_double_le(fabs(mom[run_i][0] - 1.0), 1e-12);
    }
    double rho = fmax(fabs(f.w[0]), fabs(f.w[f.D - 1]));
    for (int k = 1; k <= KMAX; k++) {
        double want = 0, mean = 0, ss = 0;
        for (int i = 0; i < f.D; i++)
            want += pow(f.w[i], k) / f.D;
        for (int run_i = 0; run_i < RUNS; run_i++)
            mean += mom[run_i][k] / RUNS;
        for (int run_i = 0; run_i < RUNS; run_i++)
            ss += (mom[run_i][k] - mean) * (mom[run_i][k] - mean);
        double se = sqrt(ss / (RUNS - 1) / RUNS);
        ck_assert_double_gt(se, 0);
        double tol = 4 * se + 1e-5 * pow(rho, k);
        ck_assert_msg(fabs(mean - want) <= tol, "%s moment %d: SLQ %g +- %g vs tr(A^k)/D %g",
                      f.kind, k, mean, se, want);
    }
    cJSON_Delete(r);
    net_free(&f);
}
END_TEST

/* The density curve is the Gaussian mixture of the returned nodes and
 * weights, averaged over runs, on a grid from the mean extreme nodes minus /
 * plus the margin, normalized to sum * spacing = 1 (recomputed here). */
START_TEST(slq_density_is_the_broadened_mixture)
{
    net f;
    net_make(&f, _i);
    enum { RUNS = 3, STEPS = 12, G = 200 };
    cJSON *r = run(&f, "{\"op\":\"density\",\"curvature\":\"%s\",\"seed\":9,\"options\":"
                       "{\"lanczos_steps\":%d,\"runs\":%d,\"grid_points\":%d,\"sigma2\":0.01,"
                       "\"margin\":0.05}}", f.kind, STEPS, RUNS, G);
    const cJSON *den = cJSON_GetObjectItem(r, "density");
    double grid[G], val[G], th[RUNS][STEPS], w[RUNS][STEPS], lo = 0, hi = 0;
    list(den, "grid", grid, G);
    list(den, "values", val, G);
    quadrature(r, RUNS, STEPS, &th[0][0], &w[0][0]);
    for (int k = 0; k < RUNS; k++) {
        lo += th[k][0] / RUNS;
        hi += th[k][STEPS - 1] / RUNS;
    }
    lo -= 0.05;
    hi += 0.05;
    double s2 = 0.01 * fmax(1.0, hi - lo), dx = (hi - lo) / (G - 1), want[G], sum = 0, peak = 0;
    ck_assert_double_le(fabs(tu_num(r, "sigma2") - s2), 1e-12 * s2);
    for (int j = 0; j < G; j++) {
        ck_assert_double_le(fabs(grid[j] - (lo + j * dx)), 1e-9 * (hi - lo));
        want[j] = 0;
        for (int k = 0; k < RUNS; k++)
            for (int i = 0; i < STEPS; i++)
                want[j] += w[k][i] * exp(-(grid[j] - th[k][i]) * (grid[j] - th[k][i]) / (2 * s2));
        sum += want[j];
    }
    for (int j = 0; j < G; j++)
        peak = fmax(peak, want[j] /= sum * dx);
    for (int j = 0; j < G; j++)
        ck_assert_msg(fabs(val[j] - want[j]) <= 1e-9 * peak, "%s density[%d] %g vs mixture %g",
                      f.kind, j, val[j], want[j]);
    cJSON_Delete(r);
    net_free(&f);
}
END_TEST

/* ---- solve and newton ----------------------------------------------------- */

/* Net i and its solver: ggn: CG with damping 0.1 (PSD + delta I); hessian:
 * MINRES with damping 0.01 (indefinite, nonsingular: no eigenvalue near
 * -0.01), and CG refused. */
static void net_with_solver(net *f, int i, const char **method, double *delta)
{
    net_make(f, i);
    int ggn = !strcmp(f->kind, "ggn");
    *method = ggn ? "cg" : "minres";
    *delta = ggn ? 0.1 : 0.01;
}

/* Solution x of a job vs the dense one; returns the tolerance used. */
static double check_solution(const net *f, const double *A, int n, double delta,
                             const double *b, const double *x, double sign, const char *what)
{
    double *want = malloc(sizeof(double) * n), cond;
    dense_solve(A, n, delta, b, !strcmp(f->kind, "ggn"), want, &cond);
    ck_assert_double_lt(cond, 1e4);
    for (int i = 0; i < n; i++)
        want[i] *= sign;
    double tol = 10 * cond * (f->noise / f->fro + 1e-10);
    double err = tu_relerr(x, want, (size_t)n, 1e-30);
    ck_assert_msg(err <= tol, "%s %s: rel err %g vs dense (tol %g, cond %g)", f->kind, what,
                  err, tol, cond);
    free(want);
    return tol;
}

START_TEST(solve_and_newton_vs_dense)
{
    net f;
    const char *method;
    double delta;
    net_with_solver(&f, _i, &method, &delta);
    int D = f.D;
    cJSON *r = run(&f, "{\"op\":\"solve\",\"curvature\":\"%s\",\"options\":{\"method\":\"%s\","
                       "\"damping\":%g,\"tol\":1e-10,\"max_iter\":1000}}",
                   f.kind, method, delta);
    double x[MAXD];
    list(r, "solution", x, D);
    ck_assert_double_le(tu_num(r, "residual"), 1e-5);
    ck_assert_double_le(dense_residual(f.A, D, delta, x, f.g), 1e-5);
    check_solution(&f, f.A, D, delta, f.g, x, 1.0, "solve");
    cJSON_Delete(r);

    r = run(&f, "{\"op\":\"newton\",\"curvature\":\"%s\",\"options\":{\"method\":\"%s\","
                "\"damping\":%g,\"tol\":1e-10,\"max_iter\":1000,\"actual_change\":true}}",
            f.kind, method, delta);
    list(r, "step", x, D);
    double l0 = cv_curv_loss(f.c), actual = loss_after(&f, 0, D, x) - l0;
    ck_assert_msg(fabs(tu_num(r, "actual_change") - actual) <= 1e-6 * fabs(l0) + 1e-7,
                  "%s actual change %.9g vs re-evaluated %.9g", f.kind, tu_num(r, "actual_change"),
                  actual);
    double tol = check_solution(&f, f.A, D, delta, f.g, x, -1.0, "newton step");
    double pred = tu_num(r, "predicted_change"), want = dense_predicted(f.A, D, x, f.g);
    ck_assert_double_lt(pred, 0);
    ck_assert_msg(fabs(pred - want) <= tol * fabs(want), "%s predicted change %g vs %g",
                  f.kind, pred, want);
    cJSON_Delete(r);

    if (!strcmp(f.kind, "hessian")) { /* CG on the indefinite H + 0.01 I: refused */
        cv_err e = run_fails(&f, "{\"op\":\"solve\",\"options\":{\"damping\":0.01,"
                                 "\"max_iter\":1000}}");
        ck_assert_str_eq(e.code, "not_positive_definite");
        ck_assert_str_eq(e.field, "options.damping");
    }
    net_free(&f);
}
END_TEST

/* ---- matvec with a seeded probe ------------------------------------------ */

START_TEST(matvec_probe_seed_vs_dense)
{
    net f;
    net_make(&f, _i);
    int D = f.D;
    double v[MAXD], want[MAXD], got[MAXD], other[MAXD];
    cv_rng r;
    cv_rng_seed(&r, 5);
    cv_rng_rademacher(&r, v, (size_t)D);
    double q = 0;
    for (int i = 0; i < D; i++) {
        want[i] = 0;
        for (int j = 0; j < D; j++)
            want[i] += f.A[i + (size_t)j * D] * v[j];
        q += v[i] * want[i];
    }
    cJSON *res = run(&f, "{\"op\":\"matvec\",\"curvature\":\"%s\",\"options\":"
                         "{\"probe_seed\":5}}", f.kind);
    list(res, "product", got, D);
    double tol = f.noise * tu_norm(v, (size_t)D) + 1e-6 * tu_norm(want, (size_t)D);
    for (int i = 0; i < D; i++)
        ck_assert_msg(fabs(got[i] - want[i]) <= tol, "%s product[%d] %g vs A v %g", f.kind, i,
                      got[i], want[i]);
    ck_assert_double_le(fabs(tu_num(res, "quadratic_form") - q), tol * tu_norm(v, (size_t)D));
    cJSON_Delete(res);
    res = run(&f, "{\"op\":\"matvec\",\"curvature\":\"%s\",\"options\":{\"probe_seed\":6}}",
              f.kind);
    list(res, "product", other, D);
    ck_assert_double_gt(tu_relerr(other, got, (size_t)D, 1e-30), 1e-3);
    cJSON_Delete(res);
    net_free(&f);
}
END_TEST

/* ---- per-layer blocks ----------------------------------------------------- */

START_TEST(layer_blocks_equal_diagonal_blocks)
{
    net f;
    const char *method;
    double delta;
    net_with_solver(&f, _i, &method, &delta);
    cJSON *tr = run(&f, "{\"op\":\"diag\",\"curvature\":\"%s\",\"blocks\":\"layer\","
                        "\"options\":{\"method\":\"exact\"}}", f.kind);
    cJSON *hu = run(&f, "{\"op\":\"trace\",\"curvature\":\"%s\",\"blocks\":\"layer\","
                        "\"seed\":4,\"options\":{\"max_probes\":200,\"tol\":0}}", f.kind);
    cJSON *ev = run(&f, "{\"op\":\"eigen\",\"curvature\":\"%s\",\"blocks\":\"layer\","
                        "\"seed\":4,\"options\":{\"k\":1}}", f.kind);
    cJSON *nt = run(&f, "{\"op\":\"newton\",\"curvature\":\"%s\",\"blocks\":\"layer\","
                        "\"options\":{\"method\":\"%s\",\"damping\":%g,\"tol\":1e-10,"
                        "\"max_iter\":1000,\"actual_change\":true}}", f.kind, method, delta);
    for (int l = 0; l < f.nl; l++) {
        int s = f.start[l], n = f.dim[l];
        double *B = sub(&f, s, n), w[MAXD], x[MAXD];
        double t = dense_trace(B, n), ftol = 1e-5 * fabs(t) + f.noise;
        ck_assert_int_eq((int)tu_num(block(tr, l), "dim"), n);
        ck_assert_msg(fabs(tu_num(block(tr, l), "trace") - t) <= ftol, "layer %d trace %g vs %g",
                      l, tu_num(block(tr, l), "trace"), t);
        double h = tu_num(block(hu, l), "trace"), se = tu_num(block(hu, l), "stderr");
        ck_assert_msg(fabs(h - t) <= 4 * se + ftol, "layer %d hutchinson %g +- %g vs %g", l, h,
                      se, t);
        tu_eigvalsh(B, n, w);
        double top;
        list(block(ev, l), "eigenvalues", &top, 1);
        check_eigs(&f, &top, w, n, 1, "largest", "layer top");
        /* and the block's top is not the full matrix's (blocks are restricted) */
        ck_assert_double_gt(fabs(top - f.w[f.D - 1]), 1e-3);
        list(block(nt, l), "step", x, n);
        double tol = check_solution(&f, B, n, delta, f.g + s, x, -1.0, "layer newton step");
        double l0 = cv_curv_loss(f.c), actual = loss_after(&f, s, n, x) - l0;
        double got = tu_num(block(nt, l), "actual_change");
        ck_assert_msg(fabs(got - actual) <= 1e-6 * fabs(l0) + 1e-7,
                      "layer %d actual change %.9g vs re-evaluated %.9g (only this block moves)",
                      l, got, actual);
        double pred = tu_num(block(nt, l), "predicted_change");
        double want = dense_predicted(B, n, x, f.g + s);
        ck_assert_msg(fabs(pred - want) <= tol * fabs(want), "layer %d predicted %g vs %g", l,
                      pred, want);
        free(B);
    }
    cJSON_Delete(tr);
    cJSON_Delete(hu);
    cJSON_Delete(ev);
    cJSON_Delete(nt);
    net_free(&f);
}
END_TEST

/* Rademacher sign vector v (v[0] = +1: d is even in v) with
 * d = (B v) .* v for the n x n block B, by enumeration; *ambiguous is set
 * when another pattern fits nearly as well. */
static unsigned signs_of(const double *B, int n, const double *d, int *ambiguous)
{
    double best = INFINITY, second = INFINITY;
    unsigned arg = 0;
    for (unsigned p = 0; p < 1u << (n - 1); p++) {
        double v[8], err = 0;
        for (int i = 0; i < n; i++)
            v[i] = i == 0 || (p >> (i - 1) & 1) == 0 ? 1.0 : -1.0;
        for (int i = 0; i < n; i++) {
            double bv = 0;
            for (int j = 0; j < n; j++)
                bv += B[i + j * n] * v[j];
            err = fmax(err, fabs(bv * v[i] - d[i]));
        }
        if (err < best) {
            second = best;
            best = err;
            arg = p;
        } else if (err < second) {
            second = err;
        }
    }
    *ambiguous = !(second > 100 * best && second > 1e-4);
    return arg;
}

/* Blocks draw independent probes.  With one Rademacher probe the diagonal
 * estimate d = (B v) .* v reveals v up to sign.  The old shared stream gave
 * the 4-dim block "2.bias" the first 4 signs of the probe of "0.bias" at
 * every seed; independent streams agree (up to sign) with chance 1/8. */
START_TEST(blocks_draw_independent_probes)
{
    net f;
    net_make(&f, 1);
    int b0 = cv_model_find_param(&f.m, "0.bias"), b2 = cv_model_find_param(&f.m, "2.bias");
    ck_assert_int_ge(b0, 0);
    ck_assert_int_ge(b2, 0);
    int s0 = (int)cv_model_param(&f.m, b0)->offset, s2 = (int)cv_model_param(&f.m, b2)->offset;
    ck_assert_int_eq((int)cv_model_param(&f.m, b0)->numel, 6);
    ck_assert_int_eq((int)cv_model_param(&f.m, b2)->numel, 4);
    double *B0 = sub(&f, s0, 6), *B2 = sub(&f, s2, 4);
    int same = 0;
    for (int seed = 0; seed < 6; seed++) {
        cJSON *r = run(&f, "{\"op\":\"diag\",\"curvature\":\"ggn\",\"seed\":%d,\"blocks\":"
                           "[[\"0.bias\"],[\"2.bias\"]],\"options\":{\"max_probes\":1}}",
                       seed);
        double d0[6], d2[4];
        list(block(r, 0), "diag", d0, 6);
        list(block(r, 1), "diag", d2, 4);
        int amb0, amb2;
        unsigned p0 = signs_of(B0, 6, d0, &amb0), p2 = signs_of(B2, 4, d2, &amb2);
        ck_assert_msg(!amb0 && !amb2, "seed %d: probe signs not identifiable", seed);
        same += (p0 & 7u) == p2; /* signs 1..3 relative to sign 0 */
        cJSON_Delete(r);
    }
    ck_assert_msg(same < 6, "the two blocks drew the same probes at every seed");
    /* an explicit group of all parameters is the full block: same stream */
    cJSON *a = run(&f, "{\"op\":\"trace\",\"curvature\":\"ggn\",\"seed\":7,\"options\":"
                       "{\"max_probes\":5,\"tol\":0}}");
    cJSON *b = run(&f, "{\"op\":\"trace\",\"curvature\":\"ggn\",\"seed\":7,\"blocks\":"
                       "[[\"0.weight\",\"0.bias\",\"2.weight\",\"2.bias\"]],\"options\":"
                       "{\"max_probes\":5,\"tol\":0}}");
    ck_assert(tu_num(a, "trace") == tu_num(block(b, 0), "trace"));
    cJSON_Delete(a);
    cJSON_Delete(b);
    free(B0);
    free(B2);
    net_free(&f);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("estimators_net");
    TCase *t = tcase_create("mlp");
    tcase_set_timeout(t, 120);
    tcase_add_loop_test(t, trace_exact_hutchinson_hutchpp, 0, NKIND);
    tcase_add_loop_test(t, lanczos_and_power_vs_dsyev, 0, NKIND);
    tcase_add_loop_test(t, slq_moments_vs_trace_of_powers, 0, NKIND);
    tcase_add_loop_test(t, slq_density_is_the_broadened_mixture, 0, NKIND);
    tcase_add_loop_test(t, solve_and_newton_vs_dense, 0, NKIND);
    tcase_add_loop_test(t, layer_blocks_equal_diagonal_blocks, 0, NKIND);
    tcase_add_loop_test(t, matvec_probe_seed_vs_dense, 0, NKIND);
    tcase_add_test(t, blocks_draw_independent_probes);
    suite_add_tcase(s, t);
    return s;
}

int main(void) { return tu_main(suite); }
