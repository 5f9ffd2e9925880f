/* func_arith.c - the arithmetic function classes: add, sub, mul, div of two
 * tensors broadcast as PyTorch does, or of one tensor and a scalar (either
 * order), and the one-input neg, pow, sqrt, rsqrt.  Two-tensor kernels walk
 * the broadcast (broadcast.h); the vjp of a broadcast operand sums over its
 * expanded entries; mul and div have the bilinear second-order terms
 * (d2/da db = 1 for mul; -1/b^2 and d2/db^2 = 2a/b^3 for div).  One-input
 * forms are activations (layer_activation.h): phi, phi', phi'' cached. */
#include <math.h>
#include <string.h>

#include "broadcast.h"
#include "layer_passthrough.h"
#include "func_elementwise.h"
#include "layer_activation.h"
#include "parallel.h"

enum { OP_ADD, OP_SUB, OP_MUL, OP_DIV };

/* The impl of add/sub/mul/div: the scalar form's activation, and the op. */
typedef struct {
    cv_activation act; /* first: act_forward reads the impl as a cv_activation */
    int op;
} arith_impl;

#define ARITH(L) CV_LAYER_ATTR(L, cv_arith_attr)

static int arith_op(const cv_layer *L) { return ((const arith_impl *)L->cls->impl)->op; }

/* ---- two tensors ------------------------------------------------------------- */

typedef struct {
    cv_bcast w;
    int op, n;
    const float *a, *b;   /* forward inputs, n samples */
    const float *gy;      /* vjp: k stacked; hvp_extra: the one gradient cotangent */
    const float *ra, *rb; /* directions, k stacked (NULL: zero) */
    float *za, *zb;       /* vjp / hvp_extra outputs for a and b (NULL: not needed) */
    float *z;             /* forward / jvp output */
} bin_job;

static void bin_init(bin_job *q, const cv_layer_ctx *c)
{
    memset(q, 0, sizeof *q);
    cv_bcast_init(&q->w, &c->L->in_shapes[0], &c->L->in_shapes[1]);
    q->op = arith_op(c->L);
    q->n = c->n;
    q->a = c->xs[0];
    q->b = c->xs[1];
}

/* The walk over the result's rows; ia, ib (0 or 1: a, b broadcast along the
 * row or not) are constants of the caller's specialisation. */
#define ROWS_BEGIN(q)                                                                        \
    for (size_t r_ = 0; r_ < (q)->w.rows; r_++) {                                            \
        size_t oa, ob, oz = r_ * (q)->w.len;                                                 \
        cv_bcast_row(&(q)->w, r_, &oa, &ob);                                                 \
        for (size_t i = 0; i < (q)->w.len; i++) {                                            \
            size_t pa = oa + i * ia, pb = ob + i * ib, pz = oz + i;
#define ROWS_END \
        }        \
    }

/* An item kernel, inlined into each (op, ia, ib) specialisation. */
#define BIN_ITEM static inline __attribute__((always_inline)) void

static inline float fwd_val(int op, float a, float b)
{
    switch (op) {
    case OP_ADD: return a + b;
    case OP_SUB: return a - b;
    case OP_MUL: return a * b;
    default: return a / b;
    }
}

/* u dz/da and u dz/db: dz/da = 1, 1, b, 1/b; dz/db = 1, -1, a, -a/b^2 (the
 * vjp applies them to gy, the jvp to ra, rb) */
static inline float da_times(int op, float u, float b)
{
    return op == OP_MUL ? u * b : op == OP_DIV ? u / b : u;
}

static inline float db_times(int op, float u, float a, float b)
{
    return op == OP_ADD   ? u
           : op == OP_SUB ? -u
           : op == OP_MUL ? u * a
                          : -u * a / (b * b);
}

/* sample s */
BIN_ITEM bin_forward_item(const bin_job *q, size_t s, int op, size_t ia, size_t ib)
{
    const float *restrict a = q->a + s * q->w.na, *restrict b = q->b + s * q->w.nb;
    float *restrict z = q->z + s * q->w.nz;
    ROWS_BEGIN(q)
    z[pz] = fwd_val(op, a[pa], b[pb]);
    ROWS_END
}

/* vector j of sample s: item t = j * n + s */
BIN_ITEM bin_vjp_item(const bin_job *q, size_t t, int op, size_t ia, size_t ib)
{
    size_t s = t % (size_t)q->n;
    const float *restrict a = q->a + s * q->w.na, *restrict b = q->b + s * q->w.nb;
    const float *restrict g = q->gy + t * q->w.nz;
    if (q->za && (op == OP_ADD || op == OP_SUB) && q->w.na == q->w.nz) {
        memcpy(q->za + t * q->w.na, g, sizeof(float) * q->w.nz); /* not broadcast: a copy */
    } else if (q->za) {
        float *restrict ga = q->za + t * q->w.na;
        memset(ga, 0, sizeof(float) * q->w.na);
        ROWS_BEGIN(q)
        ga[pa] += da_times(op, g[pz], b[pb]);
        ROWS_END
    }
    if (q->zb && op == OP_ADD && q->w.nb == q->w.nz) {
        memcpy(q->zb + t * q->w.nb, g, sizeof(float) * q->w.nz);
    } else if (q->zb) {
        float *restrict gb = q->zb + t * q->w.nb;
        memset(gb, 0, sizeof(float) * q->w.nb);
        ROWS_BEGIN(q)
        gb[pb] += db_times(op, g[pz], a[pa], b[pb]);
        ROWS_END
    }
}

/* ry = dz/da ra, then += dz/db rb (separate loops: no test per entry) */
BIN_ITEM bin_jvp_item(const bin_job *q, size_t t, int op, size_t ia, size_t ib)
{
    size_t s = t % (size_t)q->n;
    const float *restrict a = q->a + s * q->w.na, *restrict b = q->b + s * q->w.nb;
    float *restrict z = q->z + t * q->w.nz;
    if (q->ra) {
        const float *restrict ra = q->ra + t * q->w.na;
        ROWS_BEGIN(q)
        z[pz] = da_times(op, ra[pa], b[pb]);
        ROWS_END
    } else {
        memset(z, 0, sizeof(float) * q->w.nz);
    }
    if (q->rb) {
        const float *restrict rb = q->rb + t * q->w.nb;
        ROWS_BEGIN(q)
        z[pz] += db_times(op, rb[pb], a[pa], b[pb]);
        ROWS_END
    }
}

/* mul: ga += gy rb, gb += gy ra; div: ga += -gy rb / b^2,
 * gb += gy (-ra / b^2 + 2 a rb / b^3) */
BIN_ITEM bin_hvp_item(const bin_job *q, size_t t, int op, size_t ia, size_t ib)
{
    size_t s = t % (size_t)q->n;
    const float *restrict a = q->a + s * q->w.na, *restrict b = q->b + s * q->w.nb;
    const float *restrict g = q->gy + s * q->w.nz;
    const float *restrict ra = q->ra ? q->ra + t * q->w.na : NULL;
    const float *restrict rb = q->rb ? q->rb + t * q->w.nb : NULL;
    float *restrict ga = q->za ? q->za + t * q->w.na : NULL;
    float *restrict gb = q->zb ? q->zb + t * q->w.nb : NULL;
    if (ga && rb) {
        ROWS_BEGIN(q)
        ga[pa] += op == OP_MUL ? g[pz] * rb[pb] : -g[pz] * rb[pb] / (b[pb] * b[pb]);
        ROWS_END
    }
    if (gb && ra) {
        ROWS_BEGIN(q)
        gb[pb] += op == OP_MUL ? g[pz] * ra[pa] : -g[pz] * ra[pa] / (b[pb] * b[pb]);
        ROWS_END
    }
    if (gb && rb && op == OP_DIV) {
        ROWS_BEGIN(q)
        gb[pb] += 2.0f * g[pz] * a[pa] * rb[pb] / (b[pb] * b[pb] * b[pb]);
        ROWS_END
    }
}

/* Each item runs the loop specialised for its op and the row strides. */
#define BIN_STRIDES(fn, q, t, op)                                  \
    do {                                                           \
        if ((q)->w.ia && (q)->w.ib)                                \
            fn(q, t, op, 1, 1);                                    \
        else if ((q)->w.ia)                                        \
            fn(q, t, op, 1, 0);                                    \
        else if ((q)->w.ib)                                        \
            fn(q, t, op, 0, 1);                                    \
        else                                                       \
            fn(q, t, op, 0, 0);                                    \
    } while (0)
#define BIN_DISPATCH(fn, q, t)                                     \
    switch ((q)->op) {                                             \
    case OP_ADD: BIN_STRIDES(fn, q, t, OP_ADD); break;             \
    case OP_SUB: BIN_STRIDES(fn, q, t, OP_SUB); break;             \
    case OP_MUL: BIN_STRIDES(fn, q, t, OP_MUL); break;             \
    default: BIN_STRIDES(fn, q, t, OP_DIV); break;                 \
    }

static void forward_range(void *p, size_t lo, size_t hi)
{
    for (size_t t = lo; t < hi; t++)
        BIN_DISPATCH(bin_forward_item, (const bin_job *)p, t)
}

static void vjp_range(void *p, size_t lo, size_t hi)
{
    for (size_t t = lo; t < hi; t++)
        BIN_DISPATCH(bin_vjp_item, (const bin_job *)p, t)
}

static void jvp_range(void *p, size_t lo, size_t hi)
{
    for (size_t t = lo; t < hi; t++)
        BIN_DISPATCH(bin_jvp_item, (const bin_job *)p, t)
}

static void hvp_range(void *p, size_t lo, size_t hi)
{
    for (size_t t = lo; t < hi; t++)
        BIN_DISPATCH(bin_hvp_item, (const bin_job *)p, t)
}

/* items of one sample's worth of floats each */
static void bin_run(const bin_job *q, size_t items, cv_range_fn fn)
{
    size_t per = q->w.nz + q->w.na + q->w.nb;
    cv_parallel_for(items, cv_parallel_grain(per ? per : 1), fn, (void *)q);
}

/* ---- the kernels: two tensors above, one tensor through the activation ops ------------- */

static int two(const cv_layer_ctx *c) { return c->nin == 2; }

static int arith_forward(cv_layer_ctx *c, float *y, cv_err *e)
{
    if (!two(c))
        return cv_activation_ops.forward(c, y, e);
    bin_job q;
    bin_init(&q, c);
    q.z = y;
    bin_run(&q, (size_t)c->n, forward_range);
    return 0;
}

static void arith_vjp_n(const cv_layer_ctx *c, int k, const float *gy, float *const *gx,
                        float *gtheta)
{
    if (!two(c)) {
        cv_activation_ops.vjp(c, k, gy, gx[0], gtheta);
        return;
    }
    bin_job q;
    bin_init(&q, c);
    q.gy = gy;
    q.za = gx[0];
    q.zb = gx[1];
    if (q.za || q.zb)
        bin_run(&q, (size_t)k * c->n, vjp_range);
}

static void arith_jvp_n(const cv_layer_ctx *c, int k, const float *const *rx,
                        const float *vtheta, float *ry)
{
    if (!two(c)) {
        cv_activation_ops.jvp(c, k, rx[0], vtheta, ry);
        return;
    }
    bin_job q;
    bin_init(&q, c);
    q.ra = rx[0];
    q.rb = rx[1];
    q.z = ry;
    bin_run(&q, (size_t)k * c->n, jvp_range);
}

static void arith_hvp_extra_n(const cv_layer_ctx *c, int k, const float *gy,
                              const float *const *rx, const float *vtheta,
                              float *const *gx_add, float *gtheta_add)
{
    if (!two(c)) {
        cv_activation_ops.hvp_extra(c, k, gy, rx[0], vtheta, gx_add[0], gtheta_add);
        return;
    }
    bin_job q;
    bin_init(&q, c);
    if (q.op == OP_ADD || q.op == OP_SUB)
        return; /* linear */
    q.gy = gy;
    q.ra = rx[0];
    q.rb = rx[1];
    q.za = gx_add[0];
    q.zb = gx_add[1];
    if ((q.za || q.zb) && (q.ra || q.rb))
        bin_run(&q, (size_t)k * c->n, hvp_range);
}

/* the one-input entry points (a driver may call them for a one-input node) */
static void arith_vjp(const cv_layer_ctx *c, int k, const float *gy, float *gx, float *gtheta)
{
    float *g[CV_MAX_NODE_INPUTS] = {gx};
    arith_vjp_n(c, k, gy, g, gtheta);
}

static void arith_jvp(const cv_layer_ctx *c, int k, const float *rx, const float *vtheta,
                      float *ry)
{
    const float *r[CV_MAX_NODE_INPUTS] = {rx};
    arith_jvp_n(c, k, r, vtheta, ry);
}

static void arith_hvp_extra(const cv_layer_ctx *c, int k, const float *gy, const float *rx,
                            const float *vtheta, float *gx_add, float *gtheta_add)
{
    const float *r[CV_MAX_NODE_INPUTS] = {rx};
    float *g[CV_MAX_NODE_INPUTS] = {gx_add};
    arith_hvp_extra_n(c, k, gy, r, vtheta, g, gtheta_add);
}

static const cv_layer_ops arith_ops = {
    .work_size = cv_no_work,
    .forward = arith_forward,
    .vjp = arith_vjp,
    .jvp = arith_jvp,
    .hvp_extra = arith_hvp_extra,
    .per_sample = cv_no_per_sample,
    .vjp_n = arith_vjp_n,
    .jvp_n = arith_jvp_n,
    .hvp_extra_n = arith_hvp_extra_n,
};

/* ---- one tensor and a scalar: activation forwards -------------------------------- */

/* add, sub, mul: y = alpha x + beta elementwise, phi' = alpha, no phi'' */
static void scalar_linear_forward(const cv_layer_ctx *c, float *y_, size_t lo, size_t hi)
{
    const cv_arith_attr *a = ARITH(c->L);
    int op = arith_op(c->L);
    float s = (float)a->scalar;
    const float *restrict x = c->x;
    float *restrict y = y_, *restrict d1 = c->d1;
    if (op == OP_ADD) {
        for (size_t i = lo; i < hi; i++) {
            y[i] = x[i] + s;
            d1[i] = 1.0f;
        }
    } else if (op == OP_SUB) {
        float sign = a->reverse ? -1.0f : 1.0f;
        for (size_t i = lo; i < hi; i++) {
            y[i] = a->reverse ? s - x[i] : x[i] - s;
            d1[i] = sign;
        }
    } else {
        for (size_t i = lo; i < hi; i++) {
            y[i] = x[i] * s;
            d1[i] = s;
        }
    }
}

/* div: x / s (linear), or s / x: phi' = -s / x^2, phi'' = 2 s / x^3 */
static void scalar_div_forward(const cv_layer_ctx *c, float *y, size_t lo, size_t hi)
{
    const cv_arith_attr *a = ARITH(c->L);
    float s = (float)a->scalar;
    for (size_t i = lo; i < hi; i++) {
        float x = c->x[i];
        if (a->reverse) {
            double xd = x;
            y[i] = s / x;
            c->d1[i] = (float)(-a->scalar / (xd * xd));
            c->d2[i] = (float)(2.0 * a->scalar / (xd * xd * xd));
        } else {
            y[i] = x / s;
            c->d1[i] = (float)(1.0 / a->scalar);
            c->d2[i] = 0.0f;
        }
    }
}

/* ---- classes ------------------------------------------------------------------ */

static int arith_infer(cv_layer *L, const cv_shape *in, cv_err *e)
{
    if (L->nin != 2) {
        L->out_shape = *in;
        return 0;
    }
    if (cv_bcast_shape(&L->in_shapes[0], &L->in_shapes[1], &L->out_shape)) {
        char a[64], b[64];
        cv_shape_str(&L->in_shapes[0], a, sizeof a);
        cv_shape_str(&L->in_shapes[1], b, sizeof b);
        return cv_err_set(e, CV_EINVAL, "invalid_model", "",
                          "the per-sample shapes %s and %s do not broadcast", a, b);
    }
    return 0;
}

static int div_check(cv_layer *L, cv_err *e)
{
    if (ARITH(L)->scalar == 0 && !ARITH(L)->reverse)
        return cv_err_set(e, CV_EINVAL, "invalid_value", "scalar", "scalar: division by zero");
    return 0;
}

#define ARITH_FIELDS(nm, def)                                                                \
    static const cv_field nm[] = {                                                           \
        CV_FIELD_NUMBER("scalar", cv_arith_attr, scalar, def, -INFINITY, INFINITY),          \
        CV_FIELD_BOOL("reverse", cv_arith_attr, reverse, 0),                                 \
    }
ARITH_FIELDS(additive_fields, 0.0);
ARITH_FIELDS(multiplicative_fields, 1.0);

static const arith_impl add_impl = {{scalar_linear_forward, 1}, OP_ADD},
                        sub_impl = {{scalar_linear_forward, 1}, OP_SUB},
                        mul_impl = {{scalar_linear_forward, 1}, OP_MUL},
                        div_impl = {{scalar_div_forward, 0}, OP_DIV};

#define ARITH_CLASS(var, nm, fields, impl_, chk)                                              \
    const cv_layer_class var = {.name = nm, .attr_size = sizeof(cv_arith_attr),              \
                                CV_FIELDS(fields), .check = chk, .infer = arith_infer,        \
                                .ops = &arith_ops, .min_inputs = 1, .max_inputs = 2,          \
                                .function = nm, .impl = &impl_}
ARITH_CLASS(cv_add_class, "add", additive_fields, add_impl, NULL);
ARITH_CLASS(cv_sub_class, "sub", additive_fields, sub_impl, NULL);
ARITH_CLASS(cv_mul_class, "mul", multiplicative_fields, mul_impl, NULL);
ARITH_CLASS(cv_div_class, "div", multiplicative_fields, div_impl, div_check);

/* neg: y = -x */
static void neg_forward(const cv_layer_ctx *c, float *y_, size_t lo, size_t hi)
{
    const float *restrict x = c->x;
    float *restrict y = y_, *restrict d1 = c->d1;
    for (size_t i = lo; i < hi; i++) {
        y[i] = -x[i];
        d1[i] = -1.0f;
    }
}

/* x^p with phi' = p x^(p-1), phi'' = p (p-1) x^(p-2); a zero coefficient
 * gives a zero term (x = 0 with p = 1 has phi'' = 0, not 0 * inf) */
static inline cv_act_val pow_phi(const cv_layer *L, double x)
{
    double p = CV_LAYER_ATTR(L, cv_pow_attr)->exponent;
    cv_act_val v;
    v.f = pow(x, p);
    v.d1 = p == 0 ? 0.0 : p * pow(x, p - 1);
    v.d2 = p == 0 || p == 1 ? 0.0 : p * (p - 1) * pow(x, p - 2);
    return v;
}

static inline cv_act_val sqrt_phi(const cv_layer *L, double x)
{
    double r = sqrt(x);
    cv_act_val v = {r, 0.5 / r, -0.25 / (x * r)};
    return v;
}

static inline cv_act_val rsqrt_phi(const cv_layer *L, double x)
{
    double r = 1.0 / sqrt(x);
    cv_act_val v = {r, -0.5 * r / x, 0.75 * r / (x * x)};
    return v;
}

CV_ACTIVATION_FORWARD(pow_forward, pow_phi)
CV_ACTIVATION_FORWARD(sqrt_forward, sqrt_phi)
CV_ACTIVATION_FORWARD(rsqrt_forward, rsqrt_phi)

static const cv_activation neg_act = {neg_forward, 1}, pow_act = {pow_forward, 0},
                           sqrt_act = {sqrt_forward, 0}, rsqrt_act = {rsqrt_forward, 0};

static const cv_field pow_fields[] = {
    {.name = "exponent", .kind = CV_F_NUMBER, .flags = CV_F_REQUIRED,
     .offset = offsetof(cv_pow_attr, exponent), .min = -INFINITY, .max = INFINITY},
};

const cv_layer_class cv_neg_class = {
    .name = "neg", .ops = &cv_activation_ops, .function = "neg", .impl = &neg_act};
const cv_layer_class cv_pow_class = {
    .name = "pow", .attr_size = sizeof(cv_pow_attr), CV_FIELDS(pow_fields),
    .ops = &cv_activation_ops, .function = "pow", .impl = &pow_act};
const cv_layer_class cv_sqrt_class = {
    .name = "sqrt", .ops = &cv_activation_ops, .function = "sqrt", .impl = &sqrt_act};
const cv_layer_class cv_rsqrt_class = {
    .name = "rsqrt", .ops = &cv_activation_ops, .function = "rsqrt", .impl = &rsqrt_act};
