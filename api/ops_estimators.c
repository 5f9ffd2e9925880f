/* ops_estimators.c - the estimator ops (trace, diag, eigen, density, solve,
 * newton) mapping job options onto engine/estimators.h and results to JSON. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "api/ops.h"
#include "engine/estimators.h"

#define END {NULL, 0, 0, 0, NULL}
#define MC_OPT {"mc_samples", CV_OPT_INT, 1, 1e6, NULL}
#define BIG 1e9

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

/* The random stream of an op (salt: one per op) on block b. */
static void seed_rng(const cv_op_ctx *c, const cv_block *b, cv_rng *r, uint64_t salt)
{
    cv_rng_seed_stream(r, c->seed, salt | block_key(c, b) << 8);
}

/* ---- trace ---------------------------------------------------------------- */

static const cv_opt_spec trace_opts[] = {
    {"method", CV_OPT_ENUM, 0, 0, "hutchinson|hutch++"},
    {"max_probes", CV_OPT_INT, 1, 1e6, NULL},
    {"tol", CV_OPT_NUM, 0, 1, NULL},
    {"distribution", CV_OPT_ENUM, 0, 0, "rademacher|gaussian"},
    {"return_samples", CV_OPT_BOOL, 0, 0, NULL},
    MC_OPT,
    END};

static int check_trace(const cJSON *o, cv_err *e)
{
    if (strcmp(cv_opt_str(o, "method", "hutchinson"), "hutch++") != 0)
        return 0;
    if (cv_opt_int(o, "max_probes", 100) < 3)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.max_probes",
                          "hutch++ needs a budget of at least 3 matvecs (options.max_probes)");
    /* Hutch++ has no stopping rule (it spends max_probes); tol 0 says that. */
    if (cv_opt_num(o, "tol", 0) > 0)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.tol",
                          "hutch++ always spends its budget of max_probes matvecs: tol applies "
                          "to method hutchinson only (omit it, or give 0)");
    return 0;
}

static int run_trace(cv_op_ctx *c, const cv_block *b, cJSON *out, cv_err *e)
{
    cv_trace_options o;
    cv_trace_options_default(&o);
    o.max_probes = cv_opt_int(c->options, "max_probes", o.max_probes);
    const char *method = cv_opt_str(c->options, "method", "hutchinson");
    int pp = strcmp(method, "hutch++") == 0;
    o.tol = cv_opt_num(c->options, "tol", o.tol); /* Hutch++ has no stopping rule */
    o.distribution = cv_probe_dist_from_name(cv_opt_str(c->options, "distribution",
                                                        "rademacher"));
    o.return_samples = cv_opt_bool(c->options, "return_samples", 0);
    cv_linop op;
    cv_curv_linop_ctx lc;
    cv_op_linop(c, b, &op, &lc);
    cv_rng r;
    seed_rng(c, b, &r, 1);
    cv_trace_result res;
    int rc = pp ? cv_trace_hutchpp(&op, &o, &r, &res, e)
                : cv_trace_hutchinson(&op, &o, &r, &res, e);
    if (rc)
        return -1;
    cJSON_AddStringToObject(out, "method", method);
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

/* ---- diag ----------------------------------------------------------------- */

static const cv_opt_spec diag_opts[] = {
    {"method", CV_OPT_ENUM, 0, 0, "hutchinson|exact"},
    {"max_probes", CV_OPT_INT, 1, 1e6, NULL},
    {"distribution", CV_OPT_ENUM, 0, 0, "rademacher|gaussian"},
    MC_OPT,
    END};

static int run_diag(cv_op_ctx *c, const cv_block *b, cJSON *out, cv_err *e)
{
    cv_diag_options o;
    cv_diag_options_default(&o);
    o.max_probes = cv_opt_int(c->options, "max_probes", o.max_probes);
    o.distribution = cv_probe_dist_from_name(cv_opt_str(c->options, "distribution",
                                                        "rademacher"));
    const char *method = cv_opt_str(c->options, "method", "hutchinson");
    int exact = strcmp(method, "exact") == 0;
    if (exact && b->dim > c->lim->dense_max)
        return cv_err_set(e, CV_ETOOLARGE, "too_large", "options.method",
                          "the exact diagonal needs %zu matvecs; allowed up to the dense "
                          "limit %zu (use method hutchinson)",
                          b->dim, c->lim->dense_max);
    cv_linop op;
    cv_curv_linop_ctx lc;
    cv_op_linop(c, b, &op, &lc);
    cv_rng r;
    seed_rng(c, b, &r, 2);
    cv_diag_result res;
    if (exact ? cv_diag_exact(&op, &o, &res, e) : cv_diag_hutchinson(&op, &o, &r, &res, e))
        return -1;
    cJSON_AddStringToObject(out, "method", method);
    cJSON_AddItemToObject(out, "diag", cv_json_doubles(res.diag, res.n));
    cJSON_AddItemToObject(out, "stderr", cv_json_doubles(res.std_err, res.n));
    double tr = 0;
    for (size_t i = 0; i < res.n; i++)
        tr += res.diag[i];
    cJSON_AddNumberToObject(out, "trace", tr);
    cJSON_AddNumberToObject(out, "probes", res.probes);
    cv_diag_result_free(&res);
    return 0;
}

/* ---- eigen ---------------------------------------------------------------- */

static const cv_opt_spec eigen_opts[] = {
    {"k", CV_OPT_INT, 1, 1e6, NULL},
    {"which", CV_OPT_ENUM, 0, 0, "largest|smallest|magnitude"},
    {"method", CV_OPT_ENUM, 0, 0, "lanczos|power|gram"},
    {"max_iter", CV_OPT_INT, 1, 1e7, NULL},
    {"tol", CV_OPT_NUM, 0, 1, NULL},
    {"return_vectors", CV_OPT_BOOL, 0, 0, NULL},
    {"threshold", CV_OPT_NUM, 0, BIG, NULL},
    {"mc", CV_OPT_BOOL, 0, 0, NULL},
    {"subsample", CV_OPT_NUM, 1e-9, 1, NULL},
    MC_OPT,
    END};

static int check_eigen(const cJSON *o, cv_err *e)
{
    const char *m = cv_opt_str(o, "method", "lanczos");
    if (strcmp(m, "power") == 0 && strcmp(cv_opt_str(o, "which", "largest"), "smallest") == 0)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.which",
                          "power iteration finds dominant eigenvalues only; use method "
                          "lanczos for which=smallest");
    if (strcmp(m, "gram") != 0 && (cv_opt_get(o, "threshold") || cv_opt_get(o, "mc") ||
                                    cv_opt_get(o, "subsample")))
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.method",
                          "threshold, mc and subsample apply to method gram only");
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

static int run_eigen(cv_op_ctx *c, const cv_block *b, cJSON *out, cv_err *e)
{
    const char *method = cv_opt_str(c->options, "method", "lanczos");
    if (strcmp(method, "gram") == 0)
        return cv_op_eigen_gram(c, b, out, e);
    int power = strcmp(method, "power") == 0;
    cv_eigen_options o;
    if (power)
        cv_power_options_default(&o);
    else
        cv_eigen_options_default(&o);
    o.k = cv_opt_int(c->options, "k", 1);
    o.which = cv_which_from_name(cv_opt_str(c->options, "which", "largest"));
    o.max_iter = cv_opt_int(c->options, "max_iter", o.max_iter);
    o.tol = cv_opt_num(c->options, "tol", o.tol);
    o.return_vectors = cv_opt_bool(c->options, "return_vectors", 0);
    if ((size_t)o.k > b->dim)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.k",
                          "k = %d exceeds the block dimension %zu", o.k, b->dim);
    cv_linop op;
    cv_curv_linop_ctx lc;
    cv_op_linop(c, b, &op, &lc);
    cv_rng r;
    seed_rng(c, b, &r, 3);
    cv_eigen_result res;
    if (power ? cv_eigen_power(&op, &o, &r, &res, e) : cv_eigen_lanczos(&op, &o, &r, &res, e))
        return -1;
    eigen_json(&res, method, o.which, out);
    cv_eigen_result_free(&res);
    return 0;
}

/* ---- density -------------------------------------------------------------- */

static const cv_opt_spec density_opts[] = {
    {"lanczos_steps", CV_OPT_INT, 1, 1e5, NULL},
    {"runs", CV_OPT_INT, 1, 1e4, NULL},
    {"grid_points", CV_OPT_INT, 2, 1e6, NULL},
    {"sigma2", CV_OPT_NUM, 1e-300, BIG, NULL},
    {"margin", CV_OPT_NUM, 0, BIG, NULL},
    MC_OPT,
    END};

static int run_density(cv_op_ctx *c, const cv_block *b, cJSON *out, cv_err *e)
{
    cv_density_options o;
    cv_density_options_default(&o);
    o.lanczos_steps = cv_opt_int(c->options, "lanczos_steps", o.lanczos_steps);
    o.runs = cv_opt_int(c->options, "runs", o.runs);
    o.grid_points = cv_opt_int(c->options, "grid_points", o.grid_points);
    o.sigma2 = cv_opt_num(c->options, "sigma2", o.sigma2);
    o.margin = cv_opt_num(c->options, "margin", o.margin);
    cv_linop op;
    cv_curv_linop_ctx lc;
    cv_op_linop(c, b, &op, &lc);
    cv_rng r;
    seed_rng(c, b, &r, 4);
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

/* ---- solve / newton ------------------------------------------------------- */

static const cv_opt_spec solve_opts[] = {
    {"damping", CV_OPT_NUM, -BIG, BIG, NULL},
    {"rhs", CV_OPT_NUM_OR_ENUM, 0, 0, "gradient"},
    {"tol", CV_OPT_NUM, 0, 1, NULL},
    {"max_iter", CV_OPT_INT, 1, 1e7, NULL},
    {"method", CV_OPT_ENUM, 0, 0, "cg|minres"},
    MC_OPT,
    END};

static int check_solve(const cJSON *o, cv_err *e)
{
    const cJSON *rhs = cv_opt_get(o, "rhs");
    if (rhs && !cJSON_IsString(rhs) && !cJSON_IsArray(rhs))
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.rhs",
                          "rhs must be \"gradient\" or a list of numbers");
    return 0;
}

static void solve_options(const cv_op_ctx *c, cv_solve_options *o)
{
    cv_solve_options_default(o);
    o->method = cv_solve_method_from_name(cv_opt_str(c->options, "method", "cg"));
    o->damping = cv_opt_num(c->options, "damping", o->damping);
    o->tol = cv_opt_num(c->options, "tol", o->tol);
    o->max_iter = cv_opt_int(c->options, "max_iter", o->max_iter);
}

static int run_solve(cv_op_ctx *c, const cv_block *b, cJSON *out, cv_err *e)
{
    double *rhs = malloc(sizeof(double) * b->dim);
    if (!rhs)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "right-hand side");
    const cJSON *rv = cv_opt_get(c->options, "rhs");
    int rc = rv && cJSON_IsArray(rv) ? cv_json_to_doubles(rv, b->dim, rhs, "options.rhs", e)
                                     : cv_curv_gradient(c->curv, b, rhs, e);
    cv_solve_options o;
    solve_options(c, &o);
    cv_linop op;
    cv_curv_linop_ctx lc;
    cv_op_linop(c, b, &op, &lc);
    cv_solve_result res;
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

static const cv_opt_spec newton_opts[] = {
    {"method", CV_OPT_ENUM, 0, 0, "cg|minres|vivit"},
    {"damping", CV_OPT_NUM_OR_ENUM, -BIG, BIG, "bootstrap"},
    {"k", CV_OPT_INT_OR_ENUM, 1, 1e6, "all"},
    {"tol", CV_OPT_NUM, 0, 1, NULL},
    {"max_iter", CV_OPT_INT, 1, 1e7, NULL},
    {"actual_change", CV_OPT_BOOL, 0, 0, NULL},
    {"mode", CV_OPT_ENUM, 0, 0, "directional|full"},
    {"grid", CV_OPT_LIST, 0, 0, NULL},
    {"bootstrap_samples", CV_OPT_INT, 1, 1e5, NULL},
    {"threshold", CV_OPT_NUM, 0, BIG, NULL},
    {"mc", CV_OPT_BOOL, 0, 0, NULL},            /* vivit: MC factor columns */
    {"subsample", CV_OPT_NUM, 1e-9, 1, NULL},   /* vivit: curvature on a batch fraction */
    MC_OPT,
    END};

static int check_newton(const cJSON *o, cv_err *e)
{
    int vivit = strcmp(cv_opt_str(o, "method", "cg"), "vivit") == 0;
    const cJSON *d = cv_opt_get(o, "damping");
    if (!vivit && d && cJSON_IsString(d))
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.damping",
                          "damping \"bootstrap\" needs method vivit");
    if (!vivit && (cv_opt_get(o, "k") || cv_opt_get(o, "mode") || cv_opt_get(o, "grid") ||
                   cv_opt_get(o, "bootstrap_samples") || cv_opt_get(o, "threshold") ||
                   cv_opt_get(o, "mc") || cv_opt_get(o, "subsample")))
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.method",
                          "k, mode, grid, bootstrap_samples, threshold, mc and subsample "
                          "apply to method vivit only");
    return 0;
}

int cv_op_add_actual_change(cv_op_ctx *c, const cv_block *b, const double *step, cJSON *out,
                             cv_err *e)
{
    if (!cv_opt_bool(c->options, "actual_change", 0))
        return 0;
    double after;
    if (cv_curv_loss_at(c->curv, b, step, &after, e))
        return -1;
    cJSON_AddNumberToObject(out, "actual_change", after - cv_curv_loss(c->curv));
    return 0;
}

static int run_newton(cv_op_ctx *c, const cv_block *b, cJSON *out, cv_err *e)
{
    if (strcmp(cv_opt_str(c->options, "method", "cg"), "vivit") == 0)
        return cv_op_newton_vivit(c, b, out, e);
    double *g = malloc(sizeof(double) * b->dim);
    if (!g)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "gradient");
    int rc = cv_curv_gradient(c->curv, b, g, e);
    cv_solve_options o;
    solve_options(c, &o);
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
    rc = cv_op_add_actual_change(c, b, res.step, out, e);
    cv_newton_result_free(&res);
    return rc;
}

const cv_op_def cv_op_trace = {"trace", trace_opts, 1, 1, check_trace, run_trace};
const cv_op_def cv_op_diag = {"diag", diag_opts, 1, 1, NULL, run_diag};
const cv_op_def cv_op_eigen = {"eigen", eigen_opts, 1, 1, check_eigen, run_eigen};
const cv_op_def cv_op_density = {"density", density_opts, 1, 1, NULL, run_density};
const cv_op_def cv_op_solve = {"solve", solve_opts, 1, 1, check_solve, run_solve};
const cv_op_def cv_op_newton = {"newton", newton_opts, 1, 1, check_newton, run_newton};
