/* curv.c - curvature-vector products on one batch: the cached forward pass,
 * the gradient's backward pass, and Hessian / GGN / Fisher / EF products built
 * from the per-layer kernels of layer.h (forward-mode Jacobian products, the
 * loss's output matrix, reverse-mode products, Pearlmutter's extra terms). */
#include "curv.h"

#include <cblas.h>
#include <stdlib.h>
#include <string.h>

#include "layer.h"
#include "loss.h"
#include "names.h"

struct cv_curv {
    const cv_model *m;
    const cv_batch *b;
    int n, L, C;
    cv_curv_options opt;
    cv_layer_ctx ctx[CV_MAX_LAYERS];
    const cv_layer_ops *ops[CV_MAX_LAYERS];
    size_t numel[CV_MAX_LAYERS + 1]; /* per-sample numel of act[l] */
    size_t poff[CV_MAX_LAYERS];      /* offset of layer l's parameters */
    float *act[CV_MAX_LAYERS + 1];   /* act[0] = batch x (borrowed) */
    size_t max_numel;

    cv_loss_state ls;
    double loss;
    float *gh;                       /* dL/dh */
    int have_grad;
    float *gy[CV_MAX_LAYERS];        /* dL/d(output of layer l) */
    float *grad;                     /* dL/dtheta, D floats */

    float *mc_s;                     /* fisher_mc gradient samples */
    float *ef_s;                     /* per-sample output gradients (EF) */

    int wk;                          /* vectors the workspace is sized for */
    float *rx[CV_MAX_LAYERS + 1];    /* tangents of act[l], wk*n*numel[l] */
    float *vth[CV_MAX_LAYERS];       /* per-layer parameter directions */
    float *gth[CV_MAX_LAYERS];       /* per-layer parameter products */
    float *ping, *pong;              /* backward cotangents */
    float *scratch;
};

#define CV_CURV_NAME_(id, name) [id] = name,
static const char *const curv_names[CV_CURV_COUNT] = {CV_CURVATURES(CV_CURV_NAME_)};
#undef CV_CURV_NAME_

const char *cv_curvature_name(cv_curvature c)
{
    return cv_name_or(curv_names, CV_CURV_COUNT, (int)c, "?");
}

int cv_curvature_from_name(const char *name)
{
    return cv_name_index(name, curv_names, CV_CURV_COUNT);
}

/* ---- blocks ------------------------------------------------------------ */

void cv_block_full(const cv_model *m, cv_block *b)
{
    b->count = cv_model_param_count(m);
    for (int i = 0; i < b->count; i++)
        b->idx[i] = i;
    b->dim = m->nparams_total;
}

static int cmp_int(const void *a, const void *b) { return *(const int *)a - *(const int *)b; }

int cv_block_from_indices(const cv_model *m, const int *idx, int count, cv_block *b, cv_err *e)
{
    int total = cv_model_param_count(m);
    if (count < 1 || count > total)
        return cv_err_set(e, CV_EINVAL, "invalid_block", "blocks",
                          "a block needs between 1 and %d parameter tensors", total);
    memcpy(b->idx, idx, sizeof(int) * (size_t)count);
    qsort(b->idx, (size_t)count, sizeof(int), cmp_int);
    b->count = 0;
    b->dim = 0;
    for (int i = 0; i < count; i++) {
        if (b->idx[i] < 0 || b->idx[i] >= total)
            return cv_err_set(e, CV_EINVAL, "invalid_block", "blocks",
                              "parameter index %d out of range", b->idx[i]);
        if (i > 0 && b->idx[i] == b->idx[i - 1])
            return cv_err_set(e, CV_EINVAL, "invalid_block", "blocks",
                              "parameter %s listed twice in one block",
                              cv_model_param(m, b->idx[i])->name);
        b->idx[b->count++] = b->idx[i];
        b->dim += cv_model_param(m, b->idx[i])->numel;
    }
    return 0;
}

int cv_blocks_per_layer(const cv_model *m, cv_block *out, int max)
{
    int nb = 0, t = 0;
    for (int l = 0; l < m->nlayers; l++) {
        const cv_layer *L = &m->layers[l];
        if (!L->nparams)
            continue;
        if (nb < max) {
            cv_block *b = &out[nb];
            b->count = L->nparams;
            b->dim = 0;
            for (int i = 0; i < L->nparams; i++) {
                b->idx[i] = t + i;
                b->dim += L->params[i].numel;
            }
        }
        nb++;
        t += L->nparams;
    }
    return nb;
}

/* ---- construction: forward pass ---------------------------------------- */

static size_t layer_nparam(const cv_layer *L)
{
    size_t p = 0;
    for (int i = 0; i < L->nparams; i++)
        p += L->params[i].numel;
    return p;
}

static int setup_layers(cv_curv *c, cv_err *e)
{
    const cv_model *m = c->m;
    c->numel[0] = cv_shape_numel(&m->input_shape);
    c->max_numel = c->numel[0];
    for (int l = 0; l < c->L; l++) {
        const cv_layer *L = &m->layers[l];
        c->ops[l] = L->cls ? L->cls->ops : NULL;
        if (!c->ops[l])
            return cv_err_set(e, CV_EINVAL, "unsupported_layer", "layers",
                              "layers[%d]: %s is not supported by this engine", l,
                              cv_layer_name(L));
        c->numel[l + 1] = cv_shape_numel(&L->out_shape);
        if (c->numel[l + 1] > c->max_numel)
            c->max_numel = c->numel[l + 1];
        cv_layer_ctx *x = &c->ctx[l];
        memset(x, 0, sizeof *x);
        x->L = L;
        x->n = c->n;
        x->in_numel = c->numel[l];
        x->out_numel = c->numel[l + 1];
        x->nparam = layer_nparam(L);
        c->poff[l] = L->nparams ? L->params[0].offset : 0;
        x->theta = L->nparams ? m->params + c->poff[l] : NULL;
        x->buffers = L->nbuffers ? m->buffers + L->buffers[0].offset : NULL;
    }
    return 0;
}

static int run_forward(cv_curv *c, cv_err *e)
{
    c->act[0] = c->b->x;
    for (int l = 0; l < c->L; l++) {
        size_t len = (size_t)c->n * c->numel[l + 1];
        c->act[l + 1] = malloc(sizeof(float) * (len ? len : 1));
        if (!c->act[l + 1])
            return cv_err_set(e, CV_ENOMEM, "out_of_memory", "",
                              "activations of layer %d (%zu floats)", l, len);
        c->ctx[l].x = c->act[l];
        c->ctx[l].y = c->act[l + 1];
        if (c->ops[l]->forward(&c->ctx[l], c->act[l + 1], e))
            return -1;
    }
    c->gh = malloc(sizeof(float) * (size_t)c->n * c->C);
    if (!c->gh || cv_loss_eval(&c->ls, c->m, c->b, c->act[c->L], &c->loss, c->gh))
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "loss derivatives");
    return 0;
}

cv_curv *cv_curv_new(const cv_model *m, const cv_batch *b, const cv_curv_options *opt,
                     cv_err *e)
{
    if (b->n < 1) {
        cv_err_set(e, CV_EINVAL, "empty_batch", "batch", "the batch has no samples");
        return NULL;
    }
    cv_curv *c = cv_err_calloc(sizeof *c, "engine state", e);
    if (!c)
        return NULL;
    c->m = m;
    c->b = b;
    c->n = (int)b->n;
    c->L = m->nlayers;
    c->C = cv_model_output_dim(m);
    if (opt)
        c->opt = *opt;
    if (c->opt.mc_samples < 1)
        c->opt.mc_samples = 1;
    if (setup_layers(c, e) || run_forward(c, e)) {
        cv_curv_free(c);
        return NULL;
    }
    return c;
}

static void free_workspace(cv_curv *c)
{
    for (int l = 0; l <= c->L; l++) {
        free(c->rx[l]);
        c->rx[l] = NULL;
    }
    for (int l = 0; l < c->L; l++) {
        free(c->vth[l]);
        free(c->gth[l]);
        c->vth[l] = c->gth[l] = NULL;
    }
    free(c->ping);
    free(c->pong);
    free(c->scratch);
    c->ping = c->pong = c->scratch = NULL;
    c->wk = 0;
}

void cv_curv_free(cv_curv *c)
{
    if (!c)
        return;
    free_workspace(c);
    for (int l = 0; l < c->L; l++) {
        free(c->act[l + 1]);
        free(c->gy[l]);
        cv_layer_ctx_release(&c->ctx[l]);
        free(c->ctx[l].work);
    }
    cv_loss_state_free(&c->ls);
    free(c->gh);
    free(c->grad);
    free(c->mc_s);
    free(c->ef_s);
    free(c);
}

const cv_model *cv_curv_model(const cv_curv *c) { return c->m; }
size_t cv_curv_batch_size(const cv_curv *c) { return (size_t)c->n; }
double cv_curv_loss(cv_curv *c) { return c->loss; }
const float *cv_curv_outputs(const cv_curv *c) { return c->act[c->L]; }
const cv_batch *cv_curv_batch(const cv_curv *c) { return c->b; }

void cv_curv_set_gram_budget(cv_curv *c, size_t floats)
{
    for (int l = 0; l < c->L; l++)
        c->ctx[l].gram_budget = floats;
}

/* ---- gradient ------------------------------------------------------------ */

static int ensure_layer_work(cv_curv *c, int l, int k, cv_err *e)
{
    cv_layer_ctx *x = &c->ctx[l];
    size_t need = c->ops[l]->work_size(x, k);
    if (need <= x->work_floats)
        return 0;
    free(x->work);
    x->work = malloc(sizeof(float) * need);
    x->work_floats = x->work ? need : 0;
    if (!x->work)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "layer scratch (%zu floats)",
                          need);
    return 0;
}

static void drop_grad(cv_curv *c)
{
    free(c->grad);
    c->grad = NULL;
    for (int l = 0; l < c->L; l++) {
        free(c->gy[l]);
        c->gy[l] = NULL;
    }
}

/* The backward pass of the loss: dL/dtheta and the cotangent of every
 * layer's output (the Hessian's R-op terms need them).  Once per engine. */
static int ensure_grad(cv_curv *c, cv_err *e)
{
    if (c->have_grad)
        return 0;
    int ok = 1;
    c->grad = calloc(c->m->nparams_total, sizeof(float));
    for (int l = 0; l < c->L; l++)
        ok &= (c->gy[l] = malloc(sizeof(float) * (size_t)c->n * c->numel[l + 1])) != NULL;
    if (!ok || !c->grad) {
        drop_grad(c);
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "gradient and cotangents");
    }
    memcpy(c->gy[c->L - 1], c->gh, sizeof(float) * (size_t)c->n * c->C);
    for (int l = c->L - 1; l >= 0; l--) {
        if (ensure_layer_work(c, l, 1, e)) {
            drop_grad(c);
            return -1;
        }
        c->ops[l]->vjp(&c->ctx[l], 1, c->gy[l], l > 0 ? c->gy[l - 1] : NULL,
                       c->ctx[l].nparam ? c->grad + c->poff[l] : NULL);
    }
    c->have_grad = 1;
    return 0;
}

/* Copies block b of the float vector v (D floats) into double out. */
static void gather_block(const cv_model *m, const cv_block *b, const float *v, double *out)
{
    size_t o = 0;
    for (int i = 0; i < b->count; i++) {
        const cv_tensor_info *t = cv_model_param(m, b->idx[i]);
        for (size_t j = 0; j < t->numel; j++)
            out[o++] = v[t->offset + j];
    }
}

int cv_curv_gradient(cv_curv *c, const cv_block *b, double *g, cv_err *e)
{
    if (ensure_grad(c, e))
        return -1;
    gather_block(c->m, b, c->grad, g);
    return 0;
}

/* ---- products -------------------------------------------------------------- */

static int alloc_floats(float **p, size_t n)
{
    free(*p);
    *p = malloc(sizeof(float) * (n ? n : 1));
    return *p ? 0 : -1;
}

static int ensure_workspace(cv_curv *c, int k, cv_err *e)
{
    if (k <= c->wk)
        return 0;
    free_workspace(c);
    size_t n = (size_t)c->n;
    int bad = 0;
    for (int l = 0; l <= c->L; l++)
        bad |= alloc_floats(&c->rx[l], (size_t)k * n * c->numel[l]);
    for (int l = 0; l < c->L; l++) {
        if (!c->ctx[l].nparam)
            continue;
        bad |= alloc_floats(&c->vth[l], (size_t)k * c->ctx[l].nparam);
        bad |= alloc_floats(&c->gth[l], (size_t)k * c->ctx[l].nparam);
    }
    bad |= alloc_floats(&c->ping, (size_t)k * n * c->max_numel);
    bad |= alloc_floats(&c->pong, (size_t)k * n * c->max_numel);
    for (int l = 0; l < c->L && !bad; l++)
        bad |= ensure_layer_work(c, l, k, e) != 0;
    if (bad) {
        free_workspace(c);
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "",
                          "workspace for %d vectors of batch %zu does not fit in memory", k, n);
    }
    c->wk = k;
    return 0;
}

/* Marks which layers own tensors of block b; returns the lowest such layer. */
static int active_layers(const cv_curv *c, const cv_block *b, char *active)
{
    memset(active, 0, (size_t)c->L);
    int lo = c->L;
    for (int i = 0; i < b->count; i++) {
        int l = cv_model_param_layer(c->m, b->idx[i]);
        active[l] = 1;
        if (l < lo)
            lo = l;
    }
    return lo;
}

/* Scatters k block vectors X (double) into the per-layer direction buffers. */
static void scatter_dirs(cv_curv *c, const cv_block *b, const char *active, int k,
                         const double *X)
{
    for (int l = 0; l < c->L; l++)
        if (active[l])
            memset(c->vth[l], 0, sizeof(float) * (size_t)k * c->ctx[l].nparam);
    for (int j = 0; j < k; j++) {
        const double *x = X + (size_t)j * b->dim;
        for (int i = 0; i < b->count; i++) {
            const cv_tensor_info *t = cv_model_param(c->m, b->idx[i]);
            int l = cv_model_param_layer(c->m, b->idx[i]);
            float *v = c->vth[l] + (size_t)j * c->ctx[l].nparam + (t->offset - c->poff[l]);
            for (size_t q = 0; q < t->numel; q++)
                v[q] = (float)x[q];
            x += t->numel;
        }
    }
}

static void gather_products(cv_curv *c, const cv_block *b, int k, double *Y)
{
    for (int j = 0; j < k; j++) {
        double *y = Y + (size_t)j * b->dim;
        for (int i = 0; i < b->count; i++) {
            const cv_tensor_info *t = cv_model_param(c->m, b->idx[i]);
            int l = cv_model_param_layer(c->m, b->idx[i]);
            const float *g = c->gth[l] + (size_t)j * c->ctx[l].nparam + (t->offset - c->poff[l]);
            for (size_t q = 0; q < t->numel; q++)
                y[q] = g[q];
            y += t->numel;
        }
    }
}

static int ensure_output_samples(cv_curv *c, cv_curvature kind, cv_err *e)
{
    size_t len = (size_t)c->n * c->C;
    if (kind == CV_CURV_FISHER_MC && !c->mc_s) {
        c->mc_s = malloc(sizeof(float) * len * (size_t)c->opt.mc_samples);
        if (!c->mc_s)
            return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "Monte Carlo samples");
        cv_rng rng;
        cv_rng_seed(&rng, c->opt.seed);
        cv_loss_sample_mc(&c->ls, &rng, c->opt.mc_samples, c->mc_s);
    }
    if (kind == CV_CURV_EF && !c->ef_s) {
        c->ef_s = malloc(sizeof(float) * len);
        if (!c->ef_s)
            return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "sample gradients");
        cv_loss_sample_grad(&c->ls, c->ef_s);
    }
    return 0;
}

/* out = M rh for the output matrix M of the curvature. */
static void apply_output_matrix(cv_curv *c, cv_curvature kind, int k, const float *rh,
                                float *out)
{
    if (kind == CV_CURV_FISHER_MC)
        cv_loss_outer_apply(&c->ls, c->opt.mc_samples, c->mc_s,
                            c->ls.scale / c->opt.mc_samples, k, rh, out);
    else if (kind == CV_CURV_EF)
        cv_loss_outer_apply(&c->ls, 1, c->ef_s, c->ls.scale, k, rh, out);
    else
        cv_loss_hessian_apply(&c->ls, k, rh, out);
}

static void forward_tangents(cv_curv *c, const char *active, int lo, int k)
{
    for (int l = lo; l < c->L; l++)
        c->ops[l]->jvp(&c->ctx[l], k, l == lo ? NULL : c->rx[l], active[l] ? c->vth[l] : NULL,
                       c->rx[l + 1]);
}

static void backward_products(cv_curv *c, cv_curvature kind, const char *active, int lo, int k)
{
    float *cur = c->ping, *next = c->pong;
    for (int l = c->L - 1; l >= lo; l--) {
        float *gx = l > lo ? next : NULL;
        float *gt = active[l] ? c->gth[l] : NULL;
        const float *rx = l == lo ? NULL : c->rx[l], *v = active[l] ? c->vth[l] : NULL;
        if (kind == CV_CURV_HESSIAN && c->ops[l]->vjp_hvp) {
            c->ops[l]->vjp_hvp(&c->ctx[l], k, cur, c->gy[l], rx, v, gx, gt);
        } else {
            c->ops[l]->vjp(&c->ctx[l], k, cur, gx, gt);
            if (kind == CV_CURV_HESSIAN)
                c->ops[l]->hvp_extra(&c->ctx[l], k, c->gy[l], rx, v, gx, gt);
        }
        float *t = cur;
        cur = next;
        next = t;
    }
}

static int matvec_chunk(cv_curv *c, cv_curvature kind, const cv_block *b, int k,
                        const double *X, double *Y, cv_err *e)
{
    char active[CV_MAX_LAYERS];
    int lo = active_layers(c, b, active);
    scatter_dirs(c, b, active, k, X);
    forward_tangents(c, active, lo, k);
    apply_output_matrix(c, kind, k, c->rx[c->L], c->ping);
    backward_products(c, kind, active, lo, k);
    gather_products(c, b, k, Y);
    return 0;
}

#define CV_MAX_CHUNK 32

/* Checks kind and sizes the state for k vectors in chunks of *chunk:
 * 1 ready, 0 nothing to do (k < 1), -1 error. */
static int begin_products(cv_curv *c, cv_curvature kind, int k, int *chunk, cv_err *e)
{
    if ((unsigned)kind >= CV_CURV_COUNT)
        return cv_err_set(e, CV_EINVAL, "invalid_curvature", "curvature", "unknown curvature");
    if (k < 1)
        return 0;
    if ((kind == CV_CURV_HESSIAN && ensure_grad(c, e)) || ensure_output_samples(c, kind, e))
        return -1;
    *chunk = k < CV_MAX_CHUNK ? k : CV_MAX_CHUNK;
    return ensure_workspace(c, *chunk, e) ? -1 : 1;
}


/* ---- quadratic forms ---------------------------------------------------------
 * x^T A x without the backward pass: with r_l the forward tangents and
 * s_l = R(g_l) the backward products, sum_l v_l . J_theta,l^T s_l telescopes
 * into r_L . M r_L + sum_l r_(l-1) . R(J_x,l^T) g_l, so
 *   x^T A x = r_L^T M r_L (+ sum_l [rx_l . R(J_x^T) gy_l + v_l . R(J_theta^T) gy_l]
 *             for the Hessian),
 * one forward-mode pass plus each layer's second-order terms dotted in place. */

/* Layer l's second-order terms dotted with the direction, added to q: its
 * quad_extra kernel, or hvp_extra formed in scratch (pong, gth[l]) and dotted. */
static void layer_quad_terms(cv_curv *c, int l, const char *active, int lo, int k, double *q)
{
    const float *rx = l == lo ? NULL : c->rx[l];
    const float *v = active[l] ? c->vth[l] : NULL;
    if (c->ops[l]->quad_extra) {
        c->ops[l]->quad_extra(&c->ctx[l], k, c->gy[l], rx, v, q);
        return;
    }
    size_t xlen = (size_t)c->n * c->numel[l], P = c->ctx[l].nparam;
    float *gx = rx ? c->pong : NULL, *gt = v ? c->gth[l] : NULL;
    if (gx)
        memset(gx, 0, sizeof(float) * (size_t)k * xlen);
    if (gt)
        memset(gt, 0, sizeof(float) * (size_t)k * P);
    c->ops[l]->hvp_extra(&c->ctx[l], k, c->gy[l], rx, v, gx, gt);
    for (int j = 0; j < k; j++) {
        if (gx)
            q[j] += cblas_dsdot((int)xlen, rx + (size_t)j * xlen, 1, gx + (size_t)j * xlen, 1);
        if (gt)
            q[j] += cblas_dsdot((int)P, v + (size_t)j * P, 1, gt + (size_t)j * P, 1);
    }
}

static void quad_chunk(cv_curv *c, cv_curvature kind, const cv_block *b, int k,
                       const double *X, double *q)
{
    char active[CV_MAX_LAYERS];
    int lo = active_layers(c, b, active);
    size_t olen = (size_t)c->n * c->C;
    scatter_dirs(c, b, active, k, X);
    forward_tangents(c, active, lo, k);
    apply_output_matrix(c, kind, k, c->rx[c->L], c->ping);
    const float *r = c->rx[c->L];
    for (int j = 0; j < k; j++)
        q[j] = cblas_dsdot((int)olen, r + (size_t)j * olen, 1, c->ping + (size_t)j * olen, 1);
    for (int l = lo; kind == CV_CURV_HESSIAN && l < c->L; l++)
        layer_quad_terms(c, l, active, lo, k, q);
}

/* Y = A X (Y given) or q_j = x_j^T A x_j (q given) for the k columns of X,
 * in chunks of at most CV_MAX_CHUNK. */
static int chunked_products(cv_curv *c, cv_curvature kind, const cv_block *b, int k,
                            const double *X, double *Y, double *q, cv_err *e)
{
    int chunk = 0; /* set by begin_products when it returns 1 */
    int rc = begin_products(c, kind, k, &chunk, e);
    if (rc <= 0)
        return rc;
    for (int j = 0; j < k; j += chunk) {
        int kk = k - j < chunk ? k - j : chunk;
        const double *Xj = X + (size_t)j * b->dim;
        if (!Y)
            quad_chunk(c, kind, b, kk, Xj, q + j);
        else if (matvec_chunk(c, kind, b, kk, Xj, Y + (size_t)j * b->dim, e))
            return -1;
    }
    return 0;
}

int cv_curv_matvec(cv_curv *c, cv_curvature kind, const cv_block *b, int k, const double *X,
                   double *Y, cv_err *e)
{
    return chunked_products(c, kind, b, k, X, Y, NULL, e);
}

int cv_curv_quadform(cv_curv *c, cv_curvature kind, const cv_block *b, int k, const double *X,
                     double *q, cv_err *e)
{
    return chunked_products(c, kind, b, k, X, NULL, q, e);
}

/* ---- per-sample gradients, dense matrices, loss at a step ------------------ */

int cv_curv_per_sample_gradients(cv_curv *c, const cv_block *b, double *G, cv_err *e)
{
    if (ensure_grad(c, e))
        return -1;
    char active[CV_MAX_LAYERS];
    active_layers(c, b, active);
    size_t col = 0;
    int l_prev = -1;
    float *tmp = NULL;
    for (int i = 0; i < b->count; i++) {
        const cv_tensor_info *t = cv_model_param(c->m, b->idx[i]);
        int l = cv_model_param_layer(c->m, b->idx[i]);
        size_t P = c->ctx[l].nparam;
        if (l != l_prev) {
            free(tmp);
            tmp = malloc(sizeof(float) * (size_t)c->n * P);
            if (!tmp)
                return cv_err_set(e, CV_ENOMEM, "out_of_memory", "",
                                  "per-sample gradients of layer %d", l);
            c->ops[l]->per_sample(&c->ctx[l], c->gy[l], tmp);
            l_prev = l;
        }
        size_t off = t->offset - c->poff[l];
        for (int s = 0; s < c->n; s++)
            for (size_t q = 0; q < t->numel; q++)
                G[(size_t)s * b->dim + col + q] = tmp[(size_t)s * P + off + q];
        col += t->numel;
    }
    free(tmp);
    return 0;
}

int cv_curv_dense(cv_curv *c, cv_curvature kind, const cv_block *b, size_t max_dim, double *A,
                  cv_err *e)
{
    if (b->dim > max_dim)
        return cv_err_set(e, CV_ETOOLARGE, "too_large", "op",
                          "dense matrix of dimension %zu exceeds the dense limit %zu", b->dim,
                          max_dim);
    size_t D = b->dim;
    int chunk = D < 64 ? (int)D : 64;
    double *X = calloc((size_t)chunk * D, sizeof(double));
    if (!X)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "dense basis");
    int rc = 0;
    for (size_t j = 0; j < D && !rc; j += (size_t)chunk) {
        int kk = D - j < (size_t)chunk ? (int)(D - j) : chunk;
        memset(X, 0, sizeof(double) * (size_t)chunk * D);
        for (int q = 0; q < kk; q++)
            X[(size_t)q * D + j + q] = 1.0;
        rc = cv_curv_matvec(c, kind, b, kk, X, A + j * D, e);
    }
    free(X);
    return rc;
}

int cv_curv_loss_at(cv_curv *c, const cv_block *b, const double *step, double *loss,
                    cv_err *e)
{
    cv_model tmp;
    if (cv_model_clone(c->m, &tmp))
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "model copy");
    size_t o = 0;
    for (int i = 0; i < b->count; i++) {
        const cv_tensor_info *t = cv_model_param(&tmp, b->idx[i]);
        for (size_t q = 0; q < t->numel; q++)
            tmp.params[t->offset + q] += (float)step[o++];
    }
    cv_curv *c2 = cv_curv_new(&tmp, c->b, &c->opt, e);
    int rc = c2 ? 0 : -1;
    if (c2)
        *loss = c2->loss;
    cv_curv_free(c2);
    cv_model_free(&tmp);
    return rc;
}

/* ---- building blocks for factor-based methods ------------------------------ */

const cv_loss_state *cv_curv_loss_state(const cv_curv *c) { return &c->ls; }

static int chunk_of(int k) { return k < CV_MAX_CHUNK ? k : CV_MAX_CHUNK; }

/* J X (X given: k directions of b->dim, out gets k outputs of n*C) or J^T
 * cot (Y gets k products of b->dim), in chunks of at most CV_MAX_CHUNK. */
static int chunked_jacobian(cv_curv *c, const cv_block *b, int k, const double *X, float *out,
                            const float *cot, double *Y, cv_err *e)
{
    int chunk = chunk_of(k);
    if (k < 1 || ensure_workspace(c, chunk, e))
        return k < 1 ? 0 : -1;
    char active[CV_MAX_LAYERS];
    int lo = active_layers(c, b, active);
    size_t olen = (size_t)c->n * c->C;
    for (int j = 0; j < k; j += chunk) {
        int kk = k - j < chunk ? k - j : chunk;
        if (X) {
            scatter_dirs(c, b, active, kk, X + (size_t)j * b->dim);
            forward_tangents(c, active, lo, kk);
            memcpy(out + (size_t)j * olen, c->rx[c->L], sizeof(float) * olen * (size_t)kk);
        } else {
            memcpy(c->ping, cot + (size_t)j * olen, sizeof(float) * olen * (size_t)kk);
            backward_products(c, CV_CURV_GGN, active, lo, kk);
            gather_products(c, b, kk, Y + (size_t)j * b->dim);
        }
    }
    return 0;
}

int cv_curv_jvp(cv_curv *c, const cv_block *b, int k, const double *X, float *out, cv_err *e)
{
    return chunked_jacobian(c, b, k, X, out, NULL, NULL, e);
}

int cv_curv_vjp(cv_curv *c, const cv_block *b, int k, const float *cot, double *Y, cv_err *e)
{
    return chunked_jacobian(c, b, k, NULL, NULL, cot, Y, e);
}

/* Bit t set when the t-th tensor of layer l is in block b. */
static unsigned layer_mask(const cv_curv *c, const cv_block *b, int l)
{
    unsigned mask = 0;
    int first = 0;
    for (int i = 0; i < l; i++)
        first += c->m->layers[i].nparams;
    for (int i = 0; i < b->count; i++)
        if (b->idx[i] >= first && b->idx[i] < first + c->m->layers[l].nparams)
            mask |= 1u << (b->idx[i] - first);
    return mask;
}

int cv_curv_gram(cv_curv *c, const cv_block *b, int k, const float *cot, double *G,
                 cv_err *e)
{
    char active[CV_MAX_LAYERS];
    int lo = active_layers(c, b, active);
    for (int l = lo; l < c->L; l++)
        if (active[l] && !c->ops[l]->gram_add)
            return cv_err_set(e, CV_EINVAL, "unsupported", "blocks",
                              "layers[%d] (%s) has no Gram kernel", l,
                              cv_layer_name(&c->m->layers[l]));
    size_t R = (size_t)k * c->n, olen = (size_t)c->n * c->C;
    float *cur = malloc(sizeof(float) * R * c->max_numel);
    float *next = malloc(sizeof(float) * R * c->max_numel);
    if (!cur || !next) {
        free(cur);
        free(next);
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "Gram cotangents");
    }
    memset(G, 0, sizeof(double) * R * R);
    memcpy(cur, cot, sizeof(float) * olen * (size_t)k);
    int rc = 0;
    for (int l = c->L - 1; l >= lo && !rc; l--) {
        rc = ensure_layer_work(c, l, k, e);
        if (rc)
            break;
        if (active[l])
            c->ops[l]->gram_add(&c->ctx[l], k, cur, layer_mask(c, b, l), G);
        if (l > lo) {
            c->ops[l]->vjp(&c->ctx[l], k, cur, next, NULL);
            float *t = cur;
            cur = next;
            next = t;
        }
    }
    free(cur);
    free(next);
    return rc;
}

/* ---- cv_linop view --------------------------------------------------------- */

static int curv_linop_apply(void *ctx, int k, const double *X, double *Y, cv_err *e)
{
    cv_curv_linop_ctx *x = ctx;
    return cv_curv_matvec(x->curv, x->kind, x->block, k, X, Y, e);
}

static int curv_linop_quad(void *ctx, int k, const double *X, double *q, cv_err *e)
{
    cv_curv_linop_ctx *x = ctx;
    return cv_curv_quadform(x->curv, x->kind, x->block, k, X, q, e);
}

void cv_curv_linop(cv_linop *op, cv_curv_linop_ctx *ctx, cv_curv *c, cv_curvature kind,
                   const cv_block *b, cv_progress *p)
{
    op->quad = curv_linop_quad;
    ctx->curv = c;
    ctx->kind = kind;
    ctx->block = b;
    op->n = b->dim;
    op->apply = curv_linop_apply;
    op->ctx = ctx;
    op->progress = p;
}
