/* func_softmax.c - the function classes softmax and log_softmax over one
 * per-sample dim (F.softmax(x, dim), F.log_softmax(x, dim), x.softmax(dim)).
 * A sample is [outer, S, inner]; a row is the S entries along the dim (stride
 * inner).  With p = softmax(x) along a row and <a, b> the row's dot product:
 *   softmax      y = p      J r = p (r - <p, r>)      J^T g = p (g - <p, g>)
 *                second order (Pearlmutter, direction r, cotangent g):
 *                R(J^T g) = q (g - <p, g>) - p <q, g>,  q = J r
 *   log_softmax  y = log p  J r = r - <p, r>          J^T g = g - p sum(g)
 *                R(J^T g) = -q sum(g),  q = p (r - <p, r>)
 * The kernels need p: the forward output y (kept by the driver as c->y) for
 * softmax, the forward's cache c->d1 for log_softmax.  Row sums are
 * accumulated in double. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "func_shape.h"
#include "parallel.h"

CV_LAYER_ATTRS(cv_softmax_attr, { int dim; });

extern const cv_layer_class cv_log_softmax_class;

static const cv_field softmax_fields[] = {
    CV_FIELD_INT_ANY_REQ("dim", cv_softmax_attr, dim),
    {.name = "dtype", .kind = CV_F_FIXED_NULL, .flags = CV_F_HIDDEN, .offset = CV_F_NOSTORE},
};

static int softmax_check(cv_layer *L, cv_err *e)
{
    return cv_func_not_batch(CV_LAYER_ATTR(L, cv_softmax_attr)->dim, "dim", NULL, e);
}

static int softmax_infer(cv_layer *L, const cv_shape *in, cv_err *e)
{
    int axis;
    if (cv_func_axis(CV_LAYER_ATTR(L, cv_softmax_attr)->dim, in->rank, "dim", NULL, &axis, e))
        return -1;
    L->out_shape = *in;
    return 0;
}

/* ---- row kernels ------------------------------------------------------------
 * p: the probabilities, y itself for softmax, the forward's cache c->d1 =
 * exp(y) for log_softmax.  Each row kernel is inlined twice: for contiguous
 * rows (st = 1, the last dim, vectorized) and for strided ones. */

typedef enum { SM_FORWARD, SM_VJP, SM_JVP, SM_HVP } sm_kind;

typedef struct {
    const cv_layer_ctx *c;
    sm_kind kind;
    int log;            /* log_softmax */
    size_t S, inner;    /* row length and stride */
    size_t rows;        /* rows per sample: outer * inner */
    const float *p;     /* probabilities (n samples); forward: NULL */
    const float *a;     /* forward: x; vjp: gy; jvp/hvp: rx (stacked) */
    const float *g;     /* hvp: the gradient cotangent gy (one vector) */
    float *out;         /* y, gx, ry, gx_add (stacked) */
    float *pc;          /* forward of log_softmax: the cache of p */
} sm_job;

#define SM_INLINE static inline __attribute__((always_inline))

/* y = softmax or log_softmax of row x; p = the probabilities (log only). */
SM_INLINE void sm_forward_row(int log, size_t S, size_t st, const float *x, float *y, float *p)
{
    float m = x[0];
    for (size_t i = 1; i < S; i++)
        m = x[i * st] > m ? x[i * st] : m;
    float *e = log ? p : y;
    double sum = 0;
    for (size_t i = 0; i < S; i++) {
        e[i * st] = expf(x[i * st] - m);
        sum += e[i * st];
    }
    float inv = (float)(1.0 / sum), lse = (float)log1p(sum - 1.0); /* sum >= 1 */
    for (size_t i = 0; i < S; i++)
        e[i * st] *= inv;
    if (log)
        for (size_t i = 0; i < S; i++)
            y[i * st] = (x[i * st] - m) - lse;
}

/* out = J^T a (vjp) or J a (jvp) on one row. */
SM_INLINE void sm_linear_row(int log, int vjp, size_t S, size_t st, const float *p,
                             const float *a, float *out)
{
    double pa = 0, sa = 0;
    for (size_t i = 0; i < S; i++) {
        pa += (double)p[i * st] * a[i * st];
        sa += a[i * st];
    }
    float fpa = (float)pa, fsa = (float)sa;
    if (!log)
        for (size_t i = 0; i < S; i++)
            out[i * st] = p[i * st] * (a[i * st] - fpa);
    else if (vjp)
        for (size_t i = 0; i < S; i++)
            out[i * st] = a[i * st] - p[i * st] * fsa;
    else
        for (size_t i = 0; i < S; i++)
            out[i * st] = a[i * st] - fpa;
}

/* out += R(J^T g) for direction r on one row. */
SM_INLINE void sm_hvp_row(int log, size_t S, size_t st, const float *p, const float *r,
                          const float *g, float *out)
{
    double pr = 0, pg = 0, sg = 0;
    for (size_t i = 0; i < S; i++) {
        pr += (double)p[i * st] * r[i * st];
        pg += (double)p[i * st] * g[i * st];
        sg += g[i * st];
    }
    float fpr = (float)pr, fpg = (float)pg, fsg = (float)sg;
    if (log) {
        for (size_t i = 0; i < S; i++)
            out[i * st] -= p[i * st] * (r[i * st] - fpr) * fsg;
        return;
    }
    double qg = 0;
    for (size_t i = 0; i < S; i++)
        qg += (double)p[i * st] * (r[i * st] - fpr) * g[i * st];
    float fqg = (float)qg;
    for (size_t i = 0; i < S; i++) {
        float q = p[i * st] * (r[i * st] - fpr);
        out[i * st] += q * (g[i * st] - fpg) - p[i * st] * fqg;
    }
}

/* Every row of item it (a (vector, sample) pair) with row stride st. */
SM_INLINE void sm_item(const sm_job *j, size_t it, size_t st)
{
    const cv_layer_ctx *c = j->c;
    size_t numel = c->in_numel, seg = j->S * j->inner, S = j->S, n = it % (size_t)c->n;
    const float *p = j->p ? j->p + n * numel : NULL;
    const float *a = j->a + it * numel;
    const float *g = j->g ? j->g + n * numel : NULL;
    float *out = j->out + it * numel;
    float *pc = j->pc ? j->pc + it * numel : NULL;
    for (size_t row = 0; row < j->rows; row++) {
        size_t off = (row / j->inner) * seg + row % j->inner;
        switch (j->kind) {
        case SM_FORWARD:
            sm_forward_row(j->log, S, st, a + off, out + off, pc ? pc + off : NULL);
            break;
        case SM_VJP: sm_linear_row(j->log, 1, S, st, p + off, a + off, out + off); break;
        case SM_JVP: sm_linear_row(j->log, 0, S, st, p + off, a + off, out + off); break;
        case SM_HVP: sm_hvp_row(j->log, S, st, p + off, a + off, g + off, out + off); break;
        }
    }
}

static void sm_range(void *ctx, size_t lo, size_t hi)
{
    const sm_job *j = ctx;
    for (size_t it = lo; it < hi; it++) {
        if (j->inner == 1)
            sm_item(j, it, 1);
        else
            sm_item(j, it, j->inner);
    }
}

static void sm_run(const cv_layer_ctx *c, sm_kind kind, int k, const float *a, const float *g,
                   float *out, float *pc)
{
    const cv_layer *L = c->L;
    int axis = 0;
    cv_err e;
    cv_func_axis(CV_LAYER_ATTR(L, cv_softmax_attr)->dim, L->in_shape.rank, "dim", NULL, &axis,
                 &e);
    size_t inner = 1;
    for (int d = axis + 1; d < L->in_shape.rank; d++)
        inner *= (size_t)L->in_shape.dim[d];
    int log = L->cls == &cv_log_softmax_class;
    const float *p = kind == SM_FORWARD ? NULL : log ? c->d1 : c->y;
    sm_job j = {c, kind, log, (size_t)L->in_shape.dim[axis], inner,
                c->in_numel / (size_t)L->in_shape.dim[axis], p, a, g, out, pc};
    cv_parallel_for((size_t)k * c->n, cv_parallel_grain(4 * c->in_numel), sm_range, &j);
}

static size_t sm_work(const cv_layer_ctx *c, int k) { return 0; }

static int sm_forward(cv_layer_ctx *c, float *y, cv_err *e)
{
    cv_layer_ctx_release(c);
    if (c->L->cls == &cv_log_softmax_class) {
        size_t len = (size_t)c->n * c->in_numel;
        c->d1 = cv_layer_cache(c, sizeof(float) * len);
        if (!c->d1)
            return cv_err_set(e, CV_ENOMEM, "out_of_memory", "",
                              "log_softmax cache (%zu floats)", len);
    }
    sm_run(c, SM_FORWARD, 1, c->x, NULL, y, c->d1);
    return 0;
}

static void sm_vjp(const cv_layer_ctx *c, int k, const float *gy, float *gx, float *gtheta)
{
    if (gx)
        sm_run(c, SM_VJP, k, gy, NULL, gx, NULL);
}

static void sm_jvp(const cv_layer_ctx *c, int k, const float *rx, const float *vtheta,
                   float *ry)
{
    if (rx)
        sm_run(c, SM_JVP, k, rx, NULL, ry, NULL);
    else
        memset(ry, 0, sizeof(float) * (size_t)k * c->n * c->out_numel);
}

static void sm_hvp_extra(const cv_layer_ctx *c, int k, const float *gy, const float *rx,
                         const float *vtheta, float *gx_add, float *gtheta_add)
{
    if (gx_add && rx && gy)
        sm_run(c, SM_HVP, k, rx, gy, gx_add, NULL);
}

static void sm_per_sample(const cv_layer_ctx *c, const float *gy, float *G) {}

static const cv_layer_ops softmax_ops = {
    .work_size = sm_work,
    .forward = sm_forward,
    .vjp = sm_vjp,
    .jvp = sm_jvp,
    .hvp_extra = sm_hvp_extra,
    .per_sample = sm_per_sample,
};

const cv_layer_class cv_softmax_class = {
    .name = "softmax",
    .attr_size = sizeof(cv_softmax_attr),
    CV_FIELDS(softmax_fields),
    .check = softmax_check,
    .infer = softmax_infer,
    .ops = &softmax_ops,
    .function = "softmax",
};

const cv_layer_class cv_log_softmax_class = {
    .name = "log_softmax",
    .attr_size = sizeof(cv_softmax_attr),
    CV_FIELDS(softmax_fields),
    .check = softmax_check,
    .infer = softmax_infer,
    .ops = &softmax_ops,
    .function = "log_softmax",
};
