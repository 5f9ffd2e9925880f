/* ops_kron.c - the "kfac" op (issue 22): the Kronecker factors A, B of
 * every layer with a Kronecker structure (engine/kron.h cv_curv_kron), their
 * traces and spectra (engine/kronop.h), and with options.compare the
 * comparison of each Kronecker block with the exact block of the matching
 * curvature (ggn for type-2, fisher_mc for mc, ef for empirical) on the
 * same batch: relative Frobenius error (dense or Hutchinson), top-eigenvalue
 * ratio (Lanczos on the exact block) and the cosine of the damped Newton
 * directions (exact Kronecker inverse vs CG on the exact block).
 *
 * One result (not blockwise) with a "layers" list in the model's order.
 * Data-parallel: the factors are reduced over the ranks by cv_curv_kron and
 * every exact product goes through cv_curv_* (probes from the job seed, the
 * same on every rank), so every rank computes the same numbers. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "api/op_kron.h"
#include "api/op_util.h"
#include "api/ops.h"
#include "engine/estimators.h"
#include "engine/kron.h"
#include "engine/kronop.h"
#include "engine/rng.h"

#define KFAC_PROBE_SALT 0x4bfac0000ull

typedef struct {
    cv_op_base base;
    int fisher_type;   /* cv_kron_fisher */
    int approx;        /* cv_kron_approx */
    int return_factors;
    int eigenvalues;   /* report the factors' eigenvalues (O(dim^3) each) */
    int compare;
    int compare_probes;
    double damping;    /* < 0 (default): 1e-3 lambda_max(F) per layer */
} kfac_args;

static const cv_opt_spec kfac_opts[] = {
    {"fisher_type", CV_OPT_ENUM, 0, 0, "type-2|mc|empirical", offsetof(kfac_args, fisher_type),
     NULL},
    {"kfac_approx", CV_OPT_ENUM, 0, 0, "expand|reduce", offsetof(kfac_args, approx), NULL},
    {"return_factors", CV_OPT_BOOL, 0, 0, NULL, offsetof(kfac_args, return_factors), NULL},
    {"eigenvalues", CV_OPT_BOOL, 0, 0, NULL, offsetof(kfac_args, eigenvalues), NULL},
    {"compare", CV_OPT_BOOL, 0, 0, NULL, offsetof(kfac_args, compare), NULL},
    {"compare_probes", CV_OPT_INT, 1, 1e6, NULL, offsetof(kfac_args, compare_probes), NULL},
    {"damping", CV_OPT_NUM, 0, 1e300, NULL, offsetof(kfac_args, damping), NULL},
    CV_OPT_MC(kfac_args),
    CV_OPT_END};
CV_OPT_TABLE_FITS(kfac_opts);

static void kfac_defaults(void *p, int method)
{
    kfac_args *a = p;
    a->fisher_type = CV_KRON_TYPE2;
    a->approx = CV_KRON_EXPAND;
    a->return_factors = 1;
    a->eigenvalues = 1;
    a->compare = 0;
    a->compare_probes = 20;
    a->damping = -1;
}

static int check_kfac(const cv_opts *o, cv_curvature kind, cv_err *e)
{
    const kfac_args *a = o->args;
    if (!a->compare && (cv_opts_given(o, "compare_probes") || cv_opts_given(o, "damping")))
        return cv_err_set(e, CV_EINVAL, "invalid_option",
                          cv_opts_given(o, "damping") ? "options.damping"
                                                      : "options.compare_probes",
                          "compare_probes and damping apply with compare: true only");
    return 0;
}

/* ---- JSON ------------------------------------------------------------------- */

static void add_num(cJSON *o, const char *name, double x)
{
    if (isfinite(x))
        cJSON_AddNumberToObject(o, name, x);
    else
        cJSON_AddNullToObject(o, name);
}

/* n x n symmetric (row-major) as a list of rows. */
static cJSON *json_matrix(const double *M, int n)
{
    cJSON *a = cJSON_CreateArray();
    for (int r = 0; a && r < n; r++)
        cJSON_AddItemToArray(a, cv_json_doubles(M + (size_t)r * n, (size_t)n));
    return a;
}

/* ---- comparison with the exact block ----------------------------------------- */

static double sumsq(const double *v, size_t n)
{
    double s = 0;
    for (size_t i = 0; i < n; i++)
        s += v[i] * v[i];
    return s;
}

static double dot(const double *x, const double *y, size_t n)
{
    double s = 0;
    for (size_t i = 0; i < n; i++)
        s += x[i] * y[i];
    return s;
}

/* ||K - F||_F / ||F||_F: exactly (identity columns in chunks) when dim <=
 * dense_max, else from Rademacher probes v (32 at a time): mean ||(K-F)v||^2
 * over mean ||F v||^2 (both unbiased for the squared norms). */
static int frobenius(cv_op_ctx *c, cv_kron_block *kb, const cv_linop *F, int probes,
                     uint64_t stream, cJSON *out, cv_err *e)
{
    size_t D = kb->dim;
    int exact = D <= c->lim->dense_max;
    long total = exact ? (long)D : (long)probes;
    size_t chunk = total < 32 ? (size_t)total : 32;
    double *X = malloc(sizeof(double) * chunk * D), *Y = malloc(sizeof(double) * chunk * D),
           *K = malloc(sizeof(double) * chunk * D);
    int rc = cv_curv_agree(c->curv, X && Y && K ? 0
                                    : cv_err_set(e, CV_ENOMEM, "out_of_memory", "",
                                                 "comparison vectors"), e);
    cv_rng r;
    cv_rng_seed_stream(&r, c->seed, KFAC_PROBE_SALT ^ stream);
    double num = 0, den = 0;
    cv_progress_plan(c->progress, total);
    for (long j = 0; j < total && !rc; j += (long)chunk) {
        size_t kk = (size_t)(total - j) < chunk ? (size_t)(total - j) : chunk;
        if (exact) {
            memset(X, 0, sizeof(double) * kk * D);
            for (size_t q = 0; q < kk; q++)
                X[q * D + (size_t)j + q] = 1.0;
        } else {
            cv_rng_rademacher(&r, X, kk * D);
        }
        rc = cv_linop_apply(F, (int)kk, X, Y, e);
        if (!rc)
            rc = cv_kron_block_apply(kb, NULL, 0.0, (int)kk, X, K, e);
        for (size_t i = 0; i < kk * D && !rc; i++) {
            num += (K[i] - Y[i]) * (K[i] - Y[i]);
            den += Y[i] * Y[i];
        }
    }
    free(X);
    free(Y);
    free(K);
    if (rc)
        return -1;
    add_num(out, "relative_frobenius_error", den > 0 ? sqrt(num / den) : (num > 0 ? INFINITY : 0));
    cJSON_AddStringToObject(out, "frobenius_method", exact ? "exact" : "hutchinson");
    if (!exact)
        cJSON_AddNumberToObject(out, "compare_probes", probes);
    return 0;
}

/* lambda_max(F) by Lanczos on the exact block. */
static int exact_top(cv_op_ctx *c, const cv_linop *F, uint64_t stream, double *top, cv_err *e)
{
    cv_eigen_options o;
    cv_eigen_options_default(&o);
    o.k = 1;
    o.which = CV_WHICH_LARGEST;
    o.tol = 1e-8;
    cv_rng r;
    cv_rng_seed_stream(&r, c->seed, (KFAC_PROBE_SALT + 1) ^ stream);
    cv_eigen_result res;
    if (cv_eigen_lanczos(F, &o, &r, &res, e))
        return -1;
    *top = res.eigenvalues[0];
    cv_eigen_result_free(&res);
    return 0;
}

/* cos(-(K + d I)^-1 g, -(F + d I)^-1 g) with g the layer's gradient. */
static int newton_cosine(cv_op_ctx *c, cv_kron_block *kb, const cv_block *blk, const cv_linop *F,
                         double d, cJSON *out, cv_err *e)
{
    size_t D = kb->dim;
    double *g = malloc(sizeof(double) * D), *sk = malloc(sizeof(double) * D);
    int rc = cv_curv_agree(c->curv, g && sk ? 0
                                    : cv_err_set(e, CV_ENOMEM, "out_of_memory", "",
                                                 "Newton directions"), e);
    if (!rc)
        rc = cv_curv_gradient(c->curv, blk, g, e);
    if (!rc)
        rc = cv_kron_block_inverse(kb, NULL, d, 1, g, sk, e);
    cv_solve_options so;
    cv_solve_options_default(&so);
    so.damping = d;
    so.tol = 1e-10;
    cv_solve_result sr = {0};
    if (!rc)
        rc = cv_solve(F, g, &so, &sr, NULL, e);
    if (!rc) {
        double nk = sqrt(sumsq(sk, D)), nf = sqrt(sumsq(sr.x, D));
        add_num(out, "newton_cosine", nk > 0 && nf > 0 ? dot(sk, sr.x, D) / (nk * nf) : NAN);
        cJSON_AddNumberToObject(out, "newton_cg_iterations", sr.iterations);
        cJSON_AddNumberToObject(out, "newton_cg_residual", sr.residual);
    }
    cv_solve_result_free(&sr);
    free(g);
    free(sk);
    return rc;
}

static int compare_layer(cv_op_ctx *c, const kfac_args *a, cv_kron_block *kb,
                         const cv_kron_factor *f, uint64_t stream, cJSON *lo, cv_err *e)
{
    cv_curvature kind = cv_kron_fisher_curvature((cv_kron_fisher)a->fisher_type);
    cv_linop F;
    cv_curv_linop_ctx lc;
    cv_curv_linop(&F, &lc, c->curv, kind, &f->block, c->progress);
    cJSON *cmp = cJSON_AddObjectToObject(lo, "compare");
    cJSON_AddStringToObject(cmp, "curvature", cv_curvature_name(kind));
    if (frobenius(c, kb, &F, a->compare_probes, stream, cmp, e))
        return -1;
    double topf, topk;
    if (exact_top(c, &F, stream, &topf, e) ||
        cv_kron_block_eigen(kb, NULL, CV_WHICH_LARGEST, 1, &topk, NULL, NULL, e))
        return -1;
    cJSON_AddNumberToObject(cmp, "lambda_max", topk);
    cJSON_AddNumberToObject(cmp, "lambda_max_exact", topf);
    add_num(cmp, "top_eigenvalue_ratio", topf != 0 ? topk / topf : NAN);
    double d = a->damping >= 0 ? a->damping : 1e-3 * topf;
    add_num(cmp, "damping", d);
    if (!(d > 0)) { /* F = 0 (or no damping given): no positive definite system */
        cJSON_AddNullToObject(cmp, "newton_cosine");
        return 0;
    }
    return newton_cosine(c, kb, &f->block, &F, d, cmp, e);
}

/* ---- the op -------------------------------------------------------------------- */

static int kron_layer_json(cv_op_ctx *c, const kfac_args *a, const cv_kron_factor *f,
                           uint64_t stream, cJSON *lo, cv_err *e)
{
    cv_kron_block kb;
    if (cv_kron_block_init(&kb, f->dim_a - f->has_bias, f->dim_b, f->has_bias, f->A, f->B, 0, e))
        return -1;
    /* eigenvalues only unless compare needs the eigenvectors too */
    double *la = malloc(sizeof(double) * (size_t)(f->dim_a + f->dim_b)), *mb = la + f->dim_a;
    int rc = !la         ? cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "factor eigenvalues")
             : a->compare ? cv_kron_block_eig(&kb, e)
             : !a->eigenvalues ? 0
             : cv_kron_factor_eigenvalues_rank(f->A, f->dim_a, f->rank_a, la, e) ||
                     cv_kron_factor_eigenvalues_rank(f->B, f->dim_b, f->rank_b, mb, e)
                 ? -1
                 : 0;
    if (!rc && a->compare) {
        memcpy(la, kb.lam_a, sizeof(double) * (size_t)f->dim_a);
        memcpy(mb, kb.mu_b, sizeof(double) * (size_t)f->dim_b);
    }
    if (!rc) {
        cJSON_AddNumberToObject(lo, "dim_a", f->dim_a);
        cJSON_AddNumberToObject(lo, "dim_b", f->dim_b);
        cJSON_AddBoolToObject(lo, "bias", f->has_bias);
        cJSON_AddNumberToObject(lo, "trace_a", kb.tr_a);
        cJSON_AddNumberToObject(lo, "trace_b", kb.tr_b);
        cJSON_AddNumberToObject(lo, "trace", kb.tr_a * kb.tr_b);
        if (a->eigenvalues || a->compare) {
            cJSON_AddItemToObject(lo, "eigenvalues_a", cv_json_doubles(la, (size_t)f->dim_a));
            cJSON_AddItemToObject(lo, "eigenvalues_b", cv_json_doubles(mb, (size_t)f->dim_b));
        }
        if (a->return_factors) {
            cJSON_AddItemToObject(lo, "A", json_matrix(f->A, f->dim_a));
            cJSON_AddItemToObject(lo, "B", json_matrix(f->B, f->dim_b));
        }
    }
    free(la);
    if (!rc && a->compare)
        rc = compare_layer(c, a, &kb, f, stream, lo, e);
    cv_kron_block_free(&kb);
    return rc;
}

static cJSON *layer_head(cv_op_ctx *c, const cv_block *b, const char *kind)
{
    cJSON *lo = cJSON_CreateObject();
    cJSON_AddStringToObject(lo, "name", b->name);
    cJSON_AddItemToObject(lo, "params", cv_json_param_names(c->m, b));
    cJSON_AddStringToObject(lo, "kind", kind);
    cJSON_AddNumberToObject(lo, "dim", (double)b->dim);
    return lo;
}

static int run_kfac(cv_op_ctx *c, const cv_block *b, cJSON *out, cv_err *e)
{
    const kfac_args *a = c->opts->args;
    cv_kron_options ko = {(cv_kron_fisher)a->fisher_type, (cv_kron_approx)a->approx, 0, 0};
    cv_kron k;
    if (cv_curv_kron(c->curv, &ko, &k, e)) {
        cv_kron_free(&k);
        return -1;
    }
    cJSON_AddStringToObject(out, "fisher_type", cv_kron_fisher_name(ko.fisher_type));
    cJSON_AddStringToObject(out, "kfac_approx", cv_kron_approx_name(ko.approx));
    cJSON_AddStringToObject(out, "exact_curvature",
                            cv_curvature_name(cv_kron_fisher_curvature(ko.fisher_type)));
    cJSON_AddNumberToObject(out, "columns", k.columns);
    cJSON *layers = cJSON_AddArrayToObject(out, "layers");
    /* merge the Kronecker and the exact blocks by their first tensor (both
     * lists are in the model's order) */
    int i = 0, x = 0, rc = 0;
    uint64_t stream = 0;
    while (!rc && (i < k.nfactors || x < k.nexact)) {
        int take_f = x >= k.nexact ||
                     (i < k.nfactors && k.factors[i].block.idx[0] < k.exact[x].idx[0]);
        const cv_block *lb = take_f ? &k.factors[i].block : &k.exact[x];
        cJSON *lo = layer_head(c, lb, take_f ? "kronecker" : "exact");
        cJSON_AddItemToArray(layers, lo);
        if (take_f)
            rc = kron_layer_json(c, a, &k.factors[i++], ++stream, lo, e);
        else
            x++;
    }
    cv_kron_free(&k);
    return rc;
}

static const char *const kfac_results[] = {"fisher_type", "kfac_approx", "exact_curvature",
                                           "columns", "layers", NULL};

/* Memory: a few vectors of the whole parameter vector (the comparison takes
 * chunks of 32 vectors of one layer), and the factors with their eigenvalues
 * (compare: their eigendecompositions, for the exact Kronecker inverse). */
static void mem_kfac(const cv_opts *o, cv_curvature kind, const cv_block *b, size_t n, int C,
                     cv_op_memory *m)
{
    const kfac_args *a = o->args;
    m->vector_bytes = cv_op_bytes((a->compare ? 100.0 : 2.0) * (double)b->dim * sizeof(double));
    m->max_vectors = a->compare ? 32 : 1;
    m->pairs = 0;
    cv_op_kron_memory(CV_CURV_KFAC, a->fisher_type, a->base.mc_samples, C,
                      a->compare ? CV_OP_KRON_MEM_EIGEN : 0, m);
    if (!a->compare)
        m->factor_bytes += cv_op_bytes(m->kron.linear * sizeof(double));
}

const cv_op_def cv_op_kfac = {"kfac",      kfac_opts, NULL,    sizeof(kfac_args), kfac_defaults,
                              0,           0,         check_kfac, run_kfac,      kfac_results,
                              NULL,        mem_kfac, NULL};
