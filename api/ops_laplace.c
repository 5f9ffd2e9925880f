/* ops_laplace.c - the "laplace" op (issue 23, item 1): the Laplace
 * approximation of the posterior of a MAP network, N(theta, P^-1) with
 * P = G_sum / (sigma^2 T) + P0, and its log marginal likelihood, with the
 * prior precision (and the Gaussian noise) optionally maximizing it.  Builds
 * the curvature of the chosen structure once (the dense GGN, its exact
 * diagonal, the KFAC type-2 factors' eigenvalues, its top-k eigenpairs by
 * Lanczos; last_layer: one of these on the last parameterised layer) and
 * hands it to engine/laplace.h for the evidence and its optimization.
 * The fit and its scaling are api/op_laplace.h's (shared with op predict).
 * options.keep / accumulate_into hand the fitted posterior (accumulated onto
 * a kept one) to the job's store (the service's registry) under a name.
 *
 * One result (not blockwise): the posterior covers every parameter
 * (last_layer: the last layer's), its prior blocks are the layer blocks
 * (one per module that owns parameters, blocks "layer"'s). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/op_laplace.h"
#include "api/op_util.h"
#include "engine/laplace.h"

typedef struct {
    cv_lap_args common;
} laplace_args;

static const cv_opt_spec laplace_opts[] = {
    CV_OPT_LAPLACE(laplace_args),
    {"keep", CV_OPT_BOOL_OR_NAME, 0, 0, NULL, CV_LAP_OFF(laplace_args, keep), NULL},
    {"accumulate_into", CV_OPT_NAME, 0, 0, NULL, CV_LAP_OFF(laplace_args, accumulate_into),
     NULL},
    CV_OPT_END};
CV_OPT_TABLE_FITS(laplace_opts);

static void laplace_defaults(void *p, int method)
{
    cv_lap_defaults(&((laplace_args *)p)->common.lap);
}

static int check_laplace(const cv_opts *o, cv_curvature kind, cv_err *e)
{
    return cv_lap_check(o, e);
}

static int bind_laplace(const cv_opts *o, const cv_model *m, const cv_block *blocks, int n,
                        cv_err *e)
{
    return cv_lap_bind(o, m, e);
}

/* The per-block entries: the prior's terms and, where G is block-diagonal
 * over the prior blocks (diag, kron, one block), each block's log det P. */
static void add_blocks(const cv_lap_fit *s, const double *bdelta, const double *blogdet,
                       cJSON *out)
{
    const cv_model *m = s->c->m;
    cJSON *arr = cJSON_AddArrayToObject(out, "blocks");
    for (int b = 0; b < s->nb; b++) {
        double sq = 0;
        for (size_t i = 0; i < s->tb.dim; i++)
            sq += s->owner[i] == b ? s->theta[i] * s->theta[i] : 0;
        cJSON *o = cJSON_CreateObject();
        cJSON_AddItemToArray(arr, o);
        cJSON_AddStringToObject(o, "name", s->lb[b].name);
        cJSON_AddItemToObject(o, "params", cv_json_param_names(m, &s->lb[b]));
        cJSON_AddNumberToObject(o, "dim", (double)s->lb[b].dim);
        cv_lap_add_num(o, "prior_precision", bdelta[b]);
        cv_lap_add_num(o, "log_det_prior_precision", (double)s->lb[b].dim * log(bdelta[b]));
        cv_lap_add_num(o, "scatter", bdelta[b] * sq);
        if (blogdet)
            cv_lap_add_num(o, "log_det_posterior_precision", blogdet[b]);
    }
}

/* The evidence at the options' prior and noise or at their optimum; leaves
 * s->delta, s->sigma and s->g at the values used. */
static int evaluate(cv_lap_fit *s, cJSON *out, cv_err *e)
{
    const cv_lap_opts *a = s->a;
    cv_laplace L;
    if (cv_lap_fit_evidence(s, &L, e))
        return -1;
    int nl = L.nblocks, whole = nl != s->nb; /* one engine block for all prior blocks */
    double *delta = malloc(sizeof(double) * (size_t)(nl + 2 * s->nb));
    s->delta = malloc(sizeof(double) * (size_t)s->nb);
    if (!delta || !s->delta) {
        free(delta);
        cv_laplace_free(&L);
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "prior precisions");
    }
    double *bdelta = s->delta, *blogdet = delta + nl;
    for (int b = 0; b < nl; b++)
        delta[b] = a->prior.is_list ? a->prior.list.v[whole ? 0 : b] : a->prior.num;
    double sigma = a->sigma_noise;
    int evals = 0, rc = 0;
    if (a->optimize_prior || a->optimize_sigma)
        rc = cv_laplace_optimize(&L, delta, a->prior.is_list && nl > 1, a->optimize_prior,
                                 &sigma, a->optimize_sigma, a->temperature, &evals, e);
    cv_laplace_terms t;
    if (!rc)
        rc = cv_laplace_eval(&L, delta, sigma, a->temperature, &t, whole ? NULL : blogdet, e);
    if (!rc) {
        cv_lap_add_num(out, "log_marginal_likelihood", t.log_marginal_likelihood);
        cv_lap_add_num(out, "log_likelihood", t.log_likelihood);
        cv_lap_add_num(out, "log_det_posterior_precision", t.log_det_posterior_precision);
        cv_lap_add_num(out, "log_det_prior_precision", t.log_det_prior_precision);
        cv_lap_add_num(out, "scatter", t.scatter);
        for (int b = 0; b < s->nb; b++)
            bdelta[b] = delta[whole ? 0 : b];
        if (a->prior.is_list)
            cJSON_AddItemToObject(out, "prior_precision", cv_json_doubles(bdelta, (size_t)s->nb));
        else
            cv_lap_add_num(out, "prior_precision", delta[0]);
        s->sigma = L.gaussian ? sigma : 1.0;
        s->g = 1.0 / (s->sigma * s->sigma * a->temperature);
        cv_lap_add_num(out, "sigma_noise", s->sigma);
        cv_lap_add_num(out, "temperature", a->temperature);
        if (a->optimize_prior || a->optimize_sigma)
            cJSON_AddNumberToObject(out, "evaluations", evals);
        int separable = L.kind == CV_LAPLACE_SPECTRA && !whole;
        add_blocks(s, bdelta, separable ? blogdet : NULL, out);
    }
    free(delta);
    cv_laplace_free(&L);
    return rc;
}

/* keep / accumulate_into: the fit (plus the kept posterior read) to the
 * job's store, and its description. */
static int keep(cv_lap_fit *s, cJSON *out, cv_err *e)
{
    const cv_lap_opts *a = s->a;
    const char *name = cv_lap_keep_name(a);
    if (!name)
        return 0;
    cv_lap_post *p;
    if (cv_lap_fit_keep(s, a->accumulate_into.on ? s->c->store->in : NULL, &p, e))
        return -1;
    double ld = NAN;
    int rc = cv_lap_post_logdet(s->c, p, &ld, e);
    if (rc) {
        cv_lap_post_destroy(p);
        return -1;
    }
    s->c->store->out = p;
    cJSON_AddStringToObject(out, "posterior", name);
    cJSON *k = cJSON_AddObjectToObject(out, "kept");
    cJSON_AddNumberToObject(k, "tasks", p->tasks);
    cJSON_AddNumberToObject(k, "bytes", (double)p->bytes);
    cJSON_AddItemToObject(k, "prior_precision", cv_json_doubles(p->delta, (size_t)p->nb));
    cv_lap_add_num(k, "log_det_posterior_precision", ld);
    if (a->accumulate_into.on)
        cJSON_AddStringToObject(k, "accumulated_into", a->accumulate_into.s);
    return 0;
}

static int run_laplace(cv_op_ctx *c, const cv_block *full, cJSON *out, cv_err *e)
{
    const cv_lap_opts *a = cv_lap_of(c->opts);
    cv_lap_fit s;
    if (cv_lap_check_store(c, e))
        return -1;
    if (a->accumulate_into.on && !c->store->in)
        return cv_err_set(e, CV_EINTERNAL, "internal", "options.accumulate_into",
                          "the kept posterior was not loaded");
    int rc = cv_lap_fit_build(c, a, &s, e);
    if (!rc) {
        cv_lap_fit_header(&s, out);
        if (s.inner == CV_LAP_LOWRANK)
            cJSON_AddItemToObject(out, "eigenvalues", cv_json_doubles(s.lam, (size_t)s.K));
        rc = evaluate(&s, out, e);
    }
    if (!rc)
        rc = keep(&s, out, e);
    cv_lap_fit_free(&s);
    return rc;
}

static const char *const laplace_results[] = {
    "structure", "last_layer_structure", "likelihood", "ggn_factor", "n_params", "k",
    "eigenvalues", "converged", "log_marginal_likelihood", "log_likelihood",
    "log_det_posterior_precision", "log_det_prior_precision", "scatter", "prior_precision",
    "sigma_noise", "temperature", "evaluations", "posterior", "kept",
    NULL}; /* and "blocks" (the envelope's name) */

/* Memory: the fit's (api/op_laplace.h), in vectors of the posterior's
 * dimension (the job's block before bind). */
static void mem_laplace(const cv_opts *o, cv_curvature kind, const cv_block *b, size_t n, int C,
                        cv_op_memory *m)
{
    const cv_lap_opts *a = cv_lap_of(o);
    double D = (double)(a->post_dim ? a->post_dim : b->dim);
    m->vector_bytes = cv_op_bytes(cv_lap_fit_memory(a, D, &m->max_vectors));
    m->pairs = 0;
}

const cv_op_def cv_op_laplace = {"laplace",      laplace_opts,   NULL,        sizeof(laplace_args),
                                 laplace_defaults, 0,            0,           check_laplace,
                                 run_laplace,    laplace_results, NULL,       mem_laplace,
                                 bind_laplace};
