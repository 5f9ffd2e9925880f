/* ops_vivit.c - the ViViT ops on engine/vivit.h: eigen with method "gram"
 * (cv_method_eigen_gram), newton with method "vivit" (cv_method_newton_vivit) and
 * the "snr" op (directional gradient/curvature SNR, per-layer gradient SNR).
 *
 * Curvature: "ggn" uses the exact loss-Hessian roots (C columns per sample),
 * "fisher_mc" (or options.mc with "ggn") mc_samples Monte Carlo columns per
 * sample drawn exactly as the engine draws fisher_mc; hessian and ef have no
 * such factor and are refused.  options.subsample keeps a seeded fraction of
 * the batch for the curvature (the gradients always use the whole batch);
 * the op has no sub-batch engine, so that sub-sampling shrinks the
 * eigenproblem but not the backpropagation.  Non-finite numbers (an SNR
 * with zero variance) are written as null.
 *
 * Every result carrying the factor says how its Gram was built: gram_path
 * "kernel" (per-layer kernels, V never formed) or "explicit" (V column by
 * column, for blocks with a layer that has no Gram kernel).
 * Defaults: eigen gram returns every eigenvalue above the threshold (k caps
 * it) and always the residuals |G e - lambda e| (the eigenvectors are formed
 * for them: 3k Jacobian passes; returned with return_vectors); snr uses the top
 * k = C directions; newton vivit: mode directional, k "all", damping 1.0 (or
 * "bootstrap": 100 resamples, 200-point log grid 1e-4..1e2, 5th percentile,
 * seeded from the job seed). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "api/op_args.h"
#include "api/op_util.h"
#include "api/ops.h"
#include "engine/vivit.h"

#define CV_VIVIT_SUB_SALT 0x5b5a3c1d2e4f6071ull
#define CV_VIVIT_BOOT_SALT 0xb0075a3917ull

/* ---- shared -------------------------------------------------------------- */

static void add_num(cJSON *o, const char *name, double x)
{
    if (isfinite(x))
        cJSON_AddNumberToObject(o, name, x);
    else
        cJSON_AddNullToObject(o, name);
}

static cJSON *json_nums(const double *v, size_t n)
{
    cJSON *a = cJSON_CreateArray();
    for (size_t i = 0; i < n; i++)
        cJSON_AddItemToArray(a, isfinite(v[i]) ? cJSON_CreateNumber(v[i]) : cJSON_CreateNull());
    return a;
}

/* rows x cols matrix stored column-major as a list of rows. */
static cJSON *json_rows(const double *v, int rows, int cols)
{
    cJSON *a = cJSON_CreateArray();
    for (int r = 0; r < rows; r++) {
        cJSON *row = cJSON_CreateArray();
        for (int c = 0; c < cols; c++)
            cJSON_AddItemToArray(row, cJSON_CreateNumber(v[(size_t)c * rows + r]));
        cJSON_AddItemToArray(a, row);
    }
    return a;
}

void cv_vivit_args_default(cv_vivit_args *a)
{
    a->mc = 0;
    a->threshold = -1;
    a->subsample = 1.0;
}

/* Submit-time check of every ViViT op and method: the curvature has a factor. */
static int check_curvature(cv_curvature kind, cv_err *e)
{
    if (kind == CV_CURV_GGN || kind == CV_CURV_FISHER_MC)
        return 0;
    return cv_err_set(e, CV_EINVAL, "invalid_curvature", "curvature",
                      "ViViT works on the GGN's low-rank factor: curvature must be \"ggn\" "
                      "(exact) or \"fisher_mc\" (Monte Carlo columns), got \"%s\"%s",
                      cv_curvature_name(kind),
                      kind == CV_CURV_HESSIAN ? " (the default when the job gives none)" : "");
}

/* This rank's share (cv_comm_share) of the samples idx[0..count) of the
 * batch: all of them in one process; data-parallel, gathered from the ranks
 * that hold them, each rank keeping its share (agreed on: every rank
 * returns the same). */
static int subset_share(cv_curv *curv, const size_t *idx, size_t count, cv_batch *out,
                        cv_err *e)
{
    const cv_comm *cm = cv_curv_get_options(curv)->comm;
    if (!cv_comm_active(cm))
        return cv_curv_gather_samples(curv, idx, count, out, e);
    cv_batch all;
    if (cv_curv_gather_samples(curv, idx, count, &all, e))
        return -1;
    size_t first, n;
    cv_comm_share(count, cm->size, cm->rank, &first, &n);
    int rc = cv_batch_alloc(&all, n, out, e);
    for (size_t i = 0; i < n && !rc; i++)
        cv_batch_copy_sample(&all, first + i, out, i);
    cv_dataset_free(&all);
    if (rc)
        cv_dataset_free(out);
    if (cv_comm_agree(cm, rc, NULL, e)) {
        if (!rc)
            cv_dataset_free(out);
        return -1;
    }
    return 0;
}

/* Factor and Gram of block b with the op's ViViT settings va (subset is the
 * caller's buffer of batch-size ints, kept alive while v is used). */
static int build(cv_op_ctx *c, const cv_block *b, const cv_vivit_args *va, int *subset,
                 cv_vivit *v, cv_err *e)
{
    cv_vivit_options o;
    cv_vivit_options_default(&o);
    int mc = c->kind == CV_CURV_FISHER_MC || va->mc;
    o.mc = mc ? ((const cv_op_base *)c->opts->args)->mc_samples : 0;
    o.mc_seed = CV_OP_CURV_SEED(c->seed); /* the engine's fisher_mc draws */
    o.threshold = va->threshold;
    o.progress = c->progress;
    double frac = va->subsample;
    if (frac >= 1.0)
        return cv_vivit_init(v, c->curv, b, &o, e);
    int n = (int)cv_curv_batch_size(c->curv);
    o.n_subset = cv_vivit_subsample(n, frac, c->seed ^ CV_VIVIT_SUB_SALT, subset);
    o.subset = subset;
    /* an engine on just the sub-sampled samples: sub-sampling then saves
     * backpropagation too, not only the eigenproblem */
    cv_batch sb;
    size_t *idx = malloc(sizeof(size_t) * (size_t)o.n_subset);
    if (cv_curv_agree(c->curv, idx ? 0 : cv_err_set(e, CV_ENOMEM, "out_of_memory", "",
                                                    "sample subset"), e)) {
        free(idx);
        return -1;
    }
    for (int i = 0; i < o.n_subset; i++)
        idx[i] = (size_t)subset[i];
    int rc = subset_share(c->curv, idx, (size_t)o.n_subset, &sb, e);
    free(idx);
    if (rc)
        return -1;
    /* within the budget: beside the parent engine when what it holds leaves
     * room, else the parent gives up its kept states (it recomputes from then
     * on) and the sub-sample engine gets the rest; the op's vectors are the
     * parent's */
    cv_curv_options so = *cv_curv_get_options(c->curv);
    size_t budget = so.memory_budget;
    so.vector_bytes = 0;
    so.factor_bytes = 0;
    if (budget) {
        cv_curv_plan held, fits;
        cv_err ignored;
        cv_curv_memory(c->curv, &held);
        so.memory_budget = budget > held.peak_bytes ? budget - held.peak_bytes : 1;
        if (cv_curv_plan_memory(c->m, &sb, &so, &fits, &ignored)) {
            size_t keep = cv_curv_release_states(c->curv);
            so.memory_budget = budget > keep ? budget - keep : 1;
        }
    }
    o.subset_curv = cv_curv_new(c->m, &sb, &so, e);
    if (!o.subset_curv || cv_vivit_init(v, c->curv, b, &o, e)) {
        cv_curv_free(o.subset_curv);
        cv_dataset_free(&sb);
        return -1;
    }
    cv_vivit_adopt_subset(v, o.subset_curv, &sb);
    return 0;
}

/* build() with a subset buffer of its own: returns the buffer (free it after
 * cv_vivit_free(v)), or NULL with e set and nothing to free. */
static int *build_factor(cv_op_ctx *c, const cv_block *b, const cv_vivit_args *va, cv_vivit *v,
                         cv_err *e)
{
    int *subset = malloc(sizeof(int) * cv_curv_batch_size(c->curv));
    if (cv_curv_agree(c->curv, subset ? 0 : cv_err_set(e, CV_ENOMEM, "out_of_memory", "",
                                                       "sample subset"), e)) {
        free(subset);
        return NULL;
    }
    if (build(c, b, va, subset, v, e)) {
        free(subset);
        return NULL;
    }
    return subset;
}

/* Size of the factor (and the sub-sampled batch indices, the rows of the raw
 * lambda); after cv_vivit_eigh also the rank and threshold. */
static void factor_json(const cv_vivit *v, cJSON *out)
{
    cJSON_AddNumberToObject(out, "columns", v->R);
    cJSON_AddNumberToObject(out, "curvature_samples", v->ns);
    cJSON_AddNumberToObject(out, "mc_columns", v->mc);
    cJSON_AddStringToObject(out, "gram_path", cv_vivit_gram_path_name(v->gram_path));
    if (v->ns < v->n) {
        cJSON *idx = cJSON_AddArrayToObject(out, "curvature_indices");
        for (int i = 0; i < v->ns; i++)
            cJSON_AddItemToArray(idx, cJSON_CreateNumber(v->sub[i]));
    }
    if (v->gram)
        return;
    cJSON_AddNumberToObject(out, "rank", v->rank);
    cJSON_AddNumberToObject(out, "threshold", v->threshold_used);
    cJSON_AddNumberToObject(out, "lambda_max", v->lambda_max);
}

/* ---- eigen (method gram) --------------------------------------------------- */

/* residual_q = |G e_q - lambda_q e_q| with G e = V V^T e. */
static int gram_residuals(cv_vivit *v, int k, const double *E, double *res, cv_err *e)
{
    double *Y = malloc(sizeof(double) * (size_t)k * v->R);
    double *GE = malloc(sizeof(double) * (size_t)k * v->dim);
    int rc = Y && GE ? 0 : cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "residuals");
    if (!rc)
        rc = cv_vivit_apply_vt(v, k, E, Y, e);
    if (!rc)
        rc = cv_vivit_apply_v(v, k, Y, GE, e);
    for (int q = 0; q < k && !rc; q++) {
        double s = 0;
        for (size_t i = 0; i < v->dim; i++) {
            double d = GE[(size_t)q * v->dim + i] - v->eigenvalues[q] * E[(size_t)q * v->dim + i];
            s += d * d;
        }
        res[q] = sqrt(s);
    }
    free(Y);
    free(GE);
    return rc;
}

/* out.residuals = |G e_k - lambda_k e_k| of the top k pairs (the vectors are
 * formed for them), and out.eigenvectors when `vectors` is set. */
static int residuals_vectors_json(cv_vivit *v, int k, int vectors, cJSON *out, cv_err *e)
{
    double *E = malloc(sizeof(double) * (size_t)(k ? k : 1) * v->dim);
    double *res = malloc(sizeof(double) * (size_t)(k ? k : 1));
    int rc = E && res ? 0 : cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "eigenvectors");
    if (!rc)
        rc = cv_vivit_eigenvectors(v, k, E, e);
    if (!rc)
        rc = gram_residuals(v, k, E, res, e);
    if (!rc) {
        cJSON_AddItemToObject(out, "residuals", cv_json_doubles(res, (size_t)k));
        if (vectors)
            cJSON_AddItemToObject(out, "eigenvectors", cv_json_columns(E, v->dim, k));
    }
    free(E);
    free(res);
    return rc;
}

static int check_gram(const cv_opts *opts, cv_curvature kind, cv_err *e)
{
    if (((const cv_eigen_args *)opts->args)->o.which == CV_WHICH_SMALLEST)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.which",
                          "method gram gives the GGN's nonzero (largest) eigenvalues; use "
                          "method lanczos for which=smallest");
    return check_curvature(kind, e);
}

static int run_gram(cv_op_ctx *c, const cv_block *b, cJSON *out, cv_err *e)
{
    const cv_eigen_args *a = c->opts->args;
    cv_vivit v;
    int *subset = build_factor(c, b, &a->vivit, &v, e);
    if (!subset)
        return -1;
    int rc = cv_vivit_eigh(&v, e);
    int k = cv_opts_given(c->opts, "k") ? a->o.k : v.rank;
    k = k < v.rank ? k : v.rank;
    if (!rc) {
        cJSON_AddStringToObject(out, "method", "gram");
        cJSON_AddStringToObject(out, "which", cv_which_name(a->o.which));
        cJSON_AddItemToObject(out, "eigenvalues", cv_json_doubles(v.eigenvalues, (size_t)k));
        factor_json(&v, out);
        cJSON_AddNumberToObject(out, "converged", k);
        cJSON_AddNumberToObject(out, "iterations", 0);
    }
    if (!rc) /* residuals always (docs/interface.md, eigen), the vectors when asked */
        rc = residuals_vectors_json(&v, k, a->o.return_vectors, out, e);
    cv_vivit_free(&v);
    free(subset);
    return rc;
}

/* ---- memory (cv_op_memory_fn): the Gram matrix of R = n x (C or mc) columns,
 * its eigenvectors and k directions; micro-batches in pairs ----------------- */

/* (R = n x cols columns; the Gram kernels take a sample's cols at once) */
static void mem_gram(double R, double k, size_t dim, int cols, cv_op_memory *m)
{
    m->vector_bytes = cv_op_bytes((2.0 * R * R + (k + 4) * (double)dim) * sizeof(double));
    m->max_vectors = cols;
    m->pairs = 1;
}

/* Factor columns per sample: mc_samples for fisher_mc or options.mc, else C
 * (as build() sets them). */
static int gram_cols(const cv_vivit_args *v, cv_curvature kind, int mc_samples, int C)
{
    return v->mc || kind == CV_CURV_FISHER_MC ? mc_samples : C;
}

/* R: the columns of the (sub-sampled) batch. */
static double gram_columns(const cv_vivit_args *v, cv_curvature kind, int mc_samples,
                           size_t n, int C)
{
    double ns = v->subsample > 0 && v->subsample < 1 ? ceil(v->subsample * (double)n) : (double)n;
    return ns * gram_cols(v, kind, mc_samples, C);
}

static void mem_eigen_gram(const cv_opts *o, cv_curvature kind, const cv_block *b, size_t n, int C,
                           cv_op_memory *m)
{
    const cv_eigen_args *a = o->args;
    mem_gram(gram_columns(&a->vivit, kind, a->base.mc_samples, n, C), a->o.k, b->dim,
             gram_cols(&a->vivit, kind, a->base.mc_samples, C), m);
}

const cv_op_method cv_method_eigen_gram = {"gram", run_gram, check_gram, mem_eigen_gram, NULL};

/* ---- snr ------------------------------------------------------------------- */

typedef struct {
    cv_op_base base;
    int k;
    int return_raw;
    cv_vivit_args vivit;
} snr_args;

static const cv_opt_spec snr_opts[] = {
    {"k", CV_OPT_INT, 1, 1e6, NULL, offsetof(snr_args, k), NULL},
    {"return_raw", CV_OPT_BOOL, 0, 0, NULL, offsetof(snr_args, return_raw), NULL},
    {"mc", CV_OPT_BOOL, 0, 0, NULL, offsetof(snr_args, vivit.mc), NULL},
    CV_OPT_MC(snr_args),
    {"subsample", CV_OPT_NUM, 1e-9, 1, NULL, offsetof(snr_args, vivit.subsample), NULL},
    {"threshold", CV_OPT_NUM, 0, 1e9, NULL, offsetof(snr_args, vivit.threshold), NULL},
    CV_OPT_END};
CV_OPT_TABLE_FITS(snr_opts);

static void snr_defaults(void *p, int method) { cv_vivit_args_default(&((snr_args *)p)->vivit); }

static int check_snr(const cv_opts *opts, cv_curvature kind, cv_err *e)
{
    return check_curvature(kind, e);
}

static cJSON *direction_json(const cv_vivit_derivs *d, int q, double lambda, double gdot,
                             double gnorm)
{
    cJSON *o = cJSON_CreateObject();
    cv_vivit_stat sg, sl;
    cv_vivit_stats(d->gamma + (size_t)q * d->n, d->n, &sg);
    cv_vivit_stats(d->lambda + (size_t)q * d->ns, d->ns, &sl);
    cJSON_AddNumberToObject(o, "eigenvalue", lambda);
    add_num(o, "gamma_mean", sg.mean);
    add_num(o, "gamma_var", sg.var);
    add_num(o, "gamma_snr", sg.snr);
    add_num(o, "lambda_mean", sl.mean);
    add_num(o, "lambda_var", sl.var);
    add_num(o, "lambda_snr", sl.snr);
    add_num(o, "alignment", gnorm > 0 ? fabs(gdot) / gnorm : NAN);
    return o;
}

static int gsnr_json(cv_op_ctx *c, const cv_block *b, cJSON *out, cv_err *e)
{
    cv_vivit_gsnr *g = malloc(sizeof(cv_vivit_gsnr) * CV_MAX_LAYERS);
    int count = 0;
    if (!g)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "gradient SNR");
    int rc = cv_vivit_gsnr_layers(c->curv, b, g, CV_MAX_LAYERS, &count, c->progress, e);
    cJSON *arr = rc ? NULL : cJSON_AddArrayToObject(out, "gsnr");
    for (int i = 0; i < count && !rc; i++) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddItemToObject(o, "params", cv_json_param_names(c->m, &g[i].block));
        add_num(o, "gsnr", g[i].gsnr);
        cJSON_AddNumberToObject(o, "zero_variance", (double)g[i].zero_variance);
        cJSON_AddItemToArray(arr, o);
    }
    free(g);
    return rc;
}

static int directions_json(cv_op_ctx *c, cv_vivit *v, int k, cJSON *out, cv_err *e)
{
    double *E = malloc(sizeof(double) * (size_t)(k ? k : 1) * v->dim);
    double *g = malloc(sizeof(double) * v->dim);
    cv_vivit_derivs d = {0};
    int rc = E && g ? 0 : cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "eigenvectors");
    if (!rc)
        rc = cv_vivit_eigenvectors(v, k, E, e);
    if (!rc)
        rc = cv_vivit_directional(v, k, E, &d, e);
    if (!rc)
        rc = cv_curv_gradient(c->curv, &v->block, g, e);
    if (!rc) {
        double gn = 0;
        for (size_t i = 0; i < v->dim; i++)
            gn += g[i] * g[i];
        cJSON *arr = cJSON_AddArrayToObject(out, "directions");
        for (int q = 0; q < k; q++) {
            double dot = 0;
            for (size_t i = 0; i < v->dim; i++)
                dot += E[(size_t)q * v->dim + i] * g[i];
            cJSON_AddItemToArray(arr, direction_json(&d, q, v->eigenvalues[q], dot, sqrt(gn)));
        }
        cJSON_AddNumberToObject(out, "gradient_norm", sqrt(gn));
    }
    if (!rc && ((const snr_args *)c->opts->args)->return_raw) {
        cJSON_AddItemToObject(out, "gamma", json_rows(d.gamma, d.n, k));
        cJSON_AddItemToObject(out, "lambda", json_rows(d.lambda, d.ns, k));
    }
    cv_vivit_derivs_free(&d);
    free(E);
    free(g);
    return rc;
}

static int run_snr(cv_op_ctx *c, const cv_block *b, cJSON *out, cv_err *e)
{
    const snr_args *a = c->opts->args;
    cv_vivit v;
    int *subset = build_factor(c, b, &a->vivit, &v, e);
    if (!subset)
        return -1;
    int rc = cv_vivit_eigh(&v, e);
    int k = cv_opts_given(c->opts, "k") ? a->k : v.C;
    k = k < v.rank ? k : v.rank;
    if (!rc) {
        factor_json(&v, out);
        rc = directions_json(c, &v, k, out, e);
    }
    if (!rc)
        rc = gsnr_json(c, b, out, e);
    cv_vivit_free(&v);
    free(subset);
    return rc;
}

/* ---- newton (method vivit) --------------------------------------------------- */

static int check_newton_vivit(const cv_opts *opts, cv_curvature kind, cv_err *e)
{
    const cv_newton_args *a = opts->args;
    int full = a->mode == CV_NEWTON_FULL, boot = a->damping.choice >= 0;
    if (full && boot)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.damping",
                          "damping \"bootstrap\" is directional: it needs mode directional");
    if (full && cv_opts_given(opts, "k"))
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.k",
                          "k applies to mode directional (mode full uses the whole GGN)");
    int grid = cv_opts_given(opts, "grid");
    if (!boot && (grid || cv_opts_given(opts, "bootstrap_samples")))
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.grid",
                          "grid and bootstrap_samples apply to damping \"bootstrap\" only");
    if (grid && a->grid.n < 1)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.grid",
                          "grid must list at least one damping value");
    for (int i = 0; grid && i < a->grid.n; i++)
        if (!(a->grid.v[i] > 0))
            return cv_err_set(e, CV_EINVAL, "invalid_option", "options.grid",
                              "grid values must be positive");
    return check_curvature(kind, e);
}

static int newton_full(cv_op_ctx *c, const cv_block *b, cv_vivit *v, double delta, cJSON *out,
                       cv_err *e)
{
    double *step = malloc(sizeof(double) * (b->dim ? b->dim : 1)), pred = 0;
    if (!step)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "step");
    int rc = cv_vivit_newton_full(v, delta, step, &pred, e);
    if (!rc) {
        cJSON_AddItemToObject(out, "step", cv_json_doubles(step, b->dim));
        cJSON_AddNumberToObject(out, "predicted_change", pred);
        rc = cv_op_add_actual_change(c, b, step,
                                     ((const cv_newton_args *)c->opts->args)->actual_change, out,
                                     e);
    }
    free(step);
    return rc;
}

static void newton_dirs_json(const cv_vivit_newton *r, cJSON *out)
{
    cJSON *arr = cJSON_AddArrayToObject(out, "directions");
    for (int j = 0; j < r->k; j++) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddNumberToObject(o, "eigenvalue", r->eigenvalues[j]);
        cJSON_AddNumberToObject(o, "gamma_mean", r->gamma_mean[j]);
        add_num(o, "damping", r->damping[j]);
        cJSON_AddNumberToObject(o, "coefficient", r->coeff[j]);
        cJSON_AddItemToArray(arr, o);
    }
    cJSON_AddItemToObject(out, "dampings", json_nums(r->damping, (size_t)r->k));
}

static int newton_directional(cv_op_ctx *c, const cv_block *b, cv_vivit *v, int boot,
                              double delta, cJSON *out, cv_err *e)
{
    const cv_newton_args *a = c->opts->args;
    if (cv_vivit_eigh(v, e))
        return -1;
    int k = cv_opts_given(c->opts, "k") && a->k.choice < 0 ? (int)a->k.num : v->rank;
    k = k < v->rank ? k : v->rank;
    cv_vivit_damping d;
    cv_vivit_damping_default(&d);
    d.damping = delta;
    d.bootstrap = boot;
    d.samples = a->bootstrap_samples;
    d.seed = c->seed ^ CV_VIVIT_BOOT_SALT;
    if (cv_opts_given(c->opts, "grid")) {
        d.grid = a->grid.v;
        d.grid_n = a->grid.n;
    }
    cv_vivit_newton r;
    if (cv_vivit_newton_directional(v, k, &d, &r, e))
        return -1;
    int rc;
    cJSON_AddItemToObject(out, "step", cv_json_doubles(r.step, r.dim));
    cJSON_AddNumberToObject(out, "predicted_change", r.predicted_change);
    cJSON_AddNumberToObject(out, "k", k);
    factor_json(v, out);
    newton_dirs_json(&r, out);
    rc = cv_op_add_actual_change(c, b, r.step, a->actual_change, out, e);
    cv_vivit_newton_free(&r);
    return rc;
}

static int run_newton_vivit(cv_op_ctx *c, const cv_block *b, cJSON *out, cv_err *e)
{
    const cv_newton_args *a = c->opts->args;
    int full = a->mode == CV_NEWTON_FULL, boot = a->damping.choice >= 0;
    double delta = boot ? 1.0 : a->damping.num;
    cv_vivit v;
    int *subset = build_factor(c, b, &a->vivit, &v, e);
    if (!subset)
        return -1;
    cJSON_AddStringToObject(out, "method", "vivit");
    cJSON_AddStringToObject(out, "mode", full ? "full" : "directional");
    if (boot)
        cJSON_AddStringToObject(out, "damping", "bootstrap");
    else
        cJSON_AddNumberToObject(out, "damping", delta);
    if (full)
        factor_json(&v, out);
    int rc = full ? newton_full(c, b, &v, delta, out, e)
                  : newton_directional(c, b, &v, boot, delta, out, e);
    cv_vivit_free(&v);
    free(subset);
    return rc;
}

static void mem_newton_vivit(const cv_opts *o, cv_curvature kind, const cv_block *b, size_t n, int C,
                             cv_op_memory *m)
{
    const cv_newton_args *a = o->args;
    double R = gram_columns(&a->vivit, kind, a->base.mc_samples, n, C);
    mem_gram(R, a->k.choice == 0 ? R : a->k.num, b->dim,
             gram_cols(&a->vivit, kind, a->base.mc_samples, C), m);
}

static void mem_snr(const cv_opts *o, cv_curvature kind, const cv_block *b, size_t n, int C, cv_op_memory *m)
{
    const snr_args *a = o->args;
    mem_gram(gram_columns(&a->vivit, kind, a->base.mc_samples, n, C), a->k, b->dim,
             gram_cols(&a->vivit, kind, a->base.mc_samples, C), m);
}

const cv_op_method cv_method_newton_vivit = {"vivit", run_newton_vivit, check_newton_vivit,
                                             mem_newton_vivit, NULL};

static const char *const snr_results[] = {
    "columns", "curvature_samples", "mc_columns", "gram_path", "curvature_indices",
    "rank",    "threshold",         "lambda_max", "directions", "gradient_norm",
    "gsnr",    "gamma",             "lambda",     NULL};

const cv_op_def cv_op_snr = {"snr",     snr_opts, NULL,      sizeof(snr_args), snr_defaults,
                             1,         1,        check_snr, run_snr,          snr_results, NULL,
                             mem_snr, NULL};
