/* kron.c - the Kronecker factors of a batch (API in kron.h): which layers
 * have a Kronecker structure and which per-layer blocks (or parts of one
 * spanning several layers) do not, the sum of
 * the micro-batches' shares (engine/part_kron.c) over the ranks, and the
 * scaling of the factors; the fisher-type and approximation names. */
#include "kron.h"

#include <stdio.h>
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

/* The place in block b of tensor t, or -1. */
static int place_in_block(const cv_block *b, int t)
{
    for (int i = 0; i < b->count; i++)
        if (b->idx[i] == t)
            return i;
    return -1;
}

/* A Kronecker layer: the kron kernels, one input, its own untied weight
 * (and bias), a structure kron_dims accepts.  Its tensors lie in one
 * per-layer block (cv_blocks_per_layer puts a layer's own tensors
 * together), alone or beside other layers' (a module expanded into several
 * layers: MultiheadAttention's two projections). */
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

/* The name of a Kronecker layer's sub-block of a block spanning several
 * layers: its weight's name without the ".weight" / "_weight" suffix
 * ("attn.in_proj", "attn.out_proj"), else the weight's name. */
static void sub_block_name(const cv_model *m, int t, cv_block *b)
{
    const char *w = cv_model_param(m, t)->name;
    size_t n = strlen(w);
    static const char *const sfx[] = {".weight", "_weight"};
    for (int i = 0; i < 2; i++) {
        size_t k = strlen(sfx[i]);
        if (n > k && strcmp(w + n - k, sfx[i]) == 0) {
            n -= k;
            break;
        }
    }
    snprintf(b->name, sizeof b->name, "%.*s", (int)(n < sizeof b->name ? n : sizeof b->name - 1),
             w);
}

/* Adds layer l (dims da x db, its tensors in block b) as a factor: block b
 * itself when it holds just this layer, else the layer's tensors. */
static int add_factor(const cv_model *m, const cv_block *b, int l, int da, int db,
                      int tid[][CV_MAX_LAYER_PARAMS], cv_kron *out, size_t *len, cv_err *e)
{
    cv_kron_factor *f = &out->factors[out->nfactors];
    if (block_is_layer(b, m, l, tid)) {
        f->block = *b;
    } else {
        if (cv_block_from_indices(m, tid[l], m->layers[l].nparams, &f->block, e))
            return -1;
        sub_block_name(m, tid[l][0], &f->block);
    }
    out->nfactors++;
    f->layer = l;
    f->has_bias = m->layers[l].nparams > 1;
    f->dim_a = da;
    f->dim_b = db;
    *len += (size_t)da * da + (size_t)db * db;
    return 0;
}

/* Block b's Kronecker layers become factors (in layer order); its other
 * tensors, each run of consecutive ones, exact blocks (named as b). */
static int classify_block(const cv_model *m, const cv_block *b, int tid[][CV_MAX_LAYER_PARAMS],
                          const int *users, cv_kron *out, size_t *len, cv_err *e)
{
    char covered[2 * CV_MAX_LAYERS] = {0};
    int nk = 0;
    for (int l = 0; l < m->nlayers; l++) {
        int da = 0, db = 0;
        if (m->layers[l].nparams < 1 || tid[l][0] < 0 || place_in_block(b, tid[l][0]) < 0 ||
            !kron_layer(m, l, tid, users, &da, &db))
            continue;
        if (add_factor(m, b, l, da, db, tid, out, len, e))
            return -1;
        for (int i = 0; i < m->layers[l].nparams; i++)
            covered[place_in_block(b, tid[l][i])] = 1;
        nk++;
    }
    if (!nk) {
        out->exact[out->nexact++] = *b;
        return 0;
    }
    for (int i = 0; i < b->count;) {
        int run[2 * CV_MAX_LAYERS], n = 0;
        for (; i < b->count && !covered[i]; i++)
            run[n++] = b->idx[i];
        if (n) {
            cv_block *x = &out->exact[out->nexact++];
            if (cv_block_from_indices(m, run, n, x, e))
                return -1;
            snprintf(x->name, sizeof x->name, "%s", b->name);
        }
        for (; i < b->count && covered[i]; i++)
            ;
    }
    return 0;
}

static int by_first_tensor(const void *a, const void *b)
{
    return ((const cv_block *)a)->idx[0] - ((const cv_block *)b)->idx[0];
}

static int factor_by_layer(const void *a, const void *b)
{
    return ((const cv_kron_factor *)a)->layer - ((const cv_kron_factor *)b)->layer;
}

/* Fills out->factors (in layer order) / out->exact (in tensor order) from
 * the per-layer blocks; *len = the doubles of every A and B. */
static int classify(const cv_model *m, cv_kron *out, size_t *len, cv_err *e)
{
    int (*tid)[CV_MAX_LAYER_PARAMS] = calloc((size_t)m->nlayers + 1, sizeof *tid);
    int *users = calloc(2 * (size_t)m->nlayers + 1, sizeof(int));
    int nb = cv_blocks_per_layer(m, NULL, 0), np = cv_model_param_count(m);
    cv_block *bl = calloc((size_t)nb + 1, sizeof(cv_block));
    /* at most one factor per layer; exact blocks: at most one per tensor */
    out->factors = calloc((size_t)m->nlayers + 1, sizeof(cv_kron_factor));
    out->exact = calloc((size_t)np + 1, sizeof(cv_block));
    int rc = 0;
    if (!tid || !users || !bl || !out->factors || !out->exact)
        rc = cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "Kronecker layers");
    if (!rc) {
        tensor_ids(m, tid, users);
        cv_blocks_per_layer(m, bl, nb);
    }
    *len = 0;
    for (int b = 0; b < nb && !rc; b++)
        rc = classify_block(m, &bl[b], tid, users, out, len, e);
    if (!rc) {
        qsort(out->factors, (size_t)out->nfactors, sizeof *out->factors, factor_by_layer);
        qsort(out->exact, (size_t)out->nexact, sizeof *out->exact, by_first_tensor);
    }
    free(tid);
    free(users);
    free(bl);
    return rc;
}

/* ---- the factors ---------------------------------------------------------------- */

typedef struct {
    cv_part_kron job;
    int columns;
    double gmax[CV_MAX_LAYERS];   /* ACP's heuristic: this rank's max over micro-batches */
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

int cv_kron_sizes_of(const cv_model *m, cv_kron_sizes *out, cv_err *e)
{
    cv_kron k = {0};
    size_t len = 0;
    memset(out, 0, sizeof *out);
    int rc = classify(m, &k, &len, e);
    for (int i = 0; !rc && i < k.nfactors; i++) {
        double da = k.factors[i].dim_a, db = k.factors[i].dim_b;
        out->square += da * da + db * db;
        out->product += da * db;
        out->linear += da + db;
    }
    out->nfactors = rc ? 0 : k.nfactors;
    cv_kron_free(&k);
    return rc;
}

/* ACP: B = alpha I with the given alpha or the heuristic's N c max (dl/dz)^2
 * from the walk's squared maxima (this rank's, max-reduced over the ranks
 * here); rank_b: B's rank. */
static int acp_output_factors(cv_curv *c, const cv_kron_options *o, cv_kron *out, double *gmax,
                              cv_err *e)
{
    double mx[CV_MAX_LAYERS] = {0};
    for (int i = 0; i < out->nfactors; i++)
        mx[i] = gmax[out->factors[i].layer];
    if (o->acp_alpha <= 0 &&
        cv_comm_reduce(cv_curv_get_options(c)->comm, 0, mx, (size_t)out->nfactors, CV_COMM_F64,
                       CV_COMM_MAX, cv_curv_get_options(c)->progress, e))
        return -1;
    double N = (double)cv_curv_batch_size(c), cs = cv_curv_loss_state(c)->scale;
    for (int i = 0; i < out->nfactors; i++) {
        cv_kron_factor *f = &out->factors[i];
        f->alpha = o->acp_alpha > 0 ? o->acp_alpha : N * cs * mx[i];
        memset(f->B, 0, sizeof(double) * (size_t)f->dim_b * f->dim_b);
        for (int j = 0; j < f->dim_b; j++)
            f->B[(size_t)j * f->dim_b + j] = f->alpha;
        f->rank_b = f->alpha != 0 ? f->dim_b : 0;
    }
    out->columns = o->acp_alpha > 0 ? 0 : 1;
    return 0;
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
    kron_share s = {{cv_kron_fisher_curvature(opt.fisher_type), opt.approx, NULL, {0}, {0}, 0,
                     NULL},
                    0,
                    {0}};
    if (opt.acp) { /* no B: A, and for the heuristic the sample gradients' walk */
        s.job.kind = CV_CURV_EF;
        s.job.acp = 1;
        s.job.gmax = opt.acp_alpha > 0 ? NULL : s.gmax;
    }
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
    if (opt.acp)
        return acp_output_factors(c, &opt, out, s.gmax, e);
    out->columns = opt.fisher_type == CV_KRON_TYPE2 ? cv_model_output_dim(m)
                   : opt.fisher_type == CV_KRON_MC  ? (co->mc_samples > 0 ? co->mc_samples : 1)
                                                    : 1;
    return 0;
}
