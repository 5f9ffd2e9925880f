/* op_laplace.c - what ops laplace and predict share (api/op_laplace.h): the
 * common options, the fit of the posterior's curvature in each structure,
 * its prior and noise, the posterior, and the kept posterior (building,
 * accumulating, copying back). */
#include "api/op_laplace.h"

#include <lapacke.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/op_util.h"
#include "engine/estimators.h"
#include "engine/kron.h"
#include "engine/rng.h"

#define LAPLACE_PROBE_SALT 0x1a91ace0000ull /* lowrank's Lanczos start */

static double *alloc_vals(size_t n) { return malloc(sizeof(double) * (n ? n : 1)); }

static int oom(cv_err *e, const char *what)
{
    return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "%s", what);
}

static double *dup_vals(const double *v, size_t n)
{
    double *c = v ? alloc_vals(n) : NULL;
    if (c)
        memcpy(c, v, sizeof(double) * n);
    return c;
}

/* ---- options ----------------------------------------------------------------------- */

void cv_lap_defaults(cv_lap_opts *a)
{
    a->structure = CV_LAP_KRON;        /* laplace-torch's default hessian_structure */
    a->last_layer_structure = CV_LAP_FULL;
    a->prior.num = 1.0;                /* laplace-torch's default prior_precision */
    a->sigma_noise = 1.0;
    a->temperature = 1.0;
    a->k = 10;
}

int cv_lap_inner(const cv_lap_opts *a)
{
    return a->structure == CV_LAP_LAST_LAYER ? a->last_layer_structure : a->structure;
}

static int positive(double x, const char *field, cv_err *e)
{
    return x > 0 ? 0
                 : cv_err_set(e, CV_EINVAL, "invalid_option", field,
                              "%s must be > 0, got %g", field, x);
}

int cv_lap_check(const cv_opts *o, cv_err *e)
{
    const cv_lap_opts *a = cv_lap_of(o);
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
    if (cv_opts_given(o, "k") && cv_lap_inner(a) != CV_LAP_LOWRANK)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.k",
                          "options.k applies with structure lowrank (or last_layer with "
                          "last_layer_structure lowrank)");
    if (cv_opts_given(o, "last_layer_structure") && a->structure != CV_LAP_LAST_LAYER)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.last_layer_structure",
                          "options.last_layer_structure applies with structure last_layer");
    if (a->accumulate_into.on && cv_lap_inner(a) == CV_LAP_LOWRANK)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.accumulate_into",
                          "options.accumulate_into adds curvatures; a sum of rank-k terms is "
                          "not rank k (use structure full, diag or kron)");
    if (a->posterior.on) {
        static const char *const own[] = {"structure", "last_layer_structure",
                                          "prior_precision", "sigma_noise", "temperature",
                                          "optimize_prior", "optimize_sigma", "k"};
        for (size_t i = 0; i < sizeof own / sizeof *own; i++)
            if (cv_opts_given(o, own[i])) {
                char f[48];
                snprintf(f, sizeof f, "options.%s", own[i]);
                return cv_err_set(e, CV_EINVAL, "invalid_option", f,
                                  "%s comes from the kept posterior '%s' (options.posterior); "
                                  "give one or the other", f, a->posterior.s);
            }
    }
    return 0;
}

int cv_lap_prior_blocks(const cv_model *m, int last_layer, cv_block **out, int *n, cv_err *e)
{
    int nl = cv_blocks_per_layer(m, NULL, 0);
    if (nl < 1)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.structure",
                          "the model has no parameters");
    cv_block *lb = calloc((size_t)nl, sizeof *lb);
    if (!lb)
        return oom(e, "layer blocks");
    cv_blocks_per_layer(m, lb, nl);
    if (last_layer) {
        lb[0] = lb[nl - 1];
        nl = 1;
    }
    *out = lb;
    *n = nl;
    return 0;
}

int cv_lap_bind(const cv_opts *o, const cv_model *m, cv_err *e)
{
    cv_lap_opts *a = cv_lap_of(o);
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
    if (cv_lap_prior_blocks(m, a->structure == CV_LAP_LAST_LAYER, &lb, &nb, e))
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
    if (cv_lap_inner(a) == CV_LAP_LOWRANK && cv_opts_given(o, "k") && (size_t)a->k > dim)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.k",
                          "options.k = %d exceeds the posterior's dimension %zu", a->k, dim);
    return 0;
}

/* Vectors of the posterior's dimension D: full: G, its evidence copy, a
 * Cholesky factor and an inverse; lowrank: the Lanczos basis; diag, kron:
 * the exact diagonal's / dense blocks' identity columns. */
double cv_lap_fit_memory(const cv_lap_opts *a, double D, int *max_vectors)
{
    int inner = cv_lap_inner(a);
    *max_vectors = 1;
    if (inner == CV_LAP_FULL) {
        *max_vectors = 64;
        return (4 * D + 130) * D * sizeof(double);
    }
    if (inner == CV_LAP_DIAG || inner == CV_LAP_KRON) {
        *max_vectors = 64;
        return 70 * D * sizeof(double);
    }
    if (inner == CV_LAP_LOWRANK) {
        double steps = 10.0 * a->k > 100 ? 10.0 * a->k : 100;
        return ((steps < D ? steps : D) + 3.0 * a->k + 4) * D * sizeof(double);
    }
    return 4 * D * sizeof(double);
}

void cv_lap_add_num(cJSON *o, const char *name, double x)
{
    if (isfinite(x))
        cJSON_AddNumberToObject(o, name, x);
    else
        cJSON_AddNullToObject(o, name);
}

int cv_lap_check_store(const cv_op_ctx *c, cv_err *e)
{
    const cv_lap_opts *a = cv_lap_of(c->opts);
    const char *f = a->keep.on              ? "options.keep"
                    : a->accumulate_into.on ? "options.accumulate_into"
                    : a->posterior.on       ? "options.posterior"
                                            : NULL;
    if (!f || c->store)
        return 0;
    return cv_err_set(e, CV_EINVAL, "invalid_option", f,
                      "%s names a posterior kept in the service's registry under the model "
                      "version (curvd serve); in-process (curvd run, libcurvd) there is no "
                      "registry: fit and predict in one predict job instead", f);
}

/* ---- the fit ----------------------------------------------------------------------- */

static int block_of_tensor(const cv_block *lb, int nb, int t)
{
    for (int b = 0; b < nb; b++)
        for (int i = 0; i < lb[b].count; i++)
            if (lb[b].idx[i] == t)
                return b;
    return -1;
}

/* lb, tb, owner and theta of the structure on the job's model. */
static int fit_target(cv_lap_fit *s, cv_err *e)
{
    const cv_model *m = s->c->m;
    if (cv_lap_prior_blocks(m, s->structure == CV_LAP_LAST_LAYER, &s->lb, &s->nb, e))
        return -1;
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
        return oom(e, "coordinate owners");
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

static int dense_ggn(cv_lap_fit *s, const cv_block *b, double **G, cv_err *e)
{
    cv_op_ctx *c = s->c;
    if (b->dim > c->lim->dense_max)
        return cv_err_set(e, CV_ETOOLARGE, "too_large", "options.structure",
                          "the dense %zu x %zu GGN%s%s exceeds the dense limit %zu (--dense-max)%s",
                          b->dim, b->dim, b->name[0] ? " of layer " : "", b->name,
                          c->lim->dense_max,
                          s->inner == CV_LAP_KRON
                              ? " (a layer without a Kronecker structure gets its exact block)"
                              : " (use structure kron or lowrank, or last_layer)");
    *G = alloc_vals(b->dim * b->dim);
    if (cv_curv_agree(c->curv, *G ? 0 : oom(e, "dense GGN"), e))
        return -1;
    cv_progress_plan(c->progress, (long)b->dim);
    if (cv_curv_dense(c->curv, CV_CURV_GGN, b, c->lim->dense_max, *G, e))
        return -1;
    for (size_t i = 0; i < b->dim * b->dim; i++)
        (*G)[i] *= s->factor;
    return 0;
}

static int build_diag(cv_lap_fit *s, cv_err *e)
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
    s->d = r.diag;
    r.diag = NULL;
    cv_diag_result_free(&r);
    for (size_t i = 0; i < s->tb.dim; i++)
        s->d[i] *= s->factor;
    return 0;
}

/* A Kronecker block owning copies of A and B. */
static int kron_block_copy(const double *A, const double *B, int in, int out, int has_bias,
                           cv_kron_block *kb, cv_err *e)
{
    size_t da = (size_t)(in + has_bias), db = (size_t)out;
    double *a = dup_vals(A, da * da), *b = dup_vals(B, db * db);
    if (!a || !b) {
        free(a);
        free(b);
        return oom(e, "Kronecker factors");
    }
    return cv_kron_block_init(kb, in, out, has_bias, a, b, 1, e);
}

static int build_kron(cv_lap_fit *s, cv_err *e)
{
    cv_kron_options ko = {.fisher_type = CV_KRON_TYPE2, .approx = CV_KRON_EXPAND};
    cv_kron k;
    s->kb = calloc((size_t)s->nb, sizeof *s->kb);
    s->Gb = calloc((size_t)s->nb, sizeof *s->Gb);
    s->krank = calloc(2 * (size_t)s->nb, sizeof *s->krank);
    s->kfac = s->factor;
    s->kron_n = (double)cv_curv_batch_size(s->c->curv);
    if (cv_curv_agree(s->c->curv, s->kb && s->Gb && s->krank ? 0 : oom(e, "blocks"), e))
        return -1;
    int rc = cv_curv_kron(s->c->curv, &ko, &k, e);
    for (int b = 0; b < s->nb && !rc; b++) {
        const cv_kron_factor *f = NULL;
        for (int i = 0; i < k.nfactors && !f; i++)
            if (k.factors[i].block.count == s->lb[b].count &&
                memcmp(k.factors[i].block.idx, s->lb[b].idx,
                       sizeof(int) * (size_t)s->lb[b].count) == 0)
                f = &k.factors[i];
        if (f && (size_t)f->dim_a * f->dim_b == s->lb[b].dim) {
            rc = kron_block_copy(f->A, f->B, f->dim_a - f->has_bias, f->dim_b, f->has_bias,
                                 &s->kb[b], e);
            s->krank[2 * b] = f->rank_a;
            s->krank[2 * b + 1] = f->rank_b;
        } else
            rc = dense_ggn(s, &s->lb[b], &s->Gb[b], e);
    }
    cv_kron_free(&k);
    return rc;
}

static int build_lowrank(cv_lap_fit *s, cv_err *e)
{
    cv_linop op;
    cv_curv_linop_ctx lc;
    cv_curv_linop(&op, &lc, s->c->curv, CV_CURV_GGN, &s->tb, s->c->progress);
    cv_eigen_options o;
    cv_eigen_options_default(&o);
    o.k = (size_t)s->a->k < s->tb.dim ? s->a->k : (int)s->tb.dim; /* the default 10 may exceed it */
    o.which = CV_WHICH_LARGEST;
    o.tol = 1e-10;
    o.return_vectors = 1;
    cv_rng r;
    cv_rng_seed_stream(&r, s->c->seed, LAPLACE_PROBE_SALT);
    cv_eigen_result res;
    if (cv_eigen_lanczos(&op, &o, &r, &res, e))
        return -1;
    s->K = res.k;
    s->converged = res.converged;
    s->lam = alloc_vals((size_t)res.k);
    int rc = s->lam ? 0 : oom(e, "eigenvalues");
    for (int i = 0; i < res.k && !rc; i++)
        s->lam[i] = s->factor * res.eigenvalues[i];
    s->V = res.eigenvectors;
    res.eigenvectors = NULL;
    cv_eigen_result_free(&res);
    return rc;
}

int cv_lap_fit_build(cv_op_ctx *c, const cv_lap_opts *a, cv_lap_fit *s, cv_err *e)
{
    memset(s, 0, sizeof *s);
    s->c = c;
    s->a = a;
    s->structure = a->structure;
    s->inner = cv_lap_inner(a);
    s->g = 1;
    s->kfac = 1;
    const cv_model *m = c->m;
    if (fit_target(s, e))
        return -1;
    const cv_loss_state *ls = cv_curv_loss_state(c->curv);
    if (!(ls->scale > 0))
        return cv_err_set(e, CV_EINVAL, "invalid_batch", "batch",
                          "the batch has no loss terms (every target is ignored)");
    double kappa = m->loss == CV_LOSS_MSE ? 0.5 : 1.0;
    s->factor = kappa / ls->scale;
    s->nll = kappa * cv_curv_loss(c->curv) / ls->scale;
    return s->inner == CV_LAP_FULL   ? dense_ggn(s, &s->tb, &s->G, e)
           : s->inner == CV_LAP_DIAG ? build_diag(s, e)
           : s->inner == CV_LAP_KRON ? build_kron(s, e)
                                     : build_lowrank(s, e);
}

void cv_lap_fit_free(cv_lap_fit *s)
{
    for (int b = 0; s->kb && b < s->nb; b++)
        cv_kron_block_free(&s->kb[b]);
    for (int b = 0; s->Gb && b < s->nb; b++)
        free(s->Gb[b]);
    free(s->kb);
    free(s->Gb);
    free(s->krank);
    free(s->lb);
    free(s->owner);
    free(s->theta);
    free(s->G);
    free(s->d);
    free(s->V);
    free(s->lam);
    free(s->delta);
    memset(s, 0, sizeof *s);
}

static int sym_eigenvalues(const double *M, size_t n, double *w, cv_err *e)
{
    double *T = dup_vals(M, n * n);
    if (!T)
        return oom(e, "eigenvalues");
    int rc = n && LAPACKE_dsyevd(LAPACK_COL_MAJOR, 'N', 'U', (lapack_int)n, T, (lapack_int)n,
                                 w) != 0
                 ? cv_err_set(e, CV_EINTERNAL, "internal", "", "eigendecomposition failed")
                 : 0;
    free(T);
    return rc;
}

/* The spectra of the kron / diag blocks: one per prior block. */
static int block_spectrum(const cv_lap_fit *s, int b, cv_laplace_block *k, cv_err *e)
{
    size_t D = s->tb.dim;
    k->dim = s->lb[b].dim;
    if (!(k->vals = alloc_vals(k->dim)))
        return oom(e, "spectra");
    if (s->inner == CV_LAP_DIAG) {
        for (size_t i = 0; i < D; i++)
            if (s->owner[i] == b && k->m < k->dim)
                k->vals[k->m++] = s->d[i];
        return 0;
    }
    k->m = k->dim;
    const cv_kron_block *kb = &s->kb[b];
    if (!kb->dim)
        return sym_eigenvalues(s->Gb[b], k->dim, k->vals, e);
    /* eig(P (B (x) A) P^T) = {mu_i lam_j}: the factors' eigenvalues only (dsyevd 'N', on
     * their range when their rank is known: several times cheaper than eigenbases) */
    size_t da = (size_t)kb->dim_a, db = (size_t)kb->dim_b;
    double *la = alloc_vals(da + db), *mb = la ? la + da : NULL;
    long ra = s->krank ? s->krank[2 * b] : 0, rb = s->krank ? s->krank[2 * b + 1] : 0;
    int rc = !la ? oom(e, "factor spectra")
             : (ra > 0 ? cv_kron_factor_eigenvalues_rank(kb->A, kb->dim_a, ra, la, e)
                       : cv_kron_factor_eigenvalues(kb->A, kb->dim_a, la, e)) ||
                       (rb > 0 ? cv_kron_factor_eigenvalues_rank(kb->B, kb->dim_b, rb, mb, e)
                               : cv_kron_factor_eigenvalues(kb->B, kb->dim_b, mb, e))
                 ? -1
                 : 0;
    for (size_t i = 0; i < db && !rc; i++)
        for (size_t j = 0; j < da; j++)
            k->vals[i * da + j] = s->kfac * mb[i] * la[j];
    free(la);
    return rc;
}

int cv_lap_fit_evidence(const cv_lap_fit *s, cv_laplace *L, cv_err *e)
{
    size_t D = s->tb.dim;
    const cv_lap_opts *a = s->a;
    int per = a && a->prior.is_list && s->nb > 1, rc = 0;
    if ((s->inner == CV_LAP_FULL || s->inner == CV_LAP_LOWRANK) && !per) { /* one spectrum */
        if (cv_laplace_init(L, CV_LAPLACE_SPECTRA, 1, e))
            return -1;
        size_t m = s->inner == CV_LAP_FULL ? D : (size_t)s->K;
        double *w = alloc_vals(m);
        rc = !w ? oom(e, "eigenvalues")
             : s->inner == CV_LAP_FULL ? sym_eigenvalues(s->G, D, w, e)
                                       : (memcpy(w, s->lam, sizeof(double) * m), 0);
        L->blocks[0] = (cv_laplace_block){D, m, w, 0};
    } else if (s->inner == CV_LAP_FULL) {
        if (cv_laplace_init(L, CV_LAPLACE_DENSE, s->nb, e))
            return -1;
        L->G = dup_vals(s->G, D * D);
        L->owner = malloc(sizeof(int) * (D ? D : 1));
        rc = L->G && L->owner ? 0 : oom(e, "evidence");
        if (!rc)
            memcpy(L->owner, s->owner, sizeof(int) * D);
    } else if (s->inner == CV_LAP_LOWRANK) {
        size_t K = (size_t)s->K;
        if (cv_laplace_init(L, CV_LAPLACE_LOWRANK, s->nb, e))
            return -1;
        L->W = calloc((size_t)s->nb * K * K + 1, sizeof(double));
        L->lam = dup_vals(s->lam, K);
        rc = L->W && L->lam ? 0 : oom(e, "evidence");
        for (size_t p = 0; p < D && !rc; p++) { /* W_b += v_p v_p^T over b's rows p */
            double *W = L->W + (size_t)s->owner[p] * K * K;
            for (size_t j = 0; j < K; j++)
                for (size_t i = 0; i < K; i++)
                    W[j * K + i] += s->V[i * D + p] * s->V[j * D + p];
        }
        L->k = s->K;
    } else {
        if (cv_laplace_init(L, CV_LAPLACE_SPECTRA, s->nb, e))
            return -1;
        for (int b = 0; b < s->nb && !rc; b++)
            rc = block_spectrum(s, b, &L->blocks[b], e);
    }
    if (L->kind != CV_LAPLACE_SPECTRA)
        for (int b = 0; b < L->nblocks; b++)
            L->blocks[b].dim = s->lb[b].dim;
    L->dim = D;
    const cv_model *m = s->c->m;
    L->nll = s->nll;
    L->gaussian = m->loss == CV_LOSS_MSE;
    L->n_outputs = (double)cv_curv_batch_size(s->c->curv) * cv_model_output_dim(m);
    int whole = L->nblocks != s->nb;
    for (int b = 0; b < L->nblocks; b++)
        L->blocks[b].sq_norm = 0;
    for (size_t i = 0; i < D; i++)
        L->blocks[whole ? 0 : s->owner[i]].sq_norm += s->theta[i] * s->theta[i];
    return rc;
}

int cv_lap_fit_prior(cv_lap_fit *s, cv_err *e)
{
    const cv_lap_opts *a = s->a;
    const cv_model *m = s->c->m;
    s->delta = alloc_vals((size_t)s->nb);
    if (!s->delta)
        return oom(e, "prior precisions");
    for (int b = 0; b < s->nb; b++)
        s->delta[b] = a->prior.is_list ? a->prior.list.v[b] : a->prior.num;
    s->sigma = m->loss == CV_LOSS_MSE ? a->sigma_noise : 1.0;
    int rc = 0;
    if (a->optimize_prior || a->optimize_sigma) {
        cv_laplace L;
        rc = cv_lap_fit_evidence(s, &L, e);
        int nl = L.nblocks, whole = nl != s->nb;
        double *dl = rc ? NULL : alloc_vals((size_t)nl);
        if (!rc && !dl)
            rc = oom(e, "prior precisions");
        for (int b = 0; b < nl && !rc; b++)
            dl[b] = s->delta[b];
        if (!rc)
            rc = cv_laplace_optimize(&L, dl, a->prior.is_list && nl > 1, a->optimize_prior,
                                     &s->sigma, a->optimize_sigma, a->temperature, NULL, e);
        for (int b = 0; !rc && b < s->nb; b++)
            s->delta[b] = dl[whole ? 0 : b];
        free(dl);
        cv_laplace_free(&L);
    }
    s->g = 1.0 / (s->sigma * s->sigma * a->temperature);
    return rc;
}

int cv_lap_fit_posterior(cv_lap_fit *s, cv_posterior *P, cv_err *e)
{
    size_t D = s->tb.dim;
    double g = s->g;
    double *p0 = alloc_vals(D);
    size_t *idx = malloc(sizeof(size_t) * (D ? D : 1));
    int rc = p0 && idx ? 0 : oom(e, "prior");
    for (size_t i = 0; i < D && !rc; i++)
        p0[i] = s->delta[s->owner[i]];
    if (rc) {
    } else if (s->inner == CV_LAP_FULL) {
        rc = cv_posterior_dense(P, D, s->G, g, p0, e);
        s->G = NULL;
    } else if (s->inner == CV_LAP_DIAG) {
        rc = cv_posterior_diag(P, D, s->d, g, p0, e);
    } else if (s->inner == CV_LAP_LOWRANK) {
        rc = cv_posterior_lowrank(P, D, s->K, s->V, s->lam, g, p0, e);
    } else {
        rc = cv_posterior_blocks(P, D, s->nb, e);
        for (int b = 0; b < s->nb && !rc; b++) {
            size_t n = 0;
            for (size_t i = 0; i < D; i++)
                if (s->owner[i] == b)
                    idx[n++] = i;
            if (s->kb[b].dim) {
                rc = cv_posterior_slot_kron(P, b, idx, &s->kb[b], g * s->kfac, s->delta[b], e);
                memset(&s->kb[b], 0, sizeof s->kb[b]); /* moved */
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

void cv_lap_fit_header(const cv_lap_fit *s, cJSON *out)
{
    static const char *const names[] = {"full", "diag", "kron", "lowrank", "last_layer"};
    const cv_model *m = s->c->m;
    cJSON_AddStringToObject(out, "structure", names[s->structure]);
    if (s->structure == CV_LAP_LAST_LAYER)
        cJSON_AddStringToObject(out, "last_layer_structure", names[s->inner]);
    cJSON_AddStringToObject(out, "likelihood", m->loss == CV_LOSS_MSE   ? "gaussian"
                                               : m->loss == CV_LOSS_BCE ? "bernoulli"
                                                                        : "categorical");
    cJSON_AddNumberToObject(out, "ggn_factor", s->factor);
    cJSON_AddNumberToObject(out, "n_params", (double)s->tb.dim);
    if (s->inner == CV_LAP_LOWRANK) {
        cJSON_AddNumberToObject(out, "k", s->K);
        cJSON_AddNumberToObject(out, "converged", s->converged);
    }
}

/* ---- the kept posterior ---------------------------------------------------------- */

void cv_lap_post_free(cv_lap_post *p)
{
    if (!p)
        return;
    for (int b = 0; p->kb && b < p->nb; b++)
        cv_kron_block_free(&p->kb[b]);
    for (int b = 0; p->Gb && b < p->nb; b++)
        free(p->Gb[b]);
    free(p->kb);
    free(p->Gb);
    free(p->bdim);
    free(p->delta);
    free(p->G);
    free(p->d);
    free(p->V);
    free(p->lam);
    memset(p, 0, sizeof *p);
}

void cv_lap_post_destroy(void *p)
{
    cv_lap_post_free(p);
    free(p);
}

static size_t post_bytes(const cv_lap_post *p)
{
    size_t D = p->dim, n = sizeof *p + (sizeof(size_t) + sizeof(double)) * (size_t)p->nb;
    if (p->G)
        n += D * D * sizeof(double);
    if (p->d)
        n += D * sizeof(double);
    if (p->V)
        n += (D + 1) * (size_t)p->K * sizeof(double);
    for (int b = 0; p->kb && b < p->nb; b++) {
        const cv_kron_block *k = &p->kb[b];
        n += sizeof *k + sizeof(double *);
        if (k->dim) /* the factors */
            n += sizeof(double) * ((size_t)k->dim_a * k->dim_a + (size_t)k->dim_b * k->dim_b);
        else
            n += p->bdim[b] * p->bdim[b] * sizeof(double);
    }
    return n;
}

cJSON *cv_lap_post_json(const cv_lap_post *p)
{
    static const char *const names[] = {"full", "diag", "kron", "lowrank", "last_layer"};
    cJSON *o = cJSON_CreateObject();
    if (!o)
        return NULL;
    cJSON_AddStringToObject(o, "structure", names[p->structure]);
    if (p->structure == CV_LAP_LAST_LAYER)
        cJSON_AddStringToObject(o, "last_layer_structure", names[p->inner]);
    cJSON_AddNumberToObject(o, "n_params", (double)p->dim);
    cJSON_AddNumberToObject(o, "tasks", p->tasks);
    cJSON_AddItemToObject(o, "prior_precision", cv_json_doubles(p->delta, (size_t)p->nb));
    cJSON_AddNumberToObject(o, "sigma_noise", p->sigma);
    cJSON_AddNumberToObject(o, "temperature", p->temperature);
    return o;
}

const char *cv_lap_keep_name(const cv_lap_opts *a)
{
    return a->keep.on ? (a->keep.s[0] ? a->keep.s : CV_LAP_DEFAULT_NAME)
           : a->accumulate_into.on ? a->accumulate_into.s
                                   : NULL;
}

void cv_lap_job_names(const cv_job_spec *j, const char **read, const char **write)
{
    *read = *write = NULL;
    if (j->op != &cv_op_laplace && j->op != &cv_op_predict)
        return;
    const cv_lap_opts *a = cv_lap_of(&j->opts);
    *read = a->accumulate_into.on ? a->accumulate_into.s
            : a->posterior.on     ? a->posterior.s
                                  : NULL;
    *write = cv_lap_keep_name(a);
}

size_t cv_lap_keep_bytes_min(const cv_job_spec *j, const cv_model *m)
{
    const char *rd, *wr;
    cv_lap_job_names(j, &rd, &wr);
    if (!wr)
        return 0;
    const cv_lap_opts *a = cv_lap_of(&j->opts);
    double D = (double)a->post_dim, b = 0;
    int inner = cv_lap_inner(a);
    cv_kron_sizes ks;
    cv_err ignored;
    if (inner == CV_LAP_FULL)
        b = D * D;
    else if (inner == CV_LAP_DIAG)
        b = D;
    else if (inner == CV_LAP_LOWRANK)
        b = D * (a->k < D ? a->k : D);
    else if (a->structure == CV_LAP_KRON && !cv_kron_sizes_of(m, &ks, &ignored))
        b = ks.square; /* the Kronecker layers' factors (the others' dense blocks more) */
    return cv_op_bytes(b * sizeof(double));
}

int cv_lap_job_use(cv_job_spec *j, const cv_lap_post *p, const cv_model *m, cv_err *e)
{
    cv_lap_opts *a = cv_lap_of(&j->opts);
    static const char *const names[] = {"full", "diag", "kron", "lowrank", "last_layer"};
    if (a->accumulate_into.on) {
        if (a->structure != p->structure || cv_lap_inner(a) != p->inner)
            return cv_err_set(e, CV_EINVAL, "invalid_option", "options.accumulate_into",
                              "posterior '%s' has structure %s%s%s; this job's is %s%s%s (give "
                              "the kept posterior's structure)",
                              a->accumulate_into.s, names[p->structure],
                              p->structure == CV_LAP_LAST_LAYER ? " with " : "",
                              p->structure == CV_LAP_LAST_LAYER ? names[p->inner] : "",
                              names[a->structure],
                              a->structure == CV_LAP_LAST_LAYER ? " with " : "",
                              a->structure == CV_LAP_LAST_LAYER ? names[cv_lap_inner(a)] : "");
        return 0;
    }
    a->structure = p->structure;
    a->last_layer_structure = p->inner;
    a->k = p->K > 0 ? p->K : a->k;
    if (j->op == &cv_op_predict && p->inner == CV_LAP_LOWRANK &&
        cv_opts_given(&j->opts, "return_posterior_samples"))
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.return_posterior_samples",
                          "posterior samples are drawn for structure full, diag and kron; the "
                          "kept posterior '%s' is lowrank", a->posterior.s);
    /* the op's model checks again with the kept structure (post_dim, sizes) */
    return j->op->bind_model ? j->op->bind_model(&j->opts, m, j->blocks.resolved,
                                                 j->blocks.nresolved, e)
                             : 0;
}

/* Moves (or copies, when from is const) the curvature into a new kept
 * posterior, scaled by g. */
static int post_from_fit(cv_lap_fit *s, cv_lap_post *p, cv_err *e)
{
    size_t D = s->tb.dim;
    p->structure = s->structure;
    p->inner = s->inner;
    p->nb = s->nb;
    p->dim = D;
    p->tasks = 1;
    p->sigma = s->sigma;
    p->temperature = s->a->temperature;
    p->bdim = malloc(sizeof(size_t) * (size_t)s->nb);
    p->delta = dup_vals(s->delta, (size_t)s->nb);
    if (!p->bdim || !p->delta)
        return oom(e, "kept posterior");
    for (int b = 0; b < s->nb; b++)
        p->bdim[b] = s->lb[b].dim;
    double g = s->g;
    if (s->inner == CV_LAP_FULL) {
        p->G = s->G;
        s->G = NULL;
        for (size_t i = 0; i < D * D; i++)
            p->G[i] *= g;
    } else if (s->inner == CV_LAP_DIAG) {
        p->d = s->d;
        s->d = NULL;
        for (size_t i = 0; i < D; i++)
            p->d[i] *= g;
    } else if (s->inner == CV_LAP_LOWRANK) {
        p->V = s->V;
        p->lam = s->lam;
        p->K = s->K;
        s->V = s->lam = NULL;
        for (int i = 0; i < p->K; i++)
            p->lam[i] *= g;
    } else {
        p->kb = s->kb;
        p->Gb = s->Gb;
        s->kb = NULL;
        s->Gb = NULL;
        p->kron_n = s->kron_n;
        for (int b = 0; b < p->nb; b++) {
            cv_kron_block *k = &p->kb[b];
            if (k->dim) { /* B <- g factor B, in a new block (no stale eigenbasis) */
                cv_kron_block nk;
                double *B = dup_vals(k->B, (size_t)k->dim_b * k->dim_b);
                if (!B)
                    return oom(e, "kept posterior");
                for (size_t i = 0; i < (size_t)k->dim_b * k->dim_b; i++)
                    B[i] *= g * s->kfac;
                int rc = kron_block_copy(k->A, B, k->in, k->dim_b, k->has_bias, &nk, e);
                free(B);
                if (rc)
                    return -1;
                cv_kron_block_free(k);
                *k = nk;
            } else {
                for (size_t i = 0; i < p->bdim[b] * p->bdim[b]; i++)
                    p->Gb[b][i] *= g;
            }
        }
    }
    return 0;
}

/* p += q's data term (same structure and blocks). */
static int post_add(cv_lap_post *p, const cv_lap_post *q, cv_err *e)
{
    size_t D = p->dim;
    p->tasks += q->tasks;
    if (p->G)
        for (size_t i = 0; i < D * D; i++)
            p->G[i] += q->G[i];
    if (p->d)
        for (size_t i = 0; i < D; i++)
            p->d[i] += q->d[i];
    for (int b = 0; p->kb && b < p->nb; b++) {
        cv_kron_block *k = &p->kb[b];
        const cv_kron_block *l = &q->kb[b];
        if (!k->dim) {
            for (size_t i = 0; i < p->bdim[b] * p->bdim[b]; i++)
                p->Gb[b][i] += q->Gb[b][i];
            continue;
        }
        /* A <- (n_p A_p + n_q A_q) / (n_p + n_q), B <- B_p + B_q */
        size_t na = (size_t)k->dim_a * k->dim_a, nb = (size_t)k->dim_b * k->dim_b;
        double wp = p->kron_n / (p->kron_n + q->kron_n), wq = 1 - wp;
        double *A = alloc_vals(na), *B = alloc_vals(nb);
        if (!A || !B) {
            free(A);
            free(B);
            return oom(e, "accumulated factors");
        }
        for (size_t i = 0; i < na; i++)
            A[i] = wp * k->A[i] + wq * l->A[i];
        for (size_t i = 0; i < nb; i++)
            B[i] = k->B[i] + l->B[i];
        int in = k->in, out = k->dim_b, bias = k->has_bias;
        cv_kron_block_free(k);
        if (cv_kron_block_init(k, in, out, bias, A, B, 1, e))
            return -1;
    }
    if (p->kb)
        p->kron_n += q->kron_n;
    return 0;
}

/* A deep copy of p. */
static int post_copy(const cv_lap_post *p, cv_lap_post *c, cv_err *e)
{
    *c = *p;
    c->bdim = NULL;
    c->delta = c->G = c->d = c->V = c->lam = NULL;
    c->Gb = NULL;
    c->kb = NULL;
    size_t D = p->dim, nb = (size_t)p->nb;
    c->bdim = malloc(sizeof(size_t) * nb);
    c->delta = dup_vals(p->delta, nb);
    int rc = c->bdim && c->delta ? 0 : oom(e, "kept posterior");
    if (!rc)
        memcpy(c->bdim, p->bdim, sizeof(size_t) * nb);
    if (!rc && p->G && !(c->G = dup_vals(p->G, D * D)))
        rc = oom(e, "kept posterior");
    if (!rc && p->d && !(c->d = dup_vals(p->d, D)))
        rc = oom(e, "kept posterior");
    if (!rc && p->V &&
        (!(c->V = dup_vals(p->V, D * (size_t)p->K)) || !(c->lam = dup_vals(p->lam, (size_t)p->K))))
        rc = oom(e, "kept posterior");
    if (!rc && p->kb) {
        c->kb = calloc(nb, sizeof *c->kb);
        c->Gb = calloc(nb, sizeof *c->Gb);
        rc = c->kb && c->Gb ? 0 : oom(e, "kept posterior");
        for (int b = 0; b < p->nb && !rc; b++) {
            const cv_kron_block *k = &p->kb[b];
            if (k->dim)
                rc = kron_block_copy(k->A, k->B, k->in, k->dim_b, k->has_bias, &c->kb[b], e);
            else if (!(c->Gb[b] = dup_vals(p->Gb[b], p->bdim[b] * p->bdim[b])))
                rc = oom(e, "kept posterior");
        }
    }
    if (rc)
        cv_lap_post_free(c);
    return rc;
}

int cv_lap_fit_keep(cv_lap_fit *s, const cv_lap_post *prev, cv_lap_post **out, cv_err *e)
{
    *out = NULL;
    cv_lap_post *p = calloc(1, sizeof *p), q = {0};
    if (!p)
        return oom(e, "kept posterior");
    int rc = post_from_fit(s, &q, e);
    if (!rc && prev) { /* prev's prior and noise, its data term plus this task's */
        if (prev->dim != q.dim || prev->nb != q.nb || prev->inner != q.inner)
            rc = cv_err_set(e, CV_EINVAL, "invalid_option", "options.accumulate_into",
                            "the kept posterior does not match this job's structure");
        if (!rc)
            rc = post_copy(prev, p, e);
        if (!rc)
            rc = post_add(p, &q, e);
    } else if (!rc) {
        *p = q;
        memset(&q, 0, sizeof q);
    }
    cv_lap_post_free(&q);
    if (rc) {
        cv_lap_post_destroy(p);
        return -1;
    }
    p->bytes = post_bytes(p);
    *out = p;
    return 0;
}

int cv_lap_fit_load(cv_op_ctx *c, const cv_lap_post *p, cv_lap_fit *s, cv_err *e)
{
    memset(s, 0, sizeof *s);
    s->c = c;
    s->structure = p->structure;
    s->inner = p->inner;
    s->kept = p;
    s->g = 1;
    s->kfac = 1;
    s->sigma = p->sigma;
    s->K = p->K;
    s->converged = p->K;
    const cv_loss_state *ls = cv_curv_loss_state(c->curv);
    s->factor = (c->m->loss == CV_LOSS_MSE ? 0.5 : 1.0) / (ls->scale > 0 ? ls->scale : 1);
    if (fit_target(s, e))
        return -1;
    if (s->tb.dim != p->dim || s->nb != p->nb)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.posterior",
                          "the kept posterior has %zu parameters in %d blocks; the model has "
                          "%zu in %d", p->dim, p->nb, s->tb.dim, s->nb);
    cv_lap_post q;
    if (post_copy(p, &q, e))
        return -1;
    s->G = q.G;
    s->d = q.d;
    s->V = q.V;
    s->lam = q.lam;
    s->kb = q.kb;
    s->Gb = q.Gb;
    s->delta = q.delta;
    free(q.bdim);
    return 0;
}

int cv_lap_post_logdet(cv_op_ctx *c, const cv_lap_post *p, double *out, cv_err *e)
{
    cv_lap_fit s;
    cv_laplace L = {0};
    int rc = cv_lap_fit_load(c, p, &s, e);
    cv_lap_opts a = {0};
    cv_lap_defaults(&a);
    a.prior.is_list = 1; /* one precision per block: the dense form for full */
    s.a = &a;
    if (!rc)
        rc = cv_lap_fit_evidence(&s, &L, e);
    cv_laplace_terms t;
    double *dl = rc ? NULL : alloc_vals((size_t)L.nblocks);
    if (!rc && !dl)
        rc = oom(e, "prior precisions");
    for (int b = 0; b < L.nblocks && !rc; b++)
        dl[b] = s.delta[b];
    if (!rc)
        rc = cv_laplace_eval(&L, dl, 1.0, 1.0, &t, NULL, e);
    if (!rc)
        *out = t.log_det_posterior_precision;
    free(dl);
    cv_laplace_free(&L);
    cv_lap_fit_free(&s);
    return rc;
}
