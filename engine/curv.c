/* curv.c - curvature-vector products on one batch: the cached forward pass,
 * the gradient's backward pass, and Hessian / GGN / Fisher / EF products built
 * from the per-layer kernels of layer.h (forward-mode Jacobian products, the
 * loss's output matrix, reverse-mode products, Pearlmutter's extra terms). */
#include "curv.h"

#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "curv_internal.h"
#include "names.h"

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
    b->name[0] = 0;
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
    b->name[0] = 0;
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

/* The name of layer L's block: its module, or its first tensor's name. */
static const char *owner_name(const cv_layer *L)
{
    return L->module[0] ? L->module : L->params[0].name;
}

int cv_blocks_per_layer(const cv_model *m, cv_block *out, int max)
{
    int nb = 0, t = 0;
    cv_block *tmp = malloc(sizeof(cv_block) * (size_t)(m->nlayers ? m->nlayers : 1));
    if (!tmp)
        return 0;
    for (int l = 0; l < m->nlayers; l++) {
        const cv_layer *L = &m->layers[l];
        int own = 0; /* tensors first used here (a shared one belongs to its first user) */
        for (int i = 0; i < L->nparams; i++)
            own += !L->params[i].shared;
        if (!own)
            continue;
        int bi = 0;
        while (bi < nb && !(L->module[0] && strcmp(tmp[bi].name, L->module) == 0))
            bi++;
        cv_block *b = &tmp[bi];
        if (bi == nb) {
            memset(b, 0, sizeof *b);
            snprintf(b->name, sizeof b->name, "%s", owner_name(L));
            nb++;
        }
        for (int i = 0; i < L->nparams; i++) {
            if (L->params[i].shared)
                continue;
            b->idx[b->count++] = t++;
            b->dim += L->params[i].numel;
        }
    }
    for (int i = 0; out && i < nb && i < max; i++)
        out[i] = tmp[i];
    free(tmp);
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

/* Points layer l's context at its inputs (activation buffers). */
static void wire_inputs(cv_curv *c, int l)
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
static int number_slots(cv_curv *c, int l, cv_err *e)
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
    if (!c->theta_copy[l])
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "parameters of layer %d", l);
    for (int i = 0; i < L->nparams; i++)
        memcpy(c->theta_copy[l] + c->loc[l][i], c->m->params + L->params[i].offset,
               sizeof(float) * L->params[i].numel);
    return 0;
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

static int run_forward(cv_curv *c, cv_err *e)
{
    c->act[0] = c->b->x;
    for (int l = 0; l < c->L; l++) {
        size_t len = (size_t)c->n * c->numel[l + 1];
        c->act[l + 1] = malloc(sizeof(float) * (len ? len : 1));
        if (!c->act[l + 1])
            return cv_err_set(e, CV_ENOMEM, "out_of_memory", "",
                              "activations of layer %d (%zu floats)", l, len);
        wire_inputs(c, l);
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
    int rc = setup_layers(c, e);
    if (!rc && !(c->bpos = malloc(sizeof(long) * (size_t)(c->nuid + 1))))
        rc = cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "engine state");
    if (rc || run_forward(c, e)) {
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
    cv_curv_pool_free(c);
    c->wk = 0;
}

void cv_curv_free(cv_curv *c)
{
    if (!c)
        return;
    free_workspace(c);
    free(c->bpos);
    for (int l = 0; l < c->L; l++) {
        free(c->theta_copy[l]);
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

static void drop_grad(cv_curv *c)
{
    free(c->grad);
    c->grad = NULL;
    for (int l = 0; l < c->L; l++) {
        free(c->gy[l]);
        c->gy[l] = NULL;
    }
}

/* grad = the per-layer parameter gradients gt[l] added at their tensors'
 * places (a shared tensor gets the sum of its uses). */
static void sum_uses(const cv_curv *c, float *const *gt, float *grad)
{
    memset(grad, 0, sizeof(float) * c->m->nparams_total);
    for (int l = 0; l < c->L; l++) {
        const cv_layer *L = &c->m->layers[l];
        for (int i = 0; gt[l] && i < L->nparams; i++) {
            float *dst = grad + L->params[i].offset;
            const float *src = gt[l] + c->loc[l][i];
            for (size_t q = 0; q < L->params[i].numel; q++)
                dst[q] += src[q];
        }
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
    /* not zeroed: the walk visits every layer and writes or clears its output's */
    for (int l = 0; l < c->L; l++)
        ok &= (c->gy[l] = malloc(sizeof(float) * ((size_t)c->n * c->numel[l + 1] + 1))) != NULL;
    if (!ok || !c->grad) {
        drop_grad(c);
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "gradient and cotangents");
    }
    char active[CV_MAX_LAYERS];
    float *gt[CV_MAX_LAYERS] = {NULL};
    int rc = 0;
    for (int l = 0; l < c->L; l++) {
        active[l] = c->ctx[l].nparam > 0;
        if (active[l] && c->tied) /* shared tensors: each use into its own buffer, then summed */
            rc |= !(gt[l] = malloc(sizeof(float) * c->ctx[l].nparam));
        else if (active[l])
            gt[l] = c->grad + c->poff[l];
    }
    cv_walk *w = rc ? NULL : calloc(1, sizeof *w);
    if (w) {
        w->k = 1;
        w->active = active;
        w->gtheta = gt;
        w->use_gy = 1;
        memcpy(c->gy[c->L - 1], c->gh, sizeof(float) * (size_t)c->n * c->C);
        rc = cv_curv_pool_ensure(c, 1, e) ? -1 : cv_curv_walk(c, w, c->gy[c->L - 1], e);
        free(w);
    } else {
        rc = cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "gradient walk");
    }
    if (c->tied) {
        if (!rc)
            sum_uses(c, gt, c->grad);
        for (int l = 0; l < c->L; l++)
            free(gt[l]);
    }
    if (rc) {
        drop_grad(c);
        return -1;
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
    for (int l = 0; l < c->L && !bad; l++)
        bad |= cv_curv_layer_work(c, l, k, e) != 0;
    if (bad || cv_curv_pool_ensure(c, k, e)) {
        free_workspace(c);
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "",
                          "workspace for %d vectors of batch %zu does not fit in memory", k, n);
    }
    c->wk = k;
    return 0;
}

/* Fills c->bpos for block b (each tensor's offset in the block vector, -1
 * outside it), marks the layers using a tensor of b (active) and the live
 * ones (the walk comment above). */
void cv_curv_mark_block(cv_curv *c, const cv_block *b, char *active, char *live)
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
    cv_curv_live(c, active, live);
}

/* Calls fn(c, l, i, block offset, arg) for every slot of an active layer whose
 * tensor is in the block c->bpos describes. */
static void for_block_slots(cv_curv *c, const char *active,
                            void (*fn)(cv_curv *c, int l, int i, size_t p, void *arg),
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
} dirs_job;

static void scatter_slot(cv_curv *c, int l, int i, size_t p, void *arg)
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

static void gather_slot(cv_curv *c, int l, int i, size_t p, void *arg)
{
    const dirs_job *d = arg;
    size_t P = c->ctx[l].nparam, n = c->m->layers[l].params[i].numel;
    for (int j = 0; j < d->k; j++) {
        double *y = d->Y + (size_t)j * d->dim + p;
        const float *g = c->gth[l] + (size_t)j * P + c->loc[l][i];
        for (size_t q = 0; q < n; q++)
            y[q] += g[q];
    }
}

/* Scatters k block vectors X (double) into the per-layer direction buffers
 * (every use of a shared tensor gets it). */
static void scatter_dirs(cv_curv *c, const cv_block *b, const char *active, int k,
                         const double *X)
{
    for (int l = 0; l < c->L; l++)
        if (active[l])
            memset(c->vth[l], 0, sizeof(float) * (size_t)k * c->ctx[l].nparam);
    dirs_job d = {k, b->dim, X, NULL};
    for_block_slots(c, active, scatter_slot, &d);
}

/* Y = the per-layer products on block b (a shared tensor: the sum of its uses). */
static void gather_products(cv_curv *c, const cv_block *b, const char *active, int k,
                            double *Y)
{
    memset(Y, 0, sizeof(double) * (size_t)k * b->dim);
    dirs_job d = {k, b->dim, NULL, Y};
    for_block_slots(c, active, gather_slot, &d);
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

/* The products' backward walk: k output cotangents (a pooled buffer, given
 * back) through the live layers into gth. */
static int backward_products(cv_curv *c, cv_curvature kind, const char *active,
                             const char *live, int k, float *out_cot, cv_err *e)
{
    cv_walk *w = calloc(1, sizeof *w);
    if (!w) {
        cv_curv_pool_give(c, out_cot);
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "backward walk");
    }
    w->k = k;
    w->active = active;
    w->live = live;
    w->hessian = kind == CV_CURV_HESSIAN;
    w->gtheta = c->gth;
    int rc = cv_curv_walk(c, w, out_cot, e);
    free(w);
    return rc;
}

static int matvec_chunk(cv_curv *c, cv_curvature kind, const cv_block *b, int k,
                        const double *X, double *Y, cv_err *e)
{
    char active[CV_MAX_LAYERS], live[CV_MAX_LAYERS];
    cv_curv_mark_block(c, b, active, live);
    scatter_dirs(c, b, active, k, X);
    cv_curv_tangents(c, active, live, k);
    float *out = cv_curv_pool_ensure(c, k, e) ? NULL : cv_curv_pool_take(c);
    if (!out)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "cotangent buffers");
    apply_output_matrix(c, kind, k, c->rx[c->L], out);
    int rc = backward_products(c, kind, active, live, k, out, e);
    if (!rc)
        gather_products(c, b, active, k, Y);
    return rc;
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

static int layer_quad_terms(cv_curv *c, int l, const char *active, const char *live, int k,
                            double *q, cv_err *e)
{
    const cv_layer *L = &c->m->layers[l];
    const cv_layer_ops *o = c->ops[l];
    const float *rx[CV_MAX_NODE_INPUTS] = {NULL};
    float *gx[CV_MAX_NODE_INPUTS] = {NULL};
    for (int i = 0; i < L->nin; i++)
        rx[i] = cv_curv_slot_live(c, live, l, i) ? c->rx[L->in[i]] : NULL;
    const float *v = active[l] ? c->vth[l] : NULL;
    if (o->quad_extra && !o->hvp_extra_n) {
        o->quad_extra(&c->ctx[l], k, c->gy[l], rx[0], v, q);
        return 0;
    }
    size_t P = c->ctx[l].nparam;
    for (int i = 0; i < L->nin; i++)
        if (rx[i]) {
            if (!(gx[i] = cv_curv_slot(c, i)))
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

static int quad_chunk(cv_curv *c, cv_curvature kind, const cv_block *b, int k,
                      const double *X, double *q, cv_err *e)
{
    char active[CV_MAX_LAYERS], live[CV_MAX_LAYERS];
    cv_curv_mark_block(c, b, active, live);
    size_t olen = (size_t)c->n * c->C;
    scatter_dirs(c, b, active, k, X);
    cv_curv_tangents(c, active, live, k);
    float *out = cv_curv_pool_ensure(c, k, e) ? NULL : cv_curv_pool_take(c);
    if (!out)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "cotangent buffers");
    apply_output_matrix(c, kind, k, c->rx[c->L], out);
    const float *r = c->rx[c->L];
    for (int j = 0; j < k; j++)
        q[j] = dot_fd(r + (size_t)j * olen, out + (size_t)j * olen, olen);
    cv_curv_pool_give(c, out);
    for (int l = 0; kind == CV_CURV_HESSIAN && l < c->L; l++)
        if (live[l] && layer_quad_terms(c, l, active, live, k, q, e))
            return -1;
    return 0;
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
        if (!Y ? quad_chunk(c, kind, b, kk, Xj, q + j, e)
               : matvec_chunk(c, kind, b, kk, Xj, Y + (size_t)j * b->dim, e))
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

/* Per-sample rows of layer l (tmp: n x P) added to G at the block's columns. */
typedef struct {
    const float *rows;
    double *G;
    size_t dim;
} rows_job;

static void add_rows_slot(cv_curv *c, int l, int i, size_t p, void *arg)
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

int cv_curv_per_sample_gradients(cv_curv *c, const cv_block *b, double *G, cv_err *e)
{
    if (ensure_grad(c, e))
        return -1;
    char active[CV_MAX_LAYERS], live[CV_MAX_LAYERS];
    cv_curv_mark_block(c, b, active, live);
    memset(G, 0, sizeof(double) * (size_t)c->n * b->dim);
    for (int l = 0; l < c->L; l++) {
        if (!active[l])
            continue;
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
    cv_model *tmp = malloc(sizeof *tmp);
    if (!tmp || cv_model_clone(c->m, tmp)) {
        free(tmp);
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "model copy");
    }
    size_t o = 0;
    for (int i = 0; i < b->count; i++) {
        const cv_tensor_info *t = cv_model_param(tmp, b->idx[i]);
        for (size_t q = 0; q < t->numel; q++)
            tmp->params[t->offset + q] += (float)step[o++];
    }
    cv_curv *c2 = cv_curv_new(tmp, c->b, &c->opt, e);
    int rc = c2 ? 0 : -1;
    if (c2)
        *loss = c2->loss;
    cv_curv_free(c2);
    cv_model_free(tmp);
    free(tmp);
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
    char active[CV_MAX_LAYERS], live[CV_MAX_LAYERS];
    cv_curv_mark_block(c, b, active, live);
    size_t olen = (size_t)c->n * c->C;
    for (int j = 0; j < k; j += chunk) {
        int kk = k - j < chunk ? k - j : chunk;
        if (X) {
            scatter_dirs(c, b, active, kk, X + (size_t)j * b->dim);
            cv_curv_tangents(c, active, live, kk);
            memcpy(out + (size_t)j * olen, c->rx[c->L], sizeof(float) * olen * (size_t)kk);
            continue;
        }
        float *top = cv_curv_pool_ensure(c, kk, e) ? NULL : cv_curv_pool_take(c);
        if (!top)
            return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "cotangent buffers");
        memcpy(top, cot + (size_t)j * olen, sizeof(float) * olen * (size_t)kk);
        if (backward_products(c, CV_CURV_GGN, active, live, kk, top, e))
            return -1;
        gather_products(c, b, active, kk, Y + (size_t)j * b->dim);
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
