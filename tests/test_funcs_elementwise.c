/* test_funcs_elementwise.c - the elementwise function classes of the graph
 * form (engine/func_elementwise.h): add, sub, mul, div broadcast and with a
 * scalar, neg, pow, sqrt, rsqrt, masked_fill, causal_fill, get_attr, the
 * passthrough functions and the activations' function names.  Forward values
 * against loops written here; every kernel against kernel_check's oracle
 * (finite differences, adjoint identity, stacks, contracts); and broken
 * copies of the kernels to show the oracle catches what matters here. */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "engine/broadcast.h"
#include "engine/func_elementwise.h"
#include "kernel_check.h"
#include "testutil.h"

#define N 3 /* samples */

static void layer_or_fail(cv_layer *L, const char *name, int nin, const cv_shape *in)
{
    ck_assert_msg(kc_layer(L, name, nin, in) == 0, "no class %s", name);
}

/* L's forward of n samples of inputs ins into y: must succeed */
static void forward_ok(cv_layer *L, int n, const float *const *ins, float *y)
{
    char why[256];
    ck_assert_msg(kc_forward(L, n, ins, NULL, NULL, y, why, sizeof why) == 0, "%s", why);
}

/* L's forward must fail with a message containing want */
static void forward_refused(cv_layer *L, const char *want)
{
    char why[256];
    float y[64];
    ck_assert_int_eq(kc_forward(L, 1, NULL, NULL, NULL, y, why, sizeof why), -1);
    ck_assert_msg(strstr(why, want) != NULL, "%s", why);
}

/* kc_check of a one-input L at input x */
static void check_kernels_at(cv_layer *L, const float *x)
{
    kc_opts o = kc_defaults();
    o.inputs[0] = x;
    KC_ASSERT(L, &o);
}

/* n * numel values: N(0, 1), or |v| in [0.5, 1.5] with random sign (away
 * from a pole), or in [0.5, 2] (positive) */
typedef enum { V_NORMAL, V_AWAY, V_POSITIVE } vals;

static float *values(size_t len, vals kind, uint64_t seed)
{
    cv_rng r;
    cv_rng_seed(&r, seed);
    float *v = malloc(sizeof(float) * (len ? len : 1));
    for (size_t i = 0; i < len; i++) {
        double u = cv_rng_uniform(&r);
        if (kind == V_NORMAL)
            v[i] = (float)cv_rng_normal(&r);
        else if (kind == V_AWAY)
            v[i] = (float)((cv_rng_uniform(&r) < 0.5 ? -1 : 1) * (0.5 + u));
        else
            v[i] = (float)(0.5 + 1.5 * u);
    }
    return v;
}

/* ---- two tensors, broadcast ----------------------------------------------------- */

typedef struct {
    cv_shape a, b, out;
} bcase;

static bcase BCASES[12];
static int NBCASES;

static void bcases_init(void)
{
    int i = 0;
    BCASES[i++] = (bcase){kc_shape(2, 3, 4), kc_shape(1, 4), kc_shape(2, 3, 4)};
    BCASES[i++] = (bcase){kc_shape(2, 3, 4), kc_shape(2, 1, 4), kc_shape(2, 3, 4)};
    BCASES[i++] = (bcase){kc_shape(2, 3, 4), kc_shape(2, 3, 1), kc_shape(2, 3, 4)};
    BCASES[i++] = (bcase){kc_shape(3, 2, 3, 4), kc_shape(1, 4), kc_shape(3, 2, 3, 4)};
    BCASES[i++] = (bcase){kc_shape(1, 4), kc_shape(3, 2, 3, 4), kc_shape(3, 2, 3, 4)};
    BCASES[i++] = (bcase){kc_shape(3, 2, 1, 4), kc_shape(2, 3, 1), kc_shape(3, 2, 3, 4)};
    BCASES[i++] = (bcase){kc_shape(2, 3, 4), kc_shape(2, 3, 4), kc_shape(2, 3, 4)};
    BCASES[i++] = (bcase){kc_shape(4, 2, 3, 1, 2), kc_shape(3, 3, 4, 1), kc_shape(4, 2, 3, 4, 2)};
    BCASES[i++] = (bcase){kc_shape(1, 1), kc_shape(2, 3, 4), kc_shape(2, 3, 4)};
    BCASES[i++] = (bcase){kc_shape(2, 1, 1), kc_shape(1, 1), kc_shape(2, 1, 1)};
    NBCASES = i;
}

static const char *const BINOPS[4] = {"add", "sub", "mul", "div"};

static double binop(int op, double a, double b)
{
    return op == 0 ? a + b : op == 1 ? a - b : op == 2 ? a * b : a / b;
}

/* the offset in s (right-aligned, size-1 dims broadcast) of the result's
 * multi-index idx of rank `rank` */
static size_t bcast_offset(const cv_shape *s, const int *idx, int rank)
{
    size_t off = 0, stride = 1;
    for (int d = 0; d < s->rank; d++) {
        int sd = s->rank - 1 - d, od = rank - 1 - d;
        if (s->dim[sd] != 1)
            off += (size_t)idx[od] * stride;
        stride *= (size_t)s->dim[sd];
    }
    return off;
}

static void check_binary_forward(int op, const bcase *bc, const float *a, const float *b)
{
    cv_layer L;
    cv_shape in[2] = {bc->a, bc->b};
    layer_or_fail(&L, BINOPS[op], 2, in);
    size_t nz = cv_shape_numel(&bc->out), na = cv_shape_numel(&bc->a),
           nb = cv_shape_numel(&bc->b);
    float *y = malloc(sizeof(float) * N * nz);
    const float *ins[CV_MAX_NODE_INPUTS] = {a, b};
    forward_ok(&L, N, ins, y);
    ck_assert_int_eq(L.out_shape.rank, bc->out.rank);
    for (int d = 0; d < bc->out.rank; d++)
        ck_assert_int_eq(L.out_shape.dim[d], bc->out.dim[d]);
    for (int s = 0; s < N; s++)
        for (size_t q = 0; q < nz; q++) {
            int idx[CV_MAX_RANK];
            size_t rest = q;
            for (int d = bc->out.rank - 1; d >= 0; d--) {
                idx[d] = (int)(rest % (size_t)bc->out.dim[d]);
                rest /= (size_t)bc->out.dim[d];
            }
            double want = binop(op, a[s * na + bcast_offset(&bc->a, idx, bc->out.rank)],
                                b[s * nb + bcast_offset(&bc->b, idx, bc->out.rank)]);
            ck_assert_msg(fabs(y[s * nz + q] - want) <= 1e-6 * (1 + fabs(want)),
                          "%s forward entry %zu of sample %d: %g, want %g", BINOPS[op], q, s,
                          y[s * nz + q], want);
        }
    free(y);
}

/* _i: op * NBCASES + case */
START_TEST(binary_broadcast)
{
    bcases_init();
    int op = _i / NBCASES, k = _i % NBCASES;
    if (k >= NBCASES)
        return;
    const bcase *bc = &BCASES[k];
    size_t na = cv_shape_numel(&bc->a) * N, nb = cv_shape_numel(&bc->b) * N;
    float *a = values(na, V_NORMAL, 10 + (uint64_t)_i), *b =
        values(nb, op == 3 ? V_AWAY : V_NORMAL, 20 + (uint64_t)_i);
    check_binary_forward(op, bc, a, b);
    cv_layer L;
    cv_shape in[2] = {bc->a, bc->b};
    layer_or_fail(&L, BINOPS[op], 2, in);
    kc_opts o = kc_defaults();
    o.seed = 100 + (uint64_t)_i;
    o.inputs[0] = a;
    o.inputs[1] = b;
    KC_ASSERT(&L, &o);
    o.n = 1; /* one sample too */
    KC_ASSERT(&L, &o);
    free(a);
    free(b);
}
END_TEST

START_TEST(shapes_that_do_not_broadcast)
{
    cv_layer L;
    cv_shape in[2] = {kc_shape(2, 3, 4), kc_shape(1, 3)};
    layer_or_fail(&L, "add", 2, in);
    forward_refused(&L, "[3, 4] and [3] do not broadcast");
    cv_shape o;
    cv_shape a = kc_shape(2, 2, 3), b = kc_shape(2, 3, 3);
    ck_assert_int_eq(cv_bcast_shape(&a, &b, &o), -1);
}
END_TEST

/* ---- one tensor and a scalar ------------------------------------------------------ */

typedef struct {
    int op;
    double scalar;
    int reverse;
} scase;

static const scase SCASES[] = {
    {0, 0.5, 0}, {0, -2.0, 1}, {1, 0.5, 0}, {1, 1.0, 1},  {2, 0.125, 0},
    {2, -3.0, 1}, {3, 8.0, 0}, {3, 2.0, 1}, {3, -0.5, 1},
};

START_TEST(scalar_forms)
{
    const scase *sc = &SCASES[_i];
    cv_shape in = kc_shape(2, 3, 4);
    size_t len = N * cv_shape_numel(&in);
    int pole = sc->op == 3 && sc->reverse;
    float *x = values(len, pole ? V_AWAY : V_NORMAL, 30 + (uint64_t)_i);
    float *y = malloc(sizeof(float) * len);
    cv_layer L;
    layer_or_fail(&L, BINOPS[sc->op], 1, &in);
    ck_assert_int_eq(kc_set(&L, "scalar", sc->scalar), 0);
    ck_assert_int_eq(kc_set(&L, "reverse", sc->reverse), 0);
    const float *ins[CV_MAX_NODE_INPUTS] = {x};
    forward_ok(&L, N, ins, y);
    for (size_t q = 0; q < len; q++) {
        double want = sc->reverse ? binop(sc->op, sc->scalar, x[q]) : binop(sc->op, x[q], sc->scalar);
        ck_assert_msg(fabs(y[q] - want) <= 1e-6 * (1 + fabs(want)), "%s%s %g: %g, want %g",
                      BINOPS[sc->op], sc->reverse ? " reverse" : "", sc->scalar, y[q], want);
    }
    check_kernels_at(&L, x);
    free(x);
    free(y);
}
END_TEST

START_TEST(division_by_a_zero_scalar_is_refused)
{
    cv_layer L;
    cv_shape in = kc_shape(1, 4);
    layer_or_fail(&L, "div", 1, &in);
    kc_set(&L, "scalar", 0);
    forward_refused(&L, "scalar: division by zero");
    kc_set(&L, "reverse", 1); /* 0 / x is fine */
    float y[4];
    forward_ok(&L, 1, NULL, y);
}
END_TEST

/* ---- one-input arithmetic ----------------------------------------------------------- */

typedef struct {
    const char *name;
    double exponent; /* pow */
    vals kind;
} ucase;

static const ucase UCASES[] = {
    {"neg", 0, V_NORMAL}, {"pow", 2, V_NORMAL},   {"pow", 3, V_NORMAL},
    {"pow", -1, V_AWAY},  {"pow", 0.5, V_POSITIVE}, {"pow", -1.5, V_POSITIVE},
    {"pow", 1, V_NORMAL}, {"sqrt", 0, V_POSITIVE}, {"rsqrt", 0, V_POSITIVE},
};

static double unary_ref(const ucase *u, double x)
{
    if (strcmp(u->name, "neg") == 0)
        return -x;
    if (strcmp(u->name, "sqrt") == 0)
        return sqrt(x);
    if (strcmp(u->name, "rsqrt") == 0)
        return 1 / sqrt(x);
    return pow(x, u->exponent);
}

START_TEST(unary_arithmetic)
{
    const ucase *u = &UCASES[_i];
    cv_shape in = kc_shape(3, 2, 2, 3);
    size_t len = N * cv_shape_numel(&in);
    float *x = values(len, u->kind, 40 + (uint64_t)_i), *y = malloc(sizeof(float) * len);
    cv_layer L;
    layer_or_fail(&L, u->name, 1, &in);
    if (strcmp(u->name, "pow") == 0)
        ck_assert_int_eq(kc_set(&L, "exponent", u->exponent), 0);
    const float *ins[CV_MAX_NODE_INPUTS] = {x};
    forward_ok(&L, N, ins, y);
    for (size_t q = 0; q < len; q++) {
        double want = unary_ref(u, x[q]);
        ck_assert_msg(fabs(y[q] - want) <= 1e-6 * (1 + fabs(want)), "%s(%g): %g, want %g",
                      u->name, x[q], y[q], want);
    }
    check_kernels_at(&L, x);
    free(x);
    free(y);
}
END_TEST

/* ---- masked_fill, causal_fill ------------------------------------------------------------ */

typedef struct {
    cv_shape x, mask;
    double value;
    int per_sample; /* a different mask per sample */
} mcase;

static mcase MCASES[6];
static int NMCASES;

static void mcases_init(void)
{
    int i = 0;
    MCASES[i++] = (mcase){kc_shape(3, 2, 3, 3), kc_shape(3, 1, 3, 3), -INFINITY, 0};
    MCASES[i++] = (mcase){kc_shape(3, 2, 3, 3), kc_shape(2, 3, 3), 0.0, 0};
    MCASES[i++] = (mcase){kc_shape(3, 2, 3, 4), kc_shape(1, 4), 2.5, 0};
    MCASES[i++] = (mcase){kc_shape(2, 3, 4), kc_shape(2, 3, 4), -1e9, 1};
    MCASES[i++] = (mcase){kc_shape(2, 3, 4), kc_shape(2, 3, 1), INFINITY, 1};
    NMCASES = i;
}

/* mask values: 0 or a nonzero (1, -2, 0.5) in a pattern; per_sample: varies
 * with the sample */
static float *mask_values(const mcase *m)
{
    size_t nm = cv_shape_numel(&m->mask);
    float *v = malloc(sizeof(float) * N * nm);
    static const float nz[3] = {1.0f, -2.0f, 0.5f};
    for (int s = 0; s < N; s++)
        for (size_t q = 0; q < nm; q++) {
            size_t key = q + (m->per_sample ? (size_t)s : 0);
            v[s * nm + q] = key % 3 == 1 ? 0.0f : nz[key % 3];
        }
    return v;
}

START_TEST(masked_fill)
{
    mcases_init();
    if (_i >= NMCASES)
        return;
    const mcase *m = &MCASES[_i];
    size_t nx = cv_shape_numel(&m->x), nm = cv_shape_numel(&m->mask);
    float *x = values(N * nx, V_NORMAL, 50 + (uint64_t)_i), *mask = mask_values(m);
    float *y = malloc(sizeof(float) * N * nx);
    cv_layer L;
    cv_shape in[2] = {m->x, m->mask};
    layer_or_fail(&L, "masked_fill", 2, in);
    ck_assert_int_eq(kc_set(&L, "value", m->value), 0);
    const float *ins[CV_MAX_NODE_INPUTS] = {x, mask};
    forward_ok(&L, N, ins, y);
    int filled = 0, kept = 0;
    for (int s = 0; s < N; s++)
        for (size_t q = 0; q < nx; q++) {
            int idx[CV_MAX_RANK];
            size_t rest = q;
            for (int d = m->x.rank - 1; d >= 0; d--) {
                idx[d] = (int)(rest % (size_t)m->x.dim[d]);
                rest /= (size_t)m->x.dim[d];
            }
            int fill = mask[s * nm + bcast_offset(&m->mask, idx, m->x.rank)] != 0;
            float want = fill ? (float)m->value : x[s * nx + q];
            ck_assert_msg(y[s * nx + q] == want, "masked_fill entry %zu of sample %d: %g, want %g",
                          q, s, y[s * nx + q], want);
            filled += fill;
            kept += !fill;
        }
    ck_assert(filled > 0 && kept > 0);
    kc_opts o = kc_defaults();
    o.inputs[0] = x;
    o.inputs[1] = mask;
    o.constant[1] = 1;
    KC_ASSERT(&L, &o);
    free(x);
    free(mask);
    free(y);
}
END_TEST

/* the mask's cotangent, when asked for, is zero; x's is gy where kept */
START_TEST(masked_fill_mask_cotangent_is_zero)
{
    cv_layer L;
    cv_shape in[2] = {kc_shape(1, 4), kc_shape(1, 4)};
    layer_or_fail(&L, "masked_fill", 2, in);
    kc_set(&L, "value", -INFINITY);
    float x[4] = {1, 2, 3, 4}, m[4] = {0, 1, 0, 1}, y[4], gy[4] = {1, 1, 1, 1}, gx[4], gm[4];
    const float *ins[CV_MAX_NODE_INPUTS] = {x, m};
    forward_ok(&L, 1, ins, y);
    ck_assert(y[0] == 1 && y[2] == 3 && isinf(y[1]) && y[1] < 0 && isinf(y[3]));
    cv_layer_ctx c;
    memset(&c, 0, sizeof c);
    c.L = &L;
    c.n = 1;
    c.nin = 2;
    c.xs[0] = c.x = x;
    c.xs[1] = m;
    c.in_numels[0] = c.in_numels[1] = c.in_numel = c.out_numel = 4;
    cv_err e;
    ck_assert_int_eq(L.cls->ops->forward(&c, y, &e), 0);
    c.y = y;
    for (int i = 0; i < 4; i++)
        gm[i] = gx[i] = NAN;
    float *g[CV_MAX_NODE_INPUTS] = {gx, gm};
    L.cls->ops->vjp_n(&c, 1, gy, g, NULL);
    for (int i = 0; i < 4; i++) {
        ck_assert(gm[i] == 0.0f);
        ck_assert(gx[i] == (m[i] != 0 ? 0.0f : 1.0f));
    }
    cv_layer_ctx_release(&c);
}
END_TEST

START_TEST(masked_fill_refuses_a_mask_larger_than_x)
{
    cv_layer L;
    cv_shape in[2] = {kc_shape(1, 4), kc_shape(2, 3, 4)};
    layer_or_fail(&L, "masked_fill", 2, in);
    kc_set(&L, "value", 0);
    forward_refused(&L, "does not broadcast to the input's [4]");
}
END_TEST

START_TEST(causal_fill)
{
    static const int shapes[3][4] = {{3, 2, 3, 4}, {2, 3, 3, 0}, {2, 4, 2, 0}};
    const int *sh = shapes[_i];
    cv_shape in = sh[0] == 3 ? kc_shape(3, sh[1], sh[2], sh[3]) : kc_shape(2, sh[1], sh[2]);
    size_t nx = cv_shape_numel(&in);
    int T = in.dim[in.rank - 2], S = in.dim[in.rank - 1];
    float *x = values(N * nx, V_NORMAL, 60 + (uint64_t)_i), *y = malloc(sizeof(float) * N * nx);
    cv_layer L;
    layer_or_fail(&L, "causal_fill", 1, &in);
    double value = _i == 1 ? 0.0 : -INFINITY; /* the default: -inf */
    if (_i == 1)
        ck_assert_int_eq(kc_set(&L, "value", value), 0);
    const float *ins[CV_MAX_NODE_INPUTS] = {x};
    forward_ok(&L, N, ins, y);
    for (size_t q = 0; q < N * nx; q++) {
        int col = (int)(q % (size_t)S), row = (int)(q / (size_t)S % (size_t)T);
        float want = col <= row ? x[q] : (float)value;
        ck_assert_msg(y[q] == want, "causal_fill entry %zu (row %d, col %d): %g, want %g", q, row,
                      col, y[q], want);
    }
    check_kernels_at(&L, x);
    free(x);
    free(y);
}
END_TEST

START_TEST(causal_fill_needs_two_dimensions)
{
    cv_layer L;
    cv_shape in = kc_shape(1, 4);
    layer_or_fail(&L, "causal_fill", 1, &in);
    forward_refused(&L, "rank >= 2");
}
END_TEST

/* ---- get_attr ----------------------------------------------------------------------- */

typedef struct {
    int rank, dim[4];
    int buffer;
    int out_rank; /* per-sample rank */
} gcase;

static const gcase GCASES[] = {
    {3, {1, 3, 4}, 0, 2},    {1, {4}, 0, 1}, {2, {2, 3}, 0, 2}, {1, {1}, 0, 1},
    {4, {1, 1, 3, 3}, 1, 3}, {2, {1, 5}, 1, 1}, {4, {2, 1, 3, 2}, 0, 4},
};

static void set_shape(cv_layer *L, int rank, const int *dim)
{
    cv_int_list *s = &CV_LAYER_ATTR(L, cv_get_attr_attr)->shape;
    s->n = rank;
    for (int i = 0; i < rank; i++)
        s->v[i] = dim[i];
}

START_TEST(get_attr)
{
    const gcase *g = &GCASES[_i];
    cv_layer L;
    layer_or_fail(&L, "get_attr", 0, NULL);
    set_shape(&L, g->rank, g->dim);
    ck_assert_int_eq(kc_set(&L, "buffer", g->buffer), 0);
    size_t P = 1;
    for (int i = 0; i < g->rank; i++)
        P *= (size_t)g->dim[i];
    float *t = values(P, V_NORMAL, 70 + (uint64_t)_i), *y = malloc(sizeof(float) * N * P);
    char why[256];
    ck_assert_msg(kc_forward(&L, N, NULL, g->buffer ? NULL : t, g->buffer ? t : NULL, y, why,
                             sizeof why) == 0,
                  "%s", why);
    /* one tensor of the full shape, named by the node: suffix "" */
    ck_assert_int_eq(L.nparams, !g->buffer);
    ck_assert_int_eq(L.nbuffers, g->buffer);
    const cv_tensor_info *ti = g->buffer ? &L.buffers[0] : &L.params[0];
    ck_assert_str_eq(ti->name, "");
    ck_assert_int_eq(ti->rank, g->rank);
    ck_assert_uint_eq(ti->numel, P);
    for (int i = 0; i < g->rank; i++)
        ck_assert_int_eq(ti->dim[i], g->dim[i]);
    ck_assert_int_eq(L.out_shape.rank, g->out_rank);
    ck_assert_uint_eq(cv_shape_numel(&L.out_shape), P);
    for (int d = 0; d < g->out_rank; d++)
        ck_assert_int_eq(L.out_shape.dim[d], g->dim[g->rank - g->out_rank + d]);
    for (int s = 0; s < N; s++)
        ck_assert(memcmp(y + s * P, t, sizeof(float) * P) == 0);
    kc_opts o = kc_defaults();
    o.seed = 80 + (uint64_t)_i;
    KC_ASSERT(&L, &o);
    free(t);
    free(y);
}
END_TEST

START_TEST(get_attr_bad_shapes)
{
    static const int five[5] = {1, 2, 2, 2, 2}, zero[2] = {3, 0};
    cv_layer L;
    layer_or_fail(&L, "get_attr", 0, NULL);
    forward_refused(&L, "shape: must list 1 to 4 dimensions"); /* none */
    set_shape(&L, 5, five);
    forward_refused(&L, "shape: must list 1 to 4");
    set_shape(&L, 2, zero);
    forward_refused(&L, "shape[1]: must be >= 1");
}
END_TEST

/* ---- function names of module classes, passthroughs ------------------------------------- */

START_TEST(functions_of_module_classes)
{
    static const struct {
        const char *function, *cls, *attr; /* attr: a torch.nn.functional kwarg */
        double value;
        int kinks;
    } F[] = {
        {"relu", "ReLU", "inplace", 0, 1},
        {"gelu", "GELU", "approximate", 1, 0},
        {"silu", "SiLU", "inplace", 0, 0},
        {"sigmoid", "Sigmoid", NULL, 0, 0},
        {"tanh", "Tanh", NULL, 0, 0},
        {"softplus", "Softplus", "beta", 2, 0},
        {"softplus", "Softplus", "threshold", 10, 0},
        {"elu", "ELU", "alpha", 0.5, 1}, /* phi' jumps at 0 unless alpha = 1 */
        {"leaky_relu", "LeakyReLU", "negative_slope", 0.2, 1},
        {"identity", "Identity", NULL, 0, 0},
        {"dropout", "Dropout", "p", 0.3, 0},
        {"dropout", "Dropout", "training", 0, 0},
        {"contiguous", "contiguous", NULL, 0, 0},
    };
    cv_shape in = kc_shape(2, 3, 4);
    for (size_t i = 0; i < sizeof F / sizeof F[0]; i++) {
        cv_layer L;
        layer_or_fail(&L, F[i].function, 1, &in);
        ck_assert_str_eq(L.cls->name, F[i].cls);
        ck_assert_str_eq(L.cls->function, F[i].function);
        if (F[i].attr) {
            int found = 0;
            for (int f = 0; f < L.cls->nfields; f++)
                found |= strcmp(L.cls->fields[f].name, F[i].attr) == 0;
            ck_assert_msg(found, "%s has no attribute %s", F[i].function, F[i].attr);
            if (strcmp(F[i].attr, "inplace") && strcmp(F[i].attr, "training"))
                ck_assert_int_eq(kc_set(&L, F[i].attr, F[i].value), 0);
        }
        kc_opts o = kc_defaults();
        o.kinks = F[i].kinks;
        KC_ASSERT(&L, &o);
    }
}
END_TEST

/* every function name is unique across both registries; a function-only
 * class is named by its function, is not a layer type of the Sequential
 * form, and is well formed */
static size_t field_bytes(const cv_field *f)
{
    switch (f->kind) {
    case CV_F_PAIR: return 2 * sizeof(int);
    case CV_F_NUMBER: return sizeof(double);
    case CV_F_INT_LIST: return sizeof(cv_int_list);
    case CV_F_INT:
    case CV_F_BOOL:
    case CV_F_ENUM:
    case CV_F_FIXED_BOOL: return sizeof(int);
    default: return 0;
    }
}

START_TEST(function_registry)
{
    const cv_layer_class *all[256];
    int n = 0;
    for (int i = 0; i < cv_layer_class_count(); i++)
        all[n++] = cv_layer_class_at(i);
    int nf = cv_function_class_count();
    ck_assert_int_ge(nf, 12);
    ck_assert_ptr_null(cv_function_class_at(nf));
    for (int i = 0; i < nf; i++) {
        const cv_layer_class *c = cv_function_class_at(i);
        all[n++] = c;
        ck_assert_msg(c->function && strcmp(c->function, c->name) == 0, "%s", c->name);
        ck_assert_ptr_null(cv_layer_class_find(c->name)); /* no Sequential type */
        ck_assert_ptr_eq(cv_function_find(c->name), c);
        ck_assert_ptr_nonnull(c->ops);
        ck_assert_ptr_nonnull(c->ops->forward);
        ck_assert_ptr_nonnull(c->ops->work_size);
        ck_assert_uint_le(c->attr_size, CV_LAYER_ATTR_SIZE);
        ck_assert_int_le(c->nfields, CV_LAYER_MAX_FIELDS);
        int multi = c->min_inputs || c->max_inputs;
        ck_assert_msg(!multi || (c->ops->vjp_n && c->ops->jvp_n && c->ops->hvp_extra_n),
                      "%s: a node of other than one input needs the _n kernels", c->name);
        for (int f = 0; f < c->nfields; f++) {
            const cv_field *fd = &c->fields[f];
            for (int g = 0; g < f; g++)
                ck_assert_str_ne(fd->name, c->fields[g].name);
            if (fd->offset != CV_F_NOSTORE)
                ck_assert_msg(fd->offset + field_bytes(fd) <= c->attr_size,
                              "%s.%s lies outside the attribute struct", c->name, fd->name);
        }
    }
    for (int i = 0; i < n; i++) {
        if (!all[i]->function)
            continue;
        ck_assert_ptr_eq(cv_function_find(all[i]->function), all[i]);
        for (int j = 0; j < i; j++)
            ck_assert_msg(!all[j]->function || strcmp(all[i]->function, all[j]->function) != 0,
                          "function %s twice", all[i]->function);
    }
    ck_assert_ptr_null(cv_function_find("no_such_function"));
    ck_assert_ptr_null(cv_function_find("ReLU")); /* functions by function name only */
    static const char *const only[] = {"add", "sub", "mul", "div", "neg", "pow", "sqrt",
                                       "rsqrt", "masked_fill", "causal_fill", "get_attr",
                                       "contiguous"};
    for (size_t i = 0; i < sizeof only / sizeof only[0]; i++) {
        const cv_layer_class *c = cv_function_find(only[i]);
        ck_assert_msg(c && strcmp(c->name, only[i]) == 0, "%s", only[i]);
    }
}
END_TEST

/* ---- the oracle catches broken function kernels ---------------------------------------------- */

static const cv_layer_ops *orig_ops;
static int breakage;

static void broken_hvp_n(const cv_layer_ctx *c, int k, const float *gy, const float *const *rx,
                         const float *v, float *const *gx, float *gt)
{
    if (breakage == 0) /* mul's cross terms forgotten */
        return;
    if (breakage == 1) { /* div: only the first input's term */
        float *g1[CV_MAX_NODE_INPUTS] = {gx[0], NULL};
        orig_ops->hvp_extra_n(c, k, gy, rx, v, g1, gt);
        return;
    }
    orig_ops->hvp_extra_n(c, k, gy, rx, v, gx, gt);
}

static void broken_vjp_n(const cv_layer_ctx *c, int k, const float *gy, float *const *gx,
                         float *gt)
{
    orig_ops->vjp_n(c, k, gy, gx, gt);
    if (breakage == 2 && gx[1]) /* the broadcast operand's sum halved */
        for (size_t i = 0; i < (size_t)k * c->n * c->in_numels[1]; i++)
            gx[1][i] *= 0.5f;
}

START_TEST(broken_function_kernels_are_caught)
{
    static const char *const cls[3] = {"mul", "div", "add"}, *const want[3] = {
        "hvp_extra", "hvp_extra", "adjoint"};
    breakage = _i;
    cv_layer L;
    cv_shape in[2] = {kc_shape(2, 3, 4), kc_shape(1, 4)};
    layer_or_fail(&L, cls[_i], 2, in);
    orig_ops = L.cls->ops;
    cv_layer_ops ops = *orig_ops;
    ops.hvp_extra_n = broken_hvp_n;
    ops.vjp_n = broken_vjp_n;
    cv_layer_class c = *L.cls;
    c.ops = &ops;
    L.cls = &c;
    size_t nb = 4 * N;
    float *b = values(nb, V_AWAY, 90);
    kc_opts o = kc_defaults();
    o.inputs[1] = b;
    char why[512];
    ck_assert_msg(kc_check(&L, &o, why, sizeof why) == -1, "breakage %d not caught", _i);
    ck_assert_msg(strstr(why, want[_i]) != NULL, "breakage %d: %s", _i, why);
    breakage = -1; /* the same wrapping, unbroken, passes */
    ck_assert_msg(kc_check(&L, &o, why, sizeof why) == 0, "%s", why);
    free(b);
}
END_TEST

static Suite *suite(void)
{
    bcases_init();
    mcases_init();
    Suite *s = suite_create("funcs_elementwise");
    TCase *t = tcase_create("arith");
    tcase_add_loop_test(t, binary_broadcast, 0, 4 * NBCASES);
    tcase_add_test(t, shapes_that_do_not_broadcast);
    tcase_add_loop_test(t, scalar_forms, 0, (int)(sizeof SCASES / sizeof SCASES[0]));
    tcase_add_test(t, division_by_a_zero_scalar_is_refused);
    tcase_add_loop_test(t, unary_arithmetic, 0, (int)(sizeof UCASES / sizeof UCASES[0]));
    suite_add_tcase(s, t);
    t = tcase_create("fill");
    tcase_add_loop_test(t, masked_fill, 0, NMCASES);
    tcase_add_test(t, masked_fill_mask_cotangent_is_zero);
    tcase_add_test(t, masked_fill_refuses_a_mask_larger_than_x);
    tcase_add_loop_test(t, causal_fill, 0, 3);
    tcase_add_test(t, causal_fill_needs_two_dimensions);
    suite_add_tcase(s, t);
    t = tcase_create("get_attr");
    tcase_add_loop_test(t, get_attr, 0, (int)(sizeof GCASES / sizeof GCASES[0]));
    tcase_add_test(t, get_attr_bad_shapes);
    suite_add_tcase(s, t);
    t = tcase_create("functions");
    tcase_add_test(t, functions_of_module_classes);
    tcase_add_test(t, function_registry);
    tcase_add_loop_test(t, broken_function_kernels_are_caught, 0, 3);
    suite_add_tcase(s, t);
    return s;
}

int main(void) { return tu_main(suite); }
