/* ops_estimators.c - the estimator ops (trace, diag, eigen, density, solve,
 * newton) mapping job options onto engine/estimators.h and results to JSON. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "api/op_args.h"
#include "api/op_kron.h"
#include "api/op_util.h"
#include "engine/est_util.h"
#include "api/ops.h"
#include "engine/diag_exact.h"
#include "engine/estimators.h"

#define BIG 1e9

/* Enum options are stored as int into the engine's enum fields. */
_Static_assert(sizeof(cv_probe_dist) == sizeof(int), "cv_probe_dist is stored as int");
_Static_assert(sizeof(cv_which) == sizeof(int), "cv_which is stored as int");

/* Stream key of block b: 0 for the whole parameter vector (the streams of
 * "full" jobs stay as they were), else 1 + an FNV-1a hash of its tensor
 * indices, so that the blocks of a job draw independent probes (their
 * errors are uncorrelated) and a block's numbers do not depend on which
 * other blocks the job lists. */
static uint64_t block_key(const cv_op_ctx *c, const cv_block *b)
{
    if (b->dim == c->m->nparams_total)
        return 0;
    uint64_t h = 0xcbf29ce484222325ull;
    for (int i = 0; i < b->count; i++) {
        h ^= (uint64_t)(unsigned)b->idx[i];
        h *= 0x100000001b3ull;
    }
    return 1 + (h >> 8);
}

/* The curvature of block b as a linop (lc: its storage) and the random
 * stream of a randomized op (salt: one per op) on that block. */
static void linop_and_rng(cv_op_ctx *c, const cv_block *b, uint64_t salt, cv_linop *op,
                          cv_curv_linop_ctx *lc, cv_rng *r)
{
    cv_op_linop(c, b, op, lc);
    cv_rng_seed_stream(r, c->seed, salt | block_key(c, b) << 8);
}

/* ---- trace ---------------------------------------------------------------- */

typedef struct {
    cv_op_base base;
    cv_trace_options o;
    int method;
} trace_args;

static const cv_opt_spec trace_opts[] = {
    {"method", CV_OPT_METHOD, 0, 0, NULL, offsetof(trace_args, method), NULL},
    {"max_probes", CV_OPT_INT, 1, 1e6, NULL, offsetof(trace_args, o.max_probes), NULL},
    {"tol", CV_OPT_NUM, 0, 1, NULL, offsetof(trace_args, o.tol), NULL},
    {"distribution", CV_OPT_ENUM, 0, 0, "rademacher|gaussian",
     offsetof(trace_args, o.distribution), NULL},
    {"return_samples", CV_OPT_BOOL, 0, 0, NULL, offsetof(trace_args, o.return_samples), NULL},
    CV_OPT_MC(trace_args),
    CV_OPT_KRON(trace_args),
    CV_OPT_END};
CV_OPT_TABLE_FITS(trace_opts);

static void trace_defaults(void *p, int method)
{
    cv_trace_options_default(&((trace_args *)p)->o);
}

/* The sketching methods' budget (hutch++: 3 matvecs, xtrace: 4) and tol. */
static int check_budget(const cv_opts *opts, const char *m, int min, cv_err *e)
{
    const trace_args *a = opts->args;
    if (a->o.max_probes < min)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.max_probes",
                          "%s needs a budget of at least %d matvecs (options.max_probes)", m,
                          min);
    /* no stopping rule (they spend max_probes); tol 0 says that */
    if (cv_opts_given(opts, "tol") && a->o.tol > 0)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.tol",
                          "%s always spends its budget of max_probes matvecs: tol applies "
                          "to method hutchinson only (omit it, or give 0)", m);
    return 0;
}

static int check_hutchpp(const cv_opts *opts, cv_curvature kind, cv_err *e)
{
    return check_budget(opts, "hutch++", 3, e);
}

static int check_xtrace(const cv_opts *opts, cv_curvature kind, cv_err *e)
{
    return check_budget(opts, "xtrace", 4, e);
}

/* XNysTrace: positive semi-definite curvatures only (not the Hessian). */
static int check_psd_method(const char *m, cv_curvature kind, cv_err *e)
{
    if (kind == CV_CURV_HESSIAN)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.method",
                          "%s needs a positive semi-definite curvature (ggn, fisher_mc, ef or a "
                          "Kronecker one); the Hessian is indefinite: use hutchinson, hutch++ "
                          "or xtrace", m);
    return 0;
}

static int check_xnystrace(const cv_opts *opts, cv_curvature kind, cv_err *e)
{
    return check_budget(opts, "xnystrace", 2, e) || check_psd_method("xnystrace", kind, e);
}

/* One run for every method (trace_methods: 0 hutchinson, 1 hutch++, 2 xtrace,
 * 3 xnystrace). */
static int run_trace(cv_op_ctx *c, const cv_block *b, cJSON *out, cv_err *e)
{
    const trace_args *a = c->opts->args;
    int x = cv_op_kron_trace(c, b, out, e);
    if (x)
        return x < 0 ? -1 : 0;
    cv_trace_options o = a->o; /* Hutch++ has no stopping rule: it ignores tol */
    cv_linop op;
    cv_curv_linop_ctx lc;
    cv_rng r;
    linop_and_rng(c, b, 1, &op, &lc, &r);
    cv_trace_result res;
    int rc = a->method == 1   ? cv_trace_hutchpp(&op, &o, &r, &res, e)
             : a->method == 2 ? cv_trace_xtrace(&op, &o, &r, &res, e)
             : a->method == 3 ? cv_trace_xnystrace(&op, &o, 1, &r, &res, e)
                              : cv_trace_hutchinson(&op, &o, &r, &res, e);
    if (rc)
        return -1;
    cJSON_AddStringToObject(out, "method", c->method);
    cJSON_AddNumberToObject(out, "trace", res.trace);
    cJSON_AddNumberToObject(out, "stderr", res.std_err);
    cJSON_AddNumberToObject(out, "probes", res.probes);
    if (res.sketch)
        cJSON_AddNumberToObject(out, "sketch", res.sketch);
    if (res.samples)
        cJSON_AddItemToObject(out, "samples", cv_json_doubles(res.samples, (size_t)res.probes));
    cv_trace_result_free(&res);
    return 0;
}


static const cv_op_method trace_hutchinson = {"hutchinson", run_trace, NULL, NULL, NULL};
static const cv_op_method trace_hutchpp = {"hutch++", run_trace, check_hutchpp, NULL, NULL};
static const cv_op_method trace_xtrace = {"xtrace", run_trace, check_xtrace, NULL, NULL};
static const cv_op_method trace_xnystrace = {"xnystrace", run_trace, check_xnystrace, NULL,
                                             NULL};
static const cv_op_method *const trace_methods[] = {&trace_hutchinson, &trace_hutchpp,
                                                    &trace_xtrace, &trace_xnystrace, NULL};

/* ---- diag ----------------------------------------------------------------- */

typedef struct {
    cv_op_base base;
    cv_diag_options o;
    int method;
    int per_sample;  /* method exact by backpropagation: also the N per-sample diagonals */
} diag_args;

static const cv_opt_spec diag_opts[] = {
    {"method", CV_OPT_METHOD, 0, 0, NULL, offsetof(diag_args, method), NULL},
    {"max_probes", CV_OPT_INT, 1, 1e6, NULL, offsetof(diag_args, o.max_probes), NULL},
    {"distribution", CV_OPT_ENUM, 0, 0, "rademacher|gaussian",
     offsetof(diag_args, o.distribution), NULL},
    {"per_sample", CV_OPT_BOOL, 0, 0, NULL, offsetof(diag_args, per_sample), NULL},
    CV_OPT_MC(diag_args),
    CV_OPT_KRON(diag_args),
    CV_OPT_END};
CV_OPT_TABLE_FITS(diag_opts);

static void diag_defaults(void *p, int method) { cv_diag_options_default(&((diag_args *)p)->o); }

/* per_sample: method exact on ggn, fisher_mc or ef only (the backpropagated path). */
static int check_diag(const cv_opts *opts, cv_curvature kind, cv_err *e)
{
    const diag_args *a = opts->args;
    if (!a->per_sample)
        return 0;
    if (a->method != 1)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.per_sample",
                          "per_sample needs method exact (the backpropagated diagonal)");
    if (kind != CV_CURV_GGN && kind != CV_CURV_FISHER_MC && kind != CV_CURV_EF &&
        kind != CV_CURV_HESSIAN)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.per_sample",
                          "per-sample diagonals are backpropagated for hessian, ggn, "
                          "fisher_mc and ef, not %s", cv_curvature_name(kind));
    return 0;
}

static int check_xdiag(const cv_opts *opts, cv_curvature kind, cv_err *e)
{
    const diag_args *a = opts->args;
    if (a->o.max_probes < 4)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.max_probes",
                          "xdiag needs a budget of at least 4 matvecs (options.max_probes)");
    /* its residual term divides by each probe's own entry: with Gaussian probes a ratio
     * of Gaussians, without a mean (curvlinops' xdiag is Rademacher-only too) */
    if (a->o.distribution != CV_PROBE_RADEMACHER)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.distribution",
                          "xdiag needs Rademacher probes (w .* A w ./ w.^2 has no mean for "
                          "Gaussian w)");
    return 0;
}

/* method exact by backpropagation (engine/diag_exact.h) where it applies:
 * 1 when it ran, 0 when the identity columns should run instead (another
 * curvature, or a layer without the kernel while the block is within the
 * dense limit and per_sample is off), -1 with e (a layer without the kernel
 * above the limit or with per_sample). */
static int diag_backprop(cv_op_ctx *c, const cv_block *b, cJSON *out, cv_err *e)
{
    const diag_args *a = c->opts->args;
    if (c->kron || (c->kind != CV_CURV_GGN && c->kind != CV_CURV_FISHER_MC &&
                    c->kind != CV_CURV_EF && c->kind != CV_CURV_HESSIAN))
        return 0;
    cv_err why;
    if (cv_diag_backprop_check(c->m, c->kind, b, &why)) {
        if (b->dim <= c->lim->dense_max && !a->per_sample)
            return 0; /* the identity columns, as before */
        *e = why;
        return -1;
    }
    /* the Hessian of a small block: D identity columns (2 passes each) when they
     * cost less than the residual walks' columns (wide smooth activations) */
    if (c->kind == CV_CURV_HESSIAN && !a->per_sample && b->dim <= c->lim->dense_max &&
        2.0 * (double)b->dim < (double)cv_diag_backprop_columns(c->m, c->kind, b,
                                                                a->base.mc_samples))
        return 0;
    size_t N = a->per_sample ? cv_curv_batch_size(c->curv) : 1, D = b->dim;
    if (a->per_sample && (double)N * (double)D > 5e8)
        return cv_err_set(e, CV_ETOOLARGE, "too_large", "options.per_sample",
                          "per-sample diagonals would need %.1f GB; use a smaller batch or a "
                          "block", 8e-9 * (double)N * (double)D);
    double *d = malloc(sizeof(double) * (N * D + D + 1));
    if (cv_curv_agree(c->curv, d ? 0 : cv_err_set(e, CV_ENOMEM, "out_of_memory", "",
                                                  "exact diagonal"), e)) {
        free(d);
        return -1;
    }
    double *sum = a->per_sample ? d + N * D : d;
    if (cv_curv_diag_backprop(c->curv, c->kind, b, a->per_sample, d, e)) {
        free(d);
        return -1;
    }
    if (a->per_sample) { /* the diagonal: the rows' sum */
        memset(sum, 0, sizeof(double) * D);
        for (size_t i = 0; i < N; i++)
            for (size_t q = 0; q < D; q++)
                sum[q] += d[i * D + q];
    }
    double tr = 0;
    for (size_t i = 0; i < D; i++)
        tr += sum[i];
    cJSON_AddStringToObject(out, "method", c->method);
    cJSON_AddItemToObject(out, "diag", cv_json_doubles(sum, D));
    if (a->per_sample)
        cJSON_AddItemToObject(out, "per_sample_diag", cv_json_columns(d, D, (int)N));
    memset(sum, 0, sizeof(double) * D);
    cJSON_AddItemToObject(out, "stderr", cv_json_doubles(sum, D));
    cJSON_AddNumberToObject(out, "trace", tr);
    cJSON_AddNumberToObject(out, "probes", 0);
    cJSON_AddBoolToObject(out, "backprop", 1);
    free(d);
    return 1;
}

/* One run for every method (diag_methods: 0 hutchinson, 1 exact, 2 xdiag). */
static int run_diag(cv_op_ctx *c, const cv_block *b, cJSON *out, cv_err *e)
{
    const diag_args *a = c->opts->args;
    cv_diag_options o = a->o;
    int exact = a->method == 1, x = cv_op_kron_diag(c, b, out, e);
    if (x)
        return x < 0 ? -1 : 0;
    if (exact && (x = diag_backprop(c, b, out, e)))
        return x < 0 ? -1 : 0;
    if (exact && b->dim > c->lim->dense_max)
        return cv_err_set(e, CV_ETOOLARGE, "too_large", "options.method",
                          "the exact diagonal needs %zu matvecs; allowed up to the dense "
                          "limit %zu (use method hutchinson)",
                          b->dim, c->lim->dense_max);
    cv_linop op;
    cv_curv_linop_ctx lc;
    cv_rng r;
    linop_and_rng(c, b, 2, &op, &lc, &r);
    cv_diag_result res;
    if (exact ? cv_diag_exact(&op, &o, &res, e)
        : a->method == 2 ? cv_diag_xdiag(&op, &o, &r, &res, e)
                         : cv_diag_hutchinson(&op, &o, &r, &res, e))
        return -1;
    cJSON_AddStringToObject(out, "method", c->method);
    cJSON_AddItemToObject(out, "diag", cv_json_doubles(res.diag, res.n));
    cJSON_AddItemToObject(out, "stderr", cv_json_doubles(res.std_err, res.n));
    double tr = 0;
    for (size_t i = 0; i < res.n; i++)
        tr += res.diag[i];
    cJSON_AddNumberToObject(out, "trace", tr);
    cJSON_AddNumberToObject(out, "probes", res.probes);
    if (exact)
        cJSON_AddBoolToObject(out, "backprop", 0);
    cv_diag_result_free(&res);
    return 0;
}

static const cv_op_method diag_hutchinson = {"hutchinson", run_diag, NULL, NULL, NULL};
static const cv_op_method diag_exact = {"exact", run_diag, NULL, NULL, NULL};
static const cv_op_method diag_xdiag = {"xdiag", run_diag, check_xdiag, NULL, NULL};
static const cv_op_method *const diag_methods[] = {&diag_hutchinson, &diag_exact, &diag_xdiag,
                                                   NULL};

/* ---- frobenius_norm ------------------------------------------------------- */
/* trace's options (trace_args, trace_opts), its own methods hutchinson and
 * xnystrace (on A^2). */

static int check_frob_xnys(const cv_opts *opts, cv_curvature kind, cv_err *e)
{
    return check_budget(opts, "xnystrace on A^2 (2 matvecs per test vector)", 4, e);
}

/* ||A||_F^2 = tr(A^2): Hutchinson on ||A v||^2, or XNysTrace on A^2 (PSD). */
static int run_frob(cv_op_ctx *c, const cv_block *b, cJSON *out, cv_err *e)
{
    const trace_args *a = c->opts->args;
    cv_linop op;
    cv_curv_linop_ctx lc;
    cv_rng r;
    linop_and_rng(c, b, 6, &op, &lc, &r);
    cv_trace_result res;
    if (a->method == 1 ? cv_trace_xnystrace(&op, &a->o, 2, &r, &res, e)
                       : cv_frobenius_hutchinson(&op, &a->o, &r, &res, e))
        return -1;
    cJSON_AddStringToObject(out, "method", c->method);
    cJSON_AddNumberToObject(out, "frobenius_norm", sqrt(res.trace > 0 ? res.trace : 0));
    cJSON_AddNumberToObject(out, "frobenius_norm_squared", res.trace);
    cJSON_AddNumberToObject(out, "stderr", res.std_err);
    cJSON_AddNumberToObject(out, "probes", res.probes);
    if (res.samples)
        cJSON_AddItemToObject(out, "samples", cv_json_doubles(res.samples, (size_t)res.probes));
    cv_trace_result_free(&res);
    return 0;
}

static const cv_op_method frob_hutchinson = {"hutchinson", run_frob, NULL, NULL, NULL};
static const cv_op_method frob_xnystrace = {"xnystrace", run_frob, check_frob_xnys, NULL, NULL};
static const cv_op_method *const frob_methods[] = {&frob_hutchinson, &frob_xnystrace, NULL};

/* ---- eigen ---------------------------------------------------------------- */

static const cv_opt_spec eigen_opts[] = {
    {"k", CV_OPT_INT, 1, 1e6, NULL, offsetof(cv_eigen_args, o.k), NULL},
    {"which", CV_OPT_ENUM, 0, 0, "largest|smallest|magnitude", offsetof(cv_eigen_args, o.which),
     NULL},
    {"method", CV_OPT_METHOD, 0, 0, NULL, offsetof(cv_eigen_args, method), NULL},
    {"max_iter", CV_OPT_INT, 1, 1e7, NULL, offsetof(cv_eigen_args, o.max_iter), NULL},
    {"tol", CV_OPT_NUM, 0, 1, NULL, offsetof(cv_eigen_args, o.tol), NULL},
    {"return_vectors", CV_OPT_BOOL, 0, 0, NULL, offsetof(cv_eigen_args, o.return_vectors), NULL},
    {"block_size", CV_OPT_INT, 1, 256, NULL, offsetof(cv_eigen_args, block_size),
     "block_lanczos"},
    CV_OPT_VIVIT(cv_eigen_args, "gram"),
    CV_OPT_MC(cv_eigen_args),
    CV_OPT_KRON(cv_eigen_args),
    CV_OPT_END};
CV_OPT_TABLE_FITS(eigen_opts);

static void eigen_defaults(void *p, int method)
{
    cv_eigen_args *a = p;
    if (method == CV_EIGEN_POWER)
        cv_power_options_default(&a->o);
    else
        cv_eigen_options_default(&a->o);
    a->o.k = 1;
    a->o.which = CV_WHICH_LARGEST;
    a->block_size = 16;
    a->o.return_vectors = 0;
    cv_vivit_args_default(&a->vivit);
}

static int check_eigen(const cv_opts *opts, cv_curvature kind, cv_err *e)
{
    const cv_eigen_args *a = opts->args;
    if (a->method == CV_EIGEN_POWER && a->o.which == CV_WHICH_SMALLEST)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.which",
                          "power iteration finds dominant eigenvalues only; use method "
                          "lanczos for which=smallest");
    return 0;
}

/* At bind: lanczos and power find k eigenpairs of each block, so k is at
 * most its dimension (gram returns at most the factor's rank: k caps it). */
static int bind_eigen(const cv_opts *opts, const cv_block *b, cv_err *e)
{
    const cv_eigen_args *a = opts->args;
    if (a->method != CV_EIGEN_GRAM && (size_t)a->o.k > b->dim)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.k",
                          "k = %d exceeds the block dimension %zu", a->o.k, b->dim);
    return 0;
}

static void eigen_json(const cv_eigen_result *r, const char *method, cv_which which,
                       cJSON *out)
{
    cJSON_AddStringToObject(out, "method", method);
    cJSON_AddStringToObject(out, "which", cv_which_name(which));
    cJSON_AddItemToObject(out, "eigenvalues", cv_json_doubles(r->eigenvalues, (size_t)r->k));
    cJSON_AddItemToObject(out, "residuals", cv_json_doubles(r->residuals, (size_t)r->k));
    cJSON_AddNumberToObject(out, "converged", r->converged);
    cJSON_AddNumberToObject(out, "iterations", r->iterations);
    if (r->eigenvectors)
        cJSON_AddItemToObject(out, "eigenvectors", cv_json_columns(r->eigenvectors, r->n, r->k));
}

/* Methods lanczos and power (gram has its own run in ops_vivit.c). */
static int run_eigen(cv_op_ctx *c, const cv_block *b, cJSON *out, cv_err *e)
{
    const cv_eigen_args *a = c->opts->args;
    cv_eigen_options o = a->o;
    int power = a->method == CV_EIGEN_POWER; /* k <= b->dim: bind_eigen */
    int x = cv_op_kron_eigen(c, b, &o, out, e);
    if (x)
        return x < 0 ? -1 : 0;
    cv_linop op;
    cv_curv_linop_ctx lc;
    cv_rng r;
    linop_and_rng(c, b, 3, &op, &lc, &r);
    cv_eigen_result res;
    if (power                                   ? cv_eigen_power(&op, &o, &r, &res, e)
        : a->method == CV_EIGEN_BLOCK_LANCZOS ? cv_eigen_block_lanczos(&op, &o, a->block_size,
                                                                        &r, &res, e)
                                              : cv_eigen_lanczos(&op, &o, &r, &res, e))
        return -1;
    eigen_json(&res, c->method, o.which, out);
    cv_eigen_result_free(&res);
    return 0;
}

static const cv_op_method eigen_lanczos = {"lanczos", run_eigen, NULL, NULL, NULL};
static const cv_op_method eigen_power = {"power", run_eigen, NULL, NULL, NULL};
static const cv_op_method eigen_block = {"block_lanczos", run_eigen, NULL, NULL, NULL};
/* indices: CV_EIGEN_LANCZOS, CV_EIGEN_POWER, CV_EIGEN_GRAM, CV_EIGEN_BLOCK_LANCZOS */
static const cv_op_method *const eigen_methods[] = {&eigen_lanczos, &eigen_power,
                                                    &cv_method_eigen_gram, &eigen_block, NULL};

/* ---- density -------------------------------------------------------------- */

typedef struct {
    cv_op_base base;
    cv_density_options o;
} density_args;

#define DENS(f) offsetof(density_args, o.f)
static const cv_opt_spec density_opts[] = {
    {"lanczos_steps", CV_OPT_INT, 1, 1e5, NULL, DENS(lanczos_steps), NULL},
    {"runs", CV_OPT_INT, 1, 1e4, NULL, DENS(runs), NULL},
    {"grid_points", CV_OPT_INT, 2, 1e6, NULL, DENS(grid_points), NULL},
    {"sigma2", CV_OPT_NUM, 1e-300, BIG, NULL, DENS(sigma2), NULL},
    {"margin", CV_OPT_NUM, 0, BIG, NULL, DENS(margin), NULL},
    CV_OPT_MC(density_args),
    CV_OPT_KRON(density_args),
    CV_OPT_END};
CV_OPT_TABLE_FITS(density_opts);

static void density_defaults(void *p, int method)
{
    cv_density_options_default(&((density_args *)p)->o);
}

static int run_density(cv_op_ctx *c, const cv_block *b, cJSON *out, cv_err *e)
{
    cv_density_options o = ((const density_args *)c->opts->args)->o;
    int x = cv_op_kron_density(c, b, &o, out, e);
    if (x)
        return x < 0 ? -1 : 0;
    cv_linop op;
    cv_curv_linop_ctx lc;
    cv_rng r;
    linop_and_rng(c, b, 4, &op, &lc, &r);
    cv_density_result res;
    if (cv_density_slq(&op, &o, &r, &res, e))
        return -1;
    cJSON *d = cJSON_AddObjectToObject(out, "density");
    cJSON_AddItemToObject(d, "grid", cv_json_doubles(res.grid, (size_t)res.grid_points));
    cJSON_AddItemToObject(d, "values", cv_json_doubles(res.values, (size_t)res.grid_points));
    cJSON_AddItemToObject(out, "nodes", cv_json_columns(res.nodes, (size_t)res.steps, res.runs));
    cJSON_AddItemToObject(out, "weights",
                          cv_json_columns(res.weights, (size_t)res.steps, res.runs));
    cJSON_AddNumberToObject(out, "sigma2", res.sigma2_used);
    cJSON_AddNumberToObject(out, "lanczos_steps", res.steps);
    cJSON_AddNumberToObject(out, "reorthogonalized_steps", (double)res.reorths);
    cv_density_result_free(&res);
    return 0;
}

/* ---- solve ---------------------------------------------------------------- */

typedef struct {
    cv_op_base base;
    cv_solve_options o;
    int method;             /* cv_solve_method: cg, minres, lsmr, neumann */
    cv_opt_choice_list rhs; /* choice 0: "gradient"; -1: the list (D numbers, checked at bind) */
} solve_args;

static const cv_opt_spec solve_opts[] = {
    {"damping", CV_OPT_NUM, -BIG, BIG, NULL, offsetof(solve_args, o.damping), NULL},
    {"rhs", CV_OPT_ENUM_OR_LIST, 0, 0, "gradient", offsetof(solve_args, rhs), NULL},
    {"tol", CV_OPT_NUM, 0, 1, NULL, offsetof(solve_args, o.tol), NULL},
    {"max_iter", CV_OPT_INT, 1, 1e7, NULL, offsetof(solve_args, o.max_iter), NULL},
    {"method", CV_OPT_METHOD, 0, 0, NULL, offsetof(solve_args, method), NULL},
    {"scale", CV_OPT_NUM, 1e-300, BIG, NULL, offsetof(solve_args, o.scale), "neumann"},
    {"num_terms", CV_OPT_INT, 0, 1e6, NULL, offsetof(solve_args, o.num_terms), "neumann"},
    CV_OPT_MC(solve_args),
    CV_OPT_KRON(solve_args),
    CV_OPT_END};
CV_OPT_TABLE_FITS(solve_opts);

static void solve_defaults(void *p, int method)
{
    solve_args *a = p;
    cv_solve_options_default(&a->o);
    a->rhs.choice = 0;
}

/* The right-hand side on block b: the gradient, or the job's list (its
 * length was checked against b->dim when the job was bound). */
/* k > 1 right-hand sides (rhs: k x D numbers): cv_solve_many (CG in lockstep,
 * or block CG);
 * results solutions / residuals / iterations_per_rhs / converged_per_rhs, and
 * iterations (the most) and converged (all). */
static int run_solve_many(cv_op_ctx *c, const cv_block *b, const cv_solve_options *o, int k,
                          const double *B, cJSON *out, cv_err *e)
{
    cv_linop op;
    cv_curv_linop_ctx lc;
    cv_op_linop(c, b, &op, &lc);
    cv_solve_result *res = calloc((size_t)k, sizeof *res);
    if (!res)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "%d solutions", k);
    if (cv_solve_many(&op, k, B, o, res, e)) {
        free(res);
        return -1;
    }
    cJSON *sol = cJSON_CreateArray(), *rs = cJSON_CreateArray(), *its = cJSON_CreateArray(),
          *cv = cJSON_CreateArray();
    int most = 0, all = 1;
    for (int j = 0; j < k; j++) {
        cJSON_AddItemToArray(sol, cv_json_doubles(res[j].x, res[j].n));
        cJSON_AddItemToArray(rs, cJSON_CreateNumber(res[j].residual));
        cJSON_AddItemToArray(its, cJSON_CreateNumber(res[j].iterations));
        cJSON_AddItemToArray(cv, cJSON_CreateBool(res[j].converged));
        most = res[j].iterations > most ? res[j].iterations : most;
        all = all && res[j].converged;
        cv_solve_result_free(&res[j]);
    }
    free(res);
    cJSON_AddStringToObject(out, "method", cv_solve_method_name(o->method));
    cJSON_AddItemToObject(out, "solutions", sol);
    cJSON_AddItemToObject(out, "residuals", rs);
    cJSON_AddItemToObject(out, "iterations_per_rhs", its);
    cJSON_AddItemToObject(out, "converged_per_rhs", cv);
    cJSON_AddNumberToObject(out, "iterations", most);
    cJSON_AddBoolToObject(out, "converged", all);
    return 0;
}

/* The right-hand side on block b: the gradient, or the job's list (D numbers,
 * or k x D for k systems; checked against b->dim when the job was bound). */
static int run_solve(cv_op_ctx *c, const cv_block *b, cJSON *out, cv_err *e)
{
    const solve_args *a = c->opts->args;
    cv_solve_options o = a->o;
    o.method = (cv_solve_method)a->method;
    size_t n = a->rhs.choice < 0 ? (size_t)a->rhs.list.n : b->dim;
    if (!b->dim || n % b->dim || !n)
        return cv_err_set(e, CV_EINTERNAL, "internal", "options.rhs", "rhs not bound to the block");
    if (n > b->dim)
        return run_solve_many(c, b, &o, (int)(n / b->dim), a->rhs.list.v, out, e);
    double *rhs = malloc(sizeof(double) * b->dim);
    if (!rhs)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "right-hand side");
    int rc = 0;
    if (a->rhs.choice < 0)
        memcpy(rhs, a->rhs.list.v, sizeof(double) * b->dim);
    else
        rc = cv_curv_gradient(c->curv, b, rhs, e);
    cv_linop op;
    cv_curv_linop_ctx lc;
    cv_op_linop(c, b, &op, &lc);
    cv_solve_result res;
    int x = rc ? 0 : cv_op_kron_solve(c, b, rhs, o.damping, out, e);
    if (x) {
        free(rhs);
        return x < 0 ? -1 : 0;
    }
    if (!rc)
        rc = cv_solve(&op, rhs, &o, &res, NULL, e);
    free(rhs);
    if (rc)
        return -1;
    cJSON_AddStringToObject(out, "method", cv_solve_method_name(o.method));
    cJSON_AddItemToObject(out, "solution", cv_json_doubles(res.x, res.n));
    cJSON_AddNumberToObject(out, "residual", res.residual);
    cJSON_AddNumberToObject(out, "iterations", res.iterations);
    cJSON_AddBoolToObject(out, "converged", res.converged);
    cv_solve_result_free(&res);
    return 0;
}

/* indices = cv_solve_method */
static const cv_op_method solve_cg = {"cg", run_solve, NULL, NULL, NULL};
static const cv_op_method solve_minres = {"minres", run_solve, NULL, NULL, NULL};
static const cv_op_method solve_lsmr = {"lsmr", run_solve, NULL, NULL, NULL};
static const cv_op_method solve_neumann = {"neumann", run_solve, NULL, NULL, NULL};
static const cv_op_method solve_block_cg = {"block_cg", run_solve, NULL, NULL, NULL};
static const cv_op_method *const solve_methods[] = {&solve_cg,      &solve_minres,   &solve_lsmr,
                                                    &solve_neumann, &solve_block_cg, NULL};

/* ---- newton ----------------------------------------------------------------- */

#define NEWT(f) offsetof(cv_newton_args, f)
static const cv_opt_spec newton_opts[] = {
    {"method", CV_OPT_METHOD, 0, 0, NULL, NEWT(method), NULL},
    {"damping", CV_OPT_NUM_OR_ENUM, -BIG, BIG, "bootstrap", NEWT(damping), NULL},
    {"k", CV_OPT_INT_OR_ENUM, 1, 1e6, "all", NEWT(k), "vivit"},
    {"tol", CV_OPT_NUM, 0, 1, NULL, NEWT(o.tol), NULL},
    {"max_iter", CV_OPT_INT, 1, 1e7, NULL, NEWT(o.max_iter), NULL},
    {"actual_change", CV_OPT_BOOL, 0, 0, NULL, NEWT(actual_change), NULL},
    {"mode", CV_OPT_ENUM, 0, 0, "directional|full", NEWT(mode), "vivit"},
    {"grid", CV_OPT_LIST, 0, 0, NULL, NEWT(grid), "vivit"},
    {"bootstrap_samples", CV_OPT_INT, 1, 1e5, NULL, NEWT(bootstrap_samples), "vivit"},
    {"damping_mode", CV_OPT_ENUM, 0, 0, "exact|factored", NEWT(damping_mode), "kfac|ekfac|kfra"},
    {"scale", CV_OPT_NUM, 1e-300, BIG, NULL, NEWT(o.scale), "neumann"},
    {"num_terms", CV_OPT_INT, 0, 1e6, NULL, NEWT(o.num_terms), "neumann"},
    {"rescale", CV_OPT_BOOL, 0, 0, NULL, NEWT(rescale), "kfac|ekfac|kfra|acp"},
    {"acp_alpha", CV_OPT_NUM_OR_ENUM, 1e-300, 1e300, "max", NEWT(acp_alpha), "acp"},
    CV_OPT_VIVIT(cv_newton_args, "vivit"),
    CV_OPT_MC(cv_newton_args),
    CV_OPT_KRON(cv_newton_args),
    CV_OPT_END};
CV_OPT_TABLE_FITS(newton_opts);

static void newton_defaults(void *p, int method)
{
    cv_newton_args *a = p;
    cv_solve_options_default(&a->o);
    a->damping.num = method == CV_NEWTON_VIVIT ? 1.0 : a->o.damping;
    a->damping.choice = -1;
    a->k.choice = -1;
    a->acp_alpha.choice = 0; /* "max" */
    a->mode = CV_NEWTON_DIRECTIONAL;
    cv_vivit_args_default(&a->vivit);
}

static int check_newton(const cv_opts *opts, cv_curvature kind, cv_err *e)
{
    const cv_newton_args *a = opts->args;
    if (a->method != CV_NEWTON_VIVIT && a->damping.choice >= 0)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.damping",
                          "damping \"bootstrap\" needs method vivit");
    return 0;
}

static int run_newton(cv_op_ctx *c, const cv_block *b, cJSON *out, cv_err *e)
{
    const cv_newton_args *a = c->opts->args;
    double *g = malloc(sizeof(double) * b->dim);
    if (!g)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "gradient");
    int rc = cv_curv_gradient(c->curv, b, g, e);
    cv_solve_options o = a->o;
    o.method = (cv_solve_method)cv_solve_method_from_name(c->method); /* cg..neumann */
    o.damping = a->damping.num;
    cv_linop op;
    cv_curv_linop_ctx lc;
    cv_op_linop(c, b, &op, &lc);
    cv_newton_result res;
    if (!rc)
        rc = cv_newton_step(&op, g, &o, &res, e);
    free(g);
    if (rc)
        return -1;
    cJSON_AddStringToObject(out, "method", cv_solve_method_name(o.method));
    cJSON_AddNumberToObject(out, "damping", o.damping);
    cJSON_AddItemToObject(out, "step", cv_json_doubles(res.step, res.n));
    cJSON_AddNumberToObject(out, "predicted_change", res.predicted_change);
    cJSON_AddNumberToObject(out, "residual", res.residual);
    cJSON_AddNumberToObject(out, "iterations", res.iterations);
    cJSON_AddBoolToObject(out, "converged", res.converged);
    rc = cv_op_add_actual_change(c, b, res.step, a->actual_change, out, e);
    cv_newton_result_free(&res);
    return rc;
}

/* indices: CV_NEWTON_CG, CV_NEWTON_MINRES, CV_NEWTON_VIVIT, CV_NEWTON_KFAC,
 * CV_NEWTON_EKFAC, CV_NEWTON_KFRA, CV_NEWTON_ACP, CV_NEWTON_LSMR, CV_NEWTON_NEUMANN
 * (run_newton maps cg, minres, lsmr, neumann to cv_solve_method by name) */
static const cv_op_method newton_cg = {"cg", run_newton, NULL, NULL, NULL};
static const cv_op_method newton_minres = {"minres", run_newton, NULL, NULL, NULL};
static const cv_op_method newton_lsmr = {"lsmr", run_newton, NULL, NULL, NULL};
static const cv_op_method newton_neumann = {"neumann", run_newton, NULL, NULL, NULL};
static const cv_op_method *const newton_methods[] = {&newton_cg, &newton_minres,
                                                     &cv_method_newton_vivit,
                                                     &cv_method_newton_kfac,
                                                     &cv_method_newton_ekfac,
                                                     &cv_method_newton_kfra,
                                                     &cv_method_newton_acp, &newton_lsmr,
                                                     &newton_neumann, NULL};

/* ---- the op table entries ------------------------------------------------- */

#define FACTOR_RESULTS                                                                     \
    "columns", "curvature_samples", "mc_columns", "gram_path", "curvature_indices", "rank", \
        "threshold", "lambda_max"
static const char *const trace_results[] = {"method", "trace",  "stderr", "probes", "sketch",
                                            "samples", "logdet", CV_KRON_RESULTS, NULL};
static const char *const frob_results[] = {"method", "frobenius_norm", "frobenius_norm_squared",
                                           "stderr", "probes", "samples", CV_KRON_RESULTS, NULL};
static const char *const diag_results[] = {"method", "diag",     "stderr",          "trace",
                                           "probes", "backprop", "per_sample_diag", CV_KRON_RESULTS,
                                           NULL};
static const char *const eigen_results[] = {
    "method",     "which",        "eigenvalues", "residuals", "converged",
    "iterations", "eigenvectors", FACTOR_RESULTS, CV_KRON_RESULTS, NULL};
static const char *const density_results[] = {
    "density", "nodes", "weights", "sigma2", "lanczos_steps", "reorthogonalized_steps",
    CV_KRON_RESULTS, NULL};
static const char *const solve_results[] = {
    "method",    "solution",  "residual",           "iterations", "converged",
    "solutions", "residuals", "iterations_per_rhs", "converged_per_rhs", CV_KRON_RESULTS, NULL};
static const char *const newton_results[] = {
    "method",    "damping",       "step", "predicted_change", "residual",
    "iterations", "converged",    "actual_change", "mode", "k", "directions", "dampings",
    "damping_mode", "alpha", "acp_alpha",
    FACTOR_RESULTS, CV_KRON_RESULTS, NULL};

/* ---- memory (cv_op_memory_fn): the estimators' own vectors ------------------
 * (estimators.h: a block of columns costs two n x block buffers; a Lanczos
 * run keeps its basis in float32, and in double when vectors are returned) */

static int est_block(size_t dim, long probes) { return cv_est_block_size(dim, 0, probes); }

static void mem_set(cv_op_memory *m, double dvectors, double fvectors, size_t dim, int k)
{
    m->vector_bytes = cv_op_bytes((dvectors * sizeof(double) + fvectors * sizeof(float)) *
                               (double)dim);
    m->max_vectors = k;
    m->pairs = 0;
}

/* A Kronecker curvature's factors, with their eigendecompositions when the
 * op's exact path keeps them (flags: api/op_kron.h cv_op_kron_memory). */
static void mem_kron(const cv_opts *o, cv_curvature kind, int C, int flags, cv_op_memory *m)
{
    const cv_op_base *base = o->args;
    cv_op_kron_memory(kind, base->fisher_type, base->mc_samples, C, flags, m);
}

static void mem_trace(const cv_opts *o, cv_curvature kind, const cv_block *b, size_t n, int C, cv_op_memory *m)
{
    const trace_args *a = o->args;
    int blk = est_block(b->dim, a->o.max_probes);
    double sketch = a->method == 1   ? 2.0 * (a->o.max_probes / 3 + 1)
                    : a->method == 2 ? 6.0 * (a->o.max_probes / 2 + 1)  /* xtrace: W Y Q Z + AP */
                    : a->method == 3 ? 2.0 * (a->o.max_probes + 1)      /* xnystrace: W Y */
                                     : 0;
    mem_set(m, 2.0 * blk + 2 + sketch, 0, b->dim, blk);
    mem_kron(o, kind, C, CV_OP_KRON_MEM_EIGEN, m); /* logdet */
}

static void mem_frob(const cv_opts *o, cv_curvature kind, const cv_block *b, size_t n, int C,
                     cv_op_memory *m)
{
    const trace_args *a = o->args;
    int blk = est_block(b->dim, a->o.max_probes);
    double x = a->method == 1 ? 3.0 * (a->o.max_probes / 2 + 1) : 0;
    mem_set(m, 2.0 * blk + 2 + x, 0, b->dim, blk);
    mem_kron(o, kind, C, 0, m);
}

static void mem_diag(const cv_opts *o, cv_curvature kind, const cv_block *b, size_t n, int C, cv_op_memory *m)
{
    const diag_args *a = o->args;
    int blk = est_block(b->dim, a->method == 1 ? (long)b->dim : a->o.max_probes);
    double sketch = a->method == 2 ? 7.0 * (a->o.max_probes / 2 + 1) : 0; /* xdiag */
    double rows = a->per_sample ? (double)n + 1 : 0; /* per-sample diagonals and their sum */
    mem_set(m, 2.0 * blk + 3 + sketch + rows, 0, b->dim, blk);
    mem_kron(o, kind, C, 0, m);
}

static void mem_eigen(const cv_opts *o, cv_curvature kind, const cv_block *b, size_t n, int C, cv_op_memory *m)
{
    const cv_eigen_args *a = o->args;
    int k = a->o.k;
    if (a->method == CV_EIGEN_POWER) {
        mem_set(m, 2.0 * k + 4, 0, b->dim, 1);
    } else if (a->method == CV_EIGEN_BLOCK_LANCZOS) { /* a double basis, blocks of p */
        double p = a->block_size, steps = a->o.max_iter > 0 ? a->o.max_iter
                                                            : (10.0 * k > 100 ? 10.0 * k : 100);
        if (steps > (double)b->dim)
            steps = (double)b->dim;
        mem_set(m, steps + 3 * p + 2.0 * k, 0, b->dim, (int)p);
    } else {
        double steps = a->o.max_iter > 0 ? a->o.max_iter : (10.0 * k > 100 ? 10.0 * k : 100);
        if (steps > (double)b->dim)
            steps = (double)b->dim;
        mem_set(m, (a->o.return_vectors ? steps + k : 0) + 4, steps, b->dim, 1);
    }
    mem_kron(o, kind, C, CV_OP_KRON_MEM_EIGEN, m);
}

static void mem_density(const cv_opts *o, cv_curvature kind, const cv_block *b, size_t n, int C,
                        cv_op_memory *m)
{
    const density_args *a = o->args;
    double steps = a->o.lanczos_steps < (double)b->dim ? a->o.lanczos_steps : (double)b->dim;
    mem_set(m, 4, steps, b->dim, 1);
    mem_kron(o, kind, C, CV_OP_KRON_MEM_EIGEN, m);
}

static void mem_solve(const cv_opts *o, cv_curvature kind, const cv_block *b, size_t n, int C, cv_op_memory *m)
{
    const solve_args *a = o->args; /* k right-hand sides: 6k vectors for CG in lockstep, */
    double k = a->rhs.choice < 0 && b->dim ? (double)a->rhs.list.n / (double)b->dim : 1;
    double per = a->method == CV_SOLVE_BLOCK_CG ? 7 : 6; /* 7k for block CG */
    mem_set(m, k > 1 ? per * k + 2 : 12, 0, b->dim, k > 16 ? 16 : (int)k); /* LSMR: 10 */
    mem_kron(o, kind, C, CV_OP_KRON_MEM_EIGEN, m);
}

/* newton: the Kronecker methods keep the factors' eigendecompositions (acp:
 * its alpha's walk, or none with a given alpha); cg / minres on a Kronecker
 * curvature apply it forward only. */
static void mem_newton(const cv_opts *o, cv_curvature kind, const cv_block *b, size_t n, int C,
                       cv_op_memory *m)
{
    const cv_newton_args *a = o->args;
    mem_set(m, 12, 0, b->dim, 1);
    int kron = a->method >= CV_NEWTON_KFAC && a->method <= CV_NEWTON_ACP;
    int flags = kron ? CV_OP_KRON_MEM_EIGEN : 0;
    if (a->method == CV_NEWTON_ACP)
        flags |= a->acp_alpha.choice < 0 ? CV_OP_KRON_MEM_ACP_GIVEN : CV_OP_KRON_MEM_ACP_MAX;
    mem_kron(o, kind, C, flags, m);
}

const cv_op_def cv_op_trace = {"trace", trace_opts, trace_methods, sizeof(trace_args),
                               trace_defaults, 1, 1, NULL, NULL, trace_results, NULL, mem_trace, NULL};
const cv_op_def cv_op_diag = {"diag", diag_opts, diag_methods, sizeof(diag_args),
                              diag_defaults, 1, 1, check_diag, NULL, diag_results, NULL, mem_diag,
                              NULL};
const cv_op_def cv_op_frobenius = {"frobenius_norm", trace_opts, frob_methods,
                                   sizeof(trace_args), trace_defaults, 1, 1, NULL, NULL,
                                   frob_results, NULL, mem_frob, NULL};
const cv_op_def cv_op_eigen = {"eigen", eigen_opts, eigen_methods, sizeof(cv_eigen_args),
                               eigen_defaults, 1, 1, check_eigen, NULL, eigen_results,
                               bind_eigen, mem_eigen, NULL};
const cv_op_def cv_op_density = {"density", density_opts, NULL, sizeof(density_args),
                                 density_defaults, 1, 1, NULL, run_density, density_results, NULL,
                                 mem_density, NULL};
const cv_op_def cv_op_solve = {"solve", solve_opts, solve_methods, sizeof(solve_args),
                               solve_defaults, 1, 1, NULL, NULL, solve_results, NULL, mem_solve, NULL};
const cv_op_def cv_op_newton = {"newton", newton_opts, newton_methods, sizeof(cv_newton_args),
                                newton_defaults, 1, 1, check_newton, NULL, newton_results, NULL,
                                mem_newton, NULL};
