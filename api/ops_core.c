/* ops_core.c - the engine-core ops: loss, gradient, matvec, dense and
 * per-sample gradients. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "api/op_kron.h"
#include "api/op_util.h"
#include "api/ops.h"
#include "engine/rng.h"

typedef struct {
    cv_op_base base;
} plain_args;

typedef struct {
    cv_op_base base;
    cv_opt_list vector;
    uint64_t probe_seed;
} matvec_args;

static const cv_opt_spec no_opts[] = {CV_OPT_END};
CV_OPT_TABLE_FITS(no_opts);
static const cv_opt_spec curv_opts[] = {CV_OPT_MC(plain_args), CV_OPT_KRON(plain_args),
                                        CV_OPT_END};
CV_OPT_TABLE_FITS(curv_opts);
static const cv_opt_spec matvec_opts[] = {
    {"vector", CV_OPT_LIST, 0, 0, NULL, offsetof(matvec_args, vector), NULL},
    {"probe_seed", CV_OPT_U64, 0, 9e15, NULL, offsetof(matvec_args, probe_seed), NULL},
    CV_OPT_MC(matvec_args),
    CV_OPT_KRON(matvec_args),
    CV_OPT_END};
CV_OPT_TABLE_FITS(matvec_opts);

static int run_loss(cv_op_ctx *c, const cv_block *b, cJSON *out, cv_err *e)
{
    cJSON_AddNumberToObject(out, "loss", cv_curv_loss(c->curv));
    return 0;
}

static int run_gradient(cv_op_ctx *c, const cv_block *b, cJSON *out, cv_err *e)
{
    double *g = malloc(sizeof(double) * (b->dim ? b->dim : 1));
    if (!g)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "gradient of %zu entries", b->dim);
    int rc = cv_curv_gradient(c->curv, b, g, e);
    if (!rc) {
        cJSON_AddItemToObject(out, "gradient", cv_json_doubles(g, b->dim));
        double n2 = 0;
        for (size_t i = 0; i < b->dim; i++)
            n2 += g[i] * g[i];
        cJSON_AddNumberToObject(out, "gradient_norm", sqrt(n2));
        cJSON_AddNumberToObject(out, "loss", cv_curv_loss(c->curv));
    }
    free(g);
    return rc;
}

static int check_matvec(const cv_opts *o, cv_curvature kind, cv_err *e)
{
    if (cv_opts_given(o, "vector") == cv_opts_given(o, "probe_seed"))
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.vector",
                          "matvec needs exactly one of options.vector (a list) or "
                          "options.probe_seed (a seeded Rademacher vector)");
    return 0;
}

/* At bind: a given vector has the block's dimension. */
static int bind_matvec(const cv_opts *o, const cv_block *b, cv_err *e)
{
    const matvec_args *a = o->args;
    if (cv_opts_given(o, "vector") && (size_t)a->vector.n != b->dim)
        return cv_err_set(e, CV_EINVAL, "invalid_vector", "options.vector",
                          "options.vector has %d entries, the block has dimension %zu",
                          a->vector.n, b->dim);
    return 0;
}

static int run_matvec(cv_op_ctx *c, const cv_block *b, cJSON *out, cv_err *e)
{
    double *v = malloc(sizeof(double) * b->dim), *y = malloc(sizeof(double) * b->dim);
    int rc = -1;
    if (!v || !y) {
        cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "vectors of %zu entries", b->dim);
        goto done;
    }
    const matvec_args *a = c->opts->args;
    if (cv_opts_given(c->opts, "vector")) {
        if ((size_t)a->vector.n != b->dim) { /* bind_matvec refused it at submit */
            cv_err_set(e, CV_EINTERNAL, "internal", "options.vector",
                       "vector not bound to the block");
            goto done;
        }
        memcpy(v, a->vector.v, sizeof(double) * b->dim);
    } else {
        cv_rng r;
        cv_rng_seed(&r, a->probe_seed);
        cv_rng_rademacher(&r, v, b->dim);
    }
    cv_linop op;
    cv_curv_linop_ctx lc;
    cv_op_linop(c, b, &op, &lc);
    cv_progress_plan(c->progress, 1);
    if (cv_linop_apply(&op, 1, v, y, e))
        goto done;
    cJSON_AddItemToObject(out, "product", cv_json_doubles(y, b->dim));
    double vav = 0;
    for (size_t i = 0; i < b->dim; i++)
        vav += v[i] * y[i];
    cJSON_AddNumberToObject(out, "quadratic_form", vav);
    rc = 0;
done:
    free(v);
    free(y);
    return rc;
}

static int run_dense(cv_op_ctx *c, const cv_block *b, cJSON *out, cv_err *e)
{
    if (b->dim > c->lim->dense_max)
        return cv_err_set(e, CV_ETOOLARGE, "too_large", "op",
                          "dense matrix of dimension %zu exceeds the dense limit %zu "
                          "(it would need %.1f MB)",
                          b->dim, c->lim->dense_max, 8e-6 * (double)b->dim * (double)b->dim);
    double *A = malloc(sizeof(double) * b->dim * b->dim);
    if (!A)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "dense %zu x %zu matrix", b->dim,
                          b->dim);
    cv_linop op;
    cv_curv_linop_ctx lc;
    cv_op_linop(c, b, &op, &lc);
    cv_progress_plan(c->progress, (long)b->dim);
    /* identity columns in chunks through the linop (progress, cancellation) */
    size_t D = b->dim, chunk = D < 64 ? D : 64;
    double *X = calloc(chunk * D, sizeof(double));
    int rc = X ? 0 : cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "dense basis");
    for (size_t j = 0; j < D && !rc; j += chunk) {
        size_t kk = D - j < chunk ? D - j : chunk;
        memset(X, 0, sizeof(double) * chunk * D);
        for (size_t q = 0; q < kk; q++)
            X[q * D + j + q] = 1.0;
        rc = cv_linop_apply(&op, (int)kk, X, A + j * D, e);
    }
    if (!rc)
        cJSON_AddItemToObject(out, "matrix", cv_json_columns(A, D, (int)D));
    free(X);
    free(A);
    return rc;
}

static int run_per_sample(cv_op_ctx *c, const cv_block *b, cJSON *out, cv_err *e)
{
    size_t N = cv_curv_batch_size(c->curv);
    if ((double)N * (double)b->dim > 5e8)
        return cv_err_set(e, CV_ETOOLARGE, "too_large", "batch",
                          "per-sample gradients would need %.1f GB; use a smaller batch or "
                          "a block", 8e-9 * (double)N * (double)b->dim);
    double *G = malloc(sizeof(double) * N * b->dim);
    if (cv_curv_agree(c->curv, G ? 0 : cv_err_set(e, CV_ENOMEM, "out_of_memory", "",
                                                  "per-sample gradients"), e)) {
        free(G);
        return -1;
    }
    int rc = cv_curv_per_sample_gradients(c->curv, b, G, e);
    if (!rc)
        cJSON_AddItemToObject(out, "per_sample_gradients", cv_json_columns(G, b->dim, (int)N));
    free(G);
    return rc;
}

static const char *const loss_results[] = {"loss", NULL};
static const char *const gradient_results[] = {"gradient", "gradient_norm", "loss", NULL};
static const char *const matvec_results[] = {"product", "quadratic_form", CV_KRON_RESULTS,
                                             NULL};
static const char *const dense_results[] = {"matrix", CV_KRON_RESULTS, NULL};
static const char *const per_sample_results[] = {"per_sample_gradients", NULL};

/* ---- memory (cv_op_memory_fn) ---------------------------------------------- */

static void mem_vectors(cv_op_memory *m, double vectors, size_t dim, int k)
{
    m->vector_bytes = cv_op_bytes(vectors * (double)dim * sizeof(double));
    m->max_vectors = k;
    m->pairs = 0;
}

static void mem_loss(const cv_opts *o, cv_curvature kind, const cv_block *b, size_t n, int C, cv_op_memory *m)
{
    mem_vectors(m, 0, b->dim, 1);
}

/* A Kronecker curvature's factors (forward products: no eigendecomposition
 * but ekfac's own; api/op_kron.h). */
static void mem_kron(const cv_opts *o, cv_curvature kind, int C, cv_op_memory *m)
{
    const cv_op_base *base = o->args;
    cv_op_kron_memory(kind, base->fisher_type, base->mc_samples, C, 0, m);
}

static void mem_matvec(const cv_opts *o, cv_curvature kind, const cv_block *b, size_t n, int C, cv_op_memory *m)
{
    mem_vectors(m, 3, b->dim, 1);
    mem_kron(o, kind, C, m);
}

static void mem_dense(const cv_opts *o, cv_curvature kind, const cv_block *b, size_t n, int C, cv_op_memory *m)
{
    mem_vectors(m, (double)b->dim + 128, b->dim, 32);
    mem_kron(o, kind, C, m);
}

static void mem_per_sample(const cv_opts *o, cv_curvature kind, const cv_block *b, size_t n, int C,
                           cv_op_memory *m)
{
    mem_vectors(m, (double)n + 1, b->dim, 1);
}

#define BASE sizeof(plain_args)
const cv_op_def cv_op_loss = {"loss", no_opts, NULL, BASE, NULL, 0, 0, NULL, run_loss,
                              loss_results, NULL, mem_loss, NULL};
const cv_op_def cv_op_gradient = {"gradient", no_opts, NULL, BASE, NULL, 0, 1, NULL,
                                  run_gradient, gradient_results, NULL, mem_matvec, NULL};
const cv_op_def cv_op_matvec = {"matvec", matvec_opts, NULL, sizeof(matvec_args), NULL, 1, 0,
                                check_matvec, run_matvec, matvec_results, bind_matvec,
                                mem_matvec, NULL};
const cv_op_def cv_op_dense = {"dense", curv_opts, NULL, BASE, NULL, 1, 1, NULL, run_dense,
                               dense_results, NULL, mem_dense, NULL};
const cv_op_def cv_op_per_sample = {"per_sample_gradients", no_opts, NULL, BASE, NULL, 0, 1,
                                    NULL, run_per_sample, per_sample_results, NULL,
                                    mem_per_sample, NULL};
