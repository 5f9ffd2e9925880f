/* ops_predict.c - the "predict" op (issue 23, item 2): the linearized (GLM)
 * predictive of a Laplace posterior, f(x) +- J P^-1 J^T, on the job's batch
 * or on inputs options.x, with laplace-torch's link approximations (probit,
 * Monte Carlo), the predictive's NLL / accuracy / ECE against the batch's
 * targets, and posterior samples.
 *
 * The posterior is built on the job's batch exactly as op laplace builds it
 * (api/ops_laplace.c: the same options and scaling, G_sum = ggn_factor * ggn,
 * P = G_sum / (sigma^2 T) + P0, the same optimization of the prior and the
 * noise), but kept whole (engine/posterior.h: a Cholesky factor, a diagonal,
 * Kronecker eigenbases, a Woodbury low rank).  The predictive takes the
 * output Jacobians J_n of the points predicted (the batch's samples, or
 * options.x's) from engines of their own over chunks of those samples: per
 * chunk one vjp with C one-hot cotangents per sample (J_n^T e_c), whitened
 * by the posterior, J_n P^-1 J_n^T = W_n^T W_n (- Wm_n^T Wm_n, low rank).
 * Data-parallel jobs gather the batch and predict it on every rank. */
#include <lapacke.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>

#include "api/op_util.h"
#include "api/ops.h"
#include "engine/estimators.h"
#include "engine/kron.h"
#include "engine/kronop.h"
#include "engine/laplace.h"
#include "engine/posterior.h"
#include "engine/rng.h"

#define PREDICT_PROBE_SALT 0x1a91ace0000ull /* op laplace's Lanczos start (the same basis) */
#define PREDICT_MC_SALT 0x9e3d1c7a5ull     /* mc_probs: stream n draws sample n's logits */
#define PREDICT_THETA_SALT 0x7e7a5a3b1ull  /* posterior_samples: stream t draws sample t */
#define PREDICT_MAX_COV_OUTPUTS 256        /* return_covariance: outputs per sample */
#define PREDICT_MAX_SAMPLE_ENTRIES 1e7     /* posterior_samples: samples x parameters */
#define PREDICT_CHUNK_DOUBLES ((size_t)1 << 22) /* a chunk's D x (samples * C) Jacobian */

enum { S_FULL = 0, S_DIAG, S_KRON, S_LOWRANK, S_LAST_LAYER };

typedef struct {
    cv_op_base base;
    int structure, last_layer_structure;
    cv_opt_num_list prior;
    double sigma_noise, temperature;
    int optimize_prior, optimize_sigma;
    int k;
    cv_opt_list x;
    int return_covariance, samples, return_posterior_samples;
    size_t post_dim; /* recorded at bind_model for the memory plan */
} predict_args;

static const cv_opt_spec predict_opts[] = {
    {"structure", CV_OPT_ENUM, 0, 0, "full|diag|kron|lowrank|last_layer",
     offsetof(predict_args, structure), NULL},
    {"last_layer_structure", CV_OPT_ENUM, 0, 0, "full|diag|kron|lowrank",
     offsetof(predict_args, last_layer_structure), NULL},
    {"prior_precision", CV_OPT_NUM_OR_LIST, 0, 1e300, NULL, offsetof(predict_args, prior), NULL},
    {"sigma_noise", CV_OPT_NUM, 0, 1e300, NULL, offsetof(predict_args, sigma_noise), NULL},
    {"temperature", CV_OPT_NUM, 0, 1e300, NULL, offsetof(predict_args, temperature), NULL},
    {"optimize_prior", CV_OPT_BOOL, 0, 0, NULL, offsetof(predict_args, optimize_prior), NULL},
    {"optimize_sigma", CV_OPT_BOOL, 0, 0, NULL, offsetof(predict_args, optimize_sigma), NULL},
    {"k", CV_OPT_INT, 1, 1e9, NULL, offsetof(predict_args, k), NULL},
    {"x", CV_OPT_LIST, 0, 0, NULL, offsetof(predict_args, x), NULL},
    {"return_covariance", CV_OPT_BOOL, 0, 0, NULL, offsetof(predict_args, return_covariance),
     NULL},
    {"samples", CV_OPT_INT, 1, 100000, NULL, offsetof(predict_args, samples), NULL},
    {"return_posterior_samples", CV_OPT_BOOL, 0, 0, NULL,
     offsetof(predict_args, return_posterior_samples), NULL},
    CV_OPT_END};
CV_OPT_TABLE_FITS(predict_opts);

static void predict_defaults(void *p, int method)
{
    predict_args *a = p;
    a->structure = S_KRON; /* as op laplace */
    a->last_layer_structure = S_FULL;
    a->prior.num = 1.0;
    a->sigma_noise = 1.0;
    a->temperature = 1.0;
    a->k = 10;
    a->samples = 100; /* laplace-torch's n_samples */
}

static int inner_structure(const predict_args *a)
{
    return a->structure == S_LAST_LAYER ? a->last_layer_structure : a->structure;
}

static int positive(double x, const char *field, cv_err *e)
{
    return x > 0 ? 0
                 : cv_err_set(e, CV_EINVAL, "invalid_option", field,
                              "%s must be > 0, got %g", field, x);
}

static int check_predict(const cv_opts *o, cv_curvature kind, cv_err *e)
{
    const predict_args *a = o->args;
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
    if (a->return_posterior_samples && inner_structure(a) == S_LOWRANK)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.return_posterior_samples",
                          "posterior samples are drawn for structure full, diag and kron (and "
                          "last_layer with those); not for lowrank");
    if (cv_opts_given(o, "x") && a->x.n < 1)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.x",
                          "options.x must hold at least one sample");
    return 0;
}

/* ---- the model's blocks (as op laplace) --------------------------------------- */

static int prior_blocks(const cv_model *m, int last_layer, cv_block **out, int *n, cv_err *e)
{
    int nl = cv_blocks_per_layer(m, NULL, 0);
    if (nl < 1)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.structure",
                          "the model has no parameters");
    cv_block *lb = calloc((size_t)nl, sizeof *lb);
    if (!lb)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "layer blocks");
    cv_blocks_per_layer(m, lb, nl);
    if (last_layer) {
        lb[0] = lb[nl - 1];
        nl = 1;
    }
    *out = lb;
    *n = nl;
    return 0;
}

static int bind_predict(const cv_opts *o, const cv_model *m, const cv_block *blocks, int n,
                        cv_err *e)
{
    predict_args *a = o->args;
    if (m->loss != CV_LOSS_MSE) {
        static const char *const names[] = {"sigma_noise", "optimize_sigma"};
        for (int i = 0; i < 2; i++)
            if (cv_opts_given(o, names[i]))
                return cv_err_set(e, CV_EINVAL, "invalid_option",
                                  i ? "options.optimize_sigma" : "options.sigma_noise",
                                  "options.%s applies to a Gaussian likelihood (MSELoss); the "
                                  "model's loss is a classification loss",
                                  names[i]);
    }
    if (cv_loss_is_class(m->loss)) {
        cv_loss_layout lay;
        cv_loss_layout_of(m, &lay);
        if (lay.positions != 1)
            return cv_err_set(e, CV_EINVAL, "invalid_model", "model",
                              "predict takes a classifier with one class vector per sample "
                              "(output shape [K]); this model's output has %d positions",
                              lay.positions);
    }
    int C = cv_model_output_dim(m);
    if (a->return_covariance && C > PREDICT_MAX_COV_OUTPUTS)
        return cv_err_set(e, CV_EINVAL, "too_large", "options.return_covariance",
                          "options.return_covariance returns C x C per sample; the model has "
                          "%d outputs (at most %d)", C, PREDICT_MAX_COV_OUTPUTS);
    size_t in = cv_shape_numel(&m->input_shape);
    if (cv_opts_given(o, "x") && (in == 0 || (size_t)a->x.n % in != 0))
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.x",
                          "options.x has %d numbers; it must hold whole samples of the model's "
                          "input (%zu numbers each, [N, *input_shape] flattened row-major)",
                          a->x.n, in);
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
    if (a->return_posterior_samples && (double)a->samples * dim > PREDICT_MAX_SAMPLE_ENTRIES)
        return cv_err_set(e, CV_EINVAL, "too_large", "options.samples",
                          "options.samples x the posterior's %zu parameters exceeds %.0f numbers "
                          "(fewer samples, or structure last_layer)",
                          dim, PREDICT_MAX_SAMPLE_ENTRIES);
    return 0;
}

static int block_of_tensor(const cv_block *lb, int nb, int t)
{
    for (int b = 0; b < nb; b++)
        for (int i = 0; i < lb[b].count; i++)
            if (lb[b].idx[i] == t)
                return b;
    return -1;
}

/* ---- the posterior's curvature --------------------------------------------------- */

typedef struct {
    cv_op_ctx *c;
    const predict_args *a;
    cv_block *lb;          /* prior blocks */
    int nb;
    cv_block tb;           /* their union (the posterior's coordinates) */
    int *owner;            /* the prior block of each coordinate */
    double *theta;         /* the MAP parameters on tb */
    double factor;         /* G_sum = factor * ggn */
    int inner;
    /* the curvature (factor applied, except the Kronecker factors') */
    double *G;             /* full: D x D */
    double *d;             /* diag: D */
    cv_kron_block *kb;     /* kron: per prior block, dim > 0 when Kronecker ... */
    double **Gb;           /* ... else its exact dense block */
    double *V, *lam;       /* lowrank: D x K and K */
    int K, converged;
    /* the prior and the noise used */
    double *delta;         /* per prior block */
    double sigma;
} pstate;

static void pstate_free(pstate *s)
{
    for (int b = 0; s->kb && b < s->nb; b++)
        cv_kron_block_free(&s->kb[b]);
    for (int b = 0; s->Gb && b < s->nb; b++)
        free(s->Gb[b]);
    free(s->kb);
    free(s->Gb);
    free(s->lb);
    free(s->owner);
    free(s->theta);
    free(s->G);
    free(s->d);
    free(s->V);
    free(s->lam);
    free(s->delta);
}

/* tb, owner and theta from the prior blocks. */
static int target(pstate *s, cv_err *e)
{
    const cv_model *m = s->c->m;
    int idx[2 * CV_MAX_LAYERS], count = 0;
    for (int b = 0; b < s->nb; b++)
        for (int i = 0; i < s->lb[b].count && count < 2 * CV_MAX_LAYERS; i++)
            idx[count++] = s->lb[b].idx[i];
    if (cv_block_from_indices(m, idx, count, &s->tb, e))
        return -1;
    size_t D = s->tb.dim ? s->tb.dim : 1;
    s->owner = malloc(sizeof(int) * D);
    s->theta = malloc(sizeof(double) * D);
    if (!s->owner || !s->theta)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "coordinate owners");
    size_t off = 0;
    for (int i = 0; i < s->tb.count; i++) {
        const cv_tensor_info *ti = cv_model_param(m, s->tb.idx[i]);
        if (ti->shared)
            continue;
        int b = block_of_tensor(s->lb, s->nb, s->tb.idx[i]);
        const float *p = m->params + ti->offset;
        for (size_t j = 0; j < ti->numel && off < s->tb.dim; j++, off++) {
            s->owner[off] = b;
            s->theta[off] = p[j];
        }
    }
    return 0;
}

static int dense_ggn(pstate *s, const cv_block *b, double **G, cv_err *e)
{
    cv_op_ctx *c = s->c;
    if (b->dim > c->lim->dense_max)
        return cv_err_set(e, CV_ETOOLARGE, "too_large", "options.structure",
                          "the dense %zu x %zu GGN%s%s exceeds the dense limit %zu (--dense-max)",
                          b->dim, b->dim, b->name[0] ? " of layer " : "", b->name,
                          c->lim->dense_max);
    *G = malloc(sizeof(double) * (b->dim ? b->dim * b->dim : 1));
    if (cv_curv_agree(c->curv, *G ? 0 : cv_err_set(e, CV_ENOMEM, "out_of_memory", "",
                                                   "dense GGN"), e))
        return -1;
    cv_progress_plan(c->progress, (long)b->dim);
    if (cv_curv_dense(c->curv, CV_CURV_GGN, b, c->lim->dense_max, *G, e))
        return -1;
    for (size_t i = 0; i < b->dim * b->dim; i++)
        (*G)[i] *= s->factor;
    return 0;
}

static int build_diag(pstate *s, cv_err *e)
{
    if (s->tb.dim > s->c->lim->dense_max)
        return cv_err_set(e, CV_ETOOLARGE, "too_large", "options.structure",
                          "the exact GGN diagonal needs %zu matvecs; allowed up to the dense "
                          "limit %zu", s->tb.dim, s->c->lim->dense_max);
    cv_linop op;
    cv_curv_linop_ctx lc;
    cv_curv_linop(&op, &lc, s->c->curv, CV_CURV_GGN, &s->tb, s->c->progress);
    cv_diag_options o;
    cv_diag_options_default(&o);
    cv_diag_result r;
    if (cv_diag_exact(&op, &o, &r, e))
        return -1;
    s->d = r.diag;
    r.diag = NULL;
    cv_diag_result_free(&r);
    for (size_t i = 0; i < s->tb.dim; i++)
        s->d[i] *= s->factor;
    return 0;
}

/* A Kronecker block over factor f's copies (owned by kb). */
static int kron_block_of(const cv_kron_factor *f, cv_kron_block *kb, cv_err *e)
{
    size_t na = (size_t)f->dim_a * f->dim_a, nb = (size_t)f->dim_b * f->dim_b;
    double *A = malloc(sizeof(double) * na), *B = malloc(sizeof(double) * nb);
    if (!A || !B) {
        free(A);
        free(B);
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "Kronecker factors");
    }
    memcpy(A, f->A, sizeof(double) * na);
    memcpy(B, f->B, sizeof(double) * nb);
    return cv_kron_block_init(kb, f->dim_a - f->has_bias, f->dim_b, f->has_bias, A, B, 1, e);
}

static int build_kron(pstate *s, cv_err *e)
{
    cv_kron_options ko = {.fisher_type = CV_KRON_TYPE2, .approx = CV_KRON_EXPAND};
    cv_kron k;
    s->kb = calloc((size_t)s->nb, sizeof *s->kb);
    s->Gb = calloc((size_t)s->nb, sizeof *s->Gb);
    if (cv_curv_agree(s->c->curv, s->kb && s->Gb ? 0 : cv_err_set(e, CV_ENOMEM, "out_of_memory",
                                                                 "", "blocks"), e))
        return -1;
    int rc = cv_curv_kron(s->c->curv, &ko, &k, e);
    for (int b = 0; b < s->nb && !rc; b++) {
        const cv_kron_factor *f = NULL;
        for (int i = 0; i < k.nfactors && !f; i++)
            if (k.factors[i].block.count == s->lb[b].count &&
                memcmp(k.factors[i].block.idx, s->lb[b].idx,
                       sizeof(int) * (size_t)s->lb[b].count) == 0)
                f = &k.factors[i];
        if (f && (size_t)f->dim_a * f->dim_b == s->lb[b].dim)
            rc = kron_block_of(f, &s->kb[b], e) || cv_kron_block_eig(&s->kb[b], e) ? -1 : 0;
        else
            rc = dense_ggn(s, &s->lb[b], &s->Gb[b], e);
    }
    cv_kron_free(&k);
    return rc;
}

static int build_lowrank(pstate *s, cv_err *e)
{
    cv_linop op;
    cv_curv_linop_ctx lc;
    cv_curv_linop(&op, &lc, s->c->curv, CV_CURV_GGN, &s->tb, s->c->progress);
    cv_eigen_options o;
    cv_eigen_options_default(&o);
    o.k = (size_t)s->a->k < s->tb.dim ? s->a->k : (int)s->tb.dim;
    o.which = CV_WHICH_LARGEST;
    o.tol = 1e-10;
    o.return_vectors = 1;
    cv_rng r;
    cv_rng_seed_stream(&r, s->c->seed, PREDICT_PROBE_SALT);
    cv_eigen_result res;
    if (cv_eigen_lanczos(&op, &o, &r, &res, e))
        return -1;
    s->K = res.k;
    s->converged = res.converged;
    s->lam = malloc(sizeof(double) * (size_t)(res.k ? res.k : 1));
    int rc = s->lam ? 0 : cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "eigenvalues");
    for (int i = 0; i < res.k && !rc; i++)
        s->lam[i] = s->factor * res.eigenvalues[i];
    s->V = res.eigenvectors;
    res.eigenvectors = NULL;
    cv_eigen_result_free(&res);
    return rc;
}

/* ---- the prior and the noise: given, or op laplace's optimum ---------------------- */

static int sym_eigenvalues(const double *M, size_t n, double *w, cv_err *e)
{
    double *T = malloc(sizeof(double) * (n * n + 1));
    if (!T)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "eigenvalues");
    memcpy(T, M, sizeof(double) * n * n);
    int rc = n && LAPACKE_dsyevd(LAPACK_COL_MAJOR, 'N', 'U', (lapack_int)n, T, (lapack_int)n,
                                 w) != 0
                 ? cv_err_set(e, CV_EINTERNAL, "internal", "", "eigendecomposition failed")
                 : 0;
    free(T);
    return rc;
}

static double *alloc_vals(size_t n) { return malloc(sizeof(double) * (n ? n : 1)); }

/* The evidence's representation of the curvature (engine/laplace.h), as op laplace's. */
static int evidence_of(pstate *s, cv_laplace *L, cv_err *e)
{
    size_t D = s->tb.dim;
    int per = s->a->prior.is_list && s->nb > 1, rc = 0;
    if ((s->inner == S_FULL || s->inner == S_LOWRANK) && !per) { /* one block: its spectrum */
        if (cv_laplace_init(L, CV_LAPLACE_SPECTRA, 1, e))
            return -1;
        size_t m = s->inner == S_FULL ? D : (size_t)s->K;
        double *w = alloc_vals(m);
        rc = !w ? cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "eigenvalues")
             : s->inner == S_FULL ? sym_eigenvalues(s->G, D, w, e)
                                  : (memcpy(w, s->lam, sizeof(double) * m), 0);
        L->blocks[0] = (cv_laplace_block){D, m, w, 0};
    } else if (s->inner == S_FULL) {
        if (cv_laplace_init(L, CV_LAPLACE_DENSE, s->nb, e))
            return -1;
        L->G = alloc_vals(D * D);
        L->owner = malloc(sizeof(int) * (D ? D : 1));
        rc = L->G && L->owner ? 0 : cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "evidence");
        if (!rc) {
            memcpy(L->G, s->G, sizeof(double) * D * D);
            memcpy(L->owner, s->owner, sizeof(int) * D);
        }
    } else if (s->inner == S_LOWRANK) {
        size_t K = (size_t)s->K;
        if (cv_laplace_init(L, CV_LAPLACE_LOWRANK, s->nb, e))
            return -1;
        L->W = calloc((size_t)s->nb * K * K + 1, sizeof(double));
        L->lam = alloc_vals(K);
        rc = L->W && L->lam ? 0 : cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "evidence");
        for (size_t p = 0; p < D && !rc; p++) {
            double *W = L->W + (size_t)s->owner[p] * K * K;
            for (size_t j = 0; j < K; j++)
                for (size_t i = 0; i < K; i++)
                    W[j * K + i] += s->V[i * D + p] * s->V[j * D + p];
        }
        if (!rc)
            memcpy(L->lam, s->lam, sizeof(double) * K);
        L->k = s->K;
    } else { /* diag, kron: a spectrum per prior block */
        if (cv_laplace_init(L, CV_LAPLACE_SPECTRA, s->nb, e))
            return -1;
        for (int b = 0; b < s->nb && !rc; b++) {
            cv_laplace_block *k = &L->blocks[b];
            k->dim = s->lb[b].dim;
            if (!(k->vals = alloc_vals(k->dim)))
                rc = cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "spectra");
            else if (s->inner == S_DIAG) {
                for (size_t i = 0; i < D; i++)
                    if (s->owner[i] == b)
                        k->vals[k->m++] = s->d[i];
            } else if (s->kb[b].dim) {
                rc = cv_kron_block_products(&s->kb[b], k->vals, e);
                for (size_t i = 0; i < k->dim; i++)
                    k->vals[i] *= s->factor;
                k->m = k->dim;
            } else {
                rc = sym_eigenvalues(s->Gb[b], k->dim, k->vals, e);
                k->m = k->dim;
            }
        }
    }
    if (L->kind != CV_LAPLACE_SPECTRA)
        for (int b = 0; b < L->nblocks; b++)
            L->blocks[b].dim = s->lb[b].dim;
    L->dim = D;
    return rc;
}

/* s->delta (per prior block) and s->sigma: the options, or the evidence's optimum. */
static int prior_and_noise(pstate *s, double loss, cv_err *e)
{
    const predict_args *a = s->a;
    const cv_model *m = s->c->m;
    s->delta = alloc_vals((size_t)s->nb);
    if (!s->delta)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "prior precisions");
    for (int b = 0; b < s->nb; b++)
        s->delta[b] = a->prior.is_list ? a->prior.list.v[b] : a->prior.num;
    s->sigma = m->loss == CV_LOSS_MSE ? a->sigma_noise : 1.0;
    if (!a->optimize_prior && !a->optimize_sigma)
        return 0;
    cv_laplace L;
    int rc = evidence_of(s, &L, e);
    int nl = L.nblocks, whole = nl != s->nb;
    double *dl = rc ? NULL : alloc_vals((size_t)nl);
    if (!rc && !dl)
        rc = cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "prior precisions");
    if (!rc) {
        L.nll = (m->loss == CV_LOSS_MSE ? 0.5 : 1.0) * loss;
        L.gaussian = m->loss == CV_LOSS_MSE;
        L.n_outputs = (double)cv_curv_batch_size(s->c->curv) * cv_model_output_dim(m);
        for (int b = 0; b < nl; b++) {
            dl[b] = s->delta[b];
            L.blocks[b].sq_norm = 0;
        }
        for (size_t i = 0; i < s->tb.dim; i++)
            L.blocks[whole ? 0 : s->owner[i]].sq_norm += s->theta[i] * s->theta[i];
        rc = cv_laplace_optimize(&L, dl, a->prior.is_list && nl > 1, a->optimize_prior,
                                 &s->sigma, a->optimize_sigma, a->temperature, NULL, e);
    }
    for (int b = 0; !rc && b < s->nb; b++)
        s->delta[b] = dl[whole ? 0 : b];
    free(dl);
    cv_laplace_free(&L);
    return rc;
}

/* ---- the posterior ---------------------------------------------------------------- */

static int make_posterior(pstate *s, cv_posterior *P, cv_err *e)
{
    size_t D = s->tb.dim;
    double g = 1.0 / (s->sigma * s->sigma * s->a->temperature);
    double *p0 = alloc_vals(D);
    size_t *idx = malloc(sizeof(size_t) * (D ? D : 1));
    int rc = p0 && idx ? 0 : cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "prior");
    for (size_t i = 0; i < D && !rc; i++)
        p0[i] = s->delta[s->owner[i]];
    if (rc) {
    } else if (s->inner == S_FULL) {
        rc = cv_posterior_dense(P, D, s->G, g, p0, e);
        s->G = NULL;
    } else if (s->inner == S_DIAG) {
        rc = cv_posterior_diag(P, D, s->d, g, p0, e);
    } else if (s->inner == S_LOWRANK) {
        rc = cv_posterior_lowrank(P, D, s->K, s->V, s->lam, g, p0, e);
    } else {
        rc = cv_posterior_blocks(P, D, s->nb, e);
        for (int b = 0; b < s->nb && !rc; b++) {
            size_t n = 0;
            for (size_t i = 0; i < D; i++)
                if (s->owner[i] == b)
                    idx[n++] = i;
            if (s->kb[b].dim) {
                rc = cv_posterior_slot_kron(P, b, idx, &s->kb[b], g * s->factor, s->delta[b], e);
            } else {
                rc = cv_posterior_slot_dense(P, b, idx, n, s->Gb[b], g, s->delta[b], e);
                s->Gb[b] = NULL;
            }
        }
    }
    free(p0);
    free(idx);
    return rc;
}

/* ---- the predictive ---------------------------------------------------------------- */

typedef struct {
    size_t N;
    int C;
    double *mean;  /* N x C */
    double *cov;   /* N x C x C */
} pred;

/* The engine options of a chunk's engine (ns samples of xs, k vectors): the
 * job's, one process; within the budget beside the job's engine when what it
 * holds leaves room, else the job's engine gives up its kept states (as op
 * eigen's gram sub-sample engine; the op's vectors are counted by the job's). */
static void chunk_options(cv_op_ctx *c, const cv_batch *xs, size_t ns, int k,
                          cv_curv_options *so)
{
    *so = *cv_curv_get_options(c->curv);
    int collective = cv_comm_active(so->comm);
    so->comm = NULL;
    so->progress = collective ? NULL : c->progress;
    so->vector_bytes = 0;
    so->factor_bytes = 0;
    so->max_vectors = k;
    so->pairs = 0;
    so->micro_batch = 0;
    so->kind = CV_CURV_GGN;
    size_t budget = so->memory_budget;
    if (!budget)
        return;
    cv_curv_plan held, fits;
    cv_err ignored;
    cv_curv_memory(c->curv, &held);
    so->memory_budget = budget > held.peak_bytes ? budget - held.peak_bytes : 1;
    cv_batch sub;
    cv_batch_view(xs, 0, ns, &sub);
    if (cv_curv_plan_memory(c->m, &sub, so, &fits, &ignored)) {
        size_t keep = cv_curv_release_states(c->curv);
        so->memory_budget = budget > keep ? budget - keep : 1;
    }
}

/* The predictive of samples [off, off + ns) of xs into out. */
static int predict_chunk(pstate *s, cv_posterior *P, const cv_batch *xs, size_t off, size_t ns,
                         const cv_curv_options *so, float *cot, double *Y, double *W,
                         double *Wm, pred *out, cv_err *e)
{
    size_t D = s->tb.dim, C = (size_t)out->C, k = ns * C;
    int mr = cv_posterior_minus_rank(P);
    cv_batch sub;
    cv_batch_view(xs, off, ns, &sub);
    cv_curv *sc = cv_curv_new(s->c->m, &sub, so, e);
    if (!sc)
        return -1;
    const float *h = cv_curv_outputs(sc);
    for (size_t i = 0; i < ns * C; i++)
        out->mean[off * C + i] = h[i];
    memset(cot, 0, sizeof(float) * k * ns * C);
    for (size_t m = 0; m < ns; m++) /* vector j = m C + c: e_c at sample m */
        for (size_t c = 0; c < C; c++)
            cot[((m * C + c) * ns + m) * C + c] = 1.0f;
    int rc = cv_progress_check(s->c->progress, e) ||
             cv_curv_vjp(sc, &s->tb, (int)k, cot, Y, e) ||
             cv_posterior_whiten(P, (int)k, Y, W, Wm, e);
    for (size_t m = 0; m < ns && !rc; m++) {
        double *cv = out->cov + (off + m) * C * C;
        cblas_dgemm(CblasColMajor, CblasTrans, CblasNoTrans, (int)C, (int)C, (int)D, 1.0,
                    W + m * C * D, (int)D, W + m * C * D, (int)D, 0.0, cv, (int)C);
        if (mr)
            cblas_dgemm(CblasColMajor, CblasTrans, CblasNoTrans, (int)C, (int)C, mr, -1.0,
                        Wm + m * C * (size_t)mr, mr, Wm + m * C * (size_t)mr, mr, 1.0, cv,
                        (int)C);
    }
    cv_curv_free(sc);
    return rc;
}

static size_t chunk_samples(size_t N, size_t D, size_t C)
{
    size_t per = (D ? D : 1) * C, ns = PREDICT_CHUNK_DOUBLES / (per ? per : 1);
    ns = ns < 1 ? 1 : ns > 64 ? 64 : ns;
    return ns < N ? ns : (N ? N : 1);
}

static int predictive(pstate *s, cv_posterior *P, const cv_batch *xs, pred *out, cv_err *e)
{
    size_t N = xs->n, D = s->tb.dim, C = (size_t)out->C;
    size_t ns = chunk_samples(N, D, C), k = ns * C;
    int mr = cv_posterior_minus_rank(P);
    out->N = N;
    out->mean = alloc_vals(N * C);
    out->cov = alloc_vals(N * C * C);
    float *cot = malloc(sizeof(float) * k * ns * C);
    double *Y = alloc_vals(D * k), *W = alloc_vals(D * k), *Wm = alloc_vals((size_t)mr * k);
    int rc = out->mean && out->cov && cot && Y && W && Wm
                 ? 0
                 : cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "predictive");
    cv_curv_options so;
    if (!rc)
        chunk_options(s->c, xs, ns, (int)k, &so);
    for (size_t off = 0; off < N && !rc; off += ns)
        rc = predict_chunk(s, P, xs, off, N - off < ns ? N - off : ns, &so, cot, Y, W, Wm, out,
                           e);
    free(cot);
    free(Y);
    free(W);
    free(Wm);
    return rc;
}

/* The samples predicted: options.x (zero targets, shaped like the job's
 * batch) or the job's batch (data-parallel: gathered whole on every rank). */
static int eval_set(cv_op_ctx *c, cv_batch *xs, int *owned, cv_err *e)
{
    const predict_args *a = c->opts->args;
    size_t first;
    const cv_batch *b = cv_curv_batch(c->curv, &first);
    *owned = 0;
    if (cv_opts_given(c->opts, "x")) {
        size_t in = cv_shape_numel(&c->m->input_shape), n = (size_t)a->x.n / in;
        if (cv_batch_alloc(b, n, xs, e))
            return -1;
        *owned = 1;
        for (size_t i = 0; i < n * in; i++)
            xs->x[i] = (float)a->x.v[i];
        if (!cv_dataset_check(xs, c->m, e))
            return 0;
        snprintf(e->field, sizeof e->field, "options.x");
        return -1;
    }
    if (!cv_comm_active(cv_curv_get_options(c->curv)->comm)) {
        *xs = *b;
        return 0;
    }
    size_t N = cv_curv_batch_size(c->curv);
    size_t *idx = malloc(sizeof(size_t) * (N ? N : 1));
    if (cv_curv_agree(c->curv, idx ? 0 : cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "batch"),
                      e)) {
        free(idx);
        return -1;
    }
    for (size_t i = 0; i < N; i++)
        idx[i] = i;
    int rc = cv_curv_gather_samples(c->curv, idx, N, xs, e);
    free(idx);
    *owned = !rc;
    return rc;
}

/* ---- link approximations and metrics ------------------------------------------------ */

static double sigmoid(double z) { return z >= 0 ? 1 / (1 + exp(-z)) : exp(z) / (1 + exp(z)); }

/* softmax of z (C) into p, or the sigmoid of each entry (bce). */
static void link(const double *z, size_t C, int bce, double *p)
{
    if (bce) {
        for (size_t c = 0; c < C; c++)
            p[c] = sigmoid(z[c]);
        return;
    }
    double mx = -INFINITY, sum = 0;
    for (size_t c = 0; c < C; c++)
        mx = z[c] > mx ? z[c] : mx;
    for (size_t c = 0; c < C; c++)
        sum += (p[c] = exp(z[c] - mx));
    for (size_t c = 0; c < C; c++)
        p[c] /= sum;
}

/* The probit approximation: the link of kappa_c mean_c, kappa_c = (1 + pi/8 var_c)^-1/2. */
static void probit(const pred *p, int bce, double *probs)
{
    size_t C = (size_t)p->C;
    double *z = alloc_vals(C);
    for (size_t n = 0; z && n < p->N; n++) {
        for (size_t c = 0; c < C; c++)
            z[c] = p->mean[n * C + c] /
                   sqrt(1 + M_PI / 8 * p->cov[n * C * C + c * C + c]);
        link(z, C, bce, probs + n * C);
    }
    free(z);
}

/* Monte Carlo: the link averaged over S draws of the logits from N(mean_n,
 * cov_n) (sample n: random stream n of the job's seed; cov_n's square root
 * from its eigendecomposition, negative rounding clipped). */
static int mc(const pred *p, int bce, int S, uint64_t seed, double *out, cv_err *e)
{
    size_t C = (size_t)p->C;
    double *Q = alloc_vals(C * C), *w = alloc_vals(C), *z = alloc_vals(3 * C);
    int rc = Q && w && z ? 0 : cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "mc_probs");
    for (size_t n = 0; n < p->N && !rc; n++) {
        memcpy(Q, p->cov + n * C * C, sizeof(double) * C * C);
        if (LAPACKE_dsyevd(LAPACK_COL_MAJOR, 'V', 'U', (lapack_int)C, Q, (lapack_int)C, w)) {
            rc = cv_err_set(e, CV_EINTERNAL, "internal", "", "eigendecomposition failed");
            break;
        }
        for (size_t j = 0; j < C; j++) /* R = Q diag(sqrt(w)) */
            for (size_t i = 0; i < C; i++)
                Q[j * C + i] *= w[j] > 0 ? sqrt(w[j]) : 0;
        cv_rng r;
        cv_rng_seed_stream(&r, seed ^ PREDICT_MC_SALT, n);
        double *acc = out + n * C, *h = z + C, *pr = z + 2 * C;
        memset(acc, 0, sizeof(double) * C);
        for (int t = 0; t < S; t++) {
            cv_rng_gaussian(&r, z, C);
            for (size_t i = 0; i < C; i++) {
                h[i] = p->mean[n * C + i];
                for (size_t j = 0; j < C; j++)
                    h[i] += Q[j * C + i] * z[j];
            }
            link(h, C, bce, pr);
            for (size_t i = 0; i < C; i++)
                acc[i] += pr[i] / S;
        }
    }
    free(Q);
    free(w);
    free(z);
    return rc;
}

/* Expected calibration error with 10 equal-width confidence bins [b/10, (b+1)/10)
 * (confidence 1 in the last): sum_b |sum_{i in b} (correct_i - conf_i)| / n. */
typedef struct {
    double gap[10];
    size_t n, right;
    double nll;
} calib;

static void calib_add(calib *k, double conf, int correct)
{
    int b = (int)floor(conf * 10);
    b = b < 0 ? 0 : b > 9 ? 9 : b;
    k->gap[b] += correct - conf;
    k->n++;
    k->right += correct != 0;
}

static double calib_ece(const calib *k)
{
    double s = 0;
    for (int b = 0; b < 10; b++)
        s += fabs(k->gap[b]);
    return k->n ? s / (double)k->n : NAN;
}

static void add_num(cJSON *o, const char *name, double x)
{
    if (isfinite(x))
        cJSON_AddNumberToObject(o, name, x);
    else
        cJSON_AddNullToObject(o, name);
}

/* nll (mean over the samples of -log p(y_n | x_n)), accuracy and ece of the
 * probit predictive (classification), or the Gaussian predictive
 * N(mean, variance + sigma^2) (regression: nll only). */
static void metrics(const pstate *s, const pred *p, const double *probs, const cv_batch *xs,
                    cJSON *out)
{
    const cv_model *m = s->c->m;
    size_t C = (size_t)p->C, counted = 0;
    calib k = {{0}, 0, 0, 0};
    double nll = 0;
    if (m->loss == CV_LOSS_MSE) {
        double s2 = s->sigma * s->sigma;
        for (size_t n = 0; n < p->N; n++)
            for (size_t c = 0; c < C; c++) {
                double v = p->cov[n * C * C + c * C + c] + s2,
                       r = xs->targets[n * C + c] - p->mean[n * C + c];
                nll += 0.5 * (log(2 * M_PI * v) + r * r / v);
            }
        add_num(out, "nll", nll / (double)p->N);
        return;
    }
    if (m->loss == CV_LOSS_BCE) {
        for (size_t n = 0; n < p->N; n++)
            for (size_t c = 0; c < C; c++) {
                double q = probs[n * C + c], t = xs->targets[n * C + c];
                nll -= t * log(q > 1e-300 ? q : 1e-300) +
                       (1 - t) * log(1 - q > 1e-300 ? 1 - q : 1e-300);
                calib_add(&k, q >= 0.5 ? q : 1 - q, (q > 0.5) == (t > 0.5));
            }
        counted = p->N;
    } else {
        cv_loss_layout lay;
        cv_loss_layout_of(m, &lay);
        for (size_t n = 0; n < p->N; n++) {
            int64_t y = xs->labels[n];
            if (y == lay.ignore_index || y < 0 || (size_t)y >= C)
                continue;
            const double *q = probs + n * C;
            size_t best = 0;
            for (size_t c = 1; c < C; c++)
                best = q[c] > q[best] ? c : best;
            nll -= log(q[y] > 1e-300 ? q[y] : 1e-300);
            calib_add(&k, q[best], best == (size_t)y);
            counted++;
        }
    }
    add_num(out, "nll", counted ? nll / (double)counted : NAN);
    add_num(out, "accuracy", k.n ? (double)k.right / (double)k.n : NAN);
    add_num(out, "ece", calib_ece(&k));
}

/* ---- the result --------------------------------------------------------------------- */

static cJSON *rows(const double *v, size_t N, size_t C)
{
    cJSON *a = cJSON_CreateArray();
    for (size_t n = 0; a && n < N; n++)
        cJSON_AddItemToArray(a, cv_json_doubles(v + n * C, C));
    return a;
}

static int posterior_samples(pstate *s, cv_posterior *P, cJSON *out, cv_err *e)
{
    size_t D = s->tb.dim;
    double *z = alloc_vals(2 * D), *th = z + D;
    if (!z)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "posterior samples");
    cJSON *arr = cJSON_AddArrayToObject(out, "posterior_samples");
    int rc = 0;
    for (int t = 0; t < s->a->samples && !rc; t++) {
        cv_rng r;
        cv_rng_seed_stream(&r, s->c->seed ^ PREDICT_THETA_SALT, (uint64_t)t);
        cv_rng_gaussian(&r, z, D);
        rc = cv_posterior_sample(P, z, th, e);
        for (size_t i = 0; i < D && !rc; i++)
            th[i] += s->theta[i];
        if (!rc)
            cJSON_AddItemToArray(arr, cv_json_doubles(th, D));
    }
    cJSON_AddItemToObject(out, "posterior_params", cv_json_param_names(s->c->m, &s->tb));
    free(z);
    return rc;
}

static const char *const structure_names[] = {"full", "diag", "kron", "lowrank", "last_layer"};

static void header(const pstate *s, cJSON *out)
{
    const predict_args *a = s->a;
    const cv_model *m = s->c->m;
    cJSON_AddStringToObject(out, "structure", structure_names[a->structure]);
    if (a->structure == S_LAST_LAYER)
        cJSON_AddStringToObject(out, "last_layer_structure", structure_names[s->inner]);
    cJSON_AddStringToObject(out, "likelihood", m->loss == CV_LOSS_MSE   ? "gaussian"
                                               : m->loss == CV_LOSS_BCE ? "bernoulli"
                                                                        : "categorical");
    cJSON_AddNumberToObject(out, "ggn_factor", s->factor);
    cJSON_AddNumberToObject(out, "n_params", (double)s->tb.dim);
    if (s->inner == S_LOWRANK) {
        cJSON_AddNumberToObject(out, "k", s->K);
        cJSON_AddNumberToObject(out, "converged", s->converged);
    }
    if (a->prior.is_list)
        cJSON_AddItemToObject(out, "prior_precision", cv_json_doubles(s->delta, (size_t)s->nb));
    else
        add_num(out, "prior_precision", s->delta[0]);
    add_num(out, "sigma_noise", s->sigma);
    add_num(out, "temperature", a->temperature);
}

static int results(pstate *s, cv_posterior *P, const pred *p, const cv_batch *xs, int targets,
                   cJSON *out, cv_err *e)
{
    const predict_args *a = s->a;
    const cv_model *m = s->c->m;
    size_t N = p->N, C = (size_t)p->C;
    header(s, out);
    cJSON_AddItemToObject(out, "mean", rows(p->mean, N, C));
    double *v = alloc_vals(N * C), *probs = alloc_vals(N * C);
    int rc = v && probs ? 0 : cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "predictive");
    for (size_t i = 0; i < N * C && !rc; i++)
        v[i] = p->cov[(i / C) * C * C + (i % C) * (C + 1)];
    if (!rc)
        cJSON_AddItemToObject(out, "variance", rows(v, N, C));
    if (!rc && a->return_covariance) {
        cJSON *cv = cJSON_AddArrayToObject(out, "covariance");
        for (size_t n = 0; n < N; n++)
            cJSON_AddItemToArray(cv, cv_json_columns(p->cov + n * C * C, C, (int)C));
    }
    int cls = m->loss != CV_LOSS_MSE, bce = m->loss == CV_LOSS_BCE;
    if (!rc && cls) {
        probit(p, bce, probs);
        cJSON_AddItemToObject(out, "probs", rows(probs, N, C));
    }
    if (!rc && cls && cv_opts_given(s->c->opts, "samples")) {
        double *q = alloc_vals(N * C);
        rc = q ? mc(p, bce, a->samples, s->c->seed, q, e)
               : cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "mc_probs");
        if (!rc)
            cJSON_AddItemToObject(out, "mc_probs", rows(q, N, C));
        free(q);
    }
    if (!rc && (cv_opts_given(s->c->opts, "samples") || a->return_posterior_samples))
        cJSON_AddNumberToObject(out, "samples", a->samples);
    if (!rc && targets)
        metrics(s, p, probs, xs, out);
    if (!rc && a->return_posterior_samples)
        rc = posterior_samples(s, P, out, e);
    free(v);
    free(probs);
    return rc;
}

static int run_predict(cv_op_ctx *c, const cv_block *full, cJSON *out, cv_err *e)
{
    const predict_args *a = c->opts->args;
    const cv_model *m = c->m;
    pstate s = {0};
    s.c = c;
    s.a = a;
    s.inner = inner_structure(a);
    cv_posterior P = {0};
    pred p = {0};
    p.C = cv_model_output_dim(m);
    cv_batch xs = {0};
    int owned = 0;
    int rc = prior_blocks(m, a->structure == S_LAST_LAYER, &s.lb, &s.nb, e) || target(&s, e)
                 ? -1
                 : 0;
    const cv_loss_state *ls = cv_curv_loss_state(c->curv);
    if (!rc && !(ls->scale > 0))
        rc = cv_err_set(e, CV_EINVAL, "invalid_batch", "batch",
                        "the batch has no loss terms (every target is ignored)");
    if (!rc) {
        s.factor = (m->loss == CV_LOSS_MSE ? 0.5 : 1.0) / ls->scale;
        rc = s.inner == S_FULL   ? dense_ggn(&s, &s.tb, &s.G, e)
             : s.inner == S_DIAG ? build_diag(&s, e)
             : s.inner == S_KRON ? build_kron(&s, e)
                                 : build_lowrank(&s, e);
    }
    if (!rc)
        rc = prior_and_noise(&s, cv_curv_loss(c->curv) / ls->scale, e);
    if (!rc)
        rc = make_posterior(&s, &P, e);
    if (!rc)
        rc = eval_set(c, &xs, &owned, e);
    if (!rc)
        rc = predictive(&s, &P, &xs, &p, e);
    if (!rc)
        rc = results(&s, &P, &p, &xs, !cv_opts_given(c->opts, "x"), out, e);
    if (owned)
        cv_dataset_free(&xs);
    free(p.mean);
    free(p.cov);
    cv_posterior_free(&P);
    pstate_free(&s);
    return rc;
}

static const char *const predict_results[] = {
    "structure", "last_layer_structure", "likelihood", "ggn_factor", "n_params", "k",
    "converged", "prior_precision", "sigma_noise", "temperature", "mean", "variance",
    "covariance", "probs", "mc_probs", "samples", "nll", "accuracy", "ece",
    "posterior_samples", "posterior_params", NULL};

/* Memory (bytes): the posterior as op laplace's (full: G and its factor and
 * the evidence's copy; lowrank: the Lanczos basis; diag, kron: the exact
 * diagonal's / dense blocks' columns), a chunk's Jacobian and its whitening,
 * the predictive's means and covariances, the posterior samples. */
static void mem_predict(const cv_opts *o, cv_curvature kind, const cv_block *b, size_t n, int C,
                        cv_op_memory *m)
{
    const predict_args *a = o->args;
    double D = (double)(a->post_dim ? a->post_dim : b->dim), vec = 4;
    int inner = inner_structure(a), maxv = 1;
    if (inner == S_FULL) {
        vec = 3 * D + 130;
        maxv = 64;
    } else if (inner == S_DIAG || inner == S_KRON) {
        vec = 70;
        maxv = 64;
    } else if (inner == S_LOWRANK) {
        double steps = 10.0 * a->k > 100 ? 10.0 * a->k : 100;
        vec = (steps < D ? steps : D) + 3.0 * a->k + 4;
    }
    double N = (double)n > a->x.n ? (double)n : a->x.n;
    size_t ns = chunk_samples((size_t)N, (size_t)D, (size_t)C);
    double chunk = (2 * D + a->k) * ns * C * sizeof(double) + (double)ns * ns * C * C * 4;
    double out = N * C * (C + 4.0) * sizeof(double);
    m->vector_bytes = cv_op_bytes(vec * D * sizeof(double) + chunk + out);
    m->max_vectors = maxv > (int)(ns * C) ? maxv : (int)(ns * C);
    m->pairs = 0;
}

const cv_op_def cv_op_predict = {"predict",      predict_opts,   NULL,   sizeof(predict_args),
                                 predict_defaults, 0,            0,      check_predict,
                                 run_predict,    predict_results, NULL,  mem_predict,
                                 bind_predict};
