/* diag_exact.c - the exact diagonal of ggn, fisher_mc, ef and the Hessian
 * by backpropagation (API in diag_exact.h): which blocks the layers' diag_add
 * kernels cover, one micro-batch's share (a backward walk of the output
 * factor's vectors, each active layer squaring its per-(sample, column)
 * gradients into its own parameter vector, then placed at the block's
 * offsets), the Hessian's residual walks from its activations, the sum
 * over micro-batches and ranks and the weight of the vectors (as the
 * Kronecker factors': ggn and hessian 1, fisher_mc c/M, ef c). */
#include "diag_exact.h"

#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <math.h>

#include "layer.h"
#include "layer_activation.h"
#include "layer_batchnorm.h"
#include "layer_conv.h"
#include "layer_convt.h"
#include "layer_embedding.h"
#include "layer_linear.h"
#include "layer_passthrough.h"
#include "layer_pool.h"
#include "parallel.h"
#include "part_internal.h"

/* Names layer l for a refusal: its class and, in the graph form, its node. */
static void layer_label(const cv_layer *L, int l, char *s, size_t n)
{
    if (L->node[0])
        snprintf(s, n, "layers[%d] (%s, node '%s')", l, L->cls->name, L->node);
    else
        snprintf(s, n, "layers[%d] (%s)", l, L->cls->name);
}

/* Hessian: 1 when layer L's output has no second derivative in its inputs
 * and parameters that reaches the diagonal (linear in each; the bilinear
 * parameter-input terms are off the diagonal) or is an elementwise
 * activation (its residual diag(phi'' . dL/da) is backpropagated). */
static int hessian_layer_ok(const cv_layer *L)
{
    static const cv_layer_class *const ok[] = {
        &cv_linear_class,       &cv_conv2d_class,       &cv_conv1d_class,
        &cv_convt2d_class,      &cv_batchnorm1d_class,  &cv_batchnorm2d_class,
        &cv_embedding_class,    &cv_maxpool2d_class,    &cv_avgpool2d_class,
        &cv_adaptiveavgpool2d_class, &cv_maxpool1d_class, &cv_avgpool1d_class,
        &cv_adaptiveavgpool1d_class};
    if (L->cls->ops == &cv_activation_ops || L->cls->ops == &cv_passthrough_ops)
        return 1;
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++)
        if (L->cls == ok[i])
            return 1;
    return 0;
}

static int hessian_check(const cv_model *m, cv_err *e)
{
    for (int l = 0; l < m->nlayers; l++) {
        if (hessian_layer_ok(&m->layers[l]))
            continue;
        char s[160];
        layer_label(&m->layers[l], l, s, sizeof s);
        return cv_err_set(e, CV_EINVAL, "unsupported", "options.method",
                          "exact Hessian diagonal: %s has no backpropagated second-order "
                          "term (supported: Linear, Conv, ConvTranspose2d, BatchNorm (eval), "
                          "Embedding, pooling, elementwise activations, Flatten/Identity/"
                          "Dropout)", s);
    }
    return 0;
}

int cv_diag_backprop_check(const cv_model *m, cv_curvature kind, const cv_block *b, cv_err *e)
{
    if (kind != CV_CURV_GGN && kind != CV_CURV_FISHER_MC && kind != CV_CURV_EF &&
        kind != CV_CURV_HESSIAN)
        return cv_err_set(e, CV_EINVAL, "unsupported", "options.method",
                          "the backpropagated exact diagonal covers hessian, ggn, fisher_mc "
                          "and ef, not %s", cv_curvature_name(kind));
    if (kind == CV_CURV_HESSIAN && hessian_check(m, e))
        return -1;
    for (int t = 0; t < b->count; t++) {
        size_t off = cv_model_param(m, b->idx[t])->offset;
        int users = 0, first = -1;
        for (int l = 0; l < m->nlayers; l++)
            for (int i = 0; i < m->layers[l].nparams; i++)
                if (m->layers[l].params[i].offset == off) {
                    users++;
                    first = first < 0 ? l : first;
                    const cv_layer_ops *o = m->layers[l].cls->ops;
                    if (o && o->diag_add)
                        continue;
                    char s[160];
                    layer_label(&m->layers[l], l, s, sizeof s);
                    return cv_err_set(e, CV_EINVAL, "unsupported", "options.method",
                                      "exact diagonal: %s has no backpropagated diagonal "
                                      "kernel (diag_add)", s);
                }
        if (users > 1) {
            char s[160];
            layer_label(&m->layers[first], first, s, sizeof s);
            return cv_err_set(e, CV_EINVAL, "unsupported", "options.method",
                              "exact diagonal: tensor '%s' of %s is used by %d layers (tied "
                              "weights); the backpropagated diagonal squares one layer's "
                              "gradients",
                              cv_model_param(m, b->idx[t])->name, s, users);
        }
    }
    return 0;
}

/* 1 when some layer with a tensor of block b leads to activation a (is among
 * the layers before it on a path to it). */
static int block_before(const cv_model *m, const cv_block *b, int a)
{
    char anc[CV_MAX_LAYERS] = {0};
    if (a > 0)
        anc[a - 1] = 1;
    for (int l = a - 1; l >= 0; l--) {
        if (!anc[l])
            continue;
        for (int i = 0; i < m->layers[l].nin; i++)
            if (m->layers[l].in[i] > 0)
                anc[m->layers[l].in[i] - 1] = 1;
        for (int i = 0; i < m->layers[l].nparams; i++)
            for (int t = 0; t < b->count; t++)
                if (cv_model_param(m, b->idx[t])->offset == m->layers[l].params[i].offset)
                    return 1;
    }
    return 0;
}

long cv_diag_backprop_columns(const cv_model *m, cv_curvature kind, const cv_block *b,
                              int mc_samples)
{
    long k = kind == CV_CURV_FISHER_MC ? (mc_samples > 0 ? mc_samples : 1)
             : kind == CV_CURV_EF      ? 1
                                       : cv_model_output_dim(m);
    for (int l = 0; kind == CV_CURV_HESSIAN && l < m->nlayers; l++) {
        const cv_layer *L = &m->layers[l];
        if (L->cls->ops != &cv_activation_ops || L->in[0] < 1 ||
            ((const cv_activation *)L->cls->impl)->piecewise_linear ||
            !block_before(m, b, L->in[0]))
            continue;
        k += 2 * (long)cv_shape_numel(&L->in_shape);
    }
    return k;
}

typedef struct {
    cv_curvature kind;
    const cv_block *b;
    int per_sample;
    double *out;                 /* b->dim (per_sample: N x b->dim): the share is added here */
    double *dl[CV_MAX_LAYERS];   /* per active layer: P doubles (per_sample: n x P) */
    double *neg[CV_MAX_LAYERS];  /* Hessian: the negative residual terms, as dl */
    double **into;               /* dl or neg: where diag_visit adds */
    float *sq[CV_MAX_LAYERS];    /* layers with diag_sq_add (not per sample): n x out_numel */
} diag_job;

/* Floats one cotangent buffer of the output factor's walk may span (1 MB)
 * when every active layer sums its squared cotangents over the walks
 * (diag_sq_add): the number of walks then costs no products, and small
 * chunks keep the walk's buffers in cache and the fresh pages it touches
 * few.  Up to DIAG_WALK_ALL_FLOATS (16 MB) all the output factor's vectors
 * go in one walk instead, so that a Linear layer after a ReLU gets every
 * vector of a sample at once and skips the units the ReLU switched off
 * (engine/linear_sparse.h; the bench MLP at N = 512: 9 vectors). */
#define DIAG_WALK_FLOATS ((size_t)1 << 18)
#define DIAG_WALK_ALL_FLOATS ((size_t)1 << 22)

/* Vectors per walk on the squared-cotangent path (the narrow factor's).
 * All of them in one walk when they are at most as many as one product
 * takes (max_vectors, set by a job: its memory plan measured products of
 * that many, so the walk's pooled buffers are no larger than a product's; 0,
 * an engine without a plan: no bound), else chunks of at most
 * DIAG_WALK_FLOATS. */
static int sq_walk_k(const cv_part *c, cv_curvature kind)
{
    size_t per = (size_t)c->n * c->max_numel;
    size_t planned = c->opt.base.max_vectors > 0 ? (size_t)c->opt.base.max_vectors : SIZE_MAX;
    size_t cols = (size_t)cv_part_kron_columns(c, kind, 1);
    if (per * cols <= DIAG_WALK_ALL_FLOATS && cols <= planned)
        return (int)cols;
    return per >= DIAG_WALK_FLOATS ? 1 : (int)(DIAG_WALK_FLOATS / (per ? per : 1));
}

/* sq rows [lo, hi) += the squares of the k cotangents' rows (vector by vector,
 * so every entry sums in the same order whatever the split) */
typedef struct {
    const float *cot;
    float *sq;
    size_t m, n;
    int k;
} sq_job;

static void sq_range(void *p, size_t lo, size_t hi)
{
    const sq_job *q = p;
    for (size_t i = lo; i < hi; i++) {
        float *restrict s = q->sq + i * q->m;
        for (int v = 0; v < q->k; v++) {
            const float *restrict g = q->cot + ((size_t)v * q->n + i) * q->m;
            for (size_t t = 0; t < q->m; t++)
                s[t] += g[t] * g[t];
        }
    }
}

static int diag_visit(cv_part *c, int l, int k, const float *cot, void *arg, cv_err *e)
{
    diag_job *j = arg;
    if (j->sq[l] && j->into == j->dl) {
        sq_job q = {cot, j->sq[l], c->numel[l + 1], (size_t)c->n, k};
        cv_parallel_for(q.n, cv_parallel_grain(q.m * (size_t)k), sq_range, &q);
        return 0;
    }
    if (c->ops[l]->diag_add(&c->ctx[l], k, cot, j->per_sample, j->into[l]))
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "",
                          "exact diagonal of layers[%d] (scratch)", l);
    return 0;
}

/* out[block offset of slot (l, i)] += dl[l][its place in the layer's vector]
 * (per_sample: row first + s of out from row s of dl[l]). */
static void place(cv_part *c, const char *active, diag_job *j)
{
    int rows = j->per_sample ? c->n : 1;
    for (int l = 0; l < c->L; l++)
        for (int i = 0; active[l] && i < c->m->layers[l].nparams; i++) {
            long p = c->bpos[c->uid[l][i]];
            if (p < 0)
                continue;
            size_t n = c->m->layers[l].params[i].numel;
            for (int s = 0; s < rows; s++) {
                const double *src = j->dl[l] + (size_t)s * c->ctx[l].nparam + c->loc[l][i];
                double *dst = j->out + p +
                              (j->per_sample ? (c->opt.first + (size_t)s) * j->b->dim : 0);
                for (size_t q = 0; q < n; q++)
                    dst[q] += src[q];
            }
        }
}

/* ---- the Hessian's residual terms -------------------------------------------
 * An elementwise activation l (a = phi(z)) adds sum_n sum_u r_nu (dz_nu/dtheta)^2
 * to the diagonal, r = phi''(z) . dL/da (BackPACK's DiagHessian): the unit
 * vectors e_u of z scaled by sqrt(max(r, 0)) and by sqrt(max(-r, 0)) are
 * backpropagated from z through the layers before it (two walks: the second's
 * squares are subtracted), U = z's numel columns per sample, in chunks. */

/* live: the layers that are live for the block and lead to activation a. */
static void ancestors(const cv_part *c, int a, const char *active, char *live)
{
    char anc[CV_MAX_LAYERS] = {0};
    if (a > 0)
        anc[a - 1] = 1;
    for (int l = a - 1; l >= 0; l--)
        for (int i = 0; anc[l] && i < c->m->layers[l].nin; i++)
            if (c->m->layers[l].in[i] > 0)
                anc[c->m->layers[l].in[i] - 1] = 1;
    cv_part_live(c, active, live);
    for (int l = 0; l < c->L; l++)
        live[l] = live[l] && anc[l];
}

typedef struct {
    diag_job *j;
    int k;
} residual_walk;

static int residual_visit(cv_part *c, int l, const float *cot, void *arg, cv_err *e)
{
    const residual_walk *r = arg;
    return diag_visit(c, l, r->k, cot, r->j, e);
}

static int residual_walks(cv_part *c, diag_job *j, const char *active, int l, cv_err *e)
{
    const cv_layer *L = &c->m->layers[l];
    const cv_layer_ctx *x = &c->ctx[l];
    int a = L->in[0];
    if (!x->d2 || a < 1)
        return 0; /* piecewise linear (phi'' = 0), or the model input: no parameters before */
    char live[CV_MAX_LAYERS];
    ancestors(c, a, active, live);
    int any = 0;
    for (int q = 0; q < c->L; q++)
        any |= live[q] && active[q];
    if (!any)
        return 0;
    size_t U = c->numel[a], n = (size_t)c->n;
    /* the loss cotangents, and pooled buffers for chunk units (as many as
     * the output factor has columns, at most 32) */
    int chunk = c->C < 32 ? c->C : 32;
    if (cv_part_ensure_gy(c, e) || cv_part_prepare_walk(c, CV_CURV_GGN, chunk, e))
        return -1;
    for (int sign = 0; sign < 2; sign++) {
        j->into = sign ? j->neg : j->dl;
        for (size_t u0 = 0; u0 < U; u0 += (size_t)chunk) {
            int kk = U - u0 < (size_t)chunk ? (int)(U - u0) : chunk;
            float *top = cv_part_pool_take(c);
            cv_walk *w = top ? calloc(1, sizeof *w) : NULL;
            if (!w) {
                cv_part_pool_give(c, top);
                return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "Hessian residual");
            }
            memset(top, 0, sizeof(float) * (size_t)kk * n * U);
            for (int q = 0; q < kk; q++)
                for (size_t i = 0; i < n; i++) {
                    size_t at = i * U + u0 + (size_t)q;
                    double r = (double)x->d2[at] * (double)c->gy[l][at];
                    r = sign ? -r : r;
                    top[((size_t)q * n + i) * U + u0 + (size_t)q] = r > 0 ? (float)sqrt(r) : 0;
                }
            residual_walk rw = {j, kk};
            w->k = kk;
            w->active = active;
            w->live = live;
            w->at_layer = residual_visit;
            w->arg = &rw;
            int rc = cv_part_walk_from(c, w, a, top, e);
            free(w);
            if (rc)
                return -1;
        }
    }
    j->into = j->dl;
    return 0;
}

static int hessian_residuals(cv_part *c, diag_job *j, const char *active, cv_err *e)
{
    for (int l = 0; l < c->L; l++)
        if (c->ops[l] == &cv_activation_ops && residual_walks(c, j, active, l, e))
            return -1;
    return 0;
}

/* 1 when active layer l's share can come from its summed squared cotangents. */
static int sq_path(const cv_part *c, const diag_job *j, int l)
{
    const cv_layer_ops *o = c->ops[l];
    return !j->per_sample && o->diag_sq_add && o->diag_sq_add(&c->ctx[l], NULL, NULL) == 0;
}

/* The output factor's walk: layers on the squared-cotangent path sum sq
 * over every walk (then one diag_sq_add each), the walk then takes small
 * chunks when all active layers are on it (the same sums, fewer bytes). */
static int output_walk(cv_part *c, diag_job *j, const char *active, cv_err *e)
{
    int all = 1, rc = 0;
    for (int l = 0; l < c->L && !rc; l++) {
        j->sq[l] = NULL;
        if (!active[l])
            continue;
        if (!sq_path(c, j, l))
            all = 0;
        else if (!(j->sq[l] = calloc((size_t)c->n * c->numel[l + 1] + 1, sizeof(float))))
            rc = cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "exact diagonal of layers[%d]",
                            l);
    }
    cv_curvature kind = j->kind == CV_CURV_HESSIAN ? CV_CURV_GGN : j->kind;
    int k = sq_walk_k(c, kind);
    j->into = j->dl;
    if (!rc)
        rc = all ? cv_part_kron_walk_k(c, kind, active, k, 1, diag_visit, j, NULL, e)
                 : cv_part_kron_walk(c, kind, active, 1, diag_visit, j, NULL, e);
    for (int l = 0; l < c->L && !rc; l++)
        if (j->sq[l] && c->ops[l]->diag_sq_add(&c->ctx[l], j->sq[l], j->dl[l]))
            rc = cv_err_set(e, CV_ENOMEM, "out_of_memory", "",
                            "exact diagonal of layers[%d] (scratch)", l);
    for (int l = 0; l < c->L; l++) {
        free(j->sq[l]);
        j->sq[l] = NULL;
    }
    return rc;
}

static int diag_share(cv_part *c, void *arg, cv_err *e)
{
    diag_job *j = arg;
    char active[CV_MAX_LAYERS], live[CV_MAX_LAYERS];
    cv_part_mark_block(c, j->b, active, live);
    int rc = 0, hess = j->kind == CV_CURV_HESSIAN;
    for (int l = 0; l < c->L && !rc; l++) {
        j->dl[l] = j->neg[l] = NULL;
        size_t len = c->ctx[l].nparam * (j->per_sample ? (size_t)c->n : 1) + 1;
        if (active[l] && (!(j->dl[l] = calloc(len, sizeof(double))) ||
                          (hess && !(j->neg[l] = calloc(len, sizeof(double))))))
            rc = cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "exact diagonal of layers[%d]",
                            l);
    }
    if (!rc) /* the Hessian: the GGN part, then the activations' residual terms */
        rc = output_walk(c, j, active, e);
    if (!rc && hess)
        rc = hessian_residuals(c, j, active, e);
    if (!rc) {
        for (int l = 0; hess && l < c->L; l++) {
            size_t len = c->ctx[l].nparam * (j->per_sample ? (size_t)c->n : 1);
            for (size_t q = 0; j->neg[l] && q < len; q++)
                j->dl[l][q] -= j->neg[l][q];
        }
        cv_part_mark_block(c, j->b, active, live); /* bpos again: the walk may use it */
        place(c, active, j);
    }
    for (int l = 0; l < c->L; l++) {
        free(j->dl[l]);
        free(j->neg[l]);
        j->dl[l] = j->neg[l] = NULL;
    }
    return rc;
}

int cv_curv_diag_backprop(cv_curv *c, cv_curvature kind, const cv_block *b, int per_sample,
                          double *d, cv_err *e)
{
    if (cv_curv_agree(c, cv_diag_backprop_check(cv_curv_model(c), kind, b, e), e))
        return -1;
    diag_job *j = calloc(1, sizeof *j);
    if (cv_curv_agree(c, j ? 0 : cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "exact diagonal"),
                      e)) {
        free(j);
        return -1;
    }
    j->kind = kind;
    j->b = b;
    j->per_sample = per_sample != 0;
    j->out = d;
    size_t len = b->dim * (per_sample ? cv_curv_batch_size(c) : 1);
    int rc = cv_curv_sum_parts(c, diag_share, j, d, len, e);
    free(j);
    if (rc)
        return -1;
    const cv_curv_options *co = cv_curv_get_options(c);
    double cs = cv_curv_loss_state(c)->scale;
    int M = co->mc_samples > 0 ? co->mc_samples : 1;
    double w = kind == CV_CURV_FISHER_MC ? cs / M : kind == CV_CURV_EF ? cs : 1.0;
    for (size_t q = 0; q < len; q++)
        d[q] *= w;
    return 0;
}
