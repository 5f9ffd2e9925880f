/* part_walk.c - the graph walks of the one-micro-batch engine: which layers a
 * block's directions reach (live layers), forward tangents through them, and
 * the backward walk that sums the cotangents of shared activations in pooled
 * buffers (a chain needs two), with each layer's vjp and second-order terms
 * (API in part_internal.h), and what the part's memory adds up to. */
#include <stdlib.h>
#include <string.h>

#include "bigmem.h"
#include "part_internal.h"

void cv_part_pool_free(cv_part *c)
{
    for (int i = 0; i < c->npool; i++)
        free(c->pool[i]);
    for (int i = 0; i < CV_MAX_NODE_INPUTS; i++) {
        free(c->slot_tmp[i]);
        c->slot_tmp[i] = NULL;
    }
    c->npool = c->nfree = 0;
    c->pool_floats = 0;
}

size_t cv_part_ws_samples(const cv_part *c)
{
    return c->opt.ws_samples > (size_t)c->cap ? c->opt.ws_samples : (size_t)c->cap;
}

int cv_part_layer_work(cv_part *c, int l, int k, cv_err *e)
{
    cv_layer_ctx *x = &c->ctx[l];
    size_t need = c->ops[l]->work_size(x, k);
    if (need <= x->work_floats)
        return 0;
    free(x->work);
    x->work = cv_big_malloc(sizeof(float) * need);
    x->work_floats = x->work ? need : 0;
    if (!x->work)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "layer scratch (%zu floats)",
                          need);
    return 0;
}

/* Sets live[l] for every layer. */
void cv_part_live(const cv_part *c, const char *active, char *live)
{
    for (int l = 0; l < c->L; l++) {
        const cv_layer *L = &c->m->layers[l];
        live[l] = active[l];
        for (int i = 0; i < L->nin && !live[l]; i++)
            live[l] = L->in[i] > 0 && live[L->in[i] - 1];
    }
}

/* 1 when input slot i of layer l carries a tangent / needs a cotangent. */
int cv_part_slot_live(const cv_part *c, const char *live, int l, int i)
{
    int a = c->m->layers[l].in[i];
    return a > 0 && live[a - 1];
}

void cv_part_tangents(cv_part *c, const char *active, const char *live, int k)
{
    for (int l = 0; l < c->L; l++) {
        if (!live[l])
            continue;
        const cv_layer *L = &c->m->layers[l];
        const float *v = active[l] ? c->vth[l] : NULL;
        if (c->ops[l]->jvp_n) {
            const float *rx[CV_MAX_NODE_INPUTS] = {NULL};
            for (int i = 0; i < L->nin; i++)
                rx[i] = cv_part_slot_live(c, live, l, i) ? c->rx[L->in[i]] : NULL;
            c->ops[l]->jvp_n(&c->ctx[l], k, rx, v, c->rx[l + 1]);
        } else {
            c->ops[l]->jvp(&c->ctx[l], k, cv_part_slot_live(c, live, l, 0) ? c->rx[L->in[0]] : NULL, v,
                           c->rx[l + 1]);
        }
    }
    if (!live[c->L - 1])
        memset(c->rx[c->L], 0, sizeof(float) * (size_t)k * c->n * c->C);
}

float *cv_part_pool_take(cv_part *c)
{
    if (c->nfree)
        return c->free_bufs[--c->nfree];
    if (c->npool == CV_POOL_MAX || !c->pool_floats) /* not sized (cv_part_pool_ensure) */
        return NULL;
    float *p = cv_big_malloc_populated(sizeof(float) * (c->pool_floats ? c->pool_floats : 1));
    if (p)
        c->pool[c->npool++] = p;
    return p;
}

void cv_part_pool_give(cv_part *c, float *p)
{
    if (p)
        c->free_bufs[c->nfree++] = p;
}

/* Pooled buffers hold k*n*max_numel floats (grown, never shrunk); the slot
 * buffers too, allocated on first use (a chain's gradient and products use
 * none). */
int cv_part_pool_ensure(cv_part *c, int k, cv_err *e)
{
    size_t need = (size_t)k * cv_part_ws_samples(c) * c->max_numel;
    if (need <= c->pool_floats && c->nfree == c->npool)
        return 0;
    cv_part_pool_free(c);
    c->pool_floats = need ? need : 1;
    return 0;
}

float *cv_part_slot(cv_part *c, int i)
{
    if (!c->slot_tmp[i] && c->pool_floats)
        c->slot_tmp[i] = cv_big_malloc(sizeof(float) * c->pool_floats);
    return c->slot_tmp[i];
}

/* The buffer receiving slot i's cotangent (activation a); *direct = 1 when
 * it is the activation's own buffer (first writer), 0 for the slot scratch. */
static float *slot_target(cv_part *c, cv_walk *w, int l, int i, int *direct)
{
    const cv_layer *L = &c->m->layers[l];
    int a = L->in[i];
    int first = !w->set[a];
    for (int j = 0; j < i && first; j++)
        first = L->in[j] != a;
    *direct = first;
    if (!first)
        return cv_part_slot(c, i);
    if (!w->cot[a])
        w->cot[a] = w->use_gy ? c->gy[a - 1] : cv_part_pool_take(c);
    return w->cot[a];
}

static void walk_layer_kernels(cv_part *c, cv_walk *w, int l, const float *cot,
                               float *const *gx)
{
    const cv_layer *L = &c->m->layers[l];
    const cv_layer_ops *o = c->ops[l];
    int act = w->active[l];
    float *gt = act && w->gtheta ? w->gtheta[l] : NULL;
    const float *v = act && w->hessian ? c->vth[l] : NULL;
    if (o->vjp_n) {
        o->vjp_n(&c->ctx[l], w->k, cot, gx, gt);
        if (w->hessian) {
            const float *rx[CV_MAX_NODE_INPUTS] = {NULL};
            for (int i = 0; i < L->nin; i++)
                rx[i] = cv_part_slot_live(c, w->live, l, i) ? c->rx[L->in[i]] : NULL;
            o->hvp_extra_n(&c->ctx[l], w->k, c->gy[l], rx, v, gx, gt);
        }
        return;
    }
    const float *rx = w->hessian && cv_part_slot_live(c, w->live, l, 0) ? c->rx[L->in[0]] : NULL;
    if (w->hessian && o->vjp_hvp) {
        o->vjp_hvp(&c->ctx[l], w->k, cot, c->gy[l], rx, v, gx[0], gt);
    } else {
        o->vjp(&c->ctx[l], w->k, cot, gx[0], gt);
        if (w->hessian)
            o->hvp_extra(&c->ctx[l], w->k, c->gy[l], rx, v, gx[0], gt);
    }
}

static void add_floats(float *restrict dst, const float *restrict src, size_t n)
{
    for (size_t i = 0; i < n; i++)
        dst[i] += src[i];
}

/* Backward step of layer l: its output cotangent (zero when no consumer
 * wrote one) through vjp (+ second-order terms) into its inputs'. */
static int walk_layer(cv_part *c, cv_walk *w, int l, cv_err *e)
{
    const cv_layer *L = &c->m->layers[l];
    int a_out = l + 1, k = w->k;
    size_t out_len = (size_t)k * c->n * c->numel[a_out];
    if (!w->set[a_out]) {
        if (!w->cot[a_out])
            w->cot[a_out] = w->use_gy ? c->gy[l] : cv_part_pool_take(c);
        if (!w->cot[a_out])
            return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "cotangent buffers");
        memset(w->cot[a_out], 0, sizeof(float) * out_len);
        w->set[a_out] = 1;
    }
    if (w->active[l] && w->at_layer && w->at_layer(c, l, w->cot[a_out], w->arg, e))
        return -1;
    float *gx[CV_MAX_NODE_INPUTS] = {NULL};
    int direct[CV_MAX_NODE_INPUTS] = {0};
    for (int i = 0; i < L->nin; i++) {
        if (w->live ? !cv_part_slot_live(c, w->live, l, i) : L->in[i] == 0)
            continue;
        gx[i] = slot_target(c, w, l, i, &direct[i]);
        if (!gx[i])
            return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "cotangent buffers");
    }
    int any = w->hessian || (w->active[l] && w->gtheta);
    for (int i = 0; i < L->nin; i++)
        any |= gx[i] != NULL;
    if (any)
        walk_layer_kernels(c, w, l, w->cot[a_out], gx);
    for (int i = 0; i < L->nin; i++) {
        if (!gx[i])
            continue;
        int a = L->in[i];
        if (!direct[i])
            add_floats(w->cot[a], gx[i], (size_t)k * c->n * c->numel[a]);
        w->set[a] = 1;
    }
    if (!w->use_gy)
        cv_part_pool_give(c, w->cot[a_out]);
    w->cot[a_out] = NULL;
    return 0;
}

/* Runs the walk from the output cotangent top (k*n*C floats): gy[L-1] in
 * the gradient pass, else a pooled buffer the walk gives back. */
int cv_part_walk(cv_part *c, cv_walk *w, float *top, cv_err *e)
{
    return cv_part_walk_from(c, w, c->L, top, e);
}

int cv_part_walk_from(cv_part *c, cv_walk *w, int a, float *top, cv_err *e)
{
    memset(w->cot, 0, sizeof w->cot);
    memset(w->set, 0, sizeof w->set);
    w->cot[a] = top;
    w->set[a] = 1;
    int rc = 0;
    for (int l = a - 1; l >= 0 && !rc; l--) {
        if (w->live && !w->live[l])
            continue;
        rc = cv_part_layer_work(c, l, w->k, e) || walk_layer(c, w, l, e) ? -1 : 0;
    }
    for (int b = 1; b <= c->L && !w->use_gy; b++)
        if (w->cot[b])
            cv_part_pool_give(c, w->cot[b]);
    return rc;
}


/* ---- memory ------------------------------------------------------------------ */

size_t cv_part_state_bytes(const cv_part *c)
{
    size_t f = (size_t)c->cap * c->C * 2; /* gh, and prob of the loss state */
    /* the sizes asked for, not malloc_usable_size: what the allocator rounds
     * up to differs from run to run (arenas shared with other threads) */
    size_t nC = (size_t)c->n * c->C;
    size_t b = c->copy_bytes + sizeof *c;
    f += c->mc_s ? nC * (size_t)c->opt.base.mc_samples : 0;
    f += c->ef_s ? nC : 0;
    for (int l = 0; l < c->L; l++) {
        f += (size_t)c->cap * c->numel[l + 1] * (c->gy[l] ? 2 : 1);
        b += c->ctx[l].cache_bytes;
    }
    return b + sizeof(float) * f;
}

size_t cv_part_work_bytes(const cv_part *c)
{
    size_t f = c->pool_floats * (size_t)c->npool;
    for (int i = 0; i < CV_MAX_NODE_INPUTS; i++)
        f += c->slot_tmp[i] ? c->pool_floats : 0;
    for (int l = 0; l <= c->L && c->wk; l++)
        f += (size_t)c->wk * c->ws_n * c->numel[l];
    for (int l = 0; l < c->L; l++)
        f += c->ctx[l].work_floats + (c->vth[l] ? 2 * (size_t)c->wk * c->ctx[l].nparam : 0);
    return sizeof(float) * f;
}

void cv_part_take_workspace(cv_part *to, cv_part *from)
{
    if (to == from || from->ws_n < to->cap || from->nfree != from->npool)
        return;
    cv_part_free_workspace(to);
    memcpy(to->rx, from->rx, sizeof to->rx);
    memcpy(to->vth, from->vth, sizeof to->vth);
    memcpy(to->gth, from->gth, sizeof to->gth);
    memcpy(to->pool, from->pool, sizeof to->pool);
    memcpy(to->free_bufs, from->free_bufs, sizeof to->free_bufs);
    memcpy(to->slot_tmp, from->slot_tmp, sizeof to->slot_tmp);
    to->npool = from->npool;
    to->nfree = from->nfree;
    to->pool_floats = from->pool_floats;
    to->wk = from->wk;
    to->ws_n = from->ws_n;
    for (int l = 0; l < to->L; l++) {
        to->ctx[l].work = from->ctx[l].work;
        to->ctx[l].work_floats = from->ctx[l].work_floats;
        from->ctx[l].work = NULL;
        from->ctx[l].work_floats = 0;
    }
    memset(from->rx, 0, sizeof from->rx);
    memset(from->vth, 0, sizeof from->vth);
    memset(from->gth, 0, sizeof from->gth);
    memset(from->slot_tmp, 0, sizeof from->slot_tmp);
    from->npool = from->nfree = 0;
    from->pool_floats = 0;
    from->wk = from->ws_n = 0;
}
