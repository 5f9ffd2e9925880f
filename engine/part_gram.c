/* part_gram.c - Gram matrices of per-(vector, sample) parameter gradients
 * (cv_part_gram): each layer's Gram kernel where it has one, its explicit
 * per-sample gradients otherwise, and the whole block explicitly when it
 * holds a tensor several layers share. */
#include <cblas.h>
#include <stdlib.h>
#include <string.h>

#include "part_internal.h"

/* Bit i set when slot i of layer l holds a tensor of the current block. */
static unsigned layer_mask(const cv_part *c, int l)
{
    unsigned mask = 0;
    for (int i = 0; i < c->m->layers[l].nparams; i++)
        if (c->bpos[c->uid[l][i]] >= 0)
            mask |= 1u << i;
    return mask;
}

typedef struct {
    int k;
    double *G;
    double *M;          /* whole-block explicit path: (k*n) x dim gradients, or NULL */
    size_t dim;
} gram_job;

/* G += M M^T for the R x P row-major M (both triangles). */
static void add_outer(double *G, const double *M, size_t R, size_t P)
{
    cblas_dsyrk(CblasRowMajor, CblasUpper, CblasNoTrans, (int)R, (int)P, 1.0, M, (int)P, 1.0,
                G, (int)R);
    for (size_t r = 0; r < R; r++) /* mirror the upper triangle just added */
        for (size_t q = 0; q < r; q++)
            G[r * R + q] = G[q * R + r];
}

/* Per-(vector, sample) gradients of layer l's block tensors added to M (rows
 * r = j*n + s, the block's columns; cols = dim) or, M NULL, into a private
 * (k*n) x P matrix whose outer product goes to G. */
static int gram_explicit(cv_part *c, int l, const float *cot, const gram_job *g, cv_err *e)
{
    size_t P = c->ctx[l].nparam, R = (size_t)g->k * c->n, n = (size_t)c->n;
    float *rows = malloc(sizeof(float) * n * P);
    double *M = g->M ? g->M : calloc(R * P, sizeof(double));
    if (!rows || !M) {
        free(rows);
        if (!g->M)
            free(M);
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "",
                          "per-sample gradients of layers[%d] for the Gram matrix", l);
    }
    unsigned mask = layer_mask(c, l);
    for (int j = 0; j < g->k; j++) {
        c->ops[l]->per_sample(&c->ctx[l], cot + (size_t)j * n * c->numel[l + 1], rows);
        for (int i = 0; i < c->m->layers[l].nparams; i++) {
            if (!(mask >> i & 1u))
                continue;
            size_t numel = c->m->layers[l].params[i].numel, loc = c->loc[l][i];
            size_t col = g->M ? (size_t)c->bpos[c->uid[l][i]] : loc, ld = g->M ? g->dim : P;
            for (size_t s = 0; s < n; s++)
                for (size_t q = 0; q < numel; q++)
                    M[((size_t)j * n + s) * ld + col + q] += rows[s * P + loc + q];
        }
    }
    if (!g->M) {
        add_outer(g->G, M, R, P);
        free(M);
    }
    free(rows);
    return 0;
}

static int gram_at_layer(cv_part *c, int l, const float *cot, void *arg, cv_err *e)
{
    const gram_job *g = arg;
    if (g->M || !c->ops[l]->gram_add)
        return gram_explicit(c, l, cot, g, e);
    c->ops[l]->gram_add(&c->ctx[l], g->k, cot, layer_mask(c, l), g->G);
    return 0;
}

/* 1 when a tensor of the current block is used by several layers. */
static int block_has_shared(const cv_part *c)
{
    for (int l = 0; c->tied && l < c->L; l++)
        for (int i = 0; i < c->m->layers[l].nparams; i++)
            if (c->m->layers[l].params[i].shared && c->bpos[c->uid[l][i]] >= 0)
                return 1;
    return 0;
}

int cv_part_gram(cv_part *c, const cv_block *b, int k, const float *cot, double *G,
                 cv_err *e)
{
    char active[CV_MAX_LAYERS], live[CV_MAX_LAYERS];
    cv_part_mark_block(c, b, active, live);
    size_t R = (size_t)k * c->n, olen = (size_t)c->n * c->C;
    memset(G, 0, sizeof(double) * R * R);
    /* a shared tensor's per-sample gradient sums its uses: the layer-wise
     * Gram terms would miss the cross terms, so the block goes explicit */
    gram_job job = {k, G, NULL, b->dim};
    if (block_has_shared(c) && !(job.M = calloc(R * b->dim, sizeof(double))))
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "",
                          "per-sample gradients for the Gram matrix (%zu x %zu)", R, b->dim);
    float *top = cv_part_pool_ensure(c, k, e) ? NULL : cv_part_pool_take(c);
    cv_walk *w = top ? calloc(1, sizeof *w) : NULL;
    int rc = 0;
    if (!top || !w) {
        cv_part_pool_give(c, top);
        rc = cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "Gram cotangents");
    } else {
        memcpy(top, cot, sizeof(float) * olen * (size_t)k);
        w->k = k;
        w->active = active;
        w->live = live;
        w->at_layer = gram_at_layer;
        w->arg = &job;
        rc = cv_part_walk(c, w, top, e);
    }
    free(w);
    if (!rc && job.M)
        add_outer(G, job.M, R, b->dim);
    free(job.M);
    return rc;
}

