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
 * (R(s) = -s^2 <xhat rx>, R(xhat) = rxh); beta enters linearly.  Each group
 * needs only sums over its entries, so quad_extra dots these terms with the
 * direction without writing them.  Group loops run on cv_parallel_for;
 * parameter sums run serially (the groups share the affine entries). */
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
    size_t apg;     /* affine indices per group: group gi uses [gi apg, (gi+1) apg) mod P,
                     * entry i of it gi apg + i / S (LayerNorm: S = 1, apg = M, p = i) */
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
    g.apg = g.M / g.S;
    return g;
}

/* first affine index of group gi of a sample */
static inline size_t abase(const norm_geom *g, size_t gi) { return gi * g->apg % g->P; }

/* The per-entry values of an affine vector w (P floats) over group gi: w
 * itself for LayerNorm, else expanded into buf (M floats); NULL w: ones. */
static const float *expand(const norm_geom *g, const float *w, size_t gi, float *buf)
{
    if (w && g->S == 1 && g->apg == g->P)
        return w;
    const float *a = w ? w + abase(g, gi) : NULL;
    for (size_t j = 0; j < g->apg; j++)
        for (size_t s = 0; s < g->S; s++)
            buf[j * g->S + s] = a ? a[j] : 1.0f;
    return buf;
}

/* ---- kernels over groups (cv_parallel_for ranges of groups of the batch) --------
 * Group q is sample q / G, group q % G; its entries start at q * M in the batch. */

typedef struct {
    const cv_layer_ctx *c;
    norm_geom g;
    const float *gy, *rx; /* cotangent, tangent (per vector) */
    const float *v;       /* parameter direction (P weight, P bias) or NULL */
    float *out;
    double *stats;        /* hvp: <rx>, <xhat rx> per group, for the weight terms */
} norm_job;

static size_t norm_grain(const norm_geom *g) { return cv_parallel_grain(g->M); }

static void run_groups(const cv_layer_ctx *c, norm_job *j, cv_range_fn fn)
{
    cv_parallel_for((size_t)c->n * j->g.G, norm_grain(&j->g), fn, j);
}

/* scratch for a range: k buffers of M floats (NULL on failure: the range
 * writes NaN so that the failure shows) */
static float *range_scratch(const norm_geom *g, int k)
{
    return malloc(sizeof(float) * (size_t)k * g->M);
}

static void fill_nan(float *out, size_t len)
{
    for (size_t i = 0; i < len; i++)
        out[i] = NAN;
}

/* Runs fn on each group q of [lo, hi) with k buffers of M floats of scratch
 * (none: the range's output is NaN). */
typedef void (*group_fn)(const norm_job *j, size_t q, float *buf);

static void for_groups(const norm_job *j, int k, size_t lo, size_t hi, group_fn fn)
{
    float *buf = range_scratch(&j->g, k);
    if (!buf) {
        fill_nan(j->out + lo * j->g.M, (hi - lo) * j->g.M);
        return;
    }
    for (size_t q = lo; q < hi; q++)
        fn(j, q, buf);
    free(buf);
}

/* group gi's gamma (ones without affine) and gamma direction (NULL without
 * one), expanded into buf (M floats each) where needed */
static const float *gamma_of(const norm_job *j, size_t gi, float *buf)
{
    return expand(&j->g, j->g.has_w ? j->c->theta : NULL, gi, buf);
}

static const float *vgamma_of(const norm_job *j, size_t gi, float *buf)
{
    return j->v && j->g.has_w ? expand(&j->g, j->v, gi, buf) : NULL;
}

/* The sums of a group's a_i = w_i b_i (w NULL: a_i = b_i) in double:
 * out[0] = sum a, out[1] = sum a xhat, out[2] = sum a r (0 without r). */
static void group_sums(const float *w, const float *b, const float *xh, const float *r,
                       size_t M, double out[3])
{
    double s0 = 0, s1 = 0, s2 = 0;
    for (size_t i = 0; i < M; i++) {
        double a = w ? (double)w[i] * b[i] : (double)b[i];
        s0 += a;
        s1 += a * xh[i];
        if (r)
            s2 += a * r[i];
    }
    out[0] = s0;
    out[1] = s1;
    out[2] = s2;
}

static void forward_group(const norm_job *j, size_t q, float *buf)
{
    const norm_geom *g = &j->g;
    const cv_layer_ctx *c = j->c;
    size_t M = g->M;
    const float *x = c->x + q * M;
    double mu = 0, var = 0;
    for (size_t i = 0; i < M; i++)
        mu += x[i];
    mu /= (double)M;
    for (size_t i = 0; i < M; i++)
        var += (x[i] - mu) * (x[i] - mu);
    var /= (double)M;
    double s = 1.0 / sqrt(var + g->eps);
    c->d2[q] = (float)s;
    size_t gi = q % (size_t)g->G;
    const float *w = gamma_of(j, gi, buf);
    const float *b = g->has_b ? expand(g, c->theta + g->P, gi, buf + M) : NULL;
    float *xh = c->d1 + q * M, *y = j->out + q * M;
    for (size_t i = 0; i < M; i++) {
        float v = (float)((x[i] - mu) * s);
        xh[i] = v;
        y[i] = w[i] * v + (b ? b[i] : 0.0f);
    }
}

static void forward_range(void *p, size_t lo, size_t hi)
{
    for_groups(p, 2, lo, hi, forward_group);
}

static int norm_forward(cv_layer_ctx *c, float *y, cv_err *e)
{
    norm_geom g = geom_of(c);
    size_t len = (size_t)c->n * c->in_numel, ng = (size_t)c->n * g.G;
    cv_layer_ctx_release(c);
    c->d1 = cv_layer_cache(c, sizeof(float) * len);
    c->d2 = cv_layer_cache(c, sizeof(float) * ng);
    if (!c->d1 || !c->d2)
        return cv_err_set(e, CV_ENOMEM, "out_of_memory", "", "normalization cache (%zu floats)",
                          len + ng);
    norm_job j = {.c = c, .g = g, .out = y};
    run_groups(c, &j, forward_range);
    return 0;
}

/* gx = J_x^T (gamma gy) = s (g - <g> - xhat <g xhat>) */
static void vjp_group(const norm_job *j, size_t q, float *buf)
{
    const norm_geom *g = &j->g;
    const cv_layer_ctx *c = j->c;
    size_t M = g->M;
    const float *w = gamma_of(j, q % (size_t)g->G, buf);
    const float *xh = c->d1 + q * M, *gy = j->gy + q * M;
    double sg[3], s = c->d2[q];
    group_sums(w, gy, xh, NULL, M, sg);
    float mg = (float)(sg[0] / (double)M), mgx = (float)(sg[1] / (double)M), sf = (float)s;
    float *gx = j->out + q * M;
    for (size_t i = 0; i < M; i++)
        gx[i] = sf * (w[i] * gy[i] - mg - xh[i] * mgx);
}

static void vjp_range(void *p, size_t lo, size_t hi)
{
    for_groups(p, 1, lo, hi, vjp_group);
}

/* ry = gamma rxh + vgamma xhat + vbeta, rxh = s (rx - <rx> - xhat <xhat rx>) */
static void jvp_group(const norm_job *j, size_t q, float *buf)
{
    const norm_geom *g = &j->g;
    const cv_layer_ctx *c = j->c;
    size_t M = g->M;
    size_t gi = q % (size_t)g->G;
    const float *w = gamma_of(j, gi, buf);
    const float *vw = vgamma_of(j, gi, buf + M);
    const float *vb = j->v && g->has_b ? expand(g, j->v + g->P, gi, buf + 2 * M) : NULL;
    const float *xh = c->d1 + q * M, *rx = j->rx ? j->rx + q * M : NULL;
    float *ry = j->out + q * M;
    float mr = 0, mxr = 0, sf = c->d2[q];
    if (rx) {
        double sr[3];
        group_sums(NULL, rx, xh, NULL, M, sr);
        mr = (float)(sr[0] / (double)M);
        mxr = (float)(sr[1] / (double)M);
    }
    for (size_t i = 0; i < M; i++) {
        float r = rx ? w[i] * sf * (rx[i] - mr - xh[i] * mxr) : 0.0f;
        if (vw)
            r += vw[i] * xh[i];
        if (vb)
            r += vb[i];
        ry[i] = r;
    }
}

static void jvp_range(void *p, size_t lo, size_t hi)
{
    for_groups(p, 3, lo, hi, jvp_group);
}

/* The second-order terms on the input, one group at a time (see the top):
 *   gx += -s^2 <xhat rx> A - s (rxh <g xhat> + xhat <g rxh>)     (rx)
 *       + s (vg - <vg> - xhat <vg xhat>), vg = vgamma gy          (vgamma)
 * with <g rxh> = s (<g rx> - <rx><g> - <xhat rx><g xhat>): one pass of sums,
 * then gx += cg g + cr rx + cx xhat + c0 (+ s vg); stats = <rx>, <xhat rx>
 * for the weight terms. */
static void hvp_group(const norm_job *j, size_t q, float *buf)
{
    const norm_geom *g = &j->g;
    const cv_layer_ctx *c = j->c;
    size_t M = g->M;
    size_t gi = q % (size_t)g->G;
    const float *w = gamma_of(j, gi, buf);
    const float *vw = vgamma_of(j, gi, buf + M);
    const float *xh = c->d1 + q * M, *gy = j->gy + q * M;
    const float *rx = j->rx ? j->rx + q * M : NULL;
    double s = c->d2[q], sg[3], sr[3] = {0, 0, 0}, sv[3] = {0, 0, 0};
    group_sums(w, gy, xh, rx, M, sg);
    if (rx)
        group_sums(NULL, rx, xh, NULL, M, sr);
    if (vw)
        group_sums(vw, gy, xh, NULL, M, sv);
    double mg = sg[0] / M, mgx = sg[1] / M, mr = sr[0] / M, mxr = sr[1] / M,
           mv = sv[0] / M, mvx = sv[1] / M;
    double mgrh = s * (sg[2] / M - mr * mg - mxr * mgx); /* <g rxh> */
    if (j->stats) {
        j->stats[2 * q] = mr;
        j->stats[2 * q + 1] = mxr;
    }
    double cg = 0, cr = 0, cx = 0, c0 = 0;
    if (rx) {
        cg = -s * s * mxr;
        cr = -s * s * mgx;
        cx = 2 * s * s * mxr * mgx - s * mgrh;
        c0 = s * s * (mxr * mg + mgx * mr);
    }
    if (vw) {
        cx -= s * mvx;
        c0 -= s * mv;
    }
    /* in double: the terms cancel (a group of two entries has xhat = +-1) */
    float *gx = j->out + q * M;
    if (rx && vw)
        for (size_t i = 0; i < M; i++)
            gx[i] += (float)(cg * w[i] * gy[i] + cr * rx[i] + cx * xh[i] + c0 +
                             s * vw[i] * gy[i]);
    else if (rx)
        for (size_t i = 0; i < M; i++)
            gx[i] += (float)(cg * w[i] * gy[i] + cr * rx[i] + cx * xh[i] + c0);
    else
        for (size_t i = 0; i < M; i++)
            gx[i] += (float)(cx * xh[i] + c0 + s * vw[i] * gy[i]);
}

static void hvp_range(void *p, size_t lo, size_t hi)
{
    for_groups(p, 2, lo, hi, hvp_group);
}

/* Parameter gradient of groups [q0, q1) (serial: the groups share the affine
 * indices): gw += gy f with f = xhat, or f = rxh = s (rx - <rx> - xhat <xhat
 * rx>) with the group's stats when rx is set; gb += gy when bias_too. */
static void theta_grad(const cv_layer_ctx *c, const norm_geom *g, const float *gy,
                       const float *rx, const double *stats, size_t q0, size_t q1,
                       int bias_too, float *gt)
{
    size_t M = g->M, S = g->S;
    int use_b = bias_too && g->has_b;
    float *gw = g->has_w ? gt : NULL, *gb = use_b ? gt + (g->has_w ? g->P : 0) : NULL;
    for (size_t q = q0; q < q1; q++) {
        size_t a = abase(g, q % (size_t)g->G);
        const float *xh = c->d1 + q * M, *gq = gy + q * M, *r = rx ? rx + q * M : NULL;
        /* rxh in double: it cancels (a group of two entries has rxh = 0) */
        double s = r ? c->d2[q] : 0, mr = r ? stats[2 * q] : 0, mxr = r ? stats[2 * q + 1] : 0;
        if (S == 1) { /* LayerNorm: entry i is affine index a + i */
            for (size_t i = 0; gw && r && i < M; i++)
                gw[a + i] += (float)(gq[i] * s * (r[i] - mr - xh[i] * mxr));
            for (size_t i = 0; gw && !r && i < M; i++)
                gw[a + i] += gq[i] * xh[i];
            for (size_t i = 0; gb && i < M; i++)
                gb[a + i] += gq[i];
            continue;
        }
        for (size_t j = 0; j < g->apg; j++) {
            double aw = 0, ab = 0;
            for (size_t i = j * S; i < (j + 1) * S; i++) {
                aw += gq[i] * (r ? s * (r[i] - mr - xh[i] * mxr) : xh[i]);
                ab += gq[i];
            }
            if (gw)
                gw[a + j] += (float)aw;
            if (gb)
                gb[a + j] += (float)ab;
        }
    }
}

static size_t norm_work(const cv_layer_ctx *c, int k)
{
    norm_geom g = geom_of(c);
    return 4 * (size_t)c->n * g.G; /* hvp's stats: 2 doubles per group */
}

/* n doubles of scratch at double offset off of the work buffer, or (work
 * missing or short: a driver that did not ask work_size) allocated into *own
 * (the caller frees it); NULL if that fails. */
static double *dscratch(const cv_layer_ctx *c, size_t off, size_t n, double **own)
{
    *own = NULL;
    if (c->work && c->work_floats >= 2 * (off + n))
        return (double *)(void *)c->work + off;
    return *own = malloc(sizeof(double) * (n ? n : 1));
}

static void nan_params(float *gt, size_t P)
{
    fill_nan(gt, P);
}

static void norm_vjp(const cv_layer_ctx *c, int k, const float *gy, float *gx, float *gtheta)
{
    norm_geom g = geom_of(c);
    size_t len = (size_t)c->n * c->in_numel, ng = (size_t)c->n * g.G;
    for (int j = 0; j < k; j++) {
        const float *gj = gy + (size_t)j * len;
        if (gx) {
            norm_job jb = {.c = c, .g = g, .gy = gj, .out = gx + (size_t)j * len};
            run_groups(c, &jb, vjp_range);
        }
        if (gtheta && c->nparam) {
            float *gt = gtheta + (size_t)j * c->nparam;
            memset(gt, 0, sizeof(float) * c->nparam);
            theta_grad(c, &g, gj, NULL, NULL, 0, ng, 1, gt);
        }
    }
}

static void norm_jvp(const cv_layer_ctx *c, int k, const float *rx, const float *vtheta,
                     float *ry)
{
    norm_geom g = geom_of(c);
    size_t len = (size_t)c->n * c->in_numel;
    for (int j = 0; j < k; j++) {
        norm_job jb = {.c = c, .g = g, .rx = rx ? rx + (size_t)j * len : NULL,
                       .v = vtheta && c->nparam ? vtheta + (size_t)j * c->nparam : NULL,
                       .out = ry + (size_t)j * len};
        run_groups(c, &jb, jvp_range);
    }
}

static void norm_hvp_extra(const cv_layer_ctx *c, int k, const float *gy, const float *rx,
                           const float *vtheta, float *gx_add, float *gtheta_add)
{
    norm_geom g = geom_of(c);
    size_t len = (size_t)c->n * c->in_numel, ng = (size_t)c->n * g.G;
    int weight_terms = gtheta_add && rx && g.has_w;
    double *own = NULL, *stats = NULL;
    if (weight_terms) {
        stats = dscratch(c, 0, 2 * ng, &own);
        if (!stats) {
            for (int j = 0; j < k; j++)
                nan_params(gtheta_add + (size_t)j * c->nparam, c->nparam);
            weight_terms = 0;
        }
    }
    for (int j = 0; j < k; j++) {
        const float *rj = rx ? rx + (size_t)j * len : NULL;
        const float *vj = vtheta && g.has_w ? vtheta + (size_t)j * c->nparam : NULL;
        if (!rj && !vj)
            continue;
        norm_job jb = {.c = c, .g = g, .gy = gy, .rx = rj, .v = vj,
                       .stats = weight_terms ? stats : NULL};
        float *tmp = NULL;
        if (gx_add)
            jb.out = gx_add + (size_t)j * len;
        else if (weight_terms) /* the stats only: a throwaway output */
            jb.out = tmp = calloc(len, sizeof(float));
        if (jb.out)
            run_groups(c, &jb, hvp_range);
        free(tmp);
        if (weight_terms && jb.out && rj)
            theta_grad(c, &g, gy, rj, stats, 0, ng, 0, gtheta_add + (size_t)j * c->nparam);
    }
    free(own);
}

/* quad_extra, one group at a time: the hvp terms dotted with the direction,
 * from sums alone (no output written):
 *   <rx, gx_add> = cg <g rx> + cr <rx rx> + cx <xhat rx> + c0 <rx> + s <vg rx>
 *   <vgamma, ggamma_add> = s (<vg rx> - <rx> <vg> - <xhat rx> <vg xhat>)
 * (sums, not means; cg.. as in hvp_range) into stats[q]. */
static void quad_range(void *p, size_t lo, size_t hi)
{
    const norm_job *j = p;
    const norm_geom *g = &j->g;
    const cv_layer_ctx *c = j->c;
    size_t M = g->M;
    float *buf = range_scratch(g, 2);
    for (size_t q = lo; q < hi; q++) {
        if (!buf) {
            j->stats[q] = NAN;
            continue;
        }
        size_t gi = q % (size_t)g->G;
        const float *w = gamma_of(j, gi, buf);
        const float *vw = vgamma_of(j, gi, buf + M);
        const float *xh = c->d1 + q * M, *gy = j->gy + q * M, *rx = j->rx + q * M;
        double s = c->d2[q], gs[3], rs[3], vs[3] = {0, 0, 0};
        group_sums(w, gy, xh, rx, M, gs);
        group_sums(NULL, rx, xh, rx, M, rs);
        if (vw)
            group_sums(vw, gy, xh, rx, M, vs);
        double sg = gs[0], sgx = gs[1], sgr = gs[2], sr = rs[0], sxr = rs[1], srr = rs[2];
        double sv = vs[0], svx = vs[1], svr = vs[2];
        double mg = sg / M, mgx = sgx / M, mr = sr / M, mxr = sxr / M;
        double mgrh = s * (sgr / M - mr * mg - mxr * mgx);
        double cg = -s * s * mxr, cr = -s * s * mgx;
        double cx = 2 * s * s * mxr * mgx - s * mgrh, c0 = s * s * (mxr * mg + mgx * mr);
        if (vw) {
            cx -= s * svx / M;
            c0 -= s * sv / M;
        }
        double qv = cg * sgr + cr * srr + cx * sxr + c0 * sr;
        if (vw)
            qv += s * svr + s * (svr - mr * sv - mxr * svx);
        j->stats[q] = qv;
    }
    free(buf);
}

static void norm_quad_extra(const cv_layer_ctx *c, int k, const float *gy, const float *rx,
                            const float *vtheta, double *q)
{
    if (!rx) /* the terms in vgamma alone act on the input, dotted with rx = 0 */
        return;
    norm_geom g = geom_of(c);
    size_t len = (size_t)c->n * c->in_numel, ng = (size_t)c->n * g.G;
    double *own, *vals = dscratch(c, 0, ng, &own);
    for (int j = 0; j < k; j++) {
        if (!vals) {
            q[j] = NAN;
            continue;
        }
        norm_job jb = {.c = c, .g = g, .gy = gy, .rx = rx + (size_t)j * len,
                       .v = vtheta && g.has_w ? vtheta + (size_t)j * c->nparam : NULL,
                       .stats = vals};
        run_groups(c, &jb, quad_range);
        double sum = 0; /* in group order: the same for any thread count */
        for (size_t i = 0; i < ng; i++)
            sum += vals[i];
        q[j] += sum;
    }
    free(own);
}

static void norm_per_sample(const cv_layer_ctx *c, const float *gy, float *G)
{
    norm_geom g = geom_of(c);
    for (int i = 0; i < c->n; i++) {
        float *gt = G + (size_t)i * c->nparam;
        memset(gt, 0, sizeof(float) * c->nparam);
        theta_grad(c, &g, gy, NULL, NULL, (size_t)i * g.G, (size_t)(i + 1) * g.G, 1, gt);
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
    for (size_t r = 0; r < R; r++) {
        size_t i = r % c->n;
        /* theta_grad reads group q of the batch at gy + q M: shift to block r / n */
        theta_grad(c, &g, gy + (r / c->n) * len, NULL, NULL, i * g.G, (i + 1) * g.G, 1,
                   B + r * P);
    }
    /* tensor t occupies [t P_aff, (t+1) P_aff): zero the columns not in mask */
    for (int t = 0; t < 2; t++)
        if ((size_t)(t + 1) * g.P <= P && !(mask & (1u << t)))
            for (size_t r = 0; r < R; r++)
                memset(B + r * P + t * g.P, 0, sizeof(float) * g.P);
    cv_gram_add_rows((int)R, (int)P, B, G);
    free(B);
}

static const cv_layer_ops norm_ops = {
    .diag_add = cv_layer_diag_per_sample,
    .work_size = norm_work,
    .forward = norm_forward,
    .vjp = norm_vjp,
    .jvp = norm_jvp,
    .hvp_extra = norm_hvp_extra,
    .per_sample = norm_per_sample,
    .gram_add = norm_gram_add,
    .quad_extra = norm_quad_extra,
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
