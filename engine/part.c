/* part.c - curvature-vector products on one micro-batch (API in part.h): the
 * forward pass (rerun in place on another micro-batch), the loss's backward
 * pass, and Hessian / GGN / Fisher / EF products built from the per-layer
 * kernels of layer.h (forward-mode Jacobian products, the loss's output
 * matrix, reverse-mode products, Pearlmutter's extra terms). */
#include "part.h"

#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bigmem.h"
#include "part_internal.h"
#include "names.h"

/* ---- construction: forward pass ---------------------------------------- */

static size_t layer_nparam(const cv_layer *L)
{
    size_t p = 0;
    for (int i = 0; i < L->nparams; i++)
        p += L->params[i].numel;
    return p;
}

/* Points layer l's context at its inputs (activation buffers). */
static void wire_inputs(cv_part *c, int l)
{
    const cv_layer *L = &c->m->layers[l];
    cv_layer_ctx *x = &c->ctx[l];
    x->nin = L->nin;
    for (int i = 0; i < L->nin; i++) {
        x->xs[i] = c->act[L->in[i]];
        x->in_numels[i] = c->numel[L->in[i]];
    }
    x->x = L->nin ? x->xs[0] : NULL;
    x->in_numel = L->nin ? x->in_numels[0] : 0;
}

/* uid and loc of layer l's slots; a copy of its parameters when they are not
 * one contiguous run of the model's vector (a shared tensor among them). */
static int number_slots(cv_part *c, int l, cv_err *e)
{
    const cv_layer *L = &c->m->layers[l];
    size_t at = 0;
    int contiguous = 1;
    for (int i = 0; i < L->nparams; i++) {
        const cv_tensor_info *t = &L->params[i];
        c->loc[l][i] = at;
        contiguous &= t->offset == L->params[0].offset + at;
        at += t->numel;
        if (!t->shared) {
            c->uid[l][i] = c->nuid++;
            continue;
        }
        c->tied = 1;
        c->uid[l][i] = -1;
        for (int k = 0; k < l && c->uid[l][i] < 0; k++)
            for (int q = 0; q < c->m->layers[k].nparams; q++)
                if (!c->m->layers[k].params[q].shared &&
                    c->m->layers[k].params[q].offset == t->offset)
                    c->uid[l][i] = c->uid[k][q];
        for (int q = 0; q < i && c->uid[l][i] < 0; q++)
            if (L->params[q].offset == t->offset)
                c->uid[l][i] = c->uid[l][q];
    }
    if (contiguous)
        return 0;
    c->theta_copy[l] = malloc(sizeof(float) * (at ? at : 1));
    c->copy_bytes += sizeof(float) * (at ? at : 1);
    if (!c->theta_copy[l])
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "parameters of layer %d", l);
    for (int i = 0; i < L->nparams; i++)
        memcpy(c->theta_copy[l] + c->loc[l][i], c->m->params + L->params[i].offset,
               sizeof(float) * L->params[i].numel);
    return 0;
}

static int setup_layers(cv_part *c, cv_err *e)
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
        x->out_numel = c->numel[l + 1];
        x->nparam = layer_nparam(L);
        c->poff[l] = L->nparams ? L->params[0].offset : 0;
        if (number_slots(c, l, e))
            return -1;
        x->theta = L->nparams ? c->theta_copy[l] ? c->theta_copy[l] : m->params + c->poff[l]
                              : NULL;
        x->buffers = L->nbuffers ? m->buffers + L->buffers[0].offset : NULL;
    }
    return 0;
}

/* Activations and loss derivatives for cap samples (run_forward fills them). */
static int alloc_state(cv_part *c, cv_err *e)
{
    for (int l = 0; l < c->L; l++) {
        size_t len = (size_t)c->cap * c->numel[l + 1];
        c->act[l + 1] = cv_big_malloc(sizeof(float) * (len ? len : 1));
        if (!c->act[l + 1])
            return cv_err_set(e, CV_ENOMEM, "out_of_memory", "",
                              "activations of layer %d (%zu floats)", l, len);
    }
    c->gh = malloc(sizeof(float) * (size_t)c->cap * c->C);
    if (!c->gh)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "loss derivatives");
    return 0;
}

/* The forward pass and the loss of the current micro-batch c->b. */
static int run_forward(cv_part *c, cv_err *e)
{
    c->act[0] = c->b->x;
    for (int l = 0; l < c->L; l++) {
        cv_layer_ctx_release(&c->ctx[l]); /* the previous micro-batch's caches */
        c->ctx[l].n = c->n;
        wire_inputs(c, l);
        c->ctx[l].y = c->act[l + 1];
        if (c->ops[l]->forward(&c->ctx[l], c->act[l + 1], e))
            return -1;
    }
    cv_loss_state_free(&c->ls);
    if (cv_loss_eval_scaled(&c->ls, c->m, c->b, c->act[c->L], c->opt.scale, &c->loss, c->gh))
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "loss derivatives");
    return 0;
}

cv_part *cv_part_new(const cv_model *m, const cv_batch *b, const cv_part_options *opt,
                     cv_err *e)
{
    if (b->n < 1) {
        cv_err_set(e, CV_EINVAL, "empty_batch", "batch", "the batch has no samples");
        return NULL;
    }
    cv_part *c = cv_err_calloc(sizeof *c, "engine state", e);
    if (!c)
        return NULL;
    c->m = m;
    c->b = b;
    c->n = c->cap = (int)b->n;
    c->L = m->nlayers;
    c->C = cv_model_output_dim(m);
    c->opt.scale = -1;
    if (opt)
        c->opt = *opt;
    if (c->opt.base.mc_samples < 1)
        c->opt.base.mc_samples = 1;
    int rc = setup_layers(c, e);
    if (!rc && !(c->bpos = malloc(sizeof(long) * (size_t)(c->nuid + 1))))
        rc = cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "engine state");
    c->copy_bytes += sizeof(long) * (size_t)(c->nuid + 1);
    if (rc || alloc_state(c, e) || run_forward(c, e)) {
        cv_part_free(c);
        return NULL;
    }
    return c;
}

int cv_part_rebind(cv_part *c, const cv_batch *b, size_t first, cv_err *e)
{
    if (b->n < 1 || b->n > (size_t)c->cap)
        return cv_err_set(e, CV_EINTERNAL, "internal", "batch",
                          "micro-batch of %zu samples on a part built for %d", b->n, c->cap);
    c->b = b;
    c->n = (int)b->n;
    c->opt.first = first;
    c->have_gy = 0;
    free(c->mc_s);
    free(c->ef_s);
    c->mc_s = c->ef_s = NULL;
    return run_forward(c, e);
}

void cv_part_free_workspace(cv_part *c)
{
    for (int l = 0; l <= c->L; l++) {
        free(c->rx[l]);
        c->rx[l] = NULL;
    }
    for (int l = 0; l < c->L; l++) {
        free(c->vth[l]);
        free(c->gth[l]);
        free(c->ctx[l].work);
        c->vth[l] = c->gth[l] = NULL;
        c->ctx[l].work = NULL;
        c->ctx[l].work_floats = 0;
    }
    cv_part_pool_free(c);
    c->wk = 0;
    c->ws_n = 0;
}

void cv_part_free(cv_part *c)
{
    if (!c)
        return;
    cv_part_free_workspace(c);
    free(c->bpos);
    for (int l = 0; l < c->L; l++) {
        free(c->theta_copy[l]);
        free(c->act[l + 1]);
        free(c->gy[l]);
        cv_layer_ctx_release(&c->ctx[l]);
    }
    cv_loss_state_free(&c->ls);
    free(c->gh);
    free(c->mc_s);
    free(c->ef_s);
    free(c);
}

size_t cv_part_batch_size(const cv_part *c) { return (size_t)c->n; }
double cv_part_loss(const cv_part *c) { return c->loss; }
const float *cv_part_outputs(const cv_part *c) { return c->act[c->L]; }

void cv_part_set_gram_budget(cv_part *c, size_t floats)
{
    for (int l = 0; l < c->L; l++)
        c->ctx[l].gram_budget = floats;
}

/* ---- gradient ------------------------------------------------------------ */

static int ensure_workspace(cv_part *c, int k, cv_err *e);

static void drop_gy(cv_part *c)
{
    for (int l = 0; l < c->L; l++) {
        free(c->gy[l]);
        c->gy[l] = NULL;
    }
    c->have_gy = 0;
}

/* rc, after freeing the loss's cotangents unless Hessian products (the
 * part's curvature) will read them again. */
static int keep_gy_for_hessian(cv_part *c, int rc)
{
    if (c->opt.base.kind != CV_CURV_HESSIAN)
        drop_gy(c);
    return rc;
}

/* The backward pass of the loss: the cotangent gy[l] of every layer's output
 * (the Hessian's R-op terms and the gradients need them).  Once per forward. */
static int ensure_gy(cv_part *c, cv_err *e)
{
    if (c->have_gy)
        return 0;
    int ok = 1;
    /* not zeroed: the walk visits every layer and writes or clears its output's */
    for (int l = 0; l < c->L; l++)
        if (!c->gy[l])
            ok &= (c->gy[l] = cv_big_malloc_populated(sizeof(float) *
                                                      ((size_t)c->cap * c->numel[l + 1] + 1))) !=
                  NULL;
    char active[CV_MAX_LAYERS] = {0}; /* cotangents only: no parameter gradients */
    cv_walk *w = ok ? calloc(1, sizeof *w) : NULL;
    int rc = 0;
    if (w) {
        w->k = 1;
        w->active = active;
        w->use_gy = 1;
        memcpy(c->gy[c->L - 1], c->gh, sizeof(float) * (size_t)c->n * c->C);
        /* the walk's buffers are the workspace's (handed along with it) */
        rc = ensure_workspace(c, 1, e) ? -1 : cv_part_walk(c, w, c->gy[c->L - 1], e);
        free(w);
    } else {
        rc = cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "loss cotangents");
    }
    if (rc) {
        drop_gy(c);
        return -1;
    }
    c->have_gy = 1;
    return 0;
}

int cv_part_ensure_gy(cv_part *c, cv_err *e) { return ensure_gy(c, e); }

/* ---- products -------------------------------------------------------------- */

static int alloc_floats(float **p, size_t n)
{
    free(*p);
    *p = cv_big_malloc_populated(sizeof(float) * (n ? n : 1));
    return *p ? 0 : -1;
}

static int ensure_workspace(cv_part *c, int k, cv_err *e)
{
    if (k <= c->wk && c->n <= c->ws_n)
        return 0;
    cv_part_free_workspace(c);
    size_t n = cv_part_ws_samples(c);
    int bad = 0;
    for (int l = 0; l <= c->L; l++)
        bad |= alloc_floats(&c->rx[l], (size_t)k * n * c->numel[l]);
    for (int l = 0; l < c->L; l++) {
        if (!c->ctx[l].nparam)
            continue;
        bad |= alloc_floats(&c->vth[l], (size_t)k * c->ctx[l].nparam);
        bad |= alloc_floats(&c->gth[l], (size_t)k * c->ctx[l].nparam);
    }
    for (int l = 0; l < c->L && !bad; l++)
        bad |= cv_part_layer_work(c, l, k, e) != 0;
    if (bad || cv_part_pool_ensure(c, k, e)) {
        cv_part_free_workspace(c);
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "",
                          "workspace for %d vectors of batch %zu does not fit in memory", k, n);
    }
    c->wk = k;
    c->ws_n = (int)n;
    return 0;
}

/* Fills c->bpos for block b (each tensor's offset in the block vector, -1
 * outside it), marks the layers using a tensor of b (active) and the live
 * ones (the walk comment above). */
void cv_part_mark_block(cv_part *c, const cv_block *b, char *active, char *live)
{
    for (int u = 0; u < c->nuid; u++)
        c->bpos[u] = -1;
    size_t at = 0;
    for (int i = 0; i < b->count; i++) { /* uid = tensor index: both in first-use order */
        c->bpos[b->idx[i]] = (long)at;
        at += cv_model_param(c->m, b->idx[i])->numel;
    }
    for (int l = 0; l < c->L; l++) {
        active[l] = 0;
        for (int i = 0; i < c->m->layers[l].nparams; i++)
            active[l] |= c->bpos[c->uid[l][i]] >= 0;
    }
    cv_part_live(c, active, live);
}

/* Calls fn(c, l, i, block offset, arg) for every slot of an active layer whose
 * tensor is in the block c->bpos describes. */
static void for_block_slots(cv_part *c, const char *active,
                            void (*fn)(cv_part *c, int l, int i, size_t p, void *arg),
                            void *arg)
{
    for (int l = 0; l < c->L; l++)
        for (int i = 0; active[l] && i < c->m->layers[l].nparams; i++)
            if (c->bpos[c->uid[l][i]] >= 0)
                fn(c, l, i, (size_t)c->bpos[c->uid[l][i]], arg);
}

typedef struct {
    int k;
    size_t dim;
    const double *X;
    double *Y;
    float *const *src;  /* gather: per-layer products (k x P), c->gth or others */
} dirs_job;

static void scatter_slot(cv_part *c, int l, int i, size_t p, void *arg)
{
    const dirs_job *d = arg;
    size_t P = c->ctx[l].nparam, n = c->m->layers[l].params[i].numel;
    for (int j = 0; j < d->k; j++) {
        const double *x = d->X + (size_t)j * d->dim + p;
        float *v = c->vth[l] + (size_t)j * P + c->loc[l][i];
        for (size_t q = 0; q < n; q++)
            v[q] = (float)x[q];
    }
}

static void gather_slot(cv_part *c, int l, int i, size_t p, void *arg)
{
    const dirs_job *d = arg;
    size_t P = c->ctx[l].nparam, n = c->m->layers[l].params[i].numel;
    for (int j = 0; j < d->k; j++) {
        double *y = d->Y + (size_t)j * d->dim + p;
        const float *g = d->src[l] + (size_t)j * P + c->loc[l][i];
        for (size_t q = 0; q < n; q++)
            y[q] += g[q];
    }
}

/* Scatters k block vectors X (double) into the per-layer direction buffers
 * (every use of a shared tensor gets it). */
static void scatter_dirs(cv_part *c, const cv_block *b, const char *active, int k,
                         const double *X)
{
    for (int l = 0; l < c->L; l++)
        if (active[l])
            memset(c->vth[l], 0, sizeof(float) * (size_t)k * c->ctx[l].nparam);
    dirs_job d = {k, b->dim, X, NULL, NULL};
    for_block_slots(c, active, scatter_slot, &d);
}

/* Y += the per-layer products src[l] on block b (a shared tensor: the sum of
 * its uses). */
static void gather_products(cv_part *c, const cv_block *b, const char *active, int k,
                            float *const *src, double *Y)
{
    dirs_job d = {k, b->dim, NULL, Y, src};
    for_block_slots(c, active, gather_slot, &d);
}

static int ensure_output_samples(cv_part *c, cv_curvature kind, cv_err *e)
{
    size_t len = (size_t)c->n * c->C;
    if (kind == CV_CURV_FISHER_MC && !c->mc_s) {
        c->mc_s = malloc(sizeof(float) * len * (size_t)c->opt.base.mc_samples);
        if (!c->mc_s)
            return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "Monte Carlo samples");
        cv_loss_sample_mc_at(&c->ls, c->opt.base.seed, c->opt.first, c->opt.base.mc_samples,
                             c->mc_s);
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
static void apply_output_matrix(cv_part *c, cv_curvature kind, int k, const float *rh,
                                float *out)
{
    if (kind == CV_CURV_FISHER_MC)
        cv_loss_outer_apply(&c->ls, c->opt.base.mc_samples, c->mc_s,
                            c->ls.scale / c->opt.base.mc_samples, k, rh, out);
    else if (kind == CV_CURV_EF)
        cv_loss_outer_apply(&c->ls, 1, c->ef_s, c->ls.scale, k, rh, out);
    else
        cv_loss_hessian_apply(&c->ls, k, rh, out);
}

/* The products' backward walk: k output cotangents (a pooled buffer, given
 * back) through the live layers into gth. */
static int backward_products(cv_part *c, cv_curvature kind, const char *active,
                             const char *live, int k, float *out_cot, cv_err *e)
{
    cv_walk *w = calloc(1, sizeof *w);
    if (!w) {
        cv_part_pool_give(c, out_cot);
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "backward walk");
    }
    w->k = k;
    w->active = active;
    w->live = live;
    w->hessian = kind == CV_CURV_HESSIAN;
    w->gtheta = c->gth;
    int rc = cv_part_walk(c, w, out_cot, e);
    free(w);
    return rc;
}

/* The forward half of a product: k directions X of block b through the
 * live layers (tangents in rx[]), then the output matrix: M J X in a pooled
 * buffer (NULL with e filled when out of memory). */
static float *output_products(cv_part *c, cv_curvature kind, const cv_block *b, int k,
                              const double *X, char *active, char *live, cv_err *e)
{
    cv_part_mark_block(c, b, active, live);
    scatter_dirs(c, b, active, k, X);
    cv_part_tangents(c, active, live, k);
    float *out = cv_part_pool_ensure(c, k, e) ? NULL : cv_part_pool_take(c);
    if (!out) {
        cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "cotangent buffers");
        return NULL;
    }
    apply_output_matrix(c, kind, k, c->rx[c->L], out);
    return out;
}

static int matvec_chunk(cv_part *c, cv_curvature kind, const cv_block *b, int k,
                        const double *X, double *Y, cv_err *e)
{
    char active[CV_MAX_LAYERS], live[CV_MAX_LAYERS];
    float *out = output_products(c, kind, b, k, X, active, live, e);
    if (!out)
        return -1;
    int rc = backward_products(c, kind, active, live, k, out, e);
    if (!rc)
        gather_products(c, b, active, k, c->gth, Y);
    return rc;
}

#define CV_MAX_CHUNK 32

static int chunk_of(int k) { return k < CV_MAX_CHUNK ? k : CV_MAX_CHUNK; }

int cv_part_prepare(cv_part *c, cv_curvature kind, int k, cv_err *e)
{
    if ((unsigned)kind >= CV_CURV_COUNT || cv_curvature_is_kron(kind))
        return cv_err_set(e, CV_EINVAL, "invalid_curvature", "curvature", "not an exact curvature");
    if ((kind == CV_CURV_HESSIAN && ensure_gy(c, e)) || ensure_output_samples(c, kind, e))
        return -1;
    return ensure_workspace(c, chunk_of(k < 1 ? 1 : k), e);
}

int cv_part_prepare_walk(cv_part *c, cv_curvature kind, int k, cv_err *e)
{
    if ((unsigned)kind >= CV_CURV_COUNT || cv_curvature_is_kron(kind))
        return cv_err_set(e, CV_EINVAL, "invalid_curvature", "curvature", "not an exact curvature");
    if ((kind == CV_CURV_HESSIAN && ensure_gy(c, e)) || ensure_output_samples(c, kind, e) ||
        cv_part_pool_ensure(c, k < 1 ? 1 : k, e))
        return -1;
    /* the pool (and the layers' scratch) are sized for the workspace's samples: marked so
     * that the next micro-batch takes them over (cv_part_take_workspace) instead of
     * allocating its own (ensure_workspace sets the same when it sizes the products') */
    if (!c->wk)
        c->ws_n = (int)cv_part_ws_samples(c);
    return 0;
}

/* ---- quadratic forms ---------------------------------------------------------
 * x^T A x without the backward pass: with r_l the forward tangents and
 * s_l = R(g_l) the backward products, sum_l v_l . J_theta,l^T s_l telescopes
 * into r_out . M r_out + sum_l sum_i r_in(l,i) . R(J_x_i,l^T) g_l, so
 *   x^T A x = r_out^T M r_out (+ sum_l [sum_i rx_i . R(J_x_i^T) gy_l + v_l . R(J_theta^T) gy_l]
 *             for the Hessian),
 * one forward-mode pass plus each layer's second-order terms dotted in place. */

/* Layer l's second-order terms dotted with the direction, added to q: its
 * quad_extra kernel, or the hvp_extra terms formed in the slot buffers and
 * gth[l] and dotted. */
/* sum_i a[i] b[i] in double, n beyond BLAS's int lengths in pieces */
static double dot_fd(const float *a, const float *b, size_t n)
{
    double s = 0;
    for (size_t o = 0; o < n; o += (size_t)1 << 30) {
        size_t m = n - o < (size_t)1 << 30 ? n - o : (size_t)1 << 30;
        s += cblas_dsdot((int)m, a + o, 1, b + o, 1);
    }
    return s;
}

static int layer_quad_terms(cv_part *c, int l, const char *active, const char *live, int k,
                            double *q, cv_err *e)
{
    const cv_layer *L = &c->m->layers[l];
    const cv_layer_ops *o = c->ops[l];
    const float *rx[CV_MAX_NODE_INPUTS] = {NULL};
    float *gx[CV_MAX_NODE_INPUTS] = {NULL};
    for (int i = 0; i < L->nin; i++)
        rx[i] = cv_part_slot_live(c, live, l, i) ? c->rx[L->in[i]] : NULL;
    const float *v = active[l] ? c->vth[l] : NULL;
    if (o->quad_extra && !o->hvp_extra_n) {
        o->quad_extra(&c->ctx[l], k, c->gy[l], rx[0], v, q);
        return 0;
    }
    size_t P = c->ctx[l].nparam;
    for (int i = 0; i < L->nin; i++)
        if (rx[i]) {
            if (!(gx[i] = cv_part_slot(c, i)))
                return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "second-order terms");
            memset(gx[i], 0, sizeof(float) * (size_t)k * c->n * c->numel[L->in[i]]);
        }
    float *gt = v ? c->gth[l] : NULL;
    if (gt)
        memset(gt, 0, sizeof(float) * (size_t)k * P);
    if (o->hvp_extra_n)
        o->hvp_extra_n(&c->ctx[l], k, c->gy[l], rx, v, gx, gt);
    else
        o->hvp_extra(&c->ctx[l], k, c->gy[l], rx[0], v, gx[0], gt);
    for (int j = 0; j < k; j++) {
        for (int i = 0; i < L->nin; i++) {
            if (!gx[i])
                continue;
            size_t len = (size_t)c->n * c->numel[L->in[i]];
            q[j] += dot_fd(rx[i] + (size_t)j * len, gx[i] + (size_t)j * len, len);
        }
        if (gt)
            q[j] += dot_fd(v + (size_t)j * P, gt + (size_t)j * P, P);
    }
    return 0;
}

static int quad_chunk(cv_part *c, cv_curvature kind, const cv_block *b, int k,
                      const double *X, double *q, cv_err *e)
{
    char active[CV_MAX_LAYERS], live[CV_MAX_LAYERS];
    size_t olen = (size_t)c->n * c->C;
    float *out = output_products(c, kind, b, k, X, active, live, e);
    if (!out)
        return -1;
    const float *r = c->rx[c->L];
    for (int j = 0; j < k; j++)
        q[j] += dot_fd(r + (size_t)j * olen, out + (size_t)j * olen, olen);
    cv_part_pool_give(c, out);
    for (int l = 0; kind == CV_CURV_HESSIAN && l < c->L; l++)
        if (live[l] && layer_quad_terms(c, l, active, live, k, q, e))
            return -1;
    return 0;
}

/* Y += A X (Y given) or q_j += x_j^T A x_j (q given) for the k columns of X,
 * in chunks of at most CV_MAX_CHUNK. */
static int chunked_products(cv_part *c, cv_curvature kind, const cv_block *b, int k,
                            const double *X, double *Y, double *q, cv_err *e)
{
    int chunk = chunk_of(k);
    if (k < 1)
        return 0;
    if (cv_part_prepare(c, kind, k, e))
        return -1;
    for (int j = 0; j < k; j += chunk) {
        int kk = k - j < chunk ? k - j : chunk;
        const double *Xj = X + (size_t)j * b->dim;
        if (!Y ? quad_chunk(c, kind, b, kk, Xj, q + j, e)
               : matvec_chunk(c, kind, b, kk, Xj, Y + (size_t)j * b->dim, e))
            return -1;
    }
    return 0;
}

int cv_part_matvec_add(cv_part *c, cv_curvature kind, const cv_block *b, int k,
                       const double *X, double *Y, cv_err *e)
{
    return chunked_products(c, kind, b, k, X, Y, NULL, e);
}

int cv_part_quadform_add(cv_part *c, cv_curvature kind, const cv_block *b, int k,
                         const double *X, double *q, cv_err *e)
{
    return chunked_products(c, kind, b, k, X, NULL, q, e);
}

/* ---- gradient ---------------------------------------------------------------- */

int cv_part_gradient_add(cv_part *c, const cv_block *b, double *g, cv_err *e)
{
    if (ensure_gy(c, e))
        return -1;
    char active[CV_MAX_LAYERS], live[CV_MAX_LAYERS];
    cv_part_mark_block(c, b, active, live);
    float *gt[CV_MAX_LAYERS] = {NULL};
    int rc = 0;
    for (int l = 0; l < c->L && !rc; l++) {
        if (!active[l])
            continue;
        gt[l] = malloc(sizeof(float) * c->ctx[l].nparam);
        if (!gt[l]) {
            rc = cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "gradient of layer %d", l);
            break;
        }
        if ((rc = cv_part_layer_work(c, l, 1, e)))
            break;
        if (!c->ops[l]->vjp_n) {
            c->ops[l]->vjp(&c->ctx[l], 1, c->gy[l], NULL, gt[l]);
            continue;
        }
        float *gx[CV_MAX_NODE_INPUTS] = {NULL};
        c->ops[l]->vjp_n(&c->ctx[l], 1, c->gy[l], gx, gt[l]);
    }
    if (!rc)
        gather_products(c, b, active, 1, gt, g);
    for (int l = 0; l < c->L; l++)
        free(gt[l]);
    return keep_gy_for_hessian(c, rc);
}

/* ---- per-sample gradients, dense matrices, loss at a step ------------------ */

/* Per-sample rows of layer l (tmp: n x P) added to G at the block's columns. */
typedef struct {
    const float *rows;
    double *G;
    size_t dim;
} rows_job;

static void add_rows_slot(cv_part *c, int l, int i, size_t p, void *arg)
{
    const rows_job *r = arg;
    size_t P = c->ctx[l].nparam, n = c->m->layers[l].params[i].numel;
    for (int s = 0; s < c->n; s++) {
        double *g = r->G + (size_t)s * r->dim + p;
        const float *src = r->rows + (size_t)s * P + c->loc[l][i];
        for (size_t q = 0; q < n; q++)
            g[q] += src[q];
    }
}

static int per_sample_rows(cv_part *c, const cv_block *b, double *G, cv_err *e)
{
    char active[CV_MAX_LAYERS], live[CV_MAX_LAYERS];
    cv_part_mark_block(c, b, active, live);
    memset(G, 0, sizeof(double) * (size_t)c->n * b->dim);
    for (int l = 0; l < c->L; l++) {
        if (!active[l])
            continue;
        if (cv_part_layer_work(c, l, 1, e))
            return -1;
        float *tmp = malloc(sizeof(float) * (size_t)c->n * c->ctx[l].nparam);
        if (!tmp)
            return cv_err_set(e, CV_ENOMEM, "out_of_memory", "",
                              "per-sample gradients of layer %d", l);
        c->ops[l]->per_sample(&c->ctx[l], c->gy[l], tmp);
        rows_job r = {tmp, G, b->dim};
        char only[CV_MAX_LAYERS] = {0};
        only[l] = 1;
        for_block_slots(c, only, add_rows_slot, &r);
        free(tmp);
    }
    return 0;
}

int cv_part_per_sample_gradients(cv_part *c, const cv_block *b, double *G, cv_err *e)
{
    if (ensure_gy(c, e))
        return -1;
    return keep_gy_for_hessian(c, per_sample_rows(c, b, G, e));
}

/* ---- building blocks for factor-based methods ------------------------------ */


/* J X (X given: k directions of b->dim, out gets k outputs of n*C) or J^T
 * cot (Y gets k products of b->dim), in chunks of at most CV_MAX_CHUNK. */
static int chunked_jacobian(cv_part *c, const cv_block *b, int k, const double *X, float *out,
                            const float *cot, double *Y, cv_err *e)
{
    int chunk = chunk_of(k);
    if (k < 1 || ensure_workspace(c, chunk, e))
        return k < 1 ? 0 : -1;
    char active[CV_MAX_LAYERS], live[CV_MAX_LAYERS];
    cv_part_mark_block(c, b, active, live);
    size_t olen = (size_t)c->n * c->C;
    for (int j = 0; j < k; j += chunk) {
        int kk = k - j < chunk ? k - j : chunk;
        if (X) {
            scatter_dirs(c, b, active, kk, X + (size_t)j * b->dim);
            cv_part_tangents(c, active, live, kk);
            memcpy(out + (size_t)j * olen, c->rx[c->L], sizeof(float) * olen * (size_t)kk);
            continue;
        }
        float *top = cv_part_pool_ensure(c, kk, e) ? NULL : cv_part_pool_take(c);
        if (!top)
            return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "cotangent buffers");
        memcpy(top, cot + (size_t)j * olen, sizeof(float) * olen * (size_t)kk);
        if (backward_products(c, CV_CURV_GGN, active, live, kk, top, e))
            return -1;
        gather_products(c, b, active, kk, c->gth, Y + (size_t)j * b->dim);
    }
    return 0;
}

int cv_part_jvp(cv_part *c, const cv_block *b, int k, const double *X, float *out, cv_err *e)
{
    return chunked_jacobian(c, b, k, X, out, NULL, NULL, e);
}

int cv_part_vjp_add(cv_part *c, const cv_block *b, int k, const float *cot, double *Y,
                    cv_err *e)
{
    return chunked_jacobian(c, b, k, NULL, NULL, cot, Y, e);
}

