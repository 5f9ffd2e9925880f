/* ops_jacobian.c - the network-output Jacobian ops (issue 26): jvp (J v per
 * sample, stacked), vjp (sum_n J_n^T c_n) and jacobian (J_n for small nets),
 * J_n = d f(x_n) / d theta on the job's block, f the model's output before the
 * loss (per sample: the output's numel C, row-major). */
#include <stdlib.h>
#include <string.h>

#include "api/op_util.h"
#include "api/ops.h"
#include "engine/rng.h"

typedef struct {
    cv_op_base base;
    cv_opt_list vector;
    uint64_t probe_seed;
} jvp_args;

typedef struct {
    cv_op_base base;
    cv_opt_list cotangents;
    uint64_t cotangent_seed;
} vjp_args;

static const cv_opt_spec jvp_opts[] = {
    {"vector", CV_OPT_LIST, 0, 0, NULL, offsetof(jvp_args, vector), NULL},
    {"probe_seed", CV_OPT_U64, 0, 9e15, NULL, offsetof(jvp_args, probe_seed), NULL},
    CV_OPT_END};
CV_OPT_TABLE_FITS(jvp_opts);

static const cv_opt_spec vjp_opts[] = {
    {"cotangents", CV_OPT_LIST, 0, 0, NULL, offsetof(vjp_args, cotangents), NULL},
    {"cotangent_seed", CV_OPT_U64, 0, 9e15, NULL, offsetof(vjp_args, cotangent_seed), NULL},
    CV_OPT_END};
CV_OPT_TABLE_FITS(vjp_opts);

static const cv_opt_spec no_opts[] = {CV_OPT_END};
CV_OPT_TABLE_FITS(no_opts);

/* Exactly one of two options (a list or its seed). */
static int one_of(const cv_opts *o, const char *list, const char *seed, cv_err *e)
{
    if (cv_opts_given(o, list) == cv_opts_given(o, seed))
        return cv_err_set(e, CV_EINVAL, "invalid_option", strcmp(list, "vector") ? "options."
                          "cotangents" : "options.vector",
                          "give exactly one of options.%s (a list) or options.%s (a seeded "
                          "Rademacher one)", list, seed);
    return 0;
}

static int check_jvp(const cv_opts *o, cv_curvature kind, cv_err *e)
{
    return one_of(o, "vector", "probe_seed", e);
}

static int check_vjp(const cv_opts *o, cv_curvature kind, cv_err *e)
{
    return one_of(o, "cotangents", "cotangent_seed", e);
}

static int bind_jvp(const cv_opts *o, const cv_block *b, cv_err *e)
{
    const jvp_args *a = o->args;
    if (cv_opts_given(o, "vector") && (size_t)a->vector.n != b->dim)
        return cv_err_set(e, CV_EINVAL, "invalid_vector", "options.vector",
                          "options.vector has %d entries, the block has dimension %zu",
                          a->vector.n, b->dim);
    return 0;
}

/* The per-sample output shape as a JSON list. */
static void add_output_shape(const cv_model *m, cJSON *out)
{
    const cv_shape *s = &m->layers[m->nlayers - 1].out_shape;
    cJSON *l = cJSON_AddArrayToObject(out, "output_shape");
    for (int i = 0; l && i < s->rank; i++)
        cJSON_AddItemToArray(l, cJSON_CreateNumber(s->dim[i]));
}

/* N rows of C floats as N lists. */
static cJSON *float_rows(const float *x, size_t N, size_t C)
{
    cJSON *rows = cJSON_CreateArray();
    double *tmp = malloc(sizeof(double) * (C ? C : 1));
    for (size_t n = 0; rows && tmp && n < N; n++) {
        for (size_t j = 0; j < C; j++)
            tmp[j] = x[n * C + j];
        cJSON_AddItemToArray(rows, cv_json_doubles(tmp, C));
    }
    free(tmp);
    return rows;
}

static int run_jvp(cv_op_ctx *c, const cv_block *b, cJSON *out, cv_err *e)
{
    const jvp_args *a = c->opts->args;
    size_t N = cv_curv_batch_size(c->curv), C = (size_t)cv_model_output_dim(c->m);
    double *v = malloc(sizeof(double) * (b->dim ? b->dim : 1));
    size_t NC = N * C;
    float *t = malloc(sizeof(float) * (NC ? NC : 1));
    int rc = v && t ? 0 : cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "jvp vectors");
    if (!rc && cv_opts_given(c->opts, "vector")) {
        memcpy(v, a->vector.v, sizeof(double) * b->dim);
    } else if (!rc) {
        cv_rng r;
        cv_rng_seed(&r, a->probe_seed);
        cv_rng_rademacher(&r, v, b->dim);
    }
    if (!rc)
        rc = cv_curv_jvp(c->curv, b, 1, v, t, e);
    if (!rc) {
        cJSON_AddItemToObject(out, "jvp", float_rows(t, N, C));
        add_output_shape(c->m, out);
    }
    free(v);
    free(t);
    return rc;
}

static int run_vjp(cv_op_ctx *c, const cv_block *b, cJSON *out, cv_err *e)
{
    const vjp_args *a = c->opts->args;
    size_t N = cv_curv_batch_size(c->curv), C = (size_t)cv_model_output_dim(c->m);
    if (cv_opts_given(c->opts, "cotangents") && (size_t)a->cotangents.n != N * C)
        return cv_err_set(e, CV_EINVAL, "invalid_vector", "options.cotangents",
                          "options.cotangents has %d entries; the batch's outputs have %zu "
                          "(%zu samples x %zu, row-major)",
                          a->cotangents.n, N * C, N, C);
    size_t NC = N * C, ny = b->dim > NC ? b->dim : NC;
    float *cot = malloc(sizeof(float) * (NC ? NC : 1));
    double *y = malloc(sizeof(double) * (ny ? ny : 1));
    int rc = cot && y ? 0 : cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "vjp vectors");
    if (!rc && !cv_opts_given(c->opts, "cotangents")) { /* y: scratch for the draws */
        cv_rng r;
        cv_rng_seed(&r, a->cotangent_seed);
        cv_rng_rademacher(&r, y, N * C);
    }
    for (size_t i = 0; !rc && i < N * C; i++)
        cot[i] = (float)(cv_opts_given(c->opts, "cotangents") ? a->cotangents.v[i] : y[i]);
    if (!rc)
        rc = cv_curv_vjp(c->curv, b, 1, cot, y, e);
    if (!rc)
        cJSON_AddItemToObject(out, "vjp", cv_json_doubles(y, b->dim));
    free(cot);
    free(y);
    return rc;
}

/* jacobian: N x C x D from identity columns, 64 at a time. */
static int run_jacobian(cv_op_ctx *c, const cv_block *b, cJSON *out, cv_err *e)
{
    size_t N = cv_curv_batch_size(c->curv), C = (size_t)cv_model_output_dim(c->m), D = b->dim;
    double entries = (double)N * (double)C * (double)D, cap = (double)c->lim->dense_max;
    if (D > c->lim->dense_max || entries > cap * cap)
        return cv_err_set(e, CV_ETOOLARGE, "too_large", "op",
                          "the Jacobian has %zu x %zu x %zu entries; allowed: a block of at most "
                          "the dense limit %zu parameters and %.0f entries (use jvp / vjp, a "
                          "block or a smaller batch)",
                          N, C, D, c->lim->dense_max, cap * cap);
    size_t chunk = D < 64 ? D : 64;
    double *X = calloc(chunk * D, sizeof(double));
    float *T = malloc(sizeof(float) * chunk * N * C);
    double *J = malloc(sizeof(double) * N * C * D);
    int rc = X && T && J ? 0 : cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "jacobian");
    cv_progress_plan(c->progress, (long)((D + chunk - 1) / chunk));
    for (size_t j = 0; j < D && !rc; j += chunk) {
        size_t kk = D - j < chunk ? D - j : chunk;
        memset(X, 0, sizeof(double) * chunk * D);
        for (size_t q = 0; q < kk; q++)
            X[q * D + j + q] = 1.0;
        rc = cv_progress_check(c->progress, e) || cv_curv_jvp(c->curv, b, (int)kk, X, T, e);
        for (size_t q = 0; !rc && q < kk; q++) /* T: vector q, sample n, output i */
            for (size_t r = 0; r < N * C; r++)
                J[r * D + j + q] = T[q * N * C + r];
    }
    if (!rc) {
        cJSON *all = cJSON_AddArrayToObject(out, "jacobian");
        for (size_t n = 0; all && n < N; n++)
            cJSON_AddItemToArray(all, cv_json_columns(J + n * C * D, D, (int)C));
        add_output_shape(c->m, out);
    }
    free(X);
    free(T);
    free(J);
    return rc;
}

static void mem_jac(const cv_opts *o, cv_curvature kind, const cv_block *b, size_t n, int C,
                    cv_op_memory *m)
{
    m->vector_bytes = cv_op_bytes(2.0 * (double)b->dim * sizeof(double) +
                                  2.0 * (double)n * C * sizeof(float));
    m->max_vectors = 1;
    m->pairs = 0;
}

static void mem_jacobian(const cv_opts *o, cv_curvature kind, const cv_block *b, size_t n,
                         int C, cv_op_memory *m)
{
    double D = (double)b->dim;
    m->vector_bytes = cv_op_bytes((64.0 + (double)n * C) * D * sizeof(double) +
                                  64.0 * (double)n * C * sizeof(float));
    m->max_vectors = 64;
    m->pairs = 0;
}

static const char *const jvp_results[] = {"jvp", "output_shape", NULL};
static const char *const vjp_results[] = {"vjp", NULL};
static const char *const jacobian_results[] = {"jacobian", "output_shape", NULL};

const cv_op_def cv_op_jvp = {"jvp", jvp_opts, NULL, sizeof(jvp_args), NULL, 0, 1,
                             check_jvp, run_jvp, jvp_results, bind_jvp, mem_jac, NULL};
const cv_op_def cv_op_vjp = {"vjp", vjp_opts, NULL, sizeof(vjp_args), NULL, 0, 1,
                             check_vjp, run_vjp, vjp_results, NULL, mem_jac, NULL};
const cv_op_def cv_op_jacobian = {"jacobian", no_opts, NULL, sizeof(jvp_args), NULL, 0, 1, NULL,
                                  run_jacobian, jacobian_results, NULL, mem_jacobian, NULL};
