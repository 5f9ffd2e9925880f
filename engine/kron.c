/* kron.c - the Kronecker factors of a batch (API in kron.h): which layers
 * have a Kronecker structure and which per-layer blocks do not, the sum of
 * the micro-batches' shares (engine/part_kron.c) over the ranks, and the
 * scaling of the factors; the fisher-type and approximation names. */
#include "kron.h"

#include <stdlib.h>
#include <string.h>

#include "bigmem.h"
#include "part.h"

static const char *const fisher_names[] = {"type-2", "mc", "empirical"};
static const char *const approx_names[] = {"expand", "reduce"};

cv_curvature cv_kron_fisher_curvature(cv_kron_fisher f)
{
    return f == CV_KRON_MC ? CV_CURV_FISHER_MC : f == CV_KRON_EMPIRICAL ? CV_CURV_EF : CV_CURV_GGN;
}

const char *cv_kron_fisher_name(cv_kron_fisher f)
{
    return (unsigned)f < 3 ? fisher_names[f] : "?";
}

int cv_kron_fisher_from_name(const char *s)
{
    for (int i = 0; s && i < 3; i++)
        if (strcmp(s, fisher_names[i]) == 0)
            return i;
    return -1;
}

const char *cv_kron_approx_name(cv_kron_approx a)
{
    return (unsigned)a < 2 ? approx_names[a] : "?";
}

int cv_kron_approx_from_name(const char *s)
{
    for (int i = 0; s && i < 2; i++)
        if (strcmp(s, approx_names[i]) == 0)
            return i;
    return -1;
}

size_t cv_kron_w_index(const cv_kron_factor *f, size_t i)
{
    size_t in = (size_t)(f->dim_a - f->has_bias), nw = (size_t)f->dim_b * in;
    return i < nw ? (i / in) * f->dim_a + i % in : (i - nw) * f->dim_a + in;
}

void cv_kron_free(cv_kron *k)
{
    if (!k)
        return;
    free(k->factors);
    free(k->exact);
    free(k->data);
    memset(k, 0, sizeof *k);
}

/* ---- which layers ------------------------------------------------------------ */

/* tid[l][i]: the state_dict index of layer l's tensor i (a shared tensor's
 * is its first use's, as cv_blocks_per_layer numbers them); users[t]: the
 * number of layers using tensor t. */
static int tensor_ids(const cv_model *m, int tid[][CV_MAX_LAYER_PARAMS], int *users)
{
    int t = 0;
    for (int l = 0; l < m->nlayers; l++) {
        const cv_layer *L = &m->layers[l];
        for (int i = 0; i < L->nparams; i++) {
            tid[l][i] = -1;
            if (!L->params[i].shared) {
                tid[l][i] = t++;
                continue;
            }
            for (int l2 = 0; l2 < l && tid[l][i] < 0; l2++)
                for (int i2 = 0; i2 < m->layers[l2].nparams; i2++)
                    if (m->layers[l2].params[i2].offset == L->params[i].offset)
                        tid[l][i] = tid[l2][i2];
        }
    }
    for (int l = 0; l < m->nlayers; l++)
        for (int i = 0; i < m->layers[l].nparams; i++)
            if (tid[l][i] >= 0)
                users[tid[l][i]]++;
    return t;
}

/* 1 when block b holds exactly layer l's tensors. */
static int block_is_layer(const cv_block *b, const cv_model *m, int l,
                          int tid[][CV_MAX_LAYER_PARAMS])
{
    if (b->count != m->layers[l].nparams)
        return 0;
    for (int i = 0; i < b->count; i++)
        if (b->idx[i] != tid[l][i])
            return 0;
    return 1;
}

/* A Kronecker layer: the kron kernels, one input, its own untied weight
 * (and bias) forming one per-layer block, a structure kron_dims accepts. */
static int kron_layer(const cv_model *m, int l, int tid[][CV_MAX_LAYER_PARAMS],
                      const int *users, int *da, int *db)
{
    const cv_layer *L = &m->layers[l];
    const cv_layer_ops *o = L->cls->ops;
    if (!o || !o->kron_dims || !o->kron_a_add || !o->kron_b_add || L->nin != 1 ||
        L->nparams < 1 || !o->kron_dims(L, da, db))
        return 0;
    for (int i = 0; i < L->nparams; i++)
        if (tid[l][i] < 0 || users[tid[l][i]] != 1 || L->params[i].shared)
            return 0;
    size_t numel = 0;
    for (int i = 0; i < L->nparams; i++)
        numel += L->params[i].numel;
    return numel == (size_t)*da * *db; /* weight + bias is W~ */
}

/* Fills out->factors / out->exact from the per-layer blocks; *len = the
 * doubles of every A and B. */
static int classify(const cv_model *m, cv_kron *out, size_t *len, cv_err *e)
{
    int (*tid)[CV_MAX_LAYER_PARAMS] = calloc((size_t)m->nlayers + 1, sizeof *tid);
    int *users = calloc(2 * (size_t)m->nlayers + 1, sizeof(int));
    int nb = cv_blocks_per_layer(m, NULL, 0);
    cv_block *bl = calloc((size_t)nb + 1, sizeof(cv_block));
    out->factors = calloc((size_t)nb + 1, sizeof(cv_kron_factor));
    out->exact = calloc((size_t)nb + 1, sizeof(cv_block));
    if (!tid || !users || !bl || !out->factors || !out->exact) {
        free(tid);
        free(users);
        free(bl);
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "Kronecker layers");
    }
    tensor_ids(m, tid, users);
    cv_blocks_per_layer(m, bl, nb);
    *len = 0;
    for (int b = 0; b < nb; b++) {
        int found = -1, da = 0, db = 0;
        for (int l = 0; l < m->nlayers && found < 0; l++)
            if (kron_layer(m, l, tid, users, &da, &db) && block_is_layer(&bl[b], m, l, tid))
                found = l;
        if (found < 0) {
            out->exact[out->nexact++] = bl[b];
            continue;
        }
        cv_kron_factor *f = &out->factors[out->nfactors++];
        f->layer = found;
        f->block = bl[b];
        f->has_bias = m->layers[found].nparams > 1;
        f->dim_a = da;
        f->dim_b = db;
        *len += (size_t)da * da + (size_t)db * db;
    }
    free(tid);
    free(users);
    free(bl);
    return 0;
}

/* ---- the factors ---------------------------------------------------------------- */

typedef struct {
    cv_part_kron job;
    int columns;
} kron_share;

static int kron_share_fn(cv_part *p, void *arg, cv_err *e)
{
    kron_share *s = arg;
    return cv_part_kron_add(p, &s->job, &s->columns, e);
}

static void scale(double *x, size_t n, double w)
{
    for (size_t i = 0; i < n; i++)
        x[i] *= w;
}

/* rank_a / rank_b: the rows summed into A and B (R positions per sample:
 * the layer's output numel over its output features; reduce sums them to one),
 * at most the dimension. */
static void rank_bounds(const cv_model *m, cv_kron_factor *f, cv_kron_approx approx, long N,
                        int mc_samples, cv_kron_fisher fisher)
{
    long R = (long)(cv_shape_numel(&m->layers[f->layer].out_shape) / (size_t)f->dim_b);
    long rows = N * (approx == CV_KRON_REDUCE || R < 1 ? 1 : R);
    long k = fisher == CV_KRON_TYPE2 ? cv_model_output_dim(m)
             : fisher == CV_KRON_MC  ? (mc_samples > 0 ? mc_samples : 1)
                                     : 1;
    f->rank_a = rows < f->dim_a ? rows : f->dim_a;
    f->rank_b = rows * k < f->dim_b ? rows * k : f->dim_b;
}

int cv_curv_kron(cv_curv *c, const cv_kron_options *o, cv_kron *out, cv_err *e)
{
    memset(out, 0, sizeof *out);
    cv_kron_options opt = o ? *o : (cv_kron_options){0};
    if ((unsigned)opt.fisher_type > CV_KRON_EMPIRICAL || (unsigned)opt.approx > CV_KRON_REDUCE)
        return cv_err_set(e, CV_EINVAL, "invalid_option", "options",
                          "unknown fisher_type or kfac_approx");
    const cv_model *m = cv_curv_model(c);
    size_t len = 0;
    int rc = classify(m, out, &len, e);
    /* not zeroed: cv_curv_sum_parts clears it (its first touch: huge pages) */
    if (!rc && !(out->data = cv_big_malloc(sizeof(double) * (len + 1))))
        rc = cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "Kronecker factors (%zu doubles)",
                        len);
    if (cv_curv_agree(c, rc, e))
        return -1;
    kron_share s = {{cv_kron_fisher_curvature(opt.fisher_type), opt.approx, NULL, {0}, {0}}, 0};
    char layers[CV_MAX_LAYERS] = {0};
    double *at = out->data;
    for (int i = 0; i < out->nfactors; i++) {
        cv_kron_factor *f = &out->factors[i];
        f->A = at;
        f->B = at + (size_t)f->dim_a * f->dim_a;
        at = f->B + (size_t)f->dim_b * f->dim_b;
        layers[f->layer] = 1;
        s.job.A[f->layer] = f->A;
        s.job.B[f->layer] = f->B;
    }
    s.job.layers = layers;
    if (cv_curv_sum_parts(c, kron_share_fn, &s, out->data, len, e))
        return -1;
    const cv_curv_options *co = cv_curv_get_options(c);
    double cs = cv_curv_loss_state(c)->scale, N = (double)cv_curv_batch_size(c);
    double w = opt.fisher_type == CV_KRON_MC          ? cs / (co->mc_samples > 0 ? co->mc_samples : 1)
               : opt.fisher_type == CV_KRON_EMPIRICAL ? cs
                                                      : 1.0;
    for (int i = 0; i < out->nfactors; i++) {
        cv_kron_factor *f = &out->factors[i];
        scale(f->A, (size_t)f->dim_a * f->dim_a, 1.0 / N);
        scale(f->B, (size_t)f->dim_b * f->dim_b, w);
    }
    for (int i = 0; i < out->nfactors; i++)
        rank_bounds(m, &out->factors[i], opt.approx, (long)N, co->mc_samples, opt.fisher_type);
    out->columns = opt.fisher_type == CV_KRON_TYPE2 ? cv_model_output_dim(m)
                   : opt.fisher_type == CV_KRON_MC  ? (co->mc_samples > 0 ? co->mc_samples : 1)
                                                    : 1;
    return 0;
}
