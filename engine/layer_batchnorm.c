/* layer_batchnorm.c - BatchNorm1d/2d in evaluation mode:
 * y = (x - running_mean) / sqrt(running_var + eps) * gamma + beta per channel.
 * gamma, beta (if affine) are curvature parameters; the running statistics
 * are buffers.  Forward caches per channel [scale, shift, invstd, mean] in
 * d1, with scale = gamma*invstd and shift = beta - mean*scale as PyTorch
 * computes it.  The map is bilinear in (x, gamma), whence its R-op terms. */
#include "layer_batchnorm.h"

#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "im2col.h"

#define ATTR(c) CV_LAYER_ATTR((c)->L, cv_batchnorm_attr)
#define CH(c) ((c)->L->in_shape.dim[0]) /* == num_features (bn_infer) */
#define SP(c) ((int)((c)->in_numel / (size_t)CH(c))) /* positions per channel */
#define SCALE(c) ((c)->d1)
#define SHIFT(c) ((c)->d1 + CH(c))
#define INVSTD(c) ((c)->d1 + 2 * CH(c))
#define MEAN(c) ((c)->d1 + 3 * CH(c))

static size_t bn_work(const cv_layer_ctx *c, int k)
{
    return (size_t)k * c->n * 2 * CH(c);
}

static int bn_forward(cv_layer_ctx *c, float *y, cv_err *e)
{
    const cv_layer *L = c->L;
    int C = CH(c), S = SP(c);
    if (!c->buffers || L->nbuffers < 2)
        return cv_err_set(e, CV_EINVAL, "invalid_model", "layers",
                          "%s needs running_mean and running_var", cv_layer_name(L));
    const float *mean = c->buffers;
    /* signed: a graph may share running_var with an earlier node (lower offset) */
    const float *var = c->buffers + ((ptrdiff_t)L->buffers[1].offset -
                                     (ptrdiff_t)L->buffers[0].offset);
    cv_layer_ctx_release(c);
    c->d1 = cv_layer_cache(c, sizeof(float) * 4 * (size_t)C);
    if (!c->d1)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "BatchNorm cache");
    double eps = ATTR(c)->eps;
    int affine = ATTR(c)->affine;
    for (int ch = 0; ch < C; ch++) {
        float inv = (float)(1.0 / sqrt((double)var[ch] + eps));
        float g = affine ? c->theta[ch] : 1.0f, b = affine ? c->theta[C + ch] : 0.0f;
        SCALE(c)[ch] = g * inv;
        SHIFT(c)[ch] = b - mean[ch] * SCALE(c)[ch];
        INVSTD(c)[ch] = inv;
        MEAN(c)[ch] = mean[ch];
    }
    for (int n = 0; n < c->n; n++)
        for (int ch = 0; ch < C; ch++) {
            const float *xp = c->x + (size_t)n * c->in_numel + (size_t)ch * S;
            float *yp = y + (size_t)n * c->in_numel + (size_t)ch * S;
            for (int p = 0; p < S; p++)
                yp[p] = xp[p] * SCALE(c)[ch] + SHIFT(c)[ch];
        }
    return 0;
}

/* out[s] (+)= a[ch] * in[s] over `count` samples of in_numel floats. */
static void channel_scale(const cv_layer_ctx *c, int count, const float *a, const float *in,
                          float *out, int add)
{
    int C = CH(c), S = SP(c);
    for (int s = 0; s < count; s++)
        for (int ch = 0; ch < C; ch++) {
            size_t o = (size_t)s * c->in_numel + (size_t)ch * S;
            for (int p = 0; p < S; p++)
                out[o + p] = (add ? out[o + p] : 0.0f) + a[ch] * in[o + p];
        }
}

/* Parameter gradient of sample i from cotangent g (in_numel floats), added
 * to gg (gamma, C) and gb (beta, C); either may be NULL. */
static void sample_param_grad(const cv_layer_ctx *c, int i, const float *g, float *gg,
                              float *gb)
{
    int C = CH(c), S = SP(c);
    const float *x = c->x + (size_t)i * c->in_numel;
    for (int ch = 0; ch < C; ch++) {
        const float *gp = g + (size_t)ch * S, *xp = x + (size_t)ch * S;
        float m = MEAN(c)[ch], inv = INVSTD(c)[ch], sg = 0, sb = 0;
        for (int p = 0; p < S; p++) {
            sg += gp[p] * ((xp[p] - m) * inv);
            sb += gp[p];
        }
        if (gg)
            gg[ch] += sg;
        if (gb)
            gb[ch] += sb;
    }
}

static void bn_vjp(const cv_layer_ctx *c, int k, const float *gy, float *gx, float *gtheta)
{
    int n = c->n, C = CH(c);
    if (gx)
        channel_scale(c, k * n, SCALE(c), gy, gx, 0);
    if (!gtheta || !ATTR(c)->affine)
        return;
    memset(gtheta, 0, sizeof(float) * (size_t)k * c->nparam);
    for (int j = 0; j < k; j++) {
        float *gt = gtheta + (size_t)j * c->nparam;
        for (int i = 0; i < n; i++)
            sample_param_grad(c, i, gy + ((size_t)j * n + i) * c->in_numel, gt, gt + C);
    }
}

/* ry_j += V_gamma ⊙ xhat + V_beta */
static void param_tangent(const cv_layer_ctx *c, int k, const float *vtheta, float *ry)
{
    int n = c->n, C = CH(c), S = SP(c);
    for (int j = 0; j < k; j++) {
        const float *vg = vtheta + (size_t)j * c->nparam, *vb = vg + C;
        for (int i = 0; i < n; i++)
            for (int ch = 0; ch < C; ch++) {
                const float *xp = c->x + (size_t)i * c->in_numel + (size_t)ch * S;
                float *r = ry + ((size_t)j * n + i) * c->in_numel + (size_t)ch * S;
                float m = MEAN(c)[ch], inv = INVSTD(c)[ch];
                for (int p = 0; p < S; p++)
                    r[p] += vg[ch] * ((xp[p] - m) * inv) + vb[ch];
            }
    }
}

static void bn_jvp(const cv_layer_ctx *c, int k, const float *rx, const float *vtheta,
                   float *ry)
{
    size_t len = (size_t)k * c->n * c->in_numel;
    if (rx)
        channel_scale(c, k * c->n, SCALE(c), rx, ry, 0);
    else
        memset(ry, 0, sizeof(float) * len);
    if (vtheta && ATTR(c)->affine)
        param_tangent(c, k, vtheta, ry);
}

/* gx_j += (V_gamma,j * invstd) ⊙ gy;  g_gamma,j += sum gy ⊙ rx_j * invstd */
static void bn_hvp_extra(const cv_layer_ctx *c, int k, const float *gy, const float *rx,
                         const float *vtheta, float *gx_add, float *gtheta_add)
{
    int n = c->n, C = CH(c), S = SP(c);
    if (!ATTR(c)->affine)
        return;
    for (int j = 0; j < k; j++) {
        if (gx_add && vtheta) {
            const float *vg = vtheta + (size_t)j * c->nparam;
            float *o = gx_add + (size_t)j * n * c->in_numel;
            for (int i = 0; i < n; i++)
                for (int ch = 0; ch < C; ch++) {
                    size_t off = (size_t)i * c->in_numel + (size_t)ch * S;
                    float a = vg[ch] * INVSTD(c)[ch];
                    for (int p = 0; p < S; p++)
                        o[off + p] += a * gy[off + p];
                }
        }
        if (gtheta_add && rx) {
            const float *r = rx + (size_t)j * n * c->in_numel;
            float *gg = gtheta_add + (size_t)j * c->nparam;
            for (int i = 0; i < n; i++)
                for (int ch = 0; ch < C; ch++) {
                    size_t off = (size_t)i * c->in_numel + (size_t)ch * S;
                    float s = 0;
                    for (int p = 0; p < S; p++)
                        s += gy[off + p] * r[off + p];
                    gg[ch] += s * INVSTD(c)[ch];
                }
        }
    }
}

static void bn_per_sample(const cv_layer_ctx *c, const float *gy, float *G)
{
    int C = CH(c);
    if (!ATTR(c)->affine)
        return;
    memset(G, 0, sizeof(float) * (size_t)c->n * c->nparam);
    for (int i = 0; i < c->n; i++) {
        float *g = G + (size_t)i * c->nparam;
        sample_param_grad(c, i, gy + (size_t)i * c->in_numel, g, g + C);
    }
}

/* Per-(j, i) gradients of the selected tensors as rows of B, then G += B B^T. */
static void bn_gram_add(const cv_layer_ctx *c, int k, const float *gy, unsigned mask,
                        double *G)
{
    int C = CH(c), R = k * c->n;
    int use_g = (mask & 1u) != 0, use_b = (mask & 2u) != 0, w = C * (use_g + use_b);
    float *B = c->work && c->work_floats >= bn_work(c, k) ? c->work : NULL;
    if (!ATTR(c)->affine || !w)
        return;
    if (!B) {
        for (size_t q = 0; q < (size_t)R * R; q++)
            G[q] = NAN;
        return;
    }
    memset(B, 0, sizeof(float) * (size_t)R * w);
    for (int r = 0; r < R; r++) {
        float *row = B + (size_t)r * w;
        sample_param_grad(c, r % c->n, gy + (size_t)r * c->in_numel, use_g ? row : NULL,
                          use_b ? row + (use_g ? C : 0) : NULL);
    }
    cv_gram_add_rows(R, w, B, G);
}

static const cv_layer_ops batchnorm_ops = {
    .diag_add = cv_layer_diag_per_sample,
    .work_size = bn_work,
    .forward = bn_forward,
    .vjp = bn_vjp,
    .jvp = bn_jvp,
    .hvp_extra = bn_hvp_extra,
    .per_sample = bn_per_sample,
    .gram_add = bn_gram_add,
};

/* ---- classes --------------------------------------------------------------- */

static const cv_field bn_fields[] = {
    CV_FIELD_INT_REQ("num_features", cv_batchnorm_attr, num_features, 1),
    {.name = "eps", .kind = CV_F_NUMBER, .flags = CV_F_MIN_OPEN,
     .offset = offsetof(cv_batchnorm_attr, eps), .def = 1e-5, .min = 0, .max = INFINITY},
    /* ignored in evaluation mode */
    {.name = "momentum", .kind = CV_F_IGNORED,
     .flags = CV_F_ACCEPT_NUMBER | CV_F_ACCEPT_NULL | CV_F_HIDDEN, .offset = CV_F_NOSTORE},
    CV_FIELD_BOOL("affine", cv_batchnorm_attr, affine, 1),
    {.name = "track_running_stats", .kind = CV_F_FIXED_BOOL,
     .offset = offsetof(cv_batchnorm_attr, track_running_stats), .def = 1,
     .text = "evaluation mode normalizes with the running statistics"},
    {.name = "training", .kind = CV_F_FIXED_BOOL, .flags = CV_F_HIDDEN, .offset = CV_F_NOSTORE,
     .def = 0,
     .text = "curvd evaluates BatchNorm in evaluation mode (running statistics); set "
             "\"training\": false or omit it"},
};

static int bn_infer(cv_layer *L, const cv_shape *in, cv_err *e)
{
    const cv_batchnorm_attr *a = CV_LAYER_ATTR(L, cv_batchnorm_attr);
    char s[64];
    cv_shape_str(in, s, sizeof s);
    /* BatchNorm1d: [C] or [C, L] (PyTorch's (N, C) and (N, C, L)); BatchNorm2d: [C, H, W] */
    int want_rank = L->cls == &cv_batchnorm2d_class ? 3
                    : L->cls == &cv_batch_norm_fn_class && in->rank == 3 ? 3
                    : in->rank == 2 ? 2 : 1;
    if (a->num_features < 1)
        return cv_err_set(e, CV_EINVAL, "invalid_model", "", "num_features must be positive");
    if (!a->track_running_stats)
        return cv_err_set(e, CV_EINVAL, "invalid_model", "",
                          "track_running_stats=false needs batch statistics (training mode); "
                          "curvd supports evaluation mode only");
    if (in->rank != want_rank || in->dim[0] != a->num_features) {
        if (want_rank == 3)
            return cv_err_set(e, CV_EINVAL, "invalid_model", "",
                              "expects per-sample input [%d, H, W], got %s", a->num_features, s);
        return cv_err_set(e, CV_EINVAL, "invalid_model", "",
                          "expects per-sample input [%d] or [%d, L], got %s", a->num_features,
                          a->num_features, s);
    }
    L->out_shape = *in;
    return 0;
}

static int bn_layout(cv_layer *L)
{
    const cv_batchnorm_attr *a = CV_LAYER_ATTR(L, cv_batchnorm_attr);
    int dims[1] = {a->num_features};
    if (a->affine &&
        (cv_layer_add_param(L, "weight", 1, dims) || cv_layer_add_param(L, "bias", 1, dims)))
        return -1;
    return cv_layer_add_buffer(L, "running_mean", 1, dims) ||
           cv_layer_add_buffer(L, "running_var", 1, dims) ||
           (L->cls != &cv_batch_norm_fn_class && /* F.batch_norm has no counter */
            cv_layer_add_buffer(L, "num_batches_tracked", 0, dims));
}

/* BatchNorm1d and BatchNorm2d differ in name (and the rank bn_infer wants) */
#define BN_CLASS(nm)                                                                         \
    {.name = nm, .attr_size = sizeof(cv_batchnorm_attr), CV_FIELDS(bn_fields),               \
     .infer = bn_infer, .layout = bn_layout, .ops = &batchnorm_ops}
const cv_layer_class cv_batchnorm1d_class = BN_CLASS("BatchNorm1d");
const cv_layer_class cv_batchnorm2d_class = BN_CLASS("BatchNorm2d");
/* F.batch_norm in a graph (evaluation mode): any of the ranks above, the
 * tensors named by the node's "params" */
const cv_layer_class cv_batch_norm_fn_class = {
    .name = "batch_norm", .function = "batch_norm", .attr_size = sizeof(cv_batchnorm_attr),
    CV_FIELDS(bn_fields), .infer = bn_infer, .layout = bn_layout, .ops = &batchnorm_ops};
