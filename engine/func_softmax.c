/* func_softmax.c - the function classes softmax and log_softmax over one
 * per-sample dim (F.softmax(x, dim), F.log_softmax(x, dim), x.softmax(dim)).
 * A sample is [outer, S, inner]; a row is the S entries along the dim (stride
 * inner).  With p = softmax(x) along a row and <a, b> the row's dot product:
 *   softmax      y = p      J r = p (r - <p, r>)      J^T g = p (g - <p, g>)
 *                second order (Pearlmutter, direction r, cotangent g):
 *                R(J^T g) = q (g - <p, g>) - p <q, g>,  q = J r
 *   log_softmax  y = log p  J r = r - <p, r>          J^T g = g - p sum(g)
 *                R(J^T g) = -q sum(g),  q = p (r - <p, r>)
 * The forward output y (kept by the driver as c->y) is all the kernels need;
 * row sums are accumulated in double. */
#include <math.h>
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

/* ---- row kernels ------------------------------------------------------------ */

typedef enum { SM_FORWARD, SM_VJP, SM_JVP, SM_HVP } sm_kind;

typedef struct {
    const cv_layer_ctx *c;
    sm_kind kind;
    int log;            /* log_softmax */
    size_t S, inner;    /* row length and stride */
    size_t rows;        /* rows per sample: outer * inner */
    const float *a;     /* forward: x; vjp: gy; jvp/hvp: rx (stacked) */
    const float *g;     /* hvp: the gradient cotangent gy (one vector) */
    float *out;         /* y, gx, ry, gx_add (stacked) */
} sm_job;

/* The probability of entry i of a row whose forward output is y. */
static inline double prob(int log, const float *y, size_t i)
{
    return log ? exp((double)y[i]) : (double)y[i];
}

static void sm_forward_row(const sm_job *j, const float *x, float *y)
{
    size_t S = j->S, st = j->inner;
    float m = x[0];
    for (size_t i = 1; i < S; i++)
        m = x[i * st] > m ? x[i * st] : m;
    double sum = 0;
    for (size_t i = 0; i < S; i++)
        sum += exp((double)(x[i * st] - m));
    double lse = log(sum);
    for (size_t i = 0; i < S; i++) {
        double z = (double)(x[i * st] - m);
        y[i * st] = (float)(j->log ? z - lse : exp(z) / sum);
    }
}

/* out = J^T g (vjp) or J r (jvp), r/g = a, on one row. */
static void sm_linear_row(const sm_job *j, const float *y, const float *a, float *out)
{
    size_t S = j->S, st = j->inner;
    double pa = 0, sa = 0;
    for (size_t i = 0; i < S; i++) {
        pa += prob(j->log, y, i * st) * a[i * st];
        sa += a[i * st];
    }
    for (size_t i = 0; i < S; i++) {
        size_t t = i * st;
        double p = prob(j->log, y, t);
        if (!j->log)
            out[t] = (float)(p * (a[t] - pa));
        else if (j->kind == SM_VJP)
            out[t] = (float)(a[t] - p * sa);
        else
            out[t] = (float)(a[t] - pa);
    }
}

/* out += R(J^T g) for direction r on one row. */
static void sm_hvp_row(const sm_job *j, const float *y, const float *r, const float *g,
                       float *out)
{
    size_t S = j->S, st = j->inner;
    double pr = 0, pg = 0, sg = 0, qg = 0;
    for (size_t i = 0; i < S; i++) {
        double p = prob(j->log, y, i * st);
        pr += p * r[i * st];
        pg += p * g[i * st];
        sg += g[i * st];
    }
    if (j->log) {
        for (size_t i = 0; i < S; i++) {
            size_t t = i * st;
            out[t] -= (float)(prob(1, y, t) * (r[t] - pr) * sg);
        }
        return;
    }
    for (size_t i = 0; i < S; i++)
        qg += (double)y[i * st] * (r[i * st] - pr) * g[i * st];
    for (size_t i = 0; i < S; i++) {
        size_t t = i * st;
        double p = y[t], q = p * (r[t] - pr);
        out[t] += (float)(q * (g[t] - pg) - p * qg);
    }
}

/* Items are (vector, sample) pairs; y, g follow the sample. */
static void sm_range(void *ctx, size_t lo, size_t hi)
{
    const sm_job *j = ctx;
    const cv_layer_ctx *c = j->c;
    size_t numel = c->in_numel, seg = j->S * j->inner;
    for (size_t it = lo; it < hi; it++) {
        size_t n = it % (size_t)c->n;
        const float *y = c->y ? c->y + n * numel : NULL; /* NULL in forward */
        const float *a = j->a ? j->a + it * numel : NULL;
        const float *g = j->g ? j->g + n * numel : NULL;
        float *out = j->out + it * numel;
        for (size_t row = 0; row < j->rows; row++) {
            size_t off = (row / j->inner) * seg + row % j->inner;
            switch (j->kind) {
            case SM_FORWARD: sm_forward_row(j, c->x + n * numel + off, out + off); break;
            case SM_VJP:
            case SM_JVP: sm_linear_row(j, y + off, a + off, out + off); break;
            case SM_HVP: sm_hvp_row(j, y + off, a + off, g + off, out + off); break;
            }
        }
    }
}

static void sm_run(const cv_layer_ctx *c, sm_kind kind, int k, const float *a, const float *g,
                   float *out)
{
    const cv_layer *L = c->L;
    int axis = 0;
    cv_err e;
    cv_func_axis(CV_LAYER_ATTR(L, cv_softmax_attr)->dim, L->in_shape.rank, "dim", NULL, &axis,
                 &e);
    size_t inner = 1;
    for (int d = axis + 1; d < L->in_shape.rank; d++)
        inner *= (size_t)L->in_shape.dim[d];
    sm_job j = {c, kind, L->cls == &cv_log_softmax_class, (size_t)L->in_shape.dim[axis], inner,
                c->in_numel / L->in_shape.dim[axis], a, g, out};
    cv_parallel_for((size_t)k * c->n, cv_parallel_grain(4 * c->in_numel), sm_range, &j);
}

static size_t sm_work(const cv_layer_ctx *c, int k) { return 0; }

static int sm_forward(cv_layer_ctx *c, float *y, cv_err *e)
{
    sm_run(c, SM_FORWARD, 1, NULL, NULL, y);
    return 0;
}

static void sm_vjp(const cv_layer_ctx *c, int k, const float *gy, float *gx, float *gtheta)
{
    if (gx)
        sm_run(c, SM_VJP, k, gy, NULL, gx);
}

static void sm_jvp(const cv_layer_ctx *c, int k, const float *rx, const float *vtheta,
                   float *ry)
{
    if (rx)
        sm_run(c, SM_JVP, k, rx, NULL, ry);
    else
        memset(ry, 0, sizeof(float) * (size_t)k * c->n * c->out_numel);
}

static void sm_hvp_extra(const cv_layer_ctx *c, int k, const float *gy, const float *rx,
                         const float *vtheta, float *gx_add, float *gtheta_add)
{
    if (gx_add && rx && gy)
        sm_run(c, SM_HVP, k, rx, gy, gx_add);
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
