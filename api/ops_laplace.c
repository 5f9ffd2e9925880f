/* ops_laplace.c - the "laplace" op (issue 23, item 1): the Laplace
 * approximation of the posterior of a MAP network, N(theta, P^-1) with
 * P = G_sum / (sigma^2 T) + P0, and its log marginal likelihood, with the
 * prior precision (and the Gaussian noise) optionally maximizing it.  Builds
 * the curvature of the chosen structure once (the dense GGN, its exact
 * diagonal, the KFAC type-2 factors' eigenvalues, its top-k eigenpairs by
 * Lanczos; last_layer: one of these on the last parameterised layer) and
 * hands it to engine/laplace.h for the evidence and its optimization.
 *
 * Scaling: curvd's ggn is the GGN of the job's loss as reduced,
 * L = c sum_n l_n (engine/curv.h); the summed negative log-likelihood is
 * kappa L / c with kappa = 1/2 for MSELoss (the Gaussian's 1/2 ||y - f||^2
 * at sigma = 1: PyTorch's squared error is twice that) and 1 otherwise, so
 * G_sum = (kappa / c) ggn ("ggn_factor" in the result) and likewise for the
 * Kronecker factor B (A is the averaged input factor, as laplace-torch's
 * KronLaplace).
 *
 * One result (not blockwise): the posterior covers every parameter
 * (last_layer: the last layer's), its prior blocks are the layer blocks
 * (one per module that owns parameters, blocks "layer"'s). */
#include <lapacke.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/op_util.h"
#include "api/ops.h"
#include "engine/estimators.h"
#include "engine/kron.h"
#include "engine/kronop.h"
#include "engine/laplace.h"
#include "engine/rng.h"

#define LAPLACE_PROBE_SALT 0x1a91ace0000ull

enum { S_FULL = 0, S_DIAG, S_KRON, S_LOWRANK, S_LAST_LAYER };
#define STRUCTURES "full|diag|kron|lowrank|last_layer"
#define INNER_STRUCTURES "full|diag|kron|lowrank"

typedef struct {
    cv_op_base base;
    int structure;
    int last_layer_structure;   /* the structure on the last layer (last_layer) */
    cv_opt_num_list prior;      /* prior_precision */
    double sigma_noise, temperature;
    int optimize_prior, optimize_sigma;
    int k;
    size_t post_dim;            /* the posterior's dimension, recorded at bind for the
                                 * memory plan (last_layer: the last layer's) */
} laplace_args;

static const cv_opt_spec laplace_opts[] = {
    {"structure", CV_OPT_ENUM, 0, 0, STRUCTURES, offsetof(laplace_args, structure), NULL},
    {"last_layer_structure", CV_OPT_ENUM, 0, 0, INNER_STRUCTURES,
     offsetof(laplace_args, last_layer_structure), NULL},
    {"prior_precision", CV_OPT_NUM_OR_LIST, 0, 1e300, NULL, offsetof(laplace_args, prior), NULL},
    {"sigma_noise", CV_OPT_NUM, 0, 1e300, NULL, offsetof(laplace_args, sigma_noise), NULL},
    {"temperature", CV_OPT_NUM, 0, 1e300, NULL, offsetof(laplace_args, temperature), NULL},
    {"optimize_prior", CV_OPT_BOOL, 0, 0, NULL, offsetof(laplace_args, optimize_prior), NULL},
    {"optimize_sigma", CV_OPT_BOOL, 0, 0, NULL, offsetof(laplace_args, optimize_sigma), NULL},
    {"k", CV_OPT_INT, 1, 1e9, NULL, offsetof(laplace_args, k), NULL},
    CV_OPT_END};
CV_OPT_TABLE_FITS(laplace_opts);

static void laplace_defaults(void *p, int method)
{
    laplace_args *a = p;
    a->structure = S_KRON;             /* laplace-torch's default hessian_structure */
    a->last_layer_structure = S_FULL;
    a->prior.num = 1.0;                /* laplace-torch's default prior_precision */
    a->sigma_noise = 1.0;
    a->temperature = 1.0;
    a->k = 10;
}

/* The structure the curvature is built with (last_layer: its inner one). */
static int inner_structure(const laplace_args *a)
{
    return a->structure == S_LAST_LAYER ? a->last_layer_structure : a->structure;
}

static int positive(double x, const char *field, cv_err *e)
{
    return x > 0 ? 0
                 : cv_err_set(e, CV_EINVAL, "invalid_option", field,
                              "%s must be > 0, got %g", field, x);
}

static int check_laplace(const cv_opts *o, cv_curvature kind, cv_err *e)
{
    const laplace_args *a = o->args;
    if (a->prior.is_list) {
        for (int i = 0; i < a->prior.list.n; i++) {
            char f[64];
            snprintf(f, sizeof f, "options.prior_precision[%d]", i);
            if (positive(a->prior.list.v[i], f, e))
                return -1;
        }
    } else if (positive(a->prior.num, "options.prior_precision", e)) {
        return -1;
    }
    if (positive(a->sigma_noise, "options.sigma_noise", e) ||
        positive(a->temperature, "options.temperature", e))
        return -1;
    if (cv_opts_given(o, "k") && inner_structure(a) != S_LOWRANK)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.k",
                          "options.k applies with structure lowrank (or last_layer with "
                          "last_layer_structure lowrank)");
    if (cv_opts_given(o, "last_layer_structure") && a->structure != S_LAST_LAYER)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.last_layer_structure",
                          "options.last_layer_structure applies with structure last_layer");
    return 0;
}

/* ---- the model's blocks ------------------------------------------------------- */

/* The layer blocks the posterior covers (all, or the last) into *out (malloc'd). */
static int prior_blocks(const cv_model *m, int last_layer, cv_block **out, int *n, cv_err *e)
{
    int nl = cv_blocks_per_layer(m, NULL, 0);
    cv_block *lb = calloc((size_t)(nl > 0 ? nl : 1), sizeof *lb);
    if (!lb)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "layer blocks");
    if (nl < 1) {
        free(lb);
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.structure",
                          "the model has no parameters");
    }
    cv_blocks_per_layer(m, lb, nl);
    if (last_layer) {
        lb[0] = lb[nl - 1];
        nl = 1;
    }
    *out = lb;
    *n = nl;
    return 0;
}

static int bind_laplace(const cv_opts *o, const cv_model *m, const cv_block *blocks, int n,
                        cv_err *e)
{
    laplace_args *a = o->args;
    if (m->loss != CV_LOSS_MSE) {
        static const char *const names[] = {"sigma_noise", "optimize_sigma"};
        for (int i = 0; i < 2; i++)
            if (cv_opts_given(o, names[i])) {
                char f[48];
                snprintf(f, sizeof f, "options.%s", names[i]);
                return cv_err_set(e, CV_EINVAL, "invalid_option", f,
                                  "%s applies to a Gaussian likelihood (MSELoss); the model's "
                                  "loss is a classification loss",
                                  f);
            }
    }
    cv_block *lb;
    int nb;
    if (prior_blocks(m, a->structure == S_LAST_LAYER, &lb, &nb, e))
        return -1;
    size_t dim = 0;
    for (int i = 0; i < nb; i++)
        dim += lb[i].dim;
    free(lb);
    a->post_dim = dim;
    if (a->prior.is_list && a->prior.list.n != nb)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.prior_precision",
                          "options.prior_precision has %d numbers; the posterior has %d layer "
                          "block%s (one number, or one per block)",
                          a->prior.list.n, nb, nb == 1 ? "" : "s");
    if (inner_structure(a) == S_LOWRANK && cv_opts_given(o, "k") && (size_t)a->k > dim)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.k",
                          "options.k = %d exceeds the posterior's dimension %zu", a->k, dim);
    return 0;
}

/* The index in lb of the layer block holding tensor t, or -1. */
static int block_of_tensor(const cv_block *lb, int nb, int t)
{
    for (int b = 0; b < nb; b++)
        for (int i = 0; i < lb[b].count; i++)
            if (lb[b].idx[i] == t)
                return b;
    return -1;
}

/* The target block tb (the union of lb, in state_dict order) and the layer
 * block of each of its coordinates (owner: tb->dim ints, malloc'd). */
static int target_block(const cv_model *m, const cv_block *lb, int nb, cv_block *tb, int **owner,
                        cv_err *e)
{
    int idx[2 * CV_MAX_LAYERS], count = 0;
    for (int b = 0; b < nb; b++)
        for (int i = 0; i < lb[b].count && count < 2 * CV_MAX_LAYERS; i++)
            idx[count++] = lb[b].idx[i];
    if (cv_block_from_indices(m, idx, count, tb, e))
        return -1;
    *owner = malloc(sizeof(int) * (tb->dim ? tb->dim : 1));
    if (!*owner)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "coordinate owners");
    size_t off = 0;
    for (int i = 0; i < tb->count; i++) {
        const cv_tensor_info *ti = cv_model_param(m, tb->idx[i]);
        if (ti->shared)
            continue;
        int b = block_of_tensor(lb, nb, tb->idx[i]);
        for (size_t j = 0; j < ti->numel && off < tb->dim; j++)
            (*owner)[off++] = b;
    }
    return 0;
}

/* ||theta_b||^2 of block b's own tensors. */
static double block_sq_norm(const cv_model *m, const cv_block *b)
{
    double s = 0;
    for (int i = 0; i < b->count; i++) {
        const cv_tensor_info *ti = cv_model_param(m, b->idx[i]);
        if (ti->shared)
            continue;
        const float *p = m->params + ti->offset;
        for (size_t j = 0; j < ti->numel; j++)
            s += (double)p[j] * p[j];
    }
    return s;
}

/* ---- the curvature of each structure ----------------------------------------- */

typedef struct {
    cv_op_ctx *c;
    const laplace_args *a;
    const cv_block *lb;   /* prior blocks */
    int nb;
    cv_block tb;          /* their union */
    int *owner;
    double factor;        /* G_sum = factor * ggn */
    int per_block;        /* a list of prior precisions (one per block) */
    cv_laplace L;
    double *eigenvalues;  /* lowrank: the top-k of G_sum (owned) */
    int eig_k, eig_converged;
} build;

static int dense_ggn(build *s, const cv_block *b, double **G, cv_err *e)
{
    if (b->dim > s->c->lim->dense_max)
        return cv_err_set(e, CV_ETOOLARGE, "too_large", "options.structure",
                          "the dense %zu x %zu GGN%s%s exceeds the dense limit %zu (--dense-max)%s",
                          b->dim, b->dim, b->name[0] ? " of layer " : "", b->name,
                          s->c->lim->dense_max,
                          inner_structure(s->a) == S_KRON
                              ? " (a layer without a Kronecker structure gets its exact block)"
                              : " (use structure kron or lowrank, or last_layer)");
    *G = malloc(sizeof(double) * (b->dim ? b->dim * b->dim : 1));
    if (cv_curv_agree(s->c->curv, *G ? 0 : cv_err_set(e, CV_ENOMEM, "out_of_memory", "",
                                                      "dense GGN"), e))
        return -1;
    cv_progress_plan(s->c->progress, (long)b->dim);
    if (cv_curv_dense(s->c->curv, CV_CURV_GGN, b, s->c->lim->dense_max, *G, e))
        return -1;
    for (size_t i = 0; i < b->dim * b->dim; i++)
        (*G)[i] *= s->factor;
    return 0;
}

/* Eigenvalues of the symmetric n x n M (destroyed) into w. */
static int sym_eigenvalues(double *M, size_t n, double *w, cv_err *e)
{
    if (n && LAPACKE_dsyevd(LAPACK_COL_MAJOR, 'N', 'U', (lapack_int)n, M, (lapack_int)n, w) != 0)
        return cv_err_set(e, CV_EINTERNAL, "internal", "", "eigendecomposition failed");
    return 0;
}

static int build_full(build *s, cv_err *e)
{
    double *G = NULL;
    if (dense_ggn(s, &s->tb, &G, e)) {
        free(G);
        return -1;
    }
    if (s->per_block && s->nb > 1) { /* P0 is not a multiple of I: Cholesky per evaluation */
        if (cv_laplace_init(&s->L, CV_LAPLACE_DENSE, s->nb, e)) {
            free(G);
            return -1;
        }
        s->L.G = G;
        s->L.owner = s->owner;
        s->owner = NULL;
        for (int b = 0; b < s->nb; b++)
            s->L.blocks[b].dim = s->lb[b].dim;
        s->L.dim = s->tb.dim;
        return 0;
    }
    size_t D = s->tb.dim;
    double *w = malloc(sizeof(double) * (D ? D : 1));
    int rc = w ? sym_eigenvalues(G, D, w, e)
               : cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "eigenvalues");
    free(G);
    if (!rc)
        rc = cv_laplace_init(&s->L, CV_LAPLACE_SPECTRA, 1, e);
    if (rc) {
        free(w);
        return -1;
    }
    s->L.blocks[0] = (cv_laplace_block){D, D, w, 0};
    s->L.dim = D;
    return 0;
}

/* SPECTRA with one block per prior block, values gathered from the
 * coordinates' values v (tb order). */
static int spectra_by_owner(build *s, const double *v, cv_err *e)
{
    if (cv_laplace_init(&s->L, CV_LAPLACE_SPECTRA, s->nb, e))
        return -1;
    for (int b = 0; b < s->nb; b++) {
        s->L.blocks[b].dim = s->lb[b].dim;
        s->L.blocks[b].vals = malloc(sizeof(double) * (s->lb[b].dim ? s->lb[b].dim : 1));
        if (!s->L.blocks[b].vals)
            return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "block spectra");
    }
    for (size_t i = 0; i < s->tb.dim; i++) {
        cv_laplace_block *k = &s->L.blocks[s->owner[i]];
        if (k->m < k->dim)
            k->vals[k->m++] = s->factor * v[i];
    }
    s->L.dim = s->tb.dim;
    return 0;
}

static int build_diag(build *s, cv_err *e)
{
    if (s->tb.dim > s->c->lim->dense_max)
        return cv_err_set(e, CV_ETOOLARGE, "too_large", "options.structure",
                          "the exact GGN diagonal needs %zu matvecs; allowed up to the dense "
                          "limit %zu (use structure kron or lowrank, or last_layer)",
                          s->tb.dim, s->c->lim->dense_max);
    cv_linop op;
    cv_curv_linop_ctx lc;
    cv_curv_linop(&op, &lc, s->c->curv, CV_CURV_GGN, &s->tb, s->c->progress);
    cv_diag_options o;
    cv_diag_options_default(&o);
    cv_diag_result r;
    if (cv_diag_exact(&op, &o, &r, e))
        return -1;
    int rc = spectra_by_owner(s, r.diag, e);
    cv_diag_result_free(&r);
    return rc;
}

/* The eigenvalues of the exact GGN block of layer block b (no Kronecker structure). */
static int exact_block_spectrum(build *s, const cv_block *b, cv_laplace_block *k, cv_err *e)
{
    double *G = NULL;
    int rc = dense_ggn(s, b, &G, e);
    k->vals = rc ? NULL : malloc(sizeof(double) * (b->dim ? b->dim : 1));
    if (!rc && !k->vals)
        rc = cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "block spectrum");
    if (!rc)
        rc = sym_eigenvalues(G, b->dim, k->vals, e);
    free(G);
    k->m = rc ? 0 : b->dim;
    return rc;
}

static int kron_block_spectrum(build *s, const cv_kron_factor *f, cv_laplace_block *k, cv_err *e)
{
    size_t da = (size_t)f->dim_a, db = (size_t)f->dim_b;
    double *la = malloc(sizeof(double) * (da + db)), *mb = la + da;
    k->vals = malloc(sizeof(double) * (da * db > 0 ? da * db : 1));
    int rc = la && k->vals ? 0 : cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "factor spectra");
    if (!rc)
        rc = cv_kron_factor_eigenvalues_rank(f->A, f->dim_a, f->rank_a, la, e) ||
                     cv_kron_factor_eigenvalues_rank(f->B, f->dim_b, f->rank_b, mb, e)
                 ? -1
                 : 0;
    /* eig(P (B (x) A) P^T) = {mu_i lam_j}; G_sum's B is B / c (times kappa) */
    for (size_t i = 0; i < db && !rc; i++)
        for (size_t j = 0; j < da; j++)
            k->vals[i * da + j] = s->factor * mb[i] * la[j];
    k->m = rc ? 0 : da * db;
    free(la);
    return rc;
}

static int build_kron(build *s, cv_err *e)
{
    cv_kron_options ko = {.fisher_type = CV_KRON_TYPE2, .approx = CV_KRON_EXPAND};
    cv_kron k;
    if (cv_curv_kron(s->c->curv, &ko, &k, e)) {
        cv_kron_free(&k);
        return -1;
    }
    int rc = cv_laplace_init(&s->L, CV_LAPLACE_SPECTRA, s->nb, e);
    for (int b = 0; b < s->nb && !rc; b++) {
        const cv_kron_factor *f = NULL;
        for (int i = 0; i < k.nfactors && !f; i++)
            if (k.factors[i].block.count == s->lb[b].count &&
                memcmp(k.factors[i].block.idx, s->lb[b].idx, sizeof(int) * (size_t)s->lb[b].count) == 0)
                f = &k.factors[i];
        s->L.blocks[b].dim = s->lb[b].dim;
        rc = f && (size_t)f->dim_a * f->dim_b == s->lb[b].dim
                 ? kron_block_spectrum(s, f, &s->L.blocks[b], e)
                 : exact_block_spectrum(s, &s->lb[b], &s->L.blocks[b], e);
    }
    s->L.dim = s->tb.dim;
    cv_kron_free(&k);
    return rc;
}

static int build_lowrank(build *s, cv_err *e)
{
    int vectors = s->per_block && s->nb > 1;
    cv_linop op;
    cv_curv_linop_ctx lc;
    cv_curv_linop(&op, &lc, s->c->curv, CV_CURV_GGN, &s->tb, s->c->progress);
    cv_eigen_options o;
    cv_eigen_options_default(&o);
    o.k = (size_t)s->a->k < s->tb.dim ? s->a->k : (int)s->tb.dim; /* the default 10 may exceed it */
    o.which = CV_WHICH_LARGEST;
    o.tol = 1e-10;
    o.return_vectors = vectors;
    cv_rng r;
    cv_rng_seed_stream(&r, s->c->seed, LAPLACE_PROBE_SALT);
    cv_eigen_result res;
    if (cv_eigen_lanczos(&op, &o, &r, &res, e))
        return -1;
    size_t K = (size_t)res.k, D = s->tb.dim;
    int rc = 0;
    s->eigenvalues = malloc(sizeof(double) * (K ? K : 1));
    double *lam = malloc(sizeof(double) * (K ? K : 1));
    if (!s->eigenvalues || !lam)
        rc = cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "eigenvalues");
    for (size_t i = 0; i < K && !rc; i++)
        lam[i] = s->eigenvalues[i] = s->factor * res.eigenvalues[i];
    s->eig_k = (int)K;
    s->eig_converged = res.converged;
    if (!rc && !vectors) {
        rc = cv_laplace_init(&s->L, CV_LAPLACE_SPECTRA, 1, e);
        if (!rc) {
            s->L.blocks[0] = (cv_laplace_block){D, K, lam, 0};
            lam = NULL;
        }
    } else if (!rc) {
        rc = cv_laplace_init(&s->L, CV_LAPLACE_LOWRANK, s->nb, e);
        if (!rc && !(s->L.W = calloc((size_t)s->nb * K * K, sizeof(double))))
            rc = cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "low-rank Gram matrices");
        for (size_t p = 0; p < D && !rc; p++) { /* W_b += v_p v_p^T over b's rows p */
            double *W = s->L.W + (size_t)s->owner[p] * K * K;
            for (size_t j = 0; j < K; j++)
                for (size_t i = 0; i < K; i++)
                    W[j * K + i] += res.eigenvectors[i * D + p] * res.eigenvectors[j * D + p];
        }
        for (int b = 0; b < s->nb && !rc; b++)
            s->L.blocks[b].dim = s->lb[b].dim;
        if (!rc) {
            s->L.k = (int)K;
            s->L.lam = lam;
            lam = NULL;
        }
    }
    free(lam);
    s->L.dim = D;
    cv_eigen_result_free(&res);
    return rc;
}

/* ---- the op -------------------------------------------------------------------- */

static const char *likelihood_name(cv_loss_type t)
{
    return t == CV_LOSS_MSE ? "gaussian" : t == CV_LOSS_BCE ? "bernoulli" : "categorical";
}

static void add_num(cJSON *o, const char *name, double x)
{
    if (isfinite(x))
        cJSON_AddNumberToObject(o, name, x);
    else
        cJSON_AddNullToObject(o, name);
}

/* The per-block entries: the prior's terms and, where G is block-diagonal
 * over the prior blocks (diag, kron, one block), each block's log det P. */
static void add_blocks(build *s, const double *bdelta, const double *blogdet, cJSON *out)
{
    const cv_model *m = s->c->m;
    cJSON *arr = cJSON_AddArrayToObject(out, "blocks");
    for (int b = 0; b < s->nb; b++) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddItemToArray(arr, o);
        cJSON_AddStringToObject(o, "name", s->lb[b].name);
        cJSON_AddItemToObject(o, "params", cv_json_param_names(m, &s->lb[b]));
        cJSON_AddNumberToObject(o, "dim", (double)s->lb[b].dim);
        add_num(o, "prior_precision", bdelta[b]);
        add_num(o, "log_det_prior_precision", (double)s->lb[b].dim * log(bdelta[b]));
        add_num(o, "scatter", bdelta[b] * block_sq_norm(m, &s->lb[b]));
        if (blogdet)
            add_num(o, "log_det_posterior_precision", blogdet[b]);
    }
}

static int evaluate(build *s, cJSON *out, cv_err *e)
{
    const laplace_args *a = s->a;
    cv_laplace *L = &s->L;
    int nl = L->nblocks, whole = nl != s->nb; /* one engine block for all prior blocks */
    double *delta = malloc(sizeof(double) * (size_t)(nl + 2 * s->nb));
    if (!delta)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "prior precisions");
    double *bdelta = delta + nl, *blogdet = bdelta + s->nb;
    for (int b = 0; b < nl; b++) {
        delta[b] = a->prior.is_list ? a->prior.list.v[whole ? 0 : b] : a->prior.num;
        L->blocks[b].sq_norm = 0;
    }
    for (int b = 0; b < s->nb; b++)
        L->blocks[whole ? 0 : b].sq_norm += block_sq_norm(s->c->m, &s->lb[b]);
    double sigma = a->sigma_noise;
    int evals = 0, rc = 0;
    if (a->optimize_prior || a->optimize_sigma)
        rc = cv_laplace_optimize(L, delta, a->prior.is_list && nl > 1, a->optimize_prior, &sigma,
                                 a->optimize_sigma, a->temperature, &evals, e);
    cv_laplace_terms t;
    if (!rc)
        rc = cv_laplace_eval(L, delta, sigma, a->temperature, &t, whole ? NULL : blogdet, e);
    if (!rc) {
        add_num(out, "log_marginal_likelihood", t.log_marginal_likelihood);
        add_num(out, "log_likelihood", t.log_likelihood);
        add_num(out, "log_det_posterior_precision", t.log_det_posterior_precision);
        add_num(out, "log_det_prior_precision", t.log_det_prior_precision);
        add_num(out, "scatter", t.scatter);
        for (int b = 0; b < s->nb; b++)
            bdelta[b] = delta[whole ? 0 : b];
        if (a->prior.is_list)
            cJSON_AddItemToObject(out, "prior_precision", cv_json_doubles(bdelta, (size_t)s->nb));
        else
            add_num(out, "prior_precision", delta[0]);
        add_num(out, "sigma_noise", L->gaussian ? sigma : 1.0);
        add_num(out, "temperature", a->temperature);
        if (a->optimize_prior || a->optimize_sigma)
            cJSON_AddNumberToObject(out, "evaluations", evals);
        int separable = L->kind == CV_LAPLACE_SPECTRA && !whole;
        add_blocks(s, bdelta, separable ? blogdet : NULL, out);
    }
    free(delta);
    return rc;
}

static int run_laplace(cv_op_ctx *c, const cv_block *full, cJSON *out, cv_err *e)
{
    const laplace_args *a = c->opts->args;
    const cv_model *m = c->m;
    build s = {0};
    s.c = c;
    s.a = a;
    s.per_block = a->prior.is_list;
    cv_block *lb = NULL;
    int rc = prior_blocks(m, a->structure == S_LAST_LAYER, &lb, &s.nb, e);
    s.lb = lb;
    if (!rc)
        rc = target_block(m, s.lb, s.nb, &s.tb, &s.owner, e);
    const cv_loss_state *ls = cv_curv_loss_state(c->curv);
    double kappa = m->loss == CV_LOSS_MSE ? 0.5 : 1.0;
    if (!rc && !(ls->scale > 0))
        rc = cv_err_set(e, CV_EINVAL, "invalid_batch", "batch",
                        "the batch has no loss terms (every target is ignored)");
    int inner = inner_structure(a);
    if (!rc) {
        s.factor = kappa / ls->scale;
        rc = inner == S_FULL   ? build_full(&s, e)
             : inner == S_DIAG ? build_diag(&s, e)
             : inner == S_KRON ? build_kron(&s, e)
                               : build_lowrank(&s, e);
    }
    if (!rc) {
        s.L.nll = kappa * cv_curv_loss(c->curv) / ls->scale;
        s.L.gaussian = m->loss == CV_LOSS_MSE;
        s.L.n_outputs = (double)cv_curv_batch_size(c->curv) * cv_model_output_dim(m);
        static const char *const names[] = {"full", "diag", "kron", "lowrank", "last_layer"};
        cJSON_AddStringToObject(out, "structure", names[a->structure]);
        if (a->structure == S_LAST_LAYER)
            cJSON_AddStringToObject(out, "last_layer_structure", names[inner]);
        cJSON_AddStringToObject(out, "likelihood", likelihood_name(m->loss));
        cJSON_AddNumberToObject(out, "ggn_factor", s.factor);
        cJSON_AddNumberToObject(out, "n_params", (double)s.tb.dim);
        if (inner == S_LOWRANK) {
            cJSON_AddNumberToObject(out, "k", s.eig_k);
            cJSON_AddItemToObject(out, "eigenvalues", cv_json_doubles(s.eigenvalues, (size_t)s.eig_k));
            cJSON_AddNumberToObject(out, "converged", s.eig_converged);
        }
        rc = evaluate(&s, out, e);
    }
    cv_laplace_free(&s.L);
    free(s.owner);
    free(s.eigenvalues);
    free(lb);
    return rc;
}

static const char *const laplace_results[] = {
    "structure", "last_layer_structure", "likelihood", "ggn_factor", "n_params", "k",
    "eigenvalues", "converged", "log_marginal_likelihood", "log_likelihood",
    "log_det_posterior_precision", "log_det_prior_precision", "scatter", "prior_precision",
    "sigma_noise", "temperature", "evaluations", NULL}; /* and "blocks" (the envelope's name) */

/* Memory (in vectors of the posterior's dimension): full: the dense GGN, a
 * Cholesky factor and an inverse; lowrank: the Lanczos basis;
 * diag: the exact diagonal's identity columns; kron: the dense blocks of the
 * layers without a Kronecker structure (products of up to 64 identity
 * columns; the factors are the engine's). */
static void mem_laplace(const cv_opts *o, cv_curvature kind, const cv_block *b, size_t n, int C,
                        cv_op_memory *m)
{
    const laplace_args *a = o->args;
    /* vectors of the posterior's dimension (the job's block before bind) */
    double D = (double)(a->post_dim ? a->post_dim : b->dim), vec = 4;
    int inner = inner_structure(a), maxv = 1;
    if (inner == S_FULL) { /* G, P's factor, the Newton step's inverse */
        vec = 3 * D + 130;
        maxv = 64;
    } else if (inner == S_DIAG) {
        vec = 70;
        maxv = 32;
    } else if (inner == S_KRON) { /* layers without a Kronecker structure: their dense block */
        vec = 70;
        maxv = 64;
    } else if (inner == S_LOWRANK) {
        double steps = 10.0 * a->k > 100 ? 10.0 * a->k : 100;
        vec = (steps < D ? steps : D) + 2.0 * a->k + 4;
    }
    m->vector_bytes = cv_op_bytes(vec * D * sizeof(double));
    m->max_vectors = maxv;
    m->pairs = 0;
}

const cv_op_def cv_op_laplace = {"laplace",      laplace_opts,   NULL,        sizeof(laplace_args),
                                 laplace_defaults, 0,            0,           check_laplace,
                                 run_laplace,    laplace_results, NULL,       mem_laplace,
                                 bind_laplace};
