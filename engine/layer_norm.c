/* layer_norm.c - torch.nn.LayerNorm and torch.nn.GroupNorm: their classes and
 * the kernels they share.  A sample's entries split into G contiguous groups
 * of M; per group xhat = (x - mean) s with s = 1/sqrt(var + eps) (biased
 * variance), and y = gamma[p] xhat + beta[p], where entry e of a sample uses
 * affine index p(e) = (e / S) % P (LayerNorm: S = 1, P = M; GroupNorm: S =
 * the spatial size, P = C).  Forward caches xhat (d1) and s per group (d2).
 *
 * With g = gamma gy and means <.> over a group:
 *   J_x rx   = s (rx - <rx> - xhat <xhat rx>)                 (= rxh)
 *   J_x^T g  = s (g - <g> - xhat <g xhat>)                    (= s A)
 * and the second-order terms of the backward pass (direction rx, vgamma):
 *   gx     += -s^2 <xhat rx> A - s (rxh <g xhat> + xhat <g rxh>)
 *             + J_x^T (vgamma gy)
 *   ggamma += sum gy rxh
 * (R(s) = -s^2 <xhat rx>, R(xhat) = rxh); beta enters linearly. */
#include "layer_norm.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "im2col.h"
#include "parallel.h"

typedef struct {
    int G;          /* groups per sample */
    size_t M;       /* entries per group */
    size_t S, P;    /* affine index p(e) = (e / S) % P */
    int has_w, has_b;
    double eps;
} norm_geom;

static norm_geom geom_of(const cv_layer_ctx *c)
{
    norm_geom g = {0};
    if (c->L->cls == &cv_layernorm_class) {
        const cv_layernorm_attr *a = CV_LAYER_ATTR(c->L, cv_layernorm_attr);
        g.M = cv_shape_numel(&a->normalized_shape);
        g.G = (int)(c->in_numel / g.M);
        g.S = 1;
        g.P = g.M;
        g.has_w = a->elementwise_affine;
        g.has_b = a->elementwise_affine && a->has_bias;
        g.eps = a->eps;
    } else {
        const cv_groupnorm_attr *a = CV_LAYER_ATTR(c->L, cv_groupnorm_attr);
        g.G = a->num_groups;
        g.M = c->in_numel / (size_t)a->num_groups;
        g.S = c->in_numel / (size_t)a->num_channels;
        g.P = (size_t)a->num_channels;
        g.has_w = g.has_b = a->affine;
        g.eps = a->eps;
    }
    return g;
}

/* affine index of entry e of a sample */
static inline size_t pidx(const norm_geom *g, size_t e) { return (e / g->S) % g->P; }

static inline double gamma_at(const norm_geom *g, const float *theta, size_t e)
{
    return g->has_w ? theta[pidx(g, e)] : 1.0;
}

/* One group: q indexes groups of the batch (sample q / G, group q % G); o is
 * its first entry in the batch layout, e0 in the sample. */
typedef struct {
    size_t o, e0;
    double s;
} group_at;

static group_at group_of(const cv_layer_ctx *c, const norm_geom *g, size_t q)
{
    group_at r;
    size_t n = q / (size_t)g->G, gi = q % (size_t)g->G;
    r.e0 = gi * g->M;
    r.o = n * c->in_numel + r.e0;
    r.s = c->d2 ? c->d2[q] : 0;
    return r;
}

/* <a>, <xhat a> over a group */
static void means(const norm_geom *g, const float *xh, const float *a, double *ma,
                  double *mxa)
{
    double s0 = 0, s1 = 0;
    for (size_t i = 0; i < g->M; i++) {
        s0 += a[i];
        s1 += (double)xh[i] * a[i];
    }
    *ma = s0 / (double)g->M;
    *mxa = s1 / (double)g->M;
}

/* <gamma gy>, <gamma gy xhat> with an optional second factor w (vgamma) */
static void gmeans(const norm_geom *g, const float *w, size_t e0, const float *xh,
                   const float *gy, double *mg, double *mgx)
{
    double s0 = 0, s1 = 0;
    for (size_t i = 0; i < g->M; i++) {
        double gv = (w ? w[pidx(g, e0 + i)] : 1.0) * gy[i];
        s0 += gv;
        s1 += gv * xh[i];
    }
    *mg = s0 / (double)g->M;
    *mgx = s1 / (double)g->M;
}

/* ---- kernels over groups (cv_parallel_for ranges) ------------------------- */

typedef struct {
    const cv_layer_ctx *c;
    norm_geom g;
    const float *a, *b;   /* inputs (cotangent / tangent) */
    const float *w;       /* per-affine-index factor (gamma, vgamma) or NULL */
    float *out;
    float *d1, *d2;       /* forward: caches to fill */
    cv_err *e;
} norm_job;

static size_t norm_grain(const norm_geom *g) { return cv_parallel_grain(g->M); }

static void forward_range(void *p, size_t lo, size_t hi)
{
    const norm_job *j = p;
    const norm_geom *g = &j->g;
    const float *theta = j->c->theta;
    for (size_t q = lo; q < hi; q++) {
        group_at ga = group_of(j->c, g, q);
        const float *x = j->c->x + ga.o;
        double mu = 0, var = 0;
        for (size_t i = 0; i < g->M; i++)
            mu += x[i];
        mu /= (double)g->M;
        for (size_t i = 0; i < g->M; i++)
            var += (x[i] - mu) * (x[i] - mu);
        var /= (double)g->M;
        double s = 1.0 / sqrt(var + g->eps);
        j->d2[q] = (float)s;
        float *xh = j->d1 + ga.o, *y = j->out + ga.o;
        for (size_t i = 0; i < g->M; i++) {
            double v = (x[i] - mu) * s;
            xh[i] = (float)v;
            size_t pi = pidx(g, ga.e0 + i);
            y[i] = (float)((g->has_w ? theta[pi] * v : v) + (g->has_b ? theta[g->P + pi] : 0));
        }
    }
}

static int norm_forward(cv_layer_ctx *c, float *y, cv_err *e)
{
    norm_geom g = geom_of(c);
    size_t len = (size_t)c->n * c->in_numel, ng = (size_t)c->n * g.G;
    cv_layer_ctx_release(c);
    c->d1 = malloc(sizeof(float) * len);
    c->d2 = malloc(sizeof(float) * ng);
    if (!c->d1 || !c->d2)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "normalization cache (%zu floats)",
                          len + ng);
    norm_job j = {.c = c, .g = g, .out = y, .d1 = c->d1, .d2 = c->d2};
    cv_parallel_for(ng, norm_grain(&g), forward_range, &j);
    return 0;
}

/* out = J_x^T (w gy) per group (w: gamma or vgamma per affine index, NULL:
 * 1); add: out +=. */
static void vjp_x_group(const cv_layer_ctx *c, const norm_geom *g, group_at ga, const float *w,
                        const float *gy, float *out, int add)
{
    const float *xh = c->d1 + ga.o;
    gy += ga.o;
    out += ga.o;
    double mg, mgx;
    gmeans(g, w, ga.e0, xh, gy, &mg, &mgx);
    for (size_t i = 0; i < g->M; i++) {
        double gv = (w ? w[pidx(g, ga.e0 + i)] : 1.0) * gy[i];
        float v = (float)(ga.s * (gv - mg - xh[i] * mgx));
        out[i] = add ? out[i] + v : v;
    }
}

static void vjp_range(void *p, size_t lo, size_t hi)
{
    const norm_job *j = p;
    for (size_t q = lo; q < hi; q++)
        vjp_x_group(j->c, &j->g, group_of(j->c, &j->g, q), j->w, j->a, j->out, 0);
}

static void vjp_add_range(void *p, size_t lo, size_t hi)
{
    const norm_job *j = p;
    for (size_t q = lo; q < hi; q++)
        vjp_x_group(j->c, &j->g, group_of(j->c, &j->g, q), j->w, j->a, j->out, 1);
}

/* ry = gamma rxh (rx = a) + vgamma xhat + vbeta (vtheta = b) */
static void jvp_range(void *p, size_t lo, size_t hi)
{
    const norm_job *j = p;
    const norm_geom *g = &j->g;
    const float *theta = j->c->theta, *v = j->b;
    for (size_t q = lo; q < hi; q++) {
        group_at ga = group_of(j->c, g, q);
        const float *xh = j->c->d1 + ga.o;
        float *ry = j->out + ga.o;
        double mr = 0, mxr = 0;
        if (j->a)
            means(g, xh, j->a + ga.o, &mr, &mxr);
        for (size_t i = 0; i < g->M; i++) {
            size_t pi = pidx(g, ga.e0 + i);
            double r = 0;
            if (j->a)
                r = ga.s * (j->a[ga.o + i] - mr - xh[i] * mxr) * (g->has_w ? theta[pi] : 1.0);
            if (v && g->has_w)
                r += (double)v[pi] * xh[i];
            if (v && g->has_b)
                r += v[g->P + pi];
            ry[i] = (float)r;
        }
    }
}

/* gx += -s^2 <xhat rx> A - s (rxh <g xhat> + xhat <g rxh>), g = gamma gy (a = gy,
 * b = rx) */
static void hvp_x_range(void *p, size_t lo, size_t hi)
{
    const norm_job *j = p;
    const norm_geom *g = &j->g;
    const float *theta = j->c->theta;
    for (size_t q = lo; q < hi; q++) {
        group_at ga = group_of(j->c, g, q);
        const float *xh = j->c->d1 + ga.o, *gy = j->a + ga.o, *rx = j->b + ga.o;
        float *gx = j->out + ga.o;
        double mg, mgx, mr, mxr, mgr = 0, s = ga.s;
        gmeans(g, g->has_w ? theta : NULL, ga.e0, xh, gy, &mg, &mgx);
        means(g, xh, rx, &mr, &mxr);
        for (size_t i = 0; i < g->M; i++) {
            double rxh = s * (rx[i] - mr - xh[i] * mxr);
            mgr += gamma_at(g, theta, ga.e0 + i) * gy[i] * rxh;
        }
        mgr /= (double)g->M;
        for (size_t i = 0; i < g->M; i++) {
            double gv = gamma_at(g, theta, ga.e0 + i) * gy[i];
            double A = gv - mg - xh[i] * mgx;
            double rxh = s * (rx[i] - mr - xh[i] * mxr);
            gx[i] += (float)(-s * s * mxr * A - s * (rxh * mgx + xh[i] * mgr));
        }
    }
}

static void run_groups(const cv_layer_ctx *c, norm_job *j, cv_range_fn fn)
{
    cv_parallel_for((size_t)c->n * j->g.G, norm_grain(&j->g), fn, j);
}

/* gt (P weight, P bias) = (+)= sum over the batch of gy xhat (or gy rxh for
 * rx != NULL) and gy; only the weight part when bias_too is 0.  With sample
 * >= 0 only that sample. */
static void theta_grad(const cv_layer_ctx *c, const norm_geom *g, const float *gy,
                       const float *rx, int sample, int bias_too, float *gt)
{
    size_t q0 = sample < 0 ? 0 : (size_t)sample * g->G;
    size_t q1 = sample < 0 ? (size_t)c->n * g->G : q0 + g->G;
    for (size_t q = q0; q < q1; q++) {
        group_at ga = group_of(c, g, q);
        const float *xh = c->d1 + ga.o, *gq = gy + ga.o;
        double mr = 0, mxr = 0;
        if (rx)
            means(g, xh, rx + ga.o, &mr, &mxr);
        for (size_t i = 0; i < g->M; i++) {
            size_t pi = pidx(g, ga.e0 + i);
            double f = rx ? ga.s * (rx[ga.o + i] - mr - xh[i] * mxr) : xh[i];
            if (g->has_w)
                gt[pi] += (float)(gq[i] * f);
            if (bias_too && g->has_b)
                gt[(g->has_w ? g->P : 0) + pi] += gq[i];
        }
    }
}

static size_t norm_work(const cv_layer_ctx *c, int k) { return 0; }

static void norm_vjp(const cv_layer_ctx *c, int k, const float *gy, float *gx, float *gtheta)
{
    norm_geom g = geom_of(c);
    size_t len = (size_t)c->n * c->in_numel;
    for (int j = 0; j < k; j++) {
        const float *gj = gy + (size_t)j * len;
        if (gx) {
            norm_job jb = {.c = c, .g = g, .a = gj, .w = g.has_w ? c->theta : NULL,
                           .out = gx + (size_t)j * len};
            run_groups(c, &jb, vjp_range);
        }
        if (gtheta && c->nparam) {
            float *gt = gtheta + (size_t)j * c->nparam;
            memset(gt, 0, sizeof(float) * c->nparam);
            theta_grad(c, &g, gj, NULL, -1, 1, gt);
        }
    }
}

static void norm_jvp(const cv_layer_ctx *c, int k, const float *rx, const float *vtheta,
                     float *ry)
{
    norm_geom g = geom_of(c);
    size_t len = (size_t)c->n * c->in_numel;
    for (int j = 0; j < k; j++) {
        norm_job jb = {.c = c, .g = g, .a = rx ? rx + (size_t)j * len : NULL,
                       .b = vtheta && c->nparam ? vtheta + (size_t)j * c->nparam : NULL,
                       .out = ry + (size_t)j * len};
        run_groups(c, &jb, jvp_range);
    }
}

static void norm_hvp_extra(const cv_layer_ctx *c, int k, const float *gy, const float *rx,
                           const float *vtheta, float *gx_add, float *gtheta_add)
{
    norm_geom g = geom_of(c);
    size_t len = (size_t)c->n * c->in_numel;
    for (int j = 0; j < k; j++) {
        const float *rj = rx ? rx + (size_t)j * len : NULL;
        float *gxj = gx_add ? gx_add + (size_t)j * len : NULL;
        if (gxj && rj) {
            norm_job jb = {.c = c, .g = g, .a = gy, .b = rj, .out = gxj};
            run_groups(c, &jb, hvp_x_range);
        }
        if (gxj && vtheta && g.has_w) { /* J_x^T (vgamma gy) */
            norm_job jb = {.c = c, .g = g, .a = gy, .w = vtheta + (size_t)j * c->nparam,
                           .out = gxj};
            run_groups(c, &jb, vjp_add_range);
        }
        if (gtheta_add && rj && g.has_w)
            theta_grad(c, &g, gy, rj, -1, 0, gtheta_add + (size_t)j * c->nparam);
    }
}

static void norm_per_sample(const cv_layer_ctx *c, const float *gy, float *G)
{
    norm_geom g = geom_of(c);
    for (int i = 0; i < c->n; i++) {
        float *gt = G + (size_t)i * c->nparam;
        memset(gt, 0, sizeof(float) * c->nparam);
        theta_grad(c, &g, gy, NULL, i, 1, gt);
    }
}

/* The per-sample gradients (at most 2P floats each) side by side, restricted
 * to the masked tensors, then G += B B^T. */
static void norm_gram_add(const cv_layer_ctx *c, int k, const float *gy, unsigned mask,
                          double *G)
{
    norm_geom g = geom_of(c);
    size_t R = (size_t)k * c->n, len = (size_t)c->n * c->in_numel, P = c->nparam;
    float *B = calloc(R * P, sizeof(float));
    if (!B) {
        for (size_t i = 0; i < R * R; i++)
            G[i] = NAN;
        return;
    }
    for (size_t r = 0; r < R; r++)
        theta_grad(c, &g, gy + (r / c->n) * len, NULL, (int)(r % c->n), 1, B + r * P);
    /* tensor t occupies [t*P_aff, (t+1)*P_aff): zero the columns not in mask */
    for (int t = 0; t < 2; t++)
        if ((size_t)(t + 1) * g.P <= P && !(mask & (1u << t)))
            for (size_t r = 0; r < R; r++)
                memset(B + r * P + t * g.P, 0, sizeof(float) * g.P);
    cv_gram_add_rows((int)R, (int)P, B, G);
    free(B);
}

static const cv_layer_ops norm_ops = {
    .work_size = norm_work,
    .forward = norm_forward,
    .vjp = norm_vjp,
    .jvp = norm_jvp,
    .hvp_extra = norm_hvp_extra,
    .per_sample = norm_per_sample,
    .gram_add = norm_gram_add,
};

/* ---- classes --------------------------------------------------------------- */

static int layernorm_infer(cv_layer *L, const cv_shape *in, cv_err *e)
{
    const cv_layernorm_attr *a = CV_LAYER_ATTR(L, cv_layernorm_attr);
    const cv_shape *ns = &a->normalized_shape;
    char s[64], w[64];
    cv_shape_str(in, s, sizeof s);
    cv_shape_str(ns, w, sizeof w);
    int ok = ns->rank >= 1 && ns->rank <= in->rank;
    for (int i = 0; ok && i < ns->rank; i++)
        ok = in->dim[in->rank - ns->rank + i] == ns->dim[i];
    if (!ok)
        return cv_err_set(e, CV_EINVAL, "invalid_model", "normalized_shape",
                          "normalized_shape: %s must be the last dimensions of the per-sample "
                          "input, got %s",
                          w, s);
    L->out_shape = *in;
    return 0;
}

static int layernorm_layout(cv_layer *L)
{
    const cv_layernorm_attr *a = CV_LAYER_ATTR(L, cv_layernorm_attr);
    const cv_shape *ns = &a->normalized_shape;
    if (!a->elementwise_affine)
        return 0;
    return cv_layer_add_param(L, "weight", ns->rank, ns->dim) ||
           (a->has_bias && cv_layer_add_param(L, "bias", ns->rank, ns->dim));
}

static const cv_field layernorm_fields[] = {
    {.name = "normalized_shape", .kind = CV_F_DIMS, .flags = CV_F_REQUIRED,
     .offset = offsetof(cv_layernorm_attr, normalized_shape), .min = 1},
    CV_FIELD_NUMBER("eps", cv_layernorm_attr, eps, 1e-5, 0, INFINITY),
    CV_FIELD_BOOL("elementwise_affine", cv_layernorm_attr, elementwise_affine, 1),
    CV_FIELD_BOOL("bias", cv_layernorm_attr, has_bias, 1),
};

const cv_layer_class cv_layernorm_class = {
    .name = "LayerNorm", .attr_size = sizeof(cv_layernorm_attr), CV_FIELDS(layernorm_fields),
    .infer = layernorm_infer, .layout = layernorm_layout, .ops = &norm_ops,
    .function = "layer_norm"};

static int groupnorm_check(cv_layer *L, cv_err *e)
{
    const cv_groupnorm_attr *a = CV_LAYER_ATTR(L, cv_groupnorm_attr);
    if (a->num_channels % a->num_groups)
        return cv_err_set(e, CV_EINVAL, "invalid_value", "num_groups",
                          "num_groups: num_channels %d is not divisible by num_groups %d",
                          a->num_channels, a->num_groups);
    return 0;
}

static int groupnorm_infer(cv_layer *L, const cv_shape *in, cv_err *e)
{
    const cv_groupnorm_attr *a = CV_LAYER_ATTR(L, cv_groupnorm_attr);
    char s[64];
    cv_shape_str(in, s, sizeof s);
    if (in->rank < 1 || in->dim[0] != a->num_channels)
        return cv_err_set(e, CV_EINVAL, "invalid_model", "",
                          "expects per-sample input [%d, *], got %s", a->num_channels, s);
    L->out_shape = *in;
    return 0;
}

static int groupnorm_layout(cv_layer *L)
{
    const cv_groupnorm_attr *a = CV_LAYER_ATTR(L, cv_groupnorm_attr);
    int dims[1] = {a->num_channels};
    if (!a->affine)
        return 0;
    return cv_layer_add_param(L, "weight", 1, dims) || cv_layer_add_param(L, "bias", 1, dims);
}

static const cv_field groupnorm_fields[] = {
    CV_FIELD_INT_REQ("num_groups", cv_groupnorm_attr, num_groups, 1),
    CV_FIELD_INT_REQ("num_channels", cv_groupnorm_attr, num_channels, 1),
    CV_FIELD_NUMBER("eps", cv_groupnorm_attr, eps, 1e-5, 0, INFINITY),
    CV_FIELD_BOOL("affine", cv_groupnorm_attr, affine, 1),
};

const cv_layer_class cv_groupnorm_class = {
    .name = "GroupNorm", .attr_size = sizeof(cv_groupnorm_attr), CV_FIELDS(groupnorm_fields),
    .check = groupnorm_check, .infer = groupnorm_infer, .layout = groupnorm_layout,
    .ops = &norm_ops, .function = "group_norm"};
