/* op_kron.c - the Kronecker-factored curvatures in the ops (see op_kron.h):
 * the submit-time option checks, the factors once per job, the mapping of
 * the job's blocks onto Kronecker and exact slots, block_kinds, and the
 * exact answers (trace, logdet, diag, eigen, density, solve) from the
 * factors. */
#include "api/op_kron.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/op_args.h"
#include "api/op_util.h"
#include "engine/bigmem.h"

enum { WHOLE = 0, WEIGHT_ONLY, BIAS_ONLY };

typedef struct {
    int factor;            /* index in the cv_kron's factors, or -1: an exact slot */
    int exact;             /* index in the cv_kron's exact blocks (exact slots; -1: none) */
    int part;              /* WHOLE, WEIGHT_ONLY, BIAS_ONLY (Kronecker slots) */
    cv_kron_block kb;      /* Kronecker slots */
    int kb_ready;
    cv_block sub;          /* the slot's tensors */
    cv_curv_linop_ctx lc;  /* exact slots: the callback operator */
    cv_linop op;
} kslot;

typedef struct {
    cv_block b;
    int nslots, all_kron;
    kslot *s;              /* b.count entries allocated (never moved: the diag borrows) */
    cv_kron_diag d;
    cv_linop fwd;
} kblock;

struct cv_op_kron {
    cv_kron k;
    double **s;            /* ekfac: values per factor, else NULL */
    cv_curvature base;
    int nblocks;
    kblock *blocks;
};

/* ---- submit-time ------------------------------------------------------------ */

int cv_op_kron_check(const cv_opts *o, cv_curvature kind, cv_err *e)
{
    const cv_op_base *b = o->args;
    int kron = cv_curvature_is_kron(kind);
    static const char *const names[] = {"fisher_type", "kfac_approx"};
    for (int i = 0; i < 2 && !kron; i++)
        if (cv_opts_given(o, names[i])) {
            char f[48];
            snprintf(f, sizeof f, "options.%s", names[i]);
            return cv_err_set(e, CV_EINVAL, "invalid_option", f,
                              "%s applies to kfac, kflr, kfra, ekfac (the job's curvature is "
                              "%s)", f, cv_curvature_name(kind));
        }
    if (kind == CV_CURV_KFLR && b->fisher_type != CV_KRON_TYPE2)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.fisher_type",
                          "kflr is kfac with fisher_type \"type-2\"; for \"%s\" use curvature "
                          "kfac", cv_kron_fisher_name((cv_kron_fisher)b->fisher_type));
    if (kind == CV_CURV_KFRA && b->fisher_type != CV_KRON_TYPE2)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.fisher_type",
                          "kfra's recursion is the GGN's (fisher_type \"type-2\"), not \"%s\"",
                          cv_kron_fisher_name((cv_kron_fisher)b->fisher_type));
    return 0;
}

void cv_op_kron_memory(cv_curvature kind, int fisher_type, int mc_samples, int C, int flags,
                       cv_op_memory *m)
{
    if (!cv_curvature_is_kron(kind))
        return;
    const cv_kron_sizes *k = &m->kron;
    double d = k->square, eig = k->square + k->linear;
    if (kind == CV_CURV_EKFAC)
        d += k->product + eig;
    else if (flags & CV_OP_KRON_MEM_EIGEN)
        d += eig;
    m->factor_bytes = cv_op_bytes(d * sizeof(double));
    int cols = kind == CV_CURV_KFRA || (flags & CV_OP_KRON_MEM_ACP_GIVEN) ? 0
               : flags & CV_OP_KRON_MEM_ACP_MAX                           ? 1
               : kind == CV_CURV_KFLR || fisher_type == CV_KRON_TYPE2     ? C
               : fisher_type == CV_KRON_MC                                ? mc_samples
                                                                          : 1;
    if (cols > 32)
        cols = 32;
    if (k->nfactors > 0 && cols > m->max_vectors)
        m->max_vectors = cols;
}

cv_curvature cv_op_kron_engine_kind(cv_curvature kind, const cv_op_base *b)
{
    if (!cv_curvature_is_kron(kind))
        return kind;
    if (kind == CV_CURV_KFLR || kind == CV_CURV_KFRA)
        return CV_CURV_GGN;
    return cv_kron_fisher_curvature((cv_kron_fisher)b->fisher_type);
}

/* ---- the factors and the slots ------------------------------------------------ */

static kblock *find_block(const cv_op_ctx *c, const cv_block *b);

/* The owner of tensor t: factor f (*fi, *pos its place in the factor's
 * block) or exact block x (*xi); 0 when found. */
static int owner_of(const cv_kron *k, int t, int *fi, int *pos, int *xi)
{
    *fi = *xi = *pos = -1;
    for (int f = 0; f < k->nfactors; f++)
        for (int i = 0; i < k->factors[f].block.count; i++)
            if (k->factors[f].block.idx[i] == t) {
                *fi = f;
                *pos = i;
                return 0;
            }
    for (int x = 0; x < k->nexact; x++)
        for (int i = 0; i < k->exact[x].count; i++)
            if (k->exact[x].idx[i] == t) {
                *xi = x;
                return 0;
            }
    return -1;
}

/* A copy of the principal sub-factor rows/cols [lo, lo + n) of the dim x dim S. */
static double *sub_factor(const double *S, int dim, int lo, int n)
{
    double *o = malloc(sizeof(double) * (size_t)n * (size_t)n);
    for (int i = 0; o && i < n; i++)
        memcpy(o + (size_t)i * n, S + (size_t)(lo + i) * dim + lo, sizeof(double) * (size_t)n);
    return o;
}

static int init_kron_slot(struct cv_op_kron *K, kslot *s, cv_err *e)
{
    const cv_kron_factor *f = &K->k.factors[s->factor];
    int in = f->dim_a - f->has_bias;
    if (s->part == WHOLE) {
        if (cv_kron_block_init(&s->kb, in, f->dim_b, f->has_bias, f->A, f->B, 0, e))
            return -1;
        s->kb_ready = 1;
        return 0;
    }
    if (K->s)
        return cv_err_set(e, CV_EINVAL, "invalid_blocks", "blocks",
                          "ekfac needs a layer's weight and bias in one block (layer %s is "
                          "cut: its eigenbasis is the whole layer's)", f->block.name);
    int lo = s->part == WEIGHT_ONLY ? 0 : in, n = s->part == WEIGHT_ONLY ? in : 1;
    double *A = sub_factor(f->A, f->dim_a, lo, n), *B = sub_factor(f->B, f->dim_b, 0, f->dim_b);
    if (!A || !B) {
        free(A);
        free(B);
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "Kronecker sub-factors");
    }
    if (cv_kron_block_init(&s->kb, n, f->dim_b, 0, A, B, 1, e))
        return -1;
    s->kb_ready = 1;
    return 0;
}

/* Splits block b into slots: runs of consecutive tensors with one owner. */
static int map_block(cv_op_ctx *c, struct cv_op_kron *K, kblock *kb, cv_err *e)
{
    const cv_block *b = &kb->b;
    kb->s = calloc((size_t)(b->count > 0 ? b->count : 1), sizeof(kslot));
    if (!kb->s)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "Kronecker slots");
    cv_kron_diag_init(&kb->d);
    kb->all_kron = 1;
    int run[2 * CV_MAX_LAYERS];
    for (int i = 0; i < b->count;) {
        int fi, pos, xi, n = 0;
        if (owner_of(&K->k, b->idx[i], &fi, &pos, &xi))
            return cv_err_set(e, CV_EINTERNAL, "internal", "blocks",
                              "parameter %d belongs to no layer block", b->idx[i]);
        int posmask = 0;
        for (; i < b->count; i++) {
            int f2, p2, x2;
            owner_of(&K->k, b->idx[i], &f2, &p2, &x2);
            if (f2 != fi || x2 != xi)
                break;
            run[n++] = b->idx[i];
            posmask |= 1 << (p2 < 0 ? 0 : p2);
        }
        for (int q = 0; q < kb->nslots; q++)
            if (kb->s[q].factor == fi && kb->s[q].exact == xi)
                return cv_err_set(e, CV_EINVAL, "invalid_blocks", "blocks",
                                  "the tensors of layer %s are not consecutive in this block "
                                  "(its Kronecker/exact block must be one piece)",
                                  fi >= 0 ? K->k.factors[fi].block.name : K->k.exact[xi].name);
        kslot *s = &kb->s[kb->nslots++];
        s->factor = fi;
        s->exact = xi;
        if (cv_block_from_indices(c->m, run, n, &s->sub, e))
            return -1;
        if (fi >= 0) {
            int whole = n == K->k.factors[fi].block.count;
            s->part = whole ? WHOLE : posmask == 1 ? WEIGHT_ONLY : BIAS_ONLY;
            snprintf(s->sub.name, sizeof s->sub.name, "%s", K->k.factors[fi].block.name);
            if (init_kron_slot(K, s, e) ||
                cv_kron_diag_add(&kb->d, &s->kb, whole && K->s ? K->s[fi] : NULL, e))
                return -1;
        } else {
            kb->all_kron = 0;
            snprintf(s->sub.name, sizeof s->sub.name, "%s", K->k.exact[xi].name);
            cv_curv_linop(&s->op, &s->lc, c->curv, K->base, &s->sub, NULL);
            if (cv_kron_diag_add_op(&kb->d, &s->op, e))
                return -1;
        }
    }
    if (cv_kron_diag_check(&kb->d, b, e))
        return -1;
    return cv_kron_diag_linop(&kb->d, CV_KRON_FORWARD, 0, &kb->fwd, e);
}

int cv_op_kron_is_acp(const cv_op_ctx *c)
{
    return c->method && c->opts && c->opts->specs && strcmp(c->method, "acp") == 0;
}

void cv_op_kron_acp_alphas(const cv_op_ctx *c, const cv_block *b, cJSON *out)
{
    kblock *kb = find_block(c, b);
    if (!kb)
        return;
    cJSON *a = cJSON_AddArrayToObject(out, "acp_alpha");
    for (int q = 0; q < kb->nslots; q++) {
        const kslot *s = &kb->s[q];
        if (s->factor < 0)
            continue;
        cJSON *o = cJSON_CreateObject();
        cJSON_AddItemToArray(a, o);
        cJSON_AddStringToObject(o, "name", s->sub.name);
        cJSON_AddNumberToObject(o, "alpha", c->kron->k.factors[s->factor].alpha);
    }
}

static int compute_factors(cv_op_ctx *c, struct cv_op_kron *K, cv_err *e)
{
    const cv_op_base *ob = c->opts->args;
    cv_kron_options ko = {0};
    ko.fisher_type = c->kind == CV_CURV_KFLR ? CV_KRON_TYPE2 : (cv_kron_fisher)ob->fisher_type;
    ko.approx = (cv_kron_approx)ob->kfac_approx;
    if (cv_op_kron_is_acp(c)) { /* newton acp: A, and B = alpha I */
        const cv_newton_args *na = c->opts->args;
        ko.acp = 1;
        ko.acp_alpha = na->acp_alpha.choice < 0 ? na->acp_alpha.num : 0;
        return cv_curv_kron(c->curv, &ko, &K->k, e);
    }
    if (c->kind == CV_CURV_KFRA)
        return cv_curv_kfra(c->curv, &ko, &K->k, e);
    if (cv_curv_kron(c->curv, &ko, &K->k, e))
        return -1;
    /* ekfac: the values s[f] in each factor's Kronecker eigenbasis (the engine allocates) */
    return c->kind == CV_CURV_EKFAC ? cv_curv_ekfac(c->curv, &ko, &K->k, &K->s, e) : 0;
}

void cv_op_kron_free(cv_op_ctx *c)
{
    struct cv_op_kron *K = c->kron;
    if (!K)
        return;
    for (int i = 0; i < K->nblocks; i++) {
        kblock *kb = &K->blocks[i];
        for (int q = 0; kb->s && q < kb->nslots; q++)
            if (kb->s[q].kb_ready)
                cv_kron_block_free(&kb->s[q].kb);
        free(kb->s);
        cv_kron_diag_free(&kb->d);
    }
    for (int f = 0; K->s && f < K->k.nfactors; f++)
        free(K->s[f]);
    free(K->s);
    free(K->blocks);
    cv_kron_free(&K->k);
    free(K);
    c->kron = NULL;
}

int cv_op_kron_new(cv_op_ctx *c, const cv_block *blocks, int n, cv_err *e)
{
    c->kron = NULL;
    struct cv_op_kron *K = calloc(1, sizeof *K);
    if (!K)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "Kronecker factors");
    K->base = cv_op_kron_engine_kind(c->kind, c->opts->args);
    K->blocks = calloc((size_t)(n > 0 ? n : 1), sizeof(kblock));
    c->kron = K;
    if (!K->blocks) {
        cv_op_kron_free(c);
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "Kronecker blocks");
    }
    int rc = compute_factors(c, K, e);
    for (int i = 0; i < n && !rc; i++) {
        K->blocks[i].b = blocks[i];
        K->nblocks = i + 1;
        rc = map_block(c, K, &K->blocks[i], e);
    }
    if (rc)
        cv_op_kron_free(c);
    return rc;
}

const cv_kron *cv_op_kron_factors(const cv_op_ctx *c) { return c->kron ? &c->kron->k : NULL; }

static int same_block(const cv_block *a, const cv_block *b)
{
    return a->count == b->count && !memcmp(a->idx, b->idx, sizeof(int) * (size_t)a->count);
}

static kblock *find_block(const cv_op_ctx *c, const cv_block *b)
{
    for (int i = 0; c->kron && i < c->kron->nblocks; i++)
        if (same_block(&c->kron->blocks[i].b, b))
            return &c->kron->blocks[i];
    return NULL;
}

static int no_block(void *ctx, int k, const double *X, double *Y, cv_err *e)
{
    return cv_err_set(e, CV_EINTERNAL, "internal", "blocks",
                      "no Kronecker operator for this block");
}

void cv_op_kron_linop(cv_op_ctx *c, const cv_block *b, cv_linop *op)
{
    kblock *kb = find_block(c, b);
    if (kb)
        *op = kb->fwd;
    else
        *op = (cv_linop){.n = b->dim, .apply = no_block};
    op->progress = c->progress;
}

void cv_op_kron_block_kinds(const cv_op_ctx *c, const cv_block *b, cJSON *out)
{
    kblock *kb = find_block(c, b);
    if (!kb)
        return;
    cJSON *a = cJSON_AddArrayToObject(out, "block_kinds");
    for (int q = 0; q < kb->nslots; q++) {
        const kslot *s = &kb->s[q];
        cJSON *o = cJSON_CreateObject();
        cJSON_AddItemToArray(a, o);
        cJSON_AddStringToObject(o, "name", s->sub.name);
        cJSON_AddItemToObject(o, "params", cv_json_param_names(c->m, &s->sub));
        cJSON_AddStringToObject(o, "kind", s->factor >= 0 ? "kronecker" : "exact");
        if (s->factor >= 0) {
            cJSON_AddNumberToObject(o, "dim_a", s->kb.dim_a);
            cJSON_AddNumberToObject(o, "dim_b", s->kb.dim_b);
        }
    }
}

/* ---- exact paths --------------------------------------------------------------- */

/* The block's operator when every slot is Kronecker, else NULL. */
static kblock *exact_block(cv_op_ctx *c, const cv_block *b)
{
    kblock *kb = find_block(c, b);
    return kb && kb->all_kron ? kb : NULL;
}

static double *zeros(size_t n, cv_err *e)
{
    double *z = cv_big_calloc(n ? n : 1, sizeof(double));
    if (!z)
        cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "%zu values", n);
    return z;
}

int cv_op_kron_trace(cv_op_ctx *c, const cv_block *b, cJSON *out, cv_err *e)
{
    kblock *kb = exact_block(c, b);
    double tr, ld;
    if (!kb)
        return 0;
    if (cv_kron_diag_trace(&kb->d, &tr, e))
        return -1;
    cJSON_AddStringToObject(out, "method", c->method);
    cJSON_AddNumberToObject(out, "trace", tr);
    cJSON_AddNumberToObject(out, "stderr", 0);
    cJSON_AddNumberToObject(out, "probes", 0);
    cv_err e2 = {0};
    if (!cv_kron_diag_logdet(&kb->d, 0, &ld, &e2)) /* only where M is positive definite */
        cJSON_AddNumberToObject(out, "logdet", ld);
    cJSON_AddBoolToObject(out, "exact", 1);
    return 1;
}

int cv_op_kron_diag(cv_op_ctx *c, const cv_block *b, cJSON *out, cv_err *e)
{
    kblock *kb = exact_block(c, b);
    if (!kb)
        return 0;
    double *d = zeros(b->dim, e), *z = d ? zeros(b->dim, e) : NULL;
    int rc = z && !cv_kron_diag_diagonal(&kb->d, d, e) ? 1 : -1;
    if (rc > 0) {
        double tr = 0;
        for (size_t i = 0; i < b->dim; i++)
            tr += d[i];
        cJSON_AddStringToObject(out, "method", c->method);
        cJSON_AddItemToObject(out, "diag", cv_json_doubles(d, b->dim));
        cJSON_AddItemToObject(out, "stderr", cv_json_doubles(z, b->dim));
        cJSON_AddNumberToObject(out, "trace", tr);
        cJSON_AddNumberToObject(out, "probes", 0);
        cJSON_AddBoolToObject(out, "exact", 1);
    }
    free(d);
    free(z);
    return rc;
}

int cv_op_kron_eigen(cv_op_ctx *c, const cv_block *b, const cv_eigen_options *o, cJSON *out,
                     cv_err *e)
{
    kblock *kb = exact_block(c, b);
    if (!kb)
        return 0;
    int k = o->k;
    if (k < 1 || (size_t)k > b->dim)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options.k",
                          "k = %d is outside [1, %zu]", k, b->dim);
    double *vals = zeros((size_t)k, e), *res = vals ? zeros((size_t)k, e) : NULL;
    double *vecs = res && o->return_vectors ? zeros(b->dim * (size_t)k, e) : NULL;
    int rc = res && (vecs || !o->return_vectors) &&
                     !cv_kron_diag_eigen(&kb->d, o->which, k, vals, vecs, NULL, e)
                 ? 1
                 : -1;
    if (rc > 0) {
        cJSON_AddStringToObject(out, "method", c->method);
        cJSON_AddStringToObject(out, "which", cv_which_name(o->which));
        cJSON_AddItemToObject(out, "eigenvalues", cv_json_doubles(vals, (size_t)k));
        cJSON_AddItemToObject(out, "residuals", cv_json_doubles(res, (size_t)k));
        cJSON_AddNumberToObject(out, "converged", k);
        cJSON_AddNumberToObject(out, "iterations", 0);
        if (vecs)
            cJSON_AddItemToObject(out, "eigenvectors", cv_json_columns(vecs, b->dim, k));
        cJSON_AddBoolToObject(out, "exact", 1);
    }
    free(vals);
    free(res);
    free(vecs);
    return rc;
}

/* The exact spectrum's nodes go into the result: beyond this many the op's
 * SLQ runs instead. */
#define KRON_DENSITY_MAX ((size_t)1 << 20)

int cv_op_kron_density(cv_op_ctx *c, const cv_block *b, const cv_density_options *o,
                       cJSON *out, cv_err *e)
{
    kblock *kb = exact_block(c, b);
    if (!kb || b->dim > KRON_DENSITY_MAX)
        return 0;
    double *vals = zeros(b->dim, e);
    cv_density_result r;
    if (!vals || cv_kron_diag_eigenvalues(&kb->d, vals, e) ||
        cv_density_from_spectrum(vals, b->dim, o, &r, e)) {
        free(vals);
        return -1;
    }
    free(vals);
    cJSON *d = cJSON_AddObjectToObject(out, "density");
    cJSON_AddItemToObject(d, "grid", cv_json_doubles(r.grid, (size_t)r.grid_points));
    cJSON_AddItemToObject(d, "values", cv_json_doubles(r.values, (size_t)r.grid_points));
    cJSON_AddItemToObject(out, "nodes", cv_json_columns(r.nodes, (size_t)r.steps, 1));
    cJSON_AddItemToObject(out, "weights", cv_json_columns(r.weights, (size_t)r.steps, 1));
    cJSON_AddNumberToObject(out, "sigma2", r.sigma2_used);
    cJSON_AddNumberToObject(out, "lanczos_steps", 0);
    cJSON_AddNumberToObject(out, "reorthogonalized_steps", 0);
    cJSON_AddBoolToObject(out, "exact", 1);
    cv_density_result_free(&r);
    return 1;
}

int cv_op_kron_solve(cv_op_ctx *c, const cv_block *b, const double *rhs, double damping,
                     cJSON *out, cv_err *e)
{
    kblock *kb = exact_block(c, b);
    if (!kb)
        return 0;
    cv_kron_diag inv;
    cv_kron_diag_init(&inv);
    cv_linop op;
    int rc = 0;
    for (int q = 0; q < kb->nslots && !rc; q++)
        rc = cv_kron_diag_add(&inv, &kb->s[q].kb, kb->d.slots[q].s, e);
    cv_err e2 = {0};
    if (!rc && cv_kron_diag_linop(&inv, CV_KRON_INVERSE, damping, &op, &e2)) {
        cv_kron_diag_free(&inv); /* not positive definite: the iterative method runs */
        return 0;
    }
    double *x = rc ? NULL : zeros(b->dim, e), *r = x ? zeros(b->dim, e) : NULL;
    if (!r || op.apply(op.ctx, 1, rhs, x, e) || kb->fwd.apply(kb->fwd.ctx, 1, x, r, e)) {
        free(x);
        free(r);
        cv_kron_diag_free(&inv);
        return -1;
    }
    double nr = 0, nb = 0;
    for (size_t i = 0; i < b->dim; i++) {
        double d = rhs[i] - (r[i] + damping * x[i]);
        nr += d * d;
        nb += rhs[i] * rhs[i];
    }
    cJSON_AddStringToObject(out, "method", c->method);
    cJSON_AddItemToObject(out, "solution", cv_json_doubles(x, b->dim));
    cJSON_AddNumberToObject(out, "residual", nb > 0 ? sqrt(nr / nb) : 0);
    cJSON_AddNumberToObject(out, "iterations", 0);
    cJSON_AddBoolToObject(out, "converged", 1);
    cJSON_AddBoolToObject(out, "exact", 1);
    free(x);
    free(r);
    cv_kron_diag_free(&inv);
    return 1;
}

/* ---- the Kronecker Newton step ---------------------------------------------------- */

static int newton_exact_slot(const kslot *ks, const double *rhs, double damping,
                             const cv_solve_options *so, double *x, int *iterations,
                             int *converged, double *quad, cv_err *e)
{
    cv_solve_options o = *so;
    o.damping = damping;
    cv_solve_result r;
    if (cv_solve(&ks->op, rhs, &o, &r, NULL, e))
        return -1;
    memcpy(x, r.x, sizeof(double) * r.n);
    *iterations += r.iterations;
    *converged &= r.converged;
    cv_solve_result_free(&r);
    if (!quad)
        return 0;
    double *t = zeros(ks->op.n, e); /* x^T M x: one product with the exact block */
    int rc = !t || ks->op.apply(ks->op.ctx, 1, x, t, e) ? -1 : 0;
    *quad = 0;
    for (size_t i = 0; !rc && i < ks->op.n; i++)
        *quad += x[i] * t[i];
    free(t);
    return rc;
}

int cv_op_kron_newton(cv_op_ctx *c, const cv_block *b, const double *g, double damping,
                      int factored, const cv_solve_options *so, double *s, int *iterations,
                      int *converged, int *exact, double *sms, cv_err *e)
{
    kblock *kb = find_block(c, b);
    *iterations = 0;
    *converged = 1;
    *exact = kb && kb->all_kron;
    if (!kb)
        return cv_err_set(e, CV_EINTERNAL, "internal", "blocks",
                          "no Kronecker operator for this block");
    double *rhs = zeros(b->dim, e), total = 0;
    if (!rhs)
        return -1;
    for (size_t i = 0; i < b->dim; i++)
        rhs[i] = -g[i];
    int rc = 0;
    for (int i = 0; i < kb->nslots && !rc; i++) {
        kslot *ks = &kb->s[i];
        const cv_kron_slot *sl = &kb->d.slots[i];
        const double *x = rhs + sl->offset;
        double *y = s + sl->offset, quad = 0, *qp = sms ? &quad : NULL;
        if (ks->factor < 0)
            rc = newton_exact_slot(ks, x, damping, so, y, iterations, converged, qp, e);
        else if (factored && sl->s)
            rc = cv_err_set(e, CV_EINVAL, "invalid_option", "options.damping_mode",
                            "damping_mode \"factored\" is KFAC's (factored A and B); ekfac's "
                            "eigenvalues are not a Kronecker product: use \"exact\"");
        else if (factored)
            rc = cv_kron_block_factored_inverse_quad(&ks->kb, damping, 1, x, y, NULL, qp, e);
        else
            rc = cv_kron_block_inverse_quad(&ks->kb, sl->s, damping, 1, x, y, qp, e);
        total += quad;
    }
    if (sms)
        *sms = total;
    free(rhs);
    return rc;
}
