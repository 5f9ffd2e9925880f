/* layer_embedding.c - torch.nn.Embedding: y[t] = W[id_t], W [V, d], for the
 * token ids id_t the input holds as exact float values; its class and
 * kernels.  Forward refuses ids that are not integers in [0, V).  The input
 * is integer: it gets no cotangent (gx is zeroed) and tangents are ignored.
 * The output is linear in W, so there are no second-order terms.  As in
 * PyTorch the padding_idx row gets no gradient; the Jacobian leaves it out
 * too (forward still reads it), so that J and J^T stay adjoint.
 * Per-sample gradients scatter-add the cotangent rows; the Gram kernel
 * matches tokens: G[r, r'] = sum_{t, t': id_it = id_i't'} s_rt . s_r't'. */
#include "layer_embedding.h"
#include "layer_passthrough.h"

#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "im2col.h"

#define ATTR(c) CV_LAYER_ATTR((c)->L, cv_embedding_attr)
#define DIM(c) ((size_t)ATTR(c)->embedding_dim)

/* token ids per sample (T) */
static size_t tokens(const cv_layer_ctx *c) { return c->in_numel; }

/* The id of token t (batch layout), or -1 for the padding row. */
static inline int token(const cv_layer_ctx *c, size_t t)
{
    int id = (int)c->x[t];
    return id == ATTR(c)->padding_idx ? -1 : id;
}

/* Every id of x (n samples of per tokens) an integer in [0, V). */
static int check_ids(const float *x, size_t n, size_t per, int V, cv_err *e)
{
    for (size_t t = 0; t < n * per; t++) {
        float v = x[t];
        if (!(v >= 0 && v < V && v == floorf(v)))
            return cv_err_set(e, CV_EINVAL, "invalid_data", "x",
                              "x: token id %g at sample %zu, position %zu is not an integer in "
                              "[0, %d) (Embedding num_embeddings)",
                              (double)v, t / per, t % per, V);
    }
    return 0;
}

static int emb_check_input(const cv_layer *L, const float *x, size_t n, cv_err *e)
{
    return check_ids(x, n, cv_shape_numel(&L->in_shape),
                     CV_LAYER_ATTR(L, cv_embedding_attr)->num_embeddings, e);
}

static int emb_forward(cv_layer_ctx *c, float *y, cv_err *e)
{
    size_t nt = (size_t)c->n * tokens(c), d = DIM(c);
    if (check_ids(c->x, (size_t)c->n, tokens(c), ATTR(c)->num_embeddings, e))
        return -1;
    for (size_t t = 0; t < nt; t++)
        memcpy(y + t * d, c->theta + (size_t)c->x[t] * d, sizeof(float) * d);
    return 0;
}

/* gt += scatter of the cotangent rows of tokens [t0, t1) (batch layout) */
static void scatter(const cv_layer_ctx *c, const float *gy, size_t t0, size_t t1, float *gt)
{
    size_t d = DIM(c);
    for (size_t t = t0; t < t1; t++) {
        int id = token(c, t);
        if (id < 0)
            continue;
        float *w = gt + (size_t)id * d;
        const float *g = gy + t * d;
        for (size_t i = 0; i < d; i++)
            w[i] += g[i];
    }
}

static void emb_vjp(const cv_layer_ctx *c, int k, const float *gy, float *gx, float *gtheta)
{
    size_t nt = (size_t)c->n * tokens(c), d = DIM(c);
    if (gx)
        memset(gx, 0, sizeof(float) * (size_t)k * c->n * c->in_numel);
    for (int j = 0; gtheta && j < k; j++) {
        float *gt = gtheta + (size_t)j * c->nparam;
        memset(gt, 0, sizeof(float) * c->nparam);
        scatter(c, gy + (size_t)j * nt * d, 0, nt, gt);
    }
}

static void emb_jvp(const cv_layer_ctx *c, int k, const float *rx, const float *vtheta,
                    float *ry)
{
    size_t nt = (size_t)c->n * tokens(c), d = DIM(c);
    for (int j = 0; j < k; j++) {
        const float *V = vtheta ? vtheta + (size_t)j * c->nparam : NULL;
        float *r = ry + (size_t)j * nt * d;
        for (size_t t = 0; t < nt; t++) {
            int id = token(c, t);
            if (V && id >= 0)
                memcpy(r + t * d, V + (size_t)id * d, sizeof(float) * d);
            else
                memset(r + t * d, 0, sizeof(float) * d);
        }
    }
}

static void emb_hvp_extra(const cv_layer_ctx *c, int k, const float *gy, const float *rx,
                          const float *vtheta, float *gx_add, float *gtheta_add)
{
}

/* no second-order terms: nothing to add to q */
static void emb_quad_extra(const cv_layer_ctx *c, int k, const float *gy, const float *rx,
                           const float *vtheta, double *q)
{
}

static void emb_per_sample(const cv_layer_ctx *c, const float *gy, float *G)
{
    size_t T = tokens(c);
    for (int i = 0; i < c->n; i++) {
        float *g = G + (size_t)i * c->nparam;
        memset(g, 0, sizeof(float) * c->nparam);
        scatter(c, gy, (size_t)i * T, (size_t)(i + 1) * T, g);
    }
}

/* Exact diagonal (layer.h diag_add) without forming the n x V x d per-sample
 * gradients: for each (vector, sample) and each distinct id of the sample
 * (first position t), the sum of its rows' cotangents, squared into W's row
 * id (or the sample's own row with per_sample). */
static int emb_diag_add(const cv_layer_ctx *c, int k, const float *gy, int per_sample,
                        double *d)
{
    size_t T = tokens(c), dm = DIM(c), n = (size_t)c->n;
    double *v = malloc(sizeof(double) * (dm + 1));
    if (!v)
        return -1;
    for (size_t ji = 0; ji < (size_t)k * n; ji++) {
        size_t i = ji % n, t0 = i * T;
        const float *g = gy + ji * T * dm;
        double *di = per_sample ? d + i * c->nparam : d;
        for (size_t t = 0; t < T; t++) {
            int id = token(c, t0 + t), seen = id < 0;
            for (size_t u = 0; u < t && !seen; u++)
                seen = token(c, t0 + u) == id;
            if (seen)
                continue;
            for (size_t q = 0; q < dm; q++)
                v[q] = 0;
            for (size_t u = t; u < T; u++) {
                if (token(c, t0 + u) != id)
                    continue;
                for (size_t q = 0; q < dm; q++)
                    v[q] += g[u * dm + q];
            }
            double *w = di + (size_t)id * dm;
            for (size_t q = 0; q < dm; q++)
                w[q] += v[q] * v[q];
        }
    }
    free(v);
    return 0;
}

/* One distinct token of one sample: its id and its slot among the sample's
 * distinct tokens. */
typedef struct {
    int id, sample, slot;
} tok_entry;

static int by_id(const void *a, const void *b)
{
    const tok_entry *p = a, *q = b;
    return p->id != q->id ? (p->id > q->id) - (p->id < q->id)
                          : (p->sample > q->sample) - (p->sample < q->sample);
}

/* Token-match Gram: per sample, the cotangent rows of equal ids summed into
 * one row per distinct id (agg); then for each id, the rows (j, sample) that
 * hold it form B (m x d) and G gets B B^T at those rows. */
static int gram_tokens(const cv_layer_ctx *c, int k, const float *gy, double *G)
{
    size_t n = (size_t)c->n, T = tokens(c), d = DIM(c), R = (size_t)k * n;
    int *slot = malloc(sizeof(int) * n * T);
    tok_entry *ent = malloc(sizeof(tok_entry) * n * T);
    float *agg = calloc(R * T * d, sizeof(float));
    float *B = malloc(sizeof(float) * R * d);
    float *S = malloc(sizeof(float) * R * R);
    size_t *rows = malloc(sizeof(size_t) * R);
    int ok = slot && ent && agg && B && S && rows;
    size_t ne = 0;
    for (size_t i = 0; ok && i < n; i++) { /* distinct ids of sample i, in order of appearance */
        int nd = 0;
        for (size_t t = 0; t < T; t++) {
            int id = token(c, i * T + t), s = -1;
            for (size_t q = ne - (size_t)nd; id >= 0 && q < ne; q++)
                if (ent[q].id == id)
                    s = ent[q].slot;
            if (id >= 0 && s < 0) {
                ent[ne++] = (tok_entry){id, (int)i, nd};
                s = nd++;
            }
            slot[i * T + t] = s;
        }
    }
    for (size_t r = 0; ok && r < R; r++) {
        size_t i = r % n;
        for (size_t t = 0; t < T; t++) {
            if (slot[i * T + t] < 0)
                continue;
            float *a = agg + (r * T + (size_t)slot[i * T + t]) * d;
            const float *g = gy + (r * T + t) * d;
            for (size_t q = 0; q < d; q++)
                a[q] += g[q];
        }
    }
    if (ok)
        qsort(ent, ne, sizeof *ent, by_id);
    for (size_t a = 0; ok && a < ne;) {
        size_t b = a, m = 0;
        while (b < ne && ent[b].id == ent[a].id)
            b++;
        for (int j = 0; j < k; j++)
            for (size_t q = a; q < b; q++) {
                size_t r = (size_t)j * n + (size_t)ent[q].sample;
                rows[m] = r;
                memcpy(B + m * d, agg + (r * T + (size_t)ent[q].slot) * d, sizeof(float) * d);
                m++;
            }
        cblas_ssyrk(CblasRowMajor, CblasUpper, CblasNoTrans, (int)m, (int)d, 1.0f, B, (int)d,
                    0.0f, S, (int)m);
        for (size_t p = 0; p < m; p++)
            for (size_t q = p; q < m; q++) {
                double v = S[p * m + q];
                G[rows[p] * R + rows[q]] += v;
                if (q != p)
                    G[rows[q] * R + rows[p]] += v;
            }
        a = b;
    }
    free(slot);
    free(ent);
    free(agg);
    free(B);
    free(S);
    free(rows);
    return ok ? 0 : -1;
}

static void emb_gram_add(const cv_layer_ctx *c, int k, const float *gy, unsigned mask,
                         double *G)
{
    size_t R = (size_t)k * c->n;
    if ((mask & 1u) && gram_tokens(c, k, gy, G))
        for (size_t i = 0; i < R * R; i++)
            G[i] = NAN;
}

static const cv_layer_ops embedding_ops = {
    .diag_add = emb_diag_add,
    .work_size = cv_no_work,
    .forward = emb_forward,
    .vjp = emb_vjp,
    .jvp = emb_jvp,
    .hvp_extra = emb_hvp_extra,
    .per_sample = emb_per_sample,
    .gram_add = emb_gram_add,
    .quad_extra = emb_quad_extra,
};

/* ---- class ----------------------------------------------------------------- */

static int embedding_check(cv_layer *L, cv_err *e)
{
    cv_embedding_attr *a = CV_LAYER_ATTR(L, cv_embedding_attr);
    int V = a->num_embeddings;
    if (a->padding_idx == CV_EMBEDDING_NO_PADDING)
        return 0;
    if (a->padding_idx < -V || a->padding_idx >= V)
        return cv_err_set(e, CV_EINVAL, "invalid_value", "padding_idx",
                          "padding_idx: %d must be within num_embeddings (in [%d, %d))",
                          a->padding_idx, -V, V);
    if (a->padding_idx < 0) /* as PyTorch stores it */
        a->padding_idx += V;
    return 0;
}

static int embedding_infer(cv_layer *L, const cv_shape *in, cv_err *e)
{
    const cv_embedding_attr *a = CV_LAYER_ATTR(L, cv_embedding_attr);
    char s[64];
    cv_shape_str(in, s, sizeof s);
    if (in->rank >= CV_MAX_RANK)
        return cv_err_set(e, CV_EINVAL, "invalid_model", "",
                          "per-sample input %s: the output [..., %d] would have more than %d "
                          "dimensions",
                          s, a->embedding_dim, CV_MAX_RANK);
    L->out_shape = *in;
    L->out_shape.dim[L->out_shape.rank++] = a->embedding_dim;
    return 0;
}

static int embedding_layout(cv_layer *L)
{
    const cv_embedding_attr *a = CV_LAYER_ATTR(L, cv_embedding_attr);
    int dims[2] = {a->num_embeddings, a->embedding_dim};
    return cv_layer_add_param(L, "weight", 2, dims);
}

static const cv_field embedding_fields[] = {
    CV_FIELD_INT_REQ("num_embeddings", cv_embedding_attr, num_embeddings, 1),
    CV_FIELD_INT_REQ("embedding_dim", cv_embedding_attr, embedding_dim, 1),
    {.name = "padding_idx", .kind = CV_F_INT, .flags = CV_F_NULLABLE,
     .offset = offsetof(cv_embedding_attr, padding_idx), .def = CV_EMBEDDING_NO_PADDING,
     .min = -CV_ATTR_INT_LIMIT},
    {.name = "max_norm", .kind = CV_F_FIXED_NULL, .offset = CV_F_NOSTORE},
    {.name = "norm_type", .kind = CV_F_IGNORED, .flags = CV_F_ACCEPT_NUMBER | CV_F_HIDDEN,
     .offset = CV_F_NOSTORE},
    {.name = "scale_grad_by_freq", .kind = CV_F_FIXED_BOOL, .offset = CV_F_NOSTORE, .def = 0,
     .text = "gradients scaled by token frequency are not supported"},
    {.name = "sparse", .kind = CV_F_FIXED_BOOL, .offset = CV_F_NOSTORE, .def = 0,
     .text = "sparse gradients are not supported"},
};

const cv_layer_class cv_embedding_class = {
    .check_input = emb_check_input,
    .name = "Embedding", .attr_size = sizeof(cv_embedding_attr), CV_FIELDS(embedding_fields),
    .check = embedding_check, .infer = embedding_infer, .layout = embedding_layout,
    .ops = &embedding_ops, .function = "embedding"};
