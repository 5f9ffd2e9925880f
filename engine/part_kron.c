/* part_kron.c - one micro-batch's share of the Kronecker factors
 * (cv_part_kron_add, part.h): each Kronecker layer's input factor A from its
 * forward input, once, and its output factor B from the cotangents that one
 * backward walk of the curvature's output factor (the loss Hessian's square
 * root, the Monte Carlo gradient samples or the sample gradients) brings to
 * the layer's output, k vectors at a time. */
#include <stdlib.h>
#include <string.h>

#include "part_internal.h"

typedef struct {
    cv_part_kron_visit fn;
    void *arg;
    int k;
} kron_walk;

static int kron_at_layer(cv_part *c, int l, const float *cot, void *arg, cv_err *e)
{
    const kron_walk *w = arg;
    return w->fn(c, l, w->k, cot, w->arg, e);
}

static int kron_b_visit(cv_part *c, int l, int k, const float *cot, void *arg, cv_err *e)
{
    const cv_part_kron *job = arg;
    if (c->ops[l]->kron_b_add(&c->ctx[l], k, cot, job->approx, job->B[l]))
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "",
                          "Kronecker factor B of layers[%d]", l);
    return 0;
}

/* ACP: the largest squared cotangent entry at layer l's output. */
static int kron_max_visit(cv_part *c, int l, int k, const float *cot, void *arg, cv_err *e)
{
    const cv_part_kron *job = arg;
    size_t len = (size_t)k * (size_t)c->n * cv_shape_numel(&c->m->layers[l].out_shape);
    double mx = job->gmax[l];
    for (size_t i = 0; i < len; i++) {
        double v = (double)cot[i] * (double)cot[i];
        if (v > mx)
            mx = v;
    }
    job->gmax[l] = mx;
    return 0;
}

int cv_part_kron_columns(const cv_part *c, cv_curvature kind, int narrow)
{
    return kind == CV_CURV_GGN         ? (narrow ? cv_loss_factor_columns(&c->ls) : c->C)
           : kind == CV_CURV_FISHER_MC ? c->opt.base.mc_samples
                                       : 1;
}

/* top (kk x n x C) = vectors [j0, j0 + kk) of the output factor; S holds
 * the loss Hessian's factors (GGN: n C x ks row-major blocks). */
static void fill_top(const cv_part *c, cv_curvature kind, const double *S, int ks, int j0,
                     int kk, float *top)
{
    size_t n = (size_t)c->n, C = (size_t)c->C;
    if (kind == CV_CURV_FISHER_MC) {
        memcpy(top, c->mc_s + (size_t)j0 * n * C, sizeof(float) * (size_t)kk * n * C);
        return;
    }
    if (kind == CV_CURV_EF) {
        memcpy(top, c->ef_s, sizeof(float) * n * C);
        return;
    }
    for (int j = 0; j < kk; j++)
        for (size_t i = 0; i < n; i++)
            for (size_t q = 0; q < C; q++)
                top[((size_t)j * n + i) * C + q] =
                    (float)S[(i * C + q) * (size_t)ks + (size_t)(j0 + j)];
}

/* Floats one pooled cotangent buffer of a walk may span (8 MB): the walk
 * takes fewer vectors at a time than the workspace allows where a vector's
 * cotangents are large (the bench CNN: 1 of its 10 type-2 columns, 12.8 MB
 * at N = 128, against 128 MB for all ten), so the buffers a walk touches stay
 * small and in cache; the Kronecker kernels sum each chunk's share into the
 * factors in double. */
#define KRON_WALK_FLOATS ((size_t)1 << 21)

static int walk_chunk(const cv_part *c, int wk)
{
    size_t per = (size_t)c->n * c->max_numel;
    int k = per > 0 && per * (size_t)wk > KRON_WALK_FLOATS ? (int)(KRON_WALK_FLOATS / per) : wk;
    return k < 1 ? 1 : k;
}

static int walk_chunks(cv_part *c, cv_curvature kind, const char *layers, const char *live,
                       int ktot, int chunk, const double *S, cv_part_kron_visit fn, void *arg,
                       cv_err *e)
{
    for (int j0 = 0; j0 < ktot; j0 += chunk) {
        int kk = ktot - j0 < chunk ? ktot - j0 : chunk;
        float *top = cv_part_pool_take(c);
        cv_walk *w = top ? calloc(1, sizeof *w) : NULL;
        if (!w) {
            cv_part_pool_give(c, top);
            return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "Kronecker cotangents");
        }
        fill_top(c, kind, S, ktot, j0, kk, top);
        kron_walk kw = {fn, arg, kk};
        w->k = kk;
        w->active = layers;
        w->live = live;
        w->at_layer = kron_at_layer;
        w->arg = &kw;
        int rc = cv_part_walk(c, w, top, e);
        free(w);
        if (rc)
            return -1;
    }
    return 0;
}

int cv_part_kron_add(cv_part *c, const cv_part_kron *job, int *columns, cv_err *e)
{
    int any = 0;
    for (int l = 0; l < c->L; l++)
        any |= job->layers[l];
    if (columns)
        *columns = cv_part_kron_columns(c, job->kind, 0);
    if (!any)
        return 0;
    for (int l = 0; l < c->L; l++)
        if (job->layers[l] && c->ops[l]->kron_a_add(&c->ctx[l], job->approx, job->A[l]))
            return cv_err_set(e, CV_ENOMEM, "out_of_memory", "",
                              "Kronecker factor A of layers[%d]", l);
    if (job->acp)
        return job->gmax ? cv_part_kron_walk(c, job->kind, job->layers, 0, kron_max_visit,
                                             (void *)job, NULL, e)
                         : 0;
    return cv_part_kron_walk(c, job->kind, job->layers, 0, kron_b_visit, (void *)job, NULL, e);
}

/* The walks of cv_part_kron_walk(_k) after the part is prepared: chunk
 * vectors at a time. */
static int walk_all(cv_part *c, cv_curvature kind, const char *layers, int ktot, int chunk,
                    cv_part_kron_visit fn, void *arg, cv_err *e)
{
    size_t C = (size_t)c->C, ks = (size_t)ktot;
    double *S = NULL, *tmp = NULL;
    if (kind == CV_CURV_GGN) {
        S = malloc(sizeof(double) * (size_t)c->n * C * ks);
        tmp = ks < C ? malloc(sizeof(double) * C * C) : NULL;
        int bad = !S || (ks < C && !tmp);
        for (int i = 0; i < c->n && !bad; i++)
            bad = ks < C ? cv_loss_hessian_factor(&c->ls, i, tmp, S + (size_t)i * C * ks)
                         : (cv_loss_hessian_sqrt(&c->ls, i, S + (size_t)i * C * C), 0);
        free(tmp);
        if (bad) {
            free(S);
            return cv_err_set(e, CV_ENOMEM, "out_of_memory", "",
                              "loss Hessian factors (%d x %zu x %zu)", c->n, C, ks);
        }
    }
    char live[CV_MAX_LAYERS];
    cv_part_live(c, layers, live);
    int rc = walk_chunks(c, kind, layers, live, ktot, chunk, S, fn, arg, e);
    free(S);
    return rc;
}

static int any_layer(const cv_part *c, const char *layers)
{
    int any = 0;
    for (int l = 0; l < c->L; l++)
        any |= layers[l];
    return any;
}

/* Vectors per walk at most (as products take at most 32 at a time, part.c). */
#define KRON_WALK_MAX_K 32

int cv_part_kron_walk(cv_part *c, cv_curvature kind, const char *layers, int narrow,
                      cv_part_kron_visit fn, void *arg, int *columns, cv_err *e)
{
    int ktot = cv_part_kron_columns(c, kind, narrow);
    return cv_part_kron_walk_k(
        c, kind, layers, walk_chunk(c, ktot < KRON_WALK_MAX_K ? ktot : KRON_WALK_MAX_K), narrow,
        fn, arg, columns, e);
}

int cv_part_kron_walk_k(cv_part *c, cv_curvature kind, const char *layers, int max_k,
                        int narrow, cv_part_kron_visit fn, void *arg, int *columns, cv_err *e)
{
    int ktot = cv_part_kron_columns(c, kind, narrow);
    if (columns)
        *columns = ktot;
    if (!any_layer(c, layers))
        return 0;
    int chunk = max_k < 1 ? 1 : max_k < ktot ? max_k : ktot;
    if (cv_part_prepare_walk(c, kind, chunk, e))
        return -1;
    return walk_all(c, kind, layers, ktot, chunk, fn, arg, e);
}
